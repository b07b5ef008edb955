//! The Raft driver: one thread owns the `RawNode`, ticks it, feeds it proposals and peer messages
//! from a bounded channel, and handles each `Ready` in the order raft-rs prescribes (see
//! CONVENTIONS.md section 5): nothing is acknowledged, voted or acked to a peer before it is
//! durable in redb. Proposals that arrive while a batch is being written wait in the channel and
//! go out together in the next one, so many mutations share one fsync (group commit).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use cairn_proto::v1::{command, command_result, raft_client::RaftClient, Command, RaftMessage};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message as RaftMsg};
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::error::MetaError;
use crate::raftlog::RaftLog;
use crate::state::State;

const TICK: Duration = Duration::from_millis(100);
const INBOX: usize = 8192;
/// Messages taken from the inbox before the next Ready is handled: bounds one batch.
const BATCH: usize = 4096;
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Compact the log when this many applied entries precede the last compaction...
const COMPACT_EVERY: u64 = 20_000;
/// ...keeping this many applied entries for peers that are slightly behind.
const COMPACT_KEEP: u64 = 2_000;

type Reply = oneshot::Sender<Result<command_result::Result, MetaError>>;

enum Msg {
    Propose { op: command::Op, reply: Reply },
    Step(Box<RaftMsg>),
}

/// What the rest of the master may know of the Raft node, refreshed after every Ready.
#[derive(Clone, Debug, Default)]
pub struct RaftStatus {
    pub id: u64,
    pub role: String,
    pub term: u64,
    pub leader_id: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// A leader serves only once the first entry of its term is applied: before that its state
    /// may miss mutations an earlier leader acknowledged.
    pub serving: bool,
}

/// A handle to the Raft driver. Cloning shares it.
#[derive(Clone)]
pub struct Node {
    tx: mpsc::Sender<Msg>,
    status: Arc<Mutex<RaftStatus>>,
    peers: Arc<BTreeMap<u64, String>>,
}

pub struct NodeConfig {
    pub id: u64,
    /// Every voter of the group at its creation, this node included: id -> gRPC address.
    pub peers: BTreeMap<u64, String>,
}

impl Node {
    /// Starts the driver thread. It stops when `shutdown` is cancelled or on a storage error
    /// (crash-only: the process must then exit and recover from disk), cancelling `shutdown`.
    pub fn start(
        cfg: NodeConfig,
        log: RaftLog,
        state: State,
        cluster: Arc<Cluster>,
        identity: cairn_common::tls::Identity,
        shutdown: CancellationToken,
    ) -> Result<(Node, std::thread::JoinHandle<Result<()>>)> {
        let applied = state.applied_index()?;
        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: 10,
            heartbeat_tick: 2,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        let mut raw =
            RawNode::new(&raft_cfg, log.clone(), &crate::logging::raft_logger()).context("start raft node")?;
        let voters = log.conf_state().voters;
        if voters == [cfg.id] {
            // A group of one elects itself at once instead of waiting out an election timeout.
            raw.campaign().context("campaign")?;
        }
        let (tx, rx) = mpsc::channel(INBOX);
        let status = Arc::new(Mutex::new(RaftStatus { id: cfg.id, applied_index: applied, ..Default::default() }));
        let peers = Arc::new(cfg.peers);
        let transport = Transport::new(cfg.id, &peers, identity, tokio::runtime::Handle::current())?;
        let node = Node { tx, status: status.clone(), peers: peers.clone() };
        let driver = Driver {
            raw,
            log,
            state,
            cluster,
            status,
            waiters: HashMap::new(),
            next_request: rand::random(),
            transport,
            was_leader: false,
            term_start: u64::MAX,
        };
        let handle = std::thread::Builder::new().name("raft".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().context("raft runtime")?;
            let res = rt.block_on(driver.run(rx, shutdown.clone()));
            if let Err(e) = &res {
                tracing::error!("raft driver stopped: {e:#}");
            }
            shutdown.cancel();
            res
        })?;
        Ok((node, handle))
    }

    pub fn status(&self) -> RaftStatus {
        self.status.lock().expect("status lock").clone()
    }

    pub fn peers(&self) -> &BTreeMap<u64, String> {
        &self.peers
    }

    /// Ok if this node leads; else NotLeader with the leader's address when one is known.
    pub fn ensure_leader(&self) -> Result<(), MetaError> {
        let s = self.status();
        if s.role == "leader" && s.serving {
            return Ok(());
        }
        if s.role == "leader" {
            return Err(MetaError::Unavailable("new leader catching up".into()));
        }
        if s.leader_id == 0 {
            return Err(MetaError::Unavailable("no leader elected yet".into()));
        }
        Err(MetaError::NotLeader { hint: self.peers.get(&s.leader_id).cloned() })
    }

    /// Proposes a mutation and waits until it is committed and applied here.
    pub async fn propose(&self, op: command::Op) -> Result<command_result::Result, MetaError> {
        self.ensure_leader()?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Msg::Propose { op, reply })
            .map_err(|_| MetaError::Unavailable("the master is overloaded; retry".into()))?;
        match tokio::time::timeout(PROPOSE_TIMEOUT, rx).await {
            Ok(Ok(res)) => res,
            Ok(Err(_)) => Err(MetaError::Unavailable("the master is shutting down".into())),
            Err(_) => Err(MetaError::Unavailable("the mutation was not committed in time".into())),
        }
    }

    /// Hands a message from a peer to the driver; dropped when the inbox is full (Raft retries).
    pub fn step(&self, msg: RaftMsg) {
        let _ = self.tx.try_send(Msg::Step(Box::new(msg)));
    }
}

