//! Real bridges, taps, namespaces, dnsmasq and nftables (root).

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;

use common::{Lab, sh};
use krvirt_net::dhcp::{DhcpServer, Lease};
use krvirt_net::firewall::{self, Group, Port, Proto, Rule, Ruleset, Zone};
use krvirt_net::ipam::Pool;
use krvirt_net::link::{self, Netlink};
use krvirt_net::{Cidr, Ipam, tap};

async fn bridge(lab: &mut Lab, nl: &Netlink, k: u32, gw: Option<Ipv4Addr>) -> String {
    let name = lab.name("br", k);
    lab.track_bridge(&name);
    nl.ensure_bridge(&name).await.expect("bridge");
    if let Some(gw) = gw {
        nl.ensure_address(&name, gw, 24).await.expect("address");
    }
    name
}

fn port(g: &common::Guest, groups: &[&str]) -> Port {
    Port {
        tap: g.port.clone(),
        mac: g.mac.clone(),
        ip: Some(g.ip),
        groups: groups.iter().map(|s| s.to_string()).collect(),
    }
}

#[tokio::test]
async fn taps_are_created_owned_attached_and_swept() {
    let mut lab = Lab::new();
    let nl = Netlink::connect().unwrap();
    let br = bridge(&mut lab, &nl, 0, None).await;
    assert_eq!(
        std::fs::read_to_string(format!("/sys/class/net/{br}/bridge/nf_call_iptables"))
            .unwrap()
            .trim(),
        "1"
    );
    // Idempotent.
    nl.ensure_bridge(&br).await.unwrap();
    let live = format!("{:08x}-aaaa-4000-8000-000000000001", lab.id);
    let gone = format!("{:08x}-bbbb-4000-8000-000000000002", lab.id);
    let names: Vec<String> = [(&live, 0), (&live, 1), (&gone, 0)]
        .iter()
        .map(|(u, i)| tap::tap_name(u, *i).unwrap())
        .collect();
    struct Cleanup(Vec<String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = tap::delete(n);
            }
        }
    }
    let _c = Cleanup(names.clone());
    for n in &names {
        tap::create(n, 65534).unwrap();
        tap::create(n, 65534).unwrap(); // idempotent
        nl.attach(n, &br).await.unwrap();
        assert!(tap::exists(n));
        assert_eq!(link::master_of(n).as_deref(), Some(br.as_str()));
        let owner = std::fs::read_to_string(format!("/sys/class/net/{n}/owner")).unwrap();
        assert_eq!(owner.trim(), "65534");
        let flags = std::fs::read_to_string(format!("/sys/class/net/{n}/tun_flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_eq!(
            flags & 0x5003,
            0x5002,
            "IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, got {flags:#x}"
        );
    }
    assert!(tap::list().unwrap().iter().any(|n| n == &names[2]));
    // The crash sweep: only the tap of the VMI that is gone disappears.
    let removed = tap::sweep(std::slice::from_ref(&live), |n| {
        names.iter().any(|m| m == n)
    })
    .unwrap();
    assert_eq!(removed, vec![names[2].clone()]);
    assert!(tap::exists(&names[0]) && tap::exists(&names[1]) && !tap::exists(&names[2]));
    tap::delete(&names[0]).unwrap();
    tap::delete(&names[0]).unwrap(); // absent is fine
    assert!(!tap::exists(&names[0]));
}

