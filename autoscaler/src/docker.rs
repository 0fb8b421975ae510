//! The autoscaler's Docker backend: the servers are the containers of one compose project
//! (docker/compose.yaml), found and started through the Docker Engine API (`bollard`).
//!
//! - The project's containers carry compose's labels: `com.docker.compose.project` names the
//!   project and `com.docker.compose.service` the server (`frontend-2`, `catalog-1`). Frontends
//!   may be removed; `catalog-N` and `order-N` are the Raft voters (node id N) and stay.
//! - A launched server is a copy of its tier's first container (image, environment, command,
//!   healthcheck, restart policy, host files it mounts), named `<project>-<tier>-<n>` and known
//!   on the project's network as `<tier>-<n>`; its command gets that name, the matching
//!   `--advertise`, and for a replica `--id n`, no `--init`, and a data directory of its own.
//! - A launched replica has no volume: it is a Raft learner, rebuilt from its group (snapshot
//!   and log) whenever it starts empty, so its data lives in the container and goes with it.
//! - Launched containers are labelled (`quire.autoscaled`, `quire.tier`, `quire.serial`,
//!   `quire.node-id`) so that a restarted autoscaler finds them and may remove them, and
//!   carry the compose project and service labels, so `compose down --remove-orphans` removes
//!   them with the stack. Serials start at 101 and are never reused while the backend runs.
//!
//! Also here: `quire autoscale` ([`AutoscaleArgs`], [`run`]), the autoscaler as a container
//! of the stack (docker/compose.cloud-sim.yaml).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use bollard::models::{ContainerCreateBody, ContainerSummary, EndpointIpamConfig, EndpointSettings, HostConfig};
use bollard::models::{MountType, NetworkingConfig};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use quire_common::capacity::Costs;
use tracing::{debug, info};

use crate::live::{Autoscaler, Backend, Config, Server};
use crate::policy::TierKind;

/// Every server of the compose stack listens here, on all of its container's addresses.
pub const PORT: u16 = 7000;

/// Launched servers are numbered from here (`frontend-101`, `catalog-101` with Raft id 101),
/// so a launched replica's id never collides with a voter's (the process backend does the same).
const FIRST_SERIAL: u64 = 101;

/// How long a stopped server has to finish after SIGTERM before Docker kills it.
const STOP_TIMEOUT_S: i32 = 3;

const PROJECT: &str = "com.docker.compose.project";
const SERVICE: &str = "com.docker.compose.service";
const AUTOSCALED: &str = "quire.autoscaled";
const TIER: &str = "quire.tier";
const SERIAL: &str = "quire.serial";
const NODE_ID: &str = "quire.node-id";

/// How the autoscaler and the store address a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum UrlBy {
    /// `http://<service>:7000`, resolved by Docker's DNS: right for an autoscaler that runs on
    /// the project's network (the `autoscaler` service of docker/compose.cloud-sim.yaml).
    #[default]
    Name,
    /// `http://<container ip>:7000`, for an autoscaler on the host, which cannot resolve the
    /// services' names (tests). A launched server gets a fixed address that it advertises, so
    /// its group, its balancers and the autoscaler know it by one URL; Docker allows fixed
    /// addresses only on a network created with an explicit subnet.
    Ip,
}

/// A container of the project that is one of the autoscaled tiers' servers.
#[derive(Debug, Clone)]
struct Found {
    id: String,
    /// The compose service name, which is also the server's name: `catalog-2`, `frontend-101`.
    service: String,
    tier: TierKind,
    /// N of `<tier>-N`: the Raft id of a replica.
    n: u64,
    autoscaled: bool,
    /// The container's address on its (first) network, if it has one now.
    ip: Option<String>,
}

/// The [`Backend`] over one compose project's containers.
pub struct Containers {
    docker: Docker,
    project: String,
    url_by: UrlBy,
    /// The next serial to hand out; only grows, so a name or Raft id is never reused in a run.
    next: Mutex<u64>,
    /// Fixed addresses handed out (under [`UrlBy::Ip`]), kept so that two launches at once
    /// never pick the same one before Docker shows either.
    issued: Mutex<BTreeSet<Ipv4Addr>>,
}

