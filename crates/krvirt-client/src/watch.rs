//! Watch streams: newline-delimited JSON decoding and a resuming watcher.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use krvirt_api::KindInfo;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::client::{Client, ListParams, ObjectList, Result};
use crate::error::{ClientError, Status};

/// What happened to the object of a [`WatchEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum WatchEventKind {
    Added,
    Modified,
    Deleted,
    /// The object is a `Status` (e.g. 410 Gone: resourceVersion too old).
    Error,
    /// Only carries a new resourceVersion.
    Bookmark,
}

impl WatchEventKind {
    /// `ADDED`, `MODIFIED`…, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            WatchEventKind::Added => "ADDED",
            WatchEventKind::Modified => "MODIFIED",
            WatchEventKind::Deleted => "DELETED",
            WatchEventKind::Error => "ERROR",
            WatchEventKind::Bookmark => "BOOKMARK",
        }
    }
}

/// One line of a watch stream: `{"type": …, "object": …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub kind: WatchEventKind,
    pub object: Value,
}

impl WatchEvent {
    /// The object's `metadata.resourceVersion`, if any.
    pub fn resource_version(&self) -> Option<&str> {
        resource_version(&self.object)
    }

    /// For an `ERROR` event, the `Status` it carries.
    pub fn status(&self) -> Option<Status> {
        Status::from_value(&self.object)
    }
}

/// A stream of watch events.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent>> + Send>>;

/// Incremental decoder of newline-delimited watch JSON: feed it chunks as
/// they arrive (split anywhere, even inside a UTF-8 sequence) and it
/// returns the complete events.
#[derive(Debug, Default)]
pub struct WatchDecoder {
    buf: Vec<u8>,
    line: usize,
}

impl WatchDecoder {
    pub fn new() -> Self {
        WatchDecoder::default()
    }

    /// Add a chunk; returns every event completed by it, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Result<WatchEvent>> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            self.line += 1;
            if let Some(ev) = decode_line(&self.buf[start..end], self.line) {
                out.push(ev);
            }
            start = end + 1;
        }
        self.buf.drain(..start);
        out
    }

    /// The stream ended: decode a last line that had no newline.
    pub fn finish(&mut self) -> Option<Result<WatchEvent>> {
        let rest = std::mem::take(&mut self.buf);
        self.line += 1;
        decode_line(&rest, self.line)
    }

    /// Decode a byte stream into a [`WatchStream`].
    pub fn stream<S, E>(body: S, context: String) -> WatchStream
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send + 'static,
        E: Into<TransportError>,
    {
        struct State<S> {
            body: Pin<Box<S>>,
            decoder: WatchDecoder,
            pending: VecDeque<Result<WatchEvent>>,
            done: bool,
            context: String,
        }
        let state = State {
            body: Box::pin(body),
            decoder: WatchDecoder::new(),
            pending: VecDeque::new(),
            done: false,
            context,
        };
        futures::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(ev) = st.pending.pop_front() {
                    return Some((ev, st));
                }
                if st.done {
                    return None;
                }
                match st.body.next().await {
                    Some(Ok(chunk)) => st.pending.extend(st.decoder.feed(&chunk)),
                    Some(Err(e)) => {
                        st.done = true;
                        let err = match e.into() {
                            TransportError::Reqwest(source) => ClientError::Transport {
                                context: st.context.clone(),
                                source,
                            },
                            TransportError::Other(message) => ClientError::Decode {
                                context: st.context.clone(),
                                message,
                            },
                        };
                        st.pending.push_back(Err(err));
                    }
                    None => {
                        st.done = true;
                        if let Some(ev) = st.decoder.finish() {
                            st.pending.push_back(ev);
                        }
                    }
                }
            }
        })
        .boxed()
    }
}

/// A body stream's error, for [`WatchDecoder::stream`].
#[derive(Debug)]
pub enum TransportError {
    Reqwest(reqwest::Error),
    Other(String),
}

