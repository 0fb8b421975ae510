//! The supervisor behind `quire up`, also used by the end-to-end tests: it lays out a whole
//! store on loopback (ports, data directories, log files), runs every server as a child
//! process of the one `quire` binary, and can kill, restart, wipe and add servers.
//!
//! The layout is saved in `DATA/store.json` so that a restarted store (or a restarted
//! server) keeps its ports, which are the replicas' Raft addresses, and so that
//! `quire status` can find every server.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// What `quire up` (or a test) asks for.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub data_dir: PathBuf,
    /// The `quire` binary to run for every server.
    pub binary: PathBuf,
    pub catalog_csv: Option<PathBuf>,
    /// Port of the edge balancer; 0 picks a free one.
    pub edge_port: u16,
    pub frontends: usize,
    pub replicas: usize,
    pub token: Option<String>,
    pub restock_amount: u32,
    pub restock_delay: Duration,
    /// Catalog and order balancers each (the edge is one: the public port).
    pub balancers: usize,
    /// Extra arguments for every catalog replica, order replica and frontend (tests tune
    /// snapshots, recovery and deadlines with them).
    pub catalog_args: Vec<String>,
    pub order_args: Vec<String>,
    /// Extra arguments for every frontend.
    pub frontend_args: Vec<String>,
    /// Send children's stderr to ours (their log files get everything regardless).
    pub verbose: bool,
    /// Give every server an address of its own on the loopback network (127.0.0.10 and
    /// up), and bind its outgoing connections to it, so that rules on addresses can cut one
    /// server off (partition tests, inside a network namespace of their own).
    pub distinct_hosts: bool,
}

impl StoreOptions {
    pub fn new(data_dir: impl Into<PathBuf>, binary: impl Into<PathBuf>) -> Self {
        StoreOptions {
            data_dir: data_dir.into(),
            binary: binary.into(),
            catalog_csv: None,
            edge_port: 8080,
            frontends: 2,
            replicas: 3,
            token: None,
            restock_amount: 100,
            restock_delay: Duration::from_secs(5),
            balancers: 2,
            catalog_args: Vec::new(),
            order_args: Vec::new(),
            frontend_args: Vec::new(),
            verbose: false,
            distinct_hosts: false,
        }
    }
}

/// One server of the store as `store.json` records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Server {
    pub name: String,
    /// edge, frontend, catalog-balancer, order-balancer, catalog, order.
    pub tier: String,
    pub url: String,
    pub pid: Option<u32>,
    /// Role and flags, without those of the first start.
    args: Vec<String>,
    /// Flags given on the very first start only (`--init` and `--first-start`: founding a
    /// Raft group, taking a seat as its first incarnation).
    #[serde(default)]
    first_start_args: Vec<String>,
    #[serde(default)]
    started: bool,
    #[serde(default)]
    data_dir: Option<PathBuf>,
}

impl Server {
    /// The address the server listens on (`host:port`).
    pub fn listen(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    fn port(&self) -> Option<u16> {
        self.url.rsplit(':').next()?.parse().ok()
    }

    fn host(&self) -> Option<String> {
        Some(self.url.trim_start_matches("http://").rsplit_once(':')?.0.to_string())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layout {
    pub token: String,
    /// Names this store's Raft groups (`catalog-ID`, `order-ID`): a replica refuses Raft
    /// RPCs of another group, another store's included.
    #[serde(default = "random_id")]
    pub store_id: String,
    pub servers: Vec<Server>,
    /// Base URL of the autoscaler's `/status`, when `quire up` runs one.
    #[serde(default)]
    pub autoscaler: Option<String>,
    /// The next serial for a launched server (`frontend-N`, or a replica with Raft seat N):
    /// it only grows, across restarts of `quire up` too, so no name or seat is used twice.
    #[serde(default = "first_serial")]
    pub next_serial: u64,
}

/// Launched servers are numbered from here, above the voters' seats.
pub const FIRST_SERIAL: u64 = 101;

fn first_serial() -> u64 {
    FIRST_SERIAL
}

fn random_id() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..8).map(|_| format!("{:x}", rng.gen_range(0..16u8))).collect()
}

impl Layout {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("store.json")
    }

