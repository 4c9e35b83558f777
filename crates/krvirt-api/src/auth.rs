//! Tenancy and access control kinds:
//!
//! - core `v1` Namespace (cluster-scoped) and ResourceQuota (namespaced);
//! - `rbac.authorization.k8s.io/v1` Role, ClusterRole, RoleBinding,
//!   ClusterRoleBinding (Kubernetes' shapes: top-level `rules`,
//!   `subjects`, `roleRef`);
//! - `krvirt.io/v1` Token (cluster-scoped): a bearer token, stored as the
//!   SHA-256 of its secret only.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::admission::{Admit, Causes, idx, join};
use crate::kubevirt::validate::{immutable_identity, metadata};
use crate::meta::{ObjectMeta, null_default};

pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";
pub const RBAC_API_VERSION: &str = "rbac.authorization.k8s.io/v1";

macro_rules! object_impl {
    ($ty:ty, $kind:expr) => {
        impl crate::meta::Object for $ty {
            fn kind_info() -> &'static crate::KindInfo {
                crate::types::kind_named($kind)
            }
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

// ----- Namespace -----

/// core `v1` Namespace: a tenant's scope for namespaced objects.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Namespace {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<NamespaceSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NamespaceStatus>,
}

/// Namespace spec (`finalizers`, accepted for compatibility).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub finalizers: Vec<String>,
}

/// Namespace status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceStatus {
    /// `Active`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

object_impl!(Namespace, "Namespace");

impl Admit for Namespace {
    fn not_implemented(_path: &str) -> bool {
        false
    }
    fn apply_defaults(&mut self) {
        if self.status.is_none() {
            self.status = Some(NamespaceStatus {
                phase: Some("Active".into()),
            });
        }
    }
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", 63, false, c);
        if let Some(name) = self.metadata.name.as_deref()
            && let Some(problem) = crate::util::dns1123_label(name)
        {
            c.invalid("metadata.name", format!("{name:?}: {problem}"));
        }
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
        }
    }
}

// ----- RBAC -----

/// One permission: verbs on resources of API groups (or on non-resource
/// URLs such as `/metrics`). `*` matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `*`.
    #[serde(default, deserialize_with = "null_default")]
    pub verbs: Vec<String>,
    /// API groups (`""` is the core group, `kubevirt.io`, `subresources.kubevirt.io`…).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub api_groups: Vec<String>,
    /// Resources (`virtualmachines`, `virtualmachineinstances/console`, `*`).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub resources: Vec<String>,
    /// Only these object names (empty: any).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub resource_names: Vec<String>,
    /// URL paths outside the resource tree (`/metrics`); ClusterRoles only.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub non_resource_urls: Vec<String>,
}

fn validate_rules(rules: &[PolicyRule], cluster: bool, c: &mut Causes) {
    for (i, r) in rules.iter().enumerate() {
        let p = idx("rules", i);
        if r.verbs.is_empty() {
            c.required(join(&p, "verbs"), "Required value: at least one verb");
        }
        let resource_rule = !r.api_groups.is_empty() || !r.resources.is_empty();
        if !r.non_resource_urls.is_empty() {
            if !cluster {
                c.invalid(
                    join(&p, "nonResourceURLs"),
                    "only a ClusterRole may grant non-resource URLs",
                );
            }
            if resource_rule {
                c.invalid(
                    join(&p, "nonResourceURLs"),
                    "a rule names either resources or non-resource URLs, not both",
                );
            }
        } else if r.resources.is_empty() {
            c.required(join(&p, "resources"), "Required value");
        }
    }
}

/// `rbac.authorization.k8s.io/v1` Role: rules within one namespace.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Role {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub rules: Vec<PolicyRule>,
}

/// `rbac.authorization.k8s.io/v1` ClusterRole: rules usable in every
/// namespace (through a RoleBinding) or cluster-wide (ClusterRoleBinding).
/// `admin`, `edit`, `view` and `cluster-admin` are built in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterRole {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub rules: Vec<PolicyRule>,
}

object_impl!(Role, "Role");
object_impl!(ClusterRole, "ClusterRole");

impl Admit for Role {
    fn not_implemented(path: &str) -> bool {
        path == "aggregationRule"
    }
    fn apply_defaults(&mut self) {}
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", 253, true, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
        }
        validate_rules(&self.rules, false, c);
    }
}

impl Admit for ClusterRole {
    fn not_implemented(path: &str) -> bool {
        path == "aggregationRule"
    }
    fn apply_defaults(&mut self) {}
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", 253, false, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
        }
        validate_rules(&self.rules, true, c);
    }
}

/// Who a binding grants to: `User`, `Group` (or `ServiceAccount`, refused).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RbacSubject {
    /// `User` or `Group`.
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The role a binding grants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleRef {
    #[serde(default)]
    pub api_group: String,
    /// `Role` (RoleBinding only) or `ClusterRole`.
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
}

