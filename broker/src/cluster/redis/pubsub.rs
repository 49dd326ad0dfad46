//! The node's side of Redis pub/sub: one task ([`Subscriber`]) that owns a
//! dedicated pub/sub connection (one Redis: a RESP3 `ConnectionManager`;
//! a Redis Cluster: a RESP3 `ClusterConnection`, one connection per shard,
//! `SSUBSCRIBE`), subscribes to a channel while the hub watches it, and
//! hands every publication to the hub — in offset order, once, with no
//! silent gap:
//!
//! - (un)subscribe requests are batched: everything queued goes in one
//!   command (one per channel on a Redis Cluster, where a command may not
//!   span slots), and a `watch` resolves once Redis confirmed it and the
//!   channel's position was read;
//! - per channel the task keeps the last (epoch, offset) it delivered: a
//!   duplicate is dropped, a gap is filled from the history stream — once
//!   for this node, never once per client — before the publication that
//!   revealed it;
//! - every [`SubscriberConfig::check_every`] it reads watched channels'
//!   positions (pipelined): a channel whose last publication never arrived
//!   is filled too (it refreshes the positions' expiry on the way). Up to
//!   [`FULL_CHECK_MAX`] watched channels, all of them every time; past
//!   that, those that had a publication in the last [`HOT_CHECKS`] checks
//!   plus a [`SWEEP_CHECKS`]th of the others in turn — so 100,000 quiet
//!   channels cost Redis 3,300 reads a second, not 100,000, and a lost last
//!   publication of a quiet channel is found within [`SWEEP_CHECKS`]
//!   checks. After a reconnect every channel is read at the next check;
//! - a connection that drops is reconnected and resubscribed by the client
//!   (jittered backoff), and announces it (`Disconnection`): the next check
//!   then re-reads every position and fills what was missed;
//! - a connection that stays "connected" but delivers nothing (seen after
//!   failovers) is caught by a probe: the node publishes to its own probe
//!   channel (on a Redis Cluster one per shard, so that each shard's
//!   connection is probed) every [`SubscriberConfig::probe_every`] and must hear it within
//!   [`SubscriberConfig::probe_timeout`]; if not, the connection is
//!   replaced, everything resubscribed and every position re-checked.
//!
//! Queues: requests 4096 (a full queue makes `watch` wait, `unwatch` is
//! retried from a task); pushes from Redis 65,536 (over that a publication
//! is dropped and the next check fills it from history: the reader never
//! blocks the connection).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, RedisResult, Value};
use serde_json::value::RawValue;
use tether_protocol::{ChannelName, Epoch, Offset};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::broker::{ENSURE_SCRIPT, RedisBrokerConfig, new_epoch, read_history};
use super::{CONNECT_TIMEOUT, Conn, RESPONSE_TIMEOUT, Redis, keys, timed};
use crate::cluster::{BrokerError, ControlSink, Deliver, Publication};
use crate::config::RedisTarget;
use crate::metrics::Metrics;

const REQUESTS: usize = 4096;
const PUSHES: usize = 65_536;
/// Requests taken in one batch.
const BATCH: usize = 1024;
/// Channels per position-check pipeline.
const CHECK_CHUNK: usize = 512;
/// Up to this many watched channels, every check reads them all.
pub const FULL_CHECK_MAX: usize = 2048;
/// A channel with a publication within this many checks is read at every
/// check.
pub const HOT_CHECKS: u64 = 10;
/// Past [`FULL_CHECK_MAX`], a quiet channel is read once in this many
/// checks.
pub const SWEEP_CHECKS: u64 = 30;

/// How often the subscriber checks and probes.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    pub node_id: String,
    pub check_every: Duration,
    pub probe_every: Duration,
    pub probe_timeout: Duration,
    /// Channels this node subscribes to at most (`--max-channels`): a watch
    /// of a new one past it is refused `unavailable`.
    pub max_channels: usize,
}

impl SubscriberConfig {
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            check_every: Duration::from_secs(1),
            probe_every: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(3),
            max_channels: 1_000_000,
        }
    }
}

