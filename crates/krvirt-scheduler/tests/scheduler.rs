//! Behaviour of each filter and score, and property tests of the
//! invariants (capacity with over-commit, taints, required anti-affinity).

use std::collections::BTreeMap;

use krvirt_scheduler::*;
use proptest::prelude::*;
use serde_json::json;

const GI: u64 = 1 << 30;

fn host(name: &str, cpus: u32, mem_gi: u64) -> HostInfo {
    HostInfo {
        name: name.into(),
        ready: true,
        cpu_millis: u64::from(cpus) * 1000,
        memory_bytes: mem_gi * GI,
        ..Default::default()
    }
}

fn numa_host(name: &str, nodes: u32, cpus_per_node: u32, mem_gi_per_node: u64) -> HostInfo {
    let mut h = host(
        name,
        nodes * cpus_per_node,
        u64::from(nodes) * mem_gi_per_node,
    );
    for n in 0..nodes {
        h.numa_nodes.push(HostNuma {
            id: n,
            memory_bytes: mem_gi_per_node * GI,
        });
        for c in 0..cpus_per_node {
            h.cpus.push(HostCpu {
                id: n * cpus_per_node + c,
                numa_node: n,
            });
        }
    }
    h
}

fn vmi(name: &str, vcpus: u32, mem_gi: u64) -> VmiRequest {
    VmiRequest::new("default", name, vcpus, mem_gi * GI)
}

fn no_overcommit() -> Overcommit {
    Overcommit {
        cpu_allocation_ratio: 1.0,
        memory_overcommit_percent: 100,
    }
}

