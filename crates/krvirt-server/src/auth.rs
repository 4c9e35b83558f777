//! Authentication and authorisation of every request.
//!
//! Who (in this order):
//! - a unix socket peer (SO_PEERCRED): root or the server's own uid is the
//!   cluster admin (`system:admin`, group `system:masters`); any other uid
//!   is the user `system:uid:N` (bind it with RBAC to give it rights);
//! - a verified client certificate: its common name is the user;
//!   `system:host:NAME` is the host agent of NAME (group `system:hosts`);
//! - `Authorization: Bearer krv_<name>_<secret>`: the `krvirt.io/v1` Token
//!   `<name>`, whose `spec.secretHash` must be the SHA-256 of `<secret>`,
//!   not revoked, not expired.
//!
//! Anything else is 401, except the open paths: `/healthz`, `/livez`,
//! `/readyz`, `/version`, `/openapi/v3` and discovery (`/api`, `/apis`,
//! `/api/v1`, `/apis/{group}[/{version}]`), which describe the API but no
//! object.
//!
//! What: [`crate::rbac`] decides from the request's verb, group, resource,
//! namespace and name; host agents get a fixed role (read everything,
//! write only their own Host, their VMIs' status and events).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::ApiError;
use crate::audit::{PathInfo, Principal, parse_path};
use crate::rbac::{Attrs, Rbac};
use crate::registry::Registry;
use crate::tls::{HOST_CN_PREFIX, Peer};

/// Prefix of bearer tokens.
pub const TOKEN_PREFIX: &str = "krv_";
/// The cluster admin's user name (unix socket peers with the server's uid or root).
pub const ADMIN_USER: &str = "system:admin";
/// The group every cluster admin is in (RBAC is not consulted for it).
pub const ADMIN_GROUP: &str = "system:masters";
/// Group of host agents.
pub const HOSTS_GROUP: &str = "system:hosts";
/// Group of every authenticated user.
pub const AUTHENTICATED_GROUP: &str = "system:authenticated";

/// The authenticated user of a request (request extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

impl Identity {
    pub fn is_admin(&self) -> bool {
        self.groups.iter().any(|g| g == ADMIN_GROUP)
    }

    /// The host name of a host agent's identity.
    pub fn host(&self) -> Option<&str> {
        self.user.strip_prefix(HOST_CN_PREFIX)
    }
}

/// Fill `buf` with random bytes from the kernel.
pub fn random_bytes(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom writes at most `len` bytes into the buffer we own.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        }
    }
}

/// A new token: (object name, full token text, secret hash).
pub fn new_token() -> (String, String, String) {
    let mut id = [0u8; 6];
    let mut secret = [0u8; 32];
    random_bytes(&mut id);
    random_bytes(&mut secret);
    let name = format!("t{}", hex::encode(id));
    let secret = hex::encode(secret);
    let hash = hash_secret(&secret);
    (name.clone(), format!("{TOKEN_PREFIX}{name}_{secret}"), hash)
}

/// SHA-256 (hex) of a token secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Split `krv_<name>_<secret>`.
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (name, secret) = rest.split_once('_')?;
    (!name.is_empty() && !secret.is_empty()).then_some((name, secret))
}

/// Why a credential was refused (the 401 message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: send a bearer token (krvirt login) or a client certificate")]
    Missing,
    #[error("the bearer token is malformed")]
    Malformed,
    #[error("the bearer token is not known")]
    Unknown,
    #[error("the bearer token has been revoked")]
    Revoked,
    #[error("the bearer token expired at {0}")]
    Expired(String),
    #[error("a join token is only good for joining an agent")]
    JoinOnly,
    #[error("the join token has already been used")]
    Used,
    #[error("{0}")]
    Store(String),
}

/// Authentication and authorisation state of a server.
pub struct Auth {
    registry: Registry,
    admin_uid: u32,
    rbac: Arc<Rbac>,
    pki: Option<Arc<crate::tls::Pki>>,
    /// Token objects by name, as last read (a store read per request is
    /// most of the cost of authentication). Dropped when a token is written
    /// through this server (before the write is answered) or its watch
    /// reports a change, and after [`TOKEN_CACHE_TTL`] in any case.
    tokens: std::sync::RwLock<HashMap<String, (Value, Instant)>>,
    /// One lock per namespace with quotas: a quota check and the write it
    /// admits happen under it, so concurrent creates through this server
    /// cannot both pass a check that only one of them fits.
    quota_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Longest time a cached Token object is used without reading it again.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(10);

impl Auth {
    fn quota_lock(&self, namespace: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.quota_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(namespace.to_string()).or_default().clone()
    }

