//! Semantic validation of VirtualMachine / VirtualMachineInstance, run on
//! the defaulted object. Every cause names its full field path; messages
//! follow KubeVirt's webhook wording where KubeVirt has the same rule.

use std::collections::HashMap;

use super::*;
use crate::admission::{Admit, Causes, idx, join};
use crate::quantity::Quantity;
use crate::util;

const MI: u64 = 1024 * 1024;
/// Kubernetes limits VM names to 63 characters (they become label values).
pub(crate) const MAX_NAME: usize = 63;
/// QEMU's q35 machine supports at most 288 vCPUs.
const MAX_VCPUS: u64 = 288;
const MAX_SERIAL_LEN: usize = 256;

impl Admit for VirtualMachine {
    fn not_implemented(path: &str) -> bool {
        crate::admission::vm_not_implemented(path)
    }

    fn apply_defaults(&mut self) {
        defaults::vm(self);
    }

    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", MAX_NAME, true, c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
        }
        if self.spec.running.is_some() && self.spec.run_strategy.is_some() {
            c.invalid(
                "spec.running",
                "Running and RunStrategy are mutually exclusive",
            );
        }
        labels_and_annotations(&self.spec.template.metadata, "spec.template.metadata", c);
        crate::storage::validate_templates(&self.spec.data_volume_templates, c);
        behaviour_annotations(&self.spec.template.metadata, "spec.template.metadata", c);
        controller_annotations(&self.spec.template.metadata, "spec.template.metadata", c);
        if self.spec.instancetype.is_some() || self.spec.preference.is_some() {
            crate::instancetype::validate_vm(self, c);
        } else {
            vmi_spec(&self.spec.template.spec, "spec.template.spec", c);
        }
    }
}

impl Admit for VirtualMachineInstance {
    fn not_implemented(path: &str) -> bool {
        crate::admission::vmi_not_implemented(path)
    }

    fn apply_defaults(&mut self) {
        defaults::vmi(self);
    }

    fn validate(&self, old: Option<&Self>, c: &mut Causes) {
        metadata(&self.metadata, "metadata", MAX_NAME, true, c);
        behaviour_annotations(&self.metadata, "metadata", c);
        if old.is_none() {
            controller_annotations(&self.metadata, "metadata", c);
        }
        vmi_spec(&self.spec, "spec", c);
        if let Some(old) = old {
            immutable_identity(&old.metadata, &self.metadata, c);
            if old.spec != self.spec {
                c.forbidden(
                    "spec",
                    "the spec of a VirtualMachineInstance is immutable after creation \
                     (change the VirtualMachine and restart it instead)",
                );
            }
        }
    }
}

/// `metadata` of a top-level object.
pub(crate) fn metadata(
    meta: &ObjectMeta,
    p: &str,
    max_name: usize,
    namespaced: bool,
    c: &mut Causes,
) {
    match (meta.name.as_deref(), meta.generate_name.as_deref()) {
        (Some(name), _) if !name.is_empty() => {
            if let Some(problem) = util::dns1123_subdomain(name, max_name) {
                c.invalid(join(p, "name"), format!("{name:?}: {problem}"));
            }
        }
        (_, Some(prefix)) if !prefix.is_empty() => {
            if let Some(problem) = util::generate_name_prefix(prefix, max_name) {
                c.invalid(join(p, "generateName"), format!("{prefix:?}: {problem}"));
            }
        }
        _ => c.required(join(p, "name"), "name or generateName is required"),
    }
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => {
            if !namespaced {
                c.invalid(
                    join(p, "namespace"),
                    "not allowed: this kind is cluster-scoped",
                );
            } else if let Some(problem) = util::dns1123_label(ns) {
                c.invalid(join(p, "namespace"), format!("{ns:?}: {problem}"));
            }
        }
        _ => {}
    }
    labels_and_annotations(meta, p, c);
    for (i, r) in meta.owner_references.iter().enumerate() {
        let f = idx(&join(p, "ownerReferences"), i);
        for (name, value) in [
            ("apiVersion", &r.api_version),
            ("kind", &r.kind),
            ("name", &r.name),
            ("uid", &r.uid),
        ] {
            if value.is_empty() {
                c.required(join(&f, name), "Required value");
            }
        }
    }
}

