//! Socket tuning shared by every QUIC endpoint, and the connector of every gRPC client.

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

/// Bytes [`Coalesce`] holds before it writes through without waiting for a flush.
const COALESCE_LIMIT: usize = 64 << 10;

/// A byte stream whose writes wait in memory until a flush, and whose flush waits one turn of
/// the scheduler before it writes: what else is ready to go by then leaves in the same write.
///
/// It sits under the TLS of every gRPC client connection. hyper's HTTP/2 client flushes a
/// request's HEADERS frame before the request's body is handed capacity, so each call went out
/// as two TLS records in two `writev`s, each a TCP segment the server woke up for. Deferring the
/// flush by one yield lets the body's DATA frame join the HEADERS: one write per call.
#[derive(Debug)]
pub struct Coalesce<T> {
    io: T,
    buf: Vec<u8>,
    /// How much of `buf` the inner stream took already.
    sent: usize,
    /// The flush in progress has yielded once already.
    yielded: bool,
}

impl<T> Coalesce<T> {
    pub fn new(io: T) -> Coalesce<T> {
        Coalesce { io, buf: Vec::new(), sent: 0, yielded: false }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> Coalesce<T> {
    /// Writes out what is held.
    fn poll_drain(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = std::task::ready!(std::pin::Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return std::task::Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        std::task::Poll::Ready(Ok(()))
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[std::io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.buf.len() >= COALESCE_LIMIT {
            std::task::ready!(self.poll_drain(cx))?;
        }
        let room = COALESCE_LIMIT.saturating_sub(self.buf.len()).max(1);
        let mut taken = 0;
        for d in data {
            let n = d.len().min(room - taken);
            self.buf.extend_from_slice(&d[..n]);
            taken += n;
            if taken == room {
                break;
            }
        }
        std::task::Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.buf.len() > self.sent && !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        std::task::ready!(self.poll_drain(cx))?;
        self.yielded = false;
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_drain(cx))?;
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The connector of every gRPC client channel (`Endpoint::connect_with_connector`): TCP with
/// Nagle off, under a [`Coalesce`]. The endpoint's TLS configuration still applies on top.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcConnector;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for GrpcConnector {
    type Response = hyper_util::rt::TokioIo<Coalesce<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        Box::pin(async move {
            let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no host and port in {uri}"));
            let host = uri.host().ok_or_else(bad)?;
            let port = uri.port_u16().ok_or_else(bad)?;
            // An IPv6 literal comes in brackets.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let tcp = tokio::net::TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(Coalesce::new(tcp)))
        })
    }
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

    /// Records every write it is handed, as one entry each.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl tokio::io::AsyncWrite for Writes {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            data: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.0.push(data.to_vec());
            std::task::Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_wait_for_the_flush_and_leave_together() {
        use tokio::io::AsyncWriteExt;
        let mut c = Coalesce::new(Writes::default());
        c.write_all(b"headers").await.unwrap();
        c.write_all(b"+data").await.unwrap();
        assert!(c.io.0.is_empty(), "nothing leaves before a flush");
        // The first poll of a flush yields (and wakes itself); the second writes.
        let mut flush = std::pin::pin!(async { c.flush().await });
        assert!(futures_poll_once(flush.as_mut()).is_pending());
        assert!(futures_poll_once(flush.as_mut()).is_ready());
        assert_eq!(c.io.0, vec![b"headers+data".to_vec()], "one write for both");
        // Nothing held: a flush does not yield.
        assert!(futures_poll_once(std::pin::pin!(c.flush())).is_ready());
        c.write_all(b"bye").await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(c.io.0.last().unwrap(), b"bye", "shutdown writes what is held");
    }

    #[tokio::test]
    async fn a_big_write_goes_out_in_pieces_of_the_limit_without_a_flush() {
        use tokio::io::AsyncWriteExt;
        let mut c = Coalesce::new(Writes::default());
        let big = vec![7u8; COALESCE_LIMIT * 2 + 10];
        c.write_all(&big).await.unwrap();
        assert_eq!(c.io.0.len(), 2, "two full buffers went out");
        assert!(c.io.0.iter().all(|w| w.len() == COALESCE_LIMIT));
        c.flush().await.unwrap();
        assert_eq!(c.io.0.concat(), big);
    }

    /// Polls a future once with a waker that does nothing.
    fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        f.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }
}
