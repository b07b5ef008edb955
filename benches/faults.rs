//! `cairn bench --mode faults`: client throughput while nodes fail. Writers and readers run for
//! `--duration-s` seconds against the cluster; every byte read is verified (BLAKE3 of the whole
//! file against what was written). Faults are injected on a schedule (`--fault
//! kill-chunkserver@20s`, `restart-chunkserver@60s`, `kill-leader@40s`, `restart-master@50s`) into
//! the cluster the benchmark started. It writes a CSV timeline (per second: read and write MB/s,
//! operations, errors, p99 latency, under-replicated chunks, repair MB/s) and a PNG chart of it
//! with the faults marked, and ends with a summary: throughput before, during and after each
//! fault, errors, and for a killed chunkserver the time until every chunk was back at its goal.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use cairn_client::{Client, ClientConfig, PutOptions};
use rand::Rng;

use crate::bench::{random, BenchArgs, HashSink, Row};
use crate::bench_procs::NodeProcs;

#[derive(Clone, Debug, PartialEq)]
pub enum FaultKind {
    /// SIGKILL a chunkserver: the given one, or the one holding the most data.
    KillChunkserver(Option<u64>),
    /// Start a killed chunkserver again: the given one, or the last killed.
    RestartChunkserver(Option<u64>),
    KillLeader,
    /// Start a killed master again: the given one, or the last killed.
    RestartMaster(Option<u64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub at: Duration,
    pub kind: FaultKind,
    pub label: String,
}

/// Parses `KIND[:N]@SECONDS[s]`, e.g. `kill-chunkserver@20s`, `restart-chunkserver:2@60s`.
pub fn parse_fault(s: &str) -> Result<Fault> {
    let (what, at) = s
        .split_once('@')
        .with_context(|| format!("--fault {s:?}: want KIND[:N]@SECONDS, e.g. kill-chunkserver@20s"))?;
    let secs: f64 = at
        .trim_end_matches('s')
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .with_context(|| format!("--fault {s:?}: {at:?} is not a number of seconds"))?;
    let (kind, n) = match what.split_once(':') {
        Some((k, n)) => {
            let n: u64 =
                n.parse().ok().filter(|n| *n > 0).with_context(|| format!("--fault {s:?}: bad node number {n:?}"))?;
            (k, Some(n))
        }
        None => (what, None),
    };
    let kind = match (kind, n) {
        ("kill-chunkserver", n) => FaultKind::KillChunkserver(n),
        ("restart-chunkserver", n) => FaultKind::RestartChunkserver(n),
        ("kill-leader", None) => FaultKind::KillLeader,
        ("restart-master", n) => FaultKind::RestartMaster(n),
        _ => anyhow::bail!(
            "--fault {s:?}: kinds are kill-chunkserver[:N], restart-chunkserver[:N], kill-leader, restart-master[:N]"
        ),
    };
    Ok(Fault { at: Duration::from_secs_f64(secs), kind, label: what.to_string() })
}

/// One second of the timeline.
#[derive(Default, Clone)]
struct Second {
    read_bytes: u64,
    write_bytes: u64,
    read_ops: u64,
    write_ops: u64,
    errors: u64,
    latencies_ms: Vec<f64>,
    under_replicated: Option<u64>,
    repair_bytes_per_s: Option<u64>,
    fault: Option<String>,
}

struct Timeline {
    start: Instant,
    seconds: Mutex<Vec<Second>>,
    first_errors: Mutex<Vec<String>>,
}

impl Timeline {
    fn at(&self, f: impl FnOnce(&mut Second)) {
        let i = self.start.elapsed().as_secs() as usize;
        let mut s = self.seconds.lock().expect("timeline lock");
        if s.len() <= i {
            s.resize(i + 1, Second::default());
        }
        f(&mut s[i]);
    }

    fn op(&self, read: bool, bytes: u64, took: Duration) {
        self.at(|s| {
            if read {
                s.read_bytes += bytes;
                s.read_ops += 1;
            } else {
                s.write_bytes += bytes;
                s.write_ops += 1;
            }
            s.latencies_ms.push(took.as_secs_f64() * 1e3);
        });
    }

