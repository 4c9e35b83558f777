//! Volumes on this host: provisioning `krvirt.io/v1` Volumes into local
//! StoragePools (dir, btrfs), resizing and deleting them, resolving a VMI's
//! `persistentVolumeClaim` / `dataVolume` volumes to files for the plan, and
//! hot-plugging Volumes into running guests.
//!
//! Local pools live on one host, so the host's agent provisions their
//! Volumes (the server may not even see the pool's directory). A Volume is
//! claimed by one agent (`status.host`, compare-and-swap); every later
//! operation on it happens on that host, until a live migration moves it
//! ([`crate::volmove`]).
//!
//! Backend volume names are `{namespace}.{name}` (namespaces have no dots).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use krvirt_api::KindInfo;
use krvirt_api::kubevirt::VirtualMachineInstance;
use krvirt_api::quantity::Quantity;
use krvirt_api::storage::{
    ClaimInfo, CloneType, DEFAULT_POOL, Empty, PoolType, StoragePool, StorageVolume,
    VOLUME_UPLOAD_ANNOTATION, VolumePhase, VolumeStatus, VolumeStatusEntry, hotplug_requests,
};
use krvirt_client::{Client, ClientError, ListParams, PatchTarget};
use krvirt_hypervisor::{DiskFormat, QmpClient, RbdDisk};
use krvirt_image::{ImageStore, ImportOptions, NameTag};
use krvirt_storage::{CloneMode, DiskSource, Format, PoolConfig, StorageBackend, StorageError};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::plan::{HOTPLUG_SLOTS, ResolvedVolume, ResolvedVolumes};

/// Finalizer on provisioned Volumes: the agent removes the backing volume
/// before the object goes.
pub const VOLUME_FINALIZER: &str = "krvirt.io/volume-cleanup";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("StoragePool {0:?} not found")]
    PoolNotFound(String),
    #[error("StoragePool {pool:?}: {message}")]
    Pool { pool: String, message: String },
    #[error("{0}")]
    Source(String),
    #[error("kind {0} is not registered")]
    UnknownKind(&'static str),
    #[error("blocking task failed: {0}")]
    Join(String),
}

/// Why a VMI's Volumes cannot be opened yet.
#[derive(Debug)]
pub enum ResolveError {
    /// Not there yet (missing, provisioning): try again later.
    Wait(String),
    /// Will not work (failed Volume, other host, broken pool).
    Fail(String),
}

