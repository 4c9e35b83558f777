//! VirtualMachineSnapshot and VirtualMachineRestore on this host.
//!
//! A snapshot covers the VM's krvirt Volumes (`persistentVolumeClaim`,
//! `dataVolume`); each gets a pool snapshot named `vmsnap-{snapshot uid}`.
//! A stopped VM is snapshotted by the pools; a running one online and
//! consistently across its disks: the disks of `dir` pools in one QMP
//! `transaction` of `blockdev-snapshot-internal-sync`, and if any disk is
//! in a pool that snapshots outside QEMU (btrfs), with the guest paused
//! (QMP `stop`, which drains in-flight I/O) around all of them. A restore
//! waits for the VM to be stopped, then reverts every Volume.
//!
//! Memory snapshots (`spec.includeMemory`, krvirt's extension): with the
//! guest paused, after the disk snapshots, QEMU's `snapshot-save` job
//! writes the RAM and device state into a qcow2 file of the snapshot's
//! directory (`{data_dir}/snapshots/{uid}/memory.qcow2`, attached for the
//! job only), then the guest continues. Restoring such a snapshot into its
//! VM marks the VM ([`RESUME_FROM_ANNOTATION`]); its next launch starts
//! QEMU paused, `snapshot-load`s the state on top of the reverted disks and
//! continues: the guest resumes where it was.
//!
//! The snapshot directory also keeps the VM's definition (`vm.json`), from
//! which a restore whose target VM does not exist creates a new VM with
//! new Volumes (made from the pool snapshots), new MACs and firmware UUID.
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
use krvirt_api::kubevirt::{VirtualMachine, VirtualMachineInstance};
use krvirt_api::meta::{Condition, ConditionStatus, now_rfc3339, set_condition};
use krvirt_api::snapshot::{
    RESUME_FROM_ANNOTATION, SNAPSHOT_FINALIZER, SnapshotError, VirtualMachineRestore,
    VirtualMachineRestoreStatus, VirtualMachineSnapshot, VirtualMachineSnapshotStatus, indications,
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
        if st0.complete == Some(true) || restore_failed(&st0) {
            continue;
        }
        let mut st = st0.clone();
        match restore(agent, &r, &mut st).await {
            Ok(_) => {}
            Err(msg) => {
                warn!(restore = %r.metadata.name(), %msg, "restore failed");
                st.complete = Some(false);
                conditions(&mut st.conditions, false, "Failed", &msg);
            }
        }
        if st != st0 {
            write(agent, rk, r.metadata.namespace(), r.metadata.name(), &st).await;
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

fn restore_failed(st: &VirtualMachineRestoreStatus) -> bool {
    st.conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.reason.as_deref() == Some("Failed"))
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

/// The memory state a VMI's launch must resume from: the VM it belongs to
/// carries [`RESUME_FROM_ANNOTATION`] and the state file exists.
pub(crate) async fn resume_point(
    agent: &Agent,
    vmi: &VirtualMachineInstance,
) -> Option<(PathBuf, String)> {
    vmi.metadata
        .owner_references
        .iter()
        .find(|o| o.kind == "VirtualMachine")?;
    let vm: VirtualMachine = get(
        agent,
        "virtualmachines",
        vmi.metadata.namespace(),
        vmi.metadata.name(),
    )
    .await
    .ok()??;
    let uid = vm.metadata.annotations.get(RESUME_FROM_ANNOTATION)?;
    let file = snapshot_dir(agent.data_dir(), uid).join(MEMORY_FILE);
    file.exists().then(|| (file, pool_snapshot_name(uid)))
}

/// Load a saved memory state into a QEMU started paused, forget the VM's
/// resume mark, and let the guest run unless it was asked to start paused.
pub(crate) async fn resume(
    agent: &Agent,
    qmp: &QmpClient,
    vmi: &VirtualMachineInstance,
    (file, tag): &(PathBuf, String),
    stay_paused: bool,
) -> Result<(), String> {
    // The mark goes either way: a state that cannot be loaded (the VM's
    // devices changed since) must not keep every later start failing.
    let loaded = memory_job(qmp, "snapshot-load", file, tag).await;
    if let Some(k) = kind("virtualmachines") {
        agent
            .client()
            .merge_patch(
                k,
                vmi.metadata.namespace(),
                vmi.metadata.name(),
                &json!({"metadata": {"annotations": {RESUME_FROM_ANNOTATION: null}}}),
                PatchTarget::Main,
            )
            .await
            .map_err(|e| format!("clearing the resume mark: {e}"))?;
    }
    loaded.map_err(|e| format!("resuming from the memory snapshot: {e}"))?;
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
    let progressing = !ready && reason != "Failed";
    for (t, on) in [("Progressing", progressing), ("Ready", ready)] {
        set_condition(
            c,
            Condition {
                reason: Some(reason.to_string()),
                message: Some(message.to_string()),
                ..Condition::new(
                    t,
                    if on {
                        ConditionStatus::True
                    } else {
                        ConditionStatus::False
                    },
                )
            },
        );
    }
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
    // The VM's definition, for restores into a new VM and clones.
    let dir = snapshot_dir(
        agent.data_dir(),
        s.metadata.uid.as_deref().unwrap_or_default(),
    );
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    {
        // Saved guest RAM is as private as the guest: root only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let vm_json = serde_json::to_vec_pretty(&vm).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(VM_FILE), vm_json)
        .map_err(|e| format!("{}: {e}", dir.join(VM_FILE).display()))?;
    let include_memory = s.spec.include_memory == Some(true);

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
    conditions(
        &mut st.conditions,
        true,
        "Succeeded",
        "the snapshot is ready to use",
    );
    Ok(true)
}

/// Annotation on a VM made by a restore into a new VM: the restore's uid.
const RESTORED_BY_ANNOTATION: &str = "krvirt.io/restored-by";

async fn restore(
    agent: &Agent,
    r: &VirtualMachineRestore,
    st: &mut VirtualMachineRestoreStatus,
) -> Result<(), String> {
    let ns = r.metadata.namespace();
    let Some(s): Option<VirtualMachineSnapshot> = get(
        agent,
        "virtualmachinesnapshots",
        ns,
        &r.spec.virtual_machine_snapshot_name,
    )
    .await?
    else {
        return Err(format!(
            "VirtualMachineSnapshot {:?} not found",
            r.spec.virtual_machine_snapshot_name
        ));
    };
    let sst = s.status.clone().unwrap_or_default();
    if sst.ready_to_use != Some(true) {
        conditions(
            &mut st.conditions,
            false,
            "SnapshotNotReady",
            "waiting for the snapshot to be ready",
        );
        return Ok(());
    }
    let target: Option<VirtualMachine> =
        get(agent, "virtualmachines", ns, &r.spec.target.name).await?;
    match target {
        None => return restore_new(agent, r, &s, st).await,
        Some(vm)
            if vm.metadata.annotations.get(RESTORED_BY_ANNOTATION) == r.metadata.uid.as_ref() =>
        {
            // Made by this restore on an earlier pass.
            return restore_new(agent, r, &s, st).await;
        }
        Some(_) if s.spec.source.name != r.spec.target.name => {
            return Err(
                "the target is another existing VirtualMachine: restore into the snapshot's VM or name a new one"
                    .into(),
            );
        }
        Some(_) => {}
    }
    if !r.spec.patches.is_empty() {
        return Err("spec.patches apply only to a restore into a new VirtualMachine".into());
    }
    let vmi: Option<Value> = get(agent, "virtualmachineinstances", ns, &r.spec.target.name).await?;
    if vmi.is_some() {
        conditions(
            &mut st.conditions,
            false,
            "VMRunning",
            "the VirtualMachine must be stopped before it is restored",
        );
        return Ok(());
    }
    let snap = pool_snapshot_name(s.metadata.uid.as_deref().unwrap_or_default());
    for claim in &sst.volumes {
        let v = agent
            .volumes()
            .get_volume(ns, claim)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("Volume {claim:?} not found"))?;
        if v.status.as_ref().and_then(|x| x.host.as_deref()) != Some(agent.node_name()) {
            return Ok(());
        }
        let b = agent
            .volumes()
            .backend(v.pool())
            .await
            .map_err(|e| e.to_string())?;
        let name = backend_name(ns, claim);
        let snap = snap.clone();
        tokio::task::spawn_blocking(move || b.revert(&name, &snap))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    // A memory snapshot: the next start resumes the guest from it.
    let uid = s.metadata.uid.clone().unwrap_or_default();
    let memory = snapshot_dir(agent.data_dir(), &uid)
        .join(MEMORY_FILE)
        .exists();
    let vm_kind = kind("virtualmachines").ok_or("VirtualMachines not served")?;
    agent
        .client()
        .merge_patch(
            vm_kind,
            ns,
            &r.spec.target.name,
            &json!({"metadata": {"annotations": {
                RESUME_FROM_ANNOTATION: if memory { Value::String(uid) } else { Value::Null }
            }}}),
            PatchTarget::Main,
        )
        .await
        .map_err(|e| e.to_string())?;
    info!(restore = %r.metadata.name(), volumes = sst.volumes.len(), memory, "VM restored");
    st.complete = Some(true);
    st.restore_time = Some(now_rfc3339());
    st.restores = sst.volumes.clone();
    conditions(
        &mut st.conditions,
        true,
        "Succeeded",
        if memory {
            "the VirtualMachine was restored; its next start resumes the saved guest"
        } else {
            "the VirtualMachine was restored"
        },
    );
    Ok(())
}

/// Name of the Volume a restore into a new VM makes for one of its disks
/// (KubeVirt's `restore-{restore uid}-{volume name}`).
pub fn restored_volume_name(restore_uid: &str, volume: &str) -> String {
    format!("restore-{restore_uid}-{volume}")
}

/// The new VM's definition: the snapshot's VM under the target's name,
/// its snapshotted disks on the restored Volumes (`renames`: old claim →
/// new Volume), without MAC addresses, firmware UUID and bookkeeping, then
/// the restore's patches.
pub fn new_vm_definition(
    source: &Value,
    target: &str,
    restore_uid: &str,
    renames: &[(String, String)],
    patches: &[String],
) -> Result<Value, String> {
    let mut vm = source.clone();
    let meta = vm["metadata"].as_object().cloned().unwrap_or_default();
    let mut annotations = meta
        .get("annotations")
        .and_then(|a| a.as_object().cloned())
        .unwrap_or_default();
    annotations.remove(RESUME_FROM_ANNOTATION);
    annotations.insert(RESTORED_BY_ANNOTATION.into(), restore_uid.into());
    vm["metadata"] = json!({
        "name": target,
        "namespace": meta.get("namespace").cloned().unwrap_or(Value::Null),
        "labels": meta.get("labels").cloned().unwrap_or_else(|| json!({})),
        "annotations": annotations,
    });
    if let Some(o) = vm.as_object_mut() {
        o.remove("status");
    }
    let spec = &mut vm["spec"]["template"]["spec"];
    if let Some(vols) = spec["volumes"].as_array_mut() {
        for v in vols.iter_mut() {
            let claim = v["persistentVolumeClaim"]["claimName"]
                .as_str()
                .or(v["dataVolume"]["name"].as_str())
                .map(str::to_string);
            if let Some((_, new)) = renames.iter().find(|(old, _)| Some(old) == claim.as_ref()) {
                *v = json!({"name": v["name"], "persistentVolumeClaim": {"claimName": new}});
            }
        }
    }
    if let Some(ifaces) = spec["domain"]["devices"]["interfaces"].as_array_mut() {
        for i in ifaces.iter_mut().filter_map(Value::as_object_mut) {
            i.remove("macAddress");
        }
    }
    if let Some(fw) = spec["domain"]["firmware"].as_object_mut() {
        fw.remove("uuid");
        fw.remove("serial");
    }
    if let Some(t) = vm["spec"]["dataVolumeTemplates"].as_array_mut() {
        t.retain(|d| {
            !renames
                .iter()
                .any(|(old, _)| d["metadata"]["name"].as_str() == Some(old))
        });
    }
    krvirt_api::jsonpatch::apply_all(&mut vm, patches).map_err(|e| format!("spec.patches: {e}"))?;
    Ok(vm)
}

/// Restore into a VM that does not exist: new Volumes from the pool
/// snapshots (waited for), then the VM.
async fn restore_new(
    agent: &Agent,
    r: &VirtualMachineRestore,
    s: &VirtualMachineSnapshot,
    st: &mut VirtualMachineRestoreStatus,
) -> Result<(), String> {
    let ns = r.metadata.namespace();
    let rid = r.metadata.uid.clone().unwrap_or_default();
    let sid = s.metadata.uid.clone().unwrap_or_default();
    let file = snapshot_dir(agent.data_dir(), &sid).join(VM_FILE);
    let text = match std::fs::read(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Another host's snapshot, or one taken before krvirt kept
            // VM definitions: only the host holding its Volumes answers.
            let sst = s.status.clone().unwrap_or_default();
            let mine = match sst.volumes.first() {
                Some(c) => agent
                    .volumes()
                    .get_volume(ns, c)
                    .await
                    .map_err(|e| e.to_string())?
                    .and_then(|v| v.status.and_then(|x| x.host))
                    .is_none_or(|h| h == agent.node_name()),
                None => true,
            };
            if mine {
                return Err("the snapshot does not hold its VM's definition".into());
            }
            return Ok(());
        }
        Err(e) => return Err(format!("{}: {e}", file.display())),
    };
    let source: Value = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    let source_vm: VirtualMachine =
        serde_json::from_value(source.clone()).map_err(|e| e.to_string())?;
    let snap = pool_snapshot_name(&sid);
    let sst = s.status.clone().unwrap_or_default();
    let vol_kind = kind("volumes").ok_or("Volumes not served")?;
    let mut renames = Vec::new();
    let mut ready = true;
    for (disk, claim) in claims(&source_vm) {
        if !sst.volumes.contains(&claim) {
            continue;
        }
        let new = restored_volume_name(&rid, &disk);
        match agent
            .volumes()
            .get_volume(ns, &new)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(v) => match v.phase() {
                Some(VolumePhase::Succeeded) => {}
                Some(VolumePhase::Failed) => {
                    return Err(format!("restored Volume {new:?} failed"));
                }
                _ => ready = false,
            },
            None => {
                let src = agent
                    .volumes()
                    .get_volume(ns, &claim)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("Volume {claim:?} of the snapshot is gone"))?;
                let obj = json!({
                    "apiVersion": "krvirt.io/v1",
                    "kind": "Volume",
                    "metadata": {"name": new, "namespace": ns,
                        "annotations": {RESTORED_BY_ANNOTATION: rid}},
                    "spec": {
                        "pool": src.pool(),
                        "source": {"snapshot": {"volume": claim, "name": snap}},
                    },
                });
                match agent.client().create(vol_kind, ns, &obj).await {
                    Ok(_) => {}
                    Err(e) if e.code() == Some(409) => {}
                    Err(e) => return Err(format!("creating Volume {new:?}: {e}")),
                }
                ready = false;
            }
        }
        renames.push((claim, new));
    }
    st.restores = renames.iter().map(|(_, n)| n.clone()).collect();
    if !ready {
        conditions(
            &mut st.conditions,
            false,
            "RestoreInProgress",
            "creating the new VirtualMachine's Volumes from the snapshot",
        );
        return Ok(());
    }
    let vm = new_vm_definition(
        &source,
        &r.spec.target.name,
        &rid,
        &renames,
        &r.spec.patches,
    )?;
    let vm_kind = kind("virtualmachines").ok_or("VirtualMachines not served")?;
    match agent.client().create(vm_kind, ns, &vm).await {
        Ok(_) => {}
        Err(e) if e.code() == Some(409) => {}
        Err(e) => {
            return Err(format!(
                "creating VirtualMachine {:?}: {e}",
                r.spec.target.name
            ));
        }
    }
    info!(restore = %r.metadata.name(), vm = %r.spec.target.name, volumes = renames.len(), "VM restored into a new VM");
    st.complete = Some(true);
    st.restore_time = Some(now_rfc3339());
    conditions(
        &mut st.conditions,
        true,
        "Succeeded",
        "the new VirtualMachine was created from the snapshot",
    );
    Ok(())
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
            let file = snapshot_dir(
                agent.data_dir(),
                s.metadata.uid.as_deref().unwrap_or_default(),
            )
            .join(VM_FILE);
            let Ok(text) = std::fs::read(&file) else {
                return Ok(()); // another host's snapshot
            };
            let source: Value = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_vm_from_a_snapshot_gets_its_own_volumes_macs_and_uuid() {
        let source = json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "src", "namespace": "default", "uid": "u1",
                "resourceVersion": "7", "labels": {"app": "a"},
                "annotations": {RESUME_FROM_ANNOTATION: "x", "keep": "y"}},
            "spec": {
                "runStrategy": "Always",
                "dataVolumeTemplates": [{"metadata": {"name": "src-root"}}],
                "template": {"spec": {
                    "domain": {
                        "devices": {"interfaces": [{"name": "default", "macAddress": "02:00:00:00:00:09"}]},
                        "firmware": {"uuid": "5d307ca9-b3ef-428c-8861-06e72d69f223", "serial": "s"},
                    },
                    "volumes": [
                        {"name": "root", "dataVolume": {"name": "src-root"}},
                        {"name": "data", "persistentVolumeClaim": {"claimName": "src-data"}},
                        {"name": "boot", "containerDisk": {"image": "demo"}},
                    ],
                }},
            },
            "status": {"ready": true},
        });
        let renames = vec![
            ("src-root".to_string(), "restore-r-root".to_string()),
            ("src-data".to_string(), "restore-r-data".to_string()),
        ];
        let vm = new_vm_definition(
            &source,
            "dst",
            "r",
            &renames,
            &[r#"{"op":"add","path":"/metadata/labels/new","value":"1"}"#.into()],
        )
        .unwrap();
        assert_eq!(vm["metadata"]["name"], "dst");
        assert!(vm["metadata"]["uid"].is_null() && vm["metadata"]["resourceVersion"].is_null());
        assert!(vm.get("status").is_none());
        assert_eq!(vm["metadata"]["labels"], json!({"app": "a", "new": "1"}));
        let ann = &vm["metadata"]["annotations"];
        assert!(ann[RESUME_FROM_ANNOTATION].is_null(), "{ann}");
        assert_eq!(ann[RESTORED_BY_ANNOTATION], "r");
        assert_eq!(ann["keep"], "y");
        let spec = &vm["spec"]["template"]["spec"];
        assert_eq!(
            spec["volumes"][0],
            json!({"name": "root", "persistentVolumeClaim": {"claimName": "restore-r-root"}})
        );
        assert_eq!(
            spec["volumes"][1]["persistentVolumeClaim"]["claimName"],
            "restore-r-data"
        );
        assert_eq!(spec["volumes"][2]["containerDisk"]["image"], "demo");
        assert!(spec["domain"]["devices"]["interfaces"][0]["macAddress"].is_null());
        assert_eq!(spec["domain"]["firmware"], json!({}));
        assert_eq!(vm["spec"]["dataVolumeTemplates"], json!([]));
        // The result is a valid VirtualMachine.
        serde_json::from_value::<VirtualMachine>(vm).unwrap();
    }

    #[test]
    fn bad_patches_are_named() {
        let e = new_vm_definition(
            &json!({"metadata": {}, "spec": {"template": {"spec": {}}}}),
            "dst",
            "r",
            &[],
            &[r#"{"op":"replace","path":"/metadata/nope","value":1}"#.into()],
        )
        .unwrap_err();
        assert!(
            e.starts_with("spec.patches") && e.contains("/metadata/nope"),
            "{e}"
        );
    }
}
