//! Wires the subsystems of one node and runs them under one root
//! [`CancellationToken`] (a child token per subsystem) and two task
//! trackers: `connections` (one task per client connection) and `tasks`
//! (everything else: accept loops, the API server, maintenance, the
//! metrics counters). Each subsystem gets the handles it needs, no more:
//! the sessions a [`session::Shared`], the API an `api::Handles`, push its
//! registry, queue and presence.
//!
//! Shutdown order, bounded in total by `--shutdown-timeout`: readiness goes
//! to 503 → the client listeners close (new connections are refused) →
//! every session is told `disconnect` 4010 after what it is owed → sessions
//! are awaited (all but a reserve of the time) → the QUIC endpoint closes →
//! pending ack checks decide and the push gateway lets its sends in flight
//! finish → maintenance stops → the API server drains → the root token is
//! cancelled.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tether_protocol::CloseCode;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::accept::{self, AcceptConfig};
use crate::auth::{KeyError, Verifier};
use crate::cluster::memory::{
    LocalBus, MemoryBroker, MemoryBrokerConfig, MemoryPresence, MemoryResumeStore,
};
use crate::cluster::{ControlSink, Presence, ResumeStore};
use crate::config::Config;
use crate::hub::{Hub, HubConfig};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::push::Push;
use crate::session::table::SessionTable;
use crate::session::token::ResumeKeys;
use crate::session::{self, SessionConfig};
use crate::transport::quic;
use crate::transport::tls::{CertStore, Identity};

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
    #[error("cluster mode: cannot reach Redis at start: {0}")]
    Redis(String),
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
/// How often the maintenance task sweeps.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Reconnects after a shutdown are advised over this many milliseconds
/// (`disconnect.retry_after_ms`, random per client).
const DRAIN_SPREAD_MS: u64 = 2000;
/// The longest shutdown keeps for what follows the sessions.
const RESERVE: Duration = Duration::from_secs(3);

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

/// The cancellation tree: one root, a child per subsystem.
#[derive(Debug, Clone)]
struct Tokens {
    root: CancellationToken,
    accept: CancellationToken,
    push: CancellationToken,
    maintenance: CancellationToken,
    api: CancellationToken,
}

impl Tokens {
    fn new() -> Self {
        let root = CancellationToken::new();
        Tokens {
            accept: root.child_token(),
            push: root.child_token(),
            maintenance: root.child_token(),
            api: root.child_token(),
            root,
        }
    }
}

/// A node with its listeners bound, not yet serving.
pub struct Server {
    config: Config,
    sessions: Arc<session::Shared>,
    push: Push,
    registry: Arc<Registry>,
    client: TcpListener,
    api: TcpListener,
    /// The QUIC endpoint, the certificate it serves, and whether that is
    /// self-signed (made for this run).
    quic: Option<(quinn::Endpoint, Arc<CertStore>, bool)>,
    /// The operator's certificate (wss and QUIC), reloaded on SIGHUP.
    certs: Option<Arc<CertStore>>,
    wss: Option<tokio_rustls::TlsAcceptor>,
    tokens: Tokens,
    tasks: TaskTracker,
}

impl Server {
    /// Builds the node and binds its listeners (port 0 picks a free port).
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let tokens = Tokens::new();
        let tasks = TaskTracker::new();
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let lifecycle = Arc::new(Lifecycle::default());

        let table = Arc::new(SessionTable::default());
        let Seams {
            hub,
            resumes,
            bus,
            presence,
            push_backend,
            ack_checks,
        } = seams(&config, &metrics, &table).await?;

        let push = start_push(
            &config,
            &metrics,
            presence.clone(),
            push_backend,
            ack_checks,
            &tokens,
            &tasks,
        )?;
        let sessions = Arc::new(session::Shared {
            config: SessionConfig::from_config(&config),
            broker: hub.broker().clone(),
            hub,
            verifier: Verifier::new(&config.client_auth)?
                .expecting(config.jwt_audience.as_deref(), config.jwt_issuer.as_deref()),
            keys: ResumeKeys::new(
                config
                    .resume_secret
                    .clone()
                    .map(crate::config::Secret::into_inner),
            ),
            resumes,
            bus,
            presence,
            table,
            metrics: metrics.clone(),
            lifecycle,
        });

