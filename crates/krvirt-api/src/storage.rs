//! `krvirt.io/v1` StoragePool (cluster-scoped) and Volume (namespaced, the
//! role of CDI's DataVolume and of a bound PVC).
//!
//! A pool is `dir` (qcow2 files in a directory), `btrfs` (subvolumes on a
//! btrfs) or `rbd` (a Ceph RBD pool, shared by every host that reaches the
//! cluster). A Volume is
//! provisioned into a pool from a source (blank, image, another volume, a
//! volume snapshot); `status` carries the DataVolume-style phase, capacity
//! and allocation. VMs use Volumes through `persistentVolumeClaim:
//! {claimName}`, `dataVolume: {name}` and `dataVolumeTemplates`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::admission::{Admit, Causes, join};
use crate::kubevirt::validate::{immutable_identity, metadata};
use crate::meta::{Condition, ObjectMeta, null_default};
use crate::quantity::Quantity;

pub const API_VERSION: &str = "krvirt.io/v1";
const MAX_NAME: usize = 253;
/// The pool a Volume without `spec.pool` lands in (the agent creates it as
/// a `dir` pool under its data directory when it does not exist).
pub const DEFAULT_POOL: &str = "default";
/// Annotation on a Volume made from a VM's `dataVolumeTemplates`.
pub const VOLUME_OWNER_VM_ANNOTATION: &str = "krvirt.io/owner-vm";
/// Annotation the upload endpoint sets on an `upload` Volume once the
/// content is in the host's image store: its blob digest (`sha256:…`).
pub const VOLUME_UPLOAD_ANNOTATION: &str = "krvirt.io/upload-digest";

/// Backend type of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolType {
    Dir,
    Btrfs,
    Rbd,
}

/// A storage pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoragePool {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: StoragePoolSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StoragePoolStatus>,
}

/// Where a pool keeps its volumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoragePoolSpec {
    #[serde(rename = "type")]
    pub type_: PoolType,
    /// `dir`, `btrfs`: absolute directory on the host (for btrfs, on a
    /// mounted btrfs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `rbd`: the Ceph pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// `rbd`: absolute path of a `ceph.conf` on the hosts (monitors and
    /// options). `conf`, `monitors` or both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conf: Option<String>,
    /// `rbd`: monitor addresses `host:port` (IPv6 hosts in brackets).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub monitors: Vec<String>,
    /// `rbd`: the Ceph user (without `client.`; Ceph's default `admin`
    /// when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Whether every host sees the pool's volumes: `dir`/`btrfs`: true
    /// when `path` is the same shared filesystem on every host (NFS, a
    /// cluster filesystem); default false (the directory is local to each
    /// host). `rbd` pools are always shared (`false` is refused). Volumes
    /// of a shared pool open in place on any host and a live migration
    /// leaves them where they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,
}

impl StoragePoolSpec {
    /// Whether the pool's volumes are reachable from every host.
    pub fn is_shared(&self) -> bool {
        self.type_ == PoolType::Rbd || self.shared == Some(true)
    }
}

/// What the agent observed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoragePoolStatus {
    /// `Ready` (True when the agent opened the pool).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
}

/// Empty marker object (`blank: {}`, `upload: {}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// Linked (shares the source's blocks) or full (independent copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CloneType {
    #[default]
    Linked,
    Full,
}

