//! Host lifecycle and fencing.
//!
//! Every host agent renews its lease by writing its Host's status
//! (`heartbeatTime`) every few seconds. A host whose lease has expired
//! ([`lease_duration`], default 40 s, `KRVIRT_HOST_LEASE_SECONDS`) turns
//! `Ready=False` (reason `NodeLeaseExpired`), and its VMIs are fenced:
//! marked `Failed` (reason `NodeUnresponsive`, an open migration failed
//! with them) so the VM controller restarts those whose runStrategy asks
//! for it on another host, and the host-cleanup finalizer, which only the
//! lost agent could remove, is released once the VMI is being deleted.
//!
//! The replacement is a new VMI (a new uid): when the lost agent comes
//! back, the VMI it finds under that name is not its own (other uid, bound
//! elsewhere), so its reconcile stops the stale QEMU and removes its run
//! directory before doing anything else — the uid is the fencing epoch.
//!
//! NoExecute taints: a VMI on a live host that has a `NoExecute` taint it
//! does not tolerate (or whose `tolerationSeconds` ran out since the
//! taint's `timeAdded`) is evicted as KubeVirt would: live-migrated when
//! its `evictionStrategy` is `LiveMigrate` or `LiveMigrateIfPossible` (a
//! VirtualMachineInstanceMigration named `{vmi}-noexecute-{uid prefix}`),
//! else deleted (its VM's runStrategy starts it again elsewhere; the
//! scheduler keeps it off the tainted host).
//!
//! An agent that is alive but cut off from the server fences itself first:
//! it kills its guests once it has not renewed its lease for
//! [`self_fence_after`] (the lease minus [`self_fence_margin`]), strictly
//! before the server may consider the lease expired (more than the lease
//! after the last `heartbeatTime`) and restart the VMs elsewhere.
//!
//! The decisions ([`lease_expired`], [`fence_step`], [`noexecute_step`])
//! are pure functions.

use std::collections::HashMap;
use std::time::Duration;

use krvirt_api::KindInfo;
use krvirt_api::event::{ObjectReference, WARNING};
use krvirt_api::host::Host;
use krvirt_api::kubevirt::{
    VMI_HOST_FINALIZER, VirtualMachineInstance, VirtualMachineInstanceStatus, VmiPhase,
    vmi_conditions,
};
use krvirt_api::meta::{
    Condition, ConditionStatus, find_condition, now_rfc3339, parse_rfc3339, set_condition,
};
use krvirt_server::events::EventRecorder;
use krvirt_server::{ApiError, Registry, Selector, Subresource};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::runner::ControllerError;

/// Environment variable: seconds without a heartbeat before a host is
/// NotReady and its VMIs are fenced.
pub const LEASE_ENV: &str = "KRVIRT_HOST_LEASE_SECONDS";
/// Default lease (KubeVirt/Kubernetes: 40 s node monitor grace period).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(40);
/// Host `Ready=False` reason when its lease expired.
pub const REASON_LEASE_EXPIRED: &str = "NodeLeaseExpired";
/// Event reason when a NoExecute taint evicts a VMI (Kubernetes').
pub const REASON_TAINT_EVICTION: &str = "TaintManagerEviction";
/// VMI reason when its host stopped renewing its lease (KubeVirt's).
pub const REASON_NODE_UNRESPONSIVE: &str = "NodeUnresponsive";

/// The host lease in force (from [`LEASE_ENV`], else [`DEFAULT_LEASE`]).
pub fn lease_duration() -> Duration {
    std::env::var(LEASE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LEASE)
}

/// How long before its lease runs out an agent that could not renew it
/// has killed its guests: a quarter of the lease (at least 500 ms, at most
/// half of it). It covers the agent's check interval (a quarter of the
/// margin), the kill (bounded by another quarter) and clock skew between
/// the agent (which stamps `heartbeatTime`) and the server (which compares
/// it with its own clock) of up to half the margin.
pub fn self_fence_margin(lease: Duration) -> Duration {
    (lease / 4).max(Duration::from_millis(500)).min(lease / 2)
}

