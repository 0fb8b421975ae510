//! Routes every replica serves besides its service API, grouped by audience:
//! Raft RPCs between members (`/raft/*`) and operators' membership commands (`/admin/*`).
//! Both need the cluster token.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};

use quire_common::http::{guarded, Json, Token};
use quire_common::{headers, ApiError};

use crate::bootstrap::GroupView;
use crate::replica::{ReadIndexAnswer, Replica};
use crate::{NodeId, TypeConfig};

type Shared = State<Arc<Replica>>;

/// Largest Raft RPC body: a snapshot chunk (see `snapshot_max_chunk_size`), or a batch of
/// log entries.
pub const RAFT_BODY_LIMIT: usize = 64 * 1024 * 1024;

pub fn router(replica: Arc<Replica>, token: Token) -> Router {
    // Every Raft RPC names its group; those to one node name the node too.
    let to_node = Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/read-index", get(read_index))
        .layer(axum::middleware::from_fn_with_state(replica.clone(), addressed_to_me));
    let raft = to_node
        .route("/raft/membership", get(membership))
        .layer(axum::middleware::from_fn_with_state(replica.clone(), of_my_group));
    let routes = raft
        .route("/admin/init", post(init))
        .route("/admin/learners", post(add_learner))
        .route("/admin/voters", post(change_voters))
        .route("/admin/voters/replace", post(replace_voters))
        .route("/admin/members/remove", post(remove_members))
        .route("/admin/metrics", get(metrics))
        .route("/admin/digest", get(digest))
        .route("/admin/drain", post(drain))
        .with_state(replica)
        // Log batches and snapshot chunks are far larger than any API body.
        .layer(axum::extract::DefaultBodyLimit::max(RAFT_BODY_LIMIT));
    guarded(routes, token)
}

/// Refuses a Raft RPC for another group (a request that reached the wrong server).
async fn of_my_group(State(r): Shared, request: Request, next: Next) -> Response {
    let group = request.headers().get(headers::GROUP).and_then(|v| v.to_str().ok());
    if group != Some(r.group.as_str()) {
        let message = format!("this is a replica of group {:?}, not {group:?}", r.group);
        return ApiError::new(StatusCode::CONFLICT, "wrong_group", message).into_response();
    }
    next.run(request).await
}

/// Refuses a Raft RPC for another node: two ids at one address must not make one server
/// answer (and count) for both.
async fn addressed_to_me(State(r): Shared, request: Request, next: Next) -> Response {
    let node = request.headers().get(headers::NODE).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    if node != Some(r.id) {
        let message = format!("this is node {}, not {node:?}", crate::display_id(r.id));
        return ApiError::new(StatusCode::CONFLICT, "wrong_node", message).into_response();
    }
    next.run(request).await
}

/// An RPC from a leader or candidate that claims to be this node: refused (this node would
/// be counting itself).
fn from_myself(r: &Replica, sender: Option<NodeId>) -> Result<(), ApiError> {
    match sender {
        Some(id) if id == r.id => Err(ApiError::new(
            StatusCode::CONFLICT,
            "wrong_node",
            format!("an RPC from node {} reached node {} itself", crate::display_id(id), crate::display_id(r.id)),
        )),
        _ => Ok(()),
    }
}

/// A Raft RPC's body or answer, in postcard (see [`crate::network`]).
struct Rpc<T>(T);

#[axum::async_trait]
impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for Rpc<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let body = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|e| ApiError::bad_request("invalid_body", e.body_text()))?;
        crate::payload::decode(&body)
            .map(Rpc)
            .map_err(|e| ApiError::bad_request("invalid_body", format!("not a Raft RPC of this version: {e}")))
    }
}

impl<T: Serialize> IntoResponse for Rpc<T> {
    fn into_response(self) -> Response {
        match crate::payload::encode(&self.0) {
            Ok(body) => ([(axum::http::header::CONTENT_TYPE, crate::network::RPC_CONTENT_TYPE)], body).into_response(),
            Err(e) => ApiError::internal(format!("cannot encode the answer: {e}")).into_response(),
        }
    }
}

async fn append(
    State(r): Shared,
    Rpc(rpc): Rpc<AppendEntriesRequest<TypeConfig>>,
) -> Result<Rpc<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>>, ApiError> {
    from_myself(&r, rpc.vote.leader_id().voted_for())?;
    Ok(Rpc(r.raft.append_entries(rpc).await))
}

