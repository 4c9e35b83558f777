//! Content-addressed image store: blobs named by their sha256, a catalog of
//! images with version tags and tag history, qcow2 layering, verification
//! before use and garbage collection.
//!
//! Layout under the store directory (`DATA/images`):
//!
//! ```text
//! blobs/sha256/<hex>     immutable blob files (mode 0444), one per digest
//! tmp/                   imports in progress (streamed, hashed while written)
//! catalog.json           images, tags, tag history, blob records, pulled references
//! ```
//!
//! A layered image is a qcow2 overlay whose backing file is its parent
//! blob's bare hex name: blobs live in one directory, and QEMU resolves a
//! relative backing name against the overlay's directory, so the chain
//! works without absolute paths and the digest does not depend on where
//! the store lives.
//!
//! Verification: a blob is hashed on import, and again before each use
//! unless its (device, inode, size, mtime, ctime) is the one recorded at the
//! last full hash. Any write to the file through the filesystem moves its
//! ctime (which, unlike mtime, cannot be set back from userspace), so a
//! flipped byte always forces a full re-hash and is caught. Corruption
//! below the filesystem (bit rot) does not move ctime:
//! [`ImageStore::verify`] with `full = true` re-hashes regardless.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::alias::{ImageError, ImageStore, valid_name};

/// Catalog file name in the store directory.
pub const CATALOG_FILE: &str = "catalog.json";
/// Default tag when a reference has none.
pub const DEFAULT_TAG: &str = "latest";

/// Disk format of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobFormat {
    Raw,
    Qcow2,
}

impl BlobFormat {
    /// QEMU's driver name.
    pub fn as_str(&self) -> &'static str {
        match self {
            BlobFormat::Raw => "raw",
            BlobFormat::Qcow2 => "qcow2",
        }
    }
}

/// File identity at the last full hash.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        }
    }
}

/// One stored blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlobRecord {
    pub size: u64,
    pub format: BlobFormat,
    /// Digest of the blob this qcow2 overlay is layered on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Where it came from (file path, URL, registry reference, upload).
    pub source: String,
    pub imported: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<Stamp>,
    /// Set when the last verification failed: what was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// One change of a tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TagEvent {
    pub time: String,
    pub tag: String,
    /// New digest (None: the tag was removed).
    #[serde(default)]
    pub digest: Option<String>,
    /// Digest the tag pointed at before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
}

/// An image: tags and their history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub history: Vec<TagEvent>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DemoSource {
    path: PathBuf,
    stamp: Stamp,
    digest: String,
}

/// The catalog file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Catalog {
    #[serde(default)]
    pub images: BTreeMap<String, ImageRecord>,
    #[serde(default)]
    pub blobs: BTreeMap<String, BlobRecord>,
    /// Pulled container references (normalized) -> `name:tag`.
    #[serde(default)]
    pub references: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    demo: Option<DemoSource>,
}

/// `name[:tag]`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameTag {
    pub name: String,
    pub tag: String,
}

impl std::fmt::Display for NameTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

impl NameTag {
    /// Parse `name` or `name:tag` (`latest` by default).
    pub fn parse(s: &str) -> Result<NameTag, ImageError> {
        let (name, tag) = s.split_once(':').unwrap_or((s, DEFAULT_TAG));
        let invalid = |reason: String| ImageError::Invalid {
            what: format!("image name {s:?}"),
            reason,
        };
        // No '_': the name is also the Image object's name (a DNS-1123 subdomain).
        if !valid_name(name) || name.contains('_') || name.ends_with(['.', '-']) {
            return Err(invalid(
                "the name must match [a-z0-9]([a-z0-9.-]*[a-z0-9])? (max 128 chars)".into(),
            ));
        }
        if !valid_tag(tag) {
            return Err(invalid(
                "the tag must match [A-Za-z0-9_][A-Za-z0-9_.-]* (max 128 chars)".into(),
            ));
        }
        Ok(NameTag {
            name: name.into(),
            tag: tag.into(),
        })
    }
}

pub(crate) fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && !t.starts_with(['.', '-'])
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

