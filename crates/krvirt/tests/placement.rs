//! Placement on 3 real hosts (network namespaces, each with its own
//! `krvirt agent`; see tests/common/cluster.rs): nodeSelector, node
//! affinity, taints and tolerations (`krvirt agent --taint`, `krvirt taint
//! host`), required VM anti-affinity, capacity, and dedicated CPUs pinned
//! on the QEMU vCPU threads.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use serde_json::{Value, json};

/// A VM named `name` with `spec` merged into a tiny demo guest's VMI spec
/// and `labels` on its VMIs.
fn vm(name: &str, labels: Value, spec: Value) -> Value {
    let mut s = json!({
        "domain": {
            "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
            "memory": {"guest": "64Mi"}
        },
        "terminationGracePeriodSeconds": 0,
        "volumes": [{"name": "root",
                     "containerDisk": {"image": "quay.io/kubevirt/cirros-container-disk-demo"}}]
    });
    merge(&mut s, spec);
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"runStrategy": "Always",
                 "template": {"metadata": {"labels": labels}, "spec": s}}
    })
}

fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

fn apply(c: &Cluster, obj: &Value) {
    let f = c.server.dir.path().join(format!(
        "{}.json",
        obj["metadata"]["name"].as_str().unwrap()
    ));
    std::fs::write(&f, serde_json::to_vec(obj).unwrap()).unwrap();
    c.server.ok(&["apply", "-f", f.to_str().unwrap()]);
}

/// The host a VM's VMI was bound to.
async fn placed(c: &Cluster, name: &str) -> String {
    c.until(
        &format!("VMI {name} placed"),
        Duration::from_secs(90),
        || async { c.node_of(name).await },
    )
    .await
}

