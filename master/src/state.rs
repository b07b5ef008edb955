//! The namespace state machine: inodes, directory entries, each file's extent list, chunk
//! reference counts and the registry of chunkservers, all in redb.
//!
//! Every committed Raft entry is applied here, deterministically: the same entries give the same
//! tables on every master (no clock, no randomness, ordered maps only; the leader's time travels in
//! the entry). A batch of entries is applied in one redb transaction that also records the applied
//! index, so after a crash no entry is applied twice or skipped. Each command validates everything
//! before it writes anything, so a command that fails leaves no trace but its error result.

use std::sync::Arc;

use anyhow::Context;
use cairn_proto::v1::{
    access_key_change, command::Op, command_result, AccessKey, Attr, ChunkserverInfo, ClientAnswer, ClientAnswers,
    ClientRequestId, Command, CommandResult, CommitFileRequest, DirEntry, Empty, Extent, Inode, InodeKind,
    MkdirRequest, RemoveRequest, RenameRequest, RepairLimits, SetRepairLimitsRequest,
};
use prost::Message;
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};

use crate::error::MetaError;

/// One record of a snapshot: the table's number in the snapshot format, a key, a value.
pub type Record = (u32, Vec<u8>, Vec<u8>);

const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
const DIRENTS: TableDefinition<(u64, &str), u64> = TableDefinition::new("dirents");
/// chunk hash -> (reference count, replication goal: the highest of the files referencing it).
const CHUNKS: TableDefinition<&[u8], (u64, u32)> = TableDefinition::new("chunk_refs");
const CHUNKSERVERS: TableDefinition<u64, &[u8]> = TableDefinition::new("chunkservers");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (client, seq) -> (leader time of the first apply, encoded CommandResult): answers to retries.
const SESSIONS: TableDefinition<(u64, u64), (i64, &[u8])> = TableDefinition::new("client_results");
/// (leader time, client, seq): the same entries in age order, for expiry.
const SESSIONS_BY_TIME: TableDefinition<(i64, u64, u64), ()> = TableDefinition::new("client_results_by_time");
/// Client -> encoded ClientAnswers, for clients that send `first_unanswered`: one small row per
/// client (the answers it may still retry), instead of an entry per mutation in the two tables
/// above, which older clients still use.
const CLIENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("client_answers");
/// Master id -> gRPC address: the group's members as of the applied index.
const MASTERS: TableDefinition<u64, &str> = TableDefinition::new("masters");
/// S3 access key id -> encoded AccessKey (with its secret).
const ACCESS_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("access_keys");
/// Inode of a file with no names that a mount keeps open -> (the mount's session, leader time it
/// lost its last name): freed by the mount's ReleaseNode, or by the leader once the session is
/// no longer renewed (`KeepAlive`), so that a mount that crashes does not leak the file.
const KEPT: TableDefinition<u64, (u64, i64)> = TableDefinition::new("kept");

/// How long the answer to a mutation is kept for retries of it. A client retries within its
/// deadline (seconds); this covers it with a wide margin, and a failover in between.
pub const RESULT_TTL_NS: i64 = 15 * 60 * 1_000_000_000;
/// Expired answers dropped per applied entry, at most: expiry work stays bounded, and ahead of
/// the one answer an entry adds.
const EXPIRE_PER_ENTRY: usize = 16;
/// How often (leader time) the rows of clients idle for [`RESULT_TTL_NS`] are looked for.
const CLIENTS_SWEEP_NS: i64 = 60 * 1_000_000_000;

const APPLIED: &str = "applied_index";
const NEXT_INODE: &str = "next_inode";
const FILES: &str = "files";
const BYTES: &str = "bytes";
const REPAIR_RATE: &str = "repair_rate_bytes";
const REPAIR_COPIES: &str = "repair_copies";
const CLIENTS_SWEPT: &str = "clients_swept_ns";

/// Re-replication bandwidth per chunkserver until an admin sets another (`cairn admin repair`):
/// about a third of what one node's disk and QUIC path take here, so client traffic keeps the
/// rest. Copies in flight per chunkserver: enough to keep a 4 MiB-chunk pipeline full.
pub const DEFAULT_REPAIR_RATE: u64 = 200 << 20;
pub const DEFAULT_REPAIR_COPIES: u32 = 16;
pub const MAX_REPAIR_COPIES: u32 = 256;

pub const ROOT: u64 = 1;
/// Longest name in a directory, as on Linux.
pub const NAME_MAX: usize = 255;
pub const PATH_MAX: usize = 4096;
pub use cairn_proto::MAX_EXTENTS;
const MAX_REPLICATION: u32 = 16;

