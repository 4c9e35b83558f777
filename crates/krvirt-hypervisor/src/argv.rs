//! The QEMU command line of a [`VmConfig`], as a pure function.
//!
//! Layout (every option checked against QEMU 7.2):
//!
//! - identity: `-name guest=NAME,debug-threads=on`, `-uuid`
//! - platform: `-machine`, `-accel`, `-cpu`, `-smp`, `-m`
//! - no implicit devices: `-nodefaults -no-user-config -display none -vga none`
//! - `-incoming defer` for a live-migration target ([`VmConfig::incoming`])
//! - `-no-shutdown`: a guest power-off leaves QEMU running in state
//!   `shutdown`, so the agent can tell a clean guest shutdown from a crash
//! - QMP on a listening UNIX socket, one 16550 UART on another (with a log
//!   file QEMU writes itself, client connected or not)
//! - disks as `-blockdev` file + format nodes and a `-device` frontend; NICs
//!   as `-netdev` + `-device`
//! - `-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny`
//!   (QEMU's seccomp filter: no obsolete syscalls, no set*uid, no
//!   fork/exec, no changes to scheduling or affinity) and `-pidfile`. QEMU
//!   is not told to `-daemonize` (that fails under this sandbox on QEMU
//!   7.2): [`crate::process::launch_with`] starts it in its own session.
//!
//! Values inside `key=value,...` option strings are escaped with
//! [`escape_opt`] (`,` becomes `,,`). Options QEMU takes verbatim
//! (`-kernel`, `-initrd`, `-append`, `-pidfile`, `-uuid`) are not escaped.
//!
//! Internal names, stable so QMP users can rely on them:
//! disk `i` has block nodes `drive{i}-file` / `drive{i}-fmt` (backing image
//! `j`: `drive{i}-b{j}-file` / `drive{i}-b{j}-fmt`) and device id
//! [`crate::config::DiskConfig::device_id`]; UEFI uses nodes `fw-code` and
//! `fw-vars`; controllers are `scsi0` and (on `pc`) `sata0`; the RNG backend
//! object is `objrng0`, its device `rng0`.

use std::borrow::Cow;
use std::path::Path;

use crate::config::{
    Accel, CpuModel, DiskBus, DiskCache, DiskConfig, DiskFormat, Firmware, Machine, NicBackend,
    NicConfig, NicModel, RbdDisk, VmConfig, split_monitor,
};

/// QEMU's seccomp sandbox, every optional filter on.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Escapes a value for a QEMU `key=value,...` option string: every `,`
/// becomes `,,`.
pub fn escape_opt(value: &str) -> Cow<'_, str> {
    if value.contains(',') {
        Cow::Owned(value.replace(',', ",,"))
    } else {
        Cow::Borrowed(value)
    }
}

fn path_str(p: &Path) -> Cow<'_, str> {
    p.to_string_lossy()
}

fn esc_path(p: &Path) -> String {
    escape_opt(&path_str(p)).into_owned()
}

/// The `-chardev` value of the QMP socket. [`crate::process::reattach`]
/// looks for exactly this argument in a process's command line.
pub fn qmp_chardev(qmp_socket: &Path) -> String {
    format!(
        "socket,id=qmp,path={},server=on,wait=off",
        esc_path(qmp_socket)
    )
}

/// Node name of disk `index`'s format layer (what the device is attached to).
pub fn disk_format_node(index: usize) -> String {
    format!("drive{index}-fmt")
}

fn size_arg(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes.is_multiple_of(MIB) {
        format!("{}M", bytes / MIB)
    } else {
        format!("{bytes}")
    }
}