fn unschedulable(e: ScheduleError) -> String {
    match e {
        ScheduleError::Unschedulable(u) => u.to_string(),
        other => panic!("expected Unschedulable, got {other:?}"),
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn anti(app: &str) -> Affinity {
    serde_json::from_value(json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": app}}, "topologyKey": "kubernetes.io/hostname"}]}}))
    .unwrap()
}

#[test]
fn spreads_by_least_allocated() {
    let mut s = Scheduler::new(
        vec![host("a", 8, 16), host("b", 8, 16), host("c", 8, 16)],
        no_overcommit(),
    );
    let mut seen = Vec::new();
    for i in 0..3 {
        seen.push(s.place(&vmi(&format!("v{i}"), 1, 1)).unwrap().host);
    }
    seen.sort();
    assert_eq!(seen, ["a", "b", "c"]);
}

#[test]
fn cpu_overcommit_ratio_is_per_host_or_cluster() {
    // 2 CPUs, ratio 2 => 4 vCPUs of shared requests fit, the 5th does not.
    let cluster = Overcommit {
        cpu_allocation_ratio: 2.0,
        memory_overcommit_percent: 100,
    };
    let mut s = Scheduler::new(vec![host("a", 2, 64)], cluster);
    for i in 0..4 {
        s.place(&vmi(&format!("v{i}"), 1, 1)).unwrap();
    }
    let err = unschedulable(s.place(&vmi("v5", 1, 1)).unwrap_err());
    assert_eq!(err, "0/1 hosts are available: 1 insufficient cpu.");

    // The host's own ratio wins over the cluster's.
    let mut h = host("a", 2, 64);
    h.overcommit = Some(Overcommit {
        cpu_allocation_ratio: 1.0,
        memory_overcommit_percent: 100,
    });
    let mut s = Scheduler::new(vec![h], cluster);
    s.place(&vmi("v0", 2, 1)).unwrap();
    assert!(s.place(&vmi("v1", 1, 1)).is_err());
}

#[test]
fn memory_overcommit_percent_scales_capacity() {
    let oc = Overcommit {
        cpu_allocation_ratio: 10.0,
        memory_overcommit_percent: 150,
    };
    let mut s = Scheduler::new(vec![host("a", 8, 4)], oc);
    s.place(&vmi("v0", 1, 4)).unwrap();
    s.place(&vmi("v1", 1, 2)).unwrap();
    let err = unschedulable(s.place(&vmi("v2", 1, 1)).unwrap_err());
    assert!(err.contains("1 insufficient memory"), "{err}");
}

#[test]
fn reasons_are_counted_per_host() {
    let mut tainted = host("t", 8, 64);
    tainted.taints.push(Taint {
        key: "dedicated".into(),
        value: Some("db".into()),
        effect: TaintEffect::NoSchedule,
    });
    let mut down = host("d", 8, 64);
    down.ready = false;
    let hosts = vec![host("a", 8, 1), host("b", 8, 1), tainted, down];
    let mut s = Scheduler::new(hosts, Overcommit::default());
    let err = unschedulable(s.schedule(&vmi("v", 1, 2)).unwrap_err());
    assert_eq!(
        err,
        "0/4 hosts are available: 1 not ready, 1 node(s) had untolerated taint, 2 insufficient memory."
    );
}

#[test]
fn taints_and_tolerations() {
    let mut t = host("t", 8, 64);
    t.taints.push(Taint {
        key: "dedicated".into(),
        value: Some("db".into()),
        effect: TaintEffect::NoExecute,
    });
    let mut s = Scheduler::new(vec![t.clone()], Overcommit::default());
    assert!(s.schedule(&vmi("v", 1, 1)).is_err());
    let mut v = vmi("v", 1, 1);
    v.tolerations = serde_json::from_value(
        json!([{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoExecute"}]),
    )
    .unwrap();
    assert_eq!(s.schedule(&v).unwrap().host, "t");
    // Wrong value, or wrong effect: not tolerated.
    v.tolerations[0].value = Some("web".into());
    assert!(s.schedule(&v).is_err());
    v.tolerations = serde_json::from_value(
        json!([{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]),
    )
    .unwrap();
    assert!(s.schedule(&v).is_err());
    // Exists without a key tolerates everything.
    v.tolerations = serde_json::from_value(json!([{"operator": "Exists"}])).unwrap();
    assert!(s.schedule(&v).is_ok());

    // PreferNoSchedule only steers.
    let mut p = host("p", 8, 64);
    p.taints.push(Taint {
        key: "old".into(),
        value: None,
        effect: TaintEffect::PreferNoSchedule,
    });
    let mut s = Scheduler::new(vec![p, host("q", 4, 32)], Overcommit::default());
    assert_eq!(s.schedule(&vmi("v", 1, 1)).unwrap().host, "q");
    let mut s = Scheduler::new(
        vec![{
            let mut p = host("p", 8, 64);
            p.taints.push(Taint {
                key: "old".into(),
                value: None,
                effect: TaintEffect::PreferNoSchedule,
            });
            p
        }],
        Overcommit::default(),
    );
    assert_eq!(s.schedule(&vmi("v", 1, 1)).unwrap().host, "p");
}

#[test]
fn node_selector_and_node_affinity_operators() {
    let mut a = host("a", 8, 64);
    a.labels = labels(&[("zone", "z1"), ("gen", "3"), ("ssd", "")]);
    let mut b = host("b", 8, 64);
    b.labels = labels(&[("zone", "z2"), ("gen", "5")]);
    let mut s = Scheduler::new(vec![a, b], Overcommit::default());

    let mut v = vmi("v", 1, 1);
    v.node_selector = labels(&[("zone", "z2")]);
    assert_eq!(s.schedule(&v).unwrap().host, "b");
    v.node_selector = labels(&[("kubernetes.io/hostname", "a")]);
    assert_eq!(s.schedule(&v).unwrap().host, "a");

    let req = |op: &str, key: &str, values: serde_json::Value| -> VmiRequest {
        let mut v = vmi("v", 1, 1);
        v.affinity = serde_json::from_value(json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
            {"nodeSelectorTerms": [{"matchExpressions": [{"key": key, "operator": op, "values": values}]}]}}}))
        .unwrap();
        v
    };
    assert_eq!(
        s.schedule(&req("In", "zone", json!(["z1"]))).unwrap().host,
        "a"
    );
    assert_eq!(
        s.schedule(&req("NotIn", "zone", json!(["z1"])))
            .unwrap()
            .host,
        "b"
    );
    assert_eq!(
        s.schedule(&req("Exists", "ssd", json!([]))).unwrap().host,
        "a"
    );
    assert_eq!(
        s.schedule(&req("DoesNotExist", "ssd", json!([])))
            .unwrap()
            .host,
        "b"
    );
    assert_eq!(
        s.schedule(&req("Gt", "gen", json!(["4"]))).unwrap().host,
        "b"
    );
    assert_eq!(
        s.schedule(&req("Lt", "gen", json!(["4"]))).unwrap().host,
        "a"
    );
    let err = unschedulable(s.schedule(&req("Gt", "gen", json!(["9"]))).unwrap_err());
    assert_eq!(
        err,
        "0/2 hosts are available: 2 didn't match the VMI's node affinity."
    );
    // Bad input names the field.
    match s.schedule(&req("Gt", "gen", json!(["x"]))).unwrap_err() {
        ScheduleError::Invalid { field, .. } => assert_eq!(
            field,
            "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values"
        ),
        other => panic!("{other:?}"),
    }

    // Preferred: weight steers among feasible hosts.
    let mut v = vmi("v", 1, 1);
    v.affinity = serde_json::from_value(json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 50, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}]}}]}}))
    .unwrap();
    assert_eq!(s.schedule(&v).unwrap().host, "a");
}

