//! IPAM against a real store, with concurrent allocators.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use krvirt_net::ipam::Pool;
use krvirt_net::{Cidr, Ipam, NetError};
use krvirt_store::embedded::EmbeddedStore;

fn pool(range: Option<(Ipv4Addr, Ipv4Addr)>) -> Pool {
    let c: Cidr = "10.99.0.0/24".parse().unwrap();
    Pool::new("net-a", c, Ipv4Addr::new(10, 99, 0, 1), range).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_allocators_never_share_an_address() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.db")).unwrap());
    // 60 addresses, two "agents" asking for 30 each at the same time,
    // every owner hashing to a start point: collisions are certain.
    let p = pool(Some((
        Ipv4Addr::new(10, 99, 0, 10),
        Ipv4Addr::new(10, 99, 0, 69),
    )));
    let mut tasks = Vec::new();
    for agent in 0..2 {
        let ipam = Ipam::new(store.clone());
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..30 {
                let ip = ipam
                    .allocate(&p, &format!("agent{agent}-vmi{i}/eth0"), None)
                    .await
                    .unwrap();
                got.push(ip);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(unique.len(), 60, "duplicates handed out: {all:?}");
    let ipam = Ipam::new(store.clone());
    assert_eq!(ipam.list("net-a").await.unwrap().len(), 60);
    // Full now.
    match ipam.allocate(&p, "late/eth0", None).await {
        Err(NetError::Exhausted { .. }) => {}
        other => panic!("expected Exhausted, got {other:?}"),
    }
    // Asking again for an owner returns its address, not a new one.
    assert_eq!(
        ipam.allocate(&p, "agent0-vmi3/eth0", None).await.unwrap(),
        all[3]
    );
    // Releasing a VMI frees its addresses for others.
    assert_eq!(ipam.release("net-a", "agent1-vmi7/").await.unwrap(), 1);
    let ip = ipam.allocate(&p, "late/eth0", None).await.unwrap();
    assert_eq!(ip, all[37]);
}

#[tokio::test]
async fn static_reservations() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.db")).unwrap());
    let ipam = Ipam::new(store.clone());
    let p = pool(Some((
        Ipv4Addr::new(10, 99, 0, 10),
        Ipv4Addr::new(10, 99, 0, 11),
    )));
    let fixed = Ipv4Addr::new(10, 99, 0, 10);
    ipam.reserve(&p, fixed, "vm-a/eth0", Some("02:00:00:00:00:0a"))
        .await
        .unwrap();
    ipam.reserve(&p, fixed, "vm-a/eth0", None).await.unwrap(); // idempotent
    match ipam.reserve(&p, fixed, "vm-b/eth0", None).await {
        Err(NetError::Taken { owner, .. }) => assert_eq!(owner, "vm-a/eth0"),
        other => panic!("expected Taken, got {other:?}"),
    }
    assert!(
        ipam.reserve(&p, Ipv4Addr::new(10, 99, 0, 1), "gw", None)
            .await
            .is_err()
    );
    assert!(
        ipam.reserve(&p, Ipv4Addr::new(10, 98, 0, 5), "x", None)
            .await
            .is_err()
    );
    // The dynamic pool skips the reserved address.
    assert_eq!(
        ipam.allocate(&p, "vm-c/eth0", None).await.unwrap(),
        Ipv4Addr::new(10, 99, 0, 11)
    );
    // Survives reopening the store (it is the store, not memory).
    drop(ipam);
    drop(store);
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.db")).unwrap());
    let ipam = Ipam::new(store);
    let l = ipam.list("net-a").await.unwrap();
    assert_eq!(l.len(), 2);
    assert!(
        l.iter()
            .any(|a| a.ip == fixed && a.reserved && a.mac.as_deref() == Some("02:00:00:00:00:0a"))
    );
}
