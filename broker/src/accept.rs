//! The accept loops of the client listeners, WebSocket (TCP) and QUIC: the
//! one place where a transport meets a session.
//!
//! Both loops take a connection permit per client from one pool shared by
//! WebSocket and QUIC (`--max-connections`, lowered at start to what the
//! file-descriptor limit allows) and a handshake permit ([`MAX_HANDSHAKES`]
//! in flight at once), and run the handshake — TLS and WebSocket upgrade,
//! or QUIC handshake and session stream — in the connection's own task
//! under `--connect-timeout`, never in the loop: one slow client stalls
//! nobody. Then the task becomes the session (`session::run`).
//!
//! Before those, two optional gates: the accept rate (`--accept-rate`, new
//! connections per second over both listeners, a token bucket holding two
//! seconds' worth) and the per-IP cap (`--max-connections-per-ip`, counted
//! per address for as long as its connections live).
//!
//! QUIC clients may first be asked to validate their address (a Retry,
//! `--quic-retry`: by default while a quarter of the handshake slots are
//! taken), so that a flood from spoofed addresses costs one stateless
//! packet each, not a handshake.
//!
//! Over any limit a client is turned away at once rather than queued: a
//! plain WebSocket client gets `503` with a jittered `Retry-After`, a `wss`
//! client a closed connection (a TLS handshake is what the broker has no
//! room for), a QUIC client a refusal. In a reconnect storm the clients
//! come back spread over the next seconds instead of piling up in the
//! backlog and timing out together.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tether_protocol::CloseCode;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::metrics::{CodeLabel, Metrics, ReasonLabel};
use crate::rate::RateLimit;
use crate::session::{self, Shared};
use crate::transport::quic::QuicTransport;
use crate::transport::ws;

/// Handshakes (TLS, WebSocket upgrade, QUIC) in flight at once, over both
/// listeners: past it new clients are turned away (503) until some finish.
pub const MAX_HANDSHAKES: usize = 1024;

/// Turned-away WebSocket clients being answered at once (each holds its
/// socket for up to a second): past it, a client is just closed, so that a
/// flood cannot spend the descriptors kept for the API and Redis.
pub const MAX_TURNING_AWAY: usize = 256;

/// `Retry-After` of a turned-away WebSocket client: 1 to this many seconds,
/// at random, so that a storm comes back spread out.
pub const RETRY_AFTER_MAX_SECS: u64 = 5;

/// The limits the accept loops apply. Clones share the pools.
#[derive(Debug, Clone)]
pub struct AcceptConfig {
    /// Client connections, WebSocket and QUIC together.
    pub connections: Arc<Semaphore>,
    /// Handshakes in flight, both listeners together.
    pub handshakes: Arc<Semaphore>,
    pub connect_timeout: Duration,
    pub max_message_size: usize,
    pub ws_read_buffer: usize,
    /// New connections per second, both listeners (`--accept-rate`).
    accept_rate: Option<Arc<Mutex<RateLimit>>>,
    /// Connections per client address (`--max-connections-per-ip`).
    pub per_ip: Option<Arc<PerIp>>,
    /// When QUIC clients must validate their address first.
    pub quic_retry: crate::config::QuicRetry,
}

