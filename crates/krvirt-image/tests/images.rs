//! The content-addressed image store: import, tags and history, layering,
//! verification and tampering, garbage collection, HTTP import and pulls
//! from a real registry (Debian's docker-registry) holding a containerDisk
//! the test pushed.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use krvirt_image::{BlobFormat, ImageError, ImageStore, ImportOptions, NameTag, sha256_file};

fn demo() -> krvirt_image::DemoImages {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("krvirt-image-demo-cache");
    krvirt_image::ensure_demo_images(&cache).expect("building the demo guest")
}

fn store(dir: &Path) -> ImageStore {
    ImageStore::with_demo_images(&dir.join("images"), demo()).expect("open store")
}

fn nt(s: &str) -> NameTag {
    NameTag::parse(s).unwrap()
}

fn write_file(path: &Path, len: usize, seed: u8) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    std::fs::write(path, data).unwrap();
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} not runnable ({e}): install qemu-utils"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, offset).unwrap();
    // Put mtime back: only ctime still tells the file changed.
    f.set_modified(mtime).unwrap();
}

#[test]
fn import_tag_history_and_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let f1 = tmp.path().join("a.img");
    write_file(&f1, 3 << 20, 1);
    let imp = s
        .import_file(&f1, &ImportOptions::new(nt("app:1.0"), "a.img"))
        .unwrap();
    assert_eq!(imp.digest, sha256_file(&f1).unwrap());
    assert_eq!(imp.size, 3 << 20);
    assert_eq!(imp.format, BlobFormat::Raw);
    let blob = s.blob_path(&imp.digest).unwrap();
    assert_eq!(std::fs::read(&blob).unwrap(), std::fs::read(&f1).unwrap());

    // Several tags per digest.
    assert_eq!(s.tag("app:1.0", &nt("app:stable")).unwrap(), imp.digest);
    s.tag(&imp.digest, &nt("other")).unwrap();
    let rows = s.list().unwrap();
    let tags: Vec<String> = rows
        .iter()
        .filter(|r| r.digest == imp.digest)
        .map(|r| format!("{}:{}", r.name, r.tag))
        .collect();
    assert_eq!(tags, ["app:1.0", "app:stable", "other:latest"]);

    // Same content again: same blob, no copy.
    let again = s
        .import_file(&f1, &ImportOptions::new(nt("app:1.0"), "again"))
        .unwrap();
    assert_eq!(again.digest, imp.digest);

    // Moving a tag is recorded in its history.
    let f2 = tmp.path().join("b.img");
    write_file(&f2, 1 << 20, 2);
    let imp2 = s
        .import_file(&f2, &ImportOptions::new(nt("app:stable"), "b.img"))
        .unwrap();
    let ins = s.inspect(&nt("app:stable")).unwrap();
    assert_eq!(ins.digest, imp2.digest);
    assert_eq!(ins.chain.len(), 1);
    let hist: Vec<(Option<String>, Option<String>)> = ins
        .history
        .iter()
        .map(|e| (e.digest.clone(), e.previous.clone()))
        .collect();
    assert_eq!(
        hist,
        [
            (Some(imp.digest.clone()), None),
            (Some(imp2.digest.clone()), Some(imp.digest.clone()))
        ]
    );
    // The tag resolves like any image reference.
    let r = s.resolve("app:stable").unwrap();
    assert_eq!(r.digest.as_deref(), Some(imp2.digest.as_str()));
    assert_eq!(
        r.disk.as_deref(),
        Some(s.blob_path(&imp2.digest).unwrap().as_path())
    );

    // An announced digest that does not match is refused, nothing tagged.
    let mut o = ImportOptions::new(nt("bad:1"), "announced");
    o.expected_digest = Some(imp.digest.clone());
    let e = s.import_file(&f2, &o).unwrap_err();
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
    assert!(s.resolve("bad:1").is_err());
    // No temp file is left behind.
    assert_eq!(
        std::fs::read_dir(tmp.path().join("images/tmp"))
            .unwrap()
            .count(),
        0
    );

    // Bad names are refused.
    assert!(NameTag::parse("Bad:1").is_err());
    assert!(NameTag::parse("ok:bad tag").is_err());
}

