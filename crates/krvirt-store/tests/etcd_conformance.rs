//! The shared conformance suite, run against a real single-member etcd
//! (Debian's etcd-server) started for each test.

use krvirt_store::conformance::Fixture;
use krvirt_store::etcd::EtcdStore;
use krvirt_store::etcd::testing::EtcdCluster;

async fn fresh_store() -> Fixture {
    let cluster = tokio::task::spawn_blocking(EtcdCluster::single)
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    let store = EtcdStore::connect(&cluster.endpoints())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to etcd: {e}\n{}", cluster.log(0)));
    Fixture::new(store, cluster)
}

krvirt_store::conformance_tests!(fresh_store);
