//! Real guests (the demo guest under QEMU/TCG) on krvirt networks: taps
//! created by krvirt, addresses from IPAM in the store handed out by
//! dnsmasq, security groups changed while the guests run.

mod common;

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Lab;
use krvirt_net::dhcp::{DhcpServer, Lease};
use krvirt_net::firewall::{Firewall, Group, Port, Proto, Rule, Ruleset, Zone};
use krvirt_net::ipam::Pool;
use krvirt_net::link::Netlink;
use krvirt_net::{Cidr, Ipam, tap};

const TIMEOUT: Duration = Duration::from_secs(240);

struct Vm {
    name: String,
    tap: String,
    mac: String,
    ip: Ipv4Addr,
    log: PathBuf,
    sock: PathBuf,
    child: Child,
    seq: u32,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = tap::delete(&self.tap);
    }
}

impl Vm {
    fn console(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    fn wait_for(&mut self, needle: &str) {
        let start = Instant::now();
        loop {
            if self.console().contains(needle) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{}: QEMU exited ({st}) before {needle:?}\n{}",
                    self.name,
                    self.console()
                );
            }
            if start.elapsed() > TIMEOUT {
                panic!(
                    "{}: timed out waiting for {needle:?}\n{}",
                    self.name,
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn type_line(&self, line: &str) {
        let mut s = UnixStream::connect(&self.sock).expect("serial socket");
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Can this guest fetch `url_host:port`'s HTTP page containing `want`?
    fn fetch(&mut self, host: Ipv4Addr, port: u16, want: &str) -> bool {
        self.seq += 1;
        let n = self.seq;
        // R<n>=yes|no, spelled so the echoed command line never matches.
        self.type_line(&format!(
            "(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port} | grep -q '{want}') && echo R$(({n}+0))=yes || echo R$(({n}+0))=no"
        ));
        let (yes, no) = (format!("R{n}=yes"), format!("R{n}=no"));
        let start = Instant::now();
        loop {
            let c = self.console();
            if c.contains(&yes) {
                return true;
            }
            if c.contains(&no) {
                return false;
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!("{}: no answer to fetch #{n}\n{c}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn boot(dir: &Path, disk: &Path, name: &str, tap_name: &str, mac: &str, ip: Ipv4Addr) -> Vm {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let seed = d.join("cidata.img");
    krvirt_image::write_nocloud_seed(
        &seed,
        &krvirt_image::NoCloudSeed {
            instance_id: name.into(),
            local_hostname: name.into(),
            user_data: None,
            network_config: None,
        },
    )
    .unwrap();
    let log = d.join("console.log");
    let sock = d.join("serial.sock");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-accel", "tcg", "-machine", "q35", "-smp", "1", "-m", "128M",
        ])
        .args(["-display", "none", "-monitor", "none", "-nodefaults"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=ser0,path={},server=on,wait=off,logfile={}",
            sock.display(),
            log.display()
        ))
        .args(["-serial", "chardev:ser0"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            disk.display()
        ))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            seed.display()
        ))
        // Exactly what krvirt-hypervisor's NicBackend::Tap produces.
        .arg("-netdev")
        .arg(format!(
            "tap,id=hostnet-default,ifname={tap_name},script=no,downscript=no,vnet_hdr=on"
        ))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,id=net-default,netdev=hostnet-default,mac={mac}"
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (Debian qemu-system-x86) must be installed");
    Vm {
        name: name.into(),
        tap: tap_name.into(),
        mac: mac.into(),
        ip,
        log,
        sock,
        child,
        seq: 0,
    }
}

fn port(vm: &Vm, groups: &[&str]) -> Port {
    Port {
        tap: vm.tap.clone(),
        mac: vm.mac.clone(),
        ip: Some(vm.ip),
        groups: groups.iter().map(|s| s.to_string()).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_get_ipam_addresses_talk_and_obey_security_groups() {
    let mut lab = Lab::new();
    let nl = Netlink::connect().unwrap();
    let dir = lab.tempdir();
    let images = krvirt_image::build_demo_images(&dir.join("images"), &Default::default()).expect(
        "building the demo guest (linux-image-cloud-amd64, busybox-static, syslinux, mtools)",
    );
    let store =
        Arc::new(krvirt_store::embedded::EmbeddedStore::open(&dir.join("store.db")).unwrap());
    let ipam = Ipam::new(store);
    krvirt_net::nat::enable_ip_forward().unwrap();

    // Two networks, each its own bridge with the host on its gateway.
    let mut nets = Vec::new();
    let mut dhcp = Vec::new();
    for k in 0..2 {
        let (a, b) = lab.subnet(k);
        let subnet: Cidr = format!("10.{a}.{b}.0/24").parse().unwrap();
        let gw = Ipv4Addr::new(10, a, b, 1);
        let br = lab.name("br", k);
        lab.track_bridge(&br);
        nl.ensure_bridge(&br).await.unwrap();
        nl.ensure_address(&br, gw, 24).await.unwrap();
        let pool = Pool::new(&format!("net{k}"), subnet, gw, None).unwrap();
        let server = DhcpServer {
            bridge: br.clone(),
            subnet,
            router: Some(gw),
            dir: dir.join(format!("dhcp{k}")),
        };
        nets.push((br, pool, gw));
        dhcp.push(server);
    }
    struct StopDhcp(Vec<DhcpServer>);
    impl Drop for StopDhcp {
        fn drop(&mut self) {
            for s in &self.0 {
                let _ = s.stop();
            }
        }
    }
    let _stop = StopDhcp(dhcp.clone());

    // Three guests: a1, a2 on network 0, b1 on network 1.
    let specs = [("a1", 0usize), ("a2", 0), ("b1", 1)];
    let mut vms = Vec::new();
    for (i, (name, net)) in specs.iter().enumerate() {
        let uid = format!("{:04x}{:06x}-0000-4000-8000-{i:012}", lab.id, i);
        let tap_name = tap::tap_name(&uid, 0).unwrap();
        tap::create(&tap_name, 0).unwrap();
        nl.attach(&tap_name, &nets[*net].0).await.unwrap();
        let mac = format!(
            "02:6b:{:02x}:{:02x}:00:{i:02x}",
            lab.id >> 8 & 0xff,
            lab.id & 0xff
        );
        let ip = ipam
            .allocate(&nets[*net].1, &format!("{uid}/default"), Some(&mac))
            .await
            .unwrap();
        vms.push((uid, tap_name, mac, ip, *net, *name));
    }
    for (k, server) in dhcp.iter().enumerate() {
        let leases: Vec<Lease> = ipam
            .list(&format!("net{k}"))
            .await
            .unwrap()
            .into_iter()
            .map(|a| Lease {
                mac: a.mac.unwrap(),
                ip: a.ip,
            })
            .collect();
        server.set_leases(&leases).unwrap();
        server.ensure_running().unwrap();
    }
    let mut guests: Vec<Vm> = vms
        .iter()
        .map(|(_, t, mac, ip, _, name)| boot(&dir, &images.disk, name, t, mac, *ip))
        .collect();

    let table = lab.table();
    let mut fw = Firewall::new(&table).unwrap();
    let zones: Vec<Zone> = nets
        .iter()
        .map(|(br, _, _)| Zone {
            bridge: br.clone(),
            isolated: false,
        })
        .collect();
    let rules = |web_ingress: Vec<Rule>, a2_groups: &[&str], g: &[Vm]| Ruleset {
        remote: Vec::new(),
        groups: vec![Group {
            name: "default/web".into(),
            ingress: web_ingress,
            egress: vec![],
        }],
        ports: vec![port(&g[0], &[]), port(&g[1], a2_groups), port(&g[2], &[])],
        zones: zones.clone(),
    };
    fw.apply(&rules(vec![], &[], &guests)).unwrap();

    // DHCP: each guest gets exactly its IPAM address.
    for g in guests.iter_mut() {
        let want = format!("IP eth0 {}", g.ip);
        g.wait_for(&want);
    }
    let (a1_ip, a2_ip) = (guests[0].ip, guests[1].ip);
    // Same network: both ways.
    assert!(guests[0].fetch(a2_ip, 80, "krvirt-demo a2"), "a1 -> a2");
    assert!(guests[1].fetch(a1_ip, 80, "krvirt-demo a1"), "a2 -> a1");
    // Another network: no.
    assert!(
        !guests[2].fetch(a1_ip, 80, "krvirt-demo a1"),
        "b1 must not reach a1"
    );

    // Security group on a2, changed while it runs.
    fw.apply(&rules(vec![], &["default/web"], &guests)).unwrap();
    assert!(
        !guests[0].fetch(a2_ip, 80, "krvirt-demo a2"),
        "default deny ingress"
    );
    let allow80 = Rule {
        proto: Proto::Tcp,
        ports: Some((80, 80)),
        cidrs: vec![nets[0].1.subnet],
        remote_group: None,
    };
    fw.apply(&rules(vec![allow80], &["default/web"], &guests))
        .unwrap();
    assert!(
        guests[0].fetch(a2_ip, 80, "krvirt-demo a2"),
        "port 80 allowed"
    );
    fw.apply(&rules(vec![], &["default/web"], &guests)).unwrap();
    assert!(
        !guests[0].fetch(a2_ip, 80, "krvirt-demo a2"),
        "rule removed"
    );
    // a2 itself still reaches out (egress open, replies established).
    assert!(guests[1].fetch(a1_ip, 80, "krvirt-demo a1"), "a2 egress");

    // The host side of the network: a server on the gateway address.
    let gw = nets[0].2;
    let listener = std::net::TcpListener::bind((gw, 0)).unwrap();
    let host_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::Read;
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost-side-server\n");
        }
    });
    assert!(
        guests[0].fetch(gw, host_port, "host-side-server"),
        "guest -> gateway server"
    );

    // Nobody was restarted: every guest is still the same QEMU process.
    for g in guests.iter_mut() {
        assert!(g.child.try_wait().unwrap().is_none(), "{} exited", g.name);
    }
}
