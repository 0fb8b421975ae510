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
    /// Role and flags, without `--init`.
    args: Vec<String>,
    /// Flags given on the very first start only (founding a Raft group).
    #[serde(default)]
    first_start_args: Vec<String>,
    #[serde(default)]
    started: bool,
    #[serde(default)]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layout {
    pub token: String,
    pub servers: Vec<Server>,
    /// Base URL of the autoscaler's `/status`, when `quire up` runs one.
    #[serde(default)]
    pub autoscaler: Option<String>,
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

/// A port free now, chosen below the kernel's ephemeral range (32768 and up on Linux): a
/// server keeps its port across restarts, and a port from the ephemeral range could be
/// taken meanwhile by any process's outgoing connection.
fn free_port() -> anyhow::Result<u16> {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    for _ in 0..200 {
        let port = rng.gen_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port between 20000 and 32000 on 127.0.0.1")
}

fn random_token() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..32).map(|_| format!("{:x}", rng.gen_range(0..16u8))).collect()
}

/// Lays out the store: reuses the ports and token of an existing `store.json`.
pub fn plan(opts: &StoreOptions) -> anyhow::Result<Layout> {
    let old = Layout::load(&opts.data_dir).ok();
    let port_of = |name: &str, fallback: u16| -> anyhow::Result<u16> {
        if let Some(url) = old.as_ref().and_then(|l| l.get(name)).map(|s| s.url.clone()) {
            if let Some(port) = url.rsplit(':').next().and_then(|p| p.parse().ok()) {
                return Ok(port);
            }
        }
        if fallback != 0 {
            return Ok(fallback);
        }
        free_port()
    };
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let dir = &opts.data_dir;
    let log = |name: &str| dir.join("logs").join(format!("{name}.log")).to_string_lossy().to_string();
    let token = opts.token.clone().or_else(|| old.as_ref().map(|l| l.token.clone())).unwrap_or_else(random_token);

    let edge = url(port_of("edge", opts.edge_port)?);
    let balancers = |tier: &str| -> anyhow::Result<Vec<(String, String)>> {
        (1..=opts.balancers.max(1))
            .map(|i| {
                let name = format!("{tier}-balancer-{i}");
                let port = port_of(&name, 0)?;
                Ok((name, url(port)))
            })
            .collect()
    };
    let catalog_balancers = balancers("catalog")?;
    let order_balancers = balancers("order")?;
    let flags = |flag: &str, urls: &[(String, String)]| -> Vec<String> {
        urls.iter().flat_map(|(_, u)| [flag.to_string(), u.clone()]).collect()
    };
    let frontends: Vec<(String, String)> = (1..=opts.frontends)
        .map(|i| Ok((format!("frontend-{i}"), url(port_of(&format!("frontend-{i}"), 0)?))))
        .collect::<anyhow::Result<_>>()?;
    let group = |tier: &str| -> anyhow::Result<Vec<(u64, String, String)>> {
        (1..=opts.replicas as u64)
            .map(|i| {
                let name = format!("{tier}-{i}");
                let port = port_of(&name, 0)?;
                Ok((i, name, url(port)))
            })
            .collect()
    };
    let catalogs = group("catalog")?;
    let orders = group("order")?;

    let mut servers = Vec::new();
    let mut add = |name: &str, tier: &str, url: &str, args: Vec<String>, first: Vec<String>, data: Option<PathBuf>| {
        let mut full = args;
        full.extend(["--name".into(), name.into(), "--log-file".into(), log(name)]);
        let listen = url.trim_start_matches("http://").to_string();
        full.extend(["--listen".into(), listen, "--advertise".into(), url.into()]);
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
        let init: Vec<String> =
            members.iter().flat_map(|(id, _, u)| ["--init".to_string(), format!("{id}={u}")]).collect();
        for (id, name, u) in members {
            let data = dir.join(name);
            let mut args = vec![
                tier.to_string(),
                "--id".into(),
                id.to_string(),
                "--data-dir".into(),
                data.to_string_lossy().to_string(),
            ];
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
            add(name, tier, u, args, init.clone(), Some(data));
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
    Ok(Layout { token, servers, autoscaler: None })
}

/// A running store: the children and the layout.
pub struct Store {
    pub dir: PathBuf,
    binary: PathBuf,
    verbose: bool,
    layout: Mutex<Layout>,
    children: Mutex<HashMap<String, Child>>,
}

impl Store {
    /// Plans the store and starts every server.
    pub fn launch(opts: &StoreOptions) -> anyhow::Result<Store> {
        std::fs::create_dir_all(opts.data_dir.join("logs"))?;
        let layout = plan(opts)?;
        layout.save(&opts.data_dir)?;
        let store = Store {
            dir: opts.data_dir.clone(),
            binary: opts.binary.clone(),
            verbose: opts.verbose,
            layout: Mutex::new(layout),
            children: Mutex::new(HashMap::new()),
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

    /// Starts `name` (which must not be running).
    pub fn spawn(&self, name: &str) -> anyhow::Result<u32> {
        let mut layout = self.layout.lock().unwrap_or_else(|e| e.into_inner());
        let token = layout.token.clone();
        let server =
            layout.servers.iter_mut().find(|s| s.name == name).with_context(|| format!("no server named {name}"))?;
        let mut command = Command::new(&self.binary);
        command.args(&server.args);
        if !server.started {
            command.args(&server.first_start_args);
        }
        // glibc gives each thread that allocates its own arena, which keeps freed pages; two
        // arenas (one per core here) hold memory flat without making threads contend.
        command.env("MALLOC_ARENA_MAX", "2");
        command.env("QUIRE_TOKEN", &token).stdin(Stdio::null()).stdout(Stdio::null()).stderr(if self.verbose {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
        die_with_parent(&mut command);
        let child = command.spawn().with_context(|| format!("cannot start {name}"))?;
        let pid = child.id();
        server.pid = Some(pid);
        server.started = true;
        layout.save(&self.dir)?;
        drop(layout);
        self.children.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), child);
        Ok(pid)
    }

    /// Sends `signal` to `name`; after SIGKILL, reaps it.
    pub fn signal(&self, name: &str, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid(name).with_context(|| format!("{name} has no pid"))?;
        kill(Pid::from_raw(pid as i32), signal)?;
        if signal == Signal::SIGKILL {
            if let Some(mut child) = self.children.lock().unwrap_or_else(|e| e.into_inner()).remove(name) {
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
        if let Some(mut child) = self.children.lock().unwrap_or_else(|e| e.into_inner()).remove(name) {
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
            let url = format!("http://127.0.0.1:{}", free_port()?);
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
        let child = self.children.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        if let Some(mut child) = child {
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
        let server = {
            let mut layout = self.layout.lock().unwrap_or_else(|e| e.into_inner());
            let server = layout.get(name).cloned();
            layout.servers.retain(|s| s.name != name);
            layout.save(&self.dir)?;
            server
        };
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

    /// Children that exited since the last call, with their status.
    pub fn reap_exited(&self) -> Vec<(String, ExitStatus)> {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        let mut exited = Vec::new();
        children.retain(|name, child| match child.try_wait() {
            Ok(Some(status)) => {
                exited.push((name.clone(), status));
                false
            }
            _ => true,
        });
        exited
    }

    /// SIGTERM every child, wait up to `grace`, then SIGKILL what is left.
    pub fn stop(&self, grace: Duration) {
        let mut children = std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for child in children.values() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            children.retain(|_, c| !matches!(c.try_wait(), Ok(Some(_))));
            if children.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for (name, mut child) in children {
            tracing::warn!(server = %name, "did not stop in time; killing");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        for (_, mut child) in self.children.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