/// An agent that has not renewed its lease for this long (measured from
/// the moment it stamped the last `heartbeatTime` the server accepted)
/// kills its guests. Always strictly shorter than `lease`, after which
/// ([`lease_expired`]) the server fences the host's VMIs and restarts them
/// elsewhere: `self_fence_after(lease) + self_fence_margin(lease) == lease`.
pub fn self_fence_after(lease: Duration) -> Duration {
    lease.saturating_sub(self_fence_margin(lease))
}

/// Has this host stopped renewing its lease?
pub fn lease_expired(host: &Host, now: chrono::DateTime<chrono::Utc>, lease: Duration) -> bool {
    let last = host
        .status
        .as_ref()
        .and_then(|s| s.heartbeat_time.as_deref())
        .and_then(parse_rfc3339);
    match last {
        Some(t) => now - t > chrono::Duration::from_std(lease).unwrap_or_default(),
        // Never reported: not expired (registration writes status at once).
        None => false,
    }
}

/// What to do with one VMI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    None,
    /// Mark it Failed (NodeUnresponsive): its VM restarts it elsewhere.
    Fail,
    /// Its deletion waits for a finalizer only the lost agent would remove.
    ReleaseFinalizer,
}

/// The fencing step for a VMI whose host is `host_lost` (lease expired or
/// Host gone).
pub fn fence_step(vmi: &VirtualMachineInstance, host_lost: bool) -> Fence {
    if !host_lost {
        return Fence::None;
    }
    let phase = vmi
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .unwrap_or_default();
    if vmi.metadata.deletion_timestamp.is_some() {
        if vmi
            .metadata
            .finalizers
            .iter()
            .any(|f| f == VMI_HOST_FINALIZER)
        {
            return Fence::ReleaseFinalizer;
        }
        return Fence::None;
    }
    if phase.is_final() {
        Fence::None
    } else {
        Fence::Fail
    }
}

/// Fence a VMI's status: Failed, NodeUnresponsive, open migration failed.
pub fn fenced_status(st: &mut VirtualMachineInstanceStatus, host: &str) {
    let msg = format!("host {host} stopped renewing its lease; the VMI was fenced");
    if st.phase != Some(VmiPhase::Failed) {
        st.phase = Some(VmiPhase::Failed);
        st.phase_transition_timestamps
            .push(krvirt_api::kubevirt::PhaseTransitionTimestamp {
                phase: VmiPhase::Failed,
                phase_transition_timestamp: now_rfc3339(),
            });
    }
    st.reason = Some(REASON_NODE_UNRESPONSIVE.into());
    set_condition(
        &mut st.conditions,
        Condition {
            reason: Some(REASON_NODE_UNRESPONSIVE.into()),
            message: Some(msg.clone()),
            ..Condition::new(vmi_conditions::READY, ConditionStatus::False)
        },
    );
    if let Some(ms) = st.migration_state.as_mut()
        && !ms.is_finished()
    {
        ms.failed = Some(true);
        ms.failure_reason = Some(msg);
        ms.end_timestamp = Some(now_rfc3339());
    }
}

/// What a host's NoExecute taints do to one VMI on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoExecute {
    /// Tolerated (or nothing to do: not running there, being deleted).
    Stay,
    /// Live-migrate it away.
    Migrate,
    /// Delete it.
    Delete,
}

