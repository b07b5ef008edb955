//! Startup recovery of the chunk store: empty `tmp/`, load or choose the node id, rebuild the
//! index from the chunk tree. Runs on a blocking thread, before the store serves anything.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::Path;

use cairn_common::fsutil::durable_write;
use cairn_proto::MAX_CHUNK;

use super::{ChunkHash, StoreError};

pub(super) fn empty_tmp(tmp_dir: &Path) -> Result<(), StoreError> {
    let entries = fs::read_dir(tmp_dir).map_err(|e| StoreError::io(format!("list {}", tmp_dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(format!("list {}", tmp_dir.display()), e))?;
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let res = if is_dir { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        res.map_err(|e| StoreError::io(format!("remove {}", path.display()), e))?;
    }
    Ok(())
}

pub(super) fn load_node_id(path: &Path) -> Result<u64, StoreError> {
    match fs::read_to_string(path) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(id) if id != 0 => Ok(id),
            // Never pick a new id silently: the master knows this node, and its chunks, by it.
            _ => Err(StoreError::io(
                format!("{} does not hold a nonzero node id", path.display()),
                io::Error::from(io::ErrorKind::InvalidData),
            )),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = loop {
                let id = rand::random::<u64>();
                if id != 0 {
                    break id;
                }
            };
            durable_write(path, format!("{id}\n").as_bytes(), 0o644)
                .map_err(|e| StoreError::io(format!("write {}", path.display()), e))?;
            Ok(id)
        }
        Err(e) => Err(StoreError::io(format!("read {}", path.display()), e)),
    }
}

fn is_fanout_name(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Walks `by-hash/ab/<hash>` and returns the index and the bytes it holds. Files that are not
/// chunks (bad names) are removed; a well-named file in the wrong directory is left alone but not
/// indexed, since it can never be found by its path.
pub(super) fn scan_chunks(chunks_dir: &Path) -> Result<(HashMap<ChunkHash, u64>, u64), StoreError> {
    let mut index = HashMap::new();
    let mut used = 0u64;
    for top in list(chunks_dir)? {
        let top_path = top.path();
        let top_name = top.file_name().to_string_lossy().into_owned();
        if !is_dir(&top) || !is_fanout_name(&top_name) {
            remove_stray(&top_path);
            continue;
        }
        for file in list(&top_path)? {
            let path = file.path();
            let name = file.file_name().to_string_lossy().into_owned();
            let Some(hash) = ChunkHash::from_hex(&name) else {
                remove_stray(&path);
                continue;
            };
            if name[0..2] != top_name {
                tracing::warn!(path = %path.display(), "chunk file in the wrong directory; ignored");
                continue;
            }
            let meta = file.metadata().map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?;
            if !meta.is_file() {
                tracing::warn!(path = %path.display(), "not a regular file; ignored");
                continue;
            }
            // A size that no chunk can have is damage; reads would refuse it anyway, but the
            // master should not count it as a replica. Reads catch every other corruption.
            if meta.len() == 0 || meta.len() > MAX_CHUNK {
                tracing::warn!(path = %path.display(), len = meta.len(), "chunk file of impossible size; ignored");
                continue;
            }
            index.insert(hash, meta.len());
            used += meta.len();
        }
    }
    Ok((index, used))
}

/// Moves the chunks of the older two-level tree `old` (`chunks/ab/cd/<hash>`) into `new`
/// (`by-hash/ab/<hash>`), made by [`make_fanout`] already, then removes what it emptied. The
/// new tree has a name of its own so that an older chunkserver started on this directory again
/// finds an empty tree rather than taking the new one's files for strays (it would delete
/// them); the chunks it then stores move over at the next start of this version. Each rename
/// is atomic: a crash part-way leaves every chunk in one tree or the other, and the next start
/// carries on. Anything that is not a well-placed chunk file stays where it is.
pub(super) fn migrate_two_level(old: &Path, new: &Path) -> Result<(), StoreError> {
    if !old.is_dir() {
        return Ok(());
    }
    let mut moved = 0usize;
    for top in list(old)? {
        let top_name = top.file_name().to_string_lossy().into_owned();
        if !is_dir(&top) || !is_fanout_name(&top_name) {
            continue;
        }
        for leaf in list(&top.path())? {
            let leaf_name = leaf.file_name().to_string_lossy().into_owned();
            if !is_dir(&leaf) || !is_fanout_name(&leaf_name) {
                continue;
            }
            for file in list(&leaf.path())? {
                let name = file.file_name().to_string_lossy().into_owned();
                if ChunkHash::from_hex(&name).is_none() || name[0..2] != top_name || name[2..4] != leaf_name {
                    continue;
                }
                let (from, to) = (file.path(), new.join(&top_name).join(&name));
                fs::rename(&from, &to)
                    .map_err(|e| StoreError::io(format!("move {} to {}", from.display(), to.display()), e))?;
                moved += 1;
            }
            let _ = fs::remove_dir(leaf.path());
        }
        let _ = fs::remove_dir(top.path());
    }
    if fs::remove_dir(old).is_err() {
        tracing::warn!(path = %old.display(), "older chunk tree not empty after moving its chunks; left alone");
    }
    if moved > 0 {
        sync_dirs(new)?;
        tracing::info!(chunks = moved, from = %old.display(), to = %new.display(), "moved chunks to the one-level tree");
    }
    Ok(())
}

/// Makes the entries of `dir` and of each directory in it durable.
fn sync_dirs(dir: &Path) -> Result<(), StoreError> {
    let sync = |d: &Path| {
        File::open(d).and_then(|f| f.sync_all()).map_err(|e| StoreError::io(format!("sync {}", d.display()), e))
    };
    for entry in list(dir)? {
        if is_dir(&entry) {
            sync(&entry.path())?;
        }
    }
    sync(dir)
}

/// Creates the 256 directories chunks go into, so that storing a chunk is only a rename (a
/// directory made per chunk costs a new inode and block in the same journal commit).
pub(super) fn make_fanout(chunks_dir: &Path) -> Result<(), StoreError> {
    let mut made = false;
    for i in 0..=255u8 {
        let d = chunks_dir.join(format!("{i:02x}"));
        match fs::create_dir(&d) {
            Ok(()) => made = true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StoreError::io(format!("create {}", d.display()), e)),
        }
    }
    if made {
        File::open(chunks_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io(format!("sync {}", chunks_dir.display()), e))?;
    }
    Ok(())
}

fn list(d: &Path) -> Result<Vec<fs::DirEntry>, StoreError> {
    fs::read_dir(d)
        .and_then(|it| it.collect::<io::Result<Vec<_>>>())
        .map_err(|e| StoreError::io(format!("list {}", d.display()), e))
}

fn is_dir(e: &fs::DirEntry) -> bool {
    e.file_type().map(|t| t.is_dir()).unwrap_or(false)
}

/// Removes a file that has no business in the chunk tree. Unknown directories are left alone:
/// deleting a tree we do not understand is worse than ignoring it.
fn remove_stray(path: &Path) {
    let is_file = fs::symlink_metadata(path).map(|m| !m.is_dir()).unwrap_or(false);
    if is_file {
        tracing::warn!(path = %path.display(), "removing stray file from the chunk tree");
        if let Err(e) = fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove stray file");
        }
    } else {
        tracing::warn!(path = %path.display(), "unexpected directory in the chunk tree; ignored");
    }
}