    fn error(&self, what: String) {
        self.at(|s| s.errors += 1);
        let mut e = self.first_errors.lock().expect("errors lock");
        if e.len() < 5 {
            e.push(format!("{:.1}s: {what}", self.start.elapsed().as_secs_f64()));
        }
    }
}

/// A file readers may read: its path, size and BLAKE3.
#[derive(Clone)]
struct Written {
    path: String,
    size: u64,
    hash: blake3::Hash,
}

/// Files each writer keeps; older ones are deleted (garbage collection frees their space).
const KEEP_PER_WRITER: usize = 4;

async fn writer(client: Client, w: usize, a: WorkArgs, files: Arc<RwLock<Vec<Written>>>, t: Arc<Timeline>) {
    let mut mine: Vec<String> = Vec::new();
    let mut n = 0u64;
    while t.start.elapsed() < a.duration {
        n += 1;
        let data = Bytes::from(random(a.file_bytes, (w as u64) << 32 | n));
        let hash = blake3::hash(&data);
        let path = format!("/bench-faults/w{w}-{n}");
        let began = Instant::now();
        match client.put_bytes(&path, data, &PutOptions::default()).await {
            Ok(_) => {
                t.op(false, a.file_bytes as u64, began.elapsed());
                files.write().expect("files lock").push(Written {
                    path: path.clone(),
                    size: a.file_bytes as u64,
                    hash,
                });
                mine.push(path);
            }
            Err(e) => t.error(format!("put {path}: {e}")),
        }
        if mine.len() > KEEP_PER_WRITER {
            let old = mine.remove(0);
            files.write().expect("files lock").retain(|f| f.path != old);
            if let Err(e) = client.remove(&old, false).await {
                t.error(format!("rm {old}: {e}"));
            }
        }
    }
}

async fn reader(client: Client, a: WorkArgs, files: Arc<RwLock<Vec<Written>>>, t: Arc<Timeline>) {
    while t.start.elapsed() < a.duration {
        let pick = {
            let f = files.read().expect("files lock");
            if f.is_empty() {
                None
            } else {
                Some(f[rand::rng().random_range(0..f.len())].clone())
            }
        };
        let Some(f) = pick else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let began = Instant::now();
        let mut sink = HashSink(blake3::Hasher::new(), 0);
        match client.get(&f.path, &mut sink, 0, None, &|_| {}).await {
            Ok(_) if sink.1 == f.size && sink.0.finalize() == f.hash => t.op(true, f.size, began.elapsed()),
            Ok(_) => t.error(format!("get {}: {} bytes that differ from what was written", f.path, sink.1)),
            // Deleted by its writer meanwhile: not a failure.
            Err(_) if !files.read().expect("files lock").iter().any(|x| x.path == f.path) => {}
            Err(e) => t.error(format!("get {}: {e}", f.path)),
        }
    }
}

#[derive(Clone, Copy)]
struct WorkArgs {
    duration: Duration,
    file_bytes: usize,
}

/// The cluster's view each second: under-replicated chunks and the repair rate.
async fn sampler(client: Client, duration: Duration, t: Arc<Timeline>, bar: indicatif::ProgressBar) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while t.start.elapsed() < duration {
        tick.tick().await;
        if let Ok(s) = client.status().await {
            let c = s.chunks.unwrap_or_default();
            t.at(|sec| {
                sec.under_replicated = Some(c.under_replicated);
                sec.repair_bytes_per_s = Some(c.repair_bytes_per_s);
            });
        }
        let last = {
            let s = t.seconds.lock().expect("timeline lock");
            let i = s.len().saturating_sub(2);
            s.get(i).cloned().unwrap_or_default()
        };
        bar.set_position(t.start.elapsed().as_secs().min(duration.as_secs()));
        bar.set_message(format!(
            "read {:.0} MB/s  write {:.0} MB/s  errors {}  under-replicated {}",
            last.read_bytes as f64 / 1e6,
            last.write_bytes as f64 / 1e6,
            t.seconds.lock().expect("timeline lock").iter().map(|s| s.errors).sum::<u64>(),
            last.under_replicated.map_or("?".into(), |u| u.to_string()),
        ));
    }
}

