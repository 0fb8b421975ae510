//! The checks the fault suite relies on, shown to catch what they exist for: histories and
//! final states with a planted stale read, a lost write, a double sale, a refused buy that
//! took effect, a phantom sale, an unconfirmed order, unconserved stock and diverged
//! replicas, next to correct ones that must pass.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::history::{check, Call, Final, Op, Outcome};
use common::{audit, divergence, FinalState, Report};
use quire_catalog::api::{Ledger, LedgerRow};
use quire_common::api::{Order, OrderState, Receipt};
use quire_raft::http::DigestAnswer;
use rand::{Rng, SeedableRng};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn lookup(client: usize, item: u64, from: u64, to: u64, stock: i64) -> Op {
    Op { client, call: Call::Lookup { item }, sent: ms(from), answered: ms(to), outcome: Outcome::Book { stock } }
}

fn buy(client: usize, item: u64, key: &str, from: u64, to: u64, outcome: Outcome) -> Op {
    let call = Call::Buy { item, quantity: 1, key: key.into() };
    Op { client, call, sent: ms(from), answered: ms(to), outcome }
}

fn order_read(client: usize, order_id: u64, from: u64, to: u64, state: OrderState) -> Op {
    let call = Call::Order { order_id, item: 1 };
    Op { client, call, sent: ms(from), answered: ms(to), outcome: Outcome::Order(order(order_id, "a", state)) }
}

fn search(client: usize, from: u64, to: u64, listed: Vec<u64>) -> Op {
    let call = Call::Search { path: "/search/t".into(), expected: vec![1] };
    Op { client, call, sent: ms(from), answered: ms(to), outcome: Outcome::Listed(listed) }
}

fn sold(order_id: u64, item_id: u64, stock_left: i64) -> Outcome {
    Outcome::Receipt(Receipt { order_id, item_id, quantity: 1, price: 10.0, stock_left })
}

/// The final state after `ops` on one book loaded with `initial` copies.
fn final_state(initial: i64, stock: i64, sold_keys: &[&str], at: u64) -> Final {
    Final {
        at: ms(at),
        initial: [(1, initial)].into(),
        stock: [(1, stock)].into(),
        sold: sold_keys.iter().map(|k| (k.to_string(), (1, 1))).collect(),
        order_of: sold_keys.iter().enumerate().map(|(i, k)| (k.to_string(), 100 + i as u64)).collect(),
        restocks: vec![],
    }
}

#[test]
fn concurrent_buys_reads_and_unknown_outcomes_are_linearizable() {
    let ops = vec![
        // A read that overlaps the first buy may see the stock before or after it.
        buy(0, 1, "a", 0, 10, sold(100, 1, 9)),
        lookup(1, 1, 2, 4, 10),
        lookup(1, 1, 5, 12, 9),
        // The second buy's answer was lost (504); the catalog sold it, some time after 11.
        buy(0, 1, "b", 11, 30, Outcome::Unknown("504 deadline_exceeded".into())),
        lookup(1, 1, 31, 33, 9),
        lookup(2, 1, 40, 41, 8),
        // A buy refused with 503 that the catalog never sold is no write at all.
        buy(2, 1, "c", 42, 43, Outcome::Refused("503 unavailable".into())),
        order_read(0, 100, 44, 45, OrderState::Confirmed),
        search(3, 44, 46, vec![1]),
    ];
    let verdict = check(&ops, &final_state(10, 8, &["a", "b"], 50), &[1]);
    assert!(verdict.violations.is_empty(), "{:#?}", verdict.violations);
    assert_eq!(
        verdict.checked[&1],
        ops.len() - 1 + 2,
        "every operation but the refused buy, the initial load and the final read"
    );
}

#[test]
fn a_planted_stale_read_is_caught() {
    // The reproduction of the cache bug: a lookup returned a higher stock than a lookup
    // that had finished before it began.
    let ops = vec![
        buy(0, 1, "a", 0, 20, sold(100, 1, 9_999_928)),
        lookup(1, 1, 21, 25, 9_999_928),
        lookup(2, 1, 30, 35, 9_999_929),
    ];
    let verdict = check(&ops, &final_state(9_999_929, 9_999_928, &["a"], 40), &[1]);
    assert_eq!(verdict.violations.len(), 1, "{:#?}", verdict.violations);
    let v = &verdict.violations[0];
    assert!(v.contains("not linearizable") && v.contains("stock 9999929") && v.contains("9999928"), "{v}");

    // The same two reads overlapping each other and the buy are fine: the higher one may
    // have been served first.
    let ops = vec![
        buy(0, 1, "a", 0, 40, sold(100, 1, 9_999_928)),
        lookup(1, 1, 21, 32, 9_999_928),
        lookup(2, 1, 30, 35, 9_999_929),
    ];
    assert!(check(&ops, &final_state(9_999_929, 9_999_928, &["a"], 50), &[1]).violations.is_empty());
}

