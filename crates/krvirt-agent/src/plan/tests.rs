//! Golden tests: a KubeVirt manifest from the corpus, admitted as the API
//! server admits it, planned for this host, rendered to QEMU's command line
//! and its disk preparation, compared with `tests/golden/plan/NAME.txt`.
//! Regenerate with `KRVIRT_BLESS=1 cargo test -p krvirt-agent plan`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;
use krvirt_api::find_kind;
use serde_json::Value;

/// A fixed table of local images, as an image store would hold them.
struct Table(BTreeMap<&'static str, (&'static str, DiskFormat)>);

impl Table {
    fn demo() -> Self {
        let mut t = BTreeMap::new();
        for r in [
            "registry:5000/kubevirt/cirros-container-disk-demo:devel",
            "registry:5000/kubevirt/fedora-with-test-tooling-container-disk:devel",
            "registry:5000/kubevirt/alpine-container-disk-demo:devel",
        ] {
            t.insert(r, ("/var/lib/krvirt/images/demo/disk.img", DiskFormat::Raw));
        }
        Table(t)
    }
}

impl ImageResolver for Table {
    fn disk(&self, reference: &str) -> Result<(PathBuf, DiskFormat), ImageError> {
        self.0
            .get(reference)
            .map(|(p, f)| (PathBuf::from(p), *f))
            .ok_or_else(|| ImageError::NotFound {
                reference: reference.to_string(),
                aliases_file: PathBuf::from("/var/lib/krvirt/images/aliases.json"),
            })
    }

    fn kernel_boot(
        &self,
        reference: &str,
        kernel_path: Option<&str>,
        initrd_path: Option<&str>,
    ) -> Result<(Option<PathBuf>, Option<PathBuf>), ImageError> {
        if reference != "registry:5000/kubevirt/alpine-ext-kernel-boot-demo:devel" {
            return Err(ImageError::NotFound {
                reference: reference.to_string(),
                aliases_file: PathBuf::from("/var/lib/krvirt/images/aliases.json"),
            });
        }
        let root = Path::new("/var/lib/krvirt/images/demo/kernel-boot");
        let join = |p: &str| root.join(p.trim_start_matches('/'));
        Ok((kernel_path.map(join), initrd_path.map(join)))
    }
}

fn corpus(file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/kubevirt-examples")
        .join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("the KubeVirt corpus is needed at {}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The VMI a manifest leads to: a VMI as is, a VM's template as the
/// controller would create it. Admitted as the server does.
fn vmi_of(doc: Value) -> VirtualMachineInstance {
    let kind = doc["kind"].as_str().unwrap().to_string();
    let admitted = krvirt_api::admit(find_kind(&kind).unwrap(), doc, None).unwrap();
    let mut vmi_json = if kind == "VirtualMachine" {
        let vm: krvirt_api::kubevirt::VirtualMachine = serde_json::from_value(admitted).unwrap();
        let mut v = VirtualMachineInstance {
            metadata: vm.spec.template.metadata.clone(),
            spec: vm.spec.template.spec.clone(),
            ..Default::default()
        };
        v.metadata.name = vm.metadata.name.clone();
        let v = serde_json::to_value(v).unwrap();
        krvirt_api::admit(find_kind("vmi").unwrap(), v, None).unwrap()
    } else {
        admitted
    };
    vmi_json["metadata"]["namespace"] = "default".into();
    vmi_json["metadata"]["uid"] = "0a1b2c3d-0000-4000-8000-00000000cafe".into();
    serde_json::from_value(vmi_json).unwrap()
}

fn render(plan: &Plan) -> String {
    let mut out = String::from("# prep\n");
    for step in &plan.prep {
        match step {
            PrepStep::Overlay {
                path,
                backing,
                backing_format,
            } => out.push_str(&format!(
                "overlay {} on {} ({})\n",
                path.display(),
                backing.display(),
                backing_format.qemu_driver()
            )),
            PrepStep::Blank { path, size_bytes } => {
                out.push_str(&format!("blank {} {size_bytes} bytes\n", path.display()))
            }
            PrepStep::Seed { path, seed } => out.push_str(&format!(
                "seed {} hostname={} instance-id={} user-data={}B network-config={}\n",
                path.display(),
                seed.local_hostname,
                seed.instance_id,
                seed.user_data.as_ref().map_or(0, Vec::len),
                seed.network_config.is_some()
            )),
        }
    }
    out.push_str("# argv\n");
    for a in krvirt_hypervisor::qemu_argv(&plan.config) {
        out.push_str(&a);
        out.push('\n');
    }
    out
}

fn golden(name: &str, file: &str, accel: Accel) {
    let vmi = vmi_of(corpus(file));
    let run_dir = Path::new("/var/lib/krvirt/run/vmi/0a1b2c3d-0000-4000-8000-00000000cafe");
    let plan = plan(&vmi, accel, run_dir, &Table::demo()).unwrap();
    check_golden(name, &render(&plan));
}

fn check_golden(name: &str, got: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/plan")
        .join(format!("{name}.txt"));
    if std::env::var_os("KRVIRT_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (create it with KRVIRT_BLESS=1 cargo test -p krvirt-agent)",
            path.display()
        )
    });
    assert_eq!(got, want, "golden file {} differs", path.display());
}

