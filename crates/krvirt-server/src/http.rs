//! REST handlers: the Kubernetes-style routes for every served kind, watch
//! streams, discovery, subresources.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use futures::{SinkExt, StreamExt};
use krvirt_api::KindInfo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::connector::ConsoleStream;
use crate::lifecycle::{self, RestartOptions, StartOptions, StopOptions};
use crate::registry::{Preconditions, Subresource};
use crate::selector::Selector;
use crate::server::AppState;
use crate::{ApiError, openapi};

/// Largest accepted request body (Kubernetes' limit).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// Subresources group for a kind's group (`subresources.kubevirt.io`).
pub fn subresource_group(group: &str) -> String {
    format!("subresources.{group}")
}

/// URL prefix of a group/version: `/api/v1` for the core group, else
/// `/apis/{group}/{version}`.
pub fn group_version_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    }
}

/// How a subresource is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubresourceMethod {
    Put,
    Get,
    WebSocket,
}

/// The KubeVirt subresources this server implements for `kind`.
pub fn implemented_subresources(kind: &KindInfo) -> &'static [(&'static str, SubresourceMethod)] {
    use SubresourceMethod::*;
    match (kind.group, kind.kind) {
        ("kubevirt.io", "VirtualMachine") => &[("start", Put), ("stop", Put), ("restart", Put)],
        ("kubevirt.io", "VirtualMachineInstance") => &[
            ("pause", Put),
            ("unpause", Put),
            ("console", WebSocket),
            ("consolelog", Get),
        ],
        _ => &[],
    }
}

// ----- request context and content negotiation -----

/// Everything a handler needs besides the body.
struct Ctx {
    st: AppState,
    params: HashMap<String, String>,
    query: HashMap<String, String>,
    headers: HeaderMap,
}

impl FromRequestParts<AppState> for Ctx {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let params = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|p| p.0)
            .map_err(|e| ApiError::BadRequest(format!("invalid path: {e}")).into_response())?;
        let query = Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|q| q.0)
            .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")).into_response())?;
        Ok(Ctx {
            st: state.clone(),
            params,
            query,
            headers: parts.headers.clone(),
        })
    }
}

impl Ctx {
    fn ns(&self) -> &str {
        self.params
            .get("namespace")
            .map(String::as_str)
            .unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.params
            .get("name")
            .map(String::as_str)
            .unwrap_or_default()
    }

    fn q(&self, k: &str) -> Option<&str> {
        self.query.get(k).map(String::as_str)
    }

    fn yaml(&self) -> bool {
        wants_yaml(&self.headers)
    }

    fn ok(&self, code: StatusCode, v: &Value) -> Response {
        respond(code, v, self.yaml())
    }

    fn err(&self, e: ApiError) -> Response {
        error_response(&e, self.yaml())
    }
}

fn is_yaml_type(t: &str) -> bool {
    matches!(
        t,
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml"
    )
}

/// Whether the client prefers YAML (`Accept: application/yaml`).
fn wants_yaml(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    for item in accept.split(',') {
        let media = item.split(';').next().unwrap_or_default().trim();
        let media = media.to_ascii_lowercase();
        if is_yaml_type(&media) {
            return true;
        }
        if media == "application/json" || media == "*/*" || media == "application/*" {
            return false;
        }
    }
    false
}

fn respond(code: StatusCode, v: &Value, yaml: bool) -> Response {
    if yaml {
        match serde_saphyr::to_string(v) {
            Ok(s) => (code, [(header::CONTENT_TYPE, "application/yaml")], s).into_response(),
            Err(e) => ApiError::Internal(format!("cannot encode YAML: {e}")).into_response(),
        }
    } else {
        match serde_json::to_vec(v) {
            Ok(b) => (code, [(header::CONTENT_TYPE, "application/json")], b).into_response(),
            Err(e) => ApiError::Internal(format!("cannot encode JSON: {e}")).into_response(),
        }
    }
}

