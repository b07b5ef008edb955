//! The cluster CA and the TLS configurations of every endpoint.
//!
//! Trust model: one CA per cluster, created once (`cairn dev` does it, or `cairn ca init`). Its key
//! signs a certificate for every node and for clients. Servers (masters' gRPC, chunkservers' QUIC)
//! present a certificate naming [`NODE_NAME`] and require a client certificate signed by the same
//! CA; clients check the server's chain against the CA and that it names [`NODE_NAME`], so a client
//! certificate cannot impersonate a node. Every check is the standard WebPKI verification: nothing
//! in Cairn skips it, in tests too (tests make their own CA).
//!
//! Files: a CA directory holds `ca.pem` and `ca.key`; an identity directory (one per node, one for
//! clients) holds `ca.pem`, `cert.pem` and `key.pem`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::fsutil::durable_write;

/// The DNS name every node certificate carries and every client checks.
pub const NODE_NAME: &str = "node.cairn";
/// The DNS name in client certificates (clients are never servers).
pub const CLIENT_NAME: &str = "client.cairn";
/// ALPN of the data plane; a peer speaking anything else is refused during the handshake.
pub const DATA_ALPN: &[u8] = b"cairn-data/1";

const CA_CN: &str = "Cairn cluster CA";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A master or chunkserver: serves, and connects to other nodes.
    Node,
    /// A client (CLI, FUSE mount, S3 gateway): only connects.
    Client,
}

fn ca_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Creates `dir/ca.pem` and `dir/ca.key` unless they exist. Returns whether it created them.
pub fn init_ca(dir: &Path) -> Result<bool> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert_path.exists() && key_path.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let key = KeyPair::generate().context("generate CA key")?;
    let cert = ca_params()?.self_signed(&key).context("self-sign CA")?;
    durable_write(&key_path, key.serialize_pem().as_bytes(), 0o600).context("write ca.key")?;
    durable_write(&cert_path, cert.pem().as_bytes(), 0o644).context("write ca.pem")?;
    Ok(true)
}

/// Issues an identity signed by the CA in `ca_dir` into `out_dir` (`ca.pem`, `cert.pem`,
/// `key.pem`). Node certificates name [`NODE_NAME`], `localhost` and the given addresses.
pub fn issue(ca_dir: &Path, out_dir: &Path, role: Role, ips: &[IpAddr]) -> Result<()> {
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).context("read ca.pem")?;
    let ca_key_pem = std::fs::read_to_string(ca_dir.join("ca.key")).context("read ca.key")?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("parse ca.key")?;
    let issuer = Issuer::new(ca_params()?, ca_key);

    let names: Vec<String> = match role {
        Role::Node => vec![NODE_NAME.into(), "localhost".into()],
        Role::Client => vec![CLIENT_NAME.into()],
    };
    let mut params = CertificateParams::new(names)?;
    if role == Role::Node {
        params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, if role == Role::Node { NODE_NAME } else { CLIENT_NAME });
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Node => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let key = KeyPair::generate().context("generate key")?;
    let cert = params.signed_by(&key, &issuer).context("sign certificate")?;

    std::fs::create_dir_all(out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    durable_write(&out_dir.join("key.pem"), key.serialize_pem().as_bytes(), 0o600).context("write key.pem")?;
    durable_write(&out_dir.join("cert.pem"), cert.pem().as_bytes(), 0o644).context("write cert.pem")?;
    durable_write(&out_dir.join("ca.pem"), ca_pem.as_bytes(), 0o644).context("write ca.pem")?;
    Ok(())
}

/// Whether a peer's leaf certificate (already verified against the cluster CA by the TLS
/// handshake) is a node certificate, i.e. names [`NODE_NAME`]. Services that only nodes may call
/// (Raft between masters, chunkserver registration and reports) check this: a client
/// certificate, naming [`CLIENT_NAME`], is refused there.
pub fn is_node_certificate(der: &[u8]) -> bool {
    let der = CertificateDer::from(der);
    let Ok(cert) = webpki::EndEntityCert::try_from(&der) else { return false };
    let name = rustls_pki_types::ServerName::try_from(NODE_NAME).expect("NODE_NAME is a valid DNS name");
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// A node's or client's credentials, loaded from an identity directory.
#[derive(Clone)]
pub struct Identity {
    pub dir: PathBuf,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Identity {
    pub fn load(dir: &Path) -> Result<Identity> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .with_context(|| format!("read TLS file {}", dir.join(name).display()))
        };
        Ok(Identity {
            dir: dir.to_path_buf(),
            ca_pem: read("ca.pem")?,
            cert_pem: read("cert.pem")?,
            key_pem: read("key.pem")?,
        })
    }

    fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.context("parse ca.pem")?).context("add CA certificate")?;
        }
        anyhow::ensure!(!roots.is_empty(), "ca.pem in {} holds no certificate", self.dir.display());
        Ok(roots)
    }

    fn chain(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("parse cert.pem")?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).context("parse key.pem")?;
        Ok((chain, key))
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn rustls_server(&self) -> Result<rustls::ServerConfig> {
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), Self::provider())
            .build()
            .context("client verifier")?;
        let (chain, key) = self.chain()?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .context("server certificate")?;
        cfg.alpn_protocols = vec![DATA_ALPN.to_vec()];
        Ok(cfg)
    }

    fn rustls_client(&self) -> Result<rustls::ClientConfig> {
        let (chain, key) = self.chain()?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)
            .context("client certificate")?;
        cfg.alpn_protocols = vec![DATA_ALPN.to_vec()];
        Ok(cfg)
    }

    /// QUIC server side (chunkservers): requires a client certificate signed by the cluster CA.
    pub fn quic_server(&self) -> Result<quinn::ServerConfig> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(self.rustls_server()?)?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(transport());
        Ok(cfg)
    }

    /// QUIC client side: checks the server's chain against the CA and that it names [`NODE_NAME`].
    pub fn quic_client(&self) -> Result<quinn::ClientConfig> {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(self.rustls_client()?)?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport());
        Ok(cfg)
    }

    /// gRPC server side (masters): mutual TLS against the cluster CA.
    pub fn grpc_server(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(false)
    }

    /// gRPC client side: the cluster CA as the only root, our certificate for client auth.
    pub fn grpc_client(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(NODE_NAME)
    }
}

