//! Auto-pull: a VM whose containerDisk names a registry image the host
//! has not imported boots anyway: the agent pulls it at launch (Debian's
//! docker-registry, started here, holding an image this test pushed), with
//! Pulling/Pulled events on the VMI, and the image is in the store
//! afterwards. A reference no registry has fails with ErrImagePull and a
//! Failed event.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

struct TestRegistry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry() -> TestRegistry {
    let bin = "/usr/bin/docker-registry";
    assert!(
        Path::new(bin).exists(),
        "{bin} missing: install the Debian package docker-registry (scripts/packages.txt)"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = dir.path().join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting docker-registry");
    let reg = TestRegistry {
        child,
        addr,
        _dir: dir,
    };
    let t0 = Instant::now();
    while std::net::TcpStream::connect(&reg.addr).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "docker-registry did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    reg
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

fn tar_entry(out: &mut Vec<u8>, name: &str, data: &[u8], typeflag: u8) {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(if typeflag == b'5' {
        b"0000755"
    } else {
        b"0000644"
    });
    h[108..115].copy_from_slice(b"0000107");
    h[116..123].copy_from_slice(b"0000107");
    h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// Push `disk` in KubeVirt's containerDisk layout (`/disk/disk.img` in a
/// gzip'd layer) to `registry/repo:tag`.
async fn push_container_disk(registry: &str, repo: &str, tag: &str, disk: &[u8]) {
    let mut tar = Vec::new();
    tar_entry(&mut tar, "disk/", b"", b'5');
    tar_entry(&mut tar, "disk/disk.img", disk, b'0');
    tar.extend_from_slice(&[0u8; 1024]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let layer = gz.finish().unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha(&tar)]}, "config": {}
    }))
    .unwrap();
    let c = reqwest::Client::new();
    for blob in [&layer, &config] {
        let r = c
            .post(format!("http://{registry}/v2/{repo}/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("http://{registry}{loc}")
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = c
            .put(format!("{loc}{sep}digest={}", sha(blob)))
            .body(blob.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(&layer), "size": layer.len()}]
    });
    let r = c
        .put(format!("http://{registry}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&manifest).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

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
