//! The Raft log and hard state, in an append-only log file of their own; the conf state and the
//! compaction marker in redb, beside the state machine they describe.
//!
//! raft-rs reads the log through the [`Storage`] trait, from an in-memory mirror; every write goes
//! to the file first, so what raft-rs can see is on disk. A Ready's entries cost one `pwrite` and
//! one `fdatasync` (a redb transaction cost about two and a half times that, measured: 223 µs
//! against 88 µs on this machine's disk), and the state machine's transactions are not fsynced
//! one by one: after a crash, the entries after the applied index redb kept are applied again
//! from this log. So the log keeps every entry after the last *durable* applied index, and
//! compaction, which drops a prefix, first makes the state machine durable (one redb commit; the
//! driver also makes one every `node::CHECKPOINT_EVERY` entries, `State::checkpoint`).
//!
//! The log lives in two files used in turn. A file is a sequence of records (`u32` length, `u32`
//! CRC-32 of the file's generation and the body, body = kind byte + payload): a header
//! (generation, compacted index and term), then the hard state and the entries kept from the
//! previous file, then a seal, then appended entries and hard states. An entry whose index is at
//! or below the last one replaces the suffix from there (a new leader overwrote it). Compaction
//! writes the other file over whatever it held, seals and syncs it, and only then uses it. At
//! start the sealed file with the highest generation wins and is replayed up to its first record
//! that is incomplete or fails its checksum; then a new generation is written from what was read,
//! so nothing is ever appended after a torn record.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use redb::{Database, ReadTransaction, ReadableDatabase, StorageBackend, TableDefinition};

/// Where logs of older versions kept their entries and hard state; moved into the log file at the
/// first start of this version.
const LEGACY_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const RAFT_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_state");

const LEGACY_HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
/// (index, term) of the last compacted entry, 16 bytes big-endian.
const COMPACTED: &str = "compacted";
/// A new group's members start from this (index, term), as if an entry holding the initial
/// configuration had been committed and compacted: a master that joins later starts empty at 0,
/// so the leader can only bring it up to date with a snapshot, which carries the configuration
/// (the log alone would not: the initial members are in no entry).
const BOOT_INDEX: u64 = 1;
const BOOT_TERM: u64 = 1;

/// The names of the two log files in a master's data directory.
pub const LOG_FILES: [&str; 2] = ["raft-log-a", "raft-log-b"];

/// One log file: redb's storage-backend interface (positional reads and writes, length, sync) is
/// all a log needs, and the simulation's disk model implements it too.
pub type LogFile = Box<dyn StorageBackend>;

/// A log file on disk.
#[derive(Debug)]
pub struct DiskFile(std::fs::File);

impl DiskFile {
    pub fn open(path: &std::path::Path) -> Result<LogFile> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        Ok(Box::new(DiskFile(f)))
    }
}

impl StorageBackend for DiskFile {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, out, offset)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, data, offset)
    }
}

const HEADER: u8 = 1;
const SEAL: u8 = 2;
const ENTRY: u8 = 3;
const HARD_STATE: u8 = 4;
/// The file grows in steps of this much. Files are overwritten in place, not truncated, so once
/// both have grown, appends rewrite allocated blocks and a sync carries no file-system metadata.
const GROW: u64 = 16 << 20;

/// Appends one record to `buf`. The checksum covers `salt`, the file's generation (0 for the
/// header, which says what the generation is), so that records a file held in an earlier
/// generation never pass for records of this one.
fn record(buf: &mut Vec<u8>, salt: u64, kind: u8, payload: &[u8]) {
    let len = u32::try_from(payload.len() + 1).expect("a log record under 4 GiB");
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&checksum(salt, kind, payload).to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
}

fn checksum(salt: u64, kind: u8, payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&salt.to_le_bytes());
    crc.update(&[kind]);
    crc.update(payload);
    crc.finalize()
}

