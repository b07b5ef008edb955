//! The Cairn client library: the only way into a cluster. The CLI, the FUSE mount and the S3
//! gateway all sit on [`Client`]. It talks gRPC to the masters (metadata, placement, commits) and
//! QUIC to chunkservers (chunk bytes); it never reaches into a master's or chunkserver's internals.
//!
//! Writes: data is cut into chunks, each hashed (BLAKE3) and placed by the leader; chunks the
//! cluster already holds are not sent again; the rest stream to their first replica, which
//! forwards down the chain, with a bounded window of chunks in flight. Only when every chunk is on
//! all its replicas is the new extent list committed, atomically: readers see the old file or the
//! new one. Reads fetch chunks in parallel from the best replica, verify them, and fail over.
//!
//! `cli` holds the code of the `cairn` commands that use only this library.

mod batch;
pub mod cli;
mod data;
pub mod error;
mod fs;
mod master;

use data::hash_chunk;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cairn_proto::v1::{self as pb, Attr, ChunkserverRef, DirEntry, Extent, InodeKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use error::{Error, Result};

/// Chunks in flight (read ahead or being uploaded) per transfer: bounds memory to about
/// `WINDOW * chunk size`.
const WINDOW: usize = 12;
/// Upload attempts per chunk, each with a fresh placement that avoids nodes that failed.
const UPLOAD_ATTEMPTS: usize = 4;
/// How long a read waits for a chunk's locations after a master restart (chunkservers report).
const LOCATION_WAIT: Duration = Duration::from_secs(20);
const LIST_PAGE: u32 = 1000;

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub masters: Vec<String>,
    /// Identity directory with ca.pem, cert.pem, key.pem (see `cairn_common::tls`).
    pub tls_dir: std::path::PathBuf,
    /// Overall deadline of one metadata call, retries included.
    pub master_deadline: Duration,
}

#[derive(Clone, Debug)]
pub struct PutOptions {
    pub replication: u32,
    /// Cut points: chunks of this size (the last may be shorter). At most `cairn_proto::MAX_CHUNK`.
    pub chunk_size: usize,
    pub mode: u32,
    /// Create only: the commit fails with AlreadyExists if the path exists.
    pub exclusive: bool,
}

impl Default for PutOptions {
    fn default() -> Self {
        PutOptions { replication: 3, chunk_size: cairn_proto::MAX_CHUNK as usize, mode: 0o644, exclusive: false }
    }
}

/// Receives the byte count of each piece transferred (for progress bars).
pub type Progress<'a> = &'a (dyn Fn(u64) + Send + Sync);

/// A connection to one cluster. Cloning is cheap and shares the connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    masters: master::Masters,
    data: data::DataPlane,
    /// Random and nonzero: names this client's mutations, with `seq`, so that the masters apply
    /// a retried one only once.
    client_id: u64,
    ids: Arc<std::sync::Mutex<Ids>>,
    places: batch::Batcher<batch::Place>,
    commits: batch::Batcher<batch::Commit>,
}

/// This client's mutation ids: the last one handed out, and those whose answers are not in yet.
#[derive(Default)]
struct Ids {
    last: u64,
    waiting: std::collections::BTreeSet<u64>,
}

/// A mutation whose answer the client still waits for (see [`Client::next_id`]).
struct Waiting {
    ids: Arc<std::sync::Mutex<Ids>>,
    seq: u64,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).waiting.remove(&self.seq);
    }
}

fn is_dir(a: &Attr) -> bool {
    a.kind() == InodeKind::Directory
}

/// The parent of an absolute path ("/" for a top-level name).
pub fn parent_of(path: &str) -> &str {
    let p = path.trim_end_matches('/');
    match p.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &p[..i],
    }
}

/// `dir` joined with `name`.
pub fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

impl Client {
    pub async fn connect(cfg: ClientConfig) -> Result<Client> {
        let identity = cairn_common::tls::Identity::load(&cfg.tls_dir)
            .map_err(|e| Error::InvalidArgument(format!("TLS credentials: {e:#}")))?;
        let masters = master::Masters::new(cfg.masters, identity.grpc_client(), cfg.master_deadline)?;
        let data = data::DataPlane::new(&identity).map_err(|e| Error::Internal(format!("QUIC endpoint: {e:#}")))?;
        Ok(Client {
            inner: Arc::new(Inner {
                masters,
                data,
                client_id: rand::random::<u64>() | 1,
                ids: Default::default(),
                places: Default::default(),
                commits: Default::default(),
            }),
        })
    }