    /// `admin_uid`: unix socket peers with this uid (or root) are admins.
    pub fn new(registry: Registry, admin_uid: u32) -> Arc<Auth> {
        Arc::new(Auth {
            rbac: Arc::new(Rbac::new(registry.clone())),
            registry,
            admin_uid,
            pki: None,
            tokens: Default::default(),
            quota_locks: Default::default(),
        })
    }

    /// Also sign agents' client certificates (join) with this CA.
    pub fn with_pki(registry: Registry, admin_uid: u32, pki: Arc<crate::tls::Pki>) -> Arc<Auth> {
        Arc::new(Auth {
            rbac: Arc::new(Rbac::new(registry.clone())),
            registry,
            admin_uid,
            pki: Some(pki),
            tokens: Default::default(),
            quota_locks: Default::default(),
        })
    }

    pub fn rbac(&self) -> &Rbac {
        &self.rbac
    }

    /// Load the RBAC objects and keep them current until `shutdown`.
    pub async fn start(
        self: &Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<(), ApiError> {
        self.rbac.reload().await?;
        self.rbac.spawn_watch(shutdown.clone());
        let me = self.clone();
        let kind = Self::token_kind()?;
        tokio::spawn(async move {
            use futures::StreamExt;
            loop {
                if let Ok(mut events) = me
                    .registry
                    .watch(kind, None, crate::Selector::default(), None)
                    .await
                {
                    me.forget_tokens(None);
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            ev = events.next() => match ev {
                                Some(Ok(ev)) => me.forget_tokens(
                                    ev.object["metadata"]["name"].as_str(),
                                ),
                                Some(Err(_)) | None => break,
                            }
                        }
                    }
                }
                me.forget_tokens(None);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
        Ok(())
    }

    /// Drop a cached Token (all of them with `None`).
    pub fn forget_tokens(&self, name: Option<&str>) {
        let mut cache = match self.tokens.write() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        match name {
            Some(n) => {
                cache.remove(n);
            }
            None => cache.clear(),
        }
    }

    async fn token_object(&self, name: &str) -> Result<Value, AuthError> {
        if let Ok(cache) = self.tokens.read()
            && let Some((obj, at)) = cache.get(name)
            && at.elapsed() < TOKEN_CACHE_TTL
        {
            return Ok(obj.clone());
        }
        let kind = Self::token_kind().map_err(|e| AuthError::Store(e.to_string()))?;
        let obj = match self.registry.get(kind, "", name).await {
            Ok(o) => o,
            Err(ApiError::NotFound { .. }) => return Err(AuthError::Unknown),
            Err(e) => return Err(AuthError::Store(e.to_string())),
        };
        if let Ok(mut cache) = self.tokens.write() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(name.to_string(), (obj.clone(), Instant::now()));
        }
        Ok(obj)
    }

    fn token_kind() -> Result<&'static krvirt_api::KindInfo, ApiError> {
        krvirt_api::kinds()
            .iter()
            .find(|k| k.group == "krvirt.io" && k.kind == "Token")
            .ok_or_else(|| ApiError::Internal("Token kind not registered".into()))
    }

    /// Look a bearer token up; the Token object on success.
    pub async fn verify_token(&self, token: &str) -> Result<Value, AuthError> {
        let (name, secret) = parse_token(token).ok_or(AuthError::Malformed)?;
        let obj = self.token_object(name).await?;
        let spec = &obj["spec"];
        let stored = spec["secretHash"].as_str().unwrap_or_default();
        if !ct_eq(hash_secret(secret).as_bytes(), stored.as_bytes()) {
            return Err(AuthError::Unknown);
        }
        if spec["revoked"].as_bool() == Some(true) {
            return Err(AuthError::Revoked);
        }
        if let Some(exp) = spec["expires"].as_str() {
            match chrono::DateTime::parse_from_rfc3339(exp) {
                Ok(t) if t > chrono::Utc::now() => {}
                _ => return Err(AuthError::Expired(exp.to_string())),
            }
        }
        Ok(obj)
    }

