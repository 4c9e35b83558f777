//! The serial console: a WebSocket carrying raw bytes as binary frames.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

use crate::client::{Client, Result, VMI_KIND, status_error};
use crate::error::ClientError;

/// A byte stream a WebSocket runs over (TCP, TLS or a unix socket).
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Ws = WebSocketStream<Box<dyn Io>>;

/// An open console: bytes typed go to the guest's serial port, bytes the
/// guest writes come back. Use [`Console::send`] / [`Console::recv`], or
/// [`Console::split`] to read and write from different tasks.
pub struct Console {
    ws: Ws,
}

/// Writing half of a [`Console`].
pub struct ConsoleWriter {
    sink: SplitSink<Ws, Message>,
}

/// Reading half of a [`Console`]: a stream of byte chunks. Ends when the
/// server closes the console.
pub struct ConsoleReader {
    stream: SplitStream<Ws>,
}

impl Client {
    /// Connect to a VMI's serial console (WebSocket on the `console`
    /// subresource).
    pub async fn console(&self, namespace: &str, name: &str) -> Result<Console> {
        let url = self.subresource_url(&VMI_KIND, namespace, name, "console")?;
        let url = self.websocket_url(url)?;
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| ClientError::WebSocket(e.to_string()))?;
        if let Some(t) = &self.transport.token
            && let Ok(v) = format!("Bearer {t}").parse()
        {
            request.headers_mut().insert("authorization", v);
        }
        let io = self.ws_connect(&url).await?;
        match tokio_tungstenite::client_async(request, io).await {
            Ok((ws, _response)) => Ok(Console { ws }),
            Err(tungstenite::Error::Io(e)) => Err(self.unreachable_error(&e)),
            Err(tungstenite::Error::Http(resp)) => {
                let code = resp.status().as_u16();
                let body = resp.body().as_deref().unwrap_or_default();
                Err(status_error(code, body))
            }
            Err(tungstenite::Error::Url(e)) => Err(ClientError::WebSocket(format!(
                "cannot connect to {url}: {e}"
            ))),
            Err(e) => Err(ClientError::WebSocket(e.to_string())),
        }
    }
}

impl Client {
    /// Open the byte stream a WebSocket to `url` runs over.
    async fn ws_connect(&self, url: &reqwest::Url) -> Result<Box<dyn Io>> {
        if let Some(path) = &self.transport.unix {
            let s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| self.unreachable_error(&e))?;
            return Ok(Box::new(s));
        }
        let host = url.host_str().unwrap_or_default().to_string();
        let port = url.port_or_known_default().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| self.unreachable_error(&e))?;
        if url.scheme() != "wss" {
            return Ok(Box::new(tcp));
        }
        let cfg = match &self.transport.tls {
            Some(c) => c.clone(),
            None => {
                return Err(ClientError::WebSocket(
                    "a wss:// console needs the server's CA (krvirt login)".into(),
                ));
            }
        };
        let name =
            rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .map_err(|e| ClientError::WebSocket(format!("server name {host:?}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::WebSocket(format!("TLS: {e}")))?;
        Ok(Box::new(tls))
    }
}

fn ws_error(e: tungstenite::Error) -> ClientError {
    ClientError::WebSocket(e.to_string())
}

impl Console {
    /// Send bytes to the guest (one binary frame).
    pub async fn send(&mut self, data: &[u8]) -> Result<()> {
        self.ws
            .send(Message::Binary(Bytes::copy_from_slice(data)))
            .await
            .map_err(ws_error)
    }

    /// Next chunk of guest output; `None` once the console is closed.
    pub async fn recv(&mut self) -> Option<Result<Bytes>> {
        next_chunk(&mut self.ws).await
    }

    /// Close the console politely.
    pub async fn close(mut self) -> Result<()> {
        match self.ws.close(None).await {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Ok(()),
            Err(e) => Err(ws_error(e)),
        }
    }

    /// Separate reading and writing halves.
    pub fn split(self) -> (ConsoleWriter, ConsoleReader) {
        let (sink, stream) = self.ws.split();
        (ConsoleWriter { sink }, ConsoleReader { stream })
    }
}

impl ConsoleWriter {
    /// Send bytes to the guest (one binary frame).
    pub async fn send(&mut self, data: &[u8]) -> Result<()> {
        self.sink
            .send(Message::Binary(Bytes::copy_from_slice(data)))
            .await
            .map_err(ws_error)
    }

    /// Send a close frame.
    pub async fn close(&mut self) -> Result<()> {
        match self.sink.close().await {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Ok(()),
            Err(e) => Err(ws_error(e)),
        }
    }
}

/// Map one WebSocket message to console bytes; `None` = skip.
fn frame_bytes(msg: Message) -> Option<std::result::Result<Bytes, bool>> {
    match msg {
        Message::Binary(b) => Some(Ok(b)),
        Message::Text(t) => Some(Ok(Bytes::copy_from_slice(t.as_bytes()))),
        Message::Close(_) => Some(Err(true)),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
    }
}

async fn next_chunk<S>(s: &mut S) -> Option<Result<Bytes>>
where
    S: Stream<Item = std::result::Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        match s.next().await? {
            Ok(msg) => match frame_bytes(msg) {
                Some(Ok(b)) => return Some(Ok(b)),
                Some(Err(_closed)) => return None,
                None => continue,
            },
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return None;
            }
            Err(e) => return Some(Err(ws_error(e))),
        }
    }
}

impl ConsoleReader {
    /// Next chunk of guest output; `None` once the console is closed.
    pub async fn recv(&mut self) -> Option<Result<Bytes>> {
        next_chunk(&mut self.stream).await
    }
}

impl Stream for ConsoleReader {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match Pin::new(&mut self.stream).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Ok(msg))) => match frame_bytes(msg) {
                    Some(Ok(b)) => return Poll::Ready(Some(Ok(b))),
                    Some(Err(_closed)) => return Poll::Ready(None),
                    None => continue,
                },
                Poll::Ready(Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                ))) => return Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(ws_error(e)))),
            }
        }
    }
}
