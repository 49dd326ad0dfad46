//! FCM HTTP v1 client: `POST {endpoint}/v1/projects/{project}/messages:send`
//! with an OAuth2 access token got through the JWT-bearer grant (RFC 7523)
//! from the service account's `token_uri`.
//!
//! The access token is cached until 60 s before it expires and shared by
//! all sends; at most one grant is in flight at a time. A 401 drops it and
//! the job is retried at once with a new one. Written by hand: the `fcm`
//! crate speaks the legacy API Google shut down (see shared/CRATES.md).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::RwLock;
use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::outcome::{FcmError, Outcome, classify_fcm, parse_retry_after};
use crate::provider::{
    CONNECT_TIMEOUT, ConfigError, DEFAULT_REQUEST_TIMEOUT, KEEPALIVE_INTERVAL, Provider,
    SendFuture, network_outcome, read_file,
};
use crate::types::{Platform, Priority, PushJob, unix_now};

/// Google's FCM endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://fcm.googleapis.com";
/// The OAuth2 scope FCM needs.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// The grant type of the JWT-bearer flow.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Lifetime asked for in the grant's JWT (Google's maximum).
const ASSERTION_LIFETIME: u64 = 3600;
/// An access token is replaced this long before it expires.
const EARLY_REFRESH: Duration = Duration::from_secs(60);
/// Keys FCM refuses in `data`.
const RESERVED_DATA_KEYS: [&str; 4] = ["from", "notification", "message_type", "collapse_key"];

/// The fields of a Google service-account JSON file that FCM needs.
#[derive(Clone, Deserialize)]
pub struct ServiceAccount {
    pub project_id: String,
    /// PKCS#8 PEM RSA private key.
    pub private_key: String,
    pub client_email: String,
    /// Where the grant is posted; honoured (tests point it at a fake).
    pub token_uri: String,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

const SA_SETTING: &str = "--fcm-service-account";

impl ServiceAccount {
    /// Parses a service-account JSON document.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let sa: Self = serde_json::from_str(json).map_err(|e| ConfigError::Invalid {
            setting: SA_SETTING,
            message: format!("not a service-account JSON file: {e}"),
        })?;
        for (field, value) in [
            ("project_id", &sa.project_id),
            ("client_email", &sa.client_email),
            ("token_uri", &sa.token_uri),
        ] {
            if value.is_empty() {
                return Err(ConfigError::Invalid {
                    setting: SA_SETTING,
                    message: format!("{field} is empty"),
                });
            }
        }
        Ok(sa)
    }

    /// Reads a service-account JSON file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let bytes = read_file(SA_SETTING, path.as_ref())?;
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::Invalid {
            setting: SA_SETTING,
            message: "not UTF-8".into(),
        })?;
        Self::from_json(&text)
    }
}

/// FCM settings (`--fcm-service-account`, `--fcm-endpoint`).
#[derive(Debug, Clone)]
pub struct FcmConfig {
    pub service_account: ServiceAccount,
    /// Base URL; `http://` means HTTP/2 without TLS (test fakes).
    pub endpoint: String,
    pub request_timeout: Duration,
}

impl FcmConfig {
    pub fn new(service_account: ServiceAccount) -> Self {
        Self {
            service_account,
            endpoint: DEFAULT_ENDPOINT.into(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into();
        self
    }
}

#[derive(Serialize)]
struct GrantClaims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

struct AccessToken {
    header: HeaderValue,
    refresh_at: Instant,
    generation: u64,
}

/// The FCM provider.
pub struct FcmClient {
    http: reqwest::Client,
    key: EncodingKey,
    account: ServiceAccount,
    send_url: String,
    token: RwLock<Option<Arc<AccessToken>>>,
    /// Serialises grants so that concurrent sends wait for one.
    grant_lock: tokio::sync::Mutex<()>,
    grants: AtomicU64,
}

impl std::fmt::Debug for FcmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmClient")
            .field("account", &self.account)
            .field("send_url", &self.send_url)
            .finish_non_exhaustive()
    }
}

