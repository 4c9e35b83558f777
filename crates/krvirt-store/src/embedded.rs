//! Embedded backend: one SQLite file (WAL, `synchronous=FULL`) plus an
//! in-process watch hub.
//!
//! All writes go through one writer thread that does group commit: it takes
//! every queued request, applies them in one SQLite transaction, commits once
//! (one fsync), publishes the resulting events to the watch hub in revision
//! order and then answers the callers. A write is acknowledged only after its
//! transaction is durable, so it survives `kill -9` and power loss (as far as
//! the disk honours fsync).
//!
//! Reads use a small pool of separate read connections on
//! `spawn_blocking` (WAL lets them run beside the writer).
//!
//! Every write gets its own revision and its own row in the `events` table;
//! the table keeps the last [`EmbeddedOptions::history_events`] events, so a
//! watch can resume across a restart. Lease expiry and revoke delete the
//! attached keys in one transaction, one revision per key.
//!
//! Leases live in the `leases` table (id, TTL); their deadlines are kept in
//! memory only, so after reopening a store every lease gets a fresh full TTL
//! counted from open time (etcd does the same on leader change).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{broadcast, oneshot};

use crate::{
    EventKind, KeyValue, LeaseId, Result, Revision, Store, StoreError, WatchEvent, WatchStream,
};

/// Largest lease TTL accepted, in seconds (etcd's `MaxLeaseTTL`).
pub const MAX_LEASE_TTL_SECS: i64 = 9_000_000_000;

const SCHEMA_VERSION: i64 = 1;
/// Events fetched per history page while a watch replays.
const WATCH_PAGE: usize = 512;
/// Idle read connections kept for reuse.
const MAX_IDLE_READERS: usize = 8;

/// Tuning knobs for [`EmbeddedStore::open_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// Number of most recent events kept for watch resume (at least 1).
    pub history_events: usize,
    /// Live events buffered per watcher before a slow watcher is dropped
    /// with [`StoreError::WatchLagged`] (at least 1).
    pub watch_buffer: usize,
    /// Most write requests applied in one transaction (at least 1).
    pub max_batch: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            history_events: 100_000,
            watch_buffer: 4096,
            max_batch: 4096,
        }
    }
}

/// Counters of the writer thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub commits: u64,
    /// Requests answered (successful or not) by those transactions.
    pub requests: u64,
}

/// The embedded [`Store`]. Dropping it (or [`EmbeddedStore::close`]) stops
/// the writer thread after it has answered every request queued so far;
/// open watch streams then end with [`StoreError::Closed`].
pub struct EmbeddedStore {
    path: PathBuf,
    sender: mpsc::Sender<Request>,
    writer: Mutex<Option<JoinHandle<()>>>,
    hub: Mutex<Option<broadcast::Sender<Arc<WatchEvent>>>>,
    reads: Arc<ReadPool>,
    shared: Arc<Shared>,
    lock_file: Mutex<Option<File>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// State shared by the async handle and the writer thread.
struct Shared {
    /// Revision of the last committed write.
    committed: AtomicI64,
    /// In-memory lease deadlines; mirrors the `leases` table.
    leases: Mutex<HashMap<LeaseId, LeaseEntry>>,
    commits: AtomicU64,
    requests: AtomicU64,
}

impl Shared {
    fn leases(&self) -> MutexGuard<'_, HashMap<LeaseId, LeaseEntry>> {
        // A panic while holding this lock cannot leave the map half-updated
        // in a way that matters (each operation is a single insert/remove).
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, Copy)]
struct LeaseEntry {
    ttl: i64,
    deadline: Instant,
}

