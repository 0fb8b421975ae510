//! The catalog's replicated state: books, the ledger of decrements by idempotency key, and
//! the log of restocks. Every change is a [`Command`] applied through Raft.
//!
//! A book's `version` is the log index of the last write that changed it; frontends use it
//! to order cached values against invalidations. Several writes to a book may share one
//! entry (group commit): they share its version too, which is sound because no reader
//! sees a state between two commands of one entry (the entry is applied in one
//! transaction) and every hold on the book is released to that version or a later one.
//! Full-text search (FTS5) is an external-content index kept by triggers, so it is rebuilt
//! for free when a snapshot is installed and never touched by stock changes.

use rusqlite::{params, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

use quire_common::api::{DecrementOutcome, DecrementResult, Sale, MAX_STOCK};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS books (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    topic TEXT NOT NULL,
    price_cents INTEGER NOT NULL,
    stock INTEGER NOT NULL CHECK (stock >= 0),
    version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS books_by_topic ON books (topic, id);
CREATE INDEX IF NOT EXISTS books_sold_out ON books (id) WHERE stock = 0;
CREATE VIRTUAL TABLE IF NOT EXISTS books_fts USING fts5 (title, topic, content = 'books', content_rowid = 'id');
CREATE TRIGGER IF NOT EXISTS books_fts_insert AFTER INSERT ON books BEGIN
    INSERT INTO books_fts (rowid, title, topic) VALUES (new.id, new.title, new.topic);
END;
CREATE TRIGGER IF NOT EXISTS books_fts_delete AFTER DELETE ON books BEGIN
    INSERT INTO books_fts (books_fts, rowid, title, topic) VALUES ('delete', old.id, old.title, old.topic);
END;
CREATE TRIGGER IF NOT EXISTS books_fts_update AFTER UPDATE OF title, topic ON books BEGIN
    INSERT INTO books_fts (books_fts, rowid, title, topic) VALUES ('delete', old.id, old.title, old.topic);
    INSERT INTO books_fts (rowid, title, topic) VALUES (new.id, new.title, new.topic);
END;
-- One row per idempotency key ever decremented, in the order applied (`seq`): the answer
-- every repeat gets, and what the order leader gives an order to (`GET /internal/sales`).
CREATE TABLE IF NOT EXISTS sales (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    item_id INTEGER NOT NULL,
    quantity INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    price_cents INTEGER NOT NULL,
    stock_left INTEGER NOT NULL,
    log_index INTEGER NOT NULL
);
-- In the order applied (one entry may carry several restocks: `seq` orders them).
CREATE TABLE IF NOT EXISTS restocks (
    seq INTEGER PRIMARY KEY,
    log_index INTEGER NOT NULL,
    item_id INTEGER NOT NULL,
    quantity INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS catalog_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
";

pub const TABLES: &[&str] = &["books", "sales", "restocks", "catalog_meta"];

/// A book as loaded from the seed or a CSV file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NewBook {
    pub id: u64,
    pub title: String,
    pub topic: String,
    pub price_cents: i64,
    pub stock: i64,
}

/// A write to the catalog (in the log, encoded; see `quire_raft::payload`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Loads a batch of the initial catalog (ignored for ids already present); the batch
    /// with `last` marks the catalog as seeded.
    Load {
        books: Vec<NewBook>,
        last: bool,
    },
    /// Sells `quantity` of `item_id` once per `key`.
    Decrement {
        item_id: u64,
        key: String,
        quantity: u32,
    },
    Restock {
        item_id: u64,
        quantity: u32,
    },
}

/// What applying a [`Command`] answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    /// Books a load added (ids already present are not).
    Loaded {
        added: usize,
    },
    Decremented(DecrementResult),
    /// The book's stock after a restock.
    Restocked {
        stock: i64,
    },
    /// A restock of a book that does not exist: nothing changed.
    NoSuchBook,
    /// A restock that would take the book past `MAX_STOCK` copies (it holds `stock`):
    /// nothing changed.
    StockLimit {
        stock: i64,
    },
}

impl quire_raft::Command for Command {
    type Answer = Answer;
}

pub struct Catalog;

