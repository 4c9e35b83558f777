//! One test per admission rule, asserting the reason and the exact field
//! path of the cause, plus defaulting and the OpenAPI components.

use krvirt_api::error::reason;
use krvirt_api::kubevirt::{self, VirtualMachine, VirtualMachineInstance};
use krvirt_api::{KindInfo, ValidationError, admit, find_kind};
use serde_json::{Value, json};

fn vm_kind() -> &'static KindInfo {
    find_kind("vm").expect("VirtualMachine is served")
}
fn vmi_kind() -> &'static KindInfo {
    find_kind("vmi").expect("VirtualMachineInstance is served")
}
fn host_kind() -> &'static KindInfo {
    find_kind("host").expect("Host is served")
}

/// A minimal valid VMI.
fn vmi() -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "t", "namespace": "ns"},
        "spec": {
            "domain": {
                "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                "memory": {"guest": "128Mi"}
            },
            "volumes": [{"name": "root", "containerDisk": {"image": "reg/img:1"}}]
        }
    })
}

/// A minimal valid VM wrapping the same template.
fn vm() -> Value {
    let spec = vmi()["spec"].clone();
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "t", "namespace": "ns"},
        "spec": {"runStrategy": "Always", "template": {"spec": spec}}
    })
}

/// Set the value at a JSON pointer, creating objects on the way.
fn set(mut v: Value, pointer: &str, value: Value) -> Value {
    let mut cur = &mut v;
    for part in pointer.trim_start_matches('/').split('/') {
        let part = part.replace("~1", "/").replace("~0", "~");
        let part = part.as_str();
        cur = match cur {
            Value::Array(a) => {
                let i: usize = part.parse().expect("array index");
                if i == a.len() {
                    a.push(Value::Null);
                }
                &mut a[i]
            }
            other => {
                if !other.is_object() {
                    *other = json!({});
                }
                other
                    .as_object_mut()
                    .expect("object")
                    .entry(part.to_string())
                    .or_insert(Value::Null)
            }
        };
    }
    *cur = value;
    v
}

fn remove(mut v: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer with a parent");
    if let Some(Value::Object(m)) = v.pointer_mut(parent) {
        m.remove(key);
    }
    v
}

fn refused(kind: &KindInfo, obj: Value) -> ValidationError {
    match admit(kind, obj, None) {
        Ok(v) => panic!("expected a refusal, admitted: {v:#}"),
        Err(e) => e,
    }
}

fn accepted(kind: &KindInfo, obj: Value) -> Value {
    admit(kind, obj, None).unwrap_or_else(|e| panic!("expected acceptance, refused: {e:?}"))
}

/// Assert that some cause has exactly this reason and field.
fn assert_cause(e: &ValidationError, reason: &str, field: &str) {
    assert!(
        e.causes
            .iter()
            .any(|c| c.reason == reason && c.field == field),
        "no {reason} cause at {field}; causes: {:#?}",
        e.causes
    );
}

fn vmi_cause(obj: Value, reason: &str, field: &str) {
    assert_cause(&refused(vmi_kind(), obj), reason, field);
}

// ---- structure: unknown and not-implemented fields -------------------------

#[test]
fn typo_is_unknown_field_with_full_path() {
    let e = refused(
        vmi_kind(),
        set(vmi(), "/spec/domain/devices/gpuss", json!([])),
    );
    assert_eq!(e.causes.len(), 1);
    assert_cause(&e, reason::UNKNOWN, "spec.domain.devices.gpuss");
    assert!(e.causes[0].message.contains("unknown field"), "{e}");
}

#[test]
fn kubevirt_field_is_not_implemented_with_full_path() {
    let e = refused(
        vmi_kind(),
        set(
            vmi(),
            "/spec/domain/devices/gpus",
            json!([{"name": "g", "deviceName": "x"}]),
        ),
    );
    assert_cause(&e, reason::NOT_SUPPORTED, "spec.domain.devices.gpus");
    assert_eq!(e.causes[0].message, krvirt_api::NOT_IMPLEMENTED);
}

#[test]
fn vm_template_paths_are_prefixed() {
    let e = refused(
        vm_kind(),
        set(vm(), "/spec/template/spec/domain/devices/gpus", json!([])),
    );
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        "spec.template.spec.domain.devices.gpus",
    );
    let e = refused(
        vm_kind(),
        set(
            vm(),
            "/spec/instancetype",
            json!({"name": "csmall", "inferFromVolume": "root"}),
        ),
    );
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        "spec.instancetype.inferFromVolume",
    );
    let e = refused(
        vm_kind(),
        set(
            vm(),
            "/spec/dataVolumeTemplates",
            json!([{"metadata": {"name": "d"}, "spec": {"source": {"blank": {}},
                "pvc": {"resources": {"requests": {"storage": "1Gi"}}, "dataSource": {}}}}]),
        ),
    );
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        "spec.dataVolumeTemplates[0].spec.pvc.dataSource",
    );
}

#[test]
fn list_entries_have_indices() {
    let obj = set(
        vmi(),
        "/spec/volumes/0/hostDisk",
        json!({"path": "/x", "type": "Disk"}),
    );
    let obj = set(obj, "/spec/domain/devices/disks/0/lun", json!({}));
    let obj = set(
        obj,
        "/spec/domain/devices/interfaces",
        json!([{"name": "default", "sriov": {}}]),
    );
    let obj = set(
        obj,
        "/spec/networks",
        json!([{"name": "default", "pod": {"vmIPv6NetworkCIDR": "fd10:0:2::/120"}}]),
    );
    let e = refused(vmi_kind(), obj);
    assert_cause(&e, reason::NOT_SUPPORTED, "spec.volumes[0].hostDisk");
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        "spec.domain.devices.disks[0].lun",
    );
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        "spec.domain.devices.interfaces[0].sriov",
    );
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        "spec.networks[0].pod.vmIPv6NetworkCIDR",
    );
    assert_eq!(e.causes.len(), 4, "{e:#?}");
}

#[test]
fn every_unknown_field_is_reported_at_once() {
    let obj = set(vmi(), "/spec/domain/efi", json!({}));
    let obj = set(obj, "/spec/domain/firmware/bootloader/efi", json!({}));
    let obj = set(obj, "/spec/foo", json!(1));
    let e = refused(vmi_kind(), obj);
    assert_cause(&e, reason::UNKNOWN, "spec.domain.efi");
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        "spec.domain.firmware.bootloader.efi",
    );
    assert_cause(&e, reason::UNKNOWN, "spec.foo");
    assert_eq!(e.causes.len(), 3);
}

