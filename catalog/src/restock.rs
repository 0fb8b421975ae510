//! Restocking: on the leader, a book that has sat at zero stock for `delay` gets `amount`
//! new copies, through Raft like any other write.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use quire_common::Deadline;

use crate::api::{restock_item, Catalog};

#[derive(Debug, Clone, Copy)]
pub struct RestockPolicy {
    pub amount: u32,
    pub delay: Duration,
}

pub fn spawn(catalog: Catalog, policy: RestockPolicy) {
    if policy.amount == 0 {
        return;
    }
    tokio::spawn(async move {
        // When each sold-out book was first seen at zero by this leader.
        let mut empty_since: HashMap<u64, Instant> = HashMap::new();
        let mut tick =
            tokio::time::interval(Duration::from_millis(250).min(policy.delay.max(Duration::from_millis(10))));
        loop {
            tick.tick().await;
            if !catalog.replica.is_leader() {
                empty_since.clear();
                continue;
            }
            let sold_out = catalog
                .replica
                .reads
                .query(|c| {
                    let mut stmt = c.prepare_cached("SELECT id FROM books WHERE stock = 0")?;
                    let ids = stmt.query_map([], |r| r.get::<_, i64>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok(ids.into_iter().map(|id| id as u64).collect::<Vec<_>>())
                })
                .await;
            let Ok(sold_out) = sold_out else { continue };
            let now = Instant::now();
            empty_since.retain(|id, _| sold_out.contains(id));
            for id in sold_out {
                let since = *empty_since.entry(id).or_insert(now);
                if now.duration_since(since) < policy.delay {
                    continue;
                }
                match restock_item(&catalog, id, policy.amount, Deadline::after(Duration::from_secs(5))).await {
                    Ok(stock) => {
                        tracing::info!(item = id, amount = policy.amount, stock, "restocked");
                        empty_since.remove(&id);
                    }
                    Err(e) => tracing::warn!(item = id, error = %e, "restock failed; will retry"),
                }
            }
        }
    });
}
