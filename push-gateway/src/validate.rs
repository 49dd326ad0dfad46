//! Checks on what the backend registers (PROTOCOL.md §10 devices): device
//! ids, users, platforms, tokens and topics. Each refusal is a typed error
//! whose message the broker can return as-is in an HTTP 400.

use std::str::FromStr;

use tether_protocol::UserId;
use tether_protocol::names::NameError;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::types::{Device, DeviceToken, Notification, Platform, WebPushSubscription};

/// Most bytes the `push` object of a publication may take as JSON: what
/// APNs accepts for a whole payload and FCM for a message (4 KiB). The
/// provider's envelope comes on top, so a push near the limit can still be
/// refused there (counted as `failed`, reason `PayloadTooLarge`).
pub const MAX_NOTIFICATION_BYTES: usize = 4096;
/// Longest `collapse_key` (APNs `apns-collapse-id`: 64 bytes).
pub const MAX_COLLAPSE_KEY_LEN: usize = 64;

/// Why a publication's `push` object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotificationError {
    #[error(
        "push is {0} bytes as JSON, over the {MAX_NOTIFICATION_BYTES} bytes APNs and FCM accept"
    )]
    TooLarge(usize),
    #[error("push.collapse_key must be 1 to {MAX_COLLAPSE_KEY_LEN} bytes")]
    BadCollapseKey,
}

impl Notification {
    /// Checks what the providers would refuse later, so that the publisher
    /// hears of it now rather than the push failing after a 200.
    pub fn validate(&self) -> Result<(), NotificationError> {
        if let Some(k) = &self.collapse_key
            && (k.is_empty() || k.len() > MAX_COLLAPSE_KEY_LEN)
        {
            return Err(NotificationError::BadCollapseKey);
        }
        let size = serde_json::to_vec(self).map_or(usize::MAX, |v| v.len());
        if size > MAX_NOTIFICATION_BYTES {
            return Err(NotificationError::TooLarge(size));
        }
        Ok(())
    }
}

/// Longest device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 255;
/// Shortest APNs device token, in hex digits (today's tokens are 64).
pub const MIN_APNS_TOKEN_LEN: usize = 64;
/// Longest APNs device token accepted, in hex digits.
pub const MAX_APNS_TOKEN_LEN: usize = 200;
/// Longest FCM registration token accepted, in characters.
pub const MAX_FCM_TOKEN_LEN: usize = 4096;
/// Longest APNs topic, in bytes.
pub const MAX_TOPIC_LEN: usize = 255;
/// Longest Web Push endpoint URL accepted, in bytes.
pub const MAX_ENDPOINT_LEN: usize = 2048;

/// Why a device registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "device_id must be 1 to {MAX_DEVICE_ID_LEN} bytes of ASCII letters, digits and _ - : . @ /"
    )]
    BadDeviceId,
    #[error("user: {0}")]
    BadUser(#[from] NameError),
    #[error("platform must be \"apns\", \"fcm\" or \"webpush\", not {0:?}")]
    BadPlatform(String),
    #[error(
        "token must be a string for APNs and FCM, and a subscription object {{endpoint, keys: {{p256dh, auth}}}} for Web Push"
    )]
    TokenShape,
    #[error(
        "APNs token must be an even number of hex digits, {MIN_APNS_TOKEN_LEN} to {MAX_APNS_TOKEN_LEN}"
    )]
    BadApnsToken,
    #[error("FCM token must be 1 to {MAX_FCM_TOKEN_LEN} characters of A-Z a-z 0-9 _ : . -")]
    BadFcmToken,
    #[error("topic must be 1 to {MAX_TOPIC_LEN} bytes of ASCII letters, digits and _ - .")]
    BadTopic,
    #[error("Web Push endpoint must be an https:// URL of at most {MAX_ENDPOINT_LEN} bytes")]
    BadEndpoint,
    #[error(
        "Web Push keys: p256dh must be a base64url P-256 public key (65 bytes, uncompressed) and auth a base64url 16-byte secret"
    )]
    BadWebPushKeys,
}

fn name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b':' | b'.' | b'@' | b'/')
}

/// A device id: 1–255 bytes of channel-name characters.
pub fn validate_device_id(id: &str) -> Result<(), DeviceError> {
    if id.is_empty() || id.len() > MAX_DEVICE_ID_LEN || !id.bytes().all(name_char) {
        return Err(DeviceError::BadDeviceId);
    }
    Ok(())
}

/// A user id: channel-name characters, at most 250 bytes (as `UserId`).
pub fn validate_user(user: &str) -> Result<(), DeviceError> {
    UserId::new(user)?;
    Ok(())
}

/// `"apns"`, `"fcm"` or `"webpush"`.
pub fn parse_platform(s: &str) -> Result<Platform, DeviceError> {
    s.parse()
}

