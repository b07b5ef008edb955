//! Multipart uploads. Each upload is a directory `/.s3-uploads/<id>/` holding an `upload` file
//! (empty; its extended attribute records bucket, key and metadata) and one file per part,
//! committed like any object. Completing an upload commits, at the key, the concatenation of
//! the parts' extent lists: no chunk is read or written again. Uploads left neither completed
//! nor aborted are removed once no new part arrived for `GatewayConfig::upload_expiry`.
//!
//! A completed upload leaves its record behind, marked completed with the object's ETag, for
//! at least [`COMPLETED_KEPT`]: a client that retries its CompleteMultipartUpload (its first
//! answer was lost) gets the same answer instead of NoSuchUpload, as from S3. To every other
//! operation a completed upload is gone.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_client::{Error, PutOptions};
use cairn_proto::v1::Extent;
use futures::StreamExt;
use s3s::crypto::{Checksum, Md5};
use s3s::dto::*;
use s3s::{s3_error, S3Result};

use crate::names::{self, ObjectMeta};
use crate::{internal, Gateway};

/// Where uploads in progress live (not a bucket: bucket names cannot start with '.').
const UPLOADS: &str = "/.s3-uploads";
const INFO: &str = "upload";
const INFO_XATTR: &str = "user.s3.upload";
/// On the record of a completed upload: the ETag of the object it made.
const COMPLETED_XATTR: &str = "user.s3.completed";
/// How long a completed upload's record answers a repeated CompleteMultipartUpload.
const COMPLETED_KEPT: Duration = Duration::from_secs(3600);
const MAX_PARTS: i32 = 10_000;
/// Every part but the last must be at least this big, as on AWS.
const MIN_PART: u64 = 5 << 20;
const OPEN_PARALLEL: usize = 16;

#[derive(serde::Serialize, serde::Deserialize)]
struct UploadInfo {
    bucket: String,
    key: String,
    meta: ObjectMeta,
}

fn upload_dir(id: &str) -> String {
    format!("{UPLOADS}/{id}")
}

fn part_name(n: i32) -> String {
    format!("part-{n:05}")
}

fn part_number(name: &str) -> Option<i32> {
    name.strip_prefix("part-")?.parse().ok()
}

/// An upload's record: what it is for, when it began (or, once completed, when it completed),
/// and the ETag of the object it made, once completed.
struct Record {
    info: UploadInfo,
    time_ns: i64,
    completed: Option<String>,
}

fn no_such_upload(id: &str) -> s3s::S3Error {
    s3_error!(NoSuchUpload, "no multipart upload {id} (completed, aborted, or never begun)")
}

impl Gateway {
    /// The upload `id` in progress, checked to be one for `bucket` and `key`.
    async fn load_upload(&self, bucket: &str, key: &str, id: &str) -> S3Result<(UploadInfo, i64)> {
        let (info, initiated) = self.read_upload(id).await?.ok_or_else(|| no_such_upload(id))?;
        if info.bucket != bucket || info.key != key {
            return Err(no_such_upload(id));
        }
        Ok((info, initiated))
    }

    /// The record of upload `id` in progress and when it began (None: no such upload, or one
    /// completed).
    async fn read_upload(&self, id: &str) -> S3Result<Option<(UploadInfo, i64)>> {
        Ok(self.read_record(id).await?.filter(|r| r.completed.is_none()).map(|r| (r.info, r.time_ns)))
    }

    /// The record of upload `id`, in progress or completed (None: no such upload).
    async fn read_record(&self, id: &str) -> S3Result<Option<Record>> {
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let f = match self.client.open_file(&format!("{}/{INFO}", upload_dir(id))).await {
            Ok(f) => f,
            Err(Error::NotFound(_) | Error::NotADirectory(_) | Error::IsADirectory(_)) => return Ok(None),
            Err(e) => return Err(internal(e)),
        };
        let Some(info) = f.xattrs.get(INFO_XATTR).and_then(|v| serde_json::from_slice(v).ok()) else {
            return Ok(None);
        };
        let completed = f.xattrs.get(COMPLETED_XATTR).map(|v| String::from_utf8_lossy(v).into_owned());
        Ok(Some(Record { info, time_ns: f.attr.map_or(0, |a| a.mtime_ns), completed }))
    }

