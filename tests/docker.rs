//! Fault injection across containers: the compose stack of docker/compose.yaml, each
//! server in its own container on its own address, while shoppers use the published edge
//! port. `docker kill`, `docker pause`, `docker network disconnect` (a follower; a leader
//! cut off from its majority), and a replica replaced by a container with an empty volume.
//! After the faults heal: every invariant of ARCHITECTURE.md §4, and converged digests.
//!
//! Needs a Docker engine and the `quire:latest` image (docker/build.sh). Without them the
//! test says so and passes, unless QUIRE_REQUIRE_DOCKER=1, which makes it fail instead.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{wait_for, Probe, Workload};
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
        token: format!("token-{}", std::process::id()),
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
