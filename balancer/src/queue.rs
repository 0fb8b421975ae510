//! The tier's central queue: work waits here for a backend's worker slot (docs/ARCHITECTURE.md, "Balancer").
//!
//! *Work* is a request that occupies a slot of the backend serving it (see
//! `proxy::is_work`). Every backend that reports `slots: Some(n)` takes at most `n` work
//! requests from this balancer at once; one that reports no slots takes any number, so with
//! such backends nothing ever waits and routing is plain round-robin.
//!
//! A work request enters the queue as a [`Waiter`] holding the sending half of a oneshot
//! channel, and the queue grants it a [`Slot`] (or an error) through that channel. All
//! decisions are made by [`Queue::dispatch`] under one mutex that is never held across an
//! `.await`: a request arriving, a [`Slot`] being released, and every heartbeat round (a
//! backend may have joined rotation) run it. It walks the waiters in order, oldest first:
//! - one that may use a backend with a free slot gets it (round-robin among those);
//! - otherwise one that could no longer finish before its deadline is dropped with 503
//!   `dropped` (a *pre-drop*): its remaining time is below the tier's expected service time.
//!
//! A waiter also wakes on its own when it is about to become hopeless, so a pre-drop does not
//! wait for the next slot to free up; requests without a deadline are never pre-dropped, and
//! wait at most [`WAIT_CAP`].
//!
//! The expected service time is a low quantile of recent successful attempts, so that only a
//! request that even a fast attempt could not finish is dropped here; the backend refuses the
//! rest itself if it must (an *after-drop*).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use quire_common::{ApiError, Deadline};
use tokio::sync::oneshot;

use crate::registry::{Backend, Registry};

/// Longest a work request waits for a slot, the same as the cap on one attempt: the budget of
/// a request without a deadline header.
pub(crate) const WAIT_CAP: Duration = Duration::from_secs(10);
/// The expected service time until an attempt has been measured: small, so that a new
/// balancer does not drop what it cannot judge yet.
const DEFAULT_SERVICE: Duration = Duration::from_millis(10);
/// How many recent successful attempts the service-time estimate looks at.
const SERVICE_WINDOW: usize = 64;
/// The estimate is this quantile of the window.
const SERVICE_QUANTILE: f64 = 0.1;

/// The backends one request may be sent to.
pub(crate) struct Want {
    /// Backends already tried for this request.
    avoid: Vec<String>,
    /// Only this one (a leader named by a `not_leader` hint).
    only: Option<String>,
    /// This one whenever it has a free slot, before the round-robin turn (a Raft tier's
    /// leader, for work that any replica takes but only the leader can finish).
    prefer: Option<String>,
}

impl Want {
    pub(crate) fn any_but(avoid: &[String]) -> Self {
        Want { avoid: avoid.to_vec(), only: None, prefer: None }
    }

    pub(crate) fn only(url: &str) -> Self {
        Want { avoid: Vec::new(), only: Some(url.to_string()), prefer: None }
    }

    /// The same, but `url` first whenever it is in rotation with a free slot.
    pub(crate) fn preferring(self, url: Option<String>) -> Self {
        Want { prefer: url, ..self }
    }

    fn allows(&self, backend: &Backend) -> bool {
        self.only.as_ref().is_none_or(|u| *u == backend.url) && !self.avoid.contains(&backend.url)
    }

    /// Whether this request may wait in the queue, given the tier's backends: for one it
    /// allows to be in rotation with a free slot. A first attempt waits while some backend
    /// is registered, even out of rotation: a tier whose every backend just left rotation
    /// (restarting, or missing beats on a loaded machine) is most likely back before the
    /// request's deadline, and the heartbeat round that brings one back dispatches the
    /// queue. A retry (some backends tried) or a request for one named backend (a hinted
    /// leader) waits only while a backend it allows is in rotation: otherwise it fails at
    /// once and its sender retries from the start, when the backends it tried may serve it
    /// again (it must not wait for an untried one that is dead, say a killed leader, while
    /// the ones it tried come back).
    fn may_wait(&self, backends: &[Arc<Backend>]) -> bool {
        let rotation_required = self.only.is_some() || !self.avoid.is_empty();
        backends.iter().any(|b| self.allows(b) && (b.in_rotation() || !rotation_required))
    }

