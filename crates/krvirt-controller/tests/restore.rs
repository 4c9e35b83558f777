//! The restore controller with the VM and placement controllers over a
//! real embedded store (no root, no QEMU): what the host agents do (a
//! Volume provisioned, Volumes reverted, a snapshot taken) is written here
//! the way the agent writes it. A restore into a new VM creates the
//! Volume from the pool snapshot, then the VM from the snapshot's content;
//! a memory restore marks the VM with the state's host, the next start's
//! VMI carries the mark (the VM loses it) and is bound to that host even
//! though it prefers another; when the state's host is gone the VMI loses
//! the mark, boots anywhere, and an event says why.

use krvirt_server::{Selector, Subresource};
use serde_json::{Value, json};

mod common;
use common::{Plane, kind, plane, until};

impl Plane {
    async fn create(&self, plural: &str, obj: Value) -> Value {
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
        self.registry
            .create(kind(plural), ns, obj.clone())
            .await
            .unwrap_or_else(|e| panic!("create {obj}: {e}"))
    }
    async fn get(&self, plural: &str, name: &str) -> Option<Value> {
        self.registry.get(kind(plural), "default", name).await.ok()
    }
    /// Merge `status` into the object's status (as its agent does).
    async fn status(&self, plural: &str, name: &str, status: Value) {
        let ns = if plural == "hosts" { "" } else { "default" };
        self.registry
            .merge_patch(
                kind(plural),
                ns,
                name,
                &json!({ "status": status }),
                Subresource::Status,
            )
            .await
            .unwrap_or_else(|e| panic!("status of {plural}/{name}: {e}"));
    }
    async fn host(&self, name: &str) {
        self.registry
            .create(
                kind("hosts"),
                "",
                json!({"apiVersion": "krvirt.io/v1", "kind": "Host",
                       "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}}),
            )
            .await
            .unwrap();
        self.status(
            "hosts",
            name,
            json!({"capacity": {"cpu": "8", "memory": "16Gi"},
                   "heartbeatTime": krvirt_api::meta::now_rfc3339(),
                   "conditions": [{"type": "Ready", "status": "True"}]}),
        )
        .await;
    }
    async fn events(&self, reason: &str) -> Vec<Value> {
        let (items, _) = self
            .registry
            .list(kind("events"), None, &Selector::everything())
            .await
            .unwrap();
        items
            .into_iter()
            .filter(|e| e["reason"] == reason)
            .collect()
    }
}

fn vm(name: &str, run: &str, claim: &str, placement: Value) -> Value {
    let mut spec = json!({
        "domain": {"memory": {"guest": "64Mi"}, "devices": {"disks": [
            {"name": "data", "disk": {"bus": "virtio"}}]}},
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
    });
    if let Some(o) = placement.as_object() {
        for (k, v) in o {
            spec[k] = v.clone();
        }
    }
    json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"runStrategy": run, "template": {"spec": spec}}})
}

/// A Volume the agent of `host` has provisioned.
async fn volume(p: &Plane, name: &str, host: &str) {
    p.create(
        "volumes",
        json!({"apiVersion": "krvirt.io/v1", "kind": "Volume",
               "metadata": {"name": name, "namespace": "default"},
               "spec": {"pool": "default", "capacity": "64Mi", "source": {"blank": {}}}}),
    )
    .await;
    p.status("volumes", name, json!({"phase": "Succeeded", "host": host}))
        .await;
}