/// A volume's content at creation; exactly one field set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<Empty>,
    /// A local image, named like a containerDisk image (the alias table
    /// resolves it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageVolumeSource>,
    /// Import from an HTTP(S) URL (raw or qcow2), streamed and hashed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpVolumeSource>,
    /// Filled by an upload: `PUT` the disk image (raw or qcow2) to
    /// `/apis/volumes.krvirt.io/v1/namespaces/{ns}/volumes/{name}/upload`
    /// (`krvirt volume upload`); the Volume waits in phase `UploadReady`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<Empty>,
    /// A clone of another Volume of the same namespace and pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeRef>,
    /// A new volume from a snapshot of a Volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<VolumeSnapshotRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageVolumeSource {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneType>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpVolumeSource {
    /// `http://` or `https://` URL of a raw or qcow2 disk image.
    pub url: String,
    /// Refuse the content unless it hashes to this (`sha256:` + 64 hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// Whether `d` is `sha256:` followed by 64 lowercase hex digits.
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Why `url` is not an http(s) URL with a host, if it is not.
fn url_problem(url: &str) -> Option<&'static str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        None => Some("must start with http:// or https://"),
        Some(r) if r.split(['/', '?', '#']).next().is_none_or(str::is_empty) => Some("has no host"),
        Some(r) if r.chars().any(|c| c.is_whitespace() || c.is_control()) => {
            Some("contains whitespace")
        }
        Some(_) => None,
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeRef {
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSnapshotRef {
    /// The Volume.
    pub volume: String,
    /// The snapshot's name in the pool.
    pub name: String,
}

/// A virtual disk in a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageVolume {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: VolumeSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSpec {
    /// StoragePool name (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Size the guest sees. Required for `blank`; for other sources the
    /// volume is grown to it when larger. May be increased later (resize).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Quantity>,
    pub source: VolumeSource,
}

/// DataVolume phases krvirt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum VolumePhase {
    Pending,
    /// An `upload` Volume waiting for its content.
    UploadReady,
    ImportInProgress,
    CloneInProgress,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VolumePhase>,
    /// Virtual size (bytes, as a quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Quantity>,
    /// Bytes used in the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Quantity>,
    /// Host holding the volume (local pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
    /// krvirt: a live migration of the VMI using this Volume is copying it
    /// (block mirror) into the same pool on another host. Written by the
    /// target's agent before it creates its copy; resolved (the Volume
    /// moves, or the copy is deleted) once the migration has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<VolumeMigration>,
    /// krvirt: hosts still holding an old copy of this (host-local)
    /// Volume, left behind by a migration that moved it; each host's agent
    /// deletes its copy and removes itself from the list.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub stale_copies: Vec<String>,
}

/// A Volume of a host-local pool being copied to another host by a live
/// migration of the VMI that uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeMigration {
    /// The host receiving the copy (the migration's target).
    pub target_host: String,
    /// The VirtualMachineInstanceMigration's uid.
    pub migration_uid: String,
    /// The VMI (same namespace) and its uid.
    pub vmi_name: String,
    pub vmi_uid: String,
}

impl StorageVolume {
    pub fn pool(&self) -> &str {
        self.spec.pool.as_deref().unwrap_or(DEFAULT_POOL)
    }
    pub fn phase(&self) -> Option<VolumePhase> {
        self.status.as_ref().and_then(|s| s.phase)
    }
}

/// The registered kind (both are in `types::KINDS`; looked up by name so
/// the table's order does not matter).
fn served(kind: &str) -> &'static crate::KindInfo {
    crate::types::KINDS
        .iter()
        .find(|k| k.group == "krvirt.io" && k.kind == kind)
        .expect("storage kinds are registered in types::KINDS")
}

impl crate::meta::Object for StoragePool {
    fn kind_info() -> &'static crate::KindInfo {
        served("StoragePool")
    }
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl crate::meta::Object for StorageVolume {
    fn kind_info() -> &'static crate::KindInfo {
        served("Volume")
    }
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Admit for StoragePool {
    fn not_implemented(_path: &str) -> bool {
        false
    }
    fn apply_defaults(&mut self) {}
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", MAX_NAME, false, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.spec != self.spec {
                c.forbidden("spec", "the spec of a StoragePool is immutable");
            }
        }
        let s = &self.spec;
        match s.type_ {
            PoolType::Dir | PoolType::Btrfs => {
                match s.path.as_deref() {
                    Some(p) if crate::util::clean_absolute_path(p).is_ok() => {}
                    Some(p) => {
                        c.invalid("spec.path", format!("{p:?} is not a clean absolute path"))
                    }
                    None => c.required("spec.path", "a dir or btrfs pool needs a path"),
                }
                for (f, set) in [
                    ("spec.pool", s.pool.is_some()),
                    ("spec.conf", s.conf.is_some()),
                    ("spec.monitors", !s.monitors.is_empty()),
                    ("spec.user", s.user.is_some()),
                ] {
                    if set {
                        c.forbidden(f, "only for an rbd pool");
                    }
                }
            }
            PoolType::Rbd => validate_rbd_pool(s, c),
        }
    }
}

