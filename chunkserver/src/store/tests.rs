//! Unit tests of the chunk store, on a real filesystem in a tempdir.

use std::os::unix::fs::FileExt;

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
    // A delete of a chunk that is not here is answered too: the master waits for it.
    assert!(!store.delete_blocking(&missing).unwrap());
    assert_eq!(store.take_changes(10), (vec![], vec![missing]));
}

#[tokio::test]
async fn a_small_read_that_needs_the_disk_goes_to_a_blocking_thread() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    let bytes = data(400_000, 9);
    let hash = ChunkHash::of(&bytes);
    store.put(hash, Bytes::from(bytes.clone())).await.unwrap();
    assert_eq!(&store.get_recent(hash, 0, 100).await.unwrap().bytes[..], &bytes[..100]);
    assert_eq!(&store.get_recent(hash, 5000, 100).await.unwrap().bytes[..], &bytes[5000..5100]);
    assert_eq!(store.reads_handed_off(), 0, "verified and in the page cache: read on the async thread");
    let f = File::open(store.chunk_path(&hash)).unwrap();
    // SAFETY: fstatfs writes into the struct; fadvise only takes the descriptor.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) }, 0);
    assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    assert_eq!(&store.get_recent(hash, 300_000, 4096).await.unwrap().bytes[..], &bytes[300_000..304_096]);
    // tmpfs keeps its pages (they are its storage): nothing to hand off there.
    let evicted = u64::from(st.f_type != libc::TMPFS_MAGIC);
    assert_eq!(store.reads_handed_off(), evicted, "the range was not in the page cache");
    assert_eq!(&store.get_recent(hash, 300_000, 4096).await.unwrap().bytes[..], &bytes[300_000..304_096]);
    assert_eq!(store.reads_handed_off(), evicted, "the blocking read brought it back");
}

#[tokio::test]
async fn recent_reads_skip_the_hash_until_the_chunk_goes() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    let bytes = data(200_000, 7);
    let hash = ChunkHash::of(&bytes);
    store.put(hash, Bytes::from(bytes.clone())).await.unwrap();
    // The first read hashes the chunk and remembers it as verified; later ones read only their
    // range.
    let first = store.get_recent(hash, 10, 20).await.unwrap();
    assert_eq!(&first.bytes[..], &bytes[10..30]);
    let tail = store.get_recent(hash, 199_000, 0).await.unwrap();
    assert_eq!(&tail.bytes[..], &bytes[199_000..]);
    assert_eq!(tail.chunk_len, 200_000);
    assert!(matches!(store.get_recent(hash, 200_001, 1).await, Err(StoreError::Invalid(_))));
    // Damage within the window: recent reads do not see it, but `get` (the scrubber's read)
    // always hashes, and finds it.
    let mut damaged = bytes.clone();
    damaged[150_000] ^= 1;
    fs::write(store.chunk_path(&hash), &damaged).unwrap();
    assert_eq!(&store.get_recent(hash, 10, 20).await.unwrap().bytes[..], &bytes[10..30]);
    assert!(matches!(store.get(hash, 0, 10).await, Err(StoreError::Corrupt(_))));
    assert!(matches!(store.get_recent(hash, 0, 10).await, Err(StoreError::NotFound(_))));
    store.put(hash, Bytes::from(bytes.clone())).await.unwrap();
    assert_eq!(&store.get_recent(hash, 10, 20).await.unwrap().bytes[..], &bytes[10..30]);
    // Verified, but deleted: nothing is served.
    assert!(store.delete_blocking(&hash).unwrap());
    assert!(matches!(store.get_recent(hash, 0, 10).await, Err(StoreError::NotFound(_))));
}

