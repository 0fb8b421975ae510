//! Operator commands against a replica group.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use quire_common::client::{call, CallError};
use quire_common::headers;
use quire_raft::http::{LearnerRequest, MembershipAnswer, VotersRequest};
use quire_raft::NodeId;

/// Replaces voter `remove` of the group that `member` (any member's URL) belongs to with
/// a new node `add_id` at `add_url`, which must be running with an empty or stale data dir:
/// it joins as a learner, catches up (by snapshot if need be), then the voter set changes.
pub async fn replace_voter(
    member: &str,
    token: &str,
    remove: NodeId,
    add_id: NodeId,
    add_url: &str,
) -> anyhow::Result<()> {
    let client = quire_common::client::http_client();
    let mut leader = find_leader(&client, member).await?;
    tracing::info!(%leader, "adding node {add_id} as a learner");
    // The new node may still be starting (deciding who it is): the leader refuses to add it
    // until it answers as `add_id`.
    let started = std::time::Instant::now();
    let learner = LearnerRequest { id: add_id, url: add_url.into() };
    loop {
        match post::<_, MembershipAnswer>(&client, &leader, "/admin/learners", token, &learner).await {
            Ok(_) => break,
            Err(CallError::Api(e))
                if matches!(e.code, "unavailable" | "not_leader") && started.elapsed() < Duration::from_secs(60) =>
            {
                tracing::info!(error = %e, "node {add_id} not added yet");
                tokio::time::sleep(Duration::from_millis(300)).await;
                leader = find_leader(&client, member).await?;
            }
            Err(e) => anyhow::bail!("/admin/learners: {e}"),
        }
    }
    let status: quire_common::status::ServerStatus =
        client.get(format!("{leader}/status")).send().await?.json().await.context("leader status")?;
    let mut voters: BTreeSet<NodeId> = status.details["voters"]
        .as_array()
        .context("leader status lists no voters")?
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    voters.remove(&remove);
    voters.insert(add_id);
    tracing::info!(?voters, "changing the voter set");
    let _: MembershipAnswer =
        post(&client, &leader, "/admin/voters", token, &VotersRequest { voters, keep_learners: false })
            .await
            .map_err(|e| anyhow::anyhow!("/admin/voters: {e}"))?;
    Ok(())
}

async fn find_leader(client: &reqwest::Client, member: &str) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = client.get(format!("{member}/status")).timeout(Duration::from_secs(1)).send().await {
            if let Ok(status) = r.json::<quire_common::status::ServerStatus>().await {
                if let Some(url) = status.leader_url {
                    return Ok(url);
                }
            }
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "{member} knows no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    token: &str,
    body: &B,
) -> Result<T, CallError> {
    let request =
        client.post(format!("{base}{path}")).header(headers::TOKEN, token).timeout(Duration::from_secs(60)).json(body);
    call(request).await
}

/// Removes from each group of the store the learners no server of `layout` holds the seat
/// of: those an earlier run's autoscaler launched (a new run does not start them again) or
/// failed to remove. A learner of a seat the layout holds is kept (a new incarnation taking
/// a voter's place), and so is one of a seat the layout has not handed out yet (a server
/// this run is launching).
pub async fn remove_stray_learners(layout: crate::supervisor::Layout) {
    let client = quire_common::client::http_client();
    for tier in ["catalog", "order"] {
        let replicas: Vec<&crate::supervisor::Server> = layout.servers.iter().filter(|s| s.tier == tier).collect();
        let seats: Vec<u64> =
            replicas.iter().filter_map(|s| s.name.rsplit('-').next().and_then(|n| n.parse().ok())).collect();
        let mut learners = None;
        for replica in &replicas {
            let request = client.get(format!("{}/status", replica.url)).timeout(Duration::from_secs(1));
            let Ok(status) = call::<quire_common::status::ServerStatus>(request).await else { continue };
            if status.role == quire_common::status::Role::Leader {
                learners = status.details["learners"].as_array().cloned();
                break;
            }
        }
        let learners = learners.into_iter().flatten().filter_map(|id| id.as_u64());
        // A seat from `next_serial` on may be a server this run is launching right now.
        let strays: BTreeSet<NodeId> = quire_common::node::strays(learners, &seats)
            .into_iter()
            .filter(|id| quire_raft::seat(*id) < layout.next_serial)
            .collect();
        if strays.is_empty() {
            continue;
        }
        tracing::warn!(tier, ?strays, "removing learners no server of this store holds");
        let Some(balancer) = layout.servers.iter().find(|s| s.tier == format!("{tier}-balancer")) else { continue };
        let removed = post::<_, MembershipAnswer>(
            &client,
            &balancer.url,
            "/admin/members/remove",
            &layout.token,
            &quire_raft::http::RemoveRequest { ids: strays },
        )
        .await;
        if let Err(e) = removed {
            tracing::warn!(tier, error = %e, "stray learners not removed");
        }
    }
}
