//! The registry of kinds the API server serves.

use serde_json::Value;

use crate::ValidationError;

/// Static description of one served kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    /// API group, e.g. `kubevirt.io`; empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// Lower-case plural used in URLs, e.g. `virtualmachines`.
    pub plural: &'static str,
    /// Lower-case singular, e.g. `virtualmachine`.
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
    /// Subresources served under `/apis/subresources.{group}/{version}/…`
    /// (KubeVirt's `start`, `stop`, …), besides `status`.
    pub subresources: &'static [&'static str],
    /// Name of the component schema in the OpenAPI document.
    pub schema_name: &'static str,
}

impl KindInfo {
    /// `group/version`, or just `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Every kind the server serves.
pub fn kinds() -> &'static [KindInfo] {
    crate::types::KINDS
}

/// Look a kind up by plural, singular, kind name or short name (case-insensitive).
pub fn find_kind(name: &str) -> Option<&'static KindInfo> {
    let n = name.to_ascii_lowercase();
    kinds().iter().find(|k| {
        k.plural == n
            || k.singular == n
            || k.kind.to_ascii_lowercase() == n
            || k.short_names.contains(&n.as_str())
    })
}

/// Admission: parse `obj` as `kind`'s typed struct (refusing unknown or
/// unsupported fields by path), validate it, apply defaults and return the
/// normalised JSON. `old` is the stored object on update (for immutability
/// checks). `metadata` and `status` bookkeeping (uid, resourceVersion,
/// creationTimestamp, generation) is the server's job, not this function's.
pub fn admit(kind: &KindInfo, obj: Value, old: Option<&Value>) -> Result<Value, ValidationError> {
    crate::types::admit(kind, obj, old)
}

/// The served kind of a decoded object, from its `apiVersion` and `kind`.
/// Refuses unknown kinds (cause on `kind`) and known kinds under another
/// `apiVersion` (cause on `apiVersion`), e.g. for multi-document apply.
pub fn kind_for_object(obj: &Value) -> Result<&'static KindInfo, ValidationError> {
    crate::types::kind_for_object(obj)
}