#[tokio::test]
async fn duplicate_put_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    let bytes = Bytes::from(data(100_000, 2));
    let hash = ChunkHash::of(&bytes);
    store.put(hash, bytes.clone()).await.unwrap();
    let mtime = fs::metadata(store.chunk_path(&hash)).unwrap().modified().unwrap();
    store.put(hash, bytes.clone()).await.unwrap();
    assert_eq!(fs::metadata(store.chunk_path(&hash)).unwrap().modified().unwrap(), mtime);
    assert_eq!(store.used_bytes(), 100_000);
    assert_eq!(store.chunk_count(), 1);
    assert_eq!(files_in(&dir.path().join("by-hash")), 1);

    // A small chunk is packed, once.
    let small = Bytes::from(data(4096, 2));
    let small_hash = ChunkHash::of(&small);
    store.put(small_hash, small.clone()).await.unwrap();
    let packed = pack_bytes(dir.path());
    store.put(small_hash, small).await.unwrap();
    assert_eq!(pack_bytes(dir.path()), packed);
    assert!(!store.chunk_path(&small_hash).exists());
    assert_eq!(store.used_bytes(), 104_096);
    assert_eq!(store.chunk_count(), 2);
}

/// Bytes in the pack files of the store in `dir`.
fn pack_bytes(dir: &Path) -> u64 {
    pack_files(dir).iter().map(|p| fs::metadata(p).unwrap().len()).sum()
}

fn pack_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn packed_chunks_survive_a_reopen_and_deleted_ones_stay_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<Vec<u8>> = (0..100).map(|i| data(1 + i * 500, i as u8)).collect();
    let hashes: Vec<ChunkHash> = chunks.iter().map(|c| ChunkHash::of(c)).collect();
    {
        let store = ChunkStore::open(dir.path(), None).await.unwrap();
        for (c, h) in chunks.iter().zip(&hashes) {
            store.put(*h, Bytes::from(c.clone())).await.unwrap();
        }
        for h in &hashes[..30] {
            assert!(store.delete_blocking(h).unwrap());
        }
        assert!(!store.delete_blocking(&hashes[0]).unwrap());
        let part = store.get(hashes[50], 100, 200).await.unwrap();
        assert_eq!(&part.bytes[..], &chunks[50][100..300]);
        assert_eq!(part.chunk_len, chunks[50].len() as u64);
        assert!(matches!(store.get(hashes[50], chunks[50].len() as u64 + 1, 0).await, Err(StoreError::Invalid(_))));
    }
    assert_eq!(files_in(&dir.path().join("by-hash")), 0);
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    assert_eq!(store.chunk_count(), 70);
    assert_eq!(store.used_bytes(), chunks[30..].iter().map(|c| c.len() as u64).sum::<u64>());
    let stats = store.pack_stats();
    assert_eq!(stats.packs, 1);
    assert_eq!(stats.live_bytes, chunks[30..].iter().map(|c| 56 + c.len() as u64).sum::<u64>());
    assert_eq!(stats.bytes, pack_bytes(dir.path()));
    for (c, h) in chunks.iter().zip(&hashes).skip(30) {
        assert_eq!(&store.get_recent(*h, 0, 0).await.unwrap().bytes[..], &c[..]);
    }
    for h in &hashes[..30] {
        assert!(matches!(store.get(*h, 0, 0).await, Err(StoreError::NotFound(_))));
    }
    // A deleted chunk stored again is back for good.
    store.put(hashes[0], Bytes::from(chunks[0].clone())).await.unwrap();
    drop(store);
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    assert_eq!(store.chunk_count(), 71);
    assert!(store.contains(&hashes[0]));
}

