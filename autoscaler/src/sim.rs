//! `quire simulate`: a discrete-event model of the store's tiers under `--profile cloud-sim`
//! (docs/ARCHITECTURE.md, "Capacity emulation" and "quire load"), driven by the same [`Policy`] code as the live autoscaler and
//! reported by the same [`Recorder`] as `quire load`, so that the two reports compare.
//!
//! # The model
//! - Clients arrive as a Poisson process from the profile; each browses `min..=max` times in a
//!   row (a search or a lookup each), then, if every browse was on time, may buy once.
//! - Every request goes through the frontend tier (60 ms on one slot). A lookup then hits the
//!   frontend's cache or, like a search, goes through the catalog tier (app + DB read, 250 ms).
//!   A buy goes to the order tier (app work, 200 ms) and then waits for its two Raft writes
//!   (400 ms of latency that holds no slot).
//! - Each tier is one central FIFO queue in front of the slots of its ready servers. A request
//!   is dropped when, at the moment a slot could take it, it can no longer finish by its
//!   deadline (its tier's slot time plus the fixed costs known to follow): a *pre-drop* if it
//!   waited in the queue, an *after-drop* if a free server refused it on arrival. The
//!   balancers also drop hopeless heads once a second, before sampling.
//! - Launched servers boot before taking work; removed servers take no new work, finish what
//!   they hold, then stop. Booting servers are removed first (newest first), then idle ones.
//! - Once a second every tier is sampled as its balancer would, the policy decides, and the
//!   running servers (booting and draining included) are recorded.
//!
//! # Layout
//! - [`tier`]: one tier's queue and servers, as counts (O(1) whatever the tier's size).
//! - [`engine`]: the clients and the event loop.

mod engine;
mod tier;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use quire_common::capacity::Costs;
use quire_loadgen::model::{ClientModel, TIER_FLOORS};
use quire_loadgen::profile::Profile;
use quire_loadgen::report::{Recorder, Report};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::policy::{self, Policy, TierKind};

pub use engine::Tally;

/// Simulated time in microseconds since the start of the run.
type Micros = u64;

const SECOND: Micros = 1_000_000;

fn micros(d: Duration) -> Micros {
    d.as_micros() as Micros
}

/// The default ceiling of every tier.
pub const DEFAULT_MAX: u32 = 10_000;

/// `quire simulate`: replay a load profile against a policy in simulated time.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// The scaling policy: default, queue, rate or hpa.
    #[arg(long, default_value = "default")]
    pub policy: String,
    /// The load, e.g. `c-20-30s,ramp-20-80-60s` or `diurnal-700-24h` (clients per second).
    #[arg(long)]
    pub profile: String,
    /// Seed of the arrivals and of the clients' choices; a seed replays exactly.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write the chart (SVG) here.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Chance that a happy client buys after browsing (default 0.5).
    #[arg(long)]
    pub buy_probability: Option<f64>,
    /// Share of lookups the frontends' caches answer (default 0.3, as measured live).
    #[arg(long)]
    pub hit_ratio: Option<f64>,
    /// Worker slots per server (default 1).
    #[arg(long)]
    pub slots: Option<u32>,
    /// Servers ready at start per tier, as FRONTEND,CATALOG,ORDER (default: the floors 1,3,3).
    #[arg(long, value_parser = parse_initial)]
    pub initial: Option<TierCounts>,
    /// Ceiling of every tier.
    #[arg(long, default_value_t = DEFAULT_MAX)]
    pub max: u32,
}

/// One number per tier, in [`TierKind::ALL`] order (frontend, catalog, order).
pub type TierCounts = [u32; 3];

fn parse_initial(s: &str) -> Result<TierCounts, String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let [f, c, o] = parts[..] else {
        return Err(format!("expected FRONTEND,CATALOG,ORDER such as 2,4,3, got `{s}`"));
    };
    let n = |p: &str| p.parse::<u32>().map_err(|e| format!("`{p}`: {e}"));
    Ok([n(f)?, n(c)?, n(o)?])
}

/// What a simulation runs with, besides the profile and the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub costs: Costs,
    pub model: ClientModel,
    pub seed: u64,
    /// Servers ready at start per tier; `None` starts at the floors. Clamped to the bounds.
    pub initial: Option<TierCounts>,
    /// Ceiling per tier.
    pub max: TierCounts,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            costs: Costs::CLOUD_SIM,
            model: ClientModel::default(),
            seed: 1,
            initial: None,
            max: [DEFAULT_MAX; 3],
        }
    }
}

