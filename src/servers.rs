//! `cairn master`, `cairn chunkserver` and `cairn ca`: argument parsing and start-up of the
//! server libraries, with SIGINT/SIGTERM turned into a clean shutdown.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_common::tls;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(clap::Args, Debug)]
pub struct MasterArgs {
    /// This master's id in the group (nonzero).
    #[arg(long)]
    pub id: u64,
    /// Data directory (Raft log and namespace).
    #[arg(long)]
    pub data: PathBuf,
    /// gRPC listen address (port 0: any free port, printed at start).
    #[arg(long)]
    pub listen: String,
    /// Every master of the group at creation: ID=ADDR,... (this one included). Ignored once the
    /// data directory holds a group; membership then changes with `cairn admin masters`.
    #[arg(long, value_delimiter = ',', conflicts_with = "join")]
    pub peers: Vec<String>,
    /// Start empty and wait to be added to an existing group (`cairn admin masters add ID=ADDR`).
    #[arg(long)]
    pub join: bool,
    /// Address the other masters and clients reach this one at (default: the listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Compact the Raft log after this many entries (followers further behind get a snapshot).
    #[arg(long, default_value_t = cairn_master::node::COMPACT_EVERY)]
    pub compact_every: u64,
    /// TLS identity directory (ca.pem, cert.pem, key.pem).
    #[arg(long = "tls", env = "CAIRN_TLS")]
    pub tls: PathBuf,
    /// Seconds of silence after which a chunkserver counts as dead.
    #[arg(long, default_value_t = 10)]
    pub dead_after_s: u64,
    /// Seconds an uploaded chunk is kept while no file references it (an upload must commit
    /// within this time); also how long a new leader waits before it collects garbage.
    #[arg(long, default_value_t = cairn_master::cluster::DEFAULT_GC_GRACE.as_secs())]
    pub gc_grace_s: u64,
    /// Seconds the leader waits for a mount that kept unlinked files open (it renews every
    /// quarter of this, at least every 30 s) before it frees those files: a mount that crashed
    /// does not leak them. Give every master the same value.
    #[arg(long, default_value_t = cairn_master::cluster::DEFAULT_KEPT_GRACE.as_secs())]
    pub kept_grace_s: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: any free port, printed at start).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct ChunkserverArgs {
    /// Data directory (chunks).
    #[arg(long)]
    pub data: PathBuf,
    /// QUIC (UDP) listen address (port 0: any free port, printed at start).
    #[arg(long)]
    pub listen: String,
    /// Failure domain; replicas of a chunk go to different zones where possible.
    #[arg(long, default_value = "default")]
    pub zone: String,
    /// Master gRPC addresses, comma-separated.
    #[arg(long, env = "CAIRN_MASTERS", value_delimiter = ',', required = true)]
    pub masters: Vec<String>,
    /// TLS identity directory (ca.pem, cert.pem, key.pem).
    #[arg(long = "tls", env = "CAIRN_TLS")]
    pub tls: PathBuf,
    /// Address clients and peers reach this chunkserver at (default: the listen address; needed
    /// when listening on 0.0.0.0).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Use at most this many bytes of the disk (K, M, G, T suffixes).
    #[arg(long, value_parser = cairn_common::units::parse_bytes)]
    pub capacity: Option<u64>,
    /// Bytes per second the scrubber re-reads to find corrupt chunks (0: off). The default
    /// checks a 4 TB disk about every three days.
    #[arg(long, default_value = "16M", value_parser = cairn_common::units::parse_bytes)]
    pub scrub_rate: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: any free port, printed at start).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum CaCmd {
    /// Create a cluster CA (ca.pem, ca.key) in DIR unless one exists.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate signed by the CA into OUT (ca.pem, cert.pem, key.pem).
    Issue {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// node (masters, chunkservers) or client.
        #[arg(long, value_parser = ["node", "client"])]
        role: String,
        /// IP addresses the node serves on (node certificates).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
    },
}

/// Binds `--metrics ADDR` if given. Call it before printing "listening on", and print its
/// address with [`announce_metrics`] right after that line (tests read them in this order).
fn bind_metrics(addr: Option<&str>) -> Result<Option<std::net::TcpListener>> {
    addr.map(cairn_common::metrics::bind).transpose()
}

