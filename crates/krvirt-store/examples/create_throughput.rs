//! Measure acknowledged creates per second with concurrent writers.
//!
//! `cargo run -p krvirt-store --example create_throughput [WRITERS] [SECONDS] [DIR]`
//! (defaults: 64 writers, 5 seconds, a temporary directory). Prints one
//! summary line.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use krvirt_store::Store;
use krvirt_store::embedded::EmbeddedStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let writers: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let seconds: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5);
    let dir = match args.next() {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("bench.db"))?);
    let value = vec![b'x'; 512];
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, stop, done, value) = (
            Arc::clone(&store),
            Arc::clone(&stop),
            Arc::clone(&done),
            value.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                store
                    .create(&format!("/bench/{w}/{i}"), value.clone(), None)
                    .await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok::<_, krvirt_store::StoreError>(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    let stats = store.writer_stats();
    println!(
        "{writers} writers, {seconds}s: {n} acknowledged creates, {:.0} creates/s, {} commits ({:.1} writes/commit), revision {}",
        n as f64 / elapsed,
        stats.commits,
        stats.requests as f64 / stats.commits.max(1) as f64,
        store.revision().await?
    );
    Ok(())
}
