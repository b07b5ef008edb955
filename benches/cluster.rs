//! `cairn bench`: throughput of a cluster through the client library, beside the raw local disk
//! measured in the same run. Without CAIRN_MASTERS it starts its own `cairn dev` cluster (1
//! master unless `--masters`, 4 chunkservers) in a temp dir and stops it at the end.
//!
//! Measured: put and get of one large file (default 2 GiB, random bytes, replication 3; the get
//! after dropping the page cache when running as root, verified by BLAKE3), many small puts
//! with a fixed number in flight (default 10,000 x 4 KiB, 16 in flight; p50/p99 latency), and
//! the local disk: sequential write + fsync and cold read of a file of the same size.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cairn_client::{Client, ClientConfig, PutOptions};
use futures::StreamExt as _;
use rand::{RngCore, SeedableRng};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Large-file put/get, small puts, mkdir latency, beside the local disk.
    Data,
    /// Kill the master leader repeatedly under metadata load; time to the next mutation.
    Failover,
    /// File creates per second from many clients.
    Metadata,
    /// Many files: creates, master memory per file, store size, snapshot catch-up, restart.
    Scale,
    /// Writers and readers for --duration-s while --fault kills and restarts nodes; CSV + PNG.
    Faults,
    /// The S3 gateway beside the client library: large and small objects, PUT and GET.
    S3,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value = "data")]
    pub mode: Mode,
    /// failover: leader kills.
    #[arg(long, default_value_t = 20)]
    pub trials: usize,
    /// metadata, scale: concurrent clients (own connections); failover: writers.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// metadata: files created; scale: files in the namespace.
    #[arg(long)]
    pub files: Option<usize>,
    /// Size of the large file, MiB.
    #[arg(long, default_value_t = 2048)]
    pub size_mib: usize,
    /// Number of small files.
    #[arg(long, default_value_t = 10_000)]
    pub small_files: usize,
    /// Size of each small file, bytes.
    #[arg(long, default_value_t = 4096)]
    pub small_size: usize,
    /// Small puts in flight.
    #[arg(long, default_value_t = 16)]
    pub inflight: usize,
    /// Replication factor.
    #[arg(long, default_value_t = 3)]
    pub replication: u32,
    /// Chunkservers of the cluster the benchmark starts (ignored with CAIRN_MASTERS).
    #[arg(long, default_value_t = 4)]
    pub chunkservers: u32,
    /// data: masters of the cluster the benchmark starts (the other modes start 3).
    #[arg(long, default_value_t = 1)]
    pub masters: u32,
    /// Skip the raw disk reference.
    #[arg(long)]
    pub no_disk: bool,
    /// Directory for the started cluster and the disk reference (default: a temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// faults: concurrent writers (each keeps its last 4 files and deletes older ones).
    #[arg(long, default_value_t = 2)]
    pub writers: usize,
    /// faults: concurrent readers (random files; every byte verified).
    #[arg(long, default_value_t = 4)]
    pub readers: usize,
    /// faults: length of the run, seconds.
    #[arg(long, default_value_t = 90)]
    pub duration_s: u64,
    /// faults: KIND[:N]@SECONDS, repeatable: kill-chunkserver (default: the fullest),
    /// restart-chunkserver (default: the last killed), kill-leader, restart-master.
    #[arg(long)]
    pub fault: Vec<String>,
    /// faults: data written before the run (what a killed node's copies come from), MiB.
    #[arg(long, default_value_t = 1024)]
    pub prefill_mib: usize,
    /// faults: size of each file written and read, MiB.
    #[arg(long, default_value_t = 32)]
    pub file_mib: usize,
    /// s3: large objects PUT (and then GET) at once, each of --size-mib.
    #[arg(long, default_value_t = 4)]
    pub objects: usize,
    /// s3: passes through each way in (library, gateway), in the order library, gateway,
    /// gateway, library, ... so that the machine's drift during the run cancels out.
    #[arg(long, default_value_t = 2)]
    pub passes: usize,
    /// faults: where the CSV timeline and the PNG chart go.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

