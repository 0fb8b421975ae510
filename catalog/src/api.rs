//! The catalog's service API, reached through the catalog balancer by frontends (reads,
//! leases) and by the order service (decrements). Reads are linearizable on any replica;
//! writes are taken by the leader only, and every frontend holds the book before the write
//! is proposed (see [`crate::leases`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use rusqlite::OptionalExtension;
use serde::Deserialize;
use tracing::Instrument;

use quire_common::api::*;
use quire_common::http::{guarded, Json, Token};
use quire_common::{ApiError, Deadline};
use quire_raft::{Applied, Replica, WriteError};

use crate::leases::{Leases, Refusal};
use crate::machine::{sale_from_row, Answer, Command, SALE_COLUMNS};

/// Budget of a request that arrives without a deadline header.
const DEFAULT_BUDGET: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Catalog {
    pub replica: Arc<Replica>,
    pub leases: Leases,
}

pub fn router(catalog: Catalog, token: Token) -> Router {
    let reads = Router::new()
        .route("/books/:id", get(lookup))
        .route("/topics/:topic", get(topic))
        .route("/search", get(search))
        .with_state(catalog.clone());
    let writes = Router::new()
        .route("/books/:id/decrement", post(decrement))
        .route("/books/:id/restock", post(restock))
        .route("/leases", post(lease))
        .route("/admin/ledger", get(ledger))
        .route("/internal/sales", get(sales))
        .with_state(catalog);
    reads.merge(guarded(writes, token))
}

fn storage(e: anyhow::Error) -> ApiError {
    tracing::error!(error = %e, "catalog query failed");
    ApiError::internal("the catalog could not read its database")
}

