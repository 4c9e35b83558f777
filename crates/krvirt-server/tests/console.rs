//! VMI host-side subresources (console WebSocket, consolelog, pause,
//! unpause) through a HostConnector backed by real unix sockets and files.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use futures::{SinkExt, StreamExt};
use krvirt_server::{ApiError, ByteStream, ConsoleStream, HostConnector};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Test connector: each VMI has `{dir}/{uid}/serial.sock` and
/// `{dir}/{uid}/console.log`, like the agent's run directory.
struct SocketConnector {
    dir: PathBuf,
    calls: Mutex<Vec<String>>,
}

fn uid(vmi: &Value) -> String {
    vmi["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[async_trait]
impl HostConnector for SocketConnector {
    async fn pause(&self, vmi: &Value) -> Result<(), ApiError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("pause:{}", uid(vmi)));
        Ok(())
    }
    async fn unpause(&self, vmi: &Value) -> Result<(), ApiError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("unpause:{}", uid(vmi)));
        Ok(())
    }
    async fn console(&self, vmi: &Value) -> Result<ConsoleStream, ApiError> {
        let path = self.dir.join(uid(vmi)).join("serial.sock");
        let s = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
            ApiError::ServiceUnavailable(format!("connect {}: {e}", path.display()))
        })?;
        Ok(Box::new(s))
    }
    async fn console_log(&self, vmi: &Value, follow: bool) -> Result<ByteStream, ApiError> {
        let path = self.dir.join(uid(vmi)).join("console.log");
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| ApiError::ServiceUnavailable(format!("open {}: {e}", path.display())))?;
        let stream = futures::stream::unfold(file, move |mut f| async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match f.read(&mut buf).await {
                    Ok(0) if follow => tokio::time::sleep(Duration::from_millis(20)).await,
                    Ok(0) => return None,
                    Ok(n) => return Some((Ok(Bytes::copy_from_slice(&buf[..n])), f)),
                    Err(e) => return Some((Err(e), f)),
                }
            }
        });
        Ok(Box::pin(stream))
    }
}

/// A serial port stand-in: sends a banner, echoes input, hangs up on "bye".
/// Reports each finished connection on `done`.
fn echo_server(path: PathBuf, done: tokio::sync::mpsc::UnboundedSender<Vec<u8>>) {
    let listener = UnixListener::bind(&path).expect("bind serial.sock");
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let done = done.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let _ = conn.write_all(b"krvirt login: ").await;
                let mut buf = [0u8; 1024];
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            seen.extend_from_slice(&buf[..n]);
                            if conn.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            if seen.ends_with(b"bye\n") {
                                break;
                            }
                        }
                    }
                }
                let _ = done.send(seen);
            });
        }
    });
}

struct Setup {
    s: TestServer,
    connector: Arc<SocketConnector>,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let connector = Arc::new(SocketConnector {
        dir: dir.path().to_path_buf(),
        calls: Mutex::new(Vec::new()),
    });
    let s = TestServer::with(Kinds::Test, connector.clone()).await;
    Setup {
        s,
        connector,
        _dir: dir,
    }
}

impl Setup {
    /// A VMI in `phase`, with its run directory.
    async fn vmi(&self, name: &str, phase: &str) -> (Value, PathBuf) {
        let v = self
            .s
            .create(&self.s.vmis("default"), &vmi_manifest(name))
            .await;
        let (code, v2) = self
            .s
            .merge_patch(
                &format!("{}/status", self.s.vmi("default", name)),
                &json!({"status": {"phase": phase}}),
            )
            .await;
        assert_eq!(code, 200);
        let run = self.connector.dir.join(uid(&v));
        std::fs::create_dir_all(&run).unwrap();
        (v2, run)
    }

    fn ws_url(&self, name: &str) -> String {
        self.s
            .sub("virtualmachineinstances", "default", name, "console")
            .replacen("http://", "ws://", 1)
    }
}

async fn next_binary<S>(ws: &mut S) -> Vec<u8>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("frame within 5s")
        {
            Some(Ok(Message::Binary(b))) => return b.to_vec(),
            Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => continue,
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn console_websocket_pumps_bytes_both_ways() {
    let st = setup().await;
    let (_, run) = st.vmi("con", "Running").await;
    let (tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    echo_server(run.join("serial.sock"), tx);

    let mut req = st.ws_url("con").into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "plain.kubevirt.io".parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket upgrade");
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "plain.kubevirt.io"
    );

    // host -> client
    let mut got = Vec::new();
    while got.len() < b"krvirt login: ".len() {
        got.extend(next_binary(&mut ws).await);
    }
    assert_eq!(got, b"krvirt login: ");
    // client -> host -> client, binary and text frames, arbitrary bytes
    ws.send(Message::Binary(Bytes::from_static(b"root\n")))
        .await
        .unwrap();
    let mut echoed = Vec::new();
    while echoed.len() < 5 {
        echoed.extend(next_binary(&mut ws).await);
    }
    assert_eq!(echoed, b"root\n");
    let raw: Vec<u8> = (0u8..=255).collect();
    ws.send(Message::Binary(Bytes::from(raw.clone())))
        .await
        .unwrap();
    let mut echoed = Vec::new();
    while echoed.len() < raw.len() {
        echoed.extend(next_binary(&mut ws).await);
    }
    assert_eq!(echoed, raw);

    // client closes -> the host connection is closed too
    ws.close(None).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), done.recv())
        .await
        .expect("host side closed")
        .unwrap();
    assert!(seen.starts_with(b"root\n"));

    // host hangs up -> the client gets a close frame
    let mut req = st.ws_url("con").into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "plain.kubevirt.io".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    next_binary(&mut ws).await;
    ws.send(Message::Text("bye\n".into())).await.unwrap();
    let mut closed = false;
    for _ in 0..10 {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("frame")
        {
            Some(Ok(Message::Close(_))) | None => {
                closed = true;
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "client must see the console close");
    let seen = done.recv().await.unwrap();
    assert_eq!(seen, b"bye\n");
}

#[tokio::test]
async fn console_refusals_are_http_errors() {
    let st = setup().await;
    st.vmi("stopped", "Succeeded").await;
    // not running -> 409 before any upgrade
    let r = tokio_tungstenite::connect_async(st.ws_url("stopped")).await;
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 409);
            let body: Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(
                body["message"],
                "Operation cannot be fulfilled on virtualmachineinstance.kubevirt.io \"stopped\": VMI is not running"
            );
        }
        other => panic!("expected HTTP 409, got {other:?}"),
    }
    // unknown VMI -> 404
    match tokio_tungstenite::connect_async(st.ws_url("ghost")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 404)
        }
        other => panic!("expected HTTP 404, got {other:?}"),
    }
    // running but the host side is unreachable (no socket) -> the connector's 503
    st.vmi("nosock", "Running").await;
    match tokio_tungstenite::connect_async(st.ws_url("nosock")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503)
        }
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    // plain GET without upgrade -> 400 Status
    let (code, body) =
        st.s.get(
            &st.s
                .sub("virtualmachineinstances", "default", "nosock", "console"),
        )
        .await;
    assert_eq!(code, 400);
    assert_eq!(body["reason"], "BadRequest");
}

