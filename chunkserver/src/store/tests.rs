//! Unit tests of the chunk store, on a real filesystem in a tempdir.

use super::*;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn files_in(dir: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            n += files_in(&e.path());
        } else {
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn put_get_round_trip_and_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    assert_ne!(store.node_id(), 0);
    let bytes = data(300_000, 1);
    let hash = ChunkHash::of(&bytes);
    store.put(hash, Bytes::from(bytes.clone())).await.unwrap();
    assert!(store.chunk_path(&hash).is_file());
    assert_eq!(store.used_bytes(), bytes.len() as u64);
    assert_eq!(store.chunk_count(), 1);

    let all = store.get(hash, 0, 0).await.unwrap();
    assert_eq!(&all.bytes[..], &bytes[..]);
    assert_eq!(all.chunk_len, bytes.len() as u64);
    let part = store.get(hash, 1000, 500).await.unwrap();
    assert_eq!(&part.bytes[..], &bytes[1000..1500]);
    let tail = store.get(hash, 299_990, 100).await.unwrap();
    assert_eq!(&tail.bytes[..], &bytes[299_990..]);
    let at_end = store.get(hash, 300_000, 0).await.unwrap();
    assert!(at_end.bytes.is_empty());
    assert!(matches!(store.get(hash, 300_001, 0).await, Err(StoreError::Invalid(_))));

    let missing = ChunkHash::of(b"nope");
    let err = store.get(missing, 0, 0).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)));
    assert_eq!(err.status(), Status::NotFound);

    let (added, removed) = store.take_changes(10);
    assert_eq!(added, vec![hash]);
    assert!(removed.is_empty());
}

#[tokio::test]
async fn recent_reads_come_from_the_verified_map_until_the_chunk_goes() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    let bytes = data(200_000, 7);
    let hash = ChunkHash::of(&bytes);
    store.put(hash, Bytes::from(bytes.clone())).await.unwrap();
    // The first read hashes the chunk and keeps its map; later ones are slices of that map.
    let first = store.get_recent(hash, 10, 20).await.unwrap();
    assert_eq!(&first.bytes[..], &bytes[10..30]);
    let tail = store.get_recent(hash, 199_000, 0).await.unwrap();
    assert_eq!(&tail.bytes[..], &bytes[199_000..]);
    assert_eq!(tail.chunk_len, 200_000);
    assert!(matches!(store.get_recent(hash, 200_001, 1).await, Err(StoreError::Invalid(_))));
    // Deleted: an old map is not served.
    assert!(store.delete_blocking(&hash).unwrap());
    assert!(matches!(store.get_recent(hash, 0, 10).await, Err(StoreError::NotFound(_))));
}

#[tokio::test]
async fn duplicate_put_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    let bytes = Bytes::from(data(4096, 2));
    let hash = ChunkHash::of(&bytes);
    store.put(hash, bytes.clone()).await.unwrap();
    let mtime = fs::metadata(store.chunk_path(&hash)).unwrap().modified().unwrap();
    store.put(hash, bytes.clone()).await.unwrap();
    assert_eq!(fs::metadata(store.chunk_path(&hash)).unwrap().modified().unwrap(), mtime);
    assert_eq!(store.used_bytes(), 4096);
    assert_eq!(store.chunk_count(), 1);
    assert_eq!(files_in(&dir.path().join("by-hash")), 1);
}

#[tokio::test]
async fn hash_mismatch_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    let hash = ChunkHash::of(b"the real content");
    let err = store.put(hash, Bytes::from_static(b"other content")).await.unwrap_err();
    assert!(matches!(err, StoreError::HashMismatch { .. }), "{err}");
    assert_eq!(err.status(), Status::HashMismatch);
    assert_eq!(files_in(&dir.path().join("by-hash")), 0);
    assert_eq!(files_in(&dir.path().join("tmp")), 0);
    assert_eq!(store.chunk_count(), 0);
    assert!(store.take_changes(10).0.is_empty());

    let err = store.put(ChunkHash::of(b""), Bytes::new()).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)));
}

#[tokio::test]
async fn corrupt_chunk_is_detected_and_moved() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    let bytes = data(10_000, 3);
    let hash = ChunkHash::of(&bytes);
    store.put(hash, Bytes::from(bytes.clone())).await.unwrap();
    store.take_changes(10);

    let path = store.chunk_path(&hash);
    let mut damaged = bytes.clone();
    damaged[5000] ^= 0x40;
    // Replace the file rather than writing in place, as a real disk error would not race a map.
    fs::write(&path, &damaged).unwrap();

    let err = store.get(hash, 0, 10).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert_eq!(err.status(), Status::Corrupt);
    assert!(!path.exists());
    assert_eq!(files_in(&dir.path().join("corrupt")), 1);
    assert!(!store.contains(&hash));
    assert_eq!(store.used_bytes(), 0);
    let (added, removed) = store.take_changes(10);
    assert!(added.is_empty());
    assert_eq!(removed, vec![hash]);
    assert!(matches!(store.get(hash, 0, 0).await, Err(StoreError::NotFound(_))));

    // A good copy can be stored again.
    store.put(hash, Bytes::from(bytes)).await.unwrap();
    assert!(store.get(hash, 0, 0).await.is_ok());
}

