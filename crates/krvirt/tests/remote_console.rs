//! The server reaches a VM on a joined host (a network namespace with its
//! own `krvirt agent`, see tests/common/cluster.rs) through that agent's
//! host API: `krvirt console` types into the guest's shell, consolelog
//! shows its boot, pause/unpause stop and resume its clock. The host API
//! refuses anyone but the server.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::cluster::Cluster;
use common::last_tick;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VM: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: far
spec:
  runStrategy: Always
  template:
    spec:
      nodeSelector:
        kubernetes.io/hostname: host1
      domain:
        devices:
          disks:
          - name: containerdisk
            disk: {bus: virtio}
        memory:
          guest: 128Mi
      terminationGracePeriodSeconds: 0
      volumes:
      - name: containerdisk
        containerDisk:
          image: quay.io/kubevirt/cirros-container-disk-demo
"#;

fn paused(vmi: &Value) -> bool {
    vmi["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Paused" && c["status"] == "True")
    })
}

/// GET `path` on the host API at `addr` (TLS server name `host`) as
/// `client` (cert, key PEM; None: no client certificate): the HTTP status
/// and body, or why the connection failed.
async fn host_api_get(
    addr: SocketAddr,
    host: &str,
    ca_pem: &str,
    client: Option<(String, String)>,
    path: &str,
) -> Result<(u16, String), String> {
    let cfg = match client {
        Some((cert, key)) => {
            krvirt_server::tls::host_api_client_config(ca_pem, &cert, &key).unwrap()
        }
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for c in krvirt_server::tls::pem_certs(ca_pem).unwrap() {
                roots.add(c).unwrap();
            }
            Arc::new(
                rustls::ClientConfig::builder_with_provider(krvirt_server::tls::provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        }
    };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut out))
        .await
        .map_err(|_| "no answer in 20 s".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&out).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(format!("no HTTP answer: {text:?}"))?;
    Ok((code, text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_consolelog_and_pause_reach_a_vm_on_a_joined_host_through_the_server() {
    let c = Cluster::start(2).await;
    let f = c.server.dir.path().join("far.yaml");
    std::fs::write(&f, VM).unwrap();
    c.server.ok(&["apply", "-f", f.to_str().unwrap()]);
    let (uid, _) = c.server.running_vmi("far", None).await;
    assert_eq!(c.node_of("far").await.as_deref(), Some("host1"));

    // The Host advertises its host API.
    let host: Value =
        serde_json::from_str(&c.server.ok(&["get", "host", "host1", "-o", "json"])).unwrap();
    let port = host["status"]["daemonEndpoints"]["agentEndpoint"]["port"]
        .as_u64()
        .unwrap_or_else(|| panic!("host1 advertises no host API: {host}"));
    let addr: SocketAddr = format!("{}:{port}", c.host("host1").ip).parse().unwrap();

    // consolelog through the server (the server has no host of its own).
    c.server.console_shows("far", "GUEST-BOOTED").await;

    // The console WebSocket through the server: a command typed into the
    // guest's shell answers with something only the shell computes.
    let out = c
        .until(
            "the guest's shell to answer through krvirt console",
            Duration::from_secs(180),
            || async {
                let o = c
                    .server
                    .console_type("far", "echo FAR-$((6*7))", Duration::from_secs(3))
                    .await;
                o.contains("FAR-42").then_some(o)
            },
        )
        .await;
    eprintln!("console: {}", common::tail(&out, 5));

    // Pause through the server: the VMI's Paused condition, the clock stops.
    c.server
        .until("TICK 2", Duration::from_secs(120), || async {
            (last_tick(&c.server.console_log("far").await)? >= 2).then_some(())
        })
        .await;
    c.server.ok(&["pause", "vm", "far"]);
    c.server
        .until("the VMI Paused", Duration::from_secs(30), || async {
            paused(&c.server.vmi("far").await?).then_some(())
        })
        .await;
    let t1 = last_tick(&c.server.console_log("far").await).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t2 = last_tick(&c.server.console_log("far").await).unwrap();
    assert!(t2 <= t1 + 1, "paused guest kept ticking: {t1} -> {t2}");
    c.server.ok(&["unpause", "vm", "far"]);
    c.server
        .until("the VMI unpaused", Duration::from_secs(30), || async {
            (!paused(&c.server.vmi("far").await?)).then_some(())
        })
        .await;
    c.server
        .until("ticks to resume", Duration::from_secs(60), || async {
            (last_tick(&c.server.console_log("far").await)? > t2 + 1).then_some(())
        })
        .await;

    // The host API itself: only the server's certificate gets in.
    let server_pki = c.server.data_dir().join("pki");
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let ca = read(server_pki.join("ca.crt"));
    let log_path = format!("/v1/vmis/{uid}/consolelog");
    let (code, body) = host_api_get(
        addr,
        "host1",
        &ca,
        Some((
            read(server_pki.join("apiserver-client.crt")),
            read(server_pki.join("apiserver-client.key")),
        )),
        &log_path,
    )
    .await
    .expect("the server's certificate is accepted");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("GUEST-BOOTED"), "{}", common::tail(&body, 5));
    // a plain TLS client
    let r = host_api_get(addr, "host1", &ca, None, &log_path).await;
    assert!(r.is_err(), "a client without a certificate got {r:?}");
    // another host's agent (its certificate is signed by the same CA)
    let other = c.host("host0").data_dir.join("agent-pki");
    let r = host_api_get(
        addr,
        "host1",
        &ca,
        Some((
            read(other.join("client.crt")),
            read(other.join("client.key")),
        )),
        &log_path,
    )
    .await;
    assert!(r.is_err(), "an agent's certificate got {r:?}");
}

/// Kills the joined agent (and, with the instance, its guests) and
/// releases its guests' cgroups.
struct AgentGuard {
    child: std::process::Child,
    data: std::path::PathBuf,
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        common::kill_processes_under(&self.data);
        common::remove_vm_cgroups(&self.data);
    }
}

