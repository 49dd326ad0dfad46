//! The hub: this node's local fan-out. Channel → subscribers, sharded by
//! channel name; it knows nothing of sockets (a subscriber is an outbox and
//! an encoding) and decides no offsets: positions and history belong to the
//! [`Broker`], which hands every publication to [`Hub::deliver`] (the hub is
//! its [`Deliver`] sink), whichever node it was published on.
//!
//! A publication is encoded once per encoding and the same `Bytes` go to
//! every subscriber with a non-blocking push ([`fanout`]); a subscriber
//! whose outbox is full is dropped (its session closes with 4008) and
//! nobody else waits. Large fan-outs are shared with a pool of threads.
//!
//! A subscription joins in three steps (see [`merge`]): register as
//! *pending* (deliveries are buffered for it), read the channel's history
//! from the broker, then under the channel's lock send `subscribed`, the
//! replay and the buffered deliveries and go live. The hub tells the broker
//! which channels have local subscribers (`watch` for the first,
//! `unwatch` when the last leaves) and forgets a channel as soon as it has
//! none.

pub mod fanout;
pub mod merge;

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde_json::Value;
use serde_json::value::RawValue;
use tether_protocol::codec::{encode_publication_json, encode_publication_msgpack};
use tether_protocol::{ChannelName, Encoding, Epoch, StreamPosition};

use crate::cluster::{
    Broker, BrokerError, Deliver, HistoryEntry, HistoryRead, Position, Publication,
};
use crate::metrics::Metrics;
use crate::outbox::{Delivery, Frame, Outbox, PushError};
use fanout::{FanOutPool, LARGE_FAN_OUT, LiveSub, Template, off_the_worker};
use merge::{Buffered, Verdict};

const SHARDS: usize = 64;
/// History reads per subscription before it goes ahead unrecovered.
const READ_ATTEMPTS: usize = 3;

/// Limits of the hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Most publications read from history for one recovery (the history
    /// size: history never holds more).
    pub history_limit: usize,
    /// Deliveries buffered for one subscriber while it joins; over that it
    /// is closed as a slow consumer (its outbox would not hold them either).
    pub max_buffered: usize,
}

/// Identifies one subscription of one session: the session's id and a
/// number the session gives each of its subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionId {
    pub session: u64,
    pub sub: u32,
}

/// A subscriber as the hub sees it.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub id: SubscriptionId,
    pub outbox: Arc<Outbox>,
    pub encoding: Encoding,
}

/// The result of a subscribe.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub position: Position,
    pub recovered: bool,
    pub replayed: usize,
}

/// Why a subscribe failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The subscriber's outbox overflowed: its session is closing (4008).
    #[error(transparent)]
    Outbox(#[from] PushError),
    /// The broker could not be reached: nothing was subscribed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// A subscriber that is joining: deliveries are held for it meanwhile.
#[derive(Debug)]
struct Pending {
    id: SubscriptionId,
    encoding: Encoding,
    buffer: Vec<Buffered>,
    overflowed: bool,
}

/// Whether the broker knows this node watches the channel (for this table
/// entry).
#[derive(Debug, Default)]
enum Watch {
    #[default]
    No,
    /// A `watch` call is under way; joiners wait for it.
    Pending(Arc<tokio::sync::Notify>),
    Yes,
}

#[derive(Debug, Default)]
struct ChannelState {
    /// Shared with the fan-out pool during a large fan-out; changed with
    /// `Arc::make_mut` (never copied: the pool has let go by then).
    live: Arc<Vec<LiveSub>>,
    pending: Vec<Pending>,
    /// Subscribers (live and pending) per encoding: which frames to build.
    encodings: [usize; 2],
    watch: Watch,
    /// Set when the channel left the table: lookups must start again.
    removed: bool,
}

impl ChannelState {
    fn is_empty(&self) -> bool {
        self.live.is_empty() && self.pending.is_empty()
    }

    fn needs(&self) -> [bool; 2] {
        [self.encodings[0] > 0, self.encodings[1] > 0]
    }

    fn count(&mut self, encoding: Encoding, up: bool) {
        let n = &mut self.encodings[slot(encoding)];
        *n = if up { *n + 1 } else { n.saturating_sub(1) };
    }
}

fn slot(e: Encoding) -> usize {
    match e {
        Encoding::Json => 0,
        Encoding::MsgPack => 1,
    }
}

/// One channel's entry in the table (the name is the table's key).
type Channel = Mutex<ChannelState>;

type Shard = RwLock<HashMap<ChannelName, Arc<Channel>>>;

/// The local fan-out of one node.
pub struct Hub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    config: HubConfig,
    metrics: Metrics,
    broker: Arc<dyn Broker>,
    pool: FanOutPool,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("config", &self.config)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// Removes a pending subscriber if its subscribe does not finish (error,
/// or the future dropped).
struct PendingGuard<'a> {
    hub: &'a Hub,
    name: &'a ChannelName,
    channel: &'a Arc<Channel>,
    id: SubscriptionId,
    armed: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let empty = {
            let mut st = self.channel.lock();
            if let Some(i) = st.pending.iter().position(|p| p.id == self.id) {
                let p = st.pending.swap_remove(i);
                st.count(p.encoding, false);
            }
            st.is_empty()
        };
        if empty {
            self.hub.remove_if_empty(self.name, self.channel);
        }
    }
}

