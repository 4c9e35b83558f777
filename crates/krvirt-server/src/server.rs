//! Server entry points: state, router, serve.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::audit::AuditLog;
use crate::connector::HostConnector;
use crate::registry::Registry;

/// Where and how the API server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub connector: Arc<dyn HostConnector>,
    /// Cancelled when the server shuts down: ends watch streams, console
    /// sessions and followed console logs.
    pub shutdown: CancellationToken,
    /// Extra scrape-time sources of `/metrics` (the in-process host agent).
    pub metrics_sources: Vec<Arc<dyn crate::metrics::MetricsSource>>,
    /// Where mutating requests are audited (none: not audited; request
    /// ids are returned either way).
    pub audit: Option<AuditLog>,
}

impl AppState {
    pub fn new(registry: Registry, connector: Arc<dyn HostConnector>) -> Self {
        AppState {
            registry,
            connector,
            shutdown: CancellationToken::new(),
            metrics_sources: Vec::new(),
            audit: None,
        }
    }

    /// Audit mutating requests to `log`.
    pub fn with_audit(mut self, log: AuditLog) -> Self {
        self.audit = Some(log);
        self
    }

    /// Add a scrape-time source to this server's `/metrics`.
    pub fn with_metrics_source(mut self, source: Arc<dyn crate::metrics::MetricsSource>) -> Self {
        self.metrics_sources.push(source);
        self
    }
}

/// The axum router serving every route for every kind of `state.registry`.
pub fn router(state: AppState) -> axum::Router {
    crate::http::build(state)
}

/// Serve on `listener` until `shutdown` completes; then open streams
/// (watches, consoles) are ended and in-flight requests drained.
pub async fn serve<F>(listener: TcpListener, state: AppState, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let token = state.shutdown.clone();
    let app = router(state);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "API server listening");
    }
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        token.cancel();
    })
    .await
}

/// Bind `config.listen` and [`serve`].
pub async fn run<F>(config: &ServerConfig, state: AppState, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(config.listen).await?;
    serve(listener, state, shutdown).await
}

/// The listeners of a server with authentication: TLS on TCP (network
/// clients: bearer tokens or client certificates) and a unix socket (local
/// administration: peer credentials).
#[derive(Default)]
pub struct Listeners {
    pub tls: Option<crate::tls::TlsListener>,
    pub unix: Option<tokio::net::UnixListener>,
    /// Plain HTTP (no TLS): only for benchmarks and tests of the auth-off path.
    pub plain: Option<TcpListener>,
}

/// Bind the unix socket at `path` (a stale socket file is replaced),
/// connectable by every local user: peer credentials decide who they are.
pub fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

async fn peer_addr(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::extract::ConnectInfo;
    if let Some(ConnectInfo(peer)) = req
        .extensions()
        .get::<ConnectInfo<crate::tls::Peer>>()
        .cloned()
        && let Some(addr) = peer.addr
    {
        req.extensions_mut().insert(ConnectInfo(addr));
    }
    next.run(req).await
}

/// Audits the mutating requests that authentication or authorisation
/// refused (they never reach the audit layer inside the router, which
/// marks every response it saw with a request id): user `unauthenticated`
/// for a 401, the refused user for a 403.
async fn audit_refused(
    axum::extract::State(audit): axum::extract::State<Option<crate::audit::AuditLog>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let Some(log) = audit.filter(|_| crate::audit::is_mutating(req.method())) else {
        return next.run(req).await;
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let source = match req
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::tls::Peer>>()
    {
        Some(axum::extract::ConnectInfo(p)) => match (p.addr, p.uid) {
            (Some(a), _) => a.to_string(),
            (None, Some(uid)) => format!("unix:uid={uid}"),
            (None, None) => "unknown".into(),
        },
        None => "unknown".into(),
    };
    let mut resp = next.run(req).await;
    if resp.headers().contains_key(crate::audit::REQUEST_ID_HEADER) {
        return resp;
    }
    let id = uuid::Uuid::new_v4().to_string();
    let user = match resp.extensions().get::<crate::audit::Principal>() {
        Some(p) => p.0.clone(),
        None => "unauthenticated".into(),
    };
    let mut entry = crate::audit::entry_for(&method, &path, user, source, &id);
    entry.code = resp.status().as_u16();
    if let Err(e) = log.append(entry) {
        tracing::error!(error = %e, request_id = %id, "audit record lost");
    }
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        resp.headers_mut()
            .insert(crate::audit::REQUEST_ID_HEADER, v);
    }
    resp
}

/// Serve the API (plus `extra` routes, under the same authentication) on
/// every listener of `listeners` until `shutdown` completes. `auth: None`
/// serves without authentication (benchmarks of the auth overhead only).
pub async fn serve_listeners<F>(
    listeners: Listeners,
    state: AppState,
    extra: axum::Router,
    auth: Option<Arc<crate::auth::Auth>>,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let token = state.shutdown.clone();
    let stop = CancellationToken::new();
    let audit = state.audit.clone();
    let mut app = router(state).merge(extra);
    app = match auth {
        Some(a) => app
            .layer(axum::middleware::from_fn_with_state(a, crate::auth::layer))
            .layer(axum::middleware::from_fn_with_state(audit, audit_refused)),
        None => app.layer(axum::middleware::from_fn(peer_addr)),
    };
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
            token.cancel();
        });
    }
    let mut tasks = Vec::new();
    let svc = || {
        app.clone()
            .into_make_service_with_connect_info::<crate::tls::Peer>()
    };
    if let Some(l) = listeners.tls {
        if let Ok(addr) = axum::serve::Listener::local_addr(&l) {
            tracing::info!(%addr, "API server listening (TLS)");
        }
        let s = axum::serve(l, svc()).with_graceful_shutdown(stop.clone().cancelled_owned());
        tasks.push(tokio::spawn(async move { s.await }));
    }
    if let Some(l) = listeners.unix {
        let s = axum::serve(l, svc()).with_graceful_shutdown(stop.clone().cancelled_owned());
        tasks.push(tokio::spawn(async move { s.await }));
    }
    if let Some(l) = listeners.plain {
        if let Ok(addr) = l.local_addr() {
            tracing::warn!(%addr, "API server listening WITHOUT TLS");
        }
        let s = axum::serve(l, svc()).with_graceful_shutdown(stop.clone().cancelled_owned());
        tasks.push(tokio::spawn(async move { s.await }));
    }
    let mut result = Ok(());
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(e) => result = Err(std::io::Error::other(e.to_string())),
        }
    }
    result
}
