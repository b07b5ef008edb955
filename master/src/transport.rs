//! Raft messages between masters over gRPC. Each peer has one long-lived client stream fed from a
//! bounded queue by its own task; a full queue or a broken stream drops messages (Raft
//! retransmits), so a slow or dead peer never stalls the driver. Snapshots go on their own
//! stream: the state machine is read from a pinned redb read transaction and sent in pages, and
//! the receiver stages the records in a file that the driver installs if raft-rs accepts it.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_proto::v1::{raft_client::RaftClient, RaftMessage, SnapshotChunk, SnapshotRecord};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::Message as RaftMsg;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::node::{Core, Msg, Network};
use crate::raftlog::RaftLog;

const QUEUE: usize = 4096;
const RECONNECT: Duration = Duration::from_millis(100);
const RECORDS_PER_CHUNK: usize = 1024;
/// A chunk is sent once its records hold this many bytes, even with fewer records (inodes with
/// long extent lists), well under the servers' message limit.
const BYTES_PER_CHUNK: usize = 4 << 20;
/// Largest snapshot record accepted from a stream file (an inode with its extent list).
const MAX_RECORD: usize = 64 << 20;

struct Peer {
    addr: String,
    queue: mpsc::Sender<RaftMsg>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Transport {
    me: u64,
    my_addr: String,
    identity: cairn_common::tls::Identity,
    inbox: mpsc::Sender<Msg>,
    rt: tokio::runtime::Handle,
    peers: HashMap<u64, Peer>,
}

impl Transport {
    pub fn new(
        me: u64,
        my_addr: String,
        identity: cairn_common::tls::Identity,
        inbox: mpsc::Sender<Msg>,
        rt: tokio::runtime::Handle,
    ) -> Transport {
        Transport { me, my_addr, identity, inbox, rt, peers: HashMap::new() }
    }

    fn client(&self, addr: &str) -> Result<RaftClient<Channel>> {
        // The channel's background task must live on the server's runtime (with IO), not on the
        // driver thread's, which has only a timer.
        let _rt = self.rt.enter();
        let ep = Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(self.identity.grpc_client())?
            .connect_timeout(Duration::from_secs(1))
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true);
        Ok(RaftClient::new(ep.connect_with_connector_lazy(cairn_common::net::GrpcConnector))
            .max_decoding_message_size(crate::MAX_MESSAGE))
    }

    fn send_snapshot(&self, m: RaftMsg, log: &RaftLog) {
        let to = m.to;
        let inbox = self.inbox.clone();
        let Some((_, txn)) = log.take_outgoing_snapshot(to) else {
            tracing::warn!(peer = to, "raft-rs sent a snapshot that was not prepared");
            let _ = inbox.try_send(Msg::SnapshotSent { to, ok: false });
            return;
        };
        let Some(addr) = self.peers.get(&to).map(|p| p.addr.clone()) else {
            let _ = inbox.try_send(Msg::SnapshotSent { to, ok: false });
            return;
        };
        let client = self.client(&addr);
        let from_addr = self.my_addr.clone();
        let index = m.get_snapshot().get_metadata().index;
        self.rt.spawn(async move {
            let res = async {
                let mut client = client?;
                let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
                let first = SnapshotChunk { message: m.write_to_bytes()?, from_addr, ..Default::default() };
                tx.send(first).await.ok();
                let dump = tokio::task::spawn_blocking(move || {
                    let mut page = Vec::with_capacity(RECORDS_PER_CHUNK);
                    let (mut records, mut bytes) = (0u64, 0usize);
                    crate::state::dump(&txn, |table, key, value| {
                        bytes += key.len() + value.len();
                        page.push(SnapshotRecord { table, key, value });
                        records += 1;
                        if page.len() == RECORDS_PER_CHUNK || bytes >= BYTES_PER_CHUNK {
                            let chunk = SnapshotChunk { records: std::mem::take(&mut page), ..Default::default() };
                            tx.blocking_send(chunk).map_err(|_| anyhow::anyhow!("snapshot stream closed"))?;
                            bytes = 0;
                        }
                        Ok(())
                    })?;
                    // Only a dump that went through ends with the last chunk: if it failed, the
                    // stream just stops, and the receiver installs nothing.
                    let last =
                        SnapshotChunk { records: page, last: true, total_records: records, ..Default::default() };
                    tx.blocking_send(last).map_err(|_| anyhow::anyhow!("snapshot stream closed"))?;
                    anyhow::Ok(records)
                });
                let sent = client.install_snapshot(ReceiverStream::new(rx)).await;
                let records = dump.await.context("snapshot dump task")??;
                sent.context("install snapshot")?;
                anyhow::Ok(records)
            }
            .await;
            match &res {
                Ok(records) => tracing::info!(peer = to, index, records, "sent a snapshot"),
                Err(e) => tracing::warn!(peer = to, index, "sending a snapshot failed: {e:#}"),
            }
            let _ = inbox.send(Msg::SnapshotSent { to, ok: res.is_ok() }).await;
        });
    }
}

