//! The host side of VMI networking: what the agent does for a VMI whose
//! interfaces the network controller attached to krvirt Networks
//! (annotation [`INTERFACES_ANNOTATION`]; the agent never allocates).
//!
//! Before QEMU starts ([`HostNet::prepare`]): the Network's bridge (with
//! the gateway address), its dnsmasq serving exactly the leases of this
//! host's NICs on it, the NAT rule of `nat` Networks, and one persistent
//! tap per NIC (named from the VMI uid and NIC index) on the bridge. What
//! was set up is recorded in the run directory (`net.json`), so everything
//! below is recomputed from disk after a restart.
//!
//! The firewall (krvirt-net's nftables tables, one pair per agent, named
//! from the data directory) is recomputed from those records, the
//! VMIs' `krvirt.io/security-groups[.<iface>]` annotations and the
//! SecurityGroup objects, and re-applied (one atomic transaction, only
//! when something changed) whenever a SecurityGroup changes, and every few
//! seconds: rule edits reach running guests without a restart.
//!
//! Taps go when QEMU stops ([`HostNet::release`]); taps on this agent's
//! bridges whose run directory is gone (a crash between the two) are swept.
//!
//! Across hosts (the overlay, at every sync): a Network with NICs here
//! and VMIs on other hosts ([`network_members`], [`tunnels`]) gets a
//! VXLAN port `kvx<VNI>` on its bridge flooding to exactly those hosts'
//! `InternalIP`s; the bridge has the Network's gateway MAC on every host;
//! security-group sets hold members on other hosts too
//! ([`remote_members`]). A migration target prepares its guest's NICs
//! with [`HostNet::prepare`] like a launch.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use krvirt_api::kubevirt::{VirtualMachineInstance, VirtualMachineInstanceNetworkInterface};
use krvirt_api::network::{
    INTERFACES_ANNOTATION, NetworkType, SecurityGroup, interface_assignments, security_groups_for,
};
use krvirt_client::{Client, ListParams, ResumeOptions};
use krvirt_hypervisor::{NicBackend, VmConfig};
use krvirt_net::dhcp::{DhcpServer, Lease};
use krvirt_net::firewall::{Firewall, Group, Member, Port, Proto, Rule, Ruleset, Zone};
use krvirt_net::link::Netlink;
use krvirt_net::{Cidr, NetError, tap, vxlan};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// File in a VMI's run directory recording its NICs on krvirt Networks.
pub const NET_RECORD: &str = "net.json";
/// File in `{data_dir}/net/` naming what this agent owns on the host (its
/// nft table and bridges), for operators and test cleanup.
pub const HOST_RECORD: &str = "host.json";
/// How often the firewall and leases are recomputed without an event.
const RESYNC: Duration = Duration::from_secs(3);

/// Why a VMI's network could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum NetPrepError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// One NIC of a VMI on a krvirt Network, as prepared on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NicRecord {
    pub iface: String,
    pub tap: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub network: String,
    pub network_type: NetworkType,
    pub bridge: String,
    pub subnet: String,
    pub gateway: Ipv4Addr,
    /// Host interface enslaved to the bridge (`bridge` Networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// The Network's VXLAN VNI (None: no overlay for this Network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
}

/// The run directory's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetRecord {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub nics: Vec<NicRecord>,
}

/// What the agent owns on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    /// nft table name (families `inet` and `bridge`; NAT in `{table}-nat`).
    pub table: String,
    pub bridges: BTreeSet<String>,
}

