//! One task per client connection: `connect` and auth, subscriptions,
//! publishing, acks, heartbeat and liveness, rate limiting, and the close
//! codes of PROTOCOL.md §8. The one place that holds both the transport and
//! the hub; it runs over any [`Transport`].
//!
//! Everything the client is owed goes through the session's bounded
//! [`Outbox`]: replies, pings and the hub's deliveries. The task drains it
//! in batches (one flush per batch) while reading the client, all inside one
//! future, so a session costs one task and no extra buffers when idle. While
//! the session idles, a connection that offers it ([`Transport::direct`],
//! plain-TCP WebSocket) takes pushes straight from the producer's thread
//! (write-through, see [`crate::outbox`]); the session learns what was written
//! through before it needs it (`Session::sync_written`).

pub mod resume;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use tether_protocol::codec::{decode_client, encode_server};
use tether_protocol::{
    ChannelName, ChannelRecovery, ClientMessage, CloseCode, Connected, DecodeError, Disconnect,
    Encoding, ErrorCode, Offset, Published, Refreshed, ServerMessage, StreamPosition, Subscribed,
    Unsubscribed,
};
use tokio::time::{Instant, Sleep};
use tracing::{Instrument, debug, field, trace};

use crate::auth::{AuthError, Grant};
use crate::cluster::{Position, Publish};
use crate::hub::{SubscribeError, Subscriber, SubscriptionId};
use crate::metrics::{CodeLabel, OutcomeLabel, RecoveredLabel, TransportLabel};
use crate::node::Node;
use crate::outbox::{Direct, Drained, Frame, Outbox, SentMetrics};
use crate::push::AckCell;
use crate::transport::{Inbound, Transport, TransportError};
use resume::{Claim, Refusal, ResumeClaims, SessionRecord, SubRecord};

/// Frames moved from the outbox per batch: one flush each.
const BATCH: usize = 256;
/// Longest time spent sending the final `disconnect` and close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Longest wait for a live session to hand itself over to a resume.
const TAKEOVER_WAIT: Duration = Duration::from_secs(3);

/// A token bucket: `rate` per second, holding up to twice that (§8, 4029).
#[derive(Debug)]
struct RateLimit {
    tokens: f32,
    rate: f32,
    last: Instant,
}

impl RateLimit {
    fn new(rate: u32, now: Instant) -> Self {
        Self {
            tokens: 2.0 * rate as f32,
            rate: rate as f32,
            last: now,
        }
    }

    /// Takes one token; `Err(ms)` with the wait until the next one.
    fn take(&mut self, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f32();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(2.0 * self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - self.tokens) / self.rate * 1000.0).ceil() as u64)
        }
    }
}

/// One subscription of the session; `epoch`, `delivered` and `acked` are
/// what a resume needs.
#[derive(Debug)]
struct SubState {
    channel: ChannelName,
    epoch: tether_protocol::Epoch,
    /// Last offset written to the connection.
    delivered: Offset,
    /// Last offset the client acked (cumulative), if it ever acked.
    acked: Option<Offset>,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for `connect` until the deadline.
    Handshake {
        deadline: Instant,
    },
    Active,
}

/// Why the loop ended.
#[derive(Debug)]
enum End {
    /// Close with this code (and tell the client where it can still hear).
    Close(CloseCode, Option<u64>),
    /// The connection is gone or the client closed it: nothing to send.
    Gone,
}

enum Event {
    Inbound(Result<Inbound, TransportError>),
    WriteFailed,
    Close(CloseCode),
    Timer,
}