impl AcceptConfig {
    /// The limits of `c`, with at most `max_connections` clients.
    pub fn from_config(c: &crate::config::Config, max_connections: usize) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(max_connections)),
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            connect_timeout: c.connect_timeout,
            max_message_size: c.max_message_size,
            ws_read_buffer: c.ws_read_buffer,
            accept_rate: c
                .accept_rate
                .map(|r| Arc::new(Mutex::new(RateLimit::new(r, tokio::time::Instant::now())))),
            per_ip: c
                .max_connections_per_ip
                .map(|max| Arc::new(PerIp::new(max))),
            quic_retry: c.quic_retry,
        }
    }

    /// Whether a QUIC client whose address is not validated yet is sent a
    /// Retry first: always, never, or while at least a quarter of the
    /// handshake slots are taken (a flood, maybe from spoofed addresses).
    fn wants_quic_retry(&self) -> bool {
        use crate::config::QuicRetry;
        match self.quic_retry {
            QuicRetry::Always => true,
            QuicRetry::Never => false,
            QuicRetry::UnderLoad => {
                MAX_HANDSHAKES - self.handshakes.available_permits() >= MAX_HANDSHAKES / 4
            }
        }
    }

    /// The optional gates, before any permit: `Err(reason)` to turn the
    /// client away; `Ok(slot)` holds its address's place while it lives.
    fn gate(&self, ip: IpAddr) -> Result<Option<IpSlot>, &'static str> {
        if let Some(bucket) = &self.accept_rate
            && bucket.lock().take(tokio::time::Instant::now()).is_err()
        {
            return Err("rate");
        }
        match &self.per_ip {
            None => Ok(None),
            Some(p) => p.admit(ip).map(Some).ok_or("per_ip"),
        }
    }
}

/// Live connections per client address. An address is in the map only
/// while it has connections, so the map is bounded by the connections.
#[derive(Debug)]
pub struct PerIp {
    max: u32,
    counts: Mutex<HashMap<IpAddr, u32>>,
}

impl PerIp {
    pub fn new(max: u32) -> Self {
        Self {
            max,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// A place for one more connection from `ip`, if it has fewer than the
    /// cap (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let ip = ip.to_canonical();
        let mut counts = self.counts.lock();
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            owner: self.clone(),
            ip,
        })
    }
}

/// One connection's place in its address's count; given back on drop.
#[derive(Debug)]
pub struct IpSlot {
    owner: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock();
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

fn refused(metrics: &Metrics, reason: &'static str) {
    metrics
        .connections_refused
        .get_or_create(&ReasonLabel { reason })
        .inc();
}

/// Accepts WebSocket connections until `stop`; each connection's task goes
/// on `tracker`.
pub async fn websocket(
    shared: Arc<Shared>,
    limits: AcceptConfig,
    listener: TcpListener,
    wss: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let ws_config = ws::ws_config(limits.max_message_size, limits.ws_read_buffer);
    let tls = wss.map(Arc::new);
    let turning_away = Arc::new(Semaphore::new(MAX_TURNING_AWAY));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let admitted = limits.gate(peer.ip()).and_then(|slot| {
            let permits = (
                limits.connections.clone().try_acquire_owned(),
                limits.handshakes.clone().try_acquire_owned(),
            );
            match permits {
                (Ok(p), Ok(h)) => Ok((slot, p, h)),
                (Err(_), _) => Err("limit"),
                (Ok(_), Err(_)) => Err("busy"),
            }
        });
        let (ip_slot, permit, handshake) = match admitted {
            Ok(x) => x,
            Err(reason) => {
                refused(&shared.metrics, reason);
                if tls.is_none()
                    && let Ok(answering) = turning_away.clone().try_acquire_owned()
                {
                    tracker.spawn(async move {
                        turn_away(stream).await;
                        drop(answering);
                    });
                }
                // Otherwise (wss, or too many being answered): dropped, closed.
                continue;
            }
        };
        let shared = shared.clone();
        let timeout = limits.connect_timeout;
        let tls = tls.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let _ip_slot = ip_slot;
            let conn_id = shared.table.next_conn_id();
            match tokio::time::timeout(timeout, ws::accept(stream, tls.as_deref(), ws_config)).await
            {
                Ok(Ok(transport)) => {
                    drop(handshake);
                    session::run(shared, transport, conn_id).await
                }
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "websocket upgrade refused");
                    refused(&shared.metrics, "handshake");
                }
                Err(_) => {
                    debug!(%peer, "websocket handshake timed out");
                    refused(&shared.metrics, "handshake_timeout");
                }
            }
        });
    }
    debug!("accept loop stopped; client listener closed");
}

