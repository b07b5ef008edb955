//! The Raft driver: one thread owns the `RawNode`, ticks it, feeds it proposals, reads and peer
//! messages from a bounded channel, and handles each `Ready` in the order raft-rs prescribes (see
//! CONVENTIONS.md section 5): nothing is acknowledged, voted or acked to a peer before it is
//! durable in the Raft log file ([`crate::raftlog`]). Proposals that arrive while a batch is
//! being written wait in the channel and go out together in the next one, so many mutations share
//! one fsync (group commit).
//!
//! The logic lives in [`Core`], which knows nothing of threads, sockets or wall clocks: the
//! network is a [`Network`] and time is whatever calls [`Core::tick`] (plus the monotonic clock
//! leases are measured with, also injected: see [`LEASE`]). The production driver wraps
//! it in a tokio loop with a gRPC transport ([`crate::transport`]); the deterministic simulation
//! test wraps it in a simulated network and clock.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use cairn_proto::v1::{command, command_result, Command, MasterMember};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message as RaftMsg, MessageType};
use raft::{RawNode, SnapshotStatus, StateRole, Storage as _};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::error::MetaError;
use crate::raftlog::RaftLog;
use crate::state::State;

/// One Raft tick. Heartbeats go every 2 ticks (100 ms); a follower that hears nothing for 10 to
/// 20 ticks (0.5 to 1 s, randomized by raft-rs) campaigns. Loopback and LAN round trips are well
/// under a millisecond, so a heartbeat is missed only when a node is really gone or stalled.
pub const TICK: Duration = Duration::from_millis(50);
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 2;
const INBOX: usize = 8192;
/// Messages taken from the inbox before the next Ready is handled: bounds one batch.
const BATCH: usize = 4096;
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A leadership transfer that has not happened after this many ticks (2 s) has failed.
const TRANSFER_TICKS: u64 = 40;
/// How long after a heartbeat round that a quorum acknowledged this leader serves reads from
/// its own state without asking the followers again (a leader lease). A follower that heard the
/// round refuses to vote for anyone else until it has ticked `ELECTION_TICKS` times since
/// (raft-rs's `check_quorum` lease), which takes at least 9 ticks of 50 ms (450 ms) on a clock
/// that never ticks early; a restarted node refuses votes for its first `ELECTION_TICKS` ticks
/// (see [`Core::handle`]). The lease is 7 ticks (350 ms) from *before* the round was sent: the
/// 100 ms margin absorbs clock rate differences and timer rounding. A leader that starts a
/// leadership transfer (whose target campaigns past those refusals) gives up its lease for the
/// rest of its term, and one that steps down drops it at once. Time is `CLOCK_BOOTTIME`
/// ([`mono_ns`]); the assumption is that it advances at nearly the same rate on every master,
/// which a VM paused by its hypervisor without its guest clocks seeing the pause would break.
pub const LEASE: Duration = Duration::from_millis(TICK.as_millis() as u64 * (ELECTION_TICKS as u64 - 3));
/// Log compaction ("snapshot" in Raft terms: the state machine in redb is always a complete
/// snapshot as of its applied index) after this many entries or payload bytes...
pub const COMPACT_EVERY: u64 = 20_000;
const COMPACT_BYTES: u64 = 64 << 20;
/// ...keeping this many applied entries, so that a follower slightly behind catches up from the
/// log; one further behind gets a snapshot.
const COMPACT_KEEP: u64 = 2_000;
/// The namespace's transactions are not synced one by one (the log file has their entries): a
/// durable commit every this many applied entries bounds what a restart applies again, and lets
/// redb reuse the pages those transactions freed.
pub const CHECKPOINT_EVERY: u64 = 1_000;
/// A follower applies committed entries in batches of up to this many, or of what committed
/// within [`APPLY_DEFER`]: each redb transaction has a fixed cost and rewrites the same pages (the
/// parent directory, the newest client answers), which a leader's batches, one per Ready of a few
/// entries each, pay per handful of entries. A follower serves no reads, answers no callers and
/// does not need its state until it leads (it applies everything first) or installs a snapshot;
/// its log file keeps every entry not yet applied, as it keeps those not yet durable in redb.
const APPLY_DEFER_ENTRIES: usize = 1_000;
const APPLY_DEFER: Duration = Duration::from_millis(20);

pub type Reply = oneshot::Sender<Result<command_result::Result, MetaError>>;
/// Committed commands to apply, each with the client request id it answers (0: none).
type Commands = Vec<(u64, Option<Command>)>;
type ReadReply = oneshot::Sender<Result<(), MetaError>>;
type TransferReply = oneshot::Sender<Result<u64, MetaError>>;

pub enum Msg {
    Propose {
        op: command::Op,
        reply: Reply,
    },
    /// Linearizable read barrier: answered once this leader's state includes every mutation
    /// committed before the request (ReadIndex).
    Read {
        reply: ReadReply,
    },
    Step(Box<RaftMsg>),
    /// A snapshot streamed in from the leader: the MsgSnapshot and the file holding its records.
    Snapshot {
        msg: Box<RaftMsg>,
        file: PathBuf,
    },
    SnapshotSent {
        to: u64,
        ok: bool,
    },
    Membership {
        member: MasterMember,
        reply: Reply,
    },
    Transfer {
        to: u64,
        reply: TransferReply,
    },
    /// Answered with the index of the last entry in this leader's log: every proposal sent
    /// before this message has an index at or below it.
    Fence {
        reply: TransferReply,
    },
    /// A peer's address, learnt from a message it sent.
    Learn {
        id: u64,
        addr: String,
    },
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
    /// Leader only: the highest log index known to be on each voter.
    pub matched: BTreeMap<u64, u64>,
    pub voters: Vec<u64>,
    /// Until when (on the monotonic clock of [`mono_ns`]) this leader holds a lease: see [`LEASE`].
    pub lease_until_ns: u64,
}

