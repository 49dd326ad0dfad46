//! [`MemoryBroker`]: channel positions, history and idempotency keys of a
//! single node, in memory, sharded by channel name.
//!
//! Under one mutex per channel it assigns the next offset, hands the
//! publication to the hub ([`Deliver`]) and appends it to history. So every
//! history read comes either before a publication or after it, and the
//! hub receives a channel's publications in offset order.
//!
//! A channel's epoch is random per channel instance; it changes on restart
//! and when a channel that nobody watches, with no history and no activity
//! for `idle_channel_ttl`, is forgotten by [`Broker::sweep`] — only then.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use serde_json::Value;
use serde_json::value::RawValue;
use tether_protocol::{ChannelName, Epoch, Offset};

use super::history::{Entry, MemoryHistory};
use super::idempotency::{self, IdempotencyCache};
use crate::cluster::{
    BoxFuture, Broker, BrokerError, Deliver, HistoryEntry, HistoryPage, HistoryRead, Position,
    Publication, Publish, Published,
};
use crate::metrics::Metrics;

const SHARDS: usize = 64;

/// Limits of the memory broker.
#[derive(Debug, Clone)]
pub struct MemoryBrokerConfig {
    pub history_size: usize,
    pub history_ttl: Duration,
    /// How long a channel nobody watches, with no history, is kept (so
    /// that its epoch and offset survive short gaps) before it is forgotten.
    pub idle_channel_ttl: Duration,
    /// Idempotency keys remembered (for `history_ttl` each).
    pub idempotency_keys: usize,
    /// Channels kept at most (`--max-channels`): past it, a new channel is
    /// refused (`unavailable`) until the sweeper forgets idle ones.
    pub max_channels: usize,
    /// Payload bytes of history across all channels
    /// (`--max-history-bytes`): a publication that would go past it is
    /// delivered but not retained, and its channel's history is dropped
    /// (a later recovery from before it is declared `recovered: false`,
    /// never a silent gap).
    pub max_history_bytes: usize,
}

impl MemoryBrokerConfig {
    /// The limits for a node's configuration.
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self {
            history_size: c.history_size,
            history_ttl: c.history_ttl,
            idle_channel_ttl: c.history_ttl + c.resume_window + Duration::from_secs(60),
            idempotency_keys: idempotency::DEFAULT_CAPACITY,
            max_channels: c.max_channels,
            max_history_bytes: c.max_history_bytes,
        }
    }
}

#[derive(Debug)]
struct ChannelState {
    /// The epoch, as a number (its name is made when it is needed: a
    /// channel nobody publishes to carries no string).
    epoch: u64,
    offset: Offset,
    /// `None` while nothing is retained (most channels, most of the time).
    history: Option<Box<MemoryHistory>>,
    /// Seconds since the broker started, at the last publish, watch or
    /// unwatch.
    last_activity: u32,
    /// [`Broker::watch`] calls not yet matched by `unwatch`.
    watchers: u32,
    /// Set when the sweeper forgot this channel: lookups must start again.
    removed: bool,
}

impl ChannelState {
    fn history(&self) -> &MemoryHistory {
        static EMPTY: MemoryHistory = MemoryHistory::new();
        self.history.as_deref().unwrap_or(&EMPTY)
    }
}

type Shard = RwLock<HashMap<ChannelName, Arc<Mutex<ChannelState>>>>;

