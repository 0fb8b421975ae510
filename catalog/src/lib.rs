//! The catalog service: books, stock and search, replicated by a Raft group.
//!
//! # Layout
//! - [`machine`]: the replicated state and the commands that change it.
//! - [`api`]: reads (linearizable on any replica), decrements and restocks (leader).
//! - [`leases`]: frontend cache leases and invalidation push before acknowledging writes.
//! - [`seed`]: the initial catalog (built-in or CSV), loaded through Raft.
//! - [`restock`]: the leader's background restocking of sold-out books.

pub mod api;
pub mod leases;
pub mod machine;
pub mod restock;
pub mod seed;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

use quire_common::http::{finish, Token};
use quire_raft::http::Identity;
use quire_raft::{NodeId, Replica, ReplicaConfig, Tuning};

pub use api::Catalog;
use leases::Leases;
pub use restock::RestockPolicy;

pub struct Config {
    pub name: String,
    pub id: NodeId,
    pub advertise: String,
    pub data_dir: PathBuf,
    pub token: Token,
    pub tuning: Tuning,
    /// Initial voters (id → URL) when this replica helps found a new group.
    pub init_members: Option<BTreeMap<NodeId, String>>,
    /// Balancers to register with.
    pub balancers: Vec<String>,
    /// `None`: the built-in seven books.
    pub catalog_csv: Option<PathBuf>,
    pub restock: RestockPolicy,
    /// How long a frontend's cache lease runs; kept under the election timeout.
    pub lease_ttl: Duration,
}

pub fn router(catalog: Catalog, identity: Identity, token: Token) -> Router {
    finish(
        api::router(catalog.clone(), token.clone())
            .merge(quire_raft::http::router(catalog.replica.clone(), token))
            .merge(quire_raft::http::status_router(catalog.replica.clone(), identity)),
    )
}

pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let books = match &config.catalog_csv {
        Some(path) => seed::from_csv(path)?,
        None => seed::builtin(),
    };
    anyhow::ensure!(
        config.lease_ttl < config.tuning.election_min,
        "the cache lease must be shorter than the election timeout"
    );
    let replica = Replica::start(
        ReplicaConfig {
            id: config.id,
            advertise: config.advertise.clone(),
            dir: config.data_dir.clone(),
            token: config.token.clone(),
            tuning: config.tuning.clone(),
        },
        Arc::new(machine::Catalog),
    )
    .await?;
    let leases = Leases::new(config.lease_ttl, replica.client.clone(), config.token.0.clone());
    let catalog = Catalog { replica: replica.clone(), leases };
    let seeded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let identity = Identity { gate: Some(seeded.clone()), ..Identity::new(config.name.clone(), "catalog") };
    let app = router(catalog.clone(), identity, config.token.clone());

    let server =
        tokio::spawn(std::future::IntoFuture::into_future(axum::serve(listener, app).with_graceful_shutdown(shutdown)));
    if let Some(members) = &config.init_members {
        replica.initialize(members).await?;
    }
    seed::spawn_seeder(replica.clone(), Arc::new(books));
    seed::spawn_seeded_watch(replica.clone(), seeded);
    restock::spawn(catalog, config.restock);
    quire_common::announce::spawn(
        replica.client.clone(),
        config.balancers.clone(),
        config.advertise.clone(),
        config.token.0.to_string(),
        Duration::from_secs(2),
    );
    tracing::info!(id = config.id, url = %config.advertise, "catalog replica serving");
    server.await??;
    replica.shutdown().await;
    Ok(())
}
