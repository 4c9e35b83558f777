//! HTTP client for the krvirt API (used by the CLI and the host agent).
//!
//! Generic over kinds: every object call takes a [`krvirt_api::KindInfo`]
//! and works on `serde_json::Value` objects (with typed `*_as` wrappers).
//! URLs follow the Kubernetes layout:
//! `/apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}[/status]]`,
//! KubeVirt subresources under `/apis/subresources.{group}/{version}/…`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), krvirt_client::ClientError> {
//! use krvirt_client::{Client, ListParams};
//! let client = Client::from_env(None)?;
//! let vm = krvirt_api::find_kind("vm").expect("VirtualMachine is served");
//! let list = client.list(vm, &ListParams::namespaced("default")).await?;
//! println!("{} VMs at revision {}", list.items.len(), list.resource_version);
//! # Ok(()) }
//! ```

mod client;
mod console;
mod error;
pub mod events;
mod watch;

pub use client::{
    ByteStream, Client, Connection, DEFAULT_SERVER, ListParams, ObjectList, PatchTarget, Result,
    SERVER_ENV, StartOptions, resolve_server, tls_config,
};
pub use console::{Console, ConsoleReader, ConsoleWriter};
pub use error::{ClientError, ServerOrigin, Status, StatusCause, StatusDetails, reason_for_code};
pub use watch::{
    ResumeOptions, TransportError, WatchDecoder, WatchEvent, WatchEventKind, WatchStream,
};
