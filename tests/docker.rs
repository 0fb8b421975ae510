//! Fault injection across containers: the compose stack of docker/compose.yaml, each
//! server in its own container on its own address, while shoppers use the published edge
//! port. `docker kill`, `docker pause`, `docker network disconnect` (a follower; a leader
//! cut off from its majority), and a replica replaced by a container with an empty volume.
//! After the faults heal: every invariant of docs/ARCHITECTURE.md, a linearizable history, and converged digests.
//!
//! `containers_scale_out_and_in`: the autoscaler's Docker backend, driven from the host by a
//! scripted policy, grows each tier by one container (a frontend that joins the edge, a
//! learner per group that joins its group and its balancers' rotation) and shrinks it back.
//!
//! Needs a Docker engine and the `quire:latest` image (docker/build.sh). Without them the
//! test says so and passes, unless QUIRE_REQUIRE_DOCKER=1, which makes it fail instead.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{wait_for, Probe, Workload};
use quire_autoscaler::docker::{Containers, UrlBy};
use quire_autoscaler::live::{Autoscaler, Config};
use quire_autoscaler::{Decision, Observation, Policy, TierKind};
use quire_common::capacity::Costs;
use quire_common::status::{Role, ServerStatus};

const COMPOSE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docker/compose.sh");

/// A compose project of its own; taken down, volumes and all, when dropped.
struct Stack {
    project: String,
    token: String,
    client: reqwest::Client,
    /// Holds the catalog CSV and the compose override that mounts it.
    dir: tempfile::TempDir,
}

/// Books of the test catalog: enough stock that buys succeed through every fault.
const BOOKS: u64 = 7;
const STOCK: i64 = 1_000_000;

