//! `btrfs` pools: one subvolume per volume, snapshots as read-only
//! subvolume snapshots, clones as writable subvolume snapshots, raw images
//! imported with reflinks.

use std::path::{Path, PathBuf};

use crate::cmd::{absolute, qemu_img_info, run};
use crate::{
    CloneMode, DiskSource, Format, OnlineSnapshot, Result, StorageBackend, StorageError,
    VolumeInfo, check_name,
};

/// Volumes as subvolumes `{root}/{name}` holding `disk.raw` (or
/// `disk.qcow2` for a linked clone of a qcow2 image); snapshots as
/// `{root}/.snapshots/{name}/{snap}`.
#[derive(Debug, Clone)]
pub struct BtrfsPool {
    root: PathBuf,
}

const RAW: &str = "disk.raw";
const QCOW2: &str = "disk.qcow2";

fn btrfs<I: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = I>) -> Result<()> {
    run("btrfs", args).map(drop)
}

impl BtrfsPool {
    /// Open a pool on a directory of a mounted btrfs (created if missing).
    pub fn open(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|e| StorageError::io(root, e))?;
        let root = absolute(root)?;
        let fs = run(
            "stat",
            ["-f", "-c", "%T"]
                .iter()
                .map(std::ffi::OsStr::new)
                .chain([root.as_os_str()]),
        )?;
        if fs.trim() != "btrfs" {
            return Err(StorageError::Pool {
                path: root,
                message: format!("not on a btrfs filesystem (it is {})", fs.trim()),
            });
        }
        Ok(BtrfsPool { root })
    }

    fn subvol(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join(name))
    }

    fn snap_dir(&self, name: &str) -> PathBuf {
        self.root.join(".snapshots").join(name)
    }

    fn snap_path(&self, name: &str, snap: &str) -> Result<PathBuf> {
        check_name(snap)?;
        Ok(self.snap_dir(name).join(snap))
    }

    fn existing(&self, name: &str) -> Result<PathBuf> {
        let p = self.subvol(name)?;
        if p.is_dir() {
            Ok(p)
        } else {
            Err(StorageError::NotFound(name.to_string()))
        }
    }

    fn fresh(&self, name: &str) -> Result<PathBuf> {
        let p = self.subvol(name)?;
        if p.exists() {
            Err(StorageError::AlreadyExists(name.to_string()))
        } else {
            Ok(p)
        }
    }

    fn existing_snap(&self, name: &str, snap: &str) -> Result<PathBuf> {
        self.existing(name)?;
        let s = self.snap_path(name, snap)?;
        if s.is_dir() {
            Ok(s)
        } else {
            Err(StorageError::SnapshotNotFound {
                volume: name.to_string(),
                snap: snap.to_string(),
            })
        }
    }

    /// The disk file inside a volume subvolume and its format.
    fn file(dir: &Path) -> Result<(PathBuf, Format)> {
        let raw = dir.join(RAW);
        if raw.exists() {
            return Ok((raw, Format::Raw));
        }
        let q = dir.join(QCOW2);
        if q.exists() {
            return Ok((q, Format::Qcow2));
        }
        Err(StorageError::Pool {
            path: dir.to_path_buf(),
            message: "volume subvolume holds no disk file".into(),
        })
    }

    /// Create the subvolume and fill it; a failure removes the subvolume.
    fn producing(&self, dir: &Path, f: impl FnOnce() -> Result<()>) -> Result<()> {
        btrfs(["subvolume".as_ref(), "create".as_ref(), dir.as_os_str()])?;
        let r = f();
        if r.is_err() {
            let _ = btrfs(["subvolume".as_ref(), "delete".as_ref(), dir.as_os_str()]);
        }
        r
    }

    fn resize_file(name: &str, path: &Path, format: Format, size: u64) -> Result<()> {
        let cur = qemu_img_info(path, Some(format))?.virtual_size;
        if size < cur {
            return Err(StorageError::Shrink {
                volume: name.to_string(),
                from: cur,
                to: size,
            });
        }
        if size == cur {
            return Ok(());
        }
        match format {
            Format::Raw => std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(size))
                .map_err(|e| StorageError::io(path, e)),
            Format::Qcow2 => run(
                "qemu-img",
                [
                    "resize".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    path.as_os_str(),
                    size.to_string().as_ref(),
                ],
            )
            .map(drop),
        }
    }
}

