//! The tier balancer: one per tier (edge, catalog, order), stateless, so several may run.
//!
//! It keeps a registry of backends, beats each every 100 ms, and proxies every request that
//! is not one of its own routes: work (requests that occupy a backend's worker slot: all at
//! the edge, reads, the order tier's buys) round-robin over the backends in rotation with a
//! free slot (a buy to the order leader first while it has one, since a follower would pass
//! it on), waiting in the tier's central queue when none has one; other writes of the Raft
//! tiers to the leader; retried elsewhere only when that is safe. Every second it samples
//! the tier for the autoscaler.
//!
//! # Layout
//! - `registry`: the backends, their heartbeats, slots, and who is in rotation or leads.
//! - `queue`: the central queue: slots handed out in order, pre-drops, the service time.
//! - `proxy`: the catch-all route that forwards, retries and follows leader hints.
//! - `samples`: the per-second [`TierSample`]s and the last minute of them.
//! - this file: configuration, the shared state, the balancer's own routes, `router`, `run`.
//!
//! # Routes
//! `GET /health`, `GET /ready`, `GET /status` (the last sample under `details.sample`),
//! `GET /samples` (the last 60, oldest first), `GET /metrics` and the token-guarded
//! `GET|POST|DELETE /admin/backends` are the balancer's own and shadow any backend route of
//! the same path; everything else, unknown paths included, is forwarded, so a 404 for an
//! unknown route comes from a backend.

mod proxy;
mod queue;
mod registry;
mod samples;

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use quire_common::http::{finish, guarded, Json, Token};
use quire_common::samples::TierSample;
use quire_common::status::{Role, ServerStatus};
use quire_common::ApiError;
use serde_json::{json, Value};
use tracing::{info, warn};

use queue::Queue;
use registry::Registry;
use samples::Samples;
pub use samples::SAMPLE_INTERVAL;

/// The heartbeat period the architecture asks for (docs/ARCHITECTURE.md, "Balancer").
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// In front of the frontends: every request round-robin.
    Edge,
    /// In front of a Raft group: reads round-robin, writes to the leader.
    Catalog,
    Order,
}

impl Tier {
    /// The tier of the backends behind this balancer, as samples name it.
    pub fn backends(&self) -> &'static str {
        match self {
            Tier::Edge => "frontend",
            Tier::Catalog => "catalog",
            Tier::Order => "order",
        }
    }
}

impl fmt::Display for Tier {
    /// The `tier` this balancer reports in `/status`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Edge => "edge",
            Tier::Catalog => "catalog-balancer",
            Tier::Order => "order-balancer",
        })
    }
}

impl FromStr for Tier {
    type Err = String;

    /// Accepts the tier's short name (`edge`, `catalog`, `order`) or its `/status` name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "edge" => Ok(Tier::Edge),
            "catalog" | "catalog-balancer" => Ok(Tier::Catalog),
            "order" | "order-balancer" => Ok(Tier::Order),
            other => Err(format!("unknown tier {other:?} (expected edge, catalog or order)")),
        }
    }
}

#[derive(Clone)]
pub struct Config {
    /// e.g. `catalog-balancer`.
    pub name: String,
    pub tier: Tier,
    /// This balancer's own base URL, reported in `/status`.
    pub advertise_url: String,
    /// Guards the admin routes.
    pub token: Token,
    /// Initial backend base URLs, e.g. `http://127.0.0.1:4101`.
    pub backends: Vec<String>,
    /// Heartbeat period; [`DEFAULT_HEARTBEAT`] unless a test wants otherwise.
    pub heartbeat: Duration,
}

/// The balancer's shared state; cheap to clone.
#[derive(Clone)]
pub struct Balancer(Arc<Shared>);

/// What every handler and the heartbeat task share; reached through [`Balancer`].
pub struct Shared {
    pub(crate) name: String,
    pub(crate) tier: Tier,
    pub(crate) url: String,
    token: Token,
    heartbeat: Duration,
    pub(crate) registry: Arc<Registry>,
    /// The one client for heartbeats and forwarding, so connections are pooled across both.
    pub(crate) client: reqwest::Client,
    /// Round-robin cursor of writes; wraps harmlessly. Work has the queue's own.
    turn: AtomicUsize,
    /// Where work waits for a backend's slot.
    pub(crate) queue: Arc<Queue>,
    pub(crate) samples: Samples,
    pub(crate) stats: Stats,
}

