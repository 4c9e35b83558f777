//! The controllers over a real embedded store: TemplateInstances become
//! VMs and clone Volumes (or fail naming the parameter); VMs naming an
//! instancetype get a copy of it and VMIs expanded from that copy; a
//! conflicting VM gets a Failure condition and no VMI.

use krvirt_server::Subresource;
use serde_json::{Value, json};

mod common;
use common::{Plane, kind, plane, until};

async fn get(p: &Plane, k: &str, name: &str) -> Option<Value> {
    p.registry.get(kind(k), "default", name).await.ok()
}

fn condition(obj: &Value, t: &str) -> Option<Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == t && c["status"] == "True")
        .cloned()
}

fn template() -> Value {
    let vm = |tag: &str| {
        json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
               "metadata": {"name": "${NAME}"},
               "spec": {"runStrategy": "Halted", "template": {"spec": {
                   "hostname": format!("{tag}-${{HOST}}"),
                   "domain": {"memory": {"guest": "128Mi"}, "devices": {}},
                   "volumes": [
                       {"name": "root", "containerDisk": {"image": "demo-disk:latest"}},
                       {"name": "data", "persistentVolumeClaim": {"claimName": "golden"}}]}}}})
    };
    json!({"apiVersion": "krvirt.io/v1", "kind": "Template",
           "metadata": {"name": "web", "namespace": "default"},
           "spec": {"versions": [
               {"name": "1", "parameters": [{"name": "NAME"}, {"name": "HOST", "required": true}],
                "objects": [vm("one")]},
               {"name": "2", "parameters": [{"name": "NAME"}, {"name": "HOST", "required": true}],
                "objects": [vm("two")]}]}})
}

fn instance(name: &str, version: &str, params: Value, clone: &str) -> Value {
    json!({"apiVersion": "krvirt.io/v1", "kind": "TemplateInstance",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"template": "web", "version": version, "parameters": params, "clone": clone}})
}

#[tokio::test(flavor = "multi_thread")]
async fn template_instances_make_vms_and_clone_volumes() {
    let p = plane();
    p.registry
        .create(kind("templates"), "default", template())
        .await
        .unwrap();
    p.registry
        .create(
            kind("volumes"),
            "default",
            json!({"metadata": {"name": "golden"},
                   "spec": {"pool": "default", "capacity": "64Mi", "source": {"blank": {}}}}),
        )
        .await
        .unwrap();
    let ti = kind("templateinstances");
    p.registry
        .create(
            ti,
            "default",
            instance("a1", "1", json!({"HOST": "x"}), "linked"),
        )
        .await
        .unwrap();
    p.registry
        .create(
            ti,
            "default",
            instance("a2", "2", json!({"HOST": "y"}), "full"),
        )
        .await
        .unwrap();

    for (name, tag, clone) in [("a1", "one", "linked"), ("a2", "two", "full")] {
        let st = until("instance Ready", || async {
            let o = get(&p, "templateinstances", name).await?;
            condition(&o, "Ready").map(|_| o)
        })
        .await;
        assert_eq!(st["status"]["virtualMachine"], name);
        assert_eq!(
            st["status"]["parameters"]["NAME"], name,
            "NAME defaults to the VM's name"
        );
        let vm = get(&p, "virtualmachines", name).await.expect("VM made");
        let spec = &vm["spec"]["template"]["spec"];
        assert_eq!(
            spec["hostname"],
            format!("{tag}-{}", if name == "a1" { "x" } else { "y" })
        );
        assert_eq!(
            spec["volumes"][0]["persistentVolumeClaim"]["claimName"],
            format!("{name}-root")
        );
        assert_eq!(
            spec["volumes"][1]["persistentVolumeClaim"]["claimName"],
            format!("{name}-data")
        );
        let root = get(&p, "volumes", &format!("{name}-root"))
            .await
            .expect("root Volume");
        assert_eq!(
            root["spec"]["source"]["image"],
            json!({"name": "demo-disk:latest", "clone": clone})
        );
        let data = get(&p, "volumes", &format!("{name}-data"))
            .await
            .expect("data Volume");
        assert_eq!(data["spec"]["source"]["volume"]["name"], "golden");
        assert_eq!(data["spec"]["pool"], "default");
    }

    // Failures name the parameter and make nothing.
    p.registry
        .create(ti, "default", instance("b1", "1", json!({}), "linked"))
        .await
        .unwrap();
    p.registry
        .create(
            ti,
            "default",
            instance("b2", "2", json!({"HOST": "h", "SIZE": "9"}), "linked"),
        )
        .await
        .unwrap();
    for (name, needle) in [
        ("b1", "spec.parameters[HOST]"),
        ("b2", "unknown parameter SIZE"),
    ] {
        let f = until("instance failed", || async {
            let o = get(&p, "templateinstances", name).await?;
            condition(&o, "InstantiateFailure")
        })
        .await;
        assert!(f["message"].as_str().unwrap().contains(needle), "{f}");
        assert!(get(&p, "virtualmachines", name).await.is_none());
        assert!(get(&p, "volumes", &format!("{name}-root")).await.is_none());
    }
}