#[tokio::test]
async fn console_log_snapshot_and_follow() {
    let st = setup().await;
    let (_, run) = st.vmi("log", "Running").await;
    let log = run.join("console.log");
    std::fs::write(&log, b"boot line 1\nboot line 2\n").unwrap();
    let url =
        st.s.sub("virtualmachineinstances", "default", "log", "consolelog");

    let r =
        st.s.client
            .get(format!("{url}?follow=false"))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(r.text().await.unwrap(), "boot line 1\nboot line 2\n");

    let r =
        st.s.client
            .get(format!("{url}?follow=true"))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut body = r.bytes_stream();
    let mut got = Vec::new();
    while got.len() < 24 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("chunk")
            .unwrap()
            .unwrap();
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"boot line 1\nboot line 2\n");
    {
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, b"login: ").unwrap();
    }
    let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .expect("followed chunk")
        .unwrap()
        .unwrap();
    assert_eq!(&chunk[..], b"login: ");

    // no log yet -> the connector's error as a Status
    st.vmi("nolog", "Pending").await;
    let (code, body) =
        st.s.get(
            &st.s
                .sub("virtualmachineinstances", "default", "nolog", "consolelog"),
        )
        .await;
    assert_eq!(code, 503);
    assert_eq!(body["reason"], "ServiceUnavailable");
    let (code, _) =
        st.s.get(
            &st.s
                .sub("virtualmachineinstances", "default", "ghost", "consolelog"),
        )
        .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn pause_and_unpause() {
    let st = setup().await;
    let (vmi, _) = st.vmi("p", "Running").await;
    let u = uid(&vmi);
    let put = |verb: &str| {
        let url = st.s.sub("virtualmachineinstances", "default", "p", verb);
        let c = st.s.client.clone();
        async move { status_json(c.put(url).send().await.unwrap()).await }
    };
    let (code, _) = put("pause").await;
    assert_eq!(code, 200);
    assert_eq!(
        *st.connector.calls.lock().unwrap(),
        vec![format!("pause:{u}")]
    );
    // not paused yet (the agent would set the condition): unpause refused
    let (code, body) = put("unpause").await;
    assert_eq!(code, 409);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .ends_with("VMI is not paused")
    );
    // the agent reports Paused
    st.s.merge_patch(
        &format!("{}/status", st.s.vmi("default", "p")),
        &json!({"status": {"conditions": [{"type": "Paused", "status": "True"}]}}),
    )
    .await;
    let (code, body) = put("pause").await;
    assert_eq!(code, 409);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .ends_with("VMI is already paused")
    );
    let (code, _) = put("unpause").await;
    assert_eq!(code, 200);
    assert_eq!(
        st.connector.calls.lock().unwrap().last().unwrap(),
        &format!("unpause:{u}")
    );
    assert_eq!(st.connector.calls.lock().unwrap().len(), 2);

    // not running -> 409; unknown -> 404
    st.vmi("idle", "Scheduled").await;
    let url =
        st.s.sub("virtualmachineinstances", "default", "idle", "pause");
    let (code, body) = status_json(st.s.client.put(url).send().await.unwrap()).await;
    assert_eq!(code, 409);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .ends_with("VM is not running")
    );
    let url =
        st.s.sub("virtualmachineinstances", "default", "ghost", "unpause");
    assert_eq!(
        st.s.client.put(url).send().await.unwrap().status().as_u16(),
        404
    );
}

#[tokio::test]
async fn without_a_host_connector_host_operations_are_503() {
    let s = TestServer::start().await;
    s.create(&s.vmis("default"), &vmi_manifest("v")).await;
    s.merge_patch(
        &format!("{}/status", s.vmi("default", "v")),
        &json!({"status": {"phase": "Running"}}),
    )
    .await;
    let (code, body) = status_json(
        s.client
            .put(s.sub("virtualmachineinstances", "default", "v", "pause"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 503);
    assert_eq!(body["reason"], "ServiceUnavailable");
    let (code, _) = s
        .get(&s.sub("virtualmachineinstances", "default", "v", "consolelog"))
        .await;
    assert_eq!(code, 503);
}
