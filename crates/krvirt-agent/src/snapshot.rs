//! VirtualMachineSnapshot and VirtualMachineRestore on this host.
//!
//! A snapshot covers the VM's krvirt Volumes (`persistentVolumeClaim`,
//! `dataVolume`); each gets a pool snapshot named `vmsnap-{snapshot uid}`.
//! A stopped VM is snapshotted by the pools; a running one online and
//! consistently across its disks: the disks of `dir` pools in one QMP
//! `transaction` of `blockdev-snapshot-internal-sync`, and if any disk is
//! in a pool that snapshots outside QEMU (btrfs), with the guest paused
//! (QMP `stop`, which drains in-flight I/O) around all of them. The VM's
//! definition goes into the snapshot's VirtualMachineSnapshotContent (in
//! the API, where the control plane reads it).
//!
//! Memory snapshots (`spec.includeMemory`, krvirt's extension): with the
//! guest paused, after the disk snapshots, QEMU's `snapshot-save` job
//! writes the RAM and device state into a qcow2 file of the snapshot's
//! directory (`{data_dir}/snapshots/{uid}/memory.qcow2`, attached for the
//! job only), then the guest continues; the snapshot records this host
//! (`status.memoryStateHost`).
//!
//! Restores are split with the restore controller (krvirt-controller
//! `restore`), which writes the VirtualMachines a host may not: here, once
//! the VM is stopped, the host holding the Volumes reverts them and records
//! `status.volumesRestored`; the controller then marks the VM to resume
//! ([`RESUME_FROM_ANNOTATION`]) and completes the restore, or, for a new
//! VM, creates its Volumes (provisioned by this host's Volume code) and the
//! VM from the content. A VMI started from a marked VM carries the mark
//! (and is placed on this host): its launch starts QEMU paused,
//! `snapshot-load`s the state on top of the reverted disks and continues.
//! Snapshots from before contents existed keep the definition in
//! `{data_dir}/snapshots/{uid}/vm.json`; this host publishes it as the
//! content when a restore into a new VM needs it.
//! VirtualMachineClones are driven here too: a temporary snapshot of the
//! source VM, a restore into the target, clean-up.
//!
//! Deleting a snapshot (finalizer [`SNAPSHOT_FINALIZER`]) deletes its pool
//! snapshots (QMP `blockdev-snapshot-delete-internal-sync` while a guest
//! runs on a dir-pool disk) and its directory; sibling snapshots and the
//! current disks stay.

use std::path::{Path, PathBuf};
use std::time::Duration;

use krvirt_api::KindInfo;
use krvirt_api::clone::{self as vmclone, ClonePhase, Progress, Step, VirtualMachineClone};
use krvirt_api::event::WARNING;
use krvirt_api::kubevirt::{VirtualMachine, VirtualMachineInstance};
use krvirt_api::meta::{Condition, now_rfc3339};
use krvirt_api::snapshot::{
    RESTORED_BY_ANNOTATION, RESUME_FROM_ANNOTATION, RESUME_HOST_ANNOTATION, SNAPSHOT_FINALIZER,
    SnapshotError, VirtualMachineRestore, VirtualMachineSnapshot, VirtualMachineSnapshotContent,
    VirtualMachineSnapshotStatus, content_name, indications,
};
use krvirt_api::storage::VolumePhase;
use krvirt_client::{ListParams, PatchTarget};
use krvirt_hypervisor::QmpClient;
use krvirt_storage::OnlineSnapshot;
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::agent::Agent;
use crate::storage::backend_name;

