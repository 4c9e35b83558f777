//! The NAT ("pod") networks' host side: IPv4 forwarding and one masquerade
//! rule per NAT subnet for traffic leaving it, in krvirt's own
//! `ip {table}-nat` table, replaced atomically with `nft -f -`.

use crate::firewall::Script;

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
pub fn compile(table: &str, subnets: &[Cidr]) -> Script {
    let name = nat_table(table);
    let mut s = Script::default();
    s.line(format_args!("table ip {name}"));
    s.line(format_args!("delete table ip {name}"));
    s.line(format_args!("table ip {name} {{"));
    s.line(format_args!("  chain postrouting {{"));
    s.line(format_args!(
        "    type nat hook postrouting priority 100; policy accept;"
    ));
    for n in subnets {
        let net = format!("{}/{}", n.network(), n.prefix);
        s.line(format_args!(
            "    ip saddr {net} ip daddr != {net} masquerade"
        ));
    }
    s.line(format_args!("  }}"));
    s.line(format_args!("}}"));
    s
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
    let name = nat_table(table);
    let mut s = Script::default();
    s.line(format_args!("table ip {name}"));
    s.line(format_args!("delete table ip {name}"));
    crate::firewall::apply(&s)
}
