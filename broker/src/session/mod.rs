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
//! (write-through, see [`crate::outbox`]); the session learns what was
//! written through before it needs it (`Session::sync_written`).
//!
//! What a session needs of the node comes in one [`Shared`]: handles to the
//! hub, the broker, the resume store and the node bus, presence, the token
//! verifier, the session table, metrics and its [`SessionConfig`].
//!
//! Files: `connect` (auth, resume, takeover), `handle` (the messages of an
//! active session), `subscriptions` (what the session is subscribed to and
//! delivered), `rate` (the 4029 budget), `table` (this node's sessions),
//! `token` (resume tokens).

mod connect;
mod handle;
mod subscriptions;
pub mod table;
#[cfg(test)]
mod tests;
pub mod token;

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use tether_protocol::codec::encode_server;
use tether_protocol::{ChannelName, CloseCode, Disconnect, Encoding, ErrorCode, ServerMessage};
use tokio::time::{Instant, Sleep};
use tracing::{Instrument, debug, field};

use crate::auth::{Grant, Verifier};
use crate::cluster::{Broker, NodeBus, Presence, PresenceKey, ResumeStore};
use crate::hub::{Hub, SubscriptionId};
use crate::lifecycle::Lifecycle;
use crate::metrics::{CodeLabel, Metrics, TransportLabel};
use crate::outbox::{Direct, Drained, Frame, Outbox, SentMetrics};
use crate::rate::RateLimit;
use crate::transport::{Inbound, Transport, TransportError};
use subscriptions::Subscriptions;
use table::SessionTable;
use token::ResumeKeys;

/// Frames moved from the outbox per batch: one flush each.
const BATCH: usize = 256;
/// Longest time spent sending the final `disconnect` and close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Longest wait for a live session to hand itself over to a resume.
const TAKEOVER_WAIT: Duration = Duration::from_secs(3);
/// A deadline this far away stands for "never" (a token `exp` or setting
/// beyond what the clock can hold).
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The settings a session reads.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub node_id: String,
    pub heartbeat: Duration,
    pub connect_timeout: Duration,
    pub client_rate: u32,
    pub subscribe_rate: u32,
    pub max_message_size: usize,
    pub max_subscriptions: usize,
    pub max_outbox_bytes: usize,
    pub max_outbox_messages: usize,
    pub resume_window: Duration,
}

impl SessionConfig {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self {
            node_id: c.node_id.clone(),
            heartbeat: c.heartbeat,
            connect_timeout: c.connect_timeout,
            client_rate: c.client_rate,
            subscribe_rate: c.subscribe_rate,
            max_message_size: c.max_message_size,
            max_subscriptions: c.max_subscriptions,
            max_outbox_bytes: c.max_outbox_bytes,
            max_outbox_messages: c.max_outbox_messages,
            resume_window: c.resume_window,
        }
    }
}

