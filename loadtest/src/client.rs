//! A small protocol client over one WebSocket or one QUIC connection.
//!
//! Over WebSocket it is built here on the codec of `tether-protocol` (open
//! from a given source address, small buffers); over QUIC it wraps
//! `tether-client` (MessagePack on the session stream, certificate pinning),
//! connecting through one of a few shared endpoints (UDP sockets). Either
//! way: `connect` + `subscribe`, then a stream of events in which the
//! server's `ping`s are answered with `pong` on the way.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use tether_client::ClientError;
use tether_protocol::codec::{decode_server, encode_client};
use tether_protocol::{
    ChannelName, ClientMessage, Connect, Connected, Encoding, Publication, ServerMessage,
    Subscribe, Subscribed,
};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::target::Target;

/// How long a client waits for the reply to `connect` or `subscribe`.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long closing may take before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Small buffers: thousands of these live in one process. The read buffer is
/// allocated up front; the write buffer only grows while a frame is written.
///
/// tungstenite zeroes the free part of the read buffer (up to this size)
/// before every read: with 4 KiB that was a 4 KiB memset of a cold buffer
/// per delivery. 1 KiB still takes several of the broker's ~200-byte frames
/// per read when a client is behind (a longer frame gets the room it needs).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(4 * 1024 * 1024))
        .max_frame_size(Some(4 * 1024 * 1024))
}

/// The `type: "message"` entry a MessagePack frame of the broker starts
/// with, after its map header.
const MSGPACK_MESSAGE: &[u8] = b"\xa4type\xa7message";

/// Decodes one frame. A `message` (almost every frame of a load test) is
/// read in one pass straight into its publication; the protocol's decoder
/// would first build the whole frame as a value tree and then type it.
/// The broker writes `type` first, so a prefix tells (and `Publication`
/// ignores the `type` key); anything else, or a
/// `message` the fast path cannot read, goes through the protocol's
/// decoder (and its errors).
fn decode(bytes: &[u8], encoding: Encoding) -> Result<ServerMessage> {
    let frame = match encoding {
        Encoding::Json if bytes.starts_with(br#"{"type":"message","#) => {
            serde_json::from_slice::<Publication>(bytes).ok()
        }
        Encoding::MsgPack
            if bytes.first().is_some_and(|b| b & 0xf0 == 0x80)
                && bytes.get(1..1 + MSGPACK_MESSAGE.len()) == Some(MSGPACK_MESSAGE) =>
        {
            rmp_serde::from_slice::<Publication>(bytes).ok()
        }
        _ => None,
    };
    Ok(match frame {
        Some(p) => ServerMessage::Message(p),
        None => decode_server(bytes, encoding, usize::MAX)?,
    })
}

/// What the server sent, pings aside.
#[derive(Debug)]
pub enum Event {
    /// A `message` on a subscribed channel.
    Message(Publication),
    /// Any other protocol message (`error`, `disconnect`, a reply…).
    Other(ServerMessage),
    /// The server closed the connection, with this close code if it gave one.
    Closed(Option<u16>),
}

/// The connection under a client.
enum Conn {
    Ws(Box<WebSocketStream<Stream>>),
    Quic(Box<tether_client::Client>),
}

/// A TCP connection, or TLS over one (`wss://`).
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One protocol client.
pub struct Client {
    conn: Conn,
    encoding: Encoding,
    next_id: u64,
}

