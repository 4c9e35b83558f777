//! `import_bench FILE [RUNS]`: time importing FILE into a fresh image store
//! (streamed copy + sha256 + fsync, the digest verified against the
//! announced one) against `sha256sum FILE`, interleaved; prints one JSON
//! line: {"import_s", "sha256sum_s", "import_ratio", "runs", "bytes"}.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use krvirt_image::{ImageStore, ImportOptions, NameTag};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(file) = args.get(1) else {
        eprintln!("usage: import_bench FILE [RUNS]");
        std::process::exit(2);
    };
    let runs: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(3);
    let file = Path::new(file);
    let cache = std::env::var_os("KRVIRT_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("krvirt-bench-cache"));
    let demo = match krvirt_image::ensure_demo_images(&cache.join("demo")) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("building the demo guest: {e}");
            std::process::exit(1);
        }
    };
    let expected = krvirt_image::sha256_file(file).unwrap_or_else(|e| {
        eprintln!("{}: {e}", file.display());
        std::process::exit(1)
    });
    let bytes = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let (mut imp, mut sum) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let tmp = tempfile::tempdir_in(file.parent().unwrap_or(Path::new("."))).expect("tempdir");
        let store = ImageStore::with_demo_images(tmp.path(), demo.clone()).expect("store");
        let mut opts = ImportOptions::new(
            NameTag::parse("bench:1").expect("name"),
            file.display().to_string(),
        );
        opts.expected_digest = Some(expected.clone());
        let run_import = |imp: &mut Vec<f64>| {
            let t = Instant::now();
            let r = store.import_file(file, &opts).expect("import");
            imp.push(t.elapsed().as_secs_f64());
            assert_eq!(r.digest, expected);
        };
        let run_sum = |sum: &mut Vec<f64>| {
            let t = Instant::now();
            let out = Command::new("sha256sum")
                .arg(file)
                .output()
                .expect("sha256sum");
            sum.push(t.elapsed().as_secs_f64());
            assert!(out.status.success());
        };
        // Alternate the order so neither always runs on a warmer cache.
        if i % 2 == 0 {
            run_import(&mut imp);
            run_sum(&mut sum);
        } else {
            run_sum(&mut sum);
            run_import(&mut imp);
        }
    }
    let (i, s) = (median(imp), median(sum));
    println!(
        "{{\"import_s\": {i:.4}, \"sha256sum_s\": {s:.4}, \"import_ratio\": {:.4}, \"runs\": {runs}, \"bytes\": {bytes}}}",
        i / s
    );
}
