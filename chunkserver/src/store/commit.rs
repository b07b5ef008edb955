//! Group commit of new chunk files. A chunk is durable when its bytes, its inode and its name in
//! the chunk tree are on disk. Done one chunk at a time that is two or three fsyncs per chunk
//! (file, directory, new fan-out directories), each a journal commit: small chunks then spend
//! their time waiting on the disk. Instead one thread takes every chunk waiting, makes all
//! their temp files durable with one `syncfs`, renames them into place, and makes the renames
//! durable with a second `syncfs`; only then is each put answered. Under load a batch holds many
//! chunks, so the cost per chunk falls as the load rises.
//!
//! `syncfs` flushes the whole filesystem the chunk tree lives on. On a disk dedicated to chunks
//! (the expected deployment) that is only chunk data, which O_DIRECT already wrote.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Chunks committed by one pair of `syncfs` calls, at most.
const MAX_BATCH: usize = 512;
/// Chunks waiting for the committer, at most; a full queue blocks the writer (back-pressure).
const QUEUE: usize = 1024;

struct Job {
    tmp: PathBuf,
    path: PathBuf,
    reply: mpsc::SyncSender<io::Result<()>>,
}

pub(super) struct GroupCommit {
    tx: mpsc::SyncSender<Job>,
}

fn syncfs(f: &File) -> io::Result<()> {
    // SAFETY: the descriptor is valid for the lifetime of `f`.
    if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn create_dir_if_missing(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Renames `tmp` to `path`, creating the two fan-out directories above it as needed.
fn link(tmp: &Path, path: &Path) -> io::Result<()> {
    let leaf = path.parent().expect("a chunk path has fan-out directories above it");
    if let Some(mid) = leaf.parent() {
        create_dir_if_missing(mid)?;
    }
    create_dir_if_missing(leaf)?;
    fs::rename(tmp, path)
}

impl GroupCommit {
    /// Starts the committer thread for the chunk tree at `chunks_dir`. It ends when the
    /// `GroupCommit` is dropped.
    pub(super) fn start(chunks_dir: &Path) -> io::Result<GroupCommit> {
        let dir = File::open(chunks_dir)?;
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        std::thread::Builder::new().name("chunk-commit".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(j) => batch.push(j),
                        Err(_) => break,
                    }
                }
                let data = syncfs(&dir);
                let linked: Vec<io::Result<()>> = batch
                    .iter()
                    .map(|j| match &data {
                        Ok(()) => link(&j.tmp, &j.path),
                        Err(e) => Err(io::Error::new(e.kind(), format!("syncfs: {e}"))),
                    })
                    .collect();
                let names = syncfs(&dir);
                for (j, r) in batch.into_iter().zip(linked) {
                    let r = r.and_then(|()| match &names {
                        Ok(()) => Ok(()),
                        Err(e) => Err(io::Error::new(e.kind(), format!("syncfs: {e}"))),
                    });
                    let _ = j.reply.send(r);
                }
            }
        })?;
        Ok(GroupCommit { tx })
    }

    /// Makes the written file `tmp` durable under the name `path`. Blocks until it is (or failed);
    /// call it from a blocking thread.
    pub(super) fn commit(&self, tmp: &Path, path: &Path) -> io::Result<()> {
        let (reply, done) = mpsc::sync_channel(1);
        self.tx
            .send(Job { tmp: tmp.to_path_buf(), path: path.to_path_buf(), reply })
            .map_err(|_| io::Error::other("chunk committer stopped"))?;
        done.recv().map_err(|_| io::Error::other("chunk committer stopped"))?
    }
}
