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
//!   of them has answered that it has none, or only the founding entry and no elected
//!   leader (a founder that stopped before founding, or was wiped then, founds with the
//!   same entry as the others);
//! - a group of one founds itself;
//! - answers of another group count for nothing, and a member with a log it has not
//!   loaded yet does not answer.

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
    /// False while the member has no group yet (or, with an empty data directory, is still
    /// deciding who it is). A member with a log that has not loaded it yet does not answer.
    pub initialized: bool,
    pub node_id: Option<NodeId>,
    pub leader: Option<NodeId>,
    pub leader_url: Option<String>,
    pub voters: BTreeMap<NodeId, String>,
    pub learners: BTreeMap<NodeId, String>,
    /// The member's last log index (`None`: an empty log; 0: the founding entry alone).
    #[serde(default)]
    pub last_log_index: Option<u64>,
    /// Whether the member's vote is for an elected leader: once any is, the group has had
    /// a leader, and its founding is over.
    #[serde(default)]
    pub vote_committed: bool,
}

impl GroupView {
    pub fn members(&self) -> impl Iterator<Item = (&NodeId, &String)> {
        self.voters.iter().chain(self.learners.iter())
    }

    /// Members that are incarnations of `seat`.
    pub fn incarnations_of(&self, of: u64) -> Vec<NodeId> {
        self.members().map(|(id, _)| *id).filter(|id| seat(*id) == of).collect()
    }

    /// Founded with `init` and nothing more: no entry past the founding one, no leader ever.
    fn only_founded(&self, init: &BTreeMap<NodeId, String>) -> bool {
        self.last_log_index.unwrap_or(0) == 0 && !self.vote_committed && self.voters.keys().eq(init.keys())
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
        // A group of one founds itself; anything else waits to be added.
        let found = start.init.filter(|init| init.keys().eq([start.seat].iter())).cloned();
        if found.is_none() {
            tracing::warn!(
                seat = start.seat,
                "no member to ask: starting as node {} and waiting to be added",
                start.seat
            );
        }
        return Decision { id: start.seat, found, replaces: vec![] };
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
    // An answer of another group is no answer.
    let answered: Vec<&GroupView> = views.iter().flatten().filter(|v| v.group == start.group).collect();
    let initialized: Vec<&GroupView> = answered.iter().copied().filter(|v| v.initialized).collect();
    if let Some(init) = start.init.filter(|init| init.contains_key(&start.seat)) {
        // Every founder answered, and nobody has more than the founding entry (a founder
        // that started late may have founded already, alone: found with it, the same entry).
        if answered.len() == urls.len() && initialized.iter().all(|v| v.only_founded(init)) {
            return Some(Decision { id: start.seat, found: Some(init.clone()), replaces: vec![] });
        }
    }
    if initialized.is_empty() {
        return None;
    }
    // The leader's view is the newest membership (it holds the entries it has proposed);
    // the incarnations seen anywhere are counted too, so a stale view cannot hand out an
    // incarnation number that is in use.
    let leader_url = initialized.iter().find_map(|v| v.leader_url.clone())?;
    let leader = match initialized.iter().find(|v| v.node_id.is_some() && v.node_id == v.leader) {
        Some(view) => (*view).clone(),
        None => view_of(start, &leader_url).await.filter(|v| v.group == start.group)?,
    };
    let mine = leader.incarnations_of(start.seat);
    if mine.is_empty() || (start.first_start && mine == [start.seat]) {
        return Some(Decision { id: start.seat, found: None, replaces: vec![] });
    }
    let seen = initialized.iter().flat_map(|v| v.incarnations_of(start.seat)).chain(mine.iter().copied());
    let next = seen.map(incarnation).max().unwrap_or(0) + 1;
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

#[cfg(test)]
mod tests {
    use super::*;

    const URLS: [&str; 3] = ["http://a:1", "http://b:2", "http://c:3"];

    fn founders() -> BTreeMap<NodeId, String> {
        URLS.iter().enumerate().map(|(i, u)| (i as u64 + 1, u.to_string())).collect()
    }

    /// What founder `id` answers: founded (only the founding entry, or `last` more), or not.
    fn view(id: NodeId, founded: Option<u64>, leader: Option<NodeId>) -> GroupView {
        let init = founders();
        GroupView {
            group: "catalog-x".into(),
            initialized: founded.is_some(),
            node_id: Some(id),
            leader,
            leader_url: leader.map(|l| init[&l].clone()),
            voters: if founded.is_some() { init } else { BTreeMap::new() },
            learners: BTreeMap::new(),
            last_log_index: founded,
            vote_committed: leader.is_some(),
        }
    }

    async fn settle_as(seat: u64, views: &[Option<GroupView>]) -> Option<Decision> {
        let (client, init) = (reqwest::Client::new(), founders());
        let start = Start {
            client: &client,
            token: "t",
            group: "catalog-x",
            seat,
            first_start: false,
            init: Some(&init),
            peers: &[],
            advertise: URLS[seat as usize - 1],
        };
        let urls: Vec<&str> = URLS.iter().copied().filter(|u| *u != start.advertise).collect();
        settle(&start, &urls, views).await
    }

    #[tokio::test]
    async fn founders_found_once_every_one_has_answered() {
        assert_eq!(settle_as(1, &[Some(view(2, None, None)), None]).await, None);
        let found = settle_as(1, &[Some(view(2, None, None)), Some(view(3, None, None))]).await;
        assert_eq!(found, Some(Decision { id: 1, found: Some(founders()), replaces: vec![] }));
    }

    #[tokio::test]
    async fn a_late_founder_founds_with_those_that_founded_alone() {
        // The others founded already (the same founding entry), and nothing happened since.
        let views = [Some(view(2, Some(0), None)), Some(view(3, None, None))];
        let found = settle_as(1, &views).await.expect("a decision");
        assert_eq!(found.found, Some(founders()));
        // Once a leader was elected, the founding is over: a wiped founder is a new
        // incarnation of its seat.
        let views = [Some(view(2, Some(4), Some(2))), Some(view(3, Some(4), Some(2)))];
        let joined = settle_as(1, &views).await.expect("a decision");
        assert_eq!(joined, Decision { id: (1 << 32) | 1, found: None, replaces: vec![1] });
    }

    #[tokio::test]
    async fn answers_of_another_group_count_for_nothing() {
        let other = GroupView { group: "order-x".into(), ..view(2, None, None) };
        assert_eq!(settle_as(1, &[Some(other), Some(view(3, None, None))]).await, None);
    }

    #[tokio::test]
    async fn an_incarnation_number_seen_anywhere_is_not_handed_out_again() {
        // The leader's view lacks incarnation 2 of seat 1, which a follower saw.
        let mut leader = view(2, Some(9), Some(2));
        leader.voters.remove(&1);
        leader.voters.insert((1 << 32) | 1, URLS[0].into());
        let mut follower = view(3, Some(9), Some(2));
        follower.learners.insert((2 << 32) | 1, URLS[0].into());
        let decision = settle_as(1, &[Some(leader), Some(follower)]).await.expect("a decision");
        assert_eq!(decision.id, (3 << 32) | 1);
        assert_eq!(decision.replaces, vec![(1 << 32) | 1]);
    }
}