/// Splits an absolute path into names, refusing what no directory entry may be called.
pub fn split_path(path: &str) -> Result<Vec<&str>, MetaError> {
    let bad = |why: &str| MetaError::InvalidArgument(format!("invalid path {path:?}: {why}"));
    if path.len() > PATH_MAX {
        return Err(bad("longer than 4096 bytes"));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(bad("not absolute"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Ok(vec![]);
    }
    let names: Vec<&str> = rest.split('/').collect();
    for n in &names {
        check_name(n).map_err(|e| bad(&e))?;
    }
    Ok(names)
}

pub fn check_name(n: &str) -> Result<(), String> {
    match n {
        "" => Err("empty name".into()),
        "." | ".." => Err(format!("{n:?} is not a name")),
        _ if n.len() > NAME_MAX => Err(format!("name longer than {NAME_MAX} bytes")),
        _ if n.contains('\0') => Err("name contains NUL".into()),
        _ => Ok(()),
    }
}

fn join(names: &[&str]) -> String {
    if names.is_empty() {
        "/".into()
    } else {
        names.iter().fold(String::new(), |mut s, n| {
            s.push('/');
            s.push_str(n);
            s
        })
    }
}

fn decode_inode(bytes: &[u8]) -> anyhow::Result<Inode> {
    Inode::decode(bytes).context("decode inode")
}

fn kind(i: &Inode) -> InodeKind {
    i.attr.as_ref().map_or(InodeKind::Unspecified, |a| a.kind())
}

/// Read-only views run on their own snapshot of the tables, beside the applier.
pub struct Reader {
    txn: ReadTransaction,
}

/// Lookups shared by the reader and the applier.
trait Tables {
    fn inode(&self, id: u64) -> Result<Option<Inode>, MetaError>;
    fn child(&self, parent: u64, name: &str) -> Result<Option<u64>, MetaError>;

    /// Resolves `names` from the root; errors name the path prefix that failed.
    fn resolve(&self, names: &[&str]) -> Result<(u64, Inode), MetaError> {
        let mut id = ROOT;
        let mut node = self.inode(ROOT)?.ok_or_else(|| MetaError::Internal(anyhow::anyhow!("root inode missing")))?;
        for (i, name) in names.iter().enumerate() {
            if kind(&node) != InodeKind::Directory {
                return Err(MetaError::NotADirectory(join(&names[..i])));
            }
            id = self.child(id, name)?.ok_or_else(|| MetaError::NotFound(join(&names[..=i])))?;
            node = self
                .inode(id)?
                .ok_or_else(|| MetaError::Internal(anyhow::anyhow!("dangling entry {}", join(&names[..=i]))))?;
        }
        Ok((id, node))
    }

    fn resolve_dir(&self, names: &[&str]) -> Result<u64, MetaError> {
        let (id, node) = self.resolve(names)?;
        if kind(&node) != InodeKind::Directory {
            return Err(MetaError::NotADirectory(join(names)));
        }
        Ok(id)
    }
}

fn storage(e: impl Into<redb::Error>) -> MetaError {
    MetaError::from(e.into())
}

impl Tables for Reader {
    fn inode(&self, id: u64) -> Result<Option<Inode>, MetaError> {
        let t = self.txn.open_table(INODES).map_err(storage)?;
        let v = t.get(id).map_err(storage)?;
        Ok(match v {
            Some(v) => Some(decode_inode(v.value())?),
            None => None,
        })
    }
    fn child(&self, parent: u64, name: &str) -> Result<Option<u64>, MetaError> {
        let t = self.txn.open_table(DIRENTS).map_err(storage)?;
        Ok(t.get((parent, name)).map_err(storage)?.map(|v| v.value()))
    }
}

impl Reader {
    pub fn stat(&self, path: &str) -> Result<Attr, MetaError> {
        let names = split_path(path)?;
        Ok(self.resolve(&names)?.1.attr.unwrap_or_default())
    }

    /// A file's attributes and extents. Directories have no extents to open.
    pub fn open_file(&self, path: &str) -> Result<Inode, MetaError> {
        let names = split_path(path)?;
        let (_, node) = self.resolve(&names)?;
        if kind(&node) == InodeKind::Directory {
            return Err(MetaError::IsADirectory(path.to_string()));
        }
        Ok(node)
    }

    /// One page of a directory, in bytewise name order, after `start_after`. A file lists as
    /// itself (no entries) so callers can tell what they listed from the returned attr.
    pub fn list(
        &self,
        path: &str,
        start_after: &str,
        limit: usize,
        xattrs: bool,
    ) -> Result<(Attr, Vec<DirEntry>, bool), MetaError> {
        let names = split_path(path)?;
        let (id, node) = self.resolve(&names)?;
        if kind(&node) != InodeKind::Directory {
            return Ok((node.attr.unwrap_or_default(), vec![], false));
        }
        self.list_node(id, node, start_after, limit, xattrs)
    }

    fn list_node(
        &self,
        id: u64,
        node: Inode,
        start_after: &str,
        limit: usize,
        xattrs: bool,
    ) -> Result<(Attr, Vec<DirEntry>, bool), MetaError> {
        let attr = node.attr.unwrap_or_default();
        let t = self.txn.open_table(DIRENTS).map_err(storage)?;
        let mut out = Vec::new();
        let mut more = false;
        let range = t.range((id, start_after)..(id + 1, "")).map_err(storage)?;
        for item in range {
            let (k, v) = item.map_err(storage)?;
            let (_, name) = k.value();
            if name == start_after {
                continue;
            }
            if out.len() == limit {
                more = true;
                break;
            }
            let child =
                self.inode(v.value())?.ok_or_else(|| MetaError::Internal(anyhow::anyhow!("dangling entry {name}")))?;
            let xattrs = if xattrs { child.xattrs } else { Default::default() };
            out.push(DirEntry { name: name.to_string(), attr: child.attr, xattrs });
        }
        Ok((attr, out, more))
    }

    /// The answer the state machine remembers for a client's mutation, if it applied it.
    pub fn remembered(&self, client: u64, seq: u64) -> Result<Option<command_result::Result>, MetaError> {
        let rows = self.txn.open_table(CLIENTS).map_err(storage)?;
        if let Some(row) = rows.get(client).map_err(storage)? {
            let row = decode_answers(row.value())?;
            let below = row.first_unanswered;
            if let Some(a) = row.answers.into_iter().find(|a| a.seq == seq) {
                return Ok(a.result.and_then(|r| r.result));
            }
            if seq < below {
                // Answered and forgotten: what applying it would answer (see `apply_once`).
                return Ok(stale(client, seq).to_command().map(command_result::Result::Error));
            }
        }
        let t = self.txn.open_table(SESSIONS).map_err(storage)?;
        let Some(v) = t.get((client, seq)).map_err(storage)? else { return Ok(None) };
        let (_, bytes) = v.value();
        let r = CommandResult::decode(bytes).context("decode a remembered result").map_err(MetaError::Internal)?;
        Ok(r.result)
    }

    /// The master group's members and addresses, as of this reader's applied index.
    pub fn masters(&self) -> Result<std::collections::BTreeMap<u64, String>, MetaError> {
        let t = self.txn.open_table(MASTERS).map_err(storage)?;
        let mut out = std::collections::BTreeMap::new();
        for item in t.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            out.insert(k.value(), v.value().to_string());
        }
        Ok(out)
    }

    /// One S3 access key, with its secret.
    pub fn access_key(&self, id: &str) -> Result<AccessKey, MetaError> {
        let t = self.txn.open_table(ACCESS_KEYS).map_err(storage)?;
        let v = t.get(id).map_err(storage)?.ok_or_else(|| MetaError::NotFound(format!("access key {id}")))?;
        AccessKey::decode(v.value()).context("decode access key").map_err(MetaError::Internal)
    }

    /// Every S3 access key, secrets left out.
    pub fn access_keys(&self) -> Result<Vec<AccessKey>, MetaError> {
        let t = self.txn.open_table(ACCESS_KEYS).map_err(storage)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(storage)? {
            let (_, v) = item.map_err(storage)?;
            let key = AccessKey::decode(v.value()).context("decode access key").map_err(MetaError::Internal)?;
            out.push(AccessKey { secret: String::new(), ..key });
        }
        Ok(out)
    }

    /// Files without names kept open by mounts: (inode, session, leader time since).
    pub fn kept(&self) -> Result<Vec<(u64, u64, i64)>, MetaError> {
        let t = self.txn.open_table(KEPT).map_err(storage)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let (session, since) = v.value();
            out.push((k.value(), session, since));
        }
        Ok(out)
    }

    pub fn chunkservers(&self) -> Result<Vec<ChunkserverInfo>, MetaError> {
        let t = self.txn.open_table(CHUNKSERVERS).map_err(storage)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(storage)? {
            let (_, v) = item.map_err(storage)?;
            out.push(ChunkserverInfo::decode(v.value()).context("decode chunkserver").map_err(MetaError::Internal)?);
        }
        Ok(out)
    }

    /// Every referenced chunk with its replication goal, for health accounting.
    pub fn for_each_chunk(&self, mut f: impl FnMut(&[u8], u32)) -> Result<(), MetaError> {
        let t = self.txn.open_table(CHUNKS).map_err(storage)?;
        for item in t.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            f(k.value(), v.value().1);
        }
        Ok(())
    }

    /// The replication goal of each chunk that some file references (None: no file does).
    pub fn chunk_goals<'h>(
        &self,
        hashes: impl IntoIterator<Item = &'h [u8; 32]>,
    ) -> Result<Vec<Option<u32>>, MetaError> {
        let t = self.txn.open_table(CHUNKS).map_err(storage)?;
        let mut out = Vec::new();
        for h in hashes {
            out.push(t.get(h.as_slice()).map_err(storage)?.map(|v| v.value().1));
        }
        Ok(out)
    }

    pub fn counter(&self, key: &str) -> Result<u64, MetaError> {
        let t = self.txn.open_table(META).map_err(storage)?;
        Ok(t.get(key).map_err(storage)?.map_or(0, |v| v.value()))
    }

    pub fn files(&self) -> Result<u64, MetaError> {
        self.counter(FILES)
    }

    /// The re-replication limits in force: the defaults until an admin changed them.
    pub fn repair_limits(&self) -> Result<RepairLimits, MetaError> {
        let t = self.txn.open_table(META).map_err(storage)?;
        let get = |k: &str| t.get(k).map_err(storage).map(|v| v.map(|v| v.value()));
        Ok(RepairLimits {
            rate_bytes: get(REPAIR_RATE)?.unwrap_or(DEFAULT_REPAIR_RATE),
            copies: get(REPAIR_COPIES)?.map_or(DEFAULT_REPAIR_COPIES, |c| c as u32),
        })
    }
    pub fn bytes(&self) -> Result<u64, MetaError> {
        self.counter(BYTES)
    }
}

