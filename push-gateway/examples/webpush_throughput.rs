//! What Web Push costs: first the per-push crypto alone (a fresh P-256 key,
//! ECDH, HKDF and AES-128-GCM for a typical payload: RFC 8291), then pushes
//! per second through the Web Push client to the local fake push service
//! (HTTP/1.1, which decrypts and verifies every message in the same
//! process, so the figure includes the fake's own work).
//!
//! `cargo run --release -p tether-push-gateway --example webpush_throughput [N] [C]`
//! (defaults: 20000 pushes, 64 in flight). Needs the `openssl` CLI.

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, ensure};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tether_push_gateway::types::{DeviceToken, WebPushKeys, WebPushSubscription};
use tether_push_gateway::webpush::ece;
use tether_push_gateway::{
    NewPushJob, Notification, Outcome, Platform, Provider, PushJob, WebPushClient, WebPushConfig,
};
use tether_tests::fakes::{FakeWebPush, keys};

fn job(i: u64, sub: &WebPushSubscription) -> PushJob {
    NewPushJob {
        device_id: format!("b{i}"),
        user: "bench".into(),
        platform: Platform::WebPush,
        token: DeviceToken::WebPush(sub.clone()),
        topic: None,
        sandbox: false,
        notification: Notification {
            title: Some("New message".into()),
            body: Some("You have a new message from Bob: see you at eight?".into()),
            data: Some(serde_json::json!({"chat": 42, "kind": "message"})),
            ..Default::default()
        },
        channel: "user:bench".into(),
        offset: i,
        created_at: 0,
        count: 0,
    }
    .with_id(i)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map_or(Ok(20_000), |a| a.parse())?;
    let c: usize = args.next().map_or(Ok(64), |a| a.parse())?;

    let pair = keys::es256_pair_fresh()?;
    let client = Arc::new(WebPushClient::new(WebPushConfig::new(
        pair.private_pem.clone(),
        "mailto:bench@example.com",
    ))?);
    let server_key = URL_SAFE_NO_PAD.decode(client.public_key())?;
    let fake = FakeWebPush::start(Some(server_key)).await?;
    let s = fake.subscribe()?;
    let sub = WebPushSubscription {
        endpoint: s.endpoint.clone(),
        keys: WebPushKeys {
            p256dh: s.p256dh.clone(),
            auth: s.auth.clone(),
        },
    };

    // The crypto alone, on one core.
    let plaintext = serde_json::to_vec(&tether_push_gateway::webpush::payload(&job(1, &sub)))?;
    let p256dh = URL_SAFE_NO_PAD.decode(&sub.keys.p256dh)?;
    let auth = URL_SAFE_NO_PAD.decode(&sub.keys.auth)?;
    let rounds = 20_000;
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(ece::encrypt(&plaintext, &p256dh, &auth)?);
    }
    let per = t.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
    println!(
        "encryption: {per:.1} µs per push ({} byte payload, {} byte message)",
        plaintext.len(),
        plaintext.len() + ece::OVERHEAD
    );

    // Through the client to the decrypting fake, C in flight.
    let t = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..c {
        let client = client.clone();
        let next = next.clone();
        let sub = sub.clone();
        tasks.spawn(async move {
            let mut ok = 0u64;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break ok;
                }
                if client.send(&job(i, &sub)).await == Outcome::Delivered {
                    ok += 1;
                }
            }
        });
    }
    let mut delivered = 0;
    while let Some(r) = tasks.join_next().await {
        delivered += r?;
    }
    let secs = t.elapsed().as_secs_f64();
    ensure!(delivered == n, "{delivered} of {n} delivered");
    println!(
        "client → decrypting fake: {n} pushes in {secs:.2} s = {:.0}/s ({c} in flight)",
        n as f64 / secs
    );
    Ok(())
}
