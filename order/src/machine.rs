//! The order service's replicated state: one row per idempotency key.
//!
//! An order is born `pending` when its key is first placed (its id is one more than the
//! highest so far, so ids follow the order in which keys were placed, and every replica
//! picks the same one) and settles once, to `confirmed` or `failed`, with the catalog's
//! answer for the key. Repeats of either command return the row as it stands.

use rusqlite::{params, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

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
    created_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_pending ON orders (created_ms) WHERE state = 'pending';
";

pub const TABLES: &[&str] = &["orders"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Records a pending order for `key` unless the key is known.
    Place { key: String, item_id: u64, quantity: u32, created_ms: u64 },
    /// Settles the pending order of `key` with the catalog's answer.
    Settle { key: String, result: DecrementResult },
}

pub struct Orders;

impl quire_raft::Machine for Orders {
    fn schema(&self) -> &'static str {
        SCHEMA
    }

    fn tables(&self) -> &'static [&'static str] {
        TABLES
    }

    fn apply(&self, tx: &Transaction<'_>, _index: u64, command: &Value) -> rusqlite::Result<Value> {
        let command: Command = match quire_raft::decode(command) {
            Ok(c) => c,
            Err(answer) => return Ok(answer),
        };
        let key = match command {
            Command::Place { key, item_id, quantity, created_ms } => {
                // Both statements run for every buy: prepared once per connection and kept.
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO orders (order_id, key, item_id, quantity, state, created_ms)
                     VALUES ((SELECT coalesce(max(order_id), 0) + 1 FROM orders), ?1, ?2, ?3, 'pending', ?4)",
                )?
                .execute(params![key, item_id as i64, quantity, created_ms as i64])?;
                key
            }
            Command::Settle { key, result } => {
                let (state, reason) = match result.outcome {
                    DecrementOutcome::Sold => ("confirmed", None),
                    DecrementOutcome::OutOfStock => ("failed", Some("out_of_stock")),
                    DecrementOutcome::NotFound => ("failed", Some("not_found")),
                };
                tx.prepare_cached(
                    "UPDATE orders SET state = ?1, reason = ?2, price_cents = ?3, stock_left = ?4
                     WHERE key = ?5 AND state = 'pending'",
                )?
                .execute(params![state, reason, result.price_cents, result.stock_left, key])?;
                key
            }
        };
        Ok(match order_by_key(tx, &key)? {
            Some(order) => serde_json::to_value(order).unwrap_or(Value::Null),
            None => json!({ "error": "unknown_key" }),
        })
    }
}

pub const ORDER_COLUMNS: &str = "order_id, key, item_id, quantity, state, price_cents, stock_left, reason, created_ms";

pub fn order_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Order> {
    let state = match r.get::<_, String>(4)?.as_str() {
        "confirmed" => OrderState::Confirmed,
        "failed" => OrderState::Failed,
        _ => OrderState::Pending,
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

fn order_by_key(tx: &Transaction<'_>, key: &str) -> rusqlite::Result<Option<Order>> {
    tx.prepare_cached(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE key = ?1"))?
        .query_row([key], order_from_row)
        .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_raft::Machine;

    fn run(conn: &mut rusqlite::Connection, index: u64, command: Command) -> Order {
        let tx = conn.transaction().unwrap();
        let out = Orders.apply(&tx, index, &serde_json::to_value(command).unwrap()).unwrap();
        tx.commit().unwrap();
        serde_json::from_value(out).unwrap()
    }

    #[test]
    fn an_order_is_placed_once_and_settles_once() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let place = || Command::Place { key: "k".into(), item_id: 2, quantity: 1, created_ms: 5 };
        let first = run(&mut conn, 10, place());
        assert_eq!((first.order_id, first.state), (1, OrderState::Pending));
        assert_eq!(run(&mut conn, 11, place()).order_id, 1, "a repeat keeps the first order");
        // Two keys placed in one entry (group commit) get orders of their own.
        let other = |key: &str| Command::Place { key: key.into(), item_id: 2, quantity: 1, created_ms: 6 };
        assert_eq!(run(&mut conn, 12, other("k2")).order_id, 2);
        assert_eq!(run(&mut conn, 12, other("k3")).order_id, 3);
        let sold = DecrementResult { outcome: DecrementOutcome::Sold, price_cents: 1999, stock_left: 4, version: 12 };
        let settled = run(&mut conn, 12, Command::Settle { key: "k".into(), result: sold });
        assert_eq!((settled.state, settled.price, settled.stock_left), (OrderState::Confirmed, Some(19.99), Some(4)));
        // A late, different answer for the same key cannot change a settled order.
        let late =
            DecrementResult { outcome: DecrementOutcome::OutOfStock, price_cents: 0, stock_left: 0, version: 13 };
        assert_eq!(run(&mut conn, 13, Command::Settle { key: "k".into(), result: late }).state, OrderState::Confirmed);
    }
}
