//! An asynchronous QMP (QEMU Machine Protocol) client.
//!
//! One [`QmpClient`] owns one connection to a QMP socket. It is cheap to
//! clone and every clone may issue commands concurrently: each command
//! carries a unique `id` and its reply is matched by that id. Asynchronous
//! events go to every [`QmpClient::subscribe_events`] receiver.
//!
//! Two tasks run per connection: a writer (so that a caller dropping its
//! future mid-write cannot leave half a command on the wire) and a reader
//! (replies and events). Both end when the connection closes or the last
//! clone of the client is dropped.
//!
//! A file descriptor can travel with a command as SCM_RIGHTS ancillary data
//! ([`QmpClient::execute_with_fd`]), as `getfd` and `add-fd` require.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Default time a command may take before [`QmpError::Timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time to wait for the greeting after connecting.
pub const DEFAULT_GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest QMP message accepted (replies such as `query-qmp-schema` are a
/// few hundred KiB).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Events buffered per subscriber before the oldest are dropped.
pub const EVENT_CAPACITY: usize = 256;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered the command with an `error` reply.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    /// The connection is closed (QEMU exited or closed the socket).
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP command {command} timed out after {after:?}")]
    Timeout { command: String, after: Duration },
}

/// The version QEMU announced in its greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QmpVersion {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
    /// Distribution package string, e.g. `Debian 1:7.2+dfsg-7`.
    pub package: String,
}

/// QEMU's greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpGreeting {
    pub version: QmpVersion,
    pub capabilities: Vec<String>,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `STOP`, `RESUME`, `SHUTDOWN`.
    pub event: String,
    /// The event's `data` member (`Null` if absent).
    pub data: Value,
    /// QEMU's timestamp: seconds and microseconds since the epoch.
    pub timestamp: (i64, i64),
}

/// Connection options.
#[derive(Debug, Clone, Copy)]
pub struct QmpOptions {
    pub command_timeout: Duration,
    pub greeting_timeout: Duration,
}

impl Default for QmpOptions {
    fn default() -> Self {
        QmpOptions {
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            greeting_timeout: DEFAULT_GREETING_TIMEOUT,
        }
    }
}

type Reply = Result<Value, QmpError>;

struct State {
    closed: bool,
    waiters: HashMap<u64, (String, oneshot::Sender<Reply>)>,
    /// Taken (dropped) when the connection closes, so receivers see `Closed`.
    events: Option<broadcast::Sender<QmpEvent>>,
}

struct Shared {
    state: Mutex<State>,
    closed_tx: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave State inconsistent
        // (every update is a single insert/remove), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self) {
        let waiters = {
            let mut st = self.lock();
            st.closed = true;
            st.events = None;
            std::mem::take(&mut st.waiters)
        };
        for (_, (_, tx)) in waiters {
            let _ = tx.send(Err(QmpError::Closed));
        }
        self.closed_tx.send_replace(true);
    }
}

struct Outgoing {
    bytes: Vec<u8>,
    fd: Option<OwnedFd>,
    done: oneshot::Sender<std::io::Result<()>>,
}

struct Inner {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Outgoing>,
    next_id: AtomicU64,
    greeting: QmpGreeting,
    command_timeout: Duration,
    reader: JoinHandle<()>,
    closed_rx: watch::Receiver<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A QMP connection. Clone it freely; the connection closes when the last
/// clone is dropped.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("greeting", &self.inner.greeting)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities
    /// (`qmp_capabilities`), with default timeouts.
    pub async fn connect(path: &Path) -> Result<QmpClient, QmpError> {
        Self::connect_with(path, QmpOptions::default()).await
    }

    /// [`QmpClient::connect`] with explicit options.
    pub async fn connect_with(path: &Path, opts: QmpOptions) -> Result<QmpClient, QmpError> {
        let stream = UnixStream::connect(path).await?;
        Self::from_stream(stream, opts).await
    }

