//! Store throughput and watch latency: etcd (a real single member) against
//! the embedded SQLite store, both with their data on the same file system,
//! interleaved rounds, medians. Run by `bench/store_etcd` (release build).
//! Last line: `{"etcd_create_per_s": …, "embedded_create_per_s": …, "watch_p99_ms": …}`
//! (watch latency measured on etcd: create acknowledged → event received).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use krvirt_store::Store;
use krvirt_store::embedded::EmbeddedStore;
use krvirt_store::etcd::EtcdStore;
use krvirt_store::etcd::testing::EtcdCluster;

fn value() -> Vec<u8> {
    // About the size of a small VirtualMachine object.
    (0..1024).map(|i| b'a' + (i % 26) as u8).collect()
}

/// `n` creates from `c` concurrent writers; creates per second.
async fn creates(store: Arc<dyn Store>, prefix: &str, n: usize, c: usize) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..c {
        let store = store.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                store
                    .create(&format!("{prefix}/{i:06}"), value(), None)
                    .await
                    .expect("create");
                i += c;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// p99 of (event received - create acknowledged... started) in ms.
async fn watch_p99(store: Arc<dyn Store>, prefix: &str, n: usize) -> f64 {
    let mut w = store.watch(prefix, 0).await.expect("watch");
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        store
            .create(&format!("{prefix}/{i:06}"), value(), None)
            .await
            .expect("create");
        match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(Some(Ok(_))) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
            other => panic!("watch: {other:?}"),
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
    let (mut rounds, mut n, mut c) = (5usize, 2000usize, 16usize);
    while let Some(a) = args.next() {
        let v = args.next().and_then(|v| v.parse().ok());
        match (a.as_str(), v) {
            ("--rounds", Some(v)) => rounds = v,
            ("--creates", Some(v)) => n = v,
            ("--concurrency", Some(v)) => c = v,
            _ => {
                eprintln!("usage: store_bench [--rounds N] [--creates N] [--concurrency N]");
                std::process::exit(2);
            }
        }
    }
    // Both stores on the same (disk) file system.
    let base = tempfile::Builder::new()
        .prefix("krvirt-store-bench-")
        .tempdir_in(std::env::var_os("KRVIRT_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into()))
        .expect("bench dir");
    let etcd_proc = EtcdCluster::start_in(1, Some(base.path())).expect("start etcd");
    let etcd: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(&etcd_proc.endpoints())
            .await
            .expect("connect etcd"),
    );
    let embedded: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&base.path().join("state.db")).expect("open embedded"));
    let (mut e, mut m, mut w) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds.max(1) {
        let (a, b) = if r % 2 == 0 {
            let a = creates(etcd.clone(), &format!("/bench/c{r}"), n, c).await;
            (
                a,
                creates(embedded.clone(), &format!("/bench/c{r}"), n, c).await,
            )
        } else {
            let b = creates(embedded.clone(), &format!("/bench/c{r}"), n, c).await;
            (
                creates(etcd.clone(), &format!("/bench/c{r}"), n, c).await,
                b,
            )
        };
        let p = watch_p99(etcd.clone(), &format!("/bench/w{r}"), 300).await;
        println!(
            "round {r}: etcd {a:.0} creates/s, embedded {b:.0} creates/s, etcd watch p99 {p:.2} ms"
        );
        e.push(a);
        m.push(b);
        w.push(p);
    }
    println!(
        "{{\"etcd_create_per_s\": {:.0}, \"embedded_create_per_s\": {:.0}, \"watch_p99_ms\": {:.2}}}",
        median(e),
        median(m),
        median(w)
    );
}
