//! `kubevirt.io/v1`: VirtualMachine and VirtualMachineInstance with
//! KubeVirt's JSON field names (`kubevirt.io/api/core/v1`).
//!
//! Only the fields krvirt implements are part of these types. Fields that
//! KubeVirt has but krvirt does not implement yet are refused by admission
//! by path (see [`crate::admission`]); they never reach these structs.
//!
//! Spec structs deny unknown fields. Status structs are lenient (unknown
//! status fields, e.g. from a KubeVirt export, are dropped) because status
//! is written by krvirt's own controllers and agent.
//!
//! krvirt extension: [`VirtualMachineInstanceStatus::krvirt_runtime`]
//! (`status.krvirtRuntime`) where the host agent reports the QEMU process
//! it runs for the VMI. KubeVirt clients ignore it.
//!
//! ## Defaults
//!
//! Admission defaults objects following KubeVirt's mutating webhooks and API defaults.
//! Every step only fills what is unset, so applying it twice changes
//! nothing (admission is idempotent).
//!
//! | field | default | KubeVirt |
//! |---|---|---|
//! | VM `runStrategy` | `Halted` when neither `running` nor `runStrategy` is set | same |
//! | `domain.machine.type` | `q35` | same (cluster default) |
//! | `domain.cpu.{sockets,cores,threads}` | 1 each; with no topology at all, `sockets` = ⌈`limits.cpu` or `requests.cpu`⌉ | same |
//! | `domain.memory.guest` | `resources.requests.memory` | same |
//! | `domain.devices.disks` | a disk `{name}` for every volume without one | `SetDefaultVolumeDisk` |
//! | disk target | `disk: {}` when neither `disk` nor `cdrom` is set | `SetDefaults_DiskDevice` |
//! | `disk.bus` | `virtio` | same |
//! | `cdrom` | `bus: sata`, `readonly: true`, `tray: closed` | same |
//! | interfaces / networks | none declared and `autoattachPodInterface` ≠ false: interface `default` (masquerade) + network `default` (pod) | same, with masquerade as the cluster's default binding |
//! | interface binding | `masquerade` when none is given | cluster default binding |
//! | interface `model` | `virtio` | converter default, made explicit |
//! | port `protocol` | `TCP` | same |
//! | `firmware.uuid` | UUIDv5(KubeVirt's firmware namespace, `"{namespace}/{name}"`) of the VM (or standalone VMI) | KubeVirt uses the VM name only |
//! | `terminationGracePeriodSeconds` | 180 | same |
//! | `imagePullPolicy` (containerDisk, kernel boot) | `Always` for `:latest`/untagged, else `IfNotPresent` | same |
//! | `features.{acpi,apic,smm}.enabled` | `true` when the feature is listed | `SetDefaults_FeatureState` |

pub(crate) mod defaults;
pub mod scheduling;
pub(crate) mod validate;

pub use defaults::{default_firmware_uuid, default_pull_policy};
pub use scheduling::{Affinity, Taint, TaintEffect, Toleration, TolerationOperator};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::host::Accelerator;
use crate::meta::{Condition, ObjectMeta, is_false, null_default};
use crate::quantity::{Quantity, QuantityError};

pub const GROUP: &str = "kubevirt.io";
pub const VERSION: &str = "v1";
pub const API_VERSION: &str = "kubevirt.io/v1";

/// Default guest machine type.
pub const DEFAULT_MACHINE_TYPE: &str = "q35";
/// KubeVirt's default `terminationGracePeriodSeconds` for VMIs.
pub const DEFAULT_TERMINATION_GRACE_PERIOD_SECONDS: i64 = 180;
/// Name of the interface and pod network added when a VMI declares none.
pub const DEFAULT_NETWORK_NAME: &str = "default";

// ---------------------------------------------------------------------------
// VirtualMachine
// ---------------------------------------------------------------------------

