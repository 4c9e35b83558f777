//! Hugepages and guest NUMA nodes: golden command lines
//! (`tests/golden-hugepages/`, kept apart from `tests/golden/` because
//! `qemu_accepts` starts every config there and most machines have no
//! hugepages reserved) and a real QEMU whose RAM comes out of a reserved
//! 2 MiB pool on a hugetlbfs mount.
//!
//! The real launch needs root: it reserves pages with
//! `/proc/sys/vm/nr_hugepages` (given back on drop) and mounts hugetlbfs in
//! a temp dir. If the kernel cannot reserve the pages the test fails.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{idle_vm, launch_guarded, tempdir, uid};
use krvirt_hypervisor::{GuestNumaNode, HugepagesBacking, VmConfig, qemu_argv};

const MIB: u64 = 1024 * 1024;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden-hugepages")
}

#[test]
fn hugepages_golden_argv() {
    let bless = std::env::var("KRVIRT_BLESS").is_ok_and(|v| v == "1");
    let mut n = 0;
    for e in fs::read_dir(golden_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        n += 1;
        let cfg: VmConfig = serde_json::from_str(&fs::read_to_string(&p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        cfg.validate()
            .unwrap_or_else(|e| panic!("{} does not validate: {e}", p.display()));
        let text = qemu_argv(&cfg).join("\n") + "\n";
        let args = p.with_extension("args");
        if bless {
            fs::write(&args, &text).unwrap();
        } else {
            let want = fs::read_to_string(&args)
                .unwrap_or_else(|_| panic!("{} missing (KRVIRT_BLESS=1)", args.display()));
            assert_eq!(text, want, "{}", p.display());
        }
    }
    assert!(n >= 2, "golden-hugepages has {n} cases");
}

#[test]
fn memory_backing_is_validated() {
    let root = Path::new("/var/lib/krvirt");
    let mut cfg = idle_vm(root, "v", "u");
    cfg.hugepages = Some(HugepagesBacking {
        mount: "/dev/hugepages".into(),
        page_size_bytes: 4096,
    });
    assert_eq!(
        cfg.validate().unwrap_err().field,
        "hugepages.page_size_bytes"
    );
    cfg.hugepages = Some(HugepagesBacking {
        mount: "/dev/hugepages".into(),
        page_size_bytes: 1024 * MIB,
    });
    assert_eq!(cfg.validate().unwrap_err().field, "memory_bytes");
    cfg.hugepages = None;
    cfg.cpu.cores = 2;
    cfg.numa_nodes = vec![GuestNumaNode {
        vcpus: vec![0],
        memory_bytes: 64 * MIB,
        host_node: None,
    }];
    assert_eq!(cfg.validate().unwrap_err().field, "numa_nodes");
    cfg.numa_nodes = vec![
        GuestNumaNode {
            vcpus: vec![0],
            memory_bytes: 32 * MIB,
            host_node: Some(0),
        },
        GuestNumaNode {
            vcpus: vec![1],
            memory_bytes: 16 * MIB,
            host_node: Some(0),
        },
    ];
    assert_eq!(cfg.validate().unwrap_err().field, "numa_nodes");
    cfg.numa_nodes[1].memory_bytes = 32 * MIB;
    cfg.validate().unwrap();
}

fn meminfo(field: &str) -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| {
            v.trim_start_matches(':')
                .trim()
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/meminfo"))
}

/// `n` more 2 MiB pages in the kernel's pool while alive (changes are
/// serialized across test processes with a lock file, and undone by
/// subtracting, so concurrent reservations compose).
struct Reservation {
    n: u64,
}

const NR: &str = "/proc/sys/vm/nr_hugepages";

fn with_lock<T>(f: impl FnOnce() -> T) -> T {
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/krvirt-test-hugepages.lock")
        .unwrap();
    // SAFETY: flock on a file descriptor we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let out = f();
    drop(lock);
    out
}

impl Reservation {
    fn add(n: u64) -> Reservation {
        with_lock(|| {
            let cur: u64 = fs::read_to_string(NR).unwrap().trim().parse().unwrap();
            let free_before = meminfo("HugePages_Free");
            fs::write(NR, (cur + n).to_string())
                .unwrap_or_else(|e| panic!("cannot reserve hugepages ({NR}): {e}"));
            let free = meminfo("HugePages_Free");
            let r = Reservation { n };
            assert!(
                free >= free_before + n,
                "the kernel reserved only {} of {n} hugepages (HugePages_Free {free_before} -> {free})",
                free.saturating_sub(free_before)
            );
            r
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        with_lock(|| {
            if let Ok(cur) = fs::read_to_string(NR).map(|s| s.trim().parse::<u64>().unwrap_or(0)) {
                let _ = fs::write(NR, cur.saturating_sub(self.n).to_string());
            }
        });
    }
}

/// A hugetlbfs mount (2 MiB pages), unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn new(dir: &Path) -> Mount {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount hugetlbfs on {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn guest_ram_comes_from_the_hugepage_pool() {
    assert!(
        nix_root(),
        "this test needs root (reserves hugepages, mounts hugetlbfs)"
    );
    let dir = tempdir();
    let _res = Reservation::add(40);
    let mount = Mount::new(&dir.path().join("hugepages-2Mi"));
    let u = uid("huge");
    let mut cfg = idle_vm(dir.path(), "huge", &u);
    cfg.memory_bytes = 64 * MIB;
    cfg.hugepages = Some(HugepagesBacking {
        mount: mount.0.clone(),
        page_size_bytes: 2 * MIB,
    });
    cfg.cpu.cores = 2;
    cfg.numa_nodes = vec![GuestNumaNode {
        vcpus: vec![0, 1],
        memory_bytes: 64 * MIB,
        host_node: Some(0),
    }];
    let free_before = meminfo("HugePages_Free");
    let (h, _guard) = launch_guarded(&cfg).await;
    // prealloc: all 32 pages are taken as soon as QEMU runs.
    let free = meminfo("HugePages_Free");
    assert!(
        hugetlb_kb(h.pid()) >= 64 * 1024,
        "QEMU maps {} kB of hugepages (HugePages_Free {free_before} -> {free}): guest RAM is not on hugepages",
        hugetlb_kb(h.pid())
    );
    let maps = fs::read_to_string(format!("/proc/{}/maps", h.pid())).unwrap();
    assert!(
        maps.lines().any(|l| l.contains(mount.0.to_str().unwrap())),
        "no mapping of the hugetlbfs mount in QEMU's maps"
    );
    h.graceful_stop(Duration::ZERO).await.unwrap();
    common::eventually("pages given back", Duration::from_secs(10), || {
        meminfo("HugePages_Free") >= free_before
    })
    .await;
}

fn nix_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// kB of hugetlb memory (private + shared) a process maps, from its smaps.
fn hugetlb_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v = l
                .strip_prefix("Private_Hugetlb:")
                .or_else(|| l.strip_prefix("Shared_Hugetlb:"))?;
            v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        })
        .sum()
}