impl Network for Transport {
    fn send(&mut self, msgs: Vec<RaftMsg>, log: &RaftLog) {
        for m in msgs {
            if Core::is_snapshot(&m) {
                self.send_snapshot(m, log);
            } else if let Some(p) = self.peers.get(&m.to) {
                let _ = p.queue.try_send(m);
            }
        }
    }

    fn set_peers(&mut self, peers: &BTreeMap<u64, String>) {
        self.peers.retain(|id, p| {
            let keep = peers.get(id) == Some(&p.addr);
            if !keep {
                p.task.abort();
            }
            keep
        });
        for (&id, addr) in peers {
            if id == self.me || self.peers.contains_key(&id) {
                continue;
            }
            let client = match self.client(addr) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(peer = id, addr, "bad master address: {e:#}");
                    continue;
                }
            };
            let (queue, rx) = mpsc::channel(QUEUE);
            let task = self.rt.spawn(peer_loop(id, client, rx, self.my_addr.clone()));
            self.peers.insert(id, Peer { addr: addr.clone(), queue, task });
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        for p in self.peers.values() {
            p.task.abort();
        }
    }
}

/// Feeds one peer's stream; opens a new stream whenever the last one ended.
async fn peer_loop(id: u64, client: RaftClient<Channel>, mut rx: mpsc::Receiver<RaftMsg>, my_addr: String) {
    let encode = |m: RaftMsg| -> Option<RaftMessage> {
        match m.write_to_bytes() {
            Ok(message) => Some(RaftMessage { message, from_addr: my_addr.clone() }),
            Err(e) => {
                tracing::error!("encode raft message: {e}");
                None
            }
        }
    };
    loop {
        let Some(first) = rx.recv().await else { return };
        let (stx, srx) = mpsc::channel::<RaftMessage>(QUEUE);
        if let Some(m) = encode(first) {
            let _ = stx.try_send(m);
        }
        let mut c = client.clone();
        let mut call = tokio::spawn(async move { c.stream(ReceiverStream::new(srx)).await });
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    None => return,
                    Some(m) => {
                        if let Some(m) = encode(m) {
                            if stx.try_send(m).is_err() && stx.is_closed() {
                                break;
                            }
                        }
                    }
                },
                res = &mut call => {
                    if let Ok(Err(e)) = res {
                        tracing::debug!(peer = id, "raft stream ended: {e}");
                    }
                    break;
                }
            }
        }
        drop(stx);
        call.abort();
        tokio::time::sleep(RECONNECT).await;
    }
}

/// Writes the records of an incoming snapshot stream to `path`: u32 length + SnapshotRecord.
pub struct SnapshotFile {
    path: PathBuf,
    out: Option<BufWriter<std::fs::File>>,
}

impl SnapshotFile {
    pub fn create(dir: &Path) -> Result<SnapshotFile> {
        let path = dir.join(format!("snapshot-in-{:016x}.tmp", rand::random::<u64>()));
        let f = std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(SnapshotFile { path, out: Some(BufWriter::new(f)) })
    }

    pub fn write(&mut self, records: &[SnapshotRecord]) -> Result<()> {
        let out = self.out.as_mut().context("snapshot file closed")?;
        for r in records {
            let bytes = r.encode_to_vec();
            out.write_all(&(bytes.len() as u32).to_be_bytes())?;
            out.write_all(&bytes)?;
        }
        Ok(())
    }

