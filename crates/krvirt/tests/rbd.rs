//! Ceph RBD storage end to end, under TCG, against a real one-node Ceph
//! started by the test: an `rbd` StoragePool, a root Volume cloned
//! (copy-on-write) from the demo image and a blank data Volume as RBD
//! images, a guest booting from them through librbd, data kept in Ceph
//! when the guest's QEMU exits, an online snapshot (guest paused around
//! `rbd snap create`) and a restore that brings the snapshotted content
//! back to a new QEMU.

#[path = "../../krvirt-storage/tests/common/ceph.rs"]
mod ceph;
mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const IMAGE: &str = "quay.io/kubevirt/cirros-container-disk-demo";

fn apply(inst: &Instance, name: &str, yaml: &str) {
    let path = inst.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    inst.ok(&["apply", "-f", path.to_str().unwrap()]);
}

/// Type `commands` on a VM's serial console; returns what came back.
async fn console(inst: &Instance, vm: &str, commands: &str) -> String {
    inst.console_type(vm, commands, Duration::from_secs(4))
        .await
}

async fn volume_ready(inst: &Instance, name: &str) -> Value {
    inst.until(
        &format!("Volume {name} Succeeded"),
        Duration::from_secs(60),
        || async {
            let v = inst
                .get(&format!(
                    "/apis/krvirt.io/v1/namespaces/default/volumes/{name}"
                ))
                .await
                .ok()?;
            (v["status"]["phase"] == "Succeeded").then_some(v)
        },
    )
    .await
}

/// The first 64 bytes of the guest's /dev/vdb up to the first `.`.
async fn read_vdb(inst: &Instance, vm: &str) -> String {
    let out = console(
        inst,
        vm,
        "echo READ-$(dd if=/dev/vdb bs=64 count=1 2>/dev/null | head -n1 | cut -d. -f1)-END",
    )
    .await;
    out.split("READ-")
        .filter_map(|s| s.split_once("-END").map(|(l, _)| l.to_string()))
        .find(|l| !l.starts_with('$'))
        .unwrap_or_else(|| panic!("no answer on the console: {out}"))
}

