//! Frontend cache leases and invalidation push (ARCHITECTURE.md §4 "Cache coherence").
//!
//! A frontend may serve cached books only while it holds a lease from the current catalog
//! leader. The leader grants a lease only after confirming its leadership with a quorum
//! *after* the request arrived, and for less than the election timeout: so no other leader
//! can commit a write while a lease it did not grant is still running.
//!
//! That argument holds for voters, which refuse to vote while they hear from a leader. The
//! old leader itself may vote for a new one at once (openraft does not renew a leader's
//! own vote lease), so a new leader also waits one lease length after taking office before
//! acknowledging its first write: by then every lease an earlier leader granted is over.
//!
//! Before a write is acknowledged, the leader pushes `(id, version)` to every frontend
//! with a live lease and waits for the acks. A frontend that does not ack is waited out:
//! the write is acknowledged only after that frontend's lease has expired, by which time
//! it has stopped serving from its cache, and the frontend's count of missed invalidations
//! grows so that its next lease makes it flush.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures::future::join_all;

use quire_common::api::Invalidation;
use quire_common::batch::Batcher;
use quire_common::headers;

/// Leases granted by this replica while it led, by frontend base URL, and the batched
/// invalidation pushes to their holders.
#[derive(Clone)]
pub struct Leases {
    inner: Arc<Inner>,
    pushes: Batcher<Vec<(u64, u64)>, ()>,
}

struct Inner {
    ttl: Duration,
    granted: DashMap<String, Lease>,
    client: reqwest::Client,
    token: Arc<str>,
    /// The term this replica last led and when it was first seen leading it.
    office: std::sync::Mutex<Option<(u64, Instant)>>,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    expiry: Instant,
    /// Invalidations to this frontend that failed. Raised and read under the map's entry
    /// lock together with `expiry`, so a renewal either happened before the failure (and is
    /// waited out) or reports the higher count.
    missed: u64,
}

impl Leases {
    pub fn new(ttl: Duration, client: reqwest::Client, token: Arc<str>) -> Self {
        let inner =
            Arc::new(Inner { ttl, granted: DashMap::new(), client, token, office: std::sync::Mutex::new(None) });
        let pusher = inner.clone();
        let pushes = Batcher::spawn(move |batches: Vec<Vec<(u64, u64)>>| {
            let pusher = pusher.clone();
            async move { pusher.push(merge(batches)).await }
        });
        Leases { inner, pushes }
    }

    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Records a lease for `frontend` running `ttl` from `asked_at` (the moment the request
    /// arrived, which is no earlier than when the frontend sent it). Returns how many
    /// invalidations the frontend has missed.
    pub fn grant(&self, frontend: &str, asked_at: Instant) -> u64 {
        let mut lease = self.inner.granted.entry(frontend.to_string()).or_insert(Lease { expiry: asked_at, missed: 0 });
        lease.expiry = asked_at + self.inner.ttl;
        lease.missed
    }

    /// Notes that this replica leads `term` (called as soon as it is seen leading).
    pub fn leading(&self, term: u64) {
        self.inner.took_office(term);
    }

    pub fn live(&self) -> usize {
        let now = Instant::now();
        self.inner.granted.iter().filter(|e| e.value().expiry > now).count()
    }

    /// Tells every leased frontend that book `id` changed at `version` (written in
    /// `term`); returns once each has acked or its lease has run out, and no earlier than
    /// one lease length after this replica began leading `term`. Concurrent calls share
    /// one push per frontend.
    pub async fn invalidate(&self, id: u64, version: u64, term: u64) {
        let since = self.inner.took_office(term);
        tokio::time::sleep_until((since + self.inner.ttl).into()).await;
        if self.pushes.submit(vec![(id, version)]).await.is_none() {
            // The push task is gone: wait out every lease instead of pushing.
            tracing::error!("invalidation task stopped; waiting out every lease");
            tokio::time::sleep(self.inner.ttl).await;
        }
    }
}

/// One `(id, version)` per book: the newest write of each.
fn merge(batches: Vec<Vec<(u64, u64)>>) -> Vec<(u64, u64)> {
    let mut newest = std::collections::BTreeMap::new();
    for (id, version) in batches.into_iter().flatten() {
        let v = newest.entry(id).or_insert(version);
        *v = (*v).max(version);
    }
    newest.into_iter().collect()
}

impl Inner {
    /// When this replica began leading `term`, as far as it knows: the first time it was
    /// asked (later than the truth, which only makes waits longer, never shorter).
    fn took_office(&self, term: u64) -> Instant {
        let mut office = self.office.lock().unwrap_or_else(|e| e.into_inner());
        match *office {
            Some((t, since)) if t == term => since,
            _ => {
                let now = Instant::now();
                *office = Some((term, now));
                now
            }
        }
    }

