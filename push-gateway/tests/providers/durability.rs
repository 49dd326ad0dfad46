//! The outbox survives the provider being down and the gateway restarting:
//! every job is delivered exactly once.

use std::time::Duration;

use tether_push_gateway::{GatewayEvent, Platform, Store};

use crate::common::*;

#[tokio::test]
async fn jobs_enqueued_while_apns_is_down_are_delivered_once_after_a_restart() {
    let (fake, client) = apns().await.unwrap();
    fake.stop_listening().await;
    let dir = tempfile::tempdir().unwrap();
    let n = 40u32;
    let jobs: Vec<_> = (0..n)
        .map(|i| {
            let dev = device(&format!("d{i}"), "quinn", Platform::Apns, apns_token(i));
            job(&dev, alert("x"), u64::from(i) + 1)
        })
        .collect();

    // First life: the provider refuses connections; jobs are retried.
    {
        let store = Store::open(dir.path()).unwrap();
        let mut run = start(store, Some(client.clone()), None, fast_config());
        let ids = run.gateway.enqueue(jobs).await.unwrap();
        assert_eq!(ids.len(), n as usize);
        let retry = run
            .event(|e| {
                matches!(
                    e,
                    GatewayEvent::Outcome {
                        outcome: "retry",
                        ..
                    }
                )
            })
            .await
            .unwrap();
        assert!(matches!(
            retry,
            GatewayEvent::Outcome { reason: Some(ref r), .. } if r == "connect"
        ));
        assert_eq!(run.gateway.outbox_depth().await.unwrap(), u64::from(n));
        run.stop().await.unwrap();
        // Gateway and store handles drop here: the database file is closed.
    }
    assert!(fake.accepted().is_empty());

    // Second life: same data directory, provider up.
    fake.resume_listening().await.unwrap();
    let store = Store::open(dir.path()).unwrap();
    let run = start(store, Some(client), None, fast_config());
    let accepted = fake.wait_accepted(n as usize, WAIT).await.unwrap();
    assert_eq!(accepted.len(), n as usize);
    let deadline = tokio::time::Instant::now() + WAIT;
    while run.gateway.outbox_depth().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "outbox not drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing is left to send, so nothing more can arrive: exactly once.
    let per_id = fake.accepted_per_id();
    assert_eq!(per_id.len(), n as usize);
    assert!(per_id.values().all(|&c| c == 1), "{per_id:?}");
    let mut offsets: Vec<u64> = accepted
        .iter()
        .map(|a| a.payload["offset"].as_u64().unwrap())
        .collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=u64::from(n)).collect::<Vec<_>>());
    run.stop().await.unwrap();
}

#[tokio::test]
async fn jobs_for_an_unconfigured_provider_fail_and_do_not_linger() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let dev = device("d", "rita", Platform::Fcm, "tok".into());
    let mut run = start(store.clone(), None, None, fast_config());
    run.gateway
        .enqueue(vec![job(&dev, alert("x"), 1)])
        .await
        .unwrap();
    let e = run
        .event(|e| matches!(e, GatewayEvent::Outcome { .. }))
        .await
        .unwrap();
    assert!(matches!(
        e,
        GatewayEvent::Outcome { outcome: "failed", reason: Some(ref r), .. } if r == "ProviderNotConfigured"
    ));
    assert_eq!(run.gateway.outbox_depth().await.unwrap(), 0);
    assert_eq!(store.failed_total().await.unwrap(), 1);
    run.stop().await.unwrap();
}
