//! The report of one run, live or simulated, and the [`Recorder`] that builds it.
//!
//! The recorder is fed events (arrivals, finished requests, departed clients, server counts)
//! in roughly increasing time. Recording a request is O(1): one add into the operation's
//! histogram and one into its second's. Per-second p99s need a histogram per second, but only
//! for the seconds still receiving requests: a ring of `RING` (64) histograms is reused, and a
//! second's p99 is fixed when its slot is taken by a later second.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use quire_common::capacity::Costs;
use serde::{Deserialize, Serialize};

use crate::histogram::Histogram;
use crate::model::{oracle_servers, ClientModel, Op, Outcome, Status, TIERS};
use crate::profile::Profile;

/// Seconds of per-second histograms kept open; a request finishing more than this much
/// earlier than the latest one still counts everywhere but in its second's p99.
const RING: usize = 64;

/// Latency of one operation over the run, in milliseconds, over every request whatever its
/// outcome (a request given up at its timeout counts at the time waited), and the outcomes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct OpLatency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub late: u64,
    pub dropped: u64,
    pub failed: u64,
}

/// One second of the run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Point {
    /// Start of the second, seconds since the run began.
    pub t: f64,
    /// Clients that arrived in this second.
    pub arrival_rate: f64,
    /// Requests that finished in this second.
    pub requests: u64,
    /// Servers running per tier (booting and draining included), the last sample at or
    /// before this second.
    pub servers: BTreeMap<String, u32>,
    /// Servers the oracle would run in all tiers at the profile's rate in this second.
    pub oracle_servers: u32,
    /// p99 latency of the requests that finished in this second, 0 when none.
    pub p99_ms: f64,
    /// Clients that left unhappy in this second.
    pub unhappy: u64,
}

/// The outcome of a run: what clients saw, what servers it took, and how that compares with
/// the oracle.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Report {
    /// The profile's spec.
    pub profile: String,
    /// The profile's length in seconds (the timeline may run on while the last clients finish).
    pub duration_s: f64,
    /// Clients that arrived.
    pub arrivals: u64,
    /// Clients that finished; the sum of `statuses`.
    pub clients: u64,
    /// Clients the load generator could not start because too many were running
    /// (`--max-clients`): not the store's fault, so in neither `clients` nor `statuses`.
    pub skipped: u64,
    /// Finished clients per status: `ok`, `purchased`, `timeout`, `dropped`, `failed`.
    pub statuses: BTreeMap<String, u64>,
    /// Unhappy (timeout, dropped, failed) clients as a percentage of `clients`.
    pub unhappy_pct: f64,
    /// Per operation: `lookup`, `search`, `buy`.
    pub latency_ms: BTreeMap<String, OpLatency>,
    /// Server-seconds per tier, booting and draining included, and `total`.
    pub server_seconds: BTreeMap<String, f64>,
    /// Per tier and `total`: ∫ max(floor, ceil(oracle_load)) dt over the profile, 1 s steps
    /// sampled at each step's middle.
    pub oracle_server_seconds: BTreeMap<String, f64>,
    /// `server_seconds` total over `oracle_server_seconds` total (0 when the oracle's is 0).
    pub ratio_to_oracle: f64,
    /// One point per second.
    pub timeline: Vec<Point>,
    /// The autoscaling policy, set by the caller.
    pub policy: Option<String>,
}

/// Per-operation tallies.
#[derive(Default)]
struct OpStats {
    latency: Histogram,
    late: u64,
    dropped: u64,
    failed: u64,
}

/// Per-second tallies.
#[derive(Clone, Copy, Default)]
struct Second {
    arrivals: u64,
    requests: u64,
    unhappy: u64,
    p99_ms: f64,
}

/// One tier's server counts.
#[derive(Default)]
struct TierTrack {
    /// The last sample taken in each second, if any.
    per_second: Vec<Option<u32>>,
    /// The previous sample, for integrating server-seconds as a step function.
    last: Option<(f64, u32)>,
    integrated: f64,
    /// Server-seconds measured by the caller; replaces `integrated` when set.
    exact: Option<f64>,
}

