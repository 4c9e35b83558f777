//! Auto-pull: a containerDisk naming a registry image that is not in the
//! host's image store yet is pulled into it at launch (KubeVirt's nodes
//! pull container images the same way), with `Pulling` / `Pulled` /
//! `Failed` events on the VMI. References the store already resolves
//! (tags, earlier pulls, aliases such as KubeVirt's demo images) are left
//! alone.

use krvirt_api::kubevirt::VirtualMachineInstance;
use krvirt_image::{ImageError, ImageStore};

/// Whether `reference` names an image in a registry: a first path
/// component that is a host (has a `.` or a `:` port, or is `localhost`)
/// followed by a repository path.
pub fn is_registry_reference(reference: &str) -> bool {
    let r = reference.trim();
    let r = r.strip_prefix("docker://").unwrap_or(r);
    match r.split_once('/') {
        Some((host, rest)) => {
            !rest.is_empty()
                && !host.is_empty()
                && (host.contains('.') || host.contains(':') || host == "localhost")
        }
        None => false,
    }
}

/// One event to record on the VMI: (type, reason, message).
pub type Event = (&'static str, &'static str, String);

/// Pull every containerDisk image of `vmi` the store does not have and that
/// names a registry. `event` records what happens; an error message (the
/// VMI's `ErrImagePull`) if a pull fails.
pub async fn ensure_images(
    store: &ImageStore,
    vmi: &VirtualMachineInstance,
    event: &(dyn Fn(Event) + Send + Sync),
) -> Result<(), String> {
    for v in &vmi.spec.volumes {
        let Some(cd) = &v.container_disk else {
            continue;
        };
        let image = cd.image.trim();
        match store.resolve(image) {
            Err(ImageError::NotFound { .. }) if is_registry_reference(image) => {}
            _ => continue, // present, or an error the launch reports itself
        }
        let reference = image.strip_prefix("docker://").unwrap_or(image);
        event((
            krvirt_api::event::NORMAL,
            "Pulling",
            format!("Pulling image \"{reference}\""),
        ));
        match store.pull(reference, None).await {
            Ok(imported) => event((
                krvirt_api::event::NORMAL,
                "Pulled",
                format!(
                    "Successfully pulled image \"{reference}\" ({})",
                    imported.digest
                ),
            )),
            Err(e) => {
                let msg = format!("pulling image \"{reference}\": {e}");
                event((krvirt_api::event::WARNING, "Failed", msg.clone()));
                return Err(msg);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_references() {
        for yes in [
            "127.0.0.1:5000/demo/disk:1",
            "quay.io/kubevirt/fedora:latest",
            "localhost/x",
            "docker://registry.example.org/a/b@sha256:00",
        ] {
            assert!(is_registry_reference(yes), "{yes}");
        }
        for no in [
            "demo-disk:latest",
            "app:1",
            "kubevirt/cirros",
            "x.y",
            "host.io/",
        ] {
            assert!(!is_registry_reference(no), "{no}");
        }
    }
}
