//! `krvirt.io/v1` Network (cluster-scoped) and SecurityGroup (namespaced).
//!
//! A Network is one L2 domain: its own Linux bridge on every host, its own
//! subnet, addresses from IPAM in the store handed out by DHCP.
//! - `nat`: the bridge carries the gateway address; traffic leaving the
//!   subnet is masqueraded (the default "pod" network is one, created by
//!   `krvirt up` as [`DEFAULT_NETWORK`]);
//! - `bridge`: like `nat` without masquerade, on `spec.bridge` (which may
//!   be an existing host bridge), optionally with a host `uplink`
//!   interface the agents enslave to the bridge (the VMs then share the
//!   uplink's L2 segment);
//! - `isolated`: nothing enters or leaves the bridge but DHCP.
//!
//! KubeVirt interfaces reach Networks through `networks[].pod` (the default
//! Network) and `networks[].multus.networkName` (a Network by name).
//!
//! A SecurityGroup holds stateful allow rules; interfaces join groups by
//! annotation on the VMI (or the VM template): [`SECURITY_GROUPS_ANNOTATION`]
//! (`krvirt.io/security-groups: "web,ssh"`, every interface) or
//! `krvirt.io/security-groups.<interface>` (that interface only; wins).
//! An interface in at least one group gets default-deny ingress;
//! established/related traffic is always allowed; a group without egress
//! rules leaves egress open.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::admission::{Admit, Causes, idx, join};
use crate::kubevirt::validate::{immutable_identity, metadata};
use crate::meta::{Condition, ObjectMeta, null_default};

pub const API_VERSION: &str = "krvirt.io/v1";
/// The Network `networks[].pod` resolves to.
pub const DEFAULT_NETWORK: &str = "default";
/// Comma-separated SecurityGroup names (same namespace) for every interface.
pub const SECURITY_GROUPS_ANNOTATION: &str = "krvirt.io/security-groups";

/// VMI annotation the network controller writes: a JSON array of
/// [`InterfaceAssignment`], one per interface, in interface order. The host
/// agent launches a VMI with interfaces only once it is there, and never
/// allocates addresses itself.
pub const INTERFACES_ANNOTATION: &str = "krvirt.io/interfaces";
/// Finalizer the network controller puts on a VMI it allocated addresses
/// for; removed once the addresses are released (after the host let go).
pub const IPAM_FINALIZER: &str = "krvirt.io/ipam";

/// Where one VMI interface is attached, decided by the network controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceAssignment {
    /// Interface name in the VMI spec.
    pub name: String,
    /// MAC address of the NIC (`macAddress` if given, else stable per
    /// namespace/VMI name/interface, so a VM keeps it across restarts).
    pub mac: String,
    /// The krvirt Network; `None`: QEMU user networking (the pod network
    /// when no `default` Network exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_type: Option<NetworkType>,
    /// Bridge of the Network on the hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Subnet `a.b.c.d/len`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// The host's address on the bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The guest's address, from IPAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// `bridge` Networks: the host interface the agent enslaves to the
    /// bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// The Network's VXLAN VNI (its `status.vni`): hosts with VMIs on the
    /// Network join its segment over VXLAN. `None`: no overlay (a `bridge`
    /// Network with an uplink, whose uplink is the shared segment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
}

/// Parse the [`INTERFACES_ANNOTATION`] of a VMI, if present.
pub fn interface_assignments(
    annotations: &std::collections::BTreeMap<String, String>,
) -> Option<Result<Vec<InterfaceAssignment>, String>> {
    annotations
        .get(INTERFACES_ANNOTATION)
        .map(|v| serde_json::from_str(v).map_err(|e| format!("{INTERFACES_ANNOTATION}: {e}")))
}

/// The stable MAC of interface `iface` of VMI `namespace/name`: locally
/// administered, unicast, the same for every incarnation of a VM.
pub fn stable_mac(namespace: &str, name: &str, iface: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in namespace
        .bytes()
        .chain([0u8])
        .chain(name.bytes())
        .chain([0u8])
        .chain(iface.bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    let b = h.to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    )
}

