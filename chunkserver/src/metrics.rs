//! The chunkserver's Prometheus metrics (`cairn_chunkserver_*`). Each worker counts its own work
//! as it goes, with plain atomic counters on the data path ([`crate::quic`]: puts, gets, chain
//! forwards; [`crate::heartbeat`]: heartbeats, copy jobs, deletes; [`crate::scrub`]); the store's
//! size is read at scrape time ([`Metrics::refresh`]). One instance per node: the heartbeat
//! reports the copied-bytes counter to the master, which derives the repair rate from it.

use std::time::Duration;

use cairn_common::metrics::set_gauge;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::ChunkStore;

#[derive(Debug)]
pub struct Metrics {
    pub(crate) puts: Counter,
    pub(crate) put_bytes: Counter,
    pub(crate) put_errors: Counter,
    pub(crate) put_duration: Histogram,
    pub(crate) gets: Counter,
    pub(crate) get_bytes: Counter,
    pub(crate) get_errors: Counter,
    pub(crate) get_duration: Histogram,
    pub(crate) chain_forwards: Counter,
    pub(crate) chain_forward_errors: Counter,
    pub(crate) copies: Counter,
    pub(crate) copy_failures: Counter,
    pub(crate) copied_bytes: Counter,
    pub(crate) deletes: Counter,
    pub(crate) scrubbed_chunks: Counter,
    pub(crate) scrubbed_bytes: Counter,
    pub(crate) scrub_corrupt: Counter,
    pub(crate) heartbeats_sent: Counter,
    pub(crate) heartbeats_failed: Counter,
    reads_handed_off: Counter,
    chunks: Gauge,
    used_bytes: Gauge,
    capacity_bytes: Gauge,
    packs: Gauge,
    pack_bytes: Gauge,
    pack_live_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let latency = || Histogram::new(cairn_common::metrics::latency_buckets());
        Metrics {
            puts: Counter::default(),
            put_bytes: Counter::default(),
            put_errors: Counter::default(),
            put_duration: latency(),
            gets: Counter::default(),
            get_bytes: Counter::default(),
            get_errors: Counter::default(),
            get_duration: latency(),
            chain_forwards: Counter::default(),
            chain_forward_errors: Counter::default(),
            copies: Counter::default(),
            copy_failures: Counter::default(),
            copied_bytes: Counter::default(),
            deletes: Counter::default(),
            scrubbed_chunks: Counter::default(),
            scrubbed_bytes: Counter::default(),
            scrub_corrupt: Counter::default(),
            heartbeats_sent: Counter::default(),
            heartbeats_failed: Counter::default(),
            reads_handed_off: Counter::default(),
            chunks: Gauge::default(),
            used_bytes: Gauge::default(),
            packs: Gauge::default(),
            pack_bytes: Gauge::default(),
            pack_live_bytes: Gauge::default(),
            capacity_bytes: Gauge::default(),
        }
    }
}

impl Metrics {
    /// A PutChunk request of `len` bytes was answered, OK or not, `took` after it arrived.
    pub(crate) fn put_done(&self, ok: bool, len: u64, took: Duration) {
        if ok {
            self.puts.inc();
            self.put_bytes.inc_by(len);
        } else {
            self.put_errors.inc();
        }
        self.put_duration.observe(took.as_secs_f64());
    }

    /// A GetChunk request was answered: `sent` bytes, or None if it failed.
    pub(crate) fn get_done(&self, sent: Option<u64>, took: Duration) {
        match sent {
            Some(bytes) => {
                self.gets.inc();
                self.get_bytes.inc_by(bytes);
            }
            None => {
                self.get_errors.inc();
            }
        }
        self.get_duration.observe(took.as_secs_f64());
    }

