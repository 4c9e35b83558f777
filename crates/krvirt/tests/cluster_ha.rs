//! Three `krvirt server` replicas on one real etcd: exactly one leads (runs
//! the controllers); `kill -9` of the leader hands the lead to another
//! within the lease TTL; every write acknowledged before, during and after
//! the switch is readable from every replica; the new leader's controllers
//! act (a VM started afterwards gets its VMI).
//!
//! `krvirt up --store etcd://…` takes part in the same election: it runs
//! its controllers only while it leads, hands over to a server when it
//! dies, and takes over from a dead server.

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Instance};
use krvirt_store::etcd::testing::EtcdCluster;
use serde_json::{Value, json};

const TTL: u64 = 3;
const LEADS: &str = "leader: running the controllers";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start `krvirt server --store etcd://…` and wait for its admin socket.
fn start_server(store: &str) -> Instance {
    start_role(store, &["server"])
}

/// Start `krvirt up --store etcd://…` (API, controllers while leading, and
/// a host agent named `node`) and wait for its admin socket.
fn start_up(store: &str, node: &str) -> Instance {
    start_role(
        store,
        &[
            "up",
            "--no-demo",
            "--no-default-network",
            "--accel",
            "tcg",
            "--node-name",
            node,
        ],
    )
}

fn start_role(store: &str, role: &[&str]) -> Instance {
    let dir = tempfile::Builder::new()
        .prefix("krvirt-ha-")
        .tempdir()
        .unwrap();
    let data = dir.path().join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    let log_path = dir.path().join("up.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(BIN)
        .args(role)
        .args(["--listen", &listen, "--store", store])
        .args(["--leader-ttl", &TTL.to_string()])
        .arg("--data-dir")
        .arg(&data)
        .env(
            "KRVIRT_CACHE_DIR",
            std::env::var_os("KRVIRT_CACHE_DIR")
                .unwrap_or_else(|| std::env::temp_dir().join("krvirt-test-cache").into()),
        )
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start krvirt server");
    let sock = data.join("krvirt.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let up =
            text.contains("listening on https://") || text.contains("krvirt is up: API https://");
        if up && sock.exists() {
            break format!("unix://{}", sock.display());
        }
        if text.contains("listening on http://") {
            break format!("http://{listen}");
        }
        assert!(
            Instant::now() < deadline,
            "krvirt server did not start:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    Instance::from_server_process(dir, url, child)
}

fn vm(name: &str, run: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"runStrategy": run, "template": {"spec": {"domain": {
            "memory": {"guest": "64Mi"},
            "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}},
            "volumes": [{"name": "root", "containerDisk": {"image": "quay.io/kubevirt/cirros-container-disk-demo"}}]}}}
    }))
    .unwrap()
}

const VMS: &str = "/apis/kubevirt.io/v1/namespaces/default/virtualmachines";

/// Create a VM through `inst`; true if acknowledged (201).
async fn create_vm(inst: &Instance, name: &str, run: &str) -> bool {
    let (code, body) = inst
        .send(
            reqwest::Method::POST,
            VMS,
            "application/json",
            vm(name, run),
        )
        .await;
    assert!(
        code == 201 || code >= 500,
        "creating {name}: unexpected {code} {body}"
    );
    code == 201
}

fn leaders(servers: &[Option<Instance>]) -> Vec<usize> {
    servers
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.as_ref().map(|s| (i, s.log())))
        .filter(|(_, log)| {
            // Leading now: the last transition in the log is "leader".
            match (log.rfind(LEADS), log.rfind("no longer leader")) {
                (Some(a), Some(b)) => a > b,
                (Some(_), None) => true,
                _ => false,
            }
        })
        .map(|(i, _)| i)
        .collect()
}

