//! The heartbeat worker: registers this node with the master leader, sends a full chunk report,
//! then a heartbeat every second with capacity, usage and the chunks added or removed since the
//! previous one. It follows the leader (a follower refuses with UNAVAILABLE and the leader's
//! address in [`LEADER_HINT_KEY`]), retries every failure with bounded backoff, and never exits
//! before shutdown: the data path keeps serving whether or not a master is reachable.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_common::tls::Identity;
use cairn_proto::v1::cluster_client::ClusterClient;
use cairn_proto::v1::{ChunkReportRequest, ChunkserverRef, CopyJob, HeartbeatRequest, RegisterRequest, RepairLimits};
use cairn_proto::LEADER_HINT_KEY;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::metrics::Metrics;
use crate::store::{ChunkHash, ChunkStore};

/// How this node presents itself to the masters, and how often it reports.
#[derive(Clone, Debug)]
pub struct HeartbeatConfig {
    /// "host:port" of the masters' gRPC endpoints; tried in order, then wherever hints point.
    pub masters: Vec<String>,
    /// The data-plane address clients and peers reach this node at.
    pub addr: String,
    pub zone: String,
    pub interval: Duration,
    /// Hashes per ChunkReport page.
    pub report_page: usize,
    /// Hashes of each kind (added, removed) per heartbeat; the rest waits for the next one.
    pub max_changes: usize,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub backoff_max: Duration,
    /// The node's QUIC endpoint, to pull chunks for re-replication jobs (None: jobs are ignored).
    pub endpoint: Option<quinn::Endpoint>,
    /// Where heartbeats, copies and deletes are counted; its copied-bytes counter also goes to
    /// the master with every heartbeat.
    pub metrics: Arc<Metrics>,
}

impl HeartbeatConfig {
    pub fn new(masters: Vec<String>, addr: String, zone: String) -> HeartbeatConfig {
        HeartbeatConfig {
            masters,
            addr,
            zone,
            interval: Duration::from_secs(1),
            report_page: 8192,
            max_changes: 16384,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            backoff_max: Duration::from_millis(500),
            endpoint: None,
            metrics: Arc::default(),
        }
    }
}

const COPY_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the master's re-replication jobs: pulls each chunk from a source over QUIC and stores it
/// (the store verifies the hash and makes it durable); the next heartbeat reports it added, or
/// failed. Jobs wait in a queue and `copies` workers take the next one as soon as they finish
/// one, so copying does not pause between heartbeats. The master's limits bound the workers and
/// their bandwidth.
#[derive(Clone)]
struct Copier {
    pool: Arc<crate::quic::Pool>,
    store: ChunkStore,
    queue: Arc<Mutex<CopyQueue>>,
    failed: Arc<Mutex<Vec<[u8; 32]>>>,
    /// Counts copies; its bytes stored by copies since start go to the master, which derives the
    /// repair rate from them.
    metrics: Arc<Metrics>,
    pace: Arc<crate::pace::Pace>,
    copies: Arc<AtomicUsize>,
}

#[derive(Default)]
struct CopyQueue {
    jobs: std::collections::VecDeque<CopyJob>,
    /// Chunks queued or being copied: the master sends a job again until it is reported.
    known: HashSet<[u8; 32]>,
    workers: usize,
}

