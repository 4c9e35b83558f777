//! Scheduling fields of a VMI spec with Kubernetes' JSON names
//! (`core/v1` Affinity, Toleration, Taint) and their validation.
//!
//! krvirt evaluates VM (anti-)affinity per host: the only `topologyKey`
//! admitted is [`HOSTNAME_TOPOLOGY_KEY`] (every host carries it, its value
//! being the host name). Other keys are refused with `FieldValueNotSupported`.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::admission::{Causes, idx, join};
use crate::meta::null_default;
use crate::util;

/// The per-host topology key of VM (anti-)affinity.
pub const HOSTNAME_TOPOLOGY_KEY: &str = "kubernetes.io/hostname";

/// `spec.affinity`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Affinity {
    /// Rules on host labels (and the host name, `matchFields metadata.name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_affinity: Option<NodeAffinity>,
    /// Go on a host running VMIs that match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_affinity: Option<PodAffinity>,
    /// Stay off hosts running VMIs that match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_anti_affinity: Option<PodAffinity>,
}

/// Node affinity: a hard selector and weighted preferences.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeAffinity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_during_scheduling_ignored_during_execution: Option<NodeSelector>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub preferred_during_scheduling_ignored_during_execution: Vec<PreferredSchedulingTerm>,
}

/// Terms are ORed; the requirements inside one term are ANDed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSelector {
    #[serde(default, deserialize_with = "null_default")]
    pub node_selector_terms: Vec<NodeSelectorTerm>,
}

/// Requirements on host labels (`matchExpressions`) and fields
/// (`matchFields`: only `metadata.name`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSelectorTerm {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub match_expressions: Vec<NodeSelectorRequirement>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub match_fields: Vec<NodeSelectorRequirement>,
}

/// `key operator values`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub values: Vec<String>,
}

/// Selector operators (`Gt`/`Lt` only in node selectors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
}

/// A weighted node preference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreferredSchedulingTerm {
    /// 1..=100.
    pub weight: i32,
    pub preference: NodeSelectorTerm,
}

/// `podAffinity` / `podAntiAffinity` (VMIs play the pods' part; a VMI's
/// labels are its `metadata.labels`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodAffinity {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub required_during_scheduling_ignored_during_execution: Vec<PodAffinityTerm>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub preferred_during_scheduling_ignored_during_execution: Vec<WeightedPodAffinityTerm>,
}

/// VMIs matching `labelSelector` in `namespaces` (empty: the VMI's own),
/// per `topologyKey` domain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodAffinityTerm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<LabelSelector>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub namespaces: Vec<String>,
    /// Only `kubernetes.io/hostname` (per host).
    #[serde(default)]
    pub topology_key: String,
}

/// A weighted VM (anti-)affinity preference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedPodAffinityTerm {
    /// 1..=100.
    pub weight: i32,
    pub pod_affinity_term: PodAffinityTerm,
}

/// A label selector (`matchLabels` and `matchExpressions`, ANDed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub match_labels: BTreeMap<String, String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// `key operator values` on labels (In, NotIn, Exists, DoesNotExist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub values: Vec<String>,
}

/// Taint effects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum TaintEffect {
    /// No new VMI is placed on the host unless it tolerates the taint.
    NoSchedule,
    /// The scheduler avoids the host.
    PreferNoSchedule,
    /// Like NoSchedule; VMIs already there that do not tolerate it are
    /// evicted.
    NoExecute,
}

impl TaintEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "NoSchedule" => Some(TaintEffect::NoSchedule),
            "PreferNoSchedule" => Some(TaintEffect::PreferNoSchedule),
            "NoExecute" => Some(TaintEffect::NoExecute),
            _ => None,
        }
    }
}

/// A host taint (`spec.taints[]` of a Host).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Taint {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub effect: TaintEffect,
    /// RFC 3339 time a NoExecute taint was added (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_added: Option<String>,
}

impl std::fmt::Display for Taint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.value.as_deref().filter(|v| !v.is_empty()) {
            Some(v) => write!(f, "{}={}:{}", self.key, v, self.effect.as_str()),
            None => write!(f, "{}:{}", self.key, self.effect.as_str()),
        }
    }
}

/// Toleration operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum TolerationOperator {
    Equal,
    Exists,
}

