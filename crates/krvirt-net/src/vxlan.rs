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
        for (ip, msg) in &current {
            if !peers.contains(ip) {
                self.handle()
                    .neighbours()
                    .del(msg.clone())
                    .execute()
                    .await
                    .map_err(nl("delete fdb entry", name))?;
            }
        }
        for peer in peers {
            if current.iter().any(|(ip, _)| ip == peer) {
                continue;
            }
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
