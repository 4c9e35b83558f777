//! kubectl-style tables: borderless, three spaces between columns, AGE
//! in kubectl's short format, and the per-kind columns.

use chrono::{DateTime, Utc};
use comfy_table::{ColumnConstraint, ContentArrangement, Table, Width, presets};
use krvirt_api::KindInfo;
use serde_json::Value;

/// Gap between columns, as kubectl's tabwriter (padding 3).
const GAP: u16 = 3;

/// kubectl's human duration: `5s`, `3m2s`, `15m`, `4h`, `5h30m`, `2d`,
/// `3d4h`, `400d`, `2y30d`, `10y`.
pub fn format_age(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    let s = seconds;
    if s < 120 {
        return format!("{s}s");
    }
    let minutes = s / 60;
    if minutes < 10 {
        return match s % 60 {
            0 => format!("{minutes}m"),
            rest => format!("{minutes}m{rest}s"),
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        return match minutes % 60 {
            0 => format!("{hours}h"),
            rest => format!("{hours}h{rest}m"),
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        return match hours % 24 {
            0 => format!("{days}d"),
            rest => format!("{days}d{rest}h"),
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if hours < 24 * 365 * 8 {
        return match days % 365 {
            0 => format!("{years}y"),
            rest => format!("{years}y{rest}d"),
        };
    }
    format!("{years}y")
}

/// Parse an RFC 3339 timestamp.
pub fn parse_time(ts: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(ts)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// AGE of an RFC 3339 timestamp at `now`; `<unknown>` without one.
pub fn age(ts: Option<&str>, now: DateTime<Utc>) -> String {
    match ts.and_then(parse_time) {
        Some(t) => format_age((now - t).num_seconds()),
        None => "<unknown>".into(),
    }
}

/// Render rows under a header, kubectl style. `min_widths`: keep columns
/// at least this wide (so rows printed one at a time by `get -w` line up
/// with the first table).
pub fn render(header: &[String], rows: &[Vec<String>], min_widths: Option<&[usize]>) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    if !header.is_empty() {
        t.set_header(header.to_vec());
    }
    for r in rows {
        t.add_row(r.clone());
    }
    let n = header
        .len()
        .max(rows.iter().map(Vec::len).max().unwrap_or(0));
    for i in 0..n {
        if let Some(col) = t.column_mut(i) {
            let pad = if i + 1 == n { 0 } else { GAP };
            col.set_padding((0, pad));
            // comfy-table's widths include the padding.
            if let Some(w) = min_widths.and_then(|m| m.get(i)) {
                let w = u16::try_from(*w).unwrap_or(u16::MAX).saturating_add(pad);
                col.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(w)));
            }
        }
    }
    let mut out = t.trim_fmt();
    out.push('\n');
    out
}

/// Content widths of each column over header and rows (for [`render`]'s
/// `min_widths`).
pub fn widths(header: &[String], rows: &[Vec<String>]) -> Vec<usize> {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            let len = c.chars().count();
            match w.get_mut(i) {
                Some(x) => *x = (*x).max(len),
                None => w.push(len),
            }
        }
    }
    w
}

// ----- field access -----

/// A string at a JSON pointer (numbers and booleans as text).
pub fn text(v: &Value, pointer: &str) -> Option<String> {
    match v.pointer(pointer)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub fn name(v: &Value) -> String {
    text(v, "/metadata/name").unwrap_or_default()
}

pub fn namespace(v: &Value) -> String {
    text(v, "/metadata/namespace").unwrap_or_default()
}

/// The `status` of condition `type_` (`True`/`False`/`Unknown`).
pub fn condition<'a>(v: &'a Value, type_: &str) -> Option<&'a Value> {
    v.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
}

pub fn condition_status(v: &Value, type_: &str) -> Option<String> {
    condition(v, type_).and_then(|c| text(c, "/status"))
}

/// First IP of a VMI (`status.interfaces[0].ipAddress`).
pub fn vmi_ip(vmi: &Value) -> Option<String> {
    vmi.pointer("/status/interfaces")?
        .as_array()?
        .iter()
        .find_map(|i| text(i, "/ipAddress"))
}

/// `spec.runStrategy`, or what `spec.running` means.
pub fn run_strategy(vm: &Value) -> String {
    if let Some(s) = text(vm, "/spec/runStrategy") {
        return s;
    }
    match vm.pointer("/spec/running").and_then(Value::as_bool) {
        Some(true) => "Always".into(),
        Some(false) => "Halted".into(),
        None => "<none>".into(),
    }
}