/// `rbac.authorization.k8s.io/v1` RoleBinding: grants a Role or a
/// ClusterRole's rules within the binding's namespace.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleBinding {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub subjects: Vec<RbacSubject>,
    #[serde(default)]
    pub role_ref: RoleRef,
}

/// `rbac.authorization.k8s.io/v1` ClusterRoleBinding: grants a
/// ClusterRole everywhere.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterRoleBinding {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub subjects: Vec<RbacSubject>,
    #[serde(default)]
    pub role_ref: RoleRef,
}

object_impl!(RoleBinding, "RoleBinding");
object_impl!(ClusterRoleBinding, "ClusterRoleBinding");

fn validate_binding(subjects: &[RbacSubject], role_ref: &RoleRef, cluster: bool, c: &mut Causes) {
    if subjects.is_empty() {
        c.required("subjects", "Required value: at least one subject");
    }
    for (i, s) in subjects.iter().enumerate() {
        let p = idx("subjects", i);
        match s.kind.as_str() {
            "User" | "Group" => {}
            "ServiceAccount" => c.not_supported(
                join(&p, "kind"),
                "Unsupported value: \"ServiceAccount\": krvirt has no service accounts; use \"User\" or \"Group\"",
            ),
            other => c.not_supported(
                join(&p, "kind"),
                format!("Unsupported value: {other:?}: supported values: \"User\", \"Group\""),
            ),
        }
        if s.name.is_empty() {
            c.required(join(&p, "name"), "Required value");
        }
    }
    if !role_ref.api_group.is_empty() && role_ref.api_group != RBAC_GROUP {
        c.not_supported(
            "roleRef.apiGroup",
            format!(
                "Unsupported value: {:?}: must be {RBAC_GROUP:?}",
                role_ref.api_group
            ),
        );
    }
    match role_ref.kind.as_str() {
        "ClusterRole" => {}
        "Role" if !cluster => {}
        other => c.not_supported(
            "roleRef.kind",
            format!(
                "Unsupported value: {other:?}: supported values: {}",
                if cluster {
                    "\"ClusterRole\""
                } else {
                    "\"Role\", \"ClusterRole\""
                }
            ),
        ),
    }
    if role_ref.name.is_empty() {
        c.required("roleRef.name", "Required value");
    }
}

impl Admit for RoleBinding {
    fn not_implemented(_path: &str) -> bool {
        false
    }
    fn apply_defaults(&mut self) {
        if self.role_ref.api_group.is_empty() {
            self.role_ref.api_group = RBAC_GROUP.into();
        }
    }
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", 253, true, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.role_ref != self.role_ref {
                c.forbidden("roleRef", "field is immutable");
            }
        }
        validate_binding(&self.subjects, &self.role_ref, false, c);
    }
}

impl Admit for ClusterRoleBinding {
    fn not_implemented(_path: &str) -> bool {
        false
    }
    fn apply_defaults(&mut self) {
        if self.role_ref.api_group.is_empty() {
            self.role_ref.api_group = RBAC_GROUP.into();
        }
    }
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", 253, false, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.role_ref != self.role_ref {
                c.forbidden("roleRef", "field is immutable");
            }
        }
        validate_binding(&self.subjects, &self.role_ref, true, c);
    }
}

// ----- ResourceQuota -----

/// The quota resources krvirt enforces.
pub const QUOTA_RESOURCES: &[&str] = &[
    "requests.cpu",
    "limits.cpu",
    "requests.memory",
    "limits.memory",
    "requests.storage",
    "count/virtualmachines.kubevirt.io",
    "count/virtualmachineinstances.kubevirt.io",
];

/// core `v1` ResourceQuota: hard limits per namespace, enforced when
/// objects are created or changed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceQuota {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ResourceQuotaSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ResourceQuotaStatus>,
}

/// The limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceQuotaSpec {
    /// Resource name → quantity (`requests.cpu: "4"`, `requests.memory: 8Gi`,
    /// `count/virtualmachines.kubevirt.io: "10"`, `requests.storage: 100Gi`).
    #[serde(default, deserialize_with = "null_default")]
    pub hard: BTreeMap<String, String>,
}

/// Observed usage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceQuotaStatus {
    #[serde(default, deserialize_with = "null_default")]
    pub hard: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_default")]
    pub used: BTreeMap<String, String>,
}

object_impl!(ResourceQuota, "ResourceQuota");

