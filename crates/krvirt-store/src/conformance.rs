//! Conformance suite: the behaviour every [`Store`] backend must show.
//!
//! Each check is a public async function taking a fresh, empty store. The
//! [`conformance_tests!`](crate::conformance_tests) macro turns all of them
//! into named `#[tokio::test]` functions for one backend:
//!
//! ```no_run
//! use krvirt_store::conformance::Fixture;
//!
//! async fn fresh_store() -> Fixture {
//!     let dir = tempfile::tempdir().unwrap();
//!     let store = krvirt_store::embedded::EmbeddedStore::open(&dir.path().join("s.db")).unwrap();
//!     Fixture::new(store, dir)
//! }
//!
//! krvirt_store::conformance_tests!(fresh_store);
//! ```
//!
//! The crate using the macro needs `tokio` (with `macros` and
//! `rt-multi-thread`) as a (dev-)dependency.
//!
//! These functions are test code: they panic with a message naming the
//! broken expectation.

use std::any::Any;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::{EventKind, KeyValue, Revision, Store, StoreError, WatchEvent, WatchStream};

/// How long any single expected event may take to arrive.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long lease expiry may take beyond the TTL (etcd rounds TTLs up).
const LEASE_SLACK: Duration = Duration::from_secs(15);

/// A fresh, empty store plus whatever must live exactly as long as it
/// (a temporary directory, a server process guard...).
pub struct Fixture {
    // Field order matters: the store is dropped before what it depends on.
    store: Arc<dyn Store>,
    _keep: Box<dyn Any + Send + Sync>,
}

impl Fixture {
    pub fn new(store: impl Store, keep: impl Any + Send + Sync) -> Fixture {
        Fixture {
            store: Arc::new(store),
            _keep: Box::new(keep),
        }
    }

    /// For a store that is already shared.
    pub fn from_arc(store: Arc<dyn Store>, keep: impl Any + Send + Sync) -> Fixture {
        Fixture {
            store,
            _keep: Box::new(keep),
        }
    }

    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }
}

/// Expand to one `#[tokio::test]` per conformance check. The argument is a
/// path or expression callable as `factory()` returning a future of
/// [`Fixture`] holding a fresh, empty store.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@each $factory;
            create_then_get,
            create_existing_fails_already_exists,
            get_missing_returns_none,
            update_compare_and_swap,
            update_conflict_reports_actual_revision,
            update_missing_not_found,
            delete_without_expected_revision,
            delete_with_expected_revision,
            delete_missing_not_found,
            recreate_after_delete_resets_version,
            list_sorted_by_key,
            list_prefix_isolation,
            list_revision_usable_as_watch_start,
            revisions_increase_by_one_per_write,
            version_counts_writes,
            values_and_keys_are_binary_and_unicode_safe,
            invalid_arguments_rejected,
            watch_replays_past_events,
            watch_from_middle_revision,
            watch_live_events,
            watch_from_zero_only_new_events,
            watch_prefix_filtering,
            watch_resume_after_disconnect_loses_nothing,
            watchers_see_identical_sequences,
            watch_compacted_revision_fails,
            lease_expiry_deletes_keys_and_emits_delete_events,
            lease_keepalive_extends,
            lease_revoke_deletes_keys,
            lease_unknown_errors,
            update_without_lease_detaches,
            concurrent_cas_exactly_one_wins,
            concurrent_creates_distinct_revisions,
        );
    };
    (@each $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let fixture = ($factory)().await;
                $crate::conformance::$name(fixture.store()).await;
                drop(fixture);
            }
        )*
    };
}

// ---------------------------------------------------------------------------
// helpers

async fn next_event(w: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(EVENT_TIMEOUT, w.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch stream failed: {e}"),
        Ok(None) => panic!("watch stream ended unexpectedly"),
        Err(_) => panic!("no watch event within {EVENT_TIMEOUT:?}"),
    }
}

async fn next_events(w: &mut WatchStream, n: usize) -> Vec<WatchEvent> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next_event(w).await);
    }
    out
}

async fn assert_quiet(w: &mut WatchStream, wait: Duration) {
    if let Ok(item) = tokio::time::timeout(wait, w.next()).await {
        panic!("expected no watch event, got {item:?}");
    }
}

async fn must_watch(store: &Arc<dyn Store>, prefix: &str, from: Revision) -> WatchStream {
    store
        .watch(prefix, from)
        .await
        .unwrap_or_else(|e| panic!("watch({prefix:?}, {from}) failed: {e}"))
}

async fn rev(store: &Arc<dyn Store>) -> Revision {
    store.revision().await.expect("revision()")
}

