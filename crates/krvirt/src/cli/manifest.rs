//! Reading manifests: files, directories or stdin; several YAML documents
//! per file (or JSON); errors that name the file, the document and the line.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use krvirt_api::KindInfo;
use serde_json::Value;

/// One object read from a manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// File name, or `stdin`.
    pub source: String,
    /// 1-based index of the document in its source (empty documents are
    /// not counted).
    pub index: usize,
    /// 1-based line where the document starts.
    pub line: usize,
    pub object: Value,
}

impl Manifest {
    /// `vm.yaml document 2` — for messages.
    pub fn origin(&self) -> String {
        format!("{} document {}", self.source, self.index)
    }
}

/// One YAML document's text, cut out of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// 1-based line of the chunk's first line in the whole text.
    pub first_line: usize,
    pub text: &'a str,
}

/// Split a YAML stream at document markers (`---` starts a document,
/// `...` ends one) without parsing it, keeping line positions. A `---`
/// line stays at the top of its chunk (so `--- {a: 1}` parses). Chunks
/// with nothing but blanks and comments are dropped.
pub fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0usize; // byte offset of the current chunk
    let mut start_line = 1usize;
    let mut offset = 0usize;
    fn push<'a>(chunks: &mut Vec<Chunk<'a>>, t: &'a str, first_line: usize) {
        if has_content(t) {
            chunks.push(Chunk {
                first_line,
                text: t,
            });
        }
    }
    for (line_no, line) in (1usize..).zip(text.split_inclusive('\n')) {
        let bare = line.trim_end_matches(['\n', '\r']);
        if is_marker(bare, "---") {
            push(&mut chunks, &text[start..offset], start_line);
            start = offset;
            start_line = line_no;
        } else if is_marker(bare, "...") {
            push(&mut chunks, &text[start..offset], start_line);
            start = offset + line.len();
            start_line = line_no + 1;
        }
        offset += line.len();
    }
    push(&mut chunks, &text[start..], start_line);
    chunks
}

fn is_marker(line: &str, marker: &str) -> bool {
    match line.strip_prefix(marker) {
        Some(rest) => rest.is_empty() || rest.starts_with([' ', '\t']),
        None => false,
    }
}

/// Anything besides blank lines, comments, directives and a lone marker.
fn has_content(t: &str) -> bool {
    t.lines().any(|l| {
        let l = l.trim();
        let l = l.strip_prefix("---").map(str::trim).unwrap_or(l);
        !(l.is_empty() || l.starts_with('#') || l.starts_with('%'))
    })
}

/// Parse a manifest text (YAML, possibly several documents, or JSON)
/// into objects. `kind: List` documents are expanded into their items.
pub fn parse_manifests(source: &str, text: &str) -> Result<Vec<Manifest>> {
    let trimmed = text.trim_start_matches('\u{feff}');
    let first = trimmed.trim_start().chars().next();
    let mut out = Vec::new();
    if matches!(first, Some('{') | Some('[')) {
        // JSON: one or more concatenated values.
        let mut de = serde_json::Deserializer::from_str(trimmed).into_iter::<Value>();
        let mut index = 0;
        loop {
            let line = line_of_offset(trimmed, de.byte_offset());
            match de.next() {
                None => break,
                Some(Ok(v)) => {
                    index += 1;
                    let items = match v {
                        Value::Array(items) => items,
                        v => vec![v],
                    };
                    for item in items {
                        push_object(&mut out, source, index, line, item)?;
                    }
                }
                Some(Err(e)) => bail!(
                    "{source}: document {}: JSON error at line {}, column {}: {}",
                    index + 1,
                    e.line(),
                    e.column(),
                    json_message(&e)
                ),
            }
        }
        return Ok(out);
    }
    for (i, chunk) in split_documents(trimmed).into_iter().enumerate() {
        let index = i + 1;
        let v: Value = serde_saphyr::from_str(chunk.text).map_err(|e| {
            let opts = serde_saphyr::render_options! {
                line_offset: (chunk.first_line - 1) as u64,
                source_name: Some(source),
            };
            let rendered = e.render_with_options(opts);
            let rendered = rendered.strip_prefix("error: ").unwrap_or(&rendered);
            anyhow!("{source}: document {index}: {rendered}")
        })?;
        if v.is_null() {
            continue;
        }
        push_object(&mut out, source, index, chunk.first_line, v)?;
    }
    Ok(out)
}

