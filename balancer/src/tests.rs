//! In-process tests: real balancers in front of small axum backends, all on 127.0.0.1:0.

// A failed unwrap is a failed test, which is what a test wants.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use axum::http::{HeaderMap, Method, Uri};
use quire_common::{headers, Deadline};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;

const TOKEN: &str = "test-token-of-the-balancer";

/// What a test backend answers, changed by the test while it runs.
struct Knobs {
    name: String,
    role: Mutex<Role>,
    ready: AtomicBool,
    /// Where a non-leader points writes, answering 421 `not_leader`.
    hint: Mutex<Option<String>>,
    /// Never answer forwarded requests (the beat still answers).
    hang: AtomicBool,
    /// Never answer beats: alive but silent.
    mute: AtomicBool,
    /// Refuse every forwarded request with 503 `dropped`, as a backend out of time would.
    refuse: AtomicBool,
    /// Answer every forwarded request 503 `unavailable`, as a replica whose leader is gone.
    unavailable: AtomicBool,
    /// Forwarded requests received (beats excluded).
    hits: AtomicUsize,
    /// Worker slots reported in `/status`; 0 reports none (unlimited).
    slots: AtomicU32,
    /// How long each forwarded request takes.
    work_ms: AtomicU64,
    /// Forwarded requests being worked on now, and the most at once.
    active: AtomicUsize,
    max_active: AtomicUsize,
}

/// A request carrying this header is refused with 503 `dropped`, as a backend that cannot
/// finish it in time would.
const REFUSE: &str = "x-test-refuse";

struct TestBackend {
    url: String,
    knobs: Arc<Knobs>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestBackend {
    async fn start(name: &str, role: Role) -> Self {
        let knobs = Arc::new(Knobs {
            name: name.into(),
            role: Mutex::new(role),
            ready: AtomicBool::new(true),
            hint: Mutex::new(None),
            hang: AtomicBool::new(false),
            mute: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            unavailable: AtomicBool::new(false),
            hits: AtomicUsize::new(0),
            slots: AtomicU32::new(0),
            work_ms: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
        });
        let status_knobs = knobs.clone();
        let app = Router::new()
            .route(
                "/status",
                get(move || {
                    let k = status_knobs.clone();
                    async move {
                        if k.mute.load(Ordering::SeqCst) {
                            std::future::pending::<()>().await;
                        }
                        axum::Json(ServerStatus {
                            name: k.name.clone(),
                            role: k.role.lock().unwrap().clone(),
                            ready: k.ready.load(Ordering::SeqCst),
                            term: 7,
                            slots: Some(k.slots.load(Ordering::SeqCst)).filter(|&n| n > 0),
                            ..ServerStatus::default()
                        })
                    }
                }),
            )
            .fallback({
                let k = knobs.clone();
                move |method: Method, uri: Uri, headers: HeaderMap| async move {
                    k.hits.fetch_add(1, Ordering::SeqCst);
                    let hint = k.hint.lock().unwrap().clone();
                    // Any replica takes a buy and forwards its write to the leader itself.
                    let buy = method == Method::POST && uri.path() == "/orders";
                    if method != Method::GET && !buy && *k.role.lock().unwrap() != Role::Leader {
                        return ApiError::not_leader(hint).into_response();
                    }
                    if headers.contains_key(REFUSE) || k.refuse.load(Ordering::SeqCst) {
                        return ApiError::dropped("cannot finish in time").into_response();
                    }
                    if k.unavailable.load(Ordering::SeqCst) {
                        return ApiError::unavailable("the group has no leader right now").into_response();
                    }
                    if k.hang.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                    let active = k.active.fetch_add(1, Ordering::SeqCst) + 1;
                    k.max_active.fetch_max(active, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(k.work_ms.load(Ordering::SeqCst))).await;
                    k.active.fetch_sub(1, Ordering::SeqCst);
                    axum::Json(json!({"backend": k.name})).into_response()
                }
            });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async { drop(stopped.await) }).await;
        });
        TestBackend { url, knobs, stop: Some(stop), task }
    }

    /// Dies like a killed process: the listener closes and idle kept-alive connections too
    /// (axum's connection tasks outlive an aborted server task unless told to shut down).
    fn kill(&mut self) {
        drop(self.stop.take());
        self.task.abort();
    }

    fn hits(&self) -> usize {
        self.knobs.hits.load(Ordering::SeqCst)
    }

    /// Reports `slots` worker slots and spends `work_ms` on each forwarded request.
    fn emulate(&self, slots: u32, work_ms: u64) {
        self.knobs.slots.store(slots, Ordering::SeqCst);
        self.knobs.work_ms.store(work_ms, Ordering::SeqCst);
    }

    fn max_active(&self) -> usize {
        self.knobs.max_active.load(Ordering::SeqCst)
    }
}