    async fn identify(
        &self,
        peer: Option<&Peer>,
        authorization: Option<&str>,
    ) -> Result<Identity, AuthError> {
        if let Some(uid) = peer.and_then(|p| p.uid) {
            if uid == 0 || uid == self.admin_uid {
                return Ok(Identity {
                    user: ADMIN_USER.into(),
                    groups: vec![ADMIN_GROUP.into(), AUTHENTICATED_GROUP.into()],
                });
            }
            return Ok(Identity {
                user: format!("system:uid:{uid}"),
                groups: vec![AUTHENTICATED_GROUP.into()],
            });
        }
        if let Some(cn) = peer.and_then(|p| p.cert_cn.as_deref()) {
            let mut groups = vec![AUTHENTICATED_GROUP.to_string()];
            if cn.starts_with(HOST_CN_PREFIX) {
                groups.push(HOSTS_GROUP.into());
            }
            return Ok(Identity {
                user: cn.to_string(),
                groups,
            });
        }
        let Some(auth) = authorization else {
            return Err(AuthError::Missing);
        };
        let token = Some(auth)
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(AuthError::Malformed)?;
        let obj = self.verify_token(token).await?;
        if obj["spec"]["join"].as_bool() == Some(true) {
            return Err(AuthError::JoinOnly);
        }
        let mut groups: Vec<String> = obj["spec"]["groups"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|g| g.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        groups.push(AUTHENTICATED_GROUP.into());
        Ok(Identity {
            user: obj["spec"]["user"].as_str().unwrap_or_default().to_string(),
            groups,
        })
    }

    /// Sign an agent's certificate request with a join token: the token is
    /// marked used (once only), the certificate's CN is `system:host:NAME`.
    pub async fn join(
        &self,
        join_token: &str,
        host: &str,
        csr_pem: &str,
    ) -> Result<Value, Response> {
        let Some(pki) = &self.pki else {
            return Err(
                ApiError::BadRequest("this server has no CA (TLS is off)".into()).into_response(),
            );
        };
        if host.is_empty() || crate::auth::bad_host_name(host) {
            return Err(
                ApiError::BadRequest(format!("host {host:?}: must be a DNS label")).into_response(),
            );
        }
        if let Some((name, _)) = parse_token(join_token) {
            self.forget_tokens(Some(name));
        }
        let obj = self.verify_token(join_token).await.map_err(unauthorized)?;
        if obj["spec"]["join"].as_bool() != Some(true) {
            return Err(
                ApiError::Forbidden("this token is not a join token".into()).into_response()
            );
        }
        if obj["spec"]["used"].is_string() {
            return Err(unauthorized(AuthError::Used));
        }
        let kind = Self::token_kind().map_err(IntoResponse::into_response)?;
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        // Mark used with a compare-and-swap on the version read: two
        // concurrent joins cannot both succeed.
        let rv = obj["metadata"]["resourceVersion"].clone();
        let mut updated = obj.clone();
        updated["spec"]["used"] = json!(chrono::Utc::now().to_rfc3339());
        updated["metadata"]["resourceVersion"] = rv;
        self.registry
            .replace(kind, "", &name, updated)
            .await
            .map_err(|e| match e {
                ApiError::Conflict { .. } => unauthorized(AuthError::Used),
                e => e.into_response(),
            })?;
        let cert = pki
            .sign_host_csr(csr_pem, host)
            .map_err(|e| ApiError::BadRequest(e.to_string()).into_response())?;
        Ok(json!({"certificate": cert, "ca": pki.ca_cert_pem}))
    }
}

pub(crate) fn bad_host_name(h: &str) -> bool {
    h.len() > 63
        || !h
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Paths anyone may read: health, version, discovery, the OpenAPI document.
pub fn is_open_path(method: &Method, path: &str) -> bool {
    if *method != Method::GET && *method != Method::HEAD {
        return false;
    }
    if matches!(
        path,
        "/healthz" | "/livez" | "/readyz" | "/version" | "/openapi/v3" | "/api" | "/apis"
    ) {
        return true;
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    matches!(segs.as_slice(), ["api", _] | ["apis", _] | ["apis", _, _])
}

/// The join endpoint (authenticated by the join token in the body).
pub const JOIN_PATH: &str = "/apis/krvirt.io/v1/join";

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    let mut r = (code, axum::Json(body)).into_response();
    if code == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"krvirt\""),
        );
    }
    r
}

