//! Request ids and the hash-chained audit log of mutating requests.
//!
//! Every request gets an id (returned as `X-Request-Id`, and put in the
//! request's extensions as [`RequestId`]). Every mutating request (POST,
//! PUT, PATCH, DELETE) is appended to the audit log: who ([`Principal`],
//! a request extension the authentication layer fills; `anonymous` until
//! then), from where (peer address), verb, object, result code, request id.
//!
//! File format: one JSON line per record,
//! `{"hash":"<sha256 hex of the record text>","record":{…}}`, where the
//! record's `prev` is the previous record's `hash` (64 zeros for the first)
//! and `seq` counts from 1. Editing a byte changes the record's hash;
//! removing or reordering records breaks `seq` and `prev`; [`verify_file`]
//! names the first record that does not fit. (Truncating the newest
//! records cannot be detected from the file alone.)
//!
//! One writer thread appends in arrival order and fsyncs once per batch
//! (everything queued while the previous batch was written).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Response header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const LINE_PREFIX: &str = "{\"hash\":\"";
const LINE_MIDDLE: &str = "\",\"record\":";

/// The authenticated user of a request, as a request extension. The
/// authentication layer (outside the audit layer) inserts it; without one
/// the audit log says `anonymous`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal(pub String);

/// Where a request came from when it is not a TCP peer address (request
/// extension): `unix:uid=N` for the unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLabel(pub String);

/// The id of a request (request extension, `X-Request-Id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("the audit writer has stopped")]
    Closed,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AuditError {
    let context = context.into();
    move |source| AuditError::Io { context, source }
}

/// What a request did (the fields the caller knows).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// RFC 3339 with milliseconds, when the request arrived.
    pub time: String,
    pub request_id: String,
    pub user: String,
    /// Peer address (`ip:port`), `unknown` when not known.
    pub source: String,
    /// `create`, `update`, `patch`, `delete`, or a subresource verb (`start`).
    pub verb: String,
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subresource: String,
    /// HTTP status of the response.
    pub code: u16,
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    pub seq: u64,
    #[serde(flatten)]
    pub entry: AuditEntry,
    /// `hash` of the previous record.
    pub prev: String,
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Split a line into (hash, record text).
fn split_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix(LINE_PREFIX)?;
    let (hash, rest) = rest.split_at_checked(64)?;
    let body = rest.strip_prefix(LINE_MIDDLE)?.strip_suffix('}')?;
    Some((hash, body))
}

fn encode(record: &AuditRecord) -> Result<(String, String), AuditError> {
    let body = serde_json::to_string(record).map_err(|e| AuditError::Io {
        context: "encoding an audit record".into(),
        source: std::io::Error::other(e),
    })?;
    let hash = sha256_hex(body.as_bytes());
    Ok((format!("{LINE_PREFIX}{hash}{LINE_MIDDLE}{body}}}\n"), hash))
}

enum Msg {
    Entry(Box<AuditEntry>),
    Sync(tokio::sync::oneshot::Sender<()>),
}

/// Handle to an open audit log. Cheap to clone; the writer thread stops
/// when the last handle is dropped.
#[derive(Clone)]
pub struct AuditLog {
    tx: std::sync::mpsc::Sender<Msg>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish()
    }
}

/// Read the last complete record (seq, hash); cut a torn last line (a
/// crash during a write) off the file.
fn recover_tail(file: &mut File, path: &Path) -> Result<(u64, String), AuditError> {
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(io(format!("reading {}", path.display())))?;
    let complete = match text.rfind('\n') {
        Some(i) => i + 1,
        None => 0,
    };
    if complete < text.len() {
        file.set_len(complete as u64).map_err(io(format!(
            "truncating a torn record in {}",
            path.display()
        )))?;
    }
    let last = text[..complete]
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty());
    let Some(line) = last else {
        return Ok((0, GENESIS.to_string()));
    };
    let seq = split_line(line)
        .and_then(|(_, body)| serde_json::from_str::<AuditRecord>(body).ok())
        .map(|r| r.seq)
        .unwrap_or(0);
    let hash = split_line(line)
        .map(|(h, _)| h.to_string())
        .unwrap_or_else(|| sha256_hex(line.as_bytes()));
    Ok((seq, hash))
}

