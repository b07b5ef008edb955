//! The S3 gateway: Cairn's namespace over the S3 API, on the client library (s3s does the HTTP,
//! XML and signature work).
//!
//! Buckets are the top-level directories, and a key is a path under its bucket: an object PUT
//! here is a file on every mount, and a file written on a mount is an object here. Object
//! metadata (ETag, content type, `x-amz-meta-*`) lives in the file's extended attributes and is
//! committed in the same atomic step as the content. Multipart uploads keep their parts as files
//! under `/.s3-uploads/<upload id>/`; completing one commits the concatenation of the parts'
//! extents (no data is copied). Requests are authenticated with AWS Signature V4 against access
//! keys kept in the replicated namespace (`cairn admin key`).

mod list;
mod multipart;
mod names;
mod objects;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_client::{Client, Error};
use s3s::auth::{S3Auth, SecretKey};
use s3s::dto::*;
use s3s::{s3_error, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, S3};

/// How the gateway stores and serves objects.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Replicas of each chunk of an object written here.
    pub replication: u32,
    /// Multipart uploads neither completed nor aborted are removed after this long without a
    /// new part.
    pub upload_expiry: Duration,
    /// Base domain for virtual-hosted-style requests (`bucket.DOMAIN`); path style always works.
    pub domain: Option<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig { replication: 3, upload_expiry: Duration::from_secs(7 * 24 * 3600), domain: None }
    }
}

/// The S3 operations, over one cluster connection.
#[derive(Clone)]
pub struct Gateway {
    client: Client,
    cfg: Arc<GatewayConfig>,
}

/// Serves S3 on `listener` until `shutdown` resolves, then lets requests in flight finish (for a
/// bounded time). Abandoned multipart uploads are collected in the background meanwhile.
pub async fn serve(
    client: Client,
    listener: tokio::net::TcpListener,
    cfg: GatewayConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let gateway = Gateway { client: client.clone(), cfg: Arc::new(cfg.clone()) };
    let collector = tokio::spawn(multipart::collect_abandoned(gateway.clone()));
    let service = {
        let mut b = s3s::service::S3ServiceBuilder::new(gateway);
        b.set_auth(KeyAuth { client, cache: Mutex::new(HashMap::new()) });
        b.set_access(SigV4Only);
        // POST uploads (browser forms) are not served (see `post_object`): s3s would read a
        // form's whole file into memory before any signature check.
        let mut config = s3s::config::S3Config::default();
        config.post_object_max_file_size = 0;
        b.set_config(Arc::new(s3s::config::StaticConfigProvider::new(Arc::new(config))));
        if let Some(d) = &cfg.domain {
            anyhow::ensure!(!d.is_empty() && !d.contains(':') && !d.contains('/'), "--domain {d}: a bare DNS name");
            b.set_host(VirtualHosts { domain: d.to_ascii_lowercase() });
        }
        b.build()
    };
    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client that opens a connection and sends nothing (or half a header) is dropped.
    http.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors, typically: back off instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.as_mut() => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = http.serve_connection(TokioIo::new(stream), service.clone());
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection: {e}");
            }
        });
    }
    collector.abort();
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(30)) => tracing::warn!("requests still running after 30 s; stopping"),
    }
    Ok(())
}

/// Virtual-hosted-style requests (`BUCKET.DOMAIN[:port]`) beside path-style ones (any other
/// host: an IP address, `localhost`, `DOMAIN` itself).
struct VirtualHosts {
    domain: String,
}

impl s3s::host::S3Host for VirtualHosts {
    fn parse_host_header<'a>(&'a self, host: &'a str) -> S3Result<s3s::host::VirtualHost<'a>> {
        let name =
            host.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h);
        let bucket =
            name.strip_suffix(self.domain.as_str()).and_then(|b| b.strip_suffix('.')).filter(|b| !b.is_empty());
        let vh = s3s::host::VirtualHost::new(self.domain.as_str());
        Ok(match bucket {
            Some(b) => vh.with_bucket(b),
            None => vh,
        })
    }
}