impl RaftStatus {
    /// Whether a read may be served from this master's state right now without a ReadIndex
    /// round: it leads, has applied the first entry of its term (so every mutation an earlier
    /// leader acknowledged), and holds a lease, so no other master can have been elected and
    /// acknowledged a mutation this one lacks. Every mutation it acknowledged itself was in its
    /// state before the acknowledgement left.
    pub fn lease_read(&self, now_ns: u64) -> bool {
        self.role == "leader" && self.serving && now_ns < self.lease_until_ns
    }
}

/// Sends Raft messages to peers. MsgSnapshot messages carry no data: the network streams the
/// state from `RaftLog::take_outgoing_snapshot` and reports the outcome with `Msg::SnapshotSent`.
pub trait Network: Send {
    fn send(&mut self, msgs: Vec<RaftMsg>, log: &RaftLog);
    /// The group's members changed (or were loaded): id -> address.
    fn set_peers(&mut self, peers: &BTreeMap<u64, String>);
}

/// A handle to the Raft driver. Cloning shares it.
#[derive(Clone)]
pub struct Node {
    tx: mpsc::Sender<Msg>,
    status: Arc<Mutex<RaftStatus>>,
    peers: Arc<RwLock<BTreeMap<u64, String>>>,
    snapshot_dir: PathBuf,
    metrics: Arc<crate::metrics::Metrics>,
}

pub struct NodeConfig {
    pub id: u64,
    /// Where incoming snapshots are staged.
    pub data_dir: PathBuf,
    /// Compact the log after this many entries (tests use small values).
    pub compact_every: u64,
    /// Where committed proposals are counted and timed.
    pub metrics: Arc<crate::metrics::Metrics>,
}

fn raft_config(id: u64, applied: u64) -> raft::Config {
    raft::Config {
        id,
        election_tick: ELECTION_TICKS,
        heartbeat_tick: HEARTBEAT_TICKS,
        applied,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        // Not `batch_append` (appends queued for one follower merged into one message): with it,
        // 11 of the first 500 simulation seeds (tests/sim.rs) panicked in raft-rs, a follower
        // told to commit past its last index ("to_commit 484 is out of range [last_index 483]").
        // The driver proposes a Ready's worth of commands as one message instead
        // (`Core::propose_pending`). Nor `skip_bcast_commit`: with batched proposals it was
        // slower (8,216 creates/s with it against 9,448 without, three runs each way).
        ..Default::default()
    }
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
        my_addr: String,
        shutdown: CancellationToken,
    ) -> Result<(Node, std::thread::JoinHandle<Result<()>>)> {
        let (tx, rx) = mpsc::channel(INBOX);
        let net =
            crate::transport::Transport::new(cfg.id, my_addr, identity, tx.clone(), tokio::runtime::Handle::current());
        let peers = Arc::new(RwLock::new(BTreeMap::new()));
        let mut core = Core::new(cfg.id, log, state, cluster, Box::new(net), peers.clone(), Box::new(now_ns))?;
        core.compact_every = cfg.compact_every.max(1);
        let status = core.status.clone();
        let node = Node { tx, status, peers, snapshot_dir: cfg.data_dir, metrics: cfg.metrics };
        let handle = std::thread::Builder::new().name("raft".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().context("raft runtime")?;
            let res = rt.block_on(run(core, rx, shutdown.clone()));
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

    /// The group's members as of the applied index: id -> gRPC address.
    pub fn peers(&self) -> BTreeMap<u64, String> {
        self.peers.read().expect("peers lock").clone()
    }

    pub fn snapshot_dir(&self) -> &std::path::Path {
        &self.snapshot_dir
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
        Err(MetaError::NotLeader { hint: self.peers.read().expect("peers lock").get(&s.leader_id).cloned() })
    }

    fn send(&self, m: Msg) -> Result<(), MetaError> {
        self.tx.try_send(m).map_err(|_| MetaError::Unavailable("the master is overloaded; retry".into()))
    }

    async fn wait<T>(
        rx: oneshot::Receiver<Result<T, MetaError>>,
        timeout: Duration,
        what: &str,
    ) -> Result<T, MetaError> {
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(res)) => res,
            Ok(Err(_)) => Err(MetaError::Unavailable("the master is shutting down".into())),
            Err(_) => Err(MetaError::Unavailable(format!("the {what} did not complete in time"))),
        }
    }

    /// Proposes a mutation and waits until it is committed and applied here.
    pub async fn propose(&self, op: command::Op) -> Result<command_result::Result, MetaError> {
        self.ensure_leader()?;
        let rx = self.propose_nowait(op)?;
        self.answer(rx).await
    }

    /// Sends a proposal without waiting for it: its place in the log is fixed relative to any
    /// message sent before or after (see [`Node::fence`]). [`Node::answer`] waits for the result.
    pub fn propose_nowait(
        &self,
        op: command::Op,
    ) -> Result<oneshot::Receiver<Result<command_result::Result, MetaError>>, MetaError> {
        self.ensure_leader()?;
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Propose { op, reply })?;
        Ok(rx)
    }

    /// Waits for the answer to a proposal sent with [`Node::propose_nowait`].
    pub async fn answer(
        &self,
        rx: oneshot::Receiver<Result<command_result::Result, MetaError>>,
    ) -> Result<command_result::Result, MetaError> {
        let start = Instant::now();
        let res = Self::wait(rx, PROPOSE_TIMEOUT, "mutation").await;
        // Only the state machine answers with an error that has a command form (to_command):
        // such a refusal was committed and applied as much as a success was.
        if res.as_ref().map_or_else(|e| e.to_command().is_some(), |_| true) {
            self.metrics.proposal_committed(start.elapsed());
        }
        res
    }

    /// Asks for the last index of the leader's log as of now, without waiting: every proposal
    /// sent earlier is at or below it. [`Node::applied_through`] waits until it is applied.
    pub fn fence(&self) -> Result<oneshot::Receiver<Result<u64, MetaError>>, MetaError> {
        self.ensure_leader()?;
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Fence { reply })?;
        Ok(rx)
    }

    /// Waits until this master has applied every entry up to the index a fence answers.
    pub async fn applied_through(
        &self,
        fence: oneshot::Receiver<Result<u64, MetaError>>,
        timeout: Duration,
    ) -> Result<(), MetaError> {
        let start = tokio::time::Instant::now();
        let index = Self::wait(fence, timeout, "fence").await?;
        while self.status.lock().expect("status lock").applied_index < index {
            if start.elapsed() >= timeout {
                return Err(MetaError::Unavailable(format!("entries up to {index} were not applied in time")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Waits until a read on this master's state is linearizable: it leads (confirmed by a
    /// quorum after the request arrived) and has applied everything committed before it.
    pub async fn read_barrier(&self) -> Result<(), MetaError> {
        if self.status.lock().expect("status lock").lease_read(mono_ns()) {
            self.metrics.lease_read();
            return Ok(());
        }
        self.ensure_leader()?;
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Read { reply })?;
        Self::wait(rx, READ_TIMEOUT, "read").await
    }

    /// Adds or removes one voter; answers once the change is committed and applied here.
    pub async fn change_membership(&self, member: MasterMember) -> Result<(), MetaError> {
        self.ensure_leader()?;
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Membership { member, reply })?;
        Self::wait(rx, PROPOSE_TIMEOUT, "membership change").await.map(|_| ())
    }

    /// Hands leadership to `to` (0: the most up-to-date follower); answers with the new leader.
    pub async fn transfer_leader(&self, to: u64) -> Result<u64, MetaError> {
        let (reply, rx) = oneshot::channel();
        self.send(Msg::Transfer { to, reply })?;
        Self::wait(rx, TICK * (TRANSFER_TICKS as u32 + 10), "leadership transfer").await
    }

    /// Hands a message from a peer to the driver; dropped when the inbox is full (Raft retries).
    pub fn step(&self, msg: RaftMsg, from_addr: &str) {
        self.step_learn(msg.from, from_addr);
        let _ = self.tx.try_send(Msg::Step(Box::new(msg)));
    }

    /// Remembers the address of a peer this master does not know yet (it joined, or this master
    /// is joining and has no snapshot yet).
    pub fn step_learn(&self, id: u64, addr: &str) {
        if !addr.is_empty() && !self.peers.read().expect("peers lock").contains_key(&id) {
            let _ = self.tx.try_send(Msg::Learn { id, addr: addr.to_string() });
        }
    }

    /// Hands a fully received snapshot to the driver, which installs it if raft-rs accepts it.
    pub async fn install_snapshot(&self, msg: RaftMsg, file: PathBuf) -> Result<(), MetaError> {
        self.tx
            .send(Msg::Snapshot { msg: Box::new(msg), file })
            .await
            .map_err(|_| MetaError::Unavailable("the master is shutting down".into()))
    }
}

pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// Nanoseconds on `CLOCK_BOOTTIME`: what leases are measured with. Unlike the wall clock it
/// never jumps, and unlike `CLOCK_MONOTONIC` (`Instant`) it keeps counting while the machine is
/// suspended; it also counts while the process is stopped. (A hypervisor that pauses a VM and
/// hides the pause from its guest clocks breaks every lease; see [`LEASE`].)
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to the valid pointer it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        // Only an invalid clock id fails, and CLOCK_BOOTTIME exists since Linux 2.6.39: a time
        // of 0 makes every lease look expired, so reads fall back to ReadIndex rounds.
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

async fn run(mut core: Core, mut rx: mpsc::Receiver<Msg>, shutdown: CancellationToken) -> Result<()> {
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => core.tick(),
            m = rx.recv() => {
                let Some(m) = m else { break };
                core.handle(m);
                for _ in 1..BATCH {
                    match rx.try_recv() {
                        Ok(m) => core.handle(m),
                        Err(_) => break,
                    }
                }
            }
        }
        core.on_ready()?;
    }
    core.fail_all("the master is shutting down");
    Ok(())
}

