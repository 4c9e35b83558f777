//! Label and field selectors (Kubernetes syntax).
//!
//! Label selectors: comma-joined requirements, each one of `key`, `!key`,
//! `key=value`, `key==value`, `key!=value`, `key in (a,b)`,
//! `key notin (a,b)`, `key>N`, `key<N`. Field selectors: comma-joined
//! `field=value`, `field==value`, `field!=value` over the supported fields
//! [`FIELD_SELECTOR_FIELDS`].

use std::fmt;

use serde_json::Value;

use crate::ApiError;

/// Fields a field selector may name.
pub const FIELD_SELECTOR_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "status.nodeName",
    "status.phase",
    // Events (`kubectl get events --field-selector involvedObject.name=x`)
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "reason",
    "type",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelOp {
    Exists,
    DoesNotExist,
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    GreaterThan(i64),
    LessThan(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRequirement {
    pub key: String,
    pub op: LabelOp,
}

impl LabelRequirement {
    fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let value = labels
            .and_then(|l| l.get(&self.key))
            .map(|v| v.as_str().unwrap_or_default());
        match &self.op {
            LabelOp::Exists => value.is_some(),
            LabelOp::DoesNotExist => value.is_none(),
            LabelOp::Equals(v) => value == Some(v.as_str()),
            LabelOp::NotEquals(v) => value != Some(v.as_str()),
            LabelOp::In(vs) => value.is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelOp::NotIn(vs) => !value.is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelOp::GreaterThan(n) => value
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x > *n),
            LabelOp::LessThan(n) => value
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x < *n),
        }
    }
}

impl fmt::Display for LabelRequirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = &self.key;
        match &self.op {
            LabelOp::Exists => write!(f, "{k}"),
            LabelOp::DoesNotExist => write!(f, "!{k}"),
            LabelOp::Equals(v) => write!(f, "{k}={v}"),
            LabelOp::NotEquals(v) => write!(f, "{k}!={v}"),
            LabelOp::In(vs) => write!(f, "{k} in ({})", vs.join(",")),
            LabelOp::NotIn(vs) => write!(f, "{k} notin ({})", vs.join(",")),
            LabelOp::GreaterThan(n) => write!(f, "{k}>{n}"),
            LabelOp::LessThan(n) => write!(f, "{k}<{n}"),
        }
    }
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub requirements: Vec<LabelRequirement>,
}

impl LabelSelector {
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Parse Kubernetes label-selector syntax. Errors are `BadRequest`
    /// naming the selector.
    pub fn parse(input: &str) -> Result<Self, ApiError> {
        parse_labels(input).map_err(|e| {
            ApiError::BadRequest(format!("unable to parse labelSelector {input:?}: {e}"))
        })
    }

    /// Whether `obj`'s `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.requirements.iter().map(|r| r.to_string()).collect();
        write!(f, "{}", parts.join(","))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Not,   // !
    Eq,    // = or ==
    NotEq, // !=
    Gt,    // >
    Lt,    // <
    Comma, // ,
    Open,  // (
    Close, // )
}

fn describe(t: Option<&Tok>) -> String {
    match t {
        None => "end of input".into(),
        Some(Tok::Ident(s)) => format!("'{s}'"),
        Some(Tok::Not) => "'!'".into(),
        Some(Tok::Eq) => "'='".into(),
        Some(Tok::NotEq) => "'!='".into(),
        Some(Tok::Gt) => "'>'".into(),
        Some(Tok::Lt) => "'<'".into(),
        Some(Tok::Comma) => "','".into(),
        Some(Tok::Open) => "'('".into(),
        Some(Tok::Close) => "')'".into(),
    }
}