/// `metadata.name` and `metadata.namespace` cannot change on update.
pub(crate) fn immutable_identity(old: &ObjectMeta, new: &ObjectMeta, c: &mut Causes) {
    if old.name.is_some() && old.name != new.name {
        c.forbidden("metadata.name", "field is immutable");
    }
    if old.namespace.is_some() && old.namespace != new.namespace {
        c.forbidden("metadata.namespace", "field is immutable");
    }
}

/// VMI annotations that switch on KubeVirt features (behind feature
/// gates there) which krvirt does not implement.
pub(crate) const ANNOTATIONS_NOT_IMPLEMENTED: &[&str] =
    &["hooks.kubevirt.io/hookSidecars", "kubevirt.io/ignitiondata"];

/// Annotations only krvirt's controllers write (the network controller's
/// address assignment): refused in a new VMI or a VM template, so nobody
/// hands a guest an address IPAM did not give it.
pub(crate) const CONTROLLER_ANNOTATIONS: &[&str] = &[crate::network::INTERFACES_ANNOTATION];

fn controller_annotations(meta: &ObjectMeta, p: &str, c: &mut Causes) {
    for key in CONTROLLER_ANNOTATIONS {
        if meta.annotations.contains_key(*key) {
            c.forbidden(
                format!("{}[{key}]", join(p, "annotations")),
                "written by krvirt's network controller only",
            );
        }
    }
}

fn behaviour_annotations(meta: &ObjectMeta, p: &str, c: &mut Causes) {
    for key in ANNOTATIONS_NOT_IMPLEMENTED {
        if meta.annotations.contains_key(*key) {
            c.not_implemented(
                format!("{}[{key}]", join(p, "annotations")),
                &format!("annotation {key}"),
            );
        }
    }
}

pub(crate) fn labels_and_annotations(meta: &ObjectMeta, p: &str, c: &mut Causes) {
    label_map(&meta.labels, &join(p, "labels"), true, c);
    label_map(&meta.annotations, &join(p, "annotations"), false, c);
}

fn label_map(map: &BTreeMap<String, String>, p: &str, check_values: bool, c: &mut Causes) {
    for (k, v) in map {
        let f = format!("{p}[{k}]");
        if let Some(problem) = util::qualified_name(k) {
            c.invalid(&f, format!("key {k:?}: {problem}"));
        }
        if check_values && let Some(problem) = util::label_value(v) {
            c.invalid(&f, format!("value {v:?}: {problem}"));
        }
    }
}

