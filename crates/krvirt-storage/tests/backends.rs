//! Every backend through the same trait, against real files, real qemu-img,
//! a real btrfs on a loop-mounted sparse file and a real one-node Ceph.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use krvirt_storage::{
    BtrfsPool, CloneMode, DirPool, DiskSource, Format, RbdPool, StorageBackend, StorageError,
};

const MIB: u64 = 1 << 20;

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} cannot be run (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Write `pattern` at `offset` (64 KiB) through QEMU's block layer.
fn write(src: &DiskSource, pattern: u8, offset: u64) {
    sh(
        "qemu-io",
        &[
            "-f",
            src.format().as_str(),
            "-c",
            &format!("write -P {pattern:#x} {offset} 64k"),
            &src.qemu_filename(),
        ],
    );
}

/// Whether the 64 KiB at `offset` hold `pattern`.
fn holds(src: &DiskSource, pattern: u8, offset: u64) -> bool {
    Command::new("qemu-io")
        .args([
            "-f",
            src.format().as_str(),
            "-c",
            &format!("read -P {pattern:#x} {offset} 64k"),
            &src.qemu_filename(),
        ])
        .output()
        .expect("qemu-io")
        .status
        .success()
}

/// A qcow2 "image" of 8 MiB with 0x11 at offset 0.
fn image(dir: &Path) -> PathBuf {
    let p = dir.join("base.qcow2");
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "8M"],
    );
    write(
        &DiskSource::File {
            path: p.clone(),
            format: Format::Qcow2,
        },
        0x11,
        0,
    );
    p
}

/// The behaviour every backend must have.
fn exercise(pool: &dyn StorageBackend, scratch: &Path) {
    let img = image(scratch);

    // Blank volume: capacity as asked, sparse.
    pool.create("blank", 64 * MIB).unwrap();
    let i = pool.info("blank").unwrap();
    assert_eq!(i.capacity, 64 * MIB);
    assert!(i.allocation < 8 * MIB, "blank volume not sparse: {i:?}");
    assert!(matches!(
        pool.create("blank", MIB),
        Err(StorageError::AlreadyExists(_))
    ));
    assert!(matches!(
        pool.create("../x", MIB),
        Err(StorageError::InvalidName(_))
    ));

    // Linked and full imports see the image content; linked is grown.
    pool.import(
        "linked",
        &img,
        Format::Qcow2,
        CloneMode::Linked,
        Some(32 * MIB),
    )
    .unwrap();
    pool.import("full", &img, Format::Qcow2, CloneMode::Full, None)
        .unwrap();
    let linked = pool.disk("linked").unwrap();
    let full = pool.disk("full").unwrap();
    assert!(holds(&linked, 0x11, 0));
    assert!(holds(&full, 0x11, 0));
    assert_eq!(pool.info("linked").unwrap().capacity, 32 * MIB);
    assert_eq!(pool.info("full").unwrap().capacity, 8 * MIB);
    // Writes to a clone do not reach the image.
    write(&linked, 0x22, 0);
    assert!(holds(&linked, 0x22, 0));
    assert!(holds(
        &DiskSource::File {
            path: img.clone(),
            format: Format::Qcow2
        },
        0x11,
        0
    ));

    // Clone of a volume: independent from then on.
    pool.clone_volume("linked", "copy").unwrap();
    let copy = pool.disk("copy").unwrap();
    assert!(holds(&copy, 0x22, 0));
    write(&copy, 0x33, 0);
    assert!(holds(&linked, 0x22, 0));
    assert!(matches!(
        pool.clone_volume("missing", "x"),
        Err(StorageError::NotFound(_))
    ));

    // Snapshot, write, revert: the first content is back.
    write(&full, 0x44, MIB);
    pool.snapshot("full", "s1").unwrap();
    assert!(matches!(
        pool.snapshot("full", "s1"),
        Err(StorageError::SnapshotExists { .. })
    ));
    write(&full, 0x55, MIB);
    pool.snapshot("full", "s2").unwrap();
    assert_eq!(pool.snapshots("full").unwrap(), vec!["s1", "s2"]);
    write(&full, 0x66, MIB);
    // A new volume from a snapshot.
    pool.create_from_snapshot("full", "s1", "from-s1").unwrap();
    assert!(holds(&pool.disk("from-s1").unwrap(), 0x44, MIB));
    pool.revert("full", "s1").unwrap();
    let full = pool.disk("full").unwrap();
    assert!(holds(&full, 0x44, MIB), "revert to s1 did not restore");
    // Deleting one snapshot keeps its sibling.
    pool.delete_snapshot("full", "s1").unwrap();
    assert_eq!(pool.snapshots("full").unwrap(), vec!["s2"]);
    pool.revert("full", "s2").unwrap();
    assert!(holds(&pool.disk("full").unwrap(), 0x55, MIB));
    assert!(matches!(
        pool.revert("full", "s1"),
        Err(StorageError::SnapshotNotFound { .. })
    ));

    // Resize grows, refuses to shrink.
    pool.resize("blank", 128 * MIB).unwrap();
    assert_eq!(pool.info("blank").unwrap().capacity, 128 * MIB);
    assert!(matches!(
        pool.resize("blank", MIB),
        Err(StorageError::Shrink { .. })
    ));

    // Delete removes volume and snapshots; deleting twice is fine.
    for v in ["blank", "linked", "full", "copy", "from-s1"] {
        pool.delete(v).unwrap();
        assert!(!pool.exists(v).unwrap());
    }
    pool.delete("full").unwrap();
    assert!(matches!(pool.info("full"), Err(StorageError::NotFound(_))));
}

