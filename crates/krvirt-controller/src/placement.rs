//! Placement: binds each pending VMI to a host that can run it.
//!
//! Filters: the host is Ready (its agent's heartbeat is recent), not
//! cordoned, carries every `nodeSelector` label, and has the memory left for
//! the guest. Among the hosts left, the one with the most free memory wins.
//! A VMI no host can take stays Pending with a `PodScheduled=False` condition
//! whose message counts the reasons per host, as kube-scheduler does
//! ("0/3 hosts are available: 2 insufficient memory, 1 not ready.").
//!
//! The cluster issue replaces this with the full scheduler crate; the
//! decision is kept a pure function ([`choose_host`]) for that reason.

use std::collections::BTreeMap;
use std::time::Duration;

use krvirt_api::KindInfo;
use krvirt_api::event::{NORMAL, ObjectReference, WARNING, reason as event_reason};
use krvirt_api::host::Host;
use krvirt_api::kubevirt::{PhaseTransitionTimestamp, VirtualMachineInstance, VmiPhase};
use krvirt_api::meta::{
    Condition, ConditionStatus, find_condition, now_rfc3339, parse_rfc3339, set_condition,
};
use krvirt_server::events::EventRecorder;
use krvirt_server::{Registry, Selector, Subresource};
use serde_json::{Value, json};
use tracing::info;

use crate::queue::Key;
use crate::runner::{ControllerError, decode};

/// A host whose heartbeat is older than this is not Ready.
pub const HEARTBEAT_GRACE: Duration = Duration::from_secs(40);

/// Condition type KubeVirt mirrors from the launcher pod.
pub const POD_SCHEDULED: &str = "PodScheduled";

/// Why a host was not chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unfit {
    NotReady,
    Unschedulable,
    NodeSelector,
    Memory,
}

impl Unfit {
    fn describe(self) -> &'static str {
        match self {
            Unfit::NotReady => "not ready",
            Unfit::Unschedulable => "unschedulable (cordoned)",
            Unfit::NodeSelector => "didn't match the VMI's nodeSelector",
            Unfit::Memory => "insufficient memory",
        }
    }
}

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

fn memory_of(vmi: &VirtualMachineInstance) -> u64 {
    vmi.spec.guest_memory_bytes().ok().flatten().unwrap_or(0)
}

/// Pick a host for `vmi` among `hosts`, given the VMIs already placed.
/// `Err` carries the human-readable reason summary.
pub fn choose_host(
    vmi: &VirtualMachineInstance,
    hosts: &[Host],
    placed: &[VirtualMachineInstance],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<String, String> {
    let need = memory_of(vmi);
    let mut reasons: BTreeMap<Unfit, usize> = BTreeMap::new();
    let mut best: Option<(u64, &str)> = None;
    for host in hosts {
        let name = host.metadata.name();
        let unfit = if !host_ready(host, now) {
            Some(Unfit::NotReady)
        } else if host.spec.unschedulable == Some(true) {
            Some(Unfit::Unschedulable)
        } else if !vmi
            .spec
            .node_selector
            .iter()
            .all(|(k, v)| host.metadata.labels.get(k) == Some(v))
        {
            Some(Unfit::NodeSelector)
        } else {
            None
        };
        if let Some(u) = unfit {
            *reasons.entry(u).or_default() += 1;
            continue;
        }
        let capacity = host
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()))
            .and_then(|r| r.memory.as_ref())
            .and_then(|q| q.value().ok())
            .unwrap_or(0);
        let used: u64 = placed
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name))
            .filter(|p| {
                !p.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(VmiPhase::is_final)
            })
            .map(memory_of)
            .sum();
        let free = capacity.saturating_sub(used);
        if free < need {
            *reasons.entry(Unfit::Memory).or_default() += 1;
            continue;
        }
        if best.is_none_or(|(f, _)| free > f) {
            best = Some((free, name));
        }
    }
    match best {
        Some((_, name)) => Ok(name.to_string()),
        None => {
            let detail: Vec<String> = reasons
                .iter()
                .map(|(u, n)| format!("{n} {}", u.describe()))
                .collect();
            let mut msg = format!("0/{} hosts are available", hosts.len());
            if !detail.is_empty() {
                msg.push_str(": ");
                msg.push_str(&detail.join(", "));
            }
            msg.push('.');
            Err(msg)
        }
    }
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
    let vmi: VirtualMachineInstance = decode("VMI", raw)?;
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
    let hosts: Vec<Host> = host_items
        .into_iter()
        .map(|h| decode("Host", h))
        .collect::<Result<_, _>>()?;
    let (vmi_items, _) = registry
        .list(vmi_kind, None, &Selector::everything())
        .await?;
    let placed: Vec<VirtualMachineInstance> = vmi_items
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();

    let mut status = st.clone();
    let retry = match choose_host(&vmi, &hosts, &placed, chrono::Utc::now()) {
        Ok(host) => {
            // The finalizer first: once the agent sees nodeName it owns the
            // guest's cleanup, and a delete must wait for it.
            let fin = crate::VMI_FINALIZER;
            let mut rv = rv;
            if !vmi.metadata.finalizers.iter().any(|f| f == fin) {
                let mut finalizers = vmi.metadata.finalizers.clone();
                finalizers.push(fin.to_string());
                let updated = registry
                    .merge_patch(
                        vmi_kind,
                        &key.namespace,
                        &key.name,
                        &json!({"metadata": {"finalizers": finalizers, "resourceVersion": rv}}),
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
}
