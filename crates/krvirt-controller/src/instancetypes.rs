//! A VM's instancetype and preference are copied into the VM (annotations
//! [`INSTANCETYPE_SNAPSHOT_ANNOTATION`] and
//! [`PREFERENCE_SNAPSHOT_ANNOTATION`]) the first time the VM controller
//! sees it, or when the VM names another one — KubeVirt keeps the same
//! copy in a ControllerRevision. Every VMI is expanded from the copy
//! ([`crate::vm::expanded_vmi`]), so editing or deleting the instancetype
//! later changes no existing VM.
//!
//! Storing the copy goes through the VM's admission, which expands the VM
//! with it: a VM whose own values conflict with the instancetype is
//! refused there (422 naming the field) and the conflict is reported in
//! the VM's status instead.

use krvirt_api::find_kind;
use krvirt_api::instancetype::{
    INSTANCETYPE_SNAPSHOT_ANNOTATION, InstancetypeMatcher, PREFERENCE_SNAPSHOT_ANNOTATION,
};
use krvirt_api::kubevirt::VirtualMachine;
use krvirt_server::{ApiError, Registry, Subresource};
use serde_json::{Value, json};

use crate::runner::ControllerError;

/// Why a VM's instancetype or preference cannot be used.
#[derive(Debug)]
pub(crate) enum SnapshotError {
    /// Reported in the VM's status; no VMI is created.
    Unusable(String),
    Controller(ControllerError),
}

impl From<ApiError> for SnapshotError {
    fn from(e: ApiError) -> Self {
        SnapshotError::Controller(e.into())
    }
}

struct Wanted<'a> {
    matcher: &'a InstancetypeMatcher,
    annotation: &'static str,
    cluster_kind: &'static str,
}

/// Is the stored copy the one the matcher names?
fn copy_matches(vm: &VirtualMachine, w: &Wanted<'_>) -> bool {
    let Some(raw) = vm.metadata.annotations.get(w.annotation) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<Value>(raw) else {
        return false;
    };
    v.get("name").and_then(Value::as_str) == Some(w.matcher.name.as_str())
        && v.get("kind").and_then(Value::as_str) == Some(w.matcher.kind_or(w.cluster_kind))
}

/// Make sure `vm` carries copies of what it names; true when the VM was
/// changed (look again at the stored one).
pub(crate) async fn ensure_snapshots(
    registry: &Registry,
    vm: &VirtualMachine,
) -> Result<bool, SnapshotError> {
    let mut wanted = Vec::new();
    if let Some(m) = &vm.spec.instancetype {
        wanted.push(Wanted {
            matcher: m,
            annotation: INSTANCETYPE_SNAPSHOT_ANNOTATION,
            cluster_kind: "VirtualMachineClusterInstancetype",
        });
    }
    if let Some(m) = &vm.spec.preference {
        wanted.push(Wanted {
            matcher: m,
            annotation: PREFERENCE_SNAPSHOT_ANNOTATION,
            cluster_kind: "VirtualMachineClusterPreference",
        });
    }
    let mut annotations = serde_json::Map::new();
    let ns = vm.metadata.namespace().to_string();
    for w in wanted.iter().filter(|w| !copy_matches(vm, w)) {
        let kind_name = w.matcher.kind_or(w.cluster_kind).to_string();
        let Some(kind) = find_kind(&kind_name) else {
            return Err(SnapshotError::Unusable(format!(
                "{kind_name} is not a served kind"
            )));
        };
        let obj = match registry.get(kind, &ns, &w.matcher.name).await {
            Ok(o) => o,
            Err(ApiError::NotFound { .. }) => {
                let place = if kind.namespaced {
                    format!("{ns}/{}", w.matcher.name)
                } else {
                    w.matcher.name.clone()
                };
                return Err(SnapshotError::Unusable(format!(
                    "{kind_name} {place} not found"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let copy = json!({
            "kind": kind_name,
            "name": w.matcher.name,
            "uid": obj.pointer("/metadata/uid"),
            "generation": obj.pointer("/metadata/generation"),
            "spec": obj.get("spec").cloned().unwrap_or(Value::Null),
        });
        annotations.insert(w.annotation.to_string(), Value::String(copy.to_string()));
    }
    // A copy of something the VM no longer names goes.
    for (present, key) in [
        (
            vm.spec.instancetype.is_some(),
            INSTANCETYPE_SNAPSHOT_ANNOTATION,
        ),
        (vm.spec.preference.is_some(), PREFERENCE_SNAPSHOT_ANNOTATION),
    ] {
        if !present && vm.metadata.annotations.contains_key(key) {
            annotations.insert(key.to_string(), Value::Null);
        }
    }
    if annotations.is_empty() {
        return Ok(false);
    }
    let Some(vm_kind) = find_kind("virtualmachines") else {
        return Err(SnapshotError::Controller(ControllerError::UnknownKind(
            "virtualmachines",
        )));
    };
    let patch = json!({"metadata": {"annotations": annotations}});
    match registry
        .merge_patch(vm_kind, &ns, vm.metadata.name(), &patch, Subresource::Main)
        .await
    {
        Ok(_) => Ok(true),
        Err(ApiError::Invalid { causes, .. }) => Err(SnapshotError::Unusable(
            causes
                .iter()
                .map(|c| format!("{}: {}", c.field, c.message))
                .collect::<Vec<_>>()
                .join("; "),
        )),
        Err(e) => Err(e.into()),
    }
}