fn ok(output: std::io::Result<Output>, what: &str) -> String {
    let output = output.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(output.status.success(), "{what} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

impl Stack {
    fn compose(&self, args: &[&str]) -> Command {
        let mut command = Command::new(COMPOSE);
        command
            .args(args)
            .env("QUIRE_PROJECT", &self.project)
            .env("QUIRE_TOKEN", &self.token)
            .env("QUIRE_EDGE_PORT", "0")
            .env("QUIRE_RESTOCK_AMOUNT", "0")
            .env("QUIRE_COMPOSE_OVERRIDE", self.dir.path().join("override.yaml"));
        command
    }

    fn run(&self, args: &[&str]) -> String {
        ok(self.compose(args).output(), &format!("compose {args:?}"))
    }

    fn docker(&self, args: &[&str]) -> String {
        ok(Command::new("docker").args(args).output(), &format!("docker {args:?}"))
    }

    fn container(&self, service: &str) -> String {
        self.run(&["ps", "-q", service])
    }

    fn url(&self, service: &str) -> String {
        let ip = self.docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &self.container(service),
        ]);
        format!("http://{ip}:7000")
    }

    fn edge(&self) -> String {
        let port = self.docker(&["port", &self.container("edge"), "7000/tcp"]);
        let port = port.lines().next().and_then(|l| l.rsplit(':').next()).expect("edge port").to_string();
        format!("http://127.0.0.1:{port}")
    }

    fn network(&self) -> String {
        format!("{}_default", self.project)
    }

    async fn status(&self, service: &str) -> Option<ServerStatus> {
        let url = self.url(service);
        self.client
            .get(format!("{url}/status"))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    async fn leader(&self, tier: &str) -> String {
        wait_for(&format!("a {tier} leader"), Duration::from_secs(30), || async {
            for i in 1..=3 {
                let name = format!("{tier}-{i}");
                if self.status(&name).await.is_some_and(|s| s.role == Role::Leader) {
                    return Some(name);
                }
            }
            None
        })
        .await
    }

    async fn follower(&self, tier: &str) -> String {
        let leader = self.leader(tier).await;
        (1..=3).map(|i| format!("{tier}-{i}")).find(|n| *n != leader).expect("a follower")
    }

    async fn all_ready(&self) {
        wait_for("every replica to be ready", Duration::from_secs(60), || async {
            for tier in ["catalog", "order"] {
                for i in 1..=3 {
                    self.status(&format!("{tier}-{i}")).await.filter(|s| s.ready)?;
                }
            }
            Some(())
        })
        .await;
    }

    fn probe(&self) -> Probe {
        let urls = |tier: &str| (1..=3).map(|i| self.url(&format!("{tier}-{i}"))).collect();
        Probe {
            client: self.client.clone(),
            token: self.token.clone(),
            edge: self.edge(),
            catalog: urls("catalog"),
            order: urls("order"),
            initial: (1..=BOOKS).map(|id| (id, STOCK)).collect(),
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(out) = self.compose(&["logs", "--tail", "30"]).output() {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        let _ = self.compose(&["down", "-v", "--remove-orphans"]).output();
    }
}

fn docker_ready() -> bool {
    let required = std::env::var("QUIRE_REQUIRE_DOCKER").is_ok_and(|v| v == "1");
    let engine = Command::new("docker").args(["info"]).output().is_ok_and(|o| o.status.success());
    let image = engine
        && Command::new("docker").args(["image", "inspect", "quire:latest"]).output().is_ok_and(|o| o.status.success());
    if !image {
        let why = if engine { "no quire:latest image (run docker/build.sh)" } else { "no Docker engine answers" };
        assert!(!required, "QUIRE_REQUIRE_DOCKER=1 but {why}");
        eprintln!("skipping the Docker fault suite: {why}");
    }
    image
}

/// Writes resume: waits for the next acknowledged buys and prints how long it took.
async fn writes_resume(w: &Workload, fault: &str, since: Instant) {
    w.progress(10, 3).await;
    eprintln!(
        "{fault} at +{:.1?}: writes succeed again {:.2?} after the fault",
        since.duration_since(w.began),
        since.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_across_containers() {
    if !docker_ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let csv: String = (1..=BOOKS).map(|id| format!("{id},Book {id},t,10.00,{STOCK}\n")).collect();
    std::fs::write(dir.path().join("books.csv"), format!("id,title,topic,price,stock\n{csv}")).expect("csv");
    let mount = |i: u64| {
        format!(
            "  catalog-{i}:\n    environment:\n      QUIRE_CATALOG: /books.csv\n    volumes:\n      - {}:/books.csv:ro\n",
            dir.path().join("books.csv").display()
        )
    };
    let services: String = (1..=3).map(mount).collect();
    std::fs::write(dir.path().join("override.yaml"), format!("version: \"3.8\"\nservices:\n{services}"))
        .expect("override");
    let stack = Stack {
        project: format!("quiretest{}", std::process::id()),
        token: format!("test-token-of-the-stack-{}", std::process::id()),
        client: quire_common::client::http_client(),
        dir,
    };
    stack.run(&["up", "-d"]);
    let edge = stack.edge();
    let url = format!("{edge}/lookup/1");
    wait_for("the stack to serve", Duration::from_secs(90), || {
        let (client, url) = (stack.client.clone(), url.clone());
        async move { client.get(url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;
    stack.all_ready().await;
    let w = Workload::start(&edge, (1..=BOOKS).collect(), 4, 4);
    w.progress(50, 10).await;

    // docker kill: a catalog follower, the order leader, a balancer, a frontend.
    for service in [stack.follower("catalog").await, stack.leader("order").await] {
        let at = Instant::now();
        stack.docker(&["kill", &stack.container(&service)]);
        writes_resume(&w, &format!("docker kill {service}"), at).await;
        stack.docker(&["start", &stack.container(&service)]);
        stack.all_ready().await;
    }
    for service in ["catalog-balancer-1", "frontend-1"] {
        let at = Instant::now();
        stack.docker(&["kill", &stack.container(service)]);
        writes_resume(&w, &format!("docker kill {service}"), at).await;
        stack.docker(&["start", &stack.container(service)]);
    }

    // docker pause / unpause the catalog leader.
    let leader = stack.leader("catalog").await;
    let at = Instant::now();
    stack.docker(&["pause", &stack.container(&leader)]);
    writes_resume(&w, &format!("docker pause {leader}"), at).await;
    stack.docker(&["unpause", &stack.container(&leader)]);
    stack.all_ready().await;

    // Partitions: a follower alone (minority), then the order leader cut off from its majority.
    for service in [stack.follower("catalog").await, stack.leader("order").await] {
        let container = stack.container(&service);
        let at = Instant::now();
        stack.docker(&["network", "disconnect", &stack.network(), &container]);
        writes_resume(&w, &format!("network disconnect {service}"), at).await;
        stack.docker(&["network", "connect", "--alias", &service, &stack.network(), &container]);
        stack.all_ready().await;
    }

    // A replica replaced by a new container with an empty volume.
    let victim = stack.follower("catalog").await;
    let at = Instant::now();
    stack.run(&["rm", "-sf", &victim]);
    stack.docker(&["volume", "rm", &format!("{}_{victim}", stack.project)]);
    stack.run(&["up", "-d", &victim]);
    stack.all_ready().await;
    eprintln!("{victim} replaced with an empty volume and caught up in {:.2?}", at.elapsed());

    w.progress(30, 10).await;
    let report = w.finish().await;
    eprintln!("workload: {}", report.summary());
    let probe = stack.probe();
    probe.converge("catalog", &probe.catalog).await;
    probe.converge("order", &probe.order).await;
    probe.check_invariants(&report).await;
}

/// Asks for the targets the test sets, whatever the samples say.
struct Scripted(std::sync::Arc<std::sync::Mutex<BTreeMap<TierKind, u32>>>);

impl Policy for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn decide(&mut self, obs: &Observation) -> Vec<Decision> {
        let targets = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        targets.into_iter().filter_map(|(tier, target)| obs.tier(tier)?.resize(target)).collect()
    }
}

/// An IPv4 subnet Docker has free now: it picks one for a throwaway network. Launched
/// containers get fixed addresses (the host reaches them by address), which Docker allows
/// only on a network created with an explicit subnet.
fn free_subnet(stack: &Stack) -> String {
    let probe = format!("{}_probe", stack.project);
    stack.docker(&["network", "create", &probe]);
    let subnet = stack.docker(&["network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}", &probe]);
    stack.docker(&["network", "rm", &probe]);
    subnet
}

/// The autoscaled containers of the stack: (name, tier, state).
fn autoscaled(stack: &Stack) -> Vec<(String, String, String)> {
    let out = stack.docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=com.docker.compose.project={}", stack.project),
        "--filter",
        "label=quire.autoscaled=true",
        "--format",
        "{{.Names}}\t{{.Label \"quire.tier\"}}\t{{.State}}",
    ]);
    out.lines()
        .filter_map(|l| {
            let mut f = l.split('\t').map(str::to_string);
            Some((f.next()?, f.next()?, f.next()?))
        })
        .collect()
}

async fn status_at(client: &reqwest::Client, url: &str) -> Option<ServerStatus> {
    let answer = client.get(format!("{url}/status")).timeout(Duration::from_millis(500)).send().await.ok()?;
    answer.error_for_status().ok()?.json().await.ok()
}

/// Learner ids of a group, as one of its voters sees the membership.
async fn learners(client: &reqwest::Client, voter: &str) -> Option<Vec<u64>> {
    let status = status_at(client, voter).await?;
    serde_json::from_value(status.details.get("learners")?.clone()).ok()
}

/// The backends a balancer knows: (url, in rotation).
async fn backends(client: &reqwest::Client, balancer: &str) -> Option<Vec<(String, bool)>> {
    let status = status_at(client, balancer).await?;
    let list = status.details.get("backends")?.as_array()?.iter();
    Some(list.filter_map(|b| Some((b["url"].as_str()?.to_string(), b["in_rotation"].as_bool()?))).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containers_scale_out_and_in() {
    if !docker_ready() {
        return;
    }
    let stack = Stack {
        project: format!("quirescale{}", std::process::id()),
        token: format!("test-token-of-the-stack-{}", std::process::id()),
        client: quire_common::client::http_client(),
        dir: tempfile::tempdir().expect("tempdir"),
    };
    // The subnet is free when probed; if another stack takes it meanwhile, probe again.
    let mut attempts = 0;
    loop {
        let override_yaml = format!(
            "version: \"3.8\"\nnetworks:\n  default:\n    ipam:\n      config:\n        - subnet: {}\n",
            free_subnet(&stack)
        );
        std::fs::write(stack.dir.path().join("override.yaml"), override_yaml).expect("override");
        let up = stack.compose(&["up", "-d"]).output().expect("compose up");
        if up.status.success() {
            break;
        }
        attempts += 1;
        assert!(attempts < 3, "compose up failed: {}", String::from_utf8_lossy(&up.stderr));
        let _ = stack.compose(&["down", "-v", "--remove-orphans"]).output();
    }
    let edge = stack.edge();
    wait_for("the stack to serve", Duration::from_secs(90), || {
        let (client, url) = (stack.client.clone(), format!("{edge}/lookup/1"));
        async move { client.get(url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;
    stack.all_ready().await;

    let began = Instant::now();
    let edge_balancer = stack.url("edge");
    let balancers = |tier: &str| (1..=2).map(|i| stack.url(&format!("{tier}-balancer-{i}"))).collect::<Vec<_>>();
    let (catalog_balancers, order_balancers) = (balancers("catalog"), balancers("order"));
    let voter = |tier: &str| stack.url(&format!("{tier}-1"));
    let (catalog_voter, order_voter) = (voter("catalog"), voter("order"));
    let targets = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::from([
        (TierKind::Frontend, 3),
        (TierKind::Catalog, 4),
        (TierKind::Order, 4),
    ])));
    let config = Config {
        policy: Box::new(Scripted(targets.clone())),
        costs: Costs::CLOUD_SIM,
        balancers: BTreeMap::from([
            (TierKind::Frontend, vec![edge_balancer.clone()]),
            (TierKind::Catalog, catalog_balancers.clone()),
            (TierKind::Order, order_balancers.clone()),
        ]),
        token: stack.token.clone(),
        bounds: BTreeMap::from([(TierKind::Frontend, (1, 6)), (TierKind::Catalog, (3, 6)), (TierKind::Order, (3, 6))]),
        period: Duration::from_millis(500),
        drain_grace: Duration::from_secs(1),
    };
    let backend = Containers::connect(&stack.project, UrlBy::Ip).await.expect("Docker engine");
    let autoscaler = Autoscaler::new(backend, config).await.expect("autoscaler");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(autoscaler.clone().run(async move {
        let _ = stopped.await;
    }));

    // Scale out: one more frontend and one learner per group, each in its own container.
    let launched = wait_for("three running autoscaled containers", Duration::from_secs(60), || async {
        let found = autoscaled(&stack);
        (found.len() == 3 && found.iter().all(|(_, _, state)| state == "running")).then_some(found)
    })
    .await;
    let mut tiers: Vec<&str> = launched.iter().map(|(_, tier, _)| tier.as_str()).collect();
    tiers.sort();
    assert_eq!(tiers, ["catalog", "frontend", "order"]);
    let url_of = |name: &str| {
        let ip = stack.docker(&["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name]);
        format!("http://{ip}:7000")
    };
    let new: BTreeMap<String, String> = launched.iter().map(|(name, tier, _)| (tier.clone(), url_of(name))).collect();
    let node_id = |name: &str| -> u64 {
        stack.docker(&["inspect", "-f", "{{index .Config.Labels \"quire.node-id\"}}", name]).parse().expect("node id")
    };
    let ids: BTreeMap<String, u64> = launched
        .iter()
        .filter(|(_, tier, _)| tier != "frontend")
        .map(|(n, tier, _)| (tier.clone(), node_id(n)))
        .collect();
    let client = &stack.client;
    for (tier, voter, balancers) in
        [("catalog", &catalog_voter, &catalog_balancers), ("order", &order_voter, &order_balancers)]
    {
        let (id, url) = (ids[tier], &new[tier]);
        wait_for(&format!("{tier} learner {id} in its group"), Duration::from_secs(30), || async {
            learners(client, voter).await.filter(|l| l.contains(&id))
        })
        .await;
        wait_for(&format!("{tier} learner {id} ready"), Duration::from_secs(30), || async {
            status_at(client, url).await.filter(|s| s.ready)
        })
        .await;
        for balancer in balancers {
            wait_for(&format!("{tier} learner {id} in rotation at {balancer}"), Duration::from_secs(30), || async {
                backends(client, balancer).await?.contains(&(url.clone(), true)).then_some(())
            })
            .await;
        }
    }
    let frontend = &new["frontend"];
    wait_for("the new frontend in the edge's rotation", Duration::from_secs(30), || async {
        backends(client, &edge_balancer).await?.contains(&(frontend.clone(), true)).then_some(())
    })
    .await;
    wait_for("the autoscaler to count every new server ready", Duration::from_secs(30), || async {
        let fleet = autoscaler.status();
        let ready = |tier: &str| fleet.tiers.get(tier).map(|t| (t.ready, t.booting));
        (ready("frontend") == Some((3, 0)) && ready("catalog") == Some((4, 0)) && ready("order") == Some((4, 0)))
            .then_some(())
    })
    .await;
    let served = client.get(format!("{edge}/lookup/1")).send().await.expect("lookup through the edge");
    assert!(served.status().is_success(), "the grown store serves: {}", served.status());
    eprintln!("scaled out to 3 frontends, 4 catalog and 4 order replicas in {:.1?}", began.elapsed());

    // Scale in to the floors: the launched servers drain, leave their groups, and go.
    let scale_in = Instant::now();
    *targets.lock().expect("targets") =
        BTreeMap::from([(TierKind::Frontend, 2), (TierKind::Catalog, 3), (TierKind::Order, 3)]);
    wait_for("the autoscaled containers to be removed", Duration::from_secs(60), || async {
        autoscaled(&stack).is_empty().then_some(())
    })
    .await;
    for (tier, voter, balancers) in
        [("catalog", &catalog_voter, &catalog_balancers), ("order", &order_voter, &order_balancers)]
    {
        let (id, url) = (ids[tier], &new[tier]);
        wait_for(&format!("{tier} learner {id} out of its group"), Duration::from_secs(30), || async {
            learners(client, voter).await.filter(|l| !l.contains(&id))
        })
        .await;
        for balancer in balancers {
            wait_for(&format!("{balancer} to forget {url}"), Duration::from_secs(30), || async {
                backends(client, balancer).await.filter(|b| !b.iter().any(|(u, _)| u == url))
            })
            .await;
        }
    }
    wait_for("the edge to forget the frontend", Duration::from_secs(30), || async {
        backends(client, &edge_balancer).await.filter(|b| !b.iter().any(|(u, _)| u == frontend))
    })
    .await;
    // The fleet's counts are those of the last period.
    wait_for("the autoscaler to count the floors, nothing draining", Duration::from_secs(10), || async {
        let fleet = autoscaler.status();
        let counts = |tier: &str| fleet.tiers.get(tier).map(|t| (t.ready, t.booting, t.draining));
        [("frontend", 2), ("catalog", 3), ("order", 3)]
            .iter()
            .all(|(tier, n)| counts(tier) == Some((*n, 0, 0)))
            .then_some(())
    })
    .await;
    let served = client.get(format!("{edge}/lookup/1")).send().await.expect("lookup through the edge");
    assert!(served.status().is_success(), "the shrunk store serves: {}", served.status());
    eprintln!("scaled back in within {:.1?}", scale_in.elapsed());
    let _ = stop.send(());
    running.await.expect("the autoscaler's loop");
}
