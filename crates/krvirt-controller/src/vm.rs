//! The VM controller's decisions: from a VirtualMachine and its
//! VirtualMachineInstance (if any) to the actions that move the world
//! toward the VM's run strategy, and the VM status to report.
//!
//! This is a pure function ([`decide`]); [`crate::runner`] executes the
//! actions. Semantics follow KubeVirt:
//! - `Always`: a VMI always exists; a VMI that ended (guest poweroff or
//!   failure) is deleted and a new one created (failures with back-off).
//! - `RerunOnFailure`: like `Always`, but a VMI that succeeded (the guest
//!   powered off) stays ended.
//! - `Manual`: only start/stop requests (`status.stateChangeRequests`)
//!   create or delete the VMI.
//! - `Halted`: no VMI.
//! - `Once`: one VMI; when it ends the VM's run strategy becomes `Halted`.
//! - `running: true|false` is `Always|Halted`.
//!
//! At most one VMI per VM: it has the VM's name, so the store's
//! create-if-absent guarantees it.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use krvirt_api::instancetype::{
    INSTANCETYPE_SNAPSHOT_ANNOTATION, InstancetypeSpec, PREFERENCE_SNAPSHOT_ANNOTATION,
    PreferenceSpec, expand, parse_snapshot,
};
use krvirt_api::kubevirt::{
    PrintableStatus, RunStrategy, START_PAUSED_ANNOTATION, StateChangeRequestAction,
    VirtualMachine, VirtualMachineInstance, VirtualMachineStartFailure, VirtualMachineStatus,
    VmiPhase, vm_conditions, vmi_conditions,
};
use krvirt_api::meta::{
    Condition, ConditionStatus, ObjectMeta, OwnerReference, find_condition, parse_rfc3339,
    set_condition, to_rfc3339,
};
use krvirt_api::snapshot::{RESUME_FROM_ANNOTATION, RESUME_HOST_ANNOTATION};

/// Reason the agent puts in a failed VMI's `status.reason` when its image
/// could not be found; shown as ErrImagePull / ImagePullBackOff.
pub const REASON_IMAGE_PULL: &str = "ErrImagePull";

/// A VMI that stays Running this long clears the crash-loop counter.
pub const STABLE_RUN: Duration = Duration::from_secs(60);

/// What the runner must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create this VMI (the VM's template, owned by the VM).
    CreateVmi(Box<VirtualMachineInstance>),
    /// Delete the VMI with this uid (graceful: the agent stops the guest).
    DeleteVmi { uid: String },
    /// `Once` finished: set the VM's run strategy to `Halted`
    /// (or `running: false` for VMs using the deprecated field).
    HaltVm,
    /// The VM's start-paused annotation was used for the VMI just created:
    /// remove it so later starts run normally.
    ClearStartPaused,
    /// The VM's memory-snapshot resume mark
    /// ([`krvirt_api::snapshot::RESUME_FROM_ANNOTATION`] and its host) was
    /// copied into the VMI just created, or a VMI exists that did not take
    /// it: remove it, so only the next start resumes (and at most once).
    ClearResumeMark,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub actions: Vec<Action>,
    /// The VM status to write (written only if it differs from the stored one).
    pub status: VirtualMachineStatus,
    /// Look again after this long even if nothing changes (back-off end,
    /// stable-run check).
    pub requeue_after: Option<Duration>,
}

/// Crash-loop back-off before the `n`th consecutive restart (n ≥ 1):
/// 10 s, 20 s, 40 s, … capped at 5 minutes.
pub fn backoff(n: u32) -> Duration {
    let secs = 10u64.saturating_mul(1u64 << n.saturating_sub(1).min(16));
    Duration::from_secs(secs.min(300))
}

fn vmi_phase(vmi: &VirtualMachineInstance) -> VmiPhase {
    vmi.status
        .as_ref()
        .and_then(|s| s.phase)
        .unwrap_or(VmiPhase::Pending)
}

fn vmi_uid(vmi: &VirtualMachineInstance) -> String {
    vmi.metadata.uid.clone().unwrap_or_default()
}

