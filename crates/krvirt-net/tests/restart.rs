//! After `kill -9` of the process that set up networking, the kernel and
//! store state it made is intact and a new process adopts it: taps, the
//! bridge, nftables rules, the DHCP server and IPAM leases.
//!
//! The "krvirt" here is this test binary re-executed as a child
//! (`KRVIRT_NET_CHILD` set) that sets everything up, prints READY and
//! waits to be killed.

mod common;

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use krvirt_net::dhcp::{DhcpServer, Lease};
use krvirt_net::firewall::{Firewall, Group, Port, Proto, Rule, Ruleset, Zone};
use krvirt_net::ipam::Pool;
use krvirt_net::link::{self, Netlink};
use krvirt_net::{Cidr, Ipam, tap};

const UID: &str = "0f0e0d0c-0b0a-4000-8000-00000000beef";

struct Setup {
    dir: PathBuf,
    bridge: String,
    table: String,
    subnet: Cidr,
    gw: Ipv4Addr,
}

impl Setup {
    fn new(dir: PathBuf, bridge: String, table: String, subnet: &str) -> Setup {
        let subnet: Cidr = subnet.parse().unwrap();
        Setup {
            dir,
            bridge,
            table,
            gw: subnet.nth_host(1).unwrap(),
            subnet,
        }
    }
    fn from_env() -> Setup {
        let v = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
        Setup::new(
            v("KVN_DIR").into(),
            v("KVN_BRIDGE"),
            v("KVN_TABLE"),
            &v("KVN_SUBNET"),
        )
    }
    fn pool(&self) -> Pool {
        Pool::new("net-r", self.subnet, self.gw, None).unwrap()
    }
    fn dhcp(&self) -> DhcpServer {
        DhcpServer {
            bridge: self.bridge.clone(),
            subnet: self.subnet,
            router: Some(self.gw),
            dir: self.dir.join("dhcp"),
        }
    }
    fn ruleset(&self, ip: Ipv4Addr) -> Ruleset {
        Ruleset {
            remote: Vec::new(),
            groups: vec![Group {
                name: "g".into(),
                ingress: vec![Rule {
                    proto: Proto::Tcp,
                    ports: Some((8080, 8080)),
                    cidrs: vec![],
                    remote_group: None,
                }],
                egress: vec![],
            }],
            ports: vec![Port {
                tap: tap::tap_name(UID, 0).unwrap(),
                mac: "02:00:00:be:ef:01".into(),
                ip: Some(ip),
                groups: vec!["g".into()],
            }],
            zones: vec![Zone {
                bridge: self.bridge.clone(),
                isolated: false,
            }],
        }
    }
}

