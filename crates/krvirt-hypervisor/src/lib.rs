//! QEMU driver for krvirt: command line from a VM config, QMP client,
//! process lifecycle, accelerator detection.
//!
//! - [`config`]: [`VmConfig`], a fully resolved VM, and its validation.
//! - [`argv`]: [`qemu_argv`], the QEMU command line as a pure function.
//! - [`accel`]: KVM/TCG decision ([`detect`]), QEMU binary and version.
//! - [`qmp`]: asynchronous QMP client ([`QmpClient`]).
//! - [`process`]: [`launch`], [`reattach`] and [`QemuHandle`].
//!
//! Linux only.

pub mod accel;
pub mod argv;
pub mod config;
pub mod process;
pub mod qmp;
mod sys;

pub use accel::{AccelDecision, AccelError, AccelMode, detect, qemu_binary, qemu_version};
pub use argv::{escape_opt, qemu_argv};
pub use config::{
    Accel, BackingImage, ConfigError, CpuConfig, CpuModel, DiskBus, DiskCache, DiskConfig,
    DiskFormat, Firmware, KernelBoot, Machine, NicBackend, NicConfig, NicModel, PortForward,
    Protocol, RunPaths, VmConfig,
};
pub use process::{ProcessError, QemuHandle, RunState, StopOptions, StopOutcome, launch, reattach};
pub use qmp::{QmpClient, QmpError, QmpEvent, QmpGreeting, QmpOptions};