    /// Whether some backend this request may use is in rotation now.
    fn has_live(&self, backends: &[Arc<Backend>]) -> bool {
        backends.iter().any(|b| b.in_rotation() && self.allows(b))
    }
}

type Grant = Result<Slot, ApiError>;

/// A work request waiting for a slot.
struct Waiter {
    /// Tells this waiter apart when it gives up on its own.
    id: u64,
    /// When it entered the queue.
    queued: Instant,
    deadline: Option<Deadline>,
    want: Want,
    grant: oneshot::Sender<Grant>,
}

#[derive(Default)]
struct Waiting {
    /// Oldest first, except that a request retried after a failed attempt re-enters at the
    /// front: it has waited longer than everyone behind it.
    waiters: VecDeque<Waiter>,
    next_id: u64,
    /// Round-robin cursor over the backends in rotation; wraps harmlessly.
    turn: usize,
}

/// One tier's queue and the slots it hands out.
pub(crate) struct Queue {
    registry: Arc<Registry>,
    waiting: Mutex<Waiting>,
    service: ServiceTime,
    /// Requests dropped here because they could not meet their deadline.
    pub(crate) pre_drops: AtomicU64,
}

/// What the queue and the slots look like right now, for samples and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) queue_len: u32,
    /// How long the longest-waiting request has waited.
    pub(crate) oldest_wait: Duration,
    /// Over the backends in rotation: work in flight, capped at each backend's slots, and the
    /// slots in all (unlimited backends add their work in flight to the first and nothing to
    /// the second).
    pub(crate) busy_slots: u32,
    pub(crate) total_slots: u32,
    pub(crate) backends: u32,
}

impl Queue {
    pub(crate) fn new(registry: Arc<Registry>) -> Self {
        Queue { registry, waiting: Mutex::default(), service: ServiceTime::default(), pre_drops: AtomicU64::new(0) }
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // Every change to `Waiting` leaves it consistent, so a panic elsewhere cannot break it.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a slot on a backend `want` allows; `Ok(None)` at once if it may not wait
    /// (see [`Want::may_wait`]). `retry` puts the request at the front of the queue.
    ///
    /// Fails with 503 `dropped` when the deadline can no longer be met while waiting for a
    /// slot, and with 503 `unavailable` when no backend it may use came into rotation in time
    /// or after [`WAIT_CAP`].
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        want: Want,
        deadline: Option<Deadline>,
        retry: bool,
    ) -> Result<Option<Slot>, ApiError> {
        let queued = Instant::now();
        let (grant, rx) = oneshot::channel();
        let id = {
            let mut waiting = self.lock();
            let backends = self.registry.snapshot();
            if !want.may_wait(&backends) {
                return Ok(None);
            }
            let id = waiting.next_id;
            waiting.next_id += 1;
            let waiter = Waiter { id, queued, deadline, want, grant };
            if retry {
                waiting.waiters.push_front(waiter);
            } else {
                waiting.waiters.push_back(waiter);
            }
            self.dispatch_locked(&mut waiting, &backends);
            id
        };
        // From here on, a cancelled request (its client went away) leaves the queue on drop.
        let mut wait = Wait { queue: self.clone(), id, rx };
        loop {
            match tokio::time::timeout(self.patience(deadline, queued), &mut wait.rx).await {
                Ok(Ok(grant)) => return grant.map(Some),
                Ok(Err(_)) => return Err(ApiError::internal("the queue lost a waiting request")),
                Err(_) => {
                    if let Some(error) = self.give_up(id, deadline, queued) {
                        return Err(error);
                    }
                }
            }
        }
    }

    /// How long a waiter may sleep before it must check whether it is hopeless.
    fn patience(&self, deadline: Option<Deadline>, queued: Instant) -> Duration {
        let cap = WAIT_CAP.saturating_sub(queued.elapsed());
        let hopeless_in = deadline.map_or(cap, |d| d.remaining().saturating_sub(self.service.estimate()));
        cap.min(hopeless_in).max(Duration::from_millis(1))
    }