#[tokio::test]
async fn reopen_rebuilds_index_and_empties_tmp() {
    let dir = tempfile::tempdir().unwrap();
    let (node_id, hashes) = {
        let store = ChunkStore::open(dir.path(), None).await.unwrap();
        let mut hashes = Vec::new();
        for i in 0..5u8 {
            let bytes = data(1000 + i as usize, i);
            let hash = ChunkHash::of(&bytes);
            store.put(hash, Bytes::from(bytes)).await.unwrap();
            hashes.push(hash);
        }
        (store.node_id(), hashes)
    };
    fs::write(dir.path().join("tmp/leftover"), b"half a chunk").unwrap();
    fs::write(dir.path().join("by-hash/stray.txt"), b"junk").unwrap();
    let stray = dir.path().join("by-hash/ab/not-a-hash");
    fs::write(&stray, b"junk").unwrap();

    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    assert_eq!(store.node_id(), node_id, "node id survives a restart");
    assert_eq!(store.chunk_count(), 5);
    assert_eq!(store.used_bytes(), (0..5).map(|i| 1000 + i).sum::<u64>());
    let mut got = store.hashes();
    got.sort();
    let mut want = hashes.clone();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(files_in(&dir.path().join("tmp")), 0);
    assert!(!dir.path().join("by-hash/stray.txt").exists());
    assert!(!stray.exists());
    for h in &hashes {
        store.get(*h, 0, 0).await.unwrap();
    }
}

#[tokio::test]
async fn reopen_moves_the_two_level_layout_into_one_level() {
    let dir = tempfile::tempdir().unwrap();
    let hashes: Vec<ChunkHash> = {
        let store = ChunkStore::open(dir.path(), None).await.unwrap();
        let mut hashes = Vec::new();
        for i in 0..20u8 {
            let bytes = data(3000 + i as usize, i);
            let hash = ChunkHash::of(&bytes);
            store.put(hash, Bytes::from(bytes)).await.unwrap();
            hashes.push(hash);
        }
        hashes
    };
    // Lay 15 of them out as an older version did, chunks/ab/cd/<hex>, as if it had stored them
    // (an upgrade, or a start of the older version after this one, which leaves by-hash/ alone).
    let (old, new) = (dir.path().join("chunks"), dir.path().join("by-hash"));
    for h in &hashes[5..] {
        let hex = h.to_hex();
        let leaf = old.join(&hex[0..2]).join(&hex[2..4]);
        fs::create_dir_all(&leaf).unwrap();
        fs::rename(new.join(&hex[0..2]).join(&hex), leaf.join(&hex)).unwrap();
    }
    // Something the older tree holds that is not a chunk stays where it is.
    let odd = old.join(&hashes[5].to_hex()[0..2]).join("notes.txt");
    fs::write(&odd, b"not a chunk").unwrap();

    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    assert_eq!(store.chunk_count(), 20);
    for (i, h) in hashes.iter().enumerate() {
        let hex = h.to_hex();
        assert!(new.join(&hex[0..2]).join(&hex).is_file(), "chunk {hex} in by-hash/");
        assert!(!old.join(&hex[0..2]).join(&hex[2..4]).exists(), "old directory of {hex} removed");
        let got = store.get(*h, 0, 0).await.unwrap();
        assert_eq!(&got.bytes[..], &data(3000 + i, i as u8)[..]);
    }
    assert!(odd.is_file());
    fs::remove_file(&odd).unwrap();
    drop(store);
    ChunkStore::open(dir.path(), None).await.unwrap();
    assert!(!old.exists(), "an emptied older tree is removed");
}

#[tokio::test]
async fn capacity_limit_gives_no_space() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), Some(10_000)).await.unwrap();
    assert_eq!(store.capacity_bytes(), 10_000);
    let a = Bytes::from(data(6000, 4));
    store.put(ChunkHash::of(&a), a.clone()).await.unwrap();
    assert!(store.free_bytes() <= 4000);
    let b = Bytes::from(data(6000, 5));
    let err = store.put(ChunkHash::of(&b), b).await.unwrap_err();
    assert!(matches!(err, StoreError::NoSpace { .. }), "{err}");
    assert_eq!(err.status(), Status::NoSpace);
    // Re-putting what is stored needs no space.
    store.put(ChunkHash::of(&a), a).await.unwrap();
    let c = Bytes::from(data(4000, 6));
    store.put(ChunkHash::of(&c), c).await.unwrap();
    assert_eq!(store.used_bytes(), 10_000);
    assert_eq!(files_in(&dir.path().join("tmp")), 0);
}

#[test]
fn hex_names_are_canonical() {
    let h = ChunkHash::of(b"x");
    assert_eq!(ChunkHash::from_hex(&h.to_hex()), Some(h));
    assert_eq!(ChunkHash::from_hex(&h.to_hex().to_uppercase()), None);
    assert_eq!(ChunkHash::from_hex("abc"), None);
    assert_eq!(ChunkHash::from_slice(&[0; 31]), None);
}

#[test]
fn changes_keep_the_latest_event() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open_blocking(dir.path(), None).unwrap();
    let bytes = data(100, 7);
    let hash = ChunkHash::of(&bytes);
    store.put_blocking(hash, &bytes).unwrap();
    let (added, removed) = store.take_changes(10);
    assert_eq!(added, vec![hash]);
    // The heartbeat failed, and meanwhile the chunk was lost: the removal must win.
    store.inner.forget(hash);
    store.requeue_changes(added, removed);
    let (added, removed) = store.take_changes(10);
    assert!(added.is_empty());
    assert_eq!(removed, vec![hash]);
    store.requeue_changes(added, removed);
    assert_eq!(store.take_changes(10).1, vec![hash], "requeued changes are not lost");
}
