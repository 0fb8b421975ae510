//! The catch-all route: forwards every request that is not the balancer's own to a backend.
//!
//! Work (requests that occupy a backend's worker slot, see [`is_work`]: everything at the
//! edge, reads, and the order tier's buys) goes round-robin over the backends in rotation
//! that have a free slot, waiting in the tier's queue (`queue`) when none has. Other writes
//! of a Raft tier go to the leader, following `not_leader` hints. A failed attempt is
//! repeated elsewhere only when that cannot apply the request twice: it never left
//! (connection refused), a replica refused it as not leader, it is a read, or it carries an
//! idempotency key. Otherwise the client learns that the outcome is unknown rather than
//! risking a second execution. A backend's 503 `dropped` (it could not
//! finish the request before its deadline) is passed on, never retried: no other backend
//! could finish it either.
//!
//! Backend answers are buffered, not streamed: bodies are small JSON, and buffering lets a read
//! whose answer breaks off midway be retried like any other failed read.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use quire_common::api::MAX_BODY_BYTES;
use quire_common::client::ATTEMPT_TIMEOUT;
use quire_common::error::ErrorBody;
use quire_common::timings::Stopwatch;
use quire_common::{headers, ApiError, Deadline};
use tracing::{debug, warn};

use crate::queue::{Slot, Want};
use crate::{Balancer, Tier};

/// Longest a single attempt may take, and the budget of a request without a deadline header.
const ATTEMPT_CAP: Duration = Duration::from_secs(10);
/// How many `not_leader` hints one request follows; guards against hints that loop.
const MAX_HINT_HOPS: usize = 3;

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1), plus `Host`,
/// which reqwest sets from the backend's URL.
const HOP_BY_HOP: &[header::HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
];

/// A backend's buffered answer.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// A backend's answer passed on to the client, and what the sampling wants to know of it.
struct Served {
    response: Response,
    /// How long the answering attempt took.
    took: Duration,
    /// The backend refused the request as `dropped` (an after-drop).
    dropped: bool,
}

/// Whether a request occupies a worker slot of the backend serving it, and so goes through the
/// tier's queue: everything a frontend serves; replicas' reads; and the order tier's buys,
/// which any replica takes (it does the app work and forwards the write to its leader; the
/// leader's slots are taken first, see [`Route`]). Other writes of a Raft tier cost the
/// leader a write's latency, not a slot, and bypass the queue.
pub(crate) fn is_work(tier: Tier, method: &Method, path: &str) -> bool {
    let read = method == Method::GET || method == Method::HEAD;
    match tier {
        Tier::Edge => true,
        Tier::Catalog => read,
        Tier::Order => read || (method == Method::POST && path == "/orders"),
    }
}

pub async fn forward(balancer: Balancer, request: Request) -> Response {
    let arrived = Instant::now();
    balancer.stats.count(&balancer.stats.requests);
    let work = is_work(balancer.tier, request.method(), request.uri().path());
    if work {
        balancer.samples.arrived();
    }
    let kind = if work { "work" } else { "write" };
    let _watch = Stopwatch::start(format!("forward {} {kind}", balancer.tier));
    match attempt_all(&balancer, request, work).await {
        Ok(served) => {
            if served.dropped {
                balancer.samples.after_dropped();
            } else if work {
                balancer.samples.completed(arrived.elapsed(), served.took);
            }
            served.response
        }
        Err(error) => {
            balancer.stats.count(&balancer.stats.failures);
            error.into_response()
        }
    }
}