struct Driver {
    raw: RawNode<RaftLog>,
    log: RaftLog,
    state: State,
    cluster: Arc<Cluster>,
    status: Arc<Mutex<RaftStatus>>,
    waiters: HashMap<u64, Reply>,
    next_request: u64,
    transport: Transport,
    was_leader: bool,
    term_start: u64,
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, shutdown: CancellationToken) -> Result<()> {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => { self.raw.tick(); }
                m = rx.recv() => {
                    let Some(m) = m else { break };
                    self.handle(m);
                    for _ in 1..BATCH {
                        match rx.try_recv() {
                            Ok(m) => self.handle(m),
                            Err(_) => break,
                        }
                    }
                }
            }
            self.on_ready()?;
        }
        for (_, w) in self.waiters.drain() {
            let _ = w.send(Err(MetaError::Unavailable("the master is shutting down".into())));
        }
        Ok(())
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Propose { op, reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let hint = self.transport.addr_of(self.raw.raft.leader_id);
                    let _ = reply.send(Err(MetaError::NotLeader { hint }));
                    return;
                }
                self.next_request = self.next_request.wrapping_add(1);
                let id = self.next_request;
                let cmd = Command { request_id: id, time_ns: now_ns(), op: Some(op) };
                match self.raw.propose(vec![], cmd.encode_to_vec()) {
                    Ok(()) => {
                        self.waiters.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(MetaError::Unavailable(format!("proposal refused: {e}"))));
                    }
                }
            }
            Msg::Step(m) => {
                if let Err(e) = self.raw.step(*m) {
                    tracing::debug!("raft step: {e}");
                }
            }
        }
    }

    fn on_ready(&mut self) -> Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        self.transport.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            // Only a lagging follower of a multi-master group receives snapshots; their transfer
            // arrives with issue 4, and `RaftLog::snapshot` never produces one before that.
            anyhow::bail!("received a Raft snapshot, which this version cannot install");
        }
        self.apply(ready.take_committed_entries())?;
        self.log.persist(ready.entries(), ready.hs()).context("persist raft log")?;
        self.transport.send(ready.take_persisted_messages());
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.log.set_commit(commit).context("persist commit index")?;
        }
        self.transport.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.after_ready()
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        // The commit index on disk must never be behind the applied index on disk (raft-rs
        // refuses to start otherwise): record it first, in the same ordered stream of redb
        // commits as the apply below.
        if self.log.persisted_commit() < last {
            self.log.set_commit(last).context("persist commit index")?;
        }
        let mut cmds = Vec::with_capacity(entries.len());
        for e in entries {
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if e.data.is_empty() {
                        cmds.push((0, None)); // a new leader's empty entry
                    } else {
                        let cmd = Command::decode(&e.data[..]).context("decode committed command")?;
                        cmds.push((cmd.request_id, Some(cmd)));
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data).context("decode conf change")?;
                    let cs = self.raw.apply_conf_change(&cc).context("apply conf change")?;
                    self.log.set_conf_state(cs)?;
                    cmds.push((0, None));
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data).context("decode conf change")?;
                    let cs = self.raw.apply_conf_change(&cc).context("apply conf change")?;
                    self.log.set_conf_state(cs)?;
                    cmds.push((0, None));
                }
            }
        }
        let results = self.state.apply_batch(&cmds, last)?;
        for ((req, cmd), res) in cmds.iter().zip(results) {
            if let Some(Command { op: Some(command::Op::RegisterChunkserver(info)), .. }) = cmd {
                self.cluster.know(info.id, &info.addr, &info.zone);
            }
            if let Some(w) = self.waiters.remove(req) {
                let _ = w.send(match res.result {
                    Some(command_result::Result::Error(e)) => Err(MetaError::from_command(e)),
                    Some(r) => Ok(r),
                    None => Err(MetaError::Internal(anyhow::anyhow!("empty command result"))),
                });
            }
        }
        self.status.lock().expect("status lock").applied_index = last;
        if last >= self.log.first_index_now() + COMPACT_EVERY {
            // Never compact past what every peer has: until snapshot transfer exists (issue 4) a
            // peer behind the compacted index could not catch up.
            let matched = self.raw.raft.prs().iter().map(|(_, p)| p.matched).min().unwrap_or(last);
            let upto = last.min(matched).saturating_sub(COMPACT_KEEP);
            if upto > self.log.first_index_now() {
                self.log.compact(upto).context("compact raft log")?;
            }
        }
        Ok(())
    }

    fn after_ready(&mut self) -> Result<()> {
        let leader = self.raw.raft.state == StateRole::Leader;
        if leader && !self.was_leader {
            // Chunk locations learnt in an earlier term may be stale: start over from reports.
            self.cluster.reset();
            for cs in self.state.reader()?.chunkservers()? {
                self.cluster.know(cs.id, &cs.addr, &cs.zone);
            }
            // The empty entry a new leader appends opens its term.
            self.term_start = self.raw.raft.raft_log.last_index();
            tracing::info!(term = self.raw.raft.term, "became leader");
        }
        if !leader && self.was_leader {
            for (_, w) in self.waiters.drain() {
                let _ = w.send(Err(MetaError::Unavailable("leadership changed before the mutation committed".into())));
            }
        }
        self.was_leader = leader;
        let mut s = self.status.lock().expect("status lock");
        s.role = match self.raw.raft.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
        }
        .into();
        s.term = self.raw.raft.term;
        s.leader_id = self.raw.raft.leader_id;
        s.commit_index = self.raw.raft.raft_log.committed;
        s.serving = leader && s.applied_index >= self.term_start;
        Ok(())
    }
}

