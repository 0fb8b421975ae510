//! The simulator end to end: determinism, conservation, capacity, boot and drain, and the
//! policies compared on fixed seeds. Profiles are short: these run in debug builds.

#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

use std::sync::{Arc, Mutex};

use clap::Parser;
use quire_autoscaler::policy::{self, Decision, Observation, Policy, TierKind};
use quire_autoscaler::sim::{simulate, simulate_counted, SimConfig, SimulateArgs};
use quire_loadgen::profile::Profile;
use quire_loadgen::report::Report;

/// Holds every tier at a target, switching to another from a given second on, and keeps
/// what it observed.
struct Fixed {
    targets: [u32; 3],
    then: Option<(f64, [u32; 3])>,
    seen: Arc<Mutex<Vec<Observation>>>,
}

impl Fixed {
    fn boxed(targets: [u32; 3], then: Option<(f64, [u32; 3])>) -> (Box<dyn Policy>, Arc<Mutex<Vec<Observation>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        (Box::new(Fixed { targets, then, seen: Arc::clone(&seen) }), seen)
    }
}

impl Policy for Fixed {
    fn name(&self) -> &'static str {
        "fixed"
    }

    fn decide(&mut self, obs: &Observation) -> Vec<Decision> {
        self.seen.lock().unwrap().push(obs.clone());
        let targets = match self.then {
            Some((from, then)) if obs.now >= from => then,
            _ => self.targets,
        };
        obs.tiers
            .iter()
            .zip(targets)
            .filter(|(t, target)| t.current() != *target)
            .map(|(t, target)| Decision { tier: t.tier, target })
            .collect()
    }
}

fn run_fixed(spec: &str, targets: [u32; 3], then: Option<(f64, [u32; 3])>, seed: u64) -> (Report, Vec<Observation>) {
    let profile = Profile::parse(spec).unwrap();
    let (policy, seen) = Fixed::boxed(targets, then);
    let config = SimConfig { seed, initial: Some(targets), ..SimConfig::default() };
    let report = simulate(&profile, policy, config);
    let seen = seen.lock().unwrap().clone();
    (report, seen)
}

fn status(report: &Report, name: &str) -> u64 {
    report.statuses.get(name).copied().unwrap_or(0)
}

fn sample(obs: &Observation, kind: TierKind) -> &policy::TierState {
    obs.tier(kind).unwrap()
}

#[test]
fn a_seed_replays_exactly_and_another_differs() {
    let json = |seed| serde_json::to_string(&run_fixed("c-20-20s", [2, 6, 3], None, seed).0).unwrap();
    let first = json(1);
    assert_eq!(first, json(1));
    assert_ne!(first, json(2));
}

#[test]
fn every_client_and_request_is_accounted_for() {
    // Under-provisioned, so that every status but failed occurs.
    let profile = Profile::parse("c-30-20s,c-5-10s").unwrap();
    let (policy, _) = Fixed::boxed([1, 3, 3], None);
    let (report, tally) = simulate_counted(&profile, policy, SimConfig::default());
    assert_eq!(report.policy.as_deref(), Some("fixed"));
    assert_eq!(report.arrivals, tally.clients);
    assert_eq!(report.clients, report.arrivals, "every client that arrived finished");
    assert_eq!(report.statuses.values().sum::<u64>(), report.clients);
    assert_eq!(status(&report, "failed"), 0);
    assert!(status(&report, "dropped") > 0);
    let requests: u64 = report.latency_ms.values().map(|l| l.count).sum();
    assert_eq!(requests, tally.requests, "every request sent ended once");
    let dropped: u64 = report.latency_ms.values().map(|l| l.dropped).sum();
    let late: u64 = report.latency_ms.values().map(|l| l.late).sum();
    // A client ends at its first dropped or late request.
    assert_eq!(dropped, status(&report, "dropped"));
    assert_eq!(late, status(&report, "timeout"));
    // Buys only follow happy browses, and each buy that ends well is a purchase.
    let buys = &report.latency_ms["buy"];
    assert_eq!(buys.count - buys.dropped - buys.late, status(&report, "purchased"));
    // Running servers are at least the floors all along; the run lasts the profile at least.
    assert!(report.server_seconds["catalog"] >= 3.0 * 30.0);
    assert!(report.timeline.len() >= 30);
}

#[test]
fn enough_servers_keep_everyone_happy_and_too_few_drop() {
    let (light, _) = run_fixed("c-10-30s", [4, 10, 4], None, 1);
    assert!(light.clients > 200);
    assert!(light.unhappy_pct < 0.5, "over-provisioned: {:.2} % unhappy", light.unhappy_pct);

    let (heavy, seen) = run_fixed("c-60-20s", [1, 3, 3], None, 1);
    assert!(heavy.unhappy_pct > 50.0, "at the floors under 60 clients/s: {:.2} % unhappy", heavy.unhappy_pct);
    assert!(status(&heavy, "dropped") > status(&heavy, "timeout"));
    // The frontend's balancer saw it (one frontend carries 16 of 60 clients/s): full slots, a
    // queue, drops.
    let mid = seen.iter().find(|o| o.now == 10.0).unwrap();
    let frontend = &sample(mid, TierKind::Frontend).sample;
    assert_eq!((frontend.busy_slots, frontend.total_slots, frontend.backends), (1, 1, 1));
    assert!(frontend.queue_len > 0 && frontend.oldest_wait_ms > 0);
    assert!(frontend.arrival_rate > 30.0 && frontend.completed <= 17, "{frontend:?}");
    assert!(seen.iter().map(|o| sample(o, TierKind::Frontend).sample.pre_drops).sum::<u64>() > 0);
}

