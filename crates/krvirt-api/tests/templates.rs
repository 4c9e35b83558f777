//! Admission, expansion and rendering of instancetypes, preferences,
//! Templates and TemplateInstances, on the KubeVirt corpus where it has
//! examples.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use krvirt_api::error::reason;
use krvirt_api::instancetype::{
    INSTANCETYPE_SNAPSHOT_ANNOTATION, InstancetypeSpec, PreferenceSpec, expand,
};
use krvirt_api::kubevirt::{DiskBus, InterfaceModel, VirtualMachine};
use krvirt_api::template::{Template, render};
use krvirt_api::{KindInfo, ValidationError, admit, find_kind, kind_for_object};
use serde_json::{Value, json};

fn corpus(file: &str) -> PathBuf {
    let dir = std::env::var_os("KRVIRT_EXAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/kubevirt-examples")
        });
    let p = dir.join(file);
    assert!(p.exists(), "corpus file {} is needed", p.display());
    p
}

fn doc(file: &str) -> Value {
    let text = std::fs::read_to_string(corpus(file)).expect("readable");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
    docs.into_iter()
        .find(|d| !d.is_null())
        .expect("one document")
}

fn kind(name: &str) -> &'static KindInfo {
    find_kind(name).unwrap_or_else(|| panic!("{name} is served"))
}

fn with_ns(mut v: Value, namespaced: bool) -> Value {
    if namespaced {
        v["metadata"]["namespace"] = json!("default");
    }
    v
}

fn admit_doc(v: Value) -> Result<Value, ValidationError> {
    let k = kind_for_object(&v)?;
    admit(k, with_ns(v, k.namespaced), None)
}

fn assert_cause(e: &ValidationError, reason: &str, field: &str) {
    assert!(
        e.causes
            .iter()
            .any(|c| c.reason == reason && c.field == field),
        "expected {reason} at {field}, got {:#?}",
        e.causes
    );
}

#[test]
fn corpus_instancetypes_and_preferences_are_admitted() {
    for f in [
        "csmall.yaml",
        "clarge.yaml",
        "cluster-csmall.yaml",
        "virtio.yaml",
        "supplemental/preference.yaml",
        "vm-cirros-csmall.yaml",
        "vm-cirros-cluster-csmall.yaml",
        "vm-cirros-clarge-virtio.yaml",
    ] {
        let out = admit_doc(doc(f)).unwrap_or_else(|e| panic!("{f}: {e:?}"));
        assert!(out["spec"].is_object(), "{f}");
    }
    let it = admit_doc(doc("csmall.yaml")).expect("admitted");
    assert_eq!(it["spec"]["cpu"]["guest"], 1);
    assert_eq!(it["spec"]["memory"]["guest"], "128Mi");
}

#[test]
fn windows_preference_is_refused_naming_each_unimplemented_field() {
    let e = admit_doc(doc("windows.yaml")).expect_err("refused");
    for f in [
        "spec.clock.preferredTimer",
        "spec.devices.preferredTPM",
        "spec.features.preferredHyperv",
        "spec.firmware.preferredEfi",
    ] {
        assert_cause(&e, reason::NOT_SUPPORTED, f);
    }
}

#[test]
fn instancetype_rules() {
    let e = admit(
        kind("virtualmachineinstancetypes"),
        json!({"metadata": {"name": "x", "namespace": "default"},
               "spec": {"cpu": {"guest": 0}, "memory": {"guest": "12Q"}}}),
        None,
    )
    .expect_err("refused");
    assert_cause(&e, reason::INVALID, "spec.cpu.guest");
    assert_cause(&e, reason::INVALID, "spec.memory.guest");
    let e = admit(
        kind("virtualmachineclusterinstancetypes"),
        json!({"metadata": {"name": "x"},
               "spec": {"cpu": {"guest": 1}, "memory": {"guest": "1Gi", "hugepages": {}}}}),
        None,
    )
    .expect_err("refused");
    assert_cause(&e, reason::NOT_SUPPORTED, "spec.memory.hugepages");
    let e = admit(
        kind("vm"),
        json!({"metadata": {"name": "v", "namespace": "default"},
               "spec": {"instancetype": {"name": "", "kind": "Flavor"},
                        "template": {"spec": {"domain": {"devices": {}}}}}}),
        None,
    )
    .expect_err("refused");
    assert_cause(&e, reason::REQUIRED, "spec.instancetype.name");
    assert_cause(&e, reason::NOT_SUPPORTED, "spec.instancetype.kind");
}