async fn one_leader(servers: &[Option<Instance>], within: Duration) -> usize {
    let start = Instant::now();
    loop {
        let l = leaders(servers);
        assert!(l.len() <= 1, "several leaders: {l:?}");
        if let [one] = l[..] {
            return one;
        }
        assert!(
            start.elapsed() < within,
            "no leader within {within:?}; logs:\n{}",
            servers
                .iter()
                .flatten()
                .map(|s| common::tail(&s.log(), 15))
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_dies_another_takes_over_without_lost_writes() {
    let etcd = tokio::task::spawn_blocking(EtcdCluster::single)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    let store = etcd.url();
    let mut servers: Vec<Option<Instance>> = (0..3).map(|_| Some(start_server(&store))).collect();
    let first = one_leader(&servers, Duration::from_secs(20)).await;
    // One CA for all replicas (kept in the store): an agent or client that
    // trusts one replica's CA trusts every replica's server certificate.
    let cas: Vec<String> = servers
        .iter()
        .flatten()
        .map(|s| std::fs::read_to_string(s.dir.path().join("data/pki/ca.crt")).unwrap())
        .collect();
    assert!(
        cas.iter().all(|c| c == &cas[0]),
        "the replicas have different CAs"
    );

    // Writes through every replica.
    let mut acked = Vec::new();
    for i in 0..12 {
        let name = format!("before-{i}");
        if create_vm(servers[i % 3].as_ref().unwrap(), &name, "Halted").await {
            acked.push(name);
        }
    }
    assert_eq!(
        acked.len(),
        12,
        "all writes before the kill are acknowledged"
    );

    // kill -9 the leader, and keep writing through the others meanwhile.
    let killed_at = Instant::now();
    servers[first].as_mut().unwrap().kill9();
    servers[first] = None;
    let others: Vec<usize> = (0..3).filter(|i| *i != first).collect();
    let mut n = 0;
    let second = loop {
        let name = format!("during-{n}");
        if create_vm(servers[others[n % 2]].as_ref().unwrap(), &name, "Halted").await {
            acked.push(name);
        }
        n += 1;
        let l = leaders(&servers);
        if let [one] = l[..] {
            break one;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(TTL + 5),
            "no new leader {:?} after the kill",
            killed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = killed_at.elapsed();
    assert_ne!(second, first);
    assert!(
        took <= Duration::from_secs(TTL + 2),
        "takeover took {took:?} (TTL {TTL} s)"
    );
    // Still exactly one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(one_leader(&servers, Duration::from_secs(1)).await, second);

    for i in 0..6 {
        let name = format!("after-{i}");
        assert!(create_vm(servers[others[i % 2]].as_ref().unwrap(), &name, "Halted").await);
        acked.push(name);
    }

    // No lost writes: every acknowledged VM is readable from both replicas.
    for s in servers.iter().flatten() {
        let list = s.get(VMS).await.expect("list VMs");
        let names: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["metadata"]["name"].as_str())
            .collect();
        for a in &acked {
            assert!(names.contains(&a.as_str()), "acknowledged VM {a} lost");
        }
    }

    // The new leader's controllers act: a VM that should run gets its VMI
    // (Pending: no host to place it on).
    let any = servers[others[0]].as_ref().unwrap();
    assert!(create_vm(any, "runs", "Always").await);
    let vmi: Value = any
        .until("VMI of `runs`", Duration::from_secs(30), || async {
            any.vmi("runs")
                .await
                .filter(|v| v["status"]["phase"].is_string())
        })
        .await;
    assert_eq!(vmi["status"]["phase"], "Pending", "{vmi}");
    let msg = vmi["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "PodScheduled")
        .and_then(|c| c["message"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(msg.starts_with("0/0 hosts are available"), "{vmi}");
    drop(servers);
    drop(etcd);
}

/// The VM controller of whoever leads acts: a Halted VM gets its
/// `printableStatus`.
async fn controllers_act(inst: &Instance, name: &str) {
    assert!(create_vm(inst, name, "Halted").await);
    inst.until(
        &format!("printableStatus of {name}"),
        Duration::from_secs(30),
        || async {
            inst.get(&format!("{VMS}/{name}"))
                .await
                .ok()
                .filter(|v| v["status"]["printableStatus"] == "Stopped")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_on_etcd_runs_its_controllers_only_while_it_leads() {
    let etcd = tokio::task::spawn_blocking(EtcdCluster::single)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    let store = etcd.url();
    // `up` first: it leads, and a server started next follows.
    let mut nodes: Vec<Option<Instance>> = vec![Some(start_up(&store, "ha-up-a"))];
    assert_eq!(one_leader(&nodes, Duration::from_secs(30)).await, 0);
    nodes.push(Some(start_server(&store)));
    tokio::time::sleep(Duration::from_secs(TTL)).await;
    assert_eq!(one_leader(&nodes, Duration::from_secs(1)).await, 0);
    assert!(
        !nodes[1].as_ref().unwrap().log().contains(LEADS),
        "the server led while `up` held the lead"
    );
    controllers_act(nodes[1].as_ref().unwrap(), "while-up-leads").await;

    // `up` dies: the server takes over within the TTL.
    let killed_at = Instant::now();
    nodes[0].as_mut().unwrap().kill9();
    nodes[0] = None;
    assert_eq!(
        one_leader(&nodes, Duration::from_secs(TTL + 5)).await,
        1,
        "the server takes over"
    );
    let took = killed_at.elapsed();
    assert!(
        took <= Duration::from_secs(TTL + 2),
        "takeover took {took:?} (TTL {TTL} s)"
    );

    // A second `up` joins while the server leads: it follows, its
    // controllers stay off ...
    nodes.push(Some(start_up(&store, "ha-up-b")));
    tokio::time::sleep(Duration::from_secs(TTL)).await;
    assert_eq!(one_leader(&nodes, Duration::from_secs(1)).await, 1);
    assert!(
        !nodes[2].as_ref().unwrap().log().contains(LEADS),
        "the second `up` led while the server held the lead"
    );
    // ... its own host agent works all the same (its Host registers).
    let b = nodes[2].as_ref().unwrap();
    b.until("Host ha-up-b", Duration::from_secs(60), || async {
        b.get("/apis/krvirt.io/v1/hosts/ha-up-b").await.ok()
    })
    .await;

    // The server dies: `up` takes over and its controllers act.
    nodes[1].as_mut().unwrap().kill9();
    nodes[1] = None;
    assert_eq!(
        one_leader(&nodes, Duration::from_secs(TTL + 5)).await,
        2,
        "the second `up` takes over"
    );
    controllers_act(nodes[2].as_ref().unwrap(), "while-up-b-leads").await;
    drop(nodes);
    drop(etcd);
}