/// A Ceph pool or user name: 1-100 characters of `[A-Za-z0-9._-]` (what
/// needs no escaping on QEMU's and the `rbd` tool's command lines).
fn ceph_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 100
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `host:port`, an IPv6 host in brackets.
fn monitor_ok(m: &str) -> bool {
    let Some((host, port)) = m.rsplit_once(':') else {
        return false;
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b))
        && port.parse::<u16>().is_ok_and(|p| p != 0)
}

fn validate_rbd_pool(s: &StoragePoolSpec, c: &mut Causes) {
    if s.shared == Some(false) {
        c.invalid(
            "spec.shared",
            "an rbd pool is shared by every host that reaches the Ceph cluster",
        );
    }
    match s.pool.as_deref() {
        None => c.required("spec.pool", "an rbd pool needs the Ceph pool name"),
        Some(p) if !ceph_name(p) => c.invalid(
            "spec.pool",
            format!("{p:?}: 1-100 characters of [A-Za-z0-9._-]"),
        ),
        Some(_) => {}
    }
    if s.path.is_some() {
        c.forbidden("spec.path", "an rbd pool has no path (use spec.conf)");
    }
    if let Some(p) = s.conf.as_deref()
        && crate::util::clean_absolute_path(p).is_err()
    {
        c.invalid("spec.conf", format!("{p:?} is not a clean absolute path"));
    }
    if s.conf.is_none() && s.monitors.is_empty() {
        c.required(
            "spec.conf",
            "an rbd pool needs spec.conf (a ceph.conf path) or spec.monitors",
        );
    }
    for (i, m) in s.monitors.iter().enumerate() {
        if !monitor_ok(m) {
            c.invalid(
                crate::admission::idx("spec.monitors", i),
                format!("{m:?} is not host:port"),
            );
        }
    }
    if let Some(u) = s.user.as_deref()
        && !ceph_name(u)
    {
        c.invalid(
            "spec.user",
            format!("{u:?}: 1-100 characters of [A-Za-z0-9._-]"),
        );
    }
}

fn size(q: &Option<Quantity>, c: &mut Causes) -> Option<u64> {
    let q = q.as_ref()?;
    match q.value() {
        Ok(0) => {
            c.invalid("spec.capacity", "must be positive");
            None
        }
        Ok(v) => Some(v),
        Err(e) => {
            c.invalid("spec.capacity", e.to_string());
            None
        }
    }
}

impl Admit for StorageVolume {
    fn not_implemented(_path: &str) -> bool {
        false
    }
    fn apply_defaults(&mut self) {}
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", MAX_NAME, true, c);
        let cap = size(&self.spec.capacity, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.spec.source != self.spec.source || old.spec.pool != self.spec.pool {
                c.forbidden("spec", "only spec.capacity of a Volume may change");
            }
            let old_cap = old.spec.capacity.as_ref().and_then(|q| q.value().ok());
            if let (Some(o), Some(n)) = (old_cap, cap)
                && n < o
            {
                c.forbidden("spec.capacity", "a Volume can grow but not shrink");
            }
            if old_cap.is_some() && cap.is_none() {
                c.forbidden("spec.capacity", "cannot be removed");
            }
        }
        let s = &self.spec.source;
        let set = [
            s.blank.is_some(),
            s.image.is_some(),
            s.http.is_some(),
            s.upload.is_some(),
            s.volume.is_some(),
            s.snapshot.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if set != 1 {
            c.invalid(
                "spec.source",
                "exactly one of blank, image, http, upload, volume, snapshot is required",
            );
        }
        if s.blank.is_some() && self.spec.capacity.is_none() {
            c.required("spec.capacity", "a blank volume needs a capacity");
        }
        if let Some(h) = &s.http {
            if let Some(p) = url_problem(&h.url) {
                c.invalid("spec.source.http.url", format!("{:?} {p}", h.url));
            }
            if let Some(d) = &h.digest
                && !valid_digest(d)
            {
                c.invalid(
                    "spec.source.http.digest",
                    format!("{d:?} is not sha256: followed by 64 lowercase hex digits"),
                );
            }
        }
        if let Some(i) = &s.image
            && i.name.is_empty()
        {
            c.required(join("spec.source.image", "name"), "Required value");
        }
        if let Some(v) = &s.volume
            && crate::util::dns1123_subdomain(&v.name, MAX_NAME).is_some()
        {
            c.invalid("spec.source.volume.name", "not a valid Volume name");
        }
        if let Some(v) = &s.snapshot {
            if v.volume.is_empty() {
                c.required("spec.source.snapshot.volume", "Required value");
            }
            if v.name.is_empty() {
                c.required("spec.source.snapshot.name", "Required value");
            }
        }
        if let Some(p) = &self.spec.pool
            && crate::util::dns1123_subdomain(p, MAX_NAME).is_some()
        {
            c.invalid("spec.pool", "not a valid StoragePool name");
        }
    }
}

