//! The served kinds and admission dispatch.

use serde_json::Value;

use crate::admission::{Causes, admit_typed, strip_bookkeeping};
use crate::clone::VirtualMachineClone;
use crate::error::reason;
use crate::event::Event;
use crate::host::Host;
use crate::image::Image;
use crate::kubevirt::{VirtualMachine, VirtualMachineInstance};
use crate::migration::{MigrationPolicy, VirtualMachineInstanceMigration};
use crate::network::{Network, SecurityGroup};
use crate::snapshot::{
    VirtualMachineRestore, VirtualMachineSnapshot, VirtualMachineSnapshotContent,
};
use crate::storage::{StoragePool, StorageVolume};
use crate::webhook::Webhook;
use crate::{KindInfo, ValidationError};

/// The registered kind named `kind` (a `KindInfo::kind` such as `Host`).
/// Looked up by name, never by position: kinds are added concurrently and
/// positions move. Only called with names of kinds this crate defines, which
/// `every_object_type_resolves_to_its_own_kind` holds to.
pub(crate) fn kind_named(kind: &str) -> &'static KindInfo {
    KINDS
        .iter()
        .find(|k| k.kind == kind)
        .expect("a kind this crate defines is registered in KINDS")
}

/// core `v1` Event (a named constant: its position in [`KINDS`] may move).
pub(crate) const EVENT_KIND: KindInfo = KindInfo {
    group: "",
    version: "v1",
    kind: "Event",
    plural: "events",
    singular: "event",
    short_names: &["ev"],
    namespaced: true,
    subresources: &[],
    schema_name: "Event",
};

/// `krvirt.io/v1` Webhook.
pub(crate) const WEBHOOK_KIND: KindInfo = KindInfo {
    group: "krvirt.io",
    version: "v1",
    kind: "Webhook",
    plural: "webhooks",
    singular: "webhook",
    short_names: &[],
    namespaced: true,
    subresources: &[],
    schema_name: "Webhook",
};

/// API group of instancetypes and preferences.
const INSTANCETYPE_GROUP: &str = "instancetype.kubevirt.io";