fn deadline_after(now: Instant, ttl: i64) -> Instant {
    let secs = u64::try_from(ttl).unwrap_or(0);
    now.checked_add(Duration::from_secs(secs))
        // Beyond what Instant can represent: effectively never.
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(format!("sqlite: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EmbeddedStore {
    /// Open (creating if needed) the store at `path` with default options.
    pub fn open(path: &Path) -> Result<EmbeddedStore> {
        Self::open_with(path, EmbeddedOptions::default())
    }

    /// Open (creating if needed) the store at `path`.
    ///
    /// The file is locked (`{path}.lock`) for as long as the store is open:
    /// a second open, from this or another process, fails.
    pub fn open_with(path: &Path, options: EmbeddedOptions) -> Result<EmbeddedStore> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Backend(format!("creating {}: {e}", parent.display())))?;
        }
        let lock_path = {
            let mut s = path.as_os_str().to_owned();
            s.push(".lock");
            PathBuf::from(s)
        };
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", lock_path.display())))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Backend(format!(
                    "store {} is already open (locked through {})",
                    path.display(),
                    lock_path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Backend(format!(
                    "locking {}: {e}",
                    lock_path.display()
                )));
            }
        }

        let conn = Connection::open(path).map_err(db_err)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(db_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "sqlite refused WAL mode for {} (got {mode})",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db_err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(db_err)?;
        conn.set_prepared_statement_cache_capacity(64);
        conn.execute_batch(SCHEMA).map_err(db_err)?;

        let meta = Meta::load(&conn).map_err(db_err)?;
        if meta.schema != SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "store {} has schema version {}, this build supports {SCHEMA_VERSION}",
                path.display(),
                meta.schema
            )));
        }

        let now = Instant::now();
        let mut leases = HashMap::new();
        for (id, ttl) in load_leases(&conn).map_err(db_err)? {
            leases.insert(
                id,
                LeaseEntry {
                    ttl,
                    deadline: deadline_after(now, ttl),
                },
            );
        }
        let shared = Arc::new(Shared {
            committed: AtomicI64::new(meta.revision),
            leases: Mutex::new(leases),
            commits: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        });

        let (hub, _) = broadcast::channel(options.watch_buffer.max(1));
        let reads = Arc::new(ReadPool {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        });
        // Fail early if a read connection cannot be opened.
        let probe = reads.open_conn()?;
        lock(&reads.idle).push(probe);

        let (sender, receiver) = mpsc::channel();
        let writer = Writer {
            conn,
            st: WriterState {
                rev: meta.revision,
                compact_rev: meta.compact_revision,
                next_lease: meta.next_lease,
                history: i64::try_from(options.history_events.max(1)).unwrap_or(i64::MAX),
                shared: Arc::clone(&shared),
            },
            hub: hub.clone(),
            max_batch: options.max_batch.max(1),
        };
        let handle = std::thread::Builder::new()
            .name("krvirt-store-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| StoreError::Backend(format!("spawning writer thread: {e}")))?;

        Ok(EmbeddedStore {
            path: path.to_path_buf(),
            sender,
            writer: Mutex::new(Some(handle)),
            hub: Mutex::new(Some(hub)),
            reads,
            shared,
            lock_file: Mutex::new(Some(lock_file)),
        })
    }

    /// Path of the SQLite file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits and requests handled by the writer thread so far (group
    /// commit shows as `requests > commits`).
    pub fn writer_stats(&self) -> WriterStats {
        WriterStats {
            commits: self.shared.commits.load(Ordering::Relaxed),
            requests: self.shared.requests.load(Ordering::Relaxed),
        }
    }

    /// Stop the writer thread (after it answered everything queued so far),
    /// close the database and release the file lock. Blocks until the writer
    /// has finished its current transaction. Idempotent; later calls on the
    /// store fail with [`StoreError::Closed`].
    pub fn close(&self) {
        self.reads.closed.store(true, Ordering::SeqCst);
        // Sending fails only if the writer is already gone.
        let _ = self.sender.send(Request::Shutdown);
        let handle = lock(&self.writer).take();
        if let Some(handle) = handle {
            // A writer that panicked has nothing left to clean up.
            let _ = handle.join();
        }
        lock(&self.hub).take();
        lock(&self.reads.idle).clear();
        lock(&self.lock_file).take();
    }

    fn check_open(&self) -> Result<()> {
        if self.reads.closed.load(Ordering::SeqCst) {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    async fn submit(&self, op: Op) -> Result<Reply> {
        self.check_open()?;
        let (tx, rx) = oneshot::channel();
        self.sender
            .send(Request::Op(op, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn submit_kv(&self, op: Op) -> Result<KeyValue> {
        match self.submit(op).await? {
            Reply::Kv(kv) => Ok(kv),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(reply: Reply) -> StoreError {
    StoreError::Backend(format!("internal: unexpected writer reply {reply:?}"))
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::InvalidArgument("key must not be empty".into()));
    }
    Ok(())
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.check_open()?;
        let key = key.to_owned();
        self.reads
            .run(move |conn| read_kv(conn, &key).map_err(db_err))
            .await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        self.check_open()?;
        let prefix = prefix.to_owned();
        self.reads.run(move |conn| list_prefix(conn, &prefix)).await
    }

    async fn create(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<KeyValue> {
        check_key(key)?;
        self.submit_kv(Op::Create {
            key: key.to_owned(),
            value,
            lease,
        })
        .await
    }

    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Revision,
        lease: Option<LeaseId>,
    ) -> Result<KeyValue> {
        check_key(key)?;
        self.submit_kv(Op::Update {
            key: key.to_owned(),
            value,
            expected,
            lease,
        })
        .await
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<KeyValue> {
        check_key(key)?;
        self.submit_kv(Op::Delete {
            key: key.to_owned(),
            expected,
        })
        .await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        self.check_open()?;
        if from < 0 {
            return Err(StoreError::InvalidArgument(format!(
                "watch revision must not be negative (got {from})"
            )));
        }
        // Subscribe BEFORE reading history: every event committed after the
        // history read is published after this point, so nothing falls into
        // a gap between replay and live.
        let rx = match lock(&self.hub).as_ref() {
            Some(hub) => hub.subscribe(),
            None => return Err(StoreError::Closed),
        };
        let mut cursor = WatchCursor {
            pool: Arc::clone(&self.reads),
            prefix: prefix.to_owned(),
            rx,
            next_rev: from,
            buf: VecDeque::new(),
            live: false,
            done: false,
        };
        if from == 0 {
            let now = self.reads.run(|conn| read_revision(conn)).await?;
            cursor.next_rev = now + 1;
            cursor.live = true;
        } else {
            // The first page also checks compaction, so a too-old `from`
            // fails here rather than as a stream item.
            cursor.fetch_page().await?;
        }
        Ok(Box::pin(futures::stream::unfold(
            cursor,
            |mut c| async move { c.next_item().await.map(|item| (item, c)) },
        )))
    }

    async fn revision(&self) -> Result<Revision> {
        self.check_open()?;
        Ok(self.shared.committed.load(Ordering::SeqCst))
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseId> {
        if !(1..=MAX_LEASE_TTL_SECS).contains(&ttl_secs) {
            return Err(StoreError::InvalidArgument(format!(
                "lease TTL must be between 1 and {MAX_LEASE_TTL_SECS} seconds (got {ttl_secs})"
            )));
        }
        match self.submit(Op::LeaseGrant { ttl: ttl_secs }).await? {
            Reply::Lease(id) => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> Result<i64> {
        self.check_open()?;
        let now = Instant::now();
        let mut leases = self.shared.leases();
        match leases.get_mut(&lease) {
            Some(entry) if entry.deadline > now => {
                entry.deadline = deadline_after(now, entry.ttl);
                Ok(entry.ttl)
            }
            // Expired but not yet reaped by the writer: it is gone either way.
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        match self.submit(Op::LeaseRevoke { id: lease }).await? {
            Reply::Unit => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        match self.submit(Op::Compact { revision }).await? {
            Reply::Unit => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

// ---------------------------------------------------------------------------
// Schema and row helpers

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (name, value) VALUES
    ('schema', 1), ('revision', 0), ('compact_revision', 1), ('next_lease', 1);
CREATE TABLE IF NOT EXISTS kv (
    key        BLOB PRIMARY KEY,
    value      BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev    INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    lease      INTEGER
);
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    rev             INTEGER PRIMARY KEY,
    kind            INTEGER NOT NULL,
    key             BLOB NOT NULL,
    value           BLOB NOT NULL,
    create_rev      INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    lease           INTEGER,
    prev_value      BLOB,
    prev_create_rev INTEGER,
    prev_mod_rev    INTEGER,
    prev_version    INTEGER,
    prev_lease      INTEGER
);
CREATE TABLE IF NOT EXISTS leases (
    id  INTEGER PRIMARY KEY,
    ttl INTEGER NOT NULL
);
";

const KIND_PUT: i64 = 0;
const KIND_DELETE: i64 = 1;

struct Meta {
    schema: i64,
    revision: Revision,
    compact_revision: Revision,
    next_lease: LeaseId,
}

impl Meta {
    fn load(conn: &Connection) -> rusqlite::Result<Meta> {
        let get = |name: &str| -> rusqlite::Result<i64> {
            conn.prepare_cached("SELECT value FROM meta WHERE name = ?1")?
                .query_row([name], |r| r.get(0))
        };
        Ok(Meta {
            schema: get("schema")?,
            revision: get("revision")?,
            compact_revision: get("compact_revision")?,
            next_lease: get("next_lease")?,
        })
    }
}

fn set_meta(conn: &Connection, name: &str, value: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE meta SET value = ?2 WHERE name = ?1")?
        .execute(params![name, value])?;
    Ok(())
}

fn load_leases(conn: &Connection) -> rusqlite::Result<Vec<(LeaseId, i64)>> {
    let mut stmt = conn.prepare_cached("SELECT id, ttl FROM leases")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

fn key_string(bytes: Vec<u8>) -> rusqlite::Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
    })
}

fn read_kv(conn: &Connection, key: &str) -> rusqlite::Result<Option<KeyValue>> {
    conn.prepare_cached("SELECT value, create_rev, mod_rev, version, lease FROM kv WHERE key = ?1")?
        .query_row([key.as_bytes()], |r| {
            Ok(KeyValue {
                key: key.to_owned(),
                value: r.get(0)?,
                create_revision: r.get(1)?,
                mod_revision: r.get(2)?,
                version: r.get(3)?,
                lease: r.get(4)?,
            })
        })
        .optional()
}

fn read_revision(conn: &Connection) -> Result<Revision> {
    conn.prepare_cached("SELECT value FROM meta WHERE name = 'revision'")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(db_err)
}

/// Smallest byte string greater than every string starting with `prefix`,
/// or `None` if there is none (empty prefix or all 0xff).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn list_prefix(conn: &mut Connection, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
    let tx = conn.transaction().map_err(db_err)?;
    let rev = read_revision(&tx)?;
    let start = prefix.as_bytes();
    let end = prefix_end(start);
    let mut out = Vec::new();
    {
        let mut stmt = match end {
            Some(_) => tx.prepare_cached(
                "SELECT key, value, create_rev, mod_rev, version, lease FROM kv
                 WHERE key >= ?1 AND key < ?2 ORDER BY key",
            ),
            None => tx.prepare_cached(
                "SELECT key, value, create_rev, mod_rev, version, lease FROM kv
                 WHERE key >= ?1 ORDER BY key",
            ),
        }
        .map_err(db_err)?;
        let mut rows = match &end {
            Some(end) => stmt.query(params![start, end]),
            None => stmt.query(params![start]),
        }
        .map_err(db_err)?;
        while let Some(r) = rows.next().map_err(db_err)? {
            out.push(KeyValue {
                key: key_string(r.get(0).map_err(db_err)?).map_err(db_err)?,
                value: r.get(1).map_err(db_err)?,
                create_revision: r.get(2).map_err(db_err)?,
                mod_revision: r.get(3).map_err(db_err)?,
                version: r.get(4).map_err(db_err)?,
                lease: r.get(5).map_err(db_err)?,
            });
        }
    }
    tx.commit().map_err(db_err)?;
    Ok((out, rev))
}

fn insert_event(conn: &Connection, ev: &WatchEvent) -> rusqlite::Result<()> {
    let kind = match ev.kind {
        EventKind::Put => KIND_PUT,
        EventKind::Delete => KIND_DELETE,
    };
    let prev = ev.prev.as_ref();
    conn.prepare_cached(
        "INSERT INTO events (rev, kind, key, value, create_rev, version, lease,
             prev_value, prev_create_rev, prev_mod_rev, prev_version, prev_lease)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        ev.kv.mod_revision,
        kind,
        ev.kv.key.as_bytes(),
        ev.kv.value,
        ev.kv.create_revision,
        ev.kv.version,
        ev.kv.lease,
        prev.map(|p| p.value.as_slice()),
        prev.map(|p| p.create_revision),
        prev.map(|p| p.mod_revision),
        prev.map(|p| p.version),
        prev.and_then(|p| p.lease),
    ])?;
    Ok(())
}

fn event_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WatchEvent> {
    let rev: i64 = r.get(0)?;
    let kind = match r.get::<_, i64>(1)? {
        KIND_PUT => EventKind::Put,
        KIND_DELETE => EventKind::Delete,
        other => {
            return Err(rusqlite::Error::IntegralValueOutOfRange(1, other));
        }
    };
    let key = key_string(r.get(2)?)?;
    let prev = match r.get::<_, Option<i64>>(9)? {
        Some(prev_mod) => Some(KeyValue {
            key: key.clone(),
            value: r.get::<_, Option<Vec<u8>>>(7)?.unwrap_or_default(),
            create_revision: r.get::<_, Option<i64>>(8)?.unwrap_or_default(),
            mod_revision: prev_mod,
            version: r.get::<_, Option<i64>>(10)?.unwrap_or_default(),
            lease: r.get(11)?,
        }),
        None => None,
    };
    Ok(WatchEvent {
        kind,
        kv: KeyValue {
            key,
            value: r.get(3)?,
            create_revision: r.get(4)?,
            mod_revision: rev,
            version: r.get(5)?,
            lease: r.get(6)?,
        },
        prev,
    })
}

// ---------------------------------------------------------------------------
// Read side

struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    closed: AtomicBool,
}

impl ReadPool {
    fn open_conn(&self) -> Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err)?;
        conn.pragma_update(None, "query_only", true)
            .map_err(db_err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(db_err)?;
        conn.set_prepared_statement_cache_capacity(16);
        Ok(conn)
    }

    fn with_conn<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        let pooled = lock(&self.idle).pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => self.open_conn()?,
        };
        let out = f(&mut conn);
        if !self.closed.load(Ordering::SeqCst) {
            let mut idle = lock(&self.idle);
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
        }
        out
    }

    async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || pool.with_conn(f))
            .await
            .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
    }
}

struct Page {
    events: Vec<WatchEvent>,
    /// Store revision at the time the page was read.
    snapshot: Revision,
}

fn read_events(conn: &mut Connection, prefix: &str, from: Revision, limit: usize) -> Result<Page> {
    let tx = conn.transaction().map_err(db_err)?;
    let meta = Meta::load(&tx).map_err(db_err)?;
    if from < meta.compact_revision {
        return Err(StoreError::Compacted {
            requested: from,
            oldest: meta.compact_revision,
        });
    }
    let start = prefix.as_bytes();
    let end = prefix_end(start);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut events = Vec::new();
    {
        const COLS: &str = "rev, kind, key, value, create_rev, version, lease,
             prev_value, prev_create_rev, prev_mod_rev, prev_version, prev_lease";
        let mut stmt = match end {
            Some(_) => tx.prepare_cached(&format!(
                "SELECT {COLS} FROM events WHERE rev >= ?1 AND key >= ?2 AND key < ?3
                 ORDER BY rev LIMIT ?4"
            )),
            None => tx.prepare_cached(&format!(
                "SELECT {COLS} FROM events WHERE rev >= ?1 AND key >= ?2
                 ORDER BY rev LIMIT ?3"
            )),
        }
        .map_err(db_err)?;
        let mut rows = match &end {
            Some(end) => stmt.query(params![from, start, end, limit]),
            None => stmt.query(params![from, start, limit]),
        }
        .map_err(db_err)?;
        while let Some(r) = rows.next().map_err(db_err)? {
            events.push(event_from_row(r).map_err(db_err)?);
        }
    }
    tx.commit().map_err(db_err)?;
    Ok(Page {
        events,
        snapshot: meta.revision,
    })
}

/// State of one watch stream: replays history page by page, then follows
/// the live hub.
struct WatchCursor {
    pool: Arc<ReadPool>,
    prefix: String,
    rx: broadcast::Receiver<Arc<WatchEvent>>,
    /// Smallest revision not yet delivered (or known not to match).
    next_rev: Revision,
    buf: VecDeque<WatchEvent>,
    live: bool,
    done: bool,
}

impl WatchCursor {
    /// Read the next page of history into `buf`; switch to live once the
    /// history is exhausted. The receiver must have been subscribed before
    /// this read.
    async fn fetch_page(&mut self) -> Result<()> {
        let prefix = self.prefix.clone();
        let from = self.next_rev;
        let page = self
            .pool
            .run(move |conn| read_events(conn, &prefix, from, WATCH_PAGE))
            .await?;
        let full = page.events.len() >= WATCH_PAGE;
        if let Some(last) = page.events.last() {
            self.next_rev = last.revision() + 1;
        }
        if !full {
            // Nothing else under the prefix up to the snapshot; everything
            // later arrives through `rx`.
            self.next_rev = self.next_rev.max(page.snapshot + 1);
            self.live = true;
        }
        self.buf.extend(page.events);
        Ok(())
    }

    async fn next_item(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(ev) = self.buf.pop_front() {
                return Some(Ok(ev));
            }
            if !self.live {
                // Re-subscribe before each page so a long replay cannot make
                // the live receiver lag: whatever the new receiver misses is
                // already committed and thus in the page about to be read.
                self.rx = self.rx.resubscribe();
                if let Err(e) = self.fetch_page().await {
                    self.done = true;
                    return Some(Err(e));
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(ev) => {
                    let rev = ev.revision();
                    if rev < self.next_rev {
                        continue; // already replayed from history
                    }
                    self.next_rev = rev + 1;
                    if ev.kv.key.starts_with(self.prefix.as_str()) {
                        return Some(Ok((*ev).clone()));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.done = true;
                    return Some(Err(StoreError::WatchLagged {
                        resume_from: self.next_rev,
                    }));
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.done = true;
                    return Some(Err(StoreError::Closed));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Write side

enum Request {
    Op(Op, oneshot::Sender<Result<Reply>>),
    Shutdown,
}

#[derive(Debug)]
enum Op {
    Create {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Update {
        key: String,
        value: Vec<u8>,
        expected: Revision,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
    LeaseGrant {
        ttl: i64,
    },
    LeaseRevoke {
        id: LeaseId,
    },
    Compact {
        revision: Revision,
    },
}

#[derive(Debug)]
enum Reply {
    Kv(KeyValue),
    Lease(LeaseId),
    Unit,
}

/// Why one operation inside a batch failed.
enum Fail {
    /// The request is refused; nothing was changed.
    Refused(StoreError),
    /// SQLite failed; the whole transaction must be abandoned.
    Db(rusqlite::Error),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Refused(e)
    }
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Db(e)
    }
}

struct Writer {
    conn: Connection,
    st: WriterState,
    hub: broadcast::Sender<Arc<WatchEvent>>,
    max_batch: usize,
}

/// In-memory mirror of the meta row, owned by the writer thread.
struct WriterState {
    rev: Revision,
    compact_rev: Revision,
    next_lease: LeaseId,
    history: i64,
    shared: Arc<Shared>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        loop {
            let first = match self.next_deadline() {
                Some(deadline) => {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(wait) {
                        Ok(r) => Some(r),
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                None => match rx.recv() {
                    Ok(r) => Some(r),
                    Err(_) => return,
                },
            };
            let mut ops = Vec::new();
            let mut stop = false;
            let mut next = first;
            while let Some(req) = next {
                match req {
                    Request::Op(op, reply) => ops.push((op, reply)),
                    Request::Shutdown => {
                        stop = true;
                        break;
                    }
                }
                if ops.len() >= self.max_batch {
                    break;
                }
                next = rx.try_recv().ok();
            }
            self.apply_batch(ops);
            if stop {
                // Requests queued behind the shutdown are dropped with the
                // receiver; their callers see `Closed`.
                return;
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.st.shared.leases().values().map(|e| e.deadline).min()
    }

    fn apply_batch(&mut self, ops: Vec<(Op, oneshot::Sender<Result<Reply>>)>) {
        let now = Instant::now();
        let expired: Vec<LeaseId> = {
            let mut leases = self.st.shared.leases();
            let ids: Vec<LeaseId> = leases
                .iter()
                .filter(|(_, e)| e.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in &ids {
                leases.remove(id);
            }
            ids
        };
        if ops.is_empty() && expired.is_empty() {
            return;
        }

        let before = (self.st.rev, self.st.compact_rev, self.st.next_lease);
        let mut events = Vec::new();
        let mut replies = Vec::with_capacity(ops.len());
        let outcome = (|| -> rusqlite::Result<()> {
            let tx = self.conn.unchecked_transaction()?;
            for id in &expired {
                self.st.delete_lease_keys(&tx, *id, &mut events)?;
                tx.prepare_cached("DELETE FROM leases WHERE id = ?1")?
                    .execute([id])?;
            }
            for (op, reply) in ops {
                match self.st.apply(&tx, op, now, &mut events) {
                    Ok(r) => replies.push((reply, Ok(r))),
                    Err(Fail::Refused(e)) => replies.push((reply, Err(e))),
                    Err(Fail::Db(e)) => {
                        // Answered below like every other request of the batch.
                        replies.push((reply, Err(StoreError::Closed)));
                        return Err(e);
                    }
                }
            }
            let trim_to = self.st.rev - self.st.history + 1;
            if trim_to > self.st.compact_rev {
                self.st.compact_to(&tx, trim_to)?;
            }
            if self.st.rev != before.0 {
                set_meta(&tx, "revision", self.st.rev)?;
            }
            if self.st.compact_rev != before.1 {
                set_meta(&tx, "compact_revision", self.st.compact_rev)?;
            }
            if self.st.next_lease != before.2 {
                set_meta(&tx, "next_lease", self.st.next_lease)?;
            }
            tx.commit()
        })();

        let shared = Arc::clone(&self.st.shared);
        shared
            .requests
            .fetch_add(u64::try_from(replies.len()).unwrap_or(0), Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                shared.commits.fetch_add(1, Ordering::Relaxed);
                shared.committed.store(self.st.rev, Ordering::SeqCst);
                for ev in events {
                    // No receivers is fine.
                    let _ = self.hub.send(Arc::new(ev));
                }
                for (reply, result) in replies {
                    // The caller may have given up waiting; the write stands.
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store transaction failed; all its writes are refused");
                let msg = format!("sqlite: transaction failed: {e}");
                for (reply, _) in replies {
                    let _ = reply.send(Err(StoreError::Backend(msg.clone())));
                }
                self.recover();
            }
        }
    }

    /// Re-read the in-memory state after an abandoned transaction.
    fn recover(&mut self) {
        match Meta::load(&self.conn) {
            Ok(meta) => {
                self.st.rev = meta.revision;
                self.st.compact_rev = meta.compact_revision;
                self.st.next_lease = meta.next_lease;
            }
            Err(e) => tracing::error!(error = %e, "store: cannot reload meta after failure"),
        }
        match load_leases(&self.conn) {
            Ok(rows) => {
                let now = Instant::now();
                let mut leases = self.st.shared.leases();
                let keep: HashMap<LeaseId, i64> = rows.into_iter().collect();
                leases.retain(|id, _| keep.contains_key(id));
                for (id, ttl) in keep {
                    leases.entry(id).or_insert(LeaseEntry {
                        ttl,
                        deadline: deadline_after(now, ttl),
                    });
                }
            }
            Err(e) => tracing::error!(error = %e, "store: cannot reload leases after failure"),
        }
    }
}

impl WriterState {
    fn apply(
        &mut self,
        tx: &Connection,
        op: Op,
        now: Instant,
        events: &mut Vec<WatchEvent>,
    ) -> Result<Reply, Fail> {
        match op {
            Op::Create { key, value, lease } => {
                self.check_lease(lease, now)?;
                let exists = tx
                    .prepare_cached("SELECT 1 FROM kv WHERE key = ?1")?
                    .exists([key.as_bytes()])?;
                if exists {
                    return Err(StoreError::AlreadyExists(key).into());
                }
                let kv = KeyValue {
                    key,
                    value,
                    create_revision: self.rev + 1,
                    mod_revision: self.rev + 1,
                    version: 1,
                    lease,
                };
                self.put(tx, kv.clone(), None, events)?;
                Ok(Reply::Kv(kv))
            }
            Op::Update {
                key,
                value,
                expected,
                lease,
            } => {
                let Some(prev) = read_kv(tx, &key)? else {
                    return Err(StoreError::NotFound(key).into());
                };
                if prev.mod_revision != expected {
                    return Err(StoreError::Conflict {
                        key,
                        expected,
                        actual: prev.mod_revision,
                    }
                    .into());
                }
                self.check_lease(lease, now)?;
                let kv = KeyValue {
                    key,
                    value,
                    create_revision: prev.create_revision,
                    mod_revision: self.rev + 1,
                    version: prev.version + 1,
                    lease,
                };
                self.put(tx, kv.clone(), Some(prev), events)?;
                Ok(Reply::Kv(kv))
            }
            Op::Delete { key, expected } => {
                let Some(prev) = read_kv(tx, &key)? else {
                    return Err(StoreError::NotFound(key).into());
                };
                if let Some(expected) = expected.filter(|e| *e != prev.mod_revision) {
                    return Err(StoreError::Conflict {
                        key,
                        expected,
                        actual: prev.mod_revision,
                    }
                    .into());
                }
                self.remove(tx, prev.clone(), events)?;
                Ok(Reply::Kv(prev))
            }
            Op::LeaseGrant { ttl } => {
                let id = self.next_lease;
                tx.prepare_cached("INSERT INTO leases (id, ttl) VALUES (?1, ?2)")?
                    .execute(params![id, ttl])?;
                self.next_lease += 1;
                self.shared.leases().insert(
                    id,
                    LeaseEntry {
                        ttl,
                        deadline: deadline_after(now, ttl),
                    },
                );
                Ok(Reply::Lease(id))
            }
            Op::LeaseRevoke { id } => {
                if self.shared.leases().remove(&id).is_none() {
                    return Err(StoreError::LeaseNotFound(id).into());
                }
                self.delete_lease_keys(tx, id, events)?;
                tx.prepare_cached("DELETE FROM leases WHERE id = ?1")?
                    .execute([id])?;
                Ok(Reply::Unit)
            }
            Op::Compact { revision } => {
                if revision > self.rev {
                    return Err(StoreError::InvalidArgument(format!(
                        "cannot compact to revision {revision}: current revision is {}",
                        self.rev
                    ))
                    .into());
                }
                if revision > self.compact_rev {
                    self.compact_to(tx, revision)?;
                }
                Ok(Reply::Unit)
            }
        }
    }

    fn check_lease(&self, lease: Option<LeaseId>, now: Instant) -> Result<(), Fail> {
        if let Some(id) = lease {
            let alive = self
                .shared
                .leases()
                .get(&id)
                .is_some_and(|e| e.deadline > now);
            if !alive {
                return Err(StoreError::LeaseNotFound(id).into());
            }
        }
        Ok(())
    }

    /// Write `kv` (whose `mod_revision` is `self.rev + 1`) and its event.
    fn put(
        &mut self,
        tx: &Connection,
        kv: KeyValue,
        prev: Option<KeyValue>,
        events: &mut Vec<WatchEvent>,
    ) -> rusqlite::Result<()> {
        tx.prepare_cached(
            "INSERT INTO kv (key, value, create_rev, mod_rev, version, lease)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value,
                 create_rev = excluded.create_rev, mod_rev = excluded.mod_rev,
                 version = excluded.version, lease = excluded.lease",
        )?
        .execute(params![
            kv.key.as_bytes(),
            kv.value,
            kv.create_revision,
            kv.mod_revision,
            kv.version,
            kv.lease
        ])?;
        let ev = WatchEvent {
            kind: EventKind::Put,
            kv,
            prev,
        };
        insert_event(tx, &ev)?;
        self.rev = ev.kv.mod_revision;
        events.push(ev);
        Ok(())
    }

    /// Delete `prev` (a current key) with a new revision and record the event.
    fn remove(
        &mut self,
        tx: &Connection,
        prev: KeyValue,
        events: &mut Vec<WatchEvent>,
    ) -> rusqlite::Result<()> {
        let rev = self.rev + 1;
        tx.prepare_cached("DELETE FROM kv WHERE key = ?1")?
            .execute([prev.key.as_bytes()])?;
        let ev = WatchEvent {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: prev.key.clone(),
                value: Vec::new(),
                create_revision: 0,
                mod_revision: rev,
                version: 0,
                lease: None,
            },
            prev: Some(prev),
        };
        insert_event(tx, &ev)?;
        self.rev = rev;
        events.push(ev);
        Ok(())
    }

    /// Delete every key attached to lease `id`, in key order.
    fn delete_lease_keys(
        &mut self,
        tx: &Connection,
        id: LeaseId,
        events: &mut Vec<WatchEvent>,
    ) -> rusqlite::Result<()> {
        let keys: Vec<Vec<u8>> = {
            let mut stmt = tx.prepare_cached("SELECT key FROM kv WHERE lease = ?1 ORDER BY key")?;
            let rows = stmt.query_map([id], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for key in keys {
            let key = key_string(key)?;
            if let Some(prev) = read_kv(tx, &key)? {
                self.remove(tx, prev, events)?;
            }
        }
        Ok(())
    }

    fn compact_to(&mut self, tx: &Connection, revision: Revision) -> rusqlite::Result<()> {
        tx.prepare_cached("DELETE FROM events WHERE rev < ?1")?
            .execute([revision])?;
        self.compact_rev = revision;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"/a/"), Some(b"/a0".to_vec()));
        assert_eq!(prefix_end(b"ab\xff"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
