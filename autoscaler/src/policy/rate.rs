//! `rate`: an arrival-rate rule. "My scaling decision is purely based on the arrival rate";
//! "the factor to scale out the system is 0.5, while the factor to scale in the system is
//! 0.25"; after a scale-out, "a cool-down period ... wait for all the servers to run, then
//! the server can decrease".
//!
//! Each tier needs `n = arrival_rate × service_time / slots` servers (fractional, from the last
//! one-second sample, as the seed sampled every 1000 ms) and runs `c` (booting included). The
//! seed's own `n` came from benchmarks and so had headroom; ours is bare work, so we read the
//! factors as margins of spare capacity `c − n`, in servers:
//! - scale-out factor 0.5: when less than half a server is spare (`c − n < 0.5`), scale out to
//!   `⌈n + 0.5⌉`, the fewest servers that leave half a server spare;
//! - scale-in factor 0.25: scale in only when one server fewer would still leave the scale-out
//!   margin plus a quarter server spare (`c − 1 − n > 0.5 + 0.25`), and then to `⌈n + 0.5⌉`.
//!
//! A tier then keeps its count while `n` moves within a band of 1.25 servers: the quarter
//! server beyond the unavoidable one is the dead band against thrashing, and neither move
//! lands where the other fires.
//! Cool-down: after a scale-out the tier does not scale in until none of its servers is
//! booting and a boot time has passed since the scale-out; it never scales in while a server
//! boots. Scaling out further during the cool-down is allowed (the seed's Figure 2).

use std::collections::BTreeMap;

use super::{Decision, Observation, Policy, TierState};

pub struct Rate {
    /// Spare servers kept on a scale-out.
    out_margin: f64,
    /// Spare servers beyond `out_margin` (and beyond the one removed) a scale-in needs.
    in_margin: f64,
    /// When each tier last scaled out, seconds.
    last_out: BTreeMap<super::TierKind, f64>,
}

impl Default for Rate {
    fn default() -> Self {
        Rate { out_margin: 0.5, in_margin: 0.25, last_out: BTreeMap::new() }
    }
}

impl Rate {
    fn target(&mut self, t: &TierState, obs: &Observation) -> u32 {
        let need = t.offered_servers(&obs.costs);
        let current = t.current();
        let spare = f64::from(current) - need;
        let sized = (need + self.out_margin).ceil().max(0.0) as u32;
        if spare < self.out_margin {
            if t.clamp(sized) > current {
                self.last_out.insert(t.tier, obs.now);
            }
            return sized;
        }
        let cooled = self.last_out.get(&t.tier).is_none_or(|&at| obs.now - at >= obs.costs.boot.as_secs_f64());
        if t.booting == 0 && cooled && spare - 1.0 > self.out_margin + self.in_margin {
            return sized;
        }
        current
    }
}

impl Policy for Rate {
    fn name(&self) -> &'static str {
        "rate"
    }

    fn decide(&mut self, obs: &Observation) -> Vec<Decision> {
        obs.tiers.iter().filter_map(|t| t.resize(self.target(t, obs))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{load, observation, servers, target};
    use super::*;
    use crate::policy::TierKind;

    const CAT: TierKind = TierKind::Catalog;

    /// Catalog at `ready + booting` servers and `need` servers of work (250 ms a request).
    fn catalog(now: f64, ready: u32, booting: u32, need: f64) -> Observation {
        let mut obs = observation(now);
        servers(&mut obs, CAT, ready, booting);
        load(&mut obs, CAT, need / 0.25, 0, ready);
        obs
    }

    #[test]
    fn scales_out_when_less_than_half_a_server_is_spare() {
        let mut p = Rate::default();
        // 6 servers, 5.5 of work: exactly half a server spare, no change.
        assert_eq!(target(&p.decide(&catalog(1.0, 6, 0, 5.5)), CAT), None);
        // 5.6: 0.4 spare → ⌈6.1⌉ = 7.
        assert_eq!(target(&p.decide(&catalog(2.0, 6, 0, 5.6)), CAT), Some(7));
        // A jump to 9.2 → ⌈9.7⌉ = 10 at once.
        assert_eq!(target(&p.decide(&catalog(3.0, 6, 0, 9.2)), CAT), Some(10));
    }

    #[test]
    fn scales_in_only_past_the_quarter_server_dead_band() {
        let mut p = Rate::default();
        // 8 servers: one fewer leaves 7 − n spare; needs more than 0.75.
        assert_eq!(target(&p.decide(&catalog(1.0, 8, 0, 6.3)), CAT), None, "0.7 spare after one goes");
        assert_eq!(target(&p.decide(&catalog(2.0, 8, 0, 6.2)), CAT), Some(7), "0.8 spare: ⌈6.7⌉");
        assert_eq!(target(&p.decide(&catalog(3.0, 8, 0, 4.0)), CAT), Some(5), "straight to ⌈4.5⌉");
    }

    #[test]
    fn neither_move_lands_where_the_other_fires() {
        let mut p = Rate::default();
        let mut current = 3;
        for (i, need) in [5.0, 5.3, 4.8, 5.4, 4.6, 5.2, 4.9, 5.45].into_iter().enumerate() {
            let obs = catalog(10.0 * (i + 1) as f64, current, 0, need);
            if let Some(t) = target(&p.decide(&obs), CAT) {
                assert_eq!(current, 3, "only the first sample moves the tier (need {need})");
                current = t;
            }
        }
        assert_eq!(current, 6);
    }

    #[test]
    fn never_scales_in_while_a_server_boots() {
        let mut p = Rate::default();
        // 4 ready + 6 booting for 1 server of work, long after any scale-out of this policy.
        assert_eq!(target(&p.decide(&catalog(100.0, 4, 6, 1.0)), CAT), None);
        assert_eq!(target(&p.decide(&catalog(101.0, 10, 0, 1.0)), CAT), Some(3));
    }

    #[test]
    fn cools_down_for_a_boot_time_after_a_scale_out() {
        let mut p = Rate::default();
        assert_eq!(target(&p.decide(&catalog(1.0, 3, 0, 4.0)), CAT), Some(5));
        // The seed's fake dip: the rate falls while the two boot, then comes back.
        assert_eq!(target(&p.decide(&catalog(2.0, 3, 2, 1.0)), CAT), None);
        // Ready early (booting = 0) but a boot time has not passed since the scale-out.
        assert_eq!(target(&p.decide(&catalog(5.0, 5, 0, 1.0)), CAT), None);
        assert_eq!(target(&p.decide(&catalog(6.0, 5, 0, 1.0)), CAT), Some(3));
    }

    #[test]
    fn scales_out_during_the_cool_down() {
        let mut p = Rate::default();
        assert_eq!(target(&p.decide(&catalog(1.0, 3, 0, 4.0)), CAT), Some(5));
        assert_eq!(target(&p.decide(&catalog(2.0, 3, 2, 7.0)), CAT), Some(8));
    }

    #[test]
    fn sizes_every_tier_from_its_own_rate() {
        let mut p = Rate::default();
        let mut obs = observation(1.0);
        // 100 requests/s × 60 ms = 6 frontends of work → 7.
        load(&mut obs, TierKind::Frontend, 100.0, 0, 1);
        // 10 buys/s × 200 ms = 2 servers: the 3 voters have a whole server spare.
        load(&mut obs, TierKind::Order, 10.0, 0, 2);
        let d = p.decide(&obs);
        assert_eq!(target(&d, TierKind::Frontend), Some(7));
        assert_eq!(target(&d, TierKind::Order), None);
    }
}
