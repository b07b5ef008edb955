//! Leader-only soft state: which chunkservers are alive, how full they are, and which of them hold
//! each chunk. None of it is in the Raft log (as in GFS): a new leader rebuilds it from
//! registrations, heartbeats and full chunk reports. Placement of new chunks is decided here.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_proto::v1::{ChunkserverRef, ChunkserverStatus, CopyJob, HeartbeatRequest, HeartbeatResponse, RepairLimits};

use crate::error::MetaError;

pub type ChunkHash = [u8; 32];

/// How long a chunkserver may stay silent before placement and reads stop counting on it. Reads
/// still list it last, so a node that is only slow is not lost.
pub const DEFAULT_DEAD_AFTER: Duration = Duration::from_secs(10);
/// A node that missed this much is listed after the healthy replicas of a chunk.
const SUSPECT_AFTER: Duration = Duration::from_millis(2500);
/// How long a chunk stays safe from garbage collection after a client was last told to upload
/// it, or that it is stored, or committed it: an upload must commit within this time. A new
/// leader, which does not know its predecessor's placements, collects nothing for this long.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);
/// How long a leader waits for a mount's KeepAlive before it frees the unlinked files that mount
/// kept open. A mount renews every quarter of this, and at least every 30 s; a new leader counts
/// from its election. Every master of a group should have the same value (a mount paces itself
/// by the leader's).
pub const DEFAULT_KEPT_GRACE: Duration = Duration::from_secs(300);
/// Space kept free on every chunkserver, beyond what a placement needs.
const FREE_MARGIN: u64 = 64 << 20;
const MAX_PENDING: usize = 1 << 20;

#[derive(Clone, Debug)]
struct Node {
    id: u64,
    addr: String,
    zone: String,
    capacity: u64,
    used: u64,
    chunks: u64,
    /// Bytes placed on this node since its last heartbeat, so that a burst of placements does not
    /// pick the same "emptiest" node for every chunk.
    reserved: u64,
    last_heartbeat: Option<Instant>,
    /// The node's count of bytes copied for re-replication, at its last heartbeat.
    copied: Option<u64>,
    /// An admin is moving its replicas off: it receives none, and its replicas do not count
    /// toward a chunk's goal (they still serve as sources).
    draining: bool,
}

impl Node {
    fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used).saturating_sub(self.reserved)
    }
    fn aref(&self) -> ChunkserverRef {
        ChunkserverRef { id: self.id, addr: self.addr.clone() }
    }
}

fn default_limits() -> RepairLimits {
    RepairLimits { rate_bytes: crate::state::DEFAULT_REPAIR_RATE, copies: crate::state::DEFAULT_REPAIR_COPIES }
}

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<u64, Node>,
    locations: HashMap<ChunkHash, Vec<u64>>,
    /// Where commits said chunks were just stored, until those nodes report them (or
    /// [`EXPECTED_FOR`] passes): for readers and for "already stored" answers, never for trims,
    /// repairs or collection. A commit's targets are those of the chunk's latest placement, which
    /// another upload of the same content may have changed after this one's.
    expected: HashMap<ChunkHash, Vec<(u64, Instant)>>,
    /// Uploads placed but not yet committed: hash -> (targets, when).
    pending: HashMap<ChunkHash, Pending>,
    /// Replicas a client reported bad: (chunk, node), served last.
    suspects: HashSet<(ChunkHash, u64)>,
    /// Nodes whose full report this leader has received.
    reported: HashSet<u64>,
    /// Full reports being received page by page: node -> (report id, hashes so far).
    partial: HashMap<u64, (u64, HashSet<ChunkHash>)>,
    /// When this master became leader (the last reset).
    since: Option<Instant>,
    /// Mount sessions that keep unlinked files open (`state::KEPT`): when each was last heard
    /// from (KeepAlive) by this leader.
    keepers: HashMap<u64, Instant>,
    /// Chunks being deleted, whole (garbage) or surplus replicas, until each node reports them
    /// removed or dies.
    deleting: HashMap<ChunkHash, Deleting>,
    /// Unreferenced chunks the last collection left alone because a client may still commit
    /// them (placed within the grace period).
    gc_waiting: usize,
    limits: RepairLimits,
    /// Bytes copied by re-replication, as heartbeats reported them: (when, bytes).
    copied: std::collections::VecDeque<(Instant, u64)>,
    /// When the last full report completed.
    last_report: Option<Instant>,
    /// Re-replication: every chunk being copied. The job goes out with each of the target's
    /// heartbeats until it reports the chunk added or the copy failed.
    repairing: HashMap<ChunkHash, Repair>,
    /// The live nodes at the last repair scan: a change (a death) calls for a new scan.
    scanned_live: Option<BTreeSet<u64>>,
    /// Something besides a death may have lost replicas (removals, bad replicas).
    repair_dirty: bool,
}

/// A chunk clients were told to upload, or that it is stored: they may commit it until `until`.
struct Pending {
    /// Where it was placed (not yet locations: the replicas ack to the client, not to us).
    targets: Vec<u64>,
    until: Instant,
    /// Placements answered and not yet followed by a commit naming the chunk.
    outstanding: u32,
}

struct Repair {
    target: u64,
    since: Instant,
    job: CopyJob,
}

struct Deleting {
    /// The whole chunk is garbage (no file references it), not a surplus replica: nobody may
    /// upload or commit it until the deletes are done.
    gc: bool,
    /// Nodes that have yet to report the chunk removed.
    nodes: HashSet<u64>,
}

/// Copy jobs assigned to a target (and new ones to a first source per round), in units of its
/// copies in flight: a node works through a queue instead of idling between heartbeats.
const COPY_QUEUE_DEPTH: usize = 4;
/// Usage difference (fraction of capacity) between the fullest and the emptiest live node above
/// which chunks move from one to the other (HDFS's balancer uses 10% around the mean).
pub const BALANCE_SPREAD: f64 = 0.05;
/// A copy not reported done or failed after this long is assigned again.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(60);
/// Deletes sent to one node per heartbeat; the rest follow in the next ones.
const DELETES_PER_HEARTBEAT: usize = 4096;
/// Chunks marked for deletion (garbage or surplus) per collection round.
const DELETE_BATCH: usize = 20_000;
/// Copy throughput shown in status is averaged over this long.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// How long a commit's word that a node holds a chunk stands without the node's report.
const EXPECTED_FOR: Duration = Duration::from_secs(30);

/// After every known chunkserver has sent its full report, wait this long more (a heartbeat and a
/// half) for the chunks written just before the leader changed, which arrive in heartbeats.
const SETTLE_AFTER_REPORTS: Duration = Duration::from_millis(1500);

impl Inner {
    /// `node` no longer holds `hash`: one delete less to wait for. (A garbage mark whose deletes
    /// are not sent yet, with no nodes, stays: it keeps uploads and commits of the chunk away.)
    fn deleted(&mut self, hash: &ChunkHash, node: u64) {
        if let Some(d) = self.deleting.get_mut(hash) {
            if d.nodes.remove(&node) && d.nodes.is_empty() {
                self.deleting.remove(hash);
            }
        }
    }

    /// `node` reported holding `hash`.
    fn located(&mut self, hash: ChunkHash, node: u64) {
        let l = self.locations.entry(hash).or_default();
        if !l.contains(&node) {
            l.push(node);
        }
        self.unexpect(&hash, node);
    }

    /// `node` reported not holding `hash` (any more): a chunk it found damaged before it ever
    /// reported it, for one.
    fn unlocated(&mut self, hash: &ChunkHash, node: u64) {
        if let Some(l) = self.locations.get_mut(hash) {
            l.retain(|x| *x != node);
            if l.is_empty() {
                self.locations.remove(hash);
            }
        }
        self.unexpect(hash, node);
    }

