//! Offline fallback to push (§10–11): the device registry, APNs and FCM
//! through local fakes that check what Apple and Google check.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tether_protocol::*;
use tether_tests::fakes::{ApnsFault, FakeApns, FakeApnsConfig, FakeFcm, FakeFcmConfig, keys};
use tether_tests::*;

const TOPIC: &str = "com.example.tether";
const KEY_ID: &str = "KEYID12345";
const TEAM_ID: &str = "TEAMID1234";

pub(crate) fn apns_token(n: u8) -> String {
    format!("{:02x}", n).repeat(32)
}

pub(crate) struct Apns {
    pub(crate) fake: FakeApns,
    _dir: tempfile::TempDir,
    key_file: String,
}

impl Apns {
    pub(crate) async fn start() -> Apns {
        let pair = keys::es256_pair().unwrap();
        let fake = FakeApns::start(FakeApnsConfig {
            public_key_pem: pair.public_pem.clone(),
            key_id: KEY_ID.into(),
            team_id: TEAM_ID.into(),
            topic: TOPIC.into(),
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("AuthKey.p8");
        std::fs::write(&key_file, &pair.private_pem).unwrap();
        Apns {
            fake,
            key_file: key_file.to_str().unwrap().to_owned(),
            _dir: dir,
        }
    }

    pub(crate) fn args(&self) -> Vec<String> {
        vec![
            "--apns-key-file".into(),
            self.key_file.clone(),
            "--apns-key-id".into(),
            KEY_ID.into(),
            "--apns-team-id".into(),
            TEAM_ID.into(),
            "--apns-topic".into(),
            TOPIC.into(),
            "--apns-endpoint".into(),
            self.fake.url(),
        ]
    }
}

fn start(args: &[String], extra: &[&str]) -> TestBroker {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    TestBroker::start(&all).unwrap()
}

fn start_in(dir: &Path, args: &[String], extra: &[&str]) -> TestBroker {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    TestBroker::start_in(dir, &all).unwrap()
}

async fn put_device(broker: &TestBroker, id: &str, body: Value) -> (u16, Value) {
    let r = broker
        .http()
        .put(broker.api_url(&format!("/v1/devices/{id}")))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub(crate) async fn devices(broker: &TestBroker, user: &str) -> Vec<Value> {
    let r = broker
        .http()
        .get(broker.api_url(&format!("/v1/devices?user={user}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["devices"].as_array().unwrap().clone()
}

pub(crate) async fn register_apns(broker: &TestBroker, id: &str, user: &str, token: &str) {
    let (s, body) = put_device(
        broker,
        id,
        json!({"user": user, "platform": "apns", "token": token}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
}

pub(crate) async fn publish_push(broker: &TestBroker, user: &str, title: &str) -> u64 {
    let (s, a) = broker
        .publish(json!({
            "channel": format!("user:{user}"),
            "data": {"text": title},
            "push": {"title": title, "body": "you have a message", "data": {"kind": "chat", "n": 1}},
        }))
        .await
        .unwrap();
    assert_eq!(s, 200, "{a}");
    a["offset"].as_u64().unwrap()
}

/// A live session of `device` on `user:{user}`.
pub(crate) async fn live_session(broker: &TestBroker, user: &str, device: &str) -> WsClient {
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let id = c.id();
    c.send(&ClientMessage::Connect(Connect {
        id,
        device: Some(device.into()),
        ..Connect::default()
    }))
    .await
    .unwrap();
    assert!(matches!(
        c.recv().await.unwrap(),
        ServerMessage::Connected(_)
    ));
    c.subscribe(&format!("user:{user}")).await.unwrap();
    c
}

#[tokio::test]
async fn the_device_registry_validates_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_in(dir.path(), &[]).unwrap();
    let (s, rec) = put_device(
        &broker,
        "iphone-1",
        json!({"user": "alice", "platform": "apns", "token": apns_token(1), "topic": TOPIC, "sandbox": true}),
    )
    .await;
    assert_eq!(s, 200, "{rec}");
    assert_eq!(rec["device_id"], "iphone-1");
    assert_eq!(rec["user"], "alice");
    assert_eq!(rec["sandbox"], true);
    assert!(rec["updated_at"].as_u64().unwrap() > 1_700_000_000);
    let (s, _) = put_device(
        &broker,
        "pixel-1",
        json!({"user": "alice", "platform": "fcm", "token": "fcm-token:abc_123"}),
    )
    .await;
    assert_eq!(s, 200);

    for (body, what) in [
        (
            json!({"user": "alice", "platform": "windows", "token": apns_token(1)}),
            "platform",
        ),
        (
            json!({"user": "alice", "platform": "apns", "token": "not-hex"}),
            "token",
        ),
        (
            json!({"user": "a b", "platform": "apns", "token": apns_token(1)}),
            "user",
        ),
        (
            json!({"platform": "apns", "token": apns_token(1)}),
            "missing user",
        ),
    ] {
        let (s, body) = put_device(&broker, "bad-1", body).await;
        assert_eq!(s, 400, "{what}: {body}");
        assert_eq!(body["error"]["code"], "bad_request");
    }
    let r = broker
        .http()
        .get(broker.api_url("/v1/devices"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "user is required");

    assert_eq!(devices(&broker, "alice").await.len(), 2);
    drop(broker);
    let broker = TestBroker::start_in(dir.path(), &[]).unwrap();
    let list = devices(&broker, "alice").await;
    assert_eq!(list.len(), 2, "{list:?}");
    let r = broker
        .http()
        .delete(broker.api_url("/v1/devices/pixel-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let list = devices(&broker, "alice").await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["device_id"], "iphone-1");
}

/// A browser's subscription object as Web Push registers it (§10).
fn subscription(endpoint: &str) -> Value {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let point = [&[4u8][..], &[9u8; 64][..]].concat();
    json!({"endpoint": endpoint, "keys": {"p256dh": b64(&point), "auth": b64(&[3u8; 16])}})
}

#[tokio::test]
async fn a_web_push_device_registers_with_its_subscription_object() {
    let broker = TestBroker::start(&[]).unwrap();
    let sub = subscription("https://push.example.net/send/abc123");
    let (s, rec) = put_device(
        &broker,
        "browser-1",
        json!({"user": "walt", "platform": "webpush", "token": sub}),
    )
    .await;
    assert_eq!(s, 200, "{rec}");
    assert_eq!(rec["platform"], "webpush");
    assert_eq!(rec["token"], sub, "the object comes back as it was given");
    let list = devices(&broker, "walt").await;
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0]["token"]["endpoint"],
        "https://push.example.net/send/abc123"
    );
    for (body, what) in [
        (
            json!({"user": "walt", "platform": "webpush", "token": "a-string"}),
            "a string token",
        ),
        (
            json!({"user": "walt", "platform": "webpush", "token": subscription("http://push.example.net/x")}),
            "plain http endpoint",
        ),
        (
            json!({"user": "walt", "platform": "apns", "token": sub}),
            "an object for APNs",
        ),
        (
            json!({"user": "walt", "platform": "webpush", "token": {"endpoint": "https://p.example/x", "keys": {"p256dh": "AAAA", "auth": "AAAA"}}}),
            "keys too short",
        ),
    ] {
        let (s, body) = put_device(&broker, "bad-1", body).await;
        assert_eq!(s, 400, "{what}: {body}");
        assert_eq!(body["error"]["code"], "bad_request");
    }
}

#[tokio::test]
async fn an_offline_device_gets_the_message_through_apns() {
    let apns = Apns::start().await;
    let broker = start(&apns.args(), &[]);
    register_apns(&broker, "iphone-a", "alice", &apns_token(0xa1)).await;
    let offset = publish_push(&broker, "alice", "Hello").await;
    let got = apns.fake.wait_accepted(1, WAIT).await.unwrap();
    let n = &got[0];
    assert_eq!(n.token, apns_token(0xa1));
    assert_eq!(n.headers["apns-topic"], TOPIC);
    assert_eq!(n.headers["apns-push-type"], "alert");
    assert_eq!(n.payload["aps"]["alert"]["title"], "Hello");
    assert_eq!(n.payload["aps"]["alert"]["body"], "you have a message");
    assert_eq!(n.payload["channel"], "user:alice");
    assert_eq!(n.payload["offset"], offset);
    assert_eq!(n.payload["kind"], "chat");
    broker
        .wait_for_metric(
            "tether_pushes_total{provider=\"apns\",outcome=\"delivered\",reason=\"\"} 1",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_wake_push_carries_only_channel_and_offset() {
    let apns = Apns::start().await;
    let broker = start(&apns.args(), &[]);
    register_apns(&broker, "iphone-w", "wendy", &apns_token(0xb7)).await;
    let (s, a) = broker
        .publish(json!({
            "channel": "user:wendy",
            "data": {"text": "the content stays here"},
            "push": {"mode": "wake", "title": "not sent", "data": {"secret": 1}},
        }))
        .await
        .unwrap();
    assert_eq!(s, 200, "{a}");
    let got = apns.fake.wait_accepted(1, WAIT).await.unwrap();
    let n = &got[0];
    assert_eq!(n.headers["apns-push-type"], "background");
    assert_eq!(n.headers["apns-priority"], "5");
    assert_eq!(
        n.payload,
        json!({"aps": {"content-available": 1}, "channel": "user:wendy", "offset": a["offset"]})
    );
    // An unknown mode is refused, not ignored.
    let (s, e) = broker
        .publish(json!({"channel": "user:wendy", "data": 1, "push": {"mode": "loud"}}))
        .await
        .unwrap();
    assert_eq!(s, 400, "{e}");
}

#[tokio::test]
async fn a_live_device_that_acks_gets_no_push_and_a_silent_one_does_after_the_ack_timeout() {
    let apns = Apns::start().await;
    let broker = start(&apns.args(), &["--ack-timeout", "1"]);
    register_apns(&broker, "iphone-ack", "bob", &apns_token(0xb1)).await;
    register_apns(&broker, "iphone-silent", "carol", &apns_token(0xc1)).await;
    let mut acking = live_session(&broker, "bob", "iphone-ack").await;
    let mut silent = live_session(&broker, "carol", "iphone-silent").await;

    publish_push(&broker, "bob", "for bob").await;
    let m = acking.recv_publication().await.unwrap();
    acking
        .send(&ClientMessage::Ack(Ack {
            channel: m.channel.clone(),
            offset: m.offset,
        }))
        .await
        .unwrap();
    let offset = publish_push(&broker, "carol", "for carol").await;
    assert_eq!(
        silent.recv_publication().await.unwrap().offset,
        Offset(offset)
    );
    // Carol's device received it live but never acked: one push, after the timeout.
    let got = apns.fake.wait_accepted(1, WAIT).await.unwrap();
    assert_eq!(got[0].token, apns_token(0xc1));
    // Bob acked in time: nothing for him, even well after the timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let tokens: Vec<String> = apns
        .fake
        .requests()
        .iter()
        .map(|r| r.token.clone())
        .collect();
    assert_eq!(
        tokens,
        vec![apns_token(0xc1)],
        "exactly one push, to the silent device"
    );
}

#[tokio::test]
async fn a_live_device_without_ack_timeout_gets_no_push() {
    let apns = Apns::start().await;
    let broker = start(&apns.args(), &[]);
    register_apns(&broker, "iphone-live", "dave", &apns_token(0xd1)).await;
    register_apns(&broker, "ipad-off", "dave", &apns_token(0xd2)).await;
    let mut live = live_session(&broker, "dave", "iphone-live").await;
    publish_push(&broker, "dave", "hi").await;
    live.recv_publication().await.unwrap();
    // Only the offline iPad is pushed.
    let got = apns.fake.wait_accepted(1, WAIT).await.unwrap();
    assert_eq!(got[0].token, apns_token(0xd2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(apns.fake.requests().len(), 1);
}

#[tokio::test]
async fn a_dead_token_removes_the_device() {
    let apns = Apns::start().await;
    let broker = start(&apns.args(), &[]);
    register_apns(&broker, "iphone-gone", "erin", &apns_token(0xe1)).await;
    apns.fake.unregister(&apns_token(0xe1));
    publish_push(&broker, "erin", "anyone there?").await;
    let reqs = apns.fake.wait_requests(1, WAIT).await.unwrap();
    assert_eq!(reqs[0].status, 410);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !devices(&broker, "erin").await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "device still registered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker
        .wait_for_metric("tether_push_devices_removed_total{provider=\"apns\"} 1")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_429_with_retry_after_is_retried_once_and_delivered() {
    let apns = Apns::start().await;
    let broker = start(&apns.args(), &[]);
    register_apns(&broker, "iphone-429", "fay", &apns_token(0xf1)).await;
    apns.fake.fail(
        ApnsFault::TooManyRequests {
            retry_after: Some(1),
        },
        1,
    );
    publish_push(&broker, "fay", "later").await;
    apns.fake
        .wait_accepted(1, Duration::from_secs(20))
        .await
        .unwrap();
    let reqs = apns.fake.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].status, 429);
    assert_eq!(reqs[1].status, 200);
    assert!(
        reqs[1].at - reqs[0].at >= Duration::from_millis(950),
        "Retry-After honoured"
    );
}

#[tokio::test]
async fn a_500_is_retried_and_delivered() {
    let apns = Apns::start().await;
    let broker = start(&apns.args(), &[]);
    register_apns(&broker, "iphone-500", "gus", &apns_token(0x51)).await;
    apns.fake.fail(ApnsFault::InternalServerError, 1);
    publish_push(&broker, "gus", "again").await;
    apns.fake
        .wait_accepted(1, Duration::from_secs(20))
        .await
        .unwrap();
    let statuses: Vec<u16> = apns.fake.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![500, 200]);
}

#[tokio::test]
async fn jobs_in_the_outbox_survive_a_killed_broker_and_are_delivered_once() {
    let apns = Apns::start().await;
    let dir = tempfile::tempdir().unwrap();
    apns.fake.stop_listening().await;
    let broker = start_in(dir.path(), &apns.args(), &[]);
    register_apns(&broker, "iphone-k", "hal", &apns_token(0x71)).await;
    for i in 0..3 {
        publish_push(&broker, "hal", &format!("m{i}")).await;
    }
    // The provider is down: the jobs wait in the durable outbox.
    broker
        .wait_for_metric("tether_push_outbox_depth 3")
        .await
        .unwrap();
    drop(broker); // SIGKILL: no graceful anything
    apns.fake.resume_listening().await.unwrap();
    let broker = start_in(dir.path(), &apns.args(), &[]);
    let got = apns
        .fake
        .wait_accepted(3, Duration::from_secs(30))
        .await
        .unwrap();
    let mut offsets: Vec<u64> = got
        .iter()
        .map(|n| n.payload["offset"].as_u64().unwrap())
        .collect();
    offsets.sort_unstable();
    assert_eq!(offsets, vec![1, 2, 3]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(apns.fake.accepted().len(), 3, "none twice");
    assert!(apns.fake.accepted_per_id().values().all(|n| *n == 1));
    broker
        .wait_for_metric("tether_push_outbox_depth 0")
        .await
        .unwrap();
}

#[tokio::test]
async fn fcm_devices_get_string_data_and_unregistered_ones_are_removed() {
    let fcm = Fcm::start().await;
    let fake = &fcm.fake;
    let broker = start(&fcm.args(), &[]);
    let (s, _) = put_device(
        &broker,
        "pixel-ok",
        json!({"user": "ivy", "platform": "fcm", "token": "tok-ok"}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = put_device(
        &broker,
        "pixel-dead",
        json!({"user": "ivy", "platform": "fcm", "token": "tok-dead"}),
    )
    .await;
    assert_eq!(s, 200);
    fake.unregister("tok-dead");
    let offset = publish_push(&broker, "ivy", "Hi Ivy").await;
    let got = fake.wait_accepted(1, WAIT).await.unwrap();
    let m = &got[0].message;
    assert_eq!(got[0].token, "tok-ok");
    assert_eq!(m["notification"]["title"], "Hi Ivy");
    let data = m["data"].as_object().unwrap();
    assert!(data.values().all(Value::is_string), "{data:?}");
    assert_eq!(data["channel"], "user:ivy");
    assert_eq!(data["offset"], offset.to_string());
    assert_eq!(data["n"], "1");
    assert_eq!(fake.grants(), 1);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list = devices(&broker, "ivy").await;
        if list.len() == 1 {
            assert_eq!(list[0]["device_id"], "pixel-ok");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dead device still registered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The FCM fake and a service-account file for it, kept alive together.
struct Fcm {
    fake: FakeFcm,
    _dir: tempfile::TempDir,
    account: String,
}

impl Fcm {
    async fn start() -> Fcm {
        let pair = keys::rsa_pair().unwrap();
        let fake = FakeFcm::start(FakeFcmConfig::new(pair.public_pem.clone()))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let account = dir.path().join("service-account.json");
        std::fs::write(&account, fake.service_account_json(&pair.private_pem)).unwrap();
        Fcm {
            account: account.to_str().unwrap().to_owned(),
            fake,
            _dir: dir,
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--fcm-service-account".into(),
            self.account.clone(),
            "--fcm-endpoint".into(),
            self.fake.url(),
        ]
    }
}

#[tokio::test]
async fn a_wake_push_has_no_content_on_any_platform() {
    use crate::webpush::{VapidKey, register_webpush};
    let apns = Apns::start().await;
    let fcm = Fcm::start().await;
    let vapid = VapidKey::fresh();
    let web = tether_tests::fakes::FakeWebPush::start(Some(vapid.public.clone()))
        .await
        .unwrap();
    let args = [apns.args(), fcm.args(), vapid.args()].concat();
    let broker = start(&args, &[]);
    register_apns(&broker, "phone-a", "wes", &apns_token(0x5a)).await;
    let (s, _) = put_device(
        &broker,
        "phone-f",
        json!({"user": "wes", "platform": "fcm", "token": "tok-wes"}),
    )
    .await;
    assert_eq!(s, 200);
    let sub = web.subscribe().unwrap();
    register_webpush(&broker, "browser-w", "wes", sub.json()).await;
    let (s, a) = broker
        .publish(json!({
            "channel": "user:wes",
            "data": {"text": "the content stays here"},
            "push": {"mode": "wake", "title": "not sent", "body": "nor this", "data": {"secret": 1}},
        }))
        .await
        .unwrap();
    assert_eq!(s, 200, "{a}");
    let offset = a["offset"].as_u64().unwrap();
    let n = apns.fake.wait_accepted(1, WAIT).await.unwrap();
    assert_eq!(n[0].headers["apns-push-type"], "background");
    assert_eq!(n[0].headers["apns-priority"], "5");
    assert_eq!(
        n[0].payload,
        json!({"aps": {"content-available": 1}, "channel": "user:wes", "offset": offset})
    );
    let m = fcm.fake.wait_accepted(1, WAIT).await.unwrap();
    let message = &m[0].message;
    assert!(message.get("notification").is_none(), "{message}");
    assert_eq!(
        message["data"],
        json!({"channel": "user:wes", "offset": offset.to_string()})
    );
    let w = web.wait_accepted(1, WAIT).await.unwrap();
    assert_eq!(
        w[0].payload,
        json!({"mode": "wake", "channel": "user:wes", "offset": offset})
    );
    assert_eq!(w[0].headers["urgency"], "normal");
}

#[tokio::test]
async fn a_burst_to_an_offline_user_is_one_push_per_window_with_the_count() {
    use crate::webpush::{VapidKey, register_webpush};
    let apns = Apns::start().await;
    let vapid = VapidKey::fresh();
    let web = tether_tests::fakes::FakeWebPush::start(Some(vapid.public.clone()))
        .await
        .unwrap();
    let args = [apns.args(), vapid.args()].concat();
    let broker = start(&args, &["--push-coalesce-window", "3"]);
    register_apns(&broker, "phone-c", "cora", &apns_token(0xc0)).await;
    let sub = web.subscribe().unwrap();
    register_webpush(&broker, "browser-c", "cora", sub.json()).await;
    let messages: Vec<Value> = (1..=50)
        .map(|i| {
            json!({"channel": "user:cora", "data": {"n": i},
                   "push": {"title": format!("message {i}"), "body": "b"}})
        })
        .collect();
    let r = broker
        .http()
        .post(broker.api_url("/v1/publish/batch"))
        .json(&json!({ "messages": messages }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answers: Value = r.json().await.unwrap();
    let offsets: Vec<u64> = answers["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets.len(), 50);
    let (first, last) = (offsets[0], offsets[49]);

    // Each device: the first at once, then one summary when the window
    // closes, carrying the latest message and the count it stands for.
    let n = apns.fake.wait_accepted(2, WAIT).await.unwrap();
    assert_eq!(n[0].payload["offset"], first);
    assert!(n[0].payload.get("count").is_none(), "{}", n[0].payload);
    assert_eq!(n[1].payload["offset"], last);
    assert_eq!(n[1].payload["aps"]["alert"]["title"], "message 50");
    assert_eq!(n[1].payload["count"], 49);
    let w = web.wait_accepted(2, WAIT).await.unwrap();
    assert_eq!(w[0].payload["offset"], first);
    assert!(w[0].payload.get("count").is_none(), "{}", w[0].payload);
    assert_eq!(w[1].payload["offset"], last);
    assert_eq!(w[1].payload["title"], "message 50");
    assert_eq!(w[1].payload["count"], 49);

    // Barrier: a publication under another collapse key is pushed at once;
    // once it has arrived, nothing else of the burst is on its way.
    let (s, b) = broker
        .publish(json!({"channel": "user:cora", "data": "barrier",
                        "push": {"title": "barrier", "collapse_key": "other"}}))
        .await
        .unwrap();
    assert_eq!(s, 200);
    let n = apns.fake.wait_accepted(3, WAIT).await.unwrap();
    let w = web.wait_accepted(3, WAIT).await.unwrap();
    assert_eq!(n.len(), 3, "APNs got more than one push per window");
    assert_eq!(w.len(), 3, "Web Push got more than one push per window");
    assert_eq!(n[2].payload["offset"], b["offset"]);
    assert_eq!(w[2].payload["offset"], b["offset"]);
    for provider in ["apns", "webpush"] {
        broker
            .wait_for_metric(&format!(
                "tether_pushes_coalesced_total{{provider=\"{provider}\"}} 49"
            ))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn pushes_held_by_coalescing_at_shutdown_are_sent_after_the_restart() {
    let apns = Apns::start().await;
    let dir = tempfile::tempdir().unwrap();
    let broker_args = [apns.args()].concat();
    let mut broker = start_in(dir.path(), &broker_args, &["--push-coalesce-window", "600"]);
    register_apns(&broker, "phone-s", "sam", &apns_token(0x55)).await;
    let mut offsets = Vec::new();
    for i in 0..3 {
        offsets.push(publish_push(&broker, "sam", &format!("m{i}")).await);
    }
    let n = apns.fake.wait_accepted(1, WAIT).await.unwrap();
    assert_eq!(n[0].payload["offset"], offsets[0]);
    broker
        .wait_for_metric("tether_pushes_coalesced_total{provider=\"apns\"} 2")
        .await
        .unwrap();
    // A clean stop writes what the window holds to the durable outbox…
    assert!(broker.terminate(WAIT).unwrap().success());
    let _broker = start_in(dir.path(), &broker_args, &["--push-coalesce-window", "600"]);
    // …and the next start sends it, long before the window would close.
    let n = apns.fake.wait_accepted(2, WAIT).await.unwrap();
    assert_eq!(n[1].payload["offset"], offsets[2]);
    assert_eq!(n[1].payload["count"], 2);
}

#[tokio::test]
async fn an_ack_timeout_check_outlives_a_killed_broker() {
    let apns = Apns::start().await;
    let dir = tempfile::tempdir().unwrap();
    let args = apns.args();
    let broker = start_in(dir.path(), &args, &["--ack-timeout", "3"]);
    register_apns(&broker, "iphone-r", "rex", &apns_token(0x4e)).await;
    let mut live = live_session(&broker, "rex", "iphone-r").await;
    let offset = publish_push(&broker, "rex", "unacked").await;
    // Delivered live and never acked; the node dies before the timeout.
    assert_eq!(
        live.recv_publication().await.unwrap().offset,
        Offset(offset)
    );
    assert!(apns.fake.requests().is_empty(), "pushed before the timeout");
    drop(broker); // SIGKILL
    // The next start still knows the check, and pushes when it is due.
    let _broker = start_in(dir.path(), &args, &["--ack-timeout", "3"]);
    let got = apns.fake.wait_accepted(1, WAIT).await.unwrap();
    assert_eq!(got[0].token, apns_token(0x4e));
    assert_eq!(got[0].payload["offset"], offset);
}
