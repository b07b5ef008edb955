//! Socket tuning shared by every QUIC endpoint.

use std::os::fd::AsRawFd;

/// Socket buffer asked for on every QUIC socket. The kernel caps it at net.core.rmem_max /
/// wmem_max (raise those for fast links); the 208 KiB default drops bursts of chunk traffic,
/// which QUIC then reads as loss and congestion, and MTU discovery as a black hole.
pub const UDP_BUFFER: usize = 8 << 20;

/// Enlarges the send and receive buffers of a UDP socket as far as the kernel allows. Returns
/// the receive buffer size obtained (0 if it could not be read).
pub fn tune_udp_socket(socket: &std::net::UdpSocket) -> usize {
    let fd = socket.as_raw_fd();
    let size = UDP_BUFFER as libc::c_int;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: fd is a valid socket for the lifetime of `socket`; the option value is a c_int.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!("setsockopt {opt}: {}", std::io::Error::last_os_error());
        }
    }
    let mut got: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above; `got` and `len` are valid for writes.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, (&mut got as *mut libc::c_int).cast(), &mut len)
    };
    if rc == 0 {
        got as usize
    } else {
        0
    }
}

/// Lowest port [`unused_port`] picks: above the registered ports that services commonly use.
const UNUSED_PORT_FLOOR: u16 = 10_000;

/// A TCP port on `ip` that nothing listens on now, for a server whose address other processes
/// must know before it starts (the peers of a master, a dev cluster's gateway).
///
/// The port comes from below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`) when
/// that leaves room: the ports that bind(0) hands out, and the source ports of outgoing
/// connections, come from inside that range, so another process on the machine (a test binding
/// port 0, a client connecting anywhere) cannot take this one between the check here and the
/// server's own bind, as it could take a port that bind(0) returned and then released.
pub fn unused_port(ip: std::net::IpAddr) -> std::io::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > UNUSED_PORT_FLOOR + 1_000 {
        let span = u64::from(ephemeral_low - UNUSED_PORT_FLOOR);
        for _ in 0..64 {
            let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
            let port = UNUSED_PORT_FLOOR + (random % span) as u16;
            match std::net::TcpListener::bind((ip, port)) {
                Ok(_) => return Ok(port),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::AddrInUse | std::io::ErrorKind::PermissionDenied) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// `n` distinct [`unused_port`]s, for the servers of one group that must know each other.
pub fn unused_ports(ip: std::net::IpAddr, n: usize) -> std::io::Result<Vec<u16>> {
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let port = unused_port(ip)?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unused_port_is_bindable_and_outside_the_ephemeral_range() {
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        let port = unused_port(ip).unwrap();
        let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .map(|s| {
                let v: Vec<u16> = s.split_whitespace().map(|x| x.parse().unwrap()).collect();
                (v[0], v[1])
            })
            .unwrap();
        if low > UNUSED_PORT_FLOOR + 1_000 {
            assert!((UNUSED_PORT_FLOOR..low).contains(&port), "{port} not below the ephemeral range {low}-{high}");
        }
        // Nothing holds it: the server that asked can bind it.
        std::net::TcpListener::bind((ip, port)).unwrap();
    }
}
