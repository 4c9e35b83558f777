//! Security groups and anti-spoofing, compiled to nftables JSON.
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
//! - one named set `sg-N` per group with the addresses of its member ports,
//!   for rules whose source (ingress) or destination (egress) is a group.
//!
//! The whole ruleset is ONE transaction (`add table; delete table; add
//! table; ...`) applied with `nft -j -f -`: a change is atomic, and
//! connection tracking (kept outside the table) survives it, so rule
//! changes apply to running VMs without touching them.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{NetError, invalid};
use crate::ipam::Cidr;

/// The default table name (both families).
pub const TABLE: &str = "krvirt";

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

/// Everything the firewall enforces on a host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub groups: Vec<Group>,
    pub ports: Vec<Port>,
    pub zones: Vec<Zone>,
}

fn m(op: &str, left: Value, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}
fn payload(proto: &str, field: &str) -> Value {
    json!({"payload": {"protocol": proto, "field": field}})
}
fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}
fn verdict(v: &str) -> Value {
    json!({ v: null })
}
fn jump(chain: &str) -> Value {
    json!({"jump": {"target": chain}})
}
fn cidr_value(c: &Cidr) -> Value {
    if c.prefix == 32 {
        json!(c.network().to_string())
    } else {
        json!({"prefix": {"addr": c.network().to_string(), "len": c.prefix}})
    }
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

struct Tx {
    cmds: Vec<Value>,
    family: &'static str,
    table: String,
}

impl Tx {
    fn chain(&mut self, name: &str, hook: Option<(&str, i32)>) {
        let mut c = json!({"family": self.family, "table": self.table, "name": name});
        if let Some((hook, prio)) = hook {
            c["type"] = json!("filter");
            c["hook"] = json!(hook);
            c["prio"] = json!(prio);
            c["policy"] = json!("accept");
        }
        self.cmds.push(json!({"add": {"chain": c}}));
    }
    fn rule(&mut self, chain: &str, expr: Vec<Value>) {
        self.cmds.push(json!({"add": {"rule": {
            "family": self.family, "table": self.table, "chain": chain, "expr": expr}}}));
    }
    fn reset_table(&mut self) {
        let t = json!({"family": self.family, "name": self.table});
        // add + delete + add: atomic replace whether or not it existed.
        self.cmds.push(json!({"add": {"table": t.clone()}}));
        self.cmds.push(json!({"delete": {"table": t.clone()}}));
        self.cmds.push(json!({"add": {"table": t}}));
    }
}

fn check_table(table: &str) -> Result<(), NetError> {
    if table.is_empty()
        || table.len() > 32
        || !table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(invalid("nft table name", format!("{table:?}")));
    }
    Ok(())
}

/// One rule's match expressions (without the verdict), for ingress
/// (`remote` is the source) or egress (`remote` is the destination).
fn rule_matches(
    r: &Rule,
    ingress: bool,
    group_set: &dyn Fn(&str) -> Option<String>,
    field: &'static str,
) -> Result<Vec<Vec<Value>>, NetError> {
    let mut base = Vec::new();
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
            base.push(m("==", payload("ip", "protocol"), json!("icmp")));
        }
        Proto::Tcp | Proto::Udp => {
            let p = if r.proto == Proto::Tcp { "tcp" } else { "udp" };
            base.push(m("==", payload("ip", "protocol"), json!(p)));
            if let Some((a, b)) = r.ports {
                if a == 0 || a > b {
                    return Err(invalid(field, format!("bad port range {a}-{b}")));
                }
                let right = if a == b {
                    json!(a)
                } else {
                    json!({"range": [a, b]})
                };
                base.push(m("==", payload(p, "dport"), right));
            }
        }
    }
    let addr = payload("ip", if ingress { "saddr" } else { "daddr" });
    let mut out = Vec::new();
    if !r.cidrs.is_empty() {
        let mut e = base.clone();
        // One CIDR: a plain prefix match (an anonymous set per rule costs
        // the kernel a set object each).
        let right = match r.cidrs.as_slice() {
            [one] => cidr_value(one),
            many => json!({"set": many.iter().map(cidr_value).collect::<Vec<_>>()}),
        };
        e.push(m("==", addr.clone(), right));
        out.push(e);
    }
    if let Some(g) = &r.remote_group {
        let set = group_set(g)
            .ok_or_else(|| invalid(field, format!("remote group {g:?} does not exist")))?;
        let mut e = base.clone();
        e.push(m("==", addr, json!(format!("@{set}"))));
        out.push(e);
    }
    if r.cidrs.is_empty() && r.remote_group.is_none() {
        out.push(base);
    }
    Ok(out)
}

