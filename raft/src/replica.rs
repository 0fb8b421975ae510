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

use crate::bootstrap::{same_address, GroupView, Start};
use crate::log_store::{Identity, LogStore};
use crate::network::Network;
use crate::payload::{self, Command, Write};
use crate::proposer::Proposer;
use crate::read_index::{ReadIndex, ReadIndexError, Round};
use crate::state::{Apply, Reads, StateStore};
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

impl Tuning {
    /// This seat's election timeouts (ms): a band of its own within `election_min` to
    /// `election_max`, apart from the other seats' by half a band, by seat modulo 3.
    ///
    /// openraft 0.9 draws a member's election timeout once, when it starts, and a follower
    /// stands for election only after its leader lease (its own `election_timeout_max`)
    /// and that timeout have passed since it last heard from the leader. Two survivors
    /// whose draws fell close together stood at the same moment, split the vote and
    /// started again one timeout later (about one leader kill in four, bench/README.md
    /// "Failover"). In separate bands the lower seat stands first, 20 ms or more ahead of
    /// the next (with the default timing), and gets the other's vote, since the other's
    /// lease has run out by then.
    pub fn election_band(&self, seat: u64) -> (u64, u64) {
        let (min, max) = (self.election_min.as_millis() as u64, self.election_max.as_millis() as u64);
        let width = (max.saturating_sub(min) / 3).max(2);
        let low = min + (seat.saturating_sub(1) % 3) * width;
        (low, low + width / 2)
    }
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            heartbeat: Duration::from_millis(50),
            election_min: Duration::from_millis(80),
            election_max: Duration::from_millis(120),
            snapshot_every: 5_000,
        }
    }
}

#[derive(Clone)]
pub struct ReplicaConfig {
    /// The seat this server holds (`--id`); its node id is the seat's, or a later
    /// incarnation's (see [`crate::bootstrap`]).
    pub seat: u64,
    /// The Raft group this replica belongs to: every Raft RPC names it, and a data
    /// directory never serves another.
    pub group: String,
    /// Base URL peers reach this replica at (its Raft node address).
    pub advertise: String,
    pub dir: PathBuf,
    pub token: Token,
    pub tuning: Tuning,
    /// The founding voters (id → URL), when this replica helps found a new group; ignored
    /// once the group exists.
    pub init: Option<BTreeMap<NodeId, String>>,
    /// Other members to ask who this replica is when its data directory is empty.
    pub peers: Vec<String>,
    /// This server has never run before (only a supervisor can know): with an empty data
    /// directory it takes its seat's id as is.
    pub first_start: bool,
    /// Emulated capacity (`--profile cloud-sim`); `None`: the machine's own.
    pub capacity: Option<quire_common::capacity::Costs>,
}

/// The answer of a committed, applied write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied<A> {
    /// Log index of the entry that carried the write (with others, under load): the version
    /// of every row it touched.
    pub index: u64,
    /// What the machine answered.
    pub answer: A,
}

/// Why a proposal has no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// This replica does not lead (the leader's URL, if known): it did not when asked, or
    /// a newer leader removed the entry from its log. In the second case another replica
    /// may still hold the entry and a later leader apply it (with five voters or more), so
    /// the outcome is not known for sure; a retry with the same idempotency key is safe.
    #[error("not the leader")]
    NotLeader(Option<String>),
    /// A term-bound proposal (see [`Replica::propose_in_term`]) that entered the log in
    /// another term: applied as a no-op everywhere.
    #[error("proposed in a term this replica no longer leads")]
    StaleTerm,
    /// The replica stopped before it could tell (the entry may still be applied).
    #[error("the outcome is unknown: {0}")]
    Unknown(String),
    /// Applied as a no-op on every replica: the state machine could not apply it (see
    /// [`Machine::apply`](crate::Machine::apply)).
    #[error("the state machine rejected the command: {0}")]
    Rejected(String),
    /// A command that is not the group's or does not encode (nothing was proposed), or an
    /// answer that does not decode (the write was applied): a bug, not a state of the group.
    #[error("a command or its answer did not (de)code: {0}")]
    Codec(String),
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::NotLeader(leader) => ApiError::not_leader(leader),
            WriteError::StaleTerm => ApiError::not_leader(None),
            WriteError::Unknown(_) => ApiError::deadline_exceeded(
                "the replica stopped before the write was confirmed; its outcome is unknown, retry with the same key",
            ),
            WriteError::Rejected(reason) => {
                tracing::error!(%reason, "a command was rejected by the state machine");
                ApiError::internal("the store could not apply this request; nothing was changed")
            }
            WriteError::Codec(reason) => {
                tracing::error!(%reason, "a command or its answer did not (de)code");
                ApiError::internal("the store could not encode this request or decode its answer")
            }
        }
    }
}

