//! The remote HostConnector without root or QEMU: routing by the VMI's
//! `status.nodeName`, the errors for hosts that are missing, NotReady,
//! silent or unreachable, the mapping of host API answers, and mutual TLS
//! both ways (a real TLS host API with the agent's configuration and an
//! agent certificate signed at join; the agent's own handlers are covered
//! end to end in crates/krvirt/tests/remote_console.rs).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{Path, Query, Request};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use krvirt_server::remote::{
    CONSOLE_UPGRADE, RemoteConnector, SplitConnector, host_api_address, host_ready, remote_error,
    valid_uid,
};
use krvirt_server::tls::{Pki, TlsListener, host_api_client_config, host_api_server_config};
use krvirt_server::{ApiError, ByteStream, ConsoleStream, HostConnector, Registry};
use krvirt_store::embedded::EmbeddedStore;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const UID: &str = "0b7c1d2e-1111-4222-8333-944455566677";

fn vmi(node: &str) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "vm1", "namespace": "default", "uid": UID},
        "status": {"phase": "Running", "nodeName": node}
    })
}

struct Env {
    _dir: tempfile::TempDir,
    registry: Registry,
    pki: Arc<Pki>,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("state.db")).unwrap();
    let registry = Registry::new(Arc::new(store));
    let pki = Arc::new(Pki::ensure(&dir.path().join("pki"), &["127.0.0.1".into()]).unwrap());
    Env {
        _dir: dir,
        registry,
        pki,
    }
}

/// A host's certificate as a join signs it: (cert, key) PEM.
fn host_cert(pki: &Pki, host: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (pki.sign_host_csr(&csr, host).unwrap(), key.serialize_pem())
}

async fn put_host(reg: &Registry, name: &str, ready: bool, addr: Option<SocketAddr>) {
    let kind = reg.kind("krvirt.io", "Host").unwrap();
    let created = reg
        .create(
            kind,
            "",
            json!({"apiVersion": "krvirt.io/v1", "kind": "Host", "metadata": {"name": name}}),
        )
        .await
        .unwrap();
    let mut status = json!({
        "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}],
        "addresses": [{"type": "Hostname", "address": name}],
    });
    if let Some(a) = addr {
        status["addresses"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "InternalIP", "address": a.ip().to_string()}));
        status["daemonEndpoints"] = json!({"agentEndpoint": {"port": a.port()}});
    }
    let mut obj = created;
    obj["status"] = status;
    reg.replace_status(kind, "", name, obj).await.unwrap();
}

fn connector(e: &Env) -> RemoteConnector {
    RemoteConnector::new(e.registry.clone(), e.pki.host_api_client_config().unwrap())
        .with_dial_timeout(Duration::from_secs(3))
}

fn unavailable(r: Result<impl Sized, ApiError>) -> String {
    match r {
        Err(ApiError::ServiceUnavailable(m)) => m,
        Err(e) => panic!("expected 503, got {e:?}"),
        Ok(_) => panic!("expected 503, got success"),
    }
}

/// What the stand-in host API saw: (method, path and query).
type Seen = Arc<Mutex<Vec<String>>>;