async fn create(store: &Arc<dyn Store>, key: &str, value: &str) -> KeyValue {
    store
        .create(key, value.as_bytes().to_vec(), None)
        .await
        .unwrap_or_else(|e| panic!("create {key}: {e}"))
}

async fn update(store: &Arc<dyn Store>, key: &str, value: &str, expected: Revision) -> KeyValue {
    store
        .update(key, value.as_bytes().to_vec(), expected, None)
        .await
        .unwrap_or_else(|e| panic!("update {key}@{expected}: {e}"))
}

fn put_event(kv: &KeyValue, prev: Option<&KeyValue>) -> WatchEvent {
    WatchEvent {
        kind: EventKind::Put,
        kv: kv.clone(),
        prev: prev.cloned(),
    }
}

fn delete_event(prev: &KeyValue, revision: Revision) -> WatchEvent {
    WatchEvent {
        kind: EventKind::Delete,
        kv: KeyValue {
            key: prev.key.clone(),
            value: Vec::new(),
            create_revision: 0,
            mod_revision: revision,
            version: 0,
            lease: None,
        },
        prev: Some(prev.clone()),
    }
}

fn keys_of(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

async fn wait_until_gone(store: &Arc<dyn Store>, key: &str, within: Duration) {
    let start = Instant::now();
    while store.get(key).await.expect("get").is_some() {
        assert!(
            start.elapsed() < within,
            "{key} still present after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// keys and values

/// A created key reads back with version 1 and create == mod revision.
pub async fn create_then_get(store: Arc<dyn Store>) {
    let kv = create(&store, "/t/a", "v1").await;
    assert_eq!(kv.key, "/t/a");
    assert_eq!(kv.value, b"v1");
    assert_eq!(kv.version, 1);
    assert_eq!(kv.create_revision, kv.mod_revision);
    assert_eq!(kv.lease, None);
    assert!(kv.mod_revision > 0);
    assert_eq!(store.get("/t/a").await.expect("get"), Some(kv.clone()));
    assert_eq!(rev(&store).await, kv.mod_revision);
}

/// Creating an existing key fails and changes nothing.
pub async fn create_existing_fails_already_exists(store: Arc<dyn Store>) {
    let kv = create(&store, "/t/a", "v1").await;
    match store.create("/t/a", b"v2".to_vec(), None).await {
        Err(StoreError::AlreadyExists(k)) => assert_eq!(k, "/t/a"),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(store.get("/t/a").await.expect("get"), Some(kv.clone()));
    assert_eq!(rev(&store).await, kv.mod_revision);
}

pub async fn get_missing_returns_none(store: Arc<dyn Store>) {
    assert_eq!(store.get("/t/missing").await.expect("get"), None);
    create(&store, "/t/present", "x").await;
    assert_eq!(store.get("/t/pres").await.expect("get"), None);
    assert_eq!(store.get("/t/present/x").await.expect("get"), None);
}

/// CAS update with the current revision succeeds and bumps version.
pub async fn update_compare_and_swap(store: Arc<dyn Store>) {
    let c = create(&store, "/t/a", "v1").await;
    let u1 = update(&store, "/t/a", "v2", c.mod_revision).await;
    assert_eq!(u1.value, b"v2");
    assert_eq!(u1.mod_revision, c.mod_revision + 1);
    assert_eq!(u1.create_revision, c.create_revision);
    assert_eq!(u1.version, 2);
    assert_eq!(store.get("/t/a").await.expect("get"), Some(u1.clone()));
    let u2 = update(&store, "/t/a", "v3", u1.mod_revision).await;
    assert_eq!(u2.version, 3);
    assert_eq!(u2.mod_revision, u1.mod_revision + 1);
    assert_eq!(store.get("/t/a").await.expect("get"), Some(u2));
}

/// A stale CAS fails with the key's actual revision and changes nothing.
pub async fn update_conflict_reports_actual_revision(store: Arc<dyn Store>) {
    let c = create(&store, "/t/a", "v1").await;
    let u = update(&store, "/t/a", "v2", c.mod_revision).await;
    match store
        .update("/t/a", b"v3".to_vec(), c.mod_revision, None)
        .await
    {
        Err(StoreError::Conflict {
            key,
            expected,
            actual,
        }) => {
            assert_eq!(key, "/t/a");
            assert_eq!(expected, c.mod_revision);
            assert_eq!(actual, u.mod_revision);
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(store.get("/t/a").await.expect("get"), Some(u.clone()));
    assert_eq!(rev(&store).await, u.mod_revision);
}

pub async fn update_missing_not_found(store: Arc<dyn Store>) {
    match store.update("/t/none", b"x".to_vec(), 1, None).await {
        Err(StoreError::NotFound(k)) => assert_eq!(k, "/t/none"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_eq!(store.get("/t/none").await.expect("get"), None);
}

/// Unconditional delete returns the last key/value and removes the key.
pub async fn delete_without_expected_revision(store: Arc<dyn Store>) {
    let c = create(&store, "/t/a", "v1").await;
    let u = update(&store, "/t/a", "v2", c.mod_revision).await;
    let before = rev(&store).await;
    let d = store.delete("/t/a", None).await.expect("delete");
    assert_eq!(d, u, "delete returns the key/value as it was");
    assert_eq!(store.get("/t/a").await.expect("get"), None);
    assert_eq!(rev(&store).await, before + 1);
}

/// Conditional delete only succeeds at the expected revision.
pub async fn delete_with_expected_revision(store: Arc<dyn Store>) {
    let c = create(&store, "/t/a", "v1").await;
    let u = update(&store, "/t/a", "v2", c.mod_revision).await;
    match store.delete("/t/a", Some(c.mod_revision)).await {
        Err(StoreError::Conflict {
            key,
            expected,
            actual,
        }) => {
            assert_eq!(key, "/t/a");
            assert_eq!(expected, c.mod_revision);
            assert_eq!(actual, u.mod_revision);
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(store.get("/t/a").await.expect("get"), Some(u.clone()));
    let d = store
        .delete("/t/a", Some(u.mod_revision))
        .await
        .expect("delete at current revision");
    assert_eq!(d, u);
    assert_eq!(store.get("/t/a").await.expect("get"), None);
}

pub async fn delete_missing_not_found(store: Arc<dyn Store>) {
    match store.delete("/t/none", None).await {
        Err(StoreError::NotFound(k)) => assert_eq!(k, "/t/none"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    create(&store, "/t/a", "v").await;
    store.delete("/t/a", None).await.expect("first delete");
    let r = rev(&store).await;
    match store.delete("/t/a", None).await {
        Err(StoreError::NotFound(k)) => assert_eq!(k, "/t/a"),
        other => panic!("expected NotFound on second delete, got {other:?}"),
    }
    match store.delete("/t/a", Some(1)).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("expected NotFound for conditional delete, got {other:?}"),
    }
    assert_eq!(rev(&store).await, r, "failed deletes do not write");
}

/// After delete, a re-created key starts over: new create revision, version 1.
pub async fn recreate_after_delete_resets_version(store: Arc<dyn Store>) {
    let c1 = create(&store, "/t/a", "v1").await;
    let u1 = update(&store, "/t/a", "v2", c1.mod_revision).await;
    store.delete("/t/a", None).await.expect("delete");
    let deleted_at = rev(&store).await;
    let c2 = create(&store, "/t/a", "again").await;
    assert_eq!(c2.version, 1);
    assert_eq!(c2.create_revision, c2.mod_revision);
    assert_eq!(c2.create_revision, deleted_at + 1);
    assert_ne!(c2.create_revision, c1.create_revision);
    match store
        .update("/t/a", b"x".to_vec(), u1.mod_revision, None)
        .await
    {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, c2.mod_revision),
        other => panic!("a revision of the old incarnation must conflict, got {other:?}"),
    }
    let u2 = update(&store, "/t/a", "y", c2.mod_revision).await;
    assert_eq!(u2.version, 2);
    assert_eq!(u2.create_revision, c2.create_revision);
}

/// List returns keys sorted bytewise, with their full bookkeeping.
pub async fn list_sorted_by_key(store: Arc<dyn Store>) {
    let names = ["m", "b", "z", "a", "bb", "b/c", "0", "y"];
    let mut created = BTreeMap::new();
    for n in names {
        let kv = create(&store, &format!("/l/{n}"), n).await;
        created.insert(kv.key.clone(), kv);
    }
    let (items, _) = store.list("/l/").await.expect("list");
    let mut expected: Vec<String> = created.keys().cloned().collect();
    expected.sort();
    assert_eq!(keys_of(&items), expected);
    for kv in &items {
        assert_eq!(Some(kv), created.get(&kv.key));
    }
}

/// A prefix matches exactly the keys starting with it.
pub async fn list_prefix_isolation(store: Arc<dyn Store>) {
    for k in ["/p/a", "/p/b", "/pa/x", "/q/y", "/p", "/p/"] {
        create(&store, k, k).await;
    }
    let (p, _) = store.list("/p/").await.expect("list /p/");
    assert_eq!(keys_of(&p), vec!["/p/", "/p/a", "/p/b"]);
    let (p2, _) = store.list("/p").await.expect("list /p");
    assert_eq!(keys_of(&p2), vec!["/p", "/p/", "/p/a", "/p/b", "/pa/x"]);
    let (all, _) = store.list("").await.expect("list all");
    assert_eq!(
        keys_of(&all),
        vec!["/p", "/p/", "/p/a", "/p/b", "/pa/x", "/q/y"]
    );
    let (none, _) = store.list("/none/").await.expect("list none");
    assert!(none.is_empty());
}

/// The revision returned by list is the store revision; watching from it + 1
/// yields exactly the changes after the listing.
pub async fn list_revision_usable_as_watch_start(store: Arc<dyn Store>) {
    let a = create(&store, "/x/a", "1").await;
    create(&store, "/x/b", "1").await;
    create(&store, "/other/c", "1").await;
    let (items, list_rev) = store.list("/x/").await.expect("list");
    assert_eq!(items.len(), 2);
    assert_eq!(list_rev, rev(&store).await, "list revision is store-wide");
    let c = create(&store, "/x/c", "2").await;
    let a2 = update(&store, "/x/a", "2", a.mod_revision).await;
    let mut w = must_watch(&store, "/x/", list_rev + 1).await;
    let got = next_events(&mut w, 2).await;
    assert_eq!(got, vec![put_event(&c, None), put_event(&a2, Some(&a))]);
    assert_quiet(&mut w, Duration::from_millis(300)).await;
}

/// Every successful create/update/delete bumps the revision by exactly one;
/// failed writes and lease grants do not.
pub async fn revisions_increase_by_one_per_write(store: Arc<dyn Store>) {
    let mut r = rev(&store).await;
    for i in 0..5 {
        let kv = create(&store, &format!("/r/{i}"), "c").await;
        assert_eq!(kv.mod_revision, r + 1);
        r += 1;
        assert_eq!(rev(&store).await, r);
        let kv = update(&store, &kv.key, "u", kv.mod_revision).await;
        assert_eq!(kv.mod_revision, r + 1);
        r += 1;
        assert_eq!(rev(&store).await, r);
    }
    let d = store.delete("/r/0", None).await.expect("delete");
    assert!(d.mod_revision < r);
    r += 1;
    assert_eq!(rev(&store).await, r);
    assert!(store.create("/r/1", b"x".to_vec(), None).await.is_err());
    assert!(store.update("/r/1", b"x".to_vec(), 1, None).await.is_err());
    assert!(store.delete("/r/0", None).await.is_err());
    let lease = store.lease_grant(60).await.expect("grant");
    store.lease_keepalive(lease).await.expect("keepalive");
    assert_eq!(rev(&store).await, r, "failed writes and leases do not bump");
    let kv = create(&store, "/r/next", "x").await;
    assert_eq!(kv.mod_revision, r + 1);
    store.lease_revoke(lease).await.expect("revoke");
}

pub async fn version_counts_writes(store: Arc<dyn Store>) {
    let mut kv = create(&store, "/v/a", "0").await;
    let created = kv.create_revision;
    for i in 1..=4 {
        kv = update(&store, "/v/a", &i.to_string(), kv.mod_revision).await;
        assert_eq!(kv.version, i + 1);
        assert_eq!(kv.create_revision, created);
    }
    let other = create(&store, "/v/b", "0").await;
    assert_eq!(other.version, 1, "versions are per key");
    assert_eq!(
        store.get("/v/a").await.expect("get").map(|k| k.version),
        Some(5)
    );
}

/// Arbitrary bytes as values and non-ASCII keys round-trip.
pub async fn values_and_keys_are_binary_and_unicode_safe(store: Arc<dyn Store>) {
    let value: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    let key = "/u/ключ/ü/\u{1F600}";
    let kv = store
        .create(key, value.clone(), None)
        .await
        .expect("create");
    assert_eq!(kv.value, value);
    assert_eq!(store.get(key).await.expect("get"), Some(kv.clone()));
    let empty = store
        .create("/u/empty", Vec::new(), None)
        .await
        .expect("create empty");
    assert!(empty.value.is_empty());
    let (items, _) = store.list("/u/ключ").await.expect("list");
    assert_eq!(items, vec![kv.clone()]);
    let mut w = must_watch(&store, "/u/ключ/", kv.mod_revision).await;
    assert_eq!(next_event(&mut w).await, put_event(&kv, None));
}

/// Malformed requests are refused as `InvalidArgument`.
pub async fn invalid_arguments_rejected(store: Arc<dyn Store>) {
    match store.create("", b"x".to_vec(), None).await {
        Err(StoreError::InvalidArgument(_)) => {}
        other => panic!("empty key: expected InvalidArgument, got {other:?}"),
    }
    match store.lease_grant(0).await {
        Err(StoreError::InvalidArgument(_)) => {}
        other => panic!("TTL 0: expected InvalidArgument, got {other:?}"),
    }
    match store.watch("/", -1).await {
        Err(StoreError::InvalidArgument(_)) => {}
        Err(e) => panic!("watch from -1: expected InvalidArgument, got {e:?}"),
        Ok(_) => panic!("watch from -1: expected InvalidArgument, got a stream"),
    }
    assert_eq!(rev(&store).await, 0, "nothing was written");
}

// ---------------------------------------------------------------------------
// watch

/// Watching from a past revision replays the exact events (kinds, values,
/// revisions, prev values) in order.
pub async fn watch_replays_past_events(store: Arc<dyn Store>) {
    let a1 = create(&store, "/w/a", "a1").await;
    let a2 = update(&store, "/w/a", "a2", a1.mod_revision).await;
    let b1 = create(&store, "/w/b", "b1").await;
    let a_del = store.delete("/w/a", None).await.expect("delete");
    let b2 = update(&store, "/w/b", "b2", b1.mod_revision).await;
    let a3 = create(&store, "/w/a", "a3").await;
    let expected = vec![
        put_event(&a1, None),
        put_event(&a2, Some(&a1)),
        put_event(&b1, None),
        delete_event(&a_del, b1.mod_revision + 1),
        put_event(&b2, Some(&b1)),
        put_event(&a3, None),
    ];
    let mut w = must_watch(&store, "/w/", a1.mod_revision).await;
    let got = next_events(&mut w, expected.len()).await;
    assert_eq!(got, expected);
    for pair in got.windows(2) {
        assert_eq!(pair[1].revision(), pair[0].revision() + 1);
    }
    assert_quiet(&mut w, Duration::from_millis(300)).await;
    // The stream continues live after the replay.
    let b3 = update(&store, "/w/b", "b3", b2.mod_revision).await;
    assert_eq!(next_event(&mut w).await, put_event(&b3, Some(&b2)));
}

/// Watching from a revision in the middle starts exactly there.
pub async fn watch_from_middle_revision(store: Arc<dyn Store>) {
    let mut kvs = Vec::new();
    for i in 0..6 {
        kvs.push(create(&store, &format!("/m/{i}"), "x").await);
    }
    let mut w = must_watch(&store, "/m/", kvs[3].mod_revision).await;
    let got = next_events(&mut w, 3).await;
    let expected: Vec<WatchEvent> = kvs[3..].iter().map(|kv| put_event(kv, None)).collect();
    assert_eq!(got, expected);
    assert_quiet(&mut w, Duration::from_millis(300)).await;
}

/// Events written after the watch started arrive live, in order.
pub async fn watch_live_events(store: Arc<dyn Store>) {
    let mut w = must_watch(&store, "/live/", 0).await;
    let writer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..20 {
                let kv = create(&store, &format!("/live/{i:02}"), "x").await;
                out.push(put_event(&kv, None));
                if i % 4 == 0 {
                    let u = update(&store, &kv.key, "y", kv.mod_revision).await;
                    out.push(put_event(&u, Some(&kv)));
                    let d = store.delete(&kv.key, None).await.expect("delete");
                    out.push(delete_event(&d, u.mod_revision + 1));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            out
        })
    };
    let expected = writer.await.expect("writer task");
    let got = next_events(&mut w, expected.len()).await;
    assert_eq!(got, expected);
    assert_quiet(&mut w, Duration::from_millis(300)).await;
}

/// `from == 0` delivers only events after the watch started.
pub async fn watch_from_zero_only_new_events(store: Arc<dyn Store>) {
    let old = create(&store, "/z/old", "x").await;
    update(&store, "/z/old", "y", old.mod_revision).await;
    let mut w = must_watch(&store, "/z/", 0).await;
    assert_quiet(&mut w, Duration::from_millis(300)).await;
    let new = create(&store, "/z/new", "x").await;
    assert_eq!(next_event(&mut w).await, put_event(&new, None));
}

/// Only keys under the watched prefix are delivered, in replay and live.
pub async fn watch_prefix_filtering(store: Arc<dyn Store>) {
    let start = rev(&store).await + 1;
    let a1 = create(&store, "/a/1", "x").await;
    create(&store, "/ab/1", "x").await;
    create(&store, "/b/1", "x").await;
    create(&store, "/a", "x").await;
    let a2 = create(&store, "/a/2", "x").await;
    let mut w = must_watch(&store, "/a/", start).await;
    assert_eq!(
        next_events(&mut w, 2).await,
        vec![put_event(&a1, None), put_event(&a2, None)]
    );
    create(&store, "/ab/2", "x").await;
    create(&store, "/b/2", "x").await;
    let a3 = create(&store, "/a/3", "x").await;
    assert_eq!(next_event(&mut w).await, put_event(&a3, None));
    assert_quiet(&mut w, Duration::from_millis(300)).await;
}

/// A watcher that drops its stream and resumes from last seen + 1, while
/// writes keep coming, sees every event exactly once, in order.
pub async fn watch_resume_after_disconnect_loses_nothing(store: Arc<dyn Store>) {
    let start = rev(&store).await + 1;
    let writer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut writes = 0usize;
            for i in 0..300 {
                let kv = create(&store, &format!("/res/{i:03}"), "c").await;
                writes += 1;
                if i % 3 == 0 {
                    update(&store, &kv.key, "u", kv.mod_revision).await;
                    writes += 1;
                }
                if i % 5 == 0 {
                    store.delete(&kv.key, None).await.expect("delete");
                    writes += 1;
                }
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            writes
        })
    };
    let mut seen: Vec<WatchEvent> = Vec::new();
    let mut from = start;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut final_rev = None;
    let mut reconnects = 0;
    loop {
        assert!(Instant::now() < deadline, "resume test did not finish");
        if final_rev.is_none() && writer.is_finished() {
            final_rev = Some(rev(&store).await);
        }
        if let Some(f) = final_rev
            && from > f
        {
            break;
        }
        let mut w = must_watch(&store, "/res/", from).await;
        reconnects += 1;
        for _ in 0..37 {
            match tokio::time::timeout(Duration::from_millis(200), w.next()).await {
                Ok(Some(Ok(ev))) => {
                    from = ev.revision() + 1;
                    seen.push(ev);
                }
                Ok(Some(Err(e))) => panic!("watch failed: {e}"),
                Ok(None) => panic!("watch ended"),
                Err(_) => break,
            }
        }
        drop(w);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let writes = writer.await.expect("writer");
    assert!(reconnects > 3, "the watcher must actually reconnect");
    assert_eq!(seen.len(), writes, "one event per write");
    for (i, ev) in seen.iter().enumerate() {
        assert_eq!(ev.revision(), start + i as Revision, "gap or duplicate");
    }
    let mut w = must_watch(&store, "/res/", start).await;
    let reference = next_events(&mut w, writes).await;
    assert_eq!(seen, reference);
}

/// Several watchers of one prefix see the same sequence.
pub async fn watchers_see_identical_sequences(store: Arc<dyn Store>) {
    let mut watchers = Vec::new();
    for _ in 0..3 {
        watchers.push(must_watch(&store, "/same/", 0).await);
    }
    let mut tasks = Vec::new();
    for t in 0..4 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                create(&store, &format!("/same/{t}/{i}"), "x").await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let mut sequences = Vec::new();
    for w in &mut watchers {
        sequences.push(next_events(w, 100).await);
    }
    for s in &sequences[1..] {
        assert_eq!(s, &sequences[0]);
    }
    let revs: Vec<Revision> = sequences[0].iter().map(|e| e.revision()).collect();
    let mut sorted = revs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(revs, sorted, "strictly increasing revisions");
}

/// Watching from before a compaction fails with `Compacted`; from the
/// compaction revision on, history is intact.
pub async fn watch_compacted_revision_fails(store: Arc<dyn Store>) {
    let mut kvs = Vec::new();
    for i in 0..10 {
        kvs.push(create(&store, &format!("/c/{i}"), "x").await);
    }
    let compact_at = kvs[5].mod_revision;
    store.compact(compact_at).await.expect("compact");
    match store.watch("/c/", kvs[2].mod_revision).await {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!(requested, kvs[2].mod_revision);
            assert_eq!(oldest, compact_at);
        }
        Err(e) => panic!("expected Compacted, got {e:?}"),
        Ok(_) => panic!("expected Compacted, got a stream"),
    }
    let mut w = must_watch(&store, "/c/", compact_at).await;
    let got = next_events(&mut w, 5).await;
    let expected: Vec<WatchEvent> = kvs[5..].iter().map(|kv| put_event(kv, None)).collect();
    assert_eq!(got, expected);
    // Compacting to an older revision is a no-op; the future is refused.
    store
        .compact(kvs[1].mod_revision)
        .await
        .expect("compact to an older revision");
    match store.compact(rev(&store).await + 5).await {
        Err(StoreError::InvalidArgument(_)) => {}
        other => panic!("compacting the future: expected InvalidArgument, got {other:?}"),
    }
    let (items, _) = store.list("/c/").await.expect("list");
    assert_eq!(items.len(), 10, "compaction keeps current keys");
    // Watch from 0 still works.
    let mut w0 = must_watch(&store, "/c/", 0).await;
    let k = create(&store, "/c/new", "x").await;
    assert_eq!(next_event(&mut w0).await, put_event(&k, None));
}

// ---------------------------------------------------------------------------
// leases

/// When a lease expires its keys are deleted with Delete events; other keys
/// stay; the lease is gone.
pub async fn lease_expiry_deletes_keys_and_emits_delete_events(store: Arc<dyn Store>) {
    let lease = store.lease_grant(1).await.expect("grant");
    let a = store
        .create("/le/a", b"a".to_vec(), Some(lease))
        .await
        .expect("create a");
    assert_eq!(a.lease, Some(lease));
    let b = store
        .create("/le/b", b"b".to_vec(), Some(lease))
        .await
        .expect("create b");
    let c = create(&store, "/le/c", "c").await;
    let mut w = must_watch(&store, "/le/", 0).await;
    let granted = Instant::now();
    let mut deleted = Vec::new();
    while deleted.len() < 2 {
        match tokio::time::timeout(LEASE_SLACK, w.next()).await {
            Ok(Some(Ok(ev))) => deleted.push(ev),
            other => panic!("expected lease expiry deletes, got {other:?}"),
        }
    }
    assert!(
        granted.elapsed() < LEASE_SLACK,
        "expiry took {:?}",
        granted.elapsed()
    );
    deleted.sort_by(|x, y| x.kv.key.cmp(&y.kv.key));
    for (ev, kv) in deleted.iter().zip([&a, &b]) {
        assert_eq!(ev.kind, EventKind::Delete);
        assert_eq!(ev.kv.key, kv.key);
        assert!(ev.kv.value.is_empty());
        assert!(ev.revision() > c.mod_revision);
        assert_eq!(ev.prev.as_ref(), Some(kv));
    }
    assert_eq!(store.get("/le/a").await.expect("get"), None);
    assert_eq!(store.get("/le/b").await.expect("get"), None);
    assert_eq!(store.get("/le/c").await.expect("get"), Some(c));
    match store.lease_keepalive(lease).await {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, lease),
        other => panic!("keepalive of an expired lease: expected LeaseNotFound, got {other:?}"),
    }
    match store.create("/le/d", b"d".to_vec(), Some(lease)).await {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, lease),
        other => panic!("create with expired lease: expected LeaseNotFound, got {other:?}"),
    }
}

/// Keep-alives hold a lease past its TTL; without them it expires.
pub async fn lease_keepalive_extends(store: Arc<dyn Store>) {
    let lease = store.lease_grant(2).await.expect("grant");
    store
        .create("/ka/a", b"a".to_vec(), Some(lease))
        .await
        .expect("create");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let ttl = store.lease_keepalive(lease).await.expect("keepalive");
        assert!(ttl >= 2, "keepalive returns the TTL, got {ttl}");
    }
    assert!(
        store.get("/ka/a").await.expect("get").is_some(),
        "key must survive while the lease is kept alive"
    );
    wait_until_gone(&store, "/ka/a", LEASE_SLACK).await;
    assert!(
        start.elapsed() > Duration::from_secs(6),
        "expired too early: {:?}",
        start.elapsed()
    );
}

/// Revoking deletes the attached keys at once; the lease is then unknown.
pub async fn lease_revoke_deletes_keys(store: Arc<dyn Store>) {
    let lease = store.lease_grant(300).await.expect("grant");
    let other = store.lease_grant(300).await.expect("grant other");
    assert_ne!(lease, other);
    let mut attached = Vec::new();
    for k in ["/rv/a", "/rv/b", "/rv/c"] {
        attached.push(
            store
                .create(k, k.as_bytes().to_vec(), Some(lease))
                .await
                .expect("create"),
        );
    }
    let kept = store
        .create("/rv/other", b"o".to_vec(), Some(other))
        .await
        .expect("create other");
    let mut w = must_watch(&store, "/rv/", 0).await;
    let before = rev(&store).await;
    store.lease_revoke(lease).await.expect("revoke");
    let mut events = next_events(&mut w, 3).await;
    let revs: Vec<Revision> = events.iter().map(|e| e.revision()).collect();
    assert!(revs.windows(2).all(|p| p[0] <= p[1]), "in revision order");
    assert!(revs.iter().all(|r| *r > before));
    events.sort_by(|x, y| x.kv.key.cmp(&y.kv.key));
    for (ev, kv) in events.iter().zip(&attached) {
        assert_eq!(ev.kind, EventKind::Delete);
        assert_eq!(ev.prev.as_ref(), Some(kv));
    }
    let (left, _) = store.list("/rv/").await.expect("list");
    assert_eq!(left, vec![kept]);
    match store.lease_keepalive(lease).await {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, lease),
        other => panic!("expected LeaseNotFound, got {other:?}"),
    }
    match store.lease_revoke(lease).await {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, lease),
        other => panic!("second revoke: expected LeaseNotFound, got {other:?}"),
    }
    store
        .lease_keepalive(other)
        .await
        .expect("other lease lives");
    store.lease_revoke(other).await.expect("revoke other");
}

/// Unknown leases are refused everywhere and nothing is written.
pub async fn lease_unknown_errors(store: Arc<dyn Store>) {
    let unknown = 7_340_033;
    match store.lease_keepalive(unknown).await {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, unknown),
        other => panic!("keepalive: expected LeaseNotFound, got {other:?}"),
    }
    match store.lease_revoke(unknown).await {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, unknown),
        other => panic!("revoke: expected LeaseNotFound, got {other:?}"),
    }
    match store.create("/lu/a", b"a".to_vec(), Some(unknown)).await {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, unknown),
        other => panic!("create: expected LeaseNotFound, got {other:?}"),
    }
    assert_eq!(store.get("/lu/a").await.expect("get"), None);
    let kv = create(&store, "/lu/b", "b").await;
    match store
        .update("/lu/b", b"x".to_vec(), kv.mod_revision, Some(unknown))
        .await
    {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, unknown),
        other => panic!("update: expected LeaseNotFound, got {other:?}"),
    }
    assert_eq!(store.get("/lu/b").await.expect("get"), Some(kv.clone()));
    assert_eq!(rev(&store).await, kv.mod_revision, "nothing else written");
}

