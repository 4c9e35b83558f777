//! Security groups and anti-spoofing, compiled to nftables (text syntax).
//!
//! Layout (all in krvirt's own tables, default name `krvirt`, so nothing
//! else on the host is touched):
//!
//! - `bridge krvirt`, chain `spoof` (prerouting, priority -300):
//!   `iifname vmap { TAP: jump sp-TAP }`; each `sp-TAP` drops frames whose
//!   source MAC is not the NIC's, ARP whose sender is not its MAC/IP, and
//!   IPv4 whose source is not its address (DHCP discovery from 0.0.0.0
//!   excepted) — stateless, at the bridge port, before anything else.
//! - `inet krvirt`, chains `forward` and `output` (filter hooks): established
//!   and related accepted, invalid dropped; then `ip saddr vmap` to the
//!   sender's egress chain (`out-TAP`, allowed traffic `return`s, the rest
//!   is dropped; a port whose groups have no egress rule at all may send
//!   anything) and `ip daddr vmap` to the receiver's ingress chain (`in-TAP`:
//!   DHCP replies, then a jump to each of its groups' chain `gi-N` whose
//!   rules `accept`, then `drop`: default deny ingress). Bridged traffic reaches these hooks because
//!   krvirt's bridges have `nf_call_iptables` on; addresses are trustworthy
//!   there because of the anti-spoofing chains.
//! - `bridge krvirt`, chains `tunnel-in`/`tunnel-out` (input/output):
//!   nothing between the host's own stack and a Network's VXLAN ports
//!   (`kvx*`): gateway and DHCP stay per host.
//! - one named set `sg-N` per group with the addresses of its member ports,
//!   for rules whose source (ingress) or destination (egress) is a group.
//!
//! The whole ruleset is ONE transaction (`add table; delete table; add
//! table; ...`) applied with `nft -f -`: a change is atomic, and
//! connection tracking (kept outside the table) survives it, so rule
//! changes apply to running VMs without touching them.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::error::{NetError, invalid};
use crate::ipam::Cidr;

/// The default table name (both families).
pub const TABLE: &str = "krvirt";

/// nft pattern of the VXLAN ports of Networks (`kvx<VNI>`).
pub const TUNNEL_PORTS: &str = "kvx*";

/// Protocol of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// One allow rule. The remote side is `cidrs` and/or `remote_group`;
/// neither means anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub proto: Proto,
    /// Inclusive destination port range (tcp/udp only).
    pub ports: Option<(u16, u16)>,
    pub cidrs: Vec<Cidr>,
    /// Name of another group: its members' addresses.
    pub remote_group: Option<String>,
}

/// A security group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Unique name (e.g. `namespace/name`).
    pub name: String,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

/// A VM NIC as seen by the firewall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub tap: String,
    pub mac: String,
    /// Its address; without one only the MAC is enforced.
    pub ip: Option<Ipv4Addr>,
    /// Names of the groups it belongs to. None: no filtering (but still
    /// anti-spoofing).
    pub groups: Vec<String>,
}

/// A network's bridge: nothing is routed between two of them, and an
/// isolated one exchanges nothing with the host's other interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub bridge: String,
    pub isolated: bool,
}

/// A group member whose NIC is on another host (a Network spanning
/// hosts): its address belongs in its groups' sets here, so rules naming
/// those groups as the remote side match it, though it has no port here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub ip: Ipv4Addr,
    pub groups: Vec<String>,
}

/// Everything the firewall enforces on a host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub groups: Vec<Group>,
    pub ports: Vec<Port>,
    pub zones: Vec<Zone>,
    /// Members of the groups on other hosts.
    pub remote: Vec<Member>,
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn cidr_text(c: &Cidr) -> String {
    if c.prefix == 32 {
        c.network().to_string()
    } else {
        format!("{}/{}", c.network(), c.prefix)
    }
}

/// An nft script in nft's own text syntax, applied as ONE transaction by
/// `nft -f -` (nft parses its text syntax several times faster than its
/// JSON, which is what bench/net measures). Every name written into it is
/// validated first (tables, taps, MACs) or generated here (chains, sets),
/// so no input can inject syntax.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Script(String);

