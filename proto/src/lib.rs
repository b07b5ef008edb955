//! Cairn's wire types, and nothing else: the control-plane gRPC services (client, chunkserver and
//! master peers talk to the masters) generated from `proto/cairn.proto`, and the QUIC data-plane
//! messages from `proto/data.proto` with their framing. No I/O policy and no business logic live
//! here; every other crate meets the others only through these types.

pub mod v1 {
    tonic::include_proto!("cairn.v1");
}

pub mod data {
    tonic::include_proto!("cairn.data.v1");
}

pub mod frame;

/// A BLAKE3 hash is 32 bytes; anything else on the wire is malformed.
pub const HASH_LEN: usize = 32;

/// The largest chunk the cluster accepts. Clients cut files into chunks of at most this size.
pub const MAX_CHUNK: u64 = 4 << 20;

/// The most extents (chunks) one file may have: keeps one namespace entry bounded.
pub const MAX_EXTENTS: usize = 1 << 16;

/// The largest file: [`MAX_EXTENTS`] chunks of [`MAX_CHUNK`] bytes (256 GiB).
pub const MAX_FILE_SIZE: u64 = MAX_EXTENTS as u64 * MAX_CHUNK;

/// The extended attribute holding an object's S3 ETag. A commit that changes the content without
/// giving new metadata drops it (the gateway then derives an ETag from the chunk hashes).
pub const ETAG_XATTR: &str = "user.s3.etag";
/// Every extended attribute the S3 gateway keeps starts with this.
pub const S3_XATTR_PREFIX: &str = "user.s3.";

/// gRPC metadata key carrying the address of the current leader when a follower refuses.
pub const LEADER_HINT_KEY: &str = "cairn-leader";