/// The NoExecute decision for `vmi` on a host with `taints`.
pub fn noexecute_step(
    vmi: &VirtualMachineInstance,
    taints: &[krvirt_api::kubevirt::Taint],
    now: chrono::DateTime<chrono::Utc>,
) -> NoExecute {
    use krvirt_api::kubevirt::{EvictionStrategy, TaintEffect};
    let st = vmi.status.as_ref();
    if vmi.metadata.deletion_timestamp.is_some()
        || st.and_then(|s| s.node_name.as_ref()).is_none()
        || st.and_then(|s| s.phase).is_some_and(VmiPhase::is_final)
    {
        return NoExecute::Stay;
    }
    let evicted = taints
        .iter()
        .filter(|t| t.effect == TaintEffect::NoExecute)
        .any(|t| {
            !vmi.spec.tolerations.iter().any(|tol| {
                tol.tolerates(t)
                    && match (tol.toleration_seconds, t.time_added.as_deref()) {
                        (None, _) => true,
                        (Some(secs), Some(added)) => parse_rfc3339(added)
                            .is_none_or(|a| now < a + chrono::Duration::seconds(secs.max(0))),
                        // Unknown start: the grace period counts from now on.
                        (Some(_), None) => true,
                    }
            })
        });
    if !evicted {
        return NoExecute::Stay;
    }
    match vmi.spec.eviction_strategy {
        Some(EvictionStrategy::LiveMigrate | EvictionStrategy::LiveMigrateIfPossible) => {
            NoExecute::Migrate
        }
        _ => NoExecute::Delete,
    }
}

/// Watches host leases and fences the VMIs of lost hosts.
pub struct HostLifecycle {
    registry: Registry,
    events: EventRecorder,
    host: &'static KindInfo,
    vmi: &'static KindInfo,
    lease: Duration,
}