/// The state of one session.
struct Session {
    node: Arc<Node>,
    conn_id: u64,
    encoding: Encoding,
    outbox: Arc<Outbox>,
    phase: Phase,
    grant: Option<Grant>,
    /// Token expiry as a timer deadline.
    token_deadline: Option<Instant>,
    session_id: String,
    subs: HashMap<u32, SubState>,
    by_channel: HashMap<ChannelName, u32>,
    next_sub: u32,
    rate: RateLimit,
    last_seen: Instant,
    next_ping: Instant,
    /// The device this session runs on (`connect.device`), for push.
    device: Option<String>,
    /// Personal channels this device is live on, with their acks.
    push_acks: Vec<(ChannelName, Arc<AckCell>)>,
    /// This transport's series, looked up once.
    messages_in: Counter,
    sent: SentMetrics,
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The timer deadline at unix time `exp`.
fn deadline_at_unix(exp: u64) -> Instant {
    let now = unix_secs();
    Instant::now() + Duration::from_secs(exp.saturating_sub(now))
}

/// Runs a session over `transport` until it ends.
pub async fn run<T: Transport>(node: Arc<Node>, transport: T, conn_id: u64) {
    let span = tracing::debug_span!("session", conn_id, transport = T::NAME, user = field::Empty);
    run_inner(node, transport, conn_id).instrument(span).await;
}

async fn run_inner<T: Transport>(node: Arc<Node>, mut transport: T, conn_id: u64) {
    let now = Instant::now();
    let label = TransportLabel { transport: T::NAME };
    node.metrics.connections.get_or_create(&label).inc();
    node.metrics
        .connections_accepted
        .get_or_create(&label)
        .inc();
    let outbox = Outbox::new(
        node.config.max_outbox_bytes,
        node.config.max_outbox_messages,
    );
    node.sessions.insert(conn_id, outbox.clone());
    debug!("connection open");

    let messages_in = node.metrics.messages_in.get_or_create(&label).clone();
    let sent = SentMetrics {
        messages_out: node.metrics.messages_out.get_or_create(&label).clone(),
        latency: node.metrics.delivery_latency.clone(),
    };
    if let Some(writer) = transport.direct() {
        outbox.attach_direct(Direct {
            writer,
            metrics: sent.clone(),
        });
    }
    let mut s = Session {
        encoding: transport.encoding(),
        outbox: outbox.clone(),
        phase: Phase::Handshake {
            deadline: now + node.config.connect_timeout,
        },
        grant: None,
        token_deadline: None,
        session_id: String::new(),
        subs: HashMap::new(),
        by_channel: HashMap::new(),
        next_sub: 1,
        rate: RateLimit::new(node.config.client_rate, now),
        last_seen: now,
        next_ping: now,
        device: None,
        push_acks: Vec::new(),
        messages_in,
        sent,
        conn_id,
        node,
    };
    if s.node.is_shutting_down() {
        outbox.close(CloseCode::ShuttingDown);
    }

    let sleep = tokio::time::sleep_until(s.next_deadline());
    tokio::pin!(sleep);
    let mut pending: VecDeque<Frame> = VecDeque::new();

    let end = loop {
        let event = poll_fn(|cx| {
            poll_event(
                cx,
                &mut transport,
                &outbox,
                &mut pending,
                sleep.as_mut(),
                &mut s,
            )
        })
        .await;
        let step = match event {
            Event::Inbound(Ok(Inbound::Message(bytes))) => {
                s.last_seen = Instant::now();
                // Boxed: `connect` (auth, resume, takeover wait) makes this
                // future large, and an idle session should not carry its
                // size for its whole life.
                Box::pin(s.handle_frame(&bytes)).await
            }
            Event::Inbound(Ok(Inbound::Activity)) => {
                s.last_seen = Instant::now();
                Ok(())
            }
            Event::Inbound(Ok(Inbound::Reply(bytes))) => {
                s.last_seen = Instant::now();
                // A full outbox closes the session (4008): nothing else to do.
                let _ = s.outbox.push(Frame::raw(bytes));
                Ok(())
            }
            Event::Inbound(Ok(Inbound::Closed)) => Err(End::Gone),
            Event::Inbound(Err(TransportError::TooLarge)) => {
                Err(End::Close(CloseCode::TooLarge, None))
            }
            Event::Inbound(Err(TransportError::Protocol(reason))) => {
                debug!(%reason, "protocol violation");
                Err(End::Close(CloseCode::ProtocolError, None))
            }
            Event::Inbound(Err(TransportError::Gone(reason))) => {
                debug!(%reason, "connection lost");
                Err(End::Gone)
            }
            Event::WriteFailed => Err(End::Gone),
            Event::Close(code) => Err(End::Close(code, None)),
            Event::Timer => s.on_timer(),
        };
        if let Err(end) = step {
            break end;
        }
        sleep.as_mut().reset(s.next_deadline());
    };

    // From here the session writes its last frames itself.
    outbox.detach_direct();
    s.cleanup();
    match end {
        End::Close(code, retry_after_ms) => {
            s.node
                .metrics
                .disconnects
                .get_or_create(&CodeLabel { code: code.code() })
                .inc();
            debug!(code = code.code(), reason = code.reason(), "closing");
            let mut d = Disconnect::from(code);
            d.retry_after_ms = retry_after_ms;
            let last = encode_server(&ServerMessage::Disconnect(d), s.encoding);
            let close = async {
                if code != CloseCode::SlowConsumer {
                    // Flush what is owed (shutdown: everything queued before it).
                    let _ = poll_fn(|cx| transport.poll_write(cx, &mut pending, &mut |_| {})).await;
                }
                transport.close(code, Some(last)).await;
            };
            let _ = tokio::time::timeout(CLOSE_GRACE, Box::pin(close)).await;
        }
        End::Gone => debug!("connection closed by peer"),
    }
    s.node.metrics.connections.get_or_create(&label).dec();
}

/// Polls everything the session waits on, in one place: urgent closes, the
/// outbox into the connection, the connection's input, then the timer.
fn poll_event<T: Transport>(
    cx: &mut Context<'_>,
    transport: &mut T,
    outbox: &Outbox,
    pending: &mut VecDeque<Frame>,
    sleep: Pin<&mut Sleep>,
    s: &mut Session,
) -> Poll<Event> {
    if let Some(code) = outbox.urgent_close(cx) {
        return Poll::Ready(Event::Close(code));
    }
    let metrics = &s.sent;
    let subs = &mut s.subs;
    let mut rounds = 0;
    loop {
        let mut sent = |f: Frame| {
            metrics.count(&f);
            if let Some(d) = f.delivery
                && let Some(sub) = subs.get_mut(&d.sub)
                && d.offset > sub.delivered
            {
                sub.delivered = d.offset;
            }
        };
        match transport.poll_write(cx, pending, &mut sent) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => {
                debug!(error = %e, "write failed");
                return Poll::Ready(Event::WriteFailed);
            }
            Poll::Pending => break,
        }
        // Only now, with everything taken so far in the connection (no frame
        // left in `pending`, none half-written inside the transport), may an
        // empty outbox turn idle and let producers write through.
        match outbox.poll_drain(cx, pending, BATCH) {
            Poll::Ready(Drained::Close(code)) => return Poll::Ready(Event::Close(code)),
            Poll::Ready(Drained::Frames) => {}
            Poll::Pending => break,
        }
        rounds += 1;
        if rounds == 8 {
            // Let reads and other tasks in; come back straight away.
            cx.waker().wake_by_ref();
            break;
        }
    }
    if let Poll::Ready(r) = transport.poll_recv(cx) {
        return Poll::Ready(Event::Inbound(r));
    }
    if sleep.poll(cx).is_ready() {
        return Poll::Ready(Event::Timer);
    }
    Poll::Pending
}

