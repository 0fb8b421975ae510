//! Observations for the policies' unit tests: a quiet fleet at its floors to edit by hand, and
//! [`Fleet`], a fluid model of the tiers that boots what a policy asks for, to run a policy
//! through a load curve.

use quire_common::capacity::Costs;
use quire_common::samples::TierSample;

use super::{Decision, Observation, TierKind, TierState};

/// Highest count any test tier may reach.
pub const MAX: u32 = 64;

/// The floor of each tier: one frontend, three Raft voters per replicated tier.
pub fn floor(kind: TierKind) -> u32 {
    match kind {
        TierKind::Frontend => 1,
        TierKind::Catalog | TierKind::Order => 3,
    }
}

/// Every tier at its floor, ready, idle.
pub fn observation(now: f64) -> Observation {
    let tiers = TierKind::ALL
        .iter()
        .map(|&kind| {
            let n = floor(kind);
            TierState {
                tier: kind,
                sample: TierSample {
                    tier: kind.name().to_owned(),
                    interval_ms: 1000,
                    total_slots: n,
                    backends: n,
                    ..TierSample::default()
                },
                ready: n,
                booting: 0,
                min: n,
                max: MAX,
            }
        })
        .collect();
    Observation { now, costs: Costs::CLOUD_SIM, tiers }
}

pub fn tier_mut(obs: &mut Observation, kind: TierKind) -> &mut TierState {
    obs.tiers.iter_mut().find(|t| t.tier == kind).expect("every tier is observed")
}

/// Sets a tier's servers; its slots follow the ready ones.
pub fn servers(obs: &mut Observation, kind: TierKind, ready: u32, booting: u32) {
    let slots = obs.costs.slots;
    let t = tier_mut(obs, kind);
    t.ready = ready;
    t.booting = booting;
    t.sample.total_slots = ready * slots;
    t.sample.backends = ready;
}

/// Sets a tier's last second: arrivals, queue and busy slots; the oldest wait follows the
/// queue (a queue drains at `total_slots / service_time`).
pub fn load(obs: &mut Observation, kind: TierKind, rate: f64, queue_len: u32, busy: u32) {
    let service_ms = kind.service_time(&obs.costs).as_secs_f64() * 1000.0;
    let t = tier_mut(obs, kind);
    t.sample.arrival_rate = rate;
    t.sample.arrivals = rate.round() as u64;
    t.sample.completed = rate.round() as u64;
    t.sample.queue_len = queue_len;
    t.sample.busy_slots = busy.min(t.sample.total_slots);
    t.sample.mean_service_ms = if rate > 0.0 { service_ms } else { 0.0 };
    let per_slot = f64::from(queue_len) / f64::from(t.sample.total_slots.max(1));
    t.sample.oldest_wait_ms = (per_slot * service_ms) as u64;
}

/// The target a policy asked for `kind`, if it asked.
pub fn target(decisions: &[Decision], kind: TierKind) -> Option<u32> {
    decisions.iter().find(|d| d.tier == kind).map(|d| d.target)
}

/// A fluid model of the three tiers, one step per second: servers boot for `costs.boot`,
/// surplus is removed newest first (booting ones before ready ones), work beyond the ready
/// slots queues, and queued work older than the tier's wait budget is dropped (`pre_drops`).
pub struct Fleet {
    pub now: f64,
    pub costs: Costs,
    tiers: Vec<Model>,
}

struct Model {
    kind: TierKind,
    ready: u32,
    /// When each booting server becomes ready, oldest launch first.
    booting: Vec<f64>,
    /// Requests waiting.
    backlog: f64,
}

impl Default for Fleet {
    fn default() -> Self {
        let tiers = TierKind::ALL.iter().map(|&kind| Model { kind, ready: floor(kind), booting: vec![], backlog: 0.0 });
        Fleet { now: 0.0, costs: Costs::CLOUD_SIM, tiers: tiers.collect() }
    }
}

impl Fleet {
    /// Runs one second at `rates` (frontend, catalog, order arrivals per second) and returns
    /// what a policy sees at its end.
    pub fn step(&mut self, rates: [f64; 3]) -> Observation {
        self.now += 1.0;
        let mut obs = observation(self.now);
        for (m, rate) in self.tiers.iter_mut().zip(rates) {
            let now = self.now;
            let done = m.booting.iter().filter(|&&at| at <= now).count();
            m.booting.drain(..done);
            m.ready += done as u32;
            let service = m.kind.service_time(&self.costs).as_secs_f64();
            let capacity = f64::from(m.ready * self.costs.slots) / service;
            m.backlog = (m.backlog + rate - capacity).max(0.0);
            let limit = capacity * m.kind.wait_budget(&self.costs).as_secs_f64();
            let dropped = (m.backlog - limit).max(0.0);
            m.backlog -= dropped;
            let busy = (rate * service).ceil().min(f64::from(m.ready * self.costs.slots)) as u32;
            servers(&mut obs, m.kind, m.ready, m.booting.len() as u32);
            load(&mut obs, m.kind, rate, m.backlog.round() as u32, busy);
            tier_mut(&mut obs, m.kind).sample.pre_drops = dropped.ceil() as u64;
        }
        obs
    }

    /// Acts on a policy's decisions as the backends do.
    pub fn apply(&mut self, decisions: &[Decision]) {
        for d in decisions {
            let m = self.tiers.iter_mut().find(|m| m.kind == d.tier).expect("every tier is modelled");
            let current = m.ready + m.booting.len() as u32;
            if d.target > current {
                let ready_at = self.now + self.costs.boot.as_secs_f64();
                m.booting.extend(std::iter::repeat_n(ready_at, (d.target - current) as usize));
            } else {
                let mut surplus = current - d.target;
                while surplus > 0 && m.booting.pop().is_some() {
                    surplus -= 1;
                }
                m.ready -= surplus;
            }
        }
    }

    /// Servers launched in `kind`, booting included.
    pub fn current(&self, kind: TierKind) -> u32 {
        self.tiers.iter().find(|m| m.kind == kind).map_or(0, |m| m.ready + m.booting.len() as u32)
    }
}
