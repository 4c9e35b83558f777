//! Live migration: `kubevirt.io/v1` VirtualMachineInstanceMigration (one
//! migration of one VMI, with KubeVirt's phases), the VMI's
//! `status.migrationState` (the source and target hosts' progress), and
//! `migrations.kubevirt.io/v1alpha1` MigrationPolicy (per-VMI migration
//! parameters chosen by label selectors).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::admission::{Admit, Causes};
use crate::kubevirt::validate::{immutable_identity, metadata};
use crate::meta::{Condition, ObjectMeta, null_default};
use crate::quantity::Quantity;

pub const API_VERSION: &str = "kubevirt.io/v1";
pub const POLICY_API_VERSION: &str = "migrations.kubevirt.io/v1alpha1";
const MAX_NAME: usize = 253;

/// VMI label naming the host a migration prepares its target on (KubeVirt's
/// label); the target host's agent watches VMIs carrying its name.
pub const TARGET_NODE_LABEL: &str = "kubevirt.io/migrationTargetNodeName";
/// Label KubeVirt puts on a migration naming its VMI.
pub const VMI_NAME_LABEL: &str = "kubevirt.io/vmi-name";

/// One live migration of a VMI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineInstanceMigration {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: VirtualMachineInstanceMigrationSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VirtualMachineInstanceMigrationStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineInstanceMigrationSpec {
    /// The VMI to migrate (same namespace).
    #[serde(default)]
    pub vmi_name: String,
    /// Extra host label constraints for the target, on top of the VMI's
    /// `nodeSelector` (`kubernetes.io/hostname: HOST` picks one host).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub added_node_selector: BTreeMap<String, String>,
}

/// KubeVirt's `VirtualMachineInstanceMigrationPhase`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum MigrationPhase {
    /// Accepted, waiting for the VMI or for a free slot (parallel limits).
    #[default]
    Pending,
    /// A target host is being chosen.
    Scheduling,
    /// The target host is chosen.
    Scheduled,
    /// The target host starts its QEMU waiting for the incoming state.
    PreparingTarget,
    /// The target listens for the migration stream.
    TargetReady,
    /// The source sends the guest's state.
    Running,
    Succeeded,
    Failed,
}

impl MigrationPhase {
    /// `Succeeded` or `Failed`.
    pub fn is_final(self) -> bool {
        matches!(self, MigrationPhase::Succeeded | MigrationPhase::Failed)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationPhaseTransitionTimestamp {
    pub phase: MigrationPhase,
    /// RFC 3339.
    pub phase_transition_timestamp: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineInstanceMigrationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub phase_transition_timestamps: Vec<MigrationPhaseTransitionTimestamp>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
    /// A copy of the VMI's `status.migrationState` for this migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_state: Option<MigrationState>,
}

/// `PreCopy` (the guest keeps running while its memory is copied) or
/// `PostCopy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum MigrationMode {
    #[default]
    PreCopy,
    PostCopy,
}

/// `Aborting`, `Succeeded`, `Failed` (KubeVirt's `MigrationAbortStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum AbortStatus {
    Aborting,
    Succeeded,
    Failed,
}

/// KubeVirt's `VirtualMachineInstanceMigrationState` (VMI
/// `status.migrationState`), plus krvirt's progress figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationState {
    /// The VirtualMachineInstanceMigration's uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// IP address the target QEMU listens on for the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node_address: Option<String>,
    /// Port → 0 (KubeVirt's "direct migration" port map).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub target_direct_migration_node_ports: BTreeMap<String, i64>,
    /// The target QEMU took over (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node_domain_ready_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node_domain_detected: Option<bool>,
    /// The source started sending (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// Cancel requested (the migration object was deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_requested: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_status: Option<AbortStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MigrationMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_policy_name: Option<String>,
    /// The parameters in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_configuration: Option<MigrationConfiguration>,
    /// krvirt: what QEMU reports while sending and when done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub krvirt_progress: Option<MigrationProgress>,
}

impl MigrationState {
    /// Ended one way or the other.
    pub fn is_finished(&self) -> bool {
        self.completed == Some(true) || self.failed == Some(true)
    }
}

/// The effective migration parameters (cluster defaults, then the policy).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_auto_converge: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_post_copy: Option<bool>,
    /// Bytes per second; 0 = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_per_migration: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_timeout_per_gi_b: Option<i64>,
    /// krvirt: QEMU's `downtime-limit` in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<u64>,
}

/// QEMU `query-migrate` figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationProgress {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_transferred_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_remaining_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_total_bytes: Option<u64>,
    /// Guest pause at the switch-over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// From `migrate` to completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_time_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<u64>,
    /// krvirt: what is moving now: `Disks` (the block mirror of host-local
    /// disks to the target, before any memory) or `Memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// krvirt: bytes the block mirror of host-local disks has copied
    /// (non-shared storage), and the total it has to copy so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_transferred_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_total_bytes: Option<u64>,
    /// krvirt: how many disks were mirrored, and how long the mirror took
    /// to reach its first full copy (before the memory transfer began).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks_mirrored: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mirror_ms: Option<u64>,
}

impl Default for VirtualMachineInstanceMigration {
    fn default() -> Self {
        VirtualMachineInstanceMigration {
            api_version: API_VERSION.into(),
            kind: "VirtualMachineInstanceMigration".into(),
            metadata: ObjectMeta::default(),
            spec: VirtualMachineInstanceMigrationSpec::default(),
            status: None,
        }
    }
}