fn is_owned_by(vmi: &VirtualMachineInstance, vm: &VirtualMachine) -> bool {
    let uid = vm.metadata.uid.as_deref().unwrap_or_default();
    vmi.metadata
        .owner_references
        .iter()
        .any(|o| o.kind == "VirtualMachine" && o.uid == uid && o.controller == Some(true))
}

/// The VMI a VM creates from its template; `paused`: its guest starts with
/// the vCPUs stopped.
pub fn vmi_from_template(vm: &VirtualMachine, paused: bool) -> VirtualMachineInstance {
    let tmpl = &vm.spec.template;
    let mut annotations = tmpl.metadata.annotations.clone();
    if paused {
        annotations.insert(START_PAUSED_ANNOTATION.into(), "true".into());
    }
    // A restored memory snapshot: this start resumes from it (on its host).
    for k in [RESUME_FROM_ANNOTATION, RESUME_HOST_ANNOTATION] {
        if let Some(v) = vm.metadata.annotations.get(k) {
            annotations.insert(k.into(), v.clone());
        }
    }
    let mut labels: BTreeMap<String, String> = tmpl.metadata.labels.clone();
    labels
        .entry("kubevirt.io/vm".into())
        .or_insert_with(|| vm.metadata.name().to_string());
    VirtualMachineInstance {
        metadata: ObjectMeta {
            name: vm.metadata.name.clone(),
            namespace: vm.metadata.namespace.clone(),
            labels,
            annotations,
            owner_references: vec![OwnerReference {
                api_version: "kubevirt.io/v1".into(),
                kind: "VirtualMachine".into(),
                name: vm.metadata.name().to_string(),
                uid: vm.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }],
            ..Default::default()
        },
        spec: tmpl.spec.clone(),
        ..Default::default()
    }
}

/// Reason of the VM's Failure condition when its instancetype or
/// preference cannot be applied (missing, or conflicting with the VM).
pub const REASON_INSTANCETYPE: &str = "InvalidInstancetype";

