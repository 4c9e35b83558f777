use super::*;
use krvirt_api::kubevirt::{
    PhaseTransitionTimestamp, VirtualMachineInstanceStatus, VirtualMachineStateChangeRequest,
};

fn t0() -> DateTime<Utc> {
    parse_rfc3339("2026-01-01T00:00:00Z").unwrap()
}

fn vm(strategy: Option<RunStrategy>) -> VirtualMachine {
    let mut vm = VirtualMachine {
        metadata: ObjectMeta::named(Some("default"), "web"),
        ..Default::default()
    };
    vm.metadata.uid = Some("vm-uid".into());
    vm.metadata.generation = Some(3);
    vm.spec.run_strategy = strategy;
    vm.spec
        .template
        .metadata
        .labels
        .insert("app".into(), "web".into());
    vm
}

fn vmi(vm: &VirtualMachine, uid: &str, phase: VmiPhase) -> VirtualMachineInstance {
    let mut v = vmi_from_template(vm, false);
    v.metadata.uid = Some(uid.into());
    v.status = Some(VirtualMachineInstanceStatus {
        phase: Some(phase),
        ..Default::default()
    });
    v
}

fn ready(mut v: VirtualMachineInstance, since: DateTime<Utc>) -> VirtualMachineInstance {
    let st = v.status.get_or_insert_with(Default::default);
    st.phase = Some(VmiPhase::Running);
    st.phase_transition_timestamps
        .push(PhaseTransitionTimestamp {
            phase: VmiPhase::Running,
            phase_transition_timestamp: to_rfc3339(since),
        });
    set_condition(
        &mut st.conditions,
        Condition::new(vmi_conditions::READY, ConditionStatus::True),
    );
    v
}

fn creates(d: &Decision) -> bool {
    d.actions.iter().any(|a| matches!(a, Action::CreateVmi(_)))
}

fn deletes(d: &Decision) -> Option<&str> {
    d.actions.iter().find_map(|a| match a {
        Action::DeleteVmi { uid } => Some(uid.as_str()),
        _ => None,
    })
}

fn printable(d: &Decision) -> PrintableStatus {
    d.status.printable_status.unwrap()
}

#[test]
fn halted_without_vmi_is_stopped() {
    let d = decide(&vm(Some(RunStrategy::Halted)), None, t0());
    assert!(d.actions.is_empty());
    assert_eq!(printable(&d), PrintableStatus::Stopped);
    assert_eq!(d.status.created, Some(false));
    assert_eq!(d.status.run_strategy, Some(RunStrategy::Halted));
    assert_eq!(d.status.observed_generation, Some(3));
}

#[test]
fn neither_running_nor_strategy_means_halted() {
    let d = decide(&vm(None), None, t0());
    assert!(d.actions.is_empty());
    assert_eq!(d.status.run_strategy, Some(RunStrategy::Halted));
}

#[test]
fn running_true_is_always() {
    let mut m = vm(None);
    m.spec.running = Some(true);
    let d = decide(&m, None, t0());
    assert!(creates(&d));
    assert_eq!(d.status.run_strategy, Some(RunStrategy::Always));
}

#[test]
fn always_creates_an_owned_vmi_from_the_template() {
    let m = vm(Some(RunStrategy::Always));
    let d = decide(&m, None, t0());
    let Action::CreateVmi(v) = &d.actions[0] else {
        panic!("{:?}", d.actions)
    };
    assert_eq!(v.metadata.name(), "web");
    assert_eq!(v.metadata.namespace(), "default");
    assert_eq!(v.metadata.labels["app"], "web");
    assert_eq!(v.metadata.labels["kubevirt.io/vm"], "web");
    let owner = &v.metadata.owner_references[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("VirtualMachine", "vm-uid")
    );
    assert_eq!(owner.controller, Some(true));
    assert_eq!(printable(&d), PrintableStatus::Starting);
    assert_eq!(d.status.created, Some(true));
}

