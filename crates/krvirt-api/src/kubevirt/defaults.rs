//! Defaulting (see the table in the [`crate::kubevirt`] module docs).

use super::*;
use crate::util::{parse_uuid, uuid_v5};

/// KubeVirt's firmware UUID namespace (`magicUUID` in its VM controller).
const FIRMWARE_UUID_NAMESPACE: &str = "6a1a24a1-4061-4607-8bf4-a3963d0c5895";

/// The firmware UUID krvirt assigns to a VM (or standalone VMI) in
/// `namespace` named `name`: a name-based UUIDv5 of `"{namespace}/{name}"`
/// in KubeVirt's firmware namespace. An empty namespace means `default`.
pub fn default_firmware_uuid(namespace: &str, name: &str) -> String {
    let ns = if namespace.is_empty() {
        "default"
    } else {
        namespace
    };
    // The constant is a valid UUID; fall back to the nil namespace rather
    // than panic if it were ever edited into an invalid one.
    let namespace_uuid = parse_uuid(FIRMWARE_UUID_NAMESPACE).unwrap_or([0; 16]);
    uuid_v5(&namespace_uuid, format!("{ns}/{name}").as_bytes())
}

/// KubeVirt's pull-policy default: `Always` for `:latest` or untagged
/// references, `IfNotPresent` otherwise (including digests).
pub fn default_pull_policy(image: &str) -> PullPolicy {
    if image.contains('@') {
        return PullPolicy::IfNotPresent;
    }
    let last_component = image.rsplit('/').next().unwrap_or(image);
    match last_component.rsplit_once(':') {
        Some((_, tag)) if tag != "latest" => PullPolicy::IfNotPresent,
        _ => PullPolicy::Always,
    }
}

pub(crate) fn vm(vm: &mut VirtualMachine) {
    if vm.spec.running.is_none() && vm.spec.run_strategy.is_none() {
        vm.spec.run_strategy = Some(RunStrategy::Halted);
    }
    if vm.spec.instancetype.is_some() || vm.spec.preference.is_some() {
        // The VM controller expands the instancetype and preference into
        // the VMI, whose admission then applies the defaults.
        return;
    }
    let ns = vm.metadata.namespace().to_string();
    let name = vm.metadata.name().to_string();
    vmi_spec(&mut vm.spec.template.spec, &ns, &name);
}

pub(crate) fn vmi(vmi: &mut VirtualMachineInstance) {
    let ns = vmi.metadata.namespace().to_string();
    let name = vmi.metadata.name().to_string();
    vmi_spec(&mut vmi.spec, &ns, &name);
}

/// Default a VMI spec. `namespace`/`name` identify the owning VM (or the
/// standalone VMI) for the firmware UUID; with an empty name (only
/// `generateName` known) the UUID is left unset.
pub(crate) fn vmi_spec(spec: &mut VirtualMachineInstanceSpec, namespace: &str, name: &str) {
    let domain = &mut spec.domain;

    match &mut domain.machine {
        None => {
            domain.machine = Some(Machine {
                type_: DEFAULT_MACHINE_TYPE.to_string(),
            })
        }
        Some(m) if m.type_.is_empty() => m.type_ = DEFAULT_MACHINE_TYPE.to_string(),
        Some(_) => {}
    }

    cpu_topology(domain);

    let guest_unset = domain.memory.as_ref().is_none_or(|m| m.guest.is_none());
    if guest_unset
        && let Some(req) = domain.resources.requests.get("memory")
        && req.value().is_ok()
    {
        let req = req.clone();
        domain.memory.get_or_insert_with(Memory::default).guest = Some(req);
    }

    if let Some(f) = domain.features.as_mut() {
        if let Some(acpi) = f.acpi.as_mut() {
            acpi.enabled.get_or_insert(true);
        }
        if let Some(smm) = f.smm.as_mut() {
            smm.enabled.get_or_insert(true);
        }
        if let Some(apic) = f.apic.as_mut() {
            apic.enabled.get_or_insert(true);
        }
    }

    // Every volume gets a disk (KubeVirt's SetDefaultVolumeDisk).
    for v in &spec.volumes {
        if !v.name.is_empty() && !domain.devices.disks.iter().any(|d| d.name == v.name) {
            domain.devices.disks.push(Disk {
                name: v.name.clone(),
                ..Default::default()
            });
        }
    }
    for d in &mut domain.devices.disks {
        if d.disk.is_none() && d.cdrom.is_none() {
            d.disk = Some(DiskTarget::default());
        }
        if let Some(t) = &mut d.disk {
            t.bus.get_or_insert(DiskBus::Virtio);
        }
        if let Some(cd) = &mut d.cdrom {
            cd.bus.get_or_insert(DiskBus::Sata);
            cd.readonly.get_or_insert(true);
            cd.tray.get_or_insert(TrayState::Closed);
        }
    }

    if domain.devices.interfaces.is_empty()
        && spec.networks.is_empty()
        && domain.devices.autoattach_pod_interface != Some(false)
    {
        domain.devices.interfaces.push(Interface {
            name: DEFAULT_NETWORK_NAME.to_string(),
            masquerade: Some(InterfaceMasquerade {}),
            ..Default::default()
        });
        spec.networks.push(Network {
            name: DEFAULT_NETWORK_NAME.to_string(),
            pod: Some(PodNetwork::default()),
            multus: None,
        });
    }
    for iface in &mut domain.devices.interfaces {
        if iface.masquerade.is_none() && iface.bridge.is_none() {
            iface.masquerade = Some(InterfaceMasquerade {});
        }
        iface.model.get_or_insert(InterfaceModel::Virtio);
        for p in &mut iface.ports {
            p.protocol.get_or_insert(Protocol::Tcp);
        }
    }

    let firmware = domain.firmware.get_or_insert_with(Firmware::default);
    if firmware.uuid.as_deref().is_none_or(str::is_empty) {
        firmware.uuid = (!name.is_empty()).then(|| default_firmware_uuid(namespace, name));
    }
    if let Some(c) = firmware
        .kernel_boot
        .as_mut()
        .and_then(|k| k.container.as_mut())
        && c.image_pull_policy.is_none()
        && !c.image.is_empty()
    {
        c.image_pull_policy = Some(default_pull_policy(&c.image));
    }

    for v in &mut spec.volumes {
        if let Some(cd) = &mut v.container_disk
            && cd.image_pull_policy.is_none()
            && !cd.image.is_empty()
        {
            cd.image_pull_policy = Some(default_pull_policy(&cd.image));
        }
    }

    spec.termination_grace_period_seconds
        .get_or_insert(DEFAULT_TERMINATION_GRACE_PERIOD_SECONDS);
}

