//! Authentication, authorisation, tenancy and quotas over real sockets: a
//! TLS listener with the server's own CA, a unix socket with peer
//! credentials, bearer tokens in the store, client certificates from a
//! join token.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use krvirt_server::auth::{Auth, hash_secret, new_token};
use krvirt_server::tls::{Pki, TlsListener};
use krvirt_server::{AppState, Listeners, NoHostConnector, Registry};
use krvirt_store::embedded::EmbeddedStore;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Srv {
    dir: tempfile::TempDir,
    registry: Registry,
    url: String,
    ca: String,
    sock: PathBuf,
    stop: CancellationToken,
}

impl Drop for Srv {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start() -> Srv {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.db")).unwrap());
    let registry = Registry::new(store);
    let audit = krvirt_server::audit::AuditLog::open(&dir.path().join("audit.log")).unwrap();
    let state = AppState::new(registry.clone(), Arc::new(NoHostConnector)).with_audit(audit);
    let pki = Arc::new(
        Pki::ensure(
            &dir.path().join("pki"),
            &["127.0.0.1".into(), "localhost".into()],
        )
        .unwrap(),
    );
    let stop = CancellationToken::new();
    let auth = Auth::with_pki(registry.clone(), nix_uid(), pki.clone());
    auth.start(stop.clone()).await.unwrap();
    let ns = krvirt_api::find_kind("namespaces").unwrap();
    registry
        .create(
            ns,
            "",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
        )
        .await
        .unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let tls = TlsListener::new(tcp, pki.server_config().unwrap()).unwrap();
    let sock = dir.path().join("krvirt.sock");
    let unix = krvirt_server::bind_unix(&sock).unwrap();
    // An extra router (as the image service is merged) must be covered too.
    let extra = axum::Router::new().route(
        "/apis/images.krvirt.io/v1/images",
        axum::routing::get(|| async { "[]" }),
    );
    let s = stop.clone();
    tokio::spawn(krvirt_server::serve_listeners(
        Listeners {
            tls: Some(tls),
            unix: Some(unix),
            plain: None,
        },
        state,
        extra,
        Some(auth),
        async move { s.cancelled().await },
    ));
    Srv {
        ca: pki.ca_cert_pem.clone(),
        dir,
        registry,
        url: format!("https://127.0.0.1:{port}"),
        sock,
        stop,
    }
}

fn nix_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

impl Srv {
    /// A TLS client trusting the server's CA, with an optional token.
    fn client(&self, token: Option<&str>) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(self.ca.as_bytes()).unwrap()]);
        if let Some(t) = token {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
            b = b.default_headers(h);
        }
        b.build().unwrap()
    }

    /// The local admin: the unix socket (peer credentials).
    fn admin(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .unix_socket(self.sock.clone())
            .build()
            .unwrap()
    }

    async fn call(
        &self,
        c: &reqwest::Client,
        base: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = c.request(method, format!("{base}{path}"));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let code = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn as_admin(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(&self.admin(), "http://localhost", method, path, body)
            .await
    }

    async fn as_token(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call(&self.client(token), &self.url, method, path, body)
            .await
    }

    /// A token for `user` (created by the admin over the API).
    async fn token(&self, user: &str, expires: Option<String>, join: bool) -> (String, String) {
        let (name, token, hash) = new_token();
        let mut spec = json!({"user": user, "secretHash": hash, "join": join});
        if let Some(e) = expires {
            spec["expires"] = json!(e);
        }
        let (code, body) = self
            .as_admin(
                Method::POST,
                "/apis/krvirt.io/v1/tokens",
                Some(json!({"apiVersion": "krvirt.io/v1", "kind": "Token",
                    "metadata": {"name": name}, "spec": spec})),
            )
            .await;
        assert_eq!(code, 201, "{body}");
        (name, token)
    }

    async fn namespace(&self, ns: &str) {
        let (code, body) = self
            .as_admin(
                Method::POST,
                "/api/v1/namespaces",
                Some(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})),
            )
            .await;
        assert_eq!(code, 201, "{body}");
    }

    async fn bind(&self, ns: &str, user: &str, role: &str) {
        let (code, body) = self
            .as_admin(
                Method::POST,
                &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"),
                Some(json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                    "metadata": {"name": format!("{user}-{role}")},
                    "subjects": [{"kind": "User", "name": user}],
                    "roleRef": {"kind": "ClusterRole", "name": role},
                })),
            )
            .await;
        assert_eq!(code, 201, "{body}");
    }
}

