//! The order service: the order log and the exactly-once buy workflow, replicated by a
//! Raft group.
//!
//! # Layout
//! - [`machine`]: the replicated order rows and the commands that change them.
//! - [`buy`]: the workflow across the two groups, and the reconciler that gives every
//!   catalog sale its order.
//! - [`api`]: `POST /orders` (leader), `GET /orders/{id}` (any replica).

pub mod api;
pub mod buy;
pub mod machine;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use quire_raft::http::Identity;
use quire_raft::{Member, Replica};

pub use buy::Shop;

pub struct Config {
    pub member: Member,
    /// Catalog balancers the buy workflow calls.
    pub catalog: Vec<String>,
    /// A catalog sale still without an order this long after the reconciler first saw it
    /// is given its order (see [`buy::spawn_reconciler`]).
    pub recover_after: Duration,
}

pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(!config.catalog.is_empty(), "the order service needs at least one catalog balancer");
    let member = &config.member;
    let token = member.replica.token.clone();
    let identity = Identity::new(member.name.clone(), "order");
    let (catalog, recover_after) = (config.catalog.clone(), config.recover_after);
    let api = move |replica: &Arc<Replica>| {
        let shop = Shop::new(replica.clone(), catalog, token.0.clone());
        buy::spawn_reconciler(shop.clone(), recover_after);
        api::router(shop, token)
    };
    quire_raft::service::serve(listener, member, machine::Orders, identity, api, shutdown).await
}
