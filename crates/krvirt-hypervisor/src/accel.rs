//! Accelerator detection and the QEMU binary.
//!
//! KVM is used only where it can run ordinary guests: a hardware vendor
//! module (`kvm_intel` or `kvm_amd`) is loaded AND `/dev/kvm` opens
//! read-write. A host whose only vendor module is `kvm_pvm` (a paravirtual
//! KVM for running inside another VM) has a working-looking `/dev/kvm` that
//! cannot boot ordinary guests; detection must not be fooled by it.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

pub use crate::config::Accel;

/// Environment variable naming the QEMU binary (default `qemu-system-x86_64`).
pub const QEMU_ENV: &str = "KRVIRT_QEMU";

/// The QEMU binary used when [`QEMU_ENV`] is not set (looked up in `PATH`).
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AccelMode {
    /// KVM if usable, else TCG.
    #[default]
    Auto,
    /// KVM or an error.
    Kvm,
    /// TCG regardless of KVM.
    Tcg,
}

impl FromStr for AccelMode {
    type Err = AccelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelMode::Auto),
            "kvm" => Ok(AccelMode::Kvm),
            "tcg" => Ok(AccelMode::Tcg),
            other => Err(AccelError::InvalidMode(other.to_string())),
        }
    }
}

impl std::fmt::Display for AccelMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AccelMode::Auto => "auto",
            AccelMode::Kvm => "kvm",
            AccelMode::Tcg => "tcg",
        })
    }
}

/// The accelerator to use and why (for the Host status / a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("invalid accelerator mode {0:?} (expected auto, kvm or tcg)")]
    InvalidMode(String),
    #[error("KVM was requested but is not usable: {reason}")]
    KvmUnavailable { reason: String },
    #[error("cannot run {bin}: {source}")]
    QemuSpawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{bin} --version failed: {detail}")]
    QemuVersion { bin: PathBuf, detail: String },
}

/// Decides the accelerator. `root` is the file system root the host's
/// `sys/module/*` and `dev/kvm` are looked up under (`/` in production).
pub fn detect(mode: AccelMode, root: &Path) -> Result<AccelDecision, AccelError> {
    if mode == AccelMode::Tcg {
        return Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: "TCG was requested".to_string(),
        });
    }
    match kvm_usable(root) {
        Ok(why) => Ok(AccelDecision {
            accel: Accel::Kvm,
            reason: why,
        }),
        Err(why) if mode == AccelMode::Kvm => Err(AccelError::KvmUnavailable { reason: why }),
        Err(why) => Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: format!("KVM is not usable, using TCG (slow): {why}"),
        }),
    }
}

/// `Ok(description)` if KVM can run ordinary guests, else `Err(why not)`.
fn kvm_usable(root: &Path) -> Result<String, String> {
    let module = |m: &str| root.join("sys/module").join(m).exists();
    let vendor = ["kvm_intel", "kvm_amd"].into_iter().find(|m| module(m));
    let Some(vendor) = vendor else {
        return Err(if module("kvm_pvm") {
            "kvm_pvm is a paravirtual KVM that cannot boot ordinary guests \
             (neither kvm_intel nor kvm_amd is loaded)"
                .to_string()
        } else if module("kvm") {
            "the kvm module is loaded but neither kvm_intel nor kvm_amd is \
             (hardware virtualization disabled or unsupported?)"
                .to_string()
        } else {
            "no KVM module is loaded (neither kvm_intel nor kvm_amd)".to_string()
        });
    };
    let dev = root.join("dev/kvm");
    match OpenOptions::new().read(true).write(true).open(&dev) {
        Ok(_) => Ok(format!(
            "{vendor} is loaded and {} opens read-write",
            dev.display()
        )),
        Err(e) => Err(format!(
            "{vendor} is loaded but {} cannot be opened read-write: {e}",
            dev.display()
        )),
    }
}

/// The QEMU binary: `$KRVIRT_QEMU` if set and non-empty, else
/// `qemu-system-x86_64` (from `PATH`).
pub fn qemu_binary() -> PathBuf {
    qemu_binary_from(std::env::var_os(QEMU_ENV))
}

fn qemu_binary_from(env: Option<OsString>) -> PathBuf {
    match env {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_QEMU),
    }
}

