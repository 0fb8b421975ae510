//! The order service's replicated state: one row per idempotency key.
//!
//! An order is recorded once the catalog has answered its key's decrement, with that
//! answer: `confirmed` or `failed`, never in between. Its id is one more than the highest
//! so far (so ids follow the order in which orders were recorded, and every replica picks
//! the same one). A repeat of the command returns the row as it stands.

use rusqlite::{params, Transaction};
use serde::{Deserialize, Serialize};

use quire_common::api::{cents_to_price, DecrementOutcome, DecrementResult, Order, OrderState};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders (
    order_id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    item_id INTEGER NOT NULL,
    quantity INTEGER NOT NULL,
    state TEXT NOT NULL,
    price_cents INTEGER,
    stock_left INTEGER,
    reason TEXT,
    created_ms INTEGER NOT NULL,
    -- The catalog's sale this order records (its `seq` in the catalog's ledger).
    sale_seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_by_sale ON orders (sale_seq);
";

pub const TABLES: &[&str] = &["orders"];

/// A write to the orders (in the log, encoded; see `quire_raft::payload`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Gives the catalog's answer for `key` (its sale, or its refusal) an order, unless
    /// the key has one: for the book and quantity the answer names.
    Record { key: String, created_ms: u64, result: DecrementResult },
}

/// What recording answers: the key's order as stored. A type of its own rather than
/// [`Order`], whose JSON leaves out empty fields, which the log's encoding (no field
/// names) could not read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    pub order_id: u64,
    pub key: String,
    pub item_id: u64,
    pub quantity: u32,
    pub state: OrderState,
    pub price: Option<f64>,
    pub stock_left: Option<i64>,
    pub reason: Option<String>,
    pub created_ms: u64,
}

impl From<Order> for Recorded {
    fn from(o: Order) -> Self {
        let Order { order_id, key, item_id, quantity, state, price, stock_left, reason, created_ms } = o;
        Recorded { order_id, key, item_id, quantity, state, price, stock_left, reason, created_ms }
    }
}

impl From<Recorded> for Order {
    fn from(r: Recorded) -> Self {
        let Recorded { order_id, key, item_id, quantity, state, price, stock_left, reason, created_ms } = r;
        Order { order_id, key, item_id, quantity, state, price, stock_left, reason, created_ms }
    }
}

impl quire_raft::Command for Command {
    type Answer = Recorded;
}

pub struct Orders;

impl quire_raft::Machine for Orders {
    type Command = Command;

    fn schema(&self) -> &'static str {
        SCHEMA
    }

    fn tables(&self) -> &'static [&'static str] {
        TABLES
    }

    fn apply(&self, tx: &Transaction<'_>, _index: u64, command: Command) -> rusqlite::Result<Recorded> {
        let Command::Record { key, created_ms, result } = command;
        let (state, reason) = match result.outcome {
            DecrementOutcome::Sold => ("confirmed", None),
            DecrementOutcome::OutOfStock => ("failed", Some("out_of_stock")),
            DecrementOutcome::NotFound => ("failed", Some("not_found")),
        };
        // Runs for every buy: prepared once per connection and kept.
        tx.prepare_cached(
            "INSERT OR IGNORE INTO orders
                 (order_id, key, item_id, quantity, state, price_cents, stock_left, reason, created_ms, sale_seq)
             VALUES ((SELECT coalesce(max(order_id), 0) + 1 FROM orders), ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            key,
            result.item_id as i64,
            result.quantity,
            state,
            result.price_cents,
            result.stock_left,
            reason,
            created_ms as i64,
            result.seq as i64
        ])?;
        order_by_key(tx, &key).map(Recorded::from)
    }
}

pub const ORDER_COLUMNS: &str = "order_id, key, item_id, quantity, state, price_cents, stock_left, reason, created_ms";

pub fn order_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Order> {
    let state = match r.get::<_, String>(4)?.as_str() {
        "confirmed" => OrderState::Confirmed,
        _ => OrderState::Failed,
    };
    Ok(Order {
        order_id: r.get::<_, i64>(0)? as u64,
        key: r.get(1)?,
        item_id: r.get::<_, i64>(2)? as u64,
        quantity: r.get(3)?,
        state,
        price: r.get::<_, Option<i64>>(5)?.map(cents_to_price),
        stock_left: r.get(6)?,
        reason: r.get(7)?,
        created_ms: r.get::<_, i64>(8)? as u64,
    })
}

fn order_by_key(tx: &Transaction<'_>, key: &str) -> rusqlite::Result<Order> {
    tx.prepare_cached(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE key = ?1"))?.query_row([key], order_from_row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_raft::Machine;

    fn run(conn: &mut rusqlite::Connection, index: u64, command: Command) -> Order {
        let tx = conn.transaction().unwrap();
        let out = Orders.apply(&tx, index, command).unwrap();
        tx.commit().unwrap();
        out.into()
    }

    fn answer(item_id: u64, outcome: DecrementOutcome) -> DecrementResult {
        DecrementResult { item_id, quantity: 1, seq: item_id, outcome, price_cents: 1999, stock_left: 4, version: 12 }
    }

    /// The log holds commands and answers in postcard, which has no field names: these
    /// bytes pin the format (see the catalog's machine), and answers with and without
    /// their optional fields survive the trip.
    #[test]
    fn commands_and_answers_keep_their_encoding() {
        use quire_raft::payload::{decode, encode};
        let record =
            Command::Record { key: "k".into(), created_ms: 5, result: answer(7, DecrementOutcome::OutOfStock) };
        assert_eq!(encode(&record).unwrap(), [0, 1, b'k', 5, 7, 1, 7, 1, 0x9e, 0x1f, 8, 12]);
        assert_eq!(decode::<Command>(&encode(&record).unwrap()).unwrap(), record);
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let sold = Recorded::from(run(
            &mut conn,
            1,
            Command::Record { key: "a".into(), created_ms: 5, result: answer(2, DecrementOutcome::Sold) },
        ));
        let failed = Recorded::from(run(&mut conn, 2, record));
        assert_eq!((sold.reason.as_deref(), failed.reason.as_deref()), (None, Some("out_of_stock")));
        for recorded in [sold, failed] {
            assert_eq!(decode::<Recorded>(&encode(&recorded).unwrap()).unwrap(), recorded);
        }
    }

    #[test]
    fn an_answer_is_recorded_once_per_key() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let record = |key: &str, result| Command::Record { key: key.into(), created_ms: 5, result };
        let first = run(&mut conn, 10, record("k", answer(2, DecrementOutcome::Sold)));
        assert_eq!(
            (first.order_id, first.item_id, first.state, first.price, first.stock_left),
            (1, 2, OrderState::Confirmed, Some(19.99), Some(4))
        );
        // A repeat, even with another answer, keeps the first order as it is.
        let again = run(&mut conn, 11, record("k", answer(3, DecrementOutcome::OutOfStock)));
        assert_eq!(again, first);
        // Two keys recorded in one entry (group commit) get orders of their own.
        let second = run(&mut conn, 12, record("k2", answer(2, DecrementOutcome::OutOfStock)));
        let third = run(&mut conn, 12, record("k3", answer(9, DecrementOutcome::NotFound)));
        assert_eq!(
            (second.order_id, second.state, second.reason.as_deref()),
            (2, OrderState::Failed, Some("out_of_stock"))
        );
        assert_eq!((third.order_id, third.item_id, third.reason.as_deref()), (3, 9, Some("not_found")));
    }
}
