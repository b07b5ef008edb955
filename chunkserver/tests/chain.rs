//! Three chunkservers' data paths in-process: a chained put, ranged gets, a refused hash mismatch,
//! a client from another CA, and the whole `run` against a master that is down.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_chunkserver::quic::{self, Limits};
use cairn_chunkserver::store::{ChunkHash, ChunkStore};
use cairn_common::tls::Role;
use cairn_proto::data::Status;
use common::*;
use tokio_util::sync::CancellationToken;

struct Node {
    addr: SocketAddr,
    store: ChunkStore,
    data: PathBuf,
}

struct Cluster {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    nodes: Vec<Node>,
    client: quinn::Endpoint,
    shutdown: CancellationToken,
    servers: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

async fn cluster(n: usize) -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca(dir.path(), "ca");
    let shutdown = CancellationToken::new();
    let mut nodes = Vec::new();
    let mut servers = Vec::new();
    for i in 0..n {
        let id = identity(&ca, &dir.path().join(format!("id{i}")), Role::Node);
        let data = dir.path().join(format!("data{i}"));
        let store = ChunkStore::open(&data, None).await.expect("open store");
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = socket.local_addr().expect("local addr");
        let endpoint = quic::endpoint(&id, store.node_id(), socket).expect("endpoint");
        let server =
            quic::serve(endpoint, store.clone(), Limits::default(), Default::default(), shutdown.child_token());
        servers.push(tokio::spawn(server));
        nodes.push(Node { addr, store, data });
    }
    let client_id = identity(&ca, &dir.path().join("client"), Role::Client);
    let client = client_endpoint(&client_id);
    Cluster { _dir: dir, ca, nodes, client, shutdown, servers }
}

impl Cluster {
    async fn stop(self) {
        self.shutdown.cancel();
        for s in self.servers {
            let res = tokio::time::timeout(Duration::from_secs(10), s).await.expect("server stops in time");
            res.expect("server task").expect("server result");
        }
    }
}

fn chunk_files(data: &Path) -> usize {
    fn walk(d: &Path) -> usize {
        std::fs::read_dir(d)
            .map(|it| it.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum())
            .unwrap_or(0)
    }
    walk(&data.join("by-hash"))
}