fn json_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    let skipped = text[offset.min(text.len())..]
        .chars()
        .take_while(|c| c.is_whitespace())
        .map(char::len_utf8)
        .sum::<usize>();
    text[..(offset + skipped).min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

fn push_object(
    out: &mut Vec<Manifest>,
    source: &str,
    index: usize,
    line: usize,
    v: Value,
) -> Result<()> {
    let Value::Object(map) = &v else {
        bail!(
            "{source}: document {index} (line {line}): expected an object with apiVersion and kind, found {}",
            json_type(&v)
        );
    };
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind == "List" || (kind.ends_with("List") && map.contains_key("items")) {
        let items = match map.get("items") {
            Some(Value::Array(items)) => items.clone(),
            Some(Value::Null) | None => Vec::new(),
            Some(_) => bail!(
                "{source}: document {index} (line {line}): `items` of a List must be an array"
            ),
        };
        for item in items {
            push_object(out, source, index, line, item)?;
        }
        return Ok(());
    }
    out.push(Manifest {
        source: source.to_string(),
        index,
        line,
        object: v,
    });
    Ok(())
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Read every `-f` argument: a file, `-` for stdin, or a directory (its
/// `.yaml`, `.yml` and `.json` files, sorted by name).
pub fn read_all(files: &[String]) -> Result<Vec<Manifest>> {
    let mut out = Vec::new();
    for f in files {
        if f == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("cannot read manifests from stdin")?;
            out.extend(parse_manifests("stdin", &text)?);
            continue;
        }
        let path = Path::new(f);
        if path.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read directory {f}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && matches!(
                            p.extension().and_then(|e| e.to_str()),
                            Some("yaml" | "yml" | "json")
                        )
                })
                .collect();
            entries.sort();
            if entries.is_empty() {
                bail!("directory {f} holds no .yaml, .yml or .json files");
            }
            for p in entries {
                out.extend(read_file(&p)?);
            }
            continue;
        }
        out.extend(read_file(path)?);
    }
    Ok(out)
}

fn read_file(path: &Path) -> Result<Vec<Manifest>> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| anyhow!("cannot read {name}: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "cannot read {name}: not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    parse_manifests(&name, &text)
}

/// The served kind of a manifest object, checked against its apiVersion.
pub fn kind_of(m: &Manifest) -> Result<&'static KindInfo> {
    let obj = &m.object;
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if kind.is_empty() {
        bail!("{} (line {}): the object has no `kind`", m.origin(), m.line);
    }
    if api_version.is_empty() {
        bail!(
            "{} (line {}): the object has no `apiVersion`",
            m.origin(),
            m.line
        );
    }
    let Some(info) = krvirt_api::kinds().iter().find(|k| k.kind == kind) else {
        bail!(
            "{} (line {}): unknown kind {kind:?} (apiVersion {api_version}); {}",
            m.origin(),
            m.line,
            super::known_kinds_sentence()
        );
    };
    if info.api_version() != api_version {
        bail!(
            "{} (line {}): {kind} is served as apiVersion {}, not {api_version}",
            m.origin(),
            m.line,
            info.api_version()
        );
    }
    Ok(info)
}

/// `metadata.name`, required.
pub fn name_of(m: &Manifest) -> Result<&str> {
    m.object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            anyhow!(
                "{} (line {}): metadata.name is required",
                m.origin(),
                m.line
            )
        })
}