enum Request {
    Watch(ChannelName, oneshot::Sender<Result<(), BrokerError>>),
    Unwatch(ChannelName),
}

/// Handle to the subscriber task.
#[derive(Clone)]
pub struct Subscriber {
    requests: mpsc::Sender<Request>,
    healthy: Arc<AtomicBool>,
}

impl Subscriber {
    /// Starts the task (it connects in the background; until it has,
    /// `watch` waits and the node is not healthy).
    pub fn start(
        redis: &Redis,
        config: SubscriberConfig,
        broker: RedisBrokerConfig,
        metrics: Metrics,
        sink: Weak<dyn Deliver>,
        control: Weak<dyn ControlSink>,
    ) -> Subscriber {
        let (tx, rx) = mpsc::channel(REQUESTS);
        let healthy = Arc::new(AtomicBool::new(false));
        let task = Task {
            target: redis.target.clone(),
            cmd: redis.conn.clone(),
            cluster: redis.is_cluster(),
            probe_channels: vec![keys::probe(&config.node_id)],
            control_channel: keys::control(&config.node_id),
            control,
            config,
            broker,
            metrics,
            sink,
            healthy: healthy.clone(),
            channels: HashMap::new(),
            resync: true,
            probe_sent: vec![None],
            checks: 0,
            watches: 0,
        };
        tokio::spawn(task.run(rx));
        Subscriber {
            requests: tx,
            healthy,
        }
    }

    /// Redis answers and this node's pub/sub delivers (probed).
    pub fn healthy(&self) -> Arc<AtomicBool> {
        self.healthy.clone()
    }

    /// Subscribes this node to `channel` (counted: see `Broker::watch`).
    pub fn watch(
        &self,
        channel: &ChannelName,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send + 'static {
        let requests = self.requests.clone();
        let channel = channel.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            requests
                .send(Request::Watch(channel, tx))
                .await
                .map_err(|_| BrokerError::Unavailable("the subscriber task has stopped".into()))?;
            rx.await
                .map_err(|_| BrokerError::Unavailable("the subscriber task has stopped".into()))?
        }
    }

    /// Ends one watch of `channel`. Never waits.
    pub fn unwatch(&self, channel: &ChannelName) {
        if let Err(mpsc::error::TrySendError::Full(r)) =
            self.requests.try_send(Request::Unwatch(channel.clone()))
        {
            let requests = self.requests.clone();
            tokio::spawn(async move {
                let _ = requests.send(r).await;
            });
        }
    }
}

