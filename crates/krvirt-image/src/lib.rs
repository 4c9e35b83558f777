//! Local images: demo guest builder from Debian packages, containerDisk aliases, cloud-init NoCloud seeds
//!
//! - [`guest`]: builds the demo/test guest (initramfs, bootable raw disk,
//!   kernel-boot layout) from the host's Debian kernel, modules and static
//!   busybox; [`ensure_demo_images`] caches the build.
//! - [`seed`]: writes cloud-init NoCloud seed images (vfat labelled `cidata`).
//! - [`alias`]: the local [`ImageStore`] and the containerDisk alias table.
//! - [`blobs`]: the content-addressed store: sha256 blobs, tags, layers, verification, GC.
//! - [`pull`]: imports from HTTP(S) URLs and containerDisks in OCI registries.
//! - [`cpio`]: the newc writer used for the initramfs.

pub mod alias;
pub mod blobs;
pub mod cpio;
mod error;
mod fat;
pub mod guest;
pub mod pull;
pub mod seed;

pub use alias::{
    ImageError, ImageStore, KernelBootPaths, Reference, ResolvedImage, kernel_boot_paths,
};
pub use blobs::{
    BlobFormat, BlobWriter, Catalog, GcReport, ImageSummary, ImportOptions, Imported, Inspection,
    NameTag, sha256_file,
};
pub use error::{Error, Result};
pub use guest::{
    DemoImages, GuestBuildOptions, build_demo_images, ensure_demo_images, ensure_demo_images_with,
};
pub use seed::{NoCloudSeed, write_nocloud_seed};