/// The nft table of the agent with data directory `data_dir`: `kv` + 8
/// hex digits of a hash of the path, so agents side by side never share one.
pub fn table_name(data_dir: &Path) -> String {
    let mut h: u32 = 0x811c9dc5;
    for b in data_dir.as_os_str().as_encoded_bytes() {
        h ^= *b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    format!("kv{h:08x}")
}

/// Pure: the NICs of `vmi` that need host networking, from the
/// controller's assignments (`None`: not assigned yet).
pub fn nic_records(vmi: &VirtualMachineInstance) -> Option<Result<Vec<NicRecord>, NetPrepError>> {
    let uid = vmi.metadata.uid.clone().unwrap_or_default();
    let field = format!("metadata.annotations[{INTERFACES_ANNOTATION}]");
    let bad = |message: String| NetPrepError::Invalid {
        field: field.clone(),
        message,
    };
    let assignments = match interface_assignments(&vmi.metadata.annotations)? {
        Ok(a) => a,
        Err(e) => return Some(Err(bad(e))),
    };
    let mut out = Vec::new();
    for (i, iface) in vmi.spec.domain.devices.interfaces.iter().enumerate() {
        let Some(a) = assignments.iter().find(|a| a.name == iface.name) else {
            return Some(Err(bad(format!(
                "no assignment for interface {}",
                iface.name
            ))));
        };
        let Some(network) = a.network.clone() else {
            continue;
        };
        let rec = (|| -> Result<NicRecord, String> {
            let ip: Ipv4Addr = a.ip.as_deref().unwrap_or("").parse().map_err(|_| "ip")?;
            let gateway: Ipv4Addr = a
                .gateway
                .as_deref()
                .unwrap_or("")
                .parse()
                .map_err(|_| "gateway")?;
            let subnet = a.subnet.clone().ok_or("subnet")?;
            subnet.parse::<Cidr>().map_err(|_| "subnet")?;
            Ok(NicRecord {
                iface: iface.name.clone(),
                tap: tap::tap_name(&uid, i).map_err(|e| e.to_string())?,
                mac: a.mac.to_ascii_lowercase(),
                ip,
                network,
                network_type: a.network_type.unwrap_or_default(),
                bridge: a.bridge.clone().ok_or("bridge")?,
                subnet,
                gateway,
                uplink: a.uplink.clone(),
                vni: a.vni,
            })
        })();
        match rec {
            Ok(r) => out.push(r),
            Err(what) => {
                return Some(Err(bad(format!(
                    "interface {}: missing or invalid {what}",
                    iface.name
                ))));
            }
        }
    }
    Some(Ok(out))
}

/// Pure: KubeVirt `status.interfaces` for a planned VM. NICs on krvirt
/// Networks report the address IPAM gave them (`infoSource` gains
/// `dhcp-lease` once dnsmasq's lease file shows the guest took it); user
/// networking NICs report QEMU's fixed guest address.
pub fn interfaces_status(
    config: &VmConfig,
    records: &[NicRecord],
    leased: &dyn Fn(&NicRecord) -> bool,
) -> Vec<VirtualMachineInstanceNetworkInterface> {
    config
        .nics
        .iter()
        .enumerate()
        .map(|(i, nic)| {
            let rec = records.iter().find(|r| r.iface == nic.id);
            let (ip, source) = match (rec, &nic.backend) {
                (Some(r), NicBackend::Tap { .. }) => (
                    r.ip.to_string(),
                    if leased(r) {
                        "domain, dhcp-lease"
                    } else {
                        "domain"
                    },
                ),
                _ => (crate::plan::MASQUERADE_GUEST_IP.to_string(), "domain"),
            };
            VirtualMachineInstanceNetworkInterface {
                name: Some(nic.id.clone()),
                ip_address: Some(ip.clone()),
                ip_addresses: vec![ip],
                mac: Some(nic.mac.clone()),
                interface_name: Some(format!("eth{i}")),
                info_source: Some(source.into()),
            }
        })
        .collect()
}

/// Pure: the firewall of this host from its NIC records, the security
/// groups of each VMI's interfaces (by VMI uid: namespace + annotations)
/// and the SecurityGroup objects (`namespace/name` -> group).
pub fn ruleset(
    records: &[NetRecord],
    annotations: &BTreeMap<String, BTreeMap<String, String>>,
    groups: &BTreeMap<String, SecurityGroup>,
    tap_exists: &dyn Fn(&str) -> bool,
) -> Ruleset {
    let mut rs = Ruleset::default();
    let mut used: BTreeSet<String> = BTreeSet::new();
    let mut zones: BTreeMap<String, bool> = BTreeMap::new();
    for rec in records {
        let ann = annotations.get(&rec.uid).cloned().unwrap_or_default();
        for nic in &rec.nics {
            zones.insert(
                nic.bridge.clone(),
                nic.network_type == NetworkType::Isolated,
            );
            if !tap_exists(&nic.tap) {
                continue;
            }
            let names: Vec<String> = security_groups_for(&ann, &nic.iface)
                .into_iter()
                .map(|g| format!("{}/{g}", rec.namespace))
                .filter(|g| groups.contains_key(g))
                .collect();
            used.extend(names.iter().cloned());
            rs.ports.push(Port {
                tap: nic.tap.clone(),
                mac: nic.mac.clone(),
                ip: Some(nic.ip),
                groups: names,
            });
        }
    }
    // Groups named as a remote side are needed too (their member sets).
    let mut pending: Vec<String> = used.iter().cloned().collect();
    while let Some(g) = pending.pop() {
        if let Some(sg) = groups.get(&g) {
            let ns = g.split_once('/').map(|(n, _)| n).unwrap_or_default();
            for r in sg.spec.ingress.iter().chain(&sg.spec.egress) {
                if let Some(remote) = &r.security_group {
                    let full = format!("{ns}/{remote}");
                    if groups.contains_key(&full) && used.insert(full.clone()) {
                        pending.push(full);
                    }
                }
            }
        }
    }
    for name in &used {
        let Some(sg) = groups.get(name) else { continue };
        let ns = name.split_once('/').map(|(n, _)| n).unwrap_or_default();
        let conv = |r: &krvirt_api::network::SecurityRule| Rule {
            proto: match r.protocol {
                krvirt_api::network::RuleProtocol::Any => Proto::Any,
                krvirt_api::network::RuleProtocol::Tcp => Proto::Tcp,
                krvirt_api::network::RuleProtocol::Udp => Proto::Udp,
                krvirt_api::network::RuleProtocol::Icmp => Proto::Icmp,
            },
            ports: r.port.map(|p| (p, r.end_port.unwrap_or(p))),
            cidrs: r.cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
            remote_group: r
                .security_group
                .as_ref()
                .map(|g| format!("{ns}/{g}"))
                .filter(|g| used.contains(g)),
        };
        rs.groups.push(Group {
            name: name.clone(),
            ingress: sg.spec.ingress.iter().map(conv).collect(),
            egress: sg.spec.egress.iter().map(conv).collect(),
        });
    }
    rs.zones = zones
        .into_iter()
        .map(|(bridge, isolated)| Zone { bridge, isolated })
        .collect();
    rs
}

/// Pure: the security-group members whose NICs are on other hosts (VMIs
/// not among `local_uids` and not ended), for the groups' address sets
/// here: a rule naming a group as its remote side matches members
/// anywhere in the cluster.
pub fn remote_members(
    vmis: &[VirtualMachineInstance],
    local_uids: &BTreeSet<String>,
    groups: &BTreeMap<String, SecurityGroup>,
) -> Vec<Member> {
    let mut out = Vec::new();
    for v in vmis {
        let uid = v.metadata.uid.clone().unwrap_or_default();
        let st = v.status.as_ref();
        if local_uids.contains(&uid)
            || st.and_then(|s| s.node_name.as_deref()).is_none()
            || st.and_then(|s| s.phase).is_some_and(|p| p.is_final())
        {
            continue;
        }
        let Some(Ok(assigned)) = interface_assignments(&v.metadata.annotations) else {
            continue;
        };
        let ns = v.metadata.namespace();
        for a in assigned {
            let Some(ip) = a.ip.as_deref().and_then(|i| i.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            let names: Vec<String> = security_groups_for(&v.metadata.annotations, &a.name)
                .into_iter()
                .map(|g| format!("{ns}/{g}"))
                .filter(|g| groups.contains_key(g))
                .collect();
            if !names.is_empty() {
                out.push(Member { ip, groups: names });
            }
        }
    }
    out.sort_by(|a, b| (a.ip, &a.groups).cmp(&(b.ip, &b.groups)));
    out
}

/// One Network's VXLAN tunnel on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    pub network: String,
    pub vni: u32,
    /// The Network's bridge (the tunnel is one of its ports).
    pub bridge: String,
    /// The other member hosts' addresses (head-end replication targets).
    pub peers: Vec<Ipv4Addr>,
}

/// Pure: the hosts each Network has VMIs on, by Network name. A VMI is on
/// the host it is bound to and, while a live migration is under way, on
/// its target too (the target joins the segment before the switch-over).
/// VMIs that have ended hold no place.
pub fn network_members(vmis: &[VirtualMachineInstance]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for v in vmis {
        let Some(Ok(assigned)) = interface_assignments(&v.metadata.annotations) else {
            continue;
        };
        let st = v.status.as_ref();
        if st.and_then(|s| s.phase).is_some_and(|p| p.is_final()) {
            continue;
        }
        let mut hosts: Vec<String> = Vec::new();
        if let Some(n) = st.and_then(|s| s.node_name.clone()) {
            hosts.push(n);
        }
        if let Some(ms) = st.and_then(|s| s.migration_state.as_ref())
            && !ms.is_finished()
            && let Some(t) = ms.target_node.clone()
        {
            hosts.push(t);
        }
        for a in assigned {
            if let (Some(net), Some(_)) = (a.network, a.vni) {
                out.entry(net).or_default().extend(hosts.iter().cloned());
            }
        }
    }
    out
}

/// Pure: the tunnels host `me` (at `my_addr`) needs for its local NICs:
/// one per Network with a VNI that has members on other hosts, flooding
/// to those hosts' addresses (hosts without a known address are left out
/// until they publish one).
pub fn tunnels(
    me: &str,
    my_addr: Ipv4Addr,
    local: &[NicRecord],
    members: &BTreeMap<String, BTreeSet<String>>,
    addresses: &BTreeMap<String, Ipv4Addr>,
) -> Vec<Tunnel> {
    let mut out: Vec<Tunnel> = Vec::new();
    for nic in local {
        let Some(vni) = nic.vni else { continue };
        if out.iter().any(|t| t.network == nic.network) {
            continue;
        }
        let mut peers: Vec<Ipv4Addr> = members
            .get(&nic.network)
            .into_iter()
            .flatten()
            .filter(|h| h.as_str() != me)
            .filter_map(|h| addresses.get(h).copied())
            .filter(|ip| *ip != my_addr)
            .collect();
        peers.sort();
        peers.dedup();
        if peers.is_empty() {
            continue;
        }
        out.push(Tunnel {
            network: nic.network.clone(),
            vni,
            bridge: nic.bridge.clone(),
            peers,
        });
    }
    out.sort_by(|a, b| a.network.cmp(&b.network));
    out
}

/// Pure: each Host's `InternalIP` (IPv4), by host name.
pub fn host_addresses(hosts: &[krvirt_api::host::Host]) -> BTreeMap<String, Ipv4Addr> {
    hosts
        .iter()
        .filter_map(|h| {
            let ip = h
                .status
                .as_ref()?
                .addresses
                .iter()
                .filter(|a| a.type_ == "InternalIP")
                .find_map(|a| a.address.parse::<Ipv4Addr>().ok())?;
            Some((h.metadata.name().to_string(), ip))
        })
        .collect()
}

/// This agent's host networking.
pub struct HostNet {
    data_dir: PathBuf,
    client: Client,
    node_name: String,
    table: String,
    firewall: tokio::sync::Mutex<Firewall>,
    netlink: tokio::sync::OnceCell<Option<Netlink>>,
    /// Wakes the sync loop.
    kick: tokio::sync::Notify,
    /// uid owning the taps (the user QEMU runs as, which opens them).
    tap_owner: std::sync::atomic::AtomicU32,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetPrepError {
    let context = context.into();
    move |source| NetPrepError::Io { context, source }
}

impl HostNet {
    pub fn new(data_dir: &Path, client: Client, node_name: &str) -> HostNet {
        let table = table_name(data_dir);
        HostNet {
            data_dir: data_dir.to_path_buf(),
            client,
            node_name: node_name.to_string(),
            firewall: tokio::sync::Mutex::new(
                Firewall::new(&table).unwrap_or_else(|_| unreachable_table()),
            ),
            table,
            netlink: tokio::sync::OnceCell::new(),
            kick: tokio::sync::Notify::new(),
            // Unset: krvirt's default QEMU user if it exists (see `tap_owner`).
            tap_owner: std::sync::atomic::AtomicU32::new(u32::MAX),
        }
    }

    /// The owner of new taps: the uid set with [`HostNet::set_tap_owner`],
    /// else krvirt's default QEMU user if it exists, else root (QEMU running
    /// as root opens any tap).
    fn tap_owner(&self) -> u32 {
        match self.tap_owner.load(std::sync::atomic::Ordering::Relaxed) {
            u32::MAX => krvirt_hypervisor::QemuUser::lookup(krvirt_hypervisor::DEFAULT_QEMU_USER)
                .ok()
                .flatten()
                .map_or(0, |u| u.uid),
            uid => uid,
        }
    }

    /// The uid QEMU runs as: taps are handed to it (`TUNSETOWNER`), so an
    /// unprivileged QEMU can open them and no other user can.
    pub fn set_tap_owner(&self, uid: u32) {
        self.tap_owner
            .store(uid, std::sync::atomic::Ordering::Relaxed);
    }

    /// The nft table this agent owns.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn net_dir(&self) -> PathBuf {
        self.data_dir.join("net")
    }

    fn run_root(&self) -> PathBuf {
        self.data_dir.join("run").join("vmi")
    }

    fn dhcp(&self, nic: &NicRecord) -> Result<DhcpServer, NetPrepError> {
        let subnet: Cidr = nic.subnet.parse()?;
        Ok(DhcpServer {
            bridge: nic.bridge.clone(),
            subnet,
            router: (nic.network_type != NetworkType::Isolated).then_some(nic.gateway),
            dir: self.net_dir().join("dhcp").join(&nic.network),
        })
    }

    async fn netlink(&self) -> Result<&Netlink, NetPrepError> {
        let nl = self
            .netlink
            .get_or_init(|| async {
                match Netlink::connect() {
                    Ok(n) => Some(n),
                    Err(e) => {
                        warn!(error = %e, "no netlink session");
                        None
                    }
                }
            })
            .await;
        nl.as_ref().ok_or_else(|| NetPrepError::Invalid {
            field: "host".into(),
            message: "cannot open a netlink socket (CAP_NET_ADMIN needed)".into(),
        })
    }

    /// Every NIC record of this host (run directories with a `net.json`).
    pub fn records(&self) -> Vec<NetRecord> {
        let Ok(entries) = std::fs::read_dir(self.run_root()) else {
            return Vec::new();
        };
        let mut out: Vec<NetRecord> = entries
            .flatten()
            .filter_map(|e| {
                let text = std::fs::read(e.path().join(NET_RECORD)).ok()?;
                serde_json::from_slice(&text).ok()
            })
            .collect();
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        out
    }

    /// `Some(delay)` while the VMI's interfaces are not assigned yet.
    pub fn wait_for_assignment(&self, vmi: &VirtualMachineInstance) -> Option<Duration> {
        (!vmi.spec.domain.devices.interfaces.is_empty()
            && !vmi.metadata.annotations.contains_key(INTERFACES_ANNOTATION))
        .then_some(Duration::from_millis(300))
    }

    /// Set up the host side of `vmi`'s NICs in `run_dir` (which exists).
    pub async fn prepare(
        &self,
        vmi: &VirtualMachineInstance,
        run_dir: &Path,
    ) -> Result<Vec<NicRecord>, NetPrepError> {
        let nics = match nic_records(vmi) {
            None => return Ok(Vec::new()),
            Some(r) => r?,
        };
        if nics.is_empty() {
            return Ok(nics);
        }
        let rec = NetRecord {
            uid: vmi.metadata.uid.clone().unwrap_or_default(),
            namespace: vmi.metadata.namespace().to_string(),
            name: vmi.metadata.name().to_string(),
            nics: nics.clone(),
        };
        let path = run_dir.join(NET_RECORD);
        let text = serde_json::to_vec_pretty(&rec).map_err(|e| NetPrepError::Invalid {
            field: "net record".into(),
            message: e.to_string(),
        })?;
        std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
        let nl = self.netlink().await?;
        for nic in &nics {
            let subnet: Cidr = nic.subnet.parse()?;
            nl.ensure_bridge(&nic.bridge).await?;
            nl.ensure_address(&nic.bridge, nic.gateway, subnet.prefix)
                .await?;
            if nic.vni.is_some() {
                // One gateway MAC on every host (the gateway address is on
                // every host too): a migrated guest's ARP cache stays right.
                nl.ensure_mac(&nic.bridge, &krvirt_api::network::gateway_mac(&nic.network))
                    .await?;
            }
            if let Some(up) = &nic.uplink
                && krvirt_net::link::master_of(up).as_deref() != Some(nic.bridge.as_str())
            {
                nl.attach(up, &nic.bridge).await?;
            }
            tap::create(&nic.tap, self.tap_owner())?;
            nl.attach(&nic.tap, &nic.bridge).await?;
        }
        self.record_host(&nics)?;
        // Leases, NAT and the firewall (the new ports' anti-spoofing and
        // groups) before the guest runs; the API may blink, so a few tries.
        let mut tries = 0;
        loop {
            match self.sync().await {
                Ok(()) => break,
                Err(e) if tries < 4 => {
                    tries += 1;
                    debug!(error = %e, tries, "network sync before launch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
        info!(vmi = %rec.name, nics = nics.len(), "network prepared");
        Ok(nics)
    }

    fn record_host(&self, nics: &[NicRecord]) -> Result<(), NetPrepError> {
        let dir = self.net_dir();
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let path = dir.join(HOST_RECORD);
        let mut host: HostRecord = std::fs::read(&path)
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .unwrap_or_default();
        host.table = self.table.clone();
        let before = host.bridges.len();
        host.bridges.extend(nics.iter().map(|n| n.bridge.clone()));
        if before != host.bridges.len() || !path.exists() {
            let text = serde_json::to_vec_pretty(&host).map_err(|e| NetPrepError::Invalid {
                field: "host record".into(),
                message: e.to_string(),
            })?;
            std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
        }
        Ok(())
    }

    /// The VMI `uid` stopped here: remove its taps, update leases and rules.
    pub async fn release(&self, uid: &str) {
        let path = self.run_root().join(uid).join(NET_RECORD);
        let Some(rec) = std::fs::read(&path)
            .ok()
            .and_then(|t| serde_json::from_slice::<NetRecord>(&t).ok())
        else {
            return;
        };
        for nic in &rec.nics {
            if let Err(e) = tap::delete(&nic.tap) {
                warn!(tap = %nic.tap, error = %e, "cannot delete tap");
            }
        }
        let _ = std::fs::remove_file(&path);
        self.kick.notify_one();
    }

    /// Whether dnsmasq's lease file shows `nic`'s MAC holding its address.
    pub fn leased(&self, nic: &NicRecord) -> bool {
        let Ok(server) = self.dhcp(nic) else {
            return false;
        };
        let Ok(text) = std::fs::read_to_string(server.dir.join("leases")) else {
            return false;
        };
        let ip = nic.ip.to_string();
        text.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 3 && f[1].eq_ignore_ascii_case(&nic.mac) && f[2] == ip
        })
    }

    /// `status.interfaces` for a VMI planned as `config`.
    pub fn interfaces_status(
        &self,
        config: &VmConfig,
        uid: &str,
    ) -> Vec<VirtualMachineInstanceNetworkInterface> {
        let records: Vec<NicRecord> = std::fs::read(self.run_root().join(uid).join(NET_RECORD))
            .ok()
            .and_then(|t| serde_json::from_slice::<NetRecord>(&t).ok())
            .map(|r| r.nics)
            .unwrap_or_default();
        interfaces_status(config, &records, &|n| self.leased(n))
    }

    /// Refresh the lease confirmation in an observed status.
    pub fn refresh_status(
        &self,
        uid: &str,
        interfaces: &mut [VirtualMachineInstanceNetworkInterface],
    ) {
        let Some(rec) = std::fs::read(self.run_root().join(uid).join(NET_RECORD))
            .ok()
            .and_then(|t| serde_json::from_slice::<NetRecord>(&t).ok())
        else {
            return;
        };
        for st in interfaces.iter_mut() {
            if let Some(nic) = rec.nics.iter().find(|n| Some(&n.iface) == st.name.as_ref())
                && self.leased(nic)
            {
                st.info_source = Some("domain, dhcp-lease".into());
            }
        }
    }

    async fn security_groups(&self) -> Result<BTreeMap<String, SecurityGroup>, NetPrepError> {
        let kind =
            krvirt_api::find_kind("securitygroups").ok_or_else(|| NetPrepError::Invalid {
                field: "kinds".into(),
                message: "SecurityGroup is not registered".into(),
            })?;
        let list = self
            .client
            .list(kind, &ListParams::all_namespaces())
            .await
            .map_err(|e| NetPrepError::Invalid {
                field: "securitygroups".into(),
                message: e.to_string(),
            })?;
        let mut out = BTreeMap::new();
        for o in list.items {
            if let Ok(sg) = serde_json::from_value::<SecurityGroup>(o) {
                out.insert(
                    format!("{}/{}", sg.metadata.namespace(), sg.metadata.name()),
                    sg,
                );
            }
        }
        Ok(out)
    }

    /// Every VMI in the cluster (the overlay needs to know where each
    /// Network's VMIs are; the firewall needs this host's annotations).
    async fn vmis(&self) -> Result<Vec<VirtualMachineInstance>, NetPrepError> {
        let kind = krvirt_api::find_kind("virtualmachineinstances").ok_or_else(|| {
            NetPrepError::Invalid {
                field: "kinds".into(),
                message: "VirtualMachineInstance is not registered".into(),
            }
        })?;
        let list = self
            .client
            .list(kind, &ListParams::all_namespaces())
            .await
            .map_err(|e| NetPrepError::Invalid {
                field: "virtualmachineinstances".into(),
                message: e.to_string(),
            })?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|o| serde_json::from_value::<VirtualMachineInstance>(o).ok())
            .collect())
    }

    async fn hosts(&self) -> Result<Vec<krvirt_api::host::Host>, NetPrepError> {
        let kind = krvirt_api::find_kind("hosts").ok_or_else(|| NetPrepError::Invalid {
            field: "kinds".into(),
            message: "Host is not registered".into(),
        })?;
        let list = self
            .client
            .list(kind, &ListParams::default())
            .await
            .map_err(|e| NetPrepError::Invalid {
                field: "hosts".into(),
                message: e.to_string(),
            })?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|o| serde_json::from_value(o).ok())
            .collect())
    }

    /// The bridges this agent set up (its host record).
    fn our_bridges(&self) -> BTreeSet<String> {
        std::fs::read(self.net_dir().join(HOST_RECORD))
            .ok()
            .and_then(|t| serde_json::from_slice::<HostRecord>(&t).ok())
            .map(|h| h.bridges)
            .unwrap_or_default()
    }

    /// The VXLAN devices on this agent's bridges.
    fn our_tunnels(&self) -> Vec<String> {
        let bridges = self.our_bridges();
        let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
            return Vec::new();
        };
        let mut out: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| vxlan::is_device_name(n))
            .filter(|n| krvirt_net::link::master_of(n).is_some_and(|b| bridges.contains(&b)))
            .collect();
        out.sort();
        out
    }

    /// Level-triggered overlay: each Network with NICs here and members on
    /// other hosts gets its VXLAN port on its bridge, flooding to exactly
    /// those hosts; tunnels no longer needed are removed.
    async fn sync_overlay(
        &self,
        records: &[NetRecord],
        vmis: &[VirtualMachineInstance],
    ) -> Result<(), NetPrepError> {
        let local: Vec<NicRecord> = records
            .iter()
            .flat_map(|r| &r.nics)
            .filter(|n| tap::exists(&n.tap))
            .cloned()
            .collect();
        let existing = self.our_tunnels();
        if local.iter().all(|n| n.vni.is_none()) && existing.is_empty() {
            return Ok(());
        }
        let addresses = host_addresses(&self.hosts().await?);
        let my_addr = addresses.get(&self.node_name).copied();
        let want = match my_addr {
            Some(me) => tunnels(
                &self.node_name,
                me,
                &local,
                &network_members(vmis),
                &addresses,
            ),
            None => {
                debug!("this Host publishes no InternalIP yet: no tunnels");
                Vec::new()
            }
        };
        let nl = self.netlink().await?;
        let mut names = BTreeSet::new();
        for t in &want {
            let (Some(local_ip), Some(_)) = (my_addr, krvirt_net::link::index(&t.bridge)) else {
                continue;
            };
            let spec = vxlan::VxlanSpec {
                vni: t.vni,
                local: local_ip,
                dev: None,
                port: vxlan::VXLAN_PORT,
            };
            let name = nl.ensure_vxlan(&spec, &t.bridge).await?;
            nl.ensure_mtu(&name, vxlan::GUEST_MTU).await?;
            let before = nl.vxlan_peers(&name).await.unwrap_or_default();
            nl.set_vxlan_peers(&name, &t.peers).await?;
            let (added, removed) = vxlan::flood_diff(&before, &t.peers);
            if !added.is_empty() || !removed.is_empty() {
                info!(network = %t.network, device = %name, ?added, ?removed, "overlay peers changed");
            }
            names.insert(name);
        }
        for dev in existing {
            if !names.contains(&dev) {
                info!(device = %dev, "overlay tunnel no longer needed");
                nl.delete(&dev).await?;
            }
        }
        Ok(())
    }

    /// Recompute leases, NAT and the firewall from the records on disk and
    /// the API, and apply what changed.
    pub async fn sync(&self) -> Result<(), NetPrepError> {
        let mut fw = self.firewall.lock().await;
        let records = self.records();
        // DHCP: one dnsmasq per Network with NICs here.
        let mut by_net: BTreeMap<String, (NicRecord, Vec<Lease>)> = BTreeMap::new();
        for nic in records.iter().flat_map(|r| &r.nics) {
            let e = by_net
                .entry(nic.network.clone())
                .or_insert_with(|| (nic.clone(), Vec::new()));
            if tap::exists(&nic.tap) {
                e.1.push(Lease {
                    mac: nic.mac.clone(),
                    ip: nic.ip,
                });
            }
        }
        let mut nat = Vec::new();
        for (nic, leases) in by_net.values() {
            let server = self.dhcp(nic)?;
            server.set_leases(leases)?;
            if !leases.is_empty() || server.pid().is_some() {
                server.ensure_running()?;
            }
            if nic.network_type == NetworkType::Nat {
                nat.push(nic.subnet.parse::<Cidr>()?);
            }
        }
        nat.sort_by_key(|c| (u32::from(c.addr), c.prefix));
        nat.dedup();
        if !nat.is_empty() {
            krvirt_net::nat::sync(&self.table, &nat)?;
        }
        let vmis = self.vmis().await?;
        let annotations: BTreeMap<String, BTreeMap<String, String>> = vmis
            .iter()
            .filter_map(|v| Some((v.metadata.uid.clone()?, v.metadata.annotations.clone())))
            .collect();
        let groups = self.security_groups().await?;
        let mut rs = ruleset(&records, &annotations, &groups, &tap::exists);
        let local_uids: BTreeSet<String> = records.iter().map(|r| r.uid.clone()).collect();
        rs.remote = remote_members(&vmis, &local_uids, &groups);
        fw.apply(&rs)?;
        // The overlay never holds up a launch: the guest's local side
        // works without it, and the next sync tries again.
        if let Err(e) = self.sync_overlay(&records, &vmis).await {
            warn!(error = %e, "overlay sync failed; retrying at the next sync");
        }
        Ok(())
    }

    /// Remove taps on this agent's bridges whose run directory is gone.
    fn sweep(&self) {
        let host: HostRecord = std::fs::read(self.net_dir().join(HOST_RECORD))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .unwrap_or_default();
        if host.bridges.is_empty() {
            return;
        }
        let live: Vec<String> = self.records().into_iter().map(|r| r.uid).collect();
        let ours =
            |t: &str| krvirt_net::link::master_of(t).is_some_and(|b| host.bridges.contains(&b));
        match tap::sweep(&live, ours) {
            Ok(gone) if !gone.is_empty() => info!(taps = ?gone, "swept taps of VMIs that are gone"),
            Ok(_) => {}
            Err(e) => debug!(error = %e, "tap sweep failed"),
        }
    }

    /// Keep leases and rules in step: on SecurityGroup changes, on
    /// [`HostNet::release`], and every few seconds.
    pub async fn run(&self) {
        self.sweep();
        let Some(kind) = krvirt_api::find_kind("securitygroups") else {
            return;
        };
        let mut groups = self.client.watch_resumable(
            kind,
            &ListParams::all_namespaces(),
            ResumeOptions {
                max_consecutive_failures: u32::MAX,
                ..Default::default()
            },
        );
        loop {
            if (!self.records().is_empty() || !self.our_tunnels().is_empty())
                && let Err(e) = self.sync().await
            {
                debug!(error = %e, "network sync failed");
            }
            tokio::select! {
                ev = groups.next() => {
                    if ev.is_none() {
                        tokio::time::sleep(RESYNC).await;
                    }
                }
                _ = self.kick.notified() => self.sweep(),
                _ = tokio::time::sleep(RESYNC) => self.sweep(),
            }
        }
    }
}