async fn write_vdb(inst: &Instance, vm: &str, text: &str) {
    let out = console(
        inst,
        vm,
        &format!("printf {text}. > /dev/vdb; sync; echo W-$((40+2))"),
    )
    .await;
    assert!(out.contains("W-42"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rbd_volumes_boot_keep_data_and_snapshot_online() {
    let ceph = ceph::CephCluster::start();
    let inst = Instance::start().await;
    apply(
        &inst,
        "pool",
        &format!(
            "apiVersion: krvirt.io/v1\nkind: StoragePool\nmetadata:\n  name: ceph\nspec:\n  type: rbd\n  pool: {}\n  conf: {}\n",
            ceph.pool,
            ceph.conf.display()
        ),
    );
    apply(
        &inst,
        "volumes",
        &format!(
            r#"apiVersion: krvirt.io/v1
kind: Volume
metadata:
  name: rbd-root
spec:
  pool: ceph
  capacity: 256Mi
  source:
    image:
      name: {IMAGE}
---
apiVersion: krvirt.io/v1
kind: Volume
metadata:
  name: rbd-data
spec:
  pool: ceph
  capacity: 64Mi
  source:
    blank: {{}}
"#
        ),
    );
    apply(
        &inst,
        "vm",
        r#"apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: rbd-vm
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        devices:
          disks:
          - name: root
            disk: {bus: virtio}
          - name: data
            disk: {bus: virtio}
        memory:
          guest: 128Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - name: root
        persistentVolumeClaim:
          claimName: rbd-root
      - name: data
        dataVolume:
          name: rbd-data
"#,
    );
    let root = volume_ready(&inst, "rbd-root").await;
    assert_eq!(root["status"]["capacity"], (256u64 << 20).to_string());
    volume_ready(&inst, "rbd-data").await;
    // The Volumes are RBD images; the root one a copy-on-write clone.
    let images = ceph.rbd(&["ls", &ceph.pool]);
    for v in ["default.rbd-root", "default.rbd-data"] {
        assert!(images.lines().any(|l| l == v), "{v} not in {images}");
    }
    let info = ceph.rbd(&["info", &format!("{}/default.rbd-root", ceph.pool)]);
    assert!(info.contains("parent: "), "root not a clone: {info}");

    let (uid, _) = inst.running_vmi("rbd-vm", None).await;
    inst.console_shows("rbd-vm", "GUEST-BOOTED").await;
    // QEMU opened the images through librbd, not through a host file.
    let pid =
        std::fs::read_to_string(inst.data_dir().join(format!("run/vmi/{uid}/qemu.pid"))).unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("driver=rbd,node-name=drive0-file,pool=rbd,image=default.rbd-root"),
        "{cmdline}"
    );

    write_vdb(&inst, "rbd-vm", "FIRST").await;
    // Online snapshot of the running VM.
    apply(
        &inst,
        "snap",
        "apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineSnapshot\nmetadata:\n  name: rsnap\nspec:\n  source:\n    apiGroup: kubevirt.io\n    kind: VirtualMachine\n    name: rbd-vm\n",
    );
    let snap = inst
        .until("snapshot ready", Duration::from_secs(60), || async {
            let s = inst
                .get("/apis/snapshot.kubevirt.io/v1beta1/namespaces/default/virtualmachinesnapshots/rsnap")
                .await
                .ok()?;
            (s["status"]["readyToUse"] == true).then_some(s)
        })
        .await;
    assert_eq!(snap["status"]["indications"][0], "Online", "{snap}");
    let snaps = ceph.rbd(&["snap", "ls", &format!("{}/default.rbd-data", ceph.pool)]);
    assert!(snaps.contains("vmsnap-"), "no RBD snapshot: {snaps}");

    // Written after the snapshot; the guest stops (its QEMU exits): the
    // data is in Ceph, read back by another librbd client.
    write_vdb(&inst, "rbd-vm", "SECOND").await;
    inst.ok(&["stop", "rbd-vm"]);
    inst.until("VMI gone", Duration::from_secs(60), || async {
        inst.vmi("rbd-vm").await.is_none().then_some(())
    })
    .await;
    let src = format!(
        "rbd:{}/default.rbd-data:conf={}",
        ceph.pool,
        ceph.conf.display()
    );
    let read = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read -v 0 8", &src])
        .output()
        .expect("qemu-io");
    let dump = String::from_utf8_lossy(&read.stdout);
    assert!(dump.contains("SECOND."), "not in the RBD image: {dump}");

    // Restore (VM stopped), start: a new QEMU reads the snapshotted content.
    apply(
        &inst,
        "restore",
        "apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineRestore\nmetadata:\n  name: rrestore\nspec:\n  target:\n    apiGroup: kubevirt.io\n    kind: VirtualMachine\n    name: rbd-vm\n  virtualMachineSnapshotName: rsnap\n",
    );
    inst.until("restore complete", Duration::from_secs(60), || async {
        let r = inst
            .get("/apis/snapshot.kubevirt.io/v1beta1/namespaces/default/virtualmachinerestores/rrestore")
            .await
            .ok()?;
        (r["status"]["complete"] == true).then_some(())
    })
    .await;
    inst.ok(&["start", "rbd-vm"]);
    inst.running_vmi("rbd-vm", Some(&uid)).await;
    inst.console_shows("rbd-vm", "GUEST-BOOTED").await;
    assert_eq!(read_vdb(&inst, "rbd-vm").await, "FIRST");

    // Deleting the VM and the Volumes removes the images.
    inst.ok(&["delete", "vm", "rbd-vm"]);
    inst.until("VMI gone", Duration::from_secs(60), || async {
        inst.vmi("rbd-vm").await.is_none().then_some(())
    })
    .await;
    inst.ok(&["delete", "volume", "rbd-root"]);
    inst.ok(&["delete", "volume", "rbd-data"]);
    inst.until("images gone", Duration::from_secs(60), || async {
        let images = ceph.rbd(&["ls", &ceph.pool]);
        (!images.contains("default.rbd-")).then_some(())
    })
    .await;
}
