//! `quire`: one binary, every role. This file only parses arguments, sets up tracing,
//! binds listeners and calls each service's `run`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use quire::supervisor::{Store, StoreOptions};
use quire_common::api::MAX_RESTOCK;
use quire_common::capacity::Costs;
use quire_common::http::Token;

#[derive(Parser)]
#[command(name = "quire", version, about = "A replicated, self-scaling bookstore")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a whole store on this machine: edge, frontends, balancers, two Raft groups.
    Up(UpArgs),
    /// Show every server of a running store.
    Status {
        #[arg(long, default_value = "quire-data")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Simulated clients against a store: open-loop arrivals from a load profile, then a
    /// report (unhappy clients, latency, server-seconds against the oracle) and a chart.
    Load(quire_loadgen::live::LoadArgs),
    /// Replay a load profile against an autoscaling policy in a discrete-event model of the
    /// store's tiers (`cloud-sim` costs); prints the same report as `quire load`.
    Simulate(quire_autoscaler::sim::SimulateArgs),
    /// Run the autoscaler of a store on Docker: it launches and removes the containers of a
    /// compose project (docker/compose.cloud-sim.yaml runs it as a container of the stack).
    Autoscale(quire_autoscaler::docker::AutoscaleArgs),
    /// Exit 0 when URL answers /health (for container healthchecks).
    Health { url: String },
    /// Operator commands.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Run a balancer (edge, catalog or order tier).
    Balancer(BalancerArgs),
    /// Run a catalog replica.
    Catalog(CatalogArgs),
    /// Run an order replica.
    Order(OrderArgs),
    /// Run a frontend.
    Frontend(FrontendArgs),
}

#[derive(Args)]
struct UpArgs {
    #[arg(long, default_value = "quire-data")]
    data_dir: PathBuf,
    /// Load this catalog (CSV with header id,title,topic,price,stock) instead of the seven books.
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// Port of the edge balancer, the store's public entry point.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Frontends (at least one: the edge has nothing else to send requests to).
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    frontends: usize,
    /// Balancers per service tier (catalog, order); two means none is a single point of failure.
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    balancers: usize,
    /// Server capacity: `cloud-sim` emulates a small cloud (5 s boot, fixed work per
    /// request, worker slots) so that autoscaling matters on one machine.
    #[arg(long, value_enum, default_value_t = Profile::Default)]
    profile: Profile,
    /// Worker slots per server under `cloud-sim`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    slots: u32,
    /// Autoscaling policy: default, queue, rate or hpa.
    #[arg(long, default_value = "default")]
    policy: String,
    /// Most servers the autoscaler runs per tier.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    max_servers: u32,
    /// Do not run the autoscaler (it runs under `--profile cloud-sim`, where capacity is
    /// modelled; the default profile's capacity is the machine's, so its tiers stay fixed).
    #[arg(long)]
    no_autoscale: bool,
    /// Do not restart servers that die.
    #[arg(long)]
    no_restart: bool,
    /// Copies a sold-out book gets (0: never restock; at most a million).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_RESTOCK)))]
    restock_amount: u32,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    restock_delay: Duration,
    /// Show every server's log on stderr (they always go to DATA/logs/).
    #[arg(long)]
    verbose: bool,
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Replace a dead voter: add the new node as a learner, wait until caught up, change membership.
    ReplaceVoter {
        /// URL of any live member of the group.
        #[arg(long)]
        via: String,
        #[arg(long)]
        remove: u64,
        /// The new node, as ID=URL (it must be running).
        #[arg(long, value_parser = parse_member)]
        add: (u64, String),
        #[arg(long, env = "QUIRE_TOKEN", hide_env_values = true)]
        token: String,
    },
}

#[derive(Args)]
struct Common {
    #[arg(long)]
    name: Option<String>,
    /// Address to bind, e.g. 127.0.0.1:4101 or 0.0.0.0:80.
    #[arg(long)]
    listen: String,
    /// Base URL others reach this server at (defaults to http://LISTEN).
    #[arg(long)]
    advertise: Option<String>,
    #[arg(long, env = "QUIRE_TOKEN", hide_env_values = true)]
    token: String,
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// `cloud-sim` emulates a small cloud: 5 s boot, fixed work per request, worker slots.
    #[arg(long, env = "QUIRE_PROFILE", value_enum, default_value_t = Profile::Default)]
    profile: Profile,
    /// Worker slots per server under `cloud-sim`.
    #[arg(long, env = "QUIRE_SLOTS", default_value_t = 1)]
    slots: u32,
    /// Open every outgoing connection from this address (a server with an address of its
    /// own on the loopback network).
    #[arg(long)]
    source_ip: Option<std::net::IpAddr>,
}