impl crate::meta::Object for VirtualMachineInstanceMigration {
    fn kind_info() -> &'static crate::KindInfo {
        crate::types::kind_named("VirtualMachineInstanceMigration")
    }
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Admit for VirtualMachineInstanceMigration {
    fn not_implemented(_path: &str) -> bool {
        false
    }
    fn apply_defaults(&mut self) {}
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", MAX_NAME, true, c);
        if self.spec.vmi_name.is_empty() {
            c.required("spec.vmiName", "Required value");
        } else if let Some(problem) = crate::util::dns1123_subdomain(&self.spec.vmi_name, MAX_NAME)
        {
            c.invalid(
                "spec.vmiName",
                format!("{:?}: {problem}", self.spec.vmi_name),
            );
        }
        for k in self.spec.added_node_selector.keys() {
            if k.is_empty() {
                c.invalid("spec.addedNodeSelector", "label keys must not be empty");
            }
        }
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.spec != self.spec {
                c.forbidden(
                    "spec",
                    "the spec of a VirtualMachineInstanceMigration is immutable",
                );
            }
        }
    }
}

/// `migrations.kubevirt.io/v1alpha1` MigrationPolicy (cluster-scoped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationPolicy {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: MigrationPolicySpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub status: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_auto_converge: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_post_copy: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_per_migration: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_timeout_per_gi_b: Option<i64>,
    #[serde(default)]
    pub selectors: MigrationPolicySelectors,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationPolicySelectors {
    /// Labels the VMI's namespace must carry (krvirt namespaces carry
    /// `kubernetes.io/metadata.name: NAME` only).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub namespace_selector: BTreeMap<String, String>,
    /// Labels the VMI must carry.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub virtual_machine_instance_selector: BTreeMap<String, String>,
}

impl Default for MigrationPolicy {
    fn default() -> Self {
        MigrationPolicy {
            api_version: POLICY_API_VERSION.into(),
            kind: "MigrationPolicy".into(),
            metadata: ObjectMeta::default(),
            spec: MigrationPolicySpec::default(),
            status: None,
        }
    }
}

impl crate::meta::Object for MigrationPolicy {
    fn kind_info() -> &'static crate::KindInfo {
        crate::types::kind_named("MigrationPolicy")
    }
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Admit for MigrationPolicy {
    fn not_implemented(_path: &str) -> bool {
        false
    }
    fn apply_defaults(&mut self) {}
    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", MAX_NAME, false, c);
        if let Some(q) = &self.spec.bandwidth_per_migration
            && q.value().is_err()
        {
            c.invalid(
                "spec.bandwidthPerMigration",
                format!("{:?} is not a quantity", q.to_string()),
            );
        }
        if self.spec.completion_timeout_per_gi_b.is_some_and(|t| t < 0) {
            c.invalid("spec.completionTimeoutPerGiB", "must not be negative");
        }
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
        }
    }
}

impl MigrationPolicy {
    /// Does this policy select a VMI with `vmi_labels` in `namespace`
    /// (with `namespace_labels`)? An empty selector matches everything.
    pub fn selects(
        &self,
        vmi_labels: &BTreeMap<String, String>,
        namespace_labels: &BTreeMap<String, String>,
    ) -> bool {
        let sub = |want: &BTreeMap<String, String>, have: &BTreeMap<String, String>| {
            want.iter().all(|(k, v)| have.get(k) == Some(v))
        };
        sub(
            &self.spec.selectors.virtual_machine_instance_selector,
            vmi_labels,
        ) && sub(&self.spec.selectors.namespace_selector, namespace_labels)
    }

    /// How specific the policy is (KubeVirt picks the policy with the most
    /// matching labels).
    pub fn specificity(&self) -> usize {
        self.spec.selectors.virtual_machine_instance_selector.len()
            + self.spec.selectors.namespace_selector.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::admit_typed;
    use serde_json::json;

    #[test]
    fn the_corpus_migration_is_accepted_and_vmi_name_required() {
        let ok = admit_typed::<VirtualMachineInstanceMigration>(
            json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                   "metadata": {"name": "m", "namespace": "default"},
                   "spec": {"vmiName": "vmi-migratable"}}),
            None,
        );
        assert!(ok.is_ok(), "{ok:?}");
        let err = admit_typed::<VirtualMachineInstanceMigration>(
            json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                   "metadata": {"name": "m", "namespace": "default"}, "spec": {}}),
            None,
        )
        .unwrap_err();
        assert!(format!("{err:?}").contains("spec.vmiName"), "{err:?}");
        let err = admit_typed::<VirtualMachineInstanceMigration>(
            json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                   "metadata": {"name": "m", "namespace": "default"},
                   "spec": {"vmiName": "x", "bogus": 1}}),
            None,
        )
        .unwrap_err();
        assert!(format!("{err:?}").contains("spec.bogus"), "{err:?}");
    }

    #[test]
    fn policy_selection_needs_every_label() {
        let p: MigrationPolicy = serde_json::from_value(json!({
            "apiVersion": POLICY_API_VERSION, "kind": "MigrationPolicy",
            "metadata": {"name": "p"},
            "spec": {"selectors": {"virtualMachineInstanceSelector": {"a": "1", "b": "2"}}}
        }))
        .unwrap();
        let labels = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(p.selects(&labels(&[("a", "1"), ("b", "2"), ("c", "3")]), &labels(&[])));
        assert!(!p.selects(&labels(&[("a", "1")]), &labels(&[])));
        assert_eq!(p.specificity(), 2);
    }
}
