//! Durability of the embedded store: acknowledged writes survive `kill -9`,
//! and reopening keeps revisions, watch history and leases.
//!
//! The SIGKILL test re-executes this test binary in child mode (the ignored
//! test `durability_child_writer`, selected with `--exact --ignored`); the
//! child prints a line per acknowledged write and the parent kills it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use krvirt_store::embedded::{EmbeddedOptions, EmbeddedStore};
use krvirt_store::{EventKind, Revision, Store, StoreError, WatchEvent, WatchStream};

const CHILD_ENV: &str = "KRVIRT_STORE_DURABILITY_CHILD_DB";
const CHILD_TEST: &str = "durability_child_writer";

/// Kills and reaps the child on every exit path.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn collect(w: &mut WatchStream, n: usize) -> Vec<WatchEvent> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(Some(Ok(ev))) => out.push(ev),
            other => panic!("expected {n} events, got {} then {other:?}", out.len()),
        }
    }
    out
}

/// Child mode only: writes as fast as it can from several tasks and prints
/// `ACK <key> <mod_revision> <value> END` after each acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of acknowledged_writes_survive_sigkill; run only by it"]
async fn durability_child_writer() {
    let db = std::env::var_os(CHILD_ENV).unwrap_or_else(|| {
        panic!("{CHILD_TEST} is the child of acknowledged_writes_survive_sigkill; {CHILD_ENV} must name the store file")
    });
    let store = Arc::new(EmbeddedStore::open(Path::new(&db)).expect("child: open store"));
    let lease = store.lease_grant(3).await.expect("child: grant lease");
    let leased = store
        .create("/dur/leased", b"leased".to_vec(), Some(lease))
        .await
        .expect("child: create leased key");
    println!("LEASE {lease} {} END", leased.mod_revision);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let key = format!("/dur/{t:02}/{i:08}");
                let value = format!("v{t}.{i}");
                let kv = store
                    .create(&key, value.clone().into_bytes(), None)
                    .await
                    .expect("child: create");
                println!("ACK {key} {} {value} END", kv.mod_revision);
                if i % 4 == 0 {
                    let value = format!("u{t}.{i}");
                    let kv = store
                        .update(&key, value.clone().into_bytes(), kv.mod_revision, None)
                        .await
                        .expect("child: update");
                    println!("ACK {key} {} {value} END", kv.mod_revision);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("child: writer task");
    }
}

struct Acked {
    /// key -> (mod_revision, value) of the last acknowledged write.
    last: HashMap<String, (Revision, String)>,
    /// Every acknowledged (revision, key, value).
    all: Vec<(Revision, String, String)>,
    lease: Option<(i64, Revision)>,
}

fn parse_line(line: &str, acked: &mut Acked) {
    // libtest prints "test NAME ... " without a newline before the test's
    // own output, so a record may start mid-line.
    let start = ["ACK ", "LEASE "].iter().filter_map(|m| line.find(m)).min();
    let Some(start) = start else { return };
    let fields: Vec<&str> = line[start..].split(' ').collect();
    match fields.as_slice() {
        ["ACK", key, rev, value, "END"] => {
            let rev: Revision = rev.parse().expect("revision in ACK line");
            acked.all.push((rev, key.to_string(), value.to_string()));
            let entry = acked
                .last
                .entry(key.to_string())
                .or_insert((rev, value.to_string()));
            if rev >= entry.0 {
                *entry = (rev, value.to_string());
            }
        }
        ["LEASE", id, rev, "END"] => {
            acked.lease = Some((
                id.parse().expect("lease id"),
                rev.parse().expect("lease key revision"),
            ));
        }
        _ => {} // test harness chatter
    }
}

