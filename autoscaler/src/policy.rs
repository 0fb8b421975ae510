//! Policies: pure functions (with memory) from what the tiers look like to how many servers
//! each should have. The live autoscaler and the simulator call the same code.
//!
//! # Layout
//! - this file: the [`Policy`] trait, what it observes ([`Observation`], [`TierState`]) and
//!   decides ([`Decision`]), the time budgets the tiers share, and [`by_name`].
//! - [`queue`]: queue too long twice → +2, three idle polls → −1, frontends by ratio.
//! - [`rate`]: servers from the arrival rate, factors 0.5 / 0.25, cool-down.
//! - [`hpa`]: Kubernetes' HorizontalPodAutoscaler formula, as a baseline.
//! - [`staffing`]: the `default` policy, sized for each tier's wait budget from its demand
//!   (fed forward from the frontends to catalog and order), the demand's steps and trend, and
//!   the backlog.

#[cfg(test)]
mod bench;
mod hpa;
mod queue;
mod rate;
mod staffing;
#[cfg(test)]
mod testkit;

pub use hpa::Hpa;
pub use queue::Queue;
pub use rate::Rate;
pub use staffing::Staffing;

use std::time::Duration;

use quire_common::capacity::Costs;
use quire_common::samples::TierSample;
use serde::{Deserialize, Serialize};

/// The tiers the autoscaler sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierKind {
    /// Stateless frontends behind the edge.
    Frontend,
    /// Catalog replicas: 3 voters that always stay, plus learners.
    Catalog,
    /// Order replicas: likewise.
    Order,
}

impl TierKind {
    pub const ALL: [TierKind; 3] = [TierKind::Frontend, TierKind::Catalog, TierKind::Order];

    pub fn name(self) -> &'static str {
        match self {
            TierKind::Frontend => "frontend",
            TierKind::Catalog => "catalog",
            TierKind::Order => "order",
        }
    }

    /// Slot time of one request of this tier under `costs`.
    pub fn service_time(self, costs: &Costs) -> Duration {
        match self {
            TierKind::Frontend => costs.frontend_slot(),
            TierKind::Catalog => costs.catalog_read_slot(),
            TierKind::Order => costs.order_buy_slot(),
        }
    }
}

/// One tier at the moment of a decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierState {
    pub tier: TierKind,
    /// The last second's sample, merged over the tier's balancers.
    pub sample: TierSample,
    /// Servers ready and serving.
    pub ready: u32,
    /// Servers launched and still booting.
    pub booting: u32,
    /// The tier is kept within these bounds.
    pub min: u32,
    pub max: u32,
}

impl TierState {
    /// Servers launched and not asked to stop: what a target is compared with.
    pub fn current(&self) -> u32 {
        self.ready + self.booting
    }

    /// `target` brought within the tier's bounds.
    pub fn clamp(&self, target: u32) -> u32 {
        target.clamp(self.min, self.max.max(self.min))
    }

    /// The decision that moves the tier to `target` (clamped), or none if it is there already.
    pub fn resize(&self, target: u32) -> Option<Decision> {
        let target = self.clamp(target);
        (target != self.current()).then_some(Decision { tier: self.tier, target })
    }

    /// Servers the last second's arrivals keep busy if each takes the tier's slot time:
    /// `arrival_rate × service_time / slots`, fractional.
    pub fn offered_servers(&self, costs: &Costs) -> f64 {
        self.sample.arrival_rate * self.tier.service_time(costs).as_secs_f64() / f64::from(costs.slots.max(1))
    }
}

/// A browse is on time within this (docs/ARCHITECTURE.md, "Capacity emulation").
pub const BROWSE_DEADLINE: Duration = Duration::from_secs(1);
/// A buy is on time within this.
pub const BUY_DEADLINE: Duration = Duration::from_secs(2);