/// What a server's capacity is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// The machine's own: no boot delay, no emulated work, unlimited slots.
    Default,
    /// An emulated cloud (docs/ARCHITECTURE.md, "Capacity emulation").
    CloudSim,
}

#[derive(Args)]
struct BalancerArgs {
    #[command(flatten)]
    common: Common,
    /// edge, catalog or order.
    #[arg(long)]
    tier: quire_balancer::Tier,
    /// Backend base URLs known at start (more may register at runtime).
    #[arg(long)]
    backend: Vec<String>,
}

#[derive(Args)]
struct RaftArgs {
    /// This server's seat in its group: its Raft node id, or (for a data directory that
    /// came back empty) the seat a new incarnation of it takes.
    #[arg(long)]
    id: u64,
    #[arg(long)]
    data_dir: PathBuf,
    /// The Raft group (default: the service's name). Every Raft RPC names it and a replica
    /// refuses those of another group; give each store's groups their own.
    #[arg(long)]
    group: Option<String>,
    /// Found a new group with these voters (ID=URL, repeated) when none of them has one yet.
    #[arg(long, value_parser = parse_member)]
    init: Vec<(u64, String)>,
    /// Other members of the group (URL, repeated): asked who this replica is when its
    /// data directory is empty.
    #[arg(long)]
    peer: Vec<String>,
    /// This server has never run (a supervisor's word): with an empty data directory it
    /// takes its seat's node id as is rather than start a new incarnation.
    #[arg(long)]
    first_start: bool,
    /// Balancers to register with.
    #[arg(long)]
    balancer: Vec<String>,
    /// Raft heartbeat; openraft also gives each AppendEntries this long to complete.
    #[arg(long, env = "QUIRE_HEARTBEAT", default_value = "50ms", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    #[arg(long, env = "QUIRE_ELECTION_MIN", default_value = "80ms", value_parser = humantime::parse_duration)]
    election_min: Duration,
    #[arg(long, env = "QUIRE_ELECTION_MAX", default_value = "120ms", value_parser = humantime::parse_duration)]
    election_max: Duration,
    /// Snapshot (and purge the log) every this many entries.
    #[arg(long, default_value_t = 5000)]
    snapshot_every: u64,
}

#[derive(Args)]
struct CatalogArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    raft: RaftArgs,
    /// Load this catalog (CSV: id,title,topic,price,stock) instead of the seven books.
    #[arg(long, env = "QUIRE_CATALOG")]
    catalog: Option<PathBuf>,
    /// Copies added to a sold-out book (0: never restock).
    #[arg(long, env = "QUIRE_RESTOCK_AMOUNT", default_value_t = 100)]
    restock_amount: u32,
    #[arg(long, env = "QUIRE_RESTOCK_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    restock_delay: Duration,
    /// Frontend cache lease; must be shorter than the election timeout.
    #[arg(long, env = "QUIRE_LEASE", default_value = "75ms", value_parser = humantime::parse_duration)]
    lease: Duration,
}

#[derive(Args)]
struct OrderArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    raft: RaftArgs,
    #[arg(long, required = true)]
    catalog_balancer: Vec<String>,
    /// A catalog sale still without an order this long after the reconciler first saw it
    /// is given its order.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    recover_after: Duration,
}

#[derive(Args)]
struct FrontendArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, required = true)]
    catalog_balancer: Vec<String>,
    #[arg(long, required = true)]
    order_balancer: Vec<String>,
    /// Edge balancers to register with.
    #[arg(long)]
    edge: Vec<String>,
    /// Deadline of a lookup or search that carries none (`x-quire-deadline`): a shopper's
    /// patience. A client that will wait out a leader election (about 0.5 s here) says so.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    browse_deadline: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    buy_deadline: Duration,
    #[arg(long, env = "QUIRE_LEASE_RENEW", default_value = "30ms", value_parser = humantime::parse_duration)]
    lease_renew: Duration,
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_member(text: &str) -> Result<(u64, String), String> {
    let (id, url) = text.split_once('=').ok_or("expected ID=URL")?;
    Ok((id.parse().map_err(|_| "the id must be an integer")?, url.to_string()))
}

