//! A real Linux guest (the host's Debian kernel plus a tiny busybox
//! initramfs built here) to exercise the paths that need guest
//! cooperation: the ACPI power button, `-no-shutdown` and the console log.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{eventually, idle_vm, launch_guarded, tempdir, uid};
use krvirt_hypervisor::{KernelBoot, RunState, StopOutcome, VmConfig};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
insmod /evdev.ko
insmod /button.ko
case "$(cat /proc/cmdline)" in
  *krvirt.test=poweroff*)
    echo KRVIRT-GUEST-POWEROFF
    poweroff -f ;;
esac
n=0
while [ ! -e /dev/input/event0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
for e in /dev/input/event*; do
  ( head -c 1 "$e" >/dev/null; echo KRVIRT-POWER-BUTTON; poweroff -f ) &
done
sleep 1
echo KRVIRT-GUEST-READY
while true; do sleep 60; done
"#;

/// Appends one entry to a newc cpio archive.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let namesize = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0,
        0,
        1,
        0,
        data.len(),
        0,
        0,
        rdev.0,
        rdev.1,
        0
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn kernel_release() -> (PathBuf, String) {
    let mut kernels: Vec<PathBuf> = fs::read_dir("/boot")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    let k = kernels
        .pop()
        .expect("a Debian kernel in /boot (package linux-image-cloud-amd64)");
    let release = k
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    (k, release)
}

fn build_initramfs(path: &Path, release: &str) {
    let busybox = fs::read("/bin/busybox").expect("busybox-static must be installed");
    let module = |rel: &str| {
        let p = Path::new("/lib/modules").join(release).join(rel);
        fs::read(&p).unwrap_or_else(|e| panic!("kernel module {}: {e}", p.display()))
    };
    let mut out = Vec::new();
    let mut ino = 1;
    let mut add = |out: &mut Vec<u8>, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        cpio_entry(out, ino, name, mode, rdev, data);
        ino += 1;
    };
    for d in ["bin", "dev", "proc", "sys"] {
        add(&mut out, d, 0o040755, (0, 0), &[]);
    }
    add(&mut out, "dev/console", 0o020600, (5, 1), &[]);
    add(&mut out, "init", 0o100755, (0, 0), INIT.as_bytes());
    add(&mut out, "bin/busybox", 0o100755, (0, 0), &busybox);
    add(
        &mut out,
        "evdev.ko",
        0o100644,
        (0, 0),
        &module("kernel/drivers/input/evdev.ko"),
    );
    add(
        &mut out,
        "button.ko",
        0o100644,
        (0, 0),
        &module("kernel/drivers/acpi/button.ko"),
    );
    add(&mut out, "TRAILER!!!", 0, (0, 0), &[]);
    fs::write(path, out).unwrap();
}

fn guest_vm(root: &Path, name: &str, mode: &str) -> VmConfig {
    let (kernel, release) = kernel_release();
    let initrd = root.join("initramfs.cpio");
    build_initramfs(&initrd, &release);
    let mut cfg = idle_vm(root, name, &uid(name));
    cfg.memory_bytes = 256 * 1024 * 1024;
    cfg.kernel_boot = Some(KernelBoot {
        kernel,
        initrd: Some(initrd),
        cmdline: Some(format!("console=ttyS0 panic=-1 krvirt.test={mode}")),
    });
    cfg
}

fn console(cfg: &VmConfig) -> String {
    fs::read(&cfg.run.console_log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_button_shuts_the_guest_down() {
    common::qemu();
    let tmp = tempdir();
    let cfg = guest_vm(tmp.path(), "acpi", "acpi");
    let (h, _g) = launch_guarded(&cfg).await;
    // The console log is written by QEMU with no client connected.
    eventually("guest ready on the console log", BOOT_TIMEOUT, || {
        console(&cfg).contains("KRVIRT-GUEST-READY")
    })
    .await;
    assert!(console(&cfg).contains("Linux version"));

    let out = h.graceful_stop(Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        out,
        StopOutcome::GuestShutdown,
        "console:\n{}",
        console(&cfg)
    );
    assert!(console(&cfg).contains("KRVIRT-POWER-BUTTON"));
    assert!(!h.is_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_poweroff_leaves_qemu_in_shutdown_state() {
    common::qemu();
    let tmp = tempdir();
    let cfg = guest_vm(tmp.path(), "poweroff", "poweroff");
    let (h, _g) = launch_guarded(&cfg).await;
    let mut events = h.qmp().subscribe_events();
    let ev = tokio::time::timeout(BOOT_TIMEOUT, async {
        loop {
            match events.recv().await {
                Ok(ev) if ev.event == "SHUTDOWN" => return ev,
                Ok(_) => {}
                Err(e) => panic!("event stream ended: {e}\nconsole:\n{}", console(&cfg)),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("guest did not power off; console:\n{}", console(&cfg)));
    assert_eq!(ev.data["guest"], serde_json::json!(true), "{ev:?}");
    assert_eq!(
        ev.data["reason"],
        serde_json::json!("guest-shutdown"),
        "{ev:?}"
    );

    // -no-shutdown: QEMU is still there, in state "shutdown": the agent can
    // tell a clean guest power-off from a crash.
    assert!(h.is_alive());
    assert_eq!(h.status().await.unwrap(), RunState::Shutdown);
    assert!(console(&cfg).contains("KRVIRT-GUEST-POWEROFF"));

    let out = h.graceful_stop(Duration::from_secs(30)).await.unwrap();
    assert_eq!(out, StopOutcome::GuestShutdown);
    assert!(!h.is_alive());
}
