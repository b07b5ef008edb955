//! `cairn dev`: a whole cluster on loopback for trying Cairn out and for tests. Every node is a
//! child process of this same binary with its own data directory under DIR, so the cluster looks
//! like a real one (kill -9 a chunkserver and watch). DIR keeps the data, the cluster CA, the
//! ports and the logs; started again on the same DIR, the cluster comes back with its data.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cairn_common::tls;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Directory for data, certificates, logs and the env file.
    #[arg(long, default_value = "cairn-dev")]
    pub dir: PathBuf,
    /// Masters in the Raft group (3 tolerates one failure; 5, two).
    #[arg(long, default_value_t = 3)]
    pub masters: u32,
    /// Chunkservers.
    #[arg(long, default_value_t = 4)]
    pub chunkservers: u32,
    /// Capacity of each chunkserver in bytes (default: the disk).
    #[arg(long)]
    pub chunkserver_capacity: Option<u64>,
    /// Also mount the cluster's namespace here (FUSE; created if missing), unmounted on stop.
    #[arg(long)]
    pub mount: Option<PathBuf>,
    /// Also serve S3 on this address (e.g. 127.0.0.1:9000), with a development access key
    /// written to DIR/env as AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    #[arg(long)]
    pub s3: Option<String>,
}

/// What must stay the same across restarts of a dev cluster: the masters' addresses (they are
/// in the Raft membership).
#[derive(Serialize, Deserialize)]
struct Layout {
    master_ports: Vec<u16>,
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    reported: bool,
}

fn layout(dir: &Path, masters: u32) -> Result<Layout> {
    let path = dir.join("layout.json");
    if let Ok(bytes) = std::fs::read(&path) {
        let l: Layout = serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?;
        anyhow::ensure!(
            l.master_ports.len() == masters as usize,
            "{} was created with {} master(s); start it with --masters {} (or use a new --dir)",
            dir.display(),
            l.master_ports.len(),
            l.master_ports.len()
        );
        return Ok(l);
    }
    let l = Layout {
        master_ports: cairn_common::net::unused_ports(std::net::Ipv4Addr::LOCALHOST.into(), masters as usize)?,
    };
    cairn_common::fsutil::durable_write(&path, &serde_json::to_vec_pretty(&l)?, 0o644)?;
    Ok(l)
}

fn issue_once(ca: &Path, out: &Path, role: tls::Role) -> Result<()> {
    if !out.join("cert.pem").exists() {
        tls::issue(ca, out, role, &["127.0.0.1".parse().expect("valid ip")])?;
    }
    Ok(())
}

/// Starts a node whose directory is `node` and writes its PID to `node/pid`, for tools that
/// kill or restart one node (`cairn bench --mode failover|faults`).
fn spawn(exe: &Path, name: &str, args: &[String], node: &Path, log: &Path) -> Result<Proc> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let mut cmd = Command::new(exe);
    // SAFETY: prctl is async-signal-safe, and nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // If `cairn dev` itself dies (even by SIGKILL), its nodes get SIGTERM instead of
            // running on as orphans.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("start {name}"))?;
    if let Some(pid) = child.id() {
        std::fs::write(node.join("pid"), format!("{pid}\n"))?;
    }
    Ok(Proc { name: name.to_string(), child, log: log.to_path_buf(), reported: false })
}

/// Starts `cairn mount` on `at` and waits until the mount is up.
async fn start_mount(exe: &Path, dir: &Path, at: &Path, masters: &[String], tls: &Path) -> Result<Proc> {
    let node = dir.join("mount");
    std::fs::create_dir_all(&node)?;
    let args = vec![
        "mount".into(),
        at.display().to_string(),
        "--masters".into(),
        masters.join(","),
        "--tls".into(),
        tls.display().to_string(),
    ];
    let log = dir.join("logs/mount.log");
    let mut p = spawn(exe, "mount", &args, &node, &log)?;
    wait_up(&mut p, &format!("mount on {}", at.display()), async || crate::mount::is_mounted(at)).await?;
    Ok(p)
}

