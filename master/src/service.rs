//! The gRPC services of a master: `Master` for clients, `Cluster` for chunkservers, `Raft` for
//! peers. Handlers validate input at the boundary, read from the state machine or propose a
//! command, and translate errors once (`MetaError` -> `tonic::Status`).

use std::sync::Arc;
use std::time::Instant;

use cairn_proto::v1::{self as pb, cluster_server, command, command_result, master_server, raft_server};
use protobuf::Message as _;
use tonic::{Request, Response, Status};

use crate::cluster::{to_hash, Cluster};
use crate::error::MetaError;
use crate::node::Node;
use crate::state::{check_extents, split_path, State};

const LIST_PAGE_DEFAULT: usize = 1000;
const LIST_PAGE_MAX: usize = 10_000;
const PLACE_MAX_CHUNKS: usize = 1024;
const MAX_REPLICATION: u32 = 16;

#[derive(Clone)]
pub struct Services {
    pub node: Node,
    pub state: State,
    pub cluster: Arc<Cluster>,
}

type Res<T> = Result<Response<T>, Status>;

/// Refuses callers that are not cluster nodes: the Raft and Cluster services change the group's
/// log and the chunk map, which a client certificate must not reach.
fn require_node<T>(req: &Request<T>) -> Result<(), Status> {
    let node = req
        .peer_certs()
        .and_then(|certs| certs.first().map(|leaf| cairn_common::tls::is_node_certificate(leaf.as_ref())))
        .unwrap_or(false);
    if node {
        Ok(())
    } else {
        Err(Status::permission_denied("only cluster nodes may call this service"))
    }
}

fn attr_of(r: command_result::Result) -> Result<pb::Attr, MetaError> {
    match r {
        command_result::Result::Attr(a) => Ok(a),
        _ => Err(MetaError::Internal(anyhow::anyhow!("command returned no attributes"))),
    }
}

fn check_replication(r: u32) -> Result<(), MetaError> {
    if r == 0 || r > MAX_REPLICATION {
        return Err(MetaError::InvalidArgument(format!("replication {r}: must be 1 to {MAX_REPLICATION}")));
    }
    Ok(())
}

