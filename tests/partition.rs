//! A leader cut off from the other masters, with real network isolation: each master runs in its
//! own network namespace on a bridge, with its own address; the test (clients, chunkservers)
//! stays in the root namespace and reaches all of them. A partition is a pair of blackhole
//! routes between namespaces, so the client can still talk to the isolated leader.
//!
//! Checked: the isolated leader cannot commit (a mutation sent to it alone fails), the majority
//! elects a new leader and takes writes, and after healing the old leader follows and every
//! acknowledged mutation is there.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_common::tls;
use cairn_proto::v1::{master_client::MasterClient, MkdirRequest, StatRequest};
use common::{cli_env, wait_for, Proc, BIN};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Namespaces, bridge and processes of one test, torn down on drop (processes first).
struct Net {
    tag: String,
    subnet: String,
    masters: Vec<Proc>,
}

impl Net {
    fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.tag)
    }
    fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    fn setup(n: usize) -> Net {
        let pid = std::process::id();
        let tag = format!("cairnt{}", pid % 100_000);
        let subnet = format!("10.{}.{}", 100 + (pid / 250) % 100, pid % 250);
        let net = Net { tag: tag.clone(), subnet: subnet.clone(), masters: vec![] };
        let br = format!("{tag}b");
        ip(&["link", "add", &br, "type", "bridge"]);
        ip(&["addr", "add", &format!("{subnet}.254/24"), "dev", &br]);
        ip(&["link", "set", &br, "up"]);
        for i in 0..n {
            let ns = net.ns(i);
            let (host, inner) = (format!("{tag}h{i}"), format!("{tag}i{i}"));
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &host, "master", &br]);
            ip(&["link", "set", &host, "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", net.addr(i)), "dev", &inner]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    /// Blackhole routes between master `i` and every other master (both directions).
    fn isolate(&self, i: usize, n: usize, cut: bool) {
        let verb = if cut { "add" } else { "del" };
        for j in (0..n).filter(|j| *j != i) {
            ip(&["-n", &self.ns(i), "route", verb, "blackhole", &format!("{}/32", self.addr(j))]);
            ip(&["-n", &self.ns(j), "route", verb, "blackhole", &format!("{}/32", self.addr(i))]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.masters.clear();
        for i in 0..8 {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(i)]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &format!("{}b", self.tag)]).output();
    }
}

fn spawn_in(ns: &str, args: &[String], log: &std::path::Path) -> Proc {
    let err = std::fs::File::create(log).unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, BIN])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(err)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").map(String::from).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("master did not start in {ns}: {line:?} {}", std::fs::read_to_string(log).unwrap_or_default())
    });
    Proc { child: Some(child), addr, data: Default::default(), args: args.to_vec() }
}

