//! A master group of real `cairn master` processes (ids 1..=n) and chunkservers that know all of
//! them, on loopback ports picked by the OS. Every process is killed by PID when the group drops.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_client::{Client, ClientConfig, PutOptions};
use cairn_common::tls;

use super::{chunkserver_args, cli_env, random_bytes, spawn, spawn_retrying, Proc};

pub struct Group {
    pub dir: tempfile::TempDir,
    /// masters[i] has id i + 1; a killed one keeps its slot (child None) for a restart.
    pub masters: Vec<Proc>,
    pub chunkservers: Vec<Proc>,
    pub client_tls: PathBuf,
    ca: PathBuf,
    extra: Vec<String>,
}

/// A port free now (outside the range bind(0) hands out, see `unused_port`): masters must know
/// each other's addresses before any of them starts, so they cannot bind port 0 themselves.
pub fn free_port() -> u16 {
    cairn_common::net::unused_port(std::net::Ipv4Addr::LOCALHOST.into()).expect("a free port")
}

impl Group {
    /// `extra` is added to every master's arguments (e.g. a small --compact-every).
    pub fn start(masters: usize, chunkservers: usize, extra: &[&str]) -> Group {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca");
        tls::init_ca(&ca).expect("init CA");
        let client_tls = dir.path().join("client-tls");
        tls::issue(&ca, &client_tls, tls::Role::Client, &[]).expect("issue client cert");
        let addrs: Vec<String> = cairn_common::net::unused_ports(std::net::Ipv4Addr::LOCALHOST.into(), masters)
            .expect("free ports")
            .into_iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let peers = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
        let mut g = Group {
            dir,
            masters: vec![],
            chunkservers: vec![],
            client_tls,
            ca,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for (i, addr) in addrs.iter().enumerate() {
            let mut args = g.master_args(i as u64 + 1, addr);
            args.extend(["--peers".into(), peers.clone()]);
            let p = g.spawn_master(i as u64 + 1, args);
            g.masters.push(p);
        }
        for i in 0..chunkservers {
            let node = g.dir.path().join(format!("cs{i}"));
            tls::issue(&g.ca, &node.join("tls"), tls::Role::Node, &[]).expect("issue cs cert");
            let mut p = spawn(&chunkserver_args(&node, &addrs.join(",")), &node.join("log"));
            p.data = node.join("data");
            g.chunkservers.push(p);
        }
        g.wait_alive(chunkservers);
        g
    }

    fn master_args(&self, id: u64, addr: &str) -> Vec<String> {
        let node = self.dir.path().join(format!("m{id}"));
        if !node.join("tls/cert.pem").exists() {
            tls::issue(&self.ca, &node.join("tls"), tls::Role::Node, &[]).expect("issue master cert");
        }
        let mut args: Vec<String> = vec![
            "master".into(),
            "--id".into(),
            id.to_string(),
            "--data".into(),
            node.join("data").display().to_string(),
            "--listen".into(),
            addr.into(),
            "--tls".into(),
            node.join("tls").display().to_string(),
        ];
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Starts `args`, retrying while the port is still held by a process just killed.
    fn spawn_master(&self, id: u64, args: Vec<String>) -> Proc {
        let dir = self.dir.path().join(format!("m{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let log = |_| {
            let n = (1..).find(|n| !dir.join(format!("log.{n}")).exists()).unwrap();
            dir.join(format!("log.{n}"))
        };
        let mut p = spawn_retrying(&args, log);
        p.data = dir.join("data");
        p
    }

    /// Starts master `id` empty, waiting to be added (`--join`), on a new port.
    pub fn start_joining(&mut self, id: u64) -> String {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = self.master_args(id, &addr);
        args.push("--join".into());
        let p = self.spawn_master(id, args);
        assert_eq!(self.masters.len() as u64 + 1, id, "joining ids follow the group's");
        self.masters.push(p);
        addr
    }

    pub fn kill_master(&mut self, id: u64) {
        self.masters[id as usize - 1].kill();
    }

    /// Restarts a killed master on its address and data.
    pub fn restart_master(&mut self, id: u64) {
        let args = self.masters[id as usize - 1].args.clone();
        self.masters[id as usize - 1] = self.spawn_master(id, args);
    }

    /// Every master's log, concatenated (for assertions on what happened).
    pub fn master_log(&self, id: u64) -> String {
        let dir = self.dir.path().join(format!("m{id}"));
        let mut out = String::new();
        for n in 1..100 {
            match std::fs::read_to_string(dir.join(format!("log.{n}"))) {
                Ok(s) => out.push_str(&s),
                Err(_) => break,
            }
        }
        out
    }

    pub fn addrs(&self) -> Vec<String> {
        self.masters.iter().map(|m| m.addr.clone()).collect()
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("CAIRN_MASTERS".into(), self.addrs().join(",")),
            ("CAIRN_TLS".into(), self.client_tls.display().to_string()),
        ]
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        cli_env(args, &self.env(), None)
    }

    /// `cairn status --json`, retried until it answers.
    pub fn status(&self) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let out = self.cli(&["status", "--json"]);
            if out.status.success() {
                return serde_json::from_slice(&out.stdout).expect("status --json is JSON");
            }
            assert!(start.elapsed() < Duration::from_secs(30), "status: {}", String::from_utf8_lossy(&out.stderr));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The id of the master that leads now (waits for one).
    pub fn leader(&self) -> u64 {
        let s = self.status();
        s["masters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["role"] == "leader")
            .and_then(|m| m["id"].as_u64())
            .expect("status names a leader")
    }

    pub fn wait_alive(&self, n: usize) {
        super::wait_for(&format!("{n} chunkservers alive"), Duration::from_secs(30), || {
            let s = self.status();
            s["chunkservers"].as_array().map_or(0, |a| a.iter().filter(|c| c["state"] == "alive").count()) >= n
        });
    }

    /// Waits until every listed master applied everything the leader committed.
    pub fn wait_caught_up(&self, ids: &[u64]) {
        super::wait_for("masters to catch up", Duration::from_secs(30), || {
            let s = self.status();
            let ms = s["masters"].as_array().unwrap().clone();
            let commit = ms.iter().find(|m| m["role"] == "leader").and_then(|m| m["commit_index"].as_u64());
            commit.is_some_and(|c| {
                ids.iter().all(|id| {
                    ms.iter().any(|m| m["id"] == *id && m["alive"] == true && m["applied_index"].as_u64() >= Some(c))
                })
            })
        });
    }

    pub async fn client(&self, deadline: Duration) -> Client {
        Client::connect(ClientConfig {
            masters: self.addrs(),
            tls_dir: self.client_tls.clone(),
            master_deadline: deadline,
        })
        .await
        .expect("connect client")
    }
}

/// A client writing small files and creating directories without pause, remembering each one
/// the cluster acknowledged. A mkdir that fails with "already exists" means a retry took effect
/// twice: the load records it and `finish` fails the test.
pub struct Load {
    pub stop: Arc<AtomicBool>,
    pub acked: Arc<Mutex<Vec<(String, u64, usize)>>>,
    pub dirs: Arc<Mutex<Vec<String>>>,
    pub twice: Arc<Mutex<Vec<String>>>,
    pub failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// What a load got acknowledged.
pub struct Acked {
    pub files: Vec<(String, u64, usize)>,
    pub dirs: Vec<String>,
}

pub fn content(seed: u64, len: usize) -> Vec<u8> {
    random_bytes(len, seed)
}

impl Load {
    /// Four writers, each in its own directory under `prefix`, sharing `client`.
    pub fn start(client: Client, prefix: &str, seed: u64) -> Load {
        const WORKERS: u64 = 4;
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicU64::new(0));
        let dirs: Arc<Mutex<Vec<String>>> = Default::default();
        let twice: Arc<Mutex<Vec<String>>> = Default::default();
        let mut workers = Vec::new();
        for w in 0..WORKERS {
            let (s, a, f, d, t) = (stop.clone(), acked.clone(), failed.clone(), dirs.clone(), twice.clone());
            let (client, prefix) = (client.clone(), format!("{prefix}/w{w}"));
            let seed = seed * WORKERS + w;
            workers.push(tokio::spawn(async move {
                while client.mkdir(&prefix, true).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let mut i = 0u64;
                while !s.load(Ordering::Relaxed) {
                    let path = format!("{prefix}/f{i}");
                    let fseed = seed * 1_000_000 + i;
                    let len = 1 + (fseed.wrapping_mul(2_654_435_761) % (200 << 10)) as usize;
                    let data = bytes::Bytes::from(content(fseed, len));
                    match client.put_bytes(&path, data, &PutOptions::default()).await {
                        Ok(_) => a.lock().unwrap().push((path, fseed, len)),
                        Err(e) => {
                            eprintln!("load: {path}: {e}");
                            f.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    let dir = format!("{prefix}/d{i}");
                    match client.mkdir(&dir, false).await {
                        Ok(_) => d.lock().unwrap().push(dir),
                        Err(cairn_client::Error::AlreadyExists(_)) => t.lock().unwrap().push(dir),
                        Err(e) => {
                            eprintln!("load: {dir}: {e}");
                            f.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
            }));
        }
        let task = tokio::spawn(async move {
            for w in workers {
                let _ = w.await;
            }
            client.close();
        });
        Load { stop, acked, dirs, twice, failed, task }
    }

    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `n` more files than now were acknowledged (writes resumed).
    pub async fn wait_more(&self, n: usize, timeout: Duration) {
        let want = self.acked() + n;
        let start = Instant::now();
        while self.acked() < want {
            assert!(start.elapsed() < timeout, "writes did not resume: {} acked, want {want}", self.acked());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn finish(self) -> Acked {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let twice = self.twice.lock().unwrap().clone();
        assert!(twice.is_empty(), "retried mkdirs answered 'already exists' (applied twice): {twice:?}");
        Acked { files: self.acked.lock().unwrap().clone(), dirs: self.dirs.lock().unwrap().clone() }
    }
}

/// Reads back every acknowledged file and compares it with what was written, and finds every
/// acknowledged directory.
pub async fn verify(client: &Client, acked: &Acked) {
    for (path, seed, len) in &acked.files {
        let got = client.read(path, 0, None).await.unwrap_or_else(|e| panic!("acknowledged {path} lost: {e}"));
        assert!(got == content(*seed, *len), "acknowledged {path} reads back wrong");
    }
    for dir in &acked.dirs {
        client.stat(dir).await.unwrap_or_else(|e| panic!("acknowledged directory {dir} lost: {e}"));
    }
}