/// The tables as seen inside one apply transaction.
struct Writer<'t> {
    inodes: Table<'t, u64, &'static [u8]>,
    dirents: Table<'t, (u64, &'static str), u64>,
    chunks: Table<'t, &'static [u8], (u64, u32)>,
    chunkservers: Table<'t, u64, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
    sessions: Table<'t, (u64, u64), (i64, &'static [u8])>,
    sessions_by_time: Table<'t, (i64, u64, u64), ()>,
    clients: Table<'t, u64, &'static [u8]>,
    masters: Table<'t, u64, &'static str>,
    access_keys: Table<'t, &'static str, &'static [u8]>,
    kept: Table<'t, u64, (u64, i64)>,
    /// Inodes, counters and client rows read or written in this batch: see [`Cache`]. Every
    /// access to those rows goes through these while the writer lives; [`Writer::flush`] writes
    /// them back.
    inode_rows: Cache<u64, Inode>,
    counters: Cache<&'static str, u64>,
    client_rows: Cache<u64, ClientAnswers>,
}

/// The most rows a [`Cache`] holds; past it, rows not in it are read and written in the table.
const CACHE_ROWS: usize = 4096;
/// Inodes with more extents than this are not cached (a batch of big files would otherwise keep
/// every one's decoded extent list until the batch ends).
const CACHE_EXTENTS_MAX: usize = 256;

fn cacheable(node: &Option<Inode>) -> bool {
    node.as_ref().is_none_or(|n| n.extents.len() <= CACHE_EXTENTS_MAX)
}

/// Rows of one table read or written during an apply batch, written back to the table at its
/// end: a batch of creates in one directory then decodes and rewrites that directory's inode, the
/// counters and each client's answers once per batch instead of once per create. A key in the
/// cache has its current value there (`None`: removed); a key not in it has it in the table.
struct Cache<K, V> {
    rows: std::cell::RefCell<std::collections::HashMap<K, (Option<V>, bool)>>,
    /// Which values may be cached; the others stay in the table only.
    keep: fn(&Option<V>) -> bool,
}

impl<K: std::hash::Hash + Eq + Copy, V: Clone> Cache<K, V> {
    fn new(keep: fn(&Option<V>) -> bool) -> Self {
        Cache { rows: Default::default(), keep }
    }

    /// The value of `key`, from the cache or else from `load` (kept while there is room and
    /// `keep` allows).
    fn get(&self, key: K, load: impl FnOnce() -> Result<Option<V>, MetaError>) -> Result<Option<V>, MetaError> {
        if let Some((value, _)) = self.rows.borrow().get(&key) {
            return Ok(value.clone());
        }
        let value = load()?;
        let mut rows = self.rows.borrow_mut();
        if rows.len() < CACHE_ROWS && (self.keep)(&value) {
            rows.insert(key, (value.clone(), false));
        }
        Ok(value)
    }

    /// Sets `key` to `value` (`None`: removed) in the cache. False when `keep` refuses the
    /// value (the key then leaves the cache) or the cache is full and `key` not in it: the
    /// caller writes the table itself.
    fn set(&self, key: K, value: Option<V>) -> bool {
        let mut rows = self.rows.borrow_mut();
        if !(self.keep)(&value) {
            rows.remove(&key);
            return false;
        }
        if rows.len() >= CACHE_ROWS && !rows.contains_key(&key) {
            return false;
        }
        rows.insert(key, (value, true));
        true
    }

    fn len(&self) -> usize {
        self.rows.borrow().len()
    }

    /// Empties the cache, giving back the rows written since it was last emptied.
    fn drain_written(&self) -> Vec<(K, Option<V>)> {
        self.rows.borrow_mut().drain().filter(|(_, (_, written))| *written).map(|(k, (v, _))| (k, v)).collect()
    }
}

impl Tables for Writer<'_> {
    fn inode(&self, id: u64) -> Result<Option<Inode>, MetaError> {
        self.inode_rows.get(id, || match self.inodes.get(id).map_err(storage)? {
            Some(v) => Ok(Some(decode_inode(v.value())?)),
            None => Ok(None),
        })
    }
    fn child(&self, parent: u64, name: &str) -> Result<Option<u64>, MetaError> {
        Ok(self.dirents.get((parent, name)).map_err(storage)?.map(|v| v.value()))
    }
}

