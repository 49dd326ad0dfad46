//! Web Push client: RFC 8030 delivery to a browser's push service, the
//! payload encrypted for the subscription (RFC 8291, [`ece`]) and the
//! request signed with our VAPID key (RFC 8292, [`vapid`]).
//!
//! One `POST {subscription.endpoint}` per push with `TTL`, `Urgency` and
//! (from `collapse_key`) `Topic`. 201 is delivered; 404 and 410 mean the
//! subscription is gone (the device is removed); 429 and 5xx are retried,
//! honouring `Retry-After`; anything else fails the job. Redirects are not
//! followed and the endpoint is checked again before every send (https, or
//! http to loopback only), so a registered subscription cannot point the
//! broker elsewhere.
//!
//! Written on aws-lc-rs and the reqwest client the other providers use,
//! rather than the `web-push` crate, which brings OpenSSL and its own HTTP
//! clients (see shared/CRATES.md).

pub mod ece;
pub mod vapid;

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};

use crate::outcome::{Outcome, classify_webpush, parse_retry_after};
use crate::provider::{
    CONNECT_TIMEOUT, ConfigError, DEFAULT_REQUEST_TIMEOUT, Provider, SendFuture, network_outcome,
    read_file,
};
use crate::types::{DeviceToken, Platform, Priority, PushJob, unix_now};
use crate::validate::provider_url_allowed;
pub use vapid::{Vapid, VapidError};

/// `TTL` sent when the notification has none: four weeks, what FCM keeps a
/// message by default (push services cap it at their own maximum).
pub const DEFAULT_TTL: u64 = 28 * 24 * 3600;
/// Longest `Topic` a push service accepts (RFC 8030 §5.4).
const MAX_TOPIC: usize = 32;
/// Bytes of a push service's answer body read, at most.
const MAX_ANSWER_BODY: usize = 16 * 1024;

/// Web Push settings (`--vapid-private-key`, `--vapid-subject`).
#[derive(Clone)]
pub struct WebPushConfig {
    /// The VAPID key file's bytes (PEM, or the base64url private key).
    pub vapid_key: Vec<u8>,
    /// `mailto:` or `https:` contact for the push services.
    pub subject: String,
    pub request_timeout: Duration,
}

