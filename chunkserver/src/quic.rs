//! The QUIC data server: one bidirectional stream per request (framing in
//! [`cairn_proto::frame`]), PutChunk forwarded down a replica chain while it arrives, GetChunk
//! served from verified chunk files.
//!
//! The same endpoint serves and dials: it connects to the next replica of a chain with the node
//! identity, so peers see a certificate of the cluster CA naming [`NODE_NAME`].

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cairn_common::tls::{Identity, NODE_NAME};
use cairn_proto::data::{chunk_request::Op, ChunkRequest, ChunkResponse, GetChunk, PutChunk, Status};
use cairn_proto::{frame, MAX_CHUNK};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::store::{ChunkHash, ChunkStore, StoreError};

/// Limits of one data server. Every resource a peer can make us hold has a bound here.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Requests handled at once; one more is answered `STATUS_BUSY` instead of queueing.
    pub max_requests: usize,
    /// Bytes of chunks being received at once (each PutChunk holds its whole chunk in memory).
    pub max_receiving_bytes: u64,
    /// Bytes of chunks read for sending at once (a GetChunk holds what it read in memory until
    /// the peer has it).
    pub max_sending_bytes: u64,
    /// How long a PutChunk waits for receive-buffer room (a GetChunk for send-buffer room)
    /// before it is answered `STATUS_BUSY`.
    pub receive_wait: Duration,
    /// Connecting to the next replica, and each write to or read from it.
    pub downstream_timeout: Duration,
    /// Longest silence from a peer in the middle of a request.
    pub idle_timeout: Duration,
    /// Longest chain a PutChunk may carry (replicas after this one).
    pub max_chain: usize,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_requests: 256,
            max_receiving_bytes: 64 * MAX_CHUNK,
            max_sending_bytes: 64 * MAX_CHUNK,
            receive_wait: Duration::from_secs(5),
            downstream_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_chain: 16,
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Peer connections kept open between requests, at most this many.
const MAX_POOLED: usize = 1024;

/// Builds the endpoint on an already-bound UDP socket: it serves with the node identity and dials
/// peers with it too. `node` (the store's id) keys its connection IDs and stateless resets, so
/// that a restart of the node can reset its previous process's connections.
pub fn endpoint(identity: &Identity, node: u64, socket: UdpSocket) -> Result<Endpoint> {
    socket.set_nonblocking(true).context("set UDP socket non-blocking")?;
    cairn_common::net::tune_udp_socket(&socket);
    let server = identity.quic_server().context("QUIC server TLS config")?;
    let client = identity.quic_client().context("QUIC client TLS config")?;
    let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
    let config = cairn_common::tls::quic_endpoint_config(Some((identity, node)));
    let mut endpoint = Endpoint::new(config, Some(server), socket, runtime).context("create QUIC endpoint")?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Connections to other chunkservers, by the address the chain names them with.
pub(crate) struct Pool {
    endpoint: Endpoint,
    connect_timeout: Duration,
    conns: Mutex<HashMap<String, Connection>>,
}

impl Pool {
    pub(crate) fn new(endpoint: Endpoint, connect_timeout: Duration) -> Pool {
        Pool { endpoint, connect_timeout, conns: Mutex::new(HashMap::new()) }
    }

    fn cached(&self, addr: &str) -> Option<Connection> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.get(addr).filter(|c| c.close_reason().is_none()).cloned()
    }

    fn forget(&self, addr: &str) {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(addr);
    }

    async fn connect(&self, addr: &str) -> Result<Connection> {
        let target: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .with_context(|| format!("resolve {addr}"))?
            .next()
            .with_context(|| format!("{addr} resolves to no address"))?;
        let connecting = self.endpoint.connect(target, NODE_NAME).with_context(|| format!("connect to {addr}"))?;
        let conn = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .with_context(|| format!("connect to {addr}: timed out"))?
            .with_context(|| format!("connect to {addr}"))?;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.len() >= MAX_POOLED {
            conns.retain(|_, c| c.close_reason().is_none());
            if conns.len() >= MAX_POOLED {
                conns.clear();
            }
        }
        conns.insert(addr.to_string(), conn.clone());
        Ok(conn)
    }

    /// Opens a request stream to `addr`, reconnecting once if the pooled connection has died.
    async fn open(&self, addr: &str) -> Result<(SendStream, RecvStream)> {
        if let Some(conn) = self.cached(addr) {
            match conn.open_bi().await {
                Ok(pair) => return Ok(pair),
                Err(e) => {
                    tracing::debug!(addr, error = %e, "pooled connection is dead; reconnecting");
                    self.forget(addr);
                }
            }
        }
        let conn = self.connect(addr).await?;
        conn.open_bi().await.with_context(|| format!("open stream to {addr}"))
    }
}

