//! Disks on Ceph RBD: the `-blockdev driver=rbd` command line (a golden
//! file of the disk arguments, so it does not depend on the rest of the
//! command line), validation of the rbd fields, and the real QEMU opening
//! an image of a real one-node Ceph through librbd.

#[path = "../../krvirt-storage/tests/common/ceph.rs"]
mod ceph;
mod common;

use std::fs;
use std::path::{Path, PathBuf};

use krvirt_hypervisor::{DiskBus, DiskCache, DiskConfig, DiskFormat, RbdDisk, VmConfig, qemu_argv};
use serde_json::json;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden-rbd")
}

/// The arguments that make up the disks: `-blockdev` values and the
/// `-device` values attached to a drive, one per line.
fn disk_args(cfg: &VmConfig) -> String {
    let args = qemu_argv(cfg);
    let mut out = String::new();
    for w in args.windows(2) {
        let keep = match w[0].as_str() {
            "-blockdev" => true,
            "-device" => w[1].contains("drive=drive"),
            _ => false,
        };
        if keep {
            out.push_str(&format!("{}\n{}\n", w[0], w[1]));
        }
    }
    out
}

#[test]
fn rbd_disk_golden() {
    let text = fs::read_to_string(golden_dir().join("rbd-disk.json")).unwrap();
    let cfg: VmConfig = serde_json::from_str(&text).expect("rbd-disk.json is a VmConfig");
    cfg.validate().expect("rbd-disk.json validates");
    let got = disk_args(&cfg);
    let file = golden_dir().join("rbd-disk.disk-args");
    if std::env::var("KRVIRT_BLESS").is_ok_and(|v| v == "1") {
        fs::write(&file, &got).unwrap();
    }
    let want = fs::read_to_string(&file).expect("rbd-disk.disk-args (KRVIRT_BLESS=1 writes it)");
    assert_eq!(got, want, "disk arguments differ from {}", file.display());
    // The comma in the conf path is doubled; monitors become servers.
    assert!(got.contains("conf=/etc/ceph/cluster,,a.conf"), "{got}");
    assert!(
        got.contains("server.1.host=fd00::2,server.1.port=3300"),
        "{got}"
    );
}

fn rbd_cfg() -> VmConfig {
    let text = fs::read_to_string(golden_dir().join("rbd-disk.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn field_of(cfg: &VmConfig) -> String {
    cfg.validate().expect_err("should not validate").field
}

#[test]
fn rbd_disk_validation_names_the_field() {
    let mut c = rbd_cfg();
    c.disks[0].path = "/x.raw".into();
    assert_eq!(field_of(&c), "disks[0].path");
    let mut c = rbd_cfg();
    c.disks[0].rbd.as_mut().unwrap().image = "a/b".into();
    assert_eq!(field_of(&c), "disks[0].rbd.image");
    let mut c = rbd_cfg();
    c.disks[1].rbd.as_mut().unwrap().monitors = vec!["nohost".into()];
    assert_eq!(field_of(&c), "disks[1].rbd.monitors[0]");
    let mut c = rbd_cfg();
    c.disks[0].rbd.as_mut().unwrap().conf = Some("rel.conf".into());
    assert_eq!(field_of(&c), "disks[0].rbd.conf");
    let mut c = rbd_cfg();
    c.disks[0].rbd.as_mut().unwrap().pool = String::new();
    assert_eq!(field_of(&c), "disks[0].rbd.pool");
    // Unknown fields are refused.
    let mut v = serde_json::to_value(rbd_cfg()).unwrap();
    v["disks"][0]["rbd"]["secret"] = json!("x");
    assert!(serde_json::from_value::<VmConfig>(v).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_opens_an_rbd_image_through_librbd() {
    let ceph = ceph::CephCluster::start();
    ceph.rbd(&["create", "--size", "16", "rbd/vm-disk"]);
    let tmp = common::tempdir();
    let uid = common::uid("rbd");
    let mut cfg = common::idle_vm(tmp.path(), "rbd-vm", &uid);
    cfg.start_paused = true;
    cfg.disks.push(DiskConfig {
        id: "root".into(),
        path: PathBuf::new(),
        format: DiskFormat::Raw,
        bus: DiskBus::Virtio,
        read_only: false,
        boot_index: Some(1),
        serial: None,
        cache: DiskCache::Writeback,
        backing: vec![],
        rbd: Some(RbdDisk {
            pool: ceph.pool.clone(),
            image: "vm-disk".into(),
            conf: Some(ceph.conf.clone()),
            user: None,
            monitors: vec![],
        }),
    });
    cfg.validate().unwrap();
    let (h, _guard) = common::launch_guarded(&cfg).await;
    let nodes = h
        .qmp()
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .await
        .unwrap();
    let nodes = nodes.as_array().unwrap();
    let node = |n: &str| {
        nodes
            .iter()
            .find(|x| x["node-name"] == json!(n))
            .unwrap_or_else(|| panic!("no block node {n}: {nodes:?}"))
            .clone()
    };
    let file = node("drive0-file");
    assert_eq!(file["drv"], "rbd", "{file}");
    assert_eq!(file["image"]["virtual-size"], 16 << 20, "{file}");
    assert_eq!(node("drive0-fmt")["drv"], "raw");
    // The guest's disk is the image: a write through QEMU lands in Ceph.
    let out = h
        .qmp()
        .execute(
            "human-monitor-command",
            Some(json!({"command-line": "qemu-io -d /machine/peripheral/disk-root/virtio-backend \"write -P 0x5c 0 64k\""})),
        )
        .await
        .unwrap();
    let out = out.as_str().unwrap_or_default().to_string();
    assert!(!out.contains("rror"), "qemu-io in QEMU: {out}");
    // Read back from Ceph by another librbd client (read-only: QEMU holds
    // the image's exclusive lock).
    let src = format!("rbd:rbd/vm-disk:conf={}", ceph.conf.display());
    let read = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read -P 0x5c 0 64k", &src])
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&read.stdout);
    assert!(
        read.status.success()
            && text.contains("read 65536")
            && !text.contains("Pattern verification failed"),
        "the guest's write is not in the RBD image: {text}{}",
        String::from_utf8_lossy(&read.stderr)
    );
}
