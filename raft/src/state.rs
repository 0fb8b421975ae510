//! The replicated state, in SQLite (`state.db`), and its snapshots.
//!
//! Applying a batch of committed entries and recording `last_applied` (and the last
//! membership) is one transaction, so after a crash the file is at some applied prefix of
//! the log and openraft replays the rest. A snapshot is the whole file, made with
//! `VACUUM INTO` from a read transaction (so it is consistent with the `last_applied` it
//! holds); it is sent and received a chunk at a time, straight from and to its file;
//! installing one copies its tables into ours inside one transaction, which keeps every
//! open read connection valid. Snapshot files and large applies are worked on blocking
//! threads; a small apply runs inline (see `sqlite::inline`). The current snapshot is
//! `snapshot.db`, fsynced and renamed into place; its metadata is read from the file
//! itself. Since `state.db` is not fsynced on every apply, a replica whose state is found behind its snapshot at startup
//! (power loss after the log was purged) restores the snapshot first.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::payload::{self, Outcome, Outcomes, Write};
use crate::sqlite::{self, locked, open};
use crate::{Machine, NodeId, TypeConfig};

type StorageResult<T> = Result<T, StorageError<NodeId>>;
type Membership = StoredMembership<NodeId, openraft::BasicNode>;

const META_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS quire_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);";

fn sm_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

fn snap_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, &e).into()
}

fn other(message: &str) -> std::io::Error {
    std::io::Error::other(message.to_string())
}

fn read_applied(conn: &Connection) -> rusqlite::Result<(Option<LogId<NodeId>>, Membership)> {
    let get = |name: &str| -> rusqlite::Result<Option<String>> {
        conn.query_row("SELECT value FROM quire_meta WHERE name = ?1", [name], |r| r.get(0)).optional()
    };
    let applied = get("last_applied")?.and_then(|t| serde_json::from_str(&t).ok());
    let membership = get("membership")?.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    Ok((applied, membership))
}

/// Read connections kept open between queries; more may exist while a burst lasts.
const MAX_IDLE_READERS: usize = 8;
/// SQLite page cache of each read connection.
const READ_CACHE_KIB: usize = 512;

/// Pool of read-only connections to `state.db`, for the service's queries.
pub struct Reads {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Reads {
    fn new(path: PathBuf) -> Self {
        Reads { path, idle: Mutex::new(Vec::new()) }
    }

    /// Runs `f` on a pooled read connection on a blocking thread.
    pub async fn query<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let pooled = self.idle.lock().map_err(|_| other("read pool poisoned"))?.pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => {
                let conn = open(&self.path, false)?;
                conn.pragma_update(None, "query_only", "ON")?;
                // Each connection has its own page cache; the OS page cache is shared. Small
                // per-connection caches keep a replica's memory flat under many readers.
                conn.pragma_update(None, "cache_size", -(READ_CACHE_KIB as i64))?;
                conn
            }
        };
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = f(&conn);
            (conn, result)
        })
        .await?;
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
        }
        Ok(result?)
    }

    /// Applied index and a SHA-256 over every row of the service's tables, read in one
    /// transaction so the two agree. Replicas at the same index must have equal digests.
    pub async fn digest(&self, tables: &'static [&'static str]) -> anyhow::Result<(u64, String)> {
        self.query(move |conn| {
            conn.execute_batch("BEGIN")?;
            let result = digest_in(conn, tables);
            conn.execute_batch("COMMIT")?;
            result
        })
        .await
    }
}

fn digest_in(conn: &Connection, tables: &[&str]) -> rusqlite::Result<(u64, String)> {
    let (applied, _) = read_applied(conn)?;
    let mut hasher = Sha256::new();
    for table in tables {
        hasher.update(table.as_bytes());
        let mut stmt = conn.prepare(&format!("SELECT * FROM {table} ORDER BY 1"))?;
        let columns = stmt.column_count();
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            for i in 0..columns {
                let value: rusqlite::types::Value = row.get(i)?;
                hasher.update(format!("{value:?}\u{1f}").as_bytes());
            }
            hasher.update(b"\x1e");
        }
    }
    let digest = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((applied.map_or(0, |l| l.index), digest))
}