#[test]
fn required_anti_affinity_spreads_and_then_refuses() {
    let hosts = vec![host("a", 8, 64), host("b", 8, 64), host("c", 8, 64)];
    let mut s = Scheduler::new(hosts, Overcommit::default());
    let mut used = Vec::new();
    for i in 0..3 {
        let mut v = vmi(&format!("db{i}"), 1, 1);
        v.labels = labels(&[("app", "db")]);
        v.affinity = anti("db");
        used.push(s.place(&v).unwrap().host);
    }
    used.sort();
    assert_eq!(used, ["a", "b", "c"]);
    let mut v = vmi("db3", 1, 1);
    v.labels = labels(&[("app", "db")]);
    v.affinity = anti("db");
    assert_eq!(
        unschedulable(s.schedule(&v).unwrap_err()),
        "0/3 hosts are available: 3 didn't match VM anti-affinity rules."
    );
    // Another namespace is not affected.
    v.namespace = "other".into();
    assert!(s.schedule(&v).is_ok());
    // A VMI without anti-affinity but matching the placed VMIs' terms is
    // kept away by theirs (symmetry).
    let mut w = vmi("w", 1, 1);
    w.labels = labels(&[("app", "db")]);
    assert_eq!(
        unschedulable(s.schedule(&w).unwrap_err()),
        "0/3 hosts are available: 3 didn't satisfy existing VMs' anti-affinity rules."
    );
}

