//! Test support for the end-to-end tests: start real `broker` processes on
//! free ports and talk to them over real sockets.
//!
//! [`TestBroker`] binds port 0, learns the bound addresses from the log lines
//! the broker prints (no fixed ports, no sleeping until ready) and kills the
//! process on `Drop`. [`WsClient`] is a protocol client over a real
//! WebSocket, using the one codec of the `tether-protocol` crate.

#![allow(clippy::unwrap_used)]

pub mod fakes;
pub mod raw;
pub mod redis;
pub mod silencer;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use tether_protocol::codec::{decode_server, encode_client};
use tether_protocol::{ClientMessage, Connect, Encoding, ServerMessage};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for any one expected event.
pub const WAIT: Duration = Duration::from_secs(10);

/// Path of the workspace binary `name` (package `package`), next to the
/// test binary, built on first use if missing.
fn built_bin(
    cell: &'static OnceLock<std::result::Result<PathBuf, String>>,
    name: &str,
    package: &str,
) -> Result<PathBuf> {
    cell.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        // target/<profile>/deps/<test> → target/<profile>/<name>
        let dir = exe
            .parent()
            .and_then(|d| d.parent())
            .ok_or("unexpected test binary location")?;
        let bin = dir.join(name);
        if !bin.exists() {
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", package, "--bin", name])
                .status()
                .map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("cargo build -p {package} failed"));
            }
        }
        Ok(bin)
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Path of the `broker` binary, built on first use if missing.
pub fn broker_bin() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    built_bin(&BIN, "broker", "tether-broker")
}

/// Path of the `loadtest` binary, built on first use if missing.
pub fn loadtest_bin() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    built_bin(&BIN, "loadtest", "tether-loadtest")
}

/// A broker process on free loopback ports, killed on drop.
pub struct TestBroker {
    child: Child,
    pub client_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// The QUIC listener, when started with `--quic-addr`.
    pub quic_addr: Option<SocketAddr>,
    /// SHA-256 fingerprint of the QUIC certificate, when self-signed.
    pub quic_fingerprint: Option<String>,
    log: Arc<Mutex<Vec<String>>>,
    _data_dir: Option<tempfile::TempDir>,
}

impl TestBroker {
    /// Starts a broker with test defaults plus `args` (later flags win), on
    /// a fresh temporary data directory.
    pub fn start(args: &[&str]) -> Result<TestBroker> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().to_owned();
        Self::start_inner(&path, Some(dir), args)
    }

    /// Starts a broker on an existing data directory (restart tests).
    pub fn start_in(data_dir: &std::path::Path, args: &[&str]) -> Result<TestBroker> {
        Self::start_inner(data_dir, None, args)
    }

    fn start_inner(
        data_dir_path: &std::path::Path,
        data_dir: Option<tempfile::TempDir>,
        args: &[&str],
    ) -> Result<TestBroker> {
        let mut cmd = Command::new(broker_bin()?);
        cmd.args([
            "--client-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
            "--quic-addr",
            "off",
            "--node-id",
            "test-node",
            "--data-dir",
        ])
        .arg(data_dir_path)
        .args(args)
        .env("TETHER_LOG", "info")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning broker")?;
        let stderr = child.stderr.take().context("broker stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                    if std::env::var_os("TETHER_TEST_LOG").is_some() {
                        eprintln!("[broker] {line}");
                    }
                    log.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut client_addr, mut api_addr, mut quic_addr, mut quic_fingerprint) =
            (None, None, None, None);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let log = log.lock().unwrap().join("\n");
                    bail!("broker did not become ready; log:\n{log}");
                }
            };
            if line.contains("listening") {
                let addr = parse_addr(&line);
                if line.contains("listener=\"client\"") || line.contains("listener=client") {
                    client_addr = addr;
                } else if line.contains("listener=\"api\"") || line.contains("listener=api") {
                    api_addr = addr;
                } else if line.contains("listener=\"quic\"") || line.contains("listener=quic") {
                    quic_addr = addr;
                }
            }
            if let Some(fp) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("fingerprint="))
            {
                quic_fingerprint = Some(fp.trim_matches('"').to_owned());
            }
            if line.contains(" ready") {
                break;
            }
        }
        let (Some(client_addr), Some(api_addr)) = (client_addr, api_addr) else {
            let _ = child.kill();
            bail!("broker logged no listening addresses");
        };
        Ok(TestBroker {
            child,
            client_addr,
            api_addr,
            quic_addr,
            quic_fingerprint,
            log,
            _data_dir: data_dir,
        })
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.client_addr)
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{}", self.api_addr, path)
    }

    /// Everything the broker has logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Kills the process at once (SIGKILL: a crashed node) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit, up to `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("broker did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An HTTP client for the API.
    pub fn http(&self) -> reqwest::Client {
        reqwest::Client::new()
    }

    /// `POST /v1/publish` with `body`; returns status and JSON answer.
    pub async fn publish(&self, body: serde_json::Value) -> Result<(u16, serde_json::Value)> {
        let r = self
            .http()
            .post(self.api_url("/v1/publish"))
            .json(&body)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await?))
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_addr(line: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .and_then(|a| a.trim_matches('"').parse().ok())
}

