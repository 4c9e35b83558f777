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

use std::time::Duration;

use krvirt_api::KindInfo;
use krvirt_api::kubevirt::{VirtualMachine, VirtualMachineInstance};
use krvirt_api::meta::{Condition, ConditionStatus, now_rfc3339, set_condition};
use krvirt_api::snapshot::{
    SnapshotError, VirtualMachineRestore, VirtualMachineRestoreStatus, VirtualMachineSnapshot,
    VirtualMachineSnapshotStatus,
};
use krvirt_api::storage::VolumePhase;
use krvirt_client::{ListParams, PatchTarget};
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
        if r.status.as_ref().and_then(|s| s.complete) == Some(true) {
            continue;
        }
        let mut st = r.status.clone().unwrap_or_default();
        let before = st.clone();
        match restore(agent, &r, &mut st).await {
            Ok(_) => {}
            Err(msg) => {
                warn!(restore = %r.metadata.name(), %msg, "restore failed");
                st.complete = Some(false);
                conditions(&mut st.conditions, false, "Failed", &msg);
            }
        }
        if st != before {
            write(agent, rk, r.metadata.namespace(), r.metadata.name(), &st).await;
        }
    }
    Ok(())
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
        let needs_pause = backends
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
            Ok::<(), String>(())
        }
        .await;
        if needs_pause && was_running {
            qmp.execute("cont", None).await.map_err(|e| e.to_string())?;
        }
        result?;
        st.indications = vec!["Online".into(), "NoGuestAgent".into()];
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
    if s.spec.source.name != r.spec.target.name {
        return Err("restoring into another VM is not supported yet".into());
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
    info!(restore = %r.metadata.name(), volumes = sst.volumes.len(), "VM restored");
    st.complete = Some(true);
    st.restore_time = Some(now_rfc3339());
    st.restores = sst.volumes.clone();
    conditions(
        &mut st.conditions,
        true,
        "Succeeded",
        "the VirtualMachine was restored",
    );
    Ok(())
}