/// Read requests on their way through ReadIndex.
#[derive(Default)]
struct Reads {
    /// Arrived since the last ReadIndex request was issued.
    batch: Vec<ReadReply>,
    next_ctx: u64,
    /// Issued, by context: (tick issued, monotonic time issued, waiters; none for a round that
    /// only renews the lease).
    inflight: HashMap<u64, (u64, u64, Vec<ReadReply>)>,
    /// Confirmed by a quorum: released once the applied index reaches the read index.
    ready: Vec<(u64, Vec<ReadReply>)>,
}

/// Knobs for a [`Core`] driven by a deterministic simulation (`master/tests/sim.rs`). Production
/// uses the defaults, through [`Core::new`].
#[derive(Clone, Default)]
pub struct CoreOptions {
    /// A fixed election timeout in ticks (at least 10) instead of one that raft-rs draws from
    /// `thread_rng` between 10 and 20 ticks, which a seeded simulation could not replay: the
    /// simulation randomizes when each node ticks instead.
    pub election_ticks: Option<usize>,
    /// The first id matching proposals to their callers (default: random).
    pub first_request_id: Option<u64>,
    /// The monotonic clock leases are measured with, in nanoseconds (default: [`mono_ns`]).
    pub monotonic: Option<Arc<dyn Fn() -> u64 + Send + Sync>>,
    /// The most entries a follower defers (default: [`APPLY_DEFER_ENTRIES`]); a simulation
    /// draws small values, so that batches also end by count.
    pub apply_defer_entries: Option<usize>,
}

