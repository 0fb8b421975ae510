//! The autoscaler of a running store: every period it reads each tier's samples from the
//! tier's balancers and each server's `/status`, asks the policy for targets, and acts
//! through a [`Backend`] (local processes under `quire up`, containers under Docker).
//!
//! What the loop does itself, whatever the backend:
//! - a new catalog or order server is started empty and added to its Raft group as a
//!   learner (a read replica); it takes work once it is booted and caught up;
//! - a server being removed is drained first: it reports not ready, so the balancers take
//!   it out of rotation; once its work has finished, a learner leaves the group, the
//!   backend stops it, and the balancers forget it;
//! - the three voters of each group are never removed;
//! - server-seconds are counted per tier from launch to stop, booting and draining included.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use quire_common::capacity::Costs;
use quire_common::headers;
use quire_common::node::seat;
use quire_common::samples::{FleetStatus, TierFleet, TierSample};
use quire_common::status::{Role, ServerStatus};
use serde_json::json;
use tracing::{info, warn};

use crate::policy::{Observation, Policy, TierKind, TierState};

/// One server the autoscaler knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub name: String,
    pub tier: TierKind,
    /// Base URL, as its balancers know it.
    pub url: String,
    /// Raft node id (catalog and order servers).
    pub node_id: Option<u64>,
    /// False for the servers the store cannot do without (the Raft voters).
    pub removable: bool,
}

/// Starts and stops servers. Everything else (joining a group, draining, leaving it) is
/// done by the control loop through the servers' and balancers' own APIs.
pub trait Backend: Send + Sync + 'static {
    /// The servers running when the autoscaler starts.
    fn inventory(&self) -> impl Future<Output = anyhow::Result<Vec<Server>>> + Send;
    /// Starts one new server of `tier`; a replica starts empty and outside its group.
    fn launch(&self, tier: TierKind) -> impl Future<Output = anyhow::Result<Server>> + Send;
    /// Stops `server` for good and deletes its data.
    fn stop(&self, server: &Server) -> impl Future<Output = anyhow::Result<()>> + Send;
}

pub struct Config {
    pub policy: Box<dyn Policy>,
    /// What work costs, for the policies (the store's `cloud-sim` costs).
    pub costs: Costs,
    /// The balancers in front of each tier: the edge for frontends.
    pub balancers: BTreeMap<TierKind, Vec<String>>,
    pub token: String,
    /// (min, max) servers per tier; a Raft tier's min is at least its voters.
    pub bounds: BTreeMap<TierKind, (u32, u32)>,
    pub period: Duration,
    /// How long a drained server is left to finish what it admitted before it stops: the
    /// longest deadline a request may carry through it.
    pub drain_grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Booting,
    Ready,
    Draining,
}

struct Tracked {
    server: Server,
    phase: Phase,
    launched: Instant,
}

#[derive(Default)]
struct State {
    servers: Vec<Tracked>,
    /// Launches under way, not yet in `servers`.
    pending: BTreeMap<TierKind, u32>,
    seconds: BTreeMap<TierKind, f64>,
    status: FleetStatus,
    /// Learners no tracked server holds the seat of, and since when: one is removed only
    /// once it has been a stray for `STRAY_GRACE` (a launch may be adding it right now).
    strays: BTreeMap<(TierKind, u64), Instant>,
}

/// How long a learner must stay a stray before it is removed.
const STRAY_GRACE: Duration = Duration::from_secs(30);

/// The running autoscaler: its state is shared with the launch and drain tasks and with
/// the `/status` route.
pub struct Autoscaler<B> {
    backend: Arc<B>,
    policy: Mutex<Box<dyn Policy>>,
    costs: Costs,
    balancers: BTreeMap<TierKind, Vec<String>>,
    token: String,
    bounds: BTreeMap<TierKind, (u32, u32)>,
    period: Duration,
    drain_grace: Duration,
    client: reqwest::Client,
    state: Mutex<State>,
    started: Instant,
}

