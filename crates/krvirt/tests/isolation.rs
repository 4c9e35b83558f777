//! QEMU isolation end to end (issue #5 item 7): through the API, a VM with
//! `resources.limits` and `dedicatedCpuPlacement` boots under TCG as the
//! unprivileged `krvirt-qemu` user, under QEMU's seccomp sandbox, in a
//! cgroup with the limits its spec implies, its vCPU pinned to the CPU the
//! VMI status names; a second dedicated VM that does not fit is refused
//! with a condition; after `kill -9` of krvirt the guest is adopted again,
//! and stopping it removes the cgroup.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use krvirt_hypervisor::{Accel, DEFAULT_QEMU_USER, QemuUser};

fn vm_yaml(name: &str, cores: u32) -> String {
    format!(
        r#"apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: {name}
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        cpu:
          cores: {cores}
          dedicatedCpuPlacement: true
        resources:
          requests: {{memory: 128Mi}}
          limits: {{memory: 160Mi, cpu: "2"}}
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
          image: quay.io/kubevirt/cirros-container-disk-demo
"#
    )
}

fn status_field(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The directory of `pid`'s cgroup holding `file` (v1: the hierarchy of
/// `controller`; v2: the unified one).
fn cgroup_dir(pid: u32, controller: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, ctrls, path) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        if ctrls.split(',').any(|c| c == controller) {
            return PathBuf::from(format!("/sys/fs/cgroup/{controller}{path}"));
        }
        if id == "0" && std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            return PathBuf::from(format!("/sys/fs/cgroup{path}"));
        }
    }
    panic!("no {controller} cgroup for {pid}:\n{text}");
}

fn read(p: PathBuf) -> String {
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

fn apply(inst: &Instance, name: &str, yaml: &str) {
    let path = inst.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    inst.ok(&["apply", "-f", path.to_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn isolated_guest_with_limits_and_dedicated_cpu() {
    let user = QemuUser::lookup(DEFAULT_QEMU_USER).unwrap();
    let mut inst = Instance::start().await;
    // krvirt up created the user if it was missing.
    let user = user
        .or_else(|| QemuUser::lookup(DEFAULT_QEMU_USER).unwrap())
        .expect("krvirt up creates the krvirt-qemu user");
    let host_cpus = krvirt_hypervisor::isolation::allowed_cpus(0).unwrap();
    assert!(host_cpus.len() >= 2, "needs 2 host CPUs: {host_cpus:?}");

    apply(&inst, "iso", &vm_yaml("iso", 1));
    let (uid, pid) = inst.running_vmi("iso", None).await;
    inst.console_shows("iso", "GUEST-BOOTED").await;

    // Unprivileged, sandboxed.
    let uids: Vec<u32> = status_field(pid, "Uid")
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(uids, vec![user.uid; 4], "QEMU's uids");
    assert_eq!(
        status_field(pid, "Gid").split_whitespace().next(),
        Some(user.gid.to_string().as_str())
    );
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");

    // Private run directory.
    let run = inst.data_dir().join("run/vmi").join(&uid);
    let md = std::fs::metadata(&run).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o777), (user.uid, 0o700));

    // cgroup limits: limits.memory + QEMU's overhead, limits.cpu = 2 CPUs.
    let mib = 1u64 << 20;
    let expected_mem = 160 * mib + krvirt_agent::plan::memory_overhead(Accel::Tcg, 128 * mib, 1);
    let mem_dir = cgroup_dir(pid, "memory");
    let cpu_dir = cgroup_dir(pid, "cpu");
    assert!(mem_dir.ends_with(&uid), "{}", mem_dir.display());
    if mem_dir.join("memory.limit_in_bytes").exists() {
        assert_eq!(
            read(mem_dir.join("memory.limit_in_bytes")),
            expected_mem.to_string()
        );
        assert_eq!(read(cpu_dir.join("cpu.cfs_quota_us")), "200000");
        assert_eq!(read(cpu_dir.join("cpu.cfs_period_us")), "100000");
    } else {
        assert_eq!(read(mem_dir.join("memory.max")), expected_mem.to_string());
        assert_eq!(read(cpu_dir.join("cpu.max")), "200000 100000");
    }

    // The dedicated CPU: chosen by the agent, in the status, pinned.
    let vmi = inst.vmi("iso").await.unwrap();
    let cpus = vmi["status"]["krvirtRuntime"]["dedicatedCpus"]
        .as_str()
        .unwrap_or_else(|| panic!("no dedicatedCpus in {}", vmi["status"]))
        .to_string();
    let chosen: u32 = cpus.parse().expect("one CPU for one vCPU");
    assert!(host_cpus.contains(&chosen));
    let mut vcpu_threads = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if comm.starts_with("CPU ") {
            vcpu_threads += 1;
            let status = std::fs::read_to_string(t.join("status")).unwrap();
            let allowed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim();
            assert_eq!(allowed, cpus, "vCPU thread {comm:?}");
        }
    }
    assert_eq!(vcpu_threads, 1, "one vCPU thread");

    // A second dedicated guest wanting every host CPU cannot fit: the
    // scheduler (PodScheduled) or the agent (InsufficientDedicatedCpus)
    // says so, and it never runs.
    let cores = host_cpus.len() as u32;
    apply(
        &inst,
        "toobig",
        &vm_yaml("toobig", cores).replace("cpu: \"2\"", "cpu: \"1\""),
    );
    let msg = inst
        .until("a refusal condition", Duration::from_secs(60), || async {
            let v = inst.vmi("toobig").await?;
            let conds = v["status"]["conditions"].as_array()?.clone();
            conds.into_iter().find_map(|c| {
                let refused = (c["type"] == "PodScheduled"
                    || c["reason"] == "InsufficientDedicatedCpus")
                    && c["status"] == "False";
                refused.then(|| c["message"].as_str().unwrap_or_default().to_string())
            })
        })
        .await;
    assert!(
        msg.contains("dedicated") || msg.contains("CPU"),
        "the refusal names the CPUs: {msg}"
    );
    let v = inst.vmi("toobig").await.unwrap();
    assert_ne!(v["status"]["phase"], "Running");
    inst.ok(&["delete", "vm", "toobig"]);

    // krvirt killed with -9 and restarted: the guest runs on, adopted with
    // what its launch recorded (so stopping still removes the cgroup).
    inst.kill9();
    assert!(pid_alive(pid), "the guest outlives krvirt");
    inst.restart().await;
    let (uid2, pid2) = inst.running_vmi("iso", None).await;
    assert_eq!(
        (uid2.as_str(), pid2),
        (uid.as_str(), pid),
        "same guest adopted"
    );
    assert_eq!(status_field(pid, "Seccomp"), "2");

    // Stop: QEMU exits, its cgroup goes away.
    inst.ok(&["stop", "iso"]);
    inst.until("QEMU to exit", Duration::from_secs(60), || async {
        (!pid_alive(pid)).then_some(())
    })
    .await;
    inst.until("cgroup removed", Duration::from_secs(30), || async {
        (!mem_dir.exists() && !cpu_dir.exists()).then_some(())
    })
    .await;
}
