//! Admission of the scheduling fields: affinity, tolerations, hugepages,
//! guest NUMA passthrough (VMI and VM template) and Host taints. Every
//! refusal names its field path.

use krvirt_api::error::reason;
use krvirt_api::kubevirt::scheduling::{TaintArg, parse_taint_arg};
use krvirt_api::kubevirt::{TaintEffect, VirtualMachineInstance};
use krvirt_api::{KindInfo, ValidationError, admit, find_kind};
use serde_json::{Value, json};

fn kind(name: &str) -> &'static KindInfo {
    find_kind(name).expect("served kind")
}

fn vmi_with(spec_extra: Value) -> Value {
    let mut spec = json!({
        "domain": {
            "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
            "memory": {"guest": "128Mi"}
        },
        "volumes": [{"name": "root", "containerDisk": {"image": "reg/img:1"}}]
    });
    merge(&mut spec, spec_extra);
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "t", "namespace": "ns", "labels": {"app": "db"}},
        "spec": spec
    })
}

fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

fn refused(kind: &KindInfo, obj: Value) -> ValidationError {
    match admit(kind, obj, None) {
        Ok(v) => panic!("expected a refusal, admitted: {v:#}"),
        Err(e) => e,
    }
}

fn assert_cause(e: &ValidationError, reason: &str, field: &str) {
    assert!(
        e.causes
            .iter()
            .any(|c| c.reason == reason && c.field == field),
        "no {reason} cause at {field}; causes: {:#?}",
        e.causes
    );
}

fn full_affinity() -> Value {
    json!({
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}],
                 "matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["h9"]}]}
            ]},
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 10, "preference": {"matchExpressions": [
                    {"key": "cores", "operator": "Gt", "values": ["4"]}]}}
            ]
        },
        "podAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 50, "podAffinityTerm": {
                    "labelSelector": {"matchLabels": {"app": "cache"}},
                    "topologyKey": "kubernetes.io/hostname"}}
            ]
        },
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchExpressions": [
                    {"key": "app", "operator": "In", "values": ["db"]}]},
                 "namespaces": ["ns", "other"],
                 "topologyKey": "kubernetes.io/hostname"}
            ]
        }
    })
}

#[test]
fn affinity_and_tolerations_are_admitted_and_kept() {
    let obj = vmi_with(json!({
        "affinity": full_affinity(),
        "tolerations": [
            {"key": "maint", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "gpu", "operator": "Equal", "value": "yes"},
            {"operator": "Exists"},
            {"key": "lost", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}
        ]
    }));
    let out = admit(kind("vmi"), obj.clone(), None).expect("admitted");
    assert_eq!(out["spec"]["affinity"], full_affinity());
    assert_eq!(out["spec"]["tolerations"], obj["spec"]["tolerations"]);
    let typed: VirtualMachineInstance = serde_json::from_value(out).expect("typed");
    assert_eq!(typed.spec.tolerations.len(), 4);
    assert!(typed.spec.affinity.is_some());
}

#[test]
fn vm_template_takes_them_too() {
    let vmi = vmi_with(json!({"affinity": full_affinity(),
        "tolerations": [{"key": "a", "operator": "Exists"}]}));
    let vm = json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "t", "namespace": "ns"},
        "spec": {"runStrategy": "Always", "template": {"spec": vmi["spec"].clone()}}
    });
    admit(kind("vm"), vm.clone(), None).expect("admitted");
    let mut bad = vm;
    bad["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        [0]["topologyKey"] = json!("topology.kubernetes.io/zone");
    let e = refused(kind("vm"), bad);
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        "spec.template.spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey",
    );
}