impl TierKind {
    /// How long a request may wait in this tier's queue, its share of the client's deadline.
    ///
    /// A browse's slack is what its deadline leaves after the frontend's and the catalog's slot
    /// times (690 ms under `cloud-sim`); a buy's, after the frontend's and the order slot times
    /// and the write latency (1340 ms). The frontend takes 30 % of the browse slack and the
    /// catalog 60 %: a tier's queueing headroom costs about `service_time / wait` servers, so
    /// the split that minimises the total gives each tier a wait near √service (60 ms against
    /// 250 ms: about 1 : 2). The order tier takes 90 % of the buy slack less the frontend's
    /// share. The last 10 % is left for the network and the balancers.
    pub fn wait_budget(self, costs: &Costs) -> Duration {
        let browse_slack =
            BROWSE_DEADLINE.saturating_sub(costs.frontend_slot()).saturating_sub(costs.catalog_read_slot());
        let buy_slack = BUY_DEADLINE
            .saturating_sub(costs.frontend_slot())
            .saturating_sub(costs.order_buy_slot())
            .saturating_sub(costs.buy_write_latency());
        let frontend = browse_slack.mul_f64(0.3);
        match self {
            TierKind::Frontend => frontend,
            TierKind::Catalog => browse_slack.mul_f64(0.6),
            TierKind::Order => buy_slack.mul_f64(0.9).saturating_sub(frontend),
        }
    }
}

/// Everything a policy sees at one decision (one per second).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Seconds since the autoscaler started.
    pub now: f64,
    /// What work costs, for policies that size from rates.
    pub costs: Costs,
    /// One entry per tier, in [`TierKind::ALL`] order.
    pub tiers: Vec<TierState>,
}

impl Observation {
    pub fn tier(&self, kind: TierKind) -> Option<&TierState> {
        self.tiers.iter().find(|t| t.tier == kind)
    }
}

/// Run `target` servers in `tier` (booting ones included). The backend clamps it to the tier's
/// bounds, launches the missing servers and drains the surplus, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub tier: TierKind,
    pub target: u32,
}

/// A scaling policy. `decide` is called once per sample period with the new observation and
/// returns a decision for every tier it wants to change; it must not read clocks, randomness
/// or anything but `obs` and its own memory, so that a simulation replays it exactly.
pub trait Policy: Send {
    fn name(&self) -> &'static str;
    fn decide(&mut self, obs: &Observation) -> Vec<Decision>;
}

/// The policies [`by_name`] knows, the default first.
pub const NAMES: [&str; 4] = ["default", "queue", "rate", "hpa"];

/// A fresh policy with its default parameters, by the name `--policy` takes.
pub fn by_name(name: &str) -> Option<Box<dyn Policy>> {
    match name {
        "default" => Some(Box::new(Staffing::default())),
        "queue" => Some(Box::new(Queue::default())),
        "rate" => Some(Box::new(Rate::default())),
        "hpa" => Some(Box::new(Hpa::default())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_builds_the_policy_of_that_name() {
        for name in NAMES {
            let policy = by_name(name).expect("listed policy");
            assert_eq!(policy.name(), name);
        }
        assert!(by_name("nope").is_none());
    }

    #[test]
    fn wait_budgets_split_the_deadlines() {
        let costs = Costs::CLOUD_SIM;
        let ms = |t: TierKind| t.wait_budget(&costs).as_millis();
        assert_eq!(ms(TierKind::Frontend), 207);
        assert_eq!(ms(TierKind::Catalog), 414);
        assert_eq!(ms(TierKind::Order), 999);
    }

    #[test]
    fn resize_clamps_and_skips_no_change() {
        let mut obs = testkit::observation(0.0);
        let catalog = testkit::tier_mut(&mut obs, TierKind::Catalog);
        catalog.max = 10;
        assert_eq!(catalog.resize(1), None, "clamped to the 3 voters, where it is");
        assert_eq!(catalog.resize(50), Some(Decision { tier: TierKind::Catalog, target: 10 }));
        assert_eq!(catalog.resize(4), Some(Decision { tier: TierKind::Catalog, target: 4 }));
    }
}