fn vm_with_instancetype(name: &str, it: &str, memory: Option<&str>) -> Value {
    let mut domain = json!({"devices": {"disks": [{"name": "root"}]}});
    if let Some(m) = memory {
        domain["memory"] = json!({"guest": m});
    }
    json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"runStrategy": "Always",
                    "instancetype": {"kind": "VirtualMachineInstancetype", "name": it},
                    "preference": {"name": "sata"},
                    "template": {"spec": {"domain": domain,
                        "volumes": [{"name": "root", "containerDisk": {"image": "demo-disk:latest"}}]}}}})
}

#[tokio::test(flavor = "multi_thread")]
async fn vmis_are_expanded_from_the_vms_copy() {
    let p = plane();
    let it = kind("virtualmachineinstancetypes");
    for (name, cpus, mem) in [("small", 2, "192Mi"), ("big", 4, "2Gi")] {
        p.registry
            .create(
                it,
                "default",
                json!({"metadata": {"name": name},
                       "spec": {"cpu": {"guest": cpus}, "memory": {"guest": mem}}}),
            )
            .await
            .unwrap();
    }
    p.registry
        .create(
            kind("virtualmachineclusterpreferences"),
            "",
            json!({"metadata": {"name": "sata"},
                   "spec": {"devices": {"preferredDiskBus": "sata"},
                            "cpu": {"preferredCPUTopology": "cores"}}}),
        )
        .await
        .unwrap();
    let vms = kind("virtualmachines");
    p.registry
        .create(vms, "default", vm_with_instancetype("ok", "small", None))
        .await
        .unwrap();
    p.registry
        .create(
            vms,
            "default",
            vm_with_instancetype("clash", "big", Some("128Mi")),
        )
        .await
        .unwrap();

    let vmi = until("VMI of ok", || get(&p, "virtualmachineinstances", "ok")).await;
    let d = &vmi["spec"]["domain"];
    assert_eq!(d["cpu"]["cores"], 2, "{d}");
    assert_eq!(d["cpu"]["sockets"], 1);
    assert_eq!(d["memory"]["guest"], "192Mi");
    assert_eq!(d["devices"]["disks"][0]["disk"]["bus"], "sata");
    let vm = get(&p, "virtualmachines", "ok").await.unwrap();
    let copy: Value = serde_json::from_str(
        vm["metadata"]["annotations"]["krvirt.io/instancetype-snapshot"]
            .as_str()
            .expect("copy recorded"),
    )
    .unwrap();
    assert_eq!(copy["spec"]["cpu"]["guest"], 2);

    // The conflicting VM: a Failure condition naming the field, no VMI.
    let f = until("clash reported", || async {
        let vm = get(&p, "virtualmachines", "clash").await?;
        condition(&vm, "Failure").filter(|c| c["reason"] == "InvalidInstancetype")
    })
    .await;
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("spec.template.spec.domain.memory.guest"),
        "{f}"
    );
    assert!(get(&p, "virtualmachineinstances", "clash").await.is_none());
    until("an InvalidInstancetype event", || async {
        let (events, _) = p
            .registry
            .list(kind("events"), None, &krvirt_server::Selector::everything())
            .await
            .ok()?;
        events
            .iter()
            .any(|e| e["reason"] == "InvalidInstancetype" && e["involvedObject"]["name"] == "clash")
            .then_some(())
    })
    .await;

    // Editing the instancetype does not reach the VM: its next VMI is the same.
    p.registry
        .merge_patch(
            it,
            "default",
            "small",
            &json!({"spec": {"cpu": {"guest": 8}}}),
            Subresource::Main,
        )
        .await
        .unwrap();
    let uid = vmi["metadata"]["uid"].clone();
    p.registry
        .delete(
            kind("virtualmachineinstances"),
            "default",
            "ok",
            &Default::default(),
        )
        .await
        .unwrap();
    let vmi = until("a new VMI of ok", || async {
        get(&p, "virtualmachineinstances", "ok")
            .await
            .filter(|v| v["metadata"]["uid"] != uid)
    })
    .await;
    assert_eq!(vmi["spec"]["domain"]["cpu"]["cores"], 2);

    // A later write of the VM that conflicts with its copy is a 422.
    let e = p
        .registry
        .merge_patch(
            vms,
            "default",
            "ok",
            &json!({"spec": {"template": {"spec": {"domain": {"memory": {"guest": "1Gi"}}}}}}),
            Subresource::Main,
        )
        .await
        .expect_err("conflict");
    assert_eq!(e.code(), 422, "{e}");
    assert!(
        e.to_string()
            .contains("spec.template.spec.domain.memory.guest"),
        "{e}"
    );
}
