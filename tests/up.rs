//! `quire up` and `quire status` as a user runs them: the store comes up, status lists every
//! server with the documented fields, a server killed with -9 is restarted with a new pid,
//! and SIGTERM stops every process of the store.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{wait_for, Up};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_quire");

fn status(dir: &std::path::Path) -> Option<Vec<Value>> {
    let out = Command::new(BIN).args(["status", "--json", "--data-dir"]).arg(dir).output().ok()?;
    let report: Value = serde_json::from_slice(&out.stdout).ok()?;
    report["servers"].as_array().cloned()
}

fn alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_status_restart_and_clean_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("store");
    let mut up = Up::start(&data, &[]);

    // Every server listed, healthy, with one leader per group.
    let rows = wait_for("every server to be ready", Duration::from_secs(60), || async {
        let rows = status(&data)?;
        rows.iter().all(|r| r["healthy"] == true && r["ready"] == true).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), 13, "{rows:#?}");
    for field in ["name", "tier", "url", "pid", "role", "leader", "term", "applied_index", "healthy"] {
        assert!(rows.iter().all(|r| r.get(field).is_some()), "a row lacks {field}");
    }
    for tier in ["catalog", "order"] {
        let leaders = rows.iter().filter(|r| r["tier"] == tier && r["role"] == "leader").count();
        assert_eq!(leaders, 1, "{tier} should have one leader");
    }
    let tiers: std::collections::BTreeSet<&str> = rows.iter().filter_map(|r| r["tier"].as_str()).collect();
    assert_eq!(
        tiers.into_iter().collect::<Vec<_>>(),
        ["catalog", "catalog-balancer", "edge", "frontend", "order", "order-balancer"]
    );
    let table = Command::new(BIN).args(["status", "--data-dir"]).arg(&data).output().expect("status");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("catalog-1") && table.contains("leader"), "{table}");
    assert!(std::fs::metadata(data.join("logs/catalog-1.log")).is_ok_and(|m| m.len() > 0), "no per-server log file");

    // kill -9 a replica: `up` starts it again, with a new pid, and it catches up.
    let victim = rows.iter().find(|r| r["name"] == "order-2").expect("order-2");
    let old_pid = victim["pid"].as_u64().expect("pid") as u32;
    kill(Pid::from_raw(old_pid as i32), Signal::SIGKILL).expect("kill");
    wait_for("order-2 to be restarted", Duration::from_secs(30), || async {
        let rows = status(&data)?;
        let row = rows.into_iter().find(|r| r["name"] == "order-2")?;
        (row["ready"] == true && row["pid"].as_u64()? as u32 != old_pid).then_some(())
    })
    .await;

    // SIGTERM stops every child.
    let pids: Vec<u32> =
        status(&data).expect("status").iter().filter_map(|r| r["pid"].as_u64()).map(|p| p as u32).collect();
    kill(Pid::from_raw(up.0.id() as i32), Signal::SIGTERM).expect("sigterm");
    let exit = wait_for("quire up to exit", Duration::from_secs(30), || {
        let done = up.0.try_wait().ok().flatten();
        async move { done }
    })
    .await;
    assert!(exit.success(), "quire up exited with {exit}");
    let left: Vec<u32> = pids.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
}
