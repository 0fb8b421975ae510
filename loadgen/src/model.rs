//! What a simulated client does, how its requests and the client itself end, and the oracle:
//! the fewest servers that could carry a given arrival rate.
//!
//! The live load generator and the simulator share this model, so their reports compare.

use std::time::Duration;

use quire_common::capacity::Costs;
use serde::{Deserialize, Serialize};

/// A client's behaviour (docs/ARCHITECTURE.md, "quire load").
///
/// A client browses `min_browses..=max_browses` times (uniform), each browse a search with
/// probability `search_share`, else a lookup; then, if every browse was on time, it buys with
/// probability `buy_probability`. It leaves at its first request that is not answered in time
/// (late, dropped or failed): it is unhappy already, and a real shopper would not go on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientModel {
    pub min_browses: u32,
    pub max_browses: u32,
    /// Chance that a client whose every browse was on time buys once.
    pub buy_probability: f64,
    /// Chance that a browse is a search (`GET /search/{topic}`) rather than a lookup.
    pub search_share: f64,
    /// Share of lookups the frontend's cache answers without the catalog (used by the
    /// simulator and the oracle; the live store has its own cache). 0.3 is what the live
    /// store's frontends measured under the benchmark's load: with a few books, buys
    /// invalidate each one several times a second on every frontend.
    pub lookup_hit_ratio: f64,
    /// A browse answered later than this makes the client unhappy.
    #[serde(with = "millis")]
    pub browse_timeout: Duration,
    /// A buy answered later than this makes the client unhappy.
    #[serde(with = "millis")]
    pub buy_timeout: Duration,
}

impl Default for ClientModel {
    fn default() -> Self {
        ClientModel {
            min_browses: 1,
            max_browses: 4,
            buy_probability: 0.5,
            search_share: 0.5,
            lookup_hit_ratio: 0.3,
            browse_timeout: Duration::from_secs(1),
            buy_timeout: Duration::from_secs(2),
        }
    }
}

impl ClientModel {
    /// Mean browses per client.
    pub fn mean_browses(&self) -> f64 {
        (self.min_browses as f64 + self.max_browses as f64) / 2.0
    }

    /// The client's timeout for one request of `op`.
    pub fn timeout(&self, op: Op) -> Duration {
        match op {
            Op::Lookup | Op::Search => self.browse_timeout,
            Op::Buy => self.buy_timeout,
        }
    }
}

/// The operations a client performs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Lookup,
    Search,
    Buy,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::Lookup, Op::Search, Op::Buy];

    /// The name used in reports: `lookup`, `search`, `buy`.
    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Search => "search",
            Op::Buy => "buy",
        }
    }
}

/// How a client's visit ended: the first request that was not answered in time decides;
/// otherwise `Purchased` if it bought, else `Ok`. `Ok` and `Purchased` are happy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Purchased,
    /// A request was answered late, timed out, or the store answered 504.
    Timeout,
    /// The store shed a request (503 `dropped`): it could not meet its deadline.
    Dropped,
    /// Any other error or a connection failure.
    Failed,
}

impl Status {
    pub const ALL: [Status; 5] = [Status::Ok, Status::Purchased, Status::Timeout, Status::Dropped, Status::Failed];

    /// The name used in reports: `ok`, `purchased`, `timeout`, `dropped`, `failed`.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Purchased => "purchased",
            Status::Timeout => "timeout",
            Status::Dropped => "dropped",
            Status::Failed => "failed",
        }
    }

    pub fn is_happy(self) -> bool {
        matches!(self, Status::Ok | Status::Purchased)
    }
}

/// How one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered in time (including a correct refusal such as out of stock).
    Ok,
    /// Answered, or given up on, after its timeout.
    Late,
    /// Shed by the store (503 `dropped`).
    Dropped,
    /// Any other error.
    Failed,
}

impl Outcome {
    /// The client status this outcome gives when it is the client's first non-`Ok` one.
    pub fn status(self) -> Option<Status> {
        match self {
            Outcome::Ok => None,
            Outcome::Late => Some(Status::Timeout),
            Outcome::Dropped => Some(Status::Dropped),
            Outcome::Failed => Some(Status::Failed),
        }
    }
}

/// Tier names, in report order.
pub const TIERS: [&str; 3] = ["frontend", "catalog", "order"];

