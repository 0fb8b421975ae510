//! JSON types of the public API (served by frontends) and of the internal service APIs.
//!
//! Prices are held as integer cents everywhere inside quire and shown to clients as a
//! decimal number of dollars; stock and quantities are plain integers.

use serde::{Deserialize, Serialize};

/// Largest quantity one buy may ask for; larger asks are rejected as bad input.
pub const MAX_QUANTITY: u32 = 1_000;
/// Longest topic accepted by `GET /search/{topic}` (bytes).
pub const MAX_TOPIC_LEN: usize = 128;
/// Longest full-text query accepted by `GET /search?q=` (bytes).
pub const MAX_QUERY_LEN: usize = 256;
/// Largest page of `GET /search?q=`.
pub const MAX_PAGE: u32 = 100;
/// Most copies of one book the catalog holds (a CSV row or a restock beyond it is refused):
/// far below `i64::MAX`, so no sum of stock and a restock can overflow.
pub const MAX_STOCK: i64 = 1_000_000_000_000;
/// Most copies one restock adds.
pub const MAX_RESTOCK: u32 = 1_000_000;
/// Highest price of a book, in cents (a million dollars).
pub const MAX_PRICE_CENTS: i64 = 100_000_000;
/// Largest request body any server accepts on its public or internal API.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// A book as clients see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Book {
    pub id: u64,
    pub title: String,
    pub topic: String,
    pub price: f64,
    pub stock: i64,
}

/// A book with the log index of the write that last changed it: the cache version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionedBook {
    #[serde(flatten)]
    pub book: Book,
    pub version: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BookSummary {
    pub id: u64,
    pub title: String,
}

/// `GET /search/{topic}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopicResults {
    pub topic: String,
    pub items: Vec<BookSummary>,
}

/// One hit of a full-text search.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SearchHit {
    pub id: u64,
    pub title: String,
    pub topic: String,
}

/// `GET /search?q=&limit=&cursor=`: a page of hits ordered by id; `next_cursor` is the
/// cursor of the next page, absent on the last.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SearchPage {
    pub query: String,
    pub items: Vec<SearchHit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<u64>,
}

/// Optional body of `POST /buy/{id}`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct BuyRequest {
    pub quantity: Option<i64>,
}

/// What a successful buy returns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Receipt {
    pub order_id: u64,
    pub item_id: u64,
    pub quantity: u32,
    pub price: f64,
    pub stock_left: i64,
}

/// The state of an order.
///
/// Part of the Raft log's format too (postcard, no field names; see `quire_raft::payload`):
/// any change to its shape (a field or variant added, removed or moved) is a new log format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    Confirmed,
    Failed,
}

/// An order as `GET /orders/{order_id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Order {
    pub order_id: u64,
    pub key: String,
    pub item_id: u64,
    pub quantity: u32,
    pub state: OrderState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stock_left: Option<i64>,
    /// Why a failed order failed (`out_of_stock`, `not_found`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the order was first recorded, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

/// Order service: `POST /orders` (sent by frontends through the order balancer).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlaceOrder {
    pub key: String,
    pub item_id: u64,
    pub quantity: u32,
}

/// Catalog service: `POST /books/{id}/decrement` (sent by the order service).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Decrement {
    pub key: String,
    pub quantity: u32,
}

/// What a decrement did.
///
/// Part of the Raft log's format too (postcard, no field names; see `quire_raft::payload`):
/// any change to its shape (a field or variant added, removed or moved) is a new log format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DecrementOutcome {
    Sold,
    OutOfStock,
    NotFound,
}

/// The catalog's answer to a decrement; the same answer for every repeat of the key.
///
/// Part of the Raft log's format too (postcard, no field names; see `quire_raft::payload`):
/// any change to its shape (a field or variant added, removed or moved) is a new log format.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DecrementResult {
    /// The book and quantity of the key's first decrement: a repeat that names another
    /// book or quantity changes nothing and gets this answer, which says so.
    pub item_id: u64,
    pub quantity: u32,
    /// The sale's place in the catalog's ledger (1, 2, ...: one per key, in the order applied).
    pub seq: u64,
    pub outcome: DecrementOutcome,
    pub price_cents: i64,
    pub stock_left: i64,
    /// The book row's version once the decrement (or its repeat) is applied: what caches
    /// are invalidated to. 0 for an unknown book.
    #[serde(default)]
    pub version: u64,
}

/// Catalog service: one row of `GET /internal/sales`, the ledger of decrements.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sale {
    pub key: String,
    pub result: DecrementResult,
}

