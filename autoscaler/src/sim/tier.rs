//! One tier of the model: a central FIFO queue in front of the slots of interchangeable
//! servers, and the servers' life cycle (booting, ready, draining).
//!
//! Servers are not objects: a tier keeps counts (ready servers, free slots among them,
//! draining servers and their busy slots) and two queues of times. Every request starts at the
//! simulated "now" and holds a slot for the same service time, so completions are produced in
//! the order they happen and a FIFO of them is already sorted; launches likewise all boot for
//! the same time. The engine therefore needs no heap: the next event of a tier is the front of
//! one of its two queues, and every operation is O(1) whatever the number of servers.

use std::collections::VecDeque;

use quire_common::samples::{Percentiles, TierSample};

use crate::policy::{TierKind, TierState};

use super::Micros;

/// Width of a latency histogram bucket, and how many there are (the last one is open-ended).
const BUCKET_US: Micros = 10_000;
const BUCKETS: usize = 512;

/// What happened in a tier since the last sample.
#[derive(Debug, Clone)]
struct Interval {
    arrivals: u64,
    completed: u64,
    pre_drops: u64,
    after_drops: u64,
    /// Latencies (queue wait + slot time) of the completed requests, in `BUCKET_US` buckets.
    histogram: Box<[u32; BUCKETS]>,
    max_latency: Micros,
}

impl Interval {
    fn new() -> Self {
        Interval {
            arrivals: 0,
            completed: 0,
            pre_drops: 0,
            after_drops: 0,
            histogram: Box::new([0; BUCKETS]),
            max_latency: 0,
        }
    }

    fn reset(&mut self) {
        self.arrivals = 0;
        self.completed = 0;
        self.pre_drops = 0;
        self.after_drops = 0;
        self.histogram.fill(0);
        self.max_latency = 0;
    }

    /// Upper bound of the bucket holding the `q` quantile, in milliseconds (the exact maximum
    /// for the last bucket and when it is smaller): within 10 ms of a sorted-list percentile.
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.completed == 0 {
            return 0.0;
        }
        let rank = ((self.completed as f64 * q).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, &n) in self.histogram.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                let upper = (i as Micros + 1) * BUCKET_US;
                return upper.min(self.max_latency) as f64 / 1000.0;
            }
        }
        self.max_latency as f64 / 1000.0
    }
}

/// Why a request left a queue without being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drop {
    /// Dropped at the head of the queue after waiting there (the balancer's check).
    Pre,
    /// Refused by a free server the moment it arrived (the server's own check).
    After,
}

/// A tier's queue, servers and counters.
#[derive(Debug)]
pub(super) struct Tier {
    pub kind: TierKind,
    /// Slot time of one request.
    pub service: Micros,
    slots: u32,
    pub min: u32,
    pub max: u32,
    /// Requests waiting for a slot, as (client, when it joined), oldest first.
    queue: VecDeque<(u32, Micros)>,
    /// Requests holding a slot, as (when it frees, client), in that order.
    in_service: VecDeque<(Micros, u32)>,
    /// Launched servers, as (when they become ready, how many), in that order.
    booting: VecDeque<(Micros, u32)>,
    booting_count: u32,
    /// Servers in rotation, and the free slots among them. Work is assumed packed onto as few
    /// servers as possible, so `ready - ceil(busy / slots)` of them are idle.
    ready: u32,
    free: u32,
    /// Servers out of rotation finishing their work, and the busy slots on them. Completions
    /// free draining slots first: the servers drained are those whose work ends soonest.
    draining: u32,
    draining_busy: u32,
    /// ∫ running servers dt in server-microseconds up to `accounted_at`.
    area: u128,
    accounted_at: Micros,
    interval: Interval,
}

impl Tier {
    pub fn new(kind: TierKind, service: Micros, slots: u32, initial: u32, min: u32, max: u32) -> Self {
        Tier {
            kind,
            service,
            slots: slots.max(1),
            min,
            max,
            queue: VecDeque::with_capacity(4096),
            in_service: VecDeque::with_capacity(4096),
            booting: VecDeque::with_capacity(64),
            booting_count: 0,
            ready: initial,
            free: initial * slots.max(1),
            draining: 0,
            draining_busy: 0,
            area: 0,
            accounted_at: 0,
            interval: Interval::new(),
        }
    }

    /// Servers that cost money: launched and not yet stopped.
    pub fn running(&self) -> u32 {
        self.ready + self.booting_count + self.draining
    }

    /// Server-seconds up to `now`.
    pub fn server_seconds(&mut self, now: Micros) -> f64 {
        self.account(now);
        self.area as f64 / 1e6
    }

    fn account(&mut self, now: Micros) {
        self.area += u128::from(self.running()) * u128::from(now - self.accounted_at);
        self.accounted_at = now;
    }

