//! Auto-pull: a VM whose containerDisk names a registry image the host
//! has not imported boots anyway: the agent pulls it at launch (Debian's
//! docker-registry, started here, holding an image this test pushed), with
//! Pulling/Pulled events on the VMI, and the image is in the store
//! afterwards. A reference no registry has fails with ErrImagePull and a
//! Failed event.

mod common;

use std::time::Duration;

use common::registry::*;
use common::*;
use serde_json::Value;

fn vm(name: &str, image: &str) -> String {
    format!(
        r#"apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: {name}
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        devices:
          disks:
          - name: containerdisk
            disk: {{bus: virtio}}
        memory:
          guest: 128Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - name: containerdisk
        containerDisk:
          image: {image}
"#
    )
}

fn apply(inst: &Instance, name: &str, yaml: &str) {
    let path = inst.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    inst.ok(&["apply", "-f", path.to_str().unwrap()]);
}

async fn vmi_events(inst: &Instance, vmi: &str) -> Vec<(String, String)> {
    let evs = inst.ok(&["get", "events", "-o", "json"]);
    let v: Value = serde_json::from_str(&evs).unwrap_or(Value::Null);
    v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|e| e["involvedObject"]["name"] == vmi)
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_on_an_unpulled_registry_image_pulls_it_and_boots() {
    let inst = Instance::start().await;
    let reg = start_registry();
    let demo: Value =
        serde_json::from_str(&inst.ok(&["image", "inspect", "demo-disk", "-o", "json"])).unwrap();
    let demo_path = demo["chain"][0]["path"].as_str().unwrap().to_string();
    let mut disk = std::fs::read(&demo_path).unwrap();
    disk.extend(std::iter::repeat_n(0u8, 3 << 20));
    push_container_disk(&reg.addr, "auto/disk", "7", &disk).await;
    let reference = format!("{}/auto/disk:7", reg.addr);
    assert!(
        !inst.ok(&["image", "list"]).contains("auto"),
        "the image must not be there before"
    );

    apply(&inst, "auto", &vm("auto", &reference));
    apply(
        &inst,
        "missing",
        &vm("missing", &format!("{}/auto/none:1", reg.addr)),
    );
    inst.running_vmi("auto", None).await;
    inst.console_shows("auto", "GUEST-BOOTED").await;
    let events = vmi_events(&inst, "auto").await;
    let reasons: Vec<&str> = events.iter().map(|(r, _)| r.as_str()).collect();
    let pulling = reasons.iter().position(|r| *r == "Pulling");
    let pulled = reasons.iter().position(|r| *r == "Pulled");
    assert!(
        pulling.is_some() && pulled.is_some(),
        "no Pulling/Pulled events: {events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "Pulled" && m.contains(&sha(&disk))),
        "{events:?}"
    );
    let list = inst.ok(&["image", "list"]);
    assert!(list.contains("disk") && list.contains("7"), "{list}");

    // A reference the registry does not have: ErrImagePull, Failed event.
    inst.until("missing: ErrImagePull", Duration::from_secs(60), || async {
        let vm = inst.vm("missing").await?;
        let s = vm["status"]["printableStatus"].as_str()?;
        (s == "ErrImagePull" || s == "ImagePullBackOff").then_some(())
    })
    .await;
    let events = vmi_events(&inst, "missing").await;
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "Failed" && m.contains("auto/none:1")),
        "{events:?}"
    );
}
