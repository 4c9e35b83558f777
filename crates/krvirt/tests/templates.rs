//! Templates and instancetypes end to end, under TCG: VMs made from two
//! versions of a Template boot with their parameters visible in the guest,
//! on a linked clone (a qcow2 overlay on the image) and a full clone (no
//! backing file); template versions cannot be edited; parameter errors
//! name the parameter. `vm-cirros-csmall.yaml` runs with its
//! instancetype's CPU and memory on QEMU's command line, and keeps them
//! after the instancetype is edited (the VM expands from its own copy).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const IMAGE: &str = "quay.io/kubevirt/cirros-container-disk-demo";

fn apply(inst: &Instance, name: &str, yaml: &str) {
    let path = inst.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    inst.ok(&["apply", "-f", path.to_str().unwrap()]);
}

fn fails(inst: &Instance, args: &[&str]) -> String {
    let out = inst.cli(args);
    assert!(
        !out.status.success(),
        "krvirt {args:?} should fail; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One template version: a VM whose hostname and userData come from
/// parameters.
fn version(name: &str, extra_param: &str) -> String {
    format!(
        r#"  - name: "{name}"
    parameters:
    - name: NAME
    - name: HOST
      required: true
      description: guest hostname
    - name: GREETING
      value: hello
{extra_param}    objects:
    - apiVersion: kubevirt.io/v1
      kind: VirtualMachine
      metadata:
        name: ${{NAME}}
      spec:
        runStrategy: Always
        template:
          spec:
            hostname: ${{HOST}}
            domain:
              devices:
                disks:
                - name: root
                  disk: {{bus: virtio}}
              memory:
                guest: 128Mi
            terminationGracePeriodSeconds: 0
            volumes:
            - name: root
              containerDisk:
                image: {IMAGE}
            - name: cloudinit
              cloudInitNoCloud:
                userData: |
                  #!/bin/sh
                  echo "GREETING-${{GREETING}}-V{name}"
"#
    )
}

fn template(versions: &[String]) -> String {
    format!(
        "apiVersion: krvirt.io/v1\nkind: Template\nmetadata:\n  name: web\nspec:\n  versions:\n{}",
        versions.concat()
    )
}

/// `needle` on the VM's console; TCG guests boot slowly when the machine
/// is loaded (several guests, builds), so the wait is generous.
async fn console_shows(inst: &Instance, vm: &str, needle: &str) {
    inst.until(
        &format!("{needle:?} on {vm}'s console"),
        Duration::from_secs(300),
        || async { inst.console_log(vm).await.contains(needle).then_some(()) },
    )
    .await
}

fn qemu_img_info(path: &std::path::Path) -> String {
    let out = Command::new("qemu-img")
        .args(["info", "-U"])
        .arg(path)
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "qemu-img info {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn volume_ready(inst: &Instance, name: &str) -> Value {
    inst.until(
        &format!("Volume {name} Succeeded"),
        Duration::from_secs(60),
        || async {
            let v = inst
                .get(&format!(
                    "/apis/krvirt.io/v1/namespaces/default/volumes/{name}"
                ))
                .await
                .ok()?;
            (v["status"]["phase"] == "Succeeded").then_some(v)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn vms_from_two_template_versions_boot_with_their_parameters() {
    let inst = Instance::start().await;
    let v1 = version("1", "");
    let v2 = version(
        "2",
        "    - name: TOKEN\n      generate: expression\n      from: \"[a-z0-9]{8}\"\n",
    );
    apply(&inst, "tpl", &template(&[v1.clone(), v2.clone()]));

    // Parameter errors name the parameter, and leave nothing behind.
    let e = fails(&inst, &["create", "vm", "bad", "--from", "web:1"]);
    assert!(e.contains("spec.parameters[HOST]"), "{e}");
    assert!(e.contains("guest hostname"), "{e}");
    let e = fails(
        &inst,
        &[
            "create",
            "vm",
            "bad",
            "--from",
            "web:1",
            "-p",
            "HOST=x",
            "-p",
            "COLOUR=red",
        ],
    );
    assert!(e.contains("unknown parameter COLOUR"), "{e}");
    let e = fails(
        &inst,
        &["create", "vm", "bad", "--from", "web:7", "-p", "HOST=x"],
    );
    assert!(e.contains("no version \"7\""), "{e}");
    assert!(inst.vm("bad").await.is_none());

    // A version cannot be edited; a new one can be added.
    let edited = v1.replace("GREETING-", "CHANGED-");
    let path = inst.dir.path().join("edited.yaml");
    std::fs::write(&path, template(&[edited, v2.clone()])).unwrap();
    let out = inst.cli(&["apply", "-f", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "editing version 1 must be refused");
    assert!(err.contains("spec.versions[0].objects"), "{err}");

    let out = inst.ok(&[
        "create",
        "vm",
        "web1",
        "--from",
        "web:1",
        "-p",
        "HOST=alpha",
        "-p",
        "GREETING=bonjour",
    ]);
    assert!(out.contains("version 1"), "{out}");
    let out = inst.ok(&[
        "create",
        "vm",
        "web2",
        "--from",
        "web",
        "-p",
        "HOST=beta",
        "--clone",
        "full",
    ]);
    assert!(
        out.contains("version 2"),
        "the default version is the last: {out}"
    );
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("parameter TOKEN="))
        .expect("the generated TOKEN is printed")
        .to_string();
    assert_eq!(token.len(), 8, "{token}");

    let vm1 = inst.vm("web1").await.expect("web1 exists");
    assert_eq!(vm1["metadata"]["labels"]["vm.kubevirt.io/template"], "web");
    assert_eq!(
        vm1["metadata"]["labels"]["vm.kubevirt.io/template.version"],
        "1"
    );
    assert_eq!(
        vm1["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "web1-root"
    );

    // Linked clone: a qcow2 overlay on the image; full clone: standalone.
    volume_ready(&inst, "web1-root").await;
    volume_ready(&inst, "web2-root").await;
    let pool = inst.data_dir().join("pools/default");
    let linked = qemu_img_info(&pool.join("default.web1-root.qcow2"));
    assert!(linked.contains("backing file:"), "{linked}");
    let full = qemu_img_info(&pool.join("default.web2-root.qcow2"));
    assert!(!full.contains("backing file:"), "{full}");

    for (vm, host, greeting) in [
        ("web1", "alpha", "GREETING-bonjour-V1"),
        ("web2", "beta", "GREETING-hello-V2"),
    ] {
        inst.running_vmi(vm, None).await;
        console_shows(&inst, vm, "GUEST-BOOTED").await;
        console_shows(&inst, vm, &format!("HOSTNAME: {host}")).await;
        console_shows(&inst, vm, greeting).await;
    }
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("QEMU is running")
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn opt(args: &[String], name: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| panic!("{name} in {args:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_cirros_csmall_runs_with_its_instancetype() {
    let inst = Instance::start().await;
    for f in ["csmall.yaml", "clarge.yaml", "virtio.yaml"] {
        inst.ok(&["apply", "-f", corpus(f).to_str().unwrap()]);
    }
    inst.ok(&[
        "apply",
        "-f",
        corpus("vm-cirros-csmall.yaml").to_str().unwrap(),
    ]);
    inst.ok(&[
        "apply",
        "-f",
        corpus("vm-cirros-clarge-virtio.yaml").to_str().unwrap(),
    ]);

    // The instancetype is recorded in the VM.
    let vm = inst
        .until("csmall recorded", Duration::from_secs(30), || async {
            let vm = inst.vm("vm-cirros-csmall").await?;
            vm["metadata"]["annotations"]["krvirt.io/instancetype-snapshot"]
                .is_string()
                .then_some(vm)
        })
        .await;
    let copy: Value = serde_json::from_str(
        vm["metadata"]["annotations"]["krvirt.io/instancetype-snapshot"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(copy["spec"]["cpu"]["guest"], 1);

    // clarge (2Gi) conflicts with the VM's own 128Mi: no VMI, a Failure
    // condition naming the field.
    let failure = inst
        .until(
            "clarge conflict reported",
            Duration::from_secs(30),
            || async {
                let vm = inst.vm("vm-cirros-clarge-virtio").await?;
                vm["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "Failure" && c["reason"] == "InvalidInstancetype")
                    .cloned()
            },
        )
        .await;
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("spec.template.spec.domain.memory.guest"),
        "{failure}"
    );

    inst.ok(&["start", "vm-cirros-csmall"]);
    let (uid, pid) = inst.running_vmi("vm-cirros-csmall", None).await;
    let args = cmdline(pid);
    assert_eq!(
        opt(&args, "-smp"),
        "cpus=1,sockets=1,cores=1,threads=1",
        "{args:?}"
    );
    assert_eq!(opt(&args, "-m"), "128M", "{args:?}");
    console_shows(&inst, "vm-cirros-csmall", "GUEST-BOOTED").await;

    // Editing the instancetype changes no existing VM: a restart still
    // gets one vCPU.
    let path = inst.dir.path().join("csmall2.yaml");
    std::fs::write(
        &path,
        "apiVersion: instancetype.kubevirt.io/v1beta1\nkind: VirtualMachineInstancetype\nmetadata:\n  name: csmall\nspec:\n  cpu:\n    guest: 2\n  memory:\n    guest: 128Mi\n",
    )
    .unwrap();
    inst.ok(&["apply", "-f", path.to_str().unwrap()]);
    inst.ok(&["restart", "vm-cirros-csmall"]);
    let (_, pid) = inst.running_vmi("vm-cirros-csmall", Some(&uid)).await;
    let args = cmdline(pid);
    assert_eq!(
        opt(&args, "-smp"),
        "cpus=1,sockets=1,cores=1,threads=1",
        "{args:?}"
    );
    let vmi = inst.vmi("vm-cirros-csmall").await.expect("VMI");
    assert_eq!(vmi["spec"]["domain"]["cpu"]["sockets"], 1);
    assert_eq!(vmi["spec"]["domain"]["memory"]["guest"], "128Mi");

    // Cluster-scoped kinds, and a preference filling what the VM leaves
    // unset: the disk without a bus gets sata, the interface e1000, the
    // vCPUs are laid out as cores.
    inst.ok(&[
        "apply",
        "-f",
        corpus("cluster-csmall.yaml").to_str().unwrap(),
    ]);
    apply(
        &inst,
        "pref",
        "apiVersion: instancetype.kubevirt.io/v1beta1\nkind: VirtualMachineClusterPreference\nmetadata:\n  name: legacy\nspec:\n  devices:\n    preferredDiskBus: sata\n    preferredInterfaceModel: e1000\n  cpu:\n    preferredCPUTopology: cores\n",
    );
    apply(
        &inst,
        "vm-pref",
        &format!(
            r##"apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: vm-pref
spec:
  instancetype:
    kind: VirtualMachineClusterInstancetype
    name: cluster-csmall
  preference:
    name: legacy
  runStrategy: Always
  template:
    spec:
      domain:
        devices:
          disks:
          - name: containerdisk
          - name: cloudinitdisk
            disk: {{bus: virtio}}
          interfaces:
          - name: default
            masquerade: {{}}
      networks:
      - name: default
        pod: {{}}
      terminationGracePeriodSeconds: 0
      volumes:
      - name: containerdisk
        containerDisk:
          image: {IMAGE}
      - name: cloudinitdisk
        cloudInitNoCloud:
          userData: "#!/bin/sh\necho hi\n"
"##
        ),
    );
    let (_, pid) = inst.running_vmi("vm-pref", None).await;
    let vmi = inst.vmi("vm-pref").await.expect("VMI");
    let disks = vmi["spec"]["domain"]["devices"]["disks"]
        .as_array()
        .unwrap();
    let bus = |name: &str| {
        disks
            .iter()
            .find(|d| d["name"] == name)
            .map(|d| d["disk"]["bus"].clone())
            .unwrap_or_default()
    };
    assert_eq!(bus("containerdisk"), "sata", "{vmi}");
    assert_eq!(bus("cloudinitdisk"), "virtio", "the VM's own choice stays");
    assert_eq!(
        vmi["spec"]["domain"]["devices"]["interfaces"][0]["model"],
        "e1000"
    );
    let args = cmdline(pid).join(" ");
    assert!(args.contains("e1000"), "{args}");
    assert!(
        args.contains("cpus=1,sockets=1,cores=1,threads=1"),
        "{args}"
    );
}
