//! `cairn put` and `cairn get`: files, stdin/stdout (`-`) and (put -r) directory trees.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use futures::StreamExt;

use super::progress::Bar;
use super::{is_dir, ClusterArgs};
use crate::{join, Client, PutOptions};

/// Files uploaded at once by `put -r` (each with its own window of chunks).
const TREE_PARALLEL: usize = 4;

#[derive(clap::Args, Debug)]
pub struct PutArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Local file, directory (with -r), or `-` for stdin.
    pub local: String,
    /// Remote path; an existing directory (or a path ending in `/`) receives LOCAL under its name.
    pub remote: String,
    /// Upload a directory tree.
    #[arg(short = 'r', long)]
    pub recursive: bool,
    /// Create missing parent directories.
    #[arg(short = 'p', long)]
    pub parents: bool,
    /// Replicas of every chunk.
    #[arg(long, default_value_t = 3)]
    pub replication: u32,
}

async fn remote_target(client: &Client, local: &str, remote: &str) -> Result<String> {
    let name = || -> Result<String> {
        anyhow::ensure!(local != "-", "put - {remote}: name the remote file when reading stdin");
        Path::new(local)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .with_context(|| format!("{local} has no file name"))
    };
    if remote.ends_with('/') {
        return Ok(join(remote, &name()?));
    }
    match client.exists(remote).await? {
        Some(a) if is_dir(&a) && local != "-" => Ok(join(remote, &name()?)),
        _ => Ok(remote.to_string()),
    }
}

pub async fn put(args: &PutArgs) -> Result<()> {
    let client = args.cluster.connect().await?;
    let ctx = format!("put {} {}", args.local, args.remote);
    let opts = PutOptions { replication: args.replication, ..Default::default() };
    let target = remote_target(&client, &args.local, &args.remote).await.with_context(|| ctx.clone())?;
    if args.parents {
        client.mkdir(crate::parent_of(&target), true).await.with_context(|| ctx.clone())?;
    }
    if args.local == "-" {
        let bar = Bar::bytes(None, "put");
        let attr =
            client.put(&target, tokio::io::stdin(), &opts, &|n| bar.inc(n)).await.with_context(|| ctx.clone())?;
        bar.finish();
        tracing::info!(bytes = attr.size, "uploaded");
        return Ok(());
    }
    let meta = std::fs::metadata(&args.local).with_context(|| format!("{ctx}: {}", args.local))?;
    if meta.is_dir() {
        anyhow::ensure!(args.recursive, "{ctx}: {} is a directory (use -r)", args.local);
        return put_tree(&client, Path::new(&args.local), &target, &opts).await.with_context(|| ctx.clone());
    }
    let file = std::fs::File::open(&args.local).with_context(|| format!("{ctx}: open {}", args.local))?;
    let bar = Bar::bytes(Some(meta.len()), "put");
    client.put_file(&target, file, &opts, &|n| bar.inc(n)).await.with_context(|| ctx.clone())?;
    bar.finish();
    client.close();
    Ok(())
}

