//! Per-tier samples the balancers publish every second (docs/ARCHITECTURE.md, "Balancer") and the fleet view
//! the autoscaler publishes; read by the autoscaler, `quire status` and `quire load`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Latency percentiles in milliseconds of the requests completed in one interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// One tier as one balancer saw it over one interval (normally one second).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TierSample {
    /// `frontend`, `catalog` or `order`: the tier of the backends, not of the balancer.
    pub tier: String,
    /// End of the interval, milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub interval_ms: u64,
    /// Requests that arrived in the interval, and per second.
    pub arrivals: u64,
    pub arrival_rate: f64,
    /// Requests answered by a backend in the interval.
    pub completed: u64,
    /// Waiting in the central queue at the end of the interval, and the oldest one's wait.
    pub queue_len: u32,
    pub oldest_wait_ms: u64,
    /// Worker slots in use and in all, over the backends in rotation, at the end of the interval.
    pub busy_slots: u32,
    pub total_slots: u32,
    /// Backends in rotation.
    pub backends: u32,
    /// Requests dropped in the interval: at the head of the queue (pre-drop) or refused by a
    /// backend that could not finish them in time (after-drop).
    pub pre_drops: u64,
    pub after_drops: u64,
    /// Mean slot time of a completed request in milliseconds, 0 when none completed.
    pub mean_service_ms: f64,
    /// Time from arrival at the balancer to the backend's answer.
    pub latency_ms: Percentiles,
}

impl TierSample {
    pub fn drops(&self) -> u64 {
        self.pre_drops + self.after_drops
    }

    /// Merges what several balancers of the same tier saw over the same interval.
    pub fn merge(samples: &[TierSample]) -> Option<TierSample> {
        let first = samples.first()?;
        let mut out = TierSample { tier: first.tier.clone(), ..TierSample::default() };
        let mut service_weight = 0.0;
        for s in samples {
            out.at_ms = out.at_ms.max(s.at_ms);
            out.interval_ms = out.interval_ms.max(s.interval_ms);
            out.arrivals += s.arrivals;
            out.arrival_rate += s.arrival_rate;
            out.completed += s.completed;
            out.queue_len += s.queue_len;
            out.oldest_wait_ms = out.oldest_wait_ms.max(s.oldest_wait_ms);
            // Every balancer sees the same backends: their slots are counted once.
            out.busy_slots = out.busy_slots.max(s.busy_slots);
            out.total_slots = out.total_slots.max(s.total_slots);
            out.backends = out.backends.max(s.backends);
            out.pre_drops += s.pre_drops;
            out.after_drops += s.after_drops;
            service_weight += s.mean_service_ms * s.completed as f64;
            // The worst balancer's percentiles: a conservative merge without the raw latencies.
            out.latency_ms.p50 = out.latency_ms.p50.max(s.latency_ms.p50);
            out.latency_ms.p90 = out.latency_ms.p90.max(s.latency_ms.p90);
            out.latency_ms.p99 = out.latency_ms.p99.max(s.latency_ms.p99);
            out.latency_ms.max = out.latency_ms.max.max(s.latency_ms.max);
        }
        if out.completed > 0 {
            out.mean_service_ms = service_weight / out.completed as f64;
        }
        Some(out)
    }
}

/// One tier's servers as the autoscaler manages them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TierFleet {
    /// Serving (ready and in rotation).
    pub ready: u32,
    /// Launched, not ready yet.
    pub booting: u32,
    /// Taken out of rotation, finishing their work before they stop.
    pub draining: u32,
    /// The floor and ceiling the autoscaler keeps the tier within.
    pub min: u32,
    pub max: u32,
    /// Seconds of every server of the tier, booting and draining included, since the store
    /// started.
    pub server_seconds: f64,
    /// The last merged sample of the tier, if a balancer answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<TierSample>,
}

impl TierFleet {
    /// Servers that cost money: every one launched and not yet stopped.
    pub fn running(&self) -> u32 {
        self.ready + self.booting + self.draining
    }
}

/// `GET /status` of the autoscaler (and its part of `quire status`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The policy deciding, e.g. `default`, `queue`.
    pub policy: String,
    /// `frontend`, `catalog`, `order`.
    pub tiers: BTreeMap<String, TierFleet>,
}