fn vm_of(file: &str) -> VirtualMachine {
    serde_json::from_value(admit_doc(doc(file)).expect("admitted")).expect("typed")
}

fn it_spec(file: &str) -> InstancetypeSpec {
    serde_json::from_value(doc(file)["spec"].clone()).expect("typed")
}

fn pref_spec(file: &str) -> PreferenceSpec {
    serde_json::from_value(doc(file)["spec"].clone()).expect("typed")
}

#[test]
fn csmall_expands_to_its_cpu_and_memory() {
    let vm = vm_of("vm-cirros-csmall.yaml");
    let mut spec = vm.spec.template.spec.clone();
    expand(&mut spec, Some(&it_spec("csmall.yaml")), None).expect("no conflict");
    let cpu = spec.domain.cpu.expect("cpu set");
    assert_eq!(
        (cpu.sockets, cpu.cores, cpu.threads),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!(
        spec.domain.memory.and_then(|m| m.guest).map(|q| q.0),
        Some("128Mi".to_string())
    );
}

#[test]
fn conflicting_vm_values_are_named() {
    // vm-cirros-clarge-virtio asks for 128Mi itself; clarge has 2Gi.
    let vm = vm_of("vm-cirros-clarge-virtio.yaml");
    let mut spec = vm.spec.template.spec.clone();
    let causes = expand(&mut spec, Some(&it_spec("clarge.yaml")), None).expect_err("conflict");
    assert!(
        causes
            .iter()
            .any(|c| c.field == "spec.template.spec.domain.memory.guest"),
        "{causes:#?}"
    );
    let mut spec = vm.spec.template.spec.clone();
    spec.domain.memory = None;
    spec.domain.cpu = Some(krvirt_api::kubevirt::Cpu {
        cores: Some(2),
        ..Default::default()
    });
    let causes = expand(&mut spec, Some(&it_spec("clarge.yaml")), None).expect_err("conflict");
    assert!(
        causes
            .iter()
            .any(|c| c.field == "spec.template.spec.domain.cpu.cores"),
        "{causes:#?}"
    );
}

#[test]
fn the_copy_in_the_vm_makes_conflicting_edits_a_422() {
    let mut v = with_ns(doc("vm-cirros-clarge-virtio.yaml"), true);
    let snapshot = json!({"kind": "VirtualMachineInstancetype", "name": "clarge",
                          "spec": doc("clarge.yaml")["spec"].clone()});
    v["metadata"]["annotations"] =
        json!({ INSTANCETYPE_SNAPSHOT_ANNOTATION: snapshot.to_string() });
    let e = admit(kind("vm"), v.clone(), None).expect_err("conflict");
    assert_cause(
        &e,
        reason::INVALID,
        "spec.template.spec.domain.memory.guest",
    );
    v["spec"]["template"]["spec"]["domain"]["memory"] = json!({"guest": "2Gi"});
    admit(kind("vm"), v, None).expect("equal values are no conflict");
}

#[test]
fn preferences_fill_what_the_vm_leaves_unset() {
    let vm = vm_of("vm-cirros-clarge-virtio.yaml");
    let mut spec = vm.spec.template.spec.clone();
    spec.domain.memory = None;
    let mut pref = pref_spec("virtio.yaml");
    expand(&mut spec, Some(&it_spec("clarge.yaml")), Some(&pref)).expect("expanded");
    for d in &spec.domain.devices.disks {
        assert_eq!(d.disk.as_ref().and_then(|t| t.bus), Some(DiskBus::Virtio));
    }
    assert_eq!(spec.domain.cpu.as_ref().and_then(|c| c.sockets), Some(4));

    let mut spec = vm.spec.template.spec.clone();
    spec.domain.memory = None;
    spec.domain.devices.interfaces = vec![krvirt_api::kubevirt::Interface {
        name: "default".into(),
        ..Default::default()
    }];
    pref = serde_json::from_value(json!({
        "devices": {"preferredDiskBus": "sata", "preferredInterfaceModel": "e1000"},
        "cpu": {"preferredCPUTopology": "cores"},
        "machine": {"preferredMachineType": "pc"}
    }))
    .expect("typed");
    expand(&mut spec, Some(&it_spec("clarge.yaml")), Some(&pref)).expect("expanded");
    assert!(
        spec.domain
            .devices
            .disks
            .iter()
            .all(|d| d.disk.as_ref().and_then(|t| t.bus) == Some(DiskBus::Sata))
    );
    assert_eq!(
        spec.domain.devices.interfaces[0].model,
        Some(InterfaceModel::E1000)
    );
    let cpu = spec.domain.cpu.expect("cpu");
    assert_eq!((cpu.sockets, cpu.cores), (Some(1), Some(4)));
    assert_eq!(spec.domain.machine.map(|m| m.type_).as_deref(), Some("pc"));
}

fn template_kind() -> &'static KindInfo {
    kind("templates")
}

