//! The initial catalog: the course store's seven books, or any CSV file
//! (`id,title,topic,price,stock`), loaded through Raft by whichever replica leads first.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quire_common::api::{price_to_cents, MAX_PRICE_CENTS, MAX_STOCK, MAX_TOPIC_LEN};
use quire_common::Deadline;
use quire_raft::Replica;

use crate::machine::{Command, NewBook};

/// Books per `Load` log entry: large enough to load 100 000 books in seconds, small enough
/// (about 50 KB) that replication carries several per heartbeat interval.
const BATCH: usize = 500;

pub fn builtin() -> Vec<NewBook> {
    let ds = "distributed systems";
    let gs = "graduate school";
    [
        (1, "How to get a good grade in 677 in 20 minutes a day", ds, 2_999),
        (2, "RPCs for Dummies", ds, 1_999),
        (3, "Xen and the Art of Surviving Graduate School", gs, 2_499),
        (4, "Cooking for the Impatient Graduate Student", gs, 1_599),
        (5, "How to finish Project 3 on time", ds, 3_499),
        (6, "Why theory classes are so hard.", gs, 1_299),
        (7, "Spring in the Pioneer Valley", gs, 999),
    ]
    .into_iter()
    .map(|(id, title, topic, price_cents)| NewBook {
        id,
        title: title.into(),
        topic: topic.into(),
        price_cents,
        stock: 100,
    })
    .collect()
}

#[derive(Debug, serde::Deserialize)]
struct Row {
    id: String,
    title: String,
    topic: String,
    price: String,
    stock: String,
}

/// Reads and validates a catalog CSV; the error names the first bad line.
pub fn from_csv(path: &Path) -> anyhow::Result<Vec<NewBook>> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| anyhow::anyhow!("cannot read the catalog {}: {e}", path.display()))?;
    let mut books = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, row) in reader.deserialize::<Row>().enumerate() {
        let line = i + 2;
        let row = row.map_err(|e| anyhow::anyhow!("{}: line {line}: {e}", path.display()))?;
        let bad = |what: &str| anyhow::anyhow!("{}: line {line}: {what}", path.display());
        let id: u64 = row
            .id
            .parse()
            .ok()
            .filter(|id| *id > 0 && *id <= i64::MAX as u64)
            .ok_or_else(|| bad("id must be a positive integer"))?;
        let price_cents = price_to_cents(&row.price)
            .filter(|p| *p <= MAX_PRICE_CENTS)
            .ok_or_else(|| bad(&format!("price must look like 12.50 and be at most {}", MAX_PRICE_CENTS / 100)))?;
        let stock: i64 = row
            .stock
            .parse()
            .ok()
            .filter(|s| (0..=MAX_STOCK).contains(s))
            .ok_or_else(|| bad(&format!("stock must be an integer from 0 to {MAX_STOCK}")))?;
        if row.title.is_empty() || row.topic.is_empty() || row.topic.len() > MAX_TOPIC_LEN {
            return Err(bad("title and topic must be non-empty (topic at most 128 bytes)"));
        }
        if !seen.insert(id) {
            return Err(bad("duplicate id"));
        }
        books.push(NewBook { id, title: row.title, topic: row.topic, price_cents, stock });
    }
    Ok(books)
}

/// Runs on every replica: whenever this one leads a catalog that is not yet seeded, it
/// proposes the seed in batches. Loads ignore ids already present, so a leader change in the
/// middle of seeding only repeats harmless work.
pub fn spawn_seeder(replica: Arc<Replica>, books: Arc<Vec<NewBook>>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !replica.is_leader() {
                continue;
            }
            match seeded(&replica).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "cannot tell whether the catalog is seeded yet");
                    continue;
                }
            }
            match load(&replica, &books).await {
                Ok(()) => {
                    tracing::info!(books = books.len(), "catalog seeded");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "seeding interrupted; will retry"),
            }
        }
    });
}

async fn seeded(replica: &Replica) -> anyhow::Result<bool> {
    replica.read_barrier(Deadline::after(Duration::from_secs(5))).await?;
    seeded_here(replica).await
}

/// Whether this replica has applied the end of the seed (no read barrier).
async fn seeded_here(replica: &Replica) -> anyhow::Result<bool> {
    replica
        .reads
        .query(|c| c.query_row("SELECT count(*) FROM catalog_meta WHERE name = 'seeded'", [], |r| r.get::<_, i64>(0)))
        .await
        .map(|n| n > 0)
}

/// Sets `flag` once this replica has applied the whole seed: until then it is not ready
/// (balancers keep reads away from a half-loaded catalog).
pub fn spawn_seeded_watch(replica: Arc<Replica>, flag: Arc<std::sync::atomic::AtomicBool>) {
    tokio::spawn(async move {
        loop {
            if seeded_here(&replica).await.unwrap_or(false) {
                flag.store(true, std::sync::atomic::Ordering::Release);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

async fn load(replica: &Replica, books: &[NewBook]) -> anyhow::Result<()> {
    let batches: Vec<&[NewBook]> = if books.is_empty() { vec![&[]] } else { books.chunks(BATCH).collect() };
    let count = batches.len();
    for (i, batch) in batches.into_iter().enumerate() {
        let command = Command::Load { books: batch.to_vec(), last: i + 1 == count };
        replica.write(&command, Deadline::after(Duration::from_secs(30))).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn csv_is_validated() {
        let mut good = tempfile::NamedTempFile::new().unwrap();
        writeln!(good, "id,title,topic,price,stock\n1,A Book,x,12.50,3\n2,\"Comma, Inc\",y,1,0").unwrap();
        let books = from_csv(good.path()).unwrap();
        assert_eq!(books[0], NewBook { id: 1, title: "A Book".into(), topic: "x".into(), price_cents: 1250, stock: 3 });
        assert_eq!(books[1].title, "Comma, Inc");

        for bad in [
            "0,t,x,1,1",
            "1,t,x,-1,1",
            "1,t,x,1,-5",
            "1,,x,1,1",
            "1,t,x,1,1\n1,u,x,1,1",
            "1,t,x,1,9223372036854775000",
            "1,t,x,1,1000000000001",
            "1,t,x,1000001,1",
        ] {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            writeln!(f, "id,title,topic,price,stock\n{bad}").unwrap();
            assert!(from_csv(f.path()).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn builtin_has_the_seven_books_in_two_topics() {
        let books = builtin();
        assert_eq!(books.len(), 7);
        assert_eq!(books.iter().filter(|b| b.topic == "distributed systems").count(), 3);
        assert_eq!(books[1].title, "RPCs for Dummies");
    }
}