#[test]
fn always_running_ready_vmi_needs_nothing() {
    let m = vm(Some(RunStrategy::Always));
    let v = ready(vmi(&m, "u1", VmiPhase::Running), t0());
    let d = decide(&m, Some(&v), t0());
    assert!(d.actions.is_empty());
    assert_eq!(printable(&d), PrintableStatus::Running);
    assert_eq!(d.status.ready, Some(true));
    let c = find_condition(&d.status.conditions, vm_conditions::READY).unwrap();
    assert_eq!(c.status, ConditionStatus::True);
}

#[test]
fn always_replaces_a_vmi_whose_guest_powered_off_without_backoff() {
    let m = vm(Some(RunStrategy::Always));
    let v = vmi(&m, "u1", VmiPhase::Succeeded);
    let d = decide(&m, Some(&v), t0());
    assert_eq!(deletes(&d), Some("u1"));
    assert!(d.status.start_failure.is_none());
    // Once it is gone, a new one is created at once.
    let mut m2 = m.clone();
    m2.status = Some(d.status);
    let d2 = decide(&m2, None, t0());
    assert!(creates(&d2));
}

#[test]
fn always_failure_backs_off_then_restarts() {
    let m = vm(Some(RunStrategy::Always));
    let v = vmi(&m, "u1", VmiPhase::Failed);
    let d = decide(&m, Some(&v), t0());
    assert_eq!(deletes(&d), Some("u1"));
    let sf = d.status.start_failure.clone().unwrap();
    assert_eq!(sf.consecutive_fail_count, Some(1));
    assert_eq!(sf.last_failed_vmi_uid.as_deref(), Some("u1"));
    // Same failed VMI seen again: counted once.
    let mut m2 = m.clone();
    m2.status = Some(d.status.clone());
    let again = decide(&m2, Some(&v), t0());
    assert_eq!(
        again.status.start_failure.unwrap().consecutive_fail_count,
        Some(1)
    );
    // VMI gone, within the back-off: wait.
    let d2 = decide(&m2, None, t0() + chrono::Duration::seconds(3));
    assert!(!creates(&d2));
    assert_eq!(printable(&d2), PrintableStatus::CrashLoopBackOff);
    assert_eq!(d2.requeue_after, Some(Duration::from_secs(7)));
    // After it: restart.
    let d3 = decide(&m2, None, t0() + chrono::Duration::seconds(11));
    assert!(creates(&d3));
}

#[test]
fn failures_double_the_backoff_and_a_stable_run_clears_it() {
    assert_eq!(backoff(1), Duration::from_secs(10));
    assert_eq!(backoff(2), Duration::from_secs(20));
    assert_eq!(backoff(3), Duration::from_secs(40));
    assert_eq!(backoff(30), Duration::from_secs(300));
    let mut m = vm(Some(RunStrategy::Always));
    m.status = Some(VirtualMachineStatus {
        start_failure: Some(VirtualMachineStartFailure {
            consecutive_fail_count: Some(2),
            last_failed_vmi_uid: Some("u1".into()),
            retry_after_timestamp: Some(to_rfc3339(t0())),
        }),
        ..Default::default()
    });
    let failed = vmi(&m, "u2", VmiPhase::Failed);
    let d = decide(&m, Some(&failed), t0());
    assert_eq!(
        d.status.start_failure.unwrap().consecutive_fail_count,
        Some(3)
    );
    // Running for a short while: kept, and looked at again when 60 s are up.
    let v = ready(vmi(&m, "u3", VmiPhase::Running), t0());
    let d = decide(&m, Some(&v), t0() + chrono::Duration::seconds(20));
    assert!(d.status.start_failure.is_some());
    assert_eq!(d.requeue_after, Some(Duration::from_secs(40)));
    let d = decide(&m, Some(&v), t0() + chrono::Duration::seconds(61));
    assert!(d.status.start_failure.is_none());
}

#[test]
fn rerun_on_failure_leaves_a_succeeded_vmi_alone() {
    let m = vm(Some(RunStrategy::RerunOnFailure));
    let v = vmi(&m, "u1", VmiPhase::Succeeded);
    let d = decide(&m, Some(&v), t0());
    assert!(d.actions.is_empty());
    assert_eq!(printable(&d), PrintableStatus::Stopped);
}