fn status(env: &[(String, String)]) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let out = cli_env(&["status", "--json"], env, None);
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "status: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn leader(env: &[(String, String)]) -> Option<(usize, serde_json::Value)> {
    let s = status(env);
    let m = s["masters"].as_array().unwrap().iter().find(|m| m["role"] == "leader")?.clone();
    Some((m["id"].as_u64().unwrap() as usize - 1, m))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_cannot_commit_and_steps_down() {
    assert!(unsafe { libc::geteuid() } == 0, "this test needs root (network namespaces); CI runs as root");
    const N: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    tls::init_ca(&ca).unwrap();
    let client_tls = dir.path().join("client-tls");
    tls::issue(&ca, &client_tls, tls::Role::Client, &[]).unwrap();
    let mut net = Net::setup(N);
    let peers = (0..N).map(|i| format!("{}={}:7000", i + 1, net.addr(i))).collect::<Vec<_>>().join(",");
    for i in 0..N {
        let node = dir.path().join(format!("m{i}"));
        tls::issue(&ca, &node.join("tls"), tls::Role::Node, &[]).unwrap();
        let args: Vec<String> = [
            "master",
            "--id",
            &(i + 1).to_string(),
            "--data",
            &node.join("data").display().to_string(),
            "--listen",
            &format!("{}:7000", net.addr(i)),
            "--peers",
            &peers,
            "--tls",
            &node.join("tls").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = spawn_in(&net.ns(i), &args, &node.join("log"));
        net.masters.push(p);
    }
    let all: Vec<String> = (0..N).map(|i| format!("{}:7000", net.addr(i))).collect();
    let env =
        vec![("CAIRN_MASTERS".to_string(), all.join(",")), ("CAIRN_TLS".to_string(), client_tls.display().to_string())];
    let mut acked = Vec::new();
    for i in 0..10 {
        let out = cli_env(&["mkdir", &format!("/before-{i}")], &env, None);
        assert!(out.status.success(), "mkdir: {}", String::from_utf8_lossy(&out.stderr));
        acked.push(format!("/before-{i}"));
    }
    let (old, _) = leader(&env).expect("a leader");
    net.isolate(old, N, true);

    // A mutation sent to the isolated leader alone (no retries, no hints followed) is not
    // acknowledged: it cannot reach a quorum, and the leader steps down (check-quorum).
    let ch = common::grpc_channel(&all[old], &client_tls).await;
    let req = MkdirRequest { path: "/minority".into(), mode: 0o755, ..Default::default() };
    let res = tokio::time::timeout(Duration::from_secs(15), MasterClient::new(ch.clone()).mkdir(req)).await;
    match res {
        Ok(Ok(_)) => panic!("an isolated leader acknowledged a mutation"),
        Ok(Err(s)) => {
            eprintln!("isolated leader answered: {s:?}");
            assert_eq!(s.code(), tonic::Code::Unavailable, "{s}")
        }
        Err(_) => {} // no answer is not an acknowledgement either
    }

    // The majority elects a new leader and takes writes (the client reaches every master).
    let only_majority: Vec<String> =
        all.iter().enumerate().filter(|(i, _)| *i != old).map(|(_, a)| a.clone()).collect();
    let menv = vec![("CAIRN_MASTERS".to_string(), only_majority.join(",")), env[1].clone()];
    for i in 0..10 {
        let out = cli_env(&["mkdir", &format!("/during-{i}")], &menv, None);
        assert!(out.status.success(), "mkdir in the majority: {}", String::from_utf8_lossy(&out.stderr));
        acked.push(format!("/during-{i}"));
    }
    let (new, _) = leader(&menv).expect("the majority has a leader");
    assert_ne!(new, old);

    // The isolated old leader, asked directly, must not answer a read from its stale state: its
    // lease ran out before the majority could elect anyone (see `node::LEASE`).
    let req = StatRequest { path: "/during-0".into() };
    match tokio::time::timeout(Duration::from_secs(15), MasterClient::new(ch).stat(req)).await {
        Ok(Ok(r)) => panic!("the isolated old leader answered a read: {r:?}"),
        Ok(Err(s)) => assert_eq!(s.code(), tonic::Code::Unavailable, "the isolated old leader answered {s:?}"),
        Err(_) => {} // no answer is not a stale answer either
    }

    // Heal: the old leader follows the new term and has everything.
    net.isolate(old, N, false);
    wait_for("the old leader to catch up as a follower", Duration::from_secs(30), || {
        let s = status(&env);
        let ms = s["masters"].as_array().unwrap().clone();
        let commit = ms.iter().find(|m| m["role"] == "leader").and_then(|m| m["commit_index"].as_u64());
        let o = &ms[old];
        o["role"] == "follower" && commit.is_some_and(|c| o["applied_index"].as_u64() >= Some(c))
    });
    let out = cli_env(&["ls", "/"], &env, None);
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    for p in &acked {
        assert!(listing.contains(p.trim_start_matches('/')), "acknowledged {p} missing after heal: {listing}");
    }
    // Whatever the isolated leader took was never acknowledged; it may exist only if a retry
    // committed it, which this test did not send.
    assert!(!listing.contains("minority"), "a mutation of the isolated leader surfaced: {listing}");
}