/// What to record for an import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// `name:tag` to point at the new blob.
    pub target: NameTag,
    /// Layer the blob (a qcow2 overlay) on this image (`name:tag`).
    pub base: Option<NameTag>,
    /// Where it came from, for the record.
    pub source: String,
    /// Refuse the content unless it hashes to this digest.
    pub expected_digest: Option<String>,
}

impl ImportOptions {
    pub fn new(target: NameTag, source: impl Into<String>) -> Self {
        ImportOptions {
            target,
            base: None,
            source: source.into(),
            expected_digest: None,
        }
    }
}

/// Result of an import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Imported {
    pub image: String,
    pub digest: String,
    pub size: u64,
    pub format: BlobFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// A blob being written: content is hashed as it streams to a temp file.
pub struct BlobWriter {
    file: File,
    path: PathBuf,
    hasher: Sha256,
    size: u64,
    done: bool,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One element of an image's layer chain (top first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainEntry {
    pub digest: String,
    pub size: u64,
    pub format: BlobFormat,
    pub source: String,
    pub imported: String,
    /// `name:tag`s pointing at this blob.
    pub tags: Vec<String>,
    pub path: PathBuf,
}

/// `krvirt image inspect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    pub image: String,
    pub digest: String,
    /// The image's blob first, then its base, its base's base, ...
    pub chain: Vec<ChainEntry>,
    pub history: Vec<TagEvent>,
}

/// One row of `krvirt image list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageSummary {
    pub name: String,
    pub tag: String,
    pub digest: String,
    pub size: u64,
    pub format: BlobFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// What garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcReport {
    pub removed: Vec<String>,
    pub freed_bytes: u64,
    /// Blobs kept only because a VM disk outside the catalog uses them.
    pub kept_in_use: Vec<String>,
}

/// Hash a file (sha256), 1 MiB at a time.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

fn detect_format(path: &Path) -> io::Result<BlobFormat> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path)?;
    Ok(match f.read_exact(&mut magic) {
        Ok(()) if magic == *b"QFI\xfb" => BlobFormat::Qcow2,
        _ => BlobFormat::Raw,
    })
}

