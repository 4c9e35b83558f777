//! `rbd` pools: Ceph RBD images, driven through the `rbd` CLI (and
//! `qemu-img` with `rbd:` targets for imports). QEMU opens the images
//! through librbd (`-blockdev driver=rbd`), so nothing is mapped on the host.
//!
//! - Volumes are images `{pool}/{name}`; their format is always raw.
//! - Snapshots are RBD snapshots (`rbd snap create`, `rollback`, `rm`).
//! - Clones are copy-on-write RBD clones (constant time): a snapshot of the
//!   source is protected and cloned. A clone of a volume uses a hidden
//!   snapshot `_clone.{dst}` of its source, removed with the clone.
//! - A linked import of an image file first copies the file once into a
//!   hidden base image `_base.{key}` (key: the blob's sha256 name, or a hash
//!   of the file's path, size and mtime) with a protected snapshot `_base`;
//!   every linked volume of that image is a clone of it. A full import is a
//!   `qemu-img convert` into a new image.
//! - Deleting a volume (or snapshot) that other images were cloned from
//!   first flattens those images (copies the shared blocks into them), so
//!   they outlive their parent.
//!
//! Hidden names start with `_`, which [`check_name`] never accepts, so they
//! cannot collide with volumes or snapshots.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cmd::{absolute, run};
use crate::{
    CloneMode, DiskSource, Format, OnlineSnapshot, Result, StorageBackend, StorageError,
    VolumeInfo, check_name,
};

/// Snapshot of a base image that linked imports are cloned from.
const BASE_SNAP: &str = "_base";
const CLONE_SNAP_PREFIX: &str = "_clone.";
const BASE_PREFIX: &str = "_base.";

/// How to reach a Ceph cluster and which pool holds the volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdPool {
    pool: String,
    conf: Option<PathBuf>,
    monitors: Vec<String>,
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SnapEntry {
    name: String,
    #[serde(default)]
    protected: serde_json::Value,
}

impl SnapEntry {
    fn is_protected(&self) -> bool {
        match &self.protected {
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::String(s) => s == "true",
            _ => false,
        }
    }
}

#[derive(Debug, Deserialize)]
struct ImageInfo {
    size: u64,
    #[serde(default)]
    parent: Option<ParentInfo>,
}

#[derive(Debug, Deserialize)]
struct ParentInfo {
    #[serde(default)]
    pool: String,
    image: String,
    snapshot: String,
}

#[derive(Debug, Deserialize)]
struct ChildEntry {
    #[serde(default)]
    pool: String,
    image: String,
}

#[derive(Debug, Deserialize)]
struct DuOutput {
    #[serde(default)]
    images: Vec<DuEntry>,
}

#[derive(Debug, Deserialize)]
struct DuEntry {
    name: String,
    #[serde(default)]
    used_size: u64,
}

/// Pool and image names Ceph accepts and that need no escaping anywhere:
/// `[A-Za-z0-9._-]`, 1-100 characters.
fn check_pool_name(pool: &str) -> Result<()> {
    if !pool.is_empty()
        && pool.len() <= 100
        && pool
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Ok(())
    } else {
        Err(StorageError::Pool {
            path: PathBuf::from(pool),
            message: "invalid Ceph pool name: 1-100 characters of [A-Za-z0-9._-]".into(),
        })
    }
}

impl RbdPool {
    /// A pool on the cluster described by `conf` (a `ceph.conf`) and/or
    /// `monitors` (`host:port`), as Ceph user `user` (default `admin`).
    /// Checks that the pool can be listed.
    pub fn open(
        pool: &str,
        conf: Option<&Path>,
        monitors: &[String],
        user: Option<&str>,
    ) -> Result<Self> {
        check_pool_name(pool)?;
        if conf.is_none() && monitors.is_empty() {
            return Err(StorageError::Pool {
                path: PathBuf::from(pool),
                message: "an rbd pool needs a ceph.conf path or monitor addresses".into(),
            });
        }
        let p = RbdPool {
            pool: pool.to_string(),
            conf: conf.map(absolute).transpose()?,
            monitors: monitors.to_vec(),
            user: user.map(str::to_string),
        };
        p.list()?;
        Ok(p)
    }

