//! The restore controller: the control-plane part of a
//! `VirtualMachineRestore`, which writes VirtualMachines (a host agent
//! may not; see the server's authorization of `system:host:*`).
//!
//! - **Into a new VM** (the target does not exist, or was made by this
//!   restore): the VM's definition comes from the snapshot's
//!   `VirtualMachineSnapshotContent` (`spec.source.virtualMachine`); the
//!   controller creates one Volume per snapshotted disk from the pool
//!   snapshot (`restore-{restore uid}-{disk}`, provisioned by the agent
//!   of the host holding the source Volume), waits for them, then creates
//!   the VM ([`new_vm_definition`]: new MACs, firmware UUID, patches).
//! - **Into the snapshot's own VM**: the agent of the host holding the
//!   Volumes reverts them once the VM is stopped and records it
//!   (`status.volumesRestored`); the controller then marks the VM to resume
//!   from the saved memory (annotations [`RESUME_FROM_ANNOTATION`] and
//!   [`RESUME_HOST_ANNOTATION`]: the host whose data directory holds the
//!   state), or clears a stale mark, and completes the restore.
//!
//! The decision ([`decide`]) is a pure function of the restore, its
//! snapshot and content, the target VM, whether the target runs, and the
//! namespace's Volumes; unit-tested below. The runner executes it and
//! writes the status compare-and-swap, level-triggered (on changes of any
//! of those kinds, and every few seconds).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use krvirt_api::KindInfo;
use krvirt_api::event::{NORMAL, ObjectReference, WARNING};
use krvirt_api::kubevirt::VirtualMachine;
use krvirt_api::meta::now_rfc3339;
use krvirt_api::snapshot::{
    RESTORED_BY_ANNOTATION, RESUME_FROM_ANNOTATION, RESUME_HOST_ANNOTATION, VirtualMachineRestore,
    VirtualMachineRestoreStatus, VirtualMachineSnapshot, VirtualMachineSnapshotContent,
    content_name, indications, new_vm_definition, progress_conditions, restore_failed,
    restored_volume_name, vm_claims,
};
use krvirt_api::storage::{StorageVolume, VolumePhase};
use krvirt_server::events::EventRecorder;
use krvirt_server::{ApiError, Registry, Selector, Subresource};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::runner::ControllerError;

/// Event reasons (KubeVirt's).
pub const REASON_COMPLETE: &str = "VirtualMachineRestoreComplete";
pub const REASON_ERROR: &str = "VirtualMachineRestoreError";

/// Pool snapshot name of a VirtualMachineSnapshot (the agent names them so).
fn pool_snapshot_name(snapshot_uid: &str) -> String {
    format!("vmsnap-{snapshot_uid}")
}

/// What the controller sees of one restore.
pub struct View<'a> {
    pub restore: &'a VirtualMachineRestore,
    pub snapshot: Option<&'a VirtualMachineSnapshot>,
    /// The snapshot's content, if it exists.
    pub content: Option<&'a VirtualMachineSnapshotContent>,
    pub target: Option<&'a VirtualMachine>,
    /// A VMI of the target's name exists.
    pub target_has_vmi: bool,
    /// The namespace's Volumes by name.
    pub volumes: &'a BTreeMap<String, StorageVolume>,
}

/// What to do for one restore.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Volumes to create (restores into a new VM).
    pub create_volumes: Vec<Value>,
    /// The new VM to create.
    pub create_vm: Option<Value>,
    /// A merge patch of the target VM's `metadata.annotations`.
    pub vm_annotations: Option<Value>,
    /// The restore's status after these (written if it changed).
    pub status: VirtualMachineRestoreStatus,
}

