//! Watch streams over real HTTP: initial state, resume, selectors, 410.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use krvirt_server::{EventType, Selector};
use krvirt_store::Store;
use serde_json::{Value, json};

fn labeled(name: &str, labels: Value) -> Value {
    let mut m = vm_manifest(name, json!({}));
    m["metadata"]["labels"] = labels;
    m
}

#[tokio::test]
async fn watch_without_version_sends_existing_then_live() {
    let s = TestServer::start().await;
    s.create(&s.vms("default"), &vm_manifest("a", json!({})))
        .await;
    s.create(&s.vms("default"), &vm_manifest("b", json!({})))
        .await;
    s.create(&s.vms("other"), &vm_manifest("elsewhere", json!({})))
        .await;

    for url in [
        format!("{}?watch=true", s.vms("default")),
        format!("{}?watch=true&resourceVersion=0", s.vms("default")),
    ] {
        let mut w = WatchReader::open(&s.client, &url).await;
        assert_eq!(ev(&w.next().await), ("ADDED".into(), "a".into()));
        assert_eq!(ev(&w.next().await), ("ADDED".into(), "b".into()));
        assert!(w.next_within(Duration::from_millis(200)).await.is_none());
        drop(w);
    }

    let mut w = WatchReader::open(&s.client, &format!("{}?watch=1", s.vms("default"))).await;
    w.next().await;
    w.next().await;
    let c = s
        .create(&s.vms("default"), &vm_manifest("c", json!({})))
        .await;
    let e = w.next().await;
    assert_eq!(ev(&e), ("ADDED".into(), "c".into()));
    assert_eq!(e["object"], c);
    let (_, a2) = s
        .merge_patch(
            &s.vm("default", "a"),
            &json!({"spec": {"runStrategy": "Manual"}}),
        )
        .await;
    let e = w.next().await;
    assert_eq!(ev(&e), ("MODIFIED".into(), "a".into()));
    assert_eq!(e["object"], a2);
    let (code, b) = s.delete(&s.vm("default", "b")).await;
    assert_eq!(code, 200);
    let e = w.next().await;
    assert_eq!(ev(&e), ("DELETED".into(), "b".into()));
    assert!(rv(&e["object"]).parse::<i64>().unwrap() > rv(&b).parse::<i64>().unwrap());
    // another namespace is not in this watch
    s.create(&s.vms("other"), &vm_manifest("x", json!({})))
        .await;
    assert!(w.next_within(Duration::from_millis(200)).await.is_none());

    // the all-namespaces watch sees both
    let mut all = WatchReader::open(
        &s.client,
        &s.url("/apis/kubevirt.io/v1/virtualmachines?watch=true"),
    )
    .await;
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(ev(&all.next().await).1);
    }
    names.sort();
    assert_eq!(names, ["a", "c", "elsewhere", "x"]);
}

