//! The Raft log, hard state and conf state, durable in redb and mirrored in memory for raft-rs.
//!
//! raft-rs reads the log through the [`Storage`] trait; every write goes to redb first (one durable
//! transaction per call) and only then to the in-memory mirror, so what raft-rs can see is always
//! on disk. Compaction drops a prefix of the log that the state machine (kept in the same redb
//! database, see `state`) has already applied durably; the index and term just before the first
//! kept entry are remembered so that raft-rs can still check the log-matching property there.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use redb::{Database, ReadTransaction, ReadableDatabase, TableDefinition};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const RAFT_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_state");

const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
/// (index, term) of the last compacted entry, 16 bytes big-endian.
const COMPACTED: &str = "compacted";
/// A new group's members start from this (index, term), as if an entry holding the initial
/// configuration had been committed and compacted: a master that joins later starts empty at 0,
/// so the leader can only bring it up to date with a snapshot, which carries the configuration
/// (the log alone would not: the initial members are in no entry).
const BOOT_INDEX: u64 = 1;
const BOOT_TERM: u64 = 1;

#[derive(Default)]
struct Core {
    hard_state: HardState,
    conf_state: ConfState,
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
    /// Snapshots handed to raft-rs, by the peer they are for: the read transaction pins the
    /// state machine as of the snapshot's index while the transport streams it.
    outgoing: Arc<Mutex<HashMap<u64, (SnapshotMetadata, ReadTransaction)>>>,
}

fn storage_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

