//! `cairn admin`: operations on the cluster itself. For now the master group: list its members,
//! add or remove one (a Raft configuration change, one at a time), and hand leadership over.

use anyhow::{Context, Result};

use super::status::{masters_json, write_masters};
use super::ClusterArgs;

#[derive(clap::Subcommand, Debug)]
pub enum AdminCmd {
    /// The master group: list (default), add, remove, transfer.
    Masters(MastersArgs),
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
    }
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
