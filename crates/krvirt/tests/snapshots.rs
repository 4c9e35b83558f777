//! Snapshots, restores and clones end to end, under TCG, on a `dir` pool:
//! a memory snapshot whose restore resumes the guest (its TICK counter
//! goes on from the snapshot's value, no new boot); deleting the middle of
//! three snapshots leaves the other two restorable; a restore into a new
//! VM and a VirtualMachineClone make VMs with their own copies of the
//! disks, independent of the source.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const IMAGE: &str = "quay.io/kubevirt/cirros-container-disk-demo";
const SNAPS: &str = "/apis/snapshot.kubevirt.io/v1beta1/namespaces/default/virtualmachinesnapshots";
const RESTORES: &str =
    "/apis/snapshot.kubevirt.io/v1beta1/namespaces/default/virtualmachinerestores";
const CLONES: &str = "/apis/clone.kubevirt.io/v1beta1/namespaces/default/virtualmachineclones";

fn apply(inst: &Instance, name: &str, yaml: &str) {
    let path = inst.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    inst.ok(&["apply", "-f", path.to_str().unwrap()]);
}

/// Type `commands` on a VM's serial console (the `console` verb); returns
/// what came back.
async fn console(inst: &Instance, vm: &str, commands: &str) -> String {
    inst.console_type(vm, commands, Duration::from_secs(3))
        .await
}

/// Write `word.` at the start of the VM's data disk; the guest confirms.
/// (Typed again if the shell was not listening yet: the write is
/// idempotent.)
async fn write_data(inst: &Instance, vm: &str, word: &str) {
    let mut out = String::new();
    for _ in 0..3 {
        out = console(
            inst,
            vm,
            &format!("printf {word}. > /dev/vdb; sync; echo W-{word}-$((40+2))"),
        )
        .await;
        if out.contains(&format!("W-{word}-42")) {
            return;
        }
    }
    panic!("write {word} on {vm}: {out}");
}

/// What the start of the VM's data disk says (up to the first '.').
async fn read_data(inst: &Instance, vm: &str) -> String {
    let mut out = String::new();
    for _ in 0..3 {
        out = console(
            inst,
            vm,
            "echo READ-$(dd if=/dev/vdb bs=64 count=1 2>/dev/null | head -n1 | cut -d. -f1)-END",
        )
        .await;
        if let Some(w) = out
            .split("READ-")
            .filter_map(|s| s.split_once("-END").map(|(w, _)| w.to_string()))
            .find(|w| !w.starts_with('$'))
        {
            return w;
        }
    }
    panic!("no READ- answer from {vm}: {out}");
}

fn vm_yaml(name: &str, labels: &str) -> String {
    format!(
        r#"apiVersion: krvirt.io/v1
kind: Volume
metadata:
  name: {name}-data
spec:
  pool: default
  capacity: 64Mi
  source:
    blank: {{}}
---
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: {name}
  labels:
{labels}
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        devices:
          disks:
          - name: root
            disk: {{bus: virtio}}
          - name: data
            disk: {{bus: virtio}}
        memory:
          guest: 128Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - name: root
        containerDisk:
          image: {IMAGE}
      - name: data
        persistentVolumeClaim:
          claimName: {name}-data
"#
    )
}

async fn snapshot(inst: &Instance, name: &str, vm: &str, memory: bool) -> Value {
    let extra = if memory {
        "  includeMemory: true\n"
    } else {
        ""
    };
    apply(
        inst,
        name,
        &format!(
            "apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineSnapshot\nmetadata:\n  name: {name}\nspec:\n  source:\n    apiGroup: kubevirt.io\n    kind: VirtualMachine\n    name: {vm}\n{extra}"
        ),
    );
    let s = inst
        .until(
            &format!("snapshot {name} ready"),
            Duration::from_secs(90),
            || async {
                let s = inst.get(&format!("{SNAPS}/{name}")).await.ok()?;
                assert_ne!(s["status"]["phase"], "Failed", "{s}");
                (s["status"]["readyToUse"] == true).then_some(s)
            },
        )
        .await;
    assert_eq!(s["status"]["phase"], "Succeeded", "{s}");
    s
}

async fn restore(inst: &Instance, name: &str, snapshot: &str, target: &str, extra: &str) -> Value {
    apply(
        inst,
        name,
        &format!(
            "apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineRestore\nmetadata:\n  name: {name}\nspec:\n  target:\n    apiGroup: kubevirt.io\n    kind: VirtualMachine\n    name: {target}\n  virtualMachineSnapshotName: {snapshot}\n{extra}"
        ),
    );
    inst.until(
        &format!("restore {name} complete"),
        Duration::from_secs(90),
        || async {
            let r = inst.get(&format!("{RESTORES}/{name}")).await.ok()?;
            (r["status"]["complete"] == true).then_some(r)
        },
    )
    .await
}