/// The VMI a VM creates, with its instancetype and preference expanded
/// from the copies recorded in the VM ([`crate::instancetypes`]).
pub fn expanded_vmi(vm: &VirtualMachine, paused: bool) -> Result<VirtualMachineInstance, String> {
    let mut vmi = vmi_from_template(vm, paused);
    if vm.spec.instancetype.is_none() && vm.spec.preference.is_none() {
        return Ok(vmi);
    }
    let ann = &vm.metadata.annotations;
    let it = parse_snapshot::<InstancetypeSpec>(ann, INSTANCETYPE_SNAPSHOT_ANNOTATION)
        .map_err(|c| c.message)?;
    let pref = parse_snapshot::<PreferenceSpec>(ann, PREFERENCE_SNAPSHOT_ANNOTATION)
        .map_err(|c| c.message)?;
    if vm.spec.instancetype.is_some() && it.is_none() {
        return Err("the VM's instancetype has not been recorded yet".into());
    }
    if vm.spec.preference.is_some() && pref.is_none() {
        return Err("the VM's preference has not been recorded yet".into());
    }
    expand(
        &mut vmi.spec,
        it.as_ref().map(|s| &s.spec),
        pref.as_ref().map(|s| &s.spec),
    )
    .map_err(|causes| {
        causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    Ok(vmi)
}

fn running_since(vmi: &VirtualMachineInstance) -> Option<DateTime<Utc>> {
    vmi.status.as_ref().and_then(|s| {
        s.phase_transition_timestamps
            .iter()
            .rev()
            .find(|t| t.phase == VmiPhase::Running)
            .and_then(|t| parse_rfc3339(&t.phase_transition_timestamp))
    })
}

/// Decide what to do for `vm` given its VMI (same namespace and name) at `now`.
pub fn decide(
    vm: &VirtualMachine,
    vmi: Option<&VirtualMachineInstance>,
    now: DateTime<Utc>,
) -> Decision {
    let strategy = vm.spec.effective_run_strategy();
    let mut status = vm.status.clone().unwrap_or_default();
    let mut actions = Vec::new();
    let mut requeue_after = None;

    // A VMI of the same name that this VM does not own is not ours to touch.
    if let Some(v) = vmi.filter(|v| !is_owned_by(v, vm)) {
        let msg = format!(
            "a VirtualMachineInstance named {} exists that this VirtualMachine does not own",
            v.metadata.name()
        );
        set_condition(
            &mut status.conditions,
            Condition {
                reason: Some("VMIExists".into()),
                message: Some(msg),
                ..Condition::new(vm_conditions::FAILURE, ConditionStatus::True)
            },
        );
        status.printable_status = Some(PrintableStatus::Unknown);
        return Decision {
            actions,
            status,
            requeue_after,
        };
    }
    status.conditions.retain(|c| {
        !(c.type_ == vm_conditions::FAILURE && c.reason.as_deref() == Some("VMIExists"))
    });

    let deleting_vm = vm.metadata.deletion_timestamp.is_some();
    let vmi_deleting = vmi.is_some_and(|v| v.metadata.deletion_timestamp.is_some());
    let phase = vmi.map(vmi_phase);
    let vmi_final = phase.is_some_and(VmiPhase::is_final);
    // A live VMI: exists, not ended, not going away.
    let live = vmi.is_some() && !vmi_final && !vmi_deleting;

    // Crash-loop bookkeeping: count each failed VMI once.
    if let (Some(v), Some(VmiPhase::Failed)) = (vmi, phase) {
        let uid = vmi_uid(v);
        let sf = status.start_failure.get_or_insert_with(Default::default);
        if sf.last_failed_vmi_uid.as_deref() != Some(uid.as_str()) {
            let n = sf.consecutive_fail_count.unwrap_or(0) + 1;
            *sf = VirtualMachineStartFailure {
                consecutive_fail_count: Some(n),
                last_failed_vmi_uid: Some(uid),
                retry_after_timestamp: Some(to_rfc3339(
                    now + chrono::Duration::from_std(backoff(n)).unwrap_or_default(),
                )),
            };
        }
    }
    match (vmi, phase) {
        (Some(_), Some(VmiPhase::Succeeded)) => status.start_failure = None,
        (Some(v), Some(VmiPhase::Running)) => match running_since(v) {
            Some(t) if now - t >= chrono::Duration::from_std(STABLE_RUN).unwrap_or_default() => {
                status.start_failure = None;
            }
            Some(t) if status.start_failure.is_some() => {
                let left = chrono::Duration::from_std(STABLE_RUN).unwrap_or_default() - (now - t);
                requeue_after = left.to_std().ok();
            }
            _ => {}
        },
        _ => {}
    }
    let retry_at = status
        .start_failure
        .as_ref()
        .and_then(|f| f.retry_after_timestamp.as_deref())
        .and_then(parse_rfc3339);
    let in_backoff = retry_at.is_some_and(|t| t > now);
    let image_failure = vmi.is_some_and(|v| {
        v.status.as_ref().and_then(|s| s.reason.as_deref()) == Some(REASON_IMAGE_PULL)
    });
    if image_failure {
        let message = vmi
            .and_then(|v| v.status.as_ref())
            .and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.status == ConditionStatus::False && c.message.is_some())
                    .and_then(|c| c.message.clone())
            })
            .unwrap_or_else(|| "the VMI's image could not be found".into());
        set_condition(
            &mut status.conditions,
            Condition {
                reason: Some(REASON_IMAGE_PULL.into()),
                message: Some(message),
                ..Condition::new(vm_conditions::FAILURE, ConditionStatus::True)
            },
        );
    } else if phase == Some(VmiPhase::Running) {
        status
            .conditions
            .retain(|c| c.type_ != vm_conditions::FAILURE);
    }

    let vm_start_paused = vm
        .metadata
        .annotations
        .get(START_PAUSED_ANNOTATION)
        .is_some_and(|v| v == "true");
    let expansion_error = expanded_vmi(vm, false).err();
    match &expansion_error {
        Some(msg) => set_condition(
            &mut status.conditions,
            Condition {
                reason: Some(REASON_INSTANCETYPE.into()),
                message: Some(msg.clone()),
                ..Condition::new(vm_conditions::FAILURE, ConditionStatus::True)
            },
        ),
        None => status.conditions.retain(|c| {
            !(c.type_ == vm_conditions::FAILURE && c.reason.as_deref() == Some(REASON_INSTANCETYPE))
        }),
    }
    let create = |actions: &mut Vec<Action>, requeue: &mut Option<Duration>| {
        if expansion_error.is_some() {
            // Reported in the Failure condition; a change of the VM retries.
        } else if in_backoff {
            let wait = retry_at
                .map(|t| (t - now).to_std().unwrap_or_default())
                .unwrap_or_default();
            *requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
        } else {
            if let Ok(v) = expanded_vmi(vm, vm_start_paused) {
                actions.push(Action::CreateVmi(Box::new(v)));
            }
            if vm_start_paused {
                actions.push(Action::ClearStartPaused);
            }
        }
    };

    if deleting_vm {
        if let Some(v) = vmi.filter(|_| !vmi_deleting) {
            actions.push(Action::DeleteVmi { uid: vmi_uid(v) });
        }
    } else {
        // Start/stop requests first (Manual, and restarts of any strategy).
        let mut consumed = 0;
        for req in &status.state_change_requests {
            match req.action {
                StateChangeRequestAction::Stop => {
                    let target = vmi.filter(|v| {
                        req.uid.as_deref().is_none_or(|u| u == vmi_uid(v)) && !vmi_deleting
                    });
                    if let Some(v) = target {
                        actions.push(Action::DeleteVmi { uid: vmi_uid(v) });
                        // Keep the request until the VMI is gone.
                        break;
                    }
                    if vmi_deleting {
                        break;
                    }
                    consumed += 1;
                }
                StateChangeRequestAction::Start => {
                    if vmi.is_none() && expansion_error.is_some() {
                        // Not startable: the Failure condition says why.
                        consumed += 1;
                    } else if vmi.is_none() {
                        let paused =
                            vm_start_paused || req.data.get("paused").is_some_and(|v| v == "true");
                        if let Ok(v) = expanded_vmi(vm, paused) {
                            actions.push(Action::CreateVmi(Box::new(v)));
                        }
                        if vm_start_paused {
                            actions.push(Action::ClearStartPaused);
                        }
                        consumed += 1;
                    } else if vmi_final && !vmi_deleting {
                        // Clear the ended VMI first; the start follows.
                        if let Some(v) = vmi {
                            actions.push(Action::DeleteVmi { uid: vmi_uid(v) });
                        }
                    } else if live {
                        consumed += 1;
                    }
                    break;
                }
            }
        }
        let had_requests = !status.state_change_requests.is_empty();
        status.state_change_requests.drain(..consumed);
        let acted = !actions.is_empty() || (had_requests && consumed == 0);

        if !acted {
            match strategy {
                RunStrategy::Always => match vmi {
                    None => create(&mut actions, &mut requeue_after),
                    Some(v) if vmi_final && !vmi_deleting => {
                        actions.push(Action::DeleteVmi { uid: vmi_uid(v) })
                    }
                    _ => {}
                },
                RunStrategy::RerunOnFailure => match (vmi, phase) {
                    (None, _) if status.start_failure.is_some() || status.created != Some(true) => {
                        // Never started, or the last VMI failed: (re)start.
                        create(&mut actions, &mut requeue_after)
                    }
                    (Some(v), Some(VmiPhase::Failed)) if !vmi_deleting => {
                        actions.push(Action::DeleteVmi { uid: vmi_uid(v) })
                    }
                    _ => {}
                },
                RunStrategy::Halted => {
                    if let Some(v) = vmi.filter(|_| !vmi_deleting) {
                        actions.push(Action::DeleteVmi { uid: vmi_uid(v) });
                    }
                }
                RunStrategy::Once => match vmi {
                    None if status.created != Some(true) => {
                        create(&mut actions, &mut requeue_after)
                    }
                    Some(_) if vmi_final => actions.push(Action::HaltVm),
                    _ => {}
                },
                RunStrategy::Manual => {}
            }
        }
    }

    // The resume mark is for the next start only: gone once a VMI exists
    // (it carries the mark if this VM created it with the mark).
    let creating = actions.iter().any(|a| matches!(a, Action::CreateVmi(_)));
    if vm.metadata.annotations.contains_key(RESUME_FROM_ANNOTATION) && (creating || vmi.is_some()) {
        actions.push(Action::ClearResumeMark);
    }

    // Report.
    let paused = vmi.is_some_and(|v| {
        v.status
            .as_ref()
            .and_then(|s| find_condition(&s.conditions, vmi_conditions::PAUSED))
            .is_some_and(|c| c.status == ConditionStatus::True)
    });
    let unschedulable = vmi.is_some_and(|v| {
        v.status
            .as_ref()
            .and_then(|s| find_condition(&s.conditions, "PodScheduled"))
            .is_some_and(|c| c.status == ConditionStatus::False)
    });
    let vmi_ready = vmi.is_some_and(|v| {
        phase == Some(VmiPhase::Running)
            && v.status
                .as_ref()
                .and_then(|s| find_condition(&s.conditions, vmi_conditions::READY))
                .is_some_and(|c| c.status == ConditionStatus::True)
    });
    let backoff_status = if image_failure || status_failed_on_image(&status, vmi) {
        PrintableStatus::ImagePullBackOff
    } else {
        PrintableStatus::CrashLoopBackOff
    };
    let printable = if deleting_vm {
        PrintableStatus::Terminating
    } else {
        match (vmi, phase) {
            (None, _) if creating => PrintableStatus::Starting,
            (None, _) if in_backoff => backoff_status,
            (None, _) => PrintableStatus::Stopped,
            (Some(_), _) if vmi_deleting => PrintableStatus::Stopping,
            (Some(_), Some(VmiPhase::Running)) if paused => PrintableStatus::Paused,
            (Some(_), Some(VmiPhase::Running)) => PrintableStatus::Running,
            (Some(_), Some(VmiPhase::Failed)) if image_failure => PrintableStatus::ErrImagePull,
            (Some(_), Some(VmiPhase::Failed | VmiPhase::Succeeded)) if in_backoff => backoff_status,
            (Some(_), Some(VmiPhase::Failed | VmiPhase::Succeeded)) => PrintableStatus::Stopped,
            (Some(_), Some(VmiPhase::Unknown)) => PrintableStatus::Unknown,
            (Some(_), _) if unschedulable => PrintableStatus::ErrorUnschedulable,
            (Some(_), _) => PrintableStatus::Starting,
        }
    };
    status.printable_status = Some(printable);
    status.created = Some(vmi.is_some() || creating);
    status.ready = Some(vmi_ready);
    status.run_strategy = Some(strategy);
    status.observed_generation = vm.metadata.generation;
    status.desired_generation = vm.metadata.generation;

    let ready = if vmi_ready {
        Condition {
            reason: Some("VMIReady".into()),
            ..Condition::new(vm_conditions::READY, ConditionStatus::True)
        }
    } else {
        Condition {
            reason: Some(match vmi {
                None => "VMINotExists".into(),
                Some(_) => "VMINotReady".into(),
            }),
            ..Condition::new(vm_conditions::READY, ConditionStatus::False)
        }
    };
    set_condition(&mut status.conditions, ready);
    if paused {
        set_condition(
            &mut status.conditions,
            Condition {
                reason: Some("PausedByUser".into()),
                message: Some("VMI was paused by user".into()),
                ..Condition::new(vm_conditions::PAUSED, ConditionStatus::True)
            },
        );
    } else {
        status
            .conditions
            .retain(|c| c.type_ != vm_conditions::PAUSED);
    }

    Decision {
        actions,
        status,
        requeue_after,
    }
}

/// While a VM waits out a back-off after an image failure, its VMI is gone;
/// remember the reason through the failure record.
fn status_failed_on_image(
    status: &VirtualMachineStatus,
    vmi: Option<&VirtualMachineInstance>,
) -> bool {
    vmi.is_none()
        && status.conditions.iter().any(|c| {
            c.type_ == vm_conditions::FAILURE && c.reason.as_deref() == Some(REASON_IMAGE_PULL)
        })
}

#[cfg(test)]
mod tests;