#[tokio::test]
async fn a_torn_end_of_the_newest_pack_is_cut_and_appended_to_again() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<Vec<u8>> = (0..10).map(|i| data(3000, i)).collect();
    {
        let store = ChunkStore::open(dir.path(), None).await.unwrap();
        for c in &chunks {
            store.put(ChunkHash::of(c), Bytes::from(c.clone())).await.unwrap();
        }
    }
    let pack = pack_files(dir.path()).pop().unwrap();
    let good = fs::metadata(&pack).unwrap().len();
    // A crash mid-append: a whole header, then part of its data.
    let torn = data(5000, 99);
    let mut tail = pack::encode(pack::KIND_CHUNK, torn.len() as u32, &ChunkHash::of(&torn)).to_vec();
    tail.extend_from_slice(&torn[..1000]);
    let mut f = OpenOptions::new().append(true).open(&pack).unwrap();
    f.write_all(&tail).unwrap();
    drop(f);

    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    assert_eq!(store.chunk_count(), 10);
    assert!(!store.contains(&ChunkHash::of(&torn)));
    assert_eq!(fs::metadata(&pack).unwrap().len(), good, "the torn record is cut off");
    let more = data(2000, 42);
    store.put(ChunkHash::of(&more), Bytes::from(more.clone())).await.unwrap();
    drop(store);
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    assert_eq!(store.chunk_count(), 11);
    assert_eq!(&store.get(ChunkHash::of(&more), 0, 0).await.unwrap().bytes[..], &more[..]);
    for c in &chunks {
        assert_eq!(&store.get(ChunkHash::of(c), 0, 0).await.unwrap().bytes[..], &c[..]);
    }
}

#[tokio::test]
async fn a_damaged_packed_chunk_is_dropped_and_the_rest_of_its_pack_kept() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<Vec<u8>> = (0..3).map(|i| data(8000, i)).collect();
    let hashes: Vec<ChunkHash> = chunks.iter().map(|c| ChunkHash::of(c)).collect();
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    for (c, h) in chunks.iter().zip(&hashes) {
        store.put(*h, Bytes::from(c.clone())).await.unwrap();
    }
    store.take_changes(10);
    // Rot in the middle chunk's data (its record starts after the first record).
    let pack = pack_files(dir.path()).pop().unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&pack).unwrap();
    let at = (56 + 8000) + 56 + 4000;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    drop(f);

    let err = store.get(hashes[1], 0, 10).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert!(!store.contains(&hashes[1]));
    assert_eq!(files_in(&dir.path().join("corrupt")), 1);
    assert_eq!(store.take_changes(10), (vec![], vec![hashes[1]]));
    assert_eq!(&store.get(hashes[2], 0, 0).await.unwrap().bytes[..], &chunks[2][..]);
    drop(store);
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    assert_eq!(store.chunk_count(), 2);
    assert!(!store.contains(&hashes[1]));
    // A good copy can be stored again.
    store.put(hashes[1], Bytes::from(chunks[1].clone())).await.unwrap();
    assert_eq!(&store.get(hashes[1], 0, 0).await.unwrap().bytes[..], &chunks[1][..]);
}

