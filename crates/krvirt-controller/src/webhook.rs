//! The webhook controller: delivers the Events of a Webhook's namespace
//! that its filters select, as HTTP POSTs of the Event's JSON, signed with
//! HMAC-SHA256 over `"{timestamp}.{body}"` (`X-Krvirt-Signature:
//! sha256=<hex>`, `X-Krvirt-Timestamp: <unix seconds>`).
//!
//! Never blocks the control plane: each Webhook has a bounded queue and
//! one delivery task; a full queue drops the event (counted in
//! `status.dropped`). A failed delivery (transport error or non-2xx) is
//! retried with exponential back-off (500 ms doubling, capped at 30 s) up
//! to `spec.maxAttempts`, then counted in `status.failed`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hmac::{Hmac, Mac};
use krvirt_api::KindInfo;
use krvirt_api::event::Event;
use krvirt_api::webhook::{
    DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, Webhook, WebhookSpec,
};
use krvirt_server::{EventType, Registry, Selector, Subresource};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Events queued per Webhook; more are dropped.
pub const QUEUE_CAPACITY: usize = 256;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// `sha256=<hex>`: HMAC-SHA256 keyed with `secret` over
/// `"{timestamp}.{body}"`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Check a delivery's signature header (constant-time comparison).
pub fn verify(secret: &[u8], timestamp: &str, body: &[u8], signature: &str) -> bool {
    let Some(hexsig) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hexsig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    last_delivery: Mutex<Option<String>>,
    last_error: Mutex<Option<String>>,
    dirty: AtomicBool,
}

