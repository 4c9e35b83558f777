//! The API on etcd against the API on the embedded store (`bench/api
//! --store etcd` runs this, issue #6).
//!
//! Starts a real single-member etcd and two real `krvirt server`
//! processes side by side: one `--store etcd://…`, one on the embedded
//! store, both with their data on the same file system (/var/tmp, or
//! `$KRVIRT_BENCH_DIR`) and both `--insecure-no-auth` (plain HTTP, so the
//! two differ only in the store; bench/api's default mode measures what
//! authentication costs). Rounds alternate which server goes first; each
//! round measures on both the VirtualMachine creates per second through
//! the API (C concurrent clients), and on etcd the watch latency: a
//! watcher holds `?watch=true` open while one client creates objects one
//! after another; latency = from just before the POST to the moment the
//! watcher has read that object's ADDED line (p99 per round). Medians over
//! rounds. Last line:
//! `{"etcd_create_per_s": …, "embedded_create_per_s": …, "watch_p99_ms": …}`
//!
//! Usage: api_store_bench --krvirt BIN [--rounds N] [--creates M]
//! [--concurrency C] [--watch-creates W]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use krvirt_store::etcd::testing::EtcdCluster;
use serde_json::{Value, json};

const VMS: &str = "/apis/kubevirt.io/v1/namespaces/default/virtualmachines";

/// One `krvirt server` process; killed on drop.
struct Server {
    name: &'static str,
    base: String,
    child: Child,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

async fn start_server(bin: &Path, name: &'static str, store: &str, dir: &Path) -> Server {
    let port = free_port();
    let data = dir.join(name);
    std::fs::create_dir_all(&data).expect("data dir");
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).expect("log file");
    let child = Command::new(bin)
        .args(["server", "--insecure-no-auth", "--store", store])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log file"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let server = Server {
        name,
        base: format!("http://127.0.0.1:{port}"),
        child,
        log,
    };
    // Ready once the default namespace exists (the server creates it).
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client
            .get(format!("{}/api/v1/namespaces/default", server.base))
            .send()
            .await
            && r.status().is_success()
        {
            return server;
        }
        if Instant::now() > deadline {
            panic!(
                "krvirt server ({name}) did not come up:\n{}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn vm(name: &str, label: Option<&str>) -> Value {
    let mut v = json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"runStrategy": "Halted", "template": {"spec": {"domain": {
            "devices": {}, "resources": {"requests": {"memory": "64Mi"}}}}}}
    });
    if let Some(l) = label {
        v["metadata"]["labels"] = json!({ "w": l });
    }
    v
}

/// `n` creates from `conc` concurrent clients; creates per second.
async fn creates(s: &Server, client: &reqwest::Client, tag: &str, n: usize, conc: usize) -> f64 {
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (c, url, next, tag) = (
            client.clone(),
            format!("{}{VMS}", s.base),
            next.clone(),
            tag.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let r = c
                    .post(&url)
                    .json(&vm(&format!("{tag}-{i}"), None))
                    .send()
                    .await
                    .expect("create");
                assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// p99 in ms of create (before the POST) → the watcher has read its event.
async fn watch_p99(s: &Server, client: &reqwest::Client, tag: &str, n: usize) -> f64 {
    let r = client
        .get(format!(
            "{}{VMS}?watch=true&labelSelector=w%3D{tag}",
            s.base
        ))
        .send()
        .await
        .expect("watch");
    assert_eq!(r.status().as_u16(), 200, "watch");
    let mut body = r.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("{tag}-{i}");
        let t0 = Instant::now();
        let r = client
            .post(format!("{}{VMS}", s.base))
            .json(&vm(&name, Some(tag)))
            .send()
            .await
            .expect("create");
        assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
        // Read lines until this object's ADDED event.
        'seen: loop {
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let ev: Value = serde_json::from_slice(&line).expect("watch event JSON");
                if ev["type"] == "ERROR" {
                    panic!("watch error before {name}'s event: {ev}");
                }
                if ev["type"] == "ADDED" && ev["object"]["metadata"]["name"] == name.as_str() {
                    lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                    break 'seen;
                }
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), body.next())
                .await
                .unwrap_or_else(|_| panic!("no watch event for {name} within 30 s"))
                .unwrap_or_else(|| {
                    panic!(
                        "the watch ended before {name}'s event; server log:\n{}",
                        std::fs::read_to_string(&s.log).unwrap_or_default()
                    )
                })
                .expect("watch chunk");
            buf.extend_from_slice(&chunk);
        }
    }
    lat.sort_by(f64::total_cmp);
    lat[(lat.len() * 99 / 100).min(lat.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut rounds, mut n, mut conc, mut wn) = (5usize, 2000usize, 16usize, 300usize);
    let mut bin: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        let v = args.next();
        let num = v.as_deref().and_then(|v| v.parse::<usize>().ok());
        match (a.as_str(), num) {
            ("--rounds", Some(v)) => rounds = v.max(1),
            ("--creates", Some(v)) => n = v.max(1),
            ("--concurrency", Some(v)) => conc = v.max(1),
            ("--watch-creates", Some(v)) => wn = v.max(1),
            ("--krvirt", _) if v.is_some() => bin = v.map(PathBuf::from),
            _ => {
                eprintln!(
                    "usage: api_store_bench --krvirt BIN [--rounds N] [--creates M] \
                     [--concurrency C] [--watch-creates W]"
                );
                std::process::exit(2);
            }
        }
    }
    let Some(bin) = bin else {
        eprintln!("api_store_bench: --krvirt BIN (the krvirt binary) is required");
        std::process::exit(2);
    };
    let base = tempfile::Builder::new()
        .prefix("krvirt-api-store-bench-")
        .tempdir_in(std::env::var_os("KRVIRT_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into()))
        .expect("bench dir");
    let etcd = tokio::task::spawn_blocking({
        let p = base.path().to_path_buf();
        move || EtcdCluster::start_in(1, Some(&p))
    })
    .await
    .expect("etcd start task")
    .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    let servers = [
        start_server(&bin, "etcd", &etcd.url(), base.path()).await,
        start_server(&bin, "embedded", "embedded", base.path()).await,
    ];
    let client = reqwest::Client::new();
    let (mut e, mut m, mut w) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut got = [0.0; 2];
        for i in order {
            got[i] = creates(&servers[i], &client, &format!("c{r}"), n, conc).await;
        }
        let p = watch_p99(&servers[0], &client, &format!("w{r}"), wn).await;
        eprintln!(
            "round {r}: {} {:.0} creates/s, {} {:.0} creates/s, etcd watch p99 {p:.2} ms",
            servers[0].name, got[0], servers[1].name, got[1]
        );
        e.push(got[0]);
        m.push(got[1]);
        w.push(p);
    }
    let (ec, mc, wp) = (median(e), median(m), median(w));
    // The three figures first, then the run's parameters.
    println!(
        "{{\"etcd_create_per_s\": {ec:.0}, \"embedded_create_per_s\": {mc:.0}, \
         \"watch_p99_ms\": {wp:.2}, \"etcd_vs_embedded\": {:.3}, \"rounds\": {rounds}, \
         \"creates\": {n}, \"concurrency\": {conc}, \"watch_creates\": {wn}}}",
        ec / mc
    );
    drop(servers);
    drop(etcd);
}
