//! `snapshot.kubevirt.io/v1beta1` VirtualMachineSnapshot and
//! VirtualMachineRestore, with KubeVirt's phases, conditions and
//! indications. krvirt snapshots the VM's krvirt Volumes
//! (`persistentVolumeClaim` / `dataVolume`) in their pools; a running VM is
//! snapshotted online, consistently across its disks.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
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

/// Annotation next to [`RESUME_FROM_ANNOTATION`] (on the VM, and copied
/// onto the VMI its next start creates): the Host whose data directory
/// holds the saved memory state. Placement binds the VMI there; if that
/// host is gone the annotations are dropped and the guest boots fresh.
pub const RESUME_HOST_ANNOTATION: &str = "krvirt.io/resume-host";

/// Annotation on a VM made by a restore into a new VM: the restore's uid.
pub const RESTORED_BY_ANNOTATION: &str = "krvirt.io/restored-by";

/// Name of the VirtualMachineSnapshotContent of a snapshot (KubeVirt's
/// `vmsnapshot-content-{snapshot uid}`).
pub fn content_name(snapshot_uid: &str) -> String {
    format!("vmsnapshot-content-{snapshot_uid}")
}

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
    /// krvirt: the Host that holds the saved memory state (a guest
    /// resumes from it only there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_state_host: Option<String>,
    /// The VirtualMachineSnapshotContent holding the VM's definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_machine_snapshot_content_name: Option<String>,
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
    /// krvirt: the host agent holding the snapshot's Volumes has reverted
    /// them (a restore into the snapshot's own VM); the restore controller
    /// then finishes the restore (the VM's resume mark, `complete`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes_restored: Option<bool>,
}

/// `snapshot.kubevirt.io/v1beta1` VirtualMachineSnapshotContent: what a
/// snapshot holds. krvirt keeps the VM's definition here
/// (`spec.source.virtualMachine`, as KubeVirt does), so that a restore
/// into a new VM is made by the control plane, whichever host took it;
/// the disks are pool snapshots of the Volumes (`spec.volumeBackups`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineSnapshotContent {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: VirtualMachineSnapshotContentSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VirtualMachineSnapshotContentStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineSnapshotContentSpec {
    #[serde(default)]
    pub source: SnapshotContentSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_machine_snapshot_name: Option<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub volume_backups: Vec<VolumeBackup>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotContentSource {
    /// The VirtualMachine as it was when the snapshot was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub virtual_machine: Option<Value>,
}

/// One snapshotted disk: the VM's volume name, its Volume (KubeVirt's
/// `persistentVolumeClaim`, here `{metadata: {name}}`) and the pool
/// snapshot's name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeBackup {
    pub volume_name: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub persistent_volume_claim: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSnapshotContentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SnapshotError>,
}

impl crate::meta::Object for VirtualMachineSnapshotContent {
    fn kind_info() -> &'static crate::KindInfo {
        crate::types::kind_named("VirtualMachineSnapshotContent")
    }
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Admit for VirtualMachineSnapshotContent {
    fn not_implemented(_path: &str) -> bool {
        false
    }
    fn apply_defaults(&mut self) {}
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", MAX_NAME, true, c);
        if let Some(vm) = &self.spec.source.virtual_machine
            && !vm.is_object()
        {
            c.invalid(
                "spec.source.virtualMachine",
                "must be a VirtualMachine object",
            );
        }
        for (i, b) in self.spec.volume_backups.iter().enumerate() {
            if b.volume_name.is_empty() {
                c.required(
                    format!("spec.volumeBackups[{i}].volumeName"),
                    "Required value",
                );
            }
        }
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.spec != self.spec {
                c.forbidden(
                    "spec",
                    "the spec of a VirtualMachineSnapshotContent is immutable",
                );
            }
        }
    }
}

/// KubeVirt's pair of conditions on snapshots and restores: `Progressing`
/// (true while under way) and `Ready`, both with `reason` and `message`.
/// Reason `Failed` ends the work: neither is true.
pub fn progress_conditions(c: &mut Vec<Condition>, ready: bool, reason: &str, message: &str) {
    use crate::meta::{ConditionStatus, set_condition};
    let progressing = !ready && reason != "Failed";
    for (t, on) in [("Progressing", progressing), ("Ready", ready)] {
        set_condition(
            c,
            Condition {
                reason: Some(reason.to_string()),
                message: Some(message.to_string()),
                ..Condition::new(
                    t,
                    if on {
                        ConditionStatus::True
                    } else {
                        ConditionStatus::False
                    },
                )
            },
        );
    }
}

