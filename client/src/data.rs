//! The data plane as a client sees it: QUIC connections to chunkservers (one per node, reused,
//! many streams in parallel), chunk upload down a replica chain, ranged chunk reads, and a circuit
//! breaker per node so that after a node dies reads skip it instead of each paying a timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cairn_common::bufs::Bufs;
use cairn_proto::data::{chunk_request, ChunkRequest, ChunkResponse, GetChunk, PutChunk, Status};
use cairn_proto::frame;
use cairn_proto::v1::ChunkserverRef;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time for one chunk request once connected: a 4 MiB chunk at 10 MB/s fits; a dead replica
/// costs no more than this before the next is tried.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read waits for a replica to start answering when another replica could serve it:
/// a live chunkserver answers in milliseconds, and a node that just died (its QUIC connection
/// still looks open) must not stall readers until the master declares it dead.
pub const FAILOVER_AFTER: Duration = Duration::from_secs(1);
/// Consecutive failures that open a node's breaker.
const BREAKER_THRESHOLD: u32 = 2;
const BREAKER_OPEN: Duration = Duration::from_secs(5);
const BREAKER_OPEN_MAX: Duration = Duration::from_secs(60);
/// A probe gets at most [`REQUEST_TIMEOUT`]; after this long its result is not coming.
const PROBE_LOST_AFTER: Duration = Duration::from_secs(15);

/// Why a chunk request failed, and so what to do next.
#[derive(Debug)]
pub enum ChunkError {
    /// The node is unreachable or timed out: count against its breaker, try another.
    Unreachable(String),
    /// The node answered with an error status.
    Refused(Status, String),
    /// The node said its copy is corrupt (it moved it aside).
    Corrupt(String),
    /// The bytes received do not match the chunk's hash.
    Mismatch(String),
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChunkError::Unreachable(m) => write!(f, "unreachable: {m}"),
            ChunkError::Refused(s, m) => {
                write!(f, "{}: {m}", s.as_str_name().trim_start_matches("STATUS_").to_lowercase())
            }
            ChunkError::Corrupt(m) | ChunkError::Mismatch(m) => write!(f, "corrupt: {m}"),
        }
    }
}

#[derive(Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    open_for: Duration,
    /// When the half-open probe was granted; a probe whose result never came (its request was
    /// dropped) stops counting after [`PROBE_LOST_AFTER`].
    probing: Option<Instant>,
}

pub struct DataPlane {
    endpoint: quinn::Endpoint,
    conns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<quinn::Connection>>>>>,
    breakers: Breakers,
    bufs: Arc<Bufs>,
}

/// Idle chunk buffers kept for reuse, at most (4 MiB each, so up to 64 MiB stays resident in a
/// client that once read or wrote large files).
const POOLED_KEEP: usize = 16;

/// One request (its encoded frame `head`, then `body`) on `conn`, and the response header.
async fn exchange_on(
    conn: &quinn::Connection,
    addr: &str,
    head: &[u8],
    body: Option<Bytes>,
) -> Result<(ChunkResponse, quinn::RecvStream), ChunkError> {
    let unreachable = |e: &dyn std::fmt::Display| ChunkError::Unreachable(format!("{addr}: {e}"));
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| unreachable(&e))?;
    send.write_all(head).await.map_err(|e| unreachable(&e))?;
    if let Some(body) = body {
        // Handed over without a copy: quinn keeps the Bytes until they are acknowledged.
        send.write_chunk(body).await.map_err(|e| unreachable(&e))?;
    }
    send.finish().map_err(|e| unreachable(&e))?;
    let resp: ChunkResponse = frame::read(&mut recv).await.map_err(|e| unreachable(&e))?;
    Ok((resp, recv))
}

/// Whether a connection ended because its peer (or a restarted process on its address) said so.
fn closed_by_peer(reason: &quinn::ConnectionError) -> bool {
    use quinn::ConnectionError as E;
    matches!(reason, E::Reset | E::ConnectionClosed(_) | E::ApplicationClosed(_))
}

