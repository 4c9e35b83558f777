//! The REST client: requests, URL layout and error mapping.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use krvirt_api::KindInfo;
use reqwest::{Method, RequestBuilder, Response, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{ClientError, ServerOrigin, Status, root_cause};
use crate::watch::{WatchDecoder, WatchStream};

/// `Result` with [`ClientError`].
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A stream of raw bytes (the serial console log).
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// The address of the local instance `krvirt up` serves.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8440";

/// Environment variable naming the server when `--server` is not given.
pub const SERVER_ENV: &str = "KRVIRT_SERVER";

/// API group of KubeVirt's subresources (`start`, `console`…).
pub const SUBRESOURCE_GROUP_PREFIX: &str = "subresources.";

const JSON: &str = "application/json";
const MERGE_PATCH: &str = "application/merge-patch+json";

/// What to list or watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListParams {
    /// `None`: every namespace. Ignored for cluster-scoped kinds.
    pub namespace: Option<String>,
    /// `?labelSelector=` (e.g. `app=web,tier!=db`).
    pub label_selector: Option<String>,
    /// `?fieldSelector=` (e.g. `metadata.name=vm1`).
    pub field_selector: Option<String>,
    /// `?resourceVersion=`: for a watch, the version to resume after.
    pub resource_version: Option<String>,
    /// `?timeoutSeconds=`: ask the server to end a watch after this long.
    pub timeout_seconds: Option<u64>,
}

impl ListParams {
    /// Objects of one namespace.
    pub fn namespaced(ns: impl Into<String>) -> Self {
        ListParams {
            namespace: Some(ns.into()),
            ..Default::default()
        }
    }

    /// Objects of every namespace (or a cluster-scoped kind).
    pub fn all_namespaces() -> Self {
        ListParams::default()
    }

    pub fn labels(mut self, selector: impl Into<String>) -> Self {
        self.label_selector = Some(selector.into());
        self
    }

    pub fn fields(mut self, selector: impl Into<String>) -> Self {
        self.field_selector = Some(selector.into());
        self
    }

    /// Only the object called `name` (`fieldSelector=metadata.name=NAME`).
    pub fn named(self, name: &str) -> Self {
        self.fields(format!("metadata.name={name}"))
    }

    pub fn at(mut self, resource_version: impl Into<String>) -> Self {
        self.resource_version = Some(resource_version.into());
        self
    }
}

/// A list response.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectList<T = Value> {
    /// The list's `metadata.resourceVersion` (the store revision it was read at).
    pub resource_version: String,
    pub items: Vec<T>,
}

/// `start` options (KubeVirt `StartOptions`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// Start the guest paused.
    pub paused: bool,
}

/// Which part of an object a merge patch targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchTarget {
    /// The object (spec, metadata).
    Main,
    /// The `/status` subresource.
    Status,
}

/// How to reach and authenticate to a server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Connection {
    /// `https://host:port`, `http://host:port`, or `unix:///path/krvirt.sock`
    /// (local administration: the server identifies the caller by its uid).
    pub server: String,
    /// PEM certificate(s) of the CA to trust for `https://` (else the
    /// system's roots).
    pub ca_pem: Option<String>,
    /// Bearer token (`krv_…`).
    pub token: Option<String>,
    /// PEM client certificate (agents' mTLS) and its private key.
    pub client_cert_pem: Option<String>,
    pub client_key_pem: Option<String>,
}

/// The transport-level parts of a client (how WebSockets connect).
#[derive(Debug, Clone, Default)]
pub(crate) struct Transport {
    pub(crate) unix: Option<std::path::PathBuf>,
    pub(crate) tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub(crate) token: Option<String>,
}

/// A handle on one krvirt API server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    origin: ServerOrigin,
    display: String,
    pub(crate) transport: Transport,
}

fn tls_error(server: &str, reason: impl std::fmt::Display) -> ClientError {
    ClientError::InvalidServer {
        url: server.to_string(),
        reason: reason.to_string(),
    }
}