fn kind(name: &'static str) -> Option<&'static KindInfo> {
    krvirt_api::find_kind(name)
}

/// Pool snapshot name of a VirtualMachineSnapshot.
pub fn pool_snapshot_name(snapshot_uid: &str) -> String {
    format!("vmsnap-{snapshot_uid}")
}

/// Reconcile snapshots and restores every `interval`, forever.
pub async fn run(agent: Agent, interval: Duration) {
    loop {
        if let Err(e) = sync_all(&agent).await {
            debug!(error = %e, "snapshot sync failed; retrying");
        }
        tokio::time::sleep(interval).await;
    }
}

async fn sync_all(agent: &Agent) -> Result<(), String> {
    let (Some(sk), Some(rk)) = (
        kind("virtualmachinesnapshots"),
        kind("virtualmachinerestores"),
    ) else {
        return Ok(());
    };
    let snaps = agent
        .client()
        .list(sk, &ListParams::all_namespaces())
        .await
        .map_err(|e| e.to_string())?;
    for raw in snaps.items {
        let Ok(s) = serde_json::from_value::<VirtualMachineSnapshot>(raw) else {
            continue;
        };
        if s.metadata.deletion_timestamp.is_some() {
            if let Err(msg) = delete_snapshot(agent, &s).await {
                warn!(snapshot = %s.metadata.name(), %msg, "snapshot not deleted yet");
            }
            continue;
        }
        let phase = s.status.as_ref().and_then(|st| st.phase.clone());
        if matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue;
        }
        let mut st = s.status.clone().unwrap_or_default();
        match snapshot(agent, &s, &mut st).await {
            Ok(true) => {}
            Ok(false) => continue, // not ours, or waiting
            Err(msg) => {
                warn!(snapshot = %s.metadata.name(), %msg, "snapshot failed");
                st.phase = Some("Failed".into());
                st.ready_to_use = Some(false);
                st.error = Some(SnapshotError {
                    message: Some(msg.clone()),
                    time: Some(now_rfc3339()),
                });
                conditions(&mut st.conditions, false, "Failed", &msg);
            }
        }
        write(agent, sk, s.metadata.namespace(), s.metadata.name(), &st).await;
    }
    let restores = agent
        .client()
        .list(rk, &ListParams::all_namespaces())
        .await
        .map_err(|e| e.to_string())?;
    for raw in restores.items {
        let Ok(r) = serde_json::from_value::<VirtualMachineRestore>(raw) else {
            continue;
        };
        let st0 = r.status.clone().unwrap_or_default();
        if st0.complete == Some(true) || krvirt_api::snapshot::restore_failed(&st0) {
            continue;
        }
        // Only the fields this host's part owns are written.
        let done = match restore(agent, &r).await {
            Ok(done) => done,
            Err(msg) => {
                warn!(restore = %r.metadata.name(), %msg, "restore failed");
                let mut st = st0.clone();
                st.complete = Some(false);
                conditions(&mut st.conditions, false, "Failed", &msg);
                Some(json!({"complete": false, "conditions": st.conditions}))
            }
        };
        if let Some(patch) = done {
            write(agent, rk, r.metadata.namespace(), r.metadata.name(), &patch).await;
        }
    }
    if let Some(ck) = kind("virtualmachineclones") {
        let clones = agent
            .client()
            .list(ck, &ListParams::all_namespaces())
            .await
            .map_err(|e| e.to_string())?;
        for raw in clones.items {
            let Ok(c) = serde_json::from_value::<VirtualMachineClone>(raw) else {
                continue;
            };
            if let Err(msg) = clone(agent, ck, &c).await {
                debug!(clone = %c.metadata.name(), %msg, "clone not advanced");
            }
        }
    }
    Ok(())
}

/// `{data_dir}/snapshots/{uid}`: the snapshot's VM definition and memory.
pub fn snapshot_dir(data_dir: &Path, snapshot_uid: &str) -> PathBuf {
    data_dir.join("snapshots").join(snapshot_uid)
}

const VM_FILE: &str = "vm.json";
const MEMORY_FILE: &str = "memory.qcow2";
const MEMSTATE_NODE: &str = "krvirt-memstate";

/// Run a QMP job to its end; its error, if any.
async fn run_job(qmp: &QmpClient, command: &str, args: Value) -> Result<(), String> {
    let id = args["job-id"].as_str().unwrap_or_default().to_string();
    qmp.execute(command, Some(args))
        .await
        .map_err(|e| format!("{command}: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let jobs = qmp
            .execute("query-jobs", None)
            .await
            .map_err(|e| format!("query-jobs: {e}"))?;
        let job = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == id.as_str()).cloned());
        match job {
            Some(j) if j["status"] == "concluded" => {
                let _ = qmp.execute("job-dismiss", Some(json!({ "id": id }))).await;
                return match j["error"].as_str() {
                    Some(e) => Err(format!("{command}: {e}")),
                    None => Ok(()),
                };
            }
            Some(_) => {}
            None => return Err(format!("{command}: job {id} vanished")),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{command}: job {id} did not finish in 300 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Attach `file` (qcow2) as the memory-state node, run `command`
/// (`snapshot-save` / `snapshot-load`) with tag `tag`, detach. QEMU gets
/// the file as a descriptor (`add-fd`): it may run as a user that cannot
/// open the snapshot directory, which only root reads (guest RAM).
async fn memory_job(qmp: &QmpClient, command: &str, file: &Path, tag: &str) -> Result<(), String> {
    use std::os::fd::AsFd;
    // A node left behind by an interrupted attempt.
    let _ = qmp
        .execute("blockdev-del", Some(json!({"node-name": MEMSTATE_NODE})))
        .await;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let added = qmp
        .execute_with_fd("add-fd", None, f.as_fd())
        .await
        .map_err(|e| format!("passing the memory state file to QEMU: {e}"))?;
    drop(f);
    let fdset = added["fdset-id"]
        .as_u64()
        .ok_or_else(|| format!("add-fd answered {added}"))?;
    let res = async {
        qmp.execute(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2",
                "node-name": MEMSTATE_NODE,
                "file": {"driver": "file", "filename": format!("/dev/fdset/{fdset}")},
            })),
        )
        .await
        .map_err(|e| format!("attaching the memory state file: {e}"))?;
        let res = run_job(
            qmp,
            command,
            json!({
                "job-id": format!("krvirt-{command}"),
                "tag": tag,
                "vmstate": MEMSTATE_NODE,
                "devices": [MEMSTATE_NODE],
            }),
        )
        .await;
        let del = qmp
            .execute("blockdev-del", Some(json!({"node-name": MEMSTATE_NODE})))
            .await;
        res?;
        del.map_err(|e| format!("detaching the memory state file: {e}"))?;
        Ok::<(), String>(())
    }
    .await;
    let _ = qmp
        .execute("remove-fd", Some(json!({"fdset-id": fdset})))
        .await;
    res
}

