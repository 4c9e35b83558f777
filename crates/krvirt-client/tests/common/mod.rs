//! A tiny in-memory API server speaking krvirt's REST dialect, written for
//! testing the client's wire handling: Status bodies, chunked watch
//! streams, dropped watch connections, 410 Gone, WebSocket consoles.
//! It is deliberately small; the real server is tested in its own crate.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Option<Value>,
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    plural: String,
    kind: &'static str,
    object: Value,
}

/// Knobs and contents, all behind one lock.
#[derive(Default)]
pub struct Inner {
    objects: BTreeMap<(String, String, String), Value>,
    pub rv: u64,
    log: Vec<Event>,
    /// Watches from a resourceVersion below this get 410 Gone.
    pub compacted: u64,
    /// 410 as an `ERROR` event in a 200 stream (Kubernetes' way) instead of
    /// an HTTP 410 response.
    pub gone_as_event: bool,
    /// End every watch connection after this many events.
    pub drop_after: Option<usize>,
    /// End connections by breaking the body (true) or cleanly (false).
    pub abrupt: bool,
    /// Bytes per write of a watch line.
    pub chunk: usize,
    pub requests: Vec<Recorded>,
    /// Query strings of watch requests, in order.
    pub watch_queries: Vec<String>,
    /// Bytes the console received.
    pub console_received: Vec<u8>,
}

pub struct Shared {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
    kill: watch::Sender<u64>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Store an object (create or overwrite) as the server itself would;
    /// `notify`: tell open watches (false simulates changes a client
    /// misses while disconnected).
    pub fn put(&self, plural: &str, ns: &str, name: &str, mut obj: Value, notify: bool) -> u64 {
        let mut inner = self.lock();
        inner.rv += 1;
        let rv = inner.rv;
        let key = (plural.to_string(), ns.to_string(), name.to_string());
        let existed = inner.objects.contains_key(&key);
        set_meta(&mut obj, ns, name, rv);
        inner.objects.insert(key, obj.clone());
        let ev = Event {
            rv,
            plural: plural.to_string(),
            kind: if existed { "MODIFIED" } else { "ADDED" },
            object: obj,
        };
        inner.log.push(ev.clone());
        drop(inner);
        if notify {
            let _ = self.events.send(ev);
        }
        rv
    }

    pub fn remove(&self, plural: &str, ns: &str, name: &str, notify: bool) -> Option<u64> {
        let mut inner = self.lock();
        let mut obj =
            inner
                .objects
                .remove(&(plural.to_string(), ns.to_string(), name.to_string()))?;
        inner.rv += 1;
        let rv = inner.rv;
        set_meta(&mut obj, ns, name, rv);
        let ev = Event {
            rv,
            plural: plural.to_string(),
            kind: "DELETED",
            object: obj,
        };
        inner.log.push(ev.clone());
        drop(inner);
        if notify {
            let _ = self.events.send(ev);
        }
        Some(rv)
    }

    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(plural.to_string(), ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Break every open watch connection.
    pub fn kill_watches(&self) {
        self.kill.send_modify(|g| *g += 1);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    pub fn watch_queries(&self) -> Vec<String> {
        self.lock().watch_queries.clone()
    }
}

fn set_meta(obj: &mut Value, ns: &str, name: &str, rv: u64) {
    if !obj.is_object() {
        *obj = json!({});
    }
    let meta = obj
        .as_object_mut()
        .map(|o| o.entry("metadata").or_insert_with(|| json!({})));
    if let Some(Value::Object(m)) = meta {
        m.insert("name".into(), json!(name));
        if !ns.is_empty() {
            m.insert("namespace".into(), json!(ns));
        }
        m.insert("resourceVersion".into(), json!(rv.to_string()));
        m.entry("uid")
            .or_insert_with(|| json!(format!("uid-{name}-{rv}")));
    }
}

/// The running server; stops when dropped.
pub struct TestServer {
    pub url: String,
    pub addr: SocketAddr,
    pub state: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        let (events, _) = broadcast::channel(1024);
        let (kill, _) = watch::channel(0u64);
        let state = Arc::new(Shared {
            inner: Mutex::new(Inner {
                chunk: usize::MAX,
                ..Default::default()
            }),
            events,
            kill,
        });
        let app = Router::new()
            .route(
                "/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachineinstances/{name}/console",
                get(console),
            )
            .fallback(dispatch)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("test server: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("test server: local address");
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("test server: serve");
        });
        TestServer {
            url: format!("http://{addr}"),
            addr,
            state,
            task,
        }
    }
}