/// A rustls client config trusting exactly `ca_pem` (with an optional
/// client certificate).
pub fn tls_config(
    server: &str,
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_error(server, format!("the CA certificate: {e}")))?;
    if certs.is_empty() {
        return Err(tls_error(server, "the CA file holds no certificate"));
    }
    for c in certs {
        roots
            .add(c)
            .map_err(|e| tls_error(server, format!("the CA certificate: {e}")))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(server, e))?
        .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| tls_error(server, format!("the client certificate: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                .map_err(|e| tls_error(server, format!("the client key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| tls_error(server, format!("the client certificate: {e}")))
        }
    }
}

impl Client {
    /// A client for the server at `base_url` (`http://host:port`, or just
    /// `host:port`).
    pub fn new(base_url: &str) -> Result<Client> {
        Client::with_origin(base_url, ServerOrigin::Explicit)
    }

    /// The server named by `server` (the `--server` flag), else the
    /// `KRVIRT_SERVER` environment variable, else [`DEFAULT_SERVER`].
    pub fn from_env(server: Option<String>) -> Result<Client> {
        let env = std::env::var(SERVER_ENV).ok();
        let (url, origin) = resolve_server(server, env);
        Client::with_origin(&url, origin)
    }

    fn with_origin(base_url: &str, origin: ServerOrigin) -> Result<Client> {
        Client::connect_from(
            &Connection {
                server: base_url.to_string(),
                ..Default::default()
            },
            origin,
        )
    }

    /// A client for `conn` (TLS with its CA, bearer token, client
    /// certificate, or a unix socket).
    pub fn connect(conn: &Connection) -> Result<Client> {
        Client::connect_from(conn, ServerOrigin::Explicit)
    }

