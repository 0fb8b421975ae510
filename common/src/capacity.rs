//! Capacity emulation: a small simulated cloud (docs/ARCHITECTURE.md, "Capacity emulation"), shared by the servers
//! that emulate it under `--profile cloud-sim`, the simulator, the load generator's oracle
//! and the autoscaler's policies, so that all of them agree on what a request costs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What each unit of work costs and how many a server does at once.
///
/// Work (front-end, app, DB read) holds one of the server's worker slots; a DB write is
/// latency only: it is waited for after the slot is released, and any number may overlap.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    /// From launch to ready.
    #[serde(with = "millis")]
    pub boot: Duration,
    /// Every request a frontend serves.
    #[serde(with = "millis")]
    pub frontend_work: Duration,
    /// Every request a catalog or order replica serves.
    #[serde(with = "millis")]
    pub app_work: Duration,
    /// A read of the replica's database (catalog lookups and searches).
    #[serde(with = "millis")]
    pub db_read: Duration,
    /// Each Raft write (a buy makes two: the catalog's decrement, then the order's record).
    #[serde(with = "millis")]
    pub db_write: Duration,
    /// Worker slots per server.
    pub slots: u32,
}

/// Raft writes one buy makes: the stock decremented, then the order recorded.
pub const WRITES_PER_BUY: u32 = 2;

impl Costs {
    /// The simulated cloud: 5 s boot, 60 ms front-end work, 200 ms app work, 50 ms DB read,
    /// 200 ms DB write, one worker slot per server.
    pub const CLOUD_SIM: Costs = Costs {
        boot: Duration::from_secs(5),
        frontend_work: Duration::from_millis(60),
        app_work: Duration::from_millis(200),
        db_read: Duration::from_millis(50),
        db_write: Duration::from_millis(200),
        slots: 1,
    };

    /// Slot time a frontend spends on any request.
    pub fn frontend_slot(&self) -> Duration {
        self.frontend_work
    }

    /// Slot time a catalog replica spends on a read (lookup or search).
    pub fn catalog_read_slot(&self) -> Duration {
        self.read_slot()
    }

    /// Slot time of any replica read: app work, then the DB read.
    pub fn read_slot(&self) -> Duration {
        self.app_work + self.db_read
    }

    /// Slot time an order replica spends on a buy; its writes come after, as latency.
    pub fn order_buy_slot(&self) -> Duration {
        self.app_work
    }