    pub(crate) async fn create_upload(
        &self,
        mut i: CreateMultipartUploadInput,
    ) -> S3Result<CreateMultipartUploadOutput> {
        names::object_path(&i.bucket, &i.key)?;
        if i.key.ends_with('/') {
            return Err(s3_error!(InvalidArgument, "a key ending in '/' is a directory and takes no content"));
        }
        self.require_bucket(&i.bucket).await?;
        let id = hex::encode(rand::random::<[u8; 16]>());
        let meta = crate::objects::request_meta!(i);
        let info = UploadInfo { bucket: i.bucket.clone(), key: i.key.clone(), meta };
        let json = serde_json::to_vec(&info).map_err(|e| s3_error!(InternalError, "encode upload record: {e}"))?;
        self.client.mkdir(&upload_dir(&id), true).await.map_err(internal)?;
        let mut x = BTreeMap::new();
        x.insert(INFO_XATTR.to_string(), json);
        let path = format!("{}/{INFO}", upload_dir(&id));
        self.client.commit(&path, vec![], &self.put_options(), Some(x)).await.map_err(internal)?;
        Ok(CreateMultipartUploadOutput {
            bucket: Some(i.bucket),
            key: Some(i.key),
            upload_id: Some(id),
            ..Default::default()
        })
    }

    pub(crate) async fn put_part(&self, mut i: UploadPartInput) -> S3Result<UploadPartOutput> {
        let mut body = i.body.take();
        let r = self.put_part_body(i, &mut body).await;
        if r.is_err() {
            crate::objects::drain(body.take()).await;
        }
        r
    }

    async fn put_part_body(&self, i: UploadPartInput, body: &mut Option<StreamingBlob>) -> S3Result<UploadPartOutput> {
        if !(1..=MAX_PARTS).contains(&i.part_number) {
            return Err(s3_error!(InvalidArgument, "part number {} (1 to {MAX_PARTS})", i.part_number));
        }
        self.load_upload(&i.bucket, &i.key, &i.upload_id).await?;
        let stored = self.store_body(body.take(), i.content_length, i.content_md5.as_deref()).await?;
        let etag = self.commit_part(&i.upload_id, i.part_number, stored).await?;
        Ok(UploadPartOutput { e_tag: Some(ETag::Strong(etag)), ..Default::default() })
    }

    /// Commits a part's chunks as its file in the upload; returns its ETag.
    async fn commit_part(&self, upload: &str, part: i32, stored: crate::objects::Stored) -> S3Result<String> {
        let etag = hex::encode(stored.md5);
        let mut x = BTreeMap::new();
        x.insert(cairn_proto::ETAG_XATTR.to_string(), etag.as_bytes().to_vec());
        let path = format!("{}/{}", upload_dir(upload), part_name(part));
        match self.client.commit(&path, stored.extents, &self.put_options(), Some(x)).await {
            Ok(_) => {}
            Err(Error::NotFound(_)) => return Err(no_such_upload(upload)),
            Err(e) => return Err(internal(e)),
        }
        // A part that landed after the upload was completed (its completion removes the parts
        // it finds) belongs to nothing: take it back and answer as for a finished upload.
        if self.read_upload(upload).await?.is_none() {
            if let Err(e) = self.client.remove(&path, false).await {
                tracing::debug!("remove late part {path}: {e}");
            }
            return Err(no_such_upload(upload));
        }
        Ok(etag)
    }

