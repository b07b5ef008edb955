//! `cairn cp` and `cairn sync`, as the AWS CLI's `s3 cp` and `s3 sync` work: either side may be
//! local or in the cluster (`s3://BUCKET/KEY` or `cairn:/PATH`), trees copy with `-r`, many
//! files at once, with one progress bar for all of them. A copy inside the cluster is
//! metadata-only (the copy references the same chunks). `sync` copies only files that are
//! missing or differ, by size and then by content hash (BLAKE3 of each chunk, compared with the
//! hashes the cluster keeps: nothing is downloaded to compare).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use futures::StreamExt;

use super::progress::Bar;
use super::transfer::download;
use super::{is_dir, ClusterArgs};
use crate::{join, parent_of, Client, PutOptions};

#[derive(clap::Args, Debug)]
pub struct CpArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// What to copy: a local path, or s3://BUCKET/KEY or cairn:/PATH in the cluster.
    pub src: String,
    /// Where to: a local path, or s3://BUCKET/KEY or cairn:/PATH. An existing directory (or a
    /// name ending in '/') receives SRC under its own name.
    pub dst: String,
    /// Copy a directory tree.
    #[arg(short = 'r', long)]
    pub recursive: bool,
    /// Files copied at once.
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    /// Replicas of every chunk uploaded.
    #[arg(long, default_value_t = 3)]
    pub replication: u32,
}

#[derive(clap::Args, Debug)]
pub struct SyncArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Source directory: local, or s3://BUCKET/PREFIX or cairn:/PATH.
    pub src: String,
    /// Destination directory: local, or s3://BUCKET/PREFIX or cairn:/PATH.
    pub dst: String,
    /// Files copied at once.
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    /// Replicas of every chunk uploaded.
    #[arg(long, default_value_t = 3)]
    pub replication: u32,
    /// Only print what would be copied.
    #[arg(long)]
    pub dryrun: bool,
}

/// One side of a copy.
#[derive(Clone, Debug)]
enum Loc {
    Local(PathBuf),
    Remote(String),
}

impl Loc {
    fn parse(s: &str) -> Result<Loc> {
        if let Some(rest) = s.strip_prefix("s3://") {
            anyhow::ensure!(!rest.is_empty(), "{s}: no bucket");
            return Ok(Loc::Remote(format!("/{rest}")));
        }
        if let Some(rest) = s.strip_prefix("cairn:") {
            return Ok(Loc::Remote(if rest.starts_with('/') { rest.to_string() } else { format!("/{rest}") }));
        }
        Ok(Loc::Local(PathBuf::from(s)))
    }

    fn show(&self) -> String {
        match self {
            Loc::Local(p) => p.display().to_string(),
            Loc::Remote(p) => format!("cairn:{p}"),
        }
    }

    fn child(&self, rel: &str) -> Loc {
        match self {
            Loc::Local(p) => Loc::Local(if rel.is_empty() { p.clone() } else { p.join(rel) }),
            Loc::Remote(p) => Loc::Remote(if rel.is_empty() { p.clone() } else { join(p, rel) }),
        }
    }
}

/// A file of a tree: its path relative to the tree's root, and its size.
struct Entry {
    rel: String,
    size: u64,
}