/// Uploads a local tree: directories first (in walk order), then files, several at a time.
async fn put_tree(client: &Client, root: &Path, remote: &str, opts: &PutOptions) -> Result<()> {
    let mut dirs = vec![(root.to_path_buf(), remote.to_string())];
    let mut files: Vec<(PathBuf, String, u64)> = Vec::new();
    let mut i = 0;
    while i < dirs.len() {
        let (local, remote) = dirs[i].clone();
        i += 1;
        let mut entries: Vec<_> = std::fs::read_dir(&local)
            .with_context(|| format!("read {}", local.display()))?
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("read {}", local.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let ty = e.file_type()?;
            let path = e.path();
            if ty.is_dir() {
                dirs.push((path, join(&remote, &name)));
            } else if ty.is_file() {
                let len = e.metadata()?.len();
                files.push((path, join(&remote, &name), len));
            } else {
                eprintln!("cairn: put: skipping {} (not a regular file or directory)", path.display());
            }
        }
    }
    for (_, r) in &dirs {
        client.mkdir(r, true).await.with_context(|| format!("mkdir {r}"))?;
    }
    let bar = Arc::new(Bar::bytes(Some(files.iter().map(|f| f.2).sum()), "put"));
    let results = futures::stream::iter(files)
        .map(|(local, remote, _)| {
            let (client, bar) = (client.clone(), bar.clone());
            async move {
                let f = std::fs::File::open(&local).with_context(|| format!("open {}", local.display()))?;
                client
                    .put_file(&remote, f, opts, &|n| bar.inc(n))
                    .await
                    .with_context(|| format!("put {}", local.display()))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(TREE_PARALLEL)
        .collect::<Vec<_>>()
        .await;
    bar.finish();
    results.into_iter().collect()
}

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Remote file.
    pub remote: String,
    /// Local path (an existing directory receives the file under its name), or `-` for stdout.
    pub local: String,
    /// First byte to read.
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    /// Bytes to read (default: to the end).
    #[arg(long)]
    pub length: Option<u64>,
}

pub async fn get(args: &GetArgs) -> Result<()> {
    let client = args.cluster.connect().await?;
    let ctx = format!("get {}", args.remote);
    let attr = client.stat(&args.remote).await.with_context(|| ctx.clone())?;
    anyhow::ensure!(!is_dir(&attr), "{ctx}: is a directory");
    let total = args.length.unwrap_or(u64::MAX).min(attr.size.saturating_sub(args.offset));
    let bar = Bar::bytes(Some(total), "get");
    if args.local == "-" {
        let mut out = tokio::io::stdout();
        client
            .get(&args.remote, &mut out, args.offset, args.length, &|n| bar.inc(n))
            .await
            .with_context(|| ctx.clone())?;
        bar.finish();
        return Ok(());
    }
    let mut local = PathBuf::from(&args.local);
    if local.is_dir() {
        let name = args.remote.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
        local = local.join(name);
    }
    let res = download(&client, &args.remote, &local, args.offset, args.length, &bar).await;
    bar.finish();
    res.with_context(|| ctx.clone())
}

/// Where writing to `path` lands, as with `cp`: the file a chain of symbolic links ends at (which
/// need not exist yet: a dangling link gets its target created), so that the new file replaces
/// the target and the links stay; `path` itself when it is not a link.
fn through_links(path: &Path) -> Result<PathBuf> {
    let mut at = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&at).with_context(|| format!("read link {}", at.display()))?;
                // An absolute target replaces the link's directory in the join.
                at = at.parent().unwrap_or(Path::new("")).join(target);
            }
            _ => return Ok(at),
        }
    }
    anyhow::bail!("{}: too many levels of symbolic links", path.display())
}

/// Downloads `remote` (or a range of it) to the local file `local`: written beside it and renamed
/// at the end, so a failed download leaves no half file. A device, FIFO or socket already at
/// `local` (`/dev/null`, a named pipe) is written into instead, never replaced; a symbolic link
/// is written through.
pub(super) async fn download(
    client: &Client,
    remote: &str,
    local: &Path,
    offset: u64,
    length: Option<u64>,
    bar: &Bar,
) -> Result<()> {
    let local = &through_links(local)?;
    let get_into = |f: tokio::fs::File| async move {
        let mut w = tokio::io::BufWriter::with_capacity(1 << 20, f);
        client.get(remote, &mut w, offset, length, &|n| bar.inc(n)).await?;
        anyhow::Ok(w.into_inner())
    };
    if tokio::fs::metadata(local).await.is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        let f = tokio::fs::OpenOptions::new()
            .write(true)
            .open(local)
            .await
            .with_context(|| format!("open {}", local.display()))?;
        get_into(f).await?;
        return Ok(());
    }
    let dir = local.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.cairn-{:08x}",
        local.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        rand::random::<u32>()
    ));
    let res = async {
        let f = tokio::fs::File::create(&tmp).await.with_context(|| format!("create {}", tmp.display()))?;
        let f = get_into(f).await?;
        f.sync_all().await.with_context(|| format!("sync {}", tmp.display()))?;
        tokio::fs::rename(&tmp, local).await.with_context(|| format!("rename to {}", local.display()))?;
        anyhow::Ok(())
    }
    .await;
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