/// What every session of a node shares.
#[derive(Debug)]
pub struct Shared {
    pub config: SessionConfig,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub verifier: Verifier,
    pub keys: ResumeKeys,
    pub resumes: Arc<dyn ResumeStore>,
    pub bus: Arc<dyn NodeBus>,
    pub presence: Arc<dyn Presence>,
    pub table: Arc<SessionTable>,
    pub metrics: Metrics,
    pub lifecycle: Arc<Lifecycle>,
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

/// The state of one session. Dropping it — at the end, or when its task
/// panics — takes it out of the hub, presence and the session table.
struct Session {
    shared: Arc<Shared>,
    conn_id: u64,
    transport: &'static str,
    encoding: Encoding,
    outbox: Arc<Outbox>,
    phase: Phase,
    grant: Option<Grant>,
    /// Token expiry as a timer deadline.
    token_deadline: Option<Instant>,
    session_id: String,
    subs: Subscriptions,
    rate: RateLimit,
    /// Subscribes (`--subscribe-rate`): each costs a hub entry, maybe a
    /// replay, and in a cluster a Redis subscription.
    subscribe_rate: RateLimit,
    last_seen: Instant,
    next_ping: Instant,
    /// The device this session runs on (`connect.device`), for push.
    device: Option<String>,
    /// Personal channels this device is live on (presence entries).
    personal: Vec<ChannelName>,
    /// Snapshots sent to the resume store (their sequence numbers).
    snapshots: u64,
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

/// `now + d`, or "never" where the clock cannot hold it.
fn deadline_after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

/// The timer deadline of a token expiring at unix time `exp`: with the same
/// clock leeway as the check at `connect` ([`crate::auth::LEEWAY_SECS`]), so
/// that a token accepted inside the leeway is not closed at once.
fn deadline_at_unix(exp: u64) -> Instant {
    let exp = exp.saturating_add(crate::auth::LEEWAY_SECS);
    deadline_after(
        Instant::now(),
        Duration::from_secs(exp.saturating_sub(unix_secs())),
    )
}

/// Runs a session over `transport` until it ends.
pub async fn run<T: Transport>(shared: Arc<Shared>, transport: T, conn_id: u64) {
    let span = tracing::debug_span!("session", conn_id, transport = T::NAME, user = field::Empty);
    run_inner(shared, transport, conn_id).instrument(span).await;
}

async fn run_inner<T: Transport>(shared: Arc<Shared>, mut transport: T, conn_id: u64) {
    let now = Instant::now();
    let label = TransportLabel { transport: T::NAME };
    let metrics = &shared.metrics;
    metrics.connections.get_or_create(&label).inc();
    metrics.connections_accepted.get_or_create(&label).inc();
    let cfg = &shared.config;
    let outbox = Outbox::new(cfg.max_outbox_bytes, cfg.max_outbox_messages);
    shared.table.insert(conn_id, outbox.clone());
    debug!("connection open");

    let messages_in = metrics.messages_in.get_or_create(&label).clone();
    let sent = SentMetrics {
        messages_out: metrics.messages_out.get_or_create(&label).clone(),
        latency: metrics.delivery_latency.clone(),
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
            deadline: deadline_after(now, cfg.connect_timeout),
        },
        grant: None,
        token_deadline: None,
        session_id: String::new(),
        subs: Subscriptions::default(),
        rate: RateLimit::new(cfg.client_rate, now),
        subscribe_rate: RateLimit::new(cfg.subscribe_rate, now),
        last_seen: now,
        next_ping: now,
        device: None,
        personal: Vec::new(),
        snapshots: 0,
        messages_in,
        sent,
        conn_id,
        transport: T::NAME,
        shared: shared.clone(),
    };
    if shared.lifecycle.is_shutting_down() {
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
            Event::Close(code) => Err(End::Close(code, outbox.retry_after_ms())),
            Event::Timer => s.on_timer(),
        };
        if let Err(end) = step {
            break end;
        }
        sleep.as_mut().reset(s.next_deadline());
    };

