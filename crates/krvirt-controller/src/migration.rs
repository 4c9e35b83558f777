//! The migration controller: drives `VirtualMachineInstanceMigration`s
//! through KubeVirt's phases.
//!
//! `Pending` (waits for the VMI, for an earlier migration of the same VMI
//! and for a free slot: at most [`PARALLEL_MIGRATIONS`] in flight in the
//! cluster and [`PARALLEL_OUTBOUND_PER_HOST`] out of one host) →
//! `Scheduling` (a Ready, schedulable host other than the source that
//! matches the VMI's `nodeSelector` and the migration's
//! `addedNodeSelector`) → `Scheduled` (the VMI gets `status.migrationState`
//! and the target label; the hosts' agents take over) → `PreparingTarget`
//! → `TargetReady` → `Running` → `Succeeded` | `Failed`, mirrored from the
//! VMI's `migrationState` as the agents fill it in.
//!
//! Cancel: deleting the migration object. A migration that has not
//! started sending is failed at once (compare-and-swap against the source
//! agent's start); one that is sending gets `abortRequested` and the
//! source agent cancels it (`migrate_cancel`).
//!
//! The decisions ([`decide`], [`abort_action`], [`choose_target`],
//! [`configuration_for`]) are pure functions, unit-tested below.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use krvirt_api::KindInfo;
use krvirt_api::event::{NORMAL, ObjectReference, WARNING};
use krvirt_api::host::Host;
use krvirt_api::kubevirt::{VirtualMachineInstance, VmiPhase};
use krvirt_api::meta::{ConditionStatus, find_condition, now_rfc3339, parse_rfc3339};
use krvirt_api::migration::{
    AbortStatus, MigrationConfiguration, MigrationMode, MigrationPhase,
    MigrationPhaseTransitionTimestamp, MigrationPolicy, MigrationState, TARGET_NODE_LABEL,
    VMI_NAME_LABEL, VirtualMachineInstanceMigration, VirtualMachineInstanceMigrationStatus,
};
use krvirt_server::events::EventRecorder;
use krvirt_server::{ApiError, Registry, Selector, Subresource};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::runner::ControllerError;

/// KubeVirt's default `parallelMigrationsPerCluster`.
pub const PARALLEL_MIGRATIONS: usize = 5;
/// KubeVirt's default `parallelOutboundMigrationsPerNode`.
pub const PARALLEL_OUTBOUND_PER_HOST: usize = 2;
/// A host whose heartbeat is older than this is not a migration target.
pub const HEARTBEAT_GRACE: Duration = Duration::from_secs(40);
/// Default `downtime-limit` (ms) krvirt asks QEMU for.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 50;

/// What the cluster looks like to one decision.
pub struct Snapshot<'a> {
    pub hosts: &'a [Host],
    /// Migrations in flight (Scheduling … Running): (uid, source host).
    pub in_flight: &'a [(String, String)],
    /// Non-final migrations: (uid, VMI namespace, VMI name, creation time).
    pub open: &'a [(String, String, String, String)],
    pub policies: &'a [MigrationPolicy],
    pub now: chrono::DateTime<chrono::Utc>,
}

/// One step for a migration.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Nothing,
    /// Move to this phase (the message says why it waits, if it does).
    Phase(MigrationPhase, Option<String>),
    /// Bind the migration to a target host.
    Schedule {
        target: String,
        source: String,
        config: MigrationConfiguration,
        policy: Option<String>,
    },
    Fail(String),
}

fn phase_of(m: &VirtualMachineInstanceMigration) -> MigrationPhase {
    m.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
}