/// `-object memory-backend-*` for hugepages and guest NUMA nodes, and the
/// `-numa node` options. Hugepages: `memory-backend-file` on the hugetlbfs
/// mount, `prealloc=on` (every page is taken at start, so a short pool
/// fails the launch instead of the guest later) and `share=off` (a private
/// mapping: nothing else maps guest RAM).
fn memory_backends(a: &mut Argv, cfg: &VmConfig) {
    let backend = |id: &str, bytes: u64, host_node: Option<u32>| {
        let mut o = match &cfg.hugepages {
            Some(h) => format!(
                "memory-backend-file,id={id},size={},mem-path={},share=off,prealloc=on",
                size_arg(bytes),
                esc_path(&h.mount)
            ),
            None => format!("memory-backend-ram,id={id},size={}", size_arg(bytes)),
        };
        if let Some(n) = host_node {
            o.push_str(&format!(",host-nodes={n},policy=bind"));
        }
        o
    };
    if cfg.numa_nodes.is_empty() {
        if cfg.hugepages.is_some() {
            a.opt("-object", backend("mem0", cfg.memory_bytes, None));
        }
        return;
    }
    for (i, n) in cfg.numa_nodes.iter().enumerate() {
        a.opt(
            "-object",
            backend(&format!("mem{i}"), n.memory_bytes, n.host_node),
        );
    }
    for (i, n) in cfg.numa_nodes.iter().enumerate() {
        let mut o = format!("node,nodeid={i}");
        for v in &n.vcpus {
            o.push_str(&format!(",cpus={v}"));
        }
        o.push_str(&format!(",memdev=mem{i}"));
        a.opt("-numa", o);
    }
}

