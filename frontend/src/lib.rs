//! The frontend: quire's public REST API. Stateless but for its cache of lookups, kept
//! current by the catalog leader's lease and holds (see [`cache`]).
//!
//! # Layout
//! - [`cache`]: versioned entries, the leader's holds and floors, the lease.
//! - [`upstream`]: calls to the catalog and order balancers with deadlines and retries.
//! - this file: routes, handlers, the lease renewal task, `run`.

pub mod cache;
pub mod upstream;

use std::future::{Future, IntoFuture};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use quire_common::api::*;
use quire_common::capacity::{Costs, Workers};
use quire_common::http::{finish, guarded, Json, Token};
use quire_common::status::{Role, ServerStatus};
use quire_common::{headers, ApiError, Deadline};

use cache::Cache;
use upstream::Tier;

pub struct Config {
    pub name: String,
    pub advertise: String,
    pub token: Token,
    pub catalog: Vec<String>,
    pub order: Vec<String>,
    /// Edge balancers to register with.
    pub edge: Vec<String>,
    pub browse_budget: Duration,
    pub buy_budget: Duration,
    /// How often the cache lease is renewed (a third of its length is right).
    pub lease_renew: Duration,
    /// Emulated capacity (`--profile cloud-sim`); `None`: the machine's own.
    pub capacity: Option<Costs>,
}

/// The longest deadline a client may ask for.
pub const MAX_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Frontend {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    advertise: String,
    cache: Cache,
    catalog: Tier,
    order: Tier,
    browse_budget: Duration,
    buy_budget: Duration,
    workers: Workers,
}

impl Frontend {
    pub fn new(config: &Config, client: reqwest::Client) -> Self {
        let token = config.token.0.clone();
        Frontend {
            inner: Arc::new(Inner {
                name: config.name.clone(),
                advertise: config.advertise.clone(),
                cache: Cache::default(),
                catalog: Tier::new(config.catalog.clone(), client.clone(), token.clone()),
                order: Tier::new(config.order.clone(), client, token),
                browse_budget: config.browse_budget,
                buy_budget: config.buy_budget,
                workers: Workers::new(config.capacity),
            }),
        }
    }

    pub fn cache(&self) -> &Cache {
        &self.inner.cache
    }

    /// A public request's deadline and its front-end work, done on one of this server's
    /// worker slots (free unless emulated); refused with `dropped` if it cannot end in time.
    async fn admit(&self, headers: &HeaderMap, budget: Duration) -> Result<Deadline, ApiError> {
        let deadline = Deadline::for_client(headers, budget, MAX_DEADLINE);
        if let Some(costs) = self.inner.workers.costs() {
            self.inner.workers.work(costs.frontend_slot(), Some(deadline)).await?;
        }
        Ok(deadline)
    }
}

pub fn router(frontend: Frontend, token: Token) -> Router {
    let public = Router::new()
        .route("/search/:topic", get(search_topic))
        .route("/search", get(search_text))
        .route("/lookup/:id", get(lookup))
        .route("/buy/:id", post(buy))
        .route("/orders/:id", get(order))
        .route("/health", get(|| async { axum::Json(serde_json::json!({"ok": true})) }))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(frontend.clone());
    let internal = Router::new()
        .route("/internal/invalidate", post(invalidate))
        .route("/admin/drain", post(drain))
        .with_state(frontend)
        // A push merges every write queued behind the previous one: far above an API body.
        .layer(axum::extract::DefaultBodyLimit::max(4 * 1024 * 1024));
    finish(public.merge(guarded(internal, token)))
}

fn json_bytes(bytes: Bytes) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes).into_response()
}

async fn lookup(State(f): State<Frontend>, Path(id): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let deadline = f.admit(&headers, f.inner.browse_budget).await?;
    if let Some(json) = f.inner.cache.get(id) {
        return Ok(json_bytes(json));
    }
    let generation = f.inner.cache.generation();
    let fetched: VersionedBook = f.inner.catalog.get(&format!("/books/{id}"), deadline).await?;
    let json = Bytes::from(serde_json::to_vec(&fetched.book).map_err(|e| ApiError::internal(e.to_string()))?);
    f.inner.cache.put(id, json.clone(), fetched.version, generation);
    Ok(json_bytes(json))
}

