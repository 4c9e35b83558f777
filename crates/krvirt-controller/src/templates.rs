//! The template controller: a `krvirt.io/v1` TemplateInstance becomes a
//! VirtualMachine rendered from one version of a Template
//! ([`krvirt_api::template::render`]) plus one Volume per disk that names
//! an image or a Volume:
//!
//! - `containerDisk: {image}` → a Volume from that image, `linked` (a qcow2
//!   overlay on the read-only image blob: constant time, whatever the
//!   size) or `full` (an independent copy);
//! - `persistentVolumeClaim: {claimName}` / `dataVolume: {name}` → a
//!   Volume cloned from that Volume (in its pool: a copy, reflinked where
//!   the filesystem can).
//!
//! The VM's disk then names its own Volume (`persistentVolumeClaim`), so
//! every VM made from a template writes to its own disk. The instance's
//! status gets `Ready` (with the version, every parameter value, the VM and
//! the Volumes) or `InstantiateFailure` with a message naming the field
//! (`spec.parameters[NAME]: …`); an instance is processed once.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use krvirt_api::KindInfo;
use krvirt_api::event::{NORMAL, ObjectReference, WARNING};
use krvirt_api::meta::{Condition, ConditionStatus, set_condition};
use krvirt_api::storage::{CloneType, VOLUME_OWNER_VM_ANNOTATION};
use krvirt_api::template::{
    CONDITION_FAILED, CONDITION_READY, TEMPLATE_INSTANCE_ANNOTATION, TEMPLATE_LABEL,
    TEMPLATE_VERSION_LABEL, Template, TemplateInstance, TemplateInstanceStatus, render,
};
use krvirt_server::events::EventRecorder;
use krvirt_server::{ApiError, Preconditions, Registry, Selector};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::queue::{Key, WorkQueue};
use crate::runner::{ControllerError, decode};

/// The template controller.
pub struct TemplateController {
    registry: Registry,
    events: EventRecorder,
    queue: WorkQueue,
    ti_kind: &'static KindInfo,
    tpl_kind: &'static KindInfo,
    vm_kind: &'static KindInfo,
    vol_kind: &'static KindInfo,
}

fn key_of(obj: &Value) -> Key {
    let s = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or_default();
    Key::new(s("/metadata/namespace"), s("/metadata/name"))
}

/// A random number (for generated parameter values) from the standard
/// library's randomly seeded hasher.
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// What one instantiation made (or why it failed).
type Outcome = Result<TemplateInstanceStatus, String>;

