//! WebSocket transport: the upgrade at `GET /v1/ws` with subprotocol
//! negotiation and explicit buffer limits, and frames ↔ protocol messages.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream};
use tether_protocol::{CloseCode, Encoding};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use super::stream::ClientStream;
use super::{Inbound, Transport, TransportError};
use crate::session::outbox::Frame;

/// The WebSocket endpoint path.
pub const PATH: &str = "/v1/ws";

/// Limits of every WebSocket connection. The read buffer is allocated up
/// front for each connection, so it dominates the memory of idle clients;
/// the write buffer grows only while a batch is being written.
pub fn ws_config(max_message_size: usize, read_buffer: usize) -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.read_buffer_size = read_buffer;
    // Frames are batched by the session and flushed once; tungstenite only
    // needs to buffer what one batch holds.
    c.write_buffer_size = 16 * 1024;
    // The session bounds what it queues (max-outbox-bytes); this only stops
    // a runaway buffer if the socket keeps failing.
    c.max_write_buffer_size = 4 * 1024 * 1024;
    c.max_message_size = Some(max_message_size);
    c.max_frame_size = Some(max_message_size);
    c
}

/// Why an upgrade was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("websocket handshake failed: {0}")]
    Handshake(#[from] WsError),
    #[error("tls handshake failed: {0}")]
    Tls(#[from] std::io::Error),
}

fn error_response(status: StatusCode, body: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(body.to_owned()));
    *r.status_mut() = status;
    r
}

/// Runs the WebSocket handshake on an accepted socket: checks the path,
/// negotiates the subprotocol (§2) and applies the limits.
pub async fn accept(
    stream: TcpStream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    config: WebSocketConfig,
) -> Result<WsTransport, UpgradeError> {
    let stream = match tls {
        Some(acceptor) => ClientStream::Tls(Box::new(acceptor.accept(stream).await?)),
        None => ClientStream::Plain(stream),
    };
    let mut chosen = Encoding::Json;
    // The callback's signature is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != PATH {
            return Err(error_response(
                StatusCode::NOT_FOUND,
                "not found: the WebSocket endpoint is /v1/ws",
            ));
        }
        let offered: Vec<&str> = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        match Encoding::negotiate(offered.iter().copied()) {
            Some(enc) => {
                chosen = enc;
                if !offered.is_empty() {
                    resp.headers_mut().insert(
                        "sec-websocket-protocol",
                        HeaderValue::from_static(enc.subprotocol()),
                    );
                }
                Ok(resp)
            }
            None => Err(error_response(
                StatusCode::BAD_REQUEST,
                "unsupported subprotocol: offer tether.v1.json or tether.v1.msgpack",
            )),
        }
    };
    let ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    Ok(WsTransport {
        ws,
        encoding: chosen,
        flushing: false,
    })
}

/// An upgraded WebSocket connection.
pub struct WsTransport {
    ws: WebSocketStream<ClientStream>,
    encoding: Encoding,
    /// Frames were handed to tungstenite and a flush is owed.
    flushing: bool,
}

impl WsTransport {
    fn message(&self, bytes: Bytes) -> Result<Message, TransportError> {
        match self.encoding {
            Encoding::Json => Utf8Bytes::try_from(bytes)
                .map(Message::Text)
                .map_err(|_| TransportError::Protocol("reply is not UTF-8".into())),
            Encoding::MsgPack => Ok(Message::Binary(bytes)),
        }
    }
}

fn read_error(e: WsError) -> TransportError {
    match e {
        WsError::Capacity(_) => TransportError::TooLarge,
        WsError::Utf8(_) => TransportError::Protocol("invalid UTF-8 in a text frame".into()),
        WsError::Protocol(p) => TransportError::Protocol(p.to_string()),
        other => TransportError::Gone(other.to_string()),
    }
}

impl Transport for WsTransport {
    const NAME: &'static str = "ws";

    fn encoding(&self) -> Encoding {
        self.encoding
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Inbound, TransportError>> {
        let item = ready!(Pin::new(&mut self.ws).poll_next(cx));
        Poll::Ready(match item {
            None => Ok(Inbound::Closed),
            Some(Err(e)) => Err(read_error(e)),
            Some(Ok(Message::Text(t))) => match self.encoding {
                Encoding::Json => Ok(Inbound::Message(Bytes::from(t))),
                Encoding::MsgPack => Err(TransportError::Protocol(
                    "text frame on the tether.v1.msgpack subprotocol".into(),
                )),
            },
            Some(Ok(Message::Binary(b))) => match self.encoding {
                Encoding::MsgPack => Ok(Inbound::Message(b)),
                Encoding::Json => Err(TransportError::Protocol(
                    "binary frame on the tether.v1.json subprotocol".into(),
                )),
            },
            // tungstenite queues the pong itself and flushes it on the next read.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                Ok(Inbound::Activity)
            }
            Some(Ok(Message::Close(_))) => Ok(Inbound::Closed),
        })
    }

    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut VecDeque<Frame>,
        sent: &mut dyn FnMut(Frame),
    ) -> Poll<Result<(), TransportError>> {
        while !frames.is_empty() {
            if let Err(e) = ready!(Pin::new(&mut self.ws).poll_ready(cx)) {
                return Poll::Ready(Err(TransportError::Gone(e.to_string())));
            }
            let Some(frame) = frames.pop_front() else {
                break;
            };
            let msg = self.message(frame.bytes.clone())?;
            if let Err(e) = Pin::new(&mut self.ws).start_send(msg) {
                return Poll::Ready(Err(TransportError::Gone(e.to_string())));
            }
            self.flushing = true;
            sent(frame);
        }
        if self.flushing {
            if let Err(e) = ready!(Pin::new(&mut self.ws).poll_flush(cx)) {
                return Poll::Ready(Err(TransportError::Gone(e.to_string())));
            }
            self.flushing = false;
        }
        Poll::Ready(Ok(()))
    }

    async fn close(&mut self, code: CloseCode, last: Option<Bytes>) {
        if let Some(bytes) = last
            && let Ok(msg) = self.message(bytes)
        {
            let _ = self.ws.feed(msg).await;
        }
        let frame = CloseFrame {
            code: WsCloseCode::from(code.code()),
            reason: Utf8Bytes::from_static(code.reason()),
        };
        let _ = self.ws.close(Some(frame)).await;
    }
}
