//! `cairn admin`: operations on the cluster itself. The master group: list its members, add or
//! remove one (a Raft configuration change, one at a time), and hand leadership over. Repair:
//! show and change the re-replication limits, which take effect within seconds.

use anyhow::{Context, Result};

use super::status::{human, masters_json, write_masters, RepairJson, StatusJson};
use super::ClusterArgs;

#[derive(clap::Subcommand, Debug)]
pub enum AdminCmd {
    /// The master group: list (default), add, remove, transfer.
    Masters(MastersArgs),
    /// Re-replication: show progress and limits; change the limits with --rate and --copies.
    Repair(RepairArgs),
    /// Move every replica off a chunkserver (by id or address), with progress, so that it can
    /// be stopped and removed. No chunk drops below its replication goal meanwhile.
    Drain(DrainArgs),
    /// Remove a stopped (dead) chunkserver from the cluster's list, after a drain.
    Forget(ForgetArgs),
    /// S3 access keys: create, list, delete.
    Key(KeyArgs),
}

#[derive(clap::Args, Debug)]
pub struct KeyArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(subcommand)]
    pub action: KeyAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum KeyAction {
    /// Create an access key; prints its id and secret (the secret is not shown again).
    Create {
        /// What the key is for.
        #[arg(long, default_value = "")]
        description: String,
        /// Print JSON: {"access_key_id": ..., "secret_access_key": ...}.
        #[arg(long)]
        json: bool,
    },
    /// List access key ids with their creation time and description (no secrets).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete an access key: requests signed with it are refused (within seconds).
    Delete {
        /// The access key id.
        id: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct ForgetArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// The chunkserver: its id or its address, as `cairn status` lists them.
    pub node: String,
}

#[derive(clap::Args, Debug)]
pub struct DrainArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// The chunkserver: its id or its address, as `cairn status` lists them.
    pub node: String,
    /// Stop draining: the node takes new replicas again.
    #[arg(long)]
    pub cancel: bool,
    /// Start the drain and return at once.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(clap::Args, Debug)]
pub struct RepairArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Copy bandwidth per chunkserver, bytes per second (K, M, G suffixes; 0: unlimited).
    #[arg(long, value_parser = cairn_common::units::parse_bytes)]
    pub rate: Option<u64>,
    /// Copies in flight per chunkserver (1 to 256).
    #[arg(long)]
    pub copies: Option<u32>,
    /// Print JSON (the `repair` object of `cairn status --json`).
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct MastersArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(subcommand)]
    pub action: Option<MastersAction>,
    /// Print JSON (the `masters` list of `cairn status --json`).
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum MastersAction {
    /// List id, address, role, term, commit and applied index and lag of every master.
    List,
    /// Add a master (started with `cairn master --join`) as a voter: ID=ADDR.
    Add {
        /// ID=ADDR of the new master.
        member: String,
    },
    /// Remove a master from the group (not the leader: transfer leadership first).
    Remove { id: u64 },
    /// Hand leadership to master ID (default: the most up-to-date follower).
    Transfer { id: Option<u64> },
}

fn parse_member(s: &str) -> Result<(u64, String)> {
    let (id, addr) = s.split_once('=').with_context(|| format!("{s:?} is not ID=ADDR"))?;
    let id: u64 = id.parse().with_context(|| format!("{s:?}: the id is not a number"))?;
    anyhow::ensure!(id != 0, "master id 0 is reserved");
    anyhow::ensure!(addr.parse::<std::net::SocketAddr>().is_ok(), "{addr:?} is not IP:PORT");
    Ok((id, addr.to_string()))
}

pub async fn admin(cmd: &AdminCmd) -> Result<()> {
    match cmd {
        AdminCmd::Masters(a) => masters(a).await,
        AdminCmd::Repair(a) => repair(a).await,
        AdminCmd::Drain(a) => drain(a).await,
        AdminCmd::Forget(a) => forget(a).await,
        AdminCmd::Key(a) => key(a).await,
    }
}

async fn key(a: &KeyArgs) -> Result<()> {
    let client = a.cluster.connect().await?;
    match &a.action {
        KeyAction::Create { description, json } => {
            let k = client.create_access_key(description).await.context("create access key")?;
            if *json {
                let v = serde_json::json!({ "access_key_id": k.id, "secret_access_key": k.secret });
                println!("{v}");
            } else {
                println!("access key id:     {}", k.id);
                println!("secret access key: {}", k.secret);
            }
        }
        KeyAction::List { json } => {
            let keys = client.list_access_keys().await.context("list access keys")?;
            if *json {
                let v: Vec<_> = keys
                    .iter()
                    .map(|k| serde_json::json!({ "access_key_id": k.id, "created_ns": k.created_ns, "description": k.description }))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for k in keys {
                    println!("{}  created {}  {}", k.id, super::format_time(k.created_ns), k.description);
                }
            }
        }
        KeyAction::Delete { id } => {
            client.delete_access_key(id).await.with_context(|| format!("delete access key {id}"))?
        }
    }
    Ok(())
}