/// A VMI toleration (`spec.tolerations[]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Toleration {
    /// Empty with `Exists`: tolerates every taint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Default `Equal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<TolerationOperator>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Unset: every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
    /// With `NoExecute`: how long the VMI stays on a host after the taint
    /// appears (unset: forever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<i64>,
}

impl Toleration {
    /// Does this toleration tolerate `taint`?
    pub fn tolerates(&self, taint: &Taint) -> bool {
        if self.effect.is_some_and(|e| e != taint.effect) {
            return false;
        }
        let key = self.key.as_deref().unwrap_or("");
        match self.operator.unwrap_or(TolerationOperator::Equal) {
            TolerationOperator::Exists => key.is_empty() || key == taint.key,
            TolerationOperator::Equal => {
                key == taint.key
                    && self.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
            }
        }
    }
}

fn check_key(key: &str, f: &str, c: &mut Causes) {
    if key.is_empty() {
        c.required(f, "Required value");
    } else if let Some(problem) = util::qualified_name(key) {
        c.invalid(f, format!("{key:?}: {problem}"));
    }
}

fn check_label_value(v: &str, f: &str, c: &mut Causes) {
    if let Some(problem) = util::label_value(v) {
        c.invalid(f, format!("{v:?}: {problem}"));
    }
}

fn check_weight(w: i32, f: &str, c: &mut Causes) {
    if !(1..=100).contains(&w) {
        c.invalid(f, format!("{w}: must be in the range 1-100"));
    }
}

fn node_requirement(r: &NodeSelectorRequirement, p: &str, field: bool, c: &mut Causes) {
    let kf = join(p, "key");
    let vf = join(p, "values");
    if field {
        if r.key != "metadata.name" {
            c.not_supported(
                &kf,
                format!("{:?}: the only supported field is \"metadata.name\"", r.key),
            );
        }
        if !matches!(r.operator, SelectorOperator::In | SelectorOperator::NotIn) {
            c.not_supported(
                join(p, "operator"),
                format!("{:?}: matchFields supports In and NotIn", r.operator_name()),
            );
        }
        if r.values.len() != 1 {
            c.invalid(&vf, "must have exactly one value for metadata.name");
        }
        return;
    }
    check_key(&r.key, &kf, c);
    match r.operator {
        SelectorOperator::In | SelectorOperator::NotIn => {
            if r.values.is_empty() {
                c.required(&vf, "must be specified when `operator` is 'In' or 'NotIn'");
            }
            for (i, v) in r.values.iter().enumerate() {
                check_label_value(v, &idx(&vf, i), c);
            }
        }
        SelectorOperator::Exists | SelectorOperator::DoesNotExist => {
            if !r.values.is_empty() {
                c.forbidden(
                    &vf,
                    "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                );
            }
        }
        SelectorOperator::Gt | SelectorOperator::Lt => {
            if r.values.len() != 1 {
                c.required(
                    &vf,
                    "must be specified single value when `operator` is 'Lt' or 'Gt'",
                );
            } else if r.values[0].parse::<i64>().is_err() {
                c.invalid(
                    idx(&vf, 0),
                    format!("{:?}: must be an integer", r.values[0]),
                );
            }
        }
    }
}

impl NodeSelectorRequirement {
    fn operator_name(&self) -> &'static str {
        operator_name(self.operator)
    }
}

fn operator_name(o: SelectorOperator) -> &'static str {
    match o {
        SelectorOperator::In => "In",
        SelectorOperator::NotIn => "NotIn",
        SelectorOperator::Exists => "Exists",
        SelectorOperator::DoesNotExist => "DoesNotExist",
        SelectorOperator::Gt => "Gt",
        SelectorOperator::Lt => "Lt",
    }
}

fn node_term(t: &NodeSelectorTerm, p: &str, c: &mut Causes) {
    for (i, r) in t.match_expressions.iter().enumerate() {
        node_requirement(r, &idx(&join(p, "matchExpressions"), i), false, c);
    }
    for (i, r) in t.match_fields.iter().enumerate() {
        node_requirement(r, &idx(&join(p, "matchFields"), i), true, c);
    }
}

