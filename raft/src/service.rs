//! What every replica service (catalog, order) shares around its own API: the member's
//! configuration, the combined router, and serving (found or join the group, announce to
//! the balancers, stop Raft after the server).

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

use quire_common::http::{finish, Token};

use crate::http::Identity;
use crate::{NodeId, Replica, ReplicaConfig};

/// A replica's place in its service: who it is and whom it talks to at start.
pub struct Member {
    pub name: String,
    pub replica: ReplicaConfig,
    /// Initial voters (id → URL) when this replica helps found a new group; ignored once
    /// the group exists.
    pub init_members: Option<BTreeMap<NodeId, String>>,
    /// Balancers to register with.
    pub balancers: Vec<String>,
}

/// The service's `api` plus the `/raft/*`, `/admin/*` and status routes, with the shared
/// JSON error handling.
pub fn router(api: Router, replica: &Arc<Replica>, identity: Identity, token: Token) -> Router {
    finish(
        api.merge(crate::http::router(replica.clone(), token))
            .merge(crate::http::status_router(replica.clone(), identity)),
    )
}

/// Serves `app` until `shutdown`, founding the group if asked to and announcing this
/// replica to its balancers; stops Raft once the server has drained.
pub async fn serve(
    listener: TcpListener,
    member: &Member,
    replica: Arc<Replica>,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let server = tokio::spawn(axum::serve(listener, app).with_graceful_shutdown(shutdown).into_future());
    if let Some(members) = &member.init_members {
        replica.initialize(members).await?;
    }
    quire_common::announce::spawn(
        replica.client.clone(),
        member.balancers.clone(),
        replica.advertise.clone(),
        replica.token.0.to_string(),
        Duration::from_secs(2),
    );
    tracing::info!(server = %member.name, id = replica.id, url = %replica.advertise, "replica serving");
    // A Raft core that stopped on a storage error leaves a server that answers /health but
    // will never replicate again: exit instead, so the supervisor restarts the process.
    let wait = replica.raft.wait(None);
    let fatal = wait.metrics(|m| m.running_state.is_err(), "raft core stopped");
    tokio::select! {
        served = server => served??,
        stopped = fatal => {
            let state = stopped.map(|m| format!("{:?}", m.running_state)).unwrap_or_else(|e| e.to_string());
            anyhow::bail!("the Raft core stopped ({state}); exiting so this replica is restarted");
        }
    }
    replica.shutdown().await;
    Ok(())
}
