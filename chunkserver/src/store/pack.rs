//! Small chunks packed into append-only files, as Haystack and SeaweedFS store small blobs.
//!
//! A chunk of at most [`PACKED_MAX`] bytes is not a file of its own: it is appended to the
//! newest file under `packs/` as one record, and the group commit makes it durable with one
//! `fdatasync` of that file, shared by every chunk appended since the last one. A file per chunk
//! costs each replica a new inode, a rename and a share of two `syncfs` that write every inode
//! and directory block a batch touched; measured with 16 small puts in flight, packing takes
//! the cluster from about 1,200 to about 1,750 puts per second (see the README).
//!
//! A pack (`packs/<16 hex digits>.pack`, the id growing by one per pack) is a run of records:
//!
//! ```text
//! magic "CPK1" | kind u8 | 3 zero bytes | len u32 LE | BLAKE3 hash, 32 bytes | 4 zero bytes
//! | check u64 LE (the first 8 bytes of the BLAKE3 of the 48 bytes before it) | len data bytes
//! ```
//!
//! `kind` 1 is a chunk, 2 a tombstone (a deleted chunk; its 8 data bytes name the pack that
//! held the chunk's record, as a little-endian u64, so that compaction drops the tombstone once
//! that pack is gone). A pack is appended to until it reaches [`PACK_MAX`]; before the next one
//! is made the full one is synced, so only the newest pack can end with records that were never
//! acknowledged. At open every pack is read in id order (later records win). The newest is cut
//! at its first damaged header (a write torn by a crash: nothing after it can have been
//! acknowledged, since a sync makes everything before it durable), and its chunks are checked
//! against their hashes too, so that a torn record is not indexed. In an older pack a damaged
//! header ends the scan of that pack; reads check every chunk's hash anyway.
//!
//! When a pack is closed, its index (`packs/<id>.idx`: each record's kind, length, offset and
//! hash, and a BLAKE3 of the whole) is written beside it, so that a start reads 45 bytes per
//! closed record instead of the pack. The index is not synced: one that is missing, damaged or
//! made for another length of its pack is ignored, and the pack is read instead.
//!
//! A delete appends a tombstone without a sync (like the unsynced removal of a chunk file: lost
//! to a crash, the chunk comes back and the master deletes it again). A put of a chunk that
//! waited for its sync while another put of the same chunk was indexed and then deleted is
//! refused: the tombstone follows its record on disk.
//!
//! Deleted chunks leave dead records behind. A pack whose live records fill less than half of
//! it is compacted: its live records (and the tombstones whose chunk's pack still exists) are
//! appended to the newest pack, synced, and the old pack is removed.
//!
//! A failed `fdatasync` marks its pack failed for good: Linux reports a write-back error once,
//! so a later sync of the same file could succeed without the lost pages. Every record waiting
//! on that pack is answered with an error, and the next record goes to a new pack.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{write_err, ChunkHash, ChunkRead, Inner, Reservation, State, StoreError};

/// Chunks up to this size are packed; larger ones get a file of their own.
pub const PACKED_MAX: usize = 64 * 1024;
/// A pack is closed once it holds this many bytes.
const PACK_MAX: u64 = 64 << 20;
const HEADER: usize = 56;
const MAGIC: [u8; 4] = *b"CPK1";
pub(super) const KIND_CHUNK: u8 = 1;
const KIND_TOMBSTONE: u8 = 2;
/// A tombstone's data: the id of the pack that held the chunk.
const TOMBSTONE_LEN: u64 = 8;
/// Appended records waiting for a sync, at most; a full queue blocks the writer.
const SYNC_QUEUE: usize = 1024;
/// How often the compactor looks for packs that are mostly dead.
const COMPACT_EVERY: Duration = Duration::from_secs(30);

/// Where a packed chunk's record starts. Ordered as the records were appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Loc {
    pub pack: u64,
    pub offset: u64,
}

/// A pack's open file, and whether a sync of it ever failed.
pub(super) struct PackFile {
    file: File,
    failed: AtomicBool,
}

impl PackFile {
    fn new(file: File) -> Arc<PackFile> {
        Arc::new(PackFile { file, failed: AtomicBool::new(false) })
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// `fdatasync`, refused for good once one failed (see the module doc).
    fn sync(&self) -> io::Result<()> {
        if self.failed() {
            return Err(io::Error::other("an earlier fdatasync of this pack failed"));
        }
        self.file.sync_data().inspect_err(|_| self.failed.store(true, Ordering::Release))
    }
}

/// Puts of one chunk whose records are appended but not yet indexed.
#[derive(Default)]
pub(super) struct Appending {
    count: u32,
    /// The latest tombstone written for the chunk meanwhile: a record before it is dead on disk.
    killed_at: Option<Loc>,
}

/// One pack as the index sees it.
pub(super) struct PackInfo {
    file: Arc<PackFile>,
    /// Bytes of records written to it.
    size: u64,
    /// Bytes of its chunk records that the index still points at.
    live: u64,
    /// Records appended but not yet indexed (their puts wait for a sync); such a pack is not
    /// compacted, or their records would be left behind.
    pending: u32,
    /// Compaction met a damaged header in it: what follows (known from its index) cannot be
    /// copied, so the pack is kept as it is, and not read again every round.
    damaged: bool,
}

impl PackInfo {
    pub(super) fn size(&self) -> u64 {
        self.size
    }