pub(crate) struct Row {
    pub what: String,
    pub value: String,
    pub note: String,
}

pub(crate) fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// Drops the page cache so that reads come from the disk; false when not permitted.
pub(crate) fn drop_caches() -> bool {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// A cluster started for the benchmark: `cairn dev` as a child, stopped on drop.
pub(crate) struct DevCluster {
    child: std::process::Child,
    env: Vec<(String, String)>,
}

impl DevCluster {
    fn start(dir: &Path, chunkservers: u32) -> Result<DevCluster> {
        Self::start_with(dir, chunkservers, &[])
    }

    /// [`DevCluster::start`] with more `cairn dev` arguments.
    pub(crate) fn start_with(dir: &Path, chunkservers: u32, extra: &[&str]) -> Result<DevCluster> {
        let exe = std::env::current_exe()?;
        let log = std::fs::File::create(dir.join("dev.log"))?;
        let data = dir.join("cluster");
        let child = std::process::Command::new(exe)
            .args(["dev", "--dir", &data.display().to_string(), "--chunkservers", &chunkservers.to_string()])
            .args(extra)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("start cairn dev")?;
        let mut c = DevCluster { child, env: vec![] };
        let start = Instant::now();
        while !data.join("env").exists() {
            if let Some(st) = c.child.try_wait()? {
                anyhow::bail!("cairn dev exited ({st}); see {}", dir.join("dev.log").display());
            }
            anyhow::ensure!(start.elapsed() < Duration::from_secs(90), "cluster not ready after 90 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        c.env = std::fs::read_to_string(data.join("env"))?
            .lines()
            .filter_map(|l| {
                l.trim_start_matches("export ").split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        Ok(c)
    }

    pub(crate) fn var(&self, k: &str) -> Option<String> {
        self.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Hashes what it is given: `get` writes into it, so the benchmark verifies every byte without
/// holding the file in memory.
pub(crate) struct HashSink(pub blake3::Hasher, pub u64);

impl tokio::io::AsyncWrite for HashSink {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.0.update(buf);
        self.1 += buf.len() as u64;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

pub(crate) fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn disk_reference(dir: &Path, size: usize, rows: &mut Vec<Row>) -> Result<()> {
    let path = dir.join("disk-reference.bin");
    let block = random(4 << 20, 99);
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(&path).context("create disk reference file")?;
        let mut left = size;
        while left > 0 {
            let n = left.min(block.len());
            f.write_all(&block[..n])?;
            left -= n;
        }
        f.sync_all()?;
    }
    let w = t.elapsed();
    rows.push(Row {
        what: "local disk: write + fsync".into(),
        value: format!("{:.0} MB/s", mbps(size as u64, w)),
        note: format!("{} MiB in 4 MiB writes", size >> 20),
    });
    let cold = drop_caches();
    let t = Instant::now();
    let mut f = std::fs::File::open(&path)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0u64;
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    rows.push(Row {
        what: "local disk: read".into(),
        value: format!("{:.0} MB/s", mbps(total, t.elapsed())),
        note: if cold { "page cache dropped".into() } else { "warm: not root, page cache kept".into() },
    });
    std::fs::remove_file(&path)?;
    Ok(())
}

pub async fn run(a: &BenchArgs) -> Result<()> {
    let tmp;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("cairn-bench").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    if a.mode == Mode::S3 {
        print_rows(crate::bench_s3::run(a, &dir).await?);
        return Ok(());
    }
    if a.mode != Mode::Data {
        return master_modes(a, &dir).await;
    }
    let mut rows = Vec::new();
    if !a.no_disk {
        eprintln!("measuring the local disk...");
        disk_reference(&dir, a.size_mib << 20, &mut rows)?;
    }
    let (masters, tls, _cluster) = match (std::env::var("CAIRN_MASTERS"), std::env::var("CAIRN_TLS")) {
        (Ok(m), Ok(t)) => (m, PathBuf::from(t), None),
        _ => {
            eprintln!(
                "starting a dev cluster ({} master(s), {} chunkservers) in {}...",
                a.masters,
                a.chunkservers,
                dir.display()
            );
            let c = DevCluster::start_with(&dir, a.chunkservers, &["--masters", &a.masters.to_string()])?;
            let (m, t) = (
                c.var("CAIRN_MASTERS").context("env without CAIRN_MASTERS")?,
                c.var("CAIRN_TLS").context("env without CAIRN_TLS")?,
            );
            (m, PathBuf::from(t), Some(c))
        }
    };
    let client = Client::connect(ClientConfig {
        masters: masters.split(',').map(String::from).collect(),
        tls_dir: tls,
        master_deadline: Duration::from_secs(30),
    })
    .await?;
    let opts = PutOptions { replication: a.replication, ..Default::default() };
    let run_dir = format!("/bench-{:08x}", rand::random::<u32>());
    client.mkdir(&run_dir, true).await?;

    // One large file.
    let size = a.size_mib << 20;
    eprintln!("generating {} MiB of random data...", a.size_mib);
    // Fresh content every run: against a cluster that already holds the bytes, puts would be
    // deduplicated and measure nothing but metadata.
    let salt: u64 = rand::random();
    let data = random(size, salt);
    let want = blake3::hash(&data);
    let big = format!("{run_dir}/large.bin");
    eprintln!("put {} MiB...", a.size_mib);
    let t = Instant::now();
    client.put(&big, &data[..], &opts, &|_| {}).await.context("put large file")?;
    let put = t.elapsed();
    drop(data);
    rows.push(Row {
        what: format!("put, replication {}", a.replication),
        value: format!("{:.0} MB/s", mbps(size as u64, put)),
        note: format!("{} MiB file, {:.1} s", a.size_mib, put.as_secs_f64()),
    });
    let cold = drop_caches();
    eprintln!("get {} MiB...", a.size_mib);
    let mut sink = HashSink(blake3::Hasher::new(), 0);
    let t = Instant::now();
    client.get(&big, &mut sink, 0, None, &|_| {}).await.context("get large file")?;
    let get = t.elapsed();
    anyhow::ensure!(sink.0.finalize() == want && sink.1 == size as u64, "get returned different bytes");
    rows.push(Row {
        what: "get".into(),
        value: format!("{:.0} MB/s", mbps(size as u64, get)),
        note: format!(
            "{}, verified by BLAKE3",
            if cold { "page cache dropped first" } else { "warm page cache (not root)" }
        ),
    });
    let mut sink = HashSink(blake3::Hasher::new(), 0);
    let t = Instant::now();
    client.get(&big, &mut sink, 0, None, &|_| {}).await.context("get large file")?;
    let get = t.elapsed();
    anyhow::ensure!(sink.0.finalize() == want, "get returned different bytes");
    rows.push(Row {
        what: "get, again".into(),
        value: format!("{:.0} MB/s", mbps(size as u64, get)),
        note: "chunks in the chunkservers' page cache".into(),
    });

    // Metadata latency alone: sequential mkdirs, one Raft commit each.
    let t = Instant::now();
    let n_mkdir = 200;
    for i in 0..n_mkdir {
        client.mkdir(&format!("{run_dir}/d{i}"), false).await.context("mkdir")?;
    }
    let per = t.elapsed() / n_mkdir;
    rows.push(Row {
        what: "mkdir, one at a time".into(),
        value: format!("{:.2} ms", per.as_secs_f64() * 1e3),
        note: "one Raft commit (fsync) each".into(),
    });

    // Many small files.
    if a.small_files > 0 {
        eprintln!("{} puts of {} bytes, {} in flight...", a.small_files, a.small_size, a.inflight);
        let small_dir = format!("{run_dir}/small");
        client.mkdir(&small_dir, true).await?;
        let t = Instant::now();
        let mut lat: Vec<Duration> = futures::stream::iter(0..a.small_files)
            .map(|i| {
                let (client, opts, small_dir) = (client.clone(), opts.clone(), small_dir.clone());
                let body = random(a.small_size, salt ^ (1_000_000 + i as u64));
                async move {
                    let t = Instant::now();
                    client.put_bytes(&format!("{small_dir}/f{i:06}"), body.into(), &opts).await.map(|_| t.elapsed())
                }
            })
            .buffer_unordered(a.inflight)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .context("small puts")?;
        let total = t.elapsed();
        lat.sort();
        let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
        rows.push(Row {
            what: format!("small puts ({} B, {} in flight)", a.small_size, a.inflight),
            value: format!("{:.0} files/s", a.small_files as f64 / total.as_secs_f64()),
            note: format!("p50 {:.1} ms, p99 {:.1} ms", p(0.5).as_secs_f64() * 1e3, p(0.99).as_secs_f64() * 1e3),
        });
    }
    client.remove(&run_dir, true).await?;
    client.close();

    print_rows(rows);
    Ok(())
}

fn print_rows(rows: Vec<Row>) {
    println!("| measurement | result | notes |");
    println!("|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} |", r.what, r.value, r.note);
    }
}

fn masters_list(c: &DevCluster) -> Result<Vec<String>> {
    Ok(c.var("CAIRN_MASTERS").context("env without CAIRN_MASTERS")?.split(',').map(String::from).collect())
}

/// The master-group and fault modes run on a cluster of their own: they kill and restart nodes.
async fn master_modes(a: &BenchArgs, dir: &Path) -> Result<()> {
    if let (Mode::Faults, Ok(masters)) = (a.mode, std::env::var("CAIRN_MASTERS")) {
        anyhow::ensure!(a.fault.is_empty(), "--fault needs a cluster the benchmark starts: unset CAIRN_MASTERS");
        let tls = PathBuf::from(std::env::var("CAIRN_TLS").context("CAIRN_MASTERS without CAIRN_TLS")?);
        let masters = masters.split(',').map(String::from).collect();
        print_rows(crate::bench_faults::run(a, None, masters, tls).await?);
        return Ok(());
    }
    anyhow::ensure!(
        std::env::var_os("CAIRN_MASTERS").is_none(),
        "--mode {:?} kills and restarts nodes, so it runs on a cluster it starts: unset CAIRN_MASTERS",
        a.mode
    );
    anyhow::ensure!(a.clients >= 1 && a.trials >= 1, "--clients and --trials must be at least 1");
    eprintln!("starting a dev cluster (3 masters, {} chunkservers) in {}...", a.chunkservers, dir.display());
    let c = DevCluster::start(dir, a.chunkservers)?;
    let masters = masters_list(&c)?;
    let tls = PathBuf::from(c.var("CAIRN_TLS").context("env without CAIRN_TLS")?);
    let mut m = crate::bench_masters::Masters::new(dir.join("cluster"), masters.clone(), tls.clone());
    let rows = match a.mode {
        Mode::Faults => crate::bench_faults::run(a, Some(dir.join("cluster")), masters, tls).await?,
        Mode::Failover => crate::bench_masters::failover(&mut m, a.trials, a.clients.min(8)).await?,
        Mode::Metadata => crate::bench_masters::metadata(&m, a.clients, a.files.unwrap_or(100_000)).await?,
        Mode::Scale => crate::bench_masters::scale(&mut m, a.clients, a.files.unwrap_or(1_000_000)).await?,
        Mode::Data | Mode::S3 => unreachable!("handled by run"),
    };
    drop(m);
    drop(c);
    print_rows(rows);
    Ok(())
}