/// A fault done: when, what, and (kills of chunkservers) how much data the node held.
struct Done {
    at: Duration,
    fault: Fault,
    node_bytes: u64,
}

/// Injects the faults on schedule. Returns what it did, and the node handles (restarted nodes
/// are its children: they live until the handles are dropped).
async fn inject(
    faults: Vec<Fault>,
    client: Client,
    mut masters: crate::bench_masters::Masters,
    mut chunkservers: Chunkservers,
    t: Arc<Timeline>,
) -> Result<(Vec<Done>, crate::bench_masters::Masters, Chunkservers)> {
    let mut done = Vec::new();
    let mut killed_cs: Vec<(u64, Vec<String>)> = Vec::new();
    let mut killed_m: Vec<(u64, Vec<String>)> = Vec::new();
    for f in faults {
        tokio::time::sleep_until((t.start + f.at).into()).await;
        let mut node_bytes = 0;
        match &f.kind {
            FaultKind::KillChunkserver(n) => {
                let s = client.status().await.context("status before a kill")?;
                let n = match n {
                    Some(n) => *n,
                    None => chunkservers.fullest(&s)?,
                };
                node_bytes = chunkservers.used(&s, n).unwrap_or(0);
                killed_cs.push((n, chunkservers.procs.kill(n)?));
            }
            FaultKind::RestartChunkserver(n) => {
                let i = match n {
                    Some(n) => killed_cs.iter().position(|(k, _)| k == n),
                    None => killed_cs.len().checked_sub(1),
                }
                .context("restart-chunkserver: no such chunkserver was killed")?;
                let (id, args) = killed_cs.remove(i);
                chunkservers.procs.restart(id, &args)?;
            }
            FaultKind::KillLeader => {
                let s = client.status().await.context("status before a kill")?;
                let leader = s.masters.iter().find(|m| m.role == "leader").context("no leader to kill")?.id;
                killed_m.push((leader, masters.kill(leader)?));
            }
            FaultKind::RestartMaster(n) => {
                let i = match n {
                    Some(n) => killed_m.iter().position(|(k, _)| k == n),
                    None => killed_m.len().checked_sub(1),
                }
                .context("restart-master: no such master was killed")?;
                let (id, args) = killed_m.remove(i);
                masters.restart(id, &args)?;
            }
        }
        t.at(|s| s.fault = Some(f.label.clone()));
        done.push(Done { at: t.start.elapsed(), fault: f, node_bytes });
    }
    Ok((done, masters, chunkservers))
}

/// The chunkservers of the cluster the benchmark started, by their `cairn dev` number (1..N).
struct Chunkservers {
    cluster_dir: PathBuf,
    count: u64,
    procs: NodeProcs,
}

impl Chunkservers {
    /// The node id that chunkserver `n` chose at its first start (status lists nodes by id).
    fn node_id(&self, n: u64) -> Option<u64> {
        let f = self.cluster_dir.join(format!("chunkserver-{n}/data/node_id"));
        std::fs::read_to_string(f).ok()?.trim().parse().ok()
    }

    fn used(&self, s: &cairn_proto::v1::StatusResponse, n: u64) -> Option<u64> {
        let id = self.node_id(n)?;
        s.chunkservers.iter().find(|c| c.id == id && c.state == "alive").map(|c| c.used_bytes)
    }