/// The Raft node and the state machine it drives; see the module documentation.
pub struct Core {
    raw: RawNode<RaftLog>,
    log: RaftLog,
    state: State,
    cluster: Arc<Cluster>,
    status: Arc<Mutex<RaftStatus>>,
    peers: Arc<RwLock<BTreeMap<u64, String>>>,
    net: Box<dyn Network>,
    clock: Box<dyn Fn() -> i64 + Send>,
    mono: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// See [`LEASE`]: 0 when none.
    lease_until: u64,
    /// A term in which this node started a leadership transfer: no lease in it.
    no_lease_term: u64,
    /// The tick of the last round that renewed the lease.
    renewed_tick: u64,
    waiters: HashMap<u64, Reply>,
    /// Proposals taken since the last Ready: (request id, encoded command, caller). They go to
    /// raft-rs together, see [`Core::propose_pending`].
    proposals: Vec<(u64, Vec<u8>, Reply)>,
    next_request: u64,
    reads: Reads,
    transfers: Vec<(u64, TransferReply)>,
    /// The files of snapshots offered to raft-rs since the last Ready, with their indexes: one
    /// it accepted stays until that Ready installs it, whatever arrives after it.
    incoming: Vec<(u64, PathBuf)>,
    was_leader: bool,
    term_start: u64,
    ticks: u64,
    pub compact_every: u64,
    pub checkpoint_every: u64,
    /// Applied index as of the last durable commit of the namespace (at least).
    checkpointed: u64,
    /// The state machine's applied index (raft-rs's own runs ahead by what is deferred).
    applied: u64,
    /// Committed commands a follower has not applied yet (see [`APPLY_DEFER`]), the index of the
    /// last one, and when the first was deferred.
    deferred: Commands,
    deferred_last: u64,
    deferred_since: u64,
    apply_defer_entries: usize,
}

impl Core {
    /// Restores the node from `log` and `state` (what is durable) and loads the group's members.
    pub fn new(
        id: u64,
        log: RaftLog,
        state: State,
        cluster: Arc<Cluster>,
        net: Box<dyn Network>,
        peers: Arc<RwLock<BTreeMap<u64, String>>>,
        clock: Box<dyn Fn() -> i64 + Send>,
    ) -> Result<Core> {
        Core::with_options(id, log, state, cluster, net, peers, clock, CoreOptions::default())
    }

    /// [`Core::new`] with the knobs of a simulation.
    #[allow(clippy::too_many_arguments)]
    pub fn with_options(
        id: u64,
        log: RaftLog,
        state: State,
        cluster: Arc<Cluster>,
        mut net: Box<dyn Network>,
        peers: Arc<RwLock<BTreeMap<u64, String>>>,
        clock: Box<dyn Fn() -> i64 + Send>,
        opts: CoreOptions,
    ) -> Result<Core> {
        let applied = state.applied_index()?;
        // The applied index on disk may be ahead of the commit index the log file kept (which is
        // not synced on its own); raft-rs refuses to start with applied > commit.
        let (first, last) = (log.first_index()?, log.last_index()?);
        anyhow::ensure!(
            // (A new group's log starts compacted at its bootstrap index, with nothing applied.)
            (applied == 0 || applied + 1 >= first) && applied <= last,
            "the namespace is applied through entry {applied} but the raft log holds entries {first} to {last}"
        );
        log.set_commit(applied);
        let mut config = raft_config(id, applied);
        if let Some(ticks) = opts.election_ticks {
            config.min_election_tick = ticks;
            config.max_election_tick = ticks + 1;
        }
        let mut raw = RawNode::new(&config, log.clone(), &crate::logging::raft_logger()).context("start raft node")?;
        if log.conf_state().voters == [id] {
            // A group of one elects itself at once instead of waiting out an election timeout.
            raw.campaign().context("campaign")?;
        }
        let members = state.reader()?.masters()?;
        net.set_peers(&members);
        *peers.write().expect("peers lock") = members;
        let status = Arc::new(Mutex::new(RaftStatus { id, applied_index: applied, ..Default::default() }));
        Ok(Core {
            raw,
            log,
            state,
            cluster,
            status,
            peers,
            net,
            clock,
            mono: opts.monotonic.unwrap_or_else(|| Arc::new(mono_ns)),
            lease_until: 0,
            no_lease_term: 0,
            renewed_tick: 0,
            waiters: HashMap::new(),
            proposals: Vec::new(),
            next_request: opts.first_request_id.unwrap_or_else(rand::random),
            reads: Reads::default(),
            transfers: Vec::new(),
            incoming: Vec::new(),
            was_leader: false,
            term_start: u64::MAX,
            ticks: 0,
            compact_every: COMPACT_EVERY,
            checkpoint_every: CHECKPOINT_EVERY,
            checkpointed: applied,
            applied,
            deferred: Vec::new(),
            deferred_last: 0,
            deferred_since: 0,
            apply_defer_entries: opts.apply_defer_entries.unwrap_or(APPLY_DEFER_ENTRIES).max(1),
        })
    }