pub(crate) static KINDS: &[KindInfo] = &[
    KindInfo {
        group: "kubevirt.io",
        version: "v1",
        kind: "VirtualMachine",
        plural: "virtualmachines",
        singular: "virtualmachine",
        short_names: &["vm", "vms"],
        namespaced: true,
        subresources: &["start", "stop", "restart"],
        schema_name: "VirtualMachine",
    },
    KindInfo {
        group: "kubevirt.io",
        version: "v1",
        kind: "VirtualMachineInstance",
        plural: "virtualmachineinstances",
        singular: "virtualmachineinstance",
        short_names: &["vmi", "vmis"],
        namespaced: true,
        subresources: &["pause", "unpause", "console", "consolelog"],
        schema_name: "VirtualMachineInstance",
    },
    KindInfo {
        group: "snapshot.kubevirt.io",
        version: "v1beta1",
        kind: "VirtualMachineSnapshot",
        plural: "virtualmachinesnapshots",
        singular: "virtualmachinesnapshot",
        short_names: &["vmsnapshot", "vmsnapshots"],
        namespaced: true,
        subresources: &[],
        schema_name: "VirtualMachineSnapshot",
    },
    KindInfo {
        group: "snapshot.kubevirt.io",
        version: "v1beta1",
        kind: "VirtualMachineRestore",
        plural: "virtualmachinerestores",
        singular: "virtualmachinerestore",
        short_names: &["vmrestore", "vmrestores"],
        namespaced: true,
        subresources: &[],
        schema_name: "VirtualMachineRestore",
    },
    KindInfo {
        group: "snapshot.kubevirt.io",
        version: "v1beta1",
        kind: "VirtualMachineSnapshotContent",
        plural: "virtualmachinesnapshotcontents",
        singular: "virtualmachinesnapshotcontent",
        short_names: &["vmsnapshotcontent", "vmsnapshotcontents"],
        namespaced: true,
        subresources: &[],
        schema_name: "VirtualMachineSnapshotContent",
    },
    KindInfo {
        group: "krvirt.io",
        version: "v1",
        kind: "StoragePool",
        plural: "storagepools",
        singular: "storagepool",
        short_names: &["pool", "pools"],
        namespaced: false,
        subresources: &[],
        schema_name: "StoragePool",
    },
    KindInfo {
        group: "krvirt.io",
        version: "v1",
        kind: "Volume",
        plural: "volumes",
        singular: "volume",
        short_names: &["vol", "vols"],
        namespaced: true,
        subresources: &[],
        schema_name: "StorageVolume",
    },
    KindInfo {
        group: "krvirt.io",
        version: "v1",
        kind: "Host",
        plural: "hosts",
        singular: "host",
        short_names: &[],
        namespaced: false,
        subresources: &[],
        schema_name: "Host",
    },
    EVENT_KIND,
    WEBHOOK_KIND,
    KindInfo {
        group: "krvirt.io",
        version: "v1",
        kind: "Network",
        plural: "networks",
        singular: "network",
        short_names: &["net", "nets"],
        namespaced: false,
        subresources: &[],
        schema_name: "Network",
    },
    KindInfo {
        group: "krvirt.io",
        version: "v1",
        kind: "SecurityGroup",
        plural: "securitygroups",
        singular: "securitygroup",
        short_names: &["sg", "sgs"],
        namespaced: true,
        subresources: &[],
        schema_name: "SecurityGroup",
    },
    KindInfo {
        group: "krvirt.io",
        version: "v1",
        kind: "Image",
        plural: "images",
        singular: "image",
        short_names: &["img"],
        namespaced: false,
        subresources: &[],
        schema_name: "Image",
    },
    KindInfo {
        group: "kubevirt.io",
        version: "v1",
        kind: "VirtualMachineInstanceMigration",
        plural: "virtualmachineinstancemigrations",
        singular: "virtualmachineinstancemigration",
        short_names: &["vmim", "vmims"],
        namespaced: true,
        subresources: &[],
        schema_name: "VirtualMachineInstanceMigration",
    },
    KindInfo {
        group: "migrations.kubevirt.io",
        version: "v1alpha1",
        kind: "MigrationPolicy",
        plural: "migrationpolicies",
        singular: "migrationpolicy",
        short_names: &[],
        namespaced: false,
        subresources: &[],
        schema_name: "MigrationPolicy",
    },
    KindInfo {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        short_names: &["ns"],
        namespaced: false,
        subresources: &[],
        schema_name: "Namespace",
    },
    KindInfo {
        group: "",
        version: "v1",
        kind: "ResourceQuota",
        plural: "resourcequotas",
        singular: "resourcequota",
        short_names: &["quota"],
        namespaced: true,
        subresources: &[],
        schema_name: "ResourceQuota",
    },
    KindInfo {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "Role",
        plural: "roles",
        singular: "role",
        short_names: &[],
        namespaced: true,
        subresources: &[],
        schema_name: "Role",
    },
    KindInfo {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "ClusterRole",
        plural: "clusterroles",
        singular: "clusterrole",
        short_names: &[],
        namespaced: false,
        subresources: &[],
        schema_name: "ClusterRole",
    },
    KindInfo {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "RoleBinding",
        plural: "rolebindings",
        singular: "rolebinding",
        short_names: &[],
        namespaced: true,
        subresources: &[],
        schema_name: "RoleBinding",
    },
    KindInfo {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "ClusterRoleBinding",
        plural: "clusterrolebindings",
        singular: "clusterrolebinding",
        short_names: &[],
        namespaced: false,
        subresources: &[],
        schema_name: "ClusterRoleBinding",
    },
    KindInfo {
        group: "krvirt.io",
        version: "v1",
        kind: "Token",
        plural: "tokens",
        singular: "token",
        short_names: &[],
        namespaced: false,
        subresources: &[],
        schema_name: "Token",
    },
    KindInfo {
        group: "clone.kubevirt.io",
        version: "v1beta1",
        kind: "VirtualMachineClone",
        plural: "virtualmachineclones",
        singular: "virtualmachineclone",
        short_names: &["vmclone", "vmclones"],
        namespaced: true,
        subresources: &[],
        schema_name: "VirtualMachineClone",
    },
    KindInfo {
        group: "instancetype.kubevirt.io",
        version: "v1beta1",
        kind: "VirtualMachineInstancetype",
        plural: "virtualmachineinstancetypes",
        singular: "virtualmachineinstancetype",
        short_names: &["vminstancetype", "vminstancetypes", "vmf", "vmfs"],
        namespaced: true,
        subresources: &[],
        schema_name: "VirtualMachineInstancetype",
    },
    KindInfo {
        group: "instancetype.kubevirt.io",
        version: "v1beta1",
        kind: "VirtualMachineClusterInstancetype",
        plural: "virtualmachineclusterinstancetypes",
        singular: "virtualmachineclusterinstancetype",
        short_names: &[
            "vmclusterinstancetype",
            "vmclusterinstancetypes",
            "vmcf",
            "vmcfs",
        ],
        namespaced: false,
        subresources: &[],
        schema_name: "VirtualMachineClusterInstancetype",
    },
    KindInfo {
        group: "instancetype.kubevirt.io",
        version: "v1beta1",
        kind: "VirtualMachinePreference",
        plural: "virtualmachinepreferences",
        singular: "virtualmachinepreference",
        short_names: &["vmpref", "vmprefs", "vmp", "vmps"],
        namespaced: true,
        subresources: &[],
        schema_name: "VirtualMachinePreference",
    },
    KindInfo {
        group: "instancetype.kubevirt.io",
        version: "v1beta1",
        kind: "VirtualMachineClusterPreference",
        plural: "virtualmachineclusterpreferences",
        singular: "virtualmachineclusterpreference",
        short_names: &["vmclusterpref", "vmclusterprefs", "vmcp", "vmcps"],
        namespaced: false,
        subresources: &[],
        schema_name: "VirtualMachineClusterPreference",
    },
    KindInfo {
        group: "krvirt.io",
        version: "v1",
        kind: "Template",
        plural: "templates",
        singular: "template",
        short_names: &["tpl", "tpls"],
        namespaced: true,
        subresources: &[],
        schema_name: "Template",
    },
    KindInfo {
        group: "krvirt.io",
        version: "v1",
        kind: "TemplateInstance",
        plural: "templateinstances",
        singular: "templateinstance",
        short_names: &["ti"],
        namespaced: true,
        subresources: &[],
        schema_name: "TemplateInstance",
    },
];