/// Counters exported by `/status` and `/metrics`.
#[derive(Default)]
pub(crate) struct Stats {
    /// Requests received by the proxy route.
    pub(crate) requests: AtomicU64,
    /// Attempts beyond the first, hint hops included.
    pub(crate) retries: AtomicU64,
    /// Requests the balancer answered with its own error (413, 503 or 504).
    pub(crate) failures: AtomicU64,
}

impl Stats {
    fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

impl std::ops::Deref for Balancer {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl Balancer {
    pub fn new(config: Config) -> Self {
        let backends = config.backends.iter().filter_map(|url| {
            normalize(url).map_err(|_| warn!(backend = %url, "ignoring a backend that is not an http(s) base URL")).ok()
        });
        let registry = Arc::new(Registry::new(backends));
        Balancer(Arc::new(Shared {
            queue: Arc::new(Queue::new(registry.clone())),
            samples: Samples::new(config.tier.backends()),
            registry,
            name: config.name,
            tier: config.tier,
            url: config.advertise_url,
            token: config.token,
            heartbeat: config.heartbeat,
            client: quire_common::client::http_client(),
            turn: AtomicUsize::new(0),
            stats: Stats::default(),
        }))
    }

    /// Beats the backends forever; `run` spawns it and aborts it at shutdown. After each
    /// round, waiting work goes to backends that joined rotation or offer more slots.
    pub fn heartbeats(&self) -> impl Future<Output = ()> + Send + 'static {
        let queue = self.queue.clone();
        registry::heartbeats(self.registry.clone(), self.client.clone(), self.heartbeat, move || queue.dispatch())
    }

    /// Takes a [`TierSample`] every [`SAMPLE_INTERVAL`] forever; `run` spawns it and aborts
    /// it at shutdown.
    pub fn sampler(&self) -> impl Future<Output = ()> + Send + 'static {
        let balancer = self.clone();
        async move {
            let start = tokio::time::Instant::now() + SAMPLE_INTERVAL;
            let mut tick = tokio::time::interval_at(start, SAMPLE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                balancer.sample();
            }
        }
    }

    /// Closes the current sampling interval.
    fn sample(&self) -> TierSample {
        self.samples.tick(self.queue.load(), self.queue.pre_drops.load(Ordering::Relaxed))
    }

    fn next_turn(&self) -> usize {
        self.turn.fetch_add(1, Ordering::Relaxed)
    }

    fn in_rotation(&self) -> usize {
        self.registry.snapshot().iter().filter(|b| b.in_rotation()).count()
    }

    /// Why the balancer cannot serve yet, if it cannot.
    fn unready_reason(&self) -> Option<&'static str> {
        if self.in_rotation() == 0 {
            Some("no backend is in rotation")
        } else if self.tier != Tier::Edge && self.registry.leader().is_none() {
            Some("no leader is known")
        } else {
            None
        }
    }
}

/// The balancer's own routes, then the proxy as the catch-all.
pub fn router(state: Balancer) -> Router {
    let admin = Router::new()
        .route("/admin/backends", get(list_backends).post(add_backend).delete(remove_backend))
        .with_state(state.clone());
    let own = Router::new()
        .route("/health", get(|| async { axum::Json(json!({"ok": true})) }))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/samples", get(samples))
        .route("/metrics", get(metrics))
        .with_state(state.clone())
        .merge(guarded(admin, state.token.clone()));
    // `finish` installs a JSON 404 fallback; replacing it afterwards keeps its layers on the
    // own routes while forwarded answers pass through untouched.
    finish(own).fallback(move |request: Request| proxy::forward(state.clone(), request))
}

/// Serves `listener` until `shutdown` resolves, beating the backends meanwhile.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let balancer = Balancer::new(config);
    let beats = tokio::spawn(balancer.heartbeats());
    let sampler = tokio::spawn(balancer.sampler());
    let addr = listener.local_addr().context("reading the listener's address")?;
    info!(%addr, tier = %balancer.tier, backends = balancer.registry.snapshot().len(), "balancer listening");
    let served = axum::serve(listener, router(balancer)).with_graceful_shutdown(shutdown).await;
    beats.abort();
    sampler.abort();
    served.context("serving the balancer")
}

async fn ready(State(b): State<Balancer>) -> Result<axum::Json<Value>, ApiError> {
    match b.unready_reason() {
        None => Ok(axum::Json(json!({"ready": true}))),
        Some(reason) => Err(ApiError::unavailable(reason)),
    }
}

