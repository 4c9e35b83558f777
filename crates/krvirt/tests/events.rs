//! End to end: a VM's lifecycle shows up as Events (`krvirt events`,
//! `krvirt describe`), an unknown image as a Warning, and every mutating
//! request in a verifiable audit log.

mod common;

use std::time::Duration;

use common::*;

fn events_for(inst: &Instance, what: &str) -> String {
    inst.ok(&["events", "--for", what])
}

async fn until_events(inst: &Instance, what: &str, needles: &[&str]) -> String {
    inst.until(
        &format!("events {needles:?} for {what}"),
        Duration::from_secs(60),
        || async {
            let out = events_for(inst, what);
            needles.iter().all(|n| out.contains(n)).then_some(out)
        },
    )
    .await
}

#[tokio::test]
async fn lifecycle_events_describe_and_audit() {
    let inst = Instance::start().await;
    let manifest = corpus("vm-cirros.yaml");
    inst.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    inst.ok(&["start", "vm-cirros"]);
    inst.ok(&["wait", "vm-cirros", "--for=Running", "--timeout=120s"]);
    until_events(&inst, "vm/vm-cirros", &["SuccessfulCreate"]).await;
    let vmi = until_events(&inst, "vmi/vm-cirros", &["Scheduled", "Started"]).await;
    assert!(
        vmi.contains("Successfully assigned default/vm-cirros"),
        "{vmi}"
    );

    inst.ok(&["pause", "vm", "vm-cirros"]);
    // unpause is refused until the agent has reported the pause (the
    // VMI's Paused condition), as in KubeVirt.
    inst.until("Paused", Duration::from_secs(30), || async {
        let vmi = inst.vmi("vm-cirros").await?;
        let paused = vmi["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Paused" && c["status"] == "True");
        paused.then_some(())
    })
    .await;
    inst.ok(&["unpause", "vm", "vm-cirros"]);
    until_events(&inst, "vmi/vm-cirros", &["Paused", "Unpaused"]).await;

    let describe = inst.ok(&["describe", "vm", "vm-cirros"]);
    let section = describe
        .split("Events:")
        .nth(1)
        .unwrap_or_else(|| panic!("no Events section:\n{describe}"));
    for reason in ["SuccessfulCreate", "Scheduled", "Started", "Paused"] {
        assert!(section.contains(reason), "{reason} missing:\n{describe}");
    }
    assert!(section.contains("krvirt-agent"), "{describe}");

    inst.ok(&["stop", "vm-cirros"]);
    inst.ok(&["wait", "vm-cirros", "--for=Stopped", "--timeout=60s"]);
    until_events(&inst, "vm/vm-cirros", &["SuccessfulDelete"]).await;
    until_events(&inst, "vmi/vm-cirros", &["Stopped"]).await;

    // An image nobody can resolve: a Warning on the VMI.
    let bad = inst.dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: bad\nspec:\n  runStrategy: Once\n  template:\n    spec:\n      domain:\n        devices:\n          disks:\n          - name: d\n            disk: {bus: virtio}\n        memory:\n          guest: 64Mi\n      volumes:\n      - name: d\n        containerDisk:\n          image: example.invalid/nothing:1\n",
    )
    .unwrap();
    inst.ok(&["apply", "-f", bad.to_str().unwrap()]);
    let out = until_events(&inst, "vmi/bad", &["ErrImagePull"]).await;
    assert!(out.contains("Warning"), "{out}");

    // Every mutating request so far is in an intact audit log.
    let data_dir = inst.data_dir();
    let verify = inst.ok(&["audit", "verify", "--data-dir", data_dir.to_str().unwrap()]);
    assert!(verify.contains("chain intact"), "{verify}");
    let show = inst.ok(&["audit", "show", "--data-dir", data_dir.to_str().unwrap()]);
    for verb in ["start", "stop", "pause", "unpause"] {
        assert!(show.contains(verb), "{verb} not audited:\n{show}");
    }
}
