//! Role-based access control with Kubernetes' semantics: Roles and
//! ClusterRoles hold rules (verbs × API groups × resources [× names], or
//! non-resource URLs); RoleBindings grant a Role or ClusterRole within their
//! namespace, ClusterRoleBindings grant a ClusterRole everywhere. Only
//! grants exist (no deny rules).
//!
//! Built-in ClusterRoles (always present, whatever the store holds):
//! `cluster-admin` (everything), `admin` (everything on namespaced kinds
//! and their subresources, quotas read-only), `edit` (like admin without
//! Roles and RoleBindings), `view` (get/list/watch on namespaced kinds, no
//! consoles; `/metrics` when bound cluster-wide).
//!
//! The RBAC objects, Namespaces and ResourceQuotas are held in memory,
//! refreshed by watches; a request that would be denied re-reads the store
//! first, so a grant is effective as soon as its object is written.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use futures::StreamExt;
use krvirt_api::KindInfo;
use krvirt_api::auth::{PolicyRule, RbacSubject, RoleRef};
use serde_json::Value;

use crate::ApiError;
use crate::auth::Identity;
use crate::registry::Registry;
use crate::selector::Selector;

/// What a request does, in RBAC terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attrs {
    /// get, list, watch, create, update, patch, delete, deletecollection
    pub verb: String,
    pub group: String,
    /// `virtualmachines`, `virtualmachines/status`, `virtualmachineinstances/console`
    pub resource: String,
    pub namespace: String,
    pub name: String,
    /// Set for requests outside the resource tree (`/metrics`).
    pub non_resource_path: Option<String>,
}

struct Binding {
    namespace: String,
    subjects: Vec<RbacSubject>,
    role_ref: RoleRef,
}

#[derive(Default)]
struct Snapshot {
    /// Store revision read before the lists (0: never loaded).
    revision: i64,
    roles: HashMap<(String, String), Vec<PolicyRule>>,
    cluster_roles: HashMap<String, Vec<PolicyRule>>,
    bindings: Vec<Binding>,
    cluster_bindings: Vec<Binding>,
    namespaces: HashSet<String>,
    /// namespace -> quota name -> hard limits
    quotas: HashMap<String, BTreeMap<String, BTreeMap<String, String>>>,
}

/// The RBAC state of a server.
pub struct Rbac {
    registry: Registry,
    snap: RwLock<Arc<Snapshot>>,
}

fn rule(verbs: &[&str], groups: &[&str], resources: &[&str]) -> PolicyRule {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
    PolicyRule {
        verbs: s(verbs),
        api_groups: s(groups),
        resources: s(resources),
        ..Default::default()
    }
}

const READ: &[&str] = &["get", "list", "watch"];

/// The built-in ClusterRoles.
pub fn builtin_cluster_roles() -> &'static HashMap<String, Vec<PolicyRule>> {
    static ROLES: OnceLock<HashMap<String, Vec<PolicyRule>>> = OnceLock::new();
    ROLES.get_or_init(|| {
        let mut namespaced: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut subresources: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for k in krvirt_api::kinds().iter().filter(|k| k.namespaced) {
            let e = namespaced.entry(k.group).or_default();
            e.push(k.plural.to_string());
            e.push(format!("{}/status", k.plural));
            for sub in crate::http::implemented_subresources(k) {
                subresources
                    .entry(crate::http::subresource_group(k.group))
                    .or_default()
                    .push(format!("{}/{}", k.plural, sub.0));
            }
        }
        let all = |exclude: &[&str]| -> Vec<PolicyRule> {
            let mut rules = Vec::new();
            for (g, rs) in &namespaced {
                let rs: Vec<&str> = rs
                    .iter()
                    .map(String::as_str)
                    .filter(|r| !exclude.iter().any(|x| r.split('/').next() == Some(*x)))
                    .collect();
                rules.push(rule(&["*"], &[g], &rs));
            }
            for (g, rs) in &subresources {
                let rs: Vec<&str> = rs.iter().map(String::as_str).collect();
                rules.push(rule(&["*"], &[g.as_str()], &rs));
            }
            rules.push(rule(
                READ,
                &[""],
                &["resourcequotas", "resourcequotas/status"],
            ));
            rules
        };
        let mut view = Vec::new();
        for (g, rs) in &namespaced {
            let rs: Vec<&str> = rs
                .iter()
                .map(String::as_str)
                .filter(|r| !r.starts_with("roles") && !r.starts_with("rolebindings"))
                .collect();
            view.push(rule(READ, &[g], &rs));
        }
        view.push(PolicyRule {
            verbs: vec!["get".into()],
            non_resource_urls: vec!["/metrics".into()],
            ..Default::default()
        });
        let mut m = HashMap::new();
        m.insert(
            "cluster-admin".to_string(),
            vec![
                rule(&["*"], &["*"], &["*"]),
                PolicyRule {
                    verbs: vec!["*".into()],
                    non_resource_urls: vec!["*".into()],
                    ..Default::default()
                },
            ],
        );
        m.insert("admin".to_string(), all(&["resourcequotas"]));
        m.insert(
            "edit".to_string(),
            all(&["resourcequotas", "roles", "rolebindings"]),
        );
        m.insert("view".to_string(), view);
        m
    })
}

