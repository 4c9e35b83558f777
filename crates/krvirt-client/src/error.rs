//! Errors: a typed [`ClientError`] that keeps the server's Kubernetes
//! `Status` (reason, code, message, causes with field paths).

use serde::{Deserialize, Serialize};

/// One cause inside a [`Status`]: what was wrong and where.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusCause {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Dotted field path, e.g. `spec.template.spec.domain.devices.disks[0].name`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub field: String,
}

/// `Status.details`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusDetails {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<StatusCause>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u32>,
}

/// A Kubernetes `Status` object, as the server sends it with every error.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub api_version: String,
    /// `Success` or `Failure`.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub message: String,
    /// `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `BadRequest`, `Gone`…
    #[serde(default)]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
    /// The HTTP status code.
    #[serde(default)]
    pub code: u16,
}

impl Status {
    /// Parse a `Status` out of a JSON value (an error body, or the object of
    /// a watch `ERROR` event). `None` if it is not shaped like one.
    pub fn from_value(v: &serde_json::Value) -> Option<Status> {
        let obj = v.as_object()?;
        if obj.get("kind").and_then(|k| k.as_str()) != Some("Status") {
            return None;
        }
        serde_json::from_value(v.clone()).ok()
    }

    /// A `Status` for an error body that was not a `Status` (a proxy page,
    /// plain text from a router…).
    pub fn synthesize(code: u16, body: &str) -> Status {
        let reason = reason_for_code(code).to_string();
        let body = body.trim();
        let message = if body.is_empty() {
            format!("the server responded {code} {reason}")
        } else {
            let mut text: String = body.chars().take(500).collect();
            if body.chars().count() > 500 {
                text.push('…');
            }
            format!("the server responded {code} {reason}: {text}")
        };
        Status {
            kind: "Status".into(),
            api_version: "v1".into(),
            status: "Failure".into(),
            message,
            reason,
            details: None,
            code,
        }
    }

    /// The causes, if any.
    pub fn causes(&self) -> &[StatusCause] {
        self.details
            .as_ref()
            .map(|d| d.causes.as_slice())
            .unwrap_or(&[])
    }
}

/// Kubernetes' `reason` for an HTTP code (used when the server sent no Status).
pub fn reason_for_code(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Gone",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

/// Where the client's server address came from (for error messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerOrigin {
    /// Passed to [`crate::Client::new`] by the program.
    Explicit,
    /// The `--server` flag.
    Flag,
    /// The `KRVIRT_SERVER` environment variable.
    Env,
    /// The built-in default (`http://127.0.0.1:8440`).
    Default,
}

impl ServerOrigin {
    fn describe(self) -> &'static str {
        match self {
            ServerOrigin::Explicit => "",
            ServerOrigin::Flag => " (from --server)",
            ServerOrigin::Env => " (from KRVIRT_SERVER)",
            ServerOrigin::Default => " (the default local address)",
        }
    }
}

/// Everything that can go wrong talking to the krvirt API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address could not be used.
    #[error("invalid server address {url:?}: {reason}")]
    InvalidServer { url: String, reason: String },

    /// A caller-supplied argument cannot form a request (empty name…).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The server could not be reached at all.
    #[error(
        "cannot reach the krvirt server at {server}{}: {cause}. Is `krvirt up` running? \
         Choose another server with --server URL or the KRVIRT_SERVER environment variable",
        .origin.describe()
    )]
    Unreachable {
        server: String,
        origin: ServerOrigin,
        cause: String,
    },

    /// The server answered with an error `Status`.
    #[error("{}", api_message(.0))]
    Api(Box<Status>),

    /// Transport failure after the connection was made (reset, broken body…).
    #[error("{context}: {source}")]
    Transport {
        context: String,
        #[source]
        source: reqwest::Error,
    },

    /// The server ended a stream before it delivered anything.
    #[error("{context}: the server closed the connection")]
    Disconnected { context: String },

    /// The server's answer could not be decoded.
    #[error("cannot decode {context}: {message}")]
    Decode { context: String, message: String },

    /// WebSocket failure (console).
    #[error("console connection: {0}")]
    WebSocket(String),
}

fn api_message(s: &Status) -> String {
    if !s.message.is_empty() {
        s.message.clone()
    } else if !s.reason.is_empty() {
        format!("{} ({})", s.reason, s.code)
    } else {
        format!("the server responded {}", s.code)
    }
}

impl ClientError {
    /// The server's `Status`, when the error came from the server.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Api(s) => Some(s),
            _ => None,
        }
    }

    /// HTTP code of a server error.
    pub fn code(&self) -> Option<u16> {
        self.status().map(|s| s.code)
    }

    fn reason_is(&self, reason: &str, code: u16) -> bool {
        self.status()
            .is_some_and(|s| s.reason == reason || (s.reason.is_empty() && s.code == code))
    }

    pub fn is_not_found(&self) -> bool {
        self.reason_is("NotFound", 404)
    }

    pub fn is_already_exists(&self) -> bool {
        self.reason_is("AlreadyExists", 409)
    }

    /// An update lost a compare-and-swap race (stale resourceVersion).
    pub fn is_conflict(&self) -> bool {
        self.reason_is("Conflict", 409)
    }

    /// A watch asked for a resourceVersion the server no longer has.
    pub fn is_gone(&self) -> bool {
        self.reason_is("Gone", 410) || (self.code() == Some(410))
    }

    pub fn is_invalid(&self) -> bool {
        self.reason_is("Invalid", 422)
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
}

/// Innermost message of an error's source chain ("connection refused").
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    if let Some(io) = cur.downcast_ref::<std::io::Error>()
        && io.kind() == std::io::ErrorKind::ConnectionRefused
    {
        return "connection refused".to_string();
    }
    let text = cur.to_string();
    // io::Error's Display appends " (os error 111)"; keep the words.
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}
