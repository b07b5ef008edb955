//! The gRPC services of a master: `Master` for clients, `Cluster` for chunkservers, `Raft` for
//! peers. Handlers validate input at the boundary, read from the state machine or propose a
//! command, and translate errors once (`MetaError` -> `tonic::Status`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_proto::v1::{self as pb, cluster_server, command, command_result, master_server, raft_server};
use protobuf::Message as _;
use tonic::{Request, Response, Status, Streaming};

use crate::cluster::{to_hash, ChunkHash, Cluster};
use crate::error::MetaError;
use crate::metrics::Metrics;
use crate::node::{Node, RaftStatus};
use crate::state::{check_extents, split_path, State};

const LIST_PAGE_DEFAULT: usize = 1000;
const LIST_PAGE_MAX: usize = 10_000;
const PLACE_MAX_CHUNKS: usize = 1024;
/// Files in one CommitFiles call, at most.
const COMMIT_MAX_FILES: usize = 256;
const MAX_REPLICATION: u32 = 16;
/// How long status waits for each other master to describe itself.
const DESCRIBE_TIMEOUT: Duration = Duration::from_millis(500);

/// A new S3 access key id: "CK" and 18 characters of the base32 alphabet, as AWS key ids look.
fn new_access_key_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut rng = rand::rng();
    let mut id = String::from("CK");
    id.extend((0..18).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char));
    id
}

/// A new secret access key: 40 random alphanumeric characters (about 238 bits) from a
/// cryptographically secure generator seeded by the operating system.
fn new_secret_key() -> String {
    use rand::Rng;
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(40).map(char::from).collect()
}

#[derive(Clone)]
pub struct Services {
    pub node: Node,
    pub state: State,
    pub cluster: Arc<Cluster>,
    pub identity: cairn_common::tls::Identity,
    pub metrics: Arc<Metrics>,
}

/// Chunk health as the leader sees it: one pass over every referenced chunk (callers bound how
/// often), plus the repair and deletion queues and the repair limits.
pub(crate) fn chunk_health(state: &State, cluster: &Cluster) -> Result<pb::ChunkHealth, MetaError> {
    chunk_health_and_drains(state, cluster, None)
}

/// [`chunk_health`], and for each draining node the referenced chunks it still holds.
fn chunk_health_and_drains(
    state: &State,
    cluster: &Cluster,
    mut to_move: Option<&mut std::collections::HashMap<u64, u64>>,
) -> Result<pb::ChunkHealth, MetaError> {
    let reader = state.reader()?;
    let mut health = pb::ChunkHealth::default();
    let now = Instant::now();
    // A new leader that has not heard from every chunkserver declares nothing missing yet.
    let settled = cluster.settled(now);
    if !cluster.any_draining() {
        to_move = None;
    }
    reader.for_each_chunk(|hash, goal| {
        health.total += 1;
        if let (Some(m), Some(h)) = (to_move.as_deref_mut(), to_hash(hash)) {
            for id in cluster.draining_holders(&h) {
                *m.entry(id).or_default() += 1;
            }
        }
        if !settled {
            return;
        }
        let live = to_hash(hash).map_or(0, |h| cluster.live_count(&h, now));
        if health.by_replicas.len() <= live {
            health.by_replicas.resize(live + 1, 0);
        }
        health.by_replicas[live] += 1;
        match live {
            0 => health.lost += 1,
            n if n < goal as usize => health.under_replicated += 1,
            n if n > goal as usize => health.over_replicated += 1,
            _ => {}
        }
    })?;
    health.repair_queue = cluster.repair_queue();
    (health.gc_backlog, health.trim_queue) = cluster.delete_backlog();
    health.repair_bytes_per_s = cluster.repair_rate();
    health.repair_limits = Some(reader.repair_limits()?);
    Ok(health)
}