/// How long a looked-up key (or its absence) is trusted: a deleted key stops working within this.
const KEY_CACHE_TTL: Duration = Duration::from_secs(10);
/// Keys remembered at most (unknown ids that clients send included).
const KEY_CACHE_MAX: usize = 10_000;
/// Longest a presigned URL may be valid, as on AWS (7 days).
const PRESIGNED_MAX_S: u64 = 7 * 24 * 3600;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Admits signed requests only; no Signature V2 headers (s3s accepts them, but they carry no
/// time that is checked: a captured one could be replayed for ever). Presigned URLs, V4 or V2
/// (boto3 still presigns with V2 by default; those carry an expiry time s3s checks), may be
/// valid for at most 7 days.
struct SigV4Only;

#[async_trait::async_trait]
impl s3s::access::S3Access for SigV4Only {
    async fn check(&self, cx: &mut s3s::access::S3AccessContext<'_>) -> S3Result<()> {
        let auth = cx.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        let query = cx.uri().query().unwrap_or("");
        // Names compare decoded, as s3s reads and signs them (`X-Amz-Expire%73` is `X-Amz-Expires`).
        let param = |name: &str| {
            query.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                let k = percent_encoding::percent_decode_str(&k.replace('+', " ")).decode_utf8_lossy().into_owned();
                (k == name).then(|| percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned())
            })
        };
        if auth.starts_with("AWS ") {
            return Err(s3_error!(AccessDenied, "Signature Version 2 headers are not accepted; sign with Version 4"));
        }
        if let Some(expires) = param("X-Amz-Expires") {
            if expires.parse::<u64>().map_or(true, |e| e > PRESIGNED_MAX_S) {
                return Err(s3_error!(
                    AuthorizationQueryParametersError,
                    "X-Amz-Expires must be at most 604800 seconds"
                ));
            }
        }
        if let (Some(_), Some(expires)) = (param("AWSAccessKeyId"), param("Expires")) {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
            if expires.parse::<u64>().map_or(true, |e| e > now + PRESIGNED_MAX_S) {
                return Err(s3_error!(AccessDenied, "a presigned URL may be valid for at most 7 days"));
            }
        }
        match cx.credentials() {
            Some(_) => Ok(()),
            None => Err(s3_error!(AccessDenied, "Signature is required")),
        }
    }
}

/// Secret keys for signature checks, from the masters, cached briefly.
struct KeyAuth {
    client: Client,
    cache: Mutex<HashMap<String, (Instant, Option<SecretKey>)>>,
}

#[async_trait::async_trait]
impl S3Auth for KeyAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.get(access_key).filter(|(at, _)| at.elapsed() < KEY_CACHE_TTL).map(|(_, k)| k.clone())
        };
        let key = match cached {
            Some(k) => k,
            None => {
                let k = match self.client.access_key(access_key).await {
                    Ok(k) => Some(SecretKey::from(k.secret)),
                    Err(Error::NotFound(_) | Error::InvalidArgument(_)) => None,
                    Err(e) => return Err(internal(e)),
                };
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= KEY_CACHE_MAX {
                    cache.retain(|_, (at, _)| at.elapsed() < KEY_CACHE_TTL);
                }
                // Full of live entries (a flood of made-up ids): answer without remembering.
                if cache.len() < KEY_CACHE_MAX {
                    cache.insert(access_key.to_string(), (Instant::now(), k.clone()));
                }
                k
            }
        };
        key.ok_or_else(|| s3_error!(InvalidAccessKeyId, "the access key id does not exist"))
    }
}

/// A client library error as an S3 error, where nothing more specific applies.
fn internal(e: Error) -> S3Error {
    match e {
        Error::Unavailable(m) => s3_error!(ServiceUnavailable, "masters unavailable: {m}"),
        Error::NotEnoughChunkservers(m) => s3_error!(ServiceUnavailable, "not enough chunkservers: {m}"),
        Error::ChunkUnavailable { .. } | Error::Upload { .. } => {
            S3Error::with_message(S3ErrorCode::ServiceUnavailable, e.to_string())
        }
        Error::InvalidArgument(m) => S3Error::with_message(S3ErrorCode::InvalidArgument, m),
        Error::NameTooLong(m) => S3Error::with_message(S3ErrorCode::KeyTooLongError, m),
        Error::TooLarge(m) => S3Error::with_message(S3ErrorCode::EntityTooLarge, m),
        e => {
            tracing::warn!("request failed: {e}");
            S3Error::with_message(S3ErrorCode::InternalError, e.to_string())
        }
    }
}

impl Gateway {
    /// `Ok` if the bucket exists; NoSuchBucket if not.
    async fn require_bucket(&self, bucket: &str) -> S3Result<()> {
        match self.client.stat(&names::bucket_path(bucket)).await {
            Ok(a) if names::is_dir(&a) => Ok(()),
            Ok(_) | Err(Error::NotFound(_)) => Err(s3_error!(NoSuchBucket, "no bucket named {bucket}")),
            Err(e) => Err(internal(e)),
        }
    }

    /// The error for a key that is not there: NoSuchBucket when its bucket is missing too.
    async fn no_such_key(&self, bucket: &str, key: &str) -> S3Error {
        match self.require_bucket(bucket).await {
            Ok(()) => s3_error!(NoSuchKey, "no object {key} in bucket {bucket}"),
            Err(e) => e,
        }
    }
}

