//! Header names shared by every hop.

/// Cluster token guarding replication, admin and invalidation routes.
pub const TOKEN: &str = "x-quire-token";
/// Absolute deadline of the request, in milliseconds since the Unix epoch.
pub const DEADLINE: &str = "x-quire-deadline";
/// Set by a replica that is not the leader: the leader's base URL, if known.
pub const LEADER: &str = "x-quire-leader";
/// Client-chosen key that makes a buy exactly-once.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Name of the backend that served a request (set by balancers; for tests and debugging).
pub const SERVED_BY: &str = "x-quire-served-by";
/// Marks a request one replica passed to its group's leader, which must not pass it on again
/// (nor redo work the first replica did).
pub const FORWARDED: &str = "x-quire-forwarded";
/// The Raft group a replication RPC is meant for: a replica refuses one for another group.
pub const GROUP: &str = "x-quire-group";
/// The Raft node id a replication RPC is meant for: a replica refuses one for another node
/// (two ids at one address, or a request that reached the wrong server).
pub const NODE: &str = "x-quire-node";
