//! `cairn bench --mode failover|metadata|scale`: the master group, on the 3-master cluster the
//! benchmark starts (it must be able to kill and restart masters).
//!
//! - failover: steady metadata load from several workers; the leader is killed (SIGKILL) `trials`
//!   times; per trial, the time from the kill to the first mutation issued after the kill that
//!   succeeds. The killed master is restarted (same arguments and data) and caught up before the
//!   next trial.
//! - metadata: `clients` independent clients (own connections) create empty files as fast as
//!   they can, one at a time each; creates per second and latency percentiles.
//! - scale: `files` empty files created the same way, then the leader's resident memory per file,
//!   the size of its metadata store on disk (the state a snapshot streams), the time a follower
//!   that missed the last 25,000 creates (beyond the compacted log) takes to catch up by snapshot,
//!   and the time a restarted master takes to serve again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cairn_client::{Client, ClientConfig, PutOptions};

use crate::bench::Row;

/// How the benchmark reaches (and kills and restarts) the masters of the cluster it started.
pub struct Masters {
    pub cluster_dir: PathBuf,
    pub addrs: Vec<String>,
    pub tls: PathBuf,
    procs: crate::bench_procs::NodeProcs,
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

impl Masters {
    pub fn new(cluster_dir: PathBuf, addrs: Vec<String>, tls: PathBuf) -> Masters {
        let procs = crate::bench_procs::NodeProcs::new(cluster_dir.clone(), "master");
        Masters { cluster_dir, addrs, tls, procs }
    }

    async fn client(&self, deadline: Duration) -> Result<Client> {
        Ok(Client::connect(ClientConfig {
            masters: self.addrs.clone(),
            tls_dir: self.tls.clone(),
            master_deadline: deadline,
        })
        .await?)
    }

    pub fn pid(&self, id: u64) -> Result<u32> {
        self.procs.pid(id)
    }

    /// SIGKILL to master `id`; returns its command line, to start it again.
    pub fn kill(&mut self, id: u64) -> Result<Vec<String>> {
        self.procs.kill(id)
    }

    /// Starts a killed master again with the same arguments (retrying while its port is held).
    pub fn restart(&mut self, id: u64, args: &[String]) -> Result<Instant> {
        self.procs.restart(id, args)
    }

    /// The leader's id and every master's (alive, applied index), with the leader's commit.
    async fn group(client: &Client) -> Result<(u64, u64, BTreeMap<u64, (bool, u64)>)> {
        let s = client.status().await?;
        let leader = s.masters.iter().find(|m| m.role == "leader").context("no leader")?;
        let all = s.masters.iter().map(|m| (m.id, (m.alive, m.applied_index))).collect();
        Ok((leader.id, leader.commit_index, all))
    }

    /// Waits until master `id` answers and has applied what the leader had committed.
    async fn caught_up(client: &Client, id: u64, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if let Ok((_, commit, all)) = Self::group(client).await {
                if all.get(&id).is_some_and(|(alive, applied)| *alive && *applied >= commit) {
                    return Ok(start.elapsed());
                }
            }
            anyhow::ensure!(start.elapsed() < timeout, "master {id} did not catch up within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub async fn failover(m: &mut Masters, trials: usize, workers: usize) -> Result<Vec<Row>> {
    let client = m.client(Duration::from_secs(30)).await?;
    let root = format!("/bench-failover-{:08x}", rand::random::<u32>());
    client.mkdir(&root, true).await?;
    // (issued, completed) of every successful mutation.
    let done: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, done, stop, root) = (client.clone(), done.clone(), stop.clone(), root.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                if client.mkdir(&format!("{root}/w{w}-{i}"), false).await.is_ok() {
                    done.lock().expect("lock").push((t, Instant::now()));
                }
                i += 1;
            }
        }));
    }
    let mut times = Vec::new();
    for trial in 1..=trials {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (leader, _, _) = Masters::group(&client).await?;
        let args = m.kill(leader)?;
        let killed = Instant::now();
        let first = loop {
            let after = done.lock().expect("lock").iter().filter(|(t, _)| *t >= killed).map(|(_, d)| *d).min();
            if let Some(d) = after {
                break d.duration_since(killed);
            }
            anyhow::ensure!(killed.elapsed() < Duration::from_secs(30), "no mutation succeeded 30 s after the kill");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        eprintln!("trial {trial}: killed master {leader}; first mutation after {}", ms(first));
        times.push(first);
        done.lock().expect("lock").clear();
        m.restart(leader, &args)?;
        Masters::caught_up(&client, leader, Duration::from_secs(60)).await?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    client.remove(&root, true).await?;
    client.close();
    let list = times.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect::<Vec<_>>().join(" ");
    times.sort();
    Ok(vec![Row {
        what: format!("leader failover ({trials} kills, {workers} writers)"),
        value: format!(
            "p50 {:.2} s, max {:.2} s",
            pct(&times, 0.5).as_secs_f64(),
            times[times.len() - 1].as_secs_f64()
        ),
        note: format!("kill -9 to the first successful mutation issued after it; per trial (s): {list}"),
    }])
}

/// `clients` clients with their own connections create `n` empty files in total under `root`,
/// each one create at a time. Returns (elapsed, sorted latencies).
async fn creates(m: &Masters, root: &str, clients: usize, n: usize) -> Result<(Duration, Vec<Duration>)> {
    let mut cs = Vec::with_capacity(clients);
    for _ in 0..clients {
        cs.push(m.client(Duration::from_secs(60)).await?);
    }
    let dirs = n.div_ceil(10_000);
    for d in 0..dirs {
        cs[0].mkdir(&format!("{root}/d{d:04}"), true).await?;
    }
    let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let tasks = cs.into_iter().enumerate().map(|(k, c)| {
        let (root, progress) = (root.to_string(), progress.clone());
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = k;
            while i < n {
                let path = format!("{root}/d{:04}/f{i:07}", i / 10_000);
                let t = Instant::now();
                c.put_bytes(&path, bytes::Bytes::new(), &PutOptions::default()).await?;
                lat.push(t.elapsed());
                let p = progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if p % 100_000 == 0 {
                    eprintln!("  {p} files created");
                }
                i += clients;
            }
            c.close();
            anyhow::Ok(lat)
        })
    });
    let mut lat = Vec::with_capacity(n);
    for r in futures::future::join_all(tasks).await {
        lat.extend(r.context("create task")??);
    }
    let elapsed = t.elapsed();
    lat.sort();
    Ok((elapsed, lat))
}