impl Session {
    fn reply(&self, msg: &ServerMessage) {
        // A full outbox closes the session (4008): nothing else to do here.
        let _ = self
            .outbox
            .push(Frame::reply(encode_server(msg, self.encoding)));
    }

    fn error(&self, id: Option<u64>, code: ErrorCode, message: impl Into<String>) {
        self.reply(&ServerMessage::error(id, code, message));
    }

    fn next_deadline(&self) -> Instant {
        match self.phase {
            Phase::Handshake { deadline } => deadline,
            Phase::Active => {
                let liveness = self.last_seen + 2 * self.node.config.heartbeat;
                let mut d = self.next_ping.min(liveness);
                if let Some(t) = self.token_deadline {
                    d = d.min(t);
                }
                d
            }
        }
    }

    fn on_timer(&mut self) -> Result<(), End> {
        let now = Instant::now();
        match self.phase {
            Phase::Handshake { deadline } => {
                if now >= deadline {
                    debug!("no connect in time");
                    return Err(End::Close(CloseCode::ProtocolError, None));
                }
            }
            Phase::Active => {
                let hb = self.node.config.heartbeat;
                if now >= self.last_seen + 2 * hb {
                    return Err(End::Close(CloseCode::HeartbeatTimeout, None));
                }
                if self.token_deadline.is_some_and(|t| now >= t) {
                    return Err(End::Close(CloseCode::TokenExpired, None));
                }
                if now >= self.next_ping {
                    self.reply(&ServerMessage::Ping);
                    self.next_ping = now + hb;
                }
            }
        }
        Ok(())
    }

