//! The frontend's cache of lookups: versioned entries, invalidation floors, and the lease
//! without which nothing cached is served.
//!
//! Each book id has one slot holding the cached value (pre-serialised JSON, with the log
//! index that wrote it) and a *floor*: the newest invalidation version seen for the id. A
//! value older than the floor is never stored, so a lookup that raced with a write cannot
//! put the old stock back after the invalidation removed it. Check and store happen under
//! the slot's lock.
//!
//! Entries are served only while the lease from the catalog leader runs. A lease that
//! lapsed, a new leader, or a leader saying we missed an invalidation empties the cache
//! before it is served from again; `generation` counts those flushes so that a lookup
//! begun before a flush cannot store its answer after it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;

#[derive(Default)]
struct Slot {
    value: Option<(Bytes, u64)>,
    floor: u64,
}

pub struct Cache {
    slots: DashMap<u64, Slot>,
    /// Flushes take it for writing; stores take it for reading (never across an await).
    flush_lock: RwLock<()>,
    generation: AtomicU64,
    base: Instant,
    /// Microseconds after `base` at which the lease ends (0: no lease).
    lease_until: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub flushes: AtomicU64,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            slots: DashMap::new(),
            flush_lock: RwLock::new(()),
            generation: AtomicU64::new(0),
            base: Instant::now(),
            lease_until: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }
}

impl Cache {
    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_micros() as u64
    }

    pub fn lease_valid(&self) -> bool {
        self.micros(Instant::now()) < self.lease_until.load(Ordering::Acquire)
    }

    /// Extends the lease to `sent_at + ttl`. Flushes first when the previous lease had
    /// already run out or `must_flush` (leader change, missed invalidation).
    pub fn renew(&self, sent_at: Instant, ttl: Duration, must_flush: bool) {
        if must_flush || !self.lease_valid() {
            self.flush();
        }
        self.lease_until.store(self.micros(sent_at + ttl), Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn flush(&self) {
        let _guard = self.flush_lock.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.slots.clear();
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// The cached JSON of book `id`, if the lease runs and the entry is present.
    pub fn get(&self, id: u64) -> Option<Bytes> {
        if !self.lease_valid() {
            return None;
        }
        let hit = self.slots.get(&id).and_then(|slot| slot.value.as_ref().map(|(json, _)| json.clone()));
        let counter = if hit.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// Stores book `id` at `version`, fetched by a lookup that began in `generation`.
    /// Refused when the lease is not running, a flush happened since, or an invalidation
    /// newer than `version` was seen. Returns whether it was stored.
    pub fn put(&self, id: u64, json: Bytes, version: u64, generation: u64) -> bool {
        let _guard = self.flush_lock.read().unwrap_or_else(|e| e.into_inner());
        if generation != self.generation() || !self.lease_valid() {
            return false;
        }
        let mut slot = self.slots.entry(id).or_default();
        if version < slot.floor || slot.value.as_ref().is_some_and(|(_, v)| *v > version) {
            return false;
        }
        slot.value = Some((json, version));
        true
    }

    /// Applies an invalidation: raises the floor of `id` and drops an older value.
    pub fn erase(&self, id: u64, version: u64) {
        let mut slot = self.slots.entry(id).or_default();
        slot.floor = slot.floor.max(version);
        if slot.value.as_ref().is_some_and(|(_, v)| *v < version) {
            slot.value = None;
        }
    }

    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.value.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leased() -> Cache {
        let cache = Cache::default();
        cache.renew(Instant::now(), Duration::from_secs(60), false);
        cache
    }

    #[test]
    fn nothing_is_served_or_stored_without_a_lease() {
        let cache = Cache::default();
        assert!(!cache.put(1, Bytes::from_static(b"a"), 5, cache.generation()));
        assert_eq!(cache.get(1), None);
        let cache = leased();
        assert!(cache.put(1, Bytes::from_static(b"a"), 5, cache.generation()));
        assert_eq!(cache.get(1).as_deref(), Some(&b"a"[..]));
        // The lease lapses: the entry is no longer served, and renewing flushes it.
        cache.lease_until.store(0, Ordering::Release);
        assert_eq!(cache.get(1), None);
        cache.renew(Instant::now(), Duration::from_secs(60), false);
        assert_eq!(cache.get(1), None);
    }

    #[test]
    fn an_old_value_cannot_come_back_after_an_invalidation() {
        let cache = leased();
        let generation = cache.generation();
        // A lookup read version 5; meanwhile the write at version 9 invalidated the id.
        cache.erase(1, 9);
        assert!(!cache.put(1, Bytes::from_static(b"old"), 5, generation));
        assert!(cache.put(1, Bytes::from_static(b"new"), 9, generation));
        cache.erase(1, 12);
        assert_eq!(cache.get(1), None);
        // Never replace a newer value with an older one.
        assert!(cache.put(1, Bytes::from_static(b"v14"), 14, generation));
        assert!(!cache.put(1, Bytes::from_static(b"v13"), 13, generation));
    }

    #[test]
    fn a_lookup_from_before_a_flush_cannot_store() {
        let cache = leased();
        let generation = cache.generation();
        cache.renew(Instant::now(), Duration::from_secs(60), true);
        assert!(!cache.put(1, Bytes::from_static(b"x"), 5, generation));
    }
}
