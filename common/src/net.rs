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
