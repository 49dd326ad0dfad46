//! The gateway's delivery task: claims due jobs per provider while it has
//! room, runs each send as a task, and settles finished sends in batches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{GatewayConfig, GatewayEvent, Shared};
use crate::backoff::retry_delay;
use crate::outcome::Outcome;
use crate::provider::Provider;
use crate::queue::{OutboxEntry, QueueError, Settlement};
use crate::types::Platform;

/// Pause after a queue error before trying again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Jobs for an unconfigured provider resolved per round.
const UNCONFIGURED_BATCH: usize = 256;
/// Finished sends settled per queue write, at most.
const SETTLE_BATCH: usize = 1024;

fn index(p: Platform) -> usize {
    p.index()
}

const PLATFORMS: [Platform; 3] = Platform::ALL;

pub(super) struct Runner {
    pub(super) shared: Arc<Shared>,
    pub(super) providers: [Option<Arc<dyn Provider>>; 3],
    pub(super) config: GatewayConfig,
    pub(super) shutdown: CancellationToken,
    pub(super) tasks: JoinSet<Outcome>,
    /// The job each send task carries.
    pub(super) in_flight: HashMap<tokio::task::Id, OutboxEntry>,
    /// Sends in flight per provider.
    pub(super) busy: [usize; 3],
}

/// What one dispatch round found.
struct Round {
    /// When to look again, if anything is scheduled.
    next_at: Option<u64>,
}

impl Runner {
    pub(super) async fn run(mut self) {
        // `stopped` fires however this task ends.
        let _stopped = self.shared.stopped.clone().drop_guard();
        tracing::debug!("push gateway started");
        let shutdown = self.shutdown.clone();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let summaries_due = self.queue_summaries().await;
            let deadline = match self.dispatch().await {
                Ok(round) => {
                    let idle = Instant::now() + self.config.max_idle;
                    let next_at = match (round.next_at, summaries_due) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    next_at.map_or(idle, |at| self.shared.clock.instant_at(at).min(idle))
                }
                Err(e) => {
                    tracing::error!(error = %e, "push queue unreadable");
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
        // What coalescing holds goes to the durable outbox: sent on the
        // next start (or by another node of a cluster).
        let held = match &self.shared.coalescer {
            Some(c) => c.lock().drain(),
            None => Vec::new(),
        };
        if !held.is_empty() {
            let n = held.len();
            let now = self.shared.clock.now_ms();
            match self.shared.backend.queue.enqueue(held, now).await {
                Ok(_) => tracing::info!(pushes = n, "coalesced pushes held at shutdown are queued"),
                Err(e) => {
                    tracing::error!(error = %e, pushes = n, "coalesced pushes held at shutdown are lost")
                }
            }
        }
        self.drain().await;
        tracing::debug!("push gateway stopped");
    }

    /// Queues the coalescing summaries whose window has closed; returns
    /// when the next window closes.
    async fn queue_summaries(&mut self) -> Option<u64> {
        let coalescer = self.shared.coalescer.as_ref()?;
        let now = self.shared.clock.now_ms();
        let (due, next) = {
            let mut c = coalescer.lock();
            let due = c.due(now);
            (due, c.next_due())
        };
        if !due.is_empty() {
            let n = due.len();
            if let Err(e) = self.shared.backend.queue.enqueue(due, now).await {
                // Nothing to hand them back to: the publications are in
                // their channels' history, only the summary push is lost.
                tracing::error!(error = %e, pushes = n, "coalesced pushes could not be queued");
            }
        }
        next
    }

    /// Starts sends for due jobs while providers have room.
    async fn dispatch(&mut self) -> Result<Round, QueueError> {
        let now = self.shared.clock.now_ms();
        let queue = self.shared.backend.queue.clone();
        let mut next_at: Option<u64> = None;
        let mut unconfigured = Vec::new();
        for p in PLATFORMS {
            let i = index(p);
            let room = match self.providers[i] {
                Some(_) => self
                    .config
                    .max_concurrency_per_provider
                    .saturating_sub(self.busy[i]),
                None => UNCONFIGURED_BATCH,
            };
            if room == 0 {
                // Full: a finishing send wakes the loop.
                continue;
            }
            let claimed = queue.claim(p, now, room).await?;
            if let Some(at) = claimed.next_at {
                next_at = Some(next_at.map_or(at, |n| n.min(at)));
            }
            let Some(provider) = self.providers[i].clone() else {
                unconfigured.extend(claimed.jobs);
                continue;
            };
            for entry in claimed.jobs {
                self.spawn_send(i, provider.clone(), entry);
            }
        }
        if !unconfigured.is_empty() {
            let failed: Vec<Settlement> = unconfigured
                .iter()
                .map(|e| Settlement::Fail {
                    id: e.job.id,
                    attempts: e.attempts,
                    reason: "ProviderNotConfigured".into(),
                })
                .collect();
            queue.settle(failed).await?;
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
        let mut settlements = Vec::with_capacity(done.len());
        let mut events = Vec::with_capacity(done.len());
        let mut dead: Vec<(String, crate::types::DeviceToken, Platform)> = Vec::new();
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
            let i = index(entry.job.spec.platform);
            self.busy[i] = self.busy[i].saturating_sub(1);
            let job = &entry.job;
            let attempts = entry.attempts.saturating_add(1);
            let mut reason = outcome.reason().map(str::to_owned);
            let mut label = outcome.label();
            match outcome {
                Outcome::Delivered => {
                    tracing::debug!(job = job.id, attempts, "push delivered");
                    settlements.push(Settlement::Ack { id: job.id });
                }
                Outcome::DeadToken { reason } => {
                    tracing::info!(job = job.id, device = %job.spec.device_id, reason = %reason, "device token is dead");
                    dead.push((
                        job.spec.device_id.clone(),
                        job.spec.token.clone(),
                        job.spec.platform,
                    ));
                    settlements.push(Settlement::Ack { id: job.id });
                }
                Outcome::Failed { reason } => {
                    settlements.push(Settlement::Fail {
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
                        settlements.push(Settlement::Fail {
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
                        settlements.push(Settlement::RetryAt {
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
        let backend = &self.shared.backend;
        let settled = backend.queue.settle(settlements).await;
        for e in events {
            self.emit(e);
        }
        if let Err(e) = settled {
            // The jobs stay in the queue and are sent again.
            tracing::error!(error = %e, "cannot record push outcomes");
            tokio::time::sleep(ERROR_PAUSE).await;
        }
        // A device registered again meanwhile (with another token) is kept
        // by `remove_dead`.
        for (device_id, token, platform) in dead {
            match backend.devices.remove_dead(&device_id, &token).await {
                Ok(true) => self.emit(GatewayEvent::DeviceRemoved {
                    device_id,
                    platform,
                }),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot remove a device with a dead token"),
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
        self.shared.emit(event);
    }
}
