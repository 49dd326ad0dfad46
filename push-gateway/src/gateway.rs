//! The delivery loop: takes due jobs from the durable outbox, sends them
//! through the providers with bounded concurrency, and records what
//! happened (delivered → removed; retry → rescheduled with jittered
//! exponential backoff, never before `Retry-After`; dead token → device
//! removed; failure → failed table).
//!
//! One task ([`Gateway::start`]) owns the dispatch: it counts the sends in
//! flight per provider (at most `max_concurrency_per_provider` each; the
//! counter is owned by that task, so no semaphore is needed), runs each send
//! as a task in a `JoinSet`, and applies finished sends in batches, one
//! store transaction per batch. It sleeps until the next job is due, or
//! until [`Gateway::enqueue`] wakes it (a `Notify`), or until a send
//! finishes.
//!
//! Metrics: every send's outcome, and every device removal, is offered to
//! the `events` channel with `try_send` (never blocking delivery; when the
//! channel is full the event is dropped and counted in
//! [`Gateway::events_dropped`]). The broker turns them into counters.
//!
//! Shutdown: when the token is cancelled the loop stops taking jobs, waits
//! up to `shutdown_grace` for the sends in flight and records them; sends
//! still running then are abandoned. Every job not recorded as done stays in
//! the outbox and is sent again on the next start (at-least-once delivery:
//! a send cut off after the provider got it is repeated, with the same
//! `apns-id`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::SeedableRng;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::retry_delay;
use crate::outcome::Outcome;
use crate::provider::Provider;
use crate::store::{OutboxEntry, Resolution, Store, StoreError};
use crate::types::{NewPushJob, Platform, unix_now_ms};

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Sends in flight per provider (all multiplexed on one HTTP/2
    /// connection; APNs allows ~1000 streams). Each costs a task and a job.
    pub max_concurrency_per_provider: usize,
    /// Attempts per job before it is recorded as failed.
    pub max_attempts: u32,
    /// First retry delay (before jitter).
    pub base_backoff: Duration,
    /// Largest retry delay (before `Retry-After`).
    pub max_backoff: Duration,
    /// Time limit for one send, on top of the providers' own timeouts.
    pub send_timeout: Duration,
    /// How long shutdown waits for sends in flight.
    pub shutdown_grace: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_concurrency_per_provider: 64,
            max_attempts: 8,
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            send_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// What the gateway reports, for metrics and caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayEvent {
    /// One send attempt finished. `outcome` is `delivered`, `retry`,
    /// `dead_token` or `failed` (a retry on the last allowed attempt is
    /// reported as `failed` with reason `RetriesExhausted`); `reason` is
    /// low-cardinality (fit for a metric label).
    Outcome {
        platform: Platform,
        outcome: &'static str,
        reason: Option<String>,
        job_id: u64,
    },
    /// A device was removed because its token is dead.
    DeviceRemoved {
        device_id: String,
        platform: Platform,
    },
}

/// Wait at most this long without looking at the outbox.
const MAX_IDLE: Duration = Duration::from_secs(60);
/// Pause after a store error before trying again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Jobs for an unconfigured provider resolved per round.
const UNCONFIGURED_BATCH: usize = 256;
/// Finished sends recorded per store transaction, at most.
const SETTLE_BATCH: usize = 1024;

/// Handle to a running gateway. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("store", &self.shared.store)
            .finish_non_exhaustive()
    }
}

struct Shared {
    store: Store,
    clock: Clock,
    wake: Notify,
    stopped: CancellationToken,
    events_dropped: AtomicU64,
}

/// Unix milliseconds measured on tokio's monotonic clock from a wall-clock
/// start: immune to wall-clock jumps while running, and follows paused time
/// in tests.
#[derive(Debug, Clone, Copy)]
struct Clock {
    base_ms: u64,
    start: Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            base_ms: unix_now_ms(),
            start: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.base_ms.saturating_add(elapsed)
    }

    fn instant_at(&self, at_ms: u64) -> Instant {
        self.start + Duration::from_millis(at_ms.saturating_sub(self.base_ms))
    }
}

