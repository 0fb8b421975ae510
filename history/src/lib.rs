//! What clients saw, and the linearizability check over it.
//!
//! A test workload records every request it makes through the store: what it asked, when
//! it sent the request and when the answer came back (the test's one monotonic clock), and
//! the answer. After the run, the store's final state resolves what no client could see: a
//! buy whose outcome was unknown (504, no answer) took effect if and only if the catalog
//! sold its key, at some moment after it was sent; the restocks the catalog logged took
//! effect at some moment during the run. The final stock is a last read that begins after
//! every other operation ended, so an acknowledged buy that the store lost shows up as a
//! stale read.
//!
//! Linearizability is local (a history is linearizable if and only if each object's
//! sub-history is), so the history is split per book and each book's operations are checked
//! against the sequential specification of one book by a Wing–Gong–Lowe search
//! (`todc_utils::WGLChecker`):
//! - state: the stock, and which of the orders that some client read are confirmed;
//! - a lookup returns the stock;
//! - a buy of `q` copies sells if the stock is at least `q`, leaving `stock - q` (the
//!   receipt's `stock_left`), and otherwise answers `out_of_stock`;
//! - a restock adds copies;
//! - a search lists the book (books are never removed);
//! - an order read returns `confirmed` exactly when its buy has taken effect.
//!
//! Besides the search, the projection checks what no ordering can explain: an answer that
//! says a buy did not happen (409, 503) for a key the catalog sold, a receipt for a key it
//! did not sell, a key sold that no client asked for.
//!
//! A client may retry a buy with its key: the attempts are one write. The first attempt
//! that may have done it (answered, or unknown and sold) is the write; a later attempt is
//! answered from what it did, so it must agree with the catalog and is no step of its own.
//! An attempt refused (503: nothing done) before a later one is no write at all.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use quire_common::api::{Order, OrderState, Receipt};
use todc_utils::linearizability::history::{Action, History};
use todc_utils::{Specification, WGLChecker};

/// What a client asked for.
#[derive(Debug, Clone)]
pub enum Call {
    Lookup {
        item: u64,
    },
    Buy {
        item: u64,
        quantity: u32,
        key: String,
    },
    /// A topic or full-text search that should list every book in `expected`.
    Search {
        path: String,
        expected: Vec<u64>,
    },
    /// `GET /orders/{id}` for an order a receipt named.
    Order {
        order_id: u64,
        item: u64,
    },
}

/// What it got back.
#[derive(Debug, Clone)]
pub enum Outcome {
    Book {
        stock: i64,
    },
    Receipt(Receipt),
    OutOfStock,
    NotFound,
    Listed(Vec<u64>),
    Order(Order),
    /// A documented answer that says nothing was done (503 `unavailable` or `dropped`).
    Refused(String),
    /// The request may or may not have taken effect (504, no answer, a garbled answer).
    Unknown(String),
}

/// One request and its answer; times are counted from when the workload began.
#[derive(Debug, Clone)]
pub struct Op {
    pub client: usize,
    pub call: Call,
    pub sent: Duration,
    pub answered: Duration,
    pub outcome: Outcome,
}

/// The store's state after the run, read once every sale has its order.
#[derive(Debug, Clone, Default)]
pub struct Final {
    /// When the final state was read (on the workload's clock): after every operation.
    pub at: Duration,
    pub initial: BTreeMap<u64, i64>,
    pub stock: BTreeMap<u64, i64>,
    /// Every key the catalog sold: (item, quantity).
    pub sold: HashMap<String, (u64, u32)>,
    /// Order id of each key the order group holds.
    pub order_of: HashMap<String, u64>,
    /// Every restock: (item, quantity).
    pub restocks: Vec<(u64, i64)>,
}

/// What the check found: per book, the operations checked; and every violation.
#[derive(Debug, Default)]
pub struct Verdict {
    pub checked: BTreeMap<u64, usize>,
    pub violations: Vec<String>,
}

impl Verdict {
    pub fn ops(&self) -> usize {
        self.checked.values().sum()
    }
}

