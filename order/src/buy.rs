//! The buy workflow (docs/ARCHITECTURE.md, "Orders and the buy"), run by the order leader:
//! decrement the catalog once per key → record the order with the catalog's answer. The
//! catalog's ledger of sales is the buy's only record until the order is written, so a
//! reconciler gives every sale left without an order (its leader died, or its client gave
//! up, in between) the order it should have. Both steps are idempotent for the key, so
//! either may be repeated by the client's retry or by the reconciler.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quire_common::api::{Decrement, DecrementResult, Order, OrderState, PlaceOrder, Receipt, SalesPage};
use quire_common::client::{call, decode, CallError, ATTEMPT_TIMEOUT};
use quire_common::{headers, ApiError, Deadline};
use quire_raft::Replica;
use tracing::Instrument;

use crate::machine::Command;

#[derive(Clone)]
pub struct Shop {
    pub replica: Arc<Replica>,
    /// Catalog balancers, tried in turn.
    pub catalog: Arc<Vec<String>>,
    pub token: Arc<str>,
    next_catalog: Arc<AtomicUsize>,
    /// The catalog leader, as named by the balancer that passed the last decrement on (a
    /// write's balancer does nothing but find the leader): decrements go straight there
    /// until an attempt there fails, and then through a balancer again.
    catalog_leader: Arc<Mutex<Option<String>>>,
}

impl Shop {
    pub fn new(replica: Arc<Replica>, catalog: Vec<String>, token: Arc<str>) -> Self {
        Shop {
            replica,
            catalog: Arc::new(catalog),
            token,
            next_catalog: Arc::new(AtomicUsize::new(0)),
            catalog_leader: Arc::default(),
        }
    }

    async fn propose(&self, command: Command, deadline: Deadline) -> Result<Order, ApiError> {
        Ok(self.replica.write(&command, deadline).await?.answer.into())
    }

    /// Passes a buy to this group's leader, once: the leader runs the workflow. Safe to
    /// repeat (the key), so a refused connection becomes `unavailable` and a silent leader
    /// an unknown outcome.
    pub async fn forward(&self, req: &PlaceOrder, deadline: Deadline) -> Result<Receipt, ApiError> {
        let Some((_, leader)) = self.replica.leader() else {
            return Err(ApiError::unavailable("the order group has no leader right now"));
        };
        let request = self
            .replica
            .client
            .post(format!("{leader}/orders"))
            .header(headers::TOKEN, &*self.token)
            .header(headers::IDEMPOTENCY_KEY, &req.key)
            .header(headers::DEADLINE, deadline.header_value())
            .header(headers::FORWARDED, "1")
            .timeout(deadline.remaining().max(Duration::from_millis(1)))
            .json(req);
        match call::<Receipt>(request).instrument(tracing::info_span!("order.forward")).await {
            Ok(receipt) => Ok(receipt),
            Err(CallError::Api(e)) => Err(e),
            Err(CallError::Unreachable(e)) => {
                Err(ApiError::unavailable(format!("the order leader is unreachable: {e}")))
            }
            Err(CallError::Unknown(e)) => {
                tracing::debug!(error = %e, key = %req.key, "forwarded buy unconfirmed");
                Err(ApiError::deadline_exceeded(
                    "the order leader did not confirm the buy in time; its outcome is unknown",
                ))
            }
        }
    }

    /// Runs the whole workflow for one buy and returns what the client is told.
    pub async fn buy(&self, req: PlaceOrder, deadline: Deadline) -> Result<Receipt, ApiError> {
        let result = self.decrement(&req.key, req.item_id, req.quantity, deadline).await?;
        // The catalog has answered for the key, so whatever stops the record, the client
        // must not be told the buy did not happen: a retry with the key (or the reconciler)
        // records the answer.
        let order = self.record(req.key, result, deadline).await.map_err(|e| {
            tracing::debug!(error = %e, "the catalog answered but the order is not recorded yet");
            ApiError::deadline_exceeded(
                "the purchase is not recorded yet; retry with the same Idempotency-Key to learn its outcome (a retry never buys twice)",
            )
        })?;
        if order.item_id != req.item_id || order.quantity != req.quantity {
            return Err(ApiError::bad_request(
                "invalid_key",
                "this Idempotency-Key was already used for a different buy",
            ));
        }
        outcome(order)
    }

    /// Records the catalog's answer for `key` as its order (or returns the order the key
    /// already has).
    pub async fn record(&self, key: String, result: DecrementResult, deadline: Deadline) -> Result<Order, ApiError> {
        let created_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.propose(Command::Record { key, created_ms, result }, deadline).await
    }

