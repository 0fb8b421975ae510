//! The Raft log and vote, durable in SQLite (`raft.db`).
//!
//! Every write commits a transaction with `synchronous = FULL` in WAL mode, so the vote and
//! appended entries are fsynced before openraft is told they are stored. Entries are kept as
//! postcard blobs (see [`crate::payload`]) keyed by log index, in the format the `meta`
//! table names; the last purged log id, the vote and the committed log id live there too,
//! as JSON text.
//!
//! The committed log id is the exception: openraft saves it before every apply, waiting in
//! its core, and may find it older (or missing) after a restart, since it only tells how
//! far the log may be applied without asking the leader again. So it is kept in memory and
//! written with the next append or purge, never synced on its own. It is never ahead of the
//! entries durable beside it: they were appended, and synced, before it was committed.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogId, RaftLogReader, StorageError, StorageIOError, Vote};
use rusqlite::{params, Connection, OptionalExtension};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::payload;
use crate::sqlite::{self, locked, open};
use crate::{NodeId, TypeConfig};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// How entries are encoded in the `log` table: 2 is postcard (1, JSON text, was never
/// written down). A log in another format is refused at open rather than misread.
const LOG_FORMAT: &str = "2";

/// What `raft.db` records of the node it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Identity {
    /// The Raft group: a data directory never serves another.
    pub group: String,
    pub node_id: NodeId,
    /// Older incarnations of this node's seat whose place it has yet to take.
    #[serde(default)]
    pub replaces: Vec<NodeId>,
    /// The voters to found a group with, when that was the decision: founded again at the
    /// next start if the log is still empty then (the process stopped in between).
    #[serde(default)]
    pub found: Option<std::collections::BTreeMap<NodeId, String>>,
}

/// Log store handle given to openraft. Writes go through one connection; each log reader
/// (one per replication stream) opens its own, which WAL lets run beside the writer.
#[derive(Clone)]
pub struct LogStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    /// The committed log id openraft saved last, until an append or purge writes it.
    committed: Arc<Mutex<Option<String>>>,
}

fn io_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}

impl LogStore {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let conn = open(path, true)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )?;
        let format: Option<String> =
            conn.query_row("SELECT value FROM meta WHERE name = 'format'", [], |r| r.get(0)).optional()?;
        let entries: i64 = conn.query_row("SELECT count(*) FROM log", [], |r| r.get(0))?;
        match format.as_deref() {
            Some(LOG_FORMAT) => {}
            None if entries == 0 => {
                conn.execute("INSERT INTO meta (name, value) VALUES ('format', ?1)", [LOG_FORMAT])?;
            }
            other => anyhow::bail!(
                "{} holds a log written by another version of quire (format {}, this one reads {LOG_FORMAT}); \
                 the two cannot replicate to each other either: start the whole store afresh, with empty \
                 data directories",
                path.display(),
                other.unwrap_or("1")
            ),
        }
        Ok(LogStore { path: path.to_path_buf(), conn: Arc::new(Mutex::new(conn)), committed: Arc::default() })
    }

    /// Who this log belongs to, once decided (see [`crate::bootstrap`]).
    pub fn identity(&self) -> anyhow::Result<Option<Identity>> {
        let conn = self.conn.lock().map_err(|_| anyhow::anyhow!("log store lock poisoned"))?;
        Ok(read_meta(&conn, "identity")?)
    }

    /// Whether the data directory `dir` holds no log yet, nor anything a node promised:
    /// read without creating or changing anything.
    pub fn is_blank_dir(dir: &Path) -> anyhow::Result<bool> {
        let path = dir.join("raft.db");
        if !path.exists() {
            return Ok(true);
        }
        let conn = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let has_meta: bool = conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'meta'", [], |r| r.get::<_, i64>(0))
            .map(|n| n > 0)?;
        if !has_meta {
            return Ok(true);
        }
        blank(&conn)
    }

    /// Whether the log holds anything a node promised: a vote or an entry.
    pub fn is_blank(&self) -> anyhow::Result<bool> {
        let conn = self.conn.lock().map_err(|_| anyhow::anyhow!("log store lock poisoned"))?;
        blank(&conn)
    }

    /// Records who this log belongs to, durably.
    pub fn set_identity(&self, identity: &Identity) -> anyhow::Result<()> {
        let text = serde_json::to_string(identity)?;
        let conn = self.conn.lock().map_err(|_| anyhow::anyhow!("log store lock poisoned"))?;
        conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('identity', ?1)", [text])?;
        Ok(())
    }

    /// Runs `f` on the writer connection, right here when `inline` (see
    /// `sqlite::inline`), else on a blocking thread.
    async fn with_conn<T: Send + 'static>(
        &self,
        inline: bool,
        f: impl FnOnce(&mut Connection) -> StorageResult<T> + Send + 'static,
    ) -> StorageResult<T> {
        locked(&self.conn, inline, f).await.map_err(io_err)?
    }

    /// The committed log id saved since the last write, to be written with the next one.
    fn take_committed(&self) -> StorageResult<Option<String>> {
        let mut committed =
            self.committed.lock().map_err(|_| io_err(std::io::Error::other("log store lock poisoned")))?;
        Ok(committed.take())
    }

    async fn get_meta<T: DeserializeOwned + Send + 'static>(&self, name: &'static str) -> StorageResult<Option<T>> {
        self.with_conn(false, move |conn| read_meta(conn, name)).await
    }

    async fn put_meta<T: Serialize>(&self, name: &'static str, value: &T) -> StorageResult<()> {
        let text = serde_json::to_string(value).map_err(io_err)?;
        self.with_conn(false, move |conn| {
            conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)", params![name, text])
                .map_err(io_err)?;
            Ok(())
        })
        .await
    }
}