/// A directory's identity on its file system (device, inode).
fn dir_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// The files of the tree at `root` (a file alone is a tree of one, with an empty relative path),
/// and its directories (relative, parents first). None if nothing is there.
async fn walk(client: &Client, root: &Loc) -> Result<Option<(Vec<Entry>, Vec<String>)>> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    match root {
        Loc::Local(p) => {
            let meta = match std::fs::metadata(p) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e).with_context(|| format!("{}", p.display())),
            };
            if !meta.is_dir() {
                return Ok(Some((vec![Entry { rel: String::new(), size: meta.len() }], dirs)));
            }
            // Symbolic links are followed (as `aws s3 cp` does), except one back to a directory
            // the walk is in (a loop). Each directory goes with the identities of its ancestors.
            let mut stack = vec![(String::new(), vec![dir_id(&meta)])];
            while let Some((rel, ancestors)) = stack.pop() {
                let dir = if rel.is_empty() { p.clone() } else { p.join(&rel) };
                let mut entries: Vec<_> = std::fs::read_dir(&dir)
                    .with_context(|| format!("read {}", dir.display()))?
                    .collect::<std::io::Result<_>>()
                    .with_context(|| format!("read {}", dir.display()))?;
                entries.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
                for e in entries {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let r = if rel.is_empty() { name } else { format!("{rel}/{name}") };
                    let meta = match std::fs::metadata(e.path()) {
                        Ok(m) => m,
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                            eprintln!("cairn: skipping {} (a link to nothing)", e.path().display());
                            continue;
                        }
                        Err(err) => return Err(err).with_context(|| format!("{}", e.path().display())),
                    };
                    if meta.is_dir() {
                        if ancestors.contains(&dir_id(&meta)) {
                            eprintln!("cairn: skipping {} (a link back to a directory above it)", e.path().display());
                            continue;
                        }
                        dirs.push(r.clone());
                        stack.push((r, [&ancestors[..], &[dir_id(&meta)]].concat()));
                    } else if meta.is_file() {
                        files.push(Entry { rel: r, size: meta.len() });
                    } else {
                        eprintln!("cairn: skipping {} (not a regular file or directory)", e.path().display());
                    }
                }
            }
        }
        Loc::Remote(p) => {
            let (attr, entries) = match client.list(p).await {
                Ok(r) => r,
                Err(crate::Error::NotFound(_)) => return Ok(None),
                Err(e) => return Err(e).with_context(|| format!("list {p}")),
            };
            if !is_dir(&attr) {
                return Ok(Some((vec![Entry { rel: String::new(), size: attr.size }], dirs)));
            }
            let mut stack = vec![(String::new(), entries)];
            while let Some((rel, entries)) = stack.pop() {
                for e in entries {
                    let r = if rel.is_empty() { e.name.clone() } else { format!("{rel}/{}", e.name) };
                    let a = e.attr.unwrap_or_default();
                    if is_dir(&a) {
                        let (_, children) = client.list(&join(p, &r)).await.with_context(|| format!("list {r}"))?;
                        dirs.push(r.clone());
                        stack.push((r, children));
                    } else if a.kind() == cairn_proto::v1::InodeKind::File {
                        files.push(Entry { rel: r, size: a.size });
                    }
                }
            }
        }
    }
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(Some((files, dirs)))
}

/// Copies one file. Inside the cluster: a metadata-only commit of the source's extents.
async fn copy_file(client: &Client, src: &Loc, dst: &Loc, opts: &PutOptions, bar: &Bar) -> Result<()> {
    match (src, dst) {
        (Loc::Local(s), Loc::Remote(d)) => {
            let f = std::fs::File::open(s).with_context(|| format!("open {}", s.display()))?;
            client.put_file(d, f, opts, &|n| bar.inc(n)).await.with_context(|| format!("upload {}", s.display()))?;
        }
        (Loc::Remote(s), Loc::Local(d)) => {
            if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
            }
            download(client, s, d, 0, None, bar).await.with_context(|| format!("download {s}"))?;
        }
        (Loc::Remote(s), Loc::Remote(d)) => {
            let f = client.open_file(s).await.with_context(|| format!("open {s}"))?;
            let attr = f.attr.unwrap_or_default();
            let extents = f.extents.into_iter().filter_map(|l| l.extent).collect();
            let o = PutOptions { replication: attr.replication.max(1), ..opts.clone() };
            client.commit(d, extents, &o, Some(f.xattrs)).await.with_context(|| format!("copy {s} to {d}"))?;
            bar.inc(attr.size);
        }
        (Loc::Local(_), Loc::Local(_)) => anyhow::bail!("both sides are local: use cp(1)"),
    }
    Ok(())
}

/// Makes the directories of a tree at `dst` (parents first).
async fn make_dirs(client: &Client, dst: &Loc, dirs: &[String]) -> Result<()> {
    let mut all = vec![String::new()];
    all.extend(dirs.iter().cloned());
    for rel in all {
        match dst.child(&rel) {
            Loc::Local(p) => std::fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?,
            Loc::Remote(p) => {
                client.mkdir(&p, true).await.with_context(|| format!("mkdir {p}"))?;
            }
        }
    }
    Ok(())
}

