//! In-process cluster tests of the Raft layer: real SQLite files, real HTTP on loopback,
//! a tiny key-value machine. Election, replication, failover, snapshot install to a new
//! member, membership change, and restart from disk.

#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quire_common::http::Token;
use quire_common::Deadline;
use quire_raft::{Machine, NodeId, Replica, ReplicaConfig, Tuning, WriteError};
use serde_json::Value;

struct Kv;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum Put {
    /// One key.
    One { k: String, v: String },
    /// `n` keys `prefix0..` at once, each with a 64-character value.
    Fill { n: u64, prefix: String },
}

/// The index the put was applied at, and its key (of a single put).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Done {
    index: u64,
    k: Option<String>,
}

impl quire_raft::Command for Put {
    type Answer = Done;
}

impl Machine for Kv {
    type Command = Put;

    fn schema(&self) -> &'static str {
        // Values are short: a longer one breaks the constraint, on every replica alike.
        "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL CHECK (length(v) <= 64), version INTEGER NOT NULL);"
    }
    fn tables(&self) -> &'static [&'static str] {
        &["kv"]
    }
    fn apply(&self, tx: &rusqlite::Transaction<'_>, index: u64, command: Put) -> rusqlite::Result<Done> {
        match command {
            Put::Fill { n, prefix } => {
                tx.execute(
                    "WITH RECURSIVE i(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM i WHERE x + 1 < ?1)
                     INSERT OR REPLACE INTO kv (k, v, version) SELECT ?2 || x, printf('%064d', x), ?3 FROM i",
                    rusqlite::params![n as i64, prefix, index],
                )?;
                Ok(Done { index, k: None })
            }
            Put::One { k, v } => {
                tx.execute(
                    "INSERT OR REPLACE INTO kv (k, v, version) VALUES (?1, ?2, ?3)",
                    rusqlite::params![k, v, index],
                )?;
                Ok(Done { index, k: Some(k) })
            }
        }
    }
}

fn put_of(k: &str, v: &str) -> Put {
    Put::One { k: k.into(), v: v.into() }
}

const TOKEN: &str = "test-token-of-the-cluster";

struct Node {
    replica: Arc<Replica>,
    server: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
    url: String,
    dir: std::path::PathBuf,
}

fn tuning() -> Tuning {
    Tuning {
        heartbeat: Duration::from_millis(50),
        election_min: Duration::from_millis(300),
        election_max: Duration::from_millis(600),
        snapshot_every: 20,
    }
}

async fn start_node(id: NodeId, dir: std::path::PathBuf, listener: Option<tokio::net::TcpListener>) -> Node {
    start_member(id, dir, listener, vec![]).await
}

/// Starts seat `id` (asking `peers` who it is if its directory is empty).
async fn start_member(
    id: NodeId,
    dir: std::path::PathBuf,
    listener: Option<tokio::net::TcpListener>,
    peers: Vec<String>,
) -> Node {
    let listener = match listener {
        Some(l) => l,
        None => tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = ReplicaConfig {
        seat: id,
        group: "kv".into(),
        advertise: url.clone(),
        dir: dir.clone(),
        token: Token::new(TOKEN).unwrap(),
        tuning: tuning(),
        init: None,
        peers,
        first_start: false,
        capacity: None,
    };
    let replica = Replica::start(config, Kv).await.unwrap();
    if !replica.replaces().is_empty() {
        tokio::spawn(replica.clone().take_seat());
    }
    let app = quire_raft::http::router(replica.clone(), Token::new(TOKEN).unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
    });
    Node { replica, server, stop, url, dir }
}

impl Node {
    /// Stops serving (closing every connection, as a dead process would) and stops Raft.
    async fn kill(self) -> (NodeId, String, std::path::PathBuf) {
        let _ = self.stop.send(());
        self.replica.shutdown().await;
        let _ = self.server.await;
        (self.replica.id, self.url, self.dir)
    }
}

async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn leader_of(nodes: &[&Node]) -> NodeId {
    wait_for("a leader", Duration::from_secs(10), || nodes.iter().find(|n| n.replica.is_leader()).map(|n| n.replica.id))
        .await
}

/// Writes through whichever node leads, following leader changes as a client would.
async fn put(nodes: &[Node], k: &str, v: &str) -> u64 {
    propose(nodes, put_of(k, v)).await
}

