//! Volume sources and lifecycle end to end, through a real `krvirt up` and
//! the default `dir` pool (no guest needed: contents are read back from
//! the pool's qcow2 with qemu-io): import from an HTTP URL with and without
//! a digest (served by a small HTTP server of the test), an upload Volume
//! filled through the upload endpoint, in-use protection (409 naming the
//! VM) and garbage collection of a deleted VM's dataVolumeTemplates.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use sha2::Digest as _;

fn apply(inst: &Instance, name: &str, yaml: &str) {
    let path = inst.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    inst.ok(&["apply", "-f", path.to_str().unwrap()]);
}

/// A raw disk image of 4 MiB holding `byte` everywhere.
fn raw_image(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![byte; 4 << 20]).unwrap();
    p
}

/// Serve `file` at `http://127.0.0.1:PORT/disk.img` on a thread, for as
/// long as the test runs (HTTP/1.0, one response per connection).
fn serve(file: PathBuf) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let req = String::from_utf8_lossy(&buf);
            let body = if req.starts_with("GET /disk.img ") {
                std::fs::read(&file).unwrap()
            } else {
                let _ = c.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                continue;
            };
            let _ = c.write_all(
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            let _ = c.write_all(&body);
        }
    });
    format!("http://127.0.0.1:{port}/disk.img")
}

fn sha256(path: &Path) -> String {
    format!(
        "sha256:{:x}",
        sha2::Sha256::digest(std::fs::read(path).unwrap())
    )
}

async fn volume(inst: &Instance, name: &str) -> Option<Value> {
    inst.get(&format!(
        "/apis/krvirt.io/v1/namespaces/default/volumes/{name}"
    ))
    .await
    .ok()
}

async fn phase_is(inst: &Instance, name: &str, phase: &str) -> Value {
    inst.until(
        &format!("Volume {name} {phase}"),
        Duration::from_secs(60),
        || async {
            let v = volume(inst, name).await?;
            (v["status"]["phase"] == phase).then_some(v)
        },
    )
    .await
}

/// Whether the first 64 KiB of the Volume's qcow2 in the default pool hold
/// `byte`.
fn holds(inst: &Instance, volume: &str, byte: u8) -> bool {
    let f = inst
        .data_dir()
        .join(format!("pools/default/default.{volume}.qcow2"));
    let out = Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c"])
        .arg(format!("read -P {byte:#x} 0 64k"))
        .arg(&f)
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && text.contains("read 65536") && !text.contains("verification failed")
}