/// A snapshot of VM `vm` as the agent of `host` leaves it: ready, its
/// content holding the VM definition; with `memory`, the state on `host`.
async fn snapshot(p: &Plane, name: &str, vm: &str, host: &str, memory: bool) -> String {
    let s = p
        .create(
            "virtualmachinesnapshots",
            json!({"apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshot",
                   "metadata": {"name": name, "namespace": "default"},
                   "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": vm}}}),
        )
        .await;
    let uid = s["metadata"]["uid"].as_str().unwrap().to_string();
    let content = krvirt_api::snapshot::content_name(&uid);
    let source = p.get("virtualmachines", vm).await.unwrap();
    p.create(
        "virtualmachinesnapshotcontents",
        json!({"apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineSnapshotContent",
               "metadata": {"name": content, "namespace": "default"},
               "spec": {"source": {"virtualMachine": source}, "virtualMachineSnapshotName": name}}),
    )
    .await;
    let mut st = json!({"phase": "Succeeded", "readyToUse": true,
        "volumes": [format!("{vm}-data")], "virtualMachineSnapshotContentName": content,
        "indications": ["Online", "NoGuestAgent"]});
    if memory {
        st["indications"] = json!(["Online", "NoGuestAgent", "Memory"]);
        st["memoryStateBytes"] = json!(1_000_000);
        st["memoryStateHost"] = json!(host);
    }
    p.status("virtualmachinesnapshots", name, st).await;
    uid
}

async fn restore(p: &Plane, name: &str, snapshot: &str, target: &str) -> Value {
    p.create(
        "virtualmachinerestores",
        json!({"apiVersion": "snapshot.kubevirt.io/v1beta1", "kind": "VirtualMachineRestore",
               "metadata": {"name": name, "namespace": "default"},
               "spec": {"target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": target},
                        "virtualMachineSnapshotName": snapshot}}),
    )
    .await
}