fn unauthorized(e: AuthError) -> Response {
    status(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        &format!("Unauthorized: {e}"),
    )
}

/// The RBAC attributes of a request.
pub fn request_attrs(method: &Method, path: &str, query: Option<&str>) -> Attrs {
    let info: PathInfo = parse_path(path);
    if info.resource.is_empty() {
        return Attrs {
            verb: match *method {
                Method::GET | Method::HEAD => "get",
                Method::POST => "create",
                Method::PUT => "update",
                Method::PATCH => "patch",
                Method::DELETE => "delete",
                _ => "other",
            }
            .into(),
            non_resource_path: Some(path.to_string()),
            ..Default::default()
        };
    }
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        Method::GET | Method::HEAD if info.name.is_empty() => {
            if watch {
                "watch"
            } else {
                "list"
            }
        }
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if info.name.is_empty() => "deletecollection",
        Method::DELETE => "delete",
        _ => "other",
    };
    let resource = if info.subresource.is_empty() {
        info.resource
    } else {
        format!("{}/{}", info.resource, info.subresource)
    };
    Attrs {
        verb: verb.into(),
        group: info.group,
        resource,
        namespace: info.namespace,
        name: info.name,
        non_resource_path: None,
    }
}

fn forbidden(id: &Identity, a: &Attrs) -> Response {
    let msg = match &a.non_resource_path {
        Some(p) => format!("forbidden: User {:?} cannot {} path {p:?}", id.user, a.verb),
        None => {
            let res = if a.group.is_empty() {
                a.resource.clone()
            } else {
                format!("{}.{}", a.resource, a.group)
            };
            let what = if a.name.is_empty() {
                res.clone()
            } else {
                format!("{res} {:?}", a.name)
            };
            let scope = if a.namespace.is_empty() {
                "at the cluster scope".to_string()
            } else {
                format!("in the namespace {:?}", a.namespace)
            };
            format!(
                "{what} is forbidden: User {:?} cannot {} resource {:?} in API group {:?} {scope}",
                id.user, a.verb, a.resource, a.group
            )
        }
    };
    let mut resp = status(StatusCode::FORBIDDEN, "Forbidden", &msg);
    // for the audit of refused requests (crate::server::audit_refused)
    resp.extensions_mut()
        .insert(crate::audit::Principal(id.user.clone()));
    resp
}

/// Axum middleware: authenticate, authorise, check the namespace exists
/// on create, enforce quotas; then put [`Principal`] and [`Identity`] in
/// the request's extensions.
pub async fn layer(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<Peer>>().cloned() {
        if let Some(addr) = peer.addr {
            req.extensions_mut().insert(ConnectInfo(addr));
        }
        if let Some(uid) = peer.uid {
            req.extensions_mut()
                .insert(crate::audit::PeerLabel(format!("unix:uid={uid}")));
        }
    }
    if is_open_path(&method, &path) {
        return next.run(req).await;
    }
    if path == JOIN_PATH && method == Method::POST {
        return join_handler(auth, req).await;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0.clone());
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("?").to_string());
    let id = match auth.identify(peer.as_ref(), authorization.as_deref()).await {
        Ok(id) => id,
        Err(e) => {
            tracing::debug!(%path, error = %e, "unauthenticated request");
            return unauthorized(e);
        }
    };
    let query = req.uri().query().map(str::to_string);
    let attrs = request_attrs(&method, &path, query.as_deref());
    let allowed = if id.is_admin() {
        true
    } else if let Some(host) = id.host() {
        host_allowed(&auth, host, &attrs).await
    } else {
        auth.rbac.allowed(&id, &attrs).await
    };
    if !allowed {
        return forbidden(&id, &attrs);
    }
    if attrs.verb == "create" && !attrs.namespace.is_empty() {
        match auth.rbac.namespace_exists(&attrs.namespace).await {
            Ok(true) => {}
            Ok(false) => {
                return ApiError::NotFound {
                    group: String::new(),
                    resource: "namespaces".into(),
                    name: attrs.namespace.clone(),
                }
                .into_response();
            }
            Err(e) => return e.into_response(),
        }
    }
    let mut quota_guard = None;
    if !attrs.namespace.is_empty()
        && crate::quota::applies(&attrs)
        && let Some(quotas) = auth.rbac.quotas(&attrs.namespace)
    {
        let lock = auth.quota_lock(&attrs.namespace);
        quota_guard = Some(lock.lock_owned().await);
        match crate::quota::admit(&auth.registry, &quotas, &attrs, req).await {
            Ok(r) => req = r,
            Err(resp) => return resp,
        }
    }
    req.extensions_mut().insert(Principal(id.user.clone()));
    req.extensions_mut().insert(id);
    let token_write = attrs.group == "krvirt.io"
        && attrs.resource.split('/').next() == Some("tokens")
        && !matches!(attrs.verb.as_str(), "get" | "list" | "watch");
    let resp = next.run(req).await;
    // the admitted write is stored (or refused): the next check sees it
    drop(quota_guard);
    if token_write {
        // before the client hears "revoked", this server forgets the token
        auth.forget_tokens((!attrs.name.is_empty()).then_some(attrs.name.as_str()));
    }
    resp
}