fn vm_object(hostname: &str) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "${NAME}"},
        "spec": {"runStrategy": "Always", "template": {"spec": {
            "hostname": hostname,
            "domain": {"cpu": {"cores": "${{CORES}}"}, "memory": {"guest": "${MEMORY}"},
                       "devices": {"disks": [{"name": "root", "disk": {}}]}},
            "volumes": [{"name": "root", "containerDisk": {"image": "demo-disk:latest"}}]}}}
    })
}

fn template() -> Value {
    json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"versions": [
            {"name": "1",
             "parameters": [{"name": "NAME", "required": true},
                            {"name": "CORES", "value": "1"},
                            {"name": "MEMORY", "value": "128Mi"},
                            {"name": "HOST", "required": true, "description": "guest hostname"}],
             "objects": [vm_object("v1-${HOST}")]},
            {"name": "2",
             "parameters": [{"name": "NAME", "required": true},
                            {"name": "CORES", "value": "2"},
                            {"name": "MEMORY", "value": "256Mi"},
                            {"name": "HOST", "generate": "expression", "from": "[a-z0-9]{8}"}],
             "objects": [vm_object("v2-${HOST}")]}
        ]}
    })
}

#[test]
fn template_versions_are_immutable_and_can_be_added_or_removed() {
    let stored = admit(template_kind(), template(), None).expect("admitted");
    let mut edited = stored.clone();
    edited["spec"]["versions"][0]["objects"][0]["spec"]["runStrategy"] = json!("Halted");
    let e = admit(template_kind(), edited, Some(&stored)).expect_err("immutable");
    assert_cause(&e, reason::FORBIDDEN, "spec.versions[0].objects");
    let mut edited = stored.clone();
    edited["spec"]["versions"][1]["parameters"][1]["value"] = json!("8");
    let e = admit(template_kind(), edited, Some(&stored)).expect_err("immutable");
    assert_cause(&e, reason::FORBIDDEN, "spec.versions[1].parameters");

    let mut added = stored.clone();
    let mut v3 = stored["spec"]["versions"][1].clone();
    v3["name"] = json!("3");
    added["spec"]["versions"]
        .as_array_mut()
        .expect("list")
        .push(v3);
    let with3 = admit(template_kind(), added, Some(&stored)).expect("a new version");
    let mut removed = with3.clone();
    removed["spec"]["versions"]
        .as_array_mut()
        .expect("list")
        .remove(0);
    admit(template_kind(), removed, Some(&with3)).expect("an old version removed");
}