fn vm(name: &str, cores: u64) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"runStrategy": "Halted", "template": {"spec": {"domain": {
            "cpu": {"cores": cores},
            "devices": {}, "resources": {"requests": {"memory": "64Mi"}}}}}}
    })
}

fn vms(ns: &str) -> String {
    format!("/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines")
}

#[tokio::test]
async fn every_route_refuses_requests_without_credentials() {
    let s = start().await;
    // The OpenAPI document is open; every path it lists is not.
    let (code, doc) = s.as_token(None, Method::GET, "/openapi/v3", None).await;
    assert_eq!(code, 200);
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() > 30, "{}", paths.len());
    let mut checked = 0;
    for (path, item) in paths {
        let concrete = path
            .replace("{namespace}", "default")
            .replace("{name}", "x");
        for method in ["get", "put", "post", "patch", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let body = (method != "get" && method != "delete").then(|| json!({}));
            let (code, resp) = s.as_token(None, m.clone(), &concrete, body).await;
            assert_eq!(code, 401, "{m} {concrete}: {resp}");
            assert_eq!(resp["reason"], "Unauthorized", "{resp}");
            checked += 1;
        }
    }
    assert!(checked > 60, "only {checked} operations checked");
    // Streams, WebSockets, metrics, the merged image routes, unknown paths.
    for path in [
        "/apis/subresources.kubevirt.io/v1/namespaces/default/virtualmachineinstances/x/console",
        "/apis/subresources.kubevirt.io/v1/namespaces/default/virtualmachineinstances/x/consolelog?follow=true",
        "/apis/kubevirt.io/v1/virtualmachineinstances?watch=true",
        "/metrics",
        "/apis/images.krvirt.io/v1/images",
        "/apis/nothing.example/v1/things/x",
    ] {
        let (code, _) = s.as_token(None, Method::GET, path, None).await;
        assert_eq!(code, 401, "{path}");
    }
    // A made-up token is refused the same way.
    let (code, _) = s
        .as_token(Some("krv_tnothere_00"), Method::GET, &vms("default"), None)
        .await;
    assert_eq!(code, 401);
    // Health, version, discovery stay open.
    for path in [
        "/healthz",
        "/version",
        "/apis",
        "/api/v1",
        "/apis/kubevirt.io/v1",
    ] {
        let (code, _) = s.as_token(None, Method::GET, path, None).await;
        assert_eq!(code, 200, "{path}");
    }
}