    /// Runs the handshake on an already connected stream.
    pub async fn from_stream(stream: UnixStream, opts: QmpOptions) -> Result<QmpClient, QmpError> {
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut buf = Vec::new();
        let greeting =
            match tokio::time::timeout(opts.greeting_timeout, read_message(&mut reader, &mut buf))
                .await
            {
                Err(_) => {
                    return Err(QmpError::Timeout {
                        command: "(greeting)".into(),
                        after: opts.greeting_timeout,
                    });
                }
                Ok(Err(e)) => return Err(e),
                Ok(Ok(None)) => return Err(QmpError::Closed),
                Ok(Ok(Some(v))) => parse_greeting(&v)?,
            };

        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (closed_tx, closed_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                closed: false,
                waiters: HashMap::new(),
                events: Some(events),
            }),
            closed_tx,
        });
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(writer_task(write, rx, shared.clone()));
        let reader = tokio::spawn(reader_task(reader, shared.clone()));
        let client = QmpClient {
            inner: Arc::new(Inner {
                shared,
                tx,
                next_id: AtomicU64::new(1),
                greeting,
                command_timeout: opts.command_timeout,
                reader,
                closed_rx,
            }),
        };
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &QmpGreeting {
        &self.inner.greeting
    }

    /// Runs a command with the default timeout and returns its `return` value.
    pub async fn execute(&self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.send(command, args, None, self.inner.command_timeout)
            .await
    }

    /// Runs a command with an explicit timeout.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.send(command, args, None, timeout).await
    }

    /// Runs a command and passes `fd` (duplicated; the caller keeps its own)
    /// as SCM_RIGHTS ancillary data with it, for `getfd` / `add-fd`.
    pub async fn execute_with_fd(
        &self,
        command: &str,
        args: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        let fd = fd.try_clone_to_owned()?;
        self.send(command, args, Some(fd), self.inner.command_timeout)
            .await
    }

    /// A receiver of every event from now on. After the connection closes
    /// the receiver reports `RecvError::Closed`.
    pub fn subscribe_events(&self) -> broadcast::Receiver<QmpEvent> {
        match &self.inner.shared.lock().events {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        *self.inner.closed_rx.borrow()
    }

    /// Completes when the connection closes (for example because QEMU exited).
    pub async fn closed(&self) {
        let mut rx = self.inner.closed_rx.clone();
        // An error means the sender is gone, which only happens once closed.
        let _ = rx.wait_for(|c| *c).await;
    }

    async fn send(
        &self,
        command: &str,
        args: Option<Value>,
        fd: Option<OwnedFd>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(command.to_string()));
        if let Some(args) = args {
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), json!(id));
        let mut bytes = serde_json::to_vec(&Value::Object(msg))
            .map_err(|e| QmpError::Protocol(format!("cannot encode command: {e}")))?;
        bytes.push(b'\n');

        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut st = self.inner.shared.lock();
            if st.closed {
                return Err(QmpError::Closed);
            }
            st.waiters.insert(id, (command.to_string(), reply_tx));
        }
        // Removes the waiter however this future ends (error, timeout, drop).
        let _guard = WaiterGuard {
            shared: &self.inner.shared,
            id,
        };

        let fut = async {
            let (done_tx, done_rx) = oneshot::channel();
            self.inner
                .tx
                .send(Outgoing {
                    bytes,
                    fd,
                    done: done_tx,
                })
                .await
                .map_err(|_| QmpError::Closed)?;
            match done_rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(QmpError::Io(e)),
                Err(_) => return Err(QmpError::Closed),
            }
            match reply_rx.await {
                Ok(reply) => reply,
                Err(_) => Err(QmpError::Closed),
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(QmpError::Timeout {
                command: command.to_string(),
                after: timeout,
            }),
        }
    }
}

struct WaiterGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().waiters.remove(&self.id);
    }
}

async fn writer_task(mut w: OwnedWriteHalf, mut rx: mpsc::Receiver<Outgoing>, shared: Arc<Shared>) {
    while let Some(out) = rx.recv().await {
        let res = write_message(&mut w, &out.bytes, out.fd.as_ref()).await;
        let failed = res.is_err();
        let _ = out.done.send(res);
        if failed {
            shared.close();
            break;
        }
    }
}

async fn write_message(
    w: &mut OwnedWriteHalf,
    bytes: &[u8],
    fd: Option<&OwnedFd>,
) -> std::io::Result<()> {
    let mut offset = 0;
    if let Some(fd) = fd {
        let stream: &UnixStream = w.as_ref();
        let raw = [fd.as_raw_fd()];
        loop {
            stream.writable().await?;
            let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
                use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
                let iov = [IoSlice::new(bytes)];
                let cmsg = [ControlMessage::ScmRights(&raw)];
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &iov,
                    &cmsg,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) => {
                    offset = n;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
    w.write_all(&bytes[offset..]).await?;
    w.flush().await
}

async fn reader_task(mut r: BufReader<OwnedReadHalf>, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    loop {
        match read_message(&mut r, &mut buf).await {
            Ok(Some(msg)) => dispatch(&shared, msg),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "QMP connection failed");
                break;
            }
        }
    }
    shared.close();
}

