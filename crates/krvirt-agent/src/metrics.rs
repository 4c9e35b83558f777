//! Per-VM metrics of this host, read at scrape time, under KubeVirt's
//! metric names and labels (virt-handler's `kubevirt_vmi_*` family) so
//! dashboards written for KubeVirt work unchanged.
//!
//! Sources, all read when Prometheus scrapes (nothing is cached):
//! - QMP `query-cpus-fast` (vCPU thread ids) through the agent's own QMP
//!   connection, then `/proc/PID/task/TID/stat` (utime + stime) per vCPU;
//! - `/proc/PID/stat` for the whole QEMU process' CPU time;
//! - `/proc/PID/status` `VmRSS` for resident memory;
//! - QMP `query-memory-size-summary` for the guest memory size;
//! - QMP `query-blockstats` per drive.
//!
//! - `/sys/class/net/TAP/statistics` for NICs on krvirt Networks (the taps
//!   recorded in the run directory's `net.json`), seen from the guest: what
//!   the tap transmits the guest receives.
//!
//! NICs on QEMU user networking report no network counters: QEMU exposes
//! no per-interface byte counters there, and inventing them would mislead.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde_json::Value;

use krvirt_hypervisor::QemuHandle;

/// Identity of a VMI in every metric: KubeVirt's `name`, `namespace`, `node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmIdentity {
    pub name: String,
    pub namespace: String,
    pub node: String,
}

/// CPU time of one vCPU thread.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuTime {
    /// QEMU's `cpu-index`.
    pub id: u32,
    /// Host thread id of the vCPU.
    pub thread_id: i64,
    /// User + system time of the thread, seconds.
    pub seconds: f64,
}

/// `query-blockstats` figures of one drive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// The KubeVirt disk name (our QEMU device id without its `disk-` prefix).
    pub drive: String,
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
}

/// Traffic of one NIC, from the guest's point of view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NicStats {
    /// The KubeVirt interface name.
    pub interface: String,
    pub receive_bytes: u64,
    pub transmit_bytes: u64,
    pub receive_packets: u64,
    pub transmit_packets: u64,
}

/// Counters of the taps of a run directory (its `net.json`), read now.
pub fn read_nic_stats(run_dir: &std::path::Path) -> Vec<NicStats> {
    let Some(rec) = std::fs::read(run_dir.join(crate::network::NET_RECORD))
        .ok()
        .and_then(|t| serde_json::from_slice::<crate::network::NetRecord>(&t).ok())
    else {
        return Vec::new();
    };
    rec.nics
        .iter()
        .filter_map(|n| {
            let dir = std::path::Path::new("/sys/class/net")
                .join(&n.tap)
                .join("statistics");
            let read = |f: &str| -> Option<u64> {
                std::fs::read_to_string(dir.join(f))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            };
            Some(NicStats {
                interface: n.iface.clone(),
                receive_bytes: read("tx_bytes")?,
                transmit_bytes: read("rx_bytes")?,
                receive_packets: read("tx_packets")?,
                transmit_packets: read("rx_packets")?,
            })
        })
        .collect()
}

/// Everything known about one running VM at one instant. A figure that
/// could not be read is `None` (or empty) and is left out of the output.
#[derive(Debug, Clone, PartialEq)]
pub struct VmStats {
    pub id: VmIdentity,
    pub pid: u32,
    pub vcpus: Vec<VcpuTime>,
    /// (user, system) seconds of the whole QEMU process.
    pub cpu: Option<(f64, f64)>,
    pub resident_bytes: Option<u64>,
    /// Guest memory size (`base-memory` + `plugged-memory`).
    pub domain_bytes: Option<u64>,
    pub blocks: Vec<BlockStats>,
    /// NICs on krvirt Networks.
    pub nics: Vec<NicStats>,
    /// Figures of the VM's cgroup (when it has one).
    pub cgroup: CgroupStats,
}