/// The MAC of Network `network`'s gateway (its bridge) on EVERY host
/// where the Network spans hosts: a guest that migrates finds its gateway
/// at the address it has cached. Locally administered unicast with first
/// octet `06`, so never one of [`stable_mac`]'s (`02`).
pub fn gateway_mac(network: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in b"gateway\0".iter().chain(network.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    let b = h.to_be_bytes();
    format!(
        "06:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    )
}

/// The groups of interface `iface` given a VMI's annotations.
pub fn security_groups_for(
    annotations: &std::collections::BTreeMap<String, String>,
    iface: &str,
) -> Vec<String> {
    let specific = format!("{SECURITY_GROUPS_ANNOTATION}.{iface}");
    annotations
        .get(&specific)
        .or_else(|| annotations.get(SECURITY_GROUPS_ANNOTATION))
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Parse `a.b.c.d/len`.
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = s.split_once('/')?;
    let addr: Ipv4Addr = a.parse().ok()?;
    let prefix: u8 = p.parse().ok()?;
    (prefix <= 32).then_some((addr, prefix))
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

/// A network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Network {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NetworkSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NetworkStatus>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkType {
    #[default]
    Nat,
    Bridge,
    Isolated,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSpec {
    #[serde(default, rename = "type")]
    pub type_: NetworkType,
    /// IPv4 subnet, `a.b.c.d/len` with len 8..=30.
    #[serde(default)]
    pub subnet: String,
    /// The host's address on the bridge (DHCP server, router for `nat`).
    /// Default: the subnet's first host address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Addresses IPAM hands out. Default: the whole subnet but the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpRange>,
    /// Bridge name on the hosts (≤ 15 characters). Default: `kvbr-` + a
    /// hash of the network name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// `bridge` type: a host interface to enslave to the bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DhcpRange {
    pub range_start: String,
    pub range_end: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// The VXLAN network identifier of the Network across hosts, chosen
    /// once by the network controller ([`derive_vni`]) and never changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<Condition>,
}

/// The largest VXLAN network identifier (24 bits).
pub const VNI_MAX: u32 = (1 << 24) - 1;

/// The VNI of Network `name`, given the VNIs other Networks already hold:
/// a hash of the name into `1..=VNI_MAX`, then the next free one (so the
/// same name gets the same VNI on an empty cluster, and two Networks never
/// share one). `None` only when every VNI is taken.
pub fn derive_vni(name: &str, taken: &std::collections::BTreeSet<u32>) -> Option<u32> {
    if taken.len() as u64 >= VNI_MAX as u64 {
        return None;
    }
    let mut h: u32 = 0x811c9dc5;
    for b in name.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    Some(next_free_vni(h % VNI_MAX + 1, taken))
}

/// `start` or the first VNI after it (wrapping to 1) not in `taken`, which
/// must not hold every VNI.
fn next_free_vni(start: u32, taken: &std::collections::BTreeSet<u32>) -> u32 {
    let mut v = start.clamp(1, VNI_MAX);
    while taken.contains(&v) {
        v = if v == VNI_MAX { 1 } else { v + 1 };
    }
    v
}

/// Whether a Network's VMIs on several hosts share one segment over
/// VXLAN: every type but a `bridge` Network with an uplink (the uplink's
/// own L2 segment already joins the hosts; a tunnel too would be a loop).
pub fn uses_overlay(spec: &NetworkSpec) -> bool {
    !(spec.type_ == NetworkType::Bridge && spec.uplink.is_some())
}

/// The default bridge name of network `name`: `kvbr-` + 8 hex digits.
pub fn default_bridge_name(name: &str) -> String {
    let mut h: u32 = 0x811c9dc5;
    for b in name.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    format!("kvbr-{h:08x}")
}

fn ifname_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `((network, prefix), gateway, (first, last))` of a Network.
pub type Addressing = ((Ipv4Addr, u8), Ipv4Addr, (Ipv4Addr, Ipv4Addr));

impl NetworkSpec {
    /// Subnet, gateway and dynamic range, defaults applied (None if invalid).
    pub fn addressing(&self) -> Option<Addressing> {
        let (net, prefix) = parse_cidr(&self.subnet)?;
        let m = mask(prefix);
        let base = u32::from(net);
        let bcast = base | !m;
        let host = |ip: Ipv4Addr| {
            let v = u32::from(ip);
            v & m == base && v != base && v != bcast
        };
        let gw = match &self.gateway {
            Some(g) => g.parse().ok()?,
            None => Ipv4Addr::from(base + 1),
        };
        let range = match &self.dhcp {
            Some(d) => (d.range_start.parse().ok()?, d.range_end.parse().ok()?),
            None => (Ipv4Addr::from(base + 1), Ipv4Addr::from(bcast - 1)),
        };
        (host(gw) && host(range.0) && host(range.1) && u32::from(range.0) <= u32::from(range.1))
            .then_some(((net, prefix), gw, range))
    }

    pub fn bridge_name(&self, network: &str) -> String {
        self.bridge
            .clone()
            .unwrap_or_else(|| default_bridge_name(network))
    }
}

impl Admit for Network {
    fn not_implemented(_path: &str) -> bool {
        false
    }

    fn apply_defaults(&mut self) {}

    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", 63, false, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.spec != self.spec {
                c.forbidden(
                    "spec",
                    "a Network's spec is immutable (delete and recreate it once no VMI uses it)",
                );
            }
        }
        let s = &self.spec;
        match parse_cidr(&s.subnet) {
            None => c.invalid("spec.subnet", format!("{:?} is not a.b.c.d/len", s.subnet)),
            Some((net, prefix)) => {
                if !(8..=30).contains(&prefix) {
                    c.invalid("spec.subnet", "the prefix length must be 8..=30");
                } else if u32::from(net) & !mask(prefix) != 0 {
                    c.invalid("spec.subnet", format!("{} has host bits set", s.subnet));
                } else if s.addressing().is_none() {
                    c.invalid(
                        "spec.gateway",
                        "gateway and dhcp range must be host addresses of the subnet, rangeStart <= rangeEnd",
                    );
                }
            }
        }
        if let Some(b) = &s.bridge
            && !ifname_ok(b)
        {
            c.invalid("spec.bridge", "1-15 characters of A-Za-z0-9_-");
        }
        match (&s.uplink, s.type_) {
            (Some(u), NetworkType::Bridge) if !ifname_ok(u) => {
                c.invalid("spec.uplink", "1-15 characters of A-Za-z0-9_-")
            }

            (Some(_), NetworkType::Nat | NetworkType::Isolated) => {
                c.invalid("spec.uplink", "only a bridge-type network has an uplink")
            }
            _ => {}
        }
    }
}

