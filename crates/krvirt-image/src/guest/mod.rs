//! The demo/test guest, built from Debian packages installed on the host:
//! the Debian cloud kernel, its modules and a static busybox.
//!
//! Outputs (see [`DemoImages`]):
//! - an initramfs (newc cpio written here, gzip) with busybox, the virtio,
//!   filesystem and power-button modules and our `/init`;
//! - a bootable raw disk image (MBR + one FAT partition holding syslinux,
//!   the kernel and the initramfs) - the containerDisk base image. It boots
//!   with BIOS (SeaBIOS -> mbr.bin -> syslinux) and with UEFI (OVMF ->
//!   `\EFI\BOOT\BOOTX64.EFI` = syslinux.efi; unsigned, so not with Secure
//!   Boot); both read the same syslinux.cfg;
//! - a kernel-boot layout (`boot/vmlinuz-virt`, `boot/initramfs-virt`) for
//!   KubeVirt `firmware.kernelBoot.container`.
//!
//! The guest prints `GUEST-BOOTED`, `HOSTNAME: <name>`, `IP <iface> <addr>`
//! and `TICK <n>` on its serial console, runs `#!` user-data from a NoCloud
//! seed, powers off on the ACPI power button and offers a root shell.

mod kernel;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cpio::CpioWriter;
use crate::error::{Error, IoContext, Result};
use crate::fat;

pub use kernel::kernel_version_of;

/// Bump when the guest's content or layout changes: it is part of the
/// cache key of [`ensure_demo_images`].
pub const BUILDER_VERSION: &str = "krvirt-demo-guest/2";

/// Kernel path inside the kernel-boot container layout.
pub const KERNEL_PATH_IN_CONTAINER: &str = "/boot/vmlinuz-virt";
/// Initramfs path inside the kernel-boot container layout.
pub const INITRD_PATH_IN_CONTAINER: &str = "/boot/initramfs-virt";

/// Kernel command line baked into the disk image's syslinux.cfg. `quiet`
/// keeps the kernel's (slow under TCG) serial console output short; other
/// knobs tried (mitigations=off, cryptomgr.notests, tsc=reliable) made no
/// measurable difference.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet";

/// Format of [`DemoImages::disk`].
pub const DISK_FORMAT: &str = "raw";

/// Environment variable overriding the guest kernel.
pub const ENV_KERNEL: &str = "KRVIRT_GUEST_KERNEL";
/// Environment variable overriding the busybox binary.
pub const ENV_BUSYBOX: &str = "KRVIRT_BUSYBOX";
/// Environment variable overriding the module directory (`/lib/modules/<version>`).
pub const ENV_MODULES: &str = "KRVIRT_GUEST_MODULES";
/// Environment variable overriding the syslinux installer.
pub const ENV_SYSLINUX: &str = "KRVIRT_SYSLINUX";

const INIT: &str = include_str!("assets/init.sh");
const INITTAB: &str = include_str!("assets/inittab");
const SHUTDOWN: &str = include_str!("assets/shutdown.sh");
const POWER_BUTTON: &str = include_str!("assets/power-button.sh");
const UDHCPC_SCRIPT: &str = include_str!("assets/udhcpc.script");
const PROFILE: &str = include_str!("assets/profile");
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n";
const GROUP: &str = "root:x:0:\n";

/// Modules the guest loads (with their modules.dep dependencies) and why.
const WANTED_MODULES: &[(&str, &str)] = &[
    ("virtio_pci", "virtio PCI transport"),
    ("virtio_blk", "virtio disks"),
    ("virtio_net", "virtio NICs"),
    ("virtio_scsi", "virtio-scsi disks"),
    ("sd_mod", "SCSI disks"),
    ("sr_mod", "SCSI CD-ROMs"),
    ("virtio_rng", "entropy from the host"),
    ("virtio_balloon", "memory balloon"),
    ("vfat", "vfat NoCloud seed"),
    ("nls_cp437", "vfat default codepage"),
    ("nls_ascii", "vfat default iocharset"),
    ("nls_utf8", "UTF-8 file names"),
    ("isofs", "iso9660 NoCloud seed"),
    ("evdev", "power button events for acpid"),
    ("button", "ACPI power button"),
];

