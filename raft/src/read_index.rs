//! Linearizable reads on any replica, with leadership confirmations shared between readers.
//!
//! A read must observe every write acknowledged before it began. The leader learns its
//! read index by confirming leadership with a quorum (`get_read_log_id`); a follower or
//! learner asks the leader for it over HTTP. Either way, a reader then waits until its own
//! state machine has applied that index and reads SQLite locally.
//!
//! Confirmation is a network round, so readers are batched ([`Batcher`]): each round
//! answers every reader that arrived before it started, never one that arrived during it,
//! whose read index must come from a later round. Under load one round serves hundreds of
//! reads.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use quire_common::batch::Batcher;

/// Why a read index could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadIndexError {
    #[error("no leader is known")]
    NoLeader,
    #[error("the leader could not be reached or could not confirm it still leads: {0}")]
    Unconfirmed(String),
}

pub type Round = Pin<Box<dyn Future<Output = Result<u64, ReadIndexError>> + Send>>;

#[derive(Clone)]
pub struct ReadIndex {
    rounds: Batcher<(), Result<u64, ReadIndexError>>,
}

impl ReadIndex {
    /// Starts the batching task; `round` performs one confirmation and yields the read index.
    pub fn spawn(round: Arc<dyn Fn() -> Round + Send + Sync>) -> Self {
        ReadIndex { rounds: Batcher::spawn(move |_readers: Vec<()>| round()) }
    }

    /// The index this replica must have applied before a read that starts now may run.
    pub async fn get(&self) -> Result<u64, ReadIndexError> {
        self.rounds.submit(()).await.unwrap_or_else(|| Err(ReadIndexError::Unconfirmed("replica is stopping".into())))
    }
}
