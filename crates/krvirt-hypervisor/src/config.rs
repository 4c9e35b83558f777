//! A fully resolved description of one VM.
//!
//! [`VmConfig`] is what the agent produces from a KubeVirt
//! VirtualMachineInstance after every default, image path and network
//! decision has been made. Nothing in it is looked up later: the QEMU
//! command line ([`crate::argv::qemu_argv`]) is a pure function of it.
//!
//! [`VmConfig::validate`] checks everything QEMU would otherwise reject late
//! (or worse, misparse): ids, paths, MAC addresses, bus limits, machine and
//! device combinations. [`crate::process::launch`] always validates first.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest path (in bytes) a UNIX socket address can hold (`sun_path` is 108
/// bytes including the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Number of SATA ports on one ICH9 AHCI controller.
pub const MAX_SATA_DISKS: usize = 6;

/// Most vCPUs accepted (x86 without an IOMMU / x2APIC interrupt remapping).
pub const MAX_VCPUS: u32 = 255;

const MIB: u64 = 1024 * 1024;

/// One VM, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest name, shown by QEMU (`-name guest=...`) and in thread names.
    pub name: String,
    /// SMBIOS system UUID (`-uuid`), canonical 8-4-4-4-12 hex form.
    pub uuid: String,
    /// Machine type.
    #[serde(default)]
    pub machine: Machine,
    /// Accelerator. Decide it with [`crate::accel::detect`].
    pub accel: Accel,
    /// vCPU model and topology.
    #[serde(default)]
    pub cpu: CpuConfig,
    /// Guest RAM in bytes; a whole number of MiB.
    pub memory_bytes: u64,
    /// Back guest RAM with hugepages from a hugetlbfs mount
    /// (`memory-backend-file`, preallocated). `None`: ordinary memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<HugepagesBacking>,
    /// Guest NUMA nodes (`-numa node`), each with its vCPUs and its share
    /// of the RAM, optionally bound to a host NUMA node. Empty: no NUMA
    /// topology.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub numa_nodes: Vec<GuestNumaNode>,
    /// Disks in the order they are attached.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// NICs in the order they are attached (PCI slot order follows).
    #[serde(default)]
    pub nics: Vec<NicConfig>,
    /// Direct kernel boot (`-kernel`/`-initrd`/`-append`). Required for microvm.
    #[serde(default)]
    pub kernel_boot: Option<KernelBoot>,
    /// Guest firmware.
    #[serde(default)]
    pub firmware: Firmware,
    /// Attach a virtio RNG fed from the host's `/dev/urandom`.
    #[serde(default)]
    pub rng: bool,
    /// Start with vCPUs stopped (`-S`); `cont` (or [`crate::process::QemuHandle::resume`]) starts them.
    #[serde(default)]
    pub start_paused: bool,
    /// A live-migration target (`-incoming defer`): QEMU opens its devices
    /// and waits for `migrate-incoming` (QMP) instead of booting the guest.
    #[serde(default)]
    pub incoming: bool,
    /// Spare PCIe root ports (q35) for devices hot-plugged later, as
    /// `bus=hotplug{N}`; the root bus of q35 cannot take hot-plugged devices.
    #[serde(default)]
    pub hotplug_slots: u32,
    /// Host resources: cgroup limits and dedicated host CPUs. Applied by
    /// [`crate::process::launch_with`]; they do not change the command line.
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    /// Where QEMU's sockets, console log and pidfile live.
    pub run: RunPaths,
}

/// Hugepages behind guest RAM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HugepagesBacking {
    /// A hugetlbfs mount of pages of `page_size_bytes` (QEMU creates and
    /// unlinks its file there).
    pub mount: PathBuf,
    /// 2 MiB or 1 GiB.
    pub page_size_bytes: u64,
}

/// One guest NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestNumaNode {
    /// vCPU indices on this node.
    pub vcpus: Vec<u32>,
    /// RAM of this node; the nodes' RAM adds up to `memory_bytes`.
    pub memory_bytes: u64,
    /// Host NUMA node the RAM is bound to (`policy=bind`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_node: Option<u32>,
}

/// Host resources of one VM: the limits of its cgroup and the host CPUs
/// its vCPU threads are pinned to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Memory limit of the whole QEMU process (guest RAM + QEMU's own
    /// overhead), in bytes: cgroup v2 `memory.max`, v1
    /// `memory.limit_in_bytes`. `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// CPU bandwidth limit in thousandths of a host CPU (1000 = one CPU):
    /// quota per 100 ms period (v2 `cpu.max`, v1 `cpu.cfs_quota_us`).
    /// `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit_millis: Option<u64>,
    /// Dedicated host CPUs, one per vCPU in vCPU order: vCPU `i`'s thread
    /// is pinned to `dedicated_cpus[i]` (sched_setaffinity). Empty: no
    /// pinning.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dedicated_cpus: Vec<u32>,
}

impl Resources {
    /// No limit and no pinning.
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }
}

/// Smallest CPU limit accepted: 1 ms of CPU time per 100 ms period.
pub const MIN_CPU_LIMIT_MILLIS: u64 = 10;

/// QEMU machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// Q35 + ICH9 (PCIe). The default.
    #[default]
    Q35,
    /// i440FX + PIIX (legacy PCI).
    Pc,
    /// Minimal virtio-mmio machine; needs direct kernel boot, virtio devices only.
    Microvm,
}

