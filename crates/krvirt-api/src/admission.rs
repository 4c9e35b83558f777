//! Admission machinery: typed decoding that names every unknown field by
//! its full path, the table of KubeVirt fields krvirt does not implement
//! yet, and helpers to collect causes.
//!
//! Decoding runs `serde_path_to_error` over the JSON. Each unknown field
//! is reported, removed, and decoding retried, so one request reports all
//! of them at once. A field KubeVirt has but krvirt does not implement is
//! reported as `FieldValueNotSupported` with [`NOT_IMPLEMENTED`]; anything
//! else is a plain `FieldUnknown` (a typo). Other decode errors (wrong
//! type, unknown enum value, missing required field) stop decoding.
//! Semantic validation only runs on objects that decoded cleanly.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{FieldCause, ValidationError, reason};

/// Message for KubeVirt features krvirt does not implement yet.
pub const NOT_IMPLEMENTED: &str = "supported by KubeVirt but not implemented by krvirt yet";

/// KubeVirt `VirtualMachineInstanceSpec` fields krvirt refuses for now,
/// relative to the VMI spec (`spec.` of a VMI, `spec.template.spec.` of a
/// VM), list indices removed.
pub(crate) const VMI_SPEC_NOT_IMPLEMENTED: &[&str] = &[
    "priorityClassName",
    "schedulerName",
    "affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution.namespaceSelector",
    "affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution.matchLabelKeys",
    "affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution.mismatchLabelKeys",
    "affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution.podAffinityTerm.namespaceSelector",
    "affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution.podAffinityTerm.matchLabelKeys",
    "affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution.podAffinityTerm.mismatchLabelKeys",
    "affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution.namespaceSelector",
    "affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution.matchLabelKeys",
    "affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution.mismatchLabelKeys",
    "affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution.podAffinityTerm.namespaceSelector",
    "affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution.podAffinityTerm.matchLabelKeys",
    "affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution.podAffinityTerm.mismatchLabelKeys",
    "serviceAccountName",
    "topologySpreadConstraints",
    "startStrategy",
    "livenessProbe",
    "readinessProbe",
    "dnsPolicy",
    "dnsConfig",
    "accessCredentials",
    "resourceClaims",
    "utilityVolumes",
    "domain.ioThreadsPolicy",
    "domain.ioThreads",
    "domain.chassis",
    "domain.launchSecurity",
    "domain.rebootPolicy",
    "domain.cpu.features",
    "domain.cpu.realtime",
    "domain.cpu.maxSockets",
    "domain.memory.maxGuest",
    "domain.memory.reservedOverhead",
    "domain.firmware.acpi",
    "domain.firmware.bootloader.efi",
    "domain.firmware.kernelBoot.container.imagePullSecret",
    "domain.clock.timezone",
    "domain.clock.timer",
    "domain.features.hyperv",
    "domain.features.hypervPassthrough",
    "domain.features.kvm",
    "domain.features.pvspinlock",
    "domain.devices.useVirtioTransitional",
    "domain.devices.disableHotplug",
    "domain.devices.watchdog",
    "domain.devices.inputs",
    "domain.devices.logSerialConsole",
    "domain.devices.autoattachMemBalloon",
    "domain.devices.autoattachInputDevice",
    "domain.devices.autoattachVSOCK",
    "domain.devices.blockMultiQueue",
    "domain.devices.gpus",
    "domain.devices.downwardMetrics",
    "domain.devices.panicDevices",
    "domain.devices.filesystems",
    "domain.devices.hostDevices",
    "domain.devices.clientPassthrough",
    "domain.devices.sound",
    "domain.devices.tpm",
    "domain.devices.video",
    "domain.devices.disks.lun",
    "domain.devices.disks.dedicatedIOThread",
    "domain.devices.disks.io",
    "domain.devices.disks.tag",
    "domain.devices.disks.blockSize",
    "domain.devices.disks.shareable",
    "domain.devices.disks.errorPolicy",
    "domain.devices.disks.changedBlockTracking",
    "domain.devices.disks.disk.pciAddress",
    "domain.devices.interfaces.slirp",
    "domain.devices.interfaces.sriov",
    "domain.devices.interfaces.macvtap",
    "domain.devices.interfaces.passt",
    "domain.devices.interfaces.passtBinding",
    "domain.devices.interfaces.binding",
    "domain.devices.interfaces.pciAddress",
    "domain.devices.interfaces.dhcpOptions",
    "domain.devices.interfaces.tag",
    "domain.devices.interfaces.acpiIndex",
    "domain.devices.interfaces.state",
    "networks.pod.vmIPv6NetworkCIDR",
    "volumes.hostDisk",
    "volumes.cloudInitConfigDrive",
    "volumes.sysprep",
    "volumes.ephemeral",
    "volumes.configMap",
    "volumes.secret",
    "volumes.downwardAPI",
    "volumes.serviceAccount",
    "volumes.downwardMetrics",
    "volumes.memoryDump",
    "volumes.containerDisk.imagePullSecret",
    "volumes.cloudInitNoCloud.secretRef",
    "volumes.cloudInitNoCloud.networkDataSecretRef",
];