    pub fn load(data_dir: &Path) -> anyhow::Result<Layout> {
        let path = Self::path(data_dir);
        let text = std::fs::read_to_string(&path).with_context(|| format!("no store at {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let tmp = data_dir.join("store.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, Self::path(data_dir))?;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Server> {
        self.servers.iter().find(|s| s.name == name)
    }
}

/// The ports of one store: none is handed out twice, and a new one is held (bound) from
/// the moment it is chosen until its server takes it over, so that no other process can
/// take it in between.
struct Ports {
    taken: std::collections::BTreeSet<(String, u16)>,
    /// Ports of the earlier layout: never handed to a new server, since a server of the
    /// earlier run may still hold one (or come back to it).
    reserved: std::collections::BTreeSet<(String, u16)>,
    held: HashMap<String, std::net::TcpListener>,
}

impl Ports {
    /// A free port on `host` for server `name`, chosen below the kernel's ephemeral range
    /// (32768 and up on Linux): a server keeps its port across restarts, and a port from
    /// the ephemeral range could be taken meanwhile by any process's outgoing connection.
    fn pick(&mut self, name: &str, host: &str) -> anyhow::Result<u16> {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        for _ in 0..200 {
            let port = rng.gen_range(20_000..32_000);
            let key = (host.to_string(), port);
            if self.taken.contains(&key) || self.reserved.contains(&key) {
                continue;
            }
            if let Ok(listener) = std::net::TcpListener::bind((host, port)) {
                self.taken.insert((host.to_string(), port));
                self.held.insert(name.to_string(), listener);
                return Ok(port);
            }
        }
        anyhow::bail!("no free port between 20000 and 32000 on {host}")
    }

    /// Records a port given by hand or kept from an earlier run; refuses one already taken.
    fn keep(
        &mut self,
        name: &str,
        host: &str,
        port: u16,
        owner: &HashMap<(String, u16), String>,
    ) -> anyhow::Result<()> {
        if !self.taken.insert((host.to_string(), port)) {
            let other = owner.get(&(host.to_string(), port)).map_or("another server", String::as_str);
            anyhow::bail!(
                "{name} and {other} would share {host}:{port}: every server of a store needs a port of its own"
            );
        }
        Ok(())
    }
}

fn random_token() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..32).map(|_| format!("{:x}", rng.gen_range(0..16u8))).collect()
}