impl FcmClient {
    /// Checks the settings (the key must sign) and builds the client.
    pub fn new(config: FcmConfig) -> Result<Self, ConfigError> {
        let account = config.service_account;
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes()).map_err(|e| {
            ConfigError::Invalid {
                setting: SA_SETTING,
                message: format!("private_key is not a PEM RSA private key: {e}"),
            }
        })?;
        let endpoint = config.endpoint.trim_end_matches('/').to_owned();
        for (setting, url) in [
            ("--fcm-endpoint", endpoint.as_str()),
            (SA_SETTING, account.token_uri.as_str()),
        ] {
            if !crate::validate::provider_url_allowed(url) {
                return Err(ConfigError::Invalid {
                    setting,
                    message: format!(
                        "{url:?} is not an https:// URL (http:// only to a loopback host)"
                    ),
                });
            }
        }
        let mut builder = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .tcp_nodelay(true)
            .user_agent(concat!("tether-push-gateway/", env!("CARGO_PKG_VERSION")));
        if endpoint.starts_with("http://") || account.token_uri.starts_with("http://") {
            // Cleartext means a local HTTP/2 server (the test fakes).
            builder = builder.http2_prior_knowledge();
        }
        let http = builder
            .build()
            .map_err(|e| ConfigError::Http(e.to_string()))?;
        let client = Self {
            send_url: format!(
                "{endpoint}/v1/projects/{}/messages:send",
                account.project_id
            ),
            http,
            key,
            account,
            token: RwLock::new(None),
            grant_lock: tokio::sync::Mutex::new(()),
            grants: AtomicU64::new(0),
        };
        client.assertion().map_err(|e| ConfigError::Invalid {
            setting: SA_SETTING,
            message: e,
        })?;
        Ok(client)
    }

    /// Access tokens obtained so far (for metrics and tests).
    pub fn grants(&self) -> u64 {
        self.grants.load(Ordering::Relaxed)
    }

    /// The signed JWT for the grant.
    fn assertion(&self) -> Result<String, String> {
        let iat = unix_now();
        let claims = GrantClaims {
            iss: &self.account.client_email,
            scope: SCOPE,
            aud: &self.account.token_uri,
            iat,
            exp: iat + ASSERTION_LIFETIME,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map_err(|e| format!("cannot sign the grant assertion: {e}"))
    }

    fn cached(&self) -> Option<Arc<AccessToken>> {
        self.token
            .read()
            .as_ref()
            .filter(|t| Instant::now() < t.refresh_at)
            .cloned()
    }

    /// The current access token, fetching one when needed.
    async fn access_token(&self) -> Result<Arc<AccessToken>, Outcome> {
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let _grant = self.grant_lock.lock().await;
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let assertion = self.assertion().map_err(|e| {
            tracing::error!(error = %e, "FCM grant");
            Outcome::failed("AssertionSigning")
        })?;
        let form = format!(
            "grant_type={}&assertion={}",
            form_encode(GRANT_TYPE),
            form_encode(&assertion)
        );
        let response = self
            .http
            .post(&self.account.token_uri)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
            .send()
            .await
            .map_err(|e| network_outcome(Platform::Fcm, e))?;
        let status = response.status().as_u16();
        let retry_after = parse_retry_after(
            response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
        );
        let body = response
            .bytes()
            .await
            .map_err(|e| network_outcome(Platform::Fcm, e))?;
        if status != 200 {
            let error = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("http_{status}"));
            tracing::warn!(status, error = %error, "FCM OAuth grant refused");
            return Err(if status == 429 || status >= 500 {
                Outcome::Retry {
                    after: retry_after,
                    reason: format!("oauth_{error}"),
                }
            } else {
                Outcome::failed(format!("oauth_{error}"))
            });
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| {
            tracing::warn!("FCM OAuth answer is not a token");
            Outcome::retry("oauth_bad_answer")
        })?;
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600));
        let mut header = HeaderValue::try_from(format!("Bearer {}", answer.access_token))
            .map_err(|_| Outcome::retry("oauth_bad_answer"))?;
        header.set_sensitive(true);
        let generation = self.grants.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(generation, "got a new FCM access token");
        let token = Arc::new(AccessToken {
            header,
            refresh_at: Instant::now() + lifetime.saturating_sub(EARLY_REFRESH),
            generation,
        });
        *self.token.write() = Some(token.clone());
        Ok(token)
    }

    fn invalidate(&self, generation: u64) {
        let mut slot = self.token.write();
        if slot.as_ref().is_some_and(|t| t.generation == generation) {
            *slot = None;
        }
    }

    async fn send_job(&self, job: &PushJob) -> Outcome {
        let ttl_left = job.ttl_left(unix_now());
        if ttl_left == Some(0) {
            return Outcome::failed("Expired");
        }
        let body = match serde_json::to_vec(&message(job, ttl_left)) {
            Ok(b) => b,
            Err(_) => return Outcome::failed("PayloadEncoding"),
        };
        let token = match self.access_token().await {
            Ok(t) => t,
            Err(outcome) => return outcome,
        };
        let response = match self
            .http
            .post(&self.send_url)
            .header(reqwest::header::AUTHORIZATION, token.header.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return network_outcome(Platform::Fcm, e),
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
            Err(e) => return network_outcome(Platform::Fcm, e),
        };
        let error = if status == 200 {
            FcmError::default()
        } else {
            FcmError::parse(&body)
        };
        let outcome = classify_fcm(status, &error, retry_after);
        if status == 401 {
            tracing::info!("FCM refused the access token; getting a new one");
            self.invalidate(token.generation);
        }
        if let Outcome::Failed { reason } = &outcome {
            tracing::warn!(status, reason = %reason, job = job.id, "FCM refused a message");
        }
        outcome
    }
}

impl Provider for FcmClient {
    fn platform(&self) -> Platform {
        Platform::Fcm
    }

