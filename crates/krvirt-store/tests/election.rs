//! Leader election over a real etcd and over the embedded store: exactly
//! one leader; resigning hands over at once; a crashed leader is replaced
//! within the lease TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use krvirt_store::Store;
use krvirt_store::election::{Election, Role};
use krvirt_store::embedded::EmbeddedStore;
use krvirt_store::etcd::EtcdStore;
use krvirt_store::etcd::testing::EtcdCluster;

const KEY: &str = "/krvirt/leader/test";
const TTL: i64 = 2;

fn leaders(es: &[Option<Election>]) -> Vec<usize> {
    es.iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.as_ref().map(Election::role), Some(Role::Leader { .. })))
        .map(|(i, _)| i)
        .collect()
}

/// Wait for exactly one leader among the live candidates (and no second
/// one showing up for a while).
async fn one_leader(es: &[Option<Election>], within: Duration) -> usize {
    let start = Instant::now();
    loop {
        let l = leaders(es);
        assert!(l.len() <= 1, "two leaders at once: {l:?}");
        if l.len() == 1 {
            // Stable: the others follow it.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(leaders(es), l, "leadership flapped");
            return l[0];
        }
        assert!(
            start.elapsed() < within,
            "no leader within {within:?}: {:?}",
            es.iter()
                .map(|e| e.as_ref().map(Election::role))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn exercise(store: Arc<dyn Store>) {
    let mut es: Vec<Option<Election>> = (0..3)
        .map(|i| {
            Some(Election::start(
                store.clone(),
                KEY,
                &format!("cand-{i}"),
                TTL,
            ))
        })
        .collect();
    let first = one_leader(&es, Duration::from_secs(10)).await;
    // Followers name the leader.
    for (i, e) in es.iter().enumerate() {
        if i != first {
            let role = e.as_ref().map(Election::role);
            assert!(
                matches!(&role, Some(Role::Follower { leader }) if *leader == format!("cand-{first}")),
                "candidate {i}: {role:?}"
            );
        }
    }
    // Resigning hands over almost at once.
    let t = Instant::now();
    es[first].take().expect("leader").resign().await;
    let second = one_leader(&es, Duration::from_secs(3)).await;
    assert_ne!(second, first);
    let handover = t.elapsed();
    assert!(
        handover < Duration::from_secs(2),
        "resign hand-over took {handover:?}"
    );
    // A crash: the lead passes on within the TTL (plus etcd's rounding).
    let t = Instant::now();
    es[second].take().expect("leader").abort();
    let third = one_leader(&es, Duration::from_secs(TTL as u64 + 4)).await;
    assert!(third != first && third != second);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "a crashed leader's lease cannot end at once ({took:?})"
    );
    for e in es.into_iter().flatten() {
        e.resign().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_election() {
    let cluster = tokio::task::spawn_blocking(EtcdCluster::single)
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    let store = EtcdStore::connect(&cluster.endpoints())
        .await
        .expect("connect");
    exercise(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_election() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("s.db")).expect("open");
    exercise(Arc::new(store)).await;
}
