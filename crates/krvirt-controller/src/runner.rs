//! Watch plumbing and workers that execute the controllers' decisions.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use krvirt_api::event::{NORMAL, ObjectReference, WARNING, reason};
use krvirt_api::kubevirt::{
    PrintableStatus, VirtualMachine, VirtualMachineInstance, vm_conditions,
};
use krvirt_api::meta::{Condition, ConditionStatus, set_condition};
use krvirt_api::{KindInfo, find_kind};
use krvirt_server::events::{DEFAULT_MAX_PER_OBJECT, DEFAULT_TTL, EventRecorder, expire_events};
use krvirt_server::{ApiError, Preconditions, Registry, Selector, Subresource};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::placement;
use crate::queue::{Key, WorkQueue};
use crate::vm::{self, Action};

/// How often every object is reconciled even without a change.
const RESYNC: Duration = Duration::from_secs(30);
/// How often old events are expired.
const EVENT_GC: Duration = Duration::from_secs(60);
/// `source.component` of the controllers' events.
pub const COMPONENT: &str = "krvirt-controller";

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: String,
        source: serde_json::Error,
    },
    #[error("kind {0} is not registered")]
    UnknownKind(&'static str),
}

fn kind(name: &'static str) -> Result<&'static KindInfo, ControllerError> {
    find_kind(name).ok_or(ControllerError::UnknownKind(name))
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    what: &str,
    v: Value,
) -> Result<T, ControllerError> {
    serde_json::from_value(v).map_err(|source| ControllerError::Decode {
        what: what.to_string(),
        source,
    })
}

fn key_of(obj: &Value) -> Key {
    let s = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or_default();
    Key::new(s("/metadata/namespace"), s("/metadata/name"))
}

/// The running controllers of one control plane.
#[derive(Clone)]
pub struct Controllers {
    registry: Registry,
    vm_queue: WorkQueue,
    placement_queue: WorkQueue,
    vm_kind: &'static KindInfo,
    vmi_kind: &'static KindInfo,
    host_kind: &'static KindInfo,
    events: EventRecorder,
}

impl Controllers {
    pub fn new(registry: Registry) -> Result<Self, ControllerError> {
        let registry_for_events = registry.clone();
        Ok(Controllers {
            registry,
            vm_queue: WorkQueue::new(),
            placement_queue: WorkQueue::new(),
            vm_kind: kind("virtualmachines")?,
            vmi_kind: kind("virtualmachineinstances")?,
            host_kind: kind("hosts")?,
            events: EventRecorder::new(registry_for_events, COMPONENT, None),
        })
    }

    /// The recorder the controllers write their events with.
    pub fn events(&self) -> &EventRecorder {
        &self.events
    }

    /// Run until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tasks = Vec::new();
        let me = Arc::new(self);
        let metrics = krvirt_server::metrics::control_plane();
        let q = me.vm_queue.clone();
        metrics.register_queue("vm", move || q.len());
        let q = me.placement_queue.clone();
        metrics.register_queue("placement", move || q.len());

        // VMs feed the VM queue.
        let c = me.clone();
        tasks.push(tokio::spawn(async move {
            let q = c.vm_queue.clone();
            watch_loop(&c.registry, c.vm_kind, move |o| q.add(key_of(o))).await
        }));
        // VMIs feed both queues (a VMI is named after its VM).
        let c = me.clone();
        tasks.push(tokio::spawn(async move {
            let (vq, pq) = (c.vm_queue.clone(), c.placement_queue.clone());
            watch_loop(&c.registry, c.vmi_kind, move |o| {
                vq.add(key_of(o));
                pq.add(key_of(o));
            })
            .await
        }));
        // A host change can make pending VMIs schedulable.
        let c = me.clone();
        tasks.push(tokio::spawn(async move {
            let c2 = c.clone();
            watch_loop(&c.registry, c.host_kind, move |_| {
                let c3 = c2.clone();
                tokio::spawn(async move { c3.queue_unbound_vmis().await });
            })
            .await
        }));
        // Periodic resync.
        let c = me.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(RESYNC).await;
                for (k, q) in [(c.vm_kind, &c.vm_queue), (c.vmi_kind, &c.placement_queue)] {
                    if let Ok((items, _)) = c.registry.list(k, None, &Selector::everything()).await
                    {
                        items.iter().for_each(|o| q.add(key_of(o)));
                    }
                }
            }
        }));
        // Old events expire.
        let c = me.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                match expire_events(&c.registry, DEFAULT_TTL, DEFAULT_MAX_PER_OBJECT).await {
                    Ok(0) => {}
                    Ok(n) => debug!(deleted = n, "expired events"),
                    Err(e) => debug!(error = %e, "event expiry failed"),
                }
                tokio::time::sleep(EVENT_GC).await;
            }
        }));
        // Networks: interfaces attached and addressed before launch.
        match crate::network::NetworkController::new(me.registry.clone(), me.events.clone()) {
            Ok(n) => tasks.push(tokio::spawn(n.run())),
            Err(e) => warn!(error = %e, "network controller not started"),
        }
        // Templates: TemplateInstances become VMs and their disks.
        match crate::templates::TemplateController::new(me.registry.clone(), me.events.clone()) {
            Ok(t) => tasks.push(tokio::spawn(t.run())),
            Err(e) => warn!(error = %e, "template controller not started"),
        }
        // Host leases and fencing of lost hosts' VMIs.
        match crate::hostlife::HostLifecycle::new(me.registry.clone(), me.events.clone()) {
            Ok(h) => tasks.push(tokio::spawn(h.run())),
            Err(e) => warn!(error = %e, "host lifecycle controller not started"),
        }
        // Live migrations.
        match crate::migration::MigrationController::new(me.registry.clone(), me.events.clone()) {
            Ok(m) => tasks.push(tokio::spawn(m.run())),
            Err(e) => warn!(error = %e, "migration controller not started"),
        }
        // Snapshot restores: the new VMs and resume marks agents may not write.
        match crate::restore::RestoreController::new(me.registry.clone(), me.events.clone()) {
            Ok(r) => tasks.push(tokio::spawn(r.run())),
            Err(e) => warn!(error = %e, "restore controller not started"),
        }
        // Webhooks.
        if let (Ok(wk), Ok(ek)) = (kind("webhooks"), kind("events")) {
            let hooks = crate::webhook::WebhookController::new(me.registry.clone(), wk, ek);
            tasks.push(tokio::spawn(hooks.run()));
        }
        for _ in 0..2 {
            let c = me.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(key) = c.vm_queue.next().await {
                    let started = std::time::Instant::now();
                    let r = c.reconcile_vm(&key).await;
                    krvirt_server::metrics::control_plane()
                        .observe_work("vm", started.elapsed().as_secs_f64());
                    match r {
                        Ok(Some(after)) => c.vm_queue.add_after(key.clone(), after),
                        Ok(None) => {}
                        Err(e) => {
                            debug!(%key, error = %e, "VM reconcile failed; retrying");
                            c.vm_queue
                                .add_after(key.clone(), Duration::from_millis(200));
                        }
                    }
                    c.vm_queue.done(&key);
                }
            }));
        }
        let c = me.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(key) = c.placement_queue.next().await {
                let started = std::time::Instant::now();
                let r = placement::reconcile(&c.registry, c.vmi_kind, c.host_kind, &key, &c.events)
                    .await;
                krvirt_server::metrics::control_plane()
                    .observe_work("placement", started.elapsed().as_secs_f64());
                match r {
                    Ok(Some(after)) => c.placement_queue.add_after(key.clone(), after),
                    Ok(None) => {}
                    Err(e) => {
                        debug!(%key, error = %e, "placement failed; retrying");
                        c.placement_queue
                            .add_after(key.clone(), Duration::from_millis(200));
                    }
                }
                c.placement_queue.done(&key);
            }
        }));

        shutdown.cancelled().await;
        me.vm_queue.shut_down();
        me.placement_queue.shut_down();
        for t in tasks {
            t.abort();
        }
    }

    async fn queue_unbound_vmis(&self) {
        if let Ok((items, _)) = self
            .registry
            .list(self.vmi_kind, None, &Selector::everything())
            .await
        {
            for o in items
                .iter()
                .filter(|o| o.pointer("/status/nodeName").is_none())
            {
                self.placement_queue.add(key_of(o));
            }
        }
    }

    async fn get_opt(&self, kind: &KindInfo, key: &Key) -> Result<Option<Value>, ApiError> {
        match self.registry.get(kind, &key.namespace, &key.name).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn delete_vmi(&self, key: &Key, uid: &str) -> Result<(), ApiError> {
        let pre = Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        };
        match self
            .registry
            .delete(self.vmi_kind, &key.namespace, &key.name, &pre)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() || e.is_conflict() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One VM: returns when to look again, if a time matters.
    async fn reconcile_vm(&self, key: &Key) -> Result<Option<Duration>, ControllerError> {
        let vmi_raw = self.get_opt(self.vmi_kind, key).await?;
        let Some(vm_raw) = self.get_opt(self.vm_kind, key).await? else {
            // Garbage collection: the Volumes of its dataVolumeTemplates.
            crate::volumes::collect_orphans(&self.registry, &key.namespace, &key.name).await?;
            // Garbage collection: a VMI whose controlling VM is gone.
            if let Some(v) = vmi_raw {
                let vmi: VirtualMachineInstance = decode("VMI", v)?;
                let orphan = vmi
                    .metadata
                    .owner_references
                    .iter()
                    .any(|o| o.kind == "VirtualMachine" && o.controller == Some(true));
                if orphan && vmi.metadata.deletion_timestamp.is_none() {
                    info!(%key, "deleting VMI of deleted VM");
                    self.delete_vmi(key, vmi.metadata.uid.as_deref().unwrap_or_default())
                        .await?;
                    self.events.record_ref(
                        ObjectReference {
                            kind: Some("VirtualMachineInstance".into()),
                            namespace: Some(key.namespace.clone()),
                            name: Some(key.name.clone()),
                            uid: vmi.metadata.uid.clone(),
                            api_version: Some("kubevirt.io/v1".into()),
                            ..Default::default()
                        },
                        NORMAL,
                        reason::SUCCESSFUL_DELETE,
                        "Deleted the virtual machine instance of a deleted virtual machine",
                    );
                }
            }
            return Ok(None);
        };
        let resource_version = vm_raw
            .pointer("/metadata/resourceVersion")
            .cloned()
            .unwrap_or(Value::Null);
        let vm_ref = ObjectReference::to_object(&vm_raw);
        let vm: VirtualMachine = decode("VM", vm_raw)?;
        let mut instancetype_problem = None;
        match crate::instancetypes::ensure_snapshots(&self.registry, &vm).await {
            // The copies were recorded: decide from the stored VM.
            Ok(true) => return Ok(Some(Duration::ZERO)),
            Ok(false) => {}
            Err(crate::instancetypes::SnapshotError::Unusable(msg)) => {
                instancetype_problem = Some(msg)
            }
            Err(crate::instancetypes::SnapshotError::Controller(e)) => return Err(e),
        }
        crate::volumes::ensure_templates(&self.registry, &vm).await?;
        let vmi: Option<VirtualMachineInstance> = vmi_raw.map(|v| decode("VMI", v)).transpose()?;
        let mut d = vm::decide(&vm, vmi.as_ref(), chrono::Utc::now());
        if let Some(msg) = instancetype_problem {
            d.actions.retain(|a| !matches!(a, Action::CreateVmi(_)));
            set_condition(
                &mut d.status.conditions,
                Condition {
                    reason: Some(vm::REASON_INSTANCETYPE.into()),
                    message: Some(msg),
                    ..Condition::new(vm_conditions::FAILURE, ConditionStatus::True)
                },
            );
            if vmi.is_none() {
                d.status.printable_status = Some(PrintableStatus::Stopped);
                d.status.created = Some(false);
            }
            d.requeue_after = Some(RESYNC);
        }
        // Say once (per message) why the VM cannot use its instancetype.
        let invalid = |st: Option<&krvirt_api::kubevirt::VirtualMachineStatus>| {
            st.and_then(|s| {
                s.conditions.iter().find(|c| {
                    c.type_ == vm_conditions::FAILURE
                        && c.reason.as_deref() == Some(vm::REASON_INSTANCETYPE)
                })
            })
            .and_then(|c| c.message.clone())
        };
        if let Some(msg) = invalid(Some(&d.status))
            && invalid(vm.status.as_ref()).as_deref() != Some(msg.as_str())
        {
            self.events
                .record_ref(vm_ref.clone(), WARNING, vm::REASON_INSTANCETYPE, &msg);
        }

        let actions = std::mem::take(&mut d.actions);
        for action in &actions {
            match action {
                Action::CreateVmi(v) => {
                    let obj = serde_json::to_value(v.as_ref()).map_err(|source| {
                        ControllerError::Decode {
                            what: "VMI".into(),
                            source,
                        }
                    })?;
                    match self
                        .registry
                        .create(self.vmi_kind, &key.namespace, obj)
                        .await
                    {
                        Ok(_) => {
                            info!(%key, "created VMI");
                            self.events.record_ref(
                                vm_ref.clone(),
                                NORMAL,
                                reason::SUCCESSFUL_CREATE,
                                &format!(
                                    "Started the virtual machine by creating the new virtual machine instance {}",
                                    key.name
                                ),
                            );
                        }
                        // An earlier pass was first: look again.
                        Err(ApiError::AlreadyExists { .. }) => {
                            return Ok(Some(Duration::from_millis(50)));
                        }
                        // The template does not admit as a VMI: say so in the
                        // VM's status instead of retrying in a loop.
                        Err(e @ (ApiError::Invalid { .. } | ApiError::BadRequest(_))) => {
                            warn!(%key, error = %e, "VM template does not admit as a VMI");
                            self.events.record_ref(
                                vm_ref.clone(),
                                WARNING,
                                reason::FAILED_CREATE,
                                &format!("Error creating the virtual machine instance: {e}"),
                            );
                            set_condition(
                                &mut d.status.conditions,
                                Condition {
                                    reason: Some("FailedCreate".into()),
                                    message: Some(e.to_string()),
                                    ..Condition::new(vm_conditions::FAILURE, ConditionStatus::True)
                                },
                            );
                            d.status.created = Some(false);
                            d.status.printable_status = Some(PrintableStatus::Stopped);
                            d.requeue_after = Some(RESYNC);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Action::DeleteVmi { uid } => {
                    info!(%key, %uid, "deleting VMI");
                    self.delete_vmi(key, uid).await?;
                    self.events.record_ref(
                        vm_ref.clone(),
                        NORMAL,
                        reason::SUCCESSFUL_DELETE,
                        &format!(
                            "Stopped the virtual machine by deleting the virtual machine instance {uid}"
                        ),
                    );
                }
                Action::ClearStartPaused => {
                    let patch = json!({"metadata": {"annotations": {
                        krvirt_api::kubevirt::START_PAUSED_ANNOTATION: null}}});
                    self.registry
                        .merge_patch(
                            self.vm_kind,
                            &key.namespace,
                            &key.name,
                            &patch,
                            Subresource::Main,
                        )
                        .await?;
                }
                Action::ClearResumeMark => {
                    let patch = json!({"metadata": {"annotations": {
                        krvirt_api::snapshot::RESUME_FROM_ANNOTATION: null,
                        krvirt_api::snapshot::RESUME_HOST_ANNOTATION: null}}});
                    self.registry
                        .merge_patch(
                            self.vm_kind,
                            &key.namespace,
                            &key.name,
                            &patch,
                            Subresource::Main,
                        )
                        .await?;
                }
                Action::HaltVm => {
                    let patch = if vm.spec.running.is_some() {
                        json!({"spec": {"running": false}})
                    } else {
                        json!({"spec": {"runStrategy": "Halted"}})
                    };
                    self.registry
                        .merge_patch(
                            self.vm_kind,
                            &key.namespace,
                            &key.name,
                            &patch,
                            Subresource::Main,
                        )
                        .await?;
                }
            }
        }

        if vm.status.as_ref() != Some(&d.status) {
            let mut obj = json!({
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachine",
                "metadata": {"name": key.name, "namespace": key.namespace,
                             "resourceVersion": resource_version},
                "status": d.status,
            });
            // Compare-and-swap on the version decided from: a request added
            // meanwhile must not be overwritten.
            if let Err(e) = self
                .registry
                .replace_status(self.vm_kind, &key.namespace, &key.name, obj.take())
                .await
            {
                if e.is_conflict() {
                    return Ok(Some(Duration::ZERO));
                }
                if !e.is_not_found() {
                    return Err(e.into());
                }
            }
        }
        Ok(d.requeue_after)
    }
}

/// List, then watch from the list's version, calling `f` for every object
/// seen; after any break (compaction, store error) list again.
pub(crate) async fn watch_loop<F>(registry: &Registry, kind: &'static KindInfo, f: F)
where
    F: Fn(&Value) + Send,
{
    loop {
        let (items, rv) = match registry.list(kind, None, &Selector::everything()).await {
            Ok(x) => x,
            Err(e) => {
                warn!(kind = kind.kind, error = %e, "list failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        items.iter().for_each(&f);
        let mut stream = match registry
            .watch(kind, None, Selector::everything(), Some(&rv))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                warn!(kind = kind.kind, error = %e, "watch failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => f(&ev.object),
                Err(e) => {
                    debug!(kind = kind.kind, error = %e, "watch ended; relisting");
                    break;
                }
            }
        }
    }
}