/// Validate a (defaulted) VMI spec at path `p`.
pub(crate) fn vmi_spec(spec: &VirtualMachineInstanceSpec, p: &str, c: &mut Causes) {
    if let Some(h) = spec.hostname.as_deref().filter(|h| !h.is_empty())
        && let Some(problem) = util::dns1123_label(h)
    {
        let f = join(p, "hostname");
        c.invalid(
            &f,
            format!("{f} does not conform to the kubernetes DNS_LABEL rules : {problem}"),
        );
    }
    if let Some(s) = spec.subdomain.as_deref().filter(|s| !s.is_empty())
        && let Some(problem) = util::dns1123_subdomain(s, 253)
    {
        let f = join(p, "subdomain");
        c.invalid(
            &f,
            format!("{f} does not conform to the kubernetes DNS_SUBDOMAIN rules : {problem}"),
        );
    }
    label_map(&spec.node_selector, &join(p, "nodeSelector"), true, c);
    if let Some(t) = spec.termination_grace_period_seconds
        && t < 0
    {
        c.invalid(
            join(p, "terminationGracePeriodSeconds"),
            format!("{t}: must be greater than or equal to 0"),
        );
    }
    if let Some(arch) = spec.architecture.as_deref().filter(|a| !a.is_empty())
        && arch != "amd64"
    {
        c.not_implemented(
            join(p, "architecture"),
            &format!("architecture {arch:?}; only amd64 is implemented"),
        );
    }

    if let Some(a) = &spec.affinity {
        scheduling::affinity(a, &join(p, "affinity"), c);
    }
    scheduling::tolerations(&spec.tolerations, &join(p, "tolerations"), c);

    let dp = join(p, "domain");
    resources(&spec.domain.resources, &join(&dp, "resources"), c);
    memory(&spec.domain, &dp, c);
    hugepages(&spec.domain, &dp, c);
    cpu(&spec.domain, &dp, c);
    numa(&spec.domain, &dp, c);
    machine(&spec.domain, &dp, c);
    firmware(&spec.domain, &dp, c);
    if let Some(apic) = spec.domain.features.as_ref().and_then(|f| f.apic.as_ref())
        && apic.end_of_interrupt
    {
        c.not_implemented(join(&dp, "features.apic.endOfInterrupt"), "value true");
    }

    let mut boot_orders: HashMap<u32, String> = HashMap::new();
    disks(spec, &join(&dp, "devices.disks"), &mut boot_orders, c);
    networks_and_interfaces(spec, p, &mut boot_orders, c);
    volumes(spec, &join(p, "volumes"), c);
}

fn quantity_key(p: &str, k: &str) -> String {
    if k.bytes().all(|b| b.is_ascii_alphanumeric()) {
        join(p, k)
    } else {
        format!("{p}[{k}]")
    }
}

fn resources(r: &ResourceRequirements, p: &str, c: &mut Causes) {
    for (map_name, map) in [("requests", &r.requests), ("limits", &r.limits)] {
        let mp = join(p, map_name);
        for (k, q) in map {
            let f = quantity_key(&mp, k);
            match k.as_str() {
                "memory" => match q.value() {
                    Err(e) => c.invalid(&f, e.to_string()),
                    Ok(v) if v < MI => c.invalid(
                        &f,
                        format!("{f} '{q}': must be greater than or equal to 1Mi"),
                    ),
                    Ok(_) => {}
                },
                "cpu" => match q.millis() {
                    Err(e) => c.invalid(&f, e.to_string()),
                    Ok(0) => c.invalid(&f, format!("{f} '{q}': must be greater than 0")),
                    Ok(_) => {}
                },
                other => c.not_implemented(
                    &f,
                    &format!("resource {other:?}; only cpu and memory are implemented"),
                ),
            }
        }
    }
    for (res, parse) in [
        ("memory", Quantity::value as fn(&Quantity) -> _),
        ("cpu", Quantity::millis),
    ] {
        if let (Some(rq), Some(lq)) = (r.requests.get(res), r.limits.get(res))
            && let (Ok(rv), Ok(lv)) = (parse(rq), parse(lq))
            && rv > lv
        {
            let rf = join(&join(p, "requests"), res);
            let lf = join(&join(p, "limits"), res);
            c.invalid(&rf, format!("{rf} '{rq}' is greater than {lf} '{lq}'"));
        }
    }
}

fn memory(d: &DomainSpec, dp: &str, c: &mut Causes) {
    let guest = d.memory.as_ref().and_then(|m| m.guest.as_ref());
    let gf = join(dp, "memory.guest");
    let Some(guest) = guest else {
        // Defaulting copies a valid requests.memory into guest; an invalid
        // one was already reported by `resources`.
        if !d.resources.requests.contains_key("memory") {
            c.required(
                &gf,
                format!(
                    "no memory requested, at least one of '{gf}' or '{}' must be set",
                    join(dp, "resources.requests.memory")
                ),
            );
        }
        return;
    };
    match guest.value() {
        Err(e) => c.invalid(&gf, e.to_string()),
        Ok(v) if v < MI => c.invalid(
            &gf,
            format!("{gf} '{guest}': must be greater than or equal to 1Mi"),
        ),
        Ok(v) => {
            if let Some(limit) = d.resources.limits.get("memory")
                && let Ok(lv) = limit.value()
                && v > lv
            {
                c.invalid(
                    &gf,
                    format!(
                        "{gf} '{guest}' must be equal to or less than the memory limit {} '{limit}'",
                        join(dp, "resources.limits.memory")
                    ),
                );
            }
        }
    }
}

