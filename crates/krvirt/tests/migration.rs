//! Live migration between two hosts (network namespaces on this machine,
//! each with its own `krvirt agent`; see tests/common/cluster.rs), real
//! QEMU under TCG over the veth network.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::pid_alive;
use serde_json::Value;

const VM: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: mig
spec:
  runStrategy: Always
  template:
    metadata:
      labels: {app: mig}
    spec:
      evictionStrategy: LiveMigrate
      domain:
        devices:
          disks:
          - name: containerdisk
            disk: {bus: virtio}
        memory:
          guest: 128Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - name: containerdisk
        containerDisk:
          image: quay.io/kubevirt/cirros-container-disk-demo
"#;

/// Every `TICK n` in a console log, in order.
fn ticks(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("TICK "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn apply(c: &Cluster, yaml: &str) {
    let f = c.server.dir.path().join("vm.yaml");
    std::fs::write(&f, yaml).unwrap();
    c.server.ok(&["apply", "-f", f.to_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_migrates_between_namespaced_hosts_while_its_ticks_keep_counting() {
    let c = Cluster::start(2).await;
    apply(&c, VM);
    let (uid, src_pid) = c.server.running_vmi("mig", None).await;
    let src = c.node_of("mig").await.expect("VMI bound to a host");
    let dst = if src == "host0" { "host1" } else { "host0" }.to_string();
    let src_host = c.host(&src);
    // The guest is up and counting on the source.
    let before = c
        .until(
            "TICK 2 on the source console",
            Duration::from_secs(120),
            || async {
                let t = ticks(&src_host.console_file(&uid));
                t.last().copied().filter(|n| *n >= 2)
            },
        )
        .await;

    let out = c
        .server
        .ok(&["migrate", "mig", "--to", &dst, "--wait", "--timeout", "90s"]);
    assert!(out.contains(&format!("to {dst}")), "{out}");
    eprintln!("{}", out.trim());

    // The VMI reports the new host and the migration's record.
    let vmi = c.server.vmi("mig").await.unwrap();
    assert_eq!(vmi["status"]["nodeName"], Value::String(dst.clone()));
    assert_eq!(
        vmi["metadata"]["uid"],
        Value::String(uid.clone()),
        "same VMI"
    );
    let ms = &vmi["status"]["migrationState"];
    assert_eq!(ms["completed"], true, "{ms}");
    assert_eq!(ms["sourceNode"], Value::String(src.clone()));
    assert_eq!(ms["targetNode"], Value::String(dst.clone()));
    assert!(
        ms["startTimestamp"].is_string() && ms["endTimestamp"].is_string(),
        "{ms}"
    );
    assert_eq!(ms["mode"], "PreCopy");
    let p = &ms["krvirtProgress"];
    assert!(p["totalTimeMs"].as_u64().is_some_and(|t| t > 0), "{ms}");
    assert!(p["downtimeMs"].as_u64().is_some(), "{ms}");
    assert!(
        p["dataTransferredBytes"]
            .as_u64()
            .is_some_and(|b| b > 1 << 20),
        "{ms}"
    );
    let target_ip = ms["targetNodeAddress"].as_str().unwrap_or_default();
    assert_eq!(
        target_ip,
        c.host(&dst).ip,
        "migrated over the hosts' network"
    );

    // The migration object went through KubeVirt's phases.
    let vmims = c
        .server
        .get("/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstancemigrations")
        .await
        .unwrap();
    let m = &vmims["items"][0];
    assert_eq!(m["status"]["phase"], "Succeeded", "{m}");
    let phases: Vec<&str> = m["status"]["phaseTransitionTimestamps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["phase"].as_str())
        .collect();
    for want in ["Scheduling", "Scheduled", "Succeeded"] {
        assert!(phases.contains(&want), "{phases:?}");
    }

    // The guest kept counting on the target: its console there continues
    // from where the source left off, never from 1.
    let dst_host = c.host(&dst);
    let after = c
        .until(
            "ticks beyond the migration point on the target",
            Duration::from_secs(60),
            || async {
                let t = ticks(&dst_host.console_file(&uid));
                (t.len() >= 2).then_some(t)
            },
        )
        .await;
    assert!(
        after[0] > before,
        "the target's first tick {} must follow the source's {before} (guest not restarted): {after:?}",
        after[0]
    );
    assert!(after.windows(2).all(|w| w[1] > w[0]), "{after:?}");
    eprintln!("source ticks up to {before} before the migration; target ticks {after:?}");

    // The source QEMU is gone and its run directory removed; the target's
    // QEMU runs the guest.
    c.until("source QEMU gone", Duration::from_secs(30), || async {
        (!pid_alive(src_pid)).then_some(())
    })
    .await;
    c.until(
        "source run dir removed",
        Duration::from_secs(30),
        || async { (!src_host.data_dir.join("run/vmi").join(&uid).exists()).then_some(()) },
    )
    .await;
    let dst_pid = c
        .until("target pid in the VMI", Duration::from_secs(30), || async {
            let v = c.server.vmi("mig").await?;
            v["status"]["krvirtRuntime"]["pid"].as_u64()
        })
        .await as u32;
    assert_ne!(dst_pid, src_pid);
    assert!(pid_alive(dst_pid));
    let phase = c.server.vmi("mig").await.unwrap()["status"]["phase"].clone();
    assert_eq!(phase, "Running");

    // And back again at once (the controller waits until the new host has
    // reported the guest).
    let out = c
        .server
        .ok(&["migrate", "mig", "--to", &src, "--wait", "--timeout", "90s"]);
    assert!(out.contains(&format!("to {src}")), "{out}");
    assert_eq!(c.node_of("mig").await.as_deref(), Some(src.as_str()));
    let back = c
        .until(
            "ticks after the way back",
            Duration::from_secs(60),
            || async {
                let t = ticks(&src_host.console_file(&uid));
                (t.len() >= 2).then_some(t)
            },
        )
        .await;
    assert!(back[0] > *after.last().unwrap(), "{back:?} after {after:?}");

    // And out again at once, to the host it has only just left (whose
    // cleanup of the guest's old run directory must not touch the new
    // target's disks).
    let out = c
        .server
        .ok(&["migrate", "mig", "--to", &dst, "--wait", "--timeout", "90s"]);
    assert!(out.contains(&format!("to {dst}")), "{out}");
    let last = *back.last().unwrap();
    c.until(
        "ticks after the third migration",
        Duration::from_secs(60),
        || async {
            let t = ticks(&dst_host.console_file(&uid));
            t.last().copied().filter(|n| *n > last)
        },
    )
    .await;
}

const PLAIN_VM: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: plain
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        devices:
          disks:
          - name: containerdisk
            disk: {bus: virtio}
        memory:
          guest: 128Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - name: containerdisk
        containerDisk:
          image: quay.io/kubevirt/cirros-container-disk-demo
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_live_migrates_or_restarts_every_vm_elsewhere() {
    let c = Cluster::start(2).await;
    // Both VMs on host0: host1 is cordoned while they are placed.
    c.server.ok(&["cordon", "host1"]);
    let hosts = c.server.ok(&["get", "hosts", "-o", "wide"]);
    let line = hosts
        .lines()
        .find(|l| l.starts_with("host1"))
        .unwrap_or_default();
    assert!(line.contains("Ready,SchedulingDisabled"), "{hosts}");
    // Each host publishes the address migrations reach it at.
    let h1 = c
        .server
        .get("/apis/krvirt.io/v1/hosts/host1")
        .await
        .unwrap();
    assert!(
        h1["status"]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["type"] == "InternalIP" && a["address"] == c.host("host1").ip.as_str()),
        "{h1}"
    );
    apply(&c, VM);
    apply(&c, PLAIN_VM);
    let (mig_uid, _) = c.server.running_vmi("mig", None).await;
    let (plain_uid, _) = c.server.running_vmi("plain", None).await;
    assert_eq!(c.node_of("mig").await.as_deref(), Some("host0"));
    assert_eq!(c.node_of("plain").await.as_deref(), Some("host0"));
    c.until("mig counting", Duration::from_secs(120), || async {
        ticks(&c.host("host0").console_file(&mig_uid))
            .last()
            .copied()
            .filter(|n| *n >= 1)
    })
    .await;
    c.server.ok(&["uncordon", "host1"]);

    let out = c.server.ok(&["drain", "host0", "--timeout", "120s"]);
    assert!(out.contains("host/host0 drained"), "{out}");
    // The LiveMigrate VM moved (same VMI), the other was restarted (new VMI).
    let (uid, _) = c.server.running_vmi("mig", None).await;
    assert_eq!(uid, mig_uid, "migrated, not restarted");
    assert_eq!(c.node_of("mig").await.as_deref(), Some("host1"));
    let (uid2, _) = c.server.running_vmi("plain", Some(&plain_uid)).await;
    assert_ne!(uid2, plain_uid);
    assert_eq!(c.node_of("plain").await.as_deref(), Some("host1"));
    let h = c
        .server
        .get("/apis/krvirt.io/v1/hosts/host0")
        .await
        .unwrap();
    assert_eq!(h["spec"]["unschedulable"], true, "drain cordons: {h}");
    c.server.ok(&["uncordon", "host0"]);
    let h = c
        .server
        .get("/apis/krvirt.io/v1/hosts/host0")
        .await
        .unwrap();
    assert!(h["spec"]["unschedulable"].is_null(), "{h}");
}

const SLOW_POLICY: &str = r#"
apiVersion: migrations.kubevirt.io/v1alpha1
kind: MigrationPolicy
metadata:
  name: slow
spec:
  bandwidthPerMigration: 1Mi
  allowAutoConverge: false
  selectors:
    virtualMachineInstanceSelector:
      app: mig
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_migration_leaves_the_guest_running_on_its_source() {
    let c = Cluster::start(2).await;
    // 1 MiB/s for this VM: the transfer takes long enough to cancel it.
    apply(&c, SLOW_POLICY);
    apply(&c, VM);
    let (uid, src_pid) = c.server.running_vmi("mig", None).await;
    let src = c.node_of("mig").await.unwrap();
    let dst = if src == "host0" { "host1" } else { "host0" }.to_string();
    c.until("guest counting", Duration::from_secs(120), || async {
        ticks(&c.host(&src).console_file(&uid))
            .last()
            .copied()
            .filter(|n| *n >= 1)
    })
    .await;
    c.server.ok(&["migrate", "mig", "--to", &dst]);
    // Sending, under the policy's parameters.
    let ms = c
        .until("migration Running", Duration::from_secs(60), || async {
            let v = c.server.vmi("mig").await?;
            let ms = v["status"]["migrationState"].clone();
            ms["startTimestamp"].is_string().then_some(ms)
        })
        .await;
    assert_eq!(ms["migrationPolicyName"], "slow", "{ms}");
    assert_eq!(
        ms["migrationConfiguration"]["bandwidthPerMigration"], "1Mi",
        "{ms}"
    );
    let out = c.server.ok(&["migrate", "mig", "--cancel"]);
    assert!(out.contains("cancelled"), "{out}");
    let ms = c
        .until("migration aborted", Duration::from_secs(60), || async {
            let v = c.server.vmi("mig").await?;
            let ms = v["status"]["migrationState"].clone();
            (ms["failed"] == true).then_some(ms)
        })
        .await;
    assert_eq!(ms["abortStatus"], "Succeeded", "{ms}");
    assert_ne!(ms["completed"], true, "{ms}");
    // The guest never left: same host, same QEMU, still counting.
    assert_eq!(c.node_of("mig").await.as_deref(), Some(src.as_str()));
    assert!(pid_alive(src_pid));
    let before = ticks(&c.host(&src).console_file(&uid))
        .last()
        .copied()
        .unwrap();
    c.until(
        "ticks go on on the source",
        Duration::from_secs(30),
        || async {
            ticks(&c.host(&src).console_file(&uid))
                .last()
                .copied()
                .filter(|n| *n > before)
        },
    )
    .await;
    // The target's QEMU and run directory are gone.
    c.until("target cleaned up", Duration::from_secs(30), || async {
        (!c.host(&dst).data_dir.join("run/vmi").join(&uid).exists()).then_some(())
    })
    .await;
    let v = c.server.vmi("mig").await.unwrap();
    assert_eq!(v["status"]["phase"], "Running");
}

const DISK_VM: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: disks
spec:
  runStrategy: Always
  template:
    spec:
      evictionStrategy: LiveMigrate
      domain:
        devices:
          disks:
          - name: containerdisk
            disk: {bus: virtio}
          - name: scratch
            disk: {bus: virtio}
        memory:
          guest: 128Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - name: containerdisk
        containerDisk:
          image: quay.io/kubevirt/cirros-container-disk-demo
      - name: scratch
        emptyDisk:
          capacity: 64Mi
"#;

/// Type `line` into the guest's root shell: its serial socket on `host`.
fn type_line(host: &common::cluster::Host, uid: &str, line: &str) {
    use std::io::Write;
    let sock = host.data_dir.join("run/vmi").join(uid).join("serial.sock");
    let mut s = std::os::unix::net::UnixStream::connect(&sock)
        .unwrap_or_else(|e| panic!("serial socket {}: {e}", sock.display()));
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    // Let QEMU read it before the connection goes.
    std::thread::sleep(Duration::from_millis(300));
}

/// Run `expr` in the guest's shell on `host`; its output, as the guest
/// echoes it between `{tag}-` and `-END` (typed again if the shell missed
/// it; `tag` must be unique in the console log).
async fn ask(c: &Cluster, host: &str, uid: &str, tag: &str, expr: &str) -> String {
    let h = c.host(host);
    for _ in 0..3 {
        type_line(h, uid, &format!("echo {tag}-$({expr})-END"));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            let log = h.console_file(uid);
            // The echoed command line reads `{tag}-$(`: not an answer.
            if let Some(w) = log
                .split(&format!("{tag}-"))
                .skip(1)
                .filter_map(|s| s.split_once("-END").map(|(w, _)| w.trim().to_string()))
                .find(|w| !w.starts_with('$'))
            {
                return w;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    panic!(
        "no answer {tag} from the guest on {host}:\n{}",
        common::tail(&h.console_file(uid), 30)
    );
}

/// What the guest reads back from its disks: the start of the scratch
/// disk and the last sector of the root disk (each up to a `.` on its first
/// line: what follows a mark may be random bytes, newlines among them),
/// past its page cache.
async fn read_marks(c: &Cluster, host: &str, uid: &str, tag: &str) -> (String, String) {
    let scratch = ask(
        c,
        host,
        uid,
        &format!("{tag}S"),
        "sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vdb bs=64 count=1 2>/dev/null | head -n1 | cut -d. -f1 | tr -c 'A-Za-z0-9\\n-' ' '",
    )
    .await;
    let root = ask(
        c,
        host,
        uid,
        &format!("{tag}R"),
        "dd if=/dev/vda bs=512 skip=$(( $(cat /sys/block/vda/size) - 1 )) count=1 2>/dev/null | head -n1 | cut -d. -f1",
    )
    .await;
    (first_word(&scratch), first_word(&root))
}

/// The first word of a guest's answer: a mark read back from a disk is
/// followed by whatever the disk holds after it (random bytes in some
/// tests), which the guest's shell may print as further words.
fn first_word(answer: &str) -> String {
    answer
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The guest-visible content of a qcow2 file (read while its QEMU runs).
fn disk_content(file: &std::path::Path, out: &std::path::Path) -> Vec<u8> {
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(file)
        .arg(out)
        .status()
        .expect("qemu-img (qemu-utils) must be installed");
    assert!(st.success(), "qemu-img convert {}", file.display());
    let data = std::fs::read(out).unwrap();
    std::fs::remove_file(out).unwrap();
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_local_disks_follow_the_guest_by_block_mirror() {
    use std::os::unix::fs::MetadataExt;
    let c = Cluster::start(2).await;
    apply(&c, DISK_VM);
    let (uid, src_pid) = c.server.running_vmi("disks", None).await;
    let src = c.node_of("disks").await.expect("VMI bound to a host");
    let dst = if src == "host0" { "host1" } else { "host0" }.to_string();
    c.until("the guest is up", Duration::from_secs(120), || async {
        ticks(&c.host(&src).console_file(&uid))
            .last()
            .copied()
            .filter(|n| *n >= 1)
    })
    .await;

    // The guest writes to both of its writable disks (the containerDisk's
    // overlay and the emptyDisk), on its source host, and syncs.
    let mark = format!("{}", std::process::id());
    let wrote = ask(
        &c,
        &src,
        &uid,
        "W",
        &format!(
            "printf SCRATCH-{mark}. > /dev/vdb; printf ROOT-{mark}. | dd of=/dev/vda bs=512 \
             seek=$(( $(cat /sys/block/vda/size) - 1 )) 2>/dev/null; sync; echo ok"
        ),
    )
    .await;
    assert_eq!(wrote, "ok");
    let src_dir = c.host(&src).data_dir.join("run/vmi").join(&uid);
    let dst_dir = c.host(&dst).data_dir.join("run/vmi").join(&uid);
    let src_files: Vec<(u64, u64)> = ["disk-containerdisk.qcow2", "disk-scratch.qcow2"]
        .iter()
        .map(|f| {
            let m = std::fs::metadata(src_dir.join(f)).unwrap();
            (m.dev(), m.ino())
        })
        .collect();

    let out = c.server.ok(&[
        "migrate",
        "disks",
        "--to",
        &dst,
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert!(out.contains(&format!("to {dst}")), "{out}");
    let vmi = c.server.vmi("disks").await.unwrap();
    assert_eq!(vmi["status"]["nodeName"], Value::String(dst.clone()));
    let p = &vmi["status"]["migrationState"]["krvirtProgress"];
    assert_eq!(p["disksMirrored"], 2, "{p}");
    assert!(
        p["diskTotalBytes"].as_u64().is_some_and(|b| b >= 64 << 20),
        "the emptyDisk is copied whole: {p}"
    );
    assert!(p["diskMirrorMs"].as_u64().is_some(), "{p}");

    // The target's disks are files of its own, not links to the source's.
    for (f, (dev, ino)) in ["disk-containerdisk.qcow2", "disk-scratch.qcow2"]
        .iter()
        .zip(&src_files)
    {
        let m = std::fs::metadata(dst_dir.join(f)).unwrap();
        assert_eq!(m.nlink(), 1, "{f} on the target is a link");
        assert_ne!((m.dev(), m.ino()), (*dev, *ino), "{f} is the source's file");
    }
    // The guest reads back what it wrote, on the target.
    let (scratch, root) = read_marks(&c, &dst, &uid, "A").await;
    assert_eq!(scratch, format!("SCRATCH-{mark}"));
    assert_eq!(root, format!("ROOT-{mark}"));

    // And still once the source's QEMU and run directory are gone.
    c.until("source QEMU gone", Duration::from_secs(30), || async {
        (!pid_alive(src_pid)).then_some(())
    })
    .await;
    c.until(
        "source run dir removed",
        Duration::from_secs(30),
        || async { (!src_dir.exists()).then_some(()) },
    )
    .await;
    let (scratch, root) = read_marks(&c, &dst, &uid, "B").await;
    assert_eq!(scratch, format!("SCRATCH-{mark}"));
    assert_eq!(root, format!("ROOT-{mark}"));
    // The target host's files hold the data themselves.
    let tmp = c.server.dir.path().join("content.raw");
    let data = disk_content(&dst_dir.join("disk-scratch.qcow2"), &tmp);
    assert!(
        data.starts_with(format!("SCRATCH-{mark}.").as_bytes()),
        "target scratch disk starts {:?}",
        String::from_utf8_lossy(&data[..32])
    );
    let data = disk_content(&dst_dir.join("disk-containerdisk.qcow2"), &tmp);
    let last = &data[data.len() - 512..];
    assert!(
        last.starts_with(format!("ROOT-{mark}.").as_bytes()),
        "target root disk's last sector starts {:?}",
        String::from_utf8_lossy(&last[..32])
    );
    // The guest kept running: its ticks go on on the target.
    let before = ticks(&c.host(&dst).console_file(&uid)).last().copied();
    c.until("ticks on the target", Duration::from_secs(60), || async {
        let t = ticks(&c.host(&dst).console_file(&uid)).last().copied();
        (t > before).then_some(())
    })
    .await;
}

const SLOW_DISK_POLICY: &str = r#"
apiVersion: migrations.kubevirt.io/v1alpha1
kind: MigrationPolicy
metadata:
  name: slow-disks
spec:
  bandwidthPerMigration: 1Mi
  selectors:
    virtualMachineInstanceSelector:
      app: slow-disks
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_cancelled_while_mirroring_disks_leaves_the_guest_and_its_disks_on_the_source()
{
    let c = Cluster::start(2).await;
    apply(&c, SLOW_DISK_POLICY);
    // The disk VM, labelled for the 1 MiB/s policy (the mirror's speed too).
    apply(
        &c,
        &DISK_VM.replace(
            "  template:\n    spec:\n",
            "  template:\n    metadata:\n      labels: {app: slow-disks}\n    spec:\n",
        ),
    );
    let (uid, src_pid) = c.server.running_vmi("disks", None).await;
    let src = c.node_of("disks").await.unwrap();
    let dst = if src == "host0" { "host1" } else { "host0" }.to_string();
    c.until("the guest is up", Duration::from_secs(120), || async {
        ticks(&c.host(&src).console_file(&uid))
            .last()
            .copied()
            .filter(|n| *n >= 1)
    })
    .await;
    // 8 MiB of data on the scratch disk: 8 s of mirror at 1 MiB/s; then a
    // mark at its start.
    let mark = format!("{}", std::process::id());
    let wrote = ask(
        &c,
        &src,
        &uid,
        "W",
        &format!(
            "dd if=/dev/urandom of=/dev/vdb bs=1M count=8 2>/dev/null; \
             printf SCRATCH-{mark}. > /dev/vdb; sync; echo ok"
        ),
    )
    .await;
    assert_eq!(wrote, "ok");

    c.server.ok(&["migrate", "disks", "--to", &dst]);
    let p = c
        .until(
            "the disk mirror running",
            Duration::from_secs(60),
            || async {
                let v = c.server.vmi("disks").await?;
                let p = v["status"]["migrationState"]["krvirtProgress"].clone();
                (p["phase"] == "Disks" && p["diskTransferredBytes"].as_u64() > Some(0)).then_some(p)
            },
        )
        .await;
    assert_eq!(p["disksMirrored"], 2, "{p}");
    let out = c.server.ok(&["migrate", "disks", "--cancel"]);
    assert!(out.contains("cancelled"), "{out}");
    let ms = c
        .until("migration aborted", Duration::from_secs(60), || async {
            let v = c.server.vmi("disks").await?;
            let ms = v["status"]["migrationState"].clone();
            (ms["failed"] == true).then_some(ms)
        })
        .await;
    assert_eq!(ms["abortStatus"], "Succeeded", "{ms}");
    assert_ne!(ms["completed"], true, "{ms}");
    // The guest never left, its disk is its own and writable.
    assert_eq!(c.node_of("disks").await.as_deref(), Some(src.as_str()));
    assert!(pid_alive(src_pid));
    let (scratch, _) = read_marks(&c, &src, &uid, "A").await;
    assert_eq!(
        scratch,
        format!("SCRATCH-{mark}"),
        "console:\n{}",
        common::tail(&c.host(&src).console_file(&uid), 40)
    );
    let again = ask(
        &c,
        &src,
        &uid,
        "W2",
        &format!("printf AFTER-{mark}. > /dev/vdb; sync; echo ok"),
    )
    .await;
    assert_eq!(again, "ok");
    let (scratch, _) = read_marks(&c, &src, &uid, "B").await;
    assert_eq!(scratch, format!("AFTER-{mark}"));
    c.until("target cleaned up", Duration::from_secs(30), || async {
        (!c.host(&dst).data_dir.join("run/vmi").join(&uid).exists()).then_some(())
    })
    .await;
    // A second migration, unhindered, still works after the aborted one.
    c.server.ok(&["delete", "migrationpolicy", "slow-disks"]);
    let out = c.server.ok(&[
        "migrate",
        "disks",
        "--to",
        &dst,
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert!(out.contains(&format!("to {dst}")), "{out}");
    let (scratch, _) = read_marks(&c, &dst, &uid, "C").await;
    assert_eq!(scratch, format!("AFTER-{mark}"));
}

/// A VM whose data disk is a Volume on a `dir` pool marked `shared` (a
/// directory both namespaced hosts see, as an NFS mount would be): the
/// migration leaves the Volume where it is (only the containerDisk's
/// overlay is mirrored) and the guest reads its data back on the target,
/// from the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_on_a_shared_pool_stays_in_place_across_a_migration() {
    use std::os::unix::fs::MetadataExt;
    let c = Cluster::start(2).await;
    let pool_dir = c.server.dir.path().join("shared-pool");
    std::fs::create_dir_all(&pool_dir).unwrap();
    apply(
        &c,
        &format!(
            r#"apiVersion: krvirt.io/v1
kind: StoragePool
metadata:
  name: nfs
spec:
  type: dir
  path: {}
  shared: true
---
apiVersion: krvirt.io/v1
kind: Volume
metadata:
  name: shared-data
spec:
  pool: nfs
  capacity: 64Mi
  source:
    blank: {{}}
---
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: onshared
spec:
  runStrategy: Always
  template:
    spec:
      evictionStrategy: LiveMigrate
      domain:
        devices:
          disks:
          - name: containerdisk
            disk: {{bus: virtio}}
          - name: data
            disk: {{bus: virtio}}
        memory:
          guest: 128Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - name: containerdisk
        containerDisk:
          image: quay.io/kubevirt/cirros-container-disk-demo
      - name: data
        persistentVolumeClaim:
          claimName: shared-data
"#,
            pool_dir.display()
        ),
    );
    let (uid, _) = c.server.running_vmi("onshared", None).await;
    let src = c.node_of("onshared").await.expect("VMI bound to a host");
    let dst = if src == "host0" { "host1" } else { "host0" }.to_string();
    c.until("the guest is up", Duration::from_secs(120), || async {
        ticks(&c.host(&src).console_file(&uid))
            .last()
            .copied()
            .filter(|n| *n >= 1)
    })
    .await;
    let files = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&pool_dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect()
    };
    let before = files();
    assert_eq!(before.len(), 1, "one Volume file in the pool: {before:?}");
    let ino = std::fs::metadata(&before[0]).unwrap().ino();

    let mark = format!("{}", std::process::id());
    let wrote = ask(
        &c,
        &src,
        &uid,
        "W",
        &format!("printf SHARED-{mark}. > /dev/vdb; sync; echo ok"),
    )
    .await;
    assert_eq!(wrote, "ok");

    c.server.ok(&[
        "migrate",
        "onshared",
        "--to",
        &dst,
        "--wait",
        "--timeout",
        "120s",
    ]);
    let vmi = c.server.vmi("onshared").await.unwrap();
    assert_eq!(vmi["status"]["nodeName"], Value::String(dst.clone()));
    let p = &vmi["status"]["migrationState"]["krvirtProgress"];
    assert_eq!(
        p["disksMirrored"], 1,
        "only the containerDisk overlay is mirrored, the shared Volume is not: {p}"
    );
    // The same file, in place: not copied, not replaced.
    let after = files();
    assert_eq!(after, before, "the pool's files changed");
    assert_eq!(std::fs::metadata(&after[0]).unwrap().ino(), ino);
    // The guest on the target reads what it wrote on the source.
    let back = ask(
        &c,
        &dst,
        &uid,
        "R",
        "sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vdb bs=64 count=1 2>/dev/null | head -n1 | cut -d. -f1 | tr -c 'A-Za-z0-9\\n-' ' '",
    )
    .await;
    assert_eq!(back, format!("SHARED-{mark}"));
}

/// A StoragePool `local` (a `dir` pool, not shared) at `path` and a
/// 64 MiB blank Volume `local-data` in it.
fn local_volume(path: &std::path::Path) -> String {
    format!(
        r#"apiVersion: krvirt.io/v1
kind: StoragePool
metadata:
  name: local
spec:
  type: dir
  path: {}
---
apiVersion: krvirt.io/v1
kind: Volume
metadata:
  name: local-data
spec:
  pool: local
  capacity: 64Mi
  source:
    blank: {{}}
"#,
        path.display()
    )
}

/// VM `onlocal` (label `app: onlocal`) with Volume `local-data` as its
/// second disk (`/dev/vdb`), preferring host `prefer` (weight 100): the
/// tests point it away from the Volume's host, where placement must put
/// the VMI all the same.
fn local_volume_vm(prefer: &str) -> String {
    format!(
        r#"apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: onlocal
spec:
  runStrategy: Always
  template:
    metadata:
      labels: {{app: onlocal}}
    spec:
      evictionStrategy: LiveMigrate
      affinity:
        nodeAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            preference:
              matchExpressions:
              - {{key: kubernetes.io/hostname, operator: In, values: [{prefer}]}}
      domain:
        devices:
          disks:
          - name: containerdisk
            disk: {{bus: virtio}}
          - name: data
            disk: {{bus: virtio}}
        memory:
          guest: 128Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - name: containerdisk
        containerDisk:
          image: quay.io/kubevirt/cirros-container-disk-demo
      - name: data
        persistentVolumeClaim:
          claimName: local-data
"#
    )
}

/// Make the pool and Volume, wait until one host made it, then start the
/// VM, which prefers the other host but is placed on the Volume's;
/// returns (VMI uid, QEMU pid, the Volume's host).
async fn start_on_local_volume(c: &Cluster) -> (String, u32, String) {
    apply(c, &local_volume(&c.local_path()));
    let host = c
        .until("the Volume made", Duration::from_secs(60), || async {
            let v = c.server.get(LOCAL_VOLUME).await.ok()?;
            (v["status"]["phase"] == "Succeeded")
                .then(|| v["status"]["host"].as_str().map(str::to_string))
                .flatten()
        })
        .await;
    // Exactly one host made it.
    let made: Vec<&str> = c
        .hosts
        .iter()
        .filter(|h| h.local_dir().join(LOCAL_FILE).exists())
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(made, [host.as_str()], "the Volume's file on its host only");
    let other = c.hosts.iter().find(|h| h.name != host).unwrap();
    apply(c, &local_volume_vm(&other.name));
    let (uid, pid) = c.server.running_vmi("onlocal", None).await;
    assert_eq!(
        c.node_of("onlocal").await.as_deref(),
        Some(host.as_str()),
        "placed with its host-local Volume"
    );
    (uid, pid, host)
}

const LOCAL_VOLUME: &str = "/apis/krvirt.io/v1/namespaces/default/volumes/local-data";
/// The Volume's file in a `dir` pool: `{namespace}.{name}.qcow2`.
const LOCAL_FILE: &str = "default.local-data.qcow2";

/// A VM whose data disk is a Volume on a host-local `dir` pool (each
/// namespaced host has its own directory at the pool's path): the
/// migration copies the Volume into the target's pool by block mirror
/// while the guest keeps counting; the Volume then lives on the target
/// (`status.host`), the target's file is its own and holds the data, and
/// the source's file is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_on_a_host_local_pool_moves_with_its_guest() {
    use std::os::unix::fs::MetadataExt;
    let c = Cluster::start_with_host_local_dir(2, "local-pool").await;
    let (uid, _, src) = start_on_local_volume(&c).await;
    let dst = if src == "host0" { "host1" } else { "host0" }.to_string();
    let src_file = c.host(&src).local_dir().join(LOCAL_FILE);
    let dst_file = c.host(&dst).local_dir().join(LOCAL_FILE);
    c.until("the guest is up", Duration::from_secs(120), || async {
        ticks(&c.host(&src).console_file(&uid))
            .last()
            .copied()
            .filter(|n| *n >= 2)
    })
    .await;
    let vol = c.server.get(LOCAL_VOLUME).await.unwrap();
    assert_eq!(vol["status"]["host"], Value::String(src.clone()), "{vol}");
    assert!(src_file.is_file(), "the Volume's file on {src}");
    assert!(!dst_file.exists(), "{dst} has no copy yet");
    let src_ino = std::fs::metadata(&src_file).unwrap().ino();

    let mark = format!("{}", std::process::id());
    let wrote = ask(
        &c,
        &src,
        &uid,
        "W",
        &format!("printf LOCAL-{mark}. > /dev/vdb; sync; echo ok"),
    )
    .await;
    assert_eq!(wrote, "ok");
    let last_on_source = ticks(&c.host(&src).console_file(&uid))
        .last()
        .copied()
        .unwrap();

    let out = c.server.ok(&[
        "migrate",
        "onlocal",
        "--to",
        &dst,
        "--wait",
        "--timeout",
        "180s",
    ]);
    assert!(out.contains(&format!("to {dst}")), "{out}");
    let vmi = c.server.vmi("onlocal").await.unwrap();
    assert_eq!(vmi["status"]["nodeName"], Value::String(dst.clone()));
    let p = &vmi["status"]["migrationState"]["krvirtProgress"];
    assert_eq!(
        p["disksMirrored"], 2,
        "the containerDisk overlay and the Volume: {p}"
    );
    assert!(
        p["diskTotalBytes"].as_u64().is_some_and(|b| b >= 64 << 20),
        "the Volume is copied whole: {p}"
    );

    // The Volume now lives on the target, and only there.
    let vol = c
        .until("the Volume moved", Duration::from_secs(60), || async {
            let v = c.server.get(LOCAL_VOLUME).await.ok()?;
            let st = &v["status"];
            (st["host"] == dst.as_str()
                && st["migration"].is_null()
                && st["staleCopies"].is_null()
                && !src_file.exists())
            .then_some(v)
        })
        .await;
    assert_eq!(vol["status"]["phase"], "Succeeded", "{vol}");
    let m = std::fs::metadata(&dst_file).expect("the target's copy");
    assert_eq!(m.nlink(), 1);
    assert_ne!(m.ino(), src_ino, "the target's file is another file");

    // The guest reads its data back on the target, and keeps counting
    // from where it was.
    let back = ask(
        &c,
        &dst,
        &uid,
        "R",
        "sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vdb bs=64 count=1 2>/dev/null | head -n1 | cut -d. -f1 | tr -c 'A-Za-z0-9\\n-' ' '",
    )
    .await;
    assert_eq!(first_word(&back), format!("LOCAL-{mark}"));
    c.until("ticks on the target", Duration::from_secs(60), || async {
        let t = ticks(&c.host(&dst).console_file(&uid));
        (t.first().is_some_and(|f| *f > last_on_source) && t.len() >= 2).then_some(())
    })
    .await;
    // The same guest, not a new boot: no count from 1 again, only on
    // (a line may be lost in the shell's echo on the console).
    let t = ticks(&c.host(&dst).console_file(&uid));
    assert!(
        t.windows(2).all(|w| w[1] > w[0]) && t[0] + 1 >= last_on_source,
        "the target's ticks count on from {last_on_source}: {t:?}"
    );
    // The target's file itself holds the data.
    let tmp = c.server.dir.path().join("content.raw");
    let data = disk_content(&dst_file, &tmp);
    assert!(
        data.starts_with(format!("LOCAL-{mark}.").as_bytes()),
        "the target's Volume file starts {:?}",
        String::from_utf8_lossy(&data[..32])
    );

    // Restarted (its template now preferring the old host), the VM runs
    // where its Volume lives now, with the data.
    apply(&c, &local_volume_vm(&src));
    c.server.ok(&["restart", "onlocal"]);
    let (uid2, _) = c.server.running_vmi("onlocal", Some(&uid)).await;
    assert_eq!(c.node_of("onlocal").await.as_deref(), Some(dst.as_str()));
    let back = ask(
        &c,
        &dst,
        &uid2,
        "N",
        "dd if=/dev/vdb bs=64 count=1 2>/dev/null | head -n1 | cut -d. -f1 | tr -c 'A-Za-z0-9\\n-' ' '",
    )
    .await;
    assert_eq!(first_word(&back), format!("LOCAL-{mark}"));
}

/// A migration of a VM with a Volume on a host-local pool, cancelled while
/// the Volume is being mirrored and the target's agent is down: the
/// Volume stays on the source with its data; the target's copy, recorded
/// in the Volume, is deleted once that agent is back (level-triggered). Then a VirtualMachineSnapshot of the VM makes the next
/// migration fail at once, naming the Volume and the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_migration_leaves_a_host_local_volume_on_its_source() {
    use std::os::unix::fs::MetadataExt;
    let mut c = Cluster::start_with_host_local_dir(2, "local-pool").await;
    apply(
        &c,
        &SLOW_DISK_POLICY.replace("app: slow-disks", "app: onlocal"),
    );
    let (uid, src_pid, src) = start_on_local_volume(&c).await;
    let dst = if src == "host0" { "host1" } else { "host0" }.to_string();
    let src_file = c.host(&src).local_dir().join(LOCAL_FILE);
    let dst_file = c.host(&dst).local_dir().join(LOCAL_FILE);
    c.until("the guest is up", Duration::from_secs(120), || async {
        ticks(&c.host(&src).console_file(&uid))
            .last()
            .copied()
            .filter(|n| *n >= 1)
    })
    .await;
    let src_ino = std::fs::metadata(&src_file).unwrap().ino();
    // 8 MiB on the Volume: 8 s of mirror at the policy's 1 MiB/s.
    let mark = format!("{}", std::process::id());
    let wrote = ask(
        &c,
        &src,
        &uid,
        "W",
        &format!(
            "dd if=/dev/urandom of=/dev/vdb bs=1M count=8 2>/dev/null; \
             printf LOCAL-{mark}. > /dev/vdb; sync; echo ok"
        ),
    )
    .await;
    assert_eq!(wrote, "ok");

    c.server.ok(&["migrate", "onlocal", "--to", &dst]);
    c.until(
        "the Volume being mirrored",
        Duration::from_secs(60),
        || async {
            let v = c.server.vmi("onlocal").await?;
            let p = v["status"]["migrationState"]["krvirtProgress"].clone();
            (p["phase"] == "Disks" && p["diskTransferredBytes"].as_u64() > Some(0)).then_some(())
        },
    )
    .await;
    // While it runs, the Volume records the target's copy, which exists.
    let vol = c.server.get(LOCAL_VOLUME).await.unwrap();
    assert_eq!(vol["status"]["host"], Value::String(src.clone()), "{vol}");
    assert_eq!(
        vol["status"]["migration"]["targetHost"],
        Value::String(dst.clone()),
        "{vol}"
    );
    assert!(
        dst_file.is_file(),
        "the target's copy exists while mirroring"
    );

    // The target's agent dies; the migration is cancelled meanwhile.
    c.host_mut(&dst).kill_agent();
    let out = c.server.ok(&["migrate", "onlocal", "--cancel"]);
    assert!(out.contains("cancelled"), "{out}");
    c.until("migration aborted", Duration::from_secs(60), || async {
        let v = c.server.vmi("onlocal").await?;
        (v["status"]["migrationState"]["failed"] == true).then_some(())
    })
    .await;
    assert_eq!(c.node_of("onlocal").await.as_deref(), Some(src.as_str()));
    assert!(pid_alive(src_pid));
    // Only the target may delete its copy: it stays, recorded, until that
    // agent is back (its Volume sync finds the record and finishes).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let vol = c.server.get(LOCAL_VOLUME).await.unwrap();
    assert_eq!(
        vol["status"]["migration"]["targetHost"],
        Value::String(dst.clone()),
        "{vol}"
    );
    assert!(dst_file.is_file(), "nobody else deleted the target's copy");
    c.restart_agent(&dst);
    c.until(
        "the target's copy deleted",
        Duration::from_secs(60),
        || async {
            let v = c.server.get(LOCAL_VOLUME).await.ok()?;
            (v["status"]["migration"].is_null() && !dst_file.exists()).then_some(())
        },
    )
    .await;
    let vol = c.server.get(LOCAL_VOLUME).await.unwrap();
    assert_eq!(vol["status"]["host"], Value::String(src.clone()), "{vol}");
    assert!(vol["status"]["staleCopies"].is_null(), "{vol}");
    assert_eq!(
        std::fs::metadata(&src_file).unwrap().ino(),
        src_ino,
        "the source's file is untouched"
    );
    let back = ask(
        &c,
        &src,
        &uid,
        "R",
        "sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vdb bs=64 count=1 2>/dev/null | head -n1 | cut -d. -f1 | tr -c 'A-Za-z0-9\\n-' ' '",
    )
    .await;
    assert_eq!(first_word(&back), format!("LOCAL-{mark}"));

    // With a VirtualMachineSnapshot, the Volume cannot follow: refused.
    apply(
        &c,
        r#"apiVersion: snapshot.kubevirt.io/v1beta1
kind: VirtualMachineSnapshot
metadata:
  name: snap1
spec:
  source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: onlocal}
"#,
    );
    c.until("the snapshot ready", Duration::from_secs(120), || async {
        let s = c
            .server
            .get("/apis/snapshot.kubevirt.io/v1beta1/namespaces/default/virtualmachinesnapshots/snap1")
            .await
            .ok()?;
        (s["status"]["readyToUse"] == true).then_some(())
    })
    .await;
    c.server.ok(&["delete", "migrationpolicy", "slow-disks"]);
    let out = c.server.cli(&[
        "migrate",
        "onlocal",
        "--to",
        &dst,
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert!(!out.status.success(), "the migration must fail: {out:?}");
    let vmims = c
        .server
        .get("/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstancemigrations")
        .await
        .unwrap();
    let failed: Vec<&Value> = vmims["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["status"]["phase"] == "Failed")
        .filter(|m| m["status"]["conditions"].to_string().contains("snap1"))
        .collect();
    assert_eq!(failed.len(), 1, "{out:?}\n{vmims}");
    let why = failed[0]["status"]["conditions"].to_string();
    assert!(
        why.contains("local-data") && why.contains("\\\"local\\\""),
        "names the Volume and its pool: {why}"
    );
    assert_eq!(c.node_of("onlocal").await.as_deref(), Some(src.as_str()));
    assert!(src_file.is_file() && !dst_file.exists());
}