impl Gateway {
    /// Starts the delivery task on the current tokio runtime. A provider
    /// left `None` is off: its jobs are recorded as failed
    /// (`ProviderNotConfigured`). The task ends when `shutdown` is
    /// cancelled; see [`Gateway::stopped`].
    pub fn start(
        store: Store,
        apns: Option<Arc<dyn Provider>>,
        fcm: Option<Arc<dyn Provider>>,
        config: GatewayConfig,
        events: mpsc::Sender<GatewayEvent>,
        shutdown: CancellationToken,
    ) -> Gateway {
        let shared = Arc::new(Shared {
            store,
            clock: Clock::new(),
            wake: Notify::new(),
            stopped: CancellationToken::new(),
            events_dropped: AtomicU64::new(0),
        });
        for (slot, provider) in [(Platform::Apns, &apns), (Platform::Fcm, &fcm)] {
            if let Some(p) = provider
                && p.platform() != slot
            {
                tracing::warn!(slot = %slot, provider = %p.platform(), "provider in the wrong slot");
            }
        }
        let runner = Runner {
            shared: shared.clone(),
            providers: [apns, fcm],
            config,
            events,
            shutdown,
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            in_flight_ids: HashSet::new(),
            busy: [0, 0],
        };
        tokio::spawn(runner.run().instrument(tracing::info_span!("push_gateway")));
        Gateway { shared }
    }

    /// The store (devices API).
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Adds jobs to the durable outbox (one transaction) and wakes the
    /// delivery task. Returns the job ids. Accepted during shutdown too:
    /// the jobs are sent on the next start.
    pub async fn enqueue(&self, jobs: Vec<NewPushJob>) -> Result<Vec<u64>, StoreError> {
        let now = self.shared.clock.now_ms();
        let ids = self
            .shared
            .store
            .call(move |s| s.enqueue_blocking(jobs, now))
            .await?;
        self.shared.wake.notify_one();
        Ok(ids)
    }

    /// Jobs in the outbox: due, scheduled for a retry, or in flight.
    pub async fn outbox_depth(&self) -> Result<u64, StoreError> {
        self.shared.store.outbox_len().await
    }

    /// Events that could not be delivered because the channel was full.
    pub fn events_dropped(&self) -> u64 {
        self.shared.events_dropped.load(Ordering::Relaxed)
    }

    /// Resolves once the delivery task has ended (after shutdown).
    pub async fn stopped(&self) {
        self.shared.stopped.cancelled().await;
    }
}

fn index(p: Platform) -> usize {
    match p {
        Platform::Apns => 0,
        Platform::Fcm => 1,
    }
}

const PLATFORMS: [Platform; 2] = [Platform::Apns, Platform::Fcm];

struct Runner {
    shared: Arc<Shared>,
    providers: [Option<Arc<dyn Provider>>; 2],
    config: GatewayConfig,
    events: mpsc::Sender<GatewayEvent>,
    shutdown: CancellationToken,
    tasks: JoinSet<Outcome>,
    in_flight: HashMap<tokio::task::Id, OutboxEntry>,
    in_flight_ids: HashSet<u64>,
    busy: [usize; 2],
}

/// What one dispatch round found.
struct Round {
    /// When to look again, if anything is scheduled.
    next_at: Option<u64>,
}

impl Runner {
    async fn run(mut self) {
        // `stopped` fires however this task ends.
        let _stopped = self.shared.stopped.clone().drop_guard();
        tracing::debug!("push gateway started");
        let shutdown = self.shutdown.clone();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let deadline = match self.dispatch().await {
                Ok(round) => {
                    let idle = Instant::now() + MAX_IDLE;
                    round
                        .next_at
                        .map_or(idle, |at| self.shared.clock.instant_at(at).min(idle))
                }
                Err(e) => {
                    tracing::error!(error = %e, "push outbox unreadable");
                    Instant::now() + ERROR_PAUSE
                }
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.settle(done).await;
                }
                () = self.shared.wake.notified() => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
        self.drain().await;
        tracing::debug!("push gateway stopped");
    }

