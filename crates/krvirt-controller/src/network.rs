//! The network controller: decides where each VMI interface is attached
//! and allocates its address, server-side, before the host agent launches
//! the VMI (agents never allocate).
//!
//! For every VMI with interfaces it writes the annotation
//! [`INTERFACES_ANNOTATION`]: per interface the krvirt Network (`pod` ->
//! the Network [`DEFAULT_NETWORK`], `multus.networkName` -> the Network of
//! that name), its bridge, subnet and gateway, the MAC (the interface's
//! `macAddress`, else stable per namespace/name/interface so a VM keeps it
//! across restarts) and the address, allocated through krvirt-net's IPAM in
//! the store (one key per address, create-if-absent: never handed out
//! twice). A `pod` interface when no `default` Network exists gets no
//! Network: the agent falls back to QEMU user networking (explicitly).
//!
//! Every Network gets its VXLAN VNI once ([`assign_vnis`]), in
//! `status.vni`, as it appears; the assignments carry it to the agents.
//!
//! A VMI holding addresses carries the finalizer [`IPAM_FINALIZER`]; once
//! it is being deleted and the host agent has let it go (the host finalizer
//! is gone), its addresses are released and the finalizer removed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use krvirt_api::KindInfo;
use krvirt_api::event::{ObjectReference, WARNING};
use krvirt_api::kubevirt::{VMI_HOST_FINALIZER, VirtualMachineInstance};
use krvirt_api::network::{
    DEFAULT_NETWORK, INTERFACES_ANNOTATION, IPAM_FINALIZER, InterfaceAssignment, Network,
    derive_vni, interface_assignments, stable_mac, uses_overlay,
};
use krvirt_net::ipam::Pool;
use krvirt_net::{Cidr, Ipam};
use krvirt_server::events::EventRecorder;
use krvirt_server::{ApiError, Registry, Selector, Subresource};
use krvirt_store::Store;
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::queue::{Key, WorkQueue};
use crate::runner::{ControllerError, decode};

/// Event reason when an interface's Network does not exist (yet).
pub const REASON_NETWORK_NOT_FOUND: &str = "NetworkNotFound";
/// Event reason when an address cannot be allocated.
pub const REASON_IPAM_FAILED: &str = "AddressAllocationFailed";

/// Why an interface cannot be attached yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// The named Network does not exist.
    NoNetwork { iface: String, network: String },
    /// The Network exists but its addressing is unusable.
    BadNetwork { network: String, message: String },
}

impl std::fmt::Display for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pending::NoNetwork { iface, network } => write!(
                f,
                "interface {iface}: krvirt.io/v1 Network {network:?} does not exist (create it with krvirt apply)"
            ),
            Pending::BadNetwork { network, message } => write!(f, "Network {network}: {message}"),
        }
    }
}

/// What one interface should be attached to (before the address).
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub iface: String,
    pub mac: String,
    /// `None`: QEMU user networking.
    pub network: Option<(String, Network)>,
}

/// Normalize a user MAC (`DE-AD-…` / `de:ad:…`) to lowercase colon form.
pub fn normalize_mac(mac: &str) -> String {
    mac.replace('-', ":").to_ascii_lowercase()
}

/// Pure: the attachment of every interface of `vmi`, given the Networks
/// that exist (by name).
pub fn attachments(
    vmi: &VirtualMachineInstance,
    networks: &BTreeMap<String, Network>,
) -> Result<Vec<Attachment>, Pending> {
    let ns = vmi.metadata.namespace();
    let name = vmi.metadata.name();
    let mut out = Vec::new();
    for iface in &vmi.spec.domain.devices.interfaces {
        let mac = iface
            .mac_address
            .as_deref()
            .filter(|m| !m.is_empty())
            .map(normalize_mac)
            .unwrap_or_else(|| stable_mac(ns, name, &iface.name));
        let net = vmi.spec.network(&iface.name);
        let wanted: Option<(&str, bool)> = match net {
            Some(n) if n.multus.is_some() => n.multus.as_ref().map(|m| (m.krvirt_network(), true)),
            Some(n) if n.pod.is_some() => Some((DEFAULT_NETWORK, false)),
            _ => None,
        };
        let network = match wanted {
            None => None,
            Some((n, required)) => match networks.get(n) {
                Some(obj) => Some((n.to_string(), obj.clone())),
                None if required => {
                    return Err(Pending::NoNetwork {
                        iface: iface.name.clone(),
                        network: n.to_string(),
                    });
                }
                // The pod network without a `default` Network: user networking.
                None => None,
            },
        };
        out.push(Attachment {
            iface: iface.name.clone(),
            mac,
            network,
        });
    }
    Ok(out)
}