#[tokio::test]
async fn security_group_rules_change_live_and_spoofing_is_dropped() {
    let mut lab = Lab::new();
    let nl = Netlink::connect().unwrap();
    let (a, b) = lab.subnet(0);
    let ip = |h: u8| Ipv4Addr::new(10, a, b, h);
    let br = bridge(&mut lab, &nl, 0, Some(ip(1))).await;
    let server = lab.guest(&br, 1, ip(10), 24);
    let client = lab.guest(&br, 2, ip(20), 24);
    lab.http_server(&server, "server-page");
    let url = format!("http://{}/", server.ip);
    let table = lab.table();

    // Without a firewall: reachable (the test can fail).
    assert_eq!(client.get(&url).as_deref(), Some("server-page"));

    let mut web = Group {
        name: "default/web".into(),
        ingress: vec![],
        egress: vec![],
    };
    let rs = |web: &Group| Ruleset {
        remote: Vec::new(),
        groups: vec![
            web.clone(),
            Group {
                name: "default/clients".into(),
                ingress: vec![],
                egress: vec![],
            },
        ],
        ports: vec![port(&server, &["default/web"]), port(&client, &[])],
        zones: vec![Zone {
            bridge: br.clone(),
            isolated: false,
        }],
    };
    firewall::sync(&rs(&web), &table).unwrap();
    assert_eq!(client.get(&url), None, "default deny ingress");

    // An allow rule for port 80 from the subnet, applied to the running "VM".
    web.ingress.push(Rule {
        proto: Proto::Tcp,
        ports: Some((80, 80)),
        cidrs: vec![format!("10.{a}.{b}.0/24").parse().unwrap()],
        remote_group: None,
    });
    firewall::sync(&rs(&web), &table).unwrap();
    assert_eq!(client.get(&url).as_deref(), Some("server-page"));

    // Removed again: blocked again.
    web.ingress.clear();
    firewall::sync(&rs(&web), &table).unwrap();
    assert_eq!(client.get(&url), None, "rule removed");

    // Another group as the source: the client is not a member yet...
    web.ingress.push(Rule {
        proto: Proto::Tcp,
        ports: Some((79, 81)),
        cidrs: vec![],
        remote_group: Some("default/clients".into()),
    });
    firewall::sync(&rs(&web), &table).unwrap();
    assert_eq!(client.get(&url), None, "client not in the source group");
    let mut with_member = rs(&web);
    with_member.ports[1].groups = vec!["default/clients".into()];
    firewall::sync(&with_member, &table).unwrap();
    assert_eq!(client.get(&url).as_deref(), Some("server-page"));

    // Spoofing: a second address on the client's NIC. Allowed by the
    // security group (whole subnet) so only anti-spoofing can stop it.
    web.ingress = vec![Rule {
        proto: Proto::Tcp,
        ports: Some((80, 80)),
        cidrs: vec![format!("10.{a}.{b}.0/24").parse().unwrap()],
        remote_group: None,
    }];
    firewall::sync(&rs(&web), &table).unwrap();
    let spoofed = ip(99).to_string();
    common::must(&[
        "ip",
        "netns",
        "exec",
        &client.ns,
        "ip",
        "addr",
        "add",
        &format!("{spoofed}/24"),
        "dev",
        "eth0",
    ]);
    assert_eq!(
        client.get(&url).as_deref(),
        Some("server-page"),
        "own address still works"
    );
    assert_eq!(
        client.get_from(&spoofed, &url),
        None,
        "spoofed source address dropped"
    );
    // Without the firewall the same request goes through: it was the rule.
    firewall::remove(&table).unwrap();
    assert_eq!(
        client.get_from(&spoofed, &url).as_deref(),
        Some("server-page")
    );
    firewall::sync(&rs(&web), &table).unwrap();
    // A spoofed MAC is dropped too.
    common::must(&[
        "ip",
        "-n",
        &client.ns,
        "link",
        "set",
        "eth0",
        "address",
        "02:00:00:ff:ff:01",
    ]);
    common::must(&["ip", "-n", &client.ns, "neigh", "flush", "all"]);
    assert_eq!(client.get(&url), None, "spoofed MAC dropped");
}

