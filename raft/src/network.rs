//! Raft RPCs over HTTP: each RPC is a POST to the peer's `/raft/*` route carrying the
//! cluster token, the group it is meant for and the node it is meant for (a peer refuses an
//! RPC for another group or node); the peer answers with the `Result` of the openraft call.
//! Bodies and answers are postcard ([`RPC_CONTENT_TYPE`], see [`crate::payload`]), but for a
//! snapshot chunk, whose bytes travel raw.

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use quire_common::headers;

use crate::payload;
use crate::{NodeId, TypeConfig};

/// Largest AppendEntries body sent at once (a single larger entry still goes alone).
const MAX_APPEND_BYTES: usize = 256 * 1024;

/// The content type of a Raft RPC's body and answer.
pub const RPC_CONTENT_TYPE: &str = "application/x-postcard";

fn encode<T: Serialize, E: std::error::Error>(
    rpc: &T,
) -> Result<Vec<u8>, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>> {
    payload::encode(rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))
}

/// The header describing a snapshot chunk whose bytes are the request's body.
pub const SNAPSHOT_CHUNK: &str = "x-quire-snapshot-chunk";

/// An InstallSnapshot RPC but for its data.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct SnapshotChunk {
    pub vote: openraft::Vote<NodeId>,
    pub meta: openraft::SnapshotMeta<NodeId, BasicNode>,
    pub offset: u64,
    pub done: bool,
}

#[derive(Clone)]
pub struct Network {
    pub client: reqwest::Client,
    pub token: std::sync::Arc<str>,
    pub group: std::sync::Arc<str>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        // Parsed once per peer, not once per RPC. An address that does not parse fails
        // each RPC as unreachable.
        let url = |route: Route| reqwest::Url::parse(&format!("{}/raft/{}", node.addr, route.name())).ok();
        Peer {
            target,
            addr: node.addr.clone(),
            append: url(Route::Append),
            vote: url(Route::Vote),
            snapshot: url(Route::Snapshot),
            client: self.client.clone(),
            token: self.token.clone(),
            group: self.group.clone(),
        }
    }
}

/// The Raft RPCs a peer serves.
#[derive(Debug, Clone, Copy)]
enum Route {
    Append,
    Vote,
    Snapshot,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Append => "append",
            Route::Vote => "vote",
            Route::Snapshot => "snapshot",
        }
    }
}

pub struct Peer {
    target: NodeId,
    addr: String,
    /// Each [`Route`] at the peer.
    append: Option<reqwest::Url>,
    vote: Option<reqwest::Url>,
    snapshot: Option<reqwest::Url>,
    client: reqwest::Client,
    token: std::sync::Arc<str>,
    group: std::sync::Arc<str>,
}

impl Peer {
    async fn send<Resp, E>(
        &self,
        route: Route,
        body: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        self.post(route, body, RPC_CONTENT_TYPE, None, option).await
    }

    async fn post<Resp, E>(
        &self,
        route: Route,
        body: Vec<u8>,
        content_type: &str,
        chunk: Option<String>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        // Timed until the answer is decoded (`quire_common::timings`).
        let _timing = tracing::info_span!("raft.send", hop = route.name());
        let url = match route {
            Route::Append => &self.append,
            Route::Vote => &self.vote,
            Route::Snapshot => &self.snapshot,
        };
        let Some(url) = url.clone() else {
            let e = std::io::Error::other(format!("{} is not a URL", self.addr));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        };
        let mut request = self
            .client
            .post(url)
            .header(headers::TOKEN, &*self.token)
            .header(headers::GROUP, &*self.group)
            .header(headers::NODE, self.target)
            .timeout(option.hard_ttl())
            .header(reqwest::header::CONTENT_TYPE, content_type);
        if let Some(chunk) = chunk {
            request = request.header(SNAPSHOT_CHUNK, chunk);
        }
        let response = request.body(body).send().await.map_err(|e| {
            if e.is_connect() {
                RPCError::Unreachable(Unreachable::new(&e))
            } else {
                RPCError::Network(NetworkError::new(&e))
            }
        })?;
        if response.status() == reqwest::StatusCode::CONFLICT {
            // Another node, or another group, answers at this address (wrong_node,
            // wrong_group): as good as unreachable, so openraft backs off from it.
            let e = std::io::Error::other(format!("{} is not node {} of this group", self.addr, self.target));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        }
        if !response.status().is_success() {
            let e = std::io::Error::other(format!("peer answered {}", response.status()));
            return Err(RPCError::Network(NetworkError::new(&e)));
        }
        let body = response.bytes().await.map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            payload::decode(&body).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result
            .map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, BasicNode::new(&self.addr), e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // openraft gives an AppendEntries one heartbeat interval. A batch too big to carry
        // in that time would time out forever, so ask for fewer entries instead.
        let body = encode(&rpc)?;
        let entries = rpc.entries.len() as u64;
        if body.len() > MAX_APPEND_BYTES && entries > 1 {
            let hint = (entries * MAX_APPEND_BYTES as u64 / body.len() as u64).max(1);
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(hint)));
        }
        self.send(Route::Append, body, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        // The chunk travels as the raw body; what describes it, in a header.
        let chunk = SnapshotChunk { vote: rpc.vote, meta: rpc.meta, offset: rpc.offset, done: rpc.done };
        let header = serde_json::to_string(&chunk).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.post(Route::Snapshot, rpc.data, "application/octet-stream", Some(header), &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(Route::Vote, encode(&rpc)?, &option).await
    }
}
