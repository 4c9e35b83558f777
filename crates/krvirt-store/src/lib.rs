//! Revisioned key/value state with etcd semantics.
//!
//! One trait ([`Store`]), several backends: [`embedded`] (one host, a durable
//! SQLite file plus an in-process watch hub) and [`etcd`] (an etcd v3
//! cluster, for several API server replicas). Every backend
//! is held to the same behaviour by [`conformance`].
//!
//! Semantics follow etcd v3:
//! - every successful write bumps the store-wide revision by one;
//! - a key carries `create_revision`, `mod_revision` and `version`
//!   (writes since creation, starting at 1);
//! - `watch(prefix, from)` replays every event with revision >= `from`
//!   still in history, then streams live events, in revision order;
//!   asking for a revision older than the retained history fails with
//!   [`StoreError::Compacted`] so the caller relists;
//! - a key attached to a lease is deleted when the lease expires or is revoked.
//!   Such a deletion is a write like any other (a `Delete` event per key);
//!   the embedded backend gives each deleted key its own revision, etcd gives
//!   all keys of one lease the same revision, so callers must not assume
//!   either;
//! - lease operations themselves (grant, keep-alive, revoke of a lease with
//!   no keys) do not change the revision.

use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

pub mod conformance;
pub mod election;
pub mod embedded;
pub mod etcd;

/// A store-wide, monotonically increasing revision number.
pub type Revision = i64;
/// Lease identifier; 0 is never a valid lease.
pub type LeaseId = i64;

/// One key with its value and bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    /// Number of writes since the key was (last) created, starting at 1.
    pub version: i64,
    /// Lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    /// For `Put`, the new key/value. For `Delete`, the key with an empty
    /// value, `mod_revision` set to the revision of the delete, and
    /// `create_revision` 0, `version` 0, `lease` `None` (as etcd reports a
    /// tombstone).
    pub kv: KeyValue,
    /// The key/value before this event, when the backend knows it: `None`
    /// for a `Put` that created the key, the replaced key/value for a `Put`
    /// that updated it, the last key/value for a `Delete`.
    pub prev: Option<KeyValue>,
}

impl WatchEvent {
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// Stream of watch events; ends with an error item if the watch breaks
/// (the caller resumes from the last revision it saw + 1).
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {0} already exists")]
    AlreadyExists(String),
    #[error("key {0} not found")]
    NotFound(String),
    /// Compare-and-swap failed: the key's mod revision is not the expected one.
    #[error("key {key} was modified: expected revision {expected}, found {actual}")]
    Conflict {
        key: String,
        expected: Revision,
        actual: Revision,
    },
    #[error("revision {requested} has been compacted (oldest retained: {oldest})")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    #[error("watch fell behind and was dropped; resume from revision {resume_from}")]
    WatchLagged { resume_from: Revision },
    #[error("store is closed")]
    Closed,
    /// The request itself is malformed (empty key, non-positive TTL,
    /// negative revision, compaction beyond the current revision...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("store backend error: {0}")]
    Backend(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The state interface every control-plane component uses.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Current value of `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// All keys starting with `prefix`, sorted by key, and the store revision
    /// the listing was taken at (use it as `from + 1` for a following watch).
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)>;

    /// Create `key`; fails with `AlreadyExists` if present. Returns the new
    /// key/value (its `mod_revision` is the revision of this write).
    /// With `lease`, the key is deleted when that lease ends; a lease that
    /// does not exist (any more) is `LeaseNotFound`.
    async fn create(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<KeyValue>;

    /// Replace `key`'s value if its `mod_revision` equals `expected`
    /// (compare-and-swap). `NotFound` if absent, `Conflict` if changed.
    /// The key ends up attached to exactly `lease` (`None` detaches it, as an
    /// etcd put without a lease does); an unknown lease is `LeaseNotFound`.
    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Revision,
        lease: Option<LeaseId>,
    ) -> Result<KeyValue>;

    /// Delete `key`, optionally only if its `mod_revision` equals `expected`.
    /// Returns the deleted key/value (as it was before the delete).
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<KeyValue>;

    /// Events for keys under `prefix` with revision >= `from` (0 = only new
    /// events from now on), in revision order, then live.
    ///
    /// If `from` is older than the retained history the call itself fails
    /// with `Compacted` (not a stream item) so the caller relists. A stream
    /// that breaks later yields one final error item (`WatchLagged`,
    /// `Compacted`, `Closed`...) and ends.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream>;

    /// The store-wide revision of the last write.
    async fn revision(&self) -> Result<Revision>;

    /// Grant a lease that expires `ttl_secs` after grant or last keep-alive.
    async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseId>;

    /// Renew a lease; returns its TTL. `LeaseNotFound` if expired or revoked.
    async fn lease_keepalive(&self, lease: LeaseId) -> Result<i64>;

    /// Revoke a lease now, deleting every key attached to it.
    /// `LeaseNotFound` if it does not exist (any more).
    async fn lease_revoke(&self, lease: LeaseId) -> Result<()>;

    /// Discard watch history before `revision`: afterwards `watch(_, from)`
    /// with `from < revision` fails with `Compacted { oldest: revision, .. }`.
    /// Current keys are untouched. Compacting to a revision at or below an
    /// earlier compaction is a no-op; a revision above the current one is
    /// `InvalidArgument`. (etcd: `Compact`.)
    async fn compact(&self, revision: Revision) -> Result<()>;
}
