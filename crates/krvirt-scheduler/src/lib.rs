//! krvirt's scheduler: filter then score, over a snapshot of hosts and the
//! VMIs already placed on them. No I/O: the placement controller builds a
//! [`Scheduler`] from the Hosts and VMIs it listed, asks it for a
//! [`Placement`] and writes the result back.
//!
//! Filters (each host is counted once, under the first filter it fails, in
//! the message of an unschedulable VMI): Ready, not cordoned, nodeSelector,
//! required node affinity, untolerated `NoSchedule`/`NoExecute` taints,
//! CPU and memory capacity with over-commit, dedicated CPUs, hugepages,
//! guest NUMA nodes fitting host NUMA nodes, required VM affinity and
//! anti-affinity (both the VMI's own terms and the anti-affinity of VMIs
//! already placed).
//!
//! Scores (summed): least-allocated and balanced CPU/memory (spreading),
//! preferred node affinity, untolerated `PreferNoSchedule` taints, preferred
//! VM affinity and anti-affinity, each normalized to 0..=100 across the
//! feasible hosts.
//!
//! Over-commit (KubeVirt's `cpuAllocationRatio` and memory overcommit
//! percent) scales a host's allocatable capacity: a host with 4 CPUs and a
//! ratio of 10 takes VMIs whose CPU requests sum to 40 CPUs. VMIs with
//! dedicated CPUs take whole host CPUs out of that shared pool, never
//! over-committed.
//!
//! VM (anti-)affinity works per host (`topologyKey: kubernetes.io/hostname`)
//! or per domain of any host label (`topology.kubernetes.io/zone`...).
//!
//! Speed: per-host usage is kept incrementally; every distinct VM
//! (anti-)affinity term has a per-host (and per-domain) count of the VMIs it matches,
//! updated when a VMI is placed (terms are found through an index on their
//! first `matchLabels` pair), so checking a term against a host is one
//! array read.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};

pub mod model;

pub use model::*;

/// KubeVirt's default `cpuAllocationRatio`.
pub const DEFAULT_CPU_ALLOCATION_RATIO: f64 = 10.0;

/// Over-commit of one host or of the whole cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overcommit {
    /// Shared CPU capacity = allocatable CPUs × this (KubeVirt default 10).
    pub cpu_allocation_ratio: f64,
    /// Memory capacity = allocatable memory × this / 100 (default 100).
    pub memory_overcommit_percent: u32,
}

impl Default for Overcommit {
    fn default() -> Self {
        Overcommit {
            cpu_allocation_ratio: DEFAULT_CPU_ALLOCATION_RATIO,
            memory_overcommit_percent: 100,
        }
    }
}

/// One host CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCpu {
    pub id: u32,
    pub numa_node: u32,
}

/// One host NUMA node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostNuma {
    pub id: u32,
    pub memory_bytes: u64,
}

/// A hugepage pool of one page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostHugepages {
    pub page_size: u64,
    /// Pages in the pool (VMIs placed here are accounted by the scheduler).
    pub total: u64,
}

/// What the scheduler knows about a host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Ready and heartbeating.
    pub ready: bool,
    /// Cordoned.
    pub unschedulable: bool,
    pub taints: Vec<Taint>,
    /// Allocatable CPU in millicores; 0 = unknown (then the number of
    /// `cpus`, or CPU is not checked at all when that is empty too).
    pub cpu_millis: u64,
    /// Allocatable memory in bytes.
    pub memory_bytes: u64,
    /// Host CPU ids with their NUMA node (for dedicated CPUs).
    pub cpus: Vec<HostCpu>,
    pub numa_nodes: Vec<HostNuma>,
    pub hugepages: Vec<HostHugepages>,
    /// Per-host over-commit; `None` uses the cluster's.
    pub overcommit: Option<Overcommit>,
}

/// What a VMI asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmiRequest {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub vcpus: u32,
    /// Shared CPU request in millicores (usually `vcpus × 1000`).
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub node_selector: BTreeMap<String, String>,
    pub affinity: Affinity,
    pub tolerations: Vec<Toleration>,
    /// `dedicatedCpuPlacement`: `vcpus` exclusive host CPUs.
    pub dedicated_cpus: bool,
    /// Guest NUMA nodes (0 = none); each must fit inside one host NUMA
    /// node (its share of vCPUs and memory), on distinct host nodes.
    pub guest_numa_nodes: u32,
    /// Back guest memory with hugepages of this size (bytes).
    pub hugepage_size: Option<u64>,
}

impl VmiRequest {
    /// A plain request: `vcpus` shared vCPUs and `memory_bytes` of memory.
    pub fn new(namespace: &str, name: &str, vcpus: u32, memory_bytes: u64) -> Self {
        VmiRequest {
            namespace: namespace.to_string(),
            name: name.to_string(),
            vcpus,
            cpu_millis: u64::from(vcpus) * 1000,
            memory_bytes,
            ..Default::default()
        }
    }
}

/// Where a VMI goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub host: String,
    /// Exclusive host CPU ids (ascending) when `dedicated_cpus`; the
    /// controller records them for the agent to pin vCPU i to the i-th id.
    pub dedicated_cpus: Vec<u32>,
    /// Host NUMA node id of each guest NUMA node.
    pub numa_nodes: Vec<u32>,
}

