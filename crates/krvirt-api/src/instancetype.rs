//! `instancetype.kubevirt.io/v1beta1`: VirtualMachineInstancetype and
//! VirtualMachineClusterInstancetype (the CPU and memory of a VM, like a
//! cloud flavour) and VirtualMachinePreference /
//! VirtualMachineClusterPreference (defaults for devices, firmware, …).
//!
//! A VM names them in `spec.instancetype` / `spec.preference`. The VM
//! controller copies the referenced spec into the VM's annotations
//! ([`INSTANCETYPE_SNAPSHOT_ANNOTATION`], [`PREFERENCE_SNAPSHOT_ANNOTATION`])
//! the first time it sees the VM — KubeVirt's ControllerRevision in spirit —
//! and expands every VMI from that copy ([`expand`]), so editing an
//! instancetype later changes no existing VM. Values the VM sets itself
//! that differ from the instancetype are conflicts, reported with the VM
//! field's path; equal values are accepted (KubeVirt refuses them too,
//! krvirt is lenient so `vm-cirros-csmall.yaml` runs as written).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::admission::{Admit, Causes};
use crate::error::{FieldCause, reason};
use crate::kubevirt::validate::{immutable_identity, metadata};
use crate::kubevirt::{
    Bios, Bootloader, Clock, Cpu, DiskBus, FeatureApic, FeatureState, Features, InterfaceModel,
    Machine, Memory, Rng, VirtualMachineInstanceSpec,
};
use crate::meta::ObjectMeta;
use crate::quantity::Quantity;

pub const API_VERSION: &str = "instancetype.kubevirt.io/v1beta1";
/// The VM's copy of its instancetype (JSON of [`Snapshot`]).
pub const INSTANCETYPE_SNAPSHOT_ANNOTATION: &str = "krvirt.io/instancetype-snapshot";
/// The VM's copy of its preference (JSON of [`Snapshot`]).
pub const PREFERENCE_SNAPSHOT_ANNOTATION: &str = "krvirt.io/preference-snapshot";
const MAX_NAME: usize = 253;

/// CPU and memory of a VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstancetypeSpec {
    pub cpu: CpuInstancetype,
    pub memory: MemoryInstancetype,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CpuInstancetype {
    /// Number of vCPUs; laid out as sockets, cores or threads by the
    /// preference's `preferredCPUTopology` (sockets by default).
    pub guest: u32,
    /// CPU model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemoryInstancetype {
    /// Memory visible to the guest.
    pub guest: Quantity,
}

/// Defaults a VM gets where it sets nothing itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreferenceSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<DevicePreferences>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuPreferences>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwarePreferences>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachinePreferences>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<ClockPreferences>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<FeaturePreferences>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_termination_grace_period_seconds: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DevicePreferences {
    /// Bus of disks that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_disk_bus: Option<DiskBus>,
    /// Bus of CD-ROMs that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_cdrom_bus: Option<DiskBus>,
    /// Model of interfaces that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_interface_model: Option<InterfaceModel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_rng: Option<Rng>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_network_interface_multi_queue: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_autoattach_serial_console: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_autoattach_pod_interface: Option<bool>,
}

