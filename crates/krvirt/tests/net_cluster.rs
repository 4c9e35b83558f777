//! Networks across hosts (#6): two hosts (network namespaces with their own
//! agents, see tests/common/cluster.rs) and demo guests under TCG on
//! krvirt Networks. A Network whose VMIs are on both hosts becomes one L2
//! segment over VXLAN (a `kvx<VNI>` port on each host's bridge, flooding
//! to the other host); a guest keeps its address and MAC through a live
//! migration and stays reachable; a guest on another Network with the
//! SAME subnet, on the other host, is not reachable (separate VNIs).
//!
//! Guests are driven over their serial sockets in the hosts' run
//! directories and read through their console log files there (the
//! server cannot reach a remote host's console).

mod common;

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Host};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(300);

fn need_tools() {
    for bin in ["ip", "nft", "dnsmasq", "bridge"] {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {bin}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(ok, "{bin} is missing (scripts/packages.txt installs it)");
    }
}

fn apply(c: &Cluster, file: &str, yaml: &str) {
    let f = c.server.dir.path().join(file);
    std::fs::write(&f, yaml).unwrap();
    c.server.ok(&["apply", "-f", f.to_str().unwrap()]);
}

fn network(name: &str, subnet: &str, range: (&str, &str)) -> String {
    format!(
        "apiVersion: krvirt.io/v1\nkind: Network\nmetadata:\n  name: {name}\nspec:\n  type: isolated\n  subnet: {subnet}\n  dhcp:\n    rangeStart: {}\n    rangeEnd: {}\n",
        range.0, range.1
    )
}