/// Builds a [`Report`] from the events of a run.
pub struct Recorder {
    profile: Profile,
    model: ClientModel,
    costs: Costs,
    arrivals: u64,
    skipped: u64,
    /// Indexed like [`Status::ALL`].
    statuses: [u64; 5],
    /// Indexed like [`Op::ALL`].
    ops: [OpStats; 3],
    seconds: Vec<Second>,
    /// Histograms of the seconds still open, slot `s % RING` holding second `s`.
    open: Vec<(Option<usize>, Histogram)>,
    tiers: BTreeMap<String, TierTrack>,
}

/// The second `t` falls in; negative and NaN times count as the first.
fn second_of(t: f64) -> usize {
    t.max(0.0) as usize
}

impl Recorder {
    pub fn new(profile: &Profile, model: ClientModel, costs: Costs) -> Self {
        let seconds = vec![Second::default(); profile.duration().ceil() as usize];
        Recorder {
            profile: profile.clone(),
            model,
            costs,
            arrivals: 0,
            skipped: 0,
            statuses: [0; 5],
            ops: Default::default(),
            seconds,
            open: (0..RING).map(|_| (None, Histogram::default())).collect(),
            tiers: BTreeMap::new(),
        }
    }

    fn second(&mut self, t: f64) -> &mut Second {
        let s = second_of(t);
        if s >= self.seconds.len() {
            self.seconds.resize(s + 1, Second::default());
        }
        &mut self.seconds[s]
    }

    /// One client arrived at t (seconds since start).
    pub fn arrival(&mut self, t: f64) {
        self.arrivals += 1;
        self.second(t).arrivals += 1;
    }

    /// One client arrived at t but the load generator could not start it.
    pub fn skipped(&mut self, t: f64) {
        self.skipped += 1;
        self.arrival(t);
    }

    /// One request finished at time t: its operation, latency in ms, and outcome. O(1).
    pub fn request(&mut self, t: f64, op: Op, latency_ms: f64, outcome: Outcome) {
        let stats = &mut self.ops[op as usize];
        stats.latency.record(latency_ms);
        match outcome {
            Outcome::Ok => {}
            Outcome::Late => stats.late += 1,
            Outcome::Dropped => stats.dropped += 1,
            Outcome::Failed => stats.failed += 1,
        }
        self.second(t).requests += 1;
        let s = second_of(t);
        let (holder, histogram) = &mut self.open[s % RING];
        match *holder {
            Some(h) if h == s => {}
            Some(h) if h > s => return, // too late for its second's p99
            Some(h) => {
                self.seconds[h].p99_ms = histogram.quantile_ms(0.99);
                histogram.clear();
                *holder = Some(s);
            }
            None => *holder = Some(s),
        }
        histogram.record(latency_ms);
    }

    /// A client finished (left) at t with this status.
    pub fn client(&mut self, t: f64, status: Status) {
        self.statuses[status as usize] += 1;
        if !status.is_happy() {
            self.second(t).unhappy += 1;
        }
    }

    /// Servers running in `tier` at time t (called about once a second per tier; booting and
    /// draining included). Server-seconds are integrated from these samples as a step
    /// function from the first sample to the last.
    pub fn servers(&mut self, t: f64, tier: &str, running: u32) {
        let track = self.tiers.entry(tier.to_string()).or_default();
        if let Some((t0, r0)) = track.last {
            track.integrated += r0 as f64 * (t - t0).max(0.0);
        }
        track.last = Some((t, running));
        let s = second_of(t);
        if s >= track.per_second.len() {
            track.per_second.resize(s + 1, None);
        }
        track.per_second[s] = Some(running);
    }

    /// Total server-seconds of a tier, when the caller measured them exactly (the live store's
    /// autoscaler does); otherwise they are integrated from `servers` samples.
    pub fn set_server_seconds(&mut self, tier: &str, seconds: f64) {
        self.tiers.entry(tier.to_string()).or_default().exact = Some(seconds);
    }

