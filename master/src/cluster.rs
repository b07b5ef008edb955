//! Leader-only soft state: which chunkservers are alive, how full they are, and which of them hold
//! each chunk. None of it is in the Raft log (as in GFS): a new leader rebuilds it from
//! registrations, heartbeats and full chunk reports. Placement of new chunks is decided here.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_proto::v1::{ChunkserverRef, ChunkserverStatus, CopyJob};

use crate::error::MetaError;

pub type ChunkHash = [u8; 32];

/// How long a chunkserver may stay silent before placement and reads stop counting on it. Reads
/// still list it last, so a node that is only slow is not lost.
pub const DEFAULT_DEAD_AFTER: Duration = Duration::from_secs(10);
/// A node that missed this much is listed after the healthy replicas of a chunk.
const SUSPECT_AFTER: Duration = Duration::from_millis(2500);
/// Placements not yet committed stop counting as locations after this long.
const PENDING_TTL: Duration = Duration::from_secs(600);
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
}

impl Node {
    fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used).saturating_sub(self.reserved)
    }
    fn aref(&self) -> ChunkserverRef {
        ChunkserverRef { id: self.id, addr: self.addr.clone() }
    }
}

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<u64, Node>,
    locations: HashMap<ChunkHash, Vec<u64>>,
    /// Uploads placed but not yet committed: hash -> (targets, when).
    pending: HashMap<ChunkHash, (Vec<u64>, Instant)>,
    /// Replicas a client reported bad: (chunk, node), served last.
    suspects: HashSet<(ChunkHash, u64)>,
    /// Nodes whose full report this leader has received.
    reported: HashSet<u64>,
    /// Full reports being received page by page: node -> (report id, hashes so far).
    partial: HashMap<u64, (u64, HashSet<ChunkHash>)>,
    /// When this master became leader (the last reset).
    since: Option<Instant>,
    /// When the last full report completed.
    last_report: Option<Instant>,
    /// Re-replication: copy jobs waiting for their target's next heartbeat, by target...
    jobs: HashMap<u64, Vec<CopyJob>>,
    /// ...and every chunk being copied: (target, when assigned).
    repairing: HashMap<ChunkHash, (u64, Instant)>,
    /// The live nodes at the last repair scan: a change (a death) calls for a new scan.
    scanned_live: Option<BTreeSet<u64>>,
    /// Something besides a death may have lost replicas (removals, bad replicas).
    repair_dirty: bool,
}

/// Copies a node receives at once, and new copies it is the first source of per planning round.
pub const REPAIR_PER_NODE: usize = 16;
/// A copy not reported done after this long is assigned again.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(60);

/// After every known chunkserver has sent its full report, wait this long more (a heartbeat and a
/// half) for the chunks written just before the leader changed, which arrive in heartbeats.
const SETTLE_AFTER_REPORTS: Duration = Duration::from_millis(1500);

pub struct Cluster {
    inner: Mutex<Inner>,
    dead_after: Duration,
}

pub fn to_hash(b: &[u8]) -> Option<ChunkHash> {
    b.try_into().ok()
}

