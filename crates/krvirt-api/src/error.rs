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
