#![allow(clippy::unwrap_used)]
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

use super::*;
use crate::outcome::Outcome;
use crate::provider::SendFuture;
use crate::types::{Device, Notification, PushJob};

/// A provider that answers from a script (then `Delivered`), after
/// `delay`, and records when it was called.
struct Scripted {
    platform: Platform,
    delay: Duration,
    script: Mutex<VecDeque<Outcome>>,
    calls: Mutex<Vec<(u64, Instant)>>,
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Scripted {
    fn new(platform: Platform, delay: Duration, script: Vec<Outcome>) -> Arc<Self> {
        Arc::new(Self {
            platform,
            delay,
            script: Mutex::new(script.into()),
            calls: Mutex::new(Vec::new()),
            now: AtomicUsize::new(0),
            max: AtomicUsize::new(0),
        })
    }

    fn calls(&self) -> Vec<(u64, Instant)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Provider for Scripted {
    fn platform(&self) -> Platform {
        self.platform
    }

    fn send<'a>(&'a self, job: &'a PushJob) -> SendFuture<'a> {
        Box::pin(async move {
            self.calls.lock().unwrap().push((job.id, Instant::now()));
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            let next = self.script.lock().unwrap().pop_front();
            next.unwrap_or(Outcome::Delivered)
        })
    }
}

fn new_job(platform: Platform, i: u64) -> NewPushJob {
    let device = Device {
        device_id: format!("d{i}"),
        user: "u".into(),
        platform,
        token: "ab".repeat(32).into(),
        topic: None,
        sandbox: false,
        updated_at: 0,
    };
    NewPushJob::for_device(&device, Notification::default(), "user:u", i)
}

struct Harness {
    gateway: Gateway,
    store: Store,
    events: mpsc::Receiver<GatewayEvent>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn start(
        apns: Option<Arc<Scripted>>,
        fcm: Option<Arc<Scripted>>,
        config: GatewayConfig,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (tx, events) = mpsc::channel(1024);
        let shutdown = CancellationToken::new();
        let gateway = Gateway::start(
            store.clone(),
            [
                apns.map(|p| p as Arc<dyn Provider>),
                fcm.map(|p| p as Arc<dyn Provider>),
            ]
            .into_iter()
            .flatten()
            .collect(),
            config,
            tx,
            shutdown.clone(),
        );
        Self {
            gateway,
            store,
            events,
            shutdown,
            _dir: dir,
        }
    }

    async fn outcomes(&mut self, n: usize) -> Vec<&'static str> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.events.recv().await.unwrap() {
                GatewayEvent::Outcome { outcome, .. } => out.push(outcome),
                GatewayEvent::DeviceRemoved { .. } | GatewayEvent::Coalesced { .. } => {}
            }
        }
        out
    }
}