/// Answers a WebSocket client the broker has no room for: `503` with a
/// `Retry-After` of 1 to [`RETRY_AFTER_MAX_SECS`] seconds, then closes.
/// Bounded: a client that does not read gets a second, then the close.
async fn turn_away(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let secs = 1 + rand::random::<u64>() % RETRY_AFTER_MAX_SECS;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {secs}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let write = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Accepts QUIC connections until `stop`; each runs its handshake and its
/// session in its own task.
pub async fn quic(
    shared: Arc<Shared>,
    limits: AcceptConfig,
    endpoint: quinn::Endpoint,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
            _ = stop.cancelled() => break,
        };
        // Address validation: a client that has not proven its address
        // gets a Retry (one round trip, no handshake state kept) and comes
        // back with a token; `may_retry` is false once it has one.
        if incoming.may_retry() && limits.wants_quic_retry() {
            match incoming.retry() {
                Ok(()) => {
                    shared
                        .metrics
                        .quic_handshakes
                        .get_or_create(&ReasonLabel { reason: "retry" })
                        .inc();
                }
                Err(e) => e.into_incoming().refuse(),
            }
            continue;
        }
        let ip_slot = match limits.gate(incoming.remote_address().ip()) {
            Ok(slot) => slot,
            Err(reason) => {
                refused(&shared.metrics, reason);
                incoming.refuse();
                continue;
            }
        };
        let Ok(permit) = limits.connections.clone().try_acquire_owned() else {
            refused(&shared.metrics, "limit");
            incoming.refuse();
            continue;
        };
        let Ok(handshake) = limits.handshakes.clone().try_acquire_owned() else {
            refused(&shared.metrics, "busy");
            incoming.refuse();
            continue;
        };
        if shared.lifecycle.is_shutting_down() {
            incoming.refuse();
            continue;
        }
        let shared = shared.clone();
        let limits = limits.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let _ip_slot = ip_slot;
            let shaken = quic_handshake(&shared.metrics, &limits, incoming).await;
            drop(handshake);
            if let Some(transport) = shaken {
                let conn_id = shared.table.next_conn_id();
                session::run(shared, transport, conn_id).await;
            }
        });
    }
    // New connections are refused from now on; live sessions are closed by
    // the server's shutdown (4010), then the endpoint itself.
    endpoint.set_server_config(None);
    debug!("quic accept loop stopped");
}

/// The QUIC handshake and the client's session stream (its first
/// bidirectional stream), each under `--connect-timeout`.
async fn quic_handshake(
    metrics: &Metrics,
    limits: &AcceptConfig,
    incoming: quinn::Incoming,
) -> Option<QuicTransport> {
    let peer = incoming.remote_address();
    let timeout = limits.connect_timeout;
    let conn = match incoming.accept() {
        Ok(connecting) => match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "quic handshake failed");
                refused(metrics, "handshake");
                return None;
            }
            Err(_) => {
                debug!(%peer, "quic handshake timed out");
                refused(metrics, "handshake_timeout");
                return None;
            }
        },
        Err(e) => {
            debug!(%peer, error = %e, "quic connection refused");
            refused(metrics, "handshake");
            return None;
        }
    };
    metrics
        .quic_handshakes
        .get_or_create(&ReasonLabel {
            reason: "completed",
        })
        .inc();
    let (send, recv) = match tokio::time::timeout(timeout, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "connection closed before opening its session stream");
            return None;
        }
        Err(_) => {
            debug!(%peer, "no session stream in time");
            metrics
                .disconnects
                .get_or_create(&CodeLabel {
                    code: CloseCode::ProtocolError.code(),
                })
                .inc();
            conn.close(
                quinn::VarInt::from(CloseCode::ProtocolError.code()),
                b"no session stream",
            );
            return None;
        }
    };
    Some(QuicTransport::new(
        conn,
        send,
        recv,
        limits.max_message_size,
        metrics.quic_migrations.clone(),
    ))
}
