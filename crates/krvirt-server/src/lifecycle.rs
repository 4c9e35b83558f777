//! KubeVirt's VM lifecycle subresources (`start`, `stop`, `restart`) and the
//! checks in front of VMI `pause`/`unpause`/`console`.
//!
//! `start`/`stop`/`restart` only change the VirtualMachine object (its
//! `spec.runStrategy`/`spec.running`, or `status.stateChangeRequests`) and
//! a grace-period annotation on the VMI; the VM controller reconciles from
//! there.

use std::fmt;

use krvirt_api::KindInfo;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::ApiError;
use crate::connector::HostConnector;
use crate::registry::Registry;

/// API group of the KubeVirt core kinds.
pub const KUBEVIRT_GROUP: &str = "kubevirt.io";

/// `spec.runStrategy` of a VirtualMachine (or what `spec.running` means).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStrategy {
    Always,
    RerunOnFailure,
    Manual,
    Halted,
    Once,
}

impl RunStrategy {
    pub fn as_str(&self) -> &'static str {
        match self {
            RunStrategy::Always => "Always",
            RunStrategy::RerunOnFailure => "RerunOnFailure",
            RunStrategy::Manual => "Manual",
            RunStrategy::Halted => "Halted",
            RunStrategy::Once => "Once",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Always" => RunStrategy::Always,
            "RerunOnFailure" => RunStrategy::RerunOnFailure,
            "Manual" => RunStrategy::Manual,
            "Halted" => RunStrategy::Halted,
            "Once" => RunStrategy::Once,
            _ => return None,
        })
    }
}

impl fmt::Display for RunStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The effective run strategy of a VM object, as KubeVirt's
/// `VirtualMachine.RunStrategy()`: `spec.running` true/false means
/// Always/Halted, else `spec.runStrategy`, else Halted.
pub fn run_strategy(vm: &Value) -> Result<RunStrategy, ApiError> {
    let running = vm.pointer("/spec/running").filter(|v| !v.is_null());
    let strategy = vm.pointer("/spec/runStrategy").filter(|v| !v.is_null());
    match (running, strategy) {
        (Some(_), Some(_)) => Err(ApiError::Internal(
            "running and runstrategy are mutually exclusive".into(),
        )),
        (Some(r), None) => Ok(if r.as_bool() == Some(true) {
            RunStrategy::Always
        } else {
            RunStrategy::Halted
        }),
        (None, Some(s)) => s
            .as_str()
            .and_then(RunStrategy::parse)
            .ok_or_else(|| ApiError::Internal(format!("unknown runStrategy {s}"))),
        (None, None) => Ok(RunStrategy::Halted),
    }
}

/// Body of `PUT …/virtualmachines/{name}/start` (KubeVirt `StartOptions`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartOptions {
    #[serde(default)]
    pub paused: bool,
}

/// Body of `PUT …/virtualmachines/{name}/stop` (KubeVirt `StopOptions`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StopOptions {
    /// Seconds the guest gets to shut down; recorded on the VMI in the
    /// [`STOP_GRACE_PERIOD_ANNOTATION`] annotation.
    #[serde(default)]
    pub grace_period: Option<i64>,
}

/// Body of `PUT …/virtualmachines/{name}/restart` (KubeVirt `RestartOptions`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestartOptions {
    /// Only 0 (force restart) is supported, as in KubeVirt.
    #[serde(default)]
    pub grace_period_seconds: Option<i64>,
}

const VM_NOT_RUNNING: &str = "VM is not running";
const VMI_NOT_RUNNING: &str = "VMI is not running";
const MAX_ATTEMPTS: usize = 8;