    /// Flushes and hands the file over; it is no longer removed on drop.
    pub fn finish(mut self) -> Result<PathBuf> {
        if let Some(mut out) = self.out.take() {
            out.flush()?;
        }
        Ok(std::mem::take(&mut self.path))
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes the records of a snapshot stream into `file`: those of its `first` chunk, then of the
/// `rest`, up to its last chunk, whose record count must match. A stream that ends without one
/// (the sender's dump failed midway) is refused, so that a partial state is never installed.
pub async fn receive_snapshot<S>(
    first: &SnapshotChunk,
    rest: &mut S,
    file: &mut SnapshotFile,
) -> Result<(), tonic::Status>
where
    S: tokio_stream::Stream<Item = Result<SnapshotChunk, tonic::Status>> + Unpin,
{
    use tokio_stream::StreamExt as _;
    let internal = |e: anyhow::Error| tonic::Status::internal(format!("stage snapshot: {e:#}"));
    file.write(&first.records).map_err(internal)?;
    let mut received = first.records.len() as u64;
    let mut last = first.last.then_some(first.total_records);
    while let Some(chunk) = rest.next().await {
        let chunk = chunk?;
        if last.is_some() {
            return Err(tonic::Status::invalid_argument("a snapshot stream goes on after its last chunk"));
        }
        file.write(&chunk.records).map_err(internal)?;
        received += chunk.records.len() as u64;
        last = chunk.last.then_some(chunk.total_records);
    }
    match last {
        Some(total) if total == received => Ok(()),
        Some(total) => {
            Err(tonic::Status::invalid_argument(format!("a snapshot stream of {received} records says it has {total}")))
        }
        None => Err(tonic::Status::aborted("the snapshot stream ended before its last chunk")),
    }
}

/// The records of a staged snapshot file, in order.
pub fn read_snapshot_file(path: &Path) -> Result<impl Iterator<Item = Result<crate::state::Record>>> {
    let mut r = BufReader::new(std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?);
    Ok(std::iter::from_fn(move || {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) => return Some(Err(e.into())),
            Ok(()) => {}
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_RECORD {
            return Some(Err(anyhow::anyhow!("snapshot record of {len} bytes")));
        }
        let mut buf = vec![0u8; len];
        Some(
            r.read_exact(&mut buf)
                .map_err(anyhow::Error::from)
                .and_then(|_| SnapshotRecord::decode(&buf[..]).context("decode snapshot record"))
                .map(|rec| (rec.table, rec.key, rec.value)),
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: usize, last: Option<u64>) -> SnapshotChunk {
        let records = (0..n).map(|i| SnapshotRecord { table: 1, key: vec![i as u8], value: vec![] }).collect();
        SnapshotChunk { records, last: last.is_some(), total_records: last.unwrap_or(0), ..Default::default() }
    }

    async fn receive(chunks: Vec<SnapshotChunk>) -> Result<usize, tonic::Status> {
        let dir = tempfile::tempdir().unwrap();
        let mut file = SnapshotFile::create(dir.path()).unwrap();
        let mut chunks = chunks.into_iter();
        let first = chunks.next().unwrap();
        let mut rest = tokio_stream::iter(chunks.map(Ok));
        receive_snapshot(&first, &mut rest, &mut file).await?;
        let path = file.finish().unwrap();
        Ok(read_snapshot_file(&path).unwrap().count())
    }

    #[tokio::test]
    async fn only_a_snapshot_stream_that_reached_its_last_chunk_is_accepted() {
        assert_eq!(receive(vec![chunk(0, None), chunk(3, None), chunk(2, Some(5))]).await.unwrap(), 5);
        assert_eq!(receive(vec![chunk(0, Some(0))]).await.unwrap(), 0, "an empty state in one chunk");
        // The sender's dump failed midway: the stream just stops.
        let cut = receive(vec![chunk(0, None), chunk(3, None)]).await.unwrap_err();
        assert_eq!(cut.code(), tonic::Code::Aborted, "{cut}");
        let short = receive(vec![chunk(0, None), chunk(3, None), chunk(1, Some(5))]).await.unwrap_err();
        assert_eq!(short.code(), tonic::Code::InvalidArgument, "{short}");
        let after = receive(vec![chunk(0, None), chunk(1, Some(1)), chunk(1, None)]).await.unwrap_err();
        assert_eq!(after.code(), tonic::Code::InvalidArgument, "{after}");
    }
}
