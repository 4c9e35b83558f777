//! The cross-host form of a Network: VXLAN.
//!
//! Each Network that spans hosts gets one VNI (the cluster allocates it,
//! once, when the Network is created). On every host that runs a VM on the
//! Network, a kernel vxlan device for that VNI (`kvx<VNI>`) is a port of
//! the Network's bridge, so the bridge — with its taps, DHCP server and
//! firewall exactly as on one host — becomes one L2 domain across hosts.
//! Two Networks never share a VNI, so they stay separate L2 domains even
//! with overlapping subnets.
//!
//! No multicast is needed in the underlay: broadcast, unknown-unicast and
//! multicast frames are replicated head-end to every other host's tunnel
//! address (one all-zero FDB entry per peer, reconciled by
//! [`Netlink::set_vxlan_peers`] from the cluster's Host list), and unicast
//! destinations are learned from the traffic itself. The devices use the
//! IANA port 4789 and sit on the host's underlay address (`local`), so the
//! cluster's Host objects carry that address.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::LinkVxlan;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::error::{NetError, invalid};
use crate::link::{Netlink, index, master_of};

/// VXLAN's IANA UDP port.
pub const VXLAN_PORT: u16 = 4789;

/// The largest VNI (24 bits).
pub const VNI_MAX: u32 = (1 << 24) - 1;

/// Overhead of the encapsulation (outer Ethernet + IPv4 + UDP + VXLAN).
pub const VXLAN_OVERHEAD: u32 = 50;

/// The MTU krvirt gives a Network's vxlan device: the guests' own (1500),
/// not the underlay's minus [`VXLAN_OVERHEAD`], so full-size guest frames
/// cross hosts (the underlay fragments the outer UDP packets) without the
/// guests being told of a smaller MTU.
pub const GUEST_MTU: u32 = 1500;

/// One Network's tunnel on one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// The Network's VNI, 1..=2^24-1.
    pub vni: u32,
    /// This host's underlay (tunnel) address.
    pub local: Ipv4Addr,
    /// The underlay interface, when the tunnel must be bound to one.
    pub dev: Option<String>,
    /// UDP port ([`VXLAN_PORT`] unless the cluster says otherwise).
    pub port: u16,
}

/// The device name for `vni` (`kvx` + decimal VNI: at most 11 bytes).
pub fn device_name(vni: u32) -> String {
    format!("kvx{vni}")
}

fn check_vni(vni: u32) -> Result<(), NetError> {
    if vni == 0 || vni > VNI_MAX {
        return Err(invalid("vni", format!("{vni} is not in 1..={VNI_MAX}")));
    }
    Ok(())
}

fn nl(op: &'static str, name: &str) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let name = name.to_string();
    move |e| NetError::Netlink {
        op,
        name,
        message: e.to_string(),
    }
}

const ZERO_MAC: [u8; 6] = [0; 6];

/// What brings a device's flood list from `current` to `wanted`:
/// `(add, remove)`, each without duplicates, in the order given.
pub fn flood_diff(current: &[Ipv4Addr], wanted: &[Ipv4Addr]) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
    let mut add: Vec<Ipv4Addr> = Vec::new();
    for w in wanted {
        if !current.contains(w) && !add.contains(w) {
            add.push(*w);
        }
    }
    let mut remove: Vec<Ipv4Addr> = Vec::new();
    for c in current {
        if !wanted.contains(c) && !remove.contains(c) {
            remove.push(*c);
        }
    }
    (add, remove)
}

/// Whether `name` is a device name [`device_name`] gives (`kvx` + VNI).
pub fn is_device_name(name: &str) -> bool {
    name.strip_prefix("kvx")
        .and_then(|v| v.parse::<u32>().ok())
        .is_some_and(|v| (1..=VNI_MAX).contains(&v) && device_name(v) == name)
}

impl Netlink {
    /// Make sure the vxlan device for `spec` exists, is a port of `bridge`
    /// (which must exist) and is up. Returns the device's name. A device
    /// of that name bound to another bridge is moved; the VNI of an
    /// existing device is trusted (names are derived from it).
    pub async fn ensure_vxlan(&self, spec: &VxlanSpec, bridge: &str) -> Result<String, NetError> {
        check_vni(spec.vni)?;
        if spec.port == 0 {
            return Err(invalid("vxlan port", "0"));
        }
        let name = device_name(spec.vni);
        if index(bridge).is_none() {
            return Err(NetError::Netlink {
                op: "lookup",
                name: bridge.to_string(),
                message: "no such bridge".into(),
            });
        }
        if index(&name).is_none() {
            let mut b = LinkVxlan::new(&name, spec.vni)
                .local(spec.local)
                .port(spec.port)
                .learning(true);
            if let Some(dev) = &spec.dev {
                let idx = index(dev).ok_or_else(|| NetError::Netlink {
                    op: "lookup",
                    name: dev.clone(),
                    message: "no such underlay interface".into(),
                })?;
                b = b.dev(idx);
            }
            match self.handle().link().add(b.build()).execute().await {
                Ok(()) => {}
                Err(e) if index(&name).is_some() => {
                    tracing::debug!(device = name, error = %e, "vxlan appeared concurrently");
                }
                Err(e) => return Err(nl("add vxlan", &name)(e)),
            }
        }
        if master_of(&name).as_deref() != Some(bridge) {
            self.attach(&name, bridge).await?;
        } else {
            self.set_up(&name).await?;
        }
        Ok(name)
    }