impl Plan {
    fn wait(mut status: VirtualMachineRestoreStatus, reason: &str, message: &str) -> Plan {
        progress_conditions(&mut status.conditions, false, reason, message);
        Plan {
            status,
            ..Default::default()
        }
    }
    fn fail(mut status: VirtualMachineRestoreStatus, message: &str) -> Plan {
        status.complete = Some(false);
        progress_conditions(&mut status.conditions, false, "Failed", message);
        Plan {
            status,
            ..Default::default()
        }
    }
    fn complete(mut self, now: &str, message: &str) -> Plan {
        self.status.complete = Some(true);
        self.status.restore_time = Some(now.to_string());
        progress_conditions(&mut self.status.conditions, true, "Succeeded", message);
        self
    }
}

/// The host a Volume lives on.
fn volume_host(v: &StorageVolume) -> Option<&str> {
    v.status.as_ref().and_then(|s| s.host.as_deref())
}

/// Decide the next step of a restore (not complete, not failed) at `now`.
pub fn decide(v: &View, now: &str) -> Plan {
    let r = v.restore;
    let st = r.status.clone().unwrap_or_default();
    let Some(s) = v.snapshot else {
        return Plan::fail(
            st,
            &format!(
                "VirtualMachineSnapshot {:?} not found",
                r.spec.virtual_machine_snapshot_name
            ),
        );
    };
    let sst = s.status.clone().unwrap_or_default();
    if sst.ready_to_use != Some(true) {
        return Plan::wait(
            st,
            "SnapshotNotReady",
            "waiting for the snapshot to be ready",
        );
    }
    let rid = r.metadata.uid.clone().unwrap_or_default();
    let ours = |vm: &VirtualMachine| {
        vm.metadata.annotations.get(RESTORED_BY_ANNOTATION) == Some(&rid) && !rid.is_empty()
    };
    match v.target {
        None => new_vm(v, s, st, now),
        Some(vm) if ours(vm) => {
            // Made by this restore on an earlier pass.
            Plan {
                status: st,
                ..Default::default()
            }
            .complete(now, "the new VirtualMachine was created from the snapshot")
        }
        Some(_) if s.spec.source.name != r.spec.target.name => Plan::fail(
            st,
            "the target is another existing VirtualMachine: restore into the snapshot's VM or name a new one",
        ),
        Some(_) => in_place(v, s, st, now),
    }
}

/// Restore into the snapshot's own VM.
fn in_place(
    v: &View,
    s: &VirtualMachineSnapshot,
    st: VirtualMachineRestoreStatus,
    now: &str,
) -> Plan {
    let r = v.restore;
    if !r.spec.patches.is_empty() {
        return Plan::fail(
            st,
            "spec.patches apply only to a restore into a new VirtualMachine",
        );
    }
    let sst = s.status.clone().unwrap_or_default();
    let first_host = sst
        .volumes
        .first()
        .and_then(|c| v.volumes.get(c))
        .and_then(volume_host)
        .map(str::to_string);
    if st.volumes_restored != Some(true) {
        if v.target_has_vmi {
            return Plan::wait(
                st,
                "VMRunning",
                "the VirtualMachine must be stopped before it is restored",
            );
        }
        let msg = match &first_host {
            Some(h) => format!("reverting the Volumes to the snapshot on host {h}"),
            None => "reverting the Volumes to the snapshot".to_string(),
        };
        return Plan::wait(st, "RestoreInProgress", &msg);
    }
    let memory = sst.indications.iter().any(|i| i == indications::MEMORY);
    let uid = s.metadata.uid.clone().unwrap_or_default();
    if v.target_has_vmi {
        // Started between the revert and now: it booted from the restored
        // disks; a resume later would load a stale memory state.
        let msg = if memory {
            "the VirtualMachine was restored; it was started before its saved memory could be attached, so it booted from the restored disks"
        } else {
            "the VirtualMachine was restored"
        };
        return Plan {
            status: st,
            ..Default::default()
        }
        .complete(now, msg);
    }
    let host = sst.memory_state_host.clone().or(first_host);
    let (mark, mark_host, msg) = if memory {
        (
            Value::String(uid),
            host.map(Value::String).unwrap_or(Value::Null),
            "the VirtualMachine was restored; its next start resumes the saved guest",
        )
    } else {
        (Value::Null, Value::Null, "the VirtualMachine was restored")
    };
    let target = v.target.map(|t| &t.metadata.annotations);
    let current = |k: &str| {
        target
            .and_then(|a| a.get(k))
            .map(|x| Value::String(x.clone()))
            .unwrap_or(Value::Null)
    };
    let vm_annotations = (current(RESUME_FROM_ANNOTATION) != mark
        || current(RESUME_HOST_ANNOTATION) != mark_host)
        .then(|| json!({RESUME_FROM_ANNOTATION: mark, RESUME_HOST_ANNOTATION: mark_host}));
    Plan {
        vm_annotations,
        status: st,
        ..Default::default()
    }
    .complete(now, msg)
}

