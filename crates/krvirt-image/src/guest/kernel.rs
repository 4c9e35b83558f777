//! Kernel-side inputs: locating the bzImage, reading its version from the
//! boot header, checking busybox is static, and resolving modules.dep.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Pick the guest kernel in `boot_dir`: the newest `vmlinuz-*-cloud-amd64`
/// if any, else the newest `vmlinuz-*`.
pub(crate) fn default_kernel(boot_dir: &Path) -> Result<PathBuf> {
    let searched = format!("{}/vmlinuz-*", boot_dir.display());
    let entries = fs::read_dir(boot_dir).map_err(|_| Error::KernelNotFound {
        searched: searched.clone(),
    })?;
    let mut all: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vmlinuz-"))
        .collect();
    all.sort_by(|a, b| natural_cmp(a, b));
    let pick = all
        .iter()
        .rev()
        .find(|n| n.ends_with("-cloud-amd64"))
        .or_else(|| all.last())
        .ok_or(Error::KernelNotFound { searched })?;
    Ok(boot_dir.join(pick))
}

/// Compare strings so that embedded numbers order numerically
/// (`6.1.0-9` < `6.1.0-56`).
pub(crate) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, xa), (db, xb)) in ca.iter().zip(cb.iter()) {
        let ord = if *da && *db {
            let (ta, tb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
        } else {
            xa.cmp(xb)
        };
        if ord != std::cmp::Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// The kernel release (`uname -r`) stored in an x86 bzImage's boot header.
pub fn kernel_version_of(kernel: &Path) -> Result<String> {
    let bad = |reason: &str| Error::BadKernel {
        path: kernel.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut head = Vec::with_capacity(64 * 1024);
    fs::File::open(kernel)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
        .ctx(|| format!("reading {}", kernel.display()))?;
    if head.len() < 0x210 || &head[0x202..0x206] != b"HdrS" {
        return Err(bad("no 'HdrS' boot protocol header"));
    }
    let off = usize::from(u16::from_le_bytes([head[0x20e], head[0x20f]]));
    if off == 0 {
        return Err(bad("boot header carries no kernel version string"));
    }
    let start = 0x200 + off;
    let tail = head
        .get(start..)
        .ok_or_else(|| bad("kernel version string offset outside the setup code"))?;
    let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
    let text = String::from_utf8_lossy(&tail[..end]);
    let version = text
        .split_whitespace()
        .next()
        .ok_or_else(|| bad("empty kernel version string"))?;
    if version.contains('/') || version == "." || version == ".." {
        return Err(bad("implausible kernel version string"));
    }
    Ok(version.to_string())
}

/// Refuse anything but a static x86-64 ELF executable.
pub(crate) fn check_static_x86_64(path: &Path) -> Result<()> {
    let bad = |reason: String| Error::BadBusybox {
        path: path.to_path_buf(),
        reason,
    };
    let data = fs::read(path).ctx(|| format!("reading {}", path.display()))?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" {
        return Err(bad("not an ELF file".into()));
    }
    if data[4] != 2 || data[5] != 1 || u16::from_le_bytes([data[0x12], data[0x13]]) != 0x3e {
        return Err(bad("not a little-endian x86-64 ELF".into()));
    }
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let u16_at = |o: usize| {
        data.get(o..o + 2)
            .and_then(|s| s.try_into().ok())
            .map(u16::from_le_bytes)
    };
    let phoff = u64_at(0x20)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| bad("truncated ELF header".into()))?;
    let phentsize = usize::from(u16_at(0x36).unwrap_or(0));
    let phnum = usize::from(u16_at(0x38).unwrap_or(0));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let ptype = data
            .get(o..o + 4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| bad("truncated program headers".into()))?;
        if ptype == 3 {
            return Err(bad("dynamically linked (has a PT_INTERP header)".into()));
        }
    }
    Ok(())
}

/// Module name as the kernel sees it: file stem without `.ko[.gz|.xz|.zst]`, `-` as `_`.
pub(crate) fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = strip_compression(Path::new(file));
    let stem = stem.to_string_lossy();
    stem.strip_suffix(".ko").unwrap_or(&stem).replace('-', "_")
}

/// `x.ko.gz` -> `x.ko` (likewise `.xz`, `.zst`).
pub(crate) fn strip_compression(p: &Path) -> PathBuf {
    let s = p.to_string_lossy();
    for ext in [".gz", ".xz", ".zst"] {
        if let Some(base) = s.strip_suffix(ext) {
            return PathBuf::from(base);
        }
    }
    p.to_path_buf()
}

/// modules.dep as relative module path -> its dependencies (relative paths).
pub(crate) fn parse_modules_dep(modules_dir: &Path) -> Result<BTreeMap<PathBuf, Vec<PathBuf>>> {
    let path = modules_dir.join("modules.dep");
    let text = fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((m, deps)) = line.split_once(':') else {
            continue;
        };
        let m = m.trim();
        if m.is_empty() {
            continue;
        }
        out.insert(
            PathBuf::from(m),
            deps.split_whitespace().map(PathBuf::from).collect(),
        );
    }
    Ok(out)
}

