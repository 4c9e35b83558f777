//! `clone.kubevirt.io/v1beta1` VirtualMachineClone, as KubeVirt: a clone
//! of a VirtualMachine (through a temporary VirtualMachineSnapshot) or of
//! a VirtualMachineSnapshot, restored into a new VM with its own Volumes,
//! new MAC addresses and optionally a new SMBIOS serial, labels and
//! annotations filtered.
//!
//! Phases: `SnapshotInProgress` → `CreatingTargetVM` (the restore makes
//! the target's Volumes, then the target) → `RestoreInProgress` →
//! `Succeeded`, or `Failed`. The pure parts (phase transitions, filters,
//! the patches handed to the restore) live here; the agent drives them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::admission::{Admit, Causes};
use crate::kubevirt::validate::{immutable_identity, metadata};
use crate::meta::{Condition, ObjectMeta, null_default};
use crate::snapshot::TypedLocalObjectReference;

pub const API_VERSION: &str = "clone.kubevirt.io/v1beta1";
const MAX_NAME: usize = 253;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineClone {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: VirtualMachineCloneSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VirtualMachineCloneStatus>,
}

/// Label and annotation filters for the target's `spec.template.metadata`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloneTemplateFilters {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub label_filters: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub annotation_filters: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineCloneSpec {
    /// A `VirtualMachine` (snapshotted first) or a `VirtualMachineSnapshot`
    /// (group `snapshot.kubevirt.io`).
    pub source: TypedLocalObjectReference,
    /// The VM to create (kind `VirtualMachine`); default `clone-{uid}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TypedLocalObjectReference>,
    /// Which of the source's labels the target VM keeps: globs (`*` matches
    /// anything), `!glob` excludes. Default: all.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub label_filters: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub annotation_filters: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<CloneTemplateFilters>,
    /// Interface name → MAC address for the target; interfaces not named
    /// get a new generated MAC.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub new_mac_addresses: BTreeMap<String, String>,
    /// The target's SMBIOS serial (`firmware.serial`); default: none.
    #[serde(
        default,
        rename = "newSMBiosSerial",
        skip_serializing_if = "Option::is_none"
    )]
    pub new_sm_bios_serial: Option<String>,
    /// JSON patches (RFC 6902 strings) applied to the target VM.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub patches: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum ClonePhase {
    SnapshotInProgress,
    CreatingTargetVM,
    RestoreInProgress,
    Succeeded,
    Failed,
    Unknown,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineCloneStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ClonePhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<String>,
    /// `Progressing`, `Ready`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
}

impl crate::meta::Object for VirtualMachineClone {
    fn kind_info() -> &'static crate::KindInfo {
        crate::types::kind_named("VirtualMachineClone")
    }
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

fn valid_mac(m: &str) -> bool {
    let parts: Vec<&str> = m.split([':', '-']).collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Admit for VirtualMachineClone {
    fn not_implemented(_path: &str) -> bool {
        false
    }
    fn apply_defaults(&mut self) {}
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", MAX_NAME, true, c);
        let s = &self.spec.source;
        match (s.api_group.as_deref(), s.kind.as_str()) {
            (None | Some("kubevirt.io"), "VirtualMachine") => {}
            (None | Some("snapshot.kubevirt.io"), "VirtualMachineSnapshot") => {}
            _ => c.not_supported(
                "spec.source.kind",
                "supported: VirtualMachine (kubevirt.io), VirtualMachineSnapshot (snapshot.kubevirt.io)",
            ),
        }
        if s.name.is_empty() {
            c.required("spec.source.name", "Required value");
        }
        if let Some(t) = &self.spec.target {
            if t.kind != "VirtualMachine" {
                c.not_supported("spec.target.kind", "only VirtualMachine is supported");
            }
            if t.api_group.as_deref().is_some_and(|g| g != "kubevirt.io") {
                c.not_supported("spec.target.apiGroup", "only kubevirt.io is supported");
            }
            if t.name.is_empty() {
                c.required("spec.target.name", "Required value");
            } else if s.kind == "VirtualMachine" && t.name == s.name {
                c.invalid("spec.target.name", "the target must differ from the source");
            }
        }
        for (iface, mac) in &self.spec.new_mac_addresses {
            if !valid_mac(mac) {
                c.invalid(
                    format!("spec.newMacAddresses.{iface}"),
                    format!("{mac:?} is not a MAC address (six hex pairs)"),
                );
            }
        }
        for (i, p) in self.spec.patches.iter().enumerate() {
            if let Err(e) = crate::jsonpatch::parse(p) {
                c.invalid(format!("spec.patches[{i}]"), e.to_string());
            }
        }
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.spec != self.spec {
                c.forbidden("spec", "the spec of a VirtualMachineClone is immutable");
            }
        }
    }
}