/// Writes the committed log id [`LogStore::take_committed`] took, if any, in `tx`.
fn write_committed(tx: &rusqlite::Transaction<'_>, committed: Option<String>) -> StorageResult<()> {
    if let Some(text) = committed {
        tx.prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES ('committed', ?1)")
            .and_then(|mut stmt| stmt.execute([text]))
            .map_err(io_err)?;
    }
    Ok(())
}

/// No vote, no entry, nothing purged.
fn blank(conn: &Connection) -> anyhow::Result<bool> {
    let vote: Option<Vote<NodeId>> = read_meta(conn, "vote")?;
    let entries: i64 = conn.query_row("SELECT count(*) FROM log", [], |r| r.get(0))?;
    let purged: Option<LogId<NodeId>> = read_meta(conn, "last_purged")?;
    Ok(vote.is_none() && entries == 0 && purged.is_none())
}

fn read_meta<T: DeserializeOwned>(conn: &Connection, name: &str) -> StorageResult<Option<T>> {
    let text: Option<String> =
        conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| r.get(0)).optional().map_err(read_err)?;
    text.map(|t| serde_json::from_str(&t).map_err(read_err)).transpose()
}

/// How many entries `start..=end` spans.
fn span(start: i64, end: i64) -> usize {
    usize::try_from(end.saturating_sub(start).saturating_add(1)).unwrap_or(0)
}

fn bounds(range: &impl RangeBounds<u64>) -> (i64, i64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s as i64,
        Bound::Excluded(&s) => s as i64 + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e as i64,
        Bound::Excluded(&e) => e as i64 - 1,
        Bound::Unbounded => i64::MAX,
    };
    (start, end)
}

fn read_entries(conn: &Connection, start: i64, end: i64) -> StorageResult<Vec<Entry<TypeConfig>>> {
    let mut stmt =
        conn.prepare_cached("SELECT entry FROM log WHERE idx >= ?1 AND idx <= ?2 ORDER BY idx").map_err(read_err)?;
    let rows = stmt.query_map(params![start, end], |r| r.get::<_, Vec<u8>>(0)).map_err(read_err)?;
    let mut entries = Vec::new();
    for row in rows {
        entries.push(payload::decode(&row.map_err(read_err)?).map_err(read_err)?);
    }
    Ok(entries)
}