impl Cluster {
    pub fn new(dead_after: Duration) -> Cluster {
        Cluster { inner: Mutex::new(Inner::default()), dead_after }
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
        *g = Inner::default();
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
    pub fn know(&self, id: u64, addr: &str, zone: &str) {
        let mut g = self.lock();
        let n = g.nodes.entry(id).or_insert_with(|| Node {
            id,
            addr: addr.into(),
            zone: zone.into(),
            capacity: 0,
            used: 0,
            chunks: 0,
            reserved: 0,
            last_heartbeat: None,
        });
        n.addr = addr.into();
        n.zone = zone.into();
    }

    /// A node (re)registered: it is alive, and it will send a full report next.
    pub fn register(&self, id: u64, addr: &str, zone: &str, capacity: u64, used: u64) {
        self.know(id, addr, zone);
        let mut g = self.lock();
        g.reported.remove(&id);
        g.partial.remove(&id);
        if let Some(n) = g.nodes.get_mut(&id) {
            n.capacity = capacity;
            n.used = used;
            n.reserved = 0;
            n.last_heartbeat = Some(Instant::now());
        }
    }

    /// Records a heartbeat. Returns None for a node this leader does not know (it must register),
    /// else whether a full report is wanted.
    pub fn heartbeat(
        &self,
        id: u64,
        capacity: u64,
        used: u64,
        chunks: u64,
        added: &[Vec<u8>],
        removed: &[Vec<u8>],
    ) -> Option<(bool, Vec<CopyJob>)> {
        let mut g = self.lock();
        let n = g.nodes.get_mut(&id)?;
        n.capacity = capacity;
        n.used = used;
        n.chunks = chunks;
        n.reserved = 0;
        n.last_heartbeat = Some(Instant::now());
        for h in added.iter().filter_map(|h| to_hash(h)) {
            let l = g.locations.entry(h).or_default();
            if !l.contains(&id) {
                l.push(id);
            }
            if g.repairing.get(&h).is_some_and(|(t, _)| *t == id) {
                g.repairing.remove(&h);
            }
        }
        if !removed.is_empty() {
            g.repair_dirty = true;
        }
        for h in removed.iter().filter_map(|h| to_hash(h)) {
            if let Some(l) = g.locations.get_mut(&h) {
                l.retain(|x| *x != id);
                if l.is_empty() {
                    g.locations.remove(&h);
                }
            }
        }
        let jobs = g.jobs.remove(&id).unwrap_or_default();
        Some((!g.reported.contains(&id), jobs))
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
    /// then the most free space), pulling from live holders; at most REPAIR_PER_NODE copies in
    /// flight per target, and per first source in one round. Returns (under-replicated chunks,
    /// jobs assigned now).
    pub fn plan_repairs(&self, chunks: &[(ChunkHash, u32)], now: Instant) -> (usize, usize) {
        let mut g = self.lock();
        g.repairing.retain(|_, (_, t)| now.duration_since(*t) < REPAIR_TIMEOUT);
        let live: BTreeSet<u64> = g.nodes.values().filter(|n| self.alive(n, now)).map(|n| n.id).collect();
        g.scanned_live = Some(live.clone());
        g.repair_dirty = false;
        let mut need: Vec<(usize, ChunkHash, Vec<u64>)> = Vec::new();
        for (h, goal) in chunks {
            let holders: Vec<u64> = g
                .locations
                .get(h)
                .map(|l| l.iter().copied().filter(|id| live.contains(id) && !g.suspects.contains(&(*h, *id))).collect())
                .unwrap_or_default();
            if !holders.is_empty() && holders.len() < *goal as usize {
                need.push((holders.len(), *h, holders));
            }
        }
        need.sort_by_key(|(n, _, _)| *n);
        let under = need.len();
        let mut load: HashMap<u64, usize> = HashMap::new();
        for (t, _) in g.repairing.values() {
            *load.entry(*t).or_default() += 1;
        }
        let mut sources: HashMap<u64, usize> = HashMap::new();
        let mut assigned = 0;
        for (_, h, holders) in need {
            if g.repairing.contains_key(&h) {
                continue;
            }
            let zones: HashSet<&str> =
                holders.iter().filter_map(|id| g.nodes.get(id)).map(|n| n.zone.as_str()).collect();
            let target = g
                .nodes
                .values()
                .filter(|n| live.contains(&n.id) && !holders.contains(&n.id))
                .filter(|n| load.get(&n.id).copied().unwrap_or(0) < REPAIR_PER_NODE)
                .filter(|n| n.free() >= cairn_proto::MAX_CHUNK + FREE_MARGIN)
                .max_by_key(|n| (!zones.contains(n.zone.as_str()), n.free(), std::cmp::Reverse(n.id)))
                .map(|n| n.id);
            let Some(target) = target else { continue };
            let mut srcs: Vec<u64> =
                holders.iter().copied().filter(|id| sources.get(id).copied().unwrap_or(0) < REPAIR_PER_NODE).collect();
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
            g.jobs.entry(target).or_default().push(job);
            g.repairing.insert(h, (target, now));
            assigned += 1;
        }
        (under, assigned)
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
            for h in set {
                let l = g.locations.entry(h).or_default();
                if !l.contains(&id) {
                    l.push(id);
                }
            }
            g.reported.insert(id);
            g.last_report = Some(Instant::now());
            g.suspects.retain(|(_, n)| *n != id);
        }
        Ok(())
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
        for (hash, len) in chunks {
            let live_holders = g
                .locations
                .get(hash)
                .map_or(0, |l| l.iter().filter(|id| g.nodes.get(id).is_some_and(|n| self.alive(n, now))).count());
            if live_holders >= replication {
                out.push(None);
                continue;
            }
            let mut candidates: Vec<&Node> = g
                .nodes
                .values()
                .filter(|n| self.alive(n, now) && !exclude.contains(&n.id) && n.free() >= len + FREE_MARGIN)
                .collect();
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
            candidates.sort_by(|a, b| b.free().cmp(&a.free()).then(a.id.cmp(&b.id)));
            let mut chosen: Vec<u64> = Vec::with_capacity(replication);
            let mut zones: HashSet<&str> = HashSet::new();
            // First pass: one node per zone; second: fill up with the emptiest remaining.
            for n in &candidates {
                if chosen.len() < replication && zones.insert(n.zone.as_str()) {
                    chosen.push(n.id);
                }
            }
            for n in &candidates {
                if chosen.len() < replication && !chosen.contains(&n.id) {
                    chosen.push(n.id);
                }
            }
            let refs = chosen.iter().map(|id| g.nodes[id].aref()).collect();
            for id in &chosen {
                if let Some(n) = g.nodes.get_mut(id) {
                    n.reserved += len;
                }
            }
            if g.pending.len() >= MAX_PENDING {
                g.pending.retain(|_, (_, t)| now.duration_since(*t) < PENDING_TTL);
            }
            g.pending.insert(*hash, (chosen, now));
            out.push(Some(refs));
        }
        Ok(out)
    }

    /// Checks that every chunk of a commit is stored somewhere (or was just placed), and turns the
    /// placements of those chunks into locations: their replicas acked before the client commits.
    pub fn confirm_commit(&self, hashes: &[ChunkHash]) -> Result<(), MetaError> {
        let now = Instant::now();
        let mut g = self.lock();
        for h in hashes {
            let known = g.locations.get(h).is_some_and(|l| !l.is_empty());
            let pending = g.pending.get(h).is_some_and(|(_, t)| now.duration_since(*t) < PENDING_TTL);
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
            if let Some((targets, _)) = g.pending.remove(h) {
                let l = g.locations.entry(*h).or_default();
                for id in targets {
                    if !l.contains(&id) {
                        l.push(id);
                    }
                }
            }
        }
        Ok(())
    }

    /// Replicas of a chunk for a reader: healthy nodes first, then suspect ones, dead ones last.
    pub fn replicas(&self, hash: &ChunkHash) -> Vec<ChunkserverRef> {
        let now = Instant::now();
        let g = self.lock();
        let Some(l) = g.locations.get(hash) else {
            return vec![];
        };
        let mut v: Vec<(u8, &Node)> = l
            .iter()
            .filter_map(|id| g.nodes.get(id))
            .map(|n| {
                let rank = match n.last_heartbeat.map(|t| now.duration_since(t)) {
                    _ if g.suspects.contains(&(*hash, n.id)) => 3,
                    Some(d) if d < SUSPECT_AFTER => 0,
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

    /// A replica a client found bad: stop sending readers there until the node reports again.
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
        let g = self.lock();
        g.locations
            .get(hash)
            .map_or(0, |l| l.iter().filter(|id| g.nodes.get(id).is_some_and(|n| self.alive(n, now))).count())
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
                state: if self.alive(n, now) { "alive" } else { "dead" }.into(),
                capacity_bytes: n.capacity,
                used_bytes: n.used,
                chunks: n.chunks,
                last_heartbeat_ms_ago: n.last_heartbeat.map_or(u64::MAX, |t| now.duration_since(t).as_millis() as u64),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn commit_needs_an_upload_and_known_chunks_are_not_placed_again() {
        let c = cluster(3);
        let h = [9u8; 32];
        assert!(c.confirm_commit(&[h]).is_err());
        c.place(&[(h, 10)], 3, &[]).unwrap();
        c.confirm_commit(&[h]).unwrap();
        assert_eq!(c.replicas(&h).len(), 3);
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
        assert_eq!(c.heartbeat(1, 1, 0, 1, &[], &[]).map(|r| r.0), Some(false));
        assert_eq!(c.heartbeat(2, 1, 0, 0, &[], &[]).map(|r| r.0), Some(true));
        assert_eq!(c.heartbeat(99, 1, 0, 0, &[], &[]), None);
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
        let (_, jobs4) = c.heartbeat(4, 100 << 30, 0, 1, &[], &[]).unwrap();
        let (_, jobs1) = c.heartbeat(1, 100 << 30, 0, 1, &[], &[]).unwrap();
        let (_, jobs2) = c.heartbeat(2, 100 << 30, 0, 1, &[], &[]).unwrap();
        let all: Vec<_> = jobs4.iter().chain(&jobs1).chain(&jobs2).collect();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(jobs4.iter().any(|j| j.hash == a.to_vec() && j.sources.iter().all(|s| s.id == 1 || s.id == 2)));
        assert!(jobs4.iter().all(|j| j.hash != b.to_vec()), "node 4 holds b already");
        assert_eq!(c.repair_queue(), 2);
        // Nothing is assigned twice while copies are in flight.
        assert_eq!(c.plan_repairs(&[(a, 3), (b, 3)], now).1, 0);
        // The target reports the copy: done.
        c.heartbeat(4, 100 << 30, 0, 2, &[a.to_vec()], &[]).unwrap();
        assert_eq!(c.repair_queue(), 1);
        assert_eq!(c.live_count(&a, Instant::now()), 3);
    }
}