#[test]
fn other_topology_keys_are_refused_naming_the_field() {
    let mut a = full_affinity();
    a["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] =
        json!("topology.kubernetes.io/zone");
    a["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] =
        json!("");
    let e = refused(kind("vmi"), vmi_with(json!({ "affinity": a })));
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        "spec.affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].podAffinityTerm.topologyKey",
    );
    assert_cause(
        &e,
        reason::REQUIRED,
        "spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey",
    );
    assert!(
        e.causes
            .iter()
            .any(|c| c.message.contains("kubernetes.io/hostname")),
        "{e}"
    );
}

#[test]
fn selector_rules_name_their_fields() {
    let a = json!({
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [
                    {"key": "disk", "operator": "In"},
                    {"key": "x", "operator": "Exists", "values": ["y"]},
                    {"key": "n", "operator": "Gt", "values": ["four"]},
                    {"key": "bad key!", "operator": "Exists"}],
                 "matchFields": [{"key": "metadata.labels", "operator": "In", "values": ["a"]}]}
            ]},
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 0, "preference": {}}
            ]
        },
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchExpressions": [
                    {"key": "app", "operator": "Lt", "values": ["1"]}]},
                 "topologyKey": "kubernetes.io/hostname"}
            ]
        }
    });
    let e = refused(kind("vmi"), vmi_with(json!({ "affinity": a })));
    let base = "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]";
    assert_cause(
        &e,
        reason::REQUIRED,
        &format!("{base}.matchExpressions[0].values"),
    );
    assert_cause(
        &e,
        reason::FORBIDDEN,
        &format!("{base}.matchExpressions[1].values"),
    );
    assert_cause(
        &e,
        reason::INVALID,
        &format!("{base}.matchExpressions[2].values[0]"),
    );
    assert_cause(
        &e,
        reason::INVALID,
        &format!("{base}.matchExpressions[3].key"),
    );
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        &format!("{base}.matchFields[0].key"),
    );
    assert_cause(
        &e,
        reason::INVALID,
        "spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight",
    );
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        "spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].labelSelector.matchExpressions[0].operator",
    );
}

#[test]
fn unknown_operator_and_unimplemented_selector_fields() {
    let a = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "db"}},
         "namespaceSelector": {}, "topologyKey": "kubernetes.io/hostname"}]}});
    let e = refused(kind("vmi"), vmi_with(json!({ "affinity": a })));
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        "spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].namespaceSelector",
    );
    let t = json!([{"key": "a", "operator": "Maybe"}]);
    let e = refused(kind("vmi"), vmi_with(json!({ "tolerations": t })));
    assert_cause(&e, reason::NOT_SUPPORTED, "spec.tolerations[0].operator");
}

