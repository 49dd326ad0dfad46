//! One [`Config`] for the broker, read from a TOML file, `TETHER_*`
//! environment variables and command-line flags (the flag wins, then the
//! environment, then the file, then the default), then validated with errors
//! that name the setting (PROTOCOL.md §12).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// Why the configuration was refused. Every variant names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("setting `{setting}`: {reason}")]
    Invalid {
        setting: &'static str,
        reason: String,
    },
}

/// A value never shown by `Debug` (logs, panics, `{:?}` of the config):
/// keys and secrets. Read it with [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Secret<T> {
        Secret(value)
    }

    pub fn expose(&self) -> &T {
        &self.0
    }

    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret<String> {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl From<&str> for Secret<String> {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

/// Shortest HS256 secret accepted: RFC 7518 §3.2 asks for a key of at
/// least the hash's size (256 bits).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        reason: reason.into(),
    }
}

/// The raw settings, as flags, environment variables or TOML keys. Every
/// field is optional here; defaults are applied by [`Settings::resolve`].
#[derive(Debug, Default, Clone, Parser, Deserialize)]
#[command(
    name = "broker",
    version,
    about = "Tether: real-time push and messaging broker",
    args_override_self = true
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// TOML file with settings (keys are the flag names without `--`).
    #[arg(long, env = "TETHER_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// WebSocket listener address [default: 0.0.0.0:8080]
    #[arg(long, env = "TETHER_CLIENT_ADDR")]
    pub client_addr: Option<String>,
    /// QUIC listener address, or `off` [default: 0.0.0.0:8443]
    #[arg(long, env = "TETHER_QUIC_ADDR")]
    pub quic_addr: Option<String>,
    /// Backend API listener address [default: 127.0.0.1:8081]
    #[arg(long, env = "TETHER_API_ADDR")]
    pub api_addr: Option<String>,
    /// Key the backend API requires as `Authorization: Bearer <key>` [default: none, open]
    #[arg(long, env = "TETHER_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret<String>>,
    /// HS256 secret for client JWTs, at least 32 bytes [default: none, anonymous clients]
    #[arg(long, env = "TETHER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret<String>>,
    /// PEM public key (RSA for RS256, EC P-256 for ES256) for client JWTs
    #[arg(long, env = "TETHER_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub jwt_public_key: Option<PathBuf>,
    /// Client JWTs must carry this in `aud` [default: `aud` not checked]
    #[arg(long, env = "TETHER_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Client JWTs must carry this `iss` [default: `iss` not checked]
    #[arg(long, env = "TETHER_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Redis URL for cluster mode, redis:// or rediss:// (TLS) [default: none, single node]
    #[arg(long, env = "TETHER_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Redis Cluster seed nodes for cluster mode, comma separated redis:// or rediss:// URLs [default: none]
    #[arg(long, env = "TETHER_REDIS_CLUSTER", hide_env_values = true)]
    pub redis_cluster: Option<String>,
    /// Cluster mode: Redis memory (used_memory, per shard) past which history, idempotency keys and ended sessions' records are not kept [default: 90% of Redis's maxmemory; none without it]
    #[arg(long, env = "TETHER_REDIS_MAX_MEMORY")]
    pub redis_max_memory: Option<u64>,
    /// This node's name [default: host name + random suffix]
    #[arg(long, env = "TETHER_NODE_ID")]
    pub node_id: Option<String>,
    /// Embedded store directory [default: ./tether-data]
    #[arg(long, env = "TETHER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Seconds between server pings [default: 25]
    #[arg(long, env = "TETHER_HEARTBEAT")]
    pub heartbeat: Option<u64>,
    /// Messages kept per channel [default: 100]
    #[arg(long, env = "TETHER_HISTORY_SIZE")]
    pub history_size: Option<usize>,
    /// Seconds a message stays in history (and an idempotency key is remembered) [default: 300]
    #[arg(long, env = "TETHER_HISTORY_TTL")]
    pub history_ttl: Option<u64>,
    /// Seconds a session stays resumable after it ends [default: 120]
    #[arg(long, env = "TETHER_RESUME_WINDOW")]
    pub resume_window: Option<u64>,
    /// Secret that signs resume tokens; share it across a cluster [default: random per start]
    #[arg(long, env = "TETHER_RESUME_SECRET", hide_env_values = true)]
    pub resume_secret: Option<Secret<String>>,
    /// Seconds before an unacked personal message also goes to push [default: off]
    #[arg(long, env = "TETHER_ACK_TIMEOUT")]
    pub ack_timeout: Option<u64>,
    /// Largest message, in bytes [default: 65536]
    #[arg(long, env = "TETHER_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<usize>,
    /// Protocol messages per second a client may send, bursts of twice that [default: 100]
    #[arg(long, env = "TETHER_CLIENT_RATE")]
    pub client_rate: Option<u32>,
    /// Subscribes per second a client may send, bursts of twice that; more get `error` `rate_limited` [default: 50]
    #[arg(long, env = "TETHER_SUBSCRIBE_RATE")]
    pub subscribe_rate: Option<u32>,
    /// Backend API requests per second per API key, bursts of twice that; more get 429 with Retry-After; 0 = no limit [default: 0]
    #[arg(long, env = "TETHER_API_RATE")]
    pub api_rate: Option<u32>,
    /// New client connections per second, WebSocket and QUIC together, bursts of twice that; more are turned away (503 with Retry-After); 0 = no limit [default: 0]
    #[arg(long, env = "TETHER_ACCEPT_RATE")]
    pub accept_rate: Option<u32>,
    /// Client connections from one IP address at once; more are turned away; 0 = no limit [default: 0]
    #[arg(long, env = "TETHER_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<u32>,
    /// Seconds from connection to `connect` [default: 10]
    #[arg(long, env = "TETHER_CONNECT_TIMEOUT")]
    pub connect_timeout: Option<u64>,
    /// Bytes queued for one client before it is closed as slow (4008) [default: 1048576]
    #[arg(long, env = "TETHER_MAX_OUTBOX_BYTES")]
    pub max_outbox_bytes: Option<usize>,
    /// Messages queued for one client before it is closed as slow (4008) [default: 4096]
    #[arg(long, env = "TETHER_MAX_OUTBOX_MESSAGES")]
    pub max_outbox_messages: Option<usize>,
    /// Most channels one session may subscribe to [default: 1024]
    #[arg(long, env = "TETHER_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: Option<usize>,
    /// Most client connections at once; more are refused at accept [default: 100000]
    #[arg(long, env = "TETHER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most channels a node keeps state for (a single node: every channel; a cluster node: those it subscribes to in Redis); past it, a subscribe (single node: also a publish) to a new channel answers `unavailable` [default: 1000000]
    #[arg(long, env = "TETHER_MAX_CHANNELS")]
    pub max_channels: Option<usize>,
    /// Bytes a single node keeps for the records of ended sessions that may still resume; past it the oldest are forgotten (they start afresh) [default: 268435456]
    #[arg(long, env = "TETHER_MAX_RESUME_BYTES")]
    pub max_resume_bytes: Option<usize>,
    /// History payload bytes a single node keeps across all channels; past it a publication is delivered but not retained and its channel's history is dropped [default: 1073741824]
    #[arg(long, env = "TETHER_MAX_HISTORY_BYTES")]
    pub max_history_bytes: Option<usize>,
    /// WebSocket read buffer per connection, bytes [default: 2048]
    #[arg(long, env = "TETHER_WS_READ_BUFFER")]
    pub ws_read_buffer: Option<usize>,
    /// Seconds a graceful shutdown may take [default: 10]
    #[arg(long, env = "TETHER_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<u64>,
    /// Seconds a backend API request may take, its body read and its answer made; past it 408 [default: 30]
    #[arg(long, env = "TETHER_API_REQUEST_TIMEOUT")]
    pub api_request_timeout: Option<u64>,
    /// PEM certificate chain for wss and QUIC
    #[arg(long, env = "TETHER_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for wss and QUIC
    #[arg(long, env = "TETHER_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// APNs token key (.p8)
    #[arg(long, env = "TETHER_APNS_KEY_FILE", value_name = "FILE")]
    pub apns_key_file: Option<PathBuf>,
    /// APNs key id
    #[arg(long, env = "TETHER_APNS_KEY_ID")]
    pub apns_key_id: Option<String>,
    /// APNs team id
    #[arg(long, env = "TETHER_APNS_TEAM_ID")]
    pub apns_team_id: Option<String>,
    /// APNs topic (bundle id)
    #[arg(long, env = "TETHER_APNS_TOPIC")]
    pub apns_topic: Option<String>,
    /// APNs base URL; http:// means HTTP/2 without TLS (tests)
    #[arg(long, env = "TETHER_APNS_ENDPOINT")]
    pub apns_endpoint: Option<String>,
    /// FCM service-account JSON
    #[arg(long, env = "TETHER_FCM_SERVICE_ACCOUNT", value_name = "FILE")]
    pub fcm_service_account: Option<PathBuf>,
    /// FCM base URL
    #[arg(long, env = "TETHER_FCM_ENDPOINT")]
    pub fcm_endpoint: Option<String>,
    /// Web Push VAPID private key: PEM (P-256) or the base64url key
    #[arg(long, env = "TETHER_VAPID_PRIVATE_KEY", value_name = "FILE")]
    pub vapid_private_key: Option<PathBuf>,
    /// Web Push VAPID contact: a mailto: or https: URL
    #[arg(long, env = "TETHER_VAPID_SUBJECT")]
    pub vapid_subject: Option<String>,
    /// Seconds within which an offline device gets at most one push per collapse key (the rest summed up in one later push with their count); 0 = every publication pushed [default: 0]
    #[arg(long, env = "TETHER_PUSH_COALESCE_WINDOW")]
    pub push_coalesce_window: Option<u64>,
    /// Seconds without any packet before a QUIC connection is dropped [default: 60]
    #[arg(long, env = "TETHER_QUIC_IDLE_TIMEOUT")]
    pub quic_idle_timeout: Option<u64>,
    /// Seconds between QUIC keep-alive packets from the server; 0 = off, the protocol's pings suffice [default: 0]
    #[arg(long, env = "TETHER_QUIC_KEEP_ALIVE")]
    pub quic_keep_alive: Option<u64>,
    /// QUIC address validation (a Retry round trip before the handshake): `under-load` (when 256 or more handshakes are in flight), `always` or `never` [default: under-load]
    #[arg(long, env = "TETHER_QUIC_RETRY")]
    pub quic_retry: Option<String>,
    /// 64 hex characters: the key sealing TLS session tickets, shared by the nodes of a cluster [default: random per start]
    #[arg(long, env = "TETHER_QUIC_TICKET_KEY", hide_env_values = true)]
    pub quic_ticket_key: Option<Secret<String>>,
    /// Log format: `text` or `json` [default: text]
    #[arg(long, env = "TETHER_LOG_FORMAT")]
    pub log_format: Option<String>,
}

