//! `quire status`: asks every server of a store for its `/status`.

use std::path::Path;
use std::time::Duration;

use futures::future::join_all;
use serde::Serialize;

use quire_common::status::{Role, ServerStatus};

use crate::supervisor::Layout;

/// One row of `quire status --json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Row {
    pub name: String,
    pub tier: String,
    pub url: String,
    pub pid: Option<u32>,
    pub role: Role,
    pub leader: Option<u64>,
    pub term: u64,
    pub applied_index: u64,
    pub healthy: bool,
    pub ready: bool,
}

pub async fn collect(data_dir: &Path) -> anyhow::Result<Vec<Row>> {
    let layout = Layout::load(data_dir)?;
    let client = quire_common::client::http_client();
    let probes = layout.servers.iter().map(|server| {
        let client = client.clone();
        async move {
            let answer = client.get(format!("{}/status", server.url)).timeout(Duration::from_millis(800)).send().await;
            let status: Option<ServerStatus> = match answer {
                Ok(r) if r.status().is_success() => r.json().await.ok(),
                _ => None,
            };
            Row {
                name: server.name.clone(),
                tier: server.tier.clone(),
                url: server.url.clone(),
                pid: status.as_ref().map(|s| s.pid).or(server.pid),
                role: status.as_ref().map(|s| s.role.clone()).unwrap_or_default(),
                leader: status.as_ref().and_then(|s| s.leader),
                term: status.as_ref().map_or(0, |s| s.term),
                applied_index: status.as_ref().map_or(0, |s| s.applied_index),
                healthy: status.is_some(),
                ready: status.as_ref().is_some_and(|s| s.ready),
            }
        }
    });
    Ok(join_all(probes).await)
}

pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<19} {:<17} {:<23} {:>8} {:<9} {:>6} {:>5} {:>8} {}\n",
        "NAME", "TIER", "URL", "PID", "ROLE", "LEADER", "TERM", "APPLIED", "HEALTH"
    );
    for r in rows {
        let role = serde_json::to_value(&r.role).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        let health = match (r.healthy, r.ready) {
            (true, true) => "ready",
            (true, false) => "not ready",
            _ => "DOWN",
        };
        out.push_str(&format!(
            "{:<19} {:<17} {:<23} {:>8} {:<9} {:>6} {:>5} {:>8} {}\n",
            r.name,
            r.tier,
            r.url.trim_start_matches("http://"),
            r.pid.map_or("-".into(), |p| p.to_string()),
            role,
            r.leader.map_or("-".into(), |l| l.to_string()),
            r.term,
            r.applied_index,
            health
        ));
    }
    out
}
