//! Whether a VMI's Volumes can go along with a live migration, checked by
//! the migration controller before it picks a target.
//!
//! Volumes of shared pools (`rbd`, or `dir`/`btrfs` with `spec.shared`)
//! open in place on the target. Volumes of host-local pools are mirrored
//! into a new copy on the target (the agents' `volmove`); that is refused,
//! naming the Volume, its pool and the reason, for a Volume that is
//! attached read-only, that another VMI uses as well, that is not ready,
//! or that has VirtualMachineSnapshots (a block mirror copies the current
//! content only, never the pool snapshots). A Volume still settling an
//! earlier migration makes the migration wait.

use krvirt_api::kubevirt::VirtualMachineInstance;
use krvirt_api::snapshot::VirtualMachineSnapshot;
use krvirt_api::storage::{StoragePool, StorageVolume, VolumePhase, hotplug_requests};

/// The verdict on a VMI's Volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeCheck {
    Ok,
    /// Not now (an earlier migration's copy is being settled).
    Wait(String),
    /// Never, as things are.
    Refuse(String),
}

/// Check the Volumes of `vmi` (`volumes`, `pools`, `snapshots`: the
/// cluster's; `vmis`: every VMI, to find other users of a Volume).
pub fn check_volumes(
    vmi: &VirtualMachineInstance,
    volumes: &[StorageVolume],
    pools: &[StoragePool],
    snapshots: &[VirtualMachineSnapshot],
    vmis: &[VirtualMachineInstance],
) -> VolumeCheck {
    let ns = vmi.metadata.namespace();
    let is_shared = |v: &StorageVolume| {
        pools
            .iter()
            .find(|p| p.metadata.name() == v.pool())
            .is_some_and(|p| p.spec.is_shared())
    };
    // Hot-plugged Volumes are attached at run time, not part of the plan
    // the target starts from: one of a host-local pool has no copy there.
    let hotplugged = hotplug_requests(&vmi.metadata.annotations).unwrap_or_default();
    for (disk, claim) in &hotplugged {
        let local = volumes
            .iter()
            .find(|v| v.metadata.namespace() == ns && v.metadata.name() == claim)
            .filter(|v| !is_shared(v));
        if let Some(v) = local {
            return VolumeCheck::Refuse(format!(
                "Volume {claim:?} on host-local StoragePool {:?} is hot-plugged (disk {disk:?}); only the VMI's own Volumes are mirrored (unplug it to migrate)",
                v.pool()
            ));
        }
    }
    for vol in &vmi.spec.volumes {
        let Some(claim) = vol.claim() else { continue };
        let Some(v) = volumes
            .iter()
            .find(|v| v.metadata.namespace() == ns && v.metadata.name() == claim)
        else {
            return VolumeCheck::Refuse(format!("Volume {claim:?} not found"));
        };
        let pool_name = v.pool();
        if is_shared(v) {
            continue;
        }
        let refuse = |why: String| {
            VolumeCheck::Refuse(format!(
                "Volume {claim:?} on host-local StoragePool {pool_name:?} cannot be mirrored to another host: {why}"
            ))
        };
        if v.phase() != Some(VolumePhase::Succeeded) {
            return refuse("it is not ready".into());
        }
        let read_only = vol
            .persistent_volume_claim
            .as_ref()
            .and_then(|p| p.read_only)
            == Some(true);
        if read_only {
            return refuse("it is attached read-only (only writable Volumes are mirrored)".into());
        }
        let others: Vec<&str> = vmis
            .iter()
            .filter(|o| o.metadata.namespace() == ns && o.metadata.uid != vmi.metadata.uid)
            .filter(|o| o.spec.volumes.iter().any(|x| x.claim() == Some(claim)))
            .map(|o| o.metadata.name())
            .collect();
        if !others.is_empty() {
            return refuse(format!("VMI(s) {others:?} use it as well"));
        }
        let snaps: Vec<&str> = snapshots
            .iter()
            .filter(|s| s.metadata.namespace() == ns)
            .filter(|s| {
                s.status
                    .as_ref()
                    .is_some_and(|st| st.volumes.iter().any(|x| x == claim))
                    // one being taken of this VM has not listed its Volumes yet
                    || (s.spec.source.kind == "VirtualMachine"
                        && s.spec.source.name == vmi.metadata.name()
                        && s.status.as_ref().and_then(|st| st.ready_to_use) != Some(true))
            })
            .map(|s| s.metadata.name())
            .collect();
        if !snaps.is_empty() {
            return refuse(format!(
                "it has VirtualMachineSnapshots {snaps:?}, whose pool snapshots a block mirror cannot carry (delete them to migrate)"
            ));
        }
        if let Some(rec) = v.status.as_ref().and_then(|s| s.migration.as_ref()) {
            return VolumeCheck::Wait(format!(
                "Volume {claim:?}: the copy made by migration {} to host {:?} is being settled",
                rec.migration_uid, rec.target_host
            ));
        }
    }
    VolumeCheck::Ok
}

