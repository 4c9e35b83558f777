//! Host failure: a host's agent is killed and its namespace cut off; its
//! lease expires, its VMs come back on the other host exactly once, and
//! when it returns its stale QEMU is stopped.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::pid_alive;

const VM: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: ha
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

/// How many VMIs named `ha` the store has seen with their uids: the
/// VMI list of the name, plus the events naming each incarnation.
async fn uids_of(c: &Cluster) -> Vec<String> {
    let v = c
        .server
        .get("/api/v1/namespaces/default/events")
        .await
        .unwrap_or_default();
    let mut uids: Vec<String> = v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["involvedObject"]["kind"] == "VirtualMachineInstance"
                && e["involvedObject"]["name"] == "ha"
        })
        .filter_map(|e| e["involvedObject"]["uid"].as_str().map(str::to_string))
        .collect();
    uids.sort();
    uids.dedup();
    uids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_hosts_vm_comes_back_elsewhere_once_and_its_stale_copy_is_stopped() {
    let mut c = Cluster::start_with(
        2,
        &[
            ("KRVIRT_HOST_LEASE_SECONDS", "4"),
            ("KRVIRT_HEARTBEAT_INTERVAL_MS", "500"),
        ],
    )
    .await;
    let f = c.server.dir.path().join("vm.yaml");
    std::fs::write(&f, VM).unwrap();
    c.server.ok(&["apply", "-f", f.to_str().unwrap()]);
    let (uid1, pid1) = c.server.running_vmi("ha", None).await;
    let lost = c.node_of("ha").await.unwrap();
    let other = if lost == "host0" { "host1" } else { "host0" }.to_string();

    // The host dies: agent killed, network cut. Its QEMU keeps running.
    c.host_mut(&lost).kill_agent();
    c.host(&lost).set_link(false);
    assert!(pid_alive(pid1));

    // Its lease expires: NotReady, and the VM comes back on the other host.
    let (uid2, pid2) = c.server.running_vmi("ha", Some(&uid1)).await;
    assert_eq!(c.node_of("ha").await.as_deref(), Some(other.as_str()));
    let h = c
        .server
        .get(&format!("/apis/krvirt.io/v1/hosts/{lost}"))
        .await
        .unwrap();
    let ready = h["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap();
    assert_eq!(ready["status"], "False", "{h}");
    assert_eq!(ready["reason"], "NodeLeaseExpired", "{h}");
    let hosts = c.server.ok(&["get", "hosts"]);
    let line = hosts
        .lines()
        .find(|l| l.starts_with(lost.as_str()))
        .unwrap_or_default();
    assert!(line.contains("NotReady"), "{hosts}");
    let events = c.server.ok(&["events", "--for", "vmi/ha"]);
    assert!(events.contains("NodeUnresponsive"), "{events}");

    // The host comes back: its agent stops the stale copy first thing.
    c.host(&lost).set_link(true);
    c.restart_agent(&lost);
    c.wait_host_ready(&lost, Duration::from_secs(60)).await;
    c.until("stale QEMU stopped", Duration::from_secs(30), || async {
        (!pid_alive(pid1)).then_some(())
    })
    .await;
    c.until("stale run dir removed", Duration::from_secs(30), || async {
        (!c.host(&lost).data_dir.join("run/vmi").join(&uid1).exists()).then_some(())
    })
    .await;
    // Exactly once: the replacement still runs, unchanged, and no third
    // incarnation ever appeared.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = c.server.vmi("ha").await.unwrap();
    assert_eq!(v["metadata"]["uid"], uid2.as_str());
    assert_eq!(v["status"]["phase"], "Running");
    assert_eq!(v["status"]["krvirtRuntime"]["pid"], pid2);
    assert!(pid_alive(pid2));
    let uids = uids_of(&c).await;
    assert!(
        uids.len() == 2 && uids.contains(&uid1) && uids.contains(&uid2),
        "incarnations seen in events: {uids:?}"
    );
}