/// A virtual machine: the stateful object whose `runStrategy` decides when a
/// VirtualMachineInstance (a running guest) exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachine {
    /// `kubevirt.io/v1`
    #[serde(default)]
    pub api_version: String,
    /// `VirtualMachine`
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: VirtualMachineSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VirtualMachineStatus>,
}

impl Default for VirtualMachine {
    fn default() -> Self {
        VirtualMachine {
            api_version: API_VERSION.to_string(),
            kind: "VirtualMachine".to_string(),
            metadata: ObjectMeta::default(),
            spec: VirtualMachineSpec::default(),
            status: None,
        }
    }
}

/// Desired state of a VirtualMachine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineSpec {
    /// Deprecated: `true` is `runStrategy: Always`, `false` is `Halted`.
    /// Mutually exclusive with `runStrategy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<bool>,
    /// When the VirtualMachineInstance should exist. Defaults to `Halted`
    /// when neither `running` nor `runStrategy` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_strategy: Option<RunStrategy>,
    /// Volumes (`krvirt.io/v1` Volume) created with the VM, CDI DataVolume shape.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub data_volume_templates: Vec<crate::storage::DataVolumeTemplateSpec>,
    /// CPU and memory from a VirtualMachine(Cluster)Instancetype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instancetype: Option<crate::instancetype::InstancetypeMatcher>,
    /// Defaults from a VirtualMachine(Cluster)Preference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference: Option<crate::instancetype::InstancetypeMatcher>,
    /// The VirtualMachineInstance created when the VM runs.
    pub template: VirtualMachineInstanceTemplateSpec,
}

impl VirtualMachineSpec {
    /// The run strategy in effect (`running` mapped as KubeVirt does).
    pub fn effective_run_strategy(&self) -> RunStrategy {
        match (self.run_strategy, self.running) {
            (Some(rs), _) => rs,
            (None, Some(true)) => RunStrategy::Always,
            _ => RunStrategy::Halted,
        }
    }
}

/// KubeVirt's `VirtualMachineRunStrategy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum RunStrategy {
    /// A VMI always runs; it is restarted whenever it stops.
    Always,
    /// Restarted only when the guest fails.
    RerunOnFailure,
    /// Started and stopped only through the start/stop/restart subresources.
    Manual,
    /// Never runs.
    #[default]
    Halted,
    /// Runs once; not restarted whatever the outcome.
    Once,
}

/// Template of the VirtualMachineInstance a VirtualMachine creates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineInstanceTemplateSpec {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: VirtualMachineInstanceSpec,
}

/// Observed state of a VirtualMachine (written by the VM controller).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub printable_status: Option<PrintableStatus>,
    /// The VMI exists and is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// A VMI exists for this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<bool>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_failure: Option<VirtualMachineStartFailure>,
    /// Pending start/stop requests from the subresources.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub state_change_requests: Vec<VirtualMachineStateChangeRequest>,
    /// Last run strategy the controller acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_strategy: Option<RunStrategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_generation: Option<i64>,
}

/// KubeVirt's `VirtualMachinePrintableStatus` (exact strings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum PrintableStatus {
    #[default]
    Stopped,
    Provisioning,
    Starting,
    Running,
    Paused,
    Stopping,
    Terminating,
    CrashLoopBackOff,
    Migrating,
    Unknown,
    ErrorUnschedulable,
    ErrImagePull,
    ImagePullBackOff,
    ErrorPvcNotFound,
    DataVolumeError,
    WaitingForVolumeBinding,
    WaitingForReceiver,
}

/// Crash-loop bookkeeping for `RerunOnFailure` / `Always`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStartFailure {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_fail_count: Option<u32>,
    #[serde(
        default,
        rename = "lastFailedVMIUID",
        skip_serializing_if = "Option::is_none"
    )]
    pub last_failed_vmi_uid: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_timestamp: Option<String>,
}