    /// Takes waiter `id` out of the queue if it can no longer meet its deadline or has waited
    /// [`WAIT_CAP`]; `None` if it may wait on, or was just granted (the grant is in its channel).
    fn give_up(&self, id: u64, deadline: Option<Deadline>, queued: Instant) -> Option<ApiError> {
        let backends = self.registry.snapshot();
        let mut waiting = self.lock();
        let at = waiting.waiters.iter().position(|w| w.id == id)?;
        let error = if self.hopeless(deadline) {
            self.give_up_hopeless(&waiting.waiters[at].want, &backends)
        } else if queued.elapsed() >= WAIT_CAP {
            if waiting.waiters[at].want.has_live(&backends) {
                ApiError::unavailable("no worker slot of this tier freed up in time")
            } else {
                no_backend_in_rotation()
            }
        } else {
            return None;
        };
        waiting.waiters.remove(at);
        Some(error)
    }

    fn hopeless(&self, deadline: Option<Deadline>) -> bool {
        deadline.is_some_and(|d| d.remaining() < self.service.estimate())
    }

    /// The error for a waiter that can no longer meet its deadline: `dropped` (a pre-drop,
    /// counted) if it waited for a busy backend's slot; `unavailable` if no backend it may use
    /// was in rotation at all.
    fn give_up_hopeless(&self, want: &Want, backends: &[Arc<Backend>]) -> ApiError {
        if want.has_live(backends) {
            self.pre_drops.fetch_add(1, Ordering::Relaxed);
            dropped()
        } else {
            no_backend_in_rotation()
        }
    }

    /// Hands free slots to waiters and drops the hopeless ones; see the module docs.
    pub(crate) fn dispatch(self: &Arc<Self>) {
        let backends = self.registry.snapshot();
        let mut waiting = self.lock();
        self.dispatch_locked(&mut waiting, &backends);
    }

    fn dispatch_locked(self: &Arc<Self>, waiting: &mut Waiting, backends: &[Arc<Backend>]) {
        let live: Vec<&Arc<Backend>> = backends.iter().filter(|b| b.in_rotation()).collect();
        let mut free = live.iter().any(|b| b.has_free_slot());
        let mut i = 0;
        while i < waiting.waiters.len() {
            let (pick, deadline) = {
                let waiter = &waiting.waiters[i];
                (if free { pick(&live, &waiter.want, waiting.turn) } else { None }, waiter.deadline)
            };
            if let Some(k) = pick {
                waiting.turn = k + 1;
                let Some(waiter) = waiting.waiters.remove(i) else { break };
                let backend = live[k % live.len()];
                let slot = Slot::hold(backend, self);
                // A waiter abandoned in the meantime leaves the slot free; releasing it quietly
                // keeps `Slot::drop` from dispatching again under this lock.
                if let Err(Ok(slot)) = waiter.grant.send(Ok(slot)) {
                    slot.disarm();
                }
                free = live.iter().any(|b| b.has_free_slot());
            } else if self.hopeless(deadline) {
                let Some(waiter) = waiting.waiters.remove(i) else { break };
                let error = self.give_up_hopeless(&waiter.want, backends);
                let _ = waiter.grant.send(Err(error));
            } else {
                i += 1;
            }
        }
    }

    /// Records a successful attempt's duration for the service-time estimate.
    pub(crate) fn served(&self, took: Duration) {
        self.service.record(took);
    }

    /// The tier's expected service time.
    pub(crate) fn expected_service(&self) -> Duration {
        self.service.estimate()
    }

    pub(crate) fn load(&self) -> Load {
        let (queue_len, oldest_wait) = {
            let waiting = self.lock();
            let oldest = waiting.waiters.iter().map(|w| w.queued).min();
            (waiting.waiters.len() as u32, oldest.map_or(Duration::ZERO, |t| t.elapsed()))
        };
        let mut load = Load { queue_len, oldest_wait, ..Load::default() };
        for backend in self.registry.snapshot().iter().filter(|b| b.in_rotation()) {
            let in_flight = backend.in_flight();
            load.backends += 1;
            load.busy_slots += backend.slots().map_or(in_flight, |n| in_flight.min(n));
            load.total_slots += backend.slots().unwrap_or(0);
        }
        load
    }
}