fn lex(input: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = input.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            ',' => {
                out.push(Tok::Comma);
                i += 1;
            }
            '(' => {
                out.push(Tok::Open);
                i += 1;
            }
            ')' => {
                out.push(Tok::Close);
                i += 1;
            }
            '>' => {
                out.push(Tok::Gt);
                i += 1;
            }
            '<' => {
                out.push(Tok::Lt);
                i += 1;
            }
            '=' => {
                i += 1;
                if chars.get(i) == Some(&'=') {
                    i += 1;
                }
                out.push(Tok::Eq);
            }
            '!' => {
                i += 1;
                if chars.get(i) == Some(&'=') {
                    i += 1;
                    out.push(Tok::NotEq);
                } else {
                    out.push(Tok::Not);
                }
            }
            _ => {
                let start = i;
                while i < chars.len()
                    && !chars[i].is_whitespace()
                    && !matches!(chars[i], ',' | '(' | ')' | '=' | '!' | '<' | '>')
                {
                    i += 1;
                }
                out.push(Tok::Ident(chars[start..i].iter().collect()));
            }
        }
    }
    Ok(out)
}

fn is_name_part(s: &str) -> bool {
    // [A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?, at most 63 characters
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// Kubernetes qualified name: `[prefix/]name`.
pub(crate) fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !is_dns_subdomain(p)
    {
        return Err(format!(
            "invalid label key {key:?}: prefix must be a DNS subdomain"
        ));
    }
    if !is_name_part(name) {
        return Err(format!(
            "invalid label key {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', start and end with an alphanumeric character, and be at most 63 characters"
        ));
    }
    Ok(())
}

pub(crate) fn validate_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || is_name_part(v) {
        Ok(())
    } else {
        Err(format!(
            "invalid label value {v:?}: must be empty or consist of alphanumeric characters, '-', '_' or '.', start and end with an alphanumeric character, and be at most 63 characters"
        ))
    }
}

fn parse_labels(input: &str) -> Result<LabelSelector, String> {
    let toks = lex(input)?;
    let mut reqs = Vec::new();
    let mut i = 0;
    if toks.is_empty() {
        return Ok(LabelSelector::default());
    }
    loop {
        let req = match toks.get(i) {
            Some(Tok::Not) => {
                i += 1;
                let key = match toks.get(i) {
                    Some(Tok::Ident(k)) => k.clone(),
                    other => {
                        return Err(format!(
                            "found {}, expected: identifier after '!'",
                            describe(other)
                        ));
                    }
                };
                i += 1;
                validate_label_key(&key)?;
                LabelRequirement {
                    key,
                    op: LabelOp::DoesNotExist,
                }
            }
            Some(Tok::Ident(k)) => {
                let key = k.clone();
                validate_label_key(&key)?;
                i += 1;
                let op = match toks.get(i) {
                    None | Some(Tok::Comma) => LabelOp::Exists,
                    Some(Tok::Eq) | Some(Tok::NotEq) => {
                        let neg = toks.get(i) == Some(&Tok::NotEq);
                        i += 1;
                        let value = match toks.get(i) {
                            Some(Tok::Ident(v)) => {
                                i += 1;
                                v.clone()
                            }
                            None | Some(Tok::Comma) => String::new(),
                            other => {
                                return Err(format!(
                                    "found {}, expected: a value",
                                    describe(other)
                                ));
                            }
                        };
                        validate_label_value(&value)?;
                        if neg {
                            LabelOp::NotEquals(value)
                        } else {
                            LabelOp::Equals(value)
                        }
                    }
                    Some(Tok::Gt) | Some(Tok::Lt) => {
                        let gt = toks.get(i) == Some(&Tok::Gt);
                        i += 1;
                        let n = match toks.get(i) {
                            Some(Tok::Ident(v)) => v.parse::<i64>().map_err(|_| {
                                format!("for 'gt', 'lt' operators, the value must be an integer, found '{v}'")
                            })?,
                            other => return Err(format!("found {}, expected: an integer", describe(other))),
                        };
                        i += 1;
                        if gt {
                            LabelOp::GreaterThan(n)
                        } else {
                            LabelOp::LessThan(n)
                        }
                    }
                    Some(Tok::Ident(w)) if w == "in" || w == "notin" => {
                        let is_in = w == "in";
                        i += 1;
                        if toks.get(i) != Some(&Tok::Open) {
                            return Err(format!("found {}, expected: '('", describe(toks.get(i))));
                        }
                        i += 1;
                        let mut values = Vec::new();
                        loop {
                            match toks.get(i) {
                                Some(Tok::Ident(v)) => {
                                    validate_label_value(v)?;
                                    values.push(v.clone());
                                    i += 1;
                                }
                                other => {
                                    return Err(format!(
                                        "found {}, expected: a value",
                                        describe(other)
                                    ));
                                }
                            }
                            match toks.get(i) {
                                Some(Tok::Comma) => i += 1,
                                Some(Tok::Close) => {
                                    i += 1;
                                    break;
                                }
                                other => {
                                    return Err(format!(
                                        "found {}, expected: ',' or ')'",
                                        describe(other)
                                    ));
                                }
                            }
                        }
                        if is_in {
                            LabelOp::In(values)
                        } else {
                            LabelOp::NotIn(values)
                        }
                    }
                    other => {
                        return Err(format!(
                            "found {}, expected: in, notin, =, ==, !=, gt, lt",
                            describe(other)
                        ));
                    }
                };
                LabelRequirement { key, op }
            }
            other => {
                return Err(format!(
                    "found {}, expected: !, identifier",
                    describe(other)
                ));
            }
        };
        reqs.push(req);
        match toks.get(i) {
            None => break,
            Some(Tok::Comma) => {
                i += 1;
                if i >= toks.len() {
                    return Err("found end of input, expected: requirement after ','".into());
                }
            }
            other => return Err(format!("found {}, expected: ','", describe(other))),
        }
    }
    Ok(LabelSelector { requirements: reqs })
}