#[test]
fn a_planted_lost_write_is_caught() {
    // A buy was acknowledged, but the final state neither holds the sale nor its effect.
    let ops = vec![buy(0, 1, "a", 0, 10, sold(100, 1, 9)), lookup(1, 1, 11, 12, 9)];
    let verdict = check(&ops, &final_state(10, 10, &[], 20), &[1]);
    assert!(verdict.violations.iter().any(|v| v.contains("is not what the catalog sold")), "{:#?}", verdict.violations);
    assert!(
        verdict.violations.iter().any(|v| v.contains("not linearizable") && v.contains("the final state: stock 10")),
        "{:#?}",
        verdict.violations
    );
    // The same history with the write kept passes.
    assert!(check(&ops, &final_state(10, 9, &["a"], 20), &[1]).violations.is_empty());
}

#[test]
fn answers_that_no_order_explains_are_caught() {
    // Refused, yet sold.
    let ops = vec![buy(0, 1, "a", 0, 10, Outcome::Refused("503 unavailable".into()))];
    let v = check(&ops, &final_state(10, 9, &["a"], 20), &[1]).violations;
    assert!(v.iter().any(|v| v.contains("but the catalog sold it")), "{v:#?}");
    // Sold, yet no client asked.
    let v = check(&[], &final_state(10, 9, &["ghost"], 20), &[1]).violations;
    assert!(v.iter().any(|v| v.contains("which no client sent")), "{v:#?}");
    // An order read after its receipt that is not confirmed.
    let ops = vec![buy(0, 1, "a", 0, 10, sold(100, 1, 9)), order_read(0, 100, 11, 12, OrderState::Failed)];
    let v = check(&ops, &final_state(10, 9, &["a"], 20), &[1]).violations;
    assert!(v.iter().any(|v| v.contains("not linearizable")), "{v:#?}");
    // A search that lost a book.
    let ops = vec![search(0, 1, 2, vec![])];
    assert!(!check(&ops, &final_state(10, 10, &[], 20), &[1]).violations.is_empty());
}

fn order(order_id: u64, key: &str, state: OrderState) -> Order {
    Order {
        order_id,
        key: key.into(),
        item_id: 1,
        quantity: 1,
        state,
        price: Some(10.0),
        stock_left: Some(9),
        reason: None,
        created_ms: 0,
    }
}

fn ledger(stock: i64, sold: &[&str]) -> Ledger {
    Ledger {
        applied_index: 10,
        books: vec![LedgerRow { id: 1, stock, sold: sold.len() as i64, restocked: 0 }],
        sold_keys: sold.iter().map(|k| (k.to_string(), 1, 1)).collect(),
        restocks: vec![],
    }
}

#[test]
fn the_audit_catches_unconserved_stock_double_sales_and_lost_orders() {
    let initial: BTreeMap<u64, i64> = [(1, 10)].into();
    let receipt = Receipt { order_id: 100, item_id: 1, quantity: 1, price: 10.0, stock_left: 9 };
    let history = vec![buy(0, 1, "a", 0, 10, Outcome::Receipt(receipt.clone()))];
    let work = Report { acked: vec![receipt], history, items: vec![1], ..Report::default() };
    let good = FinalState { orders: vec![order(100, "a", OrderState::Confirmed)], ledger: ledger(9, &["a"]) };
    let a = audit(&initial, &good, &work, ms(20));
    assert!(a.violations.is_empty(), "{:#?}", a.violations);

    let unconserved = FinalState { ledger: ledger(8, &["a"]), ..good.clone() };
    let a = audit(&initial, &unconserved, &work, ms(20));
    assert!(a.violations.iter().any(|v| v.contains("initial 10 + restocked 0 != stock 8 + confirmed 1")), "{a:#?}");

    // The catalog sold a key whose order failed: sold once too often.
    let mut double = good.clone();
    double.orders.push(order(101, "b", OrderState::Failed));
    double.ledger = ledger(8, &["a", "b"]);
    let a = audit(&initial, &double, &work, ms(20));
    assert!(a.violations.iter().any(|v| v.contains("catalog sales and confirmed orders differ")), "{a:#?}");

    let lost = FinalState { orders: vec![], ledger: ledger(10, &[]) };
    let a = audit(&initial, &lost, &work, ms(20));
    assert!(a.violations.iter().any(|v| v.contains("acknowledged order 100 lost")), "{a:#?}");
}

