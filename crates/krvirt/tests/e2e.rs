//! End to end, under TCG: real `krvirt up`, real QEMU guests built from
//! Debian packages, the CLI and the REST API. What issue #2 asks to show.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn vm_yaml(name: &str, strategy: &str, user_data: &str) -> String {
    let user_data = user_data
        .lines()
        .map(|l| format!("            {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    format!(
        r#"apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: {name}
spec:
  runStrategy: {strategy}
  template:
    spec:
      domain:
        devices:
          disks:
          - name: containerdisk
            disk: {{bus: virtio}}
          - name: cloudinitdisk
            disk: {{bus: virtio}}
        memory:
          guest: 128Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - name: containerdisk
        containerDisk:
          image: quay.io/kubevirt/cirros-container-disk-demo
      - name: cloudinitdisk
        cloudInitNoCloud:
          userData: |
{user_data}
"#
    )
}

fn apply(inst: &Instance, yaml: &str) {
    let path = inst.dir.path().join(format!("m-{}.yaml", rand_suffix()));
    std::fs::write(&path, yaml).unwrap();
    inst.ok(&["apply", "-f", path.to_str().unwrap()]);
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

async fn printable(inst: &Instance, vm: &str) -> String {
    inst.vm(vm).await.map_or(String::new(), |v| {
        v["status"]["printableStatus"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    })
}

/// The README's tour: apply the corpus' vm-cirros.yaml, start it, list it,
/// read its console log, type on its console, stop it, delete it.
#[tokio::test(flavor = "multi_thread")]
async fn vm_cirros_from_the_corpus_boots_and_stops() {
    let inst = Instance::start().await;
    let manifest = corpus("vm-cirros.yaml");
    inst.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    // runStrategy Halted: the controller reports it Stopped, and no VMI.
    inst.ok(&["wait", "vm-cirros", "--for=Stopped", "--timeout=30s"]);
    assert!(inst.vmi("vm-cirros").await.is_none());
    inst.ok(&["start", "vm-cirros"]);
    inst.ok(&["wait", "vm-cirros", "--for=Running", "--timeout=120s"]);
    let (_uid, pid) = inst.running_vmi("vm-cirros", None).await;
    assert!(pid_alive(pid));

    let log = inst
        .console_shows("vm-cirros", "printed from cloud-init userdata")
        .await;
    assert!(log.contains("GUEST-BOOTED"), "{log}");
    assert!(log.contains("HOSTNAME: vm-cirros"), "{log}");

    let wide = inst.ok(&["get", "vms", "-o", "wide"]);
    let row = wide
        .lines()
        .find(|l| l.starts_with("vm-cirros"))
        .unwrap_or_else(|| panic!("no vm-cirros row:\n{wide}"));
    assert!(row.contains("Running"), "{wide}");
    assert!(row.contains("e2e-host"), "{wide}");
    assert!(row.contains("10.0.2.2"), "{wide}");

    let logs = inst.ok(&["logs", "vm-cirros"]);
    assert!(logs.contains("GUEST-BOOTED"), "{logs}");

    // The interactive console: type a command, read its answer.
    let mut child = std::process::Command::new(BIN)
        .args(["--server", &inst.url, "console", "vm-cirros"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        stdin.write_all(b"\necho hello-$((6*7))\n").unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        // Ctrl-] leaves.
        stdin.write_all(&[0x1d]).unwrap();
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hello-42"),
        "console answer missing; stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    inst.ok(&["stop", "vm-cirros"]);
    inst.ok(&["wait", "vm-cirros", "--for=Stopped", "--timeout=60s"]);
    inst.until("QEMU to exit", Duration::from_secs(30), || async {
        (!pid_alive(pid)).then_some(())
    })
    .await;
    inst.until("VMI gone", Duration::from_secs(30), || async {
        inst.vmi("vm-cirros").await.is_none().then_some(())
    })
    .await;
    inst.ok(&["delete", "vm", "vm-cirros"]);
    inst.until("VM gone", Duration::from_secs(10), || async {
        inst.vm("vm-cirros").await.is_none().then_some(())
    })
    .await;
}

/// `vmi-kernel-boot.yaml`: a VMI booted straight from a kernel and initrd.
#[tokio::test(flavor = "multi_thread")]
async fn vmi_kernel_boot_from_the_corpus_boots() {
    let inst = Instance::start().await;
    let manifest = corpus("vmi-kernel-boot.yaml");
    inst.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    let (_, pid) = inst.running_vmi("vmi-kernel-boot", None).await;
    inst.console_shows("vmi-kernel-boot", "GUEST-BOOTED").await;
    inst.console_shows("vmi-kernel-boot", "TICK 1").await;
    inst.ok(&["delete", "vmi", "vmi-kernel-boot"]);
    inst.until("QEMU to exit", Duration::from_secs(30), || async {
        (!pid_alive(pid)).then_some(())
    })
    .await;
    inst.until("VMI gone", Duration::from_secs(30), || async {
        inst.vmi("vmi-kernel-boot").await.is_none().then_some(())
    })
    .await;
}

/// Always: a guest that powers itself off comes back as a new VMI.
/// RerunOnFailure: it stays off.
#[tokio::test(flavor = "multi_thread")]
async fn poweroff_restarts_always_but_not_rerun_on_failure() {
    let inst = Instance::start().await;
    apply(
        &inst,
        &vm_yaml("always", "Always", "#!/bin/sh\nsleep 2\npoweroff -f"),
    );
    apply(
        &inst,
        &vm_yaml("rerun", "RerunOnFailure", "#!/bin/sh\nsleep 2\npoweroff -f"),
    );

    // The RerunOnFailure guest boots, powers off, and its VMI ends Succeeded.
    let (rerun_uid, rerun_pid) = inst
        .until("rerun's VMI to run", Duration::from_secs(120), || async {
            let v = inst.vmi("rerun").await?;
            let pid = v["status"]["krvirtRuntime"]["pid"].as_u64()? as u32;
            Some((v["metadata"]["uid"].as_str()?.to_string(), pid))
        })
        .await;
    inst.until("rerun VMI Succeeded", Duration::from_secs(90), || async {
        let v = inst.vmi("rerun").await?;
        (v["status"]["phase"] == "Succeeded").then_some(())
    })
    .await;
    assert!(inst.console_file(&rerun_uid).contains("GUEST-BOOTED"));
    inst.until("rerun QEMU gone", Duration::from_secs(30), || async {
        (!pid_alive(rerun_pid)).then_some(())
    })
    .await;

    // The Always guest does the same, and comes back as a new VMI.
    let first = inst
        .until("always's first VMI", Duration::from_secs(60), || async {
            Some(
                inst.vmi("always").await?["metadata"]["uid"]
                    .as_str()?
                    .to_string(),
            )
        })
        .await;
    let (second, _) = inst.running_vmi("always", Some(&first)).await;
    assert_ne!(first, second);

    assert_eq!(printable(&inst, "rerun").await, "Stopped");
    // And it stays that way.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let v = inst.vmi("rerun").await.expect("the ended VMI stays");
    assert_eq!(v["metadata"]["uid"], rerun_uid.as_str());
    assert_eq!(v["status"]["phase"], "Succeeded");
}

/// Restart gives a freshly booted guest (its tick counter starts again).
#[tokio::test(flavor = "multi_thread")]
async fn restart_boots_a_fresh_guest() {
    let inst = Instance::start().await;
    apply(&inst, &vm_yaml("ticker", "Always", "#!/bin/sh\necho ready"));
    let (uid, pid) = inst.running_vmi("ticker", None).await;
    inst.console_shows("ticker", "TICK 4").await;
    inst.ok(&["restart", "ticker"]);
    let (uid2, pid2) = inst.running_vmi("ticker", Some(&uid)).await;
    assert_ne!(pid, pid2);
    let log = inst.console_shows("ticker", "TICK 0").await;
    assert!(log.contains("GUEST-BOOTED"));
    assert!(
        last_tick(&log).unwrap() < 4,
        "the new guest's counter starts again: {log}"
    );
    inst.until("old QEMU gone", Duration::from_secs(30), || async {
        (!pid_alive(pid)).then_some(())
    })
    .await;
    let _ = uid2;
}

/// `kill -9` of krvirt while three guests run; after a restart the same
/// QEMUs are adopted, ticks continue and the statuses are right within 5 s.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_and_restart_reattaches_to_running_guests() {
    let mut inst = Instance::start().await;
    let names = ["g1", "g2", "g3"];
    for n in names {
        apply(&inst, &vm_yaml(n, "Always", "#!/bin/sh\necho up"));
    }
    let mut before = Vec::new();
    for n in names {
        let (uid, pid) = inst.running_vmi(n, None).await;
        inst.console_shows(n, "TICK 2").await;
        before.push((n, uid, pid));
    }
    inst.kill9();
    let ticks_at_kill: Vec<u64> = before
        .iter()
        .map(|(_, uid, _)| last_tick(&inst.console_file(uid)).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (n, _, pid) in &before {
        assert!(pid_alive(*pid), "{n}'s QEMU must survive krvirt's death");
    }

    inst.restart().await;
    let t0 = std::time::Instant::now();
    for (i, (n, uid, pid)) in before.iter().enumerate() {
        let (uid_after, pid_after) = inst.running_vmi(n, None).await;
        assert_eq!(&uid_after, uid, "{n}: same VMI");
        assert_eq!(pid_after, *pid, "{n}: same QEMU");
        inst.until(&format!("{n} Running"), Duration::from_secs(5), || async {
            (printable(&inst, n).await == "Running").then_some(())
        })
        .await;
        let log = inst.console_file(uid);
        assert_eq!(
            log.matches("GUEST-BOOTED").count(),
            1,
            "{n} was not rebooted: {log}"
        );
        assert!(
            last_tick(&log).unwrap() > ticks_at_kill[i],
            "{n}'s ticks continue"
        );
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "statuses correct within 5 s, took {:?}",
        t0.elapsed()
    );
    // The adopted guests are still fully controllable.
    inst.ok(&["stop", "g1"]);
    inst.until("g1's QEMU gone", Duration::from_secs(30), || async {
        (!pid_alive(before[0].2)).then_some(())
    })
    .await;
}

/// Pause stops the guest's clock; unpause resumes it.
#[tokio::test(flavor = "multi_thread")]
async fn pause_and_unpause() {
    let inst = Instance::start().await;
    apply(&inst, &vm_yaml("sleepy", "Always", "#!/bin/sh\necho hi"));
    let (uid, _) = inst.running_vmi("sleepy", None).await;
    inst.console_shows("sleepy", "TICK 1").await;
    inst.ok(&["pause", "vm", "sleepy"]);
    inst.until("Paused", Duration::from_secs(10), || async {
        (printable(&inst, "sleepy").await == "Paused").then_some(())
    })
    .await;
    let t1 = last_tick(&inst.console_file(&uid)).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t2 = last_tick(&inst.console_file(&uid)).unwrap();
    assert!(t2 <= t1 + 1, "paused guest kept ticking: {t1} -> {t2}");
    inst.ok(&["unpause", "vm", "sleepy"]);
    inst.until("Running again", Duration::from_secs(10), || async {
        (printable(&inst, "sleepy").await == "Running").then_some(())
    })
    .await;
    inst.until("ticks resume", Duration::from_secs(20), || async {
        (last_tick(&inst.console_file(&uid))? > t2 + 1).then_some(())
    })
    .await;
}

/// Malformed and unsupported manifests get a 4xx that names the field.
#[tokio::test(flavor = "multi_thread")]
async fn bad_manifests_are_refused_naming_the_field() {
    let inst = Instance::start().await;
    let vms = "/apis/kubevirt.io/v1/namespaces/default/virtualmachines";
    let vmis = "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances";

    // A field KubeVirt has and krvirt does not implement yet.
    let gpu = std::fs::read(corpus("vmi-gpu.yaml")).unwrap();
    let (code, body) = inst
        .send(reqwest::Method::POST, vmis, "application/yaml", gpu)
        .await;
    assert_eq!(code, 422, "{body}");
    let fields: Vec<&str> = body["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["field"].as_str())
        .collect();
    assert!(
        fields.iter().any(|f| f.ends_with("domain.devices.gpus")),
        "{body}"
    );

    // A typo.
    let mut vm: Value = serde_saphyr::from_str(&vm_yaml("typo", "Always", "#!/bin/sh")).unwrap();
    vm["spec"]["template"]["spec"]["domain"]["memroy"] = json!({"guest": "128Mi"});
    let (code, body) = inst
        .send(
            reqwest::Method::POST,
            vms,
            "application/json",
            serde_json::to_vec(&vm).unwrap(),
        )
        .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body.to_string()
            .contains("spec.template.spec.domain.memroy"),
        "{body}"
    );

    // A wrong value.
    let mut vm: Value =
        serde_saphyr::from_str(&vm_yaml("bad", "Sometimes", "#!/bin/sh")).unwrap_or(json!({}));
    if vm == json!({}) {
        vm = serde_saphyr::from_str(&vm_yaml("bad", "Always", "#!/bin/sh")).unwrap();
        vm["spec"]["runStrategy"] = "Sometimes".into();
    }
    let (code, body) = inst
        .send(
            reqwest::Method::POST,
            vms,
            "application/json",
            serde_json::to_vec(&vm).unwrap(),
        )
        .await;
    assert_eq!(code, 422, "{body}");
    assert!(body.to_string().contains("spec.runStrategy"), "{body}");

    // Not YAML at all.
    let (code, body) = inst
        .send(
            reqwest::Method::POST,
            vms,
            "application/yaml",
            b"apiVersion: [unclosed".to_vec(),
        )
        .await;
    assert!((400..500).contains(&code), "{code} {body}");
    assert_eq!(body["kind"], "Status", "{body}");

    // The CLI says the same, naming the field, and exits non-zero.
    let path = inst.dir.path().join("gpu.yaml");
    std::fs::copy(corpus("vmi-gpu.yaml"), &path).unwrap();
    let out = inst.cli(&["apply", "-f", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gpus"), "{err}");
    // Nothing was created by the refused requests.
    let list = inst.get(vmis).await.unwrap();
    assert!(list["items"].as_array().unwrap().is_empty(), "{list}");
}

/// A containerDisk that resolves to no local image: ErrImagePull, no QEMU.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_image_fails_with_err_image_pull() {
    let inst = Instance::start().await;
    let yaml = vm_yaml("ghost", "Always", "#!/bin/sh").replace(
        "quay.io/kubevirt/cirros-container-disk-demo",
        "example.org/not/here:1",
    );
    apply(&inst, &yaml);
    inst.until("ErrImagePull", Duration::from_secs(30), || async {
        let s = printable(&inst, "ghost").await;
        (s == "ErrImagePull" || s == "ImagePullBackOff").then_some(())
    })
    .await;
    let vm = inst.vm("ghost").await.unwrap();
    let msg = vm["status"]["conditions"].to_string();
    assert!(msg.contains("example.org/not/here:1"), "{vm}");
}

/// `start --paused`: the guest's vCPUs never run until unpause.
#[tokio::test(flavor = "multi_thread")]
async fn start_paused_runs_only_after_unpause() {
    let inst = Instance::start().await;
    apply(&inst, &vm_yaml("held", "Halted", "#!/bin/sh\necho go"));
    inst.ok(&["wait", "held", "--for=Stopped", "--timeout=30s"]);
    inst.ok(&["start", "--paused", "held"]);
    let (uid, _) = inst.running_vmi("held", None).await;
    inst.until("Paused", Duration::from_secs(20), || async {
        (printable(&inst, "held").await == "Paused").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !inst.console_file(&uid).contains("GUEST-BOOTED"),
        "a guest started paused must not run"
    );
    inst.ok(&["unpause", "vm", "held"]);
    inst.console_shows("held", "GUEST-BOOTED").await;
    inst.until("Running", Duration::from_secs(20), || async {
        (printable(&inst, "held").await == "Running").then_some(())
    })
    .await;
    // The request was one-off: a restart runs normally.
    let vm = inst.vm("held").await.unwrap();
    assert!(
        vm["metadata"]["annotations"]["krvirt.io/start-paused"].is_null(),
        "{vm}"
    );
}

/// Deleting a running VM stops its guest and removes its VMI and run dir.
#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_running_vm_stops_its_guest() {
    let inst = Instance::start().await;
    apply(&inst, &vm_yaml("doomed", "Always", "#!/bin/sh\necho bye"));
    let (uid, pid) = inst.running_vmi("doomed", None).await;
    inst.ok(&["delete", "vm", "doomed"]);
    inst.until("QEMU to exit", Duration::from_secs(30), || async {
        (!pid_alive(pid)).then_some(())
    })
    .await;
    inst.until("VMI gone", Duration::from_secs(30), || async {
        inst.vmi("doomed").await.is_none().then_some(())
    })
    .await;
    assert!(
        !inst.data_dir().join("run/vmi").join(&uid).exists(),
        "the run directory is cleaned up"
    );
}