/// What the VM's cgroup says: QEMU as a whole, guest RAM and overhead.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupStats {
    /// Memory charged to the cgroup (v1 `memory.usage_in_bytes`, v2
    /// `memory.current`).
    pub memory_bytes: Option<u64>,
    /// Its memory limit, if any.
    pub memory_limit_bytes: Option<u64>,
    /// CPU time used by every process in it, in seconds.
    pub cpu_seconds: Option<f64>,
}

/// Reads the cgroup figures of a VM (absent ones stay `None`).
pub fn read_cgroup_stats(cg: Option<&krvirt_hypervisor::VmCgroup>) -> CgroupStats {
    let Some(cg) = cg else {
        return CgroupStats::default();
    };
    CgroupStats {
        memory_bytes: cg.memory_usage_bytes().ok(),
        memory_limit_bytes: cg.memory_limit().ok().flatten(),
        cpu_seconds: cg.cpu_usage_ns().ok().map(|ns| ns as f64 / 1e9),
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// (utime, stime) in clock ticks from a `/proc/.../stat` line. The command
/// name (field 2) may contain spaces and parentheses: fields are counted
/// after its closing parenthesis.
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime = fields.get(11)?.parse().ok()?;
    let stime = fields.get(12)?.parse().ok()?;
    Some((utime, stime))
}

/// `VmRSS` of a `/proc/PID/status` text, in bytes.
pub fn parse_vmrss(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut it = line["VmRSS:".len()..].split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => n.checked_mul(1024),
        Some(_) => None,
    }
}

/// (cpu-index, thread-id) of every vCPU in a `query-cpus-fast` reply.
pub fn parse_cpus_fast(v: &Value) -> Vec<(u32, i64)> {
    v.as_array()
        .map(|cpus| {
            cpus.iter()
                .filter_map(|c| {
                    let idx = u32::try_from(c.get("cpu-index")?.as_u64()?).ok()?;
                    let tid = c.get("thread-id")?.as_i64()?;
                    Some((idx, tid))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The drive name of a `query-blockstats` entry: the frontend device id
/// (`qdev` is the id or a QOM path `/machine/peripheral/ID/...`) without our
/// `disk-` prefix. Entries without a frontend (firmware, backing nodes) are
/// skipped.
fn drive_name(entry: &Value) -> Option<String> {
    let qdev = entry
        .get("qdev")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let id = match qdev.strip_prefix("/machine/peripheral/") {
        Some(rest) => rest.split('/').next().unwrap_or_default(),
        None if !qdev.starts_with('/') => qdev,
        None => "",
    };
    let id = if id.is_empty() {
        entry
            .get("device")
            .and_then(Value::as_str)
            .unwrap_or_default()
    } else {
        id
    };
    if id.is_empty() {
        return None;
    }
    Some(id.strip_prefix("disk-").unwrap_or(id).to_string())
}

/// Per-drive figures of a `query-blockstats` reply.
pub fn parse_blockstats(v: &Value) -> Vec<BlockStats> {
    let Some(entries) = v.as_array() else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| {
            let drive = drive_name(e)?;
            let s = e.get("stats")?;
            let n = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
            Some(BlockStats {
                drive,
                rd_bytes: n("rd_bytes"),
                wr_bytes: n("wr_bytes"),
                rd_operations: n("rd_operations"),
                wr_operations: n("wr_operations"),
                flush_operations: n("flush_operations"),
                rd_total_time_ns: n("rd_total_time_ns"),
                wr_total_time_ns: n("wr_total_time_ns"),
                flush_total_time_ns: n("flush_total_time_ns"),
            })
        })
        .collect()
}

fn thread_seconds(pid: u32, tid: i64, ticks: f64) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let (u, s) = parse_proc_stat(&text)?;
    Some((u + s) as f64 / ticks)
}

/// Read the figures of one VM now, through its QEMU handle (the agent's one
/// QMP connection; QMP serves a single client).
pub async fn read_vm_stats(id: VmIdentity, handle: &QemuHandle) -> VmStats {
    let pid = handle.pid();
    let qmp = handle.qmp();
    let ticks = clock_ticks();
    let (cpus, blocks, mem) = tokio::join!(
        qmp.execute("query-cpus-fast", None),
        qmp.execute("query-blockstats", None),
        qmp.execute("query-memory-size-summary", None),
    );
    let vcpus = cpus
        .map(|v| parse_cpus_fast(&v))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(cpu, tid)| {
            Some(VcpuTime {
                id: cpu,
                thread_id: tid,
                seconds: thread_seconds(pid, tid, ticks)?,
            })
        })
        .collect();
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| parse_proc_stat(&t))
        .map(|(u, s)| (u as f64 / ticks, s as f64 / ticks));
    let resident_bytes = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| parse_vmrss(&t));
    let domain_bytes = mem.ok().and_then(|v| {
        let base = v.get("base-memory")?.as_u64()?;
        let plugged = v.get("plugged-memory").and_then(Value::as_u64).unwrap_or(0);
        base.checked_add(plugged)
    });
    VmStats {
        id,
        pid,
        vcpus,
        cpu,
        resident_bytes,
        domain_bytes,
        blocks: blocks.map(|v| parse_blockstats(&v)).unwrap_or_default(),
        nics: read_nic_stats(&handle.paths().dir),
        cgroup: read_cgroup_stats(handle.cgroup()),
    }
}