impl AuditLog {
    /// Open (or create) the log at `path` and start its writer thread.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io(format!("opening {}", path.display())))?;
        let (mut seq, mut prev) = recover_tail(&mut file, path)?;
        file.seek(SeekFrom::End(0))
            .map_err(io(format!("seeking {}", path.display())))?;
        let (tx, rx) = std::sync::mpsc::channel::<Msg>();
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("krvirt-audit".into())
            .spawn(move || {
                let mut waiters = Vec::new();
                let mut buf = String::new();
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while let Ok(m) = rx.try_recv() {
                        batch.push(m);
                    }
                    for m in batch {
                        match m {
                            Msg::Sync(w) => waiters.push(w),
                            Msg::Entry(entry) => {
                                let record = AuditRecord {
                                    seq: seq + 1,
                                    entry: *entry,
                                    prev: prev.clone(),
                                };
                                match encode(&record) {
                                    Ok((line, hash)) => {
                                        buf.push_str(&line);
                                        seq += 1;
                                        prev = hash;
                                    }
                                    Err(e) => tracing::error!(error = %e, "audit record lost"),
                                }
                            }
                        }
                    }
                    if !buf.is_empty() {
                        let r = file.write_all(buf.as_bytes()).and_then(|_| file.sync_data());
                        if let Err(e) = r {
                            tracing::error!(file = %shown, error = %e, "cannot write the audit log");
                        }
                        buf.clear();
                    }
                    for w in waiters.drain(..) {
                        let _ = w.send(());
                    }
                }
            })
            .map_err(io("starting the audit writer"))?;
        Ok(AuditLog {
            tx,
            path: Arc::new(path.to_path_buf()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queue a record (never blocks).
    pub fn append(&self, entry: AuditEntry) -> Result<(), AuditError> {
        self.tx
            .send(Msg::Entry(Box::new(entry)))
            .map_err(|_| AuditError::Closed)
    }

    /// Wait until everything appended so far is written and fsync'd.
    pub async fn sync(&self) -> Result<(), AuditError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Msg::Sync(tx))
            .map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)
    }
}

/// The first record that does not fit the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// 1-based line number in the file.
    pub line: usize,
    /// The record's `seq` when it could be read.
    pub seq: Option<u64>,
    pub problem: String,
}

/// Result of [`verify_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Records that verified (before the first bad one).
    pub valid: u64,
    pub first_bad: Option<BadRecord>,
}

/// Check every record of a log: its hash, its `seq` (1, 2, …) and its
/// `prev` (the previous record's hash).
pub fn verify_file(path: &Path) -> Result<Verification, AuditError> {
    let f = File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let mut prev = GENESIS.to_string();
    let mut expected_seq = 1u64;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io(format!("reading {}", path.display())))?;
        let bad = |seq: Option<u64>, problem: String| Verification {
            valid: expected_seq - 1,
            first_bad: Some(BadRecord {
                line: i + 1,
                seq,
                problem,
            }),
        };
        let Some((hash, body)) = split_line(&line) else {
            return Ok(bad(None, "not an audit record line".into()));
        };
        let record: AuditRecord = match serde_json::from_str(body) {
            Ok(r) => r,
            Err(e) => return Ok(bad(None, format!("record does not parse: {e}"))),
        };
        let seq = Some(record.seq);
        if sha256_hex(body.as_bytes()) != hash {
            return Ok(bad(
                seq,
                "the record's hash does not match its content (edited)".into(),
            ));
        }
        if record.seq != expected_seq {
            return Ok(bad(
                seq,
                format!(
                    "expected record {expected_seq} here, found {} (records removed or reordered)",
                    record.seq
                ),
            ));
        }
        if record.prev != prev {
            return Ok(bad(
                seq,
                "prev does not match the previous record's hash (records removed or reordered)"
                    .into(),
            ));
        }
        prev = hash.to_string();
        expected_seq += 1;
    }
    Ok(Verification {
        valid: expected_seq - 1,
        first_bad: None,
    })
}