#[test]
fn rerun_on_failure_restarts_a_failed_vmi() {
    let m = vm(Some(RunStrategy::RerunOnFailure));
    let d = decide(&m, None, t0());
    assert!(creates(&d), "first start");
    let v = vmi(&m, "u1", VmiPhase::Failed);
    let d = decide(&m, Some(&v), t0());
    assert_eq!(deletes(&d), Some("u1"));
    let mut m2 = m.clone();
    m2.status = Some(d.status);
    assert!(creates(&decide(
        &m2,
        None,
        t0() + chrono::Duration::seconds(11)
    )));
}

#[test]
fn halted_deletes_the_vmi_and_reports_stopping_while_it_goes() {
    let m = vm(Some(RunStrategy::Halted));
    let v = ready(vmi(&m, "u1", VmiPhase::Running), t0());
    let d = decide(&m, Some(&v), t0());
    assert_eq!(deletes(&d), Some("u1"));
    let mut going = v.clone();
    going.metadata.deletion_timestamp = Some(to_rfc3339(t0()));
    let d = decide(&m, Some(&going), t0());
    assert!(d.actions.is_empty(), "already being deleted");
    assert_eq!(printable(&d), PrintableStatus::Stopping);
}

#[test]
fn manual_start_and_stop_requests() {
    let mut m = vm(Some(RunStrategy::Manual));
    assert!(
        decide(&m, None, t0()).actions.is_empty(),
        "manual does nothing by itself"
    );
    m.status = Some(VirtualMachineStatus {
        state_change_requests: vec![VirtualMachineStateChangeRequest {
            action: StateChangeRequestAction::Start,
            ..Default::default()
        }],
        ..Default::default()
    });
    let d = decide(&m, None, t0());
    assert!(creates(&d));
    assert!(d.status.state_change_requests.is_empty());

    let v = ready(vmi(&m, "u1", VmiPhase::Running), t0());
    m.status = Some(VirtualMachineStatus {
        state_change_requests: vec![VirtualMachineStateChangeRequest {
            action: StateChangeRequestAction::Stop,
            uid: Some("u1".into()),
            ..Default::default()
        }],
        ..Default::default()
    });
    let d = decide(&m, Some(&v), t0());
    assert_eq!(deletes(&d), Some("u1"));
    assert_eq!(
        d.status.state_change_requests.len(),
        1,
        "kept until the VMI is gone"
    );
    let d = decide(&m, None, t0());
    assert!(d.actions.is_empty());
    assert!(d.status.state_change_requests.is_empty());
}

#[test]
fn restart_of_an_always_vm_stops_then_starts_a_new_vmi() {
    let mut m = vm(Some(RunStrategy::Always));
    m.status = Some(VirtualMachineStatus {
        state_change_requests: vec![
            VirtualMachineStateChangeRequest {
                action: StateChangeRequestAction::Stop,
                uid: Some("u1".into()),
                ..Default::default()
            },
            VirtualMachineStateChangeRequest {
                action: StateChangeRequestAction::Start,
                ..Default::default()
            },
        ],
        ..Default::default()
    });
    let v = ready(vmi(&m, "u1", VmiPhase::Running), t0());
    let d = decide(&m, Some(&v), t0());
    assert_eq!(deletes(&d), Some("u1"));
    assert!(!creates(&d));
    let d = decide(&m, None, t0());
    assert!(creates(&d));
    assert!(d.status.state_change_requests.is_empty());
}

#[test]
fn once_runs_once_then_halts() {
    let m = vm(Some(RunStrategy::Once));
    assert!(creates(&decide(&m, None, t0())));
    let v = vmi(&m, "u1", VmiPhase::Succeeded);
    let d = decide(&m, Some(&v), t0());
    assert_eq!(d.actions, vec![Action::HaltVm]);
}

#[test]
fn deleting_vm_deletes_its_vmi() {
    let mut m = vm(Some(RunStrategy::Always));
    m.metadata.deletion_timestamp = Some(to_rfc3339(t0()));
    let v = ready(vmi(&m, "u1", VmiPhase::Running), t0());
    let d = decide(&m, Some(&v), t0());
    assert_eq!(d.actions, vec![Action::DeleteVmi { uid: "u1".into() }]);
    assert_eq!(printable(&d), PrintableStatus::Terminating);
}

