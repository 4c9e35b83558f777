//! `krvirt create`: objects from manifest files (`-f`), or a VM from a
//! template version:
//!
//! ```text
//! krvirt create vm NAME --from TEMPLATE[:VERSION] [-p KEY=VALUE]... [--clone linked|full]
//! ```
//!
//! The work is server-side: the verb creates a `krvirt.io/v1`
//! TemplateInstance named NAME (anyone can POST one over REST) and waits
//! for the template controller to report `Ready` (the VM and its disks
//! exist) or `InstantiateFailure` (its message names the parameter or
//! field at fault; the failed instance is removed so the command can be
//! run again).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use krvirt_api::template::{CONDITION_FAILED, CONDITION_READY};
use serde_json::{Value, json};

use super::wait::parse_duration;
use super::{Ctx, apply, out, required_kind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CloneMode {
    /// A qcow2 overlay on the template's image (constant time)
    Linked,
    /// An independent copy
    Full,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// `vm NAME` (with --from); nothing with -f
    #[arg(value_name = "vm NAME")]
    pub args: Vec<String>,
    /// Manifest file, directory, or `-` for stdin (repeatable)
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub files: Vec<String>,
    /// The Template (and version) to make the VM from
    #[arg(long, value_name = "TEMPLATE[:VERSION]")]
    pub from: Option<String>,
    /// A template parameter (repeatable)
    #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// How disks naming an image or a Volume are copied (default: linked)
    #[arg(long, value_enum)]
    pub clone: Option<CloneMode>,
    /// How long to wait for the VM to be created
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// `-p KEY=VALUE` list to a map; repeated keys are refused.
pub fn parse_params(params: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in params {
        let Some((k, v)) = p.split_once('=') else {
            bail!("-p {p:?}: expected KEY=VALUE");
        };
        if k.is_empty() {
            bail!("-p {p:?}: the parameter name is empty");
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            bail!("-p {k}: given twice");
        }
    }
    Ok(out)
}

/// `TEMPLATE[:VERSION]`.
pub fn parse_from(from: &str) -> Result<(String, Option<String>)> {
    match from.split_once(':') {
        Some(("", _)) => bail!("--from {from:?}: the template name is empty"),
        Some((_, "")) => bail!("--from {from:?}: the version after ':' is empty"),
        Some((t, v)) => Ok((t.to_string(), Some(v.to_string()))),
        None if from.is_empty() => bail!("--from: the template name is empty"),
        None => Ok((from.to_string(), None)),
    }
}

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj.pointer("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c["type"] == type_ && c["status"] == "True")
}

pub async fn create(ctx: &Ctx, args: CreateArgs) -> Result<ExitCode> {
    if args.args.is_empty() {
        if args.files.is_empty() {
            bail!("nothing to create: give -f FILE, or `vm NAME --from TEMPLATE[:VERSION]`");
        }
        if args.from.is_some() || !args.params.is_empty() || args.clone.is_some() {
            bail!("--from, -p and --clone go with `create vm NAME`, not with -f");
        }
        return apply::create(ctx, apply::CreateArgs { files: args.files }).await;
    }
    let name = match args.args.as_slice() {
        [kind, name] if matches!(kind.as_str(), "vm" | "vms" | "virtualmachine") => name.clone(),
        _ => bail!(
            "usage: krvirt create vm NAME --from TEMPLATE[:VERSION] [-p KEY=VALUE]... [--clone linked|full]"
        ),
    };
    if !args.files.is_empty() {
        bail!("-f cannot be combined with `create vm NAME`");
    }
    let Some(from) = args.from.as_deref() else {
        bail!("create vm {name}: --from TEMPLATE[:VERSION] is required");
    };
    let (template, version) = parse_from(from)?;
    let params = parse_params(&args.params)?;
    let kind = required_kind("templateinstances")?;
    let mut spec = json!({"template": template, "parameters": params});
    if let Some(v) = &version {
        spec["version"] = json!(v);
    }
    if let Some(c) = args.clone {
        spec["clone"] = json!(match c {
            CloneMode::Linked => "linked",
            CloneMode::Full => "full",
        });
    }
    let body = json!({
        "apiVersion": kind.api_version(),
        "kind": kind.kind,
        "metadata": {"name": name, "namespace": ctx.ns.name},
        "spec": spec,
    });
    ctx.client.create(kind, &ctx.ns.name, &body).await?;
    let deadline = tokio::time::Instant::now() + args.timeout;
    loop {
        let obj = ctx.client.get(kind, &ctx.ns.name, &name).await?;
        if condition(&obj, CONDITION_READY).is_some() {
            let st = &obj["status"];
            let mut msg = format!(
                "virtualmachine/{name} created from template {template} version {}\n",
                st["version"].as_str().unwrap_or("?")
            );
            for v in st["volumes"].as_array().into_iter().flatten() {
                msg.push_str(&format!(
                    "volume/{} created ({} clone)\n",
                    v.as_str().unwrap_or_default(),
                    match args.clone {
                        Some(CloneMode::Full) => "full",
                        _ => "linked",
                    }
                ));
            }
            if let Some(all) = st["parameters"].as_object() {
                for (k, v) in all {
                    if !params.contains_key(k) {
                        msg.push_str(&format!(
                            "parameter {k}={}\n",
                            v.as_str().unwrap_or_default()
                        ));
                    }
                }
            }
            out(&msg)?;
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(c) = condition(&obj, CONDITION_FAILED) {
            let why = c["message"].as_str().unwrap_or("failed").to_string();
            // Leave nothing behind: the same command can be run again.
            let _ = ctx.client.delete(kind, &ctx.ns.name, &name).await;
            bail!("cannot create vm {name} from template {from}: {why}");
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "timed out after {:?} waiting for templateinstance/{name} (is the template controller running?)",
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_and_from() {
        let p = parse_params(&["A=1".into(), "B=x=y".into(), "C=".into()]).expect("valid");
        assert_eq!(p["B"], "x=y");
        assert_eq!(p["C"], "");
        assert!(parse_params(&["A".into()]).is_err());
        assert!(parse_params(&["=1".into()]).is_err());
        assert!(parse_params(&["A=1".into(), "A=2".into()]).is_err());
        assert_eq!(parse_from("web").expect("ok"), ("web".to_string(), None));
        assert_eq!(
            parse_from("web:2").expect("ok"),
            ("web".to_string(), Some("2".to_string()))
        );
        assert!(parse_from("web:").is_err());
        assert!(parse_from(":2").is_err());
    }
}
