//! Web Push (§10–11): a browser's subscription gets the publication
//! encrypted for it (RFC 8291) and signed with the broker's VAPID key
//! (RFC 8292), through a fake push service that decrypts and verifies as a
//! real one does.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use tether_tests::fakes::{FakeWebPush, WebPushFault, keys};
use tether_tests::*;

/// The broker's VAPID key: the PEM file's directory and path, and the
/// public key as a browser's `applicationServerKey` (65 bytes).
pub(crate) struct VapidKey {
    _dir: tempfile::TempDir,
    pub(crate) file: String,
    pub(crate) public: Vec<u8>,
}

impl VapidKey {
    pub(crate) fn fresh() -> VapidKey {
        let pair = keys::es256_pair_fresh().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vapid.pem");
        std::fs::write(&file, &pair.private_pem).unwrap();
        // A P-256 SubjectPublicKeyInfo ends with the uncompressed point.
        let b64: String = pair
            .public_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let der = STANDARD.decode(b64).unwrap();
        let public = der[der.len() - 65..].to_vec();
        assert_eq!(public[0], 4);
        VapidKey {
            file: file.to_str().unwrap().to_owned(),
            public,
            _dir: dir,
        }
    }

    pub(crate) fn args(&self) -> Vec<String> {
        vec![
            "--vapid-private-key".into(),
            self.file.clone(),
            "--vapid-subject".into(),
            "mailto:ops@example.com".into(),
        ]
    }
}

pub(crate) async fn register_webpush(broker: &TestBroker, id: &str, user: &str, token: Value) {
    let r = broker
        .http()
        .put(broker.api_url(&format!("/v1/devices/{id}")))
        .json(&json!({"user": user, "platform": "webpush", "token": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

fn start(vapid: &VapidKey, extra: &[&str]) -> TestBroker {
    let args = vapid.args();
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    TestBroker::start(&all).unwrap()
}

async fn device_ids(broker: &TestBroker, user: &str) -> Vec<String> {
    crate::push::devices(broker, user)
        .await
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_web_push_is_encrypted_for_the_subscription_and_signed_with_vapid() {
    let vapid = VapidKey::fresh();
    let service = FakeWebPush::start(Some(vapid.public.clone()))
        .await
        .unwrap();
    let broker = start(&vapid, &[]);
    let sub = service.subscribe().unwrap();
    register_webpush(&broker, "browser-1", "walt", sub.json()).await;
    let (s, a) = broker
        .publish(json!({
            "channel": "user:walt",
            "data": {"text": "hello"},
            "push": {"title": "Hi Walt", "body": "a message", "data": {"kind": "chat", "n": 12345678901234u64},
                     "ttl": 60, "priority": "normal", "collapse_key": "chat-7"},
        }))
        .await
        .unwrap();
    assert_eq!(s, 200, "{a}");
    let got = service.wait_accepted(1, WAIT).await.unwrap();
    let m = &got[0];
    assert_eq!(m.subscription, sub.id);
    assert_eq!(
        m.payload,
        json!({"mode": "alert", "title": "Hi Walt", "body": "a message",
               "data": {"kind": "chat", "n": 12345678901234u64},
               "channel": "user:walt", "offset": a["offset"]})
    );
    assert!(
        (1..=60).contains(&m.ttl),
        "TTL counts down from 60: {}",
        m.ttl
    );
    assert_eq!(m.headers["urgency"], "normal");
    assert_eq!(m.headers["topic"], "chat-7");
    assert_eq!(m.claims["aud"], service.origin());
    assert_eq!(m.claims["sub"], "mailto:ops@example.com");
    broker
        .wait_for_metric(
            "tether_pushes_total{provider=\"webpush\",outcome=\"delivered\",reason=\"\"} 1",
        )
        .await
        .unwrap();
    // The broker logs the key web apps must subscribe with.
    let logged = URL_SAFE_NO_PAD.encode(&vapid.public);
    assert!(
        broker.log().iter().any(|l| l.contains(&logged)),
        "VAPID public key not logged"
    );
}

#[tokio::test]
async fn a_subscription_made_for_another_vapid_key_is_refused_and_not_retried() {
    let vapid = VapidKey::fresh();
    let other = VapidKey::fresh();
    // The browser subscribed with `other`'s key; the broker signs with its own.
    let service = FakeWebPush::start(Some(other.public.clone()))
        .await
        .unwrap();
    let broker = start(&vapid, &[]);
    let sub = service.subscribe().unwrap();
    register_webpush(&broker, "browser-x", "xena", sub.json()).await;
    let (s, _) = broker
        .publish(json!({"channel": "user:xena", "data": 1, "push": {"title": "t"}}))
        .await
        .unwrap();
    assert_eq!(s, 200);
    broker
        .wait_for_metric(
            "tether_pushes_total{provider=\"webpush\",outcome=\"failed\",reason=\"VapidRejected\"} 1",
        )
        .await
        .unwrap();
    let requests = service.requests();
    assert_eq!(requests.len(), 1, "a refusal is not retried: {requests:?}");
    assert_eq!(requests[0].status, 403);
    assert!(service.accepted().is_empty());
}

#[tokio::test]
async fn gone_subscriptions_are_removed_and_429_waits_for_retry_after() {
    let vapid = VapidKey::fresh();
    let service = FakeWebPush::start(Some(vapid.public.clone()))
        .await
        .unwrap();
    let broker = start(&vapid, &[]);
    let busy = service.subscribe().unwrap();
    let gone = service.subscribe().unwrap();
    service.fail(
        &busy.id,
        WebPushFault::TooManyRequests {
            retry_after: Some(1),
        },
        Some(1),
    );
    service.fail(&gone.id, WebPushFault::Gone, None);
    register_webpush(&broker, "busy", "gus", busy.json()).await;
    register_webpush(&broker, "gone", "gus", gone.json()).await;
    let (s, a) = broker
        .publish(json!({"channel": "user:gus", "data": 1, "push": {"title": "t"}}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{a}");
    let got = service.wait_accepted(1, WAIT).await.unwrap();
    assert_eq!(got[0].subscription, busy.id);
    assert_eq!(got[0].payload["offset"], a["offset"]);
    let tries: Vec<_> = service
        .requests()
        .into_iter()
        .filter(|r| r.subscription == busy.id)
        .collect();
    assert_eq!(
        tries.iter().map(|r| r.status).collect::<Vec<_>>(),
        [429, 201]
    );
    let waited = tries[1].at - tries[0].at;
    assert!(
        waited >= std::time::Duration::from_millis(950),
        "retried after {waited:?}, before Retry-After: 1"
    );
    broker
        .wait_for_metric("tether_push_devices_removed_total{provider=\"webpush\"} 1")
        .await
        .unwrap();
    assert_eq!(device_ids(&broker, "gus").await, ["busy"]);
}

#[tokio::test]
async fn web_push_needs_its_key_and_subject_together_and_a_key_that_is_one() {
    let vapid = VapidKey::fresh();
    let err = broker_refuses(&["--vapid-private-key", &vapid.file]);
    assert!(err.contains("vapid-subject"), "{err}");
    let err = broker_refuses(&[
        "--vapid-private-key",
        &vapid.file,
        "--vapid-subject",
        "ops@example.com",
    ]);
    assert!(err.contains("mailto:"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a key").unwrap();
    let err = broker_refuses(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--vapid-private-key",
        junk.to_str().unwrap(),
        "--vapid-subject",
        "mailto:ops@example.com",
    ]);
    assert!(err.contains("vapid-private-key"), "{err}");
}