async fn vote(
    State(r): Shared,
    Rpc(rpc): Rpc<VoteRequest<NodeId>>,
) -> Result<Rpc<Result<VoteResponse<NodeId>, RaftError<NodeId>>>, ApiError> {
    from_myself(&r, rpc.vote.leader_id().voted_for())?;
    Ok(Rpc(r.raft.vote(rpc).await))
}

/// One chunk of a snapshot: described in a header, its bytes the raw body.
async fn snapshot(
    State(r): Shared,
    headers: axum::http::HeaderMap,
    data: axum::body::Bytes,
) -> Result<Rpc<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>>, ApiError> {
    let chunk = headers
        .get(crate::network::SNAPSHOT_CHUNK)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| serde_json::from_str::<crate::network::SnapshotChunk>(v).ok())
        .ok_or_else(|| ApiError::bad_request("invalid_body", "a snapshot chunk needs its description header"))?;
    from_myself(&r, chunk.vote.leader_id().voted_for())?;
    let rpc = InstallSnapshotRequest::<TypeConfig> {
        vote: chunk.vote,
        meta: chunk.meta,
        offset: chunk.offset,
        data: data.to_vec(),
        done: chunk.done,
    };
    Ok(Rpc(r.raft.install_snapshot(rpc).await))
}

async fn membership(State(r): Shared) -> Result<axum::Json<GroupView>, ApiError> {
    r.view().map(axum::Json).ok_or_else(|| ApiError::unavailable("this replica has not loaded its log yet"))
}

