//! The network controller over a real embedded store: interfaces attached
//! to Networks, addresses from IPAM (never one twice, a full pool makes the
//! VMI wait), the finalizer released with the addresses on deletion, the
//! pod network's user-networking fallback without a `default` Network, and
//! a missing Network reported as an event.

use std::collections::BTreeSet;
use std::time::Duration;

use krvirt_server::Preconditions;
use serde_json::{Value, json};

mod common;
use common::{Plane, kind, plane, until};

fn vmi(name: &str, net: Value) -> Value {
    let iface = if net.get("pod").is_some() {
        json!({"name": "n", "masquerade": {}})
    } else {
        json!({"name": "n", "bridge": {}})
    };
    let mut network = net;
    network["name"] = json!("n");
    json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"domain": {"memory": {"guest": "64Mi"}, "devices": {"interfaces": [iface]}},
                    "networks": [network]}})
}

async fn assignment(p: &Plane, name: &str) -> Option<Value> {
    let v = p
        .registry
        .get(kind("virtualmachineinstances"), "default", name)
        .await
        .ok()?;
    let text = v["metadata"]["annotations"]["krvirt.io/interfaces"].as_str()?;
    let list: Value = serde_json::from_str(text).ok()?;
    Some(list[0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_are_assigned_unique_waited_for_and_released() {
    let p = plane();
    let vmis = kind("virtualmachineinstances");
    p.registry
        .create(
            kind("networks"),
            "",
            json!({"apiVersion": "krvirt.io/v1", "kind": "Network", "metadata": {"name": "blue"},
                   "spec": {"type": "bridge", "subnet": "10.77.0.0/24", "bridge": "kvbr-blue",
                            "dhcp": {"rangeStart": "10.77.0.10", "rangeEnd": "10.77.0.12"}}}),
        )
        .await
        .unwrap();
    // Four VMIs at once for three addresses.
    let blue = json!({"multus": {"networkName": "default/blue"}});
    let creates = (0..4).map(|i| {
        p.registry
            .create(vmis, "default", vmi(&format!("v{i}"), blue.clone()))
    });
    for r in futures::future::join_all(creates).await {
        r.unwrap();
    }
    let mut got = Vec::new();
    for i in 0..4 {
        let name = format!("v{i}");
        let a = until(&format!("{name} assigned or waiting"), || async {
            // Either assigned, or (one of them) waiting for a free address.
            match assignment(&p, &name).await {
                Some(a) => Some(Some(a)),
                None => {
                    let v = p.registry.get(vmis, "default", &name).await.ok()?;
                    let fin = v["metadata"]["finalizers"].as_array()?.len();
                    (fin > 0).then_some(None)
                }
            }
        })
        .await;
        got.push((name, a));
    }
    // Let the controller settle, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut assigned = Vec::new();
    let mut waiting = Vec::new();
    for (name, _) in &got {
        match assignment(&p, name).await {
            Some(a) => assigned.push((name.clone(), a)),
            None => waiting.push(name.clone()),
        }
    }
    assert_eq!(
        assigned.len(),
        3,
        "three addresses, three VMIs: {assigned:?}"
    );
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    let ips: BTreeSet<String> = assigned
        .iter()
        .map(|(_, a)| a["ip"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ips,
        ["10.77.0.10", "10.77.0.11", "10.77.0.12"]
            .into_iter()
            .map(String::from)
            .collect(),
        "never one address twice"
    );
    let a = &assigned[0].1;
    assert_eq!(a["network"], "blue");
    assert_eq!(a["bridge"], "kvbr-blue");
    assert_eq!(a["gateway"], "10.77.0.1");
    assert_eq!(a["subnet"], "10.77.0.0/24");
    assert!(a["mac"].as_str().unwrap().starts_with("02:"), "{a}");
    let v = p
        .registry
        .get(vmis, "default", &assigned[0].0)
        .await
        .unwrap();
    assert!(
        v["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .contains(&json!("krvirt.io/ipam")),
        "{v}"
    );

    // Deleting an addressed VMI releases its address (and the finalizer):
    // the waiting one gets exactly that address.
    let (gone, freed) = (&assigned[0].0, assigned[0].1["ip"].clone());
    p.registry
        .delete(vmis, "default", gone, &Preconditions::default())
        .await
        .unwrap();
    until("the deleted VMI goes", || async {
        p.registry
            .get(vmis, "default", gone)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let late = until("the waiting VMI gets the freed address", || async {
        assignment(&p, &waiting[0]).await
    })
    .await;
    assert_eq!(late["ip"], freed);

    // The pod network without a `default` Network: user networking, no
    // address, no finalizer.
    p.registry
        .create(vmis, "default", vmi("podvm", json!({"pod": {}})))
        .await
        .unwrap();
    let a = until("podvm assigned", || assignment(&p, "podvm")).await;
    assert!(a.get("network").is_none() && a.get("ip").is_none(), "{a}");
    let v = p.registry.get(vmis, "default", "podvm").await.unwrap();
    assert!(
        v["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty()),
        "{v}"
    );

    // A Network that does not exist: no assignment, a Warning event.
    p.registry
        .create(
            vmis,
            "default",
            vmi("lost", json!({"multus": {"networkName": "nope"}})),
        )
        .await
        .unwrap();
    until("NetworkNotFound event", || async {
        let (events, _) = p
            .registry
            .list(
                kind("events"),
                Some("default"),
                &krvirt_server::Selector::everything(),
            )
            .await
            .ok()?;
        events
            .iter()
            .any(|e| {
                e["reason"] == "NetworkNotFound"
                    && e["involvedObject"]["name"] == "lost"
                    && e["message"].as_str().is_some_and(|m| m.contains("nope"))
            })
            .then_some(())
    })
    .await;
    assert!(assignment(&p, "lost").await.is_none());

    // Nobody but the controller assigns addresses.
    let mut forged = vmi("forged", blue.clone());
    forged["metadata"]["annotations"] = json!({"krvirt.io/interfaces": "[]"});
    let err = p
        .registry
        .create(vmis, "default", forged)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("krvirt.io/interfaces"), "{err}");
}