    /// The nodes a commit named for `hash` within [`EXPECTED_FOR`] that have not reported yet.
    fn expected_nodes(&self, hash: &ChunkHash, now: Instant) -> impl Iterator<Item = u64> + '_ {
        let named = self.expected.get(hash).map_or(&[][..], Vec::as_slice);
        named.iter().filter(move |(_, t)| now.duration_since(*t) < EXPECTED_FOR).map(|(id, _)| *id)
    }

    fn unexpect(&mut self, hash: &ChunkHash, node: u64) {
        if let Some(e) = self.expected.get_mut(hash) {
            e.retain(|(id, _)| *id != node);
            if e.is_empty() {
                self.expected.remove(hash);
            }
        }
    }

    /// Whether `node`'s replica of `hash` counts: not reported bad, not being trimmed.
    fn good(&self, hash: &ChunkHash, node: u64) -> bool {
        !self.suspects.contains(&(*hash, node)) && !self.deleting.get(hash).is_some_and(|d| d.nodes.contains(&node))
    }

    /// Whether `hash` is garbage being deleted: nobody may upload or commit it meanwhile.
    fn collecting(&self, hash: &ChunkHash) -> bool {
        self.deleting.get(hash).is_some_and(|d| d.gc)
    }
}

pub struct Cluster {
    inner: Mutex<Inner>,
    dead_after: Duration,
    gc_grace: Duration,
    kept_grace: Duration,
}

/// The registry entry of node `id`, created if new, with its current address and zone.
fn entry<'g>(g: &'g mut Inner, id: u64, addr: &str, zone: &str) -> &'g mut Node {
    let n = g.nodes.entry(id).or_insert_with(|| Node {
        id,
        addr: addr.into(),
        zone: zone.into(),
        capacity: 0,
        used: 0,
        chunks: 0,
        reserved: 0,
        last_heartbeat: None,
        copied: None,
        draining: false,
    });
    n.addr = addr.into();
    n.zone = zone.into();
    n
}

/// A change of a node's draining flag calls for a repair scan (its replicas stop, or start
/// again, counting toward their goal).
fn mark_draining(g: &mut Inner, id: u64, draining: bool) {
    if let Some(n) = g.nodes.get_mut(&id) {
        if n.draining != draining {
            n.draining = draining;
            g.repair_dirty = true;
        }
    }
}

/// Picks `n` of `nodes` (in order of preference): first one per zone, then the next preferred.
fn spread_over_zones(nodes: &[&Node], n: usize) -> Vec<u64> {
    let mut chosen: Vec<u64> = Vec::with_capacity(n);
    let mut zones: HashSet<&str> = HashSet::new();
    for node in nodes {
        if chosen.len() < n && zones.insert(node.zone.as_str()) {
            chosen.push(node.id);
        }
    }
    for node in nodes {
        if chosen.len() < n && !chosen.contains(&node.id) {
            chosen.push(node.id);
        }
    }
    chosen
}

pub fn to_hash(b: &[u8]) -> Option<ChunkHash> {
    b.try_into().ok()
}

impl Cluster {
    pub fn new(dead_after: Duration) -> Cluster {
        let inner = Inner { limits: default_limits(), ..Inner::default() };
        Cluster { inner: Mutex::new(inner), dead_after, gc_grace: DEFAULT_GC_GRACE, kept_grace: DEFAULT_KEPT_GRACE }
    }

    pub fn kept_grace(&self) -> Duration {
        self.kept_grace
    }

    /// Sets how long the leader waits for a mount's KeepAlive (see [`DEFAULT_KEPT_GRACE`]).
    pub fn with_kept_grace(mut self, grace: Duration) -> Cluster {
        self.kept_grace = grace;
        self
    }

    /// A mount's KeepAlive (or a change by which it keeps a file): the files its session keeps
    /// stay.
    pub fn keep_alive(&self, keeper: u64, now: Instant) {
        self.lock().keepers.insert(keeper, now);
    }

    /// Forgets sessions not heard from for twice the grace (mounts that went away).
    pub fn forget_keepers(&self, now: Instant) {
        let grace = self.kept_grace;
        self.lock().keepers.retain(|_, t| now.duration_since(*t) < grace * 2);
    }

    /// Whether the files kept by `keeper` may be freed: this leader has not heard from the
    /// session for the kept grace, counted at the earliest from its election (before it, the
    /// mount renewed with another leader, which this one cannot know).
    pub fn keeper_gone(&self, keeper: u64, now: Instant) -> bool {
        let g = self.lock();
        let Some(since) = g.since else { return false };
        let last = g.keepers.get(&keeper).map_or(since, |t| (*t).max(since));
        now.duration_since(last) >= self.kept_grace
    }

    pub fn gc_grace(&self) -> Duration {
        self.gc_grace
    }

    /// Sets how long after its last placement an unreferenced chunk may be collected.
    pub fn with_gc_grace(mut self, grace: Duration) -> Cluster {
        self.gc_grace = grace;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("cluster lock is never poisoned: no panics while held")
    }

    fn alive(&self, n: &Node, now: Instant) -> bool {
        n.last_heartbeat.is_some_and(|t| now.duration_since(t) < self.dead_after)
    }

    /// Forgets everything learnt from chunkservers: called when this master becomes leader, since
    /// what it knew from an earlier term may be stale.
    pub fn reset(&self) {
        let mut g = self.lock();
        let nodes = std::mem::take(&mut g.nodes);
        let limits = g.limits;
        *g = Inner { limits, ..Inner::default() };
        // Keep the registry (addresses, zones) so status lists every known node; liveness restarts.
        g.nodes = nodes.into_values().map(|n| (n.id, Node { last_heartbeat: None, reserved: 0, ..n })).collect();
        g.since = Some(Instant::now());
    }

    /// Whether the chunk map is complete enough to act on: every known chunkserver reported (or
    /// had the time a live one needs to). Until then a missing location means "not reported
    /// yet", not "lost": nothing is declared under-replicated, and callers are asked to retry.
    pub fn settled(&self, now: Instant) -> bool {
        self.settled_locked(&self.lock(), now)
    }

    fn settled_locked(&self, g: &Inner, now: Instant) -> bool {
        let Some(since) = g.since else { return true };
        if now.duration_since(since) >= self.dead_after {
            return true;
        }
        let all = g.nodes.keys().all(|id| g.reported.contains(id));
        all && g.last_report.is_none_or(|t| now.duration_since(t) >= SETTLE_AFTER_REPORTS)
    }

    /// Adds registry entries read from the replicated state (no liveness).
    pub fn know(&self, id: u64, addr: &str, zone: &str, draining: bool) {
        let mut g = self.lock();
        entry(&mut g, id, addr, zone);
        mark_draining(&mut g, id, draining);
    }

    /// A node (re)registered: it is alive, and it will send a full report next.
    pub fn register(&self, id: u64, addr: &str, zone: &str, capacity: u64, used: u64) {
        let mut g = self.lock();
        let n = entry(&mut g, id, addr, zone);
        n.capacity = capacity;
        n.used = used;
        n.reserved = 0;
        n.last_heartbeat = Some(Instant::now());
        g.reported.remove(&id);
        g.partial.remove(&id);
    }

