//! `quire status`: asks every server of a store for its `/status`.

use std::path::Path;
use std::time::Duration;

use futures::future::join_all;
use serde::Serialize;

use quire_common::samples::FleetStatus;
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

/// `quire status --json`: every server, and the autoscaler's view when one runs.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    pub servers: Vec<Row>,
    pub fleet: Option<FleetStatus>,
}

pub async fn report(data_dir: &Path) -> anyhow::Result<Report> {
    let servers = collect(data_dir).await?;
    let fleet = match Layout::load(data_dir)?.autoscaler {
        Some(url) => {
            let answer = quire_common::client::http_client()
                .get(format!("{url}/status"))
                .timeout(Duration::from_millis(800))
                .send()
                .await;
            match answer {
                Ok(r) if r.status().is_success() => r.json().await.ok(),
                _ => None,
            }
        }
        None => None,
    };
    Ok(Report { servers, fleet })
}

/// The autoscaler's part of the table: servers and server-seconds per tier.
pub fn fleet_table(fleet: &FleetStatus) -> String {
    let mut out = format!("\nautoscaler: policy {}\n", fleet.policy);
    out += &format!(
        "{:<9} {:>5} {:>7} {:>8} {:>9} {:>9} {:>7} {:>6} {:>8}\n",
        "TIER", "READY", "BOOTING", "DRAINING", "SERVER-S", "ARRIVALS", "QUEUE", "DROPS", "P99-MS"
    );
    for (tier, f) in &fleet.tiers {
        let s = f.sample.clone().unwrap_or_default();
        out += &format!(
            "{:<9} {:>5} {:>7} {:>8} {:>9.0} {:>8.1}/s {:>7} {:>6} {:>8.0}\n",
            tier,
            f.ready,
            f.booting,
            f.draining,
            f.server_seconds,
            s.arrival_rate,
            s.queue_len,
            s.drops(),
            s.latency_ms.p99
        );
    }
    out
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