#[test]
fn replicas_that_disagree_at_one_index_are_diverged() {
    let d = |applied_index, digest: &str| DigestAnswer { applied_index, digest: digest.into() };
    let behind = [("a".to_string(), d(5, "x")), ("b".to_string(), d(4, "y"))];
    assert_eq!(divergence(&behind), None, "a replica behind has not diverged (yet)");
    let diverged = [("a".to_string(), d(5, "x")), ("b".to_string(), d(4, "y")), ("c".to_string(), d(5, "z"))];
    assert!(divergence(&diverged).is_some_and(|m| m.contains("a and c")));
}

/// A long random history of one book, made by a correct sequential book (each operation
/// takes effect at a random instant within its interval): it must pass, and the same
/// history with one late read changed to a stale value must not.
#[test]
fn long_random_histories_pass_and_a_planted_stale_read_fails() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let clients = 12;
    let mut free_at = vec![0u64; clients];
    // (client, start, effect instant, end, is_buy)
    let mut plan = Vec::new();
    for _ in 0..3000 {
        let client = rng.gen_range(0..clients);
        let start = free_at[client] + rng.gen_range(0..3);
        let end = start + rng.gen_range(1..30);
        let at = rng.gen_range(start..=end);
        plan.push((client, start, at, end, client < 6));
        free_at[client] = end;
    }
    let mut order: Vec<usize> = (0..plan.len()).collect();
    order.sort_by_key(|&i| plan[i].2);
    let mut stock = 1_000_000;
    let mut ops = vec![None; plan.len()];
    let mut sold_keys = Vec::new();
    for &i in &order {
        let (client, start, _, end, is_buy) = plan[i];
        ops[i] = Some(if is_buy {
            stock -= 1;
            let key = format!("k{i}");
            sold_keys.push(key.clone());
            // Every twentieth buy's answer is lost.
            let outcome = if i % 20 == 0 { Outcome::Unknown("504".into()) } else { sold(i as u64, 1, stock) };
            buy(client, 1, &key, start, end, outcome)
        } else {
            lookup(client, 1, start, end, stock)
        });
    }
    let mut ops: Vec<Op> = ops.into_iter().map(|o| o.expect("every op planned")).collect();
    let keys: Vec<&str> = sold_keys.iter().map(String::as_str).collect();
    let end = plan.iter().map(|p| p.3).max().unwrap_or(0) + 1;
    let fin = final_state(1_000_000, stock, &keys, end);
    let verdict = check(&ops, &fin, &[1]);
    assert!(verdict.violations.is_empty(), "{:#?}", verdict.violations);

    // Plant: a lookup late in the run returns the stock of long before.
    let late = order[order.len() * 9 / 10];
    let (client, start, _, end_late, _) = plan[late];
    ops.push(lookup(client + clients, 1, start, end_late, 1_000_000 - 5));
    assert!(!check(&ops, &fin, &[1]).violations.is_empty(), "the planted stale read went unnoticed");
}

#[test]
fn a_retried_buy_is_one_write() {
    // The first attempt's answer was lost; the retry is answered from what it did.
    let ops = vec![
        buy(0, 1, "a", 0, 10, Outcome::Unknown("504 deadline_exceeded".into())),
        buy(0, 1, "a", 20, 25, sold(100, 1, 9)),
        lookup(1, 1, 30, 31, 9),
        // Refused (nothing done), then done by the retry.
        buy(2, 1, "b", 32, 33, Outcome::Refused("503 unavailable".into())),
        buy(2, 1, "b", 34, 36, sold(101, 1, 8)),
        lookup(1, 1, 37, 38, 8),
    ];
    let verdict = check(&ops, &final_state(10, 8, &["a", "b"], 40), &[1]);
    assert!(verdict.violations.is_empty(), "{:#?}", verdict.violations);

    // Counted as two writes, the retry would leave 8 after "a": a read of 8 is caught.
    let ops = vec![
        buy(0, 1, "a", 0, 10, Outcome::Unknown("504 deadline_exceeded".into())),
        buy(0, 1, "a", 20, 25, sold(100, 1, 9)),
        lookup(1, 1, 30, 31, 8),
    ];
    let verdict = check(&ops, &final_state(10, 9, &["a"], 40), &[1]);
    assert_eq!(verdict.violations.len(), 1, "{:#?}", verdict.violations);

    // A retry acknowledged for a key the catalog never sold is caught.
    let ops = vec![
        buy(0, 1, "a", 0, 10, Outcome::Refused("503 unavailable".into())),
        buy(0, 1, "a", 20, 25, sold(100, 1, 9)),
    ];
    let verdict = check(&ops, &final_state(10, 10, &[], 40), &[1]);
    assert!(verdict.violations.iter().any(|v| v.contains("not what the catalog sold")), "{:#?}", verdict.violations);
}
