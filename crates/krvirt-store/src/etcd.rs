//! etcd v3 backend ([`EtcdStore`]), through `etcd-client` (gRPC).
//!
//! Mapping onto the trait:
//! - Revisions are etcd's minus one: a fresh etcd cluster is at revision 1
//!   with nothing written, which the trait calls revision 0. Every value
//!   crossing the boundary (`mod_revision`, `create_revision`, watch starts,
//!   compaction, CAS expectations) is shifted, so the store-wide "one write,
//!   one revision" rule holds exactly as etcd keeps it.
//! - create / update / delete are single transactions comparing
//!   `create_revision` or `mod_revision`, with a `get` in both branches so
//!   the caller gets the new key/value or the reason for the failure.
//! - Watches run in a task that re-creates the etcd watch from the last
//!   delivered revision + 1 whenever the gRPC stream breaks (member lost,
//!   etcd restarted): the caller's stream neither loses nor repeats events.
//!   Only compaction (the resume point is gone) ends it, with `Compacted`.
//! - Leases map one to one; keep-alive opens a short keep-alive stream.
//!
//! Only etcd 3.4 calls are used (Debian's `etcd-server`).

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType,
    GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use crate::{
    EventKind, KeyValue, LeaseId, Result, Revision, Store, StoreError, WatchEvent, WatchStream,
};

pub mod testing;

/// How long a unary call may take before it fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest etcd response (a range read of a whole collection) the
/// client decodes: 1 GiB.
pub const MAX_RESPONSE_BYTES: usize = 1 << 30;
/// Back-off between watch re-creation attempts.
const WATCH_RETRY: Duration = Duration::from_millis(200);
/// Events buffered per watch before the reader task waits for the caller.
const WATCH_BUFFER: usize = 1024;

/// Parse `etcd://host:port[,host:port…]` (or `http://` URLs, or bare
/// `host:port` lists) into gRPC endpoints.
pub fn parse_endpoints(spec: &str) -> Result<Vec<String>> {
    let rest = spec.strip_prefix("etcd://").unwrap_or(spec);
    let mut out = Vec::new();
    for part in rest.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(StoreError::InvalidArgument(format!(
                "empty endpoint in etcd store address {spec:?}"
            )));
        }
        let ep = if part.starts_with("http://") || part.starts_with("https://") {
            part.to_string()
        } else if part.contains("://") {
            return Err(StoreError::InvalidArgument(format!(
                "endpoint {part:?} in {spec:?}: only http(s) endpoints are supported"
            )));
        } else {
            format!("http://{part}")
        };
        let hostport = ep.split_once("://").map_or("", |(_, h)| h);
        let port_ok = hostport
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !port_ok {
            return Err(StoreError::InvalidArgument(format!(
                "endpoint {part:?} in {spec:?} must be host:port"
            )));
        }
        out.push(ep);
    }
    Ok(out)
}

/// A [`Store`] on an etcd v3 cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
}

fn to_store(rev: i64) -> Revision {
    if rev <= 0 { 0 } else { rev - 1 }
}

fn to_etcd(rev: Revision) -> i64 {
    rev + 1
}

