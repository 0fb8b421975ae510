//! The autoscaler end to end: `quire up --profile cloud-sim` under a step of load from
//! `quire load` grows its tiers (new frontends, new catalog and order learners) and shrinks
//! them back once the load is gone, draining and removing the learners from their groups,
//! while every invariant of docs/ARCHITECTURE.md holds.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{wait_for, Probe, Shoppers, Up};
use quire::supervisor::Layout;
use quire_common::samples::FleetStatus;
use quire_common::status::ServerStatus;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_quire");

async fn get<T: serde::de::DeserializeOwned>(client: &reqwest::Client, url: &str) -> Option<T> {
    let r = client.get(url).timeout(Duration::from_secs(1)).send().await.ok()?;
    r.error_for_status().ok()?.json().await.ok()
}

/// Learners in the group, as its first voter sees the membership.
async fn learners(client: &reqwest::Client, voter: &str) -> Option<usize> {
    let status: ServerStatus = get(client, &format!("{voter}/status")).await?;
    status.details["learners"].as_array().map(Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_sim_scales_out_under_a_step_and_back_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("store");
    // The built-in books' topics, with stock no run can sell out (restocks are off), and an
    // eighth book for the patient workload alone: `quire load` shops for books 1 to 7, whose
    // histories the checker cannot see whole, so the workload's history is of book 8.
    let csv = dir.path().join("catalog.csv");
    let mut file = std::fs::File::create(&csv).expect("csv");
    writeln!(file, "id,title,topic,price,stock").expect("csv");
    for id in 1..=8u64 {
        let topic = if id % 2 == 1 { "distributed systems" } else { "graduate school" };
        writeln!(file, "{id},Book {id},{topic},10.00,100000").expect("csv");
    }
    drop(file);
    let csv_path = csv.to_string_lossy().to_string();
    let _up = Up::start(
        &data,
        &[
            "--profile",
            "cloud-sim",
            "--policy",
            "default",
            "--max-servers",
            "6",
            "--restock-amount",
            "0",
            "--catalog",
            &csv_path,
        ],
    );
    let client = quire_common::client::http_client();

    let layout = wait_for("the store's layout with its autoscaler", Duration::from_secs(30), || async {
        Layout::load(&data).ok().filter(|l| l.autoscaler.is_some())
    })
    .await;
    let url = |name: &str| layout.get(name).expect(name).url.clone();
    let (edge, fleet) = (url("edge"), format!("{}/status", layout.autoscaler.clone().expect("autoscaler")));
    let voters = |tier: &str| -> Vec<String> {
        layout.servers.iter().filter(|s| s.tier == tier).map(|s| s.url.clone()).collect()
    };
    // Servers boot for 5 s under cloud-sim.
    wait_for("the store to serve lookups", Duration::from_secs(60), || {
        let (client, edge) = (client.clone(), edge.clone());
        async move { get::<Value>(&client, &format!("{edge}/lookup/1")).await }
    })
    .await;

    // Patient shoppers whose acknowledged buys the invariants are checked against. The step
    // overloads the emulated cloud on purpose (most of its clients are shed or late until
    // the autoscaler catches up), so a read of theirs may go unanswered by its 5 s deadline
    // (504), as documented; every answer they get is checked, and no buy outcome is excused.
    let work = Shoppers { buyers: 1, readers: 1, tolerate_unavailable: true, ..Shoppers::new(&edge, vec![8]) }.start();
    // A step: quiet, 25 clients/s for 25 s, quiet again.
    let chart = dir.path().join("load.svg");
    let mut load = tokio::process::Command::new(BIN)
        .args(["load", "--target", &edge, "--profile", "c-2-5s,c-25-25s,c-1-10s", "--fleet", &fleet, "--json"])
        .args(["--items", "7"])
        .arg("--chart")
        .arg(&chart)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("quire load");
    let stdout = load.stdout.take().expect("stdout");
    let output = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut text = String::new();
        let mut stdout = stdout;
        stdout.read_to_string(&mut text).await.map(|_| text)
    });

    // While the load runs: the most servers each tier had, and the most learners each group had.
    let mut most: BTreeMap<String, u32> = BTreeMap::new();
    let (mut catalog_learners, mut order_learners) = (0, 0);
    let started = Instant::now();
    let exit = loop {
        if let Ok(Some(exit)) = load.try_wait() {
            break exit;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "quire load did not finish");
        if let Some(status) = get::<FleetStatus>(&client, &fleet).await {
            for (tier, f) in &status.tiers {
                let m = most.entry(tier.clone()).or_default();
                *m = (*m).max(f.running());
            }
        }
        catalog_learners = catalog_learners.max(learners(&client, &voters("catalog")[0]).await.unwrap_or(0));
        order_learners = order_learners.max(learners(&client, &voters("order")[0]).await.unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(exit.success(), "quire load failed: {exit}");
    let report: Value = serde_json::from_str(&output.await.expect("join").expect("load output")).expect("json report");
    println!("most servers per tier: {most:?}; learners: catalog {catalog_learners}, order {order_learners}");
    println!("load report: {report}");
    assert!(std::fs::metadata(&chart).is_ok_and(|m| m.len() > 0), "no chart written");

    // The step grew every tier: frontends past the two it started with, and learners joined
    // both groups as read replicas.
    assert!(most["frontend"] > 2, "frontends never scaled out: {most:?}");
    assert!(most["catalog"] > 3 && catalog_learners > 0, "no catalog learner joined: {most:?}");
    assert!(most["order"] > 3 && order_learners > 0, "no order learner joined: {most:?}");
    let clients = report["clients"].as_u64().expect("clients");
    let statuses: u64 = report["statuses"].as_object().expect("statuses").values().filter_map(Value::as_u64).sum();
    assert!(clients > 100 && statuses == clients, "every client has one status: {report}");

    // Once the load is gone, the tiers shrink back to their floors: learners drained and
    // removed from both groups, surplus frontends stopped.
    let floors = wait_for("the tiers to shrink back", Duration::from_secs(120), || async {
        let status = get::<FleetStatus>(&client, &fleet).await?;
        let at_floor = |tier: &str| status.tiers.get(tier).is_some_and(|f| f.running() == f.min);
        let no_learners =
            learners(&client, &voters("catalog")[0]).await? == 0 && learners(&client, &voters("order")[0]).await? == 0;
        (at_floor("catalog")
            && at_floor("order")
            && no_learners
            && status.tiers["frontend"].running() < most["frontend"])
            .then_some(status)
    })
    .await;
    println!("after the step: {floors:?}");
    let left = Layout::load(&data).expect("layout");
    assert_eq!(left.servers.iter().filter(|s| s.tier == "catalog").count(), 3, "removed learners left the layout");

    // Nothing acknowledged was lost, nothing sold twice, stock conserved, replicas converge.
    let seen = work.finish().await;
    println!("workload: {}", seen.summary());
    assert!(!seen.acked.is_empty(), "the workload bought nothing");
    let probe = Probe {
        client: client.clone(),
        token: layout.token.clone(),
        edge: edge.clone(),
        catalog: voters("catalog"),
        order: voters("order"),
        initial: (1..=8).map(|id| (id, 100_000)).collect(),
    };
    probe.converge("catalog", &voters("catalog")).await;
    probe.converge("order", &voters("order")).await;
    probe.check_invariants(&seen).await;
}