impl Client {
    /// Opens a TCP connection to `target` (bound to `source` when given) and
    /// upgrades it, offering the subprotocol of `encoding`.
    pub async fn open(
        target: &Target,
        source: Option<IpAddr>,
        encoding: Encoding,
    ) -> Result<Client> {
        let socket = if target.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .context("creating a socket")?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("binding to source address {ip}"))?;
        }
        let stream = socket
            .connect(target.addr)
            .await
            .with_context(|| format!("TCP connect to {}", target.addr))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let stream = match &target.tls {
            None => Stream::Plain(stream),
            Some(tls) => Stream::Tls(Box::new(
                tls.connector
                    .connect(tls.server_name.clone(), stream)
                    .await
                    .context("TLS handshake")?,
            )),
        };
        let req = tether_client::ws_request(target.url.as_str(), encoding)?;
        let (ws, resp) =
            tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
                .await
                .context("WebSocket upgrade")?;
        tether_client::check_subprotocol(&resp, encoding)?;
        Ok(Client {
            conn: Conn::Ws(Box::new(ws)),
            encoding,
            next_id: 0,
        })
    }

    /// Opens a QUIC connection to `addr` through `endpoint` (whose client
    /// configuration pins the server's certificate) and its session stream.
    /// QUIC always carries MessagePack.
    pub async fn open_quic(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Client> {
        let c = tether_client::Client::connect_quic_on(endpoint, addr, server_name)
            .await
            .with_context(|| format!("QUIC connect to {addr}"))?;
        Ok(Client {
            encoding: c.encoding(),
            conn: Conn::Quic(Box::new(c)),
            next_id: 0,
        })
    }

    /// Sends `connect` (with `token`, for a broker with client auth), waits
    /// for `connected`, then subscribes to `channel`; returns both replies.
    pub async fn connect_and_subscribe(
        &mut self,
        channel: &ChannelName,
        token: Option<String>,
    ) -> Result<(Connected, Subscribed)> {
        let id = self.fresh_id();
        let connect = ClientMessage::Connect(Connect {
            id,
            token,
            ..Connect::default()
        });
        let connected = match self.request(&connect, id).await? {
            ServerMessage::Connected(c) => c,
            other => bail!("expected connected, got {}", kind(&other)),
        };
        let id = self.fresh_id();
        let subscribe = ClientMessage::Subscribe(Subscribe {
            id,
            channel: channel.clone(),
            since: None,
        });
        match self.request(&subscribe, id).await? {
            ServerMessage::Subscribed(s) => Ok((connected, s)),
            other => bail!("expected subscribed, got {}", kind(&other)),
        }
    }

    /// The next event; `ping`s are answered and skipped. Cancel-safe
    /// between events.
    pub async fn next_event(&mut self) -> Result<Event> {
        loop {
            let msg = self.next_message().await?;
            let msg = match msg {
                Ok(m) => m,
                Err(closed) => return Ok(closed),
            };
            match msg {
                ServerMessage::Ping => self.send(&ClientMessage::Pong).await?,
                ServerMessage::Message(p) => return Ok(Event::Message(p)),
                other => return Ok(Event::Other(other)),
            }
        }
    }

    /// The next server message, or `Err(Event::Closed)` once the connection
    /// has ended.
    async fn next_message(&mut self) -> Result<Result<ServerMessage, Event>> {
        let ws = match &mut self.conn {
            Conn::Ws(ws) => ws,
            Conn::Quic(q) => {
                return match q.recv().await {
                    Ok(m) => Ok(Ok(m)),
                    Err(ClientError::Closed(c)) => Ok(Err(Event::Closed(
                        c.code.and_then(|code| u16::try_from(code).ok()),
                    ))),
                    Err(e) => Err(e).context("reading from the QUIC session stream"),
                };
            }
        };
        loop {
            let msg = match ws.next().await {
                Some(Ok(Message::Text(t))) => decode(t.as_bytes(), Encoding::Json)?,
                Some(Ok(Message::Binary(b))) => decode(&b, Encoding::MsgPack)?,
                Some(Ok(Message::Close(frame))) => {
                    return Ok(Err(Event::Closed(frame.map(|f| u16::from(f.code)))));
                }
                // WebSocket control pings are answered by tungstenite itself.
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e).context("reading from the WebSocket"),
                None => return Ok(Err(Event::Closed(None))),
            };
            return Ok(Ok(msg));
        }
    }

    /// Closes the connection: over WebSocket with the close handshake
    /// (waiting a little for the server's close frame), over QUIC with a
    /// CONNECTION_CLOSE (application code 4000, normal close).
    pub async fn close(self) {
        match self.conn {
            Conn::Ws(mut ws) => {
                // The stream's own close (with a close frame), not
                // `SinkExt::close` of the box.
                let ws: &mut WebSocketStream<Stream> = &mut ws;
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                    if ws.close(None).await.is_ok() {
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                })
                .await;
            }
            Conn::Quic(q) => {
                if let Some(c) = q.quic_connection() {
                    c.close(quinn::VarInt::from_u32(4000), b"done");
                }
            }
        }
    }

    /// Sends one protocol message.
    pub async fn send(&mut self, msg: &ClientMessage) -> Result<()> {
        match &mut self.conn {
            Conn::Ws(ws) => {
                let bytes = encode_client(msg, self.encoding);
                let frame = match self.encoding {
                    Encoding::Json => Message::Text(bytes.try_into().context("JSON is UTF-8")?),
                    Encoding::MsgPack => Message::Binary(bytes),
                };
                ws.send(frame).await.context("writing to the WebSocket")
            }
            Conn::Quic(q) => q
                .send(msg)
                .await
                .context("writing to the QUIC session stream"),
        }
    }

    /// A request id not used before on this client.
    pub fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Sends `msg` and waits for the reply carrying `id`.
    pub async fn request(&mut self, msg: &ClientMessage, id: u64) -> Result<ServerMessage> {
        self.send(msg).await?;
        let what = msg.kind();
        let wait = async {
            loop {
                match self.next_event().await? {
                    Event::Other(ServerMessage::Error(e)) if e.id == Some(id) => {
                        bail!("{what} refused: {} ({})", e.code.as_str(), e.message)
                    }
                    Event::Other(ServerMessage::Disconnect(d)) => {
                        bail!("disconnected during {what}: {} {}", d.code, d.reason)
                    }
                    Event::Other(reply) if reply_id(&reply) == Some(id) => return Ok(reply),
                    Event::Closed(code) => bail!("closed during {what} (code {code:?})"),
                    Event::Message(_) | Event::Other(_) => {}
                }
            }
        };
        tokio::time::timeout(REPLY_TIMEOUT, wait)
            .await
            .with_context(|| format!("no reply to {what} within {REPLY_TIMEOUT:?}"))?
    }
}