/// A read-only view of the log, one per replication stream.
pub struct LogReader {
    conn: Arc<Mutex<Connection>>,
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let (start, end) = bounds(&range);
        let inline = sqlite::inline(span(start, end), 0);
        locked(&self.conn, inline, move |conn| read_entries(conn, start, end)).await.map_err(read_err)?
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let (start, end) = bounds(&range);
        // openraft's core reads the entries it is about to apply through here.
        self.with_conn(sqlite::inline(span(start, end), 0), move |conn| read_entries(conn, start, end)).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        self.with_conn(false, |conn| {
            let last_purged: Option<LogId<NodeId>> = read_meta(conn, "last_purged")?;
            let last_entry: Option<Vec<u8>> = conn
                .query_row("SELECT entry FROM log ORDER BY idx DESC LIMIT 1", [], |r| r.get(0))
                .optional()
                .map_err(read_err)?;
            let last = match last_entry {
                Some(bytes) => Some(*payload::decode::<Entry<TypeConfig>>(&bytes).map_err(read_err)?.get_log_id()),
                None => last_purged,
            };
            Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        // A reader of its own lets replication read while appends fsync; fall back to sharing
        // the writer if the file cannot be opened again (it will then fail loudly on use).
        match open(&self.path, false) {
            Ok(conn) => LogReader { conn: Arc::new(Mutex::new(conn)) },
            Err(e) => {
                tracing::error!(error = %e, "cannot open a log reader; sharing the writer connection");
                LogReader { conn: self.conn.clone() }
            }
        }
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta("vote", vote).await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.get_meta("vote").await
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        let text = serde_json::to_string(&committed).map_err(io_err)?;
        *self.committed.lock().map_err(|_| io_err(std::io::Error::other("log store lock poisoned")))? = Some(text);
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        let pending =
            self.committed.lock().map_err(|_| read_err(std::io::Error::other("log store lock poisoned")))?.clone();
        match pending {
            Some(text) => serde_json::from_str::<Option<LogId<NodeId>>>(&text).map_err(read_err),
            None => Ok(self.get_meta::<Option<LogId<NodeId>>>("committed").await?.flatten()),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Timed from here until openraft learns the entries are durable (`crate::timings`).
        let timing = tracing::info_span!("raft.append");
        let rows = entries
            .into_iter()
            .map(|e| Ok((e.get_log_id().index as i64, payload::encode(&e).map_err(io_err)?)))
            .collect::<StorageResult<Vec<_>>>()?;
        let committed = self.take_committed()?;
        let inline = sqlite::inline(rows.len(), rows.iter().map(|(_, entry)| entry.len()).sum());
        let result = self
            .with_conn(inline, move |conn| {
                let tx = conn.transaction().map_err(io_err)?;
                {
                    let mut stmt =
                        tx.prepare_cached("INSERT OR REPLACE INTO log (idx, entry) VALUES (?1, ?2)").map_err(io_err)?;
                    for (idx, entry) in &rows {
                        stmt.execute(params![idx, entry]).map_err(io_err)?;
                    }
                }
                write_committed(&tx, committed)?;
                tx.commit().map_err(io_err)
            })
            .await;
        // The commit above is durable (synchronous = FULL): only now may openraft rely on it.
        callback.log_io_completed(result.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
        drop(timing);
        result
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let from = log_id.index as i64;
        self.with_conn(false, move |conn| {
            conn.execute("DELETE FROM log WHERE idx >= ?1", [from]).map_err(io_err)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let text = serde_json::to_string(&log_id).map_err(io_err)?;
        let upto = log_id.index as i64;
        let committed = self.take_committed()?;
        self.with_conn(false, move |conn| {
            let tx = conn.transaction().map_err(io_err)?;
            tx.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('last_purged', ?1)", [&text])
                .map_err(io_err)?;
            write_committed(&tx, committed)?;
            tx.execute("DELETE FROM log WHERE idx <= ?1", [upto]).map_err(io_err)?;
            tx.commit().map_err(io_err)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A log whose entries another build wrote (no format recorded, or another one) is
    /// refused at open with a message that says so, instead of failing on its first read.
    #[test]
    fn a_log_of_another_format_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.db");
        drop(LogStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        let format: String = conn.query_row("SELECT value FROM meta WHERE name = 'format'", [], |r| r.get(0)).unwrap();
        assert_eq!(format, LOG_FORMAT, "a new log records its format");
        // A log of this format with entries opens again, and reads them.
        let entry = Entry::<TypeConfig> {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 1),
            payload: openraft::EntryPayload::Blank,
        };
        conn.execute("INSERT INTO log (idx, entry) VALUES (1, ?1)", [payload::encode(&entry).unwrap()]).unwrap();
        let reopened = LogStore::open(&path).unwrap();
        assert_eq!(read_entries(&reopened.conn.lock().unwrap(), 1, 1).unwrap(), vec![entry]);
        drop(reopened);
        // Written by a build that encoded entries otherwise: refused.
        conn.execute("UPDATE log SET entry = '{\"log_id\": 1}'", []).unwrap();
        assert_eq!(conn.execute("UPDATE meta SET value = '1' WHERE name = 'format'", []).unwrap(), 1);
        drop(conn);
        let err = LogStore::open(&path).err().unwrap().to_string();
        assert!(err.contains("another version of quire (format 1"), "{err}");
        // An old log never recorded its format: refused too.
        let conn = Connection::open(&path).unwrap();
        conn.execute("DELETE FROM meta WHERE name = 'format'", []).unwrap();
        drop(conn);
        assert!(LogStore::open(&path).is_err());
    }
}