/// KubeVirt's hugepages rules: a supported page size and guest memory a
/// whole number (at least one) of pages.
fn hugepages(d: &DomainSpec, dp: &str, c: &mut Causes) {
    let Some(hp) = d.memory.as_ref().and_then(|m| m.hugepages.as_ref()) else {
        return;
    };
    let pf = join(dp, "memory.hugepages.pageSize");
    let Some(size) = hp.page_size_bytes() else {
        if hp.page_size.is_empty() {
            c.required(&pf, "Required value");
        } else {
            c.not_supported(
                &pf,
                format!(
                    "{pf} '{}' is not supported (supported values: 2Mi, 1Gi)",
                    hp.page_size
                ),
            );
        }
        return;
    };
    let Some(guest) = d.memory.as_ref().and_then(|m| m.guest.as_ref()) else {
        return;
    };
    let Ok(bytes) = guest.value() else { return };
    let gf = join(dp, "memory.guest");
    if bytes < size {
        c.invalid(
            &gf,
            format!(
                "{gf} '{guest}' must be equal to or larger than page size {pf} '{}'",
                hp.page_size
            ),
        );
    } else if !bytes.is_multiple_of(size) {
        c.invalid(
            &gf,
            format!(
                "{gf} '{guest}' is not a multiple of the page size {pf} '{}'",
                hp.page_size
            ),
        );
    }
}

/// `numa.guestMappingPassthrough` needs dedicated CPUs and hugepages
/// (KubeVirt's rule).
fn numa(d: &DomainSpec, dp: &str, c: &mut Causes) {
    let Some(cpu) = &d.cpu else { return };
    if cpu
        .numa
        .as_ref()
        .and_then(|n| n.guest_mapping_passthrough.as_ref())
        .is_none()
    {
        return;
    }
    let nf = join(dp, "cpu.numa.guestMappingPassthrough");
    if !cpu.dedicated_cpu_placement {
        c.invalid(
            &nf,
            format!(
                "{} must be set to true when NUMA topology strategy is set in {nf}",
                join(dp, "cpu.dedicatedCpuPlacement")
            ),
        );
    }
    if d.memory
        .as_ref()
        .and_then(|m| m.hugepages.as_ref())
        .is_none()
    {
        c.invalid(
            &nf,
            format!(
                "{} must be requested when NUMA topology strategy is set in {nf}",
                join(dp, "memory.hugepages")
            ),
        );
    }
}

fn cpu(d: &DomainSpec, dp: &str, c: &mut Causes) {
    let Some(cpu) = &d.cpu else { return };
    let cp = join(dp, "cpu");
    let mut total: u64 = 1;
    for (name, v) in [
        ("sockets", cpu.sockets),
        ("cores", cpu.cores),
        ("threads", cpu.threads),
    ] {
        let v = v.unwrap_or(1);
        if v == 0 {
            let f = join(&cp, name);
            c.invalid(&f, format!("{f} must be greater than or equal to 1"));
        }
        total = total.saturating_mul(u64::from(v));
    }
    if total > MAX_VCPUS {
        c.invalid(
            &cp,
            format!(
                "{total} vCPUs (sockets × cores × threads) exceed the q35 maximum of {MAX_VCPUS}"
            ),
        );
    }
    if cpu.isolate_emulator_thread {
        c.not_implemented(join(&cp, "isolateEmulatorThread"), "value true");
    }
    if let Some(model) = &cpu.model {
        let ok = !model.is_empty()
            && model.len() <= 64
            && model
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b','));
        if !ok {
            c.invalid(
                join(&cp, "model"),
                format!("{model:?} is not a CPU model name (host-passthrough, host-model or a QEMU model)"),
            );
        }
    }
}

