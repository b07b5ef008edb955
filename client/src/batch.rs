//! Requests of concurrent uploads to the leader, sent together.
//!
//! Every chunk asks the leader where to go (and whether the cluster holds it already) before it
//! is uploaded, and every file then commits its extents: with many small files in flight, two
//! gRPC calls per file, each as costly for the leader as the work it asks for. Instead, while
//! one call of a kind is in flight, the requests that arrive queue up, and the next call
//! carries them all (the leader still handles each one on its own: placements counted one after
//! the other, commits proposed one by one and batched by Raft). A request alone goes out at
//! once; nothing waits for a timer. A request whose batch failed is sent again alone, so that
//! it gets its own answer (or error) exactly as without batching; commits carry their request
//! id, so a commit that did land is not applied twice.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_proto::v1 as pb;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::Inner;

/// How long a queued request waits for its batch before it goes alone. A call normally takes
/// milliseconds; one that the leader keeps refusing (a chunk being collected, a leader change)
/// is retried until the client's deadline, and must not hold the others that long.
const WAIT_MAX: Duration = Duration::from_secs(1);

/// One kind of request that a call can carry several of.
pub(crate) trait Kind: Send + Sync + Sized + 'static {
    /// Requests with equal keys can share a call.
    type Key: Clone + Default + PartialEq + Send + Sync;
    type Item: Clone + Send + Sync;
    type Answer: Send;
    /// Requests in one call, at most.
    const MAX: usize;

    fn queue(inner: &Inner) -> &Batcher<Self>;
    /// One request in a call of its own, with its own answer or error.
    fn one(inner: &Inner, key: &Self::Key, item: Self::Item) -> impl Future<Output = Result<Self::Answer>> + Send;
    /// Several in one call; `None` for a request that must be sent again alone.
    fn many(
        inner: &Inner,
        key: &Self::Key,
        items: Vec<Self::Item>,
    ) -> impl Future<Output = Result<Vec<Option<Self::Answer>>>> + Send;
}

type Waiting<K> = (<K as Kind>::Key, <K as Kind>::Item, oneshot::Sender<Option<<K as Kind>::Answer>>);

pub(crate) struct Batcher<K: Kind> {
    state: Mutex<State<K>>,
}

struct State<K: Kind> {
    /// A call is in flight: new requests queue.
    busy: bool,
    queue: Vec<Waiting<K>>,
}

impl<K: Kind> Default for Batcher<K> {
    fn default() -> Self {
        Batcher { state: Mutex::new(State { busy: false, queue: Vec::new() }) }
    }
}

/// Sends `item` now, or with the next call of its kind if one is in flight.
pub(crate) async fn send<K: Kind>(inner: &Arc<Inner>, key: K::Key, item: K::Item) -> Result<K::Answer> {
    let queued = {
        let mut st = K::queue(inner).state.lock().expect("batch lock");
        if st.busy {
            let (reply, answer) = oneshot::channel();
            st.queue.push((key.clone(), item.clone(), reply));
            Some(answer)
        } else {
            st.busy = true;
            None
        }
    };
    if let Some(answer) = queued {
        if let Ok(Ok(Some(a))) = tokio::time::timeout(WAIT_MAX, answer).await {
            return Ok(a);
        }
        // Alone now. If the batch did send it meanwhile, the leader answers this copy the same:
        // a placement twice is harmless, a commit's request id makes the second a retry.
        return K::one(inner, &key, item).await;
    }
    // Hands over when this call is done, or when its caller gives up on it (a dropped future
    // must not leave the others queued for ever).
    let sending = Sending::<K> { inner: inner.clone(), kind: std::marker::PhantomData };
    let mine = K::one(inner, &key, item).await;
    drop(sending);
    mine
}

/// The request in flight: when it ends, whatever queued meanwhile goes next, in calls of its
/// own until the queue is empty, while this request's caller goes on.
struct Sending<K: Kind> {
    inner: Arc<Inner>,
    kind: std::marker::PhantomData<K>,
}

impl<K: Kind> Drop for Sending<K> {
    fn drop(&mut self) {
        let mut st = K::queue(&self.inner).state.lock().unwrap_or_else(|p| p.into_inner());
        if st.queue.is_empty() {
            st.busy = false;
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let inner = self.inner.clone();
                rt.spawn(async move { drain::<K>(&inner).await });
            }
            Err(_) => {
                // No runtime to send them from: each waiter sends its own.
                st.queue.clear();
                st.busy = false;
            }
        }
    }
}

async fn drain<K: Kind>(inner: &Inner) {
    loop {
        let (key, batch) = {
            let mut st = K::queue(inner).state.lock().expect("batch lock");
            if st.queue.is_empty() {
                st.busy = false;
                return;
            }
            take_batch::<K>(&mut st.queue)
        };
        if batch.is_empty() {
            continue;
        }
        let items = batch.iter().map(|(_, item, _)| item.clone()).collect();
        let mut answers = match K::many(inner, &key, items).await {
            Ok(a) if a.len() == batch.len() => a,
            Ok(_) | Err(_) => Vec::new(),
        };
        answers.resize_with(batch.len(), || None);
        for ((_, _, reply), answer) in batch.into_iter().zip(answers) {
            let _ = reply.send(answer);
        }
    }
}

