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
//! by then. Every hold, release and lease belongs to one *office*: a term of a leader, and
//! within it one life of the leader's process (openraft brings a leader restarted quickly
//! back leading the same term). A frontend that hears of another office forgets the old
//! one's words. An office also grants no lease before it has applied every entry its log
//! held when it began: entries an earlier office appended (and held) may commit only now,
//! and a frontend of the new office must not cache what they replace.
//!
//! **Missed pushes.** A frontend that does not acknowledge a push is *waited out*: its
//! count of missed pushes grows, and the push completes once its lease has expired. Every
//! grant reports the count, and a frontend whose count grew drops its cached values. A
//! count rather than a flag: a lost grant cannot lose the order. Until a push reaches it
//! again (each push is tried on it, unwaited), such a frontend is granted leases of no
//! length: it serves nothing from its cache, and no write waits for it again.

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
    /// Drawn when this process starts; with the term it names an office.
    office: u64,
    client: reqwest::Client,
    token: Arc<str>,
    table: Mutex<Table>,
}

/// Everything one office knows. Replaced whole when a newer term begins.
struct Table {
    term: u64,
    /// When this replica was first seen leading `term` (no earlier than the truth, which
    /// only makes the new leader's wait longer).
    since: Instant,
    /// The last log index when the office began: no lease before it is applied.
    log_at_start: u64,
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
    /// The last push failed and none has reached the frontend since: its leases are of no
    /// length.
    unreachable: bool,
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
    fn new(term: u64, log_at_start: u64) -> Table {
        Table {
            term,
            since: Instant::now(),
            log_at_start,
            seq: 0,
            pushed: 0,
            leases: HashMap::new(),
            books: HashMap::new(),
        }
    }

    fn word(&self, id: u64, book: &Book) -> BookHold {
        BookHold { id, held: book.pending > 0, floor: book.floor, changed: book.changed }
    }
}

/// This replica no longer leads the term a caller acts in.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("a newer term has begun")]
pub struct Superseded;

/// Why no lease was granted.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Superseded(#[from] Superseded),
    /// The office has yet to apply what its log held when it began.
    #[error("the leader is still applying its log (up to {0})")]
    CatchingUp(u64),
}

