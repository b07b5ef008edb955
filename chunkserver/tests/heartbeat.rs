//! The heartbeat worker against fake masters: it follows a follower's leader hint, registers,
//! sends a full report, reports new chunks in heartbeats, and re-registers when asked.

mod common;

use std::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_chunkserver::store::{ChunkHash, ChunkStore};
use cairn_common::tls::{Identity, Role};
use cairn_proto::data::Status;
use cairn_proto::v1::cluster_server::{Cluster, ClusterServer};
use cairn_proto::v1::*;
use common::*;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response};

#[derive(Default)]
struct Seen {
    registers: Vec<RegisterRequest>,
    reports: Vec<ChunkReportRequest>,
    heartbeats: Vec<HeartbeatRequest>,
}

/// A follower (refuses everything, pointing at `leader_hint`) or a leader (records everything,
/// asks for a full report in its answer to heartbeat number `report_on`, and answers NotFound to
/// heartbeat number `not_found_on`; 0 is never).
struct FakeMaster {
    leader_hint: Option<String>,
    seen: Arc<Mutex<Seen>>,
    report_on: usize,
    not_found_on: usize,
}

impl FakeMaster {
    fn leader(seen: Arc<Mutex<Seen>>, report_on: usize, not_found_on: usize) -> FakeMaster {
        FakeMaster { leader_hint: None, seen, report_on, not_found_on }
    }
}