#[tokio::test]
async fn compaction_reclaims_dead_packs_and_keeps_deletes_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<Vec<u8>> = (0..120u32).map(|i| data(4000 + i as usize, i as u8)).collect();
    let hashes: Vec<ChunkHash> = chunks.iter().map(|c| ChunkHash::of(c)).collect();
    // Chunk 3 is deleted early: its tombstone lands in the second pack, which is later compacted
    // while the first pack (mostly live, so kept) still holds chunk 3's record.
    let live = |i: usize| if i < 10 { i != 3 } else { i.is_multiple_of(5) };
    {
        let store = ChunkStore::open(dir.path(), None).await.unwrap();
        store.inner.packs.set_pack_max(40_000);
        for (c, h) in chunks.iter().zip(&hashes).take(10) {
            store.put(*h, Bytes::from(c.clone())).await.unwrap();
        }
        assert!(store.delete_blocking(&hashes[3]).unwrap());
        for (c, h) in chunks.iter().zip(&hashes).skip(10) {
            store.put(*h, Bytes::from(c.clone())).await.unwrap();
        }
        let before = pack_files(dir.path()).len();
        assert!(before >= 10, "{before} packs");
        for (i, h) in hashes.iter().enumerate().skip(10) {
            if !live(i) {
                assert!(store.delete_blocking(h).unwrap());
            }
        }
        let bytes_before = pack_bytes(dir.path());
        let compacted = store.inner.compact_packs();
        assert!(compacted >= before - 3, "{compacted} of {before} packs compacted");
        assert!(pack_files(dir.path())[0].ends_with("0000000000000001.pack"), "the mostly live first pack is kept");
        assert!(pack_bytes(dir.path()) < bytes_before / 2, "{} of {bytes_before} bytes left", pack_bytes(dir.path()));
        for (i, (c, h)) in chunks.iter().zip(&hashes).enumerate() {
            if live(i) {
                assert_eq!(&store.get(*h, 0, 0).await.unwrap().bytes[..], &c[..]);
            } else {
                assert!(!store.contains(h));
            }
        }
        // Deleted after compaction, and one deleted before stored again.
        assert!(store.delete_blocking(&hashes[20]).unwrap());
        store.put(hashes[11], Bytes::from(chunks[11].clone())).await.unwrap();
    }
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    let want = |i: usize| (live(i) && i != 20) || i == 11;
    for (i, (c, h)) in chunks.iter().zip(&hashes).enumerate() {
        if want(i) {
            assert_eq!(&store.get(*h, 0, 0).await.unwrap().bytes[..], &c[..], "chunk {i}");
        } else {
            assert!(!store.contains(h), "chunk {i} came back");
        }
    }
    assert_eq!(store.chunk_count(), (0..120).filter(|i| want(*i)).count() as u64);
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
async fn a_damaged_file_replaced_meanwhile_is_not_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    let bytes = data(100_000, 9);
    let hash = ChunkHash::of(&bytes);
    store.put(hash, Bytes::from(bytes.clone())).await.unwrap();
    let path = store.chunk_path(&hash);
    let old = File::open(&path).unwrap();
    // Deleted and stored again from a good copy while a reader still held the old file, which
    // it then found damaged: the new file stays.
    assert!(store.delete_blocking(&hash).unwrap());
    store.put(hash, Bytes::from(bytes.clone())).await.unwrap();
    store.inner.quarantine(hash, &old, "test");
    assert!(path.exists());
    assert!(store.contains(&hash));
    assert_eq!(files_in(&dir.path().join("corrupt")), 0);
    assert_eq!(&store.get(hash, 0, 0).await.unwrap().bytes[..], &bytes[..]);
    // The file the path names is moved aside.
    store.inner.quarantine(hash, &File::open(&path).unwrap(), "test");
    assert!(!path.exists());
    assert!(!store.contains(&hash));
    assert_eq!(files_in(&dir.path().join("corrupt")), 1);
}

#[tokio::test]
async fn corrupt_chunk_is_detected_and_moved() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    let bytes = data(100_000, 3);
    let hash = ChunkHash::of(&bytes);
    store.put(hash, Bytes::from(bytes.clone())).await.unwrap();
    store.take_changes(10);

    let path = store.chunk_path(&hash);
    let mut damaged = bytes.clone();
    damaged[5000] ^= 0x40;
    // One bit flips on disk.
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
async fn a_checking_reader_gets_whole_chunks_unhashed_and_ranges_checked() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    let bytes = data(300_000, 4);
    let hash = ChunkHash::of(&bytes);
    store.put(hash, Bytes::from(bytes.clone())).await.unwrap();
    let path = store.chunk_path(&hash);
    let mut damaged = bytes.clone();
    damaged[7000] ^= 0x40;
    fs::write(&path, &damaged).unwrap();

    // The whole chunk goes out as stored: the reader hashes it and finds the damage itself.
    for length in [0, bytes.len() as u64] {
        let read = store.get_for_checking_reader(hash, 0, length).await.unwrap();
        assert_eq!(&read.bytes[..], &damaged[..]);
    }
    assert!(path.exists() && store.contains(&hash), "not hashed, not quarantined");
    // Nor is the unhashed copy remembered as verified for ranged reads.
    let err = store.get_for_checking_reader(hash, 10, 20).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert!(!path.exists());
    assert_eq!(files_in(&dir.path().join("corrupt")), 1);

    // A size that does not match the index is refused without hashing.
    let other = data(200_000, 5);
    let other_hash = ChunkHash::of(&other);
    store.put(other_hash, Bytes::from(other.clone())).await.unwrap();
    fs::write(store.chunk_path(&other_hash), &other[..1000]).unwrap();
    let err = store.get_for_checking_reader(other_hash, 0, 0).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");

    // A file cut short before a restart is indexed at its short size; a reader that asks for
    // the whole chunk's length gets it hashed, and the damage found.
    let cut = data(250_000, 6);
    let cut_hash = ChunkHash::of(&cut);
    store.put(cut_hash, Bytes::from(cut.clone())).await.unwrap();
    let path = store.chunk_path(&cut_hash);
    drop(store);
    fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(100_000).unwrap();
    let store = ChunkStore::open(dir.path(), None).await.unwrap();
    let err = store.get_for_checking_reader(cut_hash, 0, cut.len() as u64).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert!(!store.contains(&cut_hash) && !path.exists(), "quarantined");
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
            let bytes = data(70_000 + i as usize, i);
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
        assert_eq!(&got.bytes[..], &data(70_000 + i, i as u8)[..]);
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

