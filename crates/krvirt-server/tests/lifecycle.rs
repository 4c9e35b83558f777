//! KubeVirt's start / stop / restart subresources: every runStrategy × verb,
//! against the real krvirt-api kinds and admission.

mod common;

use common::*;
use serde_json::{Value, json};

fn vmi_spec() -> Value {
    json!({
        "domain": {
            "devices": {"disks": [{"disk": {"bus": "virtio"}, "name": "containerdisk"}]},
            "memory": {"guest": "128Mi"},
            "resources": {}
        },
        "volumes": [{"containerDisk": {"image": "quay.io/kubevirt/cirros-container-disk-demo"}, "name": "containerdisk"}]
    })
}

/// A VM with `spec.runStrategy` (`Some`) or the deprecated `spec.running`.
fn vm(name: &str, strategy: Option<&str>, running: Option<bool>) -> Value {
    let mut spec = json!({
        "template": {"metadata": {"labels": {"kubevirt.io/vm": name}}, "spec": vmi_spec()}
    });
    if let Some(s) = strategy {
        spec["runStrategy"] = json!(s);
    }
    if let Some(r) = running {
        spec["running"] = json!(r);
    }
    json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name}, "spec": spec})
}

struct Fixture {
    s: TestServer,
}

impl Fixture {
    async fn new() -> Self {
        Fixture {
            s: TestServer::real().await,
        }
    }

    async fn vm(&self, name: &str, strategy: Option<&str>, running: Option<bool>) -> Value {
        self.s
            .create(&self.s.vms("default"), &vm(name, strategy, running))
            .await
    }

    /// A VMI named like its VM, in `phase`.
    async fn vmi(&self, name: &str, phase: &str) -> Value {
        let created = self
            .s
            .create(
                &self.s.vmis("default"),
                &json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": {"name": name}, "spec": vmi_spec()}),
            )
            .await;
        let (code, v) = self
            .s
            .merge_patch(
                &format!("{}/status", self.s.vmi("default", name)),
                &json!({"status": {"phase": phase}}),
            )
            .await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["metadata"]["uid"], created["metadata"]["uid"]);
        v
    }

    async fn verb(&self, name: &str, verb: &str, body: Option<Value>) -> (u16, Value) {
        let url = self.s.sub("virtualmachines", "default", name, verb);
        let mut req = self.s.client.put(url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        status_json(req.send().await.expect("PUT subresource")).await
    }

    async fn get_vm(&self, name: &str) -> Value {
        let (code, v) = self.s.get(&self.s.vm("default", name)).await;
        assert_eq!(code, 200);
        v
    }

    async fn get_vmi(&self, name: &str) -> Value {
        let (code, v) = self.s.get(&self.s.vmi("default", name)).await;
        assert_eq!(code, 200);
        v
    }
}

fn requests(vm: &Value) -> Value {
    vm["status"]["stateChangeRequests"].clone()
}

fn assert_status(code_body: &(u16, Value), code: u16, reason: &str, message_part: &str) {
    let (c, b) = code_body;
    assert_eq!(*c, code, "{b}");
    assert_eq!(b["kind"], "Status", "{b}");
    assert_eq!(b["reason"], reason, "{b}");
    let msg = b["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(message_part),
        "message {msg:?} lacks {message_part:?}"
    );
}