fn announce_metrics(listener: Option<&std::net::TcpListener>) -> Result<()> {
    if let Some(l) = listener {
        println!("metrics on {}", l.local_addr().context("metrics listener address")?);
    }
    Ok(())
}

/// A token cancelled on the first SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        t.cancel();
    });
    Ok(token)
}

pub async fn master(a: &MasterArgs) -> Result<()> {
    let identity = tls::Identity::load(&a.tls)?;
    let mut peers = BTreeMap::new();
    for p in &a.peers {
        let (id, addr) = p.split_once('=').with_context(|| format!("--peers entry {p:?} is not ID=ADDR"))?;
        let id: u64 = id.parse().with_context(|| format!("--peers entry {p:?}: bad id"))?;
        anyhow::ensure!(peers.insert(id, addr.to_string()).is_none(), "--peers names master {id} twice");
    }
    let listener = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("listen on {}", a.listen))?;
    let local = listener.local_addr()?;
    let advertise = match &a.advertise {
        Some(adv) => {
            anyhow::ensure!(adv.parse::<std::net::SocketAddr>().is_ok(), "--advertise {adv:?} is not IP:PORT");
            adv.clone()
        }
        None if local.ip().is_unspecified() => {
            anyhow::bail!("listening on {local}, which nobody can connect to: pass --advertise IP:PORT")
        }
        None => local.to_string(),
    };
    if peers.is_empty() && !a.join {
        peers.insert(a.id, advertise.clone());
    }
    let metrics = bind_metrics(a.metrics.as_deref())?;
    println!("listening on {local}");
    announce_metrics(metrics.as_ref())?;
    let span = tracing::info_span!("master", node = a.id);
    let shutdown = shutdown_on_signals()?;
    let cfg = cairn_master::Config {
        id: a.id,
        data_dir: a.data.clone(),
        peers,
        advertise,
        compact_every: a.compact_every,
        identity,
        dead_after: Duration::from_secs(a.dead_after_s.max(1)),
        gc_grace: Duration::from_secs(a.gc_grace_s),
        kept_grace: Duration::from_secs(a.kept_grace_s.max(1)),
        metrics,
    };
    cairn_master::run(cfg, listener, shutdown).instrument(span).await
}

pub async fn chunkserver(a: &ChunkserverArgs) -> Result<()> {
    let identity = tls::Identity::load(&a.tls)?;
    let socket = std::net::UdpSocket::bind(&a.listen).with_context(|| format!("listen on {}", a.listen))?;
    let local = socket.local_addr()?;
    match &a.advertise {
        None if local.ip().is_unspecified() => {
            anyhow::bail!("listening on {local}, which nobody can connect to: pass --advertise HOST:PORT")
        }
        Some(adv) if adv.parse::<std::net::SocketAddr>().is_err() => {
            anyhow::bail!("--advertise {adv:?} is not an IP:PORT address")
        }
        _ => {}
    }
    let metrics = bind_metrics(a.metrics.as_deref())?;
    println!("listening on {local}");
    announce_metrics(metrics.as_ref())?;
    let shutdown = shutdown_on_signals()?;
    let cfg = cairn_chunkserver::Config {
        data_dir: a.data.clone(),
        masters: a.masters.clone(),
        zone: a.zone.clone(),
        identity,
        capacity_bytes: a.capacity,
        advertise: a.advertise.clone(),
        scrub_rate: a.scrub_rate,
        metrics,
    };
    cairn_chunkserver::run(cfg, socket, shutdown).instrument(tracing::info_span!("chunkserver", addr = %local)).await
}

pub fn ca(cmd: &CaCmd) -> Result<()> {
    match cmd {
        CaCmd::Init { dir } => {
            if tls::init_ca(dir)? {
                println!("created cluster CA in {}", dir.display());
            } else {
                println!("cluster CA already exists in {}", dir.display());
            }
        }
        CaCmd::Issue { ca, out, role, ips } => {
            let role = if role == "node" { tls::Role::Node } else { tls::Role::Client };
            tls::issue(ca, out, role, ips)?;
            println!(
                "issued {} certificate in {}",
                if role == tls::Role::Node { "node" } else { "client" },
                out.display()
            );
        }
    }
    Ok(())
}
