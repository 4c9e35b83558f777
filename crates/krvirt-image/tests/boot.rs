//! Boot the demo guest under QEMU/TCG and check what it does: markers on
//! the serial console, NoCloud seed handling, DHCP, user-data, ticks, the
//! console shell, ACPI power button and poweroff.
//!
//! Needs qemu-system-x86_64, the Debian cloud kernel + modules, busybox-static
//! and syslinux/mtools; fails loudly when any of them is missing.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Boot, Qemu, VmSpec, qemu_lock};
use krvirt_image::{
    DemoImages, GuestBuildOptions, NoCloudSeed, build_demo_images, write_nocloud_seed,
};

fn build(dir: &Path) -> DemoImages {
    build_demo_images(&dir.join("images"), &GuestBuildOptions::default()).unwrap_or_else(|e| {
        panic!(
            "building the demo guest failed: {e}\n(needs linux-image-cloud-amd64, busybox-static, \
             syslinux, syslinux-common, mtools)"
        )
    })
}

fn seed(dir: &Path, hostname: &str, user_data: &str) -> std::path::PathBuf {
    let path = dir.join("cidata.img");
    write_nocloud_seed(
        &path,
        &NoCloudSeed {
            instance_id: format!("{hostname}.default"),
            local_hostname: hostname.into(),
            user_data: Some(user_data.as_bytes().to_vec()),
            network_config: None,
        },
    )
    .expect("write NoCloud seed");
    path
}

fn report(test: &str, marks: &[(&str, Duration)]) {
    let text: Vec<String> = marks
        .iter()
        .map(|(m, d)| format!("{m} {:.2}s", d.as_secs_f64()))
        .collect();
    eprintln!("[boot timing] {test}: {}", text.join(", "));
}

#[test]
fn disk_boot_applies_seed_runs_userdata_and_ticks() {
    let _l = qemu_lock();
    let tmp = tempfile::tempdir().unwrap();
    let images = build(tmp.path());
    assert_eq!(images.disk_format, "raw");
    // $((6*7)) only becomes 42 if the script is executed, not just printed.
    let seed = seed(
        tmp.path(),
        "disk-test-vm",
        "#!/bin/sh\necho \"USERDATA-MARKER $((6*7)) on $(hostname)\"\n",
    );
    let mut vm = Qemu::start(
        tmp.path(),
        &VmSpec {
            boot: Boot::Disk(&images.disk),
            seed: Some(&seed),
            nic: true,
            extra: &[],
            memory_mib: 128,
        },
    );
    let booted = vm.wait_for("GUEST-BOOTED");
    let host = vm.wait_for("HOSTNAME: disk-test-vm");
    let tick0 = vm.wait_for("TICK 0");
    let ip = vm.wait_for("IP eth0 10.0.2.15");
    let ud = vm.wait_for("USERDATA-MARKER 42 on disk-test-vm");
    let tick2 = vm.wait_for("TICK 2");
    let console = vm.console();
    assert!(
        console.contains("SYSLINUX"),
        "did not boot through syslinux:\n{console}"
    );
    assert!(
        console.contains("INSTANCE-ID: disk-test-vm.default"),
        "{console}"
    );
    assert!(
        console.contains("USERDATA: script exited with status 0"),
        "{console}"
    );
    assert!(
        !console.contains("insmod"),
        "a module failed to load:\n{console}"
    );
    report(
        "disk boot",
        &[
            ("GUEST-BOOTED", booted),
            ("HOSTNAME", host),
            ("TICK 0", tick0),
            ("IP", ip),
            ("userdata", ud),
            ("TICK 2", tick2),
        ],
    );
}