    /// Takes in the deliveries the hub wrote through to the connection.
    fn sync_written(&mut self) {
        let subs = &mut self.subs;
        self.outbox.take_written(|d| {
            if let Some(sub) = subs.get_mut(&d.sub)
                && d.offset > sub.delivered
            {
                sub.delivered = d.offset;
            }
        });
    }

    async fn handle_frame(&mut self, bytes: &[u8]) -> Result<(), End> {
        let now = Instant::now();
        self.sync_written();
        self.messages_in.inc();
        if let Err(retry_after_ms) = self.rate.take(now) {
            return Err(End::Close(CloseCode::RateLimited, Some(retry_after_ms)));
        }
        let msg = match decode_client(bytes, self.encoding, self.node.config.max_message_size) {
            Ok(m) => m,
            Err(e) if e.is_fatal() => {
                debug!(error = %e, "undecodable message");
                return Err(End::Close(e.close_code(), None));
            }
            Err(e) => {
                if matches!(self.phase, Phase::Handshake { .. }) {
                    debug!(error = %e, "bad message before connect");
                    return Err(End::Close(CloseCode::ProtocolError, None));
                }
                trace!(error = %e, "bad request");
                let id = e.id();
                let message = match e {
                    DecodeError::UnknownType { kind, .. } => {
                        format!("unknown message type {kind:?}")
                    }
                    other => other.to_string(),
                };
                self.error(id, ErrorCode::BadRequest, message);
                return Ok(());
            }
        };
        trace!(kind = msg.kind(), "message");
        match self.phase {
            Phase::Handshake { .. } => match msg {
                ClientMessage::Connect(c) => self.on_connect(c).await,
                _ => {
                    debug!(kind = msg.kind(), "message before connect");
                    Err(End::Close(CloseCode::ProtocolError, None))
                }
            },
            Phase::Active => {
                self.on_message(msg).await;
                Ok(())
            }
        }
    }

    async fn on_connect(&mut self, c: tether_protocol::Connect) -> Result<(), End> {
        let grant = match self.node.verifier.verify(c.token.as_deref()) {
            Ok(g) => g,
            Err(AuthError::Expired) => return Err(End::Close(CloseCode::TokenExpired, None)),
            Err(e) => {
                debug!(error = %e, "connect refused");
                return Err(End::Close(CloseCode::Unauthorized, None));
            }
        };
        let user = grant
            .user
            .as_ref()
            .map(|u| u.as_str().to_owned())
            .unwrap_or_default();
        tracing::Span::current().record("user", user.as_str());
        self.token_deadline = grant.expires.map(deadline_at_unix);
        self.grant = Some(grant);
        self.device = match c.device.as_deref() {
            Some(d) if tether_push_gateway::validate::validate_device_id(d).is_ok() => {
                Some(d.to_owned())
            }
            Some(_) => {
                debug!("connect.device is not a valid device id: ignored");
                None
            }
            None => None,
        };

        let mut restored: Option<(String, SessionRecord)> = None;
        if let Some(resume) = &c.resume {
            let outcome = match self.node.resume_keys.verify(&resume.token) {
                None => Err(Refusal::Invalid),
                Some(claims) => match self.node.resumes.claim(&claims, &user) {
                    Claim::Ready(record) => Ok((claims.session, record)),
                    Claim::TakeOver(rx) => match tokio::time::timeout(TAKEOVER_WAIT, rx).await {
                        Ok(Ok(record)) => Ok((claims.session, record)),
                        _ => Err(Refusal::TakeoverFailed),
                    },
                    Claim::Refused(r) => Err(r),
                },
            };
            let label = match &outcome {
                Ok(_) => "resumed",
                Err(r) => r.as_str(),
            };
            self.node
                .metrics
                .resumes
                .get_or_create(&OutcomeLabel { outcome: label })
                .inc();
            match outcome {
                Ok(r) => restored = Some(r),
                Err(r) => debug!(reason = r.as_str(), "resume refused: fresh session"),
            }
        }

        let resumed = restored.is_some();
        let (session_id, record) = match restored {
            Some((id, record)) => (id, Some(record)),
            None => (
                format!("{:016x}{:08x}", rand::random::<u64>(), self.conn_id as u32),
                None,
            ),
        };
        self.session_id = session_id;
        let nonce = rand::random::<u64>();
        let resume_token = self.node.resume_keys.sign(&ResumeClaims {
            session: self.session_id.clone(),
            user,
            nonce,
        });
        self.node
            .resumes
            .register_live(&self.session_id, self.conn_id, nonce, self.outbox.clone());
        let hb = self.node.config.heartbeat;
        let now = Instant::now();
        // The first ping lands somewhere in the second half of the period, so
        // that a wave of reconnects does not ping in step.
        let jitter = hb.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        self.next_ping = now + jitter;
        self.phase = Phase::Active;

        // Replays are queued behind the `connected` pushed in front of them
        // below: nothing may be written through meanwhile.
        self.outbox.hold();
        let mut ended = Vec::new();
        let channels = match record {
            Some(r) => {
                let named = c.resume.as_ref().and_then(|r| r.channels.as_ref());
                Some(self.restore(r, named, &mut ended).await)
            }
            None => None,
        };
        let connected = ServerMessage::Connected(Connected {
            id: c.id,
            session: self.session_id.clone(),
            resume_token,
            heartbeat: hb.as_secs(),
            resumed,
            channels,
            node: self.node.node_id().to_owned(),
        });
        // Replays of a resume are queued already: `connected` goes first.
        let _ = self
            .outbox
            .push_front(Frame::reply(encode_server(&connected, self.encoding)));
        // Subscriptions that could not be restored (the broker was out of
        // reach): the client hears that they ended, and may subscribe again.
        for (channel, reason) in ended {
            self.reply(&ServerMessage::Unsubscribed(Unsubscribed {
                id: None,
                channel,
                reason: Some(reason),
            }));
        }
        debug!(session = %self.session_id, resumed, "connected");
        Ok(())
    }

