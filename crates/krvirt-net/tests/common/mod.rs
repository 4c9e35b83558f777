//! A small lab of real bridges, network namespaces and veth pairs (the
//! namespaces stand in for guests), removed again on drop. Every name and
//! subnet is derived from the test process id and a counter so parallel
//! tests never share anything; traffic only goes to these namespaces and
//! the bridges' own addresses.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn need_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "krvirt-net tests create bridges, taps and nftables tables: run them as root"
    );
    for bin in ["ip", "nft", "curl", "busybox", "dnsmasq"] {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {bin}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(ok, "{bin} is missing (scripts/packages.txt installs it)");
    }
}

/// A unique small number for this test.
pub fn unique() -> u32 {
    (std::process::id() % 200) * 50 + SEQ.fetch_add(1, Ordering::SeqCst) % 50
}

pub fn sh(cmd: &[&str]) -> Output {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

pub fn must(cmd: &[&str]) {
    let o = sh(cmd);
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// One guest stand-in: a namespace with `eth0` whose host side is `port`.
pub struct Guest {
    pub ns: String,
    pub port: String,
    pub mac: String,
    pub ip: Ipv4Addr,
}

impl Guest {
    pub fn exec(&self, cmd: &[&str]) -> Output {
        let mut v = vec!["ip", "netns", "exec", self.ns.as_str()];
        v.extend_from_slice(cmd);
        sh(&v)
    }

    /// HTTP GET from this guest; the body on success.
    pub fn get(&self, url: &str) -> Option<String> {
        let o = self.exec(&["curl", "-s", "-m", "2", url]);
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// HTTP GET with source address `src`.
    pub fn get_from(&self, src: &str, url: &str) -> Option<String> {
        let o = self.exec(&["curl", "-s", "-m", "2", "--interface", src, url]);
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    }
}

/// Removes what the test created, even when it panics.
#[derive(Default)]
pub struct Lab {
    pub id: u32,
    bridges: Vec<String>,
    namespaces: Vec<String>,
    links: Vec<String>,
    tables: Vec<String>,
    children: Vec<Child>,
    dirs: Vec<tempfile::TempDir>,
}

impl Lab {
    pub fn new() -> Lab {
        need_root();
        let mut lab = Lab::default();
        lab.id = unique();
        lab
    }

    /// The test's own /24: 10.(100 + id/250).(id%250).0/24 with a per-lab
    /// offset `k` (< 10) in the second octet.
    pub fn subnet(&self, k: u32) -> (u8, u8) {
        (
            ((150 + k * 10 + self.id / 250) % 256) as u8,
            (self.id % 250) as u8,
        )
    }

    pub fn name(&self, kind: &str, k: u32) -> String {
        format!("kv{kind}{}x{k}", self.id)
    }

    /// An nft table name for this lab (removed on drop).
    pub fn table(&mut self) -> String {
        let t = format!("kvtest{}", self.id);
        self.tables.push(t.clone());
        t
    }

    pub fn track_bridge(&mut self, name: &str) {
        self.bridges.push(name.to_string());
    }

    pub fn tempdir(&mut self) -> std::path::PathBuf {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().to_path_buf();
        self.dirs.push(d);
        p
    }

    /// A namespace with a veth pair; host side `port` attached to `bridge`.
    pub fn guest(&mut self, bridge: &str, k: u32, ip: Ipv4Addr, prefix: u8) -> Guest {
        let ns = self.name("ns", k);
        let port = self.name("v", k);
        let mac = format!(
            "02:00:00:{:02x}:{:02x}:{:02x}",
            (self.id >> 8) & 0xff,
            self.id & 0xff,
            k
        );
        must(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        must(&[
            "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        self.links.push(port.clone());
        must(&["ip", "-n", &ns, "link", "set", "eth0", "address", &mac]);
        must(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/{prefix}"),
            "dev",
            "eth0",
        ]);
        must(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        must(&["ip", "link", "set", &port, "master", bridge, "up"]);
        Guest { ns, port, mac, ip }
    }

    /// Serve `text` over HTTP on port 80 in the guest's namespace.
    pub fn http_server(&mut self, g: &Guest, text: &str) {
        let dir = self.tempdir();
        std::fs::write(dir.join("index.html"), text).expect("write index");
        let child = Command::new("ip")
            .args([
                "netns", "exec", &g.ns, "busybox", "httpd", "-f", "-p", "80", "-h",
            ])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start busybox httpd");
        self.children.push(child);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for t in &self.tables {
            let _ = krvirt_net::firewall::remove(t);
            let _ = krvirt_net::nat::remove(t);
        }
        for l in &self.links {
            let _ = sh(&["ip", "link", "del", l]);
        }
        for n in &self.namespaces {
            // Anything still running inside (dhcp clients) goes first.
            let pids = sh(&["ip", "netns", "pids", n]);
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = sh(&["kill", "-9", pid]);
            }
            let _ = sh(&["ip", "netns", "del", n]);
        }
        for b in &self.bridges {
            let _ = sh(&["ip", "link", "del", b]);
        }
    }
}