fn dispatch(shared: &Shared, msg: Value) {
    let Value::Object(mut obj) = msg else {
        tracing::warn!("QMP: ignoring a message that is not an object");
        return;
    };
    if let Some(Value::String(event)) = obj.remove("event") {
        let data = obj.remove("data").unwrap_or(Value::Null);
        let ts = obj.get("timestamp");
        let field = |k: &str| {
            ts.and_then(|t| t.get(k))
                .and_then(Value::as_i64)
                .unwrap_or(0)
        };
        let ev = QmpEvent {
            event,
            data,
            timestamp: (field("seconds"), field("microseconds")),
        };
        if let Some(tx) = &shared.lock().events {
            // No subscriber is not an error.
            let _ = tx.send(ev);
        }
        return;
    }
    let Some(id) = obj.get("id").and_then(Value::as_u64) else {
        let text = Value::Object(obj).to_string();
        tracing::warn!(message = %text, "QMP: reply without a known id");
        return;
    };
    let Some((command, tx)) = shared.lock().waiters.remove(&id) else {
        // The caller gave up (timeout or dropped future).
        tracing::debug!(id, "QMP: reply for a command nobody waits for");
        return;
    };
    let reply = if let Some(ret) = obj.remove("return") {
        Ok(ret)
    } else if let Some(e) = obj.remove("error") {
        let s = |k: &str| {
            e.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Err(QmpError::Command {
            command,
            class: s("class"),
            desc: s("desc"),
        })
    } else {
        Err(QmpError::Protocol(format!(
            "reply without return or error: {}",
            Value::Object(obj)
        )))
    };
    let _ = tx.send(reply);
}

/// Reads one newline-terminated JSON message. `Ok(None)` at end of stream.
async fn read_message(
    r: &mut BufReader<OwnedReadHalf>,
    buf: &mut Vec<u8>,
) -> Result<Option<Value>, QmpError> {
    loop {
        buf.clear();
        loop {
            let avail = r.fill_buf().await?;
            if avail.is_empty() {
                return Ok(None);
            }
            let (take, done) = match avail.iter().position(|b| *b == b'\n') {
                Some(pos) => (pos + 1, true),
                None => (avail.len(), false),
            };
            buf.extend_from_slice(&avail[..take]);
            r.consume(take);
            if buf.len() > MAX_MESSAGE_BYTES {
                return Err(QmpError::Protocol(format!(
                    "message longer than {MAX_MESSAGE_BYTES} bytes"
                )));
            }
            if done {
                break;
            }
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(buf)
            .map(Some)
            .map_err(|e| QmpError::Protocol(format!("invalid JSON from QEMU: {e}")));
    }
}

fn parse_greeting(v: &Value) -> Result<QmpGreeting, QmpError> {
    let bad = || QmpError::Protocol(format!("unexpected greeting: {v}"));
    let qmp = v.get("QMP").ok_or_else(bad)?;
    let ver = qmp.get("version").ok_or_else(bad)?;
    let q = ver.get("qemu").ok_or_else(bad)?;
    let n = |k: &str| q.get(k).and_then(Value::as_u64).ok_or_else(bad);
    let version = QmpVersion {
        major: n("major")?,
        minor: n("minor")?,
        micro: n("micro")?,
        package: ver
            .get("package")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    };
    let capabilities = qmp
        .get("capabilities")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok(QmpGreeting {
        version,
        capabilities,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> QmpOptions {
        QmpOptions {
            command_timeout: Duration::from_secs(2),
            greeting_timeout: Duration::from_millis(300),
        }
    }

    // These drive the client against a scripted peer for the protocol
    // violations a real QEMU does not produce on demand; the real protocol
    // is covered by tests/lifecycle.rs.
    #[tokio::test]
    async fn handshake_failures_are_typed() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"{\"hello\": 1}\r\n").await.unwrap();
        assert!(matches!(
            QmpClient::from_stream(a, quick()).await,
            Err(QmpError::Protocol(_))
        ));

        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert!(matches!(
            QmpClient::from_stream(a, quick()).await,
            Err(QmpError::Closed)
        ));

        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(
            QmpClient::from_stream(a, quick()).await,
            Err(QmpError::Timeout { .. })
        ));

        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"not json\n").await.unwrap();
        assert!(matches!(
            QmpClient::from_stream(a, quick()).await,
            Err(QmpError::Protocol(_))
        ));
    }

    #[test]
    fn greeting_parsing() {
        let g = parse_greeting(
            &json!({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7},
            "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}),
        )
        .unwrap();
        assert_eq!(g.version.major, 7);
        assert_eq!(g.version.minor, 2);
        assert_eq!(g.version.micro, 22);
        assert_eq!(g.capabilities, vec!["oob".to_string()]);
        assert!(matches!(
            parse_greeting(&json!({"return": {}})),
            Err(QmpError::Protocol(_))
        ));
    }
}
