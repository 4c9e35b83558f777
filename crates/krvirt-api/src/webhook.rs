//! `krvirt.io/v1` Webhook: deliver the Events of a namespace to an HTTP
//! endpoint, signed with HMAC-SHA256. Namespaced: a Webhook sees the events
//! of its own namespace only (so a tenant's hook never receives another
//! tenant's events once authorization lands).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::admission::{Admit, Causes, idx};
use crate::kubevirt::validate::{immutable_identity, metadata};
use crate::meta::{Condition, ObjectMeta, null_default};

pub const API_VERSION: &str = "krvirt.io/v1";
/// Deliveries tried per event when `maxAttempts` is not set.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Largest `maxAttempts`.
pub const MAX_ATTEMPTS_LIMIT: u32 = 20;

/// Header carrying `sha256=<hex>`: HMAC-SHA256 with the secret over
/// `"{timestamp}.{body}"`.
pub const SIGNATURE_HEADER: &str = "X-Krvirt-Signature";
/// Header carrying the delivery's Unix time in seconds (covered by the
/// signature, so a receiver can refuse old deliveries: replay protection).
pub const TIMESTAMP_HEADER: &str = "X-Krvirt-Timestamp";
/// Header carrying a unique id per event occurrence (retries repeat it).
pub const DELIVERY_HEADER: &str = "X-Krvirt-Delivery";

/// An event subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Webhook {
    /// `krvirt.io/v1`
    #[serde(default)]
    pub api_version: String,
    /// `Webhook`
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WebhookSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<WebhookStatus>,
}

impl Default for Webhook {
    fn default() -> Self {
        Webhook {
            api_version: API_VERSION.into(),
            kind: "Webhook".into(),
            metadata: ObjectMeta::default(),
            spec: WebhookSpec::default(),
            status: None,
        }
    }
}

/// Where to deliver which events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookSpec {
    /// `http://` or `https://` endpoint receiving a POST per event.
    #[serde(default)]
    pub url: String,
    /// Only events with one of these reasons (empty: every reason).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub event_reasons: Vec<String>,
    /// Only events about objects of these kinds (empty: every kind).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub kinds: Vec<String>,
    /// Only events of these types, `Normal` / `Warning` (empty: both).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub event_types: Vec<String>,
    /// The HMAC key, inline. (`secretRef` waits for a Secret kind.)
    #[serde(default)]
    pub secret: String,
    /// Attempts per event before it is counted as failed
    /// (default 5; back-off doubles from 500 ms, capped at 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// Delivery counters, written by the webhook controller.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookStatus {
    /// Events acknowledged with a 2xx.
    #[serde(default)]
    pub delivered: u64,
    /// Events given up on after `maxAttempts`.
    #[serde(default)]
    pub failed: u64,
    /// Events dropped because the delivery queue was full.
    #[serde(default)]
    pub dropped: u64,
    /// RFC 3339 time of the last successful delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery_time: Option<String>,
    /// The last delivery error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
}

impl WebhookSpec {
    /// Whether an event (`type`, `reason`, involved object `kind`) is
    /// selected by this hook's filters.
    pub fn selects(&self, type_: &str, reason: &str, kind: &str) -> bool {
        (self.event_reasons.is_empty() || self.event_reasons.iter().any(|r| r == reason))
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| k == kind))
            && (self.event_types.is_empty() || self.event_types.iter().any(|t| t == type_))
    }

    pub fn attempts(&self) -> u32 {
        self.max_attempts
            .unwrap_or(DEFAULT_MAX_ATTEMPTS)
            .clamp(1, MAX_ATTEMPTS_LIMIT)
    }
}

impl crate::meta::Object for Webhook {
    fn kind_info() -> &'static crate::KindInfo {
        &crate::types::WEBHOOK_KIND
    }
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Admit for Webhook {
    fn not_implemented(path: &str) -> bool {
        path == "spec.secretRef"
    }

    fn apply_defaults(&mut self) {}

    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", 253, true, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
        }
        let url = self.spec.url.as_str();
        if url.is_empty() {
            c.required("spec.url", "Required value");
        } else if !(url.starts_with("http://") || url.starts_with("https://"))
            || url.len() <= "http://".len()
            || url.chars().any(char::is_whitespace)
        {
            c.invalid(
                "spec.url",
                format!("{url:?}: must be an http:// or https:// URL"),
            );
        }
        if self.spec.secret.is_empty() {
            c.required(
                "spec.secret",
                "Required value: deliveries are always signed",
            );
        }
        for (i, t) in self.spec.event_types.iter().enumerate() {
            if t != crate::event::NORMAL && t != crate::event::WARNING {
                c.not_supported(
                    idx("spec.eventTypes", i),
                    format!("Unsupported value: {t:?}: supported values: \"Normal\", \"Warning\""),
                );
            }
        }
        if let Some(n) = self.spec.max_attempts
            && !(1..=MAX_ATTEMPTS_LIMIT).contains(&n)
        {
            c.invalid(
                "spec.maxAttempts",
                format!("must be between 1 and {MAX_ATTEMPTS_LIMIT}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn admission() {
        let kind = crate::find_kind("webhooks").unwrap();
        let ok = json!({"apiVersion": API_VERSION, "kind": "Webhook",
            "metadata": {"name": "h", "namespace": "default"},
            "spec": {"url": "http://127.0.0.1:9/x", "secret": "s", "eventReasons": ["Started"]}});
        crate::admit(kind, ok, None).unwrap();
        let bad = json!({"apiVersion": API_VERSION, "kind": "Webhook",
            "metadata": {"name": "h"},
            "spec": {"url": "ftp://x", "eventTypes": ["Bad"], "maxAttempts": 0}});
        let err = crate::admit(kind, bad, None).unwrap_err().to_string();
        for f in [
            "spec.url",
            "spec.secret",
            "spec.eventTypes[0]",
            "spec.maxAttempts",
        ] {
            assert!(err.contains(f), "{f} missing in {err}");
        }
        let secret_ref = json!({"apiVersion": API_VERSION, "kind": "Webhook",
            "metadata": {"name": "h"},
            "spec": {"url": "http://x", "secretRef": {"name": "s"}}});
        let err = crate::admit(kind, secret_ref, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.secretRef"), "{err}");
    }

    #[test]
    fn filters() {
        let mut s = WebhookSpec::default();
        assert!(s.selects("Normal", "Started", "VirtualMachineInstance"));
        s.event_reasons = vec!["Started".into()];
        s.kinds = vec!["VirtualMachineInstance".into()];
        assert!(s.selects("Normal", "Started", "VirtualMachineInstance"));
        assert!(!s.selects("Normal", "Stopped", "VirtualMachineInstance"));
        assert!(!s.selects("Normal", "Started", "VirtualMachine"));
        s.event_types = vec!["Warning".into()];
        assert!(!s.selects("Normal", "Started", "VirtualMachineInstance"));
        assert_eq!(s.attempts(), DEFAULT_MAX_ATTEMPTS);
    }
}
