//! QEMU isolation against the real QEMU (TCG) and this host's cgroups: an
//! unprivileged user, the seccomp sandbox, a per-VM cgroup with the
//! config's limits, vCPU threads pinned to dedicated CPUs.
//!
//! Needs root (to create the `krvirt-qemu` user, cgroups, ACLs).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use common::{QemuGuard, idle_vm, qemu, tempdir, uid};
use krvirt_hypervisor::isolation::{allowed_cpus, format_cpu_list};
use krvirt_hypervisor::{
    Cgroups, DEFAULT_QEMU_USER, DiskConfig, LaunchOptions, NicConfig, ProcessError, QemuUser,
    Resources, StopOutcome, launch_with,
};

/// Deletes a test tap on drop (QEMU may still hold it for a moment).
struct TapGuard(String);

impl Drop for TapGuard {
    fn drop(&mut self) {
        for _ in 0..50 {
            if krvirt_net::tap::delete(&self.0).is_ok() && !krvirt_net::tap::exists(&self.0) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn options() -> (QemuUser, LaunchOptions) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the isolation tests need root (user creation, cgroups)"
    );
    let user = QemuUser::ensure(DEFAULT_QEMU_USER)
        .unwrap_or_else(|e| panic!("cannot create the {DEFAULT_QEMU_USER} user: {e}"));
    assert_ne!(user.uid, 0);
    let cgroups = Cgroups::host(None).unwrap_or_else(|e| panic!("no usable cgroups here: {e}"));
    (
        user.clone(),
        LaunchOptions {
            user: Some(user),
            extra_groups: vec![],
            cgroups: Some(cgroups),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprivileged_sandboxed_limited_and_pinned() {
    let (user, opts) = options();
    let host_cpus: Vec<u32> = allowed_cpus(0).unwrap().into_iter().collect();
    assert!(
        host_cpus.len() >= 2,
        "needs 2 host CPUs, have {host_cpus:?}"
    );
    let tmp = tempdir();
    // A private directory above the disk: QEMU reaches it through an ACL.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let u = uid("iso");
    let mut cfg = idle_vm(tmp.path(), "iso", &u);
    cfg.cpu.cores = 2;
    let disk = tmp.path().join("data.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M")
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Built from JSON so the test does not depend on every field.
    let d: DiskConfig = serde_json::from_value(serde_json::json!({
        "id": "data", "path": disk, "format": "qcow2", "bus": "virtio"
    }))
    .unwrap();
    cfg.disks.push(d);
    // A tap made by root for root: launch hands it to QEMU's user.
    let tap = format!("kvtiso{}", std::process::id() % 100_000);
    krvirt_net::tap::create(&tap, 0).unwrap_or_else(|e| panic!("create tap {tap}: {e}"));
    let _tap = TapGuard(tap.clone());
    let nic: NicConfig = serde_json::from_value(serde_json::json!({
        "id": "net0", "model": "virtio", "mac": "52:54:00:12:34:56",
        "backend": {"type": "tap", "ifname": tap}
    }))
    .unwrap();
    cfg.nics.push(nic);
    let limit = cfg.memory_bytes + 384 * 1024 * 1024;
    // Reversed, so the vCPU -> CPU mapping is really checked.
    let pins = vec![host_cpus[1], host_cpus[0]];
    cfg.resources = Resources {
        memory_limit_bytes: Some(limit),
        cpu_limit_millis: Some(500),
        dedicated_cpus: pins.clone(),
    };

    let h = launch_with(&cfg, &qemu(), &opts)
        .await
        .unwrap_or_else(|e| panic!("launch: {e}"));
    let _guard = QemuGuard::new(&h, cfg.run.dir.to_string_lossy().into_owned());
    let pid = h.pid();

    // Credentials and sandbox.
    let ids = |f: &str| -> Vec<u32> {
        status_field(pid, f)
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect()
    };
    assert_eq!(ids("Uid"), vec![user.uid; 4], "real/effective/saved/fs uid");
    assert_eq!(ids("Gid"), vec![user.gid; 4], "real/effective/saved/fs gid");
    assert_eq!(status_field(pid, "Groups"), user.gid.to_string());
    assert_eq!(status_field(pid, "Seccomp"), "2", "seccomp filter mode");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    // Its own session.
    assert_eq!(
        nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid as i32)))
            .unwrap()
            .as_raw(),
        pid as i32
    );

    // Run directory: QEMU's, private.
    let md = std::fs::metadata(&cfg.run.dir).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o777), (user.uid, 0o700));
    assert_eq!(
        std::fs::metadata(&cfg.run.qmp_socket).unwrap().uid(),
        user.uid
    );
    assert_eq!(std::fs::metadata(&disk).unwrap().uid(), user.uid);
    let owner = std::fs::read_to_string(format!("/sys/class/net/{tap}/owner")).unwrap();
    assert_eq!(
        owner.trim(),
        user.uid.to_string(),
        "the tap is QEMU's user's"
    );

    // cgroup: QEMU is in it, with the config's limits.
    let cg = h.cgroup().expect("a cgroup").clone();
    assert_eq!(cg.pids().unwrap(), vec![pid as i32]);
    assert_eq!(cg.memory_limit().unwrap(), Some(limit));
    assert_eq!(cg.cpu_quota().unwrap(), (Some(50_000), 100_000));
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let leaf = cfg
        .run
        .dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    for ctrl in ["memory", "cpu"] {
        assert!(
            own.lines().any(|l| l
                .split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|x| x == ctrl))
                && l.ends_with(&format!("/{leaf}"))
                || l.starts_with("0::") && l.ends_with(&format!("/{leaf}"))),
            "QEMU not in its {ctrl} cgroup:\n{own}"
        );
    }
    assert!(cg.memory_usage_bytes().unwrap() > 0);

    // vCPU threads pinned one to one.
    let threads = h.vcpu_threads().await.unwrap();
    assert_eq!(threads.len(), 2);
    for ((idx, tid), cpu) in threads.iter().zip(&pins) {
        let allowed = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("Cpus_allowed_list:")
                    .map(|s| s.trim().to_string())
            })
            .unwrap();
        assert_eq!(allowed, format_cpu_list([cpu]), "vCPU {idx} (thread {tid})");
    }
    assert_eq!(h.launch_record().dedicated_cpus, pins);

    assert_eq!(
        h.graceful_stop(Duration::ZERO).await.unwrap(),
        StopOutcome::Quit
    );
    assert!(!cg.exists(), "cgroup removed after stop: {:?}", cg.dirs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_pinning_fails_and_leaves_nothing() {
    let (_user, opts) = options();
    let tmp = tempdir();
    let mut cfg = idle_vm(tmp.path(), "nopin", &uid("nopin"));
    cfg.resources.dedicated_cpus = vec![1000];
    match launch_with(&cfg, &qemu(), &opts).await {
        Err(e @ ProcessError::Isolation(_)) => {
            assert!(e.to_string().contains("sched_setaffinity"), "{e}");
        }
        Ok(h) => {
            let _g = QemuGuard::new(&h, cfg.run.dir.to_string_lossy().into_owned());
            panic!("pinned to a CPU that does not exist");
        }
        Err(e) => panic!("expected a pinning error, got {e}"),
    }
    let cg = opts
        .cgroups
        .as_ref()
        .unwrap()
        .vm(&cfg.run.dir.file_name().unwrap().to_string_lossy());
    assert!(!cg.exists(), "cgroup left behind: {:?}", cg.dirs);
    assert!(
        !cfg.run.pidfile.exists() || {
            let pid: i32 = std::fs::read_to_string(&cfg.run.pidfile)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            !common::pid_alive(pid as u32)
        }
    );
}
