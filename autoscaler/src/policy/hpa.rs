//! `hpa`: Kubernetes' HorizontalPodAutoscaler (autoscaling/v2, `replica_calculator.go` and
//! the controller's stabilization), as a baseline the seeds did not have.
//!
//! - Metric: the tier's mean slot utilisation over the last second, `arrival_rate × mean
//!   service / slots of the ready servers` (the sample's measured mean service, or the tier's
//!   slot time when nothing completed). It is the analogue of average CPU utilisation against
//!   the request, and like it can exceed 1 when the tier is overloaded; the busy slots at the
//!   end of the second would be one noisy snapshot of 0 or 1 per one-slot server.
//! - Formula: `desired = ⌈ready × metric / target⌉` with target 0.7; no change when
//!   `|metric / target − 1| ≤ 0.1` (the tolerance).
//! - Unready pods: only ready servers count in the formula, as Kubernetes counts only ready
//!   pods. Scaling up while servers boot, Kubernetes counts them at 0 % utilisation: the
//!   ratio is recomputed over `ready + booting`, and if that one is within the tolerance (or
//!   below 1) the tier stays where it is, so that booting servers are not launched twice.
//! - Scale-in stabilization: every decision records its desired count; the tier is sized to
//!   the largest recorded in the last 300 s (records at `now − 300` included, as Kubernetes
//!   keeps samples not before the cutoff). Scale-out is immediate: the default
//!   `scaleUp.stabilizationWindowSeconds` is 0 and, unlike Kubernetes' default behaviour, no
//!   rate limit (100 % or 4 pods per 15 s) is applied.
//! - Decisions come every second, where Kubernetes' controller syncs every 15 s.

use std::collections::{BTreeMap, VecDeque};

use super::{Decision, Observation, Policy, TierKind, TierState};

pub struct Hpa {
    /// Slot utilisation the tiers are sized for.
    target: f64,
    /// Ratios within `1 ± tolerance` of 1 change nothing.
    tolerance: f64,
    /// Seconds a desired count holds back a scale-in.
    window: f64,
    /// Desired counts recorded per tier, oldest first, with when.
    recommendations: BTreeMap<TierKind, VecDeque<(f64, u32)>>,
}

impl Default for Hpa {
    fn default() -> Self {
        Hpa { target: 0.7, tolerance: 0.1, window: 300.0, recommendations: BTreeMap::new() }
    }
}

impl Hpa {
    /// Kubernetes' replica calculation for one tier, before stabilization and bounds.
    fn desired(&self, t: &TierState, obs: &Observation) -> u32 {
        let current = t.current();
        if t.ready == 0 {
            // No pod reports a metric: Kubernetes leaves the scale alone.
            return current;
        }
        let s = &t.sample;
        let service_ms = if s.mean_service_ms > 0.0 {
            s.mean_service_ms
        } else {
            t.tier.service_time(&obs.costs).as_secs_f64() * 1000.0
        };
        let slots = f64::from(t.ready * obs.costs.slots.max(1));
        let utilisation = s.arrival_rate * service_ms / 1000.0 / slots;
        let ratio = utilisation / self.target;
        if t.booting > 0 && ratio > 1.0 {
            // Booting servers join at 0 %: over all of them, is a scale-up still called for?
            let ratio = ratio * f64::from(t.ready) / f64::from(current);
            if ratio <= 1.0 + self.tolerance {
                return current;
            }
            return ((ratio * f64::from(current)).ceil() as u32).max(current);
        }
        if (ratio - 1.0).abs() <= self.tolerance {
            return current;
        }
        (ratio * f64::from(t.ready)).ceil() as u32
    }

    /// Records `desired` and returns the largest desired count within the window.
    fn stabilize(&mut self, tier: TierKind, now: f64, desired: u32) -> u32 {
        let records = self.recommendations.entry(tier).or_default();
        while records.front().is_some_and(|&(at, _)| at < now - self.window) {
            records.pop_front();
        }
        records.push_back((now, desired));
        records.iter().map(|&(_, n)| n).max().unwrap_or(desired)
    }
}