impl<B: Backend> Autoscaler<B> {
    pub async fn new(backend: B, config: Config) -> anyhow::Result<Arc<Self>> {
        let servers = backend.inventory().await?;
        let now = Instant::now();
        let state = State {
            servers: servers
                .into_iter()
                .map(|server| Tracked { server, phase: Phase::Booting, launched: now })
                .collect(),
            status: FleetStatus { policy: config.policy.name().to_string(), ..FleetStatus::default() },
            ..State::default()
        };
        Ok(Arc::new(Autoscaler {
            backend: Arc::new(backend),
            policy: Mutex::new(config.policy),
            costs: config.costs,
            balancers: config.balancers,
            token: config.token,
            bounds: config.bounds,
            period: config.period,
            drain_grace: config.drain_grace,
            client: quire_common::client::http_client(),
            state: Mutex::new(state),
            started: now,
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state whole, so a panicked holder changes nothing.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fleet as `GET /status` shows it.
    pub fn status(&self) -> FleetStatus {
        self.state().status.clone()
    }

    /// Serves `GET /status` (the [`FleetStatus`]) on `listener` until `shutdown`.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        let me = self.clone();
        axum::Router::new().route("/status", axum::routing::get(move || async move { axum::Json(me.status()) }))
    }

    /// Decides every period until `shutdown`; then stops nothing: the servers belong to the
    /// store, which stops them itself.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let dt = now.duration_since(last).as_secs_f64();
            last = now;
            self.step(dt).await;
        }
    }

    /// One period: observe, account, decide, act.
    async fn step(self: &Arc<Self>, dt: f64) {
        let (samples, probes) = tokio::join!(self.samples(), self.probe_servers());
        self.remove_strays(&probes).await;
        let observation = {
            let mut state = self.state();
            for (name, status) in probes {
                let ready = status.is_some_and(|s| s.ready);
                if let Some(t) = state.servers.iter_mut().find(|t| t.server.name == name) {
                    if t.phase != Phase::Draining {
                        t.phase = if ready { Phase::Ready } else { Phase::Booting };
                    }
                }
            }
            let State { servers, seconds, .. } = &mut *state;
            for t in servers.iter() {
                *seconds.entry(t.server.tier).or_default() += dt;
            }
            let tiers = TierKind::ALL.map(|kind| self.tier_state(&state, kind, &samples));
            state.status = self.fleet_status(&state, &tiers);
            Observation { now: self.started.elapsed().as_secs_f64(), costs: self.costs, tiers: tiers.to_vec() }
        };
        let decisions = self.policy.lock().unwrap_or_else(PoisonError::into_inner).decide(&observation);
        for decision in decisions {
            let Some(tier) = observation.tier(decision.tier) else { continue };
            let target = decision.target.clamp(tier.min, tier.max);
            let current = tier.current();
            if target > current {
                info!(tier = decision.tier.name(), from = current, to = target, "scaling out");
                for _ in current..target {
                    self.launch(decision.tier);
                }
            } else if target < current {
                info!(tier = decision.tier.name(), from = current, to = target, "scaling in");
                self.drain_surplus(decision.tier, current - target);
            }
        }
    }

    fn tier_state(&self, state: &State, kind: TierKind, samples: &BTreeMap<TierKind, TierSample>) -> TierState {
        let count = |phase| state.servers.iter().filter(|t| t.server.tier == kind && t.phase == phase).count() as u32;
        let (min, max) = self.bounds.get(&kind).copied().unwrap_or((1, u32::MAX));
        TierState {
            tier: kind,
            sample: samples.get(&kind).cloned().unwrap_or_default(),
            ready: count(Phase::Ready),
            booting: count(Phase::Booting) + state.pending.get(&kind).copied().unwrap_or(0),
            min,
            max,
        }
    }

    fn fleet_status(&self, state: &State, tiers: &[TierState]) -> FleetStatus {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let fleet = tiers.iter().map(|t| {
            let draining = state.servers.iter().filter(|s| s.server.tier == t.tier && s.phase == Phase::Draining);
            let fleet = TierFleet {
                ready: t.ready,
                booting: t.booting,
                draining: draining.count() as u32,
                min: t.min,
                max: t.max,
                server_seconds: state.seconds.get(&t.tier).copied().unwrap_or(0.0),
                sample: (t.sample.at_ms > 0).then(|| t.sample.clone()),
            };
            (t.tier.name().to_string(), fleet)
        });
        FleetStatus { at_ms: now_ms, policy: state.status.policy.clone(), tiers: fleet.collect() }
    }

    /// Each tier's last sample, merged over its balancers.
    async fn samples(&self) -> BTreeMap<TierKind, TierSample> {
        let polls = self.balancers.iter().map(|(kind, urls)| async move {
            let answers = join_all(urls.iter().map(|url| self.get_status(url))).await;
            let samples: Vec<TierSample> = answers
                .into_iter()
                .flatten()
                .filter_map(|s| serde_json::from_value(s.details.get("sample")?.clone()).ok())
                .collect();
            TierSample::merge(&samples).map(|s| (*kind, s))
        });
        join_all(polls).await.into_iter().flatten().collect()
    }

    /// Removes from each group the learners no server of the fleet holds the seat of: one
    /// whose removal failed when it was retired, or one left by an earlier run. A learner
    /// of a tracked seat (a new incarnation taking a voter's place) is the fleet's own; one
    /// is left alone until it has been a stray for `STRAY_GRACE`.
    async fn remove_strays(&self, probes: &[(String, Option<ServerStatus>)]) {
        for tier in [TierKind::Catalog, TierKind::Order] {
            let names: Vec<String> = {
                let state = self.state();
                state.servers.iter().filter(|t| t.server.tier == tier).map(|t| t.server.name.clone()).collect()
            };
            let Some(leader) = probes
                .iter()
                .filter(|(name, _)| names.contains(name))
                .filter_map(|(_, s)| s.as_ref())
                .find(|s| s.role == Role::Leader)
            else {
                continue;
            };
            let seats: Vec<u64> = {
                let state = self.state();
                let tracked = state.servers.iter().filter(|t| t.server.tier == tier);
                tracked.filter_map(|t| t.server.node_id.map(seat)).collect()
            };
            let learners = leader.details["learners"].as_array().into_iter().flatten().filter_map(|id| id.as_u64());
            let now = Instant::now();
            let strays: Vec<u64> = {
                let mut state = self.state();
                let seen = quire_common::node::strays(learners, &seats);
                state.strays.retain(|(t, id), _| *t != tier || seen.contains(id));
                for id in &seen {
                    state.strays.entry((tier, *id)).or_insert(now);
                }
                seen.into_iter().filter(|id| now.duration_since(state.strays[&(tier, *id)]) >= STRAY_GRACE).collect()
            };
            if strays.is_empty() {
                continue;
            }
            warn!(tier = tier.name(), ?strays, "removing learners no server of the fleet holds");
            let body = json!({ "ids": strays });
            if let Err(e) = self.post_to_group(tier, "/admin/members/remove", &body, Duration::from_secs(10)).await {
                warn!(tier = tier.name(), error = %e, "stray learners not removed yet");
            }
        }
    }

    /// `(name, status)` of every server not draining.
    async fn probe_servers(&self) -> Vec<(String, Option<ServerStatus>)> {
        let targets: Vec<(String, String)> = self
            .state()
            .servers
            .iter()
            .filter(|t| t.phase != Phase::Draining)
            .map(|t| (t.server.name.clone(), t.server.url.clone()))
            .collect();
        join_all(targets.into_iter().map(|(name, url)| async move { (name, self.get_status(&url).await) })).await
    }

    async fn get_status(&self, url: &str) -> Option<ServerStatus> {
        let answer = self.client.get(format!("{url}/status")).timeout(self.period / 2).send().await.ok()?;
        answer.error_for_status().ok()?.json().await.ok()
    }

    /// Starts one server in the background; it counts as booting from now.
    fn launch(self: &Arc<Self>, tier: TierKind) {
        *self.state().pending.entry(tier).or_default() += 1;
        let me = self.clone();
        tokio::spawn(async move {
            let launched = me.backend.launch(tier).await;
            let join = {
                let mut state = me.state();
                *state.pending.entry(tier).or_default() -= 1;
                match launched {
                    Ok(server) => {
                        info!(server = %server.name, url = %server.url, "launched");
                        let join = server.node_id.map(|id| (id, server.url.clone()));
                        state.servers.push(Tracked { server, phase: Phase::Booting, launched: Instant::now() });
                        join
                    }
                    Err(e) => {
                        warn!(tier = tier.name(), error = %e, "launch failed");
                        None
                    }
                }
            };
            if let Some((id, url)) = join {
                me.join_group(tier, id, &url).await;
            }
        });
    }

    /// Adds a new replica to its group as a learner, retrying until the group takes it or
    /// the replica is drained meanwhile.
    async fn join_group(&self, tier: TierKind, id: u64, url: &str) {
        let body = json!({ "id": id, "url": url });
        loop {
            match self.post_to_group(tier, "/admin/learners", &body, Duration::from_secs(30)).await {
                Ok(()) => {
                    info!(tier = tier.name(), id, %url, "learner joined its group");
                    return;
                }
                Err(e) => tracing::debug!(tier = tier.name(), id, error = %e, "learner not added yet"),
            }
            let still_wanted = self.state().servers.iter().any(|t| t.server.url == url && t.phase != Phase::Draining);
            if !still_wanted {
                return;
            }
            tokio::time::sleep(self.period).await;
        }
    }

    /// Sends an admin write to a tier's group through its balancers (which find the leader).
    async fn post_to_group(
        &self,
        tier: TierKind,
        path: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let mut last = anyhow::anyhow!("no balancer for {}", tier.name());
        for balancer in self.balancers.get(&tier).into_iter().flatten() {
            let sent = self
                .client
                .post(format!("{balancer}{path}"))
                .header(headers::TOKEN, &self.token)
                .timeout(timeout)
                .json(body)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => last = anyhow::anyhow!("{balancer}{path} answered {}", r.status()),
                Err(e) => last = e.into(),
            }
        }
        Err(last)
    }