/// A queued start or stop request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStateChangeRequest {
    pub action: StateChangeRequestAction,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub data: BTreeMap<String, String>,
    /// UID of the VMI the request applies to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum StateChangeRequestAction {
    #[default]
    Start,
    Stop,
}

// ---------------------------------------------------------------------------
// VirtualMachineInstance
// ---------------------------------------------------------------------------

/// A running (or about to run) guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineInstance {
    /// `kubevirt.io/v1`
    #[serde(default)]
    pub api_version: String,
    /// `VirtualMachineInstance`
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: VirtualMachineInstanceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VirtualMachineInstanceStatus>,
}

impl Default for VirtualMachineInstance {
    fn default() -> Self {
        VirtualMachineInstance {
            api_version: API_VERSION.to_string(),
            kind: "VirtualMachineInstance".to_string(),
            metadata: ObjectMeta::default(),
            spec: VirtualMachineInstanceSpec::default(),
            status: None,
        }
    }
}

/// Description of a guest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineInstanceSpec {
    pub domain: DomainSpec,
    /// Volumes that disks refer to by name.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub volumes: Vec<Volume>,
    /// Networks that interfaces refer to by name.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub networks: Vec<Network>,
    /// Host labels the VMI's host must carry.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub node_selector: BTreeMap<String, String>,
    /// Seconds between the ACPI shutdown request and the forced stop.
    /// Defaults to 180.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<i64>,
    /// Guest hostname (DNS label); defaults to the VMI name in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdomain: Option<String>,
    /// What a host drain does to this VMI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction_strategy: Option<EvictionStrategy>,
    /// Guest architecture; only `amd64` is implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// Node affinity and VM (anti-)affinity (per host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Host taints this VMI tolerates.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tolerations: Vec<Toleration>,
}

impl VirtualMachineInstanceSpec {
    pub fn volume(&self, name: &str) -> Option<&Volume> {
        self.volumes.iter().find(|v| v.name == name)
    }

    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name)
    }

    /// Guest memory in bytes (`domain.memory.guest`, which admission always
    /// sets), falling back to `resources.requests.memory`.
    pub fn guest_memory_bytes(&self) -> Result<Option<u64>, QuantityError> {
        let q = self
            .domain
            .memory
            .as_ref()
            .and_then(|m| m.guest.as_ref())
            .or_else(|| self.domain.resources.requests.get("memory"));
        q.map(Quantity::value).transpose()
    }

    /// Number of vCPUs (sockets × cores × threads, 1 where unset).
    pub fn vcpus(&self) -> u32 {
        self.domain.cpu.as_ref().map_or(1, Cpu::vcpus)
    }
}

/// KubeVirt's `EvictionStrategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum EvictionStrategy {
    None,
    LiveMigrate,
    LiveMigrateIfPossible,
    External,
}

/// The virtual hardware.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DomainSpec {
    /// Compute resources (keys `cpu` and `memory`).
    #[serde(default)]
    pub resources: ResourceRequirements,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Machine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<Clock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Features>,
    #[serde(default)]
    pub devices: Devices,
}

/// Requests and limits, keyed `cpu` / `memory`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceRequirements {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub requests: BTreeMap<String, Quantity>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub limits: BTreeMap<String, Quantity>,
    /// Do not count the per-VM overhead in scheduling.
    #[serde(default, skip_serializing_if = "is_false")]
    pub overcommit_guest_overhead: bool,
}

/// Guest CPU topology and model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cpu {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sockets: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// CPU model (`host-passthrough`, `host-model` or a QEMU model name).
    /// Unset: the hypervisor chooses (host-model like under KVM, a
    /// generic model under TCG).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Pin each vCPU to a host CPU of its own: the host agent picks free
    /// host CPUs (recorded in `status.krvirtRuntime.dedicatedCpus`) and
    /// refuses to start the guest while too few are free.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dedicated_cpu_placement: bool,
    /// Extra dedicated CPU for the emulator thread. `true` is not
    /// implemented yet.
    #[serde(default, skip_serializing_if = "is_false")]
    pub isolate_emulator_thread: bool,
    /// Guest NUMA topology.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<Numa>,
}