/// KubeVirt `VirtualMachineSpec` fields krvirt refuses for now (relative
/// to `spec.`).
pub(crate) const VM_SPEC_NOT_IMPLEMENTED: &[&str] = &[
    "instancetype.inferFromVolume",
    "instancetype.inferFromVolumeFailurePolicy",
    "preference.inferFromVolume",
    "preference.inferFromVolumeFailurePolicy",
    "dataVolumeTemplates.spec.sourceRef",
    "dataVolumeTemplates.spec.contentType",
    "dataVolumeTemplates.spec.preallocation",
    "dataVolumeTemplates.spec.priorityClassName",
    "dataVolumeTemplates.spec.checkpoints",
    "dataVolumeTemplates.spec.finalCheckpoint",
    "dataVolumeTemplates.spec.source.s3",
    "dataVolumeTemplates.spec.source.gcs",
    "dataVolumeTemplates.spec.source.imageio",
    "dataVolumeTemplates.spec.source.vddk",
    "dataVolumeTemplates.spec.source.snapshot",
    "dataVolumeTemplates.spec.source.registry.secretRef",
    "dataVolumeTemplates.spec.source.registry.certConfigMap",
    "dataVolumeTemplates.spec.source.registry.pullMethod",
    "dataVolumeTemplates.spec.source.registry.imageStream",
    "dataVolumeTemplates.spec.source.http.secretRef",
    "dataVolumeTemplates.spec.source.http.certConfigMap",
    "dataVolumeTemplates.spec.source.http.extraHeaders",
    "dataVolumeTemplates.spec.pvc.dataSource",
    "dataVolumeTemplates.spec.pvc.dataSourceRef",
    "dataVolumeTemplates.spec.pvc.selector",
    "dataVolumeTemplates.spec.pvc.volumeName",
    "dataVolumeTemplates.spec.pvc.volumeAttributesClassName",
    "dataVolumeTemplates.spec.pvc.resources.limits",
    "dataVolumeTemplates.spec.storage.dataSource",
    "dataVolumeTemplates.spec.storage.dataSourceRef",
    "dataVolumeTemplates.spec.storage.selector",
    "dataVolumeTemplates.spec.storage.volumeName",
    "dataVolumeTemplates.spec.storage.resources.limits",
    "updateVolumesStrategy",
];

/// Is `path` (dotted, indices removed) a KubeVirt VirtualMachine field
/// krvirt does not implement?
pub(crate) fn vm_not_implemented(path: &str) -> bool {
    if let Some(rel) = path.strip_prefix("spec.template.spec.") {
        return VMI_SPEC_NOT_IMPLEMENTED.contains(&rel);
    }
    path.strip_prefix("spec.")
        .is_some_and(|rel| VM_SPEC_NOT_IMPLEMENTED.contains(&rel))
}

/// Same for VirtualMachineInstance.
pub(crate) fn vmi_not_implemented(path: &str) -> bool {
    path.strip_prefix("spec.")
        .is_some_and(|rel| VMI_SPEC_NOT_IMPLEMENTED.contains(&rel))
}

/// Full paths (list entries written `[]`) of the KubeVirt fields that
/// admission refuses as not implemented yet, for documentation.
pub fn not_implemented_fields(kind: &crate::KindInfo) -> Vec<String> {
    let with_lists = |prefix: &str, rel: &str| {
        let mut out = prefix.to_string();
        let mut acc = String::new();
        for part in rel.split('.') {
            if !acc.is_empty() {
                acc.push('.');
            }
            acc.push_str(part);
            out.push_str(part);
            if matches!(
                acc.as_str(),
                "domain.devices.disks"
                    | "domain.devices.interfaces"
                    | "networks"
                    | "volumes"
                    | "affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution"
                    | "affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution"
                    | "affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution"
                    | "affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution"
            ) && acc != rel
            {
                out.push_str("[]");
            }
            out.push('.');
        }
        out.pop();
        out
    };
    match (kind.group, kind.kind) {
        ("kubevirt.io", "VirtualMachine") => VM_SPEC_NOT_IMPLEMENTED
            .iter()
            .map(|r| format!("spec.{r}"))
            .chain(
                VMI_SPEC_NOT_IMPLEMENTED
                    .iter()
                    .map(|r| with_lists("spec.template.spec.", r)),
            )
            .collect(),
        ("kubevirt.io", "VirtualMachineInstance") => VMI_SPEC_NOT_IMPLEMENTED
            .iter()
            .map(|r| with_lists("spec.", r))
            .collect(),
        _ => Vec::new(),
    }
}

