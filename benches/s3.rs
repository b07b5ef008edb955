//! `cairn bench --mode s3`: the S3 gateway beside the client library, in the same run on the same
//! cluster. Large objects (`--objects` of `--size-mib`, all at once) and many small ones
//! (`--small-files` of `--small-size` bytes, `--inflight` at once): PUT then GET, first through
//! the client library, then through the gateway with a minimal SigV4 HTTP client (UNSIGNED-PAYLOAD,
//! as clients send over TLS; the body is not hashed twice). Every object has fresh random
//! content, so that no upload is deduplicated against an earlier one. Before each phase the
//! benchmark flushes the disk and drops the page cache.
//!
//! Without CAIRN_MASTERS and AWS_ENDPOINT_URL it starts `cairn dev --s3` in a temp dir.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use cairn_client::{Client, ClientConfig, PutOptions};
use futures::StreamExt as _;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use rand::{RngCore, SeedableRng};

use crate::bench::{mbps, BenchArgs, DevCluster, Row};

type Body = BoxBody<Bytes, std::convert::Infallible>;

/// A request body sent as 1 MiB slices of `data` (no copies), as a client streaming a file does.
fn slices(data: Bytes) -> Body {
    const SLICE: usize = 1 << 20;
    let pieces = (0..data.len().div_ceil(SLICE))
        .map(move |i| Ok(hyper::body::Frame::data(data.slice(i * SLICE..((i + 1) * SLICE).min(data.len())))));
    BodyExt::boxed(StreamBody::new(futures::stream::iter(pieces.collect::<Vec<_>>())))
}

/// A bare S3 client: path-style requests signed with AWS Signature V4.
struct S3Client {
    http: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
    endpoint: String,
    host: String,
    key: String,
    secret: String,
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), data).as_ref().to_vec()
}

/// "YYYYMMDDTHHMMSSZ" for `t`.
fn amz_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (y, m, d, h, mi, s) = cairn_client::cli::civil_time(secs);
    format!("{y:04}{m:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

impl S3Client {
    fn new(endpoint: &str, key: &str, secret: &str) -> Result<S3Client> {
        let host = endpoint.strip_prefix("http://").context("the benchmark speaks plain http:// to the gateway")?;
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(64)
            .build(connector);
        Ok(S3Client {
            http,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            host: host.trim_end_matches('/').to_string(),
            key: key.to_string(),
            secret: secret.to_string(),
        })
    }

    fn request(&self, method: &str, path: &str, body: Bytes) -> Result<hyper::Request<Body>> {
        let date = amz_date(SystemTime::now());
        let day = &date[..8];
        let payload = "UNSIGNED-PAYLOAD";
        let signed = "host;x-amz-content-sha256;x-amz-date";
        let canonical = format!(
            "{method}\n{path}\n\nhost:{}\nx-amz-content-sha256:{payload}\nx-amz-date:{date}\n\n{signed}\n{payload}",
            self.host
        );
        let scope = format!("{day}/us-east-1/s3/aws4_request");
        let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
        let to_sign = format!("AWS4-HMAC-SHA256\n{date}\n{scope}\n{}", hex::encode(digest.as_ref()));
        let mut k = hmac(format!("AWS4{}", self.secret).as_bytes(), day.as_bytes());
        for part in ["us-east-1", "s3", "aws4_request"] {
            k = hmac(&k, part.as_bytes());
        }
        let signature = hex::encode(hmac(&k, to_sign.as_bytes()));
        let auth =
            format!("AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}", self.key);
        Ok(hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.endpoint))
            .header("host", &self.host)
            .header("x-amz-date", date)
            .header("x-amz-content-sha256", payload)
            .header("authorization", auth)
            .header("content-length", body.len())
            .body(slices(body))?)
    }

    /// Sends a request and returns the length of the answer's body (read to the end).
    async fn send(&self, method: &str, path: &str, body: Bytes) -> Result<u64> {
        let resp =
            self.http.request(self.request(method, path, body)?).await.with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut n = 0u64;
        let mut text = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.with_context(|| format!("{method} {path}: body"))?.into_data() {
                n += data.len() as u64;
                if !status.is_success() && text.len() < 4096 {
                    text.extend_from_slice(&data);
                }
            }
        }
        anyhow::ensure!(status.is_success(), "{method} {path}: {status} {}", String::from_utf8_lossy(&text));
        Ok(n)
    }
}