/// A circuit breaker per chunkserver: after [`BREAKER_THRESHOLD`] failures in a row a node is
/// skipped for [`BREAKER_OPEN`] (doubling on each failed probe, up to [`BREAKER_OPEN_MAX`]);
/// then one request may probe it (half-open), and its result closes or reopens the breaker.
#[derive(Default)]
pub(crate) struct Breakers(Mutex<HashMap<u64, Breaker>>);

impl Breakers {
    /// Whether a request to `node` may go now. Granting a half-open probe marks it taken, so
    /// call this right before the request and report its result.
    pub(crate) fn allow(&self, node: u64, now: Instant) -> bool {
        let mut g = self.0.lock().expect("breakers lock");
        let b = g.entry(node).or_default();
        match b.open_until {
            None => true,
            Some(t) if now < t => false,
            Some(_) if b.probing.is_some_and(|p| now.duration_since(p) < PROBE_LOST_AFTER) => false,
            Some(_) => {
                b.probing = Some(now);
                true
            }
        }
    }

    pub(crate) fn succeeded(&self, node: u64) {
        self.0.lock().expect("breakers lock").remove(&node);
    }

    pub(crate) fn failed(&self, node: u64, now: Instant) {
        let mut g = self.0.lock().expect("breakers lock");
        let b = g.entry(node).or_default();
        b.failures += 1;
        if b.probing.is_some() || b.failures >= BREAKER_THRESHOLD {
            b.open_for = if b.open_for.is_zero() { BREAKER_OPEN } else { (b.open_for * 2).min(BREAKER_OPEN_MAX) };
            b.open_until = Some(now + b.open_for);
            b.probing = None;
        }
    }

    pub(crate) fn open(&self, now: Instant) -> Vec<u64> {
        let g = self.0.lock().expect("breakers lock");
        g.iter().filter(|(_, b)| b.open_until.is_some_and(|t| now < t)).map(|(id, _)| *id).collect()
    }
}