    /// Picks `count` removable servers of `tier`, booting ones first, newest first, and
    /// drains each in the background.
    fn drain_surplus(self: &Arc<Self>, tier: TierKind, count: u32) {
        let victims: Vec<Server> = {
            let mut state = self.state();
            let mut candidates: Vec<&mut Tracked> = state
                .servers
                .iter_mut()
                .filter(|t| t.server.tier == tier && t.server.removable && t.phase != Phase::Draining)
                .collect();
            candidates.sort_by_key(|t| (t.phase == Phase::Ready, std::cmp::Reverse(t.launched)));
            candidates
                .into_iter()
                .take(count as usize)
                .map(|t| {
                    t.phase = Phase::Draining;
                    t.server.clone()
                })
                .collect()
        };
        for server in victims {
            let me = self.clone();
            tokio::spawn(async move { me.retire(server).await });
        }
    }

    /// Drain, wait for admitted work, leave the group, stop, and forget.
    async fn retire(&self, server: Server) {
        info!(server = %server.name, "draining");
        let drained = self
            .client
            .post(format!("{}/admin/drain", server.url))
            .header(headers::TOKEN, &self.token)
            .timeout(Duration::from_secs(1))
            .send()
            .await;
        if let Err(e) = drained {
            tracing::debug!(server = %server.name, error = %e, "drain not acknowledged (stopping anyway)");
        }
        // Balancers see the server unready within a few heartbeats; what it admitted before
        // ends within the longest deadline. Then wait for its slots to be free.
        tokio::time::sleep(self.drain_grace).await;
        let until = Instant::now() + self.drain_grace;
        while Instant::now() < until {
            match self.get_status(&server.url).await {
                Some(s) if s.busy > 0 => tokio::time::sleep(self.period / 4).await,
                _ => break,
            }
        }
        if let Some(id) = server.node_id {
            let body = json!({ "ids": [id] });
            if let Err(e) =
                self.post_to_group(server.tier, "/admin/members/remove", &body, Duration::from_secs(10)).await
            {
                warn!(server = %server.name, error = %e, "could not remove the learner from its group");
            }
        }
        if let Err(e) = self.backend.stop(&server).await {
            warn!(server = %server.name, error = %e, "stop failed");
        }
        for balancer in self.balancers.get(&server.tier).into_iter().flatten() {
            let forgotten = self
                .client
                .delete(format!("{balancer}/admin/backends"))
                .header(headers::TOKEN, &self.token)
                .timeout(Duration::from_secs(1))
                .json(&json!({ "url": server.url }))
                .send()
                .await;
            if let Err(e) = forgotten {
                tracing::debug!(%balancer, error = %e, "balancer did not forget the server");
            }
        }
        self.state().servers.retain(|t| t.server.name != server.name);
        info!(server = %server.name, "retired");
    }
}
