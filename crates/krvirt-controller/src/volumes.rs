//! A VM's `dataVolumeTemplates` become `krvirt.io/v1` Volumes (KubeVirt
//! creates the DataVolumes of a VM the same way): each template's Volume is
//! created when missing, owned by the VM. The VM's VMI waits on the host
//! until its Volumes are provisioned. When the VM is deleted, the Volumes
//! it owns are deleted too (ownerReferences garbage collection).

use krvirt_api::find_kind;
use krvirt_api::kubevirt::VirtualMachine;
use krvirt_api::meta::OwnerReference;
use krvirt_api::storage::VOLUME_OWNER_VM_ANNOTATION;
use krvirt_server::{ApiError, Preconditions, Registry, Selector};
use tracing::{info, warn};

/// Create the missing Volumes of `vm`'s `dataVolumeTemplates`.
pub(crate) async fn ensure_templates(
    registry: &Registry,
    vm: &VirtualMachine,
) -> Result<(), ApiError> {
    if vm.spec.data_volume_templates.is_empty() {
        return Ok(());
    }
    let (Some(vol_kind), Some(pool_kind)) = (find_kind("volumes"), find_kind("storagepools"))
    else {
        return Ok(());
    };
    let ns = vm.metadata.namespace();
    for t in &vm.spec.data_volume_templates {
        let Ok(mut vol) = t.to_volume(ns) else {
            // Admission refuses templates that do not convert.
            continue;
        };
        let name = vol.metadata.name().to_string();
        match registry.get(vol_kind, ns, &name).await {
            Ok(_) => continue,
            Err(ApiError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        // storageClassName names a pool when one of that name exists;
        // KubeVirt manifests name Kubernetes storage classes (`local`)
        // that mean nothing here, so those land in the default pool.
        if let Some(pool) = vol.spec.pool.clone()
            && let Err(ApiError::NotFound { .. }) = registry.get(pool_kind, "", &pool).await
        {
            vol.spec.pool = None;
        }
        vol.metadata.owner_references.push(OwnerReference {
            api_version: "kubevirt.io/v1".into(),
            kind: "VirtualMachine".into(),
            name: vm.metadata.name().to_string(),
            uid: vm.metadata.uid.clone().unwrap_or_default(),
            controller: Some(false),
            block_owner_deletion: None,
        });
        vol.metadata.annotations.insert(
            VOLUME_OWNER_VM_ANNOTATION.to_string(),
            vm.metadata.name().to_string(),
        );
        let obj = match serde_json::to_value(&vol) {
            Ok(o) => o,
            Err(e) => {
                warn!(volume = %name, error = %e, "cannot encode Volume");
                continue;
            }
        };
        match registry.create(vol_kind, ns, obj).await {
            Ok(_) => {
                info!(vm = %vm.metadata.name(), volume = %name, "created Volume from dataVolumeTemplate")
            }
            Err(ApiError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Delete the Volumes owned by VirtualMachine `ns/vm`, which is gone.
pub(crate) async fn collect_orphans(
    registry: &Registry,
    ns: &str,
    vm: &str,
) -> Result<(), ApiError> {
    let Some(vol_kind) = find_kind("volumes") else {
        return Ok(());
    };
    let (vols, _) = registry
        .list(vol_kind, Some(ns), &Selector::everything())
        .await?;
    for v in vols {
        let owned = v["metadata"]["ownerReferences"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|o| o["kind"] == "VirtualMachine" && o["name"] == vm);
        let deleting = v
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|t| !t.is_null());
        let Some(name) = v["metadata"]["name"].as_str() else {
            continue;
        };
        if !owned || deleting {
            continue;
        }
        let pre = Preconditions {
            uid: v["metadata"]["uid"].as_str().map(str::to_string),
            resource_version: None,
        };
        match registry.delete(vol_kind, ns, name, &pre).await {
            Ok(_) => info!(%vm, volume = %name, "deleted Volume of deleted VM"),
            Err(ApiError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