/// Jobs a node holds at once; the master sends at most a few times the copy limit anyway.
const COPY_QUEUE_MAX: usize = 4096;

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Copier {
    fn new(pool: crate::quic::Pool, store: ChunkStore, metrics: Arc<Metrics>) -> Copier {
        Copier {
            pool: Arc::new(pool),
            store,
            queue: Default::default(),
            failed: Default::default(),
            metrics,
            pace: Arc::new(crate::pace::Pace::new(0)),
            copies: Arc::new(AtomicUsize::new(1)),
        }
    }

    /// Queues the jobs not already queued or running, and starts workers up to the limit.
    fn submit(&self, jobs: Vec<CopyJob>, limits: Option<RepairLimits>) {
        if let Some(l) = limits {
            self.pace.set_rate(l.rate_bytes);
            self.copies.store(l.copies.max(1) as usize, Ordering::Relaxed);
        }
        let start = {
            let mut q = locked(&self.queue);
            for job in jobs {
                let Some(hash) = ChunkHash::from_slice(&job.hash) else { continue };
                if q.known.len() >= COPY_QUEUE_MAX || self.store.contains(&hash) || !q.known.insert(hash.0) {
                    continue;
                }
                q.jobs.push_back(job);
            }
            let start = self.copies.load(Ordering::Relaxed).saturating_sub(q.workers).min(q.jobs.len());
            q.workers += start;
            start
        };
        for _ in 0..start {
            let this = self.clone();
            tokio::spawn(async move { this.work().await });
        }
    }

    /// Takes jobs until the queue is empty (or the limit shrank below the running workers).
    async fn work(&self) {
        loop {
            let job = {
                let mut q = locked(&self.queue);
                if q.workers > self.copies.load(Ordering::Relaxed) {
                    q.workers -= 1;
                    return;
                }
                match q.jobs.pop_front() {
                    Some(j) => j,
                    None => {
                        q.workers -= 1;
                        return;
                    }
                }
            };
            let Some(hash) = ChunkHash::from_slice(&job.hash) else { continue };
            if !self.store.contains(&hash) {
                if self.copy(hash, &job.sources).await {
                    self.metrics.copies.inc();
                } else {
                    tracing::warn!(chunk = %hash.to_hex(), "no source could provide the chunk; the master will plan it again");
                    self.metrics.copy_failures.inc();
                    locked(&self.failed).push(hash.0);
                }
            }
            locked(&self.queue).known.remove(&hash.0);
        }
    }

    /// Copies one chunk from the first source that serves it. Returns whether it is stored.
    async fn copy(&self, hash: ChunkHash, sources: &[ChunkserverRef]) -> bool {
        for src in sources {
            match crate::quic::fetch(&self.pool, &src.addr, &hash, COPY_TIMEOUT).await {
                Ok(data) => {
                    let len = data.len() as u64;
                    self.pace.take(len).await;
                    match self.store.put(hash, data).await {
                        Ok(()) => {
                            self.metrics.copied_bytes.inc_by(len);
                            tracing::debug!(chunk = %hash.to_hex(), from = %src.addr, "re-replicated a chunk");
                            return true;
                        }
                        Err(e) => {
                            tracing::warn!(chunk = %hash.to_hex(), from = %src.addr, "storing a copied chunk failed: {e}")
                        }
                    }
                }
                Err(e) => tracing::warn!(chunk = %hash.to_hex(), from = %src.addr, "copying a chunk failed: {e:#}"),
            }
        }
        false
    }
}

/// Channels to masters we have talked to, at most this many (hints name arbitrary addresses).
const MAX_CHANNELS: usize = 16;

/// Which master we talk to, and how to reach each.
struct Masters {
    list: Vec<String>,
    /// Index into `list` of the last master tried from the list.
    next: usize,
    current: String,
    tls: ClientTlsConfig,
    connect_timeout: Duration,
    request_timeout: Duration,
    channels: HashMap<String, Channel>,
}

impl Masters {
    fn client(&mut self) -> Result<ClusterClient<Channel>, tonic::Status> {
        if let Some(ch) = self.channels.get(&self.current) {
            return Ok(ClusterClient::new(ch.clone()));
        }
        let endpoint = Channel::from_shared(format!("https://{}", self.current))
            .map_err(|e| tonic::Status::invalid_argument(format!("master address {}: {e}", self.current)))?
            .tls_config(self.tls.clone())
            .map_err(|e| tonic::Status::internal(format!("TLS config: {e}")))?
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout);
        // Lazy: the channel connects (and reconnects) on use, so a master that is down now
        // costs one failed call, not a stuck worker.
        let ch = endpoint.connect_with_connector_lazy(cairn_common::net::GrpcConnector);
        if self.channels.len() >= MAX_CHANNELS {
            self.channels.clear();
        }
        self.channels.insert(self.current.clone(), ch.clone());
        Ok(ClusterClient::new(ch))
    }

    /// Calls the current master once. On failure, picks the master to try next: the leader the
    /// refusal names, or else the next one in the list. NotFound comes from a leader that does not
    /// know us, so it keeps the master.
    async fn call<T, F, Fut>(&mut self, f: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(ClusterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let result = match self.client() {
            Ok(client) => f(client).await.map(tonic::Response::into_inner),
            Err(e) => Err(e),
        };
        if let Err(status) = &result {
            self.follow(status);
        }
        result
    }

    fn follow(&mut self, status: &tonic::Status) {
        if status.code() == tonic::Code::NotFound {
            return;
        }
        let hint = status
            .metadata()
            .get(LEADER_HINT_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|h| !h.is_empty() && *h != self.current);
        if status.code() == tonic::Code::Unavailable {
            if let Some(hint) = hint {
                tracing::debug!(from = %self.current, to = hint, "following the leader hint");
                self.current = hint.to_string();
                return;
            }
        }
        if !self.list.is_empty() {
            self.next = (self.next + 1) % self.list.len();
            self.current = self.list[self.next].clone();
        }
    }
}

