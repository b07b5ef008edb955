//! Namespace operations addressed by inode, as the FUSE mount needs them: lookups by (directory,
//! name), hard links, special nodes, renames with RENAME_NOREPLACE and RENAME_EXCHANGE, explicit
//! attributes and extended attributes. The path-addressed operations of the CLI share the rename
//! and unlink logic here.
//!
//! Permission checks are the kernel's (the mount runs with `default_permissions`): the state
//! machine keeps mode, uid and gid and enforces what no caller may do, such as a hard link to a
//! directory or a directory moved into itself.

use super::*;
use cairn_proto::v1::{node_request, CommitNode, LinkNode, MakeNode, NodeRequest, RenameNode, SetAttrNode};

/// Longest extended attribute value (Linux XATTR_SIZE_MAX).
pub const XATTR_VALUE_MAX: usize = 64 << 10;
const S_ISGID: u32 = 0o2000;
/// Replication of a file whose inode does not say (made before replication was recorded).
const DEFAULT_REPLICATION: u32 = 3;

fn dangling(what: impl std::fmt::Display) -> MetaError {
    MetaError::Internal(anyhow::anyhow!("dangling directory entry {what}"))
}

/// A name a directory entry may have; too long is its own error (ENAMETOOLONG).
pub fn check_entry_name(name: &str) -> Result<(), MetaError> {
    if name.len() > NAME_MAX {
        return Err(MetaError::NameTooLong(format!("{} bytes (at most {NAME_MAX})", name.len())));
    }
    check_name(name).map_err(MetaError::InvalidArgument)
}

