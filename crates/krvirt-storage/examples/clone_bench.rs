//! Clone timings for `bench/storage`: prints one JSON object.
//!
//! - `linked_clone_1g_s`, `linked_clone_50g_s`: a `dir` pool Volume as a
//!   linked clone (qcow2 overlay) of a 1 GiB and a 50 GiB sparse raw image,
//!   median of `runs`.
//! - `full_clone_ratio`: a full clone of a 1 GiB Volume holding `data_mib`
//!   MiB of random data (`clone_volume`) against `cp --sparse=always` of the
//!   same file, medians of interleaved runs.
//!
//! Usage: clone_bench DIR [RUNS] [DATA_MIB]

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use krvirt_storage::{CloneMode, DirPool, DiskSource, Format, StorageBackend};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(
        args.get(1)
            .ok_or("usage: clone_bench DIR [RUNS] [DATA_MIB]")?,
    );
    let runs: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let data_mib: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let pool = DirPool::open(&dir.join("pool"))?;
    let mut out = serde_json::Map::new();

    for (key, gib) in [("linked_clone_1g_s", 1u64), ("linked_clone_50g_s", 50)] {
        let img = dir.join(format!("img-{gib}g.raw"));
        std::fs::File::create(&img)?.set_len(gib << 30)?;
        let mut times = Vec::new();
        for i in 0..runs {
            let name = format!("l{gib}-{i}");
            let t = Instant::now();
            pool.import(&name, &img, Format::Raw, CloneMode::Linked, None)?;
            times.push(t.elapsed().as_secs_f64());
            pool.delete(&name)?;
        }
        out.insert(key.into(), median(times).into());
    }

    // A 1 GiB volume with `data_mib` MiB of random data.
    pool.create("src", 1 << 30)?;
    let DiskSource::File { path: src, .. } = pool.disk("src")? else {
        return Err("a dir pool volume is a file".into());
    };
    let status = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P 0x5a 0 {data_mib}M"))
        .arg(&src)
        .output()?;
    if !status.status.success() {
        return Err("qemu-io write failed".into());
    }
    let (mut clone_t, mut cp_t) = (Vec::new(), Vec::new());
    let cp_dst = dir.join("cp.qcow2");
    for i in 0..runs {
        let t = Instant::now();
        pool.clone_volume("src", &format!("c{i}"))?;
        clone_t.push(t.elapsed().as_secs_f64());
        pool.delete(&format!("c{i}"))?;
        let t = Instant::now();
        let ok = Command::new("cp")
            .arg("--sparse=always")
            .arg(&src)
            .arg(&cp_dst)
            .status()?
            .success();
        cp_t.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&cp_dst)?;
        if !ok {
            return Err("cp failed".into());
        }
    }
    let (c, p) = (median(clone_t), median(cp_t));
    out.insert("full_clone_s".into(), c.into());
    out.insert("cp_sparse_s".into(), p.into());
    out.insert("full_clone_ratio".into(), (c / p).into());
    out.insert("clone_runs".into(), runs.into());
    pool.delete("src")?;
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
