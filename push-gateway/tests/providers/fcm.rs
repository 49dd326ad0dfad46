//! FCM HTTP v1: OAuth grant, cached access token, message shape, answers.

use serde_json::{Value, json};
use tether_push_gateway::{
    FcmClient, FcmConfig, GatewayEvent, Notification, Outcome, Platform, Priority, Provider,
    ServiceAccount, Store,
};
use tether_tests::fakes::{FcmFault, keys};

use crate::common::*;

fn fcm_token(n: u32) -> String {
    format!("fcm-token:{n}_APA91b-x.y")
}

#[tokio::test]
async fn delivers_with_one_oauth_grant_and_string_data() {
    let (fake, client) = fcm().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let n = 50u32;
    let jobs = (0..n)
        .map(|i| {
            let dev = device(&format!("a{i}"), "lena", Platform::Fcm, fcm_token(i));
            let notification = Notification {
                title: Some("Hi".into()),
                body: Some("there".into()),
                data: Some(
                    json!({"num": 1.5, "flag": true, "s": "x", "obj": {"a": [1]}, "nil": null}),
                ),
                collapse_key: Some("ck".into()),
                ttl: Some(120),
                priority: Some(Priority::High),
                mode: None,
            };
            job(&dev, notification, u64::from(i) + 1)
        })
        .collect();
    let run = start(store, None, Some(client.clone()), fast_config());
    run.gateway.enqueue(jobs).await.unwrap();
    let accepted = fake.wait_accepted(n as usize, WAIT).await.unwrap();
    assert_eq!(fake.grants(), 1, "the access token is cached");
    assert_eq!(client.grants(), 1);
    assert_eq!(fake.refused_grants(), 0);
    for m in &accepted {
        let data = m.message["data"].as_object().unwrap();
        assert!(data.values().all(Value::is_string), "{data:?}");
        assert_eq!(data["num"], "1.5");
        assert_eq!(data["flag"], "true");
        assert_eq!(data["obj"], "{\"a\":[1]}");
        assert_eq!(data["nil"], "null");
        assert_eq!(data["channel"], "user:lena");
        assert!(data["offset"].as_str().unwrap().parse::<u64>().is_ok());
        assert_eq!(
            m.message["notification"],
            json!({"title": "Hi", "body": "there"})
        );
        let android = &m.message["android"];
        assert_eq!(android["priority"], "HIGH");
        assert_eq!(android["collapse_key"], "ck");
        let ttl = android["ttl"].as_str().unwrap();
        let secs: u64 = ttl.strip_suffix('s').unwrap().parse().unwrap();
        assert!((110..=120).contains(&secs), "{ttl}");
        assert_eq!(m.message["token"], m.token.as_str());
    }
    run.stop().await.unwrap();
}

#[tokio::test]
async fn unregistered_removes_the_device() {
    let (fake, client) = fcm().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let token = fcm_token(1);
    let dev = store
        .put_device(device("android-1", "mia", Platform::Fcm, token.clone()))
        .await
        .unwrap();
    fake.unregister(&token);
    let mut run = start(store.clone(), None, Some(client), fast_config());
    run.gateway
        .enqueue(vec![job(&dev, alert("x"), 1)])
        .await
        .unwrap();
    let GatewayEvent::Outcome {
        platform,
        outcome,
        reason,
        ..
    } = run
        .event(|e| matches!(e, GatewayEvent::Outcome { .. }))
        .await
        .unwrap()
    else {
        unreachable!()
    };
    assert_eq!(
        (platform, outcome, reason.as_deref()),
        (Platform::Fcm, "dead_token", Some("UNREGISTERED"))
    );
    run.event(|e| matches!(e, GatewayEvent::DeviceRemoved { .. }))
        .await
        .unwrap();
    assert!(store.get_device("android-1").await.unwrap().is_none());
    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].status, 404);
    run.stop().await.unwrap();
}

#[tokio::test]
async fn a_refused_access_token_is_replaced() {
    let (fake, client) = fcm().await.unwrap();
    let dev = device("d", "ned", Platform::Fcm, fcm_token(2));
    let push = push_job(&dev);
    assert_eq!(client.send(&push).await, Outcome::Delivered);
    fake.revoke_access_tokens();
    assert_eq!(
        client.send(&push).await,
        Outcome::Retry {
            after: Some(std::time::Duration::ZERO),
            reason: "UNAUTHENTICATED".into()
        }
    );
    assert_eq!(client.send(&push).await, Outcome::Delivered);
    assert_eq!(fake.grants(), 2);
    assert_eq!(client.grants(), 2);
}

#[tokio::test]
async fn server_errors_are_retried_honouring_retry_after() {
    let (fake, client) = fcm().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let dev = device("d", "olga", Platform::Fcm, fcm_token(3));
    fake.fail(
        FcmFault::Unavailable {
            retry_after: Some(1),
        },
        1,
    );
    fake.fail(FcmFault::Internal { retry_after: None }, 1);
    let mut run = start(store, None, Some(client), fast_config());
    run.gateway
        .enqueue(vec![job(&dev, alert("x"), 1)])
        .await
        .unwrap();
    fake.wait_accepted(1, WAIT).await.unwrap();
    let requests = fake.requests();
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        [503, 500, 200]
    );
    assert!(requests[1].at - requests[0].at >= std::time::Duration::from_secs(1));
    assert_eq!(
        run.outcomes(3).await.unwrap(),
        ["retry", "retry", "delivered"]
    );
    run.stop().await.unwrap();
}

#[tokio::test]
async fn a_grant_signed_by_another_key_is_refused() {
    let (fake, _) = fcm().await.unwrap();
    let other = keys::rsa_pair_fresh().unwrap();
    let account =
        ServiceAccount::from_json(&fake.service_account_json(&other.private_pem)).unwrap();
    let client = FcmClient::new(FcmConfig::new(account).with_endpoint(fake.url())).unwrap();
    let dev = device("d", "pat", Platform::Fcm, fcm_token(4));
    assert_eq!(
        client.send(&push_job(&dev)).await,
        Outcome::Failed {
            reason: "oauth_invalid_grant".into()
        }
    );
    assert_eq!((fake.grants(), fake.refused_grants()), (0, 1));
    assert!(fake.requests().is_empty());
}

fn push_job(dev: &tether_push_gateway::Device) -> tether_push_gateway::PushJob {
    serde_json::from_value(json!({
        "id": 5, "device_id": dev.device_id, "user": dev.user, "platform": dev.platform,
        "token": dev.token, "notification": {"body": "b", "data": {"x": 1}},
        "channel": "user:x", "offset": 9
    }))
    .unwrap()
}