#[test]
fn metadata_bookkeeping_is_dropped_other_fields_refused() {
    let obj = set(
        vmi(),
        "/metadata/managedFields",
        json!([{"manager": "kubectl"}]),
    );
    let obj = set(obj, "/metadata/selfLink", json!("/apis/x"));
    let out = accepted(vmi_kind(), obj);
    assert!(out["metadata"].get("managedFields").is_none());
    assert!(out["metadata"].get("selfLink").is_none());

    let vm_obj = set(vm(), "/spec/template/metadata/managedFields", json!([]));
    accepted(vm_kind(), vm_obj);

    vmi_cause(
        set(vmi(), "/metadata/clusterName", json!("x")),
        reason::UNKNOWN,
        "metadata.clusterName",
    );
}

#[test]
fn wrong_types_and_enum_values() {
    vmi_cause(
        set(vmi(), "/spec/domain/cpu/cores", json!("two")),
        reason::INVALID,
        "spec.domain.cpu.cores",
    );
    let e = refused(
        vm_kind(),
        set(vm(), "/spec/runStrategy", json!("Sometimes")),
    );
    assert_cause(&e, reason::NOT_SUPPORTED, "spec.runStrategy");
    vmi_cause(
        set(vmi(), "/spec/domain/devices/disks/0/disk/bus", json!("ide")),
        reason::NOT_SUPPORTED,
        "spec.domain.devices.disks[0].disk.bus",
    );
}

#[test]
fn missing_template_is_required() {
    let e = refused(vm_kind(), remove(vm(), "/spec/template"));
    assert_cause(&e, reason::REQUIRED, "spec.template");
}

#[test]
fn body_must_be_an_object() {
    let e = refused(vmi_kind(), json!([1, 2]));
    assert_eq!(e.causes[0].reason, reason::INVALID);
}

// ---- type meta and metadata -------------------------------------------------

#[test]
fn api_version_and_kind_must_match_the_endpoint() {
    let e = refused(
        vmi_kind(),
        set(vmi(), "/apiVersion", json!("kubevirt.io/v1alpha3")),
    );
    assert_cause(&e, reason::INVALID, "apiVersion");
    let e = refused(vmi_kind(), set(vmi(), "/kind", json!("VirtualMachine")));
    assert_cause(&e, reason::INVALID, "kind");
    let out = accepted(vmi_kind(), remove(remove(vmi(), "/apiVersion"), "/kind"));
    assert_eq!(out["apiVersion"], "kubevirt.io/v1");
    assert_eq!(out["kind"], "VirtualMachineInstance");
}

#[test]
fn kind_for_object_names_kind_or_api_version() {
    let e = krvirt_api::kind_for_object(&json!({"apiVersion": "v1", "kind": "Pod"}))
        .expect_err("Pod is not served");
    assert_cause(&e, reason::NOT_SUPPORTED, "kind");
    let e = krvirt_api::kind_for_object(
        &json!({"apiVersion": "kubevirt.io/v1alpha3", "kind": "VirtualMachine"}),
    )
    .expect_err("old version");
    assert_cause(&e, reason::NOT_SUPPORTED, "apiVersion");
    let e =
        krvirt_api::kind_for_object(&json!({"apiVersion": "kubevirt.io/v1"})).expect_err("no kind");
    assert_cause(&e, reason::REQUIRED, "kind");
    let k = krvirt_api::kind_for_object(&vm()).expect("served");
    assert_eq!(k.kind, "VirtualMachine");
}

#[test]
fn name_rules() {
    vmi_cause(
        set(vmi(), "/metadata/name", json!("Bad_Name")),
        reason::INVALID,
        "metadata.name",
    );
    vmi_cause(
        set(vmi(), "/metadata/name", json!("a".repeat(64))),
        reason::INVALID,
        "metadata.name",
    );
    vmi_cause(
        remove(vmi(), "/metadata/name"),
        reason::REQUIRED,
        "metadata.name",
    );
    let obj = set(
        remove(vmi(), "/metadata/name"),
        "/metadata/generateName",
        json!("t-"),
    );
    let out = accepted(vmi_kind(), obj);
    assert!(
        out["spec"]["domain"]["firmware"].get("uuid").is_none(),
        "no firmware UUID before the server picks the name"
    );
    vmi_cause(
        set(
            remove(vmi(), "/metadata/name"),
            "/metadata/generateName",
            json!("-t"),
        ),
        reason::INVALID,
        "metadata.generateName",
    );
    vmi_cause(
        set(vmi(), "/metadata/namespace", json!("NS")),
        reason::INVALID,
        "metadata.namespace",
    );
    let dotted = accepted(vmi_kind(), set(vmi(), "/metadata/name", json!("a.b-c")));
    assert_eq!(dotted["metadata"]["name"], "a.b-c");
}

#[test]
fn labels_and_annotations_rules() {
    vmi_cause(
        set(vmi(), "/metadata/labels", json!({"bad key": "v"})),
        reason::INVALID,
        "metadata.labels[bad key]",
    );
    vmi_cause(
        set(vmi(), "/metadata/labels", json!({"k": "bad value"})),
        reason::INVALID,
        "metadata.labels[k]",
    );
    vmi_cause(
        set(
            vmi(),
            "/metadata/annotations",
            json!({"hooks.kubevirt.io/hookSidecars": "[]"}),
        ),
        reason::NOT_SUPPORTED,
        "metadata.annotations[hooks.kubevirt.io/hookSidecars]",
    );
    let e = refused(
        vm_kind(),
        set(
            vm(),
            "/spec/template/metadata/labels",
            json!({"k": "bad value"}),
        ),
    );
    assert_cause(&e, reason::INVALID, "spec.template.metadata.labels[k]");
    vmi_cause(
        set(vmi(), "/spec/nodeSelector", json!({"k": "bad value"})),
        reason::INVALID,
        "spec.nodeSelector[k]",
    );
    vmi_cause(
        set(
            vmi(),
            "/metadata/ownerReferences",
            json!([{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "t", "uid": ""}]),
        ),
        reason::REQUIRED,
        "metadata.ownerReferences[0].uid",
    );
}

// ---- VirtualMachine rules ---------------------------------------------------

#[test]
fn running_and_run_strategy_are_exclusive() {
    let e = refused(vm_kind(), set(vm(), "/spec/running", json!(true)));
    assert_cause(&e, reason::INVALID, "spec.running");
    assert_eq!(
        e.causes[0].message,
        "Running and RunStrategy are mutually exclusive"
    );
}

