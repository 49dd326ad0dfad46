//! The push job queue seam: what the gateway needs of a durable queue of
//! push jobs. [`crate::Store`] (redb, one node) implements it; a cluster
//! keeps the queue in Redis (a Stream with a consumer group) behind the
//! same trait.
//!
//! A job is [`PushQueue::enqueue`]d due now, [`PushQueue::claim`]ed by a
//! gateway when due (claimed jobs are not handed out again until settled,
//! or — where several gateways share the queue — until their claim
//! lapses), and settled once the provider has answered: acked (delivered,
//! or dropped for a dead token), retried at a later time, or failed.
//! Delivery is at-least-once: a gateway that dies between the provider's
//! 200 and the ack sends the job again.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::types::{NewPushJob, Platform, PushJob};

/// Why the queue could not answer (ours, not the caller's: jobs stay where
/// they were and the gateway tries again after a pause).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue cannot be reached now.
    #[error("push queue unavailable: {0}")]
    Unavailable(String),
    /// The queue answered something unusable.
    #[error("push queue: {0}")]
    Internal(String),
}

/// A boxed future of the queue (object-safe: `Arc<dyn PushQueue>`).
pub type QueueFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, QueueError>> + Send + 'a>>;

/// A job in the queue with its delivery state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub job: PushJob,
    /// Attempts made so far (0 for a new job).
    pub attempts: u32,
    /// Unix milliseconds before which the job is not sent.
    pub next_attempt_ms: u64,
    /// Reason of the last failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What [`PushQueue::claim`] found.
#[derive(Debug, Default)]
pub struct Claimed {
    /// Due jobs, now claimed by this gateway, earliest first.
    pub jobs: Vec<OutboxEntry>,
    /// When the next job of this platform not returned is due, if any.
    pub next_at: Option<u64>,
}

/// How a claimed job ends its attempt. No `Debug`: jobs hold tokens.
#[derive(Clone, PartialEq)]
pub enum Settlement {
    /// Delivered (or dropped): the job leaves the queue.
    Ack { id: u64 },
    /// Try again at `at_ms` (unix ms).
    RetryAt {
        id: u64,
        at_ms: u64,
        attempts: u32,
        reason: String,
    },
    /// Give up: the job leaves the queue for the (bounded) failed records.
    Fail {
        id: u64,
        attempts: u32,
        reason: String,
    },
}

/// The durable queue of push jobs.
pub trait PushQueue: Send + Sync + 'static {
    /// Adds jobs, due at `now_ms`; returns their ids in order. Once this
    /// returns the jobs survive a crash.
    fn enqueue(&self, jobs: Vec<NewPushJob>, now_ms: u64) -> QueueFuture<'_, Vec<u64>>;

    /// Claims up to `limit` jobs of `platform` due at `now_ms`.
    fn claim(&self, platform: Platform, now_ms: u64, limit: usize) -> QueueFuture<'_, Claimed>;

    /// Settles claimed jobs, all in one write where the queue can.
    fn settle(&self, settlements: Vec<Settlement>) -> QueueFuture<'_, usize>;

    /// Jobs waiting: due, scheduled for a retry, or claimed.
    fn depth(&self) -> QueueFuture<'_, u64>;
}
