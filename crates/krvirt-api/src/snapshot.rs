//! `snapshot.kubevirt.io/v1beta1` VirtualMachineSnapshot and
//! VirtualMachineRestore, with KubeVirt's phases, conditions and
//! indications. krvirt snapshots the VM's krvirt Volumes
//! (`persistentVolumeClaim` / `dataVolume`) in their pools; a running VM is
//! snapshotted online, consistently across its disks.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::admission::{Admit, Causes};
use crate::kubevirt::validate::{immutable_identity, metadata};
use crate::meta::{Condition, ObjectMeta, null_default};

pub const API_VERSION: &str = "snapshot.kubevirt.io/v1beta1";
const MAX_NAME: usize = 253;

/// The VM a snapshot or restore is about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TypedLocalObjectReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineSnapshot {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: VirtualMachineSnapshotSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VirtualMachineSnapshotStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineSnapshotSpec {
    pub source: TypedLocalObjectReference,
    /// Accepted; a snapshot is taken at once or fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_deadline: Option<String>,
    /// `Delete` (default) or `Retain`: accepted; pool snapshots stay until
    /// their Volume goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<String>,
}

/// `InProgress`, `Succeeded`, `Failed`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSnapshotStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_uid: Option<String>,
    /// `Online`, `NoGuestAgent` (KubeVirt's indications).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub indications: Vec<String>,
    /// `Progressing`, `Ready`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SnapshotError>,
    /// krvirt: the Volumes snapshotted (name of the pool snapshot = the
    /// snapshot's uid).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub volumes: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineRestore {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: VirtualMachineRestoreSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VirtualMachineRestoreStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineRestoreSpec {
    pub target: TypedLocalObjectReference,
    pub virtual_machine_snapshot_name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineRestoreStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_time: Option<String>,
    /// `Progressing`, `Ready`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
    /// krvirt: the Volumes reverted.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub restores: Vec<String>,
}

impl crate::meta::Object for VirtualMachineSnapshot {
    fn kind_info() -> &'static crate::KindInfo {
        crate::types::kind_named("VirtualMachineSnapshot")
    }
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl crate::meta::Object for VirtualMachineRestore {
    fn kind_info() -> &'static crate::KindInfo {
        crate::types::kind_named("VirtualMachineRestore")
    }
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

fn vm_ref(r: &TypedLocalObjectReference, p: &str, c: &mut Causes) {
    if r.kind != "VirtualMachine" {
        c.not_supported(format!("{p}.kind"), "only VirtualMachine is supported");
    }
    if r.api_group.as_deref().is_some_and(|g| g != "kubevirt.io") {
        c.not_supported(format!("{p}.apiGroup"), "only kubevirt.io is supported");
    }
    if r.name.is_empty() {
        c.required(format!("{p}.name"), "Required value");
    }
}

impl Admit for VirtualMachineSnapshot {
    fn not_implemented(_path: &str) -> bool {
        false
    }
    fn apply_defaults(&mut self) {}
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", MAX_NAME, true, c);
        vm_ref(&self.spec.source, "spec.source", c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.spec != self.spec {
                c.forbidden("spec", "the spec of a VirtualMachineSnapshot is immutable");
            }
        }
    }
}

impl Admit for VirtualMachineRestore {
    fn not_implemented(_path: &str) -> bool {
        false
    }
    fn apply_defaults(&mut self) {}
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", MAX_NAME, true, c);
        vm_ref(&self.spec.target, "spec.target", c);
        if self.spec.virtual_machine_snapshot_name.is_empty() {
            c.required("spec.virtualMachineSnapshotName", "Required value");
        }
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.spec != self.spec {
                c.forbidden("spec", "the spec of a VirtualMachineRestore is immutable");
            }
        }
    }
}