/// A security group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityGroup {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: SecurityGroupSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityGroupSpec {
    /// Allowed incoming traffic (everything else is dropped).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ingress: Vec<SecurityRule>,
    /// Allowed outgoing traffic; none at all in every group of an
    /// interface leaves its egress open.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub egress: Vec<SecurityRule>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleProtocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// One allow rule (NetworkPolicy-style `port`/`endPort`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityRule {
    #[serde(default)]
    pub protocol: RuleProtocol,
    /// Destination port (tcp/udp); none: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Last port of a range starting at `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
    /// Remote addresses (source for ingress, destination for egress).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cidrs: Vec<String>,
    /// Members of this group (same namespace) as the remote side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_group: Option<String>,
}

impl Admit for SecurityGroup {
    fn not_implemented(_path: &str) -> bool {
        false
    }

    fn apply_defaults(&mut self) {}

    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", 63, true, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
        }
        for (dir, rules) in [
            ("ingress", &self.spec.ingress),
            ("egress", &self.spec.egress),
        ] {
            for (i, r) in rules.iter().enumerate() {
                let p = idx(&join("spec", dir), i);
                let ports_ok = matches!(r.protocol, RuleProtocol::Tcp | RuleProtocol::Udp);
                if (r.port.is_some() || r.end_port.is_some()) && !ports_ok {
                    c.invalid(join(&p, "port"), "ports need protocol tcp or udp");
                }
                if r.port == Some(0) {
                    c.invalid(join(&p, "port"), "must be 1..=65535");
                }
                match (r.port, r.end_port) {
                    (None, Some(_)) => c.required(join(&p, "port"), "endPort needs port"),
                    (Some(a), Some(b)) if b < a => {
                        c.invalid(join(&p, "endPort"), "must be >= port")
                    }
                    _ => {}
                }
                for (k, cidr) in r.cidrs.iter().enumerate() {
                    match parse_cidr(cidr) {
                        Some((a, l)) if u32::from(a) & !mask(l) == 0 => {}
                        _ => c.invalid(
                            idx(&join(&p, "cidrs"), k),
                            format!("{cidr:?} is not a network a.b.c.d/len"),
                        ),
                    }
                }
                if let Some(g) = &r.security_group
                    && g.is_empty()
                {
                    c.invalid(join(&p, "securityGroup"), "must not be empty");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressing_defaults() {
        let s = NetworkSpec {
            subnet: "10.88.0.0/24".into(),
            ..Default::default()
        };
        let ((n, p), gw, (a, b)) = s.addressing().unwrap();
        assert_eq!((n, p), (Ipv4Addr::new(10, 88, 0, 0), 24));
        assert_eq!(gw, Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(
            (a, b),
            (Ipv4Addr::new(10, 88, 0, 1), Ipv4Addr::new(10, 88, 0, 254))
        );
        assert_eq!(default_bridge_name("default").len(), 13);
    }

    #[test]
    fn vnis_are_stable_distinct_and_in_range() {
        use std::collections::BTreeSet;
        let none = BTreeSet::new();
        let a = derive_vni("blue", &none).unwrap();
        assert_eq!(derive_vni("blue", &none), Some(a), "deterministic");
        assert!((1..=VNI_MAX).contains(&a));
        assert_ne!(derive_vni("red", &none), Some(a));
        // Taken: the next free one, never a taken one.
        let taken: BTreeSet<u32> = [a, a + 1].into_iter().collect();
        let b = derive_vni("blue", &taken).unwrap();
        assert!(!taken.contains(&b) && (1..=VNI_MAX).contains(&b));
        // Wraps at the top of the range (never 0).
        let top: BTreeSet<u32> = [VNI_MAX, 1, 2].into_iter().collect();
        assert_eq!(next_free_vni(VNI_MAX, &top), 3);
        assert_eq!(next_free_vni(0, &BTreeSet::new()), 1);
        let names = ["a", "b", "c", "default", "blue", "red", "net-1", "net-2"];
        let mut seen = BTreeSet::new();
        for n in names {
            let v = derive_vni(n, &seen).unwrap();
            assert!(seen.insert(v), "{n} got a taken VNI");
        }
    }

    #[test]
    fn gateway_macs_are_per_network_and_never_a_guests() {
        let m = gateway_mac("blue");
        assert_eq!(m, gateway_mac("blue"));
        assert_ne!(m, gateway_mac("red"));
        assert!(m.starts_with("06:") && m.len() == 17, "{m}");
        assert!(stable_mac("ns", "blue", "gateway").starts_with("02:"));
    }

    #[test]
    fn overlay_except_bridges_with_an_uplink() {
        let mut s = NetworkSpec {
            subnet: "10.9.0.0/24".into(),
            ..Default::default()
        };
        assert!(uses_overlay(&s));
        s.type_ = NetworkType::Isolated;
        assert!(uses_overlay(&s));
        s.type_ = NetworkType::Bridge;
        assert!(uses_overlay(&s));
        s.uplink = Some("eth1".into());
        assert!(!uses_overlay(&s));
    }

    #[test]
    fn group_annotations() {
        let mut a = std::collections::BTreeMap::new();
        a.insert(
            SECURITY_GROUPS_ANNOTATION.to_string(),
            "web, ssh".to_string(),
        );
        a.insert(
            format!("{SECURITY_GROUPS_ANNOTATION}.nic2"),
            "db".to_string(),
        );
        assert_eq!(security_groups_for(&a, "default"), vec!["web", "ssh"]);
        assert_eq!(security_groups_for(&a, "nic2"), vec!["db"]);
        assert!(security_groups_for(&Default::default(), "x").is_empty());
    }

    fn fields(r: Result<serde_json::Value, crate::ValidationError>) -> Vec<String> {
        match r {
            Ok(_) => vec![],
            Err(e) => e.causes.iter().map(|c| c.field.clone()).collect(),
        }
    }

    #[test]
    fn network_admission() {
        use crate::admission::admit_typed;
        use serde_json::json;
        let ok = json!({"apiVersion": API_VERSION, "kind": "Network", "metadata": {"name": "net-a"},
            "spec": {"type": "bridge", "subnet": "10.9.0.0/24", "bridge": "br0",
                     "dhcp": {"rangeStart": "10.9.0.10", "rangeEnd": "10.9.0.20"}}});
        assert!(fields(admit_typed::<Network>(ok.clone(), None)).is_empty());
        let mut up = ok.clone();
        up["spec"]["uplink"] = json!("eth1");
        assert!(fields(admit_typed::<Network>(up.clone(), None)).is_empty());
        up["spec"]["uplink"] = json!("eth1; rm");
        assert_eq!(
            fields(admit_typed::<Network>(up, None)),
            vec!["spec.uplink"]
        );
        let bad = json!({"metadata": {"name": "n"}, "spec": {"type": "nat", "subnet": "10.9.0.1/24", "uplink": "eth1"}});
        let f = fields(admit_typed::<Network>(bad, None));
        assert!(
            f.contains(&"spec.subnet".to_string()) && f.contains(&"spec.uplink".to_string()),
            "{f:?}"
        );
        let bad = json!({"metadata": {"name": "n"}, "spec": {"subnet": "10.9.0.0/24", "gateway": "10.8.0.1"}});
        assert_eq!(
            fields(admit_typed::<Network>(bad, None)),
            vec!["spec.gateway"]
        );
        let unknown =
            json!({"metadata": {"name": "n"}, "spec": {"subnet": "10.9.0.0/24", "vlan": 5}});
        assert_eq!(
            fields(admit_typed::<Network>(unknown, None)),
            vec!["spec.vlan"]
        );
        let mut changed = ok.clone();
        changed["spec"]["subnet"] = json!("10.10.0.0/24");
        changed["spec"]["dhcp"] = serde_json::Value::Null;
        assert!(fields(admit_typed::<Network>(changed, Some(&ok))).contains(&"spec".to_string()));
    }

    #[test]
    fn security_group_admission() {
        use crate::admission::admit_typed;
        use serde_json::json;
        let ok = json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {
            "ingress": [{"protocol": "tcp", "port": 80, "endPort": 81, "cidrs": ["10.0.0.0/8"]},
                        {"protocol": "icmp", "securityGroup": "clients"}],
            "egress": [{"protocol": "udp", "port": 53}]}});
        assert!(fields(admit_typed::<SecurityGroup>(ok, None)).is_empty());
        let bad = json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {
            "ingress": [{"protocol": "icmp", "port": 80}, {"protocol": "tcp", "port": 90, "endPort": 80},
                        {"protocol": "tcp", "cidrs": ["10.0.0.1/8"]}]}});
        assert_eq!(
            fields(admit_typed::<SecurityGroup>(bad, None)),
            vec![
                "spec.ingress[0].port",
                "spec.ingress[1].endPort",
                "spec.ingress[2].cidrs[0]"
            ]
        );
    }
}