    /// Asks the catalog leader (straight, when known; else through a catalog balancer) to
    /// decrement, retrying with the same key until the deadline whenever the outcome is
    /// unknown or the catalog is between leaders. The key makes every repeat a no-op, so
    /// a failed attempt at a leader that is no more is retried through a balancer at once.
    async fn decrement(
        &self,
        key: &str,
        item_id: u64,
        quantity: u32,
        deadline: Deadline,
    ) -> Result<DecrementResult, ApiError> {
        let body = Decrement { key: key.to_string(), quantity };
        loop {
            let leader = self.known_catalog_leader();
            let target = leader.as_deref().unwrap_or_else(|| self.next_catalog_balancer());
            let request = self
                .replica
                .client
                .post(format!("{target}/books/{item_id}/decrement"))
                .header(headers::TOKEN, &*self.token)
                .header(headers::IDEMPOTENCY_KEY, key)
                .header(headers::DEADLINE, deadline.header_value())
                .timeout(deadline.remaining().clamp(Duration::from_millis(1), ATTEMPT_TIMEOUT))
                .json(&body);
            let span =
                tracing::info_span!("order.decrement", hop = if leader.is_some() { "leader" } else { "balancer" });
            let (answer, served_by) = async {
                let response = request.send().await.map_err(CallError::from_reqwest)?;
                let served_by = response.headers().get(headers::SERVED_BY).and_then(|v| v.to_str().ok());
                let served_by = served_by.map(String::from);
                Ok((decode::<DecrementResult>(response).await, served_by))
            }
            .instrument(span)
            .await
            .unwrap_or_else(|e| (Err(e), None));
            let error = match answer {
                Ok(result) => {
                    if leader.is_none() {
                        *self.catalog_leader.lock().unwrap_or_else(PoisonError::into_inner) = served_by;
                    }
                    return Ok(result);
                }
                Err(CallError::Api(e))
                    if !matches!(e.code, "unavailable" | "not_leader" | "deadline_exceeded" | "dropped") =>
                {
                    return Err(e)
                }
                Err(e) => e,
            };
            if leader.is_some() {
                tracing::debug!(%key, %error, "the catalog leader did not decrement; through a balancer now");
                self.forget_catalog_leader();
                continue;
            }
            if deadline.remaining() < Duration::from_millis(60) {
                tracing::warn!(%key, %error, "catalog decrement unfinished at the deadline");
                return Err(ApiError::deadline_exceeded(
                    "the purchase did not finish in time; retry with the same Idempotency-Key to learn its outcome (a retry never buys twice)",
                ));
            }
            tracing::debug!(%key, %error, "retrying catalog decrement");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many sales the catalog has made, and up to `limit` of them after `seq` (a
    /// linearizable read at the catalog leader when known, else through a catalog balancer).
    async fn sales(&self, after: u64, limit: u32) -> Result<SalesPage, CallError> {
        let leader = self.known_catalog_leader();
        let target = leader.as_deref().unwrap_or_else(|| self.next_catalog_balancer());
        let request = self
            .replica
            .client
            .get(format!("{target}/internal/sales?after={after}&limit={limit}"))
            .header(headers::TOKEN, &*self.token)
            .timeout(ATTEMPT_TIMEOUT);
        let answer = call::<SalesPage>(request).await;
        if answer.is_err() && leader.is_some() {
            // Perhaps no longer the leader: through a balancer next time.
            self.forget_catalog_leader();
        }
        answer
    }

    /// The catalog leader, if a balancer has named it since the last failed attempt there.
    fn known_catalog_leader(&self) -> Option<String> {
        self.catalog_leader.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The next catalog balancer, in turn.
    fn next_catalog_balancer(&self) -> &str {
        &self.catalog[self.next_catalog.fetch_add(1, Ordering::Relaxed) % self.catalog.len()]
    }

    fn forget_catalog_leader(&self) {
        *self.catalog_leader.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// How many of the sales in `(after, upto]` have an order in this replica's state.
    async fn count_recorded(&self, after: u64, upto: u64) -> anyhow::Result<u64> {
        self.replica
            .reads
            .query(move |c| {
                c.prepare_cached("SELECT count(*) FROM orders WHERE sale_seq > ?1 AND sale_seq <= ?2")?
                    .query_row([after as i64, upto as i64], |r| r.get::<_, i64>(0).map(|n| n as u64))
            })
            .await
    }

    /// The sales in `(after, upto]` that have an order in this replica's state.
    async fn recorded_sales(&self, after: u64, upto: u64) -> anyhow::Result<HashSet<u64>> {
        self.replica
            .reads
            .query(move |c| {
                c.prepare_cached("SELECT sale_seq FROM orders WHERE sale_seq > ?1 AND sale_seq <= ?2")?
                    .query_map([after as i64, upto as i64], |r| r.get::<_, i64>(0).map(|s| s as u64))?
                    .collect()
            })
            .await
    }
}

/// What a recorded order means to the client.
pub fn outcome(order: Order) -> Result<Receipt, ApiError> {
    match (order.state, order.reason.as_deref()) {
        (OrderState::Confirmed, _) => Ok(Receipt {
            order_id: order.order_id,
            item_id: order.item_id,
            quantity: order.quantity,
            price: order.price.unwrap_or(0.0),
            stock_left: order.stock_left.unwrap_or(0),
        }),
        (OrderState::Failed, Some("not_found")) => {
            Err(ApiError::not_found(format!("no book with id {}", order.item_id)))
        }
        (OrderState::Failed, _) => {
            Err(ApiError::out_of_stock(format!("book {} has fewer than {} copies left", order.item_id, order.quantity)))
        }
    }
}

/// On the leader, every 500 ms: gives every catalog sale without an order the order it
/// should have, once `stale_after` has passed since it was first seen without one (a buy
/// in flight records its own sooner; if both record, the key makes the second a no-op).
///
/// Sales are numbered 1, 2, ... in the catalog's ledger and every order names its sale, so
/// a pass asks the catalog only how many sales there are and counts, in this replica's
/// state, the orders of the sales made since the last pass it checked: the sales of one
/// pass ago, which buys in flight have had a whole period to record. Only when some of
/// those lack an order does it read them from the catalog, a page at a time.
pub fn spawn_reconciler(shop: Shop, stale_after: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut pass = Reconciler { done: 0, seen: 0, orphans: HashMap::new() };
        loop {
            tick.tick().await;
            if !shop.replica.is_leader() {
                continue;
            }
            if let Err(e) = pass.run(&shop, stale_after).await {
                tracing::warn!(error = %e, "cannot reconcile sales with orders yet");
            }
        }
    });
}

struct Reconciler {
    /// Every sale up to this one has its order (orders are never deleted).
    done: u64,
    /// How many sales the catalog had at the last pass.
    seen: u64,
    /// Sales seen without an order, and when first seen so.
    orphans: HashMap<u64, Instant>,
}

impl Reconciler {
    async fn run(&mut self, shop: &Shop, stale_after: Duration) -> anyhow::Result<()> {
        let catalog_error = |e: CallError| anyhow::anyhow!("reading the catalog's sales: {e}");
        let upto = self.seen;
        self.seen = shop.sales(0, 0).await.map_err(catalog_error)?.last_seq;
        if upto <= self.done {
            return Ok(());
        }
        if shop.count_recorded(self.done, upto).await? == upto - self.done {
            self.done = upto;
            self.orphans.clear();
            return Ok(());
        }
        // Some sale up to `upto` has no order: find which, a page at a time.
        let mut cursor = self.done;
        let mut contiguous = true;
        while cursor < upto {
            let page = shop.sales(cursor, MAX_PAGE).await.map_err(catalog_error)?;
            let Some(last) = page.sales.last().map(|s| s.result.seq) else { break };
            let recorded = shop.recorded_sales(cursor, last).await?;
            for sale in page.sales.into_iter().filter(|s| s.result.seq <= upto) {
                let seq = sale.result.seq;
                let mut has_order = recorded.contains(&seq);
                if !has_order && self.orphans.entry(seq).or_insert_with(Instant::now).elapsed() >= stale_after {
                    let deadline = Deadline::after(Duration::from_secs(5));
                    match shop.record(sale.key.clone(), sale.result, deadline).await {
                        Ok(order) => {
                            tracing::info!(order = order.order_id, key = %order.key, state = ?order.state, "recorded a sale left without its order");
                            has_order = true;
                        }
                        Err(e) => tracing::warn!(key = %sale.key, error = %e, "sale without an order not recorded yet"),
                    }
                }
                if has_order {
                    self.orphans.remove(&seq);
                }
                contiguous &= has_order;
                if contiguous {
                    self.done = seq;
                }
            }
            cursor = last;
        }
        Ok(())
    }
}

/// Sales read per request when some lack an order.
const MAX_PAGE: u32 = 256;

#[cfg(test)]
mod tests {
    use super::*;
    use quire_common::api::cents_to_price;

    fn order(state: OrderState, reason: Option<&str>) -> Order {
        Order {
            order_id: 9,
            key: "k".into(),
            item_id: 3,
            quantity: 2,
            state,
            price: Some(cents_to_price(2499)),
            stock_left: Some(5),
            reason: reason.map(String::from),
            created_ms: 0,
        }
    }

    #[test]
    fn settled_orders_map_to_documented_answers() {
        let r = outcome(order(OrderState::Confirmed, None)).unwrap();
        assert_eq!((r.order_id, r.price, r.stock_left), (9, 24.99, 5));
        assert_eq!(outcome(order(OrderState::Failed, Some("out_of_stock"))).unwrap_err().code, "out_of_stock");
        assert_eq!(outcome(order(OrderState::Failed, Some("not_found"))).unwrap_err().status, 404);
    }
}
