//! The one place that turns API semantics into store operations.
//!
//! Both the HTTP handlers and the in-process controllers go through
//! [`Registry`]: admission, server-owned metadata (uid, resourceVersion,
//! generation, timestamps), optimistic concurrency, the status subresource,
//! finalizers and watch event conversion all live here.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use krvirt_api::{KindInfo, ValidationError};
use krvirt_store::{EventKind, KeyValue, Revision, Store, StoreError, WatchStream};
use serde_json::{Map, Value, json};

use crate::ApiError;
use crate::patch::merge_patch as apply_merge_patch;
use crate::selector::Selector;

/// Admission function: `krvirt_api::admit` in production.
pub type AdmitFn = fn(&KindInfo, Value, Option<&Value>) -> Result<Value, ValidationError>;

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    /// The object itself: `status` changes are ignored.
    Main,
    /// `/status`: only `status` changes are kept.
    Status,
}

/// Delete preconditions (`DeleteOptions.preconditions`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// Result of [`Registry::delete`].
#[derive(Debug, Clone, PartialEq)]
pub struct DeleteOutcome {
    /// The object as deleted, or as marked for deletion.
    pub object: Value,
    /// `true`: removed from the store. `false`: it still has finalizers;
    /// `metadata.deletionTimestamp` is set and it goes away when the last
    /// finalizer is removed.
    pub deleted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub fn as_str(&self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One watch event as the API reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    pub event_type: EventType,
    /// The object; its `metadata.resourceVersion` is the revision of the
    /// change (for deletes: the revision of the delete).
    pub object: Value,
}

impl WatchEvent {
    /// `metadata.resourceVersion` of the event's object.
    pub fn resource_version(&self) -> &str {
        self.object
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// Stream of watch events. An `Err` item is terminal (`Gone` when history
/// was compacted: relist and watch again).
pub type EventStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, ApiError>> + Send>>;

/// Maximum internal retries on write conflicts when the caller gave no
/// resourceVersion precondition.
const MAX_RETRIES: usize = 16;

/// Store key of an object: `/registry/{group}/{plural}/{ns}/{name}`
/// (cluster-scoped: `/registry/{group}/{plural}/{name}`). The core group is
/// spelled `core`.
pub fn object_key(kind: &KindInfo, ns: &str, name: &str) -> String {
    if kind.namespaced {
        format!("{}{ns}/{name}", kind_prefix(kind))
    } else {
        format!("{}{name}", kind_prefix(kind))
    }
}

/// Store prefix of every object of a kind (ends with `/`).
pub fn kind_prefix(kind: &KindInfo) -> String {
    let group = if kind.group.is_empty() {
        "core"
    } else {
        kind.group
    };
    format!("/registry/{group}/{}/", kind.plural)
}

/// Store prefix for a namespace or for all namespaces.
fn list_prefix(kind: &KindInfo, ns: Option<&str>) -> String {
    match ns {
        Some(ns) if kind.namespaced && !ns.is_empty() => format!("{}{ns}/", kind_prefix(kind)),
        _ => kind_prefix(kind),
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj)
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    let Value::Object(o) = obj else {
        unreachable!("just made an object")
    };
    let m = o
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !m.is_object() {
        *m = Value::Object(Map::new());
    }
    let Value::Object(m) = m else {
        unreachable!("just made an object")
    };
    m
}

fn finalizers(obj: &Value) -> Vec<String> {
    meta(obj)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The object minus `metadata` and `status`: what `generation` tracks.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
        o.remove("apiVersion");
        o.remove("kind");
    }
    v
}

fn without_rv(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    v
}

fn parse_rv(rv: &str) -> Result<Revision, ApiError> {
    rv.parse::<Revision>()
        .ok()
        .filter(|r| *r >= 0)
        .ok_or_else(|| ApiError::BadRequest(format!("invalid resourceVersion {rv:?}")))
}

/// Random suffix for `generateName` (Kubernetes' alphabet, 5 characters).
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes
        .iter()
        .take(5)
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect()
}

/// API semantics on top of a [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    kinds: &'static [KindInfo],
    admit: AdmitFn,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.inner.kinds.len())
            .finish()
    }
}