#[tonic::async_trait]
impl master_server::Master for Services {
    async fn stat(&self, req: Request<pb::StatRequest>) -> Res<pb::StatResponse> {
        self.node.ensure_leader()?;
        let attr = self.state.reader()?.stat(&req.into_inner().path)?;
        Ok(Response::new(pb::StatResponse { attr: Some(attr) }))
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Res<pb::ListResponse> {
        self.node.ensure_leader()?;
        let req = req.into_inner();
        let limit = match req.limit as usize {
            0 => LIST_PAGE_DEFAULT,
            n => n.min(LIST_PAGE_MAX),
        };
        let (attr, entries, more) = self.state.reader()?.list(&req.path, &req.start_after, limit)?;
        Ok(Response::new(pb::ListResponse { entries, more, attr: Some(attr) }))
    }

    async fn mkdir(&self, req: Request<pb::MkdirRequest>) -> Res<pb::MkdirResponse> {
        let req = req.into_inner();
        split_path(&req.path)?;
        let attr = attr_of(self.node.propose(command::Op::Mkdir(req)).await?)?;
        Ok(Response::new(pb::MkdirResponse { attr: Some(attr) }))
    }

    async fn rename(&self, req: Request<pb::RenameRequest>) -> Res<pb::RenameResponse> {
        let req = req.into_inner();
        split_path(&req.src)?;
        split_path(&req.dst)?;
        self.node.propose(command::Op::Rename(req)).await?;
        Ok(Response::new(pb::RenameResponse {}))
    }

    async fn remove(&self, req: Request<pb::RemoveRequest>) -> Res<pb::RemoveResponse> {
        let req = req.into_inner();
        split_path(&req.path)?;
        self.node.propose(command::Op::Remove(req)).await?;
        Ok(Response::new(pb::RemoveResponse {}))
    }

    async fn place_chunks(&self, req: Request<pb::PlaceChunksRequest>) -> Res<pb::PlaceChunksResponse> {
        self.node.ensure_leader()?;
        let req = req.into_inner();
        check_replication(req.replication)?;
        if req.chunks.len() > PLACE_MAX_CHUNKS {
            return Err(MetaError::InvalidArgument(format!(
                "{} chunks in one request, at most {PLACE_MAX_CHUNKS}",
                req.chunks.len()
            ))
            .into());
        }
        let mut chunks = Vec::with_capacity(req.chunks.len());
        for c in &req.chunks {
            let hash =
                to_hash(&c.hash).ok_or_else(|| MetaError::InvalidArgument("chunk hash is not 32 bytes".into()))?;
            if c.length == 0 || c.length > cairn_proto::MAX_CHUNK {
                return Err(MetaError::InvalidArgument(format!("chunk of {} bytes", c.length)).into());
            }
            chunks.push((hash, c.length));
        }
        let placements = self
            .cluster
            .place(&chunks, req.replication as usize, &req.exclude)?
            .into_iter()
            .map(|p| match p {
                None => pb::Placement { stored: true, targets: vec![] },
                Some(targets) => pb::Placement { stored: false, targets },
            })
            .collect();
        Ok(Response::new(pb::PlaceChunksResponse { placements }))
    }

    async fn commit_file(&self, req: Request<pb::CommitFileRequest>) -> Res<pb::CommitFileResponse> {
        self.node.ensure_leader()?;
        let req = req.into_inner();
        split_path(&req.path)?;
        check_replication(req.replication)?;
        check_extents(&req.extents)?;
        let hashes: Vec<_> = req.extents.iter().filter_map(|e| to_hash(&e.hash)).collect();
        self.cluster.confirm_commit(&hashes)?;
        let attr = attr_of(self.node.propose(command::Op::CommitFile(req)).await?)?;
        Ok(Response::new(pb::CommitFileResponse { attr: Some(attr) }))
    }

    async fn open_file(&self, req: Request<pb::OpenFileRequest>) -> Res<pb::OpenFileResponse> {
        self.node.ensure_leader()?;
        let inode = self.state.reader()?.open_file(&req.into_inner().path)?;
        let mut offset = 0;
        let extents = inode
            .extents
            .into_iter()
            .map(|e| {
                let replicas = to_hash(&e.hash).map(|h| self.cluster.replicas(&h)).unwrap_or_default();
                let loc = pb::ExtentLocation { offset, replicas, extent: Some(e) };
                offset += loc.extent.as_ref().map_or(0, |e| e.length);
                loc
            })
            .collect();
        Ok(Response::new(pb::OpenFileResponse { attr: inode.attr, extents }))
    }

    async fn report_bad_replica(&self, req: Request<pb::ReportBadReplicaRequest>) -> Res<pb::ReportBadReplicaResponse> {
        self.node.ensure_leader()?;
        let req = req.into_inner();
        let hash = to_hash(&req.hash).ok_or_else(|| MetaError::InvalidArgument("chunk hash is not 32 bytes".into()))?;
        tracing::warn!(chunk = %hex::encode(hash), node = req.chunkserver_id, reason = %req.reason, "client reported a bad replica");
        self.cluster.suspect_replica(&hash, req.chunkserver_id);
        Ok(Response::new(pb::ReportBadReplicaResponse {}))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Res<pb::StatusResponse> {
        self.node.ensure_leader()?;
        let me = self.node.status();
        let masters = self
            .node
            .peers()
            .iter()
            .map(|(&id, addr)| {
                if id == me.id {
                    pb::MasterStatus {
                        id,
                        addr: addr.clone(),
                        role: me.role.clone(),
                        term: me.term,
                        commit_index: me.commit_index,
                        applied_index: me.applied_index,
                        alive: true,
                    }
                } else {
                    pb::MasterStatus { id, addr: addr.clone(), role: "unknown".into(), ..Default::default() }
                }
            })
            .collect();
        let reader = self.state.reader()?;
        let mut health = pb::ChunkHealth::default();
        let now = Instant::now();
        reader.for_each_chunk(|hash, goal| {
            health.total += 1;
            let live = to_hash(hash).map_or(0, |h| self.cluster.live_count(&h, now));
            match live {
                0 => health.lost += 1,
                n if n < goal as usize => health.under_replicated += 1,
                n if n > goal as usize => health.over_replicated += 1,
                _ => {}
            }
        })?;
        Ok(Response::new(pb::StatusResponse {
            masters,
            chunkservers: self.cluster.status(),
            chunks: Some(health),
            files: reader.files()?,
            bytes: reader.bytes()?,
        }))
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for Services {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Res<pb::RegisterResponse> {
        require_node(&req)?;
        self.node.ensure_leader()?;
        let req = req.into_inner();
        if req.node_id == 0 {
            return Err(MetaError::InvalidArgument("chunkserver id 0".into()).into());
        }
        if req.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(
                MetaError::InvalidArgument(format!("chunkserver address {:?} is not host:port", req.addr)).into()
            );
        }
        let info = pb::ChunkserverInfo { id: req.node_id, addr: req.addr.clone(), zone: req.zone.clone() };
        let known = self.state.reader()?.chunkservers()?.into_iter().any(|c| c == info);
        if !known {
            self.node.propose(command::Op::RegisterChunkserver(info)).await?;
        }
        self.cluster.register(req.node_id, &req.addr, &req.zone, req.capacity_bytes, req.used_bytes);
        tracing::info!(node = req.node_id, addr = %req.addr, zone = %req.zone, "chunkserver registered");
        Ok(Response::new(pb::RegisterResponse {}))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Res<pb::HeartbeatResponse> {
        require_node(&req)?;
        self.node.ensure_leader()?;
        let r = req.into_inner();
        match self.cluster.heartbeat(r.node_id, r.capacity_bytes, r.used_bytes, r.chunks, &r.added, &r.removed) {
            Some(report_requested) => Ok(Response::new(pb::HeartbeatResponse { report_requested })),
            None => {
                Err(MetaError::NotFound(format!("chunkserver {} is not registered with this leader", r.node_id)).into())
            }
        }
    }

    async fn chunk_report(&self, req: Request<pb::ChunkReportRequest>) -> Res<pb::ChunkReportResponse> {
        require_node(&req)?;
        self.node.ensure_leader()?;
        let r = req.into_inner();
        self.cluster.report_page(r.node_id, r.report_id, &r.hashes, r.last)?;
        Ok(Response::new(pb::ChunkReportResponse {}))
    }
}

#[tonic::async_trait]
impl raft_server::Raft for Services {
    async fn send(&self, req: Request<pb::RaftMessage>) -> Res<pb::RaftAck> {
        require_node(&req)?;
        let msg = raft::eraftpb::Message::parse_from_bytes(&req.into_inner().message)
            .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))?;
        self.node.step(msg);
        Ok(Response::new(pb::RaftAck {}))
    }
}
