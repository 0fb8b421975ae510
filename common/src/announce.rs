//! Servers announce themselves to their balancers: once at start and then periodically,
//! so that a balancer that restarted (or was added later) learns its backends again.

use std::time::Duration;

use crate::headers;

/// Registers `me` with every balancer in `balancers` now and every `every` after, until the
/// task is dropped. Failures are logged at debug level: a balancer may simply not be up yet.
pub fn spawn(client: reqwest::Client, balancers: Vec<String>, me: String, token: String, every: Duration) {
    if balancers.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            for balancer in &balancers {
                let sent = client
                    .post(format!("{balancer}/admin/backends"))
                    .header(headers::TOKEN, &token)
                    .timeout(Duration::from_secs(1))
                    .json(&serde_json::json!({ "url": me }))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => tracing::warn!(%balancer, status = %r.status(), "balancer refused registration"),
                    Err(e) => tracing::debug!(%balancer, error = %e, "balancer not reachable for registration"),
                }
            }
        }
    });
}