/// Guest NUMA topology (KubeVirt's only strategy: mirror the host NUMA
/// nodes of the dedicated CPUs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Numa {
    /// One guest NUMA node per host NUMA node the dedicated CPUs are on;
    /// needs `dedicatedCpuPlacement` and `memory.hugepages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mapping_passthrough: Option<NumaGuestMappingPassthrough>,
}

/// Marker object (`guestMappingPassthrough: {}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NumaGuestMappingPassthrough {}

impl Cpu {
    /// sockets × cores × threads (1 where unset), saturating.
    pub fn vcpus(&self) -> u32 {
        self.sockets
            .unwrap_or(1)
            .saturating_mul(self.cores.unwrap_or(1))
            .saturating_mul(self.threads.unwrap_or(1))
    }
}

/// Guest memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Memory {
    /// Memory visible to the guest. Defaults to `resources.requests.memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<Quantity>,
    /// Back guest memory with hugepages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<Hugepages>,
}

/// Hugepages backing guest memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hugepages {
    /// `2Mi` or `1Gi`.
    #[serde(default)]
    pub page_size: String,
}

impl Hugepages {
    /// The page size in bytes, when it is one krvirt supports.
    pub fn page_size_bytes(&self) -> Option<u64> {
        match self.page_size.as_str() {
            "2Mi" => Some(2 << 20),
            "1Gi" => Some(1 << 30),
            _ => None,
        }
    }
}

/// QEMU machine type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Machine {
    /// `q35` (default) or a versioned `pc-q35-*`.
    #[serde(rename = "type", default)]
    pub type_: String,
}

/// Firmware and boot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Firmware {
    /// SMBIOS system UUID. Defaults to a UUIDv5 of `namespace/name` of the
    /// VM (or standalone VMI), so it is stable across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// SMBIOS system serial number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootloader: Option<Bootloader>,
    /// Direct kernel boot from a container image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_boot: Option<KernelBoot>,
}

/// Bootloader selection. Only BIOS is implemented (`efi` is refused).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bootloader {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bios: Option<Bios>,
}

/// SeaBIOS.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bios {
    /// Also print BIOS output on the serial console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_serial: Option<bool>,
}

/// Direct kernel boot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KernelBoot {
    /// Kernel command line; requires `container.kernelPath`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<KernelBootContainer>,
}

/// Image holding the kernel and/or initrd.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KernelBootContainer {
    #[serde(default)]
    pub image: String,
    /// Defaults to `Always` for `:latest` or untagged images, else
    /// `IfNotPresent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Absolute path of the kernel inside the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_path: Option<String>,
    /// Absolute path of the initrd inside the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// Kubernetes image pull policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum PullPolicy {
    Always,
    Never,
    IfNotPresent,
}

/// Guest clock. Only `utc` is implemented (`timezone` and `timer` are
/// refused).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Clock {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utc: Option<ClockOffsetUtc>,
}

/// Guest RTC in UTC, optionally offset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClockOffsetUtc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset_seconds: Option<i64>,
}

/// Machine features. Only `acpi`, `apic` and `smm` are implemented.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Features {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acpi: Option<FeatureState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apic: Option<FeatureApic>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smm: Option<FeatureState>,
}

/// A feature switch; `enabled` defaults to true when the feature is listed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FeatureState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// APIC switch (`endOfInterrupt: true` is not implemented).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FeatureApic {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub end_of_interrupt: bool,
}

