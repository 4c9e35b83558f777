//! Every golden config, with its files made real, is started by the real
//! QEMU (paused, `-S`) and QEMU's own view of the VM is compared with the
//! config: this checks every option of `qemu_argv` against QEMU 7.2,
//! including the comma escaping (all files live in directories whose names
//! contain commas).

mod common;

use std::collections::HashSet;
use std::fs;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use krvirt_hypervisor::{
    Accel, AccelMode, DiskBus, DiskFormat, Firmware, NicBackend, Protocol, RunPaths, RunState,
    StopOutcome, VmConfig, detect, launch,
};
use serde_json::{Value, json};

const IMAGE_SIZE: u64 = 16 * 1024 * 1024;

fn golden_configs() -> Vec<(String, VmConfig)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut v: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let cfg: VmConfig = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
            (p.file_stem().unwrap().to_string_lossy().into_owned(), cfg)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn find_boot_file(prefix: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = fs::read_dir("/boot")
        .expect("/boot must exist")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no /boot/{prefix}* (the Debian cloud kernel must be installed)"))
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed (Debian package qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn create_image(path: &Path, format: DiskFormat, backing: Option<(&Path, DiskFormat)>) {
    match (format, backing) {
        (DiskFormat::Raw, _) => {
            let f = fs::File::create(path).unwrap();
            f.set_len(IMAGE_SIZE).unwrap();
        }
        (DiskFormat::Qcow2, None) => {
            qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "16M"])
        }
        (DiskFormat::Qcow2, Some((b, bf))) => qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            b.to_str().unwrap(),
            "-F",
            bf.qemu_driver(),
            path.to_str().unwrap(),
        ]),
    }
}

fn free_port(proto: Protocol, addr: Option<Ipv4Addr>) -> u16 {
    let ip = addr.unwrap_or(Ipv4Addr::UNSPECIFIED);
    match proto {
        Protocol::Tcp => TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
        Protocol::Udp => UdpSocket::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// Rewrites every path of `cfg` into `dir` and creates the files.
fn materialize(cfg: &mut VmConfig, dir: &Path, kernel: &Path, initrd: &Path) {
    fs::create_dir_all(dir).unwrap();
    let old = cfg.run.clone();
    let run_dir = dir.join("run,dir");
    cfg.run = RunPaths {
        qmp_socket: run_dir.join(file_name(&old.qmp_socket)),
        serial_socket: run_dir.join(file_name(&old.serial_socket)),
        console_log: run_dir.join(file_name(&old.console_log)),
        pidfile: run_dir.join(file_name(&old.pidfile)),
        dir: run_dir,
    };
    for (i, d) in cfg.disks.iter_mut().enumerate() {
        for (j, b) in d.backing.iter_mut().enumerate() {
            b.path = dir.join(format!("d{i}-b{j}-{}", file_name(&b.path)));
        }
        // Farthest first, each qcow2 pointing at the next one in its header.
        for j in (0..d.backing.len()).rev() {
            let next = d.backing.get(j + 1).map(|n| (n.path.as_path(), n.format));
            create_image(&d.backing[j].path, d.backing[j].format, next);
        }
        d.path = dir.join(format!("d{i}-{}", file_name(&d.path)));
        let first = d.backing.first().map(|b| (b.path.as_path(), b.format));
        create_image(&d.path, d.format, first);
    }
    if let Some(k) = &mut cfg.kernel_boot {
        k.kernel = kernel.to_path_buf();
        if let Some(i) = &mut k.initrd {
            *i = initrd.to_path_buf();
        }
    }
    if let Firmware::Uefi { code, vars } = &mut cfg.firmware {
        *code = PathBuf::from("/usr/share/OVMF/OVMF_CODE.fd");
        assert!(
            code.exists(),
            "OVMF (Debian package ovmf) must be installed"
        );
        *vars = dir.join("OVMF,VARS.fd");
        fs::copy("/usr/share/OVMF/OVMF_VARS.fd", &*vars).unwrap();
    }
    for n in &mut cfg.nics {
        match &mut n.backend {
            NicBackend::User { hostfwd, .. } => {
                for f in hostfwd {
                    f.host_port = free_port(f.proto, f.host_addr);
                }
            }
            NicBackend::Tap { .. } => {}
            other => panic!("unexpected backend {other:?}"),
        }
    }
    // KVM cannot boot guests on the test machines.
    cfg.accel = Accel::Tcg;
    cfg.start_paused = true;
    cfg.validate().unwrap();
}

fn deep_node<'a>(nodes: &'a Value, name: &str) -> &'a Value {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["node-name"] == json!(name))
        .unwrap_or_else(|| panic!("no block node {name}"))
}