/// The host a VMI must run on because of its Volumes: the one holding
/// its host-local Volumes (`status.host`, which a migration moves). `Err`
/// when they are on different hosts. Volumes not made yet and those of
/// shared pools do not pin.
pub fn volume_host(
    vmi: &VirtualMachineInstance,
    volumes: &[StorageVolume],
    pools: &[StoragePool],
) -> Result<Option<String>, String> {
    let ns = vmi.metadata.namespace();
    let mut pinned: Option<(String, &str)> = None;
    for claim in vmi.spec.volumes.iter().filter_map(|v| v.claim()) {
        let Some(v) = volumes
            .iter()
            .find(|v| v.metadata.namespace() == ns && v.metadata.name() == claim)
        else {
            continue;
        };
        let shared = pools
            .iter()
            .find(|p| p.metadata.name() == v.pool())
            .is_some_and(|p| p.spec.is_shared());
        let Some(host) = v.status.as_ref().and_then(|s| s.host.as_deref()) else {
            continue;
        };
        if shared {
            continue;
        }
        match &pinned {
            Some((h, other)) if h != host => {
                return Err(format!(
                    "its host-local Volumes are on different hosts: {other:?} on {h:?}, {claim:?} on {host:?}"
                ));
            }
            Some(_) => {}
            None => pinned = Some((host.to_string(), claim)),
        }
    }
    Ok(pinned.map(|(h, _)| h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn vmi(name: &str, uid: &str, volumes: Value) -> VirtualMachineInstance {
        serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "namespace": "default", "uid": uid},
            "spec": {"domain": {"devices": {}}, "volumes": volumes},
        }))
        .unwrap()
    }

    fn volume(name: &str, pool: &str, status: Value) -> StorageVolume {
        serde_json::from_value(json!({
            "apiVersion": "krvirt.io/v1", "kind": "Volume",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"pool": pool, "capacity": "1Gi", "source": {"blank": {}}},
            "status": status,
        }))
        .unwrap()
    }

    fn pool(name: &str, spec: Value) -> StoragePool {
        serde_json::from_value(json!({
            "apiVersion": "krvirt.io/v1", "kind": "StoragePool",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap()
    }

    fn snapshot(name: &str, vm: &str, volumes: &[&str], ready: bool) -> VirtualMachineSnapshot {
        serde_json::from_value(json!({
            "apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshot",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": vm}},
            "status": {"readyToUse": ready, "volumes": volumes},
        }))
        .unwrap()
    }

    fn claim(disk: &str, volume: &str) -> Value {
        json!({"name": disk, "persistentVolumeClaim": {"claimName": volume}})
    }

    #[test]
    fn host_local_volumes_migrate_unless_something_forbids_it() {
        let ready = json!({"phase": "Succeeded", "host": "a", "capacity": "1Gi"});
        let pools = [
            pool("local", json!({"type": "dir", "path": "/p"})),
            pool("nfs", json!({"type": "dir", "path": "/n", "shared": true})),
        ];
        let vols = [
            volume("data", "local", ready.clone()),
            volume("shared", "nfs", ready.clone()),
            // the default pool has no object yet: host-local
            volume("d", "default", ready.clone()),
        ];
        let v = vmi(
            "vm1",
            "u1",
            json!([claim("a", "data"), claim("b", "shared"), claim("c", "d")]),
        );
        assert_eq!(
            check_volumes(&v, &vols, &pools, &[], std::slice::from_ref(&v)),
            VolumeCheck::Ok
        );

        // Snapshots: named, with the Volume and the pool.
        let snaps = [snapshot("before-upgrade", "vm1", &["data"], true)];
        match check_volumes(&v, &vols, &pools, &snaps, &[]) {
            VolumeCheck::Refuse(m) => {
                assert!(m.contains("\"data\"") && m.contains("\"local\""), "{m}");
                assert!(m.contains("before-upgrade"), "{m}");
            }
            o => panic!("{o:?}"),
        }
        // A snapshot of the VM still being taken counts too; one of a
        // shared Volume only does not.
        let taking = [snapshot("now", "vm1", &[], false)];
        assert!(matches!(
            check_volumes(&v, &vols, &pools, &taking, &[]),
            VolumeCheck::Refuse(m) if m.contains("now")
        ));
        let of_shared = [snapshot("s", "vm1", &["shared"], true)];
        assert_eq!(
            check_volumes(&v, &vols, &pools, &of_shared, &[]),
            VolumeCheck::Ok
        );

        // Read-only, shared with another VMI, not ready.
        let ro = vmi(
            "vm2",
            "u2",
            json!([{"name": "a", "persistentVolumeClaim": {"claimName": "data", "readOnly": true}}]),
        );
        assert!(matches!(
            check_volumes(&ro, &vols, &pools, &[], &[]),
            VolumeCheck::Refuse(m) if m.contains("read-only")
        ));
        let other = vmi("vm3", "u3", json!([claim("x", "data")]));
        assert!(matches!(
            check_volumes(&v, &vols, &pools, &[], &[v.clone(), other]),
            VolumeCheck::Refuse(m) if m.contains("vm3")
        ));
        let pending = [volume(
            "data",
            "local",
            json!({"phase": "ImportInProgress"}),
        )];
        let only = vmi("vm1", "u1", json!([claim("a", "data")]));
        assert!(matches!(
            check_volumes(&only, &pending, &pools, &[], &[]),
            VolumeCheck::Refuse(m) if m.contains("not ready")
        ));

        // An earlier migration's copy still being settled: wait.
        let settling = [volume(
            "data",
            "local",
            json!({"phase": "Succeeded", "host": "a", "migration":
                {"targetHost": "b", "migrationUid": "m0", "vmiName": "vm1", "vmiUid": "u1"}}),
        )];
        assert!(matches!(
            check_volumes(&only, &settling, &pools, &[], &[]),
            VolumeCheck::Wait(m) if m.contains("m0")
        ));
        assert!(matches!(
            check_volumes(&only, &[], &pools, &[], &[]),
            VolumeCheck::Refuse(m) if m.contains("not found")
        ));

        // Placement follows host-local Volumes, not shared ones.
        assert_eq!(volume_host(&v, &vols, &pools), Ok(Some("a".into())));
        let elsewhere = [
            volume("data", "local", json!({"phase": "Succeeded", "host": "a"})),
            volume("shared", "nfs", json!({"phase": "Succeeded", "host": "b"})),
            volume("d", "default", json!({"phase": "Succeeded", "host": "b"})),
        ];
        assert!(matches!(
            volume_host(&v, &elsewhere, &pools),
            Err(m) if m.contains("\"d\" on \"b\"")
        ));
        let fresh = [volume("data", "local", json!({"phase": "Pending"}))];
        assert_eq!(volume_host(&only, &fresh, &pools), Ok(None));

        // A hot-plugged host-local Volume has no copy on the target.
        let mut plugged = only.clone();
        plugged.metadata.annotations.insert(
            krvirt_api::storage::HOTPLUG_ANNOTATION.into(),
            json!({"extra": "data"}).to_string(),
        );
        assert!(matches!(
            check_volumes(&plugged, &vols, &pools, &[], &[]),
            VolumeCheck::Refuse(m) if m.contains("hot-plugged")
        ));
    }
}
