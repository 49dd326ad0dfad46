//! APNs: request shape, JWT handling, and what each answer leads to.

use std::collections::HashSet;
use std::time::Duration;

use jsonwebtoken::{Algorithm, Validation};
use serde_json::json;
use tether_push_gateway::{
    ApnsClient, ApnsConfig, GatewayEvent, Notification, Outcome, Platform, Priority, Provider,
    Store, unix_now,
};
use tether_tests::fakes::{ApnsFault, keys};

use crate::common::*;

#[tokio::test]
async fn delivers_an_alert_with_apples_headers_and_payload() {
    let (fake, client) = apns().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let token = apns_token(1);
    let dev = store
        .put_device(device("phone", "alice", Platform::Apns, token.clone()))
        .await
        .unwrap();
    let mut run = start(store, Some(client), None, fast_config());
    let notification = Notification {
        title: Some("Hello".into()),
        body: Some("World".into()),
        data: Some(json!({"thread": "t1", "n": 3})),
        collapse_key: Some("chat-1".into()),
        ttl: Some(600),
        priority: Some(Priority::High),
        mode: None,
    };
    let job = job(&dev, notification, 17);
    let created_at = job.created_at;
    let ids = run.gateway.enqueue(vec![job]).await.unwrap();

    let accepted = fake.wait_accepted(1, WAIT).await.unwrap();
    let n = &accepted[0];
    assert_eq!(n.token, token);
    assert_eq!(
        n.payload,
        json!({"aps": {"alert": {"title": "Hello", "body": "World"}},
               "thread": "t1", "n": 3, "channel": "user:alice", "offset": 17})
    );
    let h = &n.headers;
    assert_eq!(h["apns-topic"], TOPIC);
    assert_eq!(h["apns-push-type"], "alert");
    assert_eq!(h["apns-priority"], "10");
    assert_eq!(h["apns-collapse-id"], "chat-1");
    assert_eq!(h["apns-expiration"], (created_at + 600).to_string());
    assert_eq!(n.apns_id, h["apns-id"]);

    // The provider JWT: ES256, kid, iss, iat; base64url without padding.
    let jwt = h["authorization"].strip_prefix("bearer ").unwrap();
    assert!(!jwt.contains('='));
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(header.alg, Algorithm::ES256);
    assert_eq!(header.kid.as_deref(), Some(KEY_ID));
    let mut v = Validation::new(Algorithm::ES256);
    v.required_spec_claims = HashSet::new();
    v.validate_exp = false;
    let key =
        jsonwebtoken::DecodingKey::from_ec_pem(keys::es256_pair().unwrap().public_pem.as_bytes())
            .unwrap();
    let claims = jsonwebtoken::decode::<serde_json::Value>(jwt, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["iss"], TEAM_ID);
    assert!(claims["iat"].as_u64().unwrap().abs_diff(unix_now()) < 60);

    assert_eq!(
        run.event(|e| matches!(e, GatewayEvent::Outcome { .. }))
            .await
            .unwrap(),
        GatewayEvent::Outcome {
            platform: Platform::Apns,
            outcome: "delivered",
            reason: None,
            job_id: ids[0],
        }
    );
    assert_eq!(run.gateway.outbox_depth().await.unwrap(), 0);
    run.stop().await.unwrap();
}

#[tokio::test]
async fn background_pushes_use_priority_5_and_content_available() {
    let (fake, client) = apns().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let dev = device("tablet", "bob", Platform::Apns, apns_token(2));
    let mut run = start(store, Some(client), None, fast_config());
    let n = Notification {
        data: Some(json!({"k": "v"})),
        priority: Some(Priority::High),
        ..Default::default()
    };
    run.gateway.enqueue(vec![job(&dev, n, 1)]).await.unwrap();
    let accepted = fake.wait_accepted(1, WAIT).await.unwrap();
    let h = &accepted[0].headers;
    assert_eq!(h["apns-push-type"], "background");
    assert_eq!(h["apns-priority"], "5");
    assert_eq!(h["apns-expiration"], "0");
    assert!(!h.contains_key("apns-collapse-id"));
    assert_eq!(
        accepted[0].payload,
        json!({"aps": {"content-available": 1}, "k": "v", "channel": "user:bob", "offset": 1})
    );
    assert_eq!(run.outcomes(1).await.unwrap(), ["delivered"]);
    run.stop().await.unwrap();
}

