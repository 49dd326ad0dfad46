//! Pushes per second to the local fake APNs over one HTTP/2 connection:
//! first the APNs client alone (N sends, C in flight), then the whole
//! gateway (durable outbox, dispatch, batched completion).
//!
//! `cargo run --release -p tether-push-gateway --example apns_throughput [N] [C]`
//! (defaults: 50000 pushes, 256 in flight). Needs the `openssl` CLI.

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use tether_push_gateway::{
    ApnsClient, ApnsConfig, Device, Gateway, GatewayConfig, NewPushJob, Notification, Outcome,
    Platform, Provider, PushJob, Store,
};
use tether_tests::fakes::{FakeApns, FakeApnsConfig, keys};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "com.example.tether";

fn device(i: usize) -> Device {
    Device {
        device_id: format!("d{i}"),
        user: "bench".into(),
        platform: Platform::Apns,
        token: format!("{i:016x}{}", "ab".repeat(24)).into(),
        topic: None,
        sandbox: false,
        updated_at: 0,
    }
}

fn notification() -> Notification {
    Notification {
        title: Some("New message".into()),
        body: Some("You have a new message".into()),
        data: Some(serde_json::json!({"thread": "t-1"})),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(50_000), |a| a.parse())?;
    let c: usize = args.next().map_or(Ok(256), |a| a.parse())?;

    let keys = keys::es256_pair()?;
    let fake = FakeApns::start(FakeApnsConfig {
        public_key_pem: keys.public_pem.clone(),
        key_id: "KEY1234567".into(),
        team_id: "TEAM123456".into(),
        topic: TOPIC.into(),
    })
    .await?;
    let client = Arc::new(ApnsClient::new(
        ApnsConfig::new(keys.private_pem, "KEY1234567", "TEAM123456")
            .with_topic(TOPIC)
            .with_endpoint(fake.url()),
    )?);

    // 1. The client alone.
    let jobs: Arc<Vec<PushJob>> = Arc::new(
        (0..n)
            .map(|i| {
                let d = device(i);
                PushJob {
                    id: i as u64,
                    spec: NewPushJob {
                        device_id: d.device_id,
                        user: d.user,
                        platform: d.platform,
                        token: d.token,
                        topic: None,
                        sandbox: false,
                        notification: notification(),
                        channel: "user:bench".into(),
                        offset: i as u64,
                        created_at: 0,
                        count: 0,
                    },
                }
            })
            .collect(),
    );
    // Warm up: the connection and the JWT.
    ensure!(
        client.send(&jobs[0]).await == Outcome::Delivered,
        "warm-up failed"
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..c {
        let (client, jobs, next) = (client.clone(), jobs.clone(), next.clone());
        workers.spawn(async move {
            let mut failed = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                if client.send(job).await != Outcome::Delivered {
                    failed += 1;
                }
            }
            failed
        });
    }
    let mut failed = 0;
    while let Some(r) = workers.join_next().await {
        failed += r?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "client:  {n} pushes, {c} in flight, {secs:.2} s → {:.0} pushes/s ({failed} failed)",
        n as f64 / secs
    );
    println!(
        "         JWTs signed: {}, distinct JWTs at the fake: {}, TCP connections: {}",
        client.tokens_signed(),
        fake.distinct_jwts(),
        fake.connections()
    );

    // 2. The gateway: outbox → dispatch → provider → batched completion.
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let (tx, mut rx) = mpsc::channel(n + 16);
    let shutdown = CancellationToken::new();
    let gateway = Gateway::start(
        store,
        vec![client.clone() as Arc<dyn Provider>],
        GatewayConfig {
            max_concurrency_per_provider: c,
            ..GatewayConfig::default()
        },
        tx,
        shutdown.clone(),
    );
    let before = fake.accepted().len();
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|&i| NewPushJob::for_device(&device(i), notification(), "user:bench", i as u64))
            .collect();
        gateway.enqueue(batch).await?;
    }
    let enqueued = started.elapsed().as_secs_f64();
    fake.wait_accepted(before + n, Duration::from_secs(300))
        .await?;
    let mut outcomes = 0;
    while outcomes < n {
        if rx.recv().await.is_some() {
            outcomes += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "gateway: {n} pushes (enqueued in batches of 1000 in {enqueued:.2} s), {secs:.2} s → {:.0} pushes/s, outbox left: {}",
        n as f64 / secs,
        gateway.outbox_depth().await?
    );
    shutdown.cancel();
    gateway.stopped().await;
    Ok(())
}
