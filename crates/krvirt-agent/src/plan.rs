//! From a VirtualMachineInstance to what the host must do to run it: a
//! [`VmConfig`] for the hypervisor and the disk preparation steps before
//! launch. A pure function of the VMI, the host's accelerator, the run
//! directory and image resolution ([`ImageResolver`]), so it is held by
//! golden tests (VMI manifest in, QEMU command line out).

use std::path::{Path, PathBuf};

use krvirt_api::kubevirt::{
    CacheMode, DiskBus as ApiBus, InterfaceModel, VirtualMachineInstance, Volume,
};
use krvirt_hypervisor::{
    Accel, BackingImage, CpuConfig, CpuModel, DiskBus, DiskCache, DiskConfig, DiskFormat, Firmware,
    KernelBoot, Machine, NicBackend, NicConfig, NicModel, RunPaths, VmConfig,
};
use krvirt_image::{ImageError, NoCloudSeed};

/// The guest address QEMU's user-mode DHCP server hands out first (our
/// stand-in for KubeVirt's masquerade binding until real networks land).
pub const MASQUERADE_GUEST_IP: &str = "10.0.2.2";

/// Resolves image references to local files.
pub trait ImageResolver {
    /// The disk of a containerDisk image: path and format.
    fn disk(&self, reference: &str) -> Result<(PathBuf, DiskFormat), ImageError>;
    /// Host paths of a kernel-boot image's kernel and initrd.
    fn kernel_boot(
        &self,
        reference: &str,
        kernel_path: Option<&str>,
        initrd_path: Option<&str>,
    ) -> Result<(Option<PathBuf>, Option<PathBuf>), ImageError>;
}

/// A disk preparation step, done before QEMU starts.
#[derive(Debug, Clone, PartialEq)]
pub enum PrepStep {
    /// A qcow2 overlay on a read-only base (containerDisk: writes go to the
    /// overlay, thrown away with the VMI).
    Overlay {
        path: PathBuf,
        backing: PathBuf,
        backing_format: DiskFormat,
    },
    /// A blank sparse qcow2 (emptyDisk).
    Blank { path: PathBuf, size_bytes: u64 },
    /// A NoCloud seed (cloudInitNoCloud).
    Seed { path: PathBuf, seed: NoCloudSeed },
}

/// Spare PCIe root ports every q35 guest gets, for Volumes hot-plugged
/// later (`krvirt addvolume`).
pub const HOTPLUG_SLOTS: u32 = 2;

/// A krvirt Volume (`persistentVolumeClaim` / `dataVolume`) as the agent
/// resolved it: the file QEMU opens, or (`rbd`, with an empty `path`) the
/// Ceph RBD image of a Volume in an rbd pool.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedVolume {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub rbd: Option<krvirt_hypervisor::RbdDisk>,
}

/// Resolved Volumes by Volume name (the VMI's namespace).
pub type ResolvedVolumes = std::collections::BTreeMap<String, ResolvedVolume>;

/// Everything needed to start a VMI.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub config: VmConfig,
    pub prep: Vec<PrepStep>,
}

/// Why a VMI cannot run here (reported in the VMI's status).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{field}: {message}")]
    Unsupported { field: String, message: String },
    #[error("{field}: {source}")]
    Image {
        field: String,
        #[source]
        source: ImageError,
    },
}

impl PlanError {
    /// Whether the failure is about an image (KubeVirt's ErrImagePull).
    pub fn is_image(&self) -> bool {
        matches!(self, PlanError::Image { .. })
    }
}

fn unsupported(field: impl Into<String>, message: impl Into<String>) -> PlanError {
    PlanError::Unsupported {
        field: field.into(),
        message: message.into(),
    }
}

/// A stable, locally administered MAC for an interface without one.
pub fn default_mac(vmi_uid: &str, iface: &str) -> String {
    // FNV-1a over uid and interface name: stable across restarts of the agent.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in vmi_uid.bytes().chain([0u8]).chain(iface.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    let b = h.to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    )
}

fn machine(vmi: &VirtualMachineInstance) -> Result<Machine, PlanError> {
    let t = vmi
        .spec
        .domain
        .machine
        .as_ref()
        .map(|m| m.type_.as_str())
        .unwrap_or("q35");
    // KubeVirt manifests name versioned machine types (pc-q35-rhel9.2.0).
    if t.is_empty() || t == "q35" || t.starts_with("pc-q35") {
        Ok(Machine::Q35)
    } else if t == "pc" || t.starts_with("pc-i440fx") {
        Ok(Machine::Pc)
    } else if t == "microvm" {
        Ok(Machine::Microvm)
    } else {
        Err(unsupported(
            "spec.domain.machine.type",
            format!("machine type {t:?} is not supported (q35, pc, microvm)"),
        ))
    }
}