/// Where the builder's inputs come from. `None` means: the environment
/// variable (`KRVIRT_GUEST_KERNEL`, `KRVIRT_BUSYBOX`, `KRVIRT_GUEST_MODULES`,
/// `KRVIRT_SYSLINUX`), else the Debian default location.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestBuildOptions {
    /// bzImage kernel; default newest `/boot/vmlinuz-*-cloud-amd64` (else any `/boot/vmlinuz-*`).
    pub kernel: Option<PathBuf>,
    /// Static busybox; default `/bin/busybox`.
    pub busybox: Option<PathBuf>,
    /// Module tree; default `/lib/modules/<version read from the bzImage header>`.
    pub modules_dir: Option<PathBuf>,
    /// syslinux (mtools flavour) installer; default `syslinux` on `PATH`.
    pub syslinux: Option<PathBuf>,
    /// syslinux MBR boot code; default `/usr/lib/syslinux/mbr/mbr.bin`.
    pub syslinux_mbr: Option<PathBuf>,
    /// Directory with the x86-64 UEFI loader `syslinux.efi` and its core
    /// module `ldlinux.e64`; default: Debian's (syslinux-efi, syslinux-common).
    pub syslinux_efi: Option<PathBuf>,
    /// Kernel command line for the disk image; default [`DEFAULT_CMDLINE`].
    pub cmdline: Option<String>,
}

/// Fully resolved builder inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInputs {
    pub kernel: PathBuf,
    pub kernel_version: String,
    pub busybox: PathBuf,
    pub modules_dir: PathBuf,
    /// Module files relative to `modules_dir`, in load order (dependencies first).
    pub modules: Vec<PathBuf>,
    pub syslinux: PathBuf,
    pub syslinux_mbr: PathBuf,
    /// UEFI loader (`syslinux.efi`).
    pub syslinux_efi: PathBuf,
    /// Its core module (`ldlinux.e64`).
    pub syslinux_efi_core: PathBuf,
    pub cmdline: String,
}

/// Paths of a built demo guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoImages {
    /// Directory holding everything below.
    pub dir: PathBuf,
    /// Bootable disk image (MBR, FAT partition, syslinux), format
    /// [`DISK_FORMAT`]. Boots with BIOS and with UEFI (no Secure Boot); UEFI
    /// boot needs at least 256 MiB of guest RAM (syslinux.efi 6.04 fails to
    /// place the 51 MiB kernel init area in less).
    pub disk: PathBuf,
    /// Always `"raw"`.
    pub disk_format: String,
    /// Root of the kernel-boot container layout (holds `boot/vmlinuz-virt`, `boot/initramfs-virt`).
    pub kernel_boot_root: PathBuf,
    /// The kernel (inside `kernel_boot_root`).
    pub kernel: PathBuf,
    /// The gzip'd newc initramfs (inside `kernel_boot_root`).
    pub initramfs: PathBuf,
    /// Command line the disk image boots with (use it with `-append` too).
    pub cmdline: String,
    /// `uname -r` of the guest kernel.
    pub kernel_version: String,
    /// Hash of the inputs (cache key).
    pub input_hash: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    builder_version: String,
    input_hash: String,
    kernel_version: String,
    cmdline: String,
    disk_format: String,
}

const MANIFEST: &str = "manifest.json";
const DISK_FILE: &str = "disk.img";
const KERNEL_BOOT_DIR: &str = "kernel-boot";

impl DemoImages {
    fn layout(dir: &Path, m: &Manifest) -> DemoImages {
        let root = dir.join(KERNEL_BOOT_DIR);
        DemoImages {
            dir: dir.to_path_buf(),
            disk: dir.join(DISK_FILE),
            disk_format: m.disk_format.clone(),
            kernel: root.join(KERNEL_PATH_IN_CONTAINER.trim_start_matches('/')),
            initramfs: root.join(INITRD_PATH_IN_CONTAINER.trim_start_matches('/')),
            kernel_boot_root: root,
            cmdline: m.cmdline.clone(),
            kernel_version: m.kernel_version.clone(),
            input_hash: m.input_hash.clone(),
        }
    }

