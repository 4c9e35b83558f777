//! Golden-file tests of the QEMU command line (Proxmox style).
//!
//! Every `tests/golden/NAME.json` (a `VmConfig`) has a
//! `tests/golden/NAME.args` next to it: the expected `qemu_argv` output, one
//! argument per line. To regenerate the `.args` files after an intended
//! change, run
//!
//! ```text
//! KRVIRT_BLESS=1 cargo test -p krvirt-hypervisor --test golden
//! ```
//!
//! and review the diff. `tests/qemu_accepts.rs` runs every golden config
//! through the real QEMU.

use std::fs;
use std::path::{Path, PathBuf};

use krvirt_hypervisor::{VmConfig, qemu_argv};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn cases() -> Vec<(String, PathBuf)> {
    let mut v: Vec<_> = fs::read_dir(golden_dir())
        .expect("read tests/golden")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, p)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn golden_argv() {
    let bless = std::env::var("KRVIRT_BLESS").is_ok_and(|v| v == "1");
    let cases = cases();
    assert!(cases.len() >= 15, "only {} golden cases", cases.len());
    let mut failures = Vec::new();
    for (name, json) in &cases {
        let text = fs::read_to_string(json).unwrap();
        let cfg: VmConfig = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{name}.json is not a VmConfig: {e}"));
        if let Err(e) = cfg.validate() {
            panic!("{name}.json does not validate: {e}");
        }
        let args = qemu_argv(&cfg);
        assert_eq!(
            args,
            qemu_argv(&cfg),
            "{name}: qemu_argv is not deterministic"
        );
        for a in &args {
            assert!(
                !a.contains('\n'),
                "{name}: argument {a:?} contains a newline"
            );
        }
        let rendered = format!("{}\n", args.join("\n"));
        let args_path = json.with_extension("args");
        if bless {
            fs::write(&args_path, &rendered).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&args_path).unwrap_or_else(|_| {
            panic!(
                "{} is missing; run KRVIRT_BLESS=1 cargo test -p krvirt-hypervisor --test golden",
                args_path.display()
            )
        });
        if expected != rendered {
            failures.push(format!(
                "--- {name}.args (expected)\n{expected}+++ {name} (actual)\n{rendered}"
            ));
        }
    }
    // No stale expectations without a config.
    for e in fs::read_dir(golden_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "args") {
            assert!(
                p.with_extension("json").exists(),
                "{} has no matching .json",
                p.display()
            );
        }
    }
    assert!(
        failures.is_empty(),
        "argv differs from the golden files (KRVIRT_BLESS=1 to regenerate):\n{}",
        failures.join("\n")
    );
}

/// Spot checks of properties every golden file must have, so a blessed
/// regression in the common part cannot slip through unnoticed.
#[test]
fn golden_common_invariants() {
    for (name, json) in cases() {
        let cfg: VmConfig = serde_json::from_str(&fs::read_to_string(&json).unwrap()).unwrap();
        let args = qemu_argv(&cfg);
        let joined = args.join(" ");
        for must in [
            "-nodefaults",
            "-no-user-config",
            "-no-shutdown",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-mon chardev=qmp,mode=control",
            "-serial chardev:serial0",
            "-display none",
            "-vga none",
        ] {
            assert!(joined.contains(must), "{name}: missing {must}");
        }
        assert!(
            !args.iter().any(|a| a == "-daemonize"),
            "{name}: -daemonize fails under the sandbox"
        );
        let pos = args.iter().position(|a| a == "-pidfile").unwrap();
        assert_eq!(args[pos + 1], cfg.run.pidfile.to_string_lossy(), "{name}");
        let accel = args.iter().position(|a| a == "-accel").unwrap();
        assert_eq!(args[accel + 1], cfg.accel.qemu_name(), "{name}");
        // `host` CPU only ever with KVM.
        let cpu = args.iter().position(|a| a == "-cpu").unwrap();
        if args[cpu + 1] == "host" {
            assert_eq!(cfg.accel, krvirt_hypervisor::Accel::Kvm, "{name}");
        }
    }
}
