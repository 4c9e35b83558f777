use super::*;

const NOW: &str = "2026-01-01T00:00:00Z";

fn restore(target: &str, status: Value) -> VirtualMachineRestore {
    serde_json::from_value(json!({
        "metadata": {"name": "r", "namespace": "default", "uid": "ruid"},
        "spec": {"target": {"kind": "VirtualMachine", "name": target},
                 "virtualMachineSnapshotName": "s"},
        "status": status,
    }))
    .unwrap()
}

fn snapshot(memory: bool) -> VirtualMachineSnapshot {
    let mut ind = vec!["Online", "NoGuestAgent"];
    if memory {
        ind.push("Memory");
    }
    serde_json::from_value(json!({
        "metadata": {"name": "s", "namespace": "default", "uid": "suid"},
        "spec": {"source": {"kind": "VirtualMachine", "name": "src"}},
        "status": {"readyToUse": true, "phase": "Succeeded", "volumes": ["src-data"],
            "indications": ind,
            "memoryStateHost": if memory { json!("host1") } else { Value::Null },
            "virtualMachineSnapshotContentName": "vmsnapshot-content-suid"},
    }))
    .unwrap()
}

fn source_vm() -> Value {
    json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
    "metadata": {"name": "src", "namespace": "default", "uid": "vmuid"},
    "spec": {"runStrategy": "Always", "template": {"spec": {
        "domain": {"devices": {}},
        "volumes": [
            {"name": "boot", "containerDisk": {"image": "demo"}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "src-data"}},
        ]}}}})
}

fn content() -> VirtualMachineSnapshotContent {
    serde_json::from_value(json!({
        "metadata": {"name": "vmsnapshot-content-suid", "namespace": "default"},
        "spec": {"source": {"virtualMachine": source_vm()}, "virtualMachineSnapshotName": "s"},
    }))
    .unwrap()
}

fn volume(name: &str, phase: &str, host: &str) -> (String, StorageVolume) {
    let v = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"pool": "dirpool", "source": {"blank": {}}, "capacity": "64Mi"},
        "status": {"phase": phase, "host": host},
    }))
    .unwrap();
    (name.to_string(), v)
}

fn vm(name: &str, annotations: Value) -> VirtualMachine {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {"template": {"spec": {"domain": {"devices": {}}}}},
    }))
    .unwrap()
}

fn new_vm_plan(
    r: &VirtualMachineRestore,
    s: &VirtualMachineSnapshot,
    c: Option<&VirtualMachineSnapshotContent>,
    vols: &BTreeMap<String, StorageVolume>,
) -> Plan {
    decide(
        &View {
            restore: r,
            snapshot: Some(s),
            content: c,
            target: None,
            target_has_vmi: false,
            volumes: vols,
        },
        NOW,
    )
}

fn reason(p: &Plan) -> String {
    p.status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .and_then(|c| c.reason.clone())
        .unwrap_or_default()
}