/// base (raw) + application layer (qcow2 overlay): the chain shows both,
/// and reading through the layer sees the layer's writes over the base.
#[test]
fn layered_image_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let base = tmp.path().join("base.raw");
    write_file(&base, 4 << 20, 7);
    let b = s
        .import_file(&base, &ImportOptions::new(nt("os:12"), "base.raw"))
        .unwrap();
    let layer = tmp.path().join("app.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            base.to_str().unwrap(),
            layer.to_str().unwrap(),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 64k",
            layer.to_str().unwrap(),
        ],
    );
    // Without a base a layer is refused (its backing file is outside the store).
    let e = s
        .import_file(&layer, &ImportOptions::new(nt("app:1"), "app.qcow2"))
        .unwrap_err();
    assert!(e.to_string().contains("backing file"), "{e}");
    let mut o = ImportOptions::new(nt("app:1"), "app.qcow2");
    o.base = Some(nt("os:12"));
    let l = s.import_file(&layer, &o).unwrap();
    assert_eq!(l.parent.as_deref(), Some(b.digest.as_str()));
    assert_eq!(l.format, BlobFormat::Qcow2);
    let ins = s.inspect(&nt("app:1")).unwrap();
    let chain: Vec<&str> = ins.chain.iter().map(|c| c.digest.as_str()).collect();
    assert_eq!(chain, [l.digest.as_str(), b.digest.as_str()]);
    assert_eq!(ins.chain[1].tags, ["os:12"]);

    // Read the whole chain back through QEMU's block layer.
    let out = tmp.path().join("flat.raw");
    let lp = s.blob_path(&l.digest).unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            lp.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let flat = std::fs::read(&out).unwrap();
    let orig = std::fs::read(&base).unwrap();
    assert!(flat[..65536].iter().all(|&x| x == 0xab));
    assert_eq!(flat[65536..], orig[65536..]);
    // The stored layer names its parent by digest, relative to the blob dir.
    assert_eq!(
        krvirt_image::blobs::qcow2_backing_file(&lp)
            .unwrap()
            .as_deref(),
        Some(&b.digest["sha256:".len()..])
    );
    s.verify(&l.digest, true).unwrap();
}

/// Flip one byte of a stored blob (and set its mtime back): the next use
/// is refused with a clear error, recorded on the image; a layer on a
/// tampered base is refused too.
#[test]
fn tampered_blob_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let base = tmp.path().join("base.raw");
    write_file(&base, 2 << 20, 3);
    let b = s
        .import_file(&base, &ImportOptions::new(nt("os:1"), "base.raw"))
        .unwrap();
    let layer = tmp.path().join("l.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            base.to_str().unwrap(),
            layer.to_str().unwrap(),
        ],
    );
    let mut o = ImportOptions::new(nt("app:1"), "l.qcow2");
    o.base = Some(nt("os:1"));
    s.import_file(&layer, &o).unwrap();
    // Verified and unchanged: fine.
    s.resolve_verified("app:1").unwrap();
    s.resolve_verified("os:1").unwrap();

    let blob = s.blob_path(&b.digest).unwrap();
    flip_byte(&blob, 1 << 20);
    for r in ["os:1", "app:1"] {
        let e = s.resolve_verified(r).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ImageError::Corrupt { .. }), "{r}: {msg}");
        assert!(msg.contains(&b.digest) && msg.contains("corrupt"), "{msg}");
    }
    let row = s
        .list()
        .unwrap()
        .into_iter()
        .find(|r| r.name == "os")
        .unwrap();
    assert!(row.failure.unwrap().contains("hashes to"));
    // Flipping it back makes it good again.
    flip_byte(&blob, 1 << 20);
    s.resolve_verified("app:1").unwrap();
    assert!(s.list().unwrap().iter().all(|r| r.failure.is_none()));
    // A full verify catches what the stamp cache cannot: same stamp, other bytes
    // would need a raw-device write; here we check full hashing also passes.
    s.verify(&b.digest, true).unwrap();
}