    // From here the session writes its last frames itself.
    outbox.detach_direct();
    match end {
        End::Close(code, retry_after_ms) => {
            metrics
                .disconnects
                .get_or_create(&CodeLabel { code: code.code() })
                .inc();
            debug!(code = code.code(), reason = code.reason(), "closing");
            if !outbox.is_urgent() {
                // Flush what is owed (shutdown: everything queued before
                // it), counting what goes out as delivered: the session's
                // record, written next, must not have a resume replay it.
                let (sent, subs) = (&s.sent, &mut s.subs);
                let flush = poll_fn(|cx| {
                    transport.poll_write(cx, &mut pending, &mut |f: Frame| {
                        sent.count(&f);
                        if let Some(d) = f.delivery {
                            subs.delivered(d);
                        }
                    })
                });
                let _ = tokio::time::timeout(CLOSE_GRACE, Box::pin(flush)).await;
            }
            Box::pin(s.finish()).await;
            let mut d = Disconnect::from(code);
            d.retry_after_ms = retry_after_ms;
            let last = encode_server(&ServerMessage::Disconnect(d), s.encoding);
            let _ = tokio::time::timeout(CLOSE_GRACE, Box::pin(transport.close(code, Some(last))))
                .await;
        }
        End::Gone => {
            debug!("connection closed by peer");
            Box::pin(s.finish()).await;
            let _ = tokio::time::timeout(CLOSE_GRACE, Box::pin(transport.answer_close())).await;
        }
    }
    drop(s);
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
            if let Some(d) = f.delivery {
                subs.delivered(d);
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
                let liveness = deadline_after(self.last_seen, 2 * self.shared.config.heartbeat);
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
                let hb = self.shared.config.heartbeat;
                if now >= deadline_after(self.last_seen, 2 * hb) {
                    return Err(End::Close(CloseCode::HeartbeatTimeout, None));
                }
                if self.token_deadline.is_some_and(|t| now >= t) {
                    return Err(End::Close(CloseCode::TokenExpired, None));
                }
                if now >= self.next_ping {
                    self.reply(&ServerMessage::Ping);
                    self.next_ping = deadline_after(now, hb);
                    // Still here: presence entries live on, and the resume
                    // store learns where the session stands.
                    for key in self.presence_keys() {
                        self.shared.presence.touch(key);
                    }
                    self.snapshot();
                }
            }
        }
        Ok(())
    }

    /// The presence entries of this session.
    fn presence_keys(&self) -> impl Iterator<Item = PresenceKey<'_>> {
        let device = self.device.as_deref();
        self.personal.iter().filter_map(move |channel| {
            Some(PresenceKey {
                device: device?,
                channel,
                conn_id: self.conn_id,
            })
        })
    }

    /// Leaves the session's current record with the resume store, where it
    /// keeps snapshots (cluster mode: a resume after this node died starts
    /// from it). Never waits: the write runs on its own task.
    fn snapshot(&mut self) {
        if !self.shared.resumes.keeps_snapshots() || !matches!(self.phase, Phase::Active) {
            return;
        }
        self.sync_written();
        let record = self.subs.record();
        let shared = self.shared.clone();
        let (session, conn_id) = (self.session_id.clone(), self.conn_id);
        self.snapshots += 1;
        let seq = self.snapshots;
        tokio::spawn(async move {
            if let Err(e) = shared
                .resumes
                .snapshot(&session, conn_id, seq, &record)
                .await
            {
                debug!(error = %e, "session snapshot not stored");
            }
        });
    }

    /// Takes in the deliveries the hub wrote through to the connection.
    fn sync_written(&mut self) {
        let subs = &mut self.subs;
        self.outbox.take_written(|d| subs.delivered(d));
    }

    /// Leaves the hub and presence; leaves what a resume needs in the
    /// resume store. (The session table and gauges are left on drop.)
    async fn finish(&mut self) {
        self.sync_written();
        let record = self.leave();
        if matches!(self.phase, Phase::Active) {
            let detached = self
                .shared
                .resumes
                .detach(
                    &self.session_id,
                    self.conn_id,
                    record,
                    self.shared.config.resume_window,
                )
                .await;
            if let Err(e) = detached {
                debug!(error = %e, "session record not kept: this session cannot be resumed");
            }
        }
    }

    /// Leaves the hub and presence: ends every subscription, returns what
    /// a resume needs of them.
    fn leave(&mut self) -> crate::cluster::SessionRecord {
        let (numbers, record) = self.subs.take_all();
        for (n, channel) in numbers {
            self.shared.hub.unsubscribe(
                &channel,
                SubscriptionId {
                    session: self.conn_id,
                    sub: n,
                },
            );
        }
        for key in self.presence_keys() {
            self.shared.presence.leave(key);
        }
        self.personal.clear();
        record
    }
}

impl Drop for Session {
    /// Whatever way the session ends — normally (after `finish`, which left
    /// nothing here), or by a panic of its task — nothing of it stays behind:
    /// not its subscribers in the hub, not its presence, not its entry in
    /// the session table, not the write-through path's hold on the socket.
    fn drop(&mut self) {
        self.outbox.detach_direct();
        self.leave();
        self.shared.table.remove(self.conn_id);
        self.shared
            .metrics
            .connections
            .get_or_create(&TransportLabel {
                transport: self.transport,
            })
            .dec();
    }
}
