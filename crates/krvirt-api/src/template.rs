//! `krvirt.io/v1` Template: a parameterised VirtualMachine with immutable
//! versions, and `krvirt.io/v1` TemplateInstance: a request to make a VM
//! from one version of a Template (OpenShift's TemplateInstance role).
//!
//! A Template holds its versions in `spec.versions[]` (name, parameters,
//! objects). Versions are immutable once stored: admission refuses any edit
//! of an existing version, naming the field; new versions are appended,
//! old ones may be removed. Rolling back is creating a VM from an older
//! version (`krvirt create vm NAME --from TEMPLATE:2`).
//!
//! The OpenShift form (top-level `parameters[]`, `objects[]`, `labels`,
//! `message`, as in `vm-template-fedora.yaml`) is accepted under
//! `apiVersion: krvirt.io/v1` and becomes version `1`.
//!
//! Parameters follow OpenShift: `${NAME}` is replaced inside strings,
//! a string that is exactly `${{NAME}}` becomes the value parsed as JSON
//! (a number stays a number), `required` parameters must get a value, and
//! `generate: expression` makes one from `from` (`[a-z0-9]{8}`, `\w`, `\d`,
//! `\a`, `\A`, literals).
//!
//! [`render`] is pure; the template controller creates the VM and its
//! disks from the result.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::admission::{Admit, Causes};
use crate::error::{FieldCause, reason};
use crate::kubevirt::validate::{immutable_identity, metadata};
use crate::meta::{Condition, ObjectMeta, null_default};
use crate::storage::CloneType;

const MAX_NAME: usize = 253;
/// Label on a VM made from a template: the Template's name.
pub const TEMPLATE_LABEL: &str = "vm.kubevirt.io/template";
/// Label on a VM made from a template: the version used.
pub const TEMPLATE_VERSION_LABEL: &str = "vm.kubevirt.io/template.version";
/// Annotation on objects a TemplateInstance created: its uid.
pub const TEMPLATE_INSTANCE_ANNOTATION: &str = "krvirt.io/template-instance";
/// TemplateInstance condition: the VM and its disks were created.
pub const CONDITION_READY: &str = "Ready";
/// TemplateInstance condition: instantiation failed (message says why).
pub const CONDITION_FAILED: &str = "InstantiateFailure";

/// A template parameter (OpenShift's shape).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Parameter {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Default value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// `expression`: generate a value from `from` when none is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "crate::meta::is_false")]
    pub required: bool,
}

/// One immutable version of a template.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateVersion {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub parameters: Vec<Parameter>,
    /// Exactly one `kubevirt.io/v1` VirtualMachine.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schema(value_type = Vec<Object>)]
    pub objects: Vec<Value>,
    /// Labels added to every object made.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateSpec {
    #[serde(default, deserialize_with = "null_default")]
    pub versions: Vec<TemplateVersion>,
    /// Version used when none is named (default: the last one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_version: Option<String>,
}

/// A parameterised VM definition with versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Template {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<TemplateSpec>,
    /// OpenShift form: becomes version `1`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub parameters: Vec<Parameter>,
    /// OpenShift form: becomes version `1`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schema(value_type = Vec<Object>)]
    pub objects: Vec<Value>,
    /// OpenShift form: becomes version `1`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    /// OpenShift form: becomes version `1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Template {
    /// The version named `name`, or the default one.
    pub fn version(&self, name: Option<&str>) -> Option<&TemplateVersion> {
        let spec = self.spec.as_ref()?;
        let name = name.or(spec.default_version.as_deref());
        match name {
            Some(n) => spec.versions.iter().find(|v| v.name == n),
            None => spec.versions.last(),
        }
    }

    /// Names of the versions, oldest first.
    pub fn version_names(&self) -> Vec<String> {
        self.spec
            .as_ref()
            .map(|s| s.versions.iter().map(|v| v.name.clone()).collect())
            .unwrap_or_default()
    }
}

/// A request to make a VM from a Template version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateInstance {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: TemplateInstanceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<TemplateInstanceStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateInstanceSpec {
    /// The Template (same namespace).
    pub template: String,
    /// Its version (default: the Template's default version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Parameter values.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub parameters: BTreeMap<String, String>,
    /// Name of the VM (default: this object's name). A `NAME` parameter
    /// with no value gets it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    /// How disks that name an image or a Volume are copied: `linked` (a
    /// qcow2 overlay on the image, constant time; the default) or `full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneType>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateInstanceStatus {
    /// `Ready`, `InstantiateFailure`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
    /// The version used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Every parameter's value (given, default or generated).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub parameters: BTreeMap<String, String>,
    /// The VM made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_machine: Option<String>,
    /// The Volumes made for its disks.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub volumes: Vec<String>,
}