async fn read_index(State(r): Shared) -> Result<axum::Json<ReadIndexAnswer>, ApiError> {
    Ok(axum::Json(ReadIndexAnswer { index: r.leader_read_index().await? }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InitRequest {
    /// Node id → base URL of every initial voter.
    pub members: BTreeMap<NodeId, String>,
}

async fn init(State(r): Shared, Json(req): Json<InitRequest>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    r.initialize(&req.members).await.map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(axum::Json(serde_json::json!({"initialized": true})))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LearnerRequest {
    pub id: NodeId,
    pub url: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MembershipAnswer {
    /// Log index of the membership entry.
    pub index: u64,
}

async fn add_learner(
    State(r): Shared,
    Json(req): Json<LearnerRequest>,
) -> Result<axum::Json<MembershipAnswer>, ApiError> {
    Ok(axum::Json(MembershipAnswer { index: r.add_learner(req.id, &req.url).await? }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VotersRequest {
    pub voters: BTreeSet<NodeId>,
    /// Keep removed voters as learners (default false: they leave the group).
    #[serde(default)]
    pub keep_learners: bool,
}

async fn change_voters(
    State(r): Shared,
    Json(req): Json<VotersRequest>,
) -> Result<axum::Json<MembershipAnswer>, ApiError> {
    if req.voters.is_empty() {
        return Err(ApiError::bad_request("invalid_body", "a group needs at least one voter"));
    }
    Ok(axum::Json(MembershipAnswer { index: r.change_voters(req.voters, req.keep_learners).await? }))
}

/// A new incarnation takes its seat: `with` replaces the voters `replace`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplaceRequest {
    pub replace: BTreeSet<NodeId>,
    pub with: NodeId,
}

async fn replace_voters(
    State(r): Shared,
    Json(req): Json<ReplaceRequest>,
) -> Result<axum::Json<MembershipAnswer>, ApiError> {
    Ok(axum::Json(MembershipAnswer { index: r.replace_voters(req.replace, req.with).await? }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RemoveRequest {
    pub ids: BTreeSet<NodeId>,
}

async fn remove_members(
    State(r): Shared,
    Json(req): Json<RemoveRequest>,
) -> Result<axum::Json<MembershipAnswer>, ApiError> {
    Ok(axum::Json(MembershipAnswer { index: r.remove_members(req.ids).await? }))
}

async fn metrics(State(r): Shared) -> axum::Json<openraft::RaftMetrics<NodeId, openraft::BasicNode>> {
    axum::Json(r.metrics())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DigestAnswer {
    pub applied_index: u64,
    pub digest: String,
}

async fn digest(State(r): Shared) -> Result<axum::Json<DigestAnswer>, ApiError> {
    let (applied_index, digest) =
        r.reads.digest(r.machine.tables()).await.map_err(|e| ApiError::internal(format!("digest failed: {e}")))?;
    Ok(axum::Json(DigestAnswer { applied_index, digest }))
}

/// Stops taking work before removal: the replica reports not ready, so balancers take it out
/// of rotation, and keeps replicating until it is removed from the group.
async fn drain(State(r): Shared) -> axum::Json<serde_json::Value> {
    r.workers.drain();
    tracing::info!("draining: out of rotation from now on");
    axum::Json(serde_json::json!({"draining": true, "busy": r.workers.busy()}))
}

/// Who a replica is, for its `/status`.
#[derive(Clone)]
pub struct Identity {
    pub name: String,
    /// `catalog` or `order`.
    pub tier: String,
    /// A service-specific condition for readiness besides being caught up (the catalog:
    /// seeded). `None`: none.
    pub gate: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Identity {
    pub fn new(name: impl Into<String>, tier: impl Into<String>) -> Self {
        Identity { name: name.into(), tier: tier.into(), gate: None }
    }
}

/// `/health`, `/ready`, `/status` and `/metrics` of a replica (no token: balancers and
/// operators poll them; they reveal no data).
pub fn status_router(replica: Arc<Replica>, identity: Identity) -> Router {
    Router::new()
        .route("/health", get(|| async { axum::Json(serde_json::json!({"ok": true})) }))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(prometheus))
        .with_state((replica, identity))
}

type StatusState = State<(Arc<Replica>, Identity)>;

pub fn server_status(replica: &Replica, identity: &Identity) -> quire_common::status::ServerStatus {
    let m = replica.metrics();
    let leader = replica.leader();
    let membership = m.membership_config.membership();
    quire_common::status::ServerStatus {
        name: identity.name.clone(),
        tier: identity.tier.clone(),
        url: replica.advertise.clone(),
        pid: std::process::id(),
        role: replica.role(),
        node_id: Some(replica.id),
        leader: leader.as_ref().map(|(id, _)| *id),
        leader_url: leader.map(|(_, url)| url),
        term: m.current_term,
        applied_index: m.last_applied.map_or(0, |l| l.index),
        ready: replica.ready()
            && replica.workers.ready()
            && identity.gate.as_ref().is_none_or(|g| g.load(std::sync::atomic::Ordering::Acquire)),
        slots: replica.workers.slots(),
        // What a balancer's slot covers: a catalog read; an order replica's part of a buy.
        work_ms: replica.workers.costs().map(|c| {
            let work = if identity.tier == "order" { c.order_buy_slot() } else { c.read_slot() };
            work.as_millis() as u64
        }),
        busy: replica.workers.busy(),
        booting: replica.workers.booting(),
        draining: replica.workers.draining(),
        details: serde_json::json!({
            "last_log_index": m.last_log_index,
            "snapshot_index": m.snapshot.map(|s| s.index),
            // A snapshot received from a leader, as opposed to one built here.
            "installed_snapshot": Some(replica.installed_snapshot.load(std::sync::atomic::Ordering::Acquire))
                .filter(|i| *i > 0),
            "purged_index": m.purged.map(|s| s.index),
            "voters": membership.voter_ids().collect::<Vec<_>>(),
            "learners": membership.learner_ids().collect::<Vec<_>>(),
            "after_drops": replica.workers.after_drops.load(std::sync::atomic::Ordering::Relaxed),
        }),
    }
}

async fn ready(State((r, identity)): StatusState) -> axum::response::Response {
    use axum::response::IntoResponse;
    let status = server_status(&r, &identity);
    if status.ready {
        axum::Json(status).into_response()
    } else {
        ApiError::unavailable("this replica is not caught up with a known leader").into_response()
    }
}

async fn status(State((r, identity)): StatusState) -> axum::Json<quire_common::status::ServerStatus> {
    axum::Json(server_status(&r, &identity))
}

async fn prometheus(State((r, identity)): StatusState) -> String {
    let m = r.metrics();
    let labels = format!("server=\"{}\",tier=\"{}\"", identity.name, identity.tier);
    format!(
        "# TYPE quire_raft_term gauge\nquire_raft_term{{{labels}}} {}\n\
         # TYPE quire_raft_applied_index gauge\nquire_raft_applied_index{{{labels}}} {}\n\
         # TYPE quire_raft_last_log_index gauge\nquire_raft_last_log_index{{{labels}}} {}\n\
         # TYPE quire_raft_is_leader gauge\nquire_raft_is_leader{{{labels}}} {}\n{}",
        m.current_term,
        m.last_applied.map_or(0, |l| l.index),
        m.last_log_index.unwrap_or(0),
        u8::from(r.is_leader()),
        quire_common::timings::prometheus(&labels),
    )
}
