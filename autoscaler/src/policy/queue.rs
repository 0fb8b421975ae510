//! `queue`: a queue-length rule. Its middle tier scales on what its workers see when they poll the
//! central queue; its front tier follows the middle tier by a fixed ratio.
//!
//! - "If it detects a too long queue for consecutive two times, we will launch two more
//!   servers." A sample is *long* when more requests wait than the tier has slots (each
//!   request then waits at least one full slot time), or when the oldest has waited more than
//!   half the tier's wait budget ([`TierKind::wait_budget`]). Two long samples in a row → +2;
//!   the count restarts after it, so a queue that stays long adds two servers every two
//!   seconds.
//! - "If there happens to be three consecutive timeouts, master server will be notified to
//!   scale in." A worker that times out polling found the queue empty while it was free: a
//!   sample is *idle* when the queue is empty and a slot is free. Three idle samples in a row
//!   → −1, and the count restarts.
//!   A sample that is neither resets both counts; a long one resets the idle count and an idle
//!   one the long count.
//! - "The number of front-end servers is dynamically adjusted by number of the middle-end
//!   servers ... an optimal ratio." The catalog and order tiers are the middle tier (voters
//!   included: they serve reads and buys too); frontends = ⌈ratio × (catalog + order)⌉, taken
//!   from the targets just decided. The seed leaves the ratio to benchmarks; the default is
//!   [`Queue::DEFAULT_RATIO`].
//!
//! Like the seed, nothing waits for booting servers: a queue that stays long while they boot
//! keeps adding servers.

use std::collections::BTreeMap;

use super::{Decision, Observation, Policy, TierKind, TierState};

pub struct Queue {
    /// Frontends per catalog-or-order server.
    ratio: f64,
    /// Consecutive long and idle samples per middle tier.
    streaks: BTreeMap<TierKind, Streak>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Streak {
    long: u32,
    idle: u32,
}

impl Queue {
    /// Frontends per app server: a frontend does 60 ms per request, an app server 200–250 ms
    /// on the requests that reach it, and the app tiers keep 6 voters however low the load.
    pub const DEFAULT_RATIO: f64 = 0.4;
    /// Long samples in a row that add servers, and how many.
    const LONG_SAMPLES: u32 = 2;
    const STEP_OUT: u32 = 2;
    /// Idle samples in a row that remove one server.
    const IDLE_SAMPLES: u32 = 3;

    pub fn with_ratio(ratio: f64) -> Self {
        Queue { ratio, streaks: BTreeMap::new() }
    }

    /// The middle tier's target after this sample.
    fn middle(&mut self, t: &TierState, obs: &Observation) -> u32 {
        let s = &t.sample;
        let half_budget_ms = t.tier.wait_budget(&obs.costs).as_secs_f64() * 1000.0 / 2.0;
        let long = s.queue_len > s.total_slots || s.oldest_wait_ms as f64 > half_budget_ms;
        let idle = s.queue_len == 0 && s.busy_slots < s.total_slots;
        let streak = self.streaks.entry(t.tier).or_default();
        streak.long = if long { streak.long + 1 } else { 0 };
        streak.idle = if idle { streak.idle + 1 } else { 0 };
        if streak.long >= Self::LONG_SAMPLES {
            *streak = Streak::default();
            return t.current() + Self::STEP_OUT;
        }
        if streak.idle >= Self::IDLE_SAMPLES {
            *streak = Streak::default();
            return t.current().saturating_sub(1);
        }
        t.current()
    }
}

impl Default for Queue {
    fn default() -> Self {
        Queue::with_ratio(Self::DEFAULT_RATIO)
    }
}

impl Policy for Queue {
    fn name(&self) -> &'static str {
        "queue"
    }