/// Check (or fill in, when absent) `apiVersion` and `kind` against the
/// endpoint's kind.
fn type_meta(kind: &KindInfo, map: &mut serde_json::Map<String, Value>, c: &mut Causes) {
    let expected_av = kind.api_version();
    match map.get("apiVersion") {
        None | Some(Value::Null) => {
            map.insert("apiVersion".into(), Value::String(expected_av));
        }
        Some(Value::String(av)) if *av == expected_av => {}
        Some(other) => c.invalid(
            "apiVersion",
            format!(
                "apiVersion {other} does not match the endpoint: expected {expected_av:?} for kind {}",
                kind.kind
            ),
        ),
    }
    match map.get("kind") {
        None | Some(Value::Null) => {
            map.insert("kind".into(), Value::String(kind.kind.to_string()));
        }
        Some(Value::String(k)) if k == kind.kind => {}
        Some(other) => c.invalid(
            "kind",
            format!(
                "kind {other} does not match the endpoint's kind {:?}",
                kind.kind
            ),
        ),
    }
}

pub(crate) fn admit(
    kind: &KindInfo,
    obj: Value,
    old: Option<&Value>,
) -> Result<Value, ValidationError> {
    let Value::Object(mut map) = obj else {
        return Err(ValidationError::new(
            reason::INVALID,
            "",
            "the request body must be a JSON object",
        ));
    };
    let mut causes = Causes::default();
    type_meta(kind, &mut map, &mut causes);
    if !causes.is_empty() {
        return Err(ValidationError::from_causes(causes.0));
    }
    let obj = strip_bookkeeping(Value::Object(map));
    match (kind.group, kind.kind) {
        ("kubevirt.io", "VirtualMachine") => {
            let obj = crate::instancetype::carry_snapshots(obj, old);
            admit_typed::<VirtualMachine>(obj, old)
        }
        ("kubevirt.io", "VirtualMachineInstance") => {
            admit_typed::<VirtualMachineInstance>(obj, old)
        }
        ("snapshot.kubevirt.io", "VirtualMachineSnapshot") => {
            admit_typed::<VirtualMachineSnapshot>(obj, old)
        }
        ("snapshot.kubevirt.io", "VirtualMachineRestore") => {
            admit_typed::<VirtualMachineRestore>(obj, old)
        }
        ("snapshot.kubevirt.io", "VirtualMachineSnapshotContent") => {
            admit_typed::<VirtualMachineSnapshotContent>(obj, old)
        }
        ("clone.kubevirt.io", "VirtualMachineClone") => {
            admit_typed::<VirtualMachineClone>(obj, old)
        }
        ("krvirt.io", "StoragePool") => admit_typed::<StoragePool>(obj, old),
        ("krvirt.io", "Volume") => admit_typed::<StorageVolume>(obj, old),
        ("krvirt.io", "Host") => admit_typed::<Host>(obj, old),
        ("krvirt.io", "Image") => admit_typed::<Image>(obj, old),
        ("krvirt.io", "Network") => admit_typed::<Network>(obj, old),
        ("krvirt.io", "SecurityGroup") => admit_typed::<SecurityGroup>(obj, old),
        ("", "Event") => admit_typed::<Event>(obj, old),
        ("krvirt.io", "Webhook") => admit_typed::<Webhook>(obj, old),
        ("", "Namespace") => admit_typed::<crate::auth::Namespace>(obj, old),
        ("", "ResourceQuota") => admit_typed::<crate::auth::ResourceQuota>(obj, old),
        ("rbac.authorization.k8s.io", "Role") => admit_typed::<crate::auth::Role>(obj, old),
        ("rbac.authorization.k8s.io", "ClusterRole") => {
            admit_typed::<crate::auth::ClusterRole>(obj, old)
        }
        ("rbac.authorization.k8s.io", "RoleBinding") => {
            admit_typed::<crate::auth::RoleBinding>(obj, old)
        }
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => {
            admit_typed::<crate::auth::ClusterRoleBinding>(obj, old)
        }
        ("krvirt.io", "Token") => admit_typed::<crate::auth::Token>(obj, old),
        ("kubevirt.io", "VirtualMachineInstanceMigration") => {
            admit_typed::<VirtualMachineInstanceMigration>(obj, old)
        }
        ("migrations.kubevirt.io", "MigrationPolicy") => admit_typed::<MigrationPolicy>(obj, old),
        (INSTANCETYPE_GROUP, "VirtualMachineInstancetype") => {
            admit_typed::<crate::instancetype::VirtualMachineInstancetype>(obj, old)
        }
        (INSTANCETYPE_GROUP, "VirtualMachineClusterInstancetype") => {
            admit_typed::<crate::instancetype::VirtualMachineClusterInstancetype>(obj, old)
        }
        (INSTANCETYPE_GROUP, "VirtualMachinePreference") => {
            admit_typed::<crate::instancetype::VirtualMachinePreference>(obj, old)
        }
        (INSTANCETYPE_GROUP, "VirtualMachineClusterPreference") => {
            admit_typed::<crate::instancetype::VirtualMachineClusterPreference>(obj, old)
        }
        ("krvirt.io", "Template") => admit_typed::<crate::template::Template>(obj, old),
        ("krvirt.io", "TemplateInstance") => {
            admit_typed::<crate::template::TemplateInstance>(obj, old)
        }
        _ => Err(ValidationError::new(
            reason::NOT_SUPPORTED,
            "kind",
            format!("kind {:?} is not served by krvirt", kind.kind),
        )),
    }
}