/// How the instancetype's vCPUs are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum PreferredCpuTopology {
    #[serde(rename = "sockets", alias = "preferSockets")]
    Sockets,
    #[serde(rename = "cores", alias = "preferCores")]
    Cores,
    #[serde(rename = "threads", alias = "preferThreads")]
    Threads,
    /// Sockets and cores 1:2 when the count is even.
    #[serde(rename = "spread", alias = "preferSpread")]
    Spread,
    #[serde(rename = "any", alias = "preferAny")]
    Any,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CpuPreferences {
    #[serde(
        rename = "preferredCPUTopology",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub preferred_cpu_topology: Option<PreferredCpuTopology>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FirmwarePreferences {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_use_bios: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_use_bios_serial: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MachinePreferences {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_machine_type: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClockPreferences {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_clock_offset: Option<Clock>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FeaturePreferences {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_acpi: Option<FeatureState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_apic: Option<FeatureApic>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_smm: Option<FeatureState>,
}

/// KubeVirt instancetype fields krvirt refuses for now (relative to `spec.`).
const INSTANCETYPE_NOT_IMPLEMENTED: &[&str] = &[
    "cpu.numa",
    "cpu.realtime",
    "cpu.maxSockets",
    "cpu.dedicatedCPUPlacement",
    "cpu.isolateEmulatorThread",
    "memory.hugepages",
    "memory.overcommitPercent",
    "memory.maxGuest",
    "gpus",
    "hostDevices",
    "ioThreadsPolicy",
    "ioThreads",
    "launchSecurity",
    "annotations",
    "nodeSelector",
    "schedulerName",
];

/// KubeVirt preference fields krvirt refuses for now (relative to `spec.`).
const PREFERENCE_NOT_IMPLEMENTED: &[&str] = &[
    "clock.preferredTimer",
    "features.preferredHyperv",
    "features.preferredKvm",
    "features.preferredPvspinlock",
    "devices.preferredTPM",
    "devices.preferredInputBus",
    "devices.preferredInputType",
    "devices.preferredVirtualGPUOptions",
    "devices.preferredSoundModel",
    "devices.preferredUseVirtioTransitional",
    "devices.preferredDiskDedicatedIoThread",
    "devices.preferredDiskIO",
    "devices.preferredDiskCache",
    "devices.preferredDiskBlockSize",
    "devices.preferredBlockMultiQueue",
    "devices.preferredAutoattachGraphicsDevice",
    "devices.preferredAutoattachMemBalloon",
    "devices.preferredAutoattachInputDevice",
    "devices.preferredDisableHotplug",
    "devices.preferredInterfaceMasquerade",
    "devices.preferredLunBus",
    "firmware.preferredUseEfi",
    "firmware.preferredUseSecureBoot",
    "firmware.preferredEfi",
    "cpu.preferredCPUFeatures",
    "cpu.spreadOptions",
    "requirements",
    "annotations",
    "volumes",
    "preferredSubdomain",
    "preferSpreadSocketToCoreRatio",
    "preferredArchitecture",
];

fn in_table(table: &[&str], path: &str) -> bool {
    path.strip_prefix("spec.")
        .is_some_and(|rel| table.contains(&rel))
}

/// Full paths of the KubeVirt fields these kinds refuse, for documentation.
pub fn not_implemented_fields(kind: &crate::KindInfo) -> Vec<String> {
    let table = match kind.kind {
        "VirtualMachineInstancetype" | "VirtualMachineClusterInstancetype" => {
            INSTANCETYPE_NOT_IMPLEMENTED
        }
        "VirtualMachinePreference" | "VirtualMachineClusterPreference" => {
            PREFERENCE_NOT_IMPLEMENTED
        }
        _ => &[],
    };
    table.iter().map(|r| format!("spec.{r}")).collect()
}

macro_rules! kind_struct {
    ($name:ident, $spec:ty, $namespaced:expr, $table:ident, $check:ident) => {
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $name {
            #[serde(default)]
            pub api_version: String,
            #[serde(default)]
            pub kind: String,
            #[serde(default)]
            pub metadata: ObjectMeta,
            pub spec: $spec,
        }

        impl crate::meta::Object for $name {
            fn kind_info() -> &'static crate::KindInfo {
                crate::types::kind_named(stringify!($name))
            }
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }

        impl Admit for $name {
            fn not_implemented(path: &str) -> bool {
                in_table($table, path)
            }
            fn apply_defaults(&mut self) {}
            fn validate(&self, old: Option<&Self>, c: &mut Causes) {
                metadata(&self.metadata, "metadata", MAX_NAME, $namespaced, c);
                if let Some(old) = old {
                    immutable_identity(&old.metadata, &self.metadata, c);
                }
                $check(&self.spec, c);
            }
        }
    };
}

fn check_instancetype(spec: &InstancetypeSpec, c: &mut Causes) {
    if spec.cpu.guest == 0 {
        c.invalid("spec.cpu.guest", "must be at least 1");
    } else if spec.cpu.guest > 288 {
        c.invalid("spec.cpu.guest", "at most 288 vCPUs (QEMU's q35 limit)");
    }
    match spec.memory.guest.value() {
        Ok(b) if b >= 1 << 20 => {}
        Ok(_) => c.invalid("spec.memory.guest", "must be at least 1Mi"),
        Err(e) => c.invalid("spec.memory.guest", format!("{}: {e}", spec.memory.guest.0)),
    }
}

fn check_preference(spec: &PreferenceSpec, c: &mut Causes) {
    if let Some(d) = &spec.devices {
        for (field, bus) in [
            ("preferredDiskBus", d.preferred_disk_bus),
            ("preferredCdromBus", d.preferred_cdrom_bus),
        ] {
            if matches!(bus, Some(DiskBus::Scsi | DiskBus::Usb)) {
                c.not_implemented(
                    format!("spec.devices.{field}"),
                    "only virtio and sata buses",
                );
            }
        }
    }
    if spec
        .preferred_termination_grace_period_seconds
        .is_some_and(|s| s < 0)
    {
        c.invalid(
            "spec.preferredTerminationGracePeriodSeconds",
            "must be non-negative",
        );
    }
}

kind_struct!(
    VirtualMachineInstancetype,
    InstancetypeSpec,
    true,
    INSTANCETYPE_NOT_IMPLEMENTED,
    check_instancetype
);
kind_struct!(
    VirtualMachineClusterInstancetype,
    InstancetypeSpec,
    false,
    INSTANCETYPE_NOT_IMPLEMENTED,
    check_instancetype
);
kind_struct!(
    VirtualMachinePreference,
    PreferenceSpec,
    true,
    PREFERENCE_NOT_IMPLEMENTED,
    check_preference
);
kind_struct!(
    VirtualMachineClusterPreference,
    PreferenceSpec,
    false,
    PREFERENCE_NOT_IMPLEMENTED,
    check_preference
);

/// A VM's `spec.instancetype` / `spec.preference`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstancetypeMatcher {
    pub name: String,
    /// `VirtualMachineInstancetype` (namespaced) or
    /// `VirtualMachineClusterInstancetype` (the default); the same with
    /// Preference for `spec.preference`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Accepted; krvirt records the copy it expands from in the VM's
    /// annotations instead of a ControllerRevision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_name: Option<String>,
}

impl InstancetypeMatcher {
    /// The referenced kind with KubeVirt's default filled in.
    pub fn kind_or(&self, cluster_default: &'static str) -> &str {
        self.kind
            .as_deref()
            .filter(|k| !k.is_empty())
            .unwrap_or(cluster_default)
    }
}

/// Check a VM's matcher at `p` (`spec.instancetype` or `spec.preference`).
pub(crate) fn check_matcher(m: &InstancetypeMatcher, p: &str, instancetype: bool, c: &mut Causes) {
    if m.name.is_empty() {
        c.required(format!("{p}.name"), "Required value");
    }
    let allowed: [&str; 2] = if instancetype {
        [
            "VirtualMachineInstancetype",
            "VirtualMachineClusterInstancetype",
        ]
    } else {
        [
            "VirtualMachinePreference",
            "VirtualMachineClusterPreference",
        ]
    };
    if let Some(k) = m.kind.as_deref().filter(|k| !k.is_empty())
        && !allowed.contains(&k)
    {
        c.not_supported(
            format!("{p}.kind"),
            format!(
                "unsupported kind {k:?}: expected {} or {}",
                allowed[0], allowed[1]
            ),
        );
    }
}

/// The copy of an instancetype or preference a VM expands from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot<S> {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    pub spec: S,
}

pub type InstancetypeSnapshot = Snapshot<InstancetypeSpec>;
pub type PreferenceSnapshot = Snapshot<PreferenceSpec>;

/// Parse a snapshot annotation; `None` when absent.
pub fn parse_snapshot<S: serde::de::DeserializeOwned>(
    annotations: &std::collections::BTreeMap<String, String>,
    key: &str,
) -> Result<Option<Snapshot<S>>, FieldCause> {
    match annotations.get(key) {
        None => Ok(None),
        Some(s) => serde_json::from_str(s).map(Some).map_err(|e| {
            FieldCause::new(
                reason::INVALID,
                format!("metadata.annotations[{key}]"),
                format!("not a valid snapshot: {e}"),
            )
        }),
    }
}

/// Path prefix of the VM's template spec in causes.
const TP: &str = "spec.template.spec";

fn conflict(field: &str, what: &str) -> FieldCause {
    FieldCause::new(
        reason::INVALID,
        format!("{TP}.{field}"),
        format!("VM field {TP}.{field} conflicts with the selected instancetype ({what})"),
    )
}

/// Lay `n` vCPUs out as the preference asks.
fn topology(n: u32, pref: Option<PreferredCpuTopology>) -> (u32, u32, u32) {
    match pref.unwrap_or(PreferredCpuTopology::Sockets) {
        PreferredCpuTopology::Sockets | PreferredCpuTopology::Any => (n, 1, 1),
        PreferredCpuTopology::Cores => (1, n, 1),
        PreferredCpuTopology::Threads => (1, 1, n),
        PreferredCpuTopology::Spread if n >= 2 && n.is_multiple_of(2) => (n / 2, 2, 1),
        PreferredCpuTopology::Spread => (n, 1, 1),
    }
}

/// Expand a VM's VMI spec with its instancetype and preference (KubeVirt's
/// order: instancetype values first, conflicts refused; then preferences
/// fill what is still unset). Conflicts are named by the VM field's path.
pub fn expand(
    spec: &mut VirtualMachineInstanceSpec,
    it: Option<&InstancetypeSpec>,
    pref: Option<&PreferenceSpec>,
) -> Result<(), Vec<FieldCause>> {
    let mut causes = Vec::new();
    let d = &mut spec.domain;
    let preferred_topology = pref
        .and_then(|p| p.cpu.as_ref())
        .and_then(|c| c.preferred_cpu_topology);
    if let Some(it) = it {
        let (sockets, cores, threads) = topology(it.cpu.guest, preferred_topology);
        let cpu = d.cpu.get_or_insert_with(Cpu::default);
        let wanted = [
            ("sockets", cpu.sockets, sockets),
            ("cores", cpu.cores, cores),
            ("threads", cpu.threads, threads),
        ];
        let any_set = wanted.iter().any(|(_, v, _)| v.is_some());
        if any_set && cpu.vcpus() != it.cpu.guest {
            let field = wanted
                .iter()
                .find(|(_, v, _)| v.is_some())
                .map(|(f, _, _)| *f)
                .unwrap_or("sockets");
            causes.push(conflict(
                &format!("domain.cpu.{field}"),
                &format!("{} vCPUs", it.cpu.guest),
            ));
        } else if !any_set {
            cpu.sockets = Some(sockets);
            cpu.cores = Some(cores);
            cpu.threads = Some(threads);
        }
        if let Some(model) = &it.cpu.model {
            match &cpu.model {
                Some(m) if m != model => {
                    causes.push(conflict("domain.cpu.model", &format!("model {model}")))
                }
                _ => cpu.model = Some(model.clone()),
            }
        }
        for (map, name) in [
            (&d.resources.requests, "requests"),
            (&d.resources.limits, "limits"),
        ] {
            if map.contains_key("cpu") {
                causes.push(conflict(
                    &format!("domain.resources.{name}.cpu"),
                    &format!("{} vCPUs", it.cpu.guest),
                ));
            }
        }
        let want = it.memory.guest.value().ok();
        let what = format!("memory {}", it.memory.guest.0);
        let mem = d.memory.get_or_insert_with(Memory::default);
        match &mem.guest {
            Some(g) if g.value().ok() != want => {
                causes.push(conflict("domain.memory.guest", &what))
            }
            _ => mem.guest = Some(it.memory.guest.clone()),
        }
        if let Some(r) = d.resources.requests.get("memory")
            && r.value().ok() != want
        {
            causes.push(conflict("domain.resources.requests.memory", &what));
        }
    }
    if let Some(p) = pref {
        if let Some(dev) = &p.devices {
            for disk in &mut d.devices.disks {
                if disk.disk.is_none() && disk.cdrom.is_none() {
                    disk.disk = Some(Default::default());
                }
                if let Some(t) = &mut disk.disk
                    && t.bus.is_none()
                {
                    t.bus = dev.preferred_disk_bus;
                }
                if let Some(t) = &mut disk.cdrom
                    && t.bus.is_none()
                {
                    t.bus = dev.preferred_cdrom_bus;
                }
            }
            for iface in &mut d.devices.interfaces {
                if iface.model.is_none() {
                    iface.model = dev.preferred_interface_model;
                }
            }
            if d.devices.rng.is_none() {
                d.devices.rng = dev.preferred_rng.clone();
            }
            if d.devices.network_interface_multiqueue.is_none() {
                d.devices.network_interface_multiqueue =
                    dev.preferred_network_interface_multi_queue;
            }
            if d.devices.autoattach_serial_console.is_none() {
                d.devices.autoattach_serial_console = dev.preferred_autoattach_serial_console;
            }
            if d.devices.autoattach_pod_interface.is_none() {
                d.devices.autoattach_pod_interface = dev.preferred_autoattach_pod_interface;
            }
        }
        if let Some(f) = &p.firmware {
            let fw = d.firmware.get_or_insert_with(Default::default);
            if f.preferred_use_bios == Some(true) && fw.bootloader.is_none() {
                fw.bootloader = Some(Bootloader {
                    bios: Some(Bios {
                        use_serial: f.preferred_use_bios_serial,
                    }),
                });
            }
        }
        if let Some(m) = p
            .machine
            .as_ref()
            .and_then(|m| m.preferred_machine_type.as_ref())
            && d.machine.as_ref().is_none_or(|x| x.type_.is_empty())
        {
            d.machine = Some(Machine { type_: m.clone() });
        }
        if let Some(c) = p
            .clock
            .as_ref()
            .and_then(|c| c.preferred_clock_offset.as_ref())
            && d.clock.is_none()
        {
            d.clock = Some(c.clone());
        }
        if let Some(f) = &p.features {
            let feats = d.features.get_or_insert_with(Features::default);
            if feats.acpi.is_none() {
                feats.acpi = f.preferred_acpi.clone();
            }
            if feats.apic.is_none() {
                feats.apic = f.preferred_apic.clone();
            }
            if feats.smm.is_none() {
                feats.smm = f.preferred_smm.clone();
            }
        }
        if spec.termination_grace_period_seconds.is_none() {
            spec.termination_grace_period_seconds = p.preferred_termination_grace_period_seconds;
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(causes)
    }
}

/// Validate a VM that names an instancetype or preference: the matchers,
/// then its template as the VMI would be. With the controller's copies in
/// the annotations, that is the real expansion (a conflicting edit is
/// refused naming the field); before them, the instancetype's CPU and
/// memory are not known yet and only the VM's own fields are checked.
pub(crate) fn validate_vm(vm: &crate::kubevirt::VirtualMachine, c: &mut Causes) {
    if let Some(m) = &vm.spec.instancetype {
        check_matcher(m, "spec.instancetype", true, c);
    }
    if let Some(m) = &vm.spec.preference {
        check_matcher(m, "spec.preference", false, c);
    }
    let ann = &vm.metadata.annotations;
    let it = match parse_snapshot::<InstancetypeSpec>(ann, INSTANCETYPE_SNAPSHOT_ANNOTATION) {
        Ok(s) => s,
        Err(e) => {
            c.0.push(e);
            None
        }
    };
    let pref = match parse_snapshot::<PreferenceSpec>(ann, PREFERENCE_SNAPSHOT_ANNOTATION) {
        Ok(s) => s,
        Err(e) => {
            c.0.push(e);
            None
        }
    };
    let mut spec = vm.spec.template.spec.clone();
    if vm.spec.instancetype.is_some() && it.is_some() {
        if let Err(causes) = expand(
            &mut spec,
            it.as_ref().map(|s| &s.spec),
            pref.as_ref().map(|s| &s.spec),
        ) {
            c.0.extend(causes);
            return;
        }
    } else {
        if vm.spec.instancetype.is_some() {
            // Stand-ins until the instancetype is known: conflicts are
            // checked against it when the controller copies it.
            let d = &mut spec.domain;
            let mem = d.memory.get_or_insert_with(Memory::default);
            if mem.guest.is_none() && !d.resources.requests.contains_key("memory") {
                mem.guest = Some(Quantity::new("128Mi"));
            }
        }
        if let Err(causes) = expand(&mut spec, None, pref.as_ref().map(|s| &s.spec)) {
            c.0.extend(causes);
            return;
        }
    }
    crate::kubevirt::defaults::vmi_spec(&mut spec, vm.metadata.namespace(), vm.metadata.name());
    crate::kubevirt::validate::vmi_spec(&spec, TP, c);
}

/// Keep a VM's recorded copies across a replace that does not carry them
/// (`krvirt apply` of the original manifest sends no annotations): while
/// `spec.instancetype` / `spec.preference` names the same object (kind,
/// name and `revisionName` unchanged), the stored copy stays, so the VM
/// keeps the CPU and memory it was created with. Changing the reference
/// (or its `revisionName`) drops the copy and the controller records the
/// current one.
pub(crate) fn carry_snapshots(
    mut obj: serde_json::Value,
    old: Option<&serde_json::Value>,
) -> serde_json::Value {
    let Some(old) = old else { return obj };
    for (field, key) in [
        ("instancetype", INSTANCETYPE_SNAPSHOT_ANNOTATION),
        ("preference", PREFERENCE_SNAPSHOT_ANNOTATION),
    ] {
        let Some(copy) = old
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(key))
            .cloned()
        else {
            continue;
        };
        let same = |p: &str| {
            old.pointer(&format!("/spec/{field}/{p}")) == obj.pointer(&format!("/spec/{field}/{p}"))
        };
        if obj.pointer(&format!("/spec/{field}")).is_none()
            || !(same("name") && same("kind") && same("revisionName"))
        {
            continue;
        }
        let Some(meta) = obj.get_mut("metadata").and_then(|m| m.as_object_mut()) else {
            continue;
        };
        let ann = meta
            .entry("annotations")
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        if ann.is_null() {
            *ann = serde_json::Value::Object(Default::default());
        }
        if let Some(a) = ann.as_object_mut() {
            a.entry(key.to_string()).or_insert(copy);
        }
    }
    obj
}