fn describe(s: &RaftStatus, addr: String) -> pb::MasterStatus {
    pb::MasterStatus {
        id: s.id,
        addr,
        role: if s.role.is_empty() { "follower".into() } else { s.role.clone() },
        term: s.term,
        commit_index: s.commit_index,
        applied_index: s.applied_index,
        alive: true,
        matched_index: s.matched.get(&s.id).copied().unwrap_or(0),
    }
}

impl Services {
    /// Checks a commit and proposes it once its chunks are confirmed stored (see
    /// [`crate::cluster::Cluster::confirm_commit`]); the receiver gets the applied answer.
    fn propose_commit(&self, req: pb::CommitFileRequest) -> Result<Answer, MetaError> {
        split_path(&req.path)?;
        check_replication(req.replication)?;
        check_extents(&req.extents)?;
        let hashes: Vec<_> = req.extents.iter().filter_map(|e| to_hash(&e.hash)).collect();
        self.cluster.confirm_commit(&hashes, || self.node.propose_nowait(command::Op::CommitFile(req)))
    }

    /// Runs one unary (or snapshot) gRPC handler, counting it by method and outcome and timing it.
    async fn rpc<T>(&self, method: &'static str, call: impl Future<Output = Res<T>>) -> Res<T> {
        let start = Instant::now();
        let res = call.await;
        self.metrics.grpc(method, res.as_ref().err().map_or(tonic::Code::Ok, Status::code), Some(start.elapsed()));
        res
    }

    /// Every member of the group as it describes itself (asked in parallel, each within
    /// DESCRIBE_TIMEOUT), with the leader's view of its log.
    async fn masters(&self) -> Vec<pb::MasterStatus> {
        let me = self.node.status();
        let asks = self.node.peers().into_iter().map(|(id, addr)| {
            let me = &me;
            async move {
                let matched = me.matched.get(&id).copied().unwrap_or(0);
                if id == me.id {
                    return pb::MasterStatus { matched_index: matched, ..describe(me, addr) };
                }
                let asked = tokio::time::timeout(DESCRIBE_TIMEOUT, async {
                    let ep = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
                        .map_err(|e| e.to_string())?
                        .tls_config(self.identity.grpc_client())
                        .map_err(|e| e.to_string())?;
                    let ch =
                        ep.connect_with_connector(cairn_common::net::GrpcConnector).await.map_err(|e| e.to_string())?;
                    pb::raft_client::RaftClient::new(ch)
                        .describe(pb::DescribeRequest {})
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|e| e.to_string())
                })
                .await;
                match asked {
                    Ok(Ok(s)) => pb::MasterStatus { id, addr, matched_index: matched, alive: true, ..s },
                    _ => pb::MasterStatus {
                        id,
                        addr,
                        role: "unreachable".into(),
                        matched_index: matched,
                        ..Default::default()
                    },
                }
            }
        });
        futures::future::join_all(asks).await
    }
}

type Res<T> = Result<Response<T>, Status>;
/// The applied answer to a proposal, when it comes.
type Answer = tokio::sync::oneshot::Receiver<Result<command_result::Result, MetaError>>;

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