fn reply_id(m: &ServerMessage) -> Option<u64> {
    match m {
        ServerMessage::Connected(c) => Some(c.id),
        ServerMessage::Subscribed(s) => Some(s.id),
        ServerMessage::Unsubscribed(u) => u.id,
        ServerMessage::Published(p) => Some(p.id),
        ServerMessage::Refreshed(r) => Some(r.id),
        _ => None,
    }
}

/// The wire `type` of a server message, for error texts.
pub fn kind(m: &ServerMessage) -> &'static str {
    match m {
        ServerMessage::Connected(_) => "connected",
        ServerMessage::Subscribed(_) => "subscribed",
        ServerMessage::Unsubscribed(_) => "unsubscribed",
        ServerMessage::Published(_) => "published",
        ServerMessage::Refreshed(_) => "refreshed",
        ServerMessage::Message(_) => "message",
        ServerMessage::Ping => "ping",
        ServerMessage::Pong => "pong",
        ServerMessage::Error(_) => "error",
        ServerMessage::Disconnect(_) => "disconnect",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_protocol::codec::encode_server;
    use tether_protocol::{Epoch, Offset};

    #[test]
    fn the_fast_path_reads_a_message_as_the_protocol_does() {
        let m = ServerMessage::Message(Publication {
            channel: ChannelName::new("fanout").expect("channel"),
            epoch: Epoch::new("e-1"),
            offset: Offset(42),
            data: serde_json::json!({"sent_us": 1_700_000_000_000_000u64, "pad": "x".repeat(100)}),
            ts: 1_700_000_000_000,
        });
        for encoding in [Encoding::Json, Encoding::MsgPack] {
            let bytes = encode_server(&m, encoding);
            let fast = decode(&bytes, encoding).expect("fast");
            let slow = decode_server(&bytes, encoding, usize::MAX).expect("protocol");
            assert_eq!(fast, slow, "{encoding:?}");
            assert_eq!(fast, m, "{encoding:?}");
        }
        // The prefix is what the broker writes: the fast path is taken.
        let json = encode_server(&m, Encoding::Json);
        assert!(json.starts_with(br#"{"type":"message","#));
        let packed = encode_server(&m, Encoding::MsgPack);
        assert_eq!(&packed[1..1 + MSGPACK_MESSAGE.len()], MSGPACK_MESSAGE);
        // Other frames, and a message the fast path cannot read (a bad
        // channel name), go through the protocol's decoder and its errors.
        let ping = encode_server(&ServerMessage::Ping, Encoding::Json);
        assert_eq!(
            decode(&ping, Encoding::Json).expect("ping"),
            ServerMessage::Ping
        );
        let bad = br#"{"type":"message","channel":"","epoch":"e","offset":1,"data":1,"ts":1}"#;
        assert!(decode(bad, Encoding::Json).is_err());
        assert!(decode(b"{\"type\":\"message\",", Encoding::Json).is_err());
    }
}
