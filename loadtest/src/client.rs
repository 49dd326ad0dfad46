//! A small protocol client over one WebSocket, built on the codec of the
//! `tether-protocol` crate: open (optionally from a given source address),
//! `connect` + `subscribe`, then a stream of events in which the server's
//! `ping`s are answered with `pong` on the way.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use tether_protocol::codec::{decode_server, encode_client};
use tether_protocol::{
    ChannelName, ClientMessage, Connect, Encoding, Publication, ServerMessage, Subscribe,
    Subscribed,
};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::target::Target;

/// How long a client waits for the reply to `connect` or `subscribe`.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long closing may take before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Small buffers: thousands of these live in one process. The read buffer is
/// allocated up front; the write buffer only grows while a frame is written.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(4 * 1024 * 1024))
        .max_frame_size(Some(4 * 1024 * 1024))
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

/// One protocol client.
pub struct Client {
    ws: WebSocketStream<TcpStream>,
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
        let mut req = target.url.as_str().into_client_request()?;
        req.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(encoding.subprotocol()),
        );
        let (ws, resp) =
            tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
                .await
                .context("WebSocket upgrade")?;
        let chosen = resp
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .and_then(Encoding::from_subprotocol);
        if chosen != Some(encoding) {
            bail!("the server chose subprotocol {chosen:?}, not {encoding:?}");
        }
        Ok(Client {
            ws,
            encoding,
            next_id: 0,
        })
    }

    /// Sends `connect`, waits for `connected`, then subscribes to `channel`
    /// and returns `subscribed`.
    pub async fn connect_and_subscribe(&mut self, channel: &ChannelName) -> Result<Subscribed> {
        let id = self.fresh_id();
        let connect = ClientMessage::Connect(Connect {
            id,
            ..Connect::default()
        });
        match self.request(&connect, id).await? {
            ServerMessage::Connected(_) => {}
            other => bail!("expected connected, got {}", kind(&other)),
        }
        let id = self.fresh_id();
        let subscribe = ClientMessage::Subscribe(Subscribe {
            id,
            channel: channel.clone(),
            since: None,
        });
        match self.request(&subscribe, id).await? {
            ServerMessage::Subscribed(s) => Ok(s),
            other => bail!("expected subscribed, got {}", kind(&other)),
        }
    }

    /// The next event; `ping`s are answered and skipped. Cancel-safe
    /// between events.
    pub async fn next_event(&mut self) -> Result<Event> {
        loop {
            let msg = match self.ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    decode_server(t.as_bytes(), Encoding::Json, usize::MAX)?
                }
                Some(Ok(Message::Binary(b))) => decode_server(&b, Encoding::MsgPack, usize::MAX)?,
                Some(Ok(Message::Close(frame))) => {
                    return Ok(Event::Closed(frame.map(|f| u16::from(f.code))));
                }
                // WebSocket control pings are answered by tungstenite itself.
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e).context("reading from the WebSocket"),
                None => return Ok(Event::Closed(None)),
            };
            match msg {
                ServerMessage::Ping => self.send(&ClientMessage::Pong).await?,
                ServerMessage::Message(p) => return Ok(Event::Message(p)),
                other => return Ok(Event::Other(other)),
            }
        }
    }

    /// Closes the WebSocket, waiting a little for the server's close frame.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if self.ws.close(None).await.is_ok() {
                while let Some(Ok(_)) = self.ws.next().await {}
            }
        })
        .await;
    }

    async fn send(&mut self, msg: &ClientMessage) -> Result<()> {
        let bytes = encode_client(msg, self.encoding);
        let frame = match self.encoding {
            Encoding::Json => Message::Text(bytes.try_into().context("JSON is UTF-8")?),
            Encoding::MsgPack => Message::Binary(bytes),
        };
        self.ws
            .send(frame)
            .await
            .context("writing to the WebSocket")
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Sends `msg` and waits for the reply carrying `id`.
    async fn request(&mut self, msg: &ClientMessage, id: u64) -> Result<ServerMessage> {
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
        ServerMessage::Unsubscribed(u) => Some(u.id),
        ServerMessage::Published(p) => Some(p.id),
        ServerMessage::Refreshed(r) => Some(r.id),
        _ => None,
    }
}

/// The wire `type` of a server message, for error texts.
fn kind(m: &ServerMessage) -> &'static str {
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