#[tokio::test]
async fn networks_are_separate_and_isolated_ones_stay_inside() {
    let mut lab = Lab::new();
    let nl = Netlink::connect().unwrap();
    let (a1, b1) = lab.subnet(0);
    let (a2, b2) = lab.subnet(1);
    let gw1 = Ipv4Addr::new(10, a1, b1, 1);
    let gw2 = Ipv4Addr::new(10, a2, b2, 1);
    let br1 = bridge(&mut lab, &nl, 0, Some(gw1)).await;
    let br2 = bridge(&mut lab, &nl, 1, Some(gw2)).await;
    let g1 = lab.guest(&br1, 2, Ipv4Addr::new(10, a1, b1, 10), 24);
    let g2 = lab.guest(&br2, 3, Ipv4Addr::new(10, a2, b2, 10), 24);
    common::must(&[
        "ip",
        "-n",
        &g1.ns,
        "route",
        "add",
        "default",
        "via",
        &gw1.to_string(),
    ]);
    common::must(&[
        "ip",
        "-n",
        &g2.ns,
        "route",
        "add",
        "default",
        "via",
        &gw2.to_string(),
    ]);
    krvirt_net::nat::enable_ip_forward().unwrap();
    lab.http_server(&g2, "net2");
    let url = format!("http://{}/", g2.ip);
    // The host routes between the bridges unless krvirt says otherwise.
    assert_eq!(
        g1.get(&url).as_deref(),
        Some("net2"),
        "routed without rules"
    );
    let table = lab.table();
    let zones = |iso: bool| Ruleset {
        remote: Vec::new(),
        zones: vec![
            Zone {
                bridge: br1.clone(),
                isolated: iso,
            },
            Zone {
                bridge: br2.clone(),
                isolated: false,
            },
        ],
        ..Default::default()
    };
    firewall::sync(&zones(false), &table).unwrap();
    assert_eq!(g1.get(&url), None, "no routing between two networks");
    // Isolated: nothing leaves the bridge, but the gateway (host) is still
    // on-link for DHCP.
    firewall::sync(&zones(true), &table).unwrap();
    assert_eq!(g1.get(&url), None);
    let ping = g1.exec(&["busybox", "ping", "-c", "1", "-W", "1", &gw1.to_string()]);
    assert!(
        ping.status.success(),
        "host side of an isolated network answers on-link"
    );
}

#[tokio::test]
async fn nat_network_reaches_a_server_on_its_gateway() {
    let mut lab = Lab::new();
    let nl = Netlink::connect().unwrap();
    let (a, b) = lab.subnet(0);
    let gw = Ipv4Addr::new(10, a, b, 1);
    let br = bridge(&mut lab, &nl, 0, Some(gw)).await;
    let g = lab.guest(&br, 1, Ipv4Addr::new(10, a, b, 10), 24);
    common::must(&[
        "ip",
        "-n",
        &g.ns,
        "route",
        "add",
        "default",
        "via",
        &gw.to_string(),
    ]);
    let table = lab.table();
    let subnet: Cidr = format!("10.{a}.{b}.0/24").parse().unwrap();
    krvirt_net::nat::sync(&table, &[subnet]).unwrap();
    let listed = sh(&[
        "nft",
        "list",
        "table",
        "ip",
        &krvirt_net::nat::nat_table(&table),
    ]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(&format!(
            "ip saddr 10.{a}.{b}.0/24 ip daddr != 10.{a}.{b}.0/24 masquerade"
        )),
        "{listed}"
    );
    // With a security group on the VM too (egress unrestricted, replies
    // are established).
    firewall::sync(
        &Ruleset {
            remote: Vec::new(),
            groups: vec![Group {
                name: "g".into(),
                ingress: vec![],
                egress: vec![],
            }],
            ports: vec![port(&g, &["g"])],
            zones: vec![Zone {
                bridge: br.clone(),
                isolated: false,
            }],
        },
        &table,
    )
    .unwrap();
    let listener = std::net::TcpListener::bind((gw, 0)).unwrap();
    let port_no = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nhost-side");
        peer
    });
    let got = g.get(&format!("http://{gw}:{port_no}/"));
    assert_eq!(got.as_deref(), Some("host-side"));
    assert_eq!(server.join().unwrap().ip(), std::net::IpAddr::V4(g.ip));
}

