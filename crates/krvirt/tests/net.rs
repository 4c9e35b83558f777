//! Networks end to end (#4): KubeVirt manifests with `pod` and `multus`
//! networks, through the real API, controllers and agent, onto real
//! bridges, taps, dnsmasq and nftables, with demo guests under TCG.
//!
//! Three guests, reused across every assertion:
//! - `a1`: NICs on Networks `blue` (eth0) and `red` (eth1);
//! - `a2`: NICs on the pod network (the `default` NAT Network, eth0) and
//!   `blue` (eth1), its blue NIC in SecurityGroup `web`;
//! - `r1`: one NIC on `red`.
//!
//! Traffic only goes between these guests and this instance's own bridges.

mod common;

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::Instance;
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(240);

fn need_root() {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the network e2e test creates bridges, taps and nftables tables: run it as root"
    );
    for bin in ["ip", "nft", "dnsmasq"] {
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {bin}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(ok, "{bin} is missing (scripts/packages.txt installs it)");
    }
}

/// Two /24s of our own, derived from the process id (parallel runs differ),
/// in 10.160.0.0 - 10.199.255.0 (the default Network uses 10.200+).
fn subnets() -> [(u8, u8); 2] {
    let id = std::process::id();
    let a = (160 + (id / 256) % 40) as u8;
    let b = (id % 128) as u8 * 2;
    [(a, b), (a, b + 1)]
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn network(name: &str, bridge: &str, (a, b): (u8, u8), range: Option<(u8, u8)>) -> String {
    let dhcp = range
        .map(|(x, y)| {
            format!("  dhcp:\n    rangeStart: 10.{a}.{b}.{x}\n    rangeEnd: 10.{a}.{b}.{y}\n")
        })
        .unwrap_or_default();
    format!(
        "apiVersion: krvirt.io/v1\nkind: Network\nmetadata:\n  name: {name}\nspec:\n  type: bridge\n  subnet: 10.{a}.{b}.0/24\n  bridge: {bridge}\n{dhcp}"
    )
}

/// A "LAN host" on the segment a `bridge` Network's uplink leads to: a
/// namespace behind a veth pair whose host end is the uplink, running an
/// HTTP server. Removed on drop.
struct LanHost {
    ns: String,
    uplink: String,
    server: Option<std::process::Child>,
}

impl LanHost {
    fn new(id: u32, (a, b): (u8, u8)) -> LanHost {
        let ns = format!("kvlan{id}");
        let uplink = format!("kvtu{id}");
        let sh = |args: &[&str]| {
            let o = std::process::Command::new(args[0])
                .args(&args[1..])
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        let mut lan = LanHost {
            ns: ns.clone(),
            uplink: uplink.clone(),
            server: None,
        };
        sh(&["ip", "netns", "add", &ns]);
        sh(&[
            "ip", "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        sh(&["ip", "link", "set", &uplink, "up"]);
        let addr = format!("10.{a}.{b}.250/24");
        sh(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        let www = std::env::temp_dir().join(format!("kvlan-www-{id}"));
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("index.html"), "lan-host\n").unwrap();
        lan.server = Some(
            std::process::Command::new("ip")
                .args([
                    "netns", "exec", &ns, "busybox", "httpd", "-f", "-p", "80", "-h",
                ])
                .arg(&www)
                .spawn()
                .unwrap(),
        );
        lan
    }
}

impl Drop for LanHost {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.uplink])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .output();
    }
}

fn security_group(ingress: &str) -> String {
    format!(
        "apiVersion: krvirt.io/v1\nkind: SecurityGroup\nmetadata:\n  name: web\n  namespace: default\nspec:\n  ingress:\n{ingress}"
    )
}

/// A VMI with the demo disk and one interface per (name, network) pair;
/// `pod` is the pod network, anything else a multus network of that name.
fn vmi(name: &str, nics: &[(&str, &str)], annotations: &str) -> String {
    let mut ifaces = String::new();
    let mut nets = String::new();
    for (iface, net) in nics {
        if *net == "pod" {
            ifaces.push_str(&format!(
                "      - name: {iface}\n        masquerade: {{}}\n"
            ));
            nets.push_str(&format!("  - name: {iface}\n    pod: {{}}\n"));
        } else {
            ifaces.push_str(&format!(
                "      - name: {iface}\n        bridge: {{}}\n        model: virtio\n"
            ));
            nets.push_str(&format!(
                "  - name: {iface}\n    multus:\n      networkName: default/{net}\n"
            ));
        }
    }
    format!(
        r#"apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: {name}
  namespace: default
  annotations:
    {annotations}
spec:
  terminationGracePeriodSeconds: 0
  domain:
    memory:
      guest: 128Mi
    devices:
      disks:
      - name: containerdisk
        disk: {{bus: virtio}}
      - name: cloudinitdisk
        disk: {{bus: virtio}}
      interfaces:
{ifaces}  networks:
{nets}  volumes:
  - name: containerdisk
    containerDisk:
      image: quay.io/kubevirt/cirros-container-disk-demo
  - name: cloudinitdisk
    cloudInitNoCloud:
      userData: |
        #!/bin/sh
        echo net-test
"#
    )
}

/// A running guest, driven over its serial console.
struct Guest {
    name: String,
    uid: String,
    pid: u32,
    sock: std::path::PathBuf,
    seq: u32,
}

impl Guest {
    fn type_line(&self, line: &str) {
        let mut s = UnixStream::connect(&self.sock)
            .unwrap_or_else(|e| panic!("{}: serial socket: {e}", self.name));
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Run `cond` in the guest's shell; true if it succeeded.
    async fn check(&mut self, inst: &Instance, cond: &str) -> bool {
        self.seq += 1;
        let n = self.seq;
        // R<n>=yes|no, spelled so the echoed command line never matches.
        self.type_line(&format!(
            "({cond}) >/dev/null 2>&1 && echo R$(({n}+0))=yes || echo R$(({n}+0))=no"
        ));
        let (yes, no) = (format!("R{n}=yes"), format!("R{n}=no"));
        let start = Instant::now();
        loop {
            let c = inst.console_log(&self.name).await;
            if c.contains(&yes) {
                return true;
            }
            if c.contains(&no) {
                return false;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{}: no answer to command #{n} ({cond})\n{}",
                self.name,
                common::tail(&c, 30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Can this guest fetch `host`'s demo page (which names `want`)?
    async fn fetch(&mut self, inst: &Instance, host: Ipv4Addr, port: u16, want: &str) -> bool {
        self.check(
            inst,
            &format!(
                "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port} | grep -q '{want}'"
            ),
        )
        .await
    }
}

/// The address the controller assigned to `iface` of VMI `v`.
fn assigned(v: &Value, iface: &str) -> (Ipv4Addr, Ipv4Addr, String) {
    let text = v["metadata"]["annotations"]["krvirt.io/interfaces"]
        .as_str()
        .unwrap_or_else(|| panic!("no krvirt.io/interfaces annotation: {v}"));
    let list: Value = serde_json::from_str(text).unwrap();
    let a = list
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == iface)
        .unwrap_or_else(|| panic!("no assignment for {iface}: {list}"));
    (
        a["ip"].as_str().unwrap().parse().unwrap(),
        a["gateway"].as_str().unwrap().parse().unwrap(),
        a["mac"].as_str().unwrap().to_string(),
    )
}

async fn boot(inst: &Instance, name: &str) -> (Guest, Value) {
    let (uid, pid) = inst.running_vmi(name, None).await;
    let v = inst.vmi(name).await.unwrap();
    let sock = inst
        .data_dir()
        .join("run/vmi")
        .join(&uid)
        .join("serial.sock");
    (
        Guest {
            name: name.into(),
            uid,
            pid,
            sock,
            seq: 0,
        },
        v,
    )
}

fn tap_of(uid: &str, index: usize) -> String {
    let hex: String = uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(10)
        .collect();
    format!("kvt{hex}{index:x}")
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn nft_table_exists(family: &str, table: &str) -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", family, table])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_dhcp_isolation_security_groups_nat_and_restart() {
    need_root();
    let mut inst = Instance::start_with_network().await;
    let dir = inst.dir.path().to_path_buf();
    let [blue, red] = subnets();
    let id = std::process::id() % 100_000;
    let (blue_br, red_br) = (format!("kvtb{id}"), format!("kvtr{id}"));

    // The pod network is a real NAT Network, created by `krvirt up`.
    let default = inst.ok(&["get", "networks", "default", "-o", "json"]);
    let default: Value = serde_json::from_str(&default).unwrap();
    assert_eq!(default["spec"]["type"], "nat", "{default}");

    inst.ok(&[
        "apply",
        "-f",
        &write(&dir, "blue.yaml", &network("blue", &blue_br, blue, None)),
    ]);
    // red has an uplink: a host interface leading to a "LAN" with a host
    // at .250 that the agent enslaves to red's bridge.
    let lan = LanHost::new(id, red);
    let red_yaml = format!(
        "{}  uplink: {}\n",
        network("red", &red_br, red, Some((10, 11))),
        lan.uplink
    );
    inst.ok(&["apply", "-f", &write(&dir, "red.yaml", &red_yaml)]);
    // `web` allows nothing on port 80 yet (only ICMP).
    let sg_closed = security_group("  - protocol: icmp\n");
    let sg_open = security_group(&format!(
        "  - protocol: icmp\n  - protocol: tcp\n    port: 80\n    cidrs: [\"10.{}.{}.0/24\"]\n",
        blue.0, blue.1
    ));
    inst.ok(&["apply", "-f", &write(&dir, "sg.yaml", &sg_closed)]);
    for (name, nics, ann) in [
        ("a1", vec![("eth-blue", "blue"), ("eth-red", "red")], "{}"),
        (
            "a2",
            vec![("default", "pod"), ("eth-blue", "blue")],
            "krvirt.io/security-groups.eth-blue: web",
        ),
        ("r1", vec![("eth-red", "red")], "{}"),
    ] {
        let ann = if ann == "{}" {
            "krvirt.io/test: net"
        } else {
            ann
        };
        let f = write(&dir, &format!("{name}.yaml"), &vmi(name, &nics, ann));
        inst.ok(&["apply", "-f", &f]);
    }
    let (mut a1, v1) = boot(&inst, "a1").await;
    let (mut a2, v2) = boot(&inst, "a2").await;
    let (mut r1, vr) = boot(&inst, "r1").await;

    // Addresses: from IPAM, handed out by dnsmasq, in status.interfaces.
    let (a1_blue, _, a1_mac) = assigned(&v1, "eth-blue");
    let (a1_red, _, _) = assigned(&v1, "eth-red");
    let (a2_pod, pod_gw, _) = assigned(&v2, "default");
    let (a2_blue, _, _) = assigned(&v2, "eth-blue");
    let (r1_red, _, _) = assigned(&vr, "eth-red");
    assert_eq!(a1_blue.octets()[..3], [10, blue.0, blue.1]);
    assert_eq!(r1_red.octets()[..3], [10, red.0, red.1]);
    assert_eq!(
        v1["status"]["interfaces"][0]["mac"].as_str(),
        Some(a1_mac.as_str()),
        "{}",
        v1["status"]
    );
    for (g, ips) in [
        ("a1", vec![a1_blue, a1_red]),
        ("a2", vec![a2_pod, a2_blue]),
        ("r1", vec![r1_red]),
    ] {
        for ip in ips {
            inst.until(&format!("{g} bound {ip} by DHCP"), BOOT, || async {
                let log = inst.console_log(g).await;
                (log.contains(&format!("IP eth0 {ip}")) || log.contains(&format!("IP eth1 {ip}")))
                    .then_some(())
            })
            .await;
        }
    }
    // The agent confirms the lease from dnsmasq's lease file.
    inst.until(
        "a1's lease confirmed in status",
        Duration::from_secs(60),
        || async {
            let v = inst.vmi("a1").await?;
            let i = &v["status"]["interfaces"][0];
            (i["ipAddress"] == a1_blue.to_string()
                && i["infoSource"].as_str()?.contains("dhcp-lease"))
            .then_some(())
        },
    )
    .await;

    // Same network: a2 reaches a1; a1 -> a2 is closed by `web`.
    assert!(
        a2.fetch(&inst, a1_blue, 80, "krvirt-demo a1").await,
        "a2 -> a1"
    );
    assert!(
        !a1.fetch(&inst, a2_blue, 80, "krvirt-demo a2").await,
        "web: port 80 closed"
    );
    // The rule is added while a2 runs: open.
    inst.ok(&["apply", "-f", &write(&dir, "sg.yaml", &sg_open)]);
    let mut open = false;
    for _ in 0..10 {
        if a1.fetch(&inst, a2_blue, 80, "krvirt-demo a2").await {
            open = true;
            break;
        }
    }
    assert!(open, "web: port 80 allowed after the rule was added");
    // Anti-spoofing: a1 sending from an address that is not its own is
    // dropped at its tap; with its own address again it gets through.
    let fake = Ipv4Addr::new(10, blue.0, blue.1, 250);
    assert!(
        a1.check(
            &inst,
            &format!("ip addr flush dev eth0 && ip addr add {fake}/24 dev eth0")
        )
        .await
    );
    assert!(
        !a1.fetch(&inst, a2_blue, 80, "krvirt-demo a2").await,
        "spoofed source dropped"
    );
    assert!(
        a1.check(
            &inst,
            &format!("ip addr flush dev eth0 && ip addr add {a1_blue}/24 dev eth0")
        )
        .await
    );
    assert!(
        a1.fetch(&inst, a2_blue, 80, "krvirt-demo a2").await,
        "own source again"
    );
    // Two NICs: a1 also reaches red.
    assert!(
        a1.fetch(&inst, r1_red, 80, "krvirt-demo r1").await,
        "a1 -> r1 on red"
    );
    // red's uplink is a port of its bridge: r1 reaches the LAN host, blue
    // does not.
    assert_eq!(
        std::fs::read_link(format!("/sys/class/net/{}/master", lan.uplink))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())),
        Some(red_br.clone()),
        "uplink enslaved to red's bridge"
    );
    let lan_host = Ipv4Addr::new(10, red.0, red.1, 250);
    assert!(
        r1.fetch(&inst, lan_host, 80, "lan-host").await,
        "r1 -> the LAN host behind red's uplink"
    );
    assert!(
        !a2.fetch(&inst, lan_host, 80, "lan-host").await,
        "blue -> the LAN host behind red's uplink"
    );
    // Another network: r1 cannot reach blue.
    assert!(
        !r1.fetch(&inst, a2_blue, 80, "krvirt-demo a2").await,
        "red -> blue"
    );
    assert!(
        !r1.fetch(&inst, a1_blue, 80, "krvirt-demo a1").await,
        "red -> blue (a1)"
    );
    // The rule goes again: closed, without a restart.
    inst.ok(&["apply", "-f", &write(&dir, "sg.yaml", &sg_closed)]);
    let mut closed = false;
    for _ in 0..10 {
        if !a1.fetch(&inst, a2_blue, 80, "krvirt-demo a2").await {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "web: port 80 closed again after the rule was removed"
    );

    // The pod network: a2 reaches a server on its gateway (the host side).
    let listener = std::net::TcpListener::bind((pod_gw, 0))
        .unwrap_or_else(|e| panic!("bind {pod_gw}: {e} (the default bridge carries it)"));
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::Read;
        for mut s in listener.incoming().take(2).flatten() {
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost-side-server\n");
        }
    });
    assert!(
        a2.fetch(&inst, pod_gw, port, "host-side-server").await,
        "a2 -> server on the pod network's gateway"
    );

    // kill -9 of krvirt: taps, rules, dnsmasq and leases stay; after the
    // restart the same guests run on and the rules hold.
    let host: Value = serde_json::from_slice(
        &std::fs::read(inst.data_dir().join("net/host.json")).expect("net/host.json"),
    )
    .unwrap();
    let table = host["table"].as_str().unwrap().to_string();
    let taps = [tap_of(&a1.uid, 0), tap_of(&a1.uid, 1), tap_of(&a2.uid, 1)];
    let leases = std::fs::read_to_string(inst.data_dir().join("net/dhcp/blue/leases")).unwrap();
    assert!(leases.contains(&a1_mac), "{leases}");
    inst.kill9();
    for t in &taps {
        assert!(link_exists(t), "tap {t} survives krvirt's death");
    }
    assert!(nft_table_exists("inet", &table) && nft_table_exists("bridge", &table));
    let dnsmasq_pid: i32 =
        std::fs::read_to_string(inst.data_dir().join("net/dhcp/blue/dnsmasq.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    assert!(
        Path::new(&format!("/proc/{dnsmasq_pid}")).exists(),
        "dnsmasq survives"
    );
    inst.restart().await;
    for g in [&a1, &a2, &r1] {
        let (uid, pid) = inst.running_vmi(&g.name, None).await;
        assert_eq!(
            (uid.as_str(), pid),
            (g.uid.as_str(), g.pid),
            "{} kept running",
            g.name
        );
    }
    let after = std::fs::read_to_string(inst.data_dir().join("net/dhcp/blue/leases")).unwrap();
    assert!(after.contains(&a1_mac), "lease kept: {after}");
    assert!(
        a2.fetch(&inst, a1_blue, 80, "krvirt-demo a1").await,
        "a2 -> a1 after restart"
    );
    assert!(
        !a1.fetch(&inst, a2_blue, 80, "krvirt-demo a2").await,
        "web still closed after restart"
    );
    assert!(
        !r1.fetch(&inst, a2_blue, 80, "krvirt-demo a2").await,
        "isolation after restart"
    );

    // Red hands out two addresses (a1 and r1 hold them): r2 waits for one.
    let f = write(
        &dir,
        "r2.yaml",
        &vmi("r2", &[("eth-red", "red")], "krvirt.io/test: net"),
    );
    inst.ok(&["apply", "-f", &f]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = inst.vmi("r2").await.unwrap();
    assert!(
        v["metadata"]["annotations"]["krvirt.io/interfaces"].is_null(),
        "red is full, r2 must wait: {v}"
    );
    // Deleting a VMI removes its tap and releases its address.
    let r1_tap = tap_of(&r1.uid, 0);
    assert!(link_exists(&r1_tap));
    inst.ok(&["delete", "vmi", "r1"]);
    inst.until("r1 gone", Duration::from_secs(60), || async {
        inst.vmi("r1").await.is_none().then_some(())
    })
    .await;
    inst.until("r1's tap removed", Duration::from_secs(30), || async {
        (!link_exists(&r1_tap)).then_some(())
    })
    .await;
    // r1's address is free again, and r2 gets it.
    let v = inst
        .until("r2 assigned", Duration::from_secs(60), || async {
            let v = inst.vmi("r2").await?;
            v["metadata"]["annotations"]["krvirt.io/interfaces"].as_str()?;
            Some(v)
        })
        .await;
    assert_eq!(
        assigned(&v, "eth-red").0,
        r1_red,
        "r2 reuses r1's released address"
    );
    inst.ok(&["delete", "vmi", "r2"]);
}