fn machine(d: &DomainSpec, dp: &str, c: &mut Causes) {
    let Some(m) = &d.machine else { return };
    let t = m.type_.as_str();
    let versioned_q35 = t
        .strip_prefix("pc-q35-")
        .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
    if t != "q35" && !versioned_q35 {
        let f = join(dp, "machine.type");
        c.not_supported(
            &f,
            format!("{f} is not supported: {t} (allowed values: q35, pc-q35-*)"),
        );
    }
}

fn firmware(d: &DomainSpec, dp: &str, c: &mut Causes) {
    let Some(fw) = &d.firmware else { return };
    let fp = join(dp, "firmware");
    if let Some(uuid) = &fw.uuid
        && !uuid.is_empty()
        && util::parse_uuid(uuid).is_none()
    {
        c.invalid(
            join(&fp, "uuid"),
            format!("{uuid:?} is not a UUID (8-4-4-4-12 hexadecimal digits)"),
        );
    }
    if let Some(serial) = fw.serial.as_deref().filter(|s| !s.is_empty()) {
        let f = join(&fp, "serial");
        if serial.len() > MAX_SERIAL_LEN {
            c.invalid(
                &f,
                format!(
                    "{f} must be less than or equal to {MAX_SERIAL_LEN} in length, if specified"
                ),
            );
        }
        if !serial_chars(serial) {
            c.invalid(
                &f,
                format!(
                    "{f} must be made up of the following characters [A-Za-z0-9_.+-], if specified"
                ),
            );
        }
    }
    if let Some(kb) = &fw.kernel_boot {
        let kp = join(&fp, "kernelBoot");
        let has_args = kb.kernel_args.as_deref().is_some_and(|a| !a.is_empty());
        match &kb.container {
            None => {
                if has_args {
                    c.invalid(
                        join(&kp, "kernelArgs"),
                        "kernel arguments cannot be provided without an external kernel",
                    );
                }
            }
            Some(ct) => {
                let cp = join(&kp, "container");
                if ct.image.trim().is_empty() {
                    c.required(
                        join(&cp, "image"),
                        format!("{cp} must be defined with an image"),
                    );
                }
                let kernel = ct.kernel_path.as_deref().filter(|s| !s.is_empty());
                let initrd = ct.initrd_path.as_deref().filter(|s| !s.is_empty());
                if kernel.is_none() && initrd.is_none() {
                    c.required(
                        &cp,
                        format!(
                            "{cp} must be defined with at least one of the following: kernelPath, initrdPath"
                        ),
                    );
                }
                if has_args && kernel.is_none() {
                    c.invalid(
                        join(&kp, "kernelArgs"),
                        "kernel arguments cannot be provided without an external kernel",
                    );
                }
                for (name, v) in [("kernelPath", kernel), ("initrdPath", initrd)] {
                    if let Some(path) = v
                        && let Err(problem) = util::clean_absolute_path(path)
                    {
                        let f = join(&cp, name);
                        c.invalid(&f, format!("{f} {problem}"));
                    }
                }
            }
        }
    }
}

fn serial_chars(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'+' | b'-'))
}

fn boot_order(order: u32, f: &str, seen: &mut HashMap<u32, String>, c: &mut Causes) {
    let bf = join(f, "bootOrder");
    if order < 1 {
        c.invalid(&bf, format!("{f} must have a boot order > 0, if supplied"));
        return;
    }
    match seen.entry(order) {
        std::collections::hash_map::Entry::Occupied(_) => c.invalid(
            &bf,
            format!("Boot order for {bf} already set for a different device."),
        ),
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(bf);
        }
    }
}