/// Waits until `up` says the child `p` (called `what`) is serving; an error if it exits first
/// (with the last line of its log) or takes longer than [`READY_TIMEOUT`] (then it is stopped).
async fn wait_up(p: &mut Proc, what: &str, mut up: impl AsyncFnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while !up().await {
        if let Ok(Some(status)) = p.child.try_wait() {
            p.reported = true;
            anyhow::bail!("{what} failed ({status}): {}", last_line(&p.log));
        }
        if t0.elapsed() > READY_TIMEOUT {
            stop(std::slice::from_mut(p)).await;
            anyhow::bail!("{what} did not come up within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Starts `cairn s3` on `addr` (port 0: a free one), waits until it answers, and returns it with
/// the env lines an S3 client needs: the endpoint and the development key (kept in
/// DIR/s3-key.json and reused while the cluster still knows it).
async fn start_s3(
    exe: &Path,
    dir: &Path,
    addr: &str,
    masters: &[String],
    tls: &Path,
) -> Result<(Proc, std::net::SocketAddr, String)> {
    let mut sa: std::net::SocketAddr = addr.parse().with_context(|| format!("--s3 {addr}: not an IP:PORT address"))?;
    if sa.port() == 0 {
        sa.set_port(cairn_common::net::unused_port(sa.ip())?);
    }
    let node = dir.join("s3");
    std::fs::create_dir_all(&node)?;
    let args = vec![
        "s3".into(),
        "--listen".into(),
        sa.to_string(),
        "--masters".into(),
        masters.join(","),
        "--tls".into(),
        tls.display().to_string(),
    ];
    let log = dir.join("logs/s3.log");
    let mut p = spawn(exe, "s3 gateway", &args, &node, &log)?;
    wait_up(&mut p, &format!("the S3 gateway on {sa}"), async || tokio::net::TcpStream::connect(sa).await.is_ok())
        .await?;
    let key = match dev_key(dir, masters, tls).await {
        Ok(k) => k,
        Err(e) => {
            stop(std::slice::from_mut(&mut p)).await;
            return Err(e);
        }
    };
    let env = format!(
        "export AWS_ENDPOINT_URL=http://{sa}\nexport AWS_ACCESS_KEY_ID={}\nexport AWS_SECRET_ACCESS_KEY={}\n\
         export AWS_DEFAULT_REGION=us-east-1\nexport AWS_REGION=us-east-1\n",
        key.access_key_id, key.secret_access_key
    );
    Ok((p, sa, env))
}

#[derive(Serialize, Deserialize)]
struct DevKey {
    access_key_id: String,
    secret_access_key: String,
}

async fn dev_key(dir: &Path, masters: &[String], tls: &Path) -> Result<DevKey> {
    let cfg = cairn_client::ClientConfig {
        masters: masters.to_vec(),
        tls_dir: tls.to_path_buf(),
        master_deadline: Duration::from_secs(10),
    };
    let client = cairn_client::Client::connect(cfg).await?;
    let path = dir.join("s3-key.json");
    if let Some(k) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<DevKey>(&b).ok()) {
        if client.access_key(&k.access_key_id).await.is_ok_and(|s| s.secret == k.secret_access_key) {
            client.close();
            return Ok(k);
        }
    }
    let k = client.create_access_key("cairn dev").await.context("create the development access key")?;
    client.close();
    let k = DevKey { access_key_id: k.id, secret_access_key: k.secret };
    cairn_common::fsutil::durable_write(&path, &serde_json::to_vec_pretty(&k)?, 0o600)?;
    Ok(k)
}

fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|s| s.lines().rev().find(|l| !l.trim().is_empty()).map(str::to_string))
        .unwrap_or_default()
}

pub async fn run(a: &DevArgs) -> Result<()> {
    anyhow::ensure!(a.masters >= 1 && a.masters <= 7, "--masters must be 1 to 7");
    anyhow::ensure!(a.chunkservers >= 1 && a.chunkservers <= 64, "--chunkservers must be 1 to 64");
    let exe = std::env::current_exe().context("find the cairn binary")?;
    std::fs::create_dir_all(&a.dir).with_context(|| format!("create {}", a.dir.display()))?;
    let dir = std::fs::canonicalize(&a.dir)?;
    if let Some(m) = &a.mount {
        std::fs::create_dir_all(m).with_context(|| format!("create mount point {}", m.display()))?;
        crate::mount::check_mountpoint(m)?;
    }
    let env_path = dir.join("env");
    let _ = std::fs::remove_file(&env_path);
    std::fs::create_dir_all(dir.join("logs"))?;

    let ca = dir.join("ca");
    tls::init_ca(&ca)?;
    let layout = layout(&dir, a.masters)?;
    let master_addrs: Vec<String> = layout.master_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let peers = master_addrs.iter().enumerate().map(|(i, m)| format!("{}={m}", i + 1)).collect::<Vec<_>>().join(",");
    let client_tls = dir.join("client-tls");
    issue_once(&ca, &client_tls, tls::Role::Client)?;

    let shutdown = crate::servers::shutdown_on_signals()?;
    let mut procs = Vec::new();
    let started: Result<()> = async {
        for (i, addr) in master_addrs.iter().enumerate() {
            let id = i + 1;
            let node = dir.join(format!("master-{id}"));
            issue_once(&ca, &node.join("tls"), tls::Role::Node)?;
            let args = vec![
                "master".into(),
                "--id".into(),
                id.to_string(),
                "--data".into(),
                node.join("data").display().to_string(),
                "--listen".into(),
                addr.clone(),
                "--peers".into(),
                peers.clone(),
                "--tls".into(),
                node.join("tls").display().to_string(),
            ];
            procs.push(spawn(&exe, &format!("master {id}"), &args, &node, &dir.join(format!("logs/master-{id}.log")))?);
        }
        for i in 1..=a.chunkservers {
            let node = dir.join(format!("chunkserver-{i}"));
            issue_once(&ca, &node.join("tls"), tls::Role::Node)?;
            let mut args = vec![
                "chunkserver".into(),
                "--data".into(),
                node.join("data").display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--masters".into(),
                master_addrs.join(","),
                "--tls".into(),
                node.join("tls").display().to_string(),
            ];
            if let Some(c) = a.chunkserver_capacity {
                args.extend(["--capacity".into(), c.to_string()]);
            }
            let log = dir.join(format!("logs/chunkserver-{i}.log"));
            procs.push(spawn(&exe, &format!("chunkserver {i}"), &args, &node, &log)?);
        }
        wait_ready(&master_addrs, &client_tls, a.chunkservers as usize, &mut procs, &shutdown).await
    }
    .await;
    if let Err(e) = started {
        stop(&mut procs).await;
        return Err(e);
    }
    let mut mount = Vec::new();
    if let Some(m) = &a.mount {
        let m = std::fs::canonicalize(m)?;
        match start_mount(&exe, &dir, &m, &master_addrs, &client_tls).await {
            Ok(p) => mount.push(p),
            Err(e) => {
                stop(&mut procs).await;
                return Err(e);
            }
        }
    }
    let mut s3_env = String::new();
    let mut s3_addr = None;
    if let Some(addr) = &a.s3 {
        match start_s3(&exe, &dir, addr, &master_addrs, &client_tls).await {
            Ok((p, sa, env)) => {
                mount.push(p);
                s3_addr = Some(sa);
                s3_env = env;
            }
            Err(e) => {
                stop(&mut mount).await;
                stop(&mut procs).await;
                return Err(e);
            }
        }
    }

    // `export` lines: `source DIR/env` sets them for the commands a user runs next, and the file
    // still reads as KEY=VALUE lines once the word is stripped.
    let env =
        format!("export CAIRN_MASTERS={}\nexport CAIRN_TLS={}\n{s3_env}", master_addrs.join(","), client_tls.display());
    // With a secret key in it, only its owner reads it.
    let mode = if s3_env.is_empty() { 0o644 } else { 0o600 };
    cairn_common::fsutil::durable_write(&env_path, env.as_bytes(), mode)?;
    println!(
        "Cairn dev cluster is up: {} master(s), {} chunkservers, data in {}",
        a.masters,
        a.chunkservers,
        dir.display()
    );
    println!();
    println!("  source {}        # sets CAIRN_MASTERS and CAIRN_TLS", env_path.display());
    println!("  cairn put ./file /file    cairn get /file ./copy    cairn ls /    cairn status");
    if let Some(m) = &a.mount {
        println!("  mounted on {} (FUSE): the same files, as a POSIX file system", m.display());
    }
    if let Some(addr) = s3_addr {
        println!("  S3 on http://{addr}: aws s3 ls, aws s3 cp ... (the env file sets AWS_ENDPOINT_URL and a key)");
    }
    println!();
    println!(
        "Logs: {}/logs. Ctrl-C stops the cluster; start it again with the same --dir to keep the data.",
        dir.display()
    );

    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                report_exits(&mut mount);
                report_exits(&mut procs);
            }
        }
    }
    println!("stopping the cluster...");
    // The mount and the gateway first: they commit what clients wrote while the masters are
    // still up.
    stop(&mut mount).await;
    stop(&mut procs).await;
    let _ = std::fs::remove_file(&env_path);
    Ok(())
}