/// The child: sets up and waits to be killed. Only run by
/// `state_survives_kill_9_and_is_adopted` (hence ignored).
#[tokio::test]
#[ignore = "the child process of state_survives_kill_9_and_is_adopted"]
async fn child_sets_up_and_waits_for_kill() {
    assert!(
        std::env::var_os("KRVIRT_NET_CHILD").is_some(),
        "run only as the child of state_survives_kill_9_and_is_adopted"
    );
    let s = Setup::from_env();
    let nl = Netlink::connect().unwrap();
    nl.ensure_bridge(&s.bridge).await.unwrap();
    nl.ensure_address(&s.bridge, s.gw, s.subnet.prefix)
        .await
        .unwrap();
    let t = tap::tap_name(UID, 0).unwrap();
    tap::create(&t, 0).unwrap();
    nl.attach(&t, &s.bridge).await.unwrap();
    let store =
        Arc::new(krvirt_store::embedded::EmbeddedStore::open(&s.dir.join("store.db")).unwrap());
    let ipam = Ipam::new(store);
    let ip = ipam
        .allocate(
            &s.pool(),
            &format!("{UID}/default"),
            Some("02:00:00:be:ef:01"),
        )
        .await
        .unwrap();
    let d = s.dhcp();
    d.set_leases(&[Lease {
        mac: "02:00:00:be:ef:01".into(),
        ip,
    }])
    .unwrap();
    d.ensure_running().unwrap();
    Firewall::new(&s.table)
        .unwrap()
        .apply(&s.ruleset(ip))
        .unwrap();
    println!("READY {ip}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

#[tokio::test]
async fn state_survives_kill_9_and_is_adopted() {
    let mut lab = common::Lab::new();
    let (a, b) = lab.subnet(0);
    let subnet = format!("10.{a}.{b}.0/24");
    let bridge = lab.name("br", 0);
    lab.track_bridge(&bridge);
    let table = lab.table();
    let dir = lab.tempdir();
    let t = tap::tap_name(UID, 0).unwrap();
    struct Cleanup(String, DhcpServer);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = self.1.stop();
            let _ = tap::delete(&self.0);
        }
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_sets_up_and_waits_for_kill",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KRVIRT_NET_CHILD", "1")
        .env("KVN_DIR", &dir)
        .env("KVN_BRIDGE", &bridge)
        .env("KVN_TABLE", &table)
        .env("KVN_SUBNET", &subnet)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("child.stderr")).unwrap())
        .spawn()
        .unwrap();
    // Watchdog: a child that never gets ready is killed, ending the read.
    let child_pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(120));
        let _ = nix::sys::signal::kill(child_pid, nix::sys::signal::Signal::SIGKILL);
    });
    drop(watchdog);
    let s = Setup::new(dir.clone(), bridge.clone(), table.clone(), &subnet);
    let _cleanup = Cleanup(t.clone(), s.dhcp());
    let mut ip = None;
    let mut seen = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push(line.clone());
        // libtest prints "test NAME ... " on the same line first.
        if let Some((_, rest)) = line.split_once("READY ") {
            ip = Some(rest.trim().parse::<Ipv4Addr>().unwrap());
            break;
        }
    }
    let ip = ip.unwrap_or_else(|| {
        panic!(
            "child did not get ready: {}\n{}",
            seen.join("\n"),
            std::fs::read_to_string(dir.join("child.stderr")).unwrap_or_default()
        )
    });
    // kill -9.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();

    // Taps: still there, still on the bridge, not swept while the VMI lives.
    assert!(tap::exists(&t));
    assert_eq!(link::master_of(&t).as_deref(), Some(bridge.as_str()));
    let swept = tap::sweep(&[UID.to_string()], |n| n == t).unwrap();
    assert!(swept.is_empty());
    // Rules: still in the kernel.
    let listed = common::sh(&["nft", "list", "table", "inet", &table]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("tcp dport 8080 accept") && listed.contains(&ip.to_string()),
        "{listed}"
    );
    let spoof = common::sh(&["nft", "list", "table", "bridge", &table]);
    assert!(String::from_utf8_lossy(&spoof.stdout).contains(&format!("sp-{t}")));
    // DHCP: the same dnsmasq, adopted; its hosts file has the lease.
    let d = s.dhcp();
    let pid = d.pid().expect("dnsmasq survived");
    assert_eq!(d.ensure_running().unwrap(), pid);
    let hosts = std::fs::read_to_string(d.hosts_file()).unwrap();
    assert!(
        hosts.contains(&format!("02:00:00:be:ef:01,{ip}")),
        "{hosts}"
    );
    // IPAM: the same address for the same owner, from the store.
    let store =
        Arc::new(krvirt_store::embedded::EmbeddedStore::open(&dir.join("store.db")).unwrap());
    let ipam = Ipam::new(store);
    assert_eq!(
        ipam.allocate(&s.pool(), &format!("{UID}/default"), None)
            .await
            .unwrap(),
        ip
    );
    // A new firewall replaces the tables in one go and keeps them equal.
    let mut fw = Firewall::new(&table).unwrap();
    fw.apply(&s.ruleset(ip)).unwrap();
    let again = common::sh(&["nft", "list", "table", "inet", &table]);
    assert_eq!(String::from_utf8_lossy(&again.stdout), listed);
    // And once the VMI is gone, the sweep removes its tap.
    let swept = tap::sweep(&[], |n| n == t).unwrap();
    assert_eq!(swept, vec![t.clone()]);
    assert!(!tap::exists(&t));
}