impl Writer<'_> {
    fn counter(&self, key: &'static str) -> Result<u64, MetaError> {
        let value = self.counters.get(key, || Ok(self.meta.get(key).map_err(storage)?.map(|v| v.value())))?;
        Ok(value.unwrap_or(0))
    }
    fn set_counter(&mut self, key: &'static str, value: u64) -> Result<(), MetaError> {
        if !self.counters.set(key, Some(value)) {
            self.meta.insert(key, value).map_err(storage)?;
        }
        Ok(())
    }
    fn add_counter(&mut self, key: &'static str, delta: i64) -> Result<(), MetaError> {
        let v = self.counter(key)?.saturating_add_signed(delta);
        self.set_counter(key, v)
    }
    fn put_inode(&mut self, id: u64, node: &Inode) -> Result<(), MetaError> {
        if !self.inode_rows.set(id, Some(node.clone())) {
            self.inodes.insert(id, node.encode_to_vec().as_slice()).map_err(storage)?;
        }
        Ok(())
    }
    fn remove_inode(&mut self, id: u64) -> Result<(), MetaError> {
        if !self.inode_rows.set(id, None) {
            self.inodes.remove(id).map_err(storage)?;
        }
        Ok(())
    }
    fn alloc_inode(&mut self) -> Result<u64, MetaError> {
        let id = self.counter(NEXT_INODE)?.max(ROOT + 1);
        self.set_counter(NEXT_INODE, id + 1)?;
        Ok(id)
    }
    /// A client's row of answers.
    fn client_row(&self, client: u64) -> Result<ClientAnswers, MetaError> {
        let row = self.client_rows.get(client, || match self.clients.get(client).map_err(storage)? {
            Some(v) => Ok(Some(decode_answers(v.value())?)),
            None => Ok(None),
        })?;
        Ok(row.unwrap_or_default())
    }
    fn put_client_row(&mut self, client: u64, row: ClientAnswers) -> Result<(), MetaError> {
        if !self.client_rows.set(client, Some(row.clone())) {
            self.clients.insert(client, row.encode_to_vec().as_slice()).map_err(storage)?;
        }
        Ok(())
    }
    /// Writes what the caches hold back to the tables, and empties them.
    fn flush(&mut self) -> Result<(), MetaError> {
        for (id, node) in self.inode_rows.drain_written() {
            match node {
                Some(node) => self.inodes.insert(id, node.encode_to_vec().as_slice()).map_err(storage)?,
                None => self.inodes.remove(id).map_err(storage)?,
            };
        }
        for (key, value) in self.counters.drain_written() {
            match value {
                Some(value) => self.meta.insert(key, value).map_err(storage)?,
                None => self.meta.remove(key).map_err(storage)?,
            };
        }
        for (client, row) in self.client_rows.drain_written() {
            match row {
                Some(row) => self.clients.insert(client, row.encode_to_vec().as_slice()).map_err(storage)?,
                None => self.clients.remove(client).map_err(storage)?,
            };
        }
        Ok(())
    }
    fn has_children(&self, dir: u64) -> Result<bool, MetaError> {
        Ok(self.dirents.range((dir, "")..(dir + 1, "")).map_err(storage)?.next().is_some())
    }
    fn children(&self, dir: u64) -> Result<Vec<(String, u64)>, MetaError> {
        let mut out = Vec::new();
        for item in self.dirents.range((dir, "")..(dir + 1, "")).map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            out.push((k.value().1.to_string(), v.value()));
        }
        Ok(out)
    }
    fn add_link_count(&mut self, dir: u64, delta: i64, time_ns: i64) -> Result<(), MetaError> {
        let mut node = self.inode(dir)?.ok_or_else(|| MetaError::Internal(anyhow::anyhow!("inode {dir} missing")))?;
        let attr = node.attr.get_or_insert_default();
        attr.nlink = attr.nlink.saturating_add_signed(delta as i32);
        attr.mtime_ns = time_ns;
        attr.ctime_ns = time_ns;
        self.put_inode(dir, &node)
    }
    fn chunk_refs(&mut self, extents: &[Extent], replication: u32, delta: i64) -> Result<(), MetaError> {
        for e in extents {
            let cur = self.chunks.get(e.hash.as_slice()).map_err(storage)?.map(|v| v.value());
            let (count, goal) = cur.unwrap_or((0, 0));
            let count = count.saturating_add_signed(delta);
            if count == 0 {
                self.chunks.remove(e.hash.as_slice()).map_err(storage)?;
            } else {
                self.chunks.insert(e.hash.as_slice(), (count, goal.max(replication))).map_err(storage)?;
            }
        }
        Ok(())
    }
    /// Drops an inode that lost its last name: its chunks lose a reference.
    fn release(&mut self, id: u64, node: &Inode) -> Result<(), MetaError> {
        if kind(node) == InodeKind::File {
            let attr = node.attr.clone().unwrap_or_default();
            self.chunk_refs(&node.extents, attr.replication, -1)?;
            self.add_counter(FILES, -1)?;
            self.add_counter(BYTES, -(attr.size as i64))?;
        }
        self.remove_inode(id)?;
        self.kept.remove(id).map_err(storage)?;
        Ok(())
    }
}

fn new_attr(id: u64, kind: InodeKind, mode: u32, uid: u32, gid: u32, time_ns: i64) -> Attr {
    Attr {
        inode: id,
        kind: kind as i32,
        mode: mode & 0o7777,
        uid,
        gid,
        mtime_ns: time_ns,
        ctime_ns: time_ns,
        nlink: if kind == InodeKind::Directory { 2 } else { 1 },
        ..Default::default()
    }
}

/// Checks an extent list from a client before it is proposed (and again when applied).
pub fn check_extents(extents: &[Extent]) -> Result<u64, MetaError> {
    if extents.len() > MAX_EXTENTS {
        return Err(MetaError::InvalidArgument(format!("{} extents, at most {MAX_EXTENTS}", extents.len())));
    }
    let mut size = 0u64;
    for e in extents {
        if e.hash.len() != cairn_proto::HASH_LEN {
            return Err(MetaError::InvalidArgument("chunk hash is not 32 bytes".into()));
        }
        if e.length == 0 || e.length > cairn_proto::MAX_CHUNK {
            return Err(MetaError::InvalidArgument(format!("extent of {} bytes", e.length)));
        }
        size += e.length;
    }
    Ok(size)
}

/// Extended attributes set in one go (S3 object metadata): valid names, bounded values.
pub fn check_xattrs(xattrs: &std::collections::BTreeMap<String, Vec<u8>>) -> Result<(), MetaError> {
    let mut total = 0;
    for (name, value) in xattrs {
        check_xattr_name(name)?;
        total += name.len() + value.len();
    }
    if total > XATTR_VALUE_MAX {
        return Err(MetaError::InvalidArgument(format!("{total} bytes of extended attributes in one commit")));
    }
    Ok(())
}

/// The namespace database. Cloning shares it.
#[derive(Clone)]
pub struct State {
    db: Arc<Database>,
}

impl State {
    /// Opens the tables, creating the root directory in a new database.
    pub fn open(db: Arc<Database>) -> anyhow::Result<State> {
        let txn = db.begin_write()?;
        {
            let mut inodes = txn.open_table(INODES)?;
            if inodes.get(ROOT)?.is_none() {
                let attr = Some(new_attr(ROOT, InodeKind::Directory, 0o755, 0, 0, 0));
                let root = Inode { attr, parent: ROOT, ..Default::default() };
                inodes.insert(ROOT, root.encode_to_vec().as_slice())?;
            }
            txn.open_table(DIRENTS)?;
            txn.open_table(CHUNKS)?;
            txn.open_table(CHUNKSERVERS)?;
            txn.open_table(META)?;
            txn.open_table(SESSIONS)?;
            txn.open_table(SESSIONS_BY_TIME)?;
            txn.open_table(CLIENTS)?;
            txn.open_table(MASTERS)?;
            txn.open_table(ACCESS_KEYS)?;
            txn.open_table(KEPT)?;
        }
        txn.commit()?;
        Ok(State { db })
    }

    pub fn reader(&self) -> Result<Reader, MetaError> {
        Ok(Reader { txn: self.db.begin_read().map_err(storage)? })
    }

    pub fn applied_index(&self) -> Result<u64, MetaError> {
        self.reader()?.counter(APPLIED)
    }

    /// Applies a batch of committed commands and records `applied` in the same (unsynced)
    /// transaction. A storage error aborts the whole batch (the caller must stop: crash-only).
    pub fn apply_batch(&self, cmds: &[(u64, Option<Command>)], applied: u64) -> anyhow::Result<Vec<CommandResult>> {
        let mut txn: WriteTransaction = self.db.begin_write()?;
        // Not fsynced: every applied entry is already durable in the Raft log file, which keeps
        // every entry after the last durable applied index (compaction and checkpoints make this
        // database durable; redb persists unsynced transactions with the next durable one, in
        // order). After a crash the applied index on disk is older, and the entries after it are
        // applied again from the log, so no entry is lost, skipped or applied twice.
        txn.set_durability(redb::Durability::None)?;
        let results = self.apply_in(&txn, cmds, applied)?;
        txn.commit()?;
        Ok(results)
    }

