//! Who a replica is when it starts (docs/ARCHITECTURE.md, "Membership safety").
//!
//! A replica's data directory holds its vote and its log: what it promised and what it
//! acknowledged. One that lost them must never vote or acknowledge as the node that made
//! those promises: granting any vote, it could hand a majority to a node that lacks an
//! entry the lost directory had acknowledged. So a Raft node id is a *seat* (the `--id` a
//! server is started with, the low 32 bits) and an *incarnation* (the high bits):
//! - a data directory that records a node id keeps it;
//! - an empty one asks the group (its founding voters and peers). If the group exists and
//!   no incarnation of the seat is a member, the seat's own id is used: a new member, which
//!   the autoscaler or an operator adds. If one is, the replica starts as the next
//!   incarnation of its seat, an id the group has never seen; it joins as a learner and,
//!   once caught up, takes the place of its seat's older incarnations (see
//!   [`Replica::take_seat`](crate::Replica::take_seat));
//! - a server that has never run (`--first-start`, which only a supervisor can know) takes
//!   its seat's id as is: it promised nothing;
//! - while no member has a group, the founding voters (`--init`) found one, once every one
//!   of them has answered that it has none.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde::{Deserialize, Serialize};

use quire_common::headers;

use crate::{incarnation, seat, NodeId};

/// What a member tells a starting replica about its group (`GET /raft/membership`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupView {
    pub group: String,
    /// False while the member has no group yet (or is itself still deciding who it is).
    pub initialized: bool,
    pub node_id: Option<NodeId>,
    pub leader: Option<NodeId>,
    pub leader_url: Option<String>,
    pub voters: BTreeMap<NodeId, String>,
    pub learners: BTreeMap<NodeId, String>,
}

impl GroupView {
    pub fn members(&self) -> impl Iterator<Item = (&NodeId, &String)> {
        self.voters.iter().chain(self.learners.iter())
    }

    /// Members that are incarnations of `seat`.
    pub fn incarnations_of(&self, of: u64) -> Vec<NodeId> {
        self.members().map(|(id, _)| *id).filter(|id| seat(*id) == of).collect()
    }
}

/// What a starting replica has to go on.
pub struct Start<'a> {
    pub client: &'a reqwest::Client,
    pub token: &'a str,
    pub group: &'a str,
    /// The `--id` the server was started with.
    pub seat: u64,
    pub first_start: bool,
    /// The founding voters, when this replica is one of a new group's.
    pub init: Option<&'a BTreeMap<NodeId, String>>,
    /// Members to ask, besides the founding voters.
    pub peers: &'a [String],
    pub advertise: &'a str,
}

/// Who the replica will be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: NodeId,
    /// Found a new group with these voters.
    pub found: Option<BTreeMap<NodeId, String>>,
    /// Older incarnations of the seat whose place this one takes once caught up.
    pub replaces: Vec<NodeId>,
}

/// Decides who a replica with an empty data directory is: asks every member it knows until
/// the answers settle it.
pub async fn decide(start: &Start<'_>) -> Decision {
    let mut urls: Vec<&str> = start.peers.iter().map(String::as_str).collect();
    if let Some(init) = start.init {
        urls.extend(init.values().map(String::as_str));
    }
    urls.retain(|u| !same_address(u, start.advertise));
    urls.sort();
    urls.dedup();
    if urls.is_empty() {
        tracing::warn!(seat = start.seat, "no member to ask: starting as node {} and waiting to be added", start.seat);
        return Decision { id: start.seat, found: None, replaces: vec![] };
    }
    let began = Instant::now();
    let mut last_word = Instant::now();
    loop {
        let views = join_all(urls.iter().map(|url| view_of(start, url))).await;
        if let Some(decision) = settle(start, &urls, &views).await {
            tracing::info!(?decision, waited = ?began.elapsed(), "decided who this replica is");
            return decision;
        }
        if last_word.elapsed() > Duration::from_secs(5) {
            let answered = views.iter().filter(|v| v.is_some()).count();
            tracing::warn!(answered, asked = urls.len(), "waiting for the group's members to tell who this replica is");
            last_word = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The decision the answers allow, if any.
async fn settle(start: &Start<'_>, urls: &[&str], views: &[Option<GroupView>]) -> Option<Decision> {
    let initialized: Vec<&GroupView> = views.iter().flatten().filter(|v| v.initialized).collect();
    if initialized.is_empty() {
        // Nobody has a group: the founding voters found one once all of them have said so.
        let init = start.init.filter(|init| init.contains_key(&start.seat))?;
        let all_answered = urls.len() == views.iter().flatten().count();
        return all_answered.then(|| Decision { id: start.seat, found: Some(init.clone()), replaces: vec![] });
    }
    // The leader's view is the newest membership (it holds the entries it has proposed).
    let leader_url = initialized.iter().find_map(|v| v.leader_url.clone())?;
    let view = match initialized.iter().find(|v| v.node_id.is_some() && v.node_id == v.leader) {
        Some(view) => (*view).clone(),
        None => view_of(start, &leader_url).await?,
    };
    let mine = view.incarnations_of(start.seat);
    if mine.is_empty() || (start.first_start && mine == [start.seat]) {
        return Some(Decision { id: start.seat, found: None, replaces: vec![] });
    }
    let next = mine.iter().map(|id| incarnation(*id)).max().unwrap_or(0) + 1;
    Some(Decision { id: (next << 32) | start.seat, found: None, replaces: mine })
}

async fn view_of(start: &Start<'_>, url: &str) -> Option<GroupView> {
    let answer = start
        .client
        .get(format!("{url}/raft/membership"))
        .header(headers::TOKEN, start.token)
        .header(headers::GROUP, start.group)
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .ok()?;
    if !answer.status().is_success() {
        tracing::debug!(%url, status = %answer.status(), "member refused to describe its group");
        return None;
    }
    answer.json().await.ok()
}

/// Whether two base URLs name one address (scheme, host and port, whatever the case or a
/// trailing slash).
pub fn same_address(a: &str, b: &str) -> bool {
    let norm = |u: &str| u.trim().trim_end_matches('/').to_ascii_lowercase();
    norm(a) == norm(b)
}
