//! `quire load`: simulated clients against a running store, over HTTP.
//!
//! Clients arrive open-loop at the profile's Poisson arrival times, whatever the store's
//! state: a slow store does not slow the arrivals down (it gets unhappy clients instead).
//! Each client is a task that follows the [`ClientModel`]. One shared `reqwest` client keeps
//! the connections. Every request carries the store's deadline header and a client-side
//! timeout a little over it, so the run ends by itself within the profile's length plus one
//! client's longest visit.
//!
//! Requests are classified as:
//! - 2xx in time → ok; 2xx after the timeout, 504, or no answer by the timeout → late;
//! - 503 `dropped` → dropped (the store shed it to keep its deadlines);
//! - 409 `out_of_stock` to a buy, in time → ok: the store answered correctly and in time, so
//!   the client is happy, though it did not buy (its status is `ok`, not `purchased`);
//! - anything else (other error answers, connection errors) → failed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use quire_common::capacity::Costs;
use quire_common::error::ErrorBody;
use quire_common::samples::FleetStatus;
use quire_common::{headers, Deadline};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::{StatusCode, Url};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::model::{ClientModel, Op, Outcome, Status};
use crate::profile::Profile;
use crate::report::{Recorder, Report};

/// How much longer than its timeout a client waits for an answer, so that an answer the
/// store sends right at the deadline (a 504, a late success) is seen rather than cut off.
const TIMEOUT_SLACK: Duration = Duration::from_millis(250);

/// Options of `quire load`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Base URL of the store's edge balancer.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Load profile: phases joined by commas, e.g. `c-20-30s`, `ramp-5-50-60s`, `diurnal-40-120s`,
    /// `trace-FILE.csv`; a spike is `c-10-30s,c-80-10s,c-10-30s`.
    #[arg(long, default_value = "c-10-60s")]
    pub profile: String,
    /// Chance that a client whose browses were all on time buys a book.
    #[arg(long, default_value_t = 0.5)]
    pub buy_probability: f64,
    /// Share of lookups the store's frontend caches answer, for the oracle's count of
    /// catalog servers (the live store has its own cache; this only prices the load).
    #[arg(long, default_value_t = ClientModel::default().lookup_hit_ratio)]
    pub hit_ratio: f64,
    /// Seed of the arrivals and of every client's choices: the same seed, the same clients.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Autoscaler status URL (`GET` returns its fleet JSON): polled every second for the
    /// servers per tier and their server-seconds.
    #[arg(long)]
    pub fleet: Option<String>,
    /// Print the report as one JSON object on stdout, and nothing else there.
    #[arg(long)]
    pub json: bool,
    /// Where to write the SVG chart.
    #[arg(long, default_value = "quire-load.svg")]
    pub chart: PathBuf,
    /// Clients running at once at most; an arrival beyond it is not started (and counted as
    /// skipped), protecting this machine when the store stalls.
    #[arg(long, default_value_t = 5000)]
    pub max_clients: usize,
    /// Book ids to pick from: 1 to N.
    #[arg(long, default_value_t = 7)]
    pub items: u64,
    /// Topics to search, comma separated (default: the builtin catalog's).
    #[arg(long, value_delimiter = ',', default_value = "distributed systems,graduate school")]
    pub topics: Vec<String>,
}

/// What every client task shares.
struct Shared {
    http: reqwest::Client,
    /// The edge's base URL, with no trailing empty path segment.
    target: Url,
    items: u64,
    topics: Vec<String>,
    model: ClientModel,
    start: Instant,
    recorder: Mutex<Recorder>,
    running: AtomicUsize,
    finished: AtomicU64,
    unhappy: AtomicU64,
}