fn kind(name: &'static str) -> Result<&'static KindInfo, VolumeError> {
    krvirt_api::find_kind(name).ok_or(VolumeError::UnknownKind(name))
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> Result<T, VolumeError> {
    serde_json::from_value(v).map_err(|source| VolumeError::Decode {
        what: what.to_string(),
        source,
    })
}

/// The temporary image-store tag of the content of an `http` or `upload`
/// Volume (by Volume uid) between its arrival and its copy into the pool.
pub fn transfer_tag(kind: &str, volume_uid: &str) -> String {
    format!("vol{kind}-{volume_uid}:v")
}

/// The name of a Volume in its pool.
pub fn backend_name(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

fn image_format(path: &Path) -> Format {
    use std::io::Read;
    let mut magic = [0u8; 4];
    match std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)) {
        Ok(()) if magic == *b"QFI\xfb" => Format::Qcow2,
        _ => Format::Raw,
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, VolumeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| VolumeError::Join(e.to_string()))?
        .map_err(VolumeError::from)
}

/// Volume provisioning on this host.
#[derive(Clone)]
pub struct Volumes {
    client: Client,
    node: String,
    data_dir: PathBuf,
    images: Arc<ImageStore>,
    vol_kind: &'static KindInfo,
    pool_kind: &'static KindInfo,
}

impl Volumes {
    pub fn new(
        client: Client,
        node: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        images: Arc<ImageStore>,
    ) -> Result<Self, VolumeError> {
        Ok(Volumes {
            client,
            node: node.into(),
            data_dir: data_dir.into(),
            images,
            vol_kind: kind("volumes")?,
            pool_kind: kind("storagepools")?,
        })
    }

    /// Reconcile every Volume, every `interval`, forever.
    pub async fn run(self, interval: Duration) {
        loop {
            if let Err(e) = self.sync_all().await {
                debug!(error = %e, "volume sync failed; retrying");
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// One pass over all Volumes.
    pub async fn sync_all(&self) -> Result<(), VolumeError> {
        let list = self
            .client
            .list(self.vol_kind, &ListParams::all_namespaces())
            .await?;
        for raw in list.items {
            let v: StorageVolume = decode("Volume", raw)?;
            let ns = v.metadata.namespace().to_string();
            let name = v.metadata.name().to_string();
            if let Err(e) = self.sync(&v).await {
                warn!(volume = %format!("{ns}/{name}"), error = %e, "volume sync failed");
                let msg = e.to_string();
                let mut st = v.status.clone().unwrap_or_default();
                if st.message.as_deref() != Some(msg.as_str()) {
                    st.message = Some(msg);
                    if !matches!(st.phase, Some(VolumePhase::Succeeded)) {
                        st.phase = Some(VolumePhase::Failed);
                    }
                    let _ = self.write_status(&ns, &name, &st).await;
                }
            }
        }
        Ok(())
    }

    /// The pool's configuration; the `default` pool is created (a `dir`
    /// pool under the data directory) the first time it is needed.
    pub async fn pool(&self, name: &str) -> Result<PoolConfig, VolumeError> {
        let raw = match self.client.get(self.pool_kind, "", name).await {
            Ok(v) => v,
            Err(e) if e.code() == Some(404) && name == DEFAULT_POOL => {
                let path = self.data_dir.join("pools").join(DEFAULT_POOL);
                let obj = json!({
                    "apiVersion": "krvirt.io/v1", "kind": "StoragePool",
                    "metadata": {"name": DEFAULT_POOL},
                    "spec": {"type": "dir", "path": path.display().to_string()},
                });
                match self.client.create(self.pool_kind, "", &obj).await {
                    Ok(v) => v,
                    Err(e) if e.code() == Some(409) => {
                        self.client.get(self.pool_kind, "", name).await?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) if e.code() == Some(404) => {
                return Err(VolumeError::PoolNotFound(name.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        let pool: StoragePool = decode("StoragePool", raw)?;
        let path = || {
            pool.spec
                .path
                .clone()
                .map(PathBuf::from)
                .ok_or_else(|| VolumeError::Pool {
                    pool: name.to_string(),
                    message: "no spec.path".into(),
                })
        };
        match pool.spec.type_ {
            PoolType::Dir => Ok(PoolConfig::Dir { path: path()? }),
            PoolType::Btrfs => Ok(PoolConfig::Btrfs { path: path()? }),
            PoolType::Rbd => Ok(PoolConfig::Rbd {
                pool: pool.spec.pool.clone().ok_or_else(|| VolumeError::Pool {
                    pool: name.to_string(),
                    message: "no spec.pool (the Ceph pool)".into(),
                })?,
                conf: pool.spec.conf.clone().map(PathBuf::from),
                monitors: pool.spec.monitors.clone(),
                user: pool.spec.user.clone(),
            }),
        }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }
    pub(crate) fn node(&self) -> &str {
        &self.node
    }
    pub(crate) fn vol_kind(&self) -> &'static KindInfo {
        self.vol_kind
    }

    /// Whether StoragePool `name` says every host sees it.
    pub(crate) async fn pool_is_shared(&self, name: &str) -> bool {
        match self.client.get(self.pool_kind, "", name).await {
            Ok(raw) => serde_json::from_value::<StoragePool>(raw).is_ok_and(|p| p.spec.is_shared()),
            Err(_) => false,
        }
    }

    pub(crate) async fn backend(&self, pool: &str) -> Result<Arc<dyn StorageBackend>, VolumeError> {
        let cfg = self.pool(pool).await?;
        let b = blocking(move || krvirt_storage::open(&cfg)).await?;
        Ok(Arc::from(b))
    }

    async fn write_status(
        &self,
        ns: &str,
        name: &str,
        st: &VolumeStatus,
    ) -> Result<(), VolumeError> {
        self.client
            .merge_patch(
                self.vol_kind,
                ns,
                name,
                &json!({ "status": st }),
                PatchTarget::Status,
            )
            .await?;
        Ok(())
    }

    async fn set_finalizers(
        &self,
        v: &StorageVolume,
        finalizers: Vec<String>,
    ) -> Result<(), VolumeError> {
        self.client
            .merge_patch(
                self.vol_kind,
                v.metadata.namespace(),
                v.metadata.name(),
                &json!({"metadata": {"finalizers": finalizers}}),
                PatchTarget::Main,
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn get_volume(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<Option<StorageVolume>, VolumeError> {
        match self.client.get(self.vol_kind, ns, name).await {
            Ok(v) => Ok(Some(decode("Volume", v)?)),
            Err(e) if e.code() == Some(404) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Bring one Volume to its desired state.
    pub async fn sync(&self, v: &StorageVolume) -> Result<(), VolumeError> {
        let ns = v.metadata.namespace().to_string();
        let name = v.metadata.name().to_string();
        // Copies made or left behind by live migrations (crate::volmove).
        let v = &self.settle_moves(v).await?;
        let st = v.status.clone().unwrap_or_default();
        if st.host.as_deref().is_some_and(|h| h != self.node) {
            return Ok(());
        }
        let bname = backend_name(&ns, &name);
        let has_finalizer = v.metadata.finalizers.iter().any(|f| f == VOLUME_FINALIZER);

        if v.metadata.deletion_timestamp.is_some() {
            // A migration's copy or an old copy on another host goes first.
            if has_finalizer && (st.migration.is_some() || !st.stale_copies.is_empty()) {
                return Ok(());
            }
            if has_finalizer {
                if st.host.is_some() {
                    let b = self.backend(v.pool()).await?;
                    let n = bname.clone();
                    blocking(move || b.delete(&n)).await?;
                    info!(volume = %format!("{ns}/{name}"), "volume deleted from pool");
                }
                let rest = v
                    .metadata
                    .finalizers
                    .iter()
                    .filter(|f| f.as_str() != VOLUME_FINALIZER)
                    .cloned()
                    .collect();
                self.set_finalizers(v, rest).await?;
            }
            return Ok(());
        }

        match st.phase {
            Some(VolumePhase::Failed) => Ok(()),
            Some(VolumePhase::Succeeded) => self.maybe_resize(v, &bname, st).await,
            _ => self.provision(v, &bname, st, has_finalizer).await,
        }
    }

    async fn maybe_resize(
        &self,
        v: &StorageVolume,
        bname: &str,
        mut st: VolumeStatus,
    ) -> Result<(), VolumeError> {
        let want = v.spec.capacity.as_ref().and_then(|q| q.value().ok());
        let have = st.capacity.as_ref().and_then(|q| q.value().ok());
        let (Some(want), Some(have)) = (want, have) else {
            return Ok(());
        };
        // A migration is copying it: the target's copy has the old size.
        if st.migration.is_some() {
            return Ok(());
        }
        if want <= have {
            return Ok(());
        }
        let b = self.backend(v.pool()).await?;
        let n = bname.to_string();
        let info = blocking(move || {
            b.resize(&n, want)?;
            b.info(&n)
        })
        .await?;
        st.capacity = Some(Quantity::new(info.capacity.to_string()));
        st.allocation = Some(Quantity::new(info.allocation.to_string()));
        st.message = None;
        self.write_status(v.metadata.namespace(), v.metadata.name(), &st)
            .await
    }

    async fn provision(
        &self,
        v: &StorageVolume,
        bname: &str,
        mut st: VolumeStatus,
        has_finalizer: bool,
    ) -> Result<(), VolumeError> {
        let ns = v.metadata.namespace().to_string();
        let name = v.metadata.name().to_string();
        let src = &v.spec.source;
        // One host claims the Volume (compare-and-swap): agents of several
        // hosts see a new Volume at the same time, and a host-local pool's
        // Volume must be made by exactly one of them.
        if st.host.is_none() {
            if !self.may_claim(v).await? {
                return Ok(());
            }
            let me = self.node.clone();
            let claimed = self
                .modify_status(&ns, &name, |s| {
                    if s.host.is_some() {
                        return false;
                    }
                    s.host = Some(me.clone());
                    true
                })
                .await?;
            if !claimed {
                return Ok(());
            }
            st.host = Some(self.node.clone());
        }
        // An upload Volume waits for its content (the upload endpoint
        // streams it into the image store and records its digest).
        if src.upload.is_some()
            && !v
                .metadata
                .annotations
                .contains_key(VOLUME_UPLOAD_ANNOTATION)
        {
            let msg = format!(
                "waiting for an upload (PUT the disk image to /apis/volumes.krvirt.io/v1/namespaces/{ns}/volumes/{name}/upload)"
            );
            if st.phase != Some(VolumePhase::UploadReady) || st.host.as_deref() != Some(&self.node)
            {
                st.phase = Some(VolumePhase::UploadReady);
                st.host = Some(self.node.clone());
                st.message = Some(msg);
                self.write_status(&ns, &name, &st).await?;
            }
            return Ok(());
        }
        // Sources that depend on another Volume wait for it.
        let source_volume = src
            .volume
            .as_ref()
            .map(|r| r.name.clone())
            .or(src.snapshot.as_ref().map(|s| s.volume.clone()));
        if let Some(sv) = &source_volume {
            let Some(other) = self.get_volume(&ns, sv).await? else {
                return self
                    .pending(&ns, &name, st, format!("source Volume {sv:?} not found"))
                    .await;
            };
            // A copy of a local pool's Volume (a restore's, a clone's) is
            // made by the host holding the source: leave it unclaimed here.
            let source_host = other.status.as_ref().and_then(|s| s.host.as_deref());
            if source_host.is_some_and(|h| h != self.node)
                && other.pool() == v.pool()
                && self.backend(v.pool()).await?.kind() != "rbd"
                && !self.pool_is_shared(v.pool()).await
            {
                return Ok(());
            }
            if other.phase() != Some(VolumePhase::Succeeded) {
                return self
                    .pending(&ns, &name, st, format!("source Volume {sv:?} is not ready"))
                    .await;
            }
            if other.pool() != v.pool() {
                return Err(VolumeError::Source(format!(
                    "source Volume {sv:?} is in pool {:?}; cloning across pools is not supported",
                    other.pool()
                )));
            }
        }
        let backend = self.backend(v.pool()).await?;
        if !has_finalizer {
            let mut f = v.metadata.finalizers.clone();
            f.push(VOLUME_FINALIZER.to_string());
            self.set_finalizers(v, f).await?;
        }
        st.host = Some(self.node.clone());
        st.phase = Some(if source_volume.is_some() {
            VolumePhase::CloneInProgress
        } else {
            VolumePhase::ImportInProgress
        });
        st.message = None;
        self.write_status(&ns, &name, &st).await?;

        let size = v
            .spec
            .capacity
            .as_ref()
            .map(|q| q.value())
            .transpose()
            .map_err(|e| VolumeError::Source(format!("spec.capacity: {e}")))?;
        enum Op {
            Blank(u64),
            Image(PathBuf, Format, CloneMode),
            /// A full copy of transferred content, untagged afterwards.
            Transfer(PathBuf, Format, NameTag),
            Clone(String),
            Snapshot(String, String),
        }
        let op =
            if src.blank.is_some() {
                Op::Blank(size.ok_or_else(|| {
                    VolumeError::Source("a blank Volume needs spec.capacity".into())
                })?)
            } else if let Some(img) = &src.image {
                let resolved = self
                    .images
                    .resolve(&img.name)
                    .map_err(|e| VolumeError::Source(e.to_string()))?;
                let disk = resolved.disk.ok_or_else(|| {
                    VolumeError::Source(format!("image {:?} has no disk", img.name))
                })?;
                let format = image_format(&disk);
                let mode = match img.clone.unwrap_or_default() {
                    CloneType::Linked => CloneMode::Linked,
                    CloneType::Full => CloneMode::Full,
                };
                Op::Image(disk, format, mode)
            } else if let Some(h) = &src.http {
                let uid = v.metadata.uid.clone().unwrap_or_default();
                let tag = NameTag::parse(&transfer_tag("import", &uid))
                    .map_err(|e| VolumeError::Source(e.to_string()))?;
                let mut opts = ImportOptions::new(tag.clone(), h.url.clone());
                opts.expected_digest = h.digest.clone();
                let imp = self
                    .images
                    .import_url(&h.url, &opts)
                    .await
                    .map_err(|e| VolumeError::Source(format!("spec.source.http: {e}")))?;
                let path = self
                    .images
                    .blob_path(&imp.digest)
                    .map_err(|e| VolumeError::Source(e.to_string()))?;
                let format = image_format(&path);
                Op::Transfer(path, format, tag)
            } else if src.upload.is_some() {
                let uid = v.metadata.uid.clone().unwrap_or_default();
                let tag = NameTag::parse(&transfer_tag("upload", &uid))
                    .map_err(|e| VolumeError::Source(e.to_string()))?;
                let digest = v
                    .metadata
                    .annotations
                    .get(VOLUME_UPLOAD_ANNOTATION)
                    .cloned()
                    .unwrap_or_default();
                let path = self
                    .images
                    .blob_path(&digest)
                    .map_err(|e| VolumeError::Source(format!("the upload: {e}")))?;
                if !path.is_file() {
                    return Err(VolumeError::Source(format!(
                        "the uploaded content {digest} is not in this host's image store"
                    )));
                }
                let format = image_format(&path);
                Op::Transfer(path, format, tag)
            } else if let Some(r) = &src.volume {
                Op::Clone(backend_name(&ns, &r.name))
            } else if let Some(s) = &src.snapshot {
                Op::Snapshot(backend_name(&ns, &s.volume), s.name.clone())
            } else {
                return Err(VolumeError::Source(
                    "this Volume source is not implemented by the agent".into(),
                ));
            };
        let n = bname.to_string();
        let images = self.images.clone();
        let info = blocking(move || {
            // A previous attempt that died half-way leaves a partial volume.
            if backend.exists(&n)? {
                backend.delete(&n)?;
            }
            match op {
                Op::Blank(size) => backend.create(&n, size)?,
                Op::Image(path, format, mode) => backend.import(&n, &path, format, mode, size)?,
                Op::Transfer(path, format, tag) => {
                    backend.import(&n, &path, format, CloneMode::Full, size)?;
                    // The blob is unreferenced now: `krvirt image gc` frees it.
                    if let Err(e) = images.untag(&tag, false) {
                        warn!(%tag, error = %e, "transfer tag not removed");
                    }
                }
                Op::Clone(src) => {
                    backend.clone_volume(&src, &n)?;
                    grow(&*backend, &n, size)?
                }
                Op::Snapshot(src, snap) => {
                    backend.create_from_snapshot(&src, &snap, &n)?;
                    grow(&*backend, &n, size)?
                }
            }
            backend.info(&n)
        })
        .await?;
        st.phase = Some(VolumePhase::Succeeded);
        st.capacity = Some(Quantity::new(info.capacity.to_string()));
        st.allocation = Some(Quantity::new(info.allocation.to_string()));
        st.message = None;
        info!(volume = %format!("{ns}/{name}"), capacity = info.capacity, "volume provisioned");
        self.write_status(&ns, &name, &st).await
    }

    /// Whether this host may make Volume `v`: nobody uses it yet, or a
    /// VMI bound to this host does. A Volume a VMI waits for is made on
    /// that VMI's host (once it is placed), not by whichever agent looks
    /// first.
    async fn may_claim(&self, v: &StorageVolume) -> Result<bool, VolumeError> {
        let vmi_kind = kind("virtualmachineinstances")?;
        let ns = v.metadata.namespace();
        // A clone or a Volume from a snapshot of a host-local pool can only
        // be made where its source Volume is.
        let source = v.spec.source.volume.as_ref().map(|r| r.name.clone()).or(v
            .spec
            .source
            .snapshot
            .as_ref()
            .map(|s| s.volume.clone()));
        if let Some(sv) = source
            && !self.pool_is_shared(v.pool()).await
        {
            // (A missing source: claim it, to say so in its status.)
            return Ok(match self.get_volume(ns, &sv).await? {
                None => true,
                Some(o) => o.status.and_then(|s| s.host).as_deref() == Some(self.node.as_str()),
            });
        }
        let list = self
            .client
            .list(vmi_kind, &ListParams::namespaced(ns))
            .await?;
        let vmis: Vec<VirtualMachineInstance> = list
            .items
            .into_iter()
            .filter_map(|o| serde_json::from_value::<VirtualMachineInstance>(o).ok())
            .collect();
        Ok(claimable_by(&vmis, v.metadata.name(), &self.node))
    }

    async fn pending(
        &self,
        ns: &str,
        name: &str,
        mut st: VolumeStatus,
        message: String,
    ) -> Result<(), VolumeError> {
        if st.phase != Some(VolumePhase::Pending) || st.message.as_deref() != Some(&message) {
            st.phase = Some(VolumePhase::Pending);
            st.message = Some(message);
            self.write_status(ns, name, &st).await?;
        }
        Ok(())
    }

    /// How QEMU opens Volume `ns/name`, once it is provisioned here.
    pub async fn open(&self, ns: &str, name: &str) -> Result<ResolvedVolume, ResolveError> {
        let v = self
            .get_volume(ns, name)
            .await
            .map_err(|e| ResolveError::Wait(e.to_string()))?
            .ok_or_else(|| ResolveError::Wait(format!("Volume {name:?} not found")))?;
        match v.phase() {
            Some(VolumePhase::Succeeded) => {}
            Some(VolumePhase::Failed) => {
                return Err(ResolveError::Fail(format!(
                    "Volume {name:?} failed: {}",
                    v.status
                        .as_ref()
                        .and_then(|s| s.message.clone())
                        .unwrap_or_default()
                )));
            }
            _ => return Err(ResolveError::Wait(format!("Volume {name:?} is not ready"))),
        }
        let backend = self
            .backend(v.pool())
            .await
            .map_err(|e| ResolveError::Fail(e.to_string()))?;
        // A local pool's Volume exists only on the host that made it; an
        // rbd pool, or a dir pool marked `shared`, is storage every host
        // reaches.
        if backend.kind() != "rbd"
            && v.status.as_ref().and_then(|s| s.host.as_deref()) != Some(self.node.as_str())
            && !self.pool_is_shared(v.pool()).await
        {
            return Err(ResolveError::Fail(format!(
                "Volume {name:?} is on another host (its StoragePool {:?} is not shared)",
                v.pool()
            )));
        }
        let n = backend_name(ns, name);
        let src = blocking(move || backend.disk(&n))
            .await
            .map_err(|e| ResolveError::Fail(e.to_string()))?;
        Ok(resolved(src))
    }

    /// Every krvirt Volume a VMI uses.
    pub async fn resolve(
        &self,
        vmi: &VirtualMachineInstance,
    ) -> Result<ResolvedVolumes, ResolveError> {
        let ns = vmi.metadata.namespace();
        let mut out = ResolvedVolumes::new();
        for vol in &vmi.spec.volumes {
            if let Some(claim) = vol.claim() {
                let r = self.open(ns, claim).await?;
                out.insert(claim.to_string(), r);
            }
        }
        Ok(out)
    }
}

/// Whether host `me` may make Volume `volume` given the VMIs of its
/// namespace: nobody (not ended) uses it, or one bound to `me` does
/// (among its own Volumes or hot-plugged).
pub fn claimable_by(vmis: &[VirtualMachineInstance], volume: &str, me: &str) -> bool {
    let users: Vec<&VirtualMachineInstance> = vmis
        .iter()
        .filter(|vmi| {
            vmi.spec.volumes.iter().any(|x| x.claim() == Some(volume))
                || hotplug_requests(&vmi.metadata.annotations)
                    .is_ok_and(|h| h.values().any(|v| v == volume))
        })
        .filter(|vmi| {
            !vmi.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(|p| p.is_final())
        })
        .collect();
    users.is_empty()
        || users
            .iter()
            .any(|vmi| vmi.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(me))
}

/// What the plan needs of a volume's [`DiskSource`].
fn resolved(src: DiskSource) -> ResolvedVolume {
    let fmt = |f: Format| match f {
        Format::Qcow2 => DiskFormat::Qcow2,
        Format::Raw => DiskFormat::Raw,
    };
    match src {
        DiskSource::File { path, format } => ResolvedVolume {
            path,
            format: fmt(format),
            rbd: None,
        },
        DiskSource::Rbd {
            pool,
            image,
            conf,
            user,
            monitors,
        } => ResolvedVolume {
            path: PathBuf::new(),
            format: DiskFormat::Raw,
            rbd: Some(RbdDisk {
                pool,
                image,
                conf,
                user,
                monitors,
            }),
        },
    }
}

/// The `file` child of a hot-plugged disk's `blockdev-add`.
fn blockdev_file(r: &ResolvedVolume) -> Value {
    match &r.rbd {
        None => json!({"driver": "file", "filename": r.path}),
        Some(rbd) => {
            let mut v = json!({"driver": "rbd", "pool": rbd.pool, "image": rbd.image});
            if let Some(c) = &rbd.conf {
                v["conf"] = json!(c);
            }
            if let Some(u) = &rbd.user {
                v["user"] = json!(u);
            }
            let servers: Vec<Value> = rbd
                .monitors
                .iter()
                .filter_map(|m| krvirt_hypervisor::config::split_monitor(m))
                .map(|(host, port)| json!({"host": host, "port": port.to_string()}))
                .collect();
            if !servers.is_empty() {
                v["server"] = Value::Array(servers);
            }
            v
        }
    }
}

/// `hp{slot}-{disk}` device ids of hot-plugged disks.
fn parse_hotplug_id(id: &str) -> Option<(u32, &str)> {
    let (slot, disk) = id.strip_prefix("hp")?.split_once('-')?;
    Some((slot.parse().ok()?, disk))
}

fn entry(disk: &str, volume: &str, phase: &str, message: Option<String>) -> VolumeStatusEntry {
    VolumeStatusEntry {
        name: disk.to_string(),
        target: None,
        phase: Some(phase.to_string()),
        reason: None,
        message,
        persistent_volume_claim_info: Some(ClaimInfo {
            claim_name: volume.to_string(),
        }),
        hotplug_volume: Some(Empty {}),
    }
}

/// Ids of the guest's hot-plugged disks: disk → (slot, device id).
async fn hotplugged(
    qmp: &QmpClient,
) -> Result<std::collections::BTreeMap<String, (u32, String)>, krvirt_hypervisor::QmpError> {
    let list = qmp
        .execute("qom-list", Some(json!({"path": "/machine/peripheral"})))
        .await?;
    let mut out = std::collections::BTreeMap::new();
    for item in list.as_array().into_iter().flatten() {
        let Some(id) = item["name"].as_str() else {
            continue;
        };
        if let Some((slot, disk)) = parse_hotplug_id(id) {
            out.insert(disk.to_string(), (slot, id.to_string()));
        }
    }
    Ok(out)
}

async fn block_nodes(qmp: &QmpClient) -> Vec<String> {
    match qmp
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .await
    {
        Ok(v) => v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["node-name"].as_str().map(str::to_string))
            .collect(),
        Err(_) => Vec::new(),
    }
}

impl Volumes {
    /// Make the guest's hot-plugged disks match the VMI's hot-plug
    /// annotation: attach (`blockdev-add` + `device_add virtio-blk-pci` on a
    /// spare root port) and detach (`device_del`, which the guest
    /// acknowledges, then `blockdev-del`). Returns the hot-plug status.
    pub async fn sync_hotplug(
        &self,
        key: &impl std::fmt::Display,
        vmi: &VirtualMachineInstance,
        qmp: &QmpClient,
    ) -> Vec<VolumeStatusEntry> {
        let wanted = match hotplug_requests(&vmi.metadata.annotations) {
            Ok(w) => w,
            Err(e) => return vec![entry("", "", "Failed", Some(e))],
        };
        let mut present = match hotplugged(qmp).await {
            Ok(p) => p,
            Err(e) => {
                debug!(%key, error = %e, "qom-list failed");
                return vmi
                    .status
                    .as_ref()
                    .map(|s| s.volume_status.clone())
                    .unwrap_or_default();
            }
        };
        if wanted.is_empty() && present.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();

        // Detach what is no longer wanted.
        let unwanted: Vec<(String, (u32, String))> = present
            .iter()
            .filter(|(d, _)| !wanted.contains_key(*d))
            .map(|(d, v)| (d.clone(), v.clone()))
            .collect();
        for (disk, (slot, id)) in unwanted {
            if let Err(e) = qmp.execute("device_del", Some(json!({"id": id}))).await {
                debug!(%key, %id, error = %e, "device_del");
            }
            let mut gone = false;
            for _ in 0..150 {
                if hotplugged(qmp).await.is_ok_and(|p| !p.contains_key(&disk)) {
                    gone = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if gone {
                let node = format!("hp{slot}-{disk}-fmt");
                if let Err(e) = qmp
                    .execute("blockdev-del", Some(json!({"node-name": node})))
                    .await
                {
                    warn!(%key, %node, error = %e, "blockdev-del after unplug failed");
                }
                info!(%key, %disk, "volume unplugged");
                present.remove(&disk);
            } else {
                let mut e = entry(
                    &disk,
                    "",
                    "Detaching",
                    Some("waiting for the guest to release the device".into()),
                );
                e.target = Some(id);
                out.push(e);
            }
        }

        // Attach what is wanted and missing.
        let nodes = block_nodes(qmp).await;
        for (disk, volume) in &wanted {
            if let Some((_, id)) = present.get(disk) {
                let mut e = entry(disk, volume, "Ready", None);
                e.target = Some(id.clone());
                out.push(e);
                continue;
            }
            if vmi.spec.volumes.iter().any(|v| &v.name == disk)
                || krvirt_api::storage::check_disk_name(disk).is_err()
            {
                out.push(entry(
                    disk,
                    volume,
                    "Failed",
                    Some(format!("{disk:?} is not a free, valid disk name")),
                ));
                continue;
            }
            let r = match self.open(vmi.metadata.namespace(), volume).await {
                Ok(r) => r,
                Err(ResolveError::Wait(m)) => {
                    out.push(entry(disk, volume, "Pending", Some(m)));
                    continue;
                }
                Err(ResolveError::Fail(m)) => {
                    out.push(entry(disk, volume, "Failed", Some(m)));
                    continue;
                }
            };
            let used: Vec<u32> = present.values().map(|(s, _)| *s).collect();
            let Some(slot) = (0..HOTPLUG_SLOTS).find(|s| !used.contains(s)) else {
                out.push(entry(
                    disk,
                    volume,
                    "Failed",
                    Some(format!(
                        "no free hot-plug slot (a guest has {HOTPLUG_SLOTS})"
                    )),
                ));
                continue;
            };
            let node = format!("hp{slot}-{disk}-fmt");
            let id = format!("hp{slot}-{disk}");
            if nodes.contains(&node) {
                let _ = qmp
                    .execute("blockdev-del", Some(json!({"node-name": node})))
                    .await;
            }
            // An unprivileged QEMU opens the Volume itself: hand it over.
            if let Some(user) = crate::agent::QEMU_USER.get()
                && let Err(e) = krvirt_hypervisor::isolation::grant(
                    &r.path,
                    user,
                    krvirt_hypervisor::isolation::Access::ReadWrite,
                )
            {
                out.push(entry(disk, volume, "Failed", Some(e.to_string())));
                continue;
            }
            let add = qmp
                .execute(
                    "blockdev-add",
                    Some(json!({
                        "driver": r.format.qemu_driver(),
                        "node-name": node,
                        "file": blockdev_file(&r),
                    })),
                )
                .await;
            let dev = match add {
                Ok(_) => {
                    qmp.execute(
                        "device_add",
                        Some(json!({
                            "driver": "virtio-blk-pci",
                            "id": id,
                            "drive": node,
                            "bus": format!("hotplug{slot}"),
                            "serial": disk.chars().take(20).collect::<String>(),
                        })),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            match dev {
                Ok(_) => {
                    info!(%key, %disk, %volume, %id, "volume hot-plugged");
                    present.insert(disk.clone(), (slot, id.clone()));
                    let mut e = entry(disk, volume, "Ready", None);
                    e.target = Some(id);
                    out.push(e);
                }
                Err(e) => {
                    let _ = qmp
                        .execute("blockdev-del", Some(json!({"node-name": node})))
                        .await;
                    out.push(entry(disk, volume, "Failed", Some(e.to_string())));
                }
            }
        }
        out
    }
}

fn grow(b: &dyn StorageBackend, name: &str, size: Option<u64>) -> Result<(), StorageError> {
    if let Some(size) = size
        && size > b.info(name)?.capacity
    {
        b.resize(name, size)?;
    }
    Ok(())
}