    pub fn finish(mut self) -> Report {
        for (holder, histogram) in &self.open {
            if let Some(s) = *holder {
                self.seconds[s].p99_ms = histogram.quantile_ms(0.99);
            }
        }
        let clients = self.statuses.iter().sum::<u64>();
        let unhappy: u64 = Status::ALL.iter().filter(|s| !s.is_happy()).map(|&s| self.statuses[s as usize]).sum();
        let statuses = Status::ALL.iter().map(|&s| (s.name().to_string(), self.statuses[s as usize])).collect();
        let latency_ms = Op::ALL
            .iter()
            .map(|&op| {
                let s = &self.ops[op as usize];
                let latency = OpLatency {
                    count: s.latency.count(),
                    p50: s.latency.quantile_ms(0.5),
                    p90: s.latency.quantile_ms(0.9),
                    p99: s.latency.quantile_ms(0.99),
                    max: s.latency.max_ms(),
                    late: s.late,
                    dropped: s.dropped,
                    failed: s.failed,
                };
                (op.name().to_string(), latency)
            })
            .collect();

        let mut server_seconds: BTreeMap<String, f64> =
            self.tiers.iter().map(|(tier, track)| (tier.clone(), track.exact.unwrap_or(track.integrated))).collect();
        let total = server_seconds.values().sum();
        server_seconds.insert("total".into(), total);

        // The oracle, over the profile in 1 s steps (the last one possibly shorter).
        let duration = self.profile.duration();
        let len = self.seconds.len().max(self.tiers.values().map(|t| t.per_second.len()).max().unwrap_or(0));
        let mut oracle: BTreeMap<String, f64> = TIERS.iter().map(|t| (t.to_string(), 0.0)).collect();
        let mut oracle_per_second = Vec::with_capacity(len);
        for s in 0..len {
            let start = s as f64;
            let servers = oracle_servers(self.profile.rate_at(start + 0.5), &self.model, &self.costs);
            let step = (duration - start).clamp(0.0, 1.0);
            for (tier, n) in servers {
                *oracle.entry(tier.to_string()).or_default() += n as f64 * step;
            }
            oracle_per_second.push(servers.iter().map(|s| s.1).sum::<u32>());
        }
        let oracle_total = oracle.values().sum();
        oracle.insert("total".into(), oracle_total);

        let mut current: BTreeMap<String, u32> = BTreeMap::new();
        let timeline = (0..len)
            .map(|s| {
                for (tier, track) in &self.tiers {
                    if let Some(Some(n)) = track.per_second.get(s) {
                        current.insert(tier.clone(), *n);
                    }
                }
                let second = self.seconds.get(s).copied().unwrap_or_default();
                Point {
                    t: s as f64,
                    arrival_rate: second.arrivals as f64,
                    requests: second.requests,
                    servers: current.clone(),
                    oracle_servers: oracle_per_second[s],
                    p99_ms: second.p99_ms,
                    unhappy: second.unhappy,
                }
            })
            .collect();

        Report {
            profile: self.profile.to_string(),
            duration_s: duration,
            arrivals: self.arrivals,
            clients,
            skipped: self.skipped,
            statuses,
            unhappy_pct: if clients > 0 { 100.0 * unhappy as f64 / clients as f64 } else { 0.0 },
            latency_ms,
            ratio_to_oracle: if oracle_total > 0.0 { total / oracle_total } else { 0.0 },
            server_seconds,
            oracle_server_seconds: oracle,
            timeline,
            policy: None,
        }
    }
}

impl Report {
    /// The chart over time: arrival rate; servers per tier against the oracle; p99 latency;
    /// unhappy clients per second. A standalone SVG document.
    pub fn to_svg(&self) -> String {
        crate::chart::render(self)
    }

