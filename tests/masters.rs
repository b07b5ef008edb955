//! The master group under failures, with real processes: kill -9 of the leader and of a follower
//! under load, a lagging follower brought back by a snapshot, membership changes under load (and
//! the whole group killed right after them), and leadership handed over on SIGTERM. Every
//! acknowledged file must read back intact.

mod common;

use std::time::Duration;

use common::group::{verify, Group, Load};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_then_a_follower_loses_nothing() {
    let mut g = Group::start(3, 3, &[]);
    let load = Load::start(g.client(Duration::from_secs(5)).await, "/load", 1);
    load.wait_more(20, Duration::from_secs(30)).await;

    // Leaders killed in the middle of requests: the retries of those that took effect must be
    // answered with their first result (the load checks mkdirs for that).
    for _ in 0..2 {
        let leader = g.leader();
        g.kill_master(leader);
        load.wait_more(20, Duration::from_secs(30)).await;
        g.restart_master(leader);
        g.wait_caught_up(&[1, 2, 3]);
    }
    let leader = g.leader();
    g.kill_master(leader);
    load.wait_more(20, Duration::from_secs(30)).await;
    let new_leader = g.leader();
    assert_ne!(new_leader, leader);

    // The last follower: the leader alone has no quorum, so nothing can be acknowledged.
    let follower = (1..=3).find(|id| *id != leader && *id != new_leader).unwrap();
    g.kill_master(follower);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = load.acked();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(load.acked(), before, "a master without a quorum acknowledged a write");

    g.restart_master(leader);
    g.restart_master(follower);
    load.wait_more(20, Duration::from_secs(30)).await;
    let acked = load.finish().await;
    assert!(acked.files.len() >= 60, "{} files acknowledged", acked.files.len());
    let client = g.client(Duration::from_secs(15)).await;
    verify(&client, &acked).await;
    g.wait_caught_up(&[1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_compacted_log_catches_up_by_snapshot() {
    let mut g = Group::start(3, 1, &["--compact-every", "50"]);
    let leader = g.leader();
    let lagging = (1..=3).find(|id| *id != leader).unwrap();
    g.kill_master(lagging);
    let client = g.client(Duration::from_secs(10)).await;
    for i in 0..300 {
        client.mkdir(&format!("/d{i}"), false).await.unwrap();
    }
    g.restart_master(lagging);
    g.wait_caught_up(&[1, 2, 3]);
    assert!(
        g.master_log(lagging).contains("installed a snapshot"),
        "the lagging master did not get a snapshot: {}",
        g.master_log(lagging)
    );
    // Reads served by the caught-up master (made leader) see everything.
    let out = g.cli(&["admin", "masters", "transfer", &lagging.to_string()]);
    assert!(out.status.success(), "transfer: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(g.leader(), lagging);
    let (_, entries) = client.list("/").await.unwrap();
    assert_eq!(entries.len(), 300);
    // And it keeps taking writes as the leader.
    client.mkdir("/after", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_and_sigterm_handover_under_load() {
    let mut g = Group::start(3, 3, &[]);
    let load = Load::start(g.client(Duration::from_secs(10)).await, "/load", 2);
    load.wait_more(10, Duration::from_secs(30)).await;

    // Add master 4, which starts empty and gets a snapshot.
    let addr = g.start_joining(4);
    let out = g.cli(&["admin", "masters", "add", &format!("4={addr}")]);
    assert!(out.status.success(), "add: {}", String::from_utf8_lossy(&out.stderr));
    g.wait_caught_up(&[1, 2, 3, 4]);
    load.wait_more(10, Duration::from_secs(30)).await;

    // Remove a follower that is not the new one.
    let leader = g.leader();
    let gone = (1..=3).find(|id| *id != leader).unwrap();
    let out = g.cli(&["admin", "masters", "remove", &gone.to_string()]);
    assert!(out.status.success(), "remove: {}", String::from_utf8_lossy(&out.stderr));
    let s = g.status();
    let ids: Vec<u64> = s["masters"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert!(!ids.contains(&gone) && ids.contains(&4) && ids.len() == 3, "members: {ids:?}");
    g.kill_master(gone);
    load.wait_more(10, Duration::from_secs(30)).await;

    // Every member killed at once, right after the changes: the namespace's transactions are
    // not synced one by one, so a restart applies the changes again from the log, and the
    // group must come back with the same members.
    for id in &ids {
        g.kill_master(*id);
    }
    for id in &ids {
        g.restart_master(*id);
    }
    g.wait_caught_up(&ids);
    let mut again: Vec<u64> =
        g.status()["masters"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    let mut before = ids.clone();
    again.sort_unstable();
    before.sort_unstable();
    assert_eq!(again, before, "members after a restart of the whole group");
    load.wait_more(10, Duration::from_secs(30)).await;
    let leader = g.leader();

    // Removing the leader is refused with one clear line.
    let out = g.cli(&["admin", "masters", "remove", &leader.to_string()]);
    common::expect_error(&out, "remove the leader");

    // SIGTERM to the leader: it hands leadership over before exiting.
    let pid = g.masters[leader as usize - 1].pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    common::wait_for("the leader to exit on SIGTERM", Duration::from_secs(10), || {
        !g.masters[leader as usize - 1].alive()
    });
    assert!(
        g.master_log(leader).contains("handed leadership over"),
        "no handover in the log: {}",
        g.master_log(leader)
    );
    load.wait_more(10, Duration::from_secs(30)).await;
    let acked = load.finish().await;
    let client = g.client(Duration::from_secs(15)).await;
    verify(&client, &acked).await;
}