/// The dedicated pub/sub connection.
enum PubSubConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl PubSubConn {
    async fn connect(
        target: &RedisTarget,
        pushes: mpsc::Sender<PushInfo>,
        overflow: Arc<AtomicBool>,
    ) -> RedisResult<PubSubConn> {
        // The reader never blocks the connection: a full queue drops the
        // publication and says so; the next check fills it from history.
        let sender = move |info: PushInfo| -> Result<(), std::convert::Infallible> {
            if pushes.try_send(info).is_err() {
                overflow.store(true, Ordering::Release);
            }
            Ok(())
        };
        match target {
            RedisTarget::Single(url) => {
                let info = url.as_str().into_connection_info()?;
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                let client = redis::Client::open(info.set_redis_settings(settings))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_max_delay(Duration::from_secs(2))
                    .set_push_sender(sender)
                    .set_automatic_resubscription();
                Ok(PubSubConn::Single(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
            RedisTarget::Cluster(seeds) => {
                let client = redis::cluster::ClusterClient::builder(seeds.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(sender)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .build()?;
                Ok(PubSubConn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    async fn subscribe(&mut self, channels: &[String]) -> RedisResult<()> {
        match self {
            PubSubConn::Single(c) => c.subscribe(channels).await,
            PubSubConn::Cluster(c) => {
                // One command per channel: a command may not span slots.
                let calls = channels.iter().map(|ch| {
                    let mut c = c.clone();
                    async move { c.ssubscribe(ch).await }
                });
                futures_util::future::join_all(calls)
                    .await
                    .into_iter()
                    .collect::<RedisResult<Vec<()>>>()
                    .map(|_| ())
            }
        }
    }

    async fn unsubscribe(&mut self, channels: &[String]) -> RedisResult<()> {
        match self {
            PubSubConn::Single(c) => c.unsubscribe(channels).await,
            PubSubConn::Cluster(c) => {
                let calls = channels.iter().map(|ch| {
                    let mut c = c.clone();
                    async move { c.sunsubscribe(ch).await }
                });
                futures_util::future::join_all(calls)
                    .await
                    .into_iter()
                    .collect::<RedisResult<Vec<()>>>()
                    .map(|_| ())
            }
        }
    }
}

/// What the node knows of one watched channel.
#[derive(Debug, Default)]
struct Track {
    watchers: u32,
    /// The last publication delivered (or known from the position when the
    /// channel was subscribed).
    last: Option<(Epoch, u64)>,
    /// `last` at the previous check: unchanged and behind the position
    /// means the last publication was lost.
    at_check: Option<(Epoch, u64)>,
    /// The check count when a publication last arrived.
    active_at: u64,
    /// Which of the [`SWEEP_CHECKS`] turns reads this channel when quiet.
    turn: u64,
}

struct Task {
    target: RedisTarget,
    cmd: Conn,
    cluster: bool,
    /// The node's own probe channels: one; on a Redis Cluster one per shard
    /// (each shard's pub/sub connection is probed), placed at connect time.
    probe_channels: Vec<String>,
    /// This node's control channel, and where its messages go.
    control_channel: String,
    control: Weak<dyn ControlSink>,
    config: SubscriberConfig,
    broker: RedisBrokerConfig,
    metrics: Metrics,
    sink: Weak<dyn Deliver>,
    healthy: Arc<AtomicBool>,
    channels: HashMap<ChannelName, Track>,
    /// Re-read every position at the next check (after a reconnect, a full
    /// push queue, or at start).
    resync: bool,
    /// Per probe channel, the probe on its way: its nonce and when it was sent.
    probe_sent: Vec<Option<(u64, Instant)>>,
    /// Position checks so far.
    checks: u64,
    /// Watches so far (spreads the channels' sweep turns).
    watches: u64,
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Task {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let (mut pushes, mut overflow, mut conn) = self.connect_until_up().await;
        let mut check = tokio::time::interval(self.config.check_every);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe = tokio::time::interval(self.config.probe_every);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                push = pushes.recv() => match push {
                    Some(p) => self.on_push(p).await,
                    None => {
                        warn!("redis pub/sub connection ended; connecting again");
                        (pushes, overflow, conn) = self.replace(conn).await;
                    }
                },
                req = requests.recv() => {
                    let Some(first) = req else { break };
                    let mut batch = vec![first];
                    while batch.len() < BATCH {
                        match requests.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    self.on_requests(&mut conn, batch).await;
                }
                _ = check.tick() => self.check_positions().await,
                _ = probe.tick() => {
                    if self.probe_lost() {
                        self.metrics.cluster_probes_failed.inc();
                        warn!("redis pub/sub delivered nothing, not even this node's probe: replacing the connection");
                        (pushes, overflow, conn) = self.replace(conn).await;
                    }
                    self.send_probe().await;
                }
            }
            if overflow.swap(false, Ordering::AcqRel) {
                warn!(
                    "redis pub/sub publications came faster than this node took them: re-checking every channel"
                );
                self.resync = true;
            }
        }
        debug!("redis subscriber stopped");
    }

    /// Connects the pub/sub connection, retrying with backoff until it is
    /// up; subscribes the probe and every watched channel.
    async fn connect_until_up(
        &mut self,
    ) -> (mpsc::Receiver<PushInfo>, Arc<AtomicBool>, PubSubConn) {
        let mut delay = Duration::from_millis(100);
        loop {
            let (tx, rx) = mpsc::channel(PUSHES);
            let overflow = Arc::new(AtomicBool::new(false));
            match PubSubConn::connect(&self.target, tx, overflow.clone()).await {
                Ok(mut conn) => {
                    if self.cluster {
                        self.place_probes().await;
                    }
                    let mut all: Vec<String> = self.channels.keys().map(keys::messages).collect();
                    all.extend(self.probe_channels.iter().cloned());
                    all.push(self.control_channel.clone());
                    match conn.subscribe(&all).await {
                        Ok(()) => {
                            self.resync = true;
                            self.probe_sent = vec![None; self.probe_channels.len()];
                            return (rx, overflow, conn);
                        }
                        Err(e) => warn!(error = %e, "cannot subscribe on redis pub/sub"),
                    }
                }
                Err(e) => warn!(error = %e, "cannot connect redis pub/sub"),
            }
            self.healthy.store(false, Ordering::Release);
            let jitter = delay.mul_f64(rand::random::<f64>());
            tokio::time::sleep(delay / 2 + jitter / 2).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Drops `old` and connects anew.
    async fn replace(
        &mut self,
        old: PubSubConn,
    ) -> (mpsc::Receiver<PushInfo>, Arc<AtomicBool>, PubSubConn) {
        drop(old);
        self.metrics.cluster_reconnects.inc();
        self.healthy.store(false, Ordering::Release);
        self.connect_until_up().await
    }

    /// Redis Cluster: one probe channel on each shard (from `CLUSTER
    /// SLOTS`), so that every shard's pub/sub connection is probed. Keeps
    /// the current ones if the slots cannot be read.
    async fn place_probes(&mut self) {
        let mut cmd = self.cmd.clone();
        let slots: Result<Value, _> =
            timed(redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut cmd)).await;
        let ranges: Vec<(u16, u16)> = match slots {
            Ok(Value::Array(rows)) => rows
                .iter()
                .filter_map(|row| match row {
                    Value::Array(r) => match (r.first(), r.get(1)) {
                        (Some(Value::Int(a)), Some(Value::Int(b))) => {
                            Some((u16::try_from(*a).ok()?, u16::try_from(*b).ok()?))
                        }
                        _ => None,
                    },
                    _ => None,
                })
                .collect(),
            Ok(_) => Vec::new(),
            Err(e) => {
                debug!(error = %e, "CLUSTER SLOTS unreadable; probes stay where they are");
                return;
            }
        };
        let placed: Vec<String> = ranges
            .iter()
            .filter_map(|&(a, b)| keys::probe_in(&self.config.node_id, a, b))
            .collect();
        if !placed.is_empty() {
            debug!(shards = placed.len(), "one probe per shard");
            self.probe_channels = placed;
        }
    }

    fn probe_lost(&self) -> bool {
        self.probe_sent
            .iter()
            .flatten()
            .any(|(_, at)| at.elapsed() > self.config.probe_timeout)
    }

    async fn send_probe(&mut self) {
        let command = if self.cluster { "SPUBLISH" } else { "PUBLISH" };
        for i in 0..self.probe_channels.len() {
            if self.probe_sent.get(i).is_some_and(Option::is_some) {
                continue;
            }
            let nonce = rand::random::<u64>();
            let mut cmd = self.cmd.clone();
            let sent: Result<i64, _> = timed(
                redis::cmd(command)
                    .arg(&self.probe_channels[i])
                    .arg(nonce)
                    .query_async(&mut cmd),
            )
            .await;
            match sent {
                Ok(_) => {
                    if let Some(slot) = self.probe_sent.get_mut(i) {
                        *slot = Some((nonce, Instant::now()));
                    }
                }
                Err(e) => {
                    debug!(error = %e, "probe not sent");
                    self.healthy.store(false, Ordering::Release);
                }
            }
        }
    }

    async fn on_push(&mut self, push: PushInfo) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let [Value::BulkString(name), Value::BulkString(payload)] = push.data.as_slice()
                else {
                    return;
                };
                if let Some(i) = self
                    .probe_channels
                    .iter()
                    .position(|c| name.as_slice() == c.as_bytes())
                {
                    let nonce = std::str::from_utf8(payload)
                        .ok()
                        .and_then(|n| n.parse().ok());
                    if let Some(slot) = self.probe_sent.get_mut(i)
                        && slot.is_some_and(|(sent, _)| Some(sent) == nonce)
                    {
                        *slot = None;
                        if self.probe_sent.iter().all(Option::is_none) {
                            self.healthy.store(true, Ordering::Release);
                        }
                    }
                    return;
                }
                if name.as_slice() == self.control_channel.as_bytes() {
                    super::resume::deliver_control(&self.control, payload);
                    return;
                }
                let Some(channel) = keys::channel_of(name) else {
                    return;
                };
                let Some((epoch, offset, ts, data)) = keys::decode_message(payload) else {
                    warn!(channel = %channel, "unreadable publication on redis pub/sub dropped");
                    return;
                };
                let epoch = Epoch::new(epoch);
                self.accept(&channel, &epoch, offset, ts, data).await;
            }
            PushKind::Disconnection => {
                info!("redis pub/sub connection lost; the client reconnects and resubscribes");
                self.metrics.cluster_reconnects.inc();
                self.healthy.store(false, Ordering::Release);
                self.resync = true;
            }
            _ => {}
        }
    }

    /// A publication arrived on pub/sub: drop a duplicate, fill a gap
    /// first, deliver.
    async fn accept(
        &mut self,
        channel: &ChannelName,
        epoch: &Epoch,
        offset: u64,
        ts: u64,
        data: &str,
    ) {
        let Some(track) = self.channels.get(channel) else {
            return; // not watched (any more)
        };
        let behind = match &track.last {
            Some((e, last)) if e == epoch => {
                if offset <= *last {
                    return;
                }
                Some(*last)
            }
            // A new epoch (history lost): fill from its start.
            Some(_) => Some(0),
            None => None,
        };
        if let Some(last) = behind
            && offset > last + 1
        {
            self.fill(channel, epoch, last, offset - 1).await;
        }
        self.deliver(channel, epoch, offset, ts, data);
    }

    fn deliver(&mut self, channel: &ChannelName, epoch: &Epoch, offset: u64, ts: u64, data: &str) {
        let Some(track) = self.channels.get_mut(channel) else {
            return;
        };
        track.last = Some((epoch.clone(), offset));
        track.active_at = self.checks;
        let Ok(raw) = serde_json::from_str::<&RawValue>(data) else {
            warn!(channel = %channel, offset, "publication with unreadable data dropped");
            return;
        };
        // When it entered the publishing node, by the wall clocks.
        let age = Duration::from_millis(unix_millis().saturating_sub(ts));
        let published_at = Instant::now().checked_sub(age);
        if let Some(sink) = self.sink.upgrade() {
            sink.deliver(
                channel,
                &Publication {
                    epoch,
                    offset: Offset(offset),
                    ts,
                    raw,
                    data: None,
                    published_at,
                },
            );
        }
    }

    /// Delivers what the history stream holds of `channel` after `after`
    /// up to `until` (same epoch), in order.
    async fn fill(&mut self, channel: &ChannelName, epoch: &Epoch, after: u64, until: u64) {
        let want = until.saturating_sub(after);
        let limit = usize::try_from(want)
            .unwrap_or(usize::MAX)
            .min(self.broker.history_size);
        let mut conn = self.cmd.clone();
        let read = read_history(&mut conn, channel, Some(Offset(after)), limit).await;
        let (position, entries) = match read {
            Ok(r) => r,
            Err(e) => {
                warn!(channel = %channel, error = %e, "cannot fill a gap from history; the next check tries again");
                self.resync = true;
                return;
            }
        };
        if position.as_ref().is_none_or(|p| &p.epoch != epoch) {
            return; // the channel moved on to another epoch meanwhile
        }
        let mut filled = 0u64;
        for (offset, ts, data) in entries.iter().filter(|(o, _, _)| *o > after && *o <= until) {
            self.deliver(channel, epoch, *offset, *ts, data);
            filled += 1;
        }
        self.metrics.cluster_gaps_filled.inc_by(filled);
        if filled < want {
            // Trimmed from history before this node saw them: the
            // subscribers see the jump in offsets, and recoveries across it
            // answer recovered: false.
            self.metrics.cluster_gaps_unfilled.inc_by(want - filled);
            warn!(channel = %channel, missing = want - filled, "publications lost between redis and this node could not be recovered from history");
        }
        debug!(channel = %channel, after, until, filled, "gap filled from history");
    }

    async fn on_requests(&mut self, conn: &mut PubSubConn, batch: Vec<Request>) {
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        let mut waiting = Vec::new();
        for r in batch {
            match r {
                Request::Watch(ch, tx) => {
                    if !self.channels.contains_key(&ch)
                        && self.channels.len() >= self.config.max_channels
                    {
                        // Full: the channels this node tracks (a Redis
                        // subscription, offsets, gap checks each) stay
                        // bounded; watched ones go on.
                        self.metrics.channels_refused.inc();
                        let _ = tx.send(Err(BrokerError::Unavailable(format!(
                            "this node holds --max-channels ({}) channels; try again later",
                            self.config.max_channels
                        ))));
                        continue;
                    }
                    let t = self.channels.entry(ch.clone()).or_default();
                    t.watchers += 1;
                    if t.watchers == 1 {
                        // Read at every check for a while, then in its turn.
                        t.active_at = self.checks;
                        t.turn = self.watches % SWEEP_CHECKS;
                        self.watches += 1;
                        subscribe.push(ch.clone());
                    }
                    waiting.push((ch, tx));
                }
                Request::Unwatch(ch) => {
                    if let Some(t) = self.channels.get_mut(&ch) {
                        t.watchers = t.watchers.saturating_sub(1);
                        if t.watchers == 0 {
                            self.channels.remove(&ch);
                            unsubscribe.push(ch);
                        }
                    }
                }
            }
        }
        // A channel unwatched and watched again in one batch stays.
        unsubscribe.retain(|c| !self.channels.contains_key(c));
        subscribe.retain(|c| self.channels.contains_key(c));
        if !unsubscribe.is_empty() {
            let names: Vec<String> = unsubscribe.iter().map(keys::messages).collect();
            if let Err(e) = conn.unsubscribe(&names).await {
                debug!(error = %e, "unsubscribe failed (the connection is being replaced?)");
            }
        }
        let mut failed: Option<BrokerError> = None;
        if !subscribe.is_empty() {
            let names: Vec<String> = subscribe.iter().map(keys::messages).collect();
            match conn.subscribe(&names).await {
                Ok(()) => {
                    if let Err(e) = self.ensure_positions(&subscribe).await {
                        failed = Some(e);
                    }
                }
                Err(e) => failed = Some(super::broker_error(&e)),
            }
        }
        for (ch, tx) in waiting {
            let result = match &failed {
                Some(e) if subscribe.contains(&ch) => {
                    // Not subscribed: forget this watch (the hub calls
                    // unwatch only for watches that succeeded).
                    if let Some(t) = self.channels.get_mut(&ch) {
                        t.watchers = t.watchers.saturating_sub(1);
                        if t.watchers == 0 {
                            self.channels.remove(&ch);
                        }
                    }
                    Err(e.clone())
                }
                _ => Ok(()),
            };
            let _ = tx.send(result);
        }
    }

    /// Creates the epoch of newly watched channels where they have none and
    /// starts their tracking at their current position.
    async fn ensure_positions(&mut self, channels: &[ChannelName]) -> Result<(), BrokerError> {
        let script = redis::Script::new(ENSURE_SCRIPT);
        // One call per channel (EVALSHA, loading the script where a shard
        // does not know it yet), all at once.
        let calls = channels.iter().map(|ch| {
            let mut conn = self.cmd.clone();
            let mut invocation = script.prepare_invoke();
            invocation
                .key(keys::position(ch))
                .key(keys::history(ch))
                .arg(new_epoch())
                .arg(self.broker.position_ttl_ms);
            async move { timed(invocation.invoke_async::<(String, Option<u64>)>(&mut conn)).await }
        });
        let answers: Vec<(String, Option<u64>)> = futures_util::future::join_all(calls)
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        for (ch, (epoch, offset)) in channels.iter().zip(answers) {
            let offset = offset.unwrap_or(0);
            if let Some(t) = self.channels.get_mut(ch) {
                let epoch = Epoch::new(epoch);
                // Publications may have arrived meanwhile: keep the later.
                match &t.last {
                    Some((e, last)) if *e == epoch && *last >= offset => {}
                    _ => t.last = Some((epoch, offset)),
                }
            }
        }
        Ok(())
    }

    /// Reads every watched channel's position; fills what this node has
    /// not received.
    async fn check_positions(&mut self) {
        if self.channels.is_empty() {
            if self.resync {
                self.resync = !self.ping().await;
            }
            return;
        }
        let resync = self.resync;
        self.checks += 1;
        let (now, all) = (self.checks, resync || self.channels.len() <= FULL_CHECK_MAX);
        let names: Vec<ChannelName> = self
            .channels
            .iter()
            .filter(|(_, t)| {
                all || now.saturating_sub(t.active_at) <= HOT_CHECKS || t.turn == now % SWEEP_CHECKS
            })
            .map(|(ch, _)| ch.clone())
            .collect();
        let mut ok = true;
        for chunk in names.chunks(CHECK_CHUNK) {
            let mut pipe = redis::pipe();
            for ch in chunk {
                let key = keys::position(ch);
                pipe.cmd("HMGET").arg(&key).arg("epoch").arg("offset");
                pipe.cmd("PEXPIRE")
                    .arg(&key)
                    .arg(self.broker.position_ttl_ms)
                    .ignore();
            }
            let mut conn = self.cmd.clone();
            let started = Instant::now();
            let answers: Result<Vec<(Option<String>, Option<u64>)>, _> =
                timed(pipe.query_async(&mut conn)).await;
            self.metrics
                .cluster_redis_latency
                .observe(started.elapsed().as_secs_f64());
            let answers = match answers {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "position check failed");
                    ok = false;
                    break;
                }
            };
            for (ch, (epoch, offset)) in chunk.iter().zip(answers) {
                let (Some(epoch), Some(offset)) = (epoch, offset) else {
                    continue; // no position (emptied Redis): the next publish starts an epoch
                };
                let epoch = Epoch::new(epoch);
                let Some(t) = self.channels.get_mut(ch) else {
                    continue;
                };
                let behind = match &t.last {
                    Some((e, last)) if *e == epoch => {
                        let stuck = resync || t.at_check.as_ref() == t.last.as_ref();
                        (offset > *last && stuck).then_some(*last)
                    }
                    // Another epoch than what we delivered, and nothing of
                    // it has arrived: everything of it is missing.
                    Some(_) => Some(0),
                    // Not tracked yet: start here.
                    None => {
                        t.last = Some((epoch.clone(), offset));
                        None
                    }
                };
                t.at_check = t.last.clone();
                let Some(last) = behind else {
                    continue;
                };
                if offset > last {
                    self.fill(ch, &epoch, last, offset).await;
                }
                // Whatever could be filled, this node is at `offset` of this
                // epoch now (what could not was counted as lost).
                if let Some(t) = self.channels.get_mut(ch)
                    && t.last
                        .as_ref()
                        .is_none_or(|(e, l)| *e != epoch || *l < offset)
                {
                    t.last = Some((epoch, offset));
                    t.at_check = t.last.clone();
                }
            }
        }
        if ok {
            self.resync = false;
        } else {
            self.healthy.store(false, Ordering::Release);
        }
    }

    async fn ping(&self) -> bool {
        let mut conn = self.cmd.clone();
        let pong: Result<String, _> = timed(redis::cmd("PING").query_async(&mut conn)).await;
        pong.is_ok()
    }
}
