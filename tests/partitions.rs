//! Network partitions on loopback, without Docker: each test runs itself again inside a
//! network namespace of its own (`unshare --net`), where every server of the store has an
//! address of its own (127.0.0.10 and up, outgoing connections included) and nftables rules
//! on those addresses cut servers off from each other. Shoppers record their history
//! throughout; after each partition heals, the history must be linearizable, every
//! invariant hold and the replicas converge.
//!
//! Needs `unshare` (util-linux), `ip` (iproute2) and `nft` (nftables), and the right to make
//! a network namespace (root here). Skipped without them unless `QUIRE_REQUIRE_NETNS=1`,
//! as in CI.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, Options, TestStore, Workload};
use quire_common::status::Role;

/// Set in the test process that runs inside the namespace: the test it runs.
const INSIDE: &str = "QUIRE_IN_NETNS";

/// Runs `test` inside a network namespace of its own (this same test binary, started again
/// there), or, when already inside, returns true so the caller runs the body.
fn inside_own_network(test: &str) -> bool {
    if std::env::var(INSIDE).is_ok_and(|t| t == test) {
        return true;
    }
    let required = std::env::var("QUIRE_REQUIRE_NETNS").is_ok_and(|v| v == "1");
    let available = ["unshare", "ip", "nft"].iter().all(|tool| which(tool))
        && Command::new("unshare").args(["--net", "true"]).status().is_ok_and(|s| s.success());
    if !available {
        assert!(!required, "network namespaces (unshare, ip, nft) are needed and missing");
        eprintln!("skipped: no network namespaces here (unshare --net, ip, nft)");
        return false;
    }
    // One store at a time, as everywhere in the suite: each namespace runs a whole store.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().expect("test binary");
    let started = Instant::now();
    let output = Command::new("unshare")
        .args(["--net", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE, test)
        .stdin(Stdio::null())
        .output()
        .expect("unshare");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    eprintln!("{}{}", text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "{test} failed in its network namespace (after {:?})", started.elapsed());
    false
}

fn which(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// The namespace's firewall: drops what goes between two sets of addresses.
struct Firewall;

impl Firewall {
    fn new() -> Firewall {
        nft("add table inet quire\nadd chain inet quire out { type filter hook output priority 0; policy accept; }");
        Firewall
    }

    /// Cuts every address of `a` off from every address of `b`, both ways.
    fn cut(&self, a: &[String], b: &[String]) {
        let set = |hosts: &[String]| format!("{{ {} }}", hosts.join(", "));
        nft(&format!(
            "add rule inet quire out ip saddr {a} ip daddr {b} drop\nadd rule inet quire out ip saddr {b} ip daddr {a} drop",
            a = set(a),
            b = set(b)
        ));
    }

    fn heal(&self) {
        nft("flush chain inet quire out");
    }
}

fn nft(script: &str) {
    use std::io::Write;
    let mut child = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().expect("nft");
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("nft script");
    assert!(child.wait().expect("nft").success(), "nft refused: {script}");
}

/// Every partition test's start: a store with an address per server, the namespace's
/// firewall, and shoppers through the edge and both frontends (a partition may leave reads
/// unanswered) that have done some work.
async fn partitioned() -> (TestStore, Firewall, Workload) {
    let t = TestStore::start(Options { distinct_hosts: true, ..Options::default() }).await;
    let wall = Firewall::new();
    let w = common::Shoppers { tolerate_unavailable: true, ..t.shoppers(4, 4) }.start();
    w.progress(50, 10).await;
    (t, wall, w)
}

/// The leader of `tier` loses its majority: the others elect a new one and writes go on;
/// the old leader, still running, can neither commit nor confirm a read or a lease. Healed,
/// it rejoins as a follower.
async fn leader_cut_off_from_its_majority(tier: &str) {
    let (t, wall, w) = partitioned().await;
    let leader = t.leader(tier).await;
    let others = t.followers(tier).await;
    let cut = Instant::now();
    wall.cut(&[t.host(&leader)], &others.iter().map(|n| t.host(n)).collect::<Vec<_>>());
    let new_leader = wait_for(&format!("a new {tier} leader"), Duration::from_secs(20), || async {
        for n in &others {
            if t.status(n).await.is_some_and(|s| s.role == Role::Leader) {
                return Some(n.clone());
            }
        }
        None
    })
    .await;
    eprintln!("{leader} cut off from its majority: {new_leader} leads after {:?}", cut.elapsed());
    w.progress(30, 10).await;
    eprintln!("writes went on during the partition ({:?} after the cut)", cut.elapsed());
    wall.heal();
    t.rejoins_as_follower(&leader).await;
    t.finish(w).await;
}

#[test]
fn a_catalog_leader_cut_off_from_its_majority() {
    if inside_own_network("a_catalog_leader_cut_off_from_its_majority") {
        runtime().block_on(leader_cut_off_from_its_majority("catalog"));
    }
}

#[test]
fn an_order_leader_cut_off_from_its_majority() {
    if inside_own_network("an_order_leader_cut_off_from_its_majority") {
        runtime().block_on(leader_cut_off_from_its_majority("order"));
    }
}

/// A frontend loses the catalog (balancers and replicas): its lease lapses and it serves
/// nothing from its cache; the catalog leader waits it out once and leases it no longer
/// until its pushes get through again. Healed, its cache serves again.
#[test]
fn a_frontend_cut_off_from_the_catalog() {
    if !inside_own_network("a_frontend_cut_off_from_the_catalog") {
        return;
    }
    runtime().block_on(async {
        let (t, wall, w) = partitioned().await;
        let frontend = "frontend-1";
        let lease = |valid: bool| {
            let t = &t;
            async move {
                let s = t.status(frontend).await?;
                (s.details["lease_valid"].as_bool() == Some(valid)).then_some(())
            }
        };
        let catalog: Vec<String> =
            ["catalog-balancer", "catalog"].iter().flat_map(|tier| t.store.names(tier)).map(|n| t.host(&n)).collect();
        let cut = Instant::now();
        wall.cut(&[t.host(frontend)], &catalog);
        wait_for("frontend-1's lease to lapse", Duration::from_secs(10), || lease(false)).await;
        eprintln!("{frontend} cut off from the catalog: lease lapsed after {:?}", cut.elapsed());
        // Its lookups wait out their deadlines (slow, not wrong); buys do not need the catalog
        // from it and go on.
        w.progress(20, 10).await;
        eprintln!("buys went on through {frontend} for {:?}", cut.elapsed());
        wall.heal();
        wait_for("frontend-1's lease to run again", Duration::from_secs(30), || lease(true)).await;
        w.progress(100, 5).await;
        t.finish(w).await;
    });
}

/// The catalog leader loses everyone (replicas, balancers, frontends) while it still
/// believes it leads: the frontends' leases from it run out, the others elect a new
/// leader, which waits those leases out before its first write.
#[test]
fn a_catalog_leader_cut_off_from_everyone() {
    if !inside_own_network("a_catalog_leader_cut_off_from_everyone") {
        return;
    }
    runtime().block_on(async {
        let (t, wall, w) = partitioned().await;
        let leader = t.leader("catalog").await;
        let everyone: Vec<String> =
            t.store.layout().servers.iter().filter(|s| s.name != leader).map(|s| t.host(&s.name)).collect();
        let cut = Instant::now();
        wall.cut(&[t.host(&leader)], &everyone);
        w.progress(30, 10).await;
        eprintln!("{leader} cut off from everyone: writes went on {:?} after the cut", cut.elapsed());
        wall.heal();
        t.rejoins_as_follower(&leader).await;
        t.finish(w).await;
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("runtime")
}