/// krvirt Volumes as the agent resolves them: a qcow2 in a dir pool and a
/// raw file in a btrfs subvolume.
#[test]
fn golden_vm_multipvc() {
    let vmi = vmi_of(corpus("vm-alpine-multipvc.yaml"));
    let run_dir = Path::new("/var/lib/krvirt/run/vmi/0a1b2c3d-0000-4000-8000-00000000cafe");
    let mut volumes = ResolvedVolumes::new();
    volumes.insert(
        "disk-alpine".into(),
        ResolvedVolume {
            path: "/var/lib/krvirt/pools/default/default.disk-alpine.qcow2".into(),
            format: DiskFormat::Qcow2,
            rbd: None,
        },
    );
    volumes.insert(
        "disk-custom".into(),
        ResolvedVolume {
            path: "/mnt/btrfs/pool/default.disk-custom/disk.raw".into(),
            format: DiskFormat::Raw,
            rbd: None,
        },
    );
    let p = plan_with_volumes(&vmi, Accel::Tcg, run_dir, &Table::demo(), &volumes).unwrap();
    check_golden("vm-alpine-multipvc", &render(&p));
    // Without the Volumes resolved, planning names the missing one.
    let err = plan(&vmi, Accel::Tcg, run_dir, &Table::demo()).unwrap_err();
    assert!(err.to_string().contains("disk-alpine"), "{err}");
}

/// A Volume in an rbd pool: the disk is the Ceph image, opened by QEMU
/// through librbd.
#[test]
fn golden_vm_multipvc_rbd() {
    let vmi = vmi_of(corpus("vm-alpine-multipvc.yaml"));
    let run_dir = Path::new("/var/lib/krvirt/run/vmi/0a1b2c3d-0000-4000-8000-00000000cafe");
    let mut volumes = ResolvedVolumes::new();
    volumes.insert(
        "disk-alpine".into(),
        ResolvedVolume {
            path: "/var/lib/krvirt/pools/default/default.disk-alpine.qcow2".into(),
            format: DiskFormat::Qcow2,
            rbd: None,
        },
    );
    volumes.insert(
        "disk-custom".into(),
        ResolvedVolume {
            path: Default::default(),
            format: DiskFormat::Raw,
            rbd: Some(krvirt_hypervisor::RbdDisk {
                pool: "rbd".into(),
                image: "default.disk-custom".into(),
                conf: Some("/etc/ceph/ceph.conf".into()),
                user: Some("krvirt".into()),
                monitors: vec![],
            }),
        },
    );
    let p = plan_with_volumes(&vmi, Accel::Tcg, run_dir, &Table::demo(), &volumes).unwrap();
    p.config.validate().unwrap();
    let args = krvirt_hypervisor::qemu_argv(&p.config).join(" ");
    assert!(
        args.contains("driver=rbd,node-name=drive1-file,pool=rbd,image=default.disk-custom,conf=/etc/ceph/ceph.conf,user=krvirt"),
        "{args}"
    );
    check_golden("vm-alpine-multipvc-rbd", &render(&p));
}

#[test]
fn golden_vm_cirros() {
    golden("vm-cirros", "vm-cirros.yaml", Accel::Tcg);
}

#[test]
fn golden_vm_cirros_kvm() {
    golden("vm-cirros-kvm", "vm-cirros.yaml", Accel::Kvm);
}

#[test]
fn golden_vmi_kernel_boot() {
    golden("vmi-kernel-boot", "vmi-kernel-boot.yaml", Accel::Tcg);
}