fn phase(vmi: &Value) -> &str {
    vmi.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// A VMI in phase Succeeded or Failed.
pub fn vmi_is_final(vmi: &Value) -> bool {
    matches!(phase(vmi), "Succeeded" | "Failed")
}

fn uid(obj: &Value) -> Value {
    obj.pointer("/metadata/uid").cloned().unwrap_or(Value::Null)
}

fn conflict(kind: &KindInfo, name: &str, message: impl Into<String>) -> ApiError {
    // KubeVirt names the resource in the singular here
    // ("virtualmachine.kubevirt.io").
    ApiError::Conflict {
        group: kind.group.into(),
        resource: kind.singular.into(),
        name: name.into(),
        message: message.into(),
    }
}

fn kinds(reg: &Registry) -> Result<(&'static KindInfo, &'static KindInfo), ApiError> {
    let vm = reg.kind(KUBEVIRT_GROUP, "VirtualMachine");
    let vmi = reg.kind(KUBEVIRT_GROUP, "VirtualMachineInstance");
    match (vm, vmi) {
        (Some(vm), Some(vmi)) => Ok((vm, vmi)),
        _ => Err(ApiError::RouteNotFound(
            "VirtualMachine/VirtualMachineInstance kinds are not served".into(),
        )),
    }
}

async fn get_opt(
    reg: &Registry,
    kind: &KindInfo,
    ns: &str,
    name: &str,
) -> Result<Option<Value>, ApiError> {
    match reg.get(kind, ns, name).await {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a lifecycle verb does to the VM.
enum VmChange {
    /// `spec.runStrategy` Always/Halted, or `spec.running` when the VM uses it.
    SetRunning(bool),
    /// `SetRunning(true)` with the VM annotated so its next VMI starts
    /// paused (one write: the controller never sees one without the other).
    SetRunningPaused,
    /// Requests appended to `status.stateChangeRequests`.
    Requests(Vec<Value>),
}

fn start_request(paused: bool) -> Value {
    if paused {
        json!({"action": "Start", "data": {"paused": "true"}})
    } else {
        json!({"action": "Start"})
    }
}

fn stop_request(vmi: &Value) -> Value {
    json!({"action": "Stop", "uid": uid(vmi)})
}

/// `spec.runStrategy` Always/Halted, or `spec.running` when the VM uses it.
fn set_running(obj: &mut Value, run: bool) -> Result<(), ApiError> {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return Err(ApiError::Internal("VirtualMachine has no spec".into()));
    };
    if spec.get("runStrategy").is_some_and(|v| !v.is_null()) {
        let s = if run { "Always" } else { "Halted" };
        spec.insert("runStrategy".into(), json!(s));
    } else {
        spec.insert("running".into(), json!(run));
    }
    Ok(())
}

/// Write `change` with compare-and-swap on the VM version that was read.
async fn apply_change(
    reg: &Registry,
    kind: &KindInfo,
    vm: &Value,
    name: &str,
    change: VmChange,
) -> Result<(), ApiError> {
    let ns = vm
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut obj = vm.clone();
    match change {
        VmChange::SetRunningPaused => {
            let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
                return Err(ApiError::Internal("VirtualMachine has no metadata".into()));
            };
            let ann = meta.entry("annotations").or_insert_with(|| json!({}));
            if !ann.is_object() {
                *ann = json!({});
            }
            if let Some(a) = ann.as_object_mut() {
                a.insert(
                    krvirt_api::kubevirt::START_PAUSED_ANNOTATION.into(),
                    json!("true"),
                );
            }
            set_running(&mut obj, true)?;
            reg.replace(kind, &ns, name, obj).await?;
        }
        VmChange::SetRunning(run) => {
            set_running(&mut obj, run)?;
            reg.replace(kind, &ns, name, obj).await?;
        }
        VmChange::Requests(changes) => {
            let Some(o) = obj.as_object_mut() else {
                return Err(ApiError::Internal("VirtualMachine is not an object".into()));
            };
            let status = o.entry("status").or_insert_with(|| json!({}));
            if !status.is_object() {
                *status = json!({});
            }
            let Some(status) = status.as_object_mut() else {
                return Err(ApiError::Internal(
                    "VirtualMachine status is not an object".into(),
                ));
            };
            let existing = status
                .get("stateChangeRequests")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let single_stop = changes.len() == 1
                && changes[0].get("action").and_then(Value::as_str) == Some("Stop");
            let requests = if existing.is_empty() || single_stop {
                changes
            } else {
                return Err(conflict(
                    kind,
                    name,
                    "unable to complete request: stop/start already underway",
                ));
            };
            status.insert("stateChangeRequests".into(), Value::Array(requests));
            status.remove("startFailure");
            reg.replace_status(kind, &ns, name, obj).await?;
        }
    }
    Ok(())
}

/// Annotation on a VMI holding the grace period (seconds) a `stop` or
/// `restart` request asked for. It takes precedence over the VMI's
/// `spec.terminationGracePeriodSeconds` when the agent shuts the guest
/// down. (KubeVirt patches `spec.terminationGracePeriodSeconds` itself; a
/// krvirt VMI spec is immutable, so the request is recorded here.)
pub const STOP_GRACE_PERIOD_ANNOTATION: &str = "krvirt.io/stop-grace-period-seconds";

/// The grace period in effect for a VMI: the annotation, else
/// `spec.terminationGracePeriodSeconds`.
pub fn vmi_grace_period(vmi: &Value) -> Option<i64> {
    vmi.pointer("/metadata/annotations")
        .and_then(|a| a.get(STOP_GRACE_PERIOD_ANNOTATION))
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<i64>().ok())
        .or_else(|| {
            vmi.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
}

/// Record a requested grace period on the VMI for the agent.
async fn set_vmi_grace(
    reg: &Registry,
    kind: &KindInfo,
    vmi: &Value,
    grace: i64,
) -> Result<(), ApiError> {
    let ns = vmi
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = vmi
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut obj = vmi.clone();
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return Err(ApiError::Internal(
            "VirtualMachineInstance has no metadata".into(),
        ));
    };
    let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
    if !annotations.is_object() {
        *annotations = json!({});
    }
    if let Some(a) = annotations.as_object_mut() {
        a.insert(
            STOP_GRACE_PERIOD_ANNOTATION.into(),
            json!(grace.to_string()),
        );
    }
    reg.replace(kind, ns, name, obj).await.map(|_| ())
}

/// Run `attempt` until it does not fail with a write conflict caused by a
/// concurrent change (each attempt re-reads and re-decides).
async fn retrying<F, Fut>(mut attempt: F) -> Result<(), ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Retry, ApiError>>,
{
    for _ in 0..MAX_ATTEMPTS {
        match attempt().await? {
            Retry::Done => return Ok(()),
            Retry::Again(_) => {}
        }
    }
    match attempt().await? {
        Retry::Done => Ok(()),
        Retry::Again(e) => Err(e),
    }
}

enum Retry {
    Done,
    Again(ApiError),
}

/// A write conflict is retried; any other error is final.
fn write_outcome(r: Result<(), ApiError>) -> Result<Retry, ApiError> {
    match r {
        Ok(()) => Ok(Retry::Done),
        Err(e @ ApiError::Conflict { .. })
            if e.to_string().contains("the object has been modified") =>
        {
            Ok(Retry::Again(e))
        }
        Err(e) => Err(e),
    }
}

/// `start`: Halted → runStrategy Always (or running=true); Manual /
/// RerunOnFailure → a Start state change request; Always / Once → 400.
/// 409 when the VMI exists and is not in a final phase.
pub async fn start_vm(
    reg: &Registry,
    ns: &str,
    name: &str,
    opts: &StartOptions,
) -> Result<(), ApiError> {
    let (vm_kind, vmi_kind) = kinds(reg)?;
    retrying(|| async {
        let vm = reg.get(vm_kind, ns, name).await?;
        let vmi = get_opt(reg, vmi_kind, ns, name).await?;
        if let Some(vmi) = &vmi
            && !vmi_is_final(vmi)
            && !matches!(phase(vmi), "" | "Unknown")
        {
            return Err(conflict(vm_kind, name, "VM is already running"));
        }
        let rs = run_strategy(&vm)?;
        let change = match rs {
            RunStrategy::Halted => {
                let start_paused_already = vm
                    .pointer("/spec/template/spec/startStrategy")
                    .and_then(Value::as_str)
                    == Some("Paused");
                if opts.paused && !start_paused_already {
                    VmChange::SetRunningPaused
                } else {
                    VmChange::SetRunning(true)
                }
            }
            RunStrategy::Manual | RunStrategy::RerunOnFailure => {
                let vmi_phase = vmi.as_ref().map(phase).unwrap_or_default();
                let needs_restart = match rs {
                    RunStrategy::RerunOnFailure => vmi_phase == "Succeeded",
                    _ => vmi.as_ref().is_some_and(vmi_is_final),
                };
                if rs == RunStrategy::RerunOnFailure && vmi_phase == "Failed" {
                    return Err(conflict(
                        vm_kind,
                        name,
                        "RerunOnFailure does not support starting VM from failed state",
                    ));
                }
                match (&vmi, needs_restart) {
                    (Some(vmi), true) => {
                        VmChange::Requests(vec![stop_request(vmi), start_request(opts.paused)])
                    }
                    _ => VmChange::Requests(vec![start_request(opts.paused)]),
                }
            }
            RunStrategy::Always | RunStrategy::Once => {
                return Err(ApiError::BadRequest(format!(
                    "{rs} does not support manual start requests"
                )));
            }
        };
        write_outcome(apply_change(reg, vm_kind, &vm, name, change).await)
    })
    .await
}

/// `stop`: Always / RerunOnFailure / Once → runStrategy Halted (or
/// running=false); Manual → a Stop state change request for the running
/// VMI; Halted → 409 unless a VMI still runs and the request shortens its
/// grace period. A grace period is recorded on the VMI in the
/// [`STOP_GRACE_PERIOD_ANNOTATION`] annotation.
pub async fn stop_vm(
    reg: &Registry,
    ns: &str,
    name: &str,
    opts: &StopOptions,
) -> Result<(), ApiError> {
    let (vm_kind, vmi_kind) = kinds(reg)?;
    if opts.grace_period.is_some_and(|g| g < 0) {
        return Err(ApiError::BadRequest(
            "gracePeriod has to be greater or equal to 0".into(),
        ));
    }
    retrying(|| async {
        let vm = reg.get(vm_kind, ns, name).await?;
        let rs = run_strategy(&vm)?;
        let vmi = get_opt(reg, vmi_kind, ns, name).await?;
        let running_vmi = vmi.as_ref().filter(|v| !vmi_is_final(v));
        let change = match rs {
            RunStrategy::Halted => {
                let Some(vmi) = running_vmi else {
                    return Err(conflict(vm_kind, name, VM_NOT_RUNNING));
                };
                let old = vmi_grace_period(vmi);
                let shorter = match (opts.grace_period, old) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(g), Some(o)) => g < o,
                };
                if !shorter {
                    return Err(conflict(
                        vm_kind,
                        name,
                        "Halted only supports manual stop requests with a shorter graceperiod",
                    ));
                }
                VmChange::Requests(vec![stop_request(vmi)])
            }
            RunStrategy::Manual => {
                let Some(vmi) = running_vmi else {
                    return Err(conflict(vm_kind, name, VM_NOT_RUNNING));
                };
                VmChange::Requests(vec![stop_request(vmi)])
            }
            RunStrategy::Always | RunStrategy::RerunOnFailure | RunStrategy::Once => {
                VmChange::SetRunning(false)
            }
        };
        if let (Some(vmi), Some(g)) = (running_vmi, opts.grace_period) {
            let r = set_vmi_grace(reg, vmi_kind, vmi, g).await;
            if let Retry::Again(e) = write_outcome(r)? {
                return Ok(Retry::Again(e));
            }
        }
        write_outcome(apply_change(reg, vm_kind, &vm, name, change).await)
    })
    .await
}

