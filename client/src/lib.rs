//! A small Tether client over WebSocket or QUIC, on the one codec of
//! `tether-protocol`: the load tester, the tests and Rust apps use it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tether_client::ClientError> {
//! use tether_client::{Client, QuicOptions};
//! let mut c = Client::connect_quic(
//!     "127.0.0.1:8443".parse().unwrap(),
//!     QuicOptions::pinned("localhost", "ab12…sha256 hex of the certificate"),
//! )
//! .await?;
//! # Ok(()) }
//! ```

mod quic;

use std::net::SocketAddr;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tether_protocol::codec::{decode_server, encode_client};
use tether_protocol::frame::{FrameDecoder, encode_frame};
use tether_protocol::{ClientMessage, Disconnect, Encoding, ServerMessage};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use quic::{QuicOptions, ServerCert, endpoint as quic_endpoint};

/// Largest server message the client accepts.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("quic connect: {0}")]
    QuicConnect(#[from] quinn::ConnectError),
    #[error("quic connection: {0}")]
    QuicConnection(#[from] quinn::ConnectionError),
    #[error("quic stream: {0}")]
    QuicWrite(#[from] quinn::WriteError),
    #[error("quic stream: {0}")]
    QuicRead(#[from] quinn::ReadError),
    #[error("tls: {0}")]
    Tls(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("undecodable server message: {0}")]
    Decode(#[from] tether_protocol::DecodeError),
    #[error("server chose subprotocol {0:?}")]
    Subprotocol(Option<String>),
    /// The server closed the connection.
    #[error("closed by the server: {0:?}")]
    Closed(Closed),
}

/// How the server closed a connection.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Closed {
    /// WebSocket close code or QUIC application close code.
    pub code: Option<u64>,
    /// The `disconnect` message that preceded the close, if it was read.
    pub disconnect: Option<Disconnect>,
}

enum Conn {
    Ws(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
    Quic(quic::QuicConn),
}

/// A protocol connection to a Tether node.
pub struct Client {
    conn: Conn,
    encoding: Encoding,
    next_id: u64,
    /// The last `disconnect` seen, reported with the close.
    disconnect: Option<Disconnect>,
}

/// The WebSocket upgrade request for `url`, offering the subprotocol of
/// `encoding` (PROTOCOL.md §2).
pub fn ws_request(url: &str, encoding: Encoding) -> Result<Request, ClientError> {
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(encoding.subprotocol()),
    );
    Ok(req)
}

/// Checks that the server's upgrade answer chose the subprotocol of
/// `encoding`.
pub fn check_subprotocol(resp: &Response, encoding: Encoding) -> Result<(), ClientError> {
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok());
    if chosen.and_then(Encoding::from_subprotocol) == Some(encoding) {
        Ok(())
    } else {
        Err(ClientError::Subprotocol(chosen.map(str::to_owned)))
    }
}

impl Client {
    /// Connects over WebSocket to `url` (`ws://host:port/v1/ws`).
    pub async fn connect_ws(url: &str, encoding: Encoding) -> Result<Client, ClientError> {
        let (ws, resp) = tokio_tungstenite::connect_async(ws_request(url, encoding)?).await?;
        check_subprotocol(&resp, encoding)?;
        Ok(Client {
            conn: Conn::Ws(Box::new(ws)),
            encoding,
            next_id: 0,
            disconnect: None,
        })
    }

    /// Connects over QUIC and opens the session stream.
    pub async fn connect_quic(
        addr: SocketAddr,
        options: QuicOptions,
    ) -> Result<Client, ClientError> {
        Ok(Client {
            conn: Conn::Quic(quic::QuicConn::connect(addr, options).await?),
            encoding: Encoding::MsgPack,
            next_id: 0,
            disconnect: None,
        })
    }

    /// Connects over QUIC through an existing endpoint (see
    /// [`quic_endpoint`]): reconnects through one endpoint resume TLS.
    pub async fn connect_quic_on(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Client, ClientError> {
        Ok(Client {
            conn: Conn::Quic(quic::QuicConn::connect_on(endpoint, addr, server_name).await?),
            encoding: Encoding::MsgPack,
            next_id: 0,
            disconnect: None,
        })
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// A fresh request id.
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The QUIC endpoint, to rebind it to a new socket (migration).
    pub fn quic_endpoint(&self) -> Option<&quinn::Endpoint> {
        match &self.conn {
            Conn::Quic(q) => Some(&q.endpoint),
            Conn::Ws(_) => None,
        }
    }

    /// The QUIC connection, for its statistics and close reason.
    pub fn quic_connection(&self) -> Option<&quinn::Connection> {
        match &self.conn {
            Conn::Quic(q) => Some(&q.conn),
            Conn::Ws(_) => None,
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &ClientMessage) -> Result<(), ClientError> {
        let bytes = encode_client(msg, self.encoding);
        self.send_encoded(&bytes).await
    }

    /// Sends already-encoded bytes as one message of this connection
    /// (tests use it to send malformed input).
    pub async fn send_encoded(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        match &mut self.conn {
            Conn::Ws(ws) => {
                let msg = match self.encoding {
                    Encoding::Json => {
                        Message::Text(String::from_utf8_lossy(bytes).into_owned().into())
                    }
                    Encoding::MsgPack => Message::Binary(bytes.to_vec().into()),
                };
                ws.send(msg).await?;
            }
            Conn::Quic(q) => q.send.write_all(&encode_frame(bytes)).await?,
        }
        Ok(())
    }

    /// Writes raw bytes on the QUIC session stream, framing included.
    pub async fn send_raw_quic(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        if let Conn::Quic(q) = &mut self.conn {
            q.send.write_all(bytes).await?;
        }
        Ok(())
    }

    /// The next server message; `Err(Closed)` once the server has closed.
    pub async fn recv(&mut self) -> Result<ServerMessage, ClientError> {
        loop {
            let msg = match &mut self.conn {
                Conn::Ws(ws) => match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        decode_server(t.as_bytes(), Encoding::Json, MAX_MESSAGE)?
                    }
                    Some(Ok(Message::Binary(b))) => {
                        decode_server(&b, Encoding::MsgPack, MAX_MESSAGE)?
                    }
                    Some(Ok(Message::Close(c))) => {
                        return Err(ClientError::Closed(Closed {
                            code: c.map(|f| u64::from(u16::from(f.code))),
                            disconnect: self.disconnect.take(),
                        }));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => {
                        return Err(ClientError::Closed(Closed {
                            code: None,
                            disconnect: self.disconnect.take(),
                        }));
                    }
                },
                Conn::Quic(q) => match q.next_frame().await {
                    Ok(Some(frame)) => decode_server(&frame, Encoding::MsgPack, MAX_MESSAGE)?,
                    Ok(None) | Err(_) => {
                        let code = q.close_code().await;
                        return Err(ClientError::Closed(Closed {
                            code,
                            disconnect: self.disconnect.take(),
                        }));
                    }
                },
            };
            if let ServerMessage::Disconnect(d) = &msg {
                self.disconnect = Some(d.clone());
            }
            return Ok(msg);
        }
    }

    /// Reads until the server closes; returns how.
    pub async fn closed(&mut self) -> Closed {
        loop {
            match self.recv().await {
                Ok(_) => continue,
                Err(ClientError::Closed(c)) => return c,
                Err(_) => {
                    return Closed {
                        code: None,
                        disconnect: self.disconnect.take(),
                    };
                }
            }
        }
    }
}

/// Reads length-prefixed frames from a QUIC receive stream.
pub(crate) struct FrameReader {
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl FrameReader {
    pub(crate) fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            decoder: FrameDecoder::new(MAX_MESSAGE),
        }
    }

    pub(crate) async fn next(
        &mut self,
        recv: &mut quinn::RecvStream,
    ) -> Result<Option<bytes::Bytes>, ClientError> {
        loop {
            if let Some(f) = self.decoder.decode(&mut self.buf).map_err(|e| {
                ClientError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })? {
                return Ok(Some(f));
            }
            let mut chunk = [0u8; 4096];
            match recv.read(&mut chunk).await? {
                Some(n) => self.buf.extend_from_slice(&chunk[..n]),
                None => return Ok(None),
            }
        }
    }
}
