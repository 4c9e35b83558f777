//! `apply`, `create`, `delete`.

use std::process::ExitCode;

use anyhow::{Result, anyhow, bail};
use clap::Args;
use krvirt_api::KindInfo;
use serde_json::{Map, Value, json};

use super::manifest::{self, Manifest};
use super::table::resource_name;
use super::{Ctx, out, parse_targets, print_error};

/// Annotation holding the manifest last applied (kubectl's key, so stock
/// `kubectl apply` sees the same history).
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// How many times `apply` re-reads and retries after a conflict.
const APPLY_ATTEMPTS: usize = 5;

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifest file, directory, or `-` for stdin (repeatable)
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub files: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Manifest file, directory, or `-` for stdin (repeatable)
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub files: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// KIND NAME... or KIND/NAME...
    #[arg(value_name = "KIND NAME")]
    pub args: Vec<String>,
    /// Delete the objects in these manifest files
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub files: Vec<String>,
    /// Succeed when an object is already gone
    #[arg(long)]
    pub ignore_not_found: bool,
}

/// What `apply` does with one object.
#[derive(Debug, Clone, PartialEq)]
pub enum ApplyPlan {
    /// POST this body.
    Create(Value),
    /// PUT this body (carries the live resourceVersion).
    Replace(Value),
    Unchanged,
}

/// Fields the server owns; a manifest saved from `get -o yaml` carries
/// them, apply ignores them.
const SERVER_METADATA: &[&str] = &[
    "resourceVersion",
    "uid",
    "creationTimestamp",
    "generation",
    "managedFields",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
];

/// The manifest as it is recorded in [`LAST_APPLIED`]: without server
/// bookkeeping, status, or the annotation itself.
pub fn normalized_manifest(desired: &Value) -> Value {
    let mut d = desired.clone();
    if let Some(o) = d.as_object_mut() {
        o.remove("status");
    }
    if let Some(Value::Object(meta)) = d.get_mut("metadata") {
        for f in SERVER_METADATA {
            meta.remove(*f);
        }
        let empty = match meta.get_mut("annotations") {
            Some(Value::Object(a)) => {
                a.remove(LAST_APPLIED);
                a.is_empty()
            }
            _ => false,
        };
        if empty {
            meta.remove("annotations");
        }
    }
    d
}

/// Every field of `want` is present in `have` with the same value
/// (objects recursively; arrays element by element, same length).
/// Fields the server added (defaults) do not count as differences.
pub fn is_subset(want: &Value, have: &Value) -> bool {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w.iter().all(|(k, wv)| {
            h.get(k).is_some_and(|hv| is_subset(wv, hv)) || (wv.is_null() && !h.contains_key(k))
        }),
        (Value::Array(w), Value::Array(h)) => {
            w.len() == h.len() && w.iter().zip(h).all(|(a, b)| is_subset(a, b))
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

fn string_map<'a>(v: &'a Value, pointer: &str) -> Option<&'a Map<String, Value>> {
    v.pointer(pointer).and_then(Value::as_object)
}