#[test]
fn run_strategy_defaults_to_halted() {
    let out = accepted(vm_kind(), remove(vm(), "/spec/runStrategy"));
    assert_eq!(out["spec"]["runStrategy"], "Halted");
    let out = accepted(
        vm_kind(),
        set(
            remove(vm(), "/spec/runStrategy"),
            "/spec/running",
            json!(true),
        ),
    );
    assert_eq!(out["spec"]["running"], true);
    assert!(out["spec"].get("runStrategy").is_none());
    let typed: VirtualMachine = serde_json::from_value(out).expect("typed");
    assert_eq!(
        typed.spec.effective_run_strategy(),
        kubevirt::RunStrategy::Always
    );
}

// ---- disks and volumes ------------------------------------------------------

#[test]
fn disk_names_unique_and_volume_used_once() {
    let obj = set(
        vmi(),
        "/spec/domain/devices/disks",
        json!([{"name": "root"}, {"name": "root", "cdrom": {}}]),
    );
    vmi_cause(obj, reason::DUPLICATE, "spec.domain.devices.disks[1].name");
}

#[test]
fn disk_needs_a_volume() {
    let obj = set(
        vmi(),
        "/spec/domain/devices/disks",
        json!([{"name": "root"}, {"name": "orphan"}]),
    );
    let e = refused(vmi_kind(), obj);
    assert_cause(&e, reason::INVALID, "spec.domain.devices.disks[1].name");
    assert!(e.causes[0].message.contains("'orphan' not found"), "{e}");
}

#[test]
fn disk_name_must_be_dns_label() {
    let obj = set(vmi(), "/spec/domain/devices/disks/0/name", json!("Root"));
    let obj = set(obj, "/spec/volumes/0/name", json!("Root"));
    let e = refused(vmi_kind(), obj);
    assert_cause(&e, reason::INVALID, "spec.domain.devices.disks[0].name");
    assert_cause(&e, reason::INVALID, "spec.volumes[0].name");
}

#[test]
fn volume_names_unique_and_one_source() {
    let obj = set(
        vmi(),
        "/spec/volumes",
        json!([
            {"name": "root", "containerDisk": {"image": "a:1"}},
            {"name": "root", "emptyDisk": {"capacity": "1Gi"}},
            {"name": "none"},
            {"name": "two", "emptyDisk": {"capacity": "1Gi"}, "containerDisk": {"image": "a:1"}}
        ]),
    );
    let e = refused(vmi_kind(), obj);
    assert_cause(&e, reason::DUPLICATE, "spec.volumes[1].name");
    assert_cause(&e, reason::INVALID, "spec.volumes[2]");
    assert_cause(&e, reason::INVALID, "spec.volumes[3]");
}

#[test]
fn volume_without_disk_gets_a_default_disk() {
    let obj = set(
        vmi(),
        "/spec/volumes/1",
        json!({"name": "scratch", "emptyDisk": {"capacity": "1Gi"}}),
    );
    let out = accepted(vmi_kind(), obj);
    assert_eq!(
        out["spec"]["domain"]["devices"]["disks"][1],
        json!({"name": "scratch", "disk": {"bus": "virtio"}})
    );
}

#[test]
fn container_disk_image_required_and_path_absolute() {
    vmi_cause(
        set(vmi(), "/spec/volumes/0/containerDisk/image", json!("")),
        reason::REQUIRED,
        "spec.volumes[0].containerDisk.image",
    );
    vmi_cause(
        remove(vmi(), "/spec/volumes/0/containerDisk/image"),
        reason::REQUIRED,
        "spec.volumes[0].containerDisk.image",
    );
    vmi_cause(
        set(
            vmi(),
            "/spec/volumes/0/containerDisk/path",
            json!("disk/../x"),
        ),
        reason::INVALID,
        "spec.volumes[0].containerDisk.path",
    );
}

#[test]
fn empty_disk_capacity_required_and_parsable() {
    let with_empty = |cap: Value| {
        set(
            vmi(),
            "/spec/volumes/1",
            json!({"name": "scratch", "emptyDisk": {"capacity": cap}}),
        )
    };
    vmi_cause(
        set(
            vmi(),
            "/spec/volumes/1",
            json!({"name": "scratch", "emptyDisk": {}}),
        ),
        reason::REQUIRED,
        "spec.volumes[1].emptyDisk.capacity",
    );
    vmi_cause(
        with_empty(json!("2Gx")),
        reason::INVALID,
        "spec.volumes[1].emptyDisk.capacity",
    );
    vmi_cause(
        with_empty(json!("0")),
        reason::INVALID,
        "spec.volumes[1].emptyDisk.capacity",
    );
    accepted(vmi_kind(), with_empty(json!("2Gi")));
}

#[test]
fn cloud_init_no_cloud_rules() {
    let with_ci = |ci: Value| {
        set(
            vmi(),
            "/spec/volumes/1",
            json!({"name": "ci", "cloudInitNoCloud": ci}),
        )
    };
    vmi_cause(
        with_ci(json!({"networkData": "version: 2"})),
        reason::REQUIRED,
        "spec.volumes[1].cloudInitNoCloud",
    );
    vmi_cause(
        with_ci(json!({"userDataBase64": "not base64!"})),
        reason::INVALID,
        "spec.volumes[1].cloudInitNoCloud.userDataBase64",
    );
    vmi_cause(
        with_ci(json!({"userData": "x", "userDataBase64": "eA=="})),
        reason::INVALID,
        "spec.volumes[1].cloudInitNoCloud",
    );
    vmi_cause(
        with_ci(json!({"userData": "x", "networkData": "a", "networkDataBase64": "YQ=="})),
        reason::INVALID,
        "spec.volumes[1].cloudInitNoCloud",
    );
    vmi_cause(
        with_ci(json!({"userData": "x", "networkDataBase64": "Y"})),
        reason::INVALID,
        "spec.volumes[1].cloudInitNoCloud.networkDataBase64",
    );
    vmi_cause(
        with_ci(json!({"userData": "x", "secretRef": {"name": "s"}})),
        reason::NOT_SUPPORTED,
        "spec.volumes[1].cloudInitNoCloud.secretRef",
    );
    let out = accepted(
        vmi_kind(),
        with_ci(json!({"userDataBase64": "I2Nsb3VkLWNvbmZpZw=="})),
    );
    let typed: VirtualMachineInstance = serde_json::from_value(out).expect("typed");
    let ci = typed.spec.volumes[1]
        .cloud_init_no_cloud
        .as_ref()
        .expect("cloud-init");
    assert_eq!(
        ci.user_data_bytes().expect("valid").as_deref(),
        Some(&b"#cloud-config"[..])
    );
}

