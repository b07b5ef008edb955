//! A node's disk in memory, as redb storage backends (one per file: the database and the Raft log
//! files), that survives the `Database` being dropped and models a crash: writes land in the
//! current image, `sync_data` copies a file's writes to its durable image, and a crash reverts
//! every file to its durable image (optionally keeping a random part of the unsynced pages,
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

/// One file of a node's disk.
#[derive(Default)]
struct File {
    cur: Image,
    durable: Image,
    /// Pages of `cur` that may differ from `durable`.
    dirty: BTreeSet<usize>,
    /// The unsynced pages as they were when the process died: what a torn crash may keep.
    /// (What a dead process still writes, e.g. redb closing the database, never happened.)
    unsynced_at_death: Vec<(usize, Option<Page>)>,
}

#[derive(Default)]
struct Inner {
    files: Vec<File>,
    /// Syncs (of any file) that still reach the disk before the process dies (None: no death
    /// planned).
    syncs_left: Option<u32>,
    /// The process died: nothing more becomes durable, and what it sends is lost.
    dead: bool,
}

impl Inner {
    fn die(&mut self) {
        if !self.dead {
            self.dead = true;
            for f in &mut self.files {
                f.unsynced_at_death = f.dirty.iter().map(|&p| (p, f.cur.pages.get(p).cloned().flatten())).collect();
            }
        }
    }
}

/// A node's disk: every file of it shares one process that dies, and one power loss. A handle
/// is one file of it (the first one by default, see [`SimDisk::file`]).
#[derive(Clone, Default)]
pub struct SimDisk(Arc<Mutex<Inner>>, usize);

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.lock().files.get(self.1).map_or(0, |f| f.cur.len);
        f.debug_struct("SimDisk").field("file", &self.1).field("len", &len).finish()
    }
}

fn out_of_range() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "out of range")
}

impl SimDisk {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        let mut g = self.0.lock().expect("disk lock");
        if g.files.len() <= self.1 {
            g.files.resize_with(self.1 + 1, File::default);
        }
        g
    }

    /// Another file on the same disk.
    pub fn file(&self, i: usize) -> SimDisk {
        SimDisk(self.0.clone(), i)
    }

    /// Handles to this disk, the simulator's included: 1 once redb and the log have let go.
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

    /// Reverts every file to what the disk holds after power loss; `torn` keeps each unsynced
    /// page with probability one half. The process must be dead and redb must have let go.
    pub fn crash(&self, mut torn: Option<&mut impl Rng>) {
        let mut g = self.lock();
        let inner = &mut *g;
        assert!(inner.dead, "a crash kills the process first");
        for f in &mut inner.files {
            let unsynced = std::mem::take(&mut f.unsynced_at_death);
            if let Some(rng) = torn.as_deref_mut() {
                for (p, page) in unsynced {
                    if p < f.durable.pages.len() && rng.random_bool(0.5) {
                        f.durable.pages[p] = page;
                    }
                }
            }
            f.cur = f.durable.clone();
            f.dirty.clear();
        }
        inner.syncs_left = None;
        inner.dead = false;
    }
}

impl redb::StorageBackend for SimDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.lock().files[self.1].cur.len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let g = self.lock();
        let f = &g.files[self.1];
        if offset + out.len() as u64 > f.cur.len {
            return Err(out_of_range());
        }
        let mut done = 0;
        while done < out.len() {
            let at = offset as usize + done;
            let (p, off) = (at / PAGE, at % PAGE);
            let n = (PAGE - off).min(out.len() - done);
            match &f.cur.pages[p] {
                Some(page) => out[done..done + n].copy_from_slice(&page[off..off + n]),
                None => out[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut g = self.lock();
        let inner = &mut g.files[self.1];
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
        if g.dead {
            return Ok(());
        }
        if let Some(n) = g.syncs_left {
            if n == 0 {
                g.die();
                return Ok(());
            }
            g.syncs_left = Some(n - 1);
        }
        let inner = &mut g.files[self.1];
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
        let inner = &mut g.files[self.1];
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
        assert_eq!(keys_after_crash(&[(1, true), (2, false)], false), vec![1]);
        // An empty durable commit (a checkpoint of the namespace) persists the ones before it.
        assert_eq!(keys_after_crash(&[(1, true), (2, false), (3, false)], true), vec![1, 2, 3]);
    }

    #[test]
    fn files_of_one_disk_die_together() {
        let disk = SimDisk::default();
        let other = disk.file(1);
        other.set_len(4096).unwrap();
        other.write(0, &[1; 10]).unwrap();
        disk.die_at_sync(1);
        other.sync_data().unwrap();
        assert!(disk.dead(), "a sync of any file counts");
        drop(other);
        disk.crash(None::<&mut rand_chacha::ChaCha8Rng>);
        assert_eq!(disk.file(1).len().unwrap(), 0);
    }

    fn keys_after_crash(commits: &[(u64, bool)], checkpoint: bool) -> Vec<u64> {
        const T: TableDefinition<u64, u64> = TableDefinition::new("t");
        let disk = SimDisk::default();
        let db = redb::Database::builder().create_with_backend(disk.clone()).unwrap();
        for &(k, durable) in commits {
            let mut txn = db.begin_write().unwrap();
            if !durable {
                txn.set_durability(redb::Durability::None).unwrap();
            }
            txn.open_table(T).unwrap().insert(k, k).unwrap();
            txn.commit().unwrap();
        }
        if checkpoint {
            let txn = db.begin_write().unwrap();
            txn.open_table(T).unwrap();
            txn.commit().unwrap();
        }
        disk.kill();
        drop(db);
        assert_eq!(disk.handles(), 1);
        disk.crash(None::<&mut rand_chacha::ChaCha8Rng>);
        let db = redb::Database::builder().create_with_backend(disk.clone()).unwrap();
        let txn = db.begin_read().unwrap();
        txn.open_table(T).unwrap().iter().unwrap().map(|r| r.unwrap().0.value()).collect()
    }
}
