//! Live migration of Volumes on host-local pools (non-shared storage).
//!
//! A Volume of a `dir` or `btrfs` pool that is not `spec.shared` exists on
//! one host only (`status.host`). When a VMI using it migrates, the
//! Volume travels with it as the run directory's disks do:
//!
//! 1. **Target** ([`Volumes::resolve_for_target`]): records the copy in the
//!    Volume's `status.migration` (target host, migration and VMI uids)
//!    *before* it creates anything, then creates an empty volume of the
//!    same virtual size in the same pool on its host (the pool's type
//!    gives the same format), which the migration exports over NBD.
//! 2. **Source** ([`Volumes::source_copies`]): mirrors every Volume whose
//!    record names this migration with `sync: full` (refusing Volumes with
//!    pool snapshots: a mirror copies the current content only).
//! 3. **Resolution** ([`settle_action`], level-triggered from every agent's
//!    Volume sync): once the migration has ended, as the VMI (or, when the
//!    VMI is gone, the migration object) says: succeeded → one status
//!    write moves the Volume (`host` = target, the source listed in
//!    `staleCopies`, the record dropped); failed or cancelled → the
//!    target deletes its copy, then drops the record. A host listed in
//!    `staleCopies` deletes its copy, then removes itself from the list.
//!
//! Nothing is deleted before the location of the current data is recorded:
//! the source's copy only once `host` names the target, the target's copy
//! only once the migration is known to have failed; an agent that restarts
//! in between finds the record and finishes the work. When nobody can tell
//! (the VMI and the migration object are both gone), both copies stay and
//! the Volume's `status.message` says so.

use std::path::PathBuf;

use krvirt_api::kubevirt::VirtualMachineInstance;
use krvirt_api::migration::{MigrationPhase, VirtualMachineInstanceMigration};
use krvirt_api::storage::{StorageVolume, VolumeMigration, VolumePhase, VolumeStatus};
use krvirt_client::ListParams;
use krvirt_storage::{DiskSource, StorageError};
use tracing::{info, warn};

use crate::migration::{MirrorDisk, MirrorSync};
use crate::plan::{Plan, ResolvedVolume, ResolvedVolumes};
use crate::storage::{VolumeError, Volumes, backend_name};

// ----- pure decisions ------------------------------------------------------

/// How the migration that copied a Volume ended, as far as one can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveOutcome {
    /// Not ended yet.
    Pending,
    /// Succeeded: the guest (and so the current data) is on the target.
    Moved,
    /// Failed or cancelled: the guest stayed on the source.
    Stayed,
    /// The VMI cannot say (gone, another VMI of that name, no state).
    AskMigration,
}

/// The outcome of the migration recorded in `rec`, from the VMI
/// (`source`: the Volume's host, where the guest was before).
pub fn outcome_from_vmi(
    rec: &VolumeMigration,
    source: &str,
    vmi: Option<&VirtualMachineInstance>,
) -> MoveOutcome {
    let Some(vmi) = vmi.filter(|v| v.metadata.uid.as_deref() == Some(rec.vmi_uid.as_str())) else {
        return MoveOutcome::AskMigration;
    };
    let Some(ms) = vmi.status.as_ref().and_then(|s| s.migration_state.as_ref()) else {
        return MoveOutcome::AskMigration;
    };
    if ms.migration_uid.as_deref() == Some(rec.migration_uid.as_str()) {
        return if ms.completed == Some(true) {
            MoveOutcome::Moved
        } else if ms.failed == Some(true) {
            MoveOutcome::Stayed
        } else {
            MoveOutcome::Pending
        };
    }
    // A later migration of the same VMI started from where this one left
    // the guest (a VMI moves only by migrating).
    match ms.source_node.as_deref() {
        Some(s) if s == rec.target_host => MoveOutcome::Moved,
        Some(s) if s == source => MoveOutcome::Stayed,
        _ => MoveOutcome::AskMigration,
    }
}

/// The outcome from the VirtualMachineInstanceMigration's phase (`None`:
/// the object is gone too).
pub fn outcome_from_migration(phase: Option<MigrationPhase>) -> Option<MoveOutcome> {
    match phase? {
        MigrationPhase::Succeeded => Some(MoveOutcome::Moved),
        MigrationPhase::Failed => Some(MoveOutcome::Stayed),
        _ => Some(MoveOutcome::Pending),
    }
}