/// Restore into a VM that does not exist: its Volumes, then the VM.
fn new_vm(
    v: &View,
    s: &VirtualMachineSnapshot,
    mut st: VirtualMachineRestoreStatus,
    now: &str,
) -> Plan {
    let r = v.restore;
    let ns = r.metadata.namespace();
    let rid = r.metadata.uid.clone().unwrap_or_default();
    let sst = s.status.clone().unwrap_or_default();
    let Some(source) = v
        .content
        .and_then(|c| c.spec.source.virtual_machine.as_ref())
    else {
        if let Some(name) = &sst.virtual_machine_snapshot_content_name
            && v.content.is_none()
        {
            return Plan::fail(
                st,
                &format!("the snapshot's VirtualMachineSnapshotContent {name:?} is gone"),
            );
        }
        // An older snapshot: its host's agent publishes the definition.
        return Plan::wait(
            st,
            "RestoreInProgress",
            "waiting for the snapshot's VirtualMachineSnapshotContent (the VM definition)",
        );
    };
    let snap = pool_snapshot_name(s.metadata.uid.as_deref().unwrap_or_default());
    let mut renames = Vec::new();
    let mut create_volumes = Vec::new();
    let mut ready = true;
    for (disk, claim) in vm_claims(source) {
        if !sst.volumes.contains(&claim) {
            continue;
        }
        let new = restored_volume_name(&rid, &disk);
        match v.volumes.get(&new) {
            Some(vol) => match vol.phase() {
                Some(VolumePhase::Succeeded) => {}
                Some(VolumePhase::Failed) => {
                    return Plan::fail(st, &format!("restored Volume {new:?} failed"));
                }
                _ => ready = false,
            },
            None => {
                let Some(src) = v.volumes.get(&claim) else {
                    return Plan::fail(st, &format!("Volume {claim:?} of the snapshot is gone"));
                };
                create_volumes.push(json!({
                    "apiVersion": "krvirt.io/v1",
                    "kind": "Volume",
                    "metadata": {"name": new, "namespace": ns,
                        "annotations": {RESTORED_BY_ANNOTATION: rid}},
                    "spec": {
                        "pool": src.pool(),
                        "source": {"snapshot": {"volume": claim, "name": snap}},
                    },
                }));
                ready = false;
            }
        }
        renames.push((claim, new));
    }
    st.restores = renames.iter().map(|(_, n)| n.clone()).collect();
    if !ready {
        let mut p = Plan::wait(
            st,
            "RestoreInProgress",
            "creating the new VirtualMachine's Volumes from the snapshot",
        );
        p.create_volumes = create_volumes;
        return p;
    }
    let mut source = source.clone();
    // The content's copy may lack the namespace (the restore's is used).
    source["metadata"]["namespace"] = json!(ns);
    match new_vm_definition(
        &source,
        &r.spec.target.name,
        &rid,
        &renames,
        &r.spec.patches,
    ) {
        Ok(vm) => Plan {
            create_vm: Some(vm),
            status: st,
            ..Default::default()
        }
        .complete(now, "the new VirtualMachine was created from the snapshot"),
        Err(e) => Plan::fail(st, &e),
    }
}

