//! Image store, alias table, kernel-boot path joining and the demo image cache.

use std::path::PathBuf;

use krvirt_image::alias::{DEMO_DISK, DEMO_KERNEL};
use krvirt_image::{
    GuestBuildOptions, ImageError, ImageStore, ensure_demo_images, ensure_demo_images_with,
    kernel_boot_paths,
};

fn open(dir: &std::path::Path) -> ImageStore {
    ImageStore::open(dir)
        .unwrap_or_else(|e| panic!("opening the image store (builds the demo guest) failed: {e}"))
}

/// Every containerDisk / kernelBoot image named in KubeVirt's example
/// manifests (/work/shared/kubevirt-examples, `grep image:`), plus the
/// quay.io names KubeVirt's docs use.
const CORPUS_DISKS: &[&str] = &[
    "registry:5000/kubevirt/cirros-container-disk-demo:devel",
    "registry:5000/kubevirt/alpine-container-disk-demo:devel",
    "registry:5000/kubevirt/fedora-with-test-tooling-container-disk:devel",
    "quay.io/kubevirt/cirros-container-disk-demo",
    "quay.io/kubevirt/cirros-container-disk-demo:v1.2.0",
    "quay.io/kubevirt/cirros-container-disk-demo:latest",
    "quay.io/kubevirt/fedora-cloud-container-disk-demo:latest",
    "quay.io/kubevirt/alpine-container-disk-demo:v1.1.0",
    "quay.io/containerdisks/fedora:40",
    "quay.io/containerdisks/ubuntu:22.04",
    "quay.io/containerdisks/centos-stream:9",
    "kubevirt/cirros-container-disk-demo",
];
const CORPUS_KERNELS: &[&str] = &[
    "registry:5000/kubevirt/alpine-ext-kernel-boot-demo:devel",
    "quay.io/kubevirt/alpine-ext-kernel-boot-demo:v1.0.0",
];

#[test]
fn example_corpus_images_resolve_to_demo_images() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let demo = store.demo_images().clone();
    let demo_digest = krvirt_image::sha256_file(&demo.disk).unwrap();
    for r in CORPUS_DISKS {
        let img = store.resolve(r).unwrap_or_else(|e| panic!("{r}: {e}"));
        assert_eq!(img.name, DEMO_DISK, "{r}");
        // The demo disk is a content-addressed blob with the built disk's content.
        assert_eq!(img.digest.as_deref(), Some(demo_digest.as_str()), "{r}");
        assert!(img.disk.as_ref().unwrap().is_file());
    }
    for r in CORPUS_KERNELS {
        let img = store.resolve(r).unwrap_or_else(|e| panic!("{r}: {e}"));
        assert_eq!(img.name, DEMO_KERNEL, "{r}");
        assert_eq!(img.disk, None);
        // vmi-kernel-boot.yaml's paths.
        let p = kernel_boot_paths(
            &img,
            Some("/boot/vmlinuz-virt"),
            Some("/boot/initramfs-virt"),
        )
        .unwrap();
        assert_eq!(
            std::fs::read(p.kernel.unwrap()).unwrap(),
            std::fs::read(&demo.kernel).unwrap()
        );
        assert_eq!(
            std::fs::read(p.initrd.unwrap()).unwrap(),
            std::fs::read(&demo.initramfs).unwrap()
        );
    }
    // Local names resolve directly.
    assert_eq!(store.resolve("demo-disk").unwrap().name, DEMO_DISK);
    assert_eq!(store.resolve("demo-kernel").unwrap().disk, None);
    assert_eq!(
        store.image_names().unwrap(),
        vec![DEMO_DISK.to_string(), DEMO_KERNEL.to_string()]
    );
}

#[test]
fn unknown_reference_says_how_to_add_an_alias() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let err = store.resolve("quay.io/nobody/nothing:1.0").unwrap_err();
    match &err {
        ImageError::NotFound {
            reference,
            aliases_file,
        } => {
            assert_eq!(reference, "quay.io/nobody/nothing:1.0");
            assert_eq!(aliases_file, &tmp.path().join("aliases.json"));
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("aliases.json"), "{msg}");
    assert!(
        msg.contains(r#"{"aliases": {"quay.io/nobody/nothing:1.0": "demo-disk"}}"#),
        "{msg}"
    );
    assert!(matches!(
        store.resolve("not a reference"),
        Err(ImageError::InvalidReference { .. })
    ));
}

#[test]
fn user_aliases_and_images_apply_without_reopening() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    // Nothing there yet.
    assert!(matches!(
        store.resolve("example.com/team/vm:1"),
        Err(ImageError::NotFound { .. })
    ));
    std::fs::create_dir_all(tmp.path().join("mine/boot")).unwrap();
    std::fs::write(tmp.path().join("mine/disk.qcow2"), b"not really qcow2").unwrap();
    std::fs::write(tmp.path().join("mine/boot/kernel"), b"k").unwrap();
    std::fs::write(
        store.aliases_file(),
        r#"{
          "images": {
            "my-disk": { "disk": "mine/disk.qcow2" },
            "my-kernel": { "root": "mine" }
          },
          "aliases": {
            "example.com/team/vm": "my-disk",
            "quay.io/kubevirt/cirros-container-disk-demo:special": "my-disk",
            "example.com/kernels/*": "my-kernel",
            "example.com/kernels/pinned:2": "demo-kernel"
          }
        }"#,
    )
    .unwrap();
    let img = store.resolve("example.com/team/vm:1").unwrap();
    assert_eq!(img.name, "my-disk");
    assert_eq!(img.disk, Some(tmp.path().join("mine/disk.qcow2")));
    assert_eq!(img.root, tmp.path().join("mine"));
    // A user alias for one tag beats the built-in repo alias; other tags keep it.
    assert_eq!(
        store
            .resolve("quay.io/kubevirt/cirros-container-disk-demo:special")
            .unwrap()
            .name,
        "my-disk"
    );
    assert_eq!(
        store
            .resolve("quay.io/kubevirt/cirros-container-disk-demo:devel")
            .unwrap()
            .name,
        DEMO_DISK
    );
    let k = store.resolve("example.com/kernels/a/b:3").unwrap();
    assert_eq!(k.name, "my-kernel");
    assert_eq!(k.disk, None);
    let p = kernel_boot_paths(&k, Some("boot/kernel"), None).unwrap();
    assert_eq!(
        p.kernel.unwrap(),
        tmp.path().join("mine/boot/kernel").canonicalize().unwrap()
    );
    assert_eq!(p.initrd, None);
    assert_eq!(
        store.resolve("example.com/kernels/pinned:2").unwrap().name,
        DEMO_KERNEL
    );
    let mut names = store.image_names().unwrap();
    names.sort();
    assert_eq!(names, ["demo-disk", "demo-kernel", "my-disk", "my-kernel"]);
    // A user image whose file disappeared is reported as such.
    std::fs::remove_file(tmp.path().join("mine/disk.qcow2")).unwrap();
    assert!(matches!(
        store.resolve("example.com/team/vm"),
        Err(ImageError::MissingImageFile { .. })
    ));
}