impl Registry {
    /// Serve every kind of `krvirt_api::kinds()`, admitted by
    /// `krvirt_api::admit`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_kinds(store, krvirt_api::kinds(), krvirt_api::admit)
    }

    /// Serve `kinds` with a custom admission function.
    pub fn with_kinds(store: Arc<dyn Store>, kinds: &'static [KindInfo], admit: AdmitFn) -> Self {
        Registry {
            inner: Arc::new(Inner {
                store,
                kinds,
                admit,
            }),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The kinds this registry serves.
    pub fn kinds(&self) -> &'static [KindInfo] {
        self.inner.kinds
    }

    /// A served kind by API group and Kind name (`"kubevirt.io"`, `"VirtualMachine"`).
    pub fn kind(&self, group: &str, kind: &str) -> Option<&'static KindInfo> {
        self.inner
            .kinds
            .iter()
            .find(|k| k.group == group && k.kind == kind)
    }

    /// A served kind by plural, singular, Kind or short name (case-insensitive).
    pub fn find_kind(&self, name: &str) -> Option<&'static KindInfo> {
        let n = name.to_ascii_lowercase();
        self.inner.kinds.iter().find(|k| {
            k.plural == n
                || k.singular == n
                || k.kind.to_ascii_lowercase() == n
                || k.short_names.contains(&n.as_str())
        })
    }

    fn not_found(kind: &KindInfo, name: &str) -> ApiError {
        ApiError::NotFound {
            group: kind.group.into(),
            resource: kind.plural.into(),
            name: name.into(),
        }
    }

    fn store_err(kind: &KindInfo, name: &str, e: StoreError) -> ApiError {
        ApiError::from_store(e, kind.group, kind.plural, name)
    }

    fn invalid(kind: &KindInfo, name: &str, e: ValidationError) -> ApiError {
        ApiError::Invalid {
            group: kind.group.into(),
            kind: kind.kind.into(),
            name: name.into(),
            causes: e.causes,
        }
    }

    fn invalid_field(
        kind: &KindInfo,
        name: &str,
        reason: &str,
        field: &str,
        msg: &str,
    ) -> ApiError {
        Self::invalid(kind, name, ValidationError::new(reason, field, msg))
    }

    fn check_ns(kind: &KindInfo, ns: &str) -> Result<(), ApiError> {
        if kind.namespaced {
            if ns.is_empty() {
                return Err(ApiError::BadRequest(format!(
                    "{} is namespaced: a namespace is required",
                    kind.plural
                )));
            }
            if !is_dns_label(ns) {
                return Err(ApiError::BadRequest(format!(
                    "invalid namespace {ns:?}: must be a DNS-1123 label (lower-case alphanumerics and '-', at most 63 characters)"
                )));
            }
        }
        Ok(())
    }

    fn decode(kind: &KindInfo, kv: &KeyValue) -> Result<Value, ApiError> {
        let mut obj: Value = serde_json::from_slice(&kv.value).map_err(|e| {
            ApiError::Internal(format!(
                "stored {} at {} is not valid JSON: {e}",
                kind.kind, kv.key
            ))
        })?;
        if !obj.is_object() {
            return Err(ApiError::Internal(format!(
                "stored {} at {} is not an object",
                kind.kind, kv.key
            )));
        }
        meta_mut(&mut obj).insert(
            "resourceVersion".into(),
            Value::String(kv.mod_revision.to_string()),
        );
        Ok(obj)
    }

    fn encode(obj: &Value) -> Result<Vec<u8>, ApiError> {
        serde_json::to_vec(&without_rv(obj))
            .map_err(|e| ApiError::Internal(format!("cannot encode object: {e}")))
    }

    fn with_rv(mut obj: Value, rev: Revision) -> Value {
        meta_mut(&mut obj).insert("resourceVersion".into(), Value::String(rev.to_string()));
        obj
    }

    /// Check `apiVersion`/`kind` (filling them in when absent).
    fn check_type(kind: &KindInfo, obj: &mut Value) -> Result<(), ApiError> {
        let Some(o) = obj.as_object_mut() else {
            return Err(ApiError::BadRequest(format!(
                "the body of a {} must be a JSON or YAML object",
                kind.kind
            )));
        };
        let api_version = kind.api_version();
        match o.get("apiVersion").and_then(Value::as_str) {
            None | Some("") => {
                o.insert("apiVersion".into(), Value::String(api_version));
            }
            Some(v) if v == api_version => {}
            Some(v) => {
                return Err(ApiError::BadRequest(format!(
                    "the API version in the data ({v}) does not match the expected API version ({api_version})"
                )));
            }
        }
        match o.get("kind").and_then(Value::as_str) {
            None | Some("") => {
                o.insert("kind".into(), Value::String(kind.kind.to_string()));
            }
            Some(k) if k == kind.kind => {}
            Some(k) => {
                return Err(ApiError::BadRequest(format!(
                    "the kind in the data ({k}) does not match the expected kind ({})",
                    kind.kind
                )));
            }
        }
        match o.get("metadata") {
            None | Some(Value::Null) => {
                o.insert("metadata".into(), Value::Object(Map::new()));
            }
            Some(Value::Object(_)) => {}
            Some(_) => {
                return Err(ApiError::BadRequest("metadata must be an object".into()));
            }
        }
        Ok(())
    }

    /// Check the body's namespace against the request's and set it.
    fn apply_namespace(kind: &KindInfo, ns: &str, obj: &mut Value) -> Result<(), ApiError> {
        let m = meta_mut(obj);
        if kind.namespaced {
            match m.get("namespace").and_then(Value::as_str) {
                Some(body_ns) if !body_ns.is_empty() && body_ns != ns => {
                    return Err(ApiError::BadRequest(format!(
                        "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({ns})"
                    )));
                }
                _ => {
                    m.insert("namespace".into(), Value::String(ns.to_string()));
                }
            }
        } else {
            m.remove("namespace");
        }
        Ok(())
    }

    async fn read(
        &self,
        kind: &KindInfo,
        ns: &str,
        name: &str,
    ) -> Result<(Value, KeyValue), ApiError> {
        Self::check_ns(kind, ns)?;
        let key = object_key(kind, ns, name);
        match self.inner.store.get(&key).await {
            Ok(Some(kv)) => Ok((Self::decode(kind, &kv)?, kv)),
            Ok(None) => Err(Self::not_found(kind, name)),
            Err(e) => Err(Self::store_err(kind, name, e)),
        }
    }

    /// Create an object: admission, `generateName`, uid, creationTimestamp,
    /// generation 1, namespace. `status` is dropped (set it through the
    /// status subresource). `ns` is ignored for cluster-scoped kinds.
    pub async fn create(&self, kind: &KindInfo, ns: &str, obj: Value) -> Result<Value, ApiError> {
        let mut obj = obj;
        Self::check_type(kind, &mut obj)?;
        let ns = if kind.namespaced { ns } else { "" };
        Self::check_ns(kind, ns)?;
        Self::apply_namespace(kind, ns, &mut obj)?;
        let given_name = meta_str(&obj, "name").map(str::to_string);
        let generate = meta_str(&obj, "generateName").map(str::to_string);
        if given_name.is_none() && generate.is_none() {
            return Err(Self::invalid_field(
                kind,
                "",
                "FieldValueRequired",
                "metadata.name",
                "Required value: name or generateName is required",
            ));
        }
        {
            let m = meta_mut(&mut obj);
            for f in [
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "selfLink",
                "managedFields",
            ] {
                m.remove(f);
            }
        }
        if let Some(o) = obj.as_object_mut() {
            o.remove("status");
        }
        let attempts = if given_name.is_some() { 1 } else { 8 };
        let mut last_err = None;
        for _ in 0..attempts {
            let name = match &given_name {
                Some(n) => n.clone(),
                None => {
                    let mut prefix = generate.clone().unwrap_or_default();
                    prefix.truncate(58);
                    format!("{prefix}{}", random_suffix())
                }
            };
            if !is_dns_subdomain(&name) {
                return Err(Self::invalid_field(
                    kind,
                    &name,
                    "FieldValueInvalid",
                    "metadata.name",
                    &format!(
                        "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                    ),
                ));
            }
            let mut candidate = obj.clone();
            meta_mut(&mut candidate).insert("name".into(), Value::String(name.clone()));
            let mut admitted = (self.inner.admit)(kind, candidate, None)
                .map_err(|e| Self::invalid(kind, &name, e))?;
            if !admitted.is_object() {
                return Err(ApiError::Internal("admission returned a non-object".into()));
            }
            {
                let m = meta_mut(&mut admitted);
                m.insert("name".into(), Value::String(name.clone()));
                if kind.namespaced {
                    m.insert("namespace".into(), Value::String(ns.to_string()));
                } else {
                    m.remove("namespace");
                }
                m.insert(
                    "uid".into(),
                    Value::String(uuid::Uuid::new_v4().to_string()),
                );
                m.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
                m.insert("generation".into(), json!(1));
                m.remove("resourceVersion");
            }
            if let Some(o) = admitted.as_object_mut() {
                o.remove("status");
            }
            let key = object_key(kind, ns, &name);
            match self
                .inner
                .store
                .create(&key, Self::encode(&admitted)?, None)
                .await
            {
                Ok(kv) => return Ok(Self::with_rv(admitted, kv.mod_revision)),
                Err(StoreError::AlreadyExists(_)) if given_name.is_none() => {
                    last_err = Some(Self::store_err(kind, &name, StoreError::AlreadyExists(key)));
                }
                Err(e) => return Err(Self::store_err(kind, &name, e)),
            }
        }
        Err(last_err.unwrap_or_else(|| ApiError::Internal("name generation failed".into())))
    }

    /// Read one object.
    pub async fn get(&self, kind: &KindInfo, ns: &str, name: &str) -> Result<Value, ApiError> {
        let ns = if kind.namespaced { ns } else { "" };
        Ok(self.read(kind, ns, name).await?.0)
    }

    /// List objects of `kind` in `ns` (all namespaces when `None`) matching
    /// `selector`; returns the items (sorted by namespace/name) and the
    /// resourceVersion the list was taken at.
    pub async fn list(
        &self,
        kind: &KindInfo,
        ns: Option<&str>,
        selector: &Selector,
    ) -> Result<(Vec<Value>, String), ApiError> {
        if let Some(ns) = ns.filter(|n| !n.is_empty() && kind.namespaced) {
            Self::check_ns(kind, ns)?;
        }
        let prefix = list_prefix(kind, ns);
        let (kvs, rev) = self
            .inner
            .store
            .list(&prefix)
            .await
            .map_err(|e| Self::store_err(kind, "", e))?;
        let mut items = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            let obj = Self::decode(kind, kv)?;
            if selector.matches(&obj) {
                items.push(obj);
            }
        }
        Ok((items, rev.to_string()))
    }

    /// Replace an object (PUT). Compare-and-swap on the body's
    /// `metadata.resourceVersion` when given, else on the current one.
    /// `status` is kept from the stored object; `generation` is bumped when
    /// anything outside metadata and status changes.
    pub async fn replace(
        &self,
        kind: &KindInfo,
        ns: &str,
        name: &str,
        obj: Value,
    ) -> Result<Value, ApiError> {
        self.replace_retrying(kind, ns, name, obj, Subresource::Main)
            .await
    }

    /// Replace an object's status (PUT `/status`): only `status` is taken
    /// from `obj`; everything else stays as stored.
    pub async fn replace_status(
        &self,
        kind: &KindInfo,
        ns: &str,
        name: &str,
        obj: Value,
    ) -> Result<Value, ApiError> {
        self.replace_retrying(kind, ns, name, obj, Subresource::Status)
            .await
    }

    async fn replace_retrying(
        &self,
        kind: &KindInfo,
        ns: &str,
        name: &str,
        obj: Value,
        sub: Subresource,
    ) -> Result<Value, ApiError> {
        let has_precondition = meta_str(&obj, "resourceVersion").is_some();
        let mut attempt = 0;
        loop {
            match self.replace_once(kind, ns, name, obj.clone(), sub).await {
                Err(e) if e.is_conflict() && !has_precondition && attempt < MAX_RETRIES => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn replace_once(
        &self,
        kind: &KindInfo,
        ns: &str,
        name: &str,
        obj: Value,
        sub: Subresource,
    ) -> Result<Value, ApiError> {
        let ns = if kind.namespaced { ns } else { "" };
        let mut obj = obj;
        Self::check_type(kind, &mut obj)?;
        match meta_str(&obj, "name") {
            None => {
                meta_mut(&mut obj).insert("name".into(), Value::String(name.to_string()));
            }
            Some(n) if n == name => {}
            Some(n) => {
                return Err(ApiError::BadRequest(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
        }
        Self::apply_namespace(kind, ns, &mut obj)?;
        let (old, kv) = self.read(kind, ns, name).await?;
        let expected = match meta_str(&obj, "resourceVersion") {
            Some(rv) => parse_rv(rv)?,
            None => kv.mod_revision,
        };
        if expected != kv.mod_revision {
            return Err(ApiError::conflict_modified(kind.group, kind.plural, name));
        }
        if let (Some(body_uid), Some(old_uid)) = (meta_str(&obj, "uid"), meta_str(&old, "uid"))
            && body_uid != old_uid
        {
            return Err(ApiError::Conflict {
                group: kind.group.into(),
                resource: kind.plural.into(),
                name: name.into(),
                message: format!(
                    "Precondition failed: UID in precondition: {body_uid}, UID in object meta: {old_uid}"
                ),
            });
        }

        let new = match sub {
            Subresource::Main => {
                let mut new = obj;
                if let Some(o) = new.as_object_mut() {
                    match old.get("status") {
                        Some(s) => {
                            o.insert("status".into(), s.clone());
                        }
                        None => {
                            o.remove("status");
                        }
                    }
                }
                if meta_str(&old, "deletionTimestamp").is_some() {
                    let old_f = finalizers(&old);
                    if let Some(added) = finalizers(&new).into_iter().find(|f| !old_f.contains(f)) {
                        return Err(Self::invalid_field(
                            kind,
                            name,
                            "FieldValueForbidden",
                            "metadata.finalizers",
                            &format!(
                                "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers [{added}]"
                            ),
                        ));
                    }
                }
                let mut admitted = (self.inner.admit)(kind, new, Some(&old))
                    .map_err(|e| Self::invalid(kind, name, e))?;
                if !admitted.is_object() {
                    return Err(ApiError::Internal("admission returned a non-object".into()));
                }
                copy_server_meta(&old, &mut admitted);
                if let Some(o) = admitted.as_object_mut() {
                    match old.get("status") {
                        Some(s) => {
                            o.insert("status".into(), s.clone());
                        }
                        None => {
                            o.remove("status");
                        }
                    }
                }
                if spec_part(&admitted) != spec_part(&old) {
                    let generation = old
                        .pointer("/metadata/generation")
                        .and_then(Value::as_i64)
                        .unwrap_or(0);
                    meta_mut(&mut admitted).insert("generation".into(), json!(generation + 1));
                }
                admitted
            }
            Subresource::Status => {
                let mut new = old.clone();
                if let Some(o) = new.as_object_mut() {
                    match obj.get("status") {
                        Some(s) if !s.is_null() => {
                            o.insert("status".into(), s.clone());
                        }
                        _ => {
                            o.remove("status");
                        }
                    }
                }
                let status = new.get("status").cloned();
                let admitted = (self.inner.admit)(kind, new, Some(&old))
                    .map_err(|e| Self::invalid(kind, name, e))?;
                if !admitted.is_object() {
                    return Err(ApiError::Internal("admission returned a non-object".into()));
                }
                // Only status may change through this path: take everything
                // else from the stored object, status from admission (which
                // may default it).
                let mut out = old.clone();
                if let Some(o) = out.as_object_mut() {
                    match admitted.get("status").cloned().or(status) {
                        Some(s) => {
                            o.insert("status".into(), s);
                        }
                        None => {
                            o.remove("status");
                        }
                    }
                }
                out
            }
        };

        let key = object_key(kind, ns, name);
        if meta_str(&new, "deletionTimestamp").is_some() && finalizers(&new).is_empty() {
            // The last finalizer is gone: the object goes now.
            let deleted = self
                .inner
                .store
                .delete(&key, Some(kv.mod_revision))
                .await
                .map_err(|e| Self::store_err(kind, name, e))?;
            return Ok(Self::with_rv(without_rv(&new), deleted.mod_revision));
        }
        if without_rv(&new) == without_rv(&old) {
            return Ok(old);
        }
        let written = self
            .inner
            .store
            .update(&key, Self::encode(&new)?, kv.mod_revision, kv.lease)
            .await
            .map_err(|e| Self::store_err(kind, name, e))?;
        Ok(Self::with_rv(new, written.mod_revision))
    }

    /// Apply a JSON merge patch (RFC 7386) to the object or its status.
    /// A `metadata.resourceVersion` in the patch is a precondition; without
    /// one, write conflicts are retried internally.
    pub async fn merge_patch(
        &self,
        kind: &KindInfo,
        ns: &str,
        name: &str,
        patch: &Value,
        sub: Subresource,
    ) -> Result<Value, ApiError> {
        if !patch.is_object() {
            return Err(ApiError::BadRequest(
                "a merge patch must be a JSON object".into(),
            ));
        }
        let precondition = patch
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let mut attempt = 0;
        loop {
            let current = self.get(kind, ns, name).await?;
            let rv = current
                .pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or(Value::Null);
            let mut patched = current;
            apply_merge_patch(&mut patched, patch);
            if !patched.is_object() {
                return Err(ApiError::BadRequest(
                    "the patch removed the whole object".into(),
                ));
            }
            let m = meta_mut(&mut patched);
            match &precondition {
                Some(p) => {
                    m.insert("resourceVersion".into(), Value::String(p.clone()));
                }
                None => {
                    m.insert("resourceVersion".into(), rv);
                }
            }
            match self.replace_once(kind, ns, name, patched, sub).await {
                Err(e) if e.is_conflict() && precondition.is_none() && attempt < MAX_RETRIES => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Read-modify-write helper for controllers: reads the object, applies
    /// `f`, writes it back through [`Registry::replace`] or
    /// [`Registry::replace_status`] with CAS on the read version, and
    /// retries from the read on conflicts.
    pub async fn modify<F>(
        &self,
        kind: &KindInfo,
        ns: &str,
        name: &str,
        sub: Subresource,
        mut f: F,
    ) -> Result<Value, ApiError>
    where
        F: FnMut(&mut Value) -> Result<(), ApiError> + Send,
    {
        let mut attempt = 0;
        loop {
            let mut obj = self.get(kind, ns, name).await?;
            f(&mut obj)?;
            match self.replace_once(kind, ns, name, obj, sub).await {
                Err(e) if e.is_conflict() && attempt < MAX_RETRIES => attempt += 1,
                other => return other,
            }
        }
    }

    /// Delete an object. With finalizers it only gets
    /// `metadata.deletionTimestamp` (removed when the last finalizer goes).
    pub async fn delete(
        &self,
        kind: &KindInfo,
        ns: &str,
        name: &str,
        pre: &Preconditions,
    ) -> Result<DeleteOutcome, ApiError> {
        let ns = if kind.namespaced { ns } else { "" };
        let key = object_key(kind, ns, name);
        let mut attempt = 0;
        loop {
            let (obj, kv) = self.read(kind, ns, name).await?;
            if let Some(uid) = pre.uid.as_deref().filter(|u| !u.is_empty()) {
                let actual = meta_str(&obj, "uid").unwrap_or_default();
                if uid != actual {
                    return Err(ApiError::Conflict {
                        group: kind.group.into(),
                        resource: kind.plural.into(),
                        name: name.into(),
                        message: format!(
                            "Precondition failed: UID in precondition: {uid}, UID in object meta: {actual}"
                        ),
                    });
                }
            }
            if let Some(rv) = pre.resource_version.as_deref().filter(|r| !r.is_empty()) {
                let want = parse_rv(rv)?;
                if want != kv.mod_revision {
                    return Err(ApiError::Conflict {
                        group: kind.group.into(),
                        resource: kind.plural.into(),
                        name: name.into(),
                        message: format!(
                            "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                            kv.mod_revision
                        ),
                    });
                }
            }
            let result = if !finalizers(&obj).is_empty() {
                if meta_str(&obj, "deletionTimestamp").is_some() {
                    return Ok(DeleteOutcome {
                        object: obj,
                        deleted: false,
                    });
                }
                let mut marked = obj.clone();
                {
                    let m = meta_mut(&mut marked);
                    m.insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
                    m.insert("deletionGracePeriodSeconds".into(), json!(0));
                }
                self.inner
                    .store
                    .update(&key, Self::encode(&marked)?, kv.mod_revision, kv.lease)
                    .await
                    .map(|w| DeleteOutcome {
                        object: Self::with_rv(marked, w.mod_revision),
                        deleted: false,
                    })
            } else {
                self.inner
                    .store
                    .delete(&key, Some(kv.mod_revision))
                    .await
                    .map(|_| DeleteOutcome {
                        object: obj,
                        deleted: true,
                    })
            };
            match result {
                Ok(out) => return Ok(out),
                Err(StoreError::Conflict { .. }) | Err(StoreError::NotFound(_))
                    if pre.resource_version.is_none() && attempt < MAX_RETRIES =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(Self::store_err(kind, name, e)),
            }
        }
    }

    /// Watch `kind` in `ns` (all namespaces when `None`).
    ///
    /// `from_resource_version`: `None`, `""` or `"0"` sends a synthetic
    /// `ADDED` for every existing matching object, then live changes;
    /// `"N"` resumes with the changes after revision N (`Gone` if N was
    /// compacted). With a selector, an object that starts matching arrives
    /// as `ADDED` and one that stops matching as `DELETED`.
    pub async fn watch(
        &self,
        kind: &'static KindInfo,
        ns: Option<&str>,
        selector: Selector,
        from_resource_version: Option<&str>,
    ) -> Result<EventStream, ApiError> {
        if let Some(ns) = ns.filter(|n| !n.is_empty() && kind.namespaced) {
            Self::check_ns(kind, ns)?;
        }
        let prefix = list_prefix(kind, ns);
        let store = self.inner.store.clone();
        let mut pending = VecDeque::new();
        let from = match from_resource_version.filter(|s| !s.is_empty() && *s != "0") {
            Some(rv) => parse_rv(rv)?
                .checked_add(1)
                .ok_or_else(|| ApiError::BadRequest(format!("invalid resourceVersion {rv:?}")))?,
            None => {
                let (kvs, rev) = store
                    .list(&prefix)
                    .await
                    .map_err(|e| Self::store_err(kind, "", e))?;
                for kv in &kvs {
                    let obj = Self::decode(kind, kv)?;
                    if selector.matches(&obj) {
                        pending.push_back(WatchEvent {
                            event_type: EventType::Added,
                            object: obj,
                        });
                    }
                }
                rev + 1
            }
        };
        let inner = store
            .watch(&prefix, from)
            .await
            .map_err(|e| Self::store_err(kind, "", e))?;
        let state = WatchState {
            store,
            prefix,
            kind,
            selector,
            inner,
            pending,
            last_rev: from - 1,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(state, WatchState::step)))
    }
}

/// Copy the server-owned metadata of `old` into `new`.
fn copy_server_meta(old: &Value, new: &mut Value) {
    let old_meta = meta(old).cloned().unwrap_or_default();
    let m = meta_mut(new);
    for f in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "generation",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        match old_meta.get(f) {
            Some(v) => {
                m.insert(f.into(), v.clone());
            }
            None => {
                m.remove(f);
            }
        }
    }
}

struct WatchState {
    store: Arc<dyn Store>,
    prefix: String,
    kind: &'static KindInfo,
    selector: Selector,
    inner: WatchStream,
    pending: VecDeque<WatchEvent>,
    last_rev: Revision,
    done: bool,
}

impl WatchState {
    async fn step(mut self) -> Option<(Result<WatchEvent, ApiError>, Self)> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some((Ok(ev), self));
            }
            if self.done {
                return None;
            }
            match self.inner.next().await {
                None => return None,
                Some(Ok(ev)) => {
                    self.last_rev = ev.revision();
                    if let Some(e) = self.convert(ev) {
                        return Some((Ok(e), self));
                    }
                }
                Some(Err(StoreError::WatchLagged { resume_from })) => {
                    tracing::debug!(prefix = %self.prefix, resume_from, "watch lagged; resuming");
                    let from = resume_from.max(self.last_rev + 1);
                    match self.store.watch(&self.prefix, from).await {
                        Ok(s) => self.inner = s,
                        Err(e) => {
                            self.done = true;
                            return Some((Err(Registry::store_err(self.kind, "", e)), self));
                        }
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some((Err(Registry::store_err(self.kind, "", e)), self));
                }
            }
        }
    }

    fn convert(&self, ev: krvirt_store::WatchEvent) -> Option<WatchEvent> {
        let decode_prev = |prev: &Option<KeyValue>| {
            prev.as_ref()
                .filter(|p| !p.value.is_empty())
                .and_then(|p| Registry::decode(self.kind, p).ok())
        };
        match ev.kind {
            EventKind::Put => {
                let new = match Registry::decode(self.kind, &ev.kv) {
                    Ok(o) => o,
                    Err(e) => {
                        tracing::warn!(key = %ev.kv.key, error = %e, "skipping undecodable object in watch");
                        return None;
                    }
                };
                let new_m = self.selector.matches(&new);
                if ev.kv.version == 1 {
                    return new_m.then_some(WatchEvent {
                        event_type: EventType::Added,
                        object: new,
                    });
                }
                let event_type = if self.selector.is_everything() {
                    EventType::Modified
                } else {
                    match decode_prev(&ev.prev).map(|p| self.selector.matches(&p)) {
                        Some(true) if new_m => EventType::Modified,
                        Some(false) if new_m => EventType::Added,
                        Some(true) => EventType::Deleted,
                        Some(false) => return None,
                        // Previous state unknown: report the current one;
                        // a DELETED for an object the client never saw is
                        // harmless, a missed one is not.
                        None if new_m => EventType::Modified,
                        None => EventType::Deleted,
                    }
                };
                Some(WatchEvent {
                    event_type,
                    object: new,
                })
            }
            EventKind::Delete => {
                let obj = match decode_prev(&ev.prev) {
                    Some(p) => {
                        if !self.selector.matches(&p) {
                            return None;
                        }
                        p
                    }
                    None => minimal_object(self.kind, &self.prefix, &ev.kv.key),
                };
                Some(WatchEvent {
                    event_type: EventType::Deleted,
                    object: Registry::with_rv(obj, ev.kv.mod_revision),
                })
            }
        }
    }
}

/// Best-effort object for a delete event without the previous value.
fn minimal_object(kind: &KindInfo, _prefix: &str, key: &str) -> Value {
    let rest = key.strip_prefix(&kind_prefix(kind)).unwrap_or(key);
    let mut metadata = Map::new();
    match rest.split_once('/') {
        Some((ns, name)) if kind.namespaced => {
            metadata.insert("namespace".into(), Value::String(ns.into()));
            metadata.insert("name".into(), Value::String(name.into()));
        }
        _ => {
            metadata.insert("name".into(), Value::String(rest.into()));
        }
    }
    json!({"apiVersion": kind.api_version(), "kind": kind.kind, "metadata": metadata})
}