/// `*` matches any run of characters.
fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, rest)) => {
            let Some(tail) = s.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

/// KubeVirt's key filters: no filters keep everything; otherwise a key is
/// kept when a filter matches it and no `!filter` does.
pub fn key_kept(filters: &[String], key: &str) -> bool {
    if filters.is_empty() {
        return true;
    }
    let (neg, pos): (Vec<&String>, Vec<&String>) = filters.iter().partition(|f| f.starts_with('!'));
    pos.iter().any(|f| glob(f, key)) && !neg.iter().any(|f| glob(&f[1..], key))
}

fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn filter_patches(map: &Value, filters: &[String], base: &str, out: &mut Vec<String>) {
    if let Some(m) = map.as_object() {
        for k in m.keys() {
            if !key_kept(filters, k) {
                out.push(
                    json!({"op": "remove", "path": format!("{base}/{}", escape(k))}).to_string(),
                );
            }
        }
    }
}

/// The patches a clone hands to its restore, computed from the source VM
/// (as JSON): label and annotation filters, MAC addresses, SMBIOS serial,
/// then the clone's own patches. (The restore into a new VM already drops
/// the source's MAC addresses and firmware UUID.)
pub fn restore_patches(spec: &VirtualMachineCloneSpec, source_vm: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let meta = &source_vm["metadata"];
    filter_patches(
        &meta["labels"],
        &spec.label_filters,
        "/metadata/labels",
        &mut out,
    );
    filter_patches(
        &meta["annotations"],
        &spec.annotation_filters,
        "/metadata/annotations",
        &mut out,
    );
    let t = spec.template.clone().unwrap_or_default();
    let tmeta = &source_vm["spec"]["template"]["metadata"];
    filter_patches(
        &tmeta["labels"],
        &t.label_filters,
        "/spec/template/metadata/labels",
        &mut out,
    );
    filter_patches(
        &tmeta["annotations"],
        &t.annotation_filters,
        "/spec/template/metadata/annotations",
        &mut out,
    );
    let ifaces = source_vm["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (i, iface) in ifaces.iter().enumerate() {
        if let Some(mac) = iface["name"]
            .as_str()
            .and_then(|n| spec.new_mac_addresses.get(n))
        {
            out.push(
                json!({"op": "add",
                    "path": format!("/spec/template/spec/domain/devices/interfaces/{i}/macAddress"),
                    "value": mac})
                .to_string(),
            );
        }
    }
    if let Some(serial) = &spec.new_sm_bios_serial {
        if source_vm["spec"]["template"]["spec"]["domain"]["firmware"].is_null() {
            out.push(
                json!({"op": "add", "path": "/spec/template/spec/domain/firmware", "value": {}})
                    .to_string(),
            );
        }
        out.push(
            json!({"op": "add", "path": "/spec/template/spec/domain/firmware/serial", "value": serial})
                .to_string(),
        );
    }
    out.extend(spec.patches.iter().cloned());
    out
}

/// What the clone's temporary objects look like right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Not created yet.
    Absent,
    /// Created, not done.
    Running,
    Done,
    /// Failed, with no way forward.
    Failed,
}

/// The next step of a clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create the temporary VirtualMachineSnapshot of the source VM.
    CreateSnapshot,
    /// Create the VirtualMachineRestore into the target.
    CreateRestore,
    /// Wait; the phase to show.
    Wait(ClonePhase),
    /// Delete the temporary snapshot (if the clone made it) and restore,
    /// then `Succeeded`.
    Finish,
    /// `Failed` with this message.
    Fail(String),
    /// Nothing more to do (`Succeeded` or `Failed`).
    Done,
}

