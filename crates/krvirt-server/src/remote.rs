//! The server's way to VMIs on other hosts: every `krvirt agent` serves a
//! small host API (HTTPS, mutual TLS) on the port it advertises in its Host
//! (`status.daemonEndpoints.agentEndpoint.port`, on its `InternalIP`);
//! [`RemoteConnector`] looks up the Host named by the VMI's
//! `status.nodeName`, dials it with the server's client certificate
//! ([`crate::tls::SERVER_CN`]), checks that the host's certificate was
//! signed by the cluster CA for that host name, and proxies.
//! [`SplitConnector`] serves one host in-process (`krvirt up`) and the
//! others remotely.
//!
//! The host API (all by VMI uid; answers are `Status` objects on errors):
//! - `POST /v1/vmis/{uid}/pause`, `POST /v1/vmis/{uid}/unpause`
//! - `GET /v1/vmis/{uid}/console` with `Upgrade: krvirt-console`: `101`,
//!   then the raw serial console bytes both ways
//! - `GET /v1/vmis/{uid}/consolelog?follow=true|false`: the console log

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::connector::{ByteStream, ConsoleStream, HostConnector};
use crate::{ApiError, Registry};

/// Path prefix of the host API.
pub const HOST_API_PREFIX: &str = "/v1/vmis";

/// The `Upgrade` protocol of the host API's console.
pub const CONSOLE_UPGRADE: &str = "krvirt-console";

/// Is `uid` safe to put in a host API path (and a run directory name)?
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

/// Is a Host object Ready (its `Ready` condition `True`)?
pub fn host_ready(host: &Value) -> bool {
    host.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// Where a Host's agent serves its host API: its `InternalIP` and
/// `status.daemonEndpoints.agentEndpoint.port`; `Err` says what is missing.
pub fn host_api_address(host: &Value) -> Result<SocketAddr, String> {
    let port = host
        .pointer("/status/daemonEndpoints/agentEndpoint/port")
        .and_then(Value::as_u64)
        .filter(|p| (1..=65535).contains(p))
        .ok_or("advertises no host API port (status.daemonEndpoints.agentEndpoint.port)")?;
    let ip = host
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|x| x["type"] == "InternalIP")
                .and_then(|x| x["address"].as_str())
        })
        .ok_or("advertises no InternalIP address")?;
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| format!("advertises an invalid InternalIP {ip:?}"))?;
    Ok(SocketAddr::new(ip, port as u16))
}

/// The API error for a host API answer `code` with `body` (a `Status`,
/// or anything) about `vmi` on `host`.
pub fn remote_error(host: &str, vmi: &Value, code: u16, body: &[u8]) -> ApiError {
    let status: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let message = status
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    match code {
        409 => ApiError::Conflict {
            // the host's own Conflict names the VMI by uid: keep its reason
            message: message
                .strip_prefix("Operation cannot be fulfilled on ")
                .and_then(|m| m.split_once("\": ").map(|(_, r)| r.to_string()))
                .unwrap_or(message),
            group: "kubevirt.io".into(),
            resource: "virtualmachineinstances".into(),
            name: str_at(vmi, "/metadata/name").to_string(),
        },
        503 => ApiError::ServiceUnavailable(format!("host {host}: {message}")),
        _ => ApiError::Internal(format!("host {host} answered {code}: {message}")),
    }
}

/// The host API of the VMIs' hosts, over mutual TLS.
pub struct RemoteConnector {
    registry: Registry,
    tls: tokio_rustls::TlsConnector,
    dial_timeout: Duration,
    call_timeout: Duration,
}

/// A VMI's host and where its host API answers.
struct Target {
    host: String,
    addr: SocketAddr,
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

impl RemoteConnector {
    /// `tls`: trusts the cluster CA and presents the server's client
    /// certificate (see [`crate::tls::Pki::host_api_client_config`]).
    pub fn new(registry: Registry, tls: Arc<rustls::ClientConfig>) -> Self {
        RemoteConnector {
            registry,
            tls: tokio_rustls::TlsConnector::from(tls),
            dial_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(30),
        }
    }

    /// How long to wait for a host's TCP connection and TLS handshake.
    pub fn with_dial_timeout(mut self, d: Duration) -> Self {
        self.dial_timeout = d;
        self
    }

    async fn target(&self, vmi: &Value) -> Result<Target, ApiError> {
        let name = str_at(vmi, "/metadata/name");
        let node = str_at(vmi, "/status/nodeName");
        if node.is_empty() {
            return Err(ApiError::Conflict {
                group: "kubevirt.io".into(),
                resource: "virtualmachineinstances".into(),
                name: name.to_string(),
                message: "the VMI is not placed on a host".into(),
            });
        }
        let kind = self
            .registry
            .kind("krvirt.io", "Host")
            .ok_or_else(|| ApiError::Internal("the Host kind is not served".into()))?;
        let host = match self.registry.get(kind, "", node).await {
            Ok(h) => h,
            Err(e) if e.is_not_found() => {
                return Err(ApiError::ServiceUnavailable(format!(
                    "host {node} of VMI {name} is not registered"
                )));
            }
            Err(e) => return Err(e),
        };
        if !host_ready(&host) {
            return Err(ApiError::ServiceUnavailable(format!(
                "host {node} of VMI {name} is NotReady"
            )));
        }
        let addr = host_api_address(&host)
            .map_err(|why| ApiError::ServiceUnavailable(format!("host {node} {why}")))?;
        Ok(Target {
            host: node.to_string(),
            addr,
        })
    }