/// Catalog service: `GET /internal/sales?after=SEQ&limit=N`: the last sale's `seq` (how
/// many sales there are), and up to `limit` sales after `after`, in the order applied. The
/// order leader reads it to give every sale an order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SalesPage {
    pub last_seq: u64,
    pub sales: Vec<Sale>,
}

/// Catalog service: `POST /books/{id}/restock`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Restock {
    pub quantity: u32,
}

/// The catalog leader's word on one book, as frontends must honour it: while `held`, a write
/// to the book is on its way and nothing of it may be served or stored from a cache; once
/// released, only a value of `floor` (the log index of the book's last write) or newer may
/// be stored. `changed` orders the leader's words on one book within its term: a frontend
/// keeps the word with the highest `changed` and ignores older ones that arrive late.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct BookHold {
    pub id: u64,
    pub held: bool,
    pub floor: u64,
    pub changed: u64,
}

/// Pushed by the catalog leader to every frontend with a live lease: before it proposes a
/// write to a book (a hold) and after the write is applied (the release). Concurrent writes
/// share one push per frontend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Invalidation {
    pub leader_id: u64,
    pub term: u64,
    /// Chosen anew each time the leader's process starts: a leader restarted within its
    /// term (openraft brings it back leading the same term) starts a new epoch too.
    pub office: u64,
    pub books: Vec<BookHold>,
}

/// A frontend asks the catalog leader for a cache lease (and registers for invalidations).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRequest {
    /// Base URL at which the frontend takes invalidations.
    pub frontend: String,
}

/// The leader's grant: the frontend may serve cached entries for `ttl_ms` counted from
/// the moment it *sent* the request (the leader confirmed its leadership after that).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseGrant {
    /// 0 while the leader's pushes to this frontend fail: it serves nothing from its cache.
    pub ttl_ms: u64,
    pub leader_id: u64,
    pub term: u64,
    /// See [`Invalidation::office`].
    pub office: u64,
    /// How many invalidations this leader failed to deliver to the frontend, ever. The
    /// frontend drops its cached values whenever the count grows: a count, not a flag, so a
    /// lost grant cannot lose the order.
    pub missed: u64,
    /// The leader's latest `changed` when it granted: a frontend's hold older than this that
    /// `held` does not list was released meanwhile.
    pub seq: u64,
    /// Every book held when the lease was granted.
    pub held: Vec<BookHold>,
}

/// Parses a path id: a positive integer that fits SQLite's signed 64-bit rowid.
pub fn parse_id(text: &str) -> Result<u64, crate::ApiError> {
    text.parse::<u64>()
        .ok()
        .filter(|id| *id > 0 && *id <= i64::MAX as u64)
        .ok_or_else(|| crate::ApiError::bad_request("invalid_id", format!("{text:?} is not a positive integer id")))
}

/// A topic is 1 to [`MAX_TOPIC_LEN`] bytes.
pub fn check_topic(topic: &str) -> Result<(), crate::ApiError> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        return Err(crate::ApiError::bad_request(
            "invalid_topic",
            format!("a topic is 1 to {MAX_TOPIC_LEN} bytes long"),
        ));
    }
    Ok(())
}

pub fn cents_to_price(cents: i64) -> f64 {
    cents as f64 / 100.0
}

/// Parses a decimal price ("12", "12.5", "12.50") into cents.
pub fn price_to_cents(text: &str) -> Option<i64> {
    let text = text.trim();
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 2 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let frac: i64 = format!("{frac:0<2}").parse().ok()?;
    whole.checked_mul(100)?.checked_add(frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_parse_to_cents() {
        assert_eq!(price_to_cents("12"), Some(1200));
        assert_eq!(price_to_cents("12.5"), Some(1250));
        assert_eq!(price_to_cents("0.07"), Some(7));
        assert_eq!(price_to_cents("1.234"), None);
        assert_eq!(price_to_cents("-1"), None);
        assert_eq!(price_to_cents("abc"), None);
        assert_eq!(cents_to_price(1999), 19.99);
    }

    #[test]
    fn ids_must_be_positive_integers() {
        assert_eq!(parse_id("7").unwrap(), 7);
        for bad in ["0", "-1", "abc", "1.5", "99999999999999999999", "9223372036854775808"] {
            assert_eq!(parse_id(bad).unwrap_err().code, "invalid_id", "{bad}");
        }
        assert!(check_topic("").is_err() && check_topic(&"x".repeat(MAX_TOPIC_LEN + 1)).is_err());
        assert!(check_topic("graduate school").is_ok());
    }

    #[test]
    fn buy_body_rejects_unknown_fields() {
        assert!(serde_json::from_str::<BuyRequest>(r#"{"quantity": 2}"#).is_ok());
        assert!(serde_json::from_str::<BuyRequest>(r#"{"qty": 2}"#).is_err());
    }
}