impl StorageBackend for BtrfsPool {
    fn kind(&self) -> &'static str {
        "btrfs"
    }

    fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.subvol(name)?.exists())
    }

    fn create(&self, name: &str, size: u64) -> Result<()> {
        let dir = self.fresh(name)?;
        self.producing(&dir, || {
            let p = dir.join(RAW);
            std::fs::File::create(&p)
                .and_then(|f| f.set_len(size))
                .map_err(|e| StorageError::io(&p, e))
        })
    }

    fn import(
        &self,
        name: &str,
        image: &Path,
        format: Format,
        mode: CloneMode,
        size: Option<u64>,
    ) -> Result<()> {
        let dir = self.fresh(name)?;
        let image = absolute(image)?;
        if !image.is_file() {
            return Err(StorageError::Pool {
                path: image,
                message: "image file not found".into(),
            });
        }
        self.producing(&dir, || {
            let (path, fmt) = match (format, mode) {
                // A raw image: reflink copy (shares blocks when the image
                // is on the same btrfs, a sparse copy otherwise).
                (Format::Raw, _) => {
                    let p = dir.join(RAW);
                    run(
                        "cp",
                        [
                            "--reflink=auto".as_ref(),
                            "--sparse=always".as_ref(),
                            image.as_os_str(),
                            p.as_os_str(),
                        ],
                    )?;
                    (p, Format::Raw)
                }
                // qcow2 image, linked: an overlay on it.
                (Format::Qcow2, CloneMode::Linked) => {
                    let p = dir.join(QCOW2);
                    run(
                        "qemu-img",
                        [
                            "create".as_ref(),
                            "-q".as_ref(),
                            "-f".as_ref(),
                            "qcow2".as_ref(),
                            "-F".as_ref(),
                            "qcow2".as_ref(),
                            "-b".as_ref(),
                            image.as_os_str(),
                            p.as_os_str(),
                        ],
                    )?;
                    (p, Format::Qcow2)
                }
                // qcow2 image, full: converted to a sparse raw file.
                (Format::Qcow2, CloneMode::Full) => {
                    let p = dir.join(RAW);
                    run(
                        "qemu-img",
                        [
                            "convert".as_ref(),
                            "-f".as_ref(),
                            "qcow2".as_ref(),
                            "-O".as_ref(),
                            "raw".as_ref(),
                            image.as_os_str(),
                            p.as_os_str(),
                        ],
                    )?;
                    (p, Format::Raw)
                }
            };
            if let Some(size) = size {
                let cur = qemu_img_info(&path, Some(fmt))?.virtual_size;
                if size > cur {
                    Self::resize_file(name, &path, fmt, size)?;
                }
            }
            Ok(())
        })
    }

    fn clone_volume(&self, src: &str, dst: &str) -> Result<()> {
        let s = self.existing(src)?;
        let d = self.fresh(dst)?;
        btrfs([
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            s.as_os_str(),
            d.as_os_str(),
        ])
    }

    fn snapshot(&self, name: &str, snap: &str) -> Result<()> {
        let s = self.existing(name)?;
        let sp = self.snap_path(name, snap)?;
        if sp.exists() {
            return Err(StorageError::SnapshotExists {
                volume: name.to_string(),
                snap: snap.to_string(),
            });
        }
        let dir = self.snap_dir(name);
        std::fs::create_dir_all(&dir).map_err(|e| StorageError::io(&dir, e))?;
        btrfs([
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            "-r".as_ref(),
            s.as_os_str(),
            sp.as_os_str(),
        ])
    }

    fn snapshots(&self, name: &str) -> Result<Vec<String>> {
        self.existing(name)?;
        let dir = self.snap_dir(name);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StorageError::io(&dir, e)),
        };
        let mut names = Vec::new();
        for e in rd {
            let e = e.map_err(|e| StorageError::io(&dir, e))?;
            names.push(e.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn revert(&self, name: &str, snap: &str) -> Result<()> {
        let sp = self.existing_snap(name, snap)?;
        let dir = self.existing(name)?;
        // Make the new state first, then swap: a failure leaves the volume.
        let tmp = self.root.join(format!(".revert-{name}"));
        if tmp.exists() {
            btrfs(["subvolume".as_ref(), "delete".as_ref(), tmp.as_os_str()])?;
        }
        btrfs([
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            sp.as_os_str(),
            tmp.as_os_str(),
        ])?;
        btrfs(["subvolume".as_ref(), "delete".as_ref(), dir.as_os_str()])?;
        std::fs::rename(&tmp, &dir).map_err(|e| StorageError::io(&dir, e))
    }

    fn delete_snapshot(&self, name: &str, snap: &str) -> Result<()> {
        let sp = self.existing_snap(name, snap)?;
        btrfs(["subvolume".as_ref(), "delete".as_ref(), sp.as_os_str()])
    }

    fn create_from_snapshot(&self, name: &str, snap: &str, dst: &str) -> Result<()> {
        let sp = self.existing_snap(name, snap)?;
        let d = self.fresh(dst)?;
        btrfs([
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            sp.as_os_str(),
            d.as_os_str(),
        ])
    }

    fn resize(&self, name: &str, size: u64) -> Result<()> {
        let dir = self.existing(name)?;
        let (p, f) = Self::file(&dir)?;
        Self::resize_file(name, &p, f, size)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let dir = self.subvol(name)?;
        let sd = self.snap_dir(name);
        if sd.is_dir() {
            for s in self.snapshots_of_dir(&sd)? {
                btrfs(["subvolume".as_ref(), "delete".as_ref(), s.as_os_str()])?;
            }
            std::fs::remove_dir(&sd).map_err(|e| StorageError::io(&sd, e))?;
        }
        if dir.exists() {
            btrfs(["subvolume".as_ref(), "delete".as_ref(), dir.as_os_str()])?;
        }
        Ok(())
    }

    fn info(&self, name: &str) -> Result<VolumeInfo> {
        let dir = self.existing(name)?;
        let (p, f) = Self::file(&dir)?;
        let i = qemu_img_info(&p, Some(f))?;
        Ok(VolumeInfo {
            capacity: i.virtual_size,
            allocation: i.actual_size,
        })
    }

    fn disk(&self, name: &str) -> Result<DiskSource> {
        let dir = self.existing(name)?;
        let (path, format) = Self::file(&dir)?;
        Ok(DiskSource::File { path, format })
    }

    fn online_snapshot(&self) -> OnlineSnapshot {
        OnlineSnapshot::WhilePaused
    }
}

impl BtrfsPool {
    fn snapshots_of_dir(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let rd = std::fs::read_dir(dir).map_err(|e| StorageError::io(dir, e))?;
        let mut v = Vec::new();
        for e in rd {
            v.push(e.map_err(|e| StorageError::io(dir, e))?.path());
        }
        Ok(v)
    }
}
