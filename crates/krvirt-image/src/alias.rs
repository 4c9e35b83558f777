//! Local image store and containerDisk alias table.
//!
//! Every `containerDisk.image` and `kernelBoot.container.image` reference
//! is mapped to a *local image*: a name with an optional disk file and a
//! root directory (the directory in which kernel-boot
//! `kernelPath`/`initrdPath` are looked up). Resolution order: a catalog
//! image of the content-addressed store (`name[:tag]`, see [`crate::blobs`]),
//! a built-in or `aliases.json` image by name, a container reference pulled
//! earlier ([`ImageStore::pull`]), then the alias table (user aliases, then
//! built-in ones), whose targets are again catalog images (`demo-disk` is
//! the catalog image `demo-disk:latest`, imported when the store opens).
//!
//! Built in: `demo-disk` (the demo guest's bootable disk; its root also
//! holds `/boot/vmlinuz-virt` and `/boot/initramfs-virt`) and `demo-kernel`
//! (kernel-boot layout only, no disk). A built-in alias table maps the
//! images used by KubeVirt's examples (cirros, fedora, alpine demo disks,
//! `alpine-ext-kernel-boot-demo`, `quay.io/containerdisks/*`) to them.
//!
//! # `aliases.json`
//!
//! Users extend the table with `<store dir>/aliases.json` (read on every
//! resolve, so edits apply without a restart):
//!
//! ```json
//! {
//!   "images": {
//!     "my-disk":   { "disk": "/var/lib/images/my.qcow2" },
//!     "my-kernel": { "root": "kernels/my-kernel" }
//!   },
//!   "aliases": {
//!     "quay.io/myorg/mydisk": "my-disk",
//!     "quay.io/myorg/pinned:1.0": "demo-disk",
//!     "example.com/kboot@sha256:0123...": "my-kernel",
//!     "quay.io/myorg/*": "demo-disk"
//!   }
//! }
//! ```
//!
//! - `images`: local images by name (`[a-z0-9][a-z0-9._-]*`); `disk` is a
//!   disk file, `root` a directory; at least one of them; relative paths
//!   are relative to the store directory. A disk-only image uses the
//!   disk's directory as its root.
//! - `aliases`: reference pattern -> image name (one of `images` or a
//!   built-in). A pattern `repo` matches every tag and digest of that
//!   repository, `repo:tag` only that tag (a reference without a tag means
//!   `latest`), `repo@digest` only that digest, and `prefix/*` every
//!   repository below the prefix. References are normalized like Docker's
//!   (`kubevirt/x` is `docker.io/kubevirt/x`). The most specific user
//!   alias wins; user aliases win over built-in ones.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::guest::{self, DemoImages, GuestBuildOptions};

/// Name of the demo guest's bootable disk image.
pub const DEMO_DISK: &str = "demo-disk";
/// Name of the demo guest's kernel-boot image.
pub const DEMO_KERNEL: &str = "demo-kernel";
/// File in the store directory holding user images and aliases.
pub const ALIASES_FILE: &str = "aliases.json";