    pub fn status_handle(&self) -> Arc<Mutex<RaftStatus>> {
        self.status.clone()
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn tick(&mut self) {
        self.ticks += 1;
        self.raw.tick();
        self.lease_lost_if_not_leader();
        // Reads raft-rs dropped (it may, e.g. right after an election) must not wait forever.
        let stale = self.ticks.saturating_sub((READ_TIMEOUT.as_millis() / TICK.as_millis()) as u64);
        self.reads.inflight.retain(|_, (t, _, _)| *t >= stale);
        // Keep the lease of a leader alive: a heartbeat round with a read context (no waiters)
        // whenever less than half of it is left, at most every other tick.
        let now = (self.mono)();
        if self.may_hold_lease()
            && self.lease_until.saturating_sub(now) < LEASE.as_nanos() as u64 / 2
            && self.ticks >= self.renewed_tick + 2
        {
            self.renewed_tick = self.ticks;
            self.issue_read(now, Vec::new());
        }
        let now = self.ticks;
        let mut i = 0;
        while i < self.transfers.len() {
            if self.transfers[i].0 <= now {
                let (_, reply) = self.transfers.swap_remove(i);
                let _ = reply.send(Err(MetaError::Unavailable("the leadership transfer did not complete".into())));
            } else {
                i += 1;
            }
        }
    }

    fn leader_hint(&self) -> MetaError {
        let hint = self.peers.read().expect("peers lock").get(&self.raw.raft.leader_id).cloned();
        MetaError::NotLeader { hint }
    }

    fn next_id(&mut self) -> u64 {
        self.next_request = self.next_request.wrapping_add(1);
        self.next_request
    }

    pub fn handle(&mut self, m: Msg) {
        // A fence answers for every proposal taken before it, and a membership change or a
        // leadership transfer follows them: those go to raft-rs first.
        if matches!(m, Msg::Fence { .. } | Msg::Membership { .. } | Msg::Transfer { .. }) {
            self.propose_pending();
        }
        let leader = self.raw.raft.state == StateRole::Leader;
        match m {
            Msg::Propose { reply, .. } | Msg::Membership { reply, .. } if !leader => {
                let _ = reply.send(Err(self.leader_hint()));
            }
            Msg::Propose { op, reply } => {
                let id = self.next_id();
                let cmd = Command { request_id: id, time_ns: (self.clock)(), op: Some(op) };
                self.proposals.push((id, cmd.encode_to_vec(), reply));
            }
            Msg::Membership { member, reply } => self.propose_membership(member, reply),
            Msg::Fence { reply } if !leader => {
                let _ = reply.send(Err(self.leader_hint()));
            }
            Msg::Fence { reply } => {
                let _ = reply.send(Ok(self.raw.raft.raft_log.last_index()));
            }
            Msg::Read { reply } if !leader => {
                let _ = reply.send(Err(self.leader_hint()));
            }
            Msg::Read { reply } if self.lease_valid() => {
                // Served at the commit index as of now: released once that is applied.
                self.reads.ready.push((self.raw.raft.raft_log.committed, vec![reply]));
            }
            Msg::Read { reply } => self.reads.batch.push(reply),
            Msg::Step(m) if self.refuses_vote(&m) => {
                tracing::debug!(from = m.from, term = m.term, "vote request ignored: restarted less than a lease ago");
            }
            Msg::Step(m) => {
                if let Err(e) = self.raw.step(*m) {
                    tracing::debug!("raft step: {e}");
                }
                self.lease_lost_if_not_leader();
            }
            Msg::Snapshot { msg, file } => {
                let index = msg.get_snapshot().get_metadata().index;
                self.incoming.push((index, file));
                if let Err(e) = self.raw.step(*msg) {
                    tracing::debug!("raft step (snapshot): {e}");
                }
                self.lease_lost_if_not_leader();
            }
            Msg::SnapshotSent { to, ok } => {
                let status = if ok { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
                self.raw.report_snapshot(to, status);
            }
            Msg::Transfer { reply, .. } if !leader => {
                let _ = reply.send(Err(self.leader_hint()));
            }
            Msg::Transfer { to, reply } => self.transfer(to, reply),
            Msg::Learn { id, addr } => {
                let mut peers = self.peers.read().expect("peers lock").clone();
                if id != self.raw.raft.id && !peers.contains_key(&id) {
                    peers.insert(id, addr);
                    self.net.set_peers(&peers);
                }
            }
        }
    }

    fn propose_membership(&mut self, member: MasterMember, reply: Reply) {
        // A retry of a change that took effect gets its first answer (not "already a member" or
        // "not a member"). A node elected within this batch of messages may still defer entries.
        if let Err(e) = self.apply_deferred() {
            let _ = reply.send(Err(MetaError::Internal(e)));
            return;
        }
        if let Some(r) = member.request.as_ref().filter(|r| r.client != 0) {
            match self.state.reader().and_then(|rd| rd.remembered(r.client, r.seq)) {
                Ok(Some(command_result::Result::Error(e))) => {
                    let _ = reply.send(Err(MetaError::from_command(e)));
                    return;
                }
                Ok(Some(first)) => {
                    let _ = reply.send(Ok(first));
                    return;
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
        }
        let voters = self.log.conf_state().voters;
        let present = voters.contains(&member.id);
        let refuse = |m: String| Err::<(), _>(MetaError::InvalidArgument(m));
        let known = self.peers.read().expect("peers lock").get(&member.id).cloned();
        if !member.removed && present && known.as_deref() == Some(member.addr.as_str()) {
            // A retry of an add that took effect.
            let _ = reply.send(Ok(command_result::Result::Done(cairn_proto::v1::Empty {})));
            return;
        }
        let check = if member.id == 0 {
            refuse("master id 0 is reserved".into())
        } else if member.removed && !present {
            refuse(format!("master {} is not a member of the group", member.id))
        } else if member.removed && member.id == self.raw.raft.id {
            refuse(format!("master {} leads the group: transfer leadership first", member.id))
        } else if member.removed && voters.len() == 1 {
            refuse("cannot remove the last master".into())
        } else if !member.removed && present {
            refuse(format!("master {} is already a member", member.id))
        } else if !member.removed && member.addr.parse::<std::net::SocketAddr>().is_err() {
            refuse(format!("master address {:?} is not IP:PORT", member.addr))
        } else {
            Ok(())
        };
        if let Err(e) = check {
            let _ = reply.send(Err(e));
            return;
        }
        let id = self.next_id();
        let cmd = Command { request_id: id, time_ns: (self.clock)(), op: Some(command::Op::SetMaster(member.clone())) };
        let mut cc = ConfChange { node_id: member.id, context: cmd.encode_to_vec().into(), ..Default::default() };
        cc.set_change_type(if member.removed { ConfChangeType::RemoveNode } else { ConfChangeType::AddNode });
        match self.raw.propose_conf_change(vec![], cc) {
            Ok(()) => {
                self.waiters.insert(id, reply);
            }
            Err(e) => {
                let msg = if matches!(e, raft::Error::ProposalDropped) {
                    "another membership change is in progress; retry when it is done".to_string()
                } else {
                    format!("membership change refused: {e}")
                };
                let _ = reply.send(Err(MetaError::Unavailable(msg)));
            }
        }
    }

    fn transfer(&mut self, to: u64, reply: TransferReply) {
        let me = self.raw.raft.id;
        let target = if to != 0 {
            Some(to)
        } else {
            self.raw.raft.prs().iter().filter(|(id, _)| **id != me).max_by_key(|(_, p)| p.matched).map(|(id, _)| *id)
        };
        match target {
            Some(t) if t == me => {
                let _ = reply.send(Ok(me));
            }
            Some(t) if self.log.conf_state().voters.contains(&t) => {
                // The target will campaign past the followers' lease: give ours up first.
                self.no_lease_term = self.raw.raft.term;
                self.lease_until = 0;
                self.status.lock().expect("status lock").lease_until_ns = 0;
                self.raw.transfer_leader(t);
                self.transfers.push((self.ticks + TRANSFER_TICKS, reply));
            }
            Some(t) => {
                let _ = reply.send(Err(MetaError::InvalidArgument(format!("master {t} is not a member of the group"))));
            }
            None => {
                let _ = reply.send(Err(MetaError::InvalidArgument("no other master to hand leadership to".into())));
            }
        }
    }

    /// A node that stepped down (a higher term, check-quorum) may vote for another master in
    /// this very Ready: the status, which the service reads without the driver, loses the lease
    /// now rather than after the Ready.
    fn lease_lost_if_not_leader(&mut self) {
        if self.lease_until != 0 && self.raw.raft.state != StateRole::Leader {
            self.lease_until = 0;
            self.status.lock().expect("status lock").lease_until_ns = 0;
        }
    }

    /// Whether this node may hold a lease at all: it leads, and started no leadership transfer
    /// in this term.
    fn may_hold_lease(&self) -> bool {
        self.raw.raft.state == StateRole::Leader && self.no_lease_term != self.raw.raft.term
    }

    /// Whether this leader's lease covers a read arriving now: see [`RaftStatus::lease_read`].
    fn lease_valid(&self) -> bool {
        let r = &self.raw.raft;
        self.may_hold_lease()
            && (self.mono)() < self.lease_until
            && r.raft_log.term(r.raft_log.committed).is_ok_and(|t| t == r.term)
    }

    /// A node that restarted less than an election timeout ago may have acknowledged a
    /// heartbeat just before it stopped, and so be part of the quorum behind a leader's lease:
    /// it ignores requests for votes in a new term until that lease has expired (a transfer's
    /// campaign excepted: the leader that started it gave its lease up).
    fn refuses_vote(&self, m: &RaftMsg) -> bool {
        matches!(m.get_msg_type(), MessageType::MsgRequestVote | MessageType::MsgRequestPreVote)
            && m.term > self.raw.raft.term
            && m.context.as_ref() != raft::CAMPAIGN_TRANSFER
            && self.ticks < ELECTION_TICKS as u64
    }

    /// Starts a ReadIndex round for `waiters` (none: only to renew the lease).
    fn issue_read(&mut self, now: u64, waiters: Vec<ReadReply>) {
        self.reads.next_ctx += 1;
        let ctx = self.reads.next_ctx;
        self.reads.inflight.insert(ctx, (self.ticks, now, waiters));
        self.raw.read_index(ctx.to_be_bytes().to_vec());
    }

    fn discard_incoming(&mut self) {
        for (_, f) in self.incoming.drain(..) {
            let _ = std::fs::remove_file(f);
        }
    }

    /// Fails every waiting caller (leadership lost, or shutting down). A mutation that was
    /// proposed may still commit: its client retries with the same request id and gets the result.
    pub fn fail_all(&mut self, why: &str) {
        let pending = self.proposals.drain(..).map(|(id, _, w)| (id, w));
        for (_, w) in self.waiters.drain().chain(pending) {
            let _ = w.send(Err(MetaError::Unavailable(why.into())));
        }
        let reads = std::mem::take(&mut self.reads);
        self.reads.next_ctx = reads.next_ctx;
        let all = reads.batch.into_iter().chain(reads.inflight.into_values().flat_map(|(_, _, v)| v));
        for r in all.chain(reads.ready.into_iter().flat_map(|(_, v)| v)) {
            let _ = r.send(Err(MetaError::Unavailable(why.into())));
        }
    }

    /// Hands the proposals taken since the last Ready to raft-rs as one message: the leader
    /// appends them together and sends each follower one append for all of them. Proposed one
    /// by one, each made an append message of its own to every follower. (raft-rs's own
    /// `batch_append`, which merges those messages, made the simulation fail: see
    /// [`raft_config`].)
    fn propose_pending(&mut self) {
        if self.proposals.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.proposals);
        if self.raw.raft.state != StateRole::Leader {
            for (_, _, reply) in batch {
                let _ = reply.send(Err(self.leader_hint()));
            }
            return;
        }
        let mut entries = Vec::with_capacity(batch.len());
        let mut callers = Vec::with_capacity(batch.len());
        for (id, data, reply) in batch {
            entries.push(Entry { data: data.into(), ..Default::default() });
            callers.push((id, reply));
        }
        let mut m = RaftMsg::default();
        m.set_msg_type(MessageType::MsgPropose);
        m.from = self.raw.raft.id;
        m.set_entries(entries.into());
        match self.raw.raft.step(m) {
            Ok(()) => self.waiters.extend(callers),
            Err(e) => {
                for (_, reply) in callers {
                    let _ = reply.send(Err(MetaError::Unavailable(format!("proposal refused: {e}"))));
                }
            }
        }
    }

    pub fn on_ready(&mut self) -> Result<()> {
        self.propose_pending();
        if !self.reads.batch.is_empty() && self.raw.raft.state == StateRole::Leader {
            let batch = std::mem::take(&mut self.reads.batch);
            self.issue_read((self.mono)(), batch);
        }
        if !self.raw.has_ready() {
            self.discard_incoming();
            self.apply_deferred_if_due()?;
            // Reads taken under the lease since the last Ready may be answerable already.
            self.release_reads(self.applied);
            return Ok(());
        }
        let mut ready = self.raw.ready();
        self.net.send(ready.take_messages(), &self.log);
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone())?;
        }
        self.discard_incoming();
        for rs in ready.take_read_states() {
            let ctx = rs.request_ctx.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if let Some((_, issued, w)) = self.reads.inflight.remove(&ctx) {
                // A quorum acknowledged a heartbeat sent after `issued`: see [`LEASE`].
                if self.may_hold_lease() {
                    self.lease_until = self.lease_until.max(issued + LEASE.as_nanos() as u64);
                }
                if !w.is_empty() {
                    self.reads.ready.push((rs.index, w));
                }
            }
        }
        // raft-rs hands out only committed entries that are already durable in this node's log:
        // applying them needs no fsync, so their callers are answered before this Ready's new
        // entries are written and fsynced, not after.
        self.apply(ready.take_committed_entries())?;
        self.log.persist(ready.entries(), ready.hs()).context("persist raft log")?;
        self.net.send(ready.take_persisted_messages(), &self.log);
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.log.set_commit(commit);
        }
        self.net.send(light.take_messages(), &self.log);
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.apply_deferred_if_due()?;
        self.after_ready()
    }