/// Every record of a log that parses, in file order (no verification).
pub fn read_records(path: &Path) -> Result<Vec<AuditRecord>, AuditError> {
    let f = File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line.map_err(io(format!("reading {}", path.display())))?;
        if let Some(r) = split_line(&line).and_then(|(_, b)| serde_json::from_str(b).ok()) {
            out.push(r);
        }
    }
    Ok(out)
}

/// Object coordinates of a request path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathInfo {
    pub group: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub subresource: String,
}

/// Parse `/api/v1/…` and `/apis/{group}/{version}/…` paths.
pub fn parse_path(path: &str) -> PathInfo {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match segs.as_slice() {
        ["api", _v, rest @ ..] => rest,
        ["apis", g, _v, rest @ ..] => {
            let mut info = parse_rest(rest);
            info.group = g.to_string();
            return info;
        }
        _ => return PathInfo::default(),
    };
    parse_rest(rest)
}

fn parse_rest(rest: &[&str]) -> PathInfo {
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        _ => (String::new(), rest),
    };
    let s = |i: usize| rest.get(i).map(|s| s.to_string()).unwrap_or_default();
    PathInfo {
        group: String::new(),
        resource: s(0),
        namespace,
        name: s(1),
        subresource: s(2),
    }
}

fn verb(method: &Method, info: &PathInfo) -> String {
    if info.group.starts_with("subresources.") && !info.subresource.is_empty() {
        return info.subresource.clone();
    }
    match *method {
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "other",
    }
    .to_string()
}

/// Whether a method changes state.
pub fn is_mutating(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// Axum middleware: assign a request id, audit mutating requests.
pub async fn layer(
    State(audit): State<Option<AuditLog>>,
    mut req: Request,
    next: Next,
) -> Response {
    let id = uuid::Uuid::new_v4().to_string();
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let entry = (audit.is_some() && is_mutating(&method)).then(|| {
        let user = req
            .extensions()
            .get::<Principal>()
            .map(|p| p.0.clone())
            .unwrap_or_else(|| "anonymous".into());
        let source = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.to_string())
            .or_else(|| req.extensions().get::<PeerLabel>().map(|p| p.0.clone()))
            .unwrap_or_else(|| "unknown".into());
        entry_for(&method, req.uri().path(), user, source, &id)
    });
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    if let (Some(log), Some(mut entry)) = (audit, entry) {
        entry.code = resp.status().as_u16();
        if let Err(e) = log.append(entry) {
            tracing::error!(error = %e, request_id = %id, "audit record lost");
        }
    }
    resp
}

/// The record of a `method` request to `path` (its `code` still 0).
pub fn entry_for(
    method: &Method,
    path: &str,
    user: String,
    source: String,
    request_id: &str,
) -> AuditEntry {
    let info = parse_path(path);
    AuditEntry {
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        request_id: request_id.to_string(),
        user,
        source,
        verb: verb(method, &info),
        method: method.to_string(),
        path: path.to_string(),
        group: info.group,
        resource: info.resource,
        namespace: info.namespace,
        name: info.name,
        subresource: info.subresource,
        code: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let p = parse_path("/apis/kubevirt.io/v1/namespaces/default/virtualmachines/web/status");
        assert_eq!(
            p,
            PathInfo {
                group: "kubevirt.io".into(),
                resource: "virtualmachines".into(),
                namespace: "default".into(),
                name: "web".into(),
                subresource: "status".into()
            }
        );
        let p = parse_path("/api/v1/namespaces/default/events");
        assert_eq!((p.group.as_str(), p.resource.as_str()), ("", "events"));
        assert_eq!(p.namespace, "default");
        let p = parse_path("/apis/krvirt.io/v1/hosts/h1");
        assert_eq!((p.resource.as_str(), p.name.as_str()), ("hosts", "h1"));
        let p =
            parse_path("/apis/subresources.kubevirt.io/v1/namespaces/ns/virtualmachines/web/start");
        assert_eq!(verb(&Method::PUT, &p), "start");
        assert_eq!(parse_path("/healthz"), PathInfo::default());
    }
}
