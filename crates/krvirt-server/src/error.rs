//! API errors and their Kubernetes `Status` representation.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use krvirt_api::FieldCause;
use krvirt_store::StoreError;
use serde_json::{Value, json};

/// Everything the API can refuse a request with. Each variant maps to one
/// Kubernetes `Status` reason and HTTP code (see [`ApiError::code`]).
///
/// `resource` fields hold the plural resource name and `group` the API group
/// (empty for the core group), as in Kubernetes' `StatusDetails`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// 404 `NotFound`.
    #[error("{} \"{name}\" not found", qualified(.resource, .group))]
    NotFound {
        group: String,
        resource: String,
        name: String,
    },
    /// 404 `NotFound` for paths that do not name any resource.
    #[error("{0}")]
    RouteNotFound(String),
    /// 409 `AlreadyExists`.
    #[error("{} \"{name}\" already exists", qualified(.resource, .group))]
    AlreadyExists {
        group: String,
        resource: String,
        name: String,
    },
    /// 409 `Conflict`: a failed resourceVersion/uid precondition or a state
    /// that forbids the operation (KubeVirt's "VM is already running").
    #[error("Operation cannot be fulfilled on {} \"{name}\": {message}", qualified(.resource, .group))]
    Conflict {
        group: String,
        resource: String,
        name: String,
        message: String,
    },
    /// 422 `Invalid` with one cause per refused field. `kind` is the Kind
    /// (`VirtualMachine`), as Kubernetes reports it.
    #[error("{} \"{name}\" is invalid: {}", qualified(.kind, .group), causes_summary(.causes))]
    Invalid {
        group: String,
        kind: String,
        name: String,
        causes: Vec<FieldCause>,
    },
    /// 400 `BadRequest`.
    #[error("{0}")]
    BadRequest(String),
    /// 410 `Expired`: the requested resourceVersion is older than the
    /// retained history (relist, then watch again).
    #[error("{0}")]
    Gone(String),
    /// 405 `MethodNotAllowed`.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 403 `Forbidden`.
    #[error("{0}")]
    Forbidden(String),
    /// 413 `RequestEntityTooLarge`.
    #[error("{0}")]
    TooLarge(String),
    /// 415 `UnsupportedMediaType`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 503 `ServiceUnavailable`.
    #[error("{0}")]
    ServiceUnavailable(String),
    /// 500 `InternalError`.
    #[error("Internal error occurred: {0}")]
    Internal(String),
}

fn qualified(resource: &str, group: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

fn causes_summary(causes: &[FieldCause]) -> String {
    let parts: Vec<String> = causes
        .iter()
        .map(|c| {
            if c.field.is_empty() {
                c.message.clone()
            } else {
                format!("{}: {}", c.field, c.message)
            }
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

impl ApiError {
    /// HTTP status code of this error.
    pub fn code(&self) -> u16 {
        match self {
            ApiError::NotFound { .. } | ApiError::RouteNotFound(_) => 404,
            ApiError::AlreadyExists { .. } | ApiError::Conflict { .. } => 409,
            ApiError::Invalid { .. } => 422,
            ApiError::BadRequest(_) => 400,
            ApiError::Gone(_) => 410,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::Forbidden(_) => 403,
            ApiError::TooLarge(_) => 413,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::ServiceUnavailable(_) => 503,
            ApiError::Internal(_) => 500,
        }
    }

    /// Kubernetes `Status.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } | ApiError::RouteNotFound(_) => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } => "Conflict",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Gone(_) => "Expired",
            ApiError::MethodNotAllowed(_) => "MethodNotAllowed",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::TooLarge(_) => "RequestEntityTooLarge",
            ApiError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            ApiError::ServiceUnavailable(_) => "ServiceUnavailable",
            ApiError::Internal(_) => "InternalError",
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::NotFound { .. })
    }

    pub fn is_conflict(&self) -> bool {
        matches!(self, ApiError::Conflict { .. })
    }

    /// The Kubernetes `Status` object (`kind: Status, apiVersion: v1`).
    pub fn to_status(&self) -> Value {
        let details = match self {
            ApiError::NotFound {
                group,
                resource,
                name,
            }
            | ApiError::AlreadyExists {
                group,
                resource,
                name,
            }
            | ApiError::Conflict {
                group,
                resource,
                name,
                ..
            } => Some(json!({"name": name, "group": group, "kind": resource})),
            ApiError::Invalid {
                group,
                kind,
                name,
                causes,
            } => Some(json!({
                "name": name,
                "group": group,
                "kind": kind,
                "causes": causes,
            })),
            _ => None,
        };
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        if let (Some(d), Some(obj)) = (details, status.as_object_mut()) {
            obj.insert("details".into(), d);
        }
        status
    }

    /// Map a store error for the object `name` of `resource`.
    pub(crate) fn from_store(err: StoreError, group: &str, resource: &str, name: &str) -> Self {
        match err {
            StoreError::AlreadyExists(_) => ApiError::AlreadyExists {
                group: group.into(),
                resource: resource.into(),
                name: name.into(),
            },
            StoreError::NotFound(_) => ApiError::NotFound {
                group: group.into(),
                resource: resource.into(),
                name: name.into(),
            },
            StoreError::Conflict { .. } => ApiError::conflict_modified(group, resource, name),
            StoreError::Compacted { requested, oldest } => ApiError::Gone(format!(
                "too old resource version: {} ({})",
                requested.saturating_sub(1),
                oldest.saturating_sub(1)
            )),
            StoreError::Closed => ApiError::ServiceUnavailable("the store is closed".into()),
            other => ApiError::Internal(other.to_string()),
        }
    }

    /// The standard "object has been modified" conflict.
    pub fn conflict_modified(group: &str, resource: &str, name: &str) -> Self {
        ApiError::Conflict {
            group: group.into(),
            resource: resource.into(),
            name: name.into(),
            message: "the object has been modified; please apply your changes to the latest version and try again".into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        ApiError::from_store(err, "", "", "")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, axum::Json(self.to_status())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shapes() {
        let e = ApiError::NotFound {
            group: "kubevirt.io".into(),
            resource: "virtualmachines".into(),
            name: "x".into(),
        };
        let s = e.to_status();
        assert_eq!(s["code"], 404);
        assert_eq!(s["reason"], "NotFound");
        assert_eq!(s["message"], "virtualmachines.kubevirt.io \"x\" not found");
        assert_eq!(s["details"]["kind"], "virtualmachines");

        let e = ApiError::Invalid {
            group: "kubevirt.io".into(),
            kind: "VirtualMachine".into(),
            name: "x".into(),
            causes: vec![FieldCause {
                reason: "FieldValueRequired".into(),
                message: "Required value".into(),
                field: "spec.template".into(),
            }],
        };
        let s = e.to_status();
        assert_eq!(s["code"], 422);
        assert_eq!(s["details"]["causes"][0]["field"], "spec.template");
        assert_eq!(
            s["message"],
            "VirtualMachine.kubevirt.io \"x\" is invalid: [spec.template: Required value]"
        );

        let e = ApiError::from_store(
            StoreError::Compacted {
                requested: 6,
                oldest: 11,
            },
            "",
            "",
            "",
        );
        assert_eq!(e.code(), 410);
        assert_eq!(e.to_status()["message"], "too old resource version: 5 (10)");
    }
}
