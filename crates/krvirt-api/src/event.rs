//! Core `v1` Event, as Kubernetes records them: what happened to an
//! object (`involvedObject`), why (`reason`), for whom to read (`message`),
//! `Normal` or `Warning`, who said so (`source`), and how often
//! (`count`, `firstTimestamp`, `lastTimestamp`).
//!
//! Recorders (the controllers through the registry, the agent through the
//! HTTP client) name an event after what it says, [`event_name`], so a
//! repeated identical event lands on the same object and is aggregated
//! with [`Event::bump`] (count + 1, new `lastTimestamp`), as Kubernetes'
//! event correlator does.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::admission::{Admit, Causes};
use crate::kubevirt::validate::{immutable_identity, metadata};
use crate::meta::{ObjectMeta, now_rfc3339};

pub const API_VERSION: &str = "v1";
/// `Normal` events: things going as intended.
pub const NORMAL: &str = "Normal";
/// `Warning` events: something needs a look.
pub const WARNING: &str = "Warning";
/// Longest `message` kept (Kubernetes' recorder truncates at 1 KiB too).
pub const MAX_MESSAGE: usize = 1024;
/// Longest `reason` accepted.
pub const MAX_REASON: usize = 128;

/// Reasons recorded by krvirt's components (KubeVirt's spelling where
/// KubeVirt has one).
pub mod reason {
    /// VM controller created the VMI.
    pub const SUCCESSFUL_CREATE: &str = "SuccessfulCreate";
    /// VM controller deleted the VMI.
    pub const SUCCESSFUL_DELETE: &str = "SuccessfulDelete";
    /// VM controller could not create the VMI.
    pub const FAILED_CREATE: &str = "FailedCreate";
    /// Placement bound the VMI to a host.
    pub const SCHEDULED: &str = "Scheduled";
    /// No host fits the VMI (yet).
    pub const FAILED_SCHEDULING: &str = "FailedScheduling";
    /// The agent started QEMU.
    pub const STARTED: &str = "Started";
    /// The agent stopped QEMU.
    pub const STOPPED: &str = "Stopped";
    /// The guest powered itself off.
    pub const SHUTDOWN: &str = "ShuttingDown";
    /// The guest or its QEMU failed.
    pub const FAILED: &str = "Failed";
    pub const PAUSED: &str = "Paused";
    pub const UNPAUSED: &str = "Unpaused";
    /// The disk image could not be resolved.
    pub const ERR_IMAGE_PULL: &str = "ErrImagePull";
}

/// Reference to the object an event is about (`v1.ObjectReference`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_path: Option<String>,
}

impl ObjectReference {
    /// Reference to a stored object (its `kind`, `apiVersion`, `metadata`).
    pub fn to_object(obj: &Value) -> ObjectReference {
        let s = |p: &str| {
            obj.pointer(p)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        ObjectReference {
            kind: s("/kind"),
            namespace: s("/metadata/namespace"),
            name: s("/metadata/name"),
            uid: s("/metadata/uid"),
            api_version: s("/apiVersion"),
            resource_version: None,
            field_path: None,
        }
    }
}

/// Who recorded an event (`v1.EventSource`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// A core `v1` Event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Event {
    /// `v1`
    #[serde(default)]
    pub api_version: String,
    /// `Event`
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub involved_object: ObjectReference,
    /// Short, CamelCase, machine-readable (`Started`, `ErrImagePull`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `Normal` or `Warning`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<EventSource>,
    /// RFC 3339: first occurrence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_timestamp: Option<String>,
    /// RFC 3339: latest occurrence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_timestamp: Option<String>,
    /// Occurrences aggregated into this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i32>,
    /// RFC 3339 with microseconds (events.k8s.io clients set it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporting_component: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporting_instance: Option<String>,
}

