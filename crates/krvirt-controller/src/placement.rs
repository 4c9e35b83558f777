//! Placement: binds each pending VMI to a host that can run it, through
//! the scheduler crate (`krvirt-scheduler`: filter then score, no I/O).
//!
//! This module turns the listed Hosts and VMIs into the scheduler's
//! snapshot: a host is Ready when its agent's heartbeat is recent; its
//! taints come from `spec.taints`, its over-commit from the annotations
//! `krvirt.io/cpu-allocation-ratio` and `krvirt.io/memory-overcommit-percent`
//! (else KubeVirt's defaults: 10 and 100); a VMI's affinity, tolerations
//! and hugepages from `spec.affinity`, `spec.tolerations` and
//! `spec.domain.memory.hugepages`, its labels (matched by other VMIs'
//! affinity terms) from `metadata.labels`.
//! A VMI with `dedicatedCpuPlacement` gets its exclusive host CPUs recorded
//! in the annotation [`DEDICATED_CPUS_ANNOTATION`] (`"2,3"`), which the
//! agent applies. A VMI no host can take stays Pending with a
//! `PodScheduled=False` condition whose message counts the reasons per host,
//! as kube-scheduler does ("0/3 hosts are available: 2 insufficient memory,
//! 1 not ready.").

use std::time::Duration;

use krvirt_api::KindInfo;
use krvirt_api::event::{NORMAL, ObjectReference, WARNING, reason as event_reason};
use krvirt_api::host::Host;
use krvirt_api::kubevirt::{PhaseTransitionTimestamp, VirtualMachineInstance, VmiPhase};
use krvirt_api::meta::{
    Condition, ConditionStatus, find_condition, now_rfc3339, parse_rfc3339, set_condition,
};
use krvirt_api::snapshot::{RESUME_FROM_ANNOTATION, RESUME_HOST_ANNOTATION};
use krvirt_scheduler::{
    HostCpu, HostHugepages, HostInfo, HostNuma, Overcommit, Placement, ScheduleError, Scheduler,
    VmiRequest,
};
use krvirt_server::events::EventRecorder;
use krvirt_server::{Registry, Selector, Subresource};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::queue::Key;
use crate::runner::{ControllerError, decode};

/// A host whose heartbeat is older than this is not Ready.
pub const HEARTBEAT_GRACE: Duration = Duration::from_secs(40);

/// Condition type KubeVirt mirrors from the launcher pod.
pub const POD_SCHEDULED: &str = "PodScheduled";

/// Exclusive host CPU ids given to a `dedicatedCpuPlacement` VMI,
/// ascending and comma-separated (`"2,3"`); vCPU i goes on the i-th id.
pub const DEDICATED_CPUS_ANNOTATION: &str = "krvirt.io/dedicated-cpus";
/// Per-host `cpuAllocationRatio` (a positive number).
pub const CPU_RATIO_ANNOTATION: &str = "krvirt.io/cpu-allocation-ratio";
/// Per-host memory over-commit in percent (100 = none).
pub const MEMORY_OVERCOMMIT_ANNOTATION: &str = "krvirt.io/memory-overcommit-percent";

fn host_ready(host: &Host, now: chrono::DateTime<chrono::Utc>) -> bool {
    let Some(st) = host.status.as_ref() else {
        return false;
    };
    let ready =
        find_condition(&st.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True);
    let fresh = st
        .heartbeat_time
        .as_deref()
        .and_then(parse_rfc3339)
        .is_some_and(|t| {
            now - t <= chrono::Duration::from_std(HEARTBEAT_GRACE).unwrap_or_default()
        });
    ready && fresh
}

/// An API value converted to the scheduler's model of the same
/// Kubernetes JSON (both follow `core/v1`'s field names).
fn to_model<A: serde::Serialize, M: serde::de::DeserializeOwned + Default>(v: &A) -> M {
    serde_json::to_value(v)
        .and_then(serde_json::from_value)
        .unwrap_or_default()
}

