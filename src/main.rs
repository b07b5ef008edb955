//! The `cairn` binary: parses arguments, sets up tracing, calls one library function per
//! subcommand, and maps the result to an exit code (0 ok, 1 failed, 2 usage). Errors print as one
//! line on stderr.

/// The cluster benchmark lives with the other benchmarks; `cairn bench` runs it.
#[path = "../benches/cluster.rs"]
mod bench;
#[path = "../benches/faults.rs"]
mod bench_faults;
#[path = "../benches/masters.rs"]
mod bench_masters;
#[path = "../benches/procs.rs"]
mod bench_procs;
#[path = "../benches/s3.rs"]
mod bench_s3;
mod dev;
mod mount;
mod s3;
mod servers;

use std::process::ExitCode;

use cairn_client::cli;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cairn", version, about = "Cairn: a distributed file and object store")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a whole local cluster (masters and chunkservers as child processes) on loopback.
    Dev(dev::DevArgs),
    /// Run a master (metadata service).
    Master(servers::MasterArgs),
    /// Run a chunkserver (chunk storage).
    Chunkserver(servers::ChunkserverArgs),
    /// Create a cluster CA and issue node or client certificates.
    #[command(subcommand)]
    Ca(servers::CaCmd),
    /// Upload a file, stdin (`-`) or a directory tree (-r).
    Put(cli::PutArgs),
    /// Download a file (or a byte range of it) to a local path or stdout (`-`).
    Get(cli::GetArgs),
    /// List a directory (as `aws s3 ls` does; -r for every file below).
    Ls(cli::LsArgs),
    /// Copy files or trees between the local disk and the cluster (or inside it), many at once.
    Cp(cli::CpArgs),
    /// Copy only what is missing or changed (by size, then content hash) from one tree to another.
    Sync(cli::SyncArgs),
    /// Show a file's or directory's attributes.
    Stat(cli::StatArgs),
    /// Create a directory.
    Mkdir(cli::MkdirArgs),
    /// Rename or move a file or directory.
    Mv(cli::MvArgs),
    /// Remove a file or directory.
    Rm(cli::RmArgs),
    /// Mount the cluster's namespace as a POSIX file system (FUSE).
    Mount(mount::MountArgs),
    /// Serve the cluster's namespace over the S3 API (buckets are top-level directories).
    S3(s3::S3Args),
    /// Show masters, chunkservers and replication health.
    Status(cli::StatusArgs),
    /// Administer the cluster: the master group, repair, draining, S3 access keys.
    #[command(subcommand)]
    Admin(cli::AdminCmd),
    /// Measure put/get throughput and small-file rate, beside the local disk.
    Bench(bench::BenchArgs),
}

fn init_tracing(server: bool) {
    let default = if server { "info" } else { "error" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
        // s3s logs the expected signature of a request that fails its check at debug level:
        // never let a log become a signature oracle.
        .add_directive("s3s=info".parse().expect("valid directive"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let server = matches!(cli.cmd, Cmd::Master(_) | Cmd::Chunkserver(_) | Cmd::Dev(_) | Cmd::Mount(_) | Cmd::S3(_));
    init_tracing(server);
    if !server {
        // Like other Unix tools, a client command piped into `head` ends quietly when the pipe
        // closes instead of failing on a write to it.
        // SAFETY: restoring the default disposition of a signal before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cairn: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async {
        match &cli.cmd {
            Cmd::Dev(a) => dev::run(a).await,
            Cmd::Master(a) => servers::master(a).await,
            Cmd::Chunkserver(a) => servers::chunkserver(a).await,
            Cmd::Ca(a) => servers::ca(a),
            Cmd::Put(a) => cli::put(a).await,
            Cmd::Get(a) => cli::get(a).await,
            Cmd::Ls(a) => cli::ls(a).await,
            Cmd::Cp(a) => cli::cp(a).await,
            Cmd::Sync(a) => cli::sync(a).await,
            Cmd::Stat(a) => cli::stat(a).await,
            Cmd::Mkdir(a) => cli::mkdir(a).await,
            Cmd::Mv(a) => cli::mv(a).await,
            Cmd::Rm(a) => cli::rm(a).await,
            Cmd::Status(a) => cli::status(a).await,
            Cmd::Mount(a) => mount::run(a).await,
            Cmd::S3(a) => s3::run(a).await,
            Cmd::Admin(a) => cli::admin(a).await,
            Cmd::Bench(a) => bench::run(a).await,
        }
    });
    // Do not wait for stray background tasks (e.g. idle QUIC connections) at exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn: {e:#}");
            ExitCode::FAILURE
        }
    }
}
