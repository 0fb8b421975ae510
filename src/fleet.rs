//! The autoscaler's process backend: under `quire up`, a server is a child process of the
//! supervisor, launched with the same flags as its tier's first server, numbered from the
//! store layout's serial (`frontend-101`, `catalog-102` with Raft seat 102, ...).

use std::sync::Arc;
use std::time::Duration;

use quire_autoscaler::live::{Backend, Server};
use quire_autoscaler::TierKind;

use crate::supervisor::Store;

pub struct Processes {
    store: Arc<Store>,
}

impl Processes {
    pub fn new(store: Arc<Store>) -> Self {
        Processes { store }
    }
}

fn kind(tier: &str) -> Option<TierKind> {
    match tier {
        "frontend" => Some(TierKind::Frontend),
        "catalog" => Some(TierKind::Catalog),
        "order" => Some(TierKind::Order),
        _ => None,
    }
}

fn node_id(name: &str) -> Option<u64> {
    name.rsplit('-').next()?.parse().ok()
}

impl Backend for Processes {
    async fn inventory(&self) -> anyhow::Result<Vec<Server>> {
        let servers = self.store.layout().servers.into_iter().filter_map(|s| {
            let tier = kind(&s.tier)?;
            // The replicas the store was planned with are the voters: never removed.
            let removable = tier == TierKind::Frontend;
            let node_id = (tier != TierKind::Frontend).then(|| node_id(&s.name)).flatten();
            Some(Server { name: s.name, tier, url: s.url, node_id, removable })
        });
        Ok(servers.collect())
    }

    async fn launch(&self, tier: TierKind) -> anyhow::Result<Server> {
        // From the store's layout: never one a server of this or an earlier run had.
        let n = self.store.next_serial()?;
        // Forking here, on a runtime worker, is deliberate: children die with the thread that
        // spawned them (PDEATHSIG), and workers live as long as the store.
        let (name, url) = match tier {
            TierKind::Frontend => {
                let server = self.store.add_frontend(n)?;
                (server.name, server.url)
            }
            TierKind::Catalog | TierKind::Order => {
                let name = self.store.add_replica(tier.name(), n)?;
                let url = self.store.url(&name)?;
                (name, url)
            }
        };
        let node_id = (tier != TierKind::Frontend).then_some(n);
        Ok(Server { name, tier, url, node_id, removable: true })
    }

    async fn stop(&self, server: &Server) -> anyhow::Result<()> {
        // Waiting for the process to exit blocks: off the runtime's workers.
        let (store, name) = (self.store.clone(), server.name.clone());
        tokio::task::spawn_blocking(move || store.remove(&name, Duration::from_secs(3))).await?
    }
}