    /// Like [`Client::connect`], saying where the server address came from.
    pub fn connect_from(conn: &Connection, origin: ServerOrigin) -> Result<Client> {
        let raw = conn.server.trim();
        let mut transport = Transport {
            token: conn.token.clone().filter(|t| !t.is_empty()),
            ..Default::default()
        };
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        let base = if let Some(path) = raw.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(tls_error(raw, "no socket path"));
            }
            let path = std::path::PathBuf::from(path);
            // No TLS over the socket: without this the builder still loads
            // and parses the system's CA store (~10 ms of every CLI call).
            builder = builder
                .unix_socket(path.clone())
                .tls_certs_only(std::iter::empty());
            transport.unix = Some(path);
            parse_base_url("http://localhost")?
        } else {
            let base = parse_base_url(raw)?;
            if base.scheme() == "https" && (conn.ca_pem.is_some() || conn.client_cert_pem.is_some())
            {
                let client = match (&conn.client_cert_pem, &conn.client_key_pem) {
                    (Some(c), Some(k)) => Some((c.as_str(), k.as_str())),
                    (None, None) => None,
                    _ => return Err(tls_error(raw, "a client certificate needs its key")),
                };
                let ca = conn
                    .ca_pem
                    .as_deref()
                    .ok_or_else(|| tls_error(raw, "a client certificate needs the CA"))?;
                let cfg = tls_config(raw, ca, client)?;
                builder = builder.tls_backend_preconfigured(cfg.clone());
                transport.tls = Some(std::sync::Arc::new(cfg));
            }
            base
        };
        if let Some(t) = &transport.token {
            let mut headers = reqwest::header::HeaderMap::new();
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|_| tls_error(raw, "the token holds characters a header cannot carry"))?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
            builder = builder.default_headers(headers);
        }
        let http = builder.build().map_err(|e| ClientError::InvalidServer {
            url: raw.to_string(),
            reason: format!("cannot build an HTTP client: {}", root_cause(&e)),
        })?;
        let display = match &transport.unix {
            Some(p) => format!("unix://{}", p.display()),
            None => base.as_str().trim_end_matches('/').to_string(),
        };
        Ok(Client {
            http,
            base,
            origin,
            display,
            transport,
        })
    }

    /// The server's base URL, as used (`unix:///…` for a unix socket).
    pub fn base_url(&self) -> &str {
        &self.display
    }

    /// The HTTP client, configured for this server (TLS, token, unix
    /// socket): for endpoints outside the object API (image uploads).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The base URL requests are made against (`http://localhost` when the
    /// transport is a unix socket).
    pub fn request_base(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// Where the server address came from.
    pub fn origin(&self) -> ServerOrigin {
        self.origin
    }

    // ----- URLs -----------------------------------------------------------

    fn url(&self, segments: &[&str]) -> Result<Url> {
        let mut url = self.base.clone();
        {
            let mut segs = url
                .path_segments_mut()
                .map_err(|()| ClientError::InvalidServer {
                    url: self.base.to_string(),
                    reason: "it cannot carry a path".into(),
                })?;
            segs.pop_if_empty();
            segs.extend(segments);
        }
        Ok(url)
    }

    fn group_prefix(kind: &KindInfo) -> Vec<&'static str> {
        if kind.group.is_empty() {
            vec!["api", kind.version]
        } else {
            vec!["apis", kind.group, kind.version]
        }
    }

    /// URL of a collection: `…/namespaces/{ns}/{plural}`, or `…/{plural}`
    /// for all namespaces or a cluster-scoped kind.
    pub fn collection_url(&self, kind: &KindInfo, namespace: Option<&str>) -> Result<Url> {
        let mut segs: Vec<&str> = Self::group_prefix(kind);
        if kind.namespaced
            && let Some(ns) = namespace
        {
            check_segment("namespace", ns)?;
            segs.push("namespaces");
            segs.push(ns);
        }
        segs.push(kind.plural);
        self.url(&segs)
    }

    /// URL of one object, optionally of its subresource (`status`).
    pub fn object_url(
        &self,
        kind: &KindInfo,
        namespace: &str,
        name: &str,
        subresource: Option<&str>,
    ) -> Result<Url> {
        check_segment("name", name)?;
        let mut segs: Vec<&str> = Self::group_prefix(kind);
        if kind.namespaced {
            check_segment("namespace", namespace)?;
            segs.push("namespaces");
            segs.push(namespace);
        }
        segs.push(kind.plural);
        segs.push(name);
        if let Some(sub) = subresource {
            check_segment("subresource", sub)?;
            segs.push(sub);
        }
        self.url(&segs)
    }

    /// URL of a KubeVirt-style subresource:
    /// `/apis/subresources.{group}/{version}/namespaces/{ns}/{plural}/{name}/{sub}`.
    pub fn subresource_url(
        &self,
        kind: &KindInfo,
        namespace: &str,
        name: &str,
        subresource: &str,
    ) -> Result<Url> {
        check_segment("name", name)?;
        check_segment("subresource", subresource)?;
        let group = format!("{SUBRESOURCE_GROUP_PREFIX}{}", kind.group);
        let mut segs: Vec<&str> = vec!["apis", &group, kind.version];
        if kind.namespaced {
            check_segment("namespace", namespace)?;
            segs.push("namespaces");
            segs.push(namespace);
        }
        segs.push(kind.plural);
        segs.push(name);
        segs.push(subresource);
        self.url(&segs)
    }

    // ----- transport ----------------------------------------------------

    fn unreachable(&self, e: &(dyn std::error::Error + 'static)) -> ClientError {
        ClientError::Unreachable {
            server: self.base_url().to_string(),
            origin: self.origin,
            cause: root_cause(e),
        }
    }

    /// Send a request; map connection failures and error statuses.
    async fn send(&self, req: RequestBuilder, context: &str) -> Result<Response> {
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                self.unreachable(&e)
            } else {
                ClientError::Transport {
                    context: context.to_string(),
                    source: e,
                }
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let code = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        Err(status_error(code, &body))
    }

    fn request(&self, method: Method, url: Url) -> RequestBuilder {
        self.http.request(method, url).header("Accept", JSON)
    }

    async fn json_request(
        &self,
        method: Method,
        url: Url,
        body: Option<(&Value, &str)>,
    ) -> Result<Value> {
        let context = format!("{method} {url}");
        let mut req = self.request(method, url);
        if let Some((body, content_type)) = body {
            let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Decode {
                context: format!("request body for {context}"),
                message: e.to_string(),
            })?;
            req = req.header("Content-Type", content_type).body(bytes);
        }
        let resp = self.send(req, &context).await?;
        let bytes = resp.bytes().await.map_err(|e| ClientError::Transport {
            context: context.clone(),
            source: e,
        })?;
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            context: format!("the response to {context}"),
            message: e.to_string(),
        })
    }

    // ----- objects --------------------------------------------------------

    /// GET one object.
    pub async fn get(&self, kind: &KindInfo, namespace: &str, name: &str) -> Result<Value> {
        let url = self.object_url(kind, namespace, name, None)?;
        self.json_request(Method::GET, url, None).await
    }

    /// GET one object as a typed value.
    pub async fn get_as<T: DeserializeOwned>(
        &self,
        kind: &KindInfo,
        namespace: &str,
        name: &str,
    ) -> Result<T> {
        let v = self.get(kind, namespace, name).await?;
        from_value(v, &format!("{} {namespace}/{name}", kind.kind))
    }

    /// GET one object's `/status`.
    pub async fn get_status(&self, kind: &KindInfo, namespace: &str, name: &str) -> Result<Value> {
        let url = self.object_url(kind, namespace, name, Some("status"))?;
        self.json_request(Method::GET, url, None).await
    }

    /// List objects.
    pub async fn list(&self, kind: &KindInfo, params: &ListParams) -> Result<ObjectList> {
        let mut url = self.collection_url(kind, params.namespace.as_deref())?;
        add_query(&mut url, params, false);
        let v = self.json_request(Method::GET, url, None).await?;
        parse_list(v, kind)
    }

    /// List objects as typed values.
    pub async fn list_as<T: DeserializeOwned>(
        &self,
        kind: &KindInfo,
        params: &ListParams,
    ) -> Result<ObjectList<T>> {
        let list = self.list(kind, params).await?;
        let mut items = Vec::with_capacity(list.items.len());
        for item in list.items {
            items.push(from_value(item, &format!("a {} list item", kind.kind))?);
        }
        Ok(ObjectList {
            resource_version: list.resource_version,
            items,
        })
    }

    /// POST a new object into `namespace`.
    pub async fn create(&self, kind: &KindInfo, namespace: &str, obj: &Value) -> Result<Value> {
        if kind.namespaced {
            check_segment("namespace", namespace)?;
        }
        let url = self.collection_url(kind, Some(namespace))?;
        self.json_request(Method::POST, url, Some((obj, JSON)))
            .await
    }

    /// PUT (replace) an object. `obj.metadata.resourceVersion`, when set, makes
    /// it a compare-and-swap (409 Conflict when stale).
    pub async fn replace(
        &self,
        kind: &KindInfo,
        namespace: &str,
        name: &str,
        obj: &Value,
    ) -> Result<Value> {
        let url = self.object_url(kind, namespace, name, None)?;
        self.json_request(Method::PUT, url, Some((obj, JSON))).await
    }

    /// PUT an object's `/status`.
    pub async fn replace_status(
        &self,
        kind: &KindInfo,
        namespace: &str,
        name: &str,
        obj: &Value,
    ) -> Result<Value> {
        let url = self.object_url(kind, namespace, name, Some("status"))?;
        self.json_request(Method::PUT, url, Some((obj, JSON))).await
    }

    /// Read-modify-write of an object's status with compare-and-swap: `f`
    /// gets the stored status (`S::default()` when there is none) and
    /// returns false to leave the object alone. A write conflict reads
    /// again (up to 20 times; then the conflict is the error). Returns
    /// whether a write happened; a missing object is `Ok(false)`.
    pub async fn modify_status<S, F>(
        &self,
        kind: &KindInfo,
        namespace: &str,
        name: &str,
        mut f: F,
    ) -> Result<bool>
    where
        S: DeserializeOwned + serde::Serialize + Default,
        F: FnMut(&mut S) -> bool,
    {
        let mut attempts = 0;
        loop {
            let obj = match self.get(kind, namespace, name).await {
                Ok(v) => v,
                Err(e) if e.code() == Some(404) => return Ok(false),
                Err(e) => return Err(e),
            };
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or(Value::Null);
            let mut st: S = match obj.get("status") {
                Some(v) if !v.is_null() => {
                    serde_json::from_value(v.clone()).map_err(|e| ClientError::Decode {
                        context: format!("the status of {} {namespace}/{name}", kind.kind),
                        message: e.to_string(),
                    })?
                }
                _ => S::default(),
            };
            if !f(&mut st) {
                return Ok(false);
            }
            let body = serde_json::json!({
                "apiVersion": kind.api_version(),
                "kind": kind.kind,
                "metadata": {"name": name, "namespace": namespace, "resourceVersion": rv},
                "status": st,
            });
            match self.replace_status(kind, namespace, name, &body).await {
                Ok(_) => return Ok(true),
                Err(e) if e.code() == Some(409) && attempts < 19 => attempts += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// PATCH with a JSON merge patch (RFC 7386) on the object or its status.
    pub async fn merge_patch(
        &self,
        kind: &KindInfo,
        namespace: &str,
        name: &str,
        patch: &Value,
        target: PatchTarget,
    ) -> Result<Value> {
        let sub = match target {
            PatchTarget::Main => None,
            PatchTarget::Status => Some("status"),
        };
        let url = self.object_url(kind, namespace, name, sub)?;
        self.json_request(Method::PATCH, url, Some((patch, MERGE_PATCH)))
            .await
    }

    /// DELETE an object. Returns what the server answered (the deleted
    /// object, or a `Success` Status).
    pub async fn delete(&self, kind: &KindInfo, namespace: &str, name: &str) -> Result<Value> {
        let url = self.object_url(kind, namespace, name, None)?;
        self.json_request(Method::DELETE, url, None).await
    }

    // ----- watch ------------------------------------------------------------

    /// Open a watch (`?watch=true`): a stream of [`crate::WatchEvent`]s
    /// decoded from newline-delimited JSON. Ends when the server closes the
    /// connection; a broken connection yields one `Err` and ends. See
    /// [`Client::watch_resumable`] for a stream that survives both.
    pub async fn watch(&self, kind: &KindInfo, params: &ListParams) -> Result<WatchStream> {
        let mut url = self.collection_url(kind, params.namespace.as_deref())?;
        add_query(&mut url, params, true);
        let context = format!("watch {url}");
        let resp = self.send(self.request(Method::GET, url), &context).await?;
        Ok(WatchDecoder::stream(resp.bytes_stream(), context))
    }

    // ----- subresources ---------------------------------------------------

    /// PUT a KubeVirt subresource (`start`, `stop`, `restart`, `pause`,
    /// `unpause`…) with an optional JSON body.
    pub async fn put_subresource(
        &self,
        kind: &KindInfo,
        namespace: &str,
        name: &str,
        subresource: &str,
        body: Option<&Value>,
    ) -> Result<()> {
        let url = self.subresource_url(kind, namespace, name, subresource)?;
        let context = format!("PUT {url}");
        let mut req = self.request(Method::PUT, url);
        if let Some(body) = body {
            let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Decode {
                context: format!("request body for {context}"),
                message: e.to_string(),
            })?;
            req = req.header("Content-Type", JSON).body(bytes);
        }
        self.send(req, &context).await?;
        Ok(())
    }

    /// Start a VirtualMachine.
    pub async fn start_vm(&self, namespace: &str, name: &str, opts: &StartOptions) -> Result<()> {
        let body = opts
            .paused
            .then(|| serde_json::json!({"kind": "StartOptions", "apiVersion": "subresources.kubevirt.io/v1", "paused": true}));
        self.put_subresource(&VM_KIND, namespace, name, "start", body.as_ref())
            .await
    }

    /// Stop a VirtualMachine; `grace_period` seconds for the guest to shut down.
    pub async fn stop_vm(
        &self,
        namespace: &str,
        name: &str,
        grace_period: Option<i64>,
    ) -> Result<()> {
        let body = grace_period.map(|g| {
            serde_json::json!({"kind": "StopOptions", "apiVersion": "subresources.kubevirt.io/v1", "gracePeriod": g})
        });
        self.put_subresource(&VM_KIND, namespace, name, "stop", body.as_ref())
            .await
    }

    /// Restart a VirtualMachine.
    pub async fn restart_vm(
        &self,
        namespace: &str,
        name: &str,
        grace_period: Option<i64>,
    ) -> Result<()> {
        let body = grace_period.map(|g| {
            serde_json::json!({"kind": "RestartOptions", "apiVersion": "subresources.kubevirt.io/v1", "gracePeriodSeconds": g})
        });
        self.put_subresource(&VM_KIND, namespace, name, "restart", body.as_ref())
            .await
    }

    /// Pause a VirtualMachineInstance.
    pub async fn pause_vmi(&self, namespace: &str, name: &str) -> Result<()> {
        self.put_subresource(&VMI_KIND, namespace, name, "pause", None)
            .await
    }

    /// Unpause a VirtualMachineInstance.
    pub async fn unpause_vmi(&self, namespace: &str, name: &str) -> Result<()> {
        self.put_subresource(&VMI_KIND, namespace, name, "unpause", None)
            .await
    }

    /// The serial console log of a VMI so far; with `follow`, keeps
    /// streaming until the server ends it.
    pub async fn console_log(
        &self,
        namespace: &str,
        name: &str,
        follow: bool,
    ) -> Result<ByteStream> {
        let mut url = self.subresource_url(&VMI_KIND, namespace, name, "consolelog")?;
        url.query_pairs_mut()
            .append_pair("follow", if follow { "true" } else { "false" });
        let context = format!("GET {url}");
        let resp = self
            .send(
                self.request(Method::GET, url).header("Accept", "*/*"),
                &context,
            )
            .await?;
        Ok(resp
            .bytes_stream()
            .map(move |r| {
                r.map_err(|e| ClientError::Transport {
                    context: context.clone(),
                    source: e,
                })
            })
            .boxed())
    }

    /// The `/version` document.
    pub async fn server_version(&self) -> Result<Value> {
        let url = self.url(&["version"])?;
        self.json_request(Method::GET, url, None).await
    }

    /// A WebSocket URL (`ws://` / `wss://`) for `url`.
    pub(crate) fn websocket_url(&self, mut url: Url) -> Result<Url> {
        let scheme = match url.scheme() {
            "http" => "ws",
            "https" => "wss",
            other => {
                return Err(ClientError::InvalidServer {
                    url: self.base_url().to_string(),
                    reason: format!("unsupported scheme {other:?}"),
                });
            }
        };
        url.set_scheme(scheme)
            .map_err(|()| ClientError::InvalidServer {
                url: self.base_url().to_string(),
                reason: "cannot form a WebSocket URL".into(),
            })?;
        Ok(url)
    }

    pub(crate) fn unreachable_error(&self, e: &(dyn std::error::Error + 'static)) -> ClientError {
        self.unreachable(e)
    }
}

/// KubeVirt's VirtualMachine, for the subresource helpers (URLs only).
pub(crate) const VM_KIND: KindInfo = KindInfo {
    group: "kubevirt.io",
    version: "v1",
    kind: "VirtualMachine",
    plural: "virtualmachines",
    singular: "virtualmachine",
    short_names: &["vm", "vms"],
    namespaced: true,
    subresources: &["start", "stop", "restart"],
    schema_name: "VirtualMachine",
};

/// KubeVirt's VirtualMachineInstance, for the subresource helpers (URLs only).
pub(crate) const VMI_KIND: KindInfo = KindInfo {
    group: "kubevirt.io",
    version: "v1",
    kind: "VirtualMachineInstance",
    plural: "virtualmachineinstances",
    singular: "virtualmachineinstance",
    short_names: &["vmi", "vmis"],
    namespaced: true,
    subresources: &["pause", "unpause", "console", "consolelog"],
    schema_name: "VirtualMachineInstance",
};

/// Server address precedence: flag, then environment, then the default.
pub fn resolve_server(flag: Option<String>, env: Option<String>) -> (String, ServerOrigin) {
    if let Some(s) = flag.filter(|s| !s.trim().is_empty()) {
        return (s, ServerOrigin::Flag);
    }
    if let Some(s) = env.filter(|s| !s.trim().is_empty()) {
        return (s, ServerOrigin::Env);
    }
    (DEFAULT_SERVER.to_string(), ServerOrigin::Default)
}

fn parse_base_url(raw: &str) -> Result<Url> {
    let trimmed = raw.trim();
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("http://{trimmed}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| ClientError::InvalidServer {
        url: raw.to_string(),
        reason: e.to_string(),
    })?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(ClientError::InvalidServer {
                url: raw.to_string(),
                reason: format!("scheme {other:?} is not http or https"),
            });
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ClientError::InvalidServer {
            url: raw.to_string(),
            reason: "no host".into(),
        });
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ClientError::InvalidServer {
            url: raw.to_string(),
            reason: "a server address cannot carry a query or fragment".into(),
        });
    }
    Ok(url)
}