/// The state machine handed to openraft.
#[derive(Clone)]
pub struct StateStore {
    dir: PathBuf,
    conn: Arc<Mutex<Connection>>,
    machine: Arc<dyn Apply>,
    /// Serialises building and installing snapshots (both touch the snapshot files).
    snapshot_lock: Arc<tokio::sync::Mutex<()>>,
    pub reads: Arc<Reads>,
    /// The last log index of the newest snapshot a leader sent and this replica installed
    /// (0: none), as opposed to one it built itself.
    pub installed: Arc<std::sync::atomic::AtomicU64>,
}

impl StateStore {
    pub fn open(dir: &Path, machine: Arc<dyn Apply>) -> anyhow::Result<Self> {
        let path = dir.join("state.db");
        let mut conn = open(&path, false)?;
        conn.execute_batch(META_SCHEMA)?;
        conn.execute_batch(machine.schema())?;
        // state.db is not fsynced on every apply; the snapshot file is. After a power loss
        // the state may be older than the snapshot the log was purged behind: restore it.
        let snapshot = dir.join("snapshot.db");
        if snapshot.exists() {
            let (state_applied, _) = read_applied(&conn)?;
            let snapshot_applied = snapshot_meta(&snapshot)?.last_log_id;
            if snapshot_applied > state_applied {
                tracing::warn!(
                    ?state_applied,
                    ?snapshot_applied,
                    "state is behind its snapshot; restoring the snapshot"
                );
                copy_into(&mut conn, &snapshot, machine.as_ref())?;
            }
        }
        Ok(StateStore {
            dir: dir.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
            machine,
            snapshot_lock: Arc::new(tokio::sync::Mutex::new(())),
            reads: Arc::new(Reads::new(path)),
            installed: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// Runs `f` on the state connection, right here when `inline` (see
    /// `sqlite::inline`), else on a blocking thread.
    async fn with_conn<T: Send + 'static>(
        &self,
        inline: bool,
        f: impl FnOnce(&mut Connection, &dyn Apply) -> StorageResult<T> + Send + 'static,
    ) -> StorageResult<T> {
        let machine = self.machine.clone();
        locked(&self.conn, inline, move |conn| f(conn, machine.as_ref())).await.map_err(sm_err)?
    }

    fn snapshot_db(&self) -> PathBuf {
        self.dir.join("snapshot.db")
    }

    /// The current snapshot, open for reading from its start: sent to a follower a chunk at
    /// a time, never read whole into memory (a snapshot built meanwhile replaces the file's
    /// name, not the file this handle reads).
    async fn open_snapshot(&self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let path = self.snapshot_db();
        let meta = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || path.exists().then(|| snapshot_meta(&path)).transpose())
                .await
                .map_err(snap_err)?
                .map_err(snap_err)?
        };
        let Some(meta) = meta else { return Ok(None) };
        let file = tokio::fs::File::open(&path).await.map_err(snap_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(file) }))
    }
}

/// Makes `file` the current snapshot of `dir`: fsynced, then renamed over the old one
/// (atomic), then the directory fsynced. The snapshot's metadata is read from the file
/// itself, so data and metadata can never disagree. Blocking: call it on a blocking thread.
fn keep_snapshot(dir: &Path, file: &Path) -> std::io::Result<SnapshotMeta<NodeId, openraft::BasicNode>> {
    let current = dir.join("snapshot.db");
    std::fs::File::open(file)?.sync_all()?;
    std::fs::rename(file, &current)?;
    std::fs::File::open(dir)?.sync_all()?;
    snapshot_meta(&current).map_err(|e| std::io::Error::other(e.to_string()))
}

/// A snapshot file's metadata, from its own `quire_meta` (the state it holds).
fn snapshot_meta(path: &Path) -> rusqlite::Result<SnapshotMeta<NodeId, openraft::BasicNode>> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let (last_log_id, last_membership) = read_applied(&conn)?;
    let built: Option<String> =
        conn.query_row("SELECT value FROM quire_meta WHERE name = 'snapshot_id'", [], |r| r.get(0)).optional()?;
    let applied = last_log_id.map_or_else(|| "empty".to_string(), |l| l.to_string());
    let snapshot_id = match built {
        Some(built) => format!("{applied}-{built}"),
        None => applied,
    };
    Ok(SnapshotMeta { last_log_id, last_membership, snapshot_id })
}

