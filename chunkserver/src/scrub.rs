//! The scrubber: re-reads every chunk slowly and checks it against its name (its BLAKE3 hash), so
//! that a replica that rotted on disk is found before a reader needs it. A bad chunk is handled as
//! a failed read handles it: moved to `corrupt/`, dropped from the index and reported removed at
//! the next heartbeat, after which the master copies it back from a good replica.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pace::Pace;
use crate::store::{ChunkStore, StoreError};

/// Rest between two passes over the store.
const PASS_PAUSE: Duration = Duration::from_secs(10);

/// Scrubs until `shutdown`, reading at most `rate` bytes per second (0: never scrub). Chunks and
/// bytes checked and corrupt chunks found are counted in `metrics` as they go.
pub async fn run(store: ChunkStore, rate: u64, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    if rate == 0 {
        tracing::info!("scrubbing is off");
        return;
    }
    let pace = Pace::new(rate);
    loop {
        let started = Instant::now();
        let (mut chunks, mut bytes, mut corrupt) = (0u64, 0u64, 0u64);
        for hash in store.hashes() {
            let len = match store.get(hash, 0, 0).await {
                Ok(read) => read.chunk_len,
                Err(StoreError::Corrupt(_)) => {
                    corrupt += 1;
                    metrics.scrub_corrupt.inc();
                    0
                }
                // Deleted since the pass began.
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => {
                    tracing::warn!(chunk = %hash, "scrub read failed: {e}");
                    0
                }
            };
            chunks += 1;
            bytes += len;
            metrics.scrubbed_chunks.inc();
            metrics.scrubbed_bytes.inc_by(len);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = pace.take(len.max(1)) => {}
            }
        }
        let secs = started.elapsed().as_secs_f64();
        if corrupt > 0 {
            tracing::warn!(chunks, bytes, corrupt, secs, "scrub pass found corrupt chunks; they will be copied back");
        } else {
            tracing::info!(chunks, bytes, secs, "scrub pass clean");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PASS_PAUSE) => {}
        }
    }
}