fn cpu(vmi: &VirtualMachineInstance) -> CpuConfig {
    let c = vmi.spec.domain.cpu.clone().unwrap_or_default();
    let model = match c.model.as_deref() {
        None | Some("") | Some("host-passthrough") | Some("host-model") => {
            CpuModel::HostPassthrough
        }
        Some(name) => CpuModel::Named(name.to_string()),
    };
    CpuConfig {
        model,
        sockets: c.sockets.unwrap_or(1),
        cores: c.cores.unwrap_or(1),
        threads: c.threads.unwrap_or(1),
    }
}

fn bus(b: Option<ApiBus>, field: &str) -> Result<DiskBus, PlanError> {
    match b.unwrap_or(ApiBus::Virtio) {
        ApiBus::Virtio => Ok(DiskBus::Virtio),
        ApiBus::Sata => Ok(DiskBus::Sata),
        ApiBus::Scsi => Ok(DiskBus::Scsi),
        ApiBus::Usb => Err(unsupported(field, "usb disks are not supported yet")),
    }
}

/// Settings admission accepts that the QEMU driver does not express yet:
/// their defaults are what every guest gets; anything else is refused by
/// path rather than silently ignored.
fn refuse_unhonoured(vmi: &VirtualMachineInstance) -> Result<(), PlanError> {
    let d = &vmi.spec.domain;
    let offset = d
        .clock
        .as_ref()
        .and_then(|c| c.utc.as_ref())
        .and_then(|u| u.offset_seconds);
    if offset.is_some_and(|o| o != 0) {
        return Err(unsupported(
            "spec.domain.clock.utc.offsetSeconds",
            "a clock offset is not supported yet (the guest clock is UTC)",
        ));
    }
    if let Some(f) = &d.features {
        let off = |s: &Option<krvirt_api::kubevirt::FeatureState>| {
            s.as_ref().is_some_and(|s| s.enabled == Some(false))
        };
        if off(&f.acpi) {
            return Err(unsupported(
                "spec.domain.features.acpi",
                "turning ACPI off is not supported yet",
            ));
        }
        if f.apic
            .as_ref()
            .is_some_and(|a| a.enabled == Some(false) || a.end_of_interrupt)
        {
            return Err(unsupported(
                "spec.domain.features.apic",
                "APIC settings are not supported yet",
            ));
        }
        if f.smm.as_ref().is_some_and(|s| s.enabled.is_some()) {
            return Err(unsupported(
                "spec.domain.features.smm",
                "SMM settings are not supported yet",
            ));
        }
    }
    if d.devices.network_interface_multiqueue == Some(true) {
        return Err(unsupported(
            "spec.domain.devices.networkInterfaceMultiqueue",
            "multi-queue NICs are not supported yet",
        ));
    }
    Ok(())
}

/// What QEMU needs besides guest RAM (its own heap, device state, I/O
/// buffers; under TCG the translated-code cache too): added to
/// `resources.limits.memory` to make the cgroup limit, as KubeVirt adds its
/// overhead to the pod's limit.
pub fn memory_overhead(accel: Accel, guest_bytes: u64, vcpus: u32) -> u64 {
    const MIB: u64 = 1 << 20;
    let tcg = if accel == Accel::Tcg { 512 * MIB } else { 0 };
    256 * MIB + u64::from(vcpus) * 16 * MIB + guest_bytes / 64 + tcg
}

/// The VMI's cgroup limits: `resources.limits.cpu` (a CPU bandwidth
/// limit) and `resources.limits.memory` (+ [`memory_overhead`]). Dedicated
/// CPUs are chosen by the agent at launch.
fn resources(
    vmi: &VirtualMachineInstance,
    accel: Accel,
    guest_bytes: u64,
) -> Result<krvirt_hypervisor::Resources, PlanError> {
    let limits = &vmi.spec.domain.resources.limits;
    let memory_limit_bytes = match limits.get("memory") {
        None => None,
        Some(q) => {
            let v = q
                .value()
                .map_err(|e| unsupported("spec.domain.resources.limits.memory", e.to_string()))?;
            Some(v.max(guest_bytes) + memory_overhead(accel, guest_bytes, vmi.spec.vcpus()))
        }
    };
    let cpu_limit_millis = match limits.get("cpu") {
        None => None,
        Some(q) => Some(
            q.millis()
                .map_err(|e| unsupported("spec.domain.resources.limits.cpu", e.to_string()))?,
        ),
    };
    Ok(krvirt_hypervisor::Resources {
        memory_limit_bytes,
        cpu_limit_millis: cpu_limit_millis
            .map(|m| m.max(krvirt_hypervisor::config::MIN_CPU_LIMIT_MILLIS)),
        dedicated_cpus: Vec::new(),
    })
}

