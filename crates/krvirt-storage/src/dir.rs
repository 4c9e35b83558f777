//! `dir` pools: one qcow2 file per volume.

use std::path::{Path, PathBuf};

use crate::cmd::{absolute, qemu_img_info, run};
use crate::{
    CloneMode, DiskSource, Format, OnlineSnapshot, Result, StorageBackend, StorageError,
    VolumeInfo, check_name,
};

/// Volumes as `{root}/{name}.qcow2`.
#[derive(Debug, Clone)]
pub struct DirPool {
    root: PathBuf,
}

impl DirPool {
    /// Open (and create if missing) the pool directory.
    pub fn open(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|e| StorageError::io(root, e))?;
        Ok(DirPool {
            root: absolute(root)?,
        })
    }

    /// The volume's file.
    pub fn path(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join(format!("{name}.qcow2")))
    }

    fn existing(&self, name: &str) -> Result<PathBuf> {
        let p = self.path(name)?;
        if p.exists() {
            Ok(p)
        } else {
            Err(StorageError::NotFound(name.to_string()))
        }
    }

    fn fresh(&self, name: &str) -> Result<PathBuf> {
        let p = self.path(name)?;
        if p.exists() {
            Err(StorageError::AlreadyExists(name.to_string()))
        } else {
            Ok(p)
        }
    }

    fn has_snapshot(&self, path: &Path, name: &str, snap: &str) -> Result<()> {
        check_name(snap)?;
        let info = qemu_img_info(path, Some(Format::Qcow2))?;
        if info.snapshots.iter().any(|s| s.name == snap) {
            Ok(())
        } else {
            Err(StorageError::SnapshotNotFound {
                volume: name.to_string(),
                snap: snap.to_string(),
            })
        }
    }

    /// Run a command that writes `path`, removing the partial file on error.
    fn producing(path: &Path, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let r = f();
        if r.is_err() {
            let _ = std::fs::remove_file(path);
        }
        r
    }
}

fn grow_to(path: &Path, name: &str, size: Option<u64>) -> Result<()> {
    if let Some(size) = size {
        let cur = qemu_img_info(path, Some(Format::Qcow2))?.virtual_size;
        if size > cur {
            resize_qcow2(path, name, size)?;
        }
    }
    Ok(())
}

fn resize_qcow2(path: &Path, name: &str, size: u64) -> Result<()> {
    let cur = qemu_img_info(path, Some(Format::Qcow2))?.virtual_size;
    if size < cur {
        return Err(StorageError::Shrink {
            volume: name.to_string(),
            from: cur,
            to: size,
        });
    }
    if size > cur {
        run(
            "qemu-img",
            [
                "resize".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                path.as_os_str(),
                size.to_string().as_ref(),
            ],
        )?;
    }
    Ok(())
}

