//! The content of one open file as the mount sees it: the committed extents, with the chunks an
//! application changed held in memory (copy-on-write, one chunk at a time) or uploading in the
//! background. Nothing is visible to other clients until [`FileState::sync`] commits the new
//! extent list in one metadata call (close, fsync): readers elsewhere see the old content or the
//! new, never a mix (close-to-open consistency, as NFS gives).
//!
//! Memory is bounded per file: a chunk that is not being written any more starts uploading at
//! once, and a writer waits when [`MAX_UPLOADS`] chunks of its file are still on their way.
//!
//! Two mounts may change one file at once. A commit names the version its extent list was made
//! from, and fails if another commit came in between; the mount then merges, as NFS clients
//! writing different byte ranges of one file would see it: the bytes this mount wrote (and the
//! size it set) go onto the newer version, which keeps everything else (see [`FileState::sync`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use cairn_client::{Client, Error, Result};
use cairn_proto::v1::{node_request, Attr, CommitNode, Extent, ExtentLocation, OpenFileResponse};
use cairn_proto::{MAX_EXTENTS, MAX_FILE_SIZE};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::cache::ChunkCache;

/// Largest chunk the mount writes (the cluster's maximum).
pub const CHUNK: usize = cairn_proto::MAX_CHUNK as usize;
/// Reads at least this large fetch (and cache) the whole chunk.
const WHOLE_CHUNK_READ: u64 = 32 << 10;
/// A file written for this long without a commit is committed anyway: uploaded chunks are
/// protected from garbage collection only for the masters' grace period (`--gc-grace-s`, an
/// hour by default), so a file kept open and written for hours must not wait for its close.
const COMMIT_AT_LEAST_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// Chunks of one file uploading at once before its writer waits.
const MAX_UPLOADS: usize = 8;
/// Merges onto another mount's newer commit before a commit gives up.
const MERGE_ATTEMPTS: usize = 10;
/// Written byte ranges a file remembers for a merge; past this, the closest two are joined (a
/// merge then also rewrites the other mount's bytes between them).
const MAX_RANGES: usize = 4096;

/// What every open file shares.
pub struct Ctx {
    pub client: Client,
    pub cache: Arc<ChunkCache>,
    pub replication: u32,
    /// Uploads in flight over all files.
    pub uploads: Arc<Semaphore>,
    /// Chunks held in memory (being written or uploading) over all open files, and the most
    /// there should be: a writer over the limit uploads its own chunks before it goes on.
    pub in_memory: Arc<AtomicUsize>,
    pub max_in_memory: usize,
}

/// Which chunks of this file are in memory (dirty or uploading), by index, counted in
/// [`Ctx::in_memory`] too and given back when the file state goes. Per-write work walks these,
/// never the whole file.
struct InMemory {
    total: Arc<AtomicUsize>,
    segs: std::collections::BTreeSet<usize>,
}