#[test]
fn a_new_vm_gets_its_volumes_first_then_the_vm() {
    let r = restore("dst", json!({}));
    let s = snapshot(false);
    let c = content();
    let mut vols: BTreeMap<_, _> = [volume("src-data", "Succeeded", "host1")].into();
    // 1: the Volume from the pool snapshot, in the source's pool.
    let p = new_vm_plan(&r, &s, Some(&c), &vols);
    assert_eq!(p.create_volumes.len(), 1, "{p:?}");
    let v = &p.create_volumes[0];
    assert_eq!(v["metadata"]["name"], "restore-ruid-data");
    assert_eq!(v["spec"]["pool"], "dirpool");
    assert_eq!(
        v["spec"]["source"]["snapshot"],
        json!({"volume": "src-data", "name": "vmsnap-suid"})
    );
    assert!(p.create_vm.is_none());
    assert_eq!(reason(&p), "RestoreInProgress");
    assert_eq!(p.status.restores, vec!["restore-ruid-data".to_string()]);
    // 2: provisioning: wait, create nothing again.
    vols.extend([volume("restore-ruid-data", "Pending", "")]);
    let p = new_vm_plan(&r, &s, Some(&c), &vols);
    assert!(p.create_volumes.is_empty() && p.create_vm.is_none());
    assert_eq!(p.status.complete, None);
    // 3: ready: the VM, complete.
    vols.extend([volume("restore-ruid-data", "Succeeded", "host1")]);
    let p = new_vm_plan(&r, &s, Some(&c), &vols);
    let new = p.create_vm.as_ref().unwrap();
    assert_eq!(new["metadata"]["name"], "dst");
    assert_eq!(new["metadata"]["namespace"], "default");
    assert_eq!(
        new["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"],
        "restore-ruid-data"
    );
    assert_eq!(
        new["metadata"]["annotations"][RESTORED_BY_ANNOTATION],
        "ruid"
    );
    assert_eq!(p.status.complete, Some(true));
    assert_eq!(p.status.restore_time.as_deref(), Some(NOW));
    assert_eq!(reason(&p), "Succeeded");
    // A failed Volume fails the restore.
    vols.extend([volume("restore-ruid-data", "Failed", "host1")]);
    let p = new_vm_plan(&r, &s, Some(&c), &vols);
    assert_eq!(reason(&p), "Failed");
    assert_eq!(p.status.complete, Some(false));
}

#[test]
fn a_new_vm_waits_for_the_definition_and_fails_when_it_is_gone() {
    let r = restore("dst", json!({}));
    let vols: BTreeMap<_, _> = [volume("src-data", "Succeeded", "host1")].into();
    let mut s = snapshot(false);
    // The snapshot names its content, which is gone.
    let p = new_vm_plan(&r, &s, None, &vols);
    assert_eq!(reason(&p), "Failed");
    assert!(
        p.status.conditions[0]
            .message
            .as_deref()
            .unwrap()
            .contains("vmsnapshot-content-suid"),
        "{p:?}"
    );
    // An older snapshot (no content recorded): wait for its host to publish it.
    s.status
        .as_mut()
        .unwrap()
        .virtual_machine_snapshot_content_name = None;
    let p = new_vm_plan(&r, &s, None, &vols);
    assert_eq!(reason(&p), "RestoreInProgress");
    assert!(p.create_volumes.is_empty() && p.create_vm.is_none());
}

#[test]
fn the_new_vm_made_by_this_restore_completes_it() {
    let r = restore("dst", json!({}));
    let s = snapshot(false);
    let made = vm("dst", json!({RESTORED_BY_ANNOTATION: "ruid"}));
    let other = vm("dst", json!({}));
    let vols = BTreeMap::new();
    let mut view = View {
        restore: &r,
        snapshot: Some(&s),
        content: None,
        target: Some(&made),
        target_has_vmi: true,
        volumes: &vols,
    };
    let p = decide(&view, NOW);
    assert_eq!(p.status.complete, Some(true));
    assert!(p.create_vm.is_none() && p.vm_annotations.is_none());
    // Another existing VM of that name is refused.
    view.target = Some(&other);
    let p = decide(&view, NOW);
    assert_eq!(reason(&p), "Failed");
}

