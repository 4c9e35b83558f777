//! The image service end to end through `krvirt up` and the CLI: upload
//! over HTTP, a containerDisk pulled from a real registry (Debian's
//! docker-registry, started here, holding an image this test pushed) and a
//! VM booting from `127.0.0.1:PORT/demo/disk:1`, a layered image booting,
//! a tampered blob refused (no QEMU, ErrImagePull with a clear message, the
//! Image's Verified condition False), and GC keeping what is in use.

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