/// The demo guest disk is imported as demo-disk:latest, once per build.
#[test]
fn demo_disk_is_an_image() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let d = s.digest_of(&nt("demo-disk")).unwrap();
    assert_eq!(d, sha256_file(&demo().disk).unwrap());
    let cat = std::fs::read(tmp.path().join("images/catalog.json")).unwrap();
    // Reopening does not import again (the catalog is unchanged).
    let s2 = store(tmp.path());
    assert_eq!(
        std::fs::read(tmp.path().join("images/catalog.json")).unwrap(),
        cat
    );
    let r = s2
        .resolve_verified("quay.io/kubevirt/cirros-container-disk-demo:devel")
        .unwrap();
    assert_eq!(r.digest.as_deref(), Some(d.as_str()));
}

#[test]
fn gc_keeps_what_is_referenced() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let mk = |name: &str, seed: u8| {
        let p = tmp.path().join(format!("{seed}.raw"));
        write_file(&p, 1 << 20, seed);
        s.import_file(&p, &ImportOptions::new(nt(name), "t"))
            .unwrap()
    };
    let base = mk("base:1", 1);
    let used = mk("used:1", 2);
    let junk = mk("junk:1", 3);
    let kept = mk("kept:1", 4);
    // A layer on base, then base's own tag removed: base is still needed.
    let layer = tmp.path().join("l.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            tmp.path().join("1.raw").to_str().unwrap(),
            layer.to_str().unwrap(),
        ],
    );
    let mut o = ImportOptions::new(nt("app:1"), "l");
    o.base = Some(nt("base:1"));
    let app = s.import_file(&layer, &o).unwrap();
    s.untag(&nt("base:1"), false).unwrap();
    s.untag(&nt("used"), true).unwrap();
    s.untag(&nt("junk:1"), false).unwrap();
    // A VM's overlay (like the agent's) backed by the untagged `used` blob.
    let run_dir = tmp.path().join("run/vmi/uid-1");
    std::fs::create_dir_all(&run_dir).unwrap();
    let used_path = s.blob_path(&used.digest).unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            used_path.to_str().unwrap(),
            run_dir.join("disk0.qcow2").to_str().unwrap(),
        ],
    );
    let report = s.gc(&[tmp.path().join("run/vmi")]).unwrap();
    assert_eq!(report.removed, std::slice::from_ref(&junk.digest));
    assert_eq!(report.kept_in_use, std::slice::from_ref(&used.digest));
    assert_eq!(report.freed_bytes, 1 << 20);
    for d in [&base.digest, &used.digest, &kept.digest, &app.digest] {
        assert!(s.blob_path(d).unwrap().is_file(), "{d} removed");
    }
    assert!(!s.blob_path(&junk.digest).unwrap().exists());
    s.resolve_verified("app:1").unwrap();
    // The VM is gone: its blob goes too. Removing the app frees its base.
    std::fs::remove_dir_all(&run_dir).unwrap();
    s.untag(&nt("app:1"), false).unwrap();
    let mut removed = s.gc(&[tmp.path().join("run/vmi")]).unwrap().removed;
    removed.sort();
    let mut want = vec![base.digest, used.digest, app.digest];
    want.sort();
    assert_eq!(removed, want);
    assert!(s.blob_path(&kept.digest).unwrap().is_file());
    s.resolve_verified("demo-disk").unwrap();
}

/// A one-shot HTTP server for the URL import.
#[tokio::test]
async fn import_from_http_url() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let data: Vec<u8> = (0..(5u32 << 20)).map(|i| (i % 251) as u8).collect();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let body = data.clone();
    let srv = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut c, _) = l.accept().unwrap();
            let mut req = [0u8; 4096];
            let n = c.read(&mut req).unwrap();
            let path = String::from_utf8_lossy(&req[..n]).to_string();
            if path.starts_with("GET /missing") {
                c.write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .unwrap();
                continue;
            }
            write!(
                c,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .unwrap();
            c.write_all(&body).unwrap();
        }
    });
    let url = format!("http://127.0.0.1:{port}/disk.img");
    let imp = s
        .import_url(&url, &ImportOptions::new(nt("web:1"), url.clone()))
        .await
        .unwrap();
    let e = s
        .import_url(
            &format!("http://127.0.0.1:{port}/missing"),
            &ImportOptions::new(nt("web:2"), "x"),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");
    srv.join().unwrap();
    assert_eq!(
        std::fs::read(s.blob_path(&imp.digest).unwrap()).unwrap(),
        data
    );
    assert_eq!(s.inspect(&nt("web:1")).unwrap().chain[0].source, url);
}