/// Resolve an object's `apiVersion`/`kind` to a served kind.
pub(crate) fn kind_for_object(obj: &Value) -> Result<&'static KindInfo, ValidationError> {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if kind.is_empty() {
        return Err(ValidationError::new(
            reason::REQUIRED,
            "kind",
            "Required value",
        ));
    }
    let served = || KINDS.iter().map(|k| k.kind).collect::<Vec<_>>().join(", ");
    let Some(info) = KINDS.iter().find(|k| k.kind == kind) else {
        return Err(ValidationError::new(
            reason::NOT_SUPPORTED,
            "kind",
            format!(
                "kind {kind:?} ({}) is not served by krvirt (served: {})",
                if api_version.is_empty() {
                    "no apiVersion"
                } else {
                    api_version
                },
                served()
            ),
        ));
    };
    if api_version != info.api_version() {
        return Err(ValidationError::new(
            reason::NOT_SUPPORTED,
            "apiVersion",
            format!(
                "apiVersion {api_version:?} is not served for kind {kind}; use {:?}",
                info.api_version()
            ),
        ));
    }
    Ok(info)
}

#[cfg(test)]
mod kind_lookup_tests {
    use crate::meta::Object;

    #[test]
    fn every_object_type_resolves_to_its_own_kind() {
        assert_eq!(
            crate::kubevirt::VirtualMachine::kind_info().kind,
            "VirtualMachine"
        );
        assert_eq!(
            crate::kubevirt::VirtualMachineInstance::kind_info().kind,
            "VirtualMachineInstance"
        );
        assert_eq!(crate::host::Host::kind_info().kind, "Host");
    }
}
