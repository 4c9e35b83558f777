//! Kubernetes object metadata shared by every kind (`metadata`, owner
//! references, conditions) and RFC 3339 timestamp helpers.
//!
//! Timestamps are RFC 3339 strings in UTC with second precision
//! (`2024-05-01T12:00:00Z`), as Kubernetes' `metav1.Time` serialises them.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

/// Current time as an RFC 3339 UTC timestamp with second precision.
pub fn now_rfc3339() -> String {
    to_rfc3339(chrono::Utc::now())
}

/// Format a time as Kubernetes does (`2024-05-01T12:00:00Z`).
pub fn to_rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Parse an RFC 3339 timestamp (any offset, any sub-second precision).
pub fn parse_rfc3339(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Deserialize a collection treating JSON `null` like an absent field
/// (Kubernetes clients send `null` for empty lists and maps).
pub(crate) fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

/// Standard object metadata (`metav1.ObjectMeta`). `managedFields` and
/// `selfLink` sent by Kubernetes tooling are accepted and dropped by
/// admission; any other unknown field is refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Unique within the namespace (DNS-1123 subdomain, at most 63
    /// characters for KubeVirt kinds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Prefix from which the server generates `name` when it is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Set by the server on creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Store modification revision, set by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Incremented by the server on every spec change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// RFC 3339, set by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// RFC 3339, set by the server when deletion was requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_grace_period_seconds: Option<i64>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub finalizers: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub owner_references: Vec<OwnerReference>,
}

impl ObjectMeta {
    /// Metadata with just a name and namespace.
    pub fn named(namespace: Option<&str>, name: &str) -> Self {
        ObjectMeta {
            name: Some(name.to_string()),
            namespace: namespace.map(str::to_string),
            ..Default::default()
        }
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("")
    }
}

/// Reference to the owning object (garbage collection, controllers).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OwnerReference {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub uid: String,
    /// The owner is the managing controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_owner_deletion: Option<bool>,
}

/// Condition status, as Kubernetes' `ConditionStatus`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum ConditionStatus {
    True,
    False,
    #[default]
    Unknown,
}

/// One observed condition of an object (`Ready`, `Paused`, …).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

impl Condition {
    /// A condition stamped with the current time as transition time.
    pub fn new(type_: &str, status: ConditionStatus) -> Self {
        Condition {
            type_: type_.to_string(),
            status,
            last_transition_time: Some(now_rfc3339()),
            ..Default::default()
        }
    }
}

/// Set `cond` in `conditions` (replacing one of the same type). The
/// transition time is kept when the status did not change.
pub fn set_condition(conditions: &mut Vec<Condition>, mut cond: Condition) {
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == cond.type_) {
        if existing.status == cond.status && existing.last_transition_time.is_some() {
            cond.last_transition_time = existing.last_transition_time.clone();
        }
        *existing = cond;
    } else {
        conditions.push(cond);
    }
}

/// Find a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Implemented by every served kind: typed access to the Kubernetes
/// envelope for generic code (server, client, controllers).
pub trait Object: Serialize + serde::de::DeserializeOwned + Clone + std::fmt::Debug {
    /// The registry entry for this kind.
    fn kind_info() -> &'static crate::KindInfo;
    fn metadata(&self) -> &ObjectMeta;
    fn metadata_mut(&mut self) -> &mut ObjectMeta;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        let now = now_rfc3339();
        assert!(now.ends_with('Z'), "{now}");
        assert_eq!(now.len(), "2024-05-01T12:00:00Z".len());
        let t = parse_rfc3339("2024-05-01T14:00:00+02:00").expect("valid");
        assert_eq!(to_rfc3339(t), "2024-05-01T12:00:00Z");
        assert!(parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn metadata_is_strict_and_null_tolerant() {
        let m: ObjectMeta = serde_json::from_value(serde_json::json!({
            "name": "a", "labels": null, "creationTimestamp": null, "finalizers": null
        }))
        .expect("lenient about nulls");
        assert_eq!(m.name(), "a");
        assert!(m.labels.is_empty());
        assert!(
            serde_json::from_value::<ObjectMeta>(serde_json::json!({"name": "a", "nmae": "b"}))
                .is_err()
        );
        assert_eq!(
            serde_json::to_value(&m).expect("ser"),
            serde_json::json!({"name": "a"})
        );
    }

    #[test]
    fn set_condition_keeps_transition_time() {
        let mut conds = vec![Condition {
            type_: "Ready".into(),
            status: ConditionStatus::True,
            last_transition_time: Some("2024-01-01T00:00:00Z".into()),
            ..Default::default()
        }];
        set_condition(&mut conds, Condition::new("Ready", ConditionStatus::True));
        assert_eq!(
            conds[0].last_transition_time.as_deref(),
            Some("2024-01-01T00:00:00Z")
        );
        set_condition(&mut conds, Condition::new("Ready", ConditionStatus::False));
        assert_ne!(
            conds[0].last_transition_time.as_deref(),
            Some("2024-01-01T00:00:00Z")
        );
        set_condition(&mut conds, Condition::new("Paused", ConditionStatus::False));
        assert_eq!(conds.len(), 2);
        assert!(find_condition(&conds, "Paused").is_some());
    }
}
