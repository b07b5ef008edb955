//! The Cairn master: the metadata service. It owns the Raft log (raft-rs, durable in a log file
//! of its own), the namespace state machine replicated by it (in redb), and the leader's soft
//! state about chunkservers (liveness, chunk locations, placement). It never stores chunk data
//! and never talks QUIC; it meets chunkservers and clients only through the gRPC services in
//! `cairn-proto`.

pub mod cluster;
pub mod error;
mod logging;
pub mod metrics;
pub mod node;
pub mod raftlog;
mod service;
pub mod state;
pub mod transport;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_proto::v1::{
    self as pb, cluster_server::ClusterServer, master_server::MasterServer, raft_server::RaftServer,
};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

/// gRPC messages can carry the extent list of a very large file.
pub const MAX_MESSAGE: usize = 64 << 20;
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

pub struct Config {
    pub id: u64,
    pub data_dir: PathBuf,
    /// Every voter at the group's creation, this master included: id -> gRPC address. Empty:
    /// join an existing group (an admin adds this master with `cairn admin masters add`).
    pub peers: BTreeMap<u64, String>,
    /// The address peers and clients reach this master at.
    pub advertise: String,
    /// Compact the Raft log after this many entries.
    pub compact_every: u64,
    pub identity: cairn_common::tls::Identity,
    /// Silence after which a chunkserver counts as dead.
    pub dead_after: Duration,
    /// How long after its last placement an unreferenced chunk is safe from collection.
    pub gc_grace: Duration,
    /// How long the leader waits for a mount's KeepAlive before it frees the files it kept.
    pub kept_grace: Duration,
    /// An already-bound listener for the Prometheus endpoint (None: no endpoint).
    pub metrics: Option<std::net::TcpListener>,
}

