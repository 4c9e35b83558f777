//! Snapshot restores on joined hosts (network namespaces running `krvirt
//! agent --join-token`, see tests/common/cluster.rs; the agents may not
//! write VirtualMachines): a VM with a Volume on a `dir` pool is
//! snapshotted and restored into a NEW VM (made by the server's restore
//! controller from the snapshot's VirtualMachineSnapshotContent) that boots
//! on a joined host and reads the snapshot's data; a memory snapshot
//! restored into its own VM resumes there (its TICK counter goes on from
//! the snapshot's value, no new boot), on the host holding the state,
//! even though the VM now prefers the other host. A VirtualMachineClone of
//! the running VM works the same way.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::{Instance, last_tick};
use serde_json::Value;

const IMAGE: &str = "quay.io/kubevirt/cirros-container-disk-demo";
const SNAPS: &str = "/apis/snapshot.kubevirt.io/v1beta1/namespaces/default/virtualmachinesnapshots";
const CONTENTS: &str =
    "/apis/snapshot.kubevirt.io/v1beta1/namespaces/default/virtualmachinesnapshotcontents";
const RESTORES: &str =
    "/apis/snapshot.kubevirt.io/v1beta1/namespaces/default/virtualmachinerestores";
const VOLUMES: &str = "/apis/krvirt.io/v1/namespaces/default/volumes";
const CLONES: &str = "/apis/clone.kubevirt.io/v1beta1/namespaces/default/virtualmachineclones";

fn apply(c: &Cluster, name: &str, yaml: &str) {
    let f = c.server.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&f, yaml).unwrap();
    c.server.ok(&["apply", "-f", f.to_str().unwrap()]);
}

/// Type `command` on the VM's serial console (through the server) until
/// the guest answers `{tag}-ANSWER-END`; the answer.
async fn ask(inst: &Instance, vm: &str, tag: &str, expr: &str) -> String {
    let mut out = String::new();
    for _ in 0..4 {
        out = inst
            .console_type(
                vm,
                &format!("echo {tag}-$({expr})-END"),
                Duration::from_secs(3),
            )
            .await;
        // The echoed command line reads `{tag}-$(`: not an answer.
        if let Some(w) = out
            .split(&format!("{tag}-"))
            .skip(1)
            .filter_map(|s| s.split_once("-END").map(|(w, _)| w.trim().to_string()))
            .find(|w| !w.starts_with('$'))
        {
            return w;
        }
    }
    panic!("no answer {tag} from {vm}: {out}");
}

async fn write_data(inst: &Instance, vm: &str, word: &str) {
    let got = ask(
        inst,
        vm,
        &format!("W{word}"),
        &format!("printf {word}. > /dev/vdb; sync; echo ok"),
    )
    .await;
    assert_eq!(got, "ok", "write {word} on {vm}");
}

async fn read_data(inst: &Instance, vm: &str) -> String {
    ask(
        inst,
        vm,
        "READ",
        "dd if=/dev/vdb bs=64 count=1 2>/dev/null | cut -d. -f1",
    )
    .await
}

async fn snapshot(c: &Cluster, name: &str, vm: &str, memory: bool) -> Value {
    let extra = if memory {
        "  includeMemory: true\n"
    } else {
        ""
    };
    apply(
        c,
        name,
        &format!(
            "apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineSnapshot\nmetadata:\n  name: {name}\nspec:\n  source:\n    apiGroup: kubevirt.io\n    kind: VirtualMachine\n    name: {vm}\n{extra}"
        ),
    );
    let s = c
        .until(
            &format!("snapshot {name} ready"),
            Duration::from_secs(120),
            || async {
                let s = c.server.get(&format!("{SNAPS}/{name}")).await.ok()?;
                assert_ne!(s["status"]["phase"], "Failed", "{s}");
                (s["status"]["readyToUse"] == true).then_some(s)
            },
        )
        .await;
    assert_eq!(s["status"]["phase"], "Succeeded", "{s}");
    s
}