        let client = bind_with_backlog(config.client_addr, CLIENT_BACKLOG).map_err(|source| {
            ServerError::Bind {
                listener: "client",
                addr: config.client_addr,
                source,
            }
        })?;
        let api = TcpListener::bind(config.api_addr)
            .await
            .map_err(|source| ServerError::Bind {
                listener: "api",
                addr: config.api_addr,
                source,
            })?;
        let certs = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(CertStore::new(
                &Identity::load_or_generate(Some(cert), Some(key))?,
                Some((cert.clone(), key.clone())),
            )?)),
            _ => None,
        };
        let wss = certs
            .clone()
            .map(crate::transport::stream::tls_acceptor)
            .transpose()?;
        let quic = match config.quic_addr {
            Some(addr) => Some(quic::endpoint(
                &config,
                addr,
                metrics
                    .quic_handshakes
                    .get_or_create(&crate::metrics::ReasonLabel { reason: "resumed" })
                    .clone(),
                certs.clone(),
            )?),
            None => None,
        };
        Ok(Server {
            config,
            sessions,
            push,
            registry: Arc::new(registry),
            client,
            api,
            quic,
            certs,
            wss,
            tokens,
            tasks,
        })
    }

    /// The bound QUIC address, when QUIC is on.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().and_then(|(e, _, _)| e.local_addr().ok())
    }

    pub fn client_addr(&self) -> std::io::Result<SocketAddr> {
        self.client.local_addr()
    }

    pub fn api_addr(&self) -> std::io::Result<SocketAddr> {
        self.api.local_addr()
    }

    fn log_start(&self) {
        let cfg = &self.config;
        if let Ok(addr) = self.client.local_addr() {
            let scheme = if self.wss.is_some() { "wss" } else { "ws" };
            info!(listener = "client", %addr, "listening on {addr} (WebSocket at {scheme}://{addr}{})", crate::transport::ws::PATH);
        }
        if let Ok(addr) = self.api.local_addr() {
            info!(listener = "api", %addr, "listening on {addr} (backend API)");
        }
        if let Some((endpoint, certs, self_signed)) = &self.quic
            && let Ok(addr) = endpoint.local_addr()
        {
            info!(listener = "quic", %addr, "listening on {addr} (QUIC, ALPN tether/1)");
            if *self_signed {
                let fingerprint = certs.fingerprint();
                info!(
                    fingerprint = %fingerprint,
                    "QUIC uses a self-signed certificate; development clients can pin its SHA-256 fingerprint {fingerprint}"
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
    }

    /// Serves until `shutdown` completes, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.log_start();
        let Server {
            config,
            sessions,
            push,
            registry,
            client,
            api,
            quic,
            certs,
            wss,
            tokens,
            tasks,
        } = self;
        // The handler is installed here, not in the task: a task is first
        // polled some time after it is spawned, and a SIGHUP before that
        // (an operator reloading right after `ready`) would have ended the
        // process, SIGHUP's default.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        tasks.spawn(reload_on_sighup(hup, certs, tokens.root.clone()));
        let connections = TaskTracker::new();
        let limits = AcceptConfig::from_config(&config, connection_cap(config.max_connections));

        tasks.spawn(
            accept::websocket(
                sessions.clone(),
                limits.clone(),
                client,
                wss,
                tokens.accept.clone(),
                connections.clone(),
            )
            .instrument(info_span!("accept", listener = "client")),
        );
        let quic_endpoint = quic.map(|(endpoint, _, _)| {
            tasks.spawn(
                accept::quic(
                    sessions.clone(),
                    limits.clone(),
                    endpoint.clone(),
                    tokens.accept.clone(),
                    connections.clone(),
                )
                .instrument(info_span!("accept", listener = "quic")),
            );
            endpoint
        });
        tasks.spawn({
            let app = crate::api::router(crate::api::Handles {
                broker: sessions.broker.clone(),
                push: push.clone(),
                registry,
                metrics: sessions.metrics.clone(),
                lifecycle: sessions.lifecycle.clone(),
                config: crate::api::ApiConfig::from_config(&config),
            });
            let stop = tokens.api.clone();
            async move {
                crate::api::serve::serve(api, app, stop, crate::api::serve::MAX_CONNECTIONS).await;
            }
        });
        tasks.spawn(maintain(
            sessions.clone(),
            push.clone(),
            tokens.maintenance.clone(),
        ));

        sessions.lifecycle.set_ready();
        info!(node = %config.node_id, "ready");
        shutdown.await;

        let deadline = Instant::now() + config.shutdown_timeout;
        let reserve = RESERVE.min(config.shutdown_timeout / 4);
        let within = |d: Duration| (Instant::now() + d).min(deadline);
        info!(sessions = sessions.table.len(), "shutting down");
        sessions.lifecycle.begin_shutdown();
        tokens.accept.cancel();
        // Clients come back spread over a few seconds (on the other nodes of
        // a cluster, or on this one once it is back).
        sessions
            .table
            .close_all(CloseCode::ShuttingDown, DRAIN_SPREAD_MS);
        connections.close();
        if tokio::time::timeout_at(deadline - reserve, connections.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = sessions.table.len(),
                "shutdown timeout reached with sessions still open"
            );
        }
        if let Some(endpoint) = quic_endpoint {
            endpoint.close(
                quinn::VarInt::from(CloseCode::ShuttingDown.code()),
                CloseCode::ShuttingDown.reason().as_bytes(),
            );
            let _ =
                tokio::time::timeout_at(within(Duration::from_secs(1)), endpoint.wait_idle()).await;
        }
        // Push: pending ack checks decide now, then the gateway stops; jobs
        // not delivered stay in the durable outbox for the next start.
        tokens.push.cancel();
        let _ = tokio::time::timeout_at(within(Duration::from_secs(2)), push.drain()).await;
        let _ =
            tokio::time::timeout_at(within(Duration::from_secs(6)), push.gateway().stopped()).await;
        tokens.maintenance.cancel();
        tokens.api.cancel();
        tasks.close();
        if tokio::time::timeout_at(within(crate::api::DRAIN), tasks.wait())
            .await
            .is_err()
        {
            warn!("shutdown timeout reached with tasks still running");
        }
        tokens.root.cancel();
        info!("stopped");
    }
}

