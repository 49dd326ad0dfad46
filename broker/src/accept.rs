//! The accept loops of the client listeners, WebSocket (TCP) and QUIC: the
//! one place where a transport meets a session.
//!
//! Both loops take a connection permit (`--max-connections`) per client
//! and run the handshake — TLS and WebSocket upgrade, or QUIC handshake and
//! session stream — in the connection's own task under `--connect-timeout`,
//! never in the loop: one slow client stalls nobody. Then the task becomes
//! the session (`session::run`).

use std::sync::Arc;
use std::time::Duration;

use tether_protocol::CloseCode;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::metrics::{CodeLabel, Metrics, ReasonLabel};
use crate::session::{self, Shared};
use crate::transport::quic::QuicTransport;
use crate::transport::ws;

/// The limits the accept loops apply.
#[derive(Debug, Clone)]
pub struct AcceptConfig {
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub max_message_size: usize,
    pub ws_read_buffer: usize,
}

impl AcceptConfig {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self {
            max_connections: c.max_connections,
            connect_timeout: c.connect_timeout,
            max_message_size: c.max_message_size,
            ws_read_buffer: c.ws_read_buffer,
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
    let limit = Arc::new(Semaphore::new(limits.max_connections));
    let ws_config = ws::ws_config(limits.max_message_size, limits.ws_read_buffer);
    let tls = wss.map(Arc::new);
    loop {
        // The connection limit is taken before accept: over it, clients wait
        // in the kernel's backlog rather than costing us memory.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        };
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
        let shared = shared.clone();
        let timeout = limits.connect_timeout;
        let tls = tls.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let conn_id = shared.table.next_conn_id();
            match tokio::time::timeout(timeout, ws::accept(stream, tls.as_deref(), ws_config)).await
            {
                Ok(Ok(transport)) => session::run(shared, transport, conn_id).await,
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

/// Accepts QUIC connections until `stop`; each runs its handshake and its
/// session in its own task.
pub async fn quic(
    shared: Arc<Shared>,
    limits: AcceptConfig,
    endpoint: quinn::Endpoint,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
            _ = stop.cancelled() => break,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            refused(&shared.metrics, "limit");
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
            if let Some(transport) = quic_handshake(&shared.metrics, &limits, incoming).await {
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