#[tokio::test(flavor = "multi_thread")]
async fn chained_put_then_get() {
    let c = cluster(3).await;
    let conn = connect(&c.client, c.nodes[0].addr).await.expect("connect");
    let data = pattern(1 << 20, 1);
    let hash = ChunkHash::of(&data);
    let chain: Vec<String> = c.nodes[1..].iter().map(|n| n.addr.to_string()).collect();

    let resp = put(&conn, hash.as_bytes(), &data, chain.clone()).await.expect("put");
    assert_eq!(resp.status, Status::Ok as i32, "{}", resp.message);
    assert_eq!(resp.replicas, 3);
    for n in &c.nodes {
        assert!(n.store.contains(&hash));
        let on_disk = std::fs::read(n.store.chunk_path(&hash)).expect("chunk file");
        assert_eq!(on_disk, data);
    }

    // The same put again is acknowledged by every replica without rewriting.
    let again = put(&conn, hash.as_bytes(), &data, chain).await.expect("put again");
    assert_eq!(again.status, Status::Ok as i32, "{}", again.message);
    assert_eq!(again.replicas, 3);

    // Ranges, from the head and from the tail of the chain.
    let (resp, bytes) = get(&conn, hash.as_bytes(), 1000, 4096).await.expect("get range");
    assert_eq!(resp.status, Status::Ok as i32, "{}", resp.message);
    assert_eq!(resp.length, 4096);
    assert_eq!(bytes, &data[1000..5096]);
    let tail = connect(&c.client, c.nodes[2].addr).await.expect("connect tail");
    let (resp, bytes) = get(&tail, hash.as_bytes(), 0, 0).await.expect("get whole");
    assert_eq!(resp.status, Status::Ok as i32);
    assert_eq!(bytes, data);

    let (resp, _) = get(&conn, ChunkHash::of(b"absent").as_bytes(), 0, 0).await.expect("get absent");
    assert_eq!(resp.status, Status::NotFound as i32);
    let (resp, _) = get(&conn, hash.as_bytes(), (1 << 20) + 1, 0).await.expect("get past end");
    assert_eq!(resp.status, Status::Invalid as i32);
    let (resp, _) = get(&conn, &[1, 2, 3], 0, 0).await.expect("get bad hash");
    assert_eq!(resp.status, Status::Invalid as i32);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hash_mismatch_stores_nothing_anywhere() {
    let c = cluster(3).await;
    let conn = connect(&c.client, c.nodes[0].addr).await.expect("connect");
    let claimed = pattern(300_000, 2);
    let sent = pattern(300_000, 3);
    let hash = ChunkHash::of(&claimed);
    let chain: Vec<String> = c.nodes[1..].iter().map(|n| n.addr.to_string()).collect();

    let resp = put(&conn, hash.as_bytes(), &sent, chain).await.expect("put");
    assert_eq!(resp.status, Status::HashMismatch as i32, "{}", resp.message);
    for n in &c.nodes {
        assert!(!n.store.contains(&hash));
        assert_eq!(chunk_files(&n.data), 0);
        assert_eq!(std::fs::read_dir(n.data.join("tmp")).expect("tmp").count(), 0);
    }

    // Zero-length and oversized chunks are invalid before any byte is read.
    let resp = put(&conn, ChunkHash::of(b"").as_bytes(), b"", vec![]).await.expect("put empty");
    assert_eq!(resp.status, Status::Invalid as i32);
    let resp = put_raw(&conn, hash.as_bytes(), cairn_proto::MAX_CHUNK + 1, b"", vec![]).await.expect("put huge");
    assert_eq!(resp.status, Status::Invalid as i32);

    // A stream that ends early stores nothing, on the head or down the chain.
    let chain: Vec<String> = c.nodes[1..].iter().map(|n| n.addr.to_string()).collect();
    let resp =
        put_raw(&conn, hash.as_bytes(), claimed.len() as u64, &claimed[..100_000], chain).await.expect("short put");
    assert_eq!(resp.status, Status::Invalid as i32, "{}", resp.message);
    // The tail learns of the abort by a stream reset, possibly after the head answered.
    wait_for("tmp/ emptied everywhere", || {
        c.nodes.iter().all(|n| std::fs::read_dir(n.data.join("tmp")).map(|d| d.count() == 0).unwrap_or(false))
    })
    .await;
    for n in &c.nodes {
        assert!(!n.store.contains(&hash));
        assert_eq!(chunk_files(&n.data), 0);
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_chain_is_unavailable_but_local_copy_is_kept() {
    let c = cluster(2).await;
    let conn = connect(&c.client, c.nodes[0].addr).await.expect("connect");
    let data = pattern(100_000, 4);
    let hash = ChunkHash::of(&data);
    // The second node forwards to a name that does not resolve: the failure comes back up,
    // naming the replica that could not be reached.
    let chain = vec![c.nodes[1].addr.to_string(), "no-such-host.invalid:1".to_string()];
    let resp = put(&conn, hash.as_bytes(), &data, chain).await.expect("put");
    assert_eq!(resp.status, Status::Unavailable as i32, "{}", resp.message);
    assert!(resp.message.contains("no-such-host.invalid:1"), "{}", resp.message);
    assert!(resp.message.contains(&c.nodes[1].addr.to_string()), "{}", resp.message);
    for n in &c.nodes {
        assert!(n.store.contains(&hash), "the replicas that got the chunk keep it");
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_from_another_ca_is_refused() {
    let c = cluster(1).await;
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other_ca = ca(other_dir.path(), "other-ca");
    let stranger = identity(&other_ca, &other_dir.path().join("client"), Role::Client);
    let ep = client_endpoint(&stranger);
    let data = pattern(1000, 5);
    let hash = ChunkHash::of(&data);
    let refused = match connect(&ep, c.nodes[0].addr).await {
        Err(_) => true,
        Ok(conn) => put(&conn, hash.as_bytes(), &data, vec![]).await.is_err(),
    };
    assert!(refused, "a certificate from another CA must not get through");
    assert!(!c.nodes[0].store.contains(&hash));

    // And our own client still works.
    let conn = connect(&c.client, c.nodes[0].addr).await.expect("connect");
    let resp = put(&conn, hash.as_bytes(), &data, vec![]).await.expect("put");
    assert_eq!(resp.status, Status::Ok as i32, "{}", resp.message);
    let _ = &c.ca;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn run_serves_while_the_master_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca(dir.path(), "ca");
    let node = identity(&ca, &dir.path().join("node"), Role::Node);
    let client = identity(&ca, &dir.path().join("client"), Role::Client);
    // A TCP port that refuses connections.
    let master = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("addr");
    let config = cairn_chunkserver::Config {
        data_dir: dir.path().join("data"),
        masters: vec![master.to_string()],
        zone: "z1".into(),
        identity: node,
        capacity_bytes: Some(1 << 20),
        advertise: None,
        scrub_rate: 0,
        metrics: None,
    };
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(cairn_chunkserver::run(config, socket, shutdown.clone()));

    let ep = client_endpoint(&client);
    let conn = connect(&ep, addr).await.expect("connect");
    let data = pattern(700_000, 6);
    let hash = ChunkHash::of(&data);
    let resp = put(&conn, hash.as_bytes(), &data, vec![]).await.expect("put");
    assert_eq!(resp.status, Status::Ok as i32, "{}", resp.message);
    let (resp, bytes) = get(&conn, hash.as_bytes(), 10, 20).await.expect("get");
    assert_eq!(resp.status, Status::Ok as i32);
    assert_eq!(bytes, &data[10..30]);

    // The capacity cap is 1 MiB: a second 700 kB chunk does not fit.
    let more = pattern(700_000, 7);
    let resp = put(&conn, ChunkHash::of(&more).as_bytes(), &more, vec![]).await.expect("put");
    assert_eq!(resp.status, Status::NoSpace as i32, "{}", resp.message);

    shutdown.cancel();
    let res = tokio::time::timeout(Duration::from_secs(10), server).await.expect("run stops in time");
    res.expect("run task").expect("run result");
}
