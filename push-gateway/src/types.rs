//! The data the gateway stores and sends: devices, notifications, push jobs.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A push provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// Apple Push Notification service.
    Apns,
    /// Firebase Cloud Messaging (HTTP v1).
    Fcm,
    /// Web Push (RFC 8030) to a browser's push service.
    #[serde(rename = "webpush")]
    WebPush,
}

impl Platform {
    /// Every platform, in the order of [`Platform::index`].
    pub const ALL: [Platform; 3] = [Platform::Apns, Platform::Fcm, Platform::WebPush];

    /// The name used in JSON, metrics labels and logs: `apns`, `fcm` or
    /// `webpush`.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Apns => "apns",
            Platform::Fcm => "fcm",
            Platform::WebPush => "webpush",
        }
    }

    /// A small number per platform (0, 1, 2), for per-platform arrays.
    pub fn index(self) -> usize {
        match self {
            Platform::Apns => 0,
            Platform::Fcm => 1,
            Platform::WebPush => 2,
        }
    }
}

/// A browser's push subscription (`PushSubscription.toJSON()`): where to
/// send, and the keys to encrypt for (RFC 8291).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebPushSubscription {
    /// The push service's URL for this subscription.
    pub endpoint: String,
    pub keys: WebPushKeys,
}

/// The subscription's keys, base64url without padding as browsers give them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebPushKeys {
    /// The browser's P-256 public key, uncompressed (65 bytes).
    pub p256dh: String,
    /// The authentication secret (16 bytes).
    pub auth: String,
}

/// A device's address at its provider: a string for APNs and FCM, a
/// subscription object for Web Push (PROTOCOL.md §10). Secret-ish: never
/// logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeviceToken {
    Text(String),
    WebPush(WebPushSubscription),
}

impl DeviceToken {
    /// The token of APNs and FCM; `None` for a Web Push subscription.
    pub fn text(&self) -> Option<&str> {
        match self {
            DeviceToken::Text(t) => Some(t),
            DeviceToken::WebPush(_) => None,
        }
    }
}

impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceToken::Text(_) => "Text(<redacted>)",
            DeviceToken::WebPush(_) => "WebPush(<redacted>)",
        })
    }
}

impl From<String> for DeviceToken {
    fn from(s: String) -> Self {
        DeviceToken::Text(s)
    }
}

impl From<&str> for DeviceToken {
    fn from(s: &str) -> Self {
        DeviceToken::Text(s.to_owned())
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Delivery priority (PROTOCOL.md §11 `priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Deliver now, waking the device (APNs 10, FCM `HIGH`).
    High,
    /// Deliver when convenient for the device (APNs 5, FCM `NORMAL`).
    Normal,
}

/// What a push is (PROTOCOL.md §11 `push.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushMode {
    /// A notification the user sees, with its content (the default).
    Alert,
    /// A silent push that carries only `channel` and `offset`: the app
    /// wakes and fetches the message itself (APNs background push, FCM
    /// data-only message); the content never passes through the provider.
    Wake,
}

/// The `push` object of a publication (PROTOCOL.md §11).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Custom data. The fields of an object are merged into the payload
    /// (APNs: top level next to `aps`; FCM: `data`, every value a string);
    /// any other value is sent under the key `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collapse_key: Option<String>,
    /// Seconds the provider keeps trying to reach the device; counted from
    /// the job's creation. `None`: APNs tries once (`apns-expiration: 0`),
    /// FCM uses its default (4 weeks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<PushMode>,
}

impl Notification {
    /// Whether the notification shows something (title or body) rather than
    /// being a silent/background data push.
    pub fn is_alert(&self) -> bool {
        !self.is_wake() && (self.title.is_some() || self.body.is_some())
    }

    /// A wake push: no content at all, only `channel` and `offset`.
    pub fn is_wake(&self) -> bool {
        self.mode == Some(PushMode::Wake)
    }

    /// The priority to send with: the requested one, else high for alerts
    /// and normal for background pushes.
    pub fn effective_priority(&self) -> Priority {
        self.priority.unwrap_or(if self.is_alert() {
            Priority::High
        } else {
            Priority::Normal
        })
    }
}

/// A registered device (PROTOCOL.md §10 `PUT /v1/devices/{device_id}`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub device_id: String,
    pub user: String,
    pub platform: Platform,
    /// The provider's address of the device. Secret-ish: never logged.
    pub token: DeviceToken,
    /// APNs topic (bundle id) for this device, overriding `--apns-topic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// APNs development environment (ignored when a custom endpoint is set).
    #[serde(default)]
    pub sandbox: bool,
    /// Unix seconds of the last registration; set by the store.
    #[serde(default)]
    pub updated_at: u64,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("device_id", &self.device_id)
            .field("user", &self.user)
            .field("platform", &self.platform)
            .field("token", &"<redacted>")
            .field("topic", &self.topic)
            .field("sandbox", &self.sandbox)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// A push job before the outbox has given it an id.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct NewPushJob {
    pub device_id: String,
    pub user: String,
    pub platform: Platform,
    pub token: DeviceToken,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default)]
    pub sandbox: bool,
    pub notification: Notification,
    /// The channel of the publication; sent in the custom data.
    pub channel: String,
    /// The offset of the publication; sent in the custom data.
    pub offset: u64,
    /// Unix seconds when the job was made; the notification's `ttl` counts
    /// from here. 0 means "unknown" (the ttl then counts from each send).
    #[serde(default)]
    pub created_at: u64,
    /// Publications this push stands for: more than 1 when coalescing held
    /// some back and this one (the latest) is sent for all of them; the
    /// payload then carries `count`. 0 and 1 mean just this publication.
    #[serde(default, skip_serializing_if = "is_single")]
    pub count: u32,
}

