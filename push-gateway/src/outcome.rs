//! What a provider's answer means for the job: delivered, try again, drop
//! the device, or give up. Pure functions of the HTTP answer, so the rules
//! are tested without a network.
//!
//! Reasons are short and low-cardinality (Apple's `reason` strings, FCM's
//! `errorCode`/`status`, or our own words such as `network`), so they can be
//! metric labels; details go to debug logs.

use std::time::Duration;

/// The result of one send attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider accepted the notification.
    Delivered,
    /// Transient: try again later.
    ///
    /// `after: None` → the gateway's jittered exponential backoff;
    /// `Some(d)` with `d > 0` → the provider's `Retry-After`: not before `d`
    /// (and not before the backoff either); `Some(Duration::ZERO)` → at once,
    /// because the cause was fixed on our side (credentials refreshed).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The device token is dead: the device must be removed.
    DeadToken { reason: String },
    /// Permanent failure of this notification (bad request, bad config).
    Failed { reason: String },
}

impl Outcome {
    /// The label for metrics: `delivered`, `retry`, `dead_token` or `failed`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Retry { .. } => "retry",
            Outcome::DeadToken { .. } => "dead_token",
            Outcome::Failed { .. } => "failed",
        }
    }

    /// The reason, if any.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Delivered => None,
            Outcome::Retry { reason, .. }
            | Outcome::DeadToken { reason }
            | Outcome::Failed { reason } => Some(reason),
        }
    }

    pub(crate) fn retry(reason: impl Into<String>) -> Self {
        Outcome::Retry {
            after: None,
            reason: reason.into(),
        }
    }

    pub(crate) fn failed(reason: impl Into<String>) -> Self {
        Outcome::Failed {
            reason: reason.into(),
        }
    }
}

/// APNs reason that means our provider JWT is too old: refresh and retry.
pub const APNS_EXPIRED_PROVIDER_TOKEN: &str = "ExpiredProviderToken";

fn http_reason(status: u16) -> String {
    format!("http_{status}")
}

/// Classifies an APNs answer: HTTP status, the `reason` of the JSON body,
/// and the `Retry-After` header.
///
/// 200 → delivered; 410, or 400 `BadDeviceToken`/`Unregistered` → dead
/// token; 429 and 5xx → retry (honouring `Retry-After`); 403
/// `ExpiredProviderToken` → retry at once (the caller refreshes the JWT);
/// any other answer → failed.
pub fn classify_apns(status: u16, reason: Option<&str>, retry_after: Option<Duration>) -> Outcome {
    let reason_or = |fallback: String| reason.map_or(fallback, str::to_owned);
    match status {
        200 => Outcome::Delivered,
        410 => Outcome::DeadToken {
            reason: reason_or("Unregistered".into()),
        },
        400 if matches!(reason, Some("BadDeviceToken" | "Unregistered")) => Outcome::DeadToken {
            reason: reason_or(http_reason(status)),
        },
        403 if reason == Some(APNS_EXPIRED_PROVIDER_TOKEN) => Outcome::Retry {
            after: Some(Duration::ZERO),
            reason: APNS_EXPIRED_PROVIDER_TOKEN.into(),
        },
        429 | 500..=599 => Outcome::Retry {
            after: retry_after,
            reason: reason_or(http_reason(status)),
        },
        _ => Outcome::Failed {
            reason: reason_or(http_reason(status)),
        },
    }
}

/// The parts of an FCM error answer that matter
/// (`{"error": {"status": …, "details": [{"errorCode": …}]}}`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FcmError {
    /// `error.status`, e.g. `NOT_FOUND`, `INVALID_ARGUMENT`.
    pub status: Option<String>,
    /// The first `error.details[].errorCode`, e.g. `UNREGISTERED`.
    pub error_code: Option<String>,
}