/// Serves until `shutdown` is cancelled (or the Raft driver fails, which cancels it).
pub async fn run(config: Config, listener: tokio::net::TcpListener, shutdown: CancellationToken) -> Result<()> {
    anyhow::ensure!(config.id != 0, "master id 0 is reserved");
    anyhow::ensure!(
        config.peers.is_empty() || config.peers.contains_key(&config.id),
        "--peers does not name this master (id {})",
        config.id
    );
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("create {}", config.data_dir.display()))?;
    let db_path = config.data_dir.join("master.redb");
    let db = Arc::new(
        redb::Database::create(&db_path).with_context(|| format!("open metadata store {}", db_path.display()))?,
    );
    let voters: Vec<u64> = config.peers.keys().copied().collect();
    let files = [
        raftlog::DiskFile::open(&config.data_dir.join(raftlog::LOG_FILES[0]))?,
        raftlog::DiskFile::open(&config.data_dir.join(raftlog::LOG_FILES[1]))?,
    ];
    // The files may be new: their directory entries must be durable before they hold the log.
    std::fs::File::open(&config.data_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("sync {}", config.data_dir.display()))?;
    let log = raftlog::RaftLog::open(db.clone(), files, &voters).context("load raft log")?;
    let state = state::State::open(db).context("open namespace")?;
    if !voters.is_empty() {
        state.bootstrap_masters(&config.peers)?;
    } else if !log.is_member_of_a_group() {
        tracing::info!("waiting to be added to a master group (cairn admin masters add)");
    }
    let cluster = Arc::new(
        cluster::Cluster::new(config.dead_after).with_gc_grace(config.gc_grace).with_kept_grace(config.kept_grace),
    );
    // `stop` ends the gRPC server and the driver; a signal (`shutdown`) first hands leadership
    // over, so that a planned restart of the leader costs no election timeout.
    let stop = CancellationToken::new();
    let metrics = Arc::new(metrics::Metrics::default());
    let (node, driver) = node::Node::start(
        node::NodeConfig {
            id: config.id,
            data_dir: config.data_dir.clone(),
            compact_every: config.compact_every,
            metrics: metrics.clone(),
        },
        log,
        state.clone(),
        cluster.clone(),
        config.identity.clone(),
        config.advertise.clone(),
        stop.clone(),
    )?;
    {
        let (node, stop) = (node.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = stop.cancelled() => return,
            }
            let s = node.status();
            if s.role == "leader" && s.voters.len() > 1 {
                match node.transfer_leader(0).await {
                    Ok(to) => tracing::info!(to, "handed leadership over before stopping"),
                    Err(e) => tracing::warn!("could not hand leadership over before stopping: {e}"),
                }
            }
            stop.cancel();
        });
    }
    tokio::spawn(repair_loop(node.clone(), state.clone(), cluster.clone(), stop.clone()));
    if let Some(listener) = config.metrics {
        let mut registry = prometheus_client::registry::Registry::with_prefix("cairn_master");
        metrics.register(&mut registry);
        let (m, node, state, cluster) = (metrics.clone(), node.clone(), state.clone(), cluster.clone());
        let exporter =
            cairn_common::metrics::Exporter::new(registry).with_refresh(move || m.refresh(&node, &state, &cluster));
        tokio::spawn(cairn_common::metrics::serve(listener, Arc::new(exporter), stop.child_token()));
    }
    let services = service::Services { node, state, cluster, identity: config.identity.clone(), metrics };
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let server = tonic::transport::Server::builder()
        .tls_config(config.identity.grpc_server())
        .context("gRPC TLS")?
        .tcp_nodelay(true)
        .add_service(
            MasterServer::new(services.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(ClusterServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE))
        .add_service(RaftServer::new(services).max_decoding_message_size(MAX_MESSAGE))
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    // A graceful stop waits for requests in flight, and the peers' Raft streams never end: give
    // unary calls a moment, then drop the rest.
    let grace = async {
        stop.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let served = tokio::select! {
        r = server => r,
        _ = grace => Ok(()),
    };
    stop.cancel();
    let driven = tokio::task::spawn_blocking(move || driver.join()).await;
    served.context("gRPC server")?;
    match driven {
        Ok(Ok(res)) => res,
        Ok(Err(_)) => Err(anyhow::anyhow!("raft driver panicked")),
        Err(e) => Err(anyhow::anyhow!("join raft driver: {e}")),
    }
}

/// How often the leader looks for chunks that lost replicas (only when something changed: a
/// node died, replicas were removed or reported bad, or copies are in flight).
const REPAIR_EVERY: Duration = Duration::from_secs(1);
/// How often the leader looks for garbage and surplus replicas.
const COLLECT_EVERY: Duration = Duration::from_secs(10);

/// The leader's chunk maintenance: re-replication planning (copy jobs), garbage collection and
/// trimming of surplus replicas (deletes); chunkservers receive both with their heartbeats.
async fn repair_loop(node: node::Node, state: state::State, cluster: Arc<cluster::Cluster>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(REPAIR_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_collect = std::time::Instant::now();
    let mut last_sweep = last_collect;
    // A short grace (tests) deserves equally prompt collection.
    let collect_every = COLLECT_EVERY.min(cluster.gc_grace() / 4).max(REPAIR_EVERY);
    let sweep_every = COLLECT_EVERY.min(cluster.kept_grace() / 4).max(REPAIR_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = std::time::Instant::now();
        if node.ensure_leader().is_err() {
            continue;
        }
        if now.duration_since(last_sweep) >= sweep_every {
            last_sweep = now;
            if let Err(e) = sweep_kept(&node, &state, &cluster, now).await {
                tracing::warn!("freeing files kept by gone mounts: {e:#}");
            }
        }
        if !cluster.settled(now) {
            continue;
        }
        let (s, c) = (state.clone(), cluster.clone());
        if let Err(e) = blocking(move || plan_repairs(&s, &c, now)).await {
            tracing::warn!("re-replication planning: {e:#}");
        }
        if now.duration_since(last_collect) >= collect_every {
            last_collect = now;
            if let Err(e) = collect_round(&node, &state, &cluster, now).await {
                tracing::warn!("garbage collection: {e:#}");
            }
        }
    }
}

/// Frees the unlinked files kept open by mounts this leader has not heard from for the kept
/// grace (a mount that crashed, or lost the cluster for that long, cannot release them).
async fn sweep_kept(
    node: &node::Node,
    state: &state::State,
    cluster: &cluster::Cluster,
    now: std::time::Instant,
) -> Result<()> {
    let s = state.clone();
    let kept = blocking(move || Ok(s.reader()?.kept()?)).await?;
    cluster.forget_keepers(now);
    let grace_ns = i64::try_from(cluster.kept_grace().as_nanos()).unwrap_or(i64::MAX);
    let wall = node::now_ns();
    for (inode, keeper, since) in kept {
        // Kept for the grace at least (the unlink itself counts as the mount's renewal, but a
        // leader elected since has not seen it), and its mount silent for as long.
        if wall.saturating_sub(since) < grace_ns || !cluster.keeper_gone(keeper, now) {
            continue;
        }
        let op =
            pb::NodeRequest { op: Some(pb::node_request::Op::Release(pb::ReleaseNode { inode, keeper })), id: None };
        node.propose(pb::command::Op::Node(op)).await.with_context(|| format!("release inode {inode}"))?;
        tracing::info!(inode, keeper = format!("{keeper:016x}"), "freed an unlinked file its mount no longer keeps");
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.context("maintenance task")?
}

fn plan_repairs(state: &state::State, cluster: &cluster::Cluster, now: std::time::Instant) -> Result<()> {
    cluster.set_limits(state.reader()?.repair_limits()?);
    if !cluster.repair_scan_needed(now) {
        return Ok(());
    }
    let mut chunks = Vec::new();
    state.reader()?.for_each_chunk(|hash, goal| {
        if let Some(h) = cluster::to_hash(hash) {
            chunks.push((h, goal));
        }
    })?;
    let (under, assigned) = cluster.plan_repairs(&chunks, now);
    if under > 0 {
        tracing::info!(under_replicated = under, assigned, "re-replication");
    }
    Ok(())
}

/// How long a collection round waits for the entries proposed before its fence to apply.
const FENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// One round of garbage collection and trimming. See `Cluster::mark_garbage` for why it cannot
/// delete a chunk that a commit is about to reference.
async fn collect_round(
    node: &node::Node,
    state: &state::State,
    cluster: &Arc<cluster::Cluster>,
    now: std::time::Instant,
) -> Result<()> {
    let (s, c) = (state.clone(), cluster.clone());
    let orphans = blocking(move || {
        let located = c.located();
        let goals = s.reader()?.chunk_goals(&located)?;
        let mut orphans = Vec::new();
        let mut referenced = Vec::new();
        for (h, goal) in located.into_iter().zip(goals) {
            match goal {
                Some(goal) => referenced.push((h, goal)),
                None => orphans.push(h),
            }
        }
        let trimmed = c.plan_trims(&referenced, now);
        if trimmed > 0 {
            tracing::info!(replicas = trimmed, "deleting surplus replicas");
        }
        let moved = c.plan_balance(&referenced, now);
        if moved > 0 {
            tracing::info!(chunks = moved, "balancing: copying chunks to the emptiest node");
        }
        Ok(orphans)
    })
    .await?;
    let (marked, fence) = cluster.mark_garbage(&orphans, now, || node.fence());
    if marked.is_empty() {
        return Ok(());
    }
    // Everything proposed before the fence (every commit that passed its check before the
    // marks) is applied before the namespace is read again; no commit can name a marked chunk
    // after the fence.
    let garbage = async {
        node.applied_through(fence?, FENCE_TIMEOUT).await?;
        let (s, m) = (state.clone(), marked.clone());
        blocking(move || {
            let goals = s.reader()?.chunk_goals(&m)?;
            Ok(m.iter().zip(goals).filter(|(_, g)| g.is_none()).map(|(h, _)| *h).collect::<HashSet<_>>())
        })
        .await
    }
    .await;
    let deletes = cluster.collect(&marked, garbage.as_ref().unwrap_or(&HashSet::new()), now);
    let garbage = garbage?;
    tracing::info!(chunks = garbage.len(), replicas = deletes, "deleting garbage");
    Ok(())
}