/// An update carries exactly the lease it names: `None` detaches.
pub async fn update_without_lease_detaches(store: Arc<dyn Store>) {
    let lease = store.lease_grant(300).await.expect("grant");
    let a = store
        .create("/ld/a", b"a".to_vec(), Some(lease))
        .await
        .expect("create a");
    let a2 = update(&store, "/ld/a", "a2", a.mod_revision).await;
    assert_eq!(a2.lease, None);
    let b = create(&store, "/ld/b", "b").await;
    let b2 = store
        .update("/ld/b", b"b2".to_vec(), b.mod_revision, Some(lease))
        .await
        .expect("attach b");
    assert_eq!(b2.lease, Some(lease));
    assert_eq!(
        store.get("/ld/b").await.expect("get").and_then(|k| k.lease),
        Some(lease)
    );
    store.lease_revoke(lease).await.expect("revoke");
    assert_eq!(store.get("/ld/a").await.expect("get"), Some(a2));
    assert_eq!(store.get("/ld/b").await.expect("get"), None);
}

// ---------------------------------------------------------------------------
// concurrency

/// 50 CAS updates from the same starting revision: exactly one wins, the
/// others see `Conflict` naming the winner's revision.
pub async fn concurrent_cas_exactly_one_wins(store: Arc<dyn Store>) {
    let start = create(&store, "/cas/k", "start").await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let store = Arc::clone(&store);
        let expected = start.mod_revision;
        tasks.push(tokio::spawn(async move {
            store
                .update("/cas/k", format!("w{i}").into_bytes(), expected, None)
                .await
        }));
    }
    let mut winners = Vec::new();
    let mut conflicts = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(kv) => winners.push(kv),
            Err(StoreError::Conflict {
                expected, actual, ..
            }) => {
                assert_eq!(expected, start.mod_revision);
                conflicts.push(actual);
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one CAS wins");
    assert_eq!(conflicts.len(), 49);
    let winner = &winners[0];
    assert!(conflicts.iter().all(|a| *a == winner.mod_revision));
    assert_eq!(winner.version, 2);
    assert_eq!(
        store.get("/cas/k").await.expect("get").as_ref(),
        Some(winner)
    );
    assert_eq!(rev(&store).await, start.mod_revision + 1);
}

