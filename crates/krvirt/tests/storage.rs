//! Storage end to end, under TCG: Volumes in a `dir` pool and in a `btrfs`
//! pool (a real btrfs on a loop-mounted sparse file) provisioned by the
//! agent from the demo image, guests booting from them, a data Volume that
//! keeps what the guest wrote across a restart, deletion freeing the pool.

mod common;

use std::path::{Path, PathBuf};
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

fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} cannot be run (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A btrfs on a loop-mounted sparse file, unmounted on drop.
struct BtrfsMount {
    dir: tempfile::TempDir,
}

impl BtrfsMount {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("krvirt-btrfs-")
            .tempdir()
            .unwrap();
        let file = dir.path().join("fs.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        sh("mkfs.btrfs", &["-q", file.to_str().unwrap()]);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        sh(
            "mount",
            &["-o", "loop", file.to_str().unwrap(), mnt.to_str().unwrap()],
        );
        BtrfsMount { dir }
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for BtrfsMount {
    fn drop(&mut self) {
        kill_processes_under(&self.mnt());
        for _ in 0..50 {
            if Command::new("umount")
                .arg(self.mnt())
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(self.mnt()).status();
    }
}

/// Type `commands` on a VM's serial console; returns what came back.
async fn console(inst: &Instance, vm: &str, commands: &str) -> String {
    inst.console_type(vm, commands, Duration::from_secs(4))
        .await
}

async fn volume(inst: &Instance, name: &str) -> Option<Value> {
    inst.get(&format!(
        "/apis/krvirt.io/v1/namespaces/default/volumes/{name}"
    ))
    .await
    .ok()
}

async fn volume_ready(inst: &Instance, name: &str) -> Value {
    inst.until(
        &format!("Volume {name} Succeeded"),
        Duration::from_secs(60),
        || async {
            let v = volume(inst, name).await?;
            (v["status"]["phase"] == "Succeeded").then_some(v)
        },
    )
    .await
}

fn vm_with_volumes(name: &str, root: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: {name}
spec:
  runStrategy: Always
{extra}  template:
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
{root}
      - name: data
        persistentVolumeClaim:
          claimName: {name}-data
"#
    )
}

fn blank_volume(name: &str, pool: &str) -> String {
    format!(
        r#"apiVersion: krvirt.io/v1
kind: Volume
metadata:
  name: {name}
spec:
  pool: {pool}
  capacity: 64Mi
  source:
    blank: {{}}
"#
    )
}

fn pool_file(path: &Path) -> bool {
    path.exists()
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_in_dir_and_btrfs_pools_boot_and_keep_data() {
    let fs = BtrfsMount::new();
    let inst = Instance::start().await;
    let btrfs_pool = fs.mnt().join("pool");
    apply(
        &inst,
        "pool",
        &format!(
            "apiVersion: krvirt.io/v1\nkind: StoragePool\nmetadata:\n  name: fast\nspec:\n  type: btrfs\n  path: {}\n",
            btrfs_pool.display()
        ),
    );

    // dir pool (the default one): a root Volume cloned from the image, used
    // through persistentVolumeClaim.
    apply(
        &inst,
        "root-dir",
        &format!(
            "apiVersion: krvirt.io/v1\nkind: Volume\nmetadata:\n  name: root-dir\nspec:\n  capacity: 256Mi\n  source:\n    image:\n      name: {IMAGE}\n"
        ),
    );
    apply(&inst, "d1", &blank_volume("vm-dir-data", "default"));
    apply(
        &inst,
        "vm-dir",
        &vm_with_volumes(
            "vm-dir",
            "        persistentVolumeClaim:\n          claimName: root-dir",
            "",
        ),
    );
    // btrfs pool: the root Volume comes from the VM's dataVolumeTemplates
    // (storageClassName names the pool), used through dataVolume.
    apply(&inst, "d2", &blank_volume("vm-btrfs-data", "fast"));
    apply(
        &inst,
        "vm-btrfs",
        &vm_with_volumes(
            "vm-btrfs",
            "        dataVolume:\n          name: root-btrfs",
            &format!(
                "  dataVolumeTemplates:\n  - metadata:\n      name: root-btrfs\n    spec:\n      source:\n        registry:\n          url: docker://{IMAGE}\n      storage:\n        storageClassName: fast\n        resources:\n          requests:\n            storage: 256Mi\n"
            ),
        ),
    );

    let root_dir = volume_ready(&inst, "root-dir").await;
    assert_eq!(root_dir["status"]["host"], "e2e-host");
    assert_eq!(root_dir["status"]["capacity"], (256u64 << 20).to_string());
    let root_btrfs = volume_ready(&inst, "root-btrfs").await;
    assert_eq!(root_btrfs["spec"]["pool"], "fast", "{root_btrfs}");
    assert_eq!(
        root_btrfs["metadata"]["ownerReferences"][0]["name"],
        "vm-btrfs"
    );
    volume_ready(&inst, "vm-dir-data").await;
    volume_ready(&inst, "vm-btrfs-data").await;
    // The Volumes are where their pools keep them.
    let dir_pool = inst.data_dir().join("pools/default");
    assert!(pool_file(&dir_pool.join("default.root-dir.qcow2")));
    assert!(pool_file(&btrfs_pool.join("default.root-btrfs/disk.raw")));
    let subvols = sh("btrfs", &["subvolume", "list", fs.mnt().to_str().unwrap()]);
    assert!(subvols.contains("pool/default.root-btrfs"), "{subvols}");
    assert!(subvols.contains("pool/default.vm-btrfs-data"), "{subvols}");

    for vm in ["vm-dir", "vm-btrfs"] {
        inst.running_vmi(vm, None).await;
        inst.console_shows(vm, "GUEST-BOOTED").await;
    }

    // The guest writes to its data Volume; a restart (new VMI, new QEMU)
    // reads it back: the Volume outlives the VMI.
    for vm in ["vm-dir", "vm-btrfs"] {
        let out = console(
            &inst,
            vm,
            &format!("printf KEEP-{vm}. > /dev/vdb; sync; echo WROTE-$((40+2))"),
        )
        .await;
        assert!(out.contains("WROTE-42"), "{vm}: {out}");
        let (uid, _) = inst.running_vmi(vm, None).await;
        inst.ok(&["restart", vm]);
        inst.running_vmi(vm, Some(&uid)).await;
        inst.console_shows(vm, "GUEST-BOOTED").await;
        let out = console(
            &inst,
            vm,
            "echo READ-$(dd if=/dev/vdb bs=64 count=1 2>/dev/null | head -n1 | cut -d. -f1)",
        )
        .await;
        assert!(out.contains(&format!("READ-KEEP-{vm}")), "{vm}: {out}");
    }

    // Deleting the VMs and then the Volumes frees the pools.
    for vm in ["vm-dir", "vm-btrfs"] {
        inst.ok(&["delete", "vm", vm]);
    }
    inst.until("VMIs gone", Duration::from_secs(60), || async {
        (inst.vmi("vm-dir").await.is_none() && inst.vmi("vm-btrfs").await.is_none()).then_some(())
    })
    .await;
    // root-btrfs came from vm-btrfs's dataVolumeTemplates: it went with
    // the VM (ownerReferences); the others are deleted by hand.
    for v in ["root-dir", "vm-dir-data", "vm-btrfs-data"] {
        inst.ok(&["delete", "volume", v]);
    }
    inst.until("Volumes gone", Duration::from_secs(30), || async {
        for v in ["root-dir", "vm-dir-data", "root-btrfs", "vm-btrfs-data"] {
            if volume(&inst, v).await.is_some() {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(!pool_file(&dir_pool.join("default.root-dir.qcow2")));
    assert!(!pool_file(&btrfs_pool.join("default.root-btrfs")));
}

/// `ls /sys/block` in the guest, as `vda,vdb,`.
async fn guest_block_devices(inst: &Instance, vm: &str) -> String {
    let out = console(inst, vm, "echo BLK-$(ls /sys/block | tr '\\n' ,)END").await;
    out.split("BLK-")
        .filter_map(|s| s.split_once("END").map(|(l, _)| l.to_string()))
        .find(|l| !l.starts_with('$'))
        .unwrap_or_else(|| panic!("no answer on the console: {out}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn hotplug_volume_appears_in_guest_and_goes_away() {
    let inst = Instance::start().await;
    apply(&inst, "extra", &blank_volume("extra", "default"));
    apply(
        &inst,
        "hp-vm",
        &format!(
            r#"apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: hp-vm
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        devices:
          disks:
          - name: containerdisk
            disk: {{bus: virtio}}
        memory:
          guest: 128Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - name: containerdisk
        containerDisk:
          image: {IMAGE}
"#
        ),
    );
    volume_ready(&inst, "extra").await;
    inst.running_vmi("hp-vm", None).await;
    inst.console_shows("hp-vm", "GUEST-BOOTED").await;
    let before = guest_block_devices(&inst, "hp-vm").await;
    assert!(
        before.contains("vda") && !before.contains("vdb"),
        "{before}"
    );

    inst.ok(&["addvolume", "hp-vm", "--volume", "extra"]);
    inst.until(
        "hot-plugged volume Ready",
        Duration::from_secs(30),
        || async {
            let v = inst.vmi("hp-vm").await?;
            (v["status"]["volumeStatus"][0]["phase"] == "Ready").then_some(())
        },
    )
    .await;
    let mut seen = String::new();
    for _ in 0..10 {
        seen = guest_block_devices(&inst, "hp-vm").await;
        if seen.contains("vdb") {
            break;
        }
    }
    assert!(
        seen.contains("vdb"),
        "hot-plugged disk not in /sys/block: {seen}"
    );
    let out = console(&inst, "hp-vm", "echo SIZE-$(cat /sys/block/vdb/size)").await;
    assert!(
        out.contains("SIZE-131072"),
        "64 MiB = 131072 sectors: {out}"
    );

    inst.ok(&["removevolume", "hp-vm", "--volume", "extra"]);
    inst.until(
        "hot-plugged volume gone",
        Duration::from_secs(60),
        || async {
            let v = inst.vmi("hp-vm").await?;
            v["status"]["volumeStatus"].is_null().then_some(())
        },
    )
    .await;
    let after = guest_block_devices(&inst, "hp-vm").await;
    assert!(
        !after.contains("vdb"),
        "unplugged disk still in /sys/block: {after}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn online_snapshot_then_restore_brings_the_first_content_back() {
    let inst = Instance::start().await;
    apply(&inst, "data", &blank_volume("snap-vm-data", "default"));
    apply(
        &inst,
        "snap-vm",
        &vm_with_volumes(
            "snap-vm",
            &format!("        containerDisk:\n          image: {IMAGE}"),
            "",
        ),
    );
    volume_ready(&inst, "snap-vm-data").await;
    let (uid, _) = inst.running_vmi("snap-vm", None).await;
    inst.console_shows("snap-vm", "GUEST-BOOTED").await;
    let out = console(
        &inst,
        "snap-vm",
        "printf FIRST. > /dev/vdb; sync; echo W1-$((40+2))",
    )
    .await;
    assert!(out.contains("W1-42"), "{out}");

    // Online snapshot of the running VM.
    apply(
        &inst,
        "snap",
        "apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineSnapshot\nmetadata:\n  name: snap1\nspec:\n  source:\n    apiGroup: kubevirt.io\n    kind: VirtualMachine\n    name: snap-vm\n",
    );
    let snap = inst
        .until("snapshot ready", Duration::from_secs(60), || async {
            let s = inst
                .get("/apis/snapshot.kubevirt.io/v1beta1/namespaces/default/virtualmachinesnapshots/snap1")
                .await
                .ok()?;
            (s["status"]["readyToUse"] == true).then_some(s)
        })
        .await;
    assert_eq!(snap["status"]["phase"], "Succeeded", "{snap}");
    assert_eq!(snap["status"]["indications"][0], "Online", "{snap}");
    assert!(
        snap["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True"),
        "{snap}"
    );

    // The guest keeps running and writes again.
    let out = console(
        &inst,
        "snap-vm",
        "printf SECOND. > /dev/vdb; sync; echo W2-$((40+2))",
    )
    .await;
    assert!(out.contains("W2-42"), "{out}");

    // Restore needs the VM stopped; then the first content is back.
    inst.ok(&["stop", "snap-vm"]);
    inst.ok(&["wait", "snap-vm", "--for=Stopped", "--timeout=60s"]);
    inst.until("VMI gone", Duration::from_secs(60), || async {
        inst.vmi("snap-vm").await.is_none().then_some(())
    })
    .await;
    apply(
        &inst,
        "restore",
        "apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineRestore\nmetadata:\n  name: restore1\nspec:\n  target:\n    apiGroup: kubevirt.io\n    kind: VirtualMachine\n    name: snap-vm\n  virtualMachineSnapshotName: snap1\n",
    );
    inst.until("restore complete", Duration::from_secs(60), || async {
        let r = inst
            .get("/apis/snapshot.kubevirt.io/v1beta1/namespaces/default/virtualmachinerestores/restore1")
            .await
            .ok()?;
        (r["status"]["complete"] == true).then_some(())
    })
    .await;
    inst.ok(&["start", "snap-vm"]);
    inst.running_vmi("snap-vm", Some(&uid)).await;
    inst.console_shows("snap-vm", "GUEST-BOOTED").await;
    let out = console(
        &inst,
        "snap-vm",
        "echo READ-$(dd if=/dev/vdb bs=64 count=1 2>/dev/null | head -n1 | cut -d. -f1)",
    )
    .await;
    assert!(
        out.contains("READ-FIRST"),
        "restore did not bring FIRST back: {out}"
    );
}