/// Replaces the service's tables and `quire_meta` with those of the snapshot file at
/// `path`, in one transaction (open read connections stay valid; FTS follows by triggers).
fn copy_into(conn: &mut Connection, path: &Path, machine: &dyn Apply) -> rusqlite::Result<()> {
    conn.execute("ATTACH DATABASE ?1 AS snap", [path.to_string_lossy()])?;
    let copied = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction()?;
        for table in machine.tables().iter().chain(["quire_meta"].iter()) {
            tx.execute(&format!("DELETE FROM main.{table}"), [])?;
            tx.execute(&format!("INSERT INTO main.{table} SELECT * FROM snap.{table}"), [])?;
        }
        tx.commit()
    })();
    conn.execute("DETACH DATABASE snap", [])?;
    copied
}

fn apply_batch(
    conn: &mut Connection,
    machine: &dyn Apply,
    entries: Vec<Entry<TypeConfig>>,
) -> StorageResult<Vec<Outcomes>> {
    let tx = conn.transaction().map_err(sm_err)?;
    let mut responses = Vec::with_capacity(entries.len());
    let mut last = None;
    let mut membership = None;
    for entry in entries {
        last = Some(entry.log_id);
        let outcomes = match entry.payload {
            EntryPayload::Blank => Vec::new(),
            // Group commit (see [`crate::proposer`]): each write as if it were alone.
            EntryPayload::Normal(proposal) => {
                proposal.writes.iter().map(|w| apply_write(&tx, machine, entry.log_id, w)).collect::<Result<_, _>>()?
            }
            EntryPayload::Membership(m) => {
                membership = Some(StoredMembership::new(Some(entry.log_id), m));
                Vec::new()
            }
        };
        responses.push(Outcomes(outcomes));
    }
    let mut put =
        tx.prepare_cached("INSERT OR REPLACE INTO quire_meta (name, value) VALUES (?1, ?2)").map_err(sm_err)?;
    if let Some(last) = last {
        put.execute(params!["last_applied", serde_json::to_string(&last).map_err(sm_err)?]).map_err(sm_err)?;
    }
    if let Some(m) = membership {
        put.execute(params!["membership", serde_json::to_string(&m).map_err(sm_err)?]).map_err(sm_err)?;
    }
    drop(put);
    tx.commit().map_err(sm_err)?;
    Ok(responses)
}

/// Applies one write of the entry at `log_id`, unless it is bound to another term.
fn apply_write(
    tx: &rusqlite::Transaction<'_>,
    machine: &dyn Apply,
    log_id: LogId<NodeId>,
    write: &Write,
) -> StorageResult<Outcome> {
    match write.in_term {
        // A write bound to the term it was proposed in, appended in a later one.
        Some(term) if term != log_id.leader_id.term => Ok(Outcome::StaleTerm { term }),
        _ => apply_one(tx, machine, log_id.index, &write.command),
    }
}

/// Applies one command inside a savepoint. A failure the command itself causes (a
/// constraint it breaks, a value out of range, bytes that do not decode) fails the same
/// way on every replica: it is rolled back and answered [`Outcome::Rejected`], so the
/// write is applied as a no-op everywhere and the group goes on. Any other failure (I/O, a
/// full disk, corruption) is a storage error, which stops this replica alone.
fn apply_one(
    tx: &rusqlite::Transaction<'_>,
    machine: &dyn Apply,
    index: u64,
    command: &[u8],
) -> StorageResult<Outcome> {
    // Prepared once per connection and kept: these run for every entry.
    let run = |sql: &str| tx.prepare_cached(sql).and_then(|mut s| s.execute([])).map(|_| ()).map_err(sm_err);
    run("SAVEPOINT command")?;
    let rejected = match machine.apply_encoded(tx, index, command) {
        Ok(Ok(answer)) => {
            run("RELEASE command")?;
            return Ok(Outcome::Applied(answer));
        }
        Ok(Err(reason)) => reason,
        Err(e) if caused_by_the_command(&e) => e.to_string(),
        Err(e) => return Err(sm_err(e)),
    };
    tracing::warn!(index, reason = %rejected, "command rejected by the state machine; applied as a no-op");
    tx.execute_batch("ROLLBACK TO command; RELEASE command").map_err(sm_err)?;
    Ok(Outcome::Rejected(rejected))
}