fn error_response(e: &ApiError, yaml: bool) -> Response {
    if e.code() >= 500 {
        tracing::warn!(code = e.code(), error = %e, "request failed");
    } else {
        tracing::debug!(code = e.code(), error = %e, "request refused");
    }
    let code = StatusCode::from_u16(e.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    respond(code, &e.to_status(), yaml)
}

async fn read_bytes(body: Body) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("cannot read body: {e}")))?;
        if buf.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ApiError::TooLarge(format!(
                "the request body is larger than the limit of {MAX_BODY_BYTES} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("the request body is not valid JSON: {e}")))
}

fn parse_yaml(bytes: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ApiError::BadRequest("the request body is not valid UTF-8".into()))?;
    let mut budget = serde_saphyr::Budget::default();
    // A manifest is a few thousand nodes; these bound the work an
    // adversarial body (alias bombs, deep nesting) can cause.
    budget.max_aliases = 1_000;
    budget.max_events = 100_000;
    budget.max_nodes = 100_000;
    budget.max_depth = 64;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    serde_saphyr::from_str_with_options::<Value>(text, options)
        .map_err(|e| ApiError::BadRequest(format!("the request body is not valid YAML: {e}")))
}

/// Parse a create/replace body: JSON (default) or YAML.
async fn object_body(headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    let ct = content_type(headers);
    let bytes = read_bytes(body).await?;
    if bytes.is_empty() {
        return Err(ApiError::BadRequest("the request body is empty".into()));
    }
    match ct.as_str() {
        "" | "application/json" => parse_json(&bytes),
        t if is_yaml_type(t) => parse_yaml(&bytes),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "the body media type {other:?} is not supported: use application/json or application/yaml"
        ))),
    }
}

/// Parse an optional options body (subresources, DeleteOptions).
async fn options_body<T: serde::de::DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let bytes = read_bytes(body).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let v = if is_yaml_type(&content_type(headers)) {
        parse_yaml(&bytes)?
    } else {
        parse_json(&bytes)?
    };
    serde_json::from_value(v).map_err(|e| ApiError::BadRequest(format!("invalid options: {e}")))
}

// ----- collection and object handlers -----

fn list_kind(kind: &KindInfo) -> String {
    format!("{}List", kind.kind)
}

async fn list_or_watch(kind: &'static KindInfo, c: Ctx) -> Response {
    let watch = matches!(c.q("watch"), Some("true") | Some("1"));
    let selector = match Selector::parse(c.q("labelSelector"), c.q("fieldSelector")) {
        Ok(s) => s,
        Err(e) => return c.err(e),
    };
    let ns = c.params.get("namespace").cloned();
    if watch {
        return watch_response(kind, c, ns, selector).await;
    }
    match c.st.registry.list(kind, ns.as_deref(), &selector).await {
        Ok((items, rv)) => c.ok(
            StatusCode::OK,
            &json!({
                "apiVersion": kind.api_version(),
                "kind": list_kind(kind),
                "metadata": {"resourceVersion": rv},
                "items": items,
            }),
        ),
        Err(e) => c.err(e),
    }
}

fn event_line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn error_event(e: &ApiError) -> Bytes {
    event_line(&json!({"type": "ERROR", "object": e.to_status()}))
}