pub struct Replica {
    pub id: NodeId,
    pub group: String,
    pub advertise: String,
    pub raft: Raft<TypeConfig>,
    pub reads: Arc<Reads>,
    pub machine: Arc<dyn Apply>,
    pub client: reqwest::Client,
    pub token: Token,
    /// Boot, worker slots and draining of this server (free unless emulated).
    pub workers: quire_common::capacity::Workers,
    read_index: ReadIndex,
    /// Group commit in front of the Raft core: every write goes through it.
    proposer: Proposer,
    /// Set by the readiness probe: this replica recently had applied the leader's read index.
    caught_up: std::sync::atomic::AtomicBool,
    log: LogStore,
    /// Older incarnations of this replica's seat whose place it has yet to take.
    replaces: std::sync::Mutex<Vec<NodeId>>,
    /// Members this replica knew of at start (founding voters and peers), to find the
    /// leader through before it is a member itself.
    peers: Vec<String>,
    /// The last log index of the newest snapshot a leader sent this replica (0: none).
    pub installed_snapshot: Arc<std::sync::atomic::AtomicU64>,
    /// The log held something when this replica started: until Raft has loaded it, the
    /// replica cannot tell others about its group.
    had_state: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReadIndexAnswer {
    pub index: u64,
}

impl Replica {
    /// Opens the stores and starts Raft, deciding first who this replica is when its data
    /// directory is empty (which may wait for the group's members to answer), and founding
    /// the group when that is the decision.
    pub async fn start(config: ReplicaConfig, machine: impl Machine) -> anyhow::Result<Arc<Replica>> {
        let machine: Arc<dyn Apply> = Arc::new(machine);
        std::fs::create_dir_all(&config.dir)?;
        let (election_min, election_max) = config.tuning.election_band(config.seat);
        let raft_config = openraft::Config {
            cluster_name: config.group.clone(),
            heartbeat_interval: config.tuning.heartbeat.as_millis() as u64,
            election_timeout_min: election_min,
            election_timeout_max: election_max,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.tuning.snapshot_every),
            max_in_snapshot_log_to_keep: (config.tuning.snapshot_every / 5).max(10),
            install_snapshot_timeout: 5_000,
            snapshot_max_chunk_size: 1024 * 1024,
            ..Default::default()
        }
        .validate()?;
        let client = quire_common::client::http_client();
        let raft_db = config.dir.join("raft.db");
        if !raft_db.exists() {
            // A log's write-ahead file without the log would bring part of a lost log back.
            for stale in ["raft.db-wal", "raft.db-shm"] {
                let _ = std::fs::remove_file(config.dir.join(stale));
            }
        }
        let log = LogStore::open(&raft_db)?;
        let had_state = !log.is_blank()?;
        let (identity, found) = identify(&config, &log, &client).await?;
        let state = StateStore::open(&config.dir, machine.clone())?;
        let (reads, installed) = (state.reads.clone(), state.installed.clone());
        let network =
            Network { client: client.clone(), token: config.token.0.clone(), group: config.group.clone().into() };
        let raft = Raft::new(identity.node_id, Arc::new(raft_config), network, log.clone(), state).await?;

