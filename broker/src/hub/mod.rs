//! The hub: channel → subscribers, offsets, epochs and history, sharded by
//! channel name. It knows nothing of sockets: a subscriber is an outbox and
//! an encoding.
//!
//! A publication is encoded once per encoding and the same `Bytes` go to
//! every subscriber with a non-blocking push; a subscriber whose outbox is
//! full is dropped (its session closes with 4008) and nobody else waits.
//!
//! Offsets are assigned, history appended and subscribers fed under one lock
//! per channel, so every subscriber sees offsets strictly increasing, and a
//! subscription (with its replay from history) slots in between two
//! publications: no gap, no duplicate.

pub mod history;

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde_json::Value;
use serde_json::value::RawValue;
use tether_protocol::codec::{encode_publication_json, encode_publication_msgpack};
use tether_protocol::{ChannelName, Encoding, Epoch, Offset, StreamPosition};

use crate::metrics::Metrics;
use crate::session::outbox::{Delivery, Frame, Outbox, PushError};
use history::{Entry, EntryRef};
pub use history::{History, MemoryHistory};

const SHARDS: usize = 64;
/// Subscribers from which a fan-out (one socket write each, a few µs apiece)
/// is taken off the runtime worker it runs on (see [`off_the_worker`]).
const LARGE_FAN_OUT: usize = 512;

/// Runs `f`, a long synchronous fan-out, without holding up the other tasks
/// queued on this runtime worker: on the multi-threaded runtime they move to
/// another worker meanwhile (`block_in_place`). Elsewhere (no runtime, or a
/// current-thread one, as in tests) it just runs `f`.
fn off_the_worker<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Splits a large fan-out over the machine's cores: the calling thread
/// feeds the first share, scoped threads the others, all joined before this
/// returns (the channel's lock, held by the caller, keeps publications in
/// order). A thread that cannot be started leaves its share to the caller.
/// Returns whether any subscriber refused (`feed`'s answer).
fn in_parallel(subs: &[Subscriber], feed: &(impl Fn(&[Subscriber]) -> bool + Sync)) -> bool {
    static CORES: OnceLock<usize> = OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // At least half a large fan-out per thread: below that, starting a
    // thread costs more than it saves.
    let threads = cores.min(subs.len() / (LARGE_FAN_OUT / 2)).max(1);
    if threads == 1 {
        return feed(subs);
    }
    let share = subs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut shares = subs.chunks(share);
        let mine = shares.next().unwrap_or_default();
        let mut inline = Vec::new();
        let mut handles = Vec::with_capacity(threads - 1);
        for part in shares {
            match std::thread::Builder::new()
                .name("tether-fan-out".into())
                .spawn_scoped(scope, move || feed(part))
            {
                Ok(h) => handles.push(h),
                Err(_) => inline.push(part),
            }
        }
        let mut dropped = feed(mine);
        for part in inline {
            dropped |= feed(part);
        }
        for h in handles {
            // A share whose thread panicked: look for closed outboxes anyway.
            dropped |= h.join().unwrap_or(true);
        }
        dropped
    })
}

/// Limits of the hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub history_size: usize,
    pub history_ttl: Duration,
    /// How long a channel with no subscriber and no history is kept (so that
    /// its epoch and offset survive short gaps) before it is forgotten.
    pub idle_channel_ttl: Duration,
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

/// A channel's current position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Epoch,
    pub offset: Offset,
}

/// The result of a subscribe.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub position: Position,
    pub recovered: bool,
    pub replayed: usize,
}

/// A page of history (`GET /v1/channels/{channel}/history`).
#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub position: Position,
    pub recovered: bool,
    pub messages: Vec<(Offset, Box<RawValue>, u64)>,
}

#[derive(Debug)]
struct ChannelState<H> {
    epoch: Epoch,
    offset: Offset,
    subscribers: Vec<Subscriber>,
    history: H,
    last_activity: Instant,
    /// Set when the sweeper forgot this channel: lookups must start again.
    removed: bool,
}

