//! What the log store and the state store share: opening a SQLite file, and running work
//! on a connection either right where it is asked for or on a blocking thread.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

pub(crate) fn open(path: &Path, durable: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })?;
    // Small page caches: appends and point reads need few pages, and the OS caches the file.
    conn.pragma_update(None, "cache_size", -512)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Room for every statement of the hot paths (appends, applies, the machines' commands).
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Entries (commands, for an apply) in the largest batch whose SQLite work runs inline.
const INLINE_ENTRIES: usize = 64;
/// Encoded bytes in the largest batch whose SQLite work runs inline: a command of many
/// rows (a load of the catalog's books) is work of many commands.
const INLINE_BYTES: usize = 16 * 1024;

/// Whether an append, apply or log read of `entries` entries (commands) and `bytes` encoded
/// bytes runs on the calling task's thread. Work this small takes a fraction of a
/// millisecond, an fsync included, on this project's machines, and handing it to a
/// blocking thread and back cost the servers more CPU in thread wake-ups than the work
/// itself (bench/README.md, "SQLite work without a thread hop"). Larger batches (a
/// follower catching up, a load, a snapshot) still go to a blocking thread, so that they
/// never hold a runtime worker for long. (A WAL checkpoint that falls due during an inline
/// commit runs inline too: a few milliseconds, once per thousand pages written.)
pub(crate) fn inline(entries: usize, bytes: usize) -> bool {
    entries <= INLINE_ENTRIES && bytes <= INLINE_BYTES
}

/// Runs `f` with `conn` locked: right here when `inline`, else on a blocking thread.
pub(crate) async fn locked<C, T>(
    conn: &Arc<Mutex<C>>,
    inline: bool,
    f: impl FnOnce(&mut C) -> T + Send + 'static,
) -> std::io::Result<T>
where
    C: Send + 'static,
    T: Send + 'static,
{
    let poisoned = || std::io::Error::other("connection lock poisoned");
    if inline {
        let mut conn = conn.lock().map_err(|_| poisoned())?;
        // A panic fails the call, as it does on a blocking thread (a `JoinError` there),
        // rather than unwinding through openraft's tasks.
        return std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut conn)))
            .map_err(|_| std::io::Error::other("the SQLite work panicked"));
    }
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = conn.lock().map_err(|_| poisoned())?;
        Ok(f(&mut conn))
    })
    .await
    .map_err(std::io::Error::other)?
}