    /// When the next slot frees, and the next server becomes ready.
    pub fn next_completion(&self) -> Option<Micros> {
        self.in_service.front().map(|&(t, _)| t)
    }

    pub fn next_ready(&self) -> Option<Micros> {
        self.booting.front().map(|&(t, _)| t)
    }

    /// A request joins the queue; the caller dispatches.
    pub fn enqueue(&mut self, client: u32, now: Micros) {
        self.interval.arrivals += 1;
        self.queue.push_back((client, now));
    }

    /// Takes the head of the queue for a free slot at `now`, if both exist. `hopeless` says
    /// whether a request (by client) could no longer finish in time if it started now; such a
    /// head is removed and returned as dropped instead of started.
    pub fn dispatch(&mut self, now: Micros, hopeless: impl Fn(u32) -> bool) -> Option<(u32, Result<(), Drop>)> {
        if self.free == 0 {
            return None;
        }
        let (client, joined) = self.queue.pop_front()?;
        if hopeless(client) {
            let drop = if joined < now { Drop::Pre } else { Drop::After };
            match drop {
                Drop::Pre => self.interval.pre_drops += 1,
                Drop::After => self.interval.after_drops += 1,
            }
            return Some((client, Err(drop)));
        }
        self.free -= 1;
        self.in_service.push_back((now + self.service, client));
        Some((client, Ok(())))
    }

    /// The balancer's periodic check: drops hopeless requests at the head of the queue.
    pub fn purge_head(&mut self, hopeless: impl Fn(u32) -> bool) -> Option<u32> {
        let &(client, _) = self.queue.front()?;
        if !hopeless(client) {
            return None;
        }
        self.queue.pop_front();
        self.interval.pre_drops += 1;
        Some(client)
    }

    /// Ends the request holding the earliest slot (at `next_completion`), which joined the
    /// queue at `joined` (the caller keeps that with the client): frees its slot, or lets its
    /// draining server stop.
    pub fn complete(&mut self, now: Micros, joined: Micros) {
        self.in_service.pop_front();
        let latency = now - joined;
        self.interval.completed += 1;
        let bucket = ((latency / BUCKET_US) as usize).min(BUCKETS - 1);
        self.interval.histogram[bucket] += 1;
        self.interval.max_latency = self.interval.max_latency.max(latency);
        if self.draining_busy > 0 {
            self.draining_busy -= 1;
            let needed = self.draining_busy.div_ceil(self.slots);
            if self.draining > needed {
                self.account(now);
                self.draining = needed;
            }
        } else {
            self.free += 1;
        }
    }

    /// The client whose slot frees next.
    pub fn completing_client(&self) -> Option<u32> {
        self.in_service.front().map(|&(_, c)| c)
    }

    /// Servers launched at `when - boot` become ready at `now`.
    pub fn boot_next(&mut self) {
        if let Some((_, n)) = self.booting.pop_front() {
            self.booting_count -= n;
            self.ready += n;
            self.free += n * self.slots;
        }
    }

    /// Launches or drains servers so that ready + booting = `target` (clamped to the bounds).
    /// Booting servers are stopped first (newest first), then idle ready ones, then busy ones,
    /// which drain.
    pub fn scale_to(&mut self, target: u32, now: Micros, boot: Micros) {
        let target = target.clamp(self.min, self.max);
        let current = self.ready + self.booting_count;
        if target == current {
            return;
        }
        self.account(now);
        if target > current {
            let n = target - current;
            let at = now + boot;
            match self.booting.back_mut() {
                Some((t, count)) if *t == at => *count += n,
                _ => self.booting.push_back((at, n)),
            }
            self.booting_count += n;
            return;
        }
        let mut surplus = current - target;
        while surplus > 0 {
            let Some((_, count)) = self.booting.back_mut() else { break };
            let k = surplus.min(*count);
            *count -= k;
            self.booting_count -= k;
            surplus -= k;
            if *count == 0 {
                self.booting.pop_back();
            }
        }
        if surplus == 0 {
            return;
        }
        let busy = self.ready * self.slots - self.free;
        let full = busy / self.slots;
        let partial = busy % self.slots;
        let idle = self.ready - full - u32::from(partial > 0);
        let k = surplus.min(idle);
        self.ready -= k;
        self.free -= k * self.slots;
        surplus -= k;
        if surplus > 0 && partial > 0 {
            self.ready -= 1;
            self.free -= self.slots - partial;
            self.draining += 1;
            self.draining_busy += partial;
            surplus -= 1;
        }
        let k = surplus.min(full);
        self.ready -= k;
        self.draining += k;
        self.draining_busy += k * self.slots;
    }