    async fn dial(&self, t: &Target) -> Result<Sender, ApiError> {
        let unreachable = |what: String| {
            ApiError::ServiceUnavailable(format!(
                "host {} ({}) is unreachable: {what}",
                t.host, t.addr
            ))
        };
        let name = rustls::pki_types::ServerName::try_from(t.host.clone())
            .map_err(|e| ApiError::Internal(format!("host name {:?}: {e}", t.host)))?;
        let tls = tokio::time::timeout(self.dial_timeout, async {
            let tcp = tokio::net::TcpStream::connect(t.addr)
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            self.tls
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))
        })
        .await
        .map_err(|_| unreachable(format!("no answer within {:?}", self.dial_timeout)))?
        .map_err(unreachable)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "host API connection ended");
            }
        });
        Ok(sender)
    }

    /// Send `method` to `op` of the VMI's uid on its host; non-2xx/101
    /// answers become API errors.
    async fn call(
        &self,
        vmi: &Value,
        method: Method,
        op: &str,
        upgrade: bool,
    ) -> Result<(Target, hyper::Response<hyper::body::Incoming>), ApiError> {
        let uid = str_at(vmi, "/metadata/uid");
        if !valid_uid(uid) {
            return Err(ApiError::Internal(format!(
                "VMI {} has no usable uid ({uid:?})",
                str_at(vmi, "/metadata/name")
            )));
        }
        let t = self.target(vmi).await?;
        let mut sender = self.dial(&t).await?;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{HOST_API_PREFIX}/{uid}/{op}"))
            .header(header::HOST, t.host.as_str());
        if upgrade {
            req = req
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, CONSOLE_UPGRADE);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let resp = tokio::time::timeout(self.call_timeout, sender.send_request(req))
            .await
            .map_err(|_| {
                ApiError::ServiceUnavailable(format!(
                    "host {} ({}) did not answer within {:?}",
                    t.host, t.addr, self.call_timeout
                ))
            })?
            .map_err(|e| {
                ApiError::ServiceUnavailable(format!("host {} ({}): {e}", t.host, t.addr))
            })?;
        let code = resp.status();
        if code.is_success() || code == StatusCode::SWITCHING_PROTOCOLS {
            return Ok((t, resp));
        }
        let body = tokio::time::timeout(self.call_timeout, resp.into_body().collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Err(remote_error(&t.host, vmi, code.as_u16(), &body))
    }
}

#[async_trait]
impl HostConnector for RemoteConnector {
    async fn pause(&self, vmi: &Value) -> Result<(), ApiError> {
        self.call(vmi, Method::POST, "pause", false).await.map(drop)
    }

    async fn unpause(&self, vmi: &Value) -> Result<(), ApiError> {
        self.call(vmi, Method::POST, "unpause", false)
            .await
            .map(drop)
    }

    async fn console(&self, vmi: &Value) -> Result<ConsoleStream, ApiError> {
        let (t, resp) = self.call(vmi, Method::GET, "console", true).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(ApiError::Internal(format!(
                "host {} answered {} instead of switching to the console",
                t.host,
                resp.status()
            )));
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ApiError::ServiceUnavailable(format!("host {} console: {e}", t.host)))?;
        Ok(Box::new(TokioIo::new(upgraded)))
    }

    async fn console_log(&self, vmi: &Value, follow: bool) -> Result<ByteStream, ApiError> {
        let op = format!("consolelog?follow={follow}");
        let (_, resp) = self.call(vmi, Method::GET, &op, false).await?;
        let stream = resp
            .into_body()
            .into_data_stream()
            .map(|r| r.map_err(std::io::Error::other));
        Ok(Box::pin(stream))
    }
}

/// `krvirt up` with joined agents: the VMIs of `local_node` through
/// `local` (in-process), all others through `remote`.
pub struct SplitConnector {
    local_node: String,
    local: Arc<dyn HostConnector>,
    remote: Arc<dyn HostConnector>,
}

impl SplitConnector {
    pub fn new(
        local_node: impl Into<String>,
        local: Arc<dyn HostConnector>,
        remote: Arc<dyn HostConnector>,
    ) -> Self {
        SplitConnector {
            local_node: local_node.into(),
            local,
            remote,
        }
    }

    /// The connector serving `vmi`: local when its `status.nodeName` is
    /// this host (or empty: the local agent answers "not running").
    pub fn route(&self, vmi: &Value) -> &dyn HostConnector {
        let node = str_at(vmi, "/status/nodeName");
        if node.is_empty() || node == self.local_node {
            self.local.as_ref()
        } else {
            self.remote.as_ref()
        }
    }
}

#[async_trait]
impl HostConnector for SplitConnector {
    async fn pause(&self, vmi: &Value) -> Result<(), ApiError> {
        self.route(vmi).pause(vmi).await
    }
    async fn unpause(&self, vmi: &Value) -> Result<(), ApiError> {
        self.route(vmi).unpause(vmi).await
    }
    async fn console(&self, vmi: &Value) -> Result<ConsoleStream, ApiError> {
        self.route(vmi).console(vmi).await
    }
    async fn console_log(&self, vmi: &Value, follow: bool) -> Result<ByteStream, ApiError> {
        self.route(vmi).console_log(vmi, follow).await
    }
}
