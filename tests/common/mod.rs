//! Test harness: a real cluster of `cairn` processes in a temp dir, on ports the OS picks. Every
//! child is killed by PID when its guard drops, even when the test fails.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cairn_client::{Client, ClientConfig};
use cairn_common::tls;

pub mod group;

pub const BIN: &str = env!("CARGO_BIN_EXE_cairn");
pub const MIB: usize = 1 << 20;

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub addr: String,
    pub data: PathBuf,
    pub args: Vec<String>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `cairn ARGS` and waits for its "listening on ADDR" line.
pub fn spawn(args: &[String], log: &Path) -> Proc {
    let err = std::fs::File::create(log).expect("create log");
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(err)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn cairn");
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    out.read_line(&mut line).expect("read listening line");
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| {
        let _ = child.kill();
        panic!("cairn {args:?} did not start: {line:?}; log: {}", std::fs::read_to_string(log).unwrap_or_default())
    });
    Proc { addr: addr.to_string(), child: Some(child), data: PathBuf::new(), args: args.to_vec() }
}

/// Starts `cairn ARGS` until it listens, retrying for a while when it exits at once (its port is
/// still held by a process just killed). `log(n)` names the log of attempt n.
pub fn spawn_retrying(args: &[String], log: impl Fn(usize) -> PathBuf) -> Proc {
    let start = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let path = log(n);
        let err = std::fs::File::create(&path).expect("create log");
        let mut child =
            Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(err).stdin(Stdio::null()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        if let Some(addr) = line.trim().strip_prefix("listening on ") {
            return Proc { addr: addr.to_string(), child: Some(child), data: PathBuf::new(), args: args.to_vec() };
        }
        let _ = child.wait();
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "cairn {args:?} did not start: {}",
            std::fs::read_to_string(&path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `cairn chunkserver` on loopback (any port) with data and TLS identity under `node`.
pub fn chunkserver_args(node: &Path, masters: &str) -> Vec<String> {
    vec![
        "chunkserver".into(),
        "--data".into(),
        node.join("data").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--masters".into(),
        masters.into(),
        "--tls".into(),
        node.join("tls").display().to_string(),
    ]
}

/// A gRPC channel to a master with the client certificate in `tls` (tests that call RPCs raw).
pub async fn grpc_channel(addr: &str, tls: &Path) -> tonic::transport::Channel {
    let identity = tls::Identity::load(tls).expect("load client identity");
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(identity.grpc_client())
        .expect("TLS config")
        .connect()
        .await
        .expect("connect to master")
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub master: Proc,
    pub chunkservers: Vec<Proc>,
    pub client_tls: PathBuf,
}

pub struct Options {
    pub chunkservers: usize,
    /// Per-chunkserver capacity caps (None: the disk).
    pub capacities: Vec<Option<u64>>,
    pub dead_after_s: u64,
    /// More arguments for the master (e.g. a short `--gc-grace-s`).
    pub master_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options { chunkservers: 4, capacities: vec![], dead_after_s: 10, master_args: vec![] }
    }
}

impl Cluster {
    pub fn start(opts: Options) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca");
        tls::init_ca(&ca).expect("init CA");
        let client_tls = dir.path().join("client-tls");
        tls::issue(&ca, &client_tls, tls::Role::Client, &[]).expect("issue client cert");
        let mtls = dir.path().join("master/tls");
        tls::issue(&ca, &mtls, tls::Role::Node, &["127.0.0.1".parse().unwrap()]).expect("issue master cert");
        let mut master = Self::spawn_master(dir.path(), "127.0.0.1:0", opts.dead_after_s, &opts.master_args);
        master.data = dir.path().join("master/data");
        let mut chunkservers = Vec::new();
        for i in 0..opts.chunkservers {
            let node = dir.path().join(format!("cs{i}"));
            tls::issue(&ca, &node.join("tls"), tls::Role::Node, &["127.0.0.1".parse().unwrap()])
                .expect("issue cs cert");
            let mut args = chunkserver_args(&node, &master.addr);
            if let Some(Some(cap)) = opts.capacities.get(i) {
                args.extend(["--capacity".into(), cap.to_string()]);
            }
            let mut p = spawn(&args, &node.join("log"));
            p.data = node.join("data");
            chunkservers.push(p);
        }
        let c = Cluster { dir, master, chunkservers, client_tls };
        c.wait_alive(opts.chunkservers);
        c
    }

    fn spawn_master(dir: &Path, listen: &str, dead_after_s: u64, extra: &[String]) -> Proc {
        let mut args: Vec<String> = vec![
            "master".into(),
            "--id".into(),
            "1".into(),
            "--data".into(),
            dir.join("master/data").display().to_string(),
            "--listen".into(),
            listen.into(),
            "--tls".into(),
            dir.join("master/tls").display().to_string(),
            "--dead-after-s".into(),
            dead_after_s.to_string(),
        ];
        args.extend_from_slice(extra);
        spawn(&args, &dir.join("master/log"))
    }

    /// kill -9 the master and start it again on the same address and data.
    pub fn restart_master(&mut self) {
        self.master.kill();
        let addr = self.master.addr.clone();
        let args = self
            .master
            .args
            .iter()
            .map(|a| if a == "127.0.0.1:0" { addr.clone() } else { a.clone() })
            .collect::<Vec<_>>();
        let log = self.dir.path().join("master/log2");
        let data = self.master.data.clone();
        self.master = spawn_retrying(&args, |_| log.clone());
        self.master.data = data;
    }

    /// Starts chunkserver `i` again (after a kill) on its data, on a new port.
    pub fn restart_chunkserver(&mut self, i: usize) {
        let old = &mut self.chunkservers[i];
        old.kill();
        let (args, data) = (old.args.clone(), old.data.clone());
        let dir = self.dir.path().join(format!("cs{i}"));
        let mut p = spawn_retrying(&args, |n| dir.join(format!("log.{n}")));
        p.data = data;
        self.chunkservers[i] = p;
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("CAIRN_MASTERS".into(), self.master.addr.clone()),
            ("CAIRN_TLS".into(), self.client_tls.display().to_string()),
        ]
    }

    pub async fn client(&self) -> Client {
        Client::connect(ClientConfig {
            masters: vec![self.master.addr.clone()],
            tls_dir: self.client_tls.clone(),
            master_deadline: Duration::from_secs(15),
        })
        .await
        .expect("connect client")
    }

    /// Polls `cairn status --json` until `n` chunkservers are alive.
    pub fn wait_alive(&self, n: usize) {
        let start = Instant::now();
        loop {
            let out = self.cli(&["status", "--json"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
                let alive =
                    v["chunkservers"].as_array().map_or(0, |a| a.iter().filter(|c| c["state"] == "alive").count());
                if alive >= n {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{n} chunkservers not alive: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// Runs the real binary as a user would, with the cluster's environment.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_env(args, &self.env(), None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        cli_env(args, &self.env(), Some(stdin))
    }

    /// Files holding `hash` across all chunkservers' chunk trees.
    pub fn replicas_of(&self, hash: &blake3::Hash) -> Vec<PathBuf> {
        self.chunkservers.iter().map(|c| chunk_path(&c.data, hash)).filter(|p| p.exists()).collect()
    }

    pub fn chunk_files(&self) -> usize {
        self.chunkservers.iter().map(|c| count_files(&c.data.join("chunks"))).sum()
    }
}

pub fn chunk_path(data: &Path, hash: &blake3::Hash) -> PathBuf {
    let hex = hash.to_hex();
    data.join("chunks").join(&hex[0..2]).join(&hex[2..4]).join(hex.as_str())
}

pub fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(Result::ok).map(|e| if e.path().is_dir() { count_files(&e.path()) } else { 1 }).sum()
}

pub fn cli_env(args: &[&str], env: &[(String, String)], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("CAIRN_MASTERS").env_remove("CAIRN_TLS").stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().expect("spawn cairn");
    if let Some(data) = stdin {
        let mut w = child.stdin.take().unwrap();
        w.write_all(data).unwrap();
    }
    let out = child.wait_with_output().expect("wait for cairn");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "cairn {args:?} panicked: {err}");
    out
}

/// The error contract: non-zero exit, one line on stderr, no panic. Returns the line.
pub fn expect_error(out: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{what}: exited 0; stderr: {err}");
    assert_eq!(out.status.code(), Some(1), "{what}: exit code; stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: want one line on stderr, got: {err}");
    assert!(err.starts_with("cairn: "), "{what}: {err}");
    err.trim_end().to_string()
}

pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// BLAKE3 of each 4 MiB piece: the chunks `put` cuts `data` into.
pub fn chunk_hashes(data: &[u8]) -> Vec<blake3::Hash> {
    data.chunks(4 * MIB).map(blake3::hash).collect()
}

/// Polls `f` until it is true, or panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