fn kind(name: &'static str) -> Result<&'static KindInfo, ControllerError> {
    krvirt_api::find_kind(name).ok_or(ControllerError::UnknownKind(name))
}

impl HostLifecycle {
    pub fn new(registry: Registry, events: EventRecorder) -> Result<Self, ControllerError> {
        Ok(HostLifecycle {
            registry,
            events,
            host: kind("hosts")?,
            vmi: kind("virtualmachineinstances")?,
            lease: lease_duration(),
        })
    }

    pub async fn run(self) {
        let every = (self.lease / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.pass().await {
                debug!(error = %e, "host lifecycle pass failed");
            }
        }
    }

    async fn pass(&self) -> Result<(), ApiError> {
        let (hosts, _) = self
            .registry
            .list(self.host, None, &Selector::everything())
            .await?;
        let now = chrono::Utc::now();
        let mut lost: HashMap<String, bool> = HashMap::new();
        let mut taints: HashMap<String, Vec<krvirt_api::kubevirt::Taint>> = HashMap::new();
        for h in hosts {
            let Ok(host) = serde_json::from_value::<Host>(h) else {
                continue;
            };
            let name = host.metadata.name.clone().unwrap_or_default();
            let expired = lease_expired(&host, now, self.lease);
            lost.insert(name.clone(), expired);
            taints.insert(name.clone(), host.spec.taints.clone());
            let ready = host
                .status
                .as_ref()
                .and_then(|s| find_condition(&s.conditions, "Ready"))
                .is_some_and(|c| c.status == ConditionStatus::True);
            if expired && ready {
                self.mark_not_ready(&name).await;
            }
        }
        let (vmis, _) = self
            .registry
            .list(self.vmi, None, &Selector::everything())
            .await?;
        for v in vmis {
            let Ok(vmi) = serde_json::from_value::<VirtualMachineInstance>(v) else {
                continue;
            };
            let Some(node) = vmi.status.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            // A Host object that is gone counts as lost too.
            let host_lost = lost.get(&node).copied().unwrap_or(true);
            match fence_step(&vmi, host_lost) {
                Fence::None => {}
                Fence::Fail => {
                    self.fail(&vmi, &node).await;
                    continue;
                }
                Fence::ReleaseFinalizer => {
                    self.release(&vmi).await;
                    continue;
                }
            }
            let host_taints = taints.get(&node).map(Vec::as_slice).unwrap_or_default();
            match noexecute_step(&vmi, host_taints, now) {
                NoExecute::Stay => {}
                NoExecute::Migrate => self.evict_by_migration(&vmi, &node).await,
                NoExecute::Delete => self.evict_by_deletion(&vmi, &node).await,
            }
        }
        Ok(())
    }

    async fn mark_not_ready(&self, name: &str) {
        let lease = self.lease.as_secs();
        let r = self
            .registry
            .modify(self.host, "", name, Subresource::Status, |obj| {
                let mut conds: Vec<Condition> = obj
                    .pointer("/status/conditions")
                    .and_then(|c| serde_json::from_value(c.clone()).ok())
                    .unwrap_or_default();
                set_condition(
                    &mut conds,
                    Condition {
                        reason: Some(REASON_LEASE_EXPIRED.into()),
                        message: Some(format!(
                            "the host agent has not renewed its lease for more than {lease}s"
                        )),
                        ..Condition::new("Ready", ConditionStatus::False)
                    },
                );
                if let Some(st) = obj.get_mut("status").and_then(Value::as_object_mut) {
                    st.insert(
                        "conditions".into(),
                        serde_json::to_value(&conds).unwrap_or(Value::Null),
                    );
                }
                Ok(())
            })
            .await;
        match r {
            Ok(_) => warn!(host = %name, "host lease expired: NotReady"),
            Err(e) => debug!(host = %name, error = %e, "NotReady not written"),
        }
    }

    async fn fail(&self, vmi: &VirtualMachineInstance, node: &str) {
        let (ns, name) = (vmi.metadata.namespace(), vmi.metadata.name());
        let uid = vmi.metadata.uid.clone();
        let r = self
            .registry
            .modify(self.vmi, ns, name, Subresource::Status, |obj| {
                // Only the incarnation we decided on, still on that host.
                if obj.pointer("/metadata/uid").and_then(Value::as_str) != uid.as_deref()
                    || obj.pointer("/status/nodeName").and_then(Value::as_str) != Some(node)
                {
                    return Ok(());
                }
                let mut st: VirtualMachineInstanceStatus = obj
                    .get("status")
                    .and_then(|s| serde_json::from_value(s.clone()).ok())
                    .unwrap_or_default();
                fenced_status(&mut st, node);
                obj["status"] = serde_json::to_value(&st).unwrap_or(Value::Null);
                Ok(())
            })
            .await;
        match r {
            Ok(_) => {
                info!(vmi = %name, host = %node, "fenced the VMI of a lost host");
                self.events.record_ref(
                    vmi_ref(vmi),
                    WARNING,
                    REASON_NODE_UNRESPONSIVE,
                    &format!("host {node} stopped renewing its lease; the VMI was fenced"),
                );
            }
            Err(e) => debug!(vmi = %name, error = %e, "fencing not written"),
        }
    }

    fn record(&self, vmi: &VirtualMachineInstance, message: &str) {
        self.events
            .record_ref(vmi_ref(vmi), WARNING, REASON_TAINT_EVICTION, message);
    }

    async fn evict_by_migration(&self, vmi: &VirtualMachineInstance, node: &str) {
        let Some(mig_kind) = krvirt_api::find_kind("virtualmachineinstancemigrations") else {
            return;
        };
        let (ns, name) = (vmi.metadata.namespace(), vmi.metadata.name());
        if vmi
            .status
            .as_ref()
            .and_then(|s| s.migration_state.as_ref())
            .is_some_and(|m| m.completed != Some(true) && m.failed != Some(true))
        {
            return;
        }
        let uid = vmi.metadata.uid.clone().unwrap_or_default();
        let short: String = uid.chars().take(8).collect();
        let mig = json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": format!("{name}-noexecute-{short}"), "namespace": ns},
            "spec": {"vmiName": name}
        });
        match self.registry.create(mig_kind, ns, mig).await {
            Ok(_) => {
                info!(vmi = %name, host = %node, "NoExecute taint: migrating the VMI away");
                self.record(
                    vmi,
                    &format!("host {node} has a NoExecute taint the VMI does not tolerate; live-migrating it"),
                );
            }
            Err(ApiError::AlreadyExists { .. }) => {}
            Err(e) => debug!(vmi = %name, error = %e, "eviction migration not created"),
        }
    }

    async fn evict_by_deletion(&self, vmi: &VirtualMachineInstance, node: &str) {
        let (ns, name) = (vmi.metadata.namespace(), vmi.metadata.name());
        let pre = krvirt_server::Preconditions {
            uid: vmi.metadata.uid.clone(),
            resource_version: None,
        };
        match self.registry.delete(self.vmi, ns, name, &pre).await {
            Ok(_) => {
                info!(vmi = %name, host = %node, "NoExecute taint: deleted the VMI");
                self.record(
                    vmi,
                    &format!("host {node} has a NoExecute taint the VMI does not tolerate; the VMI was deleted"),
                );
            }
            Err(e) => debug!(vmi = %name, error = %e, "eviction delete failed"),
        }
    }

    async fn release(&self, vmi: &VirtualMachineInstance) {
        let (ns, name) = (vmi.metadata.namespace(), vmi.metadata.name());
        let finalizers: Vec<&String> = vmi
            .metadata
            .finalizers
            .iter()
            .filter(|f| f.as_str() != VMI_HOST_FINALIZER)
            .collect();
        let rv = vmi.metadata.resource_version.clone().unwrap_or_default();
        let r = self
            .registry
            .merge_patch(
                self.vmi,
                ns,
                name,
                &json!({"metadata": {"finalizers": finalizers, "resourceVersion": rv}}),
                Subresource::Main,
            )
            .await;
        match r {
            Ok(_) => info!(vmi = %name, "released the host-cleanup finalizer of a lost host's VMI"),
            Err(e) => debug!(vmi = %name, error = %e, "finalizer not released"),
        }
    }
}