// ----- KubeVirt / CDI side: dataVolumeTemplates, PVC and DataVolume volumes --

/// `persistentVolumeClaim` volume of a VMI: the Volume named `claimName`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PersistentVolumeClaimVolumeSource {
    #[serde(default)]
    pub claim_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotpluggable: Option<bool>,
}

/// `dataVolume` volume of a VMI: the Volume named `name`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataVolumeVolumeSource {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotpluggable: Option<bool>,
}

/// An entry of a VM's `dataVolumeTemplates` (CDI DataVolume shape).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataVolumeTemplateSpec {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DataVolumeSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataVolumeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<DataVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<ClaimSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<ClaimSpec>,
}

/// CDI `DataVolumeSource`: the kinds krvirt maps to a Volume source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataVolumeSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<Empty>,
    /// `docker://IMAGE`: the local image of that name (alias table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<UrlSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<UrlSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<Empty>,
    /// Clone of a Volume (`namespace` must be the VM's, if given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<NamespacedRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlSource {
    #[serde(default)]
    pub url: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespacedRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: String,
}

/// The part of a PVC spec krvirt reads: size and class (= pool).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimSpec {
    /// Accepted; every krvirt volume is attached to one VM at a time.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub access_modes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ClaimResources>,
    /// The StoragePool, when one of that name exists; else `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// `Filesystem` or `Block`: both give the guest a block device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimResources {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "std::collections::BTreeMap::is_empty"
    )]
    pub requests: std::collections::BTreeMap<String, Quantity>,
}

impl DataVolumeSpec {
    fn claim(&self) -> Option<&ClaimSpec> {
        self.storage.as_ref().or(self.pvc.as_ref())
    }

    /// `storageClassName`, which names the pool.
    pub fn storage_class(&self) -> Option<&str> {
        self.claim().and_then(|c| c.storage_class_name.as_deref())
    }
}