#[test]
fn template_rules() {
    let mut t = template();
    t["spec"]["versions"][0]["objects"][0]["metadata"]["labels"] = json!({"x": "${TYPO}"});
    t["spec"]["versions"][1]["name"] = json!("1");
    t["spec"]["versions"][0]["parameters"][1]["generate"] = json!("random");
    let e = admit(template_kind(), t, None).expect_err("refused");
    assert_cause(&e, reason::INVALID, "spec.versions[0].objects[0]");
    assert_cause(&e, reason::DUPLICATE, "spec.versions[1].name");
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        "spec.versions[0].parameters[1].generate",
    );
    let mut t = template();
    t["spec"]["versions"][0]["objects"] = json!([{"apiVersion": "v1", "kind": "Service"}]);
    let e = admit(template_kind(), t, None).expect_err("refused");
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        "spec.versions[0].objects[0].kind",
    );
    assert_cause(&e, reason::REQUIRED, "spec.versions[0].objects");
}

fn rnd() -> impl FnMut() -> u64 {
    let mut n = 0x9e37_79b9_7f4a_7c15u64;
    move || {
        n ^= n << 13;
        n ^= n >> 7;
        n ^= n << 17;
        n
    }
}

fn typed_template() -> Template {
    serde_json::from_value(admit(template_kind(), template(), None).expect("admitted"))
        .expect("typed")
}

#[test]
fn render_versions_parameters_and_generated_values() {
    let t = typed_template();
    let p = BTreeMap::from([
        ("NAME".to_string(), "a".to_string()),
        ("HOST".to_string(), "h1".to_string()),
    ]);
    let r = render(&t, Some("1"), &p, &mut rnd()).expect("rendered");
    assert_eq!(r.version, "1");
    assert_eq!(r.vm["metadata"]["name"], "a");
    assert_eq!(r.vm["spec"]["template"]["spec"]["hostname"], "v1-h1");
    assert_eq!(
        r.vm["spec"]["template"]["spec"]["domain"]["cpu"]["cores"],
        json!(1),
        "${{{{CORES}}}} becomes a number"
    );
    // The default version is the last; HOST is generated there.
    let p = BTreeMap::from([("NAME".to_string(), "b".to_string())]);
    let r = render(&t, None, &p, &mut rnd()).expect("rendered");
    assert_eq!(r.version, "2");
    let host = r.parameters["HOST"].clone();
    assert_eq!(host.len(), 8);
    assert!(
        host.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    );
    assert_eq!(
        r.vm["spec"]["template"]["spec"]["hostname"],
        format!("v2-{host}")
    );
    assert_eq!(
        r.vm["spec"]["template"]["spec"]["domain"]["memory"]["guest"],
        "256Mi"
    );
    // The rendered VM is a valid VirtualMachine.
    let mut vm = r.vm.clone();
    vm["metadata"]["namespace"] = json!("default");
    admit(kind("vm"), vm, None).expect("a valid VM");
}

#[test]
fn render_errors_name_the_parameter() {
    let t = typed_template();
    let causes = render(&t, Some("1"), &BTreeMap::new(), &mut rnd()).expect_err("missing");
    assert!(
        causes.iter().any(|c| c.field == "spec.parameters[HOST]"
            && c.reason == reason::REQUIRED
            && c.message.contains("guest hostname")),
        "{causes:#?}"
    );
    let p = BTreeMap::from([
        ("NAME".to_string(), "a".to_string()),
        ("HOST".to_string(), "h".to_string()),
        ("COLOUR".to_string(), "red".to_string()),
    ]);
    let causes = render(&t, Some("1"), &p, &mut rnd()).expect_err("unknown");
    assert!(
        causes
            .iter()
            .any(|c| c.field == "spec.parameters[COLOUR]" && c.message.contains("unknown")),
        "{causes:#?}"
    );
    let causes = render(&t, Some("9"), &p, &mut rnd()).expect_err("no such version");
    assert!(
        causes
            .iter()
            .any(|c| c.field == "spec.version" && c.message.contains("versions: 1, 2")),
        "{causes:#?}"
    );
}