impl Leases {
    pub fn new(ttl: Duration, me: u64, client: reqwest::Client, token: Arc<str>) -> Self {
        let office = rand::random();
        let inner = Arc::new(Inner { ttl, me, office, client, token, table: Mutex::new(Table::new(0, 0)) });
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

    /// Notes that this replica leads `term` with `last_log` its last log index (called as
    /// soon as it is seen leading), so that waiting out the previous leader's leases starts
    /// then rather than at the first write.
    pub fn leading(&self, term: u64, last_log: u64) {
        drop(self.inner.table(term, last_log));
    }

    /// Records a lease for `frontend` running `ttl` from `asked_at` (when the request
    /// arrived, which is no earlier than when the frontend sent it), in `term`, whose
    /// leadership the caller has just confirmed; `log` is the last log index and `applied`
    /// the last applied one.
    pub fn grant(
        &self,
        frontend: &str,
        asked_at: Instant,
        term: u64,
        log: u64,
        applied: u64,
    ) -> Result<LeaseGrant, Refusal> {
        let mut guard = self.inner.table(term, log)?;
        let table = &mut *guard;
        if applied < table.log_at_start {
            return Err(Refusal::CatchingUp(table.log_at_start));
        }
        let lease = table.leases.entry(frontend.to_string()).or_insert(Lease {
            expiry: asked_at,
            missed: 0,
            unreachable: false,
        });
        let ttl = if lease.unreachable { Duration::ZERO } else { self.inner.ttl };
        // A grant that was slow to finish never shortens a lease a later one extended.
        lease.expiry = lease.expiry.max(asked_at + ttl);
        let missed = lease.missed;
        let held = table.books.iter().filter(|(_, b)| b.pending > 0).map(|(id, b)| table.word(*id, b)).collect();
        Ok(LeaseGrant {
            ttl_ms: ttl.as_millis() as u64,
            leader_id: self.inner.me,
            term,
            office: self.inner.office,
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

    /// Holds book `id` at every leased frontend before a write to it is proposed in `term`
    /// (`log`: the last log index): returns once each has acknowledged or its lease has run
    /// out, and no earlier than one lease length after this replica began leading `term`.
    pub async fn hold(&self, id: u64, term: u64, log: u64) -> Result<Hold, Superseded> {
        let since = self.inner.table(term, log)?.since;
        tokio::time::sleep_until(since + self.inner.ttl).await;
        {
            let mut guard = self.inner.table(term, log)?;
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
            let Ok(mut guard) = self.inner.table(term, 0) else { return };
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
    /// The table of `term`, begun anew (at last log index `log`) when `term` is newer than
    /// the one held.
    fn table(&self, term: u64, log: u64) -> Result<MutexGuard<'_, Table>, Superseded> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if term > table.term {
            *table = Table::new(term, log);
        }
        if term < table.term {
            return Err(Superseded);
        }
        Ok(table)
    }

    /// One push: every book whose word changed since the last push, to every live lease,
    /// and (unwaited) to the frontends it could not reach last time.
    async fn round(self: &Arc<Self>) {
        let (body, live, unreachable, upto) = {
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
            let unreachable: Vec<String> = table
                .leases
                .iter()
                .filter(|(_, l)| l.unreachable && l.expiry <= now)
                .map(|(url, _)| url.clone())
                .collect();
            let body = Invalidation { leader_id: self.me, term: table.term, office: self.office, books };
            (body, live, unreachable, table.seq)
        };
        for url in unreachable {
            let (me, body) = (self.clone(), body.clone());
            tokio::spawn(async move { me.probe(&url, &body).await });
        }
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

    /// Tries a push on a frontend the last one could not reach; once one does, its leases
    /// run again.
    async fn probe(&self, url: &str, body: &Invalidation) {
        let sent = self
            .client
            .post(format!("{url}/internal/invalidate"))
            .header(headers::TOKEN, &*self.token)
            .timeout(self.ttl)
            .json(body)
            .send()
            .await;
        if sent.is_ok_and(|r| r.status().is_success()) {
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            if table.term == body.term {
                if let Some(lease) = table.leases.get_mut(url) {
                    lease.unreachable = false;
                    tracing::info!(frontend = %url, "invalidations reach the frontend again");
                }
            }
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
                    lease.unreachable = true;
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

    fn grant(leases: &Leases, frontend: &str, term: u64) -> LeaseGrant {
        leases.grant(frontend, Instant::now(), term, 0, 0).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_frontend_is_waited_out_once_and_leased_no_longer() {
        let leases = leases(200);
        // Nothing listens on this port: the push fails.
        let dead = "http://127.0.0.1:9";
        leases.leading(1, 0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let granted_at = Instant::now();
        let first = grant(&leases, dead, 1);
        assert_eq!((first.missed, first.ttl_ms), (0, 200));
        let hold = leases.hold(1, 1, 0).await.unwrap();
        assert!(Instant::now() >= granted_at + Duration::from_millis(200), "held before the lease ran out");
        // The count stays raised (a grant whose answer is lost cannot lose the order), the
        // grant carries the hold, and the lease has no length until a push gets through.
        let g = grant(&leases, dead, 1);
        assert_eq!((g.missed, g.held.len(), g.ttl_ms), (1, 1, 0));
        assert_eq!(grant(&leases, dead, 1).missed, 1);
        let again = Instant::now();
        hold.release(7);
        leases.hold(2, 1, 0).await.unwrap().release(8);
        assert_eq!(Instant::now(), again, "no write waits for the unreachable frontend again");
        let g = grant(&leases, dead, 1);
        assert!(g.held.is_empty() && g.seq == 4, "released: {g:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_leader_holds_only_after_earlier_leases_ran_out() {
        let leases = leases(200);
        let took_office = Instant::now();
        leases.leading(7, 0);
        let first = leases.hold(1, 7, 0).await.unwrap();
        assert!(Instant::now() >= took_office + Duration::from_millis(200), "held while old leases could run");
        first.release(10);
        let again = Instant::now();
        leases.hold(1, 7, 0).await.unwrap().release(11);
        assert_eq!(Instant::now(), again, "only the first writes of a term wait (nothing is leased to push to)");
    }

    #[tokio::test(start_paused = true)]
    async fn no_lease_before_the_log_at_office_is_applied() {
        let leases = leases(200);
        leases.leading(3, 40);
        let refused = leases.grant("f", Instant::now(), 3, 41, 39);
        assert!(matches!(refused, Err(Refusal::CatchingUp(40))), "{refused:?}");
        assert!(leases.grant("f", Instant::now(), 3, 41, 40).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_never_shrinks_and_a_newer_term_forgets_the_older() {
        let leases = leases(200);
        let now = Instant::now();
        leases.grant("f", now + Duration::from_millis(50), 3, 0, 0).unwrap();
        // A grant that started earlier but finished later keeps the longer lease.
        let g = leases.grant("f", now, 3, 0, 0).unwrap();
        let table = leases.inner.table(3, 0).unwrap();
        assert_eq!(table.leases["f"].expiry, now + Duration::from_millis(250));
        drop(table);
        assert!(leases.grant("f", now, 4, 0, 0).is_ok());
        assert!(
            matches!(leases.grant("f", now, 3, 0, 0), Err(Refusal::Superseded(_))),
            "a superseded term grants nothing"
        );
        assert_eq!(leases.inner.table(4, 0).unwrap().leases.len(), 1);
        // Every grant names this process's office; another process would draw another.
        assert_eq!(g.office, leases.inner.office);
    }

    #[tokio::test(start_paused = true)]
    async fn holds_of_one_book_overlap_and_release_once_all_are_done() {
        let leases = leases(10);
        leases.leading(1, 0);
        let a = leases.hold(5, 1, 0).await.unwrap();
        let b = leases.hold(5, 1, 0).await.unwrap();
        a.release(20);
        assert_eq!(grant(&leases, "f", 1).held.len(), 1, "still held by the second write");
        drop(b);
        assert!(grant(&leases, "f", 1).held.is_empty());
        let word = leases.inner.table(1, 0).unwrap().books.get(&5).copied();
        assert!(word.is_none_or(|w| w.floor == 20 && w.pending == 0));
    }
}
