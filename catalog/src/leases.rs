//! Frontend cache leases, and the holds that keep every cached book current
//! (docs/ARCHITECTURE.md, "Cache coherence").
//!
//! A frontend serves cached books only while it holds a lease from the current catalog
//! leader. The leader grants one only after confirming its leadership with a quorum round
//! that began after the request arrived, and records it as running `ttl` from the arrival
//! (the frontend counts from when it sent the request, earlier still).
//!
//! **Holds.** Before the leader proposes a write to a book, it tells every frontend with a
//! live lease to *hold* the book (drop its cached value, serve and store nothing of it) and
//! waits for each to acknowledge, or, for one that does not, waits until that frontend's
//! lease has run out. Only then does the write enter the log, so once any replica can show
//! it, no frontend serves the value it replaced. Once the write is applied, the book is
//! *released* to its new version: frontends may cache it again, but never a value older
//! than that version. Releases are not waited for (they only make caching possible again),
//! and concurrent holds and releases share one push per frontend. A lease granted while a
//! book is held carries the hold.
//!
//! **A new leader** waits one lease length after taking office before its first hold
//! completes. A lease the previous leader granted rests on a quorum confirmation that
//! began after the lease was asked for; some voter in that quorum later voted for the new
//! leader, so the lease was asked for before the new leader took office, and it has run out
//! by then. Every hold, release and lease belongs to one term: a frontend that hears of a
//! newer term forgets the older one's.
//!
//! **Missed pushes.** A frontend that does not acknowledge a push is *waited out*: its
//! count of missed pushes grows, and the push completes once its lease has expired. Every
//! grant reports the count, and a frontend whose count grew drops its cached values. A
//! count rather than a flag: a lost grant cannot lose the order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::join_all;
// Tokio's clock, which tests can pause and advance.
use tokio::time::Instant;

use quire_common::api::{BookHold, Invalidation, LeaseGrant};
use quire_common::batch::Batcher;
use quire_common::headers;

/// Leases granted and books held by this replica while it leads, and the batched pushes to
/// the frontends holding leases.
#[derive(Clone)]
pub struct Leases {
    inner: Arc<Inner>,
    rounds: Batcher<(), ()>,
}

struct Inner {
    ttl: Duration,
    /// This replica's Raft id, named in every push and grant.
    me: u64,
    client: reqwest::Client,
    token: Arc<str>,
    table: Mutex<Table>,
}

/// Everything one term's leadership knows. Replaced whole when a newer term begins.
struct Table {
    term: u64,
    /// When this replica was first seen leading `term` (no earlier than the truth, which
    /// only makes the new leader's wait longer).
    office: Instant,
    /// The latest `changed` handed out, and the latest sent to every live lease.
    seq: u64,
    pushed: u64,
    /// By frontend base URL.
    leases: HashMap<String, Lease>,
    /// Books with writes under way, or released since the last push.
    books: HashMap<u64, Book>,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    expiry: Instant,
    /// Pushes to this frontend that failed. Raised and read together with `expiry` under
    /// the table's lock, so a renewal either happened before the failure (and is waited
    /// out) or reports the higher count.
    missed: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Book {
    /// Writes held and not yet released.
    pending: u32,
    /// The book's version after the last released write.
    floor: u64,
    changed: u64,
}

impl Table {
    fn new(term: u64) -> Table {
        Table { term, office: Instant::now(), seq: 0, pushed: 0, leases: HashMap::new(), books: HashMap::new() }
    }

    fn word(&self, id: u64, book: &Book) -> BookHold {
        BookHold { id, held: book.pending > 0, floor: book.floor, changed: book.changed }
    }
}

/// This replica no longer leads the term a caller acts in.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("a newer term has begun")]
pub struct Superseded;

impl Leases {
    pub fn new(ttl: Duration, me: u64, client: reqwest::Client, token: Arc<str>) -> Self {
        let inner = Arc::new(Inner { ttl, me, client, token, table: Mutex::new(Table::new(0)) });
        let pusher = inner.clone();
        let rounds = Batcher::spawn(move |_: Vec<()>| {
            let pusher = pusher.clone();
            async move { pusher.round().await }
        });
        Leases { inner, rounds }
    }

    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Notes that this replica leads `term` (called as soon as it is seen leading), so that
    /// waiting out the previous leader's leases starts then rather than at the first write.
    pub fn leading(&self, term: u64) {
        drop(self.inner.table(term));
    }