#[test]
fn kernel_boot_with_cloud_config_and_console_shell() {
    let _l = qemu_lock();
    let tmp = tempfile::tempdir().unwrap();
    let images = build(tmp.path());
    let seed = seed(
        tmp.path(),
        "ignored-by-cloud-config",
        "#cloud-config\nhostname: cc-host\npackages: [nginx]\nruncmd:\n  - echo \"RUNCMD $((20+1))\"\n  - [ls, /]\n- 'echo second-item'\n",
    );
    let mut vm = Qemu::start(
        tmp.path(),
        &VmSpec {
            // KubeVirt's vmi-kernel-boot.yaml passes kernelArgs "console=ttyS0".
            boot: Boot::Kernel {
                kernel: &images.kernel,
                initrd: &images.initramfs,
                append: "console=ttyS0",
            },
            seed: Some(&seed),
            nic: false,
            extra: &[],
            memory_mib: 128,
        },
    );
    let booted = vm.wait_for("GUEST-BOOTED");
    vm.wait_for("HOSTNAME: ignored-by-cloud-config");
    let cc = vm.wait_for("CLOUD-CONFIG: this guest has no cloud-init");
    vm.wait_for("HOSTNAME: cc-host");
    vm.wait_for("RUNCMD 21");
    vm.wait_for("second-item");
    vm.wait_for("CLOUD-CONFIG: skipping list-form runcmd item: [ls, /]");
    vm.wait_for("NET: no eth* interfaces");
    let tick2 = vm.wait_for("TICK 2");
    // The console shell: a command typed on the serial line runs...
    vm.wait_for("root@cc-host:~#");
    vm.type_line("echo SHELL-$((40+2)); hostname");
    let shell = vm.wait_for("SHELL-42");
    // ...and after `exit` a fresh shell is respawned.
    vm.type_line("exit");
    vm.type_line("echo AGAIN-$((1+1))");
    vm.wait_for("AGAIN-2");
    report(
        "kernel boot",
        &[
            ("GUEST-BOOTED", booted),
            ("cloud-config", cc),
            ("TICK 2", tick2),
            ("shell", shell),
        ],
    );
}

#[test]
fn no_seed_no_nic_still_boots() {
    let _l = qemu_lock();
    let tmp = tempfile::tempdir().unwrap();
    let images = build(tmp.path());
    let mut vm = Qemu::start(
        tmp.path(),
        &VmSpec {
            boot: Boot::Kernel {
                kernel: &images.kernel,
                initrd: &images.initramfs,
                append: &images.cmdline,
            },
            seed: None,
            nic: false,
            extra: &[],
            memory_mib: 128,
        },
    );
    let booted = vm.wait_for("GUEST-BOOTED");
    vm.wait_for("NOCLOUD: no cidata seed found");
    vm.wait_for("HOSTNAME: krvirt-demo");
    vm.wait_for("USERDATA: none");
    let tick1 = vm.wait_for("TICK 1");
    report("no seed", &[("GUEST-BOOTED", booted), ("TICK 1", tick1)]);
}

#[test]
fn qmp_system_powerdown_powers_guest_off() {
    let _l = qemu_lock();
    let tmp = tempfile::tempdir().unwrap();
    let images = build(tmp.path());
    let seed = seed(
        tmp.path(),
        "powerdown-vm",
        "#!/bin/sh\necho ready-for-powerdown\n",
    );
    let mut vm = Qemu::start(
        tmp.path(),
        &VmSpec {
            boot: Boot::Disk(&images.disk),
            seed: Some(&seed),
            nic: false,
            extra: &[],
            memory_mib: 128,
        },
    );
    // acpid is started before the seed is read, so it is listening by now.
    vm.wait_for("ready-for-powerdown");
    vm.wait_for("TICK 0");
    let reply = vm.qmp("system_powerdown");
    assert!(reply.contains("\"return\""), "system_powerdown: {reply}");
    let sent = std::time::Instant::now();
    vm.wait_for("POWER-BUTTON: powering off");
    vm.wait_for("GUEST-SHUTDOWN");
    let status = vm.wait_exit(Duration::from_secs(30));
    let took = sent.elapsed();
    assert!(status.success(), "QEMU exit status {status}");
    assert!(
        took < Duration::from_secs(15),
        "clean poweroff took {took:?}"
    );
    report("system_powerdown", &[("QEMU exited after", took)]);
}