    /// The Ceph pool.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    fn spec(&self, image: &str) -> String {
        format!("{}/{image}", self.pool)
    }

    /// Cluster options every `rbd` call gets, bounded so a dead cluster
    /// gives an error instead of a hang.
    fn base_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        if let Some(c) = &self.conf {
            a.push("--conf".into());
            a.push(c.into());
        }
        if !self.monitors.is_empty() {
            a.push("-m".into());
            a.push(self.monitors.join(",").into());
        }
        if let Some(u) = &self.user {
            a.push("--id".into());
            a.push(u.into());
        }
        for (k, v) in [
            ("--client-mount-timeout", "30"),
            ("--rados-mon-op-timeout", "60"),
            ("--rados-osd-op-timeout", "300"),
        ] {
            a.push(k.into());
            a.push(v.into());
        }
        a
    }

    fn rbd(&self, args: &[&str]) -> Result<String> {
        let mut a = self.base_args();
        a.extend(args.iter().map(OsString::from));
        run("rbd", a)
    }

    fn rbd_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        let mut a: Vec<&str> = args.to_vec();
        a.push("--format");
        a.push("json");
        let out = self.rbd(&a)?;
        serde_json::from_str(&out).map_err(|e| StorageError::Output {
            command: format!("rbd {}", args.join(" ")),
            message: e.to_string(),
        })
    }

    /// Image names in the pool.
    fn list(&self) -> Result<Vec<String>> {
        self.rbd_json(&["ls", &self.pool])
    }

    fn image_exists(&self, image: &str) -> Result<bool> {
        Ok(self.list()?.iter().any(|i| i == image))
    }

    fn existing(&self, name: &str) -> Result<()> {
        check_name(name)?;
        if self.image_exists(name)? {
            Ok(())
        } else {
            Err(StorageError::NotFound(name.to_string()))
        }
    }

    fn fresh(&self, name: &str) -> Result<()> {
        check_name(name)?;
        if self.image_exists(name)? {
            Err(StorageError::AlreadyExists(name.to_string()))
        } else {
            Ok(())
        }
    }

    fn image_info(&self, image: &str) -> Result<ImageInfo> {
        self.rbd_json(&["info", &self.spec(image)])
    }

    fn snaps(&self, image: &str) -> Result<Vec<SnapEntry>> {
        self.rbd_json(&["snap", "ls", &self.spec(image)])
    }

    fn existing_snap(&self, name: &str, snap: &str) -> Result<SnapEntry> {
        self.existing(name)?;
        check_name(snap)?;
        self.snaps(name)?
            .into_iter()
            .find(|s| s.name == snap)
            .ok_or_else(|| StorageError::SnapshotNotFound {
                volume: name.to_string(),
                snap: snap.to_string(),
            })
    }

    /// `pool/image@snap`.
    fn snap_spec(&self, image: &str, snap: &str) -> String {
        format!("{}/{image}@{snap}", self.pool)
    }

    fn protect(&self, image: &str, snap: &SnapEntry) -> Result<()> {
        if !snap.is_protected() {
            self.rbd(&["snap", "protect", &self.snap_spec(image, &snap.name)])?;
        }
        Ok(())
    }

    /// Copy-on-write clone of `image@snap` (protected first) as `dst`.
    fn clone_from(&self, image: &str, snap: &SnapEntry, dst: &str) -> Result<()> {
        self.protect(image, snap)?;
        self.rbd(&["clone", &self.snap_spec(image, &snap.name), &self.spec(dst)])
            .map(drop)
    }

    /// Make the clones of `image@snap` independent, unprotect and remove
    /// the snapshot.
    fn drop_snapshot(&self, image: &str, snap: &SnapEntry) -> Result<()> {
        let spec = self.snap_spec(image, &snap.name);
        if snap.is_protected() {
            let children: Vec<ChildEntry> = self.rbd_json(&["children", &spec])?;
            for c in children {
                let pool = if c.pool.is_empty() {
                    self.pool.clone()
                } else {
                    c.pool
                };
                self.rbd(&["flatten", "--no-progress", &format!("{pool}/{}", c.image)])?;
            }
            self.rbd(&["snap", "unprotect", &spec])?;
        }
        self.rbd(&["snap", "rm", "--no-progress", &spec]).map(drop)
    }

    /// Remove an image with all its snapshots (flattening its clones).
    fn remove_image(&self, image: &str) -> Result<()> {
        let parent = self.image_info(image)?.parent;
        for s in self.snaps(image)? {
            self.drop_snapshot(image, &s)?;
        }
        self.rbd(&["rm", "--no-progress", &self.spec(image)])?;
        // The hidden snapshot a volume clone was made from goes with the
        // clone (unless other clones share it).
        if let Some(p) = parent
            && (p.pool.is_empty() || p.pool == self.pool)
            && p.snapshot.starts_with(CLONE_SNAP_PREFIX)
            && let Some(s) = self
                .snaps(&p.image)
                .ok()
                .and_then(|v| v.into_iter().find(|s| s.name == p.snapshot))
        {
            let spec = self.snap_spec(&p.image, &s.name);
            let children: Vec<ChildEntry> = self.rbd_json(&["children", &spec])?;
            if children.is_empty() {
                self.drop_snapshot(&p.image, &s)?;
            }
        }
        Ok(())
    }

    /// qemu's `rbd:` filename of an image (for `qemu-img`).
    fn qemu_target(&self, image: &str) -> String {
        DiskSource::Rbd {
            pool: self.pool.clone(),
            image: image.to_string(),
            conf: self.conf.clone(),
            user: self.user.clone(),
            monitors: self.monitors.clone(),
        }
        .qemu_filename()
    }

    /// Copy an image file into a new image (qemu-img creates it).
    fn convert_into(&self, image: &Path, format: Format, dst: &str) -> Result<()> {
        let target = self.qemu_target(dst);
        let r = run(
            "qemu-img",
            [
                "convert".as_ref(),
                "-f".as_ref(),
                format.as_str().as_ref(),
                "-O".as_ref(),
                "raw".as_ref(),
                image.as_os_str(),
                target.as_ref(),
            ],
        );
        if r.is_err() {
            let _ = self.rbd(&["rm", "--no-progress", &self.spec(dst)]);
        }
        r.map(drop)
    }

    /// The base image linked imports of `image` are cloned from, made on
    /// first use.
    fn base_for(&self, image: &Path, format: Format) -> Result<String> {
        let base = format!("{BASE_PREFIX}{}", image_key(image)?);
        if self.image_exists(&base)? && self.snaps(&base)?.iter().any(|s| s.name == BASE_SNAP) {
            return Ok(base);
        }
        // Build it under a private name and rename it into place, so two
        // importers never see a half-made base.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = format!("_tmp.{}.{}.{nanos}", image_key(image)?, std::process::id());
        self.convert_into(image, format, &tmp)?;
        let made = (|| {
            self.rbd(&["snap", "create", &self.snap_spec(&tmp, BASE_SNAP)])?;
            self.rbd(&["snap", "protect", &self.snap_spec(&tmp, BASE_SNAP)])?;
            self.rbd(&["rename", &self.spec(&tmp), &self.spec(&base)])
        })();
        if let Err(e) = made {
            let _ = self.remove_image(&tmp);
            // Someone else made it meanwhile: use theirs.
            if self.image_exists(&base)? {
                return Ok(base);
            }
            return Err(e);
        }
        Ok(base)
    }

    fn grow(&self, name: &str, size: Option<u64>) -> Result<()> {
        if let Some(size) = size
            && size > self.image_info(name)?.size
        {
            self.resize(name, size)?;
        }
        Ok(())
    }

    /// Remove the hidden base images no volume is cloned from any more.
    /// Returns their number.
    pub fn gc_bases(&self) -> Result<usize> {
        let mut n = 0;
        for img in self.list()? {
            if !img.starts_with(BASE_PREFIX) {
                continue;
            }
            let spec = self.snap_spec(&img, BASE_SNAP);
            let children: Vec<ChildEntry> = self.rbd_json(&["children", &spec])?;
            if children.is_empty() {
                self.remove_image(&img)?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// A stable name for an image file: its file name when that is a sha256
/// hex digest (image store blobs), else a hash of path, size and mtime.
fn image_key(image: &Path) -> Result<String> {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(name.to_ascii_lowercase());
    }
    let meta = std::fs::metadata(image).map_err(|e| StorageError::io(image, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // FNV-1a: stable across builds (unlike std's hasher).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let text = format!("{}\0{}\0{mtime}", image.display(), meta.len());
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Ok(format!("f{h:016x}"))
}

impl StorageBackend for RbdPool {
    fn kind(&self) -> &'static str {
        "rbd"
    }

    fn exists(&self, name: &str) -> Result<bool> {
        check_name(name)?;
        self.image_exists(name)
    }

    fn create(&self, name: &str, size: u64) -> Result<()> {
        self.fresh(name)?;
        self.rbd(&["create", "--size", &format!("{size}B"), &self.spec(name)])
            .map(drop)
    }

    fn import(
        &self,
        name: &str,
        image: &Path,
        format: Format,
        mode: CloneMode,
        size: Option<u64>,
    ) -> Result<()> {
        self.fresh(name)?;
        let image = absolute(image)?;
        if !image.is_file() {
            return Err(StorageError::Pool {
                path: image,
                message: "image file not found".into(),
            });
        }
        match mode {
            CloneMode::Full => self.convert_into(&image, format, name)?,
            CloneMode::Linked => {
                let base = self.base_for(&image, format)?;
                let snap = self
                    .snaps(&base)?
                    .into_iter()
                    .find(|s| s.name == BASE_SNAP)
                    .ok_or_else(|| StorageError::Pool {
                        path: PathBuf::from(self.spec(&base)),
                        message: "base image has no _base snapshot".into(),
                    })?;
                self.clone_from(&base, &snap, name)?;
            }
        }
        if let Err(e) = self.grow(name, size) {
            let _ = self.remove_image(name);
            return Err(e);
        }
        Ok(())
    }

    fn clone_volume(&self, src: &str, dst: &str) -> Result<()> {
        self.existing(src)?;
        self.fresh(dst)?;
        let snap = format!("{CLONE_SNAP_PREFIX}{dst}");
        let spec = self.snap_spec(src, &snap);
        // A leftover of an earlier attempt is reused.
        let entry = match self.snaps(src)?.into_iter().find(|s| s.name == snap) {
            Some(e) => e,
            None => {
                self.rbd(&["snap", "create", &spec])?;
                SnapEntry {
                    name: snap.clone(),
                    protected: serde_json::Value::Bool(false),
                }
            }
        };
        self.clone_from(src, &entry, dst)
    }

    fn snapshot(&self, name: &str, snap: &str) -> Result<()> {
        self.existing(name)?;
        check_name(snap)?;
        if self.snaps(name)?.iter().any(|s| s.name == snap) {
            return Err(StorageError::SnapshotExists {
                volume: name.to_string(),
                snap: snap.to_string(),
            });
        }
        self.rbd(&["snap", "create", &self.snap_spec(name, snap)])
            .map(drop)
    }

    fn snapshots(&self, name: &str) -> Result<Vec<String>> {
        self.existing(name)?;
        Ok(self
            .snaps(name)?
            .into_iter()
            .map(|s| s.name)
            .filter(|n| !n.starts_with('_'))
            .collect())
    }

    fn revert(&self, name: &str, snap: &str) -> Result<()> {
        self.existing_snap(name, snap)?;
        self.rbd(&[
            "snap",
            "rollback",
            "--no-progress",
            &self.snap_spec(name, snap),
        ])
        .map(drop)
    }

    fn delete_snapshot(&self, name: &str, snap: &str) -> Result<()> {
        let s = self.existing_snap(name, snap)?;
        self.drop_snapshot(name, &s)
    }

    fn create_from_snapshot(&self, name: &str, snap: &str, dst: &str) -> Result<()> {
        let s = self.existing_snap(name, snap)?;
        self.fresh(dst)?;
        self.clone_from(name, &s, dst)
    }

    fn resize(&self, name: &str, size: u64) -> Result<()> {
        self.existing(name)?;
        let cur = self.image_info(name)?.size;
        if size < cur {
            return Err(StorageError::Shrink {
                volume: name.to_string(),
                from: cur,
                to: size,
            });
        }
        if size > cur {
            self.rbd(&[
                "resize",
                "--no-progress",
                "--size",
                &format!("{size}B"),
                &self.spec(name),
            ])?;
        }
        Ok(())
    }

    fn delete(&self, name: &str) -> Result<()> {
        check_name(name)?;
        if !self.image_exists(name)? {
            return Ok(());
        }
        self.remove_image(name)
    }

    fn info(&self, name: &str) -> Result<VolumeInfo> {
        self.existing(name)?;
        let capacity = self.image_info(name)?.size;
        let du: DuOutput = self.rbd_json(&["du", &self.spec(name)])?;
        let allocation = du
            .images
            .iter()
            .filter(|e| e.name == name)
            .map(|e| e.used_size)
            .sum();
        Ok(VolumeInfo {
            capacity,
            allocation,
        })
    }

    fn disk(&self, name: &str) -> Result<DiskSource> {
        self.existing(name)?;
        Ok(DiskSource::Rbd {
            pool: self.pool.clone(),
            image: name.to_string(),
            conf: self.conf.clone(),
            user: self.user.clone(),
            monitors: self.monitors.clone(),
        })
    }

    fn online_snapshot(&self) -> OnlineSnapshot {
        // `rbd snap create` while QEMU is paused (QMP `stop` drains and
        // flushes librbd's cache first).
        OnlineSnapshot::WhilePaused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_names() {
        let hex = "a".repeat(64);
        assert_eq!(image_key(Path::new(&format!("/x/{hex}"))).unwrap(), hex);
        assert!(check_pool_name("rbd").is_ok());
        assert!(check_pool_name("a/b").is_err());
        assert!(check_pool_name("").is_err());
        assert!(RbdPool::open("rbd", None, &[], None).is_err());
    }
}