/// What host `me` does about a Volume's migration record and old copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    Nothing,
    /// Write the move: `host` = `to`, `from` listed as a stale copy, the
    /// record dropped (one status write; nothing is deleted yet).
    RecordMove {
        from: String,
        to: String,
    },
    /// Delete this host's copy (the failed migration's target), then drop
    /// the record.
    DropTargetCopy,
    /// Delete this host's old copy, then remove it from `staleCopies`.
    DeleteStaleCopy,
    /// This host holds the Volume although listed as stale: only remove it
    /// from the list.
    ForgetStale,
    /// Keep both copies; the message says why.
    Undecidable(String),
}

/// Whether host `me` must look up how the recorded migration ended.
pub fn needs_outcome(st: &VolumeStatus, me: &str) -> bool {
    st.migration
        .as_ref()
        .is_some_and(|r| r.target_host == me || st.host.as_deref() == Some(me))
}

/// The next step for host `me` (`outcome`: how the recorded migration
/// ended, when [`needs_outcome`]; `None` = unknown even to the migration
/// object).
pub fn settle_action(st: &VolumeStatus, me: &str, outcome: Option<&MoveOutcome>) -> Settle {
    if let Some(rec) = &st.migration {
        if !needs_outcome(st, me) {
            return Settle::Nothing;
        }
        let Some(source) = st.host.as_deref() else {
            return Settle::Undecidable("the Volume records a migration but no host".into());
        };
        if source == rec.target_host {
            return Settle::Undecidable(format!(
                "the Volume's migration record names its own host {source:?} as the target"
            ));
        }
        return match outcome {
            Some(MoveOutcome::Moved) => Settle::RecordMove {
                from: source.to_string(),
                to: rec.target_host.clone(),
            },
            Some(MoveOutcome::Stayed) if rec.target_host == me => Settle::DropTargetCopy,
            Some(MoveOutcome::Stayed) | Some(MoveOutcome::Pending) => Settle::Nothing,
            Some(MoveOutcome::AskMigration) | None => Settle::Undecidable(format!(
                "cannot tell whether migration {} of VMI {:?} moved the Volume to host {:?}: \
                 the VMI and the migration are gone; both copies are kept (hosts {:?} and {:?})",
                rec.migration_uid, rec.vmi_name, rec.target_host, source, rec.target_host
            )),
        };
    }
    if st.stale_copies.iter().any(|h| h == me) {
        if st.host.as_deref() == Some(me) {
            Settle::ForgetStale
        } else {
            Settle::DeleteStaleCopy
        }
    } else {
        Settle::Nothing
    }
}

/// The Volume disks of a plan the source mirrors (`sync: full`, into an
/// empty copy): the writable, file-backed disks at `paths`.
pub fn volume_mirror_disks(plan: &Plan, paths: &[PathBuf]) -> Vec<MirrorDisk> {
    plan.config
        .disks
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.read_only && d.rbd.is_none() && paths.contains(&d.path))
        .map(|(i, _)| MirrorDisk {
            node: krvirt_hypervisor::argv::disk_format_node(i),
            sync: MirrorSync::Full,
        })
        .collect()
}

// ----- on the hosts ----------------------------------------------------------

fn file_path(src: DiskSource, name: &str) -> Result<PathBuf, String> {
    match src {
        DiskSource::File { path, .. } => Ok(path),
        DiskSource::Rbd { .. } => Err(format!("Volume {name:?} is an rbd image, not a file")),
    }
}

impl Volumes {
    /// Compare-and-swap update of a Volume's status; `f` returns false to
    /// leave it unchanged. Returns whether a write happened.
    pub(crate) async fn modify_status<F>(
        &self,
        ns: &str,
        name: &str,
        f: F,
    ) -> Result<bool, VolumeError>
    where
        F: FnMut(&mut VolumeStatus) -> bool,
    {
        Ok(self
            .client()
            .modify_status(self.vol_kind(), ns, name, f)
            .await?)
    }

