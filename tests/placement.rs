//! Where replicas live over time: `cairn admin drain` empties a node without ever leaving a chunk
//! below its goal, and a new empty node receives data until usage is even.

mod common;

use std::time::Duration;

use common::{chunk_hashes, chunk_path, count_files, random_bytes, wait_for, Cluster, Options, MIB};

#[test]
fn a_drained_chunkserver_ends_empty_and_no_chunk_drops_below_its_goal() {
    let mut c = Cluster::start(Options { chunkservers: 4, dead_after_s: 3, ..Default::default() });
    let data = random_bytes(24 * MIB, 7);
    c.put_data(&data, "/f");
    let hashes = chunk_hashes(&data);
    let s = c.status();
    let victim = c.fullest(&hashes);
    let node_id: u64 =
        std::fs::read_to_string(c.chunkservers[victim].data.join("node_id")).unwrap().trim().parse().unwrap();
    assert!(s["chunkservers"].as_array().unwrap().iter().any(|n| n["id"] == node_id));
    // Watch every chunk's replicas on disk while the drain runs: never fewer than 3.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dirs: Vec<_> = c.chunkservers.iter().map(|p| p.data.clone()).collect();
    let watcher = {
        let (stop, hashes) = (stop.clone(), hashes.clone());
        std::thread::spawn(move || {
            let mut least = usize::MAX;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for h in &hashes {
                    least = least.min(dirs.iter().filter(|d| chunk_path(d, h).exists()).count());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            least
        })
    };
    let out = c.cli(&["admin", "drain", &node_id.to_string()]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(out.status.success(), "drain: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("can be stopped"));
    assert!(watcher.join().unwrap() >= 3, "a chunk dropped below 3 replicas during the drain");
    for h in &hashes {
        assert!(!chunk_path(&c.chunkservers[victim].data, h).exists(), "a replica is left on the drained node");
        assert_eq!(c.replicas_of(h).len(), 3);
    }
    let s = c.status();
    let n = s["chunkservers"].as_array().unwrap().iter().find(|n| n["id"] == node_id).unwrap().clone();
    assert_eq!((n["state"].as_str(), n["to_move"].as_u64()), (Some("draining"), Some(0)), "{n}");
    // New data avoids the draining node.
    let more = random_bytes(8 * MIB, 8);
    c.put_data(&more, "/g");
    for h in chunk_hashes(&more) {
        assert!(!chunk_path(&c.chunkservers[victim].data, &h).exists());
    }
    assert!(c.get_data("/f") == data);
    let e = common::expect_error(&c.cli(&["admin", "drain", "12345"]), "drain a stranger");
    assert!(e.contains("no chunkserver"), "{e}");
    // Removal: refused while the node runs, done once it is stopped and shows as dead.
    let id = node_id.to_string();
    let e = common::expect_error(&c.cli(&["admin", "forget", &id]), "forget a running node");
    assert!(e.contains("running"), "{e}");
    c.chunkservers[victim].kill();
    wait_for("the stopped node to show as dead", Duration::from_secs(30), || {
        c.status()["chunkservers"].as_array().unwrap().iter().any(|n| n["id"] == node_id && n["state"] == "dead")
    });
    let out = c.cli(&["admin", "forget", &id]);
    assert!(out.status.success(), "forget: {}", String::from_utf8_lossy(&out.stderr));
    let s = c.status();
    assert!(s["chunkservers"].as_array().unwrap().iter().all(|n| n["id"] != node_id), "still listed: {s}");
    assert_eq!(s["chunks"]["under_replicated"], 0);
    assert!(c.get_data("/f") == data);
}

#[test]
fn a_new_empty_chunkserver_receives_data_until_usage_is_even() {
    let cap = 256 * MIB as u64;
    let mut c = Cluster::start(Options { chunkservers: 3, capacities: vec![Some(cap); 3], ..Default::default() });
    let data = random_bytes(48 * MIB, 9);
    c.put_data(&data, "/f");
    let hashes = chunk_hashes(&data);
    c.add_chunkserver(Some(cap));
    let new = c.chunkservers[3].data.clone();
    // 36 replicas of 4 MiB over 4 nodes of 256 MiB: even within 5% of capacity means the new
    // node holds at least 6.
    wait_for("the new node to receive a fair share", Duration::from_secs(90), || {
        count_files(&new.join("by-hash")) >= 6 && hashes.iter().all(|h| c.replicas_of(h).len() == 3)
    });
    wait_for("no chunk over- or under-replicated", Duration::from_secs(30), || {
        let s = c.status();
        s["chunks"]["over_replicated"] == 0 && s["chunks"]["under_replicated"] == 0
    });
    assert!(c.get_data("/f") == data);
}

/// A reader that opened a file before its chunks moved (here the only copy of each, drained
/// away) finds them where they went instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_finds_chunks_that_moved_after_it_opened_the_file() {
    let c = Cluster::start(Options { chunkservers: 2, ..Default::default() });
    let client = c.client().await;
    let data = random_bytes(9 * MIB, 13);
    let opts = cairn_client::PutOptions { replication: 1, ..Default::default() };
    client.put_bytes("/one", data.clone().into(), &opts).await.unwrap();
    let opened = client.open_file("/one").await.unwrap();
    let holder = opened.extents[0].replicas[0].id.to_string();
    let out = tokio::task::block_in_place(|| c.cli(&["admin", "drain", &holder]));
    assert!(out.status.success(), "drain: {}", String::from_utf8_lossy(&out.stderr));
    let mut got: Vec<bytes::Bytes> = Vec::new();
    client.get_opened("/one", opened, &mut got, 0, None, &|_| {}).await.unwrap();
    assert!(got.concat() == data, "read back different bytes");
}
