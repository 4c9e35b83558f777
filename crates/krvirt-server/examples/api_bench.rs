//! API throughput with and without authentication (bench/api runs this).
//!
//! Two servers in this process, each on its own embedded store: one with
//! TLS + bearer token + RBAC (the way `krvirt server` serves the network),
//! one plain HTTP without authentication. Rounds alternate which goes
//! first; each round measures on both: creates per second (C concurrent
//! clients), get latency (p99), lists per second, and watch events per
//! second (a watch open while objects are created). Prints one JSON line.
//!
//! Usage: api_bench [--rounds N] [--creates M] [--concurrency C]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use krvirt_server::auth::{Auth, new_token};
use krvirt_server::tls::{Pki, TlsListener};
use krvirt_server::{AppState, Listeners, NoHostConnector, Registry};
use krvirt_store::embedded::EmbeddedStore;
use serde_json::{Value, json};

struct Target {
    name: &'static str,
    base: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn server(auth: bool) -> Target {
    let dir = tempfile::Builder::new()
        .prefix("krvirt-bench-api-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.db")).expect("store"));
    let registry = Registry::new(store);
    let ns = krvirt_api::find_kind("namespaces").expect("Namespace");
    registry
        .create(
            ns,
            "",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
        )
        .await
        .expect("default namespace");
    let state = AppState::new(registry.clone(), Arc::new(NoHostConnector));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = tcp.local_addr().expect("addr").port();
    let stop = tokio_util::sync::CancellationToken::new();
    if !auth {
        tokio::spawn(krvirt_server::serve_listeners(
            Listeners {
                plain: Some(tcp),
                ..Default::default()
            },
            state,
            axum::Router::new(),
            None,
            std::future::pending(),
        ));
        return Target {
            name: "noauth",
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            _dir: dir,
        };
    }
    let pki = Arc::new(Pki::ensure(&dir.path().join("pki"), &["127.0.0.1".into()]).expect("pki"));
    let a = Auth::with_pki(registry.clone(), u32::MAX, pki.clone());
    a.start(stop).await.expect("rbac");
    let (name, token, hash) = new_token();
    let tokens = krvirt_api::find_kind("tokens").expect("Token");
    registry
        .create(
            tokens,
            "",
            json!({"apiVersion": "krvirt.io/v1", "kind": "Token", "metadata": {"name": name},
                   "spec": {"user": "bench", "secretHash": hash}}),
        )
        .await
        .expect("token");
    // an ordinary tenant: edit in its namespace (RBAC is evaluated)
    let rb = krvirt_api::find_kind("rolebindings").expect("RoleBinding");
    registry
        .create(
            rb,
            "default",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "bench-edit"},
                   "subjects": [{"kind": "User", "name": "bench"}],
                   "roleRef": {"kind": "ClusterRole", "name": "edit"}}),
        )
        .await
        .expect("binding");
    a.rbac().reload().await.expect("reload");
    let tls = TlsListener::new(tcp, pki.server_config().expect("tls")).expect("listener");
    tokio::spawn(krvirt_server::serve_listeners(
        Listeners {
            tls: Some(tls),
            ..Default::default()
        },
        state,
        axum::Router::new(),
        Some(a),
        std::future::pending(),
    ));
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(pki.ca_cert_pem.as_bytes()).expect("ca")])
        .default_headers(h)
        .build()
        .expect("client");
    Target {
        name: "auth",
        base: format!("https://127.0.0.1:{port}"),
        client,
        _dir: dir,
    }
}

fn vm(name: &str) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"runStrategy": "Halted", "template": {"spec": {"domain": {
            "devices": {}, "resources": {"requests": {"memory": "64Mi"}}}}}}
    })
}

const VMS: &str = "/apis/kubevirt.io/v1/namespaces/default/virtualmachines";

