//! `wait`: block until an object reaches a state, following a watch.

use std::fmt;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use clap::Args;
use futures::StreamExt;
use krvirt_client::{ListParams, ResumeOptions, WatchEventKind};
use serde_json::Value;

use super::table::{condition, resource_name, text};
use super::{Ctx, out, required_kind, resolve_kind};

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// VirtualMachine name, or KIND/NAME (e.g. vmi/my-vm)
    pub target: String,
    /// Running, Stopped… (printableStatus), phase=X, condition=Ready[=False],
    /// delete, or jsonpath={.status.x}=VALUE
    #[arg(long = "for", value_name = "CONDITION")]
    pub condition: String,
    /// How long to wait: 30s, 5m, 1h30m, 500ms (0: check once)
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Parse a duration like Go's: `30s`, `1m30s`, `500ms`, `2h`; a bare
/// number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{s:?}: a number needs a unit (ms, s, m, h)"))?;
        if digits == 0 {
            return Err(format!("{s:?} is not a duration (e.g. 30s, 5m, 1h30m)"));
        }
        let n: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 5m, 1h30m)"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            u => return Err(format!("{s:?}: unknown unit {u:?} (use ms, s, m or h)")),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(n * unit).map_err(|e| format!("{s:?}: {e}"))?;
    }
    Ok(total)
}

/// `60s`, `1500ms`.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// One step of a `jsonpath={...}` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathStep {
    Key(String),
    Index(usize),
}

/// What `--for` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitCondition {
    /// `Running`, `Stopped`…: `status.printableStatus` (or `status.phase`
    /// for kinds without one), case-insensitive.
    PrintableStatus(String),
    /// `phase=Running`: `status.phase`.
    Phase(String),
    /// `condition=Ready` (status `True`) or `condition=Ready=False`.
    Condition { type_: String, status: String },
    /// `delete`: the object is gone.
    Delete,
    /// `jsonpath={.status.x}=VALUE`; without `=VALUE`, any non-empty value.
    JsonPath {
        expr: String,
        path: Vec<PathStep>,
        value: Option<String>,
    },
}

const FORMS: &str = "use Running/Stopped/… (printableStatus), phase=PHASE, condition=TYPE[=True|False], delete, or jsonpath={.path}=VALUE";

fn capitalize(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut c = lower.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

fn parse_path(expr: &str) -> Result<Vec<PathStep>> {
    let inner = expr
        .strip_prefix('{')
        .and_then(|e| e.strip_suffix('}'))
        .ok_or_else(|| {
            anyhow!("jsonpath {expr:?} must be wrapped in braces, e.g. {{.status.phase}}")
        })?;
    let inner = inner.strip_prefix('.').unwrap_or(inner);
    let mut steps = Vec::new();
    for part in inner.split('.') {
        if part.is_empty() {
            bail!("jsonpath {expr:?} has an empty step");
        }
        let (key, mut idx) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            steps.push(PathStep::Key(key.to_string()));
        }
        while !idx.is_empty() {
            let close = idx
                .find(']')
                .ok_or_else(|| anyhow!("jsonpath {expr:?}: unclosed ["))?;
            let n: usize = idx[1..close]
                .parse()
                .map_err(|_| anyhow!("jsonpath {expr:?}: only numeric indexes are supported"))?;
            steps.push(PathStep::Index(n));
            idx = &idx[close + 1..];
        }
    }
    Ok(steps)
}