fn host_ready(h: &Host, now: chrono::DateTime<chrono::Utc>) -> bool {
    let Some(st) = h.status.as_ref() else {
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

/// The target host for a VMI leaving `source`: Ready, not cordoned, not
/// the source, matching the VMI's nodeSelector and `added`, without a
/// NoSchedule/NoExecute taint the VMI does not tolerate; among those,
/// the one with the fewest VMIs (`load`), then by name.
pub fn choose_target(
    vmi: &VirtualMachineInstance,
    source: &str,
    added: &BTreeMap<String, String>,
    hosts: &[Host],
    load: &HashMap<String, usize>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<String, String> {
    let mut why = Vec::new();
    let mut fit: Vec<&str> = Vec::new();
    for h in hosts {
        let name = h.metadata.name.as_deref().unwrap_or_default();
        if name == source {
            continue;
        }
        let labels = &h.metadata.labels;
        let matches =
            |sel: &BTreeMap<String, String>| sel.iter().all(|(k, v)| labels.get(k) == Some(v));
        if !host_ready(h, now) {
            why.push(format!("{name}: not ready"));
        } else if h.spec.unschedulable == Some(true) {
            why.push(format!("{name}: cordoned"));
        } else if !matches(&vmi.spec.node_selector) || !matches(added) {
            why.push(format!("{name}: does not match the node selectors"));
        } else if let Some(t) = h.spec.taints.iter().find(|t| {
            t.effect != krvirt_api::kubevirt::TaintEffect::PreferNoSchedule
                && !vmi.spec.tolerations.iter().any(|tol| tol.tolerates(t))
        }) {
            why.push(format!("{name}: has the untolerated taint {t}"));
        } else {
            fit.push(name);
        }
    }
    fit.sort_by_key(|n| (load.get(*n).copied().unwrap_or(0), n.to_string()));
    fit.first().map(|n| n.to_string()).ok_or_else(|| {
        if why.is_empty() {
            "no other host in the cluster".to_string()
        } else {
            format!("no host can take the VMI: {}", why.join("; "))
        }
    })
}

/// Cluster defaults overridden by the most specific MigrationPolicy that
/// selects the VMI (KubeVirt's rule: the most matching labels wins).
pub fn configuration_for(
    vmi: &VirtualMachineInstance,
    policies: &[MigrationPolicy],
) -> (MigrationConfiguration, Option<String>) {
    let mut cfg = MigrationConfiguration {
        allow_auto_converge: Some(false),
        allow_post_copy: Some(false),
        bandwidth_per_migration: None,
        completion_timeout_per_gi_b: Some(150),
        downtime_limit_ms: Some(DEFAULT_DOWNTIME_LIMIT_MS),
    };
    let ns = vmi.metadata.namespace().to_string();
    let ns_labels: BTreeMap<String, String> =
        [("kubernetes.io/metadata.name".to_string(), ns)].into();
    let best = policies
        .iter()
        .filter(|p| p.selects(&vmi.metadata.labels, &ns_labels))
        .max_by_key(|p| (p.specificity(), std::cmp::Reverse(p.metadata.name.clone())));
    let Some(p) = best else {
        return (cfg, None);
    };
    if let Some(v) = p.spec.allow_auto_converge {
        cfg.allow_auto_converge = Some(v);
    }
    if let Some(v) = p.spec.allow_post_copy {
        cfg.allow_post_copy = Some(v);
    }
    if let Some(v) = &p.spec.bandwidth_per_migration {
        cfg.bandwidth_per_migration = Some(v.clone());
    }
    if let Some(v) = p.spec.completion_timeout_per_gi_b {
        cfg.completion_timeout_per_gi_b = Some(v);
    }
    (cfg, p.metadata.name.clone())
}

/// The phase a migration has reached, read from the VMI's state.
pub fn phase_from_state(ms: &MigrationState) -> MigrationPhase {
    if ms.failed == Some(true) {
        MigrationPhase::Failed
    } else if ms.completed == Some(true) {
        MigrationPhase::Succeeded
    } else if ms.start_timestamp.is_some() {
        MigrationPhase::Running
    } else if ms.target_node_address.is_some() {
        MigrationPhase::TargetReady
    } else {
        MigrationPhase::PreparingTarget
    }
}

/// The next step for migration `m`.
pub fn decide(
    m: &VirtualMachineInstanceMigration,
    vmi: Option<&VirtualMachineInstance>,
    load: &HashMap<String, usize>,
    s: &Snapshot,
) -> Step {
    let phase = phase_of(m);
    if phase.is_final() {
        return Step::Nothing;
    }
    let uid = m.metadata.uid.clone().unwrap_or_default();
    let Some(vmi) = vmi else {
        return Step::Fail(format!("VMI {} does not exist", m.spec.vmi_name));
    };
    let st = vmi.status.clone().unwrap_or_default();
    let ms = st
        .migration_state
        .as_ref()
        .filter(|ms| ms.migration_uid.as_deref() == Some(uid.as_str()));
    if let Some(ms) = ms {
        let p = phase_from_state(ms);
        return if p == phase {
            Step::Nothing
        } else if p == MigrationPhase::Failed {
            Step::Fail(
                ms.failure_reason
                    .clone()
                    .unwrap_or_else(|| "the migration failed".into()),
            )
        } else {
            Step::Phase(p, None)
        };
    }
    if !matches!(phase, MigrationPhase::Pending | MigrationPhase::Scheduling) {
        return Step::Fail("the VMI no longer records this migration".into());
    }
    if vmi.metadata.deletion_timestamp.is_some() {
        return Step::Fail("the VMI is being deleted".into());
    }
    let source = st.node_name.clone().unwrap_or_default();
    if st.phase != Some(VmiPhase::Running) || source.is_empty() {
        return Step::Fail(format!(
            "VMI {} is not running (phase {:?})",
            m.spec.vmi_name,
            st.phase.unwrap_or_default()
        ));
    }
    if phase == MigrationPhase::Pending {
        // The host has not reported the guest yet (e.g. it just arrived by
        // an earlier migration): the target needs its run directory.
        if st
            .krvirt_runtime
            .as_ref()
            .and_then(|r| r.run_dir.as_ref())
            .is_none()
        {
            return Step::Nothing;
        }
        // One migration per VMI at a time, oldest first.
        if st
            .migration_state
            .as_ref()
            .is_some_and(|o| !o.is_finished())
        {
            return Step::Nothing;
        }
        let created = m.metadata.creation_timestamp.clone().unwrap_or_default();
        let ns = m.metadata.namespace().to_string();
        let older = s.open.iter().any(|(u, n, v, c)| {
            *u != uid && *n == ns && *v == m.spec.vmi_name && (c, u) < (&created, &uid)
        });
        if older {
            return Step::Nothing;
        }
        if s.in_flight.len() >= PARALLEL_MIGRATIONS {
            return Step::Nothing;
        }
        if s.in_flight.iter().filter(|(_, src)| *src == source).count()
            >= PARALLEL_OUTBOUND_PER_HOST
        {
            return Step::Nothing;
        }
        return Step::Phase(MigrationPhase::Scheduling, None);
    }
    // Scheduling
    match choose_target(
        vmi,
        &source,
        &m.spec.added_node_selector,
        s.hosts,
        load,
        s.now,
    ) {
        Ok(target) => {
            let (config, policy) = configuration_for(vmi, s.policies);
            Step::Schedule {
                target,
                source,
                config,
                policy,
            }
        }
        Err(why) => Step::Phase(MigrationPhase::Scheduling, Some(why)),
    }
}

/// The storage objects a migration's Volumes are checked against.
pub struct VolumeView {
    pub volumes: Vec<krvirt_api::storage::StorageVolume>,
    pub pools: Vec<krvirt_api::storage::StoragePool>,
    pub snapshots: Vec<krvirt_api::snapshot::VirtualMachineSnapshot>,
}

/// A step that would move a migration towards a target goes only when the
/// VMI's Volumes can follow ([`crate::volmigration::check_volumes`]):
/// refused → the migration fails, naming the Volume, pool and reason;
/// an earlier migration's copy still settling → it waits.
pub fn gate_on_volumes(
    step: Step,
    m: &VirtualMachineInstanceMigration,
    vmi: Option<&VirtualMachineInstance>,
    view: &Option<VolumeView>,
    vmis: &[VirtualMachineInstance],
) -> Step {
    use crate::volmigration::{VolumeCheck, check_volumes};
    if !matches!(
        step,
        Step::Schedule { .. } | Step::Phase(MigrationPhase::Scheduling, None)
    ) {
        return step;
    }
    let (Some(vmi), Some(view)) = (vmi, view) else {
        return step;
    };
    match check_volumes(vmi, &view.volumes, &view.pools, &view.snapshots, vmis) {
        VolumeCheck::Ok => step,
        VolumeCheck::Refuse(why) => Step::Fail(why),
        VolumeCheck::Wait(why) => Step::Phase(phase_of(m), Some(why)),
    }
}

/// What to do about a VMI's migration whose object is gone (cancel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    None,
    /// Not sending yet: fail it now.
    FailNow,
    /// Sending: ask the source to cancel.
    Request,
}

pub fn abort_action(ms: &MigrationState, migration_exists: bool) -> Abort {
    if migration_exists || ms.is_finished() {
        Abort::None
    } else if ms.start_timestamp.is_none() {
        Abort::FailNow
    } else if ms.abort_requested != Some(true) {
        Abort::Request
    } else {
        Abort::None
    }
}

// ----- the loop ----------------------------------------------------------------

/// Runs the migration decisions against the registry.
pub struct MigrationController {
    registry: Registry,
    events: EventRecorder,
    vmim: &'static KindInfo,
    vmi: &'static KindInfo,
    host: &'static KindInfo,
    policy: &'static KindInfo,
}

fn kind(name: &'static str) -> Result<&'static KindInfo, ControllerError> {
    krvirt_api::find_kind(name).ok_or(ControllerError::UnknownKind(name))
}

fn decode<T: serde::de::DeserializeOwned>(items: Vec<Value>) -> Vec<T> {
    items
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect()
}

impl MigrationController {
    pub fn new(registry: Registry, events: EventRecorder) -> Result<Self, ControllerError> {
        Ok(MigrationController {
            registry,
            events,
            vmim: kind("virtualmachineinstancemigrations")?,
            vmi: kind("virtualmachineinstances")?,
            host: kind("hosts")?,
            policy: kind("migrationpolicies")?,
        })
    }

    /// Reconcile every migration on each change (and every second).
    pub async fn run(self) {
        let notify = Arc::new(Notify::new());
        for k in [self.vmim, self.vmi, self.host] {
            let (r, n) = (self.registry.clone(), notify.clone());
            tokio::spawn(async move { watch(r, k, n).await });
        }
        loop {
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if let Err(e) = self.pass().await {
                debug!(error = %e, "migration pass failed; retrying");
            }
        }
    }

    async fn list(&self, kind: &'static KindInfo) -> Result<Vec<Value>, ApiError> {
        Ok(self
            .registry
            .list(kind, None, &Selector::everything())
            .await?
            .0)
    }

    async fn pass(&self) -> Result<(), ApiError> {
        let vmims: Vec<VirtualMachineInstanceMigration> = decode(self.list(self.vmim).await?);
        let vmis: Vec<VirtualMachineInstance> = decode(self.list(self.vmi).await?);
        let hosts: Vec<Host> = decode(self.list(self.host).await?);
        let policies: Vec<MigrationPolicy> = decode(self.list(self.policy).await?);
        let by_name: HashMap<(String, String), &VirtualMachineInstance> = vmis
            .iter()
            .map(|v| {
                (
                    (
                        v.metadata.namespace().to_string(),
                        v.metadata.name().to_string(),
                    ),
                    v,
                )
            })
            .collect();
        let mut load: HashMap<String, usize> = HashMap::new();
        for v in &vmis {
            if let Some(n) = v.status.as_ref().and_then(|s| s.node_name.clone()) {
                *load.entry(n).or_default() += 1;
            }
        }

        // Cancels: a VMI's open migration whose object is gone.
        let live: std::collections::HashSet<String> = vmims
            .iter()
            .filter(|m| m.metadata.deletion_timestamp.is_none())
            .filter_map(|m| m.metadata.uid.clone())
            .collect();
        for v in &vmis {
            let Some(ms) = v.status.as_ref().and_then(|s| s.migration_state.as_ref()) else {
                continue;
            };
            let exists = ms.migration_uid.as_ref().is_some_and(|u| live.contains(u));
            let action = abort_action(ms, exists);
            if action != Abort::None {
                self.abort(v, action).await;
            }
        }

        let vmi_of = |m: &VirtualMachineInstanceMigration| {
            by_name
                .get(&(m.metadata.namespace().to_string(), m.spec.vmi_name.clone()))
                .copied()
        };
        let mut in_flight: Vec<(String, String)> = Vec::new();
        let mut open = Vec::new();
        for m in &vmims {
            let p = phase_of(m);
            let uid = m.metadata.uid.clone().unwrap_or_default();
            if !p.is_final() {
                open.push((
                    uid.clone(),
                    m.metadata.namespace().to_string(),
                    m.spec.vmi_name.clone(),
                    m.metadata.creation_timestamp.clone().unwrap_or_default(),
                ));
            }
            if !p.is_final() && p != MigrationPhase::Pending {
                let src = vmi_of(m)
                    .and_then(|v| v.status.as_ref())
                    .and_then(|s| s.migration_state.as_ref())
                    .filter(|ms| ms.migration_uid.as_deref() == Some(uid.as_str()))
                    .and_then(|ms| ms.source_node.clone())
                    .or_else(|| vmi_of(m).and_then(|v| v.status.as_ref()?.node_name.clone()))
                    .unwrap_or_default();
                in_flight.push((uid, src));
            }
        }
        let now = chrono::Utc::now();
        let volumes = self.volume_view(&vmims).await?;
        for m in &vmims {
            if m.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let vmi = vmi_of(m);
            let step = {
                let snap = Snapshot {
                    hosts: &hosts,
                    in_flight: &in_flight,
                    open: &open,
                    policies: &policies,
                    now,
                };
                decide(m, vmi, &load, &snap)
            };
            let step = gate_on_volumes(step, m, vmi, &volumes, &vmis);
            let mirrored = vmi
                .and_then(|v| v.status.as_ref()?.migration_state.clone())
                .filter(|ms| ms.migration_uid == m.metadata.uid);
            if let Err(e) = self.apply(m, vmi, step.clone(), mirrored).await {
                debug!(migration = ?m.metadata.name, error = %e, "migration step failed");
            }
            // A migration that entered the slots counts for the next ones.
            if let Step::Phase(MigrationPhase::Scheduling, None) = step {
                let src = vmi
                    .and_then(|v| v.status.as_ref()?.node_name.clone())
                    .unwrap_or_default();
                in_flight.push((m.metadata.uid.clone().unwrap_or_default(), src));
            }
        }
        Ok(())
    }

    /// The Volumes, pools and snapshots [`gate_on_volumes`] looks at,
    /// listed only while a migration is about to pick a target.
    async fn volume_view(
        &self,
        vmims: &[VirtualMachineInstanceMigration],
    ) -> Result<Option<VolumeView>, ApiError> {
        let deciding = vmims.iter().any(|m| {
            matches!(
                phase_of(m),
                MigrationPhase::Pending | MigrationPhase::Scheduling
            )
        });
        let kinds = (
            krvirt_api::find_kind("volumes"),
            krvirt_api::find_kind("storagepools"),
            krvirt_api::find_kind("virtualmachinesnapshots"),
        );
        let (true, (Some(v), Some(p), Some(s))) = (deciding, kinds) else {
            return Ok(None);
        };
        Ok(Some(VolumeView {
            volumes: decode(self.list(v).await?),
            pools: decode(self.list(p).await?),
            snapshots: decode(self.list(s).await?),
        }))
    }

    async fn abort(&self, v: &VirtualMachineInstance, action: Abort) {
        let (ns, name) = (v.metadata.namespace(), v.metadata.name());
        let r = self
            .registry
            .modify(self.vmi, ns, name, Subresource::Status, |obj| {
                let Some(ms) = obj.pointer_mut("/status/migrationState") else {
                    return Ok(());
                };
                let mut state: MigrationState =
                    serde_json::from_value(ms.clone()).unwrap_or_default();
                // Decide again on what is stored now (CAS with the agents).
                match abort_action(&state, false) {
                    Abort::FailNow => {
                        state.failed = Some(true);
                        state.abort_status = Some(AbortStatus::Succeeded);
                        state.failure_reason = Some("cancelled before the transfer started".into());
                        state.end_timestamp = Some(now_rfc3339());
                    }
                    Abort::Request => {
                        state.abort_requested = Some(true);
                        state.abort_status = Some(AbortStatus::Aborting);
                    }
                    Abort::None => return Ok(()),
                }
                *ms = serde_json::to_value(&state).unwrap_or(Value::Null);
                Ok(())
            })
            .await;
        match r {
            Ok(_) => info!(vmi = %name, ?action, "migration cancelled"),
            Err(e) => debug!(vmi = %name, error = %e, "cancel not written"),
        }
    }

    async fn set_status(
        &self,
        m: &VirtualMachineInstanceMigration,
        phase: MigrationPhase,
        message: Option<String>,
        mirrored: Option<MigrationState>,
    ) -> Result<(), ApiError> {
        let mut st: VirtualMachineInstanceMigrationStatus = m.status.clone().unwrap_or_default();
        let old = st.clone();
        if st.phase != Some(phase) {
            st.phase = Some(phase);
            st.phase_transition_timestamps
                .push(MigrationPhaseTransitionTimestamp {
                    phase,
                    phase_transition_timestamp: now_rfc3339(),
                });
        }
        st.migration_state = mirrored.or(st.migration_state);
        krvirt_api::meta::set_condition(
            &mut st.conditions,
            match &message {
                Some(msg) => krvirt_api::meta::Condition {
                    reason: Some("Waiting".into()),
                    message: Some(msg.clone()),
                    ..krvirt_api::meta::Condition::new("Progressing", ConditionStatus::False)
                },
                None => krvirt_api::meta::Condition::new(
                    "Progressing",
                    if phase.is_final() {
                        ConditionStatus::False
                    } else {
                        ConditionStatus::True
                    },
                ),
            },
        );
        if st == old {
            return Ok(());
        }
        let rv = m.metadata.resource_version.clone().unwrap_or_default();
        self.registry
            .replace_status(
                self.vmim,
                m.metadata.namespace(),
                m.metadata.name(),
                json!({"metadata": {"name": m.metadata.name(), "namespace": m.metadata.namespace(),
                                    "resourceVersion": rv},
                       "status": st}),
            )
            .await?;
        if phase != phase_of(m) {
            let involved = ObjectReference {
                kind: Some("VirtualMachineInstanceMigration".into()),
                namespace: m.metadata.namespace.clone(),
                name: m.metadata.name.clone(),
                uid: m.metadata.uid.clone(),
                api_version: Some("kubevirt.io/v1".into()),
                ..Default::default()
            };
            match phase {
                MigrationPhase::Succeeded => self.events.record_ref(
                    involved,
                    NORMAL,
                    "SuccessfulMigration",
                    &format!("Migration of VMI {} succeeded", m.spec.vmi_name),
                ),
                MigrationPhase::Failed => self.events.record_ref(
                    involved,
                    WARNING,
                    "FailedMigration",
                    message.as_deref().unwrap_or("the migration failed"),
                ),
                _ => {}
            }
        }
        Ok(())
    }

    async fn apply(
        &self,
        m: &VirtualMachineInstanceMigration,
        vmi: Option<&VirtualMachineInstance>,
        step: Step,
        mirrored: Option<MigrationState>,
    ) -> Result<(), ApiError> {
        match step {
            Step::Nothing => {
                if mirrored.is_some()
                    && mirrored != m.status.as_ref().and_then(|s| s.migration_state.clone())
                {
                    self.set_status(m, phase_of(m), None, mirrored).await?;
                }
                Ok(())
            }
            Step::Phase(p, msg) => self.set_status(m, p, msg, mirrored).await,
            Step::Fail(why) => {
                warn!(migration = ?m.metadata.name, %why, "migration failed");
                self.set_status(m, MigrationPhase::Failed, Some(why), mirrored)
                    .await
            }
            Step::Schedule {
                target,
                source,
                config,
                policy,
            } => {
                let Some(vmi) = vmi else { return Ok(()) };
                let (ns, name) = (vmi.metadata.namespace(), vmi.metadata.name());
                self.registry
                    .merge_patch(
                        self.vmi,
                        ns,
                        name,
                        &json!({"metadata": {"labels": {TARGET_NODE_LABEL: target}}}),
                        Subresource::Main,
                    )
                    .await?;
                let state = MigrationState {
                    migration_uid: m.metadata.uid.clone(),
                    source_node: Some(source.clone()),
                    target_node: Some(target.clone()),
                    mode: Some(MigrationMode::PreCopy),
                    migration_policy_name: policy,
                    migration_configuration: Some(config),
                    ..Default::default()
                };
                let mut bound = false;
                self.registry
                    .modify(self.vmi, ns, name, Subresource::Status, |obj| {
                        bound = false;
                        let cur: Option<MigrationState> = obj
                            .pointer("/status/migrationState")
                            .and_then(|v| serde_json::from_value(v.clone()).ok());
                        if cur.as_ref().is_some_and(|c| !c.is_finished()) {
                            return Ok(());
                        }
                        if obj.pointer("/status/nodeName").and_then(Value::as_str)
                            != Some(source.as_str())
                        {
                            return Ok(());
                        }
                        if let Some(st) = obj.get_mut("status").and_then(Value::as_object_mut) {
                            st.insert(
                                "migrationState".into(),
                                serde_json::to_value(&state).unwrap_or(Value::Null),
                            );
                            bound = true;
                        }
                        Ok(())
                    })
                    .await?;
                if bound {
                    info!(migration = ?m.metadata.name, vmi = %name, %source, %target, "migration scheduled");
                    self.set_status(m, MigrationPhase::Scheduled, None, Some(state))
                        .await?;
                    // KubeVirt labels the migration with its VMI.
                    let _ = self
                        .registry
                        .merge_patch(
                            self.vmim,
                            m.metadata.namespace(),
                            m.metadata.name(),
                            &json!({"metadata": {"labels": {VMI_NAME_LABEL: name}}}),
                            Subresource::Main,
                        )
                        .await;
                }
                Ok(())
            }
        }
    }
}

/// Wake the controller's pass on every change of `kind`.
async fn watch(registry: Registry, kind: &'static KindInfo, notify: Arc<Notify>) {
    crate::runner::watch_loop(&registry, kind, |_| notify.notify_one()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, ready: bool, cordoned: bool, labels: &[(&str, &str)]) -> Host {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_,_>>()},
            "spec": {"unschedulable": cordoned},
            "status": {"heartbeatTime": now_rfc3339(),
                       "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        }))
        .unwrap()
    }

    fn vmi(node: &str, ms: Option<MigrationState>) -> VirtualMachineInstance {
        serde_json::from_value(json!({
            "metadata": {"name": "v", "namespace": "default", "uid": "vu", "labels": {"app": "db"}},
            "spec": {"domain": {"devices": {}}},
            "status": {"phase": "Running", "nodeName": node, "migrationState": ms,
                       "krvirtRuntime": {"runDir": "/run/vmi/vu"}},
        }))
        .unwrap()
    }

    fn mig(uid: &str, phase: Option<MigrationPhase>) -> VirtualMachineInstanceMigration {
        serde_json::from_value(json!({
            "metadata": {"name": format!("m-{uid}"), "namespace": "default", "uid": uid,
                         "creationTimestamp": format!("2026-01-01T00:00:0{}Z", uid.len())},
            "spec": {"vmiName": "v"},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn snap<'a>(
        hosts: &'a [Host],
        in_flight: &'a [(String, String)],
        open: &'a [(String, String, String, String)],
    ) -> Snapshot<'a> {
        Snapshot {
            hosts,
            in_flight,
            open,
            policies: &[],
            now: chrono::Utc::now(),
        }
    }

    #[test]
    fn pending_waits_for_slots_then_schedules_a_ready_host() {
        let hosts = [
            host("a", true, false, &[]),
            host("b", false, false, &[]),
            host("c", true, true, &[]),
            host("d", true, false, &[]),
        ];
        let v = vmi("a", None);
        let m = mig("m1", None);
        let load = HashMap::new();
        assert_eq!(
            decide(&m, Some(&v), &load, &snap(&hosts, &[], &[])),
            Step::Phase(MigrationPhase::Scheduling, None)
        );
        // Not reported by its host yet (just migrated here): wait.
        let mut fresh = v.clone();
        fresh.status.as_mut().unwrap().krvirt_runtime = None;
        assert_eq!(
            decide(&m, Some(&fresh), &load, &snap(&hosts, &[], &[])),
            Step::Nothing
        );
        // Two migrations already leave host a: wait.
        let busy = [
            ("x".to_string(), "a".to_string()),
            ("y".to_string(), "a".to_string()),
        ];
        assert_eq!(
            decide(&m, Some(&v), &load, &snap(&hosts, &busy, &[])),
            Step::Nothing
        );
        // Five in the cluster: wait.
        let five: Vec<(String, String)> =
            (0..5).map(|i| (format!("u{i}"), format!("h{i}"))).collect();
        assert_eq!(
            decide(&m, Some(&v), &load, &snap(&hosts, &five, &[])),
            Step::Nothing
        );
        // Scheduling picks d: b is not ready, c is cordoned, a is the source.
        let m = mig("m1", Some(MigrationPhase::Scheduling));
        match decide(&m, Some(&v), &load, &snap(&hosts, &[], &[])) {
            Step::Schedule {
                target,
                source,
                config,
                ..
            } => {
                assert_eq!((target.as_str(), source.as_str()), ("d", "a"));
                assert_eq!(config.downtime_limit_ms, Some(DEFAULT_DOWNTIME_LIMIT_MS));
            }
            s => panic!("{s:?}"),
        }
        // Nothing fits: stays Scheduling and says why.
        match decide(&m, Some(&v), &load, &snap(&hosts[..3], &[], &[])) {
            Step::Phase(MigrationPhase::Scheduling, Some(why)) => {
                assert!(
                    why.contains("b: not ready") && why.contains("c: cordoned"),
                    "{why}"
                )
            }
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn one_migration_per_vmi_oldest_first() {
        let hosts = [host("a", true, false, &[]), host("b", true, false, &[])];
        let v = vmi("a", None);
        let open = [
            (
                "m1".to_string(),
                "default".to_string(),
                "v".to_string(),
                "2026-01-01T00:00:02Z".to_string(),
            ),
            (
                "m22".to_string(),
                "default".to_string(),
                "v".to_string(),
                "2026-01-01T00:00:03Z".to_string(),
            ),
        ];
        let load = HashMap::new();
        assert_eq!(
            decide(
                &mig("m22", None),
                Some(&v),
                &load,
                &snap(&hosts, &[], &open)
            ),
            Step::Nothing
        );
        assert_eq!(
            decide(&mig("m1", None), Some(&v), &load, &snap(&hosts, &[], &open)),
            Step::Phase(MigrationPhase::Scheduling, None)
        );
    }

    #[test]
    fn phases_follow_the_vmi_state() {
        let hosts = [host("a", true, false, &[]), host("b", true, false, &[])];
        let mut ms = MigrationState {
            migration_uid: Some("m1".into()),
            source_node: Some("a".into()),
            target_node: Some("b".into()),
            ..Default::default()
        };
        let load = HashMap::new();
        let m = mig("m1", Some(MigrationPhase::Scheduled));
        let step = |ms: &MigrationState| {
            decide(
                &m,
                Some(&vmi("a", Some(ms.clone()))),
                &load,
                &snap(&hosts, &[], &[]),
            )
        };
        assert_eq!(
            step(&ms),
            Step::Phase(MigrationPhase::PreparingTarget, None)
        );
        ms.target_node_address = Some("10.0.0.2".into());
        assert_eq!(step(&ms), Step::Phase(MigrationPhase::TargetReady, None));
        ms.start_timestamp = Some(now_rfc3339());
        assert_eq!(step(&ms), Step::Phase(MigrationPhase::Running, None));
        ms.completed = Some(true);
        assert_eq!(step(&ms), Step::Phase(MigrationPhase::Succeeded, None));
        ms.completed = None;
        ms.failed = Some(true);
        ms.failure_reason = Some("boom".into());
        assert_eq!(step(&ms), Step::Fail("boom".into()));
        // Final phases never move.
        let done = mig("m1", Some(MigrationPhase::Succeeded));
        assert_eq!(
            decide(&done, None, &load, &snap(&hosts, &[], &[])),
            Step::Nothing
        );
    }

    #[test]
    fn a_missing_or_stopped_vmi_fails_the_migration() {
        let load = HashMap::new();
        assert!(matches!(
            decide(&mig("m1", None), None, &load, &snap(&[], &[], &[])),
            Step::Fail(_)
        ));
        let mut v = vmi("a", None);
        v.status.as_mut().unwrap().phase = Some(VmiPhase::Succeeded);
        assert!(matches!(
            decide(&mig("m1", None), Some(&v), &load, &snap(&[], &[], &[])),
            Step::Fail(_)
        ));
    }

    #[test]
    fn cancel_fails_before_the_transfer_and_aborts_during_it() {
        let mut ms = MigrationState {
            migration_uid: Some("m1".into()),
            ..Default::default()
        };
        assert_eq!(abort_action(&ms, true), Abort::None);
        assert_eq!(abort_action(&ms, false), Abort::FailNow);
        ms.start_timestamp = Some(now_rfc3339());
        assert_eq!(abort_action(&ms, false), Abort::Request);
        ms.abort_requested = Some(true);
        assert_eq!(abort_action(&ms, false), Abort::None);
        ms.completed = Some(true);
        assert_eq!(abort_action(&ms, false), Abort::None);
    }

    #[test]
    fn the_most_specific_policy_wins() {
        let p = |name: &str, sel: Value, bw: &str| -> MigrationPolicy {
            serde_json::from_value(json!({
                "apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
                "metadata": {"name": name},
                "spec": {"bandwidthPerMigration": bw, "allowAutoConverge": true,
                         "selectors": {"virtualMachineInstanceSelector": sel}}
            }))
            .unwrap()
        };
        let policies = [
            p("any", json!({}), "1Mi"),
            p("db", json!({"app": "db"}), "2Mi"),
            p("other", json!({"app": "web"}), "3Mi"),
        ];
        let (cfg, name) = configuration_for(&vmi("a", None), &policies);
        assert_eq!(name.as_deref(), Some("db"));
        assert_eq!(cfg.bandwidth_per_migration.unwrap().to_string(), "2Mi");
        assert_eq!(cfg.allow_auto_converge, Some(true));
        let (cfg, name) = configuration_for(&vmi("a", None), &[]);
        assert_eq!(name, None);
        assert_eq!(cfg.allow_auto_converge, Some(false));
    }

    #[test]
    fn target_respects_the_added_node_selector() {
        let hosts = [
            host("a", true, false, &[]),
            host("b", true, false, &[("zone", "x")]),
            host("c", true, false, &[("zone", "y")]),
        ];
        let added: BTreeMap<String, String> = [("zone".to_string(), "y".to_string())].into();
        let t = choose_target(
            &vmi("a", None),
            "a",
            &added,
            &hosts,
            &HashMap::new(),
            chrono::Utc::now(),
        );
        assert_eq!(t.as_deref(), Ok("c"));
        let load: HashMap<String, usize> = [("b".to_string(), 3)].into();
        let t = choose_target(
            &vmi("a", None),
            "a",
            &BTreeMap::new(),
            &hosts,
            &load,
            chrono::Utc::now(),
        );
        assert_eq!(t.as_deref(), Ok("c"));
    }

    #[test]
    fn target_must_tolerate_the_hosts_taints() {
        use krvirt_api::kubevirt::{Taint, TaintEffect, Toleration, TolerationOperator};
        let mut b = host("b", true, false, &[]);
        b.spec.taints = vec![Taint {
            key: "maint".into(),
            value: None,
            effect: TaintEffect::NoSchedule,
            time_added: None,
        }];
        let hosts = [host("a", true, false, &[]), b];
        let now = chrono::Utc::now();
        let none = BTreeMap::new();
        let t = choose_target(&vmi("a", None), "a", &none, &hosts, &HashMap::new(), now);
        assert!(
            t.as_ref()
                .is_err_and(|e| e.contains("untolerated taint maint:NoSchedule")),
            "{t:?}"
        );
        let mut v = vmi("a", None);
        v.spec.tolerations = vec![Toleration {
            key: Some("maint".into()),
            operator: Some(TolerationOperator::Exists),
            ..Default::default()
        }];
        let t = choose_target(&v, "a", &none, &hosts, &HashMap::new(), now);
        assert_eq!(t.as_deref(), Ok("b"));
    }
}