#[test]
fn in_place_waits_for_the_stop_and_the_hosts_revert() {
    let s = snapshot(true);
    let target = vm("src", json!({}));
    let vols: BTreeMap<_, _> = [volume("src-data", "Succeeded", "host1")].into();
    let r = restore("src", json!({}));
    let mut view = View {
        restore: &r,
        snapshot: Some(&s),
        content: None,
        target: Some(&target),
        target_has_vmi: true,
        volumes: &vols,
    };
    let p = decide(&view, NOW);
    assert_eq!(reason(&p), "VMRunning");
    assert!(p.vm_annotations.is_none());
    view.target_has_vmi = false;
    let p = decide(&view, NOW);
    assert_eq!(reason(&p), "RestoreInProgress");
    assert!(
        p.status.conditions[0]
            .message
            .as_deref()
            .unwrap()
            .contains("host1")
    );
    assert_eq!(p.status.complete, None);
    // Patches are for new VMs only.
    let mut patched = restore("src", json!({}));
    patched.spec.patches = vec![r#"{"op":"remove","path":"/metadata/labels"}"#.into()];
    view.restore = &patched;
    assert_eq!(reason(&decide(&view, NOW)), "Failed");
}

#[test]
fn in_place_memory_marks_the_vm_to_resume_on_the_states_host() {
    let r = restore(
        "src",
        json!({"volumesRestored": true, "restores": ["src-data"]}),
    );
    let s = snapshot(true);
    let target = vm("src", json!({}));
    let vols: BTreeMap<_, _> = [volume("src-data", "Succeeded", "host1")].into();
    let mut view = View {
        restore: &r,
        snapshot: Some(&s),
        content: None,
        target: Some(&target),
        target_has_vmi: false,
        volumes: &vols,
    };
    let p = decide(&view, NOW);
    assert_eq!(
        p.vm_annotations,
        Some(json!({RESUME_FROM_ANNOTATION: "suid", RESUME_HOST_ANNOTATION: "host1"}))
    );
    assert_eq!(p.status.complete, Some(true));
    assert_eq!(p.status.restores, vec!["src-data".to_string()]);
    // Already marked (a status write lost): no patch again.
    let marked = vm(
        "src",
        json!({RESUME_FROM_ANNOTATION: "suid", RESUME_HOST_ANNOTATION: "host1"}),
    );
    view.target = Some(&marked);
    let p = decide(&view, NOW);
    assert_eq!(p.vm_annotations, None);
    assert_eq!(p.status.complete, Some(true));
    // Started in between: no mark (the guest booted from the restored disks).
    view.target = Some(&target);
    view.target_has_vmi = true;
    let p = decide(&view, NOW);
    assert_eq!(p.vm_annotations, None);
    assert_eq!(p.status.complete, Some(true));
    assert!(
        p.status.conditions[0]
            .message
            .as_deref()
            .unwrap()
            .contains("booted from the restored disks")
    );
}

#[test]
fn in_place_without_memory_clears_a_stale_mark() {
    let r = restore("src", json!({"volumesRestored": true}));
    let s = snapshot(false);
    let target = vm(
        "src",
        json!({RESUME_FROM_ANNOTATION: "old", RESUME_HOST_ANNOTATION: "host0"}),
    );
    let vols = BTreeMap::new();
    let p = decide(
        &View {
            restore: &r,
            snapshot: Some(&s),
            content: None,
            target: Some(&target),
            target_has_vmi: false,
            volumes: &vols,
        },
        NOW,
    );
    assert_eq!(
        p.vm_annotations,
        Some(json!({RESUME_FROM_ANNOTATION: null, RESUME_HOST_ANNOTATION: null}))
    );
    assert_eq!(p.status.complete, Some(true));
}

#[test]
fn a_missing_or_unready_snapshot() {
    let r = restore("src", json!({}));
    let vols = BTreeMap::new();
    let mut view = View {
        restore: &r,
        snapshot: None,
        content: None,
        target: None,
        target_has_vmi: false,
        volumes: &vols,
    };
    assert_eq!(reason(&decide(&view, NOW)), "Failed");
    let mut s = snapshot(false);
    s.status.as_mut().unwrap().ready_to_use = Some(false);
    view.snapshot = Some(&s);
    let p = decide(&view, NOW);
    assert_eq!(reason(&p), "SnapshotNotReady");
    // KubeVirt's pair: Progressing true while waiting.
    assert!(
        p.status.conditions.iter().any(
            |c| c.type_ == "Progressing" && c.status == krvirt_api::meta::ConditionStatus::True
        )
    );
}
