//! The etcd backend against member loss and restarts (real etcd processes):
//! writes keep being acknowledged and readable, and one watch stream sees
//! every event exactly once, in order, across the breaks.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use krvirt_store::etcd::EtcdStore;
use krvirt_store::etcd::testing::EtcdCluster;
use krvirt_store::{EventKind, KeyValue, Revision, Store, StoreError, WatchStream};

/// Create `key`, retrying while the cluster is switching members. A
/// create that reports `AlreadyExists` after a failed attempt had landed.
async fn create_retrying(store: &EtcdStore, key: &str) -> KeyValue {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failed_once = false;
    loop {
        match store.create(key, key.as_bytes().to_vec(), None).await {
            Ok(kv) => return kv,
            Err(StoreError::AlreadyExists(_)) if failed_once => {
                return store
                    .get(key)
                    .await
                    .expect("get after ambiguous create")
                    .expect("the create landed");
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "create {key} still failing after 30 s: {e}"
                );
                failed_once = true;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn start(n: usize) -> EtcdCluster {
    tokio::task::spawn_blocking(move || EtcdCluster::start(n))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("cannot start etcd: {e}"))
}

/// Collect Put events until every key in `want` has been seen; fail on a
/// duplicate, an out-of-order revision or a stray key.
async fn expect_events(w: &mut WatchStream, want: &BTreeSet<String>, last: &mut Revision) {
    let mut seen = BTreeSet::new();
    while seen.len() < want.len() {
        let ev = match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
            Ok(Some(Ok(ev))) => ev,
            other => panic!(
                "watch: expected more events ({} of {} seen), got {other:?}",
                seen.len(),
                want.len()
            ),
        };
        assert_eq!(ev.kind, EventKind::Put);
        assert!(
            ev.revision() > *last,
            "revision {} after {}: duplicate or reordered",
            ev.revision(),
            *last
        );
        *last = ev.revision();
        assert!(want.contains(&ev.kv.key), "unexpected key {}", ev.kv.key);
        assert!(seen.insert(ev.kv.key.clone()), "{} seen twice", ev.kv.key);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_lose_any_one_and_keep_writes_and_watches() {
    let mut cluster = start(3).await;
    let store = EtcdStore::connect(&cluster.endpoints())
        .await
        .expect("connect");
    let mut w = store.watch("/ha/", 0).await.expect("watch");
    let mut last = 0;
    let mut acked = Vec::new();
    for round in 0..4 {
        // Rounds 1..=3 run with member round-1 down: whichever member the
        // client was talking to dies at some point.
        if round > 0 {
            cluster.kill(round - 1);
        }
        let mut want = BTreeSet::new();
        for i in 0..15 {
            let key = format!("/ha/{round}/{i:02}");
            acked.push(create_retrying(&store, &key).await);
            want.insert(key);
        }
        expect_events(&mut w, &want, &mut last).await;
        if round > 0 {
            tokio::task::block_in_place(|| cluster.restart(round - 1))
                .unwrap_or_else(|e| panic!("restart member: {e}"));
        }
    }
    // Every acknowledged write is there, as acknowledged.
    let (items, _) = store.list("/ha/").await.expect("list");
    assert_eq!(items, {
        let mut a = acked.clone();
        a.sort_by(|x, y| x.key.cmp(&y.key));
        a
    });
    // A client that only knows one dead and one live member still works.
    let eps = cluster.endpoints();
    cluster.kill(0);
    let narrow = EtcdStore::connect(&[eps[0].clone(), eps[1].clone()])
        .await
        .expect("connect with one dead endpoint");
    let kv = create_retrying(&narrow, "/ha/narrow").await;
    assert_eq!(store.get("/ha/narrow").await.expect("get"), Some(kv));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_etcd_restart_without_loss_or_duplicates() {
    let mut cluster = start(1).await;
    let store = EtcdStore::connect(&cluster.endpoints())
        .await
        .expect("connect");
    let mut before = BTreeSet::new();
    for i in 0..10 {
        let key = format!("/rs/a{i}");
        create_retrying(&store, &key).await;
        before.insert(key);
    }
    // One watch from the start of history, one live.
    let mut from_start = store.watch("/rs/", 1).await.expect("watch");
    let mut live = store.watch("/rs/", 0).await.expect("watch");
    let mut last = 0;
    expect_events(&mut from_start, &before, &mut last).await;

    cluster.kill(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| cluster.restart(0))
        .unwrap_or_else(|e| panic!("restart etcd: {e}"));

    let mut after = BTreeSet::new();
    for i in 0..10 {
        let key = format!("/rs/b{i}");
        create_retrying(&store, &key).await;
        after.insert(key);
    }
    expect_events(&mut from_start, &after, &mut last).await;
    let mut live_last = 0;
    expect_events(&mut live, &after, &mut live_last).await;
    // Nothing more.
    for w in [&mut from_start, &mut live] {
        if let Ok(ev) = tokio::time::timeout(Duration::from_millis(500), w.next()).await {
            panic!("unexpected extra event {ev:?}");
        }
    }
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_under_a_broken_watch_ends_it_with_compacted() {
    let mut cluster = start(1).await;
    let store = EtcdStore::connect(&cluster.endpoints())
        .await
        .expect("connect");
    let first = create_retrying(&store, "/cp/0").await;
    let mut w = store
        .watch("/cp/", first.mod_revision)
        .await
        .expect("watch");
    let ev = w.next().await.expect("event").expect("ok");
    assert_eq!(ev.kv, first);
    // Writes the watcher will miss while etcd is down... then compacted
    // away before it can resume.
    cluster.kill(0);
    // The same data dir: restart, then another client writes and compacts
    // at once.
    tokio::task::block_in_place(|| cluster.restart(0)).unwrap_or_else(|e| panic!("restart: {e}"));
    let writer = EtcdStore::connect(&cluster.endpoints())
        .await
        .expect("connect");
    let mut kv = create_retrying(&writer, "/cp/1").await;
    for i in 0..5 {
        kv = writer
            .update("/cp/1", format!("{i}").into_bytes(), kv.mod_revision, None)
            .await
            .expect("update");
    }
    writer.compact(kv.mod_revision).await.expect("compact");
    // The resumed watch either catches up before the compaction (all
    // events) or is told Compacted with the oldest revision; never a gap.
    let mut revs = vec![first.mod_revision];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
            Ok(Some(Ok(ev))) => {
                assert_eq!(ev.revision(), revs.last().copied().unwrap_or(0) + 1, "gap");
                revs.push(ev.revision());
                if ev.revision() == kv.mod_revision {
                    break;
                }
            }
            Ok(Some(Err(StoreError::Compacted { oldest, .. }))) => {
                assert_eq!(oldest, kv.mod_revision);
                assert!(w.next().await.is_none(), "stream ends after Compacted");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A new watch from before the compaction fails at once.
    match writer.watch("/cp/", first.mod_revision).await {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!(requested, first.mod_revision);
            assert_eq!(oldest, kv.mod_revision);
        }
        Err(e) => panic!("expected Compacted, got {e}"),
        Ok(_) => panic!("expected Compacted, got a stream"),
    }
}

/// A list bigger than gRPC's default 4 MiB message limit (found by
/// `bench/api --store etcd`: a watch's initial list of ~5000 VMs failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_larger_than_four_mebibytes_is_read_whole() {
    let cluster = start(1).await;
    let store = std::sync::Arc::new(EtcdStore::connect(&cluster.endpoints()).await.unwrap());
    let value = vec![b'v'; 100 * 1024];
    let n = 60; // 6 MiB
    let mut tasks = Vec::new();
    for i in 0..n {
        let (store, value) = (store.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            store
                .create(&format!("/big/{i:03}"), value, None)
                .await
                .expect("create")
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (items, _) = store.list("/big/").await.expect("list of 6 MiB");
    assert_eq!(items.len(), n);
    assert!(items.iter().all(|kv| kv.value.len() == 100 * 1024));
}
