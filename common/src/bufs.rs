//! Large buffers reused for chunk reads. A fresh 4 MiB buffer costs a thousand page faults, each
//! page zeroed by the kernel (`perf` on the S3 gateway serving 1 GiB GETs: 14% of its CPU); a
//! buffer taken from [`Bufs`] comes back to it when the last `Bytes` made from it is dropped.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// A pool of equal-sized buffers, keeping at most `keep` idle ones.
pub struct Bufs {
    size: usize,
    keep: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

/// A buffer of [`Bufs`], owned by the `Bytes` made from it.
pub struct Pooled {
    pub buf: Vec<u8>,
    pool: Arc<Bufs>,
}

impl Bufs {
    pub fn new(size: usize, keep: usize) -> Arc<Bufs> {
        Arc::new(Bufs { size, keep, free: Mutex::new(Vec::new()) })
    }

    /// A buffer of `size` initialized bytes (old content, or zeros when new).
    pub fn take(self: &Arc<Self>) -> Pooled {
        let buf = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let buf = buf.unwrap_or_else(|| vec![0; self.size]);
        Pooled { buf, pool: self.clone() }
    }

    /// Whether a read of `len` bytes should take a buffer of the pool: it fits, and holding it
    /// (a read may be kept long, as in the mount's chunk cache) costs at most a third more
    /// memory than the read uses.
    pub fn suits(&self, len: usize) -> bool {
        len <= self.size && len >= self.size / 4 * 3
    }

    /// Idle buffers now.
    pub fn idle(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Pooled {
    /// The first `len` bytes, as `Bytes` that give the buffer back when the last is dropped.
    pub fn freeze(self, len: usize) -> Bytes {
        Bytes::from_owner(self).slice(..len)
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.pool.keep {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_their_last_bytes_go() {
        let pool = Bufs::new(1 << 20, 4);
        let mut a = pool.take();
        a.buf[..3].copy_from_slice(b"abc");
        let bytes = a.freeze(3);
        let part = bytes.slice(1..);
        drop(bytes);
        assert_eq!(pool.idle(), 0, "a slice still holds the buffer");
        assert_eq!(&part[..], b"bc");
        drop(part);
        assert_eq!(pool.idle(), 1);
        // Taken again: the same memory, no new allocation.
        let b = pool.take();
        assert_eq!(&b.buf[..3], b"abc");
        assert_eq!(b.buf.len(), 1 << 20);
        assert_eq!(pool.idle(), 0);
        // At most `keep` idle buffers are kept.
        let many: Vec<Pooled> = (0..4 + 3).map(|_| pool.take()).collect();
        drop(many);
        drop(b);
        assert_eq!(pool.idle(), 4);
        assert!(pool.suits(1 << 20) && pool.suits(3 << 18) && !pool.suits((3 << 18) - 1) && !pool.suits((1 << 20) + 1));
    }
}
