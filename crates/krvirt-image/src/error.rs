//! Error type for building guest images and writing seeds.

use std::io;
use std::path::PathBuf;

/// Errors from the guest builder, the NoCloud seed writer and the small
/// disk-format helpers of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No guest kernel could be found.
    #[error(
        "no guest kernel found (searched {searched}); install the Debian package \
         linux-image-cloud-amd64 or set KRVIRT_GUEST_KERNEL to a bzImage"
    )]
    KernelNotFound { searched: String },

    /// A required input file or tool is missing.
    #[error("{what} not found at {path}: {hint}")]
    MissingInput {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },

    /// A required external program could not be run.
    #[error("cannot run {tool}: {source}; {hint}")]
    ToolMissing {
        tool: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },

    /// An external program ran and failed.
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        tool: String,
        status: String,
        stderr: String,
    },

    /// The kernel file is not a usable x86 bzImage.
    #[error("{path} is not a usable x86 Linux bzImage: {reason}")]
    BadKernel { path: PathBuf, reason: String },

    /// The busybox binary cannot run inside a bare initramfs.
    #[error(
        "{path} is not a static x86-64 busybox ({reason}); install busybox-static or set KRVIRT_BUSYBOX"
    )]
    BadBusybox { path: PathBuf, reason: String },

    /// A kernel module the guest needs is neither a module nor built in.
    #[error(
        "kernel module {name} not found in {modules_dir} (not in modules.dep nor modules.builtin); \
         the guest needs it ({why})"
    )]
    ModuleNotFound {
        name: String,
        modules_dir: PathBuf,
        why: &'static str,
    },

    /// A kernel module is stored in a compression format busybox insmod cannot load.
    #[error("kernel module {path} is compressed in a format this builder cannot unpack ({format})")]
    UnsupportedModuleCompression { path: PathBuf, format: String },

    /// Invalid caller input (seed fields, options).
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },

    /// The content does not fit the image format.
    #[error("{what} too large: {reason}")]
    TooLarge { what: &'static str, reason: String },

    /// An I/O error with context.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// Result alias for this crate's builder and seed functions.
pub type Result<T> = std::result::Result<T, Error>;

/// Attach a human-readable context to `io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