#[test]
fn vm_affinity_required_and_preferred() {
    let hosts = vec![host("a", 8, 64), host("b", 8, 64), host("c", 8, 64)];
    let mut s = Scheduler::new(hosts, Overcommit::default());
    let mut web = vmi("web", 1, 1);
    web.labels = labels(&[("app", "web")]);
    let web_host = s.place(&web).unwrap().host;
    let mut cache = vmi("cache", 1, 1);
    cache.affinity = serde_json::from_value(json!({"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]},
         "topologyKey": "kubernetes.io/hostname"}]}}))
    .unwrap();
    for _ in 0..3 {
        assert_eq!(s.place(&cache).unwrap().host, web_host);
    }
    // The first VMI of a self-selecting group may go anywhere.
    let mut first = vmi("g0", 1, 1);
    first.labels = labels(&[("group", "g")]);
    first.affinity = serde_json::from_value(json!({"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"group": "g"}}, "topologyKey": "kubernetes.io/hostname"}]}}))
    .unwrap();
    let g_host = s.place(&first).unwrap().host;
    assert_eq!(s.place(&first).unwrap().host, g_host);

    // Preferred anti-affinity steers away from web's host.
    let mut pref = vmi("p", 1, 1);
    pref.affinity = serde_json::from_value(
        json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": {"labelSelector": {"matchLabels": {"app": "web"}},
          "topologyKey": "kubernetes.io/hostname"}}]}}),
    )
    .unwrap();
    assert_ne!(s.schedule(&pref).unwrap().host, web_host);

    // An empty topology key is refused by field.
    let mut bad = vmi("bad", 1, 1);
    bad.affinity = serde_json::from_value(
        json!({"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": ""}]}}),
    )
    .unwrap();
    match s.schedule(&bad).unwrap_err() {
        ScheduleError::Invalid { field, .. } => assert_eq!(
            field,
            "spec.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn zone_topology_spreads_and_groups_by_label_value() {
    // Two zones of two hosts each, and one host without a zone label.
    let mut hosts = Vec::new();
    for (name, zone) in [
        ("a1", Some("a")),
        ("a2", Some("a")),
        ("b1", Some("b")),
        ("b2", Some("b")),
        ("n", None),
    ] {
        let mut h = host(name, 8, 64);
        if let Some(z) = zone {
            h.labels = labels(&[("topology.kubernetes.io/zone", z)]);
        }
        hosts.push(h);
    }
    let mut s = Scheduler::new(hosts, Overcommit::default());
    let zone_anti: Affinity = serde_json::from_value(json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "topology.kubernetes.io/zone"}]}}))
    .unwrap();
    let mut zones = Vec::new();
    for i in 0..3 {
        let mut v = vmi(&format!("db{i}"), 1, 1);
        v.labels = labels(&[("app", "db")]);
        v.affinity = zone_anti.clone();
        let h = s.place(&v).unwrap().host;
        zones.push(h[..1].to_string());
    }
    // One per zone; the third can only go to the host without a zone,
    // which is in no domain (as in Kubernetes: no topology pair, no
    // conflict), so further replicas land there too.
    zones.sort();
    assert_eq!(zones, ["a", "b", "n"]);
    let mut v = vmi("db3", 1, 1);
    v.labels = labels(&[("app", "db")]);
    v.affinity = zone_anti;
    assert_eq!(s.place(&v).unwrap().host, "n");

    // Required affinity by zone: any host of the zone of the first web VM.
    let mut web = vmi("web", 1, 1);
    web.labels = labels(&[("app", "web")]);
    web.node_selector = labels(&[("topology.kubernetes.io/zone", "b")]);
    s.place(&web).unwrap();
    let mut near = vmi("near", 1, 1);
    near.affinity = serde_json::from_value(json!({"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "topology.kubernetes.io/zone"}]}}))
    .unwrap();
    for _ in 0..4 {
        assert!(s.place(&near).unwrap().host.starts_with('b'));
    }
}

#[test]
fn dedicated_cpus_prefer_one_numa_node_and_are_exclusive() {
    let mut s = Scheduler::new(vec![numa_host("h", 2, 4, 16)], no_overcommit());
    let mut v = vmi("v", 3, 1);
    v.dedicated_cpus = true;
    let p1 = s.place(&v).unwrap();
    assert_eq!(p1.dedicated_cpus.len(), 3);
    let node = |c: u32| c / 4;
    assert!(
        p1.dedicated_cpus
            .iter()
            .all(|&c| node(c) == node(p1.dedicated_cpus[0]))
    );
    // 5 CPUs left: 1 on one node, 4 on the other; 4 more fit on one node.
    let mut w = vmi("w", 4, 1);
    w.dedicated_cpus = true;
    let p2 = s.place(&w).unwrap();
    assert!(
        p2.dedicated_cpus
            .iter()
            .all(|&c| node(c) == node(p2.dedicated_cpus[0]))
    );
    assert!(
        p2.dedicated_cpus
            .iter()
            .all(|c| !p1.dedicated_cpus.contains(c))
    );
    // One CPU left in all: two dedicated do not fit, and the shared pool
    // shrank to that one CPU too.
    let mut x = vmi("x", 2, 1);
    x.dedicated_cpus = true;
    assert_eq!(
        unschedulable(s.schedule(&x).unwrap_err()),
        "0/1 hosts are available: 1 insufficient dedicated cpus."
    );
    assert!(s.schedule(&vmi("y", 2, 1)).is_err());
    assert!(s.place(&vmi("y", 1, 1)).is_ok());

    assert_eq!(format_cpu_set(&p2.dedicated_cpus).split(',').count(), 4);
    assert_eq!(parse_cpu_set("2-4,7, 1").unwrap(), vec![1, 2, 3, 4, 7]);
    assert!(parse_cpu_set("4-2").is_err());
    assert!(parse_cpu_set("x").is_err());
}

#[test]
fn dedicated_cpus_from_existing_vmis_are_not_handed_out_again() {
    let mut s = Scheduler::new(vec![numa_host("h", 1, 4, 16)], no_overcommit());
    let mut v = vmi("v", 2, 1);
    v.dedicated_cpus = true;
    s.add_placed(
        &v,
        &Placement {
            host: "h".into(),
            dedicated_cpus: vec![0, 2],
            numa_nodes: vec![],
        },
    )
    .unwrap();
    assert_eq!(s.place(&v).unwrap().dedicated_cpus, vec![1, 3]);
    assert!(matches!(
        s.add_placed(
            &v,
            &Placement {
                host: "h".into(),
                dedicated_cpus: vec![1],
                numa_nodes: vec![]
            }
        ),
        Err(ScheduleError::CpuTaken { cpu: 1, .. })
    ));
    assert!(matches!(
        s.add_placed(
            &v,
            &Placement {
                host: "nope".into(),
                dedicated_cpus: vec![],
                numa_nodes: vec![]
            }
        ),
        Err(ScheduleError::UnknownHost(_))
    ));
}

#[test]
fn guest_numa_nodes_fit_host_numa_nodes() {
    // Two host nodes of 4 CPUs / 8 GiB.
    let mut s = Scheduler::new(vec![numa_host("h", 2, 4, 8)], no_overcommit());
    let mut v = vmi("v", 4, 12);
    v.dedicated_cpus = true;
    v.guest_numa_nodes = 2;
    let p = s.place(&v).unwrap();
    let mut nodes = p.numa_nodes.clone();
    nodes.sort();
    assert_eq!(nodes, vec![0, 1]);
    // Two vCPUs on each host node.
    assert_eq!(p.dedicated_cpus.iter().filter(|&&c| c < 4).count(), 2);
    // 6 GiB used per node: one guest node needing 3 GiB no longer fits
    // (though 3 GiB are free on the host in all).
    let mut w = vmi("w", 2, 3);
    w.guest_numa_nodes = 1;
    assert!(s.schedule(&w).unwrap_err().to_string().contains("NUMA"));
    // One guest node of 2 GiB still does.
    w.memory_bytes = 2 * GI;
    assert!(s.schedule(&w).is_ok());
}

#[test]
fn hugepages_come_from_the_pool() {
    let mut h = host("h", 8, 4);
    h.hugepages.push(HostHugepages {
        page_size: 2 << 20,
        total: 1024,
    });
    let mut s = Scheduler::new(vec![h], Overcommit::default());
    let mut v = vmi("v", 1, 1);
    v.hugepage_size = Some(2 << 20);
    s.place(&v).unwrap();
    s.place(&v).unwrap();
    assert_eq!(
        unschedulable(s.schedule(&v).unwrap_err()),
        "0/1 hosts are available: 1 insufficient hugepages."
    );
    // Regular memory was not used by hugepage-backed guests.
    assert!(s.place(&vmi("r", 1, 4)).is_ok());
    v.hugepage_size = Some(1 << 30);
    assert!(s.schedule(&v).is_err());
}

#[test]
fn kubernetes_json_shapes_decode() {
    let a: Affinity = serde_json::from_value(json!({
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "k", "operator": "DoesNotExist"}],
             "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["h"]}]}]}},
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1,
            "podAffinityTerm": {"labelSelector": {"matchLabels": {"a": "b"}}, "namespaces": ["x"],
            "topologyKey": "kubernetes.io/hostname"}}]}
    }))
    .unwrap();
    let mut v = vmi("v", 1, 1);
    v.affinity = a;
    let mut s = Scheduler::new(
        vec![host("h", 1, 2), host("g", 1, 2)],
        Overcommit::default(),
    );
    assert_eq!(s.schedule(&v).unwrap().host, "h");
}