/// A restore that ended in failure (its `Ready` condition's reason).
pub fn restore_failed(st: &VirtualMachineRestoreStatus) -> bool {
    st.conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.reason.as_deref() == Some("Failed"))
}

/// Name of the Volume a restore into a new VM makes for one of its disks
/// (KubeVirt's `restore-{restore uid}-{volume name}`).
pub fn restored_volume_name(restore_uid: &str, volume: &str) -> String {
    format!("restore-{restore_uid}-{volume}")
}

/// The new VM's definition: the snapshot's VM (`source`) under the
/// target's name, its snapshotted disks on the restored Volumes
/// (`renames`: old claim → new Volume), without MAC addresses, firmware
/// UUID, resume mark and bookkeeping, then the restore's patches. `Err`
/// names the failing patch (`spec.patches: …`).
pub fn new_vm_definition(
    source: &Value,
    target: &str,
    restore_uid: &str,
    renames: &[(String, String)],
    patches: &[String],
) -> Result<Value, String> {
    let mut vm = source.clone();
    let meta = vm["metadata"].as_object().cloned().unwrap_or_default();
    let mut annotations = meta
        .get("annotations")
        .and_then(|a| a.as_object().cloned())
        .unwrap_or_default();
    annotations.remove(RESUME_FROM_ANNOTATION);
    annotations.remove(RESUME_HOST_ANNOTATION);
    annotations.insert(RESTORED_BY_ANNOTATION.into(), restore_uid.into());
    vm["metadata"] = json!({
        "name": target,
        "namespace": meta.get("namespace").cloned().unwrap_or(Value::Null),
        "labels": meta.get("labels").cloned().unwrap_or_else(|| json!({})),
        "annotations": annotations,
    });
    if let Some(o) = vm.as_object_mut() {
        o.remove("status");
    }
    let spec = &mut vm["spec"]["template"]["spec"];
    if let Some(vols) = spec["volumes"].as_array_mut() {
        for v in vols.iter_mut() {
            let claim = v["persistentVolumeClaim"]["claimName"]
                .as_str()
                .or(v["dataVolume"]["name"].as_str())
                .map(str::to_string);
            if let Some((_, new)) = renames.iter().find(|(old, _)| Some(old) == claim.as_ref()) {
                *v = json!({"name": v["name"], "persistentVolumeClaim": {"claimName": new}});
            }
        }
    }
    if let Some(ifaces) = spec["domain"]["devices"]["interfaces"].as_array_mut() {
        for i in ifaces.iter_mut().filter_map(Value::as_object_mut) {
            i.remove("macAddress");
        }
    }
    if let Some(fw) = spec["domain"]["firmware"].as_object_mut() {
        fw.remove("uuid");
        fw.remove("serial");
    }
    if let Some(t) = vm["spec"]["dataVolumeTemplates"].as_array_mut() {
        t.retain(|d| {
            !renames
                .iter()
                .any(|(old, _)| d["metadata"]["name"].as_str() == Some(old))
        });
    }
    crate::jsonpatch::apply_all(&mut vm, patches).map_err(|e| format!("spec.patches: {e}"))?;
    Ok(vm)
}

