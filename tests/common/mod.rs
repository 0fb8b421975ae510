//! Harness for end-to-end tests: a real store of `quire` processes on loopback (through the
//! same supervisor as `quire up`), a shopping workload that records everything the store
//! acknowledged, and the invariant and history checks of docs/ARCHITECTURE.md.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use history::{Call, Final, Op, Outcome};
use quire::supervisor::{Store, StoreOptions};
use quire_catalog::api::Ledger;
use quire_common::api::{Order, OrderState, Receipt};
use quire_common::headers;
use quire_common::status::{Role, ServerStatus};
pub use quire_history as history;
use quire_raft::http::DigestAnswer;
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
    /// Every server on an address of its own (partition tests, in a network namespace).
    pub distinct_hosts: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            books: (1..=5).map(|id| (id, 400)).collect(),
            snapshot_every: 5000,
            restock: false,
            distinct_hosts: false,
        }
    }
}

/// A `quire up` started by a test: killed at the end (and so, through the parent-death
/// signal, every server it runs), even when the test fails midway.
pub struct Up(pub std::process::Child);

impl Up {
    /// Runs `quire up --port 0 --data-dir DATA ARGS`, its output discarded.
    pub fn start(data: &std::path::Path, args: &[&str]) -> Up {
        Up::spawn(data, args, std::process::Stdio::null())
    }