/// The IPAM pool of a Network.
pub fn pool_of(name: &str, net: &Network) -> Result<(Pool, u8), Pending> {
    let bad = |message: String| Pending::BadNetwork {
        network: name.to_string(),
        message,
    };
    let ((addr, prefix), gw, range) = net
        .spec
        .addressing()
        .ok_or_else(|| bad("invalid subnet/gateway/dhcp range".into()))?;
    let pool =
        Pool::new(name, Cidr { addr, prefix }, gw, Some(range)).map_err(|e| bad(e.to_string()))?;
    Ok((pool, prefix))
}

/// The network controller.
pub struct NetworkController {
    registry: Registry,
    vmi_kind: &'static KindInfo,
    net_kind: &'static KindInfo,
    queue: WorkQueue,
    ipam: Ipam<dyn Store>,
    events: EventRecorder,
    /// Held while Networks are listed and VNIs assigned.
    vni_lock: tokio::sync::Mutex<()>,
}

impl NetworkController {
    pub fn new(registry: Registry, events: EventRecorder) -> Result<Self, ControllerError> {
        let k = |n: &'static str| krvirt_api::find_kind(n).ok_or(ControllerError::UnknownKind(n));
        Ok(NetworkController {
            ipam: Ipam::new(registry.store().clone()),
            vmi_kind: k("virtualmachineinstances")?,
            net_kind: k("networks")?,
            registry,
            queue: WorkQueue::new(),
            events,
            vni_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Run until the task is aborted.
    pub async fn run(self) {
        let me = Arc::new(self);
        let mut tasks = Vec::new();
        for kind in [me.vmi_kind, me.net_kind] {
            let c = me.clone();
            tasks.push(tokio::spawn(async move { c.watch(kind).await }));
        }
        let c = me.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                c.queue_all().await;
            }
        }));
        while let Some(key) = me.queue.next().await {
            match me.reconcile(&key).await {
                Ok(Some(after)) => me.queue.add_after(key.clone(), after),
                Ok(None) => {}
                Err(e) => {
                    debug!(%key, error = %e, "network reconcile failed; retrying");
                    me.queue.add_after(key.clone(), Duration::from_millis(500));
                }
            }
            me.queue.done(&key);
        }
        for t in tasks {
            t.abort();
        }
    }

    async fn queue_all(&self) {
        if let Ok((items, _)) = self
            .registry
            .list(self.vmi_kind, None, &Selector::everything())
            .await
        {
            for o in &items {
                self.queue.add(key_of(o));
            }
        }
    }

    async fn watch(&self, kind: &'static KindInfo) {
        loop {
            let rv = match self
                .registry
                .list(kind, None, &Selector::everything())
                .await
            {
                Ok((items, rv)) => {
                    if kind.kind == "VirtualMachineInstance" {
                        items.iter().for_each(|o| self.queue.add(key_of(o)));
                    } else {
                        if let Err(e) = self.networks().await {
                            debug!(error = %e, "assigning VNIs failed; retried on the next event");
                        }
                        self.queue_all().await;
                    }
                    rv
                }
                Err(e) => {
                    warn!(error = %e, "network controller: list failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let mut stream = match self
                .registry
                .watch(kind, None, Selector::everything(), Some(&rv))
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "network controller: watch failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(ev) if kind.kind == "VirtualMachineInstance" => {
                        self.queue.add(key_of(&ev.object))
                    }
                    // A Network appeared or went: it gets its VNI, and
                    // VMIs waiting for it move on.
                    Ok(_) => {
                        if let Err(e) = self.networks().await {
                            debug!(error = %e, "assigning VNIs failed; retried on the next event");
                        }
                        self.queue_all().await
                    }
                    Err(_) => break,
                }
            }
        }
    }

    async fn networks(&self) -> Result<BTreeMap<String, Network>, ControllerError> {
        // One VNI assignment at a time (the watch and the worker both list).
        let _vnis = self.vni_lock.lock().await;
        let (items, _) = self
            .registry
            .list(self.net_kind, None, &Selector::everything())
            .await?;
        let mut out = BTreeMap::new();
        for o in items {
            let n: Network = decode("Network", o)?;
            out.insert(n.metadata.name().to_string(), n);
        }
        self.ensure_vnis(&mut out).await?;
        Ok(out)
    }

    /// Give every Network without one its VNI (`status.vni`), once: the
    /// status keeps it, so it never changes while the Network exists.
    async fn ensure_vnis(
        &self,
        networks: &mut BTreeMap<String, Network>,
    ) -> Result<(), ControllerError> {
        for (name, vni) in assign_vnis(networks) {
            // Only if it still has none: a VNI once given never changes.
            let written = match self
                .registry
                .modify(self.net_kind, "", &name, Subresource::Status, |o| {
                    if o.pointer("/status/vni").is_none_or(Value::is_null) {
                        if !o["status"].is_object() {
                            o["status"] = json!({});
                        }
                        o["status"]["vni"] = json!(vni);
                    }
                    Ok(())
                })
                .await
            {
                Ok(o) => o,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            };
            let held = written
                .pointer("/status/vni")
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok());
            if held == Some(vni) {
                info!(network = %name, vni, "VXLAN VNI assigned");
            }
            if let Some(n) = networks.get_mut(&name) {
                n.status.get_or_insert_with(Default::default).vni = held;
            }
        }
        Ok(())
    }

    fn vmi_ref(vmi: &VirtualMachineInstance) -> ObjectReference {
        ObjectReference {
            kind: Some("VirtualMachineInstance".into()),
            namespace: Some(vmi.metadata.namespace().to_string()),
            name: Some(vmi.metadata.name().to_string()),
            uid: vmi.metadata.uid.clone(),
            api_version: Some("kubevirt.io/v1".into()),
            ..Default::default()
        }
    }

    async fn reconcile(&self, key: &Key) -> Result<Option<Duration>, ControllerError> {
        let raw = match self
            .registry
            .get(self.vmi_kind, &key.namespace, &key.name)
            .await
        {
            Ok(v) => v,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let vmi: VirtualMachineInstance = decode("VMI", raw)?;
        let uid = vmi.metadata.uid.clone().unwrap_or_default();
        let has_fin = vmi.metadata.finalizers.iter().any(|f| f == IPAM_FINALIZER);

        if vmi.metadata.deletion_timestamp.is_some() {
            let host_holds = vmi
                .metadata
                .finalizers
                .iter()
                .any(|f| f == VMI_HOST_FINALIZER);
            if !has_fin || host_holds {
                return Ok(None);
            }
            let mut nets: Vec<String> = interface_assignments(&vmi.metadata.annotations)
                .and_then(Result::ok)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|a| a.network)
                .collect();
            // Addresses may exist before the annotation was written.
            nets.extend(self.networks().await?.into_keys());
            nets.sort();
            nets.dedup();
            let mut released = 0;
            for n in &nets {
                released += self
                    .ipam
                    .release(n, &format!("{uid}/"))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
            }
            info!(%key, released, "released the VMI's addresses");
            self.remove_finalizer(key, &uid).await?;
            return Ok(None);
        }

        if vmi.spec.domain.devices.interfaces.is_empty() {
            return Ok(None);
        }
        let networks = self.networks().await?;
        let atts = match attachments(&vmi, &networks) {
            Ok(a) => a,
            Err(p) => {
                self.events.record_ref(
                    Self::vmi_ref(&vmi),
                    WARNING,
                    REASON_NETWORK_NOT_FOUND,
                    &p.to_string(),
                );
                return Ok(Some(Duration::from_secs(5)));
            }
        };
        let needs_ipam = atts.iter().any(|a| a.network.is_some());
        if needs_ipam && !has_fin {
            // The finalizer first: an address is never allocated for a VMI
            // that could go without releasing it.
            self.add_finalizer(key, &uid).await?;
            return Ok(Some(Duration::ZERO));
        }
        let mut out = Vec::new();
        for a in atts {
            let mut asg = InterfaceAssignment {
                name: a.iface.clone(),
                mac: a.mac.clone(),
                ..Default::default()
            };
            if let Some((name, net)) = &a.network {
                let (pool, prefix) = match pool_of(name, net) {
                    Ok(p) => p,
                    Err(p) => {
                        self.events.record_ref(
                            Self::vmi_ref(&vmi),
                            WARNING,
                            REASON_IPAM_FAILED,
                            &p.to_string(),
                        );
                        return Ok(Some(Duration::from_secs(5)));
                    }
                };
                let owner = format!("{uid}/{}", a.iface);
                let ip = match self.ipam.allocate(&pool, &owner, Some(&a.mac)).await {
                    Ok(ip) => ip,
                    Err(e) => {
                        self.events.record_ref(
                            Self::vmi_ref(&vmi),
                            WARNING,
                            REASON_IPAM_FAILED,
                            &format!("interface {}: {e}", a.iface),
                        );
                        return Ok(Some(Duration::from_secs(5)));
                    }
                };
                asg.network = Some(name.clone());
                asg.network_type = Some(net.spec.type_);
                asg.bridge = Some(net.spec.bridge_name(name));
                asg.subnet = Some(format!("{}/{prefix}", pool.subnet.network()));
                asg.gateway = Some(pool.gateway.to_string());
                asg.ip = Some(ip.to_string());
                if net.spec.type_ == krvirt_api::network::NetworkType::Bridge {
                    asg.uplink = net.spec.uplink.clone();
                }
                if uses_overlay(&net.spec) {
                    asg.vni = net.status.as_ref().and_then(|s| s.vni);
                }
            }
            out.push(asg);
        }
        let text = serde_json::to_string(&out).map_err(|source| ControllerError::Decode {
            what: "interface assignments".into(),
            source,
        })?;
        if vmi.metadata.annotations.get(INTERFACES_ANNOTATION) != Some(&text) {
            self.registry
                .merge_patch(
                    self.vmi_kind,
                    &key.namespace,
                    &key.name,
                    &json!({"metadata": {"uid": uid, "annotations": {INTERFACES_ANNOTATION: text}}}),
                    Subresource::Main,
                )
                .await?;
            debug!(%key, "interfaces assigned");
        }
        Ok(None)
    }

    async fn add_finalizer(&self, key: &Key, uid: &str) -> Result<(), ControllerError> {
        let uid = uid.to_string();
        self.registry
            .modify(
                self.vmi_kind,
                &key.namespace,
                &key.name,
                Subresource::Main,
                move |o| {
                    same_uid(o, &uid)?;
                    let f = finalizers_mut(o);
                    if !f.iter().any(|v| v == IPAM_FINALIZER) {
                        f.push(json!(IPAM_FINALIZER));
                    }
                    Ok(())
                },
            )
            .await?;
        Ok(())
    }

    async fn remove_finalizer(&self, key: &Key, uid: &str) -> Result<(), ControllerError> {
        let uid = uid.to_string();
        match self
            .registry
            .modify(
                self.vmi_kind,
                &key.namespace,
                &key.name,
                Subresource::Main,
                move |o| {
                    same_uid(o, &uid)?;
                    finalizers_mut(o).retain(|v| v != IPAM_FINALIZER);
                    Ok(())
                },
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Pure: the VNIs to give the Networks that have none yet (name, VNI),
/// avoiding every VNI already held. Networks are taken in name order, so
/// the outcome does not depend on listing order.
pub fn assign_vnis(networks: &BTreeMap<String, Network>) -> Vec<(String, u32)> {
    let mut taken: std::collections::BTreeSet<u32> = networks
        .values()
        .filter_map(|n| n.status.as_ref().and_then(|s| s.vni))
        .collect();
    let mut out = Vec::new();
    for (name, n) in networks {
        if n.status.as_ref().and_then(|s| s.vni).is_some() {
            continue;
        }
        if let Some(v) = derive_vni(name, &taken) {
            taken.insert(v);
            out.push((name.clone(), v));
        }
    }
    out
}

fn key_of(obj: &Value) -> Key {
    let s = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or_default();
    Key::new(s("/metadata/namespace"), s("/metadata/name"))
}

fn same_uid(o: &Value, uid: &str) -> Result<(), ApiError> {
    if o.pointer("/metadata/uid").and_then(Value::as_str) != Some(uid) {
        return Err(ApiError::NotFound {
            group: "kubevirt.io".into(),
            resource: "virtualmachineinstances".into(),
            name: uid.to_string(),
        });
    }
    Ok(())
}

fn finalizers_mut(o: &mut Value) -> &mut Vec<Value> {
    if !o["metadata"]["finalizers"].is_array() {
        o["metadata"]["finalizers"] = json!([]);
    }
    o["metadata"]["finalizers"]
        .as_array_mut()
        .expect("finalizers was just made an array")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmi(v: Value) -> VirtualMachineInstance {
        serde_json::from_value(v).unwrap()
    }

    fn net(subnet: &str) -> Network {
        serde_json::from_value(
            json!({"metadata": {"name": "x"}, "spec": {"type": "bridge", "subnet": subnet}}),
        )
        .unwrap()
    }

    #[test]
    fn pod_and_multus_resolve_to_networks() {
        let v = vmi(
            json!({"metadata": {"name": "a", "namespace": "ns1", "uid": "u"},
            "spec": {"domain": {"devices": {"interfaces": [
                {"name": "default", "masquerade": {}},
                {"name": "blue", "bridge": {}, "macAddress": "DE-AD-00-00-BE-AF"}]}},
              "networks": [{"name": "default", "pod": {}},
                           {"name": "blue", "multus": {"networkName": "ns1/blue-net"}}]}}),
        );
        let mut nets = BTreeMap::new();
        nets.insert("blue-net".to_string(), net("10.9.0.0/24"));
        // No `default` Network: the pod interface falls back to user networking.
        let a = attachments(&v, &nets).unwrap();
        assert!(a[0].network.is_none());
        assert_eq!(a[0].mac, stable_mac("ns1", "a", "default"));
        assert_eq!(a[1].network.as_ref().unwrap().0, "blue-net");
        assert_eq!(a[1].mac, "de:ad:00:00:be:af");
        nets.insert("default".to_string(), net("10.8.0.0/24"));
        let a = attachments(&v, &nets).unwrap();
        assert_eq!(a[0].network.as_ref().unwrap().0, "default");
        // The same VM name gets the same MAC again (new uid, same VM).
        let mut v2 = v.clone();
        v2.metadata.uid = Some("other".into());
        assert_eq!(attachments(&v2, &nets).unwrap()[0].mac, a[0].mac);
        nets.remove("blue-net");
        assert_eq!(
            attachments(&v, &nets),
            Err(Pending::NoNetwork {
                iface: "blue".into(),
                network: "blue-net".into()
            })
        );
    }

    #[test]
    fn vnis_are_assigned_once_and_never_shared() {
        let mut nets = BTreeMap::new();
        nets.insert("blue".to_string(), net("10.9.0.0/24"));
        nets.insert("red".to_string(), net("10.10.0.0/24"));
        let first = assign_vnis(&nets);
        assert_eq!(first.len(), 2);
        assert_ne!(first[0].1, first[1].1);
        assert_eq!(first, assign_vnis(&nets), "deterministic");
        // Recorded: nothing more to assign.
        for (name, vni) in &first {
            nets.get_mut(name).unwrap().status = Some(krvirt_api::network::NetworkStatus {
                vni: Some(*vni),
                ..Default::default()
            });
        }
        assert!(assign_vnis(&nets).is_empty());
        // A new Network whose hash lands on a held VNI gets another one.
        let blue_vni = first[0].1;
        nets.get_mut("red").unwrap().status.as_mut().unwrap().vni = Some(blue_vni);
        nets.get_mut("blue").unwrap().status = None;
        let again = assign_vnis(&nets);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].0, "blue");
        assert_ne!(again[0].1, blue_vni, "red holds blue's hash VNI");
    }

    #[test]
    fn pools_follow_the_network_spec() {
        let (p, prefix) = pool_of("n", &net("10.9.0.0/24")).unwrap();
        assert_eq!(prefix, 24);
        assert_eq!(p.gateway.to_string(), "10.9.0.1");
        let mut bad = net("10.9.0.0/24");
        bad.spec.gateway = Some("10.10.0.1".into());
        assert!(matches!(
            pool_of("n", &bad),
            Err(Pending::BadNetwork { .. })
        ));
    }
}
