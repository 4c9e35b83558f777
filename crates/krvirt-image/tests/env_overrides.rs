//! Environment overrides of the guest builder inputs. One test in its own
//! binary (= process), because it changes the process environment.

use std::path::PathBuf;

use krvirt_image::guest::{ENV_BUSYBOX, ENV_KERNEL, resolve_inputs};
use krvirt_image::{Error, GuestBuildOptions};

#[test]
fn env_vars_override_defaults_and_options_override_env() {
    let defaults = resolve_inputs(&GuestBuildOptions::default()).expect(
        "default inputs (linux-image-cloud-amd64, busybox-static, syslinux) must be installed",
    );
    let kernel_copy = tempfile::tempdir().unwrap();
    let k = kernel_copy.path().join("vmlinuz-copy");
    std::fs::copy(&defaults.kernel, &k).unwrap();

    // SAFETY: this test binary runs a single test, so no other thread reads
    // the environment concurrently.
    unsafe {
        std::env::set_var(ENV_KERNEL, &k);
        std::env::set_var(ENV_BUSYBOX, "/bin/ls");
    }
    let err = resolve_inputs(&GuestBuildOptions::default()).unwrap_err();
    assert!(matches!(err, Error::BadBusybox { .. }), "{err}");

    // An explicit option wins over the environment.
    let inputs = resolve_inputs(&GuestBuildOptions {
        busybox: Some(defaults.busybox.clone()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(inputs.kernel, k);
    assert_eq!(inputs.kernel_version, defaults.kernel_version);
    assert_eq!(inputs.busybox, defaults.busybox);

    unsafe {
        std::env::set_var(ENV_KERNEL, "/nonexistent/vmlinuz");
        std::env::remove_var(ENV_BUSYBOX);
    }
    let err = resolve_inputs(&GuestBuildOptions::default()).unwrap_err();
    match err {
        Error::MissingInput { path, .. } => assert_eq!(path, PathBuf::from("/nonexistent/vmlinuz")),
        other => panic!("expected MissingInput, got {other}"),
    }
    unsafe {
        std::env::remove_var(ENV_KERNEL);
    }
}