impl Hub {
    /// A hub reading positions and history from `broker`. The broker must
    /// deliver to this hub (see [`Hub::with_broker`]).
    pub fn new(config: HubConfig, metrics: Metrics, broker: Arc<dyn Broker>) -> Hub {
        Hub {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            pool: FanOutPool::for_this_machine(metrics.outbox_drops.clone()),
            config,
            metrics,
            broker,
        }
    }

    /// Builds the hub and its broker together: `make_broker` gets the sink
    /// the broker delivers to (this hub, held weakly).
    pub fn with_broker<B: Broker>(
        config: HubConfig,
        metrics: Metrics,
        make_broker: impl FnOnce(std::sync::Weak<dyn Deliver>) -> B,
    ) -> Arc<Hub> {
        Arc::new_cyclic(|hub: &std::sync::Weak<Hub>| {
            let sink: std::sync::Weak<dyn Deliver> = hub.clone();
            let broker: Arc<dyn Broker> = Arc::new(make_broker(sink));
            Hub::new(config, metrics, broker)
        })
    }

    /// The broker this hub reads from.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    fn shard(&self, name: &ChannelName) -> &Shard {
        let i = (self.hasher.hash_one(name) as usize) % self.shards.len();
        &self.shards[i]
    }

    fn lookup(&self, name: &ChannelName) -> Option<Arc<Channel>> {
        self.shard(name).read().get(name).cloned()
    }

    /// Registers `subscriber` as pending on `name`, creating the entry.
    fn register(&self, name: &ChannelName, subscriber: &Subscriber) -> Arc<Channel> {
        loop {
            let channel = match self.lookup(name) {
                Some(c) => c,
                None => self
                    .shard(name)
                    .write()
                    .entry(name.clone())
                    .or_insert_with(|| Arc::new(Mutex::new(ChannelState::default())))
                    .clone(),
            };
            let mut st = channel.lock();
            if st.removed {
                // Lost a race with the last unsubscribe: look again.
                continue;
            }
            st.pending.push(Pending {
                id: subscriber.id,
                encoding: subscriber.encoding,
                buffer: Vec::new(),
                overflowed: false,
            });
            st.count(subscriber.encoding, true);
            drop(st);
            return channel;
        }
    }

    /// Forgets `channel` (the entry of `name`) if it has no subscriber
    /// (live or pending), and tells the broker.
    fn remove_if_empty(&self, name: &ChannelName, channel: &Arc<Channel>) {
        let watched = {
            let mut shard = self.shard(name).write();
            let mut st = channel.lock();
            if !st.is_empty() || st.removed {
                return;
            }
            st.removed = true;
            if shard.get(name).is_some_and(|c| Arc::ptr_eq(c, channel)) {
                shard.remove(name);
            }
            matches!(st.watch, Watch::Yes)
        };
        if watched {
            self.broker.unwatch(name);
        }
    }

    /// Makes sure the broker knows this node watches `name` (once per table
    /// entry; concurrent joiners wait for the first one's call).
    async fn ensure_watched(
        &self,
        name: &ChannelName,
        channel: &Channel,
    ) -> Result<(), BrokerError> {
        loop {
            let wait = {
                let mut st = channel.lock();
                match &st.watch {
                    Watch::Yes => return Ok(()),
                    Watch::Pending(n) => Some(n.clone()),
                    Watch::No => {
                        st.watch = Watch::Pending(Arc::new(tokio::sync::Notify::new()));
                        None
                    }
                }
            };
            let Some(n) = wait else {
                // Settles the state however this call ends (its future may
                // be dropped): waiters never wait for a call nobody makes.
                struct Settle<'a>(&'a Channel, bool);
                impl Drop for Settle<'_> {
                    fn drop(&mut self) {
                        let next = if self.1 { Watch::Yes } else { Watch::No };
                        let was = std::mem::replace(&mut self.0.lock().watch, next);
                        if let Watch::Pending(n) = was {
                            n.notify_waiters();
                        }
                    }
                }
                let mut settle = Settle(channel, false);
                let result = self.broker.watch(name).await;
                settle.1 = result.is_ok();
                return result;
            };
            let notified = n.notified();
            tokio::pin!(notified);
            // Registered before looking again: no wake-up is missed.
            notified.as_mut().enable();
            if matches!(channel.lock().watch, Watch::Pending(_)) {
                notified.await;
            }
        }
    }

    /// Subscribes: `reply` builds the `subscribed` frame (or nothing, for a
    /// resume, whose `connected` the session queues itself), which is queued
    /// first, then the replay from history when `since` is recoverable, then
    /// live messages — with no gap and no duplicate between them.
    pub async fn subscribe(
        &self,
        channel: &ChannelName,
        subscriber: Subscriber,
        since: Option<&StreamPosition>,
        reply: impl Fn(&Position, bool) -> Option<Frame>,
    ) -> Result<Subscription, SubscribeError> {
        let ch = self.register(channel, &subscriber);
        let mut guard = PendingGuard {
            hub: self,
            name: channel,
            channel: &ch,
            id: subscriber.id,
            armed: true,
        };
        self.ensure_watched(channel, &ch).await?;
        let read = HistoryRead {
            since: since.map(|s| s.offset),
            limit: self.config.history_limit,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let page = self.broker.history(channel, read).await?;
            let mut st = ch.lock();
            let Some(i) = st.pending.iter().position(|p| p.id == subscriber.id) else {
                // Only this call removes its own registration.
                return Err(SubscribeError::Outbox(PushError::Closed));
            };
            if st.pending[i].overflowed {
                drop(st);
                subscriber.outbox.close_slow();
                return Err(SubscribeError::Outbox(PushError::Full));
            }
            let mut plan = match merge::plan(
                since,
                &page,
                &st.pending[i].buffer,
                attempt >= READ_ATTEMPTS,
            ) {
                Verdict::Ready(plan) => plan,
                Verdict::Retry => continue,
            };
            if plan.recovered
                && !replay_fits(
                    channel,
                    &subscriber.outbox,
                    &page.messages,
                    &st.pending[i].buffer,
                )
            {
                // A replay the outbox cannot hold would close the session
                // as a slow consumer before it began (and the client would
                // resume into the same wall): it is told `recovered: false`
                // and reads the history API at its own pace instead.
                plan.recovered = false;
                self.metrics.replays_too_large.inc();
            }
            let pending = st.pending.swap_remove(i);
            guard.armed = false;
            let replay = if plan.recovered {
                &page.messages[..]
            } else {
                &[]
            };
            if let Err(e) = join(channel, &subscriber, &plan, replay, pending.buffer, &reply) {
                st.count(subscriber.encoding, false);
                let empty = st.is_empty();
                drop(st);
                if empty {
                    self.remove_if_empty(channel, &ch);
                }
                return Err(SubscribeError::Outbox(e));
            }
            let live = Arc::make_mut(&mut st.live);
            if live.capacity() == 0 {
                // Most channels have one subscriber: no room for four.
                live.reserve_exact(1);
            }
            live.push(LiveSub {
                subscriber,
                skip: plan
                    .skip_through
                    .map(|o| Box::new((plan.position.epoch.clone(), o))),
            });
            drop(st);
            self.metrics.subscriptions.inc();
            return Ok(Subscription {
                replayed: replay.len(),
                position: plan.position,
                recovered: plan.recovered,
            });
        }
    }

    /// Removes a subscription; unknown ones are ignored.
    pub fn unsubscribe(&self, channel: &ChannelName, id: SubscriptionId) {
        let Some(ch) = self.lookup(channel) else {
            return;
        };
        let empty = {
            let mut st = ch.lock();
            if let Some(i) = st.live.iter().position(|s| s.subscriber.id == id) {
                let gone = Arc::make_mut(&mut st.live).swap_remove(i);
                st.count(gone.subscriber.encoding, false);
                self.metrics.subscriptions.dec();
            }
            st.is_empty()
        };
        if empty {
            self.remove_if_empty(channel, &ch);
        }
    }

    /// Channels with local subscribers (live or joining).
    pub fn channels(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}

