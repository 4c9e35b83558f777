//! Cluster verbs: `migrate` (virtctl's), `cordon`, `uncordon`, `drain`
//! (kubectl's, on krvirt Hosts).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use krvirt_client::{ListParams, PatchTarget};
use serde_json::{Value, json};

use super::{Ctx, out, required_kind};

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// VirtualMachine (or VirtualMachineInstance) name
    pub name: String,
    /// Target host (else the migration controller picks one)
    #[arg(long, value_name = "HOST")]
    pub to: Option<String>,
    /// Cancel the VM's migration in progress (deletes its migration objects)
    #[arg(long, conflicts_with = "to")]
    pub cancel: bool,
    /// Wait until the migration ends; fail if it fails
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct HostArgs {
    /// Host name
    pub name: String,
}

#[derive(Debug, Args)]
pub struct TaintArgs {
    /// Kind: `host` (or `hosts`)
    pub kind: String,
    /// Host name
    pub name: String,
    /// `key[=value]:Effect` adds (NoSchedule, PreferNoSchedule, NoExecute);
    /// `key-` or `key:Effect-` removes
    #[arg(required = true, value_name = "TAINT")]
    pub taints: Vec<String>,
    /// Replace a taint with the same key and effect instead of refusing
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// Host name
    pub name: String,
    /// How long to wait for the host to empty
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 90s or 5m"))?;
    match unit {
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unit must be s, m or h")),
    }
}

fn str_at<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

/// The migrations of a VMI that have not ended.
async fn open_migrations(ctx: &Ctx, vmi: &str) -> Result<Vec<Value>> {
    let kind = required_kind("virtualmachineinstancemigrations")?;
    let list = ctx
        .client
        .list(kind, &ListParams::namespaced(&ctx.ns.name))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|m| str_at(m, "/spec/vmiName") == vmi)
        .filter(|m| !matches!(str_at(m, "/status/phase"), "Succeeded" | "Failed"))
        .collect())
}

/// Create a migration of `vmi` (to `to`, if given); returns its name.
async fn create_migration(ctx: &Ctx, vmi: &str, to: Option<&str>) -> Result<String> {
    let kind = required_kind("virtualmachineinstancemigrations")?;
    let mut obj = json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"generateName": format!("{vmi}-migration-")},
        "spec": {"vmiName": vmi},
    });
    if let Some(host) = to {
        obj["spec"]["addedNodeSelector"] = json!({"kubernetes.io/hostname": host});
    }
    let created = ctx.client.create(kind, &ctx.ns.name, &obj).await?;
    Ok(str_at(&created, "/metadata/name").to_string())
}