/// 200 concurrent creates of distinct keys all succeed with distinct,
/// gap-free revisions, and the watch history holds exactly them.
pub async fn concurrent_creates_distinct_revisions(store: Arc<dyn Store>) {
    let start = rev(&store).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store
                .create(&format!("/cc/{i:03}"), vec![i as u8], None)
                .await
        }));
    }
    let mut kvs = Vec::new();
    for t in tasks {
        kvs.push(t.await.expect("task").expect("create"));
    }
    let revs: HashSet<Revision> = kvs.iter().map(|kv| kv.mod_revision).collect();
    assert_eq!(revs.len(), 200, "distinct revisions");
    let expected: HashSet<Revision> = (start + 1..=start + 200).collect();
    assert_eq!(revs, expected, "no gaps");
    assert_eq!(rev(&store).await, start + 200);
    let (items, list_rev) = store.list("/cc/").await.expect("list");
    assert_eq!(items.len(), 200);
    assert_eq!(list_rev, start + 200);
    let mut w = must_watch(&store, "/cc/", start + 1).await;
    let events = next_events(&mut w, 200).await;
    let mut by_rev = kvs.clone();
    by_rev.sort_by_key(|kv| kv.mod_revision);
    let expected: Vec<WatchEvent> = by_rev.iter().map(|kv| put_event(kv, None)).collect();
    assert_eq!(events, expected);
}