/// Validate a label selector at `p`.
pub(crate) fn label_selector(s: &LabelSelector, p: &str, c: &mut Causes) {
    for (k, v) in &s.match_labels {
        let f = format!("{}[{k}]", join(p, "matchLabels"));
        check_key(k, &f, c);
        check_label_value(v, &f, c);
    }
    for (i, r) in s.match_expressions.iter().enumerate() {
        let rp = idx(&join(p, "matchExpressions"), i);
        check_key(&r.key, &join(&rp, "key"), c);
        let vf = join(&rp, "values");
        match r.operator {
            SelectorOperator::In | SelectorOperator::NotIn => {
                if r.values.is_empty() {
                    c.required(&vf, "must be specified when `operator` is 'In' or 'NotIn'");
                }
                for (j, v) in r.values.iter().enumerate() {
                    check_label_value(v, &idx(&vf, j), c);
                }
            }
            SelectorOperator::Exists | SelectorOperator::DoesNotExist => {
                if !r.values.is_empty() {
                    c.forbidden(
                        &vf,
                        "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                    );
                }
            }
            SelectorOperator::Gt | SelectorOperator::Lt => c.not_supported(
                join(&rp, "operator"),
                format!(
                    "{:?}: not a valid selector operator (supported: In, NotIn, Exists, DoesNotExist)",
                    operator_name(r.operator)
                ),
            ),
        }
    }
}

fn pod_term(t: &PodAffinityTerm, p: &str, c: &mut Causes) {
    if let Some(s) = &t.label_selector {
        label_selector(s, &join(p, "labelSelector"), c);
    }
    for (i, ns) in t.namespaces.iter().enumerate() {
        if let Some(problem) = util::dns1123_label(ns) {
            c.invalid(idx(&join(p, "namespaces"), i), format!("{ns:?}: {problem}"));
        }
    }
    let tf = join(p, "topologyKey");
    if t.topology_key.is_empty() {
        c.required(&tf, "can not be empty");
    } else if t.topology_key != HOSTNAME_TOPOLOGY_KEY {
        c.not_supported(
            &tf,
            format!(
                "{:?}: krvirt supports VM affinity per host only (topologyKey {HOSTNAME_TOPOLOGY_KEY:?})",
                t.topology_key
            ),
        );
    }
}

fn pod_affinity(a: &PodAffinity, p: &str, c: &mut Causes) {
    let rp = join(p, "requiredDuringSchedulingIgnoredDuringExecution");
    for (i, t) in a
        .required_during_scheduling_ignored_during_execution
        .iter()
        .enumerate()
    {
        pod_term(t, &idx(&rp, i), c);
    }
    let pp = join(p, "preferredDuringSchedulingIgnoredDuringExecution");
    for (i, w) in a
        .preferred_during_scheduling_ignored_during_execution
        .iter()
        .enumerate()
    {
        let wp = idx(&pp, i);
        check_weight(w.weight, &join(&wp, "weight"), c);
        pod_term(&w.pod_affinity_term, &join(&wp, "podAffinityTerm"), c);
    }
}

/// Validate `spec.affinity` at `p`.
pub(crate) fn affinity(a: &Affinity, p: &str, c: &mut Causes) {
    if let Some(na) = &a.node_affinity {
        let np = join(p, "nodeAffinity");
        if let Some(req) = &na.required_during_scheduling_ignored_during_execution {
            let rp = join(
                &join(&np, "requiredDuringSchedulingIgnoredDuringExecution"),
                "nodeSelectorTerms",
            );
            if req.node_selector_terms.is_empty() {
                c.required(&rp, "must have at least one node selector term");
            }
            for (i, t) in req.node_selector_terms.iter().enumerate() {
                node_term(t, &idx(&rp, i), c);
            }
        }
        let pp = join(&np, "preferredDuringSchedulingIgnoredDuringExecution");
        for (i, w) in na
            .preferred_during_scheduling_ignored_during_execution
            .iter()
            .enumerate()
        {
            let wp = idx(&pp, i);
            check_weight(w.weight, &join(&wp, "weight"), c);
            node_term(&w.preference, &join(&wp, "preference"), c);
        }
    }
    if let Some(pa) = &a.pod_affinity {
        pod_affinity(pa, &join(p, "podAffinity"), c);
    }
    if let Some(pa) = &a.pod_anti_affinity {
        pod_affinity(pa, &join(p, "podAntiAffinity"), c);
    }
}

/// Validate `spec.tolerations` at `p`.
pub(crate) fn tolerations(ts: &[Toleration], p: &str, c: &mut Causes) {
    for (i, t) in ts.iter().enumerate() {
        let tp = idx(p, i);
        let key = t.key.as_deref().unwrap_or("");
        if !key.is_empty() {
            check_key(key, &join(&tp, "key"), c);
        }
        match t.operator.unwrap_or(TolerationOperator::Equal) {
            TolerationOperator::Equal => {
                if key.is_empty() {
                    c.invalid(
                        join(&tp, "operator"),
                        "operator must be Exists when `key` is empty, which means \"match all values and all keys\"",
                    );
                }
                if let Some(v) = &t.value {
                    check_label_value(v, &join(&tp, "value"), c);
                }
            }
            TolerationOperator::Exists => {
                if t.value.as_deref().is_some_and(|v| !v.is_empty()) {
                    c.invalid(
                        join(&tp, "operator"),
                        "value must be empty when `operator` is 'Exists'",
                    );
                }
            }
        }
        if let Some(s) = t.toleration_seconds {
            if t.effect != Some(TaintEffect::NoExecute) {
                c.invalid(
                    join(&tp, "effect"),
                    "effect must be 'NoExecute' when `tolerationSeconds` is set",
                );
            }
            if s < 0 {
                c.invalid(
                    join(&tp, "tolerationSeconds"),
                    format!("{s}: must be greater than or equal to 0"),
                );
            }
        }
    }
}

/// Validate a Host's `spec.taints` at `p`.
pub(crate) fn taints(ts: &[Taint], p: &str, c: &mut Causes) {
    let mut seen = HashSet::new();
    for (i, t) in ts.iter().enumerate() {
        let tp = idx(p, i);
        check_key(&t.key, &join(&tp, "key"), c);
        if let Some(v) = &t.value {
            check_label_value(v, &join(&tp, "value"), c);
        }
        if let Some(ts) = &t.time_added
            && crate::meta::parse_rfc3339(ts).is_none()
        {
            c.invalid(
                join(&tp, "timeAdded"),
                format!("{ts:?} is not an RFC 3339 timestamp"),
            );
        }
        if !seen.insert((t.key.clone(), t.effect)) {
            c.duplicate(
                &tp,
                format!(
                    "taints must be unique by key and effect pair ({}:{})",
                    t.key,
                    t.effect.as_str()
                ),
            );
        }
    }
}

/// One `kubectl taint`-style argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaintArg {
    pub key: String,
    pub value: Option<String>,
    /// Always set when adding; a removal without one removes every effect.
    pub effect: Option<TaintEffect>,
    pub remove: bool,
}

