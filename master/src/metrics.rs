//! The master's Prometheus metrics (`cairn_master_*`). Counters and histograms are updated where
//! the work happens: proposals in [`crate::node::Node::propose`], gRPC calls and heartbeats in the
//! services. Gauges are read at scrape time ([`Metrics::refresh`]): the Raft state from the
//! driver's status, and on the leader its soft state about chunkservers and chunk health. Chunk
//! health walks every chunk, so it is recomputed at most once per [`HEALTH_EVERY`], however often
//! the endpoint is scraped; a follower reports zeros there (the leader's numbers are the truth).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_common::metrics::set_gauge;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::cluster::Cluster;
use crate::node::Node;
use crate::state::State;

/// The slowest rate at which scrapes may walk every chunk for health gauges.
pub const HEALTH_EVERY: Duration = Duration::from_secs(1);

type MethodCode = [(&'static str, &'static str); 2];
type Method = [(&'static str, &'static str); 1];
type NodeState = [(&'static str, &'static str); 1];

fn latency_histogram() -> Histogram {
    Histogram::new(cairn_common::metrics::latency_buckets())
}

pub struct Metrics {
    proposals_committed: Counter,
    lease_reads: Counter,
    proposal_duration: Histogram,
    grpc_requests: Family<MethodCode, Counter>,
    grpc_duration: Family<Method, Histogram, fn() -> Histogram>,
    heartbeats: Counter,
    raft_term: Gauge,
    raft_commit_index: Gauge,
    raft_applied_index: Gauge,
    raft_leader: Gauge,
    chunkservers: Family<NodeState, Gauge>,
    chunks: Gauge,
    under_replicated: Gauge,
    over_replicated: Gauge,
    lost: Gauge,
    repair_queue: Gauge,
    repair_rate: Gauge,
    gc_backlog: Gauge,
    trim_queue: Gauge,
    /// When chunk health was last computed.
    health_at: Mutex<Option<Instant>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            proposals_committed: Counter::default(),
            lease_reads: Counter::default(),
            proposal_duration: latency_histogram(),
            grpc_requests: Family::default(),
            grpc_duration: Family::new_with_constructor(latency_histogram),
            heartbeats: Counter::default(),
            raft_term: Gauge::default(),
            raft_commit_index: Gauge::default(),
            raft_applied_index: Gauge::default(),
            raft_leader: Gauge::default(),
            chunkservers: Family::default(),
            chunks: Gauge::default(),
            under_replicated: Gauge::default(),
            over_replicated: Gauge::default(),
            lost: Gauge::default(),
            repair_queue: Gauge::default(),
            repair_rate: Gauge::default(),
            gc_backlog: Gauge::default(),
            trim_queue: Gauge::default(),
            health_at: Mutex::new(None),
        }
    }
}

/// The canonical name of a gRPC status code, as the gRPC specification spells it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

impl Metrics {
    /// A mutation proposed here was committed and applied, `took` after it was proposed.
    pub(crate) fn proposal_committed(&self, took: Duration) {
        self.proposals_committed.inc();
        self.proposal_duration.observe(took.as_secs_f64());
    }

    /// A read served under the leader's lease, without a ReadIndex round.
    pub(crate) fn lease_read(&self) {
        self.lease_reads.inc();
    }

    /// One gRPC call of `method` (a fixed name from the .proto, so labels stay few) answered with
    /// `code`; `took` is None for a stream, whose length is a connection's, not a request's.
    pub(crate) fn grpc(&self, method: &'static str, code: tonic::Code, took: Option<Duration>) {
        self.grpc_requests.get_or_create(&[("method", method), ("code", code_name(code))]).inc();
        if let Some(took) = took {
            self.grpc_duration.get_or_create(&[("method", method)]).observe(took.as_secs_f64());
        }
    }

    /// The leader took a chunkserver's heartbeat.
    pub(crate) fn heartbeat(&self) {
        self.heartbeats.inc();
    }