/// Exponential backoff with jitter, capped.
struct Backoff {
    attempt: u32,
    max: Duration,
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(100);

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next_delay(&mut self) -> Duration {
        let exp = Self::BASE.saturating_mul(1u32 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // Jitter in [50%, 100%] keeps many chunkservers from retrying in lockstep.
        exp.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }

    /// Sleeps the next delay; false if shutdown came first.
    async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Logs failures loudly at first, then only now and then, so a master that is down for a while
/// does not flood the log once a second.
struct FailureLog {
    consecutive: u64,
}

impl FailureLog {
    fn failed(&mut self, what: &str, master: &str, status: &tonic::Status) {
        self.consecutive += 1;
        if self.consecutive == 1 || self.consecutive.is_multiple_of(60) {
            tracing::warn!(master, code = ?status.code(), message = status.message(), failures = self.consecutive, "{what} failed; retrying");
        } else {
            tracing::debug!(master, code = ?status.code(), message = status.message(), "{what} failed; retrying");
        }
    }

    fn succeeded(&mut self) {
        if self.consecutive > 0 {
            tracing::info!(after_failures = self.consecutive, "master reachable again");
        }
        self.consecutive = 0;
    }
}

struct Worker {
    config: HeartbeatConfig,
    copier: Option<Copier>,
    store: ChunkStore,
    masters: Masters,
    backoff: Backoff,
    log: FailureLog,
}

/// Runs the heartbeat worker until `shutdown` is cancelled. Never returns early on errors.
pub async fn run(config: HeartbeatConfig, identity: &Identity, store: ChunkStore, shutdown: CancellationToken) {
    if config.masters.is_empty() {
        tracing::warn!("no master configured; not registering");
        shutdown.cancelled().await;
        return;
    }
    let masters = Masters {
        current: config.masters[0].clone(),
        list: config.masters.clone(),
        next: 0,
        tls: identity.grpc_client(),
        connect_timeout: config.connect_timeout,
        request_timeout: config.request_timeout,
        channels: HashMap::new(),
    };
    let backoff = Backoff { attempt: 0, max: config.backoff_max };
    let copier = config.endpoint.clone().map(|endpoint| {
        let pool = crate::quic::Pool::new(endpoint, config.connect_timeout);
        Copier::new(pool, store.clone(), config.metrics.clone())
    });
    let mut worker = Worker { config, copier, store, masters, backoff, log: FailureLog { consecutive: 0 } };
    worker.run(&shutdown).await;
    tracing::debug!("heartbeat worker stopped");
}

impl Worker {
    async fn run(&mut self, shutdown: &CancellationToken) {
        'register: loop {
            if !self.register_and_report(shutdown).await {
                return;
            }
            let mut ticker = tokio::time::interval(self.config.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                match self.heartbeat().await {
                    Ok(true) => {
                        tracing::info!("master asked for a full chunk report");
                        continue 'register;
                    }
                    Ok(false) => {}
                    Err(status) if status.code() == tonic::Code::NotFound => {
                        tracing::info!("master does not know this node; registering again");
                        continue 'register;
                    }
                    // Heartbeats are already paced by the ticker; the next tick is the retry.
                    Err(_) => {}
                }
            }
        }
    }

    /// Registers, then sends a full chunk report, retrying the pair until both succeed. Returns
    /// false if shutdown came first.
    async fn register_and_report(&mut self, shutdown: &CancellationToken) -> bool {
        loop {
            if shutdown.is_cancelled() {
                return false;
            }
            let attempt = async {
                self.register().await?;
                self.report().await
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => return false,
                r = attempt => r,
            };
            match result {
                Ok(()) => {
                    self.backoff.reset();
                    self.log.succeeded();
                    return true;
                }
                Err(_) => {
                    if !self.backoff.wait(shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    async fn register(&mut self) -> Result<(), tonic::Status> {
        let req = RegisterRequest {
            node_id: self.store.node_id(),
            addr: self.config.addr.clone(),
            zone: self.config.zone.clone(),
            capacity_bytes: self.store.capacity_bytes(),
            used_bytes: self.store.used_bytes(),
        };
        let master = self.masters.current.clone();
        match self.masters.call(|mut c| async move { c.register(req).await }).await {
            Ok(_) => {
                tracing::info!(master, node_id = self.store.node_id(), addr = %self.config.addr, "registered");
                Ok(())
            }
            Err(status) => {
                self.log.failed("register", &master, &status);
                Err(status)
            }
        }
    }

    /// Sends every hash the store holds, in pages sharing one report id; the last page says so.
    async fn report(&mut self) -> Result<(), tonic::Status> {
        let hashes = self.store.hashes();
        let report_id = rand::random::<u64>();
        let page_size = self.config.report_page.max(1);
        let pages: Vec<&[crate::store::ChunkHash]> =
            if hashes.is_empty() { vec![&[]] } else { hashes.chunks(page_size).collect() };
        let count = pages.len();
        for (i, page) in pages.into_iter().enumerate() {
            let req = ChunkReportRequest {
                node_id: self.store.node_id(),
                report_id,
                hashes: page.iter().map(|h| h.0.to_vec()).collect(),
                last: i + 1 == count,
            };
            let master = self.masters.current.clone();
            if let Err(status) = self.masters.call(|mut c| async move { c.chunk_report(req).await }).await {
                self.log.failed("chunk report", &master, &status);
                return Err(status);
            }
        }
        tracing::info!(chunks = hashes.len(), pages = count, "chunk report sent");
        Ok(())
    }

    /// One heartbeat. Returns whether the master wants a full report. The changes it carries are
    /// handed back to the store if the master did not take them. Deletes in the answer are done
    /// before this returns, so before the next heartbeat: a node the master hears from again has
    /// carried out every delete it was sent.
    async fn heartbeat(&mut self) -> Result<bool, tonic::Status> {
        let (added, removed) = self.store.take_changes(self.config.max_changes);
        let failed = self.copier.as_ref().map(|c| std::mem::take(&mut *locked(&c.failed))).unwrap_or_default();
        let req = HeartbeatRequest {
            node_id: self.store.node_id(),
            capacity_bytes: self.store.capacity_bytes(),
            used_bytes: self.store.used_bytes(),
            chunks: self.store.chunk_count(),
            added: added.iter().map(|h| h.0.to_vec()).collect(),
            removed: removed.iter().map(|h| h.0.to_vec()).collect(),
            copy_failed: failed.iter().map(|h| h.to_vec()).collect(),
            copied_bytes: self.copier.as_ref().map_or(0, |c| c.metrics.copied_bytes.get()),
        };
        let master = self.masters.current.clone();
        self.config.metrics.heartbeats_sent.inc();
        match self.masters.call(|mut c| async move { c.heartbeat(req).await }).await {
            Ok(resp) => {
                self.log.succeeded();
                if !resp.delete.is_empty() {
                    self.delete(resp.delete).await;
                }
                if let Some(c) = &self.copier {
                    c.submit(resp.copy, resp.limits);
                }
                Ok(resp.report_requested)
            }
            Err(status) => {
                self.config.metrics.heartbeats_failed.inc();
                self.store.requeue_changes(added, removed);
                if let Some(c) = &self.copier {
                    locked(&c.failed).extend(failed);
                }
                self.log.failed("heartbeat", &master, &status);
                Err(status)
            }
        }
    }

    /// Deletes chunks the master no longer wants here (garbage, or surplus replicas).
    async fn delete(&self, hashes: Vec<Vec<u8>>) {
        let store = self.store.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut deleted = 0;
            for h in hashes.iter().filter_map(|h| ChunkHash::from_slice(h)) {
                match store.delete_blocking(&h) {
                    Ok(true) => deleted += 1,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(chunk = %h.to_hex(), "delete failed: {e}"),
                }
            }
            deleted
        })
        .await;
        match done {
            Ok(n) => {
                self.config.metrics.deletes.inc_by(n);
                if n > 0 {
                    tracing::info!(chunks = n, "deleted chunks the master asked to");
                }
            }
            Err(e) => tracing::warn!("delete task: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_grows() {
        let mut b = Backoff { attempt: 0, max: Duration::from_secs(2) };
        let first = b.next_delay();
        assert!(first <= Duration::from_millis(100) && first >= Duration::from_millis(50));
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    fn masters(list: &[&str]) -> Masters {
        Masters {
            list: list.iter().map(|s| s.to_string()).collect(),
            next: 0,
            current: list[0].to_string(),
            tls: ClientTlsConfig::new(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            channels: HashMap::new(),
        }
    }

    #[test]
    fn follows_hints_then_rotates() {
        let mut m = masters(&["a:1", "b:2", "c:3"]);
        let mut refused = tonic::Status::unavailable("not leader");
        refused.metadata_mut().insert(LEADER_HINT_KEY, "c:3".parse().unwrap());
        m.follow(&refused);
        assert_eq!(m.current, "c:3");
        m.follow(&tonic::Status::unavailable("no hint"));
        assert_eq!(m.current, "b:2");
        m.follow(&tonic::Status::not_found("unknown node"));
        assert_eq!(m.current, "b:2", "NotFound comes from the leader: stay");
        m.follow(&tonic::Status::deadline_exceeded("slow"));
        assert_eq!(m.current, "c:3");
        m.follow(&tonic::Status::unavailable("down"));
        assert_eq!(m.current, "a:1");
    }
}
