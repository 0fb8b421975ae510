//! The catalog's service API, reached through the catalog balancer by frontends (reads,
//! leases) and by the order service (decrements). Reads are linearizable on any replica;
//! writes are taken by the leader only and acknowledged after frontends are invalidated.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use rusqlite::OptionalExtension;
use serde::Deserialize;

use quire_common::api::*;
use quire_common::http::{guarded, Json, Token};
use quire_common::{ApiError, Deadline};
use quire_raft::Replica;

use crate::leases::Leases;
use crate::machine::Command;

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
    let applied = c
        .replica
        .write(serde_json::to_value(command).unwrap_or_default(), Deadline::from_headers_or(&headers, DEFAULT_BUDGET))
        .await?;
    let result: DecrementResult = serde_json::from_value(applied.response)
        .map_err(|e| ApiError::internal(format!("unexpected decrement answer: {e}")))?;
    // Invalidate to the row's version even for a repeat or a refusal: the first attempt's
    // push may still be under way (or its leader died before pushing), and the row's own
    // version never makes a fresh cached value look stale.
    if result.outcome != DecrementOutcome::NotFound {
        c.leases.invalidate(item_id, result.version, c.replica.metrics().current_term).await;
    }
    Ok(axum::Json(result))
}

async fn restock(
    State(c): State<Catalog>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(req): Json<Restock>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let item_id = parse_id(&id)?;
    if req.quantity == 0 || req.quantity > 1_000_000 {
        return Err(ApiError::bad_request("invalid_quantity", "a restock is 1 to 1000000 copies"));
    }
    restock_item(&c, item_id, req.quantity, Deadline::from_headers_or(&headers, DEFAULT_BUDGET)).await.map(axum::Json)
}

/// Proposes a restock and invalidates frontends before answering.
pub async fn restock_item(
    c: &Catalog,
    item_id: u64,
    quantity: u32,
    deadline: Deadline,
) -> Result<serde_json::Value, ApiError> {
    let command = Command::Restock { item_id, quantity };
    let applied = c.replica.write(serde_json::to_value(command).unwrap_or_default(), deadline).await?;
    if applied.response.get("error").is_some() {
        return Err(ApiError::not_found(format!("no book with id {item_id}")));
    }
    c.leases.invalidate(item_id, applied.index, c.replica.metrics().current_term).await;
    Ok(applied.response)
}

async fn lease(
    State(c): State<Catalog>,
    headers: HeaderMap,
    Json(req): Json<LeaseRequest>,
) -> Result<axum::Json<LeaseGrant>, ApiError> {
    let asked_at = Instant::now();
    if !c.replica.is_leader() {
        return Err(ApiError::not_leader(c.replica.leader().map(|(_, url)| url)));
    }
    // Confirm leadership with a quorum that answered after this request arrived.
    c.replica.read_barrier(Deadline::from_headers_or(&headers, Duration::from_secs(1))).await?;
    if !c.replica.is_leader() {
        return Err(ApiError::not_leader(c.replica.leader().map(|(_, url)| url)));
    }
    let missed = c.leases.grant(&req.frontend, asked_at);
    let m = c.replica.metrics();
    Ok(axum::Json(LeaseGrant {
        ttl_ms: c.leases.ttl().as_millis() as u64,
        leader_id: c.replica.id,
        term: m.current_term,
        missed,
    }))
}

/// Per-book accounting for invariant checks: stock now, copies sold, copies restocked, and
/// every key that sold (exactly-once checks compare it with the order service's orders).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Ledger {
    pub applied_index: u64,
    pub books: Vec<LedgerRow>,
    pub sold_keys: Vec<(String, u64, u32)>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct LedgerRow {
    pub id: u64,
    pub stock: i64,
    pub sold: i64,
    pub restocked: i64,
}

async fn ledger(State(c): State<Catalog>) -> Result<axum::Json<Ledger>, ApiError> {
    c.replica.read_barrier(Deadline::after(DEFAULT_BUDGET)).await?;
    let applied_index = c.replica.applied_index();
    let (books, sold_keys) = c
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
            Ok((books, keys))
        })
        .await
        .map_err(storage)?;
    Ok(axum::Json(Ledger { applied_index, books, sold_keys }))
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