    async fn push(&self, items: Vec<(u64, u64)>) {
        let now = Instant::now();
        // Leases that ended long ago are forgotten; their frontends re-register on renewal.
        self.granted.retain(|_, lease| lease.expiry + Duration::from_secs(60) > now);
        let live: Vec<(String, Instant)> = self
            .granted
            .iter()
            .filter(|e| e.value().expiry > now)
            .map(|e| (e.key().clone(), e.value().expiry))
            .collect();
        if live.is_empty() {
            return;
        }
        let body = Invalidation { items };
        let pushes = live.into_iter().map(|(url, expiry)| {
            let request = self
                .client
                .post(format!("{url}/internal/invalidate"))
                .header(headers::TOKEN, &*self.token)
                .timeout(expiry.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))
                .json(&body);
            async move {
                match request.send().await {
                    Ok(r) if r.status().is_success() => {}
                    outcome => {
                        tracing::warn!(frontend = %url, ?outcome, "invalidation not acked; waiting out its lease");
                        self.wait_out(&url).await;
                    }
                }
            }
        });
        join_all(pushes).await;
    }

    /// Marks `frontend` as having missed an invalidation and sleeps until its current
    /// lease (possibly renewed since the push began) has expired.
    async fn wait_out(&self, frontend: &str) {
        let expiry = match self.granted.get_mut(frontend) {
            Some(mut lease) => {
                lease.missed += 1;
                lease.expiry
            }
            None => return,
        };
        tokio::time::sleep_until(expiry.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_frontend_is_waited_out_and_told_to_flush() {
        let leases = Leases::new(Duration::from_millis(200), quire_common::client::http_client(), "t".into());
        // Nothing listens on this port: the push fails at once.
        let dead = "http://127.0.0.1:9";
        // Get past a new leader's wait first (nothing is leased yet, so nothing is pushed).
        leases.invalidate(1, 5, 1).await;
        assert_eq!(leases.grant(dead, Instant::now()), 0);
        let started = Instant::now();
        leases.invalidate(1, 10, 1).await;
        assert!(started.elapsed() >= Duration::from_millis(150), "write acknowledged before the lease ran out");
        // The count stays raised: a grant whose answer is lost cannot lose the order.
        assert_eq!(leases.grant(dead, Instant::now()), 1);
        assert_eq!(leases.grant(dead, Instant::now()), 1);
    }

    #[tokio::test]
    async fn a_new_leader_waits_out_earlier_leases_before_its_first_ack() {
        let leases = Leases::new(Duration::from_millis(200), quire_common::client::http_client(), "t".into());
        let started = Instant::now();
        leases.invalidate(1, 10, 7).await;
        assert!(started.elapsed() >= Duration::from_millis(200), "acknowledged while old leases could run");
        let again = Instant::now();
        leases.invalidate(1, 11, 7).await;
        assert!(again.elapsed() < Duration::from_millis(200), "only the first writes of a term wait");
    }

    #[test]
    fn merged_pushes_keep_each_books_newest_version() {
        assert_eq!(merge(vec![vec![(1, 5)], vec![(2, 7)], vec![(1, 9)]]), vec![(1, 9), (2, 7)]);
    }
}