/// A [`Machine`] as the state store drives it: its commands and answers as bytes.
pub trait Apply: Send + Sync + 'static {
    fn schema(&self) -> &'static str;
    fn tables(&self) -> &'static [&'static str];
    /// The machine's command type: the only one a replica proposes.
    fn command_type(&self) -> std::any::TypeId;
    /// Decodes `command`, applies it and encodes its answer. `Ok(Err(reason))`: the bytes
    /// do not decode (or the answer does not encode), the same on every replica.
    fn apply_encoded(
        &self,
        tx: &rusqlite::Transaction<'_>,
        index: u64,
        command: &[u8],
    ) -> rusqlite::Result<Result<Vec<u8>, String>>;
}

impl<M: Machine> Apply for M {
    fn schema(&self) -> &'static str {
        Machine::schema(self)
    }

    fn tables(&self) -> &'static [&'static str] {
        Machine::tables(self)
    }

    fn command_type(&self) -> std::any::TypeId {
        std::any::TypeId::of::<M::Command>()
    }

    fn apply_encoded(
        &self,
        tx: &rusqlite::Transaction<'_>,
        index: u64,
        command: &[u8],
    ) -> rusqlite::Result<Result<Vec<u8>, String>> {
        let command = match payload::decode::<M::Command>(command) {
            Ok(command) => command,
            Err(e) => return Ok(Err(format!("undecodable command: {e}"))),
        };
        let answer = self.apply(tx, index, command)?;
        Ok(payload::encode(&answer).map_err(|e| format!("unencodable answer: {e}")))
    }
}

/// Whether `e` follows from the command's data, and so happens on every replica alike.
fn caused_by_the_command(e: &rusqlite::Error) -> bool {
    use rusqlite::{Error, ErrorCode};
    match e {
        Error::SqliteFailure(f, _) => {
            matches!(f.code, ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig)
        }
        Error::IntegralValueOutOfRange(..)
        | Error::FromSqlConversionFailure(..)
        | Error::InvalidColumnType(..)
        | Error::ToSqlConversionFailure(..)
        | Error::QueryReturnedNoRows
        | Error::Utf8Error(..) => true,
        _ => false,
    }
}