#[derive(Debug)]
struct Channel<H> {
    name: ChannelName,
    state: Mutex<ChannelState<H>>,
}

type Shard<H> = RwLock<HashMap<ChannelName, Arc<Channel<H>>>>;

/// The sharded channel table of one node.
#[derive(Debug)]
pub struct Hub<H: History = MemoryHistory> {
    shards: Box<[Shard<H>]>,
    hasher: RandomState,
    config: HubConfig,
    metrics: Metrics,
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn new_epoch() -> Epoch {
    Epoch::new(format!("{:016x}", rand::random::<u64>()))
}

impl<H: History> Hub<H> {
    pub fn new(config: HubConfig, metrics: Metrics) -> Hub<H> {
        Hub {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            config,
            metrics,
        }
    }

    fn shard(&self, name: &ChannelName) -> &Shard<H> {
        let i = (self.hasher.hash_one(name) as usize) % self.shards.len();
        &self.shards[i]
    }

    fn lookup(&self, name: &ChannelName) -> Option<Arc<Channel<H>>> {
        self.shard(name).read().get(name).cloned()
    }

    fn get_or_create(&self, name: &ChannelName) -> Arc<Channel<H>> {
        if let Some(c) = self.lookup(name) {
            return c;
        }
        let mut shard = self.shard(name).write();
        shard
            .entry(name.clone())
            .or_insert_with(|| {
                self.metrics.channels.inc();
                Arc::new(Channel {
                    name: name.clone(),
                    state: Mutex::new(ChannelState {
                        epoch: new_epoch(),
                        offset: Offset::ZERO,
                        subscribers: Vec::new(),
                        history: H::default(),
                        last_activity: Instant::now(),
                        removed: false,
                    }),
                })
            })
            .clone()
    }

    /// Keeps the history gauges true after `h` changed from `before`
    /// (messages, payload bytes).
    fn account(&self, before: (usize, usize), h: &H) {
        let m = &self.metrics;
        m.history_messages.inc_by(h.len() as i64 - before.0 as i64);
        m.history_bytes
            .inc_by(h.payload_bytes() as i64 - before.1 as i64);
    }

    /// Runs `f` on the live state of `name`, creating the channel if needed.
    fn with_channel<R>(
        &self,
        name: &ChannelName,
        mut f: impl FnMut(&Channel<H>, &mut ChannelState<H>) -> R,
    ) -> R {
        loop {
            let channel = self.get_or_create(name);
            let mut state = channel.state.lock();
            if state.removed {
                // Lost a race with the sweeper; the next lookup creates it anew.
                continue;
            }
            return f(&channel, &mut state);
        }
    }

    /// Publishes `data` on `channel`: assigns the next offset, appends to
    /// history and feeds every subscriber. Never waits on a client.
    pub fn publish(&self, channel: &ChannelName, data: &Value) -> Position {
        self.publish_encoded(channel, data, encode_data(data))
    }