/// The complete QEMU argument vector (without the program name).
///
/// Pure and deterministic. Expects a config that passed
/// [`VmConfig::validate`]; for one that did not, the result is still
/// deterministic but QEMU may refuse it.
pub fn qemu_argv(cfg: &VmConfig) -> Vec<String> {
    let mut a = Argv::default();

    a.opt(
        "-name",
        format!("guest={},debug-threads=on", escape_opt(&cfg.name)),
    );
    a.opt("-uuid", &cfg.uuid);

    let mut machine = cfg.machine.qemu_name().to_string();
    if matches!(cfg.firmware, Firmware::Uefi { .. }) {
        machine.push_str(",pflash0=fw-code,pflash1=fw-vars");
    }
    // Hugepages without NUMA nodes: one backend for all of RAM.
    if cfg.hugepages.is_some() && cfg.numa_nodes.is_empty() {
        machine.push_str(",memory-backend=mem0");
    }
    a.opt("-machine", machine);
    a.opt("-accel", cfg.accel.qemu_name());
    let cpu = match (&cfg.cpu.model, cfg.accel) {
        (CpuModel::HostPassthrough, Accel::Kvm) => "host".to_string(),
        // `host` needs KVM; `max` is TCG's closest equivalent.
        (CpuModel::HostPassthrough, Accel::Tcg) | (CpuModel::Max, _) => "max".to_string(),
        (CpuModel::Named(name), _) => escape_opt(name).into_owned(),
    };
    a.opt("-cpu", cpu);
    let vcpus = cfg
        .cpu
        .sockets
        .saturating_mul(cfg.cpu.cores)
        .saturating_mul(cfg.cpu.threads);
    a.opt(
        "-smp",
        format!(
            "cpus={vcpus},sockets={},cores={},threads={}",
            cfg.cpu.sockets, cfg.cpu.cores, cfg.cpu.threads
        ),
    );
    const MIB: u64 = 1024 * 1024;
    if cfg.memory_bytes.is_multiple_of(MIB) {
        a.opt("-m", format!("{}M", cfg.memory_bytes / MIB));
    } else {
        a.opt("-m", format!("{}B", cfg.memory_bytes));
    }
    memory_backends(&mut a, cfg);

    a.flag("-nodefaults");
    a.flag("-no-user-config");
    a.opt("-display", "none");
    a.opt("-vga", "none");
    a.flag("-no-shutdown");
    if cfg.start_paused {
        a.flag("-S");
    }
    if cfg.incoming {
        // The address comes later over QMP (`migrate-incoming`), once the
        // agent has chosen it and set the migration capabilities.
        a.opt("-incoming", "defer");
    }

    a.opt("-chardev", qmp_chardev(&cfg.run.qmp_socket));
    a.opt("-mon", "chardev=qmp,mode=control");
    a.opt(
        "-chardev",
        format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            esc_path(&cfg.run.serial_socket),
            esc_path(&cfg.run.console_log)
        ),
    );
    a.opt("-serial", "chardev:serial0");

    if let Firmware::Uefi { code, vars } = &cfg.firmware {
        a.opt(
            "-blockdev",
            format!(
                "driver=file,node-name=fw-code-file,filename={},read-only=on",
                esc_path(code)
            ),
        );
        a.opt(
            "-blockdev",
            "driver=raw,node-name=fw-code,file=fw-code-file,read-only=on",
        );
        a.opt(
            "-blockdev",
            format!(
                "driver=file,node-name=fw-vars-file,filename={}",
                esc_path(vars)
            ),
        );
        a.opt(
            "-blockdev",
            "driver=raw,node-name=fw-vars,file=fw-vars-file",
        );
    }

    if let Some(k) = &cfg.kernel_boot {
        a.opt("-kernel", path_str(&k.kernel));
        if let Some(initrd) = &k.initrd {
            a.opt("-initrd", path_str(initrd));
        }
        if let Some(cmdline) = &k.cmdline {
            a.opt("-append", cmdline);
        }
    }

    let microvm = cfg.machine == Machine::Microvm;
    if cfg.disks.iter().any(|d| d.bus == DiskBus::Scsi) {
        let ctrl = if microvm {
            "virtio-scsi-device"
        } else {
            "virtio-scsi-pci"
        };
        a.opt("-device", format!("{ctrl},id=scsi0"));
    }
    // q35 has an AHCI controller built in (buses ide.0 .. ide.5); pc has
    // PIIX IDE only, so it gets its own AHCI controller.
    let sata_bus = if cfg.machine == Machine::Pc {
        if cfg.disks.iter().any(|d| d.bus == DiskBus::Sata) {
            a.opt("-device", "ich9-ahci,id=sata0");
        }
        "sata0"
    } else {
        "ide"
    };

    let mut sata_port = 0usize;
    let mut scsi_target = 0usize;
    for (i, d) in cfg.disks.iter().enumerate() {
        disk_args(&mut a, i, d);
        let mut dev = match d.bus {
            DiskBus::Virtio => {
                let model = if microvm {
                    "virtio-blk-device"
                } else {
                    "virtio-blk-pci"
                };
                format!("{model},id={}", d.device_id())
            }
            DiskBus::Sata => {
                let s = format!("ide-hd,id={},bus={sata_bus}.{sata_port}", d.device_id());
                sata_port += 1;
                s
            }
            DiskBus::Scsi => {
                let s = format!(
                    "scsi-hd,id={},bus=scsi0.0,channel=0,scsi-id={scsi_target},lun=0",
                    d.device_id()
                );
                scsi_target += 1;
                s
            }
        };
        dev.push_str(&format!(",drive={}", disk_format_node(i)));
        if let Some(b) = d.boot_index {
            dev.push_str(&format!(",bootindex={b}"));
        }
        if let Some(serial) = &d.serial {
            dev.push_str(&format!(",serial={}", escape_opt(serial)));
        }
        let write_cache = match d.cache {
            DiskCache::None | DiskCache::Writeback => "on",
            DiskCache::Writethrough => "off",
        };
        dev.push_str(&format!(",write-cache={write_cache}"));
        a.opt("-device", dev);
    }

    for n in &cfg.nics {
        nic_args(&mut a, n, microvm);
    }

    if cfg.rng {
        a.opt("-object", "rng-random,id=objrng0,filename=/dev/urandom");
        let model = if microvm {
            "virtio-rng-device"
        } else {
            "virtio-rng-pci"
        };
        a.opt("-device", format!("{model},id=rng0,rng=objrng0"));
    }

    // Spare PCIe root ports for hot-plug (`device_add ...,bus=hotplugN`).
    if cfg.machine == Machine::Q35 {
        for i in 0..cfg.hotplug_slots {
            a.opt(
                "-device",
                format!(
                    "pcie-root-port,id=hotplug{i},chassis={},bus=pcie.0",
                    100 + i
                ),
            );
        }
    }
    a.opt("-sandbox", SANDBOX);
    a.opt("-pidfile", path_str(&cfg.run.pidfile));
    a.0
}