/// `restart`: Halted / Once → 400; no running VMI → 409; otherwise Stop
/// (for the current VMI's uid) then Start state change requests.
pub async fn restart_vm(
    reg: &Registry,
    ns: &str,
    name: &str,
    opts: &RestartOptions,
) -> Result<(), ApiError> {
    let (vm_kind, vmi_kind) = kinds(reg)?;
    match opts.grace_period_seconds {
        Some(g) if g > 0 => {
            return Err(ApiError::BadRequest(
                "For force restart, only gracePeriod=0 is supported for now".into(),
            ));
        }
        Some(g) if g < 0 => {
            return Err(ApiError::BadRequest(
                "gracePeriod has to be greater or equal to 0".into(),
            ));
        }
        _ => {}
    }
    retrying(|| async {
        let vm = reg.get(vm_kind, ns, name).await?;
        let rs = run_strategy(&vm)?;
        if matches!(rs, RunStrategy::Halted | RunStrategy::Once) {
            return Err(ApiError::BadRequest(format!(
                "RunStategy {rs} does not support manual restart requests"
            )));
        }
        let vmi = get_opt(reg, vmi_kind, ns, name).await?;
        let Some(vmi) = vmi.filter(|v| !vmi_is_final(v)) else {
            return Err(conflict(vm_kind, name, VM_NOT_RUNNING));
        };
        if let Some(g) = opts.grace_period_seconds {
            let r = set_vmi_grace(reg, vmi_kind, &vmi, g).await;
            if let Retry::Again(e) = write_outcome(r)? {
                return Ok(Retry::Again(e));
            }
        }
        let change = VmChange::Requests(vec![stop_request(&vmi), start_request(false)]);
        write_outcome(apply_change(reg, vm_kind, &vm, name, change).await)
    })
    .await
}

