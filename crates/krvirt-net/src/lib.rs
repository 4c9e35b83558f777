//! krvirt host networking.
//!
//! - [`link`]: Linux bridges, addresses and link state over rtnetlink;
//! - [`tap`]: persistent tap devices created with `TUNSETIFF` (never by QEMU),
//!   named deterministically from the VMI uid and NIC index, swept when
//!   their VMI is gone;
//! - [`ipam`]: per-network address allocation as store keys created with
//!   create-if-absent, so concurrent allocators never share an address;
//! - [`dhcp`]: one `dnsmasq` per network serving only the leases IPAM made
//!   (`--dhcp-hostsfile`, static ranges);
//! - [`firewall`]: security groups and anti-spoofing compiled to nftables
//!   (text syntax) and applied as ONE atomic `nft -f -` transaction per change,
//!   in krvirt's own tables (`inet krvirt`, `bridge krvirt`);
//! - [`nat`]: IPv4 forwarding and the masquerade rule of a NAT network;
//! - [`vxlan`]: the cross-host form of a Network (one VNI per Network, a
//!   kernel vxlan device as a port of its bridge, head-end replication).
//!
//! Everything here needs root (CAP_NET_ADMIN) except the pure parts
//! (names, CIDR arithmetic, rule compilation).

pub mod dhcp;
pub mod error;
pub mod firewall;
pub mod ipam;
pub mod link;
pub mod nat;
pub mod tap;
pub mod vxlan;

pub use error::NetError;
pub use ipam::{Cidr, Ipam};
