//! Object operations: PUT (streamed, MD5 checked), GET and HEAD (ranges, conditions), DELETE,
//! multi-object DELETE and COPY (metadata-only: the copy references the same chunks).

use std::collections::BTreeMap;

use base64::Engine;
use cairn_client::{parent_of, Error, PutOptions};
use cairn_proto::v1::{Attr, Extent};
use futures::StreamExt;
use s3s::crypto::{Checksum, Md5};
use s3s::dto::*;
use s3s::{s3_error, S3Error, S3ErrorCode, S3Request, S3Response, S3Result};

use crate::names::{self, ObjectMeta, EMPTY_MD5};
use crate::{internal, Gateway};

/// The conditions of a read request: GetObject and HeadObject have the same fields.
macro_rules! conditions {
    ($i:expr) => {
        Conditions {
            if_match: $i.if_match.as_ref(),
            if_none_match: $i.if_none_match.as_ref(),
            if_modified_since: $i.if_modified_since.as_ref(),
            if_unmodified_since: $i.if_unmodified_since.as_ref(),
        }
    };
}

/// The metadata a write request carries: PutObject, CopyObject (with REPLACE) and
/// CreateMultipartUpload have the same fields.
macro_rules! request_meta {
    ($i:expr) => {
        $crate::names::ObjectMeta::new(
            $i.content_type.take(),
            [
                $i.cache_control.take(),
                $i.content_disposition.take(),
                $i.content_encoding.take(),
                $i.content_language.take(),
            ],
            $i.metadata.take(),
        )
    };
}
pub(crate) use request_meta;

/// The largest object one PUT (or one part) may carry, as on AWS.
pub const MAX_PUT: u64 = 5 << 30;
/// Objects deleted at once by one DeleteObjects request.
const DELETE_PARALLEL: usize = 16;
/// GETs of at most this many bytes read them whole before answering (no task, no channel, one
/// write of headers and body); longer ones stream.
const READ_WHOLE_MAX: u64 = 1 << 20;

/// An object opened for reading: the file as of the open, the byte range to send, and the
/// response headers (as HEAD answers them).
struct Opened {
    file: cairn_proto::v1::OpenFileResponse,
    start: u64,
    end: u64,
    head: HeadObjectOutput,
}

/// The content of a request body, stored as chunks but not yet committed anywhere.
pub struct Stored {
    pub extents: Vec<Extent>,
    pub md5: [u8; 16],
    pub size: u64,
}

impl Gateway {
    pub(crate) fn put_options(&self) -> PutOptions {
        PutOptions { replication: self.cfg.replication, ..Default::default() }
    }

