//! A redb storage backend in memory that survives the `Database` being dropped and models a
//! crash: writes land in the current image, `sync_data` copies them to the durable image, and a
//! crash reverts to the durable image (optionally keeping a random part of the unsynced pages,
//! which a real disk may have written back on its own). Pages are shared `Arc`s, so a sync
//! copies pointers to the pages written since the last one, not bytes.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use rand::Rng;

const PAGE: usize = 4096;
type Page = Arc<[u8; PAGE]>;

#[derive(Clone, Default)]
struct Image {
    len: u64,
    pages: Vec<Option<Page>>,
}

#[derive(Default)]
struct Inner {
    cur: Image,
    durable: Image,
    /// Pages of `cur` that may differ from `durable`.
    dirty: BTreeSet<usize>,
    /// Syncs that still reach the disk before the process dies (None: no death planned).
    syncs_left: Option<u32>,
    /// The process died: nothing more becomes durable, and what it sends is lost.
    dead: bool,
    /// The unsynced pages as they were when the process died: what a torn crash may keep.
    /// (What a dead process still writes, e.g. redb closing the database, never happened.)
    unsynced_at_death: Vec<(usize, Option<Page>)>,
}

impl Inner {
    fn die(&mut self) {
        if !self.dead {
            self.dead = true;
            self.unsynced_at_death =
                self.dirty.iter().map(|&p| (p, self.cur.pages.get(p).cloned().flatten())).collect();
        }
    }
}

#[derive(Clone, Default)]
pub struct SimDisk(Arc<Mutex<Inner>>);

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDisk").field("len", &self.lock().cur.len).finish()
    }
}

fn out_of_range() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "out of range")
}

impl SimDisk {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().expect("disk lock")
    }

    /// Handles to this disk, the simulator's included: 1 once redb has let go of it.
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.0)
    }

    pub fn dead(&self) -> bool {
        self.lock().dead
    }

    /// The process dies now: nothing it does from here on is durable.
    pub fn kill(&self) {
        self.lock().die();
    }

    /// The process dies just before its `n`-th next sync reaches the disk (n >= 1).
    pub fn die_at_sync(&self, n: u32) {
        self.lock().syncs_left = Some(n - 1);
    }

    /// Cancels a planned death.
    pub fn disarm(&self) {
        self.lock().syncs_left = None;
    }

    /// Reverts to what the disk holds after power loss; `torn` keeps each unsynced page with
    /// probability one half. The process must be dead and redb must have let go.
    pub fn crash(&self, torn: Option<&mut impl Rng>) {
        let mut g = self.lock();
        let inner = &mut *g;
        assert!(inner.dead, "a crash kills the process first");
        let unsynced = std::mem::take(&mut inner.unsynced_at_death);
        if let Some(rng) = torn {
            for (p, page) in unsynced {
                if p < inner.durable.pages.len() && rng.random_bool(0.5) {
                    inner.durable.pages[p] = page;
                }
            }
        }
        inner.cur = inner.durable.clone();
        inner.dirty.clear();
        inner.syncs_left = None;
        inner.dead = false;
    }
}

impl redb::StorageBackend for SimDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.lock().cur.len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let g = self.lock();
        if offset + out.len() as u64 > g.cur.len {
            return Err(out_of_range());
        }
        let mut done = 0;
        while done < out.len() {
            let at = offset as usize + done;
            let (p, off) = (at / PAGE, at % PAGE);
            let n = (PAGE - off).min(out.len() - done);
            match &g.cur.pages[p] {
                Some(page) => out[done..done + n].copy_from_slice(&page[off..off + n]),
                None => out[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut g = self.lock();
        let inner = &mut *g;
        let old_pages = inner.cur.pages.len();
        let new_pages = (len as usize).div_ceil(PAGE);
        if len < inner.cur.len && !(len as usize).is_multiple_of(PAGE) {
            if let Some(Some(page)) = inner.cur.pages.get_mut(new_pages - 1) {
                Arc::make_mut(page)[len as usize % PAGE..].fill(0);
            }
        }
        inner.cur.pages.resize(new_pages, None);
        inner.cur.len = len;
        let lo = old_pages.min(new_pages).saturating_sub(1);
        inner.dirty.extend(lo..old_pages.max(new_pages));
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut g = self.lock();
        let inner = &mut *g;
        if inner.dead {
            return Ok(());
        }
        if let Some(n) = inner.syncs_left {
            if n == 0 {
                inner.die();
                return Ok(());
            }
            inner.syncs_left = Some(n - 1);
        }
        inner.durable.len = inner.cur.len;
        inner.durable.pages.resize(inner.cur.pages.len(), None);
        for p in std::mem::take(&mut inner.dirty) {
            if p < inner.cur.pages.len() {
                inner.durable.pages[p] = inner.cur.pages[p].clone();
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut g = self.lock();
        let inner = &mut *g;
        if offset + data.len() as u64 > inner.cur.len {
            return Err(out_of_range());
        }
        let mut done = 0;
        while done < data.len() {
            let at = offset as usize + done;
            let (p, off) = (at / PAGE, at % PAGE);
            let n = (PAGE - off).min(data.len() - done);
            let page = inner.cur.pages[p].get_or_insert_with(|| Arc::new([0; PAGE]));
            Arc::make_mut(page)[off..off + n].copy_from_slice(&data[done..done + n]);
            inner.dirty.insert(p);
            done += n;
        }
        Ok(())
    }
}

/// The crash model itself: only what was synced survives, through redb too.
#[cfg(test)]
mod tests {
    use redb::{ReadableDatabase, ReadableTable, StorageBackend, TableDefinition};

    use super::SimDisk;

    #[test]
    fn a_crash_keeps_what_was_synced() {
        let disk = SimDisk::default();
        disk.set_len(10_000).unwrap();
        disk.write(4000, &[1; 200]).unwrap();
        disk.sync_data().unwrap();
        disk.write(4100, &[2; 10]).unwrap();
        disk.set_len(20_000).unwrap();
        disk.kill();
        disk.crash(None::<&mut rand_chacha::ChaCha8Rng>);
        assert_eq!(disk.len().unwrap(), 10_000);
        let mut buf = [0; 200];
        disk.read(4000, &mut buf).unwrap();
        assert_eq!(buf, [1; 200], "synced bytes survive, unsynced ones do not");
    }

    #[test]
    fn redb_loses_non_durable_commits_only() {
        const T: TableDefinition<u64, u64> = TableDefinition::new("t");
        let disk = SimDisk::default();
        let db = redb::Database::builder().create_with_backend(disk.clone()).unwrap();
        for (k, durable) in [(1, true), (2, false)] {
            let mut txn = db.begin_write().unwrap();
            if !durable {
                txn.set_durability(redb::Durability::None).unwrap();
            }
            txn.open_table(T).unwrap().insert(k, k).unwrap();
            txn.commit().unwrap();
        }
        disk.kill();
        drop(db);
        assert_eq!(disk.handles(), 1);
        disk.crash(None::<&mut rand_chacha::ChaCha8Rng>);
        let db = redb::Database::builder().create_with_backend(disk.clone()).unwrap();
        let txn = db.begin_read().unwrap();
        let keys: Vec<u64> = txn.open_table(T).unwrap().iter().unwrap().map(|r| r.unwrap().0.value()).collect();
        assert_eq!(keys, vec![1]);
    }
}