async fn attempt_all(balancer: &Balancer, request: Request, work: bool) -> Result<Served, ApiError> {
    let (parts, body) = request.into_parts();
    let deadline = Deadline::from_headers(&parts.headers);
    if deadline.is_some_and(|d| d.expired()) {
        return Err(ApiError::deadline_exceeded("the request's deadline passed before it could be forwarded"));
    }
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES).await.map_err(|_| {
        let message = format!("request body is larger than {MAX_BODY_BYTES} bytes");
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    })?;
    let is_read = parts.method == Method::GET || parts.method == Method::HEAD;
    // The same key makes a second delivery a no-op at the backend, so a keyed write may be
    // repeated as freely as a read.
    let repeatable = is_read || parts.headers.contains_key(headers::IDEMPOTENCY_KEY);
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut outgoing = parts.headers;
    strip_hop_by_hop(&mut outgoing);

    // Every non-work request is a Raft tier's write: to the leader first. So is a buy while
    // the leader has a free slot (a follower would only pass it on to the leader).
    let buy = work && balancer.tier == Tier::Order && parts.method == Method::POST;
    let mut route = Route::new(balancer, work, deadline, buy);
    let mut tried: Vec<String> = Vec::new();
    let mut hops = 0;
    // A write sent to a backend that then went silent may have been carried out: if no
    // later attempt answers, the outcome is unknown, never "unavailable".
    let mut maybe_delivered = false;
    // Once an attempt may have been carried out, no later refusal may tell the client
    // nothing was done: `dropped`, `unavailable` or a queue's refusal become "unknown".
    let unknown = || {
        ApiError::deadline_exceeded(
            "no backend confirmed the write; its outcome is unknown (retry with the same Idempotency-Key)",
        )
    };
    while let Some((target, slot)) =
        route.next(&tried).await.map_err(|e| if maybe_delivered { unknown() } else { e })?
    {
        if !tried.is_empty() {
            balancer.stats.count(&balancer.stats.retries);
        }
        tried.push(target.clone());
        let timeout = match deadline {
            Some(d) if d.expired() => return Err(ApiError::deadline_exceeded("the request's deadline passed")),
            Some(d) => d.remaining().min(ATTEMPT_CAP),
            None => ATTEMPT_CAP,
        };
        // A repeatable request abandons a silent replica early and tries the next one. Not at
        // the edge: a frontend retries upstream on its own within the request's budget, and
        // cutting it short would turn a slow answer (say, during an election) into a failure.
        let timeout = if repeatable && balancer.tier != Tier::Edge { timeout.min(ATTEMPT_TIMEOUT) } else { timeout };
        let url = format!("{target}{path}");
        let request = balancer.client.request(parts.method.clone(), url).headers(outgoing.clone()).body(body.clone());
        let started = Instant::now();
        let outcome = send(request.timeout(timeout)).await;
        let took = started.elapsed();
        // The backend is done with the request either way: its slot goes to the next waiter.
        drop(slot);
        let target = target.as_str();
        match outcome {
            Ok(answer) => {
                if let Some(hint) = not_leader(&answer) {
                    // A replica that is not the leader applied nothing: go where it points, or on.
                    if let Some(leader) = hint.filter(|_| hops < MAX_HINT_HOPS) {
                        hops += 1;
                        route.follow(leader);
                    }
                    continue;
                }
                // The backend could not finish it in time; neither could another: pass it on.
                if is_dropped(&answer) {
                    if maybe_delivered {
                        return Err(unknown());
                    }
                    return Ok(Served { response: answer.into_response(target), took, dropped: true });
                }
                let overloaded = matches!(answer.status, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE);
                if repeatable && overloaded {
                    continue;
                }
                if work && !answer.status.is_server_error() {
                    balancer.queue.served(took);
                }
                return Ok(Served { response: answer.into_response(target), took, dropped: false });
            }
            Err(e) if e.is_connect() => {
                debug!(backend = target, error = %e, "backend refused the connection; trying the next");
                if let Some(backend) = balancer.registry.find(target) {
                    backend.mark_unreachable();
                }
            }
            Err(e) if repeatable => {
                maybe_delivered |= !is_read;
                debug!(backend = target, error = %e, "attempt failed; trying the next backend")
            }
            Err(e) => {
                warn!(backend = target, error = %e, method = %parts.method, path, "write outcome unknown");
                return Err(ApiError::deadline_exceeded(
                    "the backend did not answer in time; the write's outcome is unknown (retry with an Idempotency-Key)",
                ));
            }
        }
    }
    if maybe_delivered {
        return Err(unknown());
    }
    Err(ApiError::unavailable("no backend of this tier could serve the request"))
}