/// The VM's krvirt Volumes in a VM definition (JSON), as (disk name,
/// Volume name): `persistentVolumeClaim` and `dataVolume` volumes.
pub fn vm_claims(vm: &Value) -> Vec<(String, String)> {
    vm["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let claim = v["persistentVolumeClaim"]["claimName"]
                .as_str()
                .or(v["dataVolume"]["name"].as_str())?;
            Some((v["name"].as_str()?.to_string(), claim.to_string()))
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubevirt::VirtualMachine;

    #[test]
    fn a_new_vm_from_a_snapshot_gets_its_own_volumes_macs_and_uuid() {
        let source = json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "src", "namespace": "default", "uid": "u1",
                "resourceVersion": "7", "labels": {"app": "a"},
                "annotations": {RESUME_FROM_ANNOTATION: "x", RESUME_HOST_ANNOTATION: "h", "keep": "y"}},
            "spec": {
                "runStrategy": "Always",
                "dataVolumeTemplates": [{"metadata": {"name": "src-root"}}],
                "template": {"spec": {
                    "domain": {
                        "devices": {"interfaces": [{"name": "default", "macAddress": "02:00:00:00:00:09"}]},
                        "firmware": {"uuid": "5d307ca9-b3ef-428c-8861-06e72d69f223", "serial": "s"},
                    },
                    "volumes": [
                        {"name": "root", "dataVolume": {"name": "src-root"}},
                        {"name": "data", "persistentVolumeClaim": {"claimName": "src-data"}},
                        {"name": "boot", "containerDisk": {"image": "demo"}},
                    ],
                }},
            },
            "status": {"ready": true},
        });
        assert_eq!(
            vm_claims(&source),
            vec![
                ("root".to_string(), "src-root".to_string()),
                ("data".to_string(), "src-data".to_string())
            ]
        );
        let renames = vec![
            ("src-root".to_string(), "restore-r-root".to_string()),
            ("src-data".to_string(), "restore-r-data".to_string()),
        ];
        let vm = new_vm_definition(
            &source,
            "dst",
            "r",
            &renames,
            &[r#"{"op":"add","path":"/metadata/labels/new","value":"1"}"#.into()],
        )
        .unwrap();
        assert_eq!(vm["metadata"]["name"], "dst");
        assert!(vm["metadata"]["uid"].is_null() && vm["metadata"]["resourceVersion"].is_null());
        assert!(vm.get("status").is_none());
        assert_eq!(vm["metadata"]["labels"], json!({"app": "a", "new": "1"}));
        let ann = &vm["metadata"]["annotations"];
        assert!(ann[RESUME_FROM_ANNOTATION].is_null(), "{ann}");
        assert!(ann[RESUME_HOST_ANNOTATION].is_null(), "{ann}");
        assert_eq!(ann[RESTORED_BY_ANNOTATION], "r");
        assert_eq!(ann["keep"], "y");
        let spec = &vm["spec"]["template"]["spec"];
        assert_eq!(
            spec["volumes"][0],
            json!({"name": "root", "persistentVolumeClaim": {"claimName": "restore-r-root"}})
        );
        assert_eq!(
            spec["volumes"][1]["persistentVolumeClaim"]["claimName"],
            "restore-r-data"
        );
        assert_eq!(spec["volumes"][2]["containerDisk"]["image"], "demo");
        assert!(spec["domain"]["devices"]["interfaces"][0]["macAddress"].is_null());
        assert_eq!(spec["domain"]["firmware"], json!({}));
        assert_eq!(vm["spec"]["dataVolumeTemplates"], json!([]));
        // The result is a valid VirtualMachine.
        serde_json::from_value::<VirtualMachine>(vm).unwrap();
    }

    #[test]
    fn bad_patches_are_named() {
        let e = new_vm_definition(
            &json!({"metadata": {}, "spec": {"template": {"spec": {}}}}),
            "dst",
            "r",
            &[],
            &[r#"{"op":"replace","path":"/metadata/nope","value":1}"#.into()],
        )
        .unwrap_err();
        assert!(
            e.starts_with("spec.patches") && e.contains("/metadata/nope"),
            "{e}"
        );
    }

    #[test]
    fn snapshot_content_admission_names_fields() {
        let kind = crate::find_kind("virtualmachinesnapshotcontents").unwrap();
        let ok = json!({
            "apiVersion": API_VERSION, "kind": "VirtualMachineSnapshotContent",
            "metadata": {"name": "vmsnapshot-content-u", "namespace": "default"},
            "spec": {"source": {"virtualMachine": {"metadata": {"name": "a"}}},
                "virtualMachineSnapshotName": "s",
                "volumeBackups": [{"volumeName": "root",
                    "persistentVolumeClaim": {"metadata": {"name": "a-root"}},
                    "volumeSnapshotName": "vmsnap-u"}]},
        });
        let stored = crate::admit(kind, ok.clone(), None).unwrap();
        let mut bad = ok.clone();
        bad["spec"]["source"]["virtualMachine"] = json!("nope");
        bad["spec"]["volumeBackups"][0]["volumeName"] = json!("");
        let e = crate::admit(kind, bad, None).unwrap_err();
        let text = format!("{e:?}");
        assert!(text.contains("spec.source.virtualMachine"), "{text}");
        assert!(text.contains("spec.volumeBackups[0].volumeName"), "{text}");
        let mut changed = stored.clone();
        changed["spec"]["virtualMachineSnapshotName"] = json!("other");
        let e = crate::admit(kind, changed, Some(&stored)).unwrap_err();
        assert!(format!("{e:?}").contains("immutable"), "{e:?}");
    }
}