impl std::fmt::Debug for WebPushConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebPushConfig")
            .field("vapid_key", &"<redacted>")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl WebPushConfig {
    pub fn new(vapid_key: impl Into<Vec<u8>>, subject: impl Into<String>) -> Self {
        Self {
            vapid_key: vapid_key.into(),
            subject: subject.into(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Reads the VAPID key from a file.
    pub fn from_key_file(
        path: impl AsRef<Path>,
        subject: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        let key = read_file("--vapid-private-key", path.as_ref())?;
        Ok(Self::new(key, subject))
    }
}

/// The Web Push provider.
pub struct WebPushClient {
    http: reqwest::Client,
    vapid: Vapid,
}

impl std::fmt::Debug for WebPushClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebPushClient")
            .field("vapid", &self.vapid)
            .finish_non_exhaustive()
    }
}

impl WebPushClient {
    /// Checks the key and subject and builds the client.
    pub fn new(config: WebPushConfig) -> Result<Self, ConfigError> {
        let vapid =
            Vapid::new(&config.vapid_key, &config.subject).map_err(|e| ConfigError::Invalid {
                setting: match e {
                    VapidError::BadSubject(_) => "--vapid-subject",
                    _ => "--vapid-private-key",
                },
                message: e.to_string(),
            })?;
        // HTTP/2 where the push service offers it (ALPN), else HTTP/1.1.
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .user_agent(concat!("tether-push-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConfigError::Http(e.to_string()))?;
        Ok(Self { http, vapid })
    }

    /// The VAPID public key (base64url): the `applicationServerKey` web
    /// apps subscribe with.
    pub fn public_key(&self) -> &str {
        self.vapid.public_key()
    }

    async fn send_job(&self, job: &PushJob) -> Outcome {
        let DeviceToken::WebPush(sub) = &job.spec.token else {
            return Outcome::DeadToken {
                reason: "NotASubscription".into(),
            };
        };
        let Ok(url) = reqwest::Url::parse(&sub.endpoint) else {
            return Outcome::DeadToken {
                reason: "BadEndpoint".into(),
            };
        };
        if !provider_url_allowed(url.as_str()) {
            return Outcome::DeadToken {
                reason: "BadEndpoint".into(),
            };
        }
        let keys = (
            URL_SAFE_NO_PAD.decode(sub.keys.p256dh.trim_end_matches('=')),
            URL_SAFE_NO_PAD.decode(sub.keys.auth.trim_end_matches('=')),
        );
        let (Ok(p256dh), Ok(auth)) = keys else {
            return Outcome::DeadToken {
                reason: "BadSubscriptionKeys".into(),
            };
        };
        let ttl = match job.ttl_left(unix_now()) {
            Some(0) => return Outcome::failed("Expired"),
            Some(t) => t,
            None => DEFAULT_TTL,
        };
        let plaintext = match serde_json::to_vec(&payload(job)) {
            Ok(p) => p,
            Err(_) => return Outcome::failed("PayloadEncoding"),
        };
        let body = match ece::encrypt(&plaintext, &p256dh, &auth) {
            Ok(b) => b,
            Err(ece::EceError::TooLarge(_)) => return Outcome::failed("PayloadTooLarge"),
            Err(ece::EceError::BadPublicKey | ece::EceError::BadAuthSecret) => {
                return Outcome::DeadToken {
                    reason: "BadSubscriptionKeys".into(),
                };
            }
            Err(ece::EceError::Crypto) => return Outcome::failed("Encryption"),
        };
        let audience = url.origin().ascii_serialization();
        let authorization = match self.vapid.authorization(&audience) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "VAPID token");
                return Outcome::failed("VapidSigning");
            }
        };
        let headers = match request_headers(job, ttl, authorization) {
            Ok(h) => h,
            Err(reason) => return Outcome::failed(reason),
        };
        let mut response = match self.http.post(url).headers(headers).body(body).send().await {
            Ok(r) => r,
            Err(e) => return network_outcome(Platform::WebPush, e),
        };
        let status = response.status().as_u16();
        let retry_after = parse_retry_after(
            response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
        );
        // The body only explains. A little of it is read so that the
        // connection can be reused; never more (the endpoint is a URL a
        // subscription gave, not a provider we chose).
        let mut read = 0;
        while read < MAX_ANSWER_BODY {
            match response.chunk().await {
                Ok(Some(c)) => read += c.len(),
                Ok(None) | Err(_) => break,
            }
        }
        let outcome = classify_webpush(status, retry_after);
        if let Outcome::Failed { reason } = &outcome {
            tracing::warn!(status, reason = %reason, job = job.id, "a push service refused a notification");
        }
        outcome
    }
}

impl Provider for WebPushClient {
    fn platform(&self) -> Platform {
        Platform::WebPush
    }

    fn send<'a>(&'a self, job: &'a PushJob) -> SendFuture<'a> {
        Box::pin(self.send_job(job))
    }
}

fn request_headers(
    job: &PushJob,
    ttl: u64,
    authorization: HeaderValue,
) -> Result<HeaderMap, &'static str> {
    let n = &job.spec.notification;
    let mut h = HeaderMap::with_capacity(8);
    h.insert(reqwest::header::AUTHORIZATION, authorization);
    h.insert(
        reqwest::header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        reqwest::header::CONTENT_ENCODING,
        HeaderValue::from_static("aes128gcm"),
    );
    h.insert(HeaderName::from_static("ttl"), HeaderValue::from(ttl));
    let urgency = match n.effective_priority() {
        Priority::High => "high",
        Priority::Normal => "normal",
    };
    h.insert(
        HeaderName::from_static("urgency"),
        HeaderValue::from_static(urgency),
    );
    if let Some(key) = &n.collapse_key {
        let topic = HeaderValue::try_from(topic(key)).map_err(|_| "BadTopic")?;
        h.insert(HeaderName::from_static("topic"), topic);
    }
    Ok(h)
}

