//! The Cairn FUSE mount: a POSIX file system over the client library.
//!
//! Every request is answered from a task on the client's tokio runtime, so slow calls (a chunk
//! fetch, a commit) never hold up the others. Inode numbers are the masters' inode ids, stable
//! for the life of a file. Permissions are checked by the kernel from the mode, uid and gid the
//! namespace keeps (`default_permissions`).
//!
//! Consistency is close-to-open, as NFS gives: writes collect per open file (see [`file`]) and
//! are committed atomically on flush (close), fsync, or a change of size; an open that finds a
//! new version of the file drops the kernel's cached pages and attributes (its size among them),
//! and one that finds the same version keeps them. Attributes and entries are cached by the
//! kernel for [`MountOptions::attr_ttl`]; a run of lookups in one directory is answered from its
//! listing for no longer (see [`listing`]).

mod cache;
mod dirattrs;
mod file;
mod listing;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_client::{Client, Error};
use cairn_proto::v1::{
    node_request::Op, Attr, InodeKind, LinkNode, MakeNode, ReleaseNode, RemoveXattr, RenameNode, SetAttrNode, SetXattr,
    UnlinkNode,
};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
};
use tokio::runtime::Handle;
use tokio::sync::Mutex as AsyncMutex;

use dirattrs::DirAttrs;
use file::{Ctx, FileState};
use listing::{Change, Listings};

/// How far from the end of the previous read a read may start and still count as sequential.
const SEQUENTIAL_SLACK: u64 = 1 << 20;
/// Chunks fetched ahead of a sequential reader.
const READ_AHEAD_CHUNKS: usize = 6;

#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Replication of files created through the mount.
    pub replication: u32,
    /// How long the kernel may trust attributes and directory entries.
    pub attr_ttl: Duration,
    /// Bytes of whole chunks kept in memory for reads.
    pub cache_bytes: usize,
    /// Chunks uploading at once over all open files.
    pub uploads: usize,
    /// Memory for written data not yet stored, over all open files (a soft limit: a writer over
    /// it stores its own chunks before it goes on).
    pub write_bytes: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            replication: 3,
            attr_ttl: Duration::from_secs(1),
            cache_bytes: 256 << 20,
            uploads: 32,
            write_bytes: 512 << 20,
        }
    }
}

/// Mounts `fs` at `mountpoint` and serves it from a background thread until the returned session
/// is dropped or unmounted.
pub fn mount_fs(fs: CairnFs, mountpoint: &Path) -> std::io::Result<fuser::BackgroundSession> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("cairn".into()),
        fuser::MountOption::Subtype("cairn".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
    ];
    config.acl = fuser::SessionACL::All;
    let inner = fs.inner.clone();
    let session = fuser::spawn_mount(fs, mountpoint, &config)?;
    let _ = inner.notifier.set(session.notifier());
    Ok(session)
}

/// The errno for a client error.
pub fn errno(e: &Error) -> Errno {
    match e {
        Error::NotFound(_) => Errno::ENOENT,
        Error::AlreadyExists(_) => Errno::EEXIST,
        Error::NotADirectory(_) => Errno::ENOTDIR,
        Error::IsADirectory(_) => Errno::EISDIR,
        Error::NotEmpty(_) => Errno::ENOTEMPTY,
        Error::InvalidArgument(_) => Errno::EINVAL,
        Error::NoAttribute(_) => Errno::from_i32(libc::ENODATA),
        Error::NotPermitted(_) => Errno::EPERM,
        Error::NameTooLong(_) => Errno::from_i32(libc::ENAMETOOLONG),
        Error::TooLarge(_) => Errno::from_i32(libc::EFBIG),
        Error::NotEnoughChunkservers(_) => Errno::from_i32(libc::ENOSPC),
        Error::Unavailable(_) => Errno::from_i32(libc::ETIMEDOUT),
        Error::ChunkUnavailable { .. }
        | Error::Upload { .. }
        | Error::Changed(_)
        | Error::Io { .. }
        | Error::Internal(_) => Errno::EIO,
    }
}

