//! krvirt host agent (KubeVirt's virt-handler role): registers its Host,
//! watches the VMIs bound to it and converges each one: disks, cloud-init
//! seed, then QEMU; reports status back; re-attaches to running QEMUs after
//! a restart.

pub mod agent;
pub mod autopull;
pub mod fence;
pub mod inventory;
pub mod metrics;
pub mod migration;
pub mod network;
pub mod plan;
pub mod snapshot;
pub mod storage;
pub mod volmove;

pub use agent::{Agent, AgentConfig, AgentError};