/// Compile `rs` into one nftables JSON transaction for tables `table`
/// (families `inet` and `bridge`).
pub fn compile(rs: &Ruleset, table: &str) -> Result<Value, NetError> {
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
    let group_index = |name: &str| rs.groups.iter().position(|g| g.name == name);
    let group_set = |name: &str| group_index(name).map(|i| format!("sg-{i}"));

    // bridge family: anti-spoofing.
    let mut b = Tx {
        cmds: Vec::new(),
        family: "bridge",
        table: table.to_string(),
    };
    b.reset_table();
    b.chain("spoof", Some(("prerouting", -300)));
    let mut spoof_map = Vec::new();
    for p in &rs.ports {
        let chain = format!("sp-{}", p.tap);
        b.chain(&chain, None);
        spoof_map.push(json!([p.tap, jump(&chain)]));
        b.rule(
            &chain,
            vec![
                m("!=", payload("ether", "saddr"), json!(p.mac.to_lowercase())),
                verdict("drop"),
            ],
        );
        b.rule(
            &chain,
            vec![
                m("==", payload("ether", "type"), json!("arp")),
                m(
                    "!=",
                    payload("arp", "saddr ether"),
                    json!(p.mac.to_lowercase()),
                ),
                verdict("drop"),
            ],
        );
        if let Some(ip) = p.ip {
            {
                b.rule(
                    &chain,
                    vec![
                        m("==", payload("ether", "type"), json!("arp")),
                        m(
                            "!=",
                            payload("arp", "saddr ip"),
                            json!({"set": ["0.0.0.0", ip.to_string()]}),
                        ),
                        verdict("drop"),
                    ],
                );
                b.rule(
                    &chain,
                    vec![
                        m("==", payload("ether", "type"), json!("ip")),
                        m("==", payload("ip", "saddr"), json!("0.0.0.0")),
                        m("==", payload("udp", "dport"), json!(67)),
                        verdict("accept"),
                    ],
                );
                b.rule(
                    &chain,
                    vec![
                        m("==", payload("ether", "type"), json!("ip")),
                        m("!=", payload("ip", "saddr"), json!(ip.to_string())),
                        verdict("drop"),
                    ],
                );
            }
        }
        // No IPv6 support yet: nothing unverified leaves the port.
        b.rule(
            &chain,
            vec![
                m("==", payload("ether", "type"), json!("ip6")),
                verdict("drop"),
            ],
        );
    }
    if !spoof_map.is_empty() {
        b.rule(
            "spoof",
            vec![json!({"vmap": {"key": meta("iifname"), "data": {"set": spoof_map}}})],
        );
    }

    // inet family: security groups.
    let mut t = Tx {
        cmds: Vec::new(),
        family: "inet",
        table: table.to_string(),
    };
    t.reset_table();
    for (i, g) in rs.groups.iter().enumerate() {
        let mut set = json!({"family": "inet", "table": table, "name": format!("sg-{i}"),
            "type": "ipv4_addr"});
        let members: Vec<Value> = rs
            .ports
            .iter()
            .filter(|p| p.groups.contains(&g.name))
            .filter_map(|p| p.ip)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|ip| json!(ip.to_string()))
            .collect();
        if !members.is_empty() {
            set["elem"] = json!(members);
        }
        t.cmds.push(json!({"add": {"set": set}}));
    }
    // Each group's ingress rules once, in `gi-N` (allowed traffic is
    // accepted there); ports jump to the chains of their groups, so a
    // group's size does not multiply with the number of its ports.
    for (i, g) in rs.groups.iter().enumerate() {
        let chain = format!("gi-{i}");
        t.chain(&chain, None);
        for (k, r) in g.ingress.iter().enumerate() {
            for mut e in rule_matches(r, true, &group_set, "ingress rule")
                .map_err(|e| invalid("security group", format!("{} ingress[{k}]: {e}", g.name)))?
            {
                e.push(verdict("accept"));
                t.rule(&chain, e);
            }
        }
    }
    t.chain("forward", Some(("forward", 0)));
    t.chain("output", Some(("output", 0)));
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
        t.chain(&inc, None);
        in_map.push(json!([ip.to_string(), jump(&inc)]));
        // DHCP replies from the network's server.
        t.rule(
            &inc,
            vec![
                m("==", payload("ip", "protocol"), json!("udp")),
                m("==", payload("udp", "sport"), json!(67)),
                m("==", payload("udp", "dport"), json!(68)),
                verdict("accept"),
            ],
        );
        for g in &groups {
            if let Some(i) = group_index(&g.name) {
                t.rule(&inc, vec![jump(&format!("gi-{i}"))]);
            }
        }
        t.rule(&inc, vec![verdict("drop")]);
        if groups.iter().any(|g| !g.egress.is_empty()) {
            let outc = format!("out-{}", p.tap);
            t.chain(&outc, None);
            out_map.push(json!([ip.to_string(), jump(&outc)]));
            // DHCP to the network's server.
            t.rule(
                &outc,
                vec![
                    m("==", payload("ip", "protocol"), json!("udp")),
                    m("==", payload("udp", "dport"), json!(67)),
                    verdict("return"),
                ],
            );
            for g in &groups {
                for (k, r) in g.egress.iter().enumerate() {
                    for mut e in rule_matches(r, false, &group_set, "egress rule").map_err(|e| {
                        invalid("security group", format!("{} egress[{k}]: {e}", g.name))
                    })? {
                        e.push(verdict("return"));
                        t.rule(&outc, e);
                    }
                }
            }
            t.rule(&outc, vec![verdict("drop")]);
        }
    }
    for hook in ["forward", "output"] {
        t.rule(
            hook,
            vec![
                m(
                    "in",
                    json!({"ct": {"key": "state"}}),
                    json!(["established", "related"]),
                ),
                verdict("accept"),
            ],
        );
        t.rule(
            hook,
            vec![
                m("in", json!({"ct": {"key": "state"}}), json!("invalid")),
                verdict("drop"),
            ],
        );
        if hook == "forward" {
            // Each network is its own L2 domain: no routing between them.
            let names: Vec<&str> = rs.zones.iter().map(|z| z.bridge.as_str()).collect();
            for z in &rs.zones {
                let iif = m("==", meta("iifname"), json!(z.bridge));
                if z.isolated {
                    t.rule(
                        hook,
                        vec![
                            iif,
                            m("!=", meta("oifname"), json!(z.bridge)),
                            verdict("drop"),
                        ],
                    );
                    t.rule(
                        hook,
                        vec![
                            m("!=", meta("iifname"), json!(z.bridge)),
                            m("==", meta("oifname"), json!(z.bridge)),
                            verdict("drop"),
                        ],
                    );
                } else {
                    let others: Vec<&str> =
                        names.iter().copied().filter(|n| *n != z.bridge).collect();
                    if !others.is_empty() {
                        t.rule(
                            hook,
                            vec![
                                iif,
                                m("==", meta("oifname"), json!({"set": others})),
                                verdict("drop"),
                            ],
                        );
                    }
                }
            }
        }
        if hook == "forward" && !out_map.is_empty() {
            t.rule(
                hook,
                vec![json!({"vmap": {"key": payload("ip", "saddr"), "data": {"set": out_map.clone()}}})],
            );
        }
        if !in_map.is_empty() {
            t.rule(
                hook,
                vec![json!({"vmap": {"key": payload("ip", "daddr"), "data": {"set": in_map.clone()}}})],
            );
        }
    }

    let mut cmds = b.cmds;
    cmds.extend(t.cmds);
    Ok(json!({ "nftables": cmds }))
}