/// Collector of validation causes.
#[derive(Debug, Default)]
pub(crate) struct Causes(pub(crate) Vec<FieldCause>);

impl Causes {
    pub(crate) fn push(&mut self, reason: &str, field: impl Into<String>, msg: impl Into<String>) {
        self.0.push(FieldCause::new(reason, field, msg));
    }
    pub(crate) fn required(&mut self, field: impl Into<String>, msg: impl Into<String>) {
        self.push(reason::REQUIRED, field, msg);
    }
    pub(crate) fn invalid(&mut self, field: impl Into<String>, msg: impl Into<String>) {
        self.push(reason::INVALID, field, msg);
    }
    pub(crate) fn not_supported(&mut self, field: impl Into<String>, msg: impl Into<String>) {
        self.push(reason::NOT_SUPPORTED, field, msg);
    }
    pub(crate) fn duplicate(&mut self, field: impl Into<String>, msg: impl Into<String>) {
        self.push(reason::DUPLICATE, field, msg);
    }
    pub(crate) fn forbidden(&mut self, field: impl Into<String>, msg: impl Into<String>) {
        self.push(reason::FORBIDDEN, field, msg);
    }
    /// A KubeVirt feature krvirt parses but cannot honour yet.
    pub(crate) fn not_implemented(&mut self, field: impl Into<String>, detail: &str) {
        self.push(
            reason::NOT_SUPPORTED,
            field,
            format!("{NOT_IMPLEMENTED} ({detail})"),
        );
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `parent.child` (or `child` at the root).
pub(crate) fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

/// `parent[i]`.
pub(crate) fn idx(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

fn segments(path: &serde_path_to_error::Path) -> Vec<Seg> {
    path.iter()
        .filter_map(|s| match s {
            serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
            serde_path_to_error::Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            _ => None,
        })
        .collect()
}

fn display(segs: &[Seg]) -> String {
    let mut out = String::new();
    for s in segs {
        match s {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn normalized(segs: &[Seg]) -> String {
    segs.iter()
        .filter_map(|s| match s {
            Seg::Key(k) => Some(k.as_str()),
            Seg::Index(_) => None,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Remove the value at `segs` (whose last segment is a key) from `root`.
fn remove_at(root: &mut Value, segs: &[Seg]) -> bool {
    let Some((Seg::Key(last), parents)) = segs.split_last() else {
        return false;
    };
    let mut cur = root;
    for s in parents {
        cur = match (s, cur) {
            (Seg::Key(k), Value::Object(m)) => match m.get_mut(k) {
                Some(v) => v,
                None => return false,
            },
            (Seg::Index(i), Value::Array(a)) => match a.get_mut(*i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match cur {
        Value::Object(m) => m.remove(last).is_some(),
        _ => false,
    }
}

/// Text between the first pair of backticks in a serde message.
fn backticked(msg: &str) -> Option<&str> {
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(&msg[start..start + len])
}

/// Make serde's Rust-flavoured type names readable for API users.
fn humanize(msg: &str) -> String {
    let mut m = msg.to_string();
    for (from, to) in [
        ("expected u32", "expected a non-negative integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected i32", "expected an integer"),
        ("expected i64", "expected an integer"),
        ("expected a boolean", "expected true or false"),
    ] {
        m = m.replace(from, to);
    }
    m
}

const MAX_DECODE_CAUSES: usize = 100;

/// Decode `value` as `T`, reporting every unknown field with its path.
/// `not_implemented` classifies a normalised path (no list indices) as a
/// KubeVirt field krvirt does not implement.
pub(crate) fn decode<T: DeserializeOwned>(
    mut value: Value,
    not_implemented: fn(&str) -> bool,
) -> Result<T, Vec<FieldCause>> {
    let mut causes = Vec::new();
    loop {
        let err = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(t) if causes.is_empty() => return Ok(t),
            Ok(_) => return Err(causes),
            Err(e) => e,
        };
        let segs = segments(err.path());
        let msg = err.inner().to_string();
        let field = display(&segs);
        if msg.starts_with("unknown field") {
            let norm = normalized(&segs);
            if not_implemented(&norm) {
                causes.push(FieldCause::new(
                    reason::NOT_SUPPORTED,
                    field,
                    NOT_IMPLEMENTED,
                ));
            } else {
                causes.push(FieldCause::new(reason::UNKNOWN, field, humanize(&msg)));
            }
            if causes.len() >= MAX_DECODE_CAUSES || !remove_at(&mut value, &segs) {
                return Err(causes);
            }
            continue;
        }
        if msg.starts_with("missing field")
            && let Some(name) = backticked(&msg)
        {
            causes.push(FieldCause::new(
                reason::REQUIRED,
                join(&field, name),
                "Required value",
            ));
        } else if msg.starts_with("unknown variant") {
            causes.push(FieldCause::new(
                reason::NOT_SUPPORTED,
                field,
                humanize(&msg),
            ));
        } else {
            causes.push(FieldCause::new(reason::INVALID, field, humanize(&msg)));
        }
        return Err(causes);
    }
}

/// A kind admission knows how to check and default.
pub(crate) trait Admit: Serialize + DeserializeOwned + Sized {
    /// Classifies a normalised unknown-field path as not implemented.
    fn not_implemented(path: &str) -> bool;
    /// Apply defaults (must be idempotent and never fail).
    fn apply_defaults(&mut self);
    /// Validate, collecting every cause. `old` is the stored object on update.
    fn validate(&self, old: Option<&Self>, causes: &mut Causes);
}

/// Decode, default, validate and re-encode one object.
pub(crate) fn admit_typed<T: Admit>(
    obj: Value,
    old: Option<&Value>,
) -> Result<Value, ValidationError> {
    let mut typed: T = decode(obj, T::not_implemented).map_err(ValidationError::from_causes)?;
    let old_typed: Option<T> =
        old.and_then(|o| serde_json::from_value(strip_bookkeeping(o.clone())).ok());
    typed.apply_defaults();
    let mut causes = Causes::default();
    typed.validate(old_typed.as_ref(), &mut causes);
    if !causes.is_empty() {
        return Err(ValidationError::from_causes(causes.0));
    }
    serde_json::to_value(&typed).map_err(|e| {
        ValidationError::new(
            reason::INVALID,
            "",
            format!("cannot encode the admitted object: {e}"),
        )
    })
}

/// Drop the Kubernetes bookkeeping fields krvirt does not keep
/// (`managedFields`, `selfLink`) from `metadata` and `spec.template.metadata`.
pub(crate) fn strip_bookkeeping(mut obj: Value) -> Value {
    fn strip(meta: Option<&mut Value>) {
        if let Some(Value::Object(m)) = meta {
            m.remove("managedFields");
            m.remove("selfLink");
        }
    }
    strip(obj.get_mut("metadata"));
    if let Some(template) = obj.get_mut("spec").and_then(|s| s.get_mut("template")) {
        strip(template.get_mut("metadata"));
    }
    obj
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_tables() {
        assert!(vm_not_implemented("spec.template.spec.domain.devices.gpus"));
        assert!(!vm_not_implemented("spec.instancetype"));
        assert!(!vm_not_implemented(
            "spec.template.spec.domain.devices.gpuss"
        ));
        assert!(!vm_not_implemented("spec.domain.devices.gpus"));
        assert!(vmi_not_implemented("spec.domain.devices.gpus"));
        assert!(vmi_not_implemented("spec.volumes.hostDisk"));
        assert!(!vmi_not_implemented("spec.instancetype"));
        assert!(!vmi_not_implemented("metadata.gpus"));
    }

    #[test]
    fn documented_field_list() {
        let vm = crate::find_kind("vm").expect("served");
        let fields = not_implemented_fields(vm);
        assert!(!fields.contains(&"spec.instancetype".to_string()));
        assert!(fields.contains(&"spec.template.spec.domain.devices.gpus".to_string()));
        assert!(fields.contains(&"spec.template.spec.domain.devices.disks[].lun".to_string()));
        assert!(
            fields.contains(
                &"spec.template.spec.volumes[].containerDisk.imagePullSecret".to_string()
            )
        );
        let vmi = crate::find_kind("vmi").expect("served");
        assert!(
            not_implemented_fields(vmi)
                .contains(&"spec.networks[].pod.vmIPv6NetworkCIDR".to_string())
        );
        assert!(!not_implemented_fields(vmi).contains(&"spec.networks[].multus".to_string()));
    }

    #[test]
    fn remove_nested_key() {
        let mut v = serde_json::json!({"a": [{"b": 1, "c": 2}]});
        assert!(remove_at(
            &mut v,
            &[Seg::Key("a".into()), Seg::Index(0), Seg::Key("b".into())]
        ));
        assert_eq!(v, serde_json::json!({"a": [{"c": 2}]}));
        assert!(!remove_at(
            &mut v,
            &[Seg::Key("zz".into()), Seg::Key("b".into())]
        ));
    }
}
