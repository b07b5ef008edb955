//! Re-replication: when a chunkserver dies, the leader has the surviving nodes copy its chunks
//! until every chunk is back at its replication goal, and the data still reads back intact.

mod common;

use std::time::Duration;

use common::{chunk_hashes, chunk_path, random_bytes, wait_for, Cluster, Options, MIB};

#[test]
fn a_dead_chunkservers_chunks_are_copied_back_to_the_goal() {
    let mut c = Cluster::start(Options { chunkservers: 4, dead_after_s: 3, ..Default::default() });
    let data = random_bytes(24 * MIB, 41);
    let local = c.dir.path().join("in.bin");
    std::fs::write(&local, &data).unwrap();
    let out = c.cli(&["put", local.to_str().unwrap(), "/f"]);
    assert!(out.status.success(), "put: {}", String::from_utf8_lossy(&out.stderr));
    let hashes = chunk_hashes(&data);
    for h in &hashes {
        assert_eq!(c.replicas_of(h).len(), 3, "replication 3 before the failure");
    }
    // The node holding the most chunks dies.
    let victim = c.fullest(&hashes);
    c.chunkservers[victim].kill();
    let live: Vec<_> = (0..4).filter(|i| *i != victim).map(|i| c.chunkservers[i].data.clone()).collect();
    wait_for("every chunk back at 3 live replicas", Duration::from_secs(60), || {
        hashes.iter().all(|h| live.iter().filter(|d| chunk_path(d, h).exists()).count() == 3)
    });
    wait_for("status to show no chunk under-replicated", Duration::from_secs(30), || {
        let s = c.status();
        s["chunks"]["under_replicated"] == 0 && s["chunks"]["lost"] == 0 && s["chunks"]["repair_queue"] == 0
    });
    let s = c.status();
    assert_eq!(s["chunks"]["by_replicas"][3], s["chunks"]["total"], "every chunk at 3 live replicas: {}", s["chunks"]);
    let back = c.dir.path().join("back.bin");
    let out = c.cli(&["get", "/f", back.to_str().unwrap()]);
    assert!(out.status.success(), "get: {}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(&back).unwrap() == data, "the file reads back different");
}