    /// [`Hub::publish`] for a caller that already has `data` as JSON text
    /// (`raw` must be `data` encoded; the API sizes publications with it).
    pub fn publish_encoded(
        &self,
        channel: &ChannelName,
        data: &Value,
        raw: Box<RawValue>,
    ) -> Position {
        let ts = unix_millis();
        let published_at = Instant::now();
        let cfg = &self.config;
        let metrics = &self.metrics;
        self.with_channel(channel, |ch, st| {
            st.offset = st.offset.next();
            st.last_activity = published_at;
            let offset = st.offset;
            // Encoded once per encoding, and only if someone needs it.
            let json: OnceLock<Bytes> = OnceLock::new();
            let msgpack: OnceLock<Bytes> = OnceLock::new();
            let feed = |subs: &[Subscriber]| -> bool {
                let mut dropped = false;
                for s in subs {
                    let bytes = match s.encoding {
                        Encoding::Json => json
                            .get_or_init(|| {
                                encode_publication_json(&ch.name, &st.epoch, offset, &raw, ts)
                            })
                            .clone(),
                        Encoding::MsgPack => msgpack
                            .get_or_init(|| {
                                encode_publication_msgpack(&ch.name, &st.epoch, offset, data, ts)
                            })
                            .clone(),
                    };
                    let frame = Frame::message(
                        bytes,
                        Some(published_at),
                        Delivery {
                            sub: s.id.sub,
                            offset,
                        },
                    );
                    match s.outbox.push(frame) {
                        Ok(()) => {}
                        Err(PushError::Full) => {
                            metrics.outbox_drops.inc();
                            dropped = true;
                        }
                        Err(PushError::Closed) => dropped = true,
                    }
                }
                dropped
            };
            let subs = &st.subscribers[..];
            let dropped = if subs.len() >= LARGE_FAN_OUT {
                off_the_worker(|| in_parallel(subs, &feed))
            } else {
                feed(subs)
            };
            if dropped {
                let before = st.subscribers.len();
                st.subscribers.retain(|s| !s.outbox.is_closed());
                metrics
                    .subscriptions
                    .dec_by((before - st.subscribers.len()) as i64);
            }
            let before = (st.history.len(), st.history.payload_bytes());
            st.history.push(
                Entry {
                    offset,
                    ts,
                    data: raw.clone(),
                },
                cfg.history_size,
                cfg.history_ttl,
                ts,
            );
            self.account(before, &st.history);
            Position {
                epoch: st.epoch.clone(),
                offset,
            }
        })
    }

    /// Subscribes, atomically with respect to publications on the channel:
    /// `reply` builds the `subscribed` frame (or nothing, for a resume, whose
    /// `connected` the session queues itself), which is queued first, then the
    /// replay from history when `since` is recoverable, then live messages.
    pub fn subscribe(
        &self,
        channel: &ChannelName,
        subscriber: Subscriber,
        since: Option<&StreamPosition>,
        reply: impl Fn(&Position, bool) -> Option<Frame>,
    ) -> Result<Subscription, PushError> {
        let now = Instant::now();
        let ttl = self.config.history_ttl;
        let result = self.with_channel(channel, |ch, st| {
            let before = (st.history.len(), st.history.payload_bytes());
            st.history.expire(ttl, unix_millis());
            self.account(before, &st.history);
            st.last_activity = now;
            let position = Position {
                epoch: st.epoch.clone(),
                offset: st.offset,
            };
            let recovered = since.is_some_and(|s| {
                s.epoch == st.epoch && st.history.reaches_back_to(s.offset, st.offset)
            });
            if let Some(frame) = reply(&position, recovered) {
                subscriber.outbox.push(frame)?;
            }
            let mut replayed = 0;
            if let (true, Some(s)) = (recovered, since) {
                for e in st.history.after(s.offset) {
                    let bytes = encode_entry(&ch.name, &st.epoch, e, subscriber.encoding);
                    subscriber.outbox.push(Frame::message(
                        bytes,
                        None,
                        Delivery {
                            sub: subscriber.id.sub,
                            offset: e.offset,
                        },
                    ))?;
                    replayed += 1;
                }
            }
            st.subscribers.push(subscriber.clone());
            Ok(Subscription {
                position,
                recovered,
                replayed,
            })
        });
        if result.is_ok() {
            self.metrics.subscriptions.inc();
        }
        result
    }

    /// Removes a subscription; unknown ones are ignored.
    pub fn unsubscribe(&self, channel: &ChannelName, id: SubscriptionId) {
        let Some(ch) = self.lookup(channel) else {
            return;
        };
        let mut st = ch.state.lock();
        if let Some(i) = st.subscribers.iter().position(|s| s.id == id) {
            st.subscribers.swap_remove(i);
            st.last_activity = Instant::now();
            self.metrics.subscriptions.dec();
        }
    }

    /// The channel's position, without creating it.
    pub fn position(&self, channel: &ChannelName) -> Option<Position> {
        let ch = self.lookup(channel)?;
        let st = ch.state.lock();
        Some(Position {
            epoch: st.epoch.clone(),
            offset: st.offset,
        })
    }

