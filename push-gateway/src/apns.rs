//! APNs client: HTTP/2 `POST {endpoint}/3/device/{token}` with token
//! (JWT, ES256) authentication.
//!
//! The provider JWT is signed once and reused for [`DEFAULT_TOKEN_LIFETIME`]
//! (Apple accepts one for an hour and refuses refreshing more than every 20
//! minutes), so signing is not on the per-push path; an
//! `ExpiredProviderToken` answer drops it early and the job is retried at
//! once with a fresh one. All pushes share one HTTP/2 connection per
//! endpoint (reqwest's pool), multiplexed.
//!
//! Written by hand rather than with the `a2` crate, which has no custom
//! endpoint and pads its JWT's base64 (see shared/CRATES.md).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::RwLock;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::outcome::{APNS_EXPIRED_PROVIDER_TOKEN, Outcome, classify_apns, parse_retry_after};
use crate::provider::{
    CONNECT_TIMEOUT, ConfigError, DEFAULT_REQUEST_TIMEOUT, KEEPALIVE_INTERVAL, Provider,
    SendFuture, network_outcome, read_file,
};
use crate::types::{Platform, Priority, PushJob, unix_now};

/// Apple's production endpoint.
pub const PRODUCTION_ENDPOINT: &str = "https://api.push.apple.com";
/// Apple's development (sandbox) endpoint.
pub const SANDBOX_ENDPOINT: &str = "https://api.sandbox.push.apple.com";
/// How long one provider JWT is used before a new one is signed.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(50 * 60);
/// Largest payload APNs accepts for a regular notification, in bytes.
pub const MAX_PAYLOAD: usize = 4096;

/// APNs settings (`--apns-key-file`, `--apns-key-id`, `--apns-team-id`,
/// `--apns-topic`, `--apns-endpoint`).
#[derive(Clone)]
pub struct ApnsConfig {
    /// The `.p8` signing key: PKCS#8 PEM of a P-256 private key.
    pub key_pem: Vec<u8>,
    pub key_id: String,
    pub team_id: String,
    /// Default `apns-topic` (the app's bundle id), for devices without one.
    pub topic: Option<String>,
    /// Custom endpoint for every device; `None` picks Apple's production or
    /// sandbox endpoint per device. `http://` means HTTP/2 without TLS.
    pub endpoint: Option<String>,
    pub request_timeout: Duration,
    pub token_lifetime: Duration,
}