/// Plan the VMI's run in `run_dir` with accelerator `accel` (a VMI using
/// krvirt Volumes needs [`plan_with_volumes`]).
pub fn plan(
    vmi: &VirtualMachineInstance,
    accel: Accel,
    run_dir: &Path,
    images: &dyn ImageResolver,
) -> Result<Plan, PlanError> {
    plan_with_volumes(vmi, accel, run_dir, images, &ResolvedVolumes::new())
}

/// Plan with the VMI's `persistentVolumeClaim` / `dataVolume` volumes
/// resolved to files (`volumes`, by Volume name).
pub fn plan_with_volumes(
    vmi: &VirtualMachineInstance,
    accel: Accel,
    run_dir: &Path,
    images: &dyn ImageResolver,
    volumes: &ResolvedVolumes,
) -> Result<Plan, PlanError> {
    let spec = &vmi.spec;
    let uid = vmi.metadata.uid.clone().unwrap_or_default();
    let mut prep = Vec::new();
    refuse_unhonoured(vmi)?;

    let memory = spec
        .guest_memory_bytes()
        .map_err(|e| unsupported("spec.domain.memory.guest", e.to_string()))?
        .ok_or_else(|| unsupported("spec.domain.memory.guest", "no guest memory given"))?;
    // QEMU takes whole MiB; round up.
    let memory_bytes = memory.div_ceil(1 << 20) << 20;

    let mut disks = Vec::new();
    for (i, disk) in spec.domain.devices.disks.iter().enumerate() {
        let field = format!("spec.domain.devices.disks[{i}]");
        let volume: &Volume = spec
            .volume(&disk.name)
            .ok_or_else(|| unsupported(&field, format!("no volume named {:?}", disk.name)))?;
        let target = disk.disk.clone().unwrap_or_default();
        if disk.cdrom.is_some() {
            return Err(unsupported(
                format!("{field}.cdrom"),
                "cdrom disks are not supported yet",
            ));
        }
        let bus = bus(target.bus, &format!("{field}.disk.bus"))?;
        let cache = match disk.cache {
            None | Some(CacheMode::Writeback) => DiskCache::Writeback,
            Some(CacheMode::None) => DiskCache::None,
            Some(CacheMode::Writethrough) => DiskCache::Writethrough,
        };
        let file = |suffix: &str| run_dir.join(format!("disk-{}{suffix}", disk.name));
        let mut config = DiskConfig {
            id: disk.name.clone(),
            path: PathBuf::new(),
            format: DiskFormat::Qcow2,
            bus,
            read_only: target.readonly,
            boot_index: disk.boot_order,
            serial: disk.serial.clone(),
            cache,
            backing: Vec::new(),
            rbd: None,
        };
        let vfield = format!("spec.volumes[name={}]", volume.name);
        if let Some(cd) = &volume.container_disk {
            let (base, format) = images.disk(&cd.image).map_err(|source| PlanError::Image {
                field: format!("{vfield}.containerDisk.image"),
                source,
            })?;
            if cd.path.is_some() {
                return Err(unsupported(
                    format!("{vfield}.containerDisk.path"),
                    "a path inside the containerDisk image is not supported yet",
                ));
            }
            config.path = file(".qcow2");
            config.backing = vec![BackingImage {
                path: base.clone(),
                format,
            }];
            prep.push(PrepStep::Overlay {
                path: config.path.clone(),
                backing: base,
                backing_format: format,
            });
        } else if let Some(ed) = &volume.empty_disk {
            let size = ed
                .capacity
                .as_ref()
                .map(|q| q.value())
                .transpose()
                .map_err(|e| unsupported(format!("{vfield}.emptyDisk.capacity"), e.to_string()))?
                .ok_or_else(|| unsupported(format!("{vfield}.emptyDisk.capacity"), "required"))?;
            config.path = file(".qcow2");
            prep.push(PrepStep::Blank {
                path: config.path.clone(),
                size_bytes: size,
            });
        } else if let Some(claim) = volume.claim() {
            let r = volumes.get(claim).ok_or_else(|| {
                unsupported(&vfield, format!("Volume {claim:?} is not provisioned"))
            })?;
            config.path = r.path.clone();
            config.format = r.format;
            config.rbd = r.rbd.clone();
            if volume
                .persistent_volume_claim
                .as_ref()
                .and_then(|p| p.read_only)
                == Some(true)
            {
                config.read_only = true;
            }
        } else if let Some(ci) = &volume.cloud_init_no_cloud {
            let user_data = ci
                .user_data_bytes()
                .map_err(|e| unsupported(format!("{vfield}.cloudInitNoCloud.userDataBase64"), e))?;
            let network_config = ci.network_data_bytes().map_err(|e| {
                unsupported(format!("{vfield}.cloudInitNoCloud.networkDataBase64"), e)
            })?;
            config.path = file("-cidata.img");
            config.format = DiskFormat::Raw;
            prep.push(PrepStep::Seed {
                path: config.path.clone(),
                seed: NoCloudSeed {
                    instance_id: uid.clone(),
                    local_hostname: spec
                        .hostname
                        .clone()
                        .unwrap_or_else(|| vmi.metadata.name().to_string()),
                    user_data,
                    network_config,
                },
            });
        } else {
            return Err(unsupported(&vfield, "volume has no supported source"));
        }
        disks.push(config);
    }

    let assignments = match krvirt_api::network::interface_assignments(&vmi.metadata.annotations) {
        None => Vec::new(),
        Some(Ok(a)) => a,
        Some(Err(e)) => {
            return Err(unsupported(
                format!(
                    "metadata.annotations[{}]",
                    krvirt_api::network::INTERFACES_ANNOTATION
                ),
                e,
            ));
        }
    };
    let mut nics = Vec::new();
    for (i, iface) in spec.domain.devices.interfaces.iter().enumerate() {
        let field = format!("spec.domain.devices.interfaces[{i}]");
        let net = spec.network(&iface.name);
        let assigned = assignments.iter().find(|a| a.name == iface.name);
        let backend = match assigned {
            // On a krvirt Network: the tap the agent creates on its bridge.
            Some(a) if a.network.is_some() => NicBackend::Tap {
                ifname: krvirt_net::tap::tap_name(&uid, i)
                    .map_err(|e| unsupported(&field, e.to_string()))?,
            },
            // The pod network without a krvirt `default` Network: QEMU
            // user networking (the explicit fallback).
            _ if iface.masquerade.is_some() && net.and_then(|n| n.pod.as_ref()).is_some() => {
                NicBackend::user(Vec::new())
            }
            _ => {
                return Err(unsupported(
                    &field,
                    "the interface has no krvirt Network assigned (the network controller assigns one before launch)",
                ));
            }
        };
        let model = match iface.model.unwrap_or(InterfaceModel::Virtio) {
            InterfaceModel::Virtio => NicModel::Virtio,
            InterfaceModel::E1000 => NicModel::E1000,
            InterfaceModel::E1000e => NicModel::E1000e,
            InterfaceModel::Rtl8139 => NicModel::Rtl8139,
            other => {
                return Err(unsupported(
                    format!("{field}.model"),
                    format!("NIC model {other:?} is not supported"),
                ));
            }
        };
        nics.push(NicConfig {
            id: iface.name.clone(),
            model,
            mac: match assigned {
                Some(a) => a.mac.clone(),
                None => iface
                    .mac_address
                    .clone()
                    .unwrap_or_else(|| default_mac(&uid, &iface.name)),
            },
            backend,
        });
    }

    let firmware = spec.domain.firmware.clone().unwrap_or_default();
    let kernel_boot = match firmware.kernel_boot.as_ref() {
        None => None,
        Some(kb) => {
            let field = "spec.domain.firmware.kernelBoot";
            let c = kb
                .container
                .as_ref()
                .ok_or_else(|| unsupported(format!("{field}.container"), "required"))?;
            let (kernel, initrd) = images
                .kernel_boot(&c.image, c.kernel_path.as_deref(), c.initrd_path.as_deref())
                .map_err(|source| PlanError::Image {
                    field: format!("{field}.container"),
                    source,
                })?;
            let kernel = kernel.ok_or_else(|| {
                unsupported(
                    format!("{field}.container.kernelPath"),
                    "a kernel is needed to boot from an initrd",
                )
            })?;
            Some(KernelBoot {
                kernel,
                initrd,
                cmdline: kb.kernel_args.clone(),
            })
        }
    };

    let name = format!("{}_{}", vmi.metadata.namespace(), vmi.metadata.name());
    let config = VmConfig {
        name,
        uuid: firmware.uuid.clone().unwrap_or_else(|| uid.clone()),
        machine: machine(vmi)?,
        accel,
        cpu: cpu(vmi),
        memory_bytes,
        hugepages: None,
        numa_nodes: Vec::new(),
        disks,
        nics,
        kernel_boot,
        firmware: Firmware::Bios,
        rng: spec.domain.devices.rng.is_some(),
        start_paused: vmi
            .metadata
            .annotations
            .get(krvirt_api::kubevirt::START_PAUSED_ANNOTATION)
            .is_some_and(|v| v == "true"),
        incoming: false,
        hotplug_slots: HOTPLUG_SLOTS,
        resources: resources(vmi, accel, memory_bytes)?,
        run: RunPaths::in_dir(run_dir),
    };
    config
        .validate()
        .map_err(|e| unsupported(e.field, e.reason))?;
    Ok(Plan { config, prep })
}