#[tokio::test]
async fn resume_from_resource_version_has_no_gaps_or_duplicates() {
    let s = TestServer::start().await;
    // (an empty store lists at version "0", which means "current state" to a watch)
    s.create(&s.vms("other"), &vm_manifest("unrelated", json!({})))
        .await;
    let (_, list) = s.get(&s.vms("default")).await;
    let start_rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    // ten changes of mixed kinds
    s.create(&s.vms("default"), &vm_manifest("r1", json!({})))
        .await;
    s.create(&s.vms("default"), &vm_manifest("r2", json!({})))
        .await;
    for i in 0..4 {
        let rs = if i % 2 == 0 { "Manual" } else { "Halted" };
        s.merge_patch(
            &s.vm("default", "r1"),
            &json!({"spec": {"runStrategy": rs}}),
        )
        .await;
    }
    s.merge_patch(
        &format!("{}/status", s.vm("default", "r2")),
        &json!({"status": {"ready": false}}),
    )
    .await;
    s.delete(&s.vm("default", "r2")).await;
    s.create(&s.vms("default"), &vm_manifest("r3", json!({})))
        .await;
    s.create(&s.vms("default"), &vm_manifest("r2", json!({})))
        .await;

    let mut w = WatchReader::open(
        &s.client,
        &format!("{}?watch=true&resourceVersion={start_rv}", s.vms("default")),
    )
    .await;
    let mut all = Vec::new();
    for _ in 0..10 {
        all.push(w.next().await);
    }
    assert!(
        w.next_within(Duration::from_millis(200)).await.is_none(),
        "no more than ten events"
    );
    let types: Vec<(String, String)> = all.iter().map(ev).collect();
    let expected: Vec<(String, String)> = [
        ("ADDED", "r1"),
        ("ADDED", "r2"),
        ("MODIFIED", "r1"),
        ("MODIFIED", "r1"),
        ("MODIFIED", "r1"),
        ("MODIFIED", "r1"),
        ("MODIFIED", "r2"),
        ("DELETED", "r2"),
        ("ADDED", "r3"),
        ("ADDED", "r2"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(types, expected);
    let rvs: Vec<i64> = all
        .iter()
        .map(|e| rv(&e["object"]).parse().unwrap())
        .collect();
    assert!(rvs.windows(2).all(|w| w[0] < w[1]), "{rvs:?}");

    // resume after each event: exactly the rest, in order
    for k in 0..all.len() {
        let from = rv(&all[k]["object"]);
        let mut w = WatchReader::open(
            &s.client,
            &format!("{}?watch=true&resourceVersion={from}", s.vms("default")),
        )
        .await;
        for expected in &all[k + 1..] {
            let got = w.next().await;
            assert_eq!(&got, expected, "resume after {from}");
        }
        assert!(w.next_within(Duration::from_millis(100)).await.is_none());
    }

    // live events continue after the replay
    let mut w = WatchReader::open(
        &s.client,
        &format!(
            "{}?watch=true&resourceVersion={}",
            s.vms("default"),
            rv(&all[9]["object"])
        ),
    )
    .await;
    s.create(&s.vms("default"), &vm_manifest("r4", json!({})))
        .await;
    assert_eq!(ev(&w.next().await), ("ADDED".into(), "r4".into()));
}

#[tokio::test]
async fn label_selector_watch_reports_objects_entering_and_leaving() {
    let s = TestServer::start().await;
    s.create(&s.vms("default"), &labeled("pre", json!({"app": "web"})))
        .await;
    s.create(&s.vms("default"), &labeled("pre-db", json!({"app": "db"})))
        .await;
    let mut w = WatchReader::open(
        &s.client,
        &format!("{}?watch=true&labelSelector=app%3Dweb", s.vms("default")),
    )
    .await;
    assert_eq!(ev(&w.next().await), ("ADDED".into(), "pre".into()));

    s.create(&s.vms("default"), &labeled("m", json!({"app": "web"})))
        .await;
    assert_eq!(ev(&w.next().await), ("ADDED".into(), "m".into()));
    s.create(&s.vms("default"), &labeled("n", json!({"app": "db"})))
        .await;
    // n changes but does not match: nothing
    s.merge_patch(
        &s.vm("default", "n"),
        &json!({"spec": {"runStrategy": "Manual"}}),
    )
    .await;
    // n starts matching: ADDED
    s.merge_patch(
        &s.vm("default", "n"),
        &json!({"metadata": {"labels": {"app": "web"}}}),
    )
    .await;
    let e = w.next().await;
    assert_eq!(ev(&e), ("ADDED".into(), "n".into()));
    assert_eq!(e["object"]["spec"]["runStrategy"], "Manual");
    // m changes while matching: MODIFIED
    s.merge_patch(
        &s.vm("default", "m"),
        &json!({"spec": {"runStrategy": "Always"}}),
    )
    .await;
    assert_eq!(ev(&w.next().await), ("MODIFIED".into(), "m".into()));
    // m stops matching: DELETED carrying the new state
    s.merge_patch(
        &s.vm("default", "m"),
        &json!({"metadata": {"labels": {"app": "gone"}}}),
    )
    .await;
    let e = w.next().await;
    assert_eq!(ev(&e), ("DELETED".into(), "m".into()));
    assert_eq!(e["object"]["metadata"]["labels"]["app"], "gone");
    // deleting a non-matching object: nothing; a matching one: DELETED
    s.delete(&s.vm("default", "m")).await;
    s.delete(&s.vm("default", "n")).await;
    assert_eq!(ev(&w.next().await), ("DELETED".into(), "n".into()));
    // sentinel proves nothing else was queued
    s.create(
        &s.vms("default"),
        &labeled("sentinel", json!({"app": "web"})),
    )
    .await;
    assert_eq!(ev(&w.next().await), ("ADDED".into(), "sentinel".into()));

    // set-based selector and field selector on the watch
    let mut w = WatchReader::open(
        &s.client,
        &format!(
            "{}?watch=true&labelSelector=app%20in%20(db)&fieldSelector=metadata.name%3Dpre-db",
            s.vms("default")
        ),
    )
    .await;
    assert_eq!(ev(&w.next().await), ("ADDED".into(), "pre-db".into()));
    assert!(w.next_within(Duration::from_millis(200)).await.is_none());
}

#[tokio::test]
async fn node_name_field_selector_watch() {
    let s = TestServer::start().await;
    let all_vmis = s.url("/apis/kubevirt.io/v1/virtualmachineinstances");
    let mut w = WatchReader::open(
        &s.client,
        &format!("{all_vmis}?watch=true&fieldSelector=status.nodeName%3Dhost-a"),
    )
    .await;
    s.create(&s.vmis("default"), &vmi_manifest("v1")).await;
    s.create(&s.vmis("default"), &vmi_manifest("v2")).await;
    // scheduled onto host-a: enters the selection
    s.merge_patch(
        &format!("{}/status", s.vmi("default", "v1")),
        &json!({"status": {"nodeName": "host-a", "phase": "Scheduled"}}),
    )
    .await;
    s.merge_patch(
        &format!("{}/status", s.vmi("default", "v2")),
        &json!({"status": {"nodeName": "host-b"}}),
    )
    .await;
    let e = w.next().await;
    assert_eq!(ev(&e), ("ADDED".into(), "v1".into()));
    assert_eq!(e["object"]["status"]["phase"], "Scheduled");
    s.merge_patch(
        &format!("{}/status", s.vmi("default", "v1")),
        &json!({"status": {"phase": "Running"}}),
    )
    .await;
    assert_eq!(ev(&w.next().await), ("MODIFIED".into(), "v1".into()));
    assert!(w.next_within(Duration::from_millis(200)).await.is_none());
}

#[tokio::test]
async fn compacted_resume_is_an_error_event_with_410() {
    let s = TestServer::start().await;
    let first = s
        .create(&s.vms("default"), &vm_manifest("old", json!({})))
        .await;
    for i in 0..5 {
        s.merge_patch(
            &s.vm("default", "old"),
            &json!({"metadata": {"labels": {"i": i.to_string()}}}),
        )
        .await;
    }
    let current = s.store.revision().await.unwrap();
    s.store.compact(current).await.unwrap();

    let mut w = WatchReader::open(
        &s.client,
        &format!(
            "{}?watch=true&resourceVersion={}",
            s.vms("default"),
            rv(&first)
        ),
    )
    .await;
    let e = w.next().await;
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["object"]["kind"], "Status");
    assert_eq!(e["object"]["code"], 410);
    assert_eq!(e["object"]["reason"], "Expired");
    assert!(
        e["object"]["message"]
            .as_str()
            .unwrap()
            .contains("too old resource version")
    );
    assert!(
        w.ends_within(Duration::from_secs(2)).await,
        "stream must end after the ERROR event"
    );

    // a relist and a watch from its version works
    let (_, list) = s.get(&s.vms("default")).await;
    let mut w = WatchReader::open(
        &s.client,
        &format!(
            "{}?watch=true&resourceVersion={}",
            s.vms("default"),
            list["metadata"]["resourceVersion"].as_str().unwrap()
        ),
    )
    .await;
    s.delete(&s.vm("default", "old")).await;
    assert_eq!(ev(&w.next().await), ("DELETED".into(), "old".into()));

    // a malformed resourceVersion is a plain 400
    let (code, st) = s
        .get(&format!(
            "{}?watch=true&resourceVersion=abc",
            s.vms("default")
        ))
        .await;
    assert_eq!(code, 400);
    assert_eq!(st["reason"], "BadRequest");
}

#[tokio::test]
async fn timeout_seconds_ends_the_stream() {
    let s = TestServer::start().await;
    let mut w = WatchReader::open(
        &s.client,
        &format!("{}?watch=true&timeoutSeconds=1", s.vms("default")),
    )
    .await;
    let t = std::time::Instant::now();
    assert!(w.ends_within(Duration::from_secs(5)).await);
    assert!(t.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn registry_watch_for_controllers() {
    let s = TestServer::start().await;
    let reg = &s.registry;
    reg.create(vm_kind(), "default", labeled("one", json!({"app": "web"})))
        .await
        .unwrap();
    let (items, list_rv) = reg
        .list(vm_kind(), Some("default"), &Selector::everything())
        .await
        .unwrap();
    assert_eq!(items.len(), 1);

    let mut from_zero = reg
        .watch(
            vm_kind(),
            Some("default"),
            Selector::labels("app=web").unwrap(),
            None,
        )
        .await
        .unwrap();
    let mut resumed = reg
        .watch(vm_kind(), None, Selector::everything(), Some(&list_rv))
        .await
        .unwrap();
    let e = from_zero.next().await.unwrap().unwrap();
    assert_eq!(e.event_type, EventType::Added);
    assert_eq!(e.object["metadata"]["name"], "one");

    reg.create(vm_kind(), "default", labeled("two", json!({"app": "db"})))
        .await
        .unwrap();
    let e = resumed.next().await.unwrap().unwrap();
    assert_eq!(
        (e.event_type, e.object["metadata"]["name"].as_str().unwrap()),
        (EventType::Added, "two")
    );
    let d = reg
        .delete(vm_kind(), "default", "one", &Default::default())
        .await
        .unwrap();
    assert!(d.deleted);
    let e = from_zero.next().await.unwrap().unwrap();
    assert_eq!(e.event_type, EventType::Deleted);
    assert_eq!(e.object["metadata"]["name"], "one");
    let e = resumed.next().await.unwrap().unwrap();
    assert_eq!(e.event_type, EventType::Deleted);
    assert!(e.resource_version().parse::<i64>().unwrap() > list_rv.parse::<i64>().unwrap());
}

#[tokio::test]
async fn slow_watchers_resume_transparently_after_lagging() {
    use krvirt_store::embedded::{EmbeddedOptions, EmbeddedStore};
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(
        EmbeddedStore::open_with(
            &dir.path().join("s.db"),
            EmbeddedOptions {
                watch_buffer: 2,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let reg = krvirt_server::Registry::with_kinds(store.clone(), KINDS, admit);
    reg.create(vm_kind(), "default", vm_manifest("seed", json!({})))
        .await
        .unwrap();
    let (_, list_rv) = reg
        .list(vm_kind(), None, &Selector::everything())
        .await
        .unwrap();
    let mut w = reg
        .watch(vm_kind(), None, Selector::everything(), Some(&list_rv))
        .await
        .unwrap();
    // a raw store watch under the same conditions, to prove the lag happens
    let mut raw = store
        .watch("/registry/", list_rv.parse::<i64>().unwrap() + 1)
        .await
        .unwrap();
    // 60 writes while the watcher does not read: its buffer of 2 overflows
    for i in 0..30 {
        reg.create(
            vm_kind(),
            "default",
            vm_manifest(&format!("v{i}"), json!({})),
        )
        .await
        .unwrap();
        reg.merge_patch(
            vm_kind(),
            "default",
            &format!("v{i}"),
            &json!({"metadata": {"labels": {"n": i.to_string()}}}),
            krvirt_server::Subresource::Main,
        )
        .await
        .unwrap();
    }
    let mut lagged = false;
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_secs(2), raw.next()).await {
        if matches!(item, Err(krvirt_store::StoreError::WatchLagged { .. })) {
            lagged = true;
            break;
        }
    }
    assert!(
        lagged,
        "the store watch should have lagged with a buffer of 2"
    );
    let mut last: i64 = list_rv.parse().unwrap();
    for i in 0..60 {
        let e = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("event within 5s")
            .expect("stream open")
            .expect("no error: lagging is resumed inside the registry");
        let r: i64 = e.resource_version().parse().unwrap();
        assert_eq!(r, last + 1, "event {i}: no gaps, no duplicates");
        last = r;
        let want = if i % 2 == 0 {
            EventType::Added
        } else {
            EventType::Modified
        };
        assert_eq!(e.event_type, want);
    }
}