fn check_segment(what: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(ClientError::InvalidArgument(format!(
            "{what} must not be empty"
        )));
    }
    if value == "." || value == ".." || value.contains('/') {
        return Err(ClientError::InvalidArgument(format!(
            "{what} {value:?} is not a valid path segment"
        )));
    }
    Ok(())
}

fn add_query(url: &mut Url, params: &ListParams, watch: bool) {
    let mut q = url.query_pairs_mut();
    if watch {
        q.append_pair("watch", "true");
    }
    if let Some(s) = &params.label_selector {
        q.append_pair("labelSelector", s);
    }
    if let Some(s) = &params.field_selector {
        q.append_pair("fieldSelector", s);
    }
    if let Some(rv) = &params.resource_version {
        q.append_pair("resourceVersion", rv);
    }
    if let Some(t) = params.timeout_seconds {
        q.append_pair("timeoutSeconds", &t.to_string());
    }
    drop(q);
    if url.query() == Some("") {
        url.set_query(None);
    }
}

/// An error response body → [`ClientError::Api`].
pub(crate) fn status_error(code: u16, body: &[u8]) -> ClientError {
    let status = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| Status::from_value(&v))
        .map(|mut s| {
            if s.code == 0 {
                s.code = code;
            }
            s
        })
        .unwrap_or_else(|| Status::synthesize(code, &String::from_utf8_lossy(body)));
    ClientError::Api(Box::new(status))
}

fn parse_list(v: Value, kind: &KindInfo) -> Result<ObjectList> {
    let resource_version = v
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let items = match v.get("items") {
        Some(Value::Array(items)) => items.clone(),
        Some(Value::Null) | None => Vec::new(),
        Some(_) => {
            return Err(ClientError::Decode {
                context: format!("a {} list", kind.kind),
                message: "`items` is not an array".into(),
            });
        }
    };
    Ok(ObjectList {
        resource_version,
        items,
    })
}

fn from_value<T: DeserializeOwned>(v: Value, what: &str) -> Result<T> {
    serde_json::from_value(v).map_err(|e| ClientError::Decode {
        context: what.to_string(),
        message: e.to_string(),
    })
}