impl DataVolumeTemplateSpec {
    /// The Volume this template asks for (pool: the storage class, which the
    /// caller replaces by `default` if no such pool exists).
    pub fn to_volume(&self, namespace: &str) -> Result<StorageVolume, (String, String)> {
        let err = |f: &str, m: &str| (f.to_string(), m.to_string());
        let name = self
            .metadata
            .name
            .clone()
            .ok_or_else(|| err("metadata.name", "Required value"))?;
        let capacity = self
            .spec
            .claim()
            .and_then(|c| c.resources.as_ref())
            .and_then(|r| r.requests.get("storage"))
            .cloned();
        let src = self
            .spec
            .source
            .as_ref()
            .ok_or_else(|| err("spec.source", "Required value"))?;
        let source = if src.blank.is_some() {
            VolumeSource {
                blank: Some(Empty {}),
                ..Default::default()
            }
        } else if let Some(r) = &src.registry {
            let image = r.url.strip_prefix("docker://").unwrap_or(&r.url);
            if image.is_empty() {
                return Err(err("spec.source.registry.url", "Required value"));
            }
            VolumeSource {
                image: Some(ImageVolumeSource {
                    name: image.to_string(),
                    clone: None,
                }),
                ..Default::default()
            }
        } else if let Some(p) = &src.pvc {
            if p.namespace.as_deref().is_some_and(|n| n != namespace) {
                return Err(err(
                    "spec.source.pvc.namespace",
                    "cloning across namespaces is not supported",
                ));
            }
            VolumeSource {
                volume: Some(VolumeRef {
                    name: p.name.clone(),
                }),
                ..Default::default()
            }
        } else if let Some(h) = &src.http {
            VolumeSource {
                http: Some(HttpVolumeSource {
                    url: h.url.clone(),
                    digest: None,
                }),
                ..Default::default()
            }
        } else if src.upload.is_some() {
            VolumeSource {
                upload: Some(Empty {}),
                ..Default::default()
            }
        } else {
            return Err(err("spec.source", "exactly one source is required"));
        };
        Ok(StorageVolume {
            api_version: API_VERSION.to_string(),
            kind: "Volume".to_string(),
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(namespace.to_string()),
                labels: self.metadata.labels.clone(),
                annotations: self.metadata.annotations.clone(),
                ..Default::default()
            },
            spec: VolumeSpec {
                pool: self.spec.storage_class().map(str::to_string),
                capacity,
                source,
            },
            status: None,
        })
    }
}

/// Admission of a VM's `dataVolumeTemplates`.
pub(crate) fn validate_templates(t: &[DataVolumeTemplateSpec], c: &mut Causes) {
    let mut seen = std::collections::HashSet::new();
    for (i, dv) in t.iter().enumerate() {
        let p = crate::admission::idx("spec.dataVolumeTemplates", i);
        match dv.to_volume("default") {
            Err((f, m)) => {
                if m.starts_with(crate::admission::NOT_IMPLEMENTED) {
                    c.not_supported(join(&p, &f), m);
                } else {
                    c.invalid(join(&p, &f), m);
                }
            }
            Ok(v) => {
                let mut inner = Causes::default();
                v.validate(None, &mut inner);
                for cause in inner.0 {
                    c.push(&cause.reason, join(&p, &cause.field), cause.message);
                }
                if !seen.insert(v.metadata.name.clone()) {
                    c.duplicate(join(&p, "metadata.name"), "duplicate DataVolume name");
                }
            }
        }
    }
}

// ----- hot-plug ---------------------------------------------------------------

/// VMI annotation holding the Volumes hot-plugged into the running guest:
/// a JSON object `{"DISK": "VOLUME", …}` (`krvirt addvolume` /
/// `removevolume` edit it; the host agent attaches and detaches to match).
pub const HOTPLUG_ANNOTATION: &str = "krvirt.io/hotplug-volumes";

/// The disks the hot-plug annotation asks for (disk name → Volume name).
pub fn hotplug_requests(
    annotations: &std::collections::BTreeMap<String, String>,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    match annotations.get(HOTPLUG_ANNOTATION) {
        None => Ok(Default::default()),
        Some(s) => {
            serde_json::from_str(s).map_err(|e| format!("annotation {HOTPLUG_ANNOTATION}: {e}"))
        }
    }
}

/// Hot-plug state of one volume of a VMI (KubeVirt `VolumeStatus`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatusEntry {
    /// Disk name.
    pub name: String,
    /// Device id in the guest's machine (`hp0-data`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `Pending`, `Ready`, `Detaching`, `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The Volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_info: Option<ClaimInfo>,
    /// Present for hot-plugged volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_volume: Option<Empty>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimInfo {
    pub claim_name: String,
}

