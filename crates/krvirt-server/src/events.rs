//! Recording Events server-side (controllers, lifecycle subresources)
//! through the [`Registry`], and expiring old ones.
//!
//! Recording is best effort and never blocks: [`EventRecorder::record`]
//! puts the event in a bounded queue (dropping it, counted, when full) and
//! a background task writes it, aggregating repeats onto one object
//! (`count` + 1, `lastTimestamp`) as Kubernetes' event correlator does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use krvirt_api::KindInfo;
use krvirt_api::event::{Event, EventSource, ObjectReference};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::ApiError;
use crate::registry::{Preconditions, Registry};
use crate::selector::Selector;

/// Events waiting to be written per recorder; more are dropped.
pub const QUEUE_CAPACITY: usize = 512;
/// Events older than this (by `lastTimestamp`) are deleted by [`expire_events`].
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// At most this many events are kept per involved object.
pub const DEFAULT_MAX_PER_OBJECT: usize = 100;

fn event_kind(registry: &Registry) -> Result<&'static KindInfo, ApiError> {
    registry
        .kind("", "Event")
        .ok_or_else(|| ApiError::Internal("the Event kind is not served".into()))
}

/// Write one occurrence: create it, or bump the stored one with the same
/// name. Returns the stored event.
pub async fn write_event(registry: &Registry, event: &Event) -> Result<Value, ApiError> {
    let kind = event_kind(registry)?;
    let ns = event.metadata.namespace().to_string();
    let name = event.metadata.name().to_string();
    let now = event
        .last_timestamp
        .clone()
        .unwrap_or_else(krvirt_api::meta::now_rfc3339);
    let mut last = None;
    for _ in 0..5 {
        match registry.get(kind, &ns, &name).await {
            Ok(stored) => {
                let mut ev: Event = serde_json::from_value(stored)
                    .map_err(|e| ApiError::Internal(format!("stored event {name}: {e}")))?;
                ev.bump(&now);
                let v = serde_json::to_value(&ev)
                    .map_err(|e| ApiError::Internal(format!("encoding event: {e}")))?;
                match registry.replace(kind, &ns, &name, v).await {
                    Ok(v) => return Ok(v),
                    Err(e) if e.is_conflict() || e.is_not_found() => last = Some(e),
                    Err(e) => return Err(e),
                }
            }
            Err(e) if e.is_not_found() => {
                let v = serde_json::to_value(event)
                    .map_err(|e| ApiError::Internal(format!("encoding event: {e}")))?;
                match registry.create(kind, &ns, v).await {
                    Ok(v) => return Ok(v),
                    Err(e @ ApiError::AlreadyExists { .. }) => last = Some(e),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| ApiError::Internal("event write retries exhausted".into())))
}

struct Shared {
    registry: Registry,
    source: EventSource,
    tx: mpsc::Sender<Event>,
    /// The receiving end until the writer task is started (on first use,
    /// inside a Tokio runtime).
    rx: Mutex<Option<mpsc::Receiver<Event>>>,
    dropped: AtomicU64,
    failed: Arc<AtomicU64>,
}

/// Records events about objects, best effort. Cheap to clone.
#[derive(Clone)]
pub struct EventRecorder {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EventRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRecorder")
            .field("source", &self.shared.source)
            .finish()
    }
}

impl EventRecorder {
    /// A recorder writing as `component` (e.g. `krvirt-controller`) on
    /// `host`. The writer task starts with the first event.
    pub fn new(registry: Registry, component: &str, host: Option<&str>) -> EventRecorder {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        EventRecorder {
            shared: Arc::new(Shared {
                registry,
                source: EventSource {
                    component: Some(component.to_string()),
                    host: host.map(str::to_string),
                },
                tx,
                rx: Mutex::new(Some(rx)),
                dropped: AtomicU64::new(0),
                failed: Arc::new(AtomicU64::new(0)),
            }),
        }
    }

    fn start(&self) -> bool {
        let mut slot = self.shared.rx.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            return true;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let Some(mut rx) = slot.take() else {
            return true;
        };
        let registry = self.shared.registry.clone();
        let failed = self.shared.failed.clone();
        rt.spawn(async move {
            while let Some(ev) = rx.recv().await {
                if let Err(e) = write_event(&registry, &ev).await {
                    failed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(event = %ev.metadata.name(), error = %e, "event not recorded");
                }
            }
        });
        true
    }

    /// Record that `reason` happened to `involved` (a stored object with
    /// `kind`, `apiVersion` and `metadata`). Never blocks, never fails: a
    /// full queue drops the event (see [`EventRecorder::dropped`]).
    pub fn record(&self, involved: &Value, type_: &str, reason: &str, message: &str) {
        self.record_ref(ObjectReference::to_object(involved), type_, reason, message);
    }

    /// [`EventRecorder::record`] with an explicit reference.
    pub fn record_ref(&self, involved: ObjectReference, type_: &str, reason: &str, message: &str) {
        if involved.name.is_none() || involved.kind.is_none() || !self.start() {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let ev = Event::new(involved, type_, reason, message, self.shared.source.clone());
        if self.shared.tx.try_send(ev).is_err() {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events dropped (queue full, no runtime, or no involved object).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Events whose write failed.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Wait until every queued event has been handed to the writer and
    /// written (for tests and orderly shutdown), at most `timeout`.
    pub async fn flush(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.shared.tx.capacity() < QUEUE_CAPACITY && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The last event taken may still be in flight.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Delete events last seen more than `ttl` ago, and all but the newest
/// `max_per_object` events of each involved object. Returns how many were
/// deleted.
pub async fn expire_events(
    registry: &Registry,
    ttl: Duration,
    max_per_object: usize,
) -> Result<usize, ApiError> {
    let kind = event_kind(registry)?;
    let (items, _) = registry.list(kind, None, &Selector::everything()).await?;
    let cutoff = chrono::Utc::now()
        - chrono::Duration::from_std(ttl).unwrap_or_else(|_| chrono::Duration::hours(1));
    let mut doomed: Vec<(String, String)> = Vec::new();
    let mut per_object: HashMap<String, Vec<(String, String, String)>> = HashMap::new();
    for item in items {
        let Ok(ev) = serde_json::from_value::<Event>(item) else {
            continue;
        };
        let ns = ev.metadata.namespace().to_string();
        let name = ev.metadata.name().to_string();
        let seen = ev.last_seen().unwrap_or_default().to_string();
        let old = krvirt_api::meta::parse_rfc3339(&seen).is_none_or(|t| t < cutoff);
        if old {
            doomed.push((ns, name));
            continue;
        }
        let obj = ev
            .involved_object
            .uid
            .clone()
            .unwrap_or_else(|| format!("{:?}", ev.involved_object));
        per_object.entry(obj).or_default().push((seen, ns, name));
    }
    for (_, mut evs) in per_object {
        if evs.len() > max_per_object {
            evs.sort();
            let extra = evs.len() - max_per_object;
            doomed.extend(evs.into_iter().take(extra).map(|(_, ns, n)| (ns, n)));
        }
    }
    let mut deleted = 0;
    for (ns, name) in doomed {
        match registry
            .delete(kind, &ns, &name, &Preconditions::default())
            .await
        {
            Ok(_) => deleted += 1,
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