/// Bytes a replayed message takes in the outbox beyond its data: the
/// envelope (type, channel, epoch, offset, ts) and the WebSocket header,
/// rounded up (an epoch is at most 64 bytes).
const REPLAY_ENVELOPE: usize = 160;

/// Whether the replay of `messages` and the deliveries buffered meanwhile
/// fit in what `outbox` has left, as the slow-consumer limit counts.
fn replay_fits(
    channel: &ChannelName,
    outbox: &Outbox,
    messages: &[HistoryEntry],
    buffered: &[Buffered],
) -> bool {
    let (bytes_left, messages_left) = outbox.room();
    let each = channel.as_str().len() + REPLAY_ENVELOPE;
    let bytes = messages
        .iter()
        .map(|e| e.data.get().len() + each)
        .chain(buffered.iter().map(|b| b.bytes.len()))
        .sum::<usize>()
        // The `subscribed` reply.
        .saturating_add(each);
    let count = messages.len() + buffered.len() + 1;
    bytes <= bytes_left && count <= messages_left
}

/// Queues what a joining subscriber is owed, in order: `subscribed` (from
/// `reply`), the replay, the buffered deliveries the plan keeps.
fn join(
    channel: &ChannelName,
    subscriber: &Subscriber,
    plan: &merge::Plan,
    replay: &[HistoryEntry],
    buffered: Vec<Buffered>,
    reply: &impl Fn(&Position, bool) -> Option<Frame>,
) -> Result<(), PushError> {
    let outbox = &subscriber.outbox;
    if let Some(frame) = reply(&plan.position, plan.recovered) {
        outbox.push(frame)?;
    }
    let sub = subscriber.id.sub;
    for e in replay {
        let bytes = encode_entry(channel, &plan.position.epoch, e, subscriber.encoding);
        outbox.push(Frame::message(
            bytes,
            None,
            Delivery {
                sub,
                offset: e.offset,
            },
        ))?;
    }
    for b in buffered {
        if b.epoch == plan.position.epoch && b.offset > plan.after {
            outbox.push(Frame::message(
                b.bytes,
                b.published_at,
                Delivery {
                    sub,
                    offset: b.offset,
                },
            ))?;
        }
    }
    Ok(())
}