/// Why a host was not chosen (the first filter it failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    NotReady,
    Unschedulable,
    NodeSelector,
    NodeAffinity,
    Taint,
    Cpu,
    Memory,
    DedicatedCpus,
    Hugepages,
    Numa,
    VmAffinity,
    VmAntiAffinity,
    ExistingAntiAffinity,
}

impl Reason {
    pub fn describe(self) -> &'static str {
        match self {
            Reason::NotReady => "not ready",
            Reason::Unschedulable => "unschedulable (cordoned)",
            Reason::NodeSelector => "didn't match the VMI's nodeSelector",
            Reason::NodeAffinity => "didn't match the VMI's node affinity",
            Reason::Taint => "node(s) had untolerated taint",
            Reason::Cpu => "insufficient cpu",
            Reason::Memory => "insufficient memory",
            Reason::DedicatedCpus => "insufficient dedicated cpus",
            Reason::Hugepages => "insufficient hugepages",
            Reason::Numa => "guest NUMA nodes don't fit the host's NUMA nodes",
            Reason::VmAffinity => "didn't match VM affinity rules",
            Reason::VmAntiAffinity => "didn't match VM anti-affinity rules",
            Reason::ExistingAntiAffinity => "didn't satisfy existing VMs' anti-affinity rules",
        }
    }
}

/// No host can take the VMI: reasons counted per host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    pub hosts: usize,
    pub reasons: BTreeMap<Reason, usize>,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0/{} hosts are available", self.hosts)?;
        for (i, (r, n)) in self.reasons.iter().enumerate() {
            write!(
                f,
                "{}{n} {}",
                if i == 0 { ": " } else { ", " },
                r.describe()
            )?;
        }
        write!(f, ".")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("{0}")]
    Unschedulable(Unschedulable),
    /// The request itself is wrong; `field` is its path in the VMI.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("unknown host {0}")]
    UnknownHost(String),
    #[error("host CPU {cpu} on {host} is not free (or does not exist)")]
    CpuTaken { host: String, cpu: u32 },
}

struct NumaState {
    id: u32,
    free_cpus: Vec<u32>,
    cpus: u32,
    memory: u64,
    memory_used: u64,
}

struct HostState {
    name: String,
    labels: BTreeMap<String, String>,
    ready: bool,
    unschedulable: bool,
    taints: Vec<Taint>,
    /// Physical CPU millis; 0 = CPU not checked.
    cpu_phys: u64,
    cpu_ratio: f64,
    /// Shared CPU requests placed here.
    cpu_used: u64,
    /// Host CPUs handed out exclusively.
    dedicated_taken: u64,
    /// `shared_cpu_cap(0)`, kept current.
    cpu_cap: u64,
    mem_cap: u64,
    mem_used: u64,
    numa: Vec<NumaState>,
    free_dedicated: u64,
    /// (page size, total pages, used pages)
    hugepages: Vec<(u64, u64, u64)>,
}

impl HostState {
    fn shared_cpu_cap(&self, extra_dedicated: u64) -> u64 {
        if extra_dedicated == 0 {
            return self.cpu_cap;
        }
        self.compute_cpu_cap(extra_dedicated)
    }

    fn compute_cpu_cap(&self, extra_dedicated: u64) -> u64 {
        let phys = self
            .cpu_phys
            .saturating_sub((self.dedicated_taken + extra_dedicated) * 1000);
        (phys as f64 * self.cpu_ratio) as u64
    }
}

/// One distinct VM (anti-)affinity term: a selector in some namespaces,
/// over a topology (hosts, or the hosts sharing a label value).
struct Term {
    namespaces: Vec<String>,
    selector: LabelSelector,
    /// `None`: per host (`kubernetes.io/hostname`); else the host label
    /// whose values are the topology domains.
    topology: Option<String>,
    /// Per-domain sums of `matches` / `owners` when `topology` is a label.
    domain_matches: HashMap<String, u32>,
    domain_owners: HashMap<String, u32>,
    /// Placed VMIs the selector matches, per host.
    matches: Vec<u32>,
    total_matches: u64,
    /// Placed VMIs carrying this term as *required anti-affinity*, per host.
    owners: Vec<u32>,
    total_owners: u64,
}

impl Term {
    /// Matching VMIs in the domain of host `h`.
    fn matches_on(&self, h: usize, host: &HostState) -> u32 {
        match &self.topology {
            None => self.matches[h],
            Some(k) => host
                .labels
                .get(k)
                .and_then(|v| self.domain_matches.get(v))
                .copied()
                .unwrap_or(0),
        }
    }

    /// VMIs owning this term as required anti-affinity in `h`'s domain.
    fn owners_on(&self, h: usize, host: &HostState) -> u32 {
        match &self.topology {
            None => self.owners[h],
            Some(k) => host
                .labels
                .get(k)
                .and_then(|v| self.domain_owners.get(v))
                .copied()
                .unwrap_or(0),
        }
    }

