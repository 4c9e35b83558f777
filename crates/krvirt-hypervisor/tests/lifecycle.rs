//! QEMU lifecycle and QMP against the real QEMU (TCG). The VMs have no
//! bootable device and sit in SeaBIOS, which is enough for QMP.

mod common;

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{QemuGuard, eventually, idle_vm, launch_guarded, pid_alive, qemu, tempdir, uid};
use krvirt_hypervisor::{
    DiskBus, DiskCache, DiskConfig, DiskFormat, ProcessError, QmpError, RunState, StopOptions,
    StopOutcome, launch, reattach,
};
use serde_json::json;
use tokio::sync::broadcast;

const EVENT_WAIT: Duration = Duration::from_secs(10);

async fn next_event(
    rx: &mut broadcast::Receiver<krvirt_hypervisor::QmpEvent>,
    name: &str,
) -> krvirt_hypervisor::QmpEvent {
    let fut = async {
        loop {
            match rx.recv().await {
                Ok(ev) if ev.event == name => return ev,
                Ok(_) => {}
                Err(e) => panic!("event stream ended while waiting for {name}: {e}"),
            }
        }
    };
    tokio::time::timeout(EVENT_WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("no {name} event within {EVENT_WAIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_status_pause_resume_and_events() {
    let tmp = tempdir();
    let u = uid("basic");
    let cfg = idle_vm(tmp.path(), "basic", &u);
    let (h, _guard) = launch_guarded(&cfg).await;

    let mode = std::fs::metadata(&cfg.run.dir)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "run dir must be private");
    assert!(pid_alive(h.pid()));
    assert!(h.is_alive());
    let pidfile = std::fs::read_to_string(&cfg.run.pidfile).unwrap();
    assert_eq!(pidfile.trim(), h.pid().to_string());
    assert!(cfg.run.console_log.exists());
    assert!(cfg.run.serial_socket.exists());

    let g = h.qmp().greeting();
    assert!(g.version.major >= 7, "{g:?}");

    assert_eq!(h.status().await.unwrap(), RunState::Running);
    let mut events = h.qmp().subscribe_events();
    h.pause().await.unwrap();
    assert_eq!(h.status().await.unwrap(), RunState::Paused);
    let stop = next_event(&mut events, "STOP").await;
    assert!(stop.timestamp.0 > 1_600_000_000, "{stop:?}");
    h.resume().await.unwrap();
    next_event(&mut events, "RESUME").await;
    assert_eq!(h.status().await.unwrap(), RunState::Running);

    let name = h.qmp().execute("query-name", None).await.unwrap();
    assert_eq!(name["name"], json!("basic"));
    assert_eq!(
        h.graceful_stop(Duration::ZERO).await.unwrap(),
        StopOutcome::Quit
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commands_are_matched_by_id() {
    let tmp = tempdir();
    let cfg = idle_vm(tmp.path(), "concurrent", &uid("conc"));
    let (h, _guard) = launch_guarded(&cfg).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let q = h.qmp().clone();
        tasks.push(tokio::spawn(async move {
            // Alternate commands whose replies look different, so a reply
            // delivered to the wrong caller is detected.
            if i % 2 == 0 {
                let v = q.execute("query-name", None).await.unwrap();
                assert_eq!(v["name"], json!("concurrent"), "task {i}");
            } else {
                let v = q.execute("query-uuid", None).await.unwrap();
                assert_eq!(
                    v["UUID"],
                    json!("5b0f0c52-1c1d-4c43-8d5c-2f3e4a5b6c7d"),
                    "task {i}"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    h.graceful_stop(Duration::ZERO).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_timeouts_and_fd_passing() {
    let tmp = tempdir();
    let cfg = idle_vm(tmp.path(), "errors", &uid("err"));
    let (h, _guard) = launch_guarded(&cfg).await;
    let q = h.qmp();

    match q.execute("no-such-command", None).await {
        Err(QmpError::Command {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected a CommandNotFound error, got {other:?}"),
    }
    match q.execute("device_del", Some(json!({"id": "nope"}))).await {
        Err(QmpError::Command { class, .. }) => assert_eq!(class, "DeviceNotFound"),
        other => panic!("expected DeviceNotFound, got {other:?}"),
    }

    // A command QEMU cannot answer in time (the process is frozen with
    // SIGSTOP) times out; once QEMU runs again the connection is still
    // usable and the late reply is not delivered to anyone else.
    // SAFETY: kill(2) of the QEMU this test started.
    unsafe { libc::kill(h.pid() as i32, libc::SIGSTOP) };
    let r = q
        .execute_with_timeout("query-status", None, Duration::from_millis(500))
        .await;
    // SAFETY: as above.
    unsafe { libc::kill(h.pid() as i32, libc::SIGCONT) };
    match r {
        Err(QmpError::Timeout { command, after }) => {
            assert_eq!(command, "query-status");
            assert_eq!(after, Duration::from_millis(500));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let v = q.execute("query-name", None).await.unwrap();
    assert_eq!(v["name"], json!("errors"));

    // SCM_RIGHTS: getfd takes the fd passed with the command.
    let (r, _w) = nix::unistd::pipe().unwrap();
    q.execute_with_fd("getfd", Some(json!({"fdname": "probe"})), r.as_fd())
        .await
        .unwrap();
    q.execute("closefd", Some(json!({"fdname": "probe"})))
        .await
        .unwrap();
    // Closed already: QEMU no longer has it.
    match q.execute("closefd", Some(json!({"fdname": "probe"}))).await {
        Err(QmpError::Command { class, desc, .. }) => {
            assert_eq!(class, "GenericError");
            assert!(desc.contains("probe"), "{desc}");
        }
        other => panic!("expected an error for a closed fd, got {other:?}"),
    }
    // Without an fd, getfd fails.
    match q.execute("getfd", Some(json!({"fdname": "none"}))).await {
        Err(QmpError::Command { desc, .. }) => assert!(desc.contains("SCM_RIGHTS"), "{desc}"),
        other => panic!("expected getfd without an fd to fail, got {other:?}"),
    }

    // After quit the connection is closed, for commands and for events.
    let mut events = q.subscribe_events();
    assert_eq!(
        h.graceful_stop(Duration::ZERO).await.unwrap(),
        StopOutcome::Quit
    );
    tokio::time::timeout(Duration::from_secs(5), q.closed())
        .await
        .expect("closed() resolves after QEMU exits");
    assert!(q.is_closed());
    assert!(matches!(
        q.execute("query-status", None).await,
        Err(QmpError::Closed)
    ));
    let mut saw_closed = false;
    while let Ok(r) = tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
        if let Err(broadcast::error::RecvError::Closed) = r {
            saw_closed = true;
            break;
        }
    }
    assert!(saw_closed, "event receivers must see the connection close");
    assert!(matches!(
        q.subscribe_events().recv().await,
        Err(broadcast::error::RecvError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_after_agent_restart() {
    let tmp = tempdir();
    let u = uid("reattach");
    let cfg = idle_vm(tmp.path(), "reattach", &u);
    let (h, _guard) = launch_guarded(&cfg).await;
    let pid = h.pid();
    h.pause().await.unwrap();
    // The "agent" goes away: the QMP connection closes, QEMU stays.
    drop(h);
    assert!(pid_alive(pid));

    // Wrong marker: not ours, never adopted.
    assert!(
        reattach(&cfg.run, "some-other-uid")
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        reattach(&cfg.run, "").await,
        Err(ProcessError::EmptyMarker)
    ));

    let h = reattach(&cfg.run, &u)
        .await
        .unwrap()
        .expect("the running QEMU is adopted");
    assert_eq!(h.pid(), pid);
    assert_eq!(
        h.status().await.unwrap(),
        RunState::Paused,
        "state survives"
    );
    let mut events = h.qmp().subscribe_events();
    h.resume().await.unwrap();
    next_event(&mut events, "RESUME").await;
    assert_eq!(h.status().await.unwrap(), RunState::Running);

    // A second agent instance while the first holds QMP: the socket only
    // serves one client, so re-attaching fails loudly instead of hanging.
    match reattach(&cfg.run, &u).await {
        Err(ProcessError::Qmp(QmpError::Timeout { .. })) => {}
        other => panic!("expected a greeting timeout, got {other:?}"),
    }
    assert_eq!(
        h.graceful_stop(Duration::ZERO).await.unwrap(),
        StopOutcome::Quit
    );
    // Gone: nothing to re-attach to.
    assert!(reattach(&cfg.run, &u).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_or_foreign_pidfiles_are_not_adopted() {
    let tmp = tempdir();
    let u = uid("stale");
    let cfg = idle_vm(tmp.path(), "stale", &u);
    std::fs::create_dir_all(&cfg.run.dir).unwrap();

    // No pidfile.
    assert!(reattach(&cfg.run, &u).await.unwrap().is_none());
    // Garbage.
    std::fs::write(&cfg.run.pidfile, "not a pid\n").unwrap();
    assert!(reattach(&cfg.run, &u).await.unwrap().is_none());
    // A process that has exited.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::write(&cfg.run.pidfile, format!("{dead}\n")).unwrap();
    assert!(reattach(&cfg.run, &u).await.unwrap().is_none());
    // A live process that is not QEMU (this test binary).
    std::fs::write(&cfg.run.pidfile, format!("{}\n", std::process::id())).unwrap();
    assert!(reattach(&cfg.run, &u).await.unwrap().is_none());

    // A live QEMU of another VM (e.g. a recycled pid now used by it).
    let u2 = uid("foreign");
    let other = idle_vm(tmp.path(), "foreign", &u2);
    let (oh, _og) = launch_guarded(&other).await;
    std::fs::write(&cfg.run.pidfile, format!("{}\n", oh.pid())).unwrap();
    assert!(reattach(&cfg.run, &u).await.unwrap().is_none());
    // Even with the other VM's uid as marker: its QMP path is not ours.
    assert!(reattach(&cfg.run, &u2).await.unwrap().is_none());

    // A stale pidfile does not stop a launch.
    std::fs::write(&cfg.run.pidfile, format!("{dead}\n")).unwrap();
    let (h, _g) = launch_guarded(&cfg).await;
    assert_ne!(h.pid(), dead);
    h.graceful_stop(Duration::ZERO).await.unwrap();
    oh.graceful_stop(Duration::ZERO).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_without_guest_cooperation_quits() {
    let tmp = tempdir();
    let cfg = idle_vm(tmp.path(), "stopper", &uid("stop"));

    // Zero grace: straight to quit.
    let (h, _g) = launch_guarded(&cfg).await;
    let pid = h.pid();
    assert_eq!(
        h.graceful_stop(Duration::ZERO).await.unwrap(),
        StopOutcome::Quit
    );
    assert!(!h.is_alive());
    assert!(!pid_alive(pid));
    assert!(h.wait_exit(Duration::from_millis(10)).await.unwrap());
    assert!(
        !cfg.run.pidfile.exists(),
        "QEMU removes its pidfile on exit"
    );
    // Stopping again reports that it is gone.
    assert_eq!(
        h.graceful_stop(Duration::from_secs(1)).await.unwrap(),
        StopOutcome::Exited
    );
    drop(h);

    // Short grace: SeaBIOS ignores the power button, so after the grace
    // period QEMU is told to quit.
    let (h, _g2) = launch_guarded(&cfg).await;
    let start = Instant::now();
    assert_eq!(
        h.graceful_stop(Duration::from_millis(1500)).await.unwrap(),
        StopOutcome::Quit
    );
    assert!(start.elapsed() >= Duration::from_millis(1500));
    assert!(!h.is_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_qemu_is_killed_as_last_resort() {
    let tmp = tempdir();
    let cfg = idle_vm(tmp.path(), "frozen", &uid("frozen"));
    let (h, _g) = launch_guarded(&cfg).await;
    // A QEMU that answers nothing (stopped by a signal) cannot quit.
    // SAFETY: kill(2) of the QEMU this test started.
    unsafe { libc::kill(h.pid() as i32, libc::SIGSTOP) };
    let opts = StopOptions {
        quit_timeout: Duration::from_secs(1),
        kill_timeout: Duration::from_secs(10),
    };
    let start = Instant::now();
    let out = h
        .graceful_stop_with(Duration::from_millis(500), opts)
        .await
        .unwrap();
    assert_eq!(out, StopOutcome::Killed);
    assert!(!h.is_alive());
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "grace and quit timeouts are honoured even when QMP hangs: {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_kill_is_detected() {
    let tmp = tempdir();
    let cfg = idle_vm(tmp.path(), "victim", &uid("kill"));
    let (h, _g) = launch_guarded(&cfg).await;
    let waiter = {
        let q = h.qmp().clone();
        tokio::spawn(async move { q.closed().await })
    };
    // Someone else kills QEMU (OOM killer, operator...).
    // SAFETY: plain kill(2) of the QEMU this test started.
    unsafe { libc::kill(h.pid() as i32, libc::SIGKILL) };
    assert!(h.wait_exit(Duration::from_secs(10)).await.unwrap());
    assert!(!h.is_alive());
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("QMP notices the dead peer")
        .unwrap();
    assert_eq!(
        h.graceful_stop(Duration::from_secs(5)).await.unwrap(),
        StopOutcome::Exited
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_failure_carries_qemu_message() {
    let tmp = tempdir();
    let mut cfg = idle_vm(tmp.path(), "broken", &uid("broken"));
    cfg.disks.push(DiskConfig {
        id: "root".into(),
        path: "/nonexistent/krvirt/root.qcow2".into(),
        format: DiskFormat::Qcow2,
        bus: DiskBus::Virtio,
        read_only: false,
        boot_index: Some(1),
        serial: None,
        cache: DiskCache::Writeback,
        backing: vec![],
        rbd: None,
    });
    match launch(&cfg, &qemu()).await {
        Err(e @ ProcessError::LaunchFailed { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("Could not open '/nonexistent/krvirt/root.qcow2'"),
                "{msg}"
            );
        }
        Ok(h) => {
            let _g = QemuGuard::new(&h, cfg.run.dir.to_string_lossy().into_owned());
            panic!("QEMU started with a missing disk");
        }
        Err(other) => panic!("expected LaunchFailed, got {other:?}"),
    }
    assert!(!cfg.run.pidfile.exists(), "no QEMU left behind");

    // Invalid configs never reach QEMU.
    let mut bad = idle_vm(tmp.path(), "bad", &uid("bad"));
    bad.memory_bytes = 0;
    assert!(matches!(
        launch(&bad, &qemu()).await,
        Err(ProcessError::Config(_))
    ));
    // A missing binary is a spawn error.
    let ok = idle_vm(tmp.path(), "nobin", &uid("nobin"));
    assert!(matches!(
        launch(&ok, std::path::Path::new("/nonexistent/qemu")).await,
        Err(ProcessError::Spawn { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_side_by_side() {
    let tmp = tempdir();
    let a = idle_vm(tmp.path(), "vm-a", &uid("a"));
    let b = idle_vm(tmp.path(), "vm-b", &uid("b"));
    let (ha, _ga) = launch_guarded(&a).await;
    let (hb, _gb) = launch_guarded(&b).await;
    assert_ne!(ha.pid(), hb.pid());

    // Same paths again: refused, the running VM is untouched.
    match launch(&a, &qemu()).await {
        Err(ProcessError::AlreadyRunning { pid }) => assert_eq!(pid, ha.pid()),
        Ok(h) => {
            let _g = QemuGuard::new(&h, a.run.dir.to_string_lossy().into_owned());
            panic!("a second QEMU started on the same run paths");
        }
        Err(other) => panic!("expected AlreadyRunning, got {other:?}"),
    }

    ha.pause().await.unwrap();
    assert_eq!(ha.status().await.unwrap(), RunState::Paused);
    assert_eq!(hb.status().await.unwrap(), RunState::Running);
    for (h, name) in [(&ha, "vm-a"), (&hb, "vm-b")] {
        let v = h.qmp().execute("query-name", None).await.unwrap();
        assert_eq!(v["name"], json!(name));
    }
    assert_eq!(
        ha.graceful_stop(Duration::ZERO).await.unwrap(),
        StopOutcome::Quit
    );
    assert!(hb.is_alive(), "stopping one VM leaves the other alone");
    assert_eq!(hb.status().await.unwrap(), RunState::Running);
    assert_eq!(
        hb.graceful_stop(Duration::ZERO).await.unwrap(),
        StopOutcome::Quit
    );
    eventually("both gone", Duration::from_secs(5), || {
        !pid_alive(ha.pid()) && !pid_alive(hb.pid())
    })
    .await;
}