fn is_single(count: &u32) -> bool {
    *count <= 1
}

impl NewPushJob {
    /// The job that pushes `notification` (published at `channel`/`offset`)
    /// to `device`, stamped with the current time.
    pub fn for_device(
        device: &Device,
        notification: Notification,
        channel: impl Into<String>,
        offset: u64,
    ) -> Self {
        Self {
            device_id: device.device_id.clone(),
            user: device.user.clone(),
            platform: device.platform,
            token: device.token.clone(),
            topic: device.topic.clone(),
            sandbox: device.sandbox,
            notification,
            channel: channel.into(),
            offset,
            created_at: unix_now(),
            count: 0,
        }
    }

    /// `count` when the push stands for several publications, for payloads.
    pub fn coalesced_count(&self) -> Option<u32> {
        (self.count > 1).then_some(self.count)
    }

    /// The job as stored, with the id its queue gave it.
    pub fn with_id(self, id: u64) -> PushJob {
        PushJob { id, spec: self }
    }
}

impl fmt::Debug for NewPushJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewPushJob")
            .field("device_id", &self.device_id)
            .field("platform", &self.platform)
            .field("channel", &self.channel)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

/// One notification for one device, as stored in the durable outbox: the
/// job (`spec`) and the id the outbox gave it (stored as one flat JSON object).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct PushJob {
    /// Unique within one store; retries of a job keep it (and so keep the
    /// APNs `apns-id` derived from it).
    pub id: u64,
    #[serde(flatten)]
    pub spec: NewPushJob,
}

impl PushJob {
    /// Seconds of `ttl` left at `now` (unix seconds): `None` without a ttl,
    /// `Some(0)` once expired.
    pub fn ttl_left(&self, now: u64) -> Option<u64> {
        let ttl = self.spec.notification.ttl?;
        let start = if self.spec.created_at == 0 {
            now
        } else {
            self.spec.created_at
        };
        Some(start.saturating_add(ttl).saturating_sub(now))
    }

    /// A canonical UUID string derived from the job id, the same for every
    /// attempt of this job: used as APNs `apns-id`.
    pub fn notification_uuid(&self) -> String {
        let hi = splitmix64(self.id);
        let lo = self.id;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xffff,
            0x4000 | (hi & 0x0fff),
            0x8000 | ((lo >> 48) & 0x3fff),
            lo & 0xffff_ffff_ffff
        )
    }
}

impl fmt::Debug for PushJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PushJob")
            .field("id", &self.id)
            .field("device_id", &self.spec.device_id)
            .field("platform", &self.spec.platform)
            .field("channel", &self.spec.channel)
            .field("offset", &self.spec.offset)
            .finish_non_exhaustive()
    }
}