    /// Re-subscribes the channels of a resumed session, replaying what the
    /// client missed on each; returns the per-channel outcome for
    /// `connected`. Channels that cannot be restored now go to `ended`.
    async fn restore(
        &mut self,
        record: SessionRecord,
        named: Option<&BTreeMap<ChannelName, Offset>>,
        ended: &mut Vec<(ChannelName, String)>,
    ) -> BTreeMap<ChannelName, ChannelRecovery> {
        let mut out = BTreeMap::new();
        for sub in record.subs {
            if !self.grant().may_subscribe(&sub.channel) {
                continue;
            }
            let after = named
                .and_then(|m| m.get(&sub.channel).copied())
                .or(sub.acked)
                .unwrap_or(sub.delivered);
            let since = StreamPosition {
                epoch: sub.epoch,
                offset: after,
            };
            let n = self.new_sub_number();
            let subscriber = self.subscriber(n);
            let result = match self
                .node
                .hub
                .subscribe(&sub.channel, subscriber, Some(&since), |_, _| None)
                .await
            {
                Ok(r) => r,
                // The outbox overflowed: the session is closing as slow.
                Err(SubscribeError::Outbox(_)) => break,
                Err(SubscribeError::Broker(e)) => {
                    debug!(channel = %sub.channel, error = %e, "cannot restore a subscription");
                    ended.push((sub.channel, e.code().as_str().to_owned()));
                    continue;
                }
            };
            self.count_recovery(result.recovered, result.replayed);
            self.subs.insert(
                n,
                SubState {
                    channel: sub.channel.clone(),
                    epoch: result.position.epoch.clone(),
                    delivered: if result.recovered {
                        after
                    } else {
                        result.position.offset
                    },
                    acked: if result.recovered { sub.acked } else { None },
                },
            );
            self.by_channel.insert(sub.channel.clone(), n);
            self.track_presence(
                &sub.channel,
                if result.recovered { sub.acked } else { None },
            );
            out.insert(
                sub.channel,
                ChannelRecovery {
                    epoch: result.position.epoch,
                    offset: result.position.offset,
                    recovered: result.recovered,
                },
            );
        }
        out
    }

    /// Marks this session's device live on a personal channel of its user
    /// (for the offline-push decision), starting from `acked`.
    fn track_presence(&mut self, channel: &ChannelName, acked: Option<Offset>) {
        let Some(device) = &self.device else {
            return;
        };
        let Some(owner) = channel.personal_user() else {
            return;
        };
        if let Some(user) = &self.grant().user
            && user.as_str() != owner
        {
            return;
        }
        let cell = Arc::new(AckCell::default());
        if let Some(a) = acked {
            cell.ack(a);
        }
        self.node
            .push
            .presence()
            .register(device, self.conn_id, channel.clone(), cell.clone());
        self.push_acks.push((channel.clone(), cell));
    }