#[test]
fn a_scale_out_helps_only_after_the_boot() {
    // 60 clients/s need about 32 catalog servers (a 30 % cache hit ratio); 40 absorb them.
    let (report, seen) = run_fixed("c-60-40s", [1, 3, 3], Some((10.0, [14, 40, 9])), 1);
    let at = |now: f64| seen.iter().find(|o| o.now == now).unwrap();
    for now in [11.0, 12.0, 13.0, 14.0] {
        let catalog = sample(at(now), TierKind::Catalog);
        assert_eq!((catalog.ready, catalog.booting), (3, 37), "at {now} s");
        assert!(catalog.sample.drops() > 0, "still overloaded at {now} s");
    }
    let catalog = sample(at(15.0), TierKind::Catalog);
    assert_eq!((catalog.ready, catalog.booting), (40, 0), "launched at 10 s, ready at 15 s");
    // Once the backlog is gone nobody is unhappy.
    let late_unhappy: u64 = report.timeline.iter().filter(|p| p.t >= 18.0).map(|p| p.unhappy).sum();
    let early_unhappy: u64 = report.timeline.iter().filter(|p| (10.0..15.0).contains(&p.t)).map(|p| p.unhappy).sum();
    assert!(early_unhappy > 50, "{early_unhappy} unhappy while booting");
    assert!(late_unhappy <= 2, "{late_unhappy} unhappy after the boot");
    // Booting servers cost from launch: 37 more catalog servers from 10 s on.
    assert!(report.server_seconds["catalog"] >= 3.0 * 10.0 + 40.0 * 30.0);
}

#[test]
fn a_scale_in_drains_without_losing_work() {
    // 5 clients/s keep about 2 catalog servers busy: 20 of them are busy now and then, and
    // 3 carry the load after the scale-in.
    let (report, seen) = run_fixed("c-5-30s", [2, 20, 4], Some((10.0, [2, 3, 4])), 3);
    let catalog = sample(seen.iter().find(|o| o.now == 11.0).unwrap(), TierKind::Catalog);
    assert_eq!((catalog.ready, catalog.booting), (3, 0));
    assert_eq!(report.statuses.values().sum::<u64>(), report.arrivals);
    assert_eq!(status(&report, "failed"), 0);
    assert!(report.unhappy_pct < 1.0, "{:.2} % unhappy", report.unhappy_pct);
    // 20 servers for 10 s, 3 after; drained busy servers run at most one slot time longer.
    let end = report.timeline.len() as f64;
    let seconds = report.server_seconds["catalog"];
    assert!(seconds >= 20.0 * 10.0 + 3.0 * (end - 1.0 - 10.0), "{seconds} catalog server-seconds");
    assert!(seconds <= 20.0 * 10.0 + 3.0 * (end - 10.0) + 17.0 * 0.25, "{seconds} catalog server-seconds");
}

#[test]
fn simulate_args_parse_with_defaults() {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }
    let args = Cli::try_parse_from(["quire", "--profile", "c-1-1s"]).unwrap().args;
    assert_eq!((args.policy.as_str(), args.seed, args.json, args.initial), ("default", 1, false, None));
    let args = Cli::try_parse_from(["quire", "--profile", "c-1-1s", "--initial", "2,4,3"]).unwrap().args;
    assert_eq!(args.initial, Some([2, 4, 3]));
    assert!(Cli::try_parse_from(["quire", "--profile", "c-1-1s", "--initial", "2,4"]).is_err());
}

/// Unhappy % and server-seconds of each policy, summed over seeds.
fn compare(spec: &str, seeds: &[u64]) -> Vec<(&'static str, f64, f64)> {
    let profile = Profile::parse(spec).unwrap();
    policy::NAMES
        .iter()
        .map(|&name| {
            let (mut unhappy, mut seconds) = (0.0, 0.0);
            for &seed in seeds {
                let report =
                    simulate(&profile, policy::by_name(name).unwrap(), SimConfig { seed, ..SimConfig::default() });
                unhappy += report.unhappy_pct / seeds.len() as f64;
                seconds += report.server_seconds["total"] / seeds.len() as f64;
            }
            (name, unhappy, seconds)
        })
        .collect()
}

/// The default policy must be the happiest on a spike (within 1 point) and, against the
/// happiest other policy, not cost more than 10 % more server-seconds.
#[test]
fn the_default_policy_wins_on_a_spike() {
    let table = compare("c-10-30s,c-60-20s,c-10-30s", &[1, 2, 3]);
    let shown: Vec<String> = table.iter().map(|(n, u, s)| format!("{n}: {u:.2} % unhappy, {s:.0} server-s")).collect();
    let shown = shown.join("; ");
    let (_, default_unhappy, default_seconds) = table[0];
    assert_eq!(table[0].0, "default");
    let best = table[1..].iter().min_by(|a, b| a.1.total_cmp(&b.1).then(a.2.total_cmp(&b.2))).unwrap();
    assert!(default_unhappy <= best.1 + 1.0, "{} is happier than default: {shown}", best.0);
    assert!(default_seconds <= best.2 * 1.1, "default costs more than {}: {shown}", best.0);
}