fn disk_args(a: &mut Argv, i: usize, d: &DiskConfig) {
    let cache = match d.cache {
        DiskCache::None => "cache.direct=on,cache.no-flush=off",
        DiskCache::Writeback | DiskCache::Writethrough => "cache.direct=off,cache.no-flush=off",
    };
    // Backing chain, farthest first so every node exists before it is named.
    for (j, b) in d.backing.iter().enumerate().rev() {
        let file = format!("drive{i}-b{j}-file");
        let fmt = format!("drive{i}-b{j}-fmt");
        a.opt(
            "-blockdev",
            format!(
                "driver=file,node-name={file},filename={},{cache},read-only=on",
                esc_path(&b.path)
            ),
        );
        let mut s = format!(
            "driver={},node-name={fmt},file={file},{cache},read-only=on",
            b.format.qemu_driver()
        );
        if b.format == DiskFormat::Qcow2 && j + 1 < d.backing.len() {
            s.push_str(&format!(",backing=drive{i}-b{}-fmt", j + 1));
        }
        a.opt("-blockdev", s);
    }
    let access = if d.read_only {
        "read-only=on"
    } else {
        "read-only=off,discard=unmap"
    };
    let file = format!("drive{i}-file");
    match &d.rbd {
        None => a.opt(
            "-blockdev",
            format!(
                "driver=file,node-name={file},filename={},{cache},{access}",
                esc_path(&d.path)
            ),
        ),
        Some(r) => a.opt(
            "-blockdev",
            format!(
                "driver=rbd,node-name={file},{},{cache},{access}",
                rbd_opts(r)
            ),
        ),
    }
    let mut s = format!(
        "driver={},node-name={},file={file},{cache},{access}",
        d.format.qemu_driver(),
        disk_format_node(i)
    );
    if !d.backing.is_empty() {
        s.push_str(&format!(",backing=drive{i}-b0-fmt"));
    }
    a.opt("-blockdev", s);
}

/// `pool=…,image=…[,conf=…][,user=…][,server.N.host=…,server.N.port=…]`
/// of QEMU's `rbd` block driver.
fn rbd_opts(r: &RbdDisk) -> String {
    let mut s = format!(
        "pool={},image={}",
        escape_opt(&r.pool),
        escape_opt(&r.image)
    );
    if let Some(c) = &r.conf {
        s.push_str(&format!(",conf={}", esc_path(c)));
    }
    if let Some(u) = &r.user {
        s.push_str(&format!(",user={}", escape_opt(u)));
    }
    for (n, m) in r.monitors.iter().enumerate() {
        if let Some((host, port)) = split_monitor(m) {
            s.push_str(&format!(
                ",server.{n}.host={},server.{n}.port={port}",
                escape_opt(host)
            ));
        }
    }
    s
}

fn nic_args(a: &mut Argv, n: &NicConfig, microvm: bool) {
    match &n.backend {
        NicBackend::User {
            net,
            host,
            dhcp_start,
            hostfwd,
        } => {
            let mut s = format!(
                "user,id={},net={},host={},dhcpstart={}",
                n.netdev_id(),
                escape_opt(net),
                escape_opt(host),
                escape_opt(dhcp_start)
            );
            for f in hostfwd {
                let addr = f.host_addr.map(|ip| ip.to_string()).unwrap_or_default();
                s.push_str(&format!(
                    ",hostfwd={}:{addr}:{}-:{}",
                    f.proto.as_str(),
                    f.host_port,
                    f.guest_port
                ));
            }
            a.opt("-netdev", s);
        }
        NicBackend::Tap { ifname } => {
            // Validated to [A-Za-z0-9_-]{1,15}: nothing to escape.
            a.opt(
                "-netdev",
                format!(
                    "tap,id={},ifname={ifname},script=no,downscript=no,vnet_hdr=on",
                    n.netdev_id()
                ),
            );
        }
    }
    let model = match (n.model, microvm) {
        (NicModel::Virtio, true) => "virtio-net-device",
        (NicModel::Virtio, false) => "virtio-net-pci",
        (NicModel::E1000, _) => "e1000",
        (NicModel::E1000e, _) => "e1000e",
        (NicModel::Rtl8139, _) => "rtl8139",
    };
    a.opt(
        "-device",
        format!(
            "{model},id={},netdev={},mac={}",
            n.device_id(),
            n.netdev_id(),
            escape_opt(&n.mac)
        ),
    );
}

#[derive(Default)]
struct Argv(Vec<String>);

impl Argv {
    fn flag(&mut self, f: &str) {
        self.0.push(f.to_string());
    }

    fn opt(&mut self, name: &str, value: impl AsRef<str>) {
        self.0.push(name.to_string());
        self.0.push(value.as_ref().to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(escape_opt("plain"), "plain");
        assert!(matches!(escape_opt("plain"), Cow::Borrowed(_)));
        assert_eq!(escape_opt("a,b"), "a,,b");
        assert_eq!(escape_opt(",,"), ",,,,");
        assert_eq!(escape_opt("x=y, z"), "x=y,, z");
        assert_eq!(escape_opt(""), "");
    }
}