fn names(v: &Value) -> HashSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get("name").and_then(Value::as_str).map(str::to_string))
        .collect()
}

/// Persistent taps for a config's tap NICs, deleted on drop.
struct TapGuard(Vec<String>);

impl TapGuard {
    fn create(cfg: &mut VmConfig) -> TapGuard {
        let mut names = Vec::new();
        for (i, n) in cfg.nics.iter_mut().enumerate() {
            if let NicBackend::Tap { ifname } = &mut n.backend {
                *ifname = format!("kvq{}n{i}", std::process::id() % 100_000);
                krvirt_net::tap::create(ifname, nix::unistd::geteuid().as_raw())
                    .unwrap_or_else(|e| panic!("creating tap {ifname} (needs root): {e}"));
                names.push(ifname.clone());
            }
        }
        TapGuard(names)
    }
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        // QEMU may still hold a tap for a moment after its guard killed it
        // (the tap is busy then): retry, so no tap outlives the test.
        for n in &self.0 {
            for _ in 0..100 {
                if krvirt_net::tap::delete(n).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_accepts_every_golden_config() {
    let qemu = common::qemu();
    let accel = detect(AccelMode::Auto, Path::new("/")).unwrap();
    assert_eq!(accel.accel, Accel::Tcg, "this test assumes a TCG-only host");

    let tmp = common::tempdir();
    // Kernel and initrd copied under names that need no escaping on the
    // command line but contain commas anyway.
    let assets = tmp.path().join("assets,dir");
    fs::create_dir_all(&assets).unwrap();
    let kernel = assets.join("vmlinuz,x");
    let initrd = assets.join("initrd=,x.img");
    fs::copy(find_boot_file("vmlinuz-"), &kernel).unwrap();
    fs::copy(find_boot_file("initrd.img-"), &initrd).unwrap();

    let configs = golden_configs();
    assert!(configs.len() >= 15);
    for (name, mut cfg) in configs {
        materialize(
            &mut cfg,
            &tmp.path().join(format!("{name},case")),
            &kernel,
            &initrd,
        );
        // Tap NICs: created beforehand the way the agent does (persistent,
        // owned by the user QEMU runs as), under names of this test.
        let taps = TapGuard::create(&mut cfg);
        let h = launch(&cfg, &qemu)
            .await
            .unwrap_or_else(|e| panic!("{name}: QEMU refused the golden config: {e}"));
        let _guard = common::QemuGuard::new(&h, cfg.run.dir.to_string_lossy().into_owned());
        if !taps.0.is_empty() {
            // QEMU holds each tap open: a tun fd whose fdinfo names it.
            let pid = fs::read_to_string(&cfg.run.pidfile).unwrap();
            let mut held = Vec::new();
            for e in fs::read_dir(format!("/proc/{}/fdinfo", pid.trim()))
                .unwrap()
                .flatten()
            {
                let info = fs::read_to_string(e.path()).unwrap_or_default();
                if let Some(l) = info.lines().find(|l| l.starts_with("iff:")) {
                    held.push(l.trim_start_matches("iff:").trim().to_string());
                }
            }
            for t in &taps.0 {
                assert!(
                    held.contains(t),
                    "{name}: QEMU does not hold tap {t}: {held:?}"
                );
            }
        }
        let q = h.qmp();

        // A migration target waits for its state (`-incoming defer`).
        let want = if cfg.incoming {
            RunState::Inmigrate
        } else {
            RunState::Prelaunch
        };
        assert_eq!(h.status().await.unwrap(), want, "{name}");

        let name_v = q.execute("query-name", None).await.unwrap();
        assert_eq!(name_v["name"], json!(cfg.name), "{name}");
        let uuid = q.execute("query-uuid", None).await.unwrap();
        assert_eq!(uuid["UUID"], json!(cfg.uuid), "{name}");

        let mem = q.execute("query-memory-size-summary", None).await.unwrap();
        assert_eq!(mem["base-memory"], json!(cfg.memory_bytes), "{name}");
        let cpus = q.execute("query-cpus-fast", None).await.unwrap();
        assert_eq!(
            cpus.as_array().unwrap().len() as u32,
            cfg.cpu.vcpus().unwrap(),
            "{name}"
        );

        // Every device we asked for, under the id we gave it.
        let periph = names(
            &q.execute("qom-list", Some(json!({"path": "/machine/peripheral"})))
                .await
                .unwrap(),
        );
        for d in &cfg.disks {
            assert!(periph.contains(&d.device_id()), "{name}: {periph:?}");
        }
        for n in &cfg.nics {
            assert!(periph.contains(&n.device_id()), "{name}: {periph:?}");
        }
        assert_eq!(periph.contains("rng0"), cfg.rng, "{name}: {periph:?}");
        let scsi = cfg.disks.iter().any(|d| d.bus == DiskBus::Scsi);
        assert_eq!(periph.contains("scsi0"), scsi, "{name}: {periph:?}");

        // Block nodes: the files (commas and all) opened with the right
        // read-only flag and cache mode.
        let nodes = q
            .execute("query-named-block-nodes", Some(json!({"flat": true})))
            .await
            .unwrap();
        let nodes = nodes.as_array().unwrap();
        let node = |n: &str| {
            nodes
                .iter()
                .find(|x| x["node-name"] == json!(n))
                .unwrap_or_else(|| panic!("{name}: no block node {n}"))
        };
        let deep = q
            .execute("query-named-block-nodes", Some(json!({"flat": false})))
            .await
            .unwrap();
        for (i, d) in cfg.disks.iter().enumerate() {
            let fmt = node(&format!("drive{i}-fmt"));
            assert_eq!(fmt["drv"], json!(d.format.qemu_driver()), "{name}");
            assert_eq!(fmt["ro"], json!(d.read_only), "{name}");
            let file = node(&format!("drive{i}-file"));
            assert_eq!(file["file"], json!(d.path.to_str().unwrap()), "{name}");
            let direct = d.cache == krvirt_hypervisor::DiskCache::None;
            assert_eq!(file["cache"]["direct"], json!(direct), "{name}");
            for (j, b) in d.backing.iter().enumerate() {
                let bf = node(&format!("drive{i}-b{j}-file"));
                assert_eq!(bf["file"], json!(b.path.to_str().unwrap()), "{name}");
                assert_eq!(bf["ro"], json!(true), "{name}");
            }
            // The chain QEMU opened, as its image info nests it.
            let mut chain = Vec::new();
            let mut img = &deep_node(&deep, &format!("drive{i}-fmt"))["image"];
            while let Some(b) = img.get("backing-image") {
                chain.push(b["filename"].as_str().unwrap().to_string());
                img = b;
            }
            let want: Vec<String> = d
                .backing
                .iter()
                .map(|b| b.path.to_str().unwrap().to_string())
                .collect();
            assert_eq!(chain, want, "{name}: backing chain");
        }
        if let Firmware::Uefi { vars, .. } = &cfg.firmware {
            assert_eq!(node("fw-code")["ro"], json!(true), "{name}");
            assert_eq!(
                node("fw-vars-file")["file"],
                json!(vars.to_str().unwrap()),
                "{name}"
            );
        }
        for n in &cfg.nics {
            if let NicBackend::User { hostfwd, .. } = &n.backend
                && !hostfwd.is_empty()
            {
                let info = q
                    .execute(
                        "human-monitor-command",
                        Some(json!({"command-line": "info usernet"})),
                    )
                    .await
                    .unwrap();
                let info = info.as_str().unwrap();
                for f in hostfwd {
                    assert!(
                        info.contains(&format!(" {} ", f.host_port)),
                        "{name}: forward of port {} missing in {info}",
                        f.host_port
                    );
                }
            }
        }
        assert!(
            cfg.run.console_log.exists(),
            "{name}: console log not created"
        );

        let outcome = h.graceful_stop(Duration::ZERO).await.unwrap();
        assert_eq!(outcome, StopOutcome::Quit, "{name}");
        assert!(!h.is_alive(), "{name}");
    }
}