/// QEMU's version number (e.g. `7.2.22`), from `BIN --version`. Blocks for
/// as long as QEMU takes to print it (milliseconds).
pub fn qemu_version(bin: &Path) -> Result<String, AccelError> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|source| AccelError::QemuSpawn {
            bin: bin.to_path_buf(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(AccelError::QemuVersion {
            bin: bin.to_path_buf(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    parse_version(&stdout).ok_or_else(|| AccelError::QemuVersion {
        bin: bin.to_path_buf(),
        detail: format!("unexpected output {:?}", stdout.trim()),
    })
}

/// Extracts `X.Y.Z` from `QEMU emulator version X.Y.Z (...)`.
fn parse_version(out: &str) -> Option<String> {
    let line = out.lines().next()?;
    let rest = line.split("version").nth(1)?;
    let v = rest.split_whitespace().next()?;
    let ok = !v.is_empty()
        && v.split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    ok.then(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    struct Tree(tempfile::TempDir);

    impl Tree {
        fn new(modules: &[&str]) -> Tree {
            let t = tempfile::tempdir().unwrap();
            for m in modules {
                fs::create_dir_all(t.path().join("sys/module").join(m)).unwrap();
            }
            Tree(t)
        }
        fn with_dev_kvm(self) -> Tree {
            fs::create_dir_all(self.0.path().join("dev")).unwrap();
            fs::write(self.0.path().join("dev/kvm"), b"").unwrap();
            self
        }
        fn root(&self) -> &Path {
            self.0.path()
        }
    }

    #[test]
    fn mode_parsing() {
        assert_eq!("auto".parse::<AccelMode>().unwrap(), AccelMode::Auto);
        assert_eq!("kvm".parse::<AccelMode>().unwrap(), AccelMode::Kvm);
        assert_eq!("tcg".parse::<AccelMode>().unwrap(), AccelMode::Tcg);
        assert!(matches!(
            "KVM".parse::<AccelMode>(),
            Err(AccelError::InvalidMode(m)) if m == "KVM"
        ));
        assert_eq!(AccelMode::Kvm.to_string(), "kvm");
    }

    #[test]
    fn intel_or_amd_with_dev_kvm_is_kvm() {
        for vendor in ["kvm_intel", "kvm_amd"] {
            let t = Tree::new(&["kvm", vendor]).with_dev_kvm();
            let d = detect(AccelMode::Auto, t.root()).unwrap();
            assert_eq!(d.accel, Accel::Kvm, "{vendor}");
            assert!(d.reason.contains(vendor), "{}", d.reason);
            let d = detect(AccelMode::Kvm, t.root()).unwrap();
            assert_eq!(d.accel, Accel::Kvm);
        }
    }

    #[test]
    fn tcg_mode_wins_even_with_kvm() {
        let t = Tree::new(&["kvm", "kvm_intel"]).with_dev_kvm();
        let d = detect(AccelMode::Tcg, t.root()).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
    }

    #[test]
    fn kvm_pvm_is_not_kvm() {
        let t = Tree::new(&["kvm", "kvm_pvm"]).with_dev_kvm();
        let d = detect(AccelMode::Auto, t.root()).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(
            d.reason.contains("kvm_pvm is a paravirtual KVM"),
            "{}",
            d.reason
        );
        match detect(AccelMode::Kvm, t.root()) {
            Err(AccelError::KvmUnavailable { reason }) => assert!(reason.contains("kvm_pvm")),
            other => panic!("expected KvmUnavailable, got {other:?}"),
        }
    }

    #[test]
    fn no_modules_is_tcg() {
        let t = Tree::new(&[]).with_dev_kvm();
        let d = detect(AccelMode::Auto, t.root()).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("no KVM module"), "{}", d.reason);
        let t = Tree::new(&["kvm"]).with_dev_kvm();
        let d = detect(AccelMode::Auto, t.root()).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(
            d.reason.contains("neither kvm_intel nor kvm_amd"),
            "{}",
            d.reason
        );
        assert!(matches!(
            detect(AccelMode::Kvm, t.root()),
            Err(AccelError::KvmUnavailable { .. })
        ));
    }

    #[test]
    fn vendor_module_without_usable_dev_kvm_is_tcg() {
        // Missing /dev/kvm.
        let t = Tree::new(&["kvm", "kvm_amd"]);
        let d = detect(AccelMode::Auto, t.root()).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("cannot be opened"), "{}", d.reason);
        // /dev/kvm that cannot be opened for writing (a directory: this
        // holds even for root, who ignores permission bits).
        fs::create_dir_all(t.root().join("dev/kvm")).unwrap();
        match detect(AccelMode::Kvm, t.root()) {
            Err(AccelError::KvmUnavailable { reason }) => {
                assert!(reason.contains("kvm_amd is loaded but"), "{reason}")
            }
            other => panic!("expected KvmUnavailable, got {other:?}"),
        }
    }

    #[test]
    fn this_host_uses_tcg() {
        // The development machines expose kvm + kvm_pvm only (see BRIEFING).
        let d = detect(AccelMode::Auto, Path::new("/")).unwrap();
        assert_eq!(d.accel, Accel::Tcg, "{}", d.reason);
        assert!(d.reason.contains("kvm_pvm"), "{}", d.reason);
    }

    #[test]
    fn version_parsing() {
        assert_eq!(
            parse_version(
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright"
            )
            .as_deref(),
            Some("7.2.22")
        );
        assert_eq!(
            parse_version("QEMU emulator version 9.0.0\n").as_deref(),
            Some("9.0.0")
        );
        assert_eq!(parse_version("something else"), None);
        assert_eq!(parse_version("QEMU emulator version x.y"), None);
    }

    #[test]
    fn installed_qemu_version() {
        let v = qemu_version(Path::new(DEFAULT_QEMU))
            .unwrap_or_else(|e| panic!("qemu-system-x86_64 must be installed: {e}"));
        let parts: Vec<u32> = v
            .split('.')
            .map(|p| p.parse().unwrap_or_else(|_| panic!("bad version {v}")))
            .collect();
        assert_eq!(parts.len(), 3, "{v}");
        assert!(parts[0] >= 7, "QEMU 7.2 or newer is expected, found {v}");
    }

    #[test]
    fn missing_binary_is_a_typed_error() {
        match qemu_version(Path::new("/nonexistent/qemu")) {
            Err(AccelError::QemuSpawn { bin, .. }) => {
                assert_eq!(bin, Path::new("/nonexistent/qemu"))
            }
            other => panic!("expected QemuSpawn, got {other:?}"),
        }
        match qemu_version(Path::new("/bin/false")) {
            Err(AccelError::QemuVersion { .. }) => {}
            other => panic!("expected QemuVersion, got {other:?}"),
        }
    }

    #[test]
    fn binary_from_env() {
        assert_eq!(qemu_binary_from(None), PathBuf::from(DEFAULT_QEMU));
        assert_eq!(
            qemu_binary_from(Some(OsString::new())),
            PathBuf::from(DEFAULT_QEMU)
        );
        assert_eq!(
            qemu_binary_from(Some("/opt/qemu/bin/qemu-system-x86_64".into())),
            PathBuf::from("/opt/qemu/bin/qemu-system-x86_64")
        );
    }
}