/// Endpoint settings for every Cairn QUIC socket: datagrams up to 64 KB may be received, so that
/// MTU discovery (see [`transport`]) can use big packets where the path carries them.
///
/// A serving endpoint passes its identity and its node id (kept in its data directory): its
/// stateless-reset and connection-ID keys are then derived from both (the node's private key,
/// and the id so that nodes given one key still differ), so they stay the same across restarts.
/// A restarted node answers a packet of a connection its previous process had with a reset its
/// peers recognise (RFC 9000, 10.3), and they drop that connection at once instead of waiting
/// out the idle timeout while their requests on it go unanswered. Clients, which serve nothing,
/// keep random keys.
pub fn quic_endpoint_config(server: Option<(&Identity, u64)>) -> quinn::EndpointConfig {
    let mut cfg = quinn::EndpointConfig::default();
    if let Some((id, node)) = server {
        let material = format!("{}\n{node}", id.key_pem);
        let key = |context| blake3::derive_key(context, material.as_bytes());
        let reset = key("cairn 2026 QUIC stateless reset key");
        cfg.reset_key(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset)));
        // The new process must also take the old one's connection IDs as its own (they carry a
        // keyed hash), or it drops their packets without an answer.
        let cid = key("cairn 2026 QUIC connection ID key");
        let cid = u64::from_le_bytes(cid[..8].try_into().expect("8 of 32 bytes"));
        cfg.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid)));
    }
    cfg.max_udp_payload_size(65_527).expect("65527 is a valid UDP payload size");
    cfg
}

/// QUIC transport tuning for bulk chunk traffic: windows large enough for a 4 MiB chunk in flight
/// per stream on a fast link, and MTU discovery allowed to grow past 1500 bytes where the path
/// (loopback, jumbo-frame LANs) carries it.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(128 << 20));
    t.send_window(128 << 20);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(512));
    // A peer silent for 4 s is gone (a killed process sends no close): its connection closes,
    // and uploads on it fail over instead of waiting for their whole timeout. Keep-alives every
    // second keep idle but healthy connections open, far below the master's 10 s dead timeout.
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(4)).expect("4 s fits a QUIC idle timeout"),
    ));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(65_000);
    // UDP segmentation offload (GSO) is off unless CAIRN_QUIC_GSO=1. With it, once MTU discovery
    // finds large packets (loopback, jumbo frames), quinn 0.11 hands the kernel batches above
    // the 64 KiB a GSO send may carry; the kernel refuses them, QUIC counts the packets lost, and
    // its black-hole detector falls back to 1200-byte packets for good. Measured here on a
    // 1 GB put at replication 3 (dev cluster): GSO on, 1200-byte packets: 7.4 s put, 2.7 s get;
    // GSO off, 65000-byte packets: 4.4 s put, 1.4 s get. On a 1500-byte network GSO saves
    // send syscalls: set CAIRN_QUIC_GSO=1 there.
    if std::env::var("CAIRN_QUIC_GSO").map_or(true, |v| v != "1") {
        t.enable_segmentation_offload(false);
    }
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        assert!(init_ca(&ca).unwrap());
        assert!(!init_ca(&ca).unwrap(), "an existing CA is kept");
        issue(&ca, &dir.path().join("n1"), Role::Node, &["127.0.0.1".parse().unwrap()]).unwrap();
        issue(&ca, &dir.path().join("c"), Role::Client, &[]).unwrap();
        let node = Identity::load(&dir.path().join("n1")).unwrap();
        node.quic_server().unwrap();
        node.quic_client().unwrap();
        Identity::load(&dir.path().join("c")).unwrap().quic_client().unwrap();
        let leaf = |d: &str| {
            let pem = std::fs::read(dir.path().join(d).join("cert.pem")).unwrap();
            CertificateDer::pem_slice_iter(&pem).next().unwrap().unwrap().to_vec()
        };
        assert!(is_node_certificate(&leaf("n1")));
        assert!(!is_node_certificate(&leaf("c")), "a client certificate is not a node's");
        assert!(!is_node_certificate(b"garbage"));
    }
}