impl Counters {
    fn set(m: &Mutex<Option<String>>, v: Option<String>) {
        *m.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }
    fn get(m: &Mutex<Option<String>>) -> Option<String> {
        m.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct Hook {
    uid: String,
    spec: WebhookSpec,
    tx: mpsc::Sender<Event>,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Delivers events to the Webhooks stored in the registry.
#[derive(Clone)]
pub struct WebhookController {
    registry: Registry,
    webhook_kind: &'static KindInfo,
    event_kind: &'static KindInfo,
    http: reqwest::Client,
    hooks: Arc<Mutex<HashMap<(String, String), Hook>>>,
}

impl WebhookController {
    pub fn new(
        registry: Registry,
        webhook_kind: &'static KindInfo,
        event_kind: &'static KindInfo,
    ) -> Self {
        WebhookController {
            registry,
            webhook_kind,
            event_kind,
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .unwrap_or_default(),
            hooks: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn hooks(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Hook>> {
        self.hooks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run until the task is aborted: follow Webhooks and Events, write
    /// delivery counters to each Webhook's status.
    pub async fn run(self) {
        let w = self.clone();
        let webhooks = tokio::spawn(async move { w.follow_webhooks().await });
        let s = self.clone();
        let status = tokio::spawn(async move { s.status_loop().await });
        self.follow_events().await;
        webhooks.abort();
        status.abort();
    }

    /// Make the running hooks match the stored Webhooks.
    async fn resync(&self) {
        let Ok((items, _)) = self
            .registry
            .list(self.webhook_kind, None, &Selector::everything())
            .await
        else {
            return;
        };
        let mut seen = Vec::new();
        for item in items {
            let Ok(hook) = serde_json::from_value::<Webhook>(item) else {
                continue;
            };
            let key = (
                hook.metadata.namespace().to_string(),
                hook.metadata.name().to_string(),
            );
            let uid = hook.metadata.uid.clone().unwrap_or_default();
            seen.push(key.clone());
            let mut hooks = self.hooks();
            let counters = match hooks.get(&key) {
                Some(h) if h.uid == uid && h.spec == hook.spec => continue,
                Some(h) if h.uid == uid => h.counters.clone(),
                _ => {
                    let c = Counters::default();
                    if let Some(st) = &hook.status {
                        c.delivered.store(st.delivered, Ordering::Relaxed);
                        c.failed.store(st.failed, Ordering::Relaxed);
                        c.dropped.store(st.dropped, Ordering::Relaxed);
                        Counters::set(&c.last_delivery, st.last_delivery_time.clone());
                        Counters::set(&c.last_error, st.last_error.clone());
                    }
                    Arc::new(c)
                }
            };
            let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
            let task = tokio::spawn(deliver_loop(
                self.http.clone(),
                hook.spec.clone(),
                rx,
                counters.clone(),
            ));
            hooks.insert(
                key,
                Hook {
                    uid,
                    spec: hook.spec,
                    tx,
                    counters,
                    task,
                },
            );
        }
        self.hooks().retain(|k, _| seen.contains(k));
    }

    async fn follow_webhooks(&self) {
        loop {
            let rv = match self.registry.store().revision().await {
                Ok(rv) => rv.to_string(),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            self.resync().await;
            let Ok(mut stream) = self
                .registry
                .watch(self.webhook_kind, None, Selector::everything(), Some(&rv))
                .await
            else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            while let Some(Ok(_)) = stream.next().await {
                self.resync().await;
            }
        }
    }

    /// Hand one stored event to every hook that selects it.
    pub fn dispatch(&self, event: &Event) {
        let ns = event.metadata.namespace();
        let type_ = event.type_.as_deref().unwrap_or("Normal");
        let reason = event.reason.as_deref().unwrap_or("");
        let kind = event.involved_object.kind.as_deref().unwrap_or("");
        for ((hook_ns, _), hook) in self.hooks().iter() {
            if hook_ns != ns || !hook.spec.selects(type_, reason, kind) {
                continue;
            }
            if hook.tx.try_send(event.clone()).is_err() {
                hook.counters.dropped.fetch_add(1, Ordering::Relaxed);
                hook.counters.dirty.store(true, Ordering::Relaxed);
            }
        }
    }

    async fn follow_events(&self) {
        loop {
            // Only events from now on: history is not replayed.
            let (_, rv) = match self
                .registry
                .list(self.event_kind, None, &Selector::everything())
                .await
            {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "listing events failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            // Hooks created together with the first events must exist first.
            self.resync().await;
            let mut stream = match self
                .registry
                .watch(self.event_kind, None, Selector::everything(), Some(&rv))
                .await
            {
                Ok(s) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(ev) if ev.event_type != EventType::Deleted => {
                        if let Ok(e) = serde_json::from_value::<Event>(ev.object) {
                            self.dispatch(&e);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        debug!(error = %e, "event watch ended; relisting");
                        break;
                    }
                }
            }
        }
    }

    async fn status_loop(&self) {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let dirty: Vec<((String, String), Value)> = self
                .hooks()
                .iter()
                .filter(|(_, h)| h.counters.dirty.swap(false, Ordering::Relaxed))
                .map(|(k, h)| {
                    let c = &h.counters;
                    (
                        k.clone(),
                        json!({"status": {
                            "delivered": c.delivered.load(Ordering::Relaxed),
                            "failed": c.failed.load(Ordering::Relaxed),
                            "dropped": c.dropped.load(Ordering::Relaxed),
                            "lastDeliveryTime": Counters::get(&c.last_delivery),
                            "lastError": Counters::get(&c.last_error),
                        }}),
                    )
                })
                .collect();
            for ((ns, name), patch) in dirty {
                if let Err(e) = self
                    .registry
                    .merge_patch(self.webhook_kind, &ns, &name, &patch, Subresource::Status)
                    .await
                    && !e.is_not_found()
                {
                    debug!(webhook = %name, error = %e, "webhook status not written");
                    if let Some(h) = self.hooks().get(&(ns, name)) {
                        h.counters.dirty.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

async fn deliver_loop(
    http: reqwest::Client,
    spec: WebhookSpec,
    mut rx: mpsc::Receiver<Event>,
    counters: Arc<Counters>,
) {
    while let Some(event) = rx.recv().await {
        let body = match serde_json::to_vec(&event) {
            Ok(b) => b,
            Err(_) => continue,
        };
        let delivery = format!(
            "{}-{}",
            event.metadata.uid.as_deref().unwrap_or_default(),
            event.count.unwrap_or(1)
        );
        let mut backoff = FIRST_BACKOFF;
        let attempts = spec.attempts();
        for attempt in 1..=attempts {
            let ts = chrono::Utc::now().timestamp().to_string();
            let sig = sign(spec.secret.as_bytes(), &ts, &body);
            let r = http
                .post(&spec.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(TIMESTAMP_HEADER, &ts)
                .header(SIGNATURE_HEADER, sig)
                .header(DELIVERY_HEADER, &delivery)
                .body(body.clone())
                .send()
                .await;
            let err = match r {
                Ok(resp) if resp.status().is_success() => None,
                Ok(resp) => Some(format!("{} answered {}", spec.url, resp.status())),
                Err(e) => Some(format!("POST {}: {e}", spec.url)),
            };
            match err {
                None => {
                    counters.delivered.fetch_add(1, Ordering::Relaxed);
                    Counters::set(
                        &counters.last_delivery,
                        Some(krvirt_api::meta::now_rfc3339()),
                    );
                    counters.dirty.store(true, Ordering::Relaxed);
                    break;
                }
                Some(e) => {
                    debug!(attempt, error = %e, "webhook delivery failed");
                    Counters::set(&counters.last_error, Some(e));
                    counters.dirty.store(true, Ordering::Relaxed);
                    if attempt == attempts {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        let s = sign(b"k", "100", b"{}");
        assert!(s.starts_with("sha256=") && s.len() == 7 + 64, "{s}");
        assert!(verify(b"k", "100", b"{}", &s));
        assert!(!verify(b"other", "100", b"{}", &s));
        assert!(!verify(b"k", "101", b"{}", &s), "timestamp is covered");
        assert!(!verify(b"k", "100", b"{ }", &s));
        assert!(!verify(b"k", "100", b"{}", "sha256=zz"));
        assert!(!verify(b"k", "100", b"{}", &s[7..]));
    }
}