fn spawn_child(db: &Path) -> ChildGuard {
    let exe = std::env::current_exe().expect("current test binary");
    let child = Command::new(exe)
        .args(["--exact", CHILD_TEST, "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, db)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child test process");
    ChildGuard(child)
}

/// Every write the child saw acknowledged before SIGKILL is in the store
/// after reopening, with its value and revision; the store carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db: PathBuf = dir.path().join("store.db");
    let mut child = spawn_child(&db);
    let stdout = child.0.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    let mut acked = Acked {
        last: HashMap::new(),
        all: Vec::new(),
        lease: None,
    };
    // Wait for the first acknowledgement (the child has to start), then let
    // it write for a while and kill it mid-flight.
    let first_deadline = Instant::now() + Duration::from_secs(60);
    while acked.all.is_empty() {
        let left = first_deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => parse_line(&line, &mut acked),
            Err(e) => panic!("child produced no acknowledged write: {e}"),
        }
    }
    let kill_at = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < kill_at {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(50)) {
            parse_line(&line, &mut acked);
        }
    }
    child.0.kill().expect("SIGKILL child");
    let status = child.0.wait().expect("reap child");
    assert!(!status.success(), "child must have been killed: {status}");
    // Lines printed before death are still in the pipe.
    for line in rx.iter() {
        parse_line(&line, &mut acked);
    }
    reader.join().expect("reader thread");
    assert!(
        acked.all.len() > 200,
        "child acknowledged only {} writes",
        acked.all.len()
    );
    let (lease, lease_key_rev) = acked.lease.expect("child reported its lease");

    let reopened_at = Instant::now();
    let store = EmbeddedStore::open(&db).expect("reopen after SIGKILL");
    let max_acked = acked.all.iter().map(|a| a.0).max().unwrap_or(0);
    let rev = store.revision().await.expect("revision");
    assert!(
        rev >= max_acked,
        "store revision {rev} < acknowledged {max_acked}"
    );
    for (key, (mod_rev, value)) in &acked.last {
        let kv = store
            .get(key)
            .await
            .expect("get")
            .unwrap_or_else(|| panic!("acknowledged key {key} lost"));
        // An unacknowledged later write to the same key may have landed;
        // only the child's own writes touch these keys, and an update is
        // only sent after the create was acknowledged.
        if kv.mod_revision == *mod_rev {
            assert_eq!(kv.value, value.as_bytes(), "value of {key}");
        } else {
            assert!(
                kv.mod_revision > *mod_rev,
                "{key}: revision went back from {mod_rev} to {}",
                kv.mod_revision
            );
            assert!(
                value.starts_with('v'),
                "{key}: only a create can be followed by an unacknowledged update"
            );
        }
    }
    println!(
        "{} acknowledged writes ({} keys) survived SIGKILL; store revision {rev}",
        acked.all.len(),
        acked.last.len()
    );

    // Watch history holds every acknowledged write.
    let mut w = store.watch("/dur/", 1).await.expect("watch history");
    let history = collect(&mut w, usize::try_from(rev).expect("revision fits usize")).await;
    let by_rev: HashMap<Revision, &WatchEvent> =
        history.iter().map(|e| (e.revision(), e)).collect();
    for (r, key, value) in &acked.all {
        let ev = by_rev
            .get(r)
            .unwrap_or_else(|| panic!("no history event at acknowledged revision {r}"));
        assert_eq!(ev.kind, EventKind::Put);
        assert_eq!(&ev.kv.key, key);
        assert_eq!(ev.kv.value, value.as_bytes());
    }

    // The store carries on: revisions continue, new writes work.
    let kv = store
        .create("/after/kill", b"x".to_vec(), None)
        .await
        .expect("create after reopen");
    assert_eq!(kv.mod_revision, rev + 1);
    let next = history.last().map_or(1, |e| e.revision() + 1);
    let mut w2 = store.watch("/after/", next).await.expect("watch after");
    assert_eq!(collect(&mut w2, 1).await[0].kv, kv);

    // The child's lease survived with a fresh TTL: its key is still there
    // right after reopening and is deleted about 3 s later.
    let leased = store
        .get("/dur/leased")
        .await
        .expect("get leased")
        .expect("leased key present after reopen (fresh TTL)");
    assert_eq!(leased.lease, Some(lease));
    assert_eq!(leased.mod_revision, lease_key_rev);
    while store.get("/dur/leased").await.expect("get").is_some() {
        assert!(
            reopened_at.elapsed() < Duration::from_secs(20),
            "leased key never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reopened_at.elapsed() >= Duration::from_millis(2500),
        "lease expired {:?} after reopen, before its fresh TTL",
        reopened_at.elapsed()
    );
    assert!(matches!(
        store.lease_keepalive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

/// Closing and reopening keeps the revision, the exact watch history, and
/// leases (with a fresh TTL from open time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_preserves_revisions_history_and_leases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("store.db");
    let store = EmbeddedStore::open(&db).expect("open");
    let short = store.lease_grant(3).await.expect("grant short");
    let long = store.lease_grant(600).await.expect("grant long");
    let a = store
        .create("/re/a", b"a1".to_vec(), None)
        .await
        .expect("create a");
    store
        .update("/re/a", b"a2".to_vec(), a.mod_revision, None)
        .await
        .expect("update a");
    store
        .create("/re/b", b"b".to_vec(), None)
        .await
        .expect("create b");
    store.delete("/re/b", None).await.expect("delete b");
    store
        .create("/re/short", b"s".to_vec(), Some(short))
        .await
        .expect("create short");
    store
        .create("/re/long", b"l".to_vec(), Some(long))
        .await
        .expect("create long");
    let rev = store.revision().await.expect("revision");
    let mut w = store.watch("/re/", 1).await.expect("watch");
    let before = collect(&mut w, usize::try_from(rev).expect("usize")).await;
    drop(w);
    // Let most of the short lease's TTL pass before closing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(store);

    let reopened_at = Instant::now();
    let store = EmbeddedStore::open(&db).expect("reopen");
    assert_eq!(store.revision().await.expect("revision"), rev);
    let mut w = store.watch("/re/", 1).await.expect("watch after reopen");
    let after = collect(&mut w, before.len()).await;
    assert_eq!(after, before, "watch history survives reopen unchanged");
    let (items, list_rev) = store.list("/re/").await.expect("list");
    assert_eq!(list_rev, rev);
    assert_eq!(items.len(), 3);

    // Fresh TTL: 1.5 s after reopen (3.5 s after grant) the key is alive.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        store.get("/re/short").await.expect("get").is_some(),
        "lease must get a fresh TTL at open"
    );
    // ...and it expires, as a Delete event on the live watch.
    let ev = collect(&mut w, 1).await.remove(0);
    assert_eq!(ev.kind, EventKind::Delete);
    assert_eq!(ev.kv.key, "/re/short");
    assert_eq!(ev.revision(), rev + 1);
    let expired_after = reopened_at.elapsed();
    assert!(
        expired_after >= Duration::from_millis(2500) && expired_after < Duration::from_secs(10),
        "short lease expired {expired_after:?} after reopen"
    );
    assert_eq!(
        store.lease_keepalive(long).await.expect("keepalive long"),
        600
    );
    let c = store
        .create("/re/c", b"c".to_vec(), Some(long))
        .await
        .expect("create with surviving lease");
    assert_eq!(c.mod_revision, rev + 2);
    store.lease_revoke(long).await.expect("revoke long");
    assert_eq!(store.get("/re/long").await.expect("get"), None);
    assert_eq!(store.get("/re/c").await.expect("get"), None);
    // Lease ids are never reused.
    let new_lease = store.lease_grant(10).await.expect("grant");
    assert!(new_lease > long);
}

/// Retained history stays trimmed across reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_compaction_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("store.db");
    let options = EmbeddedOptions {
        history_events: 5,
        ..EmbeddedOptions::default()
    };
    {
        let store = EmbeddedStore::open_with(&db, options.clone()).expect("open");
        for i in 0..20 {
            store
                .create(&format!("/k/{i}"), b"x".to_vec(), None)
                .await
                .expect("create");
        }
        store.compact(18).await.expect("compact");
    }
    let store = EmbeddedStore::open_with(&db, options).expect("reopen");
    match store.watch("/", 17).await {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!((requested, oldest), (17, 18));
        }
        Err(e) => panic!("expected Compacted, got {e:?}"),
        Ok(_) => panic!("expected Compacted, got a stream"),
    }
    let mut w = store.watch("/", 18).await.expect("watch");
    let evs = collect(&mut w, 3).await;
    let revs: Vec<Revision> = evs.iter().map(|e| e.revision()).collect();
    assert_eq!(revs, vec![18, 19, 20]);
}