impl std::fmt::Debug for ApnsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsConfig")
            .field("key_pem", &"<redacted>")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .field("topic", &self.topic)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl ApnsConfig {
    /// Settings with defaults for everything but the credentials.
    pub fn new(
        key_pem: impl Into<Vec<u8>>,
        key_id: impl Into<String>,
        team_id: impl Into<String>,
    ) -> Self {
        Self {
            key_pem: key_pem.into(),
            key_id: key_id.into(),
            team_id: team_id.into(),
            topic: None,
            endpoint: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
        }
    }

    /// Reads the key from a `.p8` file.
    pub fn from_key_file(
        path: impl AsRef<Path>,
        key_id: impl Into<String>,
        team_id: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        let pem = read_file("--apns-key-file", path.as_ref())?;
        Ok(Self::new(pem, key_id, team_id))
    }

    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

#[derive(Deserialize)]
struct ErrorBody {
    reason: Option<String>,
}

/// A signed provider JWT, ready as an `authorization` header value.
struct ProviderToken {
    header: HeaderValue,
    issued: Instant,
    generation: u64,
}

/// The APNs provider.
pub struct ApnsClient {
    http: reqwest::Client,
    key: EncodingKey,
    header: Header,
    team_id: String,
    topic: Option<String>,
    endpoint: Option<String>,
    token_lifetime: Duration,
    token: RwLock<Option<Arc<ProviderToken>>>,
    signed: AtomicU64,
}

impl std::fmt::Debug for ApnsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsClient")
            .field("endpoint", &self.endpoint)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl ApnsClient {
    /// Checks the settings (the key must sign) and builds the client.
    pub fn new(config: ApnsConfig) -> Result<Self, ConfigError> {
        let invalid = |setting, message: String| ConfigError::Invalid { setting, message };
        let key = EncodingKey::from_ec_pem(&config.key_pem).map_err(|e| {
            invalid(
                "--apns-key-file",
                format!("not a PKCS#8 PEM P-256 private key (.p8): {e}"),
            )
        })?;
        if config.key_id.is_empty() {
            return Err(invalid("--apns-key-id", "is empty".into()));
        }
        if config.team_id.is_empty() {
            return Err(invalid("--apns-team-id", "is empty".into()));
        }
        let endpoint = match config.endpoint {
            Some(e) => {
                if !(e.starts_with("https://") || e.starts_with("http://")) {
                    return Err(invalid(
                        "--apns-endpoint",
                        format!("{e:?} is not an http:// or https:// URL"),
                    ));
                }
                Some(e.trim_end_matches('/').to_owned())
            }
            None => None,
        };
        let mut header = Header::new(Algorithm::ES256);
        header.typ = None;
        header.kid = Some(config.key_id);
        // APNs speaks only HTTP/2: prior knowledge for http://, ALPN `h2`
        // only for https://.
        let http = reqwest::Client::builder()
            .http2_prior_knowledge()
            .timeout(config.request_timeout)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(None)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .http2_keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .user_agent(concat!("tether-push-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConfigError::Http(e.to_string()))?;
        let client = Self {
            http,
            key,
            header,
            team_id: config.team_id,
            topic: config.topic,
            endpoint,
            token_lifetime: config.token_lifetime,
            token: RwLock::new(None),
            signed: AtomicU64::new(0),
        };
        client
            .provider_token()
            .map_err(|m| invalid("--apns-key-file", m))?;
        Ok(client)
    }

    /// Provider JWTs signed so far (for metrics and tests).
    pub fn tokens_signed(&self) -> u64 {
        self.signed.load(Ordering::Relaxed)
    }

    /// The current provider JWT, signing a new one when there is none or it
    /// is older than the token lifetime.
    fn provider_token(&self) -> Result<Arc<ProviderToken>, String> {
        let fresh = |t: &Option<Arc<ProviderToken>>| {
            t.as_ref()
                .filter(|t| t.issued.elapsed() < self.token_lifetime)
                .cloned()
        };
        if let Some(t) = fresh(&self.token.read()) {
            return Ok(t);
        }
        let mut slot = self.token.write();
        if let Some(t) = fresh(&slot) {
            return Ok(t);
        }
        let claims = Claims {
            iss: &self.team_id,
            iat: unix_now(),
        };
        let jwt = jsonwebtoken::encode(&self.header, &claims, &self.key)
            .map_err(|e| format!("cannot sign the provider token: {e}"))?;
        let mut header = HeaderValue::try_from(format!("bearer {jwt}"))
            .map_err(|e| format!("provider token is not a header value: {e}"))?;
        header.set_sensitive(true);
        let generation = self.signed.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(generation, "signed a new APNs provider token");
        let token = Arc::new(ProviderToken {
            header,
            issued: Instant::now(),
            generation,
        });
        *slot = Some(token.clone());
        Ok(token)
    }

    /// Drops the current JWT if it is still the one of `generation` (so that
    /// many requests refused with the same old token cause one refresh).
    fn invalidate(&self, generation: u64) {
        let mut slot = self.token.write();
        if slot.as_ref().is_some_and(|t| t.generation == generation) {
            *slot = None;
        }
    }

    fn endpoint_for(&self, job: &PushJob) -> &str {
        match &self.endpoint {
            Some(e) => e,
            None if job.spec.sandbox => SANDBOX_ENDPOINT,
            None => PRODUCTION_ENDPOINT,
        }
    }

    async fn send_job(&self, job: &PushJob) -> Outcome {
        let device_token = job.spec.token.text().unwrap_or_default();
        if device_token.is_empty() || !device_token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Outcome::DeadToken {
                reason: "BadDeviceToken".into(),
            };
        }
        let now = unix_now();
        let ttl_left = job.ttl_left(now);
        if ttl_left == Some(0) {
            return Outcome::failed("Expired");
        }
        let Some(topic) = job.spec.topic.as_deref().or(self.topic.as_deref()) else {
            return Outcome::failed("MissingTopic");
        };
        let body = match serde_json::to_vec(&payload(job)) {
            Ok(b) => b,
            Err(_) => return Outcome::failed("PayloadEncoding"),
        };
        if body.len() > MAX_PAYLOAD {
            return Outcome::failed("PayloadTooLarge");
        }
        let token = match self.provider_token() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "APNs provider token");
                return Outcome::failed("ProviderTokenSigning");
            }
        };
        let headers = match request_headers(job, topic, ttl_left.map(|t| now + t), &token.header) {
            Ok(h) => h,
            Err(reason) => return Outcome::failed(reason),
        };
        let url = format!("{}/3/device/{device_token}", self.endpoint_for(job));
        let response = match self.http.post(url).headers(headers).body(body).send().await {
            Ok(r) => r,
            Err(e) => return network_outcome(Platform::Apns, e),
        };
        let status = response.status().as_u16();
        let retry_after = parse_retry_after(
            response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
        );
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) => return network_outcome(Platform::Apns, e),
        };
        let reason = if status == 200 {
            None
        } else {
            serde_json::from_slice::<ErrorBody>(&body)
                .ok()
                .and_then(|b| b.reason)
        };
        let outcome = classify_apns(status, reason.as_deref(), retry_after);
        if status == 403 && reason.as_deref() == Some(APNS_EXPIRED_PROVIDER_TOKEN) {
            tracing::info!("APNs says the provider token expired; signing a new one");
            self.invalidate(token.generation);
        }
        if let Outcome::Failed { reason } = &outcome {
            tracing::warn!(status, reason = %reason, job = job.id, "APNs refused a notification");
        }
        outcome
    }
}