    fn add_match(&mut self, h: usize, labels: &BTreeMap<String, String>) {
        self.matches[h] += 1;
        self.total_matches += 1;
        if let Some(v) = self.topology.as_ref().and_then(|k| labels.get(k)) {
            *self.domain_matches.entry(v.clone()).or_default() += 1;
        }
    }

    fn add_owner(&mut self, h: usize, labels: &BTreeMap<String, String>) {
        self.owners[h] += 1;
        self.total_owners += 1;
        if let Some(v) = self.topology.as_ref().and_then(|k| labels.get(k)) {
            *self.domain_owners.entry(v.clone()).or_default() += 1;
        }
    }

    fn applies_to(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespaces.iter().any(|n| n == namespace) && self.selector.matches(labels)
    }
}

struct PlacedVmi {
    namespace: String,
    labels: BTreeMap<String, String>,
    host: usize,
}

/// Per-call scratch space, kept to avoid allocating on every placement.
#[derive(Default)]
struct Scratch {
    anti_req: Vec<usize>,
    aff_req: Vec<usize>,
    sym: Vec<usize>,
    pref: Vec<(usize, i64)>,
    node_pref: Vec<(usize, i64)>,
    feasible: Vec<Candidate>,
}

#[derive(Clone, Copy)]
struct Candidate {
    host: usize,
    base: f64,
    node_pref: i64,
    taint_pref: i64,
    vm_pref: i64,
}

/// The scheduler over one snapshot; place VMIs one after another.
pub struct Scheduler {
    hosts: Vec<HostState>,
    by_name: HashMap<String, usize>,
    cluster_overcommit: Overcommit,
    terms: Vec<Term>,
    terms_by_hash: HashMap<u64, Vec<usize>>,
    /// first matchLabels key -> value -> terms
    terms_by_label: HashMap<String, HashMap<String, Vec<usize>>>,
    /// Terms without matchLabels (checked against every VMI).
    terms_unkeyed: Vec<usize>,
    placed: Vec<PlacedVmi>,
    any_prefer_taint: bool,
    scratch: Scratch,
}

fn term_hash(namespaces: &[String], selector: &LabelSelector, topology: Option<&str>) -> u64 {
    let mut h = DefaultHasher::new();
    namespaces.hash(&mut h);
    topology.hash(&mut h);
    selector.hash(&mut h);
    h.finish()
}

fn invalid(field: String, message: impl Into<String>) -> ScheduleError {
    ScheduleError::Invalid {
        field,
        message: message.into(),
    }
}

fn validate_node_term(term: &NodeSelectorTerm, path: &str) -> Result<(), ScheduleError> {
    for (list, name) in [
        (&term.match_expressions, "matchExpressions"),
        (&term.match_fields, "matchFields"),
    ] {
        for (i, r) in list.iter().enumerate() {
            let p = || format!("{path}.{name}[{i}]");
            match r.operator {
                Operator::In | Operator::NotIn if r.values.is_empty() => {
                    return Err(invalid(
                        format!("{}.values", p()),
                        "must be non-empty for In and NotIn",
                    ));
                }
                Operator::Exists | Operator::DoesNotExist if !r.values.is_empty() => {
                    return Err(invalid(
                        format!("{}.values", p()),
                        "must be empty for Exists and DoesNotExist",
                    ));
                }
                Operator::Gt | Operator::Lt
                    if r.values.len() != 1 || r.values[0].parse::<i64>().is_err() =>
                {
                    return Err(invalid(
                        format!("{}.values", p()),
                        "must be a single integer for Gt and Lt",
                    ));
                }
                _ => {}
            }
            if name == "matchFields" && r.key != "metadata.name" {
                return Err(invalid(
                    format!("{}.key", p()),
                    "only metadata.name is supported",
                ));
            }
        }
    }
    Ok(())
}

fn validate_vm_term(term: &PodAffinityTerm, path: &str) -> Result<(), ScheduleError> {
    if term.topology_key.is_empty() {
        return Err(invalid(
            format!("{path}.topologyKey"),
            format!("required (e.g. {HOSTNAME_LABEL} or topology.kubernetes.io/zone)"),
        ));
    }
    if let Some(sel) = &term.label_selector {
        for (i, r) in sel.match_expressions.iter().enumerate() {
            let bad = match r.operator {
                Operator::In | Operator::NotIn => r.values.is_empty(),
                Operator::Exists | Operator::DoesNotExist => !r.values.is_empty(),
                Operator::Gt | Operator::Lt => true,
            };
            if bad {
                return Err(invalid(
                    format!("{path}.labelSelector.matchExpressions[{i}]"),
                    "operator In/NotIn need values, Exists/DoesNotExist take none, Gt/Lt are not label selector operators",
                ));
            }
        }
    }
    Ok(())
}

fn validate_weight(w: i32, path: String) -> Result<(), ScheduleError> {
    if (1..=100).contains(&w) {
        Ok(())
    } else {
        Err(invalid(path, "weight must be in 1..=100"))
    }
}