fn backend(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Map an etcd error, knowing which lease (if any) the call named.
fn map_err(e: etcd_client::Error, lease: Option<LeaseId>) -> StoreError {
    let msg = e.to_string();
    if msg.contains("lease not found") {
        return StoreError::LeaseNotFound(lease.unwrap_or(0));
    }
    if msg.contains("required revision is a future revision") {
        return StoreError::InvalidArgument(msg);
    }
    backend(e)
}

/// How long an operation is retried while members are switching.
const RETRY_FOR: Duration = Duration::from_secs(8);

/// Safe to send again? A connection that was never made carried nothing;
/// reads may be repeated after any transport failure.
fn retryable(e: &etcd_client::Error, idempotent: bool) -> bool {
    let m = e.to_string();
    m.contains("tcp connect error")
        || m.contains("Connection refused")
        || (idempotent
            && (m.contains("unavailable")
                || m.contains("transport error")
                || m.contains("no leader")
                || m.contains("leader changed")
                || m.contains("timed out")))
}

async fn with_retry<T, F, Fut>(idempotent: bool, mut call: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if retryable(&e, idempotent) && tokio::time::Instant::now() < deadline => {
                debug!(error = %e, "etcd call failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn convert_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    let key = std::str::from_utf8(kv.key())
        .map_err(|_| StoreError::Backend("etcd returned a key that is not UTF-8".into()))?
        .to_string();
    Ok(KeyValue {
        key,
        value: kv.value().to_vec(),
        create_revision: to_store(kv.create_revision()),
        mod_revision: to_store(kv.mod_revision()),
        version: kv.version(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    })
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::InvalidArgument("empty key".into()));
    }
    Ok(())
}

/// The first `get` result of a transaction's responses, as a key/value.
fn txn_get(resps: &[TxnOpResponse]) -> Result<Option<KeyValue>> {
    for r in resps {
        if let TxnOpResponse::Get(g) = r {
            return g.kvs().first().map(convert_kv).transpose();
        }
    }
    Ok(None)
}

impl EtcdStore {
    /// Connect to the cluster (`endpoints` as `http://host:port`; see
    /// [`parse_endpoints`]). Fails if no endpoint answers.
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore> {
        if endpoints.is_empty() {
            return Err(StoreError::InvalidArgument("no etcd endpoints".into()));
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(backend)?;
        let store = EtcdStore {
            client,
            endpoints: endpoints.to_vec(),
        };
        // Prove the cluster answers now rather than at the first request.
        store.current_etcd_revision().await?;
        Ok(store)
    }

    /// Connect from an `etcd://host:port[,…]` address.
    pub async fn connect_url(spec: &str) -> Result<EtcdStore> {
        Self::connect(&parse_endpoints(spec)?).await
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A KV client that accepts responses of any size up to
    /// [`MAX_RESPONSE_BYTES`] (tonic's default, 4 MiB, failed every list of
    /// more than a few thousand objects).
    fn kv(&self) -> etcd_client::KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// The underlying client (for etcd-only features such as elections).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A write transaction, resent only when it cannot have been delivered.
    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        with_retry(false, || {
            let mut kv = self.kv();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    async fn current_etcd_revision(&self) -> Result<i64> {
        let r = with_retry(true, || {
            let mut kv = self.kv();
            async move {
                kv.get("\0", Some(GetOptions::new().with_count_only()))
                    .await
            }
        })
        .await
        .map_err(backend)?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// `Compacted` for an etcd start revision older than the compaction,
    /// found by a range read at that revision.
    async fn check_not_compacted(&self, requested: Revision, etcd_start: i64) -> Result<()> {
        let mut kv = self.kv();
        let r = kv
            .get(
                "\0",
                Some(
                    GetOptions::new()
                        .with_count_only()
                        .with_revision(etcd_start),
                ),
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if e.to_string()
                    .contains("required revision has been compacted") =>
            {
                Err(StoreError::Compacted {
                    requested,
                    oldest: self.compact_revision(etcd_start).await?,
                })
            }
            // A future revision is fine: the watch waits for it.
            Err(e) if e.to_string().contains("future revision") => Ok(()),
            Err(e) => Err(backend(e)),
        }
    }

    /// The oldest revision still watchable (store numbering), learnt from
    /// the compaction notice etcd sends a watch that starts too early.
    async fn compact_revision(&self, etcd_start: i64) -> Result<Revision> {
        let mut w = self.client.watch_client();
        let mut stream = w
            .watch(
                "\0",
                Some(WatchOptions::new().with_start_revision(etcd_start)),
            )
            .await
            .map_err(backend)?;
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        loop {
            let msg = tokio::time::timeout_at(deadline, stream.message())
                .await
                .map_err(|_| StoreError::Backend("no compaction notice from etcd".into()))?
                .map_err(backend)?;
            match msg {
                Some(m) if m.compact_revision() > 0 => return Ok(to_store(m.compact_revision())),
                Some(_) => continue,
                None => return Err(StoreError::Backend("watch ended without notice".into())),
            }
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        let r = with_retry(true, || {
            let mut kv = self.kv();
            async move { kv.get(key, None).await }
        })
        .await
        .map_err(backend)?;
        r.kvs().first().map(convert_kv).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let key = if prefix.is_empty() { "\0" } else { prefix };
        // a read: safe to repeat on another member after a transport error
        let r = with_retry(true, || {
            let mut kv = self.kv();
            let opts = if prefix.is_empty() {
                GetOptions::new().with_all_keys()
            } else {
                GetOptions::new().with_prefix()
            };
            async move { kv.get(key, Some(opts)).await }
        })
        .await
        .map_err(backend)?;
        let rev = to_store(r.header().map_or(0, |h| h.revision()));
        let items = r.kvs().iter().map(convert_kv).collect::<Result<_>>()?;
        Ok((items, rev))
    }

    async fn create(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<KeyValue> {
        check_key(key)?;
        let put = match lease {
            Some(l) => PutOptions::new().with_lease(l),
            None => PutOptions::new(),
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, Some(put)), TxnOp::get(key, None)])
            .or_else([TxnOp::get(key, None)]);
        let r = self.txn(txn).await.map_err(|e| map_err(e, lease))?;
        if !r.succeeded() {
            return Err(StoreError::AlreadyExists(key.to_string()));
        }
        txn_get(&r.op_responses())?
            .ok_or_else(|| StoreError::Backend(format!("{key} vanished inside its own txn")))
    }

    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Revision,
        lease: Option<LeaseId>,
    ) -> Result<KeyValue> {
        check_key(key)?;
        let put = match lease {
            Some(l) => PutOptions::new().with_lease(l),
            None => PutOptions::new(),
        };
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key, CompareOp::Equal, to_etcd(expected)),
                Compare::create_revision(key, CompareOp::Greater, 0),
            ])
            .and_then([TxnOp::put(key, value, Some(put)), TxnOp::get(key, None)])
            .or_else([TxnOp::get(key, None)]);
        let r = self.txn(txn).await.map_err(|e| map_err(e, lease))?;
        let got = txn_get(&r.op_responses())?;
        if r.succeeded() {
            return got
                .ok_or_else(|| StoreError::Backend(format!("{key} vanished inside its own txn")));
        }
        match got {
            None => Err(StoreError::NotFound(key.to_string())),
            Some(kv) => Err(StoreError::Conflict {
                key: key.to_string(),
                expected,
                actual: kv.mod_revision,
            }),
        }
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<KeyValue> {
        check_key(key)?;
        let cmp = match expected {
            Some(e) => Compare::mod_revision(key, CompareOp::Equal, to_etcd(e)),
            None => Compare::create_revision(key, CompareOp::Greater, 0),
        };
        let txn = Txn::new()
            .when([cmp, Compare::create_revision(key, CompareOp::Greater, 0)])
            .and_then([TxnOp::delete(
                key,
                Some(DeleteOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let r = self.txn(txn).await.map_err(backend)?;
        let resps = r.op_responses();
        if r.succeeded() {
            for op in &resps {
                if let TxnOpResponse::Delete(d) = op
                    && let Some(prev) = d.prev_kvs().first()
                {
                    return convert_kv(prev);
                }
            }
            return Err(StoreError::Backend(format!(
                "delete of {key} returned no previous value"
            )));
        }
        match (txn_get(&resps)?, expected) {
            (None, _) => Err(StoreError::NotFound(key.to_string())),
            (Some(kv), Some(e)) => Err(StoreError::Conflict {
                key: key.to_string(),
                expected: e,
                actual: kv.mod_revision,
            }),
            (Some(_), None) => Err(StoreError::Backend(format!(
                "unconditional delete of {key} failed"
            ))),
        }
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        if from < 0 {
            return Err(StoreError::InvalidArgument(format!(
                "watch from negative revision {from}"
            )));
        }
        let etcd_start = if from == 0 {
            self.current_etcd_revision().await? + 1
        } else {
            let start = to_etcd(from);
            self.check_not_compacted(from, start).await?;
            start
        };
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let client = self.client.clone();
        let prefix = prefix.to_string();
        tokio::spawn(watch_task(client, prefix, etcd_start, tx));
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn revision(&self) -> Result<Revision> {
        Ok(to_store(self.current_etcd_revision().await?))
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseId> {
        if ttl_secs <= 0 {
            return Err(StoreError::InvalidArgument(format!(
                "lease TTL must be positive, got {ttl_secs}"
            )));
        }
        let r = with_retry(false, || {
            let mut l = self.client.lease_client();
            async move { l.grant(ttl_secs, None).await }
        })
        .await
        .map_err(backend)?;
        Ok(r.id())
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> Result<i64> {
        let mut l = self.client.lease_client();
        let (mut keeper, mut stream) = l
            .keep_alive(lease)
            .await
            .map_err(|e| map_err(e, Some(lease)))?;
        keeper
            .keep_alive()
            .await
            .map_err(|e| map_err(e, Some(lease)))?;
        loop {
            match tokio::time::timeout(CALL_TIMEOUT, stream.message()).await {
                Err(_) => return Err(StoreError::Backend("keep-alive timed out".into())),
                Ok(Err(e)) => return Err(map_err(e, Some(lease))),
                Ok(Ok(None)) => return Err(StoreError::Backend("keep-alive stream ended".into())),
                Ok(Ok(Some(r))) if r.id() == lease => {
                    return if r.ttl() <= 0 {
                        Err(StoreError::LeaseNotFound(lease))
                    } else {
                        Ok(r.ttl())
                    };
                }
                Ok(Ok(Some(_))) => continue,
            }
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        let mut l = self.client.lease_client();
        l.revoke(lease).await.map_err(|e| map_err(e, Some(lease)))?;
        Ok(())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        if revision < 0 {
            return Err(StoreError::InvalidArgument(format!(
                "compaction to negative revision {revision}"
            )));
        }
        let current = self.current_etcd_revision().await?;
        let target = to_etcd(revision);
        if target > current {
            return Err(StoreError::InvalidArgument(format!(
                "cannot compact to {revision}: the store is at {}",
                to_store(current)
            )));
        }
        let mut kv = self.kv();
        match kv
            .compact(target, Some(CompactionOptions::new().with_physical()))
            .await
        {
            Ok(_) => Ok(()),
            // At or below an earlier compaction: nothing to do.
            Err(e)
                if e.to_string()
                    .contains("required revision has been compacted") =>
            {
                Ok(())
            }
            Err(e) => Err(map_err(e, None)),
        }
    }
}

/// Outcome of one etcd watch stream.
enum WatchEnd {
    /// The caller dropped its stream.
    Receiver,
    /// History before `next` is gone.
    Compacted(i64),
    /// Transport trouble: re-create from `next`.
    Broken(String),
}

/// Feed `tx` with events from `next` on, re-creating the etcd watch from
/// the last delivered revision + 1 whenever it breaks.
async fn watch_task(
    client: Client,
    prefix: String,
    mut next: i64,
    tx: mpsc::Sender<Result<WatchEvent>>,
) {
    let requested = to_store(next);
    loop {
        match watch_once(&client, &prefix, &mut next, &tx).await {
            WatchEnd::Receiver => return,
            WatchEnd::Compacted(compact) => {
                let _ = tx
                    .send(Err(StoreError::Compacted {
                        requested: to_store(next).max(requested),
                        oldest: to_store(compact),
                    }))
                    .await;
                return;
            }
            WatchEnd::Broken(why) => {
                debug!(%prefix, next, %why, "etcd watch broke; re-creating it");
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(WATCH_RETRY) => {}
                }
            }
        }
    }
}

async fn watch_once(
    client: &Client,
    prefix: &str,
    next: &mut i64,
    tx: &mpsc::Sender<Result<WatchEvent>>,
) -> WatchEnd {
    let mut w = client.watch_client();
    let mut opts = WatchOptions::new()
        .with_start_revision(*next)
        .with_prev_key()
        .with_progress_notify();
    let key = if prefix.is_empty() {
        opts = opts.with_all_keys();
        "\0"
    } else {
        opts = opts.with_prefix();
        prefix
    };
    let mut stream = match w.watch(key, Some(opts)).await {
        Ok(s) => s,
        Err(e) => return WatchEnd::Broken(e.to_string()),
    };
    loop {
        let msg = tokio::select! {
            _ = tx.closed() => return WatchEnd::Receiver,
            m = stream.message() => m,
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return WatchEnd::Broken("stream ended".into()),
            Err(e) => return WatchEnd::Broken(e.to_string()),
        };
        if resp.compact_revision() > 0 {
            return WatchEnd::Compacted(resp.compact_revision());
        }
        if resp.canceled() {
            return WatchEnd::Broken(format!("canceled: {}", resp.cancel_reason()));
        }
        let mut last = None;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let converted = match ev.event_type() {
                EventType::Put => convert_kv(kv).map(|kv| (EventKind::Put, kv)),
                EventType::Delete => convert_kv(kv).map(|mut kv| {
                    kv.create_revision = 0;
                    kv.version = 0;
                    kv.lease = None;
                    kv.value.clear();
                    (EventKind::Delete, kv)
                }),
            };
            let item = converted.and_then(|(kind, kv)| {
                let prev = ev.prev_kv().map(convert_kv).transpose()?;
                Ok(WatchEvent { kind, kv, prev })
            });
            let rev = kv.mod_revision();
            if rev < *next {
                // Already delivered before a re-creation.
                continue;
            }
            let failed = item.is_err();
            if tx.send(item).await.is_err() {
                return WatchEnd::Receiver;
            }
            if failed {
                warn!(prefix, "undecodable etcd watch event; ending the watch");
                return WatchEnd::Receiver;
            }
            last = Some(rev);
        }
        if let Some(rev) = last {
            // All events of one revision arrive in one response.
            *next = rev + 1;
        }
    }
}