async fn search_topic(
    State(f): State<Frontend>,
    Path(topic): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<TopicResults>, ApiError> {
    check_topic(&topic)?;
    let deadline = f.admit(&headers, f.inner.browse_budget).await?;
    let path = format!("/topics/{}", urlencode(&topic));
    f.inner.catalog.get(&path, deadline).await.map(axum::Json)
}

#[derive(serde::Deserialize)]
struct SearchParams {
    q: Option<String>,
}

async fn search_text(
    State(f): State<Frontend>,
    Query(params): Query<SearchParams>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<axum::Json<SearchPage>, ApiError> {
    if params.q.as_deref().is_none_or(|q| q.trim().is_empty()) {
        return Err(ApiError::bad_request("invalid_query", "give the words to search for as ?q="));
    }
    let deadline = f.admit(&headers, f.inner.browse_budget).await?;
    let path = format!("/search?{}", raw.unwrap_or_default());
    f.inner.catalog.get(&path, deadline).await.map(axum::Json)
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn valid_key(key: &str) -> bool {
    (1..=128).contains(&key.len())
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

async fn buy(
    State(f): State<Frontend>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let item_id = parse_id(&id)?;
    let request: BuyRequest = if body.iter().all(u8::is_ascii_whitespace) {
        BuyRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("invalid_body", format!("the body must be {{\"quantity\": n}}: {e}")))?
    };
    let quantity = match request.quantity {
        None => 1,
        Some(q) if q >= 1 && q <= i64::from(MAX_QUANTITY) => q as u32,
        Some(q) => {
            return Err(ApiError::bad_request(
                "invalid_quantity",
                format!("quantity must be an integer from 1 to {MAX_QUANTITY}, not {q}"),
            ))
        }
    };
    let key = match headers.get(headers::IDEMPOTENCY_KEY) {
        Some(v) => match v.to_str() {
            Ok(k) if valid_key(k) => k.to_string(),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_key",
                    "Idempotency-Key must be 1 to 128 letters, digits or - _ . :",
                ))
            }
        },
        None => uuid::Uuid::new_v4().to_string(),
    };
    let deadline = f.admit(&headers, f.inner.buy_budget).await?;
    let place = PlaceOrder { key: key.clone(), item_id, quantity };
    let result = f.inner.order.post_keyed::<Receipt, _>("/orders", &key, &place, deadline).await;
    let mut response = match result {
        Ok(receipt) => axum::Json(receipt).into_response(),
        Err(e) if e.code == "deadline_exceeded" => ApiError::deadline_exceeded(format!(
            "the purchase did not finish in time and its outcome is not known yet; retry with Idempotency-Key: {key}"
        ))
        .into_response(),
        Err(e) => e.into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&key) {
        response.headers_mut().insert(headers::IDEMPOTENCY_KEY, value);
    }
    Ok(response)
}