async fn lookup(
    State(c): State<Catalog>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<VersionedBook>, ApiError> {
    let id = parse_id(&id)?;
    let deadline = Deadline::from_headers_or(&headers, DEFAULT_BUDGET);
    c.replica.workers.read_work(deadline).await?;
    c.replica.read_barrier(deadline).await?;
    let book = c
        .replica
        .reads
        .query(move |conn| {
            conn.prepare_cached("SELECT id, title, topic, price_cents, stock, version FROM books WHERE id = ?1")?
                .query_row([id as i64], |r| {
                    Ok(VersionedBook {
                        book: Book {
                            id: r.get::<_, i64>(0)? as u64,
                            title: r.get(1)?,
                            topic: r.get(2)?,
                            price: cents_to_price(r.get(3)?),
                            stock: r.get(4)?,
                        },
                        version: r.get::<_, i64>(5)? as u64,
                    })
                })
                .optional()
        })
        .await
        .map_err(storage)?;
    book.map(axum::Json).ok_or_else(|| ApiError::not_found(format!("no book with id {id}")))
}

async fn topic(
    State(c): State<Catalog>,
    Path(topic): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<TopicResults>, ApiError> {
    check_topic(&topic)?;
    let deadline = Deadline::from_headers_or(&headers, DEFAULT_BUDGET);
    c.replica.workers.read_work(deadline).await?;
    c.replica.read_barrier(deadline).await?;
    let t = topic.clone();
    let items = c
        .replica
        .reads
        .query(move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT id, title FROM books WHERE topic = ?1 ORDER BY id LIMIT 1000")?;
            let rows = stmt.query_map([t], |r| Ok(BookSummary { id: r.get::<_, i64>(0)? as u64, title: r.get(1)? }))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await
        .map_err(storage)?;
    Ok(axum::Json(TopicResults { topic, items }))
}

#[derive(Debug, Deserialize)]
pub struct SearchParams {
    pub q: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// Turns free text into an FTS5 query that matches every word, whatever punctuation the
/// text holds (each word becomes a quoted string, so no FTS syntax can be injected).
pub fn fts_query(text: &str) -> Option<String> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(16)
        .map(|w| format!("\"{}\"", w.to_lowercase()))
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

async fn search(
    State(c): State<Catalog>,
    Query(params): Query<SearchParams>,
    headers: HeaderMap,
) -> Result<axum::Json<SearchPage>, ApiError> {
    let text = params.q.unwrap_or_default();
    if text.len() > MAX_QUERY_LEN {
        return Err(ApiError::bad_request("invalid_query", format!("a query is at most {MAX_QUERY_LEN} bytes")));
    }
    let fts = fts_query(&text).ok_or_else(|| ApiError::bad_request("invalid_query", "the query has no words"))?;
    let limit = match params.limit.as_deref() {
        None => 20,
        Some(l) => l.parse::<u32>().ok().filter(|l| (1..=MAX_PAGE).contains(l)).ok_or_else(|| {
            ApiError::bad_request("invalid_query", format!("limit must be an integer from 1 to {MAX_PAGE}"))
        })?,
    };
    let cursor = match params.cursor.as_deref() {
        None => 0,
        Some(c) => c.parse::<u64>().ok().filter(|c| *c <= i64::MAX as u64).ok_or_else(|| {
            ApiError::bad_request("invalid_query", "cursor must be the next_cursor of a previous page")
        })?,
    };
    let deadline = Deadline::from_headers_or(&headers, DEFAULT_BUDGET);
    c.replica.workers.read_work(deadline).await?;
    c.replica.read_barrier(deadline).await?;
    let mut items = c
        .replica
        .reads
        .query(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT b.id, b.title, b.topic FROM books_fts f JOIN books b ON b.id = f.rowid
                 WHERE books_fts MATCH ?1 AND f.rowid > ?2 ORDER BY f.rowid LIMIT ?3",
            )?;
            let rows = stmt.query_map(rusqlite::params![fts, cursor as i64, limit + 1], |r| {
                Ok(SearchHit { id: r.get::<_, i64>(0)? as u64, title: r.get(1)?, topic: r.get(2)? })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await
        .map_err(storage)?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|hit| hit.id)
    } else {
        None
    };
    Ok(axum::Json(SearchPage { query: text, items, next_cursor }))
}

async fn decrement(
    State(c): State<Catalog>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(req): Json<Decrement>,
) -> Result<axum::Json<DecrementResult>, ApiError> {
    let item_id = parse_id(&id)?;
    if req.quantity == 0 || req.quantity > MAX_QUANTITY {
        return Err(ApiError::bad_request("invalid_quantity", format!("quantity must be 1 to {MAX_QUANTITY}")));
    }
    if req.key.is_empty() || req.key.len() > 128 {
        return Err(ApiError::bad_request("invalid_key", "the key must be 1 to 128 bytes"));
    }
    let command = Command::Decrement { item_id, key: req.key, quantity: req.quantity };
    let deadline = Deadline::from_headers_or(&headers, DEFAULT_BUDGET);
    // The book's version after the decrement (or its repeat, or a refusal): caches may store
    // that version or newer once it is released.
    let applied = c
        .write_book(item_id, command, deadline, |applied| match &applied.answer {
            Answer::Decremented(result) => result.version,
            _ => 0,
        })
        .await?;
    match applied.answer {
        Answer::Decremented(result) => Ok(axum::Json(result)),
        other => Err(ApiError::internal(format!("a decrement was answered {other:?}"))),
    }
}

async fn restock(
    State(c): State<Catalog>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(req): Json<Restock>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let item_id = parse_id(&id)?;
    if req.quantity == 0 || req.quantity > MAX_RESTOCK {
        return Err(ApiError::bad_request("invalid_quantity", format!("a restock is 1 to {MAX_RESTOCK} copies")));
    }
    let stock = restock_item(&c, item_id, req.quantity, Deadline::from_headers_or(&headers, DEFAULT_BUDGET)).await?;
    Ok(axum::Json(serde_json::json!({ "stock": stock })))
}

/// Proposes a restock of `item_id` (held at every frontend until applied); returns the
/// book's stock after it.
pub async fn restock_item(c: &Catalog, item_id: u64, quantity: u32, deadline: Deadline) -> Result<i64, ApiError> {
    let command = Command::Restock { item_id, quantity };
    // A refused restock leaves the book as it was (its version is no newer than the floor).
    let applied = c
        .write_book(item_id, command, deadline, |a| match a.answer {
            Answer::Restocked { .. } => a.index,
            _ => 0,
        })
        .await?;
    match applied.answer {
        Answer::Restocked { stock } => Ok(stock),
        Answer::NoSuchBook => Err(ApiError::not_found(format!("no book with id {item_id}"))),
        Answer::StockLimit { .. } => Err(ApiError::bad_request(
            "invalid_quantity",
            format!("book {item_id} would hold more than {MAX_STOCK} copies"),
        )),
        other => Err(ApiError::internal(format!("a restock was answered {other:?}"))),
    }
}

impl Catalog {
    /// Proposes `command`, a write to book `item`, and returns once it is applied.
    ///
    /// Every leased frontend holds the book before the write is proposed, so once any
    /// replica can show the write, no cache serves the value it replaced; once applied, the
    /// book is released to `version(applied)`, the book's version after the write. The
    /// proposal runs in a task of its own, which releases the book when the write is
    /// applied whether or not the caller still waits; a write whose fate this replica
    /// cannot learn keeps the book held until the term ends.
    pub async fn write_book(
        &self,
        item: u64,
        command: Command,
        deadline: Deadline,
        version: impl FnOnce(&Applied<Answer>) -> u64 + Send + 'static,
    ) -> Result<Applied<Answer>, ApiError> {
        let Some(term) = self.replica.leading_term() else {
            return Err(ApiError::not_leader(self.replica.leader().map(|(_, url)| url)));
        };
        let unknown = || {
            ApiError::deadline_exceeded(
                "the write was not confirmed in time; its outcome is unknown, retry with the same key",
            )
        };
        let log = self.replica.metrics().last_log_index.unwrap_or(0);
        let holding = self.leases.hold(item, term, log).instrument(tracing::info_span!("hold"));
        let hold = match tokio::time::timeout(deadline.remaining(), holding).await {
            Ok(Ok(hold)) => hold,
            Ok(Err(_)) => return Err(ApiError::not_leader(self.replica.leader().map(|(_, url)| url))),
            // Nothing was proposed: the hold is released as it drops.
            Err(_) => return Err(ApiError::deadline_exceeded("the write could not be started in time")),
        };
        let replica = self.replica.clone();
        let proposal = tokio::spawn(async move {
            // Bound to the term of the hold: appended in a later term (this replica lost and
            // regained leadership meanwhile), it is applied nowhere.
            let answer = replica.propose_in_term(term, &command).await;
            match &answer {
                Ok(applied) => hold.release(version(applied)),
                // Applied as a no-op everywhere: the book is as it was.
                Err(WriteError::StaleTerm | WriteError::Rejected(_)) => drop(hold),
                // A later leader may still apply it (or it was applied, and its answer is
                // lost): held until this term's holds are void.
                Err(WriteError::NotLeader(_) | WriteError::Unknown(_) | WriteError::Codec(_)) => hold.keep(),
            }
            answer
        });
        match tokio::time::timeout(deadline.remaining(), proposal).await {
            Ok(Ok(answer)) => answer.map_err(ApiError::from),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the proposal task failed");
                Err(unknown())
            }
            Err(_) => Err(unknown()),
        }
    }
}

async fn lease(
    State(c): State<Catalog>,
    headers: HeaderMap,
    Json(req): Json<LeaseRequest>,
) -> Result<axum::Json<LeaseGrant>, ApiError> {
    let asked_at = tokio::time::Instant::now();
    let not_leader = || ApiError::not_leader(c.replica.leader().map(|(_, url)| url));
    let term = c.replica.leading_term().ok_or_else(not_leader)?;
    // Confirm leadership with a quorum that answered after this request arrived.
    c.replica.read_barrier(Deadline::from_headers_or(&headers, Duration::from_secs(1))).await?;
    if c.replica.leading_term() != Some(term) {
        return Err(not_leader());
    }
    let m = c.replica.metrics();
    let (log, applied) = (m.last_log_index.unwrap_or(0), m.last_applied.map_or(0, |l| l.index));
    match c.leases.grant(&req.frontend, asked_at, term, log, applied) {
        Ok(grant) => Ok(axum::Json(grant)),
        Err(Refusal::Superseded(_)) => Err(not_leader()),
        Err(e @ Refusal::CatchingUp(_)) => Err(ApiError::unavailable(e.to_string())),
    }
}

/// Per-book accounting for invariant checks: stock now, copies sold, copies restocked, and
/// every key that sold (exactly-once checks compare it with the order service's orders).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ledger {
    pub applied_index: u64,
    pub books: Vec<LedgerRow>,
    pub sold_keys: Vec<(String, u64, u32)>,
    /// Every restock as (log index, item, quantity), in log order.
    pub restocks: Vec<(u64, u64, i64)>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LedgerRow {
    pub id: u64,
    pub stock: i64,
    pub sold: i64,
    pub restocked: i64,
}

async fn ledger(State(c): State<Catalog>) -> Result<axum::Json<Ledger>, ApiError> {
    c.replica.read_barrier(Deadline::after(DEFAULT_BUDGET)).await?;
    let applied_index = c.replica.applied_index();
    let (books, sold_keys, restocks) = c
        .replica
        .reads
        .query(|conn| {
            let mut stmt = conn.prepare(
                "SELECT b.id, b.stock,
                    (SELECT coalesce(sum(quantity), 0) FROM sales s WHERE s.item_id = b.id AND s.outcome = 'sold'),
                    (SELECT coalesce(sum(quantity), 0) FROM restocks r WHERE r.item_id = b.id)
                 FROM books b ORDER BY b.id",
            )?;
            let books = stmt
                .query_map([], |r| {
                    Ok(LedgerRow {
                        id: r.get::<_, i64>(0)? as u64,
                        stock: r.get(1)?,
                        sold: r.get(2)?,
                        restocked: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt =
                conn.prepare("SELECT key, item_id, quantity FROM sales WHERE outcome = 'sold' ORDER BY key")?;
            let keys = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, u32>(2)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt = conn.prepare("SELECT log_index, item_id, quantity FROM restocks ORDER BY seq")?;
            let restocks = stmt
                .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((books, keys, restocks))
        })
        .await
        .map_err(storage)?;
    Ok(axum::Json(Ledger { applied_index, books, sold_keys, restocks }))
}

#[derive(Deserialize)]
struct SalesParams {
    #[serde(default)]
    after: u64,
    limit: Option<u32>,
}

/// Most sales one `GET /internal/sales` returns.
pub const MAX_SALES_PAGE: u32 = 256;

/// `GET /internal/sales?after=SEQ&limit=N`: how many sales there are, and the sales after
/// `after` in the order applied (`limit=0`: none); linearizable, on any replica.
async fn sales(State(c): State<Catalog>, Query(params): Query<SalesParams>) -> Result<axum::Json<SalesPage>, ApiError> {
    let limit = params.limit.unwrap_or(MAX_SALES_PAGE).min(MAX_SALES_PAGE);
    c.replica.read_barrier(Deadline::after(DEFAULT_BUDGET)).await?;
    let page = c
        .replica
        .reads
        .query(move |conn| {
            let last_seq: i64 = conn.query_row("SELECT coalesce(max(seq), 0) FROM sales", [], |r| r.get(0))?;
            let sales = conn
                .prepare_cached(&format!("SELECT {SALE_COLUMNS} FROM sales WHERE seq > ?1 ORDER BY seq LIMIT ?2"))?
                .query_map([params.after as i64, i64::from(limit)], sale_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(SalesPage { last_seq: last_seq as u64, sales })
        })
        .await
        .map_err(storage)?;
    Ok(axum::Json(page))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fts_queries_are_quoted_words() {
        assert_eq!(fts_query("RPCs for Dummies").as_deref(), Some("\"rpcs\" \"for\" \"dummies\""));
        assert_eq!(fts_query("\" OR 1=1; --").as_deref(), Some("\"or\" \"1\" \"1\""));
        assert_eq!(fts_query("  ;;; "), None);
    }
}