    /// Records a heartbeat. Returns None for a node this leader does not know (it must register),
    /// else the answer: whether a full report is wanted, the copy jobs and deletes for the node.
    pub fn heartbeat(&self, r: &HeartbeatRequest) -> Option<HeartbeatResponse> {
        let now = Instant::now();
        let mut g = self.lock();
        let id = r.node_id;
        let n = g.nodes.get_mut(&id)?;
        n.capacity = r.capacity_bytes;
        n.used = r.used_bytes;
        n.chunks = r.chunks;
        n.reserved = 0;
        n.last_heartbeat = Some(now);
        // A restarted node counts from zero again.
        let copied = n.copied.map_or(0, |c| r.copied_bytes.saturating_sub(c));
        n.copied = Some(r.copied_bytes);
        if copied > 0 {
            g.copied.push_back((now, copied));
        }
        while g.copied.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
            g.copied.pop_front();
        }
        for h in r.added.iter().filter_map(|h| to_hash(h)) {
            g.located(h, id);
            // Stored anew: whatever a client said of its old copy no longer applies.
            g.suspects.remove(&(h, id));
            if g.repairing.get(&h).is_some_and(|rep| rep.target == id) {
                g.repairing.remove(&h);
                // One copy at a time per chunk: one that lost more than one replica needs more.
                g.repair_dirty = true;
            }
        }
        g.expected.retain(|_, e| {
            e.retain(|(_, t)| now.duration_since(*t) < EXPECTED_FOR);
            !e.is_empty()
        });
        for h in r.copy_failed.iter().filter_map(|h| to_hash(h)) {
            if g.repairing.get(&h).is_some_and(|rep| rep.target == id) {
                g.repairing.remove(&h);
                g.repair_dirty = true;
            }
        }
        if !r.removed.is_empty() {
            g.repair_dirty = true;
        }
        for h in r.removed.iter().filter_map(|h| to_hash(h)) {
            g.unlocated(&h, id);
            g.deleted(&h, id);
        }
        let copy = g.repairing.values().filter(|rep| rep.target == id).map(|rep| rep.job.clone()).collect();
        let delete = g
            .deleting
            .iter()
            .filter(|(_, d)| d.nodes.contains(&id))
            .take(DELETES_PER_HEARTBEAT)
            .map(|(h, _)| h.to_vec())
            .collect();
        Some(HeartbeatResponse { report_requested: !g.reported.contains(&id), copy, delete, limits: Some(g.limits) })
    }

    /// The re-replication limits sent to chunkservers (the replicated setting, as last read).
    pub fn set_limits(&self, limits: RepairLimits) {
        self.lock().limits = limits;
    }

    /// Bytes per second copied by re-replication over the last few seconds.
    pub fn repair_rate(&self) -> u64 {
        let g = self.lock();
        g.copied.iter().map(|(_, b)| b).sum::<u64>() / RATE_WINDOW.as_secs().max(1)
    }

    /// Whether a repair scan is worth its cost: the set of live nodes changed since the last
    /// one, replicas were removed or reported bad, or copies are still in flight.
    pub fn repair_scan_needed(&self, now: Instant) -> bool {
        let g = self.lock();
        let live: BTreeSet<u64> = g.nodes.values().filter(|n| self.alive(n, now)).map(|n| n.id).collect();
        g.repair_dirty || !g.repairing.is_empty() || g.scanned_live.as_ref() != Some(&live)
    }

    /// Assigns copy jobs for chunks with fewer live replicas than their goal: the chunks with
    /// the fewest replicas left first; each to a live node that lacks it (another zone first,
    /// then the most free space), pulling from live holders; at most COPY_QUEUE_DEPTH times the
    /// `copies` limit assigned per target, and per first source in one round. Returns (under-replicated chunks,
    /// jobs assigned now).
    pub fn plan_repairs(&self, chunks: &[(ChunkHash, u32)], now: Instant) -> (usize, usize) {
        let mut g = self.lock();
        let live: BTreeSet<u64> = g.nodes.values().filter(|n| self.alive(n, now)).map(|n| n.id).collect();
        // A copy whose target died or that never finished is planned again.
        g.repairing.retain(|_, r| live.contains(&r.target) && now.duration_since(r.since) < REPAIR_TIMEOUT);
        let per_node = g.limits.copies.max(1) as usize * COPY_QUEUE_DEPTH;
        g.scanned_live = Some(live.clone());
        g.repair_dirty = false;
        let mut need: Vec<(usize, ChunkHash, Vec<u64>)> = Vec::new();
        let draining = |id: &u64| g.nodes.get(id).is_some_and(|n| n.draining);
        for (h, goal) in chunks {
            // Sources: every live good replica; toward the goal, those not being drained.
            let holders: Vec<u64> = g
                .locations
                .get(h)
                .map(|l| l.iter().copied().filter(|id| live.contains(id) && g.good(h, *id)).collect())
                .unwrap_or_default();
            let counted = holders.iter().filter(|id| !draining(id)).count();
            if !holders.is_empty() && counted < *goal as usize {
                need.push((counted, *h, holders));
            }
        }
        need.sort_by_key(|(n, _, _)| *n);
        let under = need.len();
        let mut load: HashMap<u64, usize> = HashMap::new();
        for r in g.repairing.values() {
            *load.entry(r.target).or_default() += 1;
        }
        let mut sources: HashMap<u64, usize> = HashMap::new();
        let mut assigned = 0;
        for (_, h, holders) in need {
            if g.repairing.contains_key(&h) {
                continue;
            }
            let zones: HashSet<&str> =
                holders.iter().filter_map(|id| g.nodes.get(id)).map(|n| n.zone.as_str()).collect();
            // Not any node that holds a copy, good or not, or that a commit named: it would find
            // the chunk there and do nothing.
            let located = g.locations.get(&h).map_or(&[][..], Vec::as_slice);
            let expected: Vec<u64> = g.expected_nodes(&h, now).collect();
            let holds = |id: u64| located.contains(&id) || expected.contains(&id);
            let target = g
                .nodes
                .values()
                .filter(|n| live.contains(&n.id) && !holds(n.id) && !n.draining)
                .filter(|n| !g.deleting.get(&h).is_some_and(|d| d.nodes.contains(&n.id)))
                .filter(|n| load.get(&n.id).copied().unwrap_or(0) < per_node)
                .filter(|n| n.free() >= cairn_proto::MAX_CHUNK + FREE_MARGIN)
                .max_by_key(|n| (!zones.contains(n.zone.as_str()), n.free(), std::cmp::Reverse(n.id)))
                .map(|n| n.id);
            let Some(target) = target else { continue };
            let mut srcs: Vec<u64> =
                holders.iter().copied().filter(|id| sources.get(id).copied().unwrap_or(0) < per_node).collect();
            if srcs.is_empty() {
                continue;
            }
            let fresh = |id: &u64| g.nodes.get(id).and_then(|n| n.last_heartbeat).map(|t| now.duration_since(t));
            srcs.sort_by_key(fresh);
            *sources.entry(srcs[0]).or_default() += 1;
            *load.entry(target).or_default() += 1;
            let job = CopyJob {
                hash: h.to_vec(),
                sources: srcs.iter().filter_map(|id| g.nodes.get(id)).map(|n| n.aref()).collect(),
            };
            g.repairing.insert(h, Repair { target, since: now, job });
            assigned += 1;
        }
        (under, assigned)
    }

    /// Every chunk some node is known to hold, for a collection round.
    pub fn located(&self) -> Vec<ChunkHash> {
        self.lock().locations.keys().copied().collect()
    }

    /// Garbage collection, step one. `orphans` are located chunks that the namespace did not
    /// reference at a read just before. Marks them as being collected, unless a client may still
    /// commit one: it was placed or said stored within the grace period and not committed since,
    /// or this master has led for less than that (its predecessor's placements are unknown to
    /// it). From the mark on, nobody can place or commit a marked chunk. `fence` is called under
    /// the same lock as the marking (and [`Cluster::confirm_commit`] proposes under it too): a
    /// namespace read after everything proposed before the fence is applied, that still finds no
    /// reference, proves a marked chunk garbage. Hand that to [`Cluster::collect`].
    pub fn mark_garbage<F>(
        &self,
        orphans: &[ChunkHash],
        now: Instant,
        fence: impl FnOnce() -> F,
    ) -> (Vec<ChunkHash>, F) {
        let mut g = self.lock();
        // Deletes to nodes that died are dropped (a node that comes back reports what it holds),
        // and so are marks a failed round left behind.
        let live: HashSet<u64> = g.nodes.values().filter(|n| self.alive(n, now)).map(|n| n.id).collect();
        g.deleting.retain(|_, d| {
            d.nodes.retain(|id| live.contains(id));
            !d.nodes.is_empty()
        });
        g.pending.retain(|_, p| p.until > now);
        let tenure = g.since.is_some_and(|s| now.duration_since(s) >= self.gc_grace);
        let mut marked = Vec::new();
        let mut waiting = 0;
        for h in orphans {
            if g.deleting.contains_key(h) {
                continue;
            }
            if !tenure || g.pending.contains_key(h) || g.repairing.contains_key(h) || marked.len() >= DELETE_BATCH {
                waiting += 1;
                continue;
            }
            g.deleting.insert(*h, Deleting { gc: true, nodes: HashSet::new() });
            marked.push(*h);
        }
        g.gc_waiting = waiting;
        let f = fence();
        (marked, f)
    }

    /// Garbage collection, step two: of the chunks [`Cluster::mark_garbage`] marked, `garbage`
    /// are still unreferenced and are deleted from every live holder; the others are unmarked.
    /// Returns the number of replicas to delete.
    pub fn collect(&self, marked: &[ChunkHash], garbage: &HashSet<ChunkHash>, now: Instant) -> usize {
        let mut g = self.lock();
        let mut replicas = 0;
        for h in marked {
            if !g.deleting.get(h).is_some_and(|d| d.gc) {
                // The mark went meanwhile (the node dropped, say): the chunk may be committed since.
                continue;
            }
            let holders: HashSet<u64> = if garbage.contains(h) {
                g.locations.get(h).map_or_else(HashSet::new, |l| {
                    l.iter().copied().filter(|id| g.nodes.get(id).is_some_and(|n| self.alive(n, now))).collect()
                })
            } else {
                HashSet::new()
            };
            replicas += holders.len();
            if holders.is_empty() {
                g.deleting.remove(h);
            } else {
                g.deleting.insert(*h, Deleting { gc: true, nodes: holders });
            }
        }
        replicas
    }

    /// Deletes surplus replicas: of each referenced chunk (hash, goal) with more good live
    /// replicas than its goal, keeps `goal` of them, spread over zones, then on the freshest and
    /// emptiest nodes, and deletes the rest. A chunk being copied or deleted is left alone.
    /// Returns the number of replicas to delete.
    pub fn plan_trims(&self, chunks: &[(ChunkHash, u32)], now: Instant) -> usize {
        let mut g = self.lock();
        let mut replicas = 0;
        for (h, goal) in chunks {
            if replicas >= DELETE_BATCH {
                break;
            }
            if g.repairing.contains_key(h) || g.deleting.contains_key(h) {
                continue;
            }
            let Some(l) = g.locations.get(h) else { continue };
            let good: Vec<&Node> = l
                .iter()
                .filter(|id| g.good(h, **id))
                .filter_map(|id| g.nodes.get(id))
                .filter(|n| self.alive(n, now))
                .collect();
            let goal = *goal as usize;
            // Replicas on draining nodes all go, but only once the goal is met without them.
            let (mut staying, leaving): (Vec<&Node>, Vec<&Node>) = good.iter().partition(|n| !n.draining);
            if staying.len() < goal || staying.len() == goal && leaving.is_empty() {
                continue;
            }
            let all: Vec<u64> = good.iter().map(|n| n.id).collect();
            let stale = |n: &Node| n.last_heartbeat.is_none_or(|t| now.duration_since(t) >= SUSPECT_AFTER);
            staying.sort_by(|a, b| stale(a).cmp(&stale(b)).then(b.free().cmp(&a.free())).then(a.id.cmp(&b.id)));
            let keep = spread_over_zones(&staying, goal);
            let drop: HashSet<u64> = all.into_iter().filter(|id| !keep.contains(id)).collect();
            if drop.is_empty() {
                continue;
            }
            replicas += drop.len();
            g.deleting.insert(*h, Deleting { gc: false, nodes: drop });
        }
        replicas
    }

    /// Balancing: when the fullest live node's usage (of its capacity) exceeds the emptiest's by
    /// more than [`BALANCE_SPREAD`], copies chunks from the fullest to the emptiest; the surplus
    /// replica this makes is then trimmed from the fuller node (trims keep the emptiest
    /// replicas). One batch at a time, only while no other copy is in flight, within the repair
    /// limits: client traffic and repairs go first. Returns the copies assigned.
    pub fn plan_balance(&self, chunks: &[(ChunkHash, u32)], now: Instant) -> usize {
        let mut g = self.lock();
        if !g.repairing.is_empty() {
            return 0;
        }
        let util = |n: &Node| if n.capacity == 0 { 1.0 } else { n.used as f64 / n.capacity as f64 };
        let nodes: Vec<&Node> =
            g.nodes.values().filter(|n| self.alive(n, now) && !n.draining && n.capacity > 0).collect();
        let (Some(full), Some(empty)) = (
            nodes.iter().max_by(|a, b| util(a).total_cmp(&util(b))),
            nodes.iter().min_by(|a, b| util(a).total_cmp(&util(b))),
        ) else {
            return 0;
        };
        let spread = util(full) - util(empty);
        if spread <= BALANCE_SPREAD || empty.free() < cairn_proto::MAX_CHUNK + FREE_MARGIN {
            return 0;
        }
        let (full, empty) = (full.id, empty.id);
        // Move half the difference, in chunks, at most a batch.
        let bytes = spread / 2.0 * g.nodes[&full].capacity.min(g.nodes[&empty].capacity) as f64;
        let batch = ((bytes / cairn_proto::MAX_CHUNK as f64).ceil() as usize)
            .clamp(1, g.limits.copies.max(1) as usize * COPY_QUEUE_DEPTH);
        let mut jobs = Vec::new();
        for (h, goal) in chunks {
            if jobs.len() >= batch {
                break;
            }
            let Some(l) = g.locations.get(h) else { continue };
            if !l.contains(&full) || l.contains(&empty) || g.deleting.contains_key(h) {
                continue;
            }
            let holders: Vec<u64> = l
                .iter()
                .copied()
                .filter(|id| g.good(h, *id) && g.nodes.get(id).is_some_and(|n| self.alive(n, now)))
                .collect();
            // Only healthy chunks move; the others are the repair's business.
            if holders.len() != *goal as usize || !holders.contains(&full) {
                continue;
            }
            let mut sources = vec![full];
            sources.extend(holders.iter().copied().filter(|id| *id != full));
            let job = CopyJob {
                hash: h.to_vec(),
                sources: sources.iter().filter_map(|id| g.nodes.get(id)).map(|n| n.aref()).collect(),
            };
            jobs.push((*h, job));
        }
        let n = jobs.len();
        for (h, job) in jobs {
            g.repairing.insert(h, Repair { target: empty, since: now, job });
        }
        n
    }

    /// Status: (replicas of unreferenced chunks waiting or being deleted, surplus replicas being
    /// deleted).
    pub fn delete_backlog(&self) -> (u64, u64) {
        let g = self.lock();
        let (mut gc, mut trim) = (g.gc_waiting as u64, 0);
        for d in g.deleting.values() {
            if d.gc {
                gc += d.nodes.len() as u64;
            } else {
                trim += d.nodes.len() as u64;
            }
        }
        (gc, trim)
    }

    /// Chunks being copied or waiting to be (status: the repair queue).
    pub fn repair_queue(&self) -> u64 {
        self.lock().repairing.len() as u64
    }

    /// One page of a full report; the last page replaces what was known of the node.
    pub fn report_page(&self, id: u64, report_id: u64, hashes: &[Vec<u8>], last: bool) -> Result<(), MetaError> {
        let mut g = self.lock();
        if !g.nodes.contains_key(&id) {
            return Err(MetaError::NotFound(format!("chunkserver {id} is not registered")));
        }
        let entry = g.partial.entry(id).or_insert_with(|| (report_id, HashSet::new()));
        if entry.0 != report_id {
            *entry = (report_id, HashSet::new());
        }
        entry.1.extend(hashes.iter().filter_map(|h| to_hash(h)));
        if last {
            let (_, set) = g.partial.remove(&id).expect("inserted above");
            g.locations.retain(|h, l| {
                if !set.contains(h) {
                    l.retain(|x| *x != id);
                }
                !l.is_empty()
            });
            g.expected.retain(|h, e| {
                if !set.contains(h) {
                    e.retain(|(x, _)| *x != id);
                }
                !e.is_empty()
            });
            let gone: Vec<ChunkHash> = g
                .deleting
                .iter()
                .filter(|(h, d)| d.nodes.contains(&id) && !set.contains(*h))
                .map(|(h, _)| *h)
                .collect();
            for h in gone {
                g.deleted(&h, id);
            }
            for h in set {
                g.located(h, id);
            }
            g.reported.insert(id);
            g.last_report = Some(Instant::now());
            g.suspects.retain(|(_, n)| *n != id);
        }
        Ok(())
    }

    /// The live nodes holding each chunk, as far as reports and commits tell.
    pub fn holders(&self, hashes: &[ChunkHash]) -> Vec<Vec<ChunkserverRef>> {
        let now = Instant::now();
        let g = self.lock();
        hashes
            .iter()
            .map(|h| {
                self.live_holders(&g, h, now).into_iter().filter_map(|id| g.nodes.get(&id)).map(Node::aref).collect()
            })
            .collect()
    }

    /// The live nodes holding `hash`: reported, then expected (see [`Inner::expected`]).
    fn live_holders(&self, g: &Inner, hash: &ChunkHash, now: Instant) -> Vec<u64> {
        let alive = |id: &u64| g.nodes.get(id).is_some_and(|n| self.alive(n, now));
        let mut ids: Vec<u64> =
            g.locations.get(hash).map_or_else(Vec::new, |l| l.iter().copied().filter(alive).collect());
        for id in g.expected_nodes(hash, now) {
            if alive(&id) && !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// Chooses targets for new chunks: `replication` distinct live nodes with room, the emptiest
    /// first, spread over zones where possible. A chunk already held by enough live nodes is
    /// reported as stored instead.
    pub fn place(
        &self,
        chunks: &[(ChunkHash, u64)],
        replication: usize,
        exclude: &[u64],
    ) -> Result<Vec<Option<Vec<ChunkserverRef>>>, MetaError> {
        let now = Instant::now();
        let mut g = self.lock();
        let mut out = Vec::with_capacity(chunks.len());
        for (hash, _) in chunks {
            if g.collecting(hash) {
                return Err(MetaError::Unavailable(format!(
                    "chunk {} is being garbage-collected; upload it again in a moment",
                    hex::encode(hash)
                )));
            }
        }
        for (hash, len) in chunks {
            // Whatever the answer, the client may commit this chunk now: keep it from collection.
            self.protect(&mut g, hash, now);
            // Only copies that stay count: not one being trimmed or reported bad, nor on a node
            // being drained.
            let staying = self
                .live_holders(&g, hash, now)
                .into_iter()
                .filter(|id| g.good(hash, *id) && g.nodes.get(id).is_some_and(|n| !n.draining))
                .count();
            if staying >= replication {
                out.push(None);
                continue;
            }
            // Not a node about to delete its copy of this chunk (a trim): the upload would find
            // the chunk there, and the delete would then take it away.
            let trimming = |id: u64| g.deleting.get(hash).is_some_and(|d| d.nodes.contains(&id));
            let mut candidates: Vec<&Node> = g
                .nodes
                .values()
                .filter(|n| self.alive(n, now) && !n.draining && !trimming(n.id) && n.free() >= len + FREE_MARGIN)
                .collect();
            // The client's exclusions are its experience, which can blame a healthy node for a
            // failure further down a chain: avoid them while enough others remain.
            if candidates.iter().filter(|n| !exclude.contains(&n.id)).count() >= replication {
                candidates.retain(|n| !exclude.contains(&n.id));
            }
            if candidates.len() < replication {
                let live = g.nodes.values().filter(|n| self.alive(n, now)).count();
                if !self.settled_locked(&g, now) {
                    return Err(MetaError::Unavailable("a new leader is waiting for chunkservers to report".into()));
                }
                return Err(MetaError::NotEnoughChunkservers(format!(
                    "{} of {live} live chunkservers have room for a chunk, replication {replication} asked",
                    candidates.len()
                )));
            }
            // Nodes that missed a couple of heartbeats are probably gone: place elsewhere while
            // enough fresh ones remain, instead of letting uploads time out on them.
            let fresh = |n: &Node| n.last_heartbeat.is_some_and(|t| now.duration_since(t) < SUSPECT_AFTER);
            if candidates.iter().filter(|n| fresh(n)).count() >= replication {
                candidates.retain(|n| fresh(n));
            }
            let excluded = |n: &Node| exclude.contains(&n.id);
            candidates
                .sort_by(|a, b| excluded(a).cmp(&excluded(b)).then(b.free().cmp(&a.free())).then(a.id.cmp(&b.id)));
            let chosen = spread_over_zones(&candidates, replication);
            let refs = chosen.iter().map(|id| g.nodes[id].aref()).collect();
            for id in &chosen {
                if let Some(n) = g.nodes.get_mut(id) {
                    n.reserved += len;
                }
            }
            if let Some(p) = g.pending.get_mut(hash) {
                p.targets = chosen;
            }
            out.push(Some(refs));
        }
        Ok(out)
    }

    /// Checks that every chunk of a commit is stored somewhere (or was just placed), turns the
    /// placements of those chunks into locations (their replicas acked before the client
    /// commits), and calls `propose` under the lock, so that the proposal is ordered before any
    /// later collection fence (see [`Cluster::mark_garbage`]).
    pub fn confirm_commit<R>(
        &self,
        hashes: &[ChunkHash],
        propose: impl FnOnce() -> Result<R, MetaError>,
    ) -> Result<R, MetaError> {
        let now = Instant::now();
        let mut g = self.lock();
        for h in hashes {
            if g.collecting(h) {
                return Err(MetaError::InvalidArgument(format!(
                    "chunk {} was garbage-collected: its upload began more than {} s ago; upload it again",
                    hex::encode(h),
                    self.gc_grace.as_secs()
                )));
            }
            // Reported, or named by a commit a moment ago (its holders report it soon).
            let known = g.locations.get(h).is_some_and(|l| !l.is_empty()) || g.expected_nodes(h, now).next().is_some();
            let pending = g.pending.get(h).is_some_and(|p| p.until > now);
            if !known && !pending {
                if !self.settled_locked(&g, now) {
                    // Placed by an earlier leader, perhaps: its holders have not reported yet.
                    return Err(MetaError::Unavailable(format!(
                        "chunk {} is not reported yet by a new leader's chunkservers",
                        hex::encode(h)
                    )));
                }
                return Err(MetaError::InvalidArgument(format!("chunk {} was never uploaded", hex::encode(h))));
            }
        }
        for h in hashes {
            let Some(p) = g.pending.get_mut(h) else { continue };
            let targets = std::mem::take(&mut p.targets);
            // This upload is done with its placement; others of the same chunk may not be.
            p.outstanding = p.outstanding.saturating_sub(1);
            if p.outstanding == 0 {
                g.pending.remove(h);
            }
            // Those targets acked the client, if it uploaded to them: readers may try them at once.
            let located = g.locations.get(h).cloned().unwrap_or_default();
            for id in targets.into_iter().filter(|id| !located.contains(id)) {
                let e = g.expected.entry(*h).or_default();
                e.retain(|(x, _)| *x != id);
                e.push((id, now));
            }
        }
        propose()
    }

    /// Records that a client was just told about `hash` (placed or stored): it may commit it
    /// within the grace period from now.
    fn protect(&self, g: &mut Inner, hash: &ChunkHash, now: Instant) {
        if g.pending.len() >= MAX_PENDING && !g.pending.contains_key(hash) {
            g.pending.retain(|_, p| p.until > now);
        }
        let p = g.pending.entry(*hash).or_insert_with(|| Pending { targets: Vec::new(), until: now, outstanding: 0 });
        p.until = now + self.gc_grace;
        p.outstanding = p.outstanding.saturating_add(1);
    }

    /// Replicas of a chunk for a reader: healthy nodes first (reported before expected), then
    /// suspect ones, dead ones last.
    pub fn replicas(&self, hash: &ChunkHash) -> Vec<ChunkserverRef> {
        let now = Instant::now();
        let g = self.lock();
        let reported = g.locations.get(hash).map_or(&[][..], Vec::as_slice);
        let expected = g.expected_nodes(hash, now).filter(|id| !reported.contains(id));
        let ids = reported.iter().map(|id| (*id, 0)).chain(expected.map(|id| (id, 1)));
        let mut v: Vec<(u8, &Node)> = ids
            .filter_map(|(id, least)| g.nodes.get(&id).map(|n| (least, n)))
            .map(|(least, n)| {
                let rank = match n.last_heartbeat.map(|t| now.duration_since(t)) {
                    _ if !g.good(hash, n.id) => 3,
                    Some(d) if d < SUSPECT_AFTER => least,
                    Some(d) if d < self.dead_after => 1,
                    _ => 2,
                };
                (rank, n)
            })
            .collect();
        // Spread reads: a random order among equally ranked replicas.
        let salt: u64 = rand::random();
        v.sort_by_key(|(rank, n)| (*rank, (n.id ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        v.into_iter().map(|(_, n)| n.aref()).collect()
    }

    /// A client found this replica bad. Its location stays (a client's word alone must not hide a
    /// chunk, shared by deduplication, from every reader) but readers try it last. The
    /// chunkserver itself checks the chunk when read and reports it removed if it is corrupt;
    /// its next full report clears the mark.
    pub fn suspect_replica(&self, hash: &ChunkHash, node: u64) {
        let mut g = self.lock();
        g.repair_dirty = true;
        if g.suspects.len() < MAX_PENDING {
            g.suspects.insert((*hash, node));
        }
    }

    pub fn live_count(&self, hash: &ChunkHash, now: Instant) -> usize {
        self.live_holders(&self.lock(), hash, now).len()
    }

    pub fn status(&self) -> Vec<ChunkserverStatus> {
        let now = Instant::now();
        let g = self.lock();
        g.nodes
            .values()
            .map(|n| ChunkserverStatus {
                id: n.id,
                addr: n.addr.clone(),
                zone: n.zone.clone(),
                state: match (self.alive(n, now), n.draining) {
                    (false, _) => "dead",
                    (true, true) => "draining",
                    (true, false) => "alive",
                }
                .into(),
                capacity_bytes: n.capacity,
                used_bytes: n.used,
                chunks: n.chunks,
                last_heartbeat_ms_ago: n.last_heartbeat.map_or(u64::MAX, |t| now.duration_since(t).as_millis() as u64),
                to_move: 0,
            })
            .collect()
    }

    /// Drops a node from the registry (it was stopped and removed): its replicas no longer
    /// count anywhere. If it ever comes back it registers as new.
    pub fn forget(&self, id: u64) {
        let mut g = self.lock();
        g.nodes.remove(&id);
        g.reported.remove(&id);
        g.partial.remove(&id);
        g.locations.retain(|_, l| {
            l.retain(|x| *x != id);
            !l.is_empty()
        });
        g.repairing.retain(|_, r| r.target != id);
        g.deleting.retain(|_, d| {
            d.nodes.remove(&id);
            !d.nodes.is_empty()
        });
        g.repair_dirty = true;
    }

    /// Whether the node is known and silent for longer than the dead timeout.
    pub fn is_dead(&self, id: u64) -> bool {
        let g = self.lock();
        g.nodes.get(&id).is_some_and(|n| !self.alive(n, Instant::now()))
    }

    /// Marks a node as draining (or not), as the replicated state says.
    pub fn set_draining(&self, id: u64, draining: bool) {
        mark_draining(&mut self.lock(), id, draining);
    }

    /// The draining nodes among `hash`'s holders (status: what a drain still has to move).
    pub fn draining_holders(&self, hash: &ChunkHash) -> Vec<u64> {
        let g = self.lock();
        g.locations.get(hash).map_or_else(Vec::new, |l| {
            l.iter().copied().filter(|id| g.nodes.get(id).is_some_and(|n| n.draining)).collect()
        })
    }

    pub fn any_draining(&self) -> bool {
        self.lock().nodes.values().any(|n| n.draining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(id: u64, added: &[ChunkHash], removed: &[ChunkHash]) -> HeartbeatRequest {
        HeartbeatRequest {
            node_id: id,
            capacity_bytes: 100 << 30,
            used_bytes: 0,
            chunks: 1,
            added: added.iter().map(|h| h.to_vec()).collect(),
            removed: removed.iter().map(|h| h.to_vec()).collect(),
            ..Default::default()
        }
    }

    fn cluster(n: u64) -> Cluster {
        let c = Cluster::new(DEFAULT_DEAD_AFTER);
        for id in 1..=n {
            c.register(id, &format!("127.0.0.1:{id}"), "z", 10 << 30, 0);
        }
        c
    }

    #[test]
    fn placement_spreads_and_refuses_too_few() {
        let c = cluster(4);
        let chunks: Vec<_> = (0..8u8).map(|i| ([i; 32], 4u64 << 20)).collect();
        let p = c.place(&chunks, 3, &[]).unwrap();
        let mut per_node = BTreeMap::new();
        for targets in p.iter().map(|t| t.as_ref().unwrap()) {
            let ids: HashSet<_> = targets.iter().map(|r| r.id).collect();
            assert_eq!(ids.len(), 3, "distinct targets");
            for id in ids {
                *per_node.entry(id).or_insert(0) += 1;
            }
        }
        assert_eq!(per_node.len(), 4, "every node gets chunks: {per_node:?}");
        assert!(matches!(c.place(&chunks[..1], 5, &[]), Err(MetaError::NotEnoughChunkservers(_))));
        // Exclusions are avoided while enough other nodes remain, and used as a last resort.
        let ids = |p: Vec<Option<Vec<ChunkserverRef>>>| -> Vec<u64> {
            let mut v: Vec<u64> = p[0].as_ref().unwrap().iter().map(|r| r.id).collect();
            v.sort();
            v
        };
        assert_eq!(ids(c.place(&[([9; 32], 1)], 3, &[2]).unwrap()), vec![1, 3, 4]);
        assert_eq!(ids(c.place(&[([9; 32], 1)], 3, &[1, 2]).unwrap()).len(), 3);
    }

    #[test]
    fn commit_needs_an_upload_and_known_chunks_are_not_placed_again() {
        let c = cluster(3);
        let h = [9u8; 32];
        assert!(c.confirm_commit(&[h], || Ok(())).is_err());
        c.place(&[(h, 10)], 3, &[]).unwrap();
        c.confirm_commit(&[h], || Ok(())).unwrap();
        assert_eq!(c.replicas(&h).len(), 3);
        // Committed again (another file, a new version) before its holders report it.
        c.confirm_commit(&[h], || Ok(())).unwrap();
        assert_eq!(c.place(&[(h, 10)], 3, &[]).unwrap(), vec![None]);
    }

    #[test]
    fn full_report_replaces_locations() {
        let c = cluster(2);
        c.report_page(1, 7, &[vec![1; 32]], false).unwrap();
        c.report_page(1, 7, &[vec![2; 32]], true).unwrap();
        assert_eq!(c.replicas(&[1; 32]).len(), 1);
        c.report_page(1, 8, &[vec![2; 32]], true).unwrap();
        assert!(c.replicas(&[1; 32]).is_empty());
        assert_eq!(c.heartbeat(&beat(1, &[], &[])).map(|r| r.report_requested), Some(false));
        assert_eq!(c.heartbeat(&beat(2, &[], &[])).map(|r| r.report_requested), Some(true));
        assert_eq!(c.heartbeat(&beat(99, &[], &[])), None);
    }

    /// A cluster whose leader has led for longer than the grace period.
    fn seasoned(n: u64, grace: Duration) -> Cluster {
        let c = cluster(n).with_gc_grace(grace);
        c.reset();
        for id in 1..=n {
            c.register(id, &format!("127.0.0.1:{id}"), &format!("z{id}"), 10 << 30, 0);
        }
        c.lock().since = Some(Instant::now() - grace - Duration::from_secs(1));
        c
    }

    fn deletes_for(c: &Cluster, id: u64) -> Vec<Vec<u8>> {
        c.heartbeat(&beat(id, &[], &[])).unwrap().delete
    }

    #[test]
    fn garbage_is_deleted_only_when_no_upload_can_still_commit_it() {
        let grace = Duration::from_secs(60);
        let c = seasoned(3, grace);
        let (old, fresh) = ([1u8; 32], [2u8; 32]);
        for id in 1..=3 {
            c.report_page(id, 1, &[old.to_vec(), fresh.to_vec()], true).unwrap();
        }
        // `fresh` was just offered to a client (already stored): it may be committed any moment.
        assert_eq!(c.place(&[(fresh, 10)], 3, &[]).unwrap(), vec![None]);
        let now = Instant::now();
        let (marked, ()) = c.mark_garbage(&[old, fresh], now, || ());
        assert_eq!(marked, vec![old], "a recently placed chunk is not collected");
        // From the mark on, nobody can place or commit the chunk being collected.
        assert!(matches!(c.place(&[(old, 10)], 3, &[]), Err(MetaError::Unavailable(_))));
        assert!(matches!(c.confirm_commit(&[old], || Ok(())), Err(MetaError::InvalidArgument(_))));
        assert_eq!(c.collect(&marked, &marked.iter().copied().collect(), now), 3);
        assert_eq!(deletes_for(&c, 1), vec![old.to_vec()]);
        // Deletes come again until reported done; each node's report clears its part.
        assert_eq!(deletes_for(&c, 1), vec![old.to_vec()]);
        for id in 1..=3 {
            c.heartbeat(&beat(id, &[], &[old])).unwrap();
        }
        assert!(deletes_for(&c, 1).is_empty());
        assert_eq!(c.delete_backlog(), (1, 0), "fresh still waits for its grace period");
        // Gone everywhere: the chunk can be uploaded again.
        assert!(c.place(&[(old, 10)], 3, &[]).unwrap()[0].is_some());
    }

    #[test]
    fn a_commit_ends_its_own_placements_protection_only() {
        let c = seasoned(3, Duration::from_secs(60));
        let h = [7u8; 32];
        for id in 1..=3 {
            c.report_page(id, 1, &[h.to_vec()], true).unwrap();
        }
        // Two uploads of the same content are told it is stored; one commits.
        c.place(&[(h, 10)], 3, &[]).unwrap();
        c.place(&[(h, 10)], 3, &[]).unwrap();
        let mut order = Vec::new();
        c.confirm_commit(&[h], || {
            order.push("proposed");
            Ok(())
        })
        .unwrap();
        assert_eq!(order, ["proposed"], "the proposal is sent under the check");
        assert!(c.mark_garbage(&[h], Instant::now(), || ()).0.is_empty(), "the other upload may still commit");
        c.confirm_commit(&[h], || Ok(())).unwrap();
        // Both committed: once the files go, the chunk is garbage at once.
        assert_eq!(c.mark_garbage(&[h], Instant::now(), || ()).0, vec![h]);
    }

    #[test]
    fn a_reference_that_appears_before_the_deletes_cancels_them() {
        let c = seasoned(3, Duration::from_secs(60));
        let h = [3u8; 32];
        c.report_page(1, 1, &[h.to_vec()], true).unwrap();
        let now = Instant::now();
        let (marked, ()) = c.mark_garbage(&[h], now, || ());
        assert_eq!(marked, vec![h]);
        // The read after marking found a file referencing it: unmarked, nothing deleted.
        assert_eq!(c.collect(&marked, &HashSet::new(), now), 0);
        assert!(deletes_for(&c, 1).is_empty());
        assert_eq!(c.place(&[(h, 10)], 1, &[]).unwrap(), vec![None]);
    }

    #[test]
    fn a_new_leader_collects_nothing_within_the_grace_period() {
        let c = cluster(1).with_gc_grace(Duration::from_secs(60));
        c.reset();
        c.report_page(1, 1, &[vec![4; 32]], true).unwrap();
        assert!(c.mark_garbage(&[[4; 32]], Instant::now(), || ()).0.is_empty());
        assert_eq!(c.delete_backlog(), (1, 0));
    }

    #[test]
    fn surplus_replicas_are_trimmed_keeping_zones_apart() {
        let c = seasoned(4, Duration::from_secs(60));
        // Nodes 1 and 2 share a zone; 3 and 4 have their own.
        c.register(2, "127.0.0.1:2", "z1", 10 << 30, 0);
        let h = [5u8; 32];
        for id in 1..=4 {
            c.report_page(id, 1, &[h.to_vec()], true).unwrap();
        }
        assert_eq!(c.plan_trims(&[(h, 3)], Instant::now()), 1);
        let trimmed: Vec<u64> = (1..=4).filter(|id| !deletes_for(&c, *id).is_empty()).collect();
        assert!(trimmed == vec![1] || trimmed == vec![2], "one of the two in zone z1 goes: {trimmed:?}");
        assert_eq!(c.delete_backlog(), (0, 1));
        assert_eq!(c.replicas(&h).last().map(|r| r.id), Some(trimmed[0]), "readers try it last");
        assert_eq!(c.plan_trims(&[(h, 3)], Instant::now()), 0, "nothing twice");
        // A node about to delete its copy is no target for the same chunk.
        assert_eq!(c.plan_repairs(&[(h, 4)], Instant::now()), (1, 0));
        c.heartbeat(&beat(trimmed[0], &[], &[h])).unwrap();
        assert_eq!(c.live_count(&h, Instant::now()), 3);
        assert_eq!(c.plan_trims(&[(h, 3)], Instant::now()), 0);
    }

    #[test]
    fn a_drained_nodes_replicas_are_copied_then_removed_never_below_the_goal() {
        let c = seasoned(4, Duration::from_secs(60));
        let h = [8u8; 32];
        for id in 1..=3 {
            c.report_page(id, 1, &[h.to_vec()], true).unwrap();
        }
        c.report_page(4, 1, &[], true).unwrap();
        c.set_draining(1, true);
        let now = Instant::now();
        // Nothing is trimmed while only two other replicas exist; a copy goes to node 4.
        assert_eq!(c.plan_trims(&[(h, 3)], now), 0);
        assert_eq!(c.plan_repairs(&[(h, 3)], now), (1, 1));
        assert_eq!(c.heartbeat(&beat(4, &[], &[])).unwrap().copy.len(), 1);
        assert!(c.heartbeat(&beat(1, &[], &[])).unwrap().copy.is_empty(), "a draining node gets no copies");
        assert!(c.place(&[([9; 32], 1)], 3, &[]).unwrap()[0].as_ref().unwrap().iter().all(|r| r.id != 1));
        c.heartbeat(&beat(4, &[h], &[])).unwrap();
        // Goal met without node 1: its replica goes, and only it.
        assert_eq!(c.plan_trims(&[(h, 3)], Instant::now()), 1);
        assert_eq!(deletes_for(&c, 1), vec![h.to_vec()]);
        assert_eq!(c.draining_holders(&h), vec![1]);
        c.heartbeat(&beat(1, &[], &[h])).unwrap();
        assert!(c.draining_holders(&h).is_empty());
        assert_eq!(c.live_count(&h, Instant::now()), 3);
    }

    #[test]
    fn a_failed_copy_is_planned_again_at_once() {
        let c = cluster(3);
        let h = [6u8; 32];
        c.report_page(1, 1, &[h.to_vec()], true).unwrap();
        let now = Instant::now();
        assert_eq!(c.plan_repairs(&[(h, 2)], now), (1, 1));
        let target = (2..=3).find(|id| !c.heartbeat(&beat(*id, &[], &[])).unwrap().copy.is_empty()).unwrap();
        assert_eq!(c.plan_repairs(&[(h, 2)], now).1, 0, "in flight");
        let mut failed = beat(target, &[], &[]);
        failed.copy_failed = vec![h.to_vec()];
        c.heartbeat(&failed).unwrap();
        assert!(c.repair_scan_needed(now));
        assert_eq!(c.plan_repairs(&[(h, 2)], now).1, 1);
    }

    #[test]
    fn lost_replicas_are_copied_fewest_left_first_within_limits() {
        let c = Cluster::new(Duration::from_secs(10));
        for id in 1..=4 {
            c.register(id, &format!("127.0.0.1:{id}"), "z", 100 << 30, 0);
        }
        // Chunk a on 1, 2 and 3; chunk b on 3 only... then node 3 stops heartbeating.
        let (a, b) = ([1u8; 32], [2u8; 32]);
        c.report_page(1, 1, &[a.to_vec()], true).unwrap();
        c.report_page(2, 1, &[a.to_vec()], true).unwrap();
        c.report_page(3, 1, &[a.to_vec(), b.to_vec()], true).unwrap();
        c.report_page(4, 1, &[b.to_vec()], true).unwrap();
        c.lock().nodes.get_mut(&3).unwrap().last_heartbeat = Some(Instant::now() - Duration::from_secs(11));
        let now = Instant::now();
        assert!(c.repair_scan_needed(now));
        let (under, assigned) = c.plan_repairs(&[(a, 3), (b, 3)], now);
        assert_eq!((under, assigned), (2, 2));
        assert!(!c.repair_scan_needed(now) || c.repair_queue() > 0);
        // b (one replica left) is copied to a node that lacks it, from node 4; a goes to node 4.
        let jobs4 = c.heartbeat(&beat(4, &[], &[])).unwrap().copy;
        let jobs1 = c.heartbeat(&beat(1, &[], &[])).unwrap().copy;
        let jobs2 = c.heartbeat(&beat(2, &[], &[])).unwrap().copy;
        let all: Vec<_> = jobs4.iter().chain(&jobs1).chain(&jobs2).collect();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(jobs4.iter().any(|j| j.hash == a.to_vec() && j.sources.iter().all(|s| s.id == 1 || s.id == 2)));
        assert!(jobs4.iter().all(|j| j.hash != b.to_vec()), "node 4 holds b already");
        assert_eq!(c.repair_queue(), 2);
        // Nothing is assigned twice while copies are in flight.
        assert_eq!(c.plan_repairs(&[(a, 3), (b, 3)], now).1, 0);
        // A job comes again until it is done; the target reports the copy: done.
        assert_eq!(c.heartbeat(&beat(4, &[], &[])).unwrap().copy, jobs4);
        c.heartbeat(&beat(4, &[a], &[])).unwrap();
        assert_eq!(c.repair_queue(), 1);
        assert_eq!(c.live_count(&a, Instant::now()), 3);
    }

    /// Two uploads of one chunk placed at once go to different nodes; the first to commit names
    /// the latest placement's nodes, which may never get the chunk. Those count for readers
    /// only: the nodes that report it are never trimmed in their favour.
    #[test]
    fn a_commit_naming_another_uploads_nodes_never_trims_the_real_copies() {
        let c = seasoned(6, Duration::from_secs(60));
        for id in 1..=6 {
            c.report_page(id, 1, &[], true).unwrap();
        }
        let h = [4u8; 32];
        let first: Vec<u64> = c.place(&[(h, 10)], 3, &[]).unwrap()[0].as_ref().unwrap().iter().map(|r| r.id).collect();
        let second = c.place(&[(h, 10)], 3, &first).unwrap()[0].clone().unwrap();
        assert!(second.iter().all(|r| !first.contains(&r.id)), "{first:?} then {second:?}");
        // The first upload commits; its nodes report the chunk. The second upload never happens.
        c.confirm_commit(&[h], || Ok(())).unwrap();
        for id in &first {
            c.heartbeat(&beat(*id, &[h], &[])).unwrap();
        }
        assert_eq!(c.replicas(&h).len(), 6, "readers may try every node named");
        assert_eq!(c.plan_trims(&[(h, 3)], Instant::now()), 0, "only reported copies count");
        for id in &first {
            assert!(deletes_for(&c, *id).is_empty());
        }
    }

    /// "Already stored" counts only copies that stay: not one being drained or trimmed.
    #[test]
    fn a_chunk_on_a_draining_node_is_not_stored_enough() {
        let c = seasoned(4, Duration::from_secs(60));
        let h = [5u8; 32];
        for id in 1..=3 {
            c.report_page(id, 1, &[h.to_vec()], true).unwrap();
        }
        assert_eq!(c.place(&[(h, 10)], 3, &[]).unwrap(), vec![None]);
        c.set_draining(1, true);
        let targets = c.place(&[(h, 10)], 3, &[]).unwrap()[0].clone().expect("uploaded again");
        assert!(targets.iter().all(|r| r.id != 1));
    }

    /// A removal reported between a collection's mark and its deletes leaves the mark: the chunk
    /// stays closed to uploads and commits until the collection decides.
    #[test]
    fn a_garbage_mark_outlives_a_removal_report() {
        let c = seasoned(3, Duration::from_secs(60));
        let h = [6u8; 32];
        for id in 1..=3 {
            c.report_page(id, 1, &[h.to_vec()], true).unwrap();
        }
        let now = Instant::now();
        let (marked, ()) = c.mark_garbage(&[h], now, || ());
        assert_eq!(marked, vec![h]);
        c.heartbeat(&beat(1, &[], &[h])).unwrap();
        assert!(matches!(c.place(&[(h, 10)], 3, &[]), Err(MetaError::Unavailable(_))));
        assert!(c.confirm_commit(&[h], || Ok(())).is_err());
        assert_eq!(c.collect(&marked, &marked.iter().copied().collect(), now), 2);
    }

    /// A node whose copy a client reported bad still holds it: a copy job there would find the
    /// chunk and do nothing, so the copy goes elsewhere.
    #[test]
    fn a_copy_never_goes_to_a_node_that_holds_the_chunk() {
        let c = seasoned(4, Duration::from_secs(60));
        let h = [7u8; 32];
        for id in 1..=3 {
            c.report_page(id, 1, &[h.to_vec()], true).unwrap();
        }
        c.report_page(4, 1, &[], true).unwrap();
        c.suspect_replica(&h, 3);
        assert_eq!(c.plan_repairs(&[(h, 3)], Instant::now()), (1, 1));
        assert_eq!(c.heartbeat(&beat(4, &[], &[])).unwrap().copy.len(), 1);
        assert!(c.heartbeat(&beat(3, &[], &[])).unwrap().copy.is_empty());
    }

    /// A node that finds a chunk damaged before it ever reported it reports it removed: readers
    /// are not sent there on the commit's word any more.
    #[test]
    fn a_removal_report_overrides_a_commits_word() {
        let c = cluster(3);
        let h = [8u8; 32];
        c.place(&[(h, 10)], 3, &[]).unwrap();
        c.confirm_commit(&[h], || Ok(())).unwrap();
        assert_eq!(c.live_count(&h, Instant::now()), 3);
        c.heartbeat(&beat(1, &[], &[h])).unwrap();
        assert!(c.replicas(&h).iter().all(|r| r.id != 1));
        assert_eq!(c.live_count(&h, Instant::now()), 2);
    }

    /// A chunk that lost two of its three replicas is copied twice, one copy after the other,
    /// without waiting for anything else to happen.
    #[test]
    fn a_chunk_short_of_two_replicas_gets_both() {
        let c = seasoned(4, Duration::from_secs(60));
        let h = [9u8; 32];
        c.report_page(1, 1, &[h.to_vec()], true).unwrap();
        for id in 2..=4 {
            c.report_page(id, 1, &[], true).unwrap();
        }
        let now = Instant::now();
        assert_eq!(c.plan_repairs(&[(h, 3)], now), (1, 1));
        let target = (2..=4).find(|id| !c.heartbeat(&beat(*id, &[], &[])).unwrap().copy.is_empty()).unwrap();
        c.heartbeat(&beat(target, &[h], &[])).unwrap();
        assert!(c.repair_scan_needed(Instant::now()), "the chunk still lacks a replica");
        assert_eq!(c.plan_repairs(&[(h, 3)], Instant::now()), (1, 1));
    }
}
