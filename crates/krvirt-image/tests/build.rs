//! Structure of the built demo images, checked with independent tools
//! (mtools for the FAT partition, busybox cpio for the initramfs).

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use krvirt_image::guest::{DEFAULT_CMDLINE, resolve_inputs};
use krvirt_image::{GuestBuildOptions, build_demo_images};

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (install mtools / busybox-static): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn disk_initramfs_and_kernel_boot_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = GuestBuildOptions::default();
    let inputs = resolve_inputs(&opts).expect(
        "guest inputs missing (linux-image-cloud-amd64, busybox-static, syslinux, syslinux-efi, mtools)",
    );
    let images = build_demo_images(tmp.path(), &opts).expect("build demo images");
    assert_eq!(images.cmdline, DEFAULT_CMDLINE);
    assert_eq!(images.kernel_version, inputs.kernel_version);

    // Kernel-boot layout: the same kernel and initramfs the disk carries.
    assert_eq!(
        images.kernel,
        images.kernel_boot_root.join("boot/vmlinuz-virt")
    );
    assert_eq!(
        images.initramfs,
        images.kernel_boot_root.join("boot/initramfs-virt")
    );
    let kernel = std::fs::read(&images.kernel).unwrap();
    assert_eq!(kernel, std::fs::read(&inputs.kernel).unwrap());
    let initramfs = std::fs::read(&images.initramfs).unwrap();

    // MBR: syslinux boot code, one active partition at 1 MiB.
    let disk = std::fs::read(&images.disk).unwrap();
    let mbr_code = std::fs::read(&inputs.syslinux_mbr).unwrap();
    assert_eq!(&disk[..64], &mbr_code[..64]);
    assert_eq!(&disk[510..512], &[0x55, 0xaa]);
    let entry = &disk[446..462];
    assert_eq!(entry[0], 0x80, "partition not active");
    assert!(
        matches!(entry[4], 0x01 | 0x0e | 0x0c),
        "type {:#x}",
        entry[4]
    );
    let start = u32::from_le_bytes(entry[8..12].try_into().unwrap());
    let sectors = u32::from_le_bytes(entry[12..16].try_into().unwrap());
    assert_eq!(start, 2048);
    assert_eq!(
        (u64::from(start) + u64::from(sectors)) * 512,
        disk.len() as u64
    );
    assert!(
        disk.len() < 24 << 20,
        "disk image grew to {} bytes",
        disk.len()
    );
    // Boot sector of the partition: syslinux installed, hidden sectors = start.
    let bs = &disk[1 << 20..(1 << 20) + 512];
    assert_eq!(&bs[3..11], b"SYSLINUX");
    assert_eq!(u32::from_le_bytes(bs[0x1c..0x20].try_into().unwrap()), 2048);

    let part = format!("{}@@1M", images.disk.display());
    let listing =
        String::from_utf8(run(Command::new("mdir").args(["-a", "-i", &part, "::"]))).unwrap();
    for f in [
        "ldlinux  sys",
        "ldlinux  c32",
        "vmlinuz",
        "initrd",
        "syslinux cfg",
    ] {
        assert!(
            listing.to_lowercase().contains(f),
            "{f} missing from\n{listing}"
        );
    }
    assert!(listing.contains("KRVIRTBOOT"), "{listing}");
    let cfg = String::from_utf8(run(Command::new("mtype").args([
        "-i",
        &part,
        "::syslinux.cfg",
    ])))
    .unwrap();
    assert!(cfg.contains(&format!("APPEND {DEFAULT_CMDLINE}")), "{cfg}");
    let efi_cfg = run(Command::new("mtype").args(["-i", &part, "::EFI/BOOT/syslinux.cfg"]));
    assert_eq!(efi_cfg, cfg.as_bytes());
    let efi = run(Command::new("mtype").args(["-i", &part, "::EFI/BOOT/BOOTX64.EFI"]));
    assert_eq!(efi, std::fs::read(&inputs.syslinux_efi).unwrap());
    let vmlinuz = run(Command::new("mtype").args(["-i", &part, "::vmlinuz"]));
    assert_eq!(vmlinuz, kernel);
    let initrd = run(Command::new("mtype").args(["-i", &part, "::initrd.gz"]));
    assert_eq!(initrd, initramfs);

    // Initramfs: gzip'd newc that busybox cpio lists.
    let mut cpio = Vec::new();
    flate2::read::GzDecoder::new(&initramfs[..])
        .read_to_end(&mut cpio)
        .expect("initramfs is gzip");
    assert_eq!(&cpio[..6], b"070701");
    let mut child = Command::new("/bin/busybox")
        .args(["cpio", "-t"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("busybox-static needed");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&cpio));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let names: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let kmod = format!("lib/modules/{}", inputs.kernel_version);
    for want in [
        "init".to_string(),
        "bin/busybox".into(),
        "bin/sh".into(),
        "sbin/init".into(),
        "dev/console".into(),
        "etc/inittab".into(),
        "etc/udhcpc/default.script".into(),
        "etc/acpi/PWRF/00000080".into(),
        format!("{kmod}/krvirt.load-order"),
        format!("{kmod}/modules.dep"),
        format!("{kmod}/kernel/drivers/block/virtio_blk.ko"),
        format!("{kmod}/kernel/drivers/virtio/virtio_pci.ko"),
        format!("{kmod}/kernel/fs/fat/vfat.ko"),
        format!("{kmod}/kernel/drivers/acpi/button.ko"),
    ] {
        assert!(names.contains(&want), "{want} missing from initramfs");
    }
    // Load order: every dependency before its user.
    assert_eq!(
        inputs
            .modules
            .iter()
            .position(|m| m.ends_with("virtio.ko"))
            .map(|i| i < inputs
                .modules
                .iter()
                .position(|m| m.ends_with("virtio_blk.ko"))
                .unwrap()),
        Some(true)
    );
}