// ----- responses -----

fn status(code: u16, reason: &str, message: &str, causes: Vec<Value>) -> Response {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if !causes.is_empty() {
        s["details"] = json!({"causes": causes});
    }
    json_response(code, &s)
}

fn json_response(code: u16, v: &Value) -> Response {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn matches(obj: &Value, ns: Option<&str>, query: &str) -> bool {
    if let Some(ns) = ns
        && obj.pointer("/metadata/namespace").and_then(Value::as_str) != Some(ns)
    {
        return false;
    }
    if let Some(sel) = query_param(query, "labelSelector") {
        for req in sel.split(',').filter(|r| !r.is_empty()) {
            let Some((k, v)) = req.split_once('=') else {
                return false;
            };
            let have = obj
                .pointer("/metadata/labels")
                .and_then(|l| l.get(k))
                .and_then(Value::as_str);
            if have != Some(v) {
                return false;
            }
        }
    }
    if let Some(sel) = query_param(query, "fieldSelector")
        && let Some(name) = sel.strip_prefix("metadata.name=")
        && obj.pointer("/metadata/name").and_then(Value::as_str) != Some(name)
    {
        return false;
    }
    true
}

fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

// ----- dispatch -----

async fn dispatch(
    State(st): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let parsed_body: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) => return status(400, "BadRequest", &format!("body is not JSON: {e}"), vec![]),
        }
    };
    st.lock().requests.push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        content_type: content_type.clone(),
        body: parsed_body.clone(),
    });

    let segs: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    match segs.as_slice() {
        ["version"] => json_response(
            200,
            &json!({"major": "0", "minor": "1", "gitVersion": "v9.9.9-test"}),
        ),
        // A failure that is not a Status: plain text, as from a proxy.
        [.., "explode"] => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "boom: the disk is on fire\n",
        )
            .into_response(),
        [
            "apis",
            "subresources.kubevirt.io",
            "v1",
            "namespaces",
            ns,
            plural,
            name,
            action,
        ] => subresource(&st, &method, ns, plural, name, action, &query).await,
        ["apis", _, _, rest @ ..] | ["api", _, rest @ ..] => {
            let (ns, plural, name, sub) = match rest {
                ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
                ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
                ["namespaces", ns, plural, name, sub] => {
                    (Some(*ns), *plural, Some(*name), Some(*sub))
                }
                [plural] => (None, *plural, None, None),
                [plural, name] => (None, *plural, Some(*name), None),
                [plural, name, sub] => (None, *plural, Some(*name), Some(*sub)),
                _ => {
                    return status(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                        vec![],
                    );
                }
            };
            if !["virtualmachines", "virtualmachineinstances", "hosts"].contains(&plural) {
                // Like a bare router: 404 with an empty body.
                return StatusCode::NOT_FOUND.into_response();
            }
            match name {
                None => collection(&st, &method, ns, plural, &query, parsed_body).await,
                Some(name) => object(
                    &st,
                    &method,
                    ns.unwrap_or(""),
                    plural,
                    name,
                    sub,
                    &content_type,
                    parsed_body,
                ),
            }
        }
        // Like a bare router: 404 with an empty body.
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn collection(
    st: &Arc<Shared>,
    method: &Method,
    ns: Option<&str>,
    plural: &str,
    query: &str,
    body: Option<Value>,
) -> Response {
    if *method == Method::POST {
        let Some(ns) = ns else {
            return status(405, "MethodNotAllowed", "create needs a namespace", vec![]);
        };
        let obj = body.unwrap_or(Value::Null);
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let mut causes = Vec::new();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            causes.push(json!({"reason": "FieldValueInvalid", "message": format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters or '-'"), "field": "metadata.name"}));
        }
        if obj.pointer("/spec/bogus").is_some() {
            causes.push(json!({"reason": "FieldUnknown", "message": "unknown field \"bogus\"", "field": "spec.bogus"}));
        }
        if !causes.is_empty() {
            return status(
                422,
                "Invalid",
                &format!("VirtualMachine.kubevirt.io {name:?} is invalid"),
                causes,
            );
        }
        if st.get(plural, ns, &name).is_some() {
            return status(
                409,
                "AlreadyExists",
                &format!("{plural}.kubevirt.io {name:?} already exists"),
                vec![],
            );
        }
        st.put(plural, ns, &name, obj, true);
        let stored = st.get(plural, ns, &name).unwrap_or(Value::Null);
        return json_response(201, &stored);
    }
    if *method != Method::GET {
        return status(405, "MethodNotAllowed", "method not allowed", vec![]);
    }
    if query_param(query, "watch").as_deref() == Some("true") {
        return watch_stream(
            st,
            ns.map(str::to_string),
            plural.to_string(),
            query.to_string(),
        )
        .await;
    }
    let inner = st.lock();
    let items: Vec<Value> = inner
        .objects
        .iter()
        .filter(|((p, _, _), o)| p == plural && matches(o, ns, query))
        .map(|(_, o)| o.clone())
        .collect();
    json_response(
        200,
        &json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items}),
    )
}

