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
