//! Group commit of new chunk files (chunks above 64 KiB; smaller ones are packed, see `pack`). A
//! chunk is durable when its bytes, its inode and its name in the chunk tree are on disk. Done
//! one chunk at a time that is two fsyncs per chunk (file, directory), each a journal commit.
//! Instead one thread takes every chunk waiting, makes all their temp files durable with one
//! `syncfs`, renames them into place, and makes the renames durable with a second `syncfs`; only
//! then is each put answered. Under load a batch holds many chunks, so the cost per chunk falls
//! as the load rises.
//!
//! `syncfs` flushes the whole filesystem the chunk tree lives on. On a disk dedicated to chunks
//! (the expected deployment) that is only chunk data, mostly written with O_DIRECT already.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, oneshot};

/// Chunks committed by one pair of `syncfs` calls, at most.
const MAX_BATCH: usize = 512;
/// Chunks waiting for the committer, at most; a full queue blocks the writer (back-pressure).
const QUEUE: usize = 1024;

struct Job {
    /// The temp file, open since it was written: its own write-back errors are asked of it.
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    reply: oneshot::Sender<io::Result<()>>,
}

pub(super) struct GroupCommit {
    tx: mpsc::Sender<Job>,
}

fn syncfs(f: &File) -> io::Result<()> {
    // SAFETY: the descriptor is valid for the lifetime of `f`.
    if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The error, if any, that writing `f` back to disk met since it was opened. `syncfs` reports
/// such an error once, to whichever call comes first (maybe one for another batch), so each file
/// is asked itself. After the `syncfs` its pages are clean: nothing is written or waited for.
fn written(f: &File) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: the descriptor is valid for the lifetime of `f`.
    if unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Renames `tmp` to `path`. The store makes the fan-out directories at open; one removed since
/// is made again.
fn link(tmp: &Path, path: &Path) -> io::Result<()> {
    match fs::rename(tmp, path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound && tmp.exists() => {
            let dir = path.parent().expect("a chunk path has a fan-out directory above it");
            match fs::create_dir(dir) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            fs::rename(tmp, path)
        }
        r => r,
    }
}

impl GroupCommit {
    /// Starts the committer thread for the chunk tree at `chunks_dir`. It ends when the
    /// `GroupCommit` is dropped.
    pub(super) fn start(chunks_dir: &Path) -> io::Result<GroupCommit> {
        let dir = File::open(chunks_dir)?;
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        std::thread::Builder::new().name("chunk-commit".into()).spawn(move || {
            while let Some(batch) = next_batch(&mut rx, MAX_BATCH) {
                let data = syncfs(&dir);
                let linked: Vec<io::Result<()>> = batch
                    .iter()
                    .map(|j| match &data {
                        Ok(()) => written(&j.file).and_then(|()| link(&j.tmp, &j.path)),
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

    /// Makes the written file `tmp` (open as `file`) durable under the name `path`. Runs on a
    /// blocking thread (large chunks are written there); panics on a runtime worker thread.
    pub(super) fn commit_blocking(&self, file: File, tmp: &Path, path: &Path) -> io::Result<()> {
        let (reply, done) = oneshot::channel();
        let job = Job { file, tmp: tmp.to_path_buf(), path: path.to_path_buf(), reply };
        self.tx.blocking_send(job).map_err(|_| stopped())?;
        done.blocking_recv().map_err(|_| stopped())?
    }
}

/// Waits for a job, then takes every job already waiting, up to `max` in all; `None` once every
/// sender is gone. How a group commit thread gathers its next batch.
pub(super) fn next_batch<T>(rx: &mut mpsc::Receiver<T>, max: usize) -> Option<Vec<T>> {
    let mut batch = vec![rx.blocking_recv()?];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(j) => batch.push(j),
            Err(_) => break,
        }
    }
    Some(batch)
}

fn stopped() -> io::Error {
    io::Error::other("chunk committer stopped")
}
