//! What a log entry carries, what applying it answers, and the one encoding both use.
//!
//! A service's commands and answers are its own types ([`Command`], and the
//! [`Machine`](crate::Machine) that applies them); this crate moves them as bytes, so one
//! Raft layer serves every group. An entry carries the writes group commit gathered
//! ([`Proposal`]: one at rest, many under load, see [`crate::proposer`]), and applying it
//! answers one [`Outcome`] per write, in order.
//!
//! Everything that crosses a process or reaches the disk on a write's path (a command, its
//! answer, a log entry in `raft.db`, the Raft RPCs) is encoded with [postcard]: compact,
//! with no field names, and far cheaper to make and read than JSON. A type that changes
//! shape therefore cannot read what an older build wrote; a log says which format it holds
//! (see [`crate::log_store`]).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A service's command, and the type of what its machine answers for it.
pub trait Command: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// What applying the command answers the replica that proposed it.
    type Answer: Serialize + DeserializeOwned + Send + 'static;
}

/// The payload of one log entry: the writes proposed together, applied in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub writes: Vec<Write>,
}

/// One client write inside a [`Proposal`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    /// Applied only if the entry was appended in this term (see
    /// [`Replica::propose_in_term`](crate::Replica::propose_in_term)); otherwise answered
    /// [`Outcome::StaleTerm`] on every replica.
    pub in_term: Option<u64>,
    /// The service's [`Command`], encoded.
    #[serde(with = "serde_bytes")]
    pub command: Vec<u8>,
}

/// What applying one entry answers: one outcome per write of its [`Proposal`] (none for
/// a blank or membership entry).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcomes(pub Vec<Outcome>);

/// What applying one write answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied: the machine's answer, encoded.
    Applied(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Bound to `term` and appended in another: applied as a no-op everywhere.
    StaleTerm { term: u64 },
    /// The machine could not apply it (the command broke a constraint, or did not decode):
    /// applied as a no-op on every replica alike.
    Rejected(String),
}

/// Encodes `value` (postcard).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(value)
}

/// Decodes what [`encode`] made, all of it: bytes left over mean another type was
/// encoded.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    match postcard::take_from_bytes(bytes)? {
        (value, []) => Ok(value),
        _ => Err(postcard::Error::DeserializeBadEncoding),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TypeConfig;

    #[test]
    fn bytes_left_over_do_not_decode() {
        let two: Vec<u8> = encode(&(7u32, 9u32)).unwrap();
        assert_eq!(decode::<(u32, u32)>(&two).unwrap(), (7, 9));
        assert!(decode::<u32>(&two).is_err(), "a prefix of another type's encoding decoded");
    }
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

    /// openraft's own types survive the encoding too (postcard cannot read a type that
    /// skips fields when it serialises, or one that needs a self-describing format).
    #[test]
    fn entries_and_rpcs_survive_the_encoding() {
        let write = Write { in_term: Some(7), command: vec![1, 2, 3] };
        let entry: Entry<TypeConfig> = Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 2), 41),
            payload: EntryPayload::Normal(Proposal { writes: vec![write.clone(), Write { in_term: None, ..write }] }),
        };
        let back: Entry<TypeConfig> = decode(&encode(&entry).unwrap()).unwrap();
        assert_eq!(back, entry);
        let membership: Entry<TypeConfig> = Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 2), 42),
            payload: EntryPayload::Membership(openraft::Membership::new(
                vec![[1, 2, 3].into_iter().collect()],
                [(1, openraft::BasicNode::new("http://a")), (4, openraft::BasicNode::new("http://b"))]
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )),
        };
        let back: Entry<TypeConfig> = decode(&encode(&membership).unwrap()).unwrap();
        assert_eq!(back, membership);

        let rpc = openraft::raft::AppendEntriesRequest::<TypeConfig> {
            vote: openraft::Vote::new_committed(3, 2),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 2), 40)),
            entries: vec![entry.clone(), membership],
            leader_commit: None,
        };
        let back: openraft::raft::AppendEntriesRequest<TypeConfig> = decode(&encode(&rpc).unwrap()).unwrap();
        assert_eq!(
            (back.vote, back.prev_log_id, back.entries, back.leader_commit),
            (rpc.vote, rpc.prev_log_id, rpc.entries, None)
        );

        // Answers, errors included, as a follower sends them back.
        type Answer =
            Result<openraft::raft::AppendEntriesResponse<crate::NodeId>, openraft::error::RaftError<crate::NodeId>>;
        let conflict: Answer = Ok(openraft::raft::AppendEntriesResponse::HigherVote(openraft::Vote::new(4, 1)));
        assert_eq!(format!("{:?}", decode::<Answer>(&encode(&conflict).unwrap()).unwrap()), format!("{conflict:?}"));
        let fatal: Answer = Err(openraft::error::RaftError::Fatal(openraft::error::Fatal::Stopped));
        assert_eq!(format!("{:?}", decode::<Answer>(&encode(&fatal).unwrap()).unwrap()), format!("{fatal:?}"));
    }
}