#[cfg(test)]
mod tests;

/// KubeVirt's `numa.guestMappingPassthrough`: one guest NUMA node per host
/// NUMA node the dedicated CPUs are on (in order of first appearance),
/// holding the vCPUs pinned there and a share of RAM proportional to them
/// (whole `unit`s, the rest on the last node), bound to that host node.
/// `node_of` maps a host CPU id to its NUMA node.
pub fn numa_passthrough(
    dedicated_cpus: &[u32],
    node_of: impl Fn(u32) -> u32,
    memory_bytes: u64,
    unit: u64,
) -> Vec<krvirt_hypervisor::GuestNumaNode> {
    let mut nodes: Vec<(u32, Vec<u32>)> = Vec::new();
    for (vcpu, cpu) in dedicated_cpus.iter().enumerate() {
        let host = node_of(*cpu);
        match nodes.iter_mut().find(|(h, _)| *h == host) {
            Some((_, v)) => v.push(vcpu as u32),
            None => nodes.push((host, vec![vcpu as u32])),
        }
    }
    let total = dedicated_cpus.len().max(1) as u64;
    let units = memory_bytes / unit.max(1);
    let mut given = 0u64;
    let count = nodes.len();
    nodes
        .into_iter()
        .enumerate()
        .map(|(i, (host, vcpus))| {
            let share = if i + 1 == count {
                units - given
            } else {
                (units * vcpus.len() as u64 / total).max(1)
            };
            given += share;
            krvirt_hypervisor::GuestNumaNode {
                vcpus,
                memory_bytes: share * unit,
                host_node: Some(host),
            }
        })
        .collect()
}