/// `krvirt up` with a joined agent: a VM on the joined host is reached
/// through that agent's host API (the up's own host stays in-process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn krvirt_up_reaches_a_vm_on_a_joined_agent() {
    let inst = common::Instance::start().await;
    let join = inst.token(&["--join"]).trim().to_string();
    let data = inst.dir.path().join("joined");
    let log = inst.dir.path().join("joined.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new(common::BIN)
        .args(["--server", &inst.https_url(), "agent", "--accel", "tcg"])
        .args(["--node-name", "joined", "--host-api-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--join-token", &join])
        .arg("--ca")
        .arg(inst.ca_file())
        .env("KRVIRT_CACHE_DIR", common::cache_dir())
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start the joined agent");
    let _agent = AgentGuard {
        child,
        data: data.clone(),
    };
    let alog = || std::fs::read_to_string(&log).unwrap_or_default();
    inst.until(
        "the joined host Ready with its host API",
        Duration::from_secs(120),
        || async {
            let h = inst.get("/apis/krvirt.io/v1/hosts/joined").await.ok()?;
            (common::cluster::host_ready(&h)
                && h["status"]["daemonEndpoints"]["agentEndpoint"]["port"].is_u64())
            .then_some(())
        },
    )
    .await;
    let f = inst.dir.path().join("far.yaml");
    std::fs::write(&f, VM.replace("host1", "joined")).unwrap();
    inst.ok(&["apply", "-f", f.to_str().unwrap()]);
    inst.running_vmi("far", None).await;
    let vmi = inst.vmi("far").await.unwrap();
    assert_eq!(vmi["status"]["nodeName"], "joined", "{}", alog());
    inst.console_shows("far", "TICK 1").await;
    inst.ok(&["pause", "vm", "far"]);
    inst.until("the VMI Paused", Duration::from_secs(30), || async {
        paused(&inst.vmi("far").await?).then_some(())
    })
    .await;
    inst.ok(&["unpause", "vm", "far"]);
    inst.until("the VMI unpaused", Duration::from_secs(30), || async {
        (!paused(&inst.vmi("far").await?)).then_some(())
    })
    .await;
}