#[test]
fn disk_bus_rules() {
    vmi_cause(
        set(
            vmi(),
            "/spec/domain/devices/disks/0/disk/bus",
            json!("scsi"),
        ),
        reason::NOT_SUPPORTED,
        "spec.domain.devices.disks[0].disk.bus",
    );
    vmi_cause(
        set(
            vmi(),
            "/spec/domain/devices/disks/0/disk",
            json!({"bus": "sata", "readonly": true}),
        ),
        reason::INVALID,
        "spec.domain.devices.disks[0].disk.bus",
    );
    let cd = |target: Value| {
        set(
            remove(vmi(), "/spec/domain/devices/disks/0/disk"),
            "/spec/domain/devices/disks/0/cdrom",
            target,
        )
    };
    vmi_cause(
        cd(json!({"bus": "virtio"})),
        reason::INVALID,
        "spec.domain.devices.disks[0].cdrom.bus",
    );
    vmi_cause(
        cd(json!({"tray": "open"})),
        reason::NOT_SUPPORTED,
        "spec.domain.devices.disks[0].cdrom.tray",
    );
    vmi_cause(
        set(vmi(), "/spec/domain/devices/disks/0/cdrom", json!({})),
        reason::INVALID,
        "spec.domain.devices.disks[0]",
    );
    let out = accepted(vmi_kind(), cd(json!({})));
    assert_eq!(
        out["spec"]["domain"]["devices"]["disks"][0]["cdrom"],
        json!({"bus": "sata", "readonly": true, "tray": "closed"})
    );
    accepted(
        vmi_kind(),
        set(
            vmi(),
            "/spec/domain/devices/disks/0/disk/bus",
            json!("sata"),
        ),
    );
}

#[test]
fn disk_serial_and_cache() {
    vmi_cause(
        set(
            vmi(),
            "/spec/domain/devices/disks/0/serial",
            json!("bad serial"),
        ),
        reason::INVALID,
        "spec.domain.devices.disks[0].serial",
    );
    vmi_cause(
        set(
            vmi(),
            "/spec/domain/devices/disks/0/cache",
            json!("directsync"),
        ),
        reason::NOT_SUPPORTED,
        "spec.domain.devices.disks[0].cache",
    );
    accepted(
        vmi_kind(),
        set(
            set(
                vmi(),
                "/spec/domain/devices/disks/0/cache",
                json!("writeback"),
            ),
            "/spec/domain/devices/disks/0/serial",
            json!("ABC-1.2"),
        ),
    );
}

#[test]
fn boot_order_rules() {
    vmi_cause(
        set(vmi(), "/spec/domain/devices/disks/0/bootOrder", json!(0)),
        reason::INVALID,
        "spec.domain.devices.disks[0].bootOrder",
    );
    let obj = set(vmi(), "/spec/domain/devices/disks/0/bootOrder", json!(1));
    let obj = set(
        obj,
        "/spec/domain/devices/interfaces",
        json!([{"name": "default", "bootOrder": 1}]),
    );
    let obj = set(
        obj,
        "/spec/networks",
        json!([{"name": "default", "pod": {}}]),
    );
    vmi_cause(
        obj,
        reason::INVALID,
        "spec.domain.devices.interfaces[0].bootOrder",
    );
}

// ---- interfaces and networks ------------------------------------------------

fn with_net(interfaces: Value, networks: Value) -> Value {
    set(
        set(vmi(), "/spec/domain/devices/interfaces", interfaces),
        "/spec/networks",
        networks,
    )
}

#[test]
fn interfaces_and_networks_match_one_to_one() {
    vmi_cause(
        with_net(
            json!([{"name": "a", "masquerade": {}}]),
            json!([{"name": "b", "pod": {}}]),
        ),
        reason::INVALID,
        "spec.domain.devices.interfaces[0].name",
    );
    vmi_cause(
        with_net(
            json!([{"name": "a", "masquerade": {}}]),
            json!([{"name": "b", "pod": {}}]),
        ),
        reason::REQUIRED,
        "spec.networks[0].name",
    );
    vmi_cause(
        with_net(json!([]), json!([{"name": "b", "pod": {}}])),
        reason::REQUIRED,
        "spec.networks[0].name",
    );
    vmi_cause(
        with_net(
            json!([{"name": "a"}, {"name": "a"}]),
            json!([{"name": "a", "pod": {}}]),
        ),
        reason::DUPLICATE,
        "spec.domain.devices.interfaces[1].name",
    );
    vmi_cause(
        with_net(
            json!([{"name": "a"}]),
            json!([{"name": "a", "pod": {}}, {"name": "a", "pod": {}}]),
        ),
        reason::DUPLICATE,
        "spec.networks[1].name",
    );
    vmi_cause(
        with_net(
            json!([{"name": "a b"}]),
            json!([{"name": "a b", "pod": {}}]),
        ),
        reason::INVALID,
        "spec.domain.devices.interfaces[0].name",
    );
    vmi_cause(
        with_net(json!([{"name": "a"}]), json!([{"name": "a"}])),
        reason::REQUIRED,
        "spec.networks[0]",
    );
}

#[test]
fn at_most_one_pod_network() {
    vmi_cause(
        with_net(
            json!([{"name": "a"}, {"name": "b"}]),
            json!([{"name": "a", "pod": {}}, {"name": "b", "pod": {}}]),
        ),
        reason::INVALID,
        "spec.networks",
    );
}

#[test]
fn vm_network_cidr_rules() {
    vmi_cause(
        with_net(
            json!([{"name": "a"}]),
            json!([{"name": "a", "pod": {"vmNetworkCIDR": "10.0.2.0"}}]),
        ),
        reason::INVALID,
        "spec.networks[0].pod.vmNetworkCIDR",
    );
    vmi_cause(
        with_net(
            json!([{"name": "a"}]),
            json!([{"name": "a", "pod": {"vmNetworkCIDR": "10.0.2.0/31"}}]),
        ),
        reason::INVALID,
        "spec.networks[0].pod.vmNetworkCIDR",
    );
    accepted(
        vmi_kind(),
        with_net(
            json!([{"name": "a"}]),
            json!([{"name": "a", "pod": {"vmNetworkCIDR": "10.1.0.0/24"}}]),
        ),
    );
}