    /// Makes every transaction of [`State::apply_batch`] committed so far durable (they are not
    /// fsynced one by one), so that a restart applies fewer entries again.
    pub fn checkpoint(&self) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(())
    }

    /// Applies a batch of committed commands inside `txn` and records `applied` there. An error
    /// means the transaction must be dropped (and the master stop).
    fn apply_in(
        &self,
        txn: &WriteTransaction,
        cmds: &[(u64, Option<Command>)],
        applied: u64,
    ) -> anyhow::Result<Vec<CommandResult>> {
        let mut results = Vec::with_capacity(cmds.len());
        let mut w = Writer {
            inodes: txn.open_table(INODES)?,
            dirents: txn.open_table(DIRENTS)?,
            chunks: txn.open_table(CHUNKS)?,
            chunkservers: txn.open_table(CHUNKSERVERS)?,
            meta: txn.open_table(META)?,
            sessions: txn.open_table(SESSIONS)?,
            sessions_by_time: txn.open_table(SESSIONS_BY_TIME)?,
            clients: txn.open_table(CLIENTS)?,
            masters: txn.open_table(MASTERS)?,
            access_keys: txn.open_table(ACCESS_KEYS)?,
            kept: txn.open_table(KEPT)?,
            inode_rows: Cache::new(cacheable),
            counters: Cache::new(|_| true),
            client_rows: Cache::new(|_| true),
        };
        for (_, cmd) in cmds {
            let res = match cmd {
                Some(cmd) => {
                    // Expiry goes entry by entry, by each entry's time, so that every master
                    // forgets the same answers at the same index however it batches its applies.
                    expire_results(&mut w, cmd.time_ns).map_err(|e| anyhow::anyhow!("expire client results: {e}"))?;
                    expire_clients(&mut w, cmd.time_ns).map_err(|e| anyhow::anyhow!("expire client rows: {e}"))?;
                    apply_once(&mut w, cmd)
                }
                None => Ok(command_result::Result::Done(Empty {})),
            };
            let res = match res {
                Ok(r) => r,
                Err(e) => match e.to_command() {
                    Some(ce) => command_result::Result::Error(ce),
                    None => return Err(anyhow::anyhow!("apply failed: {e}")),
                },
            };
            results.push(CommandResult { result: Some(res) });
            if w.inode_rows.len() >= CACHE_ROWS {
                w.flush().map_err(|e| anyhow::anyhow!("write back applied rows: {e}"))?;
            }
        }
        w.flush().map_err(|e| anyhow::anyhow!("write back applied rows: {e}"))?;
        w.meta.insert(APPLIED, applied)?;
        Ok(results)
    }
}

/// The client's id of a mutation, when it sent one.
fn request_id(cmd: &Command) -> Option<&ClientRequestId> {
    let id = match &cmd.op {
        Some(Op::Mkdir(r)) => r.id.as_ref(),
        Some(Op::CommitFile(r)) => r.id.as_ref(),
        Some(Op::Rename(r)) => r.id.as_ref(),
        Some(Op::Remove(r)) => r.id.as_ref(),
        Some(Op::SetMaster(m)) => m.request.as_ref(),
        Some(Op::SetRepairLimits(r)) => r.id.as_ref(),
        Some(Op::Drain(r)) => r.request.as_ref(),
        Some(Op::Node(r)) => r.id.as_ref(),
        Some(Op::AccessKey(r)) => r.request.as_ref(),
        _ => None,
    }?;
    (id.client != 0).then_some(id)
}

fn decode_answers(bytes: &[u8]) -> Result<ClientAnswers, MetaError> {
    ClientAnswers::decode(bytes).context("decode a client's answers").map_err(MetaError::Internal)
}

/// What a mutation's answer is remembered as; `None` for a storage failure, which aborts the
/// batch and is not an answer.
fn to_remember(res: &Result<command_result::Result, MetaError>) -> Option<CommandResult> {
    match res {
        Ok(r) => Some(CommandResult { result: Some(r.clone()) }),
        Err(e) => e.to_command().map(|ce| CommandResult { result: Some(command_result::Result::Error(ce)) }),
    }
}

/// Applies a command once per client request id: a retry gets the first answer back.
fn apply_once(w: &mut Writer<'_>, cmd: &Command) -> Result<command_result::Result, MetaError> {
    let Some(id) = request_id(cmd).cloned() else { return apply_one(w, cmd) };
    if id.first_unanswered != 0 {
        return apply_once_per_client(w, cmd, &id);
    }
    let key = (id.client, id.seq);
    if let Some(first) = remembered_alone(w, key)? {
        return Ok(first);
    }
    let res = apply_one(w, cmd);
    let Some(stored) = to_remember(&res) else { return res };
    w.sessions.insert(key, (cmd.time_ns, stored.encode_to_vec().as_slice())).map_err(storage)?;
    w.sessions_by_time.insert((cmd.time_ns, key.0, key.1), ()).map_err(storage)?;
    res
}

/// The answer kept for `(client, seq)` on its own (clients that send no mark), if any. A
/// remembered error comes back as `Ok(Error(..))`, as applying answered it.
fn remembered_alone(w: &Writer<'_>, key: (u64, u64)) -> Result<Option<command_result::Result>, MetaError> {
    let Some(v) = w.sessions.get(key).map_err(storage)? else { return Ok(None) };
    let (_, bytes) = v.value();
    let first = CommandResult::decode(bytes).context("decode a remembered result").map_err(MetaError::Internal)?;
    first.result.map(Some).ok_or_else(|| MetaError::Internal(anyhow::anyhow!("empty remembered result")))
}

/// [`apply_once`] for a client that says which answers it still waits for: its row keeps those
/// only, and a mutation below them (a stale copy of one it gave up or got the answer to) is
/// refused rather than applied a second time.
fn apply_once_per_client(
    w: &mut Writer<'_>,
    cmd: &Command,
    id: &ClientRequestId,
) -> Result<command_result::Result, MetaError> {
    let mut row = w.client_row(id.client)?;
    if let Some(first) = row.answers.iter().find(|a| a.seq == id.seq) {
        return first
            .result
            .clone()
            .and_then(|r| r.result)
            .ok_or_else(|| MetaError::Internal(anyhow::anyhow!("empty remembered result")));
    }
    if id.seq < row.first_unanswered {
        return Err(stale(id.client, id.seq));
    }
    // Remembered by a master of the version before (which did not read the mark).
    if let Some(first) = remembered_alone(w, (id.client, id.seq))? {
        return Ok(first);
    }
    let res = apply_one(w, cmd);
    let Some(stored) = to_remember(&res) else { return res };
    row.first_unanswered = row.first_unanswered.max(id.first_unanswered.min(id.seq));
    let below = row.first_unanswered;
    row.answers.retain(|a| a.seq >= below);
    row.answers.push(ClientAnswer { seq: id.seq, result: Some(stored) });
    row.last_ns = row.last_ns.max(cmd.time_ns);
    w.put_client_row(id.client, row)?;
    res
}

/// The answer to a copy of a mutation below its client's mark: that one was answered (or given
/// up) already, and must not take effect again.
fn stale(client: u64, seq: u64) -> MetaError {
    MetaError::InvalidArgument(format!(
        "mutation {seq} of client {client:x} was answered already, and its answer forgotten"
    ))
}