impl quire_raft::Machine for Catalog {
    type Command = Command;

    fn schema(&self) -> &'static str {
        SCHEMA
    }

    fn tables(&self) -> &'static [&'static str] {
        TABLES
    }

    fn apply(&self, tx: &Transaction<'_>, index: u64, command: Command) -> rusqlite::Result<Answer> {
        match command {
            Command::Load { books, last } => load(tx, index, &books, last),
            Command::Decrement { item_id, key, quantity } => {
                decrement(tx, index, item_id, &key, quantity).map(Answer::Decremented)
            }
            Command::Restock { item_id, quantity } => restock(tx, index, item_id, quantity),
        }
    }
}

fn load(tx: &Transaction<'_>, index: u64, books: &[NewBook], last: bool) -> rusqlite::Result<Answer> {
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO books (id, title, topic, price_cents, stock, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut added = 0;
    for b in books {
        let stock = b.stock.clamp(0, MAX_STOCK);
        added += insert.execute(params![b.id as i64, b.title, b.topic, b.price_cents, stock, index as i64])?;
    }
    if last {
        tx.execute("INSERT OR REPLACE INTO catalog_meta (name, value) VALUES ('seeded', ?1)", [index.to_string()])?;
    }
    Ok(Answer::Loaded { added })
}

/// The columns [`sale_from_row`] reads, in its order.
pub const SALE_COLUMNS: &str = "seq, key, item_id, quantity, outcome, price_cents, stock_left";

/// One `sales` row (version 0: a sale does not know its book's later versions).
pub fn sale_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Sale> {
    let outcome = match r.get::<_, String>(4)?.as_str() {
        "sold" => DecrementOutcome::Sold,
        "out_of_stock" => DecrementOutcome::OutOfStock,
        _ => DecrementOutcome::NotFound,
    };
    Ok(Sale {
        key: r.get(1)?,
        result: DecrementResult {
            item_id: r.get::<_, i64>(2)? as u64,
            quantity: r.get(3)?,
            seq: r.get::<_, i64>(0)? as u64,
            outcome,
            price_cents: r.get(5)?,
            stock_left: r.get(6)?,
            version: 0,
        },
    })
}

fn decrement(
    tx: &Transaction<'_>,
    index: u64,
    item_id: u64,
    key: &str,
    quantity: u32,
) -> rusqlite::Result<DecrementResult> {
    // Every statement here runs once per buy: prepared once per connection and kept.
    let previous = tx
        .prepare_cached(&format!("SELECT {SALE_COLUMNS} FROM sales WHERE key = ?1"))?
        .query_row([key], sale_from_row)
        .optional()?;
    let row_version = |tx: &Transaction<'_>| -> rusqlite::Result<u64> {
        let v: Option<i64> = tx
            .prepare_cached("SELECT version FROM books WHERE id = ?1")?
            .query_row([item_id as i64], |r| r.get(0))
            .optional()?;
        Ok(v.map_or(0, |v| v as u64))
    };
    if let Some(sale) = previous {
        // The version is the book's now, of the book this decrement named (what its
        // caller's caches hold), whichever book the key was first used for.
        return Ok(DecrementResult { version: row_version(tx)?, ..sale.result });
    }
    let book = tx
        .prepare_cached("SELECT price_cents, stock, version FROM books WHERE id = ?1")?
        .query_row([item_id as i64], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)? as u64)))
        .optional()?;
    let answer = |outcome, price_cents, stock_left, version| DecrementResult {
        item_id,
        quantity,
        seq: 0,
        outcome,
        price_cents,
        stock_left,
        version,
    };
    let result = match book {
        None => answer(DecrementOutcome::NotFound, 0, 0, 0),
        Some((price_cents, stock, version)) if stock < i64::from(quantity) => {
            answer(DecrementOutcome::OutOfStock, price_cents, stock, version)
        }
        Some((price_cents, stock, _)) => {
            let left = stock - i64::from(quantity);
            tx.prepare_cached("UPDATE books SET stock = ?1, version = ?2 WHERE id = ?3")?.execute(params![
                left,
                index as i64,
                item_id as i64
            ])?;
            answer(DecrementOutcome::Sold, price_cents, left, index)
        }
    };
    let outcome = match result.outcome {
        DecrementOutcome::Sold => "sold",
        DecrementOutcome::OutOfStock => "out_of_stock",
        DecrementOutcome::NotFound => "not_found",
    };
    tx.prepare_cached(
        "INSERT INTO sales (seq, key, item_id, quantity, outcome, price_cents, stock_left, log_index)
         VALUES (NULL, ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        key,
        item_id as i64,
        quantity,
        outcome,
        result.price_cents,
        result.stock_left,
        index as i64
    ])?;
    Ok(DecrementResult { seq: tx.last_insert_rowid() as u64, ..result })
}