fn kind(name: &'static str) -> Result<&'static KindInfo, ControllerError> {
    krvirt_api::find_kind(name).ok_or(ControllerError::UnknownKind(name))
}

/// The running restore controller.
pub struct RestoreController {
    registry: Registry,
    events: EventRecorder,
    restores: &'static KindInfo,
    snapshots: &'static KindInfo,
    contents: &'static KindInfo,
    vms: &'static KindInfo,
    vmis: &'static KindInfo,
    volumes: &'static KindInfo,
}

/// Aborts the watch tasks when the controller stops (leadership lost).
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.iter().for_each(|t| t.abort());
    }
}

impl RestoreController {
    pub fn new(registry: Registry, events: EventRecorder) -> Result<Self, ControllerError> {
        Ok(RestoreController {
            registry,
            events,
            restores: kind("virtualmachinerestores")?,
            snapshots: kind("virtualmachinesnapshots")?,
            contents: kind("virtualmachinesnapshotcontents")?,
            vms: kind("virtualmachines")?,
            vmis: kind("virtualmachineinstances")?,
            volumes: kind("volumes")?,
        })
    }

    /// Reconcile every open restore on each change (and every 2 s).
    pub async fn run(self) {
        let notify = Arc::new(Notify::new());
        let mut watches = Vec::new();
        for k in [
            self.restores,
            self.snapshots,
            self.contents,
            self.vms,
            self.vmis,
            self.volumes,
        ] {
            let (r, n) = (self.registry.clone(), notify.clone());
            watches.push(tokio::spawn(async move { watch(r, k, n).await }));
        }
        let _guard = AbortOnDrop(watches);
        loop {
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
            if let Err(e) = self.pass().await {
                debug!(error = %e, "restore pass failed; retrying");
            }
        }
    }

