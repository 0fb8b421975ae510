//! The frontend's cache of lookups, kept current by the catalog leader's lease and holds
//! (docs/ARCHITECTURE.md, "Cache coherence"; the leader's side is the catalog's `leases`).
//!
//! Each book has a slot: the cached value (pre-serialised JSON, with the log index that
//! last wrote the book) and the leader's latest *word* on the book. While the word is
//! *held*, a write to the book is on its way: nothing of the book is served or stored.
//! Once *released*, the word carries a *floor*, the book's version after the write, and
//! only values of that version or newer may be stored. Words are ordered by their
//! `changed` number: a word older than the slot's is ignored, so pushes and grants that
//! arrive out of order cannot undo a newer word. Check and store happen under the slot's
//! lock.
//!
//! Entries are served only while the lease runs. Every word and the lease belong to one
//! office of the leader (a term, and one life of the leader's process: the *epoch*):
//! hearing of another office of the same or a newer term empties the cache and forgets
//! every word; an older term's is refused. A renewal after the lease lapsed, or one reporting that the leader missed a
//! push, drops the cached values but keeps the words (a hold is only ever lifted by a
//! newer word). `generation` counts the times values were dropped, so that a lookup begun
//! before cannot store its answer after.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::{DashMap, DashSet};

use quire_common::api::{BookHold, Invalidation, LeaseGrant};

#[derive(Default)]
struct Slot {
    value: Option<(Bytes, u64)>,
    held: bool,
    floor: u64,
    /// The `changed` of the word the slot holds (0: none yet).
    changed: u64,
}

/// The office (term, leader, and the leader process's `office`) every word and the lease
/// come from, and the highest missed count granted in it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Epoch {
    term: u64,
    leader: u64,
    office: u64,
    missed: u64,
}

impl Epoch {
    fn is(&self, term: u64, leader: u64, office: u64) -> bool {
        (self.term, self.leader, self.office) == (term, leader, office)
    }
}

/// A push from a leader of an older term than this cache's: refused, so that the old
/// leader waits out this frontend's lease rather than count on it.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the push comes from term {0}, older than this frontend's lease")]
pub struct Superseded(pub u64);

/// What a renewal did to the cache, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The lease was extended.
    Extended,
    /// A new term or leader: the cache was emptied.
    NewEpoch,
    /// The lease had lapsed or the leader missed a push: cached values were dropped.
    Dropped,
    /// The grant came from an older term than the cache's and was ignored.
    Stale,
}