fn restock(tx: &Transaction<'_>, index: u64, item_id: u64, quantity: u32) -> rusqlite::Result<Answer> {
    let stock: Option<i64> =
        tx.query_row("SELECT stock FROM books WHERE id = ?1", [item_id as i64], |r| r.get(0)).optional()?;
    let Some(stock) = stock else {
        return Ok(Answer::NoSuchBook);
    };
    let Some(after) = stock.checked_add(i64::from(quantity)).filter(|s| *s <= MAX_STOCK) else {
        return Ok(Answer::StockLimit { stock });
    };
    tx.execute(
        "UPDATE books SET stock = ?1, version = ?2 WHERE id = ?3",
        params![after, index as i64, item_id as i64],
    )?;
    tx.execute(
        "INSERT INTO restocks (seq, log_index, item_id, quantity) VALUES (NULL, ?1, ?2, ?3)",
        params![index as i64, item_id as i64, quantity],
    )?;
    Ok(Answer::Restocked { stock: after })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_raft::Machine;

    fn db() -> rusqlite::Connection {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn
    }

    fn run(conn: &mut rusqlite::Connection, index: u64, command: Command) -> Answer {
        let tx = conn.transaction().unwrap();
        let out = Catalog.apply(&tx, index, command).unwrap();
        tx.commit().unwrap();
        out
    }

    fn sold(conn: &mut rusqlite::Connection, index: u64, command: Command) -> DecrementResult {
        match run(conn, index, command) {
            Answer::Decremented(result) => result,
            other => panic!("a decrement answered {other:?}"),
        }
    }

    fn seed(conn: &mut rusqlite::Connection) {
        let book = NewBook {
            id: 1,
            title: "RPCs for Dummies".into(),
            topic: "distributed systems".into(),
            price_cents: 1500,
            stock: 3,
        };
        run(conn, 1, Command::Load { books: vec![book], last: true });
    }

    #[test]
    fn decrement_is_once_per_key_and_never_oversells() {
        let mut conn = db();
        seed(&mut conn);
        let sell = |key: &str, q| Command::Decrement { item_id: 1, key: key.into(), quantity: q };
        assert_eq!(sold(&mut conn, 2, sell("a", 2)).outcome, DecrementOutcome::Sold);
        // A repeat of the key gets the recorded answer and changes nothing.
        let first = DecrementResult {
            item_id: 1,
            quantity: 2,
            seq: 1,
            outcome: DecrementOutcome::Sold,
            price_cents: 1500,
            stock_left: 1,
            version: 2,
        };
        assert_eq!(sold(&mut conn, 3, sell("a", 2)), first);
        // So does a repeat that names another quantity or book: the answer says which buy
        // the key was first used for (the version is of the book named).
        assert_eq!(sold(&mut conn, 3, sell("a", 1)), first);
        let other_book = Command::Decrement { item_id: 9, key: "a".into(), quantity: 2 };
        assert_eq!(sold(&mut conn, 3, other_book), DecrementResult { version: 0, ..first.clone() });
        assert_eq!(sold(&mut conn, 4, sell("b", 2)).outcome, DecrementOutcome::OutOfStock);
        assert_eq!(sold(&mut conn, 5, sell("c", 1)).stock_left, 0);
        assert_eq!(
            sold(&mut conn, 6, Command::Decrement { item_id: 9, key: "d".into(), quantity: 1 }).outcome,
            DecrementOutcome::NotFound
        );
        let (stock, version): (i64, i64) = conn
            .query_row("SELECT stock, version FROM books WHERE id = 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        assert_eq!((stock, version), (0, 5));
        // The refusal is remembered too, even after a restock.
        assert_eq!(run(&mut conn, 7, Command::Restock { item_id: 1, quantity: 10 }), Answer::Restocked { stock: 10 });
        assert_eq!(sold(&mut conn, 8, sell("b", 2)).outcome, DecrementOutcome::OutOfStock);
        assert_eq!(run(&mut conn, 9, Command::Restock { item_id: 9, quantity: 1 }), Answer::NoSuchBook);
        let full = NewBook { id: 2, title: "Full".into(), topic: "t".into(), price_cents: 1, stock: MAX_STOCK };
        assert_eq!(run(&mut conn, 9, Command::Load { books: vec![full], last: false }), Answer::Loaded { added: 1 });
        let restock = Command::Restock { item_id: 2, quantity: 1 };
        assert_eq!(run(&mut conn, 10, restock), Answer::StockLimit { stock: MAX_STOCK });
        // Every key once, in the order first applied.
        let sales: Vec<Sale> = conn
            .prepare(&format!("SELECT {SALE_COLUMNS} FROM sales ORDER BY seq"))
            .unwrap()
            .query_map([], sale_from_row)
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let keys: Vec<(u64, &str, DecrementOutcome)> =
            sales.iter().map(|s| (s.result.seq, s.key.as_str(), s.result.outcome)).collect();
        assert_eq!(
            keys,
            [
                (1, "a", DecrementOutcome::Sold),
                (2, "b", DecrementOutcome::OutOfStock),
                (3, "c", DecrementOutcome::Sold),
                (4, "d", DecrementOutcome::NotFound)
            ]
        );
    }

    /// The log holds commands and answers in postcard, which has no field names:
    /// reordering a variant or a field, or changing a type, changes the log's format. These
    /// bytes pin it; every variant survives the trip.
    #[test]
    fn commands_and_answers_keep_their_encoding() {
        use quire_raft::payload::{decode, encode};
        let decrement = Command::Decrement { item_id: 7, key: "k".into(), quantity: 2 };
        assert_eq!(encode(&decrement).unwrap(), [1, 7, 1, b'k', 2]);
        let result = DecrementResult {
            item_id: 7,
            quantity: 2,
            seq: 3,
            outcome: DecrementOutcome::Sold,
            price_cents: 1500,
            stock_left: 4,
            version: 9,
        };
        let decremented = Answer::Decremented(result);
        assert_eq!(encode(&decremented).unwrap(), [1, 7, 2, 3, 0, 0xb8, 0x17, 8, 9]);
        let book = NewBook { id: 1, title: "T".into(), topic: "t".into(), price_cents: 5, stock: 6 };
        for command in
            [decrement, Command::Load { books: vec![book], last: true }, Command::Restock { item_id: 1, quantity: 2 }]
        {
            assert_eq!(decode::<Command>(&encode(&command).unwrap()).unwrap(), command);
        }
        let answers = [
            decremented,
            Answer::Loaded { added: 3 },
            Answer::Restocked { stock: 4 },
            Answer::NoSuchBook,
            Answer::StockLimit { stock: MAX_STOCK },
        ];
        for answer in answers {
            assert_eq!(decode::<Answer>(&encode(&answer).unwrap()).unwrap(), answer);
        }
    }

    #[test]
    fn search_index_follows_loads_but_not_stock() {
        let mut conn = db();
        seed(&mut conn);
        let hits: i64 =
            conn.query_row("SELECT count(*) FROM books_fts WHERE books_fts MATCH 'rpcs'", [], |r| r.get(0)).unwrap();
        assert_eq!(hits, 1);
        run(&mut conn, 2, Command::Decrement { item_id: 1, key: "k".into(), quantity: 1 });
        let hits: i64 =
            conn.query_row("SELECT count(*) FROM books_fts WHERE books_fts MATCH 'dummies'", [], |r| r.get(0)).unwrap();
        assert_eq!(hits, 1);
    }
}
