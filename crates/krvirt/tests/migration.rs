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