    /// Starts sends for due jobs while providers have room.
    async fn dispatch(&mut self) -> Result<Round, StoreError> {
        let now = self.shared.clock.now_ms();
        let mut room = [0usize; 2];
        for p in PLATFORMS {
            let i = index(p);
            room[i] = match self.providers[i] {
                Some(_) => self
                    .config
                    .max_concurrency_per_provider
                    .saturating_sub(self.busy[i]),
                None => UNCONFIGURED_BATCH,
            };
        }
        let skip = self.in_flight_ids.clone();
        let found = self
            .shared
            .store
            .call(move |s| {
                let mut out = Vec::with_capacity(2);
                for p in PLATFORMS {
                    let limit = room[index(p)];
                    if limit == 0 {
                        // Full: a finishing send wakes the loop.
                        out.push((Vec::new(), None));
                    } else {
                        out.push(s.scan_due(p, now, limit, &skip)?);
                    }
                }
                Ok(out)
            })
            .await?;
        let mut next_at: Option<u64> = None;
        let mut unconfigured = Vec::new();
        for (p, (entries, next)) in PLATFORMS.into_iter().zip(found) {
            if let Some(at) = next {
                next_at = Some(next_at.map_or(at, |n| n.min(at)));
            }
            let i = index(p);
            let Some(provider) = self.providers[i].clone() else {
                unconfigured.extend(entries);
                continue;
            };
            for entry in entries {
                self.spawn_send(i, provider.clone(), entry);
            }
        }
        if !unconfigured.is_empty() {
            let resolutions: Vec<Resolution> = unconfigured
                .iter()
                .map(|e| Resolution::Fail {
                    id: e.job.id,
                    attempts: e.attempts,
                    reason: "ProviderNotConfigured".into(),
                })
                .collect();
            self.shared
                .store
                .call(move |s| s.apply_blocking(resolutions))
                .await?;
            for e in &unconfigured {
                tracing::warn!(job = e.job.id, platform = %e.job.spec.platform, "push provider not configured");
                self.emit(GatewayEvent::Outcome {
                    platform: e.job.spec.platform,
                    outcome: "failed",
                    reason: Some("ProviderNotConfigured".into()),
                    job_id: e.job.id,
                });
            }
            // There may be more of them: look again at once.
            next_at = Some(now);
        }
        Ok(Round { next_at })
    }

    fn spawn_send(&mut self, i: usize, provider: Arc<dyn Provider>, entry: OutboxEntry) {
        let job = entry.job.clone();
        let limit = self.config.send_timeout;
        let span = tracing::debug_span!("push", job = job.id, device = %job.spec.device_id, platform = %job.spec.platform);
        let handle = self.tasks.spawn(
            async move {
                match tokio::time::timeout(limit, provider.send(&job)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Outcome::retry("timeout"),
                }
            }
            .instrument(span),
        );
        self.in_flight_ids.insert(entry.job.id);
        self.in_flight.insert(handle.id(), entry);
        self.busy[i] += 1;
    }

