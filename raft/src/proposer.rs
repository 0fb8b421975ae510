//! Group commit: many client writes in one log entry.
//!
//! openraft 0.9 takes client writes one at a time in its core task, and for each one
//! appends an entry and waits for its fsync before it looks at the next; every entry is
//! then replicated, committed and applied on its own. Under load, writes queue in the core
//! far longer than any of that takes (see bench/README.md, "Where a buy's time goes").
//!
//! The proposer stands in front of the core. A write waits in its queue only while
//! [`IN_FLIGHT`] entries are already on their way; the moment one is done, every write that
//! arrived meanwhile is proposed together as one entry, `{"batch": [c1, c2, ...]}`. The
//! state machine applies the commands of such an entry in order, each in a savepoint of its
//! own and with its own answer (see [`crate::state`]), exactly as if they had been entries
//! of their own at the same log index. At rest a write is proposed alone, as before.
//!
//! Nothing about a write's outcome changes: a batch is committed, or not, as a whole, so
//! every command in it gets the answer one entry would have had; and commands proposed
//! concurrently were never ordered among themselves anyway.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use openraft::Raft;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::Instrument;

use crate::replica::{Applied, WriteError};
use crate::TypeConfig;

/// The key of an entry that carries several commands.
pub const BATCH: &str = "batch";

/// Entries proposed and not yet applied, at most. One keeps the leader's fsync and the
/// followers' replication of the next entry from overlapping; many make entries small.
/// Chosen by measurement (bench/README.md, "Group commit"): 1 and 2 did alike at c64 on
/// 2 cores, 4 made more, smaller entries and cost more CPU per buy.
pub const IN_FLIGHT: usize = 2;

/// Commands in one entry, at most.
pub const MAX_BATCH: usize = 256;

type Answer = oneshot::Sender<Result<Applied, WriteError>>;

/// The queue in front of a replica's Raft core. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    queue: mpsc::UnboundedSender<(serde_json::Value, Answer)>,
}

impl Proposer {
    /// Starts the task that proposes for `raft`; it ends when every `Proposer` is dropped.
    pub fn spawn(raft: Raft<TypeConfig>) -> Self {
        let (queue, mut waiting) = mpsc::unbounded_channel::<(serde_json::Value, Answer)>();
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

    /// Proposes `command` and waits until it is applied here or known never to be.
    pub async fn write(&self, command: serde_json::Value) -> Result<Applied, WriteError> {
        let (answer, answered) = oneshot::channel();
        self.queue.send((command, answer)).map_err(|_| WriteError::Unknown("the replica is stopping".into()))?;
        answered.await.unwrap_or_else(|_| Err(WriteError::Unknown("the replica stopped before it could tell".into())))
    }
}

/// Proposes `batch` as one entry (a lone command as itself) and answers each command.
async fn propose(raft: &Raft<TypeConfig>, batch: Vec<(serde_json::Value, Answer)>) {
    let (commands, answers): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    let alone = commands.len() == 1;
    let entry = match alone {
        true => commands.into_iter().next().unwrap_or_default(),
        false => serde_json::json!({ BATCH: commands }),
    };
    let span = tracing::info_span!("raft.entry", hop = if alone { "one command" } else { "batch" });
    let written = raft.client_write(entry).instrument(span).await;
    let responses = match written {
        Ok(response) => {
            let index = response.log_id.index;
            let responses = match (alone, response.data) {
                (true, data) => vec![data],
                (false, serde_json::Value::Array(each)) if each.len() == answers.len() => each,
                (false, other) => {
                    tracing::error!(answer = %other, "a batch was answered without one answer per command");
                    let lost = WriteError::Unknown("the batch's answer did not match its commands".into());
                    return answer_all(answers, Err(lost));
                }
            };
            responses.into_iter().map(|data| answer_of(index, data)).collect::<Vec<_>>()
        }
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            return answer_all(answers, Err(WriteError::NotLeader(f.leader_node.map(|n| n.addr))))
        }
        Err(e) => {
            tracing::warn!(error = %e, "write failed");
            return answer_all(answers, Err(WriteError::Unknown(e.to_string())));
        }
    };
    for (answer, response) in answers.into_iter().zip(responses) {
        let _ = answer.send(response);
    }
}

fn answer_all(answers: Vec<Answer>, outcome: Result<Applied, WriteError>) {
    for answer in answers {
        let _ = answer.send(outcome.clone());
    }
}

/// What one applied command's answer means to its proposer.
fn answer_of(index: u64, data: serde_json::Value) -> Result<Applied, WriteError> {
    match data["error"].as_str() {
        Some("stale_term") => Err(WriteError::StaleTerm),
        Some("rejected") => Err(WriteError::Rejected(data["message"].as_str().unwrap_or_default().to_string())),
        _ => Ok(Applied { index, response: data }),
    }
}