    /// Streams a request body into chunks, hashing it (MD5) on the way, and checks it against
    /// the client's Content-MD5. A body that fails (a bad signature chunk, a disconnect) or whose
    /// digest differs stores nothing that anyone will see.
    pub(crate) async fn store_body(
        &self,
        body: Option<StreamingBlob>,
        length: Option<i64>,
        content_md5: Option<&str>,
    ) -> S3Result<Stored> {
        let want = match content_md5 {
            Some(b64) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .ok()
                    .and_then(|d| <[u8; 16]>::try_from(d).ok())
                    .ok_or_else(|| s3_error!(InvalidDigest, "Content-MD5 is not the base64 of 16 bytes"))?,
            ),
            None => None,
        };
        if length.is_some_and(|l| l as u64 > MAX_PUT) {
            return Err(s3_error!(EntityTooLarge, "at most {MAX_PUT} bytes per PUT; use a multipart upload"));
        }
        // MD5 as the bytes pass (HTTP frames of some KiB each). It is the costliest step of a PUT
        // (about 600 MB/s per core), but a thread per request would let many slow uploads take
        // every blocking thread, which the chunk hashing needs too.
        let mut md5 = Md5::new();
        let mut size = 0u64;
        let extents = match body {
            None => vec![],
            Some(body) => {
                let hashing = Hashing { body, md5: &mut md5, size: &mut size };
                let reader = tokio_util::io::StreamReader::new(hashing);
                match self.client.upload_stream(reader, &self.put_options(), &|_| {}).await {
                    Ok(e) => e,
                    Err(Error::Io { source, .. }) => return Err(body_error(source)),
                    Err(e) => return Err(internal(e)),
                }
            }
        };
        let md5 = md5.finalize();
        if size > MAX_PUT {
            return Err(s3_error!(EntityTooLarge, "at most {MAX_PUT} bytes per PUT; use a multipart upload"));
        }
        if let Some(l) = length {
            if l as u64 != size {
                return Err(s3_error!(IncompleteBody, "{size} bytes received, {l} announced"));
            }
        }
        if want.is_some_and(|w| w != md5) {
            return Err(s3_error!(BadDigest, "the Content-MD5 you specified did not match what was received"));
        }
        Ok(Stored { extents, md5, size })
    }

    /// Commits `extents` with `xattrs` at the path of `key`, making the directories the key
    /// names on the way (as S3 has no directories to make first).
    pub(crate) async fn commit_object(
        &self,
        bucket: &str,
        key: &str,
        path: &str,
        extents: Vec<Extent>,
        xattrs: BTreeMap<String, Vec<u8>>,
        opts: PutOptions,
    ) -> S3Result<Attr> {
        let exclusive = opts.exclusive;
        // A delete emptying the directory may remove it between the mkdir and the commit: try
        // again a few times.
        for _ in 0..3 {
            match self.client.commit(path, extents.clone(), &opts, Some(xattrs.clone())).await {
                Ok(a) => return Ok(a),
                Err(Error::NotFound(_)) => {}
                Err(Error::AlreadyExists(_)) if exclusive => {
                    return Err(s3_error!(PreconditionFailed, "If-None-Match: * and the object exists"))
                }
                Err(e) => return Err(key_error(e, key)),
            }
            self.require_bucket(bucket).await?;
            self.client.mkdir(parent_of(path), true).await.map_err(|e| key_error(e, key))?;
        }
        Err(s3_error!(SlowDown, "the directories of key {key} keep being removed; try again"))
    }

    /// Refuses conditional writes but the one supported (`If-None-Match: *`, create only), which
    /// it returns as `exclusive`.
    pub(crate) fn write_conditions(
        if_match: Option<&ETagCondition>,
        if_none_match: Option<&ETagCondition>,
    ) -> S3Result<bool> {
        if if_match.is_some() || if_none_match.is_some_and(|c| !c.is_any()) {
            return Err(s3_error!(NotImplemented, "conditional writes other than If-None-Match: *"));
        }
        Ok(if_none_match.is_some())
    }

    pub(crate) async fn put(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        let mut i = req.input;
        let mut body = i.body.take();
        let r = self.put_body(i, &mut body).await;
        if r.is_err() {
            drain(body.take()).await;
        }
        r
    }

    async fn put_body(
        &self,
        mut i: PutObjectInput,
        body: &mut Option<StreamingBlob>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let path = names::object_path(&i.bucket, &i.key)?;
        if i.key.ends_with('/') {
            // A "folder" marker, as consoles and some tools make: a directory.
            let stored = self.store_body(body.take(), i.content_length, i.content_md5.as_deref()).await?;
            if stored.size != 0 {
                return Err(s3_error!(InvalidArgument, "a key ending in '/' is a directory and takes no content"));
            }
            self.require_bucket(&i.bucket).await?;
            self.client.mkdir(&path, true).await.map_err(|e| key_error(e, &i.key))?;
            return Ok(S3Response::new(PutObjectOutput {
                e_tag: Some(ETag::Strong(EMPTY_MD5.into())),
                ..Default::default()
            }));
        }
        let meta = request_meta!(i);
        let exclusive = Self::write_conditions(i.if_match.as_ref(), i.if_none_match.as_ref())?;
        let stored = self.store_body(body.take(), i.content_length, i.content_md5.as_deref()).await?;
        let etag = hex::encode(stored.md5);
        let xattrs = meta.to_xattrs(&etag);
        let opts = PutOptions { replication: self.cfg.replication, exclusive, ..Default::default() };
        self.commit_object(&i.bucket, &i.key, &path, stored.extents, xattrs, opts).await?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(ETag::Strong(etag)),
            size: Some(stored.size as i64),
            ..Default::default()
        }))
    }

    /// An object for GET or HEAD: opened, its conditions checked, its range resolved.
    async fn open_object(
        &self,
        bucket: &str,
        key: &str,
        conds: Conditions<'_>,
        range: Option<&Range>,
    ) -> S3Result<(String, Opened)> {
        let path = names::object_path(bucket, key)?;
        let file = if key.ends_with('/') {
            // A directory reads as an empty "folder" object; a file does not answer to "name/".
            match self.client.stat(&path).await {
                Ok(a) if names::is_dir(&a) => cairn_proto::v1::OpenFileResponse {
                    attr: Some(cairn_proto::v1::Attr { size: 0, ..a }),
                    ..Default::default()
                },
                Ok(_) | Err(Error::NotFound(_) | Error::NotADirectory(_)) => {
                    return Err(self.no_such_key(bucket, key).await)
                }
                Err(e) => return Err(internal(e)),
            }
        } else {
            match self.client.open_file(&path).await {
                Ok(f) => f,
                Err(Error::NotFound(_) | Error::NotADirectory(_) | Error::IsADirectory(_)) => {
                    return Err(self.no_such_key(bucket, key).await)
                }
                Err(e) => return Err(internal(e)),
            }
        };
        let attr = file.attr.clone().unwrap_or_default();
        let etag = names::etag_of(&attr, &file.xattrs);
        conds.check(&etag, &names::last_modified(&attr), true)?;
        let (start, end) = match range {
            Some(r) => {
                let r = r.check(attr.size)?;
                // A suffix range of an empty object selects nothing: 416, as other ranges of it.
                if r.end <= r.start {
                    return Err(s3_error!(InvalidRange, "the range selects no byte of a {}-byte object", attr.size));
                }
                (r.start, r.end)
            }
            None => (0, attr.size),
        };
        let head = HeadObjectOutput {
            content_length: Some((end - start) as i64),
            content_range: range.map(|_| format!("bytes {}-{}/{}", start, end.max(1) - 1, attr.size)),
            accept_ranges: Some("bytes".into()),
            e_tag: Some(ETag::Strong(etag)),
            last_modified: Some(names::last_modified(&attr)),
            ..ObjectMeta::from_xattrs(&file.xattrs).head()
        };
        Ok((path, Opened { file, start, end, head }))
    }

    pub(crate) async fn get(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        let i = req.input;
        let conds = conditions!(i);
        let (path, Opened { file, start, end, head: h }) =
            self.open_object(&i.bucket, &i.key, conds, i.range.as_ref()).await?;
        let body = if end - start <= READ_WHOLE_MAX {
            self.read_whole(&path, file, start, end).await?
        } else {
            self.stream(path, file, start, end).await?
        };
        Ok(S3Response::new(GetObjectOutput {
            body: Some(body),
            content_length: h.content_length,
            content_range: h.content_range,
            accept_ranges: h.accept_ranges,
            e_tag: h.e_tag,
            last_modified: h.last_modified,
            content_type: h.content_type,
            cache_control: h.cache_control,
            content_disposition: h.content_disposition,
            content_encoding: h.content_encoding,
            content_language: h.content_language,
            metadata: h.metadata,
            ..Default::default()
        }))
    }

    /// Bytes `[start, end)` of an opened file, read before the answer starts: the answer then
    /// leaves with its headers, and a failed read is an S3 error instead of a body cut short.
    async fn read_whole(
        &self,
        path: &str,
        file: cairn_proto::v1::OpenFileResponse,
        start: u64,
        end: u64,
    ) -> S3Result<StreamingBlob> {
        let mut pieces: Vec<bytes::Bytes> = Vec::new();
        self.client.get_opened(path, file, &mut pieces, start, Some(end - start), &|_| {}).await.map_err(read_error)?;
        let whole = if pieces.len() == 1 { pieces.swap_remove(0) } else { pieces.concat().into() };
        Ok(StreamingBlob::from(s3s::Body::from(whole)))
    }

    /// Bytes `[start, end)` of an opened file as a body: verified chunks go out as they arrive,
    /// without copies, a few in flight. The first piece is read before the answer starts, so a
    /// file none of whose replicas can be read is an S3 error (ServiceUnavailable, or NoSuchKey
    /// if it was deleted meanwhile); a read that fails later ends the body short (the receiver
    /// sees fewer bytes than announced), as from S3.
    pub(crate) async fn stream(
        &self,
        path: String,
        file: cairn_proto::v1::OpenFileResponse,
        start: u64,
        end: u64,
    ) -> S3Result<StreamingBlob> {
        if start >= end {
            return Ok(StreamingBlob::from(s3s::Body::from(bytes::Bytes::new())));
        }
        let (mut tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let client = self.client.clone();
        tokio::spawn(async move {
            let res = client.get_opened(&path, file, &mut tx, start, Some(end - start), &|_| {}).await;
            if let Err(e) = &res {
                tracing::warn!("read {path}: {e}");
            }
            let _ = done_tx.send(res);
        });
        let Some(first) = rx.recv().await else {
            return Err(match done_rx.await {
                Ok(Err(e)) => read_error(e),
                Ok(Ok(_)) | Err(_) => s3_error!(InternalError, "the read ended before its first byte"),
            });
        };
        let rest =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx)) },
            );
        Ok(StreamingBlob::wrap(futures::stream::once(async move { Ok(first) }).chain(rest)))
    }

    pub(crate) async fn head(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        let i = req.input;
        let conds = conditions!(i);
        let (_, opened) = self.open_object(&i.bucket, &i.key, conds, i.range.as_ref()).await?;
        Ok(S3Response::new(opened.head))
    }

    /// Deletes one object (a missing one is no error, as in S3, unless its bucket is missing
    /// too and `check_bucket` asks), then the directories its key made that are empty now, so
    /// that no empty "folder" lingers in listings.
    pub(crate) async fn delete(&self, bucket: &str, key: &str, check_bucket: bool) -> S3Result<()> {
        let path = names::object_path(bucket, key)?;
        // "name/" deletes a directory (when empty), "name" a file: never the other one.
        match self.client.stat(&path).await {
            Ok(a) if names::is_dir(&a) == key.ends_with('/') => {}
            Ok(_) => return Ok(()),
            Err(Error::NotFound(_) | Error::NotADirectory(_)) if check_bucket => {
                return self.require_bucket(bucket).await
            }
            Err(Error::NotFound(_) | Error::NotADirectory(_)) => return Ok(()),
            Err(e) => return Err(internal(e)),
        }
        match self.client.remove(&path, false).await {
            Ok(()) => {}
            Err(Error::NotFound(_) | Error::NotADirectory(_)) => return Ok(()),
            // A key ending in '/' names a directory: only an empty one goes.
            Err(Error::NotEmpty(_)) => return Ok(()),
            Err(e) => return Err(internal(e)),
        }
        let top = names::bucket_path(bucket);
        let mut dir = parent_of(&path).to_string();
        while dir != top && dir.len() > top.len() {
            match self.client.is_empty_dir(&dir).await {
                Ok(true) => match self.client.remove(&dir, false).await {
                    Ok(()) => {}
                    // Someone wrote into it meanwhile, or removed it: either way, done.
                    Err(_) => break,
                },
                _ => break,
            }
            dir = parent_of(&dir).to_string();
        }
        Ok(())
    }

    pub(crate) async fn delete_many(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let i = req.input;
        self.require_bucket(&i.bucket).await?;
        if i.delete.objects.len() > 1000 {
            return Err(s3_error!(MalformedXML, "at most 1000 keys per DeleteObjects request"));
        }
        let quiet = i.delete.quiet.unwrap_or(false);
        let results: Vec<(String, S3Result<()>)> = futures::stream::iter(i.delete.objects)
            .map(|o| {
                let bucket = i.bucket.clone();
                async move {
                    let r = self.delete(&bucket, &o.key, false).await;
                    (o.key, r)
                }
            })
            .buffered(DELETE_PARALLEL)
            .collect()
            .await;
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for (key, r) in results {
            match r {
                Ok(()) if quiet => {}
                Ok(()) => deleted.push(DeletedObject { key: Some(key), ..Default::default() }),
                Err(e) => errors.push(s3s::dto::Error {
                    code: Some(e.code().as_str().to_string()),
                    key: Some(key),
                    message: e.message().map(str::to_string),
                    version_id: None,
                }),
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput { deleted: Some(deleted), errors: Some(errors), ..Default::default() }))
    }

    /// CopyObject: the destination references the source's chunks (nothing is read or
    /// written but metadata). The ETag stays, as the content is the same.
    pub(crate) async fn copy(&self, req: S3Request<CopyObjectInput>) -> S3Result<S3Response<CopyObjectOutput>> {
        let mut i = req.input;
        let (sbucket, skey) = copy_source(&i.copy_source)?;
        let spath = names::object_path(&sbucket, &skey)?;
        if skey.ends_with('/') || i.key.ends_with('/') {
            return Err(s3_error!(InvalidArgument, "a key ending in '/' is a directory; directories are not copied"));
        }
        let dpath = names::object_path(&i.bucket, &i.key)?;
        let src = match self.client.open_file(&spath).await {
            Ok(f) => f,
            Err(Error::NotFound(_) | Error::NotADirectory(_) | Error::IsADirectory(_)) => {
                return Err(self.no_such_key(&sbucket, &skey).await)
            }
            Err(e) => return Err(internal(e)),
        };
        let attr = src.attr.clone().unwrap_or_default();
        let etag = names::etag_of(&attr, &src.xattrs);
        let conds = Conditions {
            if_match: i.copy_source_if_match.as_ref(),
            if_none_match: i.copy_source_if_none_match.as_ref(),
            if_modified_since: i.copy_source_if_modified_since.as_ref(),
            if_unmodified_since: i.copy_source_if_unmodified_since.as_ref(),
        };
        conds.check(&etag, &names::last_modified(&attr), false)?;
        let replace = i.metadata_directive.as_ref().is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        if spath == dpath && !replace {
            return Err(s3_error!(
                InvalidRequest,
                "This copy request is illegal because it is trying to copy an object to itself without changing the object's metadata"
            ));
        }
        let meta = if replace { request_meta!(i) } else { ObjectMeta::from_xattrs(&src.xattrs) };
        let extents: Vec<Extent> = src.extents.into_iter().filter_map(|l| l.extent).collect();
        let replication = if attr.replication == 0 { self.cfg.replication } else { attr.replication };
        let opts = PutOptions { replication, ..Default::default() };
        let new = self.commit_object(&i.bucket, &i.key, &dpath, extents, meta.to_xattrs(&etag), opts).await?;
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(ETag::Strong(etag)),
                last_modified: Some(names::last_modified(&new)),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

/// A request body as a stream of I/O results, hashed and counted on the way.
struct Hashing<'a> {
    body: StreamingBlob,
    md5: &'a mut Md5,
    size: &'a mut u64,
}