    async fn get_opt<T: serde::de::DeserializeOwned>(
        &self,
        kind: &KindInfo,
        ns: &str,
        name: &str,
    ) -> Result<Option<T>, ControllerError> {
        match self.registry.get(kind, ns, name).await {
            Ok(v) => crate::runner::decode(kind.kind, v).map(Some),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn pass(&self) -> Result<(), ControllerError> {
        let (items, _) = self
            .registry
            .list(self.restores, None, &Selector::everything())
            .await?;
        for raw in items {
            let Ok(r) = serde_json::from_value::<VirtualMachineRestore>(raw.clone()) else {
                continue;
            };
            let st = r.status.clone().unwrap_or_default();
            if st.complete == Some(true) || restore_failed(&st) {
                continue;
            }
            if let Err(e) = self.reconcile(&raw, &r).await {
                debug!(restore = %r.metadata.name(), error = %e, "restore not advanced");
            }
        }
        Ok(())
    }

    async fn reconcile(
        &self,
        raw: &Value,
        r: &VirtualMachineRestore,
    ) -> Result<(), ControllerError> {
        let ns = r.metadata.namespace();
        let snapshot: Option<VirtualMachineSnapshot> = self
            .get_opt(self.snapshots, ns, &r.spec.virtual_machine_snapshot_name)
            .await?;
        let content: Option<VirtualMachineSnapshotContent> = match &snapshot {
            Some(s) => {
                let name = s
                    .status
                    .as_ref()
                    .and_then(|st| st.virtual_machine_snapshot_content_name.clone())
                    .unwrap_or_else(|| content_name(s.metadata.uid.as_deref().unwrap_or_default()));
                self.get_opt(self.contents, ns, &name).await?
            }
            None => None,
        };
        let target: Option<VirtualMachine> =
            self.get_opt(self.vms, ns, &r.spec.target.name).await?;
        let vmi: Option<Value> = self.get_opt(self.vmis, ns, &r.spec.target.name).await?;
        let (vols, _) = self
            .registry
            .list(self.volumes, Some(ns), &Selector::everything())
            .await?;
        let volumes: BTreeMap<String, StorageVolume> = vols
            .into_iter()
            .filter_map(|v| serde_json::from_value::<StorageVolume>(v).ok())
            .map(|v| (v.metadata.name().to_string(), v))
            .collect();
        let plan = decide(
            &View {
                restore: r,
                snapshot: snapshot.as_ref(),
                content: content.as_ref(),
                target: target.as_ref(),
                target_has_vmi: vmi.is_some(),
                volumes: &volumes,
            },
            &now_rfc3339(),
        );
        for vol in &plan.create_volumes {
            match self.registry.create(self.volumes, ns, vol.clone()).await {
                Ok(_) => {
                    info!(restore = %r.metadata.name(), volume = %vol["metadata"]["name"], "created a Volume from the snapshot")
                }
                Err(ApiError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(vm) = &plan.create_vm {
            match self.registry.create(self.vms, ns, vm.clone()).await {
                Ok(_) => {
                    info!(restore = %r.metadata.name(), vm = %r.spec.target.name, "VM restored into a new VM")
                }
                Err(ApiError::AlreadyExists { .. }) => {}
                Err(e @ (ApiError::Invalid { .. } | ApiError::BadRequest(_))) => {
                    // The definition does not admit (e.g. a patch made it
                    // invalid): the restore fails, saying why.
                    let mut st = plan.status.clone();
                    st.complete = Some(false);
                    let msg = format!("creating VirtualMachine {:?}: {e}", r.spec.target.name);
                    progress_conditions(&mut st.conditions, false, "Failed", &msg);
                    return self.write_status(raw, r, st).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(ann) = &plan.vm_annotations {
            self.registry
                .merge_patch(
                    self.vms,
                    ns,
                    &r.spec.target.name,
                    &json!({"metadata": {"annotations": ann}}),
                    Subresource::Main,
                )
                .await?;
            info!(restore = %r.metadata.name(), vm = %r.spec.target.name, mark = %ann, "VM resume mark set");
        }
        self.write_status(raw, r, plan.status).await
    }

    /// Write the status compare-and-swap on the version decided from (the
    /// agent's `volumesRestored` must not be lost); an event when it ends.
    async fn write_status(
        &self,
        raw: &Value,
        r: &VirtualMachineRestore,
        st: VirtualMachineRestoreStatus,
    ) -> Result<(), ControllerError> {
        let old = r.status.clone().unwrap_or_default();
        if old == st {
            return Ok(());
        }
        let ns = r.metadata.namespace();
        let obj = json!({
            "apiVersion": krvirt_api::snapshot::API_VERSION,
            "kind": "VirtualMachineRestore",
            "metadata": {"name": r.metadata.name(), "namespace": ns,
                "resourceVersion": raw.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null)},
            "status": st,
        });
        match self
            .registry
            .replace_status(self.restores, ns, r.metadata.name(), obj)
            .await
        {
            Ok(_) => {}
            Err(e) if e.is_conflict() || e.is_not_found() => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let message = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .and_then(|c| c.message.clone())
            .unwrap_or_default();
        if st.complete == Some(true) {
            self.events.record_ref(
                ObjectReference::to_object(raw),
                NORMAL,
                REASON_COMPLETE,
                &message,
            );
        } else if restore_failed(&st) && !restore_failed(&old) {
            warn!(restore = %r.metadata.name(), %message, "restore failed");
            self.events.record_ref(
                ObjectReference::to_object(raw),
                WARNING,
                REASON_ERROR,
                &message,
            );
        }
        Ok(())
    }
}

/// Wake the controller's pass on every change of `kind`.
async fn watch(registry: Registry, kind: &'static KindInfo, notify: Arc<Notify>) {
    crate::runner::watch_loop(&registry, kind, |_| notify.notify_one()).await
}

#[cfg(test)]
mod tests;