fn unreachable_table() -> Firewall {
    // table_name() always yields a valid name ("kv" + 8 hex digits).
    Firewall::new("krvirt").expect("the fixed table name is valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vmi(ann: serde_json::Value) -> VirtualMachineInstance {
        serde_json::from_value(json!({
            "metadata": {"name": "a", "namespace": "ns", "uid": "0a1b2c3d-0000-4000-8000-00000000cafe",
                         "annotations": ann},
            "spec": {"domain": {"devices": {"interfaces": [
                {"name": "default", "masquerade": {}}, {"name": "blue", "bridge": {}}]}},
                "networks": [{"name": "default", "pod": {}}, {"name": "blue", "multus": {"networkName": "blue"}}]}
        }))
        .unwrap()
    }

    fn assigned() -> String {
        json!([
            {"name": "default", "mac": "02:00:00:00:00:01"},
            {"name": "blue", "mac": "02:00:00:00:00:02", "network": "blue", "networkType": "bridge",
             "bridge": "kvbr-blue", "subnet": "10.9.0.0/24", "gateway": "10.9.0.1", "ip": "10.9.0.7"}
        ])
        .to_string()
    }

    #[test]
    fn records_follow_the_assignment() {
        assert!(nic_records(&vmi(json!({}))).is_none());
        let v = vmi(json!({INTERFACES_ANNOTATION: assigned()}));
        let r = nic_records(&v).unwrap().unwrap();
        assert_eq!(r.len(), 1, "the user-networking NIC needs no host side");
        assert_eq!(r[0].tap, "kvt0a1b2c3d001");
        assert_eq!(r[0].ip, Ipv4Addr::new(10, 9, 0, 7));
        let broken = vmi(json!({INTERFACES_ANNOTATION: "[{\"name\": \"blue\"}]"}));
        let e = nic_records(&broken).unwrap().unwrap_err().to_string();
        assert!(e.contains("krvirt.io/interfaces"), "{e}");
    }

    #[test]
    fn ruleset_from_records_annotations_and_groups() {
        let v = vmi(json!({INTERFACES_ANNOTATION: assigned()}));
        let rec = NetRecord {
            uid: v.metadata.uid.clone().unwrap(),
            namespace: "ns".into(),
            name: "a".into(),
            nics: nic_records(&v).unwrap().unwrap(),
        };
        let mut ann = BTreeMap::new();
        ann.insert(
            rec.uid.clone(),
            [(
                "krvirt.io/security-groups.blue".to_string(),
                "web".to_string(),
            )]
            .into_iter()
            .collect(),
        );
        let sg: SecurityGroup = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"ingress": [{"protocol": "tcp", "port": 80, "securityGroup": "clients"}]}}))
        .unwrap();
        let clients: SecurityGroup = serde_json::from_value(json!({
            "metadata": {"name": "clients", "namespace": "ns"}, "spec": {}}))
        .unwrap();
        let mut groups = BTreeMap::new();
        groups.insert("ns/web".to_string(), sg);
        groups.insert("ns/clients".to_string(), clients);
        let rs = ruleset(std::slice::from_ref(&rec), &ann, &groups, &|_| true);
        assert_eq!(rs.ports.len(), 1);
        assert_eq!(rs.ports[0].groups, vec!["ns/web"]);
        assert_eq!(
            rs.zones,
            vec![Zone {
                bridge: "kvbr-blue".into(),
                isolated: false
            }]
        );
        let names: Vec<&str> = rs.groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, vec!["ns/clients", "ns/web"]);
        let web = &rs.groups[1];
        assert_eq!(web.ingress[0].ports, Some((80, 80)));
        assert_eq!(web.ingress[0].remote_group.as_deref(), Some("ns/clients"));
        // The rules compile (nft syntax checked by krvirt-net's own tests).
        krvirt_net::firewall::compile(&rs, "kvtest").unwrap();
        // A tap that is gone is no port, but its bridge stays a zone.
        let rs = ruleset(&[rec], &ann, &groups, &|_| false);
        assert!(rs.ports.is_empty() && rs.groups.is_empty() && rs.zones.len() == 1);
    }

    /// A VMI named `name` on Network `net` (VNI 77 unless `vni` is None),
    /// bound to `node`, optionally migrating to `target`.
    fn placed(
        name: &str,
        net: &str,
        vni: Option<u32>,
        node: &str,
        target: Option<&str>,
    ) -> VirtualMachineInstance {
        let asg = json!([{"name": "n", "mac": "02:00:00:00:00:09", "network": net,
            "networkType": "isolated", "bridge": "kvbr-x", "subnet": "10.9.0.0/24",
            "gateway": "10.9.0.1", "ip": "10.9.0.9", "vni": vni}])
        .to_string();
        let mut status = json!({"phase": "Running", "nodeName": node});
        if let Some(t) = target {
            status["migrationState"] = json!({"sourceNode": node, "targetNode": t,
                "migrationUid": "m1"});
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                         "annotations": {INTERFACES_ANNOTATION: asg}},
            "spec": {"domain": {"devices": {"interfaces": [{"name": "n", "bridge": {}}]}},
                     "networks": [{"name": "n", "multus": {"networkName": net}}]},
            "status": status
        }))
        .unwrap()
    }

    fn nic(net: &str, vni: Option<u32>) -> NicRecord {
        NicRecord {
            iface: "n".into(),
            tap: "kvt0".into(),
            mac: "02:00:00:00:00:01".into(),
            ip: Ipv4Addr::new(10, 9, 0, 5),
            network: net.into(),
            network_type: NetworkType::Isolated,
            bridge: format!("br-{net}"),
            subnet: "10.9.0.0/24".into(),
            gateway: Ipv4Addr::new(10, 9, 0, 1),
            uplink: None,
            vni,
        }
    }

    #[test]
    fn overlay_members_and_tunnels() {
        let ip = |n: u8| Ipv4Addr::new(192, 168, 0, n);
        let addresses: BTreeMap<String, Ipv4Addr> = [("h1", 1), ("h2", 2), ("h3", 3)]
            .into_iter()
            .map(|(h, n)| (h.to_string(), ip(n)))
            .collect();
        let mut vmis = vec![
            placed("a", "blue", Some(77), "h1", None),
            placed("b", "blue", Some(77), "h2", None),
            placed("c", "red", Some(78), "h3", None),
        ];
        let m = network_members(&vmis);
        assert_eq!(m["blue"], ["h1", "h2"].map(String::from).into());
        assert_eq!(m["red"], ["h3"].map(String::from).into());
        // h1 floods blue to h2 only; red has no NIC on h1: no tunnel.
        let local = [nic("blue", Some(77))];
        let t = tunnels("h1", ip(1), &local, &m, &addresses);
        assert_eq!(
            t,
            vec![Tunnel {
                network: "blue".into(),
                vni: 77,
                bridge: "br-blue".into(),
                peers: vec![ip(2)],
            }]
        );
        // Alone on its Network (h3 on red): no tunnel at all.
        assert!(tunnels("h3", ip(3), &[nic("red", Some(78))], &m, &addresses).is_empty());
        // b migrates to h3: h3 joins blue before the switch-over.
        vmis[1] = placed("b", "blue", Some(77), "h2", Some("h3"));
        let m = network_members(&vmis);
        assert_eq!(m["blue"], ["h1", "h2", "h3"].map(String::from).into());
        let t = tunnels("h1", ip(1), &local, &m, &addresses);
        assert_eq!(t[0].peers, vec![ip(2), ip(3)]);
        // After it: h2 leaves blue.
        vmis[1] = placed("b", "blue", Some(77), "h3", None);
        let t = tunnels("h1", ip(1), &local, &network_members(&vmis), &addresses);
        assert_eq!(t[0].peers, vec![ip(3)]);
        // A host without an address is left out until it publishes one;
        // a VMI that ended holds no place; no VNI: no overlay.
        let mut few = addresses.clone();
        few.remove("h3");
        assert!(tunnels("h1", ip(1), &local, &network_members(&vmis), &few).is_empty());
        let mut ended = placed("d", "blue", Some(77), "h2", None);
        ended.status.as_mut().unwrap().phase = Some(krvirt_api::kubevirt::VmiPhase::Failed);
        assert!(network_members(&[ended]).is_empty());
        let plain = [placed("e", "green", None, "h2", None)];
        assert!(network_members(&plain).is_empty());
        assert!(tunnels("h1", ip(1), &[nic("green", None)], &m, &addresses).is_empty());
    }

    #[test]
    fn group_members_on_other_hosts() {
        let mut a = placed("a", "blue", Some(77), "h1", None);
        a.metadata
            .annotations
            .insert("krvirt.io/security-groups".into(), "clients, nosuch".into());
        let b = placed("b", "blue", Some(77), "h2", None);
        let mut ended = a.clone();
        ended.metadata.uid = Some("uid-ended".into());
        ended.status.as_mut().unwrap().phase = Some(krvirt_api::kubevirt::VmiPhase::Succeeded);
        let clients: SecurityGroup = serde_json::from_value(json!({
            "metadata": {"name": "clients", "namespace": "ns"}, "spec": {}}))
        .unwrap();
        let groups: BTreeMap<String, SecurityGroup> =
            [("ns/clients".to_string(), clients)].into_iter().collect();
        let vmis = [a, b, ended];
        // From another host: a is a member of ns/clients (nosuch does not
        // exist); b is in no group; the ended VMI holds no address.
        let m = remote_members(&vmis, &BTreeSet::new(), &groups);
        assert_eq!(
            m,
            vec![Member {
                ip: Ipv4Addr::new(10, 9, 0, 9),
                groups: vec!["ns/clients".into()]
            }]
        );
        // On a's own host, a is a local port, not a remote member.
        let local: BTreeSet<String> = ["uid-a".to_string()].into();
        assert!(remote_members(&vmis, &local, &groups).is_empty());
    }

    #[test]
    fn host_addresses_from_host_objects() {
        let hosts: Vec<krvirt_api::host::Host> = serde_json::from_value(json!([
            {"metadata": {"name": "h1"}, "status": {"addresses": [
                {"type": "Hostname", "address": "h1"},
                {"type": "InternalIP", "address": "10.0.0.1"}]}},
            {"metadata": {"name": "h2"}, "status": {"addresses": [
                {"type": "Hostname", "address": "h2"}]}},
            {"metadata": {"name": "h3"}}
        ]))
        .unwrap();
        let a = host_addresses(&hosts);
        assert_eq!(a.len(), 1);
        assert_eq!(a["h1"], Ipv4Addr::new(10, 0, 0, 1));
    }

    #[test]
    fn tables_differ_per_data_dir() {
        let a = table_name(Path::new("/var/lib/krvirt"));
        assert_eq!(a, table_name(Path::new("/var/lib/krvirt")));
        assert_ne!(a, table_name(Path::new("/tmp/other")));
        assert!(Firewall::new(&a).is_ok());
    }
}