/// Floors: a store never runs fewer than 1 frontend, 3 catalog and 3 order replicas (Raft voters).
pub const TIER_FLOORS: [(&str, u32); 3] = [("frontend", 1), ("catalog", 3), ("order", 3)];

/// The oracle: servers each tier needs at an instant when clients arrive at `rate`/s
/// (fractional, before rounding up), from the mean work per client:
///
/// ```text
/// frontend: (E[browses] + P(buy)) × frontend_slot
/// catalog:  E[browses] × (search_share + (1 − search_share)(1 − lookup_hit_ratio)) × catalog_read_slot
/// order:    P(buy) × order_buy_slot
/// ```
///
/// each divided by `costs.slots`. Every client is assumed on time (so P(buy) = buy_probability):
/// the oracle is the work of a store that keeps everyone happy.
pub fn oracle_load(rate: f64, model: &ClientModel, costs: &Costs) -> [(&'static str, f64); 3] {
    let browses = model.mean_browses();
    let buys = model.buy_probability;
    let catalog_share = model.search_share + (1.0 - model.search_share) * (1.0 - model.lookup_hit_ratio);
    let slots = costs.slots.max(1) as f64;
    let per_client = [
        (browses + buys) * costs.frontend_slot().as_secs_f64(),
        browses * catalog_share * costs.catalog_read_slot().as_secs_f64(),
        buys * costs.order_buy_slot().as_secs_f64(),
    ];
    [
        (TIERS[0], rate * per_client[0] / slots),
        (TIERS[1], rate * per_client[1] / slots),
        (TIERS[2], rate * per_client[2] / slots),
    ]
}

/// Whole servers the oracle runs per tier at `rate`: the load rounded up, never below the floor.
pub fn oracle_servers(rate: f64, model: &ClientModel, costs: &Costs) -> [(&'static str, u32); 3] {
    let load = oracle_load(rate, model, costs);
    let mut out = TIER_FLOORS;
    for ((_, servers), (_, load)) in out.iter_mut().zip(load) {
        // A hair of tolerance keeps float noise (2.0000000001) from costing a whole server.
        *servers = (*servers).max((load - 1e-9).ceil().max(0.0) as u32);
    }
    out
}

/// Durations as whole milliseconds in JSON, like [`Costs`].
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oracle_numbers() {
        let model = ClientModel { lookup_hit_ratio: 0.8, ..ClientModel::default() };
        let costs = Costs::CLOUD_SIM;
        // Per client: frontend (2.5 + 0.5) × 60 ms = 0.18 s; catalog 2.5 × (0.5 + 0.5 × 0.2) × 250 ms
        // = 0.375 s; order 0.5 × 200 ms = 0.1 s.
        let load = oracle_load(10.0, &model, &costs);
        assert_eq!(load.map(|l| l.0), TIERS);
        let want = [1.8, 3.75, 1.0];
        for ((_, got), want) in load.iter().zip(want) {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
        assert_eq!(oracle_servers(10.0, &model, &costs), [("frontend", 2), ("catalog", 4), ("order", 3)]);
        assert_eq!(oracle_servers(0.0, &model, &costs), TIER_FLOORS);
        // Exactly 2.0 frontends' load needs two, not three.
        let rate = 2.0 / 0.18;
        assert_eq!(oracle_servers(rate, &model, &costs)[0].1, 2);

        let wide = Costs { slots: 4, ..costs };
        let load = oracle_load(10.0, &model, &wide);
        assert!((load[1].1 - 3.75 / 4.0).abs() < 1e-9);
    }

    #[test]
    fn names_and_serde() {
        assert_eq!(serde_json::to_string(&Op::Lookup).unwrap(), "\"lookup\"");
        assert_eq!(serde_json::to_string(&Status::Purchased).unwrap(), "\"purchased\"");
        assert!(Status::Purchased.is_happy() && !Status::Dropped.is_happy());
        assert_eq!(Outcome::Late.status(), Some(Status::Timeout));
        let model = ClientModel::default();
        let json = serde_json::to_string(&model).unwrap();
        assert!(json.contains("\"browse_timeout\":1000"), "{json}");
        assert_eq!(serde_json::from_str::<ClientModel>(&json).unwrap(), model);
        assert_eq!(model.timeout(Op::Buy), Duration::from_secs(2));
    }
}