struct Server {
    store: ChunkStore,
    metrics: Arc<Metrics>,
    limits: Limits,
    pool: Pool,
    requests: Arc<Semaphore>,
    receiving: Arc<Semaphore>,
    sending: Arc<Semaphore>,
}

/// Serves chunk requests on `endpoint` until `shutdown` is cancelled, then stops accepting, waits
/// up to `limits.drain_timeout` for requests in flight and closes the endpoint. Requests are
/// counted and timed in `metrics`.
pub async fn serve(
    endpoint: Endpoint,
    store: ChunkStore,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    let permits = |bytes: u64, name: &str| {
        let n = usize::try_from(bytes).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        anyhow::ensure!(n as u64 >= MAX_CHUNK, "{name} must hold at least one chunk of {MAX_CHUNK} bytes");
        Ok(n)
    };
    let receiving_permits = permits(limits.max_receiving_bytes, "max_receiving_bytes")?;
    let sending_permits = permits(limits.max_sending_bytes, "max_sending_bytes")?;
    let server = Arc::new(Server {
        store,
        metrics,
        pool: Pool::new(endpoint.clone(), limits.downstream_timeout),
        requests: Arc::new(Semaphore::new(limits.max_requests)),
        receiving: Arc::new(Semaphore::new(receiving_permits)),
        sending: Arc::new(Semaphore::new(sending_permits)),
        limits,
    });
    let tracker = TaskTracker::new();
    tracing::info!(addr = ?endpoint.local_addr().ok(), "data server listening");
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let span = tracing::info_span!("conn", remote = %incoming.remote_address());
        tracker.spawn(handle_connection(server.clone(), incoming, tracker.clone(), shutdown.clone()).instrument(span));
    }
    tracker.close();
    if tokio::time::timeout(server.limits.drain_timeout, tracker.wait()).await.is_err() {
        tracing::warn!(in_flight = tracker.len(), "shutdown: gave up waiting for requests in flight");
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    tracing::info!("data server stopped");
    Ok(())
}

async fn handle_connection(
    server: Arc<Server>,
    incoming: quinn::Incoming,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // Includes peers whose certificate the cluster CA did not sign: worth a look, not an error.
            tracing::info!(error = %e, "handshake failed");
            return;
        }
    };
    tracing::debug!("connection established");
    loop {
        let (send, recv) = tokio::select! {
            _ = shutdown.cancelled() => return,
            stream = conn.accept_bi() => match stream {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(reason = %e, "connection closed");
                    return;
                }
            },
        };
        match server.requests.clone().try_acquire_owned() {
            Ok(permit) => {
                let server = server.clone();
                tracker.spawn(
                    async move {
                        handle_stream(&server, send, recv).await;
                        drop(permit);
                    }
                    .in_current_span(),
                );
            }
            Err(_) => {
                tracker.spawn(refuse_busy(send, recv).in_current_span());
            }
        }
    }
}

/// Answers a request we have no room for, without reading it.
async fn refuse_busy(mut send: SendStream, mut recv: RecvStream) {
    tracing::debug!("too many requests in flight; answering busy");
    let _ = recv.stop(quinn::VarInt::from_u32(0));
    let resp = ChunkResponse {
        status: Status::Busy as i32,
        message: "too many requests in flight".into(),
        ..Default::default()
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), send.write_all(&frame::encode(&resp))).await;
    let _ = send.finish();
}

fn error_response(status: Status, message: impl Into<String>) -> ChunkResponse {
    ChunkResponse { status: status as i32, message: message.into(), ..Default::default() }
}

