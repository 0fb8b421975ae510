//! Raft for quire's replica groups: openraft 0.9 (storage-v2) over SQLite and HTTP.
//!
//! A service (catalog, order) supplies a [`Machine`]: its schema and how to apply one
//! committed command inside a SQLite transaction. This crate turns it into a replicated,
//! durable, snapshotting replica group with linearizable reads on every member.
//!
//! # Layout
//! - [`bootstrap`]: who a starting replica is (its node id, founding, incarnations).
//! - [`log_store`]: vote and log in `raft.db`, fsynced before openraft is told.
//! - [`state`]: the state machine in `state.db`, snapshots, read connections, digests.
//! - `sqlite`: opening a file, and when SQLite work runs inline or on a blocking thread.
//! - [`payload`]: what an entry carries and answers, and the encoding of everything on
//!   a write's path (postcard).
//! - [`network`]: Raft RPCs over HTTP.
//! - [`proposer`]: group commit, many client writes in one log entry.
//! - [`read_index`]: batched leadership confirmation for linearizable reads.
//! - [`replica`]: [`Replica`], what services call (write, read barrier, status, membership).
//! - [`http`]: the `/raft/*` and `/admin/*` routes.
//! - [`service`]: what the catalog and order services share: [`Member`], router, serving.

// openraft's storage traits return its (large) `StorageError`; our helpers return it too.
#![allow(clippy::result_large_err)]

pub mod bootstrap;
pub mod http;
pub mod log_store;
pub mod network;
pub mod payload;
pub mod proposer;
pub mod read_index;
pub mod replica;
pub mod service;
mod sqlite;
pub mod state;

pub use payload::Command;
pub use replica::{Applied, Replica, ReplicaConfig, Tuning, WriteError};
pub use service::Member;

pub use quire_common::node::{display_id, incarnation, seat, NodeId};

openraft::declare_raft_types!(
    /// An entry carries a [`payload::Proposal`] (the services' commands, encoded) and
    /// answers [`payload::Outcomes`].
    pub TypeConfig:
        D = payload::Proposal,
        R = payload::Outcomes,
        // A snapshot is a SQLite file, streamed from and to disk.
        SnapshotData = tokio::fs::File,
);

/// The service-specific part of a replica's state.
pub trait Machine: Send + Sync + 'static {
    /// What the service writes through Raft.
    type Command: Command;

    /// SQL creating the service's tables; must be idempotent (`IF NOT EXISTS`).
    fn schema(&self) -> &'static str;

    /// Tables that make up the state: copied when a snapshot is installed (in this order)
    /// and hashed by the digest. Derived tables (indexes, FTS) are kept by triggers.
    fn tables(&self) -> &'static [&'static str];

    /// Applies one committed command of the entry at log `index`. An entry may carry several
    /// commands (see [`proposer`]): they are applied in order, each by a call of its own
    /// with the same `index`, so `index` orders writes but does not name one. Runs inside
    /// the transaction that also records the entry as applied, in a savepoint of its own.
    /// An `Err` that the command's data causes (a constraint it breaks, a value out of
    /// range) is rolled back and answered as rejected ([`WriteError::Rejected`]) on every
    /// replica alike, as is a command that does not decode; any other `Err` is a storage
    /// failure and stops the replica.
    fn apply(
        &self,
        tx: &rusqlite::Transaction<'_>,
        index: u64,
        command: Self::Command,
    ) -> rusqlite::Result<<Self::Command as Command>::Answer>;
}