/// One `field=value` / `field!=value` term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    pub field: String,
    pub value: String,
    pub negated: bool,
}

/// A parsed field selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    pub requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Parse `a=b,c!=d`. Unknown fields and bad syntax are `BadRequest`.
    pub fn parse(input: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for term in input.split(',') {
            let term = term.trim();
            if term.is_empty() {
                if input.trim().is_empty() {
                    continue;
                }
                return Err(ApiError::BadRequest(format!(
                    "invalid fieldSelector {input:?}: empty term"
                )));
            }
            let (field, value, negated) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, false)
            } else {
                return Err(ApiError::BadRequest(format!(
                    "invalid fieldSelector {input:?}: invalid selector term {term:?}: expected field=value, field==value or field!=value"
                )));
            };
            let field = field.trim();
            if !FIELD_SELECTOR_FIELDS.contains(&field) {
                return Err(ApiError::BadRequest(format!(
                    "invalid fieldSelector {input:?}: field label not supported: {field} (supported: {})",
                    FIELD_SELECTOR_FIELDS.join(", ")
                )));
            }
            reqs.push(FieldRequirement {
                field: field.to_string(),
                value: value.trim().to_string(),
                negated,
            });
        }
        Ok(FieldSelector { requirements: reqs })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.requirements.iter().all(|r| {
            let mut cur = Some(obj);
            for part in r.field.split('.') {
                cur = cur.and_then(|c| c.get(part));
            }
            let actual = cur.and_then(Value::as_str).unwrap_or_default();
            (actual == r.value) != r.negated
        })
    }
}

impl fmt::Display for FieldSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| {
                format!(
                    "{}{}{}",
                    r.field,
                    if r.negated { "!=" } else { "=" },
                    r.value
                )
            })
            .collect();
        write!(f, "{}", parts.join(","))
    }
}

