//! The Prometheus endpoint of real `cairn master` and `cairn chunkserver` processes: started with
//! `--metrics 127.0.0.1:0`, each prints "metrics on ADDR" after its "listening on" line and serves
//! the text format over plain HTTP; counters move with a `cairn put` and `cairn get`; a bad
//! `--metrics` address fails start-up with one line.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

/// Scrapes `/metrics` at `addr`, checking the answer's status and content type.
fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let (head, body) = http_get(addr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{addr}: {head}");
    assert!(
        head.to_ascii_lowercase().contains("\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8"),
        "{addr}: not the Prometheus text format: {head}"
    );
    assert!(body.contains("# TYPE "), "{addr}: no metadata: {body}");
    samples(&body)
}

fn value(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    *samples.get(name).unwrap_or_else(|| panic!("no sample {name} in {samples:#?}"))
}

/// Sum of one metric over the chunkservers' pages.
fn total(pages: &[BTreeMap<String, f64>], name: &str) -> f64 {
    pages.iter().map(|p| value(p, name)).sum()
}

#[test]
fn master_and_chunkservers_serve_metrics_that_follow_a_put_and_a_get() {
    let c = Cluster::start(Options { chunkservers: 2, metrics: true, ..Default::default() });
    let master = c.master_metrics.clone().expect("the master printed its metrics address");
    let chunkservers: Vec<String> =
        c.chunkserver_metrics.iter().map(|m| m.clone().expect("a chunkserver printed its metrics address")).collect();

    // Both chunkservers registered and have sent a heartbeat (one a second), and the leader
    // counted them.
    wait_for("heartbeats on both sides", Duration::from_secs(30), || {
        let m = scrape(&master);
        m.get("cairn_master_chunkservers{state=\"alive\"}") == Some(&2.0)
            && m.get("cairn_master_heartbeats_received_total").is_some_and(|n| *n >= 2.0)
            && chunkservers.iter().all(|a| value(&scrape(a), "cairn_chunkserver_heartbeats_sent_total") >= 1.0)
    });
    let m0 = scrape(&master);
    assert_eq!(value(&m0, "cairn_master_raft_leader"), 1.0);
    assert!(value(&m0, "cairn_master_raft_term") >= 1.0);
    assert!(value(&m0, "cairn_master_raft_applied_index") >= 1.0);
    assert!(value(&m0, "cairn_master_grpc_requests_total{method=\"Register\",code=\"OK\"}") >= 2.0);
    for name in ["cairn_master_chunks", "cairn_master_chunks_lost", "cairn_master_repair_queue_chunks"] {
        assert_eq!(value(&m0, name), 0.0, "{name} before any put");
    }
    let c0: Vec<_> = chunkservers.iter().map(|a| scrape(a)).collect();
    for page in &c0 {
        assert!(value(page, "cairn_chunkserver_capacity_bytes") > 0.0);
        assert_eq!(value(page, "cairn_chunkserver_chunks"), 0.0);
    }

    let data = random_bytes(100_000, 11);
    let local = c.dir.path().join("small.bin");
    std::fs::write(&local, &data).unwrap();
    let out = c.cli(&["put", "--replication", "2", local.to_str().unwrap(), "/small.bin"]);
    assert!(out.status.success(), "put: {}", String::from_utf8_lossy(&out.stderr));
    let out = c.cli(&["get", "/small.bin", "-"]);
    assert!(out.status.success(), "get: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, data);

    let c1: Vec<_> = chunkservers.iter().map(|a| scrape(a)).collect();
    let grew = |name: &str| total(&c1, name) - total(&c0, name);
    assert_eq!(grew("cairn_chunkserver_chunk_puts_total"), 2.0, "one chunk, stored on two replicas");
    assert_eq!(grew("cairn_chunkserver_chunk_put_bytes_total"), 2.0 * data.len() as f64);
    assert_eq!(grew("cairn_chunkserver_chunk_put_duration_seconds_count"), 2.0);
    assert_eq!(grew("cairn_chunkserver_chain_forwards_total"), 1.0, "the first replica forwarded to the second");
    assert_eq!(grew("cairn_chunkserver_chunk_gets_total"), 1.0);
    assert_eq!(grew("cairn_chunkserver_chunk_get_bytes_total"), data.len() as f64);
    assert_eq!(grew("cairn_chunkserver_chunks"), 2.0);
    assert_eq!(grew("cairn_chunkserver_used_bytes"), 2.0 * data.len() as f64);
    assert_eq!(total(&c1, "cairn_chunkserver_chunk_put_errors_total"), 0.0);

    let m1 = scrape(&master);
    let committed = value(&m1, "cairn_master_proposals_committed_total");
    assert!(committed > value(&m0, "cairn_master_proposals_committed_total"), "the commit was proposed");
    assert_eq!(
        value(&m1, "cairn_master_proposal_duration_seconds_count"),
        committed,
        "every committed proposal is timed"
    );
    assert!(value(&m1, "cairn_master_raft_applied_index") > value(&m0, "cairn_master_raft_applied_index"));
    for method in ["PlaceChunks", "CommitFile", "OpenFile"] {
        let count = format!("cairn_master_grpc_requests_total{{method=\"{method}\",code=\"OK\"}}");
        assert!(value(&m1, &count) >= 1.0, "{count}");
        let timed = format!("cairn_master_grpc_request_duration_seconds_count{{method=\"{method}\"}}");
        assert!(value(&m1, &timed) >= 1.0, "{timed}");
    }
    // Chunk health is recomputed at most once a second: poll until it shows the new chunk.
    wait_for("the leader's metrics to count the chunk", Duration::from_secs(10), || {
        scrape(&master).get("cairn_master_chunks") == Some(&1.0)
    });
    let m2 = scrape(&master);
    assert_eq!(value(&m2, "cairn_master_chunks_under_replicated"), 0.0);
    assert_eq!(value(&m2, "cairn_master_chunks_lost"), 0.0);

    // Only /metrics is served.
    for addr in [&master, &chunkservers[0]] {
        let (head, _) = http_get(addr, "/");
        assert!(head.starts_with("HTTP/1.1 404 "), "{addr}/: {head}");
        let (head, _) = http_get(addr, "/metrics/extra");
        assert!(head.starts_with("HTTP/1.1 404 "), "{addr}/metrics/extra: {head}");
    }
}

#[test]
fn a_bad_or_busy_metrics_address_fails_start_up_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    cairn_common::tls::init_ca(&ca).unwrap();
    let tls = dir.path().join("tls");
    cairn_common::tls::issue(&ca, &tls, cairn_common::tls::Role::Node, &["127.0.0.1".parse().unwrap()]).unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    for bad in ["not-an-addr", busy.as_str()] {
        let data = dir.path().join("master");
        let master = [
            "master",
            "--id",
            "1",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--tls",
            tls.to_str().unwrap(),
            "--metrics",
            bad,
        ];
        let out = cli_env(&master, &[], None);
        let line = expect_error(&out, &format!("master --metrics {bad}"));
        assert!(line.starts_with(&format!("cairn: metrics: listen on {bad}: ")), "{line}");
        assert!(out.stdout.is_empty(), "nothing printed on stdout: {}", String::from_utf8_lossy(&out.stdout));

        let data = dir.path().join("cs");
        let chunkserver = [
            "chunkserver",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--masters",
            "127.0.0.1:1",
            "--tls",
            tls.to_str().unwrap(),
            "--metrics",
            bad,
        ];
        let out = cli_env(&chunkserver, &[], None);
        let line = expect_error(&out, &format!("chunkserver --metrics {bad}"));
        assert!(line.starts_with(&format!("cairn: metrics: listen on {bad}: ")), "{line}");
    }
}

