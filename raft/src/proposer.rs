//! Group commit: many client writes in one log entry.
//!
//! openraft 0.9 takes client writes one at a time in its core task, and for each one
//! appends an entry and waits for its fsync before it looks at the next; every entry is
//! then replicated, committed and applied on its own. Under load, writes queue in the core
//! far longer than any of that takes (see bench/README.md, "Where a buy's time goes").
//!
//! The proposer stands in front of the core. A write waits in its queue only while
//! [`IN_FLIGHT`] entries are already on their way; the moment one is done, every write that
//! arrived meanwhile is proposed together as one entry (a [`Proposal`] of several writes).
//! The state machine applies the writes of such an entry in order, each in a savepoint of
//! its own and with its own answer (see [`crate::state`]), exactly as if they had been
//! entries of their own at the same log index. At rest an entry carries one write.
//!
//! Nothing about a write's outcome changes: a batch is committed, or not, as a whole, so
//! every command in it gets the answer one entry would have had; and commands proposed
//! concurrently were never ordered among themselves anyway.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use openraft::Raft;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::Instrument;

use crate::payload::{Outcome, Outcomes, Proposal, Write};
use crate::replica::WriteError;
use crate::TypeConfig;

/// Entries proposed and not yet applied, at most. One keeps the leader's fsync and the
/// followers' replication of the next entry from overlapping; many make entries small.
/// Chosen by measurement (bench/README.md, "Group commit"): 1 and 2 did alike at c64 on
/// 2 cores, 4 made more, smaller entries and cost more CPU per buy.
pub const IN_FLIGHT: usize = 2;

/// Commands in one entry, at most.
pub const MAX_BATCH: usize = 256;

/// An applied write: the index of its entry and the machine's answer, encoded.
pub type Written = (u64, Vec<u8>);

type Answer = oneshot::Sender<Result<Written, WriteError>>;

/// The queue in front of a replica's Raft core. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    queue: mpsc::UnboundedSender<(Write, Answer)>,
}

impl Proposer {
    /// Starts the task that proposes for `raft`; it ends when every `Proposer` is dropped.
    pub fn spawn(raft: Raft<TypeConfig>) -> Self {
        let (queue, mut waiting) = mpsc::unbounded_channel::<(Write, Answer)>();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(IN_FLIGHT));
            while let Some(first) = waiting.recv().await {
                // Writes that arrive while every slot is taken join this entry.
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match waiting.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let raft = raft.clone();
                tokio::spawn(async move {
                    propose(&raft, batch).await;
                    drop(slot);
                });
            }
        });
        Proposer { queue }
    }

    /// Proposes `write` and waits until it is applied here or known never to be.
    pub async fn write(&self, write: Write) -> Result<Written, WriteError> {
        let (answer, answered) = oneshot::channel();
        self.queue.send((write, answer)).map_err(|_| WriteError::Unknown("the replica is stopping".into()))?;
        answered.await.unwrap_or_else(|_| Err(WriteError::Unknown("the replica stopped before it could tell".into())))
    }
}

/// Proposes `batch` as one entry and answers each write.
async fn propose(raft: &Raft<TypeConfig>, batch: Vec<(Write, Answer)>) {
    let (writes, answers): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    let hop = if writes.len() == 1 { "one command" } else { "batch" };
    let span = tracing::info_span!("raft.entry", hop);
    let written = raft.client_write(Proposal { writes }).instrument(span).await;
    let (index, Outcomes(outcomes)) = match written {
        Ok(response) => (response.log_id.index, response.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            return answer_all(answers, Err(WriteError::NotLeader(f.leader_node.map(|n| n.addr))))
        }
        Err(e) => {
            tracing::warn!(error = %e, "write failed");
            return answer_all(answers, Err(WriteError::Unknown(e.to_string())));
        }
    };
    if outcomes.len() != answers.len() {
        tracing::error!(
            outcomes = outcomes.len(),
            writes = answers.len(),
            "an entry was answered without one outcome per write"
        );
        let lost = WriteError::Unknown("the entry's answer did not match its writes".into());
        return answer_all(answers, Err(lost));
    }
    for (answer, outcome) in answers.into_iter().zip(outcomes) {
        let _ = answer.send(match outcome {
            Outcome::Applied(bytes) => Ok((index, bytes)),
            Outcome::StaleTerm { .. } => Err(WriteError::StaleTerm),
            Outcome::Rejected(reason) => Err(WriteError::Rejected(reason)),
        });
    }
}

fn answer_all(answers: Vec<Answer>, outcome: Result<Written, WriteError>) {
    for answer in answers {
        let _ = answer.send(outcome.clone());
    }
}