/// Devices.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Devices {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub disks: Vec<Disk>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub interfaces: Vec<Interface>,
    /// Attach a virtio RNG fed from the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<Rng>,
    /// Add the `default` pod network interface when none is declared
    /// (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoattach_pod_interface: Option<bool>,
    /// Serial console (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoattach_serial_console: Option<bool>,
    /// VGA + VNC (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoattach_graphics_device: Option<bool>,
    /// virtio-net multiqueue (one queue per vCPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_interface_multiqueue: Option<bool>,
}

/// Random number generator (virtio-rng backed by the host).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rng {}

/// A disk device; its volume is the volume of the same name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Disk {
    /// Device name; also the name of the volume it exposes.
    #[serde(default)]
    pub name: String,
    /// Attach as a disk (default when neither `disk` nor `cdrom` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskTarget>,
    /// Attach as a CD-ROM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdrom: Option<CdromTarget>,
    /// Boot priority (lower first, at least 1, unique across devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<u32>,
    /// Serial number shown to the guest (`[A-Za-z0-9_.+-]`, ≤ 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheMode>,
}

/// Disk target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskTarget {
    /// Defaults to `virtio`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<DiskBus>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub readonly: bool,
}

/// CD-ROM target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CdromTarget {
    /// Defaults to `sata` (`virtio` is invalid for CD-ROMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<DiskBus>,
    /// Defaults to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
    /// Defaults to `closed`; `open` is not implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tray: Option<TrayState>,
}

/// Disk bus. `scsi` and `usb` are KubeVirt values krvirt refuses for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    Virtio,
    Sata,
    Scsi,
    Usb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TrayState {
    Open,
    Closed,
}

/// Host page-cache mode for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    None,
    Writethrough,
    Writeback,
}

/// A guest network interface, connected to the network of the same name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Interface {
    #[serde(default)]
    pub name: String,
    /// NIC model; defaults to `virtio`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<InterfaceModel>,
    /// NAT behind the host: the guest sits on krvirt's NAT Network
    /// (`pod` networks only); the default binding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masquerade: Option<InterfaceMasquerade>,
    /// The guest's NIC sits directly on the Network's bridge (a tap
    /// krvirt creates), with the address IPAM gave it served by DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<InterfaceBridge>,
    /// Ports forwarded to the guest (pod network only).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<Port>,
    /// `de:ad:00:00:be:af` or `DE-AD-00-00-BE-AF`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<u32>,
}

/// NIC models KubeVirt accepts (all available in QEMU 7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum InterfaceModel {
    #[serde(rename = "virtio")]
    Virtio,
    #[serde(rename = "e1000")]
    E1000,
    #[serde(rename = "e1000e")]
    E1000e,
    #[serde(rename = "rtl8139")]
    Rtl8139,
    #[serde(rename = "ne2k_pci")]
    Ne2kPci,
    #[serde(rename = "pcnet")]
    Pcnet,
}

/// Masquerade (NAT) binding.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InterfaceMasquerade {}

/// Bridge binding.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InterfaceBridge {}

/// A forwarded port.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Port {
    /// IANA service name, unique per interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Defaults to `TCP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// 1-65535.
    #[serde(default)]
    pub port: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

/// A named volume. Exactly one source must be set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Volume {
    /// DNS label, unique within the VMI.
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_disk: Option<ContainerDiskSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_disk: Option<EmptyDiskSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init_no_cloud: Option<CloudInitNoCloudSource>,
    /// A krvirt Volume (`krvirt.io/v1`) named `claimName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<crate::storage::PersistentVolumeClaimVolumeSource>,
    /// A krvirt Volume named `name` (made from `dataVolumeTemplates` or by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_volume: Option<crate::storage::DataVolumeVolumeSource>,
}

impl Volume {
    /// The krvirt Volume this VMI volume refers to, if it is a
    /// `persistentVolumeClaim` or `dataVolume`.
    pub fn claim(&self) -> Option<&str> {
        self.persistent_volume_claim
            .as_ref()
            .map(|p| p.claim_name.as_str())
            .or(self.data_volume.as_ref().map(|d| d.name.as_str()))
    }
}

