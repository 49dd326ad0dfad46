//! The delivery loop: claims due jobs from the durable queue, sends them
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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use parking_lot::Mutex;

use crate::coalesce::Coalescer;
use crate::devices::DeviceRegistry;
use crate::provider::Provider;
use crate::queue::{PushQueue, QueueError};
use crate::store::Store;
use crate::types::{NewPushJob, Platform, unix_now_ms};
use runner::Runner;

mod runner;

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
    /// Longest time between two looks at the queue when nothing wakes the
    /// gateway (jobs enqueued on this node wake it; a queue shared by
    /// several nodes wants a short one).
    pub max_idle: Duration,
    /// Push coalescing ([`crate::coalesce`]): at most one push per device
    /// and collapse key per window. `None`: every publication is pushed.
    pub coalesce_window: Option<Duration>,
    /// Coalescing windows open at once, at most; past that, jobs for new
    /// keys are pushed uncoalesced.
    pub coalesce_max_keys: usize,
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
            max_idle: Duration::from_secs(60),
            coalesce_window: None,
            coalesce_max_keys: crate::coalesce::DEFAULT_MAX_KEYS,
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
    /// A push was held back by coalescing (it goes out, summed up with the
    /// others of its window, when the window closes).
    Coalesced { platform: Platform },
}

/// What the gateway reads and writes: the job queue, and the device
/// registry it prunes dead tokens from.
#[derive(Clone)]
pub struct Backend {
    pub queue: Arc<dyn PushQueue>,
    pub devices: Arc<dyn DeviceRegistry>,
}

impl From<Store> for Backend {
    /// A single node: both in the one redb store.
    fn from(store: Store) -> Self {
        Backend {
            queue: Arc::new(store.clone()),
            devices: Arc::new(store),
        }
    }
}

/// Handle to a running gateway. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

struct Shared {
    backend: Backend,
    clock: Clock,
    wake: Notify,
    stopped: CancellationToken,
    events: mpsc::Sender<GatewayEvent>,
    events_dropped: AtomicU64,
    /// Open coalescing windows, when coalescing is on. Never held across
    /// an `.await`.
    coalescer: Option<Mutex<Coalescer>>,
}

impl Shared {
    fn emit(&self, event: GatewayEvent) {
        if self.events.try_send(event).is_err() && !self.events.is_closed() {
            self.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
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
    /// Starts the delivery task on the current tokio runtime with the
    /// given providers (one per platform; a second for the same platform is
    /// ignored). A platform without a provider is off: its jobs are
    /// recorded as failed (`ProviderNotConfigured`). The task ends when
    /// `shutdown` is cancelled; see [`Gateway::stopped`].
    pub fn start(
        backend: impl Into<Backend>,
        providers: Vec<Arc<dyn Provider>>,
        config: GatewayConfig,
        events: mpsc::Sender<GatewayEvent>,
        shutdown: CancellationToken,
    ) -> Gateway {
        let coalescer = config.coalesce_window.map(|w| {
            let ms = u64::try_from(w.as_millis()).unwrap_or(u64::MAX);
            Mutex::new(Coalescer::new(ms, config.coalesce_max_keys))
        });
        let shared = Arc::new(Shared {
            backend: backend.into(),
            clock: Clock::new(),
            wake: Notify::new(),
            stopped: CancellationToken::new(),
            events,
            events_dropped: AtomicU64::new(0),
            coalescer,
        });
        let mut slots: [Option<Arc<dyn Provider>>; 3] = [None, None, None];
        for p in providers {
            let slot = &mut slots[p.platform().index()];
            if slot.is_some() {
                tracing::warn!(platform = %p.platform(), "a second provider for one platform is ignored");
                continue;
            }
            *slot = Some(p);
        }
        let runner = Runner {
            shared: shared.clone(),
            providers: slots,
            config,
            shutdown,
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            busy: [0; 3],
        };
        tokio::spawn(runner.run().instrument(tracing::info_span!("push_gateway")));
        Gateway { shared }
    }

    /// Adds jobs to the durable queue and wakes the delivery task. Returns
    /// the ids of the jobs queued now: with coalescing on, a job held back
    /// has none yet (its window's summary is queued when the window
    /// closes). Accepted during shutdown too: the jobs are sent on the next
    /// start.
    pub async fn enqueue(&self, jobs: Vec<NewPushJob>) -> Result<Vec<u64>, QueueError> {
        let now = self.shared.clock.now_ms();
        let jobs = match &self.shared.coalescer {
            None => jobs,
            Some(coalescer) => {
                let mut held = Vec::new();
                let out = {
                    let mut c = coalescer.lock();
                    // Summaries already due go first, so order holds.
                    let mut out = c.due(now);
                    for job in jobs {
                        let platform = job.platform;
                        match c.offer(job, now) {
                            Some(j) => out.push(j),
                            None => held.push(platform),
                        }
                    }
                    out
                };
                for platform in held {
                    self.shared.emit(GatewayEvent::Coalesced { platform });
                }
                out
            }
        };
        if jobs.is_empty() {
            // Held: the delivery task learns when the window closes.
            self.shared.wake.notify_one();
            return Ok(Vec::new());
        }
        let ids = self.shared.backend.queue.enqueue(jobs, now).await?;
        self.shared.wake.notify_one();
        Ok(ids)
    }

    /// Jobs in the queue: due, scheduled for a retry, or in flight.
    pub async fn outbox_depth(&self) -> Result<u64, QueueError> {
        self.shared.backend.queue.depth().await
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

#[cfg(test)]
mod tests;