fn matches(list: &[String], v: &str) -> bool {
    list.iter().any(|x| x == "*" || x == v)
}

/// Whether `rule` grants `a` (`allow_non_resource`: only ClusterRoles
/// bound cluster-wide grant non-resource URLs).
pub fn rule_allows(rule: &PolicyRule, a: &Attrs, allow_non_resource: bool) -> bool {
    if !matches(&rule.verbs, &a.verb) {
        return false;
    }
    match &a.non_resource_path {
        Some(p) => {
            allow_non_resource
                && rule.non_resource_urls.iter().any(|u| {
                    u == "*" || u == p || u.strip_suffix('*').is_some_and(|pre| p.starts_with(pre))
                })
        }
        None => {
            let resource_ok = rule.resources.iter().any(|r| {
                r == "*"
                    || *r == a.resource
                    || r.strip_suffix("/*")
                        .is_some_and(|base| a.resource.split('/').next() == Some(base))
            });
            matches(&rule.api_groups, &a.group)
                && resource_ok
                && (rule.resource_names.is_empty() || rule.resource_names.contains(&a.name))
        }
    }
}

fn subject_matches(s: &RbacSubject, id: &Identity) -> bool {
    match s.kind.as_str() {
        "User" => s.name == id.user,
        "Group" => id.groups.contains(&s.name),
        _ => false,
    }
}

fn kind(group: &str, name: &str) -> Result<&'static KindInfo, ApiError> {
    krvirt_api::kinds()
        .iter()
        .find(|k| k.group == group && k.kind == name)
        .ok_or_else(|| ApiError::Internal(format!("kind {name} not registered")))
}

impl Snapshot {
    fn cluster_role(&self, name: &str) -> Vec<&PolicyRule> {
        let mut out: Vec<&PolicyRule> = Vec::new();
        if let Some(r) = builtin_cluster_roles().get(name) {
            out.extend(r.iter());
        }
        if let Some(r) = self.cluster_roles.get(name) {
            out.extend(r.iter());
        }
        out
    }

    fn allowed(&self, id: &Identity, a: &Attrs) -> bool {
        for b in &self.cluster_bindings {
            if b.subjects.iter().any(|s| subject_matches(s, id))
                && self
                    .cluster_role(&b.role_ref.name)
                    .iter()
                    .any(|r| rule_allows(r, a, true))
            {
                return true;
            }
        }
        if a.namespace.is_empty() || a.non_resource_path.is_some() {
            return false;
        }
        for b in self.bindings.iter().filter(|b| b.namespace == a.namespace) {
            if !b.subjects.iter().any(|s| subject_matches(s, id)) {
                continue;
            }
            let ok = match b.role_ref.kind.as_str() {
                "Role" => self
                    .roles
                    .get(&(b.namespace.clone(), b.role_ref.name.clone()))
                    .is_some_and(|rs| rs.iter().any(|r| rule_allows(r, a, false))),
                _ => self
                    .cluster_role(&b.role_ref.name)
                    .iter()
                    .any(|r| rule_allows(r, a, false)),
            };
            if ok {
                return true;
            }
        }
        false
    }
}

fn rules_of(obj: &Value) -> Vec<PolicyRule> {
    obj.get("rules")
        .cloned()
        .and_then(|r| serde_json::from_value(r).ok())
        .unwrap_or_default()
}

fn binding_of(obj: &Value) -> Binding {
    Binding {
        namespace: obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        subjects: obj
            .get("subjects")
            .cloned()
            .and_then(|s| serde_json::from_value(s).ok())
            .unwrap_or_default(),
        role_ref: obj
            .get("roleRef")
            .cloned()
            .and_then(|s| serde_json::from_value(s).ok())
            .unwrap_or_default(),
    }
}

