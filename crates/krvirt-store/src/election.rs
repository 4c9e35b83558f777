//! Leader election on any [`Store`]: one key, held under a lease.
//!
//! A candidate grants a lease of `ttl` seconds and tries to *create* the
//! election key attached to it; whoever creates it leads. The leader renews
//! its lease every `ttl / 3` and steps down by itself as soon as it has not
//! renewed for `2 × ttl / 3` (before the store can expire the lease and let
//! another candidate in), or on `LeaseNotFound`. Followers watch the key and
//! campaign again when it is deleted (lease expired or revoked), so a dead
//! leader is replaced within the TTL. Resigning (shutdown) revokes the lease:
//! hand-over is then immediate.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::{EventKind, LeaseId, Store, StoreError};

/// What a candidate currently is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Campaigning, or the store is unreachable.
    Candidate,
    /// Following the named leader.
    Follower { leader: String },
    /// Leading under this lease.
    Leader { lease: LeaseId },
}

/// Handle of a running campaign.
pub struct Election {
    rx: watch::Receiver<Role>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Election {
    /// Start campaigning for `key` as `identity` with a lease of `ttl_secs`
    /// (at least 2).
    pub fn start(store: Arc<dyn Store>, key: &str, identity: &str, ttl_secs: i64) -> Election {
        let (tx, rx) = watch::channel(Role::Candidate);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(campaign(
            store,
            key.to_string(),
            identity.to_string(),
            ttl_secs.max(2),
            tx,
            stop_rx,
        ));
        Election { rx, stop, task }
    }

    pub fn role(&self) -> Role {
        self.rx.borrow().clone()
    }

    /// A receiver of role changes.
    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.rx.clone()
    }

    /// Wait until this candidate leads.
    pub async fn until_leader(&mut self) -> LeaseId {
        loop {
            if let Role::Leader { lease } = *self.rx.borrow_and_update() {
                return lease;
            }
            if self.rx.changed().await.is_err() {
                // The campaign ended (resigned): never leads again.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Wait until this candidate no longer leads.
    pub async fn until_not_leader(&mut self) {
        loop {
            if !matches!(*self.rx.borrow_and_update(), Role::Leader { .. }) {
                return;
            }
            if self.rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Stop at once without revoking anything, as a crash would: a lead
    /// held now passes on only when the lease runs out.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Stop campaigning; a leader revokes its lease (immediate hand-over).
    pub async fn resign(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn campaign(
    store: Arc<dyn Store>,
    key: String,
    identity: String,
    ttl: i64,
    tx: watch::Sender<Role>,
    mut stop: watch::Receiver<bool>,
) {
    let ttl_d = Duration::from_secs(ttl as u64);
    let retry = Duration::from_millis(500);
    loop {
        if *stop.borrow() {
            return;
        }
        let _ = tx.send(Role::Candidate);
        let lease = match store.lease_grant(ttl).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "election: cannot grant a lease; retrying");
                if sleep_or_stop(&mut stop, retry).await {
                    return;
                }
                continue;
            }
        };
        match store
            .create(&key, identity.as_bytes().to_vec(), Some(lease))
            .await
        {
            Ok(_) => {
                info!(%key, %identity, lease, "election: leading");
                let _ = tx.send(Role::Leader { lease });
                let resigned = lead(&*store, lease, ttl_d, &mut stop).await;
                let _ = tx.send(Role::Candidate);
                if resigned {
                    let _ = store.lease_revoke(lease).await;
                    info!(%key, %identity, "election: resigned");
                    return;
                }
                warn!(%key, %identity, "election: lost the lead");
            }
            Err(StoreError::AlreadyExists(_)) => {
                let _ = store.lease_revoke(lease).await;
                if follow(&*store, &key, ttl_d, &tx, &mut stop).await {
                    return;
                }
            }
            Err(e) => {
                let _ = store.lease_revoke(lease).await;
                warn!(error = %e, "election: campaign failed; retrying");
                if sleep_or_stop(&mut stop, retry).await {
                    return;
                }
            }
        }
    }
}

/// True if asked to stop during the sleep.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// Keep the lease alive; returns true when resigning, false when the lead
/// is lost (the lease is gone, or not renewed for 2/3 of its TTL).
async fn lead(
    store: &dyn Store,
    lease: LeaseId,
    ttl: Duration,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let every = ttl / 3;
    let give_up = ttl * 2 / 3;
    let mut renewed = Instant::now();
    loop {
        if sleep_or_stop(stop, every.min(give_up.saturating_sub(renewed.elapsed()))).await {
            return true;
        }
        let attempt = Instant::now();
        let left = give_up.saturating_sub(renewed.elapsed());
        match tokio::time::timeout(left, store.lease_keepalive(lease)).await {
            Ok(Ok(_)) => renewed = attempt,
            Ok(Err(StoreError::LeaseNotFound(_))) => return false,
            Ok(Err(e)) => warn!(error = %e, "election: keep-alive failed"),
            Err(_) => warn!("election: keep-alive timed out"),
        }
        if renewed.elapsed() >= give_up {
            return false;
        }
    }
}

/// Follow the current leader until the key goes away; true when stopping.
async fn follow(
    store: &dyn Store,
    key: &str,
    ttl: Duration,
    tx: &watch::Sender<Role>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let current = match store.get(key).await {
        Ok(Some(kv)) => kv,
        // Gone already: campaign again.
        Ok(None) => return false,
        Err(e) => {
            warn!(error = %e, "election: cannot read the leader key");
            return sleep_or_stop(stop, Duration::from_millis(500)).await;
        }
    };
    let leader = String::from_utf8_lossy(&current.value).into_owned();
    let _ = tx.send(Role::Follower { leader });
    let mut w = match store.watch(key, current.mod_revision + 1).await {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "election: cannot watch the leader key");
            return sleep_or_stop(stop, Duration::from_millis(500)).await;
        }
    };
    loop {
        tokio::select! {
            _ = stop.changed() => return true,
            // Re-check now and then even if the watch stays silent.
            _ = tokio::time::sleep(ttl) => {
                match store.get(key).await {
                    Ok(Some(kv)) if kv.mod_revision == current.mod_revision => continue,
                    _ => return false,
                }
            }
            ev = w.next() => match ev {
                Some(Ok(ev)) if ev.kv.key == key && ev.kind == EventKind::Delete => return false,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return false,
            }
        }
    }
}
