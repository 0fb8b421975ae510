//! The tier's samples: what this balancer saw of its work requests each second, for the
//! autoscaler (docs/ARCHITECTURE.md, "Balancer"), `/status`, `GET /samples` and `/metrics`.
//!
//! Counters that only grow (arrivals, drops) are atomics read as differences at each tick;
//! what a completed request brings (its latency and service time) goes into the current
//! window behind a mutex held for a push. [`Samples::tick`] closes the window, adds the
//! queue's and the slots' state at that instant, and keeps the last [`HISTORY`] samples.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quire_common::samples::{Percentiles, TierSample};

use crate::queue::Load;

/// How often a sample is taken.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Samples kept for `GET /samples`: one minute.
pub(crate) const HISTORY: usize = 60;
/// Latencies kept per window; beyond this the percentiles are those of the first ones (the
/// count, the mean service time and the maximum stay exact). Bounds memory under any load.
const MAX_LATENCIES: usize = 100_000;

pub(crate) struct Samples {
    /// The tier of the backends: `frontend`, `catalog` or `order`.
    tier: &'static str,
    /// Work requests received, since start.
    pub(crate) arrivals: AtomicU64,
    /// Backends' `dropped` refusals passed on to clients, since start.
    pub(crate) after_drops: AtomicU64,
    window: Mutex<Window>,
    history: Mutex<VecDeque<TierSample>>,
}

/// The current interval.
struct Window {
    started: Instant,
    /// The growing counters when the window opened, to subtract at its end.
    arrivals_before: u64,
    pre_drops_before: u64,
    after_drops_before: u64,
    completed: u64,
    /// Sum of the answering attempts' durations of the completed requests.
    service: Duration,
    /// Arrival to answer, of the completed requests (at most [`MAX_LATENCIES`]).
    latencies_ms: Vec<f64>,
    max_ms: f64,
}

impl Window {
    fn open(arrivals_before: u64, pre_drops_before: u64, after_drops_before: u64) -> Self {
        Window {
            started: Instant::now(),
            arrivals_before,
            pre_drops_before,
            after_drops_before,
            completed: 0,
            service: Duration::ZERO,
            latencies_ms: Vec::new(),
            max_ms: 0.0,
        }
    }
}

impl Samples {
    pub(crate) fn new(tier: &'static str) -> Self {
        Samples {
            tier,
            arrivals: AtomicU64::new(0),
            after_drops: AtomicU64::new(0),
            window: Mutex::new(Window::open(0, 0, 0)),
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
        }
    }

    fn window(&self) -> MutexGuard<'_, Window> {
        // A window is plain numbers: a panic while it was held leaves it usable.
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn history_lock(&self) -> MutexGuard<'_, VecDeque<TierSample>> {
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn arrived(&self) {
        self.arrivals.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn after_dropped(&self) {
        self.after_drops.fetch_add(1, Ordering::Relaxed);
    }

    /// A work request was answered by a backend `latency` after it arrived; the answering
    /// attempt took `service`.
    pub(crate) fn completed(&self, latency: Duration, service: Duration) {
        let ms = latency.as_secs_f64() * 1000.0;
        let mut window = self.window();
        window.completed += 1;
        window.service += service;
        window.max_ms = window.max_ms.max(ms);
        if window.latencies_ms.len() < MAX_LATENCIES {
            window.latencies_ms.push(ms);
        }
    }

    /// Closes the current window into a sample, given the queue's state now and the pre-drops
    /// so far; opens the next window.
    pub(crate) fn tick(&self, load: Load, pre_drops: u64) -> TierSample {
        let arrivals = self.arrivals.load(Ordering::Relaxed);
        let after_drops = self.after_drops.load(Ordering::Relaxed);
        let closed = std::mem::replace(&mut *self.window(), Window::open(arrivals, pre_drops, after_drops));
        let interval = closed.started.elapsed();
        let window_arrivals = arrivals.saturating_sub(closed.arrivals_before);
        let sample = TierSample {
            tier: self.tier.to_string(),
            at_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            interval_ms: interval.as_millis() as u64,
            arrivals: window_arrivals,
            arrival_rate: window_arrivals as f64 / interval.as_secs_f64().max(1e-3),
            completed: closed.completed,
            queue_len: load.queue_len,
            oldest_wait_ms: load.oldest_wait.as_millis() as u64,
            busy_slots: load.busy_slots,
            total_slots: load.total_slots,
            backends: load.backends,
            pre_drops: pre_drops.saturating_sub(closed.pre_drops_before),
            after_drops: after_drops.saturating_sub(closed.after_drops_before),
            mean_service_ms: match closed.completed {
                0 => 0.0,
                n => closed.service.as_secs_f64() * 1000.0 / n as f64,
            },
            latency_ms: percentiles(closed.latencies_ms, closed.max_ms),
        };
        let mut history = self.history_lock();
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(sample.clone());
        sample
    }

    pub(crate) fn last(&self) -> Option<TierSample> {
        self.history_lock().back().cloned()
    }

    /// The last [`HISTORY`] samples, oldest first.
    pub(crate) fn history(&self) -> Vec<TierSample> {
        self.history_lock().iter().cloned().collect()
    }
}

/// Nearest-rank percentiles of `latencies`; all zero when empty.
fn percentiles(mut latencies: Vec<f64>, max: f64) -> Percentiles {
    if latencies.is_empty() {
        return Percentiles::default();
    }
    latencies.sort_unstable_by(f64::total_cmp);
    let rank = |q: f64| latencies[((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1];
    Percentiles { p50: rank(0.50), p90: rank(0.90), p99: rank(0.99), max }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = percentiles((1..=100).rev().map(f64::from).collect(), 100.0);
        assert_eq!(p, Percentiles { p50: 50.0, p90: 90.0, p99: 99.0, max: 100.0 });
        assert_eq!(percentiles(vec![], 0.0), Percentiles::default());
        assert_eq!(percentiles(vec![7.0], 7.0).p99, 7.0);
    }

    #[test]
    fn tick_reports_the_window_and_keeps_a_minute() {
        let samples = Samples::new("catalog");
        for _ in 0..3 {
            samples.arrived();
        }
        samples.after_dropped();
        samples.completed(Duration::from_millis(30), Duration::from_millis(20));
        samples.completed(Duration::from_millis(50), Duration::from_millis(40));
        let load = Load { queue_len: 2, busy_slots: 1, total_slots: 2, backends: 2, ..Load::default() };
        let first = samples.tick(load, 4);
        assert_eq!((first.arrivals, first.completed, first.pre_drops, first.after_drops), (3, 2, 4, 1));
        assert_eq!((first.queue_len, first.busy_slots, first.total_slots, first.backends), (2, 1, 2, 2));
        assert!((first.mean_service_ms - 30.0).abs() < 1e-6, "{first:?}");
        assert_eq!(first.latency_ms.max, 50.0);
        // The next window starts from zero.
        let second = samples.tick(Load::default(), 4);
        assert_eq!((second.arrivals, second.completed, second.pre_drops, second.after_drops), (0, 0, 0, 0));
        for _ in 0..HISTORY {
            samples.tick(Load::default(), 4);
        }
        assert_eq!(samples.history().len(), HISTORY);
        assert_eq!(samples.last().map(|s| s.arrivals), Some(0));
    }
}
