//! `cairn s3 --listen ADDR`: the S3 gateway, in the foreground until SIGINT or SIGTERM.

use std::time::Duration;

use anyhow::{Context, Result};
use cairn_client::cli::ClusterArgs;

#[derive(clap::Args, Debug)]
pub struct S3Args {
    /// Address to serve S3 (HTTP) on, e.g. 127.0.0.1:9000 (port 0: any free port).
    #[arg(long)]
    pub listen: String,
    /// Replicas of each chunk of objects written through the gateway.
    #[arg(long, default_value_t = 3)]
    pub replication: u32,
    /// Multipart uploads neither completed nor aborted are removed once no new part arrived for
    /// this many seconds.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub upload_expiry_s: u64,
    /// Base domain for virtual-hosted-style requests (BUCKET.DOMAIN); path style always works.
    #[arg(long)]
    pub domain: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

pub async fn run(a: &S3Args) -> Result<()> {
    anyhow::ensure!((1..=16).contains(&a.replication), "--replication {} (1 to 16)", a.replication);
    anyhow::ensure!(a.upload_expiry_s > 0, "--upload-expiry-s must be positive");
    let shutdown = crate::servers::shutdown_on_signals()?;
    let client = a.cluster.connect().await?;
    let listener = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("listen on {}", a.listen))?;
    let local = listener.local_addr()?;
    // The line tests and scripts wait for (as the other servers print it).
    println!("listening on {local}");
    use std::io::Write as _;
    std::io::stdout().flush()?;
    tracing::info!("S3 gateway on http://{local}");
    let cfg = cairn_s3::GatewayConfig {
        replication: a.replication,
        upload_expiry: Duration::from_secs(a.upload_expiry_s),
        domain: a.domain.clone(),
    };
    cairn_s3::serve(client.clone(), listener, cfg, shutdown.cancelled_owned()).await?;
    client.close();
    Ok(())
}