/// Label and field selector together: what list and watch filter by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selector {
    pub fn everything() -> Self {
        Self::default()
    }

    /// Parse optional `labelSelector` and `fieldSelector` query values.
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, ApiError> {
        Ok(Selector {
            labels: labels
                .map(LabelSelector::parse)
                .transpose()?
                .unwrap_or_default(),
            fields: fields
                .map(FieldSelector::parse)
                .transpose()?
                .unwrap_or_default(),
        })
    }

    pub fn labels(input: &str) -> Result<Self, ApiError> {
        Self::parse(Some(input), None)
    }

    pub fn fields(input: &str) -> Result<Self, ApiError> {
        Self::parse(None, Some(input))
    }

    pub fn is_everything(&self) -> bool {
        self.labels.is_everything() && self.fields.is_everything()
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "n1", "namespace": "ns", "labels": labels}, "status": {"phase": "Running"}})
    }

    #[test]
    fn parses_all_operators() {
        let s =
            LabelSelector::parse("a=b, c==d,e!=f,g in (x, y),h notin (z),i,!j,k>3,l<9").unwrap();
        assert_eq!(s.requirements.len(), 9);
        assert_eq!(s.requirements[0].op, LabelOp::Equals("b".into()));
        assert_eq!(s.requirements[1].op, LabelOp::Equals("d".into()));
        assert_eq!(s.requirements[2].op, LabelOp::NotEquals("f".into()));
        assert_eq!(
            s.requirements[3].op,
            LabelOp::In(vec!["x".into(), "y".into()])
        );
        assert_eq!(s.requirements[4].op, LabelOp::NotIn(vec!["z".into()]));
        assert_eq!(s.requirements[5].op, LabelOp::Exists);
        assert_eq!(s.requirements[6].op, LabelOp::DoesNotExist);
        assert_eq!(s.requirements[7].op, LabelOp::GreaterThan(3));
        assert_eq!(s.requirements[8].op, LabelOp::LessThan(9));
        assert_eq!(
            s.to_string(),
            "a=b,c=d,e!=f,g in (x,y),h notin (z),i,!j,k>3,l<9"
        );
        let s = LabelSelector::parse("kubevirt.io/domain=vm1,app.kubernetes.io/name").unwrap();
        assert_eq!(s.requirements[0].key, "kubevirt.io/domain");
        assert!(LabelSelector::parse("").unwrap().is_everything());
        assert_eq!(
            LabelSelector::parse("a=").unwrap().requirements[0].op,
            LabelOp::Equals(String::new())
        );
    }

    #[test]
    fn rejects_bad_syntax_naming_the_selector() {
        for bad in [
            "a in x",
            "a in (x",
            "a=b=c",
            ",a",
            "a,",
            "!",
            "a b",
            "a in ()",
            "-a=b",
            "a=-b-",
            "k>x",
            "a==(b)",
            "Bad/Prefix/x=y",
        ] {
            let err = LabelSelector::parse(bad).expect_err(bad);
            assert_eq!(err.code(), 400, "{bad}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn matching() {
        let o = obj(json!({"app": "web", "tier": "1"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m("app=web"));
        assert!(!m("app=db"));
        assert!(m("app!=db"));
        assert!(m("missing!=x"));
        assert!(m("app in (db,web)"));
        assert!(!m("app notin (db,web)"));
        assert!(m("missing notin (x)"));
        assert!(!m("missing in (x)"));
        assert!(m("app"));
        assert!(!m("!app"));
        assert!(m("!missing"));
        assert!(m("tier>0"));
        assert!(!m("tier<1"));
        assert!(m("app=web,tier=1"));
        assert!(!m("app=web,tier=2"));
        let bare = json!({"metadata": {"name": "x"}});
        assert!(LabelSelector::parse("!a").unwrap().matches(&bare));
        assert!(!LabelSelector::parse("a").unwrap().matches(&bare));
    }

    #[test]
    fn field_selectors() {
        let o = json!({"metadata": {"name": "n1", "namespace": "ns"}, "status": {"phase": "Running", "nodeName": "h1"}});
        let f = |s: &str| FieldSelector::parse(s).unwrap().matches(&o);
        assert!(f("metadata.name=n1"));
        assert!(f("metadata.name==n1,metadata.namespace=ns"));
        assert!(!f("metadata.name!=n1"));
        assert!(f("status.nodeName=h1"));
        assert!(f("status.phase!=Pending"));
        assert!(!f("status.phase=Pending"));
        let bare = json!({"metadata": {"name": "n1"}});
        assert!(
            FieldSelector::parse("status.nodeName=")
                .unwrap()
                .matches(&bare)
        );
        let e = FieldSelector::parse("spec.foo=bar").unwrap_err();
        assert_eq!(e.code(), 400);
        assert!(
            e.to_string()
                .contains("field label not supported: spec.foo")
        );
        assert!(FieldSelector::parse("metadata.name").is_err());
        assert!(FieldSelector::parse("").unwrap().is_everything());
    }
}