/// Copies `files` (relative to `src`) to the same relative paths under `dst`, `jobs` at a
/// time, printing one line per file as the AWS CLI does.
async fn copy_all(
    client: &Client,
    src: &Loc,
    dst: &Loc,
    files: Vec<Entry>,
    jobs: usize,
    opts: &PutOptions,
) -> Result<()> {
    let bar = Arc::new(Bar::bytes(Some(files.iter().map(|f| f.size).sum()), "copy"));
    let verb = match (src, dst) {
        (Loc::Local(_), _) => "upload",
        (_, Loc::Local(_)) => "download",
        _ => "copy",
    };
    let results: Vec<Result<()>> = futures::stream::iter(files)
        .map(|f| {
            let (client, bar) = (client.clone(), bar.clone());
            let (s, d) = (src.child(&f.rel), dst.child(&f.rel));
            async move {
                copy_file(&client, &s, &d, opts, &bar).await?;
                bar.println(&format!("{verb}: {} to {}", s.show(), d.show()));
                Ok(())
            }
        })
        .buffer_unordered(jobs.max(1))
        .collect()
        .await;
    bar.finish();
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    match failed.len() {
        0 => Ok(()),
        1 => Err(failed.into_iter().next().expect("one error")),
        n => Err(failed.into_iter().next().expect("errors")).with_context(|| format!("{n} files failed; the first")),
    }
}

/// What `cp` and `sync` start from: both sides parsed (one of them in the cluster), a
/// connection, and the source tree.
struct Job {
    ctx: String,
    src: Loc,
    dst: Loc,
    client: Client,
    opts: PutOptions,
    files: Vec<Entry>,
    dirs: Vec<String>,
}

async fn start(cmd: &str, src: &str, dst: &str, cluster: &ClusterArgs, replication: u32) -> Result<Job> {
    let ctx = format!("{cmd} {src} {dst}");
    let (src, dst) = (Loc::parse(src)?, Loc::parse(dst)?);
    anyhow::ensure!(
        !matches!((&src, &dst), (Loc::Local(_), Loc::Local(_))),
        "{ctx}: neither side is in the cluster (name it s3://BUCKET/KEY or cairn:/PATH)"
    );
    let client = cluster.connect().await?;
    let opts = PutOptions { replication, ..Default::default() };
    let (files, dirs) = walk(&client, &src)
        .await
        .with_context(|| ctx.clone())?
        .with_context(|| format!("{ctx}: {} does not exist", src.show()))?;
    Ok(Job { ctx, src, dst, client, opts, files, dirs })
}

pub async fn cp(a: &CpArgs) -> Result<()> {
    let Job { ctx, src, dst, client, opts, files, dirs } =
        start("cp", &a.src, &a.dst, &a.cluster, a.replication).await?;
    let tree = files.len() != 1 || !files[0].rel.is_empty();
    anyhow::ensure!(!tree || a.recursive, "{ctx}: {} is a directory (use -r)", src.show());
    // A destination that is a directory (or says so with a trailing '/') receives SRC under its
    // own name, as with cp(1).
    let into = a.dst.ends_with('/')
        || match &dst {
            Loc::Local(p) => p.is_dir(),
            Loc::Remote(p) => client.exists(p).await?.is_some_and(|at| is_dir(&at)),
        };
    let dst = if into {
        let name = match &src {
            // ".": its content goes straight in, as with cp(1).
            Loc::Local(p) if p.components().next_back() == Some(std::path::Component::CurDir) => Some(String::new()),
            Loc::Local(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
            Loc::Remote(p) => p.trim_end_matches('/').rsplit('/').next().filter(|n| !n.is_empty()).map(str::to_string),
        }
        .with_context(|| format!("{ctx}: {} has no name to copy under", src.show()))?;
        if name.is_empty() {
            dst
        } else {
            dst.child(&name)
        }
    } else {
        dst
    };
    if tree {
        make_dirs(&client, &dst, &dirs).await.with_context(|| ctx.clone())?;
    } else if let Loc::Remote(d) = &dst {
        client.mkdir(parent_of(d), true).await.with_context(|| ctx.clone())?;
    }
    copy_all(&client, &src, &dst, files, a.jobs, &opts).await.with_context(|| ctx.clone())?;
    client.close();
    Ok(())
}

/// BLAKE3 of consecutive pieces of a local file, of the given lengths (a cluster file's extents:
/// 4 MiB chunks from `cairn put`, other cuts from multipart uploads or the mount). None if the
/// file ends before or after them.
fn local_piece_hashes(path: &Path, lengths: &[u64]) -> std::io::Result<Option<Vec<[u8; 32]>>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut out = Vec::with_capacity(lengths.len());
    let mut buf = Vec::new();
    for &len in lengths {
        buf.resize(len as usize, 0);
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => return Ok(None),
                k => n += k,
            }
        }
        out.push(*blake3::Hasher::new().update_rayon(&buf).finalize().as_bytes());
    }
    Ok((f.read(&mut [0u8; 1])? == 0).then_some(out))
}