    /// Adds every metric to `registry` (prefix it with `cairn_master`).
    pub fn register(&self, r: &mut Registry) {
        r.register("raft_term", "Current Raft term of this master", self.raft_term.clone());
        r.register("raft_commit_index", "Highest Raft log index known committed", self.raft_commit_index.clone());
        r.register("raft_applied_index", "Highest Raft log index applied here", self.raft_applied_index.clone());
        r.register(
            "lease_reads",
            "Reads served under the leader lease, without a ReadIndex round",
            self.lease_reads.clone(),
        );
        r.register("raft_leader", "1 if this master is the serving leader, else 0", self.raft_leader.clone());
        r.register(
            "proposals_committed",
            "Mutations proposed by this master that were committed and applied",
            self.proposals_committed.clone(),
        );
        r.register(
            "proposal_duration_seconds",
            "Time from proposing a mutation to its applied answer",
            self.proposal_duration.clone(),
        );
        r.register("grpc_requests", "gRPC calls handled, by method and status code", self.grpc_requests.clone());
        r.register(
            "grpc_request_duration_seconds",
            "Time to answer a unary or snapshot gRPC call, by method",
            self.grpc_duration.clone(),
        );
        r.register("heartbeats_received", "Chunkserver heartbeats taken as leader", self.heartbeats.clone());
        r.register(
            "chunkservers",
            "Chunkservers by state, as the leader sees them (0 on followers)",
            self.chunkservers.clone(),
        );
        r.register("chunks", "Chunks referenced by files (leader only)", self.chunks.clone());
        r.register(
            "chunks_under_replicated",
            "Chunks with fewer live replicas than their goal, not lost (leader only)",
            self.under_replicated.clone(),
        );
        r.register(
            "chunks_over_replicated",
            "Chunks with more live replicas than their goal (leader only)",
            self.over_replicated.clone(),
        );
        r.register("chunks_lost", "Chunks with no live replica (leader only)", self.lost.clone());
        r.register(
            "repair_queue_chunks",
            "Chunks being copied back to their replication goal (leader only)",
            self.repair_queue.clone(),
        );
        r.register(
            "repair_rate_bytes_per_second",
            "Bytes per second copied by re-replication over the last seconds (leader only)",
            self.repair_rate.clone(),
        );
        r.register(
            "gc_backlog_replicas",
            "Replicas of unreferenced chunks waiting to be or being deleted (leader only)",
            self.gc_backlog.clone(),
        );
        r.register("trim_queue_replicas", "Surplus replicas being deleted (leader only)", self.trim_queue.clone());
    }

    /// Brings the gauges up to date; called before each scrape, off the async runtime.
    pub(crate) fn refresh(&self, node: &Node, state: &State, cluster: &Cluster) {
        let s = node.status();
        set_gauge(&self.raft_term, s.term);
        set_gauge(&self.raft_commit_index, s.commit_index);
        set_gauge(&self.raft_applied_index, s.applied_index);
        let leader = node.ensure_leader().is_ok();
        self.raft_leader.set(i64::from(leader));
        let now = Instant::now();
        let (mut alive, mut dead) = (0, 0);
        if leader {
            for c in cluster.status() {
                if c.state == "alive" {
                    alive += 1;
                } else {
                    dead += 1;
                }
            }
        }
        self.chunkservers.get_or_create(&[("state", "alive")]).set(alive);
        self.chunkservers.get_or_create(&[("state", "dead")]).set(dead);
        if !leader {
            for g in self.leader_gauges() {
                g.set(0);
            }
            return;
        }
        {
            let mut at = self.health_at.lock().expect("health lock is never poisoned");
            if at.is_some_and(|t| now.duration_since(t) < HEALTH_EVERY) {
                return;
            }
            *at = Some(now);
        }
        match crate::service::chunk_health(state, cluster) {
            Ok(h) => {
                set_gauge(&self.chunks, h.total);
                set_gauge(&self.under_replicated, h.under_replicated);
                set_gauge(&self.over_replicated, h.over_replicated);
                set_gauge(&self.lost, h.lost);
                set_gauge(&self.repair_queue, h.repair_queue);
                set_gauge(&self.repair_rate, h.repair_bytes_per_s);
                set_gauge(&self.gc_backlog, h.gc_backlog);
                set_gauge(&self.trim_queue, h.trim_queue);
            }
            Err(e) => tracing::warn!("metrics: chunk health: {e}"),
        }
    }

    fn leader_gauges(&self) -> [&Gauge; 8] {
        [
            &self.chunks,
            &self.under_replicated,
            &self.over_replicated,
            &self.lost,
            &self.repair_queue,
            &self.repair_rate,
            &self.gc_backlog,
            &self.trim_queue,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_units_and_labels() {
        let m = Metrics::default();
        let mut r = Registry::with_prefix("cairn_master");
        m.register(&mut r);
        m.proposal_committed(Duration::from_millis(3));
        m.grpc("Stat", tonic::Code::Ok, Some(Duration::from_micros(200)));
        m.grpc("Stat", tonic::Code::Unavailable, Some(Duration::from_micros(200)));
        m.grpc("Stream", tonic::Code::Ok, None);
        m.heartbeat();
        let text = cairn_common::metrics::Exporter::new(r).render();
        for line in [
            "cairn_master_proposals_committed_total 1",
            "cairn_master_proposal_duration_seconds_count 1",
            "cairn_master_grpc_requests_total{method=\"Stat\",code=\"OK\"} 1",
            "cairn_master_grpc_requests_total{method=\"Stat\",code=\"UNAVAILABLE\"} 1",
            "cairn_master_grpc_requests_total{method=\"Stream\",code=\"OK\"} 1",
            "cairn_master_grpc_request_duration_seconds_count{method=\"Stat\"} 2",
            "cairn_master_heartbeats_received_total 1",
            "cairn_master_raft_leader 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        assert!(!text.contains("duration_seconds_count{method=\"Stream\"}"), "streams are not timed");
    }
}
