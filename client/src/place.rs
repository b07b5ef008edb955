//! Placement requests of concurrent uploads, sent together.
//!
//! Every chunk asks the leader where to go (and whether the cluster holds it already) before it
//! is uploaded. With many small files in flight that is one gRPC call per file, as costly for
//! the leader as the commit that follows. Instead, while one `PlaceChunks` call is in flight,
//! the requests that arrive queue up, and the next call carries them all (the leader places
//! each chunk of a call in turn, counting the earlier ones). A request alone goes out at once:
//! nothing waits for a timer.

use std::sync::{Arc, Mutex};

use cairn_proto::v1 as pb;
use tokio::sync::oneshot;

use crate::error::Result;
use crate::master::Masters;
use crate::Inner;

/// Chunks in one call, at most (the leader takes up to 1,024).
const MAX_BATCH: usize = 256;

struct Waiting {
    spec: pb::ChunkSpec,
    /// `None`: the batch failed; ask alone, to get this chunk's own answer.
    reply: oneshot::Sender<Option<pb::Placement>>,
}

/// Requests with the same replication and exclusions, which one call can carry.
type Key = (u32, Vec<u64>);

#[derive(Default)]
pub(crate) struct Placer {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// A call is in flight: new requests queue.
    busy: bool,
    queue: Vec<(Key, Waiting)>,
}

impl Placer {
    /// Where the chunk `spec` goes at `replication`, avoiding `exclude` where possible.
    pub(crate) async fn place(
        inner: &Arc<Inner>,
        spec: pb::ChunkSpec,
        replication: u32,
        exclude: Vec<u64>,
    ) -> Result<pb::Placement> {
        let (this, masters) = (&inner.placer, &inner.masters);
        let key = (replication, exclude);
        let queued = {
            let mut st = this.state.lock().expect("placer lock");
            if st.busy {
                let (reply, answer) = oneshot::channel();
                st.queue.push((key.clone(), Waiting { spec: spec.clone(), reply }));
                Some(answer)
            } else {
                st.busy = true;
                None
            }
        };
        if let Some(answer) = queued {
            if let Ok(Some(p)) = answer.await {
                return Ok(p);
            }
            return call(masters, &key, vec![spec]).await.map(|mut p| p.remove(0));
        }
        let mine = call(masters, &key, vec![spec]).await;
        // Whatever queued meanwhile goes next, in calls of its own, until the queue is empty;
        // this upload goes on meanwhile.
        {
            let mut st = this.state.lock().expect("placer lock");
            if st.queue.is_empty() {
                st.busy = false;
            } else {
                let inner = inner.clone();
                tokio::spawn(async move { inner.placer.drain(&inner.masters).await });
            }
        }
        mine.map(|mut p| p.remove(0))
    }

    async fn drain(&self, masters: &Masters) {
        loop {
            let (key, batch) = {
                let mut st = self.state.lock().expect("placer lock");
                if st.queue.is_empty() {
                    st.busy = false;
                    return;
                }
                take_batch(&mut st.queue)
            };
            let specs = batch.iter().map(|w| w.spec.clone()).collect();
            let answers = call(masters, &key, specs).await.ok();
            for (i, w) in batch.into_iter().enumerate() {
                let _ = w.reply.send(answers.as_ref().and_then(|a| a.get(i).cloned()));
            }
        }
    }
}

/// Takes up to [`MAX_BATCH`] requests with the key of the oldest one, in order.
fn take_batch(queue: &mut Vec<(Key, Waiting)>) -> (Key, Vec<Waiting>) {
    let key = queue[0].0.clone();
    let mut batch = Vec::new();
    let mut rest = Vec::with_capacity(queue.len());
    for (k, w) in queue.drain(..) {
        if k == key && batch.len() < MAX_BATCH {
            batch.push(w);
        } else {
            rest.push((k, w));
        }
    }
    *queue = rest;
    (key, batch)
}

async fn call(masters: &Masters, key: &Key, chunks: Vec<pb::ChunkSpec>) -> Result<Vec<pb::Placement>> {
    let n = chunks.len();
    let req = pb::PlaceChunksRequest { chunks, replication: key.0, exclude: key.1.clone() };
    let r = masters
        .call(|mut c| {
            let req = req.clone();
            async move { c.place_chunks(req).await }
        })
        .await?;
    if r.placements.len() != n {
        return Err(crate::Error::Internal(format!("{} placements for {n} chunks", r.placements.len())));
    }
    Ok(r.placements)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(n: u8) -> Waiting {
        let (reply, _) = oneshot::channel();
        Waiting { spec: pb::ChunkSpec { hash: vec![n], length: 1 }, reply }
    }

    #[test]
    fn a_batch_takes_the_oldest_key_in_order_and_leaves_the_rest() {
        let mut q = vec![
            ((3, vec![]), waiting(1)),
            ((2, vec![]), waiting(2)),
            ((3, vec![]), waiting(3)),
            ((3, vec![9]), waiting(4)),
        ];
        let (key, batch) = take_batch(&mut q);
        assert_eq!(key, (3, vec![]));
        assert_eq!(batch.iter().map(|w| w.spec.hash[0]).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(q.iter().map(|(_, w)| w.spec.hash[0]).collect::<Vec<_>>(), [2, 4]);
        let mut q: Vec<_> = (0..=255u8).chain(0..10).map(|i| ((3, vec![]), waiting(i))).collect();
        assert_eq!(take_batch(&mut q).1.len(), MAX_BATCH);
        assert_eq!(q.len(), 10);
    }
}