/// Resolve `wanted` module names to files in load order (dependencies
/// first, each once). Built-in modules are skipped; a name that is neither
/// a module nor built in is an error.
pub(crate) fn module_load_order(
    modules_dir: &Path,
    wanted: &[(&str, &'static str)],
) -> Result<Vec<PathBuf>> {
    let deps = parse_modules_dep(modules_dir)?;
    let by_name: BTreeMap<String, &PathBuf> = deps
        .keys()
        .map(|p| (module_name(&p.to_string_lossy()), p))
        .collect();
    let builtin: BTreeSet<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for (name, why) in wanted {
        let name = name.replace('-', "_");
        if let Some(path) = by_name.get(&name) {
            visit(path, &deps, &mut seen, &mut order, 0)?;
        } else if !builtin.contains(&name) {
            return Err(Error::ModuleNotFound {
                name,
                modules_dir: modules_dir.to_path_buf(),
                why,
            });
        }
    }
    for m in &order {
        let full = modules_dir.join(m);
        if !full.is_file() {
            return Err(Error::MissingInput {
                what: "kernel module file",
                path: full,
                hint: "modules.dep lists it; reinstall the kernel package",
            });
        }
    }
    Ok(order)
}

fn visit(
    path: &PathBuf,
    deps: &BTreeMap<PathBuf, Vec<PathBuf>>,
    seen: &mut BTreeSet<PathBuf>,
    order: &mut Vec<PathBuf>,
    depth: usize,
) -> Result<()> {
    if seen.contains(path) {
        return Ok(());
    }
    if depth > 64 {
        return Err(Error::Invalid {
            field: "modules.dep",
            reason: format!("dependency chain too deep at {}", path.display()),
        });
    }
    seen.insert(path.clone());
    // modules.dep lists the full transitive set; modprobe loads it back to front.
    for d in deps.get(path).into_iter().flatten().rev() {
        visit(d, deps, seen, order, depth + 1)?;
    }
    order.push(path.clone());
    Ok(())
}

/// Read a module, unpacking `.ko.gz`; returns the bytes and the path to
/// store it under (without the compression suffix).
pub(crate) fn read_module(src: &Path, rel: &Path) -> Result<(Vec<u8>, PathBuf)> {
    let data = fs::read(src).ctx(|| format!("reading {}", src.display()))?;
    let name = rel.to_string_lossy();
    if name.ends_with(".ko") {
        return Ok((data, rel.to_path_buf()));
    }
    if name.ends_with(".ko.gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&data[..])
            .read_to_end(&mut out)
            .ctx(|| format!("decompressing {}", src.display()))?;
        return Ok((out, strip_compression(rel)));
    }
    Err(Error::UnsupportedModuleCompression {
        path: src.to_path_buf(),
        format: rel
            .extension()
            .map_or_else(|| "unknown".into(), |e| e.to_string_lossy().into_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_of_kernel_names() {
        let mut v = vec![
            "vmlinuz-6.1.0-56-cloud-amd64",
            "vmlinuz-6.1.0-9-cloud-amd64",
            "vmlinuz-6.10.0-1-cloud-amd64",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            [
                "vmlinuz-6.1.0-9-cloud-amd64",
                "vmlinuz-6.1.0-56-cloud-amd64",
                "vmlinuz-6.10.0-1-cloud-amd64"
            ]
        );
    }

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko"),
            "virtio_rng"
        );
        assert_eq!(module_name("kernel/fs/fat/vfat.ko.xz"), "vfat");
        assert_eq!(
            module_name("kernel/fs/nls/nls_iso8859-1.ko"),
            "nls_iso8859_1"
        );
    }

    #[test]
    fn load_order_puts_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(
            d.join("modules.dep"),
            "kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\n\
             kernel/x-y.ko.gz:\n",
        )
        .unwrap();
        fs::write(d.join("modules.builtin"), "kernel/in.ko\n").unwrap();
        fs::create_dir(d.join("kernel")).unwrap();
        for m in ["a.ko", "b.ko", "c.ko"] {
            fs::write(d.join("kernel").join(m), m).unwrap();
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, b"module-bytes").unwrap();
        fs::write(d.join("kernel/x-y.ko.gz"), gz.finish().unwrap()).unwrap();
        let order =
            module_load_order(d, &[("a", "t"), ("in", "t"), ("c", "t"), ("x_y", "t")]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/c.ko",
                "kernel/b.ko",
                "kernel/a.ko",
                "kernel/x-y.ko.gz"
            ]
            .map(PathBuf::from)
        );
        let (data, stored) = read_module(&d.join("kernel/x-y.ko.gz"), &order[3]).unwrap();
        assert_eq!(data, b"module-bytes");
        assert_eq!(stored, PathBuf::from("kernel/x-y.ko"));
        let err = module_load_order(d, &[("nope", "testing")]).unwrap_err();
        assert!(matches!(err, Error::ModuleNotFound { .. }), "{err}");
    }

    #[test]
    fn bad_kernel_files_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        fs::write(&p, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            kernel_version_of(&p),
            Err(Error::BadKernel { .. })
        ));
        fs::write(&p, b"short").unwrap();
        assert!(matches!(
            kernel_version_of(&p),
            Err(Error::BadKernel { .. })
        ));
    }

    #[test]
    fn installed_kernel_version_matches_module_dir() {
        let k = default_kernel(Path::new("/boot"))
            .expect("no /boot/vmlinuz-*: install linux-image-cloud-amd64 (the demo guest kernel)");
        let v = kernel_version_of(&k).unwrap();
        let name = k.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name, format!("vmlinuz-{v}"));
        assert!(
            Path::new("/lib/modules")
                .join(&v)
                .join("modules.dep")
                .is_file()
        );
    }
}
