//! The server's way to the host side of a VMI (pause, console, …).
//!
//! The API server does not talk to QEMU itself: it hands the VMI object to a
//! [`HostConnector`] chosen at startup: `krvirt server` the
//! [`crate::remote::RemoteConnector`] (the host API of the VMI's agent,
//! mutual TLS), `krvirt up` its in-process agent for its own host and the
//! remote one for joined hosts ([`crate::remote::SplitConnector`]).

use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::ApiError;

/// A bidirectional byte stream (the VMI's serial console).
pub trait ConsoleIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ConsoleIo for T {}

/// Boxed serial console connection.
pub type ConsoleStream = Box<dyn ConsoleIo>;

/// A stream of bytes (the console log); an `Err` item ends it.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// Host-side operations on a running VMI. Every method receives the VMI
/// object as stored (with `metadata.uid`, `status.nodeName`, …); the server
/// has already checked that the VMI exists and is in a state that allows
/// the operation.
#[async_trait]
pub trait HostConnector: Send + Sync + 'static {
    /// Pause the guest's vCPUs (QMP `stop`).
    async fn pause(&self, vmi: &Value) -> Result<(), ApiError>;
    /// Resume the guest's vCPUs (QMP `cont`).
    async fn unpause(&self, vmi: &Value) -> Result<(), ApiError>;
    /// Connect to the VMI's serial console.
    async fn console(&self, vmi: &Value) -> Result<ConsoleStream, ApiError>;
    /// The serial console log so far; with `follow`, keep streaming new
    /// output until the VMI stops or the client goes away.
    async fn console_log(&self, vmi: &Value, follow: bool) -> Result<ByteStream, ApiError>;
}

/// The connector of a server with no way to the hosts (no CA: TLS off):
/// every operation answers 503 ServiceUnavailable.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHostConnector;

fn unavailable(vmi: &Value, what: &str) -> ApiError {
    let name = vmi
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    ApiError::ServiceUnavailable(format!(
        "cannot {what} VMI {name}: this server has no connection to the hosts"
    ))
}

#[async_trait]
impl HostConnector for NoHostConnector {
    async fn pause(&self, vmi: &Value) -> Result<(), ApiError> {
        Err(unavailable(vmi, "pause"))
    }
    async fn unpause(&self, vmi: &Value) -> Result<(), ApiError> {
        Err(unavailable(vmi, "unpause"))
    }
    async fn console(&self, vmi: &Value) -> Result<ConsoleStream, ApiError> {
        Err(unavailable(vmi, "open the console of"))
    }
    async fn console_log(&self, vmi: &Value, _follow: bool) -> Result<ByteStream, ApiError> {
        Err(unavailable(vmi, "read the console log of"))
    }
}