#[tokio::test]
async fn start_semantics() {
    let f = Fixture::new().await;

    // Halted -> runStrategy Always
    let before = f.vm("halted", Some("Halted"), None).await;
    let (code, body) = f.verb("halted", "start", None).await;
    assert_eq!(code, 202, "{body}");
    let after = f.get_vm("halted").await;
    assert_eq!(after["spec"]["runStrategy"], "Always");
    assert!(after["spec"].get("running").is_none());
    assert_eq!(
        after["metadata"]["generation"].as_i64().unwrap(),
        before["metadata"]["generation"].as_i64().unwrap() + 1
    );

    // running=false -> running=true (not runStrategy)
    f.vm("legacy", None, Some(false)).await;
    assert_eq!(f.verb("legacy", "start", Some(json!({}))).await.0, 202);
    let after = f.get_vm("legacy").await;
    assert_eq!(after["spec"]["running"], true);
    assert!(after["spec"].get("runStrategy").is_none());

    // no runStrategy and no running means Halted (krvirt-api defaults it)
    let bare = f.vm("bare", None, None).await;
    assert_eq!(bare["spec"]["runStrategy"], "Halted");
    assert_eq!(f.verb("bare", "start", None).await.0, 202);
    assert_eq!(f.get_vm("bare").await["spec"]["runStrategy"], "Always");

    // Halted with a VMI still running -> 409
    f.vm("halting", Some("Halted"), None).await;
    f.vmi("halting", "Running").await;
    assert_status(
        &f.verb("halting", "start", None).await,
        409,
        "Conflict",
        "VM is already running",
    );

    // Halted + paused -> Always, and the VM annotated (in the same write)
    // so its next VMI starts paused; no request (a Halted VM with a Start
    // request would have its new VMI deleted again by the controller).
    f.vm("hp", Some("Halted"), None).await;
    assert_eq!(
        f.verb("hp", "start", Some(json!({"paused": true}))).await.0,
        202
    );
    let after = f.get_vm("hp").await;
    assert_eq!(after["spec"]["runStrategy"], "Always");
    assert_eq!(
        after["metadata"]["annotations"]["krvirt.io/start-paused"],
        "true"
    );
    assert!(requests(&after).as_array().is_none_or(Vec::is_empty));

    // Manual, no VMI -> Start request
    f.vm("manual", Some("Manual"), None).await;
    assert_eq!(f.verb("manual", "start", None).await.0, 202);
    let after = f.get_vm("manual").await;
    assert_eq!(after["spec"]["runStrategy"], "Manual");
    assert_eq!(requests(&after), json!([{"action": "Start"}]));
    // a second start while the first is pending -> 409
    assert_status(
        &f.verb("manual", "start", None).await,
        409,
        "Conflict",
        "stop/start already underway",
    );

    // Manual with a running VMI -> 409
    f.vm("manual-run", Some("Manual"), None).await;
    f.vmi("manual-run", "Running").await;
    assert_status(
        &f.verb("manual-run", "start", None).await,
        409,
        "Conflict",
        "VM is already running",
    );

    // Manual with a finished VMI -> Stop(old uid) + Start
    f.vm("manual-done", Some("Manual"), None).await;
    let vmi = f.vmi("manual-done", "Succeeded").await;
    assert_eq!(f.verb("manual-done", "start", None).await.0, 202);
    assert_eq!(
        requests(&f.get_vm("manual-done").await),
        json!([{"action": "Stop", "uid": vmi["metadata"]["uid"]}, {"action": "Start"}])
    );

    // Manual with a VMI that is still Pending (no phase decided yet) -> Start
    f.vm("manual-pending", Some("Manual"), None).await;
    f.s.create(&f.s.vmis("default"), &json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": {"name": "manual-pending"}, "spec": vmi_spec()})).await;
    assert_eq!(f.verb("manual-pending", "start", None).await.0, 202);

    // RerunOnFailure: no VMI -> Start; Failed VMI -> 409; Succeeded -> Stop+Start
    f.vm("rerun", Some("RerunOnFailure"), None).await;
    assert_eq!(f.verb("rerun", "start", None).await.0, 202);
    assert_eq!(
        requests(&f.get_vm("rerun").await),
        json!([{"action": "Start"}])
    );
    f.vm("rerun-failed", Some("RerunOnFailure"), None).await;
    f.vmi("rerun-failed", "Failed").await;
    assert_status(
        &f.verb("rerun-failed", "start", None).await,
        409,
        "Conflict",
        "RerunOnFailure does not support starting VM from failed state",
    );
    f.vm("rerun-ok", Some("RerunOnFailure"), None).await;
    let vmi = f.vmi("rerun-ok", "Succeeded").await;
    assert_eq!(f.verb("rerun-ok", "start", None).await.0, 202);
    assert_eq!(
        requests(&f.get_vm("rerun-ok").await),
        json!([{"action": "Stop", "uid": vmi["metadata"]["uid"]}, {"action": "Start"}])
    );

    // Always / Once / running=true -> 400
    for (name, strategy, running) in [
        ("always", Some("Always"), None),
        ("once", Some("Once"), None),
        ("on", None, Some(true)),
    ] {
        f.vm(name, strategy, running).await;
        let wanted = if name == "once" { "Once" } else { "Always" };
        assert_status(
            &f.verb(name, "start", None).await,
            400,
            "BadRequest",
            &format!("{wanted} does not support manual start requests"),
        );
        assert!(
            f.get_vm(name).await.get("status").is_none(),
            "{name} must be unchanged"
        );
    }
    // Always with its VMI running -> 409 (the VMI check comes first, as in KubeVirt)
    f.vm("always-run", Some("Always"), None).await;
    f.vmi("always-run", "Running").await;
    assert_status(
        &f.verb("always-run", "start", None).await,
        409,
        "Conflict",
        "VM is already running",
    );

    // unknown VM -> 404; malformed body -> 400
    assert_status(
        &f.verb("missing", "start", None).await,
        404,
        "NotFound",
        "virtualmachines.kubevirt.io \"missing\" not found",
    );
    let r =
        f.s.client
            .put(f.s.sub("virtualmachines", "default", "manual", "start"))
            .header("Content-Type", "application/json")
            .body("{nope")
            .send()
            .await
            .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

#[tokio::test]
async fn stop_semantics() {
    let f = Fixture::new().await;

    // Halted without a VMI -> 409
    f.vm("halted", Some("Halted"), None).await;
    assert_status(
        &f.verb("halted", "stop", None).await,
        409,
        "Conflict",
        "VM is not running",
    );
    // Halted with a final VMI -> 409 too
    f.vm("halted-done", Some("Halted"), None).await;
    f.vmi("halted-done", "Succeeded").await;
    assert_status(
        &f.verb("halted-done", "stop", None).await,
        409,
        "Conflict",
        "VM is not running",
    );
    // Halted with a VMI still shutting down: only a shorter grace period forces it
    f.vm("halting", Some("Halted"), None).await;
    let vmi = f.vmi("halting", "Running").await;
    assert_eq!(
        vmi["spec"]["terminationGracePeriodSeconds"], 180,
        "krvirt-api default"
    );
    assert_status(
        &f.verb("halting", "stop", None).await,
        409,
        "Conflict",
        "Halted only supports manual stop requests with a shorter graceperiod",
    );
    assert_status(
        &f.verb("halting", "stop", Some(json!({"gracePeriod": 180})))
            .await,
        409,
        "Conflict",
        "shorter graceperiod",
    );
    assert_eq!(
        f.verb("halting", "stop", Some(json!({"gracePeriod": 10})))
            .await
            .0,
        202
    );
    assert_eq!(
        requests(&f.get_vm("halting").await),
        json!([{"action": "Stop", "uid": vmi["metadata"]["uid"]}])
    );
    assert_eq!(
        f.get_vmi("halting").await["metadata"]["annotations"]["krvirt.io/stop-grace-period-seconds"],
        "10"
    );
    // and now 10 is the bar
    assert_status(
        &f.verb("halting", "stop", Some(json!({"gracePeriod": 10})))
            .await,
        409,
        "Conflict",
        "shorter graceperiod",
    );

    // Manual: no VMI -> 409; running VMI -> Stop(uid)
    f.vm("manual", Some("Manual"), None).await;
    assert_status(
        &f.verb("manual", "stop", None).await,
        409,
        "Conflict",
        "VM is not running",
    );
    let vmi = f.vmi("manual", "Running").await;
    assert_eq!(f.verb("manual", "stop", None).await.0, 202);
    let after = f.get_vm("manual").await;
    assert_eq!(after["spec"]["runStrategy"], "Manual");
    assert_eq!(
        requests(&after),
        json!([{"action": "Stop", "uid": vmi["metadata"]["uid"]}])
    );
    // a stop replaces whatever is pending
    assert_eq!(f.verb("manual", "stop", None).await.0, 202);
    assert_eq!(
        requests(&f.get_vm("manual").await)
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Always / RerunOnFailure / Once -> runStrategy Halted; running=true -> running=false
    for (name, strategy, running, with_vmi) in [
        ("always", Some("Always"), None, true),
        ("rerun", Some("RerunOnFailure"), None, true),
        ("once", Some("Once"), None, false),
        ("always-novmi", Some("Always"), None, false),
        ("on", None, Some(true), true),
    ] {
        f.vm(name, strategy, running).await;
        if with_vmi {
            f.vmi(name, "Running").await;
        }
        let (code, body) = f.verb(name, "stop", None).await;
        assert_eq!(code, 202, "{name}: {body}");
        let after = f.get_vm(name).await;
        if running.is_some() {
            assert_eq!(after["spec"]["running"], false, "{name}");
            assert!(after["spec"].get("runStrategy").is_none());
        } else {
            assert_eq!(after["spec"]["runStrategy"], "Halted", "{name}");
        }
        assert!(
            after.get("status").is_none() || requests(&after).is_null(),
            "{name}: no requests"
        );
    }

    // grace period recorded on the running VMI for the agent
    f.vm("graceful", Some("Always"), None).await;
    f.vmi("graceful", "Running").await;
    assert_eq!(
        f.verb("graceful", "stop", Some(json!({"gracePeriod": 7})))
            .await
            .0,
        202
    );
    assert_eq!(
        f.get_vmi("graceful").await["metadata"]["annotations"]["krvirt.io/stop-grace-period-seconds"],
        "7"
    );
    assert_eq!(f.get_vm("graceful").await["spec"]["runStrategy"], "Halted");
    assert_status(
        &f.verb("graceful", "stop", Some(json!({"gracePeriod": -1})))
            .await,
        400,
        "BadRequest",
        "gracePeriod",
    );
}

#[tokio::test]
async fn restart_semantics() {
    let f = Fixture::new().await;

    // Halted / Once / running=false -> 400
    for (name, strategy, running, wanted) in [
        ("halted", Some("Halted"), None, "Halted"),
        ("once", Some("Once"), None, "Once"),
        ("off", None, Some(false), "Halted"),
    ] {
        f.vm(name, strategy, running).await;
        assert_status(
            &f.verb(name, "restart", None).await,
            400,
            "BadRequest",
            &format!("RunStategy {wanted} does not support manual restart requests"),
        );
    }

    // Always / Manual / RerunOnFailure / running=true: no VMI -> 409; running -> Stop(uid)+Start
    for (name, strategy, running) in [
        ("always", Some("Always"), None),
        ("manual", Some("Manual"), None),
        ("rerun", Some("RerunOnFailure"), None),
        ("on", None, Some(true)),
    ] {
        f.vm(name, strategy, running).await;
        assert_status(
            &f.verb(name, "restart", None).await,
            409,
            "Conflict",
            "VM is not running",
        );
        let vmi = f.vmi(name, "Running").await;
        let (code, body) = f.verb(name, "restart", None).await;
        assert_eq!(code, 202, "{name}: {body}");
        let after = f.get_vm(name).await;
        assert_eq!(
            requests(&after),
            json!([{"action": "Stop", "uid": vmi["metadata"]["uid"]}, {"action": "Start"}]),
            "{name}"
        );
        // spec untouched
        assert_eq!(
            after["spec"].get("runStrategy").cloned(),
            strategy.map(|s| json!(s))
        );
        // a second restart while the first is pending -> 409
        assert_status(
            &f.verb(name, "restart", None).await,
            409,
            "Conflict",
            "stop/start already underway",
        );
    }

    // a final VMI is not running
    f.vm("done", Some("Always"), None).await;
    f.vmi("done", "Failed").await;
    assert_status(
        &f.verb("done", "restart", None).await,
        409,
        "Conflict",
        "VM is not running",
    );

    // force restart options
    f.vm("force", Some("Always"), None).await;
    f.vmi("force", "Running").await;
    assert_status(
        &f.verb("force", "restart", Some(json!({"gracePeriodSeconds": 5})))
            .await,
        400,
        "BadRequest",
        "only gracePeriod=0 is supported",
    );
    assert_status(
        &f.verb("force", "restart", Some(json!({"gracePeriodSeconds": -1})))
            .await,
        400,
        "BadRequest",
        "greater or equal to 0",
    );
    assert_eq!(
        f.verb("force", "restart", Some(json!({"gracePeriodSeconds": 0})))
            .await
            .0,
        202
    );
    assert_eq!(
        f.get_vmi("force").await["metadata"]["annotations"]["krvirt.io/stop-grace-period-seconds"],
        "0"
    );
}

#[tokio::test]
async fn lifecycle_functions_in_process() {
    // The same semantics without HTTP, as controllers and `krvirt up` call them.
    let f = Fixture::new().await;
    f.vm("inproc", Some("Halted"), None).await;
    krvirt_server::lifecycle::start_vm(&f.s.registry, "default", "inproc", &Default::default())
        .await
        .unwrap();
    assert_eq!(f.get_vm("inproc").await["spec"]["runStrategy"], "Always");
    krvirt_server::lifecycle::stop_vm(&f.s.registry, "default", "inproc", &Default::default())
        .await
        .unwrap();
    assert_eq!(f.get_vm("inproc").await["spec"]["runStrategy"], "Halted");
    let e = krvirt_server::lifecycle::restart_vm(
        &f.s.registry,
        "default",
        "inproc",
        &Default::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), 400);
}