/// One step of one book, as the sequential specification sees it.
#[derive(Debug, Clone)]
enum Step {
    /// The catalog as loaded: completes before anything else begins.
    Init(i64),
    Read(i64),
    /// A buy with its receipt; `order` is set when some client read that order.
    Sold {
        quantity: i64,
        left: i64,
        order: Option<u64>,
    },
    /// A buy the catalog sold whose answer no client saw.
    SoldUnseen {
        quantity: i64,
        order: Option<u64>,
    },
    OutOfStock {
        quantity: i64,
    },
    Restocked(i64),
    Listed(bool),
    OrderRead {
        order: u64,
        confirmed: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Book {
    stock: i64,
    /// Read orders whose buy has taken effect.
    confirmed: BTreeSet<u64>,
}

struct BookSpec;

impl Specification for BookSpec {
    type State = Option<Book>;
    type Operation = Step;

    fn init() -> Self::State {
        None
    }

    fn apply(step: &Step, state: &Option<Book>) -> (bool, Option<Book>) {
        let Some(book) = state else {
            return match step {
                Step::Init(stock) => (true, Some(Book { stock: *stock, confirmed: BTreeSet::new() })),
                _ => (false, None),
            };
        };
        let mut next = book.clone();
        let valid = match step {
            Step::Init(_) => false,
            Step::Read(stock) => book.stock == *stock,
            Step::Sold { quantity, left, order } => {
                next.stock = *left;
                next.confirmed.extend(*order);
                book.stock >= *quantity && book.stock - quantity == *left
            }
            Step::SoldUnseen { quantity, order } => {
                next.stock -= quantity;
                next.confirmed.extend(*order);
                book.stock >= *quantity
            }
            Step::OutOfStock { quantity } => book.stock < *quantity,
            Step::Restocked(quantity) => {
                next.stock += quantity;
                true
            }
            Step::Listed(present) => *present,
            Step::OrderRead { order, confirmed } => book.confirmed.contains(order) == *confirmed,
        };
        if valid {
            (true, Some(next))
        } else {
            (false, state.clone())
        }
    }
}

/// A step with its real-time interval (nanoseconds on the workload's clock) and where it
/// came from, for the report.
#[derive(Debug, Clone)]
struct Timed {
    step: Step,
    start: u64,
    end: u64,
    /// A client's sequential operations share a process; an operation with an open end
    /// (unknown outcome, restock) gets one of its own.
    process: usize,
    what: String,
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// Checks `ops` against the final state for the books in `items` (books other writers
/// also changed must be left out: their writes are not in the history).
pub fn check(ops: &[Op], fin: &Final, items: &[u64]) -> Verdict {
    let mut verdict = Verdict::default();
    let items: BTreeSet<u64> = items.iter().copied().collect();
    let end = nanos(fin.at).max(ops.iter().map(|o| nanos(o.answered)).max().unwrap_or(0)) + 1;
    let mut books: BTreeMap<u64, Vec<Timed>> = BTreeMap::new();
    // Orders some client read: only their confirmation needs to be part of the state.
    let watched: BTreeSet<u64> = ops
        .iter()
        .filter_map(|o| match o.call {
            Call::Order { order_id, .. } => Some(order_id),
            _ => None,
        })
        .collect();
    let watch = |order: u64| watched.contains(&order).then_some(order);
    let mut own_process = 1_000_000;
    let mut asked: BTreeSet<&str> = BTreeSet::new();
    // A key's attempts (a client retrying a buy) are one write: the first attempt that may
    // have done it is the write, and a later one is answered from what it did. Attempts are
    // taken in the order they were sent.
    let mut attempts: BTreeMap<&str, usize> = BTreeMap::new();
    for op in ops {
        if let Call::Buy { key, .. } = &op.call {
            *attempts.entry(key.as_str()).or_default() += 1;
        }
    }
    let mut written: BTreeSet<&str> = BTreeSet::new();
    let mut ops: Vec<&Op> = ops.iter().collect();
    ops.sort_by_key(|op| op.sent);
    for op in ops {
        let (start, stop) = (nanos(op.sent) + 1, nanos(op.answered) + 1);
        let mut push = |item: u64, step: Step, open: bool, what: String| {
            if !items.contains(&item) {
                return;
            }
            let (end, process) = if open {
                own_process += 1;
                (end, own_process)
            } else {
                (stop, op.client)
            };
            books.entry(item).or_default().push(Timed { step, start, end, process, what });
        };
        let at = format!("client {} at +{:.3?}..+{:.3?}", op.client, op.sent, op.answered);
        match (&op.call, &op.outcome) {
            (Call::Lookup { item }, Outcome::Book { stock }) => {
                push(*item, Step::Read(*stock), false, format!("lookup → stock {stock} ({at})"))
            }
            (Call::Lookup { .. }, _) => {}
            (Call::Buy { item, quantity, key }, outcome) => {
                asked.insert(key);
                let retried_later = attempts.get_mut(key.as_str()).is_some_and(|left| {
                    *left -= 1;
                    *left > 0
                });
                let retry = written.contains(key.as_str());
                let sold = fin.sold.get(key);
                let q = i64::from(*quantity);
                match outcome {
                    Outcome::Receipt(r)
                        if retry
                            && (sold != Some(&(*item, *quantity)) || r.item_id != *item || r.quantity != *quantity) =>
                    {
                        verdict.violations.push(format!(
                            "a retry of buy {key} ({q} of book {item}) was acknowledged ({r:?}, {at}) but the catalog sold {sold:?}"
                        ))
                    }
                    Outcome::OutOfStock | Outcome::Refused(_) | Outcome::NotFound if retry && sold.is_some() => verdict
                        .violations
                        .push(format!("a retry of buy {key} was answered {outcome:?} ({at}) but the catalog sold it")),
                    _ if retry => {}
                    // Nothing done, and a later attempt may do it.
                    Outcome::Refused(_) if retried_later => {}
                    Outcome::Receipt(r) => {
                        if sold != Some(&(*item, *quantity)) || r.item_id != *item || r.quantity != *quantity {
                            verdict.violations.push(format!(
                                "acknowledged buy {key} ({q} of book {item}, receipt {r:?}) is not what the catalog sold: {sold:?}"
                            ));
                        }
                        written.insert(key);
                        let step = Step::Sold { quantity: q, left: r.stock_left, order: watch(r.order_id) };
                        push(*item, step, false, format!("buy {key} ×{q} → sold, {} left ({at})", r.stock_left));
                    }
                    Outcome::OutOfStock | Outcome::Refused(_) | Outcome::NotFound if sold.is_some() => verdict
                        .violations
                        .push(format!("buy {key} was answered {outcome:?} ({at}) but the catalog sold it")),
                    Outcome::OutOfStock => {
                        written.insert(key);
                        push(
                            *item,
                            Step::OutOfStock { quantity: q },
                            false,
                            format!("buy {key} ×{q} → out of stock ({at})"),
                        )
                    }
                    Outcome::NotFound => verdict.violations.push(format!("buy {key}: book {item} not found ({at})")),
                    Outcome::Unknown(_) if sold.is_some() => {
                        written.insert(key);
                        let order = fin.order_of.get(key).and_then(|o| watch(*o));
                        push(
                            *item,
                            Step::SoldUnseen { quantity: q, order },
                            true,
                            format!("buy {key} ×{q} → unknown, sold ({at})"),
                        );
                    }
                    _ => {}
                }
            }
            (Call::Search { path, expected }, Outcome::Listed(ids)) => {
                for item in expected {
                    let present = ids.contains(item);
                    push(*item, Step::Listed(present), false, format!("{path} → listed: {present} ({at})"));
                }
            }
            (Call::Search { .. }, _) => {}
            (Call::Order { order_id, item }, outcome) => {
                let confirmed = match outcome {
                    Outcome::Order(o) if o.order_id == *order_id && o.item_id == *item => {
                        o.state == OrderState::Confirmed
                    }
                    Outcome::Order(o) => {
                        verdict.violations.push(format!("order {order_id} of book {item} read as {o:?} ({at})"));
                        continue;
                    }
                    Outcome::NotFound => false,
                    _ => continue,
                };
                push(
                    *item,
                    Step::OrderRead { order: *order_id, confirmed },
                    false,
                    format!("order {order_id} → confirmed: {confirmed} ({at})"),
                );
            }
        }
    }
    // Writes no client asked for cannot be explained by any ordering.
    for (key, (item, _)) in &fin.sold {
        if items.contains(item) && !asked.contains(key.as_str()) {
            verdict.violations.push(format!("the catalog sold key {key} (book {item}), which no client sent"));
        }
    }
    for &(item, quantity) in &fin.restocks {
        if items.contains(&item) {
            own_process += 1;
            let timed = Timed {
                step: Step::Restocked(quantity),
                start: 1,
                end,
                process: own_process,
                what: format!("restock +{quantity}"),
            };
            books.entry(item).or_default().push(timed);
        }
    }
    for &item in &items {
        let (Some(&initial), Some(&last)) = (fin.initial.get(&item), fin.stock.get(&item)) else {
            verdict.violations.push(format!("book {item} is missing from the final state"));
            continue;
        };
        let steps = books.entry(item).or_default();
        steps.push(Timed {
            step: Step::Init(initial),
            start: 0,
            end: 0,
            process: usize::MAX,
            what: "the catalog as loaded".into(),
        });
        own_process += 1;
        steps.push(Timed {
            step: Step::Read(last),
            start: end + 1,
            end: end + 2,
            process: own_process,
            what: format!("the final state: stock {last}"),
        });
        verdict.checked.insert(item, steps.len());
        if !linearizable(steps) {
            verdict.violations.push(format!(
                "book {item}: {} operations are not linearizable{}",
                steps.len(),
                explain(steps)
            ));
        }
    }
    verdict
}

fn linearizable(steps: &[Timed]) -> bool {
    // Calls before answers at the same instant: operations that touch are concurrent, which
    // can only allow more orders (never a false alarm).
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(steps.len() * 2);
    for (i, s) in steps.iter().enumerate() {
        events.push((s.start, 0, i));
        events.push((s.end, 1, i));
    }
    events.sort();
    let mut processes: HashMap<usize, usize> = HashMap::new();
    let actions = events
        .into_iter()
        .map(|(_, kind, i)| {
            let next = processes.len();
            let process = *processes.entry(steps[i].process).or_insert(next);
            let step = steps[i].step.clone();
            (process, if kind == 0 { Action::Call(step) } else { Action::Response(step) })
        })
        .collect();
    WGLChecker::<BookSpec>::is_linearizable(History::from_actions(actions))
}

/// A witness for the report, when there is a simple one: the operations that observed a
/// stock above what another had already observed before they began (stock only falls
/// between restocks), and the first of them. The checker's verdict stands without one.
fn explain(steps: &[Timed]) -> String {
    if steps.iter().any(|s| matches!(s.step, Step::Restocked(_))) {
        return String::new();
    }
    // (stock before, stock after) an operation observed.
    let seen = |s: &Step| match *s {
        Step::Read(stock) => Some((stock, stock)),
        Step::Sold { quantity, left, .. } => Some((left + quantity, left)),
        _ => None,
    };
    let mut by_start: Vec<&Timed> = steps.iter().filter(|s| seen(&s.step).is_some()).collect();
    by_start.sort_by_key(|s| s.start);
    let mut by_end = by_start.clone();
    by_end.sort_by_key(|s| s.end);
    let mut lowest: Option<(i64, &Timed)> = None;
    let mut ended = by_end.iter().peekable();
    let mut stale = Vec::new();
    for op in by_start {
        while let Some(done) = ended.next_if(|d| d.end < op.start) {
            let after = seen(&done.step).map_or(i64::MAX, |s| s.1);
            if lowest.is_none_or(|(l, _)| after < l) {
                lowest = Some((after, done));
            }
        }
        if let (Some((before, _)), Some((low, earlier))) = (seen(&op.step), lowest) {
            if before > low {
                stale.push((op, earlier));
            }
        }
    }
    match stale.first() {
        None => String::new(),
        Some((op, earlier)) => format!(
            "; {} operations saw a stock above what an operation that had already ended saw; the first: {} began after {} had ended",
            stale.len(),
            op.what,
            earlier.what
        ),
    }
}
