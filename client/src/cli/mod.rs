//! The code of the `cairn` commands that need only the client library: argument structs (clap)
//! and one async function per command. Output goes to stdout; progress bars to stderr, only on a
//! terminal. Errors are returned with a short context and printed as one line by `main`.

mod admin;
mod copy;
mod progress;
mod status;
mod transfer;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_proto::v1::{Attr, InodeKind};

use crate::{Client, ClientConfig};

pub use admin::{admin, AdminCmd};
pub use copy::{cp, sync, CpArgs, SyncArgs};
pub use status::{status, StatusArgs, StatusJson};
pub use transfer::{get, put, GetArgs, PutArgs};

/// How to reach the cluster: every client command takes these (or the environment).
#[derive(clap::Args, Clone, Debug)]
pub struct ClusterArgs {
    /// Master gRPC addresses, comma-separated.
    #[arg(long, env = "CAIRN_MASTERS", value_delimiter = ',')]
    pub masters: Vec<String>,
    /// TLS identity directory (ca.pem, cert.pem, key.pem); `cairn dev` writes it to DIR/env.
    #[arg(long = "tls", env = "CAIRN_TLS")]
    pub tls: Option<PathBuf>,
    /// Give up on unreachable masters after this many seconds.
    #[arg(long = "timeout", default_value_t = 15)]
    pub timeout_s: u64,
}

impl ClusterArgs {
    pub async fn connect(&self) -> Result<Client> {
        anyhow::ensure!(
            !self.masters.is_empty(),
            "no masters given: pass --masters or set CAIRN_MASTERS (cairn dev writes them to DIR/env)"
        );
        let tls = self
            .tls
            .clone()
            .context("no TLS credentials given: pass --tls DIR or set CAIRN_TLS (cairn dev writes it to DIR/env)")?;
        let cfg = ClientConfig {
            masters: self.masters.clone(),
            tls_dir: tls,
            master_deadline: Duration::from_secs(self.timeout_s.max(1)),
        };
        Ok(Client::connect(cfg).await?)
    }
}

pub(crate) fn is_dir(a: &Attr) -> bool {
    a.kind() == InodeKind::Directory
}

#[derive(clap::Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Directory (or file) to list: a path, or s3://BUCKET/PREFIX.
    #[arg(default_value = "/")]
    pub path: String,
    /// Every file below, with full paths (directories are not listed themselves).
    #[arg(short = 'r', long)]
    pub recursive: bool,
    /// Sizes in KiB, MiB, GiB.
    #[arg(short = 'H', long)]
    pub human_readable: bool,
    /// End with the number of files and their total size.
    #[arg(long)]
    pub summarize: bool,
}

/// Year, month, day, hour, minute, second (UTC) of `secs` since the Unix epoch.
pub fn civil_time(secs: i64) -> (i64, i64, i64, i64, i64, i64) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