#[tokio::test]
async fn gone_token_410_removes_the_device() {
    let (fake, client) = apns().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let token = apns_token(3);
    let dev = store
        .put_device(device("old-phone", "carol", Platform::Apns, token.clone()))
        .await
        .unwrap();
    let keep = store
        .put_device(device("new-phone", "carol", Platform::Apns, apns_token(4)))
        .await
        .unwrap();
    fake.unregister(&token);
    let mut run = start(store.clone(), Some(client), None, fast_config());
    run.gateway
        .enqueue(vec![job(&dev, alert("hi"), 1), job(&keep, alert("hi"), 1)])
        .await
        .unwrap();
    let removed = run
        .event(|e| matches!(e, GatewayEvent::DeviceRemoved { .. }))
        .await
        .unwrap();
    assert_eq!(
        removed,
        GatewayEvent::DeviceRemoved {
            device_id: "old-phone".into(),
            platform: Platform::Apns
        }
    );
    assert!(store.get_device("old-phone").await.unwrap().is_none());
    let left: Vec<String> = store
        .devices_for_user("carol")
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.device_id)
        .collect();
    assert_eq!(left, ["new-phone"]);
    fake.wait_accepted(1, WAIT).await.unwrap();
    let gone = fake
        .requests()
        .into_iter()
        .find(|r| r.token == token)
        .unwrap();
    assert_eq!(
        (gone.status, gone.reason.as_deref()),
        (410, Some("Unregistered"))
    );
    // Neither job is retried.
    assert_eq!(run.gateway.outbox_depth().await.unwrap(), 0);
    run.stop().await.unwrap();
}

#[tokio::test]
async fn bad_device_token_400_is_a_dead_token() {
    let (fake, client) = apns().await.unwrap();
    let token = apns_token(5);
    fake.fail_token(&token, ApnsFault::BadDeviceToken, None);
    let dev = device("d", "dave", Platform::Apns, token);
    let push = push_job(&dev);
    assert_eq!(
        client.send(&push).await,
        Outcome::DeadToken {
            reason: "BadDeviceToken".into()
        }
    );
}

fn push_job(dev: &tether_push_gateway::Device) -> tether_push_gateway::PushJob {
    serde_json::from_value(json!({
        "id": 77, "device_id": dev.device_id, "user": dev.user, "platform": dev.platform,
        "token": dev.token, "notification": {"title": "x"}, "channel": "user:x", "offset": 1
    }))
    .unwrap()
}

#[tokio::test]
async fn too_many_requests_is_retried_no_earlier_than_retry_after() {
    let (fake, client) = apns().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let dev = device("d", "erin", Platform::Apns, apns_token(6));
    fake.fail(
        ApnsFault::TooManyRequests {
            retry_after: Some(1),
        },
        1,
    );
    let mut run = start(store, Some(client), None, fast_config());
    run.gateway
        .enqueue(vec![job(&dev, alert("x"), 1)])
        .await
        .unwrap();
    fake.wait_accepted(1, WAIT).await.unwrap();
    let requests = fake.requests();
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        [429, 200]
    );
    let gap = requests[1].at - requests[0].at;
    assert!(gap >= Duration::from_secs(1), "retried after {gap:?}");
    assert!(gap < Duration::from_secs(3), "retried after {gap:?}");
    // Same notification, same apns-id.
    assert_eq!(requests[0].apns_id, requests[1].apns_id);
    assert_eq!(run.outcomes(2).await.unwrap(), ["retry", "delivered"]);
    run.stop().await.unwrap();
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff_then_delivered() {
    let (fake, client) = apns().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let dev = device("d", "frank", Platform::Apns, apns_token(7));
    fake.fail(ApnsFault::InternalServerError, 2);
    let mut run = start(store, Some(client), None, fast_config());
    run.gateway
        .enqueue(vec![job(&dev, alert("x"), 1)])
        .await
        .unwrap();
    fake.wait_accepted(1, WAIT).await.unwrap();
    let requests = fake.requests();
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    // Backoff: ≥ base/2 before the first retry, ≥ base before the second.
    assert!(requests[1].at - requests[0].at >= Duration::from_millis(25));
    assert!(requests[2].at - requests[1].at >= Duration::from_millis(50));
    assert_eq!(
        run.outcomes(3).await.unwrap(),
        ["retry", "retry", "delivered"]
    );
    run.stop().await.unwrap();
}