#[async_trait::async_trait]
impl S3 for Gateway {
    async fn list_buckets(&self, _req: S3Request<ListBucketsInput>) -> S3Result<S3Response<ListBucketsOutput>> {
        let (_, entries) = self.client.list("/").await.map_err(internal)?;
        let buckets = entries
            .into_iter()
            .filter(|e| e.attr.as_ref().is_some_and(names::is_dir) && names::is_bucket_name(&e.name))
            .map(|e| Bucket {
                creation_date: Some(names::timestamp(e.attr.as_ref().map_or(0, |a| a.ctime_ns))),
                name: Some(e.name),
                bucket_region: None,
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            owner: Some(names::owner()),
            ..Default::default()
        }))
    }

    async fn create_bucket(&self, req: S3Request<CreateBucketInput>) -> S3Result<S3Response<CreateBucketOutput>> {
        let bucket = &req.input.bucket;
        match self.client.mkdir(&names::bucket_path(bucket), false).await {
            Ok(_) => Ok(S3Response::new(CreateBucketOutput { location: Some(format!("/{bucket}")) })),
            Err(Error::AlreadyExists(_)) => match self.require_bucket(bucket).await {
                Ok(()) => Err(s3_error!(BucketAlreadyOwnedByYou, "bucket {bucket} exists")),
                Err(_) => Err(s3_error!(BucketAlreadyExists, "a file named {bucket} is in the way")),
            },
            Err(e) => Err(internal(e)),
        }
    }

    async fn delete_bucket(&self, req: S3Request<DeleteBucketInput>) -> S3Result<S3Response<DeleteBucketOutput>> {
        let bucket = &req.input.bucket;
        self.require_bucket(bucket).await?;
        match self.client.remove(&names::bucket_path(bucket), false).await {
            Ok(()) => Ok(S3Response::new(DeleteBucketOutput {})),
            Err(Error::NotEmpty(_)) => Err(s3_error!(BucketNotEmpty, "bucket {bucket} is not empty")),
            Err(Error::NotFound(_)) => Err(s3_error!(NoSuchBucket, "no bucket named {bucket}")),
            Err(e) => Err(internal(e)),
        }
    }

    async fn head_bucket(&self, req: S3Request<HeadBucketInput>) -> S3Result<S3Response<HeadBucketOutput>> {
        self.require_bucket(&req.input.bucket).await?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.require_bucket(&req.input.bucket).await?;
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }

    /// POST uploads (browser forms) are not served: their policies may be signed with Signature
    /// V2 and last for any time, which the gateway refuses for every other request.
    async fn post_object(&self, _req: S3Request<PostObjectInput>) -> S3Result<S3Response<PostObjectOutput>> {
        Err(s3_error!(NotImplemented, "POST uploads are not supported; use PUT or a presigned PUT URL"))
    }

    async fn put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        self.put(req).await
    }

    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        self.get(req).await
    }

    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        self.head(req).await
    }

    async fn delete_object(&self, req: S3Request<DeleteObjectInput>) -> S3Result<S3Response<DeleteObjectOutput>> {
        let i = &req.input;
        if i.if_match.is_some() {
            return Err(s3_error!(NotImplemented, "conditional deletes"));
        }
        self.delete(&i.bucket, &i.key, true).await?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(&self, req: S3Request<DeleteObjectsInput>) -> S3Result<S3Response<DeleteObjectsOutput>> {
        self.delete_many(req).await
    }

    async fn copy_object(&self, req: S3Request<CopyObjectInput>) -> S3Result<S3Response<CopyObjectOutput>> {
        self.copy(req).await
    }

    async fn list_objects(&self, req: S3Request<ListObjectsInput>) -> S3Result<S3Response<ListObjectsOutput>> {
        self.list_v1(req.input).await.map(S3Response::new)
    }

    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.list_v2(req.input).await.map(S3Response::new)
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.create_upload(req.input).await.map(S3Response::new)
    }

    async fn upload_part(&self, req: S3Request<UploadPartInput>) -> S3Result<S3Response<UploadPartOutput>> {
        self.put_part(req.input).await.map(S3Response::new)
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        self.put_part_copy(req.input).await.map(S3Response::new)
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.complete_upload(req.input).await.map(S3Response::new)
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.abort_upload(req.input).await.map(S3Response::new)
    }

    async fn list_parts(&self, req: S3Request<ListPartsInput>) -> S3Result<S3Response<ListPartsOutput>> {
        self.parts(req.input).await.map(S3Response::new)
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        self.uploads(req.input).await.map(S3Response::new)
    }
}