#[test]
fn toleration_rules() {
    let t = json!([
        {"operator": "Equal", "value": "x"},
        {"key": "a", "operator": "Exists", "value": "x"},
        {"key": "b", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5},
        {"key": "c", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": -1}
    ]);
    let e = refused(kind("vmi"), vmi_with(json!({ "tolerations": t })));
    assert_cause(&e, reason::INVALID, "spec.tolerations[0].operator");
    assert_cause(&e, reason::INVALID, "spec.tolerations[1].operator");
    assert_cause(&e, reason::INVALID, "spec.tolerations[2].effect");
    assert_cause(&e, reason::INVALID, "spec.tolerations[3].tolerationSeconds");
}

#[test]
fn hugepages_page_size_and_memory_multiple() {
    let ok = vmi_with(
        json!({"domain": {"memory": {"guest": "64Mi", "hugepages": {"pageSize": "2Mi"}}}}),
    );
    let out = admit(kind("vmi"), ok, None).expect("admitted");
    assert_eq!(
        out["spec"]["domain"]["memory"]["hugepages"]["pageSize"],
        "2Mi"
    );

    let e = refused(
        kind("vmi"),
        vmi_with(json!({"domain": {"memory": {"hugepages": {"pageSize": "4Ki"}}}})),
    );
    assert_cause(
        &e,
        reason::NOT_SUPPORTED,
        "spec.domain.memory.hugepages.pageSize",
    );
    let e = refused(
        kind("vmi"),
        vmi_with(
            json!({"domain": {"memory": {"guest": "65Mi", "hugepages": {"pageSize": "2Mi"}}}}),
        ),
    );
    assert_cause(&e, reason::INVALID, "spec.domain.memory.guest");
    assert!(
        e.causes[0]
            .message
            .contains("not a multiple of the page size"),
        "{e}"
    );
    let e = refused(
        kind("vmi"),
        vmi_with(
            json!({"domain": {"memory": {"guest": "512Mi", "hugepages": {"pageSize": "1Gi"}}}}),
        ),
    );
    assert!(
        e.causes[0]
            .message
            .contains("equal to or larger than page size"),
        "{e}"
    );
}

#[test]
fn numa_passthrough_needs_dedicated_cpus_and_hugepages() {
    let numa = json!({"guestMappingPassthrough": {}});
    let e = refused(
        kind("vmi"),
        vmi_with(json!({"domain": {"cpu": {"cores": 2, "numa": numa}}})),
    );
    assert_eq!(e.causes.len(), 2, "{e}");
    assert_cause(
        &e,
        reason::INVALID,
        "spec.domain.cpu.numa.guestMappingPassthrough",
    );
    assert!(
        e.causes
            .iter()
            .any(|c| c.message.contains("spec.domain.cpu.dedicatedCpuPlacement"))
    );
    assert!(
        e.causes
            .iter()
            .any(|c| c.message.contains("spec.domain.memory.hugepages"))
    );
    admit(
        kind("vmi"),
        vmi_with(json!({"domain": {
            "cpu": {"cores": 2, "dedicatedCpuPlacement": true, "numa": numa},
            "memory": {"guest": "64Mi", "hugepages": {"pageSize": "2Mi"}}}})),
        None,
    )
    .expect("admitted");
}

fn host(taints: Value) -> Value {
    json!({"apiVersion": "krvirt.io/v1", "kind": "Host", "metadata": {"name": "h1"},
           "spec": {"taints": taints}})
}

#[test]
fn host_taints() {
    let out = admit(
        kind("host"),
        host(
            json!([{"key": "maint", "value": "yes", "effect": "NoSchedule"},
                    {"key": "maint", "effect": "NoExecute"}]),
        ),
        None,
    )
    .expect("admitted");
    assert_eq!(out["spec"]["taints"][1]["effect"], "NoExecute");
    let e = refused(
        kind("host"),
        host(
            json!([{"key": "a", "effect": "NoSchedule"}, {"key": "a", "value": "b", "effect": "NoSchedule"},
                    {"key": "", "effect": "NoExecute"}]),
        ),
    );
    assert_cause(&e, reason::DUPLICATE, "spec.taints[1]");
    assert_cause(&e, reason::REQUIRED, "spec.taints[2].key");
    let e = refused(kind("host"), host(json!([{"key": "a", "effect": "Never"}])));
    assert_cause(&e, reason::NOT_SUPPORTED, "spec.taints[0].effect");
    let e = refused(kind("host"), host(json!([{"key": "a"}])));
    assert_cause(&e, reason::REQUIRED, "spec.taints[0].effect");
}

#[test]
fn taint_arguments() {
    assert_eq!(
        parse_taint_arg("maint=yes:NoSchedule").unwrap(),
        TaintArg {
            key: "maint".into(),
            value: Some("yes".into()),
            effect: Some(TaintEffect::NoSchedule),
            remove: false
        }
    );
    let r = parse_taint_arg("maint-").unwrap();
    assert!(r.remove && r.effect.is_none() && r.key == "maint");
    let r = parse_taint_arg("maint:NoExecute-").unwrap();
    assert!(r.remove && r.effect == Some(TaintEffect::NoExecute));
    assert!(parse_taint_arg("maint=yes").is_err());
    assert!(parse_taint_arg("maint:Sometimes").is_err());
    assert!(parse_taint_arg("=x:NoSchedule").is_err());
}

#[test]
fn openapi_has_the_new_fields() {
    let comps = krvirt_api::openapi_components();
    let names: Vec<&str> = comps.schemas.keys().map(String::as_str).collect();
    for n in [
        "Affinity",
        "Toleration",
        "Taint",
        "Hugepages",
        "Numa",
        "PodAffinityTerm",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
}