#[tokio::test]
async fn dhcp_hands_out_exactly_the_ipam_address() {
    let mut lab = Lab::new();
    let nl = Netlink::connect().unwrap();
    let (a, b) = lab.subnet(0);
    let gw = Ipv4Addr::new(10, a, b, 1);
    let br = bridge(&mut lab, &nl, 0, Some(gw)).await;
    let subnet: Cidr = format!("10.{a}.{b}.0/24").parse().unwrap();
    // The guest starts without an address.
    let g = lab.guest(&br, 1, Ipv4Addr::new(10, a, b, 250), 24);
    common::must(&["ip", "-n", &g.ns, "addr", "flush", "dev", "eth0"]);
    let dir = lab.tempdir();
    let store =
        Arc::new(krvirt_store::embedded::EmbeddedStore::open(&dir.join("store.db")).unwrap());
    let ipam = Ipam::new(store);
    let pool = Pool::new("net1", subnet, gw, None).unwrap();
    let ip = ipam
        .allocate(&pool, "uid-1/eth0", Some(&g.mac))
        .await
        .unwrap();
    let server = DhcpServer {
        bridge: br.clone(),
        subnet,
        router: Some(gw),
        dir: dir.join("dhcp"),
    };
    struct Stop(DhcpServer);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.stop();
        }
    }
    let leases: Vec<Lease> = ipam
        .list("net1")
        .await
        .unwrap()
        .into_iter()
        .map(|a| Lease {
            mac: a.mac.unwrap(),
            ip: a.ip,
        })
        .collect();
    server.set_leases(&leases).unwrap();
    let pid = server.ensure_running().unwrap();
    let _stop = Stop(server.clone());
    assert_eq!(
        server.ensure_running().unwrap(),
        pid,
        "adopted, not started twice"
    );
    let o = g.exec(&[
        "busybox",
        "udhcpc",
        "-n",
        "-q",
        "-f",
        "-t",
        "5",
        "-i",
        "eth0",
        "-s",
        "/bin/true",
    ]);
    let out = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("lease of {ip} obtained from {gw}")),
        "{out}"
    );
    // An unknown MAC gets nothing (static leases only).
    common::must(&[
        "ip",
        "-n",
        &g.ns,
        "link",
        "set",
        "eth0",
        "address",
        "02:00:00:ee:ee:ee",
    ]);
    let o = g.exec(&[
        "busybox",
        "udhcpc",
        "-n",
        "-q",
        "-f",
        "-t",
        "2",
        "-T",
        "1",
        "-i",
        "eth0",
        "-s",
        "/bin/true",
    ]);
    assert!(!o.status.success(), "an unknown MAC must not get a lease");
    server.stop().unwrap();
    assert_eq!(server.pid(), None);
}

#[tokio::test]
async fn incremental_group_changes_equal_a_full_replace() {
    let mut lab = Lab::new();
    let nl = Netlink::connect().unwrap();
    let (a, b) = lab.subnet(0);
    let ip = |h: u8| Ipv4Addr::new(10, a, b, h);
    let br = bridge(&mut lab, &nl, 0, Some(ip(1))).await;
    let server = lab.guest(&br, 1, ip(10), 24);
    let client = lab.guest(&br, 2, ip(20), 24);
    lab.http_server(&server, "inc");
    let url = format!("http://{}/", server.ip);
    let table = lab.table();
    let mut fw = firewall::Firewall::new(&table).unwrap();
    let rs = |ingress: Vec<Rule>| Ruleset {
        remote: Vec::new(),
        groups: vec![Group {
            name: "g".into(),
            ingress,
            egress: vec![],
        }],
        ports: vec![port(&server, &["g"]), port(&client, &[])],
        zones: vec![],
    };
    let allow = Rule {
        proto: Proto::Tcp,
        ports: Some((80, 80)),
        cidrs: vec![
            format!("{}/32", client.ip)
                .parse()
                .unwrap_or_else(|_| format!("10.{a}.{b}.0/24").parse().unwrap()),
        ],
        remote_group: None,
    };
    fw.apply(&rs(vec![])).unwrap();
    assert_eq!(client.get(&url), None);
    // Only the group's chain changes: the plan is a flush + refill.
    let plan = fw.plan(&rs(vec![allow.clone()])).unwrap().to_string();
    assert!(
        plan.contains("flush chain") && !plan.contains("delete"),
        "{plan}"
    );
    fw.apply(&rs(vec![allow])).unwrap();
    assert_eq!(client.get(&url).as_deref(), Some("inc"));
    fw.apply(&rs(vec![])).unwrap();
    assert_eq!(client.get(&url), None);
}