fn has_condition(vmi: &Value, ty: &str) -> bool {
    vmi.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("type").and_then(Value::as_str) == Some(ty))
        })
}

/// `pause`: the VMI must be Running, not paused, not migrating and have no
/// liveness probe; then the host connector pauses it.
pub async fn pause_vmi(
    reg: &Registry,
    connector: &dyn HostConnector,
    ns: &str,
    name: &str,
) -> Result<(), ApiError> {
    let (_, vmi_kind) = kinds(reg)?;
    let vmi = reg.get(vmi_kind, ns, name).await?;
    if phase(&vmi) != "Running" {
        return Err(conflict(vmi_kind, name, VM_NOT_RUNNING));
    }
    if vmi
        .pointer("/spec/livenessProbe")
        .is_some_and(|v| !v.is_null())
    {
        return Err(ApiError::Forbidden(format!(
            "{}.{} \"{name}\" is forbidden: Pausing VMIs with LivenessProbe is currently not supported",
            vmi_kind.singular, vmi_kind.group
        )));
    }
    if has_condition(&vmi, "Paused") {
        return Err(conflict(vmi_kind, name, "VMI is already paused"));
    }
    if let Some(ms) = vmi
        .pointer("/status/migrationState")
        .filter(|v| !v.is_null())
        && ms.get("completed").and_then(Value::as_bool) != Some(true)
    {
        return Err(conflict(
            vmi_kind,
            name,
            format!("Cannot pause VM '{name}' because it is currently being migrated"),
        ));
    }
    connector.pause(&vmi).await
}