impl Provider for ApnsClient {
    fn platform(&self) -> Platform {
        Platform::Apns
    }

    fn send<'a>(&'a self, job: &'a PushJob) -> SendFuture<'a> {
        Box::pin(self.send_job(job))
    }
}

fn request_headers(
    job: &PushJob,
    topic: &str,
    expiration: Option<u64>,
    authorization: &HeaderValue,
) -> Result<HeaderMap, &'static str> {
    let n = &job.spec.notification;
    let alert = n.is_alert();
    let priority = if alert && n.effective_priority() == Priority::High {
        "10"
    } else {
        "5"
    };
    let mut h = HeaderMap::with_capacity(8);
    h.insert(reqwest::header::AUTHORIZATION, authorization.clone());
    h.insert(
        reqwest::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let mut put = |name: &'static str, value: String, bad: &'static str| {
        let v = HeaderValue::try_from(value).map_err(|_| bad)?;
        h.insert(HeaderName::from_static(name), v);
        Ok::<(), &'static str>(())
    };
    put("apns-topic", topic.to_owned(), "BadTopic")?;
    put(
        "apns-push-type",
        if alert { "alert" } else { "background" }.to_owned(),
        "BadPushType",
    )?;
    put("apns-priority", priority.to_owned(), "BadPriority")?;
    put(
        "apns-expiration",
        expiration.unwrap_or(0).to_string(),
        "BadExpirationDate",
    )?;
    put("apns-id", job.notification_uuid(), "BadMessageId")?;
    if let Some(c) = &n.collapse_key {
        put("apns-collapse-id", c.clone(), "BadCollapseId")?;
    }
    Ok(h)
}