/// SplitMix64: a fixed bijective scramble, so ids map to well-spread UUIDs.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Current unix time in seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Current unix time in milliseconds (0 if the clock is before 1970).
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn platform_and_priority_use_lowercase_names() {
        assert_eq!(serde_json::to_string(&Platform::Apns).unwrap(), "\"apns\"");
        assert_eq!(
            serde_json::from_str::<Platform>("\"fcm\"").unwrap(),
            Platform::Fcm
        );
        assert_eq!(serde_json::to_string(&Priority::High).unwrap(), "\"high\"");
        assert!(serde_json::from_str::<Platform>("\"APNS\"").is_err());
        assert_eq!(
            serde_json::from_str::<Platform>("\"webpush\"").unwrap(),
            Platform::WebPush
        );
    }

    #[test]
    fn a_token_is_a_string_or_a_web_push_subscription() {
        let t: DeviceToken = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(t.text(), Some("abc"));
        let w: DeviceToken = serde_json::from_str(
            r#"{"endpoint":"https://push.example/x","keys":{"p256dh":"p","auth":"a"}}"#,
        )
        .unwrap();
        assert!(matches!(&w, DeviceToken::WebPush(s) if s.endpoint == "https://push.example/x"));
        assert_eq!(
            serde_json::to_value(&w).unwrap()["keys"]["auth"],
            serde_json::json!("a")
        );
    }

    #[test]
    fn notification_matches_the_push_object() {
        let n: Notification = serde_json::from_str(
            r#"{"title":"t","data":{"k":1},"collapse_key":"c","ttl":60,"priority":"normal"}"#,
        )
        .unwrap();
        assert_eq!(n.title.as_deref(), Some("t"));
        assert_eq!(n.ttl, Some(60));
        assert_eq!(n.priority, Some(Priority::Normal));
        assert!(n.is_alert());
        let wake: Notification = serde_json::from_str(r#"{"title":"t","mode":"wake"}"#).unwrap();
        assert!(wake.is_wake() && !wake.is_alert());
        assert!(serde_json::from_str::<Notification>(r#"{"mode":"loud"}"#).is_err());
        let empty: Notification = serde_json::from_str("{}").unwrap();
        assert!(!empty.is_alert());
        assert_eq!(empty.effective_priority(), Priority::Normal);
    }

    #[test]
    fn notification_uuid_is_canonical_stable_and_distinct() {
        let job = |id| {
            NewPushJob {
                device_id: "d".into(),
                user: "u".into(),
                platform: Platform::Apns,
                token: "00".into(),
                topic: None,
                sandbox: false,
                notification: Notification::default(),
                channel: "user:u".into(),
                offset: 1,
                created_at: 0,
                count: 0,
            }
            .with_id(id)
        };
        let a = job(1).notification_uuid();
        assert_eq!(a, job(1).notification_uuid());
        assert_ne!(a, job(2).notification_uuid());
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }

    #[test]
    fn ttl_counts_from_creation() {
        let mut j = NewPushJob {
            device_id: "d".into(),
            user: "u".into(),
            platform: Platform::Fcm,
            token: "t".into(),
            topic: None,
            sandbox: false,
            notification: Notification {
                ttl: Some(60),
                ..Default::default()
            },
            channel: "c".into(),
            offset: 1,
            created_at: 1000,
            count: 0,
        }
        .with_id(1);
        assert_eq!(j.ttl_left(1010), Some(50));
        assert_eq!(j.ttl_left(2000), Some(0));
        j.spec.notification.ttl = None;
        assert_eq!(j.ttl_left(2000), None);
    }

    #[test]
    fn stored_jobs_are_one_flat_json_object() {
        // The outbox's rows: jobs stored before `PushJob` held a
        // `NewPushJob` must still read back.
        let stored = r#"{"id":7,"device_id":"d","user":"u","platform":"apns","token":"00",
            "notification":{},"channel":"user:u","offset":3}"#;
        let j: PushJob = serde_json::from_str(stored).expect("old row reads");
        assert_eq!((j.id, j.spec.offset, j.spec.created_at), (7, 3, 0));
        let v = serde_json::to_value(&j).expect("serializes");
        assert_eq!(v["id"], 7);
        assert_eq!(v["token"], "00");
        assert!(v.get("spec").is_none());
    }

    #[test]
    fn debug_output_never_shows_tokens() {
        let d = Device {
            device_id: "d".into(),
            user: "u".into(),
            platform: Platform::Apns,
            token: "deadbeefsecret".into(),
            topic: None,
            sandbox: false,
            updated_at: 0,
        };
        assert!(!format!("{d:?}").contains("deadbeef"));
    }
}