async fn join_handler(auth: Arc<Auth>, req: Request) -> Response {
    let body = match axum::body::to_bytes(req.into_body(), 64 * 1024).await {
        Ok(b) => b,
        Err(e) => return ApiError::BadRequest(format!("cannot read body: {e}")).into_response(),
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return ApiError::BadRequest(format!("the request body is not valid JSON: {e}"))
                .into_response();
        }
    };
    let field = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (token, host, csr) = (field("token"), field("host"), field("csr"));
    for (k, val) in [("token", &token), ("host", &host), ("csr", &csr)] {
        if val.is_empty() {
            return ApiError::BadRequest(format!("{k}: Required value")).into_response();
        }
    }
    match auth.join(&token, &host, &csr).await {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(r) => r,
    }
}

/// What a host agent (`system:host:NAME`) may do: read everything but
/// tokens and RBAC objects; write its own Host, the VMIs bound to it (or
/// migrating to it), events, the status of images, and the storage kinds
/// its agent works on (Volumes, snapshots, restores, clones; creating
/// StoragePools).
async fn host_allowed(auth: &Auth, host: &str, a: &Attrs) -> bool {
    if a.non_resource_path.is_some() {
        return false;
    }
    let secret = a.group == "rbac.authorization.k8s.io"
        || (a.group == "krvirt.io" && a.resource.starts_with("tokens"));
    if secret {
        return false;
    }
    if matches!(a.verb.as_str(), "get" | "list" | "watch") {
        return true;
    }
    let base = a.resource.split('/').next().unwrap_or_default();
    match (a.group.as_str(), base) {
        // registering: the name is in the body (admission checks it)
        ("krvirt.io", "hosts") => a.name == host || (a.verb == "create" && a.name.is_empty()),
        ("", "events") => true,
        ("kubevirt.io", "virtualmachineinstances") => {
            if a.verb == "create" || a.name.is_empty() {
                return false;
            }
            let Some(kind) = krvirt_api::find_kind("virtualmachineinstances") else {
                return false;
            };
            // ...and the VMIs migrating to it (the target reports its
            // address in status.migrationState).
            match auth.registry.get(kind, &a.namespace, &a.name).await {
                Ok(vmi) => {
                    vmi["status"]["nodeName"].as_str() == Some(host)
                        || vmi["status"]["migrationState"]["targetNode"].as_str() == Some(host)
                }
                Err(_) => false,
            }
        }
        ("krvirt.io", "images") => a.resource.ends_with("/status"),
        // The agent provisions Volumes (their `krvirt.io/volume-cleanup`
        // finalizer), and runs snapshots, restores and clones: it marks
        // the objects it works on, records a snapshot's content (the VM
        // definition), makes the snapshots and restores a clone implies,
        // and removes the ones a clone used. Never VMs: the VM-writing
        // part of a restore (a new VM, the memory resume mark) is the
        // restore controller's (krvirt-controller `restore`).
        ("krvirt.io", "volumes")
        | (
            "snapshot.kubevirt.io",
            "virtualmachinesnapshots" | "virtualmachinesnapshotcontents" | "virtualmachinerestores",
        )
        | ("clone.kubevirt.io", "virtualmachineclones") => true,
        // The host's default `dir` pool, made by the first agent.
        ("krvirt.io", "storagepools") => a.verb == "create",
        _ => false,
    }
}