impl Containers {
    /// Connects to the local engine (`DOCKER_HOST`, else /var/run/docker.sock) at the API
    /// version both sides speak, for the compose project `project`.
    pub async fn connect(project: &str, url_by: UrlBy) -> anyhow::Result<Self> {
        let docker = Docker::connect_with_local_defaults()
            .context("cannot reach the Docker engine")?
            .negotiate_version()
            .await
            .context("cannot reach the Docker engine")?;
        let backend = Containers {
            docker,
            project: project.to_string(),
            url_by,
            next: Mutex::new(FIRST_SERIAL),
            issued: Mutex::new(BTreeSet::new()),
        };
        // Serials already taken by an earlier run's containers.
        backend.containers().await?;
        Ok(backend)
    }

    /// The compose project this backend manages.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The project's server containers (stopped ones included), lowest serial first; raises
    /// `next` past every serial seen.
    async fn containers(&self) -> anyhow::Result<Vec<Found>> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{PROJECT}={}", self.project)])]);
        let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let listed = self.docker.list_containers(Some(options)).await.context("cannot list containers")?;
        let mut found: Vec<Found> = listed.iter().filter_map(classify).collect();
        found.sort_by_key(|f| (f.tier, f.autoscaled, f.n));
        let highest = found.iter().filter(|f| f.autoscaled).map(|f| f.n).max();
        if let Some(highest) = highest {
            let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            *next = (*next).max(highest + 1);
        }
        Ok(found)
    }

    fn url(&self, found: &Found) -> anyhow::Result<String> {
        match self.url_by {
            UrlBy::Name => Ok(format!("http://{}:{PORT}", found.service)),
            UrlBy::Ip => {
                let ip = found.ip.as_deref().with_context(|| format!("{} has no address", found.service))?;
                Ok(format!("http://{ip}:{PORT}"))
            }
        }
    }

    /// A free address of `network`'s subnet, from the top down (Docker hands out addresses
    /// from the bottom up, so the two rarely meet).
    async fn free_ip(&self, network: &str) -> anyhow::Result<Ipv4Addr> {
        let inspected = self.docker.inspect_network(network, None).await.context("cannot inspect the network")?;
        let configs = inspected.ipam.and_then(|i| i.config).unwrap_or_default();
        let (base, len) = configs
            .iter()
            .find_map(|c| parse_subnet(c.subnet.as_deref()?))
            .with_context(|| format!("network {network} has no IPv4 subnet"))?;
        let mut used: BTreeSet<Ipv4Addr> = configs.iter().filter_map(|c| c.gateway.as_deref()?.parse().ok()).collect();
        for endpoint in inspected.containers.unwrap_or_default().values() {
            if let Some(ip) = endpoint.ipv4_address.as_deref().and_then(|a| a.split('/').next()?.parse().ok()) {
                used.insert(ip);
            }
        }
        let mut issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
        let size = 1u64 << (32 - len);
        // Skip the network's own address, its first (the usual gateway) and its broadcast.
        let free = (2..size.saturating_sub(1))
            .rev()
            .map(|host| Ipv4Addr::from((u64::from(u32::from(base)) + host) as u32))
            .find(|ip| !used.contains(ip) && !issued.contains(ip))
            .with_context(|| format!("network {network} has no free address"))?;
        issued.insert(free);
        Ok(free)
    }

    async fn find(&self, name: &str) -> anyhow::Result<Option<Found>> {
        Ok(self.containers().await?.into_iter().find(|f| f.service == name))
    }
}

/// The container as one of the tiers' servers, if it is one.
fn classify(c: &ContainerSummary) -> Option<Found> {
    let labels = c.labels.as_ref()?;
    let service = labels.get(SERVICE)?;
    let (tier, n) = service.rsplit_once('-')?;
    let tier = match tier {
        "frontend" => TierKind::Frontend,
        "catalog" => TierKind::Catalog,
        "order" => TierKind::Order,
        _ => return None,
    };
    let networks = c.network_settings.as_ref().and_then(|s| s.networks.as_ref());
    let ip = networks.and_then(|n| {
        let mut names: Vec<&String> = n.keys().collect();
        names.sort();
        n.get(names.first()?.as_str())?.ip_address.clone().filter(|ip| !ip.is_empty())
    });
    Some(Found {
        id: c.id.clone()?,
        service: service.clone(),
        tier,
        n: n.parse().ok()?,
        autoscaled: labels.get(AUTOSCALED).is_some_and(|v| v == "true"),
        ip,
    })
}

