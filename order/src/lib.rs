//! The order service: the order log and the exactly-once buy workflow, replicated by a
//! Raft group.
//!
//! # Layout
//! - [`machine`]: the replicated order rows and the commands that change them.
//! - [`buy`]: the workflow across the two groups and the recovery of pending orders.
//! - [`api`]: `POST /orders` (leader), `GET /orders/{id}` (any replica).

pub mod api;
pub mod buy;
pub mod machine;

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

use quire_common::http::{finish, Token};
use quire_raft::http::Identity;
use quire_raft::{NodeId, Replica, ReplicaConfig, Tuning};

pub use buy::Shop;

pub struct Config {
    pub name: String,
    pub id: NodeId,
    pub advertise: String,
    pub data_dir: PathBuf,
    pub token: Token,
    pub tuning: Tuning,
    pub init_members: Option<BTreeMap<NodeId, String>>,
    /// Order balancers to register with.
    pub balancers: Vec<String>,
    /// Catalog balancers the buy workflow calls.
    pub catalog: Vec<String>,
    /// Pending orders older than this are finished by the recovery task.
    pub recover_after: Duration,
}

pub fn router(shop: Shop, identity: Identity, token: Token) -> Router {
    finish(
        api::router(shop.clone(), token.clone())
            .merge(quire_raft::http::router(shop.replica.clone(), token))
            .merge(quire_raft::http::status_router(shop.replica.clone(), identity)),
    )
}

pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(!config.catalog.is_empty(), "the order service needs at least one catalog balancer");
    let replica = Replica::start(
        ReplicaConfig {
            id: config.id,
            advertise: config.advertise.clone(),
            dir: config.data_dir.clone(),
            token: config.token.clone(),
            tuning: config.tuning.clone(),
        },
        Arc::new(machine::Orders),
    )
    .await?;
    let shop = Shop::new(replica.clone(), config.catalog.clone(), config.token.0.clone());
    let identity = Identity::new(config.name.clone(), "order");
    let app = router(shop.clone(), identity, config.token.clone());
    let server = tokio::spawn(axum::serve(listener, app).with_graceful_shutdown(shutdown).into_future());
    if let Some(members) = &config.init_members {
        replica.initialize(members).await?;
    }
    buy::spawn_recovery(shop, config.recover_after);
    quire_common::announce::spawn(
        replica.client.clone(),
        config.balancers.clone(),
        config.advertise.clone(),
        config.token.0.to_string(),
        Duration::from_secs(2),
    );
    tracing::info!(id = config.id, url = %config.advertise, "order replica serving");
    server.await??;
    replica.shutdown().await;
    Ok(())
}