/// The per-VM metrics of one scrape, as a prometheus-client collector.
#[derive(Debug, Clone, Default)]
pub struct VmMetrics {
    pub vms: Vec<VmStats>,
}

type Labels = Vec<(&'static str, String)>;

fn base(id: &VmIdentity) -> Labels {
    vec![
        ("name", id.name.clone()),
        ("namespace", id.namespace.clone()),
        ("node", id.node.clone()),
    ]
}

fn with(mut l: Labels, extra: &[(&'static str, String)]) -> Labels {
    l.extend_from_slice(extra);
    l
}

/// Encode one counter family (the `_total` suffix is added by the encoder).
fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: Vec<(Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    if samples.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: Vec<(Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    if samples.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl VmMetrics {
    fn per_vm(&self, f: impl Fn(&VmStats) -> Option<f64>) -> Vec<(Labels, f64)> {
        self.vms
            .iter()
            .filter_map(|vm| Some((base(&vm.id), f(vm)?)))
            .collect()
    }

    fn per_nic(&self, f: impl Fn(&NicStats) -> u64) -> Vec<(Labels, f64)> {
        self.vms
            .iter()
            .flat_map(|vm| {
                vm.nics
                    .iter()
                    .map(|n| {
                        (
                            with(base(&vm.id), &[("interface", n.interface.clone())]),
                            f(n) as f64,
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn per_drive(&self, f: impl Fn(&BlockStats) -> f64) -> Vec<(Labels, f64)> {
        self.vms
            .iter()
            .flat_map(|vm| {
                vm.blocks
                    .iter()
                    .map(|b| (with(base(&vm.id), &[("drive", b.drive.clone())]), f(b)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Collector for VmMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut enc;
        let vcpu: Vec<(Labels, f64)> = self
            .vms
            .iter()
            .flat_map(|vm| {
                vm.vcpus.iter().map(|c| {
                    (
                        with(
                            base(&vm.id),
                            &[("id", c.id.to_string()), ("state", "running".into())],
                        ),
                        c.seconds,
                    )
                })
            })
            .collect();
        counters(
            e,
            "kubevirt_vmi_vcpu_seconds",
            "Total amount of time spent in each state by each vcpu (cpu_time excluding hypervisor time). Where `id` is the vcpu identifier and `state` can be one of the following: [`OFFLINE`, `RUNNING`, `BLOCKED`].",
            vcpu,
        )?;
        counters(
            e,
            "kubevirt_vmi_cpu_usage_seconds",
            "Total CPU time spent in all modes (sum of both vcpu and hypervisor usage).",
            self.per_vm(|vm| vm.cpu.map(|(u, s)| u + s)),
        )?;
        counters(
            e,
            "kubevirt_vmi_cpu_user_usage_seconds",
            "Total CPU time spent in user mode.",
            self.per_vm(|vm| vm.cpu.map(|(u, _)| u)),
        )?;
        counters(
            e,
            "kubevirt_vmi_cpu_system_usage_seconds",
            "Total CPU time spent in system mode.",
            self.per_vm(|vm| vm.cpu.map(|(_, s)| s)),
        )?;
        gauges(
            e,
            "kubevirt_vmi_memory_resident_bytes",
            "Resident set size of the process running the domain.",
            self.per_vm(|vm| vm.resident_bytes.map(|b| b as f64)),
        )?;
        gauges(
            e,
            "krvirt_vmi_cgroup_memory_usage_bytes",
            "Memory charged to the VM's cgroup (QEMU: guest RAM it touched plus its own overhead).",
            self.per_vm(|vm| vm.cgroup.memory_bytes.map(|b| b as f64)),
        )?;
        gauges(
            e,
            "krvirt_vmi_cgroup_memory_limit_bytes",
            "Memory limit of the VM's cgroup (resources.limits.memory plus QEMU's overhead).",
            self.per_vm(|vm| vm.cgroup.memory_limit_bytes.map(|b| b as f64)),
        )?;
        counters(
            e,
            "krvirt_vmi_cgroup_cpu_usage_seconds",
            "CPU time used by the VM's cgroup (every QEMU thread).",
            self.per_vm(|vm| vm.cgroup.cpu_seconds),
        )?;
        gauges(
            e,
            "kubevirt_vmi_memory_domain_bytes",
            "The amount of memory in bytes allocated to the domain. The `memory` value in domain xml file.",
            self.per_vm(|vm| vm.domain_bytes.map(|b| b as f64)),
        )?;
        counters(
            e,
            "kubevirt_vmi_storage_iops_read",
            "Total number of I/O read operations.",
            self.per_drive(|b| b.rd_operations as f64),
        )?;
        counters(
            e,
            "kubevirt_vmi_storage_iops_write",
            "Total number of I/O write operations.",
            self.per_drive(|b| b.wr_operations as f64),
        )?;
        counters(
            e,
            "kubevirt_vmi_storage_read_traffic_bytes",
            "Total number of bytes read from storage.",
            self.per_drive(|b| b.rd_bytes as f64),
        )?;
        counters(
            e,
            "kubevirt_vmi_storage_write_traffic_bytes",
            "Total number of written bytes.",
            self.per_drive(|b| b.wr_bytes as f64),
        )?;
        counters(
            e,
            "kubevirt_vmi_storage_read_times_seconds",
            "Total time spent on read operations.",
            self.per_drive(|b| b.rd_total_time_ns as f64 / 1e9),
        )?;
        counters(
            e,
            "kubevirt_vmi_storage_write_times_seconds",
            "Total time spent on write operations.",
            self.per_drive(|b| b.wr_total_time_ns as f64 / 1e9),
        )?;
        counters(
            e,
            "kubevirt_vmi_storage_flush_requests",
            "Total storage flush requests.",
            self.per_drive(|b| b.flush_operations as f64),
        )?;
        counters(
            e,
            "kubevirt_vmi_storage_flush_times_seconds",
            "Total time spent on cache flushing.",
            self.per_drive(|b| b.flush_total_time_ns as f64 / 1e9),
        )?;
        counters(
            e,
            "kubevirt_vmi_network_receive_bytes",
            "Total network traffic received in bytes.",
            self.per_nic(|n| n.receive_bytes),
        )?;
        counters(
            e,
            "kubevirt_vmi_network_transmit_bytes",
            "Total network traffic transmitted in bytes.",
            self.per_nic(|n| n.transmit_bytes),
        )?;
        counters(
            e,
            "kubevirt_vmi_network_receive_packets",
            "Total network traffic received packets.",
            self.per_nic(|n| n.receive_packets),
        )?;
        counters(
            e,
            "kubevirt_vmi_network_transmit_packets",
            "Total network traffic transmitted packets.",
            self.per_nic(|n| n.transmit_packets),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;
    use serde_json::json;

    fn render(m: VmMetrics) -> String {
        let mut reg = Registry::default();
        reg.register_collector(Box::new(m));
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        out
    }

    #[test]
    fn proc_stat_with_odd_command_names() {
        let line = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 3 0 100 1000 200";
        assert_eq!(parse_proc_stat(line), Some((250, 75)));
        assert_eq!(parse_proc_stat("garbage"), None);
        assert_eq!(parse_proc_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn vmrss() {
        let t = "Name:\tqemu\nVmPeak:\t 900 kB\nVmRSS:\t  131072 kB\nThreads:\t4\n";
        assert_eq!(parse_vmrss(t), Some(131072 * 1024));
        assert_eq!(parse_vmrss("Name: x\n"), None);
        assert_eq!(parse_vmrss("VmRSS: lots kB\n"), None);
    }

    #[test]
    fn qmp_replies() {
        let cpus = json!([
            {"cpu-index": 0, "thread-id": 4242, "qom-path": "/machine/unattached/device[0]", "target": "x86_64"},
            {"cpu-index": 1, "thread-id": 4243},
            {"cpu-index": "bad"}
        ]);
        assert_eq!(parse_cpus_fast(&cpus), vec![(0, 4242), (1, 4243)]);
        assert!(parse_cpus_fast(&json!({"x": 1})).is_empty());

        let blocks = json!([
            {"device": "", "node-name": "drive0-fmt", "qdev": "/machine/peripheral/disk-containerdisk/virtio-backend",
             "stats": {"rd_bytes": 1024, "wr_bytes": 512, "rd_operations": 3, "wr_operations": 1,
                       "flush_operations": 2, "rd_total_time_ns": 1500000000u64, "wr_total_time_ns": 0, "flush_total_time_ns": 10}},
            {"device": "", "qdev": "disk-cloudinitdisk", "stats": {"rd_bytes": 7}},
            {"device": "", "node-name": "fw-code", "stats": {"rd_bytes": 99}}
        ]);
        let b = parse_blockstats(&blocks);
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!(b[0].drive, "containerdisk");
        assert_eq!(b[0].rd_bytes, 1024);
        assert_eq!(b[0].rd_total_time_ns, 1_500_000_000);
        assert_eq!(b[1].drive, "cloudinitdisk");
        assert_eq!(b[1].rd_bytes, 7);
        assert_eq!(b[1].wr_bytes, 0);
    }

    fn sample() -> VmMetrics {
        VmMetrics {
            vms: vec![VmStats {
                id: VmIdentity {
                    name: "vm1".into(),
                    namespace: "default".into(),
                    node: "host-a".into(),
                },
                pid: 1,
                vcpus: vec![
                    VcpuTime {
                        id: 0,
                        thread_id: 10,
                        seconds: 1.5,
                    },
                    VcpuTime {
                        id: 1,
                        thread_id: 11,
                        seconds: 0.25,
                    },
                ],
                cpu: Some((2.0, 0.5)),
                resident_bytes: Some(1_048_576),
                domain_bytes: None,
                blocks: vec![BlockStats {
                    drive: "containerdisk".into(),
                    rd_bytes: 4096,
                    rd_operations: 2,
                    ..Default::default()
                }],
                nics: vec![],
                cgroup: CgroupStats {
                    memory_bytes: Some(300 << 20),
                    memory_limit_bytes: Some(1 << 30),
                    cpu_seconds: Some(3.5),
                },
            }],
        }
    }

    #[test]
    fn exposition_format() {
        let out = render(sample());
        let expect = [
            "# HELP kubevirt_vmi_vcpu_seconds Total amount of time",
            "# TYPE kubevirt_vmi_vcpu_seconds counter",
            "kubevirt_vmi_vcpu_seconds_total{name=\"vm1\",namespace=\"default\",node=\"host-a\",id=\"0\",state=\"running\"} 1.5",
            "kubevirt_vmi_vcpu_seconds_total{name=\"vm1\",namespace=\"default\",node=\"host-a\",id=\"1\",state=\"running\"} 0.25",
            "kubevirt_vmi_cpu_usage_seconds_total{name=\"vm1\",namespace=\"default\",node=\"host-a\"} 2.5",
            "# TYPE kubevirt_vmi_memory_resident_bytes gauge",
            "kubevirt_vmi_memory_resident_bytes{name=\"vm1\",namespace=\"default\",node=\"host-a\"} 1048576",
            "krvirt_vmi_cgroup_memory_usage_bytes{name=\"vm1\",namespace=\"default\",node=\"host-a\"} 314572800",
            "krvirt_vmi_cgroup_memory_limit_bytes{name=\"vm1\",namespace=\"default\",node=\"host-a\"} 1073741824",
            "krvirt_vmi_cgroup_cpu_usage_seconds_total{name=\"vm1\",namespace=\"default\",node=\"host-a\"} 3.5",
            "kubevirt_vmi_storage_read_traffic_bytes_total{name=\"vm1\",namespace=\"default\",node=\"host-a\",drive=\"containerdisk\"} 4096",
            "kubevirt_vmi_storage_iops_read_total{name=\"vm1\",namespace=\"default\",node=\"host-a\",drive=\"containerdisk\"} 2",
            "kubevirt_vmi_storage_write_traffic_bytes_total{name=\"vm1\",namespace=\"default\",node=\"host-a\",drive=\"containerdisk\"} 0",
        ];
        for line in expect {
            assert!(out.contains(line), "missing {line:?} in:\n{out}");
        }
        // A figure that could not be read is left out, not reported as 0.
        assert!(!out.contains("kubevirt_vmi_memory_domain_bytes"), "{out}");
        // No network metrics are invented (no NIC on a krvirt Network).
        assert!(!out.contains("network"), "{out}");
        assert!(out.ends_with("# EOF\n"));
    }

    #[test]
    fn tap_counters_from_the_guests_side() {
        let mut m = sample();
        m.vms[0].nics = vec![NicStats {
            interface: "blue".into(),
            receive_bytes: 700,
            transmit_bytes: 300,
            receive_packets: 7,
            transmit_packets: 3,
        }];
        let out = render(m);
        for line in [
            "kubevirt_vmi_network_receive_bytes_total{name=\"vm1\",namespace=\"default\",node=\"host-a\",interface=\"blue\"} 700",
            "kubevirt_vmi_network_transmit_bytes_total{name=\"vm1\",namespace=\"default\",node=\"host-a\",interface=\"blue\"} 300",
            "kubevirt_vmi_network_receive_packets_total{name=\"vm1\",namespace=\"default\",node=\"host-a\",interface=\"blue\"} 7",
        ] {
            assert!(out.contains(line), "missing {line:?} in:\n{out}");
        }
        // A run directory without NICs on Networks has no counters.
        assert!(read_nic_stats(std::path::Path::new("/nonexistent")).is_empty());
    }

    #[test]
    fn label_values_are_escaped() {
        let mut m = sample();
        m.vms[0].id.name = "a\"b\\c\nd".into();
        let out = render(m);
        assert!(
            out.contains(r#"kubevirt_vmi_memory_resident_bytes{name="a\"b\\c\nd","#),
            "{out}"
        );
    }

    #[test]
    fn no_vms_no_families() {
        assert_eq!(render(VmMetrics::default()), "# EOF\n");
    }

    /// The parsers against this very process: /proc is real.
    #[test]
    fn own_process_figures() {
        let pid = std::process::id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        assert!(parse_proc_stat(&stat).is_some());
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(parse_vmrss(&status).unwrap() > 0);
        assert!(thread_seconds(pid, i64::from(pid), clock_ticks()).is_some());
    }
}