/// The JSON payload for a job: `aps` (an alert, or `content-available` for a
/// background push), the custom data's fields, `channel` and `offset`, and
/// `count` when the push stands for several publications.
pub fn payload(job: &PushJob) -> Value {
    let n = &job.spec.notification;
    let aps = if n.is_alert() {
        let mut alert = Map::new();
        if let Some(t) = &n.title {
            alert.insert("title".into(), Value::String(t.clone()));
        }
        if let Some(b) = &n.body {
            alert.insert("body".into(), Value::String(b.clone()));
        }
        json!({ "alert": alert })
    } else {
        json!({ "content-available": 1 })
    };
    let mut root = Map::new();
    // A wake push carries no content: nothing of `data` goes to Apple.
    let data = if n.is_wake() { None } else { n.data.as_ref() };
    match data {
        Some(Value::Object(fields)) => {
            for (k, v) in fields {
                if k != "aps" {
                    root.insert(k.clone(), v.clone());
                }
            }
        }
        Some(Value::Null) | None => {}
        Some(other) => {
            root.insert("data".into(), other.clone());
        }
    }
    root.insert("aps".into(), aps);
    root.insert("channel".into(), Value::String(job.spec.channel.clone()));
    root.insert("offset".into(), Value::from(job.spec.offset));
    if let Some(count) = job.spec.coalesced_count() {
        root.insert("count".into(), Value::from(count));
    }
    Value::Object(root)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::types::{NewPushJob, Notification};

    fn job(notification: Notification) -> PushJob {
        NewPushJob {
            device_id: "d".into(),
            user: "u".into(),
            platform: Platform::Apns,
            token: "ab".repeat(32).into(),
            topic: None,
            sandbox: false,
            notification,
            channel: "user:u".into(),
            offset: 42,
            created_at: 0,
            count: 0,
        }
        .with_id(9)
    }

    #[test]
    fn alert_payload() {
        let p = payload(&job(Notification {
            title: Some("Hi".into()),
            body: Some("there".into()),
            data: Some(json!({"k": 1, "aps": "ignored", "channel": "overridden"})),
            ..Default::default()
        }));
        assert_eq!(
            p,
            json!({"aps": {"alert": {"title": "Hi", "body": "there"}}, "k": 1,
                   "channel": "user:u", "offset": 42})
        );
    }

    #[test]
    fn background_payload_and_non_object_data() {
        let p = payload(&job(Notification {
            data: Some(json!([1, 2])),
            ..Default::default()
        }));
        assert_eq!(
            p,
            json!({"aps": {"content-available": 1}, "data": [1, 2],
                   "channel": "user:u", "offset": 42})
        );
    }

    #[test]
    fn a_wake_push_is_a_background_push_with_no_content() {
        let wake = job(Notification {
            title: Some("secret title".into()),
            body: Some("secret body".into()),
            data: Some(json!({"secret": 1})),
            priority: Some(Priority::High),
            mode: Some(crate::types::PushMode::Wake),
            ..Default::default()
        });
        assert_eq!(
            payload(&wake),
            json!({"aps": {"content-available": 1}, "channel": "user:u", "offset": 42})
        );
        let auth = HeaderValue::from_static("bearer x");
        let h = request_headers(&wake, "com.example", None, &auth).unwrap();
        assert_eq!(h["apns-push-type"], "background");
        assert_eq!(h["apns-priority"], "5");
    }

    #[test]
    fn headers_follow_apples_rules() {
        let auth = HeaderValue::from_static("bearer x");
        let alert = job(Notification {
            title: Some("t".into()),
            collapse_key: Some("c1".into()),
            ..Default::default()
        });
        let h = request_headers(&alert, "com.example", Some(123), &auth).unwrap();
        assert_eq!(h["apns-push-type"], "alert");
        assert_eq!(h["apns-priority"], "10");
        assert_eq!(h["apns-expiration"], "123");
        assert_eq!(h["apns-collapse-id"], "c1");
        assert_eq!(h["apns-topic"], "com.example");
        assert_eq!(h["apns-id"], alert.notification_uuid().as_str());

        // Background pushes must use priority 5, even when asked for high.
        let bg = job(Notification {
            priority: Some(Priority::High),
            ..Default::default()
        });
        let h = request_headers(&bg, "com.example", None, &auth).unwrap();
        assert_eq!(h["apns-push-type"], "background");
        assert_eq!(h["apns-priority"], "5");
        assert_eq!(h["apns-expiration"], "0");
        assert!(h.get("apns-collapse-id").is_none());

        let normal = job(Notification {
            body: Some("b".into()),
            priority: Some(Priority::Normal),
            ..Default::default()
        });
        let h = request_headers(&normal, "com.example", None, &auth).unwrap();
        assert_eq!(h["apns-priority"], "5");
    }
}