async fn watch_response(
    kind: &'static KindInfo,
    c: Ctx,
    ns: Option<String>,
    selector: Selector,
) -> Response {
    let timeout = match c.q("timeoutSeconds").map(str::parse::<u64>) {
        None => None,
        Some(Ok(t)) => Some(Duration::from_secs(t)),
        Some(Err(_)) => {
            return c.err(ApiError::BadRequest(
                "timeoutSeconds must be a non-negative integer".into(),
            ));
        }
    };
    let rv = c.q("resourceVersion").map(str::to_string);
    let shutdown = c.st.shutdown.clone();
    let stream =
        c.st.registry
            .watch(kind, ns.as_deref(), selector, rv.as_deref())
            .await;
    let lines: futures::stream::BoxStream<'static, Bytes> = match stream {
        Err(e @ ApiError::BadRequest(_)) => return c.err(e),
        Err(e) => futures::stream::once(async move { error_event(&e) }).boxed(),
        Ok(events) => futures::stream::unfold((events, false), |(mut events, done)| async move {
            if done {
                return None;
            }
            match events.next().await {
                Some(Ok(ev)) => Some((
                    event_line(&json!({"type": ev.event_type.as_str(), "object": ev.object})),
                    (events, false),
                )),
                Some(Err(e)) => Some((error_event(&e), (events, true))),
                None => None,
            }
        })
        .boxed(),
    };
    let stop = async move {
        match timeout {
            Some(t) => {
                tokio::select! {
                    _ = tokio::time::sleep(t) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            None => shutdown.cancelled().await,
        }
    };
    let body = Body::from_stream(
        lines
            .take_until(Box::pin(stop))
            .map(Ok::<Bytes, std::io::Error>),
    );
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

async fn create(kind: &'static KindInfo, c: Ctx, body: Body) -> Response {
    let obj = match object_body(&c.headers, body).await {
        Ok(o) => o,
        Err(e) => return c.err(e),
    };
    match c.st.registry.create(kind, c.ns(), obj).await {
        Ok(v) => c.ok(StatusCode::CREATED, &v),
        Err(e) => c.err(e),
    }
}

async fn get_one(kind: &'static KindInfo, c: Ctx) -> Response {
    match c.st.registry.get(kind, c.ns(), c.name()).await {
        Ok(v) => c.ok(StatusCode::OK, &v),
        Err(e) => c.err(e),
    }
}

async fn replace(kind: &'static KindInfo, sub: Subresource, c: Ctx, body: Body) -> Response {
    let obj = match object_body(&c.headers, body).await {
        Ok(o) => o,
        Err(e) => return c.err(e),
    };
    let r = match sub {
        Subresource::Main => c.st.registry.replace(kind, c.ns(), c.name(), obj).await,
        Subresource::Status => {
            c.st.registry
                .replace_status(kind, c.ns(), c.name(), obj)
                .await
        }
    };
    match r {
        Ok(v) => c.ok(StatusCode::OK, &v),
        Err(e) => c.err(e),
    }
}

async fn patch(kind: &'static KindInfo, sub: Subresource, c: Ctx, body: Body) -> Response {
    let ct = content_type(&c.headers);
    if ct != "application/merge-patch+json" {
        return c.err(ApiError::UnsupportedMediaType(format!(
            "the patch media type {ct:?} is not supported: use application/merge-patch+json"
        )));
    }
    let patch = match read_bytes(body).await.and_then(|b| parse_json(&b)) {
        Ok(p) => p,
        Err(e) => return c.err(e),
    };
    match c
        .st
        .registry
        .merge_patch(kind, c.ns(), c.name(), &patch, sub)
        .await
    {
        Ok(v) => c.ok(StatusCode::OK, &v),
        Err(e) => c.err(e),
    }
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteOptions {
    #[serde(default)]
    preconditions: Option<DeletePreconditions>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeletePreconditions {
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
}

async fn delete(kind: &'static KindInfo, c: Ctx, body: Body) -> Response {
    let opts: DeleteOptions = match options_body(&c.headers, body).await {
        Ok(o) => o,
        Err(e) => return c.err(e),
    };
    let pre = opts
        .preconditions
        .map(|p| Preconditions {
            uid: p.uid,
            resource_version: p.resource_version,
        })
        .unwrap_or_default();
    // A Volume in use by a VM or a running VMI stays.
    if kind.group == "krvirt.io"
        && kind.plural == "volumes"
        && let Err(e) = crate::volume_guard::check_delete(&c.st.registry, c.ns(), c.name()).await
    {
        return c.err(e);
    }
    match c.st.registry.delete(kind, c.ns(), c.name(), &pre).await {
        Ok(out) => {
            let code = if out.deleted {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            c.ok(code, &out.object)
        }
        Err(e) => c.err(e),
    }
}

// ----- subresources -----

async fn lifecycle_verb(
    kind: &'static KindInfo,
    verb: &'static str,
    c: Ctx,
    body: Body,
) -> Response {
    let reg = &c.st.registry;
    let (ns, name) = (c.ns(), c.name());
    let r = match (kind.kind, verb) {
        ("VirtualMachine", "start") => match options_body::<StartOptions>(&c.headers, body).await {
            Ok(o) => lifecycle::start_vm(reg, ns, name, &o).await,
            Err(e) => Err(e),
        },
        ("VirtualMachine", "stop") => match options_body::<StopOptions>(&c.headers, body).await {
            Ok(o) => lifecycle::stop_vm(reg, ns, name, &o).await,
            Err(e) => Err(e),
        },
        ("VirtualMachine", "restart") => {
            match options_body::<RestartOptions>(&c.headers, body).await {
                Ok(o) => lifecycle::restart_vm(reg, ns, name, &o).await,
                Err(e) => Err(e),
            }
        }
        ("VirtualMachineInstance", "pause") => {
            lifecycle::pause_vmi(reg, c.st.connector.as_ref(), ns, name).await
        }
        ("VirtualMachineInstance", "unpause") => {
            lifecycle::unpause_vmi(reg, c.st.connector.as_ref(), ns, name).await
        }
        _ => Err(ApiError::RouteNotFound(format!(
            "subresource {verb} of {} is not implemented",
            kind.plural
        ))),
    };
    match r {
        Ok(()) if kind.kind == "VirtualMachine" => StatusCode::ACCEPTED.into_response(),
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => c.err(e),
    }
}

async fn console(
    c: Ctx,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return c.err(ApiError::BadRequest(format!(
                "the console is a WebSocket endpoint: {e}"
            )));
        }
    };
    let vmi = match lifecycle::console_target(&c.st.registry, c.ns(), c.name()).await {
        Ok(v) => v,
        Err(e) => return c.err(e),
    };
    let stream = match c.st.connector.console(&vmi).await {
        Ok(s) => s,
        Err(e) => return c.err(e),
    };
    let shutdown = c.st.shutdown.clone();
    let name = c.name().to_string();
    ws.protocols(["plain.kubevirt.io"])
        .on_upgrade(move |socket| async move {
            tracing::debug!(vmi = %name, "console session opened");
            pump_console(socket, stream, shutdown).await;
            tracing::debug!(vmi = %name, "console session closed");
        })
}

/// Copy bytes both ways between a WebSocket and a console until either
/// side closes (or the server shuts down).
async fn pump_console(socket: WebSocket, console: ConsoleStream, shutdown: CancellationToken) {
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (mut rd, mut wr) = tokio::io::split(console);
    let to_client = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = ws_tx.send(Message::Close(None)).await;
    };
    let from_client = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let data: Bytes = match msg {
                Message::Binary(b) => b,
                Message::Text(t) => Bytes::copy_from_slice(t.as_str().as_bytes()),
                Message::Close(_) => break,
                _ => continue,
            };
            if wr.write_all(&data).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::select! {
        _ = to_client => {}
        _ = from_client => {}
        _ = shutdown.cancelled() => {}
    }
}

async fn console_log(c: Ctx) -> Response {
    let follow = matches!(c.q("follow"), Some("true") | Some("1"));
    let vmi = match lifecycle::console_log_target(&c.st.registry, c.ns(), c.name()).await {
        Ok(v) => v,
        Err(e) => return c.err(e),
    };
    let stream = match c.st.connector.console_log(&vmi, follow).await {
        Ok(s) => s,
        Err(e) => return c.err(e),
    };
    let shutdown = c.st.shutdown.clone();
    let body =
        Body::from_stream(stream.take_until(Box::pin(async move { shutdown.cancelled().await })));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

// ----- fallbacks -----

async fn not_found() -> Response {
    ApiError::RouteNotFound("the server could not find the requested resource".into())
        .into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::MethodNotAllowed(
        "the server does not allow this method on the requested resource".into(),
    )
    .into_response()
}

fn mr() -> MethodRouter<AppState> {
    MethodRouter::new().fallback(method_not_allowed)
}

// ----- discovery -----

const OBJECT_VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];
const STATUS_VERBS: &[&str] = &["get", "patch", "update"];

fn resource_list(group: &str, version: &str, kinds: &[&'static KindInfo]) -> Value {
    let mut resources = Vec::new();
    for k in kinds {
        resources.push(json!({
            "name": k.plural,
            "singularName": k.singular,
            "namespaced": k.namespaced,
            "kind": k.kind,
            "verbs": OBJECT_VERBS,
            "shortNames": k.short_names,
        }));
        resources.push(json!({
            "name": format!("{}/status", k.plural),
            "singularName": "",
            "namespaced": k.namespaced,
            "kind": k.kind,
            "verbs": STATUS_VERBS,
        }));
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn subresource_list(group: &str, version: &str, kinds: &[&'static KindInfo]) -> Value {
    let mut resources = Vec::new();
    for k in kinds {
        for (sub, method) in implemented_subresources(k) {
            let verbs: &[&str] = match method {
                SubresourceMethod::Put => &["update"],
                SubresourceMethod::Get | SubresourceMethod::WebSocket => &["get"],
            };
            resources.push(json!({
                "name": format!("{}/{sub}", k.plural),
                "singularName": "",
                "namespaced": k.namespaced,
                "kind": "",
                "verbs": verbs,
            }));
        }
    }
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{group}/{version}"),
        "resources": resources,
    })
}

fn api_group(name: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    let preferred = vs.first().cloned().unwrap_or(Value::Null);
    json!({"name": name, "versions": vs, "preferredVersion": preferred})
}

fn static_json(v: Value) -> MethodRouter<AppState> {
    let v = Arc::new(v);
    mr().get(move |headers: HeaderMap| {
        let v = v.clone();
        async move { respond(StatusCode::OK, &v, wants_yaml(&headers)) }
    })
}

// ----- router -----

/// Build the router for every kind the state's registry serves.
pub(crate) fn build(state: AppState) -> Router {
    let kinds = state.registry.kinds();
    let mut router: Router<AppState> = Router::new();

    // group -> version -> kinds; subresource group -> version -> kinds
    let mut groups: BTreeMap<&str, BTreeMap<&str, Vec<&'static KindInfo>>> = BTreeMap::new();
    let mut sub_groups: BTreeMap<String, BTreeMap<&str, Vec<&'static KindInfo>>> = BTreeMap::new();

    let mut served = std::collections::HashSet::new();
    for kind in kinds {
        let k: &'static KindInfo = kind;
        if !served.insert((k.group, k.version, k.plural)) {
            tracing::warn!(
                group = k.group,
                version = k.version,
                plural = k.plural,
                "kind listed twice; serving the first"
            );
            continue;
        }
        groups
            .entry(k.group)
            .or_default()
            .entry(k.version)
            .or_default()
            .push(k);
        let base = group_version_path(k.group, k.version);
        let (coll, obj) = if k.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{}", k.plural),
                format!("{base}/namespaces/{{namespace}}/{}/{{name}}", k.plural),
            )
        } else {
            (
                format!("{base}/{}", k.plural),
                format!("{base}/{}/{{name}}", k.plural),
            )
        };
        let coll_router = mr()
            .get(move |c: Ctx| list_or_watch(k, c))
            .post(move |c: Ctx, b: Body| create(k, c, b));
        router = router.route(&coll, coll_router);
        if k.namespaced {
            router = router.route(
                &format!("{base}/{}", k.plural),
                mr().get(move |c: Ctx| list_or_watch(k, c)),
            );
        }
        router = router.route(
            &obj,
            mr().get(move |c: Ctx| get_one(k, c))
                .put(move |c: Ctx, b: Body| replace(k, Subresource::Main, c, b))
                .patch(move |c: Ctx, b: Body| patch(k, Subresource::Main, c, b))
                .delete(move |c: Ctx, b: Body| delete(k, c, b)),
        );
        router = router.route(
            &format!("{obj}/status"),
            mr().get(move |c: Ctx| get_one(k, c))
                .put(move |c: Ctx, b: Body| replace(k, Subresource::Status, c, b))
                .patch(move |c: Ctx, b: Body| patch(k, Subresource::Status, c, b)),
        );

        let subs = implemented_subresources(k);
        if !subs.is_empty() && !k.group.is_empty() {
            sub_groups
                .entry(subresource_group(k.group))
                .or_default()
                .entry(k.version)
                .or_default()
                .push(k);
            let sub_base = group_version_path(&subresource_group(k.group), k.version);
            let sub_obj = if k.namespaced {
                format!("{sub_base}/namespaces/{{namespace}}/{}/{{name}}", k.plural)
            } else {
                format!("{sub_base}/{}/{{name}}", k.plural)
            };
            for (sub, method) in subs {
                let sub: &'static str = sub;
                let path = format!("{sub_obj}/{sub}");
                let route = match method {
                    SubresourceMethod::Put => {
                        mr().put(move |c: Ctx, b: Body| lifecycle_verb(k, sub, c, b))
                    }
                    SubresourceMethod::Get => mr().get(console_log),
                    SubresourceMethod::WebSocket => mr().get(console),
                };
                router = router.route(&path, route);
            }
        }
    }

    // Discovery.
    let core_kinds: Vec<&'static KindInfo> = groups
        .get("")
        .and_then(|vs| vs.get("v1"))
        .cloned()
        .unwrap_or_default();
    router = router.route(
        "/api",
        static_json(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [],
        })),
    );
    router = router.route("/api/v1", static_json(resource_list("", "v1", &core_kinds)));
    let mut group_list = Vec::new();
    for (group, versions) in &groups {
        if group.is_empty() {
            continue;
        }
        let vnames: Vec<String> = versions.keys().map(|v| v.to_string()).collect();
        let g = api_group(group, &vnames);
        router = router.route(
            &format!("/apis/{group}"),
            static_json({
                let mut g = g.clone();
                if let Some(o) = g.as_object_mut() {
                    o.insert("kind".into(), json!("APIGroup"));
                    o.insert("apiVersion".into(), json!("v1"));
                }
                g
            }),
        );
        group_list.push(g);
        for (version, ks) in versions {
            router = router.route(
                &group_version_path(group, version),
                static_json(resource_list(group, version, ks)),
            );
        }
    }
    for (group, versions) in &sub_groups {
        let vnames: Vec<String> = versions.keys().map(|v| v.to_string()).collect();
        group_list.push(api_group(group, &vnames));
        for (version, ks) in versions {
            router = router.route(
                &group_version_path(group, version),
                static_json(subresource_list(group, version, ks)),
            );
        }
    }
    router = router.route(
        "/apis",
        static_json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": group_list})),
    );
    router = router.route(
        "/version",
        static_json(json!({
            "major": "0",
            "minor": "1",
            "gitVersion": format!("v{}", env!("CARGO_PKG_VERSION")),
            "gitCommit": "",
            "gitTreeState": "",
            "buildDate": "",
            "goVersion": "",
            "compiler": "rustc",
            "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
        })),
    );
    let doc = openapi::document(kinds);
    let doc_json = Arc::new(doc.to_json().unwrap_or_else(|_| "{}".into()));
    router = router.route(
        "/openapi/v3",
        mr().get(move || {
            let d = doc_json.clone();
            async move {
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    d.as_ref().clone(),
                )
            }
        }),
    );
    router = router.route("/healthz", mr().get(|| async { "ok" }));
    router = router.route(
        "/readyz",
        mr().get(
            |axum::extract::State(st): axum::extract::State<AppState>| async move {
                match st.registry.store().revision().await {
                    Ok(_) => (StatusCode::OK, "ok").into_response(),
                    Err(e) => ApiError::ServiceUnavailable(format!("store not ready: {e}"))
                        .into_response(),
                }
            },
        ),
    );
    router = router.route("/livez", mr().get(|| async { "ok" }));
    router = router.route("/metrics", mr().get(crate::metrics::handler));

    let audit = state.audit.clone();
    router
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            audit,
            crate::audit::layer,
        ))
        .layer(axum::middleware::from_fn(crate::metrics::track_http))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_bodies() {
        let v = parse_yaml(b"---\napiVersion: v1\nkind: X\nmetadata:\n  name: a\n").unwrap();
        assert_eq!(v["metadata"]["name"], "a");
        assert!(
            parse_yaml(b"a: 1\n---\nb: 2\n").is_err(),
            "one document per request"
        );
        assert_eq!(parse_yaml(b"a: [unclosed").unwrap_err().code(), 400);
        assert_eq!(parse_yaml(&[0xff, 0xfe]).unwrap_err().code(), 400);
        // alias expansion bomb: refused by the parser's budget, not expanded
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        let mut prev = 'a';
        for c in 'b'..='p' {
            bomb.push_str(&format!("{c}: &{c} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
            prev = c;
        }
        let started = std::time::Instant::now();
        let err = parse_yaml(bomb.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("budget"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(3));
    }

    #[test]
    fn accept_negotiation() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
            wants_yaml(&m)
        };
        assert!(h("application/yaml"));
        assert!(h("application/yaml, application/json"));
        assert!(!h("application/json, application/yaml"));
        assert!(!h(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
        assert!(!h("*/*"));
        assert!(!wants_yaml(&HeaderMap::new()));
    }
}