        let proposer = Proposer::spawn(raft.clone());
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
            id: identity.node_id,
            group: config.group,
            advertise: config.advertise,
            raft,
            reads,
            machine,
            client,
            token: config.token,
            read_index,
            proposer,
            caught_up: std::sync::atomic::AtomicBool::new(false),
            workers: quire_common::capacity::Workers::new(config.capacity),
            log,
            replaces: std::sync::Mutex::new(identity.replaces),
            peers: config.peers.iter().cloned().chain(config.init.iter().flat_map(|m| m.values().cloned())).collect(),
            installed_snapshot: installed,
            had_state,
        });
        let _ = cell.set(Arc::downgrade(&replica));
        if let Some(members) = found {
            replica.initialize(&members).await?;
        }
        spawn_readiness_probe(Arc::downgrade(&replica));
        Ok(replica)
    }

    /// Founds a group with `members` (id → base URL) unless this replica already belongs
    /// to one. Safe to call on every founding member with the same map.
    pub async fn initialize(&self, members: &BTreeMap<NodeId, String>) -> anyhow::Result<()> {
        if self.raft.is_initialized().await? {
            return Ok(());
        }
        for (a, (id_a, url_a)) in members.iter().enumerate() {
            if let Some((id_b, _)) = members.iter().skip(a + 1).find(|(_, url_b)| same_address(url_a, url_b)) {
                anyhow::bail!("nodes {id_a} and {id_b} cannot both be at {url_a}");
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

    /// What this replica tells a starting one about the group; `None` while it cannot
    /// tell (its log is not loaded yet).
    pub fn view(&self) -> Option<GroupView> {
        let m = self.metrics();
        let loaded = m.membership_config.log_id().is_some();
        if self.had_state && !loaded {
            return None;
        }
        let membership = m.membership_config.membership();
        let addr = |ids: Vec<NodeId>| -> BTreeMap<NodeId, String> {
            ids.into_iter().filter_map(|id| membership.get_node(&id).map(|n| (id, n.addr.clone()))).collect()
        };
        let leader = self.leader();
        Some(GroupView {
            group: self.group.clone(),
            initialized: loaded,
            node_id: Some(self.id),
            leader: leader.as_ref().map(|(id, _)| *id),
            leader_url: leader.map(|(_, url)| url),
            voters: addr(membership.voter_ids().collect()),
            learners: addr(membership.learner_ids().collect()),
            last_log_index: m.last_log_index,
            vote_committed: m.vote.is_committed(),
        })
    }

    /// Older incarnations of this replica's seat whose place it has yet to take.
    pub fn replaces(&self) -> Vec<NodeId> {
        self.replaces.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A new incarnation joins as a learner and, once caught up, takes the place of its
    /// seat's older incarnations: a voter's seat in the voter set, a learner's in the
    /// learners. Runs until done, through whichever member leads.
    pub async fn take_seat(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let replaces = self.replaces();
            if replaces.is_empty() {
                return;
            }
            match self.take_seat_step().await {
                Ok(true) => {
                    let identity =
                        Identity { group: self.group.clone(), node_id: self.id, replaces: vec![], found: None };
                    let log = self.log.clone();
                    match tokio::task::spawn_blocking(move || log.set_identity(&identity)).await {
                        Ok(Ok(())) => {
                            tracing::info!(replaced = ?replaces, "this incarnation holds its seat");
                            self.replaces.lock().unwrap_or_else(|e| e.into_inner()).clear();
                        }
                        outcome => tracing::warn!(?outcome, "could not record that the seat is taken"),
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "seat not taken yet"),
            }
        }
    }

    /// One attempt of [`take_seat`](Self::take_seat); `true` once no older incarnation of
    /// the seat is a member.
    async fn take_seat_step(&self) -> anyhow::Result<bool> {
        let leader = match self.leader() {
            Some((_, url)) => url,
            // Not a member yet: no leader has written to this replica. Ask the others.
            None => self.leader_known_to_peers().await.ok_or_else(|| anyhow::anyhow!("no leader known"))?,
        };
        let view: GroupView = self.admin(self.client.get(format!("{leader}/raft/membership"))).await?;
        let older: Vec<NodeId> =
            view.incarnations_of(crate::seat(self.id)).into_iter().filter(|id| *id != self.id).collect();
        if older.is_empty() {
            return Ok(true);
        }
        if !view.members().any(|(id, _)| *id == self.id) {
            tracing::info!(%leader, "joining the group as a learner, to take the seat of {older:?}");
            let body = crate::http::LearnerRequest { id: self.id, url: self.advertise.clone() };
            let _: crate::http::MembershipAnswer =
                self.admin(self.client.post(format!("{leader}/admin/learners")).json(&body)).await?;
            return Ok(false);
        }
        if !self.ready() {
            return Ok(false);
        }
        let older_voters: Vec<NodeId> = older.iter().copied().filter(|id| view.voters.contains_key(id)).collect();
        if !older_voters.is_empty() {
            tracing::info!("caught up: taking the voter seat of {older_voters:?}");
            // The leader works the new voter set out from its own membership.
            let body = crate::http::ReplaceRequest { replace: older_voters.into_iter().collect(), with: self.id };
            let _: crate::http::MembershipAnswer =
                self.admin(self.client.post(format!("{leader}/admin/voters/replace")).json(&body)).await?;
            return Ok(false);
        }
        tracing::info!("caught up: removing the older learners {older:?}");
        let body = crate::http::RemoveRequest { ids: older.into_iter().collect() };
        let _: crate::http::MembershipAnswer =
            self.admin(self.client.post(format!("{leader}/admin/members/remove")).json(&body)).await?;
        Ok(false)
    }

    async fn leader_known_to_peers(&self) -> Option<String> {
        for peer in self.peers.iter().filter(|p| !same_address(p, &self.advertise)) {
            if let Ok(view) = self.admin::<GroupView>(self.client.get(format!("{peer}/raft/membership"))).await {
                if let Some(url) = view.leader_url {
                    return Some(url);
                }
            }
        }
        None
    }

    async fn admin<T: serde::de::DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let request = request
            .header(headers::TOKEN, &*self.token.0)
            .header(headers::GROUP, &self.group)
            .timeout(Duration::from_secs(30));
        call(request).await.map_err(|e| anyhow::anyhow!("{e}"))
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
    pub async fn write<C: Command>(&self, command: &C, deadline: Deadline) -> Result<Applied<C::Answer>, ApiError> {
        match tokio::time::timeout(deadline.remaining(), self.propose(command)).await {
            Ok(answer) => answer.map_err(ApiError::from),
            Err(_) => Err(ApiError::deadline_exceeded(
                "the write was not confirmed in time; its outcome is unknown, retry with the same key",
            )),
        }
    }

    /// Proposes `command`, to be applied only if it enters the log in `term`: a replica
    /// that prepared a write while leading `term` (holding caches, say) and lost and
    /// regained leadership before proposing it gets [`WriteError::StaleTerm`], and the write
    /// is applied nowhere.
    pub async fn propose_in_term<C: Command>(&self, term: u64, command: &C) -> Result<Applied<C::Answer>, WriteError> {
        self.propose_write(Some(term), command).await
    }

    /// Proposes `command` and waits, however long it takes, until it is applied here (a
    /// replica that stopped leading meanwhile still applies it once it is committed) or is
    /// known never to be.
    pub async fn propose<C: Command>(&self, command: &C) -> Result<Applied<C::Answer>, WriteError> {
        self.propose_write(None, command).await
    }

    async fn propose_write<C: Command>(
        &self,
        in_term: Option<u64>,
        command: &C,
    ) -> Result<Applied<C::Answer>, WriteError> {
        // Another type's bytes might well decode as some command of this machine's.
        if std::any::TypeId::of::<C>() != self.machine.command_type() {
            let name = std::any::type_name::<C>();
            return Err(WriteError::Codec(format!("{name} is not a command of group {}", self.group)));
        }
        let command = payload::encode(command).map_err(|e| WriteError::Codec(e.to_string()))?;
        // An emulated DB write is latency, not a lock: writes overlap freely.
        self.workers.write_latency().await;
        // Every write is timed here, without a span (`quire_common::timings`); the entries
        // that carry them are spans of their own (`raft.entry`).
        let _watch = quire_common::timings::Stopwatch::start("raft.write");
        let (index, answer) = self.proposer.write(Write { in_term, command }).await?;
        let answer = payload::decode(&answer).map_err(|e| WriteError::Codec(e.to_string()))?;
        Ok(Applied { index, answer })
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
        // Every linearizable read waits here: timed without a span (`quire_common::timings`).
        let _watch = quire_common::timings::Stopwatch::start("read_barrier");
        tokio::time::timeout(deadline.remaining(), wait)
            .await
            .map_err(|_| ApiError::deadline_exceeded("the read could not be confirmed in time"))?
    }

    /// One round of the read index: as leader confirm with a quorum, else ask the leader.
    async fn confirm_read_index(&self) -> Result<u64, ReadIndexError> {
        use tracing::Instrument;
        let (leader_id, leader_url) = self.leader().ok_or(ReadIndexError::NoLeader)?;
        if leader_id == self.id {
            let confirmed = self.raft.get_read_log_id().instrument(tracing::info_span!("raft.read_index")).await;
            let (read_log_id, _applied) = confirmed.map_err(|e| ReadIndexError::Unconfirmed(e.to_string()))?;
            return Ok(read_log_id.map_or(0, |l| l.index));
        }
        let request = self
            .client
            .get(format!("{leader_url}/raft/read-index"))
            .header(headers::TOKEN, &*self.token.0)
            .header(headers::GROUP, &self.group)
            .header(headers::NODE, leader_id)
            // Short: while the leader is frozen or cut off, readers should learn it soon
            // enough to retry elsewhere (or after the election) within their deadline.
            .timeout(Duration::from_millis(500));
        match call::<ReadIndexAnswer>(request)
            .instrument(tracing::info_span!("raft.read_index", hop = "from the leader"))
            .await
        {
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

    /// Adds a learner and waits until it has caught up with the log. Refused when another
    /// node, other than an incarnation of the same seat, is at `url`: two ids at one
    /// address would count one server twice.
    pub async fn add_learner(&self, id: NodeId, url: &str) -> Result<u64, ApiError> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        if let Some((other, _)) = membership.nodes().find(|(other, node)| {
            **other != id && crate::seat(**other) != crate::seat(id) && same_address(&node.addr, url)
        }) {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "address_taken",
                format!("node {other} is already at {url}"),
            ));
        }
        if let Some(node) = membership.get_node(&id).filter(|node| !same_address(&node.addr, url)) {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "address_taken",
                format!("node {id} is a member at {}, not {url}", node.addr),
            ));
        }
        // The server at `url` must already be node `id`: one still deciding who it is would
        // see its seat among the members and take a new incarnation instead.
        let answer = self
            .client
            .get(format!("{url}/raft/membership"))
            .header(headers::TOKEN, &*self.token.0)
            .header(headers::GROUP, &self.group)
            .timeout(Duration::from_secs(1));
        match call::<GroupView>(answer).await {
            Ok(view) if view.node_id == Some(id) => {}
            Ok(view) => {
                return Err(ApiError::unavailable(format!(
                    "the server at {url} is {} of this group, not node {id} (yet)",
                    view.node_id.map_or("no node".to_string(), |n| format!("node {}", crate::display_id(n)))
                )))
            }
            Err(e) => {
                return Err(ApiError::unavailable(format!("the server at {url} does not answer as node {id}: {e}")))
            }
        }
        self.raft.add_learner(id, BasicNode::new(url), true).await.map(|r| r.log_id.index).map_err(membership_error)
    }

    /// Makes `voters` the voter set; members not in it stay as learners when `keep_learners`.
    pub async fn change_voters(&self, voters: BTreeSet<NodeId>, keep_learners: bool) -> Result<u64, ApiError> {
        self.raft.change_membership(voters, keep_learners).await.map(|r| r.log_id.index).map_err(membership_error)
    }

    /// Makes `with` a voter in place of the voters `replace` (incarnations of its seat),
    /// from this leader's current membership, in one joint change.
    pub async fn replace_voters(&self, replace: BTreeSet<NodeId>, with: NodeId) -> Result<u64, ApiError> {
        if let Some(other) = replace.iter().find(|id| crate::seat(**id) != crate::seat(with)) {
            return Err(ApiError::bad_request("invalid_body", format!("node {other} is not of the seat of {with}")));
        }
        let m = self.metrics();
        let current: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        if !current.iter().any(|id| replace.contains(id)) {
            return Err(ApiError::new(axum::http::StatusCode::CONFLICT, "bad_request", "no voter to replace"));
        }
        let voters: BTreeSet<NodeId> = current.difference(&replace).copied().chain([with]).collect();
        self.change_voters(voters, false).await
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

/// Who this replica is (from its log, or decided afresh for an empty data directory, then
/// recorded before Raft starts), and the voters to found a group with, if that is the
/// decision.
async fn identify(
    config: &ReplicaConfig,
    log: &LogStore,
    client: &reqwest::Client,
) -> anyhow::Result<(Identity, Option<BTreeMap<NodeId, String>>)> {
    if let Some(identity) = log.identity()? {
        anyhow::ensure!(
            identity.group == config.group,
            "{} belongs to group {:?}, not {:?}: give this server its own data directory",
            config.dir.display(),
            identity.group,
            config.group
        );
        // A founder that stopped before founding founds at this start.
        let found = identity.found.clone().filter(|_| log.is_blank().unwrap_or(false));
        return Ok((identity, found));
    }
    if !log.is_blank()? {
        // A log from before node ids were recorded: it is the seat's own.
        let identity = Identity { group: config.group.clone(), node_id: config.seat, replaces: vec![], found: None };
        log.set_identity(&identity)?;
        return Ok((identity, None));
    }
    // Nothing promised here: whatever state files an earlier life left are not ours.
    for stale in ["state.db", "state.db-wal", "state.db-shm", "snapshot.db", "incoming.db", "building.db"] {
        let path = config.dir.join(stale);
        if path.exists() {
            tracing::warn!(file = %path.display(), "removing state left without a log");
            std::fs::remove_file(path)?;
        }
    }
    let start = Start {
        client,
        token: &config.token.0,
        group: &config.group,
        seat: config.seat,
        first_start: config.first_start,
        init: config.init.as_ref(),
        peers: &config.peers,
        advertise: &config.advertise,
    };
    let decision = crate::bootstrap::decide(&start).await;
    let identity = Identity {
        group: config.group.clone(),
        node_id: decision.id,
        replaces: decision.replaces,
        found: decision.found.clone(),
    };
    log.set_identity(&identity)?;
    Ok((identity, decision.found))
}

/// Every 200 ms, and at once when the group's leader changes (so that a replica is back in
/// rotation as soon as a new leader is elected, not up to a period later), fetch the read
/// index and compare it with what this replica applied.
fn spawn_readiness_probe(replica: std::sync::Weak<Replica>) {
    /// Entries a replica may trail the leader by and still be called caught up.
    const SLACK: u64 = 32;
    let Some(mut metrics) = replica.upgrade().map(|r| r.raft.metrics()) else { return };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut leader = metrics.borrow().current_leader;
        loop {
            let leader_changed = async {
                loop {
                    if metrics.changed().await.is_err() {
                        // Raft stopped: only the tick is left.
                        std::future::pending::<()>().await;
                    }
                    if metrics.borrow().current_leader != leader {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = tick.tick() => {}
                () = leader_changed => {}
            }
            leader = metrics.borrow().current_leader;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_seat_of_three_has_an_election_band_of_its_own() {
        let tuning = Tuning::default();
        let bands: Vec<(u64, u64)> = (1..=4).map(|seat| tuning.election_band(seat)).collect();
        assert_eq!(bands, [(80, 86), (93, 99), (106, 112), (80, 86)]);
        for (low, high) in &bands {
            assert!(tuning.heartbeat.as_millis() < u128::from(*low) && low < high);
        }
    }
}