pub struct Cache {
    slots: DashMap<u64, Slot>,
    /// The books held now (their slots say so too), so that a renewal finds the holds its
    /// grant no longer lists without visiting every slot.
    held: DashSet<u64>,
    /// Renewals and new epochs take it for writing; pushes and stores for reading (never
    /// across an await).
    epoch: RwLock<Epoch>,
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
            held: DashSet::new(),
            epoch: RwLock::new(Epoch::default()),
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

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Takes a grant asked for at `sent_at` and extends the lease to `sent_at + ttl`.
    pub fn renew(&self, grant: &LeaseGrant, sent_at: Instant) -> Renewal {
        let mut epoch = self.epoch.write().unwrap_or_else(|e| e.into_inner());
        if grant.term < epoch.term {
            return Renewal::Stale;
        }
        let renewal = if !epoch.is(grant.term, grant.leader_id, grant.office) {
            self.begin(&mut epoch, grant.term, grant.leader_id, grant.office);
            Renewal::NewEpoch
        } else if !self.lease_valid() || grant.missed > epoch.missed {
            self.drop_values();
            Renewal::Dropped
        } else {
            Renewal::Extended
        };
        epoch.missed = epoch.missed.max(grant.missed);
        for word in &grant.held {
            self.take(word);
        }
        // Holds older than the grant that it does not list were released meanwhile (the
        // release itself was missed, or is still on its way).
        let listed: HashSet<u64> = grant.held.iter().map(|w| w.id).collect();
        let stale: Vec<u64> = self.held.iter().map(|id| *id).filter(|id| !listed.contains(id)).collect();
        let mut lifted = false;
        for id in stale {
            if let Some(mut slot) = self.slots.get_mut(&id) {
                if slot.held && slot.changed <= grant.seq {
                    slot.held = false;
                    slot.changed = grant.seq;
                    self.held.remove(&id);
                    lifted = true;
                }
            }
        }
        if lifted {
            // Without the release's floor, a lookup begun before this grant must not store.
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        self.lease_until.store(self.micros(sent_at + Duration::from_millis(grant.ttl_ms)), Ordering::Release);
        renewal
    }

    /// Takes the words of a push.
    pub fn apply(&self, push: &Invalidation) -> Result<(), Superseded> {
        {
            let epoch = self.epoch.read().unwrap_or_else(|e| e.into_inner());
            if push.term < epoch.term {
                return Err(Superseded(push.term));
            }
            if epoch.is(push.term, push.leader_id, push.office) {
                push.books.iter().for_each(|w| self.take(w));
                return Ok(());
            }
        }
        // The first word of a new office can arrive before the grant that carries it.
        let mut epoch = self.epoch.write().unwrap_or_else(|e| e.into_inner());
        if push.term < epoch.term {
            return Err(Superseded(push.term));
        }
        if !epoch.is(push.term, push.leader_id, push.office) {
            self.begin(&mut epoch, push.term, push.leader_id, push.office);
        }
        push.books.iter().for_each(|w| self.take(w));
        Ok(())
    }

    /// The cached JSON of book `id`, if the lease runs, the book is not held and the entry
    /// is present.
    pub fn get(&self, id: u64) -> Option<Bytes> {
        if !self.lease_valid() {
            return None;
        }
        let hit = self.slots.get(&id).and_then(|slot| {
            if slot.held {
                None
            } else {
                slot.value.as_ref().map(|(json, _)| json.clone())
            }
        });
        let counter = if hit.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// Stores book `id` at `version`, fetched by a lookup that began in `generation`.
    /// Refused when the lease is not running, values were dropped since, the book is held,
    /// or `version` is older than the floor or than the value cached. Returns whether it
    /// was stored.
    pub fn put(&self, id: u64, json: Bytes, version: u64, generation: u64) -> bool {
        let _epoch = self.epoch.read().unwrap_or_else(|e| e.into_inner());
        if generation != self.generation() || !self.lease_valid() {
            return false;
        }
        let mut slot = self.slots.entry(id).or_default();
        if slot.held || version < slot.floor || slot.value.as_ref().is_some_and(|(_, v)| *v > version) {
            return false;
        }
        slot.value = Some((json, version));
        true
    }

    /// Takes the leader's word on one book, unless the slot holds a newer one.
    fn take(&self, word: &BookHold) {
        let mut slot = self.slots.entry(word.id).or_default();
        if word.changed <= slot.changed {
            return;
        }
        slot.changed = word.changed;
        slot.held = word.held;
        slot.floor = slot.floor.max(word.floor);
        if word.held || slot.value.as_ref().is_some_and(|(_, v)| *v < slot.floor) {
            slot.value = None;
        }
        if word.held {
            self.held.insert(word.id);
        } else {
            self.held.remove(&word.id);
        }
    }

    /// Forgets everything: a new office.
    fn begin(&self, epoch: &mut Epoch, term: u64, leader: u64, office: u64) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.slots.clear();
        self.held.clear();
        self.flushes.fetch_add(1, Ordering::Relaxed);
        *epoch = Epoch { term, leader, office, missed: 0 };
    }

    /// Drops every cached value, keeping the words.
    fn drop_values(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.slots.iter_mut().for_each(|mut slot| slot.value = None);
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.value.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Books held now.
    pub fn holds(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(term: u64, missed: u64, seq: u64, held: Vec<BookHold>) -> LeaseGrant {
        LeaseGrant { ttl_ms: 60_000, leader_id: 1, term, office: 7, missed, seq, held }
    }

    fn hold(id: u64, changed: u64) -> BookHold {
        BookHold { id, held: true, floor: 0, changed }
    }

    fn release(id: u64, floor: u64, changed: u64) -> BookHold {
        BookHold { id, held: false, floor, changed }
    }

    fn push(term: u64, books: Vec<BookHold>) -> Invalidation {
        Invalidation { leader_id: 1, term, office: 7, books }
    }

    fn leased() -> Cache {
        let cache = Cache::default();
        cache.renew(&grant(1, 0, 0, vec![]), Instant::now());
        cache
    }

    fn stored(cache: &Cache, id: u64, version: u64) -> bool {
        cache.put(id, Bytes::from(version.to_string()), version, cache.generation())
    }

    #[test]
    fn nothing_is_served_or_stored_without_a_lease() {
        let cache = Cache::default();
        assert!(!stored(&cache, 1, 5));
        assert_eq!(cache.get(1), None);
        let cache = leased();
        assert!(stored(&cache, 1, 5));
        assert_eq!(cache.get(1).as_deref(), Some(&b"5"[..]));
        // The lease lapses: the entry is no longer served, and renewing drops it.
        cache.lease_until.store(0, Ordering::Release);
        assert_eq!(cache.get(1), None);
        assert_eq!(cache.renew(&grant(1, 0, 0, vec![]), Instant::now()), Renewal::Dropped);
        assert_eq!(cache.get(1), None);
    }

    #[test]
    fn a_held_book_is_neither_served_nor_stored_and_its_release_sets_a_floor() {
        let cache = leased();
        let generation = cache.generation();
        assert!(stored(&cache, 1, 5));
        cache.apply(&push(1, vec![hold(1, 1)])).unwrap();
        assert_eq!(cache.get(1), None, "a held book is not served");
        // A lookup that read the old version while the write was on its way.
        assert!(!cache.put(1, Bytes::from_static(b"old"), 5, generation));
        cache.apply(&push(1, vec![release(1, 9, 2)])).unwrap();
        assert!(!cache.put(1, Bytes::from_static(b"old"), 5, generation), "older than the floor");
        assert!(cache.put(1, Bytes::from_static(b"new"), 9, generation));
        // Never replace a newer value with an older one.
        assert!(stored(&cache, 1, 14));
        assert!(!stored(&cache, 1, 13));
    }

    #[test]
    fn a_word_older_than_the_slots_is_ignored() {
        let cache = leased();
        // The release (changed 2) overtook its hold (changed 1): the hold must not stick.
        cache.apply(&push(1, vec![release(1, 9, 2)])).unwrap();
        cache.apply(&push(1, vec![hold(1, 1)])).unwrap();
        assert!(stored(&cache, 1, 9));
        // And a late release cannot lift a newer hold.
        cache.apply(&push(1, vec![hold(1, 4)])).unwrap();
        cache.apply(&push(1, vec![release(1, 12, 3)])).unwrap();
        assert_eq!(cache.get(1), None);
        assert_eq!(cache.holds(), 1);
    }

    #[test]
    fn grants_carry_holds_and_lift_those_released_meanwhile() {
        let cache = leased();
        // A lease granted while book 2 is held holds it here too.
        cache.renew(&grant(1, 0, 3, vec![hold(2, 3)]), Instant::now());
        assert!(!stored(&cache, 2, 7));
        // Its release push was lost; a later grant no longer lists it: it is lifted, and a
        // lookup begun before that grant cannot store.
        let before = cache.generation();
        cache.renew(&grant(1, 0, 5, vec![]), Instant::now());
        assert!(!cache.put(2, Bytes::from_static(b"x"), 7, before));
        assert!(stored(&cache, 2, 7));
        // A hold newer than the grant stays.
        cache.apply(&push(1, vec![hold(3, 9)])).unwrap();
        cache.renew(&grant(1, 0, 8, vec![]), Instant::now());
        assert_eq!(cache.holds(), 1);
    }

    #[test]
    fn a_missed_push_drops_values_but_keeps_holds() {
        let cache = leased();
        assert!(stored(&cache, 1, 5));
        cache.apply(&push(1, vec![hold(2, 1)])).unwrap();
        assert_eq!(cache.renew(&grant(1, 1, 1, vec![hold(2, 1)]), Instant::now()), Renewal::Dropped);
        assert_eq!(cache.get(1), None);
        assert!(!stored(&cache, 2, 5));
    }

    #[test]
    fn a_newer_term_forgets_the_older_and_an_older_one_is_refused() {
        let cache = leased();
        cache.apply(&push(1, vec![hold(1, 1)])).unwrap();
        assert!(stored(&cache, 2, 5));
        // The new leader's first push reaches the frontend before its grant does.
        let generation = cache.generation();
        cache.apply(&Invalidation { leader_id: 2, term: 2, office: 9, books: vec![hold(3, 1)] }).unwrap();
        assert_eq!(cache.get(2), None);
        assert!(!cache.put(2, Bytes::from_static(b"x"), 5, generation), "a lookup from the old term");
        assert!(stored(&cache, 1, 5), "the old term's hold is gone");
        assert!(!stored(&cache, 3, 5), "the new term's hold stays");
        // The grant of that term does not empty the cache again.
        let g = LeaseGrant { leader_id: 2, office: 9, ..grant(2, 0, 1, vec![hold(3, 1)]) };
        assert_eq!(cache.renew(&g, Instant::now()), Renewal::Extended);
        assert!(cache.apply(&push(1, vec![release(1, 9, 2)])).is_err(), "the old leader is refused");
        assert_eq!(cache.renew(&grant(1, 0, 2, vec![]), Instant::now()), Renewal::Stale);
    }

    #[test]
    fn a_leader_restarted_within_its_term_begins_a_new_epoch() {
        let cache = leased();
        cache.apply(&push(1, (1..=900).map(|n| release(1, 5, n)).collect())).unwrap();
        assert!(stored(&cache, 1, 5));
        // The restarted process numbers its words from 1 again: its hold must not be
        // ignored as older than the dead process's 900th word.
        let restarted = LeaseGrant { office: 8, ..grant(1, 0, 0, vec![]) };
        assert_eq!(cache.renew(&restarted, Instant::now()), Renewal::NewEpoch);
        assert!(stored(&cache, 1, 5));
        cache.apply(&Invalidation { office: 8, ..push(1, vec![hold(1, 1)]) }).unwrap();
        assert_eq!(cache.get(1), None);
    }
}