#[test]
fn mac_address_format() {
    let with_mac = |mac: &str| {
        with_net(
            json!([{"name": "a", "macAddress": mac}]),
            json!([{"name": "a", "pod": {}}]),
        )
    };
    vmi_cause(
        with_mac("de:ad:00:00:be"),
        reason::INVALID,
        "spec.domain.devices.interfaces[0].macAddress",
    );
    vmi_cause(
        with_mac("zz:ad:00:00:be:af"),
        reason::INVALID,
        "spec.domain.devices.interfaces[0].macAddress",
    );
    vmi_cause(
        with_mac("01:00:5e:00:00:01"),
        reason::INVALID,
        "spec.domain.devices.interfaces[0].macAddress",
    );
    accepted(vmi_kind(), with_mac("de:ad:00:00:be:af"));
    accepted(vmi_kind(), with_mac("DE-AD-00-00-BE-AF"));
}

#[test]
fn port_rules() {
    let with_ports = |ports: Value| {
        with_net(
            json!([{"name": "a", "ports": ports}]),
            json!([{"name": "a", "pod": {}}]),
        )
    };
    vmi_cause(
        with_ports(json!([{"name": "http"}])),
        reason::REQUIRED,
        "spec.domain.devices.interfaces[0].ports[0]",
    );
    vmi_cause(
        with_ports(json!([{"port": 70000}])),
        reason::INVALID,
        "spec.domain.devices.interfaces[0].ports[0]",
    );
    vmi_cause(
        with_ports(json!([{"port": -1}])),
        reason::INVALID,
        "spec.domain.devices.interfaces[0].ports[0]",
    );
    vmi_cause(
        with_ports(json!([{"port": 80, "name": "HTTP!"}])),
        reason::INVALID,
        "spec.domain.devices.interfaces[0].ports[0].name",
    );
    vmi_cause(
        with_ports(json!([{"port": 80, "name": "http"}, {"port": 81, "name": "http"}])),
        reason::DUPLICATE,
        "spec.domain.devices.interfaces[0].ports[1].name",
    );
    vmi_cause(
        with_ports(json!([{"port": 80, "protocol": "SCTP"}])),
        reason::NOT_SUPPORTED,
        "spec.domain.devices.interfaces[0].ports[0].protocol",
    );
    let out = accepted(
        vmi_kind(),
        with_ports(json!([{"port": 80, "name": "http"}])),
    );
    assert_eq!(
        out["spec"]["domain"]["devices"]["interfaces"][0]["ports"][0],
        json!({"name": "http", "port": 80, "protocol": "TCP"})
    );
}

#[test]
fn bridge_binding_and_multus_networks() {
    // Bridge binding on a multus network and on the pod network; the
    // bridge interface gets no masquerade default.
    let out = accepted(
        vmi_kind(),
        with_net(
            json!([{"name": "a", "bridge": {}, "model": "e1000", "macAddress": "02:00:00:00:00:01"},
                   {"name": "b", "bridge": {}}]),
            json!([{"name": "a", "multus": {"networkName": "ns1/blue"}},
                   {"name": "b", "pod": {}}]),
        ),
    );
    let ifaces = &out["spec"]["domain"]["devices"]["interfaces"];
    assert!(ifaces[0].get("masquerade").is_none(), "{ifaces}");
    assert_eq!(ifaces[1]["model"], "virtio");
    // Masquerade only on the pod network.
    vmi_cause(
        with_net(
            json!([{"name": "a", "masquerade": {}}]),
            json!([{"name": "a", "multus": {"networkName": "blue"}}]),
        ),
        reason::INVALID,
        "spec.domain.devices.interfaces[0].masquerade",
    );
    // One binding per interface, one type per network, a valid name.
    vmi_cause(
        with_net(
            json!([{"name": "a", "masquerade": {}, "bridge": {}}]),
            json!([{"name": "a", "pod": {}}]),
        ),
        reason::INVALID,
        "spec.domain.devices.interfaces[0]",
    );
    vmi_cause(
        with_net(
            json!([{"name": "a", "bridge": {}}]),
            json!([{"name": "a", "pod": {}, "multus": {"networkName": "blue"}}]),
        ),
        reason::INVALID,
        "spec.networks[0]",
    );
    // Only the network controller assigns addresses.
    let forged = set(
        with_net(
            json!([{"name": "a", "bridge": {}}]),
            json!([{"name": "a", "multus": {"networkName": "blue"}}]),
        ),
        "/metadata/annotations",
        json!({"krvirt.io/interfaces": "[]"}),
    );
    vmi_cause(
        forged,
        reason::FORBIDDEN,
        "metadata.annotations[krvirt.io/interfaces]",
    );
    for bad in ["", "Blue", "a/b/c", "ns/"] {
        vmi_cause(
            with_net(
                json!([{"name": "a", "bridge": {}}]),
                json!([{"name": "a", "multus": {"networkName": bad}}]),
            ),
            if bad.is_empty() {
                reason::REQUIRED
            } else {
                reason::INVALID
            },
            "spec.networks[0].multus.networkName",
        );
    }
}

// ---- memory, cpu, machine, firmware ----------------------------------------

#[test]
fn memory_required() {
    let e = refused(vmi_kind(), remove(vmi(), "/spec/domain/memory"));
    assert_cause(&e, reason::REQUIRED, "spec.domain.memory.guest");
    let e = refused(vm_kind(), remove(vm(), "/spec/template/spec/domain/memory"));
    assert_cause(
        &e,
        reason::REQUIRED,
        "spec.template.spec.domain.memory.guest",
    );
}

#[test]
fn memory_guest_defaults_from_requests() {
    let obj = set(
        remove(vmi(), "/spec/domain/memory"),
        "/spec/domain/resources/requests/memory",
        json!("256Mi"),
    );
    let out = accepted(vmi_kind(), obj);
    assert_eq!(out["spec"]["domain"]["memory"]["guest"], "256Mi");
}