    /// Load a completed build from `dir` (written by [`build_demo_images`]).
    pub fn load(dir: &Path) -> Result<DemoImages> {
        let path = dir.join(MANIFEST);
        let text = fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::Invalid {
            field: "demo image manifest",
            reason: format!("{}: {e}", path.display()),
        })?;
        let images = DemoImages::layout(dir, &m);
        for p in [&images.disk, &images.kernel, &images.initramfs] {
            if !p.is_file() {
                return Err(Error::MissingInput {
                    what: "demo image file",
                    path: p.clone(),
                    hint: "the build directory is incomplete; delete it to rebuild",
                });
            }
        }
        Ok(images)
    }
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn require_file(what: &'static str, path: PathBuf, hint: &'static str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingInput { what, path, hint })
    }
}

/// Resolve options, environment and defaults into concrete inputs, checking
/// that everything exists.
pub fn resolve_inputs(opts: &GuestBuildOptions) -> Result<GuestInputs> {
    let kernel = match opts.kernel.clone().or_else(|| env_path(ENV_KERNEL)) {
        Some(k) => require_file(
            "guest kernel",
            k,
            "point KRVIRT_GUEST_KERNEL at a bzImage or install linux-image-cloud-amd64",
        )?,
        None => kernel::default_kernel(Path::new("/boot"))?,
    };
    let kernel_version = kernel_version_of(&kernel)?;
    let busybox = require_file(
        "busybox",
        opts.busybox
            .clone()
            .or_else(|| env_path(ENV_BUSYBOX))
            .unwrap_or_else(|| PathBuf::from("/bin/busybox")),
        "install busybox-static or set KRVIRT_BUSYBOX",
    )?;
    kernel::check_static_x86_64(&busybox)?;
    let modules_dir = opts
        .modules_dir
        .clone()
        .or_else(|| env_path(ENV_MODULES))
        .unwrap_or_else(|| Path::new("/lib/modules").join(&kernel_version));
    require_file(
        "modules.dep",
        modules_dir.join("modules.dep"),
        "the guest kernel's modules must be installed (same Debian package as the kernel) or set KRVIRT_GUEST_MODULES",
    )?;
    let modules = kernel::module_load_order(&modules_dir, WANTED_MODULES)?;
    let syslinux = match opts.syslinux.clone().or_else(|| env_path(ENV_SYSLINUX)) {
        Some(p) => p,
        None => find_in_path("syslinux").unwrap_or_else(|| PathBuf::from("/usr/bin/syslinux")),
    };
    let syslinux = require_file(
        "syslinux installer",
        syslinux,
        "install the Debian packages syslinux, syslinux-common and mtools",
    )?;
    let mbr = match opts.syslinux_mbr.clone() {
        Some(p) => p,
        None => [
            "/usr/lib/syslinux/mbr/mbr.bin",
            "/usr/lib/SYSLINUX/mbr.bin",
            "/usr/share/syslinux/mbr.bin",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/lib/syslinux/mbr/mbr.bin")),
    };
    let syslinux_mbr = require_file(
        "syslinux MBR",
        mbr,
        "install the Debian packages syslinux and syslinux-common",
    )?;
    let efi_hint = "install the Debian packages syslinux-efi and syslinux-common";
    let (syslinux_efi, syslinux_efi_core) = match &opts.syslinux_efi {
        Some(dir) => (dir.join("syslinux.efi"), dir.join("ldlinux.e64")),
        None => (
            PathBuf::from("/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi"),
            PathBuf::from("/usr/lib/syslinux/modules/efi64/ldlinux.e64"),
        ),
    };
    let syslinux_efi = require_file("syslinux UEFI loader", syslinux_efi, efi_hint)?;
    let syslinux_efi_core = require_file("syslinux UEFI core module", syslinux_efi_core, efi_hint)?;
    let cmdline = opts
        .cmdline
        .clone()
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    if cmdline.contains('\n') || cmdline.len() > 2000 {
        return Err(Error::Invalid {
            field: "kernel command line",
            reason: "must be one line of at most 2000 bytes".into(),
        });
    }
    Ok(GuestInputs {
        kernel,
        kernel_version,
        busybox,
        modules_dir,
        modules,
        syslinux,
        syslinux_mbr,
        syslinux_efi,
        syslinux_efi_core,
        cmdline,
    })
}

/// Cache key of the inputs: builder version, guest assets, command line
/// and path, size and mtime of every input file.
pub fn input_hash(inputs: &GuestInputs) -> Result<String> {
    let mut h = Sha256::new();
    let mut put = |s: &[u8]| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s);
    };
    put(BUILDER_VERSION.as_bytes());
    for asset in [
        INIT,
        INITTAB,
        SHUTDOWN,
        POWER_BUTTON,
        UDHCPC_SCRIPT,
        PROFILE,
        PASSWD,
        GROUP,
    ] {
        put(asset.as_bytes());
    }
    for (name, _) in WANTED_MODULES {
        put(name.as_bytes());
    }
    put(inputs.cmdline.as_bytes());
    put(inputs.kernel_version.as_bytes());
    let mut files = vec![
        inputs.kernel.clone(),
        inputs.busybox.clone(),
        inputs.syslinux.clone(),
        inputs.syslinux_mbr.clone(),
        inputs.syslinux_efi.clone(),
        inputs.syslinux_efi_core.clone(),
        inputs.modules_dir.join("modules.dep"),
    ];
    files.extend(inputs.modules.iter().map(|m| inputs.modules_dir.join(m)));
    for f in files {
        let md = fs::metadata(&f).ctx(|| format!("stat {}", f.display()))?;
        let mtime = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        put(f.as_os_str().as_encoded_bytes());
        put(&md.len().to_le_bytes());
        put(&mtime.to_le_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// Build the demo guest into `out` (created if missing; existing files of
/// the same names are replaced).
pub fn build_demo_images(out: &Path, opts: &GuestBuildOptions) -> Result<DemoImages> {
    let inputs = resolve_inputs(opts)?;
    let hash = input_hash(&inputs)?;
    build_with_inputs(out, &inputs, &hash)
}

/// [`ensure_demo_images_with`] with default options (environment and Debian defaults).
pub fn ensure_demo_images(cache_dir: &Path) -> Result<DemoImages> {
    ensure_demo_images_with(cache_dir, &GuestBuildOptions::default())
}

/// Return the cached build for these inputs from `cache_dir`, building it
/// first if needed. Builds go to a private temporary directory that is
/// renamed into place, so concurrent callers (threads or processes) never
/// see a partial build; a loser of the race discards its copy.
pub fn ensure_demo_images_with(cache_dir: &Path, opts: &GuestBuildOptions) -> Result<DemoImages> {
    let inputs = resolve_inputs(opts)?;
    let hash = input_hash(&inputs)?;
    let final_dir = cache_dir.join(format!("demo-{}", &hash[..16]));
    if final_dir.join(MANIFEST).is_file() {
        return DemoImages::load(&final_dir);
    }
    fs::create_dir_all(cache_dir).ctx(|| format!("creating {}", cache_dir.display()))?;
    clean_stale_builds(cache_dir);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = cache_dir.join(format!(
        ".build-{}-{}-{nanos}",
        &hash[..16],
        std::process::id()
    ));
    let built = build_with_inputs(&tmp, &inputs, &hash);
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match fs::rename(&tmp, &final_dir) {
        Ok(()) => {
            tracing::info!(dir = %final_dir.display(), "built demo guest images");
            DemoImages::load(&final_dir)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            if final_dir.join(MANIFEST).is_file() {
                // Another builder won the race; use its result.
                DemoImages::load(&final_dir)
            } else {
                Err(Error::Io {
                    context: format!("moving build into {}", final_dir.display()),
                    source: e,
                })
            }
        }
    }
}

/// Remove `.build-*` directories left by crashed builders (older than an hour).
fn clean_stale_builds(cache_dir: &Path) {
    let Ok(entries) = fs::read_dir(cache_dir) else {
        return;
    };
    for e in entries.flatten() {
        let stale = e.file_name().to_string_lossy().starts_with(".build-")
            && e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 3600);
        if stale {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn build_with_inputs(out: &Path, inputs: &GuestInputs, hash: &str) -> Result<DemoImages> {
    fs::create_dir_all(out).ctx(|| format!("creating {}", out.display()))?;
    let manifest = Manifest {
        builder_version: BUILDER_VERSION.to_string(),
        input_hash: hash.to_string(),
        kernel_version: inputs.kernel_version.clone(),
        cmdline: inputs.cmdline.clone(),
        disk_format: DISK_FORMAT.to_string(),
    };
    let images = DemoImages::layout(out, &manifest);
    let _ = fs::remove_file(out.join(MANIFEST));

    let initramfs = build_initramfs(inputs)?;
    let boot_dir = images.kernel.parent().unwrap_or(out);
    fs::create_dir_all(boot_dir).ctx(|| format!("creating {}", boot_dir.display()))?;
    fs::copy(&inputs.kernel, &images.kernel).ctx(|| {
        format!(
            "copying {} to {}",
            inputs.kernel.display(),
            images.kernel.display()
        )
    })?;
    fs::write(&images.initramfs, &initramfs)
        .ctx(|| format!("writing {}", images.initramfs.display()))?;
    let kernel = fs::read(&inputs.kernel).ctx(|| format!("reading {}", inputs.kernel.display()))?;
    build_disk(&images.disk, inputs, &kernel, &initramfs)?;

    let text = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Invalid {
        field: "demo image manifest",
        reason: e.to_string(),
    })?;
    let mpath = out.join(MANIFEST);
    fs::write(&mpath, text).ctx(|| format!("writing {}", mpath.display()))?;
    Ok(images)
}

/// Busybox applet paths (`usr/bin/awk`, ...) as reported by the binary itself.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|source| Error::ToolMissing {
            tool: busybox.display().to_string(),
            hint: "the busybox binary must run on this host to list its applets",
            source,
        })?;
    if !out.status.success() {
        return Err(Error::ToolFailed {
            tool: format!("{} --list-full", busybox.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let list: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.split('/').any(|c| c == ".."))
        .map(String::from)
        .collect();
    for needed in ["sh", "init", "mount", "insmod", "udhcpc", "acpid", "findfs"] {
        if !list.iter().any(|l| l.rsplit('/').next() == Some(needed)) {
            return Err(Error::BadBusybox {
                path: busybox.to_path_buf(),
                reason: format!("applet {needed} missing"),
            });
        }
    }
    Ok(list)
}

/// Build the gzip-compressed newc initramfs.
pub fn build_initramfs(inputs: &GuestInputs) -> Result<Vec<u8>> {
    let applets = busybox_applets(&inputs.busybox)?;
    let busybox =
        fs::read(&inputs.busybox).ctx(|| format!("reading {}", inputs.busybox.display()))?;
    let mtime = fs::metadata(&inputs.kernel)
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| u32::try_from(d.as_secs()).ok())
        .unwrap_or(0);
    let release = format!(
        "builder={BUILDER_VERSION}\nkernel={}\n",
        inputs.kernel_version
    );
    let kmod_dir = format!("lib/modules/{}", inputs.kernel_version);

    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut w = CpioWriter::new(gz, mtime);
    let cpio_err = |e: std::io::Error| Error::Io {
        context: "writing initramfs".into(),
        source: e,
    };
    (|| -> std::io::Result<()> {
        for (d, mode) in [
            ("dev", 0o755),
            ("proc", 0o555),
            ("sys", 0o555),
            ("run", 0o755),
            ("tmp", 0o1777),
            ("root", 0o700),
            ("etc", 0o755),
            ("mnt", 0o755),
            ("var", 0o755),
            ("bin", 0o755),
            ("sbin", 0o755),
            ("usr/bin", 0o755),
            ("usr/sbin", 0o755),
        ] {
            w.dir(d, mode)?;
        }
        w.char_dev("dev/console", 0o600, 5, 1)?;
        w.char_dev("dev/null", 0o666, 1, 3)?;
        w.file("bin/busybox", 0o755, &busybox)?;
        for a in &applets {
            if !w.contains(a) {
                w.symlink(a, "/bin/busybox")?;
            }
        }
        if !w.contains("bin/sh") {
            w.symlink("bin/sh", "busybox")?;
        }
        w.file("init", 0o755, INIT.as_bytes())?;
        w.file("etc/inittab", 0o644, INITTAB.as_bytes())?;
        w.file("etc/profile", 0o644, PROFILE.as_bytes())?;
        w.file("etc/passwd", 0o644, PASSWD.as_bytes())?;
        w.file("etc/group", 0o644, GROUP.as_bytes())?;
        w.file("etc/hostname", 0o644, b"krvirt-demo\n")?;
        w.file("etc/krvirt-release", 0o644, release.as_bytes())?;
        w.file("etc/udhcpc/default.script", 0o755, UDHCPC_SCRIPT.as_bytes())?;
        w.file("etc/acpi/PWRF/00000080", 0o755, POWER_BUTTON.as_bytes())?;
        w.file("etc/krvirt/shutdown", 0o755, SHUTDOWN.as_bytes())?;
        w.dir(&kmod_dir, 0o755)?;
        Ok(())
    })()
    .map_err(cpio_err)?;

    // Modules, a modules.dep covering just them (so modprobe works on the
    // console), and the load order /init follows.
    let mut load_order = String::new();
    let mut dep_lines = BTreeMap::new();
    let deps = kernel::parse_modules_dep(&inputs.modules_dir)?;
    for rel in &inputs.modules {
        let src = inputs.modules_dir.join(rel);
        let (data, stored) = kernel::read_module(&src, rel)?;
        let stored_s = stored.to_string_lossy().into_owned();
        w.file(&format!("{kmod_dir}/{stored_s}"), 0o644, &data)
            .map_err(cpio_err)?;
        load_order.push_str(&stored_s);
        load_order.push('\n');
        let dl: Vec<String> = deps
            .get(rel)
            .map(|v| {
                v.iter()
                    .map(|d| kernel::strip_compression(d).to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        dep_lines.insert(stored_s, dl);
    }
    let dep_text: String = dep_lines
        .iter()
        .map(|(m, d)| format!("{m}: {}\n", d.join(" ")))
        .collect();
    w.file(
        &format!("{kmod_dir}/modules.dep"),
        0o644,
        dep_text.as_bytes(),
    )
    .map_err(cpio_err)?;
    w.file(
        &format!("{kmod_dir}/krvirt.load-order"),
        0o644,
        load_order.as_bytes(),
    )
    .map_err(cpio_err)?;
    let gz = w.finish().map_err(cpio_err)?;
    gz.finish().map_err(cpio_err)
}

const PART_START_LBA: u32 = 2048;
const MIB: u64 = 1 << 20;

fn syslinux_cfg(cmdline: &str) -> String {
    format!(
        "SERIAL 0 115200\nDEFAULT krvirt\nPROMPT 0\nTIMEOUT 0\n\
         LABEL krvirt\n  LINUX /vmlinuz\n  INITRD /initrd.gz\n  APPEND {cmdline}\n"
    )
}

/// Write the bootable disk: MBR (syslinux mbr.bin) + one active FAT
/// partition at 1 MiB with ldlinux, syslinux.cfg, kernel and initramfs.
fn build_disk(path: &Path, inputs: &GuestInputs, kernel: &[u8], initramfs: &[u8]) -> Result<()> {
    let mbr_code = fs::read(&inputs.syslinux_mbr)
        .ctx(|| format!("reading {}", inputs.syslinux_mbr.display()))?;
    let cfg = syslinux_cfg(&inputs.cmdline);
    let efi = fs::read(&inputs.syslinux_efi)
        .ctx(|| format!("reading {}", inputs.syslinux_efi.display()))?;
    let efi_core = fs::read(&inputs.syslinux_efi_core)
        .ctx(|| format!("reading {}", inputs.syslinux_efi_core.display()))?;
    let payload = (kernel.len() + initramfs.len() + efi.len() + efi_core.len() + 2 * cfg.len())
        as u64
        + 512 * 1024;
    let part_size = (payload + payload / 10 + 2 * MIB).div_ceil(MIB) * MIB;
    let offset = u64::from(PART_START_LBA) * 512;
    let sectors = u32::try_from(part_size / 512).map_err(|_| Error::TooLarge {
        what: "demo disk",
        reason: format!("{part_size} bytes"),
    })?;
    let hash = Sha256::digest(kernel);
    let sig = u32::from_le_bytes([hash[0], hash[1], hash[2], hash[3]]) | 1;

    let _ = fs::remove_file(path);
    let mut file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(|| format!("creating {}", path.display()))?;
    file.set_len(offset + part_size)
        .ctx(|| format!("sizing {}", path.display()))?;
    let kind = fat::format(
        &mut file,
        offset,
        part_size,
        "KRVIRTBOOT",
        sig,
        PART_START_LBA,
    )?;
    fat::write_mbr(
        &mut file,
        &mbr_code[..mbr_code.len().min(440)],
        sig,
        PART_START_LBA,
        sectors,
        kind.mbr_type(),
    )?;
    {
        let fs = fat::open(&mut file, offset, part_size)?;
        fat::write_file(&fs, "syslinux.cfg", cfg.as_bytes())?;
        fat::write_file(&fs, "vmlinuz", kernel)?;
        fat::write_file(&fs, "initrd.gz", initramfs)?;
        // UEFI: the removable-media default path; syslinux.efi reads the
        // syslinux.cfg next to it.
        fat::create_dir(&fs, "EFI")?;
        fat::create_dir(&fs, "EFI/BOOT")?;
        fat::write_file(&fs, "EFI/BOOT/BOOTX64.EFI", &efi)?;
        fat::write_file(&fs, "EFI/BOOT/ldlinux.e64", &efi_core)?;
        fat::write_file(&fs, "EFI/BOOT/syslinux.cfg", cfg.as_bytes())?;
        fs.unmount().ctx(|| "closing boot filesystem".into())?;
    }
    file.sync_all()
        .ctx(|| format!("syncing {}", path.display()))?;
    drop(file);

    let out = Command::new(&inputs.syslinux)
        .arg("--install")
        .arg("--offset")
        .arg(offset.to_string())
        .arg(path)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .map_err(|source| Error::ToolMissing {
            tool: inputs.syslinux.display().to_string(),
            hint: "install the Debian packages syslinux, syslinux-common and mtools",
            source,
        })?;
    if !out.status.success() {
        return Err(Error::ToolFailed {
            tool: "syslinux --install".into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    // Check that the installer really left a boot loader behind.
    let mut file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .ctx(|| format!("reopening {}", path.display()))?;
    let fs = fat::open(&mut file, offset, part_size)?;
    for name in ["ldlinux.sys", "ldlinux.c32"] {
        fs.root_dir()
            .open_file(name)
            .ctx(|| format!("syslinux did not install {name}"))?;
    }
    drop(fs);
    file.flush().ctx(|| "flushing disk".into())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syslinux_cfg_boots_default_without_prompt() {
        let c = syslinux_cfg("console=ttyS0 quiet");
        assert!(c.contains("DEFAULT krvirt\n"));
        assert!(c.contains("TIMEOUT 0\n"));
        assert!(c.contains("  APPEND console=ttyS0 quiet\n"));
    }

    #[test]
    fn init_prints_marker_before_anything_else() {
        let mut lines = INIT
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty());
        assert_eq!(lines.next(), Some("echo GUEST-BOOTED"));
    }

    #[test]
    fn missing_kernel_is_a_clear_error() {
        let opts = GuestBuildOptions {
            kernel: Some(PathBuf::from("/nonexistent/vmlinuz")),
            ..Default::default()
        };
        let err = resolve_inputs(&opts).unwrap_err();
        assert!(matches!(err, Error::MissingInput { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/vmlinuz"));
    }

    #[test]
    fn dynamic_busybox_is_rejected() {
        // /bin/ls is dynamically linked on Debian.
        let opts = GuestBuildOptions {
            busybox: Some(PathBuf::from("/bin/ls")),
            ..Default::default()
        };
        let err = resolve_inputs(&opts).unwrap_err();
        assert!(matches!(err, Error::BadBusybox { .. }), "{err}");
    }
}