/// How clients authenticate.
#[derive(Clone)]
pub enum ClientAuth {
    /// No client auth: anonymous users (development).
    Anonymous,
    /// HS256 with a shared secret.
    Secret(Vec<u8>),
    /// RS256 or ES256 with a public key (PEM bytes).
    PublicKey(Vec<u8>),
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.write_str(match self {
            ClientAuth::Anonymous => "Anonymous",
            ClientAuth::Secret(_) => "Secret(..)",
            ClientAuth::PublicKey(_) => "PublicKey(..)",
        })
    }
}

/// APNs token-auth settings (all four given, or none).
#[derive(Debug, Clone)]
pub struct ApnsSettings {
    pub key_file: PathBuf,
    pub key_id: String,
    pub team_id: String,
    pub topic: String,
    pub endpoint: Option<String>,
}

/// FCM HTTP v1 settings.
#[derive(Debug, Clone)]
pub struct FcmSettings {
    pub service_account: PathBuf,
    pub endpoint: Option<String>,
}

/// Web Push (VAPID) settings: both given, or none.
#[derive(Debug, Clone)]
pub struct WebPushSettings {
    pub vapid_private_key: PathBuf,
    pub vapid_subject: String,
}

/// The Redis a cluster shares. Its `Debug` leaves out the URLs'
/// passwords (it is logged at start).
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis (`--redis-url`).
    Single(String),
    /// A Redis Cluster, found through these seed nodes (`--redis-cluster`).
    Cluster(Vec<String>),
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisTarget::Single(url) => f.debug_tuple("Single").field(&redact_url(url)).finish(),
            RedisTarget::Cluster(urls) => f
                .debug_tuple("Cluster")
                .field(&urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// `redis://user:secret@host:6379/0` → `redis://user:…@host:6379/0`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:…@{host}")
        }
        None => url.to_owned(),
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub client_addr: SocketAddr,
    pub quic_addr: Option<SocketAddr>,
    pub api_addr: SocketAddr,
    pub api_key: Option<Secret<String>>,
    pub client_auth: ClientAuth,
    /// The `aud` client JWTs must carry, if any.
    pub jwt_audience: Option<String>,
    /// The `iss` client JWTs must carry, if any.
    pub jwt_issuer: Option<String>,
    /// Cluster mode: where the shared state lives; `None` for a single node.
    pub redis: Option<RedisTarget>,
    /// Cluster mode: the Redis memory budget (see `cluster::redis::budget`).
    pub redis_max_memory: Option<u64>,
    pub node_id: String,
    pub data_dir: PathBuf,
    pub heartbeat: Duration,
    pub history_size: usize,
    pub history_ttl: Duration,
    pub resume_window: Duration,
    pub resume_secret: Option<Secret<Vec<u8>>>,
    pub ack_timeout: Option<Duration>,
    pub max_message_size: usize,
    pub client_rate: u32,
    pub subscribe_rate: u32,
    /// Requests/s per API key; `None`: no limit.
    pub api_rate: Option<u32>,
    /// New connections/s; `None`: no limit.
    pub accept_rate: Option<u32>,
    /// Connections per IP; `None`: no limit.
    pub max_connections_per_ip: Option<u32>,
    pub connect_timeout: Duration,
    pub max_outbox_bytes: usize,
    pub max_outbox_messages: usize,
    pub max_subscriptions: usize,
    pub max_connections: usize,
    pub max_channels: usize,
    pub max_resume_bytes: usize,
    pub max_history_bytes: usize,
    pub ws_read_buffer: usize,
    pub shutdown_timeout: Duration,
    pub api_request_timeout: Duration,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub apns: Option<ApnsSettings>,
    pub fcm: Option<FcmSettings>,
    pub webpush: Option<WebPushSettings>,
    /// Push coalescing window; `None`: off.
    pub push_coalesce_window: Option<Duration>,
    pub quic_idle_timeout: Duration,
    pub quic_keep_alive: Option<Duration>,
    pub quic_retry: QuicRetry,
    pub quic_ticket_key: Option<Secret<[u8; 32]>>,
    pub log_format: LogFormat,
}