impl TemplateInstance {
    /// The VM's name.
    pub fn vm_name(&self) -> &str {
        self.spec
            .vm_name
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(self.metadata.name())
    }
}

macro_rules! object_impl {
    ($t:ident) => {
        impl crate::meta::Object for $t {
            fn kind_info() -> &'static crate::KindInfo {
                crate::types::kind_named(stringify!($t))
            }
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
object_impl!(Template);
object_impl!(TemplateInstance);

fn is_param_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_version_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// Every `${NAME}` / `${{NAME}}` referenced in strings of `v`.
fn references(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(i) = rest.find("${") {
                rest = &rest[i + 2..];
                let braces = rest.starts_with('{');
                let body = if braces { &rest[1..] } else { rest };
                if let Some(end) = body.find('}') {
                    let name = &body[..end];
                    if is_param_name(name) && (!braces || body[end..].starts_with("}}")) {
                        out.insert(name.to_string());
                    }
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| references(x, out)),
        Value::Object(m) => {
            for (k, x) in m {
                references(&Value::String(k.clone()), out);
                references(x, out);
            }
        }
        _ => {}
    }
}

fn check_version(v: &TemplateVersion, p: &str, c: &mut Causes) {
    if !is_version_name(&v.name) {
        c.invalid(
            format!("{p}.name"),
            format!(
                "{:?}: a version name is lower-case alphanumerics, '-' and '.', at most 63 characters",
                v.name
            ),
        );
    }
    let mut seen = BTreeSet::new();
    for (i, param) in v.parameters.iter().enumerate() {
        let f = format!("{p}.parameters[{i}]");
        if !is_param_name(&param.name) {
            c.invalid(
                format!("{f}.name"),
                format!(
                    "{:?}: a parameter name is letters, digits and '_'",
                    param.name
                ),
            );
        } else if !seen.insert(param.name.clone()) {
            c.duplicate(format!("{f}.name"), format!("parameter {}", param.name));
        }
        match param.generate.as_deref() {
            None | Some("") => {}
            Some("expression") => match param.from.as_deref() {
                None | Some("") => c.required(
                    format!("{f}.from"),
                    "a generated parameter needs an expression in `from`",
                ),
                Some(expr) => {
                    if let Err(e) = parse_expression(expr) {
                        c.invalid(format!("{f}.from"), format!("{expr:?}: {e}"));
                    }
                }
            },
            Some(other) => c.not_supported(
                format!("{f}.generate"),
                format!("{other:?}: only \"expression\" is supported"),
            ),
        }
    }
    let vms: Vec<usize> = v
        .objects
        .iter()
        .enumerate()
        .filter(|(_, o)| o.get("kind").and_then(Value::as_str) == Some("VirtualMachine"))
        .map(|(i, _)| i)
        .collect();
    for (i, o) in v.objects.iter().enumerate() {
        let f = format!("{p}.objects[{i}]");
        match (
            o.get("apiVersion").and_then(Value::as_str),
            o.get("kind").and_then(Value::as_str),
        ) {
            (_, Some("VirtualMachine")) => {
                let av = o.get("apiVersion").and_then(Value::as_str).unwrap_or("");
                if av != crate::kubevirt::API_VERSION {
                    c.not_supported(
                        format!("{f}.apiVersion"),
                        format!(
                            "{av:?}: a template's VirtualMachine is {}",
                            crate::kubevirt::API_VERSION
                        ),
                    );
                }
            }
            (_, Some(k)) => c.not_supported(
                format!("{f}.kind"),
                format!("{k:?}: a template makes exactly one VirtualMachine"),
            ),
            (_, None) => c.required(format!("{f}.kind"), "Required value"),
        }
        let mut refs = BTreeSet::new();
        references(o, &mut refs);
        for r in refs.difference(&seen) {
            c.invalid(
                f.clone(),
                format!("references parameter {r}, which this version does not declare"),
            );
        }
    }
    if vms.is_empty() {
        c.required(
            format!("{p}.objects"),
            "a template version holds one kubevirt.io/v1 VirtualMachine",
        );
    } else if vms.len() > 1 {
        c.invalid(
            format!("{p}.objects[{}]", vms[1]),
            "a template version holds exactly one VirtualMachine",
        );
    }
}

impl Admit for Template {
    fn not_implemented(_path: &str) -> bool {
        false
    }

    fn apply_defaults(&mut self) {
        if self.spec.is_none() && !self.objects.is_empty() {
            self.spec = Some(TemplateSpec {
                versions: vec![TemplateVersion {
                    name: "1".into(),
                    description: None,
                    parameters: std::mem::take(&mut self.parameters),
                    objects: std::mem::take(&mut self.objects),
                    labels: std::mem::take(&mut self.labels),
                    message: self.message.take(),
                }],
                default_version: None,
            });
        }
    }

    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", MAX_NAME, true, c);
        if !self.objects.is_empty() || !self.parameters.is_empty() {
            c.invalid(
                "objects",
                "give versions in spec.versions[] or the OpenShift form (top-level parameters and objects), not both",
            );
        }
        let Some(spec) = &self.spec else {
            c.required("spec.versions", "a template needs at least one version");
            return;
        };
        if spec.versions.is_empty() {
            c.required("spec.versions", "a template needs at least one version");
        }
        let mut names = BTreeSet::new();
        for (i, v) in spec.versions.iter().enumerate() {
            let p = format!("spec.versions[{i}]");
            check_version(v, &p, c);
            if !names.insert(v.name.as_str()) {
                c.duplicate(format!("{p}.name"), format!("version {}", v.name));
            }
        }
        if let Some(d) = &spec.default_version
            && !names.contains(d.as_str())
        {
            c.invalid(
                "spec.defaultVersion",
                format!("{d:?} is not one of the versions"),
            );
        }
        let Some(old) = old else { return };
        immutable_identity(&old.metadata, &self.metadata, c);
        let old_versions = old.spec.as_ref().map(|s| s.versions.as_slice());
        for ov in old_versions.unwrap_or_default() {
            let Some((i, nv)) = spec
                .versions
                .iter()
                .enumerate()
                .find(|(_, v)| v.name == ov.name)
            else {
                continue; // removing a version is allowed
            };
            let p = format!("spec.versions[{i}]");
            let fields: [(&str, bool); 5] = [
                ("description", ov.description != nv.description),
                ("parameters", ov.parameters != nv.parameters),
                ("objects", ov.objects != nv.objects),
                ("labels", ov.labels != nv.labels),
                ("message", ov.message != nv.message),
            ];
            for (f, changed) in fields {
                if changed {
                    c.forbidden(
                        format!("{p}.{f}"),
                        format!(
                            "version {} of template {} is immutable: add a new version instead",
                            ov.name,
                            self.metadata.name()
                        ),
                    );
                }
            }
        }
    }
}

impl Admit for TemplateInstance {
    fn not_implemented(_path: &str) -> bool {
        false
    }

    fn apply_defaults(&mut self) {}

    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", MAX_NAME, true, c);
        if self.spec.template.is_empty() {
            c.required("spec.template", "the name of a Template is required");
        }
        if let Some(v) = &self.spec.version
            && !is_version_name(v)
        {
            c.invalid("spec.version", format!("{v:?} is not a version name"));
        }
        for k in self.spec.parameters.keys() {
            if !is_param_name(k) {
                c.invalid(
                    format!("spec.parameters[{k}]"),
                    "a parameter name is letters, digits and '_'",
                );
            }
        }
        let vm = self.vm_name();
        if let Some(problem) = crate::util::dns1123_label(vm) {
            c.invalid("spec.vmName", format!("{vm:?}: {problem}"));
        }
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.spec != self.spec {
                c.forbidden("spec", "the spec of a TemplateInstance is immutable");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Generated values
// ---------------------------------------------------------------------------

/// One piece of a generator expression: a set of characters, repeated.
#[derive(Debug, Clone, PartialEq)]
struct Piece {
    chars: Vec<char>,
    count: usize,
}

fn class(name: char) -> Option<Vec<char>> {
    let range = |a: char, b: char| (a..=b).collect::<Vec<_>>();
    Some(match name {
        'w' => [range('a', 'z'), range('A', 'Z'), range('0', '9'), vec!['_']].concat(),
        'd' => range('0', '9'),
        'a' => [range('a', 'z'), range('A', 'Z')].concat(),
        'A' => range('!', '/')
            .into_iter()
            .chain(range(':', '@'))
            .chain(range('[', '`'))
            .chain(range('{', '~'))
            .collect(),
        _ => return None,
    })
}

/// Parse an OpenShift generator expression (`[a-z0-9]{8}`, `\w{10}`,
/// `admin[0-9]{2}`).
fn parse_expression(expr: &str) -> Result<Vec<Piece>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut out: Vec<Piece> = Vec::new();
    while i < chars.len() {
        let set = match chars[i] {
            '[' => {
                let mut set = Vec::new();
                i += 1;
                loop {
                    let Some(&ch) = chars.get(i) else {
                        return Err("unterminated '['".into());
                    };
                    if ch == ']' {
                        i += 1;
                        break;
                    }
                    if ch == '\\' {
                        let n = chars.get(i + 1).copied().ok_or("dangling '\\'")?;
                        set.extend(class(n).ok_or(format!("unknown class \\{n}"))?);
                        i += 2;
                    } else if chars.get(i + 1) == Some(&'-')
                        && chars.get(i + 2).is_some_and(|c| *c != ']')
                    {
                        let hi = chars[i + 2];
                        if hi < ch {
                            return Err(format!("bad range {ch}-{hi}"));
                        }
                        set.extend(ch..=hi);
                        i += 3;
                    } else {
                        set.push(ch);
                        i += 1;
                    }
                }
                if set.is_empty() {
                    return Err("empty character class".into());
                }
                set
            }
            '\\' => {
                let n = chars.get(i + 1).copied().ok_or("dangling '\\'")?;
                i += 2;
                class(n).ok_or(format!("unknown class \\{n}"))?
            }
            '{' | '}' | ']' => return Err(format!("unexpected {:?}", chars[i])),
            ch => {
                i += 1;
                vec![ch]
            }
        };
        let mut count = 1;
        if chars.get(i) == Some(&'{') {
            let end = chars[i..]
                .iter()
                .position(|c| *c == '}')
                .ok_or("unterminated '{'")?;
            let body: String = chars[i + 1..i + end].iter().collect();
            let first = body.split(',').next().unwrap_or("");
            count = first
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("bad count {{{body}}}"))?;
            if count > 1024 {
                return Err("count above 1024".into());
            }
            i += end + 1;
        }
        out.push(Piece { chars: set, count });
    }
    Ok(out)
}

fn generate(expr: &str, random: &mut dyn FnMut() -> u64) -> Result<String, String> {
    let mut s = String::new();
    for p in parse_expression(expr)? {
        for _ in 0..p.count {
            let i = (random() % p.chars.len() as u64) as usize;
            s.push(p.chars[i]);
        }
    }
    Ok(s)
}

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

/// A rendered template version.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub version: String,
    /// Every parameter's final value.
    pub parameters: BTreeMap<String, String>,
    /// The VirtualMachine object (JSON).
    pub vm: Value,
}