/// Check a request once before any host is looked at.
pub fn validate(vmi: &VmiRequest) -> Result<(), ScheduleError> {
    let a = &vmi.affinity;
    if let Some(na) = &a.node_affinity {
        let base = "spec.affinity.nodeAffinity";
        if let Some(req) = &na.required_during_scheduling_ignored_during_execution {
            for (i, t) in req.node_selector_terms.iter().enumerate() {
                validate_node_term(
                    t,
                    &format!(
                        "{base}.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[{i}]"
                    ),
                )?;
            }
        }
        for (i, t) in na
            .preferred_during_scheduling_ignored_during_execution
            .iter()
            .enumerate()
        {
            let p = format!("{base}.preferredDuringSchedulingIgnoredDuringExecution[{i}]");
            validate_weight(t.weight, format!("{p}.weight"))?;
            validate_node_term(&t.preference, &format!("{p}.preference"))?;
        }
    }
    for (pa, name) in [
        (&a.pod_affinity, "podAffinity"),
        (&a.pod_anti_affinity, "podAntiAffinity"),
    ] {
        let Some(pa) = pa else { continue };
        for (i, t) in pa
            .required_during_scheduling_ignored_during_execution
            .iter()
            .enumerate()
        {
            validate_vm_term(
                t,
                &format!(
                    "spec.affinity.{name}.requiredDuringSchedulingIgnoredDuringExecution[{i}]"
                ),
            )?;
        }
        for (i, t) in pa
            .preferred_during_scheduling_ignored_during_execution
            .iter()
            .enumerate()
        {
            let p = format!(
                "spec.affinity.{name}.preferredDuringSchedulingIgnoredDuringExecution[{i}]"
            );
            validate_weight(t.weight, format!("{p}.weight"))?;
            validate_vm_term(&t.pod_affinity_term, &format!("{p}.podAffinityTerm"))?;
        }
    }
    for (i, t) in vmi.tolerations.iter().enumerate() {
        if t.key.is_none() && t.operator != Some(TolerationOperator::Exists) {
            return Err(invalid(
                format!("spec.tolerations[{i}].operator"),
                "must be Exists when key is empty",
            ));
        }
        if t.operator == Some(TolerationOperator::Exists) && t.value.is_some() {
            return Err(invalid(
                format!("spec.tolerations[{i}].value"),
                "must be empty when operator is Exists",
            ));
        }
    }
    if vmi.guest_numa_nodes > 0 && vmi.guest_numa_nodes > vmi.vcpus {
        return Err(invalid(
            "spec.domain.cpu.numa".into(),
            format!(
                "{} guest NUMA nodes need at least as many vCPUs (have {})",
                vmi.guest_numa_nodes, vmi.vcpus
            ),
        ));
    }
    if vmi.hugepage_size == Some(0) {
        return Err(invalid(
            "spec.domain.memory.hugepages.pageSize".into(),
            "must be positive",
        ));
    }
    Ok(())
}

/// Share `total` over `parts`: the first `total % parts` get one more.
fn share(total: u64, parts: u32, i: u32) -> u64 {
    let parts = u64::from(parts.max(1));
    total / parts + u64::from(u64::from(i) < total % parts)
}

impl Scheduler {
    /// A scheduler over `hosts` with the cluster-wide over-commit.
    pub fn new(hosts: Vec<HostInfo>, cluster_overcommit: Overcommit) -> Self {
        let mut by_name = HashMap::with_capacity(hosts.len());
        let mut states = Vec::with_capacity(hosts.len());
        let mut any_prefer_taint = false;
        for h in hosts {
            let oc = h.overcommit.unwrap_or(cluster_overcommit);
            let cpu_phys = if h.cpu_millis > 0 {
                h.cpu_millis
            } else {
                h.cpus.len() as u64 * 1000
            };
            let mut numa: Vec<NumaState> = h
                .numa_nodes
                .iter()
                .map(|n| NumaState {
                    id: n.id,
                    free_cpus: Vec::new(),
                    cpus: 0,
                    memory: n.memory_bytes,
                    memory_used: 0,
                })
                .collect();
            for c in &h.cpus {
                let idx = match numa.iter().position(|n| n.id == c.numa_node) {
                    Some(i) => i,
                    None => {
                        numa.push(NumaState {
                            id: c.numa_node,
                            free_cpus: Vec::new(),
                            cpus: 0,
                            memory: 0,
                            memory_used: 0,
                        });
                        numa.len() - 1
                    }
                };
                numa[idx].free_cpus.push(c.id);
                numa[idx].cpus += 1;
            }
            for n in &mut numa {
                n.free_cpus.sort_unstable();
                n.free_cpus.dedup();
            }
            let free_dedicated = numa.iter().map(|n| n.free_cpus.len() as u64).sum();
            any_prefer_taint |= h
                .taints
                .iter()
                .any(|t| t.effect == TaintEffect::PreferNoSchedule);
            let mem_cap = (u128::from(h.memory_bytes) * u128::from(oc.memory_overcommit_percent)
                / 100)
                .min(u128::from(u64::MAX)) as u64;
            by_name.insert(h.name.clone(), states.len());
            states.push(HostState {
                name: h.name,
                labels: h.labels,
                ready: h.ready,
                unschedulable: h.unschedulable,
                taints: h.taints,
                cpu_phys,
                cpu_ratio: if oc.cpu_allocation_ratio.is_finite() && oc.cpu_allocation_ratio > 0.0 {
                    oc.cpu_allocation_ratio
                } else {
                    1.0
                },
                cpu_used: 0,
                dedicated_taken: 0,
                cpu_cap: 0,
                mem_cap,
                mem_used: 0,
                numa,
                free_dedicated,
                hugepages: h
                    .hugepages
                    .iter()
                    .map(|p| (p.page_size, p.total, 0))
                    .collect(),
            });
        }
        for h in &mut states {
            h.cpu_cap = h.compute_cpu_cap(0);
        }
        Scheduler {
            hosts: states,
            by_name,
            cluster_overcommit,
            terms: Vec::new(),
            terms_by_hash: HashMap::new(),
            terms_by_label: HashMap::new(),
            terms_unkeyed: Vec::new(),
            placed: Vec::new(),
            any_prefer_taint,
            scratch: Scratch::default(),
        }
    }