/// The namespace an object goes to: its own `metadata.namespace`, else
/// the `-n` value. A different explicit `-n` is refused, as kubectl does.
pub fn namespace_of(m: &Manifest, flag: &super::Namespace) -> Result<String> {
    let own = m
        .object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    match own {
        Some(ns) if flag.explicit && flag.name != ns => bail!(
            "{}: the namespace of the object ({ns}) does not match --namespace {}",
            m.origin(),
            flag.name
        ),
        Some(ns) => Ok(ns.to_string()),
        None => Ok(flag.name.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(text: &str) -> Vec<(usize, &str)> {
        split_documents(text)
            .into_iter()
            .map(|c| (c.first_line, c.text))
            .collect()
    }

    #[test]
    fn splits_on_markers_keeping_line_numbers() {
        let text = "a: 1\n---\nb: 2\n--- # second\n\n# only a comment\n---\nc: 3\n...\nd: 4\n";
        assert_eq!(
            chunks(text),
            vec![
                (1, "a: 1\n"),
                (2, "---\nb: 2\n"),
                (7, "---\nc: 3\n"),
                (10, "d: 4\n"),
            ]
        );
    }

    #[test]
    fn leading_marker_and_crlf_and_inline_content() {
        assert_eq!(
            chunks("---\r\na: 1\r\n---\r\n"),
            vec![(1, "---\r\na: 1\r\n")]
        );
        assert_eq!(
            chunks("--- {a: 1}\n--- {b: 2}"),
            vec![(1, "--- {a: 1}\n"), (2, "--- {b: 2}")]
        );
        // `----` and `---x` are not markers; an indented one is content.
        assert_eq!(
            chunks("a: |\n  ---\nb: ----\n"),
            vec![(1, "a: |\n  ---\nb: ----\n")]
        );
        assert!(chunks("\n# nothing\n---\n").is_empty());
    }

    #[test]
    fn parses_several_documents_with_their_positions() {
        let text =
            "apiVersion: v1\nkind: A\nmetadata: {name: a}\n---\n---\napiVersion: v1\nkind: B\n";
        let ms = parse_manifests("f.yaml", text).expect("parse");
        let got: Vec<(usize, usize, &str)> = ms
            .iter()
            .map(|m| (m.index, m.line, m.object["kind"].as_str().unwrap_or("")))
            .collect();
        assert_eq!(got, vec![(1, 1, "A"), (2, 5, "B")]);
    }

    #[test]
    fn yaml_errors_name_file_document_and_absolute_line() {
        let text = "kind: A\n---\nkind: B\nmetadata:\n  name: a\n   bad: 2\n";
        let e = parse_manifests("vm.yaml", text)
            .expect_err("bad yaml")
            .to_string();
        let first = e.lines().next().unwrap_or("");
        assert_eq!(
            first,
            "vm.yaml: document 2: line 6 column 7: mapping values are not allowed in this context"
        );
        assert!(e.contains("--> vm.yaml:6:7"), "{e}");
    }

    #[test]
    fn json_single_array_and_concatenated() {
        let ms = parse_manifests("x.json", r#"{"kind":"A"}"#).expect("one");
        assert_eq!(ms.len(), 1);
        let ms = parse_manifests("x.json", "[{\"kind\":\"A\"},{\"kind\":\"B\"}]").expect("array");
        assert_eq!(ms.len(), 2);
        let ms =
            parse_manifests("x.json", "{\"kind\":\"A\"}\n\n{\"kind\":\"B\"}\n").expect("stream");
        let got: Vec<(usize, usize)> = ms.iter().map(|m| (m.index, m.line)).collect();
        assert_eq!(got, vec![(1, 1), (2, 3)]);
        let e =
            parse_manifests("x.json", "{\"kind\":\"A\"}\n{\"kind\": }\n").expect_err("bad json");
        assert_eq!(
            e.to_string(),
            "x.json: document 2: JSON error at line 2, column 10: expected value"
        );
    }

    #[test]
    fn lists_are_expanded_and_scalars_refused() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- {kind: A}\n- {kind: B}\n";
        let ms = parse_manifests("l.yaml", text).expect("list");
        assert_eq!(ms.len(), 2);
        assert!(ms.iter().all(|m| m.index == 1));
        let e = parse_manifests("s.yaml", "a: 1\n---\n- x\n").expect_err("list doc");
        assert_eq!(
            e.to_string(),
            "s.yaml: document 2 (line 2): expected an object with apiVersion and kind, found a list"
        );
    }

    #[test]
    fn unreadable_files_are_named() {
        let e = read_all(&["/nonexistent/vm.yaml".to_string()]).expect_err("missing");
        assert_eq!(
            e.to_string(),
            "cannot read /nonexistent/vm.yaml: No such file or directory (os error 2)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let e = read_all(&[dir.path().display().to_string()]).expect_err("empty dir");
        assert!(
            e.to_string()
                .ends_with("holds no .yaml, .yml or .json files"),
            "{e}"
        );
        let bin = dir.path().join("b.yaml");
        std::fs::write(&bin, b"a: \xff\n").expect("write");
        let e = read_all(&[bin.display().to_string()]).expect_err("binary");
        assert!(
            e.to_string()
                .contains("not UTF-8 text (invalid byte at offset 3)"),
            "{e}"
        );
        std::fs::write(dir.path().join("a.yml"), "kind: A\n").expect("write");
        std::fs::write(dir.path().join("c.json"), "{\"kind\":\"C\"}").expect("write");
        std::fs::write(&bin, "kind: B\n").expect("write");
        std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
        let ms = read_all(&[dir.path().display().to_string()]).expect("dir");
        let kinds: Vec<&str> = ms
            .iter()
            .map(|m| m.object["kind"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(kinds, vec!["A", "B", "C"]);
    }

    #[test]
    fn namespace_comes_from_the_object_or_the_flag() {
        use super::super::Namespace;
        let m = |ns: Option<&str>| Manifest {
            source: "vm.yaml".into(),
            index: 1,
            line: 1,
            object: match ns {
                Some(ns) => serde_json::json!({"metadata": {"name": "a", "namespace": ns}}),
                None => serde_json::json!({"metadata": {"name": "a"}}),
            },
        };
        let flag = |name: &str, explicit| Namespace {
            name: name.into(),
            explicit,
        };
        assert_eq!(
            namespace_of(&m(None), &flag("default", false)).expect("default"),
            "default"
        );
        assert_eq!(
            namespace_of(&m(None), &flag("prod", true)).expect("flag"),
            "prod"
        );
        assert_eq!(
            namespace_of(&m(Some("dev")), &flag("default", false)).expect("own"),
            "dev"
        );
        assert_eq!(
            namespace_of(&m(Some("dev")), &flag("dev", true)).expect("same"),
            "dev"
        );
        assert_eq!(
            namespace_of(&m(Some("dev")), &flag("prod", true))
                .expect_err("mismatch")
                .to_string(),
            "vm.yaml document 1: the namespace of the object (dev) does not match --namespace prod"
        );
    }

    #[test]
    fn kubevirt_example_corpus_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/kubevirt-examples");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("the KubeVirt example corpus at {}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("yaml"))
            .collect();
        files.sort();
        assert!(files.len() > 20, "corpus too small: {}", files.len());
        for f in files {
            let ms = read_all(&[f.display().to_string()]).expect("corpus file parses");
            assert!(!ms.is_empty(), "{}", f.display());
            for m in ms {
                assert!(m.object.get("kind").is_some(), "{}", m.origin());
            }
        }
    }
}
