//! Linearizable reads on any replica, with leadership confirmations shared between readers.
//!
//! A read must observe every write acknowledged before it began. The leader learns its
//! read index by confirming leadership with a quorum (`get_read_log_id`); a follower or
//! learner asks the leader for it over HTTP. Either way, a reader then waits until its own
//! state machine has applied that index and reads SQLite locally.
//!
//! Confirmation is a network round, so readers are batched: one task runs rounds back to
//! back, and each round answers every reader that arrived before it started (never one that
//! arrived during it, since that reader's read index must come from a later round). Under
//! load one round serves hundreds of reads.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

/// Why a read index could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadIndexError {
    #[error("no leader is known")]
    NoLeader,
    #[error("the leader could not be reached or could not confirm it still leads: {0}")]
    Unconfirmed(String),
}

pub type Round = Pin<Box<dyn Future<Output = Result<u64, ReadIndexError>> + Send>>;

type Waiter = oneshot::Sender<Result<u64, ReadIndexError>>;

#[derive(Clone)]
pub struct ReadIndex {
    waiters: mpsc::UnboundedSender<Waiter>,
}

impl ReadIndex {
    /// Starts the batching task; `round` performs one confirmation and yields the read index.
    pub fn spawn(round: Arc<dyn Fn() -> Round + Send + Sync>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiter>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(next) = rx.try_recv() {
                    batch.push(next);
                }
                let result = round().await;
                for waiter in batch {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        ReadIndex { waiters: tx }
    }

    /// The index this replica must have applied before a read that starts now may run.
    pub async fn get(&self) -> Result<u64, ReadIndexError> {
        let (tx, rx) = oneshot::channel();
        self.waiters.send(tx).map_err(|_| ReadIndexError::Unconfirmed("read index task stopped".into()))?;
        rx.await.map_err(|_| ReadIndexError::Unconfirmed("read index task stopped".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_readers_share_rounds_but_never_an_earlier_one() {
        let rounds = Arc::new(AtomicU64::new(0));
        let counter = rounds.clone();
        let read_index = ReadIndex::spawn(Arc::new(move || {
            let counter = counter.clone();
            Box::pin(async move {
                // The "index" returned is the round number; a reader must get a round that
                // started after it asked.
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(n)
            }) as Round
        }));
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let ri = read_index.clone();
            let rounds = rounds.clone();
            tasks.push(tokio::spawn(async move {
                let started_before = rounds.load(Ordering::SeqCst);
                let got = ri.get().await.unwrap();
                assert!(got > started_before, "reader got a round that began before it asked");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(rounds.load(Ordering::SeqCst) < 50, "rounds were not shared");
    }
}