#[cfg(test)]
mod numa_tests {
    use super::numa_passthrough;

    #[test]
    fn guest_nodes_mirror_the_host_nodes_of_the_pinned_cpus() {
        // Host CPUs 0-3 on node 0, 4-7 on node 1; vCPUs pinned 5,1,6,2.
        let nodes = numa_passthrough(&[5, 1, 6, 2], |c| c / 4, 256 << 20, 2 << 20);
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].host_node, Some(1));
        assert_eq!(nodes[0].vcpus, vec![0, 2]);
        assert_eq!(nodes[1].host_node, Some(0));
        assert_eq!(nodes[1].vcpus, vec![1, 3]);
        assert_eq!(nodes[0].memory_bytes, 128 << 20);
        assert_eq!(nodes[1].memory_bytes, 128 << 20);
        // Uneven: 3 vCPUs on one node, 1 on the other; RAM adds up.
        let nodes = numa_passthrough(&[0, 1, 2, 4], |c| c / 4, 66 << 20, 2 << 20);
        assert_eq!(nodes[0].memory_bytes + nodes[1].memory_bytes, 66 << 20);
        assert_eq!(nodes[0].memory_bytes, 48 << 20);
        // One host node: one guest node with everything.
        let nodes = numa_passthrough(&[0, 1], |_| 0, 64 << 20, 2 << 20);
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].vcpus, vec![0, 1]);
        assert_eq!(nodes[0].memory_bytes, 64 << 20);
    }
}