/// A host's firewall with the last ruleset it applied: a change that only
/// touches security-group ingress rules (same ports, groups and zones) is
/// applied as one transaction that flushes and refills just the changed
/// groups' `gi-N` chains; anything else replaces both tables. Either way
/// it is ONE atomic `nft -j -f -`.
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
    pub fn plan(&self, rs: &Ruleset) -> Result<Value, NetError> {
        let Some(last) = &self.last else {
            return compile(rs, &self.table);
        };
        let same_shape = last.ports == rs.ports
            && last.zones == rs.zones
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
        let mut t = Tx {
            cmds: Vec::new(),
            family: "inet",
            table: self.table.clone(),
        };
        for (i, (old, new)) in last.groups.iter().zip(&rs.groups).enumerate() {
            if old.ingress == new.ingress {
                continue;
            }
            let chain = format!("gi-{i}");
            t.cmds.push(
                json!({"flush": {"chain": {"family": "inet", "table": self.table, "name": chain}}}),
            );
            for (k, r) in new.ingress.iter().enumerate() {
                for mut e in rule_matches(r, true, &group_set, "ingress rule").map_err(|e| {
                    invalid("security group", format!("{} ingress[{k}]: {e}", new.name))
                })? {
                    e.push(verdict("accept"));
                    t.rule(&chain, e);
                }
            }
        }
        Ok(json!({ "nftables": t.cmds }))
    }

    /// Apply `rs`. On failure the next apply replaces everything.
    pub fn apply(&mut self, rs: &Ruleset) -> Result<(), NetError> {
        let doc = self.plan(rs)?;
        let empty = doc["nftables"].as_array().is_some_and(|a| a.is_empty());
        let res = if empty { Ok(()) } else { apply(&doc) };
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

/// Run `nft -j -f -` with `doc` as one transaction.
pub fn apply(doc: &Value) -> Result<(), NetError> {
    let body = serde_json::to_vec(doc).map_err(|e| invalid("nft document", e.to_string()))?;
    run_nft(&["-j", "-f", "-"], &body)
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
    let mut cmds = Vec::new();
    for family in ["bridge", "inet"] {
        let t = json!({"family": family, "name": table});
        cmds.push(json!({"add": {"table": t.clone()}}));
        cmds.push(json!({"delete": {"table": t}}));
    }
    apply(&json!({ "nftables": cmds }))
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
        let doc = compile(&rs, "kvtest").unwrap();
        let s = doc.to_string();
        // DHCP discovery (two ports), DHCP replies, the cidr and the group
        // alternatives of rule 1, icmp, established in forward and output.
        assert_eq!(
            s.matches("\"accept\":null").count(),
            2 + 1 + 2 + 1 + 2,
            "{s}"
        );
        assert!(s.contains("\"@sg-0\""));
        assert!(s.contains("\"elem\":[\"10.1.0.5\"]"));
        // kvtb has no groups: anti-spoofing only, no ingress chain.
        assert!(s.contains("sp-kvtb") && !s.contains("in-kvtb"));
        assert!(s.contains("\"target\":\"gi-0\""));
        // no egress rules: no egress chain.
        assert!(!s.contains("out-kvta"));
    }

    #[test]
    fn refuses_bad_input() {
        let mut rs = Ruleset {
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