    pub(super) fn live(&self) -> u64 {
        self.live
    }

    /// Counts a chunk record of `len` data bytes as dead.
    pub(super) fn forget(&mut self, len: u64) {
        self.live = self.live.saturating_sub(record_len(len));
    }
}

fn record_len(len: u64) -> u64 {
    HEADER as u64 + len
}

fn check(head: &[u8]) -> u64 {
    let h = blake3::hash(&head[..48]);
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// A tombstone record for `hash`, whose record is in pack `killed`.
fn tombstone(hash: &ChunkHash, killed: u64) -> Vec<u8> {
    let mut rec = encode(KIND_TOMBSTONE, TOMBSTONE_LEN as u32, hash).to_vec();
    rec.extend_from_slice(&killed.to_le_bytes());
    rec
}

pub(super) fn encode(kind: u8, len: u32, hash: &ChunkHash) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = kind;
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h[12..44].copy_from_slice(hash.as_bytes());
    let c = check(&h);
    h[48..56].copy_from_slice(&c.to_le_bytes());
    h
}

/// A header's (kind, len, hash), or `None` if it is not an intact header.
fn decode(h: &[u8; HEADER]) -> Option<(u8, u64, ChunkHash)> {
    if h[0..4] != MAGIC || u64::from_le_bytes(h[48..56].try_into().ok()?) != check(h) {
        return None;
    }
    let kind = h[4];
    let len = u64::from(u32::from_le_bytes(h[8..12].try_into().ok()?));
    let ok = match kind {
        KIND_CHUNK => (1..=PACKED_MAX as u64).contains(&len),
        KIND_TOMBSTONE => len == TOMBSTONE_LEN,
        _ => false,
    };
    ok.then(|| (kind, len, ChunkHash::from_slice(&h[12..44]).expect("32 bytes")))
}

fn pack_name(id: u64) -> String {
    format!("{id:016x}.pack")
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The pack being appended to. Lock order: this before the store's state.
pub(super) struct Writer {
    id: u64,
    file: Option<Arc<PackFile>>,
    end: u64,
    /// The records of the current pack, for its index file once it is closed.
    records: Vec<Record>,
    /// [`PACK_MAX`], smaller in tests.
    max: u64,
}

impl Writer {
    /// Appends `rec` to the current pack (a new one if it is full or failed) and returns where.
    /// A new pack is registered in `state` before anything is written to it.
    fn append(&mut self, dir: &Path, state: &Mutex<State>, rec: &[u8]) -> io::Result<(Loc, Arc<PackFile>)> {
        let full = self.end > 0 && self.end + rec.len() as u64 > self.max;
        if self.file.as_ref().is_none_or(|f| f.failed()) || full {
            self.rotate(dir, state)?;
        }
        let file = self.file.clone().expect("a pack is open after rotate");
        // A failed write leaves `end` where it was, so the next record overwrites the debris.
        file.file.write_all_at(rec, self.end)?;
        let loc = Loc { pack: self.id, offset: self.end };
        let hash = ChunkHash::from_slice(&rec[12..44]).expect("32 bytes");
        let len = (rec.len() - HEADER) as u64;
        self.records.push((hash, (rec[4] == KIND_CHUNK).then_some((len, loc))));
        self.end += rec.len() as u64;
        if let Some(p) = lock(state).packs.get_mut(&self.id) {
            p.size = self.end;
        }
        Ok((loc, file))
    }

    /// Closes the current pack (synced, so that only the newest pack can have a torn end) and
    /// starts the next, durable in the directory before any record goes into it.
    fn rotate(&mut self, dir: &Path, state: &Mutex<State>) -> io::Result<()> {
        // A failed pack is closed as it is: its waiting records are answered with errors.
        if let Some(f) = self.file.as_ref().filter(|f| !f.failed()) {
            f.sync()?;
            // Not synced: a missing or damaged index only means the pack is read at the next
            // start instead.
            if let Err(e) = write_index(dir, self.id, self.end, &self.records) {
                tracing::warn!(pack = %pack_name(self.id), error = %e, "cannot write a pack's index");
            }
        }
        let id = self.id + 1;
        let path = dir.join(pack_name(id));
        let file = PackFile::new(OpenOptions::new().read(true).write(true).create_new(true).open(&path)?);
        if let Err(e) = sync_dir(dir) {
            // Gone again, so that the next try can make it.
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        lock(state).packs.insert(id, PackInfo { file: file.clone(), size: 0, live: 0, pending: 0, damaged: false });
        *self = Writer { id, file: Some(file), end: 0, records: Vec::new(), max: self.max };
        Ok(())
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

type SyncJob = (Arc<PackFile>, oneshot::Sender<io::Result<()>>);

/// The packs of one store: the writer and the thread that syncs what it appended.
pub(super) struct Packs {
    dir: PathBuf,
    writer: Mutex<Writer>,
    sync: mpsc::Sender<SyncJob>,
}

impl Packs {
    fn writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes packs at `max` bytes instead of [`PACK_MAX`], so that tests see many.
    #[cfg(test)]
    pub(super) fn set_pack_max(&self, max: u64) {
        self.writer().max = max;
    }
}

/// Starts the sync thread: it takes every record waiting, syncs each pack they went to once,
/// and answers them all. It ends when the store is dropped.
fn start_syncer() -> io::Result<mpsc::Sender<SyncJob>> {
    let (tx, mut rx) = mpsc::channel::<SyncJob>(SYNC_QUEUE);
    std::thread::Builder::new().name("pack-sync".into()).spawn(move || {
        while let Some(batch) = super::commit::next_batch(&mut rx, SYNC_QUEUE) {
            // Each pack is synced once per batch; its outcome answers every record in it.
            type Outcome = Result<(), (io::ErrorKind, String)>;
            let mut synced: Vec<(Arc<PackFile>, Outcome)> = Vec::new();
            for (file, reply) in batch {
                let r = match synced.iter().find(|(f, _)| Arc::ptr_eq(f, &file)) {
                    Some((_, r)) => r.clone(),
                    None => {
                        let r = file.sync().map_err(|e| (e.kind(), format!("fdatasync of a pack: {e}")));
                        synced.push((file, r.clone()));
                        r
                    }
                };
                let _ = reply.send(r.map_err(|(kind, msg)| io::Error::new(kind, msg)));
            }
        }
    })?;
    Ok(tx)
}

/// What the scan of `packs/` found: the packs and, in order, the chunk records and tombstones.
pub(super) struct Scanned {
    pub packs: BTreeMap<u64, PackInfo>,
    pub records: Vec<Record>,
    writer: Writer,
}

/// The ids of the packs in `dir`, oldest first.
fn pack_ids(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| StoreError::io(format!("list {}", dir.display()), e))? {
        let entry = entry.map_err(|e| StoreError::io(format!("list {}", dir.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".idx") || name.ends_with(".idx.tmp") {
            continue;
        }
        match name.strip_suffix(".pack").filter(|h| h.len() == 16).and_then(|h| u64::from_str_radix(h, 16).ok()) {
            // The last id is refused: the next pack would have none.
            Some(id) if name == pack_name(id) && id < u64::MAX => ids.push(id),
            _ => tracing::warn!(path = %entry.path().display(), "not a pack; ignored"),
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Removes index temp files and indexes whose pack is gone (a crash during a rotation or a
/// compaction).
fn remove_stray_indexes(dir: &Path, ids: &[u64]) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).map_err(|e| StoreError::io(format!("list {}", dir.display()), e))? {
        let entry = entry.map_err(|e| StoreError::io(format!("list {}", dir.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stray = name.ends_with(".idx.tmp")
            || name.strip_suffix(".idx").is_some_and(|h| {
                u64::from_str_radix(h, 16).map_or(true, |id| !ids.contains(&id) || name != index_name(id))
            });
        if stray {
            tracing::info!(path = %entry.path().display(), "removing a stray pack index");
            fs::remove_file(entry.path())
                .map_err(|e| StoreError::io(format!("remove {}", entry.path().display()), e))?;
        }
    }
    Ok(())
}

/// A record as the index sees it: a chunk (its length and where its record is) or a tombstone.
type Record = (ChunkHash, Option<(u64, Loc)>);

const INDEX_MAGIC: [u8; 4] = *b"CPI1";
const INDEX_ENTRY: usize = 1 + 4 + 8 + 32;

fn index_name(id: u64) -> String {
    format!("{id:016x}.idx")
}

/// Writes the index of the closed pack `id` (`len` bytes of `records`): magic, record count,
/// pack length, then per record kind u8, data length u32, offset u64 (chunks; 0 for a
/// tombstone) and hash, then the BLAKE3 of all that. Written to a temp name and renamed, not
/// synced: [`read_index`] refuses an index that does not check out, and the pack is read.
fn write_index(dir: &Path, id: u64, len: u64, records: &[Record]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(16 + records.len() * INDEX_ENTRY + 32);
    buf.extend_from_slice(&INDEX_MAGIC);
    buf.extend_from_slice(&u32::try_from(records.len()).map_err(io::Error::other)?.to_le_bytes());
    buf.extend_from_slice(&len.to_le_bytes());
    for (hash, rec) in records {
        let (kind, len, offset) = match rec {
            Some((len, loc)) => (KIND_CHUNK, *len as u32, loc.offset),
            None => (KIND_TOMBSTONE, TOMBSTONE_LEN as u32, 0),
        };
        buf.push(kind);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&offset.to_le_bytes());
        buf.extend_from_slice(hash.as_bytes());
    }
    let sum = blake3::hash(&buf);
    buf.extend_from_slice(sum.as_bytes());
    let tmp = dir.join(format!("{}.tmp", index_name(id)));
    fs::write(&tmp, &buf)?;
    fs::rename(&tmp, dir.join(index_name(id)))
}

/// The records of pack `id` from its index, if there is one that is intact and made for a pack
/// of `pack_len` bytes.
fn read_index(dir: &Path, id: u64, pack_len: u64) -> Option<Vec<Record>> {
    let buf = fs::read(dir.join(index_name(id))).ok()?;
    let (body, sum) = buf.split_at_checked(buf.len().checked_sub(32)?)?;
    if body.len() < 16 || body[0..4] != INDEX_MAGIC || blake3::hash(body).as_bytes() != sum {
        tracing::warn!(index = %index_name(id), "damaged pack index; reading the pack instead");
        return None;
    }
    let count = u32::from_le_bytes(body[4..8].try_into().ok()?) as usize;
    let len = u64::from_le_bytes(body[8..16].try_into().ok()?);
    let entries = &body[16..];
    if len != pack_len || entries.len() != count.checked_mul(INDEX_ENTRY)? {
        tracing::warn!(index = %index_name(id), "pack index does not match its pack; reading the pack instead");
        return None;
    }
    let records = entries
        .chunks_exact(INDEX_ENTRY)
        .map(|e| {
            let len = u64::from(u32::from_le_bytes(e[1..5].try_into().expect("4 bytes")));
            let offset = u64::from_le_bytes(e[5..13].try_into().expect("8 bytes"));
            let hash = ChunkHash::from_slice(&e[13..45]).expect("32 bytes");
            (hash, (e[0] == KIND_CHUNK).then_some((len, Loc { pack: id, offset })))
        })
        .collect();
    Some(records)
}

/// Opens `dir` (made if missing) and reads every pack; see the module doc for what is checked.
pub(super) fn scan(dir: &Path) -> Result<Scanned, StoreError> {
    fs::create_dir_all(dir).map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
    let ids = pack_ids(dir)?;
    remove_stray_indexes(dir, &ids)?;
    let newest = ids.last().copied();
    let mut out = Scanned {
        packs: BTreeMap::new(),
        records: Vec::new(),
        writer: Writer { id: newest.unwrap_or(0), file: None, end: 0, records: Vec::new(), max: PACK_MAX },
    };
    for id in ids {
        let path = dir.join(pack_name(id));
        let is_newest = Some(id) == newest;
        let file = OpenOptions::new()
            .read(true)
            .write(is_newest)
            .open(&path)
            .map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
        let file_len = file.metadata().map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?.len();
        let mut records = Vec::new();
        let size = match (is_newest, read_index(dir, id, file_len)) {
            (false, Some(indexed)) => {
                records = indexed;
                file_len
            }
            // Without an index (the newest pack, or one whose index was lost or never written
            // because a sync failed), every record is checked against its hash.
            _ => scan_pack(&file, id, true, &mut records)
                .map_err(|e| StoreError::io(format!("read {}", path.display()), e))?,
        };
        if is_newest && size < file_len {
            tracing::warn!(path = %path.display(), kept = size, len = file_len, "cutting a pack's torn end");
            file.set_len(size)
                .and_then(|()| file.sync_all())
                .map_err(|e| StoreError::io(format!("cut {}", path.display()), e))?;
        } else if size < file_len {
            tracing::error!(path = %path.display(), at = size, len = file_len, "damaged record in a pack; the rest of it is not indexed");
        }
        let file = PackFile::new(file);
        if is_newest {
            out.writer = Writer { id, file: Some(file.clone()), end: size, records: records.clone(), max: PACK_MAX };
        }
        out.records.extend(records);
        out.packs.insert(id, PackInfo { file, size: file_len.max(size), live: 0, pending: 0, damaged: false });
    }
    Ok(out)
}

/// The chunks packed in the store at `data_dir`, read from its packs without opening the store
/// (it may be running): for tools and tests that look at what a node holds on disk.
pub fn packed_chunks(data_dir: &Path) -> Result<HashSet<ChunkHash>, StoreError> {
    let dir = data_dir.join("packs");
    if !dir.is_dir() {
        return Ok(HashSet::new());
    }
    let mut records = Vec::new();
    for id in pack_ids(&dir)? {
        let path = dir.join(pack_name(id));
        let file = File::open(&path).map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
        let len = file.metadata().map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?.len();
        match read_index(&dir, id, len) {
            Some(indexed) => records.extend(indexed),
            None => {
                scan_pack(&file, id, false, &mut records)
                    .map_err(|e| StoreError::io(format!("read {}", path.display()), e))?;
            }
        }
    }
    let mut live = HashSet::new();
    for (hash, rec) in records {
        if rec.is_some() {
            live.insert(hash);
        } else {
            live.remove(&hash);
        }
    }
    Ok(live)
}

/// Reads the records of one pack into `records` and returns where the intact ones end. With
/// `verify`, each chunk's data must match its hash too.
fn scan_pack(file: &File, id: u64, verify: bool, records: &mut Vec<Record>) -> io::Result<u64> {
    let mut r = BufReader::with_capacity(1 << 20, ReadAt { file, pos: 0 });
    let mut pos = 0u64;
    let mut data = Vec::new();
    loop {
        let mut head = [0u8; HEADER];
        if !read_full(&mut r, &mut head)? {
            return Ok(pos);
        }
        let Some((kind, len, hash)) = decode(&head) else { return Ok(pos) };
        if kind == KIND_CHUNK {
            let intact = if verify {
                data.resize(len as usize, 0);
                if !read_full(&mut r, &mut data)? {
                    return Ok(pos);
                }
                ChunkHash::of(&data) == hash
            } else {
                r.seek_relative(len as i64)?;
                true
            };
            // A record whose data does not match was torn by a crash (never acknowledged) or
            // damaged since: either way not indexed; the intact header says where the next is.
            if intact {
                records.push((hash, Some((len, Loc { pack: id, offset: pos }))));
            } else {
                tracing::warn!(pack = %pack_name(id), offset = pos, %hash, "packed chunk does not match its hash; not indexed");
            }
        } else {
            let mut killed = [0u8; TOMBSTONE_LEN as usize];
            if !read_full(&mut r, &mut killed)? {
                return Ok(pos);
            }
            records.push((hash, None));
        }
        pos += record_len(len);
    }
}

/// Reads a file from the start with `pread`, leaving the descriptor's own offset alone: a pack's
/// file is shared (reads, the writer, compaction), and a scan that moved its offset would make
/// the next sequential reader start at the end and see no records.
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for ReadAt<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(n) => n,
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).ok_or(io::ErrorKind::InvalidInput)?,
            SeekFrom::End(d) => self.file.metadata()?.len().checked_add_signed(d).ok_or(io::ErrorKind::InvalidInput)?,
        };
        Ok(self.pos)
    }
}

/// Fills `buf`; false if the file ends first (a partial record counts as none).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

impl Packs {
    /// The packs in `dir`, appended to by `writer` (from [`Scanned::load`]); starts the sync
    /// thread.
    pub(super) fn start(dir: PathBuf, writer: Writer) -> io::Result<Packs> {
        Ok(Packs { dir, writer: Mutex::new(writer), sync: start_syncer()? })
    }
}

impl Scanned {
    /// Applies the records to the index in `state` (chunks in their own files win over packed
    /// copies), counts each pack's live bytes, and hands over the writer.
    pub(super) fn load(self, state: &mut State) -> Writer {
        for (hash, rec) in self.records {
            match rec {
                Some((len, loc)) => {
                    if state.index.contains_key(&hash) && !state.packed.contains_key(&hash) {
                        continue;
                    }
                    if state.index.insert(hash, len).is_none() {
                        state.used += len;
                    }
                    state.packed.insert(hash, loc);
                }
                None => {
                    if state.packed.remove(&hash).is_some() {
                        if let Some(len) = state.index.remove(&hash) {
                            state.used = state.used.saturating_sub(len);
                        }
                    }
                }
            }
        }
        state.packs = self.packs;
        let lives: Vec<(u64, u64)> = state
            .packed
            .iter()
            .map(|(h, loc)| (loc.pack, record_len(state.index.get(h).copied().unwrap_or(0))))
            .collect();
        for (pack, bytes) in lives {
            if let Some(p) = state.packs.get_mut(&pack) {
                p.live += bytes;
            }
        }
        self.writer
    }
}

/// A record appended for a put and not yet indexed: keeps its pack from being compacted, and
/// its chunk's tombstones from being dropped or carried past it.
pub(super) struct Appended<'a> {
    inner: &'a Inner,
    hash: ChunkHash,
    loc: Loc,
    file: Arc<PackFile>,
    len: u64,
    _reservation: Reservation<'a>,
}

impl Drop for Appended<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if let Some(p) = st.packs.get_mut(&self.loc.pack) {
            p.pending = p.pending.saturating_sub(1);
        }
        if let Some(a) = st.appending.get_mut(&self.hash) {
            a.count = a.count.saturating_sub(1);
            if a.count == 0 {
                st.appending.remove(&self.hash);
            }
        }
    }
}

impl Inner {
    /// Stores a small chunk in the newest pack; on `Ok` it is durable and indexed.
    pub(super) async fn put_packed(&self, hash: ChunkHash, data: &[u8]) -> Result<(), StoreError> {
        let Some(appended) = self.append_chunk(hash, data)? else { return Ok(()) };
        let (reply, done) = oneshot::channel();
        let synced = match self.packs.sync.send((appended.file.clone(), reply)).await {
            Ok(()) => done.await.unwrap_or_else(|_| Err(stopped())),
            Err(_) => Err(stopped()),
        };
        self.finish_packed(hash, appended, synced)
    }

    /// [`Inner::put_packed`] from a blocking thread.
    pub(super) fn put_packed_blocking(&self, hash: ChunkHash, data: &[u8]) -> Result<(), StoreError> {
        let Some(appended) = self.append_chunk(hash, data)? else { return Ok(()) };
        let (reply, done) = oneshot::channel();
        let synced = match self.packs.sync.blocking_send((appended.file.clone(), reply)) {
            Ok(()) => done.blocking_recv().unwrap_or_else(|_| Err(stopped())),
            Err(_) => Err(stopped()),
        };
        self.finish_packed(hash, appended, synced)
    }

    /// Checks a small chunk and appends its record. `None`: the store already holds it.
    pub(super) fn append_chunk(&self, hash: ChunkHash, data: &[u8]) -> Result<Option<Appended<'_>>, StoreError> {
        let len = data.len() as u64;
        if len == 0 || data.len() > PACKED_MAX {
            return Err(StoreError::Invalid(format!("packed chunk length {len} is not in 1..={PACKED_MAX}")));
        }
        if self.lock().index.contains_key(&hash) {
            return Ok(None);
        }
        let actual = ChunkHash::of(data);
        if actual != hash {
            return Err(StoreError::HashMismatch { expected: hash, actual });
        }
        let reservation = self.reserve(len)?;
        let mut rec = Vec::with_capacity(HEADER + data.len());
        rec.extend_from_slice(&encode(KIND_CHUNK, len as u32, &hash));
        rec.extend_from_slice(data);
        let mut w = self.packs.writer();
        let (loc, file) = w
            .append(&self.packs.dir, &self.state, &rec)
            .map_err(|e| write_err(format!("append to a pack in {}", self.packs.dir.display()), len, e))?;
        let mut st = self.lock();
        if let Some(p) = st.packs.get_mut(&loc.pack) {
            p.pending += 1;
        }
        st.appending.entry(hash).or_default().count += 1;
        drop(st);
        drop(w);
        Ok(Some(Appended { inner: self, hash, loc, file, len, _reservation: reservation }))
    }

    /// Indexes a packed chunk once its pack was synced.
    pub(super) fn finish_packed(
        &self,
        hash: ChunkHash,
        a: Appended<'_>,
        synced: io::Result<()>,
    ) -> Result<(), StoreError> {
        if let Err(e) = synced {
            return Err(write_err(format!("sync pack {}", pack_name(a.loc.pack)), a.len, e));
        }
        let mut st = self.lock();
        // Deleted while this record waited (after another put of it had indexed it): the
        // tombstone follows this record on disk, so a restart would not find it.
        if st.appending.get(&hash).and_then(|p| p.killed_at).is_some_and(|t| t > a.loc) {
            return Err(StoreError::io(
                format!("store chunk {hash}"),
                io::Error::other("deleted while it was being stored; store it again"),
            ));
        }
        // A concurrent put of the same chunk may have won: this record is then dead weight.
        if let std::collections::hash_map::Entry::Vacant(e) = st.index.entry(hash) {
            e.insert(a.len);
            st.used += a.len;
            st.packed.insert(hash, a.loc);
            if let Some(p) = st.packs.get_mut(&a.loc.pack) {
                p.live += record_len(a.len);
            }
        }
        st.removed.remove(&hash);
        st.added.insert(hash);
        Ok(())
    }

    /// Reads a packed chunk, checks it against its hash, and slices it. `None`: not packed.
    pub(super) fn get_packed(
        &self,
        hash: ChunkHash,
        offset: u64,
        length: u64,
    ) -> Option<Result<ChunkRead, StoreError>> {
        let (loc, len, file) = {
            let st = self.lock();
            let loc = *st.packed.get(&hash)?;
            (loc, st.index.get(&hash).copied()?, st.packs.get(&loc.pack)?.file.clone())
        };
        let mut buf = vec![0u8; record_len(len) as usize];
        if let Err(e) = file.file.read_exact_at(&mut buf, loc.offset) {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                self.drop_packed(hash, Some(&format!("record at {} of pack {} is cut short", loc.offset, loc.pack)));
                return Some(Err(StoreError::Corrupt(hash)));
            }
            return Some(Err(StoreError::io(format!("read pack {}", pack_name(loc.pack)), e)));
        }
        let head: &[u8; HEADER] = buf[..HEADER].try_into().expect("header length");
        let intact = decode(head).is_some_and(|(k, l, h)| k == KIND_CHUNK && l == len && h == hash)
            && ChunkHash::of(&buf[HEADER..]) == hash;
        if !intact {
            let _ = fs::write(
                self.corrupt_dir.join(format!("{}.{:08x}", hash.to_hex(), rand::random::<u32>())),
                &buf[HEADER..],
            );
            self.drop_packed(hash, Some(&format!("record at {} of pack {} does not match", loc.offset, loc.pack)));
            return Some(Err(StoreError::Corrupt(hash)));
        }
        let end = match super::range_end(offset, length, len) {
            Ok(end) => end,
            Err(e) => return Some(Err(e)),
        };
        let bytes = Bytes::from(buf).slice(HEADER + offset as usize..HEADER + end as usize);
        Some(Ok(ChunkRead { bytes, chunk_len: len }))
    }

    /// Forgets a packed chunk (deleted, or damaged: `why`) and appends its tombstone, so that it
    /// stays gone after a restart. Returns whether it was packed here.
    pub(super) fn drop_packed(&self, hash: ChunkHash, why: Option<&str>) -> bool {
        let mut w = self.packs.writer();
        let Some(loc) = self.lock().packed.get(&hash).copied() else { return false };
        if let Some(why) = why {
            tracing::error!(%hash, why, "corrupt packed chunk dropped (its bytes copied to corrupt/)");
        }
        self.forget(hash);
        // Not synced: like a removed chunk file, a tombstone lost to a crash brings the chunk
        // back, and the master then finds it unreferenced and deletes it again.
        match w.append(&self.packs.dir, &self.state, &tombstone(&hash, loc.pack)) {
            Ok((at, _)) => {
                if let Some(a) = self.lock().appending.get_mut(&hash) {
                    a.killed_at = a.killed_at.max(Some(at));
                }
            }
            Err(e) => {
                tracing::warn!(%hash, error = %e, "cannot append a tombstone; the chunk returns at the next start")
            }
        }
        true
    }

    /// Compacts every closed pack whose live records fill less than half of it; returns how many.
    pub(super) fn compact_packs(&self) -> usize {
        let due: Vec<u64> = {
            // Under the writer lock, so that no pack is made meanwhile and taken for closed.
            let w = self.packs.writer();
            let st = self.lock();
            st.packs
                .iter()
                .filter(|(id, p)| **id != w.id && p.pending == 0 && !p.damaged && p.live * 2 < p.size.max(1))
                .map(|(id, _)| *id)
                .collect()
        };
        let mut done = 0;
        for id in due {
            match self.compact(id) {
                Ok(true) => done += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(pack = %pack_name(id), error = %e, "pack compaction failed"),
            }
        }
        done
    }

    /// Copies the live records (and still needed tombstones) of the closed pack `id` to the
    /// newest pack, syncs them, and removes pack `id`. False if something still points into it.
    /// If copying or syncing fails, the chunks moved so far point at their originals again: a
    /// copy that may not be on disk never becomes the only one.
    fn compact(&self, id: u64) -> io::Result<bool> {
        let (mut moved, mut synced) = (Vec::new(), false);
        let result = self.compact_into(id, &mut moved, &mut synced);
        if result.is_err() && !synced {
            let mut st = self.lock();
            for (hash, from, to, len) in moved {
                if st.packed.get(&hash) == Some(&to) {
                    st.packed.insert(hash, from);
                    if let Some(p) = st.packs.get_mut(&to.pack) {
                        p.forget(len);
                    }
                    if let Some(p) = st.packs.get_mut(&id) {
                        p.live += record_len(len);
                    }
                }
            }
        }
        result
    }

    /// [`Inner::compact`], noting in `moved` each chunk it points at a copy (hash, original,
    /// copy, data length), and in `synced` that the copies are durable.
    fn compact_into(
        &self,
        id: u64,
        moved: &mut Vec<(ChunkHash, Loc, Loc, u64)>,
        synced: &mut bool,
    ) -> io::Result<bool> {
        let Some((file, size)) = self.lock().packs.get(&id).map(|p| (p.file.clone(), p.size)) else { return Ok(false) };
        let mut r = BufReader::with_capacity(1 << 20, ReadAt { file: &file.file, pos: 0 });
        let (mut pos, mut carried) = (0u64, 0usize);
        let mut rec = Vec::new();
        let mut written: Vec<Arc<PackFile>> = Vec::new();
        loop {
            let mut head = [0u8; HEADER];
            if !read_full(&mut r, &mut head)? {
                break;
            }
            let Some((kind, len, hash)) = decode(&head) else { break };
            rec.clear();
            rec.extend_from_slice(&head);
            rec.resize(record_len(len) as usize, 0);
            if !read_full(&mut r, &mut rec[HEADER..])? {
                break;
            }
            let here = Loc { pack: id, offset: pos };
            pos += record_len(len);
            let mut w = self.packs.writer();
            let keep = {
                let st = self.lock();
                if kind == KIND_CHUNK {
                    st.packed.get(&hash) == Some(&here)
                } else {
                    // A tombstone matters while the pack with the chunk it kills exists, unless
                    // the chunk is stored again (indexed, or a put of it waits: a tombstone
                    // carried past that record would kill it at the next start).
                    let killed = u64::from_le_bytes(rec[HEADER..HEADER + 8].try_into().expect("8 bytes"));
                    killed != id
                        && st.packs.contains_key(&killed)
                        && !st.index.contains_key(&hash)
                        && !st.appending.contains_key(&hash)
                }
            };
            if !keep {
                continue;
            }
            if kind == KIND_CHUNK && ChunkHash::of(&rec[HEADER..]) != hash {
                drop(w);
                self.drop_packed(hash, Some(&format!("record at {} of pack {id} does not match", here.offset)));
                continue;
            }
            let (loc, to) = w.append(&self.packs.dir, &self.state, &rec)?;
            if !written.iter().any(|f| Arc::ptr_eq(f, &to)) {
                written.push(to);
            }
            if kind == KIND_CHUNK {
                let mut st = self.lock();
                st.packed.insert(hash, loc);
                if let Some(p) = st.packs.get_mut(&id) {
                    p.forget(len);
                }
                if let Some(p) = st.packs.get_mut(&loc.pack) {
                    p.live += record_len(len);
                }
                moved.push((hash, here, loc, len));
            } else {
                carried += 1;
            }
        }
        // The copies are durable before the originals go.
        for f in &written {
            f.sync()?;
        }
        *synced = true;
        let w = self.packs.writer();
        let mut st = self.lock();
        if pos < size {
            // Records after a damaged header were loaded from the index (tombstones too): the
            // pack must stay, or what they say would be lost.
            tracing::error!(pack = %pack_name(id), at = pos, size, "damaged record header; the pack is not compacted");
            if let Some(p) = st.packs.get_mut(&id) {
                p.damaged = true;
            }
            return Ok(false);
        }
        let busy = id == w.id || st.packs.get(&id).is_some_and(|p| p.pending > 0);
        if busy || st.packed.values().any(|loc| loc.pack == id) {
            tracing::warn!(pack = %pack_name(id), "pack still in use after compaction; kept");
            return Ok(false);
        }
        // The index first: a pack without one is read; an index without its pack would be stale.
        // Only once both are gone does the pack leave the state (its tombstones' chunks may be
        // in it until then).
        match fs::remove_file(self.packs.dir.join(index_name(id))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fs::remove_file(self.packs.dir.join(pack_name(id)))?;
        st.packs.remove(&id);
        drop(st);
        drop(w);
        // Made durable, so that its records do not come back without the tombstones dropped.
        sync_dir(&self.packs.dir)?;
        tracing::info!(pack = %pack_name(id), moved = moved.len(), carried, "pack compacted");
        Ok(true)
    }
}

/// Runs [`Inner::compact_packs`] every [`COMPACT_EVERY`] until the store is dropped.
pub(super) fn start_compactor(inner: Weak<Inner>) -> io::Result<()> {
    std::thread::Builder::new().name("pack-compact".into()).spawn(move || loop {
        std::thread::sleep(COMPACT_EVERY);
        let Some(inner) = inner.upgrade() else { return };
        inner.compact_packs();
    })?;
    Ok(())
}

fn stopped() -> io::Error {
    io::Error::other("pack sync thread stopped")
}
