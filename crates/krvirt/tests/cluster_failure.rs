//! Host failure: a host's agent is killed and its namespace cut off; its
//! lease expires, its VMs come back on the other host exactly once, and
//! when it returns its stale QEMU is stopped.
//!
//! Self-fencing: a host cut off with its agent ALIVE; the agent kills its
//! guest before the VM's new copy starts on the other host (the stale
//! QEMU's exit, as seen by the test, precedes the new QEMU's start time),
//! and reports it (`SelfFenced`) once the link is back: one copy runs.
//! The same with the agent KILLED: its fence watchdog process does it, and
//! the restarted agent reports it. (The first test runs its agents without
//! the watchdog: the returning agent's own check stops the stale copy.)

mod common;

use std::time::{Duration, Instant};

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
            // Nothing on the host fences: the returning agent's check does.
            ("KRVIRT_NO_FENCE_WATCHDOG", "true"),
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

/// Seconds since boot (/proc/uptime, 10 ms resolution).
fn uptime() -> f64 {
    let s = std::fs::read_to_string("/proc/uptime").expect("/proc/uptime");
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("uptime")
}

/// When process `pid` started, in seconds since boot (/proc/PID/stat).
fn started_at(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // Fields after the command name (which may hold spaces): state is 3rd,
    // starttime the 22nd.
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let ticks: f64 = rest
        .split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .expect("starttime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_host_with_its_agent_alive_kills_its_guest_before_the_vm_restarts_elsewhere() {
    cut_off_host_fences_its_guest(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_agents_watchdog_kills_its_guest_before_the_vm_restarts_elsewhere() {
    cut_off_host_fences_its_guest(true).await;
}

/// Cut a host off (`kill_agent`: and kill its agent); its guest must be
/// gone before the new copy starts elsewhere; back, one copy runs.
async fn cut_off_host_fences_its_guest(kill_agent: bool) {
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

    // Note when the stale QEMU is gone (an upper bound of its exit).
    let watcher = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while pid_alive(pid1) {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(uptime())
    });

    // Cut the host off; its agent stays alive, or dies.
    if kill_agent {
        c.host_mut(&lost).kill_agent();
    }
    c.host(&lost).set_link(false);
    let (uid2, pid2) = c.server.running_vmi("ha", Some(&uid1)).await;
    assert_eq!(c.node_of("ha").await.as_deref(), Some(other.as_str()));
    let new_started = started_at(pid2);
    assert!(
        !pid_alive(pid1),
        "two copies: the cut-off host still runs QEMU {pid1} while {pid2} runs on {other}\n{}",
        common::tail(&c.host(&lost).log(), 30)
    );
    let old_gone = watcher
        .join()
        .unwrap()
        .expect("stale QEMU still alive after 120 s");
    assert!(
        old_gone < new_started,
        "the stale copy was seen gone at {old_gone:.2} s, after the new copy started at \
         {new_started:.2} s (since boot)"
    );
    let log = c.host(&lost).log();
    let by = if kill_agent {
        "fence-watchdog: self-fenced"
    } else {
        "self-fenced: lease not renewed"
    };
    assert!(
        log.contains(by),
        "the agent did not fence itself:\n{}",
        common::tail(&log, 30)
    );
    let fenced_dir = c.host(&lost).data_dir.join("fenced");
    assert!(
        std::fs::read_dir(&fenced_dir)
            .map(|d| d.count())
            .unwrap_or(0)
            == 1,
        "one fence record in {}",
        fenced_dir.display()
    );

    // The link comes back (and the agent): it renews its lease, reports
    // what was done, and removes the stale run directory.
    c.host(&lost).set_link(true);
    if kill_agent {
        c.restart_agent(&lost);
    }
    c.wait_host_ready(&lost, Duration::from_secs(60)).await;
    let event = c
        .until("SelfFenced event", Duration::from_secs(60), || async {
            let v = c
                .server
                .get("/api/v1/namespaces/default/events")
                .await
                .ok()?;
            v["items"]
                .as_array()?
                .iter()
                .find(|e| e["reason"] == "SelfFenced")
                .cloned()
        })
        .await;
    assert_eq!(event["involvedObject"]["uid"], uid1.as_str(), "{event}");
    assert_eq!(event["type"], "Warning", "{event}");
    let msg = event["message"].as_str().unwrap_or_default();
    assert!(msg.contains(&format!("pid {pid1}")), "{event}");
    c.until("fence record reported", Duration::from_secs(30), || async {
        (std::fs::read_dir(&fenced_dir)
            .map(|d| d.count())
            .unwrap_or(0)
            == 0)
            .then_some(())
    })
    .await;
    c.until("stale run dir removed", Duration::from_secs(30), || async {
        (!c.host(&lost).data_dir.join("run/vmi").join(&uid1).exists()).then_some(())
    })
    .await;
    // Exactly one copy: the replacement runs on, no third incarnation.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = c.server.vmi("ha").await.unwrap();
    assert_eq!(v["metadata"]["uid"], uid2.as_str());
    assert_eq!(v["status"]["phase"], "Running");
    assert_eq!(v["status"]["krvirtRuntime"]["pid"], pid2);
    assert!(pid_alive(pid2));
    assert!(!pid_alive(pid1));
    let uids = uids_of(&c).await;
    assert!(
        uids.len() == 2 && uids.contains(&uid1) && uids.contains(&uid2),
        "incarnations seen in events: {uids:?}"
    );
}