/// Sends Raft messages to peers over gRPC, one task and one bounded queue per peer. A full queue
/// drops the message: Raft retransmits, and a slow peer must not stall the driver.
struct Transport {
    queues: HashMap<u64, mpsc::Sender<RaftMsg>>,
    addrs: HashMap<u64, String>,
}

impl Transport {
    fn new(
        me: u64,
        peers: &BTreeMap<u64, String>,
        identity: cairn_common::tls::Identity,
        rt: tokio::runtime::Handle,
    ) -> Result<Transport> {
        let mut queues = HashMap::new();
        for (&id, addr) in peers.iter().filter(|(id, _)| **id != me) {
            let (tx, mut rx) = mpsc::channel::<RaftMsg>(1024);
            let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
                .tls_config(identity.grpc_client())?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5));
            rt.spawn(async move {
                let channel = endpoint.connect_lazy();
                let mut client = RaftClient::new(channel);
                while let Some(m) = rx.recv().await {
                    let bytes = match m.write_to_bytes() {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::error!("encode raft message: {e}");
                            continue;
                        }
                    };
                    if let Err(e) = client.send(RaftMessage { message: bytes }).await {
                        tracing::debug!(peer = id, "raft send failed: {e}");
                    }
                }
            });
            queues.insert(id, tx);
        }
        Ok(Transport { queues, addrs: peers.iter().map(|(k, v)| (*k, v.clone())).collect() })
    }

    fn addr_of(&self, id: u64) -> Option<String> {
        self.addrs.get(&id).cloned()
    }

    fn send(&self, msgs: Vec<RaftMsg>) {
        for m in msgs {
            if let Some(q) = self.queues.get(&m.to) {
                let _ = q.try_send(m);
            }
        }
    }
}
