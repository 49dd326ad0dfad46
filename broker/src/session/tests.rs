//! The session over an in-memory transport, on paused tokio time: the
//! timers (connect timeout, heartbeat and 4005, token expiry and 4011), the
//! rate limit, acks and resume, takeover — each in virtual seconds.

use std::collections::VecDeque;
use std::task::{Context, Poll};

use bytes::Bytes;
use prometheus_client::registry::Registry;
use serde_json::json;
use tether_protocol::codec::{decode_server, encode_client};
use tether_protocol::{
    Ack, ChannelName, ClientMessage, Connect, Offset, Refresh, Resume, Subscribe,
};
use tokio::sync::{mpsc, watch};

use super::*;
use crate::cluster::memory::{
    LocalBus, MemoryBroker, MemoryBrokerConfig, MemoryPresence, MemoryResumeStore,
};
use crate::cluster::{ControlSink, Publish};
use crate::config::ClientAuth;
use crate::hub::HubConfig;

const SECRET: &str = "session-test-secret";

/// A connection made of two channels: what the client sends, what the
/// session writes; and how the session closed it.
struct MemTransport {
    inbound: mpsc::UnboundedReceiver<Inbound>,
    outbound: mpsc::UnboundedSender<Bytes>,
    closed: watch::Sender<Option<CloseCode>>,
}

impl Transport for MemTransport {
    const NAME: &'static str = "mem";

    fn encoding(&self) -> Encoding {
        Encoding::Json
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Inbound, TransportError>> {
        self.inbound
            .poll_recv(cx)
            .map(|m| Ok(m.unwrap_or(Inbound::Closed)))
    }

    fn poll_write(
        &mut self,
        _cx: &mut Context<'_>,
        frames: &mut VecDeque<Frame>,
        sent: &mut dyn FnMut(Frame),
    ) -> Poll<Result<(), TransportError>> {
        while let Some(f) = frames.pop_front() {
            let _ = self.outbound.send(f.bytes.clone());
            sent(f);
        }
        Poll::Ready(Ok(()))
    }

    async fn close(&mut self, code: CloseCode, last: Option<Bytes>) {
        if let Some(b) = last {
            let _ = self.outbound.send(b);
        }
        self.closed.send_replace(Some(code));
    }
}

/// The client's end of a [`MemTransport`].
struct Client {
    to_session: Option<mpsc::UnboundedSender<Inbound>>,
    from_session: mpsc::UnboundedReceiver<Bytes>,
    closed: watch::Receiver<Option<CloseCode>>,
}

impl Client {
    fn send(&self, msg: ClientMessage) {
        if let Some(tx) = &self.to_session {
            let _ = tx.send(Inbound::Message(encode_client(&msg, Encoding::Json)));
        }
    }

    /// The connection drops without a word (no close handshake).
    fn drop_connection(&mut self) {
        self.to_session = None;
    }

    async fn recv(&mut self) -> Option<ServerMessage> {
        let bytes = self.from_session.recv().await?;
        Some(
            decode_server(&bytes, Encoding::Json, 1 << 20)
                .expect("the session writes valid messages"),
        )
    }

    /// The next message that is not a ping.
    async fn next(&mut self) -> ServerMessage {
        loop {
            match self.recv().await {
                Some(ServerMessage::Ping) => {}
                Some(m) => return m,
                None => panic!("the session ended"),
            }
        }
    }

    /// Resumes with `token`, naming no offsets.
    async fn resume(&mut self, token: &str) -> tether_protocol::Connected {
        self.connect(
            None,
            Some(Resume {
                token: token.to_owned(),
                channels: None,
            }),
        )
        .await
    }

    async fn subscribe(&mut self, channel: &str) {
        self.send(ClientMessage::Subscribe(Subscribe {
            id: 2,
            channel: chan(channel),
            since: None,
        }));
        assert!(matches!(self.next().await, ServerMessage::Subscribed(_)));
    }