impl Common {
    fn capacity(&self) -> Option<Costs> {
        (self.profile == Profile::CloudSim).then_some(Costs { slots: self.slots.max(1), ..Costs::CLOUD_SIM })
    }

    fn advertise(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| format!("http://{}", self.listen))
    }
}

impl RaftArgs {
    fn member(&self, common: &Common, name: String, token: Token, service: &str) -> quire_raft::Member {
        quire_raft::Member {
            name,
            replica: quire_raft::ReplicaConfig {
                seat: self.id,
                group: self.group.clone().unwrap_or_else(|| service.to_string()),
                init: (!self.init.is_empty()).then(|| self.init.iter().cloned().collect()),
                peers: self.peer.clone(),
                first_start: self.first_start,
                advertise: common.advertise(),
                dir: self.data_dir.clone(),
                token,
                tuning: quire_raft::Tuning {
                    heartbeat: self.heartbeat,
                    election_min: self.election_min,
                    election_max: self.election_max,
                    snapshot_every: self.snapshot_every,
                },
                capacity: common.capacity(),
            },
            balancers: self.balancer.clone(),
        }
    }
}

/// Sets up tracing, checks the token, binds, and hands the listener to `run`.
async fn serve<F, Fut>(common: &Common, default_name: &str, run: F) -> anyhow::Result<()>
where
    F: FnOnce(TcpListener, String, Token) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let name = common.name.clone().unwrap_or_else(|| default_name.to_string());
    let _guard = quire_common::telemetry::init(&name, common.log_file.as_deref())?;
    if let Some(ip) = common.source_ip {
        quire_common::client::set_source(ip);
    }
    let started = async {
        let token = Token::new(&common.token)?;
        let listener = match inherited_listener(&common.listen)? {
            Some(listener) => listener,
            None => TcpListener::bind(&common.listen)
                .await
                .with_context(|| format!("cannot listen on {}", common.listen))?,
        };
        anyhow::Ok((listener, token))
    };
    let result = match started.await {
        Ok((listener, token)) => run(listener, name.clone(), token).await,
        Err(e) => Err(e),
    };
    match &result {
        Ok(()) => tracing::info!(server = %name, "stopped"),
        Err(e) => tracing::error!(server = %name, error = %e, "failed"),
    }
    result
}

/// The listening socket a supervisor bound for this server and handed over at descriptor
/// `QUIRE_LISTEN_FD`, so that no other process could take the port in between; it must be
/// bound to `listen`'s port.
#[allow(unsafe_code)]
fn inherited_listener(listen: &str) -> anyhow::Result<Option<TcpListener>> {
    use std::os::fd::FromRawFd;
    let Some(fd) = std::env::var("QUIRE_LISTEN_FD").ok().and_then(|fd| fd.parse::<i32>().ok()) else {
        return Ok(None);
    };
    // SAFETY: the supervisor hands over exactly one descriptor, a listening TCP socket, at
    // `fd`, and nothing else in this process opens or owns it.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let port = listener.local_addr().context("the inherited listener")?.port();
    anyhow::ensure!(listen.ends_with(&format!(":{port}")), "the inherited listener is on port {port}, not {listen}");
    listener.set_nonblocking(true)?;
    Ok(Some(TcpListener::from_std(listener)?))
}

