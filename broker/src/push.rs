//! Offline fallback to push (PROTOCOL.md §11): decides which devices of a
//! user are offline and hands jobs to the push gateway. Delivery, retries and
//! provider logic live in `tether-push-gateway`; the broker only enqueues.
//!
//! A device is **live** while a session that connected with that `device`
//! is subscribed to the user's personal channel `user:{id}` (only then does
//! the publication reach it in real time). For each registered device of the
//! user, a publication on `user:{id}` carrying `push` is either pushed at
//! once (no live session), or — with `--ack-timeout` — pushed when the
//! timeout passes without any live session of that device acking it.
//! Exactly one push per device per message: the two cases are decided once,
//! when the message is published.
//!
//! The ack-timeout wait is kept where it outlives the process
//! ([`AckChecks`]): a single node's redb store
//! (`cluster::memory::StoredAckChecks`), or Redis in a cluster, where
//! whichever node takes it when due decides it
//! ([`Push::run_shared_checks`]), so that it survives the node that
//! published. Without such a store (unit tests) it is a timer of this node.

use std::sync::Arc;
use std::time::Duration;

use tether_protocol::{ChannelName, Offset};
use tether_push_gateway::{
    Device, DeviceRegistry, Gateway, GatewayEvent, NewPushJob, Notification, Platform,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::cluster::ack::{AckCheck, AckChecks};
use crate::cluster::{Liveness, Presence};
use crate::metrics::{Metrics, PushLabel};

/// Most ack-timeout checks waiting at once; past that, messages are pushed
/// at once instead of waiting (a push too many rather than one too few).
const MAX_PENDING_ACK_CHECKS: usize = 100_000;

/// How often a cluster node looks for shared ack checks that are due.
const SHARED_CHECK_EVERY: Duration = Duration::from_millis(250);
/// Shared checks taken per look.
const SHARED_CHECK_BATCH: usize = 256;

/// The broker's side of push: device registry, presence, fallback rules.
/// The pushes a publication asked for could not be arranged.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PushFailed(String);

#[derive(Clone)]
pub struct Push {
    gateway: Gateway,
    devices: Arc<dyn DeviceRegistry>,
    presence: Arc<dyn Presence>,
    ack_timeout: Option<Duration>,
    /// Where ack-timeout checks wait (the node's store or Redis; `None`:
    /// timers here).
    shared_checks: Option<Arc<dyn AckChecks>>,
    configured: [bool; 3],
    metrics: Metrics,
    timers: TaskTracker,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Push {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Push")
            .field("ack_timeout", &self.ack_timeout)
            .field("configured", &self.configured)
            .finish_non_exhaustive()
    }
}

impl Push {
    /// `configured`: whether APNs, FCM and Web Push (in `Platform::index`
    /// order) are on. `shared_checks`: in a cluster, where ack-timeout
    /// checks wait.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gateway: Gateway,
        devices: Arc<dyn DeviceRegistry>,
        presence: Arc<dyn Presence>,
        ack_timeout: Option<Duration>,
        shared_checks: Option<Arc<dyn AckChecks>>,
        configured: [bool; 3],
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Push {
        Push {
            gateway,
            devices,
            presence,
            ack_timeout,
            shared_checks,
            configured,
            metrics,
            timers: TaskTracker::new(),
            shutdown,
        }
    }

    /// The device registry (API and fallback decisions).
    pub fn devices(&self) -> &dyn DeviceRegistry {
        self.devices.as_ref()
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    fn count(&self, platform: Platform, outcome: &'static str, reason: &'static str) {
        self.metrics
            .pushes
            .get_or_create(&PushLabel {
                provider: platform.as_str(),
                outcome,
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A publication on `user:{user}` at `offset` carried `push`. An error
    /// when the pushes it needs could not be arranged (the devices could
    /// not be read, or the outbox not written): the publisher must hear of
    /// it (503), since the publication itself went through.
    pub async fn on_publish(
        &self,
        user: &str,
        channel: &ChannelName,
        offset: Offset,
        notification: Notification,
    ) -> Result<(), PushFailed> {
        let devices = match self.devices.devices_for_user(user).await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "device lookup failed; no push for this publication");
                return Err(PushFailed(format!(
                    "the user's devices could not be read: {e}"
                )));
            }
        };
        let mut now = Vec::new();
        for device in devices {
            if !self.configured[device.platform.index()] {
                self.count(device.platform, "skipped", "provider_off");
                continue;
            }
            if !self.liveness(&device.device_id, channel, offset).await.live {
                now.push(NewPushJob::for_device(
                    &device,
                    notification.clone(),
                    channel.as_str(),
                    offset.get(),
                ));
                continue;
            }
            match self.ack_timeout {
                None => {} // live, no ack timeout: delivered in real time only
                Some(timeout) => {
                    self.check_ack_later(
                        device,
                        channel.clone(),
                        offset,
                        notification.clone(),
                        timeout,
                    )
                    .await
                }
            }
        }
        self.enqueue(now)
            .await
            .map_err(|e| PushFailed(format!("the push outbox could not be written: {e}")))
    }

    /// The device's liveness; presence that cannot be read counts as
    /// offline (a push too many rather than one too few).
    async fn liveness(&self, device: &str, channel: &ChannelName, offset: Offset) -> Liveness {
        match self.presence.liveness(device, channel, offset).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "presence unreadable: pushing");
                Liveness::default()
            }
        }
    }

    /// Writes jobs to the outbox; a failure is logged and counted, and
    /// returned for a caller that can still tell someone.
    async fn enqueue(&self, jobs: Vec<NewPushJob>) -> Result<(), String> {
        if jobs.is_empty() {
            return Ok(());
        }
        let n = jobs.len();
        match self.gateway.enqueue(jobs).await {
            Ok(_) => Ok(()),
            Err(e) => {
                warn!(error = %e, jobs = n, "push outbox write failed; these pushes are lost");
                self.metrics.push_enqueue_failures.inc_by(n as u64);
                Err(e.to_string())
            }
        }
    }

    /// Arranges the ack-timeout check. In a cluster it is stored in Redis
    /// before the publication is answered, so that it outlives this node.
    async fn check_ack_later(
        &self,
        device: Device,
        channel: ChannelName,
        offset: Offset,
        notification: Notification,
        timeout: Duration,
    ) {
        if let Some(shared) = &self.shared_checks {
            let check = AckCheck {
                device,
                channel,
                offset,
                notification,
            };
            match shared.schedule(check.clone(), timeout).await {
                Ok(true) => {}
                Ok(false) => {
                    warn!("too many ack checks waiting in Redis: pushing at once");
                    self.push_check(check).await;
                }
                Err(e) => {
                    warn!(error = %e, "ack check not stored: pushing at once");
                    self.push_check(check).await;
                }
            }
            return;
        }
        if self.timers.len() >= MAX_PENDING_ACK_CHECKS {
            // Too many waiting: push now rather than hold more state.
            let this = self.clone();
            self.timers.spawn(async move {
                let job =
                    NewPushJob::for_device(&device, notification, channel.as_str(), offset.get());
                // A failure is logged and counted there; nobody waits for it.
                let _ = this.enqueue(vec![job]).await;
            });
            return;
        }
        let this = self.clone();
        self.timers.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {}
                // At shutdown, decide now: what is not acked yet is pushed.
                _ = this.shutdown.cancelled() => {}
            }
            if this
                .liveness(&device.device_id, &channel, offset)
                .await
                .acked
            {
                debug!(channel = %channel, offset = offset.get(), "acked in time: no push");
                return;
            }
            let job = NewPushJob::for_device(&device, notification, channel.as_str(), offset.get());
            // A failure is logged and counted there; nobody waits for it.
            let _ = this.enqueue(vec![job]).await;
        });
    }

    async fn push_check(&self, c: AckCheck) {
        let job = NewPushJob::for_device(
            &c.device,
            c.notification,
            c.channel.as_str(),
            c.offset.get(),
        );
        // A failure is logged and counted there; nobody waits for it.
        let _ = self.enqueue(vec![job]).await;
    }

    /// Cluster mode: until `shutdown`, takes the shared ack checks that are
    /// due (whichever node scheduled them) and decides each: pushed unless
    /// the device acked in time. At shutdown the checks not yet due stay in
    /// Redis for the other nodes.
    pub async fn run_shared_checks(self) {
        let Some(shared) = self.shared_checks.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(SHARED_CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let taken = match shared.take_due(SHARED_CHECK_BATCH).await {
                Ok(t) => t,
                Err(e) => {
                    debug!(error = %e, "shared ack checks unreadable; retrying");
                    continue;
                }
            };
            for t in taken {
                let c = t.check;
                if self
                    .liveness(&c.device.device_id, &c.channel, c.offset)
                    .await
                    .acked
                {
                    debug!(channel = %c.channel, offset = c.offset.get(), "acked in time: no push");
                } else {
                    self.push_check(c).await;
                }
                if let Err(e) = shared.settle(&t.id).await {
                    // Taken again after its claim: one push too many at worst.
                    warn!(error = %e, id = t.id, "ack check not settled");
                }
            }
        }
    }

    /// Waits for pending ack checks (they resolve at once once `shutdown`
    /// is cancelled); callers bound the wait.
    pub async fn drain(&self) {
        self.timers.close();
        self.timers.wait().await;
    }
}