    pub fn cluster_overcommit(&self) -> Overcommit {
        self.cluster_overcommit
    }

    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }

    /// Account a VMI that already runs (or is bound) on `placement.host`,
    /// with the CPUs and NUMA nodes it was given. Capacity is not checked:
    /// the snapshot is what it is.
    pub fn add_placed(
        &mut self,
        vmi: &VmiRequest,
        placement: &Placement,
    ) -> Result<(), ScheduleError> {
        let h = *self
            .by_name
            .get(&placement.host)
            .ok_or_else(|| ScheduleError::UnknownHost(placement.host.clone()))?;
        for &cpu in &placement.dedicated_cpus {
            let host = &self.hosts[h];
            if !host
                .numa
                .iter()
                .any(|n| n.free_cpus.binary_search(&cpu).is_ok())
            {
                return Err(ScheduleError::CpuTaken {
                    host: host.name.clone(),
                    cpu,
                });
            }
        }
        self.commit_at(vmi, h, &placement.dedicated_cpus, &placement.numa_nodes);
        Ok(())
    }

    /// Choose a host for `vmi` and account it there.
    pub fn place(&mut self, vmi: &VmiRequest) -> Result<Placement, ScheduleError> {
        let p = self.schedule(vmi)?;
        self.add_placed(vmi, &p)?;
        Ok(p)
    }

    fn term_index(
        &mut self,
        namespaces: &[String],
        selector: &LabelSelector,
        topology: Option<&str>,
    ) -> usize {
        let hash = term_hash(namespaces, selector, topology);
        if let Some(ids) = self.terms_by_hash.get(&hash) {
            for &i in ids {
                let t = &self.terms[i];
                if t.namespaces == namespaces
                    && &t.selector == selector
                    && t.topology.as_deref() == topology
                {
                    return i;
                }
            }
        }
        let n = self.hosts.len();
        let mut term = Term {
            namespaces: namespaces.to_vec(),
            selector: selector.clone(),
            topology: topology.map(str::to_string),
            domain_matches: HashMap::new(),
            domain_owners: HashMap::new(),
            matches: vec![0; n],
            total_matches: 0,
            owners: vec![0; n],
            total_owners: 0,
        };
        for p in &self.placed {
            if term.applies_to(&p.namespace, &p.labels) {
                term.add_match(p.host, &self.hosts[p.host].labels);
            }
        }
        let id = self.terms.len();
        self.terms.push(term);
        self.terms_by_hash.entry(hash).or_default().push(id);
        match selector.match_labels.iter().next() {
            Some((k, v)) => self
                .terms_by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .push(id),
            None => self.terms_unkeyed.push(id),
        }
        id
    }

    fn resolve_term(&mut self, vmi: &VmiRequest, term: &PodAffinityTerm) -> usize {
        let empty = LabelSelector::default();
        // A term without a selector matches nothing; model it as a
        // selector on a label no VMI can carry.
        let none;
        let sel = match &term.label_selector {
            Some(s) => s,
            None => {
                none = LabelSelector {
                    match_expressions: vec![LabelSelectorRequirement {
                        key: String::new(),
                        operator: Operator::Exists,
                        values: vec![],
                    }],
                    ..empty
                };
                &none
            }
        };
        let topology = (term.topology_key != HOSTNAME_LABEL).then_some(term.topology_key.as_str());
        if term.namespaces.is_empty() {
            self.term_index(std::slice::from_ref(&vmi.namespace), sel, topology)
        } else {
            self.term_index(&term.namespaces, sel, topology)
        }
    }

    /// Terms that could match a VMI with these labels.
    fn candidate_terms<'a>(
        terms_by_label: &'a HashMap<String, HashMap<String, Vec<usize>>>,
        unkeyed: &'a [usize],
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = usize> + 'a {
        labels
            .iter()
            .filter_map(|(k, v)| terms_by_label.get(k).and_then(|m| m.get(v)))
            .flatten()
            .chain(unkeyed.iter())
            .copied()
    }

    fn commit_at(&mut self, vmi: &VmiRequest, h: usize, cpus: &[u32], numa_nodes: &[u32]) {
        // The VMI's own required anti-affinity terms (for later VMIs).
        if let Some(pa) = &vmi.affinity.pod_anti_affinity {
            for t in &pa.required_during_scheduling_ignored_during_execution {
                let id = self.resolve_term(vmi, t);
                self.terms[id].add_owner(h, &self.hosts[h].labels);
            }
        }
        let host = &mut self.hosts[h];
        if vmi.dedicated_cpus {
            for &cpu in cpus {
                for n in &mut host.numa {
                    if let Ok(pos) = n.free_cpus.binary_search(&cpu) {
                        n.free_cpus.remove(pos);
                        host.dedicated_taken += 1;
                        host.free_dedicated -= 1;
                        break;
                    }
                }
            }
            host.cpu_cap = host.compute_cpu_cap(0);
        } else {
            host.cpu_used += vmi.cpu_millis;
        }
        match vmi.hugepage_size {
            Some(size) => {
                if let Some(pool) = host.hugepages.iter_mut().find(|p| p.0 == size) {
                    pool.2 += vmi.memory_bytes.div_ceil(size);
                }
            }
            None => host.mem_used += vmi.memory_bytes,
        }
        let g = numa_nodes.len() as u32;
        for (i, id) in numa_nodes.iter().enumerate() {
            if let Some(n) = host.numa.iter_mut().find(|n| n.id == *id) {
                n.memory_used += share(vmi.memory_bytes, g, i as u32);
            }
        }
        for id in Self::candidate_terms(&self.terms_by_label, &self.terms_unkeyed, &vmi.labels) {
            let t = &mut self.terms[id];
            if t.applies_to(&vmi.namespace, &vmi.labels) {
                t.add_match(h, &self.hosts[h].labels);
            }
        }
        self.placed.push(PlacedVmi {
            namespace: vmi.namespace.clone(),
            labels: vmi.labels.clone(),
            host: h,
        });
    }

    /// Choose a host for `vmi` without accounting it (see [`Self::place`]).
    pub fn schedule(&mut self, vmi: &VmiRequest) -> Result<Placement, ScheduleError> {
        validate(vmi)?;
        let mut s = std::mem::take(&mut self.scratch);
        s.anti_req.clear();
        s.aff_req.clear();
        s.sym.clear();
        s.pref.clear();
        s.node_pref.clear();
        s.feasible.clear();
        let result = self.schedule_with(vmi, &mut s);
        self.scratch = s;
        result
    }

    fn schedule_with(
        &mut self,
        vmi: &VmiRequest,
        s: &mut Scratch,
    ) -> Result<Placement, ScheduleError> {
        if let Some(pa) = &vmi.affinity.pod_anti_affinity {
            for t in &pa.required_during_scheduling_ignored_during_execution {
                let id = self.resolve_term(vmi, t);
                s.anti_req.push(id);
            }
            for w in &pa.preferred_during_scheduling_ignored_during_execution {
                let id = self.resolve_term(vmi, &w.pod_affinity_term);
                s.pref.push((id, -i64::from(w.weight)));
            }
        }
        if let Some(pa) = &vmi.affinity.pod_affinity {
            for t in &pa.required_during_scheduling_ignored_during_execution {
                let id = self.resolve_term(vmi, t);
                let term = &self.terms[id];
                // The first VMI of a group that selects itself may go
                // anywhere (as kube-scheduler allows).
                if !(term.total_matches == 0 && term.applies_to(&vmi.namespace, &vmi.labels)) {
                    s.aff_req.push(id);
                }
            }
            for w in &pa.preferred_during_scheduling_ignored_during_execution {
                let id = self.resolve_term(vmi, &w.pod_affinity_term);
                s.pref.push((id, i64::from(w.weight)));
            }
        }
        for id in Self::candidate_terms(&self.terms_by_label, &self.terms_unkeyed, &vmi.labels) {
            let t = &self.terms[id];
            if t.total_owners > 0 && t.applies_to(&vmi.namespace, &vmi.labels) {
                s.sym.push(id);
            }
        }
        let node_required = vmi.affinity.node_affinity.as_ref().and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
        let node_preferred: &[PreferredSchedulingTerm] =
            vmi.affinity.node_affinity.as_ref().map_or(&[], |n| {
                &n.preferred_during_scheduling_ignored_during_execution
            });

        let mut reasons: BTreeMap<Reason, usize> = BTreeMap::new();
        let terms = &self.terms;
        // Only the resource score: pick the best in one pass.
        let simple = node_preferred.is_empty() && !self.any_prefer_taint && s.pref.is_empty();
        let mut best_simple: Option<(f64, usize)> = None;
        for (h, host) in self.hosts.iter().enumerate() {
            let unfit = self.filter(vmi, h, host, node_required, terms, s);
            if let Some(r) = unfit {
                *reasons.entry(r).or_default() += 1;
                continue;
            }
            let base = resource_score(vmi, host);
            if simple {
                if best_simple.is_none_or(|(b, _)| base > b) {
                    best_simple = Some((base, h));
                }
                continue;
            }
            let node_pref: i64 = node_preferred
                .iter()
                .filter(|p| model::term_matches(&p.preference, &host.name, &host.labels))
                .map(|p| i64::from(p.weight))
                .sum();
            let taint_pref = if self.any_prefer_taint {
                host.taints
                    .iter()
                    .filter(|t| {
                        t.effect == TaintEffect::PreferNoSchedule && !tolerated(&vmi.tolerations, t)
                    })
                    .count() as i64
            } else {
                0
            };
            let vm_pref: i64 = s
                .pref
                .iter()
                .map(|&(id, w)| w * i64::from(terms[id].matches_on(h, host)))
                .sum();
            s.feasible.push(Candidate {
                host: h,
                base,
                node_pref,
                taint_pref,
                vm_pref,
            });
        }
        if let Some((_, h)) = best_simple {
            return Ok(self.decide(vmi, h));
        }
        if s.feasible.is_empty() {
            return Err(ScheduleError::Unschedulable(Unschedulable {
                hosts: self.hosts.len(),
                reasons,
            }));
        }
        let max_node = s.feasible.iter().map(|c| c.node_pref).max().unwrap_or(0);
        let max_taint = s.feasible.iter().map(|c| c.taint_pref).max().unwrap_or(0);
        let (min_vm, max_vm) = s.feasible.iter().fold((i64::MAX, i64::MIN), |(lo, hi), c| {
            (lo.min(c.vm_pref), hi.max(c.vm_pref))
        });
        let mut best: Option<(f64, usize)> = None;
        for c in &s.feasible {
            let mut score = c.base;
            if max_node > 0 {
                score += 100.0 * c.node_pref as f64 / max_node as f64;
            }
            if max_taint > 0 {
                score += 100.0 - 100.0 * c.taint_pref as f64 / max_taint as f64;
            }
            if max_vm > min_vm {
                score += 100.0 * (c.vm_pref - min_vm) as f64 / (max_vm - min_vm) as f64;
            }
            if best.is_none_or(|(b, _)| score > b) {
                best = Some((score, c.host));
            }
        }
        let Some((_, h)) = best else {
            // Unreachable: feasible is non-empty.
            return Err(ScheduleError::Unschedulable(Unschedulable {
                hosts: self.hosts.len(),
                reasons,
            }));
        };
        Ok(self.decide(vmi, h))
    }

    fn decide(&self, vmi: &VmiRequest, h: usize) -> Placement {
        let host = &self.hosts[h];
        let numa_nodes = if vmi.guest_numa_nodes > 0 {
            fit_numa(vmi, host).unwrap_or_default()
        } else {
            Vec::new()
        };
        let dedicated_cpus = if vmi.dedicated_cpus {
            choose_cpus(vmi, host, &numa_nodes)
        } else {
            Vec::new()
        };
        Placement {
            host: host.name.clone(),
            dedicated_cpus,
            numa_nodes,
        }
    }

    fn filter(
        &self,
        vmi: &VmiRequest,
        h: usize,
        host: &HostState,
        node_required: Option<&NodeSelector>,
        terms: &[Term],
        s: &Scratch,
    ) -> Option<Reason> {
        if !host.ready {
            return Some(Reason::NotReady);
        }
        if host.unschedulable {
            return Some(Reason::Unschedulable);
        }
        if !vmi.node_selector.is_empty()
            && !vmi.node_selector.iter().all(|(k, v)| {
                host.labels.get(k) == Some(v)
                    || (k == HOSTNAME_LABEL
                        && !host.labels.contains_key(HOSTNAME_LABEL)
                        && *v == host.name)
            })
        {
            return Some(Reason::NodeSelector);
        }
        if let Some(req) = node_required
            && !req
                .node_selector_terms
                .iter()
                .any(|t| model::term_matches(t, &host.name, &host.labels))
        {
            return Some(Reason::NodeAffinity);
        }
        if !host.taints.is_empty()
            && host.taints.iter().any(|t| {
                t.effect != TaintEffect::PreferNoSchedule && !tolerated(&vmi.tolerations, t)
            })
        {
            return Some(Reason::Taint);
        }
        if host.cpu_phys > 0 {
            let extra = if vmi.dedicated_cpus {
                u64::from(vmi.vcpus)
            } else {
                0
            };
            let add = if vmi.dedicated_cpus {
                0
            } else {
                vmi.cpu_millis
            };
            if host.cpu_used + add > host.shared_cpu_cap(extra) {
                return Some(Reason::Cpu);
            }
        }
        match vmi.hugepage_size {
            Some(size) => {
                let need = vmi.memory_bytes.div_ceil(size);
                if !host
                    .hugepages
                    .iter()
                    .any(|&(sz, total, used)| sz == size && total - used.min(total) >= need)
                {
                    return Some(Reason::Hugepages);
                }
            }
            None => {
                if host.mem_used + vmi.memory_bytes > host.mem_cap {
                    return Some(Reason::Memory);
                }
            }
        }
        if vmi.dedicated_cpus && host.free_dedicated < u64::from(vmi.vcpus) {
            return Some(Reason::DedicatedCpus);
        }
        if vmi.guest_numa_nodes > 0 && fit_numa(vmi, host).is_none() {
            return Some(Reason::Numa);
        }
        if s.aff_req
            .iter()
            .any(|&id| terms[id].matches_on(h, host) == 0)
        {
            return Some(Reason::VmAffinity);
        }
        if s.anti_req
            .iter()
            .any(|&id| terms[id].matches_on(h, host) > 0)
        {
            return Some(Reason::VmAntiAffinity);
        }
        if s.sym.iter().any(|&id| terms[id].owners_on(h, host) > 0) {
            return Some(Reason::ExistingAntiAffinity);
        }
        None
    }
}