#[allow(clippy::too_many_arguments)]
fn object(
    st: &Arc<Shared>,
    method: &Method,
    ns: &str,
    plural: &str,
    name: &str,
    sub: Option<&str>,
    content_type: &str,
    body: Option<Value>,
) -> Response {
    let not_found = || {
        status(
            404,
            "NotFound",
            &format!("{plural}.kubevirt.io {name:?} not found"),
            vec![],
        )
    };
    if sub.is_some_and(|s| s != "status") {
        return status(404, "NotFound", "no such subresource", vec![]);
    }
    let Some(current) = st.get(plural, ns, name) else {
        return not_found();
    };
    let status_only = sub == Some("status");
    match *method {
        Method::GET => json_response(200, &current),
        Method::DELETE => match st.remove(plural, ns, name, true) {
            Some(_) => json_response(200, &current),
            None => not_found(),
        },
        Method::PUT => {
            let body = body.unwrap_or(Value::Null);
            let want = body
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str);
            let have = current
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str);
            if want.is_some() && want != have {
                return status(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {plural}.kubevirt.io {name:?}: the object has been modified; please apply your changes to the latest version and try again"
                    ),
                    vec![],
                );
            }
            let mut next = if status_only {
                current.clone()
            } else {
                body.clone()
            };
            if status_only {
                next["status"] = body.get("status").cloned().unwrap_or(Value::Null);
            } else if let Some(s) = current.get("status") {
                next["status"] = s.clone();
            }
            st.put(plural, ns, name, next, true);
            json_response(200, &st.get(plural, ns, name).unwrap_or(Value::Null))
        }
        Method::PATCH => {
            if content_type != "application/merge-patch+json" {
                return status(
                    415,
                    "UnsupportedMediaType",
                    &format!("unsupported patch type {content_type:?}"),
                    vec![],
                );
            }
            let patch = body.unwrap_or(Value::Null);
            let mut next = current.clone();
            if status_only {
                merge(
                    &mut next["status"],
                    patch.get("status").unwrap_or(&Value::Null),
                );
            } else {
                merge(&mut next, &patch);
            }
            st.put(plural, ns, name, next, true);
            json_response(200, &st.get(plural, ns, name).unwrap_or(Value::Null))
        }
        _ => status(405, "MethodNotAllowed", "method not allowed", vec![]),
    }
}

