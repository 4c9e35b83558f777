//! `-o json|yaml|name` renderings.

use anyhow::{Context, Result};
use clap::ValueEnum;
use krvirt_api::KindInfo;
use serde::Serialize;
use serde_json::{Value, json};

use super::table::{name, resource_name};

/// `-o` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The table plus extra columns
    Wide,
    Json,
    Yaml,
    /// KIND.GROUP/NAME per object
    Name,
}

/// JSON indented by four spaces, as kubectl prints it.
pub fn json(v: &Value) -> Result<String> {
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    v.serialize(&mut ser).context("cannot render JSON")?;
    let mut s = String::from_utf8(buf).context("JSON is not UTF-8")?;
    s.push('\n');
    Ok(s)
}

pub fn yaml(v: &Value) -> Result<String> {
    let mut s = serde_saphyr::to_string(v).context("cannot render YAML")?;
    if !s.ends_with('\n') {
        s.push('\n');
    }
    Ok(s)
}

/// What `kubectl get -o json|yaml` prints for several objects.
pub fn list_object(items: Vec<Value>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": items,
        "metadata": {"resourceVersion": ""},
    })
}

/// `virtualmachine.kubevirt.io/vm-cirros`
pub fn name_line(kind: &KindInfo, obj: &Value) -> String {
    format!("{}/{}\n", resource_name(kind), name(obj))
}

/// Render objects for `-o json|yaml|name`. `single`: one object asked for
/// by name (printed bare, not wrapped in a List).
pub fn render_objects(
    format: Output,
    kind: &KindInfo,
    objs: Vec<Value>,
    single: bool,
) -> Result<String> {
    match format {
        Output::Name => Ok(objs.iter().map(|o| name_line(kind, o)).collect()),
        Output::Json | Output::Yaml => {
            let v = if single && objs.len() == 1 {
                objs.into_iter().next().unwrap_or(Value::Null)
            } else {
                list_object(objs)
            };
            if format == Output::Json {
                json(&v)
            } else {
                yaml(&v)
            }
        }
        Output::Wide => unreachable_table(),
    }
}

fn unreachable_table() -> Result<String> {
    anyhow::bail!("internal: the wide table is not an object rendering")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_kind() -> &'static KindInfo {
        krvirt_api::find_kind("vm").expect("vm kind")
    }

    #[test]
    fn renders_like_kubectl() {
        let a = json!({"metadata": {"name": "a"}, "spec": {"running": true, "count": "1"}});
        let b = json!({"metadata": {"name": "b"}});
        assert_eq!(
            render_objects(Output::Name, vm_kind(), vec![a.clone(), b.clone()], false)
                .expect("name"),
            "virtualmachine.kubevirt.io/a\nvirtualmachine.kubevirt.io/b\n"
        );
        assert_eq!(
            render_objects(Output::Json, vm_kind(), vec![b.clone()], true).expect("json"),
            "{\n    \"metadata\": {\n        \"name\": \"b\"\n    }\n}\n"
        );
        assert_eq!(
            render_objects(Output::Yaml, vm_kind(), vec![a], true).expect("yaml"),
            "metadata:\n  name: a\nspec:\n  count: \"1\"\n  running: true\n"
        );
        assert_eq!(
            render_objects(Output::Yaml, vm_kind(), vec![b], false).expect("list"),
            "apiVersion: v1\nitems:\n- metadata:\n    name: b\nkind: List\nmetadata:\n  resourceVersion: \"\"\n"
        );
    }
}
