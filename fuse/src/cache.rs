//! A bounded cache of whole, verified chunks by hash, least recently used out first. Chunks are
//! immutable and named by their content, so an entry never goes stale.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

pub struct ChunkCache {
    inner: Mutex<Lru>,
    capacity: usize,
    /// One gate per chunk being fetched: concurrent readers of a chunk wait for one fetch.
    fetching: Mutex<HashMap<Vec<u8>, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<Vec<u8>, (Bytes, u64)>,
    order: BTreeMap<u64, Vec<u8>>,
    tick: u64,
    bytes: usize,
}

impl ChunkCache {
    pub fn new(capacity: usize) -> ChunkCache {
        ChunkCache { inner: Mutex::new(Lru::default()), capacity, fetching: Mutex::new(HashMap::new()) }
    }

    /// The gate of a chunk's fetch; [`ChunkCache::fetched`] retires it.
    pub fn gate(&self, hash: &[u8]) -> Arc<tokio::sync::Mutex<()>> {
        self.fetching.lock().expect("fetching lock").entry(hash.to_vec()).or_default().clone()
    }

    pub fn fetched(&self, hash: &[u8]) {
        self.fetching.lock().expect("fetching lock").remove(hash);
    }

    pub fn get(&self, hash: &[u8]) -> Option<Bytes> {
        let mut g = self.inner.lock().expect("cache lock");
        let lru = &mut *g;
        lru.tick += 1;
        let tick = lru.tick;
        let (data, used) = lru.entries.get_mut(hash)?;
        lru.order.remove(used);
        *used = tick;
        lru.order.insert(tick, hash.to_vec());
        Some(data.clone())
    }

    /// The cached bytes of a stored chunk.
    pub fn peek(&self, loc: &cairn_proto::v1::ExtentLocation) -> Option<Bytes> {
        self.get(&loc.extent.as_ref()?.hash)
    }

    pub fn insert(&self, hash: &[u8], data: Bytes) {
        if data.len() > self.capacity {
            return;
        }
        let mut g = self.inner.lock().expect("cache lock");
        let lru = &mut *g;
        lru.tick += 1;
        let tick = lru.tick;
        if let Some((old, used)) = lru.entries.insert(hash.to_vec(), (data.clone(), tick)) {
            lru.order.remove(&used);
            lru.bytes -= old.len();
        }
        lru.order.insert(tick, hash.to_vec());
        lru.bytes += data.len();
        while lru.bytes > self.capacity {
            let Some((_, victim)) = lru.order.pop_first() else { break };
            if let Some((d, _)) = lru.entries.remove(&victim) {
                lru.bytes -= d.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_capacity() {
        let c = ChunkCache::new(10);
        c.insert(b"a", Bytes::from_static(b"1234"));
        c.insert(b"b", Bytes::from_static(b"1234"));
        assert!(c.get(b"a").is_some()); // a is now the most recent
        c.insert(b"c", Bytes::from_static(b"1234"));
        assert!(c.get(b"b").is_none());
        assert!(c.get(b"a").is_some());
        assert!(c.get(b"c").is_some());
        c.insert(b"big", Bytes::from(vec![0; 11]));
        assert!(c.get(b"big").is_none(), "larger than the whole cache");
    }
}
