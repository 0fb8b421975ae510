//! The buy workflow (docs/ARCHITECTURE.md, "Orders and the buy"), run by the order leader:
//! record `pending(key)` → decrement the catalog once per key → settle the order.
//! Every step is idempotent for the key, so any step may be repeated after a crash or a
//! timeout, by the client's retry or by the recovery task.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quire_common::api::{Decrement, DecrementResult, Order, OrderState, PlaceOrder, Receipt};
use quire_common::client::{call, decode, CallError, ATTEMPT_TIMEOUT};
use quire_common::{headers, ApiError, Deadline};
use quire_raft::Replica;
use tracing::Instrument;

use crate::machine::{Command, ORDER_COLUMNS};

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
        let applied = self.replica.write(serde_json::to_value(command).unwrap_or_default(), deadline).await?;
        serde_json::from_value(applied.response)
            .map_err(|e| ApiError::internal(format!("unexpected order answer: {e}")))
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
        let created_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let place = Command::Place { key: req.key.clone(), item_id: req.item_id, quantity: req.quantity, created_ms };
        let order = self.propose(place, deadline).await?;
        if order.item_id != req.item_id || order.quantity != req.quantity {
            return Err(ApiError::bad_request(
                "invalid_key",
                "this Idempotency-Key was already used for a different buy",
            ));
        }
        let order = match order.state {
            OrderState::Pending => self.settle(&order, deadline).await?,
            _ => order,
        };
        outcome(order)
    }

    /// Decrements the catalog for `order` (same key, so at most once) and records the result.
    pub async fn settle(&self, order: &Order, deadline: Deadline) -> Result<Order, ApiError> {
        let result = self.decrement(order, deadline).await?;
        self.propose(Command::Settle { key: order.key.clone(), result }, deadline).await
    }

    /// Asks the catalog leader (straight, when known; else through a catalog balancer) to
    /// decrement, retrying with the same key until the deadline whenever the outcome is
    /// unknown or the catalog is between leaders. The key makes every repeat a no-op, so
    /// a failed attempt at a leader that is no more is retried through a balancer at once.
    async fn decrement(&self, order: &Order, deadline: Deadline) -> Result<DecrementResult, ApiError> {
        let body = Decrement { key: order.key.clone(), quantity: order.quantity };
        loop {
            let leader = self.catalog_leader.lock().unwrap_or_else(PoisonError::into_inner).clone();
            let target = match &leader {
                Some(leader) => leader,
                None => &self.catalog[self.next_catalog.fetch_add(1, Ordering::Relaxed) % self.catalog.len()],
            };
            let request = self
                .replica
                .client
                .post(format!("{target}/books/{}/decrement", order.item_id))
                .header(headers::TOKEN, &*self.token)
                .header(headers::IDEMPOTENCY_KEY, &order.key)
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
                tracing::debug!(key = %order.key, %error, "the catalog leader did not decrement; through a balancer now");
                *self.catalog_leader.lock().unwrap_or_else(PoisonError::into_inner) = None;
                continue;
            }
            if deadline.remaining() < Duration::from_millis(60) {
                tracing::warn!(key = %order.key, %error, "catalog decrement unfinished at the deadline; recovery will finish it");
                return Err(ApiError::deadline_exceeded(
                    "the purchase did not finish in time; it will complete or fail on its own, retry with the same Idempotency-Key to learn which",
                ));
            }
            tracing::debug!(key = %order.key, %error, "retrying catalog decrement");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Pending orders placed before `older_than_ms` (ms since the epoch).
    pub async fn stale_pending(&self, older_than_ms: u64) -> anyhow::Result<Vec<Order>> {
        self.replica
            .reads
            .query(move |c| {
                let mut stmt = c.prepare_cached(&format!(
                    "SELECT {ORDER_COLUMNS} FROM orders WHERE state = 'pending' AND created_ms < ?1 ORDER BY order_id LIMIT 100"
                ))?;
                let rows = stmt.query_map([older_than_ms as i64], crate::machine::order_from_row)?;
                rows.collect()
            })
            .await
    }
}

/// What a settled (or repeated) order means to the client.
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
        (OrderState::Pending, _) => {
            Err(ApiError::deadline_exceeded("the purchase is still in progress; retry with the same Idempotency-Key"))
        }
    }
}

/// On the leader, finishes every order left pending longer than `stale_after` (its buyer
/// gave up or its leader died mid-workflow) by repeating the decrement with its key.
pub fn spawn_recovery(shop: Shop, stale_after: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            if !shop.replica.is_leader() {
                continue;
            }
            let cutoff = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
                .saturating_sub(stale_after.as_millis() as u64);
            let pending = match shop.stale_pending(cutoff).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list pending orders");
                    continue;
                }
            };
            for order in pending {
                match shop.settle(&order, Deadline::after(Duration::from_secs(5))).await {
                    Ok(done) => {
                        tracing::info!(order = done.order_id, key = %done.key, state = ?done.state, "recovered pending order")
                    }
                    Err(e) => tracing::warn!(order = order.order_id, error = %e, "pending order not recovered yet"),
                }
            }
        }
    });
}

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
        assert_eq!(outcome(order(OrderState::Pending, None)).unwrap_err().code, "deadline_exceeded");
    }
}