/// Concurrent uploads from one client share their calls to the leader (see
/// `client/src/batch.rs`): 64 small files put at once cost fewer placement calls, and fewer
/// commit calls, than files; and all read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_small_puts_share_placement_and_commit_calls() {
    const METHODS: [&str; 3] = ["PlaceChunks", "CommitFile", "CommitFiles"];
    let c = Cluster::start(Options { chunkservers: 3, metrics: true, ..Default::default() });
    let master = c.master_metrics.clone().expect("the master printed its metrics address");
    let client = c.client().await;
    let calls = || {
        let addr = master.clone();
        let count = move || {
            let m = scrape(&addr);
            METHODS.map(|k| {
                m.get(&format!("cairn_master_grpc_requests_total{{method=\"{k}\",code=\"OK\"}}"))
                    .copied()
                    .unwrap_or(0.0)
            })
        };
        async move { tokio::task::spawn_blocking(count).await.unwrap() }
    };
    let before = calls().await;
    let files: Vec<(String, Vec<u8>)> = (0..64u64).map(|i| (format!("/s{i}"), random_bytes(4096, 100 + i))).collect();
    let puts = files.iter().map(|(path, data)| {
        let (client, path, data) = (client.clone(), path.clone(), bytes::Bytes::from(data.clone()));
        tokio::spawn(async move { client.put_bytes(&path, data, &cairn_client::PutOptions::default()).await })
    });
    for put in futures::future::join_all(puts).await {
        put.expect("put task").expect("put");
    }
    let after = calls().await;
    let [place, commit, commits] = [0, 1, 2].map(|i| after[i] - before[i]);
    assert!((1.0..64.0).contains(&place), "{place} PlaceChunks calls for 64 concurrent uploads");
    assert!(
        commits >= 1.0 && commit + commits < 64.0,
        "{commit} CommitFile and {commits} CommitFiles calls for 64 uploads"
    );
    for (path, data) in &files {
        let mut back = Vec::new();
        client.get(path, &mut back, 0, None, &|_| {}).await.expect("get");
        assert_eq!(&back, data, "content of {path}");
    }
}