impl Machine {
    /// The `-machine` type name.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Pc => "pc",
            Machine::Microvm => "microvm",
        }
    }
}

/// Accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

impl Accel {
    /// The `-accel` name.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.qemu_name())
    }
}

/// vCPU model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuModel {
    /// The host CPU as is (`-cpu host`). Under TCG, where `host` needs KVM,
    /// `max` (every feature TCG can emulate) is used instead.
    HostPassthrough,
    /// A named QEMU model such as `Skylake-Client-v4` or `qemu64`.
    Named(String),
    /// Every feature the accelerator supports (`-cpu max`).
    Max,
}

/// vCPU model and topology. vCPU count = sockets x cores x threads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    pub model: CpuModel,
    #[serde(default = "one")]
    pub sockets: u32,
    #[serde(default = "one")]
    pub cores: u32,
    #[serde(default = "one")]
    pub threads: u32,
}

fn one() -> u32 {
    1
}

impl Default for CpuConfig {
    fn default() -> Self {
        CpuConfig {
            model: CpuModel::HostPassthrough,
            sockets: 1,
            cores: 1,
            threads: 1,
        }
    }
}

impl CpuConfig {
    /// Total vCPUs, or `None` on overflow.
    pub fn vcpus(&self) -> Option<u32> {
        self.sockets
            .checked_mul(self.cores)
            .and_then(|n| n.checked_mul(self.threads))
    }
}

/// Disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    /// The block driver name.
    pub fn qemu_driver(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// Bus a disk is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// virtio-blk (PCI; virtio-mmio on microvm).
    Virtio,
    /// AHCI (q35's built-in controller; an added ich9-ahci on pc). Not read-only.
    Sata,
    /// A virtio-scsi controller with one scsi-hd per disk.
    Scsi,
}

/// Host page cache policy of a disk.
///
/// The default is [`DiskCache::Writeback`]: it works on every file system
/// (tmpfs and overlayfs refuse the `O_DIRECT` that `None` needs) and is safe
/// for guests that flush (the virtual disk advertises a volatile write cache,
/// so every modern guest issues flushes). Choose `None` for images on local
/// block-backed file systems to avoid double caching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    /// `O_DIRECT` on the host, volatile write cache in the guest.
    None,
    /// Host page cache, volatile write cache in the guest.
    #[default]
    Writeback,
    /// Host page cache, every write is flushed before it completes.
    Writethrough,
}

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Identifier, a DNS label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63
    /// characters), unique among disks. The QEMU device id is
    /// [`DiskConfig::device_id`].
    pub id: String,
    /// Absolute path of the image file.
    pub path: PathBuf,
    pub format: DiskFormat,
    pub bus: DiskBus,
    #[serde(default)]
    pub read_only: bool,
    /// Firmware boot priority, lower first. Unique among all devices.
    #[serde(default)]
    pub boot_index: Option<u32>,
    /// Serial number the guest sees (printable ASCII, at most 20 characters).
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub cache: DiskCache,
    /// Explicit backing chain of a qcow2 overlay, nearest first. Every
    /// element is opened read-only. Empty: QEMU follows the backing file
    /// named in the image header (also read-only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backing: Vec<BackingImage>,
    /// A Ceph RBD image instead of a file: the format node sits on an
    /// `rbd` protocol node (librbd) and `path` must be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<RbdDisk>,
}

/// A Ceph RBD image QEMU opens through librbd (`-blockdev driver=rbd`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdDisk {
    /// Ceph pool (`[A-Za-z0-9._-]`).
    pub pool: String,
    /// Image name (`[A-Za-z0-9._-]`).
    pub image: String,
    /// Absolute path of a `ceph.conf`; librbd's default search when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conf: Option<PathBuf>,
    /// Ceph user id (without `client.`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Monitors as `host:port`; those of `conf` when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub monitors: Vec<String>,
}

/// `host:port` of a Ceph monitor (an IPv6 host in brackets).
pub fn split_monitor(m: &str) -> Option<(&str, u16)> {
    let (host, port) = m.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().ok()?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b));
    (host_ok && port != 0).then_some((host, port))
}

fn check_ceph_name(field: &str, v: &str) -> Result<(), ConfigError> {
    if v.is_empty()
        || v.len() > 100
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return err(
            field,
            format!("{v:?} is not 1-100 characters of [A-Za-z0-9._-]"),
        );
    }
    Ok(())
}

fn validate_rbd(field: &str, r: &RbdDisk) -> Result<(), ConfigError> {
    check_ceph_name(&format!("{field}.pool"), &r.pool)?;
    check_ceph_name(&format!("{field}.image"), &r.image)?;
    if let Some(c) = &r.conf {
        check_abs_path(&format!("{field}.conf"), c)?;
    }
    if let Some(u) = &r.user {
        check_ceph_name(&format!("{field}.user"), u)?;
    }
    for (j, m) in r.monitors.iter().enumerate() {
        if split_monitor(m).is_none() {
            return err(
                format!("{field}.monitors[{j}]"),
                format!("{m:?} is not host:port"),
            );
        }
    }
    Ok(())
}

impl DiskConfig {
    /// QEMU device id (`disk-{id}`), for `device_del`, `query-block`...
    pub fn device_id(&self) -> String {
        format!("disk-{}", self.id)
    }
}

