//! Deterministic simulation of the master group (CONVENTIONS.md section 6).
//!
//! Three or five [`Core`]s run in one thread over a simulated network, clock and disk. One u64
//! seed drives everything through a ChaCha RNG: the cluster's shape, message loss, delay,
//! reordering and duplication, partitions, pauses, leadership transfers, and crashes that lose
//! whatever the node had not fsynced (sometimes mid-`on_ready`, sometimes keeping a random part
//! of the unsynced pages, as a real disk may). Clients issue mutations with client request ids
//! and retry them, with the same id, at whichever master they believe leads.
//!
//! Checked after every step: at most one leader per term; an entry once committed is never lost
//! or changed (every node's committed prefix matches, and a new leader holds every committed
//! entry); every state machine that applied index i holds the same state (a digest of
//! `state::dump`); the durable applied index never falls behind the compacted log; a read
//! answered by ReadIndex, or under the leader's lease (by the driver or, as the service does,
//! from the status alone), sees every entry committed before it arrived, and so every mutation
//! its client had acknowledged. Leases run on the simulated clock, which pauses and tick jitter
//! (ticks 40 to 60 ms apart) stretch and squeeze. Checked per mutation:
//! each client owns a subtree and runs one operation at a time, so a model predicts every answer
//! exactly: a retried mutation takes effect once and returns its first answer. At the end the
//! network heals, every node restarts, and once all have applied the same index each acknowledged
//! mutation must be visible on every node.
//!
//! `CAIRN_SIM_SEEDS=N` runs N seeds (default 500 in release builds), from `CAIRN_SIM_FIRST_SEED`
//! (default 0); `CAIRN_SIM_SEED=S` replays one, `CAIRN_SIM_TRACE=1` prints what happens.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cairn_master::cluster::Cluster;
use cairn_master::error::MetaError;
use cairn_master::node::{Core, CoreOptions, Msg, Network, RaftStatus};
use cairn_master::raftlog::{LogFile, RaftLog};
use cairn_master::state::{self, State};
use cairn_master::transport::SnapshotFile;
use cairn_proto::v1::{
    command, command_result, ClientRequestId, CommitFileRequest, Extent, InodeKind, MkdirRequest, RemoveRequest,
    RenameRequest, SnapshotRecord,
};
use raft::eraftpb::{Message as RaftMsg, MessageType};
use raft::{GetEntriesContext, Storage};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use redb::ReadableDatabase;
use tokio::sync::oneshot;

/// Simulated time is in microseconds.
const MS: u64 = 1_000;
const SEC: u64 = 1_000_000;
const TICK_US: u64 = 50 * MS;
/// The simulated wall clock at time 0.
const CLOCK_BASE_NS: i64 = 1_700_000_000_000_000_000;
/// Messages one `Run` hands to the core before `on_ready`, as the production driver's batch.
const BATCH: usize = 4096;
/// After the network heals, the group must converge within this much simulated time.
const SETTLE_US: u64 = 60 * SEC;
/// Events per seed, at most: a runaway simulation fails instead of hanging CI.
const MAX_EVENTS: u64 = 5_000_000;

#[path = "sim/disk.rs"]
mod disk;
#[path = "sim/model.rs"]
mod model;

use disk::SimDisk;
use model::{walk, Code, Kind, Model, OpKind, Outcome};