/// Decide what applying `desired` over `live` means (kubectl's rule:
/// unchanged when the manifest equals the last applied one and the live
/// object still agrees with it).
pub fn plan_apply(desired: &Value, live: Option<&Value>) -> ApplyPlan {
    let manifest = normalized_manifest(desired);
    let record = manifest.to_string();
    let mut body = manifest.clone();
    let meta = body
        .as_object_mut()
        .map(|o| o.entry("metadata").or_insert_with(|| json!({})));
    if let Some(Value::Object(meta)) = meta {
        let ann = meta.entry("annotations").or_insert_with(|| json!({}));
        if let Value::Object(a) = ann {
            a.insert(LAST_APPLIED.into(), Value::String(record));
        }
    }
    let Some(live) = live else {
        return ApplyPlan::Create(body);
    };
    let last: Option<Value> = live
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(LAST_APPLIED))
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str(s).ok());
    if last.as_ref() == Some(&manifest) && is_subset(&manifest, live) {
        return ApplyPlan::Unchanged;
    }
    // Keep what others own: labels and annotations that the last apply did
    // not set and this one does not mention, finalizers, owners, status.
    let last = last.unwrap_or(Value::Null);
    if let Some(Value::Object(meta)) = body.get_mut("metadata") {
        for map_name in ["labels", "annotations"] {
            let pointer = format!("/metadata/{map_name}");
            let Some(live_map) = string_map(live, &pointer) else {
                continue;
            };
            let last_map = string_map(&last, &pointer);
            let target = meta.entry(map_name).or_insert_with(|| json!({}));
            if let Value::Object(t) = target {
                for (k, v) in live_map {
                    let managed_before = last_map.is_some_and(|m| m.contains_key(k));
                    if !managed_before && !t.contains_key(k) {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
            if meta
                .get(map_name)
                .and_then(Value::as_object)
                .is_some_and(Map::is_empty)
            {
                meta.remove(map_name);
            }
        }
        for f in ["finalizers", "ownerReferences"] {
            if !meta.contains_key(f)
                && let Some(v) = live.pointer(&format!("/metadata/{f}"))
            {
                meta.insert(f.into(), v.clone());
            }
        }
        if let Some(rv) = live.pointer("/metadata/resourceVersion") {
            meta.insert("resourceVersion".into(), rv.clone());
        }
    }
    if let (Some(status), Some(o)) = (live.get("status"), body.as_object_mut()) {
        o.insert("status".into(), status.clone());
    }
    ApplyPlan::Replace(body)
}

/// One manifest object, resolved: kind, namespace, name.
struct Target {
    kind: &'static KindInfo,
    ns: String,
    name: String,
    /// The object with its namespace filled in.
    object: Value,
}

fn target(ctx: &Ctx, m: &Manifest) -> Result<Target> {
    let kind = manifest::kind_of(m)?;
    let name = manifest::name_of(m)?.to_string();
    let ns = if kind.namespaced {
        manifest::namespace_of(m, &ctx.ns)?
    } else {
        String::new()
    };
    let mut object = m.object.clone();
    if kind.namespaced
        && let Some(Value::Object(meta)) = object.get_mut("metadata")
    {
        meta.insert("namespace".into(), Value::String(ns.clone()));
    }
    Ok(Target {
        kind,
        ns,
        name,
        object,
    })
}

async fn apply_one(ctx: &Ctx, t: &Target) -> Result<&'static str> {
    let c = &ctx.client;
    let desired = &t.object;
    for _ in 0..APPLY_ATTEMPTS {
        let live = match c.get(t.kind, &t.ns, &t.name).await {
            Ok(v) => Some(v),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        match plan_apply(desired, live.as_ref()) {
            ApplyPlan::Unchanged => return Ok("unchanged"),
            ApplyPlan::Create(body) => match c.create(t.kind, &t.ns, &body).await {
                Ok(_) => return Ok("created"),
                Err(e) if e.is_already_exists() => continue,
                Err(e) => return Err(e.into()),
            },
            ApplyPlan::Replace(body) => match c.replace(t.kind, &t.ns, &t.name, &body).await {
                Ok(_) => return Ok("configured"),
                Err(e) if e.is_conflict() || e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            },
        }
    }
    bail!(
        "{}/{} kept changing while it was applied ({APPLY_ATTEMPTS} attempts); try again",
        resource_name(t.kind),
        t.name
    )
}

/// Run `f` for each manifest; print failures as they happen and keep
/// going. Exit non-zero if anything failed.
async fn for_each_manifest<F, Fut>(ctx: &Ctx, files: &[String], f: F) -> Result<ExitCode>
where
    F: Fn(Target) -> Fut,
    Fut: std::future::Future<Output = Result<String>>,
{
    let manifests = manifest::read_all(files)?;
    if manifests.is_empty() {
        bail!("no objects found in {}", files.join(", "));
    }
    let mut failed = false;
    for m in &manifests {
        let result = match target(ctx, m) {
            Ok(t) => f(t).await.map_err(|e| e.context(m.origin())),
            Err(e) => Err(e),
        };
        match result {
            Ok(line) => out(&line)?,
            Err(e) => {
                failed = true;
                print_error(&e);
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn apply(ctx: &Ctx, args: ApplyArgs) -> Result<ExitCode> {
    for_each_manifest(ctx, &args.files, |t| async move {
        let what = apply_one(ctx, &t).await?;
        Ok(format!("{}/{} {what}\n", resource_name(t.kind), t.name))
    })
    .await
}

pub async fn create(ctx: &Ctx, args: CreateArgs) -> Result<ExitCode> {
    for_each_manifest(ctx, &args.files, |t| async move {
        ctx.client.create(t.kind, &t.ns, &t.object).await?;
        Ok(format!("{}/{} created\n", resource_name(t.kind), t.name))
    })
    .await
}

pub async fn delete(ctx: &Ctx, args: DeleteArgs) -> Result<ExitCode> {
    let ignore = args.ignore_not_found;
    let del = |kind: &'static KindInfo, ns: String, name: String| async move {
        match ctx.client.delete(kind, &ns, &name).await {
            Ok(_) => Ok(format!("{} \"{name}\" deleted\n", resource_name(kind))),
            Err(e) if ignore && e.is_not_found() => Ok(String::new()),
            Err(e) => Err(anyhow::Error::from(e)),
        }
    };
    if !args.files.is_empty() {
        if !args.args.is_empty() {
            bail!("give either -f FILE or KIND NAME..., not both");
        }
        return for_each_manifest(ctx, &args.files, |t| del(t.kind, t.ns, t.name)).await;
    }
    let targets = parse_targets(&args.args)?;
    let mut failed = false;
    for (kind, names) in targets {
        if names.is_empty() {
            return Err(anyhow!(
                "name the {} to delete (krvirt delete {} NAME...)",
                kind.plural,
                kind.short_names.first().copied().unwrap_or(kind.plural)
            ));
        }
        for name in names {
            match del(kind, ctx.ns.name.clone(), name).await {
                Ok(line) => out(&line)?,
                Err(e) => {
                    failed = true;
                    print_error(&e);
                }
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Value {
        json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": "vm-cirros", "namespace": "default", "labels": {"app": "demo"}},
            "spec": {"runStrategy": "Halted", "template": {"spec": {"domain": {"devices": {"disks": [{"name": "root"}]}}}}},
        })
    }

    /// What the server holds after the manifest was applied: its own
    /// bookkeeping and defaults added.
    fn live_after(applied: &Value, rv: &str) -> Value {
        let mut live = applied.clone();
        live["metadata"]["resourceVersion"] = json!(rv);
        live["metadata"]["uid"] = json!("u-1");
        live["metadata"]["creationTimestamp"] = json!("2026-05-01T00:00:00Z");
        live["spec"]["template"]["spec"]["domain"]["devices"]["disks"][0]["disk"] =
            json!({"bus": "virtio"});
        live["status"] = json!({"printableStatus": "Stopped"});
        live
    }

    fn body(p: ApplyPlan) -> Value {
        match p {
            ApplyPlan::Create(b) | ApplyPlan::Replace(b) => b,
            ApplyPlan::Unchanged => panic!("expected a body"),
        }
    }

    #[test]
    fn absent_object_is_created_with_the_last_applied_record() {
        let p = plan_apply(&manifest(), None);
        let ApplyPlan::Create(b) = p else {
            panic!("{p:?}")
        };
        let record = b["metadata"]["annotations"][LAST_APPLIED]
            .as_str()
            .expect("record");
        assert_eq!(
            serde_json::from_str::<Value>(record).expect("json"),
            manifest()
        );
        assert_eq!(b["spec"], manifest()["spec"]);
    }

    #[test]
    fn same_manifest_over_defaulted_live_object_is_unchanged() {
        let created = body(plan_apply(&manifest(), None));
        let live = live_after(&created, "7");
        assert_eq!(plan_apply(&manifest(), Some(&live)), ApplyPlan::Unchanged);
        // The manifest with server bookkeeping and a status (as saved
        // from an older `get -o yaml`) is the same manifest.
        let mut saved = manifest();
        saved["metadata"]["resourceVersion"] = json!("1");
        saved["metadata"]["uid"] = json!("u-0");
        saved["status"] = json!({"printableStatus": "Running"});
        assert_eq!(plan_apply(&saved, Some(&live)), ApplyPlan::Unchanged);
    }

    #[test]
    fn changed_manifest_is_configured_with_the_live_resource_version() {
        let created = body(plan_apply(&manifest(), None));
        let live = live_after(&created, "7");
        let mut changed = manifest();
        changed["spec"]["runStrategy"] = json!("Always");
        let p = plan_apply(&changed, Some(&live));
        let ApplyPlan::Replace(b) = p else {
            panic!("{p:?}")
        };
        assert_eq!(b["metadata"]["resourceVersion"], "7");
        assert_eq!(b["spec"]["runStrategy"], "Always");
        assert_eq!(b["status"], live["status"]);
        let record: Value = serde_json::from_str(
            b["metadata"]["annotations"][LAST_APPLIED]
                .as_str()
                .expect("record"),
        )
        .expect("json");
        assert_eq!(record, changed);
    }

    #[test]
    fn live_drift_from_the_manifest_is_configured_back() {
        let created = body(plan_apply(&manifest(), None));
        let mut live = live_after(&created, "9");
        live["spec"]["runStrategy"] = json!("Always"); // `krvirt start` changed it
        let p = plan_apply(&manifest(), Some(&live));
        let ApplyPlan::Replace(b) = p else {
            panic!("{p:?}")
        };
        assert_eq!(b["spec"]["runStrategy"], "Halted");
    }

    #[test]
    fn object_created_without_apply_is_configured() {
        let mut live = manifest();
        live["metadata"]["resourceVersion"] = json!("3");
        assert!(matches!(
            plan_apply(&manifest(), Some(&live)),
            ApplyPlan::Replace(_)
        ));
    }

    #[test]
    fn labels_of_others_survive_and_removed_ones_go() {
        let mut first = manifest();
        first["metadata"]["labels"] = json!({"app": "demo", "tier": "web"});
        let created = body(plan_apply(&first, None));
        let mut live = live_after(&created, "4");
        live["metadata"]["labels"]["added-by-someone"] = json!("yes");
        live["metadata"]["annotations"]["note"] = json!("kept");
        live["metadata"]["finalizers"] = json!(["krvirt.io/protect"]);
        let mut next = first.clone();
        next["metadata"]["labels"] = json!({"app": "demo2"}); // tier removed
        let b = body(plan_apply(&next, Some(&live)));
        assert_eq!(
            b["metadata"]["labels"],
            json!({"app": "demo2", "added-by-someone": "yes"})
        );
        assert_eq!(b["metadata"]["annotations"]["note"], "kept");
        assert_eq!(b["metadata"]["finalizers"], json!(["krvirt.io/protect"]));
    }

    #[test]
    fn subset_rules() {
        assert!(is_subset(&json!({"a": 1}), &json!({"a": 1.0, "b": 2})));
        assert!(!is_subset(&json!({"a": [1, 2]}), &json!({"a": [1]})));
        assert!(is_subset(
            &json!({"a": [{"x": 1}]}),
            &json!({"a": [{"x": 1, "y": 2}]})
        ));
        assert!(!is_subset(&json!({"a": "1"}), &json!({"a": 1})));
        assert!(is_subset(&json!({"a": null}), &json!({})));
    }
}
