//! The tier's backends, their heartbeats, and which of them are in rotation.
//!
//! Routing reads the registry on every request, while it changes only when a backend is added
//! or removed, so the list is an immutable snapshot behind a lock held just long enough to
//! copy an `Arc`. Each backend's rotation flag, worker slots and work in flight are atomics
//! that routing reads without a lock; its last `/status` sits behind a mutex that only
//! heartbeats and `/status` touch. No lock is ever held across an `.await`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use quire_common::status::{Role, ServerStatus};
use serde_json::json;
use tracing::info;

/// Heartbeats in a row a backend may miss (time out, or answer garbage) and stay in rotation.
pub(crate) const MISSES: u32 = 3;

/// One backend: a frontend (edge tier) or a replica (catalog and order tiers).
pub struct Backend {
    /// Base URL without a trailing slash; the registry's key.
    pub url: String,
    /// The last beat succeeded with `ready` and nothing has refused a connection since.
    in_rotation: AtomicBool,
    /// Worker slots the backend last reported; 0 when it reported none (unlimited).
    slots: AtomicU32,
    /// Work requests this balancer has sent and not yet seen answered. Raised only under the
    /// queue's lock (`queue::Queue`), so a dispatch decision and its count agree; lowered by a
    /// finishing request's `Slot`.
    in_flight: AtomicU32,
    /// How long one request holds a slot, in milliseconds, as the backend last said; 0 when
    /// it said nothing (a slot is then held until the answer).
    work_ms: AtomicU64,
    beat: Mutex<Beat>,
}

/// How one heartbeat went.
// Made once per beat and moved once, into `record`: boxing the status would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
enum BeatOutcome {
    /// The backend answered with its status.
    Answered(ServerStatus),
    /// Its port refused the connection.
    Refused,
    /// It timed out, failed midway, or answered something that is not a status.
    Missed,
}

impl From<Result<ServerStatus, reqwest::Error>> for BeatOutcome {
    fn from(beat: Result<ServerStatus, reqwest::Error>) -> Self {
        match beat {
            Ok(status) => BeatOutcome::Answered(status),
            Err(e) if e.is_connect() => BeatOutcome::Refused,
            Err(_) => BeatOutcome::Missed,
        }
    }
}

/// What the heartbeats last learned.
#[derive(Default)]
struct Beat {
    /// When a beat last succeeded; `None` until the first one.
    last_ok: Option<Instant>,
    /// Beats in a row that failed without a refused connection (timed out, garbled).
    misses: u32,
    /// The last status received; kept after failures for `/status`, but only an in-rotation
    /// backend's status counts for leader election.
    status: Option<ServerStatus>,
}

impl Backend {
    fn new(url: String) -> Self {
        // Out of rotation until a first beat proves it alive and ready.
        Backend {
            url,
            in_rotation: AtomicBool::new(false),
            slots: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            work_ms: AtomicU64::new(0),
            beat: Mutex::default(),
        }
    }

    pub fn in_rotation(&self) -> bool {
        self.in_rotation.load(Ordering::Relaxed)
    }

    /// Worker slots the backend offers, `None` when unlimited.
    pub fn slots(&self) -> Option<u32> {
        Some(self.slots.load(Ordering::Relaxed)).filter(|&n| n > 0)
    }