/// One image of a backing chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackingImage {
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// NIC device model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    Virtio,
    E1000,
    E1000e,
    Rtl8139,
}

/// One NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// Identifier, a DNS label, unique among NICs. Device id:
    /// [`NicConfig::device_id`], backend id: [`NicConfig::netdev_id`].
    pub id: String,
    pub model: NicModel,
    /// Unicast MAC address `xx:xx:xx:xx:xx:xx`, unique in the VM.
    pub mac: String,
    pub backend: NicBackend,
}

impl NicConfig {
    /// QEMU device id (`net-{id}`).
    pub fn device_id(&self) -> String {
        format!("net-{}", self.id)
    }

    /// QEMU netdev id (`hostnet-{id}`).
    pub fn netdev_id(&self) -> String {
        format!("hostnet-{}", self.id)
    }
}

/// Where a NIC's packets go on the host side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum NicBackend {
    /// QEMU's user-mode network stack (slirp): NAT, DHCP and DNS inside
    /// QEMU, no host privileges needed.
    User {
        /// Guest network in CIDR form.
        #[serde(default = "default_user_net")]
        net: String,
        /// Address of the virtual gateway/host.
        #[serde(default = "default_user_host")]
        host: String,
        /// First address DHCP hands out.
        #[serde(default = "default_user_dhcp_start")]
        dhcp_start: String,
        /// Host ports forwarded to the guest.
        #[serde(default)]
        hostfwd: Vec<PortForward>,
    },
    /// A tap device that already exists: created by the agent (TUNSETIFF,
    /// `IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`, persistent, owned by the user QEMU
    /// runs as) and attached to its network's bridge. QEMU only opens it
    /// by name (`script=no,downscript=no`), so it needs no privileges.
    Tap {
        /// Interface name (1..=15 of `[A-Za-z0-9_-]`).
        ifname: String,
    },
}

fn default_user_net() -> String {
    "10.0.2.0/24".to_string()
}
fn default_user_host() -> String {
    "10.0.2.1".to_string()
}
fn default_user_dhcp_start() -> String {
    "10.0.2.2".to_string()
}

impl NicBackend {
    /// User networking with QEMU's classic addresses (10.0.2.0/24) and the
    /// given port forwards.
    pub fn user(hostfwd: Vec<PortForward>) -> Self {
        NicBackend::User {
            net: default_user_net(),
            host: default_user_host(),
            dhcp_start: default_user_dhcp_start(),
            hostfwd,
        }
    }
}

/// Transport protocol of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A host port forwarded to a guest port (user networking).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    pub proto: Protocol,
    /// Host address to bind; `None` binds every address.
    #[serde(default)]
    pub host_addr: Option<Ipv4Addr>,
    pub host_port: u16,
    pub guest_port: u16,
}

/// Direct kernel boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
}

/// Guest firmware.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Firmware {
    /// The machine's default BIOS (SeaBIOS; qboot on microvm).
    #[default]
    Bios,
    /// OVMF in two pflash devices: read-only code and this VM's own
    /// (writable) copy of the variable store.
    Uefi { code: PathBuf, vars: PathBuf },
}

/// Files of one running VM. By convention all live in `dir`, the per-VM run
/// directory `{data_dir}/run/vmi/{vmi_uid}/` (see [`RunPaths::in_dir`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunPaths {
    /// Run directory; created with mode 0700 on launch.
    pub dir: PathBuf,
    /// QMP socket (QEMU listens).
    pub qmp_socket: PathBuf,
    /// Serial console socket (QEMU listens; one client at a time).
    pub serial_socket: PathBuf,
    /// Everything the guest wrote to its serial console, written by QEMU.
    pub console_log: PathBuf,
    /// QEMU's pidfile.
    pub pidfile: PathBuf,
}

impl RunPaths {
    /// The conventional layout: `qmp.sock`, `serial.sock`, `console.log` and
    /// `qemu.pid` inside `dir`.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        RunPaths {
            qmp_socket: dir.join("qmp.sock"),
            serial_socket: dir.join("serial.sock"),
            console_log: dir.join("console.log"),
            pidfile: dir.join("qemu.pid"),
            dir,
        }
    }
}

/// A configuration QEMU cannot (or should not) run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid VM config: {field}: {reason}")]
pub struct ConfigError {
    /// Path of the offending field, e.g. `disks[1].serial`.
    pub field: String,
    pub reason: String,
}

fn err<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field: field.into(),
        reason: reason.into(),
    })
}