fn u64s<const N: usize>(v: [u64; N]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_u64s<const N: usize>(b: &[u8]) -> Option<[u64; N]> {
    (b.len() == 8 * N).then(|| std::array::from_fn(|i| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8"))))
}

/// What one log file holds.
struct Replayed {
    generation: u64,
    compacted: (u64, u64),
    entries: VecDeque<Entry>,
    hard_state: Option<HardState>,
    sealed: bool,
    /// Where the valid records end.
    end: u64,
}

/// Reads `file`'s records up to the first bad one. None unless it starts with a header.
fn replay(file: &dyn StorageBackend) -> Result<Option<Replayed>> {
    let len = file.len()?;
    let mut at = 0u64;
    let mut out: Option<Replayed> = None;
    while at + 8 <= len {
        let mut head = [0u8; 8];
        file.read(at, &mut head)?;
        let n = u32::from_le_bytes(head[..4].try_into().expect("4")) as u64;
        let crc = u32::from_le_bytes(head[4..].try_into().expect("4"));
        if n == 0 || at + 8 + n > len {
            break;
        }
        let mut body = vec![0u8; n as usize];
        file.read(at + 8, &mut body)?;
        let (kind, payload) = (body[0], &body[1..]);
        if checksum(out.as_ref().map_or(0, |r| r.generation), kind, payload) != crc {
            break;
        }
        match (kind, out.as_mut()) {
            (HEADER, None) => {
                let Some([generation, index, term]) = read_u64s::<3>(payload) else { break };
                out = Some(Replayed {
                    generation,
                    compacted: (index, term),
                    entries: VecDeque::new(),
                    hard_state: None,
                    sealed: false,
                    end: 0,
                });
            }
            (_, None) => break,
            (SEAL, Some(r)) if !r.sealed && read_u64s::<1>(payload) == Some([r.generation]) => r.sealed = true,
            (ENTRY, Some(r)) => {
                let e = Entry::parse_from_bytes(payload).context("decode log entry")?;
                let last = r.entries.back().map_or(r.compacted.0, |e| e.index);
                anyhow::ensure!(
                    e.index > r.compacted.0 && e.index <= last + 1,
                    "raft log entry {} follows entry {last} (compacted through {})",
                    e.index,
                    r.compacted.0
                );
                while r.entries.back().is_some_and(|b| b.index >= e.index) {
                    r.entries.pop_back();
                }
                r.entries.push_back(e);
            }
            (HARD_STATE, Some(r)) => {
                r.hard_state = Some(HardState::parse_from_bytes(payload).context("decode hard state")?)
            }
            _ => break,
        }
        at += 8 + n;
        if let Some(r) = out.as_mut() {
            r.end = at;
        }
    }
    Ok(out)
}

/// The log file being appended to, and the other one.
struct Files {
    files: [LogFile; 2],
    active: usize,
    /// The active file's generation.
    generation: u64,
    /// The highest generation either file's header names, sealed or not: the next one is above.
    highest: u64,
    end: u64,
    /// The active file's length: records go below it, it grows by [`GROW`] at a time.
    len: u64,
}

impl Files {
    fn append(&mut self, buf: &[u8], sync: bool) -> Result<()> {
        let file = &self.files[self.active];
        let end = self.end + buf.len() as u64;
        if end > self.len {
            self.len = end.next_multiple_of(GROW);
            file.set_len(self.len)?;
        }
        file.write(self.end, buf)?;
        self.end = end;
        if sync {
            file.sync_data()?;
        }
        Ok(())
    }

    /// Writes a new generation into the other file (compaction marker, hard state, the entries
    /// kept), seals and syncs it, and appends to it from now on. What the file held before fails
    /// the new generation's checksums.
    fn rotate(&mut self, compacted: (u64, u64), hs: &HardState, entries: &VecDeque<Entry>) -> Result<()> {
        let generation = self.highest + 1;
        let mut buf = Vec::new();
        record(&mut buf, 0, HEADER, &u64s([generation, compacted.0, compacted.1]));
        record(&mut buf, generation, HARD_STATE, &hs.write_to_bytes()?);
        for e in entries {
            record(&mut buf, generation, ENTRY, &e.write_to_bytes()?);
        }
        record(&mut buf, generation, SEAL, &u64s([generation]));
        let next = 1 - self.active;
        let file = &self.files[next];
        self.highest = generation;
        let mut len = file.len()?;
        if len < buf.len() as u64 {
            len = (buf.len() as u64).next_multiple_of(GROW);
            file.set_len(len)?;
        }
        file.write(0, &buf)?;
        file.sync_data()?;
        self.active = next;
        self.generation = generation;
        self.end = buf.len() as u64;
        self.len = len;
        Ok(())
    }
}

#[derive(Default)]
struct Core {
    hard_state: HardState,
    conf_state: ConfState,
    /// The log index of the entry that made `conf_state` (0: not known here, as after a start
    /// or a snapshot, when it is at or below the state machine's applied index).
    conf_index: u64,
    compacted_index: u64,
    compacted_term: u64,
    entries: VecDeque<Entry>,
    /// Payload bytes of `entries`.
    bytes: u64,
}

impl Core {
    fn first_index(&self) -> u64 {
        self.compacted_index + 1
    }
    fn last_index(&self) -> u64 {
        self.entries.back().map_or(self.compacted_index, |e| e.index)
    }
}

/// The durable Raft log. Cloning shares the same log.
#[derive(Clone)]
pub struct RaftLog {
    db: Arc<Database>,
    core: Arc<RwLock<Core>>,
    files: Arc<Mutex<Files>>,
    /// Snapshots handed to raft-rs, by the peer they are for: the read transaction pins the
    /// state machine as of the snapshot's index while the transport streams it.
    outgoing: Arc<Mutex<HashMap<u64, (SnapshotMetadata, ReadTransaction)>>>,
}

fn storage_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

impl RaftLog {
    /// Loads the log from `files` and `db`. A database without a conf state is a new member of
    /// the group described by `voters`: that membership is written down before anything else
    /// happens. With no voters, the master joins an existing group and waits for its leader's
    /// snapshot.
    pub fn open(db: Arc<Database>, files: [LogFile; 2], voters: &[u64]) -> Result<RaftLog> {
        let mut core = Core::default();
        let mut legacy_hs = None;
        let fresh;
        let mut legacy;
        {
            let txn = db.begin_read()?;
            legacy = match txn.open_table(LEGACY_LOG) {
                Ok(_) => true,
                Err(redb::TableError::TableDoesNotExist(_)) => false,
                Err(e) => return Err(e.into()),
            };
            match txn.open_table(RAFT_STATE) {
                Ok(t) => {
                    if let Some(v) = t.get(LEGACY_HARD_STATE)? {
                        legacy = true;
                        legacy_hs = Some(HardState::parse_from_bytes(v.value()).context("decode hard state")?);
                    }
                    fresh = match t.get(CONF_STATE)? {
                        Some(v) => {
                            core.conf_state = ConfState::parse_from_bytes(v.value()).context("decode conf state")?;
                            false
                        }
                        None => true,
                    };
                    if let Some(v) = t.get(COMPACTED)? {
                        let b: [u8; 16] = v.value().try_into().context("compacted marker is not 16 bytes")?;
                        core.compacted_index = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
                        core.compacted_term = u64::from_be_bytes(b[8..].try_into().expect("8 bytes"));
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => fresh = true,
                Err(e) => return Err(e.into()),
            }
        }
        let mut replayed = [replay(&*files[0])?, replay(&*files[1])?];
        let highest = replayed.iter().flatten().map(|r| r.generation).max().unwrap_or(0);
        let newest = (0..2)
            .filter(|&i| replayed[i].as_ref().is_some_and(|r| r.sealed))
            .max_by_key(|&i| replayed[i].as_ref().map_or(0, |r| r.generation));
        let mut files = Files { files, active: newest.unwrap_or(1), generation: 0, highest, end: 0, len: 0 };
        match newest.and_then(|i| replayed[i].take()) {
            Some(r) => {
                if r.compacted.0 > core.compacted_index {
                    (core.compacted_index, core.compacted_term) = r.compacted;
                }
                core.hard_state = r.hard_state.unwrap_or_default();
                core.entries = r.entries;
            }
            None => {
                // No log file was ever sealed: a new master, or one of a version that kept its
                // log in redb, which moves into the file now.
                anyhow::ensure!(
                    fresh || legacy,
                    "neither raft log file ({} and {} in the data directory) holds a complete log, yet this \
                     master is a member of a group: its log and vote are lost. Restore the data directory, or \
                     remove this master from the group and add it back with an empty one",
                    LOG_FILES[0],
                    LOG_FILES[1]
                );
                core.hard_state = legacy_hs.unwrap_or_default();
                let txn = db.begin_read()?;
                if let Ok(t) = txn.open_table(LEGACY_LOG) {
                    for item in t.range(core.compacted_index + 1..)? {
                        let (k, v) = item?;
                        let e = Entry::parse_from_bytes(v.value()).context("decode log entry")?;
                        anyhow::ensure!(e.index == k.value(), "log entry {} stored under key {}", e.index, k.value());
                        anyhow::ensure!(
                            e.index == core.last_index() + 1,
                            "gap in the raft log before entry {}",
                            e.index
                        );
                        core.entries.push_back(e);
                    }
                }
            }
        }
        // The state machine may be compacted past the file (a snapshot installed, or a compaction
        // made durable, just before a crash): those entries are gone. An entry at the compacted
        // index with another term means the file holds a branch the snapshot replaced.
        if core.entries.iter().any(|e| e.index == core.compacted_index && e.term != core.compacted_term) {
            core.entries.clear();
        }
        while core.entries.front().is_some_and(|e| e.index <= core.compacted_index) {
            core.entries.pop_front();
        }
        if core.entries.front().is_some_and(|e| e.index != core.compacted_index + 1) {
            core.entries.clear();
        }
        if core.hard_state.term < core.compacted_term {
            core.hard_state.term = core.compacted_term;
            core.hard_state.vote = 0;
        }
        if core.hard_state.commit > core.last_index() {
            tracing::warn!(
                commit = core.hard_state.commit,
                last = core.last_index(),
                "the raft log ends before its recorded commit index"
            );
        }
        core.hard_state.commit = core.hard_state.commit.max(core.compacted_index).min(core.last_index());
        core.bytes = core.entries.iter().map(|e| e.data.len() as u64).sum();
        // Every start writes a new generation: the file read may end in a torn record, after
        // which nothing may ever be appended, and its compaction marker may be behind redb's.
        files.rotate((core.compacted_index, core.compacted_term), &core.hard_state, &core.entries)?;
        if legacy {
            let txn = db.begin_write()?;
            txn.delete_table(LEGACY_LOG)?;
            txn.open_table(RAFT_STATE)?.remove(LEGACY_HARD_STATE)?;
            txn.commit()?;
        }
        let log = RaftLog {
            db,
            core: Arc::new(RwLock::new(core)),
            files: Arc::new(Mutex::new(files)),
            outgoing: Arc::default(),
        };
        if fresh && !voters.is_empty() {
            log.bootstrap(voters)?;
        }
        Ok(log)
    }

    /// The log file first (a crash before the database commit bootstraps again), then the
    /// membership and compaction marker.
    fn bootstrap(&self, voters: &[u64]) -> Result<()> {
        let cs = ConfState { voters: voters.to_vec(), ..Default::default() };
        let hs = HardState { term: BOOT_TERM, commit: BOOT_INDEX, ..Default::default() };
        self.files.lock().expect("log files lock").rotate((BOOT_INDEX, BOOT_TERM), &hs, &VecDeque::new())?;
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(RAFT_STATE)?;
            t.insert(CONF_STATE, cs.write_to_bytes()?.as_slice())?;
            t.insert(COMPACTED, marker(BOOT_INDEX, BOOT_TERM).as_slice())?;
        }
        txn.commit()?;
        let mut core = self.core.write().expect("raft log lock");
        core.conf_state = cs;
        core.hard_state = hs;
        core.entries.clear();
        core.bytes = 0;
        core.compacted_index = BOOT_INDEX;
        core.compacted_term = BOOT_TERM;
        Ok(())
    }

    /// Whether this master has a configuration (false: it waits to join a group).
    pub fn is_member_of_a_group(&self) -> bool {
        let core = self.core.read().expect("raft log lock");
        !core.conf_state.voters.is_empty() || core.compacted_index > 0
    }

    /// The snapshot raft-rs asked for on behalf of peer `to`, with the read transaction that holds
    /// its state; taken once by the transport.
    pub fn take_outgoing_snapshot(&self, to: u64) -> Option<(SnapshotMetadata, ReadTransaction)> {
        self.outgoing.lock().expect("snapshot lock").remove(&to)
    }

    /// Replaces the state machine and the log with a snapshot: the state tables get `records` in
    /// one durable transaction, then a new log file starts after the snapshot's index.
    pub fn install_snapshot(
        &self,
        meta: &SnapshotMetadata,
        records: impl Iterator<Item = Result<crate::state::Record>>,
    ) -> Result<()> {
        let mut hs = self.core.read().expect("raft log lock").hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        let cs = meta.get_conf_state().clone();
        let txn = self.db.begin_write()?;
        crate::state::load(&txn, records, meta.index)?;
        {
            let mut t = txn.open_table(RAFT_STATE)?;
            t.insert(CONF_STATE, cs.write_to_bytes()?.as_slice())?;
            t.insert(COMPACTED, marker(meta.index, meta.term).as_slice())?;
        }
        txn.commit()?;
        self.files.lock().expect("log files lock").rotate((meta.index, meta.term), &hs, &VecDeque::new())?;
        let mut core = self.core.write().expect("raft log lock");
        core.entries.clear();
        core.bytes = 0;
        core.compacted_index = meta.index;
        core.compacted_term = meta.term;
        core.conf_state = cs;
        core.conf_index = meta.index;
        core.hard_state = hs;
        Ok(())
    }

    /// Appends entries (replacing any conflicting suffix) and records the hard state, synced to
    /// disk when it returns if it holds entries or a new term or vote: those must be on disk
    /// before any message that depends on them leaves. A change of commit index alone is written
    /// without a sync: a commit index lost in a crash is learnt again from the leader (or, alone,
    /// by committing anew), and the state machine's applied index raises it at start.
    pub fn persist(&self, entries: &[Entry], hs: Option<&HardState>) -> Result<()> {
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let (old_last, compacted, old_hs) = {
            let core = self.core.read().expect("raft log lock");
            (core.last_index(), core.compacted_index, core.hard_state.clone())
        };
        if let Some(first) = entries.first() {
            anyhow::ensure!(first.index > compacted, "append below the compacted index");
            anyhow::ensure!(first.index <= old_last + 1, "append at {} leaves a gap after {old_last}", first.index);
        }
        let hs = hs.map(|h| {
            let mut h = h.clone();
            // A commit index recorded in memory only (set_commit) may be ahead of the Ready's.
            h.commit = h.commit.max(old_hs.commit);
            h
        });
        let vote_changed = hs.as_ref().is_some_and(|h| h.term != old_hs.term || h.vote != old_hs.vote);
        let mut files = self.files.lock().expect("log files lock");
        let mut buf = Vec::with_capacity(entries.iter().map(|e| e.data.len() + 64).sum::<usize>() + 64);
        for e in entries {
            record(&mut buf, files.generation, ENTRY, &e.write_to_bytes()?);
        }
        if let Some(h) = &hs {
            record(&mut buf, files.generation, HARD_STATE, &h.write_to_bytes()?);
        }
        files.append(&buf, !entries.is_empty() || vote_changed)?;
        drop(files);
        let mut core = self.core.write().expect("raft log lock");
        if let Some(first) = entries.first() {
            while core.last_index() >= first.index {
                if let Some(e) = core.entries.pop_back() {
                    core.bytes -= e.data.len() as u64;
                }
            }
            core.bytes += entries.iter().map(|e| e.data.len() as u64).sum::<u64>();
            core.entries.extend(entries.iter().cloned());
        }
        if let Some(hs) = hs {
            let commit = core.hard_state.commit.max(hs.commit);
            core.hard_state = hs;
            core.hard_state.commit = commit;
        }
        Ok(())
    }

    /// Records a new commit index in memory; it reaches the file with the next hard state.
    pub fn set_commit(&self, commit: u64) {
        let mut core = self.core.write().expect("raft log lock");
        core.hard_state.commit = core.hard_state.commit.max(commit);
    }

    /// Records the configuration that the entry at `index` made, not synced: it becomes durable
    /// with the next durable commit, which comes after the apply of that entry (a follower
    /// applies in batches, `node::APPLY_DEFER`; redb keeps unsynced commits in order), so it is
    /// never ahead of the durable applied index, and a restart applies the change again.
    pub fn set_conf_state(&self, cs: ConfState, index: u64) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        txn.open_table(RAFT_STATE)?.insert(CONF_STATE, cs.write_to_bytes()?.as_slice())?;
        txn.commit()?;
        let mut core = self.core.write().expect("raft log lock");
        core.conf_state = cs;
        core.conf_index = index;
        Ok(())
    }

    pub fn conf_state(&self) -> ConfState {
        self.core.read().expect("raft log lock").conf_state.clone()
    }

    /// Drops every entry up to and including `index`, which the caller has applied: one durable
    /// redb commit makes the state machine durable through it (and records the new marker), then
    /// the kept entries move to a new log file.
    pub fn compact(&self, index: u64) -> Result<()> {
        let (term, hs, kept) = {
            let core = self.core.read().expect("raft log lock");
            if index <= core.compacted_index || index > core.last_index() {
                return Ok(());
            }
            let at = (index - core.first_index()) as usize;
            (core.entries[at].term, core.hard_state.clone(), core.entries.range(at + 1..).cloned().collect())
        };
        let txn = self.db.begin_write()?;
        txn.open_table(RAFT_STATE)?.insert(COMPACTED, marker(index, term).as_slice())?;
        txn.commit()?;
        self.files.lock().expect("log files lock").rotate((index, term), &hs, &kept)?;
        let mut core = self.core.write().expect("raft log lock");
        let drop = (index - core.compacted_index) as usize;
        let freed: u64 = core.entries.drain(..drop).map(|e| e.data.len() as u64).sum();
        core.bytes -= freed;
        core.compacted_index = index;
        core.compacted_term = term;
        Ok(())
    }

    /// Entries and payload bytes in the log (after the compacted prefix).
    pub fn size(&self) -> (u64, u64) {
        let core = self.core.read().expect("raft log lock");
        (core.entries.len() as u64, core.bytes)
    }

    pub fn first_index_now(&self) -> u64 {
        self.core.read().expect("raft log lock").first_index()
    }
}

fn marker(index: u64, term: u64) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..8].copy_from_slice(&index.to_be_bytes());
    m[8..].copy_from_slice(&term.to_be_bytes());
    m
}

impl Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let core = self.core.read().expect("raft log lock");
        Ok(RaftState { hard_state: core.hard_state.clone(), conf_state: core.conf_state.clone() })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _ctx: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let core = self.core.read().expect("raft log lock");
        if low < core.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > core.last_index() + 1 {
            return Err(storage_err(format!("entries up to {high} asked, last is {}", core.last_index())));
        }
        let off = core.first_index();
        let mut out: Vec<Entry> = core.entries.range((low - off) as usize..(high - off) as usize).cloned().collect();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let core = self.core.read().expect("raft log lock");
        if idx == core.compacted_index {
            return Ok(core.compacted_term);
        }
        if idx < core.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > core.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(core.entries[(idx - core.first_index()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.core.read().expect("raft log lock").first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.core.read().expect("raft log lock").last_index())
    }

    /// A snapshot of the state machine as of its applied index, for a follower behind the
    /// compacted log. The state is not copied here: a redb read transaction pins it, and the
    /// transport streams it to the follower (see `node::Transport`). raft-rs calls this on the
    /// driver thread. Not while the configuration is ahead of the state machine (a node elected
    /// while it still defers entries, within the step that elects it): raft-rs asks again later.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let txn = self.db.begin_read().map_err(storage_err)?;
        let index = crate::state::applied_in(&txn).map_err(storage_err)?;
        let conf_index = self.core.read().expect("raft log lock").conf_index;
        if index < request_index || index < conf_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        let term = self.term(index)?;
        let mut meta = SnapshotMetadata { index, term, ..Default::default() };
        meta.set_conf_state(self.conf_state());
        let mut snap = Snapshot::default();
        snap.set_metadata(meta.clone());
        self.outgoing.lock().expect("snapshot lock").insert(to, (meta, txn));
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8].into(), ..Default::default() }
    }

    fn open(dir: &std::path::Path, voters: &[u64]) -> RaftLog {
        let db = Arc::new(Database::create(dir.join("m.redb")).unwrap());
        let files =
            [DiskFile::open(&dir.join(LOG_FILES[0])).unwrap(), DiskFile::open(&dir.join(LOG_FILES[1])).unwrap()];
        RaftLog::open(db, files, voters).unwrap()
    }

    fn indexes(log: &RaftLog) -> Vec<(u64, u64)> {
        let (lo, hi) = (log.first_index().unwrap(), log.last_index().unwrap());
        let ents = log.entries(lo, hi + 1, None, GetEntriesContext::empty(false)).unwrap();
        ents.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn survives_reopen_compaction_and_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path(), &[1]);
            assert_eq!(log.first_index().unwrap(), BOOT_INDEX + 1, "a new group starts after its bootstrap index");
            log.persist(&(2..=10).map(|i| entry(i, 1)).collect::<Vec<_>>(), None).unwrap();
            // A new leader replaces an uncommitted suffix.
            let hs = HardState { term: 2, commit: 9, ..Default::default() };
            log.persist(&[entry(8, 2), entry(9, 2)], Some(&hs)).unwrap();
            log.compact(5).unwrap();
            assert_eq!(log.term(5).unwrap(), 1);
            log.persist(&[entry(10, 2)], None).unwrap();
        }
        let log = open(dir.path(), &[7]);
        assert_eq!(log.first_index().unwrap(), 6);
        assert_eq!(log.term(5).unwrap(), 1);
        assert!(log.term(4).is_err());
        assert_eq!(indexes(&log), vec![(6, 1), (7, 1), (8, 2), (9, 2), (10, 2)]);
        let st = log.initial_state().unwrap();
        assert_eq!((st.hard_state.term, st.hard_state.commit), (2, 9));
        assert_eq!(st.conf_state.voters, vec![1], "membership is not replaced on reopen");
        // A second compaction writes the first file again; the newest sealed one still wins.
        log.compact(8).unwrap();
        log.persist(&[entry(11, 3)], None).unwrap();
        drop(log);
        let log = open(dir.path(), &[7]);
        assert_eq!(indexes(&log), vec![(9, 2), (10, 2), (11, 3)]);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), &[1]);
        log.persist(&(2..=4).map(|i| entry(i, 1)).collect::<Vec<_>>(), None).unwrap();
        log.persist(&[entry(5, 1)], None).unwrap();
        log.persist(&[entry(6, 1)], None).unwrap();
        drop(log);
        // Entry 5's record loses a byte in the middle (as if its page never reached the disk),
        // while entry 6's did: the log ends at 4, and 6 must not come back after new appends.
        let f = (0..2)
            .map(|i| dir.path().join(LOG_FILES[i]))
            .max_by_key(|p| replay(&*DiskFile::open(p).unwrap()).unwrap().map(|r| r.generation))
            .unwrap();
        let file = DiskFile::open(&f).unwrap();
        let r = replay(&*file).unwrap().unwrap();
        let mut rec = Vec::new();
        record(&mut rec, r.generation, ENTRY, &entry(6, 1).write_to_bytes().unwrap());
        let at5 = r.end - 2 * rec.len() as u64;
        file.write(at5 + 10, &[0xff]).unwrap();
        drop(file);
        let log = open(dir.path(), &[1]);
        assert_eq!(log.last_index().unwrap(), 4);
        log.persist(&[entry(5, 2)], None).unwrap();
        drop(log);
        let log = open(dir.path(), &[1]);
        assert_eq!(indexes(&log), vec![(2, 1), (3, 1), (4, 1), (5, 2)]);
    }

    #[test]
    fn an_unsealed_new_file_loses_to_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), &[1]);
        log.persist(&(2..=6).map(|i| entry(i, 1)).collect::<Vec<_>>(), None).unwrap();
        let (active, generation) = {
            let f = log.files.lock().unwrap();
            (f.active, f.generation)
        };
        drop(log);
        // A compaction that crashed while writing the other file: a header, no seal.
        let other = DiskFile::open(&dir.path().join(LOG_FILES[1 - active])).unwrap();
        let mut buf = Vec::new();
        record(&mut buf, 0, HEADER, &u64s([generation + 1, 4, 1]));
        record(&mut buf, generation + 1, ENTRY, &entry(5, 1).write_to_bytes().unwrap());
        other.write(0, &buf).unwrap();
        drop(other);
        let log = open(dir.path(), &[1]);
        assert_eq!(indexes(&log), (2..=6).map(|i| (i, 1)).collect::<Vec<_>>());
        assert!(log.files.lock().unwrap().generation > generation + 1, "the unsealed generation is not reused");
    }

    #[test]
    fn a_member_whose_log_files_are_gone_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), &[1]);
        log.persist(&[entry(2, 1)], Some(&HardState { term: 2, vote: 1, commit: 2, ..Default::default() })).unwrap();
        drop(log);
        for f in LOG_FILES {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let db = Arc::new(Database::create(dir.path().join("m.redb")).unwrap());
        let files = [
            DiskFile::open(&dir.path().join(LOG_FILES[0])).unwrap(),
            DiskFile::open(&dir.path().join(LOG_FILES[1])).unwrap(),
        ];
        let err = RaftLog::open(db, files, &[1]).err().expect("a lost vote must not be forgotten silently");
        assert!(format!("{err:#}").contains("its log and vote are lost"), "{err:#}");
    }

    #[test]
    fn records_of_an_earlier_generation_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), &[1]);
        // A long file, then two compactions: the second writes a short generation over it.
        log.persist(&(2..=40).map(|i| entry(i, 1)).collect::<Vec<_>>(), None).unwrap();
        log.compact(38).unwrap();
        log.persist(&[entry(41, 1)], None).unwrap();
        log.compact(40).unwrap();
        drop(log);
        let log = open(dir.path(), &[1]);
        assert_eq!(indexes(&log), vec![(41, 1)]);
    }

    #[test]
    fn a_log_kept_in_redb_by_an_older_version_moves_into_the_file() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join("m.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(LEGACY_LOG).unwrap();
                for i in 4..=7 {
                    t.insert(i, entry(i, 2).write_to_bytes().unwrap().as_slice()).unwrap();
                }
                let mut st = txn.open_table(RAFT_STATE).unwrap();
                let cs = ConfState { voters: vec![1, 2, 3], ..Default::default() };
                st.insert(CONF_STATE, cs.write_to_bytes().unwrap().as_slice()).unwrap();
                let hs = HardState { term: 3, vote: 2, commit: 6, ..Default::default() };
                st.insert(LEGACY_HARD_STATE, hs.write_to_bytes().unwrap().as_slice()).unwrap();
                st.insert(COMPACTED, marker(3, 2).as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        for _ in 0..2 {
            let log = open(dir.path(), &[9]);
            assert_eq!(indexes(&log), (4..=7).map(|i| (i, 2)).collect::<Vec<_>>());
            let st = log.initial_state().unwrap();
            assert_eq!((st.hard_state.term, st.hard_state.vote, st.hard_state.commit), (3, 2, 6));
            assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
            assert_eq!(log.term(3).unwrap(), 2);
        }
        let db = Database::create(dir.path().join("m.redb")).unwrap();
        let txn = db.begin_read().unwrap();
        assert!(txn.open_table(LEGACY_LOG).is_err(), "the old table is gone once the file holds the log");
    }
}
