//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use krvirt_hypervisor::{
    Accel, CpuConfig, CpuModel, Firmware, Machine, QemuHandle, RunPaths, VmConfig, launch,
    qemu_binary, qemu_version,
};

/// The QEMU binary under test; panics loudly if it does not run.
pub fn qemu() -> PathBuf {
    let bin = qemu_binary();
    if let Err(e) = qemu_version(&bin) {
        panic!(
            "these tests need QEMU ({}; set KRVIRT_QEMU to override): {e}",
            bin.display()
        );
    }
    bin
}

/// A temp dir for one test (removed on drop).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("krvirt-hv-")
        .tempdir()
        .expect("create temp dir")
}

/// A unique VMI-uid-like marker.
pub fn uid(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "uid-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A TCG VM with no devices: it sits in SeaBIOS ("no bootable device").
pub fn idle_vm(root: &Path, name: &str, uid: &str) -> VmConfig {
    VmConfig {
        name: name.to_string(),
        uuid: "5b0f0c52-1c1d-4c43-8d5c-2f3e4a5b6c7d".to_string(),
        machine: Machine::Q35,
        accel: Accel::Tcg,
        cpu: CpuConfig {
            model: CpuModel::Max,
            sockets: 1,
            cores: 1,
            threads: 1,
        },
        memory_bytes: 64 * 1024 * 1024,
        hugepages: None,
        numa_nodes: vec![],
        disks: vec![],
        nics: vec![],
        kernel_boot: None,
        firmware: Firmware::Bios,
        rng: false,
        start_paused: false,
        incoming: false,
        hotplug_slots: 0,
        resources: Default::default(),
        run: RunPaths::in_dir(root.join("run/vmi").join(uid)),
    }
}

/// Kills a QEMU on drop (even when the test panics), but only if its
/// command line still carries `marker` (no stray kills after pid reuse).
pub struct QemuGuard {
    pub pid: u32,
    pub marker: String,
}

impl QemuGuard {
    pub fn new(h: &QemuHandle, marker: impl Into<String>) -> QemuGuard {
        QemuGuard {
            pid: h.pid(),
            marker: marker.into(),
        }
    }
}

pub fn cmdline_contains(pid: u32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(marker))
        .unwrap_or(false)
}

/// Alive and not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if pid_alive(self.pid) && cmdline_contains(self.pid, &self.marker) {
            // SAFETY: kill(2) on a pid verified above to be our QEMU.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while pid_alive(self.pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The marker is the run directory: drop the VM's cgroup too.
        let _ = krvirt_hypervisor::release(&RunPaths::in_dir(&self.marker));
    }
}

/// Launches `cfg` and returns the handle with a kill-on-drop guard keyed
/// on the run directory.
pub async fn launch_guarded(cfg: &VmConfig) -> (QemuHandle, QemuGuard) {
    let h = launch(cfg, &qemu())
        .await
        .unwrap_or_else(|e| panic!("launch {}: {e}", cfg.name));
    let guard = QemuGuard::new(&h, cfg.run.dir.to_string_lossy().into_owned());
    (h, guard)
}

/// Waits until `f` holds or panics after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
