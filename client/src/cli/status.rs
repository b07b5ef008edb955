//! `cairn status`: the cluster at a glance. [`StatusJson`] is the one definition of both the
//! human table and the `--json` output, which is a stable contract: fields are only added.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::ClusterArgs;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Print JSON (stable schema, see DESIGN.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct MasterJson {
    pub id: u64,
    pub addr: String,
    pub role: String,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub alive: bool,
    /// The leader's view: the highest log index known to be on this master (0 if unknown).
    #[serde(default)]
    pub matched_index: u64,
    /// Entries committed by the group that this master has not applied yet.
    #[serde(default)]
    pub lag: u64,
}

/// The masters of a status or membership answer, with each one's lag behind the leader's commit.
pub fn masters_json(masters: Vec<cairn_proto::v1::MasterStatus>) -> Vec<MasterJson> {
    let commit = masters.iter().filter(|m| m.role == "leader").map(|m| m.commit_index).max().unwrap_or(0);
    masters
        .into_iter()
        .map(|m| MasterJson {
            lag: if m.alive { commit.saturating_sub(m.applied_index) } else { 0 },
            id: m.id,
            addr: m.addr,
            role: m.role,
            term: m.term,
            commit_index: m.commit_index,
            applied_index: m.applied_index,
            alive: m.alive,
            matched_index: m.matched_index,
        })
        .collect()
}

/// The masters as a table (shared by `status` and `admin masters`).
pub fn write_masters(f: &mut impl std::fmt::Write, masters: &[MasterJson]) -> std::fmt::Result {
    writeln!(
        f,
        "  {:>4}  {:<22} {:<12} {:>6} {:>10} {:>10} {:>8}",
        "ID", "ADDRESS", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG"
    )?;
    for m in masters {
        let lag = if m.alive { m.lag.to_string() } else { "-".into() };
        writeln!(
            f,
            "  {:>4}  {:<22} {:<12} {:>6} {:>10} {:>10} {:>8}",
            m.id, m.addr, m.role, m.term, m.commit_index, m.applied_index, lag
        )?;
    }
    Ok(())
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ChunkserverJson {
    pub id: u64,
    pub addr: String,
    pub zone: String,
    pub state: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub chunks: u64,
    /// null when this leader has not heard from the node yet.
    pub last_heartbeat_ms_ago: Option<u64>,
    /// Draining: chunks files reference that still have a replica on this node.
    #[serde(default)]
    pub to_move: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct ChunksJson {
    pub total: u64,
    pub under_replicated: u64,
    pub over_replicated: u64,
    pub lost: u64,
    pub repair_queue: u64,
    /// Replicas of chunks no file references, waiting for their grace period or being deleted.
    #[serde(default)]
    pub gc_backlog: u64,
    /// Surplus replicas being deleted (a node came back after its chunks were copied).
    #[serde(default)]
    pub trim_queue: u64,
    /// [n]: chunks with n live replicas.
    #[serde(default)]
    pub by_replicas: Vec<u64>,
}

/// Re-replication: its limits per chunkserver and its current throughput.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct RepairJson {
    /// Copy bandwidth per chunkserver, bytes per second (0: unlimited).
    pub rate_limit_bytes: u64,
    /// Copies in flight per chunkserver.
    pub copies: u32,
    /// Bytes copied per second over the last few seconds, whole cluster.
    pub bytes_per_s: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct StatusJson {
    pub masters: Vec<MasterJson>,
    pub chunkservers: Vec<ChunkserverJson>,
    pub chunks: ChunksJson,
    #[serde(default)]
    pub repair: RepairJson,
    pub files: u64,
    pub bytes: u64,
}

impl From<cairn_proto::v1::StatusResponse> for StatusJson {
    fn from(s: cairn_proto::v1::StatusResponse) -> StatusJson {
        let c = s.chunks.unwrap_or_default();
        StatusJson {
            masters: masters_json(s.masters),
            chunkservers: s
                .chunkservers
                .into_iter()
                .map(|c| ChunkserverJson {
                    id: c.id,
                    addr: c.addr,
                    zone: c.zone,
                    state: c.state,
                    capacity_bytes: c.capacity_bytes,
                    used_bytes: c.used_bytes,
                    chunks: c.chunks,
                    last_heartbeat_ms_ago: (c.last_heartbeat_ms_ago != u64::MAX).then_some(c.last_heartbeat_ms_ago),
                    to_move: c.to_move,
                })
                .collect(),
            chunks: ChunksJson {
                total: c.total,
                under_replicated: c.under_replicated,
                over_replicated: c.over_replicated,
                lost: c.lost,
                repair_queue: c.repair_queue,
                gc_backlog: c.gc_backlog,
                trim_queue: c.trim_queue,
                by_replicas: c.by_replicas,
            },
            repair: RepairJson {
                rate_limit_bytes: c.repair_limits.map_or(0, |l| l.rate_bytes),
                copies: c.repair_limits.map_or(0, |l| l.copies),
                bytes_per_s: c.repair_bytes_per_s,
            },
            files: s.files,
            bytes: s.bytes,
        }
    }
}

pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl std::fmt::Display for StatusJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "MASTERS")?;
        write_masters(f, &self.masters)?;
        writeln!(f, "CHUNKSERVERS")?;
        writeln!(
            f,
            "  {:>20}  {:<22} {:<8} {:<8} {:>10} {:>10} {:>8} {:>9}",
            "ID", "ADDRESS", "ZONE", "STATE", "CAPACITY", "USED", "CHUNKS", "HEARTBEAT"
        )?;
        for c in &self.chunkservers {
            let hb =
                c.last_heartbeat_ms_ago.map_or("never".to_string(), |ms| format!("{:.1}s ago", ms as f64 / 1000.0));
            writeln!(
                f,
                "  {:>20}  {:<22} {:<8} {:<8} {:>10} {:>10} {:>8} {:>9}",
                c.id,
                c.addr,
                c.zone,
                c.state,
                human(c.capacity_bytes),
                human(c.used_bytes),
                c.chunks,
                hb
            )?;
        }
        let c = &self.chunks;
        writeln!(
            f,
            "CHUNKS  total {}  under-replicated {}  over-replicated {}  lost {}",
            c.total, c.under_replicated, c.over_replicated, c.lost
        )?;
        let by: Vec<String> =
            c.by_replicas.iter().enumerate().filter(|(_, n)| **n > 0).map(|(r, n)| format!("{r}:{n}")).collect();
        if !by.is_empty() {
            writeln!(f, "        by live replicas (replicas:chunks)  {}", by.join("  "))?;
        }
        let r = &self.repair;
        let limit =
            if r.rate_limit_bytes == 0 { "unlimited".into() } else { format!("{}/s", human(r.rate_limit_bytes)) };
        writeln!(
            f,
            "REPAIR  copying {} at {}/s  (limit {limit} and {} copies per node)  deleting: garbage {}  surplus {}",
            c.repair_queue,
            human(r.bytes_per_s),
            r.copies,
            c.gc_backlog,
            c.trim_queue
        )?;
        write!(f, "FILES   {}  ({})", self.files, human(self.bytes))
    }
}

pub async fn status(args: &StatusArgs) -> Result<()> {
    let client = args.cluster.connect().await?;
    let s: StatusJson = client.status().await.context("status")?.into();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!("{s}");
    }
    Ok(())
}
