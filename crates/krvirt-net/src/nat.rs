//! The NAT ("pod") networks' host side: IPv4 forwarding and one masquerade
//! rule per NAT subnet for traffic leaving it, in krvirt's own
//! `ip {table}-nat` table, replaced atomically with `nft -j -f -`.

use serde_json::{Value, json};

use crate::error::{NetError, io_err};
use crate::ipam::Cidr;

/// Turn on IPv4 forwarding (needed for NAT networks only).
pub fn enable_ip_forward() -> Result<(), NetError> {
    let p = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(p)
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(p, "1").map_err(io_err("write", p))
}

/// The NAT table's name for krvirt table `table`.
pub fn nat_table(table: &str) -> String {
    format!("{table}-nat")
}

/// The transaction replacing the NAT table with masquerade rules for
/// `subnets` (each: `ip saddr S ip daddr != S masquerade`).
pub fn compile(table: &str, subnets: &[Cidr]) -> Value {
    let name = nat_table(table);
    let t = json!({"family": "ip", "name": name});
    let mut cmds = vec![
        json!({"add": {"table": t.clone()}}),
        json!({"delete": {"table": t.clone()}}),
        json!({"add": {"table": t}}),
        json!({"add": {"chain": {"family": "ip", "table": name, "name": "postrouting",
            "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}}),
    ];
    for s in subnets {
        let net = json!({"prefix": {"addr": s.network().to_string(), "len": s.prefix}});
        cmds.push(json!({"add": {"rule": {"family": "ip", "table": name, "chain": "postrouting",
            "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": net.clone()}},
                {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": net}},
                {"masquerade": null}
            ]}}}));
    }
    json!({ "nftables": cmds })
}

/// Apply [`compile`] (and forwarding, when there is any NAT subnet).
pub fn sync(table: &str, subnets: &[Cidr]) -> Result<(), NetError> {
    if !subnets.is_empty() {
        enable_ip_forward()?;
    }
    crate::firewall::apply(&compile(table, subnets))
}

/// Remove the NAT table.
pub fn remove(table: &str) -> Result<(), NetError> {
    let t = json!({"family": "ip", "name": nat_table(table)});
    crate::firewall::apply(
        &json!({"nftables": [{"add": {"table": t.clone()}}, {"delete": {"table": t}}]}),
    )
}
