//! Test harness: a real cluster of `cairn` processes in a temp dir, on ports the OS picks. Every
//! child is killed by PID when its guard drops, even when the test fails.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cairn_chunkserver::store::ChunkHash;
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

/// Reads a server's start-up lines: "listening on ADDR", then "metrics on ADDR" when ARGS ask
/// for `--metrics`. Returns both addresses, or the line that was not what it should be.
fn read_addresses(child: &mut Child, args: &[String]) -> Result<(String, Option<String>), String> {
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut next = |prefix: &str| {
        let mut line = String::new();
        out.read_line(&mut line).map_err(|e| format!("read stdout: {e}"))?;
        line.trim().strip_prefix(prefix).map(str::to_string).ok_or(line)
    };
    let addr = next("listening on ")?;
    let metrics = if args.iter().any(|a| a == "--metrics") { Some(next("metrics on ")?) } else { None };
    Ok((addr, metrics))
}

/// Starts `cairn ARGS` and waits for its "listening on ADDR" line (and its "metrics on ADDR" line,
/// if ARGS ask for `--metrics`).
pub fn spawn(args: &[String], log: &Path) -> Proc {
    spawn_metrics(args, log).0
}

/// [`spawn`], also returning the metrics address (None without `--metrics` in ARGS).
pub fn spawn_metrics(args: &[String], log: &Path) -> (Proc, Option<String>) {
    let err = std::fs::File::create(log).expect("create log");
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(err)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn cairn");
    match read_addresses(&mut child, args) {
        Ok((addr, metrics)) => (Proc { addr, child: Some(child), data: PathBuf::new(), args: args.to_vec() }, metrics),
        Err(line) => {
            let _ = child.kill();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("cairn {args:?} did not start: {line:?}; log: {log}")
        }
    }
}

/// Starts `cairn ARGS` until it listens, retrying for a while when it exits at once (its port is
/// still held by a process just killed). `log(n)` names the log of attempt n.
pub fn spawn_retrying(args: &[String], log: impl Fn(usize) -> PathBuf) -> Proc {
    spawn_retrying_metrics(args, log).0
}

/// [`spawn_retrying`], also returning the metrics address (None without `--metrics` in ARGS).
pub fn spawn_retrying_metrics(args: &[String], log: impl Fn(usize) -> PathBuf) -> (Proc, Option<String>) {
    let start = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let path = log(n);
        let err = std::fs::File::create(&path).expect("create log");
        let mut child =
            Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(err).stdin(Stdio::null()).spawn().unwrap();
        if let Ok((addr, metrics)) = read_addresses(&mut child, args) {
            return (Proc { addr, child: Some(child), data: PathBuf::new(), args: args.to_vec() }, metrics);
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
    /// Metrics addresses (with `Options::metrics`) of the master as started, and of each chunkserver.
    pub master_metrics: Option<String>,
    pub chunkserver_metrics: Vec<Option<String>>,
}

pub struct Options {
    pub chunkservers: usize,
    /// Per-chunkserver capacity caps (None: the disk).
    pub capacities: Vec<Option<u64>>,
    pub dead_after_s: u64,
    /// More arguments for the master (e.g. a short `--gc-grace-s`).
    pub master_args: Vec<String>,
    /// Every node serves Prometheus metrics on a port of its own (`--metrics 127.0.0.1:0`).
    pub metrics: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { chunkservers: 4, capacities: vec![], dead_after_s: 10, master_args: vec![], metrics: false }
    }
}