/// The implementations of the cluster seams this node runs with.
struct Seams {
    hub: Arc<Hub>,
    resumes: Arc<dyn ResumeStore>,
    bus: Arc<dyn crate::cluster::NodeBus>,
    presence: Arc<dyn Presence>,
    /// The shared device registry and push queue (cluster mode); `None`:
    /// the node's own redb store.
    push_backend: Option<tether_push_gateway::Backend>,
    /// Where ack-timeout checks wait (cluster mode); `None`: the node's own
    /// redb store.
    ack_checks: Option<Arc<dyn crate::cluster::ack::AckChecks>>,
}

/// In memory for a single node; Redis for a cluster (`--redis-url` or
/// `--redis-cluster`), where the node connects before it starts.
async fn seams(
    config: &Config,
    metrics: &Metrics,
    table: &Arc<SessionTable>,
) -> Result<Seams, ServerError> {
    let hub_config = HubConfig {
        history_limit: config.history_size,
        max_buffered: config.max_outbox_messages,
    };
    let broker_metrics = metrics.clone();
    let control: Weak<dyn ControlSink> = Arc::downgrade(table) as Weak<dyn ControlSink>;
    // A device's presence outlives a silent session by at most two
    // heartbeats (sessions refresh it with every ping they send).
    let presence_ttl = 2 * config.heartbeat;
    let Some(target) = &config.redis else {
        let broker_config = MemoryBrokerConfig::from_config(config);
        return Ok(Seams {
            hub: Hub::with_broker(hub_config, metrics.clone(), |sink| {
                MemoryBroker::new(broker_config, broker_metrics, sink)
            }),
            resumes: Arc::new(MemoryResumeStore::with_budget(
                config.node_id.clone(),
                config.max_resume_bytes,
                metrics.resume_records_evicted.clone(),
            )),
            bus: Arc::new(LocalBus::new(config.node_id.clone(), control)),
            presence: Arc::new(MemoryPresence::new(presence_ttl)),
            push_backend: None,
            ack_checks: None,
        });
    };
    use crate::cluster::redis::{self, ack, broker, budget, presence, pubsub, push, resume};
    let redis = redis::Redis::connect(target)
        .await
        .map_err(|e| ServerError::Redis(e.to_string()))?;
    info!(redis = ?target, "cluster mode: positions, history, sessions and presence in Redis");
    let budget =
        budget::RedisBudget::start(redis.conn.clone(), config.redis_max_memory, metrics.clone())
            .await;
    let broker_config = broker::RedisBrokerConfig::from_config(config);
    let sub_config = pubsub::SubscriberConfig {
        max_channels: config.max_channels,
        ..pubsub::SubscriberConfig::new(config.node_id.clone())
    };
    let hub = Hub::with_broker(hub_config, metrics.clone(), |sink| {
        broker::RedisBroker::new(
            &redis,
            broker_config,
            sub_config,
            broker_metrics,
            sink,
            control,
            budget.clone(),
        )
    });
    Ok(Seams {
        hub,
        resumes: Arc::new(resume::RedisResumeStore::new(
            redis.conn.clone(),
            config.resume_window + 2 * config.heartbeat,
            budget,
            metrics.resume_records_evicted.clone(),
        )),
        bus: Arc::new(resume::RedisBus::new(
            redis.conn.clone(),
            redis.is_cluster(),
        )),
        presence: Arc::new(presence::RedisPresence::new(
            redis.conn.clone(),
            config.node_id.clone(),
            presence_ttl,
            metrics.cluster_presence_dropped.clone(),
        )),
        push_backend: Some(tether_push_gateway::Backend {
            queue: Arc::new(push::RedisQueue::new(
                redis.conn.clone(),
                config.node_id.clone(),
            )),
            devices: Arc::new(push::RedisRegistry::new(redis.conn.clone())),
        }),
        ack_checks: Some(Arc::new(ack::RedisAckChecks::new(
            redis.conn.clone(),
            config.node_id.clone(),
        ))),
    })
}