/// The scheduler's view of a Host.
pub fn host_info(host: &Host, now: chrono::DateTime<chrono::Utc>) -> HostInfo {
    let st = host.status.as_ref();
    let res = st.and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()));
    let ann = &host.metadata.annotations;
    let ratio = ann
        .get(CPU_RATIO_ANNOTATION)
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|r| r.is_finite() && *r > 0.0);
    let percent = ann
        .get(MEMORY_OVERCOMMIT_ANNOTATION)
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|p| *p > 0);
    let overcommit = (ratio.is_some() || percent.is_some()).then(|| {
        let d = Overcommit::default();
        Overcommit {
            cpu_allocation_ratio: ratio.unwrap_or(d.cpu_allocation_ratio),
            memory_overcommit_percent: percent.unwrap_or(d.memory_overcommit_percent),
        }
    });
    HostInfo {
        name: host.metadata.name().to_string(),
        labels: host.metadata.labels.clone(),
        ready: host_ready(host, now),
        unschedulable: host.spec.unschedulable == Some(true),
        taints: host
            .spec
            .taints
            .iter()
            .map(|t| krvirt_scheduler::Taint {
                key: t.key.clone(),
                value: t.value.clone(),
                effect: taint_effect(t.effect),
            })
            .collect(),
        cpu_millis: res
            .and_then(|r| r.cpu.as_ref())
            .and_then(|q| q.millis().ok())
            .unwrap_or(0),
        memory_bytes: res
            .and_then(|r| r.memory.as_ref())
            .and_then(|q| q.value().ok())
            .unwrap_or(0),
        cpus: st
            .map(|s| {
                s.cpus
                    .iter()
                    .map(|c| HostCpu {
                        id: c.id,
                        numa_node: c.numa_node,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        numa_nodes: st
            .map(|s| {
                s.numa_nodes
                    .iter()
                    .map(|n| HostNuma {
                        id: n.id,
                        memory_bytes: n.memory_bytes,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        hugepages: st
            .map(|s| {
                s.hugepages
                    .iter()
                    .filter_map(|p| {
                        Some(HostHugepages {
                            page_size: p.page_size.value().ok()?,
                            total: p.total,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default(),
        overcommit,
    }
}

fn taint_effect(e: krvirt_api::kubevirt::TaintEffect) -> krvirt_scheduler::TaintEffect {
    use krvirt_api::kubevirt::TaintEffect as A;
    match e {
        A::NoSchedule => krvirt_scheduler::TaintEffect::NoSchedule,
        A::PreferNoSchedule => krvirt_scheduler::TaintEffect::PreferNoSchedule,
        A::NoExecute => krvirt_scheduler::TaintEffect::NoExecute,
    }
}

/// The scheduler's view of a VMI. Its labels (for other VMIs' affinity
/// terms) are the VMI's `metadata.labels`, as KubeVirt's launcher pod
/// inherits them. Guest NUMA passthrough needs no NUMA fitting of its own:
/// the guest mirrors the host NUMA nodes of its dedicated CPUs.
pub fn vmi_request(vmi: &VirtualMachineInstance) -> VmiRequest {
    let vcpus = vmi.spec.vcpus();
    let cpu = vmi.spec.domain.cpu.as_ref();
    VmiRequest {
        namespace: vmi.metadata.namespace.clone().unwrap_or_default(),
        name: vmi.metadata.name().to_string(),
        labels: vmi.metadata.labels.clone(),
        vcpus,
        cpu_millis: vmi
            .spec
            .domain
            .resources
            .requests
            .get("cpu")
            .and_then(|q| q.millis().ok())
            .unwrap_or(u64::from(vcpus) * 1000),
        memory_bytes: vmi.spec.guest_memory_bytes().ok().flatten().unwrap_or(0),
        node_selector: vmi.spec.node_selector.clone(),
        affinity: vmi.spec.affinity.as_ref().map(to_model).unwrap_or_default(),
        tolerations: vmi.spec.tolerations.iter().map(to_model).collect(),
        dedicated_cpus: cpu.is_some_and(|c| c.dedicated_cpu_placement),
        guest_numa_nodes: 0,
        hugepage_size: vmi
            .spec
            .domain
            .memory
            .as_ref()
            .and_then(|m| m.hugepages.as_ref())
            .and_then(|h| h.page_size_bytes()),
    }
}

/// Pick a host (and CPUs) for the VMI `raw_vmi` among `raw_hosts`, given
/// every VMI listed (`raw_placed`; those bound to a host and not ended
/// count). `Err` carries the human-readable reason summary.
pub fn schedule(
    raw_vmi: &Value,
    raw_hosts: &[Value],
    raw_placed: &[Value],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Placement, String> {
    let vmi: VirtualMachineInstance =
        serde_json::from_value(raw_vmi.clone()).map_err(|e| format!("undecodable VMI: {e}"))?;
    let hosts: Vec<HostInfo> = raw_hosts
        .iter()
        .filter_map(|raw| {
            let h: Host = serde_json::from_value(raw.clone()).ok()?;
            Some(host_info(&h, now))
        })
        .collect();
    let mut sched = Scheduler::new(hosts, Overcommit::default());
    for raw in raw_placed {
        let Ok(p) = serde_json::from_value::<VirtualMachineInstance>(raw.clone()) else {
            continue;
        };
        let Some(st) = p.status.as_ref() else {
            continue;
        };
        let Some(node) = st.node_name.clone() else {
            continue;
        };
        if st.phase.is_some_and(VmiPhase::is_final) {
            continue;
        }
        let req = vmi_request(&p);
        let cpus = p
            .metadata
            .annotations
            .get(DEDICATED_CPUS_ANNOTATION)
            .and_then(|s| krvirt_scheduler::parse_cpu_set(s).ok())
            .unwrap_or_default();
        let placement = Placement {
            host: node,
            dedicated_cpus: cpus,
            numa_nodes: vec![],
        };
        match sched.add_placed(&req, &placement) {
            Ok(()) => {}
            // A host that is gone: nothing to account.
            Err(ScheduleError::UnknownHost(_)) => {}
            Err(e) => {
                warn!(vmi = %req.name, error = %e, "placed VMI's CPUs overlap; counting it without them");
                let _ = sched.add_placed(
                    &req,
                    &Placement {
                        dedicated_cpus: vec![],
                        ..placement
                    },
                );
            }
        }
    }
    sched
        .schedule(&vmi_request(&vmi))
        .map_err(|e| e.to_string())
}

/// Pick a host for `vmi` among `hosts`, given the VMIs already placed.
/// `Err` carries the human-readable reason summary.
pub fn choose_host(
    vmi: &VirtualMachineInstance,
    hosts: &[Host],
    placed: &[VirtualMachineInstance],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<String, String> {
    fn to_raw<T: serde::Serialize>(v: &T) -> Value {
        serde_json::to_value(v).unwrap_or(Value::Null)
    }
    let raw_hosts: Vec<Value> = hosts.iter().map(to_raw).collect();
    let raw_placed: Vec<Value> = placed.iter().map(to_raw).collect();
    schedule(&to_raw(vmi), &raw_hosts, &raw_placed, now).map(|p| p.host)
}

/// Where a VMI marked to resume a memory snapshot
/// ([`RESUME_HOST_ANNOTATION`]) may run.
#[derive(Debug, Clone, PartialEq)]
pub enum ResumePlacement {
    /// No mark: anywhere the scheduler finds.
    Anywhere,
    /// Only on this host, which holds the saved state.
    Only(String),
    /// The host holding the state is gone (not registered, or not Ready):
    /// drop the mark and boot fresh; the message says why.
    HostGone(String),
}

/// The resume constraint of `vmi` among `hosts` at `now`.
pub fn resume_placement(
    vmi: &VirtualMachineInstance,
    hosts: &[Host],
    now: chrono::DateTime<chrono::Utc>,
) -> ResumePlacement {
    let ann = &vmi.metadata.annotations;
    if !ann.contains_key(RESUME_FROM_ANNOTATION) {
        return ResumePlacement::Anywhere;
    }
    let Some(want) = ann.get(RESUME_HOST_ANNOTATION) else {
        // A mark from before hosts were recorded: wherever it lands.
        return ResumePlacement::Anywhere;
    };
    match hosts.iter().find(|h| h.metadata.name() == want.as_str()) {
        Some(h) if host_ready(h, now) => ResumePlacement::Only(want.clone()),
        Some(_) => ResumePlacement::HostGone(format!(
            "host {want}, which holds the saved memory state of the restored snapshot, is not ready: the guest boots from its restored disks instead of resuming"
        )),
        None => ResumePlacement::HostGone(format!(
            "host {want}, which holds the saved memory state of the restored snapshot, is no longer registered: the guest boots from its restored disks instead of resuming"
        )),
    }
}

/// Event reason: a VMI boots fresh instead of resuming a memory snapshot.
pub const REASON_RESUME_HOST_GONE: &str = "ResumeHostUnavailable";

/// `raw` with a `kubernetes.io/hostname` node selector for the host of
/// the VMI's host-local Volumes, if any
/// ([`crate::volmigration::volume_host`]); `Err` says why it cannot run
/// anywhere.
async fn pin_to_volume_host(
    registry: &Registry,
    vmi: &VirtualMachineInstance,
    raw: &Value,
) -> Result<Result<Value, String>, ControllerError> {
    if !vmi.spec.volumes.iter().any(|v| v.claim().is_some()) {
        return Ok(Ok(raw.clone()));
    }
    let (Some(vk), Some(pk)) = (
        krvirt_api::find_kind("volumes"),
        krvirt_api::find_kind("storagepools"),
    ) else {
        return Ok(Ok(raw.clone()));
    };
    let (volumes, _) = registry
        .list(vk, Some(vmi.metadata.namespace()), &Selector::everything())
        .await?;
    let (pools, _) = registry.list(pk, None, &Selector::everything()).await?;
    let volumes: Vec<krvirt_api::storage::StorageVolume> = volumes
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    let pools: Vec<krvirt_api::storage::StoragePool> = pools
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    Ok(
        match crate::volmigration::volume_host(vmi, &volumes, &pools) {
            Ok(None) => Ok(raw.clone()),
            Ok(Some(host)) => {
                let mut pinned = raw.clone();
                if let Some(spec) = pinned.get_mut("spec").and_then(Value::as_object_mut) {
                    let sel = spec.entry("nodeSelector").or_insert_with(|| json!({}));
                    if let Some(sel) = sel.as_object_mut() {
                        // A selector naming another host leaves nothing
                        // that fits: the scheduler says so.
                        sel.entry("kubernetes.io/hostname")
                            .or_insert_with(|| json!(host));
                        if sel["kubernetes.io/hostname"] != json!(host) {
                            return Ok(Err(format!(
                                "its host-local Volumes are on host {host:?}, its nodeSelector asks for {}",
                                sel["kubernetes.io/hostname"]
                            )));
                        }
                    }
                }
                Ok(pinned)
            }
            Err(why) => Err(format!("0 hosts are available: {why}")),
        },
    )
}

/// Place one VMI. Returns when to try again, if it could not be placed.
pub async fn reconcile(
    registry: &Registry,
    vmi_kind: &'static KindInfo,
    host_kind: &'static KindInfo,
    key: &Key,
    events: &EventRecorder,
) -> Result<Option<Duration>, ControllerError> {
    let raw = match registry.get(vmi_kind, &key.namespace, &key.name).await {
        Ok(v) => v,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let involved = ObjectReference::to_object(&raw);
    let rv = raw
        .pointer("/metadata/resourceVersion")
        .cloned()
        .unwrap_or(Value::Null);
    let vmi: VirtualMachineInstance = decode("VMI", raw.clone())?;
    let st = vmi.status.clone().unwrap_or_default();
    if vmi.metadata.deletion_timestamp.is_some()
        || st.node_name.is_some()
        || st.phase.is_some_and(VmiPhase::is_final)
    {
        return Ok(None);
    }
    let (host_items, _) = registry
        .list(host_kind, None, &Selector::everything())
        .await?;
    let (vmi_items, _) = registry
        .list(vmi_kind, None, &Selector::everything())
        .await?;

    // A restored memory snapshot resumes only on the host holding it.
    let now = chrono::Utc::now();
    let hosts: Vec<Host> = host_items
        .iter()
        .filter_map(|h| serde_json::from_value(h.clone()).ok())
        .collect();
    let (candidates, only) = match resume_placement(&vmi, &hosts, now) {
        ResumePlacement::Anywhere => (host_items, None),
        ResumePlacement::Only(h) => (
            host_items
                .into_iter()
                .filter(|x| x.pointer("/metadata/name").and_then(Value::as_str) == Some(&h))
                .collect(),
            Some(h),
        ),
        ResumePlacement::HostGone(msg) => {
            warn!(%key, %msg, "not resuming");
            registry
                .merge_patch(
                    vmi_kind,
                    &key.namespace,
                    &key.name,
                    &json!({"metadata": {"resourceVersion": rv, "annotations": {
                        RESUME_FROM_ANNOTATION: null, RESUME_HOST_ANNOTATION: null}}}),
                    Subresource::Main,
                )
                .await?;
            events.record_ref(involved, WARNING, REASON_RESUME_HOST_GONE, &msg);
            return Ok(Some(Duration::ZERO));
        }
    };
    // A VMI runs where its host-local Volumes are (they move only with a
    // live migration): that host, as a node selector, for this decision.
    let pinned = pin_to_volume_host(registry, &vmi, &raw).await?;

    let mut status = st.clone();
    let scheduled = match pinned {
        Ok(raw) => schedule(&raw, &candidates, &vmi_items, now),
        Err(why) => Err(why),
    }
    .map_err(|msg| match &only {
        Some(h) => format!(
            "the guest resumes a memory snapshot saved on host {h}, which cannot take it: {msg}"
        ),
        None => msg,
    });
    let retry = match scheduled {
        Ok(Placement {
            host,
            dedicated_cpus,
            ..
        }) => {
            // The finalizer first: once the agent sees nodeName it owns the
            // guest's cleanup, and a delete must wait for it.
            let fin = crate::VMI_FINALIZER;
            // Dedicated CPUs go with it, in the same write, so the agent
            // never sees nodeName without them.
            let mut rv = rv;
            let cpus = (!dedicated_cpus.is_empty())
                .then(|| krvirt_scheduler::format_cpu_set(&dedicated_cpus));
            let has_fin = vmi.metadata.finalizers.iter().any(|f| f == fin);
            if !has_fin || cpus.is_some() {
                let mut finalizers = vmi.metadata.finalizers.clone();
                if !has_fin {
                    finalizers.push(fin.to_string());
                }
                let mut meta = json!({"finalizers": finalizers, "resourceVersion": rv});
                if let Some(cpus) = &cpus {
                    meta["annotations"] = json!({ DEDICATED_CPUS_ANNOTATION: cpus });
                }
                let updated = registry
                    .merge_patch(
                        vmi_kind,
                        &key.namespace,
                        &key.name,
                        &json!({ "metadata": meta }),
                        Subresource::Main,
                    )
                    .await?;
                rv = updated
                    .pointer("/metadata/resourceVersion")
                    .cloned()
                    .unwrap_or(Value::Null);
            }
            let now = now_rfc3339();
            for phase in [VmiPhase::Scheduling, VmiPhase::Scheduled] {
                if !status
                    .phase_transition_timestamps
                    .iter()
                    .any(|t| t.phase == phase)
                {
                    status
                        .phase_transition_timestamps
                        .push(PhaseTransitionTimestamp {
                            phase,
                            phase_transition_timestamp: now.clone(),
                        });
                }
            }
            status.phase = Some(VmiPhase::Scheduled);
            status.node_name = Some(host.clone());
            set_condition(
                &mut status.conditions,
                Condition::new(POD_SCHEDULED, ConditionStatus::True),
            );
            info!(%key, %host, "placed VMI");
            registry
                .replace_status(
                    vmi_kind,
                    &key.namespace,
                    &key.name,
                    json!({"metadata": {"name": key.name, "namespace": key.namespace,
                                         "resourceVersion": rv},
                           "status": status}),
                )
                .await?;
            events.record_ref(
                involved,
                NORMAL,
                event_reason::SCHEDULED,
                &format!(
                    "Successfully assigned {}/{} to {host}",
                    key.namespace, key.name
                ),
            );
            return Ok(None);
        }
        Err(msg) => {
            events.record_ref(involved, WARNING, event_reason::FAILED_SCHEDULING, &msg);
            if status.phase.is_none() || status.phase == Some(VmiPhase::Pending) {
                if status.phase_transition_timestamps.is_empty() {
                    status
                        .phase_transition_timestamps
                        .push(PhaseTransitionTimestamp {
                            phase: VmiPhase::Pending,
                            phase_transition_timestamp: now_rfc3339(),
                        });
                }
                status.phase = Some(VmiPhase::Pending);
            }
            set_condition(
                &mut status.conditions,
                Condition {
                    reason: Some("Unschedulable".into()),
                    message: Some(msg),
                    ..Condition::new(POD_SCHEDULED, ConditionStatus::False)
                },
            );
            Some(Duration::from_secs(5))
        }
    };
    if status != st {
        registry
            .replace_status(
                vmi_kind,
                &key.namespace,
                &key.name,
                json!({"metadata": {"name": key.name, "namespace": key.namespace,
                                     "resourceVersion": rv},
                       "status": status}),
            )
            .await?;
    }
    Ok(retry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use krvirt_api::host::{HostResources, HostStatus};
    use krvirt_api::meta::{ObjectMeta, to_rfc3339};

    fn host(name: &str, mem: &str, ready: bool) -> Host {
        let now = chrono::Utc::now();
        let mut h = Host {
            metadata: ObjectMeta::named(None, name),
            ..Default::default()
        };
        let mut st = HostStatus {
            capacity: Some(HostResources {
                cpu: None,
                memory: Some(serde_json::from_value(json!(mem)).unwrap()),
            }),
            heartbeat_time: Some(to_rfc3339(now)),
            ..Default::default()
        };
        set_condition(
            &mut st.conditions,
            Condition::new(
                "Ready",
                if ready {
                    ConditionStatus::True
                } else {
                    ConditionStatus::False
                },
            ),
        );
        h.status = Some(st);
        h
    }

    fn vmi(mem: &str) -> VirtualMachineInstance {
        serde_json::from_value(json!({
            "metadata": {"name": "v", "namespace": "default"},
            "spec": {"domain": {"memory": {"guest": mem}, "devices": {}}}
        }))
        .unwrap()
    }

    fn on(mut v: VirtualMachineInstance, host: &str) -> VirtualMachineInstance {
        v.status = Some(krvirt_api::kubevirt::VirtualMachineInstanceStatus {
            node_name: Some(host.into()),
            phase: Some(VmiPhase::Running),
            ..Default::default()
        });
        v
    }

    #[test]
    fn picks_the_host_with_most_free_memory() {
        let hosts = [host("a", "4Gi", true), host("b", "8Gi", true)];
        let placed = [on(vmi("6Gi"), "b")];
        let now = chrono::Utc::now();
        assert_eq!(choose_host(&vmi("1Gi"), &hosts, &placed, now).unwrap(), "a");
        assert_eq!(choose_host(&vmi("1Gi"), &hosts, &[], now).unwrap(), "b");
    }

    #[test]
    fn a_memory_resume_runs_only_where_its_state_is() {
        let hosts = [host("a", "8Gi", true), host("b", "8Gi", false)];
        let now = chrono::Utc::now();
        let mut v = vmi("1Gi");
        assert_eq!(resume_placement(&v, &hosts, now), ResumePlacement::Anywhere);
        v.metadata
            .annotations
            .insert(RESUME_FROM_ANNOTATION.into(), "snap".into());
        // A mark without a recorded host (older restores): no constraint.
        assert_eq!(resume_placement(&v, &hosts, now), ResumePlacement::Anywhere);
        v.metadata
            .annotations
            .insert(RESUME_HOST_ANNOTATION.into(), "a".into());
        assert_eq!(
            resume_placement(&v, &hosts, now),
            ResumePlacement::Only("a".into())
        );
        v.metadata
            .annotations
            .insert(RESUME_HOST_ANNOTATION.into(), "b".into());
        let ResumePlacement::HostGone(msg) = resume_placement(&v, &hosts, now) else {
            panic!()
        };
        assert!(msg.contains("host b") && msg.contains("not ready"), "{msg}");
        v.metadata
            .annotations
            .insert(RESUME_HOST_ANNOTATION.into(), "c".into());
        let ResumePlacement::HostGone(msg) = resume_placement(&v, &hosts, now) else {
            panic!()
        };
        assert!(msg.contains("no longer registered"), "{msg}");
    }

    #[test]
    fn explains_why_nothing_fits() {
        let mut cordoned = host("c", "8Gi", true);
        cordoned.spec.unschedulable = Some(true);
        let hosts = [host("a", "1Gi", true), host("b", "8Gi", false), cordoned];
        let err = choose_host(&vmi("2Gi"), &hosts, &[], chrono::Utc::now()).unwrap_err();
        assert_eq!(
            err,
            "0/3 hosts are available: 1 not ready, 1 unschedulable (cordoned), 1 insufficient memory."
        );
    }

    #[test]
    fn node_selector_must_match_labels() {
        let mut labelled = host("gpu", "8Gi", true);
        labelled.metadata.labels.insert("disk".into(), "ssd".into());
        let hosts = [host("plain", "8Gi", true), labelled];
        let mut v = vmi("1Gi");
        v.spec.node_selector.insert("disk".into(), "ssd".into());
        assert_eq!(
            choose_host(&v, &hosts, &[], chrono::Utc::now()).unwrap(),
            "gpu"
        );
        v.spec.node_selector.insert("disk".into(), "hdd".into());
        let err = choose_host(&v, &hosts, &[], chrono::Utc::now()).unwrap_err();
        assert!(
            err.contains("2 didn't match the VMI's nodeSelector"),
            "{err}"
        );
    }

    #[test]
    fn stale_heartbeat_is_not_ready() {
        let mut h = host("a", "8Gi", true);
        h.status.as_mut().unwrap().heartbeat_time = Some(to_rfc3339(
            chrono::Utc::now() - chrono::Duration::seconds(120),
        ));
        let err = choose_host(&vmi("1Gi"), &[h], &[], chrono::Utc::now()).unwrap_err();
        assert!(err.contains("1 not ready"), "{err}");
    }

    #[test]
    fn ended_vmis_do_not_count() {
        let hosts = [host("a", "2Gi", true)];
        let mut done = on(vmi("2Gi"), "a");
        done.status.as_mut().unwrap().phase = Some(VmiPhase::Succeeded);
        assert!(choose_host(&vmi("1Gi"), &hosts, &[done], chrono::Utc::now()).is_ok());
    }

    #[test]
    fn taints_affinity_and_dedicated_cpus_come_from_the_raw_objects() {
        let now = chrono::Utc::now();
        let mut a = host("a", "8Gi", true);
        let st = a.status.as_mut().unwrap();
        st.cpus = (0..4)
            .map(|id| krvirt_api::host::HostCpu {
                id,
                core: id,
                socket: 0,
                numa_node: 0,
            })
            .collect();
        let mut raw_a = serde_json::to_value(&a).unwrap();
        let raw_b = {
            let mut b = serde_json::to_value(host("b", "8Gi", true)).unwrap();
            b["spec"]["taints"] = json!([{"key": "maint", "effect": "NoSchedule"}]);
            b
        };
        let mut v = serde_json::to_value(vmi("1Gi")).unwrap();
        v["spec"]["domain"]["cpu"] = json!({"cores": 2, "dedicatedCpuPlacement": true});
        let p = schedule(&v, &[raw_a.clone(), raw_b.clone()], &[], now).unwrap();
        assert_eq!(p.host, "a");
        assert_eq!(p.dedicated_cpus, vec![0, 1]);
        // A placed VMI holding CPUs 0,1 (annotation) leaves 2,3.
        let mut placed = v.clone();
        placed["metadata"]["name"] = json!("w");
        placed["metadata"]["annotations"] = json!({ DEDICATED_CPUS_ANNOTATION: "0,1" });
        placed["status"] = json!({"nodeName": "a", "phase": "Running"});
        let p = schedule(&v, &[raw_a.clone(), raw_b.clone()], &[placed.clone()], now).unwrap();
        assert_eq!(p.dedicated_cpus, vec![2, 3]);
        // Two such VMIs placed: no CPUs left; b is tainted.
        let mut placed2 = placed.clone();
        placed2["metadata"]["name"] = json!("x");
        placed2["metadata"]["annotations"] = json!({ DEDICATED_CPUS_ANNOTATION: "2,3" });
        let err =
            schedule(&v, &[raw_a.clone(), raw_b.clone()], &[placed, placed2], now).unwrap_err();
        assert!(err.contains("1 node(s) had untolerated taint"), "{err}");
        // A toleration lets it onto b (no CPU inventory there: no
        // dedicated CPUs either).
        v["spec"]["tolerations"] = json!([{"key": "maint", "operator": "Exists"}]);
        v["spec"]["domain"]["cpu"] = json!({"cores": 2});
        raw_a["spec"]["unschedulable"] = json!(true);
        assert_eq!(schedule(&v, &[raw_a, raw_b], &[], now).unwrap().host, "b");
    }
}