    /// A readable multi-line summary: clients and statuses, latency per operation,
    /// server-seconds per tier against the oracle.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let policy = self.policy.as_deref().map(|p| format!(", policy {p}")).unwrap_or_default();
        let _ = writeln!(out, "profile {} ({}{policy})", self.profile, format_seconds(self.duration_s));
        let skipped =
            if self.skipped > 0 { format!(", {} not started (--max-clients)", self.skipped) } else { String::new() };
        let _ = writeln!(
            out,
            "clients {} (arrived {}{skipped}), unhappy {:.2} %",
            self.clients, self.arrivals, self.unhappy_pct
        );
        let statuses: Vec<String> = Status::ALL
            .iter()
            .map(|s| format!("{} {}", s.name(), self.statuses.get(s.name()).copied().unwrap_or(0)))
            .collect();
        let _ = writeln!(out, "  {}", statuses.join(", "));

        let _ = writeln!(
            out,
            "\n{:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}",
            "op", "requests", "p50 ms", "p90 ms", "p99 ms", "max ms", "late", "dropped", "failed"
        );
        for op in Op::ALL.map(Op::name) {
            let Some(l) = self.latency_ms.get(op) else { continue };
            let _ = writeln!(
                out,
                "{op:<8} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8} {:>8} {:>8}",
                l.count, l.p50, l.p90, l.p99, l.max, l.late, l.dropped, l.failed
            );
        }

        let _ = writeln!(out, "\n{:<8} {:>14} {:>14} {:>8}", "tier", "server-s", "oracle", "ratio");
        let mut tiers: Vec<&String> = self.server_seconds.keys().chain(self.oracle_server_seconds.keys()).collect();
        tiers.sort_by_key(|t| (t.as_str() == "total", TIERS.iter().position(|x| x == t), t.as_str()));
        tiers.dedup();
        for tier in tiers {
            let run = self.server_seconds.get(tier);
            let oracle = self.oracle_server_seconds.get(tier);
            let ratio = match (run, oracle) {
                (Some(r), Some(o)) if *o > 0.0 => format!("{:.2}", r / o),
                _ => "-".into(),
            };
            let cell = |v: Option<&f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
            let _ = writeln!(out, "{tier:<8} {:>14} {:>14} {ratio:>8}", cell(run), cell(oracle));
        }
        out
    }
}