fn disks(
    spec: &VirtualMachineInstanceSpec,
    p: &str,
    boot: &mut HashMap<u32, String>,
    c: &mut Causes,
) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, d) in spec.domain.devices.disks.iter().enumerate() {
        let f = idx(p, i);
        let nf = join(&f, "name");
        if d.name.is_empty() {
            c.required(&nf, "Required value");
        } else {
            if let Some(problem) = util::dns1123_label(&d.name) {
                c.invalid(&nf, problem);
            }
            if let Some(other) = names.get(d.name.as_str()) {
                c.duplicate(
                    &nf,
                    format!(
                        "{f} and {} must not have the same Name (a volume can be used by at most one disk)",
                        idx(p, *other)
                    ),
                );
            } else {
                names.insert(&d.name, i);
            }
            if spec.volume(&d.name).is_none() {
                c.invalid(&nf, format!("{nf} '{}' not found.", d.name));
            }
        }
        if d.disk.is_some() && d.cdrom.is_some() {
            c.invalid(
                &f,
                format!("{f} can only have a single target type defined"),
            );
        }
        if let Some(t) = &d.disk {
            let bf = join(&f, "disk.bus");
            match t.bus {
                Some(DiskBus::Scsi | DiskBus::Usb) => {
                    c.not_implemented(&bf, &format!("bus {}", bus_name(t.bus)));
                }
                Some(DiskBus::Sata) if t.readonly => {
                    c.invalid(&bf, "sata hard-disks do not support read-only.");
                }
                _ => {}
            }
        }
        if let Some(cd) = &d.cdrom {
            let bf = join(&f, "cdrom.bus");
            match cd.bus {
                Some(DiskBus::Virtio) => {
                    c.invalid(&bf, "Bus type virtio is invalid for CD-ROM device");
                }
                Some(DiskBus::Scsi | DiskBus::Usb) => {
                    c.not_implemented(&bf, &format!("bus {}", bus_name(cd.bus)));
                }
                _ => {}
            }
            if cd.tray == Some(TrayState::Open) {
                c.not_implemented(join(&f, "cdrom.tray"), "tray open");
            }
        }
        if let Some(order) = d.boot_order {
            boot_order(order, &f, boot, c);
        }
        if let Some(serial) = d.serial.as_deref().filter(|s| !s.is_empty()) {
            let sf = join(&f, "serial");
            if !serial_chars(serial) {
                c.invalid(
                    &sf,
                    format!("{f} must be made up of the following characters [A-Za-z0-9_.+-], if specified"),
                );
            }
            if serial.chars().count() > MAX_SERIAL_LEN {
                c.invalid(
                    &sf,
                    format!(
                        "{f} must be less than or equal to {MAX_SERIAL_LEN} in length, if specified"
                    ),
                );
            }
        }
    }
}

fn bus_name(bus: Option<DiskBus>) -> &'static str {
    match bus {
        Some(DiskBus::Virtio) => "virtio",
        Some(DiskBus::Sata) => "sata",
        Some(DiskBus::Scsi) => "scsi",
        Some(DiskBus::Usb) => "usb",
        None => "unset",
    }
}

