//! The catalog service: books, stock and search, replicated by a Raft group.
//!
//! # Layout
//! - [`machine`]: the replicated state and the commands that change it.
//! - [`api`]: reads (linearizable on any replica), decrements and restocks (leader).
//! - [`leases`]: frontend cache leases, and holds pushed before a write is proposed.
//! - [`seed`]: the initial catalog (built-in or CSV), loaded through Raft.
//! - [`restock`]: the leader's background restocking of sold-out books.

pub mod api;
pub mod leases;
pub mod machine;
pub mod restock;
pub mod seed;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use quire_raft::http::Identity;
use quire_raft::{Member, Replica};

pub use api::Catalog;
use leases::Leases;
pub use restock::RestockPolicy;

pub struct Config {
    pub member: Member,
    /// `None`: the built-in seven books.
    pub catalog_csv: Option<PathBuf>,
    pub restock: RestockPolicy,
    /// How long a frontend's cache lease runs; kept under the election timeout.
    pub lease_ttl: Duration,
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
    let member = &config.member;
    anyhow::ensure!(
        config.lease_ttl < member.replica.tuning.election_min,
        "the cache lease must be shorter than the election timeout"
    );
    let token = member.replica.token.clone();
    let seeded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let identity = Identity { gate: Some(seeded.clone()), ..Identity::new(member.name.clone(), "catalog") };
    let (lease_ttl, restock) = (config.lease_ttl, config.restock);
    let api = move |replica: &Arc<Replica>| {
        let leases = Leases::new(lease_ttl, replica.id, replica.client.clone(), token.0.clone());
        let catalog = Catalog { replica: replica.clone(), leases };
        seed::spawn_seeder(replica.clone(), Arc::new(books));
        seed::spawn_seeded_watch(replica.clone(), seeded);
        restock::spawn(catalog.clone(), restock);
        spawn_office_watch(catalog.clone());
        api::router(catalog, token)
    };
    quire_raft::service::serve(listener, member, machine::Catalog, identity, api, shutdown).await
}

/// Tells the leases as soon as this replica leads a new term, so that waiting out the
/// previous leader's leases starts then rather than at the term's first write.
fn spawn_office_watch(catalog: Catalog) {
    tokio::spawn(async move {
        let mut metrics = catalog.replica.raft.metrics();
        loop {
            let leading = {
                let m = metrics.borrow_and_update();
                (m.current_leader == Some(catalog.replica.id)).then(|| (m.current_term, m.last_log_index.unwrap_or(0)))
            };
            if let Some((term, last_log)) = leading {
                catalog.leases.leading(term, last_log);
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    });
}
