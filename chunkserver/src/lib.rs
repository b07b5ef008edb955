//! The Cairn chunkserver: keeps immutable, content-addressed chunks on local disk
//! ([`store`]), serves and replicates them over QUIC ([`quic`]), and tells the master leader what
//! it holds ([`heartbeat`]).
//!
//! It owns the bytes of chunks and nothing else: it never interprets files, paths or inodes, never
//! decides placement, and never depends on the master or client crates (they meet through
//! `cairn-proto`). It must never acknowledge a chunk before its hash was checked and it is durable
//! on disk, never serve bytes it has not verified against their hash, and never accept a peer whose
//! certificate the cluster CA did not sign. Startup is recovery: no clean-shutdown state is used.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub mod heartbeat;
pub mod metrics;
mod pace;
pub mod quic;
pub mod scrub;
pub mod store;

/// Everything a chunkserver needs to start.
#[derive(Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// "host:port" of the masters' gRPC endpoints.
    pub masters: Vec<String>,
    pub zone: String,
    pub identity: cairn_common::tls::Identity,
    /// Space limit below the filesystem's size (tests use it to simulate a full disk).
    pub capacity_bytes: Option<u64>,
    /// Address registered with the master; default: the socket's local address.
    pub advertise: Option<String>,
    /// Bytes per second the scrubber re-reads and checks (0: no scrubbing).
    pub scrub_rate: u64,
    /// An already-bound listener for the Prometheus endpoint (None: no endpoint).
    pub metrics: Option<std::net::TcpListener>,
}

/// Runs a chunkserver until `shutdown` is cancelled. `socket` is an already-bound UDP socket.
/// Returns an error only if the node cannot start (data directory, TLS files, socket); once
/// running, failures are logged and retried.
pub async fn run(config: Config, socket: UdpSocket, shutdown: CancellationToken) -> Result<()> {
    let local = socket.local_addr().context("UDP socket has no local address")?;
    if let Err(e) = cairn_common::fsutil::raise_open_file_limit() {
        tracing::warn!(error = %e, "cannot raise the open-file limit");
    }
    let store = store::ChunkStore::open(&config.data_dir, config.capacity_bytes)
        .await
        .with_context(|| format!("open chunk store in {}", config.data_dir.display()))?;
    let span = tracing::info_span!("chunkserver", node = store.node_id());
    let endpoint = quic::endpoint(&config.identity, store.node_id(), socket)?;
    let advertise = config.advertise.clone().unwrap_or_else(|| local.to_string());
    span.in_scope(|| tracing::info!(addr = %local, advertise, zone = config.zone, "chunkserver starting"));

    let metrics = Arc::new(metrics::Metrics::default());
    if let Some(listener) = config.metrics {
        let mut registry = prometheus_client::registry::Registry::with_prefix("cairn_chunkserver");
        metrics.register(&mut registry);
        let (m, s) = (metrics.clone(), store.clone());
        let exporter = cairn_common::metrics::Exporter::new(registry).with_refresh(move || m.refresh(&s));
        tokio::spawn(cairn_common::metrics::serve(listener, Arc::new(exporter), shutdown.child_token()));
    }

    let hb_shutdown = shutdown.child_token();
    let mut hb_config = heartbeat::HeartbeatConfig::new(config.masters.clone(), advertise, config.zone.clone());
    hb_config.endpoint = Some(endpoint.clone());
    hb_config.metrics = metrics.clone();
    let hb_store = store.clone();
    let identity = config.identity.clone();
    let hb_token = hb_shutdown.clone();
    let hb = tokio::spawn(
        async move { heartbeat::run(hb_config, &identity, hb_store, hb_token).await }
            .instrument(tracing::info_span!(parent: &span, "heartbeat")),
    );

    let scrub = tokio::spawn(
        scrub::run(store.clone(), config.scrub_rate, metrics.clone(), shutdown.child_token())
            .instrument(tracing::info_span!(parent: &span, "scrub")),
    );

    let served = quic::serve(endpoint, store, quic::Limits::default(), metrics, shutdown.child_token())
        .instrument(span.clone())
        .await;
    hb_shutdown.cancel();
    scrub.abort();
    if let Err(e) = hb.await {
        span.in_scope(|| tracing::error!(error = %e, "heartbeat worker panicked"));
    }
    served
}
