//! The `/status` body every server serves, read by balancers, `quire status` and tests.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Leader,
    Follower,
    Learner,
    Candidate,
    /// Not a Raft member (frontends, balancers), or a replica not yet part of a group.
    #[default]
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ServerStatus {
    /// e.g. `catalog-2`, `frontend-1`, `edge`.
    pub name: String,
    /// edge, frontend, catalog-balancer, order-balancer, catalog, order.
    pub tier: String,
    pub url: String,
    pub pid: u32,
    pub role: Role,
    /// Raft node id of this replica (replicas only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    /// Raft node id of the group's leader, if known (replicas only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_url: Option<String>,
    #[serde(default)]
    pub term: u64,
    #[serde(default)]
    pub applied_index: u64,
    /// Worker slots, when limited (`--profile cloud-sim`); balancers dispatch within them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// Slots in use.
    #[serde(default)]
    pub busy: u32,
    /// How long one request holds a slot here, in milliseconds (its emulated work); a
    /// balancer counts the slot free after that even if the answer is still on its way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_ms: Option<u64>,
    /// Booting (launched, not ready yet) or draining (leaving): not ready either way.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub booting: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// Ready to serve: replicas caught up with the leader, others started.
    pub ready: bool,
    /// Service-specific details (balancer backends, cache size, rates, ...).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}
