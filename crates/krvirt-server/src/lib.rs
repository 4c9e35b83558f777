//! krvirt API server: Kubernetes-style REST for every kind of
//! `krvirt_api::kinds()`, watch streams, discovery, the generated OpenAPI
//! document and KubeVirt's subresources.
//!
//! - [`registry::Registry`]: API semantics over a `krvirt_store::Store`,
//!   shared by the HTTP handlers and in-process controllers.
//! - [`router`] / [`serve`]: the HTTP server over an [`AppState`].
//! - [`connector::HostConnector`]: the host side of VMI subresources
//!   (pause, console, console log); [`remote::RemoteConnector`] reaches
//!   other hosts' agents over mutual TLS.
//! - [`events::EventRecorder`]: best-effort Event recording, aggregation, expiry.
//! - [`auth`], [`rbac`], [`quota`], [`tls`]: authentication (unix socket peer
//!   credentials, bearer tokens, client certificates), RBAC, quotas, the CA.
//! - [`audit`]: request ids and the hash-chained audit log of mutating requests.

pub mod audit;
pub mod auth;
pub mod connector;
pub mod error;
pub mod events;
mod http;
pub mod lifecycle;
pub mod metrics;
pub mod openapi;
pub mod patch;
pub mod quota;
pub mod rbac;
pub mod registry;
pub mod remote;
pub mod selector;
mod server;
pub mod tls;
pub mod volume_guard;

pub use connector::{ByteStream, ConsoleStream, HostConnector, NoHostConnector};
pub use error::ApiError;
pub use http::{MAX_BODY_BYTES, SubresourceMethod, implemented_subresources};
pub use metrics::{InstrumentedStore, MetricsSource};
pub use registry::{
    AdmitFn, DeleteOutcome, EventStream, EventType, Preconditions, Registry, Subresource,
    WatchEvent,
};
pub use selector::{FieldSelector, LabelSelector, Selector};
pub use server::{
    AppState, Listeners, ServerConfig, bind_unix, router, run, serve, serve_listeners,
};