async fn subresource(
    st: &Arc<Shared>,
    method: &Method,
    ns: &str,
    plural: &str,
    name: &str,
    action: &str,
    query: &str,
) -> Response {
    if st.get(plural, ns, name).is_none() {
        return status(
            404,
            "NotFound",
            &format!("{plural}.kubevirt.io {name:?} not found"),
            vec![],
        );
    }
    match (method.as_str(), action) {
        ("PUT", "start" | "stop" | "restart" | "pause" | "unpause") => {
            StatusCode::ACCEPTED.into_response()
        }
        ("GET", "consolelog") => {
            let follow = query_param(query, "follow").as_deref() == Some("true");
            let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
            tokio::spawn(async move {
                for piece in ["boot line 1\r\n", "boot ", "line 2\r\n"] {
                    if tx.send(Ok(Bytes::from(piece))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if follow {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = tx.send(Ok(Bytes::from("followed line 3\r\n"))).await;
                }
            });
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/plain")],
                Body::from_stream(receiver_stream(rx)),
            )
                .into_response()
        }
        _ => status(405, "MethodNotAllowed", "method not allowed", vec![]),
    }
}

fn receiver_stream<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

async fn watch_stream(
    st: &Arc<Shared>,
    ns: Option<String>,
    plural: String,
    query: String,
) -> Response {
    let from_param = query_param(&query, "resourceVersion").filter(|s| !s.is_empty());
    let mut events_rx = st.events.subscribe();
    let mut kill_rx = st.kill.subscribe();
    kill_rx.mark_unchanged();
    let (backlog, last_rv, gone, gone_as_event, drop_after, abrupt, chunk) = {
        let mut inner = st.lock();
        inner.watch_queries.push(query.clone());
        let from: u64 = match &from_param {
            Some(s) => match s.parse() {
                Ok(v) => v,
                Err(_) => return status(400, "BadRequest", "bad resourceVersion", vec![]),
            },
            None => inner.rv,
        };
        let gone = from_param.is_some() && from < inner.compacted;
        let backlog: Vec<Event> = inner
            .log
            .iter()
            .filter(|e| e.rv > from && e.plural == plural)
            .cloned()
            .collect();
        (
            backlog,
            inner.rv,
            gone,
            inner.gone_as_event,
            inner.drop_after,
            inner.abrupt,
            inner.chunk,
        )
    };
    let gone_status = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "too old resource version", "reason": "Gone", "code": 410,
    });
    if gone && !gone_as_event {
        return json_response(410, &gone_status);
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        let send_line = |v: Value| {
            let tx = tx.clone();
            async move {
                let mut line = v.to_string().into_bytes();
                line.push(b'\n');
                let step = chunk.max(1);
                for piece in line.chunks(step) {
                    if tx.send(Ok(Bytes::copy_from_slice(piece))).await.is_err() {
                        return false;
                    }
                    if step != usize::MAX && line.len() > step {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                true
            }
        };
        let end = |tx: mpsc::Sender<Result<Bytes, std::io::Error>>| async move {
            if abrupt {
                // Let what was written reach the client before the reset
                // (hyper drops unflushed data when a body fails).
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tx
                    .send(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "dropped by the test server",
                    )))
                    .await;
            }
        };
        if gone {
            send_line(json!({"type": "ERROR", "object": gone_status})).await;
            return;
        }
        let mut sent = 0usize;
        let selects = |e: &Event| matches(&e.object, ns.as_deref(), &query);
        for e in backlog.into_iter().filter(|e| selects(e)) {
            if drop_after.is_some_and(|n| sent >= n) {
                return end(tx).await;
            }
            if !send_line(json!({"type": e.kind, "object": e.object})).await {
                return;
            }
            sent += 1;
        }
        loop {
            if drop_after.is_some_and(|n| sent >= n) {
                return end(tx).await;
            }
            tokio::select! {
                r = events_rx.recv() => match r {
                    Ok(e) if e.rv > last_rv && e.plural == plural && selects(&e) => {
                        if !send_line(json!({"type": e.kind, "object": e.object})).await {
                            return;
                        }
                        sent += 1;
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                _ = kill_rx.changed() => return end(tx).await,
                _ = tx.closed() => return,
            }
        }
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(receiver_stream(rx)),
    )
        .into_response()
}

// ----- console -----

async fn console(
    State(st): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    ws: WebSocketUpgrade,
) -> Response {
    if st.get("virtualmachineinstances", &ns, &name).is_none() {
        return status(
            404,
            "NotFound",
            &format!("virtualmachineinstances.kubevirt.io {name:?} not found"),
            vec![],
        );
    }
    ws.on_upgrade(move |socket| console_session(st, socket))
}

async fn console_session(st: Arc<Shared>, mut socket: WebSocket) {
    if socket
        .send(Message::Binary(Bytes::from_static(b"login: ")))
        .await
        .is_err()
    {
        return;
    }
    // A ping the client must answer without surfacing it as data.
    let _ = socket.send(Message::Ping(Bytes::from_static(b"hb"))).await;
    while let Some(Ok(msg)) = socket.recv().await {
        let data = match msg {
            Message::Binary(b) => b.to_vec(),
            Message::Text(t) => t.as_str().as_bytes().to_vec(),
            Message::Close(_) => break,
            _ => continue,
        };
        st.lock().console_received.extend_from_slice(&data);
        if data == b"quit" {
            let _ = socket.send(Message::Close(None)).await;
            break;
        }
        let mut reply = b"echo:".to_vec();
        reply.extend_from_slice(&data);
        if socket
            .send(Message::Binary(Bytes::from(reply)))
            .await
            .is_err()
        {
            break;
        }
    }
}