/// The backing file name in a qcow2 header (None: no backing file or not qcow2).
pub fn qcow2_backing_file(path: &Path) -> io::Result<Option<String>> {
    let mut f = File::open(path)?;
    let mut hdr = [0u8; 20];
    if f.read_exact(&mut hdr).is_err() || hdr[..4] != *b"QFI\xfb" {
        return Ok(None);
    }
    let off = u64::from_be_bytes(hdr[8..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(hdr[16..20].try_into().unwrap_or_default());
    if off == 0 || len == 0 || len > 4096 {
        return Ok(None);
    }
    use std::io::Seek;
    f.seek(io::SeekFrom::Start(off))?;
    let mut name = vec![0u8; len as usize];
    f.read_exact(&mut name)?;
    Ok(Some(String::from_utf8_lossy(&name).into_owned()))
}

fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<(), ImageError> {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| ImageError::Invalid {
            what: "qemu-img".into(),
            reason: format!("cannot run it ({e}); install the Debian package qemu-utils"),
        })?;
    if !out.status.success() {
        return Err(ImageError::Invalid {
            what: "qemu-img".into(),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

impl ImageStore {
    fn blob_dir(&self) -> PathBuf {
        self.dir.join("blobs").join("sha256")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    fn catalog_path(&self) -> PathBuf {
        self.dir.join(CATALOG_FILE)
    }

    /// Path of a blob by digest (`sha256:<hex>`).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        if !valid_digest(digest) {
            return Err(ImageError::Invalid {
                what: format!("digest {digest:?}"),
                reason: "expected sha256:<64 lowercase hex digits>".into(),
            });
        }
        Ok(self.blob_dir().join(&digest["sha256:".len()..]))
    }

    /// Read the catalog.
    pub fn catalog(&self) -> Result<Catalog, ImageError> {
        let path = self.catalog_path();
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| ImageError::AliasFile {
                path,
                reason: format!("corrupt catalog: {e}"),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Catalog::default()),
            Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
        }
    }

    fn save_catalog(&self, c: &Catalog) -> Result<(), ImageError> {
        let path = self.catalog_path();
        let tmp = self.dir.join(format!(".{CATALOG_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(c).map_err(|e| ImageError::Invalid {
            what: "catalog".into(),
            reason: e.to_string(),
        })?;
        let mut f = File::create(&tmp).map_err(io_err(format!("writing {}", tmp.display())))?;
        f.write_all(&text)
            .and_then(|()| f.sync_all())
            .map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io_err(format!("renaming to {}", path.display())))
    }

    /// Change the catalog under the store's lock.
    fn edit<T>(
        &self,
        f: impl FnOnce(&mut Catalog) -> Result<T, ImageError>,
    ) -> Result<T, ImageError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut c = self.catalog()?;
        let before = c.clone();
        let out = f(&mut c)?;
        if c != before {
            self.save_catalog(&c)?;
        }
        Ok(out)
    }

    /// Start streaming a new blob.
    pub fn blob_writer(&self) -> Result<BlobWriter, ImageError> {
        let tmp = self.tmp_dir();
        std::fs::create_dir_all(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        let path = tmp.join(format!("import-{}", uuid_like()));
        let file = File::create(&path).map_err(io_err(format!("creating {}", path.display())))?;
        Ok(BlobWriter {
            file,
            path,
            hasher: Sha256::new(),
            size: 0,
            done: false,
        })
    }

    /// Finish a streamed blob: check the digest, layer it if asked, move it
    /// into place and tag it.
    pub fn commit(&self, mut w: BlobWriter, opts: &ImportOptions) -> Result<Imported, ImageError> {
        w.file
            .sync_all()
            .map_err(io_err(format!("syncing {}", w.path.display())))?;
        let mut digest = format!("sha256:{}", hex::encode(w.hasher.clone().finalize()));
        if let Some(exp) = &opts.expected_digest
            && *exp != digest
        {
            return Err(ImageError::DigestMismatch {
                what: opts.source.clone(),
                expected: exp.clone(),
                actual: digest,
            });
        }
        let format = detect_format(&w.path).map_err(io_err("reading the import"))?;
        let mut parent = None;
        if let Some(base) = &opts.base {
            let cat = self.catalog()?;
            let pd = lookup(&cat, base)?;
            self.verify(&pd, false)?;
            let prec = cat.blobs.get(&pd).ok_or_else(|| missing_blob(&pd))?;
            if format != BlobFormat::Qcow2 {
                return Err(ImageError::Invalid {
                    what: opts.source.clone(),
                    reason: "a layer must be a qcow2 overlay (qemu-img create -f qcow2 -b BASE)"
                        .into(),
                });
            }
            // Point the overlay at its parent by bare hex name (same directory).
            let hexname = &pd["sha256:".len()..];
            qemu_img(&[
                "rebase".as_ref(),
                "-u".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-F".as_ref(),
                prec.format.as_str().as_ref(),
                "-b".as_ref(),
                hexname.as_ref(),
                w.path.as_os_str(),
            ])?;
            digest = sha256_file(&w.path).map_err(io_err("hashing the layer"))?;
            parent = Some(pd);
        } else if format == BlobFormat::Qcow2
            && let Some(b) = qcow2_backing_file(&w.path).map_err(io_err("reading qcow2 header"))?
        {
            return Err(ImageError::Invalid {
                what: opts.source.clone(),
                reason: format!(
                    "this qcow2 has a backing file ({b}); import its base first and give it as the base image"
                ),
            });
        }
        let dest = self.blob_path(&digest)?;
        let bd = self.blob_dir();
        std::fs::create_dir_all(&bd).map_err(io_err(format!("creating {}", bd.display())))?;
        let size = w.size;
        let tmp = w.path.clone();
        self.edit(|c| {
            if !dest.exists() {
                let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444));
                std::fs::rename(&tmp, &dest)
                    .map_err(io_err(format!("moving the blob to {}", dest.display())))?;
                let m = std::fs::metadata(&dest).map_err(io_err("stat blob"))?;
                c.blobs.insert(
                    digest.clone(),
                    BlobRecord {
                        size,
                        format,
                        parent: parent.clone(),
                        source: opts.source.clone(),
                        imported: now(),
                        verified: Some(Stamp::of(&m)),
                        failure: None,
                    },
                );
            } else if !c.blobs.contains_key(&digest) {
                // A blob file left by an interrupted import: keep the record straight.
                let m = std::fs::metadata(&dest).map_err(io_err("stat blob"))?;
                c.blobs.insert(
                    digest.clone(),
                    BlobRecord {
                        size: m.size(),
                        format,
                        parent: parent.clone(),
                        source: opts.source.clone(),
                        imported: now(),
                        verified: None,
                        failure: None,
                    },
                );
            }
            set_tag(c, &opts.target, &digest);
            Ok(())
        })?;
        w.done = !tmp.exists();
        Ok(Imported {
            image: opts.target.to_string(),
            digest,
            size,
            format,
            parent,
        })
    }

    /// Import from anything readable (a file, an upload body).
    pub fn import_reader(
        &self,
        r: &mut dyn Read,
        opts: &ImportOptions,
    ) -> Result<Imported, ImageError> {
        let mut w = self.blob_writer()?;
        io::copy(r, &mut w).map_err(io_err(format!("importing {}", opts.source)))?;
        self.commit(w, opts)
    }

    /// Import a local file.
    pub fn import_file(&self, path: &Path, opts: &ImportOptions) -> Result<Imported, ImageError> {
        let mut f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
        self.import_reader(&mut f, opts)
    }

    /// Import the built-in demo disk as `demo-disk:latest` (skipped when the
    /// cached build is the one imported last time).
    pub(crate) fn import_demo(&self) -> Result<(), ImageError> {
        let src = self.demo.disk.clone();
        let m = std::fs::metadata(&src).map_err(io_err(format!("stat {}", src.display())))?;
        let stamp = Stamp::of(&m);
        let cat = self.catalog()?;
        let target = NameTag {
            name: crate::alias::DEMO_DISK.into(),
            tag: DEFAULT_TAG.into(),
        };
        if let Some(d) = &cat.demo
            && d.path == src
            && d.stamp == stamp
            && cat.blobs.contains_key(&d.digest)
            && lookup(&cat, &target).ok().as_deref() == Some(d.digest.as_str())
            && self.blob_path(&d.digest)?.is_file()
        {
            return Ok(());
        }
        let imp = self.import_file(&src, &ImportOptions::new(target, "built-in demo guest"))?;
        self.edit(|c| {
            c.demo = Some(DemoSource {
                path: src.clone(),
                stamp,
                digest: imp.digest.clone(),
            });
            Ok(())
        })
    }

    /// Point `target` at what `source` (`name:tag` or a digest) points at.
    pub fn tag(&self, source: &str, target: &NameTag) -> Result<String, ImageError> {
        self.edit(|c| {
            let digest = if source.starts_with("sha256:") {
                if !c.blobs.contains_key(source) {
                    return Err(missing_blob(source));
                }
                source.to_string()
            } else {
                lookup(c, &NameTag::parse(source)?)?
            };
            set_tag(c, target, &digest);
            Ok(digest)
        })
    }

    /// Remove a tag (`name:tag`), or every tag of an image (`name` with
    /// `all`). Blobs stay until [`ImageStore::gc`].
    pub fn untag(&self, nt: &NameTag, all: bool) -> Result<Vec<String>, ImageError> {
        self.edit(|c| {
            let rec = c
                .images
                .get_mut(&nt.name)
                .ok_or_else(|| ImageError::UnknownImage {
                    image: nt.to_string(),
                })?;
            let tags: Vec<String> = if all {
                rec.tags.keys().cloned().collect()
            } else if rec.tags.contains_key(&nt.tag) {
                vec![nt.tag.clone()]
            } else {
                return Err(ImageError::UnknownImage {
                    image: nt.to_string(),
                });
            };
            for t in &tags {
                let prev = rec.tags.remove(t);
                rec.history.push(TagEvent {
                    time: now(),
                    tag: t.clone(),
                    digest: None,
                    previous: prev,
                });
            }
            if rec.tags.is_empty() {
                c.images.remove(&nt.name);
            }
            c.references.retain(|_, v| {
                NameTag::parse(v)
                    .map(|x| x.name != nt.name || !tags.contains(&x.tag))
                    .unwrap_or(false)
            });
            Ok(tags.iter().map(|t| format!("{}:{t}", nt.name)).collect())
        })
    }

    /// Record that a container reference was pulled into `target`.
    pub fn record_reference(&self, reference: &str, target: &NameTag) -> Result<(), ImageError> {
        let key = normalized(reference)?;
        self.edit(|c| {
            c.references.insert(key, target.to_string());
            Ok(())
        })
    }

    /// The digest a `name:tag` points at.
    pub fn digest_of(&self, nt: &NameTag) -> Result<String, ImageError> {
        lookup(&self.catalog()?, nt)
    }

    /// Every tag of every image.
    pub fn list(&self) -> Result<Vec<ImageSummary>, ImageError> {
        let c = self.catalog()?;
        let mut out = Vec::new();
        for (name, rec) in &c.images {
            for (tag, digest) in &rec.tags {
                let b = c.blobs.get(digest);
                out.push(ImageSummary {
                    name: name.clone(),
                    tag: tag.clone(),
                    digest: digest.clone(),
                    size: b.map_or(0, |b| b.size),
                    format: b.map_or(BlobFormat::Raw, |b| b.format),
                    parent: b.and_then(|b| b.parent.clone()),
                    failure: b.and_then(|b| b.failure.clone()),
                });
            }
        }
        Ok(out)
    }

    /// An image's layer chain and tag history.
    pub fn inspect(&self, nt: &NameTag) -> Result<Inspection, ImageError> {
        let c = self.catalog()?;
        let digest = lookup(&c, nt)?;
        let mut chain = Vec::new();
        for d in chain_of(&c, &digest)? {
            let b = c.blobs.get(&d).ok_or_else(|| missing_blob(&d))?;
            let tags = c
                .images
                .iter()
                .flat_map(|(n, r)| {
                    r.tags
                        .iter()
                        .filter(|(_, v)| **v == d)
                        .map(move |(t, _)| format!("{n}:{t}"))
                })
                .collect();
            chain.push(ChainEntry {
                path: self.blob_path(&d)?,
                digest: d,
                size: b.size,
                format: b.format,
                source: b.source.clone(),
                imported: b.imported.clone(),
                tags,
            });
        }
        Ok(Inspection {
            image: nt.to_string(),
            digest,
            chain,
            history: c
                .images
                .get(&nt.name)
                .map(|r| {
                    r.history
                        .iter()
                        .filter(|e| e.tag == nt.tag)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// Check a blob and everything below it against their digests. With
    /// `full`, hash even when the file looks unchanged since the last hash.
    /// A mismatch is recorded on the blob (shown by `list`) and refused.
    pub fn verify(&self, digest: &str, full: bool) -> Result<(), ImageError> {
        let c = self.catalog()?;
        for d in chain_of(&c, digest)? {
            let rec = c.blobs.get(&d).ok_or_else(|| missing_blob(&d))?;
            let path = self.blob_path(&d)?;
            let m = std::fs::metadata(&path).map_err(|_| ImageError::Corrupt {
                digest: d.clone(),
                path: path.clone(),
                reason: "the blob file is missing".into(),
            })?;
            let stamp = Stamp::of(&m);
            if !full && rec.verified == Some(stamp) && rec.failure.is_none() {
                continue;
            }
            let actual =
                sha256_file(&path).map_err(io_err(format!("hashing {}", path.display())))?;
            if actual != d {
                let reason = format!("its content hashes to {actual}");
                let r2 = reason.clone();
                let d2 = d.clone();
                self.edit(move |c| {
                    if let Some(b) = c.blobs.get_mut(&d2) {
                        b.failure = Some(r2);
                        b.verified = None;
                    }
                    Ok(())
                })?;
                return Err(ImageError::Corrupt {
                    digest: d,
                    path,
                    reason,
                });
            }
            let d2 = d.clone();
            self.edit(move |c| {
                if let Some(b) = c.blobs.get_mut(&d2) {
                    b.failure = None;
                    b.verified = Some(stamp);
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Remove blobs no image tag reaches (through layering) and no qcow2
    /// file under `in_use_dirs` (VM run directories) is backed by.
    pub fn gc(&self, in_use_dirs: &[PathBuf]) -> Result<GcReport, ImageError> {
        let bd = self.blob_dir();
        // Blobs VM disks use: backing names of qcow2 files in the run dirs.
        let mut used_paths = BTreeSet::new();
        for dir in in_use_dirs {
            collect_backing(dir, 3, &mut used_paths);
        }
        self.edit(|c| {
            let mut live = BTreeSet::new();
            for rec in c.images.values() {
                for d in rec.tags.values() {
                    for x in chain_of(c, d)? {
                        live.insert(x);
                    }
                }
            }
            let mut in_use = BTreeSet::new();
            for p in &used_paths {
                if let Some(hex) = p
                    .strip_prefix(&bd)
                    .ok()
                    .and_then(|r| r.to_str())
                    .map(str::to_string)
                {
                    let d = format!("sha256:{hex}");
                    if c.blobs.contains_key(&d) {
                        for x in chain_of(c, &d)? {
                            in_use.insert(x);
                        }
                    }
                }
            }
            let mut report = GcReport::default();
            let all: Vec<String> = c.blobs.keys().cloned().collect();
            for d in all {
                if live.contains(&d) {
                    continue;
                }
                if in_use.contains(&d) {
                    report.kept_in_use.push(d);
                    continue;
                }
                let path = self.blob_path(&d)?;
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(format!("removing {}", path.display()))(e)),
                }
                if let Some(b) = c.blobs.remove(&d) {
                    report.freed_bytes += b.size;
                }
                report.removed.push(d);
            }
            Ok(report)
        })
    }

    /// Resolve a catalog image (`name[:tag]`) to its blob.
    pub(crate) fn catalog_blob(&self, c: &Catalog, s: &str) -> Option<(NameTag, String)> {
        let nt = NameTag::parse(s).ok()?;
        let d = lookup(c, &nt).ok()?;
        Some((nt, d))
    }
}

fn collect_backing(dir: &Path, depth: u32, out: &mut BTreeSet<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() && depth > 0 {
            collect_backing(&p, depth - 1, out);
        } else if ft.is_file()
            && let Ok(Some(b)) = qcow2_backing_file(&p)
        {
            let bp = Path::new(&b);
            let abs = if bp.is_absolute() {
                bp.to_path_buf()
            } else {
                dir.join(bp)
            };
            out.insert(abs.canonicalize().unwrap_or(abs));
        }
    }
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}-{t}", std::process::id())
}

fn missing_blob(d: &str) -> ImageError {
    ImageError::UnknownImage {
        image: d.to_string(),
    }
}

fn normalized(reference: &str) -> Result<String, ImageError> {
    let r = crate::alias::Reference::parse(reference).map_err(|reason| {
        ImageError::InvalidReference {
            reference: reference.to_string(),
            reason,
        }
    })?;
    Ok(match (&r.digest, &r.tag) {
        (Some(d), _) => format!("{}@{d}", r.repository),
        (None, Some(t)) => format!("{}:{t}", r.repository),
        (None, None) => r.repository,
    })
}

/// The normalized form of a container reference as the catalog keys it.
pub(crate) fn reference_key(reference: &str) -> Option<String> {
    normalized(reference).ok()
}

fn lookup(c: &Catalog, nt: &NameTag) -> Result<String, ImageError> {
    c.images
        .get(&nt.name)
        .and_then(|r| r.tags.get(&nt.tag))
        .cloned()
        .ok_or_else(|| ImageError::UnknownImage {
            image: nt.to_string(),
        })
}

fn set_tag(c: &mut Catalog, nt: &NameTag, digest: &str) {
    let rec = c.images.entry(nt.name.clone()).or_default();
    let prev = rec.tags.insert(nt.tag.clone(), digest.to_string());
    if prev.as_deref() != Some(digest) {
        rec.history.push(TagEvent {
            time: now(),
            tag: nt.tag.clone(),
            digest: Some(digest.to_string()),
            previous: prev,
        });
    }
}

/// A blob and its parents, top first (refusing cycles).
fn chain_of(c: &Catalog, digest: &str) -> Result<Vec<String>, ImageError> {
    let mut out = vec![digest.to_string()];
    let mut cur = c.blobs.get(digest).ok_or_else(|| missing_blob(digest))?;
    while let Some(p) = &cur.parent {
        if out.contains(p) || out.len() > 64 {
            return Err(ImageError::Invalid {
                what: format!("image chain of {digest}"),
                reason: "cycle or more than 64 layers".into(),
            });
        }
        out.push(p.clone());
        cur = c.blobs.get(p).ok_or_else(|| missing_blob(p))?;
    }
    Ok(out)
}