/// Parse `kubectl taint` syntax: `key[=value]:Effect` (add) or
/// `key[:Effect]-` (remove).
pub fn parse_taint_arg(arg: &str) -> Result<TaintArg, String> {
    let (body, remove) = match arg.strip_suffix('-') {
        Some(b) => (b, true),
        None => (arg, false),
    };
    let (kv, effect) = match body.rsplit_once(':') {
        Some((kv, e)) => {
            let effect = TaintEffect::parse(e).ok_or_else(|| {
                format!("{arg:?}: unknown effect {e:?} (NoSchedule, PreferNoSchedule or NoExecute)")
            })?;
            (kv, Some(effect))
        }
        None => (body, None),
    };
    if !remove && effect.is_none() {
        return Err(format!(
            "{arg:?}: a taint needs an effect: key[=value]:NoSchedule|PreferNoSchedule|NoExecute"
        ));
    }
    let (key, value) = match kv.split_once('=') {
        Some((k, v)) => (k, Some(v.to_string())),
        None => (kv, None),
    };
    if key.is_empty() {
        return Err(format!("{arg:?}: empty taint key"));
    }
    if let Some(problem) = util::qualified_name(key) {
        return Err(format!("{arg:?}: key {key:?}: {problem}"));
    }
    if let Some(v) = &value
        && let Some(problem) = util::label_value(v)
    {
        return Err(format!("{arg:?}: value {v:?}: {problem}"));
    }
    Ok(TaintArg {
        key: key.to_string(),
        value,
        effect,
        remove,
    })
}
