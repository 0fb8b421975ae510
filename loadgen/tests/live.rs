//! `quire_loadgen::run` against a tiny in-process store whose answers are scripted: a topic
//! that answers late, one that never answers in time, a book whose lookups are dropped, a
//! book that is out of stock, and an autoscaler status route.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use quire_common::samples::{FleetStatus, TierFleet};
use quire_loadgen::{run, LoadArgs};
use serde_json::json;

/// The scripted store.
struct Store {
    start: Instant,
    /// Requests that came without a deadline header, and buys without an idempotency key.
    missing_headers: AtomicU64,
    buys: AtomicU64,
}

impl Store {
    fn check(&self, headers: &HeaderMap, buy: bool) {
        let deadline = headers.get("x-quire-deadline").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if deadline.is_none() || (buy && headers.get("idempotency-key").is_none()) {
            self.missing_headers.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn error(status: StatusCode, code: &str) -> Response {
    (status, Json(json!({"error": code, "message": "scripted"}))).into_response()
}

/// Book 3's lookups are dropped; the others answer at once.
async fn lookup(State(store): State<Arc<Store>>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    store.check(&headers, false);
    if id == 3 {
        return error(StatusCode::SERVICE_UNAVAILABLE, "dropped");
    }
    Json(json!({"id": id, "title": "t", "topic": "x", "price": 1.0, "stock": 5})).into_response()
}

/// `late` answers after the browse timeout (1 s) but before the client gives up; `stuck`
/// answers long after; `fast` at once.
async fn search(State(store): State<Arc<Store>>, headers: HeaderMap, Path(topic): Path<String>) -> Response {
    store.check(&headers, false);
    match topic.as_str() {
        "late" => tokio::time::sleep(Duration::from_millis(1100)).await,
        "stuck" => tokio::time::sleep(Duration::from_secs(5)).await,
        _ => {}
    }
    Json(json!({"topic": topic, "items": []})).into_response()
}

/// Book 7 is out of stock.
async fn buy(State(store): State<Arc<Store>>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    store.check(&headers, true);
    store.buys.fetch_add(1, Ordering::Relaxed);
    if id == 7 {
        return error(StatusCode::CONFLICT, "out_of_stock");
    }
    Json(json!({"order_id": 1, "item_id": id, "quantity": 1, "price": 1.0, "stock_left": 1})).into_response()
}

/// Two frontends and three catalog replicas, billed since the store started.
async fn fleet(State(store): State<Arc<Store>>) -> Json<FleetStatus> {
    let up = store.start.elapsed().as_secs_f64();
    let tier = |n: u32| TierFleet { ready: n, min: 1, max: 10, server_seconds: n as f64 * up, ..TierFleet::default() };
    Json(FleetStatus {
        at_ms: 0,
        policy: "scripted".into(),
        tiers: [("frontend".to_string(), tier(2)), ("catalog".to_string(), tier(3))].into(),
    })
}

/// Serves the scripted store on a free port; returns it and its base URL.
async fn serve() -> (Arc<Store>, String) {
    let store = Arc::new(Store { start: Instant::now(), missing_headers: AtomicU64::new(0), buys: AtomicU64::new(0) });
    let app = Router::new()
        .route("/lookup/:id", get(lookup))
        .route("/search/:topic", get(search))
        .route("/buy/:id", post(buy))
        .route("/status", get(fleet))
        .with_state(Arc::clone(&store));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
    let base = format!("http://{}", listener.local_addr().expect("a bound address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (store, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classifies_what_the_store_answers() {
    let (store, base) = serve().await;

    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("load.svg");
    let args = LoadArgs {
        target: base.clone(),
        profile: "c-30-2s".into(),
        buy_probability: 0.8,
        hit_ratio: 0.3,
        seed: 42,
        fleet: Some(format!("{base}/status")),
        json: true,
        chart: chart.clone(),
        max_clients: 5000,
        items: 7,
        topics: vec!["fast".into(), "late".into(), "stuck".into()],
    };
    let started = Instant::now();
    let report = run(args).await.unwrap();
    let took = started.elapsed();

    // Two seconds of arrivals, then at most one client's longest visit.
    assert!(took < Duration::from_secs(2 + 4 * 2 + 3), "{took:?}");
    assert!(report.clients > 20, "{report:#?}");
    assert_eq!(report.arrivals, report.clients);
    assert_eq!(report.skipped, 0);
    assert_eq!(report.statuses.values().sum::<u64>(), report.clients);
    assert_eq!(store.missing_headers.load(Ordering::Relaxed), 0);

    // A client leaves at its first bad answer, so each late search and each dropped lookup
    // is exactly one unhappy client.
    let search = &report.latency_ms["search"];
    let lookup = &report.latency_ms["lookup"];
    let buy = &report.latency_ms["buy"];
    assert!(search.late > 0 && lookup.dropped > 0, "{report:#?}");
    assert_eq!(report.statuses["timeout"], search.late);
    assert_eq!(report.statuses["dropped"], lookup.dropped);
    assert_eq!(report.statuses["failed"], 0);
    assert_eq!(lookup.late + lookup.failed + search.dropped + search.failed, 0);
    // Searches that were late are `late` or `stuck` ones: at least 1 s, and cut off at 1.25 s
    // (with room for a busy machine).
    assert!(search.max >= 1000.0 && search.max < 2000.0, "{search:?}");
    // Out-of-stock answers are happy clients that did not buy.
    assert_eq!(buy.count, store.buys.load(Ordering::Relaxed));
    assert!(report.statuses["purchased"] > 0 && report.statuses["purchased"] < buy.count, "{report:#?}");
    assert_eq!(buy.late + buy.dropped + buy.failed, 0);
    let unhappy = report.statuses["timeout"] + report.statuses["dropped"];
    assert!((report.unhappy_pct - 100.0 * unhappy as f64 / report.clients as f64).abs() < 1e-9);

    // Server-seconds come from the fleet's own accounting between the first and last poll.
    assert_eq!(report.policy.as_deref(), Some("scripted"));
    let frontend = report.server_seconds["frontend"];
    assert!(frontend > 2.0 * 2.0 && frontend < 2.0 * took.as_secs_f64() + 0.5, "{frontend} in {took:?}");
    assert!((report.server_seconds["catalog"] / frontend - 1.5).abs() < 1e-6);
    assert!(report.timeline.iter().skip(1).all(|p| p.servers.get("frontend") == Some(&2)), "{:?}", report.timeline);

    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("Servers per tier"));
}

#[tokio::test]
async fn caps_running_clients() {
    let (_store, base) = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let args = LoadArgs {
        target: base,
        profile: "c-20-1s".into(),
        buy_probability: 0.0,
        hit_ratio: 0.3,
        seed: 3,
        fleet: None,
        json: true,
        chart: dir.path().join("load.svg"),
        max_clients: 2,
        items: 7,
        topics: vec!["stuck".into()],
    };
    let report = run(args).await.unwrap();
    assert!(report.skipped > 0, "{report:#?}");
    assert_eq!(report.clients + report.skipped, report.arrivals);
    assert_eq!(report.statuses.values().sum::<u64>(), report.clients);
    assert!(report.to_text().contains("not started (--max-clients)"));
}

#[tokio::test]
async fn refuses_bad_arguments() {
    let args = LoadArgs {
        target: "http://127.0.0.1:9".into(),
        profile: "c-1-1s".into(),
        buy_probability: 1.5,
        hit_ratio: 0.3,
        seed: 1,
        fleet: None,
        json: true,
        chart: "unused.svg".into(),
        max_clients: 10,
        items: 7,
        topics: vec!["x".into()],
    };
    let err = run(args.clone()).await.unwrap_err().to_string();
    assert!(err.contains("--buy-probability"), "{err}");
    let err = run(LoadArgs { profile: "c-1".into(), ..args.clone() }).await.unwrap_err();
    assert!(format!("{err:#}").contains("c-1"), "{err:#}");
    let err = run(LoadArgs { buy_probability: 0.5, target: "not a url".into(), ..args }).await.unwrap_err();
    assert!(err.to_string().contains("--target"), "{err}");
}
