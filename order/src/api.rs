//! The order service's API, reached through the order balancer by frontends.
//!
//! A buy may land on any replica: it does the buy's app work (under `cloud-sim`, the part
//! that scales with read replicas) and passes the buy to its leader, which runs the workflow.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use rusqlite::OptionalExtension;

use quire_common::api::{parse_id, Order, PlaceOrder, Receipt, MAX_QUANTITY};
use quire_common::http::{guarded, Json, Token};
use quire_common::{headers, ApiError, Deadline};

use crate::buy::Shop;
use crate::machine::{order_from_row, ORDER_COLUMNS};

const DEFAULT_BUDGET: Duration = Duration::from_secs(5);

pub fn router(shop: Shop, token: Token) -> Router {
    let reads = Router::new().route("/orders/:id", get(order)).with_state(shop.clone());
    let writes = Router::new().route("/orders", post(place)).route("/admin/orders", get(all_orders)).with_state(shop);
    reads.merge(guarded(writes, token))
}

async fn place(
    State(shop): State<Shop>,
    headers: HeaderMap,
    Json(req): Json<PlaceOrder>,
) -> Result<axum::Json<Receipt>, ApiError> {
    if req.item_id == 0 || req.item_id > i64::MAX as u64 {
        return Err(ApiError::bad_request("invalid_id", "the item id must be a positive integer"));
    }
    if req.quantity == 0 || req.quantity > MAX_QUANTITY {
        return Err(ApiError::bad_request("invalid_quantity", format!("quantity must be 1 to {MAX_QUANTITY}")));
    }
    if req.key.is_empty() || req.key.len() > 128 {
        return Err(ApiError::bad_request("invalid_key", "the key must be 1 to 128 bytes"));
    }
    let deadline = Deadline::from_headers_or(&headers, DEFAULT_BUDGET);
    let forwarded = headers.contains_key(headers::FORWARDED);
    // Any replica does a buy's app work; only the leader can write it.
    if !forwarded {
        shop.replica.workers.app_work(deadline).await?;
    }
    if shop.replica.is_leader() {
        shop.buy(req, deadline).await.map(axum::Json)
    } else if forwarded {
        Err(ApiError::not_leader(shop.replica.leader().map(|(_, url)| url)))
    } else {
        shop.forward(&req, deadline).await.map(axum::Json)
    }
}

async fn order(
    State(shop): State<Shop>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<Order>, ApiError> {
    let id = parse_id(&id)?;
    let deadline = Deadline::from_headers_or(&headers, DEFAULT_BUDGET);
    shop.replica.workers.read_work(deadline).await?;
    shop.replica.read_barrier(deadline).await?;
    let order = shop
        .replica
        .reads
        .query(move |c| {
            c.prepare_cached(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = ?1"))?
                .query_row([id as i64], order_from_row)
                .optional()
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "order query failed");
            ApiError::internal("the order service could not read its database")
        })?;
    order.map(axum::Json).ok_or_else(|| ApiError::not_found(format!("no order with id {id}")))
}

/// Every order, for invariant checks and operators (token required).
async fn all_orders(State(shop): State<Shop>) -> Result<axum::Json<Vec<Order>>, ApiError> {
    shop.replica.read_barrier(Deadline::after(DEFAULT_BUDGET)).await?;
    shop.replica
        .reads
        .query(|c| {
            let mut stmt = c.prepare(&format!("SELECT {ORDER_COLUMNS} FROM orders ORDER BY order_id"))?;
            let rows = stmt.query_map([], order_from_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await
        .map(axum::Json)
        .map_err(|e| ApiError::internal(format!("cannot list orders: {e}")))
}