impl RaftLog {
    /// Loads the log from `db`. A database without a conf state is a new member of the group
    /// described by `voters`: that membership is written down before anything else happens. With
    /// no voters, the master joins an existing group and waits for its leader's snapshot.
    pub fn open(db: Arc<Database>, voters: &[u64]) -> Result<RaftLog> {
        let mut core = Core::default();
        let fresh;
        {
            let txn = db.begin_read()?;
            match txn.open_table(RAFT_STATE) {
                Ok(t) => {
                    if let Some(v) = t.get(HARD_STATE)? {
                        core.hard_state = HardState::parse_from_bytes(v.value()).context("decode hard state")?;
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
            if let Ok(t) = txn.open_table(LOG) {
                for item in t.range(core.compacted_index + 1..)? {
                    let (k, v) = item?;
                    let e = Entry::parse_from_bytes(v.value()).context("decode log entry")?;
                    anyhow::ensure!(e.index == k.value(), "log entry {} stored under key {}", e.index, k.value());
                    anyhow::ensure!(e.index == core.last_index() + 1, "gap in the raft log before entry {}", e.index);
                    core.bytes += e.data.len() as u64;
                    core.entries.push_back(e);
                }
            }
        }
        let log = RaftLog { db, core: Arc::new(RwLock::new(core)), outgoing: Arc::default() };
        if fresh && !voters.is_empty() {
            log.bootstrap(voters)?;
        }
        Ok(log)
    }

    fn bootstrap(&self, voters: &[u64]) -> Result<()> {
        let cs = ConfState { voters: voters.to_vec(), ..Default::default() };
        let hs = HardState { term: BOOT_TERM, commit: BOOT_INDEX, ..Default::default() };
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(RAFT_STATE)?;
            t.insert(CONF_STATE, cs.write_to_bytes()?.as_slice())?;
            t.insert(HARD_STATE, hs.write_to_bytes()?.as_slice())?;
            t.insert(COMPACTED, marker(BOOT_INDEX, BOOT_TERM).as_slice())?;
        }
        txn.commit()?;
        let mut core = self.core.write().expect("raft log lock");
        core.conf_state = cs;
        core.hard_state = hs;
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

    /// Replaces the state machine and the log with a snapshot, in one durable transaction: the
    /// state tables get `records`, the log is emptied and starts after the snapshot's index.
    pub fn install_snapshot(
        &self,
        meta: &SnapshotMetadata,
        records: impl Iterator<Item = Result<(u32, Vec<u8>, Vec<u8>)>>,
    ) -> Result<()> {
        let mut hs = self.core.read().expect("raft log lock").hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        let cs = meta.get_conf_state().clone();
        let txn = self.db.begin_write()?;
        crate::state::load(&txn, records, meta.index)?;
        txn.delete_table(LOG)?;
        txn.open_table(LOG)?;
        {
            let mut t = txn.open_table(RAFT_STATE)?;
            t.insert(CONF_STATE, cs.write_to_bytes()?.as_slice())?;
            t.insert(HARD_STATE, hs.write_to_bytes()?.as_slice())?;
            t.insert(COMPACTED, marker(meta.index, meta.term).as_slice())?;
        }
        txn.commit()?;
        let mut core = self.core.write().expect("raft log lock");
        core.entries.clear();
        core.bytes = 0;
        core.compacted_index = meta.index;
        core.compacted_term = meta.term;
        core.conf_state = cs;
        core.hard_state = hs;
        Ok(())
    }

    fn put_state(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(RAFT_STATE)?.insert(key, bytes)?;
        txn.commit()?;
        Ok(())
    }

    /// Appends entries (replacing any conflicting suffix) and records the hard state, in one
    /// transaction that is durable (fsynced) when it returns: a Ready's entries and vote must be
    /// on disk before any message that depends on them leaves. Only a change of commit index alone
    /// is written without an fsync (see [`RaftLog::set_commit`]).
    pub fn persist(&self, entries: &[Entry], hs: Option<&HardState>) -> Result<()> {
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let mut txn = self.db.begin_write()?;
        self.persist_in(&mut txn, entries, hs)?;
        txn.commit()?;
        self.persisted(entries, hs);
        Ok(())
    }

    /// The writes of [`RaftLog::persist`] inside its transaction, which this makes durable if it
    /// must be (new entries, or a new term or vote).
    fn persist_in(&self, txn: &mut redb::WriteTransaction, entries: &[Entry], hs: Option<&HardState>) -> Result<()> {
        let (old_last, compacted, old_hs) = {
            let core = self.core.read().expect("raft log lock");
            (core.last_index(), core.compacted_index, core.hard_state.clone())
        };
        if let Some(first) = entries.first() {
            anyhow::ensure!(first.index > compacted, "append below the compacted index");
        }
        let vote_changed = hs.is_some_and(|h| h.term != old_hs.term || h.vote != old_hs.vote);
        txn.set_durability(if entries.is_empty() && !vote_changed {
            redb::Durability::None
        } else {
            redb::Durability::Immediate
        })?;
        let mut t = txn.open_table(LOG)?;
        if let Some(first) = entries.first() {
            // A leader may overwrite an uncommitted suffix: drop it first.
            for stale in first.index..=old_last {
                t.remove(stale)?;
            }
        }
        for e in entries {
            t.insert(e.index, e.write_to_bytes()?.as_slice())?;
        }
        if let Some(hs) = hs {
            let mut hs = hs.clone();
            // A commit index recorded in memory only (set_commit) may be ahead of the Ready's.
            hs.commit = hs.commit.max(old_hs.commit);
            txn.open_table(RAFT_STATE)?.insert(HARD_STATE, hs.write_to_bytes()?.as_slice())?;
        }
        Ok(())
    }

    /// Updates the in-memory mirror after [`RaftLog::persist_in`]'s transaction committed.
    fn persisted(&self, entries: &[Entry], hs: Option<&HardState>) {
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
            core.hard_state = hs.clone();
            core.hard_state.commit = commit;
        }
    }

    /// Records a new commit index in memory only. It reaches the disk inside the next transaction
    /// of the state machine (see [`RaftLog::write_hard_state_in`]), which is the one that needs
    /// it: an applied index on disk must never exceed the commit index on disk. A commit index
    /// lost in a crash is learnt again from the leader (or, alone, by committing anew).
    pub fn set_commit(&self, commit: u64) {
        let mut core = self.core.write().expect("raft log lock");
        core.hard_state.commit = core.hard_state.commit.max(commit);
    }

    /// Writes the hard state as known in memory into `txn`. Its term and vote are already durable
    /// (`persist` writes them before memory changes); its commit index may be newer.
    pub fn write_hard_state_in(&self, txn: &redb::WriteTransaction) -> Result<()> {
        let hs = self.core.read().expect("raft log lock").hard_state.clone();
        txn.open_table(RAFT_STATE)?.insert(HARD_STATE, hs.write_to_bytes()?.as_slice())?;
        Ok(())
    }

    pub fn set_conf_state(&self, cs: ConfState) -> Result<()> {
        self.put_state(CONF_STATE, &cs.write_to_bytes()?)?;
        self.core.write().expect("raft log lock").conf_state = cs;
        Ok(())
    }

    pub fn conf_state(&self) -> ConfState {
        self.core.read().expect("raft log lock").conf_state.clone()
    }

    /// Drops every entry up to and including `index`, which the caller has applied durably.
    pub fn compact(&self, index: u64) -> Result<()> {
        let term = {
            let core = self.core.read().expect("raft log lock");
            if index <= core.compacted_index || index > core.last_index() {
                return Ok(());
            }
            core.entries[(index - core.first_index()) as usize].term
        };
        let from = self.core.read().expect("raft log lock").first_index();
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(LOG)?;
            for i in from..=index {
                t.remove(i)?;
            }
            txn.open_table(RAFT_STATE)?.insert(COMPACTED, marker(index, term).as_slice())?;
        }
        txn.commit()?;
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
    /// driver thread, never between a batch's apply and its conf-state update.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let txn = self.db.begin_read().map_err(storage_err)?;
        let index = crate::state::applied_in(&txn).map_err(storage_err)?;
        if index < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        let term = self.term(index)?;
        let mut meta = SnapshotMetadata::default();
        meta.index = index;
        meta.term = term;
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
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = vec![index as u8].into();
        e
    }

    #[test]
    fn survives_reopen_compaction_and_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        {
            let db = Arc::new(Database::create(&path).unwrap());
            let log = RaftLog::open(db, &[1]).unwrap();
            assert_eq!(log.first_index().unwrap(), BOOT_INDEX + 1, "a new group starts after its bootstrap index");
            log.persist(&(2..=10).map(|i| entry(i, 1)).collect::<Vec<_>>(), None).unwrap();
            // A new leader replaces an uncommitted suffix.
            let mut hs = HardState::default();
            hs.term = 2;
            hs.commit = 9;
            log.persist(&[entry(8, 2), entry(9, 2)], Some(&hs)).unwrap();
            log.compact(5).unwrap();
            assert_eq!(log.term(5).unwrap(), 1);
        }
        let db = Arc::new(Database::create(&path).unwrap());
        let log = RaftLog::open(db, &[7]).unwrap();
        assert_eq!(log.first_index().unwrap(), 6);
        assert_eq!(log.last_index().unwrap(), 9);
        assert_eq!(log.term(9).unwrap(), 2);
        assert_eq!(log.term(5).unwrap(), 1);
        assert!(log.term(4).is_err());
        let st = log.initial_state().unwrap();
        assert_eq!(st.hard_state.commit, 9);
        assert_eq!(st.conf_state.voters, vec![1], "membership is not replaced on reopen");
        let ents = log.entries(6, 10, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(ents.iter().map(|e| e.index).collect::<Vec<_>>(), vec![6, 7, 8, 9]);
    }
}
