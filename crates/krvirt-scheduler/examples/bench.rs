//! Placement throughput: 10,000 VMIs onto 1,000 hosts, plain and with
//! required anti-affinity (1,000 apps of 10 replicas, each replica kept
//! off its siblings' hosts), interleaved repetitions, medians.
//! Run by `bench/scheduler` (release build). Last line:
//! `{"plain_per_s": …, "anti_affinity_per_s": …}`.

use std::collections::BTreeMap;
use std::time::Instant;

use krvirt_scheduler::*;

const GI: u64 = 1 << 30;

fn hosts(n: usize) -> Vec<HostInfo> {
    (0..n)
        .map(|i| {
            let mut labels = BTreeMap::new();
            labels.insert("zone".to_string(), format!("z{}", i % 4));
            HostInfo {
                name: format!("host-{i:04}"),
                labels,
                ready: true,
                cpu_millis: 64_000,
                memory_bytes: 256 * GI,
                ..Default::default()
            }
        })
        .collect()
}

fn vmis(n: usize, apps: usize, anti: bool) -> Vec<VmiRequest> {
    (0..n)
        .map(|i| {
            let app = format!("app-{}", i % apps);
            let mut v = VmiRequest::new("default", &format!("vm-{i}"), 2, 4 * GI);
            v.labels.insert("app".into(), app.clone());
            if anti {
                let mut sel = LabelSelector::default();
                sel.match_labels.insert("app".into(), app);
                v.affinity.pod_anti_affinity = Some(PodAffinity {
                    required_during_scheduling_ignored_during_execution: vec![PodAffinityTerm {
                        label_selector: Some(sel),
                        namespaces: vec![],
                        topology_key: HOSTNAME_LABEL.into(),
                    }],
                    ..Default::default()
                });
            }
            v
        })
        .collect()
}

/// Placements per second for one run (the scheduler is built inside the
/// timed region: a controller starts from a snapshot too).
fn run(hosts: &[HostInfo], vmis: &[VmiRequest]) -> f64 {
    let start = Instant::now();
    let mut s = Scheduler::new(hosts.to_vec(), Overcommit::default());
    for v in vmis {
        if let Err(e) = s.place(v) {
            eprintln!("placement of {} failed: {e}", v.name);
            std::process::exit(1);
        }
    }
    vmis.len() as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut reps = 5usize;
    let mut n_hosts = 1000usize;
    let mut n_vmis = 10_000usize;
    while let Some(a) = args.next() {
        let val = args.next().and_then(|v| v.parse().ok());
        match (a.as_str(), val) {
            ("--reps", Some(v)) => reps = v,
            ("--hosts", Some(v)) => n_hosts = v,
            ("--vmis", Some(v)) => n_vmis = v,
            _ => {
                eprintln!("usage: bench [--reps N] [--hosts N] [--vmis N]");
                std::process::exit(2);
            }
        }
    }
    let hosts = hosts(n_hosts);
    let plain = vmis(n_vmis, n_hosts, false);
    let anti = vmis(n_vmis, n_hosts, true);
    let (mut p, mut a) = (Vec::new(), Vec::new());
    for r in 0..reps.max(1) {
        p.push(run(&hosts, &plain));
        a.push(run(&hosts, &anti));
        println!("rep {r}: plain {:.0}/s, anti-affinity {:.0}/s", p[r], a[r]);
    }
    println!(
        "{{\"plain_per_s\": {:.0}, \"anti_affinity_per_s\": {:.0}}}",
        median(p),
        median(a)
    );
}