#[test]
fn the_openshift_corpus_template() {
    // As written (template.openshift.io/v1) it is refused naming apiVersion.
    let original = doc("vm-template-fedora.yaml");
    let e = kind_for_object(&original).expect_err("another API group");
    assert_eq!(e.causes[0].field, "apiVersion");
    // Under krvirt.io/v1 it is accepted as version 1.
    let mut v = original.clone();
    v["apiVersion"] = json!("krvirt.io/v1");
    let stored = admit_doc(v).expect("admitted");
    assert_eq!(stored["spec"]["versions"][0]["name"], "1");
    assert!(stored.get("objects").is_none());
    let t: Template = serde_json::from_value(stored).expect("typed");
    let p = BTreeMap::from([("NAME".to_string(), "fed".to_string())]);
    let r = render(&t, None, &p, &mut rnd()).expect("rendered");
    assert_eq!(r.vm["metadata"]["name"], "fed");
    assert_eq!(r.vm["metadata"]["labels"]["kubevirt-vm"], "vm-fed");
    let domain = &r.vm["spec"]["template"]["spec"]["domain"];
    assert_eq!(domain["cpu"]["cores"], json!(4));
    assert_eq!(domain["resources"]["requests"]["memory"], "4096Mi");
}

#[test]
fn template_instance_rules() {
    let ti = kind("templateinstances");
    let e = admit(
        ti,
        json!({"metadata": {"name": "Bad_Name", "namespace": "default"},
               "spec": {"template": "", "parameters": {"a-b": "x"}, "version": "V 1"}}),
        None,
    )
    .expect_err("refused");
    assert_cause(&e, reason::REQUIRED, "spec.template");
    assert_cause(&e, reason::INVALID, "spec.parameters[a-b]");
    assert_cause(&e, reason::INVALID, "spec.version");
    let ok = json!({"metadata": {"name": "vm1", "namespace": "default"},
                    "spec": {"template": "web", "version": "2", "clone": "full",
                             "parameters": {"HOST": "x"}}});
    let stored = admit(ti, ok.clone(), None).expect("admitted");
    let mut edited = stored.clone();
    edited["spec"]["version"] = json!("1");
    let e = admit(ti, edited, Some(&stored)).expect_err("immutable");
    assert_cause(&e, reason::FORBIDDEN, "spec");
}

#[test]
fn a_replace_without_the_copy_keeps_it_while_the_reference_is_the_same() {
    let mut stored = with_ns(doc("vm-cirros-csmall.yaml"), true);
    let snapshot = json!({"kind": "VirtualMachineInstancetype", "name": "csmall",
                          "spec": doc("csmall.yaml")["spec"].clone()});
    stored["metadata"]["annotations"] =
        json!({ INSTANCETYPE_SNAPSHOT_ANNOTATION: snapshot.to_string() });
    let stored = admit(kind("vm"), stored, None).expect("admitted");
    // `krvirt apply` of the original manifest: no annotations.
    let replaced = admit(
        kind("vm"),
        with_ns(doc("vm-cirros-csmall.yaml"), true),
        Some(&stored),
    )
    .expect("admitted");
    assert_eq!(
        replaced["metadata"]["annotations"][INSTANCETYPE_SNAPSHOT_ANNOTATION],
        stored["metadata"]["annotations"][INSTANCETYPE_SNAPSHOT_ANNOTATION]
    );
    // Another instancetype: the copy goes (the controller records the new one).
    let mut other = with_ns(doc("vm-cirros-csmall.yaml"), true);
    other["spec"]["instancetype"]["name"] = json!("clarge");
    let replaced = admit(kind("vm"), other, Some(&stored)).expect("admitted");
    assert!(
        replaced["metadata"]["annotations"]
            .get(INSTANCETYPE_SNAPSHOT_ANNOTATION)
            .is_none()
    );
}
