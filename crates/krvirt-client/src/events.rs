//! Recording Events over HTTP (the host agent's recorder), best effort.
//!
//! [`EventRecorder::record`] never blocks and never fails: the event goes
//! into a bounded queue (dropped and counted when full) and a background
//! task writes it, aggregating a repeat of the same event onto the stored
//! one (`count` + 1, `lastTimestamp`) with a compare-and-swap replace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use krvirt_api::event::{Event, EventSource, ObjectReference};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::{Client, ClientError, Result};

/// Events waiting to be sent per recorder; more are dropped.
pub const QUEUE_CAPACITY: usize = 256;

/// Create the event, or bump the stored one of the same name.
pub async fn write_event(client: &Client, event: &Event) -> Result<Value> {
    let kind = krvirt_api::find_kind("events").ok_or_else(|| ClientError::Decode {
        context: "the Event kind".into(),
        message: "not registered in krvirt-api".into(),
    })?;
    let (ns, name) = (event.metadata.namespace(), event.metadata.name());
    let now = event
        .last_timestamp
        .clone()
        .unwrap_or_else(krvirt_api::meta::now_rfc3339);
    let mut last = None;
    for _ in 0..5 {
        match client.get(kind, ns, name).await {
            Ok(stored) => {
                let mut ev: Event =
                    serde_json::from_value(stored).map_err(|e| ClientError::Decode {
                        context: format!("event {name}"),
                        message: e.to_string(),
                    })?;
                ev.bump(&now);
                let v = serde_json::to_value(&ev).map_err(|e| ClientError::Decode {
                    context: format!("event {name}"),
                    message: e.to_string(),
                })?;
                match client.replace(kind, ns, name, &v).await {
                    Ok(v) => return Ok(v),
                    Err(e) if e.is_conflict() || e.is_not_found() => last = Some(e),
                    Err(e) => return Err(e),
                }
            }
            Err(e) if e.is_not_found() => {
                let v = serde_json::to_value(event).map_err(|e| ClientError::Decode {
                    context: format!("event {name}"),
                    message: e.to_string(),
                })?;
                match client.create(kind, ns, &v).await {
                    Ok(v) => return Ok(v),
                    Err(e) if e.is_already_exists() => last = Some(e),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Decode {
        context: format!("event {name}"),
        message: "retries exhausted".into(),
    }))
}

struct Shared {
    client: Client,
    source: EventSource,
    tx: mpsc::Sender<Event>,
    rx: Mutex<Option<mpsc::Receiver<Event>>>,
    dropped: AtomicU64,
}

/// Records events through the API server. Cheap to clone.
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
    /// A recorder writing as `component` on `host`; the sending task starts
    /// with the first event (inside a Tokio runtime).
    pub fn new(client: Client, component: &str, host: Option<&str>) -> EventRecorder {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        EventRecorder {
            shared: Arc::new(Shared {
                client,
                source: EventSource {
                    component: Some(component.to_string()),
                    host: host.map(str::to_string),
                },
                tx,
                rx: Mutex::new(Some(rx)),
                dropped: AtomicU64::new(0),
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
        let client = self.shared.client.clone();
        rt.spawn(async move {
            while let Some(ev) = rx.recv().await {
                if let Err(e) = write_event(&client, &ev).await {
                    tracing::debug!(event = %ev.metadata.name(), error = %e, "event not recorded");
                }
            }
        });
        true
    }

    /// Record that `reason` happened to `involved` (a stored object).
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
}