    /// Adds every metric to `registry` (prefix it with `cairn_chunkserver`).
    pub fn register(&self, r: &mut Registry) {
        r.register("chunks", "Chunks stored on this node", self.chunks.clone());
        r.register("used_bytes", "Bytes of the chunks stored on this node", self.used_bytes.clone());
        r.register("capacity_bytes", "Bytes this node may hold", self.capacity_bytes.clone());
        r.register("packs", "Pack files holding small chunks", self.packs.clone());
        r.register("pack_bytes", "Bytes of the records in pack files, dead ones included", self.pack_bytes.clone());
        r.register(
            "pack_live_bytes",
            "Bytes of the pack records of chunks still stored (the rest is reclaimed by compaction)",
            self.pack_live_bytes.clone(),
        );
        r.register("chunk_puts", "Chunk puts answered OK (this replica and the rest of its chain)", self.puts.clone());
        r.register("chunk_put_bytes", "Bytes of chunks put and answered OK", self.put_bytes.clone());
        r.register("chunk_put_errors", "Chunk puts answered with an error", self.put_errors.clone());
        r.register(
            "chunk_put_duration_seconds",
            "Time from a put's request to its answer (receive, store, chain)",
            self.put_duration.clone(),
        );
        r.register("chunk_gets", "Chunk gets served", self.gets.clone());
        r.register(
            "small_reads_off_cache",
            "Small reads of recently verified chunks that needed the disk and went to a blocking thread",
            self.reads_handed_off.clone(),
        );
        r.register("chunk_get_bytes", "Bytes of chunks served by gets", self.get_bytes.clone());
        r.register("chunk_get_errors", "Chunk gets answered with an error or cut off", self.get_errors.clone());
        r.register(
            "chunk_get_duration_seconds",
            "Time from a get's request to the last byte sent",
            self.get_duration.clone(),
        );
        r.register(
            "chain_forwards",
            "Puts forwarded to the next replica of their chain and acked by it",
            self.chain_forwards.clone(),
        );
        r.register(
            "chain_forward_errors",
            "Puts whose next replica was unreachable, failed or refused",
            self.chain_forward_errors.clone(),
        );
        r.register("copies", "Re-replication copy jobs done", self.copies.clone());
        r.register("copy_failures", "Re-replication copy jobs no source could serve", self.copy_failures.clone());
        r.register("copied_bytes", "Bytes stored by re-replication copy jobs", self.copied_bytes.clone());
        r.register("deletes", "Chunks deleted at the master's request", self.deletes.clone());
        r.register("scrubbed_chunks", "Chunks the scrubber re-read", self.scrubbed_chunks.clone());
        r.register("scrubbed_bytes", "Bytes the scrubber re-read and checked", self.scrubbed_bytes.clone());
        r.register("scrub_corrupt_chunks", "Corrupt chunks the scrubber found", self.scrub_corrupt.clone());
        r.register("heartbeats_sent", "Heartbeats sent to the master", self.heartbeats_sent.clone());
        r.register("heartbeats_failed", "Heartbeats the master did not answer OK", self.heartbeats_failed.clone());
    }

    /// Reads the store's size into the gauges; called before each scrape, off the async runtime.
    pub fn refresh(&self, store: &ChunkStore) {
        set_gauge(&self.chunks, store.chunk_count());
        set_gauge(&self.used_bytes, store.used_bytes());
        set_gauge(&self.capacity_bytes, store.capacity_bytes());
        let packs = store.pack_stats();
        set_gauge(&self.packs, packs.packs);
        set_gauge(&self.pack_bytes, packs.bytes);
        set_gauge(&self.pack_live_bytes, packs.live_bytes);
        let handed_off = store.reads_handed_off();
        self.reads_handed_off.inc_by(handed_off.saturating_sub(self.reads_handed_off.get()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_units() {
        let m = Metrics::default();
        let mut r = Registry::with_prefix("cairn_chunkserver");
        m.register(&mut r);
        m.put_done(true, 4096, Duration::from_millis(2));
        m.put_done(false, 10, Duration::from_millis(1));
        m.get_done(Some(100), Duration::from_micros(300));
        m.get_done(None, Duration::from_micros(300));
        let text = cairn_common::metrics::Exporter::new(r).render();
        for line in [
            "cairn_chunkserver_chunk_puts_total 1",
            "cairn_chunkserver_chunk_put_bytes_total 4096",
            "cairn_chunkserver_chunk_put_errors_total 1",
            "cairn_chunkserver_chunk_put_duration_seconds_count 2",
            "cairn_chunkserver_chunk_gets_total 1",
            "cairn_chunkserver_chunk_get_bytes_total 100",
            "cairn_chunkserver_chunk_get_errors_total 1",
            "cairn_chunkserver_chunk_get_duration_seconds_count 2",
            "cairn_chunkserver_copied_bytes_total 0",
            "cairn_chunkserver_scrub_corrupt_chunks_total 0",
            "cairn_chunkserver_used_bytes 0",
            "cairn_chunkserver_packs 0",
            "cairn_chunkserver_pack_live_bytes 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
    }
}
