//! `/metrics` end to end: a real `krvirt up` with a real guest under TCG,
//! scraped directly and by Debian's real `prometheus`.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const VM: &str = r#"apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: NAME
spec:
  runStrategy: Always
  template:
    metadata:
      annotations:
        vm.kubevirt.io/os: demo-linux
    spec:
      domain:
        devices:
          disks:
          - name: containerdisk
            disk: {bus: virtio}
          - name: cloudinitdisk
            disk: {bus: virtio}
        memory:
          guest: 128Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - name: containerdisk
        containerDisk:
          image: quay.io/kubevirt/cirros-container-disk-demo
      - name: cloudinitdisk
        cloudInitNoCloud:
          userData: |
            #!/bin/sh
            echo metrics-test
"#;

async fn boot(inst: &Instance, name: &str) {
    let path = inst.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&path, VM.replace("NAME", name)).unwrap();
    inst.ok(&["apply", "-f", path.to_str().unwrap()]);
    inst.running_vmi(name, None).await;
    inst.console_shows(name, "GUEST-BOOTED").await;
}

async fn scrape(inst: &Instance) -> (String, String) {
    let (code, ct, text) = inst.get_raw("/metrics").await;
    assert_eq!(code, 200, "/metrics: {text}");
    (ct, text)
}

/// The value of the one sample of `name` carrying every label of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(hits.len() <= 1, "{name} {labels:?} matches {hits:?}");
    hits.first().copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_a_running_guest() {
    let inst = Instance::start().await;
    boot(&inst, "met1").await;
    let vm = [
        ("name", "met1"),
        ("namespace", "default"),
        ("node", "e2e-host"),
    ];
    let vcpu0 = [vm.as_slice(), &[("id", "0"), ("state", "running")]].concat();
    let disk = [vm.as_slice(), &[("drive", "containerdisk")]].concat();

    let (ct, first) = scrape(&inst).await;
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(first.ends_with("# EOF\n"));
    let v1 = sample(&first, "kubevirt_vmi_vcpu_seconds_total", &vcpu0)
        .unwrap_or_else(|| panic!("no vcpu seconds for met1:\n{first}"));
    let rd = sample(
        &first,
        "kubevirt_vmi_storage_read_traffic_bytes_total",
        &disk,
    )
    .unwrap_or_else(|| panic!("no read bytes for met1's containerdisk:\n{first}"));
    assert!(rd > 0.0, "the guest booted from its disk: read bytes {rd}");
    assert!(
        sample(&first, "kubevirt_vmi_storage_iops_read_total", &disk).unwrap() > 0.0,
        "{first}"
    );
    let rss = sample(&first, "kubevirt_vmi_memory_resident_bytes", &vm).unwrap();
    assert!(rss > 1e6, "QEMU's RSS {rss}");
    assert_eq!(
        sample(&first, "kubevirt_vmi_memory_domain_bytes", &vm),
        Some(128.0 * 1024.0 * 1024.0)
    );
    assert_eq!(
        sample(
            &first,
            "kubevirt_vmi_phase_count",
            &[
                ("node", "e2e-host"),
                ("phase", "running"),
                ("os", "demo-linux")
            ]
        ),
        Some(1.0),
        "{first}"
    );
    assert_eq!(
        sample(
            &first,
            "kubevirt_vm_info",
            &[
                ("name", "met1"),
                ("status", "Running"),
                ("status_group", "running")
            ]
        ),
        Some(1.0),
        "{first}"
    );
    // control plane
    for needle in [
        r#"krvirt_apiserver_request_duration_seconds_count{verb="CREATE",resource="virtualmachines",subresource="",code="201"}"#,
        r#"krvirt_store_request_duration_seconds_count{operation="create",result="ok"}"#,
        r#"kubevirt_workqueue_work_duration_seconds_count{name="vm"}"#,
        r#"kubevirt_workqueue_depth{name="placement"}"#,
    ] {
        assert!(first.contains(needle), "missing {needle}:\n{first}");
    }

    // read at scrape time, not cached: the guest's TICK loop keeps its vCPU busy
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, next) = scrape(&inst).await;
        let v2 = sample(&next, "kubevirt_vmi_vcpu_seconds_total", &vcpu0).unwrap();
        assert!(v2 >= v1, "vcpu seconds went back: {v1} -> {v2}");
        if v2 > v1 {
            break;
        }
        assert!(Instant::now() < deadline, "vcpu seconds stuck at {v1}");
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `prometheus` child, killed on drop.
struct Prometheus {
    child: Child,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- prometheus log ---\n{}",
                tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 30)
            );
        }
    }
}

fn prometheus_bin() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .expect(
            "Debian's `prometheus` is needed for this test: apt-get install -y prometheus \
             (it is in scripts/packages.txt)",
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_vm_metrics() {
    let bin = prometheus_bin();
    let inst = Instance::start().await;
    let target = format!("127.0.0.1:{}", inst.port());
    // Prometheus scrapes over TLS with a token bound to `view` cluster-wide.
    let token = inst.token(&["--user", "prometheus", "--cluster-role", "view"]);
    let ca = inst.ca_file();
    let pdir = inst.dir.path().join("prometheus");
    std::fs::create_dir_all(pdir.join("data")).unwrap();
    let config = pdir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n- job_name: krvirt\n  scheme: https\n  tls_config:\n    ca_file: {}\n  \
             authorization:\n    credentials: {token}\n  static_configs:\n  - targets: ['{target}']\n",
            ca.display()
        ),
    )
    .unwrap();
    let port = free_port();
    let log = pdir.join("prometheus.log");
    let logf = std::fs::File::create(&log).unwrap();
    let child = Command::new(&bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            pdir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let _prom = Prometheus { child, log };

    boot(&inst, "prom1").await;

    let http = reqwest::Client::new();
    let query = r#"kubevirt_vmi_vcpu_seconds_total{name="prom1",namespace="default"}"#;
    let deadline = Instant::now() + Duration::from_secs(40);
    let result = loop {
        let r = http
            .get(format!(
                "http://127.0.0.1:{port}/api/v1/query?query={}",
                urlencode(query)
            ))
            .send()
            .await;
        if let Ok(r) = r
            && let Ok(v) = r.json::<Value>().await
            && v["status"] == "success"
            && let Some(res) = v["data"]["result"].as_array()
            && !res.is_empty()
        {
            break res.clone();
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had {query}; its targets: {:?}",
            http.get(format!("http://127.0.0.1:{port}/api/v1/targets"))
                .send()
                .await
                .ok()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let m = &result[0]["metric"];
    assert_eq!(m["__name__"], "kubevirt_vmi_vcpu_seconds_total");
    assert_eq!(m["node"], "e2e-host");
    assert_eq!(m["id"], "0");
    assert_eq!(m["state"], "running");
    assert_eq!(m["job"], "krvirt");
    let value: f64 = result[0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("a numeric sample");
    assert!(value > 0.0, "{result:?}");

    // Prometheus typed it as a counter (OpenMetrics parsed, not untyped text).
    let meta: Value = http
        .get(format!(
            "http://127.0.0.1:{port}/api/v1/metadata?metric=kubevirt_vmi_vcpu_seconds"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        meta["data"]["kubevirt_vmi_vcpu_seconds"][0]["type"], "counter",
        "{meta}"
    );
}
