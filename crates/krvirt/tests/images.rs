//! The image service end to end through `krvirt up` and the CLI: upload
//! over HTTP, a containerDisk pulled from a real registry (Debian's
//! docker-registry, started here, holding an image this test pushed) and a
//! VM booting from `127.0.0.1:PORT/demo/disk:1`, a layered image booting,
//! a tampered blob refused (no QEMU, ErrImagePull with a clear message, the
//! Image's Verified condition False), and GC keeping what is in use.

mod common;

use std::path::Path;
use std::process::Command;
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
          - name: cloudinitdisk
            disk: {{bus: virtio}}
        memory:
          guest: 128Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - name: containerdisk
        containerDisk:
          image: {image}
      - name: cloudinitdisk
        cloudInitNoCloud:
          userData: |
            #!/bin/sh
            echo image-test-{name}
"#
    )
}

fn apply(inst: &Instance, name: &str, yaml: &str) {
    let path = inst.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    inst.ok(&["apply", "-f", path.to_str().unwrap()]);
}

fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x80;
    f.write_all_at(&b, offset).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_pull_layer_tamper_and_gc() {
    let inst = Instance::start().await;
    let reg = start_registry();

    // The demo disk is an Image from the start.
    let demo: Value =
        serde_json::from_str(&inst.ok(&["image", "inspect", "demo-disk", "-o", "json"])).unwrap();
    let demo_path = demo["chain"][0]["path"].as_str().unwrap().to_string();
    let demo_bytes = std::fs::read(&demo_path).unwrap();
    assert_eq!(sha(&demo_bytes), demo["digest"].as_str().unwrap());

    // Upload (streamed through the API) a variant: demo disk + 1 MiB.
    let mut up = demo_bytes.clone();
    up.extend(std::iter::repeat_n(0u8, 1 << 20));
    let up_file = inst.dir.path().join("up.raw");
    std::fs::write(&up_file, &up).unwrap();
    let out = inst.ok(&[
        "image",
        "upload",
        up_file.to_str().unwrap(),
        "--name",
        "up:1",
        "--quiet",
    ]);
    assert!(out.contains(&sha(&up)), "{out}");
    // A wrong announced digest is refused.
    let bad = inst.cli(&[
        "image",
        "upload",
        up_file.to_str().unwrap(),
        "--name",
        "up:2",
        "--quiet",
        "--digest",
        &sha(b"other"),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("digest mismatch"));

    // Pull a containerDisk from the registry; a VM boots from its reference.
    let mut pulled = demo_bytes.clone();
    pulled.extend(std::iter::repeat_n(0u8, 2 << 20));
    push_container_disk(&reg.addr, "demo/disk", "1", &pulled).await;
    let reference = format!("{}/demo/disk:1", reg.addr);
    let out = inst.ok(&["image", "import", &format!("docker://{reference}")]);
    assert!(
        out.contains("disk:1") && out.contains(&sha(&pulled)),
        "{out}"
    );

    // An application layer on the pulled image.
    let pulled_file = inst.dir.path().join("pulled.raw");
    std::fs::write(&pulled_file, &pulled).unwrap();
    let layer = inst.dir.path().join("app.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&pulled_file)
        .arg(&layer)
        .status()
        .expect("qemu-img (qemu-utils)");
    assert!(st.success());
    inst.ok(&[
        "image",
        "upload",
        layer.to_str().unwrap(),
        "--name",
        "app:1",
        "--base",
        "disk:1",
        "--quiet",
    ]);
    let chain = inst.ok(&["image", "inspect", "app:1"]);
    assert!(
        chain.contains(&sha(&pulled)) && chain.contains("disk:1"),
        "{chain}"
    );
    inst.ok(&["image", "tag", "app:1", "app:stable"]);

    apply(&inst, "pulled", &vm("pulled", &reference));
    apply(&inst, "layered", &vm("layered", "app:stable"));
    for name in ["pulled", "layered"] {
        inst.ok(&["wait", name, "--for=Running", "--timeout=120s"]);
        let log = inst
            .console_shows(name, &format!("image-test-{name}"))
            .await;
        assert!(log.contains("GUEST-BOOTED"), "{log}");
    }

    // Tamper with the uploaded blob: the next VM on it is refused.
    let up_info: Value =
        serde_json::from_str(&inst.ok(&["image", "inspect", "up:1", "-o", "json"])).unwrap();
    let up_blob = up_info["chain"][0]["path"].as_str().unwrap().to_string();
    flip_byte(Path::new(&up_blob), 4096);
    apply(&inst, "tampered", &vm("tampered", "up:1"));
    let msg = inst
        .until("ErrImagePull", Duration::from_secs(60), || async {
            let v = inst.vm("tampered").await?;
            let s = v["status"]["printableStatus"].as_str().unwrap_or_default();
            (s == "ErrImagePull" || s == "ImagePullBackOff")
                .then(|| v["status"]["conditions"].to_string())
        })
        .await;
    assert!(msg.contains("corrupt") && msg.contains(&sha(&up)), "{msg}");
    assert!(
        inst.vmi("tampered")
            .await
            .and_then(|v| v["status"]["krvirtRuntime"]["pid"].as_u64())
            .is_none(),
        "a QEMU was started on a corrupt image"
    );
    // The Image object says so.
    let cond = inst
        .until("Verified=False", Duration::from_secs(20), || async {
            let img = inst.get("/apis/krvirt.io/v1/images/up").await.ok()?;
            let c = img["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Verified")?
                .clone();
            (c["status"] == "False").then_some(c)
        })
        .await;
    assert_eq!(cond["reason"], "DigestMismatch", "{cond}");
    let list = inst.ok(&["image", "list"]);
    assert!(list.contains("CORRUPT"), "{list}");

    // GC: the untagged upload goes; the pulled disk stays while the layer
    // and a running VM use it, even untagged.
    inst.ok(&["delete", "vm", "tampered"]);
    inst.ok(&["image", "rm", "up:1"]);
    inst.ok(&["image", "rm", "disk:1"]);
    let gc = inst.ok(&["image", "gc"]);
    assert!(gc.contains(&format!("removed {}", sha(&up))), "{gc}");
    assert!(!gc.contains(&format!("removed {}", sha(&pulled))), "{gc}");
    assert!(!Path::new(&up_blob).exists());
    inst.ok(&["image", "verify", "app:stable"]);
    // The Image objects mirror the tags.
    let img = inst
        .until("Image app", Duration::from_secs(10), || async {
            inst.get("/apis/krvirt.io/v1/images/app").await.ok()
        })
        .await;
    let tags: Vec<&str> = img["status"]["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tag"].as_str().unwrap())
        .collect();
    assert_eq!(tags, ["1", "stable"], "{img}");
    assert_eq!(img["status"]["tags"][0]["parent"], sha(&pulled).as_str());
}