async fn stop(inst: &Instance, vm: &str) {
    inst.ok(&["stop", vm]);
    inst.until(
        &format!("VMI {vm} gone"),
        Duration::from_secs(60),
        || async { inst.vmi(vm).await.is_none().then_some(()) },
    )
    .await;
}

/// Internal snapshots of a dir-pool Volume's qcow2 file.
fn pool_snapshots(inst: &Instance, volume: &str) -> String {
    let file = inst
        .data_dir()
        .join("pools/default")
        .join(format!("default.{volume}.qcow2"));
    let out = Command::new("qemu-img")
        .args(["snapshot", "-U", "-l"])
        .arg(&file)
        .output()
        .expect("qemu-img is needed");
    assert!(
        out.status.success(),
        "qemu-img snapshot -l {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_snapshot_resumes_and_deleting_a_middle_snapshot_spares_its_siblings() {
    let inst = Instance::start().await;
    apply(&inst, "mem-vm", &vm_yaml("mem-vm", "    app: mem"));
    let (uid1, _) = inst.running_vmi("mem-vm", None).await;
    inst.console_shows("mem-vm", "TICK 2").await;

    write_data(&inst, "mem-vm", "FIRST").await;
    let s1 = snapshot(&inst, "s1", "mem-vm", false).await;
    write_data(&inst, "mem-vm", "SECOND").await;
    let s2 = snapshot(&inst, "s2", "mem-vm", false).await;
    write_data(&inst, "mem-vm", "THIRD").await;

    // The memory snapshot: the guest's TICK at that instant lies between
    // the last tick seen before and the first seen after.
    let before = last_tick(&inst.console_log("mem-vm").await).unwrap();
    let s3 = snapshot(&inst, "s3", "mem-vm", true).await;
    let after = last_tick(&inst.console_log("mem-vm").await).unwrap();
    let ind = s3["status"]["indications"].to_string();
    assert!(ind.contains("Memory") && ind.contains("Online"), "{s3}");
    let state = s3["status"]["memoryStateBytes"].as_u64().unwrap_or(0);
    assert!(state > 100_000, "memory state of {state} bytes: {s3}");
    let uid3 = s3["metadata"]["uid"].as_str().unwrap().to_string();
    let mem_dir = inst.data_dir().join("snapshots").join(&uid3);
    assert!(mem_dir.join("memory.qcow2").exists());
    inst.console_shows("mem-vm", &format!("TICK {}", after + 3))
        .await;

    // Delete the middle snapshot: its pool snapshot goes, the others stay.
    let snaps = pool_snapshots(&inst, "mem-vm-data");
    let tag = |s: &Value| format!("vmsnap-{}", s["metadata"]["uid"].as_str().unwrap());
    for s in [&s1, &s2, &s3] {
        assert!(snaps.contains(&tag(s)), "{snaps}");
    }
    inst.ok(&["delete", "vmsnapshot", "s2"]);
    inst.until("s2 gone", Duration::from_secs(60), || async {
        inst.get(&format!("{SNAPS}/s2"))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let snaps = pool_snapshots(&inst, "mem-vm-data");
    assert!(!snaps.contains(&tag(&s2)), "s2 still in the pool: {snaps}");
    assert!(
        snaps.contains(&tag(&s1)) && snaps.contains(&tag(&s3)),
        "{snaps}"
    );
    // The running guest's disk is untouched.
    assert_eq!(read_data(&inst, "mem-vm").await, "THIRD");

    // Restore the first (a disk snapshot): a fresh boot reads FIRST.
    stop(&inst, "mem-vm").await;
    restore(&inst, "r1", "s1", "mem-vm", "").await;
    inst.ok(&["start", "mem-vm"]);
    let (uid2, _) = inst.running_vmi("mem-vm", Some(&uid1)).await;
    inst.console_shows("mem-vm", "TICK 2").await;
    assert_eq!(read_data(&inst, "mem-vm").await, "FIRST");

    // Restore the third (with memory): the guest resumes, no new boot,
    // its counter goes on from the snapshot's value.
    stop(&inst, "mem-vm").await;
    restore(&inst, "r3", "s3", "mem-vm", "").await;
    let vm = inst.vm("mem-vm").await.unwrap();
    assert_eq!(
        vm["metadata"]["annotations"]["krvirt.io/resume-from-snapshot"],
        uid3.as_str(),
        "{vm}"
    );
    inst.ok(&["start", "mem-vm"]);
    let (uid3_vmi, _) = inst.running_vmi("mem-vm", Some(&uid2)).await;
    assert_ne!(uid3_vmi, uid1);
    let log = inst
        .console_shows("mem-vm", &format!("TICK {}", after + 2))
        .await;
    assert!(
        !log.contains("GUEST-BOOTED"),
        "the guest booted instead of resuming:\n{log}"
    );
    let first = log
        .lines()
        .filter_map(|l| l.trim().strip_prefix("TICK "))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .next()
        .unwrap();
    assert!(
        first > before && first <= after + 1,
        "first TICK after resume is {first}; the snapshot was taken between TICK {before} and {after}:\n{log}"
    );
    assert_eq!(read_data(&inst, "mem-vm").await, "THIRD");
    // The resume mark is consumed: a later start boots normally.
    let vm = inst.vm("mem-vm").await.unwrap();
    assert!(
        vm["metadata"]["annotations"]["krvirt.io/resume-from-snapshot"].is_null(),
        "{vm}"
    );

    // Deleting the memory snapshot removes its saved state too.
    inst.ok(&["delete", "vmsnapshot", "s3"]);
    inst.until("s3 gone", Duration::from_secs(60), || async {
        inst.get(&format!("{SNAPS}/s3"))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(!mem_dir.exists(), "{} still there", mem_dir.display());
    let snaps = pool_snapshots(&inst, "mem-vm-data");
    assert!(
        !snaps.contains(&uid3) && snaps.contains(&tag(&s1)),
        "{snaps}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_into_a_new_vm_and_clone_are_independent_of_their_source() {
    let inst = Instance::start().await;
    apply(
        &inst,
        "src",
        &vm_yaml("src", "    app: src\n    drop.me/x: \"z\""),
    );
    inst.running_vmi("src", None).await;
    inst.console_shows("src", "TICK 2").await;
    write_data(&inst, "src", "ONE").await;
    snapshot(&inst, "src-snap", "src", false).await;
    write_data(&inst, "src", "TWO").await;

    // Restore into a VM that does not exist yet, with a patch.
    let r = restore(
        &inst,
        "to-new",
        "src-snap",
        "restored",
        "  patches:\n  - '{\"op\":\"add\",\"path\":\"/metadata/labels/restored\",\"value\":\"yes\"}'\n",
    )
    .await;
    let vol = r["status"]["restores"][0].as_str().unwrap().to_string();
    assert!(vol.starts_with("restore-"), "{r}");
    let vm = inst.vm("restored").await.expect("the restored VM exists");
    assert_eq!(vm["metadata"]["labels"]["restored"], "yes", "{vm}");
    assert_eq!(
        vm["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"],
        vol.as_str(),
        "{vm}"
    );
    inst.running_vmi("restored", None).await;
    inst.console_shows("restored", "TICK 2").await;
    assert_eq!(read_data(&inst, "restored").await, "ONE");
    assert_eq!(read_data(&inst, "src").await, "TWO");
    stop(&inst, "restored").await;

    // Clone the running source VM.
    apply(
        &inst,
        "clone",
        "kind: VirtualMachineClone\napiVersion: clone.kubevirt.io/v1beta1\nmetadata:\n  name: c1\nspec:\n  source:\n    apiGroup: kubevirt.io\n    kind: VirtualMachine\n    name: src\n  target:\n    apiGroup: kubevirt.io\n    kind: VirtualMachine\n    name: src-clone\n  labelFilters:\n  - '*'\n  - '!drop.me/*'\n  newSMBiosSerial: clone-serial\n",
    );
    let c = inst
        .until("clone Succeeded", Duration::from_secs(120), || async {
            let c = inst.get(&format!("{CLONES}/c1")).await.ok()?;
            assert_ne!(c["status"]["phase"], "Failed", "{c}");
            (c["status"]["phase"] == "Succeeded").then_some(c)
        })
        .await;
    assert_eq!(c["status"]["targetName"], "src-clone", "{c}");
    // The temporary snapshot and restore are gone.
    let tmp = c["status"]["snapshotName"].as_str().unwrap().to_string();
    inst.until(
        "temporary snapshot deleted",
        Duration::from_secs(60),
        || async {
            inst.get(&format!("{SNAPS}/{tmp}"))
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    let vm = inst.vm("src-clone").await.expect("the clone exists");
    assert_eq!(vm["metadata"]["labels"]["app"], "src", "{vm}");
    assert!(vm["metadata"]["labels"]["drop.me/x"].is_null(), "{vm}");
    assert_eq!(
        vm["spec"]["template"]["spec"]["domain"]["firmware"]["serial"], "clone-serial",
        "{vm}"
    );
    inst.running_vmi("src-clone", None).await;
    inst.console_shows("src-clone", "TICK 2").await;
    assert_eq!(read_data(&inst, "src-clone").await, "TWO");
    // Writes in one are not seen in the other.
    write_data(&inst, "src-clone", "CLONED").await;
    write_data(&inst, "src", "THREE").await;
    assert_eq!(read_data(&inst, "src-clone").await, "CLONED");
    assert_eq!(read_data(&inst, "src").await, "THREE");
}