impl From<reqwest::Error> for TransportError {
    fn from(e: reqwest::Error) -> Self {
        TransportError::Reqwest(e)
    }
}

impl From<std::io::Error> for TransportError {
    fn from(e: std::io::Error) -> Self {
        TransportError::Other(e.to_string())
    }
}

fn decode_line(line: &[u8], number: usize) -> Option<Result<WatchEvent>> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(
        serde_json::from_slice::<WatchEvent>(line).map_err(|e| ClientError::Decode {
            context: format!("watch event on line {number}"),
            message: e.to_string(),
        }),
    )
}

pub(crate) fn resource_version(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn object_key(obj: &Value) -> (String, String) {
    let field = |f: &str| {
        obj.pointer(&format!("/metadata/{f}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (field("namespace"), field("name"))
}

/// How [`Client::watch_resumable`] behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeOptions {
    /// When the watch starts without a resourceVersion: list first and
    /// report every existing object as `ADDED` (like `kubectl get -w`).
    /// `false`: list silently and report only later changes.
    pub initial_list: bool,
    /// Consecutive failed attempts (connection refused, dropped at once…)
    /// after which the stream yields the last error and ends.
    pub max_consecutive_failures: u32,
    /// First reconnect delay; doubles per failure up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for ResumeOptions {
    fn default() -> Self {
        ResumeOptions {
            initial_list: true,
            max_consecutive_failures: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// A connection that lived this long counts as healthy when it ends.
const HEALTHY_CONNECTION: Duration = Duration::from_secs(1);

struct Resumable {
    client: Client,
    kind: KindInfo,
    params: ListParams,
    opts: ResumeOptions,
    rv: Option<String>,
    known: HashMap<(String, String), Value>,
    pending: VecDeque<Result<WatchEvent>>,
    stream: Option<(WatchStream, Instant)>,
    need_list: bool,
    /// The (re)list reports differences as events (false for a silent first list).
    report_list: bool,
    failures: u32,
    done: bool,
}

impl Resumable {
    fn is_transient(e: &ClientError) -> bool {
        match e {
            ClientError::Unreachable { .. }
            | ClientError::Transport { .. }
            | ClientError::Disconnected { .. } => true,
            ClientError::Api(s) => s.code >= 500 || s.code == 429,
            _ => false,
        }
    }

    /// Count a failure; `Some(err)` when the stream must give up.
    /// `mid_stream`: the failure happened on an established watch, where
    /// any error (even an undecodable line) is worth a resume.
    async fn fail(&mut self, e: ClientError, mid_stream: bool) -> Option<ClientError> {
        self.failures += 1;
        if !(mid_stream || Self::is_transient(&e))
            || self.failures >= self.opts.max_consecutive_failures
        {
            self.done = true;
            return Some(e);
        }
        tracing::debug!(error = %e, failures = self.failures, "watch: reconnecting");
        let factor = 1u32 << (self.failures - 1).min(16);
        let delay = self
            .opts
            .initial_backoff
            .saturating_mul(factor)
            .min(self.opts.max_backoff);
        tokio::time::sleep(delay).await;
        None
    }

    /// Apply a fresh list: report what changed since what we knew.
    fn relist(&mut self, list: ObjectList) {
        let mut seen = HashMap::with_capacity(list.items.len());
        for item in list.items {
            let key = object_key(&item);
            let kind = match self.known.get(&key) {
                None => Some(WatchEventKind::Added),
                Some(old) if resource_version(old) != resource_version(&item) => {
                    Some(WatchEventKind::Modified)
                }
                Some(_) => None,
            };
            if let Some(kind) = kind
                && self.report_list
            {
                self.pending.push_back(Ok(WatchEvent {
                    kind,
                    object: item.clone(),
                }));
            }
            seen.insert(key, item);
        }
        if self.report_list {
            let mut gone: Vec<_> = self
                .known
                .iter()
                .filter(|(k, _)| !seen.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            gone.sort_by(|a, b| a.0.cmp(&b.0));
            for (_, object) in gone {
                self.pending.push_back(Ok(WatchEvent {
                    kind: WatchEventKind::Deleted,
                    object,
                }));
            }
        }
        self.known = seen;
        self.rv = Some(list.resource_version).filter(|s| !s.is_empty());
        self.report_list = true;
    }

    async fn next(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            if self.done {
                return None;
            }
            if self.need_list {
                let mut params = self.params.clone();
                params.resource_version = None;
                match self.client.list(&self.kind, &params).await {
                    Ok(list) => {
                        self.need_list = false;
                        self.failures = 0;
                        self.relist(list);
                    }
                    Err(e) => {
                        if let Some(e) = self.fail(e, false).await {
                            return Some(Err(e));
                        }
                    }
                }
                continue;
            }
            let Some((stream, since)) = self.stream.as_mut() else {
                let mut params = self.params.clone();
                params.resource_version = self.rv.clone();
                match self.client.watch(&self.kind, &params).await {
                    Ok(s) => self.stream = Some((s, Instant::now())),
                    Err(e) if e.is_gone() => {
                        self.need_list = true;
                    }
                    Err(e) => {
                        if let Some(e) = self.fail(e, false).await {
                            return Some(Err(e));
                        }
                    }
                }
                continue;
            };
            let since = *since;
            match stream.next().await {
                Some(Ok(ev)) => {
                    self.failures = 0;
                    match ev.kind {
                        WatchEventKind::Error => {
                            self.stream = None;
                            let status = ev
                                .status()
                                .unwrap_or_else(|| Status::synthesize(500, &ev.object.to_string()));
                            if status.code == 410 || status.reason == "Gone" {
                                self.need_list = true;
                                continue;
                            }
                            let err = ClientError::Api(Box::new(status));
                            self.failures += 1;
                            if self.failures >= self.opts.max_consecutive_failures {
                                self.done = true;
                            }
                            return Some(Err(err));
                        }
                        WatchEventKind::Bookmark => {
                            if let Some(rv) = ev.resource_version() {
                                self.rv = Some(rv.to_string());
                            }
                        }
                        WatchEventKind::Added | WatchEventKind::Modified => {
                            if let Some(rv) = ev.resource_version() {
                                self.rv = Some(rv.to_string());
                            }
                            self.known.insert(object_key(&ev.object), ev.object.clone());
                            return Some(Ok(ev));
                        }
                        WatchEventKind::Deleted => {
                            if let Some(rv) = ev.resource_version() {
                                self.rv = Some(rv.to_string());
                            }
                            self.known.remove(&object_key(&ev.object));
                            return Some(Ok(ev));
                        }
                    }
                }
                Some(Err(e)) => {
                    // A dropped connection or a garbled line: resume from
                    // the last version seen.
                    self.stream = None;
                    if since.elapsed() >= HEALTHY_CONNECTION {
                        self.failures = 0;
                    }
                    if let Some(e) = self.fail(e, true).await {
                        return Some(Err(e));
                    }
                }
                None => {
                    // The server closed the watch (timeout, restart): resume.
                    self.stream = None;
                    if since.elapsed() >= HEALTHY_CONNECTION {
                        self.failures = 0;
                    } else {
                        let e = ClientError::Disconnected {
                            context: format!("watch of {}", self.kind.plural),
                        };
                        if let Some(e) = self.fail(e, true).await {
                            return Some(Err(e));
                        }
                    }
                }
            }
        }
    }
}

impl Client {
    /// A watch that survives dropped connections: it reconnects from the
    /// last resourceVersion it saw, and when the server answers 410 Gone
    /// (that version was compacted away) it lists again and reports the
    /// difference (`ADDED`/`MODIFIED`/`DELETED`) before watching on.
    ///
    /// Without `params.resource_version` it starts with a list (reported as
    /// `ADDED` events when `opts.initial_list`). Errors are yielded as
    /// items; the stream ends after a non-transient error or
    /// `opts.max_consecutive_failures` failed attempts in a row.
    pub fn watch_resumable(
        &self,
        kind: &KindInfo,
        params: &ListParams,
        opts: ResumeOptions,
    ) -> WatchStream {
        let start_rv = params.resource_version.clone();
        let state = Resumable {
            client: self.clone(),
            kind: *kind,
            params: params.clone(),
            need_list: start_rv.is_none(),
            report_list: opts.initial_list,
            opts,
            rv: start_rv,
            known: HashMap::new(),
            pending: VecDeque::new(),
            stream: None,
            failures: 0,
            done: false,
        };
        futures::stream::unfold(state, |mut st| async move {
            let ev = st.next().await?;
            Some((ev, st))
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = concat!(
        r#"{"type":"ADDED","object":{"metadata":{"name":"ä","resourceVersion":"1"}}}"#,
        "\n",
        r#"{"type":"DELETED","object":{"metadata":{"name":"b","resourceVersion":"2"}}}"#,
        "\n"
    );

    fn names(evs: &[Result<WatchEvent>]) -> Vec<(WatchEventKind, String)> {
        evs.iter()
            .map(|e| {
                let e = e.as_ref().expect("decoded");
                (
                    e.kind,
                    e.object["metadata"]["name"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn decodes_every_split_point() {
        let bytes = TWO.as_bytes();
        for cut in 0..=bytes.len() {
            let mut d = WatchDecoder::new();
            let mut evs = d.feed(&bytes[..cut]);
            evs.extend(d.feed(&bytes[cut..]));
            assert!(d.finish().is_none(), "cut at {cut}");
            assert_eq!(
                names(&evs),
                vec![
                    (WatchEventKind::Added, "ä".to_string()),
                    (WatchEventKind::Deleted, "b".to_string())
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn byte_at_a_time_with_crlf_and_blank_lines() {
        let text = TWO.replace('\n', "\r\n\n");
        let mut d = WatchDecoder::new();
        let mut evs = Vec::new();
        for b in text.as_bytes() {
            evs.extend(d.feed(std::slice::from_ref(b)));
        }
        assert_eq!(evs.len(), 2);
        assert_eq!(
            evs[1].as_ref().map(|e| e.resource_version()).ok().flatten(),
            Some("2")
        );
    }

    #[test]
    fn last_line_without_newline_is_decoded_at_the_end() {
        let mut d = WatchDecoder::new();
        let line = r#"{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"9"}}}"#;
        assert!(d.feed(line.as_bytes()).is_empty());
        let ev = d.finish().expect("event").expect("decoded");
        assert_eq!(ev.kind, WatchEventKind::Bookmark);
        assert_eq!(ev.resource_version(), Some("9"));
    }

    #[test]
    fn bad_lines_are_errors_naming_the_line_and_decoding_continues() {
        let mut d = WatchDecoder::new();
        let input = concat!(
            r#"{"type":"ADDED","object":{}}"#,
            "\nnot json\n",
            r#"{"type":"EXPLODED","object":{}}"#,
            "\n",
            r#"{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Gone","message":"too old"}}"#,
            "\n"
        );
        let evs = d.feed(input.as_bytes());
        assert_eq!(evs.len(), 4);
        assert!(evs[0].is_ok());
        match &evs[1] {
            Err(ClientError::Decode { context, .. }) => {
                assert_eq!(context, "watch event on line 2")
            }
            other => panic!("{other:?}"),
        }
        match &evs[2] {
            Err(ClientError::Decode { context, message }) => {
                assert_eq!(context, "watch event on line 3");
                assert!(message.contains("EXPLODED"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let status = evs[3]
            .as_ref()
            .expect("error event")
            .status()
            .expect("status");
        assert_eq!((status.code, status.reason.as_str()), (410, "Gone"));
    }
}