async fn restore(c: &Cluster, name: &str, snapshot: &str, target: &str) -> Value {
    apply(
        c,
        name,
        &format!(
            "apiVersion: snapshot.kubevirt.io/v1beta1\nkind: VirtualMachineRestore\nmetadata:\n  name: {name}\nspec:\n  target:\n    apiGroup: kubevirt.io\n    kind: VirtualMachine\n    name: {target}\n  virtualMachineSnapshotName: {snapshot}\n"
        ),
    );
    c.until(
        &format!("restore {name} complete"),
        Duration::from_secs(150),
        || async {
            let r = c.server.get(&format!("{RESTORES}/{name}")).await.ok()?;
            let failed = r["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["reason"] == "Failed"));
            assert!(!failed, "restore {name} failed: {r}");
            (r["status"]["complete"] == true).then_some(r)
        },
    )
    .await
}

/// The source VM with run strategy `run`; `placement`: its template's
/// placement fields (YAML at the template spec's indentation).
fn src_vm(run: &str, placement: &str) -> String {
    format!(
        r#"apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: src
spec:
  runStrategy: {run}
  template:
    spec:
      {placement}
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
          claimName: src-data
"#
    )
}

async fn stop(c: &Cluster, vm: &str) {
    c.server.ok(&["stop", vm]);
    c.until(
        &format!("VMI {vm} gone"),
        Duration::from_secs(90),
        || async { c.server.vmi(vm).await.is_none().then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_into_a_new_vm_and_from_memory_work_on_joined_hosts() {
    let c = Cluster::start(2).await;
    let inst = &c.server;
    // The data Volume on the default (host-local) dir pool: whichever
    // agent claims it holds it; the VM runs there.
    apply(
        &c,
        "vol",
        "apiVersion: krvirt.io/v1\nkind: Volume\nmetadata:\n  name: src-data\nspec:\n  pool: default\n  capacity: 64Mi\n  source:\n    blank: {}\n",
    );
    let home = c
        .until(
            "Volume src-data provisioned",
            Duration::from_secs(90),
            || async {
                let v = inst.get(&format!("{VOLUMES}/src-data")).await.ok()?;
                (v["status"]["phase"] == "Succeeded")
                    .then(|| v["status"]["host"].as_str().map(str::to_string))
                    .flatten()
            },
        )
        .await;
    apply(
        &c,
        "src",
        &src_vm(
            "Always",
            &format!("nodeSelector:\n        kubernetes.io/hostname: {home}"),
        ),
    );
    let (uid1, _) = inst.running_vmi("src", None).await;
    assert_eq!(c.node_of("src").await.as_deref(), Some(home.as_str()));
    inst.console_shows("src", "TICK 2").await;
    write_data(inst, "src", "ONE").await;

    // A disk snapshot: its VM definition is in the API.
    let s1 = snapshot(&c, "s1", "src", false).await;
    let content = s1["status"]["virtualMachineSnapshotContentName"]
        .as_str()
        .unwrap_or_else(|| panic!("no content named: {s1}"))
        .to_string();
    let ct = inst.get(&format!("{CONTENTS}/{content}")).await.unwrap();
    assert_eq!(
        ct["spec"]["source"]["virtualMachine"]["metadata"]["name"], "src",
        "{ct}"
    );
    assert_eq!(ct["spec"]["virtualMachineSnapshotName"], "s1", "{ct}");
    write_data(inst, "src", "TWO").await;

    // Restore into a new VM: created by the server, its Volume made from
    // the pool snapshot on the host holding the source.
    let r = restore(&c, "to-new", "s1", "restored").await;
    let vol = r["status"]["restores"][0].as_str().unwrap().to_string();
    assert!(vol.starts_with("restore-"), "{r}");
    let v = inst.get(&format!("{VOLUMES}/{vol}")).await.unwrap();
    assert_eq!(v["status"]["host"].as_str(), Some(home.as_str()), "{v}");
    let vm = inst.vm("restored").await.expect("the restored VM exists");
    assert_eq!(
        vm["metadata"]["annotations"]["krvirt.io/restored-by"], r["metadata"]["uid"],
        "{vm}"
    );
    inst.running_vmi("restored", None).await;
    let node = c.node_of("restored").await.unwrap();
    assert!(node.starts_with("host"), "{node}");
    inst.console_shows("restored", "TICK 2").await;
    assert_eq!(read_data(inst, "restored").await, "ONE");
    assert_eq!(read_data(inst, "src").await, "TWO");
    stop(&c, "restored").await;

    // A clone of the running VM (the agent drives it through a snapshot
    // and a restore into a new VM, which the server makes).
    apply(
        &c,
        "clone",
        "kind: VirtualMachineClone\napiVersion: clone.kubevirt.io/v1beta1\nmetadata:\n  name: c1\nspec:\n  source:\n    apiGroup: kubevirt.io\n    kind: VirtualMachine\n    name: src\n  target:\n    apiGroup: kubevirt.io\n    kind: VirtualMachine\n    name: src-clone\n",
    );
    c.until("clone Succeeded", Duration::from_secs(150), || async {
        let cl = inst.get(&format!("{CLONES}/c1")).await.ok()?;
        assert_ne!(cl["status"]["phase"], "Failed", "{cl}");
        (cl["status"]["phase"] == "Succeeded").then_some(cl)
    })
    .await;
    inst.running_vmi("src-clone", None).await;
    assert_eq!(c.node_of("src-clone").await.as_deref(), Some(home.as_str()));
    inst.console_shows("src-clone", "TICK 2").await;
    assert_eq!(read_data(inst, "src-clone").await, "TWO");
    stop(&c, "src-clone").await;

    // A memory snapshot: the guest's TICK at that instant lies between the
    // last tick seen before and the first seen after.
    write_data(inst, "src", "THREE").await;
    let before = last_tick(&inst.console_log("src").await).unwrap();
    let s2 = snapshot(&c, "s2", "src", true).await;
    let after = last_tick(&inst.console_log("src").await).unwrap();
    assert!(
        s2["status"]["indications"].to_string().contains("Memory"),
        "{s2}"
    );
    assert_eq!(
        s2["status"]["memoryStateHost"].as_str(),
        Some(home.as_str())
    );
    let uid2 = s2["metadata"]["uid"].as_str().unwrap().to_string();
    let state = c
        .host(&home)
        .data_dir
        .join("snapshots")
        .join(&uid2)
        .join("memory.qcow2");
    assert!(state.exists(), "{} missing", state.display());
    inst.console_shows("src", &format!("TICK {}", after + 2))
        .await;
    write_data(inst, "src", "FOUR").await;

    // Restore it into its own VM: the host reverts the Volume, the server
    // marks the VM; the next start resumes on the state's host. To show
    // that placement follows the state, the VM now prefers the other host
    // (and no longer selects its own): without the mark it would go there.
    stop(&c, "src").await;
    let other = if home == "host0" { "host1" } else { "host0" };
    apply(
        &c,
        "src",
        &src_vm(
            "Halted",
            &format!(
                "affinity:
        nodeAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            preference:
              matchExpressions:
              - {{key: kubernetes.io/hostname, operator: In, values: [{other}]}}"
            ),
        ),
    );
    restore(&c, "r-mem", "s2", "src").await;
    let vm = inst.vm("src").await.unwrap();
    let ann = &vm["metadata"]["annotations"];
    assert_eq!(ann["krvirt.io/resume-from-snapshot"], uid2.as_str(), "{vm}");
    assert_eq!(ann["krvirt.io/resume-host"], home.as_str(), "{vm}");
    inst.ok(&["start", "src"]);
    let (uid3, _) = inst.running_vmi("src", Some(&uid1)).await;
    assert_eq!(c.node_of("src").await.as_deref(), Some(home.as_str()));
    let vmi = inst.vmi("src").await.unwrap();
    assert_eq!(
        vmi["metadata"]["annotations"]["krvirt.io/resume-from-snapshot"],
        uid2.as_str(),
        "{vmi}"
    );
    let log = inst
        .console_shows("src", &format!("TICK {}", after + 2))
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
    assert_eq!(read_data(inst, "src").await, "THREE");
    // The mark was for that one start.
    let vm = inst.vm("src").await.unwrap();
    assert!(
        vm["metadata"]["annotations"]["krvirt.io/resume-from-snapshot"].is_null(),
        "{vm}"
    );
    assert_ne!(uid3, uid1);
}