#[test]
fn golden_vmi_nocloud_with_empty_disk() {
    golden("vmi-nocloud", "vmi-nocloud.yaml", Accel::Tcg);
}

#[test]
fn golden_vmi_ephemeral() {
    golden("vmi-ephemeral", "vmi-ephemeral.yaml", Accel::Tcg);
}

#[test]
fn golden_vmi_masquerade_with_rng() {
    golden("vmi-masquerade", "vmi-masquerade.yaml", Accel::Tcg);
}

#[test]
fn golden_vmi_sata() {
    golden("vmi-sata", "vmi-sata.yaml", Accel::Tcg);
}

#[test]
fn unknown_image_is_an_image_error_naming_the_field() {
    let mut doc = corpus("vmi-ephemeral.yaml");
    doc["spec"]["volumes"][0]["containerDisk"]["image"] = "example.org/nope:1".into();
    let vmi = vmi_of(doc);
    let err = plan(&vmi, Accel::Tcg, Path::new("/run/x"), &Table::demo()).unwrap_err();
    assert!(err.is_image());
    let msg = err.to_string();
    assert!(
        msg.starts_with("spec.volumes[name=containerdisk].containerDisk.image:"),
        "{msg}"
    );
    assert!(msg.contains("example.org/nope:1"), "{msg}");
}

#[test]
fn default_macs_are_stable_and_local() {
    let a = default_mac("uid-1", "default");
    assert_eq!(a, default_mac("uid-1", "default"));
    assert_ne!(a, default_mac("uid-2", "default"));
    assert!(a.starts_with("02:"), "{a}");
    assert_eq!(a.len(), 17);
}

#[test]
fn memory_is_rounded_up_to_whole_mib() {
    let mut doc = corpus("vmi-ephemeral.yaml");
    doc["spec"]["domain"]["memory"]["guest"] = "1500000".into();
    let vmi = vmi_of(doc);
    let p = plan(&vmi, Accel::Tcg, Path::new("/run/x"), &Table::demo()).unwrap();
    assert_eq!(p.config.memory_bytes, 2 << 20);
}

/// Two NICs on krvirt Networks (the pod network's `default` Network with
/// masquerade, a multus Network with the bridge binding): each a tap the
/// agent creates, named from the VMI uid and NIC index, with the MAC the
/// network controller assigned.
#[test]
fn golden_vmi_two_nics_on_taps() {
    let doc = corpus("vmi-multus-multiple-net.yaml");
    let assigned = serde_json::json!([
        {"name": "default", "mac": "02:11:22:33:44:01", "network": "default", "networkType": "nat",
         "bridge": "kvbr-default", "subnet": "10.213.7.0/24", "gateway": "10.213.7.1", "ip": "10.213.7.20"},
        {"name": "ptp", "mac": "02:11:22:33:44:02", "network": "ptp-conf", "networkType": "bridge",
         "bridge": "kvbr-ptp", "subnet": "10.9.0.0/24", "gateway": "10.9.0.1", "ip": "10.9.0.5"}
    ]);
    // Admitted first; the network controller adds the assignment after.
    let mut vmi = vmi_of(doc);
    vmi.metadata.annotations.insert(
        krvirt_api::network::INTERFACES_ANNOTATION.to_string(),
        assigned.to_string(),
    );
    let run_dir = Path::new("/var/lib/krvirt/run/vmi/0a1b2c3d-0000-4000-8000-00000000cafe");
    let p = plan(&vmi, Accel::Tcg, run_dir, &Table::demo()).unwrap();
    check_golden("vmi-multus-multiple-net", &render(&p));
    let taps: Vec<_> = p
        .config
        .nics
        .iter()
        .map(|n| (n.mac.as_str(), n.backend.clone()))
        .collect();
    assert_eq!(
        taps,
        vec![
            (
                "02:11:22:33:44:01",
                NicBackend::Tap {
                    ifname: "kvt0a1b2c3d000".into()
                }
            ),
            (
                "02:11:22:33:44:02",
                NicBackend::Tap {
                    ifname: "kvt0a1b2c3d001".into()
                }
            ),
        ]
    );
    // Without an assignment a bridge interface cannot be planned.
    let vmi = vmi_of(corpus("vmi-multus-ptp.yaml"));
    let err = plan(&vmi, Accel::Tcg, run_dir, &Table::demo()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("spec.domain.devices.interfaces[0]: the interface has no krvirt Network"),
        "{err}"
    );
}