/// Builds the push side: the durable store (devices and the push outbox),
/// the providers, the gateway's delivery task, and the decision rules.
fn start_push(
    config: &Config,
    metrics: &Metrics,
    presence: Arc<dyn Presence>,
    shared: Option<tether_push_gateway::Backend>,
    ack_checks: Option<Arc<dyn crate::cluster::ack::AckChecks>>,
    tokens: &Tokens,
    tasks: &TaskTracker,
) -> Result<Push, ServerError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = tether_push_gateway::Store::open(&config.data_dir)?;
    // A single node keeps its ack-timeout checks in its store too, so that
    // they outlive a crash.
    let ack_checks = ack_checks.or_else(|| {
        Some(
            Arc::new(crate::cluster::memory::StoredAckChecks::new(store.clone()))
                as Arc<dyn crate::cluster::ack::AckChecks>,
        )
    });
    let apns = match &config.apns {
        Some(a) => {
            let mut c =
                tether_push_gateway::ApnsConfig::from_key_file(&a.key_file, &a.key_id, &a.team_id)?
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
    let webpush = match &config.webpush {
        Some(w) => {
            let c = tether_push_gateway::WebPushConfig::from_key_file(
                &w.vapid_private_key,
                &w.vapid_subject,
            )?;
            let client = tether_push_gateway::WebPushClient::new(c)?;
            info!(
                vapid_public_key = client.public_key(),
                "Web Push on: web apps subscribe with this applicationServerKey"
            );
            Some(Arc::new(client))
        }
        None => None,
    };
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(1024);
    tasks.spawn(crate::push::count_events(events_rx, metrics.clone()));
    tasks.spawn(count_token_refreshes(
        apns.clone(),
        fcm.clone(),
        metrics.clone(),
        tokens.push.clone(),
    ));
    // One node: devices and jobs in its redb store. A cluster: in Redis,
    // where every node's gateway takes jobs from the shared queue.
    let gateway_defaults = tether_push_gateway::GatewayConfig {
        coalesce_window: config.push_coalesce_window,
        ..tether_push_gateway::GatewayConfig::default()
    };
    let (backend, gateway_config) = match shared {
        None => (tether_push_gateway::Backend::from(store), gateway_defaults),
        Some(b) => (
            b,
            tether_push_gateway::GatewayConfig {
                max_idle: Duration::from_secs(2),
                ..gateway_defaults
            },
        ),
    };
    let devices = backend.devices.clone();
    let configured = [apns.is_some(), fcm.is_some(), webpush.is_some()];
    let providers: Vec<Arc<dyn tether_push_gateway::Provider>> = [
        apns.clone()
            .map(|a| a as Arc<dyn tether_push_gateway::Provider>),
        fcm.clone()
            .map(|f| f as Arc<dyn tether_push_gateway::Provider>),
        webpush.map(|w| w as Arc<dyn tether_push_gateway::Provider>),
    ]
    .into_iter()
    .flatten()
    .collect();
    let gateway = tether_push_gateway::Gateway::start(
        backend,
        providers,
        gateway_config,
        events_tx,
        tokens.push.clone(),
    );
    let push = Push::new(
        gateway,
        devices,
        presence,
        config.ack_timeout,
        ack_checks,
        configured,
        metrics.clone(),
        tokens.push.clone(),
    );
    // Cluster mode: this node decides the shared ack checks that fall due
    // (its own and those of nodes that died).
    tasks.spawn(push.clone().run_shared_checks());
    Ok(push)
}

/// On SIGHUP, reads `--tls-cert`/`--tls-key` again and serves them to new
/// connections (wss and QUIC); open sessions are untouched. A bad file is
/// logged and the certificate served stays. Without TLS files a SIGHUP is
/// logged and ignored (it must not end the process).
async fn reload_on_sighup(
    hup: std::io::Result<tokio::signal::unix::Signal>,
    certs: Option<Arc<CertStore>>,
    stop: CancellationToken,
) {
    let mut hup = match hup {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP: no certificate reload");
            return;
        }
    };
    loop {
        tokio::select! {
            got = hup.recv() => if got.is_none() { return },
            _ = stop.cancelled() => return,
        }
        match &certs {
            None => info!("SIGHUP: no tls-cert/tls-key configured, nothing to reload"),
            Some(store) => match store.reload() {
                Ok(fingerprint) => info!(
                    %fingerprint,
                    "SIGHUP: TLS certificate reloaded; new connections get it (fingerprint {fingerprint})"
                ),
                Err(e) => {
                    warn!(error = %e, "SIGHUP: TLS certificate not reloaded; the previous one is still served")
                }
            },
        }
    }
}

