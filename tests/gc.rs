//! Deleting what nobody needs: chunks no file references (garbage collection, with the upload
//! race it must never lose), surplus replicas after a node comes back (trimming), and replicas
//! that rotted on disk (the scrubber finds them; re-replication puts good copies back).

mod common;

use std::time::Duration;

use cairn_proto::v1::{master_client::MasterClient, ChunkSpec, CommitFileRequest, Extent, PlaceChunksRequest};
use common::{chunk_hashes, chunk_path, count_files, grpc_channel, random_bytes, wait_for, Cluster, Options, MIB};

fn cluster_with_grace(grace_s: u64) -> Cluster {
    Cluster::start(Options {
        chunkservers: 4,
        dead_after_s: 3,
        master_args: vec!["--gc-grace-s".into(), grace_s.to_string()],
        ..Default::default()
    })
}

fn rm(c: &Cluster, remote: &str) {
    let out = c.cli(&["rm", remote]);
    assert!(out.status.success(), "rm {remote}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn chunks_of_deleted_files_are_collected_and_the_rest_kept() {
    let c = cluster_with_grace(2);
    let (a, b) = (random_bytes(12 * MIB, 1), random_bytes(8 * MIB, 2));
    c.put_data(&a, "/a");
    c.put_data(&b, "/b");
    rm(&c, "/a");
    wait_for("the chunks of /a to leave every chunkserver", Duration::from_secs(60), || {
        chunk_hashes(&a).iter().all(|h| c.replicas_of(h).is_empty())
    });
    wait_for("status to show no garbage left", Duration::from_secs(30), || c.status()["chunks"]["gc_backlog"] == 0);
    for h in chunk_hashes(&b) {
        assert_eq!(c.replicas_of(&h).len(), 3, "a referenced chunk keeps its replicas");
    }
    assert!(c.get_data("/b") == b, "/b reads back different");
}

/// The race garbage collection must never lose: a client is told a chunk is already stored
/// (deduplication) just as the last file referencing it goes away, and commits it a little later.
#[test]
fn a_chunk_offered_to_an_upload_survives_collection_until_committed() {
    let c = cluster_with_grace(4);
    let data = random_bytes(3 * MIB, 3);
    let hash = blake3::hash(&data);
    c.put_data(&data, "/a");
    // Past the grace period of the put itself: only the new placement can protect the chunk.
    std::thread::sleep(Duration::from_secs(5));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut m = rt.block_on(async { MasterClient::new(grpc_channel(&c.master.addr, &c.client_tls).await) });
    let place = PlaceChunksRequest {
        chunks: vec![ChunkSpec { hash: hash.as_bytes().to_vec(), length: data.len() as u64 }],
        replication: 3,
        exclude: vec![],
    };
    let commit = |path: &str| CommitFileRequest {
        path: path.into(),
        extents: vec![Extent { hash: hash.as_bytes().to_vec(), length: data.len() as u64 }],
        replication: 3,
        mode: 0o644,
        ..Default::default()
    };
    rm(&c, "/a");
    let p = rt.block_on(m.place_chunks(place.clone())).expect("place").into_inner();
    assert!(p.placements[0].stored, "the cluster still holds the chunk: no upload needed");
    // Collection rounds run every second meanwhile; the chunk is garbage but was just offered.
    std::thread::sleep(Duration::from_millis(2500));
    rt.block_on(m.commit_file(commit("/b"))).expect("commit within the grace period");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(c.replicas_of(&hash).len(), 3, "a committed chunk keeps every replica");
    assert!(c.get_data("/b") == data, "/b reads back different");

    // The other side: an offer nobody commits within the grace period lapses, the chunk is
    // collected, and a late commit is refused instead of naming a deleted chunk.
    rm(&c, "/b");
    let p = rt.block_on(m.place_chunks(place)).expect("place").into_inner();
    assert!(p.placements[0].stored);
    wait_for("the unclaimed chunk to be collected", Duration::from_secs(60), || c.replicas_of(&hash).is_empty());
    let late = rt.block_on(m.commit_file(commit("/c")));
    assert!(late.is_err(), "a commit of a collected chunk was accepted");
    assert!(!c.cli(&["stat", "/c"]).status.success(), "/c exists");
}

#[test]
fn a_returning_chunkservers_surplus_replicas_are_trimmed() {
    let mut c = Cluster::start(Options { chunkservers: 4, dead_after_s: 3, ..Default::default() });
    let data = random_bytes(24 * MIB, 4);
    c.put_data(&data, "/f");
    let hashes = chunk_hashes(&data);
    let victim = c.fullest(&hashes);
    c.chunkservers[victim].kill();
    let others: Vec<_> = (0..4).filter(|i| *i != victim).map(|i| c.chunkservers[i].data.clone()).collect();
    wait_for("every chunk at 3 replicas without the victim", Duration::from_secs(60), || {
        hashes.iter().all(|h| others.iter().filter(|d| chunk_path(d, h).exists()).count() == 3)
    });
    c.restart_chunkserver(victim);
    wait_for("surplus replicas trimmed to exactly 3", Duration::from_secs(60), || {
        hashes.iter().all(|h| c.replicas_of(h).len() == 3)
    });
    wait_for("status to show nothing over-replicated", Duration::from_secs(30), || {
        let s = c.status();
        s["chunks"]["over_replicated"] == 0 && s["chunks"]["trim_queue"] == 0 && s["chunks"]["under_replicated"] == 0
    });
    assert!(c.get_data("/f") == data, "/f reads back different");
}

#[test]
fn the_scrubber_finds_a_rotten_replica_and_a_good_copy_replaces_it() {
    let c = Cluster::start(Options { chunkservers: 4, dead_after_s: 3, ..Default::default() });
    let data = random_bytes(8 * MIB, 5);
    c.put_data(&data, "/f");
    let hash = chunk_hashes(&data)[0];
    let node = c.chunkservers.iter().find(|n| chunk_path(&n.data, &hash).exists()).unwrap();
    let path = chunk_path(&node.data, &hash);
    // Bit rot: same size, one byte different.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[12345] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let corrupt_dir = node.data.join("corrupt");
    wait_for("the scrubber to quarantine the rotten replica", Duration::from_secs(60), || {
        count_files(&corrupt_dir) == 1
    });
    wait_for("3 good replicas again", Duration::from_secs(60), || {
        let r = c.replicas_of(&hash);
        r.len() == 3 && r.iter().all(|d| std::fs::read(chunk_path(d, &hash)).is_ok_and(|b| blake3::hash(&b) == hash))
    });
    assert!(c.get_data("/f") == data, "/f reads back different");
}