fn format_time(ns: i64) -> String {
    let (y, m, d, h, mi, s) = civil_time(ns.div_euclid(1_000_000_000));
    format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

/// A size as `aws s3 ls --human-readable` prints it (awscli's `human_readable_size`: the next
/// unit once the value would round to 1024 of this one).
fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    match n {
        1 => return "1 Byte".into(),
        0..1024 => return format!("{n} Bytes"),
        _ => {}
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v.round() >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// One line as `aws s3 ls` prints it: directories as "PRE name/", files with time and size.
fn ls_line(name: &str, a: &Attr, human: bool) -> String {
    if is_dir(a) {
        format!("{:>30} {name}/", "PRE")
    } else {
        let size = if human { human_size(a.size) } else { a.size.to_string() };
        format!("{} {size:>10} {name}", format_time(a.mtime_ns))
    }
}

pub async fn ls(args: &LsArgs) -> Result<()> {
    let client = args.cluster.connect().await?;
    let ctx = || format!("ls {}", args.path);
    let path = match args.path.strip_prefix("s3://") {
        Some(rest) => format!("/{rest}"),
        None => args.path.clone(),
    };
    let (attr, entries) = client.list(&path).await.with_context(ctx)?;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut line = |out: &mut std::io::StdoutLock<'_>, name: &str, a: &Attr| -> std::io::Result<()> {
        if !is_dir(a) {
            files += 1;
            bytes += a.size;
        }
        writeln!(out, "{}", ls_line(name, a, args.human_readable))
    };
    if !is_dir(&attr) || !args.recursive {
        for e in &entries {
            line(&mut out, &e.name, &e.attr.clone().unwrap_or_default())?;
        }
    } else {
        // An s3:// listing names objects by key (as `aws s3 ls --recursive` does), others by path.
        let bucket = args.path.strip_prefix("s3://").and_then(|r| r.split('/').next()).filter(|b| !b.is_empty());
        let strip = bucket.map(|b| format!("/{b}/"));
        ls_tree(&client, &path, entries, &mut |name, a| {
            let shown = strip.as_deref().and_then(|p| name.strip_prefix(p)).unwrap_or(name);
            line(&mut out, shown, a)
        })
        .await?;
    }
    if args.summarize {
        let size = if args.human_readable { human_size(bytes) } else { bytes.to_string() };
        writeln!(out, "\nTotal Objects: {files}\n   Total Size: {size}")?;
    }
    Ok(())
}

/// Every file under `path`, depth-first in name order, with full paths.
async fn ls_tree(
    client: &Client,
    path: &str,
    entries: Vec<cairn_proto::v1::DirEntry>,
    line: &mut dyn FnMut(&str, &Attr) -> std::io::Result<()>,
) -> Result<()> {
    let args_path = path;
    // Depth-first, in name order, printing full paths. Each frame is a directory's entries and
    // the index of the next one to print.
    let mut stack: Vec<(String, Vec<cairn_proto::v1::DirEntry>, usize)> =
        vec![(args_path.trim_end_matches('/').to_string(), entries, 0)];
    while let Some((dir, entries, next)) = stack.last_mut() {
        let Some(e) = entries.get(*next) else {
            stack.pop();
            continue;
        };
        *next += 1;
        let a = e.attr.clone().unwrap_or_default();
        let full = format!("{dir}/{}", e.name);
        if !is_dir(&a) {
            line(&full, &a)?;
        } else {
            let (_, children) = client.list(&full).await.with_context(|| format!("ls {full}"))?;
            stack.push((full, children, 0));
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct StatArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    pub path: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn stat(args: &StatArgs) -> Result<()> {
    let client = args.cluster.connect().await?;
    let a = client.stat(&args.path).await.with_context(|| format!("stat {}", args.path))?;
    let kind = match a.kind() {
        InodeKind::Directory => "directory",
        InodeKind::File => "file",
        InodeKind::Symlink => "symlink",
        InodeKind::Fifo => "fifo",
        InodeKind::Socket => "socket",
        InodeKind::CharDevice => "character device",
        InodeKind::BlockDevice => "block device",
        InodeKind::Unspecified => "unknown",
    };
    if args.json {
        let v = serde_json::json!({
            "path": args.path, "type": kind, "inode": a.inode, "size": a.size, "mode": format!("{:o}", a.mode),
            "uid": a.uid, "gid": a.gid, "nlink": a.nlink, "mtime_ns": a.mtime_ns, "ctime_ns": a.ctime_ns,
            "replication": a.replication, "version": a.version, "chunks": a.extent_count,
        });
        println!("{v}");
    } else {
        println!(
            "  path: {}\n  type: {kind}\n inode: {}\n  size: {}\n  mode: {:o}\n nlink: {}\n mtime: {} UTC",
            args.path,
            a.inode,
            a.size,
            a.mode,
            a.nlink,
            format_time(a.mtime_ns)
        );
        if a.kind() == InodeKind::File {
            println!("chunks: {}\n  repl: {}\nversion: {}", a.extent_count, a.replication, a.version);
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct MkdirArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    pub path: String,
    /// Create missing parents; an existing directory is not an error.
    #[arg(short = 'p', long)]
    pub parents: bool,
}

pub async fn mkdir(args: &MkdirArgs) -> Result<()> {
    let client = args.cluster.connect().await?;
    client.mkdir(&args.path, args.parents).await.with_context(|| format!("mkdir {}", args.path))?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct MvArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    pub src: String,
    /// Destination path; an existing directory receives SRC under its own name.
    pub dst: String,
}

pub async fn mv(args: &MvArgs) -> Result<()> {
    let client = args.cluster.connect().await?;
    let ctx = || format!("mv {} {}", args.src, args.dst);
    let mut dst = args.dst.clone();
    if let Some(a) = client.exists(&dst).await.with_context(ctx)? {
        if is_dir(&a) && args.src.trim_end_matches('/') != dst.trim_end_matches('/') {
            let name = args.src.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
            dst = crate::join(&dst, name);
        }
    }
    client.rename(&args.src, &dst).await.with_context(ctx)?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    pub path: String,
    /// Remove a directory and everything below it.
    #[arg(short = 'r', long)]
    pub recursive: bool,
}

pub async fn rm(args: &RmArgs) -> Result<()> {
    let client = args.cluster.connect().await?;
    client.remove(&args.path, args.recursive).await.map_err(|e| match e {
        crate::Error::NotEmpty(p) => {
            anyhow::anyhow!("rm {}: directory not empty: {p} (use -r)", args.path)
        }
        e => anyhow::Error::new(e).context(format!("rm {}", args.path)),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_times() {
        assert_eq!(super::format_time(0), "1970-01-01 00:00:00");
        assert_eq!(super::format_time(1_795_000_000 * 1_000_000_000), "2026-11-18 11:06:40");
    }

    #[test]
    fn sizes_read_as_aws_s3_ls_prints_them() {
        let cases = [
            (0, "0 Bytes"),
            (1, "1 Byte"),
            (1023, "1023 Bytes"),
            (1024, "1.0 KiB"),
            (1_048_000, "1023.4 KiB"),
            (1_048_524, "1.0 MiB"),
            (1_048_575, "1.0 MiB"),
            (5 << 30, "5.0 GiB"),
            (u64::MAX, "16384.0 PiB"),
        ];
        for (n, want) in cases {
            assert_eq!(super::human_size(n), want, "{n}");
        }
    }
}