/// Lets each phase start on a quiet disk instead of paying for the one before it: flushes what
/// the last phase wrote, drops the page cache (as root) and lets the nodes settle. (Deleted
/// objects' chunks stay on disk for the masters' GC grace period, so there is disk for both.)
async fn settle() {
    tokio::task::spawn_blocking(crate::bench::drop_caches).await.ok();
    tokio::time::sleep(Duration::from_secs(3)).await;
}

/// One way in: the client library, or the gateway over HTTP.
struct Via {
    client: Client,
    s3: Arc<S3Client>,
    opts: PutOptions,
    s3_gateway: bool,
}

impl Via {
    async fn put(&self, path: String, body: Bytes) -> Result<()> {
        if self.s3_gateway {
            self.s3.send("PUT", &path, body).await?;
        } else {
            self.client.put_bytes(&path, body, &self.opts).await?;
        }
        Ok(())
    }

    /// Reads `path` to the end (the bytes are dropped), checking its length.
    async fn get(&self, path: String, want: u64) -> Result<()> {
        let got = if self.s3_gateway {
            self.s3.send("GET", &path, Bytes::new()).await?
        } else {
            self.client.get(&path, &mut tokio::io::sink(), 0, None, &|_| {}).await?
        };
        anyhow::ensure!(got == want, "GET {path}: {got} bytes, not {want}");
        Ok(())
    }
}

fn random(len: usize, seed: u64) -> Bytes {
    let mut v = vec![0u8; len];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    Bytes::from(v)
}

/// Runs `f(i)` for `i` in `0..n`, `inflight` at a time; returns the total time.
async fn timed<F, Fut>(n: usize, inflight: usize, f: F) -> Result<Duration>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let t = Instant::now();
    let results: Vec<Result<()>> = futures::stream::iter(0..n).map(f).buffer_unordered(inflight.max(1)).collect().await;
    results.into_iter().collect::<Result<()>>()?;
    Ok(t.elapsed())
}

/// One measurement's results per pass, by way in.
#[derive(Default)]
struct Speeds {
    library: Vec<f64>,
    gateway: Vec<f64>,
}

impl Speeds {
    fn add(&mut self, via_s3: bool, v: f64) {
        if via_s3 { &mut self.gateway } else { &mut self.library }.push(v);
    }

    /// The means of both ways in and their ratio, with every pass's value in the notes.
    fn row(&self, what: String, unit: &str) -> Row {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let each = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
        let (lib, s3) = (mean(&self.library), mean(&self.gateway));
        Row {
            what,
            value: format!("library {lib:.0} {unit}, gateway {s3:.0} {unit}"),
            note: format!(
                "gateway / library = {:.0}% (means of {} passes each, in ABBA order; library {}; gateway {})",
                s3 / lib * 100.0,
                self.library.len(),
                each(&self.library),
                each(&self.gateway)
            ),
        }
    }
}

