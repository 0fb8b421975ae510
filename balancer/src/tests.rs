//! In-process tests: real balancers in front of small axum backends, all on 127.0.0.1:0.

// A failed unwrap is a failed test, which is what a test wants.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use axum::http::Method;
use quire_common::{headers, Deadline};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;

const TOKEN: &str = "test-token";

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
    /// Forwarded requests received (beats excluded).
    hits: AtomicUsize,
}

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
            hits: AtomicUsize::new(0),
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
                            ..ServerStatus::default()
                        })
                    }
                }),
            )
            .fallback({
                let k = knobs.clone();
                move |method: Method| async move {
                    k.hits.fetch_add(1, Ordering::SeqCst);
                    let hint = k.hint.lock().unwrap().clone();
                    if method != Method::GET && *k.role.lock().unwrap() != Role::Leader {
                        return ApiError::not_leader(hint).into_response();
                    }
                    if k.hang.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
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
}

/// Starts a balancer of `tier` in front of `backends`; returns its base URL.
async fn start_balancer(tier: Tier, backends: &[&TestBackend]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = Config {
        name: tier.to_string(),
        tier,
        advertise_url: url.clone(),
        token: Token::new(TOKEN),
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
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let status = balancer_status(balancer).await;
        if check(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last status: {status:#}");
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
    assert!(killed_at.elapsed() < Duration::from_millis(300), "left after {:?}", killed_at.elapsed());
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
    let (code, _) = send(reqwest::Client::new().get(format!("{balancer}/x"))).await;
    assert_eq!(code, 503, "nothing in rotation");
    b.knobs.ready.store(true, Ordering::SeqCst);
    wait_for(&balancer, "a back", |s| rotation(s).contains(&b.url)).await;

    // Alive but silent: out once 250 ms pass without a beat, noticed when a 90 ms beat times
    // out, so nominally within 290 ms; the margin is for slow CI machines.
    let muted_at = Instant::now();
    b.knobs.mute.store(true, Ordering::SeqCst);
    wait_for(&balancer, "a out (silent)", |s| rotation(s).is_empty()).await;
    assert!(muted_at.elapsed() < Duration::from_millis(400), "left after {:?}", muted_at.elapsed());
    b.knobs.mute.store(false, Ordering::SeqCst);
    wait_for(&balancer, "a back", |s| rotation(s).contains(&b.url)).await;
}

#[tokio::test]
async fn writes_go_to_the_leader() {
    let f1 = TestBackend::start("f1", Role::Follower).await;
    let leader = TestBackend::start("l", Role::Leader).await;
    let f2 = TestBackend::start("f2", Role::Follower).await;
    let balancer = start_balancer(Tier::Order, &[&f1, &leader, &f2]).await;
    wait_for(&balancer, "the leader", |s| s["details"]["leader"] == leader.url.as_str() && rotation(s).len() == 3)
        .await;
    let client = reqwest::Client::new();
    for _ in 0..4 {
        assert_eq!(send(client.post(format!("{balancer}/orders"))).await, (200, leader.url.clone()));
    }
    assert_eq!((f1.hits(), leader.hits(), f2.hits()), (0, 4, 0));
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
    leader.knobs.hang.store(true, Ordering::SeqCst);
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
    assert_eq!((leader.hits(), follower.hits()), (1, 0));
}
