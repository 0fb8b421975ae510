//! A replica: one member (voter or learner) of a Raft group, with its stores, network,
//! read index and the operations services build on (write, linearizable read barrier,
//! status, membership changes).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};

use quire_common::client::{call, CallError};
use quire_common::http::Token;
use quire_common::status::Role;
use quire_common::{headers, ApiError, Deadline};

use crate::log_store::LogStore;
use crate::network::Network;
use crate::read_index::{ReadIndex, ReadIndexError, Round};
use crate::state::{Reads, StateStore};
use crate::{Machine, NodeId, TypeConfig};

/// Raft timing and log-compaction knobs.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    /// Build a snapshot (and purge the log behind it) every this many applied entries.
    pub snapshot_every: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(400),
            election_max: Duration::from_millis(800),
            snapshot_every: 5_000,
        }
    }
}

#[derive(Clone)]
pub struct ReplicaConfig {
    pub id: NodeId,
    /// Base URL peers reach this replica at (its Raft node address).
    pub advertise: String,
    pub dir: PathBuf,
    pub token: Token,
    pub tuning: Tuning,
    /// Emulated capacity (`--profile cloud-sim`); `None`: the machine's own.
    pub capacity: Option<quire_common::capacity::Costs>,
}

/// The answer of a committed, applied write.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Log index of the write: the version of every row it touched.
    pub index: u64,
    pub response: serde_json::Value,
}

/// Why a proposal has no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The write was not applied and never will be: this replica did not lead when asked,
    /// or the entry was removed from its log by a newer leader. The leader's URL if known.
    #[error("not the leader")]
    NotLeader(Option<String>),
    /// The replica stopped before it could tell (the entry may still be applied).
    #[error("the outcome is unknown: {0}")]
    Unknown(String),
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::NotLeader(leader) => ApiError::not_leader(leader),
            WriteError::Unknown(_) => ApiError::deadline_exceeded(
                "the replica stopped before the write was confirmed; its outcome is unknown, retry with the same key",
            ),
        }
    }
}

pub struct Replica {
    pub id: NodeId,
    pub advertise: String,
    pub raft: Raft<TypeConfig>,
    pub reads: Arc<Reads>,
    pub machine: Arc<dyn Machine>,
    pub client: reqwest::Client,
    pub token: Token,
    /// Boot, worker slots and draining of this server (free unless emulated).
    pub workers: quire_common::capacity::Workers,
    read_index: ReadIndex,
    /// Set by the readiness probe: this replica recently had applied the leader's read index.
    caught_up: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReadIndexAnswer {
    pub index: u64,
}

impl Replica {
    pub async fn start(config: ReplicaConfig, machine: Arc<dyn Machine>) -> anyhow::Result<Arc<Replica>> {
        std::fs::create_dir_all(&config.dir)?;
        let raft_config = openraft::Config {
            cluster_name: "quire".into(),
            heartbeat_interval: config.tuning.heartbeat.as_millis() as u64,
            election_timeout_min: config.tuning.election_min.as_millis() as u64,
            election_timeout_max: config.tuning.election_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.tuning.snapshot_every),
            max_in_snapshot_log_to_keep: (config.tuning.snapshot_every / 5).max(10),
            install_snapshot_timeout: 5_000,
            // Chunks travel as JSON arrays of numbers (about 4 bytes a byte): keep them small.
            snapshot_max_chunk_size: 1024 * 1024,
            ..Default::default()
        }
        .validate()?;
        let log = LogStore::open(&config.dir.join("raft.db"))?;
        let state = StateStore::open(&config.dir, machine.clone())?;
        let reads = state.reads.clone();
        let client = quire_common::client::http_client();
        let network = Network { client: client.clone(), token: config.token.0.clone() };
        let raft = Raft::new(config.id, Arc::new(raft_config), network, log, state).await?;