#[tokio::test]
async fn view_cannot_mutate_and_tenants_stay_in_their_namespace() {
    let s = start().await;
    s.namespace("team-a").await;
    s.namespace("team-b").await;
    let (_, viewer) = s.token("vera", None, false).await;
    let (_, alice) = s.token("alice", None, false).await;
    s.bind("team-a", "vera", "view").await;
    s.bind("team-a", "alice", "edit").await;
    let (code, body) = s
        .as_admin(Method::POST, &vms("team-b"), Some(vm("b1", 1)))
        .await;
    assert_eq!(code, 201, "{body}");

    // view: read yes, write no
    let (code, _) = s
        .as_token(Some(&viewer), Method::GET, &vms("team-a"), None)
        .await;
    assert_eq!(code, 200);
    let (code, body) = s
        .as_token(
            Some(&viewer),
            Method::POST,
            &vms("team-a"),
            Some(vm("v1", 1)),
        )
        .await;
    assert_eq!(code, 403, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains("\"vera\"") && msg.contains("create"), "{msg}");
    let (code, _) = s
        .as_token(
            Some(&viewer),
            Method::PUT,
            "/apis/subresources.kubevirt.io/v1/namespaces/team-a/virtualmachines/v1/start",
            Some(json!({})),
        )
        .await;
    assert_eq!(code, 403);

    // edit in team-a: create there; nothing in team-b, console included
    let (code, body) = s
        .as_token(
            Some(&alice),
            Method::POST,
            &vms("team-a"),
            Some(vm("a1", 1)),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    for path in [
        vms("team-b"),
        format!("{}/b1", vms("team-b")),
        "/apis/subresources.kubevirt.io/v1/namespaces/team-b/virtualmachineinstances/b1/console"
            .to_string(),
        "/apis/subresources.kubevirt.io/v1/namespaces/team-b/virtualmachineinstances/b1/consolelog"
            .to_string(),
        "/apis/kubevirt.io/v1/virtualmachines".to_string(),
        "/metrics".to_string(),
    ] {
        let (code, body) = s.as_token(Some(&alice), Method::GET, &path, None).await;
        assert_eq!(code, 403, "{path}: {body}");
    }
    // the console of her own namespace passes authorisation (then: no such VMI)
    let (code, _) = s
        .as_token(
            Some(&alice),
            Method::GET,
            "/apis/subresources.kubevirt.io/v1/namespaces/team-a/virtualmachineinstances/a1/console",
            None,
        )
        .await;
    assert_ne!(code, 403);
    // she cannot mint tokens or grant herself more
    let (code, _) = s
        .as_token(Some(&alice), Method::GET, "/apis/krvirt.io/v1/tokens", None)
        .await;
    assert_eq!(code, 403);

    // creating in a namespace that does not exist: 404 naming it
    let (code, body) = s
        .as_admin(Method::POST, &vms("nope"), Some(vm("n1", 1)))
        .await;
    assert_eq!(code, 404, "{body}");
    assert!(body["message"].as_str().unwrap().contains("nope"), "{body}");

    // refused writes are audited too: no credentials (401), and alice
    // trying another namespace (403)
    let (code, _) = s
        .as_token(None, Method::POST, &vms("team-b"), Some(vm("x401", 1)))
        .await;
    assert_eq!(code, 401);
    let (code, _) = s
        .as_token(
            Some(&alice),
            Method::POST,
            &vms("team-b"),
            Some(vm("x403", 1)),
        )
        .await;
    assert_eq!(code, 403);

    // the audit log names the real principals (its writer appends in the
    // background: wait for the refused writes' records)
    let log = s.dir.path().join("audit.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    let anonymous = |r: &krvirt_server::audit::AuditRecord| {
        r.entry.user == "unauthenticated"
            && r.entry.code == 401
            && r.entry.verb == "create"
            && r.entry.namespace == "team-b"
    };
    let alice_refused = |r: &krvirt_server::audit::AuditRecord| {
        r.entry.user == "alice" && r.entry.code == 403 && r.entry.namespace == "team-b"
    };
    // Wait for exactly the records asserted below (an earlier 403 of
    // another user is not alice's).
    let records = loop {
        let records = krvirt_server::audit::read_records(&log).unwrap();
        let done = records.iter().any(anonymous) && records.iter().any(alice_refused);
        if done || Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(records.iter().any(anonymous), "{records:?}");
    assert!(records.iter().any(alice_refused), "{records:?}");
    assert!(krvirt_server::audit::verify_file(&s.dir.path().join("audit.log")).is_ok());
    let users: Vec<String> = records.iter().map(|r| r.entry.user.clone()).collect();
    assert!(users.iter().any(|u| u == "alice"), "{users:?}");
    assert!(users.iter().any(|u| u == "system:admin"), "{users:?}");
    assert!(!users.iter().any(|u| u == "anonymous"), "{users:?}");
    let admin_rec = records
        .iter()
        .find(|r| r.entry.user == "system:admin")
        .unwrap();
    assert!(
        admin_rec.entry.source.starts_with("unix:uid="),
        "{admin_rec:?}"
    );
    let alice_rec = records.iter().find(|r| r.entry.user == "alice").unwrap();
    assert!(
        alice_rec.entry.source.starts_with("127.0.0.1:"),
        "{alice_rec:?}"
    );
}

#[tokio::test]
async fn expired_and_revoked_tokens_are_refused() {
    let s = start().await;
    let past = (chrono::Utc::now() - chrono::Duration::seconds(5)).to_rfc3339();
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let (_, old) = s.token("olga", Some(past), false).await;
    let (name, fresh) = s.token("fred", Some(future), false).await;
    s.bind("default", "olga", "view").await;
    s.bind("default", "fred", "view").await;
    let (code, body) = s
        .as_token(Some(&old), Method::GET, &vms("default"), None)
        .await;
    assert_eq!(code, 401);
    assert!(
        body["message"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    let (code, _) = s
        .as_token(Some(&fresh), Method::GET, &vms("default"), None)
        .await;
    assert_eq!(code, 200);
    // a token whose secret is wrong
    let forged = format!("krv_{name}_{}", "0".repeat(64));
    let (code, _) = s
        .as_token(Some(&forged), Method::GET, &vms("default"), None)
        .await;
    assert_eq!(code, 401);
    // revoke: refused from the next request on
    let client = s.admin();
    let resp = client
        .patch(format!("http://localhost/apis/krvirt.io/v1/tokens/{name}"))
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"spec":{"revoked":true}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (code, body) = s
        .as_token(Some(&fresh), Method::GET, &vms("default"), None)
        .await;
    assert_eq!(code, 401);
    assert!(
        body["message"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    // the stored object holds the hash only
    let tok = s
        .registry
        .get(krvirt_api::find_kind("tokens").unwrap(), "", &name)
        .await
        .unwrap();
    let secret = fresh.rsplit('_').next().unwrap();
    assert_eq!(tok["spec"]["secretHash"], hash_secret(secret));
    assert!(!tok.to_string().contains(secret));
}

#[tokio::test]
async fn concurrent_creates_never_exceed_a_quota() {
    let s = start().await;
    s.namespace("cq").await;
    let (code, body) = s
        .as_admin(
            Method::POST,
            "/api/v1/namespaces/cq/resourcequotas",
            Some(json!({"apiVersion": "v1", "kind": "ResourceQuota",
                "metadata": {"name": "three"},
                "spec": {"hard": {"count/virtualmachines.kubevirt.io": "3"}}})),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    // wait until this server enforces the new quota: a 4th VM is refused
    for n in ["a", "b", "c"] {
        let (code, body) = s.as_admin(Method::POST, &vms("cq"), Some(vm(n, 1))).await;
        assert_eq!(code, 201, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = s
            .as_admin(Method::POST, &vms("cq"), Some(vm("probe", 1)))
            .await;
        if code == 403 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "quota never enforced: {code} {body}"
        );
        let _ = s
            .as_admin(Method::DELETE, &format!("{}/probe", vms("cq")), None)
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in ["a", "b", "c"] {
        let (code, body) = s
            .as_admin(Method::DELETE, &format!("{}/{n}", vms("cq")), None)
            .await;
        assert!(code < 300, "{code} {body}");
    }
    // ten creates at once: exactly three fit
    let names: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    let path = vms("cq");
    let results = futures::future::join_all(
        names
            .iter()
            .map(|n| s.as_admin(Method::POST, &path, Some(vm(n, 1)))),
    )
    .await;
    let created = results.iter().filter(|(c, _)| *c == 201).count();
    let refused = results.iter().filter(|(c, _)| *c == 403).count();
    let codes: Vec<u16> = results.iter().map(|(c, _)| *c).collect();
    assert_eq!((created, refused), (3, 7), "{codes:?}");
}

#[tokio::test]
async fn quota_exceeded_is_forbidden_naming_the_quota() {
    let s = start().await;
    s.namespace("q").await;
    let (code, body) = s
        .as_admin(
            Method::POST,
            "/api/v1/namespaces/q/resourcequotas",
            Some(json!({"apiVersion": "v1", "kind": "ResourceQuota",
                "metadata": {"name": "small"},
                "spec": {"hard": {"count/virtualmachines.kubevirt.io": "2", "requests.cpu": "3"}}})),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = s
        .as_admin(Method::POST, &vms("q"), Some(vm("one", 2)))
        .await;
    assert_eq!(code, 201, "{body}");
    // 2 + 2 vCPUs > 3: refused, naming quota and resource
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (code, body) = s
            .as_admin(Method::POST, &vms("q"), Some(vm("two", 2)))
            .await;
        if code == 403 {
            break body;
        }
        assert!(Instant::now() < deadline, "never refused: {code} {body}");
        let _ = s
            .as_admin(Method::DELETE, &format!("{}/two", vms("q")), None)
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("small") && msg.contains("requests.cpu"),
        "{msg}"
    );
    // 1 vCPU fits the CPU quota; then the VM count is the limit
    let (code, body) = s
        .as_admin(Method::POST, &vms("q"), Some(vm("two", 1)))
        .await;
    assert_eq!(code, 201, "{body}");
    // growing a VM past the CPU quota is refused too (merge patch)
    let grow = json!({"spec": {"template": {"spec": {"domain": {"cpu": {"cores": 2}}}}}});
    let resp = s
        .admin()
        .patch(format!("http://localhost{}/two", vms("q")))
        .header("content-type", "application/merge-patch+json")
        .body(grow.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let msg = resp.text().await.unwrap();
    assert!(msg.contains("exceeded quota: small"), "{msg}");
    let (code, body) = s
        .as_admin(Method::POST, &vms("q"), Some(vm("three", 0)))
        .await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("count/virtualmachines.kubevirt.io"),
        "{body}"
    );
}

#[tokio::test]
async fn agents_join_with_a_one_time_token_and_use_client_certificates() {
    let s = start().await;
    let (_, join) = s.token("", None, true).await;
    // a join token is no API credential
    let (code, _) = s
        .as_token(Some(&join), Method::GET, &vms("default"), None)
        .await;
    assert_eq!(code, 401);
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let req = json!({"token": join, "host": "node7", "csr": csr});
    let (code, body) = s
        .as_token(
            None,
            Method::POST,
            "/apis/krvirt.io/v1/join",
            Some(req.clone()),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let cert = body["certificate"].as_str().unwrap().to_string();
    // once only
    let (code, _) = s
        .as_token(None, Method::POST, "/apis/krvirt.io/v1/join", Some(req))
        .await;
    assert_eq!(code, 401);
    // mTLS: the host role
    let identity =
        reqwest::Identity::from_pem(format!("{cert}\n{}", key.serialize_pem()).as_bytes()).unwrap();
    let agent = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(s.ca.as_bytes()).unwrap()])
        .identity(identity)
        .build()
        .unwrap();
    let host = json!({"apiVersion": "krvirt.io/v1", "kind": "Host", "metadata": {"name": "node7"}});
    let (code, body) = s
        .call(
            &agent,
            &s.url,
            Method::POST,
            "/apis/krvirt.io/v1/hosts",
            Some(host),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let other =
        json!({"apiVersion": "krvirt.io/v1", "kind": "Host", "metadata": {"name": "node8"}});
    let (code, _) = s
        .call(
            &agent,
            &s.url,
            Method::PUT,
            "/apis/krvirt.io/v1/hosts/node8",
            Some(other),
        )
        .await;
    assert_eq!(code, 403, "a host changes only its own Host");
    let (code, _) = s
        .call(&agent, &s.url, Method::GET, &vms("default"), None)
        .await;
    assert_eq!(code, 200);
    let (code, _) = s
        .call(
            &agent,
            &s.url,
            Method::POST,
            &vms("default"),
            Some(vm("x", 1)),
        )
        .await;
    assert_eq!(code, 403, "a host cannot create VMs");
}