#[test]
fn memory_values() {
    vmi_cause(
        set(vmi(), "/spec/domain/memory/guest", json!("lots")),
        reason::INVALID,
        "spec.domain.memory.guest",
    );
    vmi_cause(
        set(vmi(), "/spec/domain/memory/guest", json!("512Ki")),
        reason::INVALID,
        "spec.domain.memory.guest",
    );
    vmi_cause(
        set(vmi(), "/spec/domain/resources/limits/memory", json!("64Mi")),
        reason::INVALID,
        "spec.domain.memory.guest",
    );
    let obj = set(
        vmi(),
        "/spec/domain/resources/requests/memory",
        json!("256Mi"),
    );
    let obj = set(obj, "/spec/domain/resources/limits/memory", json!("200Mi"));
    vmi_cause(
        obj,
        reason::INVALID,
        "spec.domain.resources.requests.memory",
    );
    vmi_cause(
        set(
            remove(vmi(), "/spec/domain/memory"),
            "/spec/domain/resources/requests/memory",
            json!("x"),
        ),
        reason::INVALID,
        "spec.domain.resources.requests.memory",
    );
    let out = accepted(
        vmi_kind(),
        set(vmi(), "/spec/domain/memory/guest", json!(134217728)),
    );
    assert_eq!(out["spec"]["domain"]["memory"]["guest"], "134217728");
}

#[test]
fn cpu_resources() {
    vmi_cause(
        set(vmi(), "/spec/domain/resources/requests/cpu", json!("0")),
        reason::INVALID,
        "spec.domain.resources.requests.cpu",
    );
    let obj = set(vmi(), "/spec/domain/resources/requests/cpu", json!("2"));
    let obj = set(obj, "/spec/domain/resources/limits/cpu", json!("1"));
    vmi_cause(obj, reason::INVALID, "spec.domain.resources.requests.cpu");
    vmi_cause(
        set(
            vmi(),
            "/spec/domain/resources/requests/nvidia.com~1gpu",
            json!("1"),
        ),
        reason::NOT_SUPPORTED,
        "spec.domain.resources.requests[nvidia.com/gpu]",
    );
    let out = accepted(
        vmi_kind(),
        set(vmi(), "/spec/domain/resources/limits/cpu", json!("1500m")),
    );
    assert_eq!(
        out["spec"]["domain"]["cpu"],
        json!({"sockets": 2, "cores": 1, "threads": 1})
    );
}

#[test]
fn cpu_topology_rules() {
    vmi_cause(
        set(vmi(), "/spec/domain/cpu/cores", json!(0)),
        reason::INVALID,
        "spec.domain.cpu.cores",
    );
    vmi_cause(
        set(vmi(), "/spec/domain/cpu/threads", json!(0)),
        reason::INVALID,
        "spec.domain.cpu.threads",
    );
    vmi_cause(
        set(vmi(), "/spec/domain/cpu/sockets", json!(0)),
        reason::INVALID,
        "spec.domain.cpu.sockets",
    );
    vmi_cause(
        set(
            vmi(),
            "/spec/domain/cpu",
            json!({"sockets": 4, "cores": 100}),
        ),
        reason::INVALID,
        "spec.domain.cpu",
    );
    accepted(
        vmi_kind(),
        set(vmi(), "/spec/domain/cpu/dedicatedCpuPlacement", json!(true)),
    );
    vmi_cause(
        set(vmi(), "/spec/domain/cpu/isolateEmulatorThread", json!(true)),
        reason::NOT_SUPPORTED,
        "spec.domain.cpu.isolateEmulatorThread",
    );
    vmi_cause(
        set(vmi(), "/spec/domain/cpu/model", json!("host passthrough")),
        reason::INVALID,
        "spec.domain.cpu.model",
    );
    accepted(
        vmi_kind(),
        set(
            vmi(),
            "/spec/domain/cpu/dedicatedCpuPlacement",
            json!(false),
        ),
    );
    accepted(
        vmi_kind(),
        set(vmi(), "/spec/domain/cpu/model", json!("host-passthrough")),
    );
}

#[test]
fn machine_type() {
    vmi_cause(
        set(vmi(), "/spec/domain/machine/type", json!("pc")),
        reason::NOT_SUPPORTED,
        "spec.domain.machine.type",
    );
    accepted(
        vmi_kind(),
        set(vmi(), "/spec/domain/machine/type", json!("pc-q35-7.2")),
    );
}

#[test]
fn firmware_rules() {
    vmi_cause(
        set(vmi(), "/spec/domain/firmware/uuid", json!("not-a-uuid")),
        reason::INVALID,
        "spec.domain.firmware.uuid",
    );
    vmi_cause(
        set(vmi(), "/spec/domain/firmware/serial", json!("a b")),
        reason::INVALID,
        "spec.domain.firmware.serial",
    );
    let out = accepted(
        vmi_kind(),
        set(
            vmi(),
            "/spec/domain/firmware/uuid",
            json!("5d307ca9-b3ef-428c-8861-06e72d69f223"),
        ),
    );
    assert_eq!(
        out["spec"]["domain"]["firmware"]["uuid"],
        "5d307ca9-b3ef-428c-8861-06e72d69f223"
    );
    accepted(
        vmi_kind(),
        set(
            vmi(),
            "/spec/domain/firmware/bootloader/bios/useSerial",
            json!(true),
        ),
    );
}

#[test]
fn kernel_boot_rules() {
    let kb = |v: Value| set(vmi(), "/spec/domain/firmware/kernelBoot", v);
    vmi_cause(
        kb(json!({"container": {"kernelPath": "/vmlinuz"}})),
        reason::REQUIRED,
        "spec.domain.firmware.kernelBoot.container.image",
    );
    vmi_cause(
        kb(json!({"container": {"image": "k:1"}})),
        reason::REQUIRED,
        "spec.domain.firmware.kernelBoot.container",
    );
    vmi_cause(
        kb(
            json!({"kernelArgs": "console=ttyS0", "container": {"image": "k:1", "initrdPath": "/initrd"}}),
        ),
        reason::INVALID,
        "spec.domain.firmware.kernelBoot.kernelArgs",
    );
    vmi_cause(
        kb(json!({"kernelArgs": "console=ttyS0"})),
        reason::INVALID,
        "spec.domain.firmware.kernelBoot.kernelArgs",
    );
    vmi_cause(
        kb(json!({"container": {"image": "k:1", "kernelPath": "vmlinuz"}})),
        reason::INVALID,
        "spec.domain.firmware.kernelBoot.container.kernelPath",
    );
    vmi_cause(
        kb(
            json!({"container": {"image": "k:1", "kernelPath": "/vmlinuz", "imagePullSecret": "s"}}),
        ),
        reason::NOT_SUPPORTED,
        "spec.domain.firmware.kernelBoot.container.imagePullSecret",
    );
    let out = accepted(
        vmi_kind(),
        kb(
            json!({"kernelArgs": "console=ttyS0", "container": {"image": "k", "kernelPath": "/vmlinuz"}}),
        ),
    );
    assert_eq!(
        out["spec"]["domain"]["firmware"]["kernelBoot"]["container"]["imagePullPolicy"],
        "Always"
    );
}