/// Built-in aliases (repository patterns, any tag) for the images KubeVirt's
/// examples and docs use.
pub const BUILTIN_ALIASES: &[(&str, &str)] = &[
    ("quay.io/kubevirt/cirros-container-disk-demo", DEMO_DISK),
    (
        "registry:5000/kubevirt/cirros-container-disk-demo",
        DEMO_DISK,
    ),
    ("docker.io/kubevirt/cirros-container-disk-demo", DEMO_DISK),
    (
        "quay.io/kubevirt/fedora-with-test-tooling-container-disk",
        DEMO_DISK,
    ),
    (
        "registry:5000/kubevirt/fedora-with-test-tooling-container-disk",
        DEMO_DISK,
    ),
    (
        "quay.io/kubevirt/fedora-cloud-container-disk-demo",
        DEMO_DISK,
    ),
    (
        "registry:5000/kubevirt/fedora-cloud-container-disk-demo",
        DEMO_DISK,
    ),
    (
        "docker.io/kubevirt/fedora-cloud-container-disk-demo",
        DEMO_DISK,
    ),
    ("quay.io/kubevirt/alpine-container-disk-demo", DEMO_DISK),
    (
        "registry:5000/kubevirt/alpine-container-disk-demo",
        DEMO_DISK,
    ),
    (
        "quay.io/kubevirt/alpine-with-test-tooling-container-disk",
        DEMO_DISK,
    ),
    (
        "registry:5000/kubevirt/alpine-with-test-tooling-container-disk",
        DEMO_DISK,
    ),
    ("quay.io/kubevirt/alpine-ext-kernel-boot-demo", DEMO_KERNEL),
    (
        "registry:5000/kubevirt/alpine-ext-kernel-boot-demo",
        DEMO_KERNEL,
    ),
    ("quay.io/containerdisks/*", DEMO_DISK),
];

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No local image matches the reference.
    #[error(
        "no local image for {reference:?}: krvirt cannot pull images, so map the reference to a \
         local image in {aliases_file}, e.g. {{\"aliases\": {{\"{reference}\": \"demo-disk\"}}}} \
         (built-in images: demo-disk, demo-kernel; your own files go under \"images\")"
    )]
    NotFound {
        reference: String,
        aliases_file: PathBuf,
    },
    /// The reference is not a valid image reference.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    /// `aliases.json` cannot be read or is invalid.
    #[error("{path}: {reason}")]
    AliasFile { path: PathBuf, reason: String },
    /// An alias points at an image name that does not exist.
    #[error(
        "alias {pattern:?} points at {target:?}, which is not a local image (defined in {path})"
    )]
    DanglingAlias {
        pattern: String,
        target: String,
        path: PathBuf,
    },
    /// A local image's file is missing.
    #[error("image {name}: {path} does not exist")]
    MissingImageFile { name: String, path: PathBuf },
    /// A kernel-boot path is unsafe (escapes the image root) or malformed.
    #[error("kernel boot path {path:?}: {reason}")]
    UnsafePath { path: String, reason: String },
    /// A kernel-boot path does not exist inside the image.
    #[error("{path} not found in image {image} (looked at {host_path})")]
    FileNotFound {
        image: String,
        path: String,
        host_path: PathBuf,
    },
    /// Building the demo images failed.
    #[error("building the demo images: {0}")]
    Build(#[from] crate::Error),
    /// No image or blob by that name in the catalog.
    #[error("no image {image} in the image store (krvirt image list)")]
    UnknownImage { image: String },
    /// Invalid input (names, digests, formats).
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
    /// Content did not hash to the digest it was announced with.
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// A stored blob no longer matches its digest: it is refused.
    #[error(
        "image blob {digest} is corrupt and refused: {reason} ({path}); re-import the image \
         (krvirt image rm + import) and run krvirt image gc"
    )]
    Corrupt {
        digest: String,
        path: PathBuf,
        reason: String,
    },
    /// Pulling from a registry or URL failed.
    #[error("pulling {source_ref}: {reason}")]
    Pull { source_ref: String, reason: String },
    /// An I/O error with context.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// A reference resolved to local files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedImage {
    /// Local image name (`demo-disk`, `demo-kernel`, a catalog image or an `aliases.json` image).
    pub name: String,
    /// Tag of a catalog image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Digest of a catalog image's blob (verified before use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Disk image file, if the image has one.
    pub disk: Option<PathBuf>,
    /// Directory in which kernel-boot `kernelPath`/`initrdPath` are looked up.
    pub root: PathBuf,
}

/// Host paths of a kernel-boot kernel and initrd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelBootPaths {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AliasFile {
    #[serde(default)]
    images: BTreeMap<String, ImageEntry>,
    #[serde(default)]
    aliases: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ImageEntry {
    #[serde(default)]
    disk: Option<PathBuf>,
    #[serde(default)]
    root: Option<PathBuf>,
}

/// Local images (the demo guest plus `aliases.json` images) and the alias table.
#[derive(Debug, Clone)]
pub struct ImageStore {
    pub(crate) dir: PathBuf,
    pub(crate) demo: DemoImages,
    pub(crate) lock: std::sync::Arc<std::sync::Mutex<()>>,
}