/// Event reference to a VMI.
fn vmi_ref(vmi: &VirtualMachineInstance) -> ObjectReference {
    ObjectReference {
        kind: Some("VirtualMachineInstance".into()),
        namespace: vmi.metadata.namespace.clone(),
        name: vmi.metadata.name.clone(),
        uid: vmi.metadata.uid.clone(),
        api_version: Some("kubevirt.io/v1".into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_fence_themselves_strictly_before_the_server_does() {
        for ms in [1000u64, 2000, 3000, 4000, 6000, 10_000, 40_000, 120_000] {
            let lease = Duration::from_millis(ms);
            let after = super::self_fence_after(lease);
            let margin = super::self_fence_margin(lease);
            assert!(after < lease, "{lease:?}: {after:?}");
            assert!(after > Duration::ZERO, "{lease:?}: {after:?}");
            assert_eq!(after + margin, lease);
            assert!(margin >= Duration::from_millis(500), "{lease:?}");
        }
        // The default: guests killed 30 s without renewal, VMs restarted
        // elsewhere only after 40 s.
        assert_eq!(
            super::self_fence_after(DEFAULT_LEASE),
            Duration::from_secs(30)
        );
    }

    fn host(age_s: i64) -> Host {
        let t = chrono::Utc::now() - chrono::Duration::seconds(age_s);
        serde_json::from_value(json!({
            "metadata": {"name": "h"},
            "status": {"heartbeatTime": t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)},
        }))
        .unwrap()
    }

    fn vmi(phase: &str, deleting: bool, finalizer: bool) -> VirtualMachineInstance {
        let mut meta = json!({"name": "v", "namespace": "default", "uid": "u"});
        if deleting {
            meta["deletionTimestamp"] = json!(now_rfc3339());
        }
        if finalizer {
            meta["finalizers"] = json!([VMI_HOST_FINALIZER]);
        }
        serde_json::from_value(json!({
            "metadata": meta, "spec": {"domain": {"devices": {}}},
            "status": {"phase": phase, "nodeName": "h"},
        }))
        .unwrap()
    }

    #[test]
    fn a_lease_expires_after_its_duration() {
        let now = chrono::Utc::now();
        assert!(!lease_expired(&host(2), now, Duration::from_secs(5)));
        assert!(lease_expired(&host(10), now, Duration::from_secs(5)));
        let never: Host = serde_json::from_value(json!({"metadata": {"name": "h"}})).unwrap();
        assert!(!lease_expired(&never, now, Duration::from_secs(5)));
    }

    #[test]
    fn only_the_vmis_of_lost_hosts_are_fenced() {
        assert_eq!(fence_step(&vmi("Running", false, true), false), Fence::None);
        assert_eq!(fence_step(&vmi("Running", false, true), true), Fence::Fail);
        assert_eq!(
            fence_step(&vmi("Scheduled", false, true), true),
            Fence::Fail
        );
        // Already ended: nothing to fail; deletion waits on the finalizer.
        assert_eq!(fence_step(&vmi("Failed", false, true), true), Fence::None);
        assert_eq!(
            fence_step(&vmi("Failed", true, true), true),
            Fence::ReleaseFinalizer
        );
        assert_eq!(fence_step(&vmi("Failed", true, false), true), Fence::None);
        // A live host's agent cleans up itself.
        assert_eq!(fence_step(&vmi("Failed", true, true), false), Fence::None);
    }

    #[test]
    fn fencing_fails_the_vmi_and_its_open_migration() {
        let mut st = VirtualMachineInstanceStatus {
            phase: Some(VmiPhase::Running),
            migration_state: Some(krvirt_api::migration::MigrationState {
                migration_uid: Some("m".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        fenced_status(&mut st, "h");
        assert_eq!(st.phase, Some(VmiPhase::Failed));
        assert_eq!(st.reason.as_deref(), Some(REASON_NODE_UNRESPONSIVE));
        assert_eq!(st.migration_state.unwrap().failed, Some(true));
    }

    #[test]
    fn noexecute_taints_evict_what_does_not_tolerate_them() {
        use krvirt_api::kubevirt::{
            EvictionStrategy, Taint, TaintEffect, Toleration, TolerationOperator,
        };
        let now = chrono::Utc::now();
        let taint = |effect, added: Option<chrono::DateTime<chrono::Utc>>| Taint {
            key: "maint".into(),
            value: None,
            effect,
            time_added: added.map(krvirt_api::meta::to_rfc3339),
        };
        let mut v = vmi("Running", false, true);
        let ne = [taint(TaintEffect::NoExecute, None)];
        assert_eq!(noexecute_step(&v, &ne, now), NoExecute::Delete);
        // NoSchedule never evicts.
        assert_eq!(
            noexecute_step(&v, &[taint(TaintEffect::NoSchedule, None)], now),
            NoExecute::Stay
        );
        v.spec.eviction_strategy = Some(EvictionStrategy::LiveMigrate);
        assert_eq!(noexecute_step(&v, &ne, now), NoExecute::Migrate);
        // Tolerated forever, then for 30 s from timeAdded.
        let mut tol = Toleration {
            key: Some("maint".into()),
            operator: Some(TolerationOperator::Exists),
            effect: Some(TaintEffect::NoExecute),
            ..Default::default()
        };
        v.spec.tolerations = vec![tol.clone()];
        assert_eq!(noexecute_step(&v, &ne, now), NoExecute::Stay);
        tol.toleration_seconds = Some(30);
        v.spec.tolerations = vec![tol];
        let recent = [taint(
            TaintEffect::NoExecute,
            Some(now - chrono::Duration::seconds(10)),
        )];
        let old = [taint(
            TaintEffect::NoExecute,
            Some(now - chrono::Duration::seconds(40)),
        )];
        assert_eq!(noexecute_step(&v, &recent, now), NoExecute::Stay);
        assert_eq!(noexecute_step(&v, &old, now), NoExecute::Migrate);
        // Ended or deleting VMIs are left alone.
        let done = vmi("Succeeded", false, true);
        assert_eq!(noexecute_step(&done, &ne, now), NoExecute::Stay);
        let deleting = vmi("Running", true, true);
        assert_eq!(noexecute_step(&deleting, &ne, now), NoExecute::Stay);
    }
}