/// A hot-plugged disk's name: a DNS label of at most 40 characters (it
/// becomes part of QEMU device and node names).
pub fn check_disk_name(name: &str) -> Result<(), String> {
    if name.len() > 40 {
        return Err(format!("{name:?}: at most 40 characters"));
    }
    match crate::util::dns1123_label(name) {
        Some(problem) => Err(format!("{name:?}: {problem}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::{admit, find_kind};

    fn vol(spec: serde_json::Value) -> Result<serde_json::Value, crate::ValidationError> {
        admit(
            find_kind("volumes").unwrap(),
            json!({"apiVersion": "krvirt.io/v1", "kind": "Volume",
                   "metadata": {"name": "v", "namespace": "default"}, "spec": spec}),
            None,
        )
    }

    fn fields(e: &crate::ValidationError) -> Vec<String> {
        e.causes.iter().map(|c| c.field.clone()).collect()
    }

    #[test]
    fn volume_sources() {
        vol(json!({"capacity": "1Gi", "source": {"blank": {}}})).unwrap();
        vol(json!({"source": {"image": {"name": "img", "clone": "full"}}})).unwrap();
        vol(json!({"source": {"volume": {"name": "other"}}})).unwrap();
        let e = vol(json!({"source": {"blank": {}}})).unwrap_err();
        assert!(fields(&e).contains(&"spec.capacity".to_string()), "{e:?}");
        let e = vol(json!({"source": {}})).unwrap_err();
        assert!(fields(&e).contains(&"spec.source".to_string()), "{e:?}");
        let e = vol(json!({"capacity": "1Gi", "source": {"blank": {}, "volume": {"name": "x"}}}))
            .unwrap_err();
        assert!(fields(&e).contains(&"spec.source".to_string()), "{e:?}");
        vol(json!({"source": {"http": {"url": "http://x/d.img"}}})).unwrap();
        vol(json!({"source": {"upload": {}}})).unwrap();
        let digest = format!("sha256:{}", "a".repeat(64));
        vol(json!({"source": {"http": {"url": "https://x:8443/d.qcow2", "digest": digest}}}))
            .unwrap();
        for (url, digest, field) in [
            ("ftp://x/d", None, "spec.source.http.url"),
            ("http:///d", None, "spec.source.http.url"),
            ("http://x/d", Some("md5:00"), "spec.source.http.digest"),
        ] {
            let e = vol(json!({"source": {"http": {"url": url, "digest": digest}}})).unwrap_err();
            assert_eq!(fields(&e), [field], "{url}");
        }
    }

    #[test]
    fn volume_grows_but_does_not_shrink_or_change_source() {
        let old = vol(json!({"capacity": "1Gi", "source": {"blank": {}}})).unwrap();
        let k = find_kind("volumes").unwrap();
        let mut grown = old.clone();
        grown["spec"]["capacity"] = "2Gi".into();
        admit(k, grown, Some(&old)).unwrap();
        let mut shrunk = old.clone();
        shrunk["spec"]["capacity"] = "512Mi".into();
        assert!(admit(k, shrunk, Some(&old)).is_err());
        let mut other = old.clone();
        other["spec"]["source"] = json!({"volume": {"name": "x"}});
        assert!(admit(k, other, Some(&old)).is_err());
    }

    #[test]
    fn pools() {
        let k = find_kind("storagepools").unwrap();
        let pool = |spec| {
            admit(
                k,
                json!({"apiVersion": "krvirt.io/v1", "kind": "StoragePool",
                       "metadata": {"name": "p"}, "spec": spec}),
                None,
            )
        };
        pool(json!({"type": "dir", "path": "/var/lib/pool"})).unwrap();
        pool(json!({"type": "btrfs", "path": "/mnt/b"})).unwrap();
        assert!(pool(json!({"type": "dir"})).is_err());
        assert!(pool(json!({"type": "dir", "path": "rel/x"})).is_err());
        pool(json!({"type": "rbd", "pool": "rbd", "conf": "/etc/ceph/ceph.conf"})).unwrap();
        pool(json!({"type": "rbd", "pool": "vms", "monitors": ["10.0.0.1:6789", "[fd00::1]:3300"], "user": "krvirt"}))
            .unwrap();
        let fields_of = |spec| fields(&pool(spec).unwrap_err());
        assert_eq!(
            fields_of(json!({"type": "rbd", "pool": "rbd"})),
            ["spec.conf"]
        );
        assert_eq!(
            fields_of(json!({"type": "rbd", "conf": "/etc/ceph/ceph.conf"})),
            ["spec.pool"]
        );
        assert_eq!(
            fields_of(json!({"type": "rbd", "pool": "a/b", "conf": "/c"})),
            ["spec.pool"]
        );
        assert_eq!(
            fields_of(json!({"type": "rbd", "pool": "rbd", "monitors": ["x"]})),
            ["spec.monitors[0]"]
        );
        assert_eq!(
            fields_of(json!({"type": "rbd", "pool": "rbd", "conf": "etc/c"})),
            ["spec.conf"]
        );
        assert_eq!(
            fields_of(json!({"type": "rbd", "pool": "rbd", "conf": "/c", "user": "a b"})),
            ["spec.user"]
        );
        assert_eq!(
            fields_of(json!({"type": "rbd", "pool": "rbd", "conf": "/c", "path": "/x"})),
            ["spec.path"]
        );
        assert_eq!(
            fields_of(json!({"type": "dir", "path": "/x", "pool": "rbd"})),
            ["spec.pool"]
        );
        // Shared storage: a dir pool on a path every host mounts; rbd is
        // always shared.
        let shared = pool(json!({"type": "dir", "path": "/nfs/p", "shared": true})).unwrap();
        let spec: super::StoragePoolSpec = serde_json::from_value(shared["spec"].clone()).unwrap();
        assert!(spec.is_shared());
        let local = pool(json!({"type": "dir", "path": "/x"})).unwrap();
        let spec: super::StoragePoolSpec = serde_json::from_value(local["spec"].clone()).unwrap();
        assert!(!spec.is_shared());
        let rbd = pool(json!({"type": "rbd", "pool": "rbd", "conf": "/c"})).unwrap();
        let spec: super::StoragePoolSpec = serde_json::from_value(rbd["spec"].clone()).unwrap();
        assert!(spec.is_shared());
        assert_eq!(
            fields_of(json!({"type": "rbd", "pool": "rbd", "conf": "/c", "shared": false})),
            ["spec.shared"]
        );
    }

    #[test]
    fn data_volume_templates_map_to_volumes() {
        let t: super::DataVolumeTemplateSpec = serde_json::from_value(json!({
            "metadata": {"name": "alpine-dv"},
            "spec": {"pvc": {"accessModes": ["ReadWriteOnce"],
                             "resources": {"requests": {"storage": "2Gi"}},
                             "storageClassName": "local"},
                     "source": {"registry": {"url": "docker://registry:5000/kubevirt/alpine-container-disk-demo:devel"}}}
        }))
        .unwrap();
        let v = t.to_volume("ns1").unwrap();
        assert_eq!(v.metadata.namespace.as_deref(), Some("ns1"));
        assert_eq!(v.spec.pool.as_deref(), Some("local"));
        assert_eq!(v.spec.capacity.as_ref().unwrap().as_str(), "2Gi");
        assert_eq!(
            v.spec.source.image.as_ref().unwrap().name,
            "registry:5000/kubevirt/alpine-container-disk-demo:devel"
        );
        let clone: super::DataVolumeTemplateSpec = serde_json::from_value(json!({
            "metadata": {"name": "c"},
            "spec": {"source": {"pvc": {"namespace": "other", "name": "x"}}}
        }))
        .unwrap();
        assert!(clone.to_volume("ns1").is_err(), "cross-namespace clone");
    }

    #[test]
    fn hotplug_annotation() {
        let mut a = std::collections::BTreeMap::new();
        assert!(super::hotplug_requests(&a).unwrap().is_empty());
        a.insert(
            super::HOTPLUG_ANNOTATION.to_string(),
            r#"{"d1":"vol1"}"#.to_string(),
        );
        assert_eq!(super::hotplug_requests(&a).unwrap()["d1"], "vol1");
        a.insert(super::HOTPLUG_ANNOTATION.to_string(), "[".to_string());
        assert!(super::hotplug_requests(&a).is_err());
        assert!(super::check_disk_name("data-1").is_ok());
        assert!(super::check_disk_name("Data").is_err());
        assert!(super::check_disk_name(&"x".repeat(41)).is_err());
    }
}