impl Policy for Hpa {
    fn name(&self) -> &'static str {
        "hpa"
    }

    fn decide(&mut self, obs: &Observation) -> Vec<Decision> {
        let mut decisions = Vec::new();
        for t in &obs.tiers {
            let desired = self.desired(t, obs);
            let stable = self.stabilize(t.tier, obs.now, desired);
            decisions.extend(t.resize(stable));
        }
        decisions
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{load, observation, servers, target};
    use super::*;

    const ORD: TierKind = TierKind::Order;

    /// Order tier with `ready + booting` servers at slot utilisation `util` of the ready ones
    /// (200 ms a buy).
    fn order(now: f64, ready: u32, booting: u32, util: f64) -> Observation {
        let mut obs = observation(now);
        servers(&mut obs, ORD, ready, booting);
        load(&mut obs, ORD, util * f64::from(ready) / 0.2, 0, ready);
        obs
    }

    #[test]
    fn desired_is_ready_times_metric_over_target() {
        let mut p = Hpa::default();
        // 10 ready at 90 %: ⌈10 × 0.9 / 0.7⌉ = ⌈12.9⌉.
        assert_eq!(target(&p.decide(&order(1.0, 10, 0, 0.9)), ORD), Some(13));
        // Measured service time counts: twice the slot time, twice the utilisation.
        let mut slow = order(2.0, 10, 0, 0.45);
        slow.tiers[2].sample.mean_service_ms = 400.0;
        assert_eq!(target(&p.decide(&slow), ORD), Some(13));
    }

    #[test]
    fn no_change_within_the_tolerance() {
        let mut p = Hpa::default();
        // 0.76 / 0.7 = 1.086 and 0.64 / 0.7 = 0.914: within 10 %.
        assert_eq!(target(&p.decide(&order(1.0, 10, 0, 0.76)), ORD), None);
        assert_eq!(target(&p.decide(&order(2.0, 10, 0, 0.64)), ORD), None);
        // 0.78 / 0.7 = 1.114: ⌈11.14⌉.
        assert_eq!(target(&p.decide(&order(3.0, 10, 0, 0.78)), ORD), Some(12));
    }

    #[test]
    fn scale_in_waits_for_the_300_s_window() {
        let mut p = Hpa::default();
        assert_eq!(target(&p.decide(&order(0.0, 10, 0, 0.7)), ORD), None);
        // From t = 1 the load wants 5 servers; the 10 recorded at t = 0 hold through t = 300.
        for now in 1..=300 {
            let d = p.decide(&order(f64::from(now), 10, 0, 0.35));
            assert_eq!(target(&d, ORD), None, "at {now} s");
        }
        assert_eq!(target(&p.decide(&order(301.0, 10, 0, 0.35)), ORD), Some(5));
    }

    #[test]
    fn scale_in_goes_to_the_highest_recommendation_in_the_window() {
        let mut p = Hpa::default();
        p.decide(&order(0.0, 10, 0, 0.7));
        p.decide(&order(100.0, 10, 0, 0.55)); // wants ⌈7.9⌉
        p.decide(&order(200.0, 10, 0, 0.35)); // wants 5
        assert_eq!(target(&p.decide(&order(301.0, 10, 0, 0.35)), ORD), Some(8));
        assert_eq!(target(&p.decide(&order(401.0, 10, 0, 0.35)), ORD), Some(5));
    }

    #[test]
    fn scale_out_is_immediate() {
        let mut p = Hpa::default();
        p.decide(&order(0.0, 10, 0, 0.35));
        assert_eq!(target(&p.decide(&order(1.0, 10, 0, 1.35)), ORD), Some(20));
    }

    #[test]
    fn booting_servers_count_at_zero_on_a_scale_up() {
        let mut p = Hpa::default();
        // 4 ready at 1.4 (ratio 2) want 8; 4 are booting: over 8, the ratio is 1: stay.
        assert_eq!(target(&p.decide(&order(1.0, 4, 4, 1.4)), ORD), None);
        // 4 ready at 2.0 (ratio 2.86) want 12; over 8 the ratio is 1.43: ⌈1.43 × 8⌉ = 12.
        assert_eq!(target(&p.decide(&order(2.0, 4, 4, 2.0)), ORD), Some(12));
    }

    #[test]
    fn respects_the_floor_and_ceiling() {
        let mut p = Hpa::default();
        let mut obs = order(1.0, 10, 0, 7.0);
        obs.tiers[2].max = 40;
        assert_eq!(target(&p.decide(&obs), ORD), Some(40));
        let mut p = Hpa { window: 0.0, ..Hpa::default() };
        assert_eq!(target(&p.decide(&order(2.0, 10, 0, 0.01)), ORD), Some(3));
    }
}