/// `unpause`: the VMI must be Running and paused.
pub async fn unpause_vmi(
    reg: &Registry,
    connector: &dyn HostConnector,
    ns: &str,
    name: &str,
) -> Result<(), ApiError> {
    let (_, vmi_kind) = kinds(reg)?;
    let vmi = reg.get(vmi_kind, ns, name).await?;
    if phase(&vmi) != "Running" {
        return Err(conflict(vmi_kind, name, VMI_NOT_RUNNING));
    }
    if !has_condition(&vmi, "Paused") {
        return Err(conflict(vmi_kind, name, "VMI is not paused"));
    }
    connector.unpause(&vmi).await
}

/// The VMI for `console`: it must be Running.
pub async fn console_target(reg: &Registry, ns: &str, name: &str) -> Result<Value, ApiError> {
    let (_, vmi_kind) = kinds(reg)?;
    let vmi = reg.get(vmi_kind, ns, name).await?;
    if phase(&vmi) != "Running" {
        return Err(conflict(vmi_kind, name, VMI_NOT_RUNNING));
    }
    Ok(vmi)
}

/// The VMI for `consolelog` (any phase: the log outlives the guest).
pub async fn console_log_target(reg: &Registry, ns: &str, name: &str) -> Result<Value, ApiError> {
    let (_, vmi_kind) = kinds(reg)?;
    reg.get(vmi_kind, ns, name).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_strategy_resolution() {
        assert_eq!(
            run_strategy(&json!({"spec": {}})).unwrap(),
            RunStrategy::Halted
        );
        assert_eq!(
            run_strategy(&json!({"spec": {"running": true}})).unwrap(),
            RunStrategy::Always
        );
        assert_eq!(
            run_strategy(&json!({"spec": {"running": false}})).unwrap(),
            RunStrategy::Halted
        );
        assert_eq!(
            run_strategy(&json!({"spec": {"runStrategy": "Manual"}})).unwrap(),
            RunStrategy::Manual
        );
        assert!(
            run_strategy(&json!({"spec": {"runStrategy": "Manual", "running": true}})).is_err()
        );
        assert!(run_strategy(&json!({"spec": {"runStrategy": "Sometimes"}})).is_err());
    }
}