/// `90 s`, `2.5 min`, `24.0 h`: a duration for people.
pub(crate) fn format_seconds(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorder whose oracle numbers the tests work out by hand (a cache answering 80 %).
    fn recorder(spec: &str) -> Recorder {
        let model = ClientModel { lookup_hit_ratio: 0.8, ..ClientModel::default() };
        Recorder::new(&Profile::parse(spec).unwrap(), model, Costs::CLOUD_SIM)
    }

    #[test]
    fn statuses_percentiles_and_unhappy() {
        let mut r = recorder("c-10-10s");
        for i in 0..100 {
            let t = i as f64 / 10.0;
            r.arrival(t);
            r.request(t, Op::Lookup, (i + 1) as f64, Outcome::Ok);
            let status = match i % 10 {
                0 => Status::Timeout,
                1 => Status::Dropped,
                2..=5 => Status::Purchased,
                _ => Status::Ok,
            };
            r.client(t, status);
        }
        r.request(3.0, Op::Buy, 2500.0, Outcome::Late);
        r.request(3.0, Op::Search, 10.0, Outcome::Dropped);
        let report = r.finish();
        assert_eq!(report.clients, 100);
        assert_eq!(report.arrivals, 100);
        assert_eq!(report.statuses["ok"], 40);
        assert_eq!(report.statuses["purchased"], 40);
        assert_eq!(report.statuses["timeout"], 10);
        assert_eq!(report.statuses["dropped"], 10);
        assert_eq!(report.statuses["failed"], 0);
        assert_eq!(report.statuses.values().sum::<u64>(), report.clients);
        assert!((report.unhappy_pct - 20.0).abs() < 1e-9);

        let lookup = &report.latency_ms["lookup"];
        assert_eq!(lookup.count, 100);
        assert!((lookup.p50 - 50.0).abs() < 2.0, "{lookup:?}");
        assert!((lookup.p99 - 99.0).abs() < 4.0, "{lookup:?}");
        assert_eq!(lookup.max, 100.0);
        assert_eq!(report.latency_ms["buy"].late, 1);
        assert_eq!(report.latency_ms["search"].dropped, 1);

        assert_eq!(report.timeline.len(), 10);
        let second3 = &report.timeline[3];
        assert_eq!(second3.requests, 12);
        assert_eq!(second3.arrival_rate, 10.0);
        assert_eq!(second3.unhappy, 2);
        assert!((second3.p99_ms - 2500.0).abs() < 100.0, "{second3:?}");
        assert!((report.timeline[0].p99_ms - 10.0).abs() < 0.5, "{:?}", report.timeline[0]);
    }

    #[test]
    fn per_second_p99_survives_the_ring() {
        let mut r = recorder("c-1-200s");
        for s in 0..200 {
            r.request(s as f64 + 0.5, Op::Search, s as f64 + 1.0, Outcome::Ok);
        }
        // Too late for second 10's histogram (its slot has moved on), but still counted.
        r.request(10.2, Op::Search, 1e6, Outcome::Late);
        let report = r.finish();
        for p in &report.timeline {
            assert!((p.p99_ms - (p.t + 1.0)).abs() <= (p.t + 1.0) / 16.0, "{p:?}");
        }
        assert_eq!(report.timeline[10].requests, 2);
        assert_eq!(report.latency_ms["search"].count, 201);
    }

    #[test]
    fn server_seconds_integrated_or_exact_against_the_oracle() {
        let mut r = recorder("c-10-10s");
        for s in 0..=10 {
            r.servers(s as f64, "frontend", if s < 5 { 2 } else { 4 });
            r.servers(s as f64, "catalog", 4);
            r.servers(s as f64, "order", 3);
        }
        let report = r.finish();
        assert_eq!(report.server_seconds["frontend"], 2.0 * 5.0 + 4.0 * 5.0);
        assert_eq!(report.server_seconds["catalog"], 40.0);
        assert_eq!(report.server_seconds["total"], 100.0);
        // At 10 clients/s the oracle runs 2 + 4 + 3 servers for 10 s.
        assert_eq!(report.oracle_server_seconds["frontend"], 20.0);
        assert_eq!(report.oracle_server_seconds["catalog"], 40.0);
        assert_eq!(report.oracle_server_seconds["order"], 30.0);
        assert_eq!(report.oracle_server_seconds["total"], 90.0);
        assert!((report.ratio_to_oracle - 100.0 / 90.0).abs() < 1e-9);
        assert_eq!(report.timeline.len(), 11);
        assert_eq!(report.timeline[4].servers["frontend"], 2);
        assert_eq!(report.timeline[7].servers["frontend"], 4);
        assert_eq!(report.timeline[0].oracle_servers, 9);
        assert_eq!(report.timeline[10].oracle_servers, 7); // after the profile: the floors

        let mut r = recorder("c-10-10s");
        r.servers(0.0, "frontend", 2);
        r.servers(1.0, "frontend", 2);
        r.set_server_seconds("frontend", 123.0);
        assert_eq!(r.finish().server_seconds["frontend"], 123.0);
    }

    #[test]
    fn text_and_json() {
        let mut r = recorder("c-2-3s");
        r.arrival(0.1);
        r.request(0.2, Op::Lookup, 12.0, Outcome::Ok);
        r.client(0.2, Status::Ok);
        r.servers(0.0, "frontend", 1);
        let mut report = r.finish();
        report.policy = Some("queue".into());
        let text = report.to_text();
        for want in ["profile c-2-3s (3 s, policy queue)", "clients 1", "lookup", "oracle", "total"] {
            assert!(text.contains(want), "{want}: {text}");
        }
        let json = serde_json::to_string(&report).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.timeline, report.timeline);
    }
}
