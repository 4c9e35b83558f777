//! A throwaway one-node Ceph cluster for tests: one monitor and one
//! BlueStore OSD on a sparse file, all on 127.0.0.1 with ports of their
//! own (so parallel tests do not collide), `auth none`, and an RBD pool.
//! The daemons are this process's children; dropping the guard kills them
//! and removes the directory. Needs Debian's `ceph-mon`, `ceph-osd` and
//! `ceph-common`; a test that uses it fails loudly when they are missing.
//!
//! Shared with other crates' tests through `#[path]`.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running cluster; killed on drop.
pub struct CephCluster {
    dir: tempfile::TempDir,
    children: Vec<Child>,
    /// `ceph.conf` clients use.
    pub conf: PathBuf,
    /// The RBD pool (`rbd`).
    pub pool: String,
    /// The monitor's v1 address `127.0.0.1:PORT`.
    pub mon: String,
}

/// A TCP port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free TCP port on 127.0.0.1")
}

/// `n` consecutive free ports (for the OSD's messenger).
fn free_range(n: u16) -> u16 {
    for _ in 0..200 {
        let base = free_port();
        if base > u16::MAX - n {
            continue;
        }
        let held: Vec<_> = (base..base + n)
            .map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == n as usize {
            return base;
        }
    }
    panic!("no range of {n} free TCP ports on 127.0.0.1");
}

fn run(conf: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("60")
        .arg(program)
        .args(args)
        .env("CEPH_CONF", conf)
        .output()
        .unwrap_or_else(|e| panic!("{program} cannot be run: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("/proc/sys/kernel/random/uuid")
        .trim()
        .to_string()
}

impl CephCluster {
    /// Start a cluster and create the pool `rbd` (a few seconds).
    pub fn start() -> CephCluster {
        for bin in ["ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool"] {
            let found = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
                .unwrap_or(false);
            assert!(
                found,
                "{bin} is not installed: the rbd tests need a real Ceph \
                 (apt-get install ceph-mon ceph-osd ceph-common qemu-block-extra; \
                 scripts/packages.txt lists them)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("kvceph-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().to_path_buf();
        // QEMU may run as an unprivileged user: it reads ceph.conf.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for sub in ["run", "log", "mon.a", "osd.0", "crash"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let fsid = uuid();
        let (v2, v1) = (free_port(), free_port());
        let ms = free_range(24);
        let mon_host = format!("[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]");
        let d_s = d.display().to_string();
        let conf_text = format!(
            r#"[global]
fsid = {fsid}
mon_host = {mon_host}
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_port_min = {ms}
ms_bind_port_max = {ms_max}
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
keyring = /dev/null
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
run_dir = {d_s}/run
admin_socket = {d_s}/run/$name.asok
pid_file = {d_s}/run/$name.pid
log_file = {d_s}/log/$name.log
crash_dir = {d_s}/crash
exporter_sock_dir = {d_s}/run
paxos_propose_interval = 0.1
paxos_min_wait = 0.01
client_mount_timeout = 30
[mon]
mon_data = {d_s}/mon.$id
mon_cluster_log_file = {d_s}/log/cluster.log
[osd]
osd_data = {d_s}/osd.$id
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = 4294967296
bluestore_block_db_create = false
bluestore_block_wal_create = false
bluestore_fsck_on_mkfs = false
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
osd_memory_target = 939524096
[client]
log_file = {d_s}/log/client.log
admin_socket =
"#,
            ms_max = ms + 23,
        );
        let conf = d.join("ceph.conf");
        std::fs::write(&conf, conf_text).unwrap();
        let mut cluster = CephCluster {
            dir,
            children: Vec::new(),
            conf: conf.clone(),
            pool: "rbd".into(),
            mon: format!("127.0.0.1:{v1}"),
        };
        let monmap = d.join("monmap");
        run(
            &conf,
            "monmaptool",
            &[
                "--create",
                "--fsid",
                &fsid,
                "--addv",
                "a",
                &mon_host,
                monmap.to_str().unwrap(),
            ],
        );
        run(
            &conf,
            "ceph-mon",
            &["--mkfs", "-i", "a", "--monmap", monmap.to_str().unwrap()],
        );
        cluster.spawn("ceph-mon", &["-f", "-i", "a"]);
        let osd_uuid = uuid();
        let id = run(&conf, "ceph", &["osd", "new", &osd_uuid]);
        let id = id.trim().to_string();
        run(
            &conf,
            "ceph-osd",
            &["-i", &id, "--mkfs", "--osd-uuid", &osd_uuid],
        );
        cluster.spawn("ceph-osd", &["-f", "-i", &id]);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let stat = run(&conf, "ceph", &["osd", "stat"]);
            if stat.contains("1 up") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the Ceph OSD did not come up: {stat}\n{}",
                cluster.logs()
            );
            cluster.check_alive();
            std::thread::sleep(Duration::from_millis(200));
        }
        run(
            &conf,
            "ceph",
            &["osd", "pool", "create", &cluster.pool, "8", "8"],
        );
        run(&conf, "rbd", &["pool", "init", &cluster.pool]);
        cluster
    }

    fn spawn(&mut self, program: &str, args: &[&str]) {
        let log = std::fs::File::create(
            self.dir
                .path()
                .join("log")
                .join(format!("{program}.stdout")),
        )
        .unwrap();
        let child = Command::new(program)
            .args(args)
            .env("CEPH_CONF", &self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{program} cannot be started: {e}"));
        self.children.push(child);
    }

    fn check_alive(&mut self) {
        for c in &mut self.children {
            if let Ok(Some(status)) = c.try_wait() {
                panic!(
                    "a Ceph daemon (pid {}) exited: {status}\n{}",
                    c.id(),
                    self.logs()
                );
            }
        }
    }

    /// The daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path().join("log")) {
            for e in rd.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                out.push_str(&format!("== {}\n", e.path().display()));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// `rbd ARGS` against this cluster.
    pub fn rbd(&self, args: &[&str]) -> String {
        run(&self.conf, "rbd", args)
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}