impl StorageBackend for DirPool {
    fn kind(&self) -> &'static str {
        "dir"
    }

    fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.path(name)?.exists())
    }

    fn create(&self, name: &str, size: u64) -> Result<()> {
        let p = self.fresh(name)?;
        Self::producing(&p, || {
            run(
                "qemu-img",
                [
                    "create".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    p.as_os_str(),
                    size.to_string().as_ref(),
                ],
            )
            .map(drop)
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
        let p = self.fresh(name)?;
        let image = absolute(image)?;
        if !image.is_file() {
            return Err(StorageError::Pool {
                path: image,
                message: "image file not found".into(),
            });
        }
        Self::producing(&p, || {
            match mode {
                CloneMode::Linked => run(
                    "qemu-img",
                    [
                        "create".as_ref(),
                        "-q".as_ref(),
                        "-f".as_ref(),
                        "qcow2".as_ref(),
                        "-F".as_ref(),
                        format.as_str().as_ref(),
                        "-b".as_ref(),
                        image.as_os_str(),
                        p.as_os_str(),
                    ],
                )?,
                CloneMode::Full => run(
                    "qemu-img",
                    [
                        "convert".as_ref(),
                        "-f".as_ref(),
                        format.as_str().as_ref(),
                        "-O".as_ref(),
                        "qcow2".as_ref(),
                        image.as_os_str(),
                        p.as_os_str(),
                    ],
                )?,
            };
            grow_to(&p, name, size)
        })
    }

    fn clone_volume(&self, src: &str, dst: &str) -> Result<()> {
        let s = self.existing(src)?;
        let d = self.fresh(dst)?;
        // A file copy keeps the qcow2 (and its reference to an immutable
        // image, if any); reflinks where the filesystem has them.
        Self::producing(&d, || {
            run(
                "cp",
                [
                    "--reflink=auto".as_ref(),
                    "--sparse=always".as_ref(),
                    s.as_os_str(),
                    d.as_os_str(),
                ],
            )
            .map(drop)
        })
    }

    fn snapshot(&self, name: &str, snap: &str) -> Result<()> {
        let p = self.existing(name)?;
        check_name(snap)?;
        if self.snapshots(name)?.iter().any(|s| s == snap) {
            return Err(StorageError::SnapshotExists {
                volume: name.to_string(),
                snap: snap.to_string(),
            });
        }
        run(
            "qemu-img",
            [
                "snapshot".as_ref(),
                "-c".as_ref(),
                snap.as_ref(),
                p.as_os_str(),
            ],
        )
        .map(drop)
    }

    fn snapshots(&self, name: &str) -> Result<Vec<String>> {
        let p = self.existing(name)?;
        Ok(qemu_img_info(&p, Some(Format::Qcow2))?
            .snapshots
            .into_iter()
            .map(|s| s.name)
            .collect())
    }

    fn revert(&self, name: &str, snap: &str) -> Result<()> {
        let p = self.existing(name)?;
        self.has_snapshot(&p, name, snap)?;
        run(
            "qemu-img",
            [
                "snapshot".as_ref(),
                "-a".as_ref(),
                snap.as_ref(),
                p.as_os_str(),
            ],
        )
        .map(drop)
    }

    fn delete_snapshot(&self, name: &str, snap: &str) -> Result<()> {
        let p = self.existing(name)?;
        self.has_snapshot(&p, name, snap)?;
        run(
            "qemu-img",
            [
                "snapshot".as_ref(),
                "-d".as_ref(),
                snap.as_ref(),
                p.as_os_str(),
            ],
        )
        .map(drop)
    }

    fn create_from_snapshot(&self, name: &str, snap: &str, dst: &str) -> Result<()> {
        let p = self.existing(name)?;
        self.has_snapshot(&p, name, snap)?;
        let d = self.fresh(dst)?;
        Self::producing(&d, || {
            run(
                "qemu-img",
                [
                    "convert".as_ref(),
                    // A snapshot's clusters are immutable while it
                    // exists: read it even while a guest runs on the file.
                    "-U".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    "-l".as_ref(),
                    format!("snapshot.name={snap}").as_ref(),
                    "-O".as_ref(),
                    "qcow2".as_ref(),
                    p.as_os_str(),
                    d.as_os_str(),
                ],
            )
            .map(drop)
        })
    }

    fn resize(&self, name: &str, size: u64) -> Result<()> {
        let p = self.existing(name)?;
        resize_qcow2(&p, name, size)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let p = self.path(name)?;
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io(p, e)),
        }
    }

    fn info(&self, name: &str) -> Result<VolumeInfo> {
        let p = self.existing(name)?;
        let i = qemu_img_info(&p, Some(Format::Qcow2))?;
        Ok(VolumeInfo {
            capacity: i.virtual_size,
            allocation: i.actual_size,
        })
    }

    fn disk(&self, name: &str) -> Result<DiskSource> {
        Ok(DiskSource::File {
            path: self.existing(name)?,
            format: Format::Qcow2,
        })
    }

    fn online_snapshot(&self) -> OnlineSnapshot {
        OnlineSnapshot::QemuInternal
    }
}