fn ready_reason(r: &Value) -> String {
    r["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_into_a_new_vm_is_made_by_the_control_plane() {
    let p = plane();
    volume(&p, "src-data", "h1").await;
    p.create(
        "virtualmachines",
        vm("src", "Halted", "src-data", json!({})),
    )
    .await;
    let suid = snapshot(&p, "s", "src", "h1", false).await;
    let r = restore(&p, "to-new", "s", "dst").await;
    let rid = r["metadata"]["uid"].as_str().unwrap().to_string();
    // The Volume from the pool snapshot, in the source's pool.
    let new = format!("restore-{rid}-data");
    let v = until("restored Volume created", || p.get("volumes", &new)).await;
    assert_eq!(
        v["spec"]["source"]["snapshot"],
        json!({"volume": "src-data", "name": format!("vmsnap-{suid}")})
    );
    assert_eq!(v["spec"]["pool"], "default");
    let r = p.get("virtualmachinerestores", "to-new").await.unwrap();
    assert_eq!(ready_reason(&r), "RestoreInProgress", "{r}");
    assert!(p.get("virtualmachines", "dst").await.is_none());
    // The agent of h1 provisions it: the VM follows, the restore completes.
    p.status("volumes", &new, json!({"phase": "Succeeded", "host": "h1"}))
        .await;
    let dst = until("VM dst created", || p.get("virtualmachines", "dst")).await;
    assert_eq!(
        dst["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        new.as_str()
    );
    assert_eq!(dst["metadata"]["annotations"]["krvirt.io/restored-by"], rid);
    let r = until("restore complete", || async {
        let r = p.get("virtualmachinerestores", "to-new").await?;
        (r["status"]["complete"] == true).then_some(r)
    })
    .await;
    assert_eq!(ready_reason(&r), "Succeeded", "{r}");
    assert!(r["status"]["restoreTime"].is_string(), "{r}");
    until("a VirtualMachineRestoreComplete event", || async {
        (!p.events("VirtualMachineRestoreComplete").await.is_empty()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_restore_resumes_on_the_states_host_or_boots_fresh_without_it() {
    let p = plane();
    p.host("h1").await;
    p.host("h2").await;
    volume(&p, "src-data", "h1").await;
    // The VM prefers h2; its memory state is on h1.
    let prefer_h2 = json!({"affinity": {"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": {
            "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["h2"]}]}}]}}});
    p.create(
        "virtualmachines",
        vm("src", "Halted", "src-data", prefer_h2.clone()),
    )
    .await;
    let suid = snapshot(&p, "s", "src", "h1", true).await;
    restore(&p, "r", "s", "src").await;
    // The controller waits for the host's revert.
    until("restore waits for the revert", || async {
        let r = p.get("virtualmachinerestores", "r").await?;
        (ready_reason(&r) == "RestoreInProgress").then_some(())
    })
    .await;
    let vm0 = p.get("virtualmachines", "src").await.unwrap();
    assert!(vm0["metadata"]["annotations"]["krvirt.io/resume-from-snapshot"].is_null());
    p.status(
        "virtualmachinerestores",
        "r",
        json!({"restores": ["src-data"], "volumesRestored": true}),
    )
    .await;
    until("restore complete", || async {
        let r = p.get("virtualmachinerestores", "r").await?;
        (r["status"]["complete"] == true).then_some(())
    })
    .await;
    let vm1 = p.get("virtualmachines", "src").await.unwrap();
    assert_eq!(
        vm1["metadata"]["annotations"]["krvirt.io/resume-from-snapshot"],
        suid.as_str()
    );
    assert_eq!(
        vm1["metadata"]["annotations"]["krvirt.io/resume-host"],
        "h1"
    );
    // Start: the VMI carries the mark, the VM loses it, h1 is chosen.
    p.registry
        .merge_patch(
            kind("virtualmachines"),
            "default",
            "src",
            &json!({"spec": {"runStrategy": "Always"}}),
            Subresource::Main,
        )
        .await
        .unwrap();
    let vmi = until("VMI bound", || async {
        let v = p.get("virtualmachineinstances", "src").await?;
        v["status"]["nodeName"].is_string().then_some(v)
    })
    .await;
    assert_eq!(vmi["status"]["nodeName"], "h1", "{vmi}");
    assert_eq!(
        vmi["metadata"]["annotations"]["krvirt.io/resume-from-snapshot"],
        suid.as_str()
    );
    until("the VM's mark consumed", || async {
        let vm = p.get("virtualmachines", "src").await?;
        vm["metadata"]["annotations"]["krvirt.io/resume-from-snapshot"]
            .is_null()
            .then_some(())
    })
    .await;

    // A VM whose state's host is gone: the VMI loses the mark, an event
    // says why, and it is placed by its own preference (h2).
    // (Its Volume is on a shared pool: a host-local one would pin the VMI
    // to the Volume's host whatever it prefers.)
    p.create(
        "storagepools",
        json!({"apiVersion": "krvirt.io/v1", "kind": "StoragePool",
               "metadata": {"name": "nfs"},
               "spec": {"type": "dir", "path": "/srv/nfs", "shared": true}}),
    )
    .await;
    p.create(
        "volumes",
        json!({"apiVersion": "krvirt.io/v1", "kind": "Volume",
               "metadata": {"name": "other-data", "namespace": "default"},
               "spec": {"pool": "nfs", "capacity": "64Mi", "source": {"blank": {}}}}),
    )
    .await;
    p.status(
        "volumes",
        "other-data",
        json!({"phase": "Succeeded", "host": "h1"}),
    )
    .await;
    let mut other = vm("other", "Always", "other-data", prefer_h2);
    other["metadata"]["annotations"] = json!({
        "krvirt.io/resume-from-snapshot": suid, "krvirt.io/resume-host": "gone"});
    p.create("virtualmachines", other).await;
    let vmi = until("VMI other bound", || async {
        let v = p.get("virtualmachineinstances", "other").await?;
        v["status"]["nodeName"].is_string().then_some(v)
    })
    .await;
    assert_eq!(vmi["status"]["nodeName"], "h2", "{vmi}");
    assert!(
        vmi["metadata"]["annotations"]["krvirt.io/resume-from-snapshot"].is_null(),
        "{vmi}"
    );
    let ev = until("a ResumeHostUnavailable event", || async {
        p.events("ResumeHostUnavailable").await.into_iter().next()
    })
    .await;
    assert!(
        ev["message"].as_str().unwrap().contains("host gone"),
        "{ev}"
    );
}