/// Runs the autoscaler over `store`'s processes, serving its `/status` on a free loopback
/// port recorded in the store's layout; returns its base URL.
async fn start_autoscaler(
    store: Arc<Store>,
    policy: Box<dyn quire_autoscaler::Policy>,
    costs: Costs,
    max: u32,
) -> anyhow::Result<String> {
    use quire_autoscaler::TierKind;
    let layout = store.layout();
    let urls = |tier: &str| layout.servers.iter().filter(|s| s.tier == tier).map(|s| s.url.clone()).collect();
    let voters = |tier: &str| layout.servers.iter().filter(|s| s.tier == tier).count() as u32;
    let config = quire_autoscaler::live::Config {
        policy,
        costs,
        balancers: [
            (TierKind::Frontend, urls("edge")),
            (TierKind::Catalog, urls("catalog-balancer")),
            (TierKind::Order, urls("order-balancer")),
        ]
        .into(),
        token: layout.token.clone(),
        bounds: [
            (TierKind::Frontend, (1, max.max(1))),
            (TierKind::Catalog, (voters("catalog"), max.max(voters("catalog")))),
            (TierKind::Order, (voters("order"), max.max(voters("order")))),
        ]
        .into(),
        period: Duration::from_secs(1),
        drain_grace: Duration::from_millis(2500),
    };
    let autoscaler =
        quire_autoscaler::live::Autoscaler::new(quire::fleet::Processes::new(store.clone()), config).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    store.set_autoscaler(Some(url.clone()))?;
    let router = autoscaler.router();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "autoscaler status server stopped");
        }
    });
    tokio::spawn(autoscaler.run(std::future::pending()));
    Ok(url)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The blocking pool keeps tokio's default size: SQLite work and reqwest's DNS lookups
    // (getaddrinfo) share it, and a lookup of a cut-off peer can hang for ~10 s. A small
    // pool let those lookups starve every SQLite call (seen with `docker network
    // disconnect`).
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Up(args) => up(args).await,
        Cmd::Status { data_dir, json } => {
            let report = quire::status::report(&data_dir).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", quire::status::table(&report.servers));
                if let Some(fleet) = &report.fleet {
                    print!("{}", quire::status::fleet_table(fleet));
                }
            }
            Ok(())
        }
        Cmd::Load(args) => quire_loadgen::live::run(args).await.map(drop),
        Cmd::Simulate(args) => tokio::task::block_in_place(|| quire_autoscaler::sim::run(args)).map(drop),
        Cmd::Autoscale(args) => quire_autoscaler::docker::run(args).await,
        Cmd::Health { url } => {
            let url = format!("{}/health", url.trim_end_matches('/'));
            let ok = reqwest::Client::new()
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            std::process::exit(if ok { 0 } else { 1 });
        }
        Cmd::Admin(AdminCmd::ReplaceVoter { via, remove, add, token }) => {
            let _guard = quire_common::telemetry::init("admin", None)?;
            quire::admin::replace_voter(&via, &token, remove, add.0, &add.1).await?;
            println!("node {} replaced node {remove}", add.0);
            Ok(())
        }
        Cmd::Balancer(args) => {
            let default_name = args.tier.to_string();
            serve(&args.common, &default_name, |listener, name, token| {
                let config = quire_balancer::Config {
                    name,
                    tier: args.tier,
                    advertise_url: args.common.advertise(),
                    token,
                    backends: args.backend.clone(),
                    heartbeat: quire_balancer::DEFAULT_HEARTBEAT,
                };
                quire_balancer::run(listener, config, quire_common::shutdown::signal())
            })
            .await
        }
        Cmd::Catalog(args) => {
            let default_name = format!("catalog-{}", args.raft.id);
            serve(&args.common, &default_name, |listener, name, token| {
                let config = quire_catalog::Config {
                    member: args.raft.member(&args.common, name, token, "catalog"),
                    catalog_csv: args.catalog.clone(),
                    restock: quire_catalog::RestockPolicy { amount: args.restock_amount, delay: args.restock_delay },
                    lease_ttl: args.lease,
                };
                quire_catalog::run(listener, config, quire_common::shutdown::signal())
            })
            .await
        }
        Cmd::Order(args) => {
            let default_name = format!("order-{}", args.raft.id);
            serve(&args.common, &default_name, |listener, name, token| {
                let config = quire_order::Config {
                    member: args.raft.member(&args.common, name, token, "order"),
                    catalog: args.catalog_balancer.clone(),
                    recover_after: args.recover_after,
                };
                quire_order::run(listener, config, quire_common::shutdown::signal())
            })
            .await
        }
        Cmd::Frontend(args) => {
            serve(&args.common, "frontend", |listener, name, token| {
                let config = quire_frontend::Config {
                    name,
                    advertise: args.common.advertise(),
                    token,
                    catalog: args.catalog_balancer.clone(),
                    order: args.order_balancer.clone(),
                    edge: args.edge.clone(),
                    browse_budget: args.browse_deadline,
                    buy_budget: args.buy_deadline,
                    lease_renew: args.lease_renew,
                    capacity: args.common.capacity(),
                };
                quire_frontend::run(listener, config, quire_common::shutdown::signal())
            })
            .await
        }
    }
}

