//! `describe`: key fields, conditions, phase transitions, events.

use std::process::ExitCode;

use anyhow::{Result, bail};
use chrono::{DateTime, Utc};
use clap::Args;
use serde_json::Value;

use super::table::{self, Layout, age, condition_status, run_strategy, text, vmi_ip};
use super::{Ctx, out, parse_targets, required_kind};

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// KIND NAME or KIND/NAME
    #[arg(value_name = "KIND NAME", required = true)]
    pub args: Vec<String>,
}

/// Width of the `Key:` column.
const KEY_WIDTH: usize = 20;

struct Doc {
    out: String,
}

impl Doc {
    fn field(&mut self, indent: usize, key: &str, value: &str) {
        let pad = " ".repeat(indent);
        let label = format!("{key}:");
        let width = KEY_WIDTH.saturating_sub(indent);
        if value.is_empty() {
            self.out.push_str(&format!("{pad}{label}\n"));
        } else {
            self.out.push_str(&format!("{pad}{label:<width$}{value}\n"));
        }
    }

    /// `Labels:` with one `k=v` per line, aligned.
    fn map(&mut self, key: &str, v: Option<&Value>) {
        let entries: Vec<String> = v
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => format!("{k}={s}"),
                        other => format!("{k}={other}"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        if entries.is_empty() {
            self.field(0, key, "<none>");
            return;
        }
        for (i, e) in entries.iter().enumerate() {
            if i == 0 {
                self.field(0, key, e);
            } else {
                self.out.push_str(&format!("{:KEY_WIDTH$}{e}\n", ""));
            }
        }
    }

    fn section_table(&mut self, title: &str, header: &[&str], rows: Vec<Vec<String>>) {
        if rows.is_empty() {
            self.field(0, title, "<none>");
            return;
        }
        self.out.push_str(&format!("{title}:\n"));
        let h: Vec<String> = header.iter().map(|s| s.to_string()).collect();
        for line in table::render(&h, &rows, None).lines() {
            self.out.push_str(&format!("  {line}\n"));
        }
    }
}

fn timestamp_with_age(ts: Option<String>, now: DateTime<Utc>) -> String {
    match ts {
        Some(t) => format!("{t} ({} ago)", age(Some(&t), now)),
        None => "<unknown>".into(),
    }
}

fn conditions_rows(obj: &Value, now: DateTime<Utc>) -> Vec<Vec<String>> {
    obj.pointer("/status/conditions")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let t = text(c, "/lastTransitionTime");
                    vec![
                        text(c, "/type").unwrap_or_default(),
                        text(c, "/status").unwrap_or_default(),
                        text(c, "/reason").unwrap_or_default(),
                        text(c, "/message").unwrap_or_default(),
                        t.as_deref()
                            .map(|t| format!("{} ago", age(Some(t), now)))
                            .unwrap_or_default(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default()
}

fn transitions_rows(vmi: &Value) -> Vec<Vec<String>> {
    vmi.pointer("/status/phaseTransitionTimestamps")
        .and_then(Value::as_array)
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    vec![
                        text(t, "/phase").unwrap_or_default(),
                        text(t, "/phaseTransitionTimestamp").unwrap_or_default(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default()
}

fn quantity(v: &Value, pointers: &[&str]) -> Option<String> {
    pointers.iter().find_map(|p| text(v, p))
}

/// CPU and memory of a VMI spec (`domain`).
fn domain_lines(d: &mut Doc, indent: usize, spec: &Value) {
    let cores = text(spec, "/domain/cpu/cores");
    let sockets = text(spec, "/domain/cpu/sockets");
    let threads = text(spec, "/domain/cpu/threads");
    if cores.is_some() || sockets.is_some() || threads.is_some() {
        let one = || "1".to_string();
        d.field(
            indent,
            "CPU",
            &format!(
                "{} socket(s) x {} core(s) x {} thread(s)",
                sockets.unwrap_or_else(one),
                cores.unwrap_or_else(one),
                threads.unwrap_or_else(one)
            ),
        );
    }
    if let Some(m) = quantity(
        spec,
        &["/domain/memory/guest", "/domain/resources/requests/memory"],
    ) {
        d.field(indent, "Memory", &m);
    }
}

/// The text `describe` prints for one object (`vmi`: a VM's instance).
/// [`render_with_events`] without events.
#[cfg(test)]
pub fn render(
    kind: &krvirt_api::KindInfo,
    obj: &Value,
    vmi: Option<&Value>,
    now: DateTime<Utc>,
) -> String {
    render_with_events(kind, obj, vmi, &[], now)
}

/// The `describe` text of `obj` (and its VMI for a VM), with the events
/// about them (oldest first) in the Events section.
pub fn render_with_events(
    kind: &krvirt_api::KindInfo,
    obj: &Value,
    vmi: Option<&Value>,
    events: &[Value],
    now: DateTime<Utc>,
) -> String {
    let mut d = Doc { out: String::new() };
    d.field(0, "Name", &table::name(obj));
    if kind.namespaced {
        d.field(0, "Namespace", &table::namespace(obj));
    }
    d.map("Labels", obj.pointer("/metadata/labels"));
    let annotations = obj.pointer("/metadata/annotations").map(|a| {
        let mut a = a.clone();
        if let Some(m) = a.as_object_mut() {
            m.remove(super::LAST_APPLIED);
        }
        a
    });
    d.map("Annotations", annotations.as_ref());
    d.field(
        0,
        "API Version",
        &text(obj, "/apiVersion").unwrap_or_else(|| kind.api_version()),
    );
    d.field(
        0,
        "Kind",
        &text(obj, "/kind").unwrap_or_else(|| kind.kind.to_string()),
    );
    d.field(
        0,
        "Created",
        &timestamp_with_age(text(obj, "/metadata/creationTimestamp"), now),
    );
    if let Some(t) = text(obj, "/metadata/deletionTimestamp") {
        d.field(0, "Deleting Since", &timestamp_with_age(Some(t), now));
    }
    d.field(0, "UID", &text(obj, "/metadata/uid").unwrap_or_default());
    d.field(
        0,
        "Resource Version",
        &text(obj, "/metadata/resourceVersion").unwrap_or_default(),
    );
    let layout = Layout::of(kind);
    match layout {
        Layout::Vm => {
            d.field(0, "Run Strategy", &run_strategy(obj));
            d.field(
                0,
                "Status",
                &text(obj, "/status/printableStatus").unwrap_or_else(|| "<none>".into()),
            );
            d.field(
                0,
                "Ready",
                &condition_status(obj, "Ready").unwrap_or_else(|| "False".into()),
            );
            if let Some(tpl) = obj.pointer("/spec/template/spec") {
                domain_lines(&mut d, 0, tpl);
            }
            match vmi {
                Some(i) => {
                    d.out.push_str("Instance:\n");
                    d.field(
                        2,
                        "Phase",
                        &text(i, "/status/phase").unwrap_or_else(|| "<none>".into()),
                    );
                    d.field(
                        2,
                        "Node",
                        &text(i, "/status/nodeName").unwrap_or_else(|| "<none>".into()),
                    );
                    d.field(2, "IP", &vmi_ip(i).unwrap_or_else(|| "<none>".into()));
                    d.field(
                        2,
                        "Created",
                        &timestamp_with_age(text(i, "/metadata/creationTimestamp"), now),
                    );
                }
                None => d.field(0, "Instance", "<none>"),
            }
        }
        Layout::Vmi => {
            d.field(
                0,
                "Phase",
                &text(obj, "/status/phase").unwrap_or_else(|| "<none>".into()),
            );
            d.field(
                0,
                "Node",
                &text(obj, "/status/nodeName").unwrap_or_else(|| "<none>".into()),
            );
            d.field(0, "IP", &vmi_ip(obj).unwrap_or_else(|| "<none>".into()));
            if let Some(spec) = obj.get("spec") {
                domain_lines(&mut d, 0, spec);
            }
        }
        Layout::Host => {
            d.field(0, "Status", &table::host_status(obj));
            let accel = match (
                text(obj, "/status/accelerator/type"),
                text(obj, "/status/accelerator/reason"),
            ) {
                (Some(t), Some(r)) => format!("{t} ({r})"),
                (Some(t), None) => t,
                _ => "<none>".into(),
            };
            d.field(0, "Accelerator", &accel);
            for (label, p) in [
                ("Capacity", "/status/capacity"),
                ("Allocatable", "/status/allocatable"),
            ] {
                if obj.pointer(p).is_some() {
                    d.out.push_str(&format!("{label}:\n"));
                    d.field(
                        2,
                        "CPU",
                        &text(obj, &format!("{p}/cpu")).unwrap_or_else(|| "<none>".into()),
                    );
                    d.field(
                        2,
                        "Memory",
                        &text(obj, &format!("{p}/memory")).unwrap_or_else(|| "<none>".into()),
                    );
                }
            }
            for (label, p) in [
                ("QEMU", "/status/qemuVersion"),
                ("Agent", "/status/agentVersion"),
                ("Heartbeat", "/status/heartbeatTime"),
            ] {
                if let Some(v) = text(obj, p) {
                    d.field(0, label, &v);
                }
            }
        }
        Layout::Generic => {
            for (label, key) in [("Spec", "spec"), ("Status", "status")] {
                if let Some(v) = obj.get(key)
                    && !v.is_null()
                {
                    d.out.push_str(&format!("{label}:\n"));
                    let y = super::output::yaml(v).unwrap_or_else(|_| v.to_string());
                    for line in y.lines() {
                        d.out.push_str(&format!("  {line}\n"));
                    }
                }
            }
        }
    }
    let headers = ["TYPE", "STATUS", "REASON", "MESSAGE", "LAST TRANSITION"];
    d.section_table("Conditions", &headers, conditions_rows(obj, now));
    let transitions = match layout {
        Layout::Vmi => Some(transitions_rows(obj)),
        Layout::Vm => Some(vmi.map(transitions_rows).unwrap_or_default()),
        _ => None,
    };
    if let Some(rows) = transitions {
        d.section_table("Phase Transitions", &["PHASE", "TIME"], rows);
    }
    let rows = events
        .iter()
        .map(|e| {
            let s = |p: &str| {
                e.pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            vec![
                s("/type"),
                s("/reason"),
                super::events::seen(e, now),
                super::events::from(e),
                s("/message"),
            ]
        })
        .collect();
    d.section_table(
        "Events",
        &["TYPE", "REASON", "AGE", "FROM", "MESSAGE"],
        rows,
    );
    d.out
}

pub async fn describe(ctx: &Ctx, args: DescribeArgs) -> Result<ExitCode> {
    let targets = parse_targets(&args.args)?;
    let mut first = true;
    for (kind, names) in targets {
        if names.is_empty() {
            bail!("name the {} to describe", kind.singular);
        }
        for name in names {
            let obj = ctx.client.get(kind, &ctx.ns.name, &name).await?;
            let vmi = if Layout::of(kind) == Layout::Vm {
                let vk = required_kind("virtualmachineinstances")?;
                match ctx.client.get(vk, &ctx.ns.name, &name).await {
                    Ok(v) => Some(v),
                    Err(e) if e.is_not_found() => None,
                    Err(e) => return Err(e.into()),
                }
            } else {
                None
            };
            if !first {
                out("\n\n")?;
            }
            first = false;
            let about: &[&str] = match Layout::of(kind) {
                Layout::Vm => &["VirtualMachine", "VirtualMachineInstance"],
                _ => &[kind.kind],
            };
            let events = super::events::events_for(&ctx.client, &ctx.ns.name, about, &name)
                .await
                .unwrap_or_default();
            out(&render_with_events(
                kind,
                &obj,
                vmi.as_ref(),
                &events,
                Utc::now(),
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn describes_a_vm_with_its_instance() {
        let now = table::parse_time("2026-05-01T12:00:00Z").expect("now");
        let vm = json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "vm-cirros", "namespace": "default", "uid": "u-1", "resourceVersion": "12",
                         "creationTimestamp": "2026-05-01T11:00:00Z",
                         "labels": {"kubevirt.io/vm": "vm-cirros", "tier": "web"},
                         "annotations": {super::super::LAST_APPLIED: "{}"}},
            "spec": {"runStrategy": "Always", "template": {"spec": {"domain": {"cpu": {"cores": 2}, "memory": {"guest": "128Mi"}}}}},
            "status": {"printableStatus": "Running",
                       "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-05-01T11:59:00Z"}]},
        });
        let vmi = json!({
            "metadata": {"creationTimestamp": "2026-05-01T11:58:00Z"},
            "status": {"phase": "Running", "nodeName": "host-1", "interfaces": [{"ipAddress": "10.0.2.15"}],
                       "phaseTransitionTimestamps": [
                           {"phase": "Pending", "phaseTransitionTimestamp": "2026-05-01T11:58:00Z"},
                           {"phase": "Running", "phaseTransitionTimestamp": "2026-05-01T11:58:30Z"}]},
        });
        let kind = krvirt_api::find_kind("vm").expect("vm");
        assert_eq!(
            render(kind, &vm, Some(&vmi), now),
            concat!(
                "Name:               vm-cirros\n",
                "Namespace:          default\n",
                "Labels:             kubevirt.io/vm=vm-cirros\n",
                "                    tier=web\n",
                "Annotations:        <none>\n",
                "API Version:        kubevirt.io/v1\n",
                "Kind:               VirtualMachine\n",
                "Created:            2026-05-01T11:00:00Z (60m ago)\n",
                "UID:                u-1\n",
                "Resource Version:   12\n",
                "Run Strategy:       Always\n",
                "Status:             Running\n",
                "Ready:              True\n",
                "CPU:                1 socket(s) x 2 core(s) x 1 thread(s)\n",
                "Memory:             128Mi\n",
                "Instance:\n",
                "  Phase:            Running\n",
                "  Node:             host-1\n",
                "  IP:               10.0.2.15\n",
                "  Created:          2026-05-01T11:58:00Z (2m ago)\n",
                "Conditions:\n",
                "  TYPE    STATUS   REASON   MESSAGE   LAST TRANSITION\n",
                "  Ready   True                        60s ago\n",
                "Phase Transitions:\n",
                "  PHASE     TIME\n",
                "  Pending   2026-05-01T11:58:00Z\n",
                "  Running   2026-05-01T11:58:30Z\n",
                "Events:             <none>\n",
            )
        );
    }

    #[test]
    fn describes_a_stopped_vm_and_a_generic_object() {
        let now = table::parse_time("2026-05-01T12:00:00Z").expect("now");
        let vm =
            json!({"metadata": {"name": "off", "namespace": "ns1"}, "spec": {"running": false}});
        let kind = krvirt_api::find_kind("vm").expect("vm");
        let text = render(kind, &vm, None, now);
        assert!(text.contains("Run Strategy:       Halted\n"), "{text}");
        assert!(text.contains("Instance:           <none>\n"), "{text}");
        assert!(text.contains("Conditions:         <none>\n"), "{text}");
        assert!(text.contains("Phase Transitions:  <none>\n"), "{text}");
        assert!(text.ends_with("Events:             <none>\n"), "{text}");
        let other = krvirt_api::KindInfo {
            kind: "Widget",
            group: "example.io",
            ..*kind
        };
        let w = json!({"metadata": {"name": "w"}, "spec": {"size": 3}});
        let text = render(&other, &w, None, now);
        assert!(text.contains("Spec:\n  size: 3\n"), "{text}");
    }

    #[test]
    fn events_section_lists_events_with_counts() {
        let kind = krvirt_api::find_kind("vm").unwrap();
        let vm = serde_json::json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "web", "namespace": "default"}, "spec": {}});
        let now = Utc::now();
        let ts = krvirt_api::meta::to_rfc3339(now - chrono::Duration::seconds(30));
        let ev = serde_json::json!({"type": "Warning", "reason": "ErrImagePull",
            "message": "image not found", "count": 3, "firstTimestamp": ts, "lastTimestamp": ts,
            "source": {"component": "krvirt-agent", "host": "h1"}});
        let text = render_with_events(kind, &vm, None, &[ev], now);
        let section = text.split("Events:\n").nth(1).expect("an Events section");
        assert!(section.contains("ErrImagePull"), "{text}");
        assert!(section.contains("(x3 over"), "{text}");
        assert!(section.contains("krvirt-agent, h1"), "{text}");
        assert!(section.contains("image not found"), "{text}");
        assert!(render(kind, &vm, None, now).contains("Events:             <none>"));
    }
}