impl futures::Stream for Hashing<'_> {
    type Item = std::io::Result<bytes::Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.body.poll_next_unpin(cx) {
            std::task::Poll::Ready(Some(Ok(b))) => {
                this.md5.update(&b);
                *this.size += b.len() as u64;
                std::task::Poll::Ready(Some(Ok(b)))
            }
            std::task::Poll::Ready(Some(Err(e))) => std::task::Poll::Ready(Some(Err(std::io::Error::other(e)))),
            std::task::Poll::Ready(None) => std::task::Poll::Ready(None),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

/// Bytes of a refused request's body read and dropped, so that the connection stays usable (an
/// unread body would have to be skipped by closing it). Beyond this, it is closed.
const DRAIN_MAX: usize = 16 << 20;

/// Reads and drops what is left of a request body (up to [`DRAIN_MAX`]).
pub(crate) async fn drain(body: Option<StreamingBlob>) {
    let Some(mut body) = body else { return };
    let mut n = 0;
    while let Some(Ok(piece)) = body.next().await {
        n += piece.len();
        if n > DRAIN_MAX {
            return;
        }
    }
}

/// The bucket and key a copy reads from.
pub(crate) fn copy_source(c: &CopySource) -> S3Result<(String, String)> {
    match c {
        CopySource::Bucket { bucket, key, version_id: None } => Ok((bucket.to_string(), key.to_string())),
        CopySource::Bucket { .. } => Err(s3_error!(InvalidArgument, "object versions are not kept")),
        _ => Err(s3_error!(NotImplemented, "access point and outpost copy sources")),
    }
}

/// An error from reading a request body: the signature or hash failure s3s found, when it was
/// one, else an incomplete body.
fn body_error(e: std::io::Error) -> S3Error {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<S3Error>()) {
        Some(s3) => {
            let mut out = S3Error::new(s3.code().clone());
            if let Some(m) = s3.message() {
                out.set_message(m.to_string());
            }
            out
        }
        None => s3_error!(IncompleteBody, "reading the request body failed: {e}"),
    }
}