    /// A fresh id for one mutation; its retries reuse it. Keep the [`Waiting`] until the answer
    /// is in (or the mutation is given up): until then the masters keep the answer for retries.
    fn next_id(&self) -> (Option<pb::ClientRequestId>, Waiting) {
        let mut ids = self.inner.ids.lock().expect("ids lock");
        ids.last += 1;
        let seq = ids.last;
        ids.waiting.insert(seq);
        let first_unanswered = ids.waiting.first().copied().unwrap_or(seq);
        let id = pb::ClientRequestId { client: self.inner.client_id, seq, first_unanswered };
        (Some(id), Waiting { ids: self.inner.ids.clone(), seq })
    }

    pub async fn stat(&self, path: &str) -> Result<Attr> {
        let path = path.to_string();
        let r = self
            .inner
            .masters
            .call(|mut c| {
                let path = path.clone();
                async move { c.stat(pb::StatRequest { path }).await }
            })
            .await?;
        r.attr.ok_or_else(|| Error::Internal("stat returned no attributes".into()))
    }

    /// Whether `path` exists (errors other than NotFound are returned).
    pub async fn exists(&self, path: &str) -> Result<Option<Attr>> {
        match self.stat(path).await {
            Ok(a) => Ok(Some(a)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every entry of a directory (all pages). A file lists as itself, under its own name.
    pub async fn list(&self, path: &str) -> Result<(Attr, Vec<DirEntry>)> {
        self.list_with(path, false).await
    }

    /// [`Client::list`], with each entry's extended attributes when `xattrs` is set.
    pub async fn list_with(&self, path: &str, xattrs: bool) -> Result<(Attr, Vec<DirEntry>)> {
        let mut out = Vec::new();
        let mut start_after = String::new();
        loop {
            let (p, s) = (path.to_string(), start_after.clone());
            let r = self
                .inner
                .masters
                .call(|mut c| {
                    let req = pb::ListRequest { path: p.clone(), start_after: s.clone(), limit: LIST_PAGE, xattrs };
                    async move { c.list(req).await }
                })
                .await?;
            let attr = r.attr.unwrap_or_default();
            if !is_dir(&attr) {
                let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or(path).to_string();
                return Ok((attr.clone(), vec![DirEntry { name, attr: Some(attr), xattrs: Default::default() }]));
            }
            if let Some(last) = r.entries.last() {
                start_after = last.name.clone();
            }
            out.extend(r.entries);
            if !r.more {
                return Ok((attr, out));
            }
        }
    }

    /// Whether the directory at `path` has no entries (one short page is read).
    pub async fn is_empty_dir(&self, path: &str) -> Result<bool> {
        let p = path.to_string();
        let r = self
            .inner
            .masters
            .call(|mut c| {
                let req = pb::ListRequest { path: p.clone(), start_after: String::new(), limit: 1, xattrs: false };
                async move { c.list(req).await }
            })
            .await?;
        if !r.attr.as_ref().is_some_and(is_dir) {
            return Err(Error::NotADirectory(path.to_string()));
        }
        Ok(r.entries.is_empty())
    }

    pub async fn mkdir(&self, path: &str, parents: bool) -> Result<Attr> {
        let (id, _waiting) = self.next_id();
        let req = pb::MkdirRequest { path: path.to_string(), parents, mode: 0o755, uid: 0, gid: 0, id };
        let r = self
            .inner
            .masters
            .call(|mut c| {
                let req = req.clone();
                async move { c.mkdir(req).await }
            })
            .await?;
        r.attr.ok_or_else(|| Error::Internal("mkdir returned no attributes".into()))
    }

    /// POSIX rename: replaces a file, or an empty directory, at `dst`.
    pub async fn rename(&self, src: &str, dst: &str) -> Result<()> {
        let (id, _waiting) = self.next_id();
        let req = pb::RenameRequest { src: src.to_string(), dst: dst.to_string(), id };
        self.inner
            .masters
            .call(|mut c| {
                let req = req.clone();
                async move { c.rename(req).await }
            })
            .await?;
        Ok(())
    }

    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        let (id, _waiting) = self.next_id();
        let req = pb::RemoveRequest { path: path.to_string(), recursive, id };
        self.inner
            .masters
            .call(|mut c| {
                let req = req.clone();
                async move { c.remove(req).await }
            })
            .await?;
        Ok(())
    }

    /// A new S3 access key (its secret is only ever shown in this answer and to gateways).
    pub async fn create_access_key(&self, description: &str) -> Result<pb::AccessKey> {
        let (id, _waiting) = self.next_id();
        let req = pb::CreateAccessKeyRequest { description: description.to_string(), id };
        self.inner
            .masters
            .call(|mut c| {
                let req = req.clone();
                async move { c.create_access_key(req).await }
            })
            .await
    }

    /// Every access key, without secrets.
    pub async fn list_access_keys(&self) -> Result<Vec<pb::AccessKey>> {
        let r = self.inner.masters.call(|mut c| async move { c.list_access_keys(pb::Empty {}).await }).await?;
        Ok(r.keys)
    }

    /// One access key with its secret (for a gateway checking signatures).
    pub async fn access_key(&self, id: &str) -> Result<pb::AccessKey> {
        let id = id.to_string();
        self.inner
            .masters
            .call(|mut c| {
                let req = pb::AccessKeyRequest { id: id.clone(), request: None };
                async move { c.get_access_key(req).await }
            })
            .await
    }

    pub async fn delete_access_key(&self, id: &str) -> Result<()> {
        let (request, _waiting) = self.next_id();
        let req = pb::AccessKeyRequest { id: id.to_string(), request };
        self.inner
            .masters
            .call(|mut c| {
                let req = req.clone();
                async move { c.delete_access_key(req).await }
            })
            .await?;
        Ok(())
    }

    pub async fn status(&self) -> Result<pb::StatusResponse> {
        self.inner.masters.call(|mut c| async move { c.status(pb::StatusRequest {}).await }).await
    }

    /// Adds (`addr` given) or removes a master of the group; returns the members afterwards.
    pub async fn change_masters(&self, id: u64, addr: Option<&str>) -> Result<Vec<pb::MasterStatus>> {
        let (request, _waiting) = self.next_id();
        let req = pb::ChangeMembershipRequest {
            id,
            addr: addr.unwrap_or_default().to_string(),
            remove: addr.is_none(),
            request,
        };
        let r = self
            .inner
            .masters
            .call(|mut c| {
                let req = req.clone();
                async move { c.change_membership(req).await }
            })
            .await?;
        Ok(r.masters)
    }

    /// Starts moving every replica off chunkserver `id` (or cancels that), or forgets a stopped
    /// one (`forget`).
    pub async fn drain(&self, id: u64, cancel: bool, forget: bool) -> Result<()> {
        let (request, _waiting) = self.next_id();
        let req = pb::DrainRequest { id, cancel, forget, request };
        self.inner.masters.call(|mut c| async move { c.drain(req).await }).await?;
        Ok(())
    }

    /// Changes the re-replication limits per chunkserver (None: leave as is); returns the limits
    /// in force afterwards.
    pub async fn set_repair_limits(&self, rate_bytes: Option<u64>, copies: Option<u32>) -> Result<pb::RepairLimits> {
        let (id, _waiting) = self.next_id();
        let req = pb::SetRepairLimitsRequest { rate_bytes, copies, id };
        self.inner.masters.call(|mut c| async move { c.set_repair_limits(req).await }).await
    }

    /// Hands leadership to master `to` (0: the most up-to-date follower); returns the new leader.
    pub async fn transfer_leader(&self, to: u64) -> Result<u64> {
        let r = self
            .inner
            .masters
            .call(|mut c| async move { c.transfer_leader(pb::TransferLeaderRequest { to }).await })
            .await?;
        Ok(r.leader)
    }

    /// A file's attributes, extended attributes and extents with their replicas.
    pub async fn open_file(&self, path: &str) -> Result<pb::OpenFileResponse> {
        let p = path.to_string();
        self.inner
            .masters
            .call(|mut c| {
                let p = p.clone();
                async move { c.open_file(pb::OpenFileRequest { path: p }).await }
            })
            .await
    }

    /// Uploads everything `reader` yields as the new content of `path` (created or replaced).
    /// The parent directory must exist. Returns the committed attributes. Nothing is visible at
    /// `path` until every chunk is on all its replicas; a put that fails or is killed midway
    /// leaves the old content in place.
    pub async fn put<R: AsyncRead + Unpin + Send>(
        &self,
        path: &str,
        reader: R,
        opts: &PutOptions,
        progress: Progress<'_>,
    ) -> Result<Attr> {
        self.put_from(path, AsyncSource { reader, full: false, bufs: self.inner.data.bufs() }, opts, progress).await
    }

    /// [`Client::put`] from a local file, read with positioned reads on the blocking pool (no
    /// intermediate buffer copies, unlike an async file reader).
    pub async fn put_file(
        &self,
        path: &str,
        file: std::fs::File,
        opts: &PutOptions,
        progress: Progress<'_>,
    ) -> Result<Attr> {
        self.put_from(
            path,
            FileSource { file: Arc::new(file), offset: 0, full: false, bufs: self.inner.data.bufs() },
            opts,
            progress,
        )
        .await
    }

    async fn put_from<S: ChunkSource>(
        &self,
        path: &str,
        source: S,
        opts: &PutOptions,
        progress: Progress<'_>,
    ) -> Result<Attr> {
        let extents = self.upload_from(Some(path), source, opts, progress).await?;
        self.commit(path, extents, opts, None).await
    }

    /// Uploads everything `reader` yields as chunks and returns their extents, ready for
    /// [`Client::commit`]. Nothing is visible anywhere until that commit; chunks never committed
    /// are collected after the cluster's grace period.
    pub async fn upload_stream<R: AsyncRead + Unpin + Send>(
        &self,
        reader: R,
        opts: &PutOptions,
        progress: Progress<'_>,
    ) -> Result<Vec<Extent>> {
        self.upload_from(None, AsyncSource { reader, full: false, bufs: self.inner.data.bufs() }, opts, progress).await
    }

    /// Makes `extents` the content of `path` (created or replaced) in one atomic step. With
    /// `xattrs` the file's extended attributes become exactly those, in the same step.
    pub async fn commit(
        &self,
        path: &str,
        extents: Vec<Extent>,
        opts: &PutOptions,
        xattrs: Option<std::collections::BTreeMap<String, Vec<u8>>>,
    ) -> Result<Attr> {
        let (id, _waiting) = self.next_id();
        let req = pb::CommitFileRequest {
            path: path.to_string(),
            extents,
            replication: opts.replication,
            mode: opts.mode,
            uid: 0,
            gid: 0,
            set_xattrs: xattrs.is_some(),
            xattrs: xattrs.unwrap_or_default(),
            exclusive: opts.exclusive,
            id,
        };
        batch::send::<batch::Commit>(&self.inner, (), req).await
    }

    /// Uploads the chunks of `source`. With `path`, a multi-chunk upload first checks that a
    /// commit to it could succeed.
    async fn upload_from<S: ChunkSource>(
        &self,
        path: Option<&str>,
        mut source: S,
        opts: &PutOptions,
        progress: Progress<'_>,
    ) -> Result<Vec<Extent>> {
        if opts.chunk_size == 0 || opts.chunk_size as u64 > cairn_proto::MAX_CHUNK {
            return Err(Error::InvalidArgument(format!(
                "chunk size {} (1 to {})",
                opts.chunk_size,
                cairn_proto::MAX_CHUNK
            )));
        }
        let first = source.next_chunk(opts.chunk_size).await.map_err(|e| Error::io("read input", e))?;
        if let (Some(path), true) = (path, first.len() == opts.chunk_size) {
            // More than one chunk may follow: fail before uploading them all when the commit
            // could not succeed. (A single chunk goes straight on; the commit checks the same.)
            match self.exists(path).await? {
                Some(a) if is_dir(&a) => return Err(Error::IsADirectory(path.to_string())),
                Some(_) => {} // an existing file: its parent is a directory
                None => {
                    let parent = parent_of(path);
                    if !is_dir(&self.stat(parent).await?) {
                        return Err(Error::NotADirectory(parent.to_string()));
                    }
                }
            }
        }
        let mut first = Some(first);
        let mut extents = Vec::new();
        let mut inflight: VecDeque<tokio::task::JoinHandle<Result<Extent>>> = VecDeque::new();
        let mut eof = false;
        let result: Result<()> = async {
            loop {
                while !eof && inflight.len() < WINDOW {
                    let chunk = match first.take() {
                        Some(c) => c,
                        None => source.next_chunk(opts.chunk_size).await.map_err(|e| Error::io("read input", e))?,
                    };
                    if chunk.is_empty() {
                        eof = true;
                        break;
                    }
                    if extents.len() + inflight.len() >= cairn_proto::MAX_EXTENTS {
                        return Err(Error::TooLarge(format!(
                            "more than {} chunks of {} bytes",
                            cairn_proto::MAX_EXTENTS,
                            opts.chunk_size
                        )));
                    }
                    let (this, replication) = (self.clone(), opts.replication);
                    inflight.push_back(tokio::spawn(async move {
                        this.upload_chunk(chunk, replication).await.map(|(e, _)| e)
                    }));
                }
                let Some(task) = inflight.pop_front() else {
                    return Ok(());
                };
                let ext = task.await.map_err(|e| Error::Internal(format!("upload task: {e}")))??;
                progress(ext.length);
                extents.push(ext);
            }
        }
        .await;
        if let Err(e) = result {
            for t in inflight {
                t.abort();
            }
            return Err(e);
        }
        Ok(extents)
    }

    /// Hashes a chunk, has it placed, and stores it on every target (unless the cluster already
    /// holds it). A failed upload is placed again away from the nodes that failed. Returns the
    /// extent and the nodes that hold it (none if the masters did not say).
    async fn upload_chunk(&self, chunk: Bytes, replication: u32) -> Result<(Extent, Vec<pb::ChunkserverRef>)> {
        let hash = hash_chunk(chunk.clone()).await;
        let extent = Extent { hash: hash.to_vec(), length: chunk.len() as u64 };
        let mut exclude: Vec<u64> = Vec::new();
        let mut last = String::new();
        for _ in 0..UPLOAD_ATTEMPTS {
            let mut ex = self.inner.data.open_breakers();
            ex.extend(&exclude);
            ex.sort_unstable();
            ex.dedup();
            let spec = pb::ChunkSpec { hash: hash.to_vec(), length: chunk.len() as u64 };
            let p = batch::send::<batch::Place>(&self.inner, (replication, ex), spec).await?;
            if p.stored {
                return Ok((extent, p.targets));
            }
            match self.inner.data.put_chunk(&p.targets, &hash, chunk.clone()).await {
                Ok(()) => {
                    for t in &p.targets {
                        self.inner.data.succeeded(t.id);
                    }
                    return Ok((extent, p.targets));
                }
                Err((node, e)) => {
                    tracing::warn!(chunk = %hex::encode(hash), node, "upload failed: {e}");
                    if let data::ChunkError::Refused(
                        cairn_proto::data::Status::HashMismatch | cairn_proto::data::Status::Invalid,
                        _,
                    ) = e
                    {
                        return Err(Error::Upload { hash: hex::encode(hash), reason: e.to_string() });
                    }
                    // The chain reports errors from further down by naming the failing address.
                    let failed: Vec<u64> = match &e {
                        data::ChunkError::Refused(_, m) => {
                            p.targets.iter().filter(|t| m.contains(&t.addr)).map(|t| t.id).collect()
                        }
                        _ => vec![],
                    };
                    let failed = if failed.is_empty() { vec![node] } else { failed };
                    for id in failed {
                        self.inner.data.failed(id);
                        exclude.push(id);
                    }
                    last = e.to_string();
                }
            }
        }
        Err(Error::Upload { hash: hex::encode(hash), reason: last })
    }

    /// Convenience for small objects: `put` from memory.
    pub async fn put_bytes(&self, path: &str, data: Bytes, opts: &PutOptions) -> Result<Attr> {
        self.put_from(path, BytesSource(data), opts, &|_| {}).await
    }

    /// Writes the file at `path` (or `len` bytes of it from `offset`; `None`: to the end) into
    /// `out`, chunks fetched in parallel and written in order. Returns the bytes written.
    pub async fn get<W: AsyncWrite + Unpin + Send>(
        &self,
        path: &str,
        out: &mut W,
        offset: u64,
        len: Option<u64>,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let file = self.open_file(path).await?;
        self.get_opened(path, file, &mut WriteSink(out), offset, len, progress).await
    }

    /// [`Client::get`] of a file already opened with [`Client::open_file`] (its content as of
    /// that open), delivered piece by piece to `out` (a channel, for instance: no copies).
    pub async fn get_opened<S: ByteSink>(
        &self,
        path: &str,
        mut file: pb::OpenFileResponse,
        out: &mut S,
        offset: u64,
        len: Option<u64>,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let size = file.attr.as_ref().map_or(0, |a| a.size);
        let start = offset.min(size);
        let end = len.map_or(size, |l| start.saturating_add(l).min(size));
        // After a master restart, locations come back with the chunkservers' reports.
        let t0 = Instant::now();
        while file.extents.iter().any(|e| {
            e.replicas.is_empty() && e.offset < end && e.offset + e.extent.as_ref().map_or(0, |x| x.length) > start
        }) {
            if t0.elapsed() > LOCATION_WAIT {
                let e = file
                    .extents
                    .iter()
                    .find(|e| e.replicas.is_empty())
                    .and_then(|e| e.extent.clone())
                    .unwrap_or_default();
                return Err(Error::ChunkUnavailable {
                    hash: hex::encode(&e.hash),
                    reason: "no live replica is known".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            let again = self.open_file(path).await?;
            // Only the same content will do: the caller may have described this one already.
            let same = |f: &pb::OpenFileResponse| f.attr.as_ref().map(|a| (a.inode, a.version));
            if same(&again) != same(&file) {
                return Err(Error::Unavailable(format!("{path} changed while its chunk locations were awaited")));
            }
            file = again;
        }
        // Reads still running when this returns early (a failed read, the output gone) stop.
        let mut inflight = InFlight(VecDeque::new());
        let version = file.attr.as_ref().map(|a| (a.inode, a.version));
        let mut pieces = file.extents.into_iter().filter_map(|loc| {
            let ext = loc.extent.clone()?;
            let (s, e) = (loc.offset, loc.offset + ext.length);
            if e <= start || s >= end {
                return None;
            }
            let from = start.max(s) - s;
            let to = end.min(e) - s;
            Some((loc, ext, from, to))
        });
        let mut written = 0u64;
        let mut exhausted = false;
        loop {
            while !exhausted && inflight.0.len() < WINDOW {
                match pieces.next() {
                    Some((loc, ext, from, to)) => {
                        let (this, piece) = (self.clone(), (loc.offset, ext.clone(), from, to));
                        let task = tokio::spawn(async move { this.read_piece(&loc.replicas, &ext, from, to).await });
                        inflight.0.push_back((task, piece));
                    }
                    None => exhausted = true,
                }
            }
            let Some((task, piece)) = inflight.0.pop_front() else {
                break;
            };
            let bytes = match task.await.map_err(|e| Error::Internal(format!("read task: {e}")))? {
                Ok(b) => b,
                Err(e @ Error::ChunkUnavailable { .. }) => self.read_moved(path, version, piece, e).await?,
                Err(e) => return Err(e),
            };
            let n = bytes.len() as u64;
            out.accept(bytes).await.map_err(|e| Error::io("write output", e))?;
            written += n;
            progress(n);
        }
        out.finish().await.map_err(|e| Error::io("write output", e))?;
        Ok(written)
    }

    /// A piece of `path` (as of `version`) that no replica listed at its open could serve: the
    /// chunk may have moved since (a drain, a repair, a restart). Asks for its locations again
    /// and tries those, for up to [`LOCATION_WAIT`]; the same version of the file only.
    async fn read_moved(
        &self,
        path: &str,
        version: Option<(u64, u64)>,
        (offset, ext, from, to): PieceAt,
        mut last: Error,
    ) -> Result<Bytes> {
        let t0 = Instant::now();
        while t0.elapsed() < LOCATION_WAIT {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let again = self.open_file(path).await?;
            if again.attr.as_ref().map(|a| (a.inode, a.version)) != version {
                return Err(Error::Unavailable(format!("{path} changed while a chunk of it was read again")));
            }
            let Some(loc) = again.extents.into_iter().find(|l| l.offset == offset) else { break };
            match self.read_piece(&loc.replicas, &ext, from, to).await {
                Ok(b) => return Ok(b),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Reads `[from, to)` of one chunk from the first replica that serves it correctly.
    async fn read_piece(&self, replicas: &[ChunkserverRef], ext: &Extent, from: u64, to: u64) -> Result<Bytes> {
        let hash: [u8; 32] =
            ext.hash.as_slice().try_into().map_err(|_| Error::Internal("chunk hash is not 32 bytes".into()))?;
        let data = &self.inner.data;
        // Replicas whose breaker lets a request through first; the others only as a last
        // resort. `allow` is asked right before a request, so a half-open probe it grants is
        // sent and its result recorded (unless the read is dropped: see `PROBE_LOST_AFTER`).
        let mut errors = Vec::new();
        let mut skipped = Vec::new();
        let open = data.open_breakers();
        for (pass, list) in [(0, replicas.iter().collect::<Vec<_>>()), (1, vec![])] {
            let list = if pass == 0 { list } else { std::mem::take(&mut skipped) };
            for (i, r) in list.iter().enumerate() {
                if pass == 0 && !data.allow(r.id) {
                    skipped.push(*r);
                    continue;
                }
                // Quick to move on while a healthy replica remains to be tried (in the last
                // resort, any replica); the last one gets all the time.
                let more = list[i + 1..].iter().any(|n| pass == 1 || !open.contains(&n.id));
                let patience = if more { data::FAILOVER_AFTER } else { data::REQUEST_TIMEOUT };
                match data.get_chunk(r, &hash, ext.length, from, to - from, patience).await {
                    Ok(b) => {
                        data.succeeded(r.id);
                        return Ok(b);
                    }
                    Err(e) => {
                        tracing::warn!(chunk = %hex::encode(hash), node = r.id, addr = %r.addr, "read failed: {e}");
                        if let data::ChunkError::Corrupt(_) | data::ChunkError::Mismatch(_) = e {
                            // The node answered (its copy is bad): that says nothing against it.
                            data.succeeded(r.id);
                            // Told in the background: the next replica is tried at once.
                            let (this, node, reason) = (self.clone(), r.id, e.to_string());
                            tokio::spawn(async move { this.report_bad(&hash, node, &reason).await });
                        } else {
                            data.failed(r.id);
                        }
                        errors.push(format!("{}: {e}", r.addr));
                    }
                }
            }
        }
        Err(Error::ChunkUnavailable {
            hash: hex::encode(hash),
            reason: if errors.is_empty() { "no replicas".into() } else { errors.join("; ") },
        })
    }

    async fn report_bad(&self, hash: &[u8; 32], node: u64, reason: &str) {
        let req = pb::ReportBadReplicaRequest { hash: hash.to_vec(), chunkserver_id: node, reason: reason.to_string() };
        let r = self
            .inner
            .masters
            .call(|mut c| {
                let req = req.clone();
                async move { c.report_bad_replica(req).await }
            })
            .await;
        if let Err(e) = r {
            tracing::warn!("could not report a bad replica: {e}");
        }
    }

    /// Reads a byte range into memory.
    pub async fn read(&self, path: &str, offset: u64, len: Option<u64>) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.get(path, &mut out, offset, len, &|_| {}).await?;
        Ok(out)
    }

    pub fn close(&self) {
        self.inner.data.close();
    }
}

/// What one read of a transfer reads: the offset of its extent in the file, the extent, and the
/// range in it.
type PieceAt = (u64, Extent, u64, u64);

/// Reads in flight, each with what it reads; aborted when this goes.
struct InFlight(VecDeque<(tokio::task::JoinHandle<Result<Bytes>>, PieceAt)>);

impl Drop for InFlight {
    fn drop(&mut self) {
        for (t, _) in &self.0 {
            t.abort();
        }
    }
}

/// Where [`Client::get_opened`] delivers a file's bytes, in order.
pub trait ByteSink: Send {
    fn accept(&mut self, piece: Bytes) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
    /// After the last piece.
    fn finish(&mut self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        async { Ok(()) }
    }
}

/// A writer as a [`ByteSink`] (flushed at the end).
pub struct WriteSink<'a, W>(pub &'a mut W);

impl<W: AsyncWrite + Unpin + Send> ByteSink for WriteSink<'_, W> {
    async fn accept(&mut self, piece: Bytes) -> std::io::Result<()> {
        self.0.write_all(&piece).await
    }
    async fn finish(&mut self) -> std::io::Result<()> {
        self.0.flush().await
    }
}

/// Pieces handed to a channel as they are (a closed receiver ends the read).
impl ByteSink for tokio::sync::mpsc::Sender<Bytes> {
    async fn accept(&mut self, piece: Bytes) -> std::io::Result<()> {
        self.send(piece).await.map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the reader went away"))
    }
}

/// Pieces kept in memory as they are (no copies), for a caller that wants the whole range.
impl ByteSink for Vec<Bytes> {
    async fn accept(&mut self, piece: Bytes) -> std::io::Result<()> {
        self.push(piece);
        Ok(())
    }
}

/// Where `put` takes its bytes from, one chunk at a time. Every chunk but the last is full-sized,
/// so the same content always cuts into the same chunks (and deduplicates).
trait ChunkSource: Send {
    /// The next chunk of at most `size` bytes; empty at the end of input.
    fn next_chunk(&mut self, size: usize) -> impl std::future::Future<Output = std::io::Result<Bytes>> + Send;
}

struct AsyncSource<R> {
    reader: R,
    /// The last chunk was full-sized: a big input, whose next chunk likely is too.
    full: bool,
    bufs: Arc<cairn_common::bufs::Bufs>,
}

impl<R: AsyncRead + Unpin + Send> ChunkSource for AsyncSource<R> {
    async fn next_chunk(&mut self, size: usize) -> std::io::Result<Bytes> {
        // A big input (the last chunk came out full) reads into a reused chunk-sized buffer.
        if self.full && size <= cairn_proto::MAX_CHUNK as usize {
            let mut buf = self.bufs.take();
            let mut filled = 0;
            while filled < size {
                match self.reader.read(&mut buf.buf[filled..size]).await? {
                    0 => break,
                    n => filled += n,
                }
            }
            self.full = filled == size;
            return Ok(buf.freeze(filled));
        }
        // Otherwise start small and grow: most inputs of a small-file workload are far below a
        // chunk, and a fresh chunk-sized buffer costs an mmap, page faults and an munmap.
        let mut buf = BytesMut::with_capacity(size.min(64 << 10));
        while buf.len() < size {
            if buf.len() == buf.capacity() {
                buf.reserve((buf.capacity() * 2).min(size) - buf.len());
            }
            let mut limited = (&mut self.reader).take((size - buf.len()) as u64);
            if limited.read_buf(&mut buf).await? == 0 {
                break;
            }
        }
        self.full = buf.len() == size;
        Ok(buf.freeze())
    }
}

/// Bytes already in memory: chunks are slices of them, without copies.
struct BytesSource(Bytes);

impl ChunkSource for BytesSource {
    async fn next_chunk(&mut self, size: usize) -> std::io::Result<Bytes> {
        let n = size.min(self.0.len());
        Ok(self.0.split_to(n))
    }
}

struct FileSource {
    file: Arc<std::fs::File>,
    offset: u64,
    /// The last chunk was full-sized: the file is big, and its next chunk likely is too.
    full: bool,
    bufs: Arc<cairn_common::bufs::Bufs>,
}

impl ChunkSource for FileSource {
    async fn next_chunk(&mut self, size: usize) -> std::io::Result<Bytes> {
        use std::os::unix::fs::FileExt;
        let (file, offset) = (self.file.clone(), self.offset);
        // A big file reads into reused chunk-sized buffers. A first chunk, or a small file, gets
        // a fresh buffer (only the pages it fills are touched), so that a tree of small files
        // put in parallel does not pin a whole chunk's memory per file.
        let mut buf = if self.full && size <= cairn_proto::MAX_CHUNK as usize {
            ReadBuf::Pooled(self.bufs.take())
        } else {
            ReadBuf::Fresh(vec![0u8; size])
        };
        let (buf, filled) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let dst = match &mut buf {
                ReadBuf::Pooled(p) => &mut p.buf[..size],
                ReadBuf::Fresh(v) => &mut v[..],
            };
            let mut filled = 0;
            while filled < size {
                match file.read_at(&mut dst[filled..], offset + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok((buf, filled))
        })
        .await
        .map_err(std::io::Error::other)??;
        self.offset += filled as u64;
        self.full = filled == size;
        Ok(match buf {
            ReadBuf::Pooled(p) => p.freeze(filled),
            ReadBuf::Fresh(mut v) => {
                v.truncate(filled);
                Bytes::from(v)
            }
        })
    }
}

/// A read buffer of [`FileSource`].
enum ReadBuf {
    Pooled(cairn_common::bufs::Pooled),
    Fresh(Vec<u8>),
}
