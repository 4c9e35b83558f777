//! Behaviour specific to the embedded backend: lagging watchers, history
//! retention, group commit, throughput, closing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use krvirt_store::embedded::{EmbeddedOptions, EmbeddedStore};
use krvirt_store::{EventKind, Store, StoreError, WatchStream};

fn open(dir: &tempfile::TempDir, options: EmbeddedOptions) -> EmbeddedStore {
    EmbeddedStore::open_with(&dir.path().join("store.db"), options).expect("open store")
}

async fn next_item(w: &mut WatchStream) -> Option<Result<krvirt_store::WatchEvent, StoreError>> {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("watch item within 10 s")
}

/// A watcher that does not read while more than `watch_buffer` events are
/// published gets one final `WatchLagged`; resuming from its `resume_from`
/// replays the missed events from history with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_watcher_gets_watch_lagged_then_resumes_without_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(
        &dir,
        EmbeddedOptions {
            watch_buffer: 8,
            ..EmbeddedOptions::default()
        },
    );
    let first = store
        .create("/lag/first", b"x".to_vec(), None)
        .await
        .expect("create");
    let mut w = store.watch("/lag/", 0).await.expect("watch");
    for i in 0..100 {
        store
            .create(&format!("/lag/{i:03}"), b"x".to_vec(), None)
            .await
            .expect("create");
    }
    let mut seen = Vec::new();
    let resume_from = loop {
        match next_item(&mut w).await {
            Some(Ok(ev)) => seen.push(ev),
            Some(Err(StoreError::WatchLagged { resume_from })) => break resume_from,
            other => panic!("expected events then WatchLagged, got {other:?}"),
        }
    };
    assert!(next_item(&mut w).await.is_none(), "stream ends after lag");
    assert!(seen.len() < 100, "the watcher must have lost events");
    let expected_resume = seen
        .last()
        .map_or(first.mod_revision + 1, |e| e.revision() + 1);
    assert_eq!(resume_from, expected_resume);
    let mut w2 = store.watch("/lag/", resume_from).await.expect("resume");
    while seen.len() < 100 {
        match next_item(&mut w2).await {
            Some(Ok(ev)) => seen.push(ev),
            other => panic!("resumed watch failed: {other:?}"),
        }
    }
    for (i, ev) in seen.iter().enumerate() {
        assert_eq!(ev.revision(), first.mod_revision + 1 + i as i64);
        assert_eq!(ev.kv.key, format!("/lag/{i:03}"));
    }
}

/// A long replay does not make the watcher lag: history is paged and the
/// live subscription is renewed per page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_replay_with_small_buffer_does_not_lag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(
        &dir,
        EmbeddedOptions {
            watch_buffer: 4,
            ..EmbeddedOptions::default()
        },
    ));
    for i in 0..2000 {
        store
            .create(&format!("/rp/{i:04}"), b"x".to_vec(), None)
            .await
            .expect("create");
    }
    let mut w = store.watch("/rp/", 1).await.expect("watch");
    // Keep writing while the watcher replays (slowly) and after it has
    // caught up, so both the replay and the live phase see concurrent writes.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut i = 2000;
            while !stop.load(Ordering::Relaxed) {
                store
                    .create(&format!("/rp/{i:04}"), b"x".to_vec(), None)
                    .await
                    .expect("create");
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    for expected in 1..=2000i64 {
        match next_item(&mut w).await {
            Some(Ok(ev)) => assert_eq!(ev.revision(), expected),
            other => panic!("at revision {expected}: {other:?}"),
        }
        if expected % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    // Now read well past everything written during the replay.
    let caught_up_to = store.revision().await.expect("revision");
    assert!(caught_up_to > 2010, "writes happened during the replay");
    for expected in 2001..=caught_up_to + 20 {
        match next_item(&mut w).await {
            Some(Ok(ev)) => assert_eq!(ev.revision(), expected),
            other => panic!("at revision {expected}: {other:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
}

/// Only the last `history_events` events are kept; older starts are
/// `Compacted` and the retained tail replays in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_trimmed_to_history_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(
        &dir,
        EmbeddedOptions {
            history_events: 5,
            ..EmbeddedOptions::default()
        },
    );
    for i in 0..20 {
        store
            .create(&format!("/h/{i:02}"), b"x".to_vec(), None)
            .await
            .expect("create");
    }
    match store.watch("/h/", 15).await {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!(requested, 15);
            assert_eq!(oldest, 16);
        }
        Err(e) => panic!("expected Compacted, got {e:?}"),
        Ok(_) => panic!("expected Compacted, got a stream"),
    }
    let mut w = store.watch("/h/", 16).await.expect("watch retained tail");
    for rev in 16..=20 {
        let ev = next_item(&mut w).await.expect("item").expect("event");
        assert_eq!(ev.revision(), rev);
        assert_eq!(ev.kind, EventKind::Put);
    }
    let (items, _) = store.list("/h/").await.expect("list");
    assert_eq!(items.len(), 20, "trimming history keeps keys");
}

/// Concurrent writers are committed in shared transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(&dir, EmbeddedOptions::default()));
    let mut tasks = Vec::new();
    for t in 0..64 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                store
                    .create(&format!("/g/{t}/{i}"), b"x".to_vec(), None)
                    .await
                    .expect("create");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let stats = store.writer_stats();
    assert_eq!(stats.requests, 64 * 20);
    assert!(
        stats.commits * 4 <= stats.requests,
        "expected group commit (several writes per commit), got {stats:?}"
    );
}

