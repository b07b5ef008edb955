//! Inode-addressed calls for the FUSE mount: lookups, attributes, directory pages, namespace
//! mutations by inode, and the chunk-level reads and uploads the mount's write-back cache uses.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_proto::v1::{self as pb, node_request, Attr, DirEntry, ExtentLocation};

use crate::{Client, Error, Result, LOCATION_WAIT};

impl Client {
    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Attr> {
        let name = name.to_string();
        let r = self
            .inner
            .masters
            .call(|mut c| {
                let req = pb::LookupRequest { parent, name: name.clone() };
                async move { c.lookup(req).await }
            })
            .await?;
        r.attr.ok_or_else(|| Error::Internal("lookup returned no attributes".into()))
    }

    pub async fn getattr(&self, inode: u64) -> Result<Attr> {
        let r = self.inner.masters.call(|mut c| async move { c.get_attr(pb::InodeRequest { inode }).await }).await?;
        r.attr.ok_or_else(|| Error::Internal("getattr returned no attributes".into()))
    }

    /// Every entry of the directory `inode`, all pages.
    pub async fn readdir(&self, inode: u64) -> Result<Vec<DirEntry>> {
        Ok(self.readdir_upto(inode, usize::MAX).await?.unwrap_or_default())
    }

    /// [`Client::readdir`] of a directory of at most `max` entries; `None` (after fetching
    /// only a little more than `max`) for a larger one.
    pub async fn readdir_upto(&self, inode: u64, max: usize) -> Result<Option<Vec<DirEntry>>> {
        let mut out = Vec::new();
        let mut start_after = String::new();
        loop {
            let s = start_after.clone();
            let r = self
                .inner
                .masters
                .call(|mut c| {
                    let req = pb::ReadDirRequest { inode, start_after: s.clone(), limit: crate::LIST_PAGE };
                    async move { c.read_dir(req).await }
                })
                .await?;
            if let Some(last) = r.entries.last() {
                start_after = last.name.clone();
            }
            out.extend(r.entries);
            if out.len() > max {
                return Ok(None);
            }
            if !r.more {
                return Ok(Some(out));
            }
        }
    }

    /// A regular file's attributes and extents with their replicas. After a master restart it
    /// waits (up to a bound) until every chunk has a known replica again.
    pub async fn open_inode(&self, inode: u64) -> Result<pb::OpenFileResponse> {
        let t0 = Instant::now();
        loop {
            let r =
                self.inner.masters.call(|mut c| async move { c.open_inode(pb::InodeRequest { inode }).await }).await?;
            match r.extents.iter().find(|e| e.replicas.is_empty()) {
                None => return Ok(r),
                Some(e) if t0.elapsed() > LOCATION_WAIT => {
                    return Err(Error::ChunkUnavailable {
                        hash: hex::encode(e.extent.as_ref().map(|x| x.hash.as_slice()).unwrap_or_default()),
                        reason: "no live replica is known".into(),
                    })
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    pub async fn xattrs(&self, inode: u64) -> Result<BTreeMap<String, Vec<u8>>> {
        let r = self.inner.masters.call(|mut c| async move { c.get_xattrs(pb::InodeRequest { inode }).await }).await?;
        Ok(r.xattrs)
    }

    /// One namespace mutation by inode. Returns the attributes of the node it made or changed
    /// (none for unlink, rename and xattr changes).
    pub async fn node(&self, op: node_request::Op) -> Result<Option<Attr>> {
        Ok(self.node_full(op).await?.attr)
    }

    /// [`Client::node`] with the whole answer: also the directories the change touched, as
    /// they were right after it.
    pub async fn node_full(&self, op: node_request::Op) -> Result<pb::StatResponse> {
        let (id, _waiting) = self.next_id();
        let req = pb::NodeRequest { op: Some(op), id };
        self.inner
            .masters
            .call(|mut c| {
                let req = req.clone();
                async move { c.node(req).await }
            })
            .await
    }

    /// Renews the session `keeper` of a mount with the leader (see `pb::UnlinkNode::keeper`);
    /// answers how long the leader waits for the next renewal.
    pub async fn keep_alive(&self, keeper: u64) -> Result<Duration> {
        let req = pb::KeepAliveRequest { keeper };
        let resp = self.inner.masters.call(|mut c| async move { c.keep_alive(req).await }).await?;
        Ok(Duration::from_millis(resp.grace_ms))
    }

    /// [`Client::node`] for operations that answer with attributes.
    pub async fn node_attr(&self, op: node_request::Op) -> Result<Attr> {
        self.node(op).await?.ok_or_else(|| Error::Internal("the master returned no attributes".into()))
    }

    /// Stores one chunk on `replication` chunkservers (unless the cluster holds it already) and
    /// returns its extent, ready to be committed, with the nodes that hold it (empty if the
    /// masters did not say).
    pub async fn upload(&self, chunk: Bytes, replication: u32) -> Result<ExtentLocation> {
        let (extent, replicas) = self.upload_chunk(chunk, replication).await?;
        Ok(ExtentLocation { extent: Some(extent), offset: 0, replicas })
    }

    /// Bytes `[from, to)` of one extent, from the first replica that serves them correctly. A
    /// whole chunk is verified against its hash here; a range by the chunkserver.
    pub async fn read_extent(&self, loc: &ExtentLocation, from: u64, to: u64) -> Result<Bytes> {
        let ext = loc.extent.as_ref().ok_or_else(|| Error::Internal("extent location without extent".into()))?;
        self.read_piece(&loc.replicas, ext, from, to).await
    }
}
