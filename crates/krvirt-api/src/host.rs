//! `krvirt.io/v1` Host: one machine running the krvirt agent
//! (cluster-scoped, like a Kubernetes Node). The agent registers it and
//! keeps `status` current; operators set `spec.unschedulable` (cordon) and
//! labels (matched by VMI `nodeSelector`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::admission::{Admit, Causes, idx, join};
use crate::kubevirt::validate::{immutable_identity, metadata};
use crate::meta::{Condition, ObjectMeta, null_default};
use crate::quantity::Quantity;

pub const GROUP: &str = "krvirt.io";
pub const VERSION: &str = "v1";
pub const API_VERSION: &str = "krvirt.io/v1";

/// Host names follow Kubernetes node names: DNS-1123 subdomains up to 253.
const MAX_HOST_NAME: usize = 253;

/// A host in the pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Host {
    /// `krvirt.io/v1`
    #[serde(default)]
    pub api_version: String,
    /// `Host`
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HostSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<HostStatus>,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            api_version: API_VERSION.to_string(),
            kind: "Host".to_string(),
            metadata: ObjectMeta::default(),
            spec: HostSpec::default(),
            status: None,
        }
    }
}

/// Operator intent for a host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostSpec {
    /// Cordoned: the scheduler places no new VMIs here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unschedulable: Option<bool>,
    /// Taints: VMIs that do not tolerate them are not placed here
    /// (`NoSchedule`), avoided (`PreferNoSchedule`), or also evicted
    /// (`NoExecute`).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub taints: Vec<crate::kubevirt::Taint>,
}

/// What the agent observed on the host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostStatus {
    /// Everything the machine has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<HostResources>,
    /// What VMs may use (capacity minus host reservations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<HostResources>,
    /// Logical CPUs and their topology.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cpus: Vec<HostCpu>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub numa_nodes: Vec<NumaNode>,
    /// Hugepage pools per page size.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub hugepages: Vec<HugepagesPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<AcceleratorStatus>,
    /// e.g. `7.2.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub addresses: Vec<HostAddress>,
    /// Ports of the daemons on the host (Kubernetes Node's
    /// `daemonEndpoints`): the agent's host API (mutual TLS; the API server
    /// reaches a VMI's console, console log, pause and unpause through it at
    /// `InternalIP`:`agentEndpoint.port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon_endpoints: Option<HostDaemonEndpoints>,
    /// `Ready`, `KVMUnavailable`, … (see [`host_conditions`]).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
    /// RFC 3339 time of the agent's last status report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_time: Option<String>,
}

/// CPU and memory amounts as Kubernetes quantities (`cpu: "8"`,
/// `memory: "32Gi"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostResources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

/// One logical CPU (`/sys/devices/system/cpu/cpuN`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostCpu {
    pub id: u32,
    pub core: u32,
    pub socket: u32,
    pub numa_node: u32,
}

/// One NUMA node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NumaNode {
    pub id: u32,
    /// Logical CPU ids on this node.
    #[serde(default, deserialize_with = "null_default")]
    pub cpus: Vec<u32>,
    pub memory_bytes: u64,
}

/// A hugepage pool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HugepagesPool {
    /// `2Mi` or `1Gi`.
    pub page_size: Quantity,
    /// Pages configured.
    pub total: u64,
    /// Pages free.
    pub free: u64,
}

/// Hardware virtualisation available to guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Hardware-assisted (KVM).
    Kvm,
    /// Software emulation (QEMU TCG), much slower.
    Tcg,
}

/// The accelerator in use and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AcceleratorStatus {
    #[serde(rename = "type")]
    pub type_: Accelerator,
    /// Why KVM is not used (e.g. `/dev/kvm is a paravirtual KVM`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A host address.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostAddress {
    /// `InternalIP`, `ExternalIP` or `Hostname`.
    #[serde(rename = "type")]
    pub type_: String,
    pub address: String,
}

/// Ports of the daemons on a host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostDaemonEndpoints {
    /// The agent's host API (HTTPS, mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_endpoint: Option<DaemonEndpoint>,
}

/// A daemon's port (on the host's `InternalIP`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DaemonEndpoint {
    pub port: u16,
}

/// Host condition types.
pub mod host_conditions {
    /// The agent is alive and reporting.
    pub const READY: &str = "Ready";
    /// KVM cannot be used; guests run under TCG.
    pub const KVM_UNAVAILABLE: &str = "KVMUnavailable";
}

impl crate::meta::Object for Host {
    fn kind_info() -> &'static crate::KindInfo {
        crate::types::kind_named("Host")
    }
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Admit for Host {
    fn not_implemented(_path: &str) -> bool {
        false
    }

    fn apply_defaults(&mut self) {}

    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", MAX_HOST_NAME, false, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
        }
        crate::kubevirt::scheduling::taints(&self.spec.taints, "spec.taints", c);
        let Some(status) = &self.status else { return };
        for (name, res) in [
            ("capacity", &status.capacity),
            ("allocatable", &status.allocatable),
        ] {
            let Some(res) = res else { continue };
            let p = join("status", name);
            if let Some(q) = &res.cpu
                && let Err(e) = q.millis()
            {
                c.invalid(join(&p, "cpu"), e.to_string());
            }
            if let Some(q) = &res.memory
                && let Err(e) = q.value()
            {
                c.invalid(join(&p, "memory"), e.to_string());
            }
        }
        for (i, h) in status.hugepages.iter().enumerate() {
            if let Err(e) = h.page_size.value() {
                c.invalid(join(&idx("status.hugepages", i), "pageSize"), e.to_string());
            }
        }
        if let Some(ep) = status
            .daemon_endpoints
            .as_ref()
            .and_then(|d| d.agent_endpoint.as_ref())
            && ep.port == 0
        {
            c.invalid(
                "status.daemonEndpoints.agentEndpoint.port",
                "must be between 1 and 65535",
            );
        }
        if let Some(t) = &status.heartbeat_time
            && crate::meta::parse_rfc3339(t).is_none()
        {
            c.invalid(
                "status.heartbeatTime",
                format!("{t:?} is not an RFC 3339 timestamp"),
            );
        }
    }
}