/// The `Topic` for a collapse key: the key itself when it is at most 32
/// characters of the URL-safe base64 alphabet (what RFC 8030 allows), else
/// the first 32 characters of its SHA-256 in base64url.
pub fn topic(collapse_key: &str) -> String {
    let fits = !collapse_key.is_empty()
        && collapse_key.len() <= MAX_TOPIC
        && collapse_key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if fits {
        return collapse_key.to_owned();
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, collapse_key.as_bytes());
    let mut t = URL_SAFE_NO_PAD.encode(digest.as_ref());
    t.truncate(MAX_TOPIC);
    t
}

/// The JSON the service worker decrypts: `mode` (`alert` or `wake`),
/// `channel`, `offset`, `count` when the push stands for several
/// publications, and for an alert `title`, `body` and `data` as published.
/// A wake push carries nothing of the content.
pub fn payload(job: &PushJob) -> Value {
    let n = &job.spec.notification;
    let mut root = Map::new();
    root.insert(
        "mode".into(),
        Value::from(if n.is_wake() { "wake" } else { "alert" }),
    );
    if !n.is_wake() {
        if let Some(t) = &n.title {
            root.insert("title".into(), Value::String(t.clone()));
        }
        if let Some(b) = &n.body {
            root.insert("body".into(), Value::String(b.clone()));
        }
        if let Some(d) = n.data.as_ref().filter(|d| !d.is_null()) {
            root.insert("data".into(), d.clone());
        }
    }
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
    use serde_json::json;

    use super::*;
    use crate::types::{NewPushJob, Notification, PushMode, WebPushKeys, WebPushSubscription};

    fn job(notification: Notification) -> PushJob {
        NewPushJob {
            device_id: "d".into(),
            user: "u".into(),
            platform: Platform::WebPush,
            token: DeviceToken::WebPush(WebPushSubscription {
                endpoint: "https://push.example.net/s/1".into(),
                keys: WebPushKeys {
                    p256dh: String::new(),
                    auth: String::new(),
                },
            }),
            topic: None,
            sandbox: false,
            notification,
            channel: "user:u".into(),
            offset: 42,
            created_at: 0,
            count: 0,
        }
        .with_id(3)
    }

    #[test]
    fn alert_and_wake_payloads() {
        let alert = Notification {
            title: Some("Hi".into()),
            body: Some("there".into()),
            data: Some(json!({"k": 1})),
            ..Default::default()
        };
        assert_eq!(
            payload(&job(alert.clone())),
            json!({"mode": "alert", "title": "Hi", "body": "there", "data": {"k": 1},
                   "channel": "user:u", "offset": 42})
        );
        let mut wake = job(Notification {
            mode: Some(PushMode::Wake),
            ..alert
        });
        wake.spec.count = 7;
        assert_eq!(
            payload(&wake),
            json!({"mode": "wake", "channel": "user:u", "offset": 42, "count": 7})
        );
    }

    #[test]
    fn headers_carry_ttl_urgency_and_topic() {
        let n = Notification {
            title: Some("Hi".into()),
            collapse_key: Some("chat:42".into()),
            ..Default::default()
        };
        let h = request_headers(&job(n), 60, HeaderValue::from_static("vapid t=x, k=y")).unwrap();
        assert_eq!(h["ttl"], "60");
        assert_eq!(h["urgency"], "high");
        assert_eq!(h["content-encoding"], "aes128gcm");
        let t = h["topic"].to_str().unwrap();
        assert_eq!(t.len(), 32);
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        let quiet = request_headers(
            &job(Notification::default()),
            1,
            HeaderValue::from_static("v"),
        )
        .unwrap();
        assert_eq!(quiet["urgency"], "normal");
        assert!(quiet.get("topic").is_none());
    }

    #[test]
    fn topics_keep_short_safe_keys_and_hash_the_rest() {
        assert_eq!(topic("chat_42-a"), "chat_42-a");
        assert_ne!(topic("chat:42"), topic("chat:43"));
        assert_eq!(topic("chat:42"), topic("chat:42"));
        assert_eq!(topic(&"a".repeat(33)).len(), 32);
        assert_ne!(topic(&"a".repeat(33)), "a".repeat(32));
    }
}