/// Descriptors kept for what is not a client: the API's connections, Redis,
/// push providers, files, the listeners.
const FD_RESERVE: u64 = crate::api::serve::MAX_CONNECTIONS as u64 + 512;

/// Raises the file-descriptor limit to the hard limit (every client is a
/// descriptor) and returns the client connections it allows: `asked`, or
/// fewer, with a warning, when the limit cannot hold them and the reserve.
fn connection_cap(asked: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "could not read or raise the file-descriptor limit");
            return asked;
        }
    };
    let room = usize::try_from(limit.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    if asked > room {
        warn!(
            max_connections = asked,
            fd_limit = limit,
            cap = room.max(1),
            "max-connections is more than the file-descriptor limit allows (keeping {FD_RESERVE} for the API, Redis and providers): clients are capped lower; raise the hard limit (ulimit -Hn, LimitNOFILE=) for more"
        );
        return room.max(1);
    }
    asked
}

/// Every few seconds: expired history and idle channels, expired resume
/// records, the push outbox depth gauge.
async fn maintain(sessions: Arc<session::Shared>, push: Push, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                sessions.broker.sweep();
                sessions.resumes.sweep();
                if let Ok(depth) = push.gateway().outbox_depth().await {
                    sessions.metrics.push_outbox_depth.set(depth as i64);
                }
            }
            _ = stop.cancelled() => break,
        }
    }
}

/// Publishes the providers' token counts (APNs JWTs signed, FCM grants).
async fn count_token_refreshes(
    apns: Option<Arc<tether_push_gateway::ApnsClient>>,
    fcm: Option<Arc<tether_push_gateway::FcmClient>>,
    metrics: Metrics,
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