    async fn move_outcome(&self, v: &StorageVolume, rec: &VolumeMigration) -> Option<MoveOutcome> {
        let ns = v.metadata.namespace();
        let source = v
            .status
            .as_ref()
            .and_then(|s| s.host.clone())
            .unwrap_or_default();
        let vmi_kind = krvirt_api::find_kind("virtualmachineinstances")?;
        let vmi = match self.client().get(vmi_kind, ns, &rec.vmi_name).await {
            Ok(raw) => serde_json::from_value::<VirtualMachineInstance>(raw).ok(),
            Err(e) if e.code() == Some(404) => None,
            Err(_) => return Some(MoveOutcome::Pending), // try again later
        };
        match outcome_from_vmi(rec, &source, vmi.as_ref()) {
            MoveOutcome::AskMigration => {}
            o => return Some(o),
        }
        let mig_kind = krvirt_api::find_kind("virtualmachineinstancemigrations")?;
        let list = match self
            .client()
            .list(mig_kind, &ListParams::namespaced(ns))
            .await
        {
            Ok(l) => l,
            Err(_) => return Some(MoveOutcome::Pending),
        };
        let phase = list
            .items
            .into_iter()
            .filter_map(|m| serde_json::from_value::<VirtualMachineInstanceMigration>(m).ok())
            .find(|m| m.metadata.uid.as_deref() == Some(rec.migration_uid.as_str()))
            .map(|m| m.status.and_then(|s| s.phase).unwrap_or_default());
        outcome_from_migration(phase)
    }

    /// Resolve what live migrations left on a Volume (its record, its old
    /// copies) as far as this host is concerned; returns the Volume as it
    /// is afterwards.
    pub(crate) async fn settle_moves(
        &self,
        v: &StorageVolume,
    ) -> Result<StorageVolume, VolumeError> {
        let ns = v.metadata.namespace().to_string();
        let name = v.metadata.name().to_string();
        let me = self.node().to_string();
        let mut v = v.clone();
        for _ in 0..3 {
            let st = v.status.clone().unwrap_or_default();
            let outcome = match &st.migration {
                Some(rec) if needs_outcome(&st, &me) => self.move_outcome(&v, rec).await,
                _ => None,
            };
            let action = settle_action(&st, &me, outcome.as_ref());
            let bname = backend_name(&ns, &name);
            let rec_uid = st.migration.as_ref().map(|r| r.migration_uid.clone());
            match action {
                Settle::Nothing => return Ok(v),
                Settle::Undecidable(msg) => {
                    if st.message.as_deref() != Some(msg.as_str()) {
                        warn!(volume = %format!("{ns}/{name}"), %msg, "volume migration undecidable");
                        self.modify_status(&ns, &name, |s| {
                            s.message = Some(msg.clone());
                            true
                        })
                        .await?;
                    }
                    return Ok(v);
                }
                Settle::RecordMove { from, to } => {
                    let wrote = self
                        .modify_status(&ns, &name, |s| {
                            if s.migration.as_ref().map(|r| &r.migration_uid) != rec_uid.as_ref()
                                || s.host.as_deref() != Some(from.as_str())
                            {
                                return false;
                            }
                            s.host = Some(to.clone());
                            s.migration = None;
                            if !s.stale_copies.contains(&from) {
                                s.stale_copies.push(from.clone());
                            }
                            s.message = None;
                            true
                        })
                        .await?;
                    if wrote {
                        info!(volume = %format!("{ns}/{name}"), %from, %to, "volume moved with its VMI");
                    }
                }
                Settle::DropTargetCopy => {
                    let b = self.backend(v.pool()).await?;
                    let n = bname.clone();
                    crate::storage::blocking(move || b.delete(&n)).await?;
                    info!(volume = %format!("{ns}/{name}"), "migration failed: the target's copy is deleted");
                    self.modify_status(&ns, &name, |s| {
                        if s.migration.as_ref().map(|r| &r.migration_uid) != rec_uid.as_ref() {
                            return false;
                        }
                        s.migration = None;
                        true
                    })
                    .await?;
                }
                Settle::DeleteStaleCopy => {
                    let b = self.backend(v.pool()).await?;
                    let n = bname.clone();
                    crate::storage::blocking(move || b.delete(&n)).await?;
                    info!(volume = %format!("{ns}/{name}"), "old copy deleted (the Volume moved to another host)");
                    self.modify_status(&ns, &name, |s| forget_stale(s, &me))
                        .await?;
                }
                Settle::ForgetStale => {
                    self.modify_status(&ns, &name, |s| forget_stale(s, &me))
                        .await?;
                }
            }
            match self.get_volume(&ns, &name).await? {
                Some(fresh) => v = fresh,
                None => return Ok(v),
            }
        }
        Ok(v)
    }