impl FcmError {
    /// Parses an FCM error body; missing parts are `None`.
    pub fn parse(body: &[u8]) -> Self {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
            return Self::default();
        };
        let err = &v["error"];
        let status = err["status"].as_str().map(str::to_owned);
        let error_code = err["details"].as_array().and_then(|details| {
            details
                .iter()
                .find_map(|d| d["errorCode"].as_str().map(str::to_owned))
        });
        Self { status, error_code }
    }
}

/// Classifies an FCM HTTP v1 answer.
///
/// 200 → delivered; 404, `UNREGISTERED` or status `NOT_FOUND` → dead token;
/// 429 and 5xx → retry (honouring `Retry-After`); 401 → retry at once (the
/// caller refreshes the access token); any other answer → failed.
pub fn classify_fcm(status: u16, error: &FcmError, retry_after: Option<Duration>) -> Outcome {
    let reason = || {
        error
            .error_code
            .clone()
            .or_else(|| error.status.clone())
            .unwrap_or_else(|| http_reason(status))
    };
    let unregistered = error.error_code.as_deref() == Some("UNREGISTERED")
        || error.status.as_deref() == Some("NOT_FOUND");
    match status {
        200 => Outcome::Delivered,
        404 => Outcome::DeadToken { reason: reason() },
        _ if unregistered => Outcome::DeadToken { reason: reason() },
        401 => Outcome::Retry {
            after: Some(Duration::ZERO),
            reason: reason(),
        },
        429 | 500..=599 => Outcome::Retry {
            after: retry_after,
            reason: reason(),
        },
        _ => Outcome::Failed { reason: reason() },
    }
}

/// Parses a `Retry-After` header given in seconds (the form APNs and FCM
/// use); an HTTP date or garbage gives `None`, and so does `0`: "now" from
/// a provider that is refusing us means the usual backoff, not a tight
/// retry loop (an immediate retry is kept for a credential refresh).
/// Capped at one day.
/// Classifies a push service's answer to a Web Push message (RFC 8030).
///
/// 200–202 → delivered (201 Created is the standard answer); 404 and 410 →
/// the subscription is gone; 429 and 5xx → retry (honouring
/// `Retry-After`); 413 → `PayloadTooLarge`; 401/403 → `VapidRejected` (the
/// subscription was made for another application-server key); any other
/// answer → failed.
pub fn classify_webpush(status: u16, retry_after: Option<Duration>) -> Outcome {
    match status {
        200..=202 => Outcome::Delivered,
        404 | 410 => Outcome::DeadToken {
            reason: http_reason(status),
        },
        429 | 500..=599 => Outcome::Retry {
            after: retry_after,
            reason: http_reason(status),
        },
        413 => Outcome::failed("PayloadTooLarge"),
        401 | 403 => Outcome::failed("VapidRejected"),
        _ => Outcome::failed(http_reason(status)),
    }
}