    /// The same, with its stderr piped to the test.
    pub fn spawn(data: &std::path::Path, args: &[&str], stderr: std::process::Stdio) -> Up {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_quire"))
            .args(["up", "--port", "0", "--data-dir"])
            .arg(data)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("quire up");
        Up(child)
    }
}

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
        opts.distinct_hosts = options.distinct_hosts;
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

    /// The address server `name` listens on and connects from (with `distinct_hosts`).
    pub fn host(&self, name: &str) -> String {
        let url = self.url(name);
        url.trim_start_matches("http://").rsplit_once(':').map(|(h, _)| h.to_string()).expect("host")
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

    /// Shoppers over every book: buyers through the edge, readers through the edge and each
    /// frontend directly (so both caches are read), searches of the books' topic.
    pub fn shoppers(&self, buyers: usize, readers: usize) -> Shoppers {
        let mut targets = vec![self.edge.clone()];
        targets.extend(self.store.names("frontend").iter().map(|n| self.url(n)));
        Shoppers {
            targets,
            items: self.initial.keys().copied().collect(),
            topic: Some("t".into()),
            buyers,
            readers,
            tolerate_unavailable: false,
        }
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

    /// Checks every invariant of docs/ARCHITECTURE.md against what `work` saw acknowledged.
    pub async fn check_invariants(&self, work: &Report) {
        self.probe().check_invariants(work).await;
    }

    /// The end of a fault test: a little more work once the faults healed, then every
    /// replica of both groups converged and every check passed.
    pub async fn finish(self, w: Workload) {
        w.progress(20, 5).await;
        self.settle(w).await;
    }

    /// Stops the workload, waits for every replica of both groups to converge, and checks
    /// every invariant against what it saw.
    pub async fn settle(self, w: Workload) {
        let report = w.finish().await;
        eprintln!("workload: {}", report.summary());
        assert!(!report.acked.is_empty(), "no buy succeeded at all");
        for tier in ["catalog", "order"] {
            self.converge(tier, &self.store.names(tier)).await;
        }
        self.check_invariants(&report).await;
    }

    /// Waits until `name` is a ready follower again.
    pub async fn rejoins_as_follower(&self, name: &str) {
        wait_for(&format!("{name} to rejoin as a follower"), Duration::from_secs(30), || async {
            self.status(name).await.filter(|s| s.role == Role::Follower && s.ready).map(|_| ())
        })
        .await;
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
    /// state digest; fails at once if two replicas at one index disagree.
    pub async fn converge(&self, what: &str, live: &[String]) {
        wait_for(&format!("{what} replicas to converge"), Duration::from_secs(30), || async {
            let mut seen = Vec::new();
            for url in live {
                let d: DigestAnswer = self.admin_get(url, "/admin/digest").await?;
                seen.push((url.clone(), d));
            }
            if let Some(divergence) = divergence(&seen) {
                panic!("{what} replicas diverged: {divergence}");
            }
            seen.windows(2).all(|w| w[0].1 == w[1].1).then_some(())
        })
        .await;
    }

    /// Checks every invariant of docs/ARCHITECTURE.md against what `work` saw.
    pub async fn check_invariants(&self, work: &Report) {
        let state = self.final_state().await;
        let at = work.began.map_or(Duration::ZERO, |b| b.elapsed());
        let verdict = audit(&self.initial, &state, work, at);
        eprintln!("{}", verdict.summary());
        assert!(verdict.violations.is_empty(), "the store broke its guarantees: {:#?}", verdict.violations);
        for receipt in work.acked.iter().take(20) {
            let r = self
                .client
                .get(format!("{}/orders/{}", self.edge, receipt.order_id))
                .send()
                .await
                .expect("order lookup");
            assert_eq!(r.status(), 200, "acknowledged order {} not found through the edge", receipt.order_id);
        }
    }

    /// The ledger and the orders, once every sale in the ledger has its order (the order
    /// leader's reconciler gives one to a sale whose buy stopped in between) and no sale
    /// was made while they were read.
    pub async fn final_state(&self) -> FinalState {
        wait_for("every sale to have its order", Duration::from_secs(40), || async {
            let before = self.ledger().await?;
            let orders = self.orders().await?;
            let after = self.ledger().await?;
            let keys: BTreeSet<&str> = orders.iter().map(|o| o.key.as_str()).collect();
            let settled = before.sold_keys == after.sold_keys
                && after.sold_keys.iter().all(|(key, _, _)| keys.contains(key.as_str()));
            settled.then_some(FinalState { orders, ledger: after })
        })
        .await
    }

    async fn ledger(&self) -> Option<Ledger> {
        for url in &self.catalog {
            if let Some(l) = self.admin_get::<Ledger>(url, "/admin/ledger").await {
                return Some(l);
            }
        }
        None
    }

    async fn orders(&self) -> Option<Vec<Order>> {
        for url in &self.order {
            if let Some(orders) = self.admin_get::<Vec<Order>>(url, "/admin/orders").await {
                return Some(orders);
            }
        }
        None
    }
}

/// Two replicas that report the same applied index with different digests, if any.
pub fn divergence(seen: &[(String, DigestAnswer)]) -> Option<String> {
    for (i, (a, da)) in seen.iter().enumerate() {
        for (b, db) in &seen[i + 1..] {
            if da.applied_index == db.applied_index && da.digest != db.digest {
                return Some(format!("{a} and {b} both applied {} but hold different states", da.applied_index));
            }
        }
    }
    None
}

/// What the checks read after a run: every order and the catalog's ledger.
#[derive(Debug, Clone)]
pub struct FinalState {
    pub orders: Vec<Order>,
    pub ledger: Ledger,
}

/// What [`audit`] found.
#[derive(Debug, Default)]
pub struct Audit {
    pub violations: Vec<String>,
    pub verdict: history::Verdict,
}

impl Audit {
    pub fn summary(&self) -> String {
        let linearizable = if self.verdict.violations.is_empty() { "linearizable" } else { "NOT linearizable" };
        format!(
            "checked: {} operations on {} books, {linearizable}; {} violations",
            self.verdict.ops(),
            self.verdict.checked.len(),
            self.violations.len()
        )
    }
}

/// Every invariant of docs/ARCHITECTURE.md, checked against what a workload saw (`at`:
/// when `state` was read, on the workload's clock):
/// - stock is conserved: initial + restocked = stock + confirmed quantities, per book;
/// - exactly once: the catalog sold exactly the keys of confirmed orders, each once;
/// - no acknowledged buy lost: every receipt is a confirmed order;
/// - nothing the workload saw broke a guarantee on its own (a failed read, say);
/// - the history is linearizable per book.
pub fn audit(initial: &BTreeMap<u64, i64>, state: &FinalState, work: &Report, at: Duration) -> Audit {
    let FinalState { orders, ledger } = state;
    let mut violations = work.violations.clone();
    let confirmed: Vec<&Order> = orders.iter().filter(|o| o.state == OrderState::Confirmed).collect();
    for row in &ledger.books {
        let sold: i64 = confirmed.iter().filter(|o| o.item_id == row.id).map(|o| i64::from(o.quantity)).sum();
        let Some(start) = initial.get(&row.id) else {
            violations.push(format!("book {} is not in the catalog the store was loaded with", row.id));
            continue;
        };
        if start + row.restocked != row.stock + sold {
            violations.push(format!(
                "book {}: initial {start} + restocked {} != stock {} + confirmed {sold}",
                row.id, row.restocked, row.stock
            ));
        }
    }
    let sold_keys: BTreeSet<(String, u64, u32)> = ledger.sold_keys.iter().cloned().collect();
    let confirmed_keys: BTreeSet<(String, u64, u32)> =
        confirmed.iter().map(|o| (o.key.clone(), o.item_id, o.quantity)).collect();
    if sold_keys != confirmed_keys {
        let only_sold: Vec<_> = sold_keys.difference(&confirmed_keys).take(5).collect();
        let only_confirmed: Vec<_> = confirmed_keys.difference(&sold_keys).take(5).collect();
        violations.push(format!(
            "catalog sales and confirmed orders differ: sold only {only_sold:?}, confirmed only {only_confirmed:?}"
        ));
    }
    let keys: BTreeSet<&str> = orders.iter().map(|o| o.key.as_str()).collect();
    if keys.len() != orders.len() {
        violations.push("an idempotency key has two orders".into());
    }
    let by_id: HashMap<u64, &Order> = orders.iter().map(|o| (o.order_id, o)).collect();
    for receipt in &work.acked {
        match by_id.get(&receipt.order_id) {
            None => violations.push(format!("acknowledged order {} lost", receipt.order_id)),
            Some(o)
                if o.state != OrderState::Confirmed
                    || (o.item_id, o.quantity) != (receipt.item_id, receipt.quantity) =>
            {
                violations.push(format!("acknowledged order {} is now {o:?}", receipt.order_id))
            }
            Some(_) => {}
        }
    }
    let fin = Final {
        at,
        initial: initial.clone(),
        stock: ledger.books.iter().map(|b| (b.id, b.stock)).collect(),
        sold: ledger.sold_keys.iter().map(|(key, item, qty)| (key.clone(), (*item, *qty))).collect(),
        order_of: orders.iter().map(|o| (o.key.clone(), o.order_id)).collect(),
        restocks: ledger.restocks.iter().map(|&(_, item, qty)| (item, qty)).collect(),
    };
    let verdict = history::check(&work.history, &fin, &work.items);
    violations.extend(verdict.violations.iter().cloned());
    Audit { violations, verdict }
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
    /// Anything that breaks a guarantee on its own: a failed read, an undocumented answer.
    pub violations: Vec<String>,
    /// Every request and its answer, for the linearizability check.
    pub history: Vec<Op>,
    /// The books the workload shopped for (its history covers all their writes).
    pub items: Vec<u64>,
    /// When the workload began: the zero of the history's clock.
    pub began: Option<Instant>,
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

/// Who shops, and where: buyers go through `targets[0]` (the edge); readers take turns over
/// every target (the edge and, when given, each frontend directly).
pub struct Shoppers {
    pub targets: Vec<String>,
    pub items: Vec<u64>,
    /// A topic every item is filed under: readers also search it.
    pub topic: Option<String>,
    pub buyers: usize,
    pub readers: usize,
    /// Reads the store could not answer are recorded, not counted as violations (a
    /// partition may cut a frontend off from every replica: availability is not owed).
    pub tolerate_unavailable: bool,
}

impl Shoppers {
    pub fn new(edge: &str, items: Vec<u64>) -> Self {
        Shoppers {
            targets: vec![edge.to_string()],
            items,
            topic: None,
            buyers: 4,
            readers: 4,
            tolerate_unavailable: false,
        }
    }
}

/// Concurrent shoppers: buyers with their own idempotency keys, who read back some of their
/// orders; readers who look books up and search. Everything is recorded in the history.
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    report: Arc<Mutex<Report>>,
    pub reads_done: Arc<AtomicU64>,
    pub buys_done: Arc<AtomicU64>,
    /// When the workload started (times in its report are counted from here).
    pub began: Instant,
    recorder: Recorder,
    client: reqwest::Client,
    edge: String,
}

/// Shared by a workload's tasks.
#[derive(Clone)]
struct Recorder {
    report: Arc<Mutex<Report>>,
    began: Instant,
}

impl Recorder {
    fn now(&self) -> Duration {
        self.began.elapsed()
    }

    fn record(&self, client: usize, call: Call, sent: Duration, outcome: Outcome, problem: Option<String>) {
        let op = Op { client, call, sent, answered: self.now(), outcome };
        let mut report = self.report.lock().expect("report");
        if let Some(problem) = problem {
            report.violations.push(format!(
                "{problem} at +{:.1?}, answered after {:.2?}",
                op.sent,
                op.answered - op.sent
            ));
        }
        report.history.push(op);
    }
}

impl Workload {
    pub fn start(edge: &str, items: Vec<u64>, buyers: usize, readers: usize) -> Workload {
        Shoppers { buyers, readers, ..Shoppers::new(edge, items) }.start()
    }
}

impl Shoppers {
    pub fn start(self) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let began = Instant::now();
        let report =
            Arc::new(Mutex::new(Report { items: self.items.clone(), began: Some(began), ..Report::default() }));
        let recorder = Recorder { report: report.clone(), began };
        let reads_done = Arc::new(AtomicU64::new(0));
        let buys_done = Arc::new(AtomicU64::new(0));
        let client = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().expect("client");
        let targets = Arc::new(self.targets);
        let items = Arc::new(self.items);
        let tolerate = self.tolerate_unavailable;
        let mut tasks = Vec::new();
        for b in 0..self.buyers {
            let (stop, recorder, client, targets, items, done) =
                (stop.clone(), recorder.clone(), client.clone(), targets.clone(), items.clone(), buys_done.clone());
            tasks.push(tokio::spawn(async move {
                let edge = &targets[0];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let item = items[(n as usize * 7 + b) % items.len()];
                    let key = format!("buyer{b}-{n}-{}", rand_suffix());
                    let quantity = 1 + (n % 2) as u32;
                    let sent = recorder.now();
                    let answer = client
                        .post(format!("{edge}/buy/{item}"))
                        .header(headers::IDEMPOTENCY_KEY, &key)
                        .header(headers::DEADLINE, patient())
                        .json(&serde_json::json!({ "quantity": quantity }))
                        .send()
                        .await;
                    let call = Call::Buy { item, quantity, key: key.clone() };
                    let (outcome, problem) = buy_outcome(classify(answer).await);
                    let receipt = match &outcome {
                        Outcome::Receipt(r) => Some(r.clone()),
                        _ => None,
                    };
                    {
                        let mut report = recorder.report.lock().expect("report");
                        report.buys += 1;
                        match &outcome {
                            Outcome::Receipt(r) => report.acked.push(r.clone()),
                            Outcome::OutOfStock => {
                                *report.buy_errors.entry("409 out_of_stock".into()).or_default() += 1
                            }
                            Outcome::Refused(code) | Outcome::Unknown(code) => {
                                *report.buy_errors.entry(code.clone()).or_default() += 1
                            }
                            _ => {}
                        }
                    }
                    recorder.record(b, call, sent, outcome, problem.map(|p| format!("buy {key}: {p}")));
                    done.fetch_add(1, Ordering::Relaxed);
                    // Read back every fourth order: it must be confirmed.
                    if let Some(r) = receipt.filter(|_| n.is_multiple_of(4)) {
                        let sent = recorder.now();
                        let answer = client
                            .get(format!("{edge}/orders/{}", r.order_id))
                            .header(headers::DEADLINE, patient())
                            .send()
                            .await;
                        let (outcome, problem) = read_outcome(classify(answer).await, !tolerate, |body| {
                            serde_json::from_value::<Order>(body).ok().map(Outcome::Order)
                        });
                        let call = Call::Order { order_id: r.order_id, item: r.item_id };
                        recorder.record(b, call, sent, outcome, problem.map(|p| format!("order {}: {p}", r.order_id)));
                    }
                }
            }));
        }
        for r in 0..self.readers {
            let (stop, recorder, client, targets, items, done, topic) = (
                stop.clone(),
                recorder.clone(),
                client.clone(),
                targets.clone(),
                items.clone(),
                reads_done.clone(),
                self.topic.clone(),
            );
            let process = self.buyers + r;
            tasks.push(tokio::spawn(async move {
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let via_edge = (n + r).is_multiple_of(targets.len());
                    let target = &targets[(n + r) % targets.len()];
                    let item = items[(n * 3 + r) % items.len()];
                    let (call, path) = match &topic {
                        Some(topic) if n.is_multiple_of(8) => {
                            let path = format!("/search/{}", topic.replace(' ', "%20"));
                            (Call::Search { path: path.clone(), expected: items.to_vec() }, path)
                        }
                        _ => (Call::Lookup { item }, format!("/lookup/{item}")),
                    };
                    let sent = recorder.now();
                    let answer =
                        client.get(format!("{target}{path}")).header(headers::DEADLINE, patient()).send().await;
                    let (outcome, problem) =
                        read_outcome(classify(answer).await, via_edge && !tolerate, |body| match call {
                            Call::Lookup { .. } => body["stock"].as_i64().map(|stock| Outcome::Book { stock }),
                            _ => body["items"]
                                .as_array()
                                .map(|a| Outcome::Listed(a.iter().filter_map(|i| i["id"].as_u64()).collect())),
                        });
                    {
                        let mut report = recorder.report.lock().expect("report");
                        report.reads += 1;
                        if matches!(&outcome, Outcome::Refused(code) if code == "503 dropped") {
                            report.dropped_reads += 1;
                        }
                    }
                    let problem = problem.map(|p| format!("read {target}{path}: {p}"));
                    recorder.record(process, call, sent, outcome, problem);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let edge = targets[0].clone();
        Workload { stop, tasks, report, reads_done, buys_done, began, recorder, client, edge }
    }
}

impl Workload {
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

    /// A test's own buy through the edge, recorded in the history as client `SCRIPT`'s
    /// (`deadline`: the `x-quire-deadline` to send, else a patient one). Returns the answer.
    pub async fn buy(&self, item: u64, key: &str, deadline: Option<String>) -> Answer {
        let sent = self.recorder.now();
        let answer = self
            .client
            .post(format!("{}/buy/{item}", self.edge))
            .header(headers::IDEMPOTENCY_KEY, key)
            .header(headers::DEADLINE, deadline.unwrap_or_else(patient))
            .json(&serde_json::json!({ "quantity": 1 }))
            .send()
            .await;
        let answer = classify(answer).await;
        let (outcome, problem) = buy_outcome(answer.clone());
        let mut report = self.recorder.report.lock().expect("report");
        report.buys += 1;
        if let Outcome::Receipt(r) = &outcome {
            if !report.acked.iter().any(|a| a.order_id == r.order_id) {
                report.acked.push(r.clone());
            }
        }
        drop(report);
        let call = Call::Buy { item, quantity: 1, key: key.to_string() };
        self.recorder.record(SCRIPT, call, sent, outcome, problem.map(|p| format!("buy {key}: {p}")));
        answer
    }

    /// A test's own lookup through the edge, recorded in the history. Returns the answer.
    pub async fn lookup(&self, item: u64) -> Answer {
        let sent = self.recorder.now();
        let answer = self.client.get(format!("{}/lookup/{item}", self.edge)).send().await;
        let answer = classify(answer).await;
        let (outcome, problem) =
            read_outcome(answer.clone(), true, |body| body["stock"].as_i64().map(|stock| Outcome::Book { stock }));
        self.recorder.record(SCRIPT, Call::Lookup { item }, sent, outcome, problem.map(|p| format!("lookup: {p}")));
        answer
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

/// An answer: status and JSON body, or why there was none (the request may have arrived).
pub type Answer = Result<(u16, Value), String>;

/// The history's client number of a test's own requests ([`Workload::buy`]).
const SCRIPT: usize = 10_000;

async fn classify(sent: reqwest::Result<reqwest::Response>) -> Answer {
    let response = sent.map_err(|e| if e.is_connect() { format!("unreachable: {e}") } else { e.to_string() })?;
    let status = response.status().as_u16();
    let body: Value = response.json().await.map_err(|e| format!("{status} with a body that is not JSON: {e}"))?;
    Ok((status, body))
}

fn has_message(body: &Value) -> bool {
    body["message"].as_str().is_some_and(|m| !m.is_empty())
}

/// A buy's answer as the history sees it, and what breaks a guarantee by itself. The API
/// documents 409 `out_of_stock`, 503 `unavailable`/`dropped` (nothing was done) and 504
/// `deadline_exceeded` (the outcome is not known yet).
fn buy_outcome(answer: Answer) -> (Outcome, Option<String>) {
    match answer {
        Ok((200, body)) => match serde_json::from_value::<Receipt>(body.clone()) {
            Ok(receipt) => (Outcome::Receipt(receipt), None),
            Err(e) => (Outcome::Unknown("bad receipt".into()), Some(format!("bad receipt {body}: {e}"))),
        },
        Ok((status, body)) if has_message(&body) => {
            let code = format!("{status} {}", body["error"].as_str().unwrap_or_default());
            match code.as_str() {
                "409 out_of_stock" => (Outcome::OutOfStock, None),
                "503 unavailable" | "503 dropped" => (Outcome::Refused(code), None),
                "504 deadline_exceeded" => (Outcome::Unknown(code), None),
                _ => (Outcome::Unknown(code), Some(format!("undocumented {status} {body}"))),
            }
        }
        Ok((status, body)) => (Outcome::Unknown(status.to_string()), Some(format!("undocumented {status} {body}"))),
        Err(e) => (Outcome::Unknown(e.clone()), Some(format!("no answer from the edge: {e}"))),
    }
}

/// A read's answer. `owed`: an answer is owed (a read through the edge, unless the test
/// tolerates unavailability: `dropped` aside, which an emulated cloud may shed). A frontend
/// read directly may be down itself (killed by the test), which no client of the store
/// would see.
fn read_outcome(answer: Answer, owed: bool, parse: impl FnOnce(Value) -> Option<Outcome>) -> (Outcome, Option<String>) {
    match answer {
        Ok((200, body)) => match parse(body.clone()) {
            Some(outcome) => (outcome, None),
            None => (Outcome::Unknown("bad body".into()), Some(format!("undocumented answer {body}"))),
        },
        Ok((404, body)) if body["error"] == "not_found" => (Outcome::NotFound, None),
        Ok((503, body)) if body["error"] == "dropped" => (Outcome::Refused("503 dropped".into()), None),
        Ok((status @ (503 | 504), body)) if !owed && has_message(&body) => {
            (Outcome::Refused(format!("{status} {}", body["error"])), None)
        }
        Err(e) if !owed => (Outcome::Refused(e), None),
        Ok((status, body)) => (Outcome::Unknown(status.to_string()), Some(format!("failed: {status} {body}"))),
        Err(e) => (Outcome::Unknown(e.clone()), Some(format!("no answer: {e}"))),
    }
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