/// Lays out the store: reuses the ports, token and store id of an existing `store.json`,
/// and holds every new port until its server is started.
fn plan(opts: &StoreOptions) -> anyhow::Result<(Layout, HashMap<String, std::net::TcpListener>)> {
    let old = Layout::load(&opts.data_dir).ok();
    let reserved = old.iter().flat_map(|l| &l.servers).filter_map(|s| Some((s.host()?, s.port()?))).collect();
    let mut ports = Ports { taken: Default::default(), reserved, held: HashMap::new() };
    let mut owner: HashMap<(String, u16), String> = HashMap::new();
    // The host of every server: 127.0.0.1, or one address each.
    let mut hosts: HashMap<String, String> = HashMap::new();
    let mut host_of = |name: &str| -> String {
        if !opts.distinct_hosts {
            return "127.0.0.1".into();
        }
        let next = format!("127.0.0.{}", 10 + hosts.len());
        hosts.entry(name.to_string()).or_insert(next).clone()
    };
    let mut url_of = |name: &str, fixed: u16| -> anyhow::Result<String> {
        let host = host_of(name);
        let kept = old.as_ref().and_then(|l| l.get(name)).and_then(Server::port);
        let port = match kept.or((fixed != 0).then_some(fixed)) {
            Some(port) => {
                ports.keep(name, &host, port, &owner)?;
                port
            }
            None => ports.pick(name, &host)?,
        };
        owner.insert((host.clone(), port), name.to_string());
        Ok(format!("http://{host}:{port}"))
    };
    let dir = &opts.data_dir;
    let token = opts.token.clone().or_else(|| old.as_ref().map(|l| l.token.clone())).unwrap_or_else(random_token);
    quire_common::http::Token::new(&token)?;
    let store_id = old.as_ref().map_or_else(random_id, |l| l.store_id.clone());

    let edge = url_of("edge", opts.edge_port)?;
    let mut balancers = |tier: &str| -> anyhow::Result<Vec<(String, String)>> {
        (1..=opts.balancers.max(1))
            .map(|i| {
                let name = format!("{tier}-balancer-{i}");
                Ok((name.clone(), url_of(&name, 0)?))
            })
            .collect()
    };
    let catalog_balancers = balancers("catalog")?;
    let order_balancers = balancers("order")?;
    let flags = |flag: &str, urls: &[(String, String)]| -> Vec<String> {
        urls.iter().flat_map(|(_, u)| [flag.to_string(), u.clone()]).collect()
    };
    let frontends: Vec<(String, String)> = (1..=opts.frontends)
        .map(|i| {
            let name = format!("frontend-{i}");
            Ok((name.clone(), url_of(&name, 0)?))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut group = |tier: &str| -> anyhow::Result<Vec<(u64, String, String)>> {
        (1..=opts.replicas as u64)
            .map(|i| {
                let name = format!("{tier}-{i}");
                Ok((i, name.clone(), url_of(&name, 0)?))
            })
            .collect()
    };
    let catalogs = group("catalog")?;
    let orders = group("order")?;

    let mut servers = Vec::new();
    let mut add = |name: &str, tier: &str, url: &str, args: Vec<String>, first: Vec<String>, data: Option<PathBuf>| {
        let mut full = args;
        let listen = url.trim_start_matches("http://").to_string();
        full.extend(["--name".into(), name.into(), "--listen".into(), listen, "--advertise".into(), url.into()]);
        if opts.distinct_hosts {
            let host = url.trim_start_matches("http://").rsplit_once(':').map_or("", |(h, _)| h).to_string();
            full.extend(["--source-ip".into(), host]);
        }
        servers.push(Server {
            name: name.into(),
            tier: tier.into(),
            url: url.into(),
            pid: None,
            args: full,
            first_start_args: first,
            started: old.as_ref().and_then(|l| l.get(name)).is_some_and(|s| s.started),
            data_dir: data,
        });
    };
    let balancer = |tier: &str, backends: Vec<&String>| {
        let mut args = vec!["balancer".to_string(), "--tier".into(), tier.into()];
        for b in backends {
            args.extend(["--backend".into(), b.clone()]);
        }
        args
    };
    for (name, u) in &catalog_balancers {
        add(name, "catalog-balancer", u, balancer("catalog", catalogs.iter().map(|c| &c.2).collect()), vec![], None);
    }
    for (name, u) in &order_balancers {
        add(name, "order-balancer", u, balancer("order", orders.iter().map(|c| &c.2).collect()), vec![], None);
    }
    for (tier, members) in [("catalog", &catalogs), ("order", &orders)] {
        let mut first: Vec<String> =
            members.iter().flat_map(|(id, _, u)| ["--init".to_string(), format!("{id}={u}")]).collect();
        first.push("--first-start".into());
        for (id, name, u) in members {
            let data = dir.join(name);
            let mut args = vec![
                tier.to_string(),
                "--id".into(),
                id.to_string(),
                "--group".into(),
                format!("{tier}-{store_id}"),
                "--data-dir".into(),
                data.to_string_lossy().to_string(),
            ];
            for (_, _, peer) in members.iter().filter(|(other, _, _)| other != id) {
                args.extend(["--peer".into(), peer.clone()]);
            }
            if tier == "catalog" {
                args.extend(flags("--balancer", &catalog_balancers));
                if let Some(csv) = &opts.catalog_csv {
                    args.extend(["--catalog".into(), csv.to_string_lossy().to_string()]);
                }
                args.extend(["--restock-amount".into(), opts.restock_amount.to_string()]);
                args.extend(["--restock-delay".into(), humantime::format_duration(opts.restock_delay).to_string()]);
                args.extend(opts.catalog_args.iter().cloned());
            } else {
                args.extend(flags("--balancer", &order_balancers));
                args.extend(flags("--catalog-balancer", &catalog_balancers));
                args.extend(opts.order_args.iter().cloned());
            }
            add(name, tier, u, args, first.clone(), Some(data));
        }
    }
    for (name, u) in &frontends {
        let mut args = vec!["frontend".to_string()];
        args.extend(flags("--catalog-balancer", &catalog_balancers));
        args.extend(flags("--order-balancer", &order_balancers));
        args.extend(["--edge".into(), edge.clone()]);
        args.extend(opts.frontend_args.iter().cloned());
        add(name, "frontend", u, args, vec![], None);
    }
    add("edge", "edge", &edge, balancer("edge", frontends.iter().map(|f| &f.1).collect()), vec![], None);
    // Serials only grow: past what the last run handed out and every server it left.
    let serial_of = |s: &Server| s.name.rsplit('-').next().and_then(|n| n.parse::<u64>().ok());
    let next_serial = old
        .iter()
        .flat_map(|l| l.servers.iter().filter_map(serial_of).map(|n| n + 1).chain([l.next_serial]))
        .chain([FIRST_SERIAL])
        .max()
        .unwrap_or(FIRST_SERIAL);
    let layout = Layout { token, store_id, servers, autoscaler: None, next_serial };
    Ok((layout, ports.held))
}

/// A running store: the children and the layout.
pub struct Store {
    pub dir: PathBuf,
    binary: PathBuf,
    verbose: bool,
    layout: Mutex<Layout>,
    children: Mutex<HashMap<String, Running>>,
    /// Listening sockets bound for servers not started yet (see [`Store::spawn`]).
    listeners: Mutex<HashMap<String, std::net::TcpListener>>,
}

/// A started child and when it was started.
struct Running {
    child: Child,
    since: std::time::Instant,
}

/// A child that exited: how, and after how long.
pub struct Exited {
    pub name: String,
    pub status: ExitStatus,
    pub ran: Duration,
}

/// Refuses what would start a store that cannot work, before any server starts: a catalog
/// that does not load (the error names the file, the line and the reason), no frontend,
/// no balancer, no replica.
pub fn validate(opts: &StoreOptions) -> anyhow::Result<()> {
    anyhow::ensure!(opts.frontends >= 1, "a store needs at least one frontend: nothing else reaches its API");
    anyhow::ensure!(opts.balancers >= 1, "a store needs at least one balancer per service");
    anyhow::ensure!(opts.replicas >= 1, "a replica group needs at least one replica");
    anyhow::ensure!(
        opts.restock_amount <= quire_common::api::MAX_RESTOCK,
        "a restock adds at most {} copies",
        quire_common::api::MAX_RESTOCK
    );
    if let Some(csv) = &opts.catalog_csv {
        let books = quire_catalog::seed::from_csv(csv)?;
        anyhow::ensure!(!books.is_empty(), "{}: the catalog has no books", csv.display());
    }
    Ok(())
}

impl Store {
    /// Validates the options, plans the store and starts every server.
    pub fn launch(opts: &StoreOptions) -> anyhow::Result<Store> {
        validate(opts)?;
        std::fs::create_dir_all(opts.data_dir.join("logs"))?;
        let (layout, listeners) = plan(opts)?;
        layout.save(&opts.data_dir)?;
        let store = Store {
            dir: opts.data_dir.clone(),
            binary: opts.binary.clone(),
            verbose: opts.verbose,
            layout: Mutex::new(layout),
            children: Mutex::new(HashMap::new()),
            listeners: Mutex::new(listeners),
        };
        let names: Vec<String> = store.layout().servers.iter().map(|s| s.name.clone()).collect();
        for name in names {
            store.spawn(&name)?;
        }
        Ok(store)
    }

    pub fn layout(&self) -> Layout {
        self.layout.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn token(&self) -> String {
        self.layout().token
    }

    pub fn server(&self, name: &str) -> anyhow::Result<Server> {
        self.layout().get(name).cloned().with_context(|| format!("no server named {name}"))
    }

    pub fn url(&self, name: &str) -> anyhow::Result<String> {
        Ok(self.server(name)?.url)
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.layout().get(name).and_then(|s| s.pid)
    }

    pub fn names(&self, tier: &str) -> Vec<String> {
        self.layout().servers.iter().filter(|s| s.tier == tier).map(|s| s.name.clone()).collect()
    }

    /// The log file of server `name`.
    pub fn log_file(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    /// Starts `name` (which must not be running). Its listening socket is bound here (or
    /// was, when its port was chosen) and handed to the child as descriptor
    /// the descriptor named by `QUIRE_LISTEN_FD`: the port is never free for another process to take in between. Its
    /// stderr goes to its log file (and to ours with `verbose`).
    pub fn spawn(&self, name: &str) -> anyhow::Result<u32> {
        let mut layout = self.layout.lock().unwrap_or_else(|e| e.into_inner());
        let token = layout.token.clone();
        let server =
            layout.servers.iter_mut().find(|s| s.name == name).with_context(|| format!("no server named {name}"))?;
        let held = self.listeners.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        let listener = match held {
            Some(listener) => listener,
            None => std::net::TcpListener::bind(server.listen())
                .with_context(|| format!("cannot listen on {} for {name}", server.listen()))?,
        };
        let log = self.log_file(name);
        let mut command = Command::new(&self.binary);
        command.args(&server.args);
        if !server.started {
            command.args(&server.first_start_args);
        }
        // glibc gives each thread that allocates its own arena, which keeps freed pages; two
        // arenas (one per core here) hold memory flat without making threads contend.
        command.env("MALLOC_ARENA_MAX", "2");
        command.env("QUIRE_TOKEN", &token);
        command.stdin(Stdio::null()).stdout(Stdio::null());
        if self.verbose {
            command.arg("--log-file").arg(&log).stderr(Stdio::inherit());
        } else {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
            command.stderr(file);
        }
        die_with_parent(&mut command);
        hand_over(&mut command, &listener);
        let child = command.spawn().with_context(|| format!("cannot start {name}"))?;
        // The child has its own copy of the socket now.
        drop(listener);
        let pid = child.id();
        server.pid = Some(pid);
        server.started = true;
        layout.save(&self.dir)?;
        // Recorded as a child before the layout is let go: whoever sees the pid finds the child.
        let running = Running { child, since: std::time::Instant::now() };
        self.children.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), running);
        drop(layout);
        Ok(pid)
    }

    /// The next serial for a launched server; recorded at once, so it is never handed out
    /// again, even by a later run of `quire up`.
    pub fn next_serial(&self) -> anyhow::Result<u64> {
        let mut layout = self.layout.lock().unwrap_or_else(|e| e.into_inner());
        let serial = layout.next_serial;
        layout.next_serial += 1;
        layout.save(&self.dir)?;
        Ok(serial)
    }

    /// Sends `signal` to `name`; after SIGKILL, reaps it.
    pub fn signal(&self, name: &str, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid(name).with_context(|| format!("{name} has no pid"))?;
        kill(Pid::from_raw(pid as i32), signal)?;
        if signal == Signal::SIGKILL {
            if let Some(Running { mut child, .. }) =
                self.children.lock().unwrap_or_else(|e| e.into_inner()).remove(name)
            {
                let _ = child.wait();
            }
        }
        Ok(())
    }

    /// kill -9.
    pub fn kill(&self, name: &str) -> anyhow::Result<()> {
        self.signal(name, Signal::SIGKILL)
    }

    /// Starts `name` again with the same ports and data (after it died or was killed).
    pub fn restart(&self, name: &str) -> anyhow::Result<u32> {
        if let Some(Running { mut child, .. }) = self.children.lock().unwrap_or_else(|e| e.into_inner()).remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.spawn(name)
    }

    /// Deletes a (stopped) replica's data directory.
    pub fn wipe(&self, name: &str) -> anyhow::Result<()> {
        let server = self.server(name)?;
        let dir = server.data_dir.with_context(|| format!("{name} keeps no data"))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        Ok(())
    }

    /// Adds a new, empty replica `TIER-ID` to the layout and starts it (it does not found
    /// a group; an operator adds it as a learner and changes membership).
    pub fn add_replica(&self, tier: &str, id: u64) -> anyhow::Result<String> {
        let name = format!("{tier}-{id}");
        self.add_like(tier, &name, Some(id))?;
        Ok(name)
    }

    /// Adds a new frontend `frontend-N` to the layout and starts it; it registers with the edge.
    pub fn add_frontend(&self, n: u64) -> anyhow::Result<Server> {
        self.add_like("frontend", &format!("frontend-{n}"), None)
    }

    /// Adds server `name` of `tier`, configured like the tier's first server but with its
    /// own port, data directory, log file and (for a replica) Raft `id`, and starts it.
    fn add_like(&self, tier: &str, name: &str, id: Option<u64>) -> anyhow::Result<Server> {
        let server = {
            let mut layout = self.layout.lock().unwrap_or_else(|e| e.into_inner());
            anyhow::ensure!(layout.get(name).is_none(), "{name} already exists");
            let template = layout
                .servers
                .iter()
                .find(|s| s.tier == tier)
                .cloned()
                .with_context(|| format!("no {tier} server to copy"))?;
            let old_url = template.url.clone();
            let old_dir = template.data_dir.clone().unwrap_or_default().to_string_lossy().to_string();
            let old_log = self.dir.join("logs").join(format!("{}.log", template.name)).to_string_lossy().to_string();
            let host = template.listen().rsplit_once(':').map_or("127.0.0.1", |(h, _)| h).to_string();
            let mut ports = Ports {
                taken: layout.servers.iter().filter_map(|s| Some((host.clone(), s.port()?))).collect(),
                reserved: Default::default(),
                held: HashMap::new(),
            };
            let url = format!("http://{host}:{}", ports.pick(name, &host)?);
            self.listeners.lock().unwrap_or_else(|e| e.into_inner()).extend(ports.held);
            let data = template.data_dir.is_some().then(|| self.dir.join(name));
            let new_log = self.dir.join("logs").join(format!("{name}.log")).to_string_lossy().to_string();
            let listen = url.trim_start_matches("http://").to_string();
            let old_listen = old_url.trim_start_matches("http://").to_string();
            let mut args = template
                .args
                .iter()
                .map(|a| match a {
                    a if *a == old_url => url.clone(),
                    a if *a == old_listen => listen.clone(),
                    a if data.is_some() && *a == old_dir => {
                        data.clone().unwrap_or_default().to_string_lossy().to_string()
                    }
                    a if *a == old_log => new_log.clone(),
                    a if *a == template.name => name.to_string(),
                    a => a.clone(),
                })
                .collect::<Vec<_>>();
            if let (Some(id), Some(i)) = (id, args.iter().position(|a| a == "--id")) {
                args[i + 1] = id.to_string();
            }
            let server = Server {
                name: name.to_string(),
                tier: tier.into(),
                url,
                pid: None,
                args,
                first_start_args: vec![],
                started: true,
                data_dir: data,
            };
            if let Some(id) = id {
                // A seat given by hand is never handed out again.
                layout.next_serial = layout.next_serial.max(quire_common::node::seat(id) + 1);
            }
            layout.servers.push(server.clone());
            layout.save(&self.dir)?;
            server
        };
        let pid = self.spawn(name)?;
        Ok(Server { pid: Some(pid), ..server })
    }

    /// Stops `name` for good: SIGTERM, SIGKILL after `grace`, then forgets it and deletes
    /// its data. Not restarted: it is no longer a child.
    pub fn remove(&self, name: &str, grace: Duration) -> anyhow::Result<()> {
        // Out of the layout first (and out of the children with it), so that nothing
        // restarts it while it stops.
        let (server, child) = {
            let mut layout = self.layout.lock().unwrap_or_else(|e| e.into_inner());
            let server = layout.get(name).cloned();
            layout.servers.retain(|s| s.name != name);
            layout.save(&self.dir)?;
            (server, self.children.lock().unwrap_or_else(|e| e.into_inner()).remove(name))
        };
        if let Some(Running { mut child, .. }) = child {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = std::time::Instant::now() + grace;
            while !matches!(child.try_wait(), Ok(Some(_))) {
                if std::time::Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(dir) = server.and_then(|s| s.data_dir).filter(|d| d.exists()) {
            std::fs::remove_dir_all(dir)?;
        }
        Ok(())
    }

    /// Records where the autoscaler serves its `/status`, for `quire status` and `quire load`.
    pub fn set_autoscaler(&self, url: Option<String>) -> anyhow::Result<()> {
        let mut layout = self.layout.lock().unwrap_or_else(|e| e.into_inner());
        layout.autoscaler = url;
        layout.save(&self.dir)
    }

    /// Children that exited since the last call.
    pub fn reap_exited(&self) -> Vec<Exited> {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        let mut exited = Vec::new();
        children.retain(|name, running| match running.child.try_wait() {
            Ok(Some(status)) => {
                exited.push(Exited { name: name.clone(), status, ran: running.since.elapsed() });
                false
            }
            _ => true,
        });
        exited
    }

    /// SIGTERM every child, wait up to `grace`, then SIGKILL what is left.
    pub fn stop(&self, grace: Duration) {
        let mut children = std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for Running { child, .. } in children.values() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            children.retain(|_, r| !matches!(r.child.try_wait(), Ok(Some(_))));
            if children.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for (name, Running { mut child, .. }) in children {
            tracing::warn!(server = %name, "did not stop in time; killing");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        for (_, Running { mut child, .. }) in self.children.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Gives the child `listener` at the descriptor it has here, named in `QUIRE_LISTEN_FD`
/// (std opens every descriptor close-on-exec, so the child inherits this one alone).
#[allow(unsafe_code)]
fn hand_over(command: &mut Command, listener: &std::net::TcpListener) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    command.env("QUIRE_LISTEN_FD", fd.to_string());
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe fcntl(2) system call, on a descriptor std leaves alone (it only
    // moves the child's standard streams, 0 to 2).
    unsafe {
        command.pre_exec(move || {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
            Ok(())
        });
    }
}

/// Asks the kernel to SIGKILL the child when the thread that spawned it exits, so no
/// server outlives a supervisor (or test) that was itself killed. Stores are driven from
/// long-lived threads (the main thread, a runtime worker), never from a short-lived one.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe prctl(2) system call.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}

/// How `quire up` keeps a store running: a server that dies is started again after a delay
/// (long enough for its group to fail over without it), and one that keeps failing at start
/// makes it give up rather than restart it forever.
pub struct Keeper {
    delay: Duration,
    /// A server that exits within this long of starting failed at start.
    window: Duration,
    /// Failed starts in a row after which the keeper gives up.
    limit: u32,
    failed: HashMap<String, u32>,
    due: Vec<(String, std::time::Instant)>,
}

/// A server kept failing at start.
#[derive(Debug, thiserror::Error)]
#[error(
    "{name} failed {failures} times in a row within {window:?} of starting; its last error: {}\n(see {})",
    last_error.as_deref().unwrap_or("none logged"),
    log.display()
)]
pub struct GaveUp {
    pub name: String,
    pub failures: u32,
    pub window: Duration,
    pub last_error: Option<String>,
    pub log: PathBuf,
}

impl Keeper {
    pub fn new(delay: Duration) -> Keeper {
        Keeper { delay, window: Duration::from_secs(10), limit: 3, failed: HashMap::new(), due: Vec::new() }
    }

    /// A server exited: schedules its restart, unless it has now failed at start too often
    /// (or is no longer in the layout: removed on purpose).
    pub fn exited(&mut self, store: &Store, exited: &Exited) -> Result<(), GaveUp> {
        if store.layout().get(&exited.name).is_none() {
            return Ok(());
        }
        self.failure(store, &exited.name, exited.ran < self.window)
    }

    /// Restarts the servers whose delay is over.
    pub fn restart_due(&mut self, store: &Store) -> Result<(), GaveUp> {
        let now = std::time::Instant::now();
        let due: Vec<String> = self.due.iter().filter(|(_, at)| *at <= now).map(|(n, _)| n.clone()).collect();
        self.due.retain(|(_, at)| *at > now);
        for name in due {
            if store.layout().get(&name).is_none() {
                continue;
            }
            match store.restart(&name) {
                Ok(pid) => tracing::info!(server = %name, pid, "restarted"),
                Err(e) => {
                    tracing::error!(server = %name, error = %e, "cannot restart");
                    self.failure(store, &name, true)?;
                }
            }
        }
        Ok(())
    }

    fn failure(&mut self, store: &Store, name: &str, at_start: bool) -> Result<(), GaveUp> {
        let failures = self.failed.entry(name.to_string()).or_default();
        *failures = if at_start { *failures + 1 } else { 0 };
        if *failures >= self.limit {
            let log = store.log_file(name);
            return Err(GaveUp {
                name: name.to_string(),
                failures: *failures,
                window: self.window,
                last_error: last_error(&log),
                log,
            });
        }
        tracing::warn!(server = %name, "server exited; restarting it in {:?}", self.delay);
        self.due.push((name.to_string(), std::time::Instant::now() + self.delay));
        Ok(())
    }
}

/// The last error a server logged: its exit error (`Error: ...`) or an ERROR line.
pub fn last_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .find(|l| l.starts_with("Error:") || l.starts_with("error:") || l.contains(" ERROR "))
        .map(|l| l.trim().to_string())
}