/// Forgets the rows of clients that sent nothing for [`RESULT_TTL_NS`] before `now_ns`, looking
/// once per [`CLIENTS_SWEEP_NS`] of leader time.
fn expire_clients(w: &mut Writer<'_>, now_ns: i64) -> Result<(), MetaError> {
    let swept = w.counter(CLIENTS_SWEPT)? as i64;
    if now_ns.saturating_sub(swept) < CLIENTS_SWEEP_NS {
        return Ok(());
    }
    let cutoff = now_ns.saturating_sub(RESULT_TTL_NS);
    w.flush()?;
    let mut idle = Vec::new();
    for item in w.clients.iter().map_err(storage)? {
        let (k, v) = item.map_err(storage)?;
        if decode_answers(v.value())?.last_ns < cutoff {
            idle.push(k.value());
        }
    }
    for client in idle {
        w.clients.remove(client).map_err(storage)?;
    }
    w.set_counter(CLIENTS_SWEPT, now_ns.max(0) as u64)
}

/// Forgets answers older than [`RESULT_TTL_NS`] before `now_ns` (the leader's time in the entry).
fn expire_results(w: &mut Writer<'_>, now_ns: i64) -> Result<(), MetaError> {
    let cutoff = now_ns.saturating_sub(RESULT_TTL_NS);
    let mut old = Vec::new();
    for item in w.sessions_by_time.range((i64::MIN, 0, 0)..(cutoff, 0, 0)).map_err(storage)? {
        let (k, _) = item.map_err(storage)?;
        old.push(k.value());
        if old.len() == EXPIRE_PER_ENTRY {
            break;
        }
    }
    for (t, client, seq) in old {
        w.sessions_by_time.remove((t, client, seq)).map_err(storage)?;
        w.sessions.remove((client, seq)).map_err(storage)?;
    }
    Ok(())
}

fn apply_one(w: &mut Writer<'_>, cmd: &Command) -> Result<command_result::Result, MetaError> {
    let t = cmd.time_ns;
    match &cmd.op {
        Some(Op::Mkdir(req)) => mkdir(w, req, t).map(command_result::Result::Attr),
        Some(Op::CommitFile(req)) => commit_file(w, req, t).map(command_result::Result::Attr),
        Some(Op::Rename(req)) => rename(w, req, t).map(|_| command_result::Result::Done(Empty {})),
        Some(Op::Remove(req)) => remove(w, req, t).map(|_| command_result::Result::Done(Empty {})),
        Some(Op::Node(req)) => nodes::node_op(w, req, t),
        Some(Op::AccessKey(change)) => match &change.op {
            Some(access_key_change::Op::Create(key)) => {
                check_access_key(key)?;
                if w.access_keys.get(key.id.as_str()).map_err(storage)?.is_some() {
                    return Err(MetaError::AlreadyExists(format!("access key {}", key.id)));
                }
                let key = AccessKey { created_ns: t, ..key.clone() };
                w.access_keys.insert(key.id.as_str(), key.encode_to_vec().as_slice()).map_err(storage)?;
                Ok(command_result::Result::AccessKey(key))
            }
            Some(access_key_change::Op::Delete(id)) => {
                if w.access_keys.remove(id.as_str()).map_err(storage)?.is_none() {
                    return Err(MetaError::NotFound(format!("access key {id}")));
                }
                Ok(command_result::Result::Done(Empty {}))
            }
            None => Err(MetaError::InvalidArgument("empty access key change".into())),
        },
        Some(Op::RegisterChunkserver(info)) => {
            w.chunkservers.insert(info.id, info.encode_to_vec().as_slice()).map_err(storage)?;
            Ok(command_result::Result::Done(Empty {}))
        }
        Some(Op::SetMaster(m)) => {
            if m.removed {
                w.masters.remove(m.id).map_err(storage)?;
            } else if !m.addr.is_empty() {
                w.masters.insert(m.id, m.addr.as_str()).map_err(storage)?;
            }
            Ok(command_result::Result::Done(Empty {}))
        }
        Some(Op::Drain(req)) => {
            let mut info = match w.chunkservers.get(req.id).map_err(storage)? {
                Some(v) => {
                    ChunkserverInfo::decode(v.value()).context("decode chunkserver").map_err(MetaError::Internal)?
                }
                None => return Err(MetaError::NotFound(format!("chunkserver {}", req.id))),
            };
            if req.forget {
                w.chunkservers.remove(req.id).map_err(storage)?;
            } else {
                info.draining = !req.cancel;
                w.chunkservers.insert(req.id, info.encode_to_vec().as_slice()).map_err(storage)?;
            }
            Ok(command_result::Result::Done(Empty {}))
        }
        Some(Op::SetRepairLimits(req)) => {
            check_repair_limits(req)?;
            if let Some(rate) = req.rate_bytes {
                w.meta.insert(REPAIR_RATE, rate).map_err(storage)?;
            }
            if let Some(copies) = req.copies {
                w.meta.insert(REPAIR_COPIES, u64::from(copies)).map_err(storage)?;
            }
            let get = |k: &str| w.meta.get(k).map_err(storage).map(|v| v.map(|v| v.value()));
            Ok(command_result::Result::Limits(RepairLimits {
                rate_bytes: get(REPAIR_RATE)?.unwrap_or(DEFAULT_REPAIR_RATE),
                copies: get(REPAIR_COPIES)?.map_or(DEFAULT_REPAIR_COPIES, |c| c as u32),
            }))
        }
        None => Err(MetaError::InvalidArgument("empty command".into())),
    }
}

/// An access key as S3 clients spell it: an id of 16 to 128 characters of A-Z and 0-9, a
/// secret of 32 to 128 printable ASCII characters.
pub fn check_access_key(key: &AccessKey) -> Result<(), MetaError> {
    let id_ok =
        (16..=128).contains(&key.id.len()) && key.id.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if !id_ok {
        return Err(MetaError::InvalidArgument(format!("access key id {:?}", key.id)));
    }
    if !(32..=128).contains(&key.secret.len()) || !key.secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(MetaError::InvalidArgument("secret access key: 32 to 128 printable characters".into()));
    }
    if key.description.len() > 1024 {
        return Err(MetaError::InvalidArgument("access key description longer than 1024 bytes".into()));
    }
    Ok(())
}

/// Limits an admin may set: at least one copy in flight, and not so many that one node's memory
/// (a chunk buffer per copy) runs out.
pub fn check_repair_limits(req: &SetRepairLimitsRequest) -> Result<(), MetaError> {
    if let Some(c) = req.copies {
        if c == 0 || c > MAX_REPAIR_COPIES {
            return Err(MetaError::InvalidArgument(format!("{c} copies in flight (1 to {MAX_REPAIR_COPIES})")));
        }
    }
    Ok(())
}

fn mkdir(w: &mut Writer<'_>, req: &MkdirRequest, t: i64) -> Result<Attr, MetaError> {
    let names = split_path(&req.path)?;
    if names.is_empty() {
        return if req.parents {
            Ok(w.resolve(&[])?.1.attr.unwrap_or_default())
        } else {
            Err(MetaError::AlreadyExists("/".into()))
        };
    }
    let mut dir = ROOT;
    for (i, name) in names.iter().enumerate() {
        let last = i + 1 == names.len();
        match w.child(dir, name)? {
            Some(id) => {
                let node = w.inode(id)?.ok_or_else(|| MetaError::Internal(anyhow::anyhow!("dangling entry")))?;
                if last {
                    return if req.parents && kind(&node) == InodeKind::Directory {
                        Ok(node.attr.unwrap_or_default())
                    } else {
                        Err(MetaError::AlreadyExists(join(&names)))
                    };
                }
                if kind(&node) != InodeKind::Directory {
                    return Err(MetaError::NotADirectory(join(&names[..=i])));
                }
                dir = id;
            }
            None if last || req.parents => {
                // From here on every lookup is in a directory this command created: nothing can
                // fail any more, so the command stays atomic.
                let id = w.alloc_inode()?;
                let attr = new_attr(id, InodeKind::Directory, req.mode, req.uid, req.gid, t);
                w.put_inode(id, &Inode { attr: Some(attr.clone()), parent: dir, ..Default::default() })?;
                w.dirents.insert((dir, *name), id).map_err(storage)?;
                w.add_link_count(dir, 1, t)?;
                if last {
                    return Ok(attr);
                }
                dir = id;
            }
            None => return Err(MetaError::NotFound(join(&names[..=i]))),
        }
    }
    unreachable!("the loop returns at the last name")
}