fn substitute(v: &mut Value, params: &BTreeMap<String, String>) {
    match v {
        Value::String(s) => {
            if let Some(name) = s.strip_prefix("${{").and_then(|r| r.strip_suffix("}}"))
                && let Some(val) = params.get(name)
            {
                *v = serde_json::from_str(val).unwrap_or_else(|_| Value::String(val.clone()));
                return;
            }
            let mut out = s.clone();
            for (k, val) in params {
                out = out
                    .replace(&format!("${{{{{k}}}}}"), val)
                    .replace(&format!("${{{k}}}"), val);
            }
            *s = out;
        }
        Value::Array(a) => a.iter_mut().for_each(|x| substitute(x, params)),
        Value::Object(m) => {
            let old = std::mem::take(m);
            for (k, mut x) in old {
                let mut key = Value::String(k);
                substitute(&mut key, params);
                substitute(&mut x, params);
                let k = match key {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                m.insert(k, x);
            }
        }
        _ => {}
    }
}

/// Render version `version` (default: the template's default) of `tpl`
/// with `given` parameter values; `random` feeds generated values.
/// Causes name the TemplateInstance fields (`spec.version`,
/// `spec.parameters[NAME]`).
pub fn render(
    tpl: &Template,
    version: Option<&str>,
    given: &BTreeMap<String, String>,
    random: &mut dyn FnMut() -> u64,
) -> Result<Rendered, Vec<FieldCause>> {
    let Some(v) = tpl.version(version) else {
        let msg = match version {
            Some(n) => format!(
                "template {} has no version {n:?} (versions: {})",
                tpl.metadata.name(),
                tpl.version_names().join(", ")
            ),
            None => format!("template {} has no versions", tpl.metadata.name()),
        };
        return Err(vec![FieldCause::new(
            "FieldValueNotFound",
            "spec.version",
            msg,
        )]);
    };
    let mut causes = Vec::new();
    let declared: BTreeSet<&str> = v.parameters.iter().map(|p| p.name.as_str()).collect();
    for k in given.keys() {
        if !declared.contains(k.as_str()) {
            causes.push(FieldCause::new(
                reason::NOT_SUPPORTED,
                format!("spec.parameters[{k}]"),
                format!(
                    "unknown parameter {k}: version {} of template {} declares {}",
                    v.name,
                    tpl.metadata.name(),
                    if declared.is_empty() {
                        "none".to_string()
                    } else {
                        declared.iter().copied().collect::<Vec<_>>().join(", ")
                    }
                ),
            ));
        }
    }
    let mut params = BTreeMap::new();
    for p in &v.parameters {
        let value = match given.get(&p.name) {
            Some(x) => x.clone(),
            None => match (&p.value, p.generate.as_deref(), p.from.as_deref()) {
                (_, Some("expression"), Some(expr)) => match generate(expr, random) {
                    Ok(s) => s,
                    Err(e) => {
                        causes.push(FieldCause::new(
                            reason::INVALID,
                            format!("spec.parameters[{}]", p.name),
                            format!("cannot generate parameter {}: {e}", p.name),
                        ));
                        continue;
                    }
                },
                (Some(x), _, _) => x.clone(),
                (None, _, _) => String::new(),
            },
        };
        if p.required && value.is_empty() {
            causes.push(FieldCause::new(
                reason::REQUIRED,
                format!("spec.parameters[{}]", p.name),
                format!(
                    "parameter {} is required by version {} of template {}{}",
                    p.name,
                    v.name,
                    tpl.metadata.name(),
                    p.description
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                ),
            ));
        }
        params.insert(p.name.clone(), value);
    }
    if !causes.is_empty() {
        return Err(causes);
    }
    let Some(mut vm) = v
        .objects
        .iter()
        .find(|o| o.get("kind").and_then(Value::as_str) == Some("VirtualMachine"))
        .cloned()
    else {
        return Err(vec![FieldCause::new(
            reason::INVALID,
            "spec.template",
            format!(
                "version {} of template {} holds no VirtualMachine",
                v.name,
                tpl.metadata.name()
            ),
        )]);
    };
    substitute(&mut vm, &params);
    if !v.labels.is_empty()
        && let Some(meta) = vm.as_object_mut().map(|o| {
            o.entry("metadata")
                .or_insert_with(|| Value::Object(Default::default()))
        })
        && let Some(meta) = meta.as_object_mut()
    {
        let labels = meta
            .entry("labels")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(l) = labels.as_object_mut() {
            for (k, val) in &v.labels {
                let mut x = Value::String(val.clone());
                substitute(&mut x, &params);
                l.insert(k.clone(), x);
            }
        }
    }
    Ok(Rendered {
        version: v.name.clone(),
        parameters: params,
        vm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions() {
        let mut n = 0u64;
        let mut rnd = || {
            n += 7;
            n
        };
        let s = generate("[a-z0-9]{8}", &mut rnd).expect("valid");
        assert_eq!(s.len(), 8);
        assert!(
            s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        let s = generate("admin\\d{3}", &mut rnd).expect("valid");
        assert!(s.starts_with("admin") && s.len() == 8, "{s}");
        assert!(parse_expression("[a-z").is_err());
        assert!(parse_expression("\\q").is_err());
        assert!(parse_expression("[z-a]").is_err());
    }

    #[test]
    fn substitution_keeps_types_for_double_braces() {
        let mut v = serde_json::json!({"a": "${{N}}", "b": "x-${N}-${{N}}", "c": "${M}"});
        let params = BTreeMap::from([("N".to_string(), "4".to_string())]);
        substitute(&mut v, &params);
        assert_eq!(v, serde_json::json!({"a": 4, "b": "x-4-4", "c": "${M}"}));
    }
}
