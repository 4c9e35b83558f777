//! Validation errors that name the failing field.

use serde::{Deserialize, Serialize};

/// One reason an object was refused, as in Kubernetes' `StatusCause`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldCause {
    /// Machine-readable reason: `FieldValueRequired`, `FieldValueInvalid`,
    /// `FieldValueNotSupported`, `FieldValueDuplicate`, `FieldUnknown`…
    pub reason: String,
    pub message: String,
    /// Dotted path with indices, e.g. `spec.template.spec.domain.devices.disks[0].name`.
    pub field: String,
}

/// An object failed admission. Maps to HTTP 422 (or 400 for undecodable input).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", summary(.causes))]
pub struct ValidationError {
    pub causes: Vec<FieldCause>,
}

fn summary(causes: &[FieldCause]) -> String {
    causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ValidationError {
    pub fn new(reason: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            causes: vec![FieldCause {
                reason: reason.to_string(),
                message: message.into(),
                field: field.into(),
            }],
        }
    }
}

/// Machine-readable cause reasons (Kubernetes `CauseType` strings).
pub mod reason {
    /// A required field is missing or empty.
    pub const REQUIRED: &str = "FieldValueRequired";
    /// The value is malformed or out of range.
    pub const INVALID: &str = "FieldValueInvalid";
    /// The field or value is known but not supported (including KubeVirt
    /// features krvirt does not implement yet).
    pub const NOT_SUPPORTED: &str = "FieldValueNotSupported";
    /// The value duplicates another entry.
    pub const DUPLICATE: &str = "FieldValueDuplicate";
    /// The change is not allowed (immutable field).
    pub const FORBIDDEN: &str = "FieldValueForbidden";
    /// The field does not exist in the schema (typo).
    pub const UNKNOWN: &str = "FieldUnknown";
}

impl FieldCause {
    pub fn new(reason: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldCause {
            reason: reason.to_string(),
            message: message.into(),
            field: field.into(),
        }
    }
}

impl std::fmt::Display for FieldCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.reason, self.field, self.message)
    }
}

impl ValidationError {
    pub fn from_causes(causes: Vec<FieldCause>) -> Self {
        ValidationError { causes }
    }

    /// The first cause, if any (the one a one-line report shows).
    pub fn first(&self) -> Option<&FieldCause> {
        self.causes.first()
    }
}