impl FromStr for Platform {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s {
            "apns" => Ok(Platform::Apns),
            "fcm" => Ok(Platform::Fcm),
            "webpush" => Ok(Platform::WebPush),
            other => Err(DeviceError::BadPlatform(other.to_owned())),
        }
    }
}

/// A provider token: APNs an even number (64–200) of hex digits; FCM 1–4096
/// characters of `[A-Za-z0-9_:.-]`; Web Push a subscription whose endpoint
/// is an `https://` URL (`http://` only on loopback, for local test
/// services) and whose keys decode to a P-256 point and a 16-byte secret.
pub fn validate_token(platform: Platform, token: &DeviceToken) -> Result<(), DeviceError> {
    let token = match (platform, token) {
        (Platform::WebPush, DeviceToken::WebPush(s)) => return validate_subscription(s),
        (Platform::Apns | Platform::Fcm, DeviceToken::Text(t)) => t.as_str(),
        _ => return Err(DeviceError::TokenShape),
    };
    match platform {
        Platform::WebPush => return Err(DeviceError::TokenShape),
        Platform::Apns => {
            let n = token.len();
            if !(MIN_APNS_TOKEN_LEN..=MAX_APNS_TOKEN_LEN).contains(&n)
                || !n.is_multiple_of(2)
                || !token.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(DeviceError::BadApnsToken);
            }
        }
        Platform::Fcm => {
            if token.is_empty()
                || token.len() > MAX_FCM_TOKEN_LEN
                || !token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-'))
            {
                return Err(DeviceError::BadFcmToken);
            }
        }
    }
    Ok(())
}

/// Whether `url` may be used to reach a provider: `https://`, or
/// `http://` (no TLS: the test fakes, a local relay) to a loopback host only
/// — `127.0.0.0/8`, `[::1]` or `localhost` — so that a push never crosses a
/// network in clear.
pub fn provider_url_allowed(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    match (u.scheme(), u.host()) {
        ("https", Some(_)) => true,
        ("http", Some(url::Host::Ipv4(ip))) => ip.is_loopback(),
        ("http", Some(url::Host::Ipv6(ip))) => ip.is_loopback(),
        ("http", Some(url::Host::Domain(d))) => d.eq_ignore_ascii_case("localhost"),
        _ => false,
    }
}

fn validate_subscription(s: &WebPushSubscription) -> Result<(), DeviceError> {
    let e = &s.endpoint;
    let scheme_ok = provider_url_allowed(e);
    if !scheme_ok || e.len() > MAX_ENDPOINT_LEN || e.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(DeviceError::BadEndpoint);
    }
    let p256dh = URL_SAFE_NO_PAD
        .decode(s.keys.p256dh.trim_end_matches('='))
        .map_err(|_| DeviceError::BadWebPushKeys)?;
    let auth = URL_SAFE_NO_PAD
        .decode(s.keys.auth.trim_end_matches('='))
        .map_err(|_| DeviceError::BadWebPushKeys)?;
    if p256dh.len() != 65 || p256dh[0] != 0x04 || auth.len() != 16 {
        return Err(DeviceError::BadWebPushKeys);
    }
    Ok(())
}

/// An APNs topic (bundle id, maybe with a `.voip`-style suffix).
pub fn validate_topic(topic: &str) -> Result<(), DeviceError> {
    if topic.is_empty()
        || topic.len() > MAX_TOPIC_LEN
        || !topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(DeviceError::BadTopic);
    }
    Ok(())
}