/// What the client saw when the server closed.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    /// The close code of the close frame, if any.
    pub code: Option<u16>,
    /// The `disconnect` message before it, if any.
    pub disconnect: Option<tether_protocol::Disconnect>,
}

/// A protocol client over a real WebSocket.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub encoding: Encoding,
    next_id: u64,
}

impl WsClient {
    /// Connects with the JSON subprotocol.
    pub async fn connect(url: &str) -> Result<WsClient> {
        Self::connect_with(url, Encoding::Json).await
    }

    /// Connects offering the subprotocol of `encoding`.
    pub async fn connect_with(url: &str, encoding: Encoding) -> Result<WsClient> {
        let req = tether_client::ws_request(url, encoding)?;
        let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
        tether_client::check_subprotocol(&resp, encoding)?;
        Ok(WsClient {
            ws,
            encoding,
            next_id: 1,
        })
    }

    /// A fresh request id.
    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub async fn send(&mut self, msg: &ClientMessage) -> Result<()> {
        let bytes = encode_client(msg, self.encoding);
        self.send_raw(bytes.to_vec()).await
    }

    /// Sends bytes as one frame of this connection's kind.
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<()> {
        let msg = match self.encoding {
            Encoding::Json => Message::Text(String::from_utf8(bytes)?.into()),
            Encoding::MsgPack => Message::Binary(bytes.into()),
        };
        self.ws.send(msg).await?;
        Ok(())
    }

    /// Sends a frame of an explicit kind.
    pub async fn send_message(&mut self, msg: Message) -> Result<()> {
        self.ws.send(msg).await?;
        Ok(())
    }

    /// The next WebSocket frame of any kind (control frames included).
    pub async fn recv_frame(&mut self) -> Result<Message> {
        match tokio::time::timeout(WAIT, self.ws.next()).await {
            Ok(Some(Ok(m))) => Ok(m),
            Ok(Some(Err(e))) => bail!("websocket error: {e}"),
            Ok(None) => bail!("connection ended"),
            Err(_) => bail!("no frame within {WAIT:?}"),
        }
    }

    /// The next protocol message, skipping nothing. Fails on close or timeout.
    pub async fn recv(&mut self) -> Result<ServerMessage> {
        match tokio::time::timeout(WAIT, self.next_message()).await {
            Ok(r) => r,
            Err(_) => bail!("no message within {WAIT:?}"),
        }
    }

    /// The next message other than `ping`.
    pub async fn recv_skip_pings(&mut self) -> Result<ServerMessage> {
        loop {
            match self.recv().await? {
                ServerMessage::Ping => continue,
                m => return Ok(m),
            }
        }
    }