impl WaitCondition {
    pub fn parse(s: &str) -> Result<WaitCondition> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("delete") || s.eq_ignore_ascii_case("deleted") {
            return Ok(WaitCondition::Delete);
        }
        if let Some(rest) = s.strip_prefix("condition=") {
            let (type_, status) = match rest.split_once('=') {
                Some((t, st)) => (t, capitalize(st)),
                None => (rest, "True".to_string()),
            };
            if type_.is_empty() {
                bail!("--for={s}: name a condition type, e.g. condition=Ready");
            }
            if !matches!(status.as_str(), "True" | "False" | "Unknown") {
                bail!("--for={s}: a condition status is True, False or Unknown");
            }
            return Ok(WaitCondition::Condition {
                type_: type_.to_string(),
                status,
            });
        }
        if let Some(rest) = s.strip_prefix("jsonpath=") {
            let rest = rest.trim_matches('\'');
            let (expr, value) = match rest.rfind("}=") {
                Some(i) => (&rest[..=i], Some(rest[i + 2..].to_string())),
                None => (rest, None),
            };
            let expr = expr.trim_matches('\'').to_string();
            let path = parse_path(&expr)?;
            return Ok(WaitCondition::JsonPath { expr, path, value });
        }
        if let Some(v) = s.strip_prefix("phase=") {
            if v.is_empty() {
                bail!("--for={s}: name a phase");
            }
            return Ok(WaitCondition::Phase(v.to_string()));
        }
        if let Some(v) = s
            .strip_prefix("printableStatus=")
            .or_else(|| s.strip_prefix("status="))
        {
            if v.is_empty() {
                bail!("--for={s}: name a status");
            }
            return Ok(WaitCondition::PrintableStatus(v.to_string()));
        }
        if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Ok(WaitCondition::PrintableStatus(s.to_string()));
        }
        bail!("--for={s} is not understood; {FORMS}")
    }

    fn lookup<'a>(obj: &'a Value, path: &[PathStep]) -> Option<&'a Value> {
        path.iter().try_fold(obj, |v, step| match step {
            PathStep::Key(k) => v.get(k),
            PathStep::Index(i) => v.get(*i),
        })
    }

    fn scalar(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        }
    }

    /// The value the condition looks at, for messages (`None`: absent).
    pub fn current(&self, obj: Option<&Value>) -> Option<String> {
        let obj = obj?;
        match self {
            WaitCondition::PrintableStatus(_) => {
                text(obj, "/status/printableStatus").or_else(|| text(obj, "/status/phase"))
            }
            WaitCondition::Phase(_) => text(obj, "/status/phase"),
            WaitCondition::Condition { type_, .. } => condition_ci(obj, type_)
                .and_then(|c| text(c, "/status"))
                .map(|s| format!("{type_}={s}")),
            WaitCondition::Delete => Some("exists".into()),
            WaitCondition::JsonPath { path, .. } => Self::lookup(obj, path).map(Self::scalar),
        }
    }

    /// Is the condition met? `obj`: the object, `None` when it does not exist.
    pub fn is_met(&self, obj: Option<&Value>) -> bool {
        match self {
            WaitCondition::Delete => obj.is_none(),
            WaitCondition::PrintableStatus(want) | WaitCondition::Phase(want) => self
                .current(obj)
                .is_some_and(|v| v.eq_ignore_ascii_case(want)),
            WaitCondition::Condition { type_, status } => obj
                .and_then(|o| condition_ci(o, type_))
                .and_then(|c| text(c, "/status"))
                .is_some_and(|s| s.eq_ignore_ascii_case(status)),
            WaitCondition::JsonPath { value, .. } => match (self.current(obj), value) {
                (Some(v), Some(want)) => &v == want,
                (Some(v), None) => !v.is_empty(),
                (None, _) => false,
            },
        }
    }
}

fn condition_ci<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    condition(obj, type_).or_else(|| {
        obj.pointer("/status/conditions")?
            .as_array()?
            .iter()
            .find(|c| {
                c.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.eq_ignore_ascii_case(type_))
            })
    })
}

impl fmt::Display for WaitCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitCondition::PrintableStatus(s) => write!(f, "to be {s}"),
            WaitCondition::Phase(p) => write!(f, "to reach phase {p}"),
            WaitCondition::Condition { type_, status } => {
                write!(f, "to have condition {type_}={status}")
            }
            WaitCondition::Delete => write!(f, "to be deleted"),
            WaitCondition::JsonPath { expr, value, .. } => match value {
                Some(v) => write!(f, "to have {expr}={v}"),
                None => write!(f, "to have {expr} set"),
            },
        }
    }
}

