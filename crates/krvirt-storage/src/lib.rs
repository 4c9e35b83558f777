//! Storage pools behind one backend trait.
//!
//! A pool holds named volumes (virtual disks). Every backend can create a
//! blank volume of a size, import one from an image file (a linked clone
//! that shares the image's blocks, or a full copy), clone a volume, take,
//! list, revert to and delete named snapshots, make a new volume from a
//! snapshot, resize, report capacity and allocation, and say how QEMU opens
//! the volume ([`DiskSource`]).
//!
//! Backends:
//! - [`DirPool`]: qcow2 files in a directory. Linked clone of an image =
//!   qcow2 overlay on it; snapshots are qcow2 internal snapshots (QEMU can
//!   take them on a running guest, atomically across disks, with a QMP
//!   `transaction` of `blockdev-snapshot-internal-sync`).
//! - [`BtrfsPool`]: one btrfs subvolume per volume holding a raw file;
//!   clones and snapshots are subvolume snapshots (constant time, copy on
//!   write), raw images are imported with reflinks.
//!
//! All operations are blocking (they run `qemu-img` and `btrfs`); async
//! callers run them on a blocking thread.

mod btrfs;
mod cmd;
mod dir;
mod error;
mod rbd;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use btrfs::BtrfsPool;
pub use dir::DirPool;
pub use error::StorageError;
pub use rbd::RbdPool;

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// On-disk format of a file-backed volume or image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// How QEMU opens a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DiskSource {
    /// A local file (`-blockdev driver=file` + format node).
    File { path: PathBuf, format: Format },
    /// A Ceph RBD image, raw (`-blockdev driver=rbd`, through librbd).
    Rbd {
        /// Ceph pool.
        pool: String,
        image: String,
        /// `ceph.conf` path.
        conf: Option<PathBuf>,
        /// Ceph user (without `client.`); librbd's default when absent.
        user: Option<String>,
        /// Monitor addresses `host:port` (else those of `conf`).
        monitors: Vec<String>,
    },
}

/// Escape `:` and `\` for QEMU's `rbd:` filename syntax.
fn rbd_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == ':' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl DiskSource {
    /// The filename `qemu-img` and `qemu-io` open: the path of a file, or
    /// `rbd:POOL/IMAGE[:conf=…][:id=…][:mon_host=…]`.
    pub fn qemu_filename(&self) -> String {
        match self {
            DiskSource::File { path, .. } => path.display().to_string(),
            DiskSource::Rbd {
                pool,
                image,
                conf,
                user,
                monitors,
            } => {
                let mut s = format!("rbd:{}/{}", rbd_escape(pool), rbd_escape(image));
                if let Some(c) = conf {
                    s.push_str(&format!(":conf={}", rbd_escape(&c.display().to_string())));
                }
                if let Some(u) = user {
                    s.push_str(&format!(":id={}", rbd_escape(u)));
                }
                if !monitors.is_empty() {
                    s.push_str(&format!(":mon_host={}", rbd_escape(&monitors.join(","))));
                }
                s
            }
        }
    }

    /// The format QEMU's format node uses (RBD images are raw).
    pub fn format(&self) -> Format {
        match self {
            DiskSource::File { format, .. } => *format,
            DiskSource::Rbd { .. } => Format::Raw,
        }
    }
}

/// Whether an import or clone shares blocks with its source or copies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CloneMode {
    /// Share the source's blocks (qcow2 overlay, reflink, subvolume
    /// snapshot): constant time, the source must stay.
    #[default]
    Linked,
    /// An independent copy.
    Full,
}

/// Size of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Virtual size the guest sees, bytes.
    pub capacity: u64,
    /// Bytes the volume occupies in the pool.
    pub allocation: u64,
}

/// How a snapshot of a volume attached to a running guest is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnlineSnapshot {
    /// By QEMU: `blockdev-snapshot-internal-sync` on the format node (all
    /// disks of a guest in one QMP `transaction`).
    QemuInternal,
    /// By the backend ([`StorageBackend::snapshot`]) while the guest is
    /// paused (QMP `stop`, which drains in-flight I/O, then `cont`).
    WhilePaused,
}

/// A storage pool.
pub trait StorageBackend: Send + Sync {
    /// Short type name (`dir`, `btrfs`, `rbd`).
    fn kind(&self) -> &'static str;
    /// Whether a volume exists.
    fn exists(&self, name: &str) -> Result<bool>;
    /// A blank volume of `size` bytes.
    fn create(&self, name: &str, size: u64) -> Result<()>;
    /// A volume from an image file of `format`; grown to `size` when given
    /// and larger than the image.
    fn import(
        &self,
        name: &str,
        image: &Path,
        format: Format,
        mode: CloneMode,
        size: Option<u64>,
    ) -> Result<()>;
    /// A new volume `dst` with the current content of volume `src`.
    fn clone_volume(&self, src: &str, dst: &str) -> Result<()>;
    /// A named, read-only point-in-time copy of a volume.
    fn snapshot(&self, name: &str, snap: &str) -> Result<()>;
    /// Names of a volume's snapshots.
    fn snapshots(&self, name: &str) -> Result<Vec<String>>;
    /// Put a volume back to a snapshot (the volume must not be in use).
    fn revert(&self, name: &str, snap: &str) -> Result<()>;
    /// Drop one snapshot; the volume and the other snapshots stay.
    fn delete_snapshot(&self, name: &str, snap: &str) -> Result<()>;
    /// A new volume `dst` with the content of snapshot `snap` of `name`.
    fn create_from_snapshot(&self, name: &str, snap: &str, dst: &str) -> Result<()>;
    /// Grow a volume to `size` bytes (shrinking is refused).
    fn resize(&self, name: &str, size: u64) -> Result<()>;
    /// Remove a volume and its snapshots. Removing a missing volume is not
    /// an error.
    fn delete(&self, name: &str) -> Result<()>;
    /// Capacity and allocation.
    fn info(&self, name: &str) -> Result<VolumeInfo>;
    /// How QEMU opens the volume.
    fn disk(&self, name: &str) -> Result<DiskSource>;
    /// How a snapshot is taken while a guest runs on the volume.
    fn online_snapshot(&self) -> OnlineSnapshot;
}

/// A pool's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PoolConfig {
    Dir {
        path: PathBuf,
    },
    Btrfs {
        path: PathBuf,
    },
    /// A Ceph pool, reached through `conf` and/or `monitors` as `user`.
    Rbd {
        pool: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conf: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        monitors: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
}

/// Open a pool (creating the directory of a `dir` pool; an `rbd` pool is
/// checked by listing it).
pub fn open(config: &PoolConfig) -> Result<Box<dyn StorageBackend>> {
    Ok(match config {
        PoolConfig::Dir { path } => Box::new(DirPool::open(path)?),
        PoolConfig::Btrfs { path } => Box::new(BtrfsPool::open(path)?),
        PoolConfig::Rbd {
            pool,
            conf,
            monitors,
            user,
        } => Box::new(RbdPool::open(
            pool,
            conf.as_deref(),
            monitors,
            user.as_deref(),
        )?),
    })
}

/// Volume and snapshot names: 1-200 characters of `[a-z0-9._-]`, starting
/// with a letter or digit (no path separators, no hidden files).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidName(name.to_string()))
    }
}

/// Virtual size of an image file, from `qemu-img info`.
pub fn image_virtual_size(path: &Path, format: Format) -> Result<u64> {
    Ok(cmd::qemu_img_info(path, Some(format))?.virtual_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "default.root-disk", "v_1", "0x"] {
            check_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "..", "A", "-x", &"x".repeat(201)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