#[test]
fn a_foreign_vmi_is_left_alone() {
    let m = vm(Some(RunStrategy::Always));
    let mut v = vmi(&m, "u1", VmiPhase::Running);
    v.metadata.owner_references.clear();
    let d = decide(&m, Some(&v), t0());
    assert!(d.actions.is_empty());
    let c = find_condition(&d.status.conditions, vm_conditions::FAILURE).unwrap();
    assert_eq!(c.reason.as_deref(), Some("VMIExists"));
}

#[test]
fn paused_vmi_shows_paused() {
    let m = vm(Some(RunStrategy::Always));
    let mut v = ready(vmi(&m, "u1", VmiPhase::Running), t0());
    set_condition(
        &mut v.status.as_mut().unwrap().conditions,
        Condition::new(vmi_conditions::PAUSED, ConditionStatus::True),
    );
    let d = decide(&m, Some(&v), t0());
    assert_eq!(printable(&d), PrintableStatus::Paused);
    assert!(find_condition(&d.status.conditions, vm_conditions::PAUSED).is_some());
}

#[test]
fn image_failures_show_err_image_pull_then_backoff() {
    let m = vm(Some(RunStrategy::Always));
    let mut v = vmi(&m, "u1", VmiPhase::Failed);
    v.status.as_mut().unwrap().reason = Some(REASON_IMAGE_PULL.into());
    let d = decide(&m, Some(&v), t0());
    assert_eq!(printable(&d), PrintableStatus::ErrImagePull);
    let mut m2 = m.clone();
    m2.status = Some(d.status);
    let d2 = decide(&m2, None, t0() + chrono::Duration::seconds(2));
    assert_eq!(printable(&d2), PrintableStatus::ImagePullBackOff);
}

#[test]
fn unschedulable_vmi_shows_error_unschedulable() {
    let m = vm(Some(RunStrategy::Always));
    let mut v = vmi(&m, "u1", VmiPhase::Pending);
    set_condition(
        &mut v.status.as_mut().unwrap().conditions,
        Condition::new("PodScheduled", ConditionStatus::False),
    );
    assert_eq!(
        printable(&decide(&m, Some(&v), t0())),
        PrintableStatus::ErrorUnschedulable
    );
}