impl Script {
    /// The script's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// True when it contains no command.
    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }
    pub(crate) fn line(&mut self, l: std::fmt::Arguments<'_>) {
        use std::fmt::Write as _;
        let _ = self.0.write_fmt(l);
        self.0.push('\n');
    }
}

impl std::fmt::Display for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Body of one table, declared chain by chain (chains referenced by a
/// jump are declared before the chain that jumps).
struct Block {
    body: String,
}

impl Block {
    fn new() -> Block {
        Block {
            body: String::new(),
        }
    }
    fn chain(&mut self, name: &str, hook: Option<(&str, i32)>, rules: &[String]) {
        use std::fmt::Write as _;
        let _ = writeln!(self.body, "  chain {name} {{");
        if let Some((hook, prio)) = hook {
            let _ = writeln!(
                self.body,
                "    type filter hook {hook} priority {prio}; policy accept;"
            );
        }
        for r in rules {
            let _ = writeln!(self.body, "    {r}");
        }
        self.body.push_str("  }\n");
    }
    fn set(&mut self, name: &str, elems: &[String]) {
        use std::fmt::Write as _;
        let _ = write!(self.body, "  set {name} {{ type ipv4_addr;");
        if !elems.is_empty() {
            let _ = write!(self.body, " elements = {{ {} }};", elems.join(", "));
        }
        self.body.push_str(" }\n");
    }
    /// Atomically replace table `family table` with this body (add +
    /// delete + add: works whether or not it existed).
    fn replace_into(self, out: &mut Script, family: &str, table: &str) {
        out.line(format_args!("table {family} {table}"));
        out.line(format_args!("delete table {family} {table}"));
        out.line(format_args!("table {family} {table} {{"));
        out.0.push_str(&self.body);
        out.line(format_args!("}}"));
    }
}

fn check_table(table: &str) -> Result<(), NetError> {
    if table.is_empty()
        || table.len() > 32
        || !table.as_bytes()[0].is_ascii_alphabetic()
        || !table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(invalid("nft table name", format!("{table:?}")));
    }
    Ok(())
}

/// One rule's match expressions (without the verdict), for ingress
/// (`remote` is the source) or egress (`remote` is the destination); one
/// string per alternative.
fn rule_matches(
    r: &Rule,
    ingress: bool,
    group_set: &dyn Fn(&str) -> Option<String>,
    field: &'static str,
) -> Result<Vec<String>, NetError> {
    let mut base = String::new();
    match r.proto {
        Proto::Any => {
            if r.ports.is_some() {
                return Err(invalid(field, "ports need protocol tcp or udp"));
            }
        }
        Proto::Icmp => {
            if r.ports.is_some() {
                return Err(invalid(field, "ports need protocol tcp or udp"));
            }
            base.push_str("ip protocol icmp ");
        }
        Proto::Tcp | Proto::Udp => {
            let p = if r.proto == Proto::Tcp { "tcp" } else { "udp" };
            base.push_str(&format!("ip protocol {p} "));
            if let Some((a, b)) = r.ports {
                if a == 0 || a > b {
                    return Err(invalid(field, format!("bad port range {a}-{b}")));
                }
                if a == b {
                    base.push_str(&format!("{p} dport {a} "));
                } else {
                    base.push_str(&format!("{p} dport {a}-{b} "));
                }
            }
        }
    }
    let addr = if ingress { "ip saddr" } else { "ip daddr" };
    let mut out = Vec::new();
    if !r.cidrs.is_empty() {
        // One CIDR: a plain prefix match (an anonymous set per rule costs
        // the kernel a set object each).
        let right = match r.cidrs.as_slice() {
            [one] => cidr_text(one),
            many => format!(
                "{{ {} }}",
                many.iter().map(cidr_text).collect::<Vec<_>>().join(", ")
            ),
        };
        out.push(format!("{base}{addr} {right} "));
    }
    if let Some(g) = &r.remote_group {
        let set = group_set(g)
            .ok_or_else(|| invalid(field, format!("remote group {g:?} does not exist")))?;
        out.push(format!("{base}{addr} @{set} "));
    }
    if r.cidrs.is_empty() && r.remote_group.is_none() {
        out.push(base);
    }
    Ok(out)
}