/// When a QUIC client must prove its address (a Retry) before the broker
/// spends a handshake on it (`--quic-retry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuicRetry {
    /// When at least a quarter of the handshake slots are taken.
    UnderLoad,
    Always,
    Never,
}

impl Default for Config {
    fn default() -> Self {
        // The defaults of PROTOCOL.md §12; resolving empty settings cannot fail.
        Settings::default()
            .resolve_without_file()
            .unwrap_or_else(|e| unreachable!("defaults are valid: {e}"))
    }
}

impl Config {
    /// Settings from the command line and environment, merged over the TOML
    /// file they name, then validated.
    pub fn load() -> Result<Config, ConfigError> {
        Settings::parse().resolve()
    }

    /// A configuration for tests and embedding: ephemeral ports on loopback,
    /// QUIC off, a temporary data directory left to the caller.
    pub fn for_tests() -> Config {
        let loopback: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
        Config {
            client_addr: loopback,
            quic_addr: None,
            api_addr: loopback,
            node_id: "test-node".into(),
            ..Config::default()
        }
    }
}

impl Settings {
    /// Reads the file named by `--config`, merges it under these settings
    /// and validates the result.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let merged = match self.config.clone() {
            Some(path) => self.over(Settings::from_file(&path)?),
            None => self,
        };
        merged.resolve_without_file()
    }

    /// Parses a TOML settings file.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// These settings, with `lower` filling the gaps.
    pub fn over(self, lower: Settings) -> Settings {
        macro_rules! merge {
            ($($f:ident),* $(,)?) => {
                Settings { $($f: self.$f.or(lower.$f),)* }
            };
        }
        merge!(
            config,
            client_addr,
            quic_addr,
            api_addr,
            api_key,
            jwt_secret,
            jwt_public_key,
            jwt_audience,
            jwt_issuer,
            redis_url,
            redis_cluster,
            redis_max_memory,
            node_id,
            data_dir,
            heartbeat,
            history_size,
            history_ttl,
            resume_window,
            resume_secret,
            ack_timeout,
            max_message_size,
            client_rate,
            subscribe_rate,
            api_rate,
            accept_rate,
            max_connections_per_ip,
            connect_timeout,
            max_outbox_bytes,
            max_outbox_messages,
            max_subscriptions,
            max_connections,
            max_channels,
            max_resume_bytes,
            max_history_bytes,
            ws_read_buffer,
            shutdown_timeout,
            api_request_timeout,
            tls_cert,
            tls_key,
            apns_key_file,
            apns_key_id,
            apns_team_id,
            apns_topic,
            apns_endpoint,
            fcm_service_account,
            fcm_endpoint,
            vapid_private_key,
            vapid_subject,
            push_coalesce_window,
            quic_idle_timeout,
            quic_keep_alive,
            quic_retry,
            quic_ticket_key,
            log_format,
        )
    }

    /// Applies defaults and validates, without reading any file.
    pub fn resolve_without_file(self) -> Result<Config, ConfigError> {
        let addr = |setting: &'static str, v: Option<String>, default: &str| {
            let v = v.unwrap_or_else(|| default.to_owned());
            v.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    setting,
                    format!("{v:?} is not an address like 0.0.0.0:8080 ({e})"),
                )
            })
        };
        let client_addr = addr("client-addr", self.client_addr, "0.0.0.0:8080")?;
        let api_addr = addr("api-addr", self.api_addr, "127.0.0.1:8081")?;
        let quic_addr = match self.quic_addr.as_deref() {
            Some("off") => None,
            other => Some(addr("quic-addr", other.map(str::to_owned), "0.0.0.0:8443")?),
        };

        let client_auth = match (self.jwt_secret, self.jwt_public_key) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "jwt-secret",
                    "give either jwt-secret or jwt-public-key, not both",
                ));
            }
            (Some(s), None) if s.expose().len() < MIN_JWT_SECRET_BYTES => {
                return Err(invalid(
                    "jwt-secret",
                    format!(
                        "must be at least {MIN_JWT_SECRET_BYTES} bytes (an HS256 key shorter than the hash can be guessed); e.g. `openssl rand -hex 32`"
                    ),
                ));
            }
            (Some(s), None) => ClientAuth::Secret(s.into_inner().into_bytes()),
            (None, Some(path)) => {
                let pem = std::fs::read(&path).map_err(|e| {
                    invalid(
                        "jwt-public-key",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                ClientAuth::PublicKey(pem)
            }
            (None, None) => ClientAuth::Anonymous,
        };

        let positive =
            |setting: &'static str, v: Option<u64>, default: u64| match v.unwrap_or(default) {
                0 => Err(invalid(setting, "must be at least 1")),
                n => Ok(n),
            };
        let heartbeat = Duration::from_secs(positive("heartbeat", self.heartbeat, 25)?);
        let history_ttl = Duration::from_secs(positive("history-ttl", self.history_ttl, 300)?);
        let resume_window =
            Duration::from_secs(positive("resume-window", self.resume_window, 120)?);
        let connect_timeout =
            Duration::from_secs(positive("connect-timeout", self.connect_timeout, 10)?);
        let shutdown_timeout =
            Duration::from_secs(positive("shutdown-timeout", self.shutdown_timeout, 10)?);
        let api_request_timeout = Duration::from_secs(positive(
            "api-request-timeout",
            self.api_request_timeout,
            30,
        )?);
        let ack_timeout = match self.ack_timeout {
            Some(0) => {
                return Err(invalid(
                    "ack-timeout",
                    "must be at least 1 (omit it for off)",
                ));
            }
            Some(s) => Some(Duration::from_secs(s)),
            None => None,
        };
        let history_size = self.history_size.unwrap_or(100);
        if history_size == 0 {
            return Err(invalid("history-size", "must be at least 1"));
        }
        let max_message_size = self.max_message_size.unwrap_or(64 * 1024);
        if !(256..=16 * 1024 * 1024).contains(&max_message_size) {
            return Err(invalid(
                "max-message-size",
                "must be between 256 bytes and 16 MiB",
            ));
        }
        let client_rate = self.client_rate.unwrap_or(100);
        if client_rate == 0 {
            return Err(invalid("client-rate", "must be at least 1"));
        }
        let subscribe_rate = self.subscribe_rate.unwrap_or(50);
        if subscribe_rate == 0 {
            return Err(invalid("subscribe-rate", "must be at least 1"));
        }
        let api_rate = self.api_rate.filter(|r| *r > 0);
        let accept_rate = self.accept_rate.filter(|r| *r > 0);
        let max_connections_per_ip = self.max_connections_per_ip.filter(|n| *n > 0);
        let max_outbox_bytes = self.max_outbox_bytes.unwrap_or(1024 * 1024);
        if max_outbox_bytes < max_message_size {
            return Err(invalid(
                "max-outbox-bytes",
                format!("must be at least max-message-size ({max_message_size})"),
            ));
        }
        let max_outbox_messages = self.max_outbox_messages.unwrap_or(4096);
        if max_outbox_messages < 16 {
            return Err(invalid("max-outbox-messages", "must be at least 16"));
        }
        let max_subscriptions = self.max_subscriptions.unwrap_or(1024);
        if max_subscriptions == 0 {
            return Err(invalid("max-subscriptions", "must be at least 1"));
        }
        let max_connections = self.max_connections.unwrap_or(100_000);
        if max_connections == 0 {
            return Err(invalid("max-connections", "must be at least 1"));
        }
        let max_channels = self.max_channels.unwrap_or(1_000_000);
        if max_channels == 0 {
            return Err(invalid("max-channels", "must be at least 1"));
        }
        let max_resume_bytes = self
            .max_resume_bytes
            .unwrap_or(crate::cluster::memory::resume::DEFAULT_RESUME_BYTES);
        if max_resume_bytes < 64 * 1024 {
            return Err(invalid("max-resume-bytes", "must be at least 65536"));
        }
        let max_history_bytes = self.max_history_bytes.unwrap_or(1 << 30);
        if max_history_bytes < max_message_size {
            return Err(invalid(
                "max-history-bytes",
                "must be at least max-message-size",
            ));
        }
        let ws_read_buffer = self.ws_read_buffer.unwrap_or(2048);
        if !(512..=1024 * 1024).contains(&ws_read_buffer) {
            return Err(invalid(
                "ws-read-buffer",
                "must be between 512 bytes and 1 MiB",
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(invalid("tls-cert", "tls-cert and tls-key go together"));
        }
        let resume_secret = match self.resume_secret {
            Some(s) if s.expose().len() < 16 => {
                return Err(invalid("resume-secret", "must be at least 16 bytes"));
            }
            Some(s) => Some(Secret(s.into_inner().into_bytes())),
            None => None,
        };
        let redis_scheme = |url: &str| url.starts_with("redis://") || url.starts_with("rediss://");
        let redis = match (self.redis_url, self.redis_cluster) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "redis-url",
                    "give either redis-url (one Redis) or redis-cluster (a Redis Cluster), not both",
                ));
            }
            (Some(url), None) if !redis_scheme(&url) => {
                return Err(invalid(
                    "redis-url",
                    "must start with redis:// or rediss://",
                ));
            }
            (Some(url), None) => Some(RedisTarget::Single(url)),
            (None, Some(list)) => {
                let seeds: Vec<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                if seeds.is_empty() || !seeds.iter().all(|s| redis_scheme(s)) {
                    return Err(invalid(
                        "redis-cluster",
                        "must be a comma-separated list of redis:// or rediss:// URLs",
                    ));
                }
                Some(RedisTarget::Cluster(seeds))
            }
            (None, None) => None,
        };
        if redis.is_some() && resume_secret.is_none() {
            return Err(invalid(
                "resume-secret",
                "cluster mode needs the same resume-secret on every node: resume tokens signed with a random key of one node cannot be read by the others",
            ));
        }
        let log_format = match self.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log-format",
                    format!("{other:?} is neither `text` nor `json`"),
                ));
            }
        };
        let node_id = match self.node_id {
            Some(n) if n.is_empty() => return Err(invalid("node-id", "must not be empty")),
            Some(n) => n,
            None => default_node_id(),
        };
        let apns = [
            self.apns_key_file.is_some(),
            self.apns_key_id.is_some(),
            self.apns_team_id.is_some(),
            self.apns_topic.is_some(),
        ];
        for (given, setting) in [
            (&self.apns_endpoint, "apns-endpoint"),
            (&self.fcm_endpoint, "fcm-endpoint"),
        ] {
            if let Some(url) = given
                && !tether_push_gateway::validate::provider_url_allowed(url)
            {
                return Err(invalid(
                    setting,
                    "must be an https:// URL (http://, without TLS, only to a loopback host)",
                ));
            }
        }
        let webpush = match (self.vapid_private_key, self.vapid_subject) {
            (None, None) => None,
            (Some(vapid_private_key), Some(vapid_subject)) => {
                if !(vapid_subject.starts_with("mailto:") || vapid_subject.starts_with("https:")) {
                    return Err(invalid(
                        "vapid-subject",
                        "must be a mailto: or https: URL (push services use it to reach the operator)",
                    ));
                }
                Some(WebPushSettings {
                    vapid_private_key,
                    vapid_subject,
                })
            }
            (Some(_), None) => {
                return Err(invalid(
                    "vapid-subject",
                    "Web Push needs vapid-private-key and vapid-subject together",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "vapid-private-key",
                    "Web Push needs vapid-private-key and vapid-subject together",
                ));
            }
        };
        let push_coalesce_window = match self.push_coalesce_window.unwrap_or(0) {
            0 => None,
            s if s > 86_400 => {
                return Err(invalid(
                    "push-coalesce-window",
                    "must be at most 86400 seconds",
                ));
            }
            s => Some(Duration::from_secs(s)),
        };
        if apns.iter().any(|b| *b) && !apns.iter().all(|b| *b) {
            return Err(invalid(
                "apns-key-file",
                "APNs needs apns-key-file, apns-key-id, apns-team-id and apns-topic together",
            ));
        }

        let quic_idle_timeout =
            Duration::from_secs(positive("quic-idle-timeout", self.quic_idle_timeout, 60)?);
        let quic_retry = match self.quic_retry.as_deref() {
            None | Some("under-load") => QuicRetry::UnderLoad,
            Some("always") => QuicRetry::Always,
            Some("never") => QuicRetry::Never,
            Some(other) => {
                return Err(invalid(
                    "quic-retry",
                    format!("{other:?} is not `under-load`, `always` or `never`"),
                ));
            }
        };
        let quic_keep_alive = match self.quic_keep_alive.unwrap_or(0) {
            0 => None,
            s if Duration::from_secs(s) >= quic_idle_timeout => {
                return Err(invalid(
                    "quic-keep-alive",
                    "must be shorter than quic-idle-timeout",
                ));
            }
            s => Some(Duration::from_secs(s)),
        };
        let quic_ticket_key = match self.quic_ticket_key {
            None => None,
            Some(hex_key) => {
                let bytes = hex::decode(hex_key.expose().trim())
                    .map_err(|_| invalid("quic-ticket-key", "must be 64 hex characters"))?;
                Some(Secret(<[u8; 32]>::try_from(bytes.as_slice()).map_err(
                    |_| invalid("quic-ticket-key", "must be 64 hex characters (32 bytes)"),
                )?))
            }
        };
        if redis.is_some() && quic_addr.is_some() && quic_ticket_key.is_none() {
            return Err(invalid(
                "quic-ticket-key",
                "cluster mode with QUIC on needs the same quic-ticket-key on every node (or --quic-addr off): a session ticket from one node must open on the others",
            ));
        }

        Ok(Config {
            client_addr,
            quic_addr,
            api_addr,
            api_key: self.api_key.filter(|k| !k.expose().is_empty()),
            client_auth,
            jwt_audience: self.jwt_audience.filter(|a| !a.is_empty()),
            jwt_issuer: self.jwt_issuer.filter(|i| !i.is_empty()),
            redis,
            redis_max_memory: self.redis_max_memory,
            node_id,
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from("./tether-data")),
            heartbeat,
            history_size,
            history_ttl,
            resume_window,
            resume_secret,
            ack_timeout,
            max_message_size,
            client_rate,
            subscribe_rate,
            api_rate,
            accept_rate,
            max_connections_per_ip,
            connect_timeout,
            max_outbox_bytes,
            max_outbox_messages,
            max_subscriptions,
            max_connections,
            max_channels,
            max_resume_bytes,
            max_history_bytes,
            ws_read_buffer,
            shutdown_timeout,
            api_request_timeout,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            apns: match (
                self.apns_key_file,
                self.apns_key_id,
                self.apns_team_id,
                self.apns_topic,
            ) {
                (Some(key_file), Some(key_id), Some(team_id), Some(topic)) => Some(ApnsSettings {
                    key_file,
                    key_id,
                    team_id,
                    topic,
                    endpoint: self.apns_endpoint,
                }),
                _ => None,
            },
            fcm: self.fcm_service_account.map(|service_account| FcmSettings {
                service_account,
                endpoint: self.fcm_endpoint,
            }),
            webpush,
            push_coalesce_window,
            quic_idle_timeout,
            quic_keep_alive,
            quic_retry,
            quic_ticket_key,
            log_format,
        })
    }
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tether".to_owned());
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_protocol() {
        let c = Config::default();
        assert_eq!(c.client_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(
            c.quic_addr.map(|a| a.to_string()).as_deref(),
            Some("0.0.0.0:8443")
        );
        assert_eq!(c.api_addr.to_string(), "127.0.0.1:8081");
        assert_eq!(c.heartbeat, Duration::from_secs(25));
        assert_eq!(c.history_size, 100);
        assert_eq!(c.history_ttl, Duration::from_secs(300));
        assert_eq!(c.resume_window, Duration::from_secs(120));
        assert_eq!(c.max_message_size, 65536);
        assert_eq!(c.client_rate, 100);
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.max_outbox_bytes, 1048576);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
        assert!(c.ack_timeout.is_none());
        assert!(matches!(c.client_auth, ClientAuth::Anonymous));
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tether.toml");
        std::fs::write(
            &path,
            "heartbeat = 7\nhistory-size = 12\nquic-addr = \"off\"\n",
        )
        .expect("write");
        let cli = Settings::try_parse_from([
            "broker",
            "--config",
            path.to_str().expect("utf8"),
            "--heartbeat",
            "9",
        ])
        .expect("parses");
        let c = cli.resolve().expect("valid");
        assert_eq!(c.heartbeat, Duration::from_secs(9));
        assert_eq!(c.history_size, 12);
        assert!(c.quic_addr.is_none());
    }

    #[test]
    fn errors_name_the_setting() {
        let bad = |s: Settings| s.resolve_without_file().expect_err("invalid").to_string();
        let e = bad(Settings {
            client_addr: Some("nowhere".into()),
            ..Settings::default()
        });
        assert!(e.contains("client-addr"), "{e}");
        let e = bad(Settings {
            heartbeat: Some(0),
            ..Settings::default()
        });
        assert!(e.contains("heartbeat"), "{e}");
        let e = bad(Settings {
            jwt_secret: Some("s".into()),
            jwt_public_key: Some("k.pem".into()),
            ..Settings::default()
        });
        assert!(e.contains("jwt-secret"), "{e}");
        let e = bad(Settings {
            log_format: Some("xml".into()),
            ..Settings::default()
        });
        assert!(e.contains("log-format"), "{e}");
    }

    #[test]
    fn secrets_are_never_in_debug_output() {
        let settings = Settings {
            api_key: Some("api-key-SEKRIT".into()),
            jwt_secret: Some("jwt-secret-SEKRIT-0123456789abcdef".into()),
            resume_secret: Some("resume-secret-SEKRIT".into()),
            quic_ticket_key: Some(Secret::from(&*"ab".repeat(32))),
            redis_url: Some("redis://127.0.0.1:6390".into()),
            ..Settings::default()
        };
        let config = settings.clone().resolve_without_file().expect("valid");
        let api = crate::api::ApiConfig::from_config(&config);
        for shown in [
            format!("{settings:?}"),
            format!("{config:?}"),
            format!("{api:?}"),
        ] {
            assert!(!shown.contains("SEKRIT"), "{shown}");
            assert!(!shown.contains("abab"), "{shown}");
            assert!(shown.contains("Secret(..)"), "{shown}");
        }
        assert_eq!(
            config.api_key.as_ref().map(|k| k.expose().as_str()),
            Some("api-key-SEKRIT")
        );
    }

    #[test]
    fn redis_passwords_are_not_shown() {
        let t = RedisTarget::Single("redis://app:hunter2@10.0.0.7:6379/0".into());
        let shown = format!("{t:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("10.0.0.7:6379"), "{shown}");
        let t = RedisTarget::Cluster(vec!["rediss://:pw@a:1".into(), "redis://b:2".into()]);
        let shown = format!("{t:?}");
        assert!(!shown.contains("pw@"), "{shown}");
        assert!(shown.contains("redis://b:2"), "{shown}");
    }

    #[test]
    fn an_hs256_secret_shorter_than_the_hash_is_refused() {
        let with = |s: &str| {
            Settings {
                jwt_secret: Some(s.into()),
                ..Settings::default()
            }
            .resolve_without_file()
        };
        let e = with(&"x".repeat(31)).expect_err("too short").to_string();
        assert!(e.contains("jwt-secret") && e.contains("32 bytes"), "{e}");
        assert!(!e.contains("xxxx"), "the secret is echoed: {e}");
        assert!(with(&"x".repeat(32)).is_ok());
    }

    #[test]
    fn cluster_mode_needs_shared_secrets_and_one_kind_of_redis() {
        let secret = Some(Secret::from("0123456789abcdef0123"));
        let bad = |s: Settings| s.resolve_without_file().expect_err("invalid").to_string();
        let e = bad(Settings {
            redis_url: Some("redis://127.0.0.1:6390".into()),
            quic_addr: Some("off".into()),
            ..Settings::default()
        });
        assert!(e.contains("resume-secret"), "{e}");
        let e = bad(Settings {
            redis_url: Some("redis://127.0.0.1:6390".into()),
            resume_secret: secret.clone(),
            ..Settings::default()
        });
        assert!(e.contains("quic-ticket-key"), "{e}");
        let e = bad(Settings {
            redis_url: Some("redis://a:1".into()),
            redis_cluster: Some("redis://b:2".into()),
            resume_secret: secret.clone(),
            ..Settings::default()
        });
        assert!(e.contains("not both"), "{e}");
        let e = bad(Settings {
            redis_cluster: Some("redis://a:1,http://b:2".into()),
            resume_secret: secret.clone(),
            quic_addr: Some("off".into()),
            ..Settings::default()
        });
        assert!(e.contains("redis-cluster"), "{e}");
        let c = Settings {
            redis_cluster: Some(" redis://a:1, rediss://b:2 ".into()),
            resume_secret: secret,
            quic_addr: Some("off".into()),
            ..Settings::default()
        }
        .resolve_without_file()
        .expect("valid");
        assert_eq!(
            c.redis,
            Some(RedisTarget::Cluster(vec![
                "redis://a:1".into(),
                "rediss://b:2".into()
            ]))
        );
    }

    #[test]
    fn unknown_file_keys_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tether.toml");
        std::fs::write(&path, "hearbeat = 7\n").expect("write");
        let e = Settings::from_file(&path).expect_err("typo").to_string();
        assert!(e.contains("hearbeat"), "{e}");
    }
}