/// A VMI with the demo disk and one NIC (eth0) on Network `net`.
fn vmi(name: &str, net: &str, host: Option<&str>) -> String {
    let selector = host
        .map(|h| format!("  nodeSelector:\n    kubernetes.io/hostname: {h}\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: {name}
  namespace: default
spec:
{selector}  terminationGracePeriodSeconds: 0
  domain:
    memory:
      guest: 128Mi
    devices:
      disks:
      - name: containerdisk
        disk: {{bus: virtio}}
      interfaces:
      - name: nic
        bridge: {{}}
        model: virtio
  networks:
  - name: nic
    multus:
      networkName: {net}
  volumes:
  - name: containerdisk
    containerDisk:
      image: quay.io/kubevirt/cirros-container-disk-demo
"#
    )
}

/// A guest, driven over the serial socket of its current host.
struct Guest {
    name: String,
    uid: String,
    /// Its run directory on the host it runs on now.
    dir: PathBuf,
    seq: u32,
}

impl Guest {
    fn console(&self) -> String {
        // Lossy: one byte the guest printed that is not UTF-8 must not hide
        // the whole log.
        std::fs::read(self.dir.join("console.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The guest now runs on `host` (after a migration).
    fn moved_to(&mut self, host: &Host) {
        self.dir = host.data_dir.join("run/vmi").join(&self.uid);
    }

    fn type_line(&self, line: &str) {
        let sock = self.dir.join("serial.sock");
        let mut s = UnixStream::connect(&sock)
            .unwrap_or_else(|e| panic!("{}: serial socket {}: {e}", self.name, sock.display()));
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Run `cond` in the guest's shell; true if it succeeded.
    async fn check(&mut self, cond: &str) -> bool {
        self.seq += 1;
        let n = self.seq;
        // R<n>=yes|no, spelled so the echoed command line never matches.
        self.type_line(&format!(
            "({cond}) >/dev/null 2>&1 && echo R$(({n}+0))=yes || echo R$(({n}+0))=no"
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
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{}: no answer to command #{n} ({cond})\n{}",
                self.name,
                common::tail(&c, 30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Does `ip` answer pings from this guest (a few tries: ARP and the
    /// peers' forwarding tables settle)?
    async fn pings(&mut self, ip: Ipv4Addr) -> bool {
        self.check(&format!("ping -c 2 -W 2 {ip} || ping -c 3 -W 3 {ip}"))
            .await
    }
}

/// The address and MAC the controller assigned to VMI `v`'s NIC, and the
/// Network's VNI.
fn assigned(v: &Value) -> (Ipv4Addr, String, Option<u64>) {
    let text = v["metadata"]["annotations"]["krvirt.io/interfaces"]
        .as_str()
        .unwrap_or_else(|| panic!("no krvirt.io/interfaces annotation: {v}"));
    let list: Value = serde_json::from_str(text).unwrap();
    let a = &list[0];
    (
        a["ip"].as_str().unwrap().parse().unwrap(),
        a["mac"].as_str().unwrap().to_string(),
        a["vni"].as_u64(),
    )
}

async fn running(c: &Cluster, name: &str) -> (Guest, Value, String) {
    let (uid, _pid) = c.server.running_vmi(name, None).await;
    let v = c.server.vmi(name).await.unwrap();
    let node = c.node_of(name).await.expect("bound to a host");
    let dir = c.host(&node).data_dir.join("run/vmi").join(&uid);
    (
        Guest {
            name: name.into(),
            uid,
            dir,
            seq: 0,
        },
        v,
        node,
    )
}

/// `ip -n NS ARGS` output (empty when it fails, e.g. no such device).
fn ip_in(ns: &str, args: &[&str]) -> String {
    Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The flood list (all-zero FDB entries) of `dev` in `ns`: peer addresses.
fn flood_peers(ns: &str, dev: &str) -> Vec<String> {
    let out = Command::new("bridge")
        .args(["-n", ns, "fdb", "show", "dev", dev])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut peers: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("00:00:00:00:00:00 "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "dst")?;
            w.next().map(str::to_string)
        })
        .collect();
    peers.sort();
    peers
}

async fn migrate(c: &Cluster, name: &str, to: &str) {
    let out = c
        .server
        .ok(&["migrate", name, "--to", to, "--wait", "--timeout", "240s"]);
    assert!(out.contains(&format!("to {to}")), "{out}");
    assert_eq!(c.node_of(name).await.as_deref(), Some(to));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_spans_hosts_over_vxlan_and_survives_migration() {
    need_tools();
    let c = Cluster::start(2).await;
    // Two Networks with the SAME subnet: only their VNIs keep them apart.
    let k = std::process::id() % 250;
    let subnet = format!("10.77.{k}.0/24");
    let ip = |last: u8| format!("10.77.{k}.{last}");
    apply(
        &c,
        "blue.yaml",
        &network("blue", &subnet, (&ip(10), &ip(20))),
    );
    apply(
        &c,
        "green.yaml",
        &network("green", &subnet, (&ip(100), &ip(120))),
    );
    // Each Network gets its own VNI as it appears (no VMI yet), in its
    // status; the VMIs' assignments carry it.
    let vni_of = |n: &'static str| {
        let c = &c;
        async move {
            c.until(&format!("{n}'s VNI"), Duration::from_secs(60), || async {
                c.server
                    .get(&format!("/apis/krvirt.io/v1/networks/{n}"))
                    .await
                    .ok()?["status"]["vni"]
                    .as_u64()
            })
            .await
        }
    };
    let (blue_vni, green_vni) = (vni_of("blue").await, vni_of("green").await);
    assert_ne!(blue_vni, green_vni);
    // a on host0; g (green) on host1; b wherever the scheduler puts it.
    apply(&c, "a.yaml", &vmi("a", "blue", Some("host0")));
    apply(&c, "g.yaml", &vmi("g", "green", Some("host1")));
    apply(&c, "b.yaml", &vmi("b", "blue", None));

    let (mut a, va, a_node) = running(&c, "a").await;
    let (mut g, vg, g_node) = running(&c, "g").await;
    let (mut b, vb, b_node) = running(&c, "b").await;
    assert_eq!((a_node.as_str(), g_node.as_str()), ("host0", "host1"));
    let (a_ip, a_mac, a_vni) = assigned(&va);
    let (b_ip, b_mac, b_vni) = assigned(&vb);
    let (g_ip, _, g_vni) = assigned(&vg);
    assert_eq!((a_vni, b_vni), (Some(blue_vni), Some(blue_vni)));
    assert_eq!(g_vni, Some(green_vni));
    for (guest, want) in [(&a, a_ip), (&b, b_ip), (&g, g_ip)] {
        c.until(
            &format!("{} bound {want} by DHCP", guest.name),
            BOOT,
            || async {
                guest
                    .console()
                    .contains(&format!("IP eth0 {want}"))
                    .then_some(())
            },
        )
        .await;
    }

    // b on the other host than a (migrate it there if the scheduler put
    // them together: that is a migration too).
    if b_node == "host0" {
        migrate(&c, "b", "host1").await;
        b.moved_to(c.host("host1"));
    }
    let (h0, h1) = (c.host("host0"), c.host("host1"));
    let blue_dev = format!("kvx{blue_vni}");
    // Each host floods blue to the other; green has no VMI on host0, so
    // no green tunnel anywhere.
    for (me, peer) in [(h0, h1), (h1, h0)] {
        c.until(
            &format!("{}'s {blue_dev} flooding to {}", me.name, peer.ip),
            Duration::from_secs(60),
            || async { (flood_peers(&me.ns, &blue_dev) == vec![peer.ip.clone()]).then_some(()) },
        )
        .await;
    }
    let details = ip_in(&h0.ns, &["-d", "link", "show", &blue_dev]);
    assert!(
        details.contains(&format!("vxlan id {blue_vni}"))
            && details.contains(&format!("local {}", h0.ip))
            && details.contains("dstport 4789"),
        "{details}"
    );
    assert!(
        details.contains("master "),
        "a port of blue's bridge: {details}"
    );
    assert!(
        ip_in(&h1.ns, &["link", "show", &format!("kvx{green_vni}")]).is_empty(),
        "green is on one host only: no tunnel"
    );
    // One gateway MAC for blue on both hosts (a migrated guest's cached
    // gateway stays valid), derived from the Network.
    let blue_bridge = {
        let text = va["metadata"]["annotations"]["krvirt.io/interfaces"]
            .as_str()
            .unwrap();
        let list: Value = serde_json::from_str(text).unwrap();
        list[0]["bridge"].as_str().unwrap().to_string()
    };
    let mac_of = |ns: &str| {
        let out = ip_in(ns, &["link", "show", &blue_bridge]);
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no MAC for {blue_bridge} in {ns}: {out}"))
            .to_string()
    };
    assert_eq!(mac_of(&h0.ns), mac_of(&h1.ns));
    assert_eq!(
        mac_of(&h0.ns),
        krvirt_api::network::gateway_mac("blue"),
        "blue's gateway MAC"
    );

    eprintln!("blue (VNI {blue_vni}) spans host0 and host1; green is VNI {green_vni}");
    // Across hosts: a reaches b, and has b's MAC for b's address.
    assert!(a.pings(b_ip).await, "a (host0) -> b (host1) over VXLAN");
    assert!(
        a.check(&format!(
            "grep '^{b_ip} ' /proc/net/arp | grep -qi '{b_mac}'"
        ))
        .await,
        "a's ARP entry for b"
    );
    assert!(b.pings(a_ip).await, "b -> a");
    // Full-size frames (1500-byte packets) cross too: the tunnel keeps
    // the guests' MTU (the underlay fragments the outer packets).
    assert!(
        a.check(&format!("ping -c 3 -W 3 -s 1472 {b_ip}")).await,
        "a -> b with 1500-byte packets"
    );
    // DHCP stays per host: a fresh DHCP exchange of a's (broadcast, while
    // blue spans both hosts, whose bridges both hold the gateway address)
    // is answered by host0's dnsmasq; host1's never hears it.
    let dhcp_log = |h: &Host| {
        std::fs::read_to_string(h.data_dir.join("net/dhcp/blue/dnsmasq.log"))
            .unwrap_or_default()
            .to_lowercase()
    };
    let heard_before = dhcp_log(h0).matches(&a_mac).count();
    assert!(
        a.check("udhcpc -n -q -t 3 -T 2 -i eth0 -s /bin/true").await,
        "a's DHCP exchange"
    );
    c.until(
        "host0's dnsmasq answering a again",
        Duration::from_secs(30),
        || async { (dhcp_log(h0).matches(&a_mac).count() > heard_before).then_some(()) },
    )
    .await;
    assert!(
        !dhcp_log(h1).contains(&a_mac),
        "host1's dnsmasq heard a's DHCP over the tunnel:\n{}",
        dhcp_log(h1)
    );
    // Isolation across hosts: green's guest, same subnet, other VNI.
    assert!(!a.pings(g_ip).await, "a (blue) must not reach g (green)");
    assert!(!g.pings(a_ip).await, "g (green) must not reach a (blue)");

    // b migrates to a's host: same IP and MAC, still reachable (QEMU's
    // self-announce moves b's MAC in host0's bridge from the tunnel to
    // b's tap), and the tunnels go (blue is on one host only now).
    migrate(&c, "b", "host0").await;
    b.moved_to(h0);
    eprintln!("b migrated to host0");
    let vb2 = c.server.vmi("b").await.unwrap();
    let (b_ip2, b_mac2, _) = assigned(&vb2);
    assert_eq!((b_ip2, b_mac2.as_str()), (b_ip, b_mac.as_str()));
    assert_eq!(
        vb2["status"]["interfaces"][0]["mac"].as_str(),
        Some(b_mac.as_str()),
        "{}",
        vb2["status"]
    );
    assert!(a.pings(b_ip).await, "a -> b after b's migration");
    assert!(
        a.check(&format!(
            "grep '^{b_ip} ' /proc/net/arp | grep -qi '{b_mac}'"
        ))
        .await,
        "same MAC for b"
    );
    assert!(b.pings(a_ip).await, "b -> a on its new host");
    assert!(!b.pings(g_ip).await, "b (blue) must not reach g (green)");
    for h in [h0, h1] {
        c.until(
            &format!("{}'s {blue_dev} removed", h.name),
            Duration::from_secs(60),
            || async {
                ip_in(&h.ns, &["link", "show", &blue_dev])
                    .is_empty()
                    .then_some(())
            },
        )
        .await;
    }
    // Back across: the tunnels return and b is reachable from a again.
    migrate(&c, "b", "host1").await;
    b.moved_to(h1);
    eprintln!("b migrated back to host1");
    assert!(a.pings(b_ip).await, "a -> b after b went back to host1");
    assert_eq!(flood_peers(&h0.ns, &blue_dev), vec![h1.ip.clone()]);

    // Level-triggered: a tunnel removed behind the agent's back returns.
    ip_in(&h1.ns, &["link", "del", &blue_dev]);
    c.until(
        &format!("host1's {blue_dev} restored"),
        Duration::from_secs(60),
        || async { (flood_peers(&h1.ns, &blue_dev) == vec![h0.ip.clone()]).then_some(()) },
    )
    .await;
    assert!(a.pings(b_ip).await, "a -> b after the repair");

    eprintln!("host1's tunnel repaired");
    // Security groups hold for traffic arriving over the tunnel: b in a
    // group that allows only TCP 80 no longer answers a's pings; once the
    // group allows ICMP it does again.
    let sg = |ingress: &str| {
        format!(
            "apiVersion: krvirt.io/v1\nkind: SecurityGroup\nmetadata:\n  name: web\n  namespace: default\nspec:\n  ingress:\n{ingress}"
        )
    };
    apply(&c, "sg.yaml", &sg("  - protocol: tcp\n    port: 80\n"));
    let (code, body) = c
        .server
        .send(
            reqwest::Method::PATCH,
            "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances/b",
            "application/merge-patch+json",
            br#"{"metadata": {"annotations": {"krvirt.io/security-groups": "web"}}}"#.to_vec(),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(90);
    while a.pings(b_ip).await {
        assert!(
            Instant::now() < deadline,
            "b's group (TCP 80 only) still lets a's pings in over VXLAN\n{}",
            c.logs()
        );
    }
    apply(
        &c,
        "sg.yaml",
        &sg("  - protocol: tcp\n    port: 80\n  - protocol: icmp\n"),
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    while !a.pings(b_ip).await {
        assert!(
            Instant::now() < deadline,
            "b's group allows ICMP now, yet a's pings do not arrive\n{}",
            c.logs()
        );
    }

    // A group as the remote side counts its members on every host: web
    // allows ICMP only from group `clients`; a (host0) is refused at b
    // (host1) until a joins `clients`.
    apply(
        &c,
        "clients.yaml",
        "apiVersion: krvirt.io/v1\nkind: SecurityGroup\nmetadata:\n  name: clients\n  namespace: default\nspec: {}\n",
    );
    apply(
        &c,
        "sg.yaml",
        &sg("  - protocol: tcp\n    port: 80\n  - protocol: icmp\n    securityGroup: clients\n"),
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    while a.pings(b_ip).await {
        assert!(
            Instant::now() < deadline,
            "a is not in `clients`, yet its pings reach b\n{}",
            c.logs()
        );
    }
    let (code, body) = c
        .server
        .send(
            reqwest::Method::PATCH,
            "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances/a",
            "application/merge-patch+json",
            br#"{"metadata": {"annotations": {"krvirt.io/security-groups": "clients"}}}"#.to_vec(),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !a.pings(b_ip).await {
        assert!(
            Instant::now() < deadline,
            "a (host0) joined `clients`, yet b's host does not let its pings in\n{}",
            c.logs()
        );
    }
}