impl FakeMaster {
    fn refuse(&self) -> Result<(), tonic::Status> {
        match &self.leader_hint {
            Some(hint) => {
                let mut status = tonic::Status::unavailable("not the leader");
                status.metadata_mut().insert(cairn_proto::LEADER_HINT_KEY, hint.parse().expect("ascii"));
                Err(status)
            }
            None => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl Cluster for FakeMaster {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, tonic::Status> {
        self.refuse()?;
        self.seen.lock().expect("lock").registers.push(req.into_inner());
        Ok(Response::new(RegisterResponse {}))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, tonic::Status> {
        self.refuse()?;
        let mut seen = self.seen.lock().expect("lock");
        seen.heartbeats.push(req.into_inner());
        let n = seen.heartbeats.len();
        if n == self.not_found_on {
            return Err(tonic::Status::not_found("unknown node"));
        }
        Ok(Response::new(HeartbeatResponse { report_requested: n == self.report_on, ..Default::default() }))
    }

    async fn chunk_report(
        &self,
        req: Request<ChunkReportRequest>,
    ) -> Result<Response<ChunkReportResponse>, tonic::Status> {
        self.refuse()?;
        self.seen.lock().expect("lock").reports.push(req.into_inner());
        Ok(Response::new(ChunkReportResponse {}))
    }
}

fn start_master(id: &Identity, listener: std::net::TcpListener, master: FakeMaster, shutdown: CancellationToken) {
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let server = tonic::transport::Server::builder()
        .tls_config(id.grpc_server())
        .expect("server TLS")
        .add_service(ClusterServer::new(master))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.cancelled_owned(),
        );
    tokio::spawn(server);
}

#[tokio::test(flavor = "multi_thread")]
async fn follows_leader_registers_reports_and_heartbeats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca(dir.path(), "ca");
    let master_id = identity(&ca, &dir.path().join("master"), Role::Node);
    let node_id = identity(&ca, &dir.path().join("node"), Role::Node);
    let client_id = identity(&ca, &dir.path().join("client"), Role::Client);
    let shutdown = CancellationToken::new();

    let leader_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let follower_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let leader_addr = leader_listener.local_addr().expect("addr").to_string();
    let follower_addr = follower_listener.local_addr().expect("addr").to_string();
    let seen = Arc::new(Mutex::new(Seen::default()));
    start_master(&master_id, leader_listener, FakeMaster::leader(seen.clone(), 3, 0), shutdown.clone());
    let follower_seen = Arc::new(Mutex::new(Seen::default()));
    let follower = FakeMaster {
        leader_hint: Some(leader_addr.clone()),
        seen: follower_seen.clone(),
        report_on: 0,
        not_found_on: 0,
    };
    start_master(&master_id, follower_listener, follower, shutdown.clone());

    // A chunk stored before the node starts must be in its first report.
    let data_dir = dir.path().join("data");
    let old = pattern(5000, 1);
    let old_hash = ChunkHash::of(&old);
    let node = {
        let store = ChunkStore::open(&data_dir, None).await.expect("open");
        store.put(old_hash, old.into()).await.expect("put");
        store.node_id()
    };

    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("addr");
    let config = cairn_chunkserver::Config {
        data_dir,
        masters: vec![follower_addr],
        zone: "zone-a".into(),
        identity: node_id,
        capacity_bytes: None,
        advertise: Some(format!("localhost:{}", addr.port())),
        scrub_rate: 0,
        metrics: None,
    };
    let server = tokio::spawn(cairn_chunkserver::run(config, socket, shutdown.child_token()));

    wait_for("registration and a full report at the leader", || {
        let s = seen.lock().expect("lock");
        !s.registers.is_empty() && s.reports.iter().any(|r| r.last)
    })
    .await;
    {
        let s = seen.lock().expect("lock");
        let reg = &s.registers[0];
        assert_eq!(reg.node_id, node);
        assert_eq!(reg.addr, format!("localhost:{}", addr.port()));
        assert_eq!(reg.zone, "zone-a");
        assert!(reg.capacity_bytes > 0);
        assert_eq!(reg.used_bytes, 5000);
        assert_eq!(s.reports.len(), 1);
        assert_eq!(s.reports[0].hashes, vec![old_hash.0.to_vec()]);
    }
    assert!(follower_seen.lock().expect("lock").registers.is_empty(), "the follower refused");

    // A chunk put now shows up as added in a heartbeat.
    let ep = client_endpoint(&client_id);
    let conn = connect(&ep, addr).await.expect("connect");
    let new = pattern(7000, 2);
    let new_hash = ChunkHash::of(&new);
    let resp = put(&conn, new_hash.as_bytes(), &new, vec![]).await.expect("put");
    assert_eq!(resp.status, Status::Ok as i32, "{}", resp.message);
    wait_for("a heartbeat reporting the new chunk", || {
        seen.lock().expect("lock").heartbeats.iter().any(|h| h.added.contains(&new_hash.0.to_vec()))
    })
    .await;

    // The third heartbeat's answer asks for a report: the node registers and reports again.
    wait_for("a second registration and report", || {
        let s = seen.lock().expect("lock");
        s.registers.len() >= 2 && s.reports.iter().filter(|r| r.last).count() >= 2
    })
    .await;
    {
        let s = seen.lock().expect("lock");
        let second = s.reports.iter().filter(|r| r.last).nth(1).expect("second report");
        assert_eq!(second.hashes.len(), 2);
        let hb = s.heartbeats.last().expect("heartbeat");
        assert_eq!(hb.node_id, node);
        assert_eq!(hb.chunks, 2);
        assert_eq!(hb.used_bytes, 12_000);
    }

    shutdown.cancel();
    let res = tokio::time::timeout(Duration::from_secs(10), server).await.expect("run stops in time");
    res.expect("run task").expect("run result");
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_reports_skips_dead_masters_and_reregisters_on_not_found() {
    use cairn_chunkserver::heartbeat::{self, HeartbeatConfig};
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca(dir.path(), "ca");
    let master_id = identity(&ca, &dir.path().join("master"), Role::Node);
    let node_id = identity(&ca, &dir.path().join("node"), Role::Node);
    let shutdown = CancellationToken::new();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let leader_addr = listener.local_addr().expect("addr").to_string();
    let seen = Arc::new(Mutex::new(Seen::default()));
    start_master(&master_id, listener, FakeMaster::leader(seen.clone(), 0, 2), shutdown.clone());
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").to_string();

    let store = ChunkStore::open(&dir.path().join("data"), None).await.expect("open");
    let mut hashes = Vec::new();
    for i in 0..5u8 {
        let data = pattern(1000, i);
        let hash = ChunkHash::of(&data);
        store.put(hash, data.into()).await.expect("put");
        hashes.push(hash.0.to_vec());
    }
    let mut config = HeartbeatConfig::new(vec![dead, leader_addr], "127.0.0.1:1".into(), "z".into());
    config.report_page = 2;
    config.interval = Duration::from_millis(100);
    let worker = {
        let (store, shutdown) = (store.clone(), shutdown.clone());
        tokio::spawn(async move { heartbeat::run(config, &node_id, store, shutdown).await })
    };

    wait_for("re-registration after NotFound", || {
        let s = seen.lock().expect("lock");
        s.registers.len() >= 2 && s.reports.iter().filter(|r| r.last).count() >= 2
    })
    .await;
    {
        let s = seen.lock().expect("lock");
        let first: Vec<&ChunkReportRequest> = s.reports.iter().take(3).collect();
        assert_eq!(first.iter().map(|r| r.hashes.len()).collect::<Vec<_>>(), vec![2, 2, 1]);
        assert_eq!(first.iter().map(|r| r.last).collect::<Vec<_>>(), vec![false, false, true]);
        assert!(first.iter().all(|r| r.report_id == first[0].report_id));
        let mut got: Vec<Vec<u8>> = first.iter().flat_map(|r| r.hashes.clone()).collect();
        got.sort();
        hashes.sort();
        assert_eq!(got, hashes);
        assert_ne!(s.reports[3].report_id, first[0].report_id, "a new report gets a new id");
        // The five puts were drained into the first heartbeat, which the leader accepted.
        assert_eq!(s.heartbeats[0].added.len(), 5);
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), worker).await.expect("worker stops in time").expect("worker task");
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_store_sends_one_empty_last_page() {
    use cairn_chunkserver::heartbeat::{self, HeartbeatConfig};
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca(dir.path(), "ca");
    let master_id = identity(&ca, &dir.path().join("master"), Role::Node);
    let node_id = identity(&ca, &dir.path().join("node"), Role::Node);
    let shutdown = CancellationToken::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = Arc::new(Mutex::new(Seen::default()));
    start_master(&master_id, listener, FakeMaster::leader(seen.clone(), 0, 0), shutdown.clone());
    let store = ChunkStore::open(&dir.path().join("data"), None).await.expect("open");
    let config = HeartbeatConfig::new(vec![addr], "127.0.0.1:1".into(), "z".into());
    let worker = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { heartbeat::run(config, &node_id, store, shutdown).await })
    };
    wait_for("a heartbeat", || !seen.lock().expect("lock").heartbeats.is_empty()).await;
    {
        let s = seen.lock().expect("lock");
        assert_eq!(s.reports.len(), 1);
        assert!(s.reports[0].last && s.reports[0].hashes.is_empty());
        assert_eq!(s.heartbeats[0].chunks, 0);
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), worker).await.expect("worker stops in time").expect("worker task");
}
