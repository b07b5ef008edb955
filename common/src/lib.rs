//! What every Cairn node shares and that is not a wire type: the cluster certificate authority and
//! the TLS configurations built from it (every QUIC and gRPC endpoint verifies its peer against the
//! cluster CA; nothing here ever accepts an arbitrary certificate), the one durable-write helper
//! used for small state files, the pool of large read buffers, the parsing of byte counts typed
//! on command lines, and the Prometheus endpoint ([`metrics`]) that serves whatever registry a
//! service fills. No policy of any one service lives here: which metrics exist and what they
//! count is each service's business.

pub mod bufs;
pub mod fsutil;
pub mod metrics;
pub mod net;
pub mod tls;
pub mod units;
