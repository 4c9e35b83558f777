//! krvirt's resource model: typed objects, validation, defaulting and
//! OpenAPI schemas. No I/O.
//!
//! The API server is generic over kinds: it looks a kind up in [`kinds()`],
//! hands incoming objects to [`admit`] (parse as the typed struct, refuse
//! unknown or unsupported fields by path, default, validate) and stores the
//! returned JSON.
//!
//! Modules:
//! - [`meta`]: `ObjectMeta`, `Condition`, timestamps.
//! - [`quantity`]: Kubernetes quantities (`128Mi`, `500m`).
//! - [`kubevirt`]: `kubevirt.io/v1` VirtualMachine / VirtualMachineInstance.
//! - [`host`]: `krvirt.io/v1` Host.
//! - [`network`]: `krvirt.io/v1` Network and SecurityGroup.
//! - [`storage`]: `krvirt.io/v1` StoragePool and Volume, DataVolume templates.
//! - [`event`]: core `v1` Event (what happened to an object).
//! - [`auth`]: Namespace, ResourceQuota, RBAC roles and bindings, Token.
//! - [`instancetype`]: `instancetype.kubevirt.io/v1beta1` instancetypes and preferences.
//! - [`template`]: `krvirt.io/v1` Template (versioned, parameterised VMs) and TemplateInstance.
//! - [`webhook`]: `krvirt.io/v1` Webhook (events delivered over HTTP).

pub mod admission;
pub mod auth;
pub mod clone;
pub mod error;
pub mod event;
pub mod host;
pub mod image;
pub mod instancetype;
pub mod jsonpatch;
pub mod kinds;
pub mod kubevirt;
pub mod meta;
pub mod migration;
pub mod network;
mod openapi;
pub mod quantity;
pub mod snapshot;
pub mod storage;
pub mod template;
mod types;
mod util;
pub mod webhook;

pub use admission::{NOT_IMPLEMENTED, not_implemented_fields};
pub use error::{FieldCause, ValidationError};
pub use kinds::{KindInfo, admit, find_kind, kind_for_object, kinds};
pub use meta::Object;
pub use openapi::openapi_components;
