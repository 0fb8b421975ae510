//! What an operator can get wrong, refused before it does harm: a bad catalog or flag (no
//! server starts), a server that keeps failing at start (the store stops and says why), a
//! short cluster token, two servers on one port, a restock past the stock bound (refused as
//! an answer; the group goes on), and serials that never come back across runs.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, Options, TestStore, Up};
use quire::supervisor::{Layout, Store, StoreOptions};
use quire_common::api::MAX_STOCK;
use quire_common::headers;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_quire");

/// Runs `quire up` with `args` and waits for it to exit on its own (within a deadline).
fn up_fails(data: &std::path::Path, args: &[&str]) -> (i32, String) {
    let mut up = Up::spawn(data, args, Stdio::piped());
    let pid = up.0.id();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = up.0.try_wait().expect("wait") {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "quire up (pid {pid}) {args:?} did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = up.0.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    (status.code().unwrap_or(-1), stderr)
}

#[test]
fn bad_catalogs_and_flags_are_refused_before_any_server_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("csv");
        path.to_string_lossy().to_string()
    };
    let header = "id,title,topic,price,stock\n";
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--catalog".into(), dir.path().join("missing.csv").to_string_lossy().to_string()], "missing.csv"),
        (vec!["--catalog".into(), csv("no-topic.csv", "id,title,price,stock\n1,A,1.00,5\n")], "topic"),
        (vec!["--catalog".into(), csv("bad-stock.csv", &format!("{header}1,A,t,1.00,5\n2,B,t,1.00,-3\n"))], "line 3"),
        (vec!["--catalog".into(), csv("dup.csv", &format!("{header}1,A,t,1.00,5\n1,B,t,1.00,5\n"))], "duplicate id"),
        (
            vec!["--catalog".into(), csv("huge.csv", &format!("{header}1,A,t,1.00,9223372036854775000\n"))],
            "stock must be",
        ),
        (vec!["--catalog".into(), csv("price.csv", &format!("{header}1,A,t,99999999.00,5\n"))], "price must"),
        (vec!["--catalog".into(), csv("empty.csv", header)], "no books"),
        (vec!["--frontends".into(), "0".into()], "--frontends"),
        (vec!["--balancers".into(), "0".into()], "--balancers"),
        (vec!["--slots".into(), "0".into()], "--slots"),
        (vec!["--restock-amount".into(), "5000000".into()], "--restock-amount"),
        (vec!["--policy".into(), "nope".into()], "unknown policy"),
    ];
    for (i, (args, reason)) in cases.iter().enumerate() {
        let data = dir.path().join(format!("store-{i}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = up_fails(&data, &args);
        assert_ne!(code, 0, "quire up {args:?} succeeded");
        assert!(stderr.contains(reason), "quire up {args:?} did not say {reason:?}: {stderr}");
        assert!(!data.join("store.json").exists(), "quire up {args:?} laid out a store before refusing");
    }
}

#[test]
fn a_short_cluster_token_is_refused() {
    let out = Command::new(BIN)
        .args(["balancer", "--tier", "edge", "--listen", "127.0.0.1:0", "--token", "short"])
        .output()
        .expect("quire balancer");
    assert!(!out.status.success(), "a server started with a 5-byte token");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at least 16 bytes"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_keeps_failing_at_start_stops_the_store_with_its_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("store");
    // A store that ran once and was stopped...
    let up = Up::start(&data, &[]);
    let layout = wait_for("the store to be laid out", Duration::from_secs(30), || async {
        Layout::load(&data).ok().filter(|l| l.servers.iter().all(|s| s.pid.is_some()))
    })
    .await;
    let client = quire_common::client::http_client();
    let edge = layout.get("edge").expect("edge").url.clone();
    wait_for("the store to serve", Duration::from_secs(60), || {
        let (client, url) = (client.clone(), format!("{edge}/lookup/1"));
        async move { client.get(url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(up.0.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .expect("sigterm");
    let mut up = up;
    wait_for("quire up to stop", Duration::from_secs(20), || {
        let done = up.0.try_wait().ok().flatten().is_some();
        async move { done.then_some(()) }
    })
    .await;
    // ...whose catalog-2 log store is then damaged: it can never start again.
    std::fs::write(data.join("catalog-2").join("raft.db"), b"this is not a database, not any more").expect("damage");
    let (code, stderr) = up_fails(&data, &[]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("catalog-2 failed 3 times in a row") && stderr.contains("not a database"),
        "quire up did not give up on catalog-2 with its error: {stderr}"
    );
    // And nothing of the store is left running.
    let layout = Layout::load(&data).expect("layout");
    for server in &layout.servers {
        let pid = server.pid.expect("pid") as i32;
        wait_for(&format!("{} to be gone", server.name), Duration::from_secs(15), || async move {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err().then_some(())
        })
        .await;
    }
}

#[test]
fn two_servers_on_one_port_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = StoreOptions::new(dir.path().join("store"), BIN);
    opts.edge_port = 0;
    // A layout from before ports were kept distinct, where order-2 got catalog-2's port.
    let store = Store::launch(&opts).expect("launch");
    let port = |url: &str| url.rsplit(':').next().expect("port").to_string();
    let catalog_2 = store.url("catalog-2").expect("url");
    drop(store);
    let path = Layout::path(&opts.data_dir);
    let mut layout: Value = serde_json::from_slice(&std::fs::read(&path).expect("layout")).expect("json");
    for server in layout["servers"].as_array_mut().expect("servers") {
        if server["name"] == "order-2" {
            let url = server["url"].as_str().expect("url").to_string();
            server["url"] = json!(url.replace(&port(&url), &port(&catalog_2)));
        }
    }
    std::fs::write(&path, serde_json::to_vec(&layout).expect("json")).expect("write");
    let err = Store::launch(&opts).err().expect("a store with two servers on one port was launched");
    let message = format!("{err:#}");
    assert!(message.contains("order-2") && message.contains("catalog-2") && message.contains("share"), "{message}");
}

#[test]
fn serials_only_grow_across_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = StoreOptions::new(dir.path().join("store"), BIN);
    opts.edge_port = 0;
    let store = Store::launch(&opts).expect("launch");
    assert_eq!((store.next_serial().expect("serial"), store.next_serial().expect("serial")), (101, 102));
    drop(store);
    let store = Store::launch(&opts).expect("launch again");
    assert_eq!(store.next_serial().expect("serial"), 103, "a serial of the earlier run came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restock_past_the_stock_bound_is_refused_and_the_group_goes_on() {
    let t = TestStore::start(Options { books: vec![(1, MAX_STOCK - 5)], ..Options::default() }).await;
    let pids: Vec<Option<u32>> = t.store.names("catalog").iter().map(|n| t.store.pid(n)).collect();
    let balancer = t.url("catalog-balancer-1");
    let restock = |quantity: u32| {
        t.client
            .post(format!("{balancer}/books/1/restock"))
            .header(headers::TOKEN, &t.token)
            .json(&json!({ "quantity": quantity }))
            .send()
    };
    let r = restock(10).await.expect("restock");
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.expect("body")["error"], "invalid_quantity");
    // The refusal is an answer recorded in the log, not a storage error: every replica is
    // the same process, still serving, and the book is as it was.
    let r = restock(5).await.expect("restock");
    assert_eq!(r.status(), 200, "a restock within the bound");
    let buy = t.client.post(format!("{}/buy/1", t.edge)).send().await.expect("buy");
    assert_eq!(buy.status(), 200);
    let after: Vec<Option<u32>> = t.store.names("catalog").iter().map(|n| t.store.pid(n)).collect();
    assert_eq!(pids, after, "a catalog replica restarted");
    t.converge("catalog", &t.store.names("catalog")).await;
    let ledger: Value = t.admin_get("catalog-1", "/admin/ledger").await.expect("ledger");
    assert_eq!(ledger["books"][0]["stock"], MAX_STOCK - 1);
    assert_eq!(ledger["books"][0]["restocked"], 5);
}

/// A learner whose server is gone but which is still a member (its removal failed, or an
/// earlier run left it) is removed: `quire up` does it at start, the autoscaler every period.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_learner_left_in_the_membership_is_removed() {
    let t = TestStore::start(Options::default()).await;
    let name = t.store.add_replica("catalog", 9).expect("add replica");
    let leader = t.url(&t.leader("catalog").await);
    let learners = || async {
        let s = t.status(&t.leader("catalog").await).await?;
        s.details["learners"].as_array().map(|l| l.iter().filter_map(Value::as_u64).collect::<Vec<_>>())
    };
    wait_for("catalog-9 to join as a learner", Duration::from_secs(30), || async {
        let added = t
            .client
            .post(format!("{leader}/admin/learners"))
            .header(headers::TOKEN, &t.token)
            .json(&json!({ "id": 9, "url": t.url(&name) }))
            .send()
            .await
            .ok()?;
        added.status().is_success().then_some(())
    })
    .await;
    assert_eq!(learners().await, Some(vec![9]));
    // Its server goes, but the learner stays in the membership: a stray.
    t.store.remove(&name, Duration::from_secs(3)).expect("remove");
    quire::admin::remove_stray_learners(t.store.layout()).await;
    wait_for("the stray learner to be removed", Duration::from_secs(20), || async {
        learners().await.filter(|l| l.is_empty()).map(|_| ())
    })
    .await;
}