#[test]
fn efi_and_features() {
    vmi_cause(
        set(
            vmi(),
            "/spec/domain/firmware/bootloader/efi",
            json!({"secureBoot": false}),
        ),
        reason::NOT_SUPPORTED,
        "spec.domain.firmware.bootloader.efi",
    );
    vmi_cause(
        set(vmi(), "/spec/domain/features/hyperv", json!({})),
        reason::NOT_SUPPORTED,
        "spec.domain.features.hyperv",
    );
    vmi_cause(
        set(
            vmi(),
            "/spec/domain/features/apic/endOfInterrupt",
            json!(true),
        ),
        reason::NOT_SUPPORTED,
        "spec.domain.features.apic.endOfInterrupt",
    );
    let out = accepted(
        vmi_kind(),
        set(
            vmi(),
            "/spec/domain/features",
            json!({"acpi": {}, "smm": {"enabled": false}, "apic": {}}),
        ),
    );
    assert_eq!(
        out["spec"]["domain"]["features"],
        json!({"acpi": {"enabled": true}, "smm": {"enabled": false}, "apic": {"enabled": true}})
    );
    let out = accepted(
        vmi_kind(),
        set(vmi(), "/spec/domain/clock/utc/offsetSeconds", json!(3600)),
    );
    assert_eq!(out["spec"]["domain"]["clock"]["utc"]["offsetSeconds"], 3600);
    vmi_cause(
        set(vmi(), "/spec/domain/clock/timezone", json!("Europe/Paris")),
        reason::NOT_SUPPORTED,
        "spec.domain.clock.timezone",
    );
}

// ---- other spec fields --------------------------------------------------------

#[test]
fn termination_grace_period() {
    vmi_cause(
        set(vmi(), "/spec/terminationGracePeriodSeconds", json!(-1)),
        reason::INVALID,
        "spec.terminationGracePeriodSeconds",
    );
    let out = accepted(vmi_kind(), vmi());
    assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 180);
    let out = accepted(
        vmi_kind(),
        set(vmi(), "/spec/terminationGracePeriodSeconds", json!(0)),
    );
    assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 0);
}

#[test]
fn hostname_subdomain_architecture() {
    vmi_cause(
        set(vmi(), "/spec/hostname", json!("a.b")),
        reason::INVALID,
        "spec.hostname",
    );
    vmi_cause(
        set(vmi(), "/spec/subdomain", json!("A")),
        reason::INVALID,
        "spec.subdomain",
    );
    vmi_cause(
        set(vmi(), "/spec/architecture", json!("arm64")),
        reason::NOT_SUPPORTED,
        "spec.architecture",
    );
    accepted(vmi_kind(), set(vmi(), "/spec/architecture", json!("amd64")));
    vmi_cause(
        set(vmi(), "/spec/evictionStrategy", json!("Sometimes")),
        reason::NOT_SUPPORTED,
        "spec.evictionStrategy",
    );
    accepted(
        vmi_kind(),
        set(vmi(), "/spec/evictionStrategy", json!("LiveMigrate")),
    );
}

#[test]
fn all_semantic_causes_are_collected() {
    let obj = set(vmi(), "/spec/domain/cpu/cores", json!(0));
    let obj = set(obj, "/spec/terminationGracePeriodSeconds", json!(-5));
    let obj = set(obj, "/spec/volumes/0/containerDisk/image", json!(""));
    let obj = set(obj, "/metadata/name", json!("UPPER"));
    let e = refused(vmi_kind(), obj);
    assert_cause(&e, reason::INVALID, "spec.domain.cpu.cores");
    assert_cause(&e, reason::INVALID, "spec.terminationGracePeriodSeconds");
    assert_cause(&e, reason::REQUIRED, "spec.volumes[0].containerDisk.image");
    assert_cause(&e, reason::INVALID, "metadata.name");
    assert_eq!(e.causes.len(), 4, "{e:#?}");
}

// ---- defaulting -----------------------------------------------------------------

#[test]
fn vmi_defaults() {
    let obj = set(
        vmi(),
        "/spec/domain/devices/disks/0",
        json!({"name": "root"}),
    );
    let out = accepted(vmi_kind(), obj);
    let spec = &out["spec"];
    assert_eq!(spec["domain"]["machine"]["type"], "q35");
    assert_eq!(
        spec["domain"]["cpu"],
        json!({"cores": 1, "sockets": 1, "threads": 1})
    );
    assert_eq!(
        spec["domain"]["devices"]["disks"][0]["disk"]["bus"],
        "virtio"
    );
    assert_eq!(
        spec["domain"]["devices"]["interfaces"],
        json!([{"name": "default", "masquerade": {}, "model": "virtio"}])
    );
    assert_eq!(spec["networks"], json!([{"name": "default", "pod": {}}]));
    assert_eq!(
        spec["domain"]["firmware"]["uuid"],
        kubevirt::default_firmware_uuid("ns", "t")
    );
    assert_eq!(
        spec["volumes"][0]["containerDisk"]["imagePullPolicy"],
        "IfNotPresent"
    );
    assert_eq!(spec["terminationGracePeriodSeconds"], 180);
}

#[test]
fn no_default_interface_when_autoattach_is_false() {
    let out = accepted(
        vmi_kind(),
        set(
            vmi(),
            "/spec/domain/devices/autoattachPodInterface",
            json!(false),
        ),
    );
    assert!(out["spec"]["domain"]["devices"].get("interfaces").is_none());
    assert!(out["spec"].get("networks").is_none());
}

#[test]
fn vm_template_uuid_comes_from_the_vm() {
    let out = accepted(vm_kind(), vm());
    assert_eq!(
        out["spec"]["template"]["spec"]["domain"]["firmware"]["uuid"],
        kubevirt::default_firmware_uuid("ns", "t")
    );
    let other_ns = accepted(vm_kind(), set(vm(), "/metadata/namespace", json!("other")));
    assert_ne!(
        other_ns["spec"]["template"]["spec"]["domain"]["firmware"]["uuid"],
        out["spec"]["template"]["spec"]["domain"]["firmware"]["uuid"]
    );
}