impl Reader {
    pub fn getattr(&self, id: u64) -> Result<Attr, MetaError> {
        Ok(self.node(id)?.attr.unwrap_or_default())
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr, MetaError> {
        check_entry_name(name)?;
        let dir = self.node(parent)?;
        if kind(&dir) != InodeKind::Directory {
            return Err(MetaError::NotADirectory(format!("inode {parent}")));
        }
        let id = self.child(parent, name)?.ok_or_else(|| MetaError::NotFound(name.to_string()))?;
        self.getattr(id).map_err(|_| dangling(name))
    }

    /// One page of a directory by inode (see [`Reader::list`]).
    pub fn readdir(&self, id: u64, start_after: &str, limit: usize) -> Result<(Attr, Vec<DirEntry>, bool), MetaError> {
        let node = self.node(id)?;
        if kind(&node) != InodeKind::Directory {
            return Err(MetaError::NotADirectory(format!("inode {id}")));
        }
        self.list_node(id, node, start_after, limit, false)
    }

    /// A regular file's attributes and extents.
    pub fn open_inode(&self, id: u64) -> Result<Inode, MetaError> {
        let node = self.node(id)?;
        match kind(&node) {
            InodeKind::File => Ok(node),
            InodeKind::Directory => Err(MetaError::IsADirectory(format!("inode {id}"))),
            _ => Err(MetaError::InvalidArgument(format!("inode {id} is not a regular file"))),
        }
    }

    pub fn xattrs(&self, id: u64) -> Result<std::collections::BTreeMap<String, Vec<u8>>, MetaError> {
        Ok(self.node(id)?.xattrs)
    }
}

/// An inode that must exist.
trait NodeTables: Tables {
    fn node(&self, id: u64) -> Result<Inode, MetaError> {
        self.inode(id)?.ok_or_else(|| MetaError::NotFound(format!("inode {id}")))
    }
    fn dir(&self, id: u64) -> Result<Inode, MetaError> {
        let node = self.node(id)?;
        if kind(&node) != InodeKind::Directory {
            return Err(MetaError::NotADirectory(format!("inode {id}")));
        }
        Ok(node)
    }
}
impl<T: Tables> NodeTables for T {}

pub(super) fn node_op(w: &mut Writer<'_>, req: &NodeRequest, t: i64) -> Result<command_result::Result, MetaError> {
    let attr = command_result::Result::Attr;
    let done = |_| command_result::Result::Done(Empty {});
    match &req.op {
        Some(node_request::Op::Make(m)) => make(w, m, t).map(attr),
        Some(node_request::Op::Link(l)) => link(w, l, t).map(attr),
        Some(node_request::Op::Unlink(u)) => {
            check_entry_name(&u.name)?;
            unlink_at(w, u.parent, &u.name, u.directory, u.keep.then_some(u.keeper), &u.name, t).map(done)
        }
        Some(node_request::Op::Release(r)) => {
            if r.keeper != 0 {
                let keeper = w.kept.get(r.inode).map_err(storage)?.map(|v| v.value().0);
                if keeper != Some(r.keeper) {
                    return Ok(done(())); // kept again since the sweep looked, or already freed
                }
            }
            match w.inode(r.inode)? {
                Some(node) if kind(&node) == InodeKind::File && node.attr.as_ref().is_some_and(|a| a.nlink == 0) => {
                    w.release(r.inode, &node)?
                }
                _ => {}
            }
            Ok(done(()))
        }
        Some(node_request::Op::Rename(r)) => rename_node(w, r, t).map(done),
        Some(node_request::Op::SetAttr(s)) => set_attr(w, s, t).map(attr),
        Some(node_request::Op::Commit(c)) => commit_node(w, c, t).map(attr),
        Some(node_request::Op::SetXattr(x)) => {
            check_xattr_name(&x.name)?;
            if x.value.len() > XATTR_VALUE_MAX {
                return Err(MetaError::InvalidArgument(format!("xattr value of {} bytes", x.value.len())));
            }
            let mut node = w.node(x.inode)?;
            let exists = node.xattrs.contains_key(&x.name);
            if x.create && exists {
                return Err(MetaError::AlreadyExists(x.name.clone()));
            }
            if x.replace && !exists {
                return Err(MetaError::NoAttribute(x.name.clone()));
            }
            node.xattrs.insert(x.name.clone(), x.value.clone());
            node.attr.get_or_insert_default().ctime_ns = t;
            w.put_inode(x.inode, &node).map(done)
        }
        Some(node_request::Op::RemoveXattr(x)) => {
            check_xattr_name(&x.name)?;
            let mut node = w.node(x.inode)?;
            if node.xattrs.remove(&x.name).is_none() {
                return Err(MetaError::NoAttribute(x.name.clone()));
            }
            node.attr.get_or_insert_default().ctime_ns = t;
            w.put_inode(x.inode, &node).map(done)
        }
        None => Err(MetaError::InvalidArgument("empty node request".into())),
    }
}

pub fn check_xattr_name(name: &str) -> Result<(), MetaError> {
    if name.is_empty() {
        return Err(MetaError::InvalidArgument("empty xattr name".into()));
    }
    if name.len() > NAME_MAX {
        return Err(MetaError::NameTooLong(format!("xattr name of {} bytes", name.len())));
    }
    Ok(())
}

fn make(w: &mut Writer<'_>, m: &MakeNode, t: i64) -> Result<Attr, MetaError> {
    check_entry_name(&m.name)?;
    let parent = w.dir(m.parent)?;
    if w.child(m.parent, &m.name)?.is_some() {
        return Err(MetaError::AlreadyExists(m.name.clone()));
    }
    let k = m.kind();
    match k {
        InodeKind::Unspecified => return Err(MetaError::InvalidArgument("node kind missing".into())),
        InodeKind::File if m.replication == 0 || m.replication > MAX_REPLICATION => {
            return Err(MetaError::InvalidArgument(format!("replication {} (1 to {MAX_REPLICATION})", m.replication)))
        }
        InodeKind::Symlink if m.symlink_target.is_empty() => {
            return Err(MetaError::InvalidArgument("empty symlink target".into()))
        }
        InodeKind::Symlink if m.symlink_target.len() >= PATH_MAX => {
            return Err(MetaError::NameTooLong(format!("symlink target of {} bytes", m.symlink_target.len())))
        }
        _ => {}
    }
    let pattr = parent.attr.unwrap_or_default();
    let (mut mode, mut gid) = (m.mode & 0o7777, m.gid);
    if pattr.mode & S_ISGID != 0 {
        gid = pattr.gid;
        if k == InodeKind::Directory {
            mode |= S_ISGID;
        }
    }
    let id = w.alloc_inode()?;
    let mut attr = new_attr(id, k, mode, m.uid, gid, t);
    attr.atime_ns = t;
    attr.rdev = m.rdev;
    match k {
        InodeKind::File => {
            attr.replication = m.replication;
            w.add_counter(FILES, 1)?;
        }
        InodeKind::Symlink => {
            attr.symlink_target = m.symlink_target.clone();
            attr.size = m.symlink_target.len() as u64;
        }
        _ => {}
    }
    let is_dir = k == InodeKind::Directory;
    let node = Inode { attr: Some(attr.clone()), parent: if is_dir { m.parent } else { 0 }, ..Default::default() };
    w.put_inode(id, &node)?;
    w.dirents.insert((m.parent, m.name.as_str()), id).map_err(storage)?;
    w.add_link_count(m.parent, if is_dir { 1 } else { 0 }, t)?;
    Ok(attr)
}

fn link(w: &mut Writer<'_>, l: &LinkNode, t: i64) -> Result<Attr, MetaError> {
    check_entry_name(&l.name)?;
    let mut node = w.node(l.inode)?;
    if kind(&node) == InodeKind::Directory {
        return Err(MetaError::NotPermitted("hard link to a directory".into()));
    }
    w.dir(l.parent)?;
    if w.child(l.parent, &l.name)?.is_some() {
        return Err(MetaError::AlreadyExists(l.name.clone()));
    }
    let attr = node.attr.get_or_insert_default();
    if attr.nlink >= u32::from(u16::MAX) {
        return Err(MetaError::InvalidArgument("too many links".into()));
    }
    if attr.nlink == 0 {
        w.kept.remove(l.inode).map_err(storage)?; // named again: no longer only kept open
    }
    attr.nlink += 1;
    attr.ctime_ns = t;
    let out = attr.clone();
    w.put_inode(l.inode, &node)?;
    w.dirents.insert((l.parent, l.name.as_str()), l.inode).map_err(storage)?;
    w.add_link_count(l.parent, 0, t)?;
    Ok(out)
}

/// One name of an inode went away: a file with other names lives on, and so does one its
/// caller still has open (`keep`: the caller's session, see `KEPT`), with no names; otherwise
/// it is released.
pub(super) fn drop_link(
    w: &mut Writer<'_>,
    id: u64,
    mut node: Inode,
    keep: Option<u64>,
    t: i64,
) -> Result<(), MetaError> {
    let attr = node.attr.get_or_insert_default();
    if kind_of(attr) != InodeKind::Directory && (attr.nlink > 1 || keep.is_some()) {
        attr.nlink = attr.nlink.saturating_sub(1);
        attr.ctime_ns = t;
        // (Session 0, a client that names none: kept until it releases the file.)
        if let (0, Some(session @ 1..)) = (attr.nlink, keep) {
            w.kept.insert(id, (session, t)).map_err(storage)?;
        }
        return w.put_inode(id, &node);
    }
    w.release(id, &node)
}

fn kind_of(a: &Attr) -> InodeKind {
    a.kind()
}

/// unlink(2) (`directory` false: never a directory) or rmdir(2) (only an empty directory).
/// `label` names the entry in errors.
pub(super) fn unlink_at(
    w: &mut Writer<'_>,
    parent: u64,
    name: &str,
    directory: bool,
    keep: Option<u64>,
    label: &str,
    t: i64,
) -> Result<(), MetaError> {
    w.dir(parent)?;
    let id = w.child(parent, name)?.ok_or_else(|| MetaError::NotFound(label.to_string()))?;
    let node = w.inode(id)?.ok_or_else(|| dangling(label))?;
    let is_dir = kind(&node) == InodeKind::Directory;
    match (directory, is_dir) {
        (true, false) => return Err(MetaError::NotADirectory(label.to_string())),
        (false, true) => return Err(MetaError::IsADirectory(label.to_string())),
        (true, true) if w.has_children(id)? => return Err(MetaError::NotEmpty(label.to_string())),
        _ => {}
    }
    w.dirents.remove((parent, name)).map_err(storage)?;
    w.add_link_count(parent, if is_dir { -1 } else { 0 }, t)?;
    drop_link(w, id, node, keep, t)
}

/// Whether directory `dir` is `ancestor` or lies below it, following parent links up. A
/// directory without a parent link (made by an older version) is searched for from `ancestor`
/// down instead.
fn is_within(w: &Writer<'_>, start: u64, ancestor: u64) -> Result<bool, MetaError> {
    let mut dir = start;
    for _ in 0..=PATH_MAX {
        if dir == ancestor {
            return Ok(true);
        }
        if dir == ROOT {
            return Ok(false);
        }
        match w.node(dir)?.parent {
            0 => break,
            p => dir = p,
        }
    }
    let mut stack = vec![ancestor];
    while let Some(d) = stack.pop() {
        for (_, c) in w.children(d)? {
            if c == start {
                return Ok(true);
            }
            if w.inode(c)?.is_some_and(|n| kind(&n) == InodeKind::Directory) {
                stack.push(c);
            }
        }
    }
    Ok(false)
}

fn rename_node(w: &mut Writer<'_>, r: &RenameNode, t: i64) -> Result<(), MetaError> {
    check_entry_name(&r.name)?;
    check_entry_name(&r.new_name)?;
    if r.exchange && r.no_replace {
        return Err(MetaError::InvalidArgument("RENAME_EXCHANGE with RENAME_NOREPLACE".into()));
    }
    let how = if r.exchange {
        Replace::Exchange
    } else if r.no_replace {
        Replace::Never
    } else {
        Replace::Allowed
    };
    rename_at(
        w,
        (r.parent, &r.name, &r.name),
        (r.new_parent, &r.new_name, &r.new_name),
        how,
        r.keep.then_some(r.keeper),
        t,
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Replace {
    Allowed,
    Never,
    Exchange,
}

/// rename(2) of `(parent, name, label)` to another such entry; labels name the entries in errors.
/// `keep`: a replaced file that loses its last name stays until released (see [`drop_link`]).
pub(super) fn rename_at(
    w: &mut Writer<'_>,
    (sdir, sname, slabel): (u64, &str, &str),
    (ddir, dname, dlabel): (u64, &str, &str),
    how: Replace,
    keep: Option<u64>,
    t: i64,
) -> Result<(), MetaError> {
    w.dir(sdir)?;
    w.dir(ddir)?;
    let sid = w.child(sdir, sname)?.ok_or_else(|| MetaError::NotFound(slabel.to_string()))?;
    let snode = w.inode(sid)?.ok_or_else(|| dangling(slabel))?;
    let src_is_dir = kind(&snode) == InodeKind::Directory;
    if (sdir, sname) == (ddir, dname) {
        return Ok(());
    }
    if src_is_dir && is_within(w, ddir, sid)? {
        return Err(MetaError::InvalidArgument(format!("cannot move {slabel} into itself ({dlabel})")));
    }
    let target = w.child(ddir, dname)?;
    if how == Replace::Exchange {
        let did = target.ok_or_else(|| MetaError::NotFound(dlabel.to_string()))?;
        let dnode = w.inode(did)?.ok_or_else(|| dangling(dlabel))?;
        let dst_is_dir = kind(&dnode) == InodeKind::Directory;
        if dst_is_dir && is_within(w, sdir, did)? {
            return Err(MetaError::InvalidArgument(format!("cannot move {dlabel} into itself ({slabel})")));
        }
        w.dirents.insert((sdir, sname), did).map_err(storage)?;
        w.dirents.insert((ddir, dname), sid).map_err(storage)?;
        let (sd, dd) = (i64::from(src_is_dir), i64::from(dst_is_dir));
        w.add_link_count(sdir, dd - sd, t)?;
        if sdir != ddir {
            w.add_link_count(ddir, sd - dd, t)?;
        }
        moved(w, sid, snode, ddir, t)?;
        return moved(w, did, dnode, sdir, t);
    }
    if let Some(did) = target {
        if how == Replace::Never {
            return Err(MetaError::AlreadyExists(dlabel.to_string()));
        }
        if did == sid {
            return Ok(()); // two names of one file: rename(2) does nothing
        }
        let dnode = w.inode(did)?.ok_or_else(|| dangling(dlabel))?;
        let dst_is_dir = kind(&dnode) == InodeKind::Directory;
        match (src_is_dir, dst_is_dir) {
            (true, false) => return Err(MetaError::NotADirectory(dlabel.to_string())),
            (false, true) => return Err(MetaError::IsADirectory(dlabel.to_string())),
            (true, true) if w.has_children(did)? => return Err(MetaError::NotEmpty(dlabel.to_string())),
            _ => {}
        }
        w.dirents.remove((ddir, dname)).map_err(storage)?;
        if dst_is_dir {
            w.add_link_count(ddir, -1, t)?;
        }
        drop_link(w, did, dnode, keep, t)?;
    }
    w.dirents.remove((sdir, sname)).map_err(storage)?;
    w.dirents.insert((ddir, dname), sid).map_err(storage)?;
    let d = i64::from(src_is_dir);
    w.add_link_count(sdir, -d, t)?;
    w.add_link_count(ddir, d, t)?;
    moved(w, sid, snode, ddir, t)
}

/// Records that `id` now lives in `dir`.
fn moved(w: &mut Writer<'_>, id: u64, mut node: Inode, dir: u64, t: i64) -> Result<(), MetaError> {
    if kind(&node) == InodeKind::Directory {
        node.parent = dir;
    }
    node.attr.get_or_insert_default().ctime_ns = t;
    w.put_inode(id, &node)
}

/// New content written other than through S3 (the mount, `cairn put`): the S3 metadata (ETag,
/// content type and encoding, `x-amz-meta-*`) described the old content, so it goes.
pub(super) fn drop_object_metadata(node: &mut Inode) {
    node.xattrs.retain(|k, _| !k.starts_with(cairn_proto::S3_XATTR_PREFIX));
}

fn set_attr(w: &mut Writer<'_>, s: &SetAttrNode, t: i64) -> Result<Attr, MetaError> {
    let mut node = w.node(s.inode)?;
    let attr = node.attr.get_or_insert_default();
    if let Some(mode) = s.mode {
        attr.mode = mode & 0o7777;
    }
    if let Some(uid) = s.uid {
        attr.uid = uid;
    }
    if let Some(gid) = s.gid {
        attr.gid = gid;
    }
    if s.atime_now {
        attr.atime_ns = t;
    } else if let Some(a) = s.atime_ns {
        attr.atime_ns = a;
    }
    if s.mtime_now {
        attr.mtime_ns = t;
    } else if let Some(m) = s.mtime_ns {
        attr.mtime_ns = m;
    }
    attr.ctime_ns = t;
    let out = attr.clone();
    w.put_inode(s.inode, &node)?;
    Ok(out)
}

/// A regular file's new extent list (a write, a truncate), replacing the old one atomically;
/// refused (Changed) when it was made from a version other than the file's.
fn commit_node(w: &mut Writer<'_>, c: &CommitNode, t: i64) -> Result<Attr, MetaError> {
    let (id, extents) = (c.inode, c.extents.as_slice());
    let size = check_extents(extents)?;
    let mut node = w.node(id)?;
    match kind(&node) {
        InodeKind::File => {}
        InodeKind::Directory => return Err(MetaError::IsADirectory(format!("inode {id}"))),
        _ => return Err(MetaError::InvalidArgument(format!("inode {id} is not a regular file"))),
    }
    let old = node.attr.clone().unwrap_or_default();
    if let Some(base) = c.base_version.filter(|&b| b != old.version) {
        return Err(MetaError::Changed(format!("inode {id} is at version {}, not {base}", old.version)));
    }
    let replication = if old.replication == 0 { DEFAULT_REPLICATION } else { old.replication };
    w.chunk_refs(&node.extents, old.replication, -1)?;
    w.chunk_refs(extents, replication, 1)?;
    w.add_counter(BYTES, size as i64 - old.size as i64)?;
    let attr = node.attr.get_or_insert_default();
    attr.size = size;
    attr.replication = replication;
    attr.version += 1;
    attr.mtime_ns = t;
    attr.ctime_ns = t;
    attr.extent_count = extents.len() as u64;
    node.extents = extents.to_vec();
    let out = attr.clone();
    drop_object_metadata(&mut node);
    w.put_inode(id, &node)?;
    Ok(out)
}