    /// The Volumes of `vmi` as the target of migration `mig_uid` opens
    /// them: shared ones in place; host-local ones as a new, empty copy in
    /// the same pool on this host (recorded in the Volume first). Returns
    /// them and the paths of the copies (mirrored by the source).
    pub(crate) async fn resolve_for_target(
        &self,
        vmi: &VirtualMachineInstance,
        mig_uid: &str,
        source: &str,
    ) -> Result<(ResolvedVolumes, Vec<PathBuf>), String> {
        let ns = vmi.metadata.namespace();
        let mut out = ResolvedVolumes::new();
        let mut copies = Vec::new();
        for vol in &vmi.spec.volumes {
            let Some(claim) = vol.claim() else { continue };
            let v = self
                .get_volume(ns, claim)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("Volume {claim:?} not found"))?;
            if self.pool_is_shared(v.pool()).await {
                let r = self.open(ns, claim).await.map_err(|e| match e {
                    crate::storage::ResolveError::Wait(m)
                    | crate::storage::ResolveError::Fail(m) => m,
                })?;
                out.insert(claim.to_string(), r);
                continue;
            }
            let read_only = vol
                .persistent_volume_claim
                .as_ref()
                .and_then(|p| p.read_only)
                == Some(true);
            if read_only {
                return Err(format!(
                    "Volume {claim:?} (host-local StoragePool {:?}) is attached read-only; only writable Volumes are mirrored",
                    v.pool()
                ));
            }
            let r = self.prepare_copy(&v, vmi, mig_uid, source).await?;
            copies.push(r.path.clone());
            out.insert(claim.to_string(), r);
        }
        Ok((out, copies))
    }

    async fn prepare_copy(
        &self,
        v: &StorageVolume,
        vmi: &VirtualMachineInstance,
        mig_uid: &str,
        source: &str,
    ) -> Result<ResolvedVolume, String> {
        let (ns, name) = (v.metadata.namespace(), v.metadata.name());
        let me = self.node().to_string();
        let pool = v.pool().to_string();
        let st = v.status.clone().unwrap_or_default();
        if st.phase != Some(VolumePhase::Succeeded) {
            return Err(format!("Volume {name:?} is not ready"));
        }
        if st.host.as_deref() != Some(source) {
            return Err(format!(
                "Volume {name:?} (host-local StoragePool {pool:?}) is on host {:?}, not on the migration's source {source:?}",
                st.host.as_deref().unwrap_or("none")
            ));
        }
        let size = st
            .capacity
            .as_ref()
            .and_then(|q| q.value().ok())
            .ok_or_else(|| format!("Volume {name:?} records no capacity"))?;
        let ours = match &st.migration {
            Some(r) if r.migration_uid == mig_uid && r.target_host == me => true,
            Some(r) => {
                return Err(format!(
                    "Volume {name:?}: the copy made by an earlier migration ({}) to host {:?} is not resolved yet",
                    r.migration_uid, r.target_host
                ));
            }
            None => false,
        };
        let backend = self.backend(&pool).await.map_err(|e| e.to_string())?;
        let bname = backend_name(ns, name);
        // An old copy a previous migration left here (the guest comes back).
        if st.stale_copies.contains(&me) {
            let (b, n) = (backend.clone(), bname.clone());
            crate::storage::blocking(move || b.delete(&n))
                .await
                .map_err(|e| e.to_string())?;
            self.modify_status(ns, name, |s| forget_stale(s, &me))
                .await
                .map_err(|e| e.to_string())?;
        }
        let (b, n) = (backend.clone(), bname.clone());
        let exists = crate::storage::blocking(move || b.exists(&n))
            .await
            .map_err(|e| e.to_string())?;
        if exists && !ours {
            return Err(format!(
                "StoragePool {pool:?} on host {me:?} already holds a volume named {bname:?} although Volume {name:?} lives on host {source:?}; \
                 if the pool's path is the same storage on every host, mark the StoragePool spec.shared: true"
            ));
        }
        if !ours {
            // Recorded before anything exists here: whoever finds the
            // record later knows this host may hold a copy.
            let rec = VolumeMigration {
                target_host: me.clone(),
                migration_uid: mig_uid.to_string(),
                vmi_name: vmi.metadata.name().to_string(),
                vmi_uid: vmi.metadata.uid.clone().unwrap_or_default(),
            };
            let wrote = self
                .modify_status(ns, name, |s| {
                    if s.host.as_deref() != Some(source) || s.migration.is_some() {
                        return false;
                    }
                    s.migration = Some(rec.clone());
                    true
                })
                .await
                .map_err(|e| e.to_string())?;
            if !wrote {
                return Err(format!(
                    "Volume {name:?} changed while the target prepared its copy"
                ));
            }
        }
        let (b, n) = (backend.clone(), bname.clone());
        let made = crate::storage::blocking(move || {
            if b.exists(&n)? {
                b.delete(&n)?; // our own partial copy of an earlier attempt
            }
            b.create(&n, size)?;
            b.disk(&n)
        })
        .await;
        let src = match made {
            Ok(src) => src,
            Err(VolumeError::Storage(StorageError::AlreadyExists(_))) => {
                // Someone else's file appeared meanwhile: not ours to delete.
                let _ = self
                    .modify_status(ns, name, |s| {
                        let mine = s
                            .migration
                            .as_ref()
                            .is_some_and(|r| r.migration_uid == mig_uid);
                        if mine {
                            s.migration = None;
                        }
                        mine
                    })
                    .await;
                return Err(format!(
                    "StoragePool {pool:?} on host {me:?}: a volume {bname:?} appeared while the target made its copy"
                ));
            }
            Err(e) => return Err(format!("creating the copy of Volume {name:?}: {e}")),
        };
        info!(volume = %format!("{ns}/{name}"), %pool, size, "empty copy made for the migration");
        let format = src.format();
        let path = file_path(src, name)?;
        Ok(ResolvedVolume {
            path,
            format: match format {
                krvirt_storage::Format::Qcow2 => krvirt_hypervisor::DiskFormat::Qcow2,
                krvirt_storage::Format::Raw => krvirt_hypervisor::DiskFormat::Raw,
            },
            rbd: None,
        })
    }

    /// The files of `vmi`'s host-local Volumes the source mirrors for
    /// migration `mig_uid`: each must carry the target's record of that
    /// migration, and none may have pool snapshots.
    pub(crate) async fn source_copies(
        &self,
        vmi: &VirtualMachineInstance,
        mig_uid: &str,
    ) -> Result<Vec<PathBuf>, String> {
        let ns = vmi.metadata.namespace();
        let mut paths = Vec::new();
        for vol in &vmi.spec.volumes {
            let Some(claim) = vol.claim() else { continue };
            let v = self
                .get_volume(ns, claim)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("Volume {claim:?} not found"))?;
            if self.pool_is_shared(v.pool()).await {
                continue;
            }
            let recorded = v
                .status
                .as_ref()
                .and_then(|s| s.migration.as_ref())
                .is_some_and(|r| r.migration_uid == mig_uid);
            if !recorded {
                return Err(format!(
                    "Volume {claim:?} (host-local StoragePool {:?}) has no copy on the target",
                    v.pool()
                ));
            }
            let backend = self.backend(v.pool()).await.map_err(|e| e.to_string())?;
            let n = backend_name(ns, claim);
            let (snaps, src) =
                crate::storage::blocking(move || Ok((backend.snapshots(&n)?, backend.disk(&n)?)))
                    .await
                    .map_err(|e| e.to_string())?;
            if !snaps.is_empty() {
                return Err(snapshot_refusal(claim, &snaps));
            }
            paths.push(file_path(src, claim)?);
        }
        Ok(paths)
    }
}