/// Turns gateway events into metrics.
pub async fn count_events(mut events: mpsc::Receiver<GatewayEvent>, metrics: Metrics) {
    while let Some(e) = events.recv().await {
        match e {
            GatewayEvent::Outcome {
                platform,
                outcome,
                reason,
                ..
            } => {
                metrics
                    .pushes
                    .get_or_create(&PushLabel {
                        provider: platform.as_str(),
                        outcome,
                        reason: reason.unwrap_or_default(),
                    })
                    .inc();
            }
            GatewayEvent::DeviceRemoved { platform, .. } => {
                metrics
                    .push_devices_removed
                    .get_or_create(&crate::metrics::ProviderLabel {
                        provider: platform.as_str(),
                    })
                    .inc();
            }
            GatewayEvent::Coalesced { platform } => {
                metrics
                    .pushes_coalesced
                    .get_or_create(&crate::metrics::ProviderLabel {
                        provider: platform.as_str(),
                    })
                    .inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_push_gateway::{
        Backend, Claimed, DeviceRegistry, GatewayConfig, PushQueue, QueueError, QueueFuture,
        RegistryError, RegistryFuture, Settlement, Store,
    };

    /// A queue whose disk is gone: every write fails.
    struct BrokenQueue;

    impl PushQueue for BrokenQueue {
        fn enqueue(&self, _: Vec<NewPushJob>, _: u64) -> QueueFuture<'_, Vec<u64>> {
            Box::pin(async { Err(QueueError::Unavailable("disk gone".into())) })
        }
        fn claim(&self, _: Platform, _: u64, _: usize) -> QueueFuture<'_, Claimed> {
            Box::pin(async { Ok(Claimed::default()) })
        }
        fn settle(&self, _: Vec<Settlement>) -> QueueFuture<'_, usize> {
            Box::pin(async { Ok(0) })
        }
        fn depth(&self) -> QueueFuture<'_, u64> {
            Box::pin(async { Ok(0) })
        }
    }

    /// A registry that cannot be read.
    struct BrokenRegistry;

    impl DeviceRegistry for BrokenRegistry {
        fn put_device(&self, _: Device) -> RegistryFuture<'_, Device> {
            Box::pin(async { Err(RegistryError::Unavailable("gone".into())) })
        }
        fn delete_device<'a>(&'a self, _: &'a str) -> RegistryFuture<'a, bool> {
            Box::pin(async { Err(RegistryError::Unavailable("gone".into())) })
        }
        fn remove_dead<'a>(
            &'a self,
            _: &'a str,
            _: &'a tether_push_gateway::types::DeviceToken,
        ) -> RegistryFuture<'a, bool> {
            Box::pin(async { Err(RegistryError::Unavailable("gone".into())) })
        }
        fn get_device<'a>(&'a self, _: &'a str) -> RegistryFuture<'a, Option<Device>> {
            Box::pin(async { Err(RegistryError::Unavailable("gone".into())) })
        }
        fn devices_for_user<'a>(&'a self, _: &'a str) -> RegistryFuture<'a, Vec<Device>> {
            Box::pin(async { Err(RegistryError::Unavailable("gone".into())) })
        }
    }

    fn push_over(queue: Arc<dyn PushQueue>, devices: Arc<dyn DeviceRegistry>) -> Push {
        let shutdown = CancellationToken::new();
        let (events, _) = mpsc::channel(16);
        let gateway = Gateway::start(
            Backend {
                queue,
                devices: devices.clone(),
            },
            Vec::new(),
            GatewayConfig::default(),
            events,
            shutdown.clone(),
        );
        let mut registry = prometheus_client::registry::Registry::default();
        Push::new(
            gateway,
            devices,
            Arc::new(crate::cluster::memory::MemoryPresence::new(
                Duration::from_secs(60),
            )),
            None,
            None,
            [true, true, false],
            Metrics::new(&mut registry),
            shutdown,
        )
    }

    fn alert() -> Notification {
        Notification {
            title: Some("hi".into()),
            ..Notification::default()
        }
    }

    #[tokio::test]
    async fn a_push_that_cannot_be_queued_or_looked_up_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        store
            .put_device(Device {
                device_id: "phone".into(),
                user: "alice".into(),
                platform: Platform::Fcm,
                token: tether_push_gateway::types::DeviceToken::Text("fcm-token".into()),
                topic: None,
                sandbox: false,
                updated_at: 0,
            })
            .await
            .expect("registered");
        let channel = ChannelName::new("user:alice").expect("channel");

        // The user's device is offline and the outbox cannot be written.
        let push = push_over(Arc::new(BrokenQueue), Arc::new(store.clone()));
        let e = push
            .on_publish("alice", &channel, Offset(1), alert())
            .await
            .expect_err("not queued");
        assert!(e.to_string().contains("outbox"), "{e}");

        // The devices cannot be read.
        let push = push_over(Arc::new(store.clone()), Arc::new(BrokenRegistry));
        let e = push
            .on_publish("alice", &channel, Offset(1), alert())
            .await
            .expect_err("devices unreadable");
        assert!(e.to_string().contains("devices"), "{e}");

        // Both working: the push is queued.
        let push = push_over(Arc::new(store.clone()), Arc::new(store));
        push.on_publish("alice", &channel, Offset(1), alert())
            .await
            .expect("queued");
    }
}