    /// Write latency of one buy after its slot time.
    pub fn buy_write_latency(&self) -> Duration {
        self.db_write * WRITES_PER_BUY
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// A server's capacity: its boot, its worker slots and its draining flag.
///
/// Without emulation (the default profile) a server is ready at once and its slots are
/// unlimited: [`Workers::work`] costs nothing. Under `cloud-sim` every piece of work waits for
/// a slot, holds it for the work's duration, and is refused up front (after-drop) when it
/// could not finish before the request's deadline.
pub struct Workers {
    costs: Option<Costs>,
    slots: tokio::sync::Semaphore,
    /// Slots held right now.
    busy: std::sync::atomic::AtomicU32,
    /// When the server finishes booting.
    ready_at: std::time::Instant,
    /// Asked to stop taking work before it is removed: reports not ready.
    draining: std::sync::atomic::AtomicBool,
    /// Requests refused because they could not finish in time.
    pub after_drops: std::sync::atomic::AtomicU64,
}

impl Workers {
    /// A server without emulated limits.
    pub fn unlimited() -> Self {
        Self::build(None)
    }

    /// A server of the emulated cloud, booting from now.
    pub fn emulated(costs: Costs) -> Self {
        Self::build(Some(costs))
    }

    pub fn new(costs: Option<Costs>) -> Self {
        Self::build(costs)
    }

    fn build(costs: Option<Costs>) -> Self {
        let slots = costs.map_or(tokio::sync::Semaphore::MAX_PERMITS, |c| c.slots.max(1) as usize);
        Workers {
            costs,
            slots: tokio::sync::Semaphore::new(slots),
            busy: Default::default(),
            ready_at: std::time::Instant::now() + costs.map_or(Duration::ZERO, |c| c.boot),
            draining: Default::default(),
            after_drops: Default::default(),
        }
    }

    pub fn costs(&self) -> Option<&Costs> {
        self.costs.as_ref()
    }

    /// Booted and not draining.
    pub fn ready(&self) -> bool {
        !self.booting() && !self.draining()
    }

    pub fn booting(&self) -> bool {
        std::time::Instant::now() < self.ready_at
    }

    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// From now on the server reports not ready, so balancers take it out of rotation;
    /// work already admitted finishes.
    pub fn drain(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Worker slots, `None` when unlimited.
    pub fn slots(&self) -> Option<u32> {
        self.costs.map(|c| c.slots.max(1))
    }

    pub fn busy(&self) -> u32 {
        self.busy.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Does `cost` of work on one slot: waits for a free slot, holds it for `cost`, releases
    /// it. Refuses with `dropped` (after-drop) when the work could not end before `deadline`,
    /// whether at once or after waiting for a slot. Free when not emulated.
    pub async fn work(&self, cost: Duration, deadline: Option<crate::Deadline>) -> Result<(), crate::ApiError> {
        if self.costs.is_none() || cost.is_zero() {
            return Ok(());
        }
        let fits = |d: &crate::Deadline| d.remaining() >= cost;
        if deadline.as_ref().is_some_and(|d| !fits(d)) {
            return Err(self.refuse());
        }
        let permit = match deadline {
            // Waiting longer than the slack would only lead to refusing later.
            Some(d) => {
                let slack = d.remaining().saturating_sub(cost);
                match tokio::time::timeout(slack, self.slots.acquire()).await {
                    Ok(Ok(permit)) if fits(&d) => permit,
                    Ok(Ok(_)) | Err(_) => return Err(self.refuse()),
                    Ok(Err(_)) => return Err(crate::ApiError::internal("worker slots closed")),
                }
            }
            None => self.slots.acquire().await.map_err(|_| crate::ApiError::internal("worker slots closed"))?,
        };
        self.busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(cost).await;
        self.busy.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        drop(permit);
        Ok(())
    }

    /// A replica read: app work and the DB read, on one slot.
    pub async fn read_work(&self, deadline: crate::Deadline) -> Result<(), crate::ApiError> {
        match self.costs {
            Some(c) => self.work(c.read_slot(), Some(deadline)).await,
            None => Ok(()),
        }
    }

    /// App work alone (an order replica's part of a buy), on one slot.
    pub async fn app_work(&self, deadline: crate::Deadline) -> Result<(), crate::ApiError> {
        match self.costs {
            Some(c) => self.work(c.app_work, Some(deadline)).await,
            None => Ok(()),
        }
    }

    /// Waits out one DB write's latency (no slot held). Free when not emulated.
    pub async fn write_latency(&self) {
        if let Some(c) = self.costs {
            tokio::time::sleep(c.db_write).await;
        }
    }

    fn refuse(&self) -> crate::ApiError {
        self.after_drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::ApiError::dropped("this server cannot finish the request before its deadline")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Deadline;

    fn quick() -> Costs {
        Costs { boot: Duration::from_millis(50), ..Costs::CLOUD_SIM }
    }

    #[tokio::test]
    async fn unlimited_work_is_free_and_ready_at_once() {
        let w = Workers::unlimited();
        assert!(w.ready());
        assert_eq!(w.slots(), None);
        let started = std::time::Instant::now();
        w.work(Duration::from_secs(5), None).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn boots_then_drains() {
        let w = Workers::emulated(quick());
        assert!(w.booting() && !w.ready());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(w.ready());
        w.drain();
        assert!(!w.ready() && w.draining());
    }

    #[tokio::test]
    async fn refuses_work_that_cannot_end_in_time() {
        let w = Workers::emulated(quick());
        let err = w.work(Duration::from_millis(200), Some(Deadline::after(Duration::from_millis(100)))).await;
        assert_eq!(err.unwrap_err().code, "dropped");
        assert_eq!(w.after_drops.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn one_slot_serialises_and_refuses_what_would_wait_too_long() {
        let w = std::sync::Arc::new(Workers::emulated(quick()));
        let first = tokio::spawn({
            let w = w.clone();
            async move { w.work(Duration::from_millis(200), None).await }
        });
        // Poll until the first holds the slot.
        while w.busy() == 0 {
            tokio::task::yield_now().await;
        }
        // 200 ms of work behind 200 ms of work cannot end within 300 ms.
        let second = w.work(Duration::from_millis(200), Some(Deadline::after(Duration::from_millis(300)))).await;
        assert_eq!(second.unwrap_err().code, "dropped");
        first.await.unwrap().unwrap();
        assert_eq!(w.busy(), 0);
    }
}