#[tokio::test]
async fn retries_stop_after_max_attempts() {
    let (fake, client) = apns().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let dev = device("d", "gina", Platform::Apns, apns_token(8));
    fake.fail(ApnsFault::ServiceUnavailable { retry_after: None }, 100);
    let config = tether_push_gateway::GatewayConfig {
        max_attempts: 3,
        ..fast_config()
    };
    let mut run = start(store.clone(), Some(client), None, config);
    run.gateway
        .enqueue(vec![job(&dev, alert("x"), 1)])
        .await
        .unwrap();
    assert_eq!(run.outcomes(3).await.unwrap(), ["retry", "retry", "failed"]);
    assert_eq!(fake.requests().len(), 3);
    assert_eq!(store.failed_total().await.unwrap(), 1);
    let failed = store.failed_jobs(10).await.unwrap();
    assert_eq!(failed[0].attempts, 3);
    assert!(failed[0].reason.starts_with("RetriesExhausted"));
    assert_eq!(run.gateway.outbox_depth().await.unwrap(), 0);
    run.stop().await.unwrap();
}

#[tokio::test]
async fn expired_provider_token_is_refreshed_once_then_delivered() {
    let (fake, client) = apns().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let dev = device("d", "hank", Platform::Apns, apns_token(9));
    assert_eq!(client.tokens_signed(), 1);
    fake.fail(ApnsFault::ExpiredProviderToken, 1);
    // A long backoff: the retry after a refresh must not wait for it.
    let config = tether_push_gateway::GatewayConfig {
        base_backoff: Duration::from_secs(30),
        ..fast_config()
    };
    let mut run = start(store, Some(client.clone()), None, config);
    run.gateway
        .enqueue(vec![job(&dev, alert("x"), 1)])
        .await
        .unwrap();
    fake.wait_accepted(1, Duration::from_secs(10))
        .await
        .unwrap();
    let requests = fake.requests();
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        [403, 200]
    );
    assert_eq!(client.tokens_signed(), 2);
    assert_eq!(fake.distinct_jwts(), 2);
    assert_eq!(run.outcomes(2).await.unwrap(), ["retry", "delivered"]);
    run.stop().await.unwrap();
}

#[tokio::test]
async fn one_jwt_serves_many_pushes() {
    let (fake, client) = apns().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let n = 300;
    let jobs = (0..n)
        .map(|i| {
            job(
                &device(&format!("d{i}"), "ivy", Platform::Apns, apns_token(i)),
                alert("x"),
                1,
            )
        })
        .collect();
    let run = start(store, Some(client.clone()), None, fast_config());
    run.gateway.enqueue(jobs).await.unwrap();
    let accepted = fake.wait_accepted(n as usize, WAIT).await.unwrap();
    assert_eq!(accepted.len(), n as usize);
    assert_eq!(fake.distinct_jwts(), 1);
    assert_eq!(client.tokens_signed(), 1);
    let ids: HashSet<&str> = accepted.iter().map(|a| a.apns_id.as_str()).collect();
    assert_eq!(ids.len(), n as usize);
    run.stop().await.unwrap();
}

#[tokio::test]
async fn the_fake_refuses_a_jwt_signed_by_another_key() {
    let (fake, _) = apns().await.unwrap();
    let other = keys::es256_pair_fresh().unwrap();
    let client = ApnsClient::new(
        ApnsConfig::new(other.private_pem, KEY_ID, TEAM_ID)
            .with_topic(TOPIC)
            .with_endpoint(fake.url()),
    )
    .unwrap();
    let dev = device("d", "jo", Platform::Apns, apns_token(10));
    assert_eq!(
        client.send(&push_job(&dev)).await,
        Outcome::Failed {
            reason: "InvalidProviderToken".into()
        }
    );
    assert!(fake.accepted().is_empty());
}

#[tokio::test]
async fn a_refused_connection_is_a_retry() {
    let (fake, client) = apns().await.unwrap();
    fake.stop_listening().await;
    let dev = device("d", "kim", Platform::Apns, apns_token(11));
    let outcome = client.send(&push_job(&dev)).await;
    assert_eq!(
        outcome,
        Outcome::Retry {
            after: None,
            reason: "connect".into()
        }
    );
    fake.resume_listening().await.unwrap();
    assert_eq!(client.send(&push_job(&dev)).await, Outcome::Delivered);
}

#[tokio::test]
async fn bad_settings_name_the_flag() {
    let err = ApnsClient::new(ApnsConfig::new("not a key", KEY_ID, TEAM_ID))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("--apns-key-file:"), "{err}");
    let keys = keys::es256_pair().unwrap();
    let err = ApnsClient::new(ApnsConfig::new(keys.private_pem.clone(), "", TEAM_ID))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("--apns-key-id:"), "{err}");
    let err = ApnsClient::new(
        ApnsConfig::new(keys.private_pem, KEY_ID, TEAM_ID).with_endpoint("api.push.apple.com"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("--apns-endpoint:"), "{err}");
    let err = ApnsConfig::from_key_file("/nonexistent/key.p8", KEY_ID, TEAM_ID)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("--apns-key-file: cannot read"), "{err}");
}