/// Wait for a migration to end: Ok(phase) or an error on timeout.
async fn wait_migration(ctx: &Ctx, name: &str, timeout: Duration) -> Result<Value> {
    let kind = required_kind("virtualmachineinstancemigrations")?;
    let deadline = Instant::now() + timeout;
    loop {
        let m = ctx.client.get(kind, &ctx.ns.name, name).await?;
        if matches!(str_at(&m, "/status/phase"), "Succeeded" | "Failed") {
            return Ok(m);
        }
        if Instant::now() >= deadline {
            bail!(
                "migration {name} still {} after {}s",
                str_at(&m, "/status/phase"),
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn migrate(ctx: &Ctx, a: MigrateArgs) -> Result<ExitCode> {
    let vmim = required_kind("virtualmachineinstancemigrations")?;
    if a.cancel {
        let open = open_migrations(ctx, &a.name).await?;
        if open.is_empty() {
            bail!("{}: no migration in progress", a.name);
        }
        for m in open {
            let name = str_at(&m, "/metadata/name").to_string();
            ctx.client.delete(vmim, &ctx.ns.name, &name).await?;
            out(&format!("migration {name} cancelled\n"))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let vmi_kind = required_kind("virtualmachineinstances")?;
    let hosts = required_kind("hosts")?;
    // Both checks at once: one round trip before the create, not two.
    let host_check = async {
        match &a.to {
            Some(to) => ctx.client.get(hosts, "", to).await.map(Some),
            None => Ok(None),
        }
    };
    let (vmi, host) = tokio::join!(ctx.client.get(vmi_kind, &ctx.ns.name, &a.name), host_check);
    let vmi = vmi?;
    if str_at(&vmi, "/status/phase") != "Running" {
        bail!(
            "{}: the VM is not running, there is nothing to migrate",
            a.name
        );
    }
    if let Some(to) = &a.to {
        host.map_err(|e| anyhow::anyhow!("--to {to}: {e}"))?;
        if str_at(&vmi, "/status/nodeName") == to {
            bail!("--to {to}: the VM already runs on {to}");
        }
    }
    let name = create_migration(ctx, &a.name, a.to.as_deref()).await?;
    out(&format!("migration {name} created for {}\n", a.name))?;
    if a.wait {
        let m = wait_migration(ctx, &name, a.timeout).await?;
        let ms = &m["status"]["migrationState"];
        if str_at(&m, "/status/phase") == "Failed" {
            bail!(
                "migration {name} failed: {}",
                ms["failureReason"]
                    .as_str()
                    .unwrap_or("see `krvirt describe`")
            );
        }
        out(&format!(
            "migrated {} from {} to {} (total {} ms, downtime {} ms)\n",
            a.name,
            ms["sourceNode"].as_str().unwrap_or("?"),
            ms["targetNode"].as_str().unwrap_or("?"),
            ms["krvirtProgress"]["totalTimeMs"],
            ms["krvirtProgress"]["downtimeMs"],
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn set_unschedulable(ctx: &Ctx, host: &str, on: bool) -> Result<()> {
    let kind = required_kind("hosts")?;
    ctx.client
        .merge_patch(
            kind,
            "",
            host,
            &json!({"spec": {"unschedulable": if on { Value::Bool(true) } else { Value::Null }}}),
            PatchTarget::Main,
        )
        .await?;
    Ok(())
}

pub async fn cordon(ctx: &Ctx, a: HostArgs, on: bool) -> Result<ExitCode> {
    set_unschedulable(ctx, &a.name, on).await?;
    out(&format!(
        "host/{} {}\n",
        a.name,
        if on { "cordoned" } else { "uncordoned" }
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Apply `kubectl taint`-style arguments to a host's current taints.
pub fn apply_taints(current: &[Value], args: &[String], overwrite: bool) -> Result<Vec<Value>> {
    let mut taints = current.to_vec();
    for arg in args {
        let t = krvirt_api::kubevirt::scheduling::parse_taint_arg(arg)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let same = |v: &Value, effect: Option<&str>| {
            str_at(v, "/key") == t.key && effect.is_none_or(|e| str_at(v, "/effect") == e)
        };
        let effect = t.effect.map(|e| e.as_str());
        if t.remove {
            let before = taints.len();
            taints.retain(|v| !same(v, effect));
            if taints.len() == before {
                bail!("taint {:?} not found", arg.trim_end_matches('-'));
            }
            continue;
        }
        let mut new = json!({"key": t.key, "effect": effect});
        if let Some(v) = &t.value {
            new["value"] = json!(v);
        }
        // Like Kubernetes: a NoExecute taint records when it appeared
        // (tolerationSeconds count from then).
        if effect == Some("NoExecute") {
            new["timeAdded"] = json!(krvirt_api::meta::now_rfc3339());
        }
        match taints.iter_mut().find(|v| same(v, effect)) {
            Some(old) if overwrite => *old = new,
            Some(_) => bail!(
                "host already has a taint with key {:?} and effect {:?}; use --overwrite",
                t.key,
                effect.unwrap_or_default()
            ),
            None => taints.push(new),
        }
    }
    Ok(taints)
}

/// `krvirt taint host NAME key=value:NoSchedule ... key-` (kubectl's).
pub async fn taint(ctx: &Ctx, a: TaintArgs) -> Result<ExitCode> {
    if !matches!(a.kind.as_str(), "host" | "hosts" | "node" | "nodes") {
        bail!(
            "{:?}: only hosts can be tainted (krvirt taint host NAME ...)",
            a.kind
        );
    }
    let kind = required_kind("hosts")?;
    let host = ctx.client.get(kind, "", &a.name).await?;
    let current = host
        .pointer("/spec/taints")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let taints = apply_taints(&current, &a.taints, a.overwrite)?;
    // The resourceVersion makes a concurrent change a conflict, not a loss.
    ctx.client
        .merge_patch(
            kind,
            "",
            &a.name,
            &json!({"metadata": {"resourceVersion": host.pointer("/metadata/resourceVersion")},
                    "spec": {"taints": taints}}),
            PatchTarget::Main,
        )
        .await?;
    out(&format!("host/{} tainted\n", a.name))?;
    Ok(ExitCode::SUCCESS)
}

/// What a drain does with one VMI (KubeVirt's evictionStrategy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// LiveMigrate / LiveMigrateIfPossible: move it.
    Migrate,
    /// None (or unset): stop it (its VM's runStrategy brings it back elsewhere).
    Stop,
    /// External: someone else handles it; the drain refuses.
    Refuse,
}

pub fn eviction_for(vmi: &Value) -> Eviction {
    match vmi
        .pointer("/spec/evictionStrategy")
        .and_then(Value::as_str)
    {
        Some("LiveMigrate") | Some("LiveMigrateIfPossible") => Eviction::Migrate,
        Some("External") => Eviction::Refuse,
        _ => Eviction::Stop,
    }
}

pub async fn drain(ctx: &Ctx, a: DrainArgs) -> Result<ExitCode> {
    let vmi_kind = required_kind("virtualmachineinstances")?;
    set_unschedulable(ctx, &a.name, true).await?;
    out(&format!("host/{} cordoned\n", a.name))?;
    let on_host = |ctx: &Ctx| {
        let params = ListParams::all_namespaces().fields(format!("status.nodeName={}", a.name));
        let client = ctx.client.clone();
        async move { client.list(vmi_kind, &params).await }
    };
    let vmis = on_host(ctx).await?.items;
    let refused: Vec<&str> = vmis
        .iter()
        .filter(|v| eviction_for(v) == Eviction::Refuse)
        .map(|v| str_at(v, "/metadata/name"))
        .collect();
    if !refused.is_empty() {
        bail!(
            "cannot drain {}: VMIs with evictionStrategy External: {}",
            a.name,
            refused.join(", ")
        );
    }
    for v in &vmis {
        let (ns, name) = (
            str_at(v, "/metadata/namespace"),
            str_at(v, "/metadata/name"),
        );
        let sub = Ctx {
            client: ctx.client.clone(),
            ns: super::Namespace {
                name: ns.to_string(),
                explicit: true,
            },
        };
        match eviction_for(v) {
            Eviction::Migrate => {
                if open_migrations(&sub, name).await?.is_empty() {
                    let m = create_migration(&sub, name, None).await?;
                    out(&format!("evicting {ns}/{name}: migration {m}\n"))?;
                }
            }
            Eviction::Stop => {
                ctx.client.delete(vmi_kind, ns, name).await?;
                out(&format!("evicting {ns}/{name}: stopped\n"))?;
            }
            Eviction::Refuse => {}
        }
    }
    let deadline = Instant::now() + a.timeout;
    loop {
        let left = on_host(ctx).await?.items;
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let names: Vec<&str> = left.iter().map(|v| str_at(v, "/metadata/name")).collect();
            bail!(
                "host {} still runs {} after {}s",
                a.name,
                names.join(", "),
                a.timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    out(&format!("host/{} drained\n", a.name))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taint_arguments_edit_the_list_like_kubectl() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let t = apply_taints(&[], &args(&["a=1:NoSchedule", "b:NoExecute"]), false).unwrap();
        assert_eq!(
            t[0],
            json!({"key": "a", "value": "1", "effect": "NoSchedule"})
        );
        assert_eq!(t[1]["effect"], "NoExecute");
        assert!(t[1]["timeAdded"].is_string(), "NoExecute records timeAdded");
        // Same key and effect: refused unless --overwrite.
        assert!(apply_taints(&t, &args(&["a=2:NoSchedule"]), false).is_err());
        let o = apply_taints(&t, &args(&["a=2:NoSchedule"]), true).unwrap();
        assert_eq!(o[0]["value"], "2");
        // Same key, other effect: a second taint.
        assert_eq!(
            apply_taints(&t, &args(&["a:PreferNoSchedule"]), false)
                .unwrap()
                .len(),
            3
        );
        // Removal: by key (every effect) or key and effect; unknown is an error.
        let t2 = apply_taints(&t, &args(&["a:PreferNoSchedule"]), false).unwrap();
        assert_eq!(apply_taints(&t2, &args(&["a-"]), false).unwrap().len(), 1);
        assert_eq!(
            apply_taints(&t2, &args(&["a:NoSchedule-"]), false)
                .unwrap()
                .len(),
            2
        );
        assert!(apply_taints(&t2, &args(&["zz-"]), false).is_err());
        assert!(apply_taints(&t2, &args(&["bad"]), false).is_err());
    }

    #[test]
    fn eviction_follows_kubevirt() {
        let v = |s: Option<&str>| json!({"spec": {"evictionStrategy": s}});
        assert_eq!(eviction_for(&v(Some("LiveMigrate"))), Eviction::Migrate);
        assert_eq!(
            eviction_for(&v(Some("LiveMigrateIfPossible"))),
            Eviction::Migrate
        );
        assert_eq!(eviction_for(&v(Some("External"))), Eviction::Refuse);
        assert_eq!(eviction_for(&v(Some("None"))), Eviction::Stop);
        assert_eq!(eviction_for(&v(None)), Eviction::Stop);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("x").is_err());
    }
}