pub async fn metadata(m: &Masters, clients: usize, n: usize) -> Result<Vec<Row>> {
    let client = m.client(Duration::from_secs(30)).await?;
    let root = format!("/bench-meta-{:08x}", rand::random::<u32>());
    client.mkdir(&root, true).await?;
    eprintln!("{n} creates from {clients} clients...");
    let (elapsed, lat) = creates(m, &root, clients, n).await?;
    client.remove(&root, true).await?;
    client.close();
    Ok(vec![Row {
        what: format!("file creates, 3 masters ({clients} clients)"),
        value: format!("{:.0} creates/s", n as f64 / elapsed.as_secs_f64()),
        note: format!("{n} empty files; p50 {}, p99 {}", ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99))),
    }])
}

fn rss_bytes(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// Bytes a file occupies on disk (the Raft log files grow sparse, ahead of their records).
fn disk_usage(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
}

pub async fn scale(m: &mut Masters, clients: usize, n: usize) -> Result<Vec<Row>> {
    const TAIL: usize = 25_000;
    let client = m.client(Duration::from_secs(60)).await?;
    let root = format!("/bench-scale-{:08x}", rand::random::<u32>());
    client.mkdir(&root, true).await?;
    let (leader, _, _) = Masters::group(&client).await?;
    let before = rss_bytes(m.pid(leader)?)?;
    eprintln!("{n} creates from {clients} clients...");
    let (elapsed, lat) = creates(m, &format!("{root}/a"), clients, n.saturating_sub(TAIL)).await?;
    // A follower misses the last creates, more than the log keeps after compaction.
    let (leader2, _, _) = Masters::group(&client).await?;
    anyhow::ensure!(leader2 == leader, "leadership changed during the run");
    let follower = (1..=m.addrs.len() as u64).find(|id| *id != leader).context("no follower")?;
    let args = m.kill(follower)?;
    let (tail_elapsed, _) = creates(m, &format!("{root}/b"), clients, TAIL.min(n)).await?;
    let after = rss_bytes(m.pid(leader)?)?;
    let data = m.cluster_dir.join(format!("master-{leader}/data"));
    let store = ["master.redb", cairn_master::raftlog::LOG_FILES[0], cairn_master::raftlog::LOG_FILES[1]]
        .iter()
        .map(|f| disk_usage(&data.join(f)))
        .sum::<u64>();
    let t = m.restart(follower, &args)?;
    Masters::caught_up(&client, follower, Duration::from_secs(300)).await?;
    let snapshot_catch_up = t.elapsed();
    // A plain restart: kill -9 the same follower, which now holds everything.
    let args = m.kill(follower)?;
    let t = m.restart(follower, &args)?;
    Masters::caught_up(&client, follower, Duration::from_secs(300)).await?;
    let restart = t.elapsed();
    let rate = n as f64 / (elapsed + tail_elapsed).as_secs_f64();
    eprintln!("removing the files...");
    client.remove(&root, true).await?;
    client.close();
    Ok(vec![
        Row {
            what: format!("{n} files: creates"),
            value: format!("{rate:.0} creates/s"),
            note: format!("{clients} clients; p50 {}, p99 {}", ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99))),
        },
        Row {
            what: format!("{n} files: leader memory"),
            value: format!("{:.0} B/file", after.saturating_sub(before) as f64 / n as f64),
            note: format!(
                "resident {:.0} MiB before, {:.0} MiB after",
                before as f64 / 1048576.0,
                after as f64 / 1048576.0
            ),
        },
        Row {
            what: format!("{n} files: metadata store (= snapshot source)"),
            value: format!("{:.0} MiB", store as f64 / 1048576.0),
            note: format!("{:.0} B/file on disk, Raft log files included", store as f64 / n as f64),
        },
        Row {
            what: "follower catch-up by snapshot".into(),
            value: format!("{:.1} s", snapshot_catch_up.as_secs_f64()),
            note: format!("restart after missing {TAIL} creates, to applied = commit"),
        },
        Row {
            what: "master restart".into(),
            value: format!("{:.2} s", restart.as_secs_f64()),
            note: "kill -9, start, to applied = commit (serving)".into(),
        },
    ])
}