impl ImageStore {
    /// Open (creating if needed) the store in `dir`: builds or reuses the
    /// cached demo guest under `dir/demo` and validates `aliases.json`.
    pub fn open(dir: &Path) -> Result<ImageStore, ImageError> {
        Self::open_with(dir, &GuestBuildOptions::default())
    }

    /// Like [`ImageStore::open`] with explicit guest build options.
    pub fn open_with(dir: &Path, opts: &GuestBuildOptions) -> Result<ImageStore, ImageError> {
        let demo = guest::ensure_demo_images_with(&dir.join("demo"), opts)?;
        Self::with_demo_images(dir, demo)
    }

    /// A store in `dir` using already-built demo images.
    pub fn with_demo_images(dir: &Path, demo: DemoImages) -> Result<ImageStore, ImageError> {
        std::fs::create_dir_all(dir).map_err(|e| ImageError::AliasFile {
            path: dir.to_path_buf(),
            reason: format!("cannot create store directory: {e}"),
        })?;
        let store = ImageStore {
            dir: dir.to_path_buf(),
            demo,
            lock: Default::default(),
        };
        store.validate()?;
        store.import_demo()?;
        std::fs::create_dir_all(store.no_root()).map_err(|e| ImageError::Io {
            context: format!("creating {}", store.no_root().display()),
            source: e,
        })?;
        Ok(store)
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the user alias file.
    pub fn aliases_file(&self) -> PathBuf {
        self.dir.join(ALIASES_FILE)
    }

    /// The demo guest images backing `demo-disk` and `demo-kernel`.
    pub fn demo_images(&self) -> &DemoImages {
        &self.demo
    }

    fn load(&self) -> Result<AliasFile, ImageError> {
        let path = self.aliases_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AliasFile::default()),
            Err(e) => {
                return Err(ImageError::AliasFile {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        let file: AliasFile = serde_json::from_str(&text).map_err(|e| ImageError::AliasFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        for (name, entry) in &file.images {
            if !valid_name(name) {
                return Err(ImageError::AliasFile {
                    path,
                    reason: format!(
                        "image name {name:?} must match [a-z0-9][a-z0-9._-]* (max 128 chars)"
                    ),
                });
            }
            if name == DEMO_DISK || name == DEMO_KERNEL {
                return Err(ImageError::AliasFile {
                    path,
                    reason: format!("image name {name:?} is reserved for the built-in demo image"),
                });
            }
            if entry.disk.is_none() && entry.root.is_none() {
                return Err(ImageError::AliasFile {
                    path,
                    reason: format!("image {name:?} needs \"disk\", \"root\" or both"),
                });
            }
        }
        for pattern in file.aliases.keys() {
            Pattern::parse(pattern).map_err(|reason| ImageError::AliasFile {
                path: path.clone(),
                reason: format!("alias pattern {pattern:?}: {reason}"),
            })?;
        }
        Ok(file)
    }

    fn validate(&self) -> Result<(), ImageError> {
        let file = self.load()?;
        for (pattern, target) in &file.aliases {
            if self.image_from(&file, target).is_none() {
                return Err(ImageError::DanglingAlias {
                    pattern: pattern.clone(),
                    target: target.clone(),
                    path: self.aliases_file(),
                });
            }
        }
        Ok(())
    }

    /// Names of all local images (catalog images, then `aliases.json` ones).
    pub fn image_names(&self) -> Result<Vec<String>, ImageError> {
        let file = self.load()?;
        let mut names = vec![DEMO_DISK.to_string(), DEMO_KERNEL.to_string()];
        for n in self.catalog()?.images.keys() {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names.extend(file.images.keys().cloned());
        Ok(names)
    }

    /// Root directory of images that have no file tree (kernel boot looks there in vain).
    fn no_root(&self) -> PathBuf {
        self.dir.join("noroot")
    }

    fn image_from(&self, file: &AliasFile, name: &str) -> Option<ResolvedImage> {
        if let Ok(cat) = self.catalog()
            && let Some((nt, digest)) = self.catalog_blob(&cat, name)
        {
            let root = if nt.name == DEMO_DISK {
                self.demo.kernel_boot_root.clone()
            } else {
                self.no_root()
            };
            return Some(ResolvedImage {
                name: nt.name,
                tag: Some(nt.tag),
                disk: self.blob_path(&digest).ok(),
                digest: Some(digest),
                root,
            });
        }
        match name {
            DEMO_DISK => Some(ResolvedImage {
                name: DEMO_DISK.into(),
                tag: None,
                digest: None,
                disk: Some(self.demo.disk.clone()),
                root: self.demo.kernel_boot_root.clone(),
            }),
            DEMO_KERNEL => Some(ResolvedImage {
                name: DEMO_KERNEL.into(),
                tag: None,
                digest: None,
                disk: None,
                root: self.demo.kernel_boot_root.clone(),
            }),
            _ => {
                let e = file.images.get(name)?;
                let disk = e.disk.as_ref().map(|d| self.dir.join(d));
                let root = match (&e.root, &disk) {
                    (Some(r), _) => self.dir.join(r),
                    (None, Some(d)) => d
                        .parent()
                        .map_or_else(|| self.dir.clone(), Path::to_path_buf),
                    (None, None) => self.dir.clone(),
                };
                Some(ResolvedImage {
                    name: name.to_string(),
                    tag: None,
                    digest: None,
                    disk,
                    root,
                })
            }
        }
    }

    /// Resolve a local image name or a container image reference.
    pub fn resolve(&self, reference: &str) -> Result<ResolvedImage, ImageError> {
        let file = self.load()?;
        let reference_trim = reference.trim();
        let image = if let Some(img) = self.image_from(&file, reference_trim) {
            img
        } else {
            let parsed = Reference::parse(reference_trim).map_err(|reason| {
                ImageError::InvalidReference {
                    reference: reference.to_string(),
                    reason,
                }
            })?;
            if let Some(key) = crate::blobs::reference_key(reference_trim)
                && let Some(target) = self.catalog()?.references.get(&key).cloned()
                && let Some(img) = self.image_from(&file, &target)
            {
                return self.check_files(img);
            }
            let user = best_match(
                file.aliases.iter().map(|(p, t)| (p.as_str(), t.as_str())),
                &parsed,
            );
            let target = match user {
                Some((pattern, target)) => Some((pattern.to_string(), target.to_string(), true)),
                None => best_match(BUILTIN_ALIASES.iter().copied(), &parsed)
                    .map(|(p, t)| (p.to_string(), t.to_string(), false)),
            };
            let Some((pattern, target, _user)) = target else {
                return Err(ImageError::NotFound {
                    reference: reference.to_string(),
                    aliases_file: self.aliases_file(),
                });
            };
            self.image_from(&file, &target)
                .ok_or_else(|| ImageError::DanglingAlias {
                    pattern,
                    target,
                    path: self.aliases_file(),
                })?
        };
        self.check_files(image)
    }

    /// Like [`ImageStore::resolve`], then check the image's blob chain
    /// against its digests (see [`ImageStore::verify`]): what a VM launch
    /// uses. A corrupt blob is refused.
    pub fn resolve_verified(&self, reference: &str) -> Result<ResolvedImage, ImageError> {
        let img = self.resolve(reference)?;
        if let Some(d) = &img.digest {
            self.verify(d, false)?;
        }
        Ok(img)
    }

    fn check_files(&self, image: ResolvedImage) -> Result<ResolvedImage, ImageError> {
        if let Some(d) = &image.disk
            && !d.is_file()
        {
            return Err(ImageError::MissingImageFile {
                name: image.name,
                path: d.clone(),
            });
        }
        if !image.root.is_dir() {
            return Err(ImageError::MissingImageFile {
                name: image.name,
                path: image.root,
            });
        }
        Ok(image)
    }
}

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// A parsed, normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `domain/path`, e.g. `docker.io/library/busybox`.
    pub repository: String,
    /// Tag (`latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// `algorithm:hex`.
    pub digest: Option<String>,
}

impl Reference {
    /// Parse and normalize a Docker-style reference.
    pub fn parse(s: &str) -> Result<Reference, String> {
        if s.is_empty() {
            return Err("empty reference".into());
        }
        if s.len() > 1024 {
            return Err("longer than 1024 bytes".into());
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("contains whitespace or control characters".into());
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => {
                let (algo, hex) = d
                    .split_once(':')
                    .ok_or_else(|| format!("digest {d:?} must be algorithm:hex"))?;
                if algo.is_empty() || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(format!("digest {d:?} must be algorithm:hex"));
                }
                (n, Some(d.to_ascii_lowercase()))
            }
            None => (s, None),
        };
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (repo, tag) = match name[last_slash..].rfind(':') {
            Some(i) => {
                let t = &name[last_slash + i + 1..];
                if t.is_empty()
                    || t.len() > 128
                    || !t
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                {
                    return Err(format!("invalid tag {t:?}"));
                }
                (&name[..last_slash + i], Some(t.to_string()))
            }
            None => (name, None),
        };
        let repository = normalize_repo(repo)?;
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(Reference {
            repository,
            tag,
            digest,
        })
    }
}

fn normalize_repo(repo: &str) -> Result<String, String> {
    let comps: Vec<&str> = repo.split('/').collect();
    if comps.iter().any(|c| c.is_empty()) {
        return Err(format!("repository {repo:?} has an empty path component"));
    }
    let has_domain = comps.len() > 1
        && (comps[0].contains('.') || comps[0].contains(':') || comps[0] == "localhost");
    let (domain, path) = if has_domain {
        let d = if comps[0] == "index.docker.io" {
            "docker.io".to_string()
        } else {
            comps[0].to_ascii_lowercase()
        };
        (d, comps[1..].to_vec())
    } else if comps.len() == 1 {
        ("docker.io".to_string(), vec!["library", comps[0]])
    } else {
        ("docker.io".to_string(), comps)
    };
    for c in &path {
        if *c == "."
            || *c == ".."
            || !c.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
        {
            return Err(format!(
                "repository path component {c:?} must be lowercase letters, digits, '.', '_' or '-'"
            ));
        }
    }
    Ok(format!("{domain}/{}", path.join("/")))
}

/// An alias pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// `prefix/*`: every repository starting with the prefix.
    Prefix(String),
    /// `repo`: any tag or digest.
    Repo(String),
    /// `repo:tag` or `repo@digest`.
    Exact(Reference),
}

impl Pattern {
    fn parse(p: &str) -> Result<Pattern, String> {
        if let Some(prefix) = p.strip_suffix('*') {
            if prefix.is_empty() || prefix.contains('*') || prefix.contains('@') {
                return Err("wildcard patterns look like \"quay.io/org/*\"".into());
            }
            let comps: Vec<&str> = prefix.split('/').collect();
            let has_domain = comps.len() > 1
                && (comps[0].contains('.') || comps[0].contains(':') || comps[0] == "localhost");
            return Ok(Pattern::Prefix(if has_domain {
                prefix.to_string()
            } else {
                format!("docker.io/{prefix}")
            }));
        }
        if p.contains('*') {
            return Err("'*' is only allowed at the end".into());
        }
        let last_slash = p.rfind('/').map_or(0, |i| i + 1);
        if p.contains('@') || p[last_slash..].contains(':') {
            Ok(Pattern::Exact(Reference::parse(p)?))
        } else {
            Ok(Pattern::Repo(normalize_repo(p)?))
        }
    }

    /// Specificity of a match (higher wins), or None.
    fn score(&self, r: &Reference) -> Option<usize> {
        match self {
            Pattern::Exact(e) => {
                let same = e.repository == r.repository
                    && match (&e.digest, &r.digest) {
                        (Some(a), Some(b)) => a == b,
                        (Some(_), None) => false,
                        (None, _) => e.tag == r.tag,
                    };
                same.then_some(usize::MAX)
            }
            Pattern::Repo(repo) => (repo == &r.repository).then_some(usize::MAX - 1),
            Pattern::Prefix(prefix) => r
                .repository
                .starts_with(prefix.as_str())
                .then_some(prefix.len()),
        }
    }
}

fn best_match<'a>(
    table: impl Iterator<Item = (&'a str, &'a str)>,
    r: &Reference,
) -> Option<(&'a str, &'a str)> {
    table
        .filter_map(|(p, t)| Pattern::parse(p).ok()?.score(r).map(|s| (s, p, t)))
        .max_by_key(|(s, _, _)| *s)
        .map(|(_, p, t)| (p, t))
}

/// Join container paths (`/boot/vmlinuz-virt`) onto the image root, refusing
/// anything that could leave it (`..`, symlinks pointing outside).
pub fn kernel_boot_paths(
    resolved: &ResolvedImage,
    kernel_path: Option<&str>,
    initrd_path: Option<&str>,
) -> Result<KernelBootPaths, ImageError> {
    Ok(KernelBootPaths {
        kernel: kernel_path.map(|p| join_in_root(resolved, p)).transpose()?,
        initrd: initrd_path.map(|p| join_in_root(resolved, p)).transpose()?,
    })
}

fn join_in_root(img: &ResolvedImage, path: &str) -> Result<PathBuf, ImageError> {
    let unsafe_path = |reason: &str| ImageError::UnsafePath {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    if path.is_empty() {
        return Err(unsafe_path("empty path"));
    }
    if path.contains('\0') {
        return Err(unsafe_path("contains a NUL byte"));
    }
    let mut rel = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => rel.push(n),
            Component::ParentDir => return Err(unsafe_path("'..' is not allowed")),
            Component::Prefix(_) => return Err(unsafe_path("path prefix not allowed")),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(unsafe_path("names the image root, not a file"));
    }
    let joined = img.root.join(&rel);
    let not_found = || ImageError::FileNotFound {
        image: img.name.clone(),
        path: path.to_string(),
        host_path: joined.clone(),
    };
    let root = img
        .root
        .canonicalize()
        .map_err(|_| ImageError::MissingImageFile {
            name: img.name.clone(),
            path: img.root.clone(),
        })?;
    let real = joined.canonicalize().map_err(|_| not_found())?;
    if !real.starts_with(&root) {
        return Err(unsafe_path(
            "resolves (through a symlink) outside the image root",
        ));
    }
    if !real.is_file() {
        return Err(not_found());
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_normalization() {
        let r =
            Reference::parse("registry:5000/kubevirt/cirros-container-disk-demo:devel").unwrap();
        assert_eq!(
            r.repository,
            "registry:5000/kubevirt/cirros-container-disk-demo"
        );
        assert_eq!(r.tag.as_deref(), Some("devel"));
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.repository, "docker.io/library/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = Reference::parse("kubevirt/cirros-container-disk-demo").unwrap();
        assert_eq!(
            r.repository,
            "docker.io/kubevirt/cirros-container-disk-demo"
        );
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = Reference::parse(&format!("quay.io/x/y@{d}")).unwrap();
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.tag, None);
        let r = Reference::parse("localhost:5000/a/b:1.0").unwrap();
        assert_eq!(r.repository, "localhost:5000/a/b");
        for bad in [
            "",
            "a b",
            "Quay.io/UPPER/x",
            "x:",
            "x@sha256:zz",
            "a//b",
            "quay.io/../x",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn pattern_specificity() {
        let r = Reference::parse("quay.io/org/img:1.0").unwrap();
        let table = [
            ("quay.io/org/*", "prefix"),
            ("quay.io/*", "shorter-prefix"),
            ("quay.io/org/img", "repo"),
            ("quay.io/org/img:1.0", "exact"),
            ("quay.io/org/img:2.0", "other-tag"),
        ];
        assert_eq!(best_match(table.iter().copied(), &r).unwrap().1, "exact");
        assert_eq!(
            best_match(table[..3].iter().copied(), &r).unwrap().1,
            "repo"
        );
        assert_eq!(
            best_match(table[..2].iter().copied(), &r).unwrap().1,
            "prefix"
        );
        assert!(best_match(table[4..].iter().copied(), &r).is_none());
        assert!(Pattern::parse("a*b").is_err());
    }

    #[test]
    fn builtin_table_is_well_formed() {
        for (p, t) in BUILTIN_ALIASES {
            Pattern::parse(p).unwrap_or_else(|e| panic!("{p}: {e}"));
            assert!(*t == DEMO_DISK || *t == DEMO_KERNEL);
        }
    }
}