        // The read index round needs the replica itself; tie the knot through a OnceLock.
        let cell: Arc<std::sync::OnceLock<std::sync::Weak<Replica>>> = Arc::new(std::sync::OnceLock::new());
        let round_cell = cell.clone();
        let read_index = ReadIndex::spawn(Arc::new(move || {
            let replica = round_cell.get().and_then(|w| w.upgrade());
            Box::pin(async move {
                match replica {
                    Some(replica) => replica.confirm_read_index().await,
                    None => Err(ReadIndexError::Unconfirmed("replica is stopping".into())),
                }
            }) as Round
        }));
        let replica = Arc::new(Replica {
            id: config.id,
            advertise: config.advertise,
            raft,
            reads,
            machine,
            client,
            token: config.token,
            read_index,
            caught_up: std::sync::atomic::AtomicBool::new(false),
            workers: quire_common::capacity::Workers::new(config.capacity),
        });
        let _ = cell.set(Arc::downgrade(&replica));
        spawn_readiness_probe(Arc::downgrade(&replica));
        Ok(replica)
    }

    /// Initialises a new group with `members` (id → base URL) unless this replica already
    /// belongs to one, or another member already runs one (then this replica, say a
    /// container given an empty volume, waits to be brought up to date instead of founding
    /// a second group). Safe to call on every member with the same map.
    pub async fn initialize(&self, members: &BTreeMap<NodeId, String>) -> anyhow::Result<()> {
        if self.raft.is_initialized().await? {
            return Ok(());
        }
        for (id, url) in members.iter().filter(|(id, _)| **id != self.id) {
            let status = self.client.get(format!("{url}/status")).timeout(Duration::from_millis(500)).send().await;
            let Ok(status) = status else { continue };
            let Ok(status) = status.json::<quire_common::status::ServerStatus>().await else { continue };
            let voters = status.details["voters"].as_array().is_some_and(|v| !v.is_empty());
            if voters || status.leader.is_some() {
                tracing::info!(peer = id, "the group already exists; joining it instead of founding one");
                return Ok(());
            }
        }
        let nodes: BTreeMap<NodeId, BasicNode> = members.iter().map(|(id, url)| (*id, BasicNode::new(url))).collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            // Another member's initialisation reached us first: nothing to do.
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn metrics(&self) -> openraft::RaftMetrics<NodeId, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    /// The leader's id and base URL, if known.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        let url = m.membership_config.membership().get_node(&id).map(|n| n.addr.clone())?;
        Some((id, url))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    pub fn applied_index(&self) -> u64 {
        self.raft.metrics().borrow().last_applied.map_or(0, |l| l.index)
    }

    pub fn role(&self) -> Role {
        let m = self.raft.metrics();
        let m = m.borrow();
        match m.state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Learner => Role::Learner,
            ServerState::Candidate => Role::Candidate,
            ServerState::Shutdown => Role::None,
        }
    }

    /// Ready to serve reads: a member of the group that, moments ago, had applied (nearly)
    /// everything the leader had committed. Measured by the readiness probe, so a replica
    /// rebuilding from an empty directory stays out of rotation until it has caught up.
    pub fn ready(&self) -> bool {
        self.caught_up.load(std::sync::atomic::Ordering::Acquire) && self.raft.metrics().borrow().running_state.is_ok()
    }