fn request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl DataPlane {
    pub fn new(identity: &cairn_common::tls::Identity) -> anyhow::Result<DataPlane> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        cairn_common::net::tune_udp_socket(&socket);
        let runtime = quinn::default_runtime().ok_or_else(|| anyhow::anyhow!("no async runtime for QUIC"))?;
        let mut endpoint = quinn::Endpoint::new(cairn_common::tls::quic_endpoint_config(None), None, socket, runtime)?;
        endpoint.set_default_client_config(identity.quic_client()?);
        Ok(DataPlane {
            endpoint,
            conns: Mutex::new(HashMap::new()),
            breakers: Breakers::default(),
            bufs: Bufs::new(cairn_proto::MAX_CHUNK as usize, POOLED_KEEP),
        })
    }

    /// A connection to `addr`: the open one kept from earlier requests (`true`), or a new one.
    async fn connection(&self, addr: &str) -> Result<(quinn::Connection, bool), ChunkError> {
        let slot = self.conns.lock().expect("conns lock").entry(addr.to_string()).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.close_reason().is_none() {
                return Ok((c.clone(), true));
            }
        }
        let sa: SocketAddr = addr.parse().map_err(|_| ChunkError::Unreachable(format!("bad address {addr:?}")))?;
        let connecting = self
            .endpoint
            .connect(sa, cairn_common::tls::NODE_NAME)
            .map_err(|e| ChunkError::Unreachable(format!("connect {addr}: {e}")))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| ChunkError::Unreachable(format!("connect {addr}: timed out")))?
            .map_err(|e| ChunkError::Unreachable(format!("connect {addr}: {e}")))?;
        *slot = Some(conn.clone());
        Ok((conn, false))
    }

    /// Whether a request to `node` should be tried now (see [`Breakers::allow`]).
    pub fn allow(&self, node: u64) -> bool {
        self.breakers.allow(node, Instant::now())
    }

    pub fn succeeded(&self, node: u64) {
        self.breakers.succeeded(node);
    }

    pub fn failed(&self, node: u64) {
        self.breakers.failed(node, Instant::now());
    }

    /// Nodes whose breaker is open now: placement should avoid them.
    pub fn open_breakers(&self) -> Vec<u64> {
        self.breakers.open(Instant::now())
    }

    /// Sends a request (and its body) to `addr` and reads the response header. A kept connection
    /// that the node turns out to have reset (it restarted) or closed is replaced, and the request
    /// sent once more on a new one: chunk requests are idempotent. One that timed out is not: the
    /// node is silent, and the caller moves on to another replica.
    async fn exchange(
        &self,
        addr: &str,
        req: ChunkRequest,
        body: Option<Bytes>,
    ) -> Result<(ChunkResponse, quinn::RecvStream), ChunkError> {
        let head = frame::encode(&req);
        let (conn, kept) = self.connection(addr).await?;
        match exchange_on(&conn, addr, &head, body.clone()).await {
            Err(e) if kept && conn.close_reason().is_some_and(|r| closed_by_peer(&r)) => {
                tracing::debug!(%addr, error = %e, "kept connection is gone; sending again on a new one");
                let (conn, _) = self.connection(addr).await?;
                exchange_on(&conn, addr, &head, body).await
            }
            r => r,
        }
    }

    /// Uploads a chunk to `targets[0]`, which forwards it down the rest of the chain. Succeeds
    /// only when every target made it durable.
    pub async fn put_chunk(
        &self,
        targets: &[ChunkserverRef],
        hash: &[u8; 32],
        data: Bytes,
    ) -> Result<(), (u64, ChunkError)> {
        let first = targets.first().ok_or((0, ChunkError::Unreachable("no targets".into())))?;
        let req = ChunkRequest {
            request_id: request_id(),
            op: Some(chunk_request::Op::Put(PutChunk {
                hash: hash.to_vec(),
                length: data.len() as u64,
                chain: targets[1..].iter().map(|t| t.addr.clone()).collect(),
            })),
        };
        let res = tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(&first.addr, req, Some(data))).await;
        let resp = match res {
            Err(_) => return Err((first.id, ChunkError::Unreachable(format!("{}: upload timed out", first.addr)))),
            Ok(Err(e)) => return Err((first.id, e)),
            Ok(Ok((resp, _))) => resp,
        };
        match resp.status() {
            Status::Ok if resp.replicas as usize == targets.len() => Ok(()),
            Status::Ok => Err((
                first.id,
                ChunkError::Refused(
                    Status::Unavailable,
                    format!("{} of {} replicas acked", resp.replicas, targets.len()),
                ),
            )),
            s => Err((first.id, ChunkError::Refused(s, resp.message))),
        }
    }

    /// The pool of chunk-sized buffers, for readers of large inputs.
    pub(crate) fn bufs(&self) -> Arc<Bufs> {
        self.bufs.clone()
    }

    /// Reads `length` bytes at `offset` of a chunk from one replica (length 0: the rest). A whole
    /// chunk is checked against its hash here, and the server is told so: it sends its copy
    /// without hashing it first. If the bytes do not match, the chunk is asked for again with
    /// the server's check, which moves a damaged copy out of its store and answers "corrupt"
    /// (damage in transit would not get past QUIC's own integrity checks). A range was checked
    /// by the server, which verifies the chunk before it serves any part of it. The replica must
    /// start answering within `patience` (connection included).
    pub async fn get_chunk(
        &self,
        node: &ChunkserverRef,
        hash: &[u8; 32],
        chunk_len: u64,
        offset: u64,
        length: u64,
        patience: Duration,
    ) -> Result<Bytes, ChunkError> {
        let whole = offset == 0 && (length == 0 || length == chunk_len);
        if !whole {
            return self.get_chunk_from(node, hash, chunk_len, offset, length, patience, false).await;
        }
        let why = match self.get_chunk_from(node, hash, chunk_len, offset, length, patience, true).await {
            Err(ChunkError::Mismatch(why)) => why,
            r => return r,
        };
        tracing::warn!(chunk = %hex::encode(hash), addr = %node.addr, "{why}; asking it to check its copy");
        match self.get_chunk_from(node, hash, chunk_len, offset, length, patience, false).await {
            Ok(b) => Ok(b),
            Err(e @ (ChunkError::Corrupt(_) | ChunkError::Mismatch(_))) => Err(e),
            // The copy did not match: it is reported as such even when its check could not run.
            Err(_) => Err(ChunkError::Mismatch(why)),
        }
    }

    /// [`DataPlane::get_chunk`] in one request; `reader_checks` tells the server that a whole
    /// chunk is hashed here.
    #[allow(clippy::too_many_arguments)]
    async fn get_chunk_from(
        &self,
        node: &ChunkserverRef,
        hash: &[u8; 32],
        chunk_len: u64,
        offset: u64,
        length: u64,
        patience: Duration,
        reader_checks: bool,
    ) -> Result<Bytes, ChunkError> {
        let req = ChunkRequest {
            request_id: request_id(),
            op: Some(chunk_request::Op::Get(GetChunk { hash: hash.to_vec(), offset, length, reader_checks })),
        };
        let want = if length == 0 { chunk_len.saturating_sub(offset) } else { length };
        let fetch = async {
            let (resp, mut recv) = tokio::time::timeout(patience, self.exchange(&node.addr, req, None))
                .await
                .map_err(|_| ChunkError::Unreachable(format!("{}: no answer within {patience:?}", node.addr)))??;
            match resp.status() {
                Status::Ok => {}
                Status::Corrupt => return Err(ChunkError::Corrupt(format!("{} found its copy corrupt", node.addr))),
                s => return Err(ChunkError::Refused(s, resp.message)),
            }
            if resp.length != want {
                return Err(ChunkError::Refused(
                    Status::Invalid,
                    format!("{} announced {} bytes, {want} expected", node.addr, resp.length),
                ));
            }
            let unreachable = |e| ChunkError::Unreachable(format!("{}: {e}", node.addr));
            if self.bufs.suits(want as usize) {
                let mut buf = self.bufs.take();
                recv.read_exact(&mut buf.buf[..want as usize]).await.map_err(unreachable)?;
                return Ok(buf.freeze(want as usize));
            }
            let mut buf = BytesMut::zeroed(want as usize);
            recv.read_exact(&mut buf).await.map_err(unreachable)?;
            Ok(buf.freeze())
        };
        let data = tokio::time::timeout(REQUEST_TIMEOUT, fetch)
            .await
            .map_err(|_| ChunkError::Unreachable(format!("{}: read timed out", node.addr)))??;
        if offset == 0 && want == chunk_len {
            let h = hash_chunk(data.clone()).await;
            if &h != hash {
                return Err(ChunkError::Mismatch(format!("bytes from {} do not match the chunk hash", node.addr)));
            }
        }
        Ok(data)
    }

    pub fn close(&self) {
        for (addr, slot) in self.conns.lock().expect("conns lock").iter() {
            if let Ok(g) = slot.try_lock() {
                if let Some(c) = g.as_ref() {
                    let s = c.stats();
                    tracing::debug!(%addr, mtu = s.path.current_mtu, rtt = ?s.path.rtt, sent_packets = s.path.sent_packets, lost = s.path.lost_packets, "QUIC connection");
                }
            }
        }
        self.endpoint.close(0u32.into(), b"done");
    }
}

