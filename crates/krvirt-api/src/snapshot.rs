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
    /// `Delete` (default): deleting the snapshot removes its pool
    /// snapshots and saved memory; `Retain`: they stay until their Volume
    /// goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<String>,
    /// krvirt extension: also save the running guest's RAM and device
    /// state, consistent with the disk snapshots (the guest is paused while
    /// both are taken). Restoring such a snapshot into the same VM resumes
    /// the guest where it was instead of booting it. Ignored (no
    /// `Memory` indication) when the VM is not running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_memory: Option<bool>,
}

/// Finalizer the agent puts on a VirtualMachineSnapshot it took: deleting
/// the snapshot first removes its pool snapshots and saved memory.
pub const SNAPSHOT_FINALIZER: &str = "snapshot.kubevirt.io/vmsnapshot-protection";

/// Annotation on a VirtualMachine: its next start resumes from the memory
/// state of this VirtualMachineSnapshot uid (set by a restore of a memory
/// snapshot, removed by the agent once the guest resumed).
pub const RESUME_FROM_ANNOTATION: &str = "krvirt.io/resume-from-snapshot";

/// KubeVirt's snapshot indications, plus krvirt's `Memory`.
pub mod indications {
    pub const ONLINE: &str = "Online";
    pub const NO_GUEST_AGENT: &str = "NoGuestAgent";
    /// krvirt: the guest's RAM and device state are saved with the disks.
    pub const MEMORY: &str = "Memory";
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
    /// `Online`, `NoGuestAgent` (KubeVirt's indications), `Memory`
    /// (krvirt: the guest's memory state is saved too).
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
    /// krvirt: size in bytes of the saved memory and device state
    /// (`spec.includeMemory` on a running VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_state_bytes: Option<u64>,
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
    /// The VM to restore. If it does not exist, a new VM of that name is
    /// created from the snapshot, with new Volumes (copies of the
    /// snapshot's), new MAC addresses and a new firmware UUID.
    pub target: TypedLocalObjectReference,
    pub virtual_machine_snapshot_name: String,
    /// JSON patches (RFC 6902, one JSON object per string) applied to the
    /// new VM (restore into a new VM only), e.g.
    /// `{"op":"replace","path":"/metadata/labels/app","value":"b"}`.
    /// Operations `add`, `replace`, `remove`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub patches: Vec<String>,
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
        if let Some(p) = &self.spec.deletion_policy
            && p != "Delete"
            && p != "Retain"
        {
            c.not_supported("spec.deletionPolicy", "supported values: Delete, Retain");
        }
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
        for (i, p) in self.spec.patches.iter().enumerate() {
            if let Err(e) = crate::jsonpatch::parse(p) {
                c.invalid(format!("spec.patches[{i}]"), e.to_string());
            }
        }
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.spec != self.spec {
                c.forbidden("spec", "the spec of a VirtualMachineRestore is immutable");
            }
        }
    }
}