    /// How long a request holds one of this backend's slots, if the backend said.
    pub fn work_time(&self) -> Option<Duration> {
        Some(self.work_ms.load(Ordering::Relaxed)).filter(|&ms| ms > 0).map(Duration::from_millis)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// One more work request is on its way to the backend.
    pub(crate) fn occupy(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A work request the backend had has finished.
    pub(crate) fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// True while this balancer may send the backend one more work request.
    pub fn has_free_slot(&self) -> bool {
        self.slots().is_none_or(|n| self.in_flight() < n)
    }

    fn beat(&self) -> MutexGuard<'_, Beat> {
        // A panic while holding the lock leaves a consistent `Beat`: both fields are plain values.
        self.beat.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records one heartbeat's outcome. A backend leaves rotation at once when its port
    /// refuses connections, and after [`MISSES`] failed beats in a row otherwise.
    fn record(&self, outcome: BeatOutcome) {
        let change = {
            let mut beat = self.beat();
            match outcome {
                BeatOutcome::Answered(status) => {
                    beat.last_ok = Some(Instant::now());
                    beat.misses = 0;
                    let ready = status.ready;
                    // A server with slots has at least one, as `capacity::Workers` counts them.
                    self.slots.store(status.slots.map_or(0, |n| n.max(1)), Ordering::Relaxed);
                    self.work_ms.store(status.work_ms.unwrap_or(0), Ordering::Relaxed);
                    beat.status = Some(status);
                    Some((ready, if ready { "ready" } else { "not ready" }))
                }
                // Nothing listens: the process is gone, no point waiting for more beats.
                BeatOutcome::Refused => Some((false, "connection refused")),
                // A slow or garbled beat is tolerated a few times in a row; it never brings a
                // backend back. Counted in beats, not in time since the last good one: when
                // this balancer itself stalls (a loaded machine), the beats in flight all time
                // out at once, and that is one miss per backend, not a silence of every one.
                BeatOutcome::Missed => {
                    beat.misses += 1;
                    (beat.last_ok.is_none() || beat.misses >= MISSES).then_some((false, "no successful heartbeat"))
                }
            }
        };
        if let Some((on, why)) = change {
            self.set_rotation(on, why);
        }
    }

    /// Routing found the backend refusing connections: take it out before the next beat does.
    pub fn mark_unreachable(&self) {
        self.set_rotation(false, "connection refused to a request");
    }

    fn set_rotation(&self, on: bool, why: &str) {
        if self.in_rotation.swap(on, Ordering::Relaxed) != on {
            let verb = if on { "joined" } else { "left" };
            info!(backend = %self.url, reason = why, "backend {verb} rotation");
        }
    }

    /// The backend as `/status` shows it.
    pub fn describe(&self) -> serde_json::Value {
        let beat = self.beat();
        let status = beat.status.as_ref();
        json!({
            "url": self.url,
            "in_rotation": self.in_rotation(),
            "ready": status.is_some_and(|s| s.ready),
            "role": status.map(|s| s.role.clone()).unwrap_or_default(),
            "term": status.map_or(0, |s| s.term),
            "slots": self.slots(),
            "in_flight": self.in_flight(),
            "name": status.map(|s| s.name.clone()),
            "last_beat_ms_ago": beat.last_ok.map(|t| t.elapsed().as_millis() as u64),
        })
    }

    /// `(term, url)` if this backend is in rotation and last said it leads.
    fn leads(&self) -> Option<(u64, Arc<str>)> {
        if !self.in_rotation() {
            return None;
        }
        let beat = self.beat();
        let status = beat.status.as_ref().filter(|s| s.role == Role::Leader)?;
        Some((status.term, self.url.as_str().into()))
    }
}

/// The backends of one tier, keyed by base URL.
pub struct Registry {
    backends: RwLock<Arc<Vec<Arc<Backend>>>>,
    /// The in-rotation backend that last claimed leadership with the highest term; recomputed
    /// after every heartbeat round.
    leader: RwLock<Option<Arc<str>>>,
}

impl Registry {
    pub fn new(urls: impl IntoIterator<Item = String>) -> Self {
        let registry = Registry { backends: RwLock::default(), leader: RwLock::default() };
        for url in urls {
            registry.add(&url);
        }
        registry
    }

    /// The current backends; later additions and removals do not change the returned list.
    pub fn snapshot(&self) -> Arc<Vec<Arc<Backend>>> {
        self.backends.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn leader(&self) -> Option<Arc<str>> {
        self.leader.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Registers `url` (already normalised); false if it was known.
    pub fn add(&self, url: &str) -> bool {
        let mut backends = self.backends.write().unwrap_or_else(PoisonError::into_inner);
        if backends.iter().any(|b| b.url == url) {
            return false;
        }
        let mut next = Vec::clone(&backends);
        next.push(Arc::new(Backend::new(url.to_string())));
        *backends = Arc::new(next);
        true
    }

    /// Removes `url`; false if it was unknown.
    pub fn remove(&self, url: &str) -> bool {
        let mut backends = self.backends.write().unwrap_or_else(PoisonError::into_inner);
        let next: Vec<_> = backends.iter().filter(|b| b.url != url).cloned().collect();
        let removed = next.len() != backends.len();
        *backends = Arc::new(next);
        removed
    }

    pub fn find(&self, url: &str) -> Option<Arc<Backend>> {
        self.snapshot().iter().find(|b| b.url == url).cloned()
    }

    fn elect_leader(&self) {
        let elected =
            self.snapshot().iter().filter_map(|b| b.leads()).max_by_key(|(term, _)| *term).map(|(_, url)| url);
        let mut leader = self.leader.write().unwrap_or_else(PoisonError::into_inner);
        if *leader != elected {
            info!(leader = elected.as_deref().unwrap_or("none"), "leader changed");
            *leader = elected;
        }
    }
}

/// Beats every backend each `period`, concurrently, until the task is aborted; calls
/// `after_round` after each round, so that waiting work can go to backends that just joined
/// rotation or reported more slots.
///
/// A beat times out after 9/10 of the period so that a round never overlaps the next; a
/// backend that misses [`MISSES`] beats in a row leaves rotation, so with the default 100 ms
/// a dead backend is out within 300 ms even when its port still accepts connections.
pub async fn heartbeats(
    registry: Arc<Registry>,
    client: reqwest::Client,
    period: Duration,
    after_round: impl Fn() + Send + 'static,
) {
    let timeout = period * 9 / 10;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let backends = registry.snapshot();
        futures::future::join_all(backends.iter().map(|backend| async {
            let outcome = async {
                let response = client.get(format!("{}/status", backend.url)).timeout(timeout).send().await?;
                response.error_for_status()?.json::<ServerStatus>().await
            };
            backend.record(outcome.await.into());
        }))
        .await;
        registry.elect_leader();
        after_round();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> BeatOutcome {
        BeatOutcome::Answered(ServerStatus { ready: true, ..ServerStatus::default() })
    }

    #[test]
    fn a_backend_leaves_rotation_after_missed_beats_in_a_row_not_after_a_silence() {
        let backend = Backend::new("http://b".into());
        backend.record(ready());
        assert!(backend.in_rotation());
        // The last good beat was long ago (this balancer stalled): one miss is not enough.
        backend.beat().last_ok = Instant::now().checked_sub(Duration::from_secs(5));
        backend.record(BeatOutcome::Missed);
        assert!(backend.in_rotation(), "one missed beat after a stall keeps the backend");
        backend.record(ready());
        for missed in 1..MISSES {
            backend.record(BeatOutcome::Missed);
            assert!(backend.in_rotation(), "{missed} missed beats in a row keep the backend");
        }
        backend.record(BeatOutcome::Missed);
        assert!(!backend.in_rotation(), "{MISSES} missed beats in a row take it out");
        // A miss never brings it back; an answer does.
        backend.record(BeatOutcome::Missed);
        assert!(!backend.in_rotation());
        backend.record(ready());
        assert!(backend.in_rotation());
        backend.record(BeatOutcome::Refused);
        assert!(!backend.in_rotation(), "a refused connection takes it out at once");
    }

    #[test]
    fn a_backend_that_never_answered_stays_out() {
        let backend = Backend::new("http://b".into());
        backend.record(BeatOutcome::Missed);
        assert!(!backend.in_rotation());
        backend.record(BeatOutcome::Answered(ServerStatus { ready: false, ..ServerStatus::default() }));
        assert!(!backend.in_rotation(), "answering but not ready");
    }
}