/// Least-allocated plus balanced allocation, 0..=200.
fn resource_score(vmi: &VmiRequest, host: &HostState) -> f64 {
    let mut fracs = [0.0f64; 2];
    let mut n = 0;
    if host.cpu_phys > 0 {
        let (extra, add) = if vmi.dedicated_cpus {
            (u64::from(vmi.vcpus), 0)
        } else {
            (0, vmi.cpu_millis)
        };
        let cap = host.shared_cpu_cap(0).max(1);
        let used = host.cpu_used + add + (host.shared_cpu_cap(0) - host.shared_cpu_cap(extra));
        fracs[n] = (used as f64 / cap as f64).min(1.0);
        n += 1;
    }
    if host.mem_cap > 0 {
        let add = if vmi.hugepage_size.is_some() {
            0
        } else {
            vmi.memory_bytes
        };
        fracs[n] = ((host.mem_used + add) as f64 / host.mem_cap as f64).min(1.0);
        n += 1;
    }
    match n {
        0 => 0.0,
        1 => 100.0 * (1.0 - fracs[0]) + 100.0,
        _ => {
            let least = 100.0 * (2.0 - fracs[0] - fracs[1]) / 2.0;
            let balanced = 100.0 * (1.0 - (fracs[0] - fracs[1]).abs());
            least + balanced
        }
    }
}