/// The recorder, even if a client task panicked while holding it (its tallies stay usable).
fn lock(recorder: &Mutex<Recorder>) -> MutexGuard<'_, Recorder> {
    recorder.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// `target` with `segments` appended, each percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.target.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Sends one request of `op`, records it, and says how it ended and whether it bought.
    async fn send(&self, op: Op, request: reqwest::RequestBuilder) -> (Outcome, bool) {
        let timeout = self.model.timeout(op);
        let request =
            request.header(headers::DEADLINE, Deadline::after(timeout).header_value()).timeout(timeout + TIMEOUT_SLACK);
        let sent = Instant::now();
        let answer = match request.send().await {
            Ok(response) => {
                let status = response.status();
                response.bytes().await.map(|body| (status, body))
            }
            Err(e) => Err(e),
        };
        let latency = sent.elapsed();
        let on_time = latency <= timeout;
        let (outcome, bought) = match answer {
            Err(e) if e.is_timeout() => (Outcome::Late, false),
            Err(_) => (Outcome::Failed, false),
            Ok((status, _)) if status.is_success() => {
                if on_time {
                    (Outcome::Ok, op == Op::Buy)
                } else {
                    (Outcome::Late, false)
                }
            }
            Ok((StatusCode::GATEWAY_TIMEOUT, _)) => (Outcome::Late, false),
            Ok((status, body)) => {
                let code = serde_json::from_slice::<ErrorBody>(&body).map(|b| b.error).unwrap_or_default();
                match (status, code.as_str()) {
                    (StatusCode::SERVICE_UNAVAILABLE, "dropped") => (Outcome::Dropped, false),
                    (StatusCode::CONFLICT, "out_of_stock") if op == Op::Buy && on_time => (Outcome::Ok, false),
                    (StatusCode::CONFLICT, "out_of_stock") if op == Op::Buy => (Outcome::Late, false),
                    _ => (Outcome::Failed, false),
                }
            }
        };
        let now = self.now();
        lock(&self.recorder).request(now, op, latency.as_secs_f64() * 1000.0, outcome);
        (outcome, bought)
    }

    /// One client's visit: browse, then maybe buy; its status is recorded when it leaves.
    async fn visit(&self, mut rng: StdRng) {
        let model = &self.model;
        let browses = rng.gen_range(model.min_browses..=model.max_browses.max(model.min_browses));
        let mut status = None;
        for _ in 0..browses {
            let (op, url) = if rng.gen_bool(model.search_share) {
                let topic = &self.topics[rng.gen_range(0..self.topics.len())];
                (Op::Search, self.url(&["search", topic]))
            } else {
                (Op::Lookup, self.url(&["lookup", &rng.gen_range(1..=self.items).to_string()]))
            };
            let (outcome, _) = self.send(op, self.http.get(url)).await;
            status = outcome.status();
            if status.is_some() {
                break;
            }
        }
        if status.is_none() && rng.gen_bool(model.buy_probability) {
            let url = self.url(&["buy", &rng.gen_range(1..=self.items).to_string()]);
            // Random, not drawn from the seed: a rerun with the same seed must not replay the
            // keys of earlier runs, which the store would answer without buying again.
            let key = uuid::Uuid::new_v4().to_string();
            let request =
                self.http.post(url).header(headers::IDEMPOTENCY_KEY, key).json(&serde_json::json!({"quantity": 1}));
            let (outcome, bought) = self.send(Op::Buy, request).await;
            status = outcome.status().or(bought.then_some(Status::Purchased));
        }
        let status = status.unwrap_or(Status::Ok);
        let now = self.now();
        lock(&self.recorder).client(now, status);
        self.finished.fetch_add(1, Ordering::Relaxed);
        if !status.is_happy() {
            self.unhappy.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The autoscaler's fleet as polled: the first and last answers, for exact server-seconds.
#[derive(Default)]
struct FleetPolls {
    first: Option<FleetStatus>,
    last: Option<FleetStatus>,
    failures: u64,
}

/// Polls the fleet URL every second until `stop` changes, feeding the servers per tier to the
/// recorder; polls once more when stopping so the last answer is at the end of the run.
async fn poll_fleet(shared: Arc<Shared>, url: String, mut stop: watch::Receiver<bool>) -> FleetPolls {
    let mut polls = FleetPolls::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        };
        let answer = async {
            shared.http.get(&url).timeout(Duration::from_secs(1)).send().await?.error_for_status()?.json().await
        };
        match answer.await {
            Ok(fleet) => {
                let fleet: FleetStatus = fleet;
                let now = shared.now();
                let mut recorder = lock(&shared.recorder);
                for (tier, servers) in &fleet.tiers {
                    recorder.servers(now, tier, servers.running());
                }
                drop(recorder);
                polls.first.get_or_insert_with(|| fleet.clone());
                polls.last = Some(fleet);
            }
            Err(e) => {
                if polls.failures == 0 {
                    tracing::warn!(%url, error = %e, "cannot read the fleet status");
                }
                polls.failures += 1;
            }
        }
        if stopping {
            return polls;
        }
    }
}