fn store_error_response(err: &StoreError) -> ChunkResponse {
    error_response(err.status(), error_chain(err))
}

/// `err` and its sources as one line, the way anyhow prints `{:#}`.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

async fn handle_stream(server: &Server, mut send: SendStream, mut recv: RecvStream) {
    let idle = server.limits.idle_timeout;
    let req: ChunkRequest = match tokio::time::timeout(idle, frame::read(&mut recv)).await {
        Ok(Ok(req)) => req,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "bad request header");
            let _ = recv.stop(quinn::VarInt::from_u32(0));
            write_response(&mut send, &error_response(Status::Invalid, format!("bad request header: {e}")), idle).await;
            return;
        }
        Err(_) => {
            tracing::debug!("no request header before the idle timeout");
            return;
        }
    };
    let span = tracing::info_span!("request", id = %req.request_id);
    let start = Instant::now();
    async move {
        match req.op {
            Some(Op::Put(put)) => {
                let len = put.length;
                let resp = handle_put(server, &req.request_id, put, &mut recv).await;
                let ok = resp.status == Status::Ok as i32;
                if !ok {
                    let _ = recv.stop(quinn::VarInt::from_u32(0));
                }
                write_response(&mut send, &resp, idle).await;
                server.metrics.put_done(ok, len, start.elapsed());
            }
            Some(Op::Get(get)) => {
                let sent = handle_get(server, get, &mut send).await;
                server.metrics.get_done(sent, start.elapsed());
            }
            None => {
                write_response(&mut send, &error_response(Status::Invalid, "request names no operation"), idle).await;
            }
        }
    }
    .instrument(span)
    .await
}

async fn write_response(send: &mut SendStream, resp: &ChunkResponse, timeout: Duration) {
    match tokio::time::timeout(timeout, send.write_all(&frame::encode(resp))).await {
        Ok(Ok(())) => {
            let _ = send.finish();
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "peer went away before the response"),
        Err(_) => tracing::debug!("timed out writing the response"),
    }
}

/// Answers a GetChunk. Returns the bytes of chunk sent, or None if it was refused or cut off.
async fn handle_get(server: &Server, get: GetChunk, send: &mut SendStream) -> Option<u64> {
    let idle = server.limits.idle_timeout;
    let Some(hash) = ChunkHash::from_slice(&get.hash) else {
        let resp = error_response(Status::Invalid, format!("hash has {} bytes, not 32", get.hash.len()));
        write_response(send, &resp, idle).await;
        return None;
    };
    let most = if get.length == 0 { MAX_CHUNK } else { get.length.min(MAX_CHUNK) };
    let permits = u32::try_from(most).expect("MAX_CHUNK fits in u32");
    let mut room = match tokio::time::timeout(
        server.limits.receive_wait,
        server.sending.clone().acquire_many_owned(permits),
    )
    .await
    {
        Ok(Ok(p)) => p,
        Ok(Err(_)) | Err(_) => {
            write_response(send, &error_response(Status::Busy, "too many chunks being sent"), idle).await;
            return None;
        }
    };
    let read = if get.reader_checks {
        server.store.get_for_checking_reader(hash, get.offset, get.length).await
    } else {
        server.store.get_recent(hash, get.offset, get.length).await
    };
    let read = match read {
        Ok(read) => read,
        Err(e) => {
            if !matches!(e, StoreError::NotFound(_)) {
                tracing::warn!(%hash, error = %error_chain(&e), "get failed");
            }
            write_response(send, &store_error_response(&e), idle).await;
            return None;
        }
    };
    // Room for a whole chunk was taken before the size was known (a whole-chunk read of a small,
    // packed chunk is a few KiB): what the read did not need goes back now.
    let excess = room.num_permits().saturating_sub(read.bytes.len());
    if excess > 0 {
        drop(room.split(excess));
    }
    let header = ChunkResponse { status: Status::Ok as i32, length: read.bytes.len() as u64, ..Default::default() };
    // The chunk goes out of its read buffer: quinn keeps the `Bytes` until the peer has it.
    let mut parts = [frame::encode(&header), read.bytes];
    let write = async {
        let mut done = 0;
        while done < parts.len() {
            done += send.write_chunks(&mut parts[done..]).await?.chunks;
        }
        Ok::<(), quinn::WriteError>(())
    };
    // A whole chunk may take a while on a slow link; bound it generously by the idle timeout per
    // MiB so a stuck peer cannot hold the chunk's buffer forever.
    let budget = idle.saturating_mul(1 + (header.length >> 20) as u32);
    match tokio::time::timeout(budget, write).await {
        Ok(Ok(())) => {
            let _ = send.finish();
            // The send-buffer room is held until the peer has acknowledged the bytes: until
            // then quinn keeps them.
            let _ = tokio::time::timeout(budget, send.stopped()).await;
            return Some(header.length);
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "peer went away during get"),
        Err(_) => tracing::debug!("timed out sending a chunk"),
    }
    None
}