    /// Retained messages after `since`, oldest first, at most `limit`.
    pub fn history(&self, channel: &ChannelName, since: Offset, limit: usize) -> HistoryPage {
        let Some(ch) = self.lookup(channel) else {
            return HistoryPage {
                position: Position {
                    epoch: Epoch::default(),
                    offset: Offset::ZERO,
                },
                recovered: since == Offset::ZERO,
                messages: Vec::new(),
            };
        };
        let mut st = ch.state.lock();
        let before = (st.history.len(), st.history.payload_bytes());
        st.history.expire(self.config.history_ttl, unix_millis());
        self.account(before, &st.history);
        HistoryPage {
            position: Position {
                epoch: st.epoch.clone(),
                offset: st.offset,
            },
            recovered: st.history.reaches_back_to(since, st.offset),
            messages: st
                .history
                .after(since)
                .take(limit)
                .map(|e| (e.offset, e.data.to_owned(), e.ts))
                .collect(),
        }
    }

    /// Drops expired history everywhere and forgets channels that have had
    /// no subscriber, no history and no activity for `idle_channel_ttl`.
    /// Called periodically by the server, never on the publish path.
    pub fn sweep(&self) {
        let now = Instant::now();
        let now_ms = unix_millis();
        for shard in self.shards.iter() {
            let mut map = shard.write();
            map.retain(|_, ch| {
                let mut st = ch.state.lock();
                let before = (st.history.len(), st.history.payload_bytes());
                st.history.expire(self.config.history_ttl, now_ms);
                self.account(before, &st.history);
                let idle = st.subscribers.is_empty()
                    && st.history.is_empty()
                    && now.saturating_duration_since(st.last_activity)
                        > self.config.idle_channel_ttl;
                if idle {
                    st.removed = true;
                    self.metrics.channels.dec();
                }
                !idle
            });
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
    e: EntryRef<'_>,
    encoding: Encoding,
) -> Bytes {
    match encoding {
        Encoding::Json => encode_publication_json(channel, epoch, e.offset, e.data, e.ts),
        Encoding::MsgPack => {
            let data: Value = serde_json::from_str(e.data.get()).unwrap_or(Value::Null);
            encode_publication_msgpack(channel, epoch, e.offset, &data, e.ts)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;
    use std::collections::VecDeque;
    use std::task::{Context, Poll};
    use tether_protocol::ServerMessage;
    use tether_protocol::codec::decode_server;

    fn hub(size: usize) -> Hub {
        Hub::new(
            HubConfig {
                history_size: size,
                history_ttl: Duration::from_secs(60),
                idle_channel_ttl: Duration::from_secs(60),
            },
            Metrics::new(&mut Registry::default()),
        )
    }

    fn chan(s: &str) -> ChannelName {
        ChannelName::new(s).expect("valid")
    }

    fn subscriber(session: u64, outbox: &Arc<Outbox>) -> Subscriber {
        Subscriber {
            id: SubscriptionId { session, sub: 1 },
            outbox: outbox.clone(),
            encoding: Encoding::Json,
        }
    }

    fn reply(_: &Position, _: bool) -> Option<Frame> {
        Some(Frame::reply(Bytes::from_static(b"{\"type\":\"pong\"}")))
    }

    fn drain(ob: &Outbox) -> Vec<ServerMessage> {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let mut out = VecDeque::new();
        while let Poll::Ready(crate::session::outbox::Drained::Frames) =
            ob.poll_drain(&mut cx, &mut out, 1000)
        {}
        out.into_iter()
            .map(|f| decode_server(&f.bytes, Encoding::Json, 1 << 20).expect("decodes"))
            .collect()
    }

    fn offsets(msgs: &[ServerMessage]) -> Vec<u64> {
        msgs.iter()
            .filter_map(|m| match m {
                ServerMessage::Message(p) => Some(p.offset.get()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn offsets_increase_and_reach_every_subscriber() {
        let hub = hub(10);
        let a = Outbox::new(1 << 20, 1000);
        let b = Outbox::new(1 << 20, 1000);
        hub.subscribe(&chan("c"), subscriber(1, &a), None, reply)
            .expect("room");
        hub.subscribe(&chan("c"), subscriber(2, &b), None, reply)
            .expect("room");
        for i in 0..3 {
            let p = hub.publish(&chan("c"), &serde_json::json!({"i": i}));
            assert_eq!(p.offset, Offset(i + 1));
        }
        assert_eq!(offsets(&drain(&a)), vec![1, 2, 3]);
        assert_eq!(offsets(&drain(&b)), vec![1, 2, 3]);
    }

    /// A large fan-out leaves the runtime worker on a multi-threaded runtime
    /// and runs in place elsewhere; either way every subscriber gets it.
    fn large_fan_out_reaches_everyone() {
        let hub = hub(10);
        let outboxes: Vec<_> = (0..LARGE_FAN_OUT as u64 + 10)
            .map(|i| {
                let ob = Outbox::new(1 << 20, 1000);
                hub.subscribe(&chan("big"), subscriber(i, &ob), None, |_, _| None)
                    .expect("room");
                ob
            })
            .collect();
        hub.publish(&chan("big"), &serde_json::json!("x"));
        for ob in &outboxes {
            assert_eq!(offsets(&drain(ob)), vec![1]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_fan_out_on_a_multi_threaded_runtime() {
        large_fan_out_reaches_everyone();
    }

    #[tokio::test]
    async fn large_fan_out_on_a_current_thread_runtime() {
        large_fan_out_reaches_everyone();
    }

    #[test]
    fn large_fan_out_outside_a_runtime() {
        large_fan_out_reaches_everyone();
    }

    #[test]
    fn a_full_outbox_drops_only_that_subscriber() {
        let hub = hub(10);
        let slow = Outbox::new(300, 1000);
        let fast = Outbox::new(1 << 20, 1000);
        hub.subscribe(&chan("c"), subscriber(1, &slow), None, reply)
            .expect("room");
        hub.subscribe(&chan("c"), subscriber(2, &fast), None, reply)
            .expect("room");
        for _ in 0..10 {
            hub.publish(
                &chan("c"),
                &serde_json::json!("a fairly long payload of text"),
            );
        }
        assert!(slow.is_closed());
        assert_eq!(offsets(&drain(&fast)).len(), 10);
    }

    #[test]
    fn subscribe_since_replays_exactly_the_missed_messages() {
        let hub = hub(5);
        let first = hub.publish(&chan("c"), &serde_json::json!(1));
        for i in 2..=4 {
            hub.publish(&chan("c"), &serde_json::json!(i));
        }
        let ob = Outbox::new(1 << 20, 1000);
        let since = StreamPosition {
            epoch: first.epoch.clone(),
            offset: Offset(2),
        };
        let s = hub
            .subscribe(&chan("c"), subscriber(1, &ob), Some(&since), reply)
            .expect("room");
        assert!(s.recovered);
        assert_eq!(s.replayed, 2);
        hub.publish(&chan("c"), &serde_json::json!(5));
        assert_eq!(offsets(&drain(&ob)), vec![3, 4, 5]);

        // Another epoch, or a position history no longer holds: no replay.
        let ob = Outbox::new(1 << 20, 1000);
        let wrong = StreamPosition {
            epoch: Epoch::new("other"),
            offset: Offset(2),
        };
        let s = hub
            .subscribe(&chan("c"), subscriber(2, &ob), Some(&wrong), reply)
            .expect("room");
        assert!(!s.recovered);
        for _ in 0..10 {
            hub.publish(&chan("c"), &serde_json::json!(0));
        }
        let ob = Outbox::new(1 << 20, 1000);
        let old = StreamPosition {
            epoch: first.epoch,
            offset: Offset(1),
        };
        let s = hub
            .subscribe(&chan("c"), subscriber(3, &ob), Some(&old), reply)
            .expect("room");
        assert!(!s.recovered);
        assert_eq!(s.replayed, 0);
    }

    #[test]
    fn sweeping_forgets_idle_channels_only() {
        let hub: Hub = Hub::new(
            HubConfig {
                history_size: 10,
                history_ttl: Duration::from_millis(1),
                idle_channel_ttl: Duration::ZERO,
            },
            Metrics::new(&mut Registry::default()),
        );
        hub.publish(&chan("idle"), &serde_json::json!(1));
        let ob = Outbox::new(1 << 20, 1000);
        hub.subscribe(&chan("busy"), subscriber(1, &ob), None, reply)
            .expect("room");
        std::thread::sleep(Duration::from_millis(5));
        hub.sweep();
        assert!(hub.position(&chan("idle")).is_none());
        assert!(hub.position(&chan("busy")).is_some());
    }
}

#[cfg(test)]
mod interleavings {
    //! Property: whatever the interleaving of publications and
    //! subscriptions-with-`since`, each recovered subscriber sees every
    //! offset after its `since` exactly once, in order.
    use super::*;
    use prometheus_client::registry::Registry;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::task::{Context, Poll};
    use tether_protocol::ServerMessage;
    use tether_protocol::codec::decode_server;

    #[derive(Debug, Clone)]
    enum Op {
        Publish,
        /// Subscribe since `back` offsets before the latest.
        Subscribe {
            back: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Publish),
            1 => (0u64..15).prop_map(|back| Op::Subscribe { back }),
        ]
    }

    proptest! {
        #[test]
        fn recovered_subscribers_see_every_offset_once_in_order(ops in prop::collection::vec(op(), 1..120)) {
            let hub: Hub = Hub::new(
                HubConfig {
                    history_size: 10,
                    history_ttl: Duration::from_secs(60),
                    idle_channel_ttl: Duration::from_secs(60),
                },
                Metrics::new(&mut Registry::default()),
            );
            let ch = ChannelName::new("p").expect("valid");
            let mut subs: Vec<(Arc<Outbox>, u64, bool)> = Vec::new();
            let mut latest = Position { epoch: Epoch::default(), offset: Offset::ZERO };
            for (i, op) in ops.iter().enumerate() {
                match op {
                    Op::Publish => latest = hub.publish(&ch, &serde_json::json!(i)),
                    Op::Subscribe { back } => {
                        let ob = Outbox::new(1 << 24, 1 << 20);
                        let since = latest.offset.get().saturating_sub(*back);
                        let existing = hub.position(&ch);
                        let exists = existing.is_some();
                        let epoch = existing.map(|p| p.epoch).unwrap_or_default();
                        let s = hub.subscribe(
                            &ch,
                            Subscriber { id: SubscriptionId { session: i as u64, sub: 1 }, outbox: ob.clone(), encoding: Encoding::Json },
                            Some(&StreamPosition { epoch, offset: Offset(since) }),
                            |_, _| None,
                        ).expect("room");
                        // Recovered exactly when the epoch is known and the
                        // history (10 messages) reaches back to `since`.
                        prop_assert_eq!(s.recovered, exists && latest.offset.get() - since <= 10);
                        subs.push((ob, since, s.recovered));
                    }
                }
            }
            for (ob, since, recovered) in subs {
                let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
                let mut out = VecDeque::new();
                while let Poll::Ready(crate::session::outbox::Drained::Frames) = ob.poll_drain(&mut cx, &mut out, 10_000) {}
                let offsets: Vec<u64> = out
                    .iter()
                    .filter_map(|f| match decode_server(&f.bytes, Encoding::Json, 1 << 20) {
                        Ok(ServerMessage::Message(p)) => Some(p.offset.get()),
                        _ => None,
                    })
                    .collect();
                if recovered {
                    let expected: Vec<u64> = (since + 1..=latest.offset.get()).collect();
                    prop_assert_eq!(offsets, expected);
                } else {
                    prop_assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1));
                }
            }
        }
    }
}
