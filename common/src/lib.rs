//! What every Cairn node shares and that is not a wire type: the cluster certificate authority and
//! the TLS configurations built from it (every QUIC and gRPC endpoint verifies its peer against the
//! cluster CA; nothing here ever accepts an arbitrary certificate), and the one durable-write helper
//! used for small state files, and the parsing of byte counts typed on command lines. No networking and no policy of any one service live here.

pub mod fsutil;
pub mod net;
pub mod tls;
pub mod units;