    fn untrack_presence(&mut self, channel: &ChannelName) {
        if let Some(device) = &self.device
            && let Some(i) = self.push_acks.iter().position(|(c, _)| c == channel)
        {
            self.node
                .push
                .presence()
                .unregister(device, self.conn_id, channel);
            self.push_acks.swap_remove(i);
        }
    }

    fn new_sub_number(&mut self) -> u32 {
        let n = self.next_sub;
        self.next_sub = self.next_sub.wrapping_add(1).max(1);
        n
    }

    fn subscriber(&self, n: u32) -> Subscriber {
        Subscriber {
            id: SubscriptionId {
                session: self.conn_id,
                sub: n,
            },
            outbox: self.outbox.clone(),
            encoding: self.encoding,
        }
    }

    fn count_recovery(&self, recovered: bool, replayed: usize) {
        let m = &self.node.metrics;
        m.recoveries
            .get_or_create(&RecoveredLabel {
                recovered: if recovered { "true" } else { "false" },
            })
            .inc();
        m.replayed.inc_by(replayed as u64);
    }

    fn grant(&self) -> &Grant {
        // Active sessions always hold a grant; fall back to nothing allowed.
        static NONE: std::sync::OnceLock<Grant> = std::sync::OnceLock::new();
        self.grant.as_ref().unwrap_or_else(|| {
            NONE.get_or_init(|| Grant {
                user: tether_protocol::UserId::new("-").ok(),
                expires: None,
                channels: Some(Vec::new()),
                may_publish: false,
            })
        })
    }

    async fn on_message(&mut self, msg: ClientMessage) {
        match msg {
            ClientMessage::Connect(c) => {
                self.error(Some(c.id), ErrorCode::BadRequest, "already connected");
            }
            ClientMessage::Subscribe(sub) => self.on_subscribe(sub).await,
            ClientMessage::Unsubscribe(u) => {
                if let Some(n) = self.by_channel.remove(&u.channel) {
                    self.subs.remove(&n);
                    self.untrack_presence(&u.channel);
                    self.node.hub.unsubscribe(
                        &u.channel,
                        SubscriptionId {
                            session: self.conn_id,
                            sub: n,
                        },
                    );
                }
                self.reply(&ServerMessage::Unsubscribed(Unsubscribed {
                    id: Some(u.id),
                    channel: u.channel,
                    reason: None,
                }));
            }
            ClientMessage::Publish(p) => {
                if !self.grant().may_publish_to(&p.channel) {
                    self.error(
                        Some(p.id),
                        ErrorCode::Forbidden,
                        "not allowed to publish to this channel",
                    );
                    return;
                }
                let published = self
                    .node
                    .broker
                    .publish(Publish {
                        channel: &p.channel,
                        data: &p.data,
                        raw: crate::hub::encode_data(&p.data),
                        idempotency_key: None,
                    })
                    .await;
                match published {
                    Ok(done) => {
                        self.node
                            .metrics
                            .publications
                            .get_or_create(&crate::metrics::SourceLabel { source: "client" })
                            .inc();
                        self.reply(&ServerMessage::Published(Published {
                            id: p.id,
                            channel: p.channel,
                            epoch: done.position.epoch,
                            offset: done.position.offset,
                        }));
                    }
                    Err(e) => self.error(Some(p.id), e.code(), e.to_string()),
                }
            }
            ClientMessage::Ack(a) => {
                if let Some(sub) = self
                    .by_channel
                    .get(&a.channel)
                    .and_then(|n| self.subs.get_mut(n))
                {
                    // Cumulative, and never beyond what was written.
                    let offset = a.offset.min(sub.delivered);
                    if sub.acked.is_none_or(|acked| offset > acked) {
                        sub.acked = Some(offset);
                    }
                    if let Some((_, cell)) = self.push_acks.iter().find(|(c, _)| c == &a.channel) {
                        cell.ack(offset);
                    }
                }
            }
            ClientMessage::Refresh(r) => self.on_refresh(r),
            ClientMessage::Ping => self.reply(&ServerMessage::Pong),
            ClientMessage::Pong => {}
        }
    }

