//! The controllers over a real embedded store, shared by the integration
//! tests of this crate.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use krvirt_controller::Controllers;
use krvirt_server::Registry;
use krvirt_store::embedded::EmbeddedStore;
use tokio_util::sync::CancellationToken;

/// A registry on a fresh embedded store with every controller running;
/// they stop when it is dropped.
pub struct Plane {
    pub registry: Registry,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn plane() -> Plane {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new(Arc::new(
        EmbeddedStore::open(&dir.path().join("state.db")).unwrap(),
    ));
    let stop = CancellationToken::new();
    let c = Controllers::new(registry.clone()).unwrap();
    tokio::spawn(c.run(stop.clone()));
    Plane {
        registry,
        stop,
        _dir: dir,
    }
}

pub fn kind(n: &str) -> &'static krvirt_api::KindInfo {
    krvirt_api::find_kind(n).unwrap()
}

/// Poll `f` until it gives a value (a deadline, never a fixed sleep).
pub async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