#[test]
fn a_put_that_waited_while_its_chunk_was_deleted_is_refused_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open_blocking(dir.path(), None).unwrap();
    let bytes = data(5000, 8);
    let hash = ChunkHash::of(&bytes);
    // Two puts of the same chunk append before either is indexed; the first is indexed, then
    // the chunk is deleted (its tombstone lands after both records); the second then ends.
    let first = store.inner.append_chunk(hash, &bytes).unwrap().unwrap();
    let second = store.inner.append_chunk(hash, &bytes).unwrap().unwrap();
    store.inner.finish_packed(hash, first, Ok(())).unwrap();
    assert!(store.delete_blocking(&hash).unwrap());
    let err = store.inner.finish_packed(hash, second, Ok(())).unwrap_err();
    assert!(
        matches!(&err, StoreError::Io { source, .. } if source.to_string().contains("deleted while it was being stored")),
        "{err:?}"
    );
    assert!(!store.contains(&hash));
    // What the store says is what a restart finds; a put now stores it for good.
    drop(store);
    let store = ChunkStore::open_blocking(dir.path(), None).unwrap();
    assert!(!store.contains(&hash));
    store.put_blocking(hash, &bytes).unwrap();
    drop(store);
    assert!(ChunkStore::open_blocking(dir.path(), None).unwrap().contains(&hash));
}

#[test]
fn compaction_does_not_carry_a_tombstone_past_a_waiting_put_of_its_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open_blocking(dir.path(), None).unwrap();
    store.inner.packs.set_pack_max(20_000);
    let x = data(4000, 1);
    let hx = ChunkHash::of(&x);
    let fill: Vec<Vec<u8>> = (0..12).map(|i| data(4000, 10 + i)).collect();
    // Four records fill a pack. Pack 1: x and filler (kept: mostly live). Pack 2: filler, x's
    // tombstone, filler, all deleted then, so that pack 2 is compacted while a new put of x
    // waits.
    store.put_blocking(hx, &x).unwrap();
    for f in &fill[..4] {
        store.put_blocking(ChunkHash::of(f), f).unwrap();
    }
    assert!(store.delete_blocking(&hx).unwrap());
    for f in &fill[4..] {
        store.put_blocking(ChunkHash::of(f), f).unwrap();
    }
    for f in &fill[3..7] {
        assert!(store.delete_blocking(&ChunkHash::of(f)).unwrap());
    }
    let again = store.inner.append_chunk(hx, &x).unwrap().unwrap();
    assert!(store.inner.compact_packs() >= 1);
    assert!(pack_files(dir.path())[0].ends_with("0000000000000001.pack"), "pack 1 is kept");
    store.inner.finish_packed(hx, again, Ok(())).unwrap();
    assert!(store.contains(&hx));
    drop(store);
    let store = ChunkStore::open_blocking(dir.path(), None).unwrap();
    assert!(store.contains(&hx), "an acknowledged put of x is gone after a restart");
    assert_eq!(store.get_blocking(hx, 0, 0).unwrap().bytes, x);
}