/// BLAKE3 of a chunk, off the async threads.
pub(crate) async fn hash_chunk(data: Bytes) -> [u8; 32] {
    // Below 64 KiB hashing takes under 15 us: cheaper here than a hand-off to another thread.
    if data.len() <= 64 << 10 {
        return *blake3::hash(&data).as_bytes();
    }
    let h = tokio::task::spawn_blocking(move || *blake3::hash(&data).as_bytes()).await;
    h.expect("hashing does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP relay standing in for one node address. It forwards the client's datagrams to the
    /// node process `target` names, and only that process's answers back: switching `target`
    /// is a restart on the same address in which the old process said no goodbye.
    async fn relay(target: Arc<Mutex<SocketAddr>>, servers: Vec<SocketAddr>) -> SocketAddr {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = sock.local_addr().expect("relay address");
        tokio::spawn(async move {
            let mut client = None;
            let mut buf = vec![0u8; 1 << 16];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let to = *target.lock().expect("relay target");
                let dest = if from == to {
                    client
                } else if servers.contains(&from) {
                    None
                } else {
                    client = Some(from);
                    Some(to)
                };
                if let Some(dest) = dest {
                    let _ = sock.send_to(&buf[..n], dest).await;
                }
            }
        });
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_restarted_on_its_address_is_reached_again_at_once() {
        use cairn_chunkserver::quic::{endpoint, serve, Limits};
        use cairn_common::tls::{self, Identity, Role};
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        tls::init_ca(&ca).expect("CA");
        let ip = ["127.0.0.1".parse().expect("an IP")];
        tls::issue(&ca, &dir.path().join("node"), Role::Node, &ip).expect("node identity");
        tls::issue(&ca, &dir.path().join("client"), Role::Client, &ip).expect("client identity");
        let node = Identity::load(&dir.path().join("node")).expect("node identity");
        let store = cairn_chunkserver::store::ChunkStore::open(&dir.path().join("data"), None).await.expect("store");
        // Two processes of one node (same identity, same store) behind one address.
        let stop = tokio_util::sync::CancellationToken::new();
        let mut servers = Vec::new();
        for _ in 0..2 {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            servers.push(socket.local_addr().expect("address"));
            let ep = endpoint(&node, store.node_id(), socket).expect("endpoint");
            tokio::spawn(serve(ep, store.clone(), Limits::default(), Default::default(), stop.child_token()));
        }
        let target = Arc::new(Mutex::new(servers[0]));
        let addr = relay(target.clone(), servers.clone()).await;
        let plane =
            DataPlane::new(&Identity::load(&dir.path().join("client")).expect("client identity")).expect("data plane");
        let r = ChunkserverRef { id: 1, addr: addr.to_string() };
        let data = Bytes::from(vec![7u8; 100_000]);
        let hash = *blake3::hash(&data).as_bytes();
        plane.put_chunk(std::slice::from_ref(&r), &hash, data.clone()).await.expect("put");
        let len = data.len() as u64;
        assert_eq!(plane.get_chunk(&r, &hash, len, 0, 0, FAILOVER_AFTER).await.expect("get"), data);
        // "Restart": the kept connection now reaches a process that does not know it. That
        // process resets it, and the request goes again on a new connection, well before the
        // idle timeout (4 s) would have closed the old one.
        *target.lock().expect("relay target") = servers[1];
        let got = plane.get_chunk(&r, &hash, len, 0, 0, Duration::from_secs(3)).await;
        assert_eq!(got.expect("get after the restart"), data);
        plane.close();
        stop.cancel();
    }

    #[test]
    fn breaker_opens_probes_and_closes() {
        let b = Breakers::default();
        let t0 = Instant::now();
        assert!(b.allow(1, t0));
        b.failed(1, t0);
        assert!(b.allow(1, t0), "one failure does not open the breaker");
        b.failed(1, t0);
        assert!(!b.allow(1, t0), "two in a row do");
        assert_eq!(b.open(t0), vec![1]);
        assert!(b.allow(2, t0), "other nodes are not affected");
        // Half-open: one probe once the time is up, not two.
        let t1 = t0 + BREAKER_OPEN;
        assert!(b.allow(1, t1));
        assert!(!b.allow(1, t1));
        // A failed probe reopens it for twice as long.
        b.failed(1, t1);
        assert!(!b.allow(1, t1 + BREAKER_OPEN));
        let t2 = t1 + 2 * BREAKER_OPEN;
        assert!(b.allow(1, t2));
        // A probe whose result never comes (its request was dropped) is given up in time.
        assert!(!b.allow(1, t2 + PROBE_LOST_AFTER / 2));
        let t3 = t2 + PROBE_LOST_AFTER;
        assert!(b.allow(1, t3));
        // A successful probe closes it.
        b.succeeded(1);
        assert!(b.allow(1, t3) && b.allow(1, t3));
        assert!(b.open(t3).is_empty());
    }
}