    /// Records finished sends: `first`, and any others already finished.
    async fn settle(&mut self, first: Result<(tokio::task::Id, Outcome), tokio::task::JoinError>) {
        let mut done = vec![first];
        while done.len() < SETTLE_BATCH {
            match self.tasks.try_join_next_with_id() {
                Some(r) => done.push(r),
                None => break,
            }
        }
        let now = self.shared.clock.now_ms();
        let mut resolutions = Vec::with_capacity(done.len() + 4);
        let mut events = Vec::with_capacity(done.len());
        let mut dead: HashMap<String, Platform> = HashMap::new();
        let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
        for result in done {
            let (task_id, outcome) = match result {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "push send task failed");
                    (e.id(), Outcome::retry("panic"))
                }
            };
            let Some(entry) = self.in_flight.remove(&task_id) else {
                continue;
            };
            self.in_flight_ids.remove(&entry.job.id);
            let i = index(entry.job.spec.platform);
            self.busy[i] = self.busy[i].saturating_sub(1);
            let job = &entry.job;
            let attempts = entry.attempts.saturating_add(1);
            let mut reason = outcome.reason().map(str::to_owned);
            let mut label = outcome.label();
            match outcome {
                Outcome::Delivered => {
                    tracing::debug!(job = job.id, attempts, "push delivered");
                    resolutions.push(Resolution::Complete { id: job.id });
                }
                Outcome::DeadToken { reason } => {
                    tracing::info!(job = job.id, device = %job.spec.device_id, reason = %reason, "device token is dead");
                    dead.insert(job.spec.device_id.clone(), job.spec.platform);
                    resolutions.push(Resolution::RemoveDevice {
                        device_id: job.spec.device_id.clone(),
                        token: job.spec.token.clone(),
                    });
                    resolutions.push(Resolution::Complete { id: job.id });
                }
                Outcome::Failed { reason } => {
                    resolutions.push(Resolution::Fail {
                        id: job.id,
                        attempts,
                        reason,
                    });
                }
                Outcome::Retry { after, reason: why } => {
                    if attempts >= self.config.max_attempts {
                        tracing::warn!(job = job.id, attempts, reason = %why, "push retries exhausted");
                        label = "failed";
                        reason = Some("RetriesExhausted".into());
                        resolutions.push(Resolution::Fail {
                            id: job.id,
                            attempts,
                            reason: format!("RetriesExhausted: {why}"),
                        });
                    } else {
                        let delay = retry_delay(
                            after,
                            attempts,
                            self.config.base_backoff,
                            self.config.max_backoff,
                            &mut rng,
                        );
                        tracing::debug!(job = job.id, attempts, reason = %why, ?delay, "push retry scheduled");
                        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                        resolutions.push(Resolution::Reschedule {
                            id: job.id,
                            at_ms: now.saturating_add(delay_ms),
                            attempts,
                            reason: why,
                        });
                    }
                }
            }
            events.push(GatewayEvent::Outcome {
                platform: job.spec.platform,
                outcome: label,
                reason,
                job_id: job.id,
            });
        }
        let applied = self
            .shared
            .store
            .call(move |s| s.apply_blocking(resolutions))
            .await;
        for e in events {
            self.emit(e);
        }
        match applied {
            Ok(applied) => {
                for device_id in applied.removed_devices {
                    let platform = dead.get(&device_id).copied().unwrap_or(Platform::Apns);
                    self.emit(GatewayEvent::DeviceRemoved {
                        device_id,
                        platform,
                    });
                }
            }
            Err(e) => {
                // The jobs stay due in the outbox and are sent again.
                tracing::error!(error = %e, "cannot record push outcomes");
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }

    /// Waits (bounded) for the sends in flight and records them.
    async fn drain(&mut self) {
        if self.tasks.is_empty() {
            return;
        }
        tracing::info!(
            in_flight = self.tasks.len(),
            "push gateway: finishing sends in flight"
        );
        let deadline = Instant::now() + self.config.shutdown_grace;
        while !self.tasks.is_empty() {
            tokio::select! {
                Some(done) = self.tasks.join_next_with_id() => self.settle(done).await,
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        abandoned = self.tasks.len(),
                        "push sends still in flight at the end of the grace period; they stay in the outbox"
                    );
                    self.tasks.abort_all();
                    break;
                }
            }
        }
    }

    fn emit(&self, event: GatewayEvent) {
        if self.events.try_send(event).is_err() && !self.events.is_closed() {
            self.shared.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use super::*;
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
            token: "ab".repeat(32),
            topic: None,
            sandbox: false,
            updated_at: 0,
        };
        NewPushJob::for_device(&device, Notification::default(), "user:u", i)
    }

    struct Harness {
        gateway: Gateway,
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
                store,
                apns.map(|p| p as Arc<dyn Provider>),
                fcm.map(|p| p as Arc<dyn Provider>),
                config,
                tx,
                shutdown.clone(),
            );
            Self {
                gateway,
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
                    GatewayEvent::DeviceRemoved { .. } => {}
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
        assert_eq!(h.gateway.store().failed_total().await.unwrap(), 1);
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
}