fn http_volume(name: &str, url: &str, digest: Option<&str>) -> String {
    let digest = digest
        .map(|d| format!("\n      digest: {d}"))
        .unwrap_or_default();
    format!(
        "apiVersion: krvirt.io/v1\nkind: Volume\nmetadata:\n  name: {name}\nspec:\n  capacity: 16Mi\n  source:\n    http:\n      url: {url}{digest}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn http_and_upload_sources_in_use_protection_and_gc() {
    let inst = Instance::start().await;
    let img = raw_image(inst.dir.path(), "http.raw", 0x5a);
    let url = serve(img.clone());

    // HTTP import, with the right digest and without one.
    apply(
        &inst,
        "h1",
        &http_volume("from-http", &url, Some(&sha256(&img))),
    );
    apply(&inst, "h2", &http_volume("from-http-nodigest", &url, None));
    let v = phase_is(&inst, "from-http", "Succeeded").await;
    assert_eq!(v["status"]["capacity"], (16u64 << 20).to_string(), "{v}");
    assert!(holds(&inst, "from-http", 0x5a));
    phase_is(&inst, "from-http-nodigest", "Succeeded").await;
    assert!(holds(&inst, "from-http-nodigest", 0x5a));
    // A wrong digest fails the Volume, saying why.
    let wrong = format!("sha256:{}", "0".repeat(64));
    apply(&inst, "h3", &http_volume("bad-digest", &url, Some(&wrong)));
    let v = phase_is(&inst, "bad-digest", "Failed").await;
    let msg = v["status"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("spec.source.http") && msg.contains(&wrong),
        "{v}"
    );
    // The transfer tag is gone once the content is in the pool.
    let images = inst.ok(&["image", "list"]);
    assert!(!images.contains("volimport-"), "{images}");

    // Upload: the Volume waits, the endpoint fills it.
    apply(
        &inst,
        "u",
        "apiVersion: krvirt.io/v1\nkind: Volume\nmetadata:\n  name: uploaded\nspec:\n  source:\n    upload: {}\n",
    );
    let v = phase_is(&inst, "uploaded", "UploadReady").await;
    assert!(
        v["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("/upload"),
        "{v}"
    );
    let up = raw_image(inst.dir.path(), "up.raw", 0x6b);
    let path = "/apis/volumes.krvirt.io/v1/namespaces/default/volumes/uploaded/upload";
    let (code, body) = inst
        .send(
            reqwest::Method::PUT,
            &format!("{path}?digest=sha256:{}", "1".repeat(64)),
            "application/octet-stream",
            std::fs::read(&up).unwrap(),
        )
        .await;
    assert_eq!(code, 422, "a wrong digest is refused: {body}");
    // `krvirt volume upload` streams the file to the endpoint.
    let printed = inst.ok(&["volume", "upload", "uploaded", up.to_str().unwrap()]);
    assert!(printed.contains(&sha256(&up)), "{printed}");
    let v = phase_is(&inst, "uploaded", "Succeeded").await;
    assert_eq!(v["status"]["capacity"], (4u64 << 20).to_string(), "{v}");
    assert!(holds(&inst, "uploaded", 0x6b));
    let (code, _) = inst
        .send(
            reqwest::Method::PUT,
            path,
            "application/octet-stream",
            vec![0; 512],
        )
        .await;
    assert_eq!(code, 409, "a second upload is refused");
    let (code, _) = inst
        .send(
            reqwest::Method::PUT,
            "/apis/volumes.krvirt.io/v1/namespaces/default/volumes/from-http/upload",
            "application/octet-stream",
            vec![0; 512],
        )
        .await;
    assert_eq!(code, 400, "not an upload Volume");

    // In-use protection and garbage collection.
    apply(
        &inst,
        "vm",
        r#"apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: keeper
spec:
  runStrategy: Halted
  dataVolumeTemplates:
  - metadata:
      name: keeper-root
    spec:
      source:
        blank: {}
      storage:
        resources:
          requests:
            storage: 16Mi
  template:
    spec:
      domain:
        devices:
          disks:
          - name: root
            disk: {bus: virtio}
          - name: data
            disk: {bus: virtio}
        memory:
          guest: 128Mi
      volumes:
      - name: root
        dataVolume:
          name: keeper-root
      - name: data
        persistentVolumeClaim:
          claimName: from-http
"#,
    );
    phase_is(&inst, "keeper-root", "Succeeded").await;
    let (code, body) = inst
        .send(
            reqwest::Method::DELETE,
            "/apis/krvirt.io/v1/namespaces/default/volumes/from-http",
            "application/json",
            Vec::new(),
        )
        .await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("VirtualMachine \"keeper\""),
        "{body}"
    );
    let out = inst.cli(&["delete", "volume", "keeper-root"]);
    assert!(!out.status.success(), "deleting a VM's Volume was accepted");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("keeper"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(volume(&inst, "from-http").await.is_some());
    // The VM goes: its template Volume goes with it; the other is free.
    inst.ok(&["delete", "vm", "keeper"]);
    inst.until("keeper-root collected", Duration::from_secs(30), || async {
        volume(&inst, "keeper-root").await.is_none().then_some(())
    })
    .await;
    assert!(
        !inst
            .data_dir()
            .join("pools/default/default.keeper-root.qcow2")
            .exists()
    );
    inst.ok(&["delete", "volume", "from-http"]);
    inst.until("from-http deleted", Duration::from_secs(30), || async {
        volume(&inst, "from-http").await.is_none().then_some(())
    })
    .await;
}