/// Starts a balancer of `tier` in front of `backends`; returns its base URL.
async fn start_balancer(tier: Tier, backends: &[&TestBackend]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = Config {
        name: tier.to_string(),
        tier,
        advertise_url: url.clone(),
        token: Token::new(TOKEN).unwrap(),
        backends: backends.iter().map(|b| format!("{}/", b.url)).collect(),
        heartbeat: DEFAULT_HEARTBEAT,
    };
    tokio::spawn(run(listener, config, std::future::pending()));
    url
}

async fn balancer_status(balancer: &str) -> Value {
    reqwest::get(format!("{balancer}/status")).await.unwrap().json().await.unwrap()
}

/// Polls the balancer's `/status` until `check` holds; panics with the last status after 3 s.
async fn wait_for(balancer: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    poll(&format!("{balancer}/status"), Duration::from_secs(3), what, check).await
}

/// Polls `url` (a JSON route) until `check` holds; panics with the last answer after `within`.
async fn poll(url: &str, within: Duration, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let answer: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        if check(&answer) {
            return answer;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last answer: {answer:#}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// URLs of the backends in rotation, as the balancer's `/status` shows them.
fn rotation(status: &Value) -> Vec<String> {
    let backends = status["details"]["backends"].as_array().cloned().unwrap_or_default();
    backends.iter().filter(|b| b["in_rotation"] == true).map(|b| b["url"].as_str().unwrap().to_string()).collect()
}

/// Sends a request through the balancer; returns (status, served-by).
async fn send(request: reqwest::RequestBuilder) -> (u16, String) {
    let response = request.send().await.unwrap();
    let served_by = response.headers().get(headers::SERVED_BY).map(|v| v.to_str().unwrap().to_string());
    (response.status().as_u16(), served_by.unwrap_or_default())
}

#[tokio::test]
async fn reads_go_round_robin() {
    let b: Vec<_> = futures::future::join_all(["a", "b", "c"].map(|n| TestBackend::start(n, Role::Follower))).await;
    let balancer = start_balancer(Tier::Catalog, &[&b[0], &b[1], &b[2]]).await;
    wait_for(&balancer, "3 in rotation", |s| rotation(s).len() == 3).await;
    let client = reqwest::Client::new();
    for _ in 0..6 {
        let (code, _) = send(client.get(format!("{balancer}/books/1"))).await;
        assert_eq!(code, 200);
    }
    assert_eq!(b.iter().map(TestBackend::hits).collect::<Vec<_>>(), [2, 2, 2]);
}

#[tokio::test]
async fn dead_backend_leaves_rotation_and_reads_survive() {
    let mut b: Vec<_> = futures::future::join_all(["a", "b", "c"].map(|n| TestBackend::start(n, Role::Follower))).await;
    let balancer = start_balancer(Tier::Edge, &[&b[0], &b[1], &b[2]]).await;
    wait_for(&balancer, "3 in rotation", |s| rotation(s).len() == 3).await;

    let stop = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn({
        let (balancer, stop) = (balancer.clone(), stop.clone());
        async move {
            let client = reqwest::Client::new();
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                match send(client.get(format!("{balancer}/search?q=x"))).await.0 {
                    200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        }
    });
    let killed_at = Instant::now();
    b[0].kill();
    let dead = b[0].url.clone();
    wait_for(&balancer, "the dead backend out", |s| !rotation(s).contains(&dead)).await;
    // A figure, not an assertion: a loaded machine is slower (nominally within 300 ms).
    eprintln!("the killed backend left the rotation {:?} after the kill", killed_at.elapsed());
    // Keep reading a little after the removal too.
    let until = Instant::now() + Duration::from_millis(200);
    wait_for(&balancer, "more reads", |s| Instant::now() > until && s["details"]["requests"].as_u64() > Some(20)).await;
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = reader.await.unwrap();
    assert_eq!(failed, 0, "{ok} reads succeeded, {failed} failed");
    assert_eq!(balancer_status(&balancer).await["details"]["failures"], 0);
}

#[tokio::test]
async fn beats_decide_rotation() {
    let b = TestBackend::start("a", Role::Follower).await;
    let balancer = start_balancer(Tier::Edge, &[&b]).await;
    wait_for(&balancer, "a in rotation", |s| rotation(s).contains(&b.url) && s["ready"] == true).await;

    b.knobs.ready.store(false, Ordering::SeqCst);
    wait_for(&balancer, "a out (not ready)", |s| rotation(s).is_empty() && s["ready"] == false).await;
    let short = Deadline::after(Duration::from_millis(300)).header_value();
    let answer = reqwest::Client::new().get(format!("{balancer}/x")).header(headers::DEADLINE, short).send().await;
    let answer = answer.unwrap();
    assert_eq!(answer.status(), 503, "nothing came into rotation before the deadline");
    assert_eq!(answer.json::<Value>().await.unwrap()["error"], "unavailable");
    assert_eq!(b.hits(), 0);
    b.knobs.ready.store(true, Ordering::SeqCst);
    wait_for(&balancer, "a back", |s| rotation(s).contains(&b.url)).await;

    // Alive but silent: out after three missed beats in a row, each noticed when its 90 ms
    // times out, so nominally within 290 ms (a figure: a loaded machine is slower).
    let muted_at = Instant::now();
    b.knobs.mute.store(true, Ordering::SeqCst);
    wait_for(&balancer, "a out (silent)", |s| rotation(s).is_empty()).await;
    eprintln!("the silent backend left the rotation {:?} after it went silent", muted_at.elapsed());
    b.knobs.mute.store(false, Ordering::SeqCst);
    wait_for(&balancer, "a back", |s| rotation(s).contains(&b.url)).await;
}

#[tokio::test]
async fn work_waits_for_a_backend_to_come_back_into_rotation() {
    let b = TestBackend::start("a", Role::Follower).await;
    let balancer = start_balancer(Tier::Edge, &[&b]).await;
    wait_for(&balancer, "a in rotation", |s| rotation(s).contains(&b.url)).await;
    b.knobs.ready.store(false, Ordering::SeqCst);
    wait_for(&balancer, "a out (not ready)", |s| rotation(s).is_empty()).await;

    // Sent while the tier has nothing in rotation: it waits in the queue, not failing at once.
    let deadline = Deadline::after(Duration::from_secs(20)).header_value();
    let request = reqwest::Client::new().get(format!("{balancer}/lookup/1")).header(headers::DEADLINE, deadline);
    let sent = tokio::spawn(send(request));
    wait_for(&balancer, "the request queued", |s| s["details"]["queue_len"].as_u64() >= Some(1)).await;
    assert!(!sent.is_finished() && b.hits() == 0, "the request waits");
    b.knobs.ready.store(true, Ordering::SeqCst);
    assert_eq!(sent.await.unwrap(), (200, b.url.clone()), "served once the backend is back");
}

#[tokio::test]
async fn buys_go_to_the_leader_while_it_has_a_free_slot_and_other_writes_to_the_leader() {
    let f1 = TestBackend::start("f1", Role::Follower).await;
    let leader = TestBackend::start("l", Role::Leader).await;
    let f2 = TestBackend::start("f2", Role::Follower).await;
    let balancer = start_balancer(Tier::Order, &[&f1, &leader, &f2]).await;
    wait_for(&balancer, "the leader", |s| s["details"]["leader"] == leader.url.as_str() && rotation(s).len() == 3)
        .await;
    let client = reqwest::Client::new();
    let mut served_by = Vec::new();
    for _ in 0..6 {
        let (code, backend) =
            send(client.post(format!("{balancer}/orders")).header(headers::IDEMPOTENCY_KEY, "k")).await;
        assert_eq!(code, 200);
        served_by.push(backend);
    }
    assert_eq!((f1.hits(), leader.hits(), f2.hits()), (0, 6, 0), "buys served by {served_by:?}");
    for _ in 0..3 {
        assert_eq!(send(client.post(format!("{balancer}/orders/1/cancel"))).await, (200, leader.url.clone()));
    }
    assert_eq!((f1.hits(), leader.hits(), f2.hits()), (0, 9, 0));
    // Reads take no such turn: round-robin over all three.
    for _ in 0..6 {
        assert_eq!(send(client.get(format!("{balancer}/orders/1"))).await.0, 200);
    }
    assert_eq!((f1.hits(), leader.hits(), f2.hits()), (2, 11, 2));
}

#[tokio::test]
async fn buys_spill_over_to_followers_when_the_leaders_slots_are_taken() {
    let f1 = TestBackend::start("f1", Role::Follower).await;
    let leader = TestBackend::start("l", Role::Leader).await;
    let f2 = TestBackend::start("f2", Role::Follower).await;
    for b in [&f1, &leader, &f2] {
        b.emulate(2, 300);
    }
    let balancer = start_balancer(Tier::Order, &[&f1, &leader, &f2]).await;
    wait_for(&balancer, "the leader", |s| s["details"]["leader"] == leader.url.as_str() && rotation(s).len() == 3)
        .await;
    let client = reqwest::Client::new();
    let buys = (0..6).map(|_| {
        let request = client.post(format!("{balancer}/orders")).header(headers::IDEMPOTENCY_KEY, "k");
        tokio::spawn(send(request))
    });
    for buy in buys.collect::<Vec<_>>() {
        assert_eq!(buy.await.unwrap().0, 200);
    }
    // Six at once: the leader's two slots, then the followers' (no buy waited for the leader).
    assert_eq!((f1.hits(), leader.hits(), f2.hits()), (2, 2, 2));
    assert_eq!(leader.max_active(), 2);
}

#[tokio::test]
async fn not_leader_hint_is_followed() {
    // The leader is not registered: only the follower's hint leads there.
    let leader = TestBackend::start("l", Role::Leader).await;
    let follower = TestBackend::start("f", Role::Follower).await;
    *follower.knobs.hint.lock().unwrap() = Some(leader.url.clone());
    let balancer = start_balancer(Tier::Catalog, &[&follower]).await;
    wait_for(&balancer, "the follower", |s| rotation(s).contains(&follower.url)).await;
    let (code, served_by) = send(reqwest::Client::new().put(format!("{balancer}/books/1/stock"))).await;
    assert_eq!((code, served_by), (200, leader.url.clone()));
    assert_eq!((follower.hits(), leader.hits()), (1, 1));
}

#[tokio::test]
async fn admin_registration_needs_the_token() {
    let b = TestBackend::start("late", Role::Follower).await;
    let balancer = start_balancer(Tier::Edge, &[]).await;
    let client = reqwest::Client::new();
    let admin = format!("{balancer}/admin/backends");
    let body = json!({ "url": b.url });
    let denied = client.post(&admin).json(&body).send().await.unwrap();
    assert_eq!(denied.status(), 401);
    for _ in 0..2 {
        let added = client.post(&admin).header(headers::TOKEN, TOKEN).json(&body).send().await.unwrap();
        assert_eq!(added.status(), 200);
        assert_eq!(added.json::<Value>().await.unwrap(), json!({ "backends": [b.url] }));
    }
    wait_for(&balancer, "late in rotation", |s| rotation(s).contains(&b.url)).await;
    assert_eq!(send(client.get(format!("{balancer}/hello"))).await, (200, b.url.clone()));
    let removed = client.delete(&admin).header(headers::TOKEN, TOKEN).json(&body).send().await.unwrap();
    assert_eq!(removed.json::<Value>().await.unwrap(), json!({ "backends": [] }));
}

#[tokio::test]
async fn expired_deadline_is_not_forwarded() {
    let b = TestBackend::start("a", Role::Follower).await;
    let balancer = start_balancer(Tier::Edge, &[&b]).await;
    wait_for(&balancer, "a in rotation", |s| rotation(s).contains(&b.url)).await;
    let response =
        reqwest::Client::new().get(format!("{balancer}/books/1")).header(headers::DEADLINE, "1").send().await.unwrap();
    assert_eq!(response.status(), 504);
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "deadline_exceeded");
    assert_eq!(b.hits(), 0);
}

#[tokio::test]
async fn hung_write_without_key_is_not_retried() {
    let leader = TestBackend::start("l", Role::Leader).await;
    let follower = TestBackend::start("f", Role::Follower).await;
    // A buy may go to either replica: both hang.
    leader.knobs.hang.store(true, Ordering::SeqCst);
    follower.knobs.hang.store(true, Ordering::SeqCst);
    let balancer = start_balancer(Tier::Order, &[&leader, &follower]).await;
    wait_for(&balancer, "the leader", |s| s["details"]["leader"] == leader.url.as_str() && rotation(s).len() == 2)
        .await;
    let deadline = Deadline::after(Duration::from_millis(300));
    let response = reqwest::Client::new()
        .post(format!("{balancer}/orders"))
        .header(headers::DEADLINE, deadline.header_value())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "deadline_exceeded");
    assert!(body["message"].as_str().unwrap().contains("unknown"), "{body}");
    assert_eq!(leader.hits() + follower.hits(), 1);
}

#[tokio::test]
async fn a_drop_after_an_unanswered_attempt_is_an_unknown_outcome() {
    // A buy's first attempt goes silent (it may have been carried out); the retry is refused
    // as `dropped`. "Dropped" tells the client nothing was done, so it must not be passed on.
    let silent = TestBackend::start("silent", Role::Follower).await;
    let refusing = TestBackend::start("refusing", Role::Follower).await;
    silent.knobs.hang.store(true, Ordering::SeqCst);
    refusing.knobs.refuse.store(true, Ordering::SeqCst);
    let balancer = start_balancer(Tier::Order, &[&silent, &refusing]).await;
    wait_for(&balancer, "2 in rotation", |s| rotation(s).len() == 2).await;
    let client = reqwest::Client::new();
    // Round robin: at least one of two buys goes to the silent replica first.
    for n in 0..2 {
        let tried_silent = silent.hits();
        let response = client
            .post(format!("{balancer}/orders"))
            .header(headers::IDEMPOTENCY_KEY, format!("k{n}"))
            .header(headers::DEADLINE, Deadline::after(Duration::from_secs(3)).header_value())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        if silent.hits() > tried_silent {
            assert_eq!((status, body["error"].as_str()), (504, Some("deadline_exceeded")), "{body}");
            assert!(body["message"].as_str().unwrap().contains("unknown"), "{body}");
        } else {
            assert_eq!((status, body["error"].as_str()), (503, Some("dropped")), "nothing was delivered: {body}");
        }
    }
    assert!(silent.hits() >= 1, "no buy tried the silent replica");
}

#[tokio::test]
async fn a_retry_does_not_wait_for_a_dead_backend() {
    // A group's leader is killed: the balancer takes it out of rotation, and the followers
    // answer buys 503 `unavailable` until a new leader is elected. A buy that has tried both
    // followers must come back at once (its sender retries from the start, when the
    // followers may serve it), not wait in the queue for the dead one until its deadline.
    let mut dead = TestBackend::start("dead", Role::Leader).await;
    let f: Vec<_> = futures::future::join_all(["f1", "f2"].map(|n| TestBackend::start(n, Role::Follower))).await;
    for follower in &f {
        follower.knobs.unavailable.store(true, Ordering::SeqCst);
    }
    let balancer = start_balancer(Tier::Order, &[&dead, &f[0], &f[1]]).await;
    wait_for(&balancer, "3 in rotation", |s| rotation(s).len() == 3).await;
    dead.kill();
    wait_for(&balancer, "the dead one out", |s| rotation(s).len() == 2).await;
    let request = reqwest::Client::new()
        .post(format!("{balancer}/orders"))
        .header(headers::IDEMPOTENCY_KEY, "k")
        .header(headers::DEADLINE, Deadline::after(Duration::from_secs(30)).header_value());
    // Far short of the deadline: only a request waiting for it would take this long.
    let answer = tokio::time::timeout(Duration::from_secs(10), request.send()).await;
    let response = answer.expect("the retry waited for the dead backend").unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "unavailable");
    assert_eq!(f[0].hits() + f[1].hits(), 2, "each follower tried once");
}

/// Two replicas of one slot each, `work_ms` per request, behind a catalog balancer that knows
/// their slots.
async fn slotted_pair(work_ms: u64) -> (Vec<TestBackend>, String) {
    let b: Vec<_> = futures::future::join_all(["a", "b"].map(|n| TestBackend::start(n, Role::Follower))).await;
    for backend in &b {
        backend.emulate(1, work_ms);
    }
    let balancer = start_balancer(Tier::Catalog, &[&b[0], &b[1]]).await;
    wait_for(&balancer, "2 slotted backends in rotation", |s| {
        let backends = s["details"]["backends"].as_array().cloned().unwrap_or_default();
        rotation(s).len() == 2 && backends.iter().all(|b| b["slots"] == 1)
    })
    .await;
    (b, balancer)
}

/// Sends `n` reads at once, each with `deadline_ms` if given; returns their tasks.
fn burst(balancer: &str, n: usize, deadline_ms: Option<u64>) -> Vec<JoinHandle<(u16, Value)>> {
    (0..n)
        .map(|_| {
            let url = format!("{balancer}/books/1");
            tokio::spawn(async move {
                let mut request = reqwest::Client::new().get(url);
                if let Some(ms) = deadline_ms {
                    request =
                        request.header(headers::DEADLINE, Deadline::after(Duration::from_millis(ms)).header_value());
                }
                let response = request.send().await.unwrap();
                (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
            })
        })
        .collect()
}

async fn answers(tasks: Vec<JoinHandle<(u16, Value)>>) -> Vec<(u16, Value)> {
    futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect()
}

#[tokio::test]
async fn work_waits_in_the_queue_for_a_free_slot() {
    let (b, balancer) = slotted_pair(200).await;
    let started = Instant::now();
    let tasks = burst(&balancer, 8, None);
    wait_for(&balancer, "a queue", |s| s["details"]["queue_len"].as_u64() > Some(0)).await;
    let answers = answers(tasks).await;
    assert!(answers.iter().all(|(code, _)| *code == 200), "{answers:?}");
    // One slot each: 8 requests of 200 ms on 2 backends take 4 rounds.
    assert!(started.elapsed() >= Duration::from_millis(750), "took {:?}", started.elapsed());
    assert_eq!((b[0].max_active(), b[1].max_active()), (1, 1));
    assert_eq!(b[0].hits() + b[1].hits(), 8);
    assert!(b[0].hits() >= 2 && b[1].hits() >= 2, "{} and {}", b[0].hits(), b[1].hits());
    let status = wait_for(&balancer, "an empty queue", |s| s["details"]["queue_len"] == 0).await;
    assert_eq!(status["details"]["pre_drops"], 0);
}

#[tokio::test]
async fn hopeless_work_is_dropped_before_reaching_a_backend() {
    let (b, balancer) = slotted_pair(200).await;
    // Learn the service time (about 200 ms).
    for (code, _) in answers(burst(&balancer, 2, None)).await {
        assert_eq!(code, 200);
    }
    let status = balancer_status(&balancer).await;
    assert!(status["details"]["expected_service_ms"].as_f64() > Some(150.0), "{status:#}");

    // Both slots busy; a request with 100 ms left cannot be served in time.
    let busy = burst(&balancer, 2, None);
    wait_for(&balancer, "both slots busy", |s| {
        s["details"]["backends"].as_array().is_some_and(|bs| bs.iter().all(|b| b["in_flight"] == 1))
    })
    .await;
    let hits = b[0].hits() + b[1].hits();
    let sent = Instant::now();
    let hopeless = answers(burst(&balancer, 1, Some(100))).await;
    assert_eq!(hopeless[0].0, 503);
    assert_eq!(hopeless[0].1["error"], "dropped");
    // Dropped at once, not after waiting for a slot: the work holding both slots is still
    // under way (the time is a figure).
    assert!(busy.iter().all(|t| !t.is_finished()), "the hopeless request waited for a slot");
    eprintln!("the hopeless request was dropped {:?} after it was sent", sent.elapsed());
    assert_eq!(b[0].hits() + b[1].hits(), hits, "a backend saw the dropped request");
    assert!(answers(busy).await.iter().all(|(code, _)| *code == 200));
    let status = balancer_status(&balancer).await;
    assert_eq!(status["details"]["pre_drops"], 1);
}

#[tokio::test]
async fn after_drop_is_passed_on_not_retried() {
    let b: Vec<_> = futures::future::join_all(["a", "b"].map(|n| TestBackend::start(n, Role::Follower))).await;
    let balancer = start_balancer(Tier::Catalog, &[&b[0], &b[1]]).await;
    wait_for(&balancer, "2 in rotation", |s| rotation(s).len() == 2).await;
    let response = reqwest::Client::new().get(format!("{balancer}/books/1")).header(REFUSE, "1").send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "dropped");
    assert_eq!(b[0].hits() + b[1].hits(), 1, "the dropped read was retried");
    let status = balancer_status(&balancer).await;
    assert_eq!((&status["details"]["after_drops"], &status["details"]["retries"]), (&json!(1), &json!(0)));
}

#[tokio::test]
async fn unlimited_backends_take_everything_at_once() {
    let b: Vec<_> = futures::future::join_all(["a", "b"].map(|n| TestBackend::start(n, Role::Follower))).await;
    for backend in &b {
        backend.emulate(0, 200);
    }
    let balancer = start_balancer(Tier::Edge, &[&b[0], &b[1]]).await;
    wait_for(&balancer, "2 in rotation", |s| rotation(s).len() == 2).await;
    let started = Instant::now();
    let answers = answers(burst(&balancer, 10, None)).await;
    assert!(answers.iter().all(|(code, _)| *code == 200), "{answers:?}");
    eprintln!("10 requests of 200 ms on unlimited backends took {:?}", started.elapsed());
    assert_eq!((b[0].hits(), b[1].hits()), (5, 5));
    // Nothing queued: each backend ran several at once.
    assert!(b[0].max_active() > 1 && b[1].max_active() > 1);
}

#[tokio::test]
async fn samples_show_a_burst() {
    let (_b, balancer) = slotted_pair(100).await;
    // About 1.2 s of work for two slots: the queue outlives at least one sampling tick.
    let queued = burst(&balancer, 24, None);
    wait_for(&balancer, "a queue", |s| s["details"]["queue_len"].as_u64() > Some(2)).await;
    // Behind that queue, 50 ms is hopeless.
    let hopeless = burst(&balancer, 3, Some(50));
    let refused: Vec<_> = (0..2)
        .map(|_| {
            let url = format!("{balancer}/books/2");
            tokio::spawn(
                async move { reqwest::Client::new().get(url).header(REFUSE, "1").send().await.unwrap().status() },
            )
        })
        .collect();
    assert!(answers(hopeless).await.iter().all(|(code, body)| *code == 503 && body["error"] == "dropped"));
    for status in futures::future::join_all(refused).await {
        assert_eq!(status.unwrap(), 503);
    }
    assert!(answers(queued).await.iter().all(|(code, _)| *code == 200));

    let sum = |samples: &Value, field: &str| -> u64 {
        samples.as_array().unwrap().iter().map(|s| s[field].as_u64().unwrap()).sum()
    };
    let samples = poll(&format!("{balancer}/samples"), Duration::from_secs(5), "the burst's samples", |s| {
        sum(s, "arrivals") == 29 && sum(s, "completed") == 24 && sum(s, "after_drops") == 2
    })
    .await;
    let samples = samples.as_array().unwrap();
    assert_eq!(sum(&Value::from(samples.clone()), "pre_drops"), 3);
    let during: Vec<_> = samples.iter().filter(|s| s["arrivals"].as_u64() > Some(0)).collect();
    assert!(during.iter().all(|s| s["tier"] == "catalog" && s["total_slots"] == 2 && s["backends"] == 2));
    assert!(samples.iter().any(|s| s["queue_len"].as_u64() > Some(0)), "{samples:#?}");
    let busiest = samples.iter().max_by_key(|s| s["completed"].as_u64()).unwrap();
    let latency = &busiest["latency_ms"];
    assert!(latency["p50"].as_f64() >= Some(100.0), "{busiest:#}");
    assert!(latency["p50"].as_f64() <= latency["p99"].as_f64() && latency["p99"].as_f64() <= latency["max"].as_f64());
    assert!(busiest["mean_service_ms"].as_f64() >= Some(100.0), "{busiest:#}");

    let status = balancer_status(&balancer).await;
    assert_eq!(status["details"]["sample"]["tier"], "catalog");
    let metrics = reqwest::get(format!("{balancer}/metrics")).await.unwrap().text().await.unwrap();
    for line in
        ["quire_balancer_pre_drops_total 3", "quire_balancer_after_drops_total 2", "quire_balancer_total_slots 2"]
    {
        assert!(metrics.contains(line), "{line} missing from {metrics}");
    }
}