#[test]
fn broken_alias_files_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = ensure_demo_images(&tmp.path().join("cache")).expect("build demo images");
    let dir = tmp.path().join("store");
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            r#"{"aliases": {"quay.io/x/y": "no-such-image"}}"#,
            "dangling",
        ),
        (r#"{"alias": {}}"#, "unknown field"),
        (r#"{"images": {"demo-disk": {"disk": "x"}}}"#, "reserved"),
        (r#"{"images": {"Bad Name": {"disk": "x"}}}"#, "name"),
        (r#"{"images": {"empty": {}}}"#, "needs"),
        (r#"{"aliases": {"quay.io/*/x": "demo-disk"}}"#, "wildcard"),
        ("not json", "json"),
    ];
    for (text, what) in cases {
        std::fs::write(dir.join("aliases.json"), text).unwrap();
        let err = ImageStore::with_demo_images(&dir, demo.clone())
            .expect_err(&format!("{what}: {text} accepted"));
        match (what, &err) {
            ("dangling", ImageError::DanglingAlias { target, .. }) => {
                assert_eq!(target, "no-such-image")
            }
            ("dangling", other) => panic!("dangling: got {other:?}"),
            (_, ImageError::AliasFile { path, .. }) => assert_eq!(path, &dir.join("aliases.json")),
            (_, other) => panic!("{what}: got {other:?}"),
        }
    }
}

#[test]
fn kernel_boot_paths_cannot_escape_the_image_root() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let img = store.resolve("demo-kernel").unwrap();
    for bad in [
        "../../../../etc/passwd",
        "/boot/../../manifest.json",
        "",
        "/",
    ] {
        let err = kernel_boot_paths(&img, Some(bad), None).unwrap_err();
        assert!(
            matches!(err, ImageError::UnsafePath { .. }),
            "{bad:?}: {err:?}"
        );
    }
    assert!(matches!(
        kernel_boot_paths(&img, None, Some("/boot/initrd-missing")),
        Err(ImageError::FileNotFound { .. })
    ));
    // A symlink inside a user image root pointing outside it is refused.
    let root = tmp.path().join("evil");
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("boot/vmlinuz")).unwrap();
    std::fs::write(
        store.aliases_file(),
        r#"{"images": {"evil": {"root": "evil"}}}"#,
    )
    .unwrap();
    let evil = store.resolve("evil").unwrap();
    let err = kernel_boot_paths(&evil, Some("/boot/vmlinuz"), None).unwrap_err();
    assert!(matches!(err, ImageError::UnsafePath { .. }), "{err:?}");
    // "./" and duplicate slashes are fine.
    let ok = kernel_boot_paths(&img, Some("./boot//vmlinuz-virt"), None).unwrap();
    assert!(ok.kernel.unwrap().ends_with("boot/vmlinuz-virt"));
}

#[test]
fn demo_image_cache_is_reused_and_safe_under_concurrency() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| ensure_demo_images(&cache)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = results[0].as_ref().expect("build demo images").clone();
    for r in &results {
        assert_eq!(r.as_ref().unwrap(), &first);
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries, vec![first.dir.clone()], "left-overs in the cache");
    assert!(first.disk.is_file() && first.kernel.is_file() && first.initramfs.is_file());

    // Cache hit: same directory, files untouched.
    let mtime = std::fs::metadata(&first.disk).unwrap().modified().unwrap();
    let again = ensure_demo_images(&cache).unwrap();
    assert_eq!(again, first);
    assert_eq!(
        std::fs::metadata(&again.disk).unwrap().modified().unwrap(),
        mtime
    );

    // Different inputs (here: the command line) give a different build.
    let other = ensure_demo_images_with(
        &cache,
        &GuestBuildOptions {
            cmdline: Some("console=ttyS0".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_ne!(other.dir, first.dir);
    assert_ne!(other.input_hash, first.input_hash);
    assert_eq!(other.cmdline, "console=ttyS0");
}