/// Save the (paused) guest's RAM and device state into `file`; its size.
async fn save_memory(qmp: &QmpClient, file: &Path, tag: &str) -> Result<u64, String> {
    let f = file.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&f)
            .arg("1M")
            .output()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("qemu-img cannot be run: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img create {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    memory_job(qmp, "snapshot-save", file, tag).await?;
    std::fs::metadata(file)
        .map(|m| m.len())
        .map_err(|e| format!("{}: {e}", file.display()))
}

/// The memory state a VMI's launch must resume from: the VMI carries
/// [`RESUME_FROM_ANNOTATION`] (copied from its VM when the VM controller
/// created it) and the state file is in this host's data directory. A
/// mark whose file is not here (placement binds such a VMI to the host
/// named in [`RESUME_HOST_ANNOTATION`]; this happens only if that file was
/// removed) boots the guest fresh, with a warning event saying why.
pub(crate) async fn resume_point(
    agent: &Agent,
    vmi: &VirtualMachineInstance,
) -> Option<(PathBuf, String)> {
    let uid = vmi.metadata.annotations.get(RESUME_FROM_ANNOTATION)?;
    let file = snapshot_dir(agent.data_dir(), uid).join(MEMORY_FILE);
    if file.exists() {
        return Some((file, pool_snapshot_name(uid)));
    }
    let message = format!(
        "the saved memory state of snapshot {uid} is not on host {} (it was taken on {}): the guest boots from its restored disks",
        agent.node_name(),
        vmi.metadata
            .annotations
            .get(RESUME_HOST_ANNOTATION)
            .map(String::as_str)
            .unwrap_or("an unknown host"),
    );
    warn!(vmi = %vmi.metadata.name(), %message, "not resuming");
    agent.record_event(vmi, WARNING, REASON_RESUME_SKIPPED, &message);
    None
}

/// Event reason: a VMI marked to resume from a memory snapshot boots fresh.
pub const REASON_RESUME_SKIPPED: &str = "MemoryStateUnavailable";

/// Load a saved memory state into a QEMU started paused and let the guest
/// run unless it was asked to start paused. (The VM's resume mark was
/// already cleared by the VM controller when it created this VMI: a state
/// that cannot be loaded, because the VM's devices changed since, does not
/// keep every later start failing.)
pub(crate) async fn resume(
    qmp: &QmpClient,
    vmi: &VirtualMachineInstance,
    (file, tag): &(PathBuf, String),
    stay_paused: bool,
) -> Result<(), String> {
    memory_job(qmp, "snapshot-load", file, tag)
        .await
        .map_err(|e| format!("resuming from the memory snapshot: {e}"))?;
    if !stay_paused {
        qmp.execute("cont", None)
            .await
            .map_err(|e| format!("cont: {e}"))?;
    }
    info!(vmi = %vmi.metadata.name(), state = %file.display(), "guest resumed from a memory snapshot");
    Ok(())
}

