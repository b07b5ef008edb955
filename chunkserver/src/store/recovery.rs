//! Startup recovery of the chunk store: empty `tmp/`, load or choose the node id, rebuild the
//! index from the chunk tree. Runs on a blocking thread, before the store serves anything.

use std::collections::HashMap;
use std::fs;
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

/// Walks `chunks/ab/cd/<hash>` and returns the index and the bytes it holds. Files that are not
/// chunks (bad names) are removed; a well-named file in the wrong directory is left alone but not
/// indexed, since it can never be found by its path.
pub(super) fn scan_chunks(chunks_dir: &Path) -> Result<(HashMap<ChunkHash, u64>, u64), StoreError> {
    let list = |d: &Path| -> Result<Vec<fs::DirEntry>, StoreError> {
        fs::read_dir(d)
            .and_then(|it| it.collect::<io::Result<Vec<_>>>())
            .map_err(|e| StoreError::io(format!("list {}", d.display()), e))
    };
    let mut index = HashMap::new();
    let mut used = 0u64;
    for top in list(chunks_dir)? {
        let top_path = top.path();
        let top_name = top.file_name().to_string_lossy().into_owned();
        if !top.file_type().map(|t| t.is_dir()).unwrap_or(false) || !is_fanout_name(&top_name) {
            remove_stray(&top_path);
            continue;
        }
        for mid in list(&top_path)? {
            let mid_path = mid.path();
            let mid_name = mid.file_name().to_string_lossy().into_owned();
            if !mid.file_type().map(|t| t.is_dir()).unwrap_or(false) || !is_fanout_name(&mid_name) {
                remove_stray(&mid_path);
                continue;
            }
            for file in list(&mid_path)? {
                let path = file.path();
                let name = file.file_name().to_string_lossy().into_owned();
                let Some(hash) = ChunkHash::from_hex(&name) else {
                    remove_stray(&path);
                    continue;
                };
                if name[0..2] != top_name || name[2..4] != mid_name {
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
    }
    Ok((index, used))
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