/// The id of the chunkserver named by id or address.
async fn chunkserver_id(client: &crate::Client, node: &str) -> Result<u64> {
    let s: StatusJson = client.status().await.context("status")?.into();
    let n = s
        .chunkservers
        .iter()
        .find(|c| c.id.to_string() == node || c.addr == node)
        .with_context(|| format!("no chunkserver {node} (see cairn status)"))?;
    Ok(n.id)
}

async fn forget(a: &ForgetArgs) -> Result<()> {
    let client = a.cluster.connect().await?;
    let id = chunkserver_id(&client, &a.node).await?;
    client.drain(id, false, true).await.with_context(|| format!("forget chunkserver {id}"))?;
    client.close();
    println!("chunkserver {id} removed from the cluster");
    Ok(())
}

async fn drain(a: &DrainArgs) -> Result<()> {
    let client = a.cluster.connect().await?;
    let id = chunkserver_id(&client, &a.node).await?;
    client.drain(id, a.cancel, false).await.with_context(|| format!("drain chunkserver {id}"))?;
    if a.cancel {
        println!("chunkserver {id} takes new replicas again");
        return Ok(());
    }
    if a.no_wait {
        println!("draining chunkserver {id}: follow it with cairn status");
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("draining [{bar:30}] {pos}/{len} chunks moved {msg}")
            .expect("progress template")
            .progress_chars("=> "),
    );
    let mut first: Option<u64> = None;
    loop {
        let s: StatusJson = client.status().await.context("status")?.into();
        let n = s.chunkservers.iter().find(|c| c.id == id).with_context(|| format!("chunkserver {id} vanished"))?;
        anyhow::ensure!(
            n.state != "dead",
            "chunkserver {id} is dead: its chunks are copied from their other replicas instead"
        );
        let total = *first.get_or_insert(n.to_move);
        bar.set_length(total);
        bar.set_position(total.saturating_sub(n.to_move));
        bar.set_message(format!("(copying {} at {}/s)", s.chunks.repair_queue, human(s.repair.bytes_per_s)));
        // Settled status counts only once every chunkserver reported to the current leader.
        if n.to_move == 0 && n.state == "draining" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    bar.finish_and_clear();
    client.close();
    println!("chunkserver {id} holds no replica that a file needs: it can be stopped and removed");
    Ok(())
}

async fn repair(a: &RepairArgs) -> Result<()> {
    let client = a.cluster.connect().await?;
    if a.rate.is_some() || a.copies.is_some() {
        client.set_repair_limits(a.rate, a.copies).await.context("set repair limits")?;
    }
    let s: StatusJson = client.status().await.context("status")?.into();
    client.close();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s.repair)?);
    } else {
        let RepairJson { rate_limit_bytes, copies, bytes_per_s } = s.repair;
        let limit = if rate_limit_bytes == 0 { "unlimited".into() } else { format!("{}/s", human(rate_limit_bytes)) };
        println!("limits per chunkserver: {limit}, {copies} copies in flight");
        println!(
            "under-replicated {}  lost {}  copying {}  at {}/s",
            s.chunks.under_replicated,
            s.chunks.lost,
            s.chunks.repair_queue,
            human(bytes_per_s)
        );
    }
    Ok(())
}

async fn masters(a: &MastersArgs) -> Result<()> {
    // Validate before connecting: bad input fails fast with one line.
    let member = match &a.action {
        Some(MastersAction::Add { member }) => Some(parse_member(member)?),
        _ => None,
    };
    let client = a.cluster.connect().await?;
    let list = match &a.action {
        None | Some(MastersAction::List) => client.status().await.context("status")?.masters,
        Some(MastersAction::Add { .. }) => {
            let (id, addr) = member.expect("parsed above");
            client.change_masters(id, Some(&addr)).await.with_context(|| format!("add master {id}"))?
        }
        Some(MastersAction::Remove { id }) => {
            client.change_masters(*id, None).await.with_context(|| format!("remove master {id}"))?
        }
        Some(MastersAction::Transfer { id }) => {
            let to = client.transfer_leader(id.unwrap_or(0)).await.context("transfer leadership")?;
            if !a.json {
                println!("master {to} leads");
            }
            client.status().await.context("status")?.masters
        }
    };
    client.close();
    let list = masters_json(list);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        let mut out = String::new();
        write_masters(&mut out, &list)?;
        print!("{out}");
    }
    Ok(())
}