    async fn next_message(&mut self) -> Result<ServerMessage> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return Ok(decode_server(t.as_bytes(), Encoding::Json, usize::MAX)?);
                }
                Some(Ok(Message::Binary(b))) => {
                    return Ok(decode_server(&b, Encoding::MsgPack, usize::MAX)?);
                }
                Some(Ok(Message::Close(c))) => bail!("closed: {c:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("websocket error: {e}"),
                None => bail!("connection ended"),
            }
        }
    }

    /// Reads until the server closes; returns the close code and the
    /// `disconnect` message that preceded it.
    pub async fn expect_close(&mut self) -> Result<Closed> {
        let mut disconnect = None;
        let fut = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(c))) => {
                        return Ok(Closed {
                            code: c.map(|f| u16::from(f.code)),
                            disconnect,
                        });
                    }
                    Some(Ok(Message::Text(t))) => {
                        if let Ok(ServerMessage::Disconnect(d)) =
                            decode_server(t.as_bytes(), Encoding::Json, usize::MAX)
                        {
                            disconnect = Some(d);
                        }
                    }
                    Some(Ok(Message::Binary(b))) => {
                        if let Ok(ServerMessage::Disconnect(d)) =
                            decode_server(&b, Encoding::MsgPack, usize::MAX)
                        {
                            disconnect = Some(d);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        return Ok(Closed {
                            code: None,
                            disconnect,
                        });
                    }
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(30), fut).await {
            Ok(r) => r,
            Err(_) => bail!("server did not close within 30 s"),
        }
    }

    /// Sends `connect` and returns `connected`.
    pub async fn handshake(&mut self, token: Option<&str>) -> Result<tether_protocol::Connected> {
        let id = self.id();
        self.send(&ClientMessage::Connect(Connect {
            id,
            token: token.map(str::to_owned),
            ..Connect::default()
        }))
        .await?;
        match self.recv().await? {
            ServerMessage::Connected(c) if c.id == id => Ok(c),
            other => bail!("expected connected, got {other:?}"),
        }
    }

    /// Sends `connect` with a resume token (and optionally the offsets the
    /// client has), returns `connected`.
    pub async fn resume(
        &mut self,
        token: Option<&str>,
        resume_token: &str,
        channels: Option<
            std::collections::BTreeMap<tether_protocol::ChannelName, tether_protocol::Offset>,
        >,
    ) -> Result<tether_protocol::Connected> {
        let id = self.id();
        self.send(&ClientMessage::Connect(Connect {
            id,
            token: token.map(str::to_owned),
            resume: Some(tether_protocol::Resume {
                token: resume_token.to_owned(),
                channels,
            }),
            ..Connect::default()
        }))
        .await?;
        match self.recv().await? {
            ServerMessage::Connected(c) if c.id == id => Ok(c),
            other => bail!("expected connected, got {other:?}"),
        }
    }

    /// Subscribes from a position and returns `subscribed`.
    pub async fn subscribe_since(
        &mut self,
        channel: &str,
        since: tether_protocol::StreamPosition,
    ) -> Result<tether_protocol::Subscribed> {
        let id = self.id();
        self.send(&ClientMessage::Subscribe(tether_protocol::Subscribe {
            id,
            channel: tether_protocol::ChannelName::new(channel)?,
            since: Some(since),
        }))
        .await?;
        match self.recv_skip_pings().await? {
            ServerMessage::Subscribed(s) if s.id == id => Ok(s),
            other => bail!("expected subscribed, got {other:?}"),
        }
    }

    /// Proves that nothing else is queued before a `pong`: sends `ping` and
    /// expects `pong` as the next non-ping message.
    pub async fn expect_nothing_pending(&mut self) -> Result<()> {
        self.send(&ClientMessage::Ping).await?;
        match self.recv_skip_pings().await? {
            ServerMessage::Pong => Ok(()),
            other => bail!("expected pong, got {other:?}"),
        }
    }

    /// Sends `subscribe` for `channel`; returns its id.
    async fn send_subscribe(&mut self, channel: &str) -> Result<u64> {
        let id = self.id();
        self.send(&ClientMessage::Subscribe(tether_protocol::Subscribe {
            id,
            channel: tether_protocol::ChannelName::new(channel)?,
            since: None,
        }))
        .await?;
        Ok(id)
    }

    /// Subscribes where the broker must refuse: returns its `error`.
    pub async fn subscribe_refused(
        &mut self,
        channel: &str,
    ) -> Result<tether_protocol::ErrorReply> {
        let id = self.send_subscribe(channel).await?;
        match self.recv_skip_pings().await? {
            ServerMessage::Error(e) if e.id == Some(id) => Ok(e),
            other => bail!("expected an error, got {other:?}"),
        }
    }

    /// Subscribes and returns `subscribed`.
    pub async fn subscribe(&mut self, channel: &str) -> Result<tether_protocol::Subscribed> {
        let id = self.send_subscribe(channel).await?;
        match self.recv_skip_pings().await? {
            ServerMessage::Subscribed(s) if s.id == id => Ok(s),
            other => bail!("expected subscribed, got {other:?}"),
        }
    }

    /// The next `message` delivery.
    pub async fn recv_publication(&mut self) -> Result<tether_protocol::Publication> {
        match self.recv_skip_pings().await? {
            ServerMessage::Message(p) => Ok(p),
            other => bail!("expected message, got {other:?}"),
        }
    }

    /// Drops the TCP connection without a close handshake.
    pub fn abort(self) {
        drop(self.ws);
    }
}

impl TestBroker {
    /// The `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        Ok(self
            .http()
            .get(self.api_url("/metrics"))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Waits until the metrics contain `line` (e.g. a gauge reaching a value).
    pub async fn wait_for_metric(&self, line: &str) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let m = self.metrics().await?;
            if m.lines().any(|l| l.starts_with(line)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("metric {line:?} not seen within {WAIT:?}:\n{m}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until this broker has no open client connection.
    pub async fn wait_for_no_connections(&self) -> Result<()> {
        self.wait_for_metric("tether_connections{transport=\"ws\"} 0")
            .await
    }
}

impl TestBroker {
    /// A QUIC client connected to this broker (started with
    /// `--quic-addr 127.0.0.1:0`), pinning its self-signed certificate.
    pub async fn quic_client(&self) -> Result<tether_client::Client> {
        let addr = self.quic_addr.context("broker has no QUIC listener")?;
        let fp = self
            .quic_fingerprint
            .clone()
            .context("no certificate fingerprint logged")?;
        Ok(tether_client::Client::connect_quic(
            addr,
            tether_client::QuicOptions::pinned("localhost", &fp),
        )
        .await?)
    }
}

/// Starts the broker with `args` on ephemeral loopback ports (QUIC off),
/// expects it to refuse to start, and returns what it printed on stderr.
pub fn broker_refuses(args: &[&str]) -> String {
    let out = Command::new(broker_bin().expect("broker binary"))
        .args([
            "--client-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
            "--quic-addr",
            "off",
        ])
        .args(args)
        .output()
        .expect("broker runs");
    assert!(!out.status.success(), "the broker started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A connected, handshaken client.
pub async fn connected_client(broker: &TestBroker) -> Result<WsClient> {
    let mut c = WsClient::connect(&broker.ws_url()).await?;
    c.handshake(None).await?;
    Ok(c)
}

/// Signs an HS256 client token.
pub fn hs256_token(secret: &str, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
