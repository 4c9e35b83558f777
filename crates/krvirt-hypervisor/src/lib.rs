//! QEMU driver for krvirt: command line from a VM config, QMP client,
//! process lifecycle, accelerator detection.
//!
//! - [`config`]: [`VmConfig`], a fully resolved VM, and its validation.
//! - [`argv`]: [`qemu_argv`], the QEMU command line as a pure function.
//! - [`accel`]: KVM/TCG decision ([`detect`]), QEMU binary and version.
//! - [`qmp`]: asynchronous QMP client ([`QmpClient`]).
//! - [`process`]: [`launch_with`], [`reattach`] and [`QemuHandle`].
//! - [`cgroup`]: per-VM cgroups (v1 and v2) with CPU and memory limits.
//! - [`isolation`]: the QEMU user, file access for it, CPU pinning.
//!
//! Linux only.

pub mod accel;
pub mod argv;
pub mod cgroup;
pub mod config;
pub mod isolation;
pub mod process;
pub mod qmp;
mod sys;

pub use accel::{AccelDecision, AccelError, AccelMode, detect, qemu_binary, qemu_version};
pub use argv::{escape_opt, qemu_argv};
pub use cgroup::{CgroupError, CgroupVersion, Cgroups, VmCgroup};
pub use config::{
    Accel, BackingImage, ConfigError, CpuConfig, CpuModel, DiskBus, DiskCache, DiskConfig,
    DiskFormat, Firmware, GuestNumaNode, HugepagesBacking, KernelBoot, Machine, NicBackend,
    NicConfig, NicModel, PortForward, Protocol, RbdDisk, Resources, RunPaths, VmConfig,
};
pub use isolation::{DEFAULT_QEMU_USER, IsolationError, QemuUser};
pub use process::{
    LaunchOptions, LaunchRecord, ProcessError, QemuHandle, RunState, StopOptions, StopOutcome,
    kill_running, launch, launch_with, reattach, release, running_pid,
};
pub use qmp::{QmpClient, QmpError, QmpEvent, QmpGreeting, QmpOptions};