    /// Records a lease for `frontend` running `ttl` from `asked_at` (when the request
    /// arrived, which is no earlier than when the frontend sent it), in `term`, whose
    /// leadership the caller has just confirmed.
    pub fn grant(&self, frontend: &str, asked_at: Instant, term: u64) -> Result<LeaseGrant, Superseded> {
        let mut table = self.inner.table(term)?;
        let lease = table.leases.entry(frontend.to_string()).or_insert(Lease { expiry: asked_at, missed: 0 });
        // A grant that was slow to finish never shortens a lease a later one extended.
        lease.expiry = lease.expiry.max(asked_at + self.inner.ttl);
        let missed = lease.missed;
        let held = table.books.iter().filter(|(_, b)| b.pending > 0).map(|(id, b)| table.word(*id, b)).collect();
        Ok(LeaseGrant {
            ttl_ms: self.inner.ttl.as_millis() as u64,
            leader_id: self.inner.me,
            term,
            missed,
            seq: table.seq,
            held,
        })
    }

    pub fn live(&self) -> usize {
        let now = Instant::now();
        let table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        table.leases.values().filter(|l| l.expiry > now).count()
    }

    /// Holds book `id` at every leased frontend before a write to it is proposed in `term`:
    /// returns once each has acknowledged or its lease has run out, and no earlier than
    /// one lease length after this replica began leading `term`.
    pub async fn hold(&self, id: u64, term: u64) -> Result<Hold, Superseded> {
        let office = self.inner.table(term)?.office;
        tokio::time::sleep_until(office + self.inner.ttl).await;
        {
            let mut guard = self.inner.table(term)?;
            let table = &mut *guard;
            let book = table.books.entry(id).or_default();
            book.pending += 1;
            if book.pending == 1 {
                table.seq += 1;
                book.changed = table.seq;
            }
        }
        let hold = Hold { leases: self.clone(), id, term, settled: false };
        if self.rounds.submit(()).await.is_none() {
            // The push task is gone: wait out every lease instead.
            tracing::error!("invalidation task stopped; waiting out every lease");
            tokio::time::sleep(self.inner.ttl).await;
        }
        Ok(hold)
    }

    /// Ends one hold of book `id`: with the book's version after the write (`floor`), or
    /// `None` when no write was proposed. The release goes out with the next push.
    fn settle(&self, id: u64, term: u64, floor: Option<u64>) {
        {
            let Ok(mut guard) = self.inner.table(term) else { return };
            let table = &mut *guard;
            let Some(book) = table.books.get_mut(&id) else { return };
            book.pending = book.pending.saturating_sub(1);
            book.floor = book.floor.max(floor.unwrap_or(0));
            if book.pending == 0 {
                table.seq += 1;
                book.changed = table.seq;
            }
        }
        self.rounds.send(());
    }
}

/// A book held for one write. Release it with the book's new version once the write is
/// applied; dropped unreleased, it is released as if no write had been proposed. A write
/// whose fate is unknown must [`keep`](Hold::keep) it: the book then stays held until
/// the term ends.
pub struct Hold {
    leases: Leases,
    id: u64,
    term: u64,
    settled: bool,
}

impl Hold {
    pub fn release(mut self, version: u64) {
        self.settled = true;
        self.leases.settle(self.id, self.term, Some(version));
    }