async fn set_finalizers(
    agent: &Agent,
    kind: &KindInfo,
    meta: &krvirt_api::meta::ObjectMeta,
    finalizers: Vec<String>,
) -> Result<(), String> {
    agent
        .client()
        .merge_patch(
            kind,
            meta.namespace(),
            meta.name(),
            &json!({"metadata": {"finalizers": finalizers}}),
            PatchTarget::Main,
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A snapshot being deleted: drop its pool snapshots (unless
/// `deletionPolicy: Retain`) and its directory, then its finalizer.
async fn delete_snapshot(agent: &Agent, s: &VirtualMachineSnapshot) -> Result<(), String> {
    if !s
        .metadata
        .finalizers
        .iter()
        .any(|f| f == SNAPSHOT_FINALIZER)
    {
        return Ok(());
    }
    let ns = s.metadata.namespace();
    let uid = s.metadata.uid.as_deref().unwrap_or_default();
    let snap = pool_snapshot_name(uid);
    let st = s.status.clone().unwrap_or_default();
    let retain = s.spec.deletion_policy.as_deref() == Some("Retain");
    // The running instance of the source VM, if it runs here.
    let vmi: Option<VirtualMachineInstance> =
        get(agent, "virtualmachineinstances", ns, &s.spec.source.name).await?;
    let running = vmi.as_ref().and_then(|v| {
        let h = agent.qemu_of(v.metadata.uid.as_deref()?)?;
        Some((v.clone(), h))
    });
    for claim in st.volumes.iter().filter(|_| !retain) {
        let Some(v) = agent
            .volumes()
            .get_volume(ns, claim)
            .await
            .map_err(|e| e.to_string())?
        else {
            continue; // the Volume went, and its snapshots with it
        };
        if v.status.as_ref().and_then(|x| x.host.as_deref()) != Some(agent.node_name()) {
            return Ok(()); // another host's
        }
        let b = agent
            .volumes()
            .backend(v.pool())
            .await
            .map_err(|e| e.to_string())?;
        let name = backend_name(ns, claim);
        let (b2, n2) = (b.clone(), name.clone());
        let existing = tokio::task::spawn_blocking(move || b2.snapshots(&n2))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if !existing.contains(&snap) {
            continue;
        }
        // A dir-pool disk QEMU has open: QEMU deletes the internal snapshot.
        let node = running.as_ref().and_then(|(vmi, h)| {
            if b.online_snapshot() != OnlineSnapshot::QemuInternal {
                return None;
            }
            let vm_disk = vmi
                .spec
                .volumes
                .iter()
                .find(|v| v.claim() == Some(claim.as_str()))?;
            let i = vmi
                .spec
                .domain
                .devices
                .disks
                .iter()
                .position(|d| d.name == vm_disk.name)?;
            Some((h.clone(), krvirt_hypervisor::argv::disk_format_node(i)))
        });
        match node {
            Some((h, node)) => {
                h.qmp()
                    .execute(
                        "blockdev-snapshot-delete-internal-sync",
                        Some(json!({"device": node, "name": snap})),
                    )
                    .await
                    .map_err(|e| format!("deleting {snap} of {claim}: {e}"))?;
            }
            None => {
                let snap = snap.clone();
                tokio::task::spawn_blocking(move || b.delete_snapshot(&name, &snap))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
            }
        }
        info!(snapshot = %s.metadata.name(), volume = %claim, "pool snapshot deleted");
    }
    if !retain {
        let dir = snapshot_dir(agent.data_dir(), uid);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
    }
    // Its content goes with it (KubeVirt's `Retain` keeps it).
    if let Some(ck) = kind("virtualmachinesnapshotcontents").filter(|_| !retain) {
        let name = st
            .virtual_machine_snapshot_content_name
            .clone()
            .unwrap_or_else(|| content_name(uid));
        match agent.client().delete(ck, ns, &name).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(404) => {}
            Err(e) => return Err(format!("deleting {name:?}: {e}")),
        }
    }
    let sk = kind("virtualmachinesnapshots").ok_or("snapshots not served")?;
    let rest = s
        .metadata
        .finalizers
        .iter()
        .filter(|f| f.as_str() != SNAPSHOT_FINALIZER)
        .cloned()
        .collect();
    set_finalizers(agent, sk, &s.metadata, rest).await
}

/// KubeVirt's pair of conditions: `Progressing` and `Ready`.
fn conditions(c: &mut Vec<Condition>, ready: bool, reason: &str, message: &str) {
    krvirt_api::snapshot::progress_conditions(c, ready, reason, message)
}

async fn write(
    agent: &Agent,
    kind: &KindInfo,
    ns: &str,
    name: &str,
    status: &impl serde::Serialize,
) {
    if let Err(e) = agent
        .client()
        .merge_patch(
            kind,
            ns,
            name,
            &json!({ "status": status }),
            PatchTarget::Status,
        )
        .await
    {
        debug!(%name, error = %e, "status not written");
    }
}

async fn get<T: serde::de::DeserializeOwned>(
    agent: &Agent,
    kind: &str,
    ns: &str,
    name: &str,
) -> Result<Option<T>, String> {
    let k = krvirt_api::find_kind(kind).ok_or_else(|| format!("kind {kind} not served"))?;
    match agent.client().get(k, ns, name).await {
        Ok(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| e.to_string()),
        Err(e) if e.code() == Some(404) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The VM's Volumes, as (disk name, Volume name).
fn claims(vm: &VirtualMachine) -> Vec<(String, String)> {
    vm.spec
        .template
        .spec
        .volumes
        .iter()
        .filter_map(|v| v.claim().map(|c| (v.name.clone(), c.to_string())))
        .collect()
}

/// Take the snapshot. `Ok(false)`: nothing to do on this host (yet).
async fn snapshot(
    agent: &Agent,
    s: &VirtualMachineSnapshot,
    st: &mut VirtualMachineSnapshotStatus,
) -> Result<bool, String> {
    let ns = s.metadata.namespace();
    let vm: VirtualMachine = get(agent, "virtualmachines", ns, &s.spec.source.name)
        .await?
        .ok_or_else(|| format!("VirtualMachine {:?} not found", s.spec.source.name))?;
    let claims = claims(&vm);
    if claims.is_empty() {
        return Err(
            "the VirtualMachine has no Volumes (persistentVolumeClaim / dataVolume) to snapshot"
                .into(),
        );
    }
    let snap = pool_snapshot_name(s.metadata.uid.as_deref().unwrap_or_default());
    let mut backends = Vec::new();
    for (disk, claim) in &claims {
        let v = agent
            .volumes()
            .get_volume(ns, claim)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("Volume {claim:?} not found"))?;
        if v.phase() != Some(VolumePhase::Succeeded) {
            return Err(format!("Volume {claim:?} is not ready"));
        }
        if v.status.as_ref().and_then(|x| x.host.as_deref()) != Some(agent.node_name()) {
            return Ok(false);
        }
        let b = agent
            .volumes()
            .backend(v.pool())
            .await
            .map_err(|e| e.to_string())?;
        backends.push((disk.clone(), backend_name(ns, claim), b));
    }

    // The finalizer first: from now on, deleting the snapshot cleans up.
    if !s
        .metadata
        .finalizers
        .iter()
        .any(|f| f == SNAPSHOT_FINALIZER)
    {
        let sk = kind("virtualmachinesnapshots").ok_or("snapshots not served")?;
        let mut f = s.metadata.finalizers.clone();
        f.push(SNAPSHOT_FINALIZER.to_string());
        set_finalizers(agent, sk, &s.metadata, f).await?;
    }
    // The VM's definition, for restores into a new VM and clones: in the
    // API (VirtualMachineSnapshotContent), where the control plane reads it.
    let content = publish_content(agent, s, &vm, &snap).await?;
    let include_memory = s.spec.include_memory == Some(true);
    let dir = snapshot_dir(
        agent.data_dir(),
        s.metadata.uid.as_deref().unwrap_or_default(),
    );
    if include_memory {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Saved guest RAM is as private as the guest: root only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
    }

    // Online if the VM's instance runs here.
    let vmi: Option<VirtualMachineInstance> =
        get(agent, "virtualmachineinstances", ns, vm.metadata.name()).await?;
    let running = vmi.as_ref().and_then(|v| {
        let uid = v.metadata.uid.as_deref()?;
        agent.qemu_of(uid).map(|h| (v.clone(), h))
    });
    st.phase = Some("InProgress".into());
    st.source_uid = vm.metadata.uid.clone();
    if let Some((vmi, qemu)) = running {
        let qmp = qemu.qmp();
        let needs_pause = include_memory
            || backends
                .iter()
                .any(|(_, _, b)| b.online_snapshot() == OnlineSnapshot::WhilePaused);
        let was_running = qmp
            .execute("query-status", None)
            .await
            .map_err(|e| e.to_string())?["status"]
            == "running";
        if needs_pause && was_running {
            qmp.execute("stop", None).await.map_err(|e| e.to_string())?;
        }
        let result = async {
            let mut actions = Vec::new();
            for (disk, _, b) in &backends {
                if b.online_snapshot() != OnlineSnapshot::QemuInternal {
                    continue;
                }
                let i = vmi
                    .spec
                    .domain
                    .devices
                    .disks
                    .iter()
                    .position(|d| &d.name == disk)
                    .ok_or_else(|| format!("disk {disk:?} is not in the running instance"))?;
                actions.push(json!({
                    "type": "blockdev-snapshot-internal-sync",
                    "data": {"device": krvirt_hypervisor::argv::disk_format_node(i), "name": snap},
                }));
            }
            if !actions.is_empty() {
                qmp.execute("transaction", Some(json!({ "actions": actions })))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            for (_, name, b) in &backends {
                if b.online_snapshot() == OnlineSnapshot::WhilePaused {
                    let (b, name, snap) = (b.clone(), name.clone(), snap.clone());
                    tokio::task::spawn_blocking(move || b.snapshot(&name, &snap))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                }
            }
            // The memory last: the disks above are at this very instant.
            if include_memory {
                return save_memory(qmp, &dir.join(MEMORY_FILE), &snap)
                    .await
                    .map(Some);
            }
            Ok::<Option<u64>, String>(None)
        }
        .await;
        if needs_pause && was_running {
            qmp.execute("cont", None).await.map_err(|e| e.to_string())?;
        }
        let memory = result?;
        st.indications = vec![
            indications::ONLINE.into(),
            indications::NO_GUEST_AGENT.into(),
        ];
        if memory.is_some() {
            st.indications.push(indications::MEMORY.into());
        }
        st.memory_state_bytes = memory;
        st.memory_state_host = memory.map(|_| agent.node_name().to_string());
    } else {
        for (_, name, b) in &backends {
            let (b, name, snap) = (b.clone(), name.clone(), snap.clone());
            tokio::task::spawn_blocking(move || b.snapshot(&name, &snap))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        st.indications = Vec::new();
    }
    info!(snapshot = %s.metadata.name(), volumes = backends.len(), online = !st.indications.is_empty(), "VM snapshot taken");
    st.phase = Some("Succeeded".into());
    st.ready_to_use = Some(true);
    st.creation_time = Some(now_rfc3339());
    st.volumes = claims.into_iter().map(|(_, c)| c).collect();
    st.error = None;
    st.virtual_machine_snapshot_content_name = Some(content.clone());
    if let Some(ck) = kind("virtualmachinesnapshotcontents") {
        write(
            agent,
            ck,
            ns,
            &content,
            &json!({"readyToUse": true, "creationTime": st.creation_time}),
        )
        .await;
    }
    conditions(
        &mut st.conditions,
        true,
        "Succeeded",
        "the snapshot is ready to use",
    );
    Ok(true)
}

/// Create the snapshot's VirtualMachineSnapshotContent (owned by the
/// snapshot) holding `vm`'s definition; its name. An existing one is kept.
async fn publish_content(
    agent: &Agent,
    s: &VirtualMachineSnapshot,
    vm: &VirtualMachine,
    snap: &str,
) -> Result<String, String> {
    let ck = kind("virtualmachinesnapshotcontents").ok_or("snapshot contents not served")?;
    let ns = s.metadata.namespace();
    let name = content_name(s.metadata.uid.as_deref().unwrap_or_default());
    let mut source = serde_json::to_value(vm).map_err(|e| e.to_string())?;
    if let Some(o) = source.as_object_mut() {
        o.remove("status");
    }
    let backups: Vec<Value> = claims(vm)
        .into_iter()
        .map(|(disk, claim)| {
            json!({"volumeName": disk,
                "persistentVolumeClaim": {"metadata": {"name": claim, "namespace": ns}},
                "volumeSnapshotName": snap})
        })
        .collect();
    let obj = json!({
        "apiVersion": krvirt_api::snapshot::API_VERSION,
        "kind": "VirtualMachineSnapshotContent",
        "metadata": {"name": name, "namespace": ns,
            "ownerReferences": [{"apiVersion": krvirt_api::snapshot::API_VERSION,
                "kind": "VirtualMachineSnapshot", "name": s.metadata.name(),
                "uid": s.metadata.uid, "controller": true}]},
        "spec": {
            "source": {"virtualMachine": source},
            "virtualMachineSnapshotName": s.metadata.name(),
            "volumeBackups": backups,
        },
    });
    match agent.client().create(ck, ns, &obj).await {
        Ok(_) => Ok(name),
        Err(e) if e.code() == Some(409) => Ok(name),
        Err(e) => Err(format!(
            "creating VirtualMachineSnapshotContent {name:?}: {e}"
        )),
    }
}

/// A snapshot taken before krvirt kept VM definitions in the API: its
/// definition is in this host's `snapshots/{uid}/vm.json`. Publish it as
/// the snapshot's VirtualMachineSnapshotContent, so the restore controller
/// can make a new VM from it. Nothing to do if the content exists or the
/// file is not here (another host's snapshot).
async fn publish_legacy_content(agent: &Agent, s: &VirtualMachineSnapshot) -> Result<(), String> {
    let uid = s.metadata.uid.as_deref().unwrap_or_default();
    let ns = s.metadata.namespace();
    let name = s
        .status
        .as_ref()
        .and_then(|st| st.virtual_machine_snapshot_content_name.clone())
        .unwrap_or_else(|| content_name(uid));
    if get::<Value>(agent, "virtualmachinesnapshotcontents", ns, &name)
        .await?
        .is_some()
    {
        return Ok(());
    }
    let file = snapshot_dir(agent.data_dir(), uid).join(VM_FILE);
    let text = match std::fs::read(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", file.display())),
    };
    let vm: VirtualMachine =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    publish_content(agent, s, &vm, &pool_snapshot_name(uid)).await?;
    info!(snapshot = %s.metadata.name(), "published the VM definition of an older snapshot");
    Ok(())
}

/// The VM definition a snapshot holds: its VirtualMachineSnapshotContent's
/// `spec.source.virtualMachine`, else (older snapshots) this host's
/// `vm.json`. `None`: not (yet) known here.
async fn snapshot_vm_definition(
    agent: &Agent,
    s: &VirtualMachineSnapshot,
) -> Result<Option<Value>, String> {
    let uid = s.metadata.uid.as_deref().unwrap_or_default();
    let name = s
        .status
        .as_ref()
        .and_then(|st| st.virtual_machine_snapshot_content_name.clone())
        .unwrap_or_else(|| content_name(uid));
    let content: Option<VirtualMachineSnapshotContent> = get(
        agent,
        "virtualmachinesnapshotcontents",
        s.metadata.namespace(),
        &name,
    )
    .await?;
    if let Some(vm) = content.and_then(|c| c.spec.source.virtual_machine) {
        return Ok(Some(vm));
    }
    match std::fs::read(snapshot_dir(agent.data_dir(), uid).join(VM_FILE)) {
        Ok(text) => serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| e.to_string()),
        Err(_) => Ok(None),
    }
}

/// This host's part of a restore into the snapshot's own VM: once the VM
/// is stopped, revert the snapshot's Volumes held here and record it
/// (`status.restores`, `status.volumesRestored`). Everything else (waiting
/// reasons, a restore into a new VM, the VM's resume mark, `complete`) is
/// the restore controller's. `Ok(None)`: nothing done here.
async fn restore(agent: &Agent, r: &VirtualMachineRestore) -> Result<Option<Value>, String> {
    let ns = r.metadata.namespace();
    let st = r.status.clone().unwrap_or_default();
    let Some(s): Option<VirtualMachineSnapshot> = get(
        agent,
        "virtualmachinesnapshots",
        ns,
        &r.spec.virtual_machine_snapshot_name,
    )
    .await?
    else {
        return Ok(None);
    };
    let sst = s.status.clone().unwrap_or_default();
    if sst.ready_to_use != Some(true) {
        return Ok(None);
    }
    let target: Option<VirtualMachine> =
        get(agent, "virtualmachines", ns, &r.spec.target.name).await?;
    let in_place = target.as_ref().is_some_and(|vm| {
        vm.metadata.annotations.get(RESTORED_BY_ANNOTATION) != r.metadata.uid.as_ref()
            && s.spec.source.name == r.spec.target.name
    });
    if !in_place {
        // A new VM (the controller makes it), or a refused target.
        if target.is_none() {
            publish_legacy_content(agent, &s).await?;
        }
        return Ok(None);
    }
    if !r.spec.patches.is_empty() || st.volumes_restored == Some(true) {
        return Ok(None);
    }
    let vmi: Option<Value> = get(agent, "virtualmachineinstances", ns, &r.spec.target.name).await?;
    if vmi.is_some() {
        return Ok(None); // the controller says the VM must be stopped
    }
    let snap = pool_snapshot_name(s.metadata.uid.as_deref().unwrap_or_default());
    let mut reverts = Vec::new();
    for claim in &sst.volumes {
        let v = agent
            .volumes()
            .get_volume(ns, claim)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("Volume {claim:?} not found"))?;
        if v.status.as_ref().and_then(|x| x.host.as_deref()) != Some(agent.node_name()) {
            return Ok(None); // another host's
        }
        let b = agent
            .volumes()
            .backend(v.pool())
            .await
            .map_err(|e| e.to_string())?;
        reverts.push((b, backend_name(ns, claim)));
    }
    for (b, name) in reverts {
        let snap = snap.clone();
        tokio::task::spawn_blocking(move || b.revert(&name, &snap))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    info!(restore = %r.metadata.name(), volumes = sst.volumes.len(), "Volumes reverted to the snapshot");
    Ok(Some(json!({
        "restores": sst.volumes,
        "volumesRestored": true,
    })))
}

/// How an object the clone made is doing.
async fn progress_of(agent: &Agent, kind: &str, ns: &str, name: &str) -> Result<Progress, String> {
    let Some(v): Option<Value> = get(agent, kind, ns, name).await? else {
        return Ok(Progress::Absent);
    };
    let st = &v["status"];
    Ok(if kind == "virtualmachinesnapshots" {
        match st["phase"].as_str() {
            Some("Succeeded") if st["readyToUse"] == true => Progress::Done,
            Some("Failed") => Progress::Failed,
            _ => Progress::Running,
        }
    } else if st["complete"] == true {
        Progress::Done
    } else if st["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["reason"] == "Failed")
    }) {
        Progress::Failed
    } else {
        Progress::Running
    })
}

/// Advance one VirtualMachineClone (see [`vmclone::decide`]).
async fn clone(agent: &Agent, ck: &KindInfo, c: &VirtualMachineClone) -> Result<(), String> {
    let st0 = c.status.clone().unwrap_or_default();
    if matches!(st0.phase, Some(ClonePhase::Succeeded | ClonePhase::Failed)) {
        return Ok(());
    }
    let ns = c.metadata.namespace();
    let uid = c.metadata.uid.clone().unwrap_or_default();
    let source_is_vm = c.spec.source.kind == "VirtualMachine";
    // One host drives a clone: the one holding the source's first Volume
    // (local pools: its snapshots and the copies are made there).
    let first_claim = if source_is_vm {
        get::<VirtualMachine>(agent, "virtualmachines", ns, &c.spec.source.name)
            .await?
            .and_then(|vm| claims(&vm).into_iter().next().map(|(_, c)| c))
    } else {
        get::<VirtualMachineSnapshot>(agent, "virtualmachinesnapshots", ns, &c.spec.source.name)
            .await?
            .and_then(|s| s.status.and_then(|st| st.volumes.into_iter().next()))
    };
    if let Some(claim) = first_claim {
        let host = agent
            .volumes()
            .get_volume(ns, &claim)
            .await
            .map_err(|e| e.to_string())?
            .and_then(|v| v.status.and_then(|st| st.host));
        if host.is_some_and(|h| h != agent.node_name()) {
            return Ok(());
        }
    }
    let target = c
        .spec
        .target
        .as_ref()
        .map(|t| t.name.clone())
        .unwrap_or_else(|| format!("clone-{}", &uid[..uid.len().min(8)]));
    let snapshot_name = if source_is_vm {
        format!("tmp-snapshot-{uid}")
    } else {
        c.spec.source.name.clone()
    };
    let restore_name = format!("tmp-restore-{uid}");
    let snapshot = progress_of(agent, "virtualmachinesnapshots", ns, &snapshot_name).await?;
    let restore = progress_of(agent, "virtualmachinerestores", ns, &restore_name).await?;
    let target_taken = get::<Value>(agent, "virtualmachines", ns, &target)
        .await?
        .is_some();
    let mut st = st0.clone();
    st.target_name = Some(target.clone());
    st.snapshot_name = Some(snapshot_name.clone());
    st.restore_name = Some(restore_name.clone());
    let step = vmclone::decide(st0.phase, source_is_vm, target_taken, snapshot, restore);
    match step {
        Step::Done => return Ok(()),
        Step::CreateSnapshot => {
            if st.creation_time.is_none() {
                st.creation_time = Some(now_rfc3339());
            }
            let sk = kind("virtualmachinesnapshots").ok_or("snapshots not served")?;
            let obj = json!({
                "apiVersion": krvirt_api::snapshot::API_VERSION,
                "kind": "VirtualMachineSnapshot",
                "metadata": {"name": snapshot_name, "namespace": ns},
                "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine",
                    "name": c.spec.source.name}},
            });
            match agent.client().create(sk, ns, &obj).await {
                Ok(_) => {}
                Err(e) if e.code() == Some(409) => {}
                Err(e) => return Err(e.to_string()),
            }
            st.phase = Some(ClonePhase::SnapshotInProgress);
            conditions(
                &mut st.conditions,
                false,
                "SnapshotInProgress",
                "snapshotting the source",
            );
        }
        Step::CreateRestore => {
            // The patches come from the snapshot's VM definition.
            let Some(s): Option<VirtualMachineSnapshot> =
                get(agent, "virtualmachinesnapshots", ns, &snapshot_name).await?
            else {
                return Ok(());
            };
            let Some(source) = snapshot_vm_definition(agent, &s).await? else {
                return Ok(()); // not published yet
            };
            let patches = vmclone::restore_patches(&c.spec, &source);
            let rk = kind("virtualmachinerestores").ok_or("restores not served")?;
            let obj = json!({
                "apiVersion": krvirt_api::snapshot::API_VERSION,
                "kind": "VirtualMachineRestore",
                "metadata": {"name": restore_name, "namespace": ns},
                "spec": {
                    "target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": target},
                    "virtualMachineSnapshotName": snapshot_name,
                    "patches": patches,
                },
            });
            match agent.client().create(rk, ns, &obj).await {
                Ok(_) => {}
                Err(e) if e.code() == Some(409) => {}
                Err(e) => return Err(e.to_string()),
            }
            st.phase = Some(ClonePhase::CreatingTargetVM);
            conditions(
                &mut st.conditions,
                false,
                "CreatingTargetVM",
                "creating the target VirtualMachine from the snapshot",
            );
        }
        Step::Wait(phase) => {
            st.phase = Some(phase);
            let reason = format!("{phase:?}");
            conditions(&mut st.conditions, false, &reason, "in progress");
        }
        Step::Finish => {
            for (k, name, ours) in [
                ("virtualmachinerestores", &restore_name, true),
                ("virtualmachinesnapshots", &snapshot_name, source_is_vm),
            ] {
                if !ours {
                    continue;
                }
                let kd = kind(k).ok_or("kind not served")?;
                match agent.client().delete(kd, ns, name).await {
                    Ok(_) => {}
                    Err(e) if e.code() == Some(404) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
            info!(clone = %c.metadata.name(), %target, "VM cloned");
            st.phase = Some(ClonePhase::Succeeded);
            conditions(&mut st.conditions, true, "Succeeded", "the clone is ready");
        }
        Step::Fail(msg) => {
            warn!(clone = %c.metadata.name(), %msg, "clone failed");
            st.phase = Some(ClonePhase::Failed);
            conditions(&mut st.conditions, false, "Failed", &msg);
        }
    }
    if st != st0 {
        write(agent, ck, ns, c.metadata.name(), &st).await;
    }
    Ok(())
}