    /// UploadPartCopy: a part made of (a range of) another object, read and stored again (a
    /// range need not fall on chunk boundaries, and the part's MD5 is its ETag).
    pub(crate) async fn put_part_copy(&self, i: UploadPartCopyInput) -> S3Result<UploadPartCopyOutput> {
        if !(1..=MAX_PARTS).contains(&i.part_number) {
            return Err(s3_error!(InvalidArgument, "part number {} (1 to {MAX_PARTS})", i.part_number));
        }
        self.load_upload(&i.bucket, &i.key, &i.upload_id).await?;
        let (sbucket, skey) = crate::objects::copy_source(&i.copy_source)?;
        let spath = names::object_path(&sbucket, &skey)?;
        let src = match self.client.open_file(&spath).await {
            Ok(f) if !skey.ends_with('/') => f,
            Ok(_) | Err(Error::NotFound(_) | Error::NotADirectory(_) | Error::IsADirectory(_)) => {
                return Err(self.no_such_key(&sbucket, &skey).await)
            }
            Err(e) => return Err(internal(e)),
        };
        let attr = src.attr.clone().unwrap_or_default();
        let conds = crate::objects::Conditions {
            if_match: i.copy_source_if_match.as_ref(),
            if_none_match: i.copy_source_if_none_match.as_ref(),
            if_modified_since: i.copy_source_if_modified_since.as_ref(),
            if_unmodified_since: i.copy_source_if_unmodified_since.as_ref(),
        };
        conds.check(&names::etag_of(&attr, &src.xattrs), &names::last_modified(&attr), false)?;
        let (start, end) = match &i.copy_source_range {
            Some(r) => {
                let r = Range::parse(r)
                    .map_err(|_| s3_error!(InvalidArgument, "x-amz-copy-source-range {r:?} is not bytes=FIRST-LAST"))?
                    .check(attr.size)?;
                (r.start, r.end)
            }
            None => (0, attr.size),
        };
        let body = self.stream(spath, src, start, end).await?;
        let stored = self.store_body(Some(body), Some((end - start) as i64), None).await?;
        let etag = self.commit_part(&i.upload_id, i.part_number, stored).await?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as i64;
        Ok(UploadPartCopyOutput {
            copy_part_result: Some(CopyPartResult {
                e_tag: Some(ETag::Strong(etag)),
                last_modified: Some(names::timestamp(now)),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    pub(crate) async fn complete_upload(
        &self,
        i: CompleteMultipartUploadInput,
    ) -> S3Result<CompleteMultipartUploadOutput> {
        let path = names::object_path(&i.bucket, &i.key)?;
        let exclusive = Self::write_conditions(i.if_match.as_ref(), i.if_none_match.as_ref())?;
        let wanted = i.multipart_upload.and_then(|m| m.parts).unwrap_or_default();
        if wanted.is_empty() {
            return Err(s3_error!(MalformedXML, "a multipart upload is completed with at least one part"));
        }
        let mut numbers = Vec::with_capacity(wanted.len());
        for p in &wanted {
            let n = p.part_number.ok_or_else(|| s3_error!(MalformedXML, "a part without a part number"))?;
            if numbers.last().is_some_and(|&last| n <= last) {
                return Err(s3_error!(InvalidPartOrder, "parts must be listed in ascending order"));
            }
            numbers.push(n);
        }
        let record = self.read_record(&i.upload_id).await?;
        let record = record.filter(|r| r.info.bucket == i.bucket && r.info.key == i.key);
        let info = match record {
            None => return Err(no_such_upload(&i.upload_id)),
            // A retry of a completion that went through: the same answer again.
            Some(Record { completed: Some(etag), .. }) => return Ok(completed_output(&i.bucket, &i.key, etag)),
            Some(r) => r.info,
        };
        let dir = upload_dir(&i.upload_id);
        let opened: Vec<_> = futures::stream::iter(numbers.clone())
            .map(|n| {
                let path = format!("{dir}/{}", part_name(n));
                let client = self.client.clone();
                async move { client.open_file(&path).await }
            })
            .buffered(OPEN_PARALLEL)
            .collect()
            .await;
        let mut extents: Vec<Extent> = Vec::new();
        let mut digests = Md5::new();
        let count = wanted.len();
        for (k, (p, file)) in wanted.iter().zip(opened).enumerate() {
            let n = p.part_number.unwrap_or_default();
            let file = match file {
                Ok(f) => f,
                Err(Error::NotFound(_)) => {
                    // Removed meanwhile by a completion of the same upload (this is a retry that
                    // overlapped it): its answer, then.
                    if let Some(Record { completed: Some(etag), .. }) = self.read_record(&i.upload_id).await? {
                        return Ok(completed_output(&i.bucket, &i.key, etag));
                    }
                    return Err(s3_error!(InvalidPart, "part {n} was not uploaded"));
                }
                Err(e) => return Err(internal(e)),
            };
            let attr = file.attr.clone().unwrap_or_default();
            let etag = names::etag_of(&attr, &file.xattrs);
            // The ETag is required, as on AWS: it is what proves the client saw this part's upload.
            match p.e_tag.as_ref() {
                None => return Err(s3_error!(InvalidPart, "part {n} is listed without its ETag")),
                Some(e) if e.value() != etag => {
                    return Err(s3_error!(InvalidPart, "part {n} has ETag {etag}, not the one given"))
                }
                Some(_) => {}
            }
            if k + 1 < count && attr.size < MIN_PART {
                return Err(s3_error!(
                    EntityTooSmall,
                    "part {n} is {} bytes; all but the last need {MIN_PART}",
                    attr.size
                ));
            }
            let md5 = hex::decode(&etag).map_err(|_| s3_error!(InvalidPart, "part {n} has no MD5 ETag"))?;
            digests.update(&md5);
            extents.extend(file.extents.into_iter().filter_map(|l| l.extent));
        }
        let etag = format!("{}-{count}", hex::encode(digests.finalize()));
        let xattrs = info.meta.to_xattrs(&etag);
        let opts = PutOptions { replication: self.cfg.replication, exclusive, ..Default::default() };
        self.commit_object(&i.bucket, &i.key, &path, extents, xattrs, opts).await?;
        // The object is committed. Should what follows fail, the upload is collected later
        // (parts and all), and a retry meanwhile completes it again with the same content.
        if let Err(e) = self.mark_completed(&i.upload_id, &info, &etag).await {
            tracing::warn!("record the completion of upload {dir}: {e}");
        }
        Ok(completed_output(&i.bucket, &i.key, etag))
    }

    /// Turns the record of upload `id` into that of a completed upload (one atomic commit), and
    /// starts removing its parts (a few at a time, after the answer: an upload may have
    /// thousands; any left behind go with the record).
    async fn mark_completed(&self, id: &str, info: &UploadInfo, etag: &str) -> Result<(), Error> {
        let dir = upload_dir(id);
        let json = serde_json::to_vec(info).map_err(|e| Error::Internal(format!("encode upload record: {e}")))?;
        let xattrs =
            BTreeMap::from([(INFO_XATTR.to_string(), json), (COMPLETED_XATTR.to_string(), etag.as_bytes().to_vec())]);
        self.client.commit(&format!("{dir}/{INFO}"), vec![], &self.put_options(), Some(xattrs)).await?;
        let client = self.client.clone();
        tokio::spawn(async move {
            let entries = match client.list(&dir).await {
                Ok((_, entries)) => entries,
                Err(e) => return tracing::debug!("list completed upload {dir}: {e}"),
            };
            futures::stream::iter(entries.into_iter().filter(|e| e.name != INFO))
                .for_each_concurrent(OPEN_PARALLEL, |e| {
                    let (client, path) = (client.clone(), format!("{dir}/{}", e.name));
                    async move {
                        if let Err(e) = client.remove(&path, false).await {
                            tracing::debug!("remove part {path} of a completed upload: {e}");
                        }
                    }
                })
                .await;
        });
        Ok(())
    }

    pub(crate) async fn abort_upload(&self, i: AbortMultipartUploadInput) -> S3Result<AbortMultipartUploadOutput> {
        self.load_upload(&i.bucket, &i.key, &i.upload_id).await?;
        match self.client.remove(&upload_dir(&i.upload_id), true).await {
            Ok(()) => Ok(AbortMultipartUploadOutput::default()),
            Err(Error::NotFound(_)) => Err(no_such_upload(&i.upload_id)),
            Err(e) => Err(internal(e)),
        }
    }

    pub(crate) async fn parts(&self, i: ListPartsInput) -> S3Result<ListPartsOutput> {
        self.load_upload(&i.bucket, &i.key, &i.upload_id).await?;
        let (_, entries) = match self.client.list_with(&upload_dir(&i.upload_id), true).await {
            Ok(r) => r,
            Err(Error::NotFound(_)) => return Err(no_such_upload(&i.upload_id)),
            Err(e) => return Err(internal(e)),
        };
        let marker = i.part_number_marker.unwrap_or(0);
        let max = i.max_parts.unwrap_or(1000).clamp(0, 1000) as usize;
        let mut parts: Vec<Part> = entries
            .into_iter()
            .filter_map(|e| {
                let n = part_number(&e.name)?;
                let attr = e.attr?;
                (n > marker).then(|| Part {
                    part_number: Some(n),
                    e_tag: Some(ETag::Strong(names::etag_of(&attr, &e.xattrs))),
                    size: Some(attr.size as i64),
                    last_modified: Some(names::last_modified(&attr)),
                    ..Default::default()
                })
            })
            .collect();
        parts.sort_by_key(|p| p.part_number);
        // max-parts=0 asks for nothing, as max-keys=0 does: no page follows.
        let truncated = max > 0 && parts.len() > max;
        parts.truncate(max);
        Ok(ListPartsOutput {
            bucket: Some(i.bucket),
            key: Some(i.key),
            upload_id: Some(i.upload_id),
            is_truncated: Some(truncated),
            next_part_number_marker: if truncated { parts.last().and_then(|p| p.part_number) } else { None },
            part_number_marker: i.part_number_marker,
            max_parts: Some(max as i32),
            owner: Some(names::owner()),
            storage_class: Some(StorageClass::from_static(StorageClass::STANDARD)),
            parts: Some(parts),
            ..Default::default()
        })
    }

    /// Every upload in progress with its record (uploads whose record is missing are skipped).
    async fn all_uploads(&self) -> S3Result<Vec<(String, UploadInfo, i64)>> {
        let entries = match self.client.list(UPLOADS).await {
            Ok((_, e)) => e,
            Err(Error::NotFound(_)) => return Ok(vec![]),
            Err(e) => return Err(internal(e)),
        };
        let found: Vec<_> = futures::stream::iter(entries)
            .map(|e| async move {
                let r = self.read_upload(&e.name).await;
                (e.name, r)
            })
            .buffered(OPEN_PARALLEL)
            .collect()
            .await;
        let mut out = Vec::new();
        for (id, r) in found {
            if let Some((info, t)) = r? {
                out.push((id, info, t));
            }
        }
        Ok(out)
    }

    pub(crate) async fn uploads(&self, i: ListMultipartUploadsInput) -> S3Result<ListMultipartUploadsOutput> {
        self.require_bucket(&i.bucket).await?;
        let prefix = i.prefix.clone().unwrap_or_default();
        let mut all: Vec<_> = self
            .all_uploads()
            .await?
            .into_iter()
            .filter(|(_, info, _)| info.bucket == i.bucket && info.key.starts_with(&prefix))
            .collect();
        // By key, then upload id (the order the id marker continues in).
        all.sort_by(|a, b| (&a.1.key, &a.0).cmp(&(&b.1.key, &b.0)));
        let key_marker = i.key_marker.clone().unwrap_or_default();
        let id_marker = i.upload_id_marker.clone();
        let max = i.max_uploads.unwrap_or(1000).clamp(0, 1000) as usize;
        let url = i.encoding_type.as_ref().is_some_and(|e| e.as_str() == EncodingType::URL);
        let delimiter = i.delimiter.clone().filter(|d| !d.is_empty());
        let mut uploads = Vec::new();
        let mut prefixes: Vec<String> = Vec::new();
        let mut truncated = false;
        let mut last: Option<(String, String)> = None;
        let mut past_marker = key_marker.is_empty();
        // max-uploads=0 asks for nothing, as max-keys=0 does: no page follows.
        let all = if max == 0 { Vec::new() } else { all };
        for (id, info, t) in all {
            if !past_marker {
                let after = match &id_marker {
                    Some(m) => info.key > key_marker || (info.key == key_marker && id.as_str() > m.as_str()),
                    None => info.key > key_marker,
                };
                if !after {
                    continue;
                }
                past_marker = true;
            }
            let rolled = delimiter.as_deref().and_then(|d| {
                info.key[prefix.len()..].find(d).map(|p| info.key[..prefix.len() + p + d.len()].to_string())
            });
            if let Some(cp) = rolled {
                if prefixes.last() == Some(&cp) || (!key_marker.is_empty() && cp <= key_marker) {
                    continue;
                }
                if uploads.len() + prefixes.len() == max {
                    truncated = true;
                    break;
                }
                last = Some((cp.clone(), String::new()));
                prefixes.push(cp);
                continue;
            }
            if uploads.len() + prefixes.len() == max {
                truncated = true;
                break;
            }
            last = Some((info.key.clone(), id.clone()));
            uploads.push(MultipartUpload {
                key: Some(encode(&info.key, url)),
                upload_id: Some(id),
                initiated: Some(names::timestamp(t)),
                owner: Some(names::owner()),
                initiator: Some(Initiator { display_name: Some("cairn".into()), id: Some("cairn".into()) }),
                storage_class: Some(StorageClass::from_static(StorageClass::STANDARD)),
                ..Default::default()
            });
        }
        let (next_key, next_id) = match last.filter(|_| truncated) {
            Some((k, id)) => (Some(encode(&k, url)), (!id.is_empty()).then_some(id)),
            None => (None, None),
        };
        Ok(ListMultipartUploadsOutput {
            bucket: Some(i.bucket),
            prefix: Some(encode(&prefix, url)),
            delimiter: i.delimiter,
            key_marker: i.key_marker,
            upload_id_marker: i.upload_id_marker,
            next_key_marker: next_key,
            next_upload_id_marker: next_id,
            max_uploads: Some(max as i32),
            is_truncated: Some(truncated),
            encoding_type: i.encoding_type,
            common_prefixes: Some(
                prefixes.into_iter().map(|p| CommonPrefix { prefix: Some(encode(&p, url)) }).collect(),
            ),
            uploads: Some(uploads),
            ..Default::default()
        })
    }
}

fn completed_output(bucket: &str, key: &str, etag: String) -> CompleteMultipartUploadOutput {
    CompleteMultipartUploadOutput {
        bucket: Some(bucket.to_string()),
        key: Some(key.to_string()),
        e_tag: Some(ETag::Strong(etag)),
        location: Some(format!("/{bucket}/{key}")),
        ..Default::default()
    }
}

fn encode(s: &str, url: bool) -> String {
    names::encode_key(s, url)
}

/// Removes uploads idle (no new part) for longer than the configured expiry, records of completed uploads after
/// [`COMPLETED_KEPT`] (or the expiry, if shorter), and upload directories that never got their
/// record (a create that failed midway) once they are an hour old. Runs for the life of
/// the gateway; several gateways doing the same is harmless.
pub(crate) async fn collect_abandoned(g: Gateway) {
    let expiry = g.cfg.upload_expiry;
    let every = (expiry / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        tokio::time::sleep(every).await;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as i64;
        let entries = match g.client.list(UPLOADS).await {
            Ok((_, e)) => e,
            Err(Error::NotFound(_)) => continue,
            Err(e) => {
                tracing::warn!("list multipart uploads: {e}");
                continue;
            }
        };
        for e in entries {
            let age_of = |t: i64| Duration::from_nanos(now.saturating_sub(t).max(0) as u64);
            let expired = match g.read_record(&e.name).await {
                Ok(Some(Record { completed: Some(_), time_ns, .. })) => age_of(time_ns) > COMPLETED_KEPT.min(expiry),
                // Idle since it began or since its last new part (an entry in the upload's
                // directory): an upload still receiving parts is kept however long it takes.
                Ok(Some(Record { time_ns: initiated, .. })) => {
                    age_of(e.attr.as_ref().map_or(initiated, |a| a.mtime_ns.max(initiated))) > expiry
                }
                Ok(None) => e.attr.as_ref().is_some_and(|a| age_of(a.mtime_ns) > Duration::from_secs(3600)),
                Err(_) => false,
            };
            if expired {
                match g.client.remove(&upload_dir(&e.name), true).await {
                    Ok(()) => tracing::info!(upload = %e.name, "removed an abandoned multipart upload"),
                    Err(err) => tracing::warn!(upload = %e.name, "remove abandoned upload: {err}"),
                }
            }
        }
    }
}