impl Device {
    /// Every check above, in the order the fields appear.
    pub fn validate(&self) -> Result<(), DeviceError> {
        validate_device_id(&self.device_id)?;
        validate_user(&self.user)?;
        validate_token(self.platform, &self.token)?;
        if let Some(topic) = &self.topic {
            validate_topic(topic)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn text(s: &str) -> DeviceToken {
        DeviceToken::Text(s.to_owned())
    }

    fn web(endpoint: &str, p256dh: &[u8], auth: &[u8]) -> DeviceToken {
        DeviceToken::WebPush(WebPushSubscription {
            endpoint: endpoint.into(),
            keys: crate::types::WebPushKeys {
                p256dh: URL_SAFE_NO_PAD.encode(p256dh),
                auth: URL_SAFE_NO_PAD.encode(auth),
            },
        })
    }

    #[test]
    fn plaintext_provider_urls_only_on_loopback() {
        for ok in [
            "https://api.push.apple.com",
            "http://127.0.0.1:8900",
            "http://127.1.2.3/x",
            "http://[::1]:80/",
            "http://localhost:9000/v1",
        ] {
            assert!(provider_url_allowed(ok), "{ok}");
        }
        for bad in [
            "http://10.0.0.5:8900",
            "http://127.evil.example/",
            "http://localhost.evil.example/",
            "http://[::ffff:10.0.0.1]/",
            "ftp://127.0.0.1/",
            "https://",
            "not a url",
        ] {
            assert!(!provider_url_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn notifications_are_bounded_to_what_the_providers_accept() {
        let n = |title: &str, data: serde_json::Value| Notification {
            title: Some(title.to_owned()),
            data: Some(data),
            ..Notification::default()
        };
        assert_eq!(n("hi", serde_json::json!({"k": 1})).validate(), Ok(()));
        let big = n(&"t".repeat(4000), serde_json::json!({"k": "v".repeat(200)}));
        assert!(matches!(big.validate(), Err(NotificationError::TooLarge(s)) if s > 4096));
        let huge_data = n("hi", serde_json::json!("d".repeat(8 << 20)));
        assert!(matches!(
            huge_data.validate(),
            Err(NotificationError::TooLarge(_))
        ));
        for key in [String::new(), "k".repeat(65)] {
            let bad = Notification {
                collapse_key: Some(key),
                ..Notification::default()
            };
            assert_eq!(bad.validate(), Err(NotificationError::BadCollapseKey));
        }
    }

    #[test]
    fn web_push_subscriptions_need_an_https_endpoint_and_real_keys() {
        let point = [&[4u8][..], &[7u8; 64][..]].concat();
        let wp = Platform::WebPush;
        assert_eq!(
            validate_token(wp, &web("https://push.example/s/1", &point, &[1; 16])),
            Ok(())
        );
        assert_eq!(
            validate_token(wp, &web("http://127.0.0.1:9/s", &point, &[1; 16])),
            Ok(())
        );
        assert_eq!(
            validate_token(wp, &web("http://push.example/s", &point, &[1; 16])),
            Err(DeviceError::BadEndpoint)
        );
        assert_eq!(
            validate_token(wp, &web("https://push.example/s", &point[..64], &[1; 16])),
            Err(DeviceError::BadWebPushKeys)
        );
        assert_eq!(
            validate_token(wp, &web("https://push.example/s", &point, &[1; 15])),
            Err(DeviceError::BadWebPushKeys)
        );
        assert_eq!(
            validate_token(wp, &text("abc")),
            Err(DeviceError::TokenShape)
        );
        assert_eq!(
            validate_token(
                Platform::Apns,
                &web("https://push.example/s", &point, &[1; 16])
            ),
            Err(DeviceError::TokenShape)
        );
    }

    #[test]
    fn apns_tokens_are_even_length_hex_of_64_to_200() {
        let ok = "a1".repeat(32);
        assert_eq!(validate_token(Platform::Apns, &text(&ok)), Ok(()));
        assert_eq!(
            validate_token(Platform::Apns, &text(&"AB".repeat(100))),
            Ok(())
        );
        for bad in [
            "a1".repeat(31),
            format!("{ok}a"),
            "zz".repeat(32),
            "ab".repeat(101),
            String::new(),
        ] {
            assert_eq!(
                validate_token(Platform::Apns, &text(&bad)),
                Err(DeviceError::BadApnsToken)
            );
        }
    }

    #[test]
    fn fcm_tokens_are_1_to_4096_safe_chars() {
        assert_eq!(
            validate_token(Platform::Fcm, &text("abc:DEF_1.2-3")),
            Ok(())
        );
        assert_eq!(
            validate_token(Platform::Fcm, &text(&"x".repeat(4096))),
            Ok(())
        );
        for bad in ["", "a b", "a/b", "tok\n"] {
            assert_eq!(
                validate_token(Platform::Fcm, &text(bad)),
                Err(DeviceError::BadFcmToken)
            );
        }
        assert!(validate_token(Platform::Fcm, &text(&"x".repeat(4097))).is_err());
    }

    #[test]
    fn users_device_ids_platforms_and_topics() {
        assert!(validate_user("alice@example.com").is_ok());
        assert!(validate_user(&"u".repeat(250)).is_ok());
        assert!(validate_user(&"u".repeat(251)).is_err());
        assert!(validate_user("a b").is_err());
        assert!(validate_device_id("phone-1").is_ok());
        assert_eq!(validate_device_id(""), Err(DeviceError::BadDeviceId));
        assert_eq!(validate_device_id("a?b"), Err(DeviceError::BadDeviceId));
        assert_eq!(parse_platform("apns"), Ok(Platform::Apns));
        assert_eq!(
            parse_platform("gcm"),
            Err(DeviceError::BadPlatform("gcm".into()))
        );
        assert!(validate_topic("com.example.app").is_ok());
        assert!(validate_topic("com example").is_err());
        let msg = validate_user("").unwrap_err().to_string();
        assert!(msg.starts_with("user: "), "{msg}");
    }
}