/// The next replica of a chain, being fed while we receive.
struct Downstream {
    addr: String,
    send: SendStream,
    recv: RecvStream,
}

async fn open_downstream(server: &Server, request_id: &str, put: &PutChunk) -> Result<Downstream, String> {
    let addr = put.chain[0].clone();
    let timeout = server.limits.downstream_timeout;
    let fwd = ChunkRequest {
        request_id: request_id.to_string(),
        op: Some(Op::Put(PutChunk { hash: put.hash.clone(), length: put.length, chain: put.chain[1..].to_vec() })),
    };
    let setup = async {
        let (mut send, recv) = server.pool.open(&addr).await?;
        send.write_all(&frame::encode(&fwd)).await.with_context(|| format!("send request to {addr}"))?;
        anyhow::Ok((send, recv))
    };
    match tokio::time::timeout(timeout, setup).await {
        Ok(Ok((send, recv))) => Ok(Downstream { addr, send, recv }),
        Ok(Err(e)) => Err(format!("replica {addr} unreachable: {e:#}")),
        Err(_) => Err(format!("replica {addr} unreachable: timed out")),
    }
}

async fn handle_put(server: &Server, request_id: &str, put: PutChunk, recv: &mut RecvStream) -> ChunkResponse {
    let Some(hash) = ChunkHash::from_slice(&put.hash) else {
        return error_response(Status::Invalid, format!("hash has {} bytes, not 32", put.hash.len()));
    };
    if put.length == 0 || put.length > MAX_CHUNK {
        return error_response(Status::Invalid, format!("chunk length {} is not in 1..={MAX_CHUNK}", put.length));
    }
    if put.chain.len() > server.limits.max_chain {
        return error_response(
            Status::Invalid,
            format!("chain of {} replicas exceeds {}", put.chain.len(), server.limits.max_chain),
        );
    }
    let len = put.length as usize;
    let permits = u32::try_from(put.length).expect("MAX_CHUNK fits in u32");
    let _room =
        match tokio::time::timeout(server.limits.receive_wait, server.receiving.clone().acquire_many_owned(permits))
            .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(_)) | Err(_) => return error_response(Status::Busy, "too many chunks being received"),
        };

    // The request id travels down the chain with the chunk, so one search follows a put.
    let mut downstream = None;
    let mut downstream_err = None;
    if !put.chain.is_empty() {
        match open_downstream(server, request_id, &put).await {
            Ok(ds) => downstream = Some(ds),
            Err(e) => downstream_err = Some(e),
        }
    }

    let idle = server.limits.idle_timeout;
    let ds_timeout = server.limits.downstream_timeout;
    let mut buf = server.store.staging();
    while buf.len() < len {
        let piece = match tokio::time::timeout(idle, recv.read_chunk(len - buf.len(), true)).await {
            Ok(Ok(Some(piece))) => piece.bytes,
            Ok(Ok(None)) => return abort_put(downstream, format!("stream ended after {} of {len} bytes", buf.len())),
            Ok(Err(e)) => return abort_put(downstream, format!("receiving the chunk: {e}")),
            Err(_) => return abort_put(downstream, format!("no data for {idle:?} after {} of {len} bytes", buf.len())),
        };
        if let Some(ds) = downstream.as_mut() {
            // Pipelined: this piece leaves for the next replica before we read the next one.
            let sent = tokio::time::timeout(ds_timeout, ds.send.write_chunk(piece.clone())).await;
            let failure = match sent {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("replica {} failed while receiving: {e}", ds.addr)),
                Err(_) => Some(format!("replica {} stalled while receiving", ds.addr)),
            };
            if let Some(f) = failure {
                let _ = ds.send.reset(quinn::VarInt::from_u32(0));
                downstream = None;
                downstream_err = Some(f);
            }
        }
        if !buf.extend(&piece) {
            return abort_put(downstream, format!("more than the announced {len} bytes"));
        }
    }

    let local = server.store.put_staged(hash, buf);
    let remote = async {
        let Some(mut ds) = downstream else {
            return Ok(0);
        };
        let _ = ds.send.finish();
        match tokio::time::timeout(ds_timeout, frame::read::<ChunkResponse, _>(&mut ds.recv)).await {
            Ok(Ok(resp)) if resp.status == Status::Ok as i32 => Ok(resp.replicas),
            Ok(Ok(resp)) => {
                let status = Status::try_from(resp.status).map(|s| s.as_str_name()).unwrap_or("UNKNOWN");
                Err(format!("replica {} answered {status}: {}", ds.addr, resp.message))
            }
            Ok(Err(e)) => Err(format!("replica {} did not answer: {e}", ds.addr)),
            Err(_) => Err(format!("replica {} did not answer in {ds_timeout:?}", ds.addr)),
        }
    };
    let (local, remote) = tokio::join!(local, remote);
    if !put.chain.is_empty() {
        if downstream_err.is_none() && remote.is_ok() {
            server.metrics.chain_forwards.inc();
        } else {
            server.metrics.chain_forward_errors.inc();
        }
    }
    if let Err(e) = local {
        match e {
            StoreError::HashMismatch { .. } | StoreError::Invalid(_) => {
                tracing::info!(%hash, error = %e, "put refused")
            }
            _ => tracing::warn!(%hash, error = %error_chain(&e), "put failed"),
        }
        return store_error_response(&e);
    }
    if let Some(e) = downstream_err {
        tracing::warn!(%hash, error = %e, "chain broken");
        return error_response(Status::Unavailable, e);
    }
    match remote {
        Ok(replicas) => {
            tracing::debug!(%hash, replicas = replicas + 1, "chunk stored");
            ChunkResponse { status: Status::Ok as i32, replicas: replicas + 1, ..Default::default() }
        }
        Err(e) => {
            tracing::warn!(%hash, error = %e, "chain broken");
            error_response(Status::Unavailable, e)
        }
    }
}