impl Default for Event {
    fn default() -> Self {
        Event {
            api_version: API_VERSION.into(),
            kind: "Event".into(),
            metadata: ObjectMeta::default(),
            involved_object: ObjectReference::default(),
            reason: None,
            message: None,
            type_: None,
            source: None,
            first_timestamp: None,
            last_timestamp: None,
            count: None,
            event_time: None,
            action: None,
            reporting_component: None,
            reporting_instance: None,
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Name of the event saying `reason`/`message`/`type_` about `involved`
/// from `source`: `{involvedName}.{16 hex digits}`, the same for the same
/// words, so repeats aggregate onto one object.
pub fn event_name(
    involved: &ObjectReference,
    type_: &str,
    reason: &str,
    message: &str,
    source: &EventSource,
) -> String {
    let mut key = Vec::new();
    for part in [
        involved.kind.as_deref().unwrap_or(""),
        involved.namespace.as_deref().unwrap_or(""),
        involved.name.as_deref().unwrap_or(""),
        involved.uid.as_deref().unwrap_or(""),
        type_,
        reason,
        message,
        source.component.as_deref().unwrap_or(""),
        source.host.as_deref().unwrap_or(""),
    ] {
        key.extend_from_slice(part.as_bytes());
        key.push(0);
    }
    let digest = crate::util::sha1(&key);
    let hexd: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let base = involved.name.as_deref().unwrap_or("object");
    // Keep the name a DNS subdomain of at most 253 characters.
    let base = truncate(base, 253 - 17);
    format!("{}.{hexd}", base.trim_end_matches(['.', '-']))
}

impl Event {
    /// A first occurrence, named by [`event_name`], in the involved
    /// object's namespace (`default` for cluster-scoped objects, as
    /// Kubernetes does).
    pub fn new(
        involved: ObjectReference,
        type_: &str,
        reason: &str,
        message: &str,
        source: EventSource,
    ) -> Event {
        let message = truncate(message, MAX_MESSAGE);
        let reason = truncate(reason, MAX_REASON);
        let name = event_name(&involved, type_, &reason, &message, &source);
        let namespace = involved
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let now = now_rfc3339();
        Event {
            metadata: ObjectMeta::named(Some(&namespace), &name),
            reporting_component: source.component.clone(),
            reporting_instance: source.host.clone(),
            involved_object: involved,
            reason: Some(reason),
            message: Some(message),
            type_: Some(type_.to_string()),
            source: Some(source),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        }
    }

    /// Another occurrence of the same event at `now`: count + 1 and
    /// `lastTimestamp = now` (never moving backwards).
    pub fn bump(&mut self, now: &str) {
        self.count = Some(self.count.unwrap_or(1).saturating_add(1));
        let later = match self.last_timestamp.as_deref() {
            Some(prev) => now > prev,
            None => true,
        };
        if later {
            self.last_timestamp = Some(now.to_string());
        }
        if self.first_timestamp.is_none() {
            self.first_timestamp = self.last_timestamp.clone();
        }
    }

    /// `lastTimestamp`, else `firstTimestamp`, else `eventTime`, else
    /// `metadata.creationTimestamp`.
    pub fn last_seen(&self) -> Option<&str> {
        self.last_timestamp
            .as_deref()
            .or(self.first_timestamp.as_deref())
            .or(self.event_time.as_deref())
            .or(self.metadata.creation_timestamp.as_deref())
    }
}

impl crate::meta::Object for Event {
    fn kind_info() -> &'static crate::KindInfo {
        &crate::types::EVENT_KIND
    }
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Admit for Event {
    fn not_implemented(_path: &str) -> bool {
        false
    }

    fn apply_defaults(&mut self) {
        if self.type_.is_none() {
            self.type_ = Some(NORMAL.into());
        }
        if self.count.is_none() {
            self.count = Some(1);
        }
        if self.first_timestamp.is_none() {
            self.first_timestamp = self.last_timestamp.clone().or_else(|| Some(now_rfc3339()));
        }
        if self.last_timestamp.is_none() {
            self.last_timestamp = self.first_timestamp.clone();
        }
        if let Some(m) = &self.message
            && m.len() > MAX_MESSAGE
        {
            self.message = Some(truncate(m, MAX_MESSAGE));
        }
    }

    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", 253, true, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.involved_object != self.involved_object {
                c.forbidden("involvedObject", "field is immutable");
            }
        }
        if self
            .involved_object
            .kind
            .as_deref()
            .unwrap_or("")
            .is_empty()
        {
            c.required("involvedObject.kind", "Required value");
        }
        if self
            .involved_object
            .name
            .as_deref()
            .unwrap_or("")
            .is_empty()
        {
            c.required("involvedObject.name", "Required value");
        }
        match self.type_.as_deref() {
            Some(NORMAL) | Some(WARNING) => {}
            other => c.not_supported(
                "type",
                format!("Unsupported value: {other:?}: supported values: \"Normal\", \"Warning\""),
            ),
        }
        match self.reason.as_deref() {
            None | Some("") => c.required("reason", "Required value"),
            Some(r) if r.len() > MAX_REASON => c.invalid(
                "reason",
                format!("must be no more than {MAX_REASON} characters"),
            ),
            _ => {}
        }
        if let Some(n) = self.count
            && n < 0
        {
            c.invalid("count", "must be greater than or equal to 0");
        }
        for (f, t) in [
            ("firstTimestamp", &self.first_timestamp),
            ("lastTimestamp", &self.last_timestamp),
        ] {
            if let Some(t) = t
                && crate::meta::parse_rfc3339(t).is_none()
            {
                c.invalid(f, format!("{t:?} is not an RFC 3339 timestamp"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_ref(uid: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("VirtualMachine".into()),
            namespace: Some("default".into()),
            name: Some("web".into()),
            uid: Some(uid.into()),
            api_version: Some("kubevirt.io/v1".into()),
            ..Default::default()
        }
    }

    fn src() -> EventSource {
        EventSource {
            component: Some("krvirt-controller".into()),
            host: None,
        }
    }

    #[test]
    fn same_words_same_name_other_words_other_name() {
        let a = event_name(&vm_ref("u1"), NORMAL, "Started", "started", &src());
        assert_eq!(
            a,
            event_name(&vm_ref("u1"), NORMAL, "Started", "started", &src())
        );
        assert!(a.starts_with("web."), "{a}");
        assert_eq!(a.len(), "web.".len() + 16);
        for other in [
            event_name(&vm_ref("u2"), NORMAL, "Started", "started", &src()),
            event_name(&vm_ref("u1"), WARNING, "Started", "started", &src()),
            event_name(&vm_ref("u1"), NORMAL, "Stopped", "started", &src()),
            event_name(&vm_ref("u1"), NORMAL, "Started", "started!", &src()),
            event_name(
                &vm_ref("u1"),
                NORMAL,
                "Started",
                "started",
                &EventSource::default(),
            ),
        ] {
            assert_ne!(a, other);
        }
    }

    #[test]
    fn new_event_admits_and_bump_aggregates() {
        let mut e = Event::new(vm_ref("u1"), WARNING, "Failed", &"x".repeat(5000), src());
        assert_eq!(e.message.as_ref().map(String::len), Some(MAX_MESSAGE));
        assert_eq!(e.metadata.namespace(), "default");
        assert_eq!(e.count, Some(1));
        let v = serde_json::to_value(&e).unwrap();
        let kind = crate::find_kind("events").unwrap();
        let admitted = crate::admit(kind, v.clone(), None).unwrap();
        assert_eq!(admitted["involvedObject"]["uid"], "u1");
        assert_eq!(admitted["type"], "Warning");
        e.bump("2999-01-01T00:00:00Z");
        e.bump("2000-01-01T00:00:00Z");
        assert_eq!(e.count, Some(3));
        assert_eq!(e.last_timestamp.as_deref(), Some("2999-01-01T00:00:00Z"));
        assert_ne!(e.first_timestamp, e.last_timestamp);
        // involvedObject cannot change on update
        let mut moved = e.clone();
        moved.involved_object.uid = Some("u2".into());
        let err = crate::admit(kind, serde_json::to_value(&moved).unwrap(), Some(&v)).unwrap_err();
        assert!(err.to_string().contains("involvedObject"), "{err}");
    }

    #[test]
    fn validation_names_fields() {
        let kind = crate::find_kind("ev").unwrap();
        let bad = serde_json::json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": "x", "namespace": "default"},
            "involvedObject": {"name": "web"},
            "type": "Bad",
        });
        let err = crate::admit(kind, bad, None).unwrap_err().to_string();
        for f in ["involvedObject.kind", "type", "reason"] {
            assert!(err.contains(f), "{f} missing in {err}");
        }
        let unknown = serde_json::json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": "x"}, "involvedObject": {"kind": "VirtualMachine", "name": "w"},
            "reason": "R", "bogus": 1,
        });
        assert!(crate::admit(kind, unknown, None).is_err());
    }

    #[test]
    fn reference_to_object() {
        let r = ObjectReference::to_object(&serde_json::json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "a", "namespace": "ns", "uid": "u"}}));
        assert_eq!(r.kind.as_deref(), Some("VirtualMachineInstance"));
        assert_eq!(r.namespace.as_deref(), Some("ns"));
        assert_eq!(r.uid.as_deref(), Some("u"));
        assert_eq!(r.api_version.as_deref(), Some("kubevirt.io/v1"));
    }
}