fn commit_file(w: &mut Writer<'_>, req: &CommitFileRequest, t: i64) -> Result<Attr, MetaError> {
    let names = split_path(&req.path)?;
    let Some((name, parent_names)) = names.split_last() else {
        return Err(MetaError::IsADirectory("/".into()));
    };
    let size = check_extents(&req.extents)?;
    check_xattrs(&req.xattrs)?;
    if req.replication == 0 || req.replication > MAX_REPLICATION {
        return Err(MetaError::InvalidArgument(format!("replication {} (1 to {MAX_REPLICATION})", req.replication)));
    }
    let parent = w.resolve_dir(parent_names)?;
    let (id, mut node) = match w.child(parent, name)? {
        Some(_) if req.exclusive => return Err(MetaError::AlreadyExists(req.path.clone())),
        Some(id) => {
            let node = w.inode(id)?.ok_or_else(|| MetaError::Internal(anyhow::anyhow!("dangling entry")))?;
            match kind(&node) {
                InodeKind::File => {}
                InodeKind::Directory => return Err(MetaError::IsADirectory(req.path.clone())),
                _ => return Err(MetaError::InvalidArgument(format!("{} is not a regular file", req.path))),
            }
            let old = node.attr.clone().unwrap_or_default();
            w.chunk_refs(&node.extents, old.replication, -1)?;
            w.add_counter(BYTES, -(old.size as i64))?;
            (id, node)
        }
        None => {
            let id = w.alloc_inode()?;
            w.dirents.insert((parent, *name), id).map_err(storage)?;
            w.add_counter(FILES, 1)?;
            w.add_link_count(parent, 0, t)?;
            (
                id,
                Inode {
                    attr: Some(new_attr(id, InodeKind::File, req.mode, req.uid, req.gid, t)),
                    ..Default::default()
                },
            )
        }
    };
    w.chunk_refs(&req.extents, req.replication, 1)?;
    w.add_counter(BYTES, size as i64)?;
    if req.set_xattrs {
        node.xattrs = req.xattrs.clone();
    } else {
        nodes::drop_object_metadata(&mut node);
    }
    let attr = node.attr.get_or_insert_default();
    attr.size = size;
    attr.replication = req.replication;
    attr.version += 1;
    attr.mtime_ns = t;
    attr.ctime_ns = t;
    attr.extent_count = req.extents.len() as u64;
    node.extents = req.extents.clone();
    w.put_inode(id, &node)?;
    Ok(node.attr.unwrap_or_default())
}

fn rename(w: &mut Writer<'_>, req: &RenameRequest, t: i64) -> Result<(), MetaError> {
    let src = split_path(&req.src)?;
    let dst = split_path(&req.dst)?;
    let (Some((sname, sparent)), Some((dname, dparent))) = (src.split_last(), dst.split_last()) else {
        return Err(MetaError::InvalidArgument("cannot rename the root directory".into()));
    };
    // Errors in the order the path names them: the source first, then where it would go.
    let sdir = w.resolve_dir(sparent)?;
    let sid = w.child(sdir, sname)?.ok_or_else(|| MetaError::NotFound(req.src.clone()))?;
    let src_is_dir = w.inode(sid)?.is_some_and(|n| kind(&n) == InodeKind::Directory);
    if src_is_dir && dst.len() > src.len() && dst[..src.len()] == src[..] {
        return Err(MetaError::InvalidArgument(format!("cannot move {} into its own subtree {}", req.src, req.dst)));
    }
    let ddir = w.resolve_dir(dparent)?;
    nodes::rename_at(w, (sdir, sname, &req.src), (ddir, dname, &req.dst), nodes::Replace::Allowed, None, t)
}

fn remove(w: &mut Writer<'_>, req: &RemoveRequest, t: i64) -> Result<(), MetaError> {
    let names = split_path(&req.path)?;
    let Some((name, parent_names)) = names.split_last() else {
        return Err(MetaError::InvalidArgument("cannot remove the root directory".into()));
    };
    let parent = w.resolve_dir(parent_names)?;
    let id = w.child(parent, name)?.ok_or_else(|| MetaError::NotFound(req.path.clone()))?;
    let node = w.inode(id)?.ok_or_else(|| MetaError::Internal(anyhow::anyhow!("dangling entry")))?;
    let is_dir = kind(&node) == InodeKind::Directory;
    if is_dir && !req.recursive && w.has_children(id)? {
        return Err(MetaError::NotEmpty(req.path.clone()));
    }
    w.dirents.remove((parent, *name)).map_err(storage)?;
    w.add_link_count(parent, if is_dir { -1 } else { 0 }, t)?;
    // Depth-first over the subtree with an explicit stack: no recursion depth limit to hit.
    drop(node);
    let mut stack = vec![id];
    while let Some(id) = stack.pop() {
        // Read when popped, not when pushed: a file with two names in the subtree has lost one
        // link by the time its second name comes up.
        let node = w.inode(id)?.ok_or_else(|| MetaError::Internal(anyhow::anyhow!("dangling entry")))?;
        if kind(&node) == InodeKind::Directory {
            for (cname, cid) in w.children(id)? {
                w.dirents.remove((id, cname.as_str())).map_err(storage)?;
                stack.push(cid);
            }
        }
        nodes::drop_link(w, id, node, None, t)?;
    }
    Ok(())
}

mod nodes;
pub use nodes::{check_entry_name, check_xattr_name, XATTR_VALUE_MAX};

#[cfg(test)]
mod tests;

// ---------------------------------------------------------------- snapshots

/// The applied index as seen by `txn`.
pub fn applied_in(txn: &ReadTransaction) -> anyhow::Result<u64> {
    Ok(txn.open_table(META)?.get(APPLIED)?.map_or(0, |v| v.value()))
}

/// Table ids of snapshot records: a wire contract between masters, like proto field numbers.
const T_INODES: u32 = 1;
const T_DIRENTS: u32 = 2;
const T_CHUNKS: u32 = 3;
const T_CHUNKSERVERS: u32 = 4;
const T_META: u32 = 5;
const T_SESSIONS: u32 = 6;
const T_SESSIONS_BY_TIME: u32 = 7;
const T_MASTERS: u32 = 8;
const T_ACCESS_KEYS: u32 = 9;
const T_KEPT: u32 = 10;
const T_CLIENTS: u32 = 11;

fn u64_at(b: &[u8], at: usize) -> anyhow::Result<u64> {
    Ok(u64::from_be_bytes(b.get(at..at + 8).context("short snapshot record")?.try_into().expect("8 bytes")))
}