#[test]
fn userdata_poweroff_stops_guest() {
    let _l = qemu_lock();
    let tmp = tempfile::tempdir().unwrap();
    let images = build(tmp.path());
    let seed = seed(
        tmp.path(),
        "poweroff-vm",
        "#!/bin/sh\necho \"GOING-DOWN $((2+3))\"\npoweroff -f\n",
    );
    let mut vm = Qemu::start(
        tmp.path(),
        &VmSpec {
            boot: Boot::Kernel {
                kernel: &images.kernel,
                initrd: &images.initramfs,
                append: &images.cmdline,
            },
            seed: Some(&seed),
            nic: false,
            extra: &[],
            memory_mib: 128,
        },
    );
    let down = vm.wait_for("GOING-DOWN 5");
    let status = vm.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "QEMU exit status {status}");
    report(
        "userdata poweroff -f",
        &[("marker", down), ("QEMU exited", vm.started.elapsed())],
    );
}

#[test]
fn iso9660_seed_on_scsi_cdrom() {
    let _l = qemu_lock();
    let tmp = tempfile::tempdir().unwrap();
    let images = build(tmp.path());
    // KubeVirt builds NoCloud seeds as ISO9660 volumes labelled cidata.
    let src = tmp.path().join("iso-src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(
        src.join("meta-data"),
        "{\"instance-id\": \"iso-vm.ns\", \"local-hostname\": \"iso-vm\"}\n",
    )
    .unwrap();
    std::fs::write(
        src.join("user-data"),
        "#!/bin/sh\necho \"ISO-USERDATA $((5*5))\"\n",
    )
    .unwrap();
    let iso = tmp.path().join("cidata.iso");
    let out = std::process::Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-V", "cidata", "-J", "-r", "-o"])
        .arg(&iso)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run xorriso (apt-get install xorriso): {e}"));
    assert!(
        out.status.success(),
        "xorriso: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drive = format!(
        "file={},format=raw,if=none,id=cd0,readonly=on",
        iso.display()
    );
    let mut vm = Qemu::start(
        tmp.path(),
        &VmSpec {
            boot: Boot::Kernel {
                kernel: &images.kernel,
                initrd: &images.initramfs,
                append: &images.cmdline,
            },
            seed: None,
            nic: false,
            extra: &[
                "-device",
                "virtio-scsi-pci,id=scsi0",
                "-drive",
                &drive,
                "-device",
                "scsi-cd,drive=cd0,bus=scsi0.0",
            ],
            memory_mib: 128,
        },
    );
    let booted = vm.wait_for("GUEST-BOOTED");
    vm.wait_for("NOCLOUD: seed /dev/sr0");
    vm.wait_for("INSTANCE-ID: iso-vm.ns");
    let host = vm.wait_for("HOSTNAME: iso-vm");
    vm.wait_for("ISO-USERDATA 25");
    report("iso seed", &[("GUEST-BOOTED", booted), ("HOSTNAME", host)]);
}

#[test]
fn uefi_disk_boot() {
    let _l = qemu_lock();
    let tmp = tempfile::tempdir().unwrap();
    let images = build(tmp.path());
    // vmi-alpine-efi.yaml boots a containerDisk with firmware.bootloader.efi.
    let seed = seed(
        tmp.path(),
        "efi-vm",
        "#!/bin/sh\necho \"EFI-USERDATA $((7*7))\"\n",
    );
    let mut vm = Qemu::start(
        tmp.path(),
        &VmSpec {
            boot: Boot::DiskUefi(&images.disk),
            seed: Some(&seed),
            nic: false,
            extra: &[],
            // syslinux.efi 6.04 cannot place the kernel below ~224 MiB.
            memory_mib: 256,
        },
    );
    let booted = vm.wait_for("GUEST-BOOTED");
    let host = vm.wait_for("HOSTNAME: efi-vm");
    vm.wait_for("EFI-USERDATA 49");
    let tick1 = vm.wait_for("TICK 1");
    assert!(
        !vm.console().contains("SYSLINUX 6"),
        "expected the UEFI loader, not BIOS syslinux"
    );
    report(
        "uefi disk boot",
        &[
            ("GUEST-BOOTED", booted),
            ("HOSTNAME", host),
            ("TICK 1", tick1),
        ],
    );
}