#[test]
fn dir_backend() {
    let t = tempfile::tempdir().unwrap();
    let pool = DirPool::open(&t.path().join("pool")).unwrap();
    exercise(&pool, t.path());
    // Volumes are qcow2 files named after the volume.
    pool.create("v", MIB).unwrap();
    assert_eq!(
        pool.disk("v").unwrap(),
        DiskSource::File {
            path: t.path().join("pool/v.qcow2"),
            format: Format::Qcow2
        }
    );
}

/// A btrfs made with mkfs.btrfs on a sparse file, loop-mounted; unmounted
/// (which frees the loop device) on drop.
struct BtrfsMount {
    dir: tempfile::TempDir,
}

impl BtrfsMount {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fs.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(512 * MIB)
            .unwrap();
        sh("mkfs.btrfs", &["-q", file.to_str().unwrap()]);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        sh(
            "mount",
            &["-o", "loop", file.to_str().unwrap(), mnt.to_str().unwrap()],
        );
        BtrfsMount { dir }
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for BtrfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mnt()).status();
    }
}

#[test]
fn btrfs_backend() {
    let m = BtrfsMount::new();
    let pool = BtrfsPool::open(&m.mnt().join("pool")).unwrap();
    exercise(&pool, &m.mnt());

    // A raw image on the same btrfs is imported by reflink: the new volume
    // shares its extents (no new data allocated on the filesystem).
    let raw = m.mnt().join("img.raw");
    sh(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", raw.display()),
            "bs=1M",
            "count=64",
            "status=none",
        ],
    );
    sh("sync", &[]);
    let used = || {
        let out = sh(
            "btrfs",
            &["filesystem", "du", "-s", "--raw", m.mnt().to_str().unwrap()],
        );
        // "Total Exclusive Set shared Filename" then the numbers.
        let line = out.lines().last().unwrap().to_string();
        line.split_whitespace()
            .map(|s| s.parse::<u64>().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    pool.import("r", &raw, Format::Raw, CloneMode::Linked, None)
        .unwrap();
    sh("sync", &[]);
    let u = used();
    // Total counts both copies, Set shared counts the shared extents once.
    assert!(
        u[0] >= 128 * MIB && u[2] >= 64 * MIB,
        "reflink not shared: {u:?}"
    );
    assert!(holds_raw(&pool.disk("r").unwrap(), &raw));

    // Clones of volumes are subvolume snapshots.
    pool.clone_volume("r", "r2").unwrap();
    let list = sh(
        "btrfs",
        &["subvolume", "list", "-r", m.mnt().to_str().unwrap()],
    );
    assert!(
        !list.contains("pool/r2"),
        "clone should be writable, not a readonly snapshot"
    );
    let list = sh("btrfs", &["subvolume", "list", m.mnt().to_str().unwrap()]);
    assert!(list.contains("pool/r2"), "{list}");

    // Not on btrfs: refused with a clear error.
    let t = tempfile::tempdir().unwrap();
    let err = BtrfsPool::open(t.path()).unwrap_err().to_string();
    assert!(err.contains("not on a btrfs"), "{err}");
}

fn holds_raw(src: &DiskSource, raw: &Path) -> bool {
    let DiskSource::File { path, .. } = src else {
        panic!("a btrfs volume is a file: {src:?}");
    };
    std::fs::read(path).unwrap() == std::fs::read(raw).unwrap()
}

#[test]
fn rbd_backend() {
    let ceph = common::ceph::CephCluster::start();
    let t = tempfile::tempdir().unwrap();
    let pool = RbdPool::open(&ceph.pool, Some(&ceph.conf), &[], None).unwrap();
    exercise(&pool, t.path());
    // The base image of exercise's linked import has no clone left.
    assert_eq!(pool.gc_bases().unwrap(), 1);

    // Volumes are RBD images named after the volume.
    pool.create("v", MIB).unwrap();
    assert_eq!(
        pool.disk("v").unwrap(),
        DiskSource::Rbd {
            pool: "rbd".into(),
            image: "v".into(),
            conf: Some(ceph.conf.clone()),
            user: None,
            monitors: Vec::new(),
        }
    );
    let images = ceph.rbd(&["ls", "rbd"]);
    assert!(images.lines().any(|l| l == "v"), "{images}");

    // A linked import is a copy-on-write clone of a protected snapshot of
    // a base image made once per image file; a second linked import of the
    // same file reuses the base (constant time, no copy).
    let img = image(t.path());
    pool.import("a", &img, Format::Qcow2, CloneMode::Linked, None)
        .unwrap();
    pool.import("b", &img, Format::Qcow2, CloneMode::Linked, None)
        .unwrap();
    let info_a = ceph.rbd(&["info", "rbd/a"]);
    assert!(info_a.contains("parent: rbd/_base."), "{info_a}");
    let bases = ceph
        .rbd(&["ls", "rbd"])
        .lines()
        .filter(|l| l.starts_with("_base."))
        .count();
    assert_eq!(bases, 1, "one base image per image file");
    // A clone of a volume is a COW clone too, and independent of its
    // source once the source is gone (deleting the source flattens it).
    write(&pool.disk("a").unwrap(), 0x77, 0);
    pool.clone_volume("a", "c").unwrap();
    let info_c = ceph.rbd(&["info", "rbd/c"]);
    assert!(info_c.contains("parent: rbd/a@_clone.c"), "{info_c}");
    assert!(
        pool.snapshots("a").unwrap().is_empty(),
        "hidden snapshot shown"
    );
    pool.delete("a").unwrap();
    assert!(holds(&pool.disk("c").unwrap(), 0x77, 0));
    // With no clone left, the base images can be collected.
    pool.delete("b").unwrap();
    pool.delete("c").unwrap();
    assert_eq!(pool.gc_bases().unwrap(), 1);
    let left = ceph.rbd(&["ls", "rbd"]);
    assert_eq!(left.trim(), "v", "{left}");

    // A pool that does not exist is refused when opened.
    let err = RbdPool::open("nope", Some(&ceph.conf), &[], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rbd"), "{err}");
}