/// Where a request's attempts go, one after the other.
///
/// Work takes a slot from the tier's queue for every attempt, on a backend not tried yet (or
/// on the leader a `not_leader` hint names); a buy takes the leader's whenever it is free.
/// Other requests (a Raft tier's writes) go to the leader first, then to every backend in
/// rotation from the round-robin cursor, as planned when they arrive.
struct Route<'a> {
    balancer: &'a Balancer,
    work: bool,
    deadline: Option<Deadline>,
    /// Targets to try before any other: leaders named by hints, then (writes only) the plan.
    plan: VecDeque<String>,
    /// Work that goes to the leader whenever it has a free slot.
    to_leader: bool,
}

impl<'a> Route<'a> {
    fn new(balancer: &'a Balancer, work: bool, deadline: Option<Deadline>, to_leader: bool) -> Self {
        let plan = if work { VecDeque::new() } else { candidates(balancer) };
        Route { balancer, work, deadline, plan, to_leader }
    }

    /// Tries `leader` next.
    fn follow(&mut self, leader: String) {
        self.plan.push_front(leader);
    }

    /// The next target not in `tried`, with its slot for work; `None` when none is left.
    async fn next(&mut self, tried: &[String]) -> Result<Option<(String, Option<Slot>)>, ApiError> {
        let queue = &self.balancer.queue;
        while let Some(target) = self.plan.pop_front() {
            if tried.contains(&target) {
                continue;
            }
            // A leader this balancer does not know has no slots it could count: go straight.
            if !self.work || self.balancer.registry.find(&target).is_none() {
                return Ok(Some((target, None)));
            }
            if let Some(slot) = queue.acquire(Want::only(&target), self.deadline, true).await? {
                return Ok(Some((target, Some(slot))));
            }
            // The hinted leader is out of rotation: any other backend will do.
        }
        if !self.work {
            return Ok(None);
        }
        let retry = !tried.is_empty();
        let _watch = Stopwatch::start("queue");
        let leader = self.to_leader.then(|| self.balancer.registry.leader().map(|l| l.to_string())).flatten();
        let slot = queue.acquire(Want::any_but(tried).preferring(leader), self.deadline, retry).await?;
        Ok(slot.map(|slot| (slot.url().to_string(), Some(slot))))
    }
}

/// Backends to try in order for a write: the leader first, then every backend in rotation,
/// starting at the round-robin cursor.
fn candidates(balancer: &Balancer) -> VecDeque<String> {
    let backends = balancer.registry.snapshot();
    let live: Vec<&str> = backends.iter().filter(|b| b.in_rotation()).map(|b| b.url.as_str()).collect();
    let mut plan = VecDeque::with_capacity(live.len() + 1);
    plan.extend(balancer.registry.leader().map(|l| l.to_string()));
    if !live.is_empty() {
        let start = balancer.next_turn() % live.len();
        plan.extend(live[start..].iter().chain(&live[..start]).map(|u| u.to_string()));
    }
    plan
}

async fn send(request: reqwest::RequestBuilder) -> Result<Answer, reqwest::Error> {
    let response = request.send().await?;
    let status = response.status();
    let headers = response.headers().clone();
    // The request's timeout also bounds reading the body.
    let body = response.bytes().await?;
    Ok(Answer { status, headers, body })
}

/// `Some(hint)` if the answer is a `not_leader` refusal; the hint is the leader's base URL.
fn not_leader(answer: &Answer) -> Option<Option<String>> {
    if answer.status != StatusCode::MISDIRECTED_REQUEST {
        return None;
    }
    let body: ErrorBody = serde_json::from_slice(&answer.body).ok()?;
    if body.error != "not_leader" {
        return None;
    }
    let hint = answer.headers.get(headers::LEADER).and_then(|v| v.to_str().ok());
    Some(hint.map(|h| h.trim_end_matches('/').to_string()).filter(|h| !h.is_empty()))
}

/// True if the answer is a backend's 503 `dropped`: it could not finish the request in time.
fn is_dropped(answer: &Answer) -> bool {
    answer.status == StatusCode::SERVICE_UNAVAILABLE
        && serde_json::from_slice::<ErrorBody>(&answer.body).is_ok_and(|body| body.error == "dropped")
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

impl Answer {
    fn into_response(self, served_by: &str) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        strip_hop_by_hop(response.headers_mut());
        if let Ok(value) = HeaderValue::from_str(served_by) {
            response.headers_mut().insert(headers::SERVED_BY, value);
        }
        response
    }
}
