//! What every replica service (catalog, order) shares around its own API: the member's
//! configuration, the combined router, and serving (decide who this replica is, found or
//! join the group, announce to the balancers, stop Raft after the server).

use std::future::{Future, IntoFuture};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::Request;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tower::ServiceExt;

use quire_common::http::{finish, guarded, Token};
use quire_common::ApiError;

use crate::bootstrap::GroupView;
use crate::http::Identity;
use crate::{Machine, Replica, ReplicaConfig};

/// A replica's place in its service: who it is and whom it talks to at start.
pub struct Member {
    pub name: String,
    pub replica: ReplicaConfig,
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

/// Serves a replica of `machine` until `shutdown`: answers on `listener` at once (a
/// starting replica tells the others it has no group yet), decides who it is and starts
/// Raft, then serves `api(&replica)` with the shared routes, announces itself to its
/// balancers and, for a new incarnation, takes its seat. Stops Raft once the server has
/// drained.
pub async fn serve(
    listener: TcpListener,
    member: &Member,
    machine: impl Machine,
    identity: Identity,
    api: impl FnOnce(&Arc<Replica>) -> Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let token = member.replica.token.clone();
    let routes: Arc<OnceLock<Router>> = Arc::new(OnceLock::new());
    let blank = crate::log_store::LogStore::is_blank_dir(&member.replica.dir)?;
    let starting = starting_router(member.replica.group.clone(), token.clone(), blank);
    let late = routes.clone();
    let app = Router::new().fallback_service(tower::service_fn(move |request: Request| {
        let router = late.get().cloned().unwrap_or_else(|| starting.clone());
        router.oneshot(request)
    }));
    let server = tokio::spawn(axum::serve(listener, app).with_graceful_shutdown(shutdown).into_future());

    let replica = Replica::start(member.replica.clone(), machine).await?;
    let _ = routes.set(router(api(&replica), &replica, identity, token));
    quire_common::announce::spawn(
        replica.client.clone(),
        member.balancers.clone(),
        replica.advertise.clone(),
        replica.token.0.to_string(),
        Duration::from_secs(2),
    );
    if !replica.replaces().is_empty() {
        tokio::spawn(replica.clone().take_seat());
    }
    tracing::info!(
        server = %member.name,
        id = %crate::display_id(replica.id),
        url = %replica.advertise,
        "replica serving"
    );
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

/// What a replica answers while it starts: with an empty data directory, to the others,
/// that it has no group yet (it is deciding who it is); with a log, that it cannot tell
/// yet (it has a group, but not loaded); to everything else, that it is not ready.
fn starting_router(group: String, token: Token, blank: bool) -> Router {
    let view = GroupView { group, ..GroupView::default() };
    let raft = Router::new().route(
        "/raft/membership",
        get(move || async move {
            match blank {
                true => Ok(axum::Json(view)),
                false => Err(ApiError::unavailable("this replica has not loaded its log yet")),
            }
        }),
    );
    guarded(raft, token)
        .route("/health", get(|| async { axum::Json(serde_json::json!({"ok": true})) }))
        .fallback(|| async { ApiError::unavailable("this replica is starting") })
}