    async fn closed(&mut self) -> CloseCode {
        match self.closed.wait_for(Option::is_some).await {
            Ok(code) => code.unwrap_or(CloseCode::Normal),
            Err(_) => panic!("the session ended without closing"),
        }
    }

    async fn connect(
        &mut self,
        token: Option<String>,
        resume: Option<Resume>,
    ) -> tether_protocol::Connected {
        self.send(ClientMessage::Connect(Connect {
            id: 1,
            token,
            resume,
            ..Connect::default()
        }));
        match self.next().await {
            ServerMessage::Connected(c) => c,
            other => panic!("expected connected, got {other:?}"),
        }
    }
}

fn config() -> SessionConfig {
    SessionConfig {
        node_id: "test-node".into(),
        heartbeat: Duration::from_secs(25),
        connect_timeout: Duration::from_secs(10),
        subscribe_rate: 1000,
        client_rate: 100,
        max_message_size: 64 * 1024,
        max_subscriptions: 16,
        max_outbox_bytes: 1 << 20,
        max_outbox_messages: 4096,
        resume_window: Duration::from_secs(120),
    }
}

/// A node's session handles with the in-memory implementations.
fn shared(config: SessionConfig, auth: ClientAuth) -> Arc<Shared> {
    let metrics = Metrics::new(&mut Registry::default());
    let m = metrics.clone();
    let hub = Hub::with_broker(
        HubConfig {
            history_limit: 100,
            max_buffered: 4096,
        },
        metrics.clone(),
        |sink| {
            MemoryBroker::new(
                MemoryBrokerConfig {
                    history_size: 100,
                    history_ttl: Duration::from_secs(300),
                    idle_channel_ttl: Duration::from_secs(600),
                    idempotency_keys: 100,
                    max_channels: 1_000_000,
                    max_history_bytes: usize::MAX,
                },
                m,
                sink,
            )
        },
    );
    let table = Arc::new(SessionTable::default());
    let control = Arc::downgrade(&table) as std::sync::Weak<dyn ControlSink>;
    Arc::new(Shared {
        broker: hub.broker().clone(),
        hub,
        verifier: Verifier::new(&auth).expect("valid auth"),
        keys: ResumeKeys::new(Some(b"0123456789abcdef".to_vec())),
        resumes: Arc::new(MemoryResumeStore::new(config.node_id.clone())),
        bus: Arc::new(LocalBus::new(config.node_id.clone(), control)),
        presence: Arc::new(MemoryPresence::new(2 * config.heartbeat)),
        table,
        metrics,
        lifecycle: Arc::new(Lifecycle::default()),
        config,
    })
}

/// Starts a session over a fresh in-memory connection.
fn start(shared: &Arc<Shared>) -> Client {
    let (to_session, inbound) = mpsc::unbounded_channel();
    let (outbound, from_session) = mpsc::unbounded_channel();
    let (closed_tx, closed) = watch::channel(None);
    let transport = MemTransport {
        inbound,
        outbound,
        closed: closed_tx,
    };
    let conn_id = shared.table.next_conn_id();
    tokio::spawn(run(shared.clone(), transport, conn_id));
    Client {
        to_session: Some(to_session),
        from_session,
        closed,
    }
}

fn chan(s: &str) -> ChannelName {
    ChannelName::new(s).expect("valid")
}

async fn publish(shared: &Shared, channel: &str, data: serde_json::Value) -> Offset {
    let c = chan(channel);
    shared
        .broker
        .publish(Publish {
            channel: &c,
            raw: crate::hub::encode_data(&data),
            data: Some(&data),
            idempotency_key: None,
        })
        .await
        .expect("published")
        .position
        .offset
}

fn jwt(sub: &str, exp: u64) -> String {
    jwt_with(json!({"sub": sub, "exp": exp}))
}

fn jwt_with(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("signs")
}

fn offsets_of(m: &ServerMessage) -> Option<u64> {
    match m {
        ServerMessage::Message(p) => Some(p.offset.get()),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn no_connect_within_the_timeout_closes_with_4001() {
    let shared = shared(config(), ClientAuth::Anonymous);
    let mut client = start(&shared);
    let t0 = Instant::now();
    assert_eq!(client.closed().await, CloseCode::ProtocolError);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "closed after {waited:?} of virtual time"
    );
    assert!(shared.table.is_empty(), "the session left the table");
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_pinged_then_closed_with_4005_after_two_heartbeats() {
    let shared = shared(config(), ClientAuth::Anonymous);
    let mut client = start(&shared);
    client.connect(None, None).await;
    let t0 = Instant::now();
    // The first ping is jittered into the second half of the period.
    assert_eq!(client.recv().await, Some(ServerMessage::Ping));
    let first = t0.elapsed();
    assert!(
        first >= Duration::from_millis(12_500) && first <= Duration::from_secs(25),
        "first ping after {first:?}"
    );
    // Answering keeps the session: three more periods with pongs.
    client.send(ClientMessage::Pong);
    let answered = Instant::now();
    for _ in 0..3 {
        assert_eq!(client.recv().await, Some(ServerMessage::Ping));
        client.send(ClientMessage::Pong);
    }
    assert!(answered.elapsed() >= Duration::from_secs(75));
    // Then silence: closed two heartbeats after the last pong.
    let silent = Instant::now();
    assert_eq!(client.closed().await, CloseCode::HeartbeatTimeout);
    let waited = silent.elapsed();
    assert!(
        waited >= Duration::from_secs(50) && waited < Duration::from_secs(51),
        "closed after {waited:?} of silence"
    );
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_closes_with_4011_unless_refreshed() {
    let mut cfg = config();
    cfg.heartbeat = Duration::from_secs(1000);
    let shared = shared(cfg, ClientAuth::Secret(SECRET.as_bytes().to_vec()));
    let now_unix = unix_secs();
    let mut client = start(&shared);
    client
        .connect(Some(jwt("alice", now_unix + 30)), None)
        .await;
    // Refreshed at 20 s (virtual; the wall clock barely moved, and the
    // expiry is counted on it) with a token valid for 60 s from now.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let exp = unix_secs() + 60;
    client.send(ClientMessage::Refresh(Refresh {
        id: 2,
        token: jwt("alice", exp),
    }));
    assert!(matches!(client.next().await, ServerMessage::Refreshed(r) if r.expires == exp));
    let t = Instant::now();
    assert_eq!(client.closed().await, CloseCode::TokenExpired);
    let waited = t.elapsed();
    // At `exp` plus the clock leeway the token was checked with.
    let leeway = Duration::from_secs(crate::auth::LEEWAY_SECS);
    assert!(
        waited >= Duration::from_secs(59) + leeway && waited <= Duration::from_secs(61) + leeway,
        "closed {waited:?} after the refresh (the first token ended 10 s after it)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_token_that_expires_beyond_the_clock_does_not_overflow() {
    let shared = shared(config(), ClientAuth::Secret(SECRET.as_bytes().to_vec()));
    let mut client = start(&shared);
    client.connect(Some(jwt("alice", u64::MAX)), None).await;
    client.send(ClientMessage::Ping);
    assert_eq!(client.next().await, ServerMessage::Pong);
}

#[tokio::test(start_paused = true)]
async fn more_than_twice_the_rate_at_once_closes_with_4029_and_a_delay() {
    let mut cfg = config();
    cfg.client_rate = 5;
    let shared = shared(cfg, ClientAuth::Anonymous);
    let mut client = start(&shared);
    client.connect(None, None).await; // one token of the ten spent
    for _ in 0..10 {
        client.send(ClientMessage::Ping);
    }
    for _ in 0..9 {
        assert_eq!(client.next().await, ServerMessage::Pong);
    }
    match client.next().await {
        ServerMessage::Disconnect(d) => {
            assert_eq!(d.code, 4029);
            assert!(d.reconnect);
            assert!(
                d.retry_after_ms.is_some_and(|ms| ms > 0 && ms <= 200),
                "{d:?}"
            );
        }
        other => panic!("expected disconnect, got {other:?}"),
    }
    assert_eq!(client.closed().await, CloseCode::RateLimited);
}

#[tokio::test(start_paused = true)]
async fn acks_decide_where_a_resume_replays_from() {
    let shared = shared(config(), ClientAuth::Anonymous);
    let mut client = start(&shared);
    let first = client.connect(None, None).await;
    client.subscribe("news").await;
    for i in 1..=4 {
        publish(&shared, "news", json!(i)).await;
    }
    let mut got = Vec::new();
    while got.len() < 4 {
        got.extend(offsets_of(&client.next().await));
    }
    assert_eq!(got, vec![1, 2, 3, 4]);
    // Acked up to 2: a resume without named offsets replays 3 and 4.
    client.send(ClientMessage::Ack(Ack {
        channel: chan("news"),
        offset: Offset(2),
    }));
    client.send(ClientMessage::Ping);
    assert_eq!(client.next().await, ServerMessage::Pong);
    client.drop_connection();
    assert_eq!(client.recv().await, None, "the session ended");

    let mut again = start(&shared);
    let resumed = again.resume(&first.resume_token).await;
    assert!(resumed.resumed);
    let news = &resumed.channels.as_ref().expect("channels")[&chan("news")];
    assert!(news.recovered);
    assert_eq!(news.offset, Offset(4));
    publish(&shared, "news", json!(5)).await;
    let mut got = Vec::new();
    while got.len() < 3 {
        got.extend(offsets_of(&again.next().await));
    }
    assert_eq!(got, vec![3, 4, 5]);
}

#[tokio::test(start_paused = true)]
async fn a_resume_of_a_live_session_takes_it_over_with_4000() {
    let shared = shared(config(), ClientAuth::Anonymous);
    let mut old = start(&shared);
    let first = old.connect(None, None).await;
    old.subscribe("news").await;
    publish(&shared, "news", json!(1)).await;
    assert_eq!(offsets_of(&old.next().await), Some(1));

    let mut new = start(&shared);
    let resumed = new.resume(&first.resume_token).await;
    assert!(resumed.resumed);
    assert_eq!(resumed.session, first.session);
    match old.next().await {
        ServerMessage::Disconnect(d) => assert_eq!(d.code, 4000),
        other => panic!("expected disconnect, got {other:?}"),
    }
    assert_eq!(old.closed().await, CloseCode::Normal);
    // The new connection carries the subscription on.
    publish(&shared, "news", json!(2)).await;
    assert_eq!(offsets_of(&new.next().await), Some(2));
    // The token was used: a second resume with it gives a fresh session.
    let mut third = start(&shared);
    let fresh = third.resume(&first.resume_token).await;
    assert!(!fresh.resumed);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_that_drops_a_channel_ends_that_subscription() {
    let shared = shared(config(), ClientAuth::Secret(SECRET.as_bytes().to_vec()));
    let exp = unix_secs() + 3600;
    let mut client = start(&shared);
    let both = jwt_with(json!({"sub": "alice", "exp": exp, "channels": ["a:keep", "a:lose"]}));
    client.connect(Some(both), None).await;
    client.subscribe("a:keep").await;
    client.subscribe("a:lose").await;
    let fewer = jwt_with(json!({"sub": "alice", "exp": exp, "channels": ["a:keep"]}));
    client.send(ClientMessage::Refresh(Refresh {
        id: 3,
        token: fewer,
    }));
    assert!(matches!(client.next().await, ServerMessage::Refreshed(_)));
    assert_eq!(
        client.next().await,
        ServerMessage::Unsubscribed(tether_protocol::Unsubscribed {
            id: None,
            channel: chan("a:lose"),
            reason: Some("forbidden".into()),
        })
    );
    // A barrier: what is published on the lost channel first never comes;
    // the kept channel's message after it does.
    publish(&shared, "a:lose", json!("gone")).await;
    publish(&shared, "a:keep", json!("kept")).await;
    match client.next().await {
        ServerMessage::Message(m) => assert_eq!(m.channel, chan("a:keep")),
        other => panic!("expected the kept channel's message, got {other:?}"),
    }
}