fn index_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "idx"))
        .collect();
    v.sort();
    v
}

#[test]
fn closed_packs_are_loaded_from_their_index_and_read_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<Vec<u8>> = (0..30u8).map(|i| data(3000 + i as usize, i)).collect();
    let hashes: Vec<ChunkHash> = chunks.iter().map(|c| ChunkHash::of(c)).collect();
    {
        let store = ChunkStore::open_blocking(dir.path(), None).unwrap();
        store.inner.packs.set_pack_max(20_000);
        for (c, h) in chunks.iter().zip(&hashes) {
            store.put_blocking(*h, c).unwrap();
        }
        assert!(store.delete_blocking(&hashes[0]).unwrap());
    }
    let packs = pack_files(dir.path());
    assert!(packs.len() >= 5, "{} packs", packs.len());
    assert_eq!(index_files(dir.path()).len(), packs.len() - 1, "every closed pack has an index");
    let check = |store: &ChunkStore| {
        assert_eq!(store.chunk_count(), 29);
        assert!(!store.contains(&hashes[0]));
        for (c, h) in chunks.iter().zip(&hashes).skip(1) {
            assert_eq!(&store.get_blocking(*h, 0, 0).unwrap().bytes[..], &c[..]);
        }
    };
    // The index is what a start reads: a header damaged in a closed pack hides nothing after it.
    let f = OpenOptions::new().read(true).write(true).open(&packs[0]).unwrap();
    let second = 56 + 3000;
    f.write_all_at(b"XXXX", second).unwrap();
    drop(f);
    let store = ChunkStore::open_blocking(dir.path(), None).unwrap();
    assert_eq!(store.chunk_count(), 29);
    assert!(matches!(store.get_blocking(hashes[1], 0, 0), Err(StoreError::Corrupt(_))));
    assert!(store.contains(&hashes[2]), "a chunk after the damaged header is indexed");
    store.put_blocking(hashes[1], &chunks[1]).unwrap();
    check(&store);
    drop(store);
    // Damaged or missing indexes: the packs are read instead, every record checked against its
    // hash (a pack closed by a failed sync has no index, and its data may not be on disk).
    let idx = index_files(dir.path());
    fs::write(&idx[1], b"not an index").unwrap();
    fs::remove_file(&idx[2]).unwrap();
    let f = OpenOptions::new().write(true).open(idx[2].with_extension("pack")).unwrap();
    f.write_all_at(b"garbage", 56 + 10).unwrap();
    drop(f);
    let store = ChunkStore::open_blocking(dir.path(), None).unwrap();
    let lost: Vec<usize> = (1..30).filter(|&i| !store.contains(&hashes[i])).collect();
    assert_eq!(lost.len(), 1, "the damaged record, and only it, is not indexed: {lost:?}");
    store.put_blocking(hashes[lost[0]], &chunks[lost[0]]).unwrap();
    check(&store);
    drop(store);
    // An index goes with its pack when the pack is compacted.
    let store = ChunkStore::open_blocking(dir.path(), None).unwrap();
    for h in &hashes[1..] {
        assert!(store.delete_blocking(h).unwrap());
    }
    // Packs 2 and 3 were read at this start (their indexes are broken or gone): compaction
    // reads them again from their first record.
    assert!(store.inner.compact_packs() >= 3);
    let left = pack_files(dir.path());
    assert_eq!(left[0], packs[0], "a pack with a damaged header is not compacted: its index said more than it shows");
    assert_eq!(store.inner.compact_packs(), 0, "nor tried again");
    for i in index_files(dir.path()) {
        assert!(left.contains(&i.with_extension("pack")), "{} outlived its pack", i.display());
    }
    drop(store);
    assert_eq!(ChunkStore::open_blocking(dir.path(), None).unwrap().chunk_count(), 0);
}