    /// The peers `name` currently floods to (its all-zero FDB entries).
    pub async fn vxlan_peers(&self, name: &str) -> Result<Vec<Ipv4Addr>, NetError> {
        Ok(self
            .flood_entries(name)
            .await?
            .into_iter()
            .map(|(ip, _)| ip)
            .collect())
    }

    async fn flood_entries(
        &self,
        name: &str,
    ) -> Result<Vec<(Ipv4Addr, NeighbourMessage)>, NetError> {
        let idx = index(name).ok_or_else(|| NetError::Netlink {
            op: "lookup",
            name: name.to_string(),
            message: "no such vxlan device".into(),
        })?;
        let mut dump = self
            .handle()
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = dump.try_next().await.map_err(nl("dump fdb", name))? {
            if msg.header.ifindex != idx {
                continue;
            }
            let zero = msg
                .attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(m) if m[..] == ZERO_MAC));
            let dst = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                // In AF_BRIDGE dumps the kernel's NDA_DST is not parsed
                // as an IP address: the raw 4 bytes of the remote.
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                    <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                }
                _ => None,
            });
            if let (true, Some(ip)) = (zero, dst) {
                out.push((ip, msg));
            }
        }
        Ok(out)
    }

    /// Make `name` flood to exactly `peers` (head-end replication): adds
    /// the missing all-zero FDB entries, removes the others. Idempotent.
    pub async fn set_vxlan_peers(&self, name: &str, peers: &[Ipv4Addr]) -> Result<(), NetError> {
        let idx = index(name).ok_or_else(|| NetError::Netlink {
            op: "lookup",
            name: name.to_string(),
            message: "no such vxlan device".into(),
        })?;
        let current = self.flood_entries(name).await?;
        let ips: Vec<Ipv4Addr> = current.iter().map(|(ip, _)| *ip).collect();
        let (add, remove) = flood_diff(&ips, peers);
        for (ip, msg) in &current {
            if remove.contains(ip) {
                self.handle()
                    .neighbours()
                    .del(msg.clone())
                    .execute()
                    .await
                    .map_err(nl("delete fdb entry", name))?;
            }
        }
        for peer in &add {
            // `bridge fdb append 00:00:00:00:00:00 dev NAME dst PEER self
            // permanent`: APPEND, because every peer shares the all-zero
            // address (rtnetlink's add request would ask for EXCL).
            let mut msg = NeighbourMessage::default();
            msg.header.family = AddressFamily::Bridge;
            msg.header.ifindex = idx;
            msg.header.state = NeighbourState::Permanent;
            msg.header.flags = NeighbourFlags::Own;
            msg.header.kind = RouteType::Unspec;
            msg.attributes
                .push(NeighbourAttribute::LinkLayerAddress(ZERO_MAC.to_vec()));
            msg.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                    *peer,
                )));
            let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(msg));
            req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
            let mut handle = self.handle().clone();
            let mut resp = handle.request(req).map_err(nl("add fdb entry", name))?;
            while let Some(m) = futures::StreamExt::next(&mut resp).await {
                if let NetlinkPayload::Error(e) = m.payload
                    && e.code.is_some()
                {
                    return Err(NetError::Netlink {
                        op: "add fdb entry",
                        name: name.to_string(),
                        message: format!("dst {}: {e}", IpAddr::V4(*peer)),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    #[test]
    fn flood_list_reconciliation() {
        // A host joins, another leaves, one stays.
        let (add, remove) = flood_diff(&[ip(1), ip(2)], &[ip(2), ip(3)]);
        assert_eq!((add, remove), (vec![ip(3)], vec![ip(1)]));
        // Converged: nothing to do.
        assert_eq!(
            flood_diff(&[ip(1), ip(2)], &[ip(2), ip(1)]),
            (vec![], vec![])
        );
        // Duplicates (a stale double entry, a peer listed twice) collapse.
        assert_eq!(
            flood_diff(&[ip(1), ip(1)], &[ip(4), ip(4)]),
            (vec![ip(4)], vec![ip(1)])
        );
        // Last peer gone: every entry goes.
        assert_eq!(flood_diff(&[ip(1)], &[]), (vec![], vec![ip(1)]));
    }

    #[test]
    fn device_names_round_trip() {
        assert_eq!(device_name(4242), "kvx4242");
        assert!(is_device_name("kvx4242"));
        assert!(is_device_name(&device_name(VNI_MAX)));
        for bad in ["kvx", "kvx0", "kvx04242", "kvxab", "kvt4242", "kvx16777216"] {
            assert!(!is_device_name(bad), "{bad}");
        }
    }
}