/// Index (to be taken modulo `live.len()`) of the first backend from the cursor that `want`
/// allows and that has a free slot.
fn pick(live: &[&Arc<Backend>], want: &Want, turn: usize) -> Option<usize> {
    let usable = |backend: &Backend| want.allows(backend) && backend.has_free_slot();
    if let Some(preferred) = &want.prefer {
        if let Some(k) = live.iter().position(|b| b.url == *preferred && usable(b)) {
            return Some(k);
        }
    }
    let n = live.len();
    let start = turn.checked_rem(n)?;
    (start..start + n).find(|&k| usable(live[k % n]))
}

fn no_backend_in_rotation() -> ApiError {
    ApiError::unavailable("no backend of this tier came into rotation in time")
}

fn dropped() -> ApiError {
    ApiError::dropped("the request could not be served before its deadline")
}

/// A waiting request's end of the queue: leaves the queue when dropped, so a request whose
/// client went away does not linger in it.
struct Wait {
    queue: Arc<Queue>,
    id: u64,
    /// Dropped after `drop` ran (fields drop after the struct), so a grant still in the
    /// channel releases its slot outside the queue's lock.
    rx: oneshot::Receiver<Grant>,
}

impl Drop for Wait {
    fn drop(&mut self) {
        self.queue.lock().waiters.retain(|w| w.id != self.id);
    }
}

/// One work request's hold on one backend's slot; releasing it lets the queue send the next
/// waiter there.
///
/// A slot is released when the answer comes back, or once the backend's advertised work time
/// (`work_ms` in its status) has passed, whichever is first: a frontend's slot is busy for its
/// 60 ms of work, not for the catalog call it then waits on, and a buy's replica slot for its
/// app work, not for the writes after it. The backend's own slots stay authoritative: one that
/// is still busy makes the request wait there, or refuses it (after-drop).
pub(crate) struct Slot {
    backend: Arc<Backend>,
    queue: Arc<Queue>,
    /// Set by whoever frees the slot first: the answer (drop), the work timer, or `disarm`.
    released: Arc<AtomicBool>,
}

impl Slot {
    fn hold(backend: &Arc<Backend>, queue: &Arc<Queue>) -> Slot {
        backend.occupy();
        let slot = Slot { backend: backend.clone(), queue: queue.clone(), released: Arc::default() };
        if let Some(work) = backend.work_time() {
            let (backend, queue, released) = (backend.clone(), queue.clone(), slot.released.clone());
            tokio::spawn(async move {
                tokio::time::sleep(work).await;
                if !released.swap(true, Ordering::AcqRel) {
                    backend.release();
                    queue.dispatch();
                }
            });
        }
        slot
    }

    pub(crate) fn url(&self) -> &str {
        &self.backend.url
    }

    /// Frees the slot without dispatching: for the dispatcher itself, which holds the lock.
    fn disarm(self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.backend.release();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.backend.release();
            self.queue.dispatch();
        }
    }
}

/// The tier's expected service time, learned from recent successful attempts.
#[derive(Default)]
struct ServiceTime {
    recent: Mutex<VecDeque<Duration>>,
    /// The current estimate in microseconds, 0 before the first measurement; read without a
    /// lock by every dispatch.
    estimate_us: AtomicU64,
}

impl ServiceTime {
    fn record(&self, took: Duration) {
        let estimate = {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            recent.push_back(took);
            if recent.len() > SERVICE_WINDOW {
                recent.pop_front();
            }
            let mut sorted: Vec<Duration> = recent.iter().copied().collect();
            sorted.sort_unstable();
            sorted[((sorted.len() - 1) as f64 * SERVICE_QUANTILE) as usize]
        };
        // At least 1 µs, so that a measured estimate is never mistaken for none.
        self.estimate_us.store((estimate.as_micros() as u64).max(1), Ordering::Relaxed);
    }

    /// Never zero, so that an expired deadline is always hopeless.
    fn estimate(&self) -> Duration {
        match self.estimate_us.load(Ordering::Relaxed) {
            0 => DEFAULT_SERVICE,
            us => Duration::from_micros(us).max(Duration::from_millis(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_estimate_is_a_low_quantile() {
        let service = ServiceTime::default();
        assert_eq!(service.estimate(), DEFAULT_SERVICE);
        for ms in (1..=100).rev() {
            service.record(Duration::from_millis(ms));
        }
        // The window holds the last 64 (64 ms down to 1 ms); its 10th percentile is 7 ms.
        assert_eq!(service.estimate(), Duration::from_millis(7));
    }
}