/// The VMI's `PodScheduled=False` message once the VM says
/// ErrorUnschedulable.
async fn unschedulable(c: &Cluster, name: &str) -> String {
    c.until(
        &format!("VM {name} ErrorUnschedulable"),
        Duration::from_secs(90),
        || async {
            let vm = c.server.vm(name).await?;
            if vm["status"]["printableStatus"] != "ErrorUnschedulable" {
                return None;
            }
            let vmi = c.server.vmi(name).await?;
            assert_eq!(vmi["status"]["phase"], "Pending", "{vmi}");
            assert!(vmi["status"]["nodeName"].is_null(), "{vmi}");
            vmi["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
                .and_then(|c| c["message"].as_str().map(str::to_string))
        },
    )
    .await
}

fn delete(c: &Cluster, names: &[&str]) {
    for n in names {
        c.server.ok(&["delete", "vm", n]);
    }
}

/// Wait until no VMI of these names is left (their QEMUs stopped).
async fn gone(c: &Cluster, names: &[&str]) {
    for n in names {
        c.until(
            &format!("VMI {n} deleted"),
            Duration::from_secs(120),
            || async { c.server.vmi(n).await.is_none().then_some(()) },
        )
        .await;
    }
}

fn to_host(host: &str) -> Value {
    json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": [host]}]}]}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_rules_on_three_hosts() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let c = Cluster::start_with_agent_args(
        &[
            args(&["--label", "disk=ssd"]),
            args(&["--label", "disk=hdd"]),
            args(&["--label", "disk=hdd", "--taint", "maint=yes:NoSchedule"]),
        ],
        &[],
    )
    .await;

    // Labels and the join-time taint are on the Hosts.
    let h2 = c
        .server
        .get("/apis/krvirt.io/v1/hosts/host2")
        .await
        .unwrap();
    assert_eq!(h2["metadata"]["labels"]["disk"], "hdd");
    assert_eq!(
        h2["spec"]["taints"],
        json!([{"key": "maint", "value": "yes", "effect": "NoSchedule"}])
    );

    // nodeSelector: the only ssd host.
    apply(
        &c,
        &vm("ssd", json!({}), json!({"nodeSelector": {"disk": "ssd"}})),
    );
    assert_eq!(placed(&c, "ssd").await, "host0");

    // Taints: a VM that must go to host2 does not without a toleration,
    // and does with one.
    apply(
        &c,
        &vm("notol", json!({}), json!({"affinity": to_host("host2")})),
    );
    apply(
        &c,
        &vm(
            "tol",
            json!({}),
            json!({"affinity": to_host("host2"),
                   "tolerations": [{"key": "maint", "operator": "Exists", "effect": "NoSchedule"}]}),
        ),
    );
    assert_eq!(placed(&c, "tol").await, "host2");
    let msg = unschedulable(&c, "notol").await;
    assert!(
        msg.contains("1 node(s) had untolerated taint")
            && msg.contains("2 didn't match the VMI's node affinity"),
        "{msg}"
    );
    // `krvirt taint host` removes it (kubectl syntax) and adds others.
    c.server.ok(&["taint", "host", "host2", "maint-"]);
    assert_eq!(placed(&c, "notol").await, "host2");
    c.server.ok(&[
        "taint",
        "host",
        "host1",
        "gpu=no:PreferNoSchedule",
        "x=y:NoExecute",
    ]);
    let h1 = c
        .server
        .get("/apis/krvirt.io/v1/hosts/host1")
        .await
        .unwrap();
    assert_eq!(
        h1["spec"]["taints"].as_array().map(Vec::len),
        Some(2),
        "{h1}"
    );
    let dup = c
        .server
        .cli(&["taint", "host", "host1", "gpu=yes:PreferNoSchedule"]);
    assert!(!dup.status.success(), "a duplicate taint needs --overwrite");
    c.server.ok(&["taint", "host", "host1", "gpu-", "x-"]);
    let h1 = c
        .server
        .get("/apis/krvirt.io/v1/hosts/host1")
        .await
        .unwrap();
    assert!(h1["spec"]["taints"].is_null(), "{h1}");
    delete(&c, &["ssd", "notol", "tol"]);
    gone(&c, &["ssd", "notol", "tol"]).await;

    // A NoExecute taint evicts a VMI that does not tolerate it: deleted
    // (evictionStrategy unset), its VM starts it again on another host.
    apply(&c, &vm("evict", json!({}), json!({})));
    let first = placed(&c, "evict").await;
    let uid = c.server.vmi("evict").await.unwrap()["metadata"]["uid"].clone();
    c.server
        .ok(&["taint", "host", &first, "evict=now:NoExecute"]);
    let second = c
        .until(
            "VMI evict recreated on another host",
            Duration::from_secs(120),
            || async {
                let v = c.server.vmi("evict").await?;
                (v["metadata"]["uid"] != uid)
                    .then(|| v["status"]["nodeName"].as_str().map(str::to_string))
                    .flatten()
            },
        )
        .await;
    assert_ne!(second, first, "the new VMI avoids the NoExecute host");
    c.server.ok(&["taint", "host", &first, "evict-"]);
    delete(&c, &["evict"]);
    gone(&c, &["evict"]).await;

    // Required anti-affinity on their own label: one per host, the fourth
    // has nowhere to go.
    let anti = json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "spread"}},
         "topologyKey": "kubernetes.io/hostname"}]}}});
    let spread = ["spread0", "spread1", "spread2"];
    for n in spread {
        apply(&c, &vm(n, json!({"app": "spread"}), anti.clone()));
    }
    let mut hosts = Vec::new();
    for n in spread {
        hosts.push(placed(&c, n).await);
    }
    hosts.sort();
    assert_eq!(hosts, ["host0", "host1", "host2"]);
    apply(&c, &vm("spread3", json!({"app": "spread"}), anti.clone()));
    let msg = unschedulable(&c, "spread3").await;
    assert!(msg.contains("anti-affinity"), "{msg}");
    assert!(msg.starts_with("0/3 hosts are available"), "{msg}");

    // Too big for every host: a capacity reason.
    apply(
        &c,
        &vm(
            "huge",
            json!({}),
            json!({"domain": {"memory": {"guest": "4096Gi"}}}),
        ),
    );
    let msg = unschedulable(&c, "huge").await;
    assert!(msg.contains("3 insufficient memory"), "{msg}");
    delete(&c, &["spread0", "spread1", "spread2", "spread3", "huge"]);
    gone(&c, &["spread0", "spread1", "spread2", "spread3", "huge"]).await;

    // Dedicated CPUs: chosen by the scheduler, recorded in the status and
    // applied to the QEMU vCPU threads.
    apply(
        &c,
        &vm(
            "pinned",
            json!({}),
            json!({"domain": {"cpu": {"cores": 1, "dedicatedCpuPlacement": true},
                              "resources": {"requests": {"cpu": "1"}}}}),
        ),
    );
    let (_uid, pid) = c.server.running_vmi("pinned", None).await;
    let vmi = c.server.vmi("pinned").await.unwrap();
    let cpus = vmi["status"]["krvirtRuntime"]["dedicatedCpus"]
        .as_str()
        .unwrap_or_else(|| panic!("no dedicatedCpus in {}", vmi["status"]))
        .to_string();
    assert_eq!(
        vmi["metadata"]["annotations"]["krvirt.io/dedicated-cpus"],
        Value::String(cpus.clone()),
        "the agent applied the scheduler's choice"
    );
    let mut vcpu_threads = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        // QEMU names vCPU threads "CPU n/TCG" (debug-threads=on).
        if comm.starts_with("CPU ") {
            vcpu_threads += 1;
            let status = std::fs::read_to_string(t.join("status")).unwrap();
            let allowed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_string();
            assert_eq!(allowed, cpus, "vCPU thread {comm:?}");
        }
    }
    assert_eq!(vcpu_threads, 1, "one vCPU thread");
    delete(&c, &["pinned"]);
    gone(&c, &["pinned"]).await;
}

