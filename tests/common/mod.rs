//! Harness for end-to-end tests: a real store of `quire` processes on loopback (through the
//! same supervisor as `quire up`), a shopping workload that records everything the store
//! acknowledged, and the invariant checks of ARCHITECTURE.md §4.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quire::supervisor::{Store, StoreOptions};
use quire_common::api::{Order, OrderState, Receipt};
use quire_common::headers;
use quire_common::status::{Role, ServerStatus};
use serde_json::Value;

/// Stores are started one at a time: each is eleven processes, and two at once on a
/// two-core machine would slow Raft heartbeats into spurious elections.
static ONE_STORE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct TestStore {
    pub store: Store,
    pub edge: String,
    pub token: String,
    pub client: reqwest::Client,
    /// Initial stock by book id.
    pub initial: BTreeMap<u64, i64>,
    _dir: tempfile::TempDir,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

pub struct Options {
    /// Books as (id, stock); all in topic "t", price 10.
    pub books: Vec<(u64, i64)>,
    pub snapshot_every: u64,
    pub restock: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { books: (1..=5).map(|id| (id, 400)).collect(), snapshot_every: 5000, restock: false }
    }
}

/// A `quire up` started by a test: killed at the end (and so, through the parent-death
/// signal, every server it runs), even when the test fails midway.
pub struct Up(pub std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl TestStore {
    pub async fn start(options: Options) -> TestStore {
        let turn = ONE_STORE_AT_A_TIME.lock().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let csv = dir.path().join("catalog.csv");
        let mut file = std::fs::File::create(&csv).expect("csv");
        writeln!(file, "id,title,topic,price,stock").expect("csv");
        for (id, stock) in &options.books {
            writeln!(file, "{id},Book number {id},t,10.00,{stock}").expect("csv");
        }
        drop(file);
        let mut opts = StoreOptions::new(dir.path().join("data"), env!("CARGO_BIN_EXE_quire"));
        opts.catalog_csv = Some(csv);
        opts.edge_port = 0;
        opts.restock_amount = if options.restock { 50 } else { 0 };
        opts.restock_delay = Duration::from_millis(300);
        let snapshot = ["--snapshot-every".to_string(), options.snapshot_every.to_string()];
        opts.catalog_args = snapshot.to_vec();
        opts.order_args = [snapshot.as_slice(), &["--recover-after".into(), "2s".into()]].concat();
        let store = Store::launch(&opts).expect("launch store");
        let edge = store.url("edge").expect("edge");
        let token = store.token();
        let client = quire_common::client::http_client();
        let first = options.books.first().map_or(1, |b| b.0);
        let test = TestStore {
            store,
            edge,
            token,
            client,
            initial: options.books.iter().copied().collect(),
            _dir: dir,
            _turn: turn,
        };
        let url = format!("{}/lookup/{first}", test.edge);
        let client = test.client.clone();
        wait_for("the store to serve lookups", Duration::from_secs(60), || {
            let (client, url) = (client.clone(), url.clone());
            async move { client.get(url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
        test
    }

    pub fn url(&self, name: &str) -> String {
        self.store.url(name).expect("server url")
    }

    pub async fn status(&self, name: &str) -> Option<ServerStatus> {
        let r = self
            .client
            .get(format!("{}/status", self.url(name)))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// The replica of `tier` that is leader (and seen as such by a majority), waiting for one.
    pub async fn leader(&self, tier: &str) -> String {
        let names = self.store.names(tier);
        wait_for(&format!("a {tier} leader"), Duration::from_secs(20), || {
            let names = names.clone();
            async move {
                for name in names {
                    if let Some(s) = self.status(&name).await {
                        if s.role == Role::Leader {
                            return Some(name);
                        }
                    }
                }
                None
            }
        })
        .await
    }

    pub async fn followers(&self, tier: &str) -> Vec<String> {
        let leader = self.leader(tier).await;
        self.store.names(tier).into_iter().filter(|n| *n != leader).collect()
    }

    /// The store as the invariant checks see it: every replica, live or not, by URL.
    pub fn probe(&self) -> Probe {
        let urls = |tier: &str| self.store.names(tier).iter().map(|n| self.url(n)).collect();
        Probe {
            client: self.client.clone(),
            token: self.token.clone(),
            edge: self.edge.clone(),
            catalog: urls("catalog"),
            order: urls("order"),
            initial: self.initial.clone(),
        }
    }

    pub async fn admin_get<T: serde::de::DeserializeOwned>(&self, name: &str, path: &str) -> Option<T> {
        self.probe().admin_get(&self.url(name), path).await
    }

    /// Waits until the named live replicas of `tier` converge.
    pub async fn converge(&self, tier: &str, live: &[String]) {
        let urls: Vec<String> = live.iter().map(|n| self.url(n)).collect();
        self.probe().converge(tier, &urls).await;
    }

    /// Checks every invariant of ARCHITECTURE.md §4 against what `work` saw acknowledged.
    pub async fn check_invariants(&self, work: &Report) {
        self.probe().check_invariants(work).await;
    }
}

/// What the invariant checks reach: the edge, every replica of each group (by URL), the
/// token, and the initial stock. Built from a process store or from containers.
pub struct Probe {
    pub client: reqwest::Client,
    pub token: String,
    pub edge: String,
    pub catalog: Vec<String>,
    pub order: Vec<String>,
    pub initial: BTreeMap<u64, i64>,
}

impl Probe {
    pub async fn admin_get<T: serde::de::DeserializeOwned>(&self, url: &str, path: &str) -> Option<T> {
        let r = self
            .client
            .get(format!("{url}{path}"))
            .header(headers::TOKEN, &self.token)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// Waits until every replica in `live` (URLs) has applied the same index with the same
    /// state digest.
    pub async fn converge(&self, what: &str, live: &[String]) {
        wait_for(&format!("{what} replicas to converge"), Duration::from_secs(30), || async {
            let mut seen = BTreeSet::new();
            for url in live {
                let d: Value = self.admin_get(url, "/admin/digest").await?;
                seen.insert((d["applied_index"].as_u64()?, d["digest"].as_str()?.to_string()));
            }
            (seen.len() == 1).then_some(())
        })
        .await;
    }

    /// Checks every invariant of ARCHITECTURE.md §4 against what `work` saw acknowledged.
    pub async fn check_invariants(&self, work: &Report) {
        let (catalog, orders_tier) = (&self.catalog, &self.order);
        // Pending orders are finished by the recovery task; wait for it.
        let orders: Vec<Order> = wait_for("every pending order to settle", Duration::from_secs(40), || async {
            for url in orders_tier {
                if let Some(orders) = self.admin_get::<Vec<Order>>(url, "/admin/orders").await {
                    return orders.iter().all(|o| o.state != OrderState::Pending).then_some(orders);
                }
            }
            None
        })
        .await;
        let ledger: Value = wait_for("the catalog ledger", Duration::from_secs(20), || async {
            for url in catalog {
                if let Some(l) = self.admin_get::<Value>(url, "/admin/ledger").await {
                    return Some(l);
                }
            }
            None
        })
        .await;

        // Stock conservation, stock never negative.
        let mut confirmed_qty: HashMap<u64, i64> = HashMap::new();
        for o in orders.iter().filter(|o| o.state == OrderState::Confirmed) {
            *confirmed_qty.entry(o.item_id).or_default() += i64::from(o.quantity);
        }
        for row in ledger["books"].as_array().expect("ledger books") {
            let id = row["id"].as_u64().expect("id");
            let (stock, restocked) =
                (row["stock"].as_i64().expect("stock"), row["restocked"].as_i64().expect("restocked"));
            let initial = self.initial[&id];
            let sold = confirmed_qty.get(&id).copied().unwrap_or(0);
            assert!(stock >= 0, "book {id}: negative stock {stock}");
            assert_eq!(
                initial + restocked,
                stock + sold,
                "book {id}: initial {initial} + restocked {restocked} != stock {stock} + confirmed {sold}"
            );
        }

        // Exactly once: the catalog sold each key at most once (its primary key) and sold
        // exactly the keys of confirmed orders, with the same item and quantity.
        let sold: BTreeSet<(String, u64, u32)> = ledger["sold_keys"]
            .as_array()
            .expect("sold keys")
            .iter()
            .map(|k| {
                (
                    k[0].as_str().expect("key").to_string(),
                    k[1].as_u64().expect("item"),
                    k[2].as_u64().expect("qty") as u32,
                )
            })
            .collect();
        let confirmed: BTreeSet<(String, u64, u32)> = orders
            .iter()
            .filter(|o| o.state == OrderState::Confirmed)
            .map(|o| (o.key.clone(), o.item_id, o.quantity))
            .collect();
        assert_eq!(sold, confirmed, "catalog sales and confirmed orders differ");
        let keys: BTreeSet<&str> = orders.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys.len(), orders.len(), "an idempotency key has two orders");

        // No acknowledged order lost: each receipt is a confirmed order, found through the edge.
        let by_id: HashMap<u64, &Order> = orders.iter().map(|o| (o.order_id, o)).collect();
        for receipt in &work.acked {
            let order =
                by_id.get(&receipt.order_id).unwrap_or_else(|| panic!("acknowledged order {} lost", receipt.order_id));
            assert_eq!(order.state, OrderState::Confirmed, "acknowledged order {} is not confirmed", receipt.order_id);
            assert_eq!((order.item_id, order.quantity), (receipt.item_id, receipt.quantity));
        }
        for receipt in work.acked.iter().take(20) {
            let r = self
                .client
                .get(format!("{}/orders/{}", self.edge, receipt.order_id))
                .send()
                .await
                .expect("order lookup");
            assert_eq!(r.status(), 200, "acknowledged order {} not found through the edge", receipt.order_id);
        }
        assert!(work.violations.is_empty(), "workload saw violations: {:#?}", work.violations);
    }
}

/// What a workload observed.
#[derive(Debug, Default)]
pub struct Report {
    pub acked: Vec<Receipt>,
    pub buys: u64,
    pub reads: u64,
    /// Documented errors buys got (status, code) → count.
    pub buy_errors: BTreeMap<String, u64>,
    /// Reads an emulated cloud shed as `dropped`.
    pub dropped_reads: u64,
    /// Anything that breaks a guarantee: a failed read, an undocumented answer, a stale read.
    pub violations: Vec<String>,
}

impl Report {
    /// One line for a test's output.
    pub fn summary(&self) -> String {
        format!(
            "{} reads, {} buys, {} acknowledged, errors {:?}",
            self.reads,
            self.buys,
            self.acked.len(),
            self.buy_errors
        )
    }
}

/// These clients wait out a leader election (1.3-1.8 s here, more on a loaded machine)
/// rather than take the store's default deadlines (1 s browse, 2 s buy).
fn patient() -> String {
    quire_common::Deadline::after(Duration::from_secs(5)).header_value()
}

/// Concurrent shoppers: buyers with their own idempotency keys, readers checking that no
/// lookup returns stock older than an acknowledged buy. Restocks must be off (stock then
/// only falls, so "older" is "higher").
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    report: Arc<Mutex<Report>>,
    pub reads_done: Arc<AtomicU64>,
    pub buys_done: Arc<AtomicU64>,
    /// When the workload started (times in its report are counted from here).
    pub began: Instant,
}

impl Workload {
    pub fn start(edge: &str, items: Vec<u64>, buyers: usize, readers: usize) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(Report::default()));
        // Lowest stock_left acknowledged so far per item, and when.
        let floors: Arc<Mutex<HashMap<u64, i64>>> = Arc::new(Mutex::new(HashMap::new()));
        let reads_done = Arc::new(AtomicU64::new(0));
        let buys_done = Arc::new(AtomicU64::new(0));
        let client = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().expect("client");
        let began = Instant::now();
        let mut tasks = Vec::new();
        for b in 0..buyers {
            let (stop, report, floors, client, edge, items, done) = (
                stop.clone(),
                report.clone(),
                floors.clone(),
                client.clone(),
                edge.to_string(),
                items.clone(),
                buys_done.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let item = items[(n as usize * 7 + b) % items.len()];
                    let key = format!("buyer{b}-{n}-{}", rand_suffix());
                    let quantity = 1 + (n % 2);
                    let sent = client
                        .post(format!("{edge}/buy/{item}"))
                        .header(headers::IDEMPOTENCY_KEY, &key)
                        .header(headers::DEADLINE, patient())
                        .json(&serde_json::json!({ "quantity": quantity }))
                        .send()
                        .await;
                    let outcome = classify(sent).await;
                    let mut report = report.lock().expect("report");
                    report.buys += 1;
                    match outcome {
                        Ok((200, body)) => match serde_json::from_value::<Receipt>(body.clone()) {
                            Ok(receipt) => {
                                let mut floors = floors.lock().expect("floors");
                                let floor = floors.entry(item).or_insert(i64::MAX);
                                *floor = (*floor).min(receipt.stock_left);
                                report.acked.push(receipt);
                            }
                            Err(e) => report.violations.push(format!("buy {key}: bad receipt {body}: {e}")),
                        },
                        Ok((status, body)) if documented_buy_error(status, &body) => {
                            *report.buy_errors.entry(format!("{status} {}", body["error"])).or_default() += 1;
                        }
                        Ok((status, body)) => {
                            report.violations.push(format!("buy {key}: undocumented {status} {body}"))
                        }
                        Err(e) => report.violations.push(format!("buy {key}: no answer from the edge: {e}")),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for r in 0..readers {
            let (stop, report, floors, client, edge, items, done) = (
                stop.clone(),
                report.clone(),
                floors.clone(),
                client.clone(),
                edge.to_string(),
                items.clone(),
                reads_done.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let item = items[(n * 3 + r) % items.len()];
                    let floor = floors.lock().expect("floors").get(&item).copied();
                    let outcome = classify(
                        client.get(format!("{edge}/lookup/{item}")).header(headers::DEADLINE, patient()).send().await,
                    )
                    .await;
                    let mut report = report.lock().expect("report");
                    report.reads += 1;
                    match outcome {
                        Ok((200, body)) => {
                            let stock = body["stock"].as_i64().unwrap_or(i64::MAX);
                            if let Some(floor) = floor {
                                if stock > floor {
                                    report.violations.push(format!(
                                        "stale read: book {item} showed stock {stock} after a buy left {floor}"
                                    ));
                                }
                            }
                        }
                        // An emulated cloud (`cloud-sim`) sheds what it cannot serve in time:
                        // documented, and no stale read.
                        Ok((503, body)) if body["error"] == "dropped" => report.dropped_reads += 1,
                        Ok((status, body)) => report
                            .violations
                            .push(format!("read of {item} failed at +{:.1?}: {status} {body}", began.elapsed())),
                        Err(e) => report.violations.push(format!("read of {item}: no answer from the edge: {e}")),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        Workload { stop, tasks, report, reads_done, buys_done, began }
    }

    /// Lets the workload make at least `reads` more reads and `buys` more buys.
    pub async fn progress(&self, reads: u64, buys: u64) {
        let (r0, b0) = (self.reads_done.load(Ordering::Relaxed), self.buys_done.load(Ordering::Relaxed));
        wait_for("the workload to make progress", Duration::from_secs(60), || async {
            let r = self.reads_done.load(Ordering::Relaxed);
            let b = self.buys_done.load(Ordering::Relaxed);
            (r >= r0 + reads && b >= b0 + buys).then_some(())
        })
        .await;
    }

    pub async fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        std::mem::take(&mut *self.report.lock().expect("report"))
    }
}

fn rand_suffix() -> u32 {
    rand::random()
}

async fn classify(sent: reqwest::Result<reqwest::Response>) -> Result<(u16, Value), String> {
    let response = sent.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body: Value = response.json().await.map_err(|e| format!("{status} with a body that is not JSON: {e}"))?;
    Ok((status, body))
}

/// A buy error the API documents: 409 out_of_stock, 503 unavailable/dropped, 504
/// deadline_exceeded, each with the documented body.
fn documented_buy_error(status: u16, body: &Value) -> bool {
    let code = body["error"].as_str().unwrap_or_default();
    let has_message = body["message"].as_str().is_some_and(|m| !m.is_empty());
    has_message
        && matches!(
            (status, code),
            (409, "out_of_stock") | (503, "unavailable") | (503, "dropped") | (504, "deadline_exceeded")
        )
}

impl Drop for TestStore {
    /// A failing test shows the end of every server's log, since the store's directory is
    /// deleted with it.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let logs = self.store.dir.join("logs");
        let Ok(entries) = std::fs::read_dir(&logs) else { return };
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("==== {} (last 25 lines) ====", path.display());
            for line in &lines[lines.len().saturating_sub(25)..] {
                eprintln!("{line}");
            }
        }
    }
}