/// The chunk did not arrive whole: store nothing, and make the next replica drop it too.
fn abort_put(downstream: Option<Downstream>, why: String) -> ChunkResponse {
    tracing::debug!(reason = %why, "put aborted");
    if let Some(mut ds) = downstream {
        let _ = ds.send.reset(quinn::VarInt::from_u32(0));
    }
    error_response(Status::Invalid, why)
}

/// Fetches a whole chunk from the chunkserver at `addr` over a pooled connection
/// (re-replication pulls with this). The caller verifies the bytes against the hash when it
/// stores them.
pub(crate) async fn fetch(pool: &Pool, addr: &str, hash: &ChunkHash, timeout: Duration) -> Result<bytes::Bytes> {
    let run = async {
        let (mut send, mut recv) = pool.open(addr).await?;
        let req = ChunkRequest {
            request_id: format!("copy-{}", &hash.to_hex()[..12]),
            op: Some(Op::Get(GetChunk { hash: hash.0.to_vec(), offset: 0, length: 0, reader_checks: false })),
        };
        send.write_all(&frame::encode(&req)).await?;
        send.finish()?;
        let resp: ChunkResponse = frame::read(&mut recv).await?;
        anyhow::ensure!(resp.status() == Status::Ok, "{addr}: {:?}: {}", resp.status(), resp.message);
        anyhow::ensure!(resp.length <= MAX_CHUNK, "{addr} announced {} bytes", resp.length);
        let mut buf = bytes::BytesMut::zeroed(resp.length as usize);
        recv.read_exact(&mut buf).await?;
        anyhow::Ok(buf.freeze())
    };
    tokio::time::timeout(timeout, run).await.with_context(|| format!("fetch from {addr}: timed out"))?
}
