//! The shared conformance suite, run against the embedded SQLite backend.

use krvirt_store::conformance::Fixture;
use krvirt_store::embedded::EmbeddedStore;

async fn fresh_store() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("store.db")).expect("open embedded store");
    Fixture::new(store, dir)
}

krvirt_store::conformance_tests!(fresh_store);
