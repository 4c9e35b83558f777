//! The host API of a `krvirt agent`: what the API server needs from this
//! host for VMIs running here (pause, unpause, serial console, console
//! log), by VMI uid, over HTTPS with mutual TLS. The agent presents the
//! certificate it received when joining (DNS name = its host name) and
//! accepts only clients whose certificate the cluster CA signed for the
//! API server (`system:krvirt-server`): see
//! `krvirt_server::tls::host_api_server_config`. The server side is
//! `krvirt_server::remote::RemoteConnector`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use krvirt_agent::{Agent, AgentError};
use krvirt_server::ApiError;
use krvirt_server::remote::{CONSOLE_UPGRADE, HOST_API_PREFIX, valid_uid};
use krvirt_server::tls::TlsListener;
use serde_json::Value;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// Default port of the host API (KubeVirt's virt-handler console server
/// uses the same one).
pub const DEFAULT_PORT: u16 = 8186;

/// Bind the host API: `listen` when given, else `0.0.0.0:8186`, or, when
/// that port is taken (several agents in one network namespace), a port
/// the kernel picks (the Host advertises whichever it is).
pub async fn bind(listen: Option<SocketAddr>) -> Result<TcpListener> {
    if let Some(addr) = listen {
        return TcpListener::bind(addr)
            .await
            .with_context(|| format!("--host-api-listen {addr}"));
    }
    match TcpListener::bind(("0.0.0.0", DEFAULT_PORT)).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            warn!(
                port = DEFAULT_PORT,
                "the host API's default port is taken: using an ephemeral one"
            );
            TcpListener::bind(("0.0.0.0", 0))
                .await
                .context("binding the host API")
        }
        Err(e) => Err(e).context("binding the host API on 0.0.0.0:8186"),
    }
}

/// Was this host's certificate (`PKI_DIR/client.crt`) signed for serving
/// the host API as `node`?
pub fn can_serve(pki_dir: &Path, node: &str) -> Result<bool> {
    let p = pki_dir.join("client.crt");
    let pem = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(krvirt_server::tls::serves_host(&pem, node))
}

/// The TLS config of the host API from the agent's join directory
/// (`DATA/agent-pki`: `client.crt`, `client.key`, `ca.crt`).
pub fn tls_config(pki_dir: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let read = |n: &str| {
        let p = pki_dir.join(n);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    Ok(krvirt_server::tls::host_api_server_config(
        &read("ca.crt")?,
        &read("client.crt")?,
        &read("client.key")?,
    )?)
}

/// Serve the host API of `agent` on `listener` (until the process ends).
pub async fn serve(
    agent: Agent,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
) -> Result<()> {
    let addr = listener.local_addr()?;
    let tls = TlsListener::new(listener, tls)?;
    info!(%addr, "host API listening (mutual TLS, API server only)");
    axum::serve(tls, router(agent))
        .await
        .context("serving the host API")
}

fn router(agent: Agent) -> Router {
    Router::new()
        .route(
            &format!("{HOST_API_PREFIX}/{{uid}}/pause"),
            post(|s, u| pause(s, u, true)),
        )
        .route(
            &format!("{HOST_API_PREFIX}/{{uid}}/unpause"),
            post(|s, u| pause(s, u, false)),
        )
        .route(&format!("{HOST_API_PREFIX}/{{uid}}/console"), get(console))
        .route(
            &format!("{HOST_API_PREFIX}/{{uid}}/consolelog"),
            get(console_log),
        )
        .fallback(|| async {
            ApiError::RouteNotFound("the host API has no such route".into()).into_response()
        })
        .with_state(agent)
}

fn not_here(agent: &Agent, uid: &str) -> ApiError {
    ApiError::Conflict {
        group: "kubevirt.io".into(),
        resource: "virtualmachineinstances".into(),
        name: uid.to_string(),
        message: format!("the VMI is not running on host {}", agent.node_name()),
    }
}

fn agent_err(agent: &Agent, uid: &str, e: AgentError) -> Response {
    match e {
        AgentError::NotRunningHere(_) => not_here(agent, uid).into_response(),
        other => ApiError::Internal(other.to_string()).into_response(),
    }
}

/// The VMI reference of `uid` if it runs here, else the error answer.
fn running(agent: &Agent, uid: &str) -> Result<Value, ApiError> {
    if !valid_uid(uid) {
        return Err(ApiError::BadRequest(format!(
            "uid {uid:?} is not a VMI uid"
        )));
    }
    agent
        .running_vmi_ref(uid)
        .ok_or_else(|| not_here(agent, uid))
}

async fn pause(State(agent): State<Agent>, UrlPath(uid): UrlPath<String>, stop: bool) -> Response {
    let vmi = match running(&agent, &uid) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let r = if stop {
        agent.pause(&vmi).await
    } else {
        agent.unpause(&vmi).await
    };
    match r {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => agent_err(&agent, &uid, e),
    }
}

async fn console(
    State(agent): State<Agent>,
    UrlPath(uid): UrlPath<String>,
    mut req: Request,
) -> Response {
    let vmi = match running(&agent, &uid) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(CONSOLE_UPGRADE));
    let Some(on_upgrade) = req
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .filter(|_| wants)
    else {
        return ApiError::BadRequest(format!(
            "the console is an upgrade to {CONSOLE_UPGRADE} (Connection: Upgrade)"
        ))
        .into_response();
    };
    let mut serial = match agent.console(&vmi).await {
        Ok(s) => s,
        Err(e) => return agent_err(&agent, &uid, e),
    };
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                debug!(%uid, error = %e, "console upgrade failed");
                return;
            }
        };
        let mut io = TokioIo::new(upgraded);
        let r = tokio::io::copy_bidirectional(&mut io, &mut serial).await;
        debug!(%uid, result = ?r, "console session over the host API ended");
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, CONSOLE_UPGRADE)
        .body(Body::empty())
        .unwrap_or_else(|e| ApiError::Internal(e.to_string()).into_response())
}

#[derive(serde::Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: Option<String>,
}

async fn console_log(
    State(agent): State<Agent>,
    UrlPath(uid): UrlPath<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    if !valid_uid(&uid) {
        return ApiError::BadRequest(format!("uid {uid:?} is not a VMI uid")).into_response();
    }
    let follow = matches!(q.follow.as_deref(), Some("true") | Some("1"));
    // The log outlives the guest (until the run directory is removed): a
    // VMI that stopped here still has one.
    let vmi = agent
        .running_vmi_ref(&uid)
        .unwrap_or_else(|| serde_json::json!({"metadata": {"uid": uid, "name": uid}}));
    match agent.console_log(&vmi, follow) {
        Ok(s) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            Body::from_stream(s),
        )
            .into_response(),
        Err(e) => agent_err(&agent, &uid, e),
    }
}