#[test]
fn admission_is_idempotent_and_typed_roundtrip() {
    for (kind, obj) in [(vmi_kind(), vmi()), (vm_kind(), vm())] {
        let once = accepted(kind, obj);
        let twice = accepted(kind, once.clone());
        assert_eq!(once, twice);
    }
    let typed: VirtualMachineInstance =
        serde_json::from_value(accepted(vmi_kind(), vmi())).expect("typed");
    assert_eq!(typed.spec.vcpus(), 1);
    assert_eq!(typed.spec.guest_memory_bytes(), Ok(Some(128 * 1024 * 1024)));
}

// ---- updates ------------------------------------------------------------------------

#[test]
fn vmi_spec_is_immutable() {
    let stored = accepted(vmi_kind(), vmi());
    let changed = set(stored.clone(), "/spec/domain/memory/guest", json!("256Mi"));
    let e = admit(vmi_kind(), changed, Some(&stored)).expect_err("spec change refused");
    assert_cause(&e, reason::FORBIDDEN, "spec");
    let relabelled = set(stored.clone(), "/metadata/labels", json!({"a": "b"}));
    admit(vmi_kind(), relabelled, Some(&stored)).expect("label change allowed");
    let renamed = set(stored.clone(), "/metadata/name", json!("u"));
    let e = admit(vmi_kind(), renamed, Some(&stored)).expect_err("rename refused");
    assert_cause(&e, reason::FORBIDDEN, "metadata.name");
}

#[test]
fn vm_spec_can_change() {
    let stored = accepted(vm_kind(), vm());
    let changed = set(stored.clone(), "/spec/runStrategy", json!("Halted"));
    let out = admit(vm_kind(), changed, Some(&stored)).expect("VM spec may change");
    assert_eq!(out["spec"]["runStrategy"], "Halted");
}

#[test]
fn status_is_kept_and_lenient() {
    let obj = set(
        vmi(),
        "/status",
        json!({"phase": "Running", "nodeName": "h1", "notAKubeVirtField": {"completed": true},
               "krvirtRuntime": {"pid": 42, "accelerator": "tcg", "runDir": "/var/lib/krvirt/run/vmi/u"}}),
    );
    let out = accepted(vmi_kind(), obj);
    assert_eq!(out["status"]["phase"], "Running");
    assert_eq!(out["status"]["krvirtRuntime"]["pid"], 42);
    assert!(
        out["status"].get("notAKubeVirtField").is_none(),
        "unknown status fields are dropped"
    );
}

// ---- Host -----------------------------------------------------------------------------

fn host() -> Value {
    json!({
        "apiVersion": "krvirt.io/v1",
        "kind": "Host",
        "metadata": {"name": "node1.example.com", "labels": {"zone": "a"}},
        "spec": {"unschedulable": false},
        "status": {
            "capacity": {"cpu": "2", "memory": "24Gi"},
            "allocatable": {"cpu": "2", "memory": "23Gi"},
            "cpus": [{"id": 0, "core": 0, "socket": 0, "numaNode": 0}, {"id": 1, "core": 1, "socket": 0, "numaNode": 0}],
            "numaNodes": [{"id": 0, "cpus": [0, 1], "memoryBytes": 25769803776u64}],
            "hugepages": [{"pageSize": "2Mi", "total": 0, "free": 0}],
            "accelerator": {"type": "tcg", "reason": "paravirtual KVM cannot boot guests"},
            "qemuVersion": "7.2.0",
            "agentVersion": "0.1.0",
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
            "daemonEndpoints": {"agentEndpoint": {"port": 8186}},
            "conditions": [{"type": "Ready", "status": "True"}],
            "heartbeatTime": "2024-05-01T12:00:00Z"
        }
    })
}

#[test]
fn host_is_accepted_and_roundtrips() {
    let out = accepted(host_kind(), host());
    assert_eq!(out, host());
    let typed: krvirt_api::host::Host = serde_json::from_value(out).expect("typed");
    assert_eq!(
        typed.status.and_then(|s| s.accelerator).map(|a| a.type_),
        Some(krvirt_api::host::Accelerator::Tcg)
    );
}

#[test]
fn host_rules() {
    let e = refused(host_kind(), set(host(), "/metadata/namespace", json!("ns")));
    assert_cause(&e, reason::INVALID, "metadata.namespace");
    let e = refused(
        host_kind(),
        set(host(), "/status/capacity/memory", json!("24 Gi")),
    );
    assert_cause(&e, reason::INVALID, "status.capacity.memory");
    let e = refused(
        host_kind(),
        set(host(), "/status/heartbeatTime", json!("now")),
    );
    assert_cause(&e, reason::INVALID, "status.heartbeatTime");
    let e = refused(
        host_kind(),
        set(
            host(),
            "/status/daemonEndpoints/agentEndpoint/port",
            json!(0),
        ),
    );
    assert_cause(
        &e,
        reason::INVALID,
        "status.daemonEndpoints.agentEndpoint.port",
    );
    let e = refused(host_kind(), set(host(), "/spec/cordoned", json!(true)));
    assert_cause(&e, reason::UNKNOWN, "spec.cordoned");
    let e = refused(
        host_kind(),
        set(host(), "/status/accelerator/type", json!("hvf")),
    );
    assert_cause(&e, reason::NOT_SUPPORTED, "status.accelerator.type");
}

// ---- OpenAPI ----------------------------------------------------------------------------

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "$ref"
                    && let Some(s) = v.as_str()
                {
                    out.push(s.to_string());
                }
                collect_refs(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[test]
fn openapi_components_cover_every_kind_and_resolve_every_ref() {
    let components = krvirt_api::openapi_components();
    for k in krvirt_api::kinds() {
        assert!(
            components.schemas.contains_key(k.schema_name),
            "no schema {} for kind {}",
            k.schema_name,
            k.kind
        );
    }
    let json = serde_json::to_value(&components).expect("serialisable");
    let mut refs = Vec::new();
    collect_refs(&json, &mut refs);
    assert!(refs.len() > 20, "expected nested schemas to be referenced");
    for r in refs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected ref {r}"));
        assert!(components.schemas.contains_key(name), "dangling $ref {r}");
    }
    let vm = &json["schemas"]["VirtualMachineSpec"]["properties"];
    assert!(
        vm.get("runStrategy").is_some(),
        "camelCase property names: {vm}"
    );
    let disk = &json["schemas"]["Disk"]["properties"];
    assert!(disk.get("bootOrder").is_some());
}