impl Rbac {
    pub fn new(registry: Registry) -> Rbac {
        Rbac {
            registry,
            snap: RwLock::new(Arc::new(Snapshot::default())),
        }
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        match self.snap.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Re-read every RBAC object, Namespace and ResourceQuota.
    pub async fn reload(&self) -> Result<(), ApiError> {
        let sel = Selector::default();
        let reg = &self.registry;
        let rbac = krvirt_api::auth::RBAC_GROUP;
        let mut s = Snapshot {
            revision: self.store_revision().await.unwrap_or(0),
            ..Default::default()
        };
        for o in reg.list(kind(rbac, "Role")?, None, &sel).await?.0 {
            let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            s.roles
                .insert((ns.to_string(), name.to_string()), rules_of(&o));
        }
        for o in reg.list(kind(rbac, "ClusterRole")?, None, &sel).await?.0 {
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            s.cluster_roles.insert(name.to_string(), rules_of(&o));
        }
        for o in reg.list(kind(rbac, "RoleBinding")?, None, &sel).await?.0 {
            s.bindings.push(binding_of(&o));
        }
        for o in reg
            .list(kind(rbac, "ClusterRoleBinding")?, None, &sel)
            .await?
            .0
        {
            s.cluster_bindings.push(binding_of(&o));
        }
        for o in reg.list(kind("", "Namespace")?, None, &sel).await?.0 {
            if o["metadata"]["deletionTimestamp"].is_null()
                && let Some(n) = o["metadata"]["name"].as_str()
            {
                s.namespaces.insert(n.to_string());
            }
        }
        for o in reg.list(kind("", "ResourceQuota")?, None, &sel).await?.0 {
            let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            let hard: BTreeMap<String, String> = o["spec"]["hard"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            s.quotas
                .entry(ns.to_string())
                .or_default()
                .insert(name.to_string(), hard);
        }
        match self.snap.write() {
            Ok(mut w) => *w = Arc::new(s),
            Err(p) => *p.into_inner() = Arc::new(s),
        }
        Ok(())
    }

    /// Keep the snapshot current: reload whenever one of the watched kinds
    /// changes (debounced), until `shutdown`.
    pub fn spawn_watch(self: &Arc<Self>, shutdown: tokio_util::sync::CancellationToken)
    where
        Self: Send + Sync + 'static,
    {
        let me = self.clone();
        tokio::spawn(async move {
            let rbac = krvirt_api::auth::RBAC_GROUP;
            let kinds = [
                (rbac, "Role"),
                (rbac, "ClusterRole"),
                (rbac, "RoleBinding"),
                (rbac, "ClusterRoleBinding"),
                ("", "Namespace"),
                ("", "ResourceQuota"),
            ];
            loop {
                let mut streams = Vec::new();
                for (g, k) in kinds {
                    let Ok(kind) = kind(g, k) else { return };
                    match me
                        .registry
                        .watch(kind, None, Selector::default(), None)
                        .await
                    {
                        Ok(s) => streams.push(s),
                        Err(e) => tracing::warn!(error = %e, "RBAC watch failed"),
                    }
                }
                let mut all = futures::stream::select_all(streams);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        ev = all.next() => match ev {
                            Some(Ok(_)) => {
                                if let Err(e) = me.reload().await {
                                    tracing::warn!(error = %e, "RBAC reload failed");
                                }
                            }
                            Some(Err(_)) | None => break,
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                let _ = me.reload().await;
            }
        });
    }

    async fn store_revision(&self) -> Result<i64, ApiError> {
        self.registry
            .store()
            .revision()
            .await
            .map_err(|e| ApiError::ServiceUnavailable(format!("store: {e}")))
    }

    /// Re-read only when the store moved since the snapshot was taken (a
    /// stream of refused requests costs one cheap revision read each).
    async fn refresh_if_stale(&self) -> Result<(), ApiError> {
        if self.store_revision().await? != self.snapshot().revision {
            self.reload().await?;
        }
        Ok(())
    }

    /// Whether `id` may do `a`. Before a denial the store is checked for
    /// changes the watch has not delivered yet.
    pub async fn allowed(&self, id: &Identity, a: &Attrs) -> bool {
        if self.snapshot().allowed(id, a) {
            return true;
        }
        if self.refresh_if_stale().await.is_err() {
            return false;
        }
        self.snapshot().allowed(id, a)
    }

    /// Whether the Namespace `ns` exists (checking the store when not known).
    pub async fn namespace_exists(&self, ns: &str) -> Result<bool, ApiError> {
        if self.snapshot().namespaces.contains(ns) {
            return Ok(true);
        }
        self.refresh_if_stale().await?;
        Ok(self.snapshot().namespaces.contains(ns))
    }

    /// The quotas of `ns` (name → hard limits), if any.
    pub fn quotas(&self, ns: &str) -> Option<BTreeMap<String, BTreeMap<String, String>>> {
        self.snapshot()
            .quotas
            .get(ns)
            .filter(|q| !q.is_empty())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(verb: &str, group: &str, resource: &str, ns: &str, name: &str) -> Attrs {
        Attrs {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: ns.into(),
            name: name.into(),
            non_resource_path: None,
        }
    }

    fn role_allows(role: &str, a: &Attrs) -> bool {
        builtin_cluster_roles()[role]
            .iter()
            .any(|r| rule_allows(r, a, true))
    }

    #[test]
    fn builtin_roles() {
        let create_vm = attrs("create", "kubevirt.io", "virtualmachines", "a", "");
        let list_vm = attrs("list", "kubevirt.io", "virtualmachines", "a", "");
        let console = attrs(
            "get",
            "subresources.kubevirt.io",
            "virtualmachineinstances/console",
            "a",
            "x",
        );
        let bind = attrs(
            "create",
            "rbac.authorization.k8s.io",
            "rolebindings",
            "a",
            "",
        );
        let quota = attrs("update", "", "resourcequotas", "a", "q");
        let metrics = Attrs {
            verb: "get".into(),
            non_resource_path: Some("/metrics".into()),
            ..Default::default()
        };
        assert!(role_allows("view", &list_vm) && !role_allows("view", &create_vm));
        assert!(!role_allows("view", &console) && role_allows("edit", &console));
        assert!(role_allows("edit", &create_vm) && !role_allows("edit", &bind));
        assert!(role_allows("admin", &bind) && !role_allows("admin", &quota));
        assert!(role_allows("view", &metrics) && !role_allows("edit", &metrics));
        assert!(role_allows("cluster-admin", &quota) && role_allows("cluster-admin", &metrics));
        // cluster-scoped kinds are not in the namespaced roles
        let tokens = attrs("list", "krvirt.io", "tokens", "", "");
        assert!(!role_allows("admin", &tokens) && !role_allows("view", &tokens));
    }

    #[test]
    fn custom_rules() {
        let r = PolicyRule {
            verbs: vec!["get".into(), "update".into()],
            api_groups: vec!["subresources.kubevirt.io".into()],
            resources: vec!["virtualmachines/*".into()],
            resource_names: vec!["web".into()],
            ..Default::default()
        };
        let start = |name: &str| {
            attrs(
                "update",
                "subresources.kubevirt.io",
                "virtualmachines/start",
                "a",
                name,
            )
        };
        assert!(rule_allows(&r, &start("web"), false));
        assert!(!rule_allows(&r, &start("db"), false), "resourceNames");
        let mut del = start("web");
        del.verb = "delete".into();
        assert!(!rule_allows(&r, &del, false), "verbs");
        let nr = PolicyRule {
            verbs: vec!["get".into()],
            non_resource_urls: vec!["/metrics*".into()],
            ..Default::default()
        };
        let m = Attrs {
            verb: "get".into(),
            non_resource_path: Some("/metrics".into()),
            ..Default::default()
        };
        assert!(rule_allows(&nr, &m, true));
        assert!(
            !rule_allows(&nr, &m, false),
            "only through a ClusterRoleBinding"
        );
    }

    #[test]
    fn bindings_are_scoped_to_their_namespace() {
        let mut s = Snapshot::default();
        s.bindings.push(Binding {
            namespace: "a".into(),
            subjects: vec![RbacSubject {
                kind: "Group".into(),
                name: "team".into(),
                ..Default::default()
            }],
            role_ref: RoleRef {
                kind: "ClusterRole".into(),
                name: "edit".into(),
                api_group: krvirt_api::auth::RBAC_GROUP.into(),
            },
        });
        let id = Identity {
            user: "u".into(),
            groups: vec!["team".into()],
        };
        let other = Identity {
            user: "team".into(),
            groups: vec![],
        };
        let in_a = attrs("create", "kubevirt.io", "virtualmachines", "a", "");
        let in_b = attrs("create", "kubevirt.io", "virtualmachines", "b", "");
        let all = attrs("list", "kubevirt.io", "virtualmachines", "", "");
        assert!(s.allowed(&id, &in_a));
        assert!(!s.allowed(&id, &in_b));
        assert!(
            !s.allowed(&id, &all),
            "a RoleBinding never grants cluster-wide"
        );
        assert!(!s.allowed(&other, &in_a), "a User subject is not a Group");
    }
}