fn retry(after: Option<Duration>) -> Outcome {
    Outcome::Retry {
        after,
        reason: "x".into(),
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured() {
    let p = Scripted::new(
        Platform::Apns,
        Duration::ZERO,
        vec![retry(Some(Duration::from_secs(30)))],
    );
    let mut h = Harness::start(Some(p.clone()), None, GatewayConfig::default());
    h.gateway
        .enqueue(vec![new_job(Platform::Apns, 1)])
        .await
        .unwrap();
    assert_eq!(h.outcomes(2).await, ["retry", "delivered"]);
    let calls = p.calls();
    let gap = calls[1].1 - calls[0].1;
    assert!(
        gap >= Duration::from_secs(30) && gap < Duration::from_secs(31),
        "{gap:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_with_jitter() {
    let p = Scripted::new(Platform::Apns, Duration::ZERO, vec![retry(None); 5]);
    let mut h = Harness::start(Some(p.clone()), None, GatewayConfig::default());
    h.gateway
        .enqueue(vec![new_job(Platform::Apns, 1)])
        .await
        .unwrap();
    assert_eq!(
        h.outcomes(6).await,
        ["retry", "retry", "retry", "retry", "retry", "delivered"]
    );
    let calls = p.calls();
    let slack = Duration::from_millis(5);
    for (k, pair) in calls.windows(2).enumerate() {
        let gap = pair[1].1 - pair[0].1;
        let full = Duration::from_secs(1 << k);
        assert!(
            gap + slack >= full / 2 && gap <= full + slack,
            "retry {k}: {gap:?} not within {:?}..{full:?}",
            full / 2
        );
    }
}

#[tokio::test(start_paused = true)]
async fn refreshed_credentials_retry_at_once() {
    let p = Scripted::new(
        Platform::Fcm,
        Duration::ZERO,
        vec![retry(Some(Duration::ZERO))],
    );
    let mut h = Harness::start(None, Some(p.clone()), GatewayConfig::default());
    h.gateway
        .enqueue(vec![new_job(Platform::Fcm, 1)])
        .await
        .unwrap();
    assert_eq!(h.outcomes(2).await, ["retry", "delivered"]);
    let calls = p.calls();
    assert!(calls[1].1 - calls[0].1 < Duration::from_millis(10));
}

#[tokio::test(start_paused = true)]
async fn retries_are_bounded_by_max_attempts() {
    let p = Scripted::new(Platform::Apns, Duration::ZERO, vec![retry(None); 10]);
    let config = GatewayConfig {
        max_attempts: 4,
        ..GatewayConfig::default()
    };
    let mut h = Harness::start(Some(p.clone()), None, config);
    h.gateway
        .enqueue(vec![new_job(Platform::Apns, 1)])
        .await
        .unwrap();
    assert_eq!(h.outcomes(4).await, ["retry", "retry", "retry", "failed"]);
    assert_eq!(p.calls().len(), 4);
    assert_eq!(h.gateway.outbox_depth().await.unwrap(), 0);
    assert_eq!(h.store.failed_total().await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn concurrency_is_bounded_per_provider_and_providers_are_independent() {
    let apns = Scripted::new(Platform::Apns, Duration::from_secs(1), vec![]);
    let fcm = Scripted::new(Platform::Fcm, Duration::from_secs(1), vec![]);
    let config = GatewayConfig {
        max_concurrency_per_provider: 4,
        ..GatewayConfig::default()
    };
    let mut h = Harness::start(Some(apns.clone()), Some(fcm.clone()), config);
    let start = Instant::now();
    let mut jobs: Vec<_> = (0..20).map(|i| new_job(Platform::Apns, i)).collect();
    jobs.push(new_job(Platform::Fcm, 99));
    h.gateway.enqueue(jobs).await.unwrap();
    assert_eq!(h.outcomes(21).await.len(), 21);
    assert_eq!(apns.max.load(Ordering::SeqCst), 4);
    assert_eq!(apns.calls().len(), 20);
    // 20 sends of 1 s, 4 at a time: 5 s.
    let took = Instant::now() - start;
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(6),
        "{took:?}"
    );
    // The FCM job did not wait behind the APNs backlog.
    assert!(fcm.calls()[0].1 - start < Duration::from_millis(100));
    assert_eq!(h.gateway.outbox_depth().await.unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_sends_in_flight_within_the_grace_period() {
    let p = Scripted::new(Platform::Apns, Duration::from_secs(1), vec![]);
    let config = GatewayConfig {
        max_concurrency_per_provider: 1,
        shutdown_grace: Duration::from_secs(5),
        ..GatewayConfig::default()
    };
    let mut h = Harness::start(Some(p.clone()), None, config);
    h.gateway
        .enqueue((0..3).map(|i| new_job(Platform::Apns, i)).collect())
        .await
        .unwrap();
    while p.calls().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.shutdown.cancel();
    h.gateway.stopped().await;
    assert_eq!(h.outcomes(1).await, ["delivered"]);
    assert_eq!(p.calls().len(), 1, "no new sends after shutdown");
    assert_eq!(h.gateway.outbox_depth().await.unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn sends_outlasting_the_grace_period_stay_in_the_outbox() {
    let p = Scripted::new(Platform::Apns, Duration::from_secs(3600), vec![]);
    let config = GatewayConfig {
        shutdown_grace: Duration::from_secs(2),
        send_timeout: Duration::from_secs(7200),
        ..GatewayConfig::default()
    };
    let h = Harness::start(Some(p.clone()), None, config);
    h.gateway
        .enqueue((0..3).map(|i| new_job(Platform::Apns, i)).collect())
        .await
        .unwrap();
    while p.calls().len() < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = Instant::now();
    h.shutdown.cancel();
    h.gateway.stopped().await;
    let took = Instant::now() - start;
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(h.gateway.outbox_depth().await.unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_send_that_hangs_times_out_as_a_retry() {
    let p = Scripted::new(Platform::Apns, Duration::from_secs(3600), vec![]);
    let config = GatewayConfig {
        send_timeout: Duration::from_secs(10),
        ..GatewayConfig::default()
    };
    let mut h = Harness::start(Some(p), None, config);
    h.gateway
        .enqueue(vec![new_job(Platform::Apns, 1)])
        .await
        .unwrap();
    match h.events.recv().await.unwrap() {
        GatewayEvent::Outcome {
            outcome, reason, ..
        } => {
            assert_eq!(outcome, "retry");
            assert_eq!(reason.as_deref(), Some("timeout"));
        }
        other => panic!("{other:?}"),
    }
}