fn networks_and_interfaces(
    spec: &VirtualMachineInstanceSpec,
    p: &str,
    boot: &mut HashMap<u32, String>,
    c: &mut Causes,
) {
    let np = join(p, "networks");
    let ip = join(p, "domain.devices.interfaces");
    let interfaces = &spec.domain.devices.interfaces;

    let mut net_names: HashMap<&str, usize> = HashMap::new();
    let mut pod_networks = 0;
    for (i, n) in spec.networks.iter().enumerate() {
        let f = idx(&np, i);
        let nf = join(&f, "name");
        if n.name.is_empty() {
            c.required(&nf, "Required value");
        } else if net_names.contains_key(n.name.as_str()) {
            c.duplicate(
                &nf,
                format!(
                    "Network with name {:?} already exists, every network must have a unique name",
                    n.name
                ),
            );
        } else {
            net_names.insert(&n.name, i);
            if !interfaces.iter().any(|iface| iface.name == n.name) {
                c.required(&nf, format!("{nf} '{}' not found.", n.name));
            }
        }
        if n.pod.is_some() && n.multus.is_some() {
            c.invalid(&f, "should have only one network type");
        }
        if let Some(m) = &n.multus {
            let mf = join(&f, "multus.networkName");
            let name = m.krvirt_network();
            let ns_ok = m
                .network_name
                .rsplit_once('/')
                .is_none_or(|(ns, _)| util::dns1123_label(ns).is_none());
            if m.network_name.is_empty() {
                c.required(&mf, "Required value");
            } else if !ns_ok || util::dns1123_label(name).is_some() {
                c.invalid(
                    &mf,
                    format!(
                        "{:?} is not a Network name (name or namespace/name, DNS-1123 labels)",
                        m.network_name
                    ),
                );
            }
            if m.default == Some(true) {
                c.not_implemented(join(&f, "multus.default"), "a multus default network");
            }
            if let Some(iface) = interfaces.iter().find(|i| i.name == n.name)
                && iface.masquerade.is_some()
            {
                let i = interfaces
                    .iter()
                    .position(|x| x.name == n.name)
                    .unwrap_or_default();
                c.invalid(
                    join(&idx(&ip, i), "masquerade"),
                    "Masquerade interface only implemented with pod network",
                );
            }
        }
        match &n.pod {
            None if n.multus.is_some() => {}
            None => c.required(&f, format!("{f} should have a network type")),
            Some(pod) => {
                pod_networks += 1;
                if let Some(cidr) = pod.vm_network_cidr.as_deref().filter(|s| !s.is_empty()) {
                    let cf = join(&f, "pod.vmNetworkCIDR");
                    match util::parse_ipv4_cidr(cidr) {
                        None => c.invalid(&cf, format!("{cidr:?} is not an IPv4 CIDR (e.g. 10.0.2.0/24)")),
                        Some((_, len)) if len > 30 => c.invalid(
                            &cf,
                            format!("{cidr:?}: the prefix must be /30 or shorter to hold the gateway and the guest"),
                        ),
                        Some(_) => {}
                    }
                }
            }
        }
    }
    if pod_networks > 1 {
        c.invalid(
            &np,
            format!("more than one interface is connected to a pod network in {np}"),
        );
    }

    let mut iface_names: HashMap<&str, usize> = HashMap::new();
    for (i, iface) in interfaces.iter().enumerate() {
        let f = idx(&ip, i);
        let nf = join(&f, "name");
        if iface.name.is_empty() {
            c.required(&nf, "Required value");
        } else {
            if !iface
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                c.invalid(
                    &nf,
                    "Network interface name can only contain alphabetical characters, numbers, dashes (-) or underscores (_)",
                );
            }
            if iface_names.contains_key(iface.name.as_str()) {
                c.duplicate(
                    &nf,
                    "Only one interface can be connected to one specific network",
                );
            } else {
                iface_names.insert(&iface.name, i);
            }
            if spec.network(&iface.name).is_none() {
                c.invalid(&nf, format!("{nf} '{}' not found.", iface.name));
            }
        }
        if iface.masquerade.is_some() && iface.bridge.is_some() {
            c.invalid(
                &f,
                "an interface has exactly one binding (masquerade or bridge)",
            );
        }
        if let Some(mac) = iface.mac_address.as_deref().filter(|m| !m.is_empty()) {
            match util::parse_mac(mac) {
                None => c.invalid(
                    join(&f, "macAddress"),
                    format!("interface {nf} has malformed MAC address ({mac})."),
                ),
                Some(bytes) if bytes[0] & 1 == 1 => c.invalid(
                    join(&f, "macAddress"),
                    format!("interface {nf} has a multicast MAC address ({mac})."),
                ),
                Some(_) => {}
            }
        }
        let mut port_names: HashMap<&str, usize> = HashMap::new();
        for (j, port) in iface.ports.iter().enumerate() {
            let pf = idx(&join(&f, "ports"), j);
            if port.port == 0 {
                c.required(&pf, "Port field is mandatory.");
            } else if !(1..=65535).contains(&port.port) {
                c.invalid(&pf, "Port field must be in range 0 < x < 65536.");
            }
            if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
                let pnf = join(&pf, "name");
                if port_names.contains_key(name) {
                    c.duplicate(&pnf, format!("Duplicate name of the port: {name}"));
                } else {
                    port_names.insert(name, j);
                }
                if !util::iana_svc_name(name) {
                    c.invalid(&pnf, format!("Invalid name of the port: {name}"));
                }
            }
        }
        if let Some(order) = iface.boot_order {
            boot_order(order, &f, boot, c);
        }
    }
}

