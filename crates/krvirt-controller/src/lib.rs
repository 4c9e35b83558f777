//! krvirt's controllers (KubeVirt's virt-controller role), level-triggered:
//! each watches objects through the API server's [`Registry`], queues the
//! keys that changed and reconciles one key at a time from the current state,
//! so a restart at any point converges.
//!
//! - [`vm`]: VirtualMachine → VirtualMachineInstance by run strategy,
//!   printableStatus, crash-loop back-off; deletes VMIs whose VM is gone.
//! - [`placement`]: binds pending VMIs to a Ready host (the one host of
//!   `krvirt up`; the cluster scheduler replaces it later).
//! - [`network`]: attaches VMI interfaces to Networks and allocates their
//!   addresses (IPAM in the store) before the host agent launches them.
//! - [`templates`]: TemplateInstance → a VM from a Template version and its disks
//!   (linked or full clones); instancetypes and preferences are copied into
//!   each VM and expanded into its VMIs.
//! - [`webhook`]: delivers Events to Webhooks (signed, retried, bounded).
//! - [`restore`]: the VM-writing part of VirtualMachineRestores (a new VM
//!   from a snapshot's content; the resume mark of a memory snapshot).
//!
//! Every step is recorded as an Event (`krvirt events`), and events older
//! than an hour (or beyond 100 per object) are expired.

pub mod hostlife;
mod instancetypes;
pub mod migration;
pub mod network;
pub mod placement;
pub mod queue;
pub mod restore;
mod runner;
pub mod templates;
pub mod vm;
pub mod volmigration;
mod volumes;
pub mod webhook;

pub use runner::{ControllerError, Controllers};

/// Finalizer the placement controller puts on every VMI it binds to a host;
/// the host's agent removes it once QEMU is stopped and the run directory
/// is cleaned up, so a deleted VMI never leaves a guest behind.
pub const VMI_FINALIZER: &str = krvirt_api::kubevirt::VMI_HOST_FINALIZER;