/// The progress bar on stderr, hidden when stderr is not a terminal or `hidden`.
fn progress_bar(duration: f64, hidden: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(duration.ceil() as u64),
        if hidden || !std::io::stderr().is_terminal() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{wide_bar:.cyan/blue}] {pos}/{len} s  {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Runs the load described by `args` against the store and returns its report; prints the
/// report (text, or JSON with `--json`) on stdout and writes the chart.
pub async fn run(args: LoadArgs) -> anyhow::Result<Report> {
    let profile = Profile::parse(&args.profile)?;
    if !(0.0..=1.0).contains(&args.buy_probability) {
        bail!("--buy-probability must be between 0 and 1, got {}", args.buy_probability);
    }
    if args.items == 0 {
        bail!("--items must be at least 1");
    }
    let topics: Vec<String> = args.topics.iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
    if topics.is_empty() {
        bail!("--topics needs at least one topic");
    }
    let target = Url::parse(&args.target).with_context(|| format!("--target {} is not a URL", args.target))?;
    if target.cannot_be_a_base() {
        bail!("--target {} cannot be a base URL (expected e.g. http://127.0.0.1:8080)", args.target);
    }
    if !(0.0..=1.0).contains(&args.hit_ratio) {
        bail!("--hit-ratio must be between 0 and 1, got {}", args.hit_ratio);
    }
    let model = ClientModel {
        buy_probability: args.buy_probability,
        lookup_hit_ratio: args.hit_ratio,
        ..ClientModel::default()
    };
    // The oracle prices work at the simulated cloud's costs (docs/ARCHITECTURE.md, "Capacity emulation"), whatever the
    // store runs: it is the yardstick every run is compared with.
    let costs = Costs::CLOUD_SIM;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.max_clients)
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()
        .context("cannot build the HTTP client")?;

    let start = Instant::now();
    let shared = Arc::new(Shared {
        http,
        target,
        items: args.items,
        topics,
        model,
        start,
        recorder: Mutex::new(Recorder::new(&profile, model, costs)),
        running: AtomicUsize::new(0),
        finished: AtomicU64::new(0),
        unhappy: AtomicU64::new(0),
    });
    let (stop_fleet, stopped) = watch::channel(false);
    let fleet = args.fleet.clone().map(|url| tokio::spawn(poll_fleet(Arc::clone(&shared), url, stopped)));
    let bar = progress_bar(profile.duration(), args.json);
    let progress = tokio::spawn(show_progress(Arc::clone(&shared), profile.clone(), bar.clone()));

    // Arrivals: one task per client, started at its arrival time.
    let mut clients = JoinSet::new();
    let mut client_seeds = StdRng::seed_from_u64(args.seed ^ 0x9e37_79b9_7f4a_7c15);
    for at in profile.arrivals(StdRng::seed_from_u64(args.seed)) {
        tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
        while clients.try_join_next().is_some() {}
        let rng = StdRng::seed_from_u64(client_seeds.gen());
        if shared.running.load(Ordering::Relaxed) >= args.max_clients {
            lock(&shared.recorder).skipped(at);
            continue;
        }
        lock(&shared.recorder).arrival(at);
        shared.running.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        clients.spawn(async move {
            shared.visit(rng).await;
            shared.running.fetch_sub(1, Ordering::Relaxed);
        });
    }
    // Every request has a client-side timeout, so the clients finish by themselves; the
    // limit only guards against a bug.
    let longest_visit = (model.browse_timeout + TIMEOUT_SLACK) * model.max_browses + model.buy_timeout + TIMEOUT_SLACK;
    let finish = tokio::time::timeout(longest_visit + Duration::from_secs(5), async {
        while clients.join_next().await.is_some() {}
    });
    if finish.await.is_err() {
        tracing::warn!(running = clients.len(), "clients still running after their longest visit; stopping them");
        clients.shutdown().await;
    }
    progress.abort();
    bar.finish_and_clear();

    let _ = stop_fleet.send(true);
    let mut policy = None;
    if let Some(fleet) = fleet {
        let polls = fleet.await.context("the fleet poller failed")?;
        if let (Some(first), Some(last)) = (&polls.first, &polls.last) {
            let mut recorder = lock(&shared.recorder);
            for (tier, end) in &last.tiers {
                if let Some(begin) = first.tiers.get(tier) {
                    recorder.set_server_seconds(tier, (end.server_seconds - begin.server_seconds).max(0.0));
                }
            }
            policy = Some(last.policy.clone());
        } else {
            tracing::warn!(failures = polls.failures, "the fleet status never answered: no server-seconds");
        }
    }

    let recorder = std::mem::replace(&mut *lock(&shared.recorder), Recorder::new(&profile, model, costs));
    let mut report = recorder.finish();
    report.policy = policy;
    std::fs::write(&args.chart, report.to_svg())
        .with_context(|| format!("cannot write the chart to {}", args.chart.display()))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.to_text());
        println!("chart written to {}", args.chart.display());
    }
    Ok(report)
}

/// Updates the progress bar five times a second: time, current rate, clients, unhappy share.
async fn show_progress(shared: Arc<Shared>, profile: Profile, bar: ProgressBar) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let now = shared.now();
        let finished = shared.finished.load(Ordering::Relaxed);
        let unhappy = shared.unhappy.load(Ordering::Relaxed);
        let pct = if finished > 0 { 100.0 * unhappy as f64 / finished as f64 } else { 0.0 };
        bar.set_position((now as u64).min(profile.duration().ceil() as u64));
        bar.set_message(format!(
            "{:.1} clients/s · {} running · {finished} done · {pct:.1} % unhappy",
            profile.rate_at(now),
            shared.running.load(Ordering::Relaxed),
        ));
    }
}