fn or_none(v: Option<String>) -> String {
    v.unwrap_or_else(|| "<none>".into())
}

// ----- per-kind tables -----

/// Which columns a kind gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Vm,
    Vmi,
    Host,
    Generic,
}

impl Layout {
    pub fn of(kind: &KindInfo) -> Layout {
        match (kind.group, kind.kind) {
            ("kubevirt.io", "VirtualMachine") => Layout::Vm,
            ("kubevirt.io", "VirtualMachineInstance") => Layout::Vmi,
            ("krvirt.io", "Host") => Layout::Host,
            _ => Layout::Generic,
        }
    }
}

/// Table options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableOpts {
    pub wide: bool,
    /// Add a NAMESPACE column first (`-A`).
    pub namespace_column: bool,
}

pub fn header(layout: Layout, opts: TableOpts) -> Vec<String> {
    let mut h: Vec<&str> = match layout {
        Layout::Vm => vec!["NAME", "AGE", "STATUS", "READY"],
        Layout::Vmi => vec!["NAME", "AGE", "PHASE", "IP", "NODENAME", "READY"],
        Layout::Host => vec!["NAME", "STATUS", "ACCEL", "CPU", "MEMORY", "AGE"],
        Layout::Generic => vec!["NAME", "AGE"],
    };
    if opts.wide {
        match layout {
            Layout::Vm => h.extend(["NODE", "IP", "RUNSTRATEGY"]),
            Layout::Vmi => h.extend(["LIVE-MIGRATABLE", "PAUSED"]),
            Layout::Host => h.extend(["QEMU", "ADDRESS"]),
            Layout::Generic => {}
        }
    }
    if opts.namespace_column {
        h.insert(0, "NAMESPACE");
    }
    h.into_iter().map(str::to_string).collect()
}

/// One row. `vmi`: for a VM, its VMI (same name and namespace), if any.
pub fn row(
    layout: Layout,
    obj: &Value,
    vmi: Option<&Value>,
    opts: TableOpts,
    now: DateTime<Utc>,
) -> Vec<String> {
    let created = text(obj, "/metadata/creationTimestamp");
    let age = age(created.as_deref(), now);
    let mut r = match layout {
        Layout::Vm => {
            let mut r = vec![
                name(obj),
                age,
                text(obj, "/status/printableStatus").unwrap_or_default(),
                condition_status(obj, "Ready").unwrap_or_else(|| "False".into()),
            ];
            if opts.wide {
                r.push(or_none(vmi.and_then(|i| text(i, "/status/nodeName"))));
                r.push(or_none(vmi.and_then(vmi_ip)));
                r.push(run_strategy(obj));
            }
            r
        }
        Layout::Vmi => {
            let mut r = vec![
                name(obj),
                age,
                text(obj, "/status/phase").unwrap_or_default(),
                or_none(vmi_ip(obj)),
                or_none(text(obj, "/status/nodeName")),
                condition_status(obj, "Ready").unwrap_or_else(|| "False".into()),
            ];
            if opts.wide {
                r.push(condition_status(obj, "LiveMigratable").unwrap_or_else(|| "False".into()));
                r.push(condition_status(obj, "Paused").unwrap_or_else(|| "False".into()));
            }
            r
        }
        Layout::Host => {
            let mut r = vec![
                name(obj),
                host_status(obj),
                or_none(text(obj, "/status/accelerator/type")),
                or_none(text(obj, "/status/capacity/cpu")),
                or_none(text(obj, "/status/capacity/memory")),
                age,
            ];
            if opts.wide {
                r.push(or_none(text(obj, "/status/qemuVersion")));
                r.push(or_none(
                    obj.pointer("/status/addresses")
                        .and_then(Value::as_array)
                        .and_then(|a| a.iter().find_map(|x| text(x, "/address"))),
                ));
            }
            r
        }
        Layout::Generic => vec![name(obj), age],
    };
    if opts.namespace_column {
        r.insert(0, namespace(obj));
    }
    r
}

/// `Ready`, `NotReady` or `Unknown`, plus `,SchedulingDisabled` when cordoned.
pub fn host_status(host: &Value) -> String {
    let mut s = match condition_status(host, "Ready").as_deref() {
        Some("True") => "Ready".to_string(),
        Some("False") => "NotReady".to_string(),
        _ => "Unknown".to_string(),
    };
    if host.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        s.push_str(",SchedulingDisabled");
    }
    s
}