/// A namespace error on the way to storing `key`, in S3 terms: a key that runs into an object
/// where it needs a directory (or the other way round) cannot be stored.
fn key_error(e: Error, key: &str) -> S3Error {
    match e {
        Error::NotADirectory(_) | Error::IsADirectory(_) | Error::AlreadyExists(_) => S3Error::with_message(
            S3ErrorCode::InvalidArgument,
            format!("key {key:?} conflicts with an existing object or prefix (an object cannot also be a prefix of other keys)"),
        ),
        e => internal(e),
    }
}

/// Conditional request headers, evaluated as RFC 7232 and S3 do.
pub(crate) struct Conditions<'a> {
    pub if_match: Option<&'a ETagCondition>,
    pub if_none_match: Option<&'a ETagCondition>,
    pub if_modified_since: Option<&'a Timestamp>,
    pub if_unmodified_since: Option<&'a Timestamp>,
}

impl Conditions<'_> {
    /// `read`: a GET or HEAD, where a failed If-None-Match or If-Modified-Since means 304 Not
    /// Modified (for a copy source it is 412 like the others).
    pub fn check(&self, etag: &str, modified: &Timestamp, read: bool) -> S3Result<()> {
        // If-Match compares strongly (a weak ETag never matches), If-None-Match weakly.
        let matches = |c: &ETagCondition, strong: bool| match c {
            ETagCondition::Any => true,
            ETagCondition::ETag(e) => e.value() == etag && (!strong || e.as_strong().is_some()),
        };
        let not_modified = || {
            if read {
                S3Error::new(S3ErrorCode::NotModified)
            } else {
                s3_error!(PreconditionFailed, "the copy source was not modified")
            }
        };
        if let Some(c) = self.if_match {
            if !matches(c, true) {
                return Err(s3_error!(PreconditionFailed, "If-Match: the ETag is {etag}"));
            }
        } else if let Some(t) = self.if_unmodified_since {
            if modified > t {
                return Err(s3_error!(PreconditionFailed, "modified since the If-Unmodified-Since time"));
            }
        }
        if let Some(c) = self.if_none_match {
            if matches(c, false) {
                return Err(not_modified());
            }
        } else if let Some(t) = self.if_modified_since {
            if modified <= t {
                return Err(not_modified());
            }
        }
        Ok(())
    }
}

/// A failed read of an opened object as an S3 error: NoSuchKey if it was deleted while the read
/// waited for its chunks' locations.
fn read_error(e: Error) -> S3Error {
    match e {
        Error::NotFound(_) => s3_error!(NoSuchKey),
        e => internal(e),
    }
}