impl Deliver for Hub {
    /// Feeds every live subscriber of `channel` and buffers the publication
    /// for those joining. Never waits on a client.
    fn deliver(&self, channel: &ChannelName, p: &Publication<'_>) {
        loop {
            let Some(ch) = self.lookup(channel) else {
                return;
            };
            let mut st = ch.lock();
            if st.removed {
                continue;
            }
            let template = Template::new(channel, p, st.needs());
            let max = self.config.max_buffered;
            for pending in st.pending.iter_mut().filter(|p| !p.overflowed) {
                if pending.buffer.len() >= max {
                    pending.overflowed = true;
                    pending.buffer = Vec::new();
                } else if let Some(bytes) = template.bytes(pending.encoding) {
                    pending.buffer.push(Buffered {
                        epoch: template.epoch.clone(),
                        offset: template.offset,
                        bytes: bytes.clone(),
                        published_at: template.published_at,
                    });
                }
            }
            let subs = &st.live;
            let dropped = if subs.len() >= LARGE_FAN_OUT {
                off_the_worker(|| self.pool.run(subs, template))
            } else {
                fanout::feed(subs, &template, &self.metrics.outbox_drops)
            };
            if dropped {
                let before = st.live.len();
                Arc::make_mut(&mut st.live).retain(|s| !s.subscriber.outbox.is_closed());
                let closed = before - st.live.len();
                self.metrics.subscriptions.dec_by(closed as i64);
                let mut counts = [0usize; 2];
                for s in st.live.iter() {
                    counts[slot(s.subscriber.encoding)] += 1;
                }
                for p in &st.pending {
                    counts[slot(p.encoding)] += 1;
                }
                st.encodings = counts;
                if st.is_empty() {
                    drop(st);
                    self.remove_if_empty(channel, &ch);
                }
            }
            return;
        }
    }
}

/// `data` as compact JSON text. A `Value` always serializes; the fallback
/// only keeps this total.
pub fn encode_data(data: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(data)
        .unwrap_or_else(|_| RawValue::from_string("null".into()).unwrap_or_default())
}

fn encode_entry(
    channel: &ChannelName,
    epoch: &Epoch,
    e: &HistoryEntry,
    encoding: Encoding,
) -> Bytes {
    match encoding {
        Encoding::Json => encode_publication_json(channel, epoch, e.offset, &e.data, e.ts),
        Encoding::MsgPack => {
            let data: Value = serde_json::from_str(e.data.get()).unwrap_or(Value::Null);
            encode_publication_msgpack(channel, epoch, e.offset, &data, e.ts)
        }
    }
}

#[cfg(test)]
mod tests;