/// The broker of a single node.
pub struct MemoryBroker {
    shards: Box<[Shard]>,
    hasher: RandomState,
    config: MemoryBrokerConfig,
    metrics: Metrics,
    sink: Weak<dyn Deliver>,
    idempotency: IdempotencyCache,
    started: Instant,
    /// Channels in the shards.
    count: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn epoch_name(epoch: u64) -> Epoch {
    Epoch::new(format!("{epoch:016x}"))
}

impl MemoryBroker {
    /// A broker that delivers to `sink` (the hub; weak, so that the hub,
    /// which holds the broker, can be dropped).
    pub fn new(config: MemoryBrokerConfig, metrics: Metrics, sink: Weak<dyn Deliver>) -> Self {
        MemoryBroker {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            idempotency: IdempotencyCache::new(config.history_ttl, config.idempotency_keys),
            config,
            metrics,
            sink,
            started: Instant::now(),
            count: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Seconds since the broker started (what `last_activity` counts in).
    fn now_secs(&self) -> u32 {
        u32::try_from(self.started.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    fn shard(&self, name: &ChannelName) -> &Shard {
        let i = (self.hasher.hash_one(name) as usize) % self.shards.len();
        &self.shards[i]
    }

    fn lookup(&self, name: &ChannelName) -> Option<Arc<Mutex<ChannelState>>> {
        self.shard(name).read().get(name).cloned()
    }

    /// The channel, created if needed; refused when the node already holds
    /// `max_channels` (a client looping subscribe/unsubscribe over new
    /// names must not grow memory without bound).
    fn get_or_create(&self, name: &ChannelName) -> Result<Arc<Mutex<ChannelState>>, BrokerError> {
        use std::sync::atomic::Ordering;
        if let Some(c) = self.lookup(name) {
            return Ok(c);
        }
        let mut shard = self.shard(name).write();
        if let Some(c) = shard.get(name) {
            return Ok(c.clone());
        }
        if self.count.load(Ordering::Relaxed) >= self.config.max_channels {
            self.metrics.channels_refused.inc();
            return Err(BrokerError::Unavailable(format!(
                "this node holds its limit of {} channels (--max-channels); try again later",
                self.config.max_channels
            )));
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(shard
            .entry(name.clone())
            .or_insert_with(|| {
                self.metrics.channels.inc();
                Arc::new(Mutex::new(ChannelState {
                    epoch: rand::random::<u64>(),
                    offset: Offset::ZERO,
                    history: None,
                    last_activity: self.now_secs(),
                    watchers: 0,
                    removed: false,
                }))
            })
            .clone())
    }

    /// Runs `f` on the live state of `name`, creating the channel if needed.
    fn with_channel<R>(
        &self,
        name: &ChannelName,
        f: impl FnOnce(&mut ChannelState) -> R,
    ) -> Result<R, BrokerError> {
        loop {
            let channel = self.get_or_create(name)?;
            let mut state = channel.lock();
            if state.removed {
                // Lost a race with the sweeper; the next lookup creates it anew.
                continue;
            }
            return Ok(f(&mut state));
        }
    }

    /// Keeps the history gauges true after `h` changed from `before`
    /// (messages, payload bytes).
    fn account(&self, before: (usize, usize), h: &MemoryHistory) {
        let h = (h.len(), h.payload_bytes());
        let m = &self.metrics;
        m.history_messages.inc_by(h.0 as i64 - before.0 as i64);
        m.history_bytes.inc_by(h.1 as i64 - before.1 as i64);
    }

    fn expire(&self, st: &mut ChannelState, now_ms: u64) {
        let Some(h) = st.history.as_deref_mut() else {
            return;
        };
        let before = (h.len(), h.payload_bytes());
        h.expire(self.config.history_ttl, now_ms);
        self.account(before, h);
        if h.is_empty() {
            st.history = None;
        }
    }

    /// Assigns the next offset, delivers, appends to history.
    fn publish_now(
        &self,
        channel: &ChannelName,
        data: Option<&Value>,
        raw: Box<RawValue>,
    ) -> Result<Position, BrokerError> {
        let ts = unix_millis();
        let published_at = Instant::now();
        let cfg = &self.config;
        self.with_channel(channel, |st| {
            st.offset = st.offset.next();
            st.last_activity = self.now_secs();
            let epoch = epoch_name(st.epoch);
            if let Some(sink) = self.sink.upgrade() {
                sink.deliver(
                    channel,
                    &Publication {
                        epoch: &epoch,
                        offset: st.offset,
                        ts,
                        raw: &raw,
                        data,
                        published_at: Some(published_at),
                    },
                );
            }
            let offset = st.offset;
            // The gauge is the node's history bytes (kept by `account`).
            let total = usize::try_from(self.metrics.history_bytes.get()).unwrap_or(0);
            if total.saturating_add(raw.get().len()) > cfg.max_history_bytes {
                // Over the node's history budget: not retained, and the
                // channel's older history goes too, so that what is kept
                // never has a hole a recovery could read past.
                if let Some(h) = st.history.take() {
                    self.account((h.len(), h.payload_bytes()), &MemoryHistory::new());
                }
                self.metrics.history_not_retained.inc();
                return Position {
                    epoch,
                    offset: st.offset,
                };
            }
            let h = st.history.get_or_insert_with(Box::default);
            let before = (h.len(), h.payload_bytes());
            h.push(
                Entry {
                    offset,
                    ts,
                    data: raw,
                },
                cfg.history_size,
                cfg.history_ttl,
                ts,
            );
            self.account(before, h);
            Position {
                epoch,
                offset: st.offset,
            }
        })
    }

    fn read(&self, channel: &ChannelName, read: HistoryRead) -> HistoryPage {
        let Some(ch) = self.lookup(channel) else {
            return HistoryPage {
                position: Position {
                    epoch: Epoch::default(),
                    offset: Offset::ZERO,
                },
                recovered: read.since == Some(Offset::ZERO),
                messages: Vec::new(),
            };
        };
        let mut st = ch.lock();
        self.expire(&mut st, unix_millis());
        let (recovered, messages) = match read.since {
            None => (false, Vec::new()),
            Some(since) => (
                st.history().reaches_back_to(since, st.offset),
                st.history()
                    .after(since)
                    .take(read.limit)
                    .map(|e| HistoryEntry {
                        offset: e.offset,
                        ts: e.ts,
                        data: e.data.to_owned(),
                    })
                    .collect(),
            ),
        };
        HistoryPage {
            position: Position {
                epoch: epoch_name(st.epoch),
                offset: st.offset,
            },
            recovered,
            messages,
        }
    }
}

impl Broker for MemoryBroker {
    fn publish<'a>(&'a self, p: Publish<'a>) -> BoxFuture<'a, Result<Published, BrokerError>> {
        Box::pin(async move {
            match p.idempotency_key {
                None => Ok(Published {
                    position: self.publish_now(p.channel, p.data, p.raw)?,
                    fresh: true,
                }),
                Some(key) => {
                    let (position, fresh) = self
                        .idempotency
                        .get_or_publish(p.channel, key, || {
                            self.publish_now(p.channel, p.data, p.raw)
                        })
                        .await?;
                    Ok(Published { position, fresh })
                }
            }
        })
    }

    fn history<'a>(
        &'a self,
        channel: &'a ChannelName,
        read: HistoryRead,
    ) -> BoxFuture<'a, Result<HistoryPage, BrokerError>> {
        let page = self.read(channel, read);
        Box::pin(async move { Ok(page) })
    }

    fn watch<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<(), BrokerError>> {
        let watched = self.with_channel(channel, |st| {
            st.watchers += 1;
            st.last_activity = self.now_secs();
        });
        Box::pin(async { watched })
    }

    fn unwatch(&self, channel: &ChannelName) {
        if let Some(ch) = self.lookup(channel) {
            let mut st = ch.lock();
            st.watchers = st.watchers.saturating_sub(1);
            st.last_activity = self.now_secs();
        }
    }

    /// Drops expired history everywhere and forgets channels that nobody
    /// watches and that have had no history and no activity for
    /// `idle_channel_ttl`.
    fn sweep(&self) {
        let now = self.now_secs();
        let idle_secs = self.config.idle_channel_ttl.as_secs();
        let now_ms = unix_millis();
        for shard in self.shards.iter() {
            let mut map = shard.write();
            map.retain(|_, ch| {
                let mut st = ch.lock();
                self.expire(&mut st, now_ms);
                let idle = st.watchers == 0
                    && st.history.is_none()
                    && u64::from(now.saturating_sub(st.last_activity)) >= idle_secs;
                if idle {
                    st.removed = true;
                    self.metrics.channels.dec();
                    self.count
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
                !idle
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    /// Records what was delivered: (channel, epoch, offset).
    #[derive(Default)]
    struct Record(Mutex<Vec<(String, Epoch, u64)>>);

    impl Deliver for Record {
        fn deliver(&self, channel: &ChannelName, p: &Publication<'_>) {
            self.0
                .lock()
                .push((channel.to_string(), p.epoch.clone(), p.offset.get()));
        }
    }

    fn broker(size: usize, ttl: Duration, idle: Duration) -> (MemoryBroker, Arc<Record>) {
        let record = Arc::new(Record::default());
        let sink: Arc<dyn Deliver> = record.clone();
        let b = MemoryBroker::new(
            MemoryBrokerConfig {
                history_size: size,
                history_ttl: ttl,
                idle_channel_ttl: idle,
                idempotency_keys: 100,
                max_channels: 1_000_000,
                max_history_bytes: usize::MAX,
            },
            Metrics::new(&mut Registry::default()),
            Arc::downgrade(&sink),
        );
        // The sink stays alive through `record`.
        (b, record)
    }

    fn ch(s: &str) -> ChannelName {
        ChannelName::new(s).expect("valid")
    }

    async fn publish(b: &MemoryBroker, c: &str, v: Value, key: Option<&str>) -> Published {
        b.publish(Publish {
            channel: &ch(c),
            data: Some(&v),
            raw: crate::hub::encode_data(&v),
            idempotency_key: key,
        })
        .await
        .expect("memory broker never fails")
    }

    #[tokio::test]
    async fn offsets_increase_per_channel_and_every_publication_is_delivered_in_order() {
        let (b, record) = broker(10, Duration::from_secs(60), Duration::from_secs(60));
        for i in 1..=3 {
            let p = publish(&b, "a", serde_json::json!(i), None).await;
            assert_eq!(p.position.offset, Offset(i));
            assert!(p.fresh);
        }
        let other = publish(&b, "b", serde_json::json!(0), None).await;
        assert_eq!(other.position.offset, Offset(1));
        let got: Vec<(String, u64)> = record
            .0
            .lock()
            .iter()
            .map(|(c, _, o)| (c.clone(), *o))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), 1),
                ("a".into(), 2),
                ("a".into(), 3),
                ("b".into(), 1)
            ]
        );
    }

    #[tokio::test]
    async fn history_reads_what_is_retained_and_says_whether_it_reaches_back() {
        let (b, _) = broker(3, Duration::from_secs(60), Duration::from_secs(60));
        let unknown = b
            .history(
                &ch("c"),
                HistoryRead {
                    since: Some(Offset(0)),
                    limit: 10,
                },
            )
            .await
            .expect("ok");
        assert_eq!(unknown.position.offset, Offset(0));
        assert!(unknown.recovered);
        for i in 1..=5 {
            publish(&b, "c", serde_json::json!(i), None).await;
        }
        let read = |since, limit| {
            b.read(
                &ch("c"),
                HistoryRead {
                    since: Some(Offset(since)),
                    limit,
                },
            )
        };
        let page = read(2, 10);
        assert!(page.recovered);
        let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset.get()).collect();
        assert_eq!(offsets, vec![3, 4, 5]);
        assert_eq!(page.messages[0].data.get(), "3");
        assert!(!read(1, 10).recovered, "offset 2 is no longer retained");
        assert!(!read(6, 10).recovered, "beyond the latest offset");
        assert_eq!(read(2, 1).messages.len(), 1);
        let position_only = b.read(
            &ch("c"),
            HistoryRead {
                since: None,
                limit: 10,
            },
        );
        assert!(position_only.messages.is_empty() && !position_only.recovered);
        assert_eq!(position_only.position.offset, Offset(5));
    }

    #[tokio::test]
    async fn an_idempotency_key_publishes_once_per_channel() {
        let (b, record) = broker(10, Duration::from_secs(60), Duration::from_secs(60));
        let first = publish(&b, "c", serde_json::json!(1), Some("k")).await;
        let again = publish(&b, "c", serde_json::json!(2), Some("k")).await;
        assert!(first.fresh && !again.fresh);
        assert_eq!(first.position, again.position);
        let elsewhere = publish(&b, "d", serde_json::json!(3), Some("k")).await;
        assert!(elsewhere.fresh);
        assert_eq!(record.0.lock().len(), 2);
    }

    #[tokio::test]
    async fn sweeping_forgets_only_unwatched_idle_channels() {
        let (b, _) = broker(10, Duration::from_millis(1), Duration::ZERO);
        publish(&b, "idle", serde_json::json!(1), None).await;
        b.watch(&ch("watched")).await.expect("ok");
        let epoch = b
            .read(
                &ch("watched"),
                HistoryRead {
                    since: None,
                    limit: 0,
                },
            )
            .position
            .epoch;
        std::thread::sleep(Duration::from_millis(5));
        b.sweep();
        assert!(b.lookup(&ch("idle")).is_none());
        let kept = b.read(
            &ch("watched"),
            HistoryRead {
                since: None,
                limit: 0,
            },
        );
        assert_eq!(
            kept.position.epoch, epoch,
            "a watched channel keeps its epoch"
        );
        b.unwatch(&ch("watched"));
        std::thread::sleep(Duration::from_millis(2));
        b.sweep();
        assert!(b.lookup(&ch("watched")).is_none());
    }

    #[tokio::test]
    async fn past_the_history_budget_a_publication_is_delivered_and_its_channel_history_dropped() {
        let record = Arc::new(Record::default());
        let sink: Arc<dyn Deliver> = record.clone();
        let metrics = Metrics::new(&mut Registry::default());
        let b = MemoryBroker::new(
            MemoryBrokerConfig {
                history_size: 100,
                history_ttl: Duration::from_secs(60),
                idle_channel_ttl: Duration::from_secs(60),
                idempotency_keys: 100,
                max_channels: 100,
                // Room for three 10-byte payloads.
                max_history_bytes: 35,
            },
            metrics.clone(),
            Arc::downgrade(&sink),
        );
        let ten = serde_json::json!("12345678");
        for _ in 0..2 {
            publish(&b, "a", ten.clone(), None).await;
        }
        publish(&b, "b", ten.clone(), None).await;
        let read = |c: &str, since: u64| {
            b.read(
                &ch(c),
                HistoryRead {
                    since: Some(Offset(since)),
                    limit: 100,
                },
            )
        };
        assert_eq!(read("a", 0).messages.len(), 2);
        // The fourth would pass the budget: delivered, not kept, and `a`'s
        // older history goes with it — a recovery from before is declared.
        let p = publish(&b, "a", ten.clone(), None).await;
        assert_eq!(p.position.offset, Offset(3));
        assert_eq!(record.0.lock().len(), 4, "every publication is delivered");
        let page = read("a", 1);
        assert!(!page.recovered);
        assert!(page.messages.is_empty());
        assert!(
            read("a", 3).recovered,
            "nothing after the latest is missing"
        );
        assert_eq!(read("b", 0).messages.len(), 1, "other channels keep theirs");
        assert_eq!(metrics.history_not_retained.get(), 1);
        // With room again, history starts over from the next publication.
        publish(&b, "a", ten.clone(), None).await;
        let page = read("a", 3);
        assert!(page.recovered);
        assert_eq!(page.messages.len(), 1);
        assert_eq!(page.messages[0].offset, Offset(4));
        assert!(!read("a", 2).recovered);
    }

    #[tokio::test]
    async fn a_node_at_its_channel_limit_refuses_new_channels_until_idle_ones_go() {
        let record = Arc::new(Record::default());
        let sink: Arc<dyn Deliver> = record.clone();
        let b = MemoryBroker::new(
            MemoryBrokerConfig {
                history_size: 10,
                history_ttl: Duration::from_millis(1),
                idle_channel_ttl: Duration::ZERO,
                idempotency_keys: 100,
                max_channels: 2,
                max_history_bytes: usize::MAX,
            },
            Metrics::new(&mut Registry::default()),
            Arc::downgrade(&sink),
        );
        b.watch(&ch("a")).await.expect("first");
        b.watch(&ch("b")).await.expect("second");
        // The limit: a third channel is refused, by watch and by publish…
        let e = b.watch(&ch("c")).await.expect_err("full");
        assert!(e.to_string().contains("--max-channels"), "{e}");
        let v = serde_json::json!(1);
        let refused = b
            .publish(Publish {
                channel: &ch("c"),
                data: Some(&v),
                raw: crate::hub::encode_data(&v),
                idempotency_key: None,
            })
            .await;
        assert!(matches!(refused, Err(BrokerError::Unavailable(_))));
        // …while the known ones go on.
        b.watch(&ch("a")).await.expect("known channel");
        // Once one is unwatched and forgotten, there is room again.
        b.unwatch(&ch("b"));
        std::thread::sleep(Duration::from_millis(2));
        b.sweep();
        b.watch(&ch("c")).await.expect("room again");
    }
}