/// Takes up to [`Kind::MAX`] requests with the key of the oldest one, in order. Requests
/// whose caller stopped waiting are dropped: a commit given up on must not land later.
fn take_batch<K: Kind>(queue: &mut Vec<Waiting<K>>) -> (K::Key, Vec<Waiting<K>>) {
    queue.retain(|w| !w.2.is_closed());
    let Some(first) = queue.first() else { return (Default::default(), Vec::new()) };
    let key = first.0.clone();
    let mut batch = Vec::new();
    let mut rest = Vec::with_capacity(queue.len());
    for w in queue.drain(..) {
        if w.0 == key && batch.len() < K::MAX {
            batch.push(w);
        } else {
            rest.push(w);
        }
    }
    *queue = rest;
    (key, batch)
}

/// Where new chunks go: `PlaceChunks`, keyed by replication and the nodes to avoid.
pub(crate) struct Place;

impl Kind for Place {
    type Key = (u32, Vec<u64>);
    type Item = pb::ChunkSpec;
    type Answer = pb::Placement;
    const MAX: usize = 256;

    fn queue(inner: &Inner) -> &Batcher<Self> {
        &inner.places
    }

    async fn one(inner: &Inner, key: &Self::Key, item: pb::ChunkSpec) -> Result<pb::Placement> {
        let mut p = place(inner, key, vec![item]).await?;
        Ok(p.remove(0))
    }

    async fn many(inner: &Inner, key: &Self::Key, items: Vec<pb::ChunkSpec>) -> Result<Vec<Option<pb::Placement>>> {
        Ok(place(inner, key, items).await?.into_iter().map(Some).collect())
    }
}

async fn place(inner: &Inner, key: &(u32, Vec<u64>), chunks: Vec<pb::ChunkSpec>) -> Result<Vec<pb::Placement>> {
    let n = chunks.len();
    let req = pb::PlaceChunksRequest { chunks, replication: key.0, exclude: key.1.clone() };
    let r = inner
        .masters
        .call(|mut c| {
            let req = req.clone();
            async move { c.place_chunks(req).await }
        })
        .await?;
    if r.placements.len() != n {
        return Err(Error::Internal(format!("{} placements for {n} chunks", r.placements.len())));
    }
    Ok(r.placements)
}

/// File commits: `CommitFile` alone, `CommitFiles` for several.
pub(crate) struct Commit;

impl Kind for Commit {
    type Key = ();
    type Item = pb::CommitFileRequest;
    type Answer = pb::Attr;
    /// The leader takes up to 256 (`COMMIT_MAX_FILES`).
    const MAX: usize = 128;

    fn queue(inner: &Inner) -> &Batcher<Self> {
        &inner.commits
    }

    async fn one(inner: &Inner, _: &(), req: pb::CommitFileRequest) -> Result<pb::Attr> {
        let r = inner
            .masters
            .call(|mut c| {
                let req = req.clone();
                async move { c.commit_file(req).await }
            })
            .await?;
        r.attr.ok_or_else(|| Error::Internal("commit returned no attributes".into()))
    }

    async fn many(inner: &Inner, _: &(), files: Vec<pb::CommitFileRequest>) -> Result<Vec<Option<pb::Attr>>> {
        let req = pb::CommitFilesRequest { files };
        let r = inner
            .masters
            .call(|mut c| {
                let req = req.clone();
                async move { c.commit_files(req).await }
            })
            .await?;
        Ok(r.outcomes.into_iter().map(|o| o.attr).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Answer = oneshot::Receiver<Option<pb::Placement>>;

    fn waiting(key: (u32, Vec<u64>), n: u8, answers: &mut Vec<Answer>) -> Waiting<Place> {
        let (reply, answer) = oneshot::channel();
        answers.push(answer);
        (key, pb::ChunkSpec { hash: vec![n], length: 1 }, reply)
    }

    #[test]
    fn a_batch_takes_the_oldest_key_in_order_and_leaves_the_rest() {
        let mut a = Vec::new();
        let mut q = vec![
            waiting((3, vec![]), 1, &mut a),
            waiting((2, vec![]), 2, &mut a),
            waiting((3, vec![]), 3, &mut a),
            waiting((3, vec![9]), 4, &mut a),
        ];
        let (key, batch) = take_batch::<Place>(&mut q);
        assert_eq!(key, (3, vec![]));
        assert_eq!(batch.iter().map(|w| w.1.hash[0]).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(q.iter().map(|w| w.1.hash[0]).collect::<Vec<_>>(), [2, 4]);
        let mut q: Vec<_> = (0..=255u8).chain(0..10).map(|i| waiting((3, vec![]), i, &mut a)).collect();
        assert_eq!(take_batch::<Place>(&mut q).1.len(), Place::MAX);
        assert_eq!(q.len(), 10);
    }

    #[test]
    fn requests_given_up_on_are_not_sent() {
        let mut a = Vec::new();
        let mut q =
            vec![waiting((3, vec![]), 1, &mut a), waiting((3, vec![]), 2, &mut a), waiting((3, vec![]), 3, &mut a)];
        a.remove(1); // the caller of request 2 stopped waiting
        let (_, batch) = take_batch::<Place>(&mut q);
        assert_eq!(batch.iter().map(|w| w.1.hash[0]).collect::<Vec<_>>(), [1, 3]);
        a.clear();
        let mut q = vec![waiting((3, vec![]), 4, &mut a)];
        a.clear();
        assert!(take_batch::<Place>(&mut q).1.is_empty());
        assert!(q.is_empty());
    }
}