/// A disk image shipped in a container image (KubeVirt containerDisk
/// layout: the disk under `/disk/`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerDiskSource {
    /// Image reference (required).
    #[serde(default)]
    pub image: String,
    /// Path of the disk inside the image (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Defaults to `Always` for `:latest` or untagged images, else
    /// `IfNotPresent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
}

/// A blank sparse disk that lives as long as the VMI.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmptyDiskSource {
    /// Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Quantity>,
}

/// cloud-init NoCloud seed (a `cidata` disk).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudInitNoCloudSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_data_base64: Option<String>,
}

impl CloudInitNoCloudSource {
    /// The user-data bytes (decoding `userDataBase64` if that is the form used).
    pub fn user_data_bytes(&self) -> Result<Option<Vec<u8>>, String> {
        decoded(self.user_data.as_deref(), self.user_data_base64.as_deref())
    }

    /// The network-config bytes, if any.
    pub fn network_data_bytes(&self) -> Result<Option<Vec<u8>>, String> {
        decoded(
            self.network_data.as_deref(),
            self.network_data_base64.as_deref(),
        )
    }
}

fn decoded(plain: Option<&str>, b64: Option<&str>) -> Result<Option<Vec<u8>>, String> {
    match (
        plain.filter(|s| !s.is_empty()),
        b64.filter(|s| !s.is_empty()),
    ) {
        (Some(p), _) => Ok(Some(p.as_bytes().to_vec())),
        (None, Some(b)) => crate::util::decode_base64(b).map(Some),
        (None, None) => Ok(None),
    }
}

/// A network an interface connects to: `pod` (krvirt's default NAT
/// Network, `krvirt.io/v1` Network `default`) or `multus` (a krvirt
/// Network by name).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Network {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodNetwork>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multus: Option<MultusNetwork>,
}

/// A secondary network. KubeVirt names a NetworkAttachmentDefinition
/// (`name` or `namespace/name`); krvirt resolves it to the cluster-scoped
/// `krvirt.io/v1` Network `name` (a namespace prefix is accepted and
/// ignored: Networks are cluster-wide).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MultusNetwork {
    #[serde(default)]
    pub network_name: String,
    /// Multus "default network" replacement (not implemented: refused when true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<bool>,
}

impl MultusNetwork {
    /// The krvirt Network this refers to (`ns/name` -> `name`).
    pub fn krvirt_network(&self) -> &str {
        self.network_name
            .rsplit_once('/')
            .map(|(_, n)| n)
            .unwrap_or(&self.network_name)
    }
}

/// The default network.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PodNetwork {
    /// Guest-side IPv4 CIDR behind the masquerade NAT (KubeVirt's default
    /// is 10.0.2.0/24 when unset).
    #[serde(
        default,
        rename = "vmNetworkCIDR",
        skip_serializing_if = "Option::is_none"
    )]
    pub vm_network_cidr: Option<String>,
}

/// Observed state of a VMI (written by the scheduler and the host agent).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineInstanceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VmiPhase>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub phase_transition_timestamps: Vec<PhaseTransitionTimestamp>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
    /// Host the VMI is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// CamelCase reason for the current state, e.g. `NodeUnresponsive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub interfaces: Vec<VirtualMachineInstanceNetworkInterface>,
    #[serde(
        default,
        rename = "guestOSInfo",
        skip_serializing_if = "Option::is_none"
    )]
    pub guest_os_info: Option<GuestOsInfo>,
    /// `Guaranteed`, `Burstable` or `BestEffort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos_class: Option<String>,
    /// Hot-plugged volumes and their state (KubeVirt `volumeStatus`).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub volume_status: Vec<crate::storage::VolumeStatusEntry>,
    /// The latest live migration (KubeVirt's `migrationState`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_state: Option<crate::migration::MigrationState>,
    /// krvirt extension (not in KubeVirt): what the host agent runs for
    /// this VMI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub krvirt_runtime: Option<KrvirtRuntime>,
}