/// How long `quire up` waits before restarting a server that died: long enough for its
/// group to fail over without it (and for a crash loop not to spin), short enough to heal.
const RESTART_DELAY: Duration = Duration::from_secs(2);

/// `quire up`: start the store, wait until it answers, keep it running (restarting servers
/// that die) until Ctrl-C or SIGTERM, then stop every child.
async fn up(args: UpArgs) -> anyhow::Result<()> {
    let _guard = quire_common::telemetry::init("quire-up", Some(&args.data_dir.join("logs").join("quire-up.log")))?;
    let mut opts = StoreOptions::new(&args.data_dir, std::env::current_exe()?);
    opts.catalog_csv = args.catalog.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
    opts.edge_port = args.port;
    opts.frontends = args.frontends;
    opts.balancers = args.balancers;
    opts.restock_amount = args.restock_amount;
    opts.restock_delay = args.restock_delay;
    opts.verbose = args.verbose;
    if args.profile == Profile::CloudSim {
        let capacity = ["--profile".to_string(), "cloud-sim".into(), "--slots".into(), args.slots.to_string()];
        for extra in [&mut opts.catalog_args, &mut opts.order_args, &mut opts.frontend_args] {
            extra.extend(capacity.iter().cloned());
        }
    }
    let policy = quire_autoscaler::policy::by_name(&args.policy).with_context(|| {
        format!("unknown policy {:?} (one of {})", args.policy, quire_autoscaler::policy::NAMES.join(", "))
    })?;
    let store = Arc::new(Store::launch(&opts)?);
    let autoscale = args.profile == Profile::CloudSim && !args.no_autoscale;
    if autoscale {
        let costs = Costs { slots: args.slots.max(1), ..Costs::CLOUD_SIM };
        let url = start_autoscaler(store.clone(), policy, costs, args.max_servers).await?;
        println!("autoscaler ({}) at {url}/status", args.policy);
    } else {
        tracing::info!("autoscaler off: tiers keep their initial size");
    }
    let edge = store.url("edge")?;
    let client = quire_common::client::http_client();
    let started = std::time::Instant::now();
    let shutdown = quire_common::shutdown::signal();
    tokio::pin!(shutdown);
    let mut announced = false;
    let mut keeper = quire::supervisor::Keeper::new(RESTART_DELAY);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let outcome = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = tick.tick() => {}
        }
        if !announced {
            let ready = client.get(format!("{edge}/lookup/1")).timeout(Duration::from_secs(1)).send().await;
            if ready.is_ok_and(|r| r.status().is_success() || r.status() == reqwest::StatusCode::NOT_FOUND) {
                announced = true;
                println!(
                    "quire is up at {edge} (in {:.1}s); data and logs in {}",
                    started.elapsed().as_secs_f64(),
                    args.data_dir.display()
                );
                println!(
                    "try: curl {edge}/search/distributed%20systems   |   quire status --data-dir {}",
                    args.data_dir.display()
                );
                tokio::spawn(quire::admin::remove_stray_learners(store.layout()));
            }
        }
        let mut gave_up = None;
        for exited in store.reap_exited() {
            tracing::warn!(server = %exited.name, status = %exited.status, ran = ?exited.ran, "server exited");
            if !args.no_restart {
                if let Err(e) = keeper.exited(&store, &exited) {
                    gave_up = Some(e);
                }
            }
        }
        if let Some(e) = gave_up {
            break Err(e);
        }
        if let Err(e) = keeper.restart_due(&store) {
            break Err(e);
        }
    };
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "giving up");
        eprintln!("{e}");
    }
    println!("stopping quire...");
    tokio::task::block_in_place(|| store.stop(Duration::from_secs(10)));
    println!("stopped");
    outcome.map_err(|e| anyhow::anyhow!("the store was stopped: {} kept failing at start", e.name))
}