/// Every record of every state table as seen by `txn`, in table and key order. `emit` may fail
/// (a closed stream), which stops the dump.
pub fn dump(
    txn: &ReadTransaction,
    mut emit: impl FnMut(u32, Vec<u8>, Vec<u8>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for item in txn.open_table(INODES)?.iter()? {
        let (k, v) = item?;
        emit(T_INODES, k.value().to_be_bytes().to_vec(), v.value().to_vec())?;
    }
    for item in txn.open_table(DIRENTS)?.iter()? {
        let (k, v) = item?;
        let (parent, name) = k.value();
        let mut key = parent.to_be_bytes().to_vec();
        key.extend_from_slice(name.as_bytes());
        emit(T_DIRENTS, key, v.value().to_be_bytes().to_vec())?;
    }
    for item in txn.open_table(CHUNKS)?.iter()? {
        let (k, v) = item?;
        let (refs, goal) = v.value();
        let mut val = refs.to_be_bytes().to_vec();
        val.extend_from_slice(&goal.to_be_bytes());
        emit(T_CHUNKS, k.value().to_vec(), val)?;
    }
    for item in txn.open_table(CHUNKSERVERS)?.iter()? {
        let (k, v) = item?;
        emit(T_CHUNKSERVERS, k.value().to_be_bytes().to_vec(), v.value().to_vec())?;
    }
    for item in txn.open_table(META)?.iter()? {
        let (k, v) = item?;
        emit(T_META, k.value().as_bytes().to_vec(), v.value().to_be_bytes().to_vec())?;
    }
    for item in txn.open_table(SESSIONS)?.iter()? {
        let (k, v) = item?;
        let (client, seq) = k.value();
        let (t, res) = v.value();
        let mut key = client.to_be_bytes().to_vec();
        key.extend_from_slice(&seq.to_be_bytes());
        let mut val = t.to_be_bytes().to_vec();
        val.extend_from_slice(res);
        emit(T_SESSIONS, key, val)?;
    }
    for item in txn.open_table(SESSIONS_BY_TIME)?.iter()? {
        let (k, _) = item?;
        let (t, client, seq) = k.value();
        let mut key = t.to_be_bytes().to_vec();
        key.extend_from_slice(&client.to_be_bytes());
        key.extend_from_slice(&seq.to_be_bytes());
        emit(T_SESSIONS_BY_TIME, key, vec![])?;
    }
    for item in txn.open_table(MASTERS)?.iter()? {
        let (k, v) = item?;
        emit(T_MASTERS, k.value().to_be_bytes().to_vec(), v.value().as_bytes().to_vec())?;
    }
    for item in txn.open_table(ACCESS_KEYS)?.iter()? {
        let (k, v) = item?;
        emit(T_ACCESS_KEYS, k.value().as_bytes().to_vec(), v.value().to_vec())?;
    }
    for item in txn.open_table(KEPT)?.iter()? {
        let (k, v) = item?;
        let (session, since) = v.value();
        let mut val = session.to_be_bytes().to_vec();
        val.extend_from_slice(&since.to_be_bytes());
        emit(T_KEPT, k.value().to_be_bytes().to_vec(), val)?;
    }
    for item in txn.open_table(CLIENTS)?.iter()? {
        let (k, v) = item?;
        emit(T_CLIENTS, k.value().to_be_bytes().to_vec(), v.value().to_vec())?;
    }
    Ok(())
}

/// Replaces every state table with the records of a snapshot, inside the caller's transaction
/// (which also records the snapshot's conf state and compaction marker, so that they change
/// together or not at all), and sets the applied index to the snapshot's.
pub fn load(
    txn: &WriteTransaction,
    records: impl Iterator<Item = anyhow::Result<Record>>,
    applied: u64,
) -> anyhow::Result<()> {
    txn.delete_table(INODES)?;
    txn.delete_table(DIRENTS)?;
    txn.delete_table(CHUNKS)?;
    txn.delete_table(CHUNKSERVERS)?;
    txn.delete_table(META)?;
    txn.delete_table(SESSIONS)?;
    txn.delete_table(SESSIONS_BY_TIME)?;
    txn.delete_table(MASTERS)?;
    txn.delete_table(ACCESS_KEYS)?;
    txn.delete_table(KEPT)?;
    txn.delete_table(CLIENTS)?;
    let mut inodes = txn.open_table(INODES)?;
    let mut dirents = txn.open_table(DIRENTS)?;
    let mut chunks = txn.open_table(CHUNKS)?;
    let mut chunkservers = txn.open_table(CHUNKSERVERS)?;
    let mut meta = txn.open_table(META)?;
    let mut sessions = txn.open_table(SESSIONS)?;
    let mut by_time = txn.open_table(SESSIONS_BY_TIME)?;
    let mut masters = txn.open_table(MASTERS)?;
    let mut access_keys = txn.open_table(ACCESS_KEYS)?;
    let mut kept = txn.open_table(KEPT)?;
    let mut clients = txn.open_table(CLIENTS)?;
    for r in records {
        let (table, k, v) = r?;
        match table {
            T_INODES => {
                inodes.insert(u64_at(&k, 0)?, v.as_slice())?;
            }
            T_DIRENTS => {
                let name = std::str::from_utf8(k.get(8..).unwrap_or_default()).context("directory entry name")?;
                dirents.insert((u64_at(&k, 0)?, name), u64_at(&v, 0)?)?;
            }
            T_CHUNKS => {
                let goal = u32::from_be_bytes(v.get(8..12).context("short chunk record")?.try_into().expect("4 bytes"));
                chunks.insert(k.as_slice(), (u64_at(&v, 0)?, goal))?;
            }
            T_CHUNKSERVERS => {
                chunkservers.insert(u64_at(&k, 0)?, v.as_slice())?;
            }
            T_META => {
                meta.insert(std::str::from_utf8(&k).context("meta key")?, u64_at(&v, 0)?)?;
            }
            T_SESSIONS => {
                let t = u64_at(&v, 0)? as i64;
                sessions.insert((u64_at(&k, 0)?, u64_at(&k, 8)?), (t, &v[8..]))?;
            }
            T_SESSIONS_BY_TIME => {
                by_time.insert((u64_at(&k, 0)? as i64, u64_at(&k, 8)?, u64_at(&k, 16)?), ())?;
            }
            T_MASTERS => {
                masters.insert(u64_at(&k, 0)?, std::str::from_utf8(&v).context("master address")?)?;
            }
            T_ACCESS_KEYS => {
                access_keys.insert(std::str::from_utf8(&k).context("access key id")?, v.as_slice())?;
            }
            T_KEPT => {
                kept.insert(u64_at(&k, 0)?, (u64_at(&v, 0)?, u64_at(&v, 8)? as i64))?;
            }
            T_CLIENTS => {
                clients.insert(u64_at(&k, 0)?, v.as_slice())?;
            }
            other => anyhow::bail!("snapshot record of unknown table {other}"),
        }
    }
    meta.insert(APPLIED, applied)?;
    Ok(())
}

impl State {
    pub fn db(&self) -> &Arc<Database> {
        &self.db
    }

    /// Records the group's first members (a new group's bootstrap, before any entry).
    pub fn bootstrap_masters(&self, peers: &std::collections::BTreeMap<u64, String>) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(MASTERS)?;
            if t.iter()?.next().is_none() {
                for (id, addr) in peers {
                    t.insert(*id, addr.as_str())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}