async fn creates(t: &Target, round: usize, n: usize, conc: usize) -> f64 {
    let start = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (c, url, next) = (t.client.clone(), format!("{}{VMS}", t.base), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let r = c
                    .post(&url)
                    .json(&vm(&format!("r{round}-{i}")))
                    .send()
                    .await
                    .expect("create");
                assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn gets(t: &Target, round: usize, n: usize, conc: usize) -> f64 {
    let mut tasks = Vec::new();
    for w in 0..conc {
        let (c, base) = (t.client.clone(), format!("{}{VMS}", t.base));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for i in (w..n).step_by(conc) {
                let s = Instant::now();
                let r = c
                    .get(format!("{base}/r{round}-{i}"))
                    .send()
                    .await
                    .expect("get");
                assert_eq!(r.status().as_u16(), 200);
                let _ = r.bytes().await;
                lat.push(s.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("worker"));
    }
    all.sort_by(|a, b| a.total_cmp(b));
    all[((all.len() as f64 * 0.99) as usize).min(all.len() - 1)]
}

async fn lists(t: &Target, n: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        let r = t
            .client
            .get(format!("{}{VMS}?labelSelector=none%3Dx", t.base))
            .send()
            .await
            .expect("list");
        assert_eq!(r.status().as_u16(), 200);
        let _ = r.bytes().await;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn watch(t: &Target, round: usize, n: usize, conc: usize) -> f64 {
    let r = t
        .client
        .get(format!(
            "{}{VMS}?watch=true&labelSelector=w%3Dr{round}",
            t.base
        ))
        .send()
        .await
        .expect("watch");
    assert_eq!(r.status().as_u16(), 200);
    let mut body = r.bytes_stream();
    let start = Instant::now();
    let (c, url) = (t.client.clone(), format!("{}{VMS}", t.base));
    let writer = tokio::spawn(async move {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut ws = Vec::new();
        for _ in 0..conc {
            let (c, url, next) = (c.clone(), url.clone(), next.clone());
            ws.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let mut v = vm(&format!("w{round}-{i}"));
                    v["metadata"]["labels"] = json!({"w": format!("r{round}")});
                    c.post(&url).json(&v).send().await.expect("create");
                }
            }));
        }
        for w in ws {
            let _ = w.await;
        }
    });
    let mut seen = 0;
    let mut buf = Vec::new();
    while seen < n {
        let chunk = tokio::time::timeout(Duration::from_secs(30), body.next())
            .await
            .expect("watch events in time")
            .expect("watch open")
            .expect("watch chunk");
        buf.extend_from_slice(&chunk);
        seen = buf.iter().filter(|b| **b == b'\n').count();
    }
    let _ = writer.await;
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str, d: usize| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (rounds, n, conc) = (
        arg("--rounds", 3),
        arg("--creates", 2000),
        arg("--concurrency", 16),
    );
    let targets = [server(true).await, server(false).await];
    let mut res: std::collections::BTreeMap<(&str, &str), Vec<f64>> = Default::default();
    for round in 0..rounds {
        let order: Vec<&Target> = if round % 2 == 0 {
            vec![&targets[0], &targets[1]]
        } else {
            vec![&targets[1], &targets[0]]
        };
        for t in order {
            let c = creates(t, round, n, conc).await;
            let g = gets(t, round, n, conc).await;
            let l = lists(t, 50).await;
            let w = watch(t, round, n / 4, conc).await;
            eprintln!(
                "round {round} {:6}: {c:8.0} creates/s, get p99 {g:6.2} ms, {l:7.0} lists/s, {w:7.0} watch events/s",
                t.name
            );
            res.entry((t.name, "create")).or_default().push(c);
            res.entry((t.name, "get_p99")).or_default().push(g);
            res.entry((t.name, "list")).or_default().push(l);
            res.entry((t.name, "watch")).or_default().push(w);
        }
    }
    let m = |t: &str, k: &str| median(res.get(&(t, k)).cloned().unwrap_or_default());
    let create = m("auth", "create");
    let create_no = m("noauth", "create");
    let round2 = |v: f64| (v * 100.0).round() / 100.0;
    println!(
        "{}",
        json!({
            "create_per_s": create.round(),
            "create_per_s_noauth": create_no.round(),
            "get_p99_ms": round2(m("auth", "get_p99")),
            "get_p99_ms_noauth": round2(m("noauth", "get_p99")),
            "list_per_s": m("auth", "list").round(),
            "list_per_s_noauth": m("noauth", "list").round(),
            "watch_events_per_s": m("auth", "watch").round(),
            "watch_events_per_s_noauth": m("noauth", "watch").round(),
            "auth_overhead": (1000.0 * (1.0 - create / create_no)).round() / 1000.0,
            "rounds": rounds, "creates": n, "concurrency": conc,
        })
    );
}