/// The arguments that make a server serve metrics on any free loopback port.
pub fn metrics_args() -> Vec<String> {
    vec!["--metrics".into(), "127.0.0.1:0".into()]
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
        let mut master_args = opts.master_args.clone();
        if opts.metrics {
            master_args.extend(metrics_args());
        }
        let (mut master, master_metrics) =
            Self::spawn_master(dir.path(), "127.0.0.1:0", opts.dead_after_s, &master_args);
        master.data = dir.path().join("master/data");
        let mut chunkservers = Vec::new();
        let mut chunkserver_metrics = Vec::new();
        for i in 0..opts.chunkservers {
            let node = dir.path().join(format!("cs{i}"));
            tls::issue(&ca, &node.join("tls"), tls::Role::Node, &["127.0.0.1".parse().unwrap()])
                .expect("issue cs cert");
            let mut args = chunkserver_args(&node, &master.addr);
            if let Some(Some(cap)) = opts.capacities.get(i) {
                args.extend(["--capacity".into(), cap.to_string()]);
            }
            if opts.metrics {
                args.extend(metrics_args());
            }
            let (mut p, metrics) = spawn_metrics(&args, &node.join("log"));
            p.data = node.join("data");
            chunkservers.push(p);
            chunkserver_metrics.push(metrics);
        }
        let c = Cluster { dir, master, chunkservers, client_tls, master_metrics, chunkserver_metrics };
        c.wait_alive(opts.chunkservers);
        c
    }

    fn spawn_master(dir: &Path, listen: &str, dead_after_s: u64, extra: &[String]) -> (Proc, Option<String>) {
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
        spawn_metrics(&args, &dir.join("master/log"))
    }

    /// kill -9 the master and start it again on the same address and data (metrics, if any, on a
    /// new port).
    pub fn restart_master(&mut self) {
        self.master.kill();
        let mut args = self.master.args.clone();
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = self.master.addr.clone();
        }
        let log = self.dir.path().join("master/log2");
        let data = self.master.data.clone();
        (self.master, self.master_metrics) = spawn_retrying_metrics(&args, |_| log.clone());
        self.master.data = data;
    }

    /// Starts one more chunkserver (the next index), with a capacity cap if given.
    pub fn add_chunkserver(&mut self, capacity: Option<u64>) {
        let i = self.chunkservers.len();
        let node = self.dir.path().join(format!("cs{i}"));
        tls::issue(&self.dir.path().join("ca"), &node.join("tls"), tls::Role::Node, &["127.0.0.1".parse().unwrap()])
            .expect("issue cs cert");
        let mut args = chunkserver_args(&node, &self.master.addr);
        if let Some(cap) = capacity {
            args.extend(["--capacity".into(), cap.to_string()]);
        }
        let mut p = spawn(&args, &node.join("log"));
        p.data = node.join("data");
        self.chunkservers.push(p);
        self.wait_alive(i + 1);
    }

    /// Starts chunkserver `i` again (after a kill) on its data, on a new port.
    pub fn restart_chunkserver(&mut self, i: usize) {
        let old = &mut self.chunkservers[i];
        old.kill();
        let (args, data) = (old.args.clone(), old.data.clone());
        let dir = self.dir.path().join(format!("cs{i}"));
        let (mut p, metrics) = spawn_retrying_metrics(&args, |n| dir.join(format!("log.{n}")));
        p.data = data;
        self.chunkservers[i] = p;
        self.chunkserver_metrics[i] = metrics;
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

    /// `cairn put` of `data` to `remote`, which must succeed.
    pub fn put_data(&self, data: &[u8], remote: &str) {
        let local = self.dir.path().join("put.bin");
        std::fs::write(&local, data).unwrap();
        let out = self.cli(&["put", local.to_str().unwrap(), remote]);
        assert!(out.status.success(), "put {remote}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `cairn get` of `remote`, which must succeed: its bytes.
    pub fn get_data(&self, remote: &str) -> Vec<u8> {
        let local = self.dir.path().join("get.bin");
        let out = self.cli(&["get", remote, local.to_str().unwrap()]);
        assert!(out.status.success(), "get {remote}: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::read(&local).unwrap()
    }

    /// The index of the chunkserver holding the most of `hashes`.
    pub fn fullest(&self, hashes: &[blake3::Hash]) -> usize {
        (0..self.chunkservers.len())
            .max_by_key(|i| hashes.iter().filter(|h| holds(&self.chunkservers[*i].data, h)).count())
            .expect("a chunkserver")
    }

    /// The data directories of the chunkservers holding `hash`, in a file of its own or packed.
    pub fn replicas_of(&self, hash: &blake3::Hash) -> Vec<PathBuf> {
        self.chunkservers.iter().filter(|c| holds(&c.data, hash)).map(|c| c.data.clone()).collect()
    }

    /// Chunks stored on disk across all chunkservers (replicas counted apart).
    pub fn chunk_files(&self) -> usize {
        self.chunkservers.iter().map(|c| count_files(&c.data.join("by-hash")) + packed(&c.data).len()).sum()
    }
}

/// Whether the chunkserver with data directory `data` holds the chunk `hash` on disk.
pub fn holds(data: &Path, hash: &blake3::Hash) -> bool {
    chunk_path(data, hash).exists() || packed(data).contains(&ChunkHash(*hash.as_bytes()))
}

fn packed(data: &Path) -> std::collections::HashSet<ChunkHash> {
    cairn_chunkserver::store::packed_chunks(data).expect("read the packs")
}

pub fn chunk_path(data: &Path, hash: &blake3::Hash) -> PathBuf {
    let hex = hash.to_hex();
    data.join("by-hash").join(&hex[0..2]).join(hex.as_str())
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

/// `GET PATH` on a metrics endpoint over plain HTTP/1.1: (status line and headers, body).
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("set a read timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap_or_else(|e| panic!("read the answer from {addr}: {e}"));
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header block: {raw:?}"));
    (head.to_string(), body.to_string())
}

/// The samples of a Prometheus text page: "name{labels}" -> value (comments skipped).
pub fn samples(page: &str) -> std::collections::BTreeMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or_else(|_| panic!("sample value {v:?} of {k}"))))
        .collect()
}

/// Polls `f` until it is true, or panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