impl VmConfig {
    /// Checks everything QEMU would reject (or misparse) before it runs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_basics()?;
        self.validate_disks()?;
        self.validate_nics()?;
        self.validate_boot()?;
        self.validate_resources()?;
        self.validate_memory_backing()?;
        validate_run_paths(&self.run)
    }

    fn validate_memory_backing(&self) -> Result<(), ConfigError> {
        if let Some(h) = &self.hugepages {
            if h.page_size_bytes != 2 * MIB && h.page_size_bytes != 1024 * MIB {
                return err(
                    "hugepages.page_size_bytes",
                    format!("{} is not 2 MiB or 1 GiB", h.page_size_bytes),
                );
            }
            if !h.mount.is_absolute() {
                return err("hugepages.mount", "must be an absolute path");
            }
            if !self.memory_bytes.is_multiple_of(h.page_size_bytes) {
                return err(
                    "memory_bytes",
                    format!(
                        "{} is not a whole number of {}-byte hugepages",
                        self.memory_bytes, h.page_size_bytes
                    ),
                );
            }
        }
        if self.numa_nodes.is_empty() {
            return Ok(());
        }
        let vcpus = self.cpu.vcpus().unwrap_or(0);
        let mut seen = HashSet::new();
        let mut total: u64 = 0;
        let unit = self.hugepages.as_ref().map_or(MIB, |h| h.page_size_bytes);
        for (i, n) in self.numa_nodes.iter().enumerate() {
            if n.vcpus.is_empty() {
                return err(format!("numa_nodes[{i}].vcpus"), "must not be empty");
            }
            for v in &n.vcpus {
                if *v >= vcpus || !seen.insert(*v) {
                    return err(
                        format!("numa_nodes[{i}].vcpus"),
                        format!("vCPU {v} is out of range or on two nodes"),
                    );
                }
            }
            if n.memory_bytes == 0 || !n.memory_bytes.is_multiple_of(unit) {
                return err(
                    format!("numa_nodes[{i}].memory_bytes"),
                    format!(
                        "{} is not a positive multiple of {unit} bytes",
                        n.memory_bytes
                    ),
                );
            }
            if n.host_node.is_some_and(|h| h >= 1024) {
                return err(format!("numa_nodes[{i}].host_node"), "out of range");
            }
            total = total.saturating_add(n.memory_bytes);
        }
        if seen.len() as u32 != vcpus {
            return err(
                "numa_nodes",
                format!("the nodes hold {} of the {vcpus} vCPUs", seen.len()),
            );
        }
        if total != self.memory_bytes {
            return err(
                "numa_nodes",
                format!(
                    "the nodes' memory adds up to {total} bytes, not {}",
                    self.memory_bytes
                ),
            );
        }
        Ok(())
    }

    fn validate_resources(&self) -> Result<(), ConfigError> {
        let r = &self.resources;
        if let Some(m) = r.memory_limit_bytes
            && m < self.memory_bytes
        {
            return err(
                "resources.memory_limit_bytes",
                format!(
                    "{m} is below the guest memory ({} bytes); QEMU would be killed",
                    self.memory_bytes
                ),
            );
        }
        if let Some(c) = r.cpu_limit_millis
            && c < MIN_CPU_LIMIT_MILLIS
        {
            return err(
                "resources.cpu_limit_millis",
                format!("{c} is below the minimum of {MIN_CPU_LIMIT_MILLIS}"),
            );
        }
        if !r.dedicated_cpus.is_empty() {
            let vcpus = self.cpu.vcpus().unwrap_or(0) as usize;
            if r.dedicated_cpus.len() != vcpus {
                return err(
                    "resources.dedicated_cpus",
                    format!(
                        "{} host CPUs for {vcpus} vCPUs: give exactly one per vCPU",
                        r.dedicated_cpus.len()
                    ),
                );
            }
            let mut seen = HashSet::new();
            for (i, c) in r.dedicated_cpus.iter().enumerate() {
                if *c >= 4096 {
                    return err(
                        format!("resources.dedicated_cpus[{i}]"),
                        format!("host CPU {c} is out of range"),
                    );
                }
                if !seen.insert(*c) {
                    return err(
                        format!("resources.dedicated_cpus[{i}]"),
                        format!("host CPU {c} given twice"),
                    );
                }
            }
        }
        Ok(())
    }

    fn validate_basics(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return err("name", "must not be empty");
        }
        if self.name.len() > 253 {
            return err("name", "must be at most 253 bytes");
        }
        if self.name.chars().any(char::is_control) {
            return err("name", "must not contain control characters");
        }
        if !is_uuid(&self.uuid) {
            return err(
                "uuid",
                format!(
                    "{:?} is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)",
                    self.uuid
                ),
            );
        }
        for (field, v) in [
            ("cpu.sockets", self.cpu.sockets),
            ("cpu.cores", self.cpu.cores),
            ("cpu.threads", self.cpu.threads),
        ] {
            if v == 0 {
                return err(field, "must be at least 1");
            }
        }
        match self.cpu.vcpus() {
            Some(n) if n <= MAX_VCPUS => {}
            _ => {
                return err(
                    "cpu",
                    format!("sockets x cores x threads must be at most {MAX_VCPUS}"),
                );
            }
        }
        if let CpuModel::Named(model) = &self.cpu.model {
            let ok = !model.is_empty()
                && model.len() <= 64
                && model
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                return err(
                    "cpu.model",
                    format!(
                        "{model:?} is not a CPU model name (letters, digits, '-', '_', '.'; features are not accepted here)"
                    ),
                );
            }
        }
        if self.memory_bytes < MIB || !self.memory_bytes.is_multiple_of(MIB) {
            return err(
                "memory_bytes",
                format!(
                    "{} is not a positive whole number of MiB",
                    self.memory_bytes
                ),
            );
        }
        Ok(())
    }

    fn validate_disks(&self) -> Result<(), ConfigError> {
        let mut ids = HashSet::new();
        let mut boot = HashSet::new();
        let mut sata = 0usize;
        for (i, d) in self.disks.iter().enumerate() {
            let f = |name: &str| format!("disks[{i}].{name}");
            check_label(&f("id"), &d.id)?;
            if !ids.insert(d.id.as_str()) {
                return err(f("id"), format!("duplicate disk id {:?}", d.id));
            }
            if let Some(r) = &d.rbd {
                if !d.path.as_os_str().is_empty() {
                    return err(f("path"), "must be empty for an rbd disk");
                }
                if !d.backing.is_empty() {
                    return err(f("backing"), "an rbd disk has no backing chain");
                }
                validate_rbd(&f("rbd"), r)?;
            } else {
                check_abs_path(&f("path"), &d.path)?;
            }
            if let Some(b) = d.boot_index
                && !boot.insert(b)
            {
                return err(f("boot_index"), format!("boot index {b} used twice"));
            }
            if let Some(s) = &d.serial
                && (s.is_empty() || s.len() > 20 || !s.chars().all(|c| (' '..='~').contains(&c)))
            {
                return err(f("serial"), "must be 1 to 20 printable ASCII characters");
            }
            match d.bus {
                DiskBus::Virtio | DiskBus::Scsi => {}
                DiskBus::Sata => {
                    if self.machine == Machine::Microvm {
                        return err(f("bus"), "microvm has no SATA (AHCI needs PCI)");
                    }
                    if d.read_only {
                        return err(
                            f("read_only"),
                            "QEMU's SATA disk (ide-hd) cannot be read-only; use virtio or scsi",
                        );
                    }
                    sata += 1;
                    if sata > MAX_SATA_DISKS {
                        return err(
                            f("bus"),
                            format!("at most {MAX_SATA_DISKS} SATA disks (one AHCI controller)"),
                        );
                    }
                }
            }
            if !d.backing.is_empty() && d.format != DiskFormat::Qcow2 {
                return err(f("backing"), "only a qcow2 image can have a backing chain");
            }
            let last = d.backing.len().saturating_sub(1);
            for (j, b) in d.backing.iter().enumerate() {
                check_abs_path(&format!("disks[{i}].backing[{j}].path"), &b.path)?;
                if b.format == DiskFormat::Raw && j != last {
                    return err(
                        format!("disks[{i}].backing[{j}].format"),
                        "a raw image cannot have a backing image, so it must be last in the chain",
                    );
                }
            }
        }
        Ok(())
    }

    fn validate_nics(&self) -> Result<(), ConfigError> {
        let mut ids = HashSet::new();
        let mut macs = HashSet::new();
        for (i, n) in self.nics.iter().enumerate() {
            let f = |name: &str| format!("nics[{i}].{name}");
            check_label(&f("id"), &n.id)?;
            if !ids.insert(n.id.as_str()) {
                return err(f("id"), format!("duplicate NIC id {:?}", n.id));
            }
            let Some(mac) = parse_mac(&n.mac) else {
                return err(
                    f("mac"),
                    format!("{:?} is not a MAC address (xx:xx:xx:xx:xx:xx)", n.mac),
                );
            };
            if mac[0] & 1 == 1 {
                return err(f("mac"), format!("{} is a multicast address", n.mac));
            }
            if !macs.insert(mac) {
                return err(f("mac"), format!("MAC {} used twice", n.mac));
            }
            if self.machine == Machine::Microvm && n.model != NicModel::Virtio {
                return err(f("model"), "microvm supports only virtio NICs");
            }
            match &n.backend {
                NicBackend::User {
                    net,
                    host,
                    dhcp_start,
                    hostfwd,
                } => validate_user_net(&f("backend"), net, host, dhcp_start, hostfwd)?,
                NicBackend::Tap { ifname } => {
                    if ifname.is_empty()
                        || ifname.len() > 15
                        || !ifname
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    {
                        return err(
                            f("backend.ifname"),
                            format!("{ifname:?} is not an interface name (1-15 of A-Za-z0-9_-)"),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn validate_boot(&self) -> Result<(), ConfigError> {
        if let Some(k) = &self.kernel_boot {
            check_abs_path("kernel_boot.kernel", &k.kernel)?;
            if let Some(i) = &k.initrd {
                check_abs_path("kernel_boot.initrd", i)?;
            }
            if let Some(c) = &k.cmdline
                && c.contains('\0')
            {
                return err("kernel_boot.cmdline", "must not contain NUL");
            }
        } else if self.machine == Machine::Microvm {
            return err(
                "kernel_boot",
                "microvm needs direct kernel boot (no firmware boots from virtio-mmio)",
            );
        }
        if let Firmware::Uefi { code, vars } = &self.firmware {
            if self.machine == Machine::Microvm {
                return err("firmware", "microvm cannot run UEFI firmware");
            }
            check_abs_path("firmware.code", code)?;
            check_abs_path("firmware.vars", vars)?;
            if code == vars {
                return err(
                    "firmware.vars",
                    "must be a different file than firmware.code",
                );
            }
        }
        Ok(())
    }
}

fn validate_run_paths(run: &RunPaths) -> Result<(), ConfigError> {
    check_abs_path("run.dir", &run.dir)?;
    check_abs_path("run.qmp_socket", &run.qmp_socket)?;
    check_abs_path("run.serial_socket", &run.serial_socket)?;
    check_abs_path("run.console_log", &run.console_log)?;
    check_abs_path("run.pidfile", &run.pidfile)?;
    for (field, p) in [
        ("run.qmp_socket", &run.qmp_socket),
        ("run.serial_socket", &run.serial_socket),
    ] {
        if p.as_os_str().len() > MAX_SOCKET_PATH {
            return err(
                field,
                format!("socket path longer than {MAX_SOCKET_PATH} bytes"),
            );
        }
    }
    let all = [
        &run.qmp_socket,
        &run.serial_socket,
        &run.console_log,
        &run.pidfile,
    ];
    for (i, a) in all.iter().enumerate() {
        if all[i + 1..].contains(a) {
            return err("run", format!("{} is used for two purposes", a.display()));
        }
    }
    Ok(())
}

fn validate_user_net(
    field: &str,
    net: &str,
    host: &str,
    dhcp_start: &str,
    hostfwd: &[PortForward],
) -> Result<(), ConfigError> {
    let Some((addr, prefix)) = parse_cidr(net) else {
        return err(
            format!("{field}.net"),
            format!("{net:?} is not an IPv4 network (a.b.c.d/len, len 8..=30)"),
        );
    };
    let mask = u32::MAX << (32 - prefix);
    let network = u32::from(addr) & mask;
    if u32::from(addr) != network {
        return err(format!("{field}.net"), format!("{net:?} has host bits set"));
    }
    let broadcast = network | !mask;
    for (name, value) in [("host", host), ("dhcp_start", dhcp_start)] {
        let Ok(ip) = value.parse::<Ipv4Addr>() else {
            return err(
                format!("{field}.{name}"),
                format!("{value:?} is not an IPv4 address"),
            );
        };
        let ip = u32::from(ip);
        if ip & mask != network || ip == network || ip == broadcast {
            return err(
                format!("{field}.{name}"),
                format!("{value} is not a host address in {net}"),
            );
        }
    }
    if host == dhcp_start {
        return err(
            format!("{field}.dhcp_start"),
            "must differ from the host address",
        );
    }
    let mut seen = HashSet::new();
    for (j, fwd) in hostfwd.iter().enumerate() {
        if fwd.host_port == 0 || fwd.guest_port == 0 {
            return err(format!("{field}.hostfwd[{j}]"), "ports must be 1..=65535");
        }
        if !seen.insert((fwd.proto, fwd.host_addr, fwd.host_port)) {
            return err(
                format!("{field}.hostfwd[{j}]"),
                format!(
                    "host {} port {} forwarded twice",
                    fwd.proto.as_str(),
                    fwd.host_port
                ),
            );
        }
    }
    Ok(())
}

fn check_label(field: &str, id: &str) -> Result<(), ConfigError> {
    let b = id.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        err(
            field,
            format!(
                "{id:?} is not a DNS label ([a-z0-9]([-a-z0-9]*[a-z0-9])?, at most 63 characters)"
            ),
        )
    }
}

fn check_abs_path(field: &str, p: &Path) -> Result<(), ConfigError> {
    let Some(s) = p.to_str() else {
        return err(field, "path is not valid UTF-8");
    };
    if !p.is_absolute() {
        return err(field, format!("{s:?} is not an absolute path"));
    }
    if s.contains('\0') {
        return err(field, "path contains NUL");
    }
    Ok(())
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Parses `xx:xx:xx:xx:xx:xx` (either case).
pub(crate) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut out {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u32)> {
    let (a, l) = s.split_once('/')?;
    let addr: Ipv4Addr = a.parse().ok()?;
    let len: u32 = l.parse().ok()?;
    (8..=30).contains(&len).then_some((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmConfig {
        VmConfig {
            name: "vm".into(),
            uuid: "6f1c7d2e-8b1a-4c53-9d7e-0a1b2c3d4e5f".into(),
            machine: Machine::Q35,
            accel: Accel::Tcg,
            cpu: CpuConfig::default(),
            memory_bytes: 128 * MIB,
            hugepages: None,
            numa_nodes: vec![],
            disks: vec![DiskConfig {
                id: "root".into(),
                path: "/var/lib/krvirt/root.qcow2".into(),
                format: DiskFormat::Qcow2,
                bus: DiskBus::Virtio,
                read_only: false,
                boot_index: Some(1),
                serial: None,
                cache: DiskCache::default(),
                backing: vec![],
                rbd: None,
            }],
            nics: vec![NicConfig {
                id: "default".into(),
                model: NicModel::Virtio,
                mac: "52:54:00:00:00:01".into(),
                backend: NicBackend::user(vec![]),
            }],
            kernel_boot: None,
            firmware: Firmware::Bios,
            rng: false,
            hotplug_slots: 0,
            resources: Resources::default(),
            start_paused: false,
            incoming: false,
            run: RunPaths::in_dir("/run/krvirt/vmi/u1"),
        }
    }

    fn field_of(cfg: &VmConfig) -> String {
        match cfg.validate() {
            Ok(()) => panic!("expected a validation error"),
            Err(e) => e.field,
        }
    }

    #[test]
    fn base_is_valid() {
        base().validate().unwrap();
    }

    #[test]
    fn default_cache_is_writeback() {
        assert_eq!(DiskCache::default(), DiskCache::Writeback);
    }

    #[test]
    fn rejects_bad_basics() {
        let mut c = base();
        c.name = String::new();
        assert_eq!(field_of(&c), "name");
        let mut c = base();
        c.name = "a\nb".into();
        assert_eq!(field_of(&c), "name");
        let mut c = base();
        c.uuid = "not-a-uuid".into();
        assert_eq!(field_of(&c), "uuid");
        let mut c = base();
        c.cpu.cores = 0;
        assert_eq!(field_of(&c), "cpu.cores");
        let mut c = base();
        c.cpu.sockets = 16;
        c.cpu.cores = 16;
        assert_eq!(field_of(&c), "cpu");
        let mut c = base();
        c.cpu.sockets = u32::MAX;
        c.cpu.cores = u32::MAX;
        assert_eq!(field_of(&c), "cpu");
        let mut c = base();
        c.cpu.model = CpuModel::Named("Skylake,+vmx".into());
        assert_eq!(field_of(&c), "cpu.model");
        let mut c = base();
        c.memory_bytes = 128 * MIB + 1;
        assert_eq!(field_of(&c), "memory_bytes");
        let mut c = base();
        c.memory_bytes = 0;
        assert_eq!(field_of(&c), "memory_bytes");
    }

    #[test]
    fn rejects_bad_disks() {
        let mut c = base();
        c.disks[0].id = "Root".into();
        assert_eq!(field_of(&c), "disks[0].id");
        let mut c = base();
        c.disks[0].id = "-x".into();
        assert_eq!(field_of(&c), "disks[0].id");
        let mut c = base();
        c.disks.push(c.disks[0].clone());
        c.disks[1].boot_index = None;
        assert_eq!(field_of(&c), "disks[1].id");
        let mut c = base();
        let mut d = c.disks[0].clone();
        d.id = "two".into();
        c.disks.push(d);
        assert_eq!(field_of(&c), "disks[1].boot_index");
        let mut c = base();
        c.disks[0].path = "relative.qcow2".into();
        assert_eq!(field_of(&c), "disks[0].path");
        let mut c = base();
        c.disks[0].serial = Some("x".repeat(21));
        assert_eq!(field_of(&c), "disks[0].serial");
        let mut c = base();
        c.disks[0].serial = Some("tab\there".into());
        assert_eq!(field_of(&c), "disks[0].serial");
        let mut c = base();
        c.disks[0].bus = DiskBus::Sata;
        c.disks[0].read_only = true;
        assert_eq!(field_of(&c), "disks[0].read_only");
        let mut c = base();
        c.disks[0].format = DiskFormat::Raw;
        c.disks[0].backing = vec![BackingImage {
            path: "/b.raw".into(),
            format: DiskFormat::Raw,
        }];
        assert_eq!(field_of(&c), "disks[0].backing");
        let mut c = base();
        c.disks[0].backing = vec![
            BackingImage {
                path: "/b.raw".into(),
                format: DiskFormat::Raw,
            },
            BackingImage {
                path: "/c.qcow2".into(),
                format: DiskFormat::Qcow2,
            },
        ];
        assert_eq!(field_of(&c), "disks[0].backing[0].format");
    }

    #[test]
    fn rejects_too_many_sata_disks() {
        let mut c = base();
        c.disks = (0..7)
            .map(|i| DiskConfig {
                id: format!("d{i}"),
                path: format!("/d{i}.raw").into(),
                format: DiskFormat::Raw,
                bus: DiskBus::Sata,
                read_only: false,
                boot_index: None,
                serial: None,
                cache: DiskCache::Writeback,
                backing: vec![],
                rbd: None,
            })
            .collect();
        assert_eq!(field_of(&c), "disks[6].bus");
        c.disks.pop();
        c.validate().unwrap();
    }

    #[test]
    fn rejects_bad_nics() {
        for mac in [
            "52:54:00:00:00",
            "52:54:00:00:00:zz",
            "52-54-00-00-00-01",
            "01:00:5e:00:00:01",
        ] {
            let mut c = base();
            c.nics[0].mac = mac.into();
            assert_eq!(field_of(&c), "nics[0].mac", "{mac}");
        }
        let mut c = base();
        let mut n = c.nics[0].clone();
        n.id = "second".into();
        c.nics.push(n);
        assert_eq!(field_of(&c), "nics[1].mac");
        for ifname in ["", "0123456789abcdef", "tap,x", "a b", "../x"] {
            let mut c = base();
            c.nics[0].backend = NicBackend::Tap {
                ifname: ifname.into(),
            };
            assert_eq!(field_of(&c), "nics[0].backend.ifname", "{ifname:?}");
        }
        let mut c = base();
        c.nics[0].backend = NicBackend::Tap {
            ifname: "kvt0a1b2c3d4e0".into(),
        };
        c.validate().unwrap();
        let bad_user = [
            ("10.0.2.0/33", "10.0.2.1", "10.0.2.2", "nics[0].backend.net"),
            ("10.0.2.1/24", "10.0.2.1", "10.0.2.2", "nics[0].backend.net"),
            (
                "10.0.2.0/24",
                "10.0.3.1",
                "10.0.2.2",
                "nics[0].backend.host",
            ),
            (
                "10.0.2.0/24",
                "10.0.2.1",
                "10.0.2.255",
                "nics[0].backend.dhcp_start",
            ),
            (
                "10.0.2.0/24",
                "10.0.2.1",
                "10.0.2.1",
                "nics[0].backend.dhcp_start",
            ),
            ("10.0.2.0/24", "10.0.2.1", "x", "nics[0].backend.dhcp_start"),
        ];
        for (net, host, dhcp, field) in bad_user {
            let mut c = base();
            c.nics[0].backend = NicBackend::User {
                net: net.into(),
                host: host.into(),
                dhcp_start: dhcp.into(),
                hostfwd: vec![],
            };
            assert_eq!(field_of(&c), field, "{net} {host} {dhcp}");
        }
        let fwd = PortForward {
            proto: Protocol::Tcp,
            host_addr: None,
            host_port: 2222,
            guest_port: 22,
        };
        let mut c = base();
        c.nics[0].backend = NicBackend::user(vec![fwd.clone(), fwd.clone()]);
        assert_eq!(field_of(&c), "nics[0].backend.hostfwd[1]");
        let mut c = base();
        c.nics[0].backend = NicBackend::user(vec![PortForward {
            host_port: 0,
            ..fwd.clone()
        }]);
        assert_eq!(field_of(&c), "nics[0].backend.hostfwd[0]");
        let mut c = base();
        c.nics[0].backend = NicBackend::user(vec![
            fwd.clone(),
            PortForward {
                proto: Protocol::Udp,
                ..fwd
            },
        ]);
        c.validate().unwrap();
    }

    #[test]
    fn microvm_rules() {
        let mut c = base();
        c.machine = Machine::Microvm;
        assert_eq!(field_of(&c), "kernel_boot");
        c.kernel_boot = Some(KernelBoot {
            kernel: "/boot/vmlinuz".into(),
            initrd: None,
            cmdline: None,
        });
        c.validate().unwrap();
        let mut e = c.clone();
        e.nics[0].model = NicModel::E1000;
        assert_eq!(field_of(&e), "nics[0].model");
        let mut s = c.clone();
        s.disks[0].bus = DiskBus::Sata;
        assert_eq!(field_of(&s), "disks[0].bus");
        let mut u = c.clone();
        u.firmware = Firmware::Uefi {
            code: "/c.fd".into(),
            vars: "/v.fd".into(),
        };
        assert_eq!(field_of(&u), "firmware");
    }

    #[test]
    fn resources_are_checked() {
        let mut c = base();
        c.cpu.cores = 2;
        c.resources = Resources {
            memory_limit_bytes: Some(c.memory_bytes + 64 * MIB),
            cpu_limit_millis: Some(1500),
            dedicated_cpus: vec![3, 1],
        };
        c.validate().unwrap();
        let mut m = c.clone();
        m.resources.memory_limit_bytes = Some(c.memory_bytes - MIB);
        assert_eq!(field_of(&m), "resources.memory_limit_bytes");
        let mut q = c.clone();
        q.resources.cpu_limit_millis = Some(5);
        assert_eq!(field_of(&q), "resources.cpu_limit_millis");
        let mut n = c.clone();
        n.resources.dedicated_cpus = vec![1];
        assert_eq!(field_of(&n), "resources.dedicated_cpus");
        let mut d = c.clone();
        d.resources.dedicated_cpus = vec![1, 1];
        assert_eq!(field_of(&d), "resources.dedicated_cpus[1]");
    }

    #[test]
    fn rejects_bad_run_paths() {
        let mut c = base();
        c.run = RunPaths::in_dir(format!("/{}", "x".repeat(100)));
        assert_eq!(field_of(&c), "run.qmp_socket");
        let mut c = base();
        c.run.serial_socket = c.run.qmp_socket.clone();
        assert_eq!(field_of(&c), "run");
        let mut c = base();
        c.run.pidfile = "qemu.pid".into();
        assert_eq!(field_of(&c), "run.pidfile");
    }

    #[test]
    fn serde_round_trip_and_defaults() {
        let c = base();
        let json = serde_json::to_string(&c).unwrap();
        let back: VmConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        let minimal = r#"{"name":"m","uuid":"6f1c7d2e-8b1a-4c53-9d7e-0a1b2c3d4e5f","accel":"tcg",
            "memory_bytes":134217728,"run":{"dir":"/r","qmp_socket":"/r/q","serial_socket":"/r/s",
            "console_log":"/r/c","pidfile":"/r/p"},
            "nics":[{"id":"n","model":"virtio","mac":"52:54:00:00:00:02","backend":{"type":"user"}}]}"#;
        let m: VmConfig = serde_json::from_str(minimal).unwrap();
        assert_eq!(m.machine, Machine::Q35);
        assert_eq!(m.cpu, CpuConfig::default());
        assert_eq!(m.firmware, Firmware::Bios);
        assert_eq!(m.nics[0].backend, NicBackend::user(vec![]));
        m.validate().unwrap();
        let unknown = minimal.replacen("\"name\"", "\"bogus\":1,\"name\"", 1);
        assert!(serde_json::from_str::<VmConfig>(&unknown).is_err());
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:AB:cd:00:ff"),
            Some([0x52, 0x54, 0xab, 0xcd, 0, 0xff])
        );
        assert_eq!(parse_mac("52:54:00:00:00:00:00"), None);
        assert_eq!(parse_mac("5:54:00:00:00:00"), None);
        assert_eq!(parse_mac("+5:54:00:00:00:00"), None);
    }
}