pub async fn run(a: &BenchArgs, dir: &Path) -> Result<Vec<Row>> {
    let var = |k: &str| std::env::var(k).ok();
    let _cluster;
    let (masters, tls, endpoint, key, secret) = match (
        var("CAIRN_MASTERS"),
        var("CAIRN_TLS"),
        var("AWS_ENDPOINT_URL"),
        var("AWS_ACCESS_KEY_ID"),
        var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(m), Some(t), Some(e), Some(k), Some(s)) => (m, t, e, k, s),
        _ => {
            eprintln!(
                "starting a dev cluster with an S3 gateway ({} chunkservers) in {}...",
                a.chunkservers,
                dir.display()
            );
            let c = DevCluster::start_with(dir, a.chunkservers, &["--s3", "127.0.0.1:0"])?;
            let v = |k: &str| c.var(k).with_context(|| format!("the dev env has no {k}"));
            let vars = (
                v("CAIRN_MASTERS")?,
                v("CAIRN_TLS")?,
                v("AWS_ENDPOINT_URL")?,
                v("AWS_ACCESS_KEY_ID")?,
                v("AWS_SECRET_ACCESS_KEY")?,
            );
            _cluster = c;
            vars
        }
    };
    let client = Client::connect(ClientConfig {
        masters: masters.split(',').map(String::from).collect(),
        tls_dir: tls.into(),
        master_deadline: Duration::from_secs(30),
    })
    .await?;
    let s3 = Arc::new(S3Client::new(&endpoint, &key, &secret)?);
    let opts = PutOptions { replication: a.replication, ..Default::default() };
    let bucket = format!("bench-{:08x}", rand::random::<u32>());
    client.mkdir(&format!("/{bucket}"), false).await?;
    let salt = rand::random::<u64>();
    let mut rows = Vec::new();

    // Each way in runs `passes` times, in ABBA order; each pass has fresh content.
    let order: Vec<bool> = (0..a.passes.max(1)).flat_map(|k| [k % 2 == 1, k % 2 == 0]).collect();
    let mut round = 0u64;

    // Large objects, all at once.
    let (n, size) = (a.objects.max(1), a.size_mib << 20);
    let total = (n * size) as u64;
    let (mut puts, mut gets) = (Speeds::default(), Speeds::default());
    for &via_s3 in &order {
        round += 1;
        settle().await;
        let data: Vec<Bytes> = (0..n).map(|i| random(size, salt ^ (round << 32) ^ i as u64)).collect();
        let name = |i: usize| format!("/{bucket}/large-{round}-{i}");
        let who = if via_s3 { "gateway" } else { "library" };
        eprintln!("{who}: PUT {n} x {} MiB at once...", a.size_mib);
        let via = Via { client: client.clone(), s3: s3.clone(), opts: opts.clone(), s3_gateway: via_s3 };
        let put = timed(n, n, |i| via.put(name(i), data[i].clone())).await?;
        drop(data);
        eprintln!("{who}: GET {n} x {} MiB at once...", a.size_mib);
        let get = timed(n, n, |i| via.get(name(i), size as u64)).await?;
        for i in 0..n {
            client.remove(&name(i), false).await?;
        }
        puts.add(via_s3, mbps(total, put));
        gets.add(via_s3, mbps(total, get));
    }
    let label = format!("{n} x {} MiB objects at once", a.size_mib);
    rows.push(puts.row(format!("PUT, {label}"), "MB/s"));
    rows.push(gets.row(format!("GET, {label}"), "MB/s"));

    // Small objects, `inflight` at once.
    let (n, size) = (a.small_files, a.small_size);
    if n > 0 {
        let (mut puts, mut gets) = (Speeds::default(), Speeds::default());
        for &via_s3 in &order {
            round += 1;
            settle().await;
            let who = if via_s3 { "gateway" } else { "library" };
            let name = |i: usize| format!("/{bucket}/small-{round}/o{i:06}");
            client.mkdir(&format!("/{bucket}/small-{round}"), false).await?;
            eprintln!("{who}: PUT {n} x {size} B, {} at once...", a.inflight);
            let via = Via { client: client.clone(), s3: s3.clone(), opts: opts.clone(), s3_gateway: via_s3 };
            let put = timed(n, a.inflight, |i| via.put(name(i), random(size, salt ^ (round << 32) ^ i as u64))).await?;
            eprintln!("{who}: GET {n} x {size} B, {} at once...", a.inflight);
            let get = timed(n, a.inflight, |i| via.get(name(i), size as u64)).await?;
            puts.add(via_s3, n as f64 / put.as_secs_f64());
            gets.add(via_s3, n as f64 / get.as_secs_f64());
            client.remove(&format!("/{bucket}/small-{round}"), true).await?;
        }
        let label = format!("{size} B objects, {} at once", a.inflight);
        rows.push(puts.row(format!("PUT, {label}"), "objects/s"));
        rows.push(gets.row(format!("GET, {label}"), "objects/s"));
    }
    client.remove(&format!("/{bucket}"), true).await?;
    client.close();
    Ok(rows)
}