fn causes_message(e: &ApiError) -> String {
    match e {
        ApiError::Invalid { causes, .. } if !causes.is_empty() => causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

/// The Volume a template disk becomes, and the VM volume that uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskClone {
    pub volume: Value,
    pub name: String,
}

/// Rewrite the rendered VM's disks that name an image or a Volume to
/// their own new Volumes (pure: `pools` gives the pool of each source
/// Volume). Returns the Volumes to create.
pub fn clone_disks(
    vm: &mut Value,
    vm_name: &str,
    namespace: &str,
    clone: CloneType,
    pools: &BTreeMap<String, Option<String>>,
) -> Result<Vec<DiskClone>, String> {
    let mut out = Vec::new();
    let Some(volumes) = vm
        .pointer_mut("/spec/template/spec/volumes")
        .and_then(Value::as_array_mut)
    else {
        return Ok(out);
    };
    let mode = match clone {
        CloneType::Linked => "linked",
        CloneType::Full => "full",
    };
    for v in volumes.iter_mut() {
        let disk = v
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let name = format!("{vm_name}-{disk}");
        let (source, pool) =
            if let Some(image) = v.pointer("/containerDisk/image").and_then(Value::as_str) {
                (json!({"image": {"name": image, "clone": mode}}), None)
            } else if let Some(src) = v
                .pointer("/persistentVolumeClaim/claimName")
                .or_else(|| v.pointer("/dataVolume/name"))
                .and_then(Value::as_str)
            {
                let pool = pools
                    .get(src)
                    .cloned()
                    .ok_or_else(|| format!("Volume {namespace}/{src} (disk {disk}) not found"))?;
                (json!({"volume": {"name": src}}), pool)
            } else {
                continue;
            };
        let mut spec = json!({"source": source});
        if let Some(p) = pool {
            spec["pool"] = json!(p);
        }
        out.push(DiskClone {
            volume: json!({
                "apiVersion": "krvirt.io/v1",
                "kind": "Volume",
                "metadata": {"name": name, "namespace": namespace,
                             "annotations": {VOLUME_OWNER_VM_ANNOTATION: vm_name}},
                "spec": spec,
            }),
            name: name.clone(),
        });
        *v = json!({"name": disk, "persistentVolumeClaim": {"claimName": name}});
    }
    Ok(out)
}

/// Volumes named by the rendered VM's disks (`persistentVolumeClaim`,
/// `dataVolume`).
fn referenced_volumes(vm: &Value) -> Vec<String> {
    vm.pointer("/spec/template/spec/volumes")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| {
                    v.pointer("/persistentVolumeClaim/claimName")
                        .or_else(|| v.pointer("/dataVolume/name"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default()
}

impl TemplateController {
    pub fn new(registry: Registry, events: EventRecorder) -> Result<Self, ControllerError> {
        let k = |n: &'static str| krvirt_api::find_kind(n).ok_or(ControllerError::UnknownKind(n));
        Ok(TemplateController {
            ti_kind: k("templateinstances")?,
            tpl_kind: k("templates")?,
            vm_kind: k("virtualmachines")?,
            vol_kind: k("volumes")?,
            registry,
            events,
            queue: WorkQueue::new(),
        })
    }

    /// Run until the task is aborted.
    pub async fn run(self) {
        let me = Arc::new(self);
        let c = me.clone();
        let watcher = tokio::spawn(async move { c.watch().await });
        while let Some(key) = me.queue.next().await {
            match me.reconcile(&key).await {
                Ok(()) => {}
                Err(e) => {
                    debug!(%key, error = %e, "template instance reconcile failed; retrying");
                    me.queue.add_after(key.clone(), Duration::from_millis(500));
                }
            }
            me.queue.done(&key);
        }
        watcher.abort();
    }

    async fn watch(&self) {
        loop {
            let rv = match self
                .registry
                .list(self.ti_kind, None, &Selector::everything())
                .await
            {
                Ok((items, rv)) => {
                    items.iter().for_each(|o| self.queue.add(key_of(o)));
                    rv
                }
                Err(e) => {
                    warn!(error = %e, "template controller: list failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let mut stream = match self
                .registry
                .watch(self.ti_kind, None, Selector::everything(), Some(&rv))
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "template controller: watch failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(ev) => self.queue.add(key_of(&ev.object)),
                    Err(_) => break,
                }
            }
        }
    }

    async fn reconcile(&self, key: &Key) -> Result<(), ControllerError> {
        let raw = match self
            .registry
            .get(self.ti_kind, &key.namespace, &key.name)
            .await
        {
            Ok(o) => o,
            Err(ApiError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let ti: TemplateInstance = decode("TemplateInstance", raw.clone())?;
        let done = ti.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| {
                (c.type_ == CONDITION_READY || c.type_ == CONDITION_FAILED)
                    && c.status == ConditionStatus::True
            })
        });
        if done || ti.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let outcome = self.instantiate(&ti).await?;
        let r = ObjectReference::to_object(&raw);
        let status = match outcome {
            Ok(mut st) => {
                info!(%key, vm = ?st.virtual_machine, version = ?st.version, "template instantiated");
                self.events.record_ref(
                    r,
                    NORMAL,
                    "Instantiated",
                    &format!(
                        "Created VirtualMachine {} from template {} version {}",
                        st.virtual_machine.as_deref().unwrap_or_default(),
                        ti.spec.template,
                        st.version.as_deref().unwrap_or_default()
                    ),
                );
                set_condition(
                    &mut st.conditions,
                    Condition {
                        reason: Some("Created".into()),
                        ..Condition::new(CONDITION_READY, ConditionStatus::True)
                    },
                );
                st
            }
            Err(msg) => {
                warn!(%key, error = %msg, "template instantiation failed");
                self.events
                    .record_ref(r, WARNING, "InstantiateFailed", &msg);
                let mut st = TemplateInstanceStatus::default();
                set_condition(
                    &mut st.conditions,
                    Condition {
                        reason: Some("Failed".into()),
                        message: Some(msg),
                        ..Condition::new(CONDITION_FAILED, ConditionStatus::True)
                    },
                );
                st
            }
        };
        let obj = json!({
            "apiVersion": "krvirt.io/v1",
            "kind": "TemplateInstance",
            "metadata": {"name": key.name, "namespace": key.namespace,
                         "resourceVersion": raw.pointer("/metadata/resourceVersion")},
            "spec": ti.spec,
            "status": status,
        });
        match self
            .registry
            .replace_status(self.ti_kind, &key.namespace, &key.name, obj)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Render, then create the Volumes and the VM. `Err` of the outer
    /// result: retry; of the inner: the instance failed.
    async fn instantiate(&self, ti: &TemplateInstance) -> Result<Outcome, ControllerError> {
        let ns = ti.metadata.namespace();
        let vm_name = ti.vm_name().to_string();
        let uid = ti.metadata.uid.clone().unwrap_or_default();
        let tpl: Template = match self
            .registry
            .get(self.tpl_kind, ns, &ti.spec.template)
            .await
        {
            Ok(o) => decode("Template", o)?,
            Err(ApiError::NotFound { .. }) => {
                return Ok(Err(format!(
                    "spec.template: Template {ns}/{} not found",
                    ti.spec.template
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let mut params = ti.spec.parameters.clone();
        if let Some(v) = tpl.version(ti.spec.version.as_deref())
            && v.parameters.iter().any(|p| p.name == "NAME")
        {
            params
                .entry("NAME".into())
                .or_insert_with(|| vm_name.clone());
        }
        let rendered = match render(&tpl, ti.spec.version.as_deref(), &params, &mut random) {
            Ok(r) => r,
            Err(causes) => {
                return Ok(Err(causes
                    .iter()
                    .map(|c| format!("{}: {}", c.field, c.message))
                    .collect::<Vec<_>>()
                    .join("; ")));
            }
        };
        let mut vm = rendered.vm;
        if let Some(m) = vm.as_object_mut() {
            let meta = m
                .entry("metadata")
                .or_insert_with(|| Value::Object(Default::default()));
            if !meta.is_object() {
                *meta = Value::Object(Default::default());
            }
            meta["name"] = json!(vm_name);
            meta["namespace"] = json!(ns);
            if !meta["labels"].is_object() {
                meta["labels"] = json!({});
            }
            meta["labels"][TEMPLATE_LABEL] = json!(ti.spec.template);
            meta["labels"][TEMPLATE_VERSION_LABEL] = json!(rendered.version);
            if !meta["annotations"].is_object() {
                meta["annotations"] = json!({});
            }
            meta["annotations"][TEMPLATE_INSTANCE_ANNOTATION] = json!(uid);
        }
        // The pools of the Volumes the template's disks name.
        let mut pools = BTreeMap::new();
        for src in referenced_volumes(&vm) {
            match self.registry.get(self.vol_kind, ns, &src).await {
                Ok(v) => {
                    let pool = v
                        .pointer("/spec/pool")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    pools.insert(src, pool);
                }
                Err(ApiError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let clones = match clone_disks(
            &mut vm,
            &vm_name,
            ns,
            ti.spec.clone.unwrap_or_default(),
            &pools,
        ) {
            Ok(c) => c,
            Err(msg) => return Ok(Err(msg)),
        };
        // Volumes first (removed again if the VM is refused), so the VM
        // never starts without its disks.
        let mut made = Vec::new();
        for c in &clones {
            let mut vol = c.volume.clone();
            vol["metadata"]["annotations"][TEMPLATE_INSTANCE_ANNOTATION] = json!(uid);
            match self.registry.create(self.vol_kind, ns, vol).await {
                Ok(_) => made.push(c.name.clone()),
                Err(ApiError::AlreadyExists { .. })
                    if self.ours(self.vol_kind, ns, &c.name, &uid).await? => {}
                Err(e) => {
                    self.undo(ns, &made).await;
                    return Ok(Err(format!("Volume {}: {}", c.name, causes_message(&e))));
                }
            }
        }
        match self.registry.create(self.vm_kind, ns, vm).await {
            Ok(_) => {}
            Err(ApiError::AlreadyExists { .. })
                if self.ours(self.vm_kind, ns, &vm_name, &uid).await? => {}
            Err(e) => {
                self.undo(ns, &made).await;
                return Ok(Err(format!(
                    "VirtualMachine {vm_name}: {}",
                    causes_message(&e)
                )));
            }
        }
        Ok(Ok(TemplateInstanceStatus {
            conditions: Vec::new(),
            version: Some(rendered.version),
            parameters: rendered.parameters,
            virtual_machine: Some(vm_name),
            volumes: clones.into_iter().map(|c| c.name).collect(),
        }))
    }

    /// Was `name` made by the instance `uid` (an earlier, interrupted pass)?
    async fn ours(
        &self,
        kind: &KindInfo,
        ns: &str,
        name: &str,
        uid: &str,
    ) -> Result<bool, ControllerError> {
        let o = self.registry.get(kind, ns, name).await?;
        Ok(o.pointer("/metadata/annotations")
            .and_then(|a| a.get(TEMPLATE_INSTANCE_ANNOTATION))
            .and_then(Value::as_str)
            == Some(uid))
    }

    async fn undo(&self, ns: &str, volumes: &[String]) {
        for v in volumes {
            if let Err(e) = self
                .registry
                .delete(self.vol_kind, ns, v, &Preconditions::default())
                .await
            {
                warn!(volume = %v, error = %e, "cannot remove the Volume of a failed instantiation");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> Value {
        json!({"spec": {"template": {"spec": {"volumes": [
            {"name": "root", "containerDisk": {"image": "demo-disk:latest"}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "golden"}},
            {"name": "cloudinit", "cloudInitNoCloud": {"userData": "x"}}
        ]}}}})
    }

    #[test]
    fn disks_naming_images_and_volumes_get_their_own_volumes() {
        let mut v = vm();
        let pools = BTreeMap::from([("golden".to_string(), Some("fast".to_string()))]);
        let clones =
            clone_disks(&mut v, "web1", "default", CloneType::Linked, &pools).expect("cloned");
        assert_eq!(clones.len(), 2);
        assert_eq!(clones[0].name, "web1-root");
        assert_eq!(
            clones[0].volume["spec"]["source"],
            json!({"image": {"name": "demo-disk:latest", "clone": "linked"}})
        );
        assert_eq!(
            clones[1].volume["spec"],
            json!({"pool": "fast", "source": {"volume": {"name": "golden"}}})
        );
        let vols = &v["spec"]["template"]["spec"]["volumes"];
        assert_eq!(
            vols[0],
            json!({"name": "root", "persistentVolumeClaim": {"claimName": "web1-root"}})
        );
        assert_eq!(vols[1]["persistentVolumeClaim"]["claimName"], "web1-data");
        assert_eq!(vols[2]["cloudInitNoCloud"]["userData"], "x");

        let mut v = vm();
        let clones =
            clone_disks(&mut v, "web2", "default", CloneType::Full, &pools).expect("cloned");
        assert_eq!(clones[0].volume["spec"]["source"]["image"]["clone"], "full");
        let e = clone_disks(&mut vm(), "w", "default", CloneType::Full, &BTreeMap::new())
            .expect_err("missing source");
        assert!(e.contains("golden"), "{e}");
    }
}