/// `a.b.c.d/len` as (network address, prefix length), IPv4 only.
fn parse_subnet(text: &str) -> Option<(Ipv4Addr, u32)> {
    let (addr, len) = text.split_once('/')?;
    let (addr, len): (Ipv4Addr, u32) = (addr.parse().ok()?, len.parse().ok()?);
    (len <= 30).then(|| (Ipv4Addr::from(u32::from(addr) & (u32::MAX << (32 - len))), len))
}

/// The template's command for a new server `name` reached at `url`: its own `--name` and
/// `--advertise`; for a replica, Raft seat `id`, a data directory of its own, and the
/// founding voters as `--peer`s rather than `--init` (a learner joins the group; it never
/// founds one, but asks the voters who it is should its directory be empty). Takes `--flag
/// value` and `--flag=value`.
fn rewrite_command(template: &[String], name: &str, url: &str, id: Option<u64>) -> Vec<String> {
    let mut replaced: BTreeMap<&str, String> =
        [("--name", name.to_string()), ("--advertise", url.to_string())].into_iter().collect();
    if let Some(id) = id {
        replaced.insert("--id", id.to_string());
        replaced.insert("--data-dir", format!("/data/{name}"));
    }
    let mut out = Vec::with_capacity(template.len());
    let mut seen = BTreeSet::new();
    let mut args = template.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value)),
            _ => (arg.as_str(), None),
        };
        if flag == "--init" {
            let member = match inline {
                Some(value) => Some(value),
                None => args.next().map(String::as_str),
            };
            if let Some((_, peer)) = member.and_then(|m| m.split_once('=')) {
                out.extend(["--peer".to_string(), peer.to_string()]);
            }
            continue;
        }
        match replaced.get(flag) {
            Some(value) => {
                if inline.is_none() {
                    args.next();
                }
                seen.insert(flag.to_string());
                out.push(flag.to_string());
                out.push(value.clone());
            }
            None => out.push(arg.clone()),
        }
    }
    for (flag, value) in replaced {
        if !seen.contains(flag) {
            out.push(flag.to_string());
            out.push(value);
        }
    }
    out
}

/// Host files the template mounts (a catalog CSV, say) are shared; named volumes are a
/// server's own data and are not.
fn host_binds(binds: Option<Vec<String>>) -> Option<Vec<String>> {
    let binds: Vec<String> = binds.unwrap_or_default().into_iter().filter(|b| b.starts_with('/')).collect();
    (!binds.is_empty()).then_some(binds)
}

impl Backend for Containers {
    async fn inventory(&self) -> anyhow::Result<Vec<Server>> {
        let mut found = self.containers().await?;
        // Newest first: the loop counts every server found here as launched at its start and
        // picks the first of equals to remove, so a restarted autoscaler removes its own
        // launches before the stack's frontends.
        found.sort_by_key(|f| (!f.autoscaled, std::cmp::Reverse(f.n)));
        let mut servers = Vec::new();
        for found in found {
            let url = match self.url(&found) {
                Ok(url) => url,
                Err(e) => {
                    debug!(container = %found.service, error = %e, "not counted");
                    continue;
                }
            };
            servers.push(Server {
                name: found.service.clone(),
                tier: found.tier,
                url,
                node_id: (found.tier != TierKind::Frontend).then_some(found.n),
                // The compose file's replicas are the voters: never removed.
                removable: found.autoscaled || found.tier == TierKind::Frontend,
            });
        }
        Ok(servers)
    }