impl Admit for ResourceQuota {
    fn not_implemented(path: &str) -> bool {
        path == "spec.scopes" || path == "spec.scopeSelector"
    }
    fn apply_defaults(&mut self) {}
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", 253, true, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
        }
        for (k, v) in &self.spec.hard {
            let p = format!("spec.hard[{k}]");
            if !QUOTA_RESOURCES.contains(&k.as_str()) {
                c.not_supported(
                    p,
                    format!(
                        "Unsupported value: {k:?}: supported values: {}",
                        QUOTA_RESOURCES.join(", ")
                    ),
                );
                continue;
            }
            let ok = if k.ends_with(".cpu") {
                crate::quantity::parse_cpu_millis(v).is_ok()
            } else {
                crate::quantity::parse_quantity(v).is_ok()
            };
            if !ok {
                c.invalid(p, format!("{v:?}: not a valid quantity"));
            }
        }
    }
}

// ----- Token -----

/// `krvirt.io/v1` Token: a bearer token. The secret itself is never
/// stored: `spec.secretHash` is the SHA-256 (hex) of the secret part of
/// `krv_<name>_<secret>`. A 256-bit random secret cannot be guessed, so a
/// fast hash is enough (a slow password hash such as argon2 protects
/// low-entropy passwords; it would only cost time on every request here).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Token {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: TokenSpec,
}

/// Who the token authenticates, and until when.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenSpec {
    /// The user name requests carry (RBAC subjects of kind User match it).
    #[serde(default)]
    pub user: String,
    /// Groups (RBAC subjects of kind Group match them).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub groups: Vec<String>,
    /// Informational: the namespace the token was made for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// SHA-256 (64 hex digits) of the token's secret.
    #[serde(default)]
    pub secret_hash: String,
    /// RFC 3339 time after which the token is refused (none: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// A revoked token is refused.
    #[serde(default)]
    pub revoked: bool,
    /// A join token: only good for an agent's certificate request, once.
    #[serde(default)]
    pub join: bool,
    /// When a join token was used (it is refused after that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<String>,
}

object_impl!(Token, "Token");

impl Admit for Token {
    fn not_implemented(_path: &str) -> bool {
        false
    }
    fn apply_defaults(&mut self) {}
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", 63, false, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.spec.secret_hash != self.spec.secret_hash {
                c.forbidden("spec.secretHash", "field is immutable");
            }
            if old.spec.user != self.spec.user {
                c.forbidden("spec.user", "field is immutable");
            }
            if old.spec.revoked && !self.spec.revoked {
                c.forbidden("spec.revoked", "a revoked token stays revoked");
            }
        }
        if self.spec.user.is_empty() && !self.spec.join {
            c.required("spec.user", "Required value");
        }
        let h = &self.spec.secret_hash;
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            c.invalid(
                "spec.secretHash",
                "must be the SHA-256 of the secret as 64 hex digits",
            );
        }
        if let Some(e) = &self.spec.expires
            && chrono::DateTime::parse_from_rfc3339(e).is_err()
        {
            c.invalid("spec.expires", format!("{e:?}: not an RFC 3339 time"));
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    fn fields(kind: &str, obj: serde_json::Value) -> Vec<String> {
        let k = crate::find_kind(kind).expect("served");
        match crate::admit(k, obj, None) {
            Ok(_) => Vec::new(),
            Err(e) => e.causes.iter().map(|c| c.field.clone()).collect(),
        }
    }

    #[test]
    fn bad_objects_are_refused_by_field() {
        let f = fields(
            "tokens",
            json!({"apiVersion": "krvirt.io/v1", "kind": "Token", "metadata": {"name": "t1"},
                   "spec": {"user": "a", "secretHash": "xyz", "expires": "soon"}}),
        );
        assert_eq!(f, ["spec.secretHash", "spec.expires"]);
        let f = fields(
            "clusterrolebindings",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": "b"},
                   "subjects": [{"kind": "ServiceAccount", "name": "x"}],
                   "roleRef": {"kind": "Role", "name": "r"}}),
        );
        assert_eq!(f, ["subjects[0].kind", "roleRef.kind"]);
        let f = fields(
            "resourcequotas",
            json!({"apiVersion": "v1", "kind": "ResourceQuota",
                   "metadata": {"name": "q", "namespace": "a"},
                   "spec": {"hard": {"pods": "3", "requests.cpu": "lots"}}}),
        );
        assert_eq!(f, ["spec.hard[pods]", "spec.hard[requests.cpu]"]);
        let f = fields(
            "roles",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": "r", "namespace": "a"},
                   "rules": [{"verbs": ["get"], "nonResourceURLs": ["/metrics"]}]}),
        );
        assert_eq!(f, ["rules[0].nonResourceURLs"]);
        let ok = fields(
            "rolebindings",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "b", "namespace": "a"},
                   "subjects": [{"kind": "User", "name": "alice"}],
                   "roleRef": {"kind": "ClusterRole", "name": "edit"}}),
        );
        assert!(ok.is_empty(), "{ok:?}");
    }
}