    pub fn keep(mut self) {
        self.settled = true;
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.settled {
            self.leases.settle(self.id, self.term, None);
        }
    }
}

impl Inner {
    /// The table of `term`, begun anew when `term` is newer than the one held.
    fn table(&self, term: u64) -> Result<MutexGuard<'_, Table>, Superseded> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if term > table.term {
            *table = Table::new(term);
        }
        if term < table.term {
            return Err(Superseded);
        }
        Ok(table)
    }

    /// One push: every book whose word changed since the last push, to every live lease.
    async fn round(&self) {
        let (body, live, upto) = {
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            let pushed = table.pushed;
            let books: Vec<BookHold> =
                table.books.iter().filter(|(_, b)| b.changed > pushed).map(|(id, b)| table.word(*id, b)).collect();
            if books.is_empty() {
                return;
            }
            let now = Instant::now();
            // Leases that ended long ago are forgotten; their frontends re-register on renewal.
            table.leases.retain(|_, lease| lease.expiry + Duration::from_secs(60) > now);
            let live: Vec<(String, Instant)> =
                table.leases.iter().filter(|(_, l)| l.expiry > now).map(|(url, l)| (url.clone(), l.expiry)).collect();
            (Invalidation { leader_id: self.me, term: table.term, books }, live, table.seq)
        };
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
                        self.wait_out(&url, body.term).await;
                    }
                }
            }
        });
        join_all(pushes).await;
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.term == body.term {
            table.pushed = table.pushed.max(upto);
            let pushed = table.pushed;
            table.books.retain(|_, b| b.pending > 0 || b.changed > pushed);
        }
    }

    /// Marks `frontend` as having missed a push and sleeps until its current lease
    /// (possibly renewed since the push began) has expired.
    async fn wait_out(&self, frontend: &str, term: u64) {
        let expiry = {
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            if table.term != term {
                return;
            }
            match table.leases.get_mut(frontend) {
                Some(lease) => {
                    lease.missed += 1;
                    lease.expiry
                }
                None => return,
            }
        };
        tokio::time::sleep_until(expiry).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases(ttl_ms: u64) -> Leases {
        Leases::new(Duration::from_millis(ttl_ms), 1, quire_common::client::http_client(), "t".into())
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_frontend_is_waited_out_and_told_to_flush() {
        let leases = leases(200);
        // Nothing listens on this port: the push fails at once.
        let dead = "http://127.0.0.1:9";
        leases.leading(1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let granted_at = Instant::now();
        assert_eq!(leases.grant(dead, granted_at, 1).unwrap().missed, 0);
        let hold = leases.hold(1, 1).await.unwrap();
        assert!(Instant::now() >= granted_at + Duration::from_millis(200), "held before the lease ran out");
        // The count stays raised: a grant whose answer is lost cannot lose the order.
        assert_eq!(leases.grant(dead, Instant::now(), 1).unwrap().missed, 1);
        let grant = leases.grant(dead, Instant::now(), 1).unwrap();
        assert_eq!((grant.missed, grant.held.len()), (1, 1), "a lease granted while a book is held carries the hold");
        hold.release(7);
        let grant = leases.grant(dead, Instant::now(), 1).unwrap();
        assert!(grant.held.is_empty() && grant.seq == 2, "released: {grant:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_leader_holds_only_after_earlier_leases_ran_out() {
        let leases = leases(200);
        let took_office = Instant::now();
        leases.leading(7);
        let first = leases.hold(1, 7).await.unwrap();
        assert!(Instant::now() >= took_office + Duration::from_millis(200), "held while old leases could run");
        first.release(10);
        let again = Instant::now();
        leases.hold(1, 7).await.unwrap().release(11);
        assert_eq!(Instant::now(), again, "only the first writes of a term wait (nothing is leased to push to)");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_never_shrinks_and_a_newer_term_forgets_the_older() {
        let leases = leases(200);
        let now = Instant::now();
        leases.grant("f", now + Duration::from_millis(50), 3).unwrap();
        // A grant that started earlier but finished later keeps the longer lease.
        leases.grant("f", now, 3).unwrap();
        let table = leases.inner.table(3).unwrap();
        assert_eq!(table.leases["f"].expiry, now + Duration::from_millis(250));
        drop(table);
        assert!(leases.grant("f", now, 4).is_ok());
        assert!(leases.grant("f", now, 3).is_err(), "a superseded term grants nothing");
        assert!(leases.inner.table(4).unwrap().leases.len() == 1);
    }

    #[tokio::test(start_paused = true)]
    async fn holds_of_one_book_overlap_and_release_once_all_are_done() {
        let leases = leases(10);
        leases.leading(1);
        let a = leases.hold(5, 1).await.unwrap();
        let b = leases.hold(5, 1).await.unwrap();
        a.release(20);
        let held = |l: &Leases| l.grant("f", Instant::now(), 1).unwrap().held;
        assert_eq!(held(&leases).len(), 1, "still held by the second write");
        drop(b);
        assert!(held(&leases).is_empty());
        let word = leases.inner.table(1).unwrap().books.get(&5).copied();
        assert!(word.is_none_or(|w| w.floor == 20 && w.pending == 0));
    }
}