/// Reports each child that exited, once. The cluster keeps running without it (that is what a
/// real cluster does), but the user must know.
fn report_exits(procs: &mut [Proc]) {
    for p in procs.iter_mut().filter(|p| !p.reported) {
        if let Ok(Some(status)) = p.child.try_wait() {
            p.reported = true;
            eprintln!("cairn dev: {} exited ({status}); last log line: {}", p.name, last_line(&p.log));
        }
    }
}

async fn wait_ready(
    masters: &[String],
    client_tls: &Path,
    chunkservers: usize,
    procs: &mut [Proc],
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<()> {
    let cfg = cairn_client::ClientConfig {
        masters: masters.to_vec(),
        tls_dir: client_tls.to_path_buf(),
        master_deadline: Duration::from_secs(2),
    };
    let client = cairn_client::Client::connect(cfg).await?;
    let start = Instant::now();
    loop {
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                anyhow::bail!("{} exited during start-up ({status}): {}", p.name, last_line(&p.log));
            }
        }
        anyhow::ensure!(!shutdown.is_cancelled(), "interrupted during start-up");
        if let Ok(s) = client.status().await {
            if s.chunkservers.iter().filter(|c| c.state == "alive").count() >= chunkservers {
                client.close();
                return Ok(());
            }
        }
        anyhow::ensure!(
            start.elapsed() < READY_TIMEOUT,
            "the cluster was not ready within {READY_TIMEOUT:?}; see the logs"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM to every child, then SIGKILL to those still running after the grace period.
async fn stop(procs: &mut [Proc]) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    // Chunkservers first, so that they do not spin on a vanished master while stopping.
    for p in procs.iter().rev() {
        if let Some(pid) = p.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    for p in procs.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, p.child.wait()).await.is_err() {
            eprintln!("cairn dev: {} did not stop within {STOP_GRACE:?}; killing it", p.name);
            let _ = p.child.kill().await;
        }
    }
}
