//! A tiny fake broker that breaks the delivery contract on purpose, to prove
//! that `loadtest` notices: it speaks just enough of the protocol (WebSocket
//! JSON: `connect`, `subscribe`, `pong`; HTTP/1.1: `GET /readyz`, `POST
//! /v1/publish`) and, for one channel, skips delivering one offset or
//! delivers one twice. Everything else is delivered in order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tether_protocol::codec::{decode_client, encode_server};
use tether_protocol::{
    ChannelName, ClientMessage, Connected, Encoding, Epoch, Offset, Publication, ServerMessage,
    Subscribed,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

/// How the fake breaks the contract.
#[derive(Debug, Clone)]
pub enum Fault {
    /// `offset` of `channel` is never delivered.
    Skip { channel: String, offset: u64 },
    /// `offset` of `channel` is delivered twice.
    Duplicate { channel: String, offset: u64 },
}

const EPOCH: &str = "fake-epoch";

#[derive(Default)]
struct State {
    offsets: HashMap<String, u64>,
    subscribers: HashMap<String, Vec<mpsc::UnboundedSender<ServerMessage>>>,
}

/// The running fake; stops on drop.
pub struct LossyBroker {
    pub ws_addr: SocketAddr,
    pub api_addr: SocketAddr,
    _tasks: JoinSet<()>,
}

impl LossyBroker {
    pub async fn start(fault: Fault) -> Result<LossyBroker> {
        let ws = TcpListener::bind("127.0.0.1:0").await?;
        let api = TcpListener::bind("127.0.0.1:0").await?;
        let (ws_addr, api_addr) = (ws.local_addr()?, api.local_addr()?);
        let state = Arc::new(Mutex::new(State::default()));
        let fault = Arc::new(fault);
        let mut tasks = JoinSet::new();
        {
            let state = state.clone();
            tasks.spawn(async move {
                while let Ok((stream, _)) = ws.accept().await {
                    tokio::spawn(serve_ws(stream, state.clone()));
                }
            });
        }
        tasks.spawn(async move {
            while let Ok((stream, _)) = api.accept().await {
                tokio::spawn(serve_http(stream, state.clone(), fault.clone()));
            }
        });
        Ok(LossyBroker {
            ws_addr,
            api_addr,
            _tasks: tasks,
        })
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.ws_addr)
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }
}

// tungstenite's callback type has a large error variant; not ours to shrink.
#[allow(clippy::result_large_err)]
fn pick_json(
    req: &tokio_tungstenite::tungstenite::handshake::server::Request,
    mut resp: tokio_tungstenite::tungstenite::handshake::server::Response,
) -> Result<
    tokio_tungstenite::tungstenite::handshake::server::Response,
    tokio_tungstenite::tungstenite::handshake::server::ErrorResponse,
> {
    if req
        .headers()
        .get("sec-websocket-protocol")
        .is_some_and(|v| v.to_str().is_ok_and(|s| s.contains("tether.v1.json")))
    {
        resp.headers_mut().insert(
            "sec-websocket-protocol",
            tokio_tungstenite::tungstenite::http::HeaderValue::from_static("tether.v1.json"),
        );
    }
    Ok(resp)
}

async fn serve_ws(stream: TcpStream, state: Arc<Mutex<State>>) {
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, pick_json).await else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<ServerMessage>();
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(msg) = out else { return };
                let bytes = encode_server(&msg, Encoding::Json);
                let Ok(text) = String::from_utf8(bytes.to_vec()) else { return };
                if ws.send(Message::text(text)).await.is_err() {
                    return;
                }
            }
            frame = ws.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(_)) => continue,
                    _ => return,
                };
                let Ok(msg) = decode_client(text.as_bytes(), Encoding::Json, usize::MAX) else {
                    return;
                };
                let reply = match msg {
                    ClientMessage::Connect(c) => ServerMessage::Connected(Connected {
                        id: c.id,
                        session: "fake-session".into(),
                        resume_token: "fake-token".into(),
                        heartbeat: 25,
                        resumed: false,
                        channels: None,
                        node: "fake".into(),
                    }),
                    ClientMessage::Subscribe(s) => {
                        let mut st = state.lock().unwrap();
                        let offset = st.offsets.get(s.channel.as_str()).copied().unwrap_or(0);
                        st.subscribers
                            .entry(s.channel.as_str().to_owned())
                            .or_default()
                            .push(tx.clone());
                        ServerMessage::Subscribed(Subscribed {
                            id: s.id,
                            channel: s.channel,
                            epoch: Epoch::new(EPOCH),
                            offset: Offset(offset),
                            recovered: true,
                        })
                    }
                    _ => continue,
                };
                let _ = tx.send(reply);
            }
        }
    }
}

async fn serve_http(stream: TcpStream, state: Arc<Mutex<State>>, fault: Arc<Fault>) {
    let mut stream = BufReader::new(stream);
    loop {
        match one_request(&mut stream, &state, &fault).await {
            Ok(true) => {}
            _ => return,
        }
    }
}

/// Serves one keep-alive request; false at the end of the connection.
async fn one_request(
    stream: &mut BufReader<TcpStream>,
    state: &Mutex<State>,
    fault: &Fault,
) -> Result<bool> {
    let mut line = String::new();
    if stream.read_line(&mut line).await? == 0 {
        return Ok(false);
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (method, path) = (method.to_owned(), path.to_owned());
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        stream.read_line(&mut h).await?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().context("content-length")?;
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await?;
    let (status, answer) = match (method.as_str(), path.as_str()) {
        ("GET", "/readyz") => (200, json!({"status": "ready"})),
        ("POST", "/v1/publish") => {
            let v: Value = serde_json::from_slice(&body)?;
            let Some(channel) = v["channel"].as_str() else {
                bail!("publish without channel")
            };
            let channel = channel.to_owned();
            let mut st = state.lock().unwrap();
            let offset = {
                let o = st.offsets.entry(channel.clone()).or_default();
                *o += 1;
                *o
            };
            let copies = match fault {
                Fault::Skip {
                    channel: c,
                    offset: o,
                } if *c == channel && *o == offset => 0,
                Fault::Duplicate {
                    channel: c,
                    offset: o,
                } if *c == channel && *o == offset => 2,
                _ => 1,
            };
            let publication = ServerMessage::Message(Publication {
                channel: ChannelName::new(channel.clone())?,
                epoch: Epoch::new(EPOCH),
                offset: Offset(offset),
                data: v["data"].clone(),
                ts: 0,
            });
            for sub in st.subscribers.get(&channel).into_iter().flatten() {
                for _ in 0..copies {
                    let _ = sub.send(publication.clone());
                }
            }
            (
                200,
                json!({"channel": channel, "epoch": EPOCH, "offset": offset}),
            )
        }
        _ => (
            404,
            json!({"error": {"code": "not_found", "message": "no such route"}}),
        ),
    };
    let body = answer.to_string();
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        if status == 200 { "OK" } else { "Not Found" },
        body.len()
    );
    let s = stream.get_mut();
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    Ok(true)
}