pub fn parse_retry_after(value: Option<&str>) -> Option<Duration> {
    let secs: u64 = value?.trim().parse().ok()?;
    (secs > 0).then(|| Duration::from_secs(secs.min(86_400)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Option<Duration> {
        Some(Duration::from_secs(n))
    }

    #[test]
    fn web_push_answers() {
        assert_eq!(classify_webpush(201, None), Outcome::Delivered);
        assert_eq!(classify_webpush(410, None).label(), "dead_token");
        assert_eq!(classify_webpush(404, None).label(), "dead_token");
        assert_eq!(
            classify_webpush(429, secs(30)),
            Outcome::Retry {
                after: secs(30),
                reason: "http_429".into()
            }
        );
        assert_eq!(classify_webpush(503, None).label(), "retry");
        assert_eq!(
            classify_webpush(413, None).reason(),
            Some("PayloadTooLarge")
        );
        assert_eq!(classify_webpush(403, None).reason(), Some("VapidRejected"));
        assert_eq!(classify_webpush(400, None).label(), "failed");
    }

    #[test]
    fn apns_answers() {
        assert_eq!(classify_apns(200, None, None), Outcome::Delivered);
        assert_eq!(
            classify_apns(410, Some("Unregistered"), None),
            Outcome::DeadToken {
                reason: "Unregistered".into()
            }
        );
        assert_eq!(classify_apns(410, None, None).label(), "dead_token");
        assert_eq!(
            classify_apns(400, Some("BadDeviceToken"), None).label(),
            "dead_token"
        );
        assert_eq!(
            classify_apns(400, Some("Unregistered"), None).label(),
            "dead_token"
        );
        assert_eq!(
            classify_apns(400, Some("BadTopic"), None),
            Outcome::Failed {
                reason: "BadTopic".into()
            }
        );
        assert_eq!(
            classify_apns(429, Some("TooManyRequests"), secs(3)),
            Outcome::Retry {
                after: secs(3),
                reason: "TooManyRequests".into()
            }
        );
        assert_eq!(
            classify_apns(500, None, None),
            Outcome::Retry {
                after: None,
                reason: "http_500".into()
            }
        );
        assert_eq!(
            classify_apns(503, Some("ServiceUnavailable"), secs(1)).label(),
            "retry"
        );
        assert_eq!(
            classify_apns(403, Some("ExpiredProviderToken"), None),
            Outcome::Retry {
                after: Some(Duration::ZERO),
                reason: "ExpiredProviderToken".into()
            }
        );
        assert_eq!(
            classify_apns(403, Some("InvalidProviderToken"), None).label(),
            "failed"
        );
        assert_eq!(
            classify_apns(413, Some("PayloadTooLarge"), None).label(),
            "failed"
        );
    }

    #[test]
    fn fcm_error_bodies_parse() {
        let body = br#"{"error":{"code":404,"message":"x","status":"NOT_FOUND","details":[
            {"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        let e = FcmError::parse(body);
        assert_eq!(e.status.as_deref(), Some("NOT_FOUND"));
        assert_eq!(e.error_code.as_deref(), Some("UNREGISTERED"));
        assert_eq!(FcmError::parse(b"not json"), FcmError::default());
    }

    #[test]
    fn fcm_answers() {
        let none = FcmError::default();
        let err = |status: &str, code: Option<&str>| FcmError {
            status: Some(status.into()),
            error_code: code.map(Into::into),
        };
        assert_eq!(classify_fcm(200, &none, None), Outcome::Delivered);
        assert_eq!(
            classify_fcm(404, &err("NOT_FOUND", Some("UNREGISTERED")), None),
            Outcome::DeadToken {
                reason: "UNREGISTERED".into()
            }
        );
        assert_eq!(classify_fcm(404, &none, None).label(), "dead_token");
        assert_eq!(
            classify_fcm(400, &err("INVALID_ARGUMENT", Some("UNREGISTERED")), None).label(),
            "dead_token"
        );
        assert_eq!(
            classify_fcm(401, &err("UNAUTHENTICATED", None), None),
            Outcome::Retry {
                after: Some(Duration::ZERO),
                reason: "UNAUTHENTICATED".into()
            }
        );
        for s in [429, 500, 503] {
            assert_eq!(
                classify_fcm(s, &none, secs(2)),
                Outcome::Retry {
                    after: secs(2),
                    reason: format!("http_{s}")
                }
            );
        }
        assert_eq!(
            classify_fcm(
                400,
                &err("INVALID_ARGUMENT", Some("INVALID_ARGUMENT")),
                None
            ),
            Outcome::Failed {
                reason: "INVALID_ARGUMENT".into()
            }
        );
        assert_eq!(
            classify_fcm(
                403,
                &err("PERMISSION_DENIED", Some("SENDER_ID_MISMATCH")),
                None
            )
            .label(),
            "failed"
        );
    }

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(parse_retry_after(Some("1")), secs(1));
        assert_eq!(parse_retry_after(Some(" 30 ")), secs(30));
        assert_eq!(parse_retry_after(Some("999999999")), secs(86_400));
        // "Now" from a provider refusing us: the usual backoff, not a tight loop.
        assert_eq!(parse_retry_after(Some("0")), None);
        assert_eq!(
            parse_retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            None
        );
        assert_eq!(parse_retry_after(None), None);
    }
}