fn volumes(spec: &VirtualMachineInstanceSpec, p: &str, c: &mut Causes) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        let f = idx(p, i);
        let nf = join(&f, "name");
        if v.name.is_empty() {
            c.required(&nf, "Required value");
        } else {
            if let Some(problem) = util::dns1123_label(&v.name) {
                c.invalid(&nf, problem);
            }
            if let Some(other) = names.get(v.name.as_str()) {
                c.duplicate(
                    &nf,
                    format!("{f} and {} must not have the same Name.", idx(p, *other)),
                );
            } else {
                names.insert(&v.name, i);
            }
        }
        let sources = usize::from(v.container_disk.is_some())
            + usize::from(v.empty_disk.is_some())
            + usize::from(v.cloud_init_no_cloud.is_some())
            + usize::from(v.persistent_volume_claim.is_some())
            + usize::from(v.data_volume.is_some());
        if let Some(claim) = v.claim()
            && util::dns1123_subdomain(claim, 253).is_some()
        {
            let which = if v.data_volume.is_some() {
                "dataVolume.name"
            } else {
                "persistentVolumeClaim.claimName"
            };
            c.invalid(
                join(&f, which),
                format!("{claim:?} is not a valid Volume name"),
            );
        }
        if sources != 1 {
            c.invalid(&f, format!("{f} must have exactly one source type set"));
        }
        if let Some(cd) = &v.container_disk {
            let cf = join(&f, "containerDisk");
            if cd.image.trim().is_empty() {
                c.required(join(&cf, "image"), format!("{cf}.image is required"));
            } else if cd.image.chars().any(char::is_whitespace) {
                c.invalid(
                    join(&cf, "image"),
                    format!("{:?} is not an image reference", cd.image),
                );
            }
            if let Some(path) = cd.path.as_deref().filter(|s| !s.is_empty())
                && let Err(problem) = util::clean_absolute_path(path)
            {
                c.invalid(join(&cf, "path"), format!("{cf}.path {problem}"));
            }
        }
        if let Some(ed) = &v.empty_disk {
            let cf = join(&f, "emptyDisk.capacity");
            match &ed.capacity {
                None => c.required(&cf, format!("{cf} is required")),
                Some(q) => match q.value() {
                    Err(e) => c.invalid(&cf, e.to_string()),
                    Ok(0) => c.invalid(&cf, format!("{cf} '{q}': must be greater than 0")),
                    Ok(_) => {}
                },
            }
        }
        if let Some(ci) = &v.cloud_init_no_cloud {
            cloud_init(ci, &join(&f, "cloudInitNoCloud"), c);
        }
    }
}

fn cloud_init(ci: &CloudInitNoCloudSource, p: &str, c: &mut Causes) {
    let non_empty = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
    let user_sources =
        usize::from(non_empty(&ci.user_data)) + usize::from(non_empty(&ci.user_data_base64));
    match user_sources {
        0 => c.required(p, format!("{p} must have userData or userDataBase64 set")),
        2 => c.invalid(p, format!("{p} must have only one userdatasource set.")),
        _ => {}
    }
    if non_empty(&ci.network_data) && non_empty(&ci.network_data_base64) {
        c.invalid(p, format!("{p} must have only one networkdata source set."));
    }
    for (name, v) in [
        ("userDataBase64", &ci.user_data_base64),
        ("networkDataBase64", &ci.network_data_base64),
    ] {
        if let Some(b64) = v.as_deref().filter(|s| !s.is_empty())
            && let Err(problem) = util::decode_base64(b64)
        {
            let f = join(p, name);
            c.invalid(&f, format!("{f} is not a valid base64 value: {problem}."));
        }
    }
}
