//! Micro-benchmarks of the pieces on every chunk's path: BLAKE3 of a chunk, the chunk store's
//! durable put (O_DIRECT + group commit) and verified get, and data-plane frame encoding.
//! `cargo bench --bench store`.

use cairn_chunkserver::store::{ChunkHash, ChunkStore};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rand::{RngCore, SeedableRng};

const CHUNK: usize = 4 << 20;

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn hashing(c: &mut Criterion) {
    let data = random(CHUNK, 1);
    let mut g = c.benchmark_group("blake3");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("4MiB one thread", |b| b.iter(|| blake3::hash(&data)));
    g.bench_function("4MiB as the store hashes", |b| b.iter(|| ChunkHash::of(&data)));
    g.finish();
}

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = ChunkStore::open_blocking(dir.path(), None).expect("open store");
    let mut seed = 100;
    let mut g = c.benchmark_group("chunk store");
    g.sample_size(20);
    for size in [4096usize, CHUNK] {
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("put {size} B (durable)"), |b| {
            b.iter_batched(
                || {
                    seed += 1;
                    let d = random(size, seed);
                    (ChunkHash::of(&d), d)
                },
                |(h, d)| store.put_blocking(h, &d).expect("put"),
                BatchSize::PerIteration,
            )
        });
        let d = random(size, 7);
        let h = ChunkHash::of(&d);
        store.put_blocking(h, &d).expect("put");
        g.bench_function(format!("get {size} B (verified)"), |b| b.iter(|| store.get_blocking(h, 0, 0).expect("get")));
    }
    g.finish();
}

fn frames(c: &mut Criterion) {
    use cairn_proto::data::{chunk_request::Op, ChunkRequest, PutChunk};
    let req = ChunkRequest {
        request_id: "0123456789abcdef".into(),
        op: Some(Op::Put(PutChunk {
            hash: vec![7; 32],
            length: CHUNK as u64,
            chain: vec!["127.0.0.1:7000".into(); 2],
        })),
    };
    c.bench_function("frame encode", |b| b.iter(|| cairn_proto::frame::encode(&req)));
}

criterion_group!(benches, hashing, store, frames);
criterion_main!(benches);