/// A group's ingress chain rules (`gi-N`): allowed traffic is accepted.
fn group_ingress(
    g: &Group,
    group_set: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<String>, NetError> {
    let mut rules = Vec::with_capacity(g.ingress.len());
    for (k, r) in g.ingress.iter().enumerate() {
        for e in rule_matches(r, true, group_set, "ingress rule")
            .map_err(|e| invalid("security group", format!("{} ingress[{k}]: {e}", g.name)))?
        {
            rules.push(format!("{e}accept"));
        }
    }
    Ok(rules)
}

/// Compile `rs` into one nft transaction (text syntax) replacing tables
/// `table` of families `bridge` and `inet`.
pub fn compile(rs: &Ruleset, table: &str) -> Result<Script, NetError> {
    check_table(table)?;
    let mut seen = std::collections::HashSet::new();
    for p in &rs.ports {
        if p.tap.is_empty()
            || p.tap.len() > crate::tap::IFNAMSIZ_MAX
            || !p
                .tap
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid("port tap", format!("{:?}", p.tap)));
        }
        if !valid_mac(&p.mac) {
            return Err(invalid("port mac", format!("{:?}", p.mac)));
        }
        if !seen.insert(p.tap.clone()) {
            return Err(invalid("port tap", format!("{:?} appears twice", p.tap)));
        }
    }
    for z in &rs.zones {
        if z.bridge.is_empty()
            || z.bridge.len() > crate::tap::IFNAMSIZ_MAX
            || !z
                .bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(invalid("zone bridge", format!("{:?}", z.bridge)));
        }
    }
    let group_index = |name: &str| rs.groups.iter().position(|g| g.name == name);
    let group_set = |name: &str| group_index(name).map(|i| format!("sg-{i}"));
    let mut out = Script::default();

    // bridge family: anti-spoofing, stateless, at the bridge port.
    let mut b = Block::new();
    let mut spoof_map = Vec::new();
    for p in &rs.ports {
        let chain = format!("sp-{}", p.tap);
        let mac = p.mac.to_lowercase();
        let mut rules = vec![
            format!("ether saddr != {mac} drop"),
            format!("ether type arp arp saddr ether != {mac} drop"),
        ];
        if let Some(ip) = p.ip {
            rules.push(format!(
                "ether type arp arp saddr ip != {{ 0.0.0.0, {ip} }} drop"
            ));
            rules.push("ether type ip ip saddr 0.0.0.0 udp dport 67 accept".to_string());
            rules.push(format!("ether type ip ip saddr != {ip} drop"));
        }
        // No IPv6 support yet: nothing unverified leaves the port.
        rules.push("ether type ip6 drop".to_string());
        b.chain(&chain, None, &rules);
        spoof_map.push(format!("\"{}\" : jump {chain}", p.tap));
    }
    let spoof_rules: Vec<String> = if spoof_map.is_empty() {
        vec![]
    } else {
        vec![format!("iifname vmap {{ {} }}", spoof_map.join(", "))]
    };
    b.chain("spoof", Some(("prerouting", -300)), &spoof_rules);
    // A Network's VXLAN ports (`kvx*`, see crate::vxlan) carry guest
    // traffic only: the host's own side of the Network (the gateway
    // address every host has on the bridge, its DHCP server) stays on the
    // host, so each host answers its own guests' ARP and DHCP and never
    // another host's.
    b.chain(
        "tunnel-in",
        Some(("input", 0)),
        &[format!("iifname \"{TUNNEL_PORTS}\" drop")],
    );
    b.chain(
        "tunnel-out",
        Some(("output", 0)),
        &[format!("oifname \"{TUNNEL_PORTS}\" drop")],
    );
    b.replace_into(&mut out, "bridge", table);

    // inet family: security groups.
    let mut t = Block::new();
    for (i, g) in rs.groups.iter().enumerate() {
        let members: Vec<String> = rs
            .ports
            .iter()
            .filter(|p| p.groups.contains(&g.name))
            .filter_map(|p| p.ip)
            .chain(
                rs.remote
                    .iter()
                    .filter(|m| m.groups.contains(&g.name))
                    .map(|m| m.ip),
            )
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|ip| ip.to_string())
            .collect();
        t.set(&format!("sg-{i}"), &members);
    }
    // Each group's ingress rules once, in `gi-N` (allowed traffic is
    // accepted there); ports jump to the chains of their groups, so a
    // group's size does not multiply with the number of its ports.
    for (i, g) in rs.groups.iter().enumerate() {
        t.chain(&format!("gi-{i}"), None, &group_ingress(g, &group_set)?);
    }
    let mut in_map = Vec::new();
    let mut out_map = Vec::new();
    for p in &rs.ports {
        let (Some(ip), false) = (p.ip, p.groups.is_empty()) else {
            continue;
        };
        let groups: Vec<&Group> = p
            .groups
            .iter()
            .map(|n| {
                rs.groups.iter().find(|g| &g.name == n).ok_or_else(|| {
                    invalid(
                        "port group",
                        format!("{n:?} does not exist (port {})", p.tap),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let inc = format!("in-{}", p.tap);
        // DHCP replies from the network's server, then the groups, then
        // default deny.
        let mut rules = vec!["ip protocol udp udp sport 67 udp dport 68 accept".to_string()];
        for g in &groups {
            if let Some(i) = group_index(&g.name) {
                rules.push(format!("jump gi-{i}"));
            }
        }
        rules.push("drop".to_string());
        t.chain(&inc, None, &rules);
        in_map.push(format!("{ip} : jump {inc}"));
        if groups.iter().any(|g| !g.egress.is_empty()) {
            let outc = format!("out-{}", p.tap);
            // DHCP to the network's server.
            let mut rules = vec!["ip protocol udp udp dport 67 return".to_string()];
            for g in &groups {
                for (k, r) in g.egress.iter().enumerate() {
                    for e in rule_matches(r, false, &group_set, "egress rule").map_err(|e| {
                        invalid("security group", format!("{} egress[{k}]: {e}", g.name))
                    })? {
                        rules.push(format!("{e}return"));
                    }
                }
            }
            rules.push("drop".to_string());
            t.chain(&outc, None, &rules);
            out_map.push(format!("{ip} : jump {outc}"));
        }
    }
    for hook in ["forward", "output"] {
        let mut rules = vec![
            "ct state established,related accept".to_string(),
            "ct state invalid drop".to_string(),
        ];
        if hook == "forward" {
            // Each network is its own L2 domain: no routing between them.
            let names: Vec<&str> = rs.zones.iter().map(|z| z.bridge.as_str()).collect();
            for z in &rs.zones {
                let br = &z.bridge;
                if z.isolated {
                    rules.push(format!("iifname \"{br}\" oifname != \"{br}\" drop"));
                    rules.push(format!("iifname != \"{br}\" oifname \"{br}\" drop"));
                } else {
                    let others: Vec<String> = names
                        .iter()
                        .filter(|n| **n != br.as_str())
                        .map(|n| format!("\"{n}\""))
                        .collect();
                    if !others.is_empty() {
                        rules.push(format!(
                            "iifname \"{br}\" oifname {{ {} }} drop",
                            others.join(", ")
                        ));
                    }
                }
            }
            if !out_map.is_empty() {
                rules.push(format!("ip saddr vmap {{ {} }}", out_map.join(", ")));
            }
        }
        if !in_map.is_empty() {
            rules.push(format!("ip daddr vmap {{ {} }}", in_map.join(", ")));
        }
        t.chain(hook, Some((hook, 0)), &rules);
    }
    t.replace_into(&mut out, "inet", table);
    Ok(out)
}

/// A host's firewall with the last ruleset it applied: a change that only
/// touches security-group ingress rules (same ports, groups and zones) is
/// applied as one transaction that flushes and refills just the changed
/// groups' `gi-N` chains; anything else replaces both tables. Either way
/// it is ONE atomic `nft -f -`.
#[derive(Debug)]
pub struct Firewall {
    table: String,
    last: Option<Ruleset>,
}

impl Firewall {
    pub fn new(table: &str) -> Result<Firewall, NetError> {
        check_table(table)?;
        Ok(Firewall {
            table: table.to_string(),
            last: None,
        })
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The transaction that brings the tables from the last applied
    /// ruleset to `rs` (the full one when there is no usable last).
    pub fn plan(&self, rs: &Ruleset) -> Result<Script, NetError> {
        let Some(last) = &self.last else {
            return compile(rs, &self.table);
        };
        let same_shape = last.ports == rs.ports
            && last.zones == rs.zones
            && last.remote == rs.remote
            && last.groups.len() == rs.groups.len()
            && last
                .groups
                .iter()
                .zip(&rs.groups)
                .all(|(a, b)| a.name == b.name && a.egress == b.egress);
        if !same_shape {
            return compile(rs, &self.table);
        }
        let group_set = |name: &str| {
            rs.groups
                .iter()
                .position(|g| g.name == name)
                .map(|i| format!("sg-{i}"))
        };
        let mut out = Script::default();
        for (i, (old, new)) in last.groups.iter().zip(&rs.groups).enumerate() {
            if old.ingress == new.ingress {
                continue;
            }
            let table = &self.table;
            out.line(format_args!("flush chain inet {table} gi-{i}"));
            let rules = group_ingress(new, &group_set)?;
            if !rules.is_empty() {
                out.line(format_args!("table inet {table} {{"));
                out.line(format_args!("  chain gi-{i} {{"));
                for r in rules {
                    out.line(format_args!("    {r}"));
                }
                out.line(format_args!("  }}"));
                out.line(format_args!("}}"));
            }
        }
        Ok(out)
    }

    /// Apply `rs`. On failure the next apply replaces everything.
    pub fn apply(&mut self, rs: &Ruleset) -> Result<(), NetError> {
        let script = self.plan(rs)?;
        let res = if script.is_empty() {
            Ok(())
        } else {
            apply(&script)
        };
        match res {
            Ok(()) => {
                self.last = Some(rs.clone());
                Ok(())
            }
            Err(e) => {
                self.last = None;
                Err(e)
            }
        }
    }

    /// Forget the last ruleset: the next apply replaces both tables (use
    /// after a restart or when the tables may have been touched).
    pub fn invalidate(&mut self) {
        self.last = None;
    }
}

/// Run `nft -f -` with `script` as one transaction.
pub fn apply(script: &Script) -> Result<(), NetError> {
    run_nft(&["-f", "-"], script.as_str().as_bytes())
}

/// Run `nft ARGS` with `stdin`.
pub fn run_nft(args: &[&str], stdin: &[u8]) -> Result<(), NetError> {
    let cmd_err = |message: String| NetError::Command {
        program: format!("nft {}", args.join(" ")),
        message,
    };
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| cmd_err(format!("cannot run nft (Debian package nftables): {e}")))?;
    if let Some(mut s) = child.stdin.take() {
        s.write_all(stdin).map_err(|e| cmd_err(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| cmd_err(e.to_string()))?;
    if !out.status.success() {
        return Err(cmd_err(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Compile and apply in one transaction.
pub fn sync(rs: &Ruleset, table: &str) -> Result<(), NetError> {
    apply(&compile(rs, table)?)
}

/// Remove krvirt's tables `table` (both families); absent tables are fine.
pub fn remove(table: &str) -> Result<(), NetError> {
    check_table(table)?;
    let mut s = Script::default();
    for family in ["bridge", "inet"] {
        s.line(format_args!("table {family} {table}"));
        s.line(format_args!("delete table {family} {table}"));
    }
    apply(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(tap: &str, ip: [u8; 4], groups: &[&str]) -> Port {
        Port {
            tap: tap.into(),
            mac: "02:00:00:00:00:01".into(),
            ip: Some(Ipv4Addr::from(ip)),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn compiles_groups_ports_and_sets() {
        let rs = Ruleset {
            remote: Vec::new(),
            groups: vec![Group {
                name: "default/web".into(),
                ingress: vec![
                    Rule {
                        proto: Proto::Tcp,
                        ports: Some((80, 81)),
                        cidrs: vec!["10.0.0.0/8".parse().unwrap()],
                        remote_group: Some("default/web".into()),
                    },
                    Rule {
                        proto: Proto::Icmp,
                        ports: None,
                        cidrs: vec![],
                        remote_group: None,
                    },
                ],
                egress: vec![],
            }],
            ports: vec![
                port("kvta", [10, 1, 0, 5], &["default/web"]),
                port("kvtb", [10, 1, 0, 6], &[]),
            ],
            zones: vec![],
        };
        let s = compile(&rs, "kvtest").unwrap().to_string();
        // DHCP discovery (two ports), DHCP replies, the cidr and the group
        // alternatives of rule 1, icmp, established in forward and output.
        assert_eq!(
            s.lines().filter(|l| l.ends_with(" accept")).count(),
            2 + 1 + 2 + 1 + 2,
            "{s}"
        );
        assert!(s.contains("ip saddr @sg-0 accept"), "{s}");
        assert!(
            s.contains("tcp dport 80-81 ip saddr 10.0.0.0/8 accept"),
            "{s}"
        );
        assert!(s.contains("set sg-0 { type ipv4_addr; elements = { 10.1.0.5 }; }"));
        // A member on another host joins the set, without a port here.
        let mut with_remote = rs.clone();
        with_remote.remote.push(Member {
            ip: Ipv4Addr::new(10, 1, 0, 9),
            groups: vec!["default/web".into()],
        });
        let s2 = compile(&with_remote, "kvtest").unwrap().to_string();
        assert!(
            s2.contains("set sg-0 { type ipv4_addr; elements = { 10.1.0.5, 10.1.0.9 }; }"),
            "{s2}"
        );
        assert!(!s2.contains("10.1.0.9 : jump"), "no port chains for it");
        // A change of remote members alone is a full replacement (sets
        // are not patched in place).
        let mut fw = Firewall::new("kvtest").unwrap();
        fw.last = Some(rs.clone());
        assert!(
            fw.plan(&with_remote)
                .unwrap()
                .as_str()
                .contains("delete table")
        );
        // kvtb has no groups: anti-spoofing only, no ingress chain.
        assert!(s.contains("sp-kvtb") && !s.contains("in-kvtb"));
        assert!(s.contains("jump gi-0"));
        // no egress rules: no egress chain.
        assert!(!s.contains("out-kvta"));
        // chains are declared before the chains that jump to them
        let pos = |needle: &str| s.find(needle).unwrap();
        assert!(pos("chain gi-0") < pos("chain in-kvta"));
        assert!(pos("chain in-kvta") < pos("chain forward"));
        assert!(pos("chain sp-kvtb") < pos("chain spoof"));
        // The host's own stack never talks over a Network's tunnel.
        assert!(s.contains("hook input priority 0; policy accept;\n    iifname \"kvx*\" drop"));
        assert!(s.contains("hook output priority 0; policy accept;\n    oifname \"kvx*\" drop"));
    }

    #[test]
    fn refuses_bad_input() {
        let mut rs = Ruleset {
            remote: Vec::new(),
            groups: vec![],
            ports: vec![port("kvta", [10, 1, 0, 5], &["missing"])],
            zones: vec![],
        };
        assert!(compile(&rs, "kvtest").is_err());
        rs.ports[0].groups.clear();
        rs.ports[0].mac = "zz".into();
        assert!(compile(&rs, "kvtest").is_err());
        rs.ports[0].mac = "02:00:00:00:00:01".into();
        assert!(compile(&rs, "bad table").is_err());
        assert!(compile(&rs, "1table").is_err());
        rs.zones.push(Zone {
            bridge: "br\"x".into(),
            isolated: false,
        });
        assert!(compile(&rs, "kvtest").is_err());
        rs.zones.clear();
        rs.ports.push(rs.ports[0].clone());
        assert!(compile(&rs, "kvtest").is_err());
        let r = Rule {
            proto: Proto::Any,
            ports: Some((1, 2)),
            cidrs: vec![],
            remote_group: None,
        };
        assert!(rule_matches(&r, true, &|_| None, "f").is_err());
        let r = Rule {
            proto: Proto::Tcp,
            ports: Some((9, 2)),
            cidrs: vec![],
            remote_group: None,
        };
        assert!(rule_matches(&r, true, &|_| None, "f").is_err());
    }
}