impl RaftStateMachine<TypeConfig> for StateStore {
    type SnapshotBuilder = StateStore;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, Membership)> {
        self.with_conn(false, |conn, _| read_applied(conn).map_err(sm_err)).await
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Outcomes>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        use tracing::Instrument;
        let entries: Vec<_> = entries.into_iter().collect();
        let span = tracing::info_span!("raft.apply");
        // An entry may carry many commands (group commit): count those, and their bytes.
        let (commands, bytes) = entries.iter().fold((0, 0), |(n, b), e| match &e.payload {
            EntryPayload::Normal(p) => {
                (n + p.writes.len(), b + p.writes.iter().map(|w| w.command.len()).sum::<usize>())
            }
            _ => (n + 1, b),
        });
        let inline = sqlite::inline(commands, bytes);
        self.with_conn(inline, move |conn, machine| apply_batch(conn, machine, entries)).instrument(span).await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    /// A snapshot from the leader is written to `incoming.db` a chunk at a time.
    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<tokio::fs::File>> {
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.dir.join("incoming.db"))
            .await
            .map_err(snap_err)?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> StorageResult<()> {
        let _guard = self.snapshot_lock.lock().await;
        snapshot.sync_all().await.map_err(snap_err)?;
        drop(snapshot);
        let (dir, expected) = (self.dir.clone(), meta.last_log_id);
        let kept = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let incoming = dir.join("incoming.db");
            let received = snapshot_meta(&incoming).map_err(|e| std::io::Error::other(e.to_string()))?;
            if received.last_log_id != expected {
                return Err(other("received snapshot does not hold the state its metadata names"));
            }
            // Keep the snapshot durably first: if the copy into state.db is lost to a
            // crash, startup restores it from this file.
            keep_snapshot(&dir, &incoming)
        })
        .await
        .map_err(snap_err)?
        .map_err(snap_err)?;
        let path = self.snapshot_db();
        self.with_conn(false, move |conn, machine| copy_into(conn, &path, machine).map_err(sm_err)).await?;
        if let Some(index) = kept.last_log_id.map(|l| l.index) {
            self.installed.fetch_max(index, std::sync::atomic::Ordering::AcqRel);
        }
        tracing::info!(last_log_id = ?kept.last_log_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let _guard = self.snapshot_lock.lock().await;
        self.open_snapshot().await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let _guard = self.snapshot_lock.lock().await;
        let building = self.dir.join("building.db");
        let target = building.to_string_lossy().to_string();
        // VACUUM INTO reads one consistent state of the file, `quire_meta` included.
        let (source, stale) = (self.dir.join("state.db"), building.clone());
        tokio::task::spawn_blocking(move || -> rusqlite::Result<_> {
            let _ = std::fs::remove_file(&stale);
            let conn = open(&source, false)?;
            conn.execute("VACUUM INTO ?1", [&target])?;
            // Two snapshots of one log id (built before and after a restart) are still two
            // files: each has an id of its own.
            let built = Connection::open(&target)?;
            let id = format!("{:016x}", rand::random::<u64>());
            built.execute("INSERT OR REPLACE INTO quire_meta (name, value) VALUES ('snapshot_id', ?1)", [id])
        })
        .await
        .map_err(snap_err)?
        .map_err(snap_err)?;
        let dir = self.dir.clone();
        let meta = tokio::task::spawn_blocking(move || keep_snapshot(&dir, &building))
            .await
            .map_err(snap_err)?
            .map_err(snap_err)?;
        tracing::info!(last_log_id = ?meta.last_log_id, "built snapshot");
        let file = tokio::fs::File::open(self.snapshot_db()).await.map_err(snap_err)?;
        Ok(Snapshot { meta, snapshot: Box::new(file) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use openraft::CommittedLeaderId;

    struct Notes;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Note(String);

    impl crate::Command for Note {
        type Answer = i64;
    }

    impl Machine for Notes {
        type Command = Note;
        fn schema(&self) -> &'static str {
            "CREATE TABLE IF NOT EXISTS notes (text TEXT NOT NULL CHECK (length(text) <= 8));"
        }
        fn tables(&self) -> &'static [&'static str] {
            &["notes"]
        }
        fn apply(&self, tx: &rusqlite::Transaction<'_>, _index: u64, note: Note) -> rusqlite::Result<i64> {
            tx.execute("INSERT INTO notes (text) VALUES (?1)", [note.0])?;
            Ok(tx.last_insert_rowid())
        }
    }

    /// One entry's writes each get their own outcome; the ones that cannot apply (bytes
    /// that are no command of the machine's, a broken constraint, another term) change
    /// nothing and do not stop the others.
    #[test]
    fn each_write_of_an_entry_is_applied_or_refused_alone() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(META_SCHEMA).unwrap();
        conn.execute_batch(Machine::schema(&Notes)).unwrap();
        let note = |text: &str, in_term| Write { in_term, command: payload::encode(&Note(text.into())).unwrap() };
        let writes = vec![
            note("first", None),
            Write { in_term: None, command: vec![0xff, 0xff, 0xff] },
            note("far too long", None),
            note("stale", Some(2)),
            note("second", Some(3)),
        ];
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), 7),
            payload: EntryPayload::Normal(payload::Proposal { writes }),
        };
        let outcomes = apply_batch(&mut conn, &Notes, vec![entry]).unwrap();
        let Outcomes(outcomes) = &outcomes[0];
        assert_eq!(outcomes.len(), 5);
        assert_eq!(outcomes[0], Outcome::Applied(payload::encode(&1i64).unwrap()));
        assert!(matches!(&outcomes[1], Outcome::Rejected(r) if r.contains("undecodable")), "{:?}", outcomes[1]);
        assert!(matches!(&outcomes[2], Outcome::Rejected(r) if r.contains("CHECK")), "{:?}", outcomes[2]);
        assert_eq!(outcomes[3], Outcome::StaleTerm { term: 2 });
        assert_eq!(outcomes[4], Outcome::Applied(payload::encode(&2i64).unwrap()));
        let notes: Vec<String> = conn
            .prepare("SELECT text FROM notes")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(notes, ["first", "second"]);
        let (applied, _) = read_applied(&conn).unwrap();
        assert_eq!(applied.map(|l| l.index), Some(7));
    }
}