/// Why a Volume with pool snapshots does not migrate.
pub fn snapshot_refusal(volume: &str, snaps: &[String]) -> String {
    format!(
        "Volume {volume:?} has pool snapshots ({}) that a block mirror cannot carry to another host; \
         delete its VirtualMachineSnapshots (pool snapshot vmsnap-UID belongs to the snapshot with that uid) to migrate it",
        snaps.join(", ")
    )
}

fn forget_stale(s: &mut VolumeStatus, me: &str) -> bool {
    let before = s.stale_copies.len();
    s.stale_copies.retain(|h| h != me);
    s.stale_copies.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;
    use krvirt_api::migration::MigrationState;
    use serde_json::json;

    fn rec() -> VolumeMigration {
        VolumeMigration {
            target_host: "b".into(),
            migration_uid: "m1".into(),
            vmi_name: "v".into(),
            vmi_uid: "u1".into(),
        }
    }

    fn vmi(uid: &str, ms: Option<MigrationState>) -> VirtualMachineInstance {
        serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "v", "namespace": "default", "uid": uid},
            "spec": {"domain": {"devices": {}}},
            "status": {"phase": "Running", "nodeName": "a", "migrationState": ms},
        }))
        .unwrap()
    }

    fn state(uid: &str, source: &str) -> MigrationState {
        MigrationState {
            migration_uid: Some(uid.into()),
            source_node: Some(source.into()),
            target_node: Some("x".into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_vmi_says_how_the_recorded_migration_ended() {
        let r = rec();
        let mut ms = state("m1", "a");
        assert_eq!(
            outcome_from_vmi(&r, "a", Some(&vmi("u1", Some(ms.clone())))),
            MoveOutcome::Pending
        );
        ms.completed = Some(true);
        assert_eq!(
            outcome_from_vmi(&r, "a", Some(&vmi("u1", Some(ms.clone())))),
            MoveOutcome::Moved
        );
        let mut failed = state("m1", "a");
        failed.failed = Some(true);
        assert_eq!(
            outcome_from_vmi(&r, "a", Some(&vmi("u1", Some(failed)))),
            MoveOutcome::Stayed
        );
        // A later migration started where this one left the guest.
        assert_eq!(
            outcome_from_vmi(&r, "a", Some(&vmi("u1", Some(state("m2", "b"))))),
            MoveOutcome::Moved
        );
        assert_eq!(
            outcome_from_vmi(&r, "a", Some(&vmi("u1", Some(state("m2", "a"))))),
            MoveOutcome::Stayed
        );
        assert_eq!(
            outcome_from_vmi(&r, "a", Some(&vmi("u1", Some(state("m2", "c"))))),
            MoveOutcome::AskMigration
        );
        // Gone, or a new VMI of the same name (a restart): ask the migration.
        assert_eq!(outcome_from_vmi(&r, "a", None), MoveOutcome::AskMigration);
        assert_eq!(
            outcome_from_vmi(&r, "a", Some(&vmi("u2", Some(ms)))),
            MoveOutcome::AskMigration
        );
        assert_eq!(
            outcome_from_vmi(&r, "a", Some(&vmi("u1", None))),
            MoveOutcome::AskMigration
        );
        assert_eq!(
            outcome_from_migration(Some(MigrationPhase::Succeeded)),
            Some(MoveOutcome::Moved)
        );
        assert_eq!(
            outcome_from_migration(Some(MigrationPhase::Failed)),
            Some(MoveOutcome::Stayed)
        );
        assert_eq!(
            outcome_from_migration(Some(MigrationPhase::Running)),
            Some(MoveOutcome::Pending)
        );
        assert_eq!(outcome_from_migration(None), None);
    }

    fn status(host: &str, migration: Option<VolumeMigration>, stale: &[&str]) -> VolumeStatus {
        VolumeStatus {
            phase: Some(VolumePhase::Succeeded),
            host: Some(host.into()),
            migration,
            stale_copies: stale.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn nothing_is_deleted_before_the_new_location_is_recorded() {
        let st = status("a", Some(rec()), &[]);
        // Success: first the move is written (source listed as stale)...
        let moved = Settle::RecordMove {
            from: "a".into(),
            to: "b".into(),
        };
        assert_eq!(settle_action(&st, "a", Some(&MoveOutcome::Moved)), moved);
        assert_eq!(settle_action(&st, "b", Some(&MoveOutcome::Moved)), moved);
        // ...and only then the source deletes its old copy; the target,
        // which now holds the Volume, deletes nothing.
        let after = status("b", None, &["a"]);
        assert_eq!(settle_action(&after, "a", None), Settle::DeleteStaleCopy);
        assert_eq!(settle_action(&after, "b", None), Settle::Nothing);
        // A host listed as stale that holds the Volume keeps it.
        assert_eq!(
            settle_action(&status("a", None, &["a"]), "a", None),
            Settle::ForgetStale
        );
        // Hosts not involved do nothing, whatever the outcome.
        assert!(!needs_outcome(&st, "c"));
        assert_eq!(
            settle_action(&st, "c", Some(&MoveOutcome::Stayed)),
            Settle::Nothing
        );
    }

    #[test]
    fn a_failed_migration_drops_only_the_targets_copy() {
        let st = status("a", Some(rec()), &[]);
        assert_eq!(
            settle_action(&st, "b", Some(&MoveOutcome::Stayed)),
            Settle::DropTargetCopy
        );
        assert_eq!(
            settle_action(&st, "a", Some(&MoveOutcome::Stayed)),
            Settle::Nothing
        );
        // Still going: nobody touches anything (an agent restart finds the
        // record again).
        for me in ["a", "b"] {
            assert_eq!(
                settle_action(&st, me, Some(&MoveOutcome::Pending)),
                Settle::Nothing
            );
        }
        // The record comes first: a stale entry waits for it.
        let both = status("a", Some(rec()), &["b"]);
        assert_eq!(
            settle_action(&both, "b", Some(&MoveOutcome::Pending)),
            Settle::Nothing
        );
    }

    #[test]
    fn when_nobody_can_tell_both_copies_stay() {
        let st = status("a", Some(rec()), &[]);
        for o in [None, Some(&MoveOutcome::AskMigration)] {
            for me in ["a", "b"] {
                assert!(matches!(
                    settle_action(&st, me, o),
                    Settle::Undecidable(m) if m.contains("both copies are kept")
                ));
            }
        }
        // A record naming the Volume's own host is never acted on.
        let mut odd = rec();
        odd.target_host = "a".into();
        assert!(matches!(
            settle_action(
                &status("a", Some(odd), &[]),
                "a",
                Some(&MoveOutcome::Stayed)
            ),
            Settle::Undecidable(_)
        ));
    }

    #[test]
    fn a_volume_is_made_on_the_host_of_the_vmi_that_uses_it() {
        use crate::storage::claimable_by;
        let user = |node: Option<&str>, phase: &str| -> VirtualMachineInstance {
            serde_json::from_value(json!({
                "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                "metadata": {"name": "v", "namespace": "default", "uid": "u1"},
                "spec": {"domain": {"devices": {}}, "volumes": [
                    {"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]},
                "status": {"phase": phase, "nodeName": node},
            }))
            .unwrap()
        };
        // Unused: any host.
        assert!(claimable_by(&[], "data", "a"));
        assert!(claimable_by(&[user(None, "Pending")], "other", "a"));
        // Used by a VMI not placed yet, or placed elsewhere: not here.
        assert!(!claimable_by(&[user(None, "Pending")], "data", "a"));
        assert!(!claimable_by(&[user(Some("b"), "Scheduled")], "data", "a"));
        assert!(claimable_by(&[user(Some("a"), "Scheduled")], "data", "a"));
        // An ended VMI does not hold it.
        assert!(claimable_by(&[user(Some("b"), "Failed")], "data", "a"));
        // A Volume to hot-plug goes where its VMI runs.
        let mut plugging = user(Some("b"), "Running");
        plugging.metadata.annotations.insert(
            krvirt_api::storage::HOTPLUG_ANNOTATION.into(),
            json!({"extra": "spare"}).to_string(),
        );
        assert!(!claimable_by(std::slice::from_ref(&plugging), "spare", "a"));
        assert!(claimable_by(&[plugging], "spare", "b"));
    }

    #[test]
    fn volume_disks_are_mirrored_in_full() {
        let run = "/var/lib/krvirt/run/vmi/u1";
        let mut config: krvirt_hypervisor::VmConfig = serde_json::from_value(json!({
            "name": "v", "uuid": "6f1c7d2e-8b1a-4c53-9d7e-0a1b2c3d4e5f", "accel": "tcg",
            "memory_bytes": 134217728,
            "run": krvirt_hypervisor::RunPaths::in_dir(run),
        }))
        .unwrap();
        let disk = |id: &str, path: &str, ro: bool| -> krvirt_hypervisor::DiskConfig {
            serde_json::from_value(json!({
                "id": id, "path": path, "format": "qcow2", "bus": "virtio", "read_only": ro,
            }))
            .unwrap()
        };
        config.disks = vec![
            disk("root", &format!("{run}/disk-root.qcow2"), false),
            disk("data", "/srv/pool/default.data.qcow2", false),
            disk("ro", "/srv/pool/default.ro.qcow2", true),
            disk("other", "/srv/shared/default.other.qcow2", false),
        ];
        let plan = Plan {
            config,
            prep: vec![],
        };
        let paths = vec![
            PathBuf::from("/srv/pool/default.data.qcow2"),
            PathBuf::from("/srv/pool/default.ro.qcow2"),
        ];
        assert_eq!(
            volume_mirror_disks(&plan, &paths),
            vec![MirrorDisk {
                node: "drive1-fmt".into(),
                sync: MirrorSync::Full
            }]
        );
        assert!(snapshot_refusal("data", &["vmsnap-1".into()]).contains("\"data\""));
    }
}