/// `virtualmachine.kubevirt.io` (kubectl's resource name: lower-case kind
/// and group).
pub fn resource_name(kind: &KindInfo) -> String {
    let k = kind.kind.to_ascii_lowercase();
    if kind.group.is_empty() {
        k
    } else {
        format!("{k}.{}", kind.group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        parse_time("2026-05-01T12:00:00Z").expect("time")
    }

    #[test]
    fn ages_follow_kubectl() {
        let cases = [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (5, "5s"),
            (119, "119s"),
            (120, "2m"),
            (182, "3m2s"),
            (599, "9m59s"),
            (600, "10m"),
            (10_799, "179m"),
            (3 * 3600, "3h"),
            (4 * 3600 + 59, "4h"),
            (5 * 3600 + 30 * 60, "5h30m"),
            (8 * 3600, "8h"),
            (47 * 3600 + 3599, "47h"),
            (2 * 86400, "2d"),
            (3 * 86400 + 4 * 3600, "3d4h"),
            (8 * 86400, "8d"),
            (400 * 86400, "400d"),
            (730 * 86400, "2y"),
            (760 * 86400, "2y30d"),
            (9 * 365 * 86400, "9y"),
        ];
        for (secs, want) in cases {
            assert_eq!(format_age(secs), want, "{secs}s");
        }
        assert_eq!(age(Some("2026-05-01T11:59:55Z"), now()), "5s");
        assert_eq!(age(Some("2026-05-01T13:59:55+02:00"), now()), "5s");
        assert_eq!(age(Some("yesterday"), now()), "<unknown>");
        assert_eq!(age(None, now()), "<unknown>");
    }

    fn vm(name: &str, created: &str, status: Option<&str>, ready: Option<&str>) -> Value {
        let mut v = json!({
            "metadata": {"name": name, "namespace": "default", "creationTimestamp": created},
            "spec": {"runStrategy": "Always"},
            "status": {},
        });
        if let Some(s) = status {
            v["status"]["printableStatus"] = json!(s);
        }
        if let Some(r) = ready {
            v["status"]["conditions"] = json!([{"type": "Ready", "status": r}]);
        }
        v
    }

    fn table(layout: Layout, objs: &[(Value, Option<Value>)], opts: TableOpts) -> String {
        let rows: Vec<Vec<String>> = objs
            .iter()
            .map(|(o, i)| row(layout, o, i.as_ref(), opts, now()))
            .collect();
        render(&header(layout, opts), &rows, None)
    }

    const PLAIN: TableOpts = TableOpts {
        wide: false,
        namespace_column: false,
    };

    #[test]
    fn vm_table() {
        let objs = [
            (
                vm(
                    "vm-cirros",
                    "2026-05-01T11:59:55Z",
                    Some("Running"),
                    Some("True"),
                ),
                None,
            ),
            (
                vm(
                    "a-much-longer-name",
                    "2026-04-29T12:00:00Z",
                    Some("Stopped"),
                    None,
                ),
                None,
            ),
        ];
        assert_eq!(
            table(Layout::Vm, &objs, PLAIN),
            concat!(
                "NAME                 AGE   STATUS    READY\n",
                "vm-cirros            5s    Running   True\n",
                "a-much-longer-name   2d    Stopped   False\n",
            )
        );
    }

    #[test]
    fn vm_table_wide_takes_node_and_ip_from_the_vmi() {
        let mut stopped = vm(
            "off",
            "2026-05-01T11:57:00Z",
            Some("Stopped"),
            Some("False"),
        );
        stopped["spec"] = json!({"running": false});
        let vmi = json!({"status": {"nodeName": "host-1", "interfaces": [{"name": "default", "ipAddress": "10.0.2.15"}]}});
        let objs = [
            (
                vm("on", "2026-05-01T08:00:00Z", Some("Running"), Some("True")),
                Some(vmi),
            ),
            (stopped, None),
        ];
        let opts = TableOpts {
            wide: true,
            namespace_column: true,
        };
        assert_eq!(
            table(Layout::Vm, &objs, opts),
            concat!(
                "NAMESPACE   NAME   AGE   STATUS    READY   NODE     IP          RUNSTRATEGY\n",
                "default     on     4h    Running   True    host-1   10.0.2.15   Always\n",
                "default     off    3m    Stopped   False   <none>   <none>      Halted\n",
            )
        );
    }

    #[test]
    fn vmi_table() {
        let vmi = json!({
            "metadata": {"name": "vm-cirros", "creationTimestamp": "2026-05-01T11:00:00Z"},
            "status": {"phase": "Running", "nodeName": "host-1",
                       "interfaces": [{"ipAddress": "10.0.2.15"}],
                       "conditions": [{"type": "Ready", "status": "True"}, {"type": "LiveMigratable", "status": "True"}]},
        });
        let pending = json!({"metadata": {"name": "p", "creationTimestamp": "2026-05-01T11:59:59Z"}, "status": {"phase": "Pending"}});
        assert_eq!(
            table(
                Layout::Vmi,
                &[(vmi.clone(), None), (pending.clone(), None)],
                PLAIN
            ),
            concat!(
                "NAME        AGE   PHASE     IP          NODENAME   READY\n",
                "vm-cirros   60m   Running   10.0.2.15   host-1     True\n",
                "p           1s    Pending   <none>      <none>     False\n",
            )
        );
        let wide = TableOpts {
            wide: true,
            namespace_column: false,
        };
        assert_eq!(
            table(Layout::Vmi, &[(vmi, None)], wide),
            concat!(
                "NAME        AGE   PHASE     IP          NODENAME   READY   LIVE-MIGRATABLE   PAUSED\n",
                "vm-cirros   60m   Running   10.0.2.15   host-1     True    True              False\n",
            )
        );
    }

    #[test]
    fn host_table() {
        let host = json!({
            "metadata": {"name": "node-a", "creationTimestamp": "2026-04-01T12:00:00Z"},
            "spec": {"unschedulable": true},
            "status": {"capacity": {"cpu": "2", "memory": "24Gi"}, "accelerator": {"type": "tcg", "reason": "pvm"},
                       "conditions": [{"type": "Ready", "status": "True"}]},
        });
        let bare = json!({"metadata": {"name": "new"}});
        assert_eq!(
            table(Layout::Host, &[(host, None), (bare, None)], PLAIN),
            concat!(
                "NAME     STATUS                     ACCEL    CPU      MEMORY   AGE\n",
                "node-a   Ready,SchedulingDisabled   tcg      2        24Gi     30d\n",
                "new      Unknown                    <none>   <none>   <none>   <unknown>\n",
            )
        );
    }

    #[test]
    fn generic_table_and_min_widths() {
        let o = json!({"metadata": {"name": "x", "creationTimestamp": "2026-05-01T11:59:00Z"}});
        assert_eq!(
            table(Layout::Generic, &[(o, None)], PLAIN),
            "NAME   AGE\nx      60s\n"
        );
        // A row printed alone keeps the first table's column widths.
        let h = header(Layout::Vm, PLAIN);
        let first = vec![vec![
            "long-vm-name".to_string(),
            "5s".into(),
            "Running".into(),
            "True".into(),
        ]];
        let w = widths(&h, &first);
        assert_eq!(w, vec![12, 3, 7, 5]);
        let later = vec![vec![
            "a".to_string(),
            "6s".into(),
            "Stopping".into(),
            "False".into(),
        ]];
        assert_eq!(
            render(&[], &later, Some(&w)),
            "a              6s    Stopping   False\n"
        );
        // Empty cells keep their width too.
        let sparse = vec![vec![
            "b".to_string(),
            "7s".into(),
            String::new(),
            "False".into(),
        ]];
        assert_eq!(
            render(&[], &sparse, Some(&w)),
            "b              7s              False\n"
        );
        assert_eq!(
            render(&h, &first, Some(&w)),
            "NAME           AGE   STATUS    READY\nlong-vm-name   5s    Running   True\n"
        );
    }

    #[test]
    fn resource_names() {
        let k = KindInfo {
            group: "kubevirt.io",
            version: "v1",
            kind: "VirtualMachine",
            plural: "virtualmachines",
            singular: "virtualmachine",
            short_names: &[],
            namespaced: true,
            subresources: &[],
            schema_name: "",
        };
        assert_eq!(resource_name(&k), "virtualmachine.kubevirt.io");
        assert_eq!(
            resource_name(&KindInfo {
                group: "",
                kind: "Namespace",
                ..k
            }),
            "namespace"
        );
    }
}