/// The floor of each tier (1 frontend, 3 voters per Raft group), in [`TierKind::ALL`] order.
pub fn floors() -> TierCounts {
    TierKind::ALL.map(|kind| TIER_FLOORS.iter().find(|(name, _)| *name == kind.name()).map_or(1, |&(_, n)| n))
}

/// Replays `profile` against `policy` and reports as `quire load` would, with the policy's name.
///
/// Panics only on an invalid `config.model` (probabilities outside 0..=1); [`run`] checks
/// those first.
pub fn simulate(profile: &Profile, policy: Box<dyn Policy>, config: SimConfig) -> Report {
    simulate_counted(profile, policy, config).0
}

/// [`simulate`], with the counts of events, requests and clients.
pub fn simulate_counted(profile: &Profile, policy: Box<dyn Policy>, config: SimConfig) -> (Report, Tally) {
    let name = policy.name().to_string();
    let floors = floors();
    let max = [0, 1, 2].map(|i| config.max[i].max(floors[i]));
    let initial = [0, 1, 2].map(|i| config.initial.map_or(floors[i], |n| n[i]).clamp(floors[i], max[i]));
    let mut recorder = Recorder::new(profile, config.model, config.costs);
    // Two streams, so that changing how clients choose does not move the arrivals.
    let arrivals = profile.arrivals(StdRng::seed_from_u64(config.seed));
    let choices = StdRng::seed_from_u64(config.seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut engine =
        engine::Engine::new(config.costs, &config.model, choices, initial, floors, max, policy, &mut recorder)
            .expect("client model probabilities within 0..=1");
    let duration = (profile.duration() * 1e6).ceil() as Micros;
    let end = engine.run(arrivals, duration);
    let tally = engine.tally;
    let server_seconds = engine.server_seconds(end);
    drop(engine);
    for (kind, seconds) in server_seconds {
        recorder.set_server_seconds(kind.name(), seconds);
    }
    let mut report = recorder.finish();
    report.policy = Some(name);
    (report, tally)
}

fn check(model: &ClientModel) -> anyhow::Result<()> {
    for (what, p) in [
        ("buy probability", model.buy_probability),
        ("search share", model.search_share),
        ("lookup hit ratio", model.lookup_hit_ratio),
    ] {
        if !(0.0..=1.0).contains(&p) {
            bail!("the {what} must be within 0 and 1, got {p}");
        }
    }
    Ok(())
}

/// `quire simulate`: runs, prints the report (text, or JSON with `--json`) to stdout, writes the
/// chart if asked, and returns the report.
pub fn run(args: SimulateArgs) -> anyhow::Result<Report> {
    let profile = Profile::parse(&args.profile)?;
    let policy = policy::by_name(&args.policy)
        .with_context(|| format!("unknown policy `{}`; known: {}", args.policy, policy::NAMES.join(", ")))?;
    let mut config = SimConfig { seed: args.seed, initial: args.initial, max: [args.max; 3], ..SimConfig::default() };
    if let Some(p) = args.buy_probability {
        config.model.buy_probability = p;
    }
    if let Some(h) = args.hit_ratio {
        config.model.lookup_hit_ratio = h;
    }
    if let Some(slots) = args.slots {
        if slots == 0 {
            bail!("--slots must be at least 1");
        }
        config.costs.slots = slots;
    }
    check(&config.model)?;
    if let Some(initial) = args.initial {
        let floors = floors();
        if let Some(i) = (0..3).find(|&i| initial[i] < floors[i] || initial[i] > config.max[i]) {
            bail!("--initial: {} {} is outside {}..={}", initial[i], TierKind::ALL[i].name(), floors[i], config.max[i]);
        }
    }
    let started = Instant::now();
    let (report, tally) = simulate_counted(&profile, policy, config);
    let elapsed = started.elapsed().as_secs_f64();
    tracing::info!(
        events = tally.events,
        requests = tally.requests,
        clients = tally.clients,
        seconds = elapsed,
        events_per_second = tally.events as f64 / elapsed.max(1e-9),
        "simulated"
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    if let Some(path) = &args.chart {
        std::fs::write(path, report.to_svg()).with_context(|| format!("writing the chart to {}", path.display()))?;
    }
    Ok(report)
}