/// The timeout message.
pub fn timeout_message(
    resource: &str,
    timeout: Duration,
    cond: &WaitCondition,
    last: Option<&Value>,
) -> String {
    let now = match (last, cond.current(last)) {
        (None, _) => "it does not exist".to_string(),
        (Some(_), None) => "it has none yet".to_string(),
        (Some(_), Some(_)) if *cond == WaitCondition::Delete => "it still exists".to_string(),
        (Some(_), Some(v)) => format!("it is {v}"),
    };
    format!(
        "timed out after {} waiting for {resource} {cond} ({now})",
        format_duration(timeout)
    )
}

fn name_of(v: &Value) -> Option<&str> {
    v.pointer("/metadata/name").and_then(Value::as_str)
}

pub async fn wait(ctx: &Ctx, a: WaitArgs) -> Result<ExitCode> {
    let cond = WaitCondition::parse(&a.condition)?;
    let (kind, name) = match a.target.split_once('/') {
        Some((k, n)) => (resolve_kind(k)?, n.to_string()),
        None => (required_kind("virtualmachines")?, a.target.clone()),
    };
    if name.is_empty() {
        bail!("name the object to wait for");
    }
    let resource = format!("{}/{name}", resource_name(kind));
    let deadline = tokio::time::Instant::now() + a.timeout;
    let params = ListParams::namespaced(ctx.ns.name.clone()).named(&name);

    let list = if a.timeout.is_zero() {
        // --timeout=0: look once.
        ctx.client.list(kind, &params).await?
    } else {
        tokio::time::timeout_at(deadline, ctx.client.list(kind, &params))
            .await
            .map_err(|_| {
                anyhow!(
                    "timed out after {} reading {resource}",
                    format_duration(a.timeout)
                )
            })??
    };
    let mut last = list
        .items
        .into_iter()
        .find(|o| name_of(o) == Some(name.as_str()));
    if !cond.is_met(last.as_ref()) && a.timeout.is_zero() {
        bail!(timeout_message(&resource, a.timeout, &cond, last.as_ref()));
    }
    if !cond.is_met(last.as_ref()) {
        let resume = ResumeOptions {
            initial_list: false,
            ..Default::default()
        };
        let mut stream =
            ctx.client
                .watch_resumable(kind, &params.clone().at(list.resource_version), resume);
        loop {
            let ev = match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => bail!(timeout_message(&resource, a.timeout, &cond, last.as_ref())),
                Ok(None) => bail!("the watch of {resource} ended before it was {cond}"),
                Ok(Some(ev)) => ev?,
            };
            if name_of(&ev.object) != Some(name.as_str()) {
                continue;
            }
            match ev.kind {
                WatchEventKind::Added | WatchEventKind::Modified => last = Some(ev.object),
                WatchEventKind::Deleted => last = None,
                WatchEventKind::Error | WatchEventKind::Bookmark => continue,
            }
            if cond.is_met(last.as_ref()) {
                break;
            }
        }
    }
    out(&format!("{resource} condition met\n"))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations() {
        let ok = |s: &str| parse_duration(s).expect(s);
        assert_eq!(ok("60s"), Duration::from_secs(60));
        assert_eq!(ok("60"), Duration::from_secs(60));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("5m"), Duration::from_secs(300));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        for bad in ["", "s", "5x", "1d", "abc", "5m-"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_duration("1d").unwrap_err(),
            "\"1d\": unknown unit \"d\" (use ms, s, m or h)"
        );
        assert_eq!(format_duration(Duration::from_secs(60)), "60s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn condition_forms_parse() {
        let p = |s: &str| WaitCondition::parse(s).expect(s);
        assert_eq!(
            p("Running"),
            WaitCondition::PrintableStatus("Running".into())
        );
        assert_eq!(
            p("printableStatus=Stopped"),
            WaitCondition::PrintableStatus("Stopped".into())
        );
        assert_eq!(
            p("phase=Scheduled"),
            WaitCondition::Phase("Scheduled".into())
        );
        assert_eq!(
            p("condition=Ready"),
            WaitCondition::Condition {
                type_: "Ready".into(),
                status: "True".into()
            }
        );
        assert_eq!(
            p("condition=Paused=false"),
            WaitCondition::Condition {
                type_: "Paused".into(),
                status: "False".into()
            }
        );
        assert_eq!(p("delete"), WaitCondition::Delete);
        assert_eq!(
            p("jsonpath={.status.interfaces[0].ipAddress}=10.0.2.15"),
            WaitCondition::JsonPath {
                expr: "{.status.interfaces[0].ipAddress}".into(),
                path: vec![
                    PathStep::Key("status".into()),
                    PathStep::Key("interfaces".into()),
                    PathStep::Index(0),
                    PathStep::Key("ipAddress".into()),
                ],
                value: Some("10.0.2.15".into()),
            }
        );
        assert_eq!(
            p("jsonpath='{.status.ready}'"),
            WaitCondition::JsonPath {
                expr: "{.status.ready}".into(),
                path: vec![
                    PathStep::Key("status".into()),
                    PathStep::Key("ready".into())
                ],
                value: None
            }
        );
        for bad in [
            "condition=",
            "condition=Ready=maybe",
            "jsonpath=.status",
            "jsonpath={.a[x]}",
            "phase=",
            "to be or not",
        ] {
            assert!(WaitCondition::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            WaitCondition::parse("a b").unwrap_err().to_string(),
            format!("--for=a b is not understood; {FORMS}")
        );
    }

    #[test]
    fn conditions_evaluate() {
        let vm = json!({"status": {"printableStatus": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                                   "interfaces": [{"ipAddress": "10.0.2.15"}]}});
        let vmi = json!({"status": {"phase": "Running"}});
        let p = |s: &str| WaitCondition::parse(s).expect(s);
        assert!(p("Running").is_met(Some(&vm)));
        assert!(p("running").is_met(Some(&vm)));
        assert!(!p("Stopped").is_met(Some(&vm)));
        assert!(
            p("Running").is_met(Some(&vmi)),
            "phase stands in for printableStatus"
        );
        assert!(p("condition=Ready").is_met(Some(&vm)));
        assert!(p("condition=ready").is_met(Some(&vm)));
        assert!(!p("condition=Ready=False").is_met(Some(&vm)));
        assert!(!p("condition=Paused").is_met(Some(&vm)));
        assert!(!p("condition=Ready").is_met(None));
        assert!(p("delete").is_met(None));
        assert!(!p("delete").is_met(Some(&vm)));
        assert!(p("jsonpath={.status.interfaces[0].ipAddress}=10.0.2.15").is_met(Some(&vm)));
        assert!(p("jsonpath={.status.interfaces[0].ipAddress}").is_met(Some(&vm)));
        assert!(!p("jsonpath={.status.interfaces[1].ipAddress}").is_met(Some(&vm)));
    }

    #[test]
    fn timeout_messages() {
        let vm = json!({"status": {"printableStatus": "Stopped", "conditions": [{"type": "Ready", "status": "False"}]}});
        let t = Duration::from_secs(60);
        let r = "virtualmachine.kubevirt.io/vm-cirros";
        let p = |s: &str| WaitCondition::parse(s).expect(s);
        assert_eq!(
            timeout_message(r, t, &p("Running"), Some(&vm)),
            "timed out after 60s waiting for virtualmachine.kubevirt.io/vm-cirros to be Running (it is Stopped)"
        );
        assert_eq!(
            timeout_message(r, t, &p("condition=Ready"), Some(&vm)),
            "timed out after 60s waiting for virtualmachine.kubevirt.io/vm-cirros to have condition Ready=True (it is Ready=False)"
        );
        assert_eq!(
            timeout_message(r, t, &p("condition=Paused"), Some(&vm)),
            "timed out after 60s waiting for virtualmachine.kubevirt.io/vm-cirros to have condition Paused=True (it has none yet)"
        );
        assert_eq!(
            timeout_message(r, t, &p("delete"), Some(&vm)),
            "timed out after 60s waiting for virtualmachine.kubevirt.io/vm-cirros to be deleted (it still exists)"
        );
        assert_eq!(
            timeout_message(r, t, &p("Running"), None),
            "timed out after 60s waiting for virtualmachine.kubevirt.io/vm-cirros to be Running (it does not exist)"
        );
    }
}