    fn install_snapshot(&mut self, snap: raft::eraftpb::Snapshot) -> Result<()> {
        let meta = snap.get_metadata();
        let Some(at) = self.incoming.iter().rposition(|(index, _)| *index == meta.index) else {
            anyhow::bail!("raft-rs applied a snapshot at {} that was not streamed in", meta.index);
        };
        let (_, file) = self.incoming.remove(at);
        // The snapshot holds the state after every entry up to its index: deferred ones included.
        anyhow::ensure!(
            self.deferred.is_empty() || self.deferred_last <= meta.index,
            "a snapshot at {} would undo committed entries up to {}",
            meta.index,
            self.deferred_last
        );
        self.deferred.clear();
        let records = crate::transport::read_snapshot_file(&file)?;
        self.log.install_snapshot(meta, records).context("install snapshot")?;
        let _ = std::fs::remove_file(&file);
        self.status.lock().expect("status lock").applied_index = meta.index;
        self.applied = meta.index;
        self.checkpointed = meta.index;
        let members = self.state.reader()?.masters()?;
        self.net.set_peers(&members);
        *self.peers.write().expect("peers lock") = members;
        tracing::info!(index = meta.index, term = meta.term, "installed a snapshot from the leader");
        Ok(())
    }

    /// Decodes committed entries into state-machine commands; configuration changes take effect
    /// in raft-rs here. None when there is nothing to apply.
    fn prepare_apply(&mut self, entries: Vec<Entry>) -> Result<Option<(Commands, u64)>> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(None);
        };
        let mut cmds = Vec::with_capacity(entries.len());
        for e in entries {
            match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => cmds.push((0, None)), // a new leader's entry
                EntryType::EntryNormal => {
                    let cmd = Command::decode(&e.data[..]).context("decode committed command")?;
                    cmds.push((cmd.request_id, Some(cmd)));
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data).context("decode conf change")?;
                    let cs = self.raw.apply_conf_change(&cc).context("apply conf change")?;
                    self.log.set_conf_state(cs, e.index)?;
                    let cmd = Command::decode(&cc.context[..]).context("decode conf change context")?;
                    cmds.push((cmd.request_id, Some(cmd)));
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data).context("decode conf change")?;
                    let cs = self.raw.apply_conf_change(&cc).context("apply conf change")?;
                    self.log.set_conf_state(cs, e.index)?;
                    cmds.push((0, None));
                }
            }
        }
        self.log.set_commit(last);
        Ok(Some((cmds, last)))
    }

    /// Applies committed entries, together with those deferred before them, in a transaction of
    /// their own (not fsynced: see `State::apply_batch`); a follower defers them instead while
    /// [`APPLY_DEFER`] allows.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
        let Some((cmds, last)) = self.prepare_apply(entries)? else {
            return Ok(());
        };
        let answers = cmds.iter().any(|(req, _)| self.waiters.contains_key(req));
        if self.deferred.is_empty() {
            self.deferred = cmds;
            self.deferred_since = (self.mono)();
        } else {
            self.deferred.extend(cmds);
        }
        self.deferred_last = last;
        if answers || self.raw.raft.state == StateRole::Leader || self.deferred.len() >= self.apply_defer_entries {
            self.apply_deferred()?;
        }
        Ok(())
    }

    /// Applies what a follower deferred once it waited [`APPLY_DEFER`], and all of it on a leader.
    fn apply_deferred_if_due(&mut self) -> Result<()> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        let due = self.raw.raft.state == StateRole::Leader
            || (self.mono)().saturating_sub(self.deferred_since) >= APPLY_DEFER.as_nanos() as u64;
        if due {
            self.apply_deferred()?;
        }
        Ok(())
    }

    /// Applies what was deferred. On an error it stays deferred, so nothing is skipped: the
    /// error stops the driver (crash-only), here or at the next apply.
    fn apply_deferred(&mut self) -> Result<()> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        let last = self.deferred_last;
        let results = self.state.apply_batch(&self.deferred, last)?;
        let cmds = std::mem::take(&mut self.deferred);
        self.finish_apply(cmds, results, last)
    }

    /// After an apply committed: answers the waiting callers and updates what depends on it.
    fn finish_apply(&mut self, cmds: Commands, results: Vec<cairn_proto::v1::CommandResult>, last: u64) -> Result<()> {
        let mut members_changed = false;
        for ((req, cmd), res) in cmds.iter().zip(results) {
            // A refused command (a stale copy of a client's mutation among them) changes nothing;
            // a node forgotten is gone from memory also when the namespace did not know it.
            let took_effect = !matches!(res.result, Some(command_result::Result::Error(_)));
            match cmd.as_ref().and_then(|c| c.op.as_ref()) {
                Some(command::Op::RegisterChunkserver(info)) if took_effect => {
                    self.cluster.know(info.id, &info.addr, &info.zone, info.draining)
                }
                Some(command::Op::Drain(d)) if d.forget => self.cluster.forget(d.id),
                Some(command::Op::Drain(d)) if took_effect => self.cluster.set_draining(d.id, !d.cancel),
                Some(command::Op::SetMaster(m)) => {
                    members_changed = true;
                    if m.removed && m.id == self.raw.raft.id {
                        tracing::warn!("this master was removed from the group; it can be stopped");
                    }
                }
                _ => {}
            }
            if let Some(w) = self.waiters.remove(req) {
                let _ = w.send(match res.result {
                    Some(command_result::Result::Error(e)) => Err(MetaError::from_command(e)),
                    Some(r) => Ok(r),
                    None => Err(MetaError::Internal(anyhow::anyhow!("empty command result"))),
                });
            }
        }
        if members_changed {
            let members = self.state.reader()?.masters()?;
            self.net.set_peers(&members);
            *self.peers.write().expect("peers lock") = members;
        }
        self.status.lock().expect("status lock").applied_index = last;
        self.applied = last;
        self.release_reads(last);
        let (entries, bytes) = self.log.size();
        let keep = COMPACT_KEEP.min(self.compact_every);
        // By bytes only once the log is twice what is kept: each compaction rewrites the kept part.
        if entries >= self.compact_every + keep || (bytes >= COMPACT_BYTES && entries >= 2 * keep) {
            let upto = last.saturating_sub(keep);
            if upto >= self.log.first_index_now() {
                self.log.compact(upto).context("compact raft log")?;
                self.checkpointed = last;
            }
        }
        if last >= self.checkpointed + self.checkpoint_every {
            self.state.checkpoint().context("checkpoint the namespace")?;
            self.checkpointed = last;
        }
        Ok(())
    }

    fn release_reads(&mut self, applied: u64) {
        let mut i = 0;
        while i < self.reads.ready.len() {
            if self.reads.ready[i].0 <= applied {
                for w in self.reads.ready.swap_remove(i).1 {
                    let _ = w.send(Ok(()));
                }
            } else {
                i += 1;
            }
        }
    }

    fn after_ready(&mut self) -> Result<()> {
        let leader = self.raw.raft.state == StateRole::Leader;
        if leader && !self.was_leader {
            // Chunk locations learnt in an earlier term may be stale: start over from reports.
            self.cluster.reset();
            for cs in self.state.reader()?.chunkservers()? {
                self.cluster.know(cs.id, &cs.addr, &cs.zone, cs.draining);
            }
            // The empty entry a new leader appends opens its term.
            self.term_start = self.raw.raft.raft_log.last_index();
            tracing::info!(term = self.raw.raft.term, "became leader");
        }
        if !leader && self.was_leader {
            self.lease_until = 0;
            self.fail_all("leadership changed before the request completed");
        }
        if !leader && self.raw.raft.leader_id != 0 {
            for (_, reply) in self.transfers.drain(..) {
                let _ = reply.send(Ok(self.raw.raft.leader_id));
            }
        }
        self.was_leader = leader;
        self.release_reads(self.applied);
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
        s.voters = self.log.conf_state().voters;
        s.lease_until_ns = if self.may_hold_lease() { self.lease_until } else { 0 };
        s.matched =
            if leader { self.raw.raft.prs().iter().map(|(id, p)| (*id, p.matched)).collect() } else { BTreeMap::new() };
        Ok(())
    }

    /// Whether `m` is a snapshot message (which the network must stream, not send as is).
    pub fn is_snapshot(m: &RaftMsg) -> bool {
        m.get_msg_type() == MessageType::MsgSnapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raftlog::{DiskFile, LOG_FILES};

    struct NoNet;

    impl Network for NoNet {
        fn send(&mut self, _: Vec<RaftMsg>, _: &RaftLog) {}
        fn set_peers(&mut self, _: &BTreeMap<u64, String>) {}
    }

    /// A group of one, elected.
    fn leader(dir: &std::path::Path) -> Core {
        let db = Arc::new(redb::Database::create(dir.join("meta.redb")).unwrap());
        let files = LOG_FILES.map(|f| DiskFile::open(&dir.join(f)).unwrap());
        let log = RaftLog::open(db.clone(), files, &[1]).unwrap();
        let state = State::open(db).unwrap();
        state.bootstrap_masters(&BTreeMap::from([(1, "127.0.0.1:1".to_string())])).unwrap();
        let cluster = Arc::new(Cluster::new(Duration::from_secs(10)));
        let peers = Arc::new(RwLock::new(BTreeMap::new()));
        let mut core = Core::new(1, log, state, cluster, Box::new(NoNet), peers, Box::new(|| 0)).unwrap();
        let status = core.status_handle();
        for _ in 0..100 {
            core.tick();
            core.on_ready().unwrap();
            if status.lock().unwrap().serving {
                return core;
            }
        }
        panic!("a group of one did not elect itself");
    }

    #[test]
    fn a_fence_covers_the_proposals_taken_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut core = leader(dir.path());
        let status = core.status_handle();
        // As the driver takes them: several proposals, then a fence, then one Ready.
        let mut answers = Vec::new();
        for name in ["a", "b", "c"] {
            let (reply, rx) = oneshot::channel();
            let op =
                command::Op::Mkdir(cairn_proto::v1::MkdirRequest { path: format!("/{name}"), ..Default::default() });
            core.handle(Msg::Propose { op, reply });
            answers.push(rx);
        }
        let (reply, mut fence) = oneshot::channel();
        core.handle(Msg::Fence { reply });
        let fence = fence.try_recv().expect("a fence is answered at once").unwrap();
        core.on_ready().unwrap();
        for mut rx in answers {
            assert!(matches!(rx.try_recv(), Ok(Ok(_))), "a group of one commits at once");
        }
        let applied = status.lock().unwrap().applied_index;
        assert_eq!(fence, applied, "the fence is the index of the last proposal taken before it");
    }
}