    fn send<'a>(&'a self, job: &'a PushJob) -> SendFuture<'a> {
        Box::pin(self.send_job(job))
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'*') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn string_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn reserved_data_key(k: &str) -> bool {
    RESERVED_DATA_KEYS.contains(&k) || k.starts_with("google.") || k.starts_with("gcm.")
}

/// The HTTP v1 request body for a job. Every `data` value is a string
/// (non-string JSON values are sent as their JSON text); `channel` and
/// `offset` are added (and `count` when the push stands for several
/// publications); keys FCM reserves are left out.
pub fn message(job: &PushJob, ttl_left: Option<u64>) -> Value {
    let n = &job.spec.notification;
    let mut data = Map::new();
    // A wake push is data-only with nothing but channel and offset.
    let custom = if n.is_wake() { None } else { n.data.as_ref() };
    match custom {
        Some(Value::Object(fields)) => {
            for (k, v) in fields {
                if !reserved_data_key(k) {
                    data.insert(k.clone(), Value::String(string_value(v)));
                }
            }
        }
        Some(Value::Null) | None => {}
        Some(other) => {
            data.insert("data".into(), Value::String(other.to_string()));
        }
    }
    data.insert("channel".into(), Value::String(job.spec.channel.clone()));
    data.insert("offset".into(), Value::String(job.spec.offset.to_string()));
    if let Some(count) = job.spec.coalesced_count() {
        data.insert("count".into(), Value::String(count.to_string()));
    }

    let mut android = Map::new();
    let priority = match n.effective_priority() {
        Priority::High => "HIGH",
        Priority::Normal => "NORMAL",
    };
    android.insert("priority".into(), Value::from(priority));
    if let Some(ttl) = ttl_left {
        android.insert("ttl".into(), Value::String(format!("{ttl}s")));
    }
    if let Some(c) = &n.collapse_key {
        android.insert("collapse_key".into(), Value::String(c.clone()));
    }

    let mut message = Map::new();
    message.insert(
        "token".into(),
        Value::String(job.spec.token.text().unwrap_or_default().to_owned()),
    );
    if n.is_alert() {
        let mut notification = Map::new();
        if let Some(t) = &n.title {
            notification.insert("title".into(), Value::String(t.clone()));
        }
        if let Some(b) = &n.body {
            notification.insert("body".into(), Value::String(b.clone()));
        }
        message.insert("notification".into(), Value::Object(notification));
    }
    message.insert("data".into(), Value::Object(data));
    message.insert("android".into(), Value::Object(android));
    json!({ "message": message })
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
            platform: Platform::Fcm,
            token: "tok:1".into(),
            topic: None,
            sandbox: false,
            notification,
            channel: "user:u".into(),
            offset: 5,
            created_at: 0,
            count: 0,
        }
        .with_id(1)
    }

    #[test]
    fn a_wake_push_is_data_only_with_channel_and_offset() {
        let m = message(
            &job(Notification {
                title: Some("secret title".into()),
                data: Some(json!({"secret": 1})),
                mode: Some(crate::types::PushMode::Wake),
                ..Default::default()
            }),
            None,
        );
        assert!(m["message"].get("notification").is_none());
        assert_eq!(
            m["message"]["data"],
            json!({"channel": "user:u", "offset": "5"})
        );
    }

    #[test]
    fn message_shape_with_string_data() {
        let m = message(
            &job(Notification {
                title: Some("T".into()),
                data: Some(json!({"n": 1, "b": true, "s": "x", "o": {"a": [1]}, "google.x": "no"})),
                collapse_key: Some("ck".into()),
                priority: Some(Priority::Normal),
                ..Default::default()
            }),
            Some(30),
        );
        assert_eq!(
            m,
            json!({"message": {
                "token": "tok:1",
                "notification": {"title": "T"},
                "data": {"n": "1", "b": "true", "s": "x", "o": "{\"a\":[1]}",
                         "channel": "user:u", "offset": "5"},
                "android": {"priority": "NORMAL", "ttl": "30s", "collapse_key": "ck"}
            }})
        );
    }

    #[test]
    fn data_only_message() {
        let m = message(&job(Notification::default()), None);
        assert!(m["message"].get("notification").is_none());
        assert_eq!(m["message"]["android"], json!({"priority": "NORMAL"}));
        assert_eq!(
            m["message"]["data"],
            json!({"channel": "user:u", "offset": "5"})
        );
    }

    #[test]
    fn form_encoding() {
        assert_eq!(
            form_encode(GRANT_TYPE),
            "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
        );
        assert_eq!(form_encode("a.b-c_d"), "a.b-c_d");
    }

    #[test]
    fn service_account_parsing() {
        let err = ServiceAccount::from_json("{}").unwrap_err().to_string();
        assert!(err.starts_with("--fcm-service-account:"), "{err}");
        let sa = ServiceAccount::from_json(
            r#"{"type":"service_account","project_id":"p","private_key":"k",
                "client_email":"e@x","token_uri":"http://t/token"}"#,
        )
        .unwrap();
        assert_eq!(sa.project_id, "p");
        assert!(!format!("{sa:?}").contains("private_key: \"k\""));
    }
}