fn file_type(a: &Attr) -> FileType {
    match a.kind() {
        InodeKind::Directory => FileType::Directory,
        InodeKind::Symlink => FileType::Symlink,
        InodeKind::Fifo => FileType::NamedPipe,
        InodeKind::Socket => FileType::Socket,
        InodeKind::CharDevice => FileType::CharDevice,
        InodeKind::BlockDevice => FileType::BlockDevice,
        InodeKind::File | InodeKind::Unspecified => FileType::RegularFile,
    }
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn to_file_attr(a: &Attr) -> FileAttr {
    let size = match a.kind() {
        InodeKind::Directory => 4096,
        _ => a.size,
    };
    FileAttr {
        ino: INodeNo(a.inode),
        size,
        blocks: size.div_ceil(512),
        atime: time(if a.atime_ns == 0 { a.mtime_ns } else { a.atime_ns }),
        mtime: time(a.mtime_ns),
        ctime: time(a.ctime_ns),
        crtime: time(a.ctime_ns),
        kind: file_type(a),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 1 << 20,
        flags: 0,
    }
}

fn name_of(name: &OsStr) -> Result<String, Errno> {
    let s = name.to_str().ok_or(Errno::EINVAL)?;
    if s.len() > 255 {
        return Err(Errno::from_i32(libc::ENAMETOOLONG));
    }
    Ok(s.to_string())
}

enum Fh {
    File { ino: u64, state: Arc<AsyncMutex<FileState>>, reads: Arc<ReadPattern> },
    Dir { entries: Arc<Vec<(String, Attr)>> },
}

/// Where a handle's reads go. The kernel's read-ahead sends several reads at once, not always
/// in order, so a read that starts near where the previous one ended counts as following it;
/// the handle reads sequentially once two reads in a row do (or the first read starts at 0).
/// One near read alone is not enough: a random reader lands near its previous read now and then,
/// and each false start would fetch whole chunks ahead (24 MiB) for a 4 KiB read.
struct ReadPattern {
    next: AtomicU64,
    streak: AtomicU32,
}

impl ReadPattern {
    fn new() -> ReadPattern {
        ReadPattern { next: AtomicU64::new(0), streak: AtomicU32::new(1) }
    }

    /// Records a read; whether it is part of a sequential run.
    fn sequential(&self, offset: u64, size: u64) -> bool {
        let prev = self.next.swap(offset.saturating_add(size), Ordering::Relaxed);
        if offset.abs_diff(prev) <= SEQUENTIAL_SLACK {
            self.streak.fetch_add(1, Ordering::Relaxed) + 1 >= 2
        } else {
            self.streak.store(0, Ordering::Relaxed);
            false
        }
    }
}

/// The attributes a `setattr` asks to change (None: keep).
struct NewAttrs {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
}

struct Open {
    state: Arc<AsyncMutex<FileState>>,
    handles: usize,
    /// Lost its last name while open here: freed (`ReleaseNode`) when the last handle closes.
    orphan: bool,
}

struct Inner {
    ctx: Ctx,
    rt: Handle,
    opts: MountOptions,
    handles: Mutex<HashMap<u64, Fh>>,
    next_fh: AtomicU64,
    /// Open files by inode, shared by every handle of the inode.
    open: Mutex<HashMap<u64, Open>>,
    /// The version of each file as of its last open here: an open that finds the same version
    /// keeps the kernel's page cache.
    versions: Mutex<HashMap<u64, u64>>,
    listings: Mutex<Listings>,
    /// Directories as this mount's changes left them, for the kernel's next GETATTR.
    dir_attrs: Mutex<DirAttrs>,
    /// This mount's session: files it keeps open after their last name went away are kept for
    /// it while it renews the session (see [`CairnFs::start_keepalive`]).
    keeper: u64,
    /// Bumped before and after every xattr change through the mount: an open or create that
    /// saw it move keeps no `security.capability` answer (see [`file::CAPABILITY`]).
    xattr_gen: AtomicU64,
    /// Tells the kernel to drop what it cached of an inode (set once mounted).
    notifier: std::sync::OnceLock<fuser::Notifier>,
}

/// A change made through the mount, in flight: see [`CairnFs::changing`]. Dropped once the
/// change is done and before it is answered.
struct Changing {
    inner: Arc<Inner>,
    after: listing::After,
}

impl Drop for Changing {
    fn drop(&mut self) {
        self.inner.listings.lock().expect("listings lock").after(&self.after);
    }
}

#[derive(Clone)]
pub struct CairnFs {
    inner: Arc<Inner>,
}

impl CairnFs {
    pub fn new(client: Client, rt: Handle, opts: MountOptions) -> CairnFs {
        let ctx = Ctx {
            client,
            cache: Arc::new(cache::ChunkCache::new(opts.cache_bytes)),
            replication: opts.replication,
            uploads: Arc::new(tokio::sync::Semaphore::new(opts.uploads.max(1))),
            in_memory: Arc::new(AtomicUsize::new(0)),
            max_in_memory: (opts.write_bytes / file::CHUNK).max(1),
        };
        let fs = CairnFs {
            inner: Arc::new(Inner {
                ctx,
                rt,
                opts,
                handles: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                open: Mutex::new(HashMap::new()),
                versions: Mutex::new(HashMap::new()),
                listings: Mutex::new(Listings::default()),
                dir_attrs: Mutex::new(DirAttrs::default()),
                keeper: rand::random::<u64>().max(1),
                xattr_gen: AtomicU64::new(0),
                notifier: std::sync::OnceLock::new(),
            }),
        };
        fs.start_committer();
        fs.start_keepalive();
        fs
    }

    /// Renews this mount's session with the leader, a quarter of the leader's grace apart (30 s
    /// at most): the unlinked files this mount keeps open stay until it closes them, and if the
    /// mount dies they are freed once the grace runs out. Ends with the file system.
    fn start_keepalive(&self) {
        let weak = Arc::downgrade(&self.inner);
        self.inner.rt.spawn(async move {
            let mut failing = false;
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let (client, keeper) = (inner.ctx.client.clone(), inner.keeper);
                drop(inner);
                let pause = match client.keep_alive(keeper).await {
                    Ok(grace) => {
                        if std::mem::take(&mut failing) {
                            tracing::info!("renewed this mount's session with the masters again");
                        }
                        (grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
                    }
                    Err(e) => {
                        if !std::mem::replace(&mut failing, true) {
                            tracing::warn!("could not renew this mount's session with the masters: {e}");
                        }
                        Duration::from_secs(1)
                    }
                };
                tokio::time::sleep(pause).await;
            }
        });
    }

    /// Commits, in the background, files that are being written for long without a close or
    /// fsync (see `file::COMMIT_AT_LEAST_EVERY`). Ends with the file system.
    fn start_committer(&self) {
        let weak = Arc::downgrade(&self.inner);
        self.inner.rt.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(15)).await;
                let Some(inner) = weak.upgrade() else { return };
                let fs = CairnFs { inner };
                let states: Vec<_> =
                    fs.inner.open.lock().expect("open lock").values().map(|o| o.state.clone()).collect();
                for st in states {
                    if st.lock().await.commit_due() {
                        let _ = fs.sync_state(&st).await;
                    }
                }
            }
        });
    }

    fn client(&self) -> &Client {
        &self.inner.ctx.client
    }

    fn ttl(&self) -> Duration {
        self.inner.opts.attr_ttl
    }

    /// Tells the lookup listings about a change this mount makes, now and again when the
    /// returned guard drops: drop it when the change is done, before answering.
    fn changing(&self, change: Change) -> Changing {
        let after = self.inner.listings.lock().expect("listings lock").before(change);
        Changing { inner: self.inner.clone(), after }
    }

    /// Sends a namespace change. The directories it may touch are dropped from [`dirattrs`]
    /// before, and kept as the masters answer them after. Returns the attributes of the node
    /// made or changed, if any.
    async fn change_node(&self, op: Op) -> Result<Option<Attr>, Errno> {
        let begun = self.inner.dir_attrs.lock().expect("dir attrs lock").begin(touched_dirs(&op));
        let res = self.client().node_full(op).await;
        let (parents, res) = match res {
            Ok(r) => (r.parents, Ok(r.attr)),
            Err(e) => (Vec::new(), Err(errno(&e))),
        };
        self.inner.dir_attrs.lock().expect("dir attrs lock").finish(begun, parents, self.ttl());
        res
    }

    /// [`CairnFs::change_node`] for changes that answer with the node's attributes.
    async fn change_node_attr(&self, op: Op) -> Result<Attr, Errno> {
        self.change_node(op).await?.ok_or(Errno::EIO)
    }

    /// Fetches `dir`'s listing for the lookups that follow (see [`listing`]) and answers `name`
    /// from it, with until when it may be trusted, when it is there.
    async fn list_for_lookups(&self, dir: u64, gen: u64, name: &str) -> Option<(Attr, Instant)> {
        let at = Instant::now();
        let entries = match self.client().readdir_upto(dir, listing::MAX_ENTRIES).await {
            Ok(Some(e)) => e,
            Ok(None) => {
                self.inner.listings.lock().expect("listings lock").too_large(dir);
                return None;
            }
            Err(e) => {
                tracing::debug!(dir, "listing for lookups: {e}");
                return None;
            }
        };
        let entries = entries.into_iter().filter_map(|e| Some((e.name, e.attr?))).collect();
        let mut listings = self.inner.listings.lock().expect("listings lock");
        listings.put(dir, gen, at, entries);
        listings.get(dir, name, self.ttl())
    }

    /// Runs `f` on the runtime; its result or errno answers the request.
    fn spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.inner.rt.spawn(f);
    }

    /// [`CairnFs::spawn`] for a request that can often be answered from memory (a listing or
    /// cache hit, a flush with nothing to commit): `f` runs first on the FUSE thread, as far as it
    /// goes without waiting, and only if it must wait on the runtime. An answer from memory so
    /// costs no hand-off between threads, which on a busy machine was most of its time. (Not for
    /// requests that always call a master: handing their call to the runtime from here would
    /// wake two threads instead of one.) The runtime's first poll of the future registers its
    /// own waker, replacing the no-op one of the poll here.
    fn run_inline<F>(&self, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut f = Box::pin(f);
        let _runtime = self.inner.rt.enter();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // A panic must not take the FUSE thread (and so the mount) with it: the request's reply,
        // dropped unanswered, tells the kernel EIO, as a panicking task on the runtime would.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.as_mut().poll(&mut cx))) {
            Ok(std::task::Poll::Ready(())) => {}
            Ok(std::task::Poll::Pending) => {
                self.inner.rt.spawn(f);
            }
            Err(_) => tracing::error!("a request panicked on the FUSE thread; answered with EIO"),
        }
    }

    fn open_state(&self, ino: u64) -> Option<Arc<AsyncMutex<FileState>>> {
        self.inner.open.lock().expect("open lock").get(&ino).map(|o| o.state.clone())
    }

    /// Attributes of `ino` as this mount sees them (see [`CairnFs::fresher`]).
    async fn attr(&self, ino: u64) -> Result<Attr, Errno> {
        let a = self.client().getattr(ino).await.map_err(|e| errno(&e))?;
        Ok(self.fresher(a).await)
    }

    /// `a` as the masters answered it, or this mount's own view of an open file when that is
    /// newer: the attributes of a commit that landed after the masters answered, and the size
    /// with uncommitted writes. (A stale size would make the kernel shrink its idea of the file,
    /// and an O_APPEND write would then land over the last one.) Mode, owner and links come
    /// from the masters while writes are pending, so a chmod elsewhere shows at once.
    async fn fresher(&self, a: Attr) -> Attr {
        let Some(st) = self.open_state(a.inode) else { return a };
        let st = st.lock().await;
        let mut fresh = if st.attr.version > a.version { st.attr.clone() } else { a };
        if st.dirty {
            fresh.size = st.size();
        }
        fresh
    }

    fn add_handle(&self, h: Fh) -> u64 {
        let fh = self.inner.next_fh.fetch_add(1, Ordering::Relaxed);
        self.inner.handles.lock().expect("handles lock").insert(fh, h);
        fh
    }

    /// A handle on `attr`'s file, sharing its state with the inode's other handles. Returns the
    /// handle and whether the kernel may keep its cached pages.
    fn open_file(&self, attr: &Attr) -> (u64, bool) {
        let ino = attr.inode;
        let state = self.hold(attr);
        let keep = {
            let mut v = self.inner.versions.lock().expect("versions lock");
            v.insert(ino, attr.version) == Some(attr.version)
        };
        let fh = self.add_handle(Fh::File { ino, state, reads: Arc::new(ReadPattern::new()) });
        (fh, keep)
    }

    /// The state of `attr`'s file, shared by everything on this mount that changes it (open
    /// handles, a truncate by path), with one more holder counted: so no commit from here carries
    /// a view of the file older than another's from here.
    fn hold(&self, attr: &Attr) -> Arc<AsyncMutex<FileState>> {
        let mut open = self.inner.open.lock().expect("open lock");
        let o = open.entry(attr.inode).or_insert_with(|| Open {
            state: Arc::new(AsyncMutex::new(FileState::new(attr.clone(), &self.inner.ctx))),
            handles: 0,
            orphan: false,
        });
        o.handles += 1;
        o.state.clone()
    }

    fn file_handle(&self, fh: FileHandle) -> Option<(u64, Arc<AsyncMutex<FileState>>, Arc<ReadPattern>)> {
        match self.inner.handles.lock().expect("handles lock").get(&fh.0) {
            Some(Fh::File { ino, state, reads }) => Some((*ino, state.clone(), reads.clone())),
            _ => None,
        }
    }

    /// Commits a file's pending writes, and records the new version as this mount's own (unless
    /// it holds another mount's changes too).
    async fn sync_state(&self, state: &AsyncMutex<FileState>) -> Result<Attr, Errno> {
        let mut st = state.lock().await;
        let committing = st.dirty;
        let _change = committing.then(|| self.changing(Change::All));
        let attr = st.sync(&self.inner.ctx).await.map_err(|e| {
            tracing::warn!(inode = st.ino, "commit failed: {e}");
            match e {
                // The file is gone (deleted through another client): what this mount holds of
                // it has nowhere to go, as for an NFS file handle whose file was removed.
                Error::NotFound(_) => Errno::from_i32(libc::ESTALE),
                e => errno(&e),
            }
        })?;
        let mut versions = self.inner.versions.lock().expect("versions lock");
        if std::mem::take(&mut st.merged) {
            // Merged onto another mount's commit: the kernel's pages may hold neither version.
            versions.remove(&attr.inode);
        } else if committing {
            versions.insert(attr.inode, attr.version);
        }
        Ok(attr)
    }

    /// Commits every open file with pending writes (before unmounting).
    pub async fn sync_all(&self) -> Result<(), Errno> {
        let states: Vec<_> = self.inner.open.lock().expect("open lock").values().map(|o| o.state.clone()).collect();
        let mut result = Ok(());
        for s in states {
            if let Err(e) = self.sync_state(&s).await {
                result = Err(e);
            }
        }
        // Unlinked files still open here: nothing can reach them once the mount is gone.
        let orphans: Vec<u64> = {
            let mut open = self.inner.open.lock().expect("open lock");
            let mut v = Vec::new();
            for (ino, o) in open.iter_mut().filter(|(_, o)| o.orphan) {
                o.orphan = false;
                v.push(*ino);
            }
            v
        };
        for ino in orphans {
            self.release_orphan(ino).await;
        }
        result
    }

    async fn release_orphan(&self, ino: u64) {
        if let Err(e) = self.client().node(Op::Release(ReleaseNode { inode: ino, keeper: 0 })).await {
            tracing::warn!(inode = ino, "could not free an unlinked file: {e}");
        }
    }

    /// Whether the entry `(parent, name)` names a file open on this mount (asked only while any
    /// file is open): such a file must outlive the name (POSIX).
    async fn open_target(&self, parent: u64, name: &str) -> Option<u64> {
        if self.inner.open.lock().expect("open lock").is_empty() {
            return None;
        }
        let a = self.client().lookup(parent, name).await.ok()?;
        self.open_state(a.inode).map(|_| a.inode)
    }

    /// Sends an unlink or rename that may take a name away from `keep`, a file open here (see
    /// [`CairnFs::open_target`]), which then lives on until its last handle closes.
    async fn drop_name(&self, op: Op, keep: Option<u64>) -> Result<(), Errno> {
        self.change_node(op).await?;
        if let Some(ino) = keep {
            self.orphaned(ino).await;
        }
        Ok(())
    }

    /// Ends a [`CairnFs::hold`]. The last holder drops the file's state (and what a failed
    /// truncate left in it), unless `keep` (writes waiting for a later commit) and the file still
    /// has a name; a file that lost its last name meanwhile is freed.
    async fn unhold(&self, ino: u64, keep: bool) {
        let orphan = {
            let mut open = self.inner.open.lock().expect("open lock");
            match open.get_mut(&ino) {
                Some(o) if o.handles > 1 || (keep && !o.orphan) => {
                    o.handles -= 1;
                    false
                }
                Some(_) => open.remove(&ino).is_some_and(|o| o.orphan),
                None => false,
            }
        };
        if orphan {
            self.release_orphan(ino).await;
        }
    }

    /// After an unlink or rename with `keep`: the file is freed when its last handle here
    /// closes, or now if that happened meanwhile.
    async fn orphaned(&self, ino: u64) {
        let closed = {
            let mut open = self.inner.open.lock().expect("open lock");
            match open.get_mut(&ino) {
                Some(o) => {
                    o.orphan = true;
                    false
                }
                None => true,
            }
        };
        if closed {
            self.release_orphan(ino).await;
        } else if let Some(st) = self.open_state(ino) {
            let mut st = st.lock().await;
            st.attr.nlink = st.attr.nlink.saturating_sub(1);
        }
    }

    /// The request that makes `m` (kind, mode, rdev, target) as `name` in `parent`, owned by the
    /// caller of `req`.
    fn make_op(&self, req: &Request, parent: INodeNo, name: &OsStr, m: MakeNode) -> Result<Op, Errno> {
        Ok(Op::Make(MakeNode {
            parent: parent.0,
            name: name_of(name)?,
            uid: req.uid(),
            gid: req.gid(),
            replication: self.inner.opts.replication,
            ..m
        }))
    }

    /// Makes a node and answers with its entry.
    fn make(&self, req: &Request, parent: INodeNo, name: &OsStr, m: MakeNode, reply: ReplyEntry) {
        match self.make_op(req, parent, name, m) {
            Ok(op) => self.entry_op(op, reply),
            Err(e) => reply.error(e),
        }
    }

    /// A mutation that answers with the node's entry.
    fn entry_op(&self, op: Op, reply: ReplyEntry) {
        let this = self.clone();
        let change = self.changing(Change::All);
        self.spawn(async move {
            let res = this.change_node_attr(op).await;
            drop(change);
            match res {
                Ok(a) => reply.entry(&this.ttl(), &to_file_attr(&a), Generation(0)),
                Err(e) => reply.error(e),
            }
        });
    }

    /// An xattr change of `ino`: a file open here forgets the capability its open saw (see
    /// [`file::CAPABILITY`]), before the change and again once it is done.
    fn xattr_op(&self, ino: u64, op: Op, reply: ReplyEmpty) {
        let this = self.clone();
        let change = self.changing(Change::All);
        self.spawn(async move {
            this.forget_capability(ino).await;
            let res = this.change_node(op).await;
            this.forget_capability(ino).await;
            drop(change);
            match res {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn xattr_gen(&self) -> u64 {
        self.inner.xattr_gen.load(Ordering::SeqCst)
    }

    /// Until when a `security.capability` answer asked for at `asked` may be trusted: `None` if
    /// an xattr changed through this mount since `gen` was read, before that.
    fn capability_until(&self, asked: Instant, gen: u64) -> Option<Instant> {
        (self.xattr_gen() == gen).then(|| asked + self.ttl())
    }

    /// Bumps the xattr generation (opens and creates in flight keep no answer) and drops the
    /// answer an open `ino` holds.
    async fn forget_capability(&self, ino: u64) {
        self.inner.xattr_gen.fetch_add(1, Ordering::SeqCst);
        if let Some(st) = self.open_state(ino) {
            st.lock().await.no_capability_until = None;
        }
    }

    /// A mutation that answers with nothing.
    fn empty_op(&self, op: Op, reply: ReplyEmpty) {
        let this = self.clone();
        let change = self.changing(Change::All);
        self.spawn(async move {
            let res = this.change_node(op).await;
            drop(change);
            match res {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    /// What `setattr` does: pending writes first, then the size, then the other attributes.
    async fn set_attr(&self, ino: u64, new: NewAttrs) -> Result<Attr, Errno> {
        let ctx = &self.inner.ctx;
        let open = self.open_state(ino);
        // Pending writes first, so that times set now are not overwritten by their commit.
        let mut attr = None;
        if let Some(st) = &open {
            attr = Some(self.sync_state(st).await?);
        }
        if let Some(size) = new.size {
            let (st, held) = match &open {
                Some(st) => (st.clone(), false),
                None => match self.client().getattr(ino).await {
                    Ok(a) if a.kind() == InodeKind::Directory => return Err(Errno::EISDIR),
                    Ok(a) => (self.hold(&a), true),
                    Err(e) => return Err(errno(&e)),
                },
            };
            let synced = async {
                st.lock().await.truncate(ctx, size).await.map_err(|e| errno(&e))?;
                self.sync_state(&st).await
            }
            .await;
            if held {
                self.unhold(ino, false).await;
            }
            attr = Some(synced?);
        }
        let NewAttrs { mode, uid, gid, atime, mtime, .. } = new;
        let (atime_ns, atime_now) = time_arg(atime);
        let (mtime_ns, mtime_now) = time_arg(mtime);
        if mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
            let op = Op::SetAttr(SetAttrNode { inode: ino, mode, uid, gid, atime_ns, mtime_ns, atime_now, mtime_now });
            attr = Some(self.change_node_attr(op).await?);
        }
        let attr = match attr {
            Some(a) => a,
            None => self.attr(ino).await?,
        };
        if let Some(st) = &open {
            st.lock().await.attr = attr.clone();
        }
        Ok(attr)
    }

    async fn dir_entries(&self, ino: u64) -> Result<Vec<(String, Attr)>, Errno> {
        let dir = self.client().getattr(ino).await.map_err(|e| errno(&e))?;
        if dir.kind() != InodeKind::Directory {
            return Err(Errno::ENOTDIR);
        }
        let list = self.client().readdir(ino).await.map_err(|e| errno(&e))?;
        let mut out = Vec::with_capacity(list.len() + 2);
        out.push((".".to_string(), dir.clone()));
        // The kernel resolves ".." itself; its inode number here is informational.
        out.push(("..".to_string(), Attr { inode: 1, kind: InodeKind::Directory as i32, ..Default::default() }));
        out.extend(list.into_iter().filter_map(|e| Some((e.name, e.attr?))));
        Ok(out)
    }

    fn dir_handle(&self, fh: FileHandle) -> Option<Arc<Vec<(String, Attr)>>> {
        match self.inner.handles.lock().expect("handles lock").get(&fh.0) {
            Some(Fh::Dir { entries }) => Some(entries.clone()),
            _ => None,
        }
    }
}

fn time_arg(t: Option<TimeOrNow>) -> (Option<i64>, bool) {
    match t {
        None => (None, false),
        Some(TimeOrNow::Now) => (None, true),
        Some(TimeOrNow::SpecificTime(t)) => (Some(nanos(t)), false),
    }
}

impl Filesystem for CairnFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let want = fuser::InitFlags::FUSE_DO_READDIRPLUS
            | fuser::InitFlags::FUSE_READDIRPLUS_AUTO
            | fuser::InitFlags::FUSE_PARALLEL_DIROPS
            | fuser::InitFlags::FUSE_ASYNC_DIO
            | fuser::InitFlags::FUSE_CACHE_SYMLINKS;
        let _ = config.add_capabilities(want & config.capabilities());
        let _ = config.set_max_readahead(4 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = match name_of(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let ttl = self.ttl();
        let (listed, fetch) = {
            let mut listings = self.inner.listings.lock().expect("listings lock");
            match listings.get(parent.0, &name, ttl) {
                Some(hit) => (Some(hit), None),
                None if ttl.is_zero() => (None, None),
                None => (None, listings.miss(parent.0)),
            }
        };
        let this = self.clone();
        let hit = listed.is_some();
        let answer = async move {
            let listed = match (listed, fetch) {
                (Some(hit), _) => Some(hit),
                (None, Some(gen)) => this.list_for_lookups(parent.0, gen, &name).await,
                (None, None) => None,
            };
            if let Some((a, until)) = listed {
                let a = this.fresher(a).await;
                let left = until.saturating_duration_since(Instant::now());
                return reply.entry(&left, &to_file_attr(&a), Generation(0));
            }
            match this.client().lookup(parent.0, &name).await {
                Ok(a) => {
                    let a = this.fresher(a).await;
                    reply.entry(&this.ttl(), &to_file_attr(&a), Generation(0))
                }
                Err(e) => {
                    if matches!(e, Error::NotFound(_)) {
                        this.inner.listings.lock().expect("listings lock").not_found(parent.0);
                    }
                    reply.error(errno(&e))
                }
            }
        };
        if hit {
            self.run_inline(answer);
        } else {
            self.spawn(answer);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let kept = self.inner.dir_attrs.lock().expect("dir attrs lock").get(ino.0);
        if let Some((a, left)) = kept {
            return reply.attr(&left, &to_file_attr(&a));
        }
        let this = self.clone();
        self.spawn(async move {
            match this.attr(ino.0).await {
                Ok(a) => reply.attr(&this.ttl(), &to_file_attr(&a)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let this = self.clone();
        let change = self.changing(Change::All);
        self.spawn(async move {
            let res = this.set_attr(ino.0, NewAttrs { mode, uid, gid, size, atime, mtime }).await;
            drop(change);
            match res {
                Ok(attr) => reply.attr(&this.ttl(), &to_file_attr(&attr)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let this = self.clone();
        self.spawn(async move {
            match this.client().getattr(ino.0).await {
                Ok(a) if a.kind() == InodeKind::Symlink => reply.data(a.symlink_target.as_bytes()),
                Ok(_) => reply.error(Errno::EINVAL),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => InodeKind::File,
            libc::S_IFIFO => InodeKind::Fifo,
            libc::S_IFSOCK => InodeKind::Socket,
            libc::S_IFCHR => InodeKind::CharDevice,
            libc::S_IFBLK => InodeKind::BlockDevice,
            _ => return reply.error(Errno::EINVAL),
        };
        self.make(req, parent, name, MakeNode { kind: kind as i32, mode, rdev, ..Default::default() }, reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        self.make(req, parent, name, MakeNode { kind: InodeKind::Directory as i32, mode, ..Default::default() }, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match name_of(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let this = self.clone();
        let change = self.changing(Change::Names(vec![(parent.0, name.clone())]));
        self.spawn(async move {
            // A file this mount has open outlives its last name until it is closed (POSIX).
            let keep = this.open_target(parent.0, &name).await;
            let op = Op::Unlink(UnlinkNode {
                parent: parent.0,
                name,
                directory: false,
                keep: keep.is_some(),
                keeper: this.inner.keeper,
            });
            let res = this.drop_name(op, keep).await;
            drop(change);
            match res {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match name_of(name) {
            Ok(name) => self.empty_op(
                Op::Unlink(UnlinkNode { parent: parent.0, name, directory: true, ..Default::default() }),
                reply,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let Some(target) = target.to_str() else { return reply.error(Errno::EINVAL) };
        let m = MakeNode {
            kind: InodeKind::Symlink as i32,
            mode: 0o777,
            symlink_target: target.to_string(),
            ..Default::default()
        };
        self.make(req, parent, link_name, m, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, new_name) = match (name_of(name), name_of(newname)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let bits = flags.bits();
        if bits & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return reply.error(Errno::EINVAL);
        }
        let exchange = bits & libc::RENAME_EXCHANGE != 0;
        let this = self.clone();
        let change = self.changing(Change::Names(vec![(parent.0, name.clone()), (newparent.0, new_name.clone())]));
        self.spawn(async move {
            // A replaced file that is open here outlives its name, as with unlink.
            let keep = if exchange { None } else { this.open_target(newparent.0, &new_name).await };
            let op = Op::Rename(RenameNode {
                parent: parent.0,
                name,
                new_parent: newparent.0,
                new_name,
                no_replace: bits & libc::RENAME_NOREPLACE != 0,
                exchange,
                keep: keep.is_some(),
                keeper: this.inner.keeper,
            });
            let res = this.drop_name(op, keep).await;
            drop(change);
            match res {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        match name_of(newname) {
            Ok(name) => self.entry_op(Op::Link(LinkNode { inode: ino.0, parent: newparent.0, name }), reply),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let this = self.clone();
        self.spawn(async move {
            // Close-to-open: every open asks the masters for the current version (with its
            // extents: the first read needs no second call).
            let (asked, gen) = (Instant::now(), this.xattr_gen());
            let file = match this.client().open_inode(ino.0).await {
                Ok(f) => f,
                Err(e) => return reply.error(errno(&e)),
            };
            let attr = file.attr.clone().unwrap_or_default();
            let (fh, keep) = this.open_file(&attr);
            if !keep {
                // Another version than this mount last opened: the kernel may hold the size of an
                // older one (from a lookup answered before another client's close) for the
                // attribute timeout, and would end reads there. Close-to-open: its attributes
                // are fetched again before the first read. (Open is not among the requests an
                // inode notification must not be sent from.)
                if let Some(n) = this.inner.notifier.get() {
                    if let Err(e) = n.inval_inode(ino, -1, 0) {
                        tracing::debug!(inode = ino.0, "invalidating the kernel's attributes: {e}");
                    }
                }
            }
            if let Some(st) = this.open_state(ino.0) {
                let mut st = st.lock().await;
                st.no_capability_until =
                    this.capability_until(asked, gen).filter(|_| !file.xattrs.contains_key(file::CAPABILITY));
                st.refresh(file);
            }
            let flags = if keep { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
            reply.opened(FileHandle(fh), flags);
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let Some((ino, state, reads)) = self.file_handle(fh) else { return reply.error(Errno::EBADF) };
        let this = self.clone();
        self.run_inline(async move {
            let ctx = &this.inner.ctx;
            let sequential = reads.sequential(offset, u64::from(size));
            let (pieces, ahead) = {
                let mut st = state.lock().await;
                let pieces = match st.plan_read(ctx, offset, u64::from(size), sequential).await {
                    Ok(p) => p,
                    Err(e) => return reply.error(errno(&e)),
                };
                (pieces, if sequential { st.next_chunks(offset, READ_AHEAD_CHUNKS) } else { vec![] })
            };
            for loc in ahead {
                let this = this.clone();
                tokio::spawn(async move {
                    let _ = file::fetch_whole(&this.inner.ctx, &loc).await;
                });
            }
            let read = match file::fetch(ctx, pieces).await {
                // No replica known at the open serves a chunk: it may have moved since (a drain,
                // a repair). Once more, with where the masters say the chunks are now.
                Err(Error::ChunkUnavailable { .. }) => {
                    async {
                        let fresh = ctx.client.open_inode(ino).await?;
                        let mut st = state.lock().await;
                        st.relocate(fresh.extents);
                        let pieces = st.plan_read(ctx, offset, u64::from(size), sequential).await?;
                        drop(st);
                        file::fetch(ctx, pieces).await
                    }
                    .await
                }
                r => r,
            };
            match read {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some((_, state, _)) = self.file_handle(fh) else { return reply.error(Errno::EBADF) };
        let data = data.to_vec();
        let this = self.clone();
        let change = self.changing(Change::All);
        self.spawn(async move {
            let mut st = state.lock().await;
            let res = st.write(&this.inner.ctx, offset, &data).await;
            drop(st);
            drop(change);
            match res {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        let Some((_, state, _)) = self.file_handle(fh) else { return reply.error(Errno::EBADF) };
        let this = self.clone();
        self.run_inline(async move {
            match this.sync_state(&state).await {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.flush(_req, _ino, fh, fuser::LockOwner(0), reply);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let Some(Fh::File { ino, state, .. }) = self.inner.handles.lock().expect("handles lock").remove(&fh.0) else {
            return reply.ok();
        };
        let this = self.clone();
        self.run_inline(async move {
            let result = this.sync_state(&state).await;
            // A failed commit keeps the file's writes for a later try (the committer, or the
            // next open's close), unless the file is gone.
            let retry = result.is_err() && result != Err(Errno::from_i32(libc::ESTALE));
            this.unhold(ino, retry).await;
            match result {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let this = self.clone();
        self.spawn(async move {
            match this.dir_entries(ino.0).await {
                Ok(entries) => {
                    let fh = this.add_handle(Fh::Dir { entries: Arc::new(entries) });
                    reply.opened(FileHandle(fh), FopenFlags::empty())
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(entries) = self.dir_handle(fh) else { return reply.error(Errno::EBADF) };
        for (i, (name, a)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(a.inode), i as u64 + 1, file_type(a), name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let Some(entries) = self.dir_handle(fh) else { return reply.error(Errno::EBADF) };
        let ttl = self.ttl();
        for (i, (name, a)) in entries.iter().enumerate().skip(offset as usize) {
            // "." and ".." carry no attributes the kernel may cache as entries.
            let full = i >= 2;
            let ttl = if full { ttl } else { Duration::ZERO };
            if reply.add(INodeNo(a.inode), i as u64 + 1, name, &ttl, &to_file_attr(a), Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.inner.handles.lock().expect("handles lock").remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Namespace changes are durable (committed by a quorum of masters) when acknowledged.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let this = self.clone();
        self.spawn(async move {
            match this.client().status().await {
                Ok(s) => {
                    const BSIZE: u64 = 4096;
                    let live = s.chunkservers.iter().filter(|c| c.state != "dead");
                    let (cap, used) = live.fold((0u64, 0u64), |(c, u), n| (c + n.capacity_bytes, u + n.used_bytes));
                    let free = cap.saturating_sub(used) / BSIZE;
                    let files = s.files;
                    reply.statfs(cap / BSIZE, free, free, files + (1 << 32), 1 << 32, BSIZE as u32, 255, BSIZE as u32)
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        let Some(name) = name.to_str() else { return reply.error(Errno::EINVAL) };
        if position != 0 {
            return reply.error(Errno::EINVAL);
        }
        let op = Op::SetXattr(SetXattr {
            inode: ino.0,
            name: name.to_string(),
            value: value.to_vec(),
            create: flags & libc::XATTR_CREATE != 0,
            replace: flags & libc::XATTR_REPLACE != 0,
        });
        self.xattr_op(ino.0, op, reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(name) = name.to_str().map(str::to_string) else { return reply.error(Errno::EINVAL) };
        let this = self.clone();
        let open = if name == file::CAPABILITY { self.open_state(ino.0) } else { None };
        let inline = open.is_some();
        let answer = async move {
            // The kernel's question before a write, answered from the open when it knows there
            // is none. A capability the open saw is asked for again: answering a stale one, the
            // kernel would remove what another client removed already, and the write would fail.
            let known_none = match &open {
                Some(st) => st.lock().await.no_capability_until.is_some_and(|until| Instant::now() < until),
                None => false,
            };
            let value = if known_none {
                None
            } else {
                let (asked, gen) = (Instant::now(), this.xattr_gen());
                let value = match this.client().xattrs(ino.0).await {
                    Ok(mut x) => x.remove(&name),
                    Err(e) => return reply.error(errno(&e)),
                };
                // The kernel asks before every write: the next TTL's worth is answered here.
                if let Some(st) = &open {
                    st.lock().await.no_capability_until = this.capability_until(asked, gen).filter(|_| value.is_none());
                }
                value
            };
            match value {
                None => reply.error(Errno::from_i32(libc::ENODATA)),
                Some(v) => xattr_reply(reply, size, &v),
            }
        };
        if inline {
            self.run_inline(answer);
        } else {
            self.spawn(answer);
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let this = self.clone();
        self.spawn(async move {
            match this.client().xattrs(ino.0).await {
                Ok(x) => {
                    let mut names = Vec::new();
                    for k in x.keys() {
                        names.extend_from_slice(k.as_bytes());
                        names.push(0);
                    }
                    xattr_reply(reply, size, &names)
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(name) = name.to_str() else { return reply.error(Errno::EINVAL) };
        self.xattr_op(ino.0, Op::RemoveXattr(RemoveXattr { inode: ino.0, name: name.to_string() }), reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions (default_permissions); this answers existence.
        let this = self.clone();
        self.spawn(async move {
            match this.client().getattr(ino.0).await {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // Space is not reserved ahead in a replicated store; extending the size is what callers
        // can observe. FALLOC_FL_KEEP_SIZE alone has nothing to do.
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let Some((_, state, _)) = self.file_handle(fh) else { return reply.error(Errno::EBADF) };
        let this = self.clone();
        self.spawn(async move {
            let end = offset.saturating_add(length);
            let mut st = state.lock().await;
            if let Err(e) = st.allocate(&this.inner.ctx, end, mode & libc::FALLOC_FL_KEEP_SIZE != 0).await {
                return reply.error(errno(&e));
            }
            drop(st);
            match this.sync_state(&state).await {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let op = match self.make_op(
            req,
            parent,
            name,
            MakeNode { kind: InodeKind::File as i32, mode, ..Default::default() },
        ) {
            Ok(op) => op,
            Err(e) => return reply.error(e),
        };
        let child = match name_of(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let this = self.clone();
        let change = self.changing(Change::All);
        self.spawn(async move {
            let (asked, gen) = (Instant::now(), this.xattr_gen());
            let mut res = this.change_node_attr(op.clone()).await;
            // The kernel asks for a create only after its lookup found no such name; another
            // client made it in between. Without O_EXCL, open(2) must then open that file, with
            // the permission checks, O_TRUNC, symlinks and directories of a plain open: ESTALE
            // makes the kernel walk the path again with fresh lookups (`do_filp_open` retries
            // once, with LOOKUP_REVAL), which find the name. It retries only once, so the name
            // must be there now: gone again (unlinked meanwhile), it is created here once more.
            if flags & libc::O_EXCL == 0 {
                for _ in 0..CREATE_RACE_ATTEMPTS {
                    if res != Err(Errno::EEXIST) {
                        break;
                    }
                    match this.client().lookup(parent.0, &child).await {
                        Ok(_) => res = Err(Errno::ESTALE),
                        Err(Error::NotFound(_)) => res = this.change_node_attr(op.clone()).await,
                        Err(_) => break,
                    }
                }
            }
            drop(change);
            match res {
                Ok(a) => {
                    let (fh, _) = this.open_file(&a);
                    if let Some(st) = this.open_state(a.inode) {
                        st.lock().await.made_empty(this.capability_until(asked, gen));
                    }
                    reply.created(&this.ttl(), &to_file_attr(&a), Generation(0), FileHandle(fh), FopenFlags::empty())
                }
                Err(e) => reply.error(e),
            }
        });
    }
}

/// Creates a create without O_EXCL makes while the name keeps appearing and vanishing under it
/// (another client creating and unlinking it), before it answers EEXIST.
const CREATE_RACE_ATTEMPTS: usize = 3;

/// The directories a change may alter the attributes of (`None`: it cannot say which). A
/// rename may move a directory (whose own attributes change) or replace one; an rmdir removes
/// one.
fn touched_dirs(op: &Op) -> Option<Vec<u64>> {
    match op {
        Op::Make(m) => Some(vec![m.parent]),
        Op::Link(l) => Some(vec![l.parent]),
        Op::Unlink(u) if !u.directory => Some(vec![u.parent]),
        Op::SetAttr(a) => Some(vec![a.inode]),
        Op::SetXattr(x) => Some(vec![x.inode]),
        Op::RemoveXattr(x) => Some(vec![x.inode]),
        Op::Commit(_) | Op::Release(_) => Some(vec![]),
        Op::Unlink(_) | Op::Rename(_) => None,
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_sequential_from_0_or_after_two_in_a_row() {
        let r = ReadPattern::new();
        assert!(r.sequential(0, 131072), "a first read at 0 starts a sequential run");
        assert!(r.sequential(131072, 131072));
        assert!(r.sequential(131072 * 3, 131072), "out of order within the slack");
        let r = ReadPattern::new();
        assert!(!r.sequential(500 << 20, 4096), "a first read elsewhere is random");
        assert!(!r.sequential(100 << 20, 4096));
        assert!(!r.sequential((100 << 20) + 8192, 4096), "one near read by chance is not a run");
        assert!(r.sequential((100 << 20) + 12288, 4096), "the second in a row is");
        assert!(!r.sequential(7 << 20, 4096));
    }
}