// ---------- a real registry ----------

/// Debian's docker-registry on a free loopback port with its own storage;
/// killed on drop.
pub struct TestRegistry {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TestRegistry {
    pub fn start() -> TestRegistry {
        let bin = "/usr/bin/docker-registry";
        assert!(
            Path::new(bin).exists(),
            "{bin} missing: install the Debian package docker-registry (scripts/packages.txt)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        let reg = TestRegistry {
            child,
            addr,
            _dir: dir,
        };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(&reg.addr).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "docker-registry did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        reg
    }
}

fn tar_entry(out: &mut Vec<u8>, name: &str, data: &[u8], typeflag: u8) {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(if typeflag == b'5' {
        b"0000755"
    } else {
        b"0000644"
    });
    h[108..115].copy_from_slice(b"0000107");
    h[116..123].copy_from_slice(b"0000107");
    h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// Push `disk` as a KubeVirt containerDisk (`/disk/disk.img`, 107:107, in
/// a gzip'd layer) to `REGISTRY/repo:tag`; returns the manifest digest.
pub async fn push_container_disk(registry: &str, repo: &str, tag: &str, disk: &[u8]) -> String {
    let mut tar = Vec::new();
    tar_entry(&mut tar, "disk/", b"", b'5');
    tar_entry(&mut tar, "disk/disk.img", disk, b'0');
    tar.extend_from_slice(&[0u8; 1024]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let layer = gz.finish().unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha(&tar)]},
        "config": {}
    }))
    .unwrap();
    let c = reqwest::Client::new();
    for blob in [&layer, &config] {
        let r = c
            .post(format!("http://{registry}/v2/{repo}/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "upload start");
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("http://{registry}{loc}")
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = c
            .put(format!("{loc}{sep}digest={}", sha(blob)))
            .header("content-type", "application/octet-stream")
            .body(blob.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "blob upload: {}", r.text().await.unwrap());
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(&layer), "size": layer.len()}]
    }))
    .unwrap();
    let r = c
        .put(format!("http://{registry}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "manifest: {}", r.text().await.unwrap());
    sha(&manifest)
}

#[tokio::test]
async fn pull_container_disk_from_a_local_registry() {
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let disk: Vec<u8> = (0..(3u32 << 20) + 123).map(|i| (i % 241) as u8).collect();
    let mdigest = push_container_disk(&reg.addr, "demo/disk", "1", &disk).await;
    let reference = format!("{}/demo/disk:1", reg.addr);
    let imp = s.pull(&reference, None).await.unwrap();
    assert_eq!(imp.image, "disk:1");
    assert_eq!(imp.digest, sha(&disk));
    assert_eq!(
        std::fs::read(s.blob_path(&imp.digest).unwrap()).unwrap(),
        disk
    );
    // The reference now resolves to the pulled image (as a containerDisk would).
    let r = s.resolve_verified(&reference).unwrap();
    assert_eq!(r.digest.as_deref(), Some(imp.digest.as_str()));
    // By manifest digest too, into a chosen name.
    let by_digest = format!("{}/demo/disk@{mdigest}", reg.addr);
    let imp2 = s.pull(&by_digest, Some(nt("pinned:v1"))).await.unwrap();
    assert_eq!(imp2.digest, imp.digest);
    assert!(
        s.inspect(&nt("pinned:v1")).unwrap().chain[0]
            .source
            .contains(&mdigest)
    );
    // A wrong manifest digest is refused; an unknown tag is a clear error.
    let wrong = format!("{}/demo/disk@sha256:{}", reg.addr, "0".repeat(64));
    assert!(s.pull(&wrong, None).await.is_err());
    let e = s
        .pull(&format!("{}/demo/disk:nope", reg.addr), None)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("404") || e.to_string().contains("MANIFEST_UNKNOWN"),
        "{e}"
    );
}