// ---- properties ----

#[derive(Debug, Clone)]
struct Case {
    hosts: Vec<(u32, u64, u32, bool)>, // cpus, mem GiB, ratio, tainted
    vmis: Vec<(u32, u64, u8, bool, bool)>, // vcpus, mem GiB, app, anti, tolerates
    mem_percent: u32,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec((1u32..16, 1u64..32, 1u32..4, any::<bool>()), 1..12),
        prop::collection::vec(
            (1u32..8, 1u64..8, 0u8..5, any::<bool>(), any::<bool>()),
            1..80,
        ),
        100u32..200,
    )
        .prop_map(|(hosts, vmis, mem_percent)| Case {
            hosts,
            vmis,
            mem_percent,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn placements_never_break_capacity_taints_or_anti_affinity(c in case()) {
        let hosts: Vec<HostInfo> = c.hosts.iter().enumerate().map(|(i, &(cpus, mem, ratio, tainted))| {
            let mut h = host(&format!("h{i}"), cpus, mem);
            h.overcommit = Some(Overcommit { cpu_allocation_ratio: f64::from(ratio), memory_overcommit_percent: c.mem_percent });
            if tainted {
                h.taints.push(Taint { key: "t".into(), value: None, effect: TaintEffect::NoSchedule });
            }
            h
        }).collect();
        let mut s = Scheduler::new(hosts.clone(), Overcommit::default());
        let mut cpu_used = vec![0u64; hosts.len()];
        let mut mem_used = vec![0u64; hosts.len()];
        let mut apps_on: Vec<Vec<(u8, bool)>> = vec![Vec::new(); hosts.len()];
        for (i, &(vcpus, mem, app, anti_on, tolerates)) in c.vmis.iter().enumerate() {
            let mut v = vmi(&format!("v{i}"), vcpus, mem);
            let app_name = format!("app{app}");
            v.labels = labels(&[("app", &app_name)]);
            if anti_on {
                v.affinity = anti(&app_name);
            }
            if tolerates {
                v.tolerations = vec![Toleration { key: Some("t".into()), operator: Some(TolerationOperator::Exists), ..Default::default() }];
            }
            match s.place(&v) {
                Ok(p) => {
                    let h: usize = p.host[1..].parse().unwrap();
                    cpu_used[h] += u64::from(vcpus) * 1000;
                    mem_used[h] += mem * GI;
                    let (cpus, hmem, ratio, tainted) = c.hosts[h];
                    prop_assert!(cpu_used[h] <= u64::from(cpus) * 1000 * u64::from(ratio));
                    prop_assert!(mem_used[h] <= hmem * GI * u64::from(c.mem_percent) / 100);
                    prop_assert!(!tainted || tolerates, "untolerated taint on {}", p.host);
                    for &(other, other_anti) in &apps_on[h] {
                        prop_assert!(!(other == app && (anti_on || other_anti)),
                            "anti-affinity of app{} broken on {}", app, p.host);
                    }
                    apps_on[h].push((app, anti_on));
                }
                Err(ScheduleError::Unschedulable(u)) => {
                    prop_assert_eq!(u.reasons.values().sum::<usize>(), hosts.len());
                }
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }

    #[test]
    fn dedicated_cpu_sets_are_disjoint_and_on_the_host(reqs in prop::collection::vec(1u32..6, 1..20)) {
        let mut s = Scheduler::new(vec![numa_host("a", 2, 6, 64), numa_host("b", 1, 8, 64)], no_overcommit());
        let mut taken: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (i, n) in reqs.into_iter().enumerate() {
            let mut v = vmi(&format!("v{i}"), n, 1);
            v.dedicated_cpus = true;
            if let Ok(p) = s.place(&v) {
                prop_assert_eq!(p.dedicated_cpus.len(), n as usize);
                let limit = if p.host == "a" { 12 } else { 8 };
                let t = taken.entry(p.host.clone()).or_default();
                for c in p.dedicated_cpus {
                    prop_assert!(c < limit);
                    prop_assert!(!t.contains(&c), "CPU {} handed out twice", c);
                    t.push(c);
                }
            }
        }
    }
}
