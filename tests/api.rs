//! The public API through the edge of a real store: every route, every documented error,
//! bad input that changes nothing, cache coherence across frontends, the cache lease, and a
//! 100 000-book catalog.

mod common;

use std::time::{Duration, Instant};

use common::{wait_for, Options, TestStore};
use serde_json::{json, Value};

async fn get(t: &TestStore, path: &str) -> (u16, Value) {
    let r = t.client.get(format!("{}{path}", t.edge)).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn buy(t: &TestStore, id: &str, key: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let mut request = t.client.post(format!("{}/buy/{id}", t.edge));
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    if let Some(body) = body {
        request = request.header("content-type", "application/json").body(body.to_string());
    }
    let r = request.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The catalog's ledger and every order: what "changes nothing" is measured against.
async fn state(t: &TestStore) -> (Value, Value) {
    let ledger: Value = t.admin_get("catalog-1", "/admin/ledger").await.expect("ledger");
    let orders: Value = t.admin_get("order-1", "/admin/orders").await.expect("orders");
    (ledger["books"].clone(), orders)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn public_api_and_bad_input() {
    let t = TestStore::start(Options { books: vec![(1, 5), (2, 1), (3, 0)], ..Options::default() }).await;

    // Search by topic, full text with paging, lookup.
    let (s, body) = get(&t, "/search/t").await;
    assert_eq!(s, 200);
    assert_eq!(body["topic"], "t");
    assert_eq!(body["items"].as_array().map(Vec::len), Some(3));
    assert_eq!(body["items"][0], json!({"id": 1, "title": "Book number 1"}));
    let (s, page1) = get(&t, "/search?q=book+number&limit=2").await;
    assert_eq!(s, 200);
    assert_eq!(page1["items"].as_array().map(Vec::len), Some(2));
    let cursor = page1["next_cursor"].as_u64().expect("a next page");
    let (_, page2) = get(&t, &format!("/search?q=book%20number&limit=2&cursor={cursor}")).await;
    assert_eq!(page2["items"], json!([{"id": 3, "title": "Book number 3", "topic": "t"}]));
    assert!(page2.get("next_cursor").is_none());
    let (s, book) = get(&t, "/lookup/1").await;
    assert_eq!((s, book), (200, json!({"id": 1, "title": "Book number 1", "topic": "t", "price": 10.0, "stock": 5})));

    // Buys: a receipt; the same key again is the same order; stock shows through lookups.
    let (s, receipt) = buy(&t, "1", Some("k-1"), Some(r#"{"quantity": 2}"#)).await;
    assert_eq!(s, 200, "{receipt}");
    assert_eq!(
        (receipt["item_id"].as_u64(), receipt["quantity"].as_u64(), receipt["stock_left"].as_i64()),
        (Some(1), Some(2), Some(3))
    );
    let (s, again) = buy(&t, "1", Some("k-1"), Some(r#"{"quantity": 2}"#)).await;
    assert_eq!((s, &again), (200, &receipt), "a repeated key must return the recorded order");
    assert_eq!(get(&t, "/lookup/1").await.1["stock"], 3);
    let (s, conflict) = buy(&t, "2", Some("k-1"), None).await;
    assert_eq!((s, conflict["error"].as_str()), (400, Some("invalid_key")), "a key reused for another buy");
    let (s, order) = get(&t, &format!("/orders/{}", receipt["order_id"])).await;
    assert_eq!((s, order["state"].as_str(), order["key"].as_str()), (200, Some("confirmed"), Some("k-1")));
    let (s, _) = buy(&t, "2", None, None).await;
    assert_eq!(s, 200, "no body buys one copy");
    let (s, e) = buy(&t, "2", None, None).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("out_of_stock")));
    let (s, e) = buy(&t, "3", None, Some(r#"{"quantity": 1}"#)).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("out_of_stock")));
    let (s, e) = buy(&t, "424242", None, None).await;
    assert_eq!((s, e["error"].as_str()), (404, Some("not_found")));

    // Bad input: the documented error, and nothing changes.
    let before = state(&t).await;
    let long_topic = "x".repeat(200);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("GET", "/lookup/abc".into(), 400, "invalid_id"),
        ("GET", "/lookup/0".into(), 400, "invalid_id"),
        ("GET", "/lookup/-1".into(), 400, "invalid_id"),
        ("GET", "/lookup/99999999999999999999".into(), 400, "invalid_id"),
        ("GET", "/lookup/1.5".into(), 400, "invalid_id"),
        ("GET", "/lookup/404404".into(), 404, "not_found"),
        ("GET", format!("/search/{long_topic}"), 400, "invalid_topic"),
        ("GET", "/search?q=".into(), 400, "invalid_query"),
        ("GET", "/search?q=%3B%3B".into(), 400, "invalid_query"),
        ("GET", "/search?q=book&limit=0".into(), 400, "invalid_query"),
        ("GET", "/search?q=book&limit=many".into(), 400, "invalid_query"),
        ("GET", "/search?q=book&cursor=-4".into(), 400, "invalid_query"),
        ("GET", "/orders/abc".into(), 400, "invalid_id"),
        ("GET", "/orders/987654".into(), 404, "not_found"),
        ("GET", "/nowhere".into(), 404, "not_found"),
        ("DELETE", "/lookup/1".into(), 405, "method_not_allowed"),
        ("GET", "/buy/1".into(), 405, "method_not_allowed"),
        ("PUT", "/orders/1".into(), 405, "method_not_allowed"),
    ];
    for (method, path, status, code) in cases {
        let r = t
            .client
            .request(method.parse().expect("method"), format!("{}{path}", t.edge))
            .send()
            .await
            .expect("request");
        let got = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!((got, body["error"].as_str()), (status, Some(code)), "{method} {path}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{method} {path}: no message");
    }
    let huge = format!(r#"{{"quantity": 1, "pad": "{}"}}"#, "x".repeat(20_000));
    let long_key = "k".repeat(200);
    // (item id, Idempotency-Key, body, expected status, expected code)
    type BadBuy<'a> = (&'a str, Option<&'a str>, Option<&'a str>, u16, &'a str);
    let buys: Vec<BadBuy> = vec![
        ("abc", None, None, 400, "invalid_id"),
        ("0", None, None, 400, "invalid_id"),
        ("-3", None, None, 400, "invalid_id"),
        ("1", None, Some(r#"{"quantity": 0}"#), 400, "invalid_quantity"),
        ("1", None, Some(r#"{"quantity": -2}"#), 400, "invalid_quantity"),
        ("1", None, Some(r#"{"quantity": 1000001}"#), 400, "invalid_quantity"),
        ("1", None, Some(r#"{"quantity": 99999999999999999999999}"#), 400, "invalid_body"),
        ("1", None, Some(r#"{"quantity": "two"}"#), 400, "invalid_body"),
        ("1", None, Some(r#"{"quantity": 1.5}"#), 400, "invalid_body"),
        ("1", None, Some(r#"{"qty": 1}"#), 400, "invalid_body"),
        ("1", None, Some("quantity=1"), 400, "invalid_body"),
        ("1", None, Some(huge.as_str()), 413, "payload_too_large"),
        ("1", Some("has spaces"), None, 400, "invalid_key"),
        ("1", Some(long_key.as_str()), None, 400, "invalid_key"),
    ];
    for (id, key, body, status, code) in buys {
        let (got, answer) = buy(&t, id, key, body).await;
        assert_eq!((got, answer["error"].as_str()), (status, Some(code)), "buy {id} {body:?}: {answer}");
    }
    // Internal routes are not reachable through the edge.
    let (s, _) = get(&t, "/admin/ledger").await;
    assert_eq!(s, 404);
    let r = t
        .client
        .post(format!("{}/admin/backends", t.edge))
        .json(&json!({"url": "http://127.0.0.1:9"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401, "registering with the edge needs the token");
    let r = t.client.post(format!("{}/raft/vote", t.edge)).json(&json!({})).send().await.expect("request");
    assert_eq!(r.status(), 404);
    let r = t
        .client
        .post(format!("{}/internal/invalidate", t.edge))
        .json(&json!({"items": [[1, 1]]}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401, "invalidations need the token");
    assert_eq!(state(&t).await, before, "bad input changed the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caches_stay_coherent_and_stop_serving_without_a_lease() {
    let t = TestStore::start(Options { books: vec![(1, 50)], ..Options::default() }).await;
    let frontends = t.store.names("frontend");
    let lookup = |url: String| {
        let client = t.client.clone();
        async move {
            let r = client.get(format!("{url}/lookup/1")).timeout(Duration::from_secs(5)).send().await.ok()?;
            (r.status() == 200).then_some(())?;
            r.json::<Value>().await.ok()?["stock"].as_i64()
        }
    };
    // Warm both caches, then buy: every frontend shows the new stock at once.
    for _ in 0..3 {
        for f in &frontends {
            assert_eq!(lookup(t.url(f)).await, Some(50));
        }
    }
    for n in 1..=5 {
        let (s, receipt) = buy(&t, "1", None, None).await;
        assert_eq!(s, 200);
        for f in &frontends {
            assert_eq!(
                lookup(t.url(f)).await,
                receipt["stock_left"].as_i64(),
                "{f} served a stale stock after buy {n}"
            );
        }
    }
    let hits: u64 = futures_sum(&t, &frontends, "cache_hits").await;
    assert!(hits > 0, "the cache was never used");

    // Cut frontend-1 off from the catalog: its lease lapses and it stops answering from
    // its cache (the lookup must fail rather than serve what it holds).
    let f1 = t.url(&frontends[0]);
    assert!(t.status(&frontends[0]).await.expect("status").details["lease_valid"].as_bool().unwrap_or(false));
    for b in t.store.names("catalog-balancer") {
        t.store.kill(&b).expect("kill");
    }
    let cut = Instant::now();
    wait_for("frontend-1's lease to lapse", Duration::from_secs(5), || async {
        let s = t.status(&frontends[0]).await?;
        (s.details["lease_valid"] == json!(false)).then_some(())
    })
    .await;
    eprintln!("lease lapsed {:?} after the cut", cut.elapsed());
    let r = t
        .client
        .get(format!("{f1}/lookup/1"))
        .header("x-quire-deadline", deadline_ms(300))
        .send()
        .await
        .expect("request");
    assert_ne!(r.status(), 200, "a frontend without a lease served from its cache");
    for b in t.store.names("catalog-balancer") {
        t.store.restart(&b).expect("restart");
    }
    wait_for("frontend-1 to serve again", Duration::from_secs(20), || lookup(f1.clone())).await;
}

/// A buy is the catalog's decrement and then the order's record. A sale whose buy stopped
/// in between (its order leader killed, its client gone) is made here by sending the
/// decrement alone: the order leader's reconciler must give it the order it should have,
/// and a retry of the buy with its key must learn that order and buy nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sale_left_without_its_order_is_given_one() {
    let t = TestStore::start(Options { books: vec![(1, 5)], ..Options::default() }).await;
    let leader = t.url(&t.leader("catalog").await);
    let decrement = |key: &'static str, quantity: u32| {
        let request = t
            .client
            .post(format!("{leader}/books/1/decrement"))
            .header(quire_common::headers::TOKEN, &t.token)
            .json(&json!({"key": key, "quantity": quantity}));
        async move {
            let r = request.send().await.expect("decrement");
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.expect("answer")["outcome"].clone()
        }
    };
    assert_eq!(decrement("stopped-after-the-sale", 2).await, "sold");
    assert_eq!(decrement("stopped-after-a-refusal", 9).await, "out_of_stock");
    let orders = wait_for("both sales to get their orders", Duration::from_secs(30), || async {
        let orders: Vec<Value> = t.admin_get("order-1", "/admin/orders").await?;
        (orders.len() == 2).then_some(orders)
    })
    .await;
    let by_key = |key: &str| orders.iter().find(|o| o["key"] == key).cloned().expect("an order for the key");
    let sold = by_key("stopped-after-the-sale");
    assert_eq!((&sold["state"], &sold["item_id"], &sold["quantity"]), (&json!("confirmed"), &json!(1), &json!(2)));
    let refused = by_key("stopped-after-a-refusal");
    assert_eq!((&refused["state"], &refused["reason"]), (&json!("failed"), &json!("out_of_stock")));

    // The client's retry learns the order; with another quantity it is told the key is used.
    let (s, receipt) = buy(&t, "1", Some("stopped-after-the-sale"), Some(r#"{"quantity": 2}"#)).await;
    assert_eq!((s, &receipt["order_id"]), (200, &sold["order_id"]), "{receipt}");
    let (s, conflict) = buy(&t, "1", Some("stopped-after-the-sale"), Some(r#"{"quantity": 1}"#)).await;
    assert_eq!((s, conflict["error"].as_str()), (400, Some("invalid_key")));
    assert_eq!(get(&t, "/lookup/1").await.1["stock"], 3, "one sale of two copies, however often asked");
    let orders: Vec<Value> = t.admin_get("order-1", "/admin/orders").await.expect("orders");
    assert_eq!(orders.len(), 2);
}

fn deadline_ms(budget: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    (now + budget).to_string()
}

async fn futures_sum(t: &TestStore, names: &[String], field: &str) -> u64 {
    let mut total = 0;
    for n in names {
        total += t.status(n).await.and_then(|s| s.details[field].as_u64()).unwrap_or(0);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_thousand_books() {
    let started = Instant::now();
    let t = TestStore::start(Options { books: (1..=100_000).map(|id| (id, 3)).collect(), ..Options::default() }).await;
    eprintln!("100 000 books loaded and served in {:?}", started.elapsed());
    let (s, book) = get(&t, "/lookup/100000").await;
    assert_eq!((s, book["title"].as_str()), (200, Some("Book number 100000")));
    let (s, page) = get(&t, "/search?q=99999").await;
    assert_eq!((s, page["items"][0]["id"].as_u64()), (200, Some(99_999)));
    let (s, topic) = get(&t, "/search/t").await;
    assert_eq!(s, 200);
    assert!(!topic["items"].as_array().expect("items").is_empty());
    let (s, _) = buy(&t, "77777", None, None).await;
    assert_eq!(s, 200);
    t.converge("catalog", &t.store.names("catalog")).await;
}