/// A host API on 127.0.0.1 with the agent's TLS configuration and a
/// certificate for `host`: pause answers 200, unpause 409 with a Status,
/// the console echoes, the console log sends two lines.
async fn host_api(pki: &Pki, host: &str) -> (SocketAddr, Seen) {
    let (cert, key) = host_cert(pki, host);
    let tls = host_api_server_config(&pki.ca_cert_pem, &cert, &key).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let s1 = seen.clone();
    let s2 = seen.clone();
    let s3 = seen.clone();
    let app = axum::Router::new()
        .route(
            "/v1/vmis/{uid}/pause",
            post(move |Path(uid): Path<String>| async move {
                s1.lock().unwrap().push(format!("POST pause {uid}"));
                StatusCode::OK
            }),
        )
        .route(
            "/v1/vmis/{uid}/unpause",
            post(|| async {
                ApiError::Conflict {
                    group: "kubevirt.io".into(),
                    resource: "virtualmachineinstances".into(),
                    name: "x".into(),
                    message: "the VMI is not running on host h".into(),
                }
                .into_response()
            }),
        )
        .route(
            "/v1/vmis/{uid}/console",
            get(move |mut req: Request| async move {
                let up = req.headers().get(header::UPGRADE).cloned();
                s2.lock().unwrap().push(format!("GET console {up:?}"));
                let on = req
                    .extensions_mut()
                    .remove::<hyper::upgrade::OnUpgrade>()
                    .unwrap();
                tokio::spawn(async move {
                    let mut io = TokioIo::new(on.await.unwrap());
                    let mut buf = [0u8; 64];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let mut out = b"echo:".to_vec();
                        out.extend_from_slice(&buf[..n]);
                        io.write_all(&out).await.unwrap();
                    }
                });
                Response::builder()
                    .status(StatusCode::SWITCHING_PROTOCOLS)
                    .header(header::CONNECTION, "Upgrade")
                    .header(header::UPGRADE, CONSOLE_UPGRADE)
                    .body(Body::empty())
                    .unwrap()
            }),
        )
        .route(
            "/v1/vmis/{uid}/consolelog",
            get(
                move |Query(q): Query<std::collections::HashMap<String, String>>| async move {
                    s3.lock()
                        .unwrap()
                        .push(format!("GET consolelog follow={:?}", q.get("follow")));
                    let chunks = futures::stream::iter([
                        Ok::<_, std::io::Error>("GUEST-BOOTED\n"),
                        Ok("TICK 1\n"),
                    ]);
                    Body::from_stream(chunks)
                },
            ),
        );
    let listener = TlsListener::new(tcp, tls).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

#[test]
fn host_api_address_needs_internal_ip_and_port() {
    let h = json!({"status": {
        "addresses": [{"type": "Hostname", "address": "h"}, {"type": "InternalIP", "address": "10.1.2.3"}],
        "daemonEndpoints": {"agentEndpoint": {"port": 8186}}
    }});
    assert_eq!(
        host_api_address(&h).unwrap(),
        "10.1.2.3:8186".parse().unwrap()
    );
    let no_port = json!({"status": {"addresses": [{"type": "InternalIP", "address": "10.1.2.3"}]}});
    assert!(host_api_address(&no_port).unwrap_err().contains("port"));
    let no_ip = json!({"status": {"daemonEndpoints": {"agentEndpoint": {"port": 1}}}});
    assert!(host_api_address(&no_ip).unwrap_err().contains("InternalIP"));
    let bad_ip = json!({"status": {"addresses": [{"type": "InternalIP", "address": "nope"}],
        "daemonEndpoints": {"agentEndpoint": {"port": 1}}}});
    assert!(host_api_address(&bad_ip).unwrap_err().contains("invalid"));
    assert!(host_ready(
        &json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    ));
    assert!(!host_ready(
        &json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
    ));
    assert!(!host_ready(&json!({})));
}

