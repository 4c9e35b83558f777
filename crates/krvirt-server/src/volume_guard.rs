//! In-use protection of `krvirt.io/v1` Volumes: deleting a Volume that a
//! VirtualMachine references (its template's `persistentVolumeClaim` /
//! `dataVolume` volumes) or that a VirtualMachineInstance uses (including
//! hot-plugged volumes) is refused with 409 Conflict naming the user,
//! unless that user is going away too (being deleted, or a VMI whose VM is
//! gone).

use serde_json::Value;

use crate::error::ApiError;
use crate::registry::Registry;
use crate::selector::Selector;

/// The Volumes an object's pod-spec-like `volumes` list names.
fn claims(volumes: &Value) -> Vec<&str> {
    volumes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            v.pointer("/persistentVolumeClaim/claimName")
                .or_else(|| v.pointer("/dataVolume/name"))
                .and_then(Value::as_str)
        })
        .collect()
}

fn name(o: &Value) -> &str {
    o.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn deleting(o: &Value) -> bool {
    o.pointer("/metadata/deletionTimestamp")
        .is_some_and(|t| !t.is_null())
}

/// Who keeps Volume `volume` from being deleted, given the namespace's VMs
/// and VMIs: `Some("VirtualMachine \"x\"")`, or `None` when nothing live
/// uses it.
pub fn volume_user(volume: &str, vms: &[Value], vmis: &[Value]) -> Option<String> {
    let live_vm = |n: &str| vms.iter().any(|vm| name(vm) == n && !deleting(vm));
    for vm in vms.iter().filter(|vm| !deleting(vm)) {
        if claims(&vm["spec"]["template"]["spec"]["volumes"]).contains(&volume) {
            return Some(format!("VirtualMachine {:?}", name(vm)));
        }
    }
    for vmi in vmis.iter().filter(|v| !deleting(v)) {
        let mut used = claims(&vmi["spec"]["volumes"]).contains(&volume);
        if let Some(hp) = vmi
            .pointer(&format!(
                "/metadata/annotations/{}",
                krvirt_api::storage::HOTPLUG_ANNOTATION.replace('/', "~1")
            ))
            .and_then(Value::as_str)
            && let Ok(map) = serde_json::from_str::<std::collections::BTreeMap<String, String>>(hp)
        {
            used |= map.values().any(|v| v == volume);
        }
        if !used {
            continue;
        }
        let owner = vmi["metadata"]["ownerReferences"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|o| o["kind"] == "VirtualMachine" && o["controller"] == true)
            .and_then(|o| o["name"].as_str());
        match owner {
            // Its VM is gone or going: the VMI goes with it.
            Some(vm) if !live_vm(vm) => continue,
            Some(vm) => return Some(format!("VirtualMachine {vm:?}")),
            None => return Some(format!("VirtualMachineInstance {:?}", name(vmi))),
        }
    }
    None
}

/// Refuse the deletion of Volume `ns/volume` while it is in use.
pub(crate) async fn check_delete(
    registry: &Registry,
    ns: &str,
    volume: &str,
) -> Result<(), ApiError> {
    let (Some(vm_kind), Some(vmi_kind)) = (
        krvirt_api::find_kind("virtualmachines"),
        krvirt_api::find_kind("virtualmachineinstances"),
    ) else {
        return Ok(());
    };
    let all = Selector::everything();
    let (vms, _) = registry.list(vm_kind, Some(ns), &all).await?;
    let (vmis, _) = registry.list(vmi_kind, Some(ns), &all).await?;
    match volume_user(volume, &vms, &vmis) {
        None => Ok(()),
        Some(user) => Err(ApiError::Conflict {
            group: "krvirt.io".into(),
            resource: "volumes".into(),
            name: volume.into(),
            message: format!(
                "Volume {volume:?} is in use by {user}: delete or change that first (or delete it together with the Volume)"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::volume_user;

    fn vm(name: &str, claim: &str, deleting: bool) -> serde_json::Value {
        let mut v = json!({"metadata": {"name": name}, "spec": {"template": {"spec": {"volumes": [
            {"name": "root", "containerDisk": {"image": "x"}},
            {"name": "data", "persistentVolumeClaim": {"claimName": claim}},
        ]}}}});
        if deleting {
            v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        v
    }

    fn vmi(name: &str, owner: Option<&str>, dv: &str, hotplug: Option<&str>) -> serde_json::Value {
        let mut v = json!({"metadata": {"name": name}, "spec": {"volumes": [
            {"name": "d", "dataVolume": {"name": dv}},
        ]}});
        if let Some(o) = owner {
            v["metadata"]["ownerReferences"] =
                json!([{"kind": "VirtualMachine", "name": o, "controller": true}]);
        }
        if let Some(h) = hotplug {
            v["metadata"]["annotations"] = json!({"krvirt.io/hotplug-volumes": h});
        }
        v
    }

    #[test]
    fn users_are_named_unless_going_away() {
        let vms = [vm("web", "data1", false), vm("old", "data2", true)];
        assert_eq!(
            volume_user("data1", &vms, &[]).as_deref(),
            Some("VirtualMachine \"web\"")
        );
        // The VM is being deleted: its Volume may go too.
        assert_eq!(volume_user("data2", &vms, &[]), None);
        assert_eq!(volume_user("other", &vms, &[]), None);
        // A running VMI of a live VM names the VM; of a deleted VM, nothing.
        let vmis = [
            vmi("web", Some("web"), "root1", None),
            vmi("gone", Some("gone"), "root2", None),
            vmi("solo", None, "root3", Some(r#"{"extra":"hp1"}"#)),
        ];
        assert_eq!(
            volume_user("root1", &vms, &vmis).as_deref(),
            Some("VirtualMachine \"web\"")
        );
        assert_eq!(volume_user("root2", &vms, &vmis), None);
        assert_eq!(
            volume_user("root3", &vms, &vmis).as_deref(),
            Some("VirtualMachineInstance \"solo\"")
        );
        assert_eq!(
            volume_user("hp1", &vms, &vmis).as_deref(),
            Some("VirtualMachineInstance \"solo\"")
        );
    }
}