impl InMemory {
    fn add(&mut self, i: usize) {
        if self.segs.insert(i) {
            self.total.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn remove(&mut self, i: usize) {
        if self.segs.remove(&i) {
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
    }
    /// Forgets every index from `i` on (those chunks were dropped).
    fn drop_from(&mut self, i: usize) {
        let gone = self.segs.split_off(&i).len();
        self.total.fetch_sub(gone, Ordering::Relaxed);
    }
    fn list(&self) -> Vec<usize> {
        self.segs.iter().copied().collect()
    }
}

impl Drop for InMemory {
    fn drop(&mut self) {
        self.total.fetch_sub(self.segs.len(), Ordering::Relaxed);
    }
}

enum Seg {
    /// A stored chunk. Replicas are those its upload named; unknown (empty) only where the masters
    /// did not say: then its bytes are in the cache, or the file is committed and looked up again.
    Clean(ExtentLocation),
    Dirty(BytesMut),
    Uploading(Bytes, JoinHandle<Result<ExtentLocation>>),
}

impl Seg {
    /// The stored chunk this is (hash, length), if it is one.
    fn stored(&self) -> Option<&Extent> {
        match self {
            Seg::Clean(l) => l.extent.as_ref(),
            _ => None,
        }
    }

    fn len(&self) -> u64 {
        match self {
            Seg::Clean(l) => l.extent.as_ref().map_or(0, |e| e.length),
            Seg::Dirty(b) => b.len() as u64,
            Seg::Uploading(b, _) => b.len() as u64,
        }
    }
}

/// The byte ranges written since the last commit, joined where they touch: start to end.
#[derive(Default, Clone)]
struct Ranges(std::collections::BTreeMap<u64, u64>);

impl Ranges {
    fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Every range that overlaps or touches [start, end) joins it.
        let touching: Vec<(u64, u64)> =
            self.0.range(..=end).rev().take_while(|&(_, &e)| e >= start).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in touching {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
        if self.0.len() > MAX_RANGES {
            let v: Vec<(u64, u64)> = self.0.iter().map(|(&s, &e)| (s, e)).collect();
            let i = (1..v.len()).min_by_key(|&i| v[i].0 - v[i - 1].1).expect("more than one range");
            self.0.remove(&v[i].0);
            self.0.insert(v[i - 1].0, v[i].1);
        }
    }

    /// The ranges, cut to end at `size`.
    fn below(&self, size: u64) -> Vec<(u64, u64)> {
        self.0.iter().filter(|&(&s, _)| s < size).map(|(&s, &e)| (s, e.min(size))).collect()
    }
}

/// Where the last of `segs` (starting at `starts`) ends: the size of the content they make.
fn end_of(starts: &[u64], segs: &[Seg]) -> u64 {
    starts.last().zip(segs.last()).map_or(0, |(s, seg)| s + seg.len())
}

/// This mount's content of a file during a merge: stored chunks only (all were uploaded).
struct Mine {
    segs: Vec<Seg>,
    starts: Vec<u64>,
}

impl Mine {
    fn size(&self) -> u64 {
        end_of(&self.starts, &self.segs)
    }

    /// The stored chunk holding byte `pos`, and the offset of `pos` in it.
    fn piece_at(&self, pos: u64) -> Result<(&ExtentLocation, u64)> {
        let i = self.starts.partition_point(|&s| s <= pos).checked_sub(1);
        match i.filter(|&i| pos < self.starts[i] + self.segs[i].len()).map(|i| (&self.segs[i], self.starts[i])) {
            Some((Seg::Clean(loc), start)) => Ok((loc, pos - start)),
            _ => Err(Error::Internal(format!("merge: no stored chunk of this mount at byte {pos}"))),
        }
    }
}

/// One piece of a read, planned under the file's lock and fetched after it is released.
pub enum Piece {
    Mem(Bytes),
    /// `[from, to)` of a stored chunk; `whole`: fetch the whole chunk (verified, cached) and cut.
    Chunk {
        loc: ExtentLocation,
        from: u64,
        to: u64,
        whole: bool,
    },
}

pub struct FileState {
    pub ino: u64,
    pub attr: Attr,
    segs: Vec<Seg>,
    /// Byte offset of each seg in the file. Only the last seg ever changes length (appends, a
    /// truncate that cuts one), so these stay right as segs are pushed and dropped.
    starts: Vec<u64>,
    loaded: bool,
    pub dirty: bool,
    /// The chunk the latest write went to: it stays in memory while the writer is on it.
    last_written: Option<usize>,
    mem: InMemory,
    /// When the first change since the last commit was made.
    changed_since: Option<std::time::Instant>,
    /// The version of the file `segs` were made from: the next commit names it.
    base_version: u64,
    /// What changed since then, for a merge: the ranges written, and the smallest size the file
    /// was cut to or grown from (everything from there on is this mount's).
    written: Ranges,
    resized_from: Option<u64>,
    /// A commit since this was last cleared merged onto another mount's commit.
    pub merged: bool,
    /// Until when the file is known to have no `security.capability` (as an open, create or
    /// fetch here saw it); `None` when unknown or when it had one. See [`CAPABILITY`].
    pub no_capability_until: Option<std::time::Instant>,
}

/// The extended attribute the kernel reads before writes and chowns (`security.capability`),
/// to drop file capabilities. An open file answers "none" from what its open (or create) saw,
/// for at most the attribute TTL counted from before that call (the staleness the kernel allows
/// its cached mode bits, set-user-ID included), unless an xattr changed through this mount since;
/// a file that had one is asked about again.
pub const CAPABILITY: &str = "security.capability";

impl FileState {
    pub fn new(attr: Attr, ctx: &Ctx) -> FileState {
        FileState {
            ino: attr.inode,
            base_version: attr.version,
            attr,
            segs: Vec::new(),
            starts: Vec::new(),
            loaded: false,
            dirty: false,
            last_written: None,
            mem: InMemory { total: ctx.in_memory.clone(), segs: Default::default() },
            changed_since: None,
            written: Ranges::default(),
            resized_from: None,
            merged: false,
            no_capability_until: None,
        }
    }

    /// The file's size including changes not yet committed.
    pub fn size(&self) -> u64 {
        if self.loaded {
            self.size_of_segs()
        } else {
            self.attr.size
        }
    }

    async fn load(&mut self, ctx: &Ctx) -> Result<()> {
        if self.loaded {
            return Ok(());
        }
        let r = ctx.client.open_inode(self.ino).await?;
        if let Some(a) = r.attr {
            self.attr = a;
        }
        self.set_segs(r.extents);
        self.loaded = true;
        Ok(())
    }

    /// A file this mount has just made: empty, with nothing to fetch from the masters before
    /// its first write (which would otherwise ask for its extents). With `no_capability_until`,
    /// it has no `security.capability` until then (see [`CAPABILITY`]).
    pub fn made_empty(&mut self, no_capability_until: Option<std::time::Instant>) {
        if !self.loaded && !self.dirty && self.attr.size == 0 {
            self.set_segs(Vec::new());
            self.loaded = true;
            self.no_capability_until = no_capability_until;
        }
    }

    /// Takes the masters' view of the file from an open: a newer version than this mount's (another
    /// client committed) replaces what is known here. An older answer (raced by this mount's own
    /// commit) and files with uncommitted writes are left alone.
    pub fn refresh(&mut self, file: OpenFileResponse) {
        let Some(attr) = file.attr else { return };
        let newer = attr.version > self.attr.version || (!self.loaded && attr.version == self.attr.version);
        if self.dirty || !newer {
            return;
        }
        self.attr = attr;
        self.set_segs(file.extents);
        self.loaded = true;
        self.last_written = None;
    }

    /// The stored extents of a commit from the masters (the version in `attr`), with nothing in
    /// memory (what was, such as the last chunk of a failed truncate, is forgotten with its
    /// indexes) and no changes since.
    fn set_segs(&mut self, extents: Vec<ExtentLocation>) {
        self.drop_from(0);
        self.rebase();
        for e in extents {
            self.push_seg(Seg::Clean(e));
        }
    }

    /// The content is now that of the version in `attr`, with no changes since.
    fn rebase(&mut self) {
        self.base_version = self.attr.version;
        self.written = Ranges::default();
        self.resized_from = None;
    }

    fn push_seg(&mut self, seg: Seg) {
        let start = self.size_of_segs();
        self.starts.push(start);
        self.segs.push(seg);
    }

    fn size_of_segs(&self) -> u64 {
        end_of(&self.starts, &self.segs)
    }

    /// The seg holding byte `pos` and the offset in it; past the end: (number of segs, 0).
    fn find(&self, pos: u64) -> (usize, usize) {
        if pos >= self.size_of_segs() {
            return (self.segs.len(), 0);
        }
        let i = self.starts.partition_point(|&s| s <= pos) - 1;
        (i, (pos - self.starts[i]) as usize)
    }

    /// Makes sure seg `i` (a stored chunk) has known replicas, committing and looking the file
    /// up again if it was uploaded by this mount and its bytes left the cache.
    async fn locate(&mut self, ctx: &Ctx, i: usize) -> Result<()> {
        let needs = matches!(&self.segs[i], Seg::Clean(l) if l.replicas.is_empty()
            && ctx.cache.get(&l.extent.as_ref().map(|e| e.hash.clone()).unwrap_or_default()).is_none());
        if needs {
            // Where chunk `i` lies and what it holds: the caller's offsets depend on both.
            let layout = |segs: &[Seg]| {
                let lengths: Vec<u64> = segs.iter().take(i + 1).map(Seg::len).collect();
                (lengths, segs.get(i).and_then(Seg::stored).cloned())
            };
            let before = layout(&self.segs);
            // Boxed: a sync may merge, and a merge reads chunks (rarely, through here).
            Box::pin(self.sync(ctx)).await?;
            self.loaded = false;
            self.load(ctx).await?;
            // Another client's commit in between may have changed the file.
            if layout(&self.segs) != before {
                return Err(Error::Internal("the file changed under this mount".into()));
            }
        }
        Ok(())
    }

    /// The whole chunk of seg `i` (a stored chunk), from the cache or a replica.
    async fn chunk_bytes(&mut self, ctx: &Ctx, i: usize) -> Result<Bytes> {
        self.locate(ctx, i).await?;
        let Seg::Clean(loc) = &self.segs[i] else {
            return Err(Error::Internal("chunk_bytes on a chunk in memory".into()));
        };
        fetch_whole(ctx, loc).await
    }

    /// Turns seg `i` into bytes in memory that writes can change.
    async fn make_dirty(&mut self, ctx: &Ctx, i: usize) -> Result<()> {
        let buf = match &mut self.segs[i] {
            Seg::Dirty(_) => return Ok(()),
            Seg::Uploading(data, task) => {
                task.abort();
                BytesMut::from(&data[..])
            }
            Seg::Clean(_) => {
                let buf = BytesMut::from(&self.chunk_bytes(ctx, i).await?[..]);
                self.mem.add(i);
                buf
            }
        };
        self.segs[i] = Seg::Dirty(buf);
        Ok(())
    }

    /// Appends from `data` to the end of the file; returns how many bytes it took.
    async fn append(&mut self, ctx: &Ctx, data: &[u8]) -> Result<usize> {
        let last = self.segs.len().checked_sub(1);
        if let Some(i) = last {
            if self.segs[i].len() < CHUNK as u64 {
                self.make_dirty(ctx, i).await?;
                if let Seg::Dirty(buf) = &mut self.segs[i] {
                    let n = data.len().min(CHUNK - buf.len());
                    buf.extend_from_slice(&data[..n]);
                    self.last_written = Some(i);
                    return Ok(n);
                }
            }
        }
        let n = data.len().min(CHUNK);
        let mut buf = BytesMut::with_capacity(n);
        buf.extend_from_slice(&data[..n]);
        self.push_seg(Seg::Dirty(buf));
        self.mem.add(self.segs.len() - 1);
        self.last_written = Some(self.segs.len() - 1);
        Ok(n)
    }

    /// Extends the file by `n` zero bytes. Whole chunks of zeros are one stored chunk (equal
    /// content, one hash) placed once per call, so growing a file by 100 GiB costs no memory.
    async fn append_zeros(&mut self, ctx: &Ctx, mut n: u64) -> Result<()> {
        let zeros = Bytes::from(vec![0u8; (n as usize).min(CHUNK)]);
        let mut zero_chunk: Option<ExtentLocation> = None;
        while n > 0 {
            let last_full = self.segs.last().is_none_or(|s| s.len() == CHUNK as u64);
            if last_full && n >= CHUNK as u64 {
                if zero_chunk.is_none() {
                    let loc = ctx.client.upload(zeros.clone(), ctx.replication).await?;
                    ctx.cache.insert(&loc.extent.as_ref().map(|e| e.hash.clone()).unwrap_or_default(), zeros.clone());
                    zero_chunk = Some(loc);
                }
                self.push_seg(Seg::Clean(zero_chunk.clone().expect("set above")));
                self.dirty = true;
                n -= CHUNK as u64;
                continue;
            }
            let take = (n as usize).min(zeros.len());
            n -= self.append(ctx, &zeros[..take]).await? as u64;
        }
        self.upload_behind(ctx);
        Ok(())
    }

    /// Refuses to grow the file to `end` bytes past what one file may hold (in bytes, or in
    /// chunks: a file stored in smaller chunks holds less), before anything changes: otherwise
    /// the commit would fail for good, or a write far past the end would fill memory with
    /// chunks of zeros.
    fn check_growth(&self, end: u64) -> Result<()> {
        let size = self.size();
        if end <= size {
            return Ok(());
        }
        let chunks = self.segs.len() as u64 + (end - size).div_ceil(CHUNK as u64);
        if end > MAX_FILE_SIZE || chunks > MAX_EXTENTS as u64 {
            return Err(Error::TooLarge(format!(
                "{end} bytes (a file holds at most {MAX_FILE_SIZE} bytes in at most {MAX_EXTENTS} chunks)"
            )));
        }
        Ok(())
    }

    /// Grows the file with zeros to `end`. If that fails, the file is cut back to its size
    /// before, so a failed truncate or fallocate changes nothing (the last chunk may stay in
    /// memory, with its old bytes).
    async fn extend_to(&mut self, ctx: &Ctx, end: u64) -> Result<()> {
        let (cur, was_dirty) = (self.size(), self.dirty);
        self.check_growth(end)?;
        if let Err(e) = self.append_zeros(ctx, end - cur).await {
            self.dirty = was_dirty;
            let (i, inner) = self.find(cur);
            if inner > 0 {
                if let Seg::Dirty(buf) = &mut self.segs[i] {
                    buf.truncate(inner);
                }
                self.drop_from(i + 1);
            } else {
                self.drop_from(i);
            }
            if self.last_written.is_some_and(|w| w >= self.segs.len()) {
                self.last_written = None;
            }
            return Err(e);
        }
        Ok(())
    }

    pub async fn write(&mut self, ctx: &Ctx, off: u64, data: &[u8]) -> Result<()> {
        self.load(ctx).await?;
        self.check_growth(off.saturating_add(data.len() as u64))?;
        // Whatever part of the write lands must be committed, even if a later part fails.
        self.dirty = true;
        self.commit_if_old(ctx).await?;
        self.write_at(ctx, off, data).await
    }

    /// A write into the loaded file, remembered for a merge.
    async fn write_at(&mut self, ctx: &Ctx, off: u64, data: &[u8]) -> Result<()> {
        self.check_growth(off.saturating_add(data.len() as u64))?;
        self.dirty = true;
        self.written.insert(off, off + data.len() as u64);
        let mut size = self.size();
        if off > size {
            self.append_zeros(ctx, off - size).await?;
            size = off;
        }
        let (mut pos, mut rest) = (off, data);
        while !rest.is_empty() {
            let n = if pos == size {
                let n = self.append(ctx, rest).await?;
                size += n as u64;
                n
            } else {
                let (i, inner) = self.find(pos);
                self.make_dirty(ctx, i).await?;
                let Seg::Dirty(buf) = &mut self.segs[i] else { unreachable!("made dirty above") };
                let n = rest.len().min(buf.len() - inner);
                buf[inner..inner + n].copy_from_slice(&rest[..n]);
                self.last_written = Some(i);
                n
            };
            pos += n as u64;
            rest = &rest[n..];
        }
        self.dirty = true;
        self.upload_behind(ctx);
        self.limit_uploads(ctx).await?;
        self.relieve_memory(ctx).await
    }

    /// Starts uploading every chunk in memory except the one being written and a last chunk
    /// that is not full yet.
    fn upload_behind(&mut self, ctx: &Ctx) {
        let last = self.segs.len().saturating_sub(1);
        for i in self.mem.list() {
            let keep = Some(i) == self.last_written || (i == last && self.segs[i].len() < CHUNK as u64);
            if !keep {
                self.start_upload(ctx, i);
            }
        }
    }

    fn start_upload(&mut self, ctx: &Ctx, i: usize) {
        if !matches!(self.segs[i], Seg::Dirty(_)) {
            return;
        }
        let Seg::Dirty(buf) = std::mem::replace(&mut self.segs[i], Seg::Dirty(BytesMut::new())) else { return };
        let data = buf.freeze();
        let (client, cache, sem, replication) =
            (ctx.client.clone(), ctx.cache.clone(), ctx.uploads.clone(), ctx.replication);
        let d = data.clone();
        let task = tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(|_| Error::Internal("mount shutting down".into()))?;
            let loc = client.upload(d.clone(), replication).await?;
            cache.insert(&loc.extent.as_ref().map(|e| e.hash.clone()).unwrap_or_default(), d);
            Ok(loc)
        });
        self.segs[i] = Seg::Uploading(data, task);
    }

    /// Whether the file has been changing without a commit for [`COMMIT_AT_LEAST_EVERY`].
    pub fn commit_due(&self) -> bool {
        self.dirty && self.changed_since.is_some_and(|t| t.elapsed() >= COMMIT_AT_LEAST_EVERY)
    }

    /// Commits a file that has been changing without a commit for [`COMMIT_AT_LEAST_EVERY`].
    async fn commit_if_old(&mut self, ctx: &Ctx) -> Result<()> {
        match self.changed_since {
            None => {
                self.changed_since = Some(std::time::Instant::now());
                Ok(())
            }
            Some(t) if t.elapsed() >= COMMIT_AT_LEAST_EVERY => {
                self.sync(ctx).await?;
                self.dirty = true; // the write that asked goes on
                self.changed_since = Some(std::time::Instant::now());
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }

    /// Waits for the oldest uploads while too many of this file's chunks are in flight.
    async fn limit_uploads(&mut self, ctx: &Ctx) -> Result<()> {
        loop {
            let uploading: Vec<usize> =
                self.mem.segs.iter().copied().filter(|&i| matches!(self.segs[i], Seg::Uploading(..))).collect();
            if uploading.len() <= MAX_UPLOADS {
                return Ok(());
            }
            self.finish(ctx, uploading[0]).await?;
        }
    }

    /// Waits for seg `i`'s upload. A failed upload keeps its bytes in memory for the next try.
    async fn finish(&mut self, _ctx: &Ctx, i: usize) -> Result<()> {
        let Seg::Uploading(data, _) = &self.segs[i] else { return Ok(()) };
        let data = data.clone();
        let Seg::Uploading(_, task) = std::mem::replace(&mut self.segs[i], Seg::Dirty(BytesMut::new())) else {
            unreachable!("matched above")
        };
        match task.await {
            Ok(Ok(loc)) => {
                self.segs[i] = Seg::Clean(loc);
                self.mem.remove(i);
                Ok(())
            }
            Ok(Err(e)) => {
                self.segs[i] = Seg::Dirty(BytesMut::from(&data[..]));
                Err(e)
            }
            Err(e) => {
                self.segs[i] = Seg::Dirty(BytesMut::from(&data[..]));
                Err(Error::Internal(format!("upload task: {e}")))
            }
        }
    }

    /// Cuts or extends the file (zeros) to `size`; committed by the next [`FileState::sync`].
    pub async fn truncate(&mut self, ctx: &Ctx, size: u64) -> Result<()> {
        self.load(ctx).await?;
        let cur = self.size();
        self.resize(ctx, size).await?;
        self.resized(cur.min(size));
        Ok(())
    }

    /// Notes for a merge that everything from `from` on is this mount's.
    fn resized(&mut self, from: u64) {
        self.resized_from = Some(self.resized_from.map_or(from, |r| r.min(from)));
    }

    async fn resize(&mut self, ctx: &Ctx, size: u64) -> Result<()> {
        let cur = self.size();
        if size > cur {
            self.extend_to(ctx, size).await?;
        } else if size < cur {
            let (i, inner) = self.find(size);
            if inner == 0 {
                self.drop_from(i);
            } else {
                self.make_dirty(ctx, i).await?;
                if let Seg::Dirty(buf) = &mut self.segs[i] {
                    buf.truncate(inner);
                }
                self.drop_from(i + 1);
            }
        }
        self.dirty = true;
        self.last_written = None;
        Ok(())
    }

    /// posix_fallocate: the file grows to at least `end` (unless `keep_size`); either way the
    /// next sync commits, which updates its times.
    pub async fn allocate(&mut self, ctx: &Ctx, end: u64, keep_size: bool) -> Result<()> {
        self.load(ctx).await?;
        let cur = self.size();
        if end > cur && !keep_size {
            self.extend_to(ctx, end).await?;
            self.resized(cur);
        } else {
            self.check_growth(end)?;
        }
        self.dirty = true;
        Ok(())
    }

    fn drop_from(&mut self, i: usize) {
        for s in self.segs.drain(i..) {
            if let Seg::Uploading(_, task) = s {
                task.abort();
            }
        }
        self.starts.truncate(i);
        self.mem.drop_from(i);
    }

    /// Over the mount's memory limit: uploads and waits for every chunk of this file that is in
    /// memory, except the one being written (each writer keeps one, so many files with a small
    /// tail each do not upload their tails again on every write).
    async fn relieve_memory(&mut self, ctx: &Ctx) -> Result<()> {
        if ctx.in_memory.load(Ordering::Relaxed) <= ctx.max_in_memory || self.mem.segs.len() <= 1 {
            return Ok(());
        }
        for i in self.mem.list() {
            if Some(i) != self.last_written {
                self.start_upload(ctx, i);
            }
        }
        for i in self.mem.list() {
            self.finish(ctx, i).await?;
        }
        Ok(())
    }

    /// Uploads what is in memory and commits the extent list. Returns the committed attributes.
    /// If another mount committed the file since this one loaded it, merges onto that (see
    /// [`FileState::merge`]) and commits again.
    pub async fn sync(&mut self, ctx: &Ctx) -> Result<Attr> {
        if !self.dirty {
            return Ok(self.attr.clone());
        }
        let mut merges = 0;
        loop {
            self.upload_all(ctx).await?;
            let extents: Vec<Extent> = self.segs.iter().filter_map(|s| s.stored().cloned()).collect();
            let commit = CommitNode { inode: self.ino, extents, base_version: Some(self.base_version) };
            match ctx.client.node_attr(node_request::Op::Commit(commit)).await {
                Ok(attr) => {
                    self.attr = attr.clone();
                    self.rebase();
                    self.dirty = false;
                    self.last_written = None;
                    self.changed_since = None;
                    return Ok(attr);
                }
                Err(Error::Changed(m)) if merges < MERGE_ATTEMPTS => {
                    tracing::debug!(inode = self.ino, "merging onto another mount's commit: {m}");
                    merges += 1;
                    self.merged = true;
                    self.merge(ctx).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts uploading every chunk in memory and waits for them all.
    async fn upload_all(&mut self, ctx: &Ctx) -> Result<()> {
        for i in self.mem.list() {
            self.start_upload(ctx, i);
        }
        let mut first_err = None;
        for i in self.mem.list() {
            if let Err(e) = self.finish(ctx, i).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Takes the file's newest commit and puts onto it what this mount changed since the version
    /// it started from: the bytes it wrote and, if it cut or grew the file, the size it set
    /// (everything from where that began). Every chunk is uploaded when this runs; this mount's
    /// bytes are read back from the cache or the replicas the uploads named. If that fails, the
    /// file is left as it was, for a later try.
    async fn merge(&mut self, ctx: &Ctx) -> Result<()> {
        let newest = ctx.client.open_inode(self.ino).await?;
        let mine = Mine { segs: std::mem::take(&mut self.segs), starts: std::mem::take(&mut self.starts) };
        let (attr, base_version, resized_from) = (self.attr.clone(), self.base_version, self.resized_from);
        let written = std::mem::take(&mut self.written);
        let merged = self.merge_onto(ctx, newest, &mine, written.below(mine.size()), resized_from).await;
        if merged.is_err() {
            self.drop_from(0);
            (self.segs, self.starts) = (mine.segs, mine.starts);
            (self.attr, self.base_version, self.written, self.resized_from) =
                (attr, base_version, written, resized_from);
        }
        self.last_written = None;
        self.dirty = true;
        merged
    }

    async fn merge_onto(
        &mut self,
        ctx: &Ctx,
        newest: OpenFileResponse,
        mine: &Mine,
        mut ranges: Vec<(u64, u64)>,
        resized_from: Option<u64>,
    ) -> Result<()> {
        if let Some(r) = resized_from {
            ranges.retain(|&(s, _)| s < r);
            if let Some(last) = ranges.last_mut() {
                last.1 = last.1.min(r);
            }
            if r < mine.size() {
                ranges.push((r, mine.size()));
            }
        }
        if let Some(a) = newest.attr {
            self.attr = a;
        }
        self.set_segs(newest.extents);
        if let Some(r) = resized_from {
            if self.size() > r {
                self.resize(ctx, r).await?;
            }
            self.resized(r);
        }
        for (start, end) in ranges {
            let mut pos = start;
            while pos < end {
                let (loc, from) = mine.piece_at(pos)?;
                let bytes = fetch_whole(ctx, loc).await?;
                let n = (end - pos).min(bytes.len() as u64 - from);
                self.write_at(ctx, pos, &bytes[from as usize..(from + n) as usize]).await?;
                pos += n;
            }
        }
        Ok(())
    }

    /// Plans a read of `[off, off + len)`: bytes in memory now, stored chunks to fetch after the
    /// lock is released. `sequential`: fetch whole chunks (they are cached for the next reads).
    pub async fn plan_read(&mut self, ctx: &Ctx, off: u64, len: u64, sequential: bool) -> Result<Vec<Piece>> {
        self.load(ctx).await?;
        let end = (off + len).min(self.size());
        let mut out = Vec::new();
        let (mut i, _) = self.find(off);
        while i < self.segs.len() && self.starts[i] < end {
            let slen = self.segs[i].len();
            let (s, e) = (self.starts[i], self.starts[i] + slen);
            if e > off {
                let from = off.max(s) - s;
                let to = end.min(e) - s;
                match &self.segs[i] {
                    Seg::Dirty(b) => out.push(Piece::Mem(Bytes::copy_from_slice(&b[from as usize..to as usize]))),
                    Seg::Uploading(b, _) => out.push(Piece::Mem(b.slice(from as usize..to as usize))),
                    Seg::Clean(l) if ctx.cache.peek(l).is_some() => {
                        let b = ctx.cache.peek(l).expect("checked");
                        out.push(Piece::Mem(b.slice(from as usize..to as usize)));
                    }
                    Seg::Clean(_) => {
                        self.locate(ctx, i).await?;
                        let Seg::Clean(loc) = &self.segs[i] else {
                            return Err(Error::Internal("chunk changed while reading".into()));
                        };
                        // Small reads far apart fetch just their bytes; anything else the whole
                        // chunk, which the next reads then find in the cache.
                        let whole = sequential
                            || to - from >= WHOLE_CHUNK_READ
                            || (to - from) * 4 >= slen
                            || loc.replicas.is_empty();
                        out.push(Piece::Chunk { loc: loc.clone(), from, to, whole });
                    }
                }
            }
            i += 1;
        }
        Ok(out)
    }

    /// Takes where the chunks of this file are now (from a fresh look-up of any version): a read
    /// whose replicas all failed may find a chunk moved since the open (a drain, a repair).
    pub fn relocate(&mut self, fresh: Vec<ExtentLocation>) {
        let now: std::collections::HashMap<Vec<u8>, Vec<_>> =
            fresh.into_iter().filter_map(|l| Some((l.extent?.hash, l.replicas))).collect();
        for seg in &mut self.segs {
            if let Seg::Clean(loc) = seg {
                if let Some(replicas) = loc.extent.as_ref().and_then(|e| now.get(&e.hash)) {
                    loc.replicas = replicas.clone();
                }
            }
        }
    }

    /// The stored chunks after the one holding `pos` (up to `n`), to read ahead.
    pub fn next_chunks(&self, pos: u64, n: usize) -> Vec<ExtentLocation> {
        let (i, _) = self.find(pos);
        self.segs
            .iter()
            .skip(i + 1)
            .take(n)
            .filter_map(|s| match s {
                Seg::Clean(l) if !l.replicas.is_empty() => Some(l.clone()),
                _ => None,
            })
            .collect()
    }
}

/// A whole chunk from the cache, or from a replica (verified against its hash, then cached).
pub async fn fetch_whole(ctx: &Ctx, loc: &ExtentLocation) -> Result<Bytes> {
    let ext = loc.extent.as_ref().ok_or_else(|| Error::Internal("extent location without extent".into()))?;
    if let Some(b) = ctx.cache.get(&ext.hash) {
        return Ok(b);
    }
    // Read-ahead and the kernel's parallel reads often want the same chunk at once.
    let gate = ctx.cache.gate(&ext.hash);
    let _fetching = gate.lock().await;
    if let Some(b) = ctx.cache.get(&ext.hash) {
        return Ok(b);
    }
    let b = ctx.client.read_extent(loc, 0, ext.length).await;
    if let Ok(b) = &b {
        ctx.cache.insert(&ext.hash, b.clone());
    }
    ctx.cache.fetched(&ext.hash);
    b
}

/// Fetches the pieces of a planned read and joins them.
pub async fn fetch(ctx: &Ctx, pieces: Vec<Piece>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for p in pieces {
        match p {
            Piece::Mem(b) => out.extend_from_slice(&b),
            Piece::Chunk { loc, from, to, whole: true } => {
                let b = fetch_whole(ctx, &loc).await?;
                out.extend_from_slice(&b[from as usize..to as usize]);
            }
            Piece::Chunk { loc, from, to, whole: false } => {
                let hash = loc.extent.as_ref().map(|e| e.hash.clone()).unwrap_or_default();
                match ctx.cache.get(&hash) {
                    Some(b) => out.extend_from_slice(&b[from as usize..to as usize]),
                    None => out.extend_from_slice(&ctx.client.read_extent(&loc, from, to).await?),
                }
            }
        }
    }
    Ok(out)
}
