//! Helpers shared by the in-process tests: a throwaway CA, identities, and a raw data-plane client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_common::tls::{self, Identity, Role};
use cairn_proto::data::{chunk_request::Op, ChunkRequest, ChunkResponse, GetChunk, PutChunk};
use cairn_proto::frame;

pub const TIMEOUT: Duration = Duration::from_secs(15);

/// Makes a CA in `dir/<name>` and returns its directory.
pub fn ca(dir: &Path, name: &str) -> PathBuf {
    let ca = dir.join(name);
    tls::init_ca(&ca).expect("init CA");
    ca
}

pub fn identity(ca: &Path, out: &Path, role: Role) -> Identity {
    tls::issue(ca, out, role, &["127.0.0.1".parse().expect("an IP")]).expect("issue identity");
    Identity::load(out).expect("load identity")
}

pub fn client_endpoint(id: &Identity) -> quinn::Endpoint {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("an address")).expect("client endpoint");
    ep.set_default_client_config(id.quic_client().expect("client TLS"));
    ep
}

pub async fn connect(ep: &quinn::Endpoint, addr: SocketAddr) -> anyhow::Result<quinn::Connection> {
    Ok(tokio::time::timeout(TIMEOUT, ep.connect(addr, tls::NODE_NAME)?).await??)
}

/// Sends one PutChunk with `data` as the bytes and returns the answer.
pub async fn put(
    conn: &quinn::Connection,
    hash: &[u8],
    data: &[u8],
    chain: Vec<String>,
) -> anyhow::Result<ChunkResponse> {
    put_raw(conn, hash, data.len() as u64, data, chain).await
}

/// Announces `length` bytes but sends `data` (which may be shorter) and ends the stream.
pub async fn put_raw(
    conn: &quinn::Connection,
    hash: &[u8],
    length: u64,
    data: &[u8],
    chain: Vec<String>,
) -> anyhow::Result<ChunkResponse> {
    let work = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let req = ChunkRequest {
            request_id: "test-put".into(),
            op: Some(Op::Put(PutChunk { hash: hash.to_vec(), length, chain })),
        };
        send.write_all(&frame::encode(&req)).await?;
        send.write_all(data).await?;
        send.finish()?;
        let resp: ChunkResponse = frame::read(&mut recv).await?;
        anyhow::Ok(resp)
    };
    tokio::time::timeout(TIMEOUT, work).await?
}

/// Sends one GetChunk and returns the answer and the bytes that followed it.
pub async fn get(
    conn: &quinn::Connection,
    hash: &[u8],
    offset: u64,
    length: u64,
) -> anyhow::Result<(ChunkResponse, Vec<u8>)> {
    let work = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let req = ChunkRequest {
            request_id: "test-get".into(),
            op: Some(Op::Get(GetChunk { hash: hash.to_vec(), offset, length, reader_checks: false })),
        };
        send.write_all(&frame::encode(&req)).await?;
        send.finish()?;
        let resp: ChunkResponse = frame::read(&mut recv).await?;
        let mut bytes = vec![0u8; resp.length as usize];
        recv.read_exact(&mut bytes).await?;
        anyhow::Ok((resp, bytes))
    };
    tokio::time::timeout(TIMEOUT, work).await?
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Polls `cond` every 20 ms until it holds or `TIMEOUT` passes.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