    async fn on_subscribe(&mut self, sub: tether_protocol::Subscribe) {
        if self.by_channel.len() >= self.node.config.max_subscriptions {
            self.error(
                Some(sub.id),
                ErrorCode::BadRequest,
                format!(
                    "at most {} subscriptions per session",
                    self.node.config.max_subscriptions
                ),
            );
            return;
        }
        if self.by_channel.contains_key(&sub.channel) {
            self.error(
                Some(sub.id),
                ErrorCode::BadRequest,
                "already subscribed to this channel",
            );
            return;
        }
        if !self.grant().may_subscribe(&sub.channel) {
            self.error(
                Some(sub.id),
                ErrorCode::Forbidden,
                "not allowed to subscribe to this channel",
            );
            return;
        }
        let n = self.new_sub_number();
        let subscriber = self.subscriber(n);
        let encoding = self.encoding;
        let id = sub.id;
        let channel = sub.channel.clone();
        let reply = |pos: &Position, recovered: bool| {
            Some(Frame::reply(encode_server(
                &ServerMessage::Subscribed(Subscribed {
                    id,
                    channel: channel.clone(),
                    epoch: pos.epoch.clone(),
                    offset: pos.offset,
                    recovered,
                }),
                encoding,
            )))
        };
        match self
            .node
            .hub
            .subscribe(&sub.channel, subscriber, sub.since.as_ref(), reply)
            .await
        {
            Ok(result) => {
                if sub.since.is_some() {
                    self.count_recovery(result.recovered, result.replayed);
                }
                let start = match (&sub.since, result.recovered) {
                    (Some(since), true) => since.offset,
                    _ => result.position.offset,
                };
                self.subs.insert(
                    n,
                    SubState {
                        channel: sub.channel.clone(),
                        epoch: result.position.epoch,
                        delivered: start,
                        acked: None,
                    },
                );
                self.track_presence(&sub.channel, None);
                self.by_channel.insert(sub.channel, n);
            }
            Err(SubscribeError::Outbox(_)) => {
                // The outbox overflowed: the session is closing as slow.
            }
            Err(SubscribeError::Broker(e)) => self.error(Some(id), e.code(), e.to_string()),
        }
    }

    fn on_refresh(&mut self, r: tether_protocol::Refresh) {
        if !self.node.verifier.enabled() {
            self.error(
                Some(r.id),
                ErrorCode::BadRequest,
                "client auth is not configured",
            );
            return;
        }
        match self.node.verifier.verify(Some(&r.token)) {
            Ok(g) if g.user != self.grant().user => {
                self.error(
                    Some(r.id),
                    ErrorCode::Forbidden,
                    "token belongs to another user",
                );
            }
            Ok(g) => {
                let expires = g.expires.unwrap_or(0);
                self.token_deadline = g.expires.map(deadline_at_unix);
                self.grant = Some(g);
                self.reply(&ServerMessage::Refreshed(Refreshed { id: r.id, expires }));
            }
            Err(e) => self.error(Some(r.id), ErrorCode::Unauthorized, e.to_string()),
        }
    }

    /// Leaves the hub and the session table; leaves what a resume needs.
    fn cleanup(&mut self) {
        self.sync_written();
        let mut record = SessionRecord::default();
        for (n, sub) in self.subs.drain() {
            self.node.hub.unsubscribe(
                &sub.channel,
                SubscriptionId {
                    session: self.conn_id,
                    sub: n,
                },
            );
            record.subs.push(SubRecord {
                channel: sub.channel,
                epoch: sub.epoch,
                delivered: sub.delivered,
                acked: sub.acked,
            });
        }
        self.by_channel.clear();
        let tracked: Vec<ChannelName> = self.push_acks.iter().map(|(c, _)| c.clone()).collect();
        for c in tracked {
            self.untrack_presence(&c);
        }
        self.node.sessions.remove(self.conn_id);
        if matches!(self.phase, Phase::Active) {
            self.node.resumes.detach(
                &self.session_id,
                self.conn_id,
                record,
                self.node.config.resume_window,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_allows_bursts_of_twice_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, t0);
        for _ in 0..20 {
            assert!(r.take(t0).is_ok());
        }
        let wait = r.take(t0).expect_err("bucket empty");
        assert_eq!(wait, 100);
        assert!(r.take(t0 + Duration::from_millis(100)).is_ok());
    }
}