/// KubeVirt's `VirtualMachineInstancePhase`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum VmiPhase {
    /// Accepted, not yet placed on a host.
    #[default]
    Pending,
    /// The scheduler is choosing a host.
    Scheduling,
    /// Bound to a host; the agent is preparing it.
    Scheduled,
    Running,
    /// The guest shut down cleanly.
    Succeeded,
    Failed,
    /// The host stopped reporting.
    Unknown,
}

impl VmiPhase {
    /// `Succeeded` or `Failed`: the VMI will not run again.
    pub fn is_final(self) -> bool {
        matches!(self, VmiPhase::Succeeded | VmiPhase::Failed)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTransitionTimestamp {
    pub phase: VmiPhase,
    /// RFC 3339.
    pub phase_transition_timestamp: String,
}

/// Status of one guest interface.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineInstanceNetworkInterface {
    /// Interface / network name from the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// First of `ipAddresses`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ip_addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Name inside the guest (e.g. `eth0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_name: Option<String>,
    /// `domain`, `guest-agent`, … (comma separated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info_source: Option<String>,
}

/// Guest OS facts from the guest agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestOsInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretty_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// krvirt extension `status.krvirtRuntime`: the QEMU process the host agent
/// runs for this VMI, so operators and the agent itself (after a restart)
/// can find it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KrvirtRuntime {
    /// QEMU process id on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// QEMU version string, e.g. `7.2.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_version: Option<String>,
    /// Accelerator the guest runs with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<Accelerator>,
    /// Per-VM run directory (`{data_dir}/run/vmi/{uid}`) holding
    /// `qmp.sock`, `serial.sock`, `console.log`, `qemu.pid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_dir: Option<String>,
    /// Host CPUs the vCPUs are pinned to (`dedicatedCpuPlacement`), as a
    /// CPU list in vCPU order, e.g. `3,2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedicated_cpus: Option<String>,
}

/// VMI condition types krvirt reports (KubeVirt's names).
pub mod vmi_conditions {
    pub const READY: &str = "Ready";
    pub const PAUSED: &str = "Paused";
    pub const SYNCHRONIZED: &str = "Synchronized";
    pub const AGENT_CONNECTED: &str = "AgentConnected";
    pub const LIVE_MIGRATABLE: &str = "LiveMigratable";
    /// The guest runs under TCG instead of KVM.
    pub const SOFTWARE_EMULATION: &str = "SoftwareEmulation";
}

/// VM condition types (KubeVirt's names).
pub mod vm_conditions {
    pub const READY: &str = "Ready";
    pub const FAILURE: &str = "Failure";
    pub const PAUSED: &str = "Paused";
    pub const RESTART_REQUIRED: &str = "RestartRequired";
}

impl crate::meta::Object for VirtualMachine {
    fn kind_info() -> &'static crate::KindInfo {
        crate::types::kind_named("VirtualMachine")
    }
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl crate::meta::Object for VirtualMachineInstance {
    fn kind_info() -> &'static crate::KindInfo {
        crate::types::kind_named("VirtualMachineInstance")
    }
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Finalizer put on every VMI bound to a host; the host's agent removes it
/// once the guest is stopped and its run directory cleaned up, so deleting a
/// VMI never leaves a QEMU process behind.
pub const VMI_HOST_FINALIZER: &str = "krvirt.io/host-cleanup";

/// Annotation asking for a guest to start with its vCPUs paused
/// (`krvirt start --paused`, KubeVirt's `virtctl start --paused`). On a VM it
/// applies to the next VMI the controller creates; on a VMI the agent starts
/// QEMU paused and reports the VMI Paused until it is unpaused.
pub const START_PAUSED_ANNOTATION: &str = "krvirt.io/start-paused";