/// Proposes `command` through whichever node leads, following leader changes.
async fn propose(nodes: &[Node], command: Put) -> u64 {
    let start = Instant::now();
    loop {
        if let Some(leader) = nodes.iter().find(|n| n.replica.is_leader()) {
            match leader.replica.write(&command, Deadline::after(Duration::from_secs(5))).await {
                Ok(applied) => return applied.index,
                Err(e) => assert!(start.elapsed() < Duration::from_secs(20), "write of {command:?} failed: {e}"),
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no leader took the write of {command:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get(node: &Node, k: &'static str) -> Option<String> {
    node.replica.read_barrier(Deadline::after(Duration::from_secs(5))).await.unwrap();
    node.replica
        .reads
        .query(move |c| {
            use rusqlite::OptionalExtension;
            c.query_row("SELECT v FROM kv WHERE k = ?1", [k], |r| r.get(0)).optional()
        })
        .await
        .unwrap()
}

/// Adds `fresh` (started from nothing) as a learner through whichever node leads (`nodes[l]`
/// if none is seen: a loaded machine may change leaders meanwhile), and waits until it
/// has installed a snapshot from the leader, the only way it can catch up.
async fn joins_from_a_snapshot(nodes: &[Node], l: usize, fresh: &Node) {
    let id = fresh.replica.id;
    let start = Instant::now();
    while let Err(e) =
        nodes.iter().find(|n| n.replica.is_leader()).unwrap_or(&nodes[l]).replica.add_learner(id, &fresh.url).await
    {
        assert!(start.elapsed() < Duration::from_secs(20), "node {id} was never added: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for(&format!("node {id} to install a snapshot from the leader"), Duration::from_secs(20), || {
        (fresh.replica.installed_snapshot.load(std::sync::atomic::Ordering::Acquire) > 0).then_some(())
    })
    .await;
}

async fn digest(node: &Node) -> (u64, String) {
    node.replica.reads.digest(&["kv"]).await.unwrap()
}

async fn three_nodes(root: &std::path::Path) -> Vec<Node> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start_node(id, root.join(format!("n{id}")), None).await);
    }
    let members: BTreeMap<NodeId, String> = nodes.iter().map(|n| (n.replica.id, n.url.clone())).collect();
    for n in &nodes {
        n.replica.initialize(&members).await.unwrap();
    }
    nodes
}

async fn converge(nodes: &[&Node]) {
    let start = Instant::now();
    loop {
        let mut digests = Vec::new();
        for n in nodes {
            digests.push(digest(n).await);
        }
        if digests.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "replicas did not converge: {digests:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn elects_replicates_and_fails_over() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(root.path()).await;
    for i in 0..10 {
        put(&nodes, &format!("k{i}"), "v1").await;
    }
    // Linearizable reads on followers see the acknowledged writes.
    for n in &nodes {
        assert_eq!(get(n, "k9").await.as_deref(), Some("v1"));
    }
    // A follower refuses writes and names the leader (asked again if leadership moved
    // meanwhile, as it may on a loaded machine).
    let start = Instant::now();
    let (leader, l) = loop {
        let leader = leader_of(&nodes.iter().collect::<Vec<_>>()).await;
        let l = nodes.iter().position(|n| n.replica.id == leader).unwrap();
        let f = (l + 1) % 3;
        let answer = nodes[f].replica.write(&put_of("x", "y"), Deadline::after(Duration::from_secs(2))).await;
        if let Err(err) = answer {
            assert_eq!(err.code, "not_leader");
            if err.leader.as_deref() == Some(nodes[l].url.as_str()) {
                break (leader, l);
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no follower named the leader");
    };

    // Kill the leader: a new one is elected and the data is still there.
    let (old_id, old_url, old_dir) = nodes.remove(l).kill().await;
    let survivors: Vec<&Node> = nodes.iter().collect();
    let new_leader = leader_of(&survivors).await;
    assert_ne!(new_leader, leader);
    put(&nodes, "after", "failover").await;
    for n in &nodes {
        assert_eq!(get(n, "k3").await.as_deref(), Some("v1"));
        assert_eq!(get(n, "after").await.as_deref(), Some("failover"));
    }

    // Restart the old leader from its files: it catches up and converges.
    let listener = tokio::net::TcpListener::bind(old_url.trim_start_matches("http://")).await.unwrap();
    let back = start_node(old_id, old_dir, Some(listener)).await;
    nodes.push(back);
    converge(&nodes.iter().collect::<Vec<_>>()).await;
    let back = nodes.last().unwrap();
    assert_eq!(get(back, "after").await.as_deref(), Some("failover"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_member_gets_snapshot_and_replaces_a_voter() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(root.path()).await;
    let leader = leader_of(&nodes.iter().collect::<Vec<_>>()).await;
    let l = nodes.iter().position(|n| n.replica.id == leader).unwrap();
    // Enough writes to build snapshots and purge the log behind them.
    for i in 0..100 {
        put(&nodes, &format!("k{i}"), &format!("v{i}")).await;
    }
    wait_for("the leader to purge its log", Duration::from_secs(10), || {
        nodes[l].replica.metrics().purged.filter(|p| p.index > 10).map(|_| ())
    })
    .await;

    // Take a follower down for good and replace it with an empty node 4.
    let dead = (l + 1) % 3;
    let dead_id = nodes[dead].replica.id;
    nodes.remove(dead).kill().await;
    let l = nodes.iter().position(|n| n.replica.id == leader).unwrap();

    let fresh = start_node(4, root.path().join("n4"), None).await;
    joins_from_a_snapshot(&nodes, l, &fresh).await;
    let l = nodes.iter().position(|n| n.replica.is_leader()).unwrap_or(l);
    let voters = nodes.iter().map(|n| n.replica.id).chain([4]).collect();
    nodes[l].replica.change_voters(voters, false).await.unwrap();
    nodes.push(fresh);

    let m = nodes[l].replica.metrics();
    let voter_ids: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
    assert!(voter_ids.contains(&4) && !voter_ids.contains(&dead_id), "voters: {voter_ids:?}");
    put(&nodes, "final", "yes").await;
    converge(&nodes.iter().collect::<Vec<_>>()).await;
    assert_eq!(get(nodes.last().unwrap(), "k42").await.as_deref(), Some("v42"));
    assert_eq!(get(nodes.last().unwrap(), "final").await.as_deref(), Some("yes"));
}

/// A snapshot several times the chunk size (1 MiB) reaches a new learner a chunk at a
/// time, from the leader's file to the learner's, and the learner's state is the group's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_of_many_chunks_reaches_a_new_learner() {
    let root = tempfile::tempdir().unwrap();
    let nodes = three_nodes(root.path()).await;
    let leader = leader_of(&nodes.iter().collect::<Vec<_>>()).await;
    let l = nodes.iter().position(|n| n.replica.id == leader).unwrap();
    // About 5 MiB of state: 40 000 keys of 64-character values.
    for batch in 0..4 {
        propose(&nodes, Put::Fill { n: 10_000, prefix: format!("big{batch}-") }).await;
    }
    for i in 0..60 {
        put(&nodes, &format!("k{i}"), "v").await;
    }
    wait_for("the leader to purge its log", Duration::from_secs(20), || {
        nodes[l].replica.metrics().purged.filter(|p| p.index > 10).map(|_| ())
    })
    .await;
    let fresh = start_node(4, root.path().join("n4"), None).await;
    joins_from_a_snapshot(&nodes, l, &fresh).await;
    let size = std::fs::metadata(fresh.dir.join("snapshot.db")).map(|m| m.len()).unwrap_or(0);
    assert!(size > 3 * 1024 * 1024, "the snapshot node 4 received is {size} bytes: more than three chunks expected");
    let mut all: Vec<&Node> = nodes.iter().collect();
    all.push(&fresh);
    converge(&all).await;
    assert_eq!(get(&fresh, "big3-9999").await, Some(format!("{:064}", 9999)));
}

/// A command that breaks a constraint fails alike on every replica: it is applied as a
/// no-op answered `rejected`, and the group goes on, rather than every replica's Raft core
/// stopping on it (and again after each restart, as it is applied anew).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_that_cannot_apply_is_rejected_and_the_group_goes_on() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(root.path()).await;
    put(&nodes, "a", "1").await;
    let leader = leader_of(&nodes.iter().collect::<Vec<_>>()).await;
    let l = nodes.iter().position(|n| n.replica.id == leader).unwrap();
    let poison = put_of("a", &"x".repeat(100));
    match nodes[l].replica.propose(&poison).await {
        Err(WriteError::Rejected(reason)) => assert!(reason.contains("CHECK"), "{reason}"),
        other => panic!("a command breaking a constraint was not rejected: {other:?}"),
    }
    // A command of another type is refused before it is proposed: its bytes might well
    // decode as some command of this machine's.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Stray(u32);
    impl quire_raft::Command for Stray {
        type Answer = Done;
    }
    let before = nodes[l].replica.metrics().last_log_index;
    match nodes[l].replica.propose(&Stray(0)).await {
        Err(WriteError::Codec(reason)) => assert!(reason.contains("Stray"), "{reason}"),
        other => panic!("another type's command was not refused: {other:?}"),
    }
    assert_eq!(nodes[l].replica.metrics().last_log_index, before, "the stray command was proposed");
    put(&nodes, "b", "2").await;
    converge(&nodes.iter().collect::<Vec<_>>()).await;
    for n in &nodes {
        assert!(n.replica.metrics().running_state.is_ok(), "node {} stopped", n.replica.id);
        assert_eq!(get(n, "a").await.as_deref(), Some("1"), "the rejected command changed nothing");
    }
    // A node restarted from its files applies the same log again, and again goes on.
    let f = (l + 1) % 3;
    let (id, url, dir) = nodes.remove(f).kill().await;
    let listener = tokio::net::TcpListener::bind(url.trim_start_matches("http://")).await.unwrap();
    nodes.push(start_node(id, dir, Some(listener)).await);
    put(&nodes, "c", "3").await;
    converge(&nodes.iter().collect::<Vec<_>>()).await;
    assert_eq!(get(nodes.last().unwrap(), "c").await.as_deref(), Some("3"));
}

/// Group commit: writes proposed at once share log entries, yet each gets its own answer,
/// a rejected one and a stale-term one among them fail alone, and the replicas agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_proposed_together_share_entries_and_are_answered_one_by_one() {
    let root = tempfile::tempdir().unwrap();
    let nodes = three_nodes(root.path()).await;
    put(&nodes, "warm", "up").await;
    let leader = leader_of(&nodes.iter().collect::<Vec<_>>()).await;
    let replica = nodes.iter().find(|n| n.replica.id == leader).unwrap().replica.clone();
    let term = replica.leading_term().unwrap();
    let before = replica.metrics().last_log_index.unwrap();
    let writes = (0..200).map(|i| {
        let replica = replica.clone();
        tokio::spawn(async move {
            match i {
                // Breaks the value's CHECK constraint: rolled back alone.
                50 => replica.propose(&put_of("k50", &"x".repeat(100))).await,
                // Bound to a term this leader never led.
                100 => replica.propose_in_term(term + 1, &put_of("k100", "stale")).await,
                _ => replica.propose(&put_of(&format!("k{i}"), &format!("v{i}"))).await,
            }
        })
    });
    let mut indexes = std::collections::BTreeSet::new();
    for (i, write) in writes.collect::<Vec<_>>().into_iter().enumerate() {
        match (i, write.await.unwrap()) {
            (50, Err(WriteError::Rejected(_))) | (100, Err(WriteError::StaleTerm)) => {}
            (50 | 100, other) => panic!("write {i} was answered {other:?}"),
            (_, Ok(applied)) => {
                let own = Done { index: applied.index, k: Some(format!("k{i}")) };
                assert_eq!(applied.answer, own, "write {i} got another's answer");
                indexes.insert(applied.index);
            }
            (_, Err(e)) => panic!("write {i} failed: {e}"),
        }
    }
    let entries = replica.metrics().last_log_index.unwrap() - before;
    assert!(entries < 100, "200 writes at once took {entries} entries: not batched");
    assert!(indexes.iter().all(|&i| i > before && i <= before + entries), "answers name entries of these writes");
    converge(&nodes.iter().collect::<Vec<_>>()).await;
    for n in &nodes {
        assert_eq!(get(n, "k7").await.as_deref(), Some("v7"));
        assert_eq!(get(n, "k50").await, None, "the rejected write changed nothing");
        assert_eq!(get(n, "k100").await, None, "the stale-term write changed nothing");
        assert_eq!(get(n, "k199").await.as_deref(), Some("v199"));
    }
}

/// A voter that comes back with an empty directory never votes as the node whose log it
/// lost: it starts as a new incarnation of its seat, joins as a learner, and once caught up
/// takes the seat's place among the voters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_voter_returns_as_a_new_incarnation_and_takes_its_seat() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(root.path()).await;
    for i in 0..60 {
        put(&nodes, &format!("k{i}"), "v").await;
    }
    let leader = leader_of(&nodes.iter().collect::<Vec<_>>()).await;
    let f = nodes.iter().position(|n| n.replica.id != leader).unwrap();
    let (seat, url, dir) = nodes.remove(f).kill().await;
    std::fs::remove_dir_all(&dir).unwrap();
    put(&nodes, "while-away", "v").await;
    let peers = nodes.iter().map(|n| n.url.clone()).collect();
    let listener = tokio::net::TcpListener::bind(url.trim_start_matches("http://")).await.unwrap();
    let back = start_member(seat, dir, Some(listener), peers).await;
    let incarnation = back.replica.id;
    assert_eq!((quire_raft::seat(incarnation), quire_raft::incarnation(incarnation)), (seat, 1));
    nodes.push(back);
    let l = nodes.iter().position(|n| n.replica.id == leader).unwrap();
    wait_for("the new incarnation to take its seat among the voters", Duration::from_secs(20), || {
        let m = nodes[l].replica.metrics();
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        (voters.contains(&incarnation) && !voters.contains(&seat) && voters.len() == 3).then_some(())
    })
    .await;
    converge(&nodes.iter().collect::<Vec<_>>()).await;
    assert_eq!(get(nodes.last().unwrap(), "while-away").await.as_deref(), Some("v"));
    let back = nodes.last().unwrap();
    wait_for("the incarnation to record that its seat is taken", Duration::from_secs(10), || {
        back.replica.replaces().is_empty().then_some(())
    })
    .await;
}

/// Every Raft RPC names its group and target node: a replica refuses one for another group
/// (say an order RPC that reached a catalog replica), for another node (two ids at one
/// address), or that claims to come from itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rpcs_for_another_group_or_node_or_from_itself_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let nodes = three_nodes(root.path()).await;
    put(&nodes, "a", "1").await;
    let target = &nodes[0];
    let client = reqwest::Client::new();
    let vote = |candidate: NodeId| {
        quire_raft::payload::encode(&openraft::raft::VoteRequest::new(openraft::Vote::new(99, candidate), None))
            .unwrap()
    };
    let send = |group: &str, node: NodeId, body: Vec<u8>| {
        client
            .post(format!("{}/raft/vote", target.url))
            .header(quire_common::headers::TOKEN, TOKEN)
            .header(quire_common::headers::GROUP, group)
            .header(quire_common::headers::NODE, node)
            .body(body)
            .send()
    };
    let refused = |r: reqwest::Response, code: &'static str| async move {
        assert_eq!(r.status(), 409);
        assert_eq!(r.json::<Value>().await.unwrap()["error"], code);
    };
    let me = target.replica.id;
    refused(send("order", me, vote(2)).await.unwrap(), "wrong_group").await;
    refused(send("kv", me + 1, vote(2)).await.unwrap(), "wrong_node").await;
    refused(send("kv", me, vote(me)).await.unwrap(), "wrong_node").await;
    // None of them disturbed the group: no vote was granted at term 99.
    assert!(target.replica.metrics().current_term < 99);
    put(&nodes, "b", "2").await;
}

/// A membership never holds two nodes at one address, and a learner is added only once the
/// server at its address answers as that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_ids_at_one_address_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let nodes = three_nodes(root.path()).await;
    // A write first: until the leader has committed an entry of its term, the founding
    // membership is not committed and any membership change is refused as concurrent.
    put(&nodes, "a", "1").await;
    let leader = leader_of(&nodes.iter().collect::<Vec<_>>()).await;
    let l = nodes.iter().position(|n| n.replica.id == leader).unwrap();
    let other = &nodes[(l + 1) % 3];
    let err = nodes[l].replica.add_learner(9, &other.url).await.unwrap_err();
    assert_eq!(err.code, "address_taken", "{err}");
    // Node 4 runs at its own address; adding it under another id is refused too.
    let four = start_node(4, root.path().join("n4"), None).await;
    let err = nodes[l].replica.add_learner(5, &four.url).await.unwrap_err();
    assert_eq!(err.code, "unavailable", "{err}");
    assert!(err.message.contains("node 4"), "{err}");
    nodes[l].replica.add_learner(4, &four.url).await.unwrap();
    // A group cannot be founded with two members at one address either.
    let alone = start_node(7, root.path().join("n7"), None).await;
    let twice: BTreeMap<NodeId, String> = [(7, alone.url.clone()), (8, alone.url.clone())].into();
    assert!(alone.replica.initialize(&twice).await.is_err());
}