fn meminfo(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| {
            v.trim_start_matches(':')
                .trim()
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/meminfo"))
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Changes of the kernel's hugepage pool, serialized across test
/// processes (the hypervisor's hugepages test uses the same lock file).
fn with_hugepage_lock<T>(f: impl FnOnce() -> T) -> T {
    use std::os::fd::AsRawFd;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/krvirt-test-hugepages.lock")
        .unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    f()
}

/// `n` more 2 MiB pages in the pool while alive; fails loudly if the
/// kernel cannot reserve them.
struct Hugepages(u64);

impl Hugepages {
    fn reserve(n: u64) -> Hugepages {
        with_hugepage_lock(|| {
            let cur: u64 = std::fs::read_to_string(NR_HUGEPAGES)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let before = meminfo("HugePages_Free");
            std::fs::write(NR_HUGEPAGES, (cur + n).to_string())
                .unwrap_or_else(|e| panic!("cannot reserve hugepages: {e}"));
            let g = Hugepages(n);
            let after = meminfo("HugePages_Free");
            assert!(
                after >= before + n,
                "the kernel reserved {} of {n} 2 MiB hugepages",
                after.saturating_sub(before)
            );
            g
        })
    }
}

impl Drop for Hugepages {
    fn drop(&mut self) {
        with_hugepage_lock(|| {
            if let Ok(cur) = std::fs::read_to_string(NR_HUGEPAGES) {
                let cur: u64 = cur.trim().parse().unwrap_or(0);
                let _ = std::fs::write(NR_HUGEPAGES, cur.saturating_sub(self.0).to_string());
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hugepages_and_guest_numa_passthrough() {
    let c = Cluster::start_with_agent_args(&[vec![]], &[("KRVIRT_HEARTBEAT_INTERVAL_MS", "1000")])
        .await;
    let _pool = Hugepages::reserve(40);
    // The agent reports the pool (total and free) in the Host status.
    c.until(
        "host0 reports hugepages",
        Duration::from_secs(60),
        || async {
            let h = c.server.get("/apis/krvirt.io/v1/hosts/host0").await.ok()?;
            h["status"]["hugepages"]
                .as_array()?
                .iter()
                .any(|p| p["pageSize"] == "2097152" && p["free"].as_u64() >= Some(32))
                .then_some(())
        },
    )
    .await;
    let free_before = meminfo("HugePages_Free");

    apply(
        &c,
        &vm(
            "numa",
            json!({}),
            json!({"domain": {
                "cpu": {"cores": 1, "dedicatedCpuPlacement": true,
                        "numa": {"guestMappingPassthrough": {}}},
                "memory": {"guest": "64Mi", "hugepages": {"pageSize": "2Mi"}},
                "resources": {"requests": {"cpu": "1"}}}}),
        ),
    );
    let (_uid, pid) = c.server.running_vmi("numa", None).await;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let mount = c.host("host0").data_dir.join("hugepages-2Mi");
    let backend = format!(
        "memory-backend-file,id=mem0,size=64M,mem-path={},share=off,prealloc=on,host-nodes=0,policy=bind",
        mount.display()
    );
    assert!(args.contains(&backend), "{args:?}");
    assert!(
        args.contains(&"node,nodeid=0,cpus=0,memdev=mem0".to_string()),
        "{args:?}"
    );
    // The guest's RAM is in the pool: its 32 pages are taken.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.lines().any(|l| l.contains("hugepages-2Mi")),
        "QEMU maps nothing from the hugetlbfs mount"
    );
    let free = meminfo("HugePages_Free");
    assert!(
        hugetlb_kb(pid) >= 64 * 1024,
        "QEMU maps {} kB of hugepages (HugePages_Free {free_before} -> {free})",
        hugetlb_kb(pid)
    );
    delete(&c, &["numa"]);
    gone(&c, &["numa"]).await;
}

/// kB of hugetlb memory (private + shared) a process maps, from its smaps.
fn hugetlb_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v = l
                .strip_prefix("Private_Hugetlb:")
                .or_else(|| l.strip_prefix("Shared_Hugetlb:"))?;
            v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        })
        .sum()
}