impl Services {
    /// A file's extents with the live replicas of each chunk.
    fn locate(&self, inode: pb::Inode) -> Result<pb::OpenFileResponse, MetaError> {
        let settled = self.cluster.settled(Instant::now());
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
            .collect::<Vec<_>>();
        if !settled && extents.iter().any(|e| e.replicas.is_empty()) {
            return Err(MetaError::Unavailable("a new leader is waiting for chunkservers to report".into()));
        }
        Ok(pb::OpenFileResponse { attr: inode.attr, extents, xattrs: inode.xattrs })
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
        self.rpc("Stat", async {
            self.node.read_barrier().await?;
            let attr = self.state.reader()?.stat(&req.into_inner().path)?;
            Ok(Response::new(pb::StatResponse { attr: Some(attr), ..Default::default() }))
        })
        .await
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Res<pb::ListResponse> {
        self.rpc("List", async {
            self.node.read_barrier().await?;
            let req = req.into_inner();
            let limit = match req.limit as usize {
                0 => LIST_PAGE_DEFAULT,
                n => n.min(LIST_PAGE_MAX),
            };
            let (attr, entries, more) = self.state.reader()?.list(&req.path, &req.start_after, limit, req.xattrs)?;
            Ok(Response::new(pb::ListResponse { entries, more, attr: Some(attr) }))
        })
        .await
    }

    async fn mkdir(&self, req: Request<pb::MkdirRequest>) -> Res<pb::MkdirResponse> {
        self.rpc("Mkdir", async {
            let req = req.into_inner();
            split_path(&req.path)?;
            let attr = attr_of(self.node.propose(command::Op::Mkdir(req)).await?)?;
            Ok(Response::new(pb::MkdirResponse { attr: Some(attr) }))
        })
        .await
    }

    async fn rename(&self, req: Request<pb::RenameRequest>) -> Res<pb::RenameResponse> {
        self.rpc("Rename", async {
            let req = req.into_inner();
            split_path(&req.src)?;
            split_path(&req.dst)?;
            self.node.propose(command::Op::Rename(req)).await?;
            Ok(Response::new(pb::RenameResponse {}))
        })
        .await
    }

    async fn remove(&self, req: Request<pb::RemoveRequest>) -> Res<pb::RemoveResponse> {
        self.rpc("Remove", async {
            let req = req.into_inner();
            split_path(&req.path)?;
            self.node.propose(command::Op::Remove(req)).await?;
            Ok(Response::new(pb::RemoveResponse {}))
        })
        .await
    }

    async fn place_chunks(&self, req: Request<pb::PlaceChunksRequest>) -> Res<pb::PlaceChunksResponse> {
        self.rpc("PlaceChunks", async {
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
            let placed = self.cluster.place(&chunks, req.replication as usize, &req.exclude)?;
            // A stored chunk's holders let the client read it back before it commits.
            let stored: Vec<ChunkHash> =
                chunks.iter().zip(&placed).filter(|(_, p)| p.is_none()).map(|((h, _), _)| *h).collect();
            let mut holders = self.cluster.holders(&stored).into_iter();
            let placements = placed
                .into_iter()
                .map(|p| match p {
                    None => pb::Placement { stored: true, targets: holders.next().unwrap_or_default() },
                    Some(targets) => pb::Placement { stored: false, targets },
                })
                .collect();
            Ok(Response::new(pb::PlaceChunksResponse { placements }))
        })
        .await
    }

    async fn commit_file(&self, req: Request<pb::CommitFileRequest>) -> Res<pb::CommitFileResponse> {
        self.rpc("CommitFile", async {
            self.node.ensure_leader()?;
            let answer = self.propose_commit(req.into_inner())?;
            let attr = attr_of(self.node.answer(answer).await?)?;
            Ok(Response::new(pb::CommitFileResponse { attr: Some(attr) }))
        })
        .await
    }

    async fn commit_files(&self, req: Request<pb::CommitFilesRequest>) -> Res<pb::CommitFilesResponse> {
        self.rpc("CommitFiles", async {
            self.node.ensure_leader()?;
            let files = req.into_inner().files;
            if files.len() > COMMIT_MAX_FILES {
                return Err(MetaError::InvalidArgument(format!(
                    "{} files in one request, at most {COMMIT_MAX_FILES}",
                    files.len()
                ))
                .into());
            }
            // Proposed one by one, all before the first answer: Raft batches them. A file that
            // fails has no attr in its outcome; the client asks again for that one alone.
            let answers: Vec<_> = files.into_iter().map(|f| self.propose_commit(f)).collect();
            let mut outcomes = Vec::with_capacity(answers.len());
            for answer in answers {
                let attr = match answer {
                    Ok(rx) => self.node.answer(rx).await.and_then(attr_of).ok(),
                    Err(_) => None,
                };
                outcomes.push(pb::CommitFileResponse { attr });
            }
            Ok(Response::new(pb::CommitFilesResponse { outcomes }))
        })
        .await
    }

    async fn open_file(&self, req: Request<pb::OpenFileRequest>) -> Res<pb::OpenFileResponse> {
        self.rpc("OpenFile", async {
            self.node.read_barrier().await?;
            let inode = self.state.reader()?.open_file(&req.into_inner().path)?;
            Ok(Response::new(self.locate(inode)?))
        })
        .await
    }

    async fn lookup(&self, req: Request<pb::LookupRequest>) -> Res<pb::StatResponse> {
        self.rpc("Lookup", async {
            self.node.read_barrier().await?;
            let req = req.into_inner();
            let attr = self.state.reader()?.lookup(req.parent, &req.name)?;
            Ok(Response::new(pb::StatResponse { attr: Some(attr), ..Default::default() }))
        })
        .await
    }

    async fn get_attr(&self, req: Request<pb::InodeRequest>) -> Res<pb::StatResponse> {
        self.rpc("GetAttr", async {
            self.node.read_barrier().await?;
            let attr = self.state.reader()?.getattr(req.into_inner().inode)?;
            Ok(Response::new(pb::StatResponse { attr: Some(attr), ..Default::default() }))
        })
        .await
    }

    async fn read_dir(&self, req: Request<pb::ReadDirRequest>) -> Res<pb::ListResponse> {
        self.rpc("ReadDir", async {
            self.node.read_barrier().await?;
            let req = req.into_inner();
            let limit = match req.limit as usize {
                0 => LIST_PAGE_DEFAULT,
                n => n.min(LIST_PAGE_MAX),
            };
            let (attr, entries, more) = self.state.reader()?.readdir(req.inode, &req.start_after, limit)?;
            Ok(Response::new(pb::ListResponse { entries, more, attr: Some(attr) }))
        })
        .await
    }

    async fn open_inode(&self, req: Request<pb::InodeRequest>) -> Res<pb::OpenFileResponse> {
        self.rpc("OpenInode", async {
            self.node.read_barrier().await?;
            let inode = self.state.reader()?.open_inode(req.into_inner().inode)?;
            Ok(Response::new(self.locate(inode)?))
        })
        .await
    }

    async fn get_xattrs(&self, req: Request<pb::InodeRequest>) -> Res<pb::XattrsResponse> {
        self.rpc("GetXattrs", async {
            self.node.read_barrier().await?;
            let xattrs = self.state.reader()?.xattrs(req.into_inner().inode)?;
            Ok(Response::new(pb::XattrsResponse { xattrs }))
        })
        .await
    }

    async fn node(&self, req: Request<pb::NodeRequest>) -> Res<pb::StatResponse> {
        self.rpc("Node", async {
            self.node.ensure_leader()?;
            let req = req.into_inner();
            // A change that keeps a file for a mount is a sign of life of that mount's session.
            let keeper = match &req.op {
                Some(pb::node_request::Op::Unlink(u)) if u.keep => u.keeper,
                Some(pb::node_request::Op::Rename(r)) if r.keep => r.keeper,
                _ => 0,
            };
            if keeper != 0 {
                self.cluster.keep_alive(keeper, std::time::Instant::now());
            }
            let touched: Vec<u64> = match &req.op {
                Some(pb::node_request::Op::Make(m)) => vec![m.parent],
                Some(pb::node_request::Op::Link(l)) => vec![l.parent],
                Some(pb::node_request::Op::Unlink(u)) => vec![u.parent],
                Some(pb::node_request::Op::Rename(r)) if r.parent == r.new_parent => vec![r.parent],
                Some(pb::node_request::Op::Rename(r)) => vec![r.parent, r.new_parent],
                _ => vec![],
            };
            let result = match &req.op {
                Some(pb::node_request::Op::Commit(c)) => {
                    check_extents(&c.extents)?;
                    let hashes: Vec<_> = c.extents.iter().filter_map(|e| to_hash(&e.hash)).collect();
                    let answer =
                        self.cluster.confirm_commit(&hashes, || self.node.propose_nowait(command::Op::Node(req)))?;
                    self.node.answer(answer).await?
                }
                _ => self.node.propose(command::Op::Node(req)).await?,
            };
            let attr = match result {
                command_result::Result::Attr(a) => Some(a),
                _ => None,
            };
            // Applied here already: a read now sees the change (and perhaps later ones). Best
            // effort: the change is done whatever this read meets.
            let reader = if touched.is_empty() { None } else { self.state.reader().ok() };
            let parents = reader.map_or_else(Vec::new, |r| touched.iter().filter_map(|&i| r.getattr(i).ok()).collect());
            Ok(Response::new(pb::StatResponse { attr, parents }))
        })
        .await
    }

    async fn keep_alive(&self, req: Request<pb::KeepAliveRequest>) -> Res<pb::KeepAliveResponse> {
        self.rpc("KeepAlive", async {
            self.node.ensure_leader()?;
            self.cluster.keep_alive(req.into_inner().keeper, std::time::Instant::now());
            let grace_ms = u64::try_from(self.cluster.kept_grace().as_millis()).unwrap_or(u64::MAX);
            Ok(Response::new(pb::KeepAliveResponse { grace_ms }))
        })
        .await
    }

    async fn create_access_key(&self, req: Request<pb::CreateAccessKeyRequest>) -> Res<pb::AccessKey> {
        self.rpc("CreateAccessKey", async {
            self.node.ensure_leader()?;
            let req = req.into_inner();
            // The leader decides the key; a retry of the same request gets the first key back.
            let key = pb::AccessKey {
                id: new_access_key_id(),
                secret: new_secret_key(),
                created_ns: 0,
                description: req.description,
            };
            crate::state::check_access_key(&key)?;
            let change = pb::AccessKeyChange { op: Some(pb::access_key_change::Op::Create(key)), request: req.id };
            match self.node.propose(command::Op::AccessKey(change)).await? {
                command_result::Result::AccessKey(k) => Ok(Response::new(k)),
                _ => Err(MetaError::Internal(anyhow::anyhow!("unexpected answer to an access key change")).into()),
            }
        })
        .await
    }

    async fn list_access_keys(&self, _req: Request<pb::Empty>) -> Res<pb::AccessKeyList> {
        self.rpc("ListAccessKeys", async {
            self.node.read_barrier().await?;
            Ok(Response::new(pb::AccessKeyList { keys: self.state.reader()?.access_keys()? }))
        })
        .await
    }

    async fn get_access_key(&self, req: Request<pb::AccessKeyRequest>) -> Res<pb::AccessKey> {
        self.rpc("GetAccessKey", async {
            self.node.read_barrier().await?;
            Ok(Response::new(self.state.reader()?.access_key(&req.into_inner().id)?))
        })
        .await
    }

    async fn delete_access_key(&self, req: Request<pb::AccessKeyRequest>) -> Res<pb::Empty> {
        self.rpc("DeleteAccessKey", async {
            let req = req.into_inner();
            let change =
                pb::AccessKeyChange { op: Some(pb::access_key_change::Op::Delete(req.id)), request: req.request };
            self.node.propose(command::Op::AccessKey(change)).await?;
            Ok(Response::new(pb::Empty {}))
        })
        .await
    }

    async fn report_bad_replica(&self, req: Request<pb::ReportBadReplicaRequest>) -> Res<pb::ReportBadReplicaResponse> {
        self.rpc("ReportBadReplica", async {
            self.node.ensure_leader()?;
            let req = req.into_inner();
            let hash = to_hash(&req.hash).ok_or_else(|| MetaError::InvalidArgument("chunk hash is not 32 bytes".into()))?;
            tracing::warn!(chunk = %hex::encode(hash), node = req.chunkserver_id, reason = %req.reason, "client reported a bad replica");
            self.cluster.suspect_replica(&hash, req.chunkserver_id);
            Ok(Response::new(pb::ReportBadReplicaResponse {}))
        })
        .await
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Res<pb::StatusResponse> {
        self.rpc("Status", async {
            self.node.read_barrier().await?;
            let masters = self.masters().await;
            let mut to_move = std::collections::HashMap::new();
            let health = chunk_health_and_drains(&self.state, &self.cluster, Some(&mut to_move))?;
            let reader = self.state.reader()?;
            let mut chunkservers = self.cluster.status();
            // A new leader's locations are incomplete until every node reported: claim nothing moved.
            let settled = self.cluster.settled(Instant::now());
            for c in &mut chunkservers {
                c.to_move = to_move.get(&c.id).copied().unwrap_or(0);
                if c.state == "draining" && !settled {
                    c.to_move = c.to_move.max(c.chunks).max(1);
                }
            }
            Ok(Response::new(pb::StatusResponse {
                masters,
                chunkservers,
                chunks: Some(health),
                files: reader.files()?,
                bytes: reader.bytes()?,
            }))
        })
        .await
    }

    async fn change_membership(&self, req: Request<pb::ChangeMembershipRequest>) -> Res<pb::ChangeMembershipResponse> {
        self.rpc("ChangeMembership", async {
            let r = req.into_inner();
            let member = pb::MasterMember { id: r.id, addr: r.addr, removed: r.remove, request: r.request };
            self.node.change_membership(member).await?;
            tracing::info!(id = r.id, removed = r.remove, "master group membership changed");
            Ok(Response::new(pb::ChangeMembershipResponse { masters: self.masters().await }))
        })
        .await
    }

    async fn transfer_leader(&self, req: Request<pb::TransferLeaderRequest>) -> Res<pb::TransferLeaderResponse> {
        self.rpc("TransferLeader", async {
            self.node.ensure_leader()?;
            let leader = self.node.transfer_leader(req.into_inner().to).await?;
            Ok(Response::new(pb::TransferLeaderResponse { leader }))
        })
        .await
    }

    async fn drain(&self, req: Request<pb::DrainRequest>) -> Res<pb::DrainResponse> {
        self.rpc("Drain", async {
            self.node.ensure_leader()?;
            let req = req.into_inner();
            if req.forget && !self.cluster.is_dead(req.id) {
                return Err(MetaError::InvalidArgument(format!(
                    "chunkserver {} is running or unknown: drain it, stop it, and forget it once it shows as dead",
                    req.id
                ))
                .into());
            }
            self.node.propose(command::Op::Drain(req)).await?;
            tracing::info!(node = req.id, cancel = req.cancel, forget = req.forget, "drain");
            Ok(Response::new(pb::DrainResponse {}))
        })
        .await
    }

    async fn set_repair_limits(&self, req: Request<pb::SetRepairLimitsRequest>) -> Res<pb::RepairLimits> {
        self.rpc("SetRepairLimits", async {
            self.node.ensure_leader()?;
            let req = req.into_inner();
            crate::state::check_repair_limits(&req)?;
            match self.node.propose(command::Op::SetRepairLimits(req)).await? {
                command_result::Result::Limits(l) => {
                    self.cluster.set_limits(l);
                    Ok(Response::new(l))
                }
                _ => Err(MetaError::Internal(anyhow::anyhow!("unexpected answer to a repair limits change")).into()),
            }
        })
        .await
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for Services {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Res<pb::RegisterResponse> {
        self.rpc("Register", async {
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
            let known = self.state.reader()?.chunkservers()?.into_iter().find(|c| c.id == req.node_id);
            let info = pb::ChunkserverInfo {
                id: req.node_id,
                addr: req.addr.clone(),
                zone: req.zone.clone(),
                draining: known.as_ref().is_some_and(|c| c.draining),
            };
            if known.as_ref() != Some(&info) {
                self.node.propose(command::Op::RegisterChunkserver(info)).await?;
            }
            self.cluster.register(req.node_id, &req.addr, &req.zone, req.capacity_bytes, req.used_bytes);
            tracing::info!(node = req.node_id, addr = %req.addr, zone = %req.zone, "chunkserver registered");
            Ok(Response::new(pb::RegisterResponse {}))
        })
        .await
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Res<pb::HeartbeatResponse> {
        self.rpc("Heartbeat", async {
            require_node(&req)?;
            self.node.ensure_leader()?;
            let r = req.into_inner();
            match self.cluster.heartbeat(&r) {
                Some(resp) => {
                    self.metrics.heartbeat();
                    Ok(Response::new(resp))
                }
                None => {
                    let unknown = format!("chunkserver {} is not registered with this leader", r.node_id);
                    Err(MetaError::NotFound(unknown).into())
                }
            }
        })
        .await
    }

    async fn chunk_report(&self, req: Request<pb::ChunkReportRequest>) -> Res<pb::ChunkReportResponse> {
        self.rpc("ChunkReport", async {
            require_node(&req)?;
            self.node.ensure_leader()?;
            let r = req.into_inner();
            self.cluster.report_page(r.node_id, r.report_id, &r.hashes, r.last)?;
            Ok(Response::new(pb::ChunkReportResponse {}))
        })
        .await
    }
}

#[tonic::async_trait]
impl raft_server::Raft for Services {
    async fn stream(&self, req: Request<Streaming<pb::RaftMessage>>) -> Res<pb::RaftAck> {
        let res = async {
            require_node(&req)?;
            let mut stream = req.into_inner();
            while let Some(m) = stream.message().await? {
                let msg = raft::eraftpb::Message::parse_from_bytes(&m.message)
                    .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))?;
                self.node.step(msg, &m.from_addr);
            }
            Ok(Response::new(pb::RaftAck {}))
        }
        .await;
        // A peer's stream lasts as long as its connection: counted, not timed.
        self.metrics.grpc("Stream", res.as_ref().err().map_or(tonic::Code::Ok, Status::code), None);
        res
    }

    async fn install_snapshot(&self, req: Request<Streaming<pb::SnapshotChunk>>) -> Res<pb::RaftAck> {
        self.rpc("InstallSnapshot", async {
            require_node(&req)?;
            let mut stream = req.into_inner();
            let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
            let msg = raft::eraftpb::Message::parse_from_bytes(&first.message)
                .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))?;
            if msg.get_msg_type() != raft::eraftpb::MessageType::MsgSnapshot {
                return Err(Status::invalid_argument("a snapshot stream must start with a snapshot message"));
            }
            let internal = |e: anyhow::Error| Status::internal(format!("stage snapshot: {e:#}"));
            let mut file = crate::transport::SnapshotFile::create(self.node.snapshot_dir()).map_err(internal)?;
            crate::transport::receive_snapshot(&first, &mut stream, &mut file).await?;
            let path = file.finish().map_err(internal)?;
            if !first.from_addr.is_empty() {
                self.node.step_learn(msg.from, &first.from_addr);
            }
            self.node.install_snapshot(msg, path).await?;
            Ok(Response::new(pb::RaftAck {}))
        })
        .await
    }

    async fn describe(&self, req: Request<pb::DescribeRequest>) -> Res<pb::MasterStatus> {
        self.rpc("Describe", async {
            require_node(&req)?;
            let s = self.node.status();
            let addr = self.node.peers().get(&s.id).cloned().unwrap_or_default();
            Ok(Response::new(describe(&s, addr)))
        })
        .await
    }
}