#[test]
fn host_api_answers_map_to_api_errors() {
    let v = vmi("h1");
    let body = br#"{"kind":"Status","code":409,"reason":"Conflict","message":"the VMI is not running on host h1"}"#;
    match remote_error("h1", &v, 409, body) {
        ApiError::Conflict { name, message, .. } => {
            assert_eq!(name, "vm1");
            assert_eq!(message, "the VMI is not running on host h1");
        }
        e => panic!("{e:?}"),
    }
    let body = br#"{"kind":"Status","code":409,"reason":"Conflict","message":"Operation cannot be fulfilled on virtualmachineinstances.kubevirt.io \"0b7c\": the VMI is not running on host h1"}"#;
    match remote_error("h1", &v, 409, body) {
        ApiError::Conflict { name, message, .. } => {
            assert_eq!(name, "vm1");
            assert_eq!(message, "the VMI is not running on host h1");
        }
        e => panic!("{e:?}"),
    }
    let e = remote_error("h1", &v, 503, b"busy");
    assert_eq!(e.code(), 503);
    assert!(e.to_string().contains("host h1: busy"), "{e}");
    let e = remote_error("h1", &v, 500, br#"{"message":"qmp: boom"}"#);
    assert_eq!(e.code(), 500);
    assert!(
        e.to_string().contains("host h1 answered 500: qmp: boom"),
        "{e}"
    );
    assert!(valid_uid(UID));
    assert!(!valid_uid("../../etc"));
    assert!(!valid_uid(""));
}

/// Records which side served a call.
struct Recorder(&'static str, Arc<Mutex<Vec<String>>>);

#[async_trait]
impl HostConnector for Recorder {
    async fn pause(&self, _: &Value) -> Result<(), ApiError> {
        self.1.lock().unwrap().push(format!("{} pause", self.0));
        Ok(())
    }
    async fn unpause(&self, _: &Value) -> Result<(), ApiError> {
        self.1.lock().unwrap().push(format!("{} unpause", self.0));
        Ok(())
    }
    async fn console(&self, _: &Value) -> Result<ConsoleStream, ApiError> {
        self.1.lock().unwrap().push(format!("{} console", self.0));
        Err(ApiError::Internal("no console here".into()))
    }
    async fn console_log(&self, _: &Value, _: bool) -> Result<ByteStream, ApiError> {
        self.1
            .lock()
            .unwrap()
            .push(format!("{} consolelog", self.0));
        Err(ApiError::Internal("no log here".into()))
    }
}

#[tokio::test]
async fn split_connector_serves_its_own_host_locally_and_others_remotely() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let split = SplitConnector::new(
        "me",
        Arc::new(Recorder("local", calls.clone())),
        Arc::new(Recorder("remote", calls.clone())),
    );
    split.pause(&vmi("me")).await.unwrap();
    split.pause(&vmi("other")).await.unwrap();
    split.unpause(&vmi("")).await.unwrap();
    let _ = split.console(&vmi("other")).await;
    let _ = split.console_log(&vmi("me"), true).await;
    assert_eq!(
        *calls.lock().unwrap(),
        [
            "local pause",
            "remote pause",
            "local unpause",
            "remote console",
            "local consolelog"
        ]
    );
}

#[tokio::test]
async fn hosts_that_cannot_serve_answer_503_naming_the_host() {
    let e = env();
    let c = connector(&e);
    // no such Host
    let m = unavailable(c.pause(&vmi("ghost")).await);
    assert!(
        m.contains("host ghost") && m.contains("not registered"),
        "{m}"
    );
    // NotReady
    put_host(
        &e.registry,
        "down",
        false,
        Some("127.0.0.1:9".parse().unwrap()),
    )
    .await;
    let m = unavailable(c.console(&vmi("down")).await);
    assert!(m.contains("host down") && m.contains("NotReady"), "{m}");
    // Ready but no host API advertised (an agent not joined over TLS)
    put_host(&e.registry, "plain", true, None).await;
    let m = unavailable(c.console_log(&vmi("plain"), false).await);
    assert!(m.contains("host plain") && m.contains("port"), "{m}");
    // Ready, advertised, nobody listening
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    put_host(&e.registry, "gone", true, Some(closed)).await;
    let m = unavailable(c.unpause(&vmi("gone")).await);
    assert!(
        m.contains("host gone") && m.contains(&closed.to_string()) && m.contains("unreachable"),
        "{m}"
    );
    // a VMI with no host at all is a conflict, not a 503
    match c.pause(&vmi("")).await {
        Err(ApiError::Conflict { message, .. }) => assert!(message.contains("not placed")),
        r => panic!("{:?}", r.err()),
    }
}

#[tokio::test]
async fn remote_operations_reach_the_vmis_host_over_mutual_tls() {
    let e = env();
    let (addr, seen) = host_api(&e.pki, "host-a").await;
    put_host(&e.registry, "host-a", true, Some(addr)).await;
    let c = connector(&e);
    let v = vmi("host-a");

    c.pause(&v).await.unwrap();
    match c.unpause(&v).await {
        Err(ApiError::Conflict { message, .. }) => {
            assert_eq!(message, "the VMI is not running on host h")
        }
        r => panic!("{:?}", r.err()),
    }

    let mut console = c.console(&v).await.unwrap();
    console.write_all(b"ls\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !got.ends_with(b"echo:ls\n") {
            let n = console.read(&mut buf).await.unwrap();
            assert!(n > 0, "console closed early: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the echo through the upgraded console");
    drop(console);

    let log: Vec<u8> = c
        .console_log(&v, true)
        .await
        .unwrap()
        .map(|r| r.unwrap())
        .collect::<Vec<_>>()
        .await
        .concat();
    assert_eq!(log, b"GUEST-BOOTED\nTICK 1\n");

    assert_eq!(
        *seen.lock().unwrap(),
        [
            format!("POST pause {UID}"),
            format!("GET console Some({CONSOLE_UPGRADE:?})"),
            "GET consolelog follow=Some(\"true\")".to_string(),
        ]
    );
}

#[tokio::test]
async fn the_server_refuses_a_host_api_whose_certificate_names_another_host() {
    let e = env();
    // host-b's agent answers at the address host-a advertises
    let (addr, seen) = host_api(&e.pki, "host-b").await;
    put_host(&e.registry, "host-a", true, Some(addr)).await;
    let m = unavailable(connector(&e).pause(&vmi("host-a")).await);
    assert!(m.contains("host host-a") && m.contains("TLS"), "{m}");
    assert!(seen.lock().unwrap().is_empty());
    // a host API with a certificate of another CA
    let other = env();
    let (addr, _) = host_api(&other.pki, "host-c").await;
    put_host(&e.registry, "host-c", true, Some(addr)).await;
    let m = unavailable(connector(&e).pause(&vmi("host-c")).await);
    assert!(m.contains("TLS"), "{m}");
}

/// Handshake with the host API at `addr` (server name `host`) with
/// `client` (None: no client certificate); Ok when an HTTP request gets
/// an answer.
async fn try_host_api(
    addr: SocketAddr,
    host: &str,
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<u16, String> {
    let cfg = match client {
        Some((cert, key)) => host_api_client_config(ca_pem, cert, key).unwrap(),
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
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // TLS 1.3: the server judges the client certificate after the client
    // considers the handshake done; the refusal arrives as an alert on the
    // first read.
    tls.write_all(
        format!("POST /v1/vmis/{UID}/pause HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .await
    .map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; 1024];
    let n = tls.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(format!("no HTTP answer: {head:?}"))
}

#[test]
fn join_certificates_can_serve_their_host_name_only() {
    let e = env();
    let (cert, _) = host_cert(&e.pki, "host-a");
    assert!(krvirt_server::tls::serves_host(&cert, "host-a"));
    assert!(!krvirt_server::tls::serves_host(&cert, "host-b"));
    // the server's client certificate, and a plain client certificate (as
    // joins signed before the host API), cannot serve
    assert!(!krvirt_server::tls::serves_host(
        &e.pki.client_cert_pem,
        "host-a"
    ));
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let old = e.pki.sign_client_csr(&csr, "system:host:host-a").unwrap();
    assert!(!krvirt_server::tls::serves_host(&old, "host-a"));
    assert!(!krvirt_server::tls::serves_host(
        "not a certificate",
        "host-a"
    ));
}

#[tokio::test]
async fn a_host_api_accepts_only_the_servers_certificate() {
    let e = env();
    let (addr, seen) = host_api(&e.pki, "host-a").await;
    let ca = e.pki.ca_cert_pem.clone();
    // the server's identity: accepted
    assert_eq!(
        try_host_api(
            addr,
            "host-a",
            &ca,
            Some((&e.pki.client_cert_pem, &e.pki.client_key_pem))
        )
        .await,
        Ok(200)
    );
    // plain TLS client, no certificate
    let r = try_host_api(addr, "host-a", &ca, None).await;
    assert!(r.is_err(), "{r:?}");
    // another agent's certificate (signed by the same CA at its join)
    let (cert, key) = host_cert(&e.pki, "host-b");
    let r = try_host_api(addr, "host-a", &ca, Some((&cert, &key))).await;
    assert!(r.is_err(), "{r:?}");
    // a certificate named like the server's, signed by another CA
    let other = env();
    let r = try_host_api(
        addr,
        "host-a",
        &ca,
        Some((&other.pki.client_cert_pem, &other.pki.client_key_pem)),
    )
    .await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(seen.lock().unwrap().len(), 1, "only the server got through");
}