/// Phase transitions of a clone: `source_is_vm` (else a snapshot),
/// whether the target VM already existed before the clone started its
/// restore, and how its snapshot and restore are doing.
pub fn decide(
    phase: Option<ClonePhase>,
    source_is_vm: bool,
    target_taken: bool,
    snapshot: Progress,
    restore: Progress,
) -> Step {
    if matches!(phase, Some(ClonePhase::Succeeded | ClonePhase::Failed)) {
        return Step::Done;
    }
    if restore == Progress::Absent && target_taken {
        return Step::Fail("the target VirtualMachine already exists".into());
    }
    match snapshot {
        Progress::Failed => return Step::Fail("the snapshot of the source failed".into()),
        Progress::Absent if source_is_vm && restore == Progress::Absent => {
            return Step::CreateSnapshot;
        }
        Progress::Absent if restore == Progress::Absent => {
            return Step::Fail("the source VirtualMachineSnapshot does not exist".into());
        }
        Progress::Running => return Step::Wait(ClonePhase::SnapshotInProgress),
        _ => {}
    }
    match restore {
        Progress::Absent => Step::CreateRestore,
        // The restore first makes the target's disks and the target, then
        // finishes restoring into it.
        Progress::Running if !target_taken => Step::Wait(ClonePhase::CreatingTargetVM),
        Progress::Running => Step::Wait(ClonePhase::RestoreInProgress),
        Progress::Done => Step::Finish,
        Progress::Failed => Step::Fail("the restore into the target failed".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ClonePhase::{Failed as CloneFailed, RestoreInProgress, SnapshotInProgress, Succeeded};
    use Progress::{Absent, Done, Failed, Running};

    #[test]
    fn phases_of_a_vm_clone() {
        assert_eq!(
            decide(None, true, false, Absent, Absent),
            Step::CreateSnapshot
        );
        assert_eq!(
            decide(Some(SnapshotInProgress), true, false, Running, Absent),
            Step::Wait(SnapshotInProgress)
        );
        assert_eq!(
            decide(Some(SnapshotInProgress), true, false, Done, Absent),
            Step::CreateRestore
        );
        assert_eq!(
            decide(Some(RestoreInProgress), true, false, Done, Running),
            Step::Wait(ClonePhase::CreatingTargetVM)
        );
        // The restore made the target: that is not a conflict.
        assert_eq!(
            decide(Some(RestoreInProgress), true, true, Done, Running),
            Step::Wait(RestoreInProgress)
        );
        assert_eq!(
            decide(Some(RestoreInProgress), true, true, Done, Done),
            Step::Finish
        );
        // After Finish the temporary snapshot is gone; the phase ends it.
        assert_eq!(
            decide(Some(Succeeded), true, true, Absent, Absent),
            Step::Done
        );
    }

    #[test]
    fn phases_of_a_snapshot_clone_and_failures() {
        assert_eq!(
            decide(None, false, false, Done, Absent),
            Step::CreateRestore
        );
        assert!(matches!(
            decide(None, false, false, Absent, Absent),
            Step::Fail(_)
        ));
        assert!(
            matches!(decide(None, true, true, Absent, Absent), Step::Fail(m) if m.contains("already exists"))
        );
        assert!(matches!(
            decide(Some(SnapshotInProgress), true, false, Failed, Absent),
            Step::Fail(_)
        ));
        assert!(matches!(
            decide(Some(RestoreInProgress), true, true, Done, Failed),
            Step::Fail(_)
        ));
        assert_eq!(
            decide(Some(CloneFailed), true, false, Absent, Absent),
            Step::Done
        );
    }

    #[test]
    fn filters() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(key_kept(&[], "anything"));
        let corpus = f(&["*", "!someKey/*"]);
        assert!(key_kept(&corpus, "app"));
        assert!(!key_kept(&corpus, "someKey/x"));
        let only = f(&["anotherKey/*"]);
        assert!(key_kept(&only, "anotherKey/a"));
        assert!(!key_kept(&only, "other"));
        assert!(glob("a*c*e", "abcde") && !glob("a*c*e", "abcd"));
    }

    #[test]
    fn patches_from_the_corpus_spec() {
        let spec = VirtualMachineCloneSpec {
            label_filters: vec!["*".into(), "!someKey/*".into()],
            new_mac_addresses: [("default".to_string(), "02:00:00:00:00:01".to_string())].into(),
            new_sm_bios_serial: Some("new-serial".into()),
            patches: vec![r#"{"op":"add","path":"/metadata/labels/x","value":"y"}"#.into()],
            ..Default::default()
        };
        let vm = json!({
            "metadata": {"labels": {"app": "a", "someKey/b": "c"}},
            "spec": {"template": {"spec": {"domain": {"devices": {"interfaces": [
                {"name": "default", "masquerade": {}}]}}}}}
        });
        let p = restore_patches(&spec, &vm);
        let mut doc = vm.clone();
        crate::jsonpatch::apply_all(&mut doc, &p).unwrap();
        assert_eq!(doc["metadata"]["labels"], json!({"app": "a", "x": "y"}));
        let d = &doc["spec"]["template"]["spec"]["domain"];
        assert_eq!(
            d["devices"]["interfaces"][0]["macAddress"],
            "02:00:00:00:00:01"
        );
        assert_eq!(d["firmware"]["serial"], "new-serial");
    }

    fn refused(kind: &str, obj: Value) -> Vec<String> {
        let k = crate::find_kind(kind).unwrap();
        match crate::admit(k, obj, None) {
            Ok(v) => panic!("accepted: {v}"),
            Err(e) => e.causes.into_iter().map(|c| c.field).collect(),
        }
    }

    #[test]
    fn admission_names_the_bad_fields() {
        let fields = refused(
            "virtualmachineclones",
            json!({"apiVersion": API_VERSION, "kind": "VirtualMachineClone",
                "metadata": {"name": "c", "namespace": "default"},
                "spec": {"source": {"kind": "Pod", "name": "x"},
                    "target": {"kind": "VirtualMachine", "name": ""},
                    "newMacAddresses": {"eth0": "zz"},
                    "patches": ["{\"op\":\"copy\",\"path\":\"/a\"}"]}}),
        );
        for f in [
            "spec.source.kind",
            "spec.target.name",
            "spec.newMacAddresses.eth0",
            "spec.patches[0]",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f} not in {fields:?}");
        }
        let fields = refused(
            "virtualmachinerestores",
            json!({"apiVersion": crate::snapshot::API_VERSION, "kind": "VirtualMachineRestore",
                "metadata": {"name": "r", "namespace": "default"},
                "spec": {"target": {"kind": "VirtualMachine", "name": "vm"},
                    "virtualMachineSnapshotName": "s", "patches": ["nope"]}}),
        );
        assert_eq!(fields, ["spec.patches[0]"]);
        let fields = refused(
            "virtualmachinesnapshots",
            json!({"apiVersion": crate::snapshot::API_VERSION, "kind": "VirtualMachineSnapshot",
                "metadata": {"name": "s", "namespace": "default"},
                "spec": {"source": {"kind": "VirtualMachine", "name": "vm"},
                    "deletionPolicy": "Keep", "includeMemory": true}}),
        );
        assert_eq!(fields, ["spec.deletionPolicy"]);
        // The corpus clone, with a real MAC, is accepted.
        let k = crate::find_kind("virtualmachineclones").unwrap();
        crate::admit(
            k,
            json!({"apiVersion": API_VERSION, "kind": "VirtualMachineClone",
                "metadata": {"name": "testclone", "namespace": "default"},
                "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "vm-cirros"},
                    "target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "vm-clone-target"},
                    "labelFilters": ["*", "!someKey/*"], "annotationFilters": ["anotherKey/*"],
                    "template": {"labelFilters": ["*"], "annotationFilters": ["anotherKey/*"]},
                    "newMacAddresses": {"interfaceName": "02-11-22-33-44-55"},
                    "newSMBiosSerial": "new-serial"}}),
            None,
        )
        .unwrap();
    }

    #[test]
    fn openapi_documents_include_memory_and_the_clone_kind() {
        let c = serde_json::to_value(crate::openapi_components()).unwrap();
        let schemas = &c["schemas"];
        assert!(
            schemas["VirtualMachineClone"].is_object(),
            "no clone schema"
        );
        let text = schemas.to_string();
        assert!(text.contains("includeMemory") && text.contains("memoryStateBytes"));
        assert!(text.contains("newSMBiosSerial"));
    }
}