/// FxHash: the state digest runs after every apply, and SipHash made it a quarter of the run.
/// Collisions only matter against chance, not an adversary.
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.write_u64(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        for &b in chunks.remainder() {
            self.write_u64(b as u64);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A digest of the whole state machine and the applied index it is at.
fn state_digest(state: &State) -> Result<(u64, u64), String> {
    let txn = state.db().begin_read().map_err(|e| format!("begin read: {e}"))?;
    let applied = state::applied_in(&txn).map_err(|e| format!("applied index: {e:#}"))?;
    let mut h = FxHasher::default();
    state::dump(&txn, |t, k, v| {
        (t, k, v).hash(&mut h);
        Ok(())
    })
    .map_err(|e| format!("dump: {e:#}"))?;
    Ok((applied, h.finish()))
}

// ---------------------------------------------------------------------------------- network

enum Out {
    Raft(RaftMsg),
    /// A MsgSnapshot and the file holding its records (None: the snapshot was not prepared).
    Snapshot(RaftMsg, Option<PathBuf>),
}

/// The core's network: what it sends waits in an outbox the simulator drains after each step.
/// A process that has died (its disk says so) sends nothing more.
struct SimNet {
    outbox: Arc<Mutex<Vec<Out>>>,
    disk: SimDisk,
    dir: PathBuf,
}

impl Network for SimNet {
    fn send(&mut self, msgs: Vec<RaftMsg>, log: &RaftLog) {
        let dead = self.disk.dead();
        let mut outbox = self.outbox.lock().expect("outbox lock");
        for m in msgs {
            if Core::is_snapshot(&m) {
                let prepared = log.take_outgoing_snapshot(m.to);
                if dead {
                    continue;
                }
                let file = prepared.and_then(|(meta, txn)| {
                    assert_eq!(meta.index, m.get_snapshot().get_metadata().index, "prepared snapshot");
                    let mut records = Vec::new();
                    state::dump(&txn, |table, key, value| {
                        records.push(SnapshotRecord { table, key, value });
                        Ok(())
                    })
                    .ok()?;
                    let mut f = SnapshotFile::create(&self.dir).ok()?;
                    f.write(&records).ok()?;
                    f.finish().ok()
                });
                outbox.push(Out::Snapshot(m, file));
            } else if !dead {
                outbox.push(Out::Raft(m));
            }
        }
    }

    fn set_peers(&mut self, _peers: &BTreeMap<u64, String>) {}
}

// -------------------------------------------------------------------------------- simulator

#[derive(Debug)]
struct Params {
    nodes: usize,
    clients: usize,
    chaos_us: u64,
    loss: f64,
    dup: f64,
    delay_us: (u64, u64),
    /// Chance that a message takes 50 ms to 1 s: old messages arrive among new ones.
    slow: f64,
    partition_gap_us: Option<u64>,
    crash_gap_us: Option<u64>,
    /// Nodes down at once, at most.
    max_down: usize,
    /// Crashes keep a random part of the unsynced pages.
    torn: bool,
    /// Chance that a crash happens inside a step, just before one of its syncs.
    mid_step: f64,
    /// Chances that a node crashes right after it granted a vote, or acked appended entries:
    /// what it promised must have been durable.
    crash_after_vote: f64,
    crash_after_append: f64,
    compact_every: u64,
    checkpoint_every: u64,
    /// Refuse requests as the gRPC service does (`ensure_leader`) before they reach the core.
    service_checks: bool,
    tick_jitter_us: u64,
    pause_gap_us: Option<u64>,
    transfer_gap_us: Option<u64>,
    client_timeout_us: u64,
    think_us: u64,
    /// Chance that a client starts an operation at a random master, not the one it believes
    /// leads (it reconnected, or its belief is stale).
    wander: f64,
}

impl Params {
    fn new(rng: &mut ChaCha8Rng) -> Params {
        let nodes = if rng.random_bool(0.25) { 5 } else { 3 };
        let delay_min = rng.random_range(100..2 * MS);
        Params {
            nodes,
            clients: rng.random_range(1..=5),
            chaos_us: rng.random_range(4 * SEC..20 * SEC),
            loss: *[0.0, 0.01, 0.05, 0.15].choose(rng).expect("choices"),
            dup: *[0.0, 0.02, 0.1].choose(rng).expect("choices"),
            delay_us: (delay_min, delay_min + rng.random_range(0..30 * MS)),
            slow: *[0.0, 0.002, 0.02].choose(rng).expect("choices"),
            partition_gap_us: rng.random_bool(0.6).then(|| rng.random_range(300 * MS..4 * SEC)),
            crash_gap_us: rng.random_bool(0.7).then(|| rng.random_range(200 * MS..2 * SEC)),
            max_down: if rng.random_bool(0.25) { nodes } else { nodes / 2 },
            torn: rng.random_bool(0.3),
            mid_step: *[0.0, 0.3].choose(rng).expect("choices"),
            crash_after_vote: *[0.0, 0.3].choose(rng).expect("choices"),
            crash_after_append: *[0.0, 0.0, 0.005].choose(rng).expect("choices"),
            compact_every: if rng.random_bool(0.5) {
                rng.random_range(2..40)
            } else {
                cairn_master::node::COMPACT_EVERY
            },
            checkpoint_every: if rng.random_bool(0.5) {
                rng.random_range(1..30)
            } else {
                cairn_master::node::CHECKPOINT_EVERY
            },
            service_checks: rng.random_bool(0.7),
            tick_jitter_us: rng.random_range(0..20 * MS),
            pause_gap_us: rng.random_bool(0.3).then(|| rng.random_range(500 * MS..4 * SEC)),
            transfer_gap_us: rng.random_bool(0.2).then(|| rng.random_range(500 * MS..4 * SEC)),
            client_timeout_us: rng.random_range(200 * MS..3 * SEC),
            think_us: rng.random_range(0..50 * MS),
            wander: *[0.0, 0.2, 0.5].choose(rng).expect("choices"),
        }
    }
}

enum Req {
    Op(command::Op),
    Read,
}

#[derive(Clone, Debug)]
enum Reply {
    Done(Outcome),
    /// Not an answer: try again, at this node if one is named.
    Retry(Option<usize>),
}

enum Rx {
    Propose(oneshot::Receiver<Result<command_result::Result, MetaError>>),
    Read(oneshot::Receiver<Result<(), MetaError>>),
}

struct Pending {
    client: usize,
    seq: u64,
    attempt: u32,
    rx: Rx,
    /// The highest index known committed anywhere when the request arrived.
    committed_before: u64,
}

enum Event {
    Tick {
        node: usize,
        inc: u64,
    },
    Run {
        node: usize,
        inc: u64,
    },
    Raft {
        from: usize,
        to: usize,
        msg: RaftMsg,
    },
    SnapArrive {
        from: usize,
        from_inc: u64,
        to: usize,
        msg: RaftMsg,
        file: PathBuf,
    },
    SnapSent {
        node: usize,
        inc: u64,
        peer: u64,
        ok: bool,
    },
    Request {
        node: usize,
        client: usize,
        seq: u64,
        attempt: u32,
        req: Req,
    },
    Reply {
        client: usize,
        seq: u64,
        attempt: u32,
        reply: Reply,
    },
    /// Send the operation again (after a timeout or a refusal), to `target` if named.
    Retry {
        client: usize,
        seq: u64,
        attempt: u32,
        target: Option<usize>,
    },
    ClientStart {
        client: usize,
    },
    Crash,
    ForceCrash {
        node: usize,
        inc: u64,
    },
    /// A crash unless too many nodes are down already.
    CrashSoon {
        node: usize,
        inc: u64,
    },
    Restart {
        node: usize,
        inc: u64,
    },
    Partition,
    Pause,
    Transfer,
    EndChaos,
}

/// A running incarnation of a node: dropped whole when it crashes.
struct Up {
    core: Core,
    log: RaftLog,
    status: Arc<Mutex<RaftStatus>>,
    outbox: Arc<Mutex<Vec<Out>>>,
    inbox: Vec<Msg>,
    run_scheduled: bool,
    pending: Vec<Pending>,
    /// Committed entries up to here have been compared with the group's committed log.
    checked_commit: u64,
    digested_applied: u64,
    was_leader: bool,
}

struct Node {
    id: u64,
    disk: SimDisk,
    up: Option<Up>,
    /// Incarnation: events for an earlier one are void.
    inc: u64,
    paused_until: u64,
    skew_ns: i64,
}

struct Op {
    seq: u64,
    kind: OpKind,
}

struct Client {
    id: u64,
    base: String,
    model: Model,
    next_seq: u64,
    op: Option<Op>,
    attempt: u32,
    target: usize,
}

struct SharedResult {
    names: Vec<String>,
    parents: bool,
    client: usize,
    seq: u64,
    outcome: Outcome,
}

#[derive(Default, Debug, Clone)]
struct Stats {
    sim_us: u64,
    events: u64,
    crashes: u64,
    mid_step_deaths: u64,
    elections: u64,
    snapshots: u64,
    ops: u64,
    retried_ops: u64,
    reads: u64,
    /// Of `reads`, those answered from the status under the leader's lease, as the service does.
    lease_reads: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.sim_us += o.sim_us;
        self.events += o.events;
        self.crashes += o.crashes;
        self.mid_step_deaths += o.mid_step_deaths;
        self.elections += o.elections;
        self.snapshots += o.snapshots;
        self.ops += o.ops;
        self.retried_ops += o.retried_ops;
        self.reads += o.reads;
        self.lease_reads += o.lease_reads;
    }
}

struct Sim {
    p: Params,
    rng: ChaCha8Rng,
    now: u64,
    clock_ns: Arc<AtomicI64>,
    queue: BTreeMap<(u64, u64), Event>,
    seq: u64,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    /// Directed links that are cut: (from, to).
    cut: BTreeSet<(usize, usize)>,
    chaos: bool,
    dir: tempfile::TempDir,
    peers: BTreeMap<u64, String>,
    voters: Vec<u64>,
    /// Term -> the node that led in it.
    leaders: BTreeMap<u64, u64>,
    /// Index -> (term, type, data) of every entry known to be committed.
    committed: BTreeMap<u64, (u64, i32, Vec<u8>)>,
    /// The highest commit index any node has reached.
    commit_high: u64,
    /// By term: the highest index a node of that term reported committed.
    commit_high_by_term: BTreeMap<u64, u64>,
    /// Applied index -> (state digest, node that first had it).
    states: BTreeMap<u64, (u64, u64)>,
    shared: Vec<SharedResult>,
    stats: Stats,
    trace: bool,
    fingerprint: DefaultHasher,
    /// Per (client, seq): attempts sent.
    attempts: BTreeMap<(usize, u64), u32>,
}

type Check = Result<(), String>;

impl Sim {
    fn new(seed: u64, trace: bool) -> Result<Sim, String> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let p = Params::new(&mut rng);
        if trace {
            eprintln!("seed {seed}: {p:#?}");
        }
        let peers: BTreeMap<u64, String> = (1..=p.nodes as u64).map(|id| (id, format!("10.0.0.{id}:7000"))).collect();
        let voters = peers.keys().copied().collect();
        let nodes = (1..=p.nodes as u64)
            .map(|id| Node {
                id,
                disk: SimDisk::default(),
                up: None,
                inc: 0,
                paused_until: 0,
                skew_ns: rng.random_range(-2_000_000_000..2_000_000_000),
            })
            .collect();
        let clients = (0..p.clients)
            .map(|k| Client {
                id: rng.random_range(1..u64::MAX),
                base: format!("/c{k}"),
                model: Model::default(),
                next_seq: 1,
                op: None,
                attempt: 0,
                target: rng.random_range(0..p.nodes),
            })
            .collect();
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let mut sim = Sim {
            p,
            rng,
            now: 0,
            clock_ns: Arc::new(AtomicI64::new(CLOCK_BASE_NS)),
            queue: BTreeMap::new(),
            seq: 0,
            nodes,
            clients,
            cut: BTreeSet::new(),
            chaos: true,
            dir,
            peers,
            voters,
            leaders: BTreeMap::new(),
            committed: BTreeMap::new(),
            commit_high: 0,
            commit_high_by_term: BTreeMap::new(),
            states: BTreeMap::new(),
            shared: Vec::new(),
            stats: Stats::default(),
            trace,
            fingerprint: DefaultHasher::new(),
            attempts: BTreeMap::new(),
        };
        for i in 0..sim.nodes.len() {
            sim.start_node(i)?;
        }
        for c in 0..sim.clients.len() {
            let t = sim.rng.random_range(0..200 * MS);
            sim.at(t, Event::ClientStart { client: c });
        }
        let chaos_us = sim.p.chaos_us;
        sim.at(chaos_us, Event::EndChaos);
        let chaos = [
            (sim.p.partition_gap_us, Event::Partition),
            (sim.p.crash_gap_us, Event::Crash),
            (sim.p.pause_gap_us, Event::Pause),
            (sim.p.transfer_gap_us, Event::Transfer),
        ];
        for (gap, ev) in chaos {
            if let Some(gap) = gap {
                let t = sim.rng.random_range(0..2 * gap);
                sim.at(t, ev);
            }
        }
        Ok(sim)
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("{:>10.3}s  {}", self.now as f64 / SEC as f64, what());
        }
    }

    fn at(&mut self, t: u64, ev: Event) {
        self.seq += 1;
        self.queue.insert((t.max(self.now), self.seq), ev);
    }

    fn after(&mut self, d: u64, ev: Event) {
        self.at(self.now + d, ev);
    }

    fn delay(&mut self) -> u64 {
        if self.p.slow > 0.0 && self.rng.random_bool(self.p.slow) {
            return self.rng.random_range(50 * MS..SEC);
        }
        let (lo, hi) = self.p.delay_us;
        self.rng.random_range(lo..=hi)
    }

    fn lost(&mut self) -> bool {
        self.p.loss > 0.0 && self.rng.random_bool(self.p.loss)
    }

    fn start_node(&mut self, i: usize) -> Check {
        let n = &self.nodes[i];
        let id = n.id;
        let db = redb::Database::builder()
            .create_with_backend(n.disk.clone())
            .map_err(|e| format!("node {id}: open database: {e}"))?;
        let db = Arc::new(db);
        let files: [LogFile; 2] = [Box::new(n.disk.file(1)), Box::new(n.disk.file(2))];
        let log = RaftLog::open(db.clone(), files, &self.voters).map_err(|e| format!("node {id}: open log: {e:#}"))?;
        let state = State::open(db).map_err(|e| format!("node {id}: open state: {e:#}"))?;
        state.bootstrap_masters(&self.peers).map_err(|e| format!("node {id}: bootstrap: {e:#}"))?;
        let applied = state.applied_index().map_err(|e| format!("node {id}: applied index: {e}"))?;
        let first = log.first_index().map_err(|e| format!("node {id}: first index: {e}"))?;
        // The log of a new group starts compacted at its bootstrap index 1, with nothing applied.
        if first > 2 && applied + 1 < first {
            return Err(format!(
                "node {id} restarted with its state at applied index {applied} but its log compacted up to {}",
                first - 1
            ));
        }
        let outbox = Arc::new(Mutex::new(Vec::new()));
        let net = SimNet { outbox: outbox.clone(), disk: n.disk.clone(), dir: self.dir.path().to_path_buf() };
        let clock_ns = self.clock_ns.clone();
        let skew = n.skew_ns;
        let mono_ns = self.clock_ns.clone();
        let opts = CoreOptions {
            election_ticks: Some(self.rng.random_range(10..20)),
            first_request_id: Some(self.rng.random()),
            // Leases are measured on the simulated time (no skew: a skewed wall clock is an offset,
            // and leases assume only that clocks advance at about the same rate).
            monotonic: Some(Arc::new(move || (mono_ns.load(Ordering::Relaxed) - CLOCK_BASE_NS) as u64)),
            apply_defer_entries: Some(self.rng.random_range(1..8)),
        };
        let mut core = Core::with_options(
            id,
            log.clone(),
            state,
            Arc::new(Cluster::new(Duration::from_secs(10))),
            Box::new(net),
            Arc::new(RwLock::new(BTreeMap::new())),
            Box::new(move || clock_ns.load(Ordering::Relaxed) + skew),
            opts,
        )
        .map_err(|e| format!("node {id}: start core: {e:#}"))?;
        core.compact_every = self.p.compact_every;
        core.checkpoint_every = self.p.checkpoint_every;
        let status = core.status_handle();
        let inc = n.inc;
        self.nodes[i].up = Some(Up {
            core,
            log,
            status,
            outbox,
            inbox: Vec::new(),
            run_scheduled: false,
            pending: Vec::new(),
            checked_commit: 0,
            digested_applied: u64::MAX,
            was_leader: false,
        });
        let t = self.rng.random_range(0..TICK_US);
        self.after(t, Event::Tick { node: i, inc });
        self.log(|| format!("node {id} started (applied {applied}, log from {first})"));
        self.check_node(i)
    }

    fn crash(&mut self, i: usize) -> Check {
        let Some(up) = self.nodes[i].up.take() else { return Ok(()) };
        let n = &mut self.nodes[i];
        n.disk.kill();
        drop(up);
        if n.disk.handles() != 1 {
            return Err(format!("node {}: the database outlived its crash ({} disk handles)", n.id, n.disk.handles()));
        }
        let torn = self.p.torn.then_some(&mut self.rng);
        n.disk.crash(torn);
        n.inc += 1;
        self.stats.crashes += 1;
        let (id, inc) = (n.id, n.inc);
        let down = if self.rng.random_bool(0.2) {
            self.rng.random_range(2 * SEC..6 * SEC)
        } else {
            self.rng.random_range(10 * MS..SEC)
        };
        self.after(down, Event::Restart { node: i, inc });
        self.log(|| format!("node {id} crashed"));
        Ok(())
    }

    /// Hands a message to a node's driver; it runs shortly after.
    fn deliver(&mut self, i: usize, m: Msg) {
        let inc = self.nodes[i].inc;
        let Some(up) = self.nodes[i].up.as_mut() else { return };
        up.inbox.push(m);
        if !up.run_scheduled {
            up.run_scheduled = true;
            let t = self.rng.random_range(0..500);
            self.after(t, Event::Run { node: i, inc });
        }
    }

    /// After the core handled something and ran `on_ready`.
    fn after_step(&mut self, i: usize, res: anyhow::Result<()>) -> Check {
        let id = self.nodes[i].id;
        res.map_err(|e| format!("node {id}: on_ready failed: {e:#}"))?;
        if self.nodes[i].disk.dead() {
            // It died inside this step: what it sent before dying is on its way (the network
            // dropped what came after), the answers it gave in this step are lost.
            self.flush(i);
            self.stats.mid_step_deaths += 1;
            self.log(|| format!("node {id} died inside a step"));
            return self.crash(i);
        }
        self.flush(i);
        self.check_node(i)?;
        self.poll(i)
    }

    fn flush(&mut self, i: usize) {
        let Some(up) = self.nodes[i].up.as_ref() else { return };
        let out = std::mem::take(&mut *up.outbox.lock().expect("outbox lock"));
        let inc = self.nodes[i].inc;
        for o in out {
            match o {
                Out::Raft(m) => {
                    let chance = match m.get_msg_type() {
                        MessageType::MsgRequestVoteResponse if !m.reject => self.p.crash_after_vote,
                        MessageType::MsgAppendResponse if !m.reject => self.p.crash_after_append,
                        _ => 0.0,
                    };
                    if self.chaos && chance > 0.0 && self.rng.random_bool(chance) {
                        let t = self.rng.random_range(0..3 * MS);
                        self.after(t, Event::CrashSoon { node: i, inc });
                    }
                    let to = (m.to as usize).wrapping_sub(1);
                    if to >= self.nodes.len() || self.lost() {
                        continue;
                    }
                    let copies = if self.p.dup > 0.0 && self.rng.random_bool(self.p.dup) { 2 } else { 1 };
                    for _ in 0..copies {
                        let d = self.delay();
                        self.after(d, Event::Raft { from: i, to, msg: m.clone() });
                    }
                }
                Out::Snapshot(m, file) => {
                    let to = (m.to as usize).wrapping_sub(1);
                    let peer = m.to;
                    let d = self.delay() + self.rng.random_range(0..20 * MS);
                    match file {
                        Some(file) if to < self.nodes.len() && !self.lost() => {
                            self.after(d, Event::SnapArrive { from: i, from_inc: inc, to, msg: m, file });
                        }
                        file => {
                            if let Some(f) = file {
                                let _ = std::fs::remove_file(f);
                            }
                            self.after(d, Event::SnapSent { node: i, inc, peer, ok: false });
                        }
                    }
                }
            }
        }
    }

    /// The invariants that one node's state after a step can break.
    fn check_node(&mut self, i: usize) -> Check {
        let now = self.now;
        let id = self.nodes[i].id;
        let Some(up) = self.nodes[i].up.as_mut() else { return Ok(()) };
        let s = up.status.lock().expect("status lock").clone();
        (now, id, s.term, &s.role, s.commit_index, s.applied_index).hash(&mut self.fingerprint);
        let leader = s.role == "leader";
        if leader {
            match self.leaders.get(&s.term) {
                Some(&other) if other != id => {
                    return Err(format!("two leaders in term {}: nodes {other} and {id}", s.term));
                }
                Some(_) => {}
                None => {
                    self.leaders.insert(s.term, id);
                    self.stats.elections += 1;
                    if self.trace {
                        eprintln!("{:>10.3}s  node {id} leads term {}", now as f64 / SEC as f64, s.term);
                    }
                }
            }
        }
        let first = up.log.first_index().map_err(|e| e.to_string())?;
        let last = up.log.last_index().map_err(|e| e.to_string())?;
        if s.commit_index > last {
            return Err(format!("node {id}: commit index {} beyond its last entry {last}", s.commit_index));
        }
        let entry = |idx: u64| -> Result<(u64, i32, Vec<u8>), String> {
            let e = up
                .log
                .entries(idx, idx + 1, None, GetEntriesContext::empty(false))
                .map_err(|e| format!("node {id}: entry {idx}: {e}"))?;
            let e = e.first().ok_or_else(|| format!("node {id}: entry {idx} missing"))?;
            Ok((e.term, e.get_entry_type() as i32, e.data.to_vec()))
        };
        for idx in (up.checked_commit + 1).max(first)..=s.commit_index {
            let e = entry(idx)?;
            match self.committed.get(&idx) {
                Some(c) if *c != e => {
                    return Err(format!(
                        "node {id}: committed entry {idx} is (term {}, {} bytes), the group committed (term {}, {} bytes)",
                        e.0,
                        e.2.len(),
                        c.0,
                        c.2.len()
                    ));
                }
                Some(_) => {}
                None => {
                    self.committed.insert(idx, e);
                }
            }
        }
        up.checked_commit = up.checked_commit.max(s.commit_index);
        self.commit_high = self.commit_high.max(s.commit_index);
        let high = self.commit_high_by_term.entry(s.term).or_default();
        *high = (*high).max(s.commit_index);
        if leader && !up.was_leader {
            // Leader completeness: a new leader holds every entry committed in an earlier term.
            // Not those committed since in a later one: a candidate paused with its votes in hand
            // may take office in a term the group has left behind (it can commit nothing there).
            let max = self.commit_high_by_term.range(..s.term).map(|(_, &i)| i).max().unwrap_or(0);
            if max > last {
                return Err(format!(
                    "node {id} leads term {} without committed entry {max} (its last is {last})",
                    s.term
                ));
            }
            // (Entries that every node compacted before any was checked leave gaps in the map.)
            for (&idx, c) in self.committed.range(first..=max.max(first)) {
                if entry(idx)? != *c {
                    return Err(format!("node {id} leads term {} with a different committed entry {idx}", s.term));
                }
            }
        }
        if up.was_leader && !leader && self.trace {
            eprintln!("{:>10.3}s  node {id} no longer leads (term {})", now as f64 / SEC as f64, s.term);
        }
        up.was_leader = leader;
        if s.applied_index != up.digested_applied {
            let (applied, digest) = state_digest(up.core.state()).map_err(|e| format!("node {id}: {e}"))?;
            up.digested_applied = s.applied_index;
            match self.states.get(&applied) {
                Some(&(d, other)) if d != digest => {
                    return Err(format!("nodes {other} and {id} hold different states at applied index {applied}"));
                }
                Some(_) => {}
                None => {
                    self.states.insert(applied, (digest, id));
                }
            }
        }
        Ok(())
    }

    fn classify(&self, e: MetaError) -> Result<Reply, String> {
        let code = match e {
            MetaError::NotFound(_) => Code::NotFound,
            MetaError::AlreadyExists(_) => Code::AlreadyExists,
            MetaError::NotADirectory(_) => Code::NotADirectory,
            MetaError::IsADirectory(_) => Code::IsADirectory,
            MetaError::NotEmpty(_) => Code::NotEmpty,
            MetaError::InvalidArgument(_) => Code::InvalidArgument,
            MetaError::NotLeader { hint } => {
                let node = hint.and_then(|h| self.peers.iter().find(|(_, a)| **a == h).map(|(id, _)| *id as usize - 1));
                return Ok(Reply::Retry(node));
            }
            MetaError::Unavailable(_) => return Ok(Reply::Retry(None)),
            e => return Err(format!("unexpected error: {e}")),
        };
        Ok(Reply::Done(Outcome::Err(code)))
    }

    /// Answers that became ready on node `i` travel back to their clients.
    fn poll(&mut self, i: usize) -> Check {
        let Some(up) = self.nodes[i].up.as_mut() else { return Ok(()) };
        let pending = std::mem::take(&mut up.pending);
        let mut keep = Vec::new();
        let mut replies = Vec::new();
        for mut p in pending {
            let reply = match &mut p.rx {
                Rx::Propose(rx) => match rx.try_recv() {
                    Ok(Ok(command_result::Result::Attr(a))) => match a.kind() {
                        InodeKind::Directory => Reply::Done(Outcome::Dir),
                        InodeKind::File => Reply::Done(Outcome::File { size: a.size, version: a.version }),
                        k => return Err(format!("an answer of kind {k:?}")),
                    },
                    Ok(Ok(command_result::Result::Done(_))) => Reply::Done(Outcome::Done),
                    Ok(Ok(command_result::Result::Error(e))) => return Err(format!("an error as a result: {e:?}")),
                    Ok(Ok(command_result::Result::Limits(l))) => return Err(format!("limits as an answer: {l:?}")),
                    Ok(Ok(command_result::Result::AccessKey(k))) => {
                        return Err(format!("an access key as an answer: {}", k.id))
                    }
                    Ok(Err(e)) => self.classify(e)?,
                    Err(oneshot::error::TryRecvError::Empty) => {
                        keep.push(p);
                        continue;
                    }
                    Err(oneshot::error::TryRecvError::Closed) => Reply::Retry(None),
                },
                Rx::Read(rx) => match rx.try_recv() {
                    Ok(Ok(())) => {
                        self.check_read(i, &p)?;
                        Reply::Done(Outcome::Done)
                    }
                    Ok(Err(e)) => self.classify(e)?,
                    Err(oneshot::error::TryRecvError::Empty) => {
                        keep.push(p);
                        continue;
                    }
                    Err(oneshot::error::TryRecvError::Closed) => Reply::Retry(None),
                },
            };
            replies.push((p.client, p.seq, p.attempt, reply));
        }
        if let Some(up) = self.nodes[i].up.as_mut() {
            up.pending = keep;
        }
        for (client, seq, attempt, reply) in replies {
            if !self.lost() {
                let d = self.delay();
                self.after(d, Event::Reply { client, seq, attempt, reply });
            }
        }
        Ok(())
    }

    /// A read barrier passed on node `i`: its state must include every entry committed before the
    /// read arrived, hence every mutation the client had acknowledged, and (the client being the
    /// only writer of its subtree) nothing more of its own.
    fn check_read(&mut self, i: usize, p: &Pending) -> Check {
        let up = self.nodes[i].up.as_ref().expect("polled nodes are up");
        let applied = up.status.lock().expect("status lock").applied_index;
        if applied < p.committed_before {
            return Err(format!(
                "node {}: a read passed its barrier at applied index {applied}, but entry {} was committed before \
                 the read arrived",
                self.nodes[i].id, p.committed_before
            ));
        }
        let (c, seq) = (p.client, p.seq);
        let cl = &self.clients[c];
        if !matches!(&cl.op, Some(op) if op.seq == seq) {
            return Ok(()); // a late duplicate: the client has moved on
        }
        let seen = walk(up.core.state(), &cl.base)?;
        let want = cl.model.base.then(|| cl.model.tree.clone());
        if seen != want {
            return Err(format!(
                "node {}: read {seq} of client {c} passed its barrier on a stale state:\n  node:  {seen:?}\n  model: {want:?}",
                self.nodes[i].id
            ));
        }
        self.stats.reads += 1;
        Ok(())
    }

    fn names(&mut self, pool: &[&str], max_depth: usize) -> Vec<String> {
        let depth = self.rng.random_range(1..=max_depth);
        (0..depth).map(|_| pool.choose(&mut self.rng).expect("pool").to_string()).collect()
    }

    fn next_op(&mut self, c: usize) -> OpKind {
        if !self.clients[c].model.base {
            return OpKind::MkBase;
        }
        const PRIVATE: &[&str] = &["a", "b", "c"];
        match self.rng.random_range(0..100) {
            0..20 => OpKind::Mkdir { names: self.names(PRIVATE, 3), parents: self.rng.random_bool(0.3), shared: false },
            20..40 => {
                let names = self.names(PRIVATE, 3);
                let extents = (0..self.rng.random_range(1..=3))
                    .map(|_| Extent {
                        hash: (0..cairn_proto::HASH_LEN).map(|_| self.rng.random()).collect(),
                        length: self.rng.random_range(1..100_000),
                    })
                    .collect();
                OpKind::Commit { names, extents, replication: self.rng.random_range(1..=3) }
            }
            40..55 => OpKind::Rename { src: self.names(PRIVATE, 2), dst: self.names(PRIVATE, 2) },
            55..65 => OpKind::Remove { names: self.names(PRIVATE, 2), recursive: self.rng.random_bool(0.5) },
            65..85 => OpKind::Read,
            _ => {
                let parents = self.rng.random_bool(0.4);
                let mut names = vec!["s".to_string()];
                names.extend(self.names(&["p", "q", "r", "t"], 2));
                OpKind::Mkdir { names, parents, shared: true }
            }
        }
    }

    fn path(&self, c: usize, names: &[String], shared: bool) -> String {
        if shared {
            format!("/{}", names.join("/"))
        } else {
            format!("{}/{}", self.clients[c].base, names.join("/"))
        }
    }

    fn request(&self, c: usize) -> Req {
        let cl = &self.clients[c];
        let op = cl.op.as_ref().expect("an operation in flight");
        let id = Some(ClientRequestId { client: cl.id, seq: op.seq, first_unanswered: op.seq });
        let mkdir = |path: String, parents: bool| {
            command::Op::Mkdir(MkdirRequest { path, parents, mode: 0o755, id, ..Default::default() })
        };
        Req::Op(match &op.kind {
            OpKind::MkBase => mkdir(cl.base.clone(), false),
            OpKind::Mkdir { names, parents, shared } => mkdir(self.path(c, names, *shared), *parents),
            OpKind::Commit { names, extents, replication } => command::Op::CommitFile(CommitFileRequest {
                path: self.path(c, names, false),
                extents: extents.clone(),
                replication: *replication,
                mode: 0o644,
                id,
                ..Default::default()
            }),
            OpKind::Rename { src, dst } => {
                command::Op::Rename(RenameRequest { src: self.path(c, src, false), dst: self.path(c, dst, false), id })
            }
            OpKind::Remove { names, recursive } => {
                command::Op::Remove(RemoveRequest { path: self.path(c, names, false), recursive: *recursive, id })
            }
            OpKind::Read => return Req::Read,
        })
    }

    fn send_attempt(&mut self, c: usize) {
        let req = self.request(c);
        let timeout = self.p.client_timeout_us;
        let cl = &mut self.clients[c];
        cl.attempt += 1;
        let (attempt, node, seq) = (cl.attempt, cl.target, cl.op.as_ref().expect("op").seq);
        *self.attempts.entry((c, seq)).or_default() += 1;
        if !self.lost() {
            let d = self.delay();
            self.after(d, Event::Request { node, client: c, seq, attempt, req });
        }
        let other = self.other_node(node);
        self.after(timeout, Event::Retry { client: c, seq, attempt, target: Some(other) });
    }

    fn other_node(&mut self, not: usize) -> usize {
        let n = self.nodes.len();
        (not + self.rng.random_range(1..n)) % n
    }

    fn on_request(&mut self, i: usize, client: usize, seq: u64, attempt: u32, req: Req) -> Check {
        let Some(up) = self.nodes[i].up.as_mut() else { return Ok(()) };
        if self.p.service_checks {
            // What `Node::ensure_leader` answers before a request reaches the driver.
            let s = up.status.lock().expect("status lock").clone();
            let refusal = if s.role == "leader" && s.serving {
                None
            } else if s.role == "leader" || s.leader_id == 0 {
                Some(Reply::Retry(None))
            } else {
                Some(Reply::Retry(Some(s.leader_id as usize - 1)))
            };
            if let Some(reply) = refusal {
                if !self.lost() {
                    let d = self.delay();
                    self.after(d, Event::Reply { client, seq, attempt, reply });
                }
                return Ok(());
            }
            // What `Node::read_barrier` answers at once under the leader's lease.
            if matches!(req, Req::Read) && s.lease_read(self.now * 1000) {
                let (reply, rx) = oneshot::channel();
                let _ = reply.send(Ok(()));
                let committed_before = self.commit_high;
                up.pending.push(Pending { client, seq, attempt, rx: Rx::Read(rx), committed_before });
                self.stats.lease_reads += 1;
                return self.poll(i);
            }
        }
        let (msg, rx) = match req {
            Req::Op(op) => {
                let (reply, rx) = oneshot::channel();
                (Msg::Propose { op, reply }, Rx::Propose(rx))
            }
            Req::Read => {
                let (reply, rx) = oneshot::channel();
                (Msg::Read { reply }, Rx::Read(rx))
            }
        };
        let committed_before = self.commit_high;
        up.pending.push(Pending { client, seq, attempt, rx, committed_before });
        self.deliver(i, msg);
        Ok(())
    }

    fn on_reply(&mut self, c: usize, seq: u64, attempt: u32, reply: Reply) -> Check {
        let cl = &self.clients[c];
        if !matches!(&cl.op, Some(op) if op.seq == seq) {
            return Ok(()); // an answer to an operation already answered
        }
        match reply {
            Reply::Done(outcome) => self.complete(c, outcome),
            Reply::Retry(hint) => {
                if attempt != cl.attempt {
                    return Ok(()); // a newer attempt is on its way
                }
                let (target, backoff) = match hint {
                    Some(n) => (Some(n), self.rng.random_range(0..2 * MS)),
                    None => (None, self.rng.random_range(10 * MS..100 * MS)),
                };
                let target =
                    target.or_else(|| self.rng.random_bool(0.5).then(|| self.rng.random_range(0..self.nodes.len())));
                self.after(backoff, Event::Retry { client: c, seq, attempt, target });
                Ok(())
            }
        }
    }

    fn complete(&mut self, c: usize, outcome: Outcome) -> Check {
        let cl = &mut self.clients[c];
        let op = cl.op.take().expect("checked by the caller");
        (self.now, c, op.seq, format!("{outcome:?}")).hash(&mut self.fingerprint);
        let attempts = self.attempts.remove(&(c, op.seq)).unwrap_or(0);
        self.stats.ops += 1;
        if attempts > 1 {
            self.stats.retried_ops += 1;
        }
        let expected = match &op.kind {
            OpKind::Mkdir { names, parents, shared: true } => {
                let ok = matches!(outcome, Outcome::Dir | Outcome::Err(Code::AlreadyExists | Code::NotFound));
                if !ok || (*parents && outcome != Outcome::Dir) {
                    return Err(format!(
                        "client {c} op {} ({}) answered {outcome:?}",
                        op.seq,
                        op.kind.describe(&cl.base)
                    ));
                }
                self.shared.push(SharedResult {
                    names: names.clone(),
                    parents: *parents,
                    client: c,
                    seq: op.seq,
                    outcome: outcome.clone(),
                });
                outcome.clone()
            }
            kind => cl.model.apply(kind),
        };
        if self.trace {
            eprintln!(
                "{:>10.3}s  client {c} op {} ({}) -> {outcome:?} after {attempts} attempt(s)",
                self.now as f64 / SEC as f64,
                op.seq,
                op.kind.describe(&cl.base)
            );
        }
        if outcome != expected {
            return Err(format!(
                "client {c} op {} ({}, {attempts} attempt(s)) answered {outcome:?}, expected {expected:?}",
                op.seq,
                op.kind.describe(&cl.base)
            ));
        }
        if self.chaos {
            let t = self.rng.random_range(0..=self.p.think_us);
            self.after(t, Event::ClientStart { client: c });
        }
        Ok(())
    }

    /// A node that believes it leads (the one of the highest term, if several do).
    fn leader(&self) -> Option<usize> {
        (0..self.nodes.len())
            .filter_map(|i| {
                let s = self.nodes[i].up.as_ref()?.status.lock().expect("status lock").clone();
                (s.role == "leader").then_some((s.term, i))
            })
            .max()
            .map(|(_, i)| i)
    }

    fn partition(&mut self) {
        let n = self.nodes.len();
        self.cut.clear();
        let leader = self.leader();
        let what = match self.rng.random_range(0..100) {
            0..20 => "healed".to_string(),
            20..55 => {
                // The leader, mostly: the partition that forces an election and leaves a deposed
                // leader that may not know it yet.
                let x = match leader {
                    Some(l) if self.rng.random_bool(0.7) => l,
                    _ => self.rng.random_range(0..n),
                };
                for j in (0..n).filter(|&j| j != x) {
                    self.cut.insert((x, j));
                    self.cut.insert((j, x));
                }
                format!("node {} isolated", x + 1)
            }
            55..80 => {
                let side: Vec<bool> = (0..n).map(|_| self.rng.random_bool(0.5)).collect();
                for a in 0..n {
                    for b in 0..n {
                        if side[a] != side[b] {
                            self.cut.insert((a, b));
                        }
                    }
                }
                format!("split {side:?}")
            }
            _ => {
                for _ in 0..self.rng.random_range(1..=n) {
                    let a = self.rng.random_range(0..n);
                    let b = self.other_node(a);
                    self.cut.insert((a, b));
                }
                format!("one-way cuts {:?}", self.cut)
            }
        };
        self.log(|| format!("partition: {what}"));
    }

    fn handle(&mut self, ev: Event) -> Check {
        match ev {
            Event::Tick { node, inc } => {
                if self.nodes[node].inc != inc || self.nodes[node].up.is_none() {
                    return Ok(());
                }
                if self.nodes[node].paused_until > self.now {
                    let t = self.nodes[node].paused_until;
                    self.at(t, Event::Tick { node, inc });
                    return Ok(());
                }
                let up = self.nodes[node].up.as_mut().expect("up");
                up.core.tick();
                let res = up.core.on_ready();
                self.after_step(node, res)?;
                let j = self.p.tick_jitter_us;
                let t = TICK_US - j / 2 + self.rng.random_range(0..=j);
                self.after(t, Event::Tick { node, inc });
            }
            Event::Run { node, inc } => {
                if self.nodes[node].inc != inc || self.nodes[node].up.is_none() {
                    return Ok(());
                }
                if self.nodes[node].paused_until > self.now {
                    let t = self.nodes[node].paused_until;
                    self.at(t, Event::Run { node, inc });
                    return Ok(());
                }
                let up = self.nodes[node].up.as_mut().expect("up");
                up.run_scheduled = false;
                let n = up.inbox.len().min(BATCH);
                for m in up.inbox.drain(..n).collect::<Vec<_>>() {
                    up.core.handle(m);
                }
                let res = up.core.on_ready();
                self.after_step(node, res)?;
                if let Some(up) = self.nodes[node].up.as_mut() {
                    if !up.inbox.is_empty() && !up.run_scheduled {
                        up.run_scheduled = true;
                        self.after(0, Event::Run { node, inc });
                    }
                }
            }
            Event::Raft { from, to, msg } => {
                if !self.cut.contains(&(from, to)) {
                    self.deliver(to, Msg::Step(Box::new(msg)));
                }
            }
            Event::SnapArrive { from, from_inc, to, msg, file } => {
                let ok = !self.cut.contains(&(from, to)) && self.nodes[to].up.is_some();
                if ok {
                    self.stats.snapshots += 1;
                    let index = msg.get_snapshot().get_metadata().index;
                    self.log(|| format!("snapshot at {index} from node {} reaches node {}", from + 1, to + 1));
                    self.deliver(to, Msg::Snapshot { msg: Box::new(msg), file });
                } else {
                    let _ = std::fs::remove_file(file);
                }
                let d = self.delay();
                self.after(d, Event::SnapSent { node: from, inc: from_inc, peer: to as u64 + 1, ok });
            }
            Event::SnapSent { node, inc, peer, ok } => {
                if self.nodes[node].inc == inc {
                    self.deliver(node, Msg::SnapshotSent { to: peer, ok });
                }
            }
            Event::Request { node, client, seq, attempt, req } => self.on_request(node, client, seq, attempt, req)?,
            Event::Reply { client, seq, attempt, reply } => self.on_reply(client, seq, attempt, reply)?,
            Event::Retry { client, seq, attempt, target } => {
                let cl = &mut self.clients[client];
                if matches!(&cl.op, Some(op) if op.seq == seq) && cl.attempt == attempt {
                    if let Some(t) = target {
                        cl.target = t;
                    }
                    self.send_attempt(client);
                }
            }
            Event::ClientStart { client } => {
                if !self.chaos || self.clients[client].op.is_some() {
                    return Ok(());
                }
                let kind = self.next_op(client);
                if self.rng.random_bool(self.p.wander) {
                    self.clients[client].target = self.rng.random_range(0..self.nodes.len());
                }
                let cl = &mut self.clients[client];
                cl.op = Some(Op { seq: cl.next_seq, kind });
                cl.next_seq += 1;
                self.send_attempt(client);
            }
            Event::Crash => {
                if !self.chaos {
                    return Ok(());
                }
                let gap = self.p.crash_gap_us.expect("crashes are on");
                let t = self.rng.random_range(gap / 2..gap * 3 / 2);
                self.after(t, Event::Crash);
                let down = self.nodes.iter().filter(|n| n.up.is_none()).count();
                let i = self.rng.random_range(0..self.nodes.len());
                if down >= self.p.max_down || self.nodes[i].up.is_none() {
                    return Ok(());
                }
                if self.rng.random_bool(self.p.mid_step) {
                    let n = self.rng.random_range(1..=4);
                    self.nodes[i].disk.die_at_sync(n);
                    let (inc, t) = (self.nodes[i].inc, self.rng.random_range(50 * MS..500 * MS));
                    self.after(t, Event::ForceCrash { node: i, inc });
                } else {
                    self.crash(i)?;
                }
            }
            Event::ForceCrash { node, inc } => {
                if self.chaos && self.nodes[node].inc == inc {
                    self.crash(node)?;
                }
            }
            Event::CrashSoon { node, inc } => {
                let down = self.nodes.iter().filter(|n| n.up.is_none()).count();
                if self.chaos && self.nodes[node].inc == inc && down < self.p.max_down {
                    self.crash(node)?;
                }
            }
            Event::Restart { node, inc } => {
                if self.nodes[node].inc == inc && self.nodes[node].up.is_none() {
                    self.start_node(node)?;
                }
            }
            Event::Partition => {
                if !self.chaos {
                    return Ok(());
                }
                self.partition();
                let gap = self.p.partition_gap_us.expect("partitions are on");
                let t = self.rng.random_range(gap / 2..gap * 3 / 2);
                self.after(t, Event::Partition);
            }
            Event::Pause => {
                if !self.chaos {
                    return Ok(());
                }
                let gap = self.p.pause_gap_us.expect("pauses are on");
                let t = self.rng.random_range(gap / 2..gap * 3 / 2);
                self.after(t, Event::Pause);
                let i = self.rng.random_range(0..self.nodes.len());
                let d = self.rng.random_range(50 * MS..1500 * MS);
                self.nodes[i].paused_until = self.now + d;
                self.log(|| format!("node {} paused for {} ms", i + 1, d / MS));
            }
            Event::Transfer => {
                if !self.chaos {
                    return Ok(());
                }
                let gap = self.p.transfer_gap_us.expect("transfers are on");
                let t = self.rng.random_range(gap / 2..gap * 3 / 2);
                self.after(t, Event::Transfer);
                if let Some(i) = self.leader() {
                    let to = if self.rng.random_bool(0.5) { 0 } else { self.other_node(i) as u64 + 1 };
                    let (reply, _rx) = oneshot::channel();
                    self.log(|| format!("node {} asked to hand leadership to {to}", i + 1));
                    self.deliver(i, Msg::Transfer { to, reply });
                }
            }
            Event::EndChaos => {
                self.chaos = false;
                self.cut.clear();
                self.p.loss = 0.0;
                self.p.dup = 0.0;
                self.p.slow = 0.0;
                self.log(|| "the network heals; every node restarts".into());
                for i in 0..self.nodes.len() {
                    self.nodes[i].paused_until = self.now;
                    self.nodes[i].disk.disarm();
                    if self.nodes[i].up.is_none() {
                        self.start_node(i)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// After the chaos: every client done, every node up and applied up to the same commit index
    /// under a serving leader.
    fn settled(&self) -> bool {
        if self.clients.iter().any(|c| c.op.is_some()) {
            return false;
        }
        let mut statuses = Vec::new();
        for n in &self.nodes {
            let Some(up) = &n.up else { return false };
            statuses.push(up.status.lock().expect("status lock").clone());
        }
        let top = statuses[0].applied_index;
        statuses.iter().all(|s| s.applied_index == top && s.commit_index == top)
            && statuses.iter().any(|s| s.role == "leader" && s.serving)
    }

    fn run_inner(&mut self) -> Check {
        let deadline = self.p.chaos_us + SETTLE_US;
        loop {
            let Some(((t, _), ev)) = self.queue.pop_first() else {
                return Err("the event queue ran dry".into());
            };
            self.now = t;
            self.clock_ns.store(CLOCK_BASE_NS + t as i64 * 1000, Ordering::Relaxed);
            self.stats.events += 1;
            if self.stats.events > MAX_EVENTS {
                return Err(format!("more than {MAX_EVENTS} events"));
            }
            self.handle(ev)?;
            if !self.chaos && self.settled() {
                return self.final_checks();
            }
            if t > deadline {
                let statuses: Vec<_> = self
                    .nodes
                    .iter()
                    .map(|n| {
                        n.up.as_ref().map(|u| {
                            let s = u.status.lock().expect("status lock");
                            format!(
                                "{} {}: term {} commit {} applied {}",
                                s.role, n.id, s.term, s.commit_index, s.applied_index
                            )
                        })
                    })
                    .collect();
                let busy: Vec<_> = self.clients.iter().filter_map(|c| c.op.as_ref().map(|o| o.seq)).collect();
                return Err(format!(
                    "no convergence {}s after the network healed: {statuses:?}, clients busy: {busy:?}",
                    SETTLE_US / SEC
                ));
            }
        }
    }

    /// Every node holds the same state, in which every acknowledged mutation is visible.
    fn final_checks(&mut self) -> Check {
        let mut digests = BTreeSet::new();
        for i in 0..self.nodes.len() {
            self.check_node(i)?;
            let up = self.nodes[i].up.as_ref().expect("settled");
            digests.insert(state_digest(up.core.state())?);
        }
        if digests.len() != 1 {
            return Err(format!("nodes settled on different states: {digests:?}"));
        }
        for n in &self.nodes {
            let state = n.up.as_ref().expect("settled").core.state();
            for (c, cl) in self.clients.iter().enumerate() {
                let seen = walk(state, &cl.base)?;
                let want = cl.model.base.then(|| cl.model.tree.clone());
                if seen != want {
                    return Err(format!(
                        "node {}: client {c}'s acknowledged mutations are not what it holds:\n  node:  {seen:?}\n  model: {want:?}",
                        n.id
                    ));
                }
            }
            let shared = walk(state, "/s")?.unwrap_or_default();
            for r in &self.shared {
                if r.outcome == Outcome::Dir && shared.get(&r.names[1..]) != Some(&Kind::Dir) {
                    return Err(format!(
                        "node {}: /{} was created (client {} op {}) but is missing",
                        n.id,
                        r.names.join("/"),
                        r.client,
                        r.seq
                    ));
                }
            }
        }
        // A mkdir without parents succeeds once per path (nothing under /s is ever removed), and
        // fails with AlreadyExists only if another operation created the path.
        let mut created: BTreeMap<&[String], (usize, u64)> = BTreeMap::new();
        for r in self.shared.iter().filter(|r| !r.parents && r.outcome == Outcome::Dir) {
            if let Some((c, s)) = created.insert(&r.names, (r.client, r.seq)) {
                return Err(format!(
                    "/{} was created twice: by client {c} op {s} and client {} op {}",
                    r.names.join("/"),
                    r.client,
                    r.seq
                ));
            }
        }
        for r in self.shared.iter().filter(|r| !r.parents && r.outcome == Outcome::Err(Code::AlreadyExists)) {
            let justified = self.shared.iter().any(|o| {
                (o.client, o.seq) != (r.client, r.seq) && o.outcome == Outcome::Dir && o.names.starts_with(&r.names)
            });
            if !justified {
                return Err(format!(
                    "client {} op {}: mkdir /{} answered AlreadyExists, but no other operation created it",
                    r.client,
                    r.seq,
                    r.names.join("/")
                ));
            }
        }
        Ok(())
    }
}

/// Runs one seed: its statistics and a fingerprint of the run, or what failed (a panic counts).
fn run_seed(seed: u64, trace: bool) -> Result<(Stats, u64), String> {
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut sim = Sim::new(seed, trace).map_err(|e| (0, e))?;
        let res = sim.run_inner();
        sim.stats.sim_us = sim.now;
        res.map_err(|e| (sim.now, e))?;
        Ok((sim.stats.clone(), sim.fingerprint.finish()))
    }));
    match res {
        Ok(Ok(r)) => Ok(r),
        Ok(Err((t, e))) => Err(format!("at {:.3}s: {e}", t as f64 / SEC as f64)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panicked: {msg}"))
        }
    }
}

fn replay_line(seed: u64) -> String {
    format!("CAIRN_SIM_SEED={seed} cargo test --release -p cairn-master --test sim -- --nocapture")
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

#[test]
fn master_group_simulation() {
    if let Some(seed) = env_u64("CAIRN_SIM_SEED") {
        let trace = std::env::var("CAIRN_SIM_TRACE").is_ok_and(|v| v != "0");
        match run_seed(seed, trace) {
            Ok((stats, _)) => eprintln!("sim seed {seed} passed: {stats:?}"),
            Err(e) => panic!("sim seed {seed} failed {e}\nreplay: {}", replay_line(seed)),
        }
        return;
    }
    let count = env_u64("CAIRN_SIM_SEEDS").unwrap_or(if cfg!(debug_assertions) { 40 } else { 500 });
    let first = env_u64("CAIRN_SIM_FIRST_SEED").unwrap_or(0);
    let next = AtomicU64::new(first);
    let failures = Mutex::new(Vec::new());
    let total = Mutex::new(Stats::default());
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(8);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= first + count {
                    return;
                }
                match run_seed(seed, false) {
                    Ok((stats, _)) => total.lock().expect("stats lock").add(&stats),
                    Err(e) => {
                        eprintln!("sim seed {seed} failed {e}\nreplay: {}", replay_line(seed));
                        failures.lock().expect("failures lock").push((seed, e));
                    }
                }
            });
        }
    });
    let total = total.into_inner().expect("stats lock");
    eprintln!(
        "sim: {count} seeds from {first} in {:.1}s on {threads} threads; simulated {:.0}s, {} events, {} crashes \
         ({} inside a step), {} elections, {} snapshots installed, {} client operations ({} retried), {} checked reads ({} under a lease without \
         the driver)",
        started.elapsed().as_secs_f64(),
        total.sim_us as f64 / SEC as f64,
        total.events,
        total.crashes,
        total.mid_step_deaths,
        total.elections,
        total.snapshots,
        total.ops,
        total.retried_ops,
        total.reads,
        total.lease_reads
    );
    let mut failures = failures.into_inner().expect("failures lock");
    failures.sort();
    if let Some((seed, e)) = failures.first() {
        panic!(
            "{} of {count} simulation seeds failed: {:?}\nfirst: seed {seed} failed {e}\nreplay: {}",
            failures.len(),
            failures.iter().map(|f| f.0).collect::<Vec<_>>(),
            replay_line(*seed)
        );
    }
}

/// The same seed gives the same run: a failure found once can be replayed.
#[test]
fn simulation_is_deterministic() {
    for seed in [1, 2, 3] {
        let a = run_seed(seed, false).map(|r| r.1);
        let b = run_seed(seed, false).map(|r| r.1);
        assert_eq!(a, b, "seed {seed} ran differently twice");
    }
}