#[test]
fn start_paused_reaches_the_vmi_once() {
    let mut m = vm(Some(RunStrategy::Always));
    m.metadata
        .annotations
        .insert(START_PAUSED_ANNOTATION.into(), "true".into());
    let d = decide(&m, None, t0());
    let Action::CreateVmi(v) = &d.actions[0] else {
        panic!("{:?}", d.actions)
    };
    assert_eq!(v.metadata.annotations[START_PAUSED_ANNOTATION], "true");
    assert_eq!(d.actions[1], Action::ClearStartPaused);

    let mut manual = vm(Some(RunStrategy::Manual));
    manual.status = Some(VirtualMachineStatus {
        state_change_requests: vec![VirtualMachineStateChangeRequest {
            action: StateChangeRequestAction::Start,
            data: [("paused".to_string(), "true".to_string())].into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    let d = decide(&manual, None, t0());
    let Action::CreateVmi(v) = &d.actions[0] else {
        panic!("{:?}", d.actions)
    };
    assert_eq!(v.metadata.annotations[START_PAUSED_ANNOTATION], "true");
    assert_eq!(d.actions.len(), 1);
    let plain = decide(&vm(Some(RunStrategy::Always)), None, t0());
    let Action::CreateVmi(v) = &plain.actions[0] else {
        panic!()
    };
    assert!(!v.metadata.annotations.contains_key(START_PAUSED_ANNOTATION));
}

#[test]
fn a_resume_mark_goes_to_the_next_vmi_only() {
    use krvirt_api::snapshot::{RESUME_FROM_ANNOTATION, RESUME_HOST_ANNOTATION};
    let mut m = vm(Some(RunStrategy::Always));
    m.metadata
        .annotations
        .insert(RESUME_FROM_ANNOTATION.into(), "snap-uid".into());
    m.metadata
        .annotations
        .insert(RESUME_HOST_ANNOTATION.into(), "host1".into());
    let d = decide(&m, None, t0());
    let Action::CreateVmi(v) = &d.actions[0] else {
        panic!("{:?}", d.actions)
    };
    assert_eq!(v.metadata.annotations[RESUME_FROM_ANNOTATION], "snap-uid");
    assert_eq!(v.metadata.annotations[RESUME_HOST_ANNOTATION], "host1");
    assert!(
        d.actions.contains(&Action::ClearResumeMark),
        "{:?}",
        d.actions
    );
    // A VMI that exists (made before the mark, or whose clear failed):
    // the mark goes without a new VMI.
    let running = ready(vmi(&m, "u1", VmiPhase::Running), t0());
    let d = decide(&m, Some(&running), t0());
    assert_eq!(d.actions, vec![Action::ClearResumeMark]);
    // Stopped, no request: the mark stays for the next start.
    let mut halted = m.clone();
    halted.spec.run_strategy = Some(RunStrategy::Halted);
    assert!(decide(&halted, None, t0()).actions.is_empty());
    // Without a mark nothing is cleared and the VMI carries none.
    let d = decide(&vm(Some(RunStrategy::Always)), None, t0());
    let Action::CreateVmi(v) = &d.actions[0] else {
        panic!()
    };
    assert!(!v.metadata.annotations.contains_key(RESUME_FROM_ANNOTATION));
    assert!(!d.actions.contains(&Action::ClearResumeMark));
}

fn with_instancetype(snapshot: Option<serde_json::Value>) -> VirtualMachine {
    let mut v = vm(Some(RunStrategy::Always));
    v.spec.instancetype = Some(krvirt_api::instancetype::InstancetypeMatcher {
        name: "csmall".into(),
        kind: Some("VirtualMachineInstancetype".into()),
        revision_name: None,
    });
    if let Some(s) = snapshot {
        v.metadata
            .annotations
            .insert(INSTANCETYPE_SNAPSHOT_ANNOTATION.into(), s.to_string());
    }
    v
}

fn csmall(guest_cpus: u32, memory: &str) -> serde_json::Value {
    serde_json::json!({"kind": "VirtualMachineInstancetype", "name": "csmall", "generation": 1,
        "spec": {"cpu": {"guest": guest_cpus}, "memory": {"guest": memory}}})
}

#[test]
fn the_vmi_is_expanded_from_the_recorded_instancetype() {
    let v = with_instancetype(Some(csmall(2, "192Mi")));
    let d = decide(&v, None, t0());
    let Some(Action::CreateVmi(vmi)) = d.actions.first() else {
        panic!("a VMI is created: {:?}", d.actions);
    };
    let cpu = vmi.spec.domain.cpu.clone().expect("cpu");
    assert_eq!(
        (cpu.sockets, cpu.cores, cpu.threads),
        (Some(2), Some(1), Some(1))
    );
    assert_eq!(
        vmi.spec
            .domain
            .memory
            .as_ref()
            .and_then(|m| m.guest.clone())
            .map(|q| q.0),
        Some("192Mi".to_string())
    );
    assert!(
        !d.status
            .conditions
            .iter()
            .any(|c| c.reason.as_deref() == Some(REASON_INSTANCETYPE))
    );
}

#[test]
fn no_vmi_without_the_copy_or_with_a_conflict() {
    let d = decide(&with_instancetype(None), None, t0());
    assert!(!creates(&d), "{:?}", d.actions);
    let f = find_condition(&d.status.conditions, vm_conditions::FAILURE).expect("failure");
    assert_eq!(f.reason.as_deref(), Some(REASON_INSTANCETYPE));

    let mut v = with_instancetype(Some(csmall(1, "128Mi")));
    v.spec.template.spec.domain.memory = Some(krvirt_api::kubevirt::Memory {
        guest: Some("1Gi".into()),
        ..Default::default()
    });
    let d = decide(&v, None, t0());
    assert!(!creates(&d));
    let f = find_condition(&d.status.conditions, vm_conditions::FAILURE).expect("failure");
    assert!(
        f.message
            .as_deref()
            .is_some_and(|m| m.contains("spec.template.spec.domain.memory.guest")),
        "{f:?}"
    );
    assert_eq!(d.status.printable_status, Some(PrintableStatus::Stopped));
}