    fn decide(&mut self, obs: &Observation) -> Vec<Decision> {
        let mut decisions = Vec::new();
        let mut middle_servers = 0;
        for t in obs.tiers.iter().filter(|t| t.tier != TierKind::Frontend) {
            let target = t.clamp(self.middle(t, obs));
            middle_servers += target;
            decisions.extend(t.resize(target));
        }
        if let Some(front) = obs.tier(TierKind::Frontend) {
            let target = (self.ratio * f64::from(middle_servers)).ceil() as u32;
            decisions.extend(front.resize(target));
        }
        decisions
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{load, observation, servers, target};
    use super::*;

    const CAT: TierKind = TierKind::Catalog;

    /// An observation at `now` with the catalog at 5 servers, 5 busy, `queue_len` waiting;
    /// order at its 3 voters with one busy; frontends as the ratio wants them for 8 app servers.
    fn catalog(now: f64, queue_len: u32) -> Observation {
        let mut obs = observation(now);
        servers(&mut obs, CAT, 5, 0);
        load(&mut obs, CAT, 20.0, queue_len, 5);
        load(&mut obs, TierKind::Order, 2.0, 0, 3);
        servers(&mut obs, TierKind::Frontend, 4, 0);
        obs
    }

    fn idle(now: f64) -> Observation {
        let mut obs = catalog(now, 0);
        load(&mut obs, CAT, 5.0, 0, 2);
        obs
    }

    #[test]
    fn two_long_samples_in_a_row_add_two_servers() {
        let mut p = Queue::default();
        assert_eq!(target(&p.decide(&catalog(1.0, 9)), CAT), None, "one long sample is not enough");
        let d = p.decide(&catalog(2.0, 9));
        assert_eq!(target(&d, CAT), Some(7));
        // The streak restarts: the third long sample is the first of a new pair.
        assert_eq!(target(&p.decide(&catalog(3.0, 9)), CAT), None);
        assert_eq!(target(&p.decide(&catalog(4.0, 9)), CAT), Some(7));
    }

    #[test]
    fn a_short_sample_between_long_ones_resets_the_streak() {
        let mut p = Queue::default();
        for (now, queue) in [(1.0, 9), (2.0, 2), (3.0, 9)] {
            assert_eq!(target(&p.decide(&catalog(now, queue)), CAT), None, "at {now}");
        }
    }

    #[test]
    fn long_means_more_waiting_than_slots_or_half_the_wait_budget() {
        let mut p = Queue::default();
        // 5 waiting on 5 slots, the oldest for 200 ms (under half of 414 ms), is not long.
        for now in 1..=4 {
            let mut obs = catalog(f64::from(now), 5);
            obs.tiers[1].sample.oldest_wait_ms = 200;
            assert_eq!(target(&p.decide(&obs), CAT), None);
        }
        // 4 waiting but the oldest has waited 300 ms, over half the catalog's 414 ms.
        let mut slow = catalog(5.0, 4);
        slow.tiers[1].sample.oldest_wait_ms = 300;
        p.decide(&slow);
        slow.now = 6.0;
        assert_eq!(target(&p.decide(&slow), CAT), Some(7));
    }

    #[test]
    fn three_idle_polls_in_a_row_remove_one_server() {
        let mut p = Queue::default();
        assert_eq!(target(&p.decide(&idle(1.0)), CAT), None);
        assert_eq!(target(&p.decide(&idle(2.0)), CAT), None);
        assert_eq!(target(&p.decide(&idle(3.0)), CAT), Some(4));
        assert_eq!(target(&p.decide(&idle(4.0)), CAT), None, "the idle count restarts");
    }

    #[test]
    fn a_busy_sample_between_idle_ones_resets_the_count() {
        let mut p = Queue::default();
        p.decide(&idle(1.0));
        p.decide(&idle(2.0));
        p.decide(&catalog(3.0, 0)); // every slot busy: not idle
        assert_eq!(target(&p.decide(&idle(4.0)), CAT), None);
        assert_eq!(target(&p.decide(&idle(5.0)), CAT), None);
        assert_eq!(target(&p.decide(&idle(6.0)), CAT), Some(4));
    }

    #[test]
    fn voters_stay() {
        let mut p = Queue::default();
        let mut obs = observation(0.0);
        for now in 1..=6 {
            obs.now = f64::from(now);
            assert_eq!(target(&p.decide(&obs), CAT), None, "3 voters, idle: nothing to remove");
        }
    }

    #[test]
    fn frontends_follow_the_ratio_to_app_servers() {
        let mut p = Queue::with_ratio(0.5);
        let mut obs = catalog(1.0, 9);
        servers(&mut obs, TierKind::Frontend, 1, 0);
        // 5 catalog + 3 order → 4 frontends.
        assert_eq!(target(&p.decide(&obs), TierKind::Frontend), Some(4));
        // The catalog grows to 7 in the same decision as the frontends: ⌈0.5 × 10⌉ = 5.
        servers(&mut obs, TierKind::Frontend, 4, 0);
        obs.now = 2.0;
        let d = p.decide(&obs);
        assert_eq!(target(&d, CAT), Some(7));
        assert_eq!(target(&d, TierKind::Frontend), Some(5));
        // With the tiers at their floors the frontends shrink to ⌈0.5 × 6⌉ = 3.
        let mut quiet = observation(3.0);
        servers(&mut quiet, TierKind::Frontend, 5, 0);
        assert_eq!(target(&p.decide(&quiet), TierKind::Frontend), Some(3));
    }

    #[test]
    fn targets_respect_the_ceiling() {
        let mut p = Queue::default();
        let mut obs = catalog(1.0, 9);
        obs.tiers[1].max = 6;
        p.decide(&obs);
        obs.now = 2.0;
        assert_eq!(target(&p.decide(&obs), CAT), Some(6));
    }
}