    async fn launch(&self, tier: TierKind) -> anyhow::Result<Server> {
        let found = self.containers().await?;
        let template = found
            .iter()
            .find(|f| f.tier == tier)
            .with_context(|| format!("no {} container to copy in project {}", tier.name(), self.project))?;
        let n = {
            let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            let n = *next;
            *next += 1;
            n
        };
        let name = format!("{}-{n}", tier.name());
        let container_name = format!("{}-{name}", self.project);
        let inspected =
            self.docker.inspect_container(&template.id, None).await.context("cannot inspect the template")?;
        let config = inspected.config.unwrap_or_default();
        let host = inspected.host_config.unwrap_or_default();
        let mut networks: Vec<String> =
            inspected.network_settings.and_then(|s| s.networks).unwrap_or_default().into_keys().collect();
        networks.sort();
        let network = networks.into_iter().next().with_context(|| format!("{} has no network", template.service))?;
        let ip = match self.url_by {
            UrlBy::Name => None,
            UrlBy::Ip => Some(self.free_ip(&network).await?),
        };
        let url = match ip {
            Some(ip) => format!("http://{ip}:{PORT}"),
            None => format!("http://{name}:{PORT}"),
        };
        let node_id = (tier != TierKind::Frontend).then_some(n);
        let command = rewrite_command(&config.cmd.unwrap_or_default(), &name, &url, node_id);
        let mut labels: HashMap<String, String> = [
            (PROJECT, self.project.clone()),
            (SERVICE, name.clone()),
            ("com.docker.compose.oneoff", "False".to_string()),
            ("com.docker.compose.container-number", "1".to_string()),
            (AUTOSCALED, "true".to_string()),
            (TIER, tier.name().to_string()),
            (SERIAL, n.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if let Some(id) = node_id {
            labels.insert(NODE_ID.to_string(), id.to_string());
        }
        let mounts: Vec<_> =
            host.mounts.unwrap_or_default().into_iter().filter(|m| m.typ == Some(MountType::BIND)).collect();
        let endpoint = EndpointSettings {
            aliases: Some(vec![name.clone()]),
            ipam_config: ip.map(|ip| EndpointIpamConfig { ipv4_address: Some(ip.to_string()), ..Default::default() }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: config.image,
            env: config.env,
            cmd: Some(command),
            entrypoint: config.entrypoint,
            healthcheck: config.healthcheck,
            labels: Some(labels),
            host_config: Some(HostConfig {
                binds: host_binds(host.binds),
                mounts: (!mounts.is_empty()).then_some(mounts),
                restart_policy: host.restart_policy,
                network_mode: Some(network.clone()),
                ..Default::default()
            }),
            networking_config: Some(NetworkingConfig { endpoints_config: Some(HashMap::from([(network, endpoint)])) }),
            ..Default::default()
        };
        let options = CreateContainerOptions { name: Some(container_name.clone()), ..Default::default() };
        self.docker
            .create_container(Some(options), body)
            .await
            .with_context(|| format!("cannot create {container_name}"))?;
        if let Err(e) = self.docker.start_container(&container_name, None).await {
            let _ = self.remove(&container_name).await;
            return Err(anyhow::Error::new(e).context(format!("cannot start {container_name}")));
        }
        info!(container = %container_name, %url, template = %template.service, "container started");
        Ok(Server { name, tier, url, node_id, removable: true })
    }

    async fn stop(&self, server: &Server) -> anyhow::Result<()> {
        let Some(found) = self.find(&server.name).await? else {
            debug!(server = %server.name, "no container to stop");
            return Ok(());
        };
        let options = StopContainerOptions { t: Some(STOP_TIMEOUT_S), ..Default::default() };
        if let Err(e) = self.docker.stop_container(&found.id, Some(options)).await {
            debug!(server = %server.name, error = %e, "stop failed; removing by force");
        }
        self.remove(&found.id).await.with_context(|| format!("cannot remove {}", server.name))
    }
}

impl Containers {
    /// Removes a container and its anonymous volumes, running or not.
    async fn remove(&self, container: &str) -> Result<(), bollard::errors::Error> {
        let options = RemoveContainerOptions { v: true, force: true, ..Default::default() };
        self.docker.remove_container(container, Some(options)).await
    }
}

/// `quire autoscale`: the autoscaler of a store running on Docker.
#[derive(Debug, clap::Args)]
pub struct AutoscaleArgs {
    /// Act on Docker containers (the only backend for now; `quire up` runs its own).
    #[arg(long, required = true)]
    pub docker: bool,
    /// The compose project whose containers are the store.
    #[arg(long, env = "QUIRE_PROJECT", default_value = "quire")]
    pub project: String,
    /// How the autoscaler reaches servers: by service name on the project's network, or by
    /// container address (from the host; launched servers then need a network with a subnet).
    #[arg(long, value_enum, default_value_t = UrlBy::Name)]
    pub url_by: UrlBy,
    /// Autoscaling policy: default, queue, rate or hpa.
    #[arg(long, env = "QUIRE_POLICY", default_value = "default")]
    pub policy: String,
    /// Most servers per tier.
    #[arg(long, default_value_t = 12)]
    pub max_servers: u32,
    /// Worker slots per server (as the servers' `--slots`), for the policies' arithmetic.
    #[arg(long, env = "QUIRE_SLOTS", default_value_t = 1)]
    pub slots: u32,
    /// Address of the `/status` route.
    #[arg(long, default_value = "0.0.0.0:7000")]
    pub listen: String,
    #[arg(long, env = "QUIRE_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The edge balancers (the frontends' tier).
    #[arg(long, default_values_t = ["http://edge:7000".to_string()])]
    pub edge: Vec<String>,
    #[arg(long, default_values_t = ["http://catalog-balancer-1:7000".to_string(), "http://catalog-balancer-2:7000".to_string()])]
    pub catalog_balancer: Vec<String>,
    #[arg(long, default_values_t = ["http://order-balancer-1:7000".to_string(), "http://order-balancer-2:7000".to_string()])]
    pub order_balancer: Vec<String>,
}

/// Runs the autoscaler over the project's containers and serves its `/status` (and
/// `/health`, for the container's healthcheck) until Ctrl-C or SIGTERM. Servers are left
/// running when it stops: they belong to the stack.
pub async fn run(args: AutoscaleArgs) -> anyhow::Result<()> {
    let _guard = quire_common::telemetry::init("autoscaler", None)?;
    let policy = crate::policy::by_name(&args.policy)
        .with_context(|| format!("unknown policy {:?} (one of {})", args.policy, crate::policy::NAMES.join(", ")))?;
    let backend = Containers::connect(&args.project, args.url_by).await?;
    let servers = backend.inventory().await?;
    let voters = |tier| servers.iter().filter(|s| s.tier == tier && !s.removable).count() as u32;
    let max = args.max_servers.max(1);
    let config = Config {
        policy,
        costs: Costs { slots: args.slots.max(1), ..Costs::CLOUD_SIM },
        balancers: [
            (TierKind::Frontend, args.edge),
            (TierKind::Catalog, args.catalog_balancer),
            (TierKind::Order, args.order_balancer),
        ]
        .into(),
        token: args.token,
        bounds: TierKind::ALL.into_iter().map(|t| (t, (voters(t).max(1), max.max(voters(t))))).collect(),
        period: Duration::from_secs(1),
        drain_grace: Duration::from_millis(2500),
    };
    info!(project = %args.project, policy = %args.policy, servers = servers.len(), "autoscaling containers");
    let autoscaler = Autoscaler::new(backend, config).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let health = || async { axum::Json(serde_json::json!({ "ok": true })) };
    let router = autoscaler.router().route("/health", axum::routing::get(health));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "status server stopped");
        }
    });
    autoscaler.run(quire_common::shutdown::signal()).await;
    info!("autoscaler stopped; the containers keep running");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn a_replica_copy_gets_its_own_identity_and_asks_the_founders_rather_than_found() {
        let template = args(
            "catalog --id 1 --name catalog-1 --listen 0.0.0.0:7000 --advertise http://catalog-1:7000 \
             --data-dir /data --balancer http://catalog-balancer-1:7000 \
             --init 1=http://catalog-1:7000 --init=2=http://catalog-2:7000",
        );
        let copy = rewrite_command(&template, "catalog-101", "http://catalog-101:7000", Some(101));
        assert_eq!(
            copy,
            args(
                "catalog --id 101 --name catalog-101 --listen 0.0.0.0:7000 --advertise http://catalog-101:7000 \
                 --data-dir /data/catalog-101 --balancer http://catalog-balancer-1:7000 \
                 --peer http://catalog-1:7000 --peer http://catalog-2:7000"
            )
        );
    }

    #[test]
    fn a_frontend_copy_keeps_its_peers_and_adds_missing_flags() {
        let template = args("frontend --listen=0.0.0.0:7000 --name=frontend-1 --edge http://edge:7000");
        let copy = rewrite_command(&template, "frontend-102", "http://10.0.0.9:7000", None);
        assert_eq!(
            copy,
            args("frontend --listen=0.0.0.0:7000 --name frontend-102 --edge http://edge:7000 --advertise http://10.0.0.9:7000")
        );
    }

    #[test]
    fn subnets_parse_to_their_network_address() {
        assert_eq!(parse_subnet("172.28.5.7/16"), Some((Ipv4Addr::new(172, 28, 0, 0), 16)));
        assert_eq!(parse_subnet("fd00::/64"), None);
        assert_eq!(parse_subnet("10.0.0.0/31"), None);
    }

    #[test]
    fn only_host_files_are_shared() {
        let binds = vec!["quire_catalog-1:/data:rw".to_string(), "/tmp/books.csv:/books.csv:ro".to_string()];
        assert_eq!(host_binds(Some(binds)), Some(vec!["/tmp/books.csv:/books.csv:ro".to_string()]));
        assert_eq!(host_binds(Some(vec!["vol:/data".to_string()])), None);
    }
}