    /// The live chunkserver holding the most bytes.
    fn fullest(&self, s: &cairn_proto::v1::StatusResponse) -> Result<u64> {
        (1..=self.count)
            .filter_map(|n| self.used(s, n).map(|used| (n, used)))
            .max_by_key(|(_, used)| *used)
            .map(|(n, _)| n)
            .context("no live chunkserver to kill")
    }
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

fn write_csv(path: &Path, seconds: &[Second]) -> Result<()> {
    let mut out =
        String::from("t_s,read_MBps,write_MBps,read_ops,write_ops,errors,p99_ms,under_replicated,repair_MBps,fault\n");
    for (i, s) in seconds.iter().enumerate() {
        let mut lat = s.latencies_ms.clone();
        out.push_str(&format!(
            "{i},{:.1},{:.1},{},{},{},{:.1},{},{},{}\n",
            s.read_bytes as f64 / 1e6,
            s.write_bytes as f64 / 1e6,
            s.read_ops,
            s.write_ops,
            s.errors,
            percentile(&mut lat, 0.99),
            s.under_replicated.map_or(String::new(), |u| u.to_string()),
            s.repair_bytes_per_s.map_or(String::new(), |r| format!("{:.1}", r as f64 / 1e6)),
            s.fault.clone().unwrap_or_default(),
        ));
    }
    std::fs::write(path, out).with_context(|| format!("write {}", path.display()))
}

static FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");

fn draw_chart(path: &Path, seconds: &[Second], done: &[Done]) -> Result<()> {
    use plotters::prelude::*;
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("load the chart font"))?;
    let root = BitMapBackend::new(path, (1200, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(460);
    let n = seconds.len().max(2) as f64;
    let mb = |b: u64| b as f64 / 1e6;
    let ymax = seconds
        .iter()
        .map(|s| mb(s.read_bytes).max(mb(s.write_bytes)).max(s.repair_bytes_per_s.map_or(0.0, mb)))
        .fold(10.0, f64::max)
        * 1.15;
    let mut c = ChartBuilder::on(&top)
        .caption("cairn bench --mode faults: client throughput and repair", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n, 0f64..ymax)?;
    c.configure_mesh().y_desc("MB/s").x_desc("seconds").label_style(("sans-serif", 14)).draw()?;
    let series = |f: &dyn Fn(&Second) -> Option<f64>| -> Vec<(f64, f64)> {
        seconds.iter().enumerate().filter_map(|(i, s)| f(s).map(|v| (i as f64 + 0.5, v))).collect()
    };
    c.draw_series(LineSeries::new(series(&|s| Some(mb(s.read_bytes))), BLUE.stroke_width(2)))?
        .label("read (verified)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    c.draw_series(LineSeries::new(series(&|s| Some(mb(s.write_bytes))), GREEN.stroke_width(2)))?
        .label("write")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    c.draw_series(LineSeries::new(series(&|s| s.repair_bytes_per_s.map(mb)), RED.stroke_width(2)))?
        .label("re-replication")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    for d in done {
        let x = d.at.as_secs_f64();
        c.draw_series(LineSeries::new(vec![(x, 0.0), (x, ymax)], BLACK.stroke_width(1)))?;
        c.draw_series(std::iter::once(Text::new(d.fault.label.clone(), (x + 0.5, ymax * 0.95), ("sans-serif", 14))))?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    let umax = seconds.iter().filter_map(|s| s.under_replicated).max().unwrap_or(0).max(1) as f64 * 1.15;
    let mut u = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n, 0f64..umax)?;
    u.configure_mesh().y_desc("under-replicated chunks").x_desc("seconds").label_style(("sans-serif", 14)).draw()?;
    u.draw_series(LineSeries::new(series(&|s| s.under_replicated.map(|v| v as f64)), MAGENTA.stroke_width(2)))?;
    for d in done {
        let x = d.at.as_secs_f64();
        u.draw_series(LineSeries::new(vec![(x, 0.0), (x, umax)], BLACK.stroke_width(1)))?;
    }
    root.present().with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// MB/s of client reads and writes over seconds `from..to` (whole seconds of the timeline).
fn throughput(seconds: &[Second], from: usize, to: usize) -> (f64, f64) {
    let to = to.min(seconds.len());
    if to <= from {
        return (0.0, 0.0);
    }
    let s = &seconds[from..to];
    let n = s.len() as f64;
    (
        s.iter().map(|x| x.read_bytes).sum::<u64>() as f64 / 1e6 / n,
        s.iter().map(|x| x.write_bytes).sum::<u64>() as f64 / 1e6 / n,
    )
}

/// Runs the workload on the cluster at `masters`; `cluster_dir` is the `cairn dev` directory of
/// a cluster the benchmark started (needed for faults).
pub async fn run(a: &BenchArgs, cluster_dir: Option<PathBuf>, masters: Vec<String>, tls: PathBuf) -> Result<Vec<Row>> {
    let mut faults = a.fault.iter().map(|f| parse_fault(f)).collect::<Result<Vec<_>>>()?;
    faults.sort_by_key(|f| f.at);
    let duration = Duration::from_secs(a.duration_s);
    anyhow::ensure!(faults.iter().all(|f| f.at < duration), "every --fault must come before --duration-s");
    anyhow::ensure!(a.writers + a.readers > 0, "--writers and --readers are both 0");
    let cfg = ClientConfig { masters: masters.clone(), tls_dir: tls.clone(), master_deadline: Duration::from_secs(60) };
    let client = Client::connect(cfg.clone()).await?;
    client.mkdir("/bench-faults", true).await?;
    let work = WorkArgs { duration, file_bytes: a.file_mib << 20 };

    // Prefill: data for the readers, and for a killed node to have lost.
    let files: Arc<RwLock<Vec<Written>>> = Arc::default();
    let prefill = a.prefill_mib / a.file_mib.max(1);
    eprintln!("prefill: {prefill} files of {} MiB...", a.file_mib);
    let bar = progress(prefill as u64, "prefill");
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..prefill {
        let (client, files) = (client.clone(), files.clone());
        tasks.spawn(async move {
            let data = Bytes::from(random(work.file_bytes, 1 << 40 | p as u64));
            let hash = blake3::hash(&data);
            let path = format!("/bench-faults/pre-{p}");
            client.put_bytes(&path, data, &PutOptions::default()).await.with_context(|| format!("prefill {path}"))?;
            files.write().expect("files lock").push(Written { path, size: work.file_bytes as u64, hash });
            anyhow::Ok(())
        });
        if tasks.len() >= 4 {
            tasks.join_next().await.context("prefill task")???;
            bar.inc(1);
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.context("prefill task")??;
        bar.inc(1);
    }
    bar.finish_and_clear();

    let t = Arc::new(Timeline { start: Instant::now(), seconds: Mutex::default(), first_errors: Mutex::default() });
    let bar = progress(a.duration_s, "run");
    let mut work_tasks = tokio::task::JoinSet::new();
    for w in 0..a.writers {
        work_tasks.spawn(writer(Client::connect(cfg.clone()).await?, w, work, files.clone(), t.clone()));
    }
    for _ in 0..a.readers {
        work_tasks.spawn(reader(Client::connect(cfg.clone()).await?, work, files.clone(), t.clone()));
    }
    work_tasks.spawn(sampler(client.clone(), duration, t.clone(), bar.clone()));
    let injector = cluster_dir.map(|dir| {
        let m = crate::bench_masters::Masters::new(dir.clone(), masters, tls);
        let procs = NodeProcs::new(dir.clone(), "chunkserver");
        let cs = Chunkservers { count: a.chunkservers as u64, procs, cluster_dir: dir };
        tokio::spawn(inject(faults, client.clone(), m, cs, t.clone()))
    });
    while work_tasks.join_next().await.is_some() {}
    bar.finish_and_clear();
    // Every fault was scheduled before the end, so the injector is done (or failed).
    let (done, _nodes) = match injector {
        Some(j) => {
            let (done, m, cs) = j.await.context("fault injector")?.context("fault injection")?;
            (done, Some((m, cs)))
        }
        None => (Vec::new(), None),
    };

    let seconds = t.seconds.lock().expect("timeline lock").clone();
    std::fs::create_dir_all(&a.out)?;
    let csv = a.out.join("faults.csv");
    let png = a.out.join("faults.png");
    write_csv(&csv, &seconds)?;
    draw_chart(&png, &seconds, &done)?;
    Ok(summary(&seconds, &done, &t, &csv, &png, a))
}

fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!("{what} [{{bar:30}}] {{pos}}/{{len}} {{msg}}"))
            .expect("progress template")
            .progress_chars("=> "),
    );
    bar
}

fn summary(seconds: &[Second], done: &[Done], t: &Timeline, csv: &Path, png: &Path, a: &BenchArgs) -> Vec<Row> {
    let mut rows = Vec::new();
    let errors: u64 = seconds.iter().map(|s| s.errors).sum();
    let first = done.first().map_or(seconds.len(), |d| d.at.as_secs() as usize);
    let (r0, w0) = throughput(seconds, 1, first);
    rows.push(Row {
        what: "before the first fault".into(),
        value: format!("read {r0:.0} MB/s, write {w0:.0} MB/s"),
        note: format!("{} writers, {} readers, {} MiB files, every read verified", a.writers, a.readers, a.file_mib),
    });
    for (i, d) in done.iter().enumerate() {
        let at = d.at.as_secs() as usize;
        let next = done.get(i + 1).map_or(seconds.len(), |n| n.at.as_secs() as usize);
        match d.fault.kind {
            FaultKind::KillChunkserver(_) => {
                let under = |s: &Second| s.under_replicated.unwrap_or(0);
                let seen = seconds.iter().enumerate().skip(at).find(|(_, s)| under(s) > 0).map(|(j, _)| j);
                let back = seen.and_then(|j| {
                    seconds.iter().enumerate().skip(j).find(|(_, s)| s.under_replicated == Some(0)).map(|(k, _)| k)
                });
                let (rd, wd) = throughput(seconds, at, back.unwrap_or(next));
                let rebuild = match (seen, back) {
                    (Some(j), Some(k)) if k > j => {
                        format!(", rebuild {:.0} MB/s", d.node_bytes as f64 / 1e6 / (k - j) as f64)
                    }
                    _ => String::new(),
                };
                rows.push(Row {
                    what: format!("{} at {:.0} s", d.fault.label, d.at.as_secs_f64()),
                    value: match back {
                        Some(k) => format!("full replication {} s after the kill{rebuild}", k - at),
                        None => "not back at full replication before the end".into(),
                    },
                    note: format!(
                        "detected after {} s; during repair read {rd:.0} MB/s ({:.0}% of before), write {wd:.0} MB/s; peak repair {:.0} MB/s",
                        seen.map_or("?".into(), |j| (j - at).to_string()),
                        if r0 > 0.0 { rd / r0 * 100.0 } else { 0.0 },
                        seconds[at.min(seconds.len())..].iter().filter_map(|s| s.repair_bytes_per_s).max().unwrap_or(0) as f64 / 1e6
                    ),
                });
            }
            _ => {
                let (rd, wd) = throughput(seconds, at, (at + 10).min(next));
                rows.push(Row {
                    what: format!("{} at {:.0} s", d.fault.label, d.at.as_secs_f64()),
                    value: format!("next 10 s: read {rd:.0} MB/s, write {wd:.0} MB/s"),
                    note: String::new(),
                });
            }
        }
    }
    if let Some(d) = done.last() {
        // The last second is partial: leave it out.
        let from = (d.at.as_secs() as usize + 10).min(seconds.len().saturating_sub(1));
        let (r2, w2) = throughput(seconds, from, seconds.len().saturating_sub(1));
        rows.push(Row {
            what: "after the last fault".into(),
            value: format!("read {r2:.0} MB/s, write {w2:.0} MB/s"),
            note: "from 10 s after it to the end".into(),
        });
    }
    let first_errors = t.first_errors.lock().expect("errors lock").join("; ");
    rows.push(Row { what: "client errors".into(), value: errors.to_string(), note: first_errors });
    rows.push(Row { what: "timeline".into(), value: csv.display().to_string(), note: png.display().to_string() });
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_bad_ones_are_refused() {
        let f = parse_fault("kill-chunkserver@20s").unwrap();
        assert_eq!((f.at, f.kind), (Duration::from_secs(20), FaultKind::KillChunkserver(None)));
        assert_eq!(parse_fault("restart-chunkserver:2@60").unwrap().kind, FaultKind::RestartChunkserver(Some(2)));
        assert_eq!(parse_fault("kill-leader@1.5s").unwrap().at, Duration::from_millis(1500));
        for bad in
            ["kill-chunkserver", "kill-leader:2@3s", "explode@3s", "kill-chunkserver@-1s", "kill-chunkserver:0@1s"]
        {
            assert!(parse_fault(bad).is_err(), "{bad:?} accepted");
        }
    }
}