/// Whether the two sides of one file have the same content: the local file's pieces hash to the
/// cluster file's extent hashes (cut the same way), or two cluster files have the same extents.
async fn same_content(client: &Client, a: &Loc, b: &Loc) -> Result<bool> {
    let (local, remote) = match (a, b) {
        (Loc::Local(l), Loc::Remote(r)) | (Loc::Remote(r), Loc::Local(l)) => (l.clone(), r.clone()),
        (Loc::Remote(x), Loc::Remote(y)) => {
            let (fx, fy) = (client.open_file(x).await?, client.open_file(y).await?);
            let hashes = |f: &cairn_proto::v1::OpenFileResponse| -> Vec<Vec<u8>> {
                f.extents.iter().filter_map(|l| l.extent.as_ref().map(|e| e.hash.clone())).collect()
            };
            return Ok(hashes(&fx) == hashes(&fy));
        }
        (Loc::Local(_), Loc::Local(_)) => return Ok(false),
    };
    let f = client.open_file(&remote).await?;
    let extents: Vec<_> = f.extents.into_iter().filter_map(|l| l.extent).collect();
    let lengths: Vec<u64> = extents.iter().map(|e| e.length).collect();
    let ours = tokio::task::spawn_blocking(move || local_piece_hashes(&local, &lengths))
        .await
        .context("hash task")?
        .context("hash the local file")?;
    Ok(ours.is_some_and(|ours| ours.iter().zip(&extents).all(|(o, e)| o.as_slice() == e.hash.as_slice())))
}

pub async fn sync(a: &SyncArgs) -> Result<()> {
    let Job { ctx, src, dst, client, opts, files, dirs } =
        start("sync", &a.src, &a.dst, &a.cluster, a.replication).await?;
    anyhow::ensure!(
        files.len() != 1 || !files[0].rel.is_empty(),
        "{ctx}: {} is a file; sync copies directories",
        src.show()
    );
    let theirs: BTreeMap<String, u64> = match walk(&client, &dst).await.with_context(|| ctx.clone())? {
        Some((f, _)) => f.into_iter().map(|e| (e.rel, e.size)).collect(),
        None => BTreeMap::new(),
    };
    // Size first; for equal sizes, content hashes, several files at once.
    let checks: Vec<Result<Option<Entry>>> = futures::stream::iter(files)
        .map(|f| {
            let (client, src, dst) = (client.clone(), src.clone(), dst.clone());
            let other = theirs.get(&f.rel).copied();
            async move {
                match other {
                    Some(size) if size == f.size => {
                        let same = same_content(&client, &src.child(&f.rel), &dst.child(&f.rel))
                            .await
                            .with_context(|| format!("compare {}", f.rel))?;
                        Ok((!same).then_some(f))
                    }
                    _ => Ok(Some(f)),
                }
            }
        })
        .buffer_unordered(a.jobs.max(1))
        .collect()
        .await;
    let mut changed = Vec::new();
    for c in checks {
        if let Some(f) = c.with_context(|| ctx.clone())? {
            changed.push(f);
        }
    }
    changed.sort_by(|x, y| x.rel.cmp(&y.rel));
    if a.dryrun {
        for f in &changed {
            println!("(dryrun) copy: {} to {}", src.child(&f.rel).show(), dst.child(&f.rel).show());
        }
        return Ok(());
    }
    if changed.is_empty() {
        return Ok(());
    }
    let needed: Vec<String> =
        dirs.into_iter().filter(|d| changed.iter().any(|f| f.rel.starts_with(&format!("{d}/")))).collect();
    make_dirs(&client, &dst, &needed).await.with_context(|| ctx.clone())?;
    copy_all(&client, &src, &dst, changed, a.jobs, &opts).await.with_context(|| ctx.clone())?;
    client.close();
    Ok(())
}