    /// The tier as a balancer would report it for the second ending at `now`, and resets the
    /// interval's counters.
    pub fn observe(&mut self, now: Micros, interval: Micros) -> TierState {
        let i = &self.interval;
        let seconds = interval as f64 / 1e6;
        let sample = TierSample {
            tier: self.kind.name().to_string(),
            at_ms: now / 1000,
            interval_ms: interval / 1000,
            arrivals: i.arrivals,
            arrival_rate: i.arrivals as f64 / seconds,
            completed: i.completed,
            queue_len: self.queue.len() as u32,
            oldest_wait_ms: self.queue.front().map_or(0, |&(_, joined)| (now - joined) / 1000),
            busy_slots: self.ready * self.slots - self.free,
            total_slots: self.ready * self.slots,
            backends: self.ready,
            pre_drops: i.pre_drops,
            after_drops: i.after_drops,
            mean_service_ms: if i.completed > 0 { self.service as f64 / 1000.0 } else { 0.0 },
            latency_ms: Percentiles {
                p50: i.quantile_ms(0.50),
                p90: i.quantile_ms(0.90),
                p99: i.quantile_ms(0.99),
                max: i.max_latency as f64 / 1000.0,
            },
        };
        self.interval.reset();
        TierState {
            tier: self.kind,
            sample,
            ready: self.ready,
            booting: self.booting_count,
            min: self.min,
            max: self.max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Micros = 1000;

    fn catalog(initial: u32) -> Tier {
        Tier::new(TierKind::Catalog, 250 * MS, 1, initial, 3, 100)
    }

    /// Starts queued work on free slots, as the engine does (nothing is hopeless here).
    fn fill(tier: &mut Tier, now: Micros) {
        while tier.dispatch(now, |_| false).is_some() {}
    }

    #[test]
    fn scale_in_stops_booting_then_idle_then_drains_busy() {
        let mut tier = catalog(6);
        for c in 0..4 {
            tier.enqueue(c, 0);
        }
        fill(&mut tier, 0);
        tier.scale_to(9, 0, 5_000 * MS);
        assert_eq!((tier.ready, tier.booting_count, tier.running()), (6, 3, 9));
        // 9 → 4: the 3 booting, the 2 idle; the floor is 3, so 4 is allowed.
        tier.scale_to(4, 100 * MS, 5_000 * MS);
        assert_eq!((tier.ready, tier.booting_count, tier.draining, tier.free), (4, 0, 0, 0));
        // 4 → 3 (the floor, whatever is asked): one busy server drains.
        tier.scale_to(0, 100 * MS, 5_000 * MS);
        assert_eq!((tier.ready, tier.draining, tier.running()), (3, 1, 4));
        // The first completion lets the drained server stop; the next ones free slots.
        tier.complete(250 * MS, 0);
        assert_eq!((tier.ready, tier.draining, tier.free, tier.running()), (3, 0, 0, 3));
        tier.complete(250 * MS, 0);
        assert_eq!(tier.free, 1);
        // 6 servers for 0.1 s, 3 booting too, then 4 until 0.25 s.
        let want = 9.0 * 0.1 + 4.0 * 0.15;
        assert!((tier.server_seconds(250 * MS) - want).abs() < 1e-9);
    }

    #[test]
    fn servers_take_work_only_once_booted() {
        let mut tier = catalog(3);
        tier.scale_to(5, 0, 5_000 * MS);
        assert_eq!(tier.next_ready(), Some(5_000 * MS));
        for c in 0..5 {
            tier.enqueue(c, 0);
        }
        fill(&mut tier, 0);
        let state = tier.observe(SECOND_FOR_TESTS, SECOND_FOR_TESTS);
        assert_eq!((state.ready, state.booting, state.sample.queue_len, state.sample.busy_slots), (3, 2, 2, 3));
        tier.boot_next();
        fill(&mut tier, 5_000 * MS);
        assert_eq!((tier.ready, tier.free, tier.queue.len()), (5, 0, 0));
    }

    #[test]
    fn drops_are_pre_after_waiting_and_after_on_arrival() {
        let mut tier = catalog(3);
        tier.enqueue(7, 0);
        assert_eq!(tier.dispatch(0, |_| true), Some((7, Err(Drop::After))));
        for c in 0..4 {
            tier.enqueue(c, 0);
        }
        fill(&mut tier, 0);
        assert_eq!(tier.dispatch(10 * MS, |_| true), None, "no free slot: the head waits");
        tier.complete(250 * MS, 0);
        assert_eq!(tier.dispatch(250 * MS, |_| true), Some((3, Err(Drop::Pre))));
        let state = tier.observe(SECOND_FOR_TESTS, SECOND_FOR_TESTS);
        assert_eq!((state.sample.pre_drops, state.sample.after_drops, state.sample.arrivals), (1, 1, 5));
        assert_eq!((state.sample.completed, state.sample.latency_ms.max), (1, 250.0));
    }

    const SECOND_FOR_TESTS: Micros = 1_000_000;
}