/// Host NUMA node per guest NUMA node, each on a distinct node with room
/// for its share of vCPUs (free dedicated CPUs, or CPUs at all) and memory.
fn fit_numa(vmi: &VmiRequest, host: &HostState) -> Option<Vec<u32>> {
    let g = vmi.guest_numa_nodes;
    let mut used = vec![false; host.numa.len()];
    let mut out = Vec::with_capacity(g as usize);
    for i in 0..g {
        let cpus = share(u64::from(vmi.vcpus), g, i);
        let mem = share(vmi.memory_bytes, g, i);
        let mut best: Option<(u64, usize)> = None;
        for (j, n) in host.numa.iter().enumerate() {
            let room = if vmi.dedicated_cpus {
                n.free_cpus.len() as u64
            } else {
                u64::from(n.cpus)
            };
            if used[j] || room < cpus || n.memory.saturating_sub(n.memory_used) < mem {
                continue;
            }
            if best.is_none_or(|(r, _)| room < r) {
                best = Some((room, j));
            }
        }
        let (_, j) = best?;
        used[j] = true;
        out.push(host.numa[j].id);
    }
    Some(out)
}

/// Exclusive CPUs: within the guest NUMA nodes' host nodes when given;
/// otherwise one host NUMA node if any has room (the fullest that fits),
/// else the emptiest nodes first.
fn choose_cpus(vmi: &VmiRequest, host: &HostState, numa_nodes: &[u32]) -> Vec<u32> {
    let need = vmi.vcpus as usize;
    let mut out = Vec::with_capacity(need);
    if !numa_nodes.is_empty() {
        let g = numa_nodes.len() as u32;
        for (i, id) in numa_nodes.iter().enumerate() {
            let k = share(u64::from(vmi.vcpus), g, i as u32) as usize;
            if let Some(n) = host.numa.iter().find(|n| n.id == *id) {
                out.extend(n.free_cpus.iter().take(k));
            }
        }
    } else if let Some(n) = host
        .numa
        .iter()
        .filter(|n| n.free_cpus.len() >= need)
        .min_by_key(|n| n.free_cpus.len())
    {
        out.extend(n.free_cpus.iter().take(need));
    } else {
        let mut order: Vec<&NumaState> = host.numa.iter().collect();
        order.sort_by_key(|n| std::cmp::Reverse(n.free_cpus.len()));
        for n in order {
            let k = (need - out.len()).min(n.free_cpus.len());
            out.extend(n.free_cpus.iter().take(k));
            if out.len() == need {
                break;
            }
        }
    }
    out.sort_unstable();
    out
}

/// Format a CPU set as the `krvirt.io/dedicated-cpus` annotation value
/// (ascending ids, comma-separated: `"2,3,6"`).
pub fn format_cpu_set(cpus: &[u32]) -> String {
    let mut s = String::new();
    for (i, c) in cpus.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&c.to_string());
    }
    s
}

/// Parse a `krvirt.io/dedicated-cpus` value (`"2,3,6"`; ranges `"2-5"`
/// are accepted too).
pub fn parse_cpu_set(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("bad CPU list element {part:?} (want N or N-M)");
        match part.split_once('-') {
            Some((a, b)) => {
                let a: u32 = a.trim().parse().map_err(|_| bad())?;
                let b: u32 = b.trim().parse().map_err(|_| bad())?;
                if a > b || b - a > 4096 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}