/// vCPU topology: with nothing set, KubeVirt puts the CPU limit (else
/// request), rounded up, into sockets; every unset count is then 1.
fn cpu_topology(domain: &mut DomainSpec) {
    let from_resources = domain
        .resources
        .limits
        .get("cpu")
        .or_else(|| domain.resources.requests.get("cpu"))
        .and_then(|q| q.millis().ok())
        .map(|m| m.div_ceil(1000))
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1);
    let cpu = domain.cpu.get_or_insert_with(Cpu::default);
    if cpu.cores.is_none() && cpu.sockets.is_none() && cpu.threads.is_none() {
        cpu.sockets = from_resources;
    }
    cpu.cores.get_or_insert(1);
    cpu.sockets.get_or_insert(1);
    cpu.threads.get_or_insert(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_policy() {
        assert_eq!(
            default_pull_policy("registry:5000/kubevirt/cirros-container-disk-demo:devel"),
            PullPolicy::IfNotPresent
        );
        assert_eq!(
            default_pull_policy("registry:5000/kubevirt/cirros"),
            PullPolicy::Always
        );
        assert_eq!(default_pull_policy("cirros:latest"), PullPolicy::Always);
        assert_eq!(
            default_pull_policy("quay.io/x/y@sha256:0123"),
            PullPolicy::IfNotPresent
        );
    }

    #[test]
    fn firmware_uuid_is_deterministic_and_namespaced() {
        let a = default_firmware_uuid("default", "vm-cirros");
        assert_eq!(a, default_firmware_uuid("", "vm-cirros"));
        assert_ne!(a, default_firmware_uuid("other", "vm-cirros"));
        assert_ne!(a, default_firmware_uuid("default", "vm-cirros2"));
        let parsed = parse_uuid(&a).expect("a UUID");
        assert_eq!(parsed[6] >> 4, 5, "version 5");
        assert_eq!(parsed[8] >> 6, 0b10, "RFC 4122 variant");
    }

    #[test]
    fn cpu_from_limits() {
        let mut d = DomainSpec::default();
        d.resources.limits.insert("cpu".into(), "2500m".into());
        cpu_topology(&mut d);
        let cpu = d.cpu.expect("set");
        assert_eq!(
            (cpu.sockets, cpu.cores, cpu.threads),
            (Some(3), Some(1), Some(1))
        );

        let mut d = DomainSpec::default();
        d.resources.requests.insert("cpu".into(), "2".into());
        d.cpu = Some(Cpu {
            cores: Some(2),
            ..Default::default()
        });
        cpu_topology(&mut d);
        let cpu = d.cpu.expect("set");
        assert_eq!(
            (cpu.sockets, cpu.cores, cpu.threads),
            (Some(1), Some(2), Some(1))
        );
    }
}
