//! Wires the subsystems of one node: binds the listeners, runs the accept
//! loop, the API server and the sweeper under one cancellation token and
//! task tracker, and shuts them down in order.
//!
//! Shutdown order: readiness goes to 503 → the client listener closes (new
//! connections are refused) → every session is told `disconnect` 4010 after
//! what it is owed → sessions are awaited up to `--shutdown-timeout` → the
//! API server stops.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_protocol::CloseCode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::KeyError;
use crate::config::Config;
use crate::node::Node;
use crate::transport::tls::Identity;
use crate::transport::{quic, ws};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind the {listener} listener on {addr}: {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("setting `redis-url`: cluster mode through Redis is not available in this build yet")]
    ClusterUnavailable,
    #[error(transparent)]
    Tls(#[from] crate::transport::tls::TlsError),
    #[error("setting `data-dir`: {0}")]
    Store(#[from] tether_push_gateway::StoreError),
    #[error("setting `data-dir`: cannot create {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Provider(#[from] tether_push_gateway::ConfigError),
}

/// Connections the kernel queues for the client listener before `accept`
/// (a wave of reconnects arrives at once; the kernel caps it at somaxconn).
const CLIENT_BACKLOG: u32 = 4096;

fn bind_with_backlog(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// A node with its listeners bound, not yet serving.
pub struct Server {
    node: Arc<Node>,
    client: TcpListener,
    api: TcpListener,
    quic: Option<(quinn::Endpoint, Identity)>,
    wss: Option<tokio_rustls::TlsAcceptor>,
    push_stop: CancellationToken,
}

impl Server {
    /// Builds the node and binds its listeners (port 0 picks a free port).
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        if config.redis_url.is_some() {
            return Err(ServerError::ClusterUnavailable);
        }
        std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let store = tether_push_gateway::Store::open(&config.data_dir)?;
        let apns = match &config.apns {
            Some(a) => {
                let mut c = tether_push_gateway::ApnsConfig::from_key_file(
                    &a.key_file,
                    &a.key_id,
                    &a.team_id,
                )?
                .with_topic(&a.topic);
                if let Some(e) = &a.endpoint {
                    c = c.with_endpoint(e);
                }
                Some(Arc::new(tether_push_gateway::ApnsClient::new(c)?))
            }
            None => None,
        };
        let fcm = match &config.fcm {
            Some(f) => {
                let account = tether_push_gateway::ServiceAccount::from_file(&f.service_account)?;
                let mut c = tether_push_gateway::FcmConfig::new(account);
                if let Some(e) = &f.endpoint {
                    c = c.with_endpoint(e);
                }
                Some(Arc::new(tether_push_gateway::FcmClient::new(c)?))
            }
            None => None,
        };
        let push_stop = CancellationToken::new();
        let make_push = |config: &Config, metrics: &crate::metrics::Metrics| {
            let (events_tx, events_rx) = tokio::sync::mpsc::channel(1024);
            tokio::spawn(crate::push::count_events(events_rx, metrics.clone()));
            tokio::spawn(count_token_refreshes(
                apns.clone(),
                fcm.clone(),
                metrics.clone(),
                push_stop.clone(),
            ));
            let devices: Arc<dyn tether_push_gateway::DeviceRegistry> = Arc::new(store.clone());
            let gateway = tether_push_gateway::Gateway::start(
                store,
                apns.clone()
                    .map(|a| a as Arc<dyn tether_push_gateway::Provider>),
                fcm.clone()
                    .map(|f| f as Arc<dyn tether_push_gateway::Provider>),
                tether_push_gateway::GatewayConfig::default(),
                events_tx,
                push_stop.clone(),
            );
            crate::push::Push::new(
                gateway,
                devices,
                config.ack_timeout,
                apns.is_some(),
                fcm.is_some(),
                metrics.clone(),
                push_stop.clone(),
            )
        };
        let node = Node::new(config, make_push)?;
        let cfg = &node.config;
        let client = bind_with_backlog(cfg.client_addr, CLIENT_BACKLOG).map_err(|source| {
            ServerError::Bind {
                listener: "client",
                addr: cfg.client_addr,
                source,
            }
        })?;
        let api = TcpListener::bind(cfg.api_addr)
            .await
            .map_err(|source| ServerError::Bind {
                listener: "api",
                addr: cfg.api_addr,
                source,
            })?;
        let wss = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => Some(crate::transport::stream::tls_acceptor(
                &Identity::load_or_generate(Some(cert), Some(key))?,
            )?),
            _ => None,
        };
        let quic = match cfg.quic_addr {
            Some(addr) => Some(quic::endpoint(
                &node.config,
                addr,
                node.metrics
                    .quic_handshakes
                    .get_or_create(&crate::metrics::ReasonLabel { reason: "resumed" })
                    .clone(),
            )?),
            None => None,
        };
        Ok(Server {
            node,
            client,
            api,
            quic,
            wss,
            push_stop,
        })
    }

    /// The bound QUIC address, when QUIC is on.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().and_then(|(e, _)| e.local_addr().ok())
    }

    pub fn client_addr(&self) -> std::io::Result<SocketAddr> {
        self.client.local_addr()
    }

    pub fn api_addr(&self) -> std::io::Result<SocketAddr> {
        self.api.local_addr()
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Serves until `shutdown` completes, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            node,
            client,
            api,
            quic,
            wss,
            push_stop,
        } = self;
        let cfg = &node.config;
        let client_addr = client.local_addr().ok();
        let api_addr = api.local_addr().ok();
        if let Some(addr) = client_addr {
            let scheme = if wss.is_some() { "wss" } else { "ws" };
            info!(listener = "client", %addr, "listening on {addr} (WebSocket at {scheme}://{addr}{})", ws::PATH);
        }
        if let Some(addr) = api_addr {
            info!(listener = "api", %addr, "listening on {addr} (backend API)");
        }
        if let Some((endpoint, identity)) = &quic
            && let Ok(addr) = endpoint.local_addr()
        {
            info!(listener = "quic", %addr, "listening on {addr} (QUIC, ALPN tether/1)");
            if identity.self_signed {
                info!(
                    fingerprint = %identity.fingerprint,
                    "QUIC uses a self-signed certificate; development clients can pin its SHA-256 fingerprint {}",
                    identity.fingerprint
                );
            }
        }
        if cfg.api_key.is_none() {
            warn!(
                "no api-key configured: the backend API is open to anyone who can reach {}",
                cfg.api_addr
            );
        }
        if matches!(cfg.client_auth, crate::config::ClientAuth::Anonymous) {
            warn!(
                "no jwt-secret or jwt-public-key configured: clients connect anonymously (development mode)"
            );
        }
        if cfg.resume_secret.is_none() {
            debug!(
                "no resume-secret configured: resume tokens are signed with a random key for this run"
            );
        }
        if cfg.apns.is_none() && cfg.fcm.is_none() {
            info!("no APNs or FCM credentials: devices can be registered, offline push is off");
        }

        let tracker = TaskTracker::new();
        let stop_accepting = CancellationToken::new();
        let stop_api = CancellationToken::new();

        tracker.spawn(
            crate::accept::websocket(
                node.clone(),
                client,
                wss,
                stop_accepting.clone(),
                tracker.clone(),
            )
            .instrument(info_span!("accept", listener = "client")),
        );

        let quic_endpoint = quic.map(|(endpoint, _)| {
            tracker.spawn(
                crate::accept::quic(
                    node.clone(),
                    endpoint.clone(),
                    stop_accepting.clone(),
                    tracker.clone(),
                )
                .instrument(info_span!("accept", listener = "quic")),
            );
            endpoint
        });

        let api_task = tokio::spawn({
            let app = crate::api::router(node.clone());
            let stop = stop_api.clone();
            async move {
                let serve = axum::serve(api, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await });
                if let Err(e) = serve.await {
                    warn!(error = %e, "api server failed");
                }
            }
        });

        let sweeper = tokio::spawn({
            let node = node.clone();
            let stop = stop_accepting.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            node.broker.sweep();
                            node.resumes.sweep();
                            if let Ok(depth) = node.push.gateway().outbox_depth().await {
                                node.metrics.push_outbox_depth.set(depth as i64);
                            }
                        }
                        _ = stop.cancelled() => break,
                    }
                }
            }
        });

        node.set_ready();
        info!(node = %node.node_id(), "ready");
        shutdown.await;

        info!(sessions = node.sessions.len(), "shutting down");
        node.begin_shutdown();
        stop_accepting.cancel();
        node.sessions.close_all(CloseCode::ShuttingDown);
        tracker.close();
        if tokio::time::timeout(cfg.shutdown_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = node.sessions.len(),
                "shutdown timeout reached with sessions still open"
            );
        }
        if let Some(endpoint) = quic_endpoint {
            endpoint.close(
                quinn::VarInt::from(CloseCode::ShuttingDown.code()),
                CloseCode::ShuttingDown.reason().as_bytes(),
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        // Push: pending ack checks decide now, then the gateway stops; jobs
        // not delivered stay in the durable outbox for the next start.
        push_stop.cancel();
        node.push.drain(Duration::from_secs(2)).await;
        let _ = tokio::time::timeout(Duration::from_secs(6), node.push.gateway().stopped()).await;
        sweeper.abort();
        stop_api.cancel();
        let _ = tokio::time::timeout(crate::api::DRAIN, api_task).await;
        info!("stopped");
    }
}

/// Publishes the providers' token counts (APNs JWTs signed, FCM grants).
async fn count_token_refreshes(
    apns: Option<Arc<tether_push_gateway::ApnsClient>>,
    fcm: Option<Arc<tether_push_gateway::FcmClient>>,
    metrics: crate::metrics::Metrics,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        if let Some(a) = &apns {
            metrics
                .push_token_refreshes
                .get_or_create(&crate::metrics::ProviderLabel { provider: "apns" })
                .set(a.tokens_signed() as i64);
        }
        if let Some(f) = &fcm {
            metrics
                .push_token_refreshes
                .get_or_create(&crate::metrics::ProviderLabel { provider: "fcm" })
                .set(f.grants() as i64);
        }
    }
}