    /// The term this replica leads, if it leads.
    pub fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow();
        (m.current_leader == Some(self.id)).then_some(m.current_term)
    }

    /// Proposes `command`; returns once it is committed and applied here (on the leader).
    pub async fn write(&self, command: serde_json::Value, deadline: Deadline) -> Result<Applied, ApiError> {
        match tokio::time::timeout(deadline.remaining(), self.propose(command)).await {
            Ok(answer) => answer.map_err(ApiError::from),
            Err(_) => Err(ApiError::deadline_exceeded(
                "the write was not confirmed in time; its outcome is unknown, retry with the same key",
            )),
        }
    }

    /// Proposes `command` and waits, however long it takes, until it is applied here (a
    /// replica that stopped leading meanwhile still applies it once it is committed) or is
    /// known never to be.
    pub async fn propose(&self, command: serde_json::Value) -> Result<Applied, WriteError> {
        // An emulated DB write is latency, not a lock: writes overlap freely.
        self.workers.write_latency().await;
        match self.raft.client_write(command).await {
            Ok(response) => Ok(Applied { index: response.log_id.index, response: response.data }),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(WriteError::NotLeader(f.leader_node.map(|n| n.addr)))
            }
            Err(e) => {
                tracing::warn!(error = %e, "write failed");
                Err(WriteError::Unknown(e.to_string()))
            }
        }
    }

    /// Waits until a read that starts now would observe every write acknowledged before
    /// it: fetches the read index (leader confirmation) and waits to apply up to it.
    pub async fn read_barrier(&self, deadline: Deadline) -> Result<(), ApiError> {
        let wait = async {
            let index = self.read_index.get().await.map_err(|e| {
                tracing::debug!(error = %e, "read index unavailable");
                ApiError::unavailable(format!("cannot serve a linearizable read: {e}"))
            })?;
            if self.applied_index() < index {
                self.raft
                    .wait(None)
                    .applied_index_at_least(Some(index), "read barrier")
                    .await
                    .map_err(|e| ApiError::unavailable(format!("replica stopped: {e}")))?;
            }
            Ok(())
        };
        tokio::time::timeout(deadline.remaining(), wait)
            .await
            .map_err(|_| ApiError::deadline_exceeded("the read could not be confirmed in time"))?
    }

    /// One round of the read index: as leader confirm with a quorum, else ask the leader.
    async fn confirm_read_index(&self) -> Result<u64, ReadIndexError> {
        let (leader_id, leader_url) = self.leader().ok_or(ReadIndexError::NoLeader)?;
        if leader_id == self.id {
            let (read_log_id, _applied) =
                self.raft.get_read_log_id().await.map_err(|e| ReadIndexError::Unconfirmed(e.to_string()))?;
            return Ok(read_log_id.map_or(0, |l| l.index));
        }
        let request = self
            .client
            .get(format!("{leader_url}/raft/read-index"))
            .header(headers::TOKEN, &*self.token.0)
            // Short: while the leader is frozen or cut off, readers should learn it soon
            // enough to retry elsewhere (or after the election) within their deadline.
            .timeout(Duration::from_millis(500));
        match call::<ReadIndexAnswer>(request).await {
            Ok(answer) => Ok(answer.index),
            Err(e @ (CallError::Unreachable(_) | CallError::Unknown(_) | CallError::Api(_))) => {
                Err(ReadIndexError::Unconfirmed(e.to_string()))
            }
        }
    }

    /// Leader side of a follower's read index request.
    pub async fn leader_read_index(&self) -> Result<u64, ApiError> {
        if !self.is_leader() {
            return Err(ApiError::not_leader(self.leader().map(|(_, url)| url)));
        }
        self.read_index.get().await.map_err(|e| ApiError::unavailable(e.to_string()))
    }

    /// Adds a learner and waits until it has caught up with the log.
    pub async fn add_learner(&self, id: NodeId, url: &str) -> Result<u64, ApiError> {
        self.raft.add_learner(id, BasicNode::new(url), true).await.map(|r| r.log_id.index).map_err(membership_error)
    }

    /// Makes `voters` the voter set; members not in it stay as learners when `keep_learners`.
    pub async fn change_voters(&self, voters: BTreeSet<NodeId>, keep_learners: bool) -> Result<u64, ApiError> {
        self.raft.change_membership(voters, keep_learners).await.map(|r| r.log_id.index).map_err(membership_error)
    }

    /// Removes members (learners) from the group.
    pub async fn remove_members(&self, ids: BTreeSet<NodeId>) -> Result<u64, ApiError> {
        self.raft
            .change_membership(ChangeMembers::RemoveNodes(ids), false)
            .await
            .map(|r| r.log_id.index)
            .map_err(membership_error)
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

/// Every 200 ms, fetch the read index and compare it with what this replica applied.
fn spawn_readiness_probe(replica: std::sync::Weak<Replica>) {
    /// Entries a replica may trail the leader by and still be called caught up.
    const SLACK: u64 = 32;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let Some(replica) = replica.upgrade() else { return };
            let member = {
                let m = replica.raft.metrics();
                let m = m.borrow();
                m.membership_config.membership().get_node(&replica.id).is_some()
            };
            let index = tokio::time::timeout(Duration::from_secs(1), replica.read_index.get()).await;
            let caught_up = member && matches!(index, Ok(Ok(i)) if replica.applied_index() + SLACK >= i);
            replica.caught_up.store(caught_up, std::sync::atomic::Ordering::Release);
        }
    });
}

fn membership_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ApiError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ApiError::not_leader(f.leader_node.map(|n| n.addr))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            ApiError::new(axum::http::StatusCode::CONFLICT, "bad_request", c.to_string())
        }
        other => ApiError::unavailable(other.to_string()),
    }
}