async fn status(State(b): State<Balancer>) -> axum::Json<ServerStatus> {
    let backends: Vec<_> = b.registry.snapshot().iter().map(|b| b.describe()).collect();
    axum::Json(ServerStatus {
        name: b.name.clone(),
        tier: b.tier.to_string(),
        url: b.url.clone(),
        pid: std::process::id(),
        role: Role::None,
        ready: b.unready_reason().is_none(),
        details: json!({
            "backends": backends,
            "leader": b.registry.leader().as_deref(),
            "requests": Stats::get(&b.stats.requests),
            "retries": Stats::get(&b.stats.retries),
            "failures": Stats::get(&b.stats.failures),
            "pre_drops": b.queue.pre_drops.load(Ordering::Relaxed),
            "after_drops": b.samples.after_drops.load(Ordering::Relaxed),
            "queue_len": b.queue.load().queue_len,
            "expected_service_ms": b.queue.expected_service().as_secs_f64() * 1000.0,
            "sample": b.samples.last(),
        }),
        ..ServerStatus::default()
    })
}

/// The last minute of samples, oldest first.
async fn samples(State(b): State<Balancer>) -> axum::Json<Vec<TierSample>> {
    axum::Json(b.samples.history())
}

async fn metrics(State(b): State<Balancer>) -> Response {
    let counters = [
        ("quire_balancer_requests_total", "Requests received by the proxy route.", &b.stats.requests),
        ("quire_balancer_retries_total", "Attempts beyond the first, leader hops included.", &b.stats.retries),
        ("quire_balancer_failures_total", "Requests answered with the balancer's own error.", &b.stats.failures),
        (
            "quire_balancer_work_arrivals_total",
            "Work requests (those that occupy a slot) received.",
            &b.samples.arrivals,
        ),
        (
            "quire_balancer_pre_drops_total",
            "Work dropped in the queue as unable to meet its deadline.",
            &b.queue.pre_drops,
        ),
        (
            "quire_balancer_after_drops_total",
            "Backends' dropped refusals passed on to clients.",
            &b.samples.after_drops,
        ),
    ];
    let mut text = String::new();
    for (name, help, counter) in counters {
        text += &format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n", Stats::get(counter));
    }
    let load = b.queue.load();
    let last = b.samples.last().unwrap_or_default();
    let gauges = [
        ("quire_balancer_backends_in_rotation", "Backends currently in rotation.", f64::from(load.backends)),
        ("quire_balancer_queue_length", "Work requests waiting for a slot.", f64::from(load.queue_len)),
        (
            "quire_balancer_busy_slots",
            "Slots of backends in rotation held by this balancer's work.",
            f64::from(load.busy_slots),
        ),
        (
            "quire_balancer_total_slots",
            "Slots of the backends in rotation (0 when unlimited).",
            f64::from(load.total_slots),
        ),
        ("quire_balancer_arrival_rate", "Work requests per second over the last sample.", last.arrival_rate),
        (
            "quire_balancer_latency_p99_ms",
            "99th percentile latency of the last sample's work, in ms.",
            last.latency_ms.p99,
        ),
    ];
    for (name, help, value) in gauges {
        text += &format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n");
    }
    text += &quire_common::timings::prometheus(&format!("server=\"{}\"", b.name));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[derive(serde::Deserialize)]
struct BackendUrl {
    url: String,
}

/// Backend URLs are compared as strings, so they are stored in one form.
fn normalize(url: &str) -> Result<String, ApiError> {
    let url = url.trim().trim_end_matches('/');
    let host = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    match host {
        Some(host) if !host.is_empty() => Ok(url.to_string()),
        _ => Err(ApiError::bad_request("invalid_body", "url must be an http:// or https:// base URL")),
    }
}

async fn list_backends(State(b): State<Balancer>) -> axum::Json<Value> {
    let urls: Vec<String> = b.registry.snapshot().iter().map(|b| b.url.clone()).collect();
    axum::Json(json!({ "backends": urls }))
}

/// Idempotent: registering a known backend changes nothing.
async fn add_backend(State(b): State<Balancer>, Json(body): Json<BackendUrl>) -> Result<axum::Json<Value>, ApiError> {
    let url = normalize(&body.url)?;
    if b.registry.add(&url) {
        info!(backend = %url, "backend registered");
    }
    Ok(list_backends(State(b)).await)
}

/// Idempotent: removing an unknown backend changes nothing.
async fn remove_backend(
    State(b): State<Balancer>,
    Json(body): Json<BackendUrl>,
) -> Result<axum::Json<Value>, ApiError> {
    let url = normalize(&body.url)?;
    if b.registry.remove(&url) {
        info!(backend = %url, "backend removed");
    }
    Ok(list_backends(State(b)).await)
}

#[cfg(test)]
mod tests;
