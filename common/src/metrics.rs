//! The Prometheus endpoint every Cairn server offers with `--metrics ADDR`: `GET /metrics` over
//! HTTP/1.1 answers the server's registry in the Prometheus text format (version 0.0.4); any
//! other path is 404. The services own their metrics (counters and histograms updated where the
//! work happens); this module only binds, serves and encodes them.
//!
//! A scrape costs one connection slot out of [`MAX_CONNECTIONS`] and runs off the async runtime
//! (its refresh hook may walk soft state), so a slow or hostile scraper cannot stall a server.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use prometheus_text::CONTENT_TYPE;

/// Scrapes served at once; one more waits for a slot before it is even accepted.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection serves one request (no keep-alive) and must be done within this time.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Latency buckets for request histograms: 100 µs to about 13 s, doubling.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(1e-4, 2.0, 18)
}

/// Sets a gauge to a count or size kept as u64 (saturating: gauges hold i64).
pub fn set_gauge(gauge: &Gauge, v: u64) {
    gauge.set(i64::try_from(v).unwrap_or(i64::MAX));
}

/// Binds the metrics listener at start-up, so that a bad or busy address fails there with one
/// line, before the server prints anything. The caller hands it to the service's `run`.
pub fn bind(addr: &str) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("metrics: listen on {addr}"))?;
    listener.set_nonblocking(true).context("metrics: set the listener non-blocking")?;
    Ok(listener)
}

/// A registry and what to do before each scrape.
pub struct Exporter {
    registry: Registry,
    /// Brings gauges that are read rather than counted (queue lengths, Raft indexes) up to date.
    refresh: Box<dyn Fn() + Send + Sync>,
}

impl Exporter {
    pub fn new(registry: Registry) -> Exporter {
        Exporter { registry, refresh: Box::new(|| {}) }
    }

    /// Calls `refresh` before every scrape (off the async runtime, so it may block briefly).
    pub fn with_refresh(mut self, refresh: impl Fn() + Send + Sync + 'static) -> Exporter {
        self.refresh = Box::new(refresh);
        self
    }

    /// The registry in the Prometheus text format, refreshed first.
    pub fn render(&self) -> String {
        (self.refresh)();
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    resp
}

async fn handle(exporter: Arc<Exporter>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return respond(StatusCode::NOT_FOUND, TEXT, "not found: metrics are at /metrics\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET /metrics\n");
    }
    match tokio::task::spawn_blocking(move || exporter.render()).await {
        Ok(body) => respond(StatusCode::OK, CONTENT_TYPE, body),
        Err(e) => {
            tracing::warn!("metrics scrape failed: {e}");
            respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, "scrape failed\n")
        }
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled. Failures of one
/// connection are logged at debug level and never stop the endpoint.
pub async fn serve(listener: std::net::TcpListener, exporter: Arc<Exporter>, shutdown: CancellationToken) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics endpoint: {e}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, typically: wait a little instead of spinning.
                    tracing::debug!("metrics endpoint: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let exporter = exporter.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let exporter = exporter.clone();
                async move { Ok::<_, Infallible>(handle(exporter, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("metrics endpoint: connection: {e}"),
                Err(_) => tracing::debug!("metrics endpoint: connection timed out"),
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::histogram::Histogram;

    use super::*;

    /// One HTTP/1.1 request on a fresh connection: (status line, headers, body).
    fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> (String, String, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (status.to_string(), headers.to_ascii_lowercase(), body.to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_the_registry_at_metrics_and_nothing_else() {
        let mut registry = Registry::with_prefix("cairn_test");
        let requests = Counter::<u64>::default();
        registry.register("requests", "Requests handled", requests.clone());
        let latency = Histogram::new(latency_buckets());
        registry.register("request_duration_seconds", "Request latency", latency.clone());
        let refreshed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let r = refreshed.clone();
        let exporter = Exporter::new(registry).with_refresh(move || {
            r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });

        let listener = bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::new(exporter), shutdown.clone()));

        requests.inc_by(3);
        latency.observe(0.002);
        let (status, headers, body) = tokio::task::spawn_blocking(move || http(addr, "GET", "/metrics")).await.unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(headers.contains("content-type: text/plain; version=0.0.4"), "{headers}");
        assert!(body.contains("# TYPE cairn_test_requests_total counter\n"), "{body}");
        assert!(body.contains("\ncairn_test_requests_total 3\n"), "{body}");
        assert!(body.contains("cairn_test_request_duration_seconds_bucket{le=\"0.0032\"} 1\n"), "{body}");
        assert!(body.contains("cairn_test_request_duration_seconds_count 1\n"), "{body}");
        assert_eq!(refreshed.load(std::sync::atomic::Ordering::Relaxed), 1, "refreshed once per scrape");

        let (status, _, _) = tokio::task::spawn_blocking(move || http(addr, "GET", "/")).await.unwrap();
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        let (status, _, _) = tokio::task::spawn_blocking(move || http(addr, "GET", "/metrics/x")).await.unwrap();
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        let (status, _, _) = tokio::task::spawn_blocking(move || http(addr, "POST", "/metrics")).await.unwrap();
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");

        shutdown.cancel();
        server.await.unwrap();
    }

    #[test]
    fn a_bad_or_busy_address_fails_with_one_line() {
        let e = format!("{:#}", bind("not-an-addr").unwrap_err());
        assert!(e.starts_with("metrics: listen on not-an-addr: "), "{e}");
        assert_eq!(e.lines().count(), 1);
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = format!("{:#}", bind(&addr).unwrap_err());
        assert!(e.starts_with(&format!("metrics: listen on {addr}: ")), "{e}");
    }
}
