//! Data-path tests on a real cluster (1 master, 4 chunkservers as processes) through the client
//! library: round trips, replica placement, dedup, failures of chunkservers and the master.

mod common;

use std::path::Path;
use std::time::Duration;

use cairn_client::{Error, PutOptions};
use common::*;

async fn put(client: &cairn_client::Client, path: &str, data: &[u8]) {
    client.put(path, data, &PutOptions::default(), &|_| {}).await.unwrap_or_else(|e| panic!("put {path}: {e}"));
}

async fn get(client: &cairn_client::Client, path: &str) -> Vec<u8> {
    client.read(path, 0, None).await.unwrap_or_else(|e| panic!("get {path}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_at_replication_3() {
    let c = Cluster::start(Options::default());
    let client = c.client().await;
    let chunk = 4 * MIB;
    let sizes = [0, 1, chunk - 1, chunk, chunk + 1, 100 * MIB];
    for (i, n) in sizes.iter().enumerate() {
        let data = random_bytes(*n, i as u64);
        let path = format!("/f{n}");
        put(&client, &path, &data).await;
        let back = get(&client, &path).await;
        assert_eq!(blake3::hash(&back), blake3::hash(&data), "content of {path}");
        assert_eq!(client.stat(&path).await.unwrap().size, *n as u64);
        for h in chunk_hashes(&data) {
            assert_eq!(c.replicas_of(&h).len(), 3, "replicas of a chunk of {path}");
        }
    }
    // Ranged reads across chunk boundaries.
    let data = random_bytes(100 * MIB, 5);
    for (off, len) in
        [(0u64, 10u64), (chunk as u64 - 3, 7), (chunk as u64 * 3 + 11, chunk as u64 * 2), (100 * MIB as u64 - 5, 100)]
    {
        let got = client.read("/f104857600", off, Some(len)).await.unwrap();
        let end = (off + len).min(data.len() as u64) as usize;
        assert_eq!(got, &data[off as usize..end], "range {off}+{len}");
    }
    let s = c.status();
    assert_eq!(s["files"], 6);
    assert_eq!(s["chunks"]["under_replicated"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_content_is_stored_once() {
    let c = Cluster::start(Options::default());
    let client = c.client().await;
    let data = random_bytes(10 * MIB, 7);
    put(&client, "/a", &data).await;
    let files = c.chunk_files();
    assert_eq!(files, 3 * 3, "3 chunks at replication 3");
    put(&client, "/b", &data).await;
    assert_eq!(c.chunk_files(), files, "a second upload of the same bytes adds no chunk");
    assert_eq!(get(&client, "/b").await, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_a_killed_chunkserver() {
    let mut c = Cluster::start(Options::default());
    let client = c.client().await;
    let mut files = Vec::new();
    for i in 0..6 {
        let data = random_bytes(9 * MIB + i * 1000, 100 + i as u64);
        put(&client, &format!("/k{i}"), &data).await;
        files.push(data);
    }
    c.chunkservers[1].kill();
    for (i, data) in files.iter().enumerate() {
        assert_eq!(&get(&client, &format!("/k{i}")).await, data, "file {i} after kill -9");
    }
    // Writes go on too: placement avoids the dead node once the client or the master notices.
    let data = random_bytes(20 * MIB, 9);
    put(&client, "/after", &data).await;
    assert_eq!(get(&client, "/after").await, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_replica_is_skipped_and_reported() {
    // A whole chunk in its own file: the client hashes it and asks again for a server check.
    corrupt_replicas_are_skipped_and_reported(4 * MIB, |data_dir, hash, _| {
        let path = chunk_path(data_dir, hash);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[12345] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_packed_small_chunk_is_skipped_and_reported() {
    // A small chunk packed with others in a pack file, which the chunkserver checks itself.
    corrupt_replicas_are_skipped_and_reported(6000, |data_dir, _, data| {
        let mut hit = 0;
        for e in std::fs::read_dir(data_dir.join("packs")).unwrap() {
            let path = e.unwrap().path();
            let mut bytes = std::fs::read(&path).unwrap();
            if let Some(at) = bytes.windows(64).position(|w| w == &data[..64]) {
                bytes[at + 1234] ^= 0x40;
                std::fs::write(&path, bytes).unwrap();
                hit += 1;
            }
        }
        assert_eq!(hit, 1, "the chunk is in one pack of {}", data_dir.display());
    })
    .await;
}

/// Puts a file of one chunk, damages the copies of it on two of its three chunkservers with
/// `corrupt(data dir, chunk hash, content)`, and checks that reads still return the content
/// and that a chunkserver moves its damaged copy aside and tells the master.
async fn corrupt_replicas_are_skipped_and_reported(size: usize, corrupt: impl Fn(&Path, &blake3::Hash, &[u8])) {
    let c = Cluster::start(Options::default());
    let client = c.client().await;
    let data = random_bytes(size, 11);
    put(&client, "/c", &data).await;
    let h = chunk_hashes(&data)[0];
    let replicas = c.replicas_of(&h);
    assert_eq!(replicas.len(), 3);
    // Every replica but one is damaged, so that a read must find the good one.
    for r in &replicas[..2] {
        corrupt(r, &h, &data);
    }
    // Replicas are tried in a random order: within a few reads one lands on a corrupt copy first.
    let quarantined = || c.chunkservers.iter().map(|cs| count_files(&cs.data.join("corrupt"))).sum::<usize>();
    for _ in 0..40 {
        assert_eq!(get(&client, "/c").await, data, "read with corrupt replicas");
        if quarantined() >= 1 {
            break;
        }
    }
    assert!(quarantined() >= 1, "no chunkserver found its copy corrupt");
    // The chunkserver that found its copy corrupt moved it aside and told the master, which
    // stops sending readers there and has the chunk copied again: three replicas listed, each
    // on a node that holds the chunk.
    let t = std::time::Instant::now();
    loop {
        let file = client.open_file("/c").await.unwrap();
        let listed: Vec<&str> = file.extents[0].replicas.iter().map(|r| r.addr.as_str()).collect();
        let holding: Vec<&str> =
            c.chunkservers.iter().filter(|cs| holds(&cs.data, &h)).map(|cs| cs.addr.as_str()).collect();
        if listed.len() == 3 && listed.iter().all(|r| holding.contains(r)) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "replicas listed {listed:?}, on disk {holding:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_restart_keeps_the_namespace() {
    let mut c = Cluster::start(Options::default());
    let client = c.client().await;
    client.mkdir("/d/e", true).await.unwrap();
    let data = random_bytes(13 * MIB, 21);
    put(&client, "/d/e/f", &data).await;
    put(&client, "/d/g", b"small").await;
    client.rename("/d/g", "/d/h").await.unwrap();
    c.restart_master();
    // A new client, as after a real restart; it waits for the chunkservers' reports.
    let client = c.client().await;
    assert_eq!(get(&client, "/d/e/f").await, data);
    assert_eq!(get(&client, "/d/h").await, b"small");
    assert!(matches!(client.stat("/d/g").await, Err(Error::NotFound(_))));
    let (_, entries) = client.list("/d").await.unwrap();
    assert_eq!(entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), vec!["e", "h"]);
    c.wait_alive(4);
    put(&client, "/d/new", &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disks_are_avoided_or_reported() {
    // Two chunkservers with room for about one chunk beyond the 64 MiB the master keeps free.
    let small = Some(70 * MIB as u64);
    let c = Cluster::start(Options { capacities: vec![small, small, None, None], ..Default::default() });
    let client = c.client().await;
    let data = random_bytes(40 * MIB, 31);
    // Replication 2 fits on the two large nodes: placement moves on from the full ones.
    client.put("/two", &data[..], &PutOptions { replication: 2, ..Default::default() }, &|_| {}).await.unwrap();
    assert_eq!(get(&client, "/two").await, data);
    // Replication 3 needs a third node with room, and there is none once the small ones fill.
    let err = client.put("/three", &data[..], &PutOptions::default(), &|_| {}).await.unwrap_err();
    assert!(matches!(err, Error::NotEnoughChunkservers(_)), "{err}");
    assert!(matches!(client.stat("/three").await, Err(Error::NotFound(_))), "nothing half-visible");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_cannot_reach_node_services() {
    use cairn_proto::v1::{
        cluster_client::ClusterClient, raft_client::RaftClient, DescribeRequest, RaftMessage, RegisterRequest,
        SnapshotChunk,
    };
    let c = Cluster::start(Options { chunkservers: 1, ..Default::default() });
    let channel = common::grpc_channel(&c.master.addr, &c.client_tls).await;
    let req = RegisterRequest { node_id: 42, addr: "127.0.0.1:9".into(), zone: "evil".into(), ..Default::default() };
    let err = ClusterClient::new(channel.clone()).register(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let mut raft = RaftClient::new(channel);
    let msgs = tokio_stream::iter(vec![RaftMessage { message: vec![], from_addr: "127.0.0.1:9".into() }]);
    let err = raft.stream(msgs).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = raft.install_snapshot(tokio_stream::iter(vec![SnapshotChunk::default()])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = raft.describe(DescribeRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // The chunkserver (a node certificate) is registered as usual.
    assert_eq!(c.status()["chunkservers"].as_array().unwrap().len(), 1);
}

/// Chunks of at most 64 KiB are packed (appended to a file per chunkserver): every one of them
/// acknowledged before all chunkservers are killed with SIGKILL, in the middle of more puts, is
/// on three nodes' disks and reads back after they restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_acknowledged_before_every_chunkserver_is_killed_are_kept() {
    use std::sync::{Arc, Mutex};
    let mut c = Cluster::start(Options::default());
    let client = c.client().await;
    let sizes = [1, 100, 4096, 30_000, cairn_chunkserver::store::PACKED_MAX, cairn_chunkserver::store::PACKED_MAX + 1];
    type Acked = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
    let acked: Acked = Arc::default();
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (client, acked) = (client.clone(), acked.clone());
            tokio::spawn(async move {
                for i in 0u64.. {
                    let data = random_bytes(sizes[(i % 6) as usize], w * 1_000_000 + i);
                    let path = format!("/w{w}-{i}");
                    if client.put(&path, &data[..], &PutOptions::default(), &|_| {}).await.is_err() {
                        return;
                    }
                    acked.lock().unwrap().push((path, data));
                }
            })
        })
        .collect();
    wait_for("200 small puts", Duration::from_secs(60), || acked.lock().unwrap().len() >= 200);
    for cs in &mut c.chunkservers {
        cs.kill();
    }
    for w in writers {
        w.abort();
    }
    let acked = acked.lock().unwrap().clone();
    for i in 0..c.chunkservers.len() {
        c.restart_chunkserver(i);
    }
    c.wait_alive(4);
    let mut packed = 0;
    for (path, data) in &acked {
        assert_eq!(&get(&client, path).await, data, "{path} after every chunkserver was killed");
        let h = chunk_hashes(data)[0];
        assert_eq!(c.replicas_of(&h).len(), 3, "replicas of {path}");
        if data.len() <= cairn_chunkserver::store::PACKED_MAX {
            packed += 1;
            assert!(c.chunkservers.iter().all(|cs| !chunk_path(&cs.data, &h).exists()), "{path} has a chunk file");
        }
    }
    assert!(packed >= 150, "{packed} packed files of {}", acked.len());
    // The packs take more after the restart.
    let data = random_bytes(5000, 7);
    put(&client, "/after", &data).await;
    assert_eq!(get(&client, "/after").await, data);
}