async fn order(
    State(f): State<Frontend>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<Order>, ApiError> {
    let id = parse_id(&id)?;
    let deadline = f.admit(&headers, f.inner.browse_budget).await?;
    f.inner.order.get(&format!("/orders/{id}"), deadline).await.map(axum::Json)
}

/// A push from the catalog leader: acknowledged once its words are taken (a leader of an
/// older term than this frontend's lease is refused, and waits this lease out).
async fn invalidate(
    State(f): State<Frontend>,
    Json(push): Json<Invalidation>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    f.inner
        .cache
        .apply(&push)
        .map_err(|e| ApiError::new(axum::http::StatusCode::CONFLICT, "superseded", e.to_string()))?;
    Ok(axum::Json(serde_json::json!({"ok": true})))
}

/// Stops taking work before removal: reports not ready, so the edge takes it out of rotation.
async fn drain(State(f): State<Frontend>) -> axum::Json<serde_json::Value> {
    f.inner.workers.drain();
    tracing::info!("draining: out of rotation from now on");
    axum::Json(serde_json::json!({"draining": true, "busy": f.inner.workers.busy()}))
}

fn server_status(f: &Frontend) -> ServerStatus {
    let c = &f.inner.cache;
    let w = &f.inner.workers;
    ServerStatus {
        name: f.inner.name.clone(),
        tier: "frontend".into(),
        url: f.inner.advertise.clone(),
        pid: std::process::id(),
        role: Role::None,
        ready: w.ready(),
        slots: w.slots(),
        work_ms: w.costs().map(|c| c.frontend_slot().as_millis() as u64),
        busy: w.busy(),
        booting: w.booting(),
        draining: w.draining(),
        details: serde_json::json!({
            "after_drops": w.after_drops.load(Ordering::Relaxed),
            "cache_entries": c.len(),
            "cache_hits": c.hits.load(Ordering::Relaxed),
            "cache_misses": c.misses.load(Ordering::Relaxed),
            "cache_flushes": c.flushes.load(Ordering::Relaxed),
            "cache_holds": c.holds(),
            "lease_valid": c.lease_valid(),
        }),
        ..Default::default()
    }
}

async fn status(State(f): State<Frontend>) -> axum::Json<ServerStatus> {
    axum::Json(server_status(&f))
}

async fn ready(State(f): State<Frontend>) -> Response {
    let status = server_status(&f);
    if status.ready {
        axum::Json(status).into_response()
    } else {
        ApiError::unavailable("this frontend is booting or draining").into_response()
    }
}

async fn metrics(State(f): State<Frontend>) -> String {
    let c = &f.inner.cache;
    let l = format!("server=\"{}\"", f.inner.name);
    let spans = quire_common::timings::prometheus(&l);
    format!(
        "# TYPE quire_cache_hits_total counter\nquire_cache_hits_total{{{l}}} {}\n\
         # TYPE quire_cache_misses_total counter\nquire_cache_misses_total{{{l}}} {}\n\
         # TYPE quire_cache_flushes_total counter\nquire_cache_flushes_total{{{l}}} {}\n\
         # TYPE quire_cache_lease_valid gauge\nquire_cache_lease_valid{{{l}}} {}\n{spans}",
        c.hits.load(Ordering::Relaxed),
        c.misses.load(Ordering::Relaxed),
        c.flushes.load(Ordering::Relaxed),
        u8::from(c.lease_valid()),
    )
}

/// Keeps the cache lease running: asks the catalog leader (through the catalog balancer)
/// every `every`; the cache takes each grant (see [`cache::Cache::renew`]).
fn spawn_lease_renewal(f: Frontend, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let sent_at = Instant::now();
            let request = LeaseRequest { frontend: f.inner.advertise.clone() };
            // Never wait for a grant past the lease it would extend.
            let deadline = Deadline::after(every * 2);
            match f.inner.catalog.post_keyed::<LeaseGrant, _>("/leases", "lease", &request, deadline).await {
                Ok(grant) => match f.inner.cache.renew(&grant, sent_at) {
                    cache::Renewal::Extended => {}
                    what => tracing::info!(
                        leader = grant.leader_id,
                        term = grant.term,
                        missed = grant.missed,
                        ?what,
                        "cache lease renewed"
                    ),
                },
                Err(e) => tracing::debug!(error = %e, "lease not renewed"),
            }
        }
    });
}

pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !config.catalog.is_empty() && !config.order.is_empty(),
        "a frontend needs catalog and order balancers"
    );
    let client = quire_common::client::http_client();
    let frontend = Frontend::new(&config, client.clone());
    spawn_lease_renewal(frontend.clone(), config.lease_renew);
    quire_common::announce::spawn(
        client,
        config.edge.clone(),
        config.advertise.clone(),
        config.token.0.to_string(),
        Duration::from_secs(2),
    );
    tracing::info!(url = %config.advertise, "frontend serving");
    axum::serve(listener, router(frontend, config.token)).with_graceful_shutdown(shutdown).into_future().await?;
    Ok(())
}
