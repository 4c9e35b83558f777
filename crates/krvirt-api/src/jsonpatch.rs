//! The subset of JSON Patch (RFC 6902) KubeVirt's restore and clone
//! `patches` use: `add`, `replace`, `remove` and `test` on JSON pointers
//! (RFC 6901). Each patch is one JSON object in a string, as in KubeVirt
//! (`{"op":"replace","path":"/metadata/labels/app","value":"x"}`).

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PatchError {
    #[error("not a JSON patch operation: {0}")]
    Syntax(String),
    #[error("unsupported op {0:?} (supported: add, replace, remove, test)")]
    Op(String),
    #[error("path {0:?} must be empty or start with '/'")]
    Pointer(String),
    #[error("path {0:?} does not exist")]
    Missing(String),
    #[error("op {0:?} needs a value")]
    NoValue(String),
    #[error("test failed at {0:?}")]
    TestFailed(String),
}

/// One parsed operation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    pub op: String,
    pub path: String,
    #[serde(default)]
    pub value: Option<Value>,
}

/// Parse and check one patch string.
pub fn parse(s: &str) -> Result<Operation, PatchError> {
    let op: Operation = serde_json::from_str(s).map_err(|e| PatchError::Syntax(e.to_string()))?;
    if !matches!(op.op.as_str(), "add" | "replace" | "remove" | "test") {
        return Err(PatchError::Op(op.op));
    }
    if !op.path.is_empty() && !op.path.starts_with('/') {
        return Err(PatchError::Pointer(op.path));
    }
    if op.op != "remove" && op.value.is_none() {
        return Err(PatchError::NoValue(op.op));
    }
    Ok(op)
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Split a pointer into (parent pointer, last token).
fn split(path: &str) -> Option<(&str, String)> {
    let i = path.rfind('/')?;
    Some((&path[..i], unescape(&path[i + 1..])))
}

/// Apply one operation to `doc`.
pub fn apply(doc: &mut Value, op: &Operation) -> Result<(), PatchError> {
    let missing = || PatchError::Missing(op.path.clone());
    if op.op == "test" {
        let cur = doc.pointer(&op.path).ok_or_else(missing)?;
        return if Some(cur) == op.value.as_ref() {
            Ok(())
        } else {
            Err(PatchError::TestFailed(op.path.clone()))
        };
    }
    let Some((parent, last)) = split(&op.path) else {
        // The whole document.
        return match op.op.as_str() {
            "remove" => Err(PatchError::Missing(op.path.clone())),
            _ => {
                *doc = op.value.clone().unwrap_or(Value::Null);
                Ok(())
            }
        };
    };
    let target = doc.pointer_mut(parent).ok_or_else(missing)?;
    let value = op.value.clone().unwrap_or(Value::Null);
    match target {
        Value::Object(map) => match op.op.as_str() {
            "add" => {
                map.insert(last, value);
                Ok(())
            }
            "replace" => match map.get_mut(&last) {
                Some(v) => {
                    *v = value;
                    Ok(())
                }
                None => Err(missing()),
            },
            _ => map.remove(&last).map(drop).ok_or_else(missing),
        },
        Value::Array(items) => {
            let index = if last == "-" && op.op == "add" {
                items.len()
            } else {
                last.parse::<usize>().map_err(|_| missing())?
            };
            match op.op.as_str() {
                "add" if index <= items.len() => {
                    items.insert(index, value);
                    Ok(())
                }
                "replace" if index < items.len() => {
                    items[index] = value;
                    Ok(())
                }
                "remove" if index < items.len() => {
                    items.remove(index);
                    Ok(())
                }
                _ => Err(missing()),
            }
        }
        _ => Err(missing()),
    }
}

/// Parse and apply a list of patch strings in order.
pub fn apply_all(doc: &mut Value, patches: &[String]) -> Result<(), PatchError> {
    for p in patches {
        apply(doc, &parse(p)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn add_replace_remove_test() {
        let mut d = json!({"metadata": {"labels": {"a": "1"}}, "list": [1, 2]});
        apply_all(
            &mut d,
            &[
                r#"{"op":"replace","path":"/metadata/labels/a","value":"2"}"#.into(),
                r#"{"op":"add","path":"/metadata/labels/b~1c","value":"3"}"#.into(),
                r#"{"op":"add","path":"/list/-","value":3}"#.into(),
                r#"{"op":"remove","path":"/list/0"}"#.into(),
                r#"{"op":"test","path":"/list/0","value":2}"#.into(),
            ],
        )
        .unwrap();
        assert_eq!(
            d,
            json!({"metadata": {"labels": {"a": "2", "b/c": "3"}}, "list": [2, 3]})
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let mut d = json!({"a": {}});
        assert_eq!(
            apply_all(
                &mut d,
                &[r#"{"op":"replace","path":"/a/x","value":1}"#.into()]
            ),
            Err(PatchError::Missing("/a/x".into()))
        );
        assert!(matches!(parse("nope"), Err(PatchError::Syntax(_))));
        assert_eq!(
            parse(r#"{"op":"move","path":"/a"}"#),
            Err(PatchError::Op("move".into()))
        );
        assert_eq!(
            parse(r#"{"op":"add","path":"a","value":1}"#),
            Err(PatchError::Pointer("a".into()))
        );
        assert_eq!(
            parse(r#"{"op":"add","path":"/a"}"#),
            Err(PatchError::NoValue("add".into()))
        );
        assert_eq!(
            apply_all(&mut d, &[r#"{"op":"test","path":"/a","value":1}"#.into()]),
            Err(PatchError::TestFailed("/a".into()))
        );
    }
}
