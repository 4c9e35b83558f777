//! krvirt's resource model: typed objects, validation, defaulting and
//! OpenAPI schemas. No I/O.
//!
//! The API server is generic over kinds: it looks a kind up in [`kinds()`],
//! hands incoming objects to [`admit`] (parse as the typed struct, refuse
//! unknown or unsupported fields by path, validate, default) and stores the
//! returned JSON.

pub mod error;
pub mod kinds;
mod types;

pub use error::{FieldCause, ValidationError};
pub use kinds::{KindInfo, admit, find_kind, kinds};