async fn measure_creates_per_sec(store: Arc<EmbeddedStore>, writers: usize, secs: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let round = store.revision().await.expect("revision");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, stop, done) = (Arc::clone(&store), Arc::clone(&stop), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                store
                    .create(&format!("/tp/{round}/{w}/{i}"), vec![b'x'; 512], None)
                    .await
                    .expect("create");
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("writer");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// The throughput target: at least 5,000 acknowledged (fsynced) creates per
/// second with 64 concurrent writers (best of three 2-second rounds, so a
/// burst of load from elsewhere on the machine does not decide the result).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_64_writers_at_least_5000_creates_per_sec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(&dir, EmbeddedOptions::default()));
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let rate = measure_creates_per_sec(Arc::clone(&store), 64, 2.0).await;
        eprintln!("64 writers: {rate:.0} acknowledged creates/s");
        best = best.max(rate);
        if best >= 5000.0 {
            break;
        }
    }
    assert!(best >= 5000.0, "best rate {best:.0} creates/s < 5000");
}

/// Closing stops the writer: queued and later requests fail with `Closed`
/// (never hang), watches end with `Closed`, every acknowledged write is on
/// disk, and the file can be opened again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_stops_writer_and_everything_acknowledged_persists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(&dir, EmbeddedOptions::default()));
    let mut w = store.watch("/cl/", 0).await.expect("watch");
    // A live consumer drains the watch while the writers run (a watcher
    // left undrained would lag once the writes outgrow its buffer).
    let drain = tokio::spawn(async move {
        let mut last = None;
        while let Some(item) = next_item(&mut w).await {
            last = Some(item);
        }
        last
    });
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0.. {
                let key = format!("/cl/{t}/{i}");
                match store.create(&key, key.clone().into_bytes(), None).await {
                    Ok(kv) => acked.push(kv),
                    Err(StoreError::Closed) => return acked,
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let closer = {
        let store = Arc::clone(&store);
        tokio::task::spawn_blocking(move || store.close())
    };
    tokio::time::timeout(Duration::from_secs(10), closer)
        .await
        .expect("close returns promptly")
        .expect("close task");
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("writer stops after close")
                .expect("writer task"),
        );
    }
    assert!(!acked.is_empty());
    assert!(matches!(
        store.get("/cl/0/0").await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(store.list("/").await, Err(StoreError::Closed)));
    assert!(matches!(store.revision().await, Err(StoreError::Closed)));
    assert!(matches!(
        store.watch("/", 0).await.err(),
        Some(StoreError::Closed)
    ));
    assert!(matches!(
        store.lease_grant(5).await,
        Err(StoreError::Closed)
    ));
    // The live watch drains what it received, then ends with Closed.
    let last = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("watch ends after close")
        .expect("drain task");
    assert!(
        matches!(last, Some(Err(StoreError::Closed))),
        "watch ends with Closed, got {last:?}"
    );

    let reopened = open(&dir, EmbeddedOptions::default());
    let max_rev = acked.iter().map(|kv| kv.mod_revision).max().unwrap_or(0);
    assert!(reopened.revision().await.expect("revision") >= max_rev);
    for kv in &acked {
        assert_eq!(
            reopened.get(&kv.key).await.expect("get").as_ref(),
            Some(kv),
            "acknowledged write lost"
        );
    }
}

/// A store file can only be open once at a time; dropping releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_open_fails_while_open_and_drop_releases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.db");
    let first = EmbeddedStore::open(&path).expect("first open");
    first
        .create("/o/a", b"a".to_vec(), None)
        .await
        .expect("create");
    match EmbeddedStore::open(&path) {
        Err(StoreError::Backend(msg)) => assert!(msg.contains("already open"), "{msg}"),
        Err(e) => panic!("expected Backend(already open), got {e:?}"),
        Ok(_) => panic!("second open of the same file must fail"),
    }
    drop(first);
    let again = EmbeddedStore::open(&path).expect("open after drop");
    assert_eq!(
        again.get("/o/a").await.expect("get").map(|kv| kv.value),
        Some(b"a".to_vec())
    );
}

/// Opening creates missing parent directories.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_creates_parent_directories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a/b/c/store.db");
    let store = EmbeddedStore::open(&path).expect("open");
    store
        .create("/k", b"v".to_vec(), None)
        .await
        .expect("create");
    assert!(path.exists());
    assert_eq!(store.path(), path.as_path());
}
