use super::*;
use crate::cluster::memory::{MemoryBroker, MemoryBrokerConfig};
use crate::cluster::{BoxFuture, HistoryPage, Publish, Published};
use futures_util::FutureExt;
use prometheus_client::registry::Registry;
use std::collections::VecDeque;
use std::task::{Context, Poll};
use std::time::Duration;
use tether_protocol::codec::decode_server;
use tether_protocol::{Offset, ServerMessage};

fn config(history: usize) -> MemoryBrokerConfig {
    MemoryBrokerConfig {
        history_size: history,
        history_ttl: Duration::from_secs(60),
        idle_channel_ttl: Duration::from_secs(60),
        idempotency_keys: 100,
        max_channels: 1_000_000,
        max_history_bytes: usize::MAX,
    }
}

fn hub_config(history: usize) -> HubConfig {
    HubConfig {
        history_limit: history,
        max_buffered: 100_000,
    }
}

fn hub(history: usize) -> Arc<Hub> {
    let metrics = Metrics::new(&mut Registry::default());
    let m = metrics.clone();
    Hub::with_broker(hub_config(history), metrics, |sink| {
        MemoryBroker::new(config(history), m, sink)
    })
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

/// Runs a future of the memory broker, which never waits.
fn now<T>(f: impl std::future::Future<Output = T>) -> T {
    f.now_or_never().expect("the memory broker never waits")
}

fn publish_to(broker: &dyn Broker, channel: &ChannelName, v: Value) -> Position {
    now(broker.publish(Publish {
        channel,
        raw: encode_data(&v),
        data: Some(&v),
        idempotency_key: None,
    }))
    .expect("published")
    .position
}

fn publish(hub: &Hub, channel: &str, v: Value) -> Position {
    publish_to(hub.broker().as_ref(), &chan(channel), v)
}

fn subscribe(
    hub: &Hub,
    channel: &str,
    s: Subscriber,
    since: Option<&StreamPosition>,
) -> Result<Subscription, SubscribeError> {
    now(hub.subscribe(&chan(channel), s, since, reply))
}

fn drain(ob: &Outbox) -> Vec<ServerMessage> {
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    let mut out = VecDeque::new();
    while let Poll::Ready(crate::outbox::Drained::Frames) = ob.poll_drain(&mut cx, &mut out, 1000) {
    }
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
    subscribe(&hub, "c", subscriber(1, &a), None).expect("room");
    subscribe(&hub, "c", subscriber(2, &b), None).expect("room");
    for i in 0..3 {
        let p = publish(&hub, "c", serde_json::json!({ "i": i }));
        assert_eq!(p.offset, Offset(i + 1));
    }
    assert_eq!(offsets(&drain(&a)), vec![1, 2, 3]);
    assert_eq!(offsets(&drain(&b)), vec![1, 2, 3]);
}

#[test]
fn a_channel_leaves_the_table_with_its_last_subscriber() {
    let hub = hub(10);
    let a = Outbox::new(1 << 20, 1000);
    subscribe(&hub, "c", subscriber(1, &a), None).expect("room");
    assert_eq!(hub.channels(), 1);
    hub.unsubscribe(&chan("c"), SubscriptionId { session: 1, sub: 1 });
    assert_eq!(hub.channels(), 0);
    // The broker still knows the channel: a new subscriber sees its epoch.
    let first = publish(&hub, "c", serde_json::json!(1));
    let b = Outbox::new(1 << 20, 1000);
    let s = subscribe(&hub, "c", subscriber(2, &b), None).expect("room");
    assert_eq!(s.position, first);
}

/// A large fan-out leaves the runtime worker on a multi-threaded runtime,
/// is shared with the pool, and runs in place elsewhere; either way every
/// subscriber gets it.
fn large_fan_out_reaches_everyone() {
    let hub = hub(10);
    let outboxes: Vec<_> = (0..LARGE_FAN_OUT as u64 * 3)
        .map(|i| {
            let ob = Outbox::new(1 << 20, 1000);
            now(hub.subscribe(&chan("big"), subscriber(i, &ob), None, |_, _| None)).expect("room");
            ob
        })
        .collect();
    publish(&hub, "big", serde_json::json!("x"));
    publish(&hub, "big", serde_json::json!("y"));
    for ob in &outboxes {
        assert_eq!(offsets(&drain(ob)), vec![1, 2]);
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
fn the_pool_feeds_every_share_in_order_and_reports_refusals() {
    let pool = FanOutPool::new(3, prometheus_client::metrics::counter::Counter::default());
    let subs: Arc<Vec<LiveSub>> = Arc::new(
        (0..2000u64)
            .map(|i| LiveSub {
                subscriber: subscriber(i, &Outbox::new(if i == 1500 { 10 } else { 1 << 20 }, 100)),
                skip: None,
            })
            .collect(),
    );
    let raw = encode_data(&serde_json::json!("a fairly long payload of text"));
    let epoch = Epoch::new("e");
    for offset in 1..=3 {
        let p = Publication {
            epoch: &epoch,
            offset: Offset(offset),
            ts: 0,
            raw: &raw,
            data: None,
            published_at: None,
        };
        let refused = pool.run(&subs, Template::new(&chan("c"), &p, [true, false]));
        assert!(refused, "the small outbox refused");
    }
    assert_eq!(Arc::strong_count(&subs), 1, "the pool let go of the list");
    for (i, s) in subs.iter().enumerate() {
        let got = offsets(&drain(&s.subscriber.outbox));
        if i == 1500 {
            assert!(s.subscriber.outbox.is_closed());
        } else {
            assert_eq!(got, vec![1, 2, 3], "subscriber {i}");
        }
    }
}

#[test]
fn a_full_outbox_drops_only_that_subscriber() {
    let hub = hub(10);
    let slow = Outbox::new(300, 1000);
    let fast = Outbox::new(1 << 20, 1000);
    subscribe(&hub, "c", subscriber(1, &slow), None).expect("room");
    subscribe(&hub, "c", subscriber(2, &fast), None).expect("room");
    for _ in 0..10 {
        publish(
            &hub,
            "c",
            serde_json::json!("a fairly long payload of text"),
        );
    }
    assert!(slow.is_closed());
    assert_eq!(offsets(&drain(&fast)).len(), 10);
}

#[test]
fn subscribe_since_replays_exactly_the_missed_messages() {
    let hub = hub(5);
    let first = publish(&hub, "c", serde_json::json!(1));
    for i in 2..=4 {
        publish(&hub, "c", serde_json::json!(i));
    }
    let ob = Outbox::new(1 << 20, 1000);
    let since = StreamPosition {
        epoch: first.epoch.clone(),
        offset: Offset(2),
    };
    let s = subscribe(&hub, "c", subscriber(1, &ob), Some(&since)).expect("room");
    assert!(s.recovered);
    assert_eq!(s.replayed, 2);
    publish(&hub, "c", serde_json::json!(5));
    assert_eq!(offsets(&drain(&ob)), vec![3, 4, 5]);

    // Another epoch, or a position history no longer holds: no replay.
    let ob = Outbox::new(1 << 20, 1000);
    let wrong = StreamPosition {
        epoch: Epoch::new("other"),
        offset: Offset(2),
    };
    let s = subscribe(&hub, "c", subscriber(2, &ob), Some(&wrong)).expect("room");
    assert!(!s.recovered);
    for _ in 0..10 {
        publish(&hub, "c", serde_json::json!(0));
    }
    let ob = Outbox::new(1 << 20, 1000);
    let old = StreamPosition {
        epoch: first.epoch,
        offset: Offset(1),
    };
    let s = subscribe(&hub, "c", subscriber(3, &ob), Some(&old)).expect("room");
    assert!(!s.recovered);
    assert_eq!(s.replayed, 0);
}

#[test]
fn a_broker_that_cannot_be_reached_subscribes_nothing() {
    #[derive(Debug)]
    struct Down;
    impl Broker for Down {
        fn publish<'a>(&'a self, _: Publish<'a>) -> BoxFuture<'a, Result<Published, BrokerError>> {
            Box::pin(async { Err(BrokerError::Unavailable("down".into())) })
        }
        fn history<'a>(
            &'a self,
            _: &'a ChannelName,
            _: HistoryRead,
        ) -> BoxFuture<'a, Result<HistoryPage, BrokerError>> {
            Box::pin(async { Err(BrokerError::Unavailable("down".into())) })
        }
        fn watch<'a>(&'a self, _: &'a ChannelName) -> BoxFuture<'a, Result<(), BrokerError>> {
            Box::pin(async { Ok(()) })
        }
        fn unwatch(&self, _: &ChannelName) {}
    }
    let hub = Hub::new(
        hub_config(10),
        Metrics::new(&mut Registry::default()),
        Arc::new(Down),
    );
    let ob = Outbox::new(1 << 20, 1000);
    let e = subscribe(&hub, "c", subscriber(1, &ob), None).expect_err("down");
    assert!(matches!(
        e,
        SubscribeError::Broker(BrokerError::Unavailable(_))
    ));
    assert_eq!(hub.channels(), 0, "no pending subscriber is left behind");
    assert!(drain(&ob).is_empty());
}

mod interleavings {
    //! Property: whatever the interleaving of publications and
    //! subscriptions-with-`since`, each recovered subscriber sees every
    //! offset after its `since` exactly once, in order.
    use super::*;
    use proptest::prelude::*;

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
            let hub = hub(10);
            let ch = chan("p");
            let mut subs: Vec<(Arc<Outbox>, u64, bool)> = Vec::new();
            let mut latest = Position { epoch: Epoch::default(), offset: Offset::ZERO };
            for (i, op) in ops.iter().enumerate() {
                match op {
                    Op::Publish => latest = publish(&hub, "p", serde_json::json!(i)),
                    Op::Subscribe { back } => {
                        let ob = Outbox::new(1 << 24, 1 << 20);
                        let since = latest.offset.get().saturating_sub(*back);
                        let existing = now(hub.broker().history(&ch, HistoryRead { since: None, limit: 0 })).expect("ok");
                        let exists = !existing.position.epoch.as_str().is_empty();
                        let s = subscribe(
                            &hub,
                            "p",
                            Subscriber { id: SubscriptionId { session: i as u64, sub: 1 }, outbox: ob.clone(), encoding: Encoding::Json },
                            Some(&StreamPosition { epoch: existing.position.epoch, offset: Offset(since) }),
                        ).expect("room");
                        // Recovered exactly when the epoch is known and the
                        // history (10 messages) reaches back to `since`.
                        prop_assert_eq!(s.recovered, exists && latest.offset.get() - since <= 10);
                        subs.push((ob, since, s.recovered));
                    }
                }
            }
            for (ob, since, recovered) in subs {
                let got = offsets(&drain(&ob));
                if recovered {
                    let expected: Vec<u64> = (since + 1..=latest.offset.get()).collect();
                    prop_assert_eq!(got, expected);
                } else {
                    prop_assert!(got.windows(2).all(|w| w[1] == w[0] + 1));
                }
            }
        }
    }
}

mod racing {
    //! The subscribe algorithm against a broker like Redis: its history
    //! read is slow and its deliveries lag behind publication (they reach
    //! the hub from another thread, through a queue), while another thread
    //! publishes flat out. Real threads, real races; proptest picks the
    //! delays and the subscribers' `since`.
    use super::*;
    use proptest::prelude::*;
    use std::sync::mpsc;

    /// One delivery on its way to the hub.
    struct Pending {
        channel: ChannelName,
        epoch: Epoch,
        offset: Offset,
        ts: u64,
        raw: Box<RawValue>,
    }

    /// A memory broker whose deliveries go through a queue to a delivery
    /// thread (like pub/sub), and whose history reads sleep first or after.
    #[derive(Debug)]
    struct Lagging {
        inner: MemoryBroker,
        read_delay: Duration,
        read_first: bool,
    }

    /// The sink of `Lagging`'s inner broker: queues every delivery.
    struct Queue(Mutex<mpsc::Sender<Pending>>);

    impl Deliver for Queue {
        fn deliver(&self, channel: &ChannelName, p: &Publication<'_>) {
            let _ = self.0.lock().send(Pending {
                channel: channel.clone(),
                epoch: p.epoch.clone(),
                offset: p.offset,
                ts: p.ts,
                raw: p.raw.to_owned(),
            });
        }
    }

    impl Broker for Lagging {
        fn publish<'a>(&'a self, p: Publish<'a>) -> BoxFuture<'a, Result<Published, BrokerError>> {
            self.inner.publish(p)
        }
        fn history<'a>(
            &'a self,
            channel: &'a ChannelName,
            read: HistoryRead,
        ) -> BoxFuture<'a, Result<HistoryPage, BrokerError>> {
            Box::pin(async move {
                if !self.read_first {
                    tokio::time::sleep(self.read_delay).await;
                }
                let page = self.inner.history(channel, read).await;
                if self.read_first {
                    // A stale read: the channel moves on before it is used.
                    tokio::time::sleep(self.read_delay).await;
                }
                page
            })
        }
        fn watch<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<(), BrokerError>> {
            self.inner.watch(channel)
        }
        fn unwatch(&self, channel: &ChannelName) {
            self.inner.unwatch(channel)
        }
    }

    const PUBLICATIONS: u64 = 400;

    /// One case: the publisher thread publishes `PUBLICATIONS` times with
    /// `gap_us` between them; the delivery thread stalls for `lag_us` every
    /// 16 deliveries; each subscriber starts after its delay (µs) with
    /// `since` that many offsets back; history reads sleep `read_delay_ms`
    /// before the read, or after it (`read_first`: a stale read).
    fn run(
        gap_us: u64,
        lag_us: u64,
        read_delay_ms: u64,
        read_first: bool,
        subscribers: Vec<(u64, u64)>,
    ) -> Result<(), TestCaseError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .expect("runtime");
        let (tx, rx) = mpsc::channel::<Pending>();
        let queue: Arc<dyn Deliver> = Arc::new(Queue(Mutex::new(tx)));
        let metrics = Metrics::new(&mut Registry::default());
        let broker = Arc::new(Lagging {
            inner: MemoryBroker::new(config(60), metrics.clone(), Arc::downgrade(&queue)),
            read_delay: Duration::from_millis(read_delay_ms),
            read_first,
        });
        let hub = Arc::new(Hub::new(hub_config(60), metrics, broker.clone()));
        // The delivery thread: from the queue to the hub, in order, late.
        let delivering = {
            let hub = hub.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while let Ok(p) = rx.recv() {
                    n += 1;
                    if n.is_multiple_of(16) {
                        std::thread::sleep(Duration::from_micros(lag_us));
                    }
                    hub.deliver(
                        &p.channel,
                        &Publication {
                            epoch: &p.epoch,
                            offset: p.offset,
                            ts: p.ts,
                            raw: &p.raw,
                            data: None,
                            published_at: None,
                        },
                    );
                }
            })
        };
        let c = chan("race");
        // Fix the channel's epoch before the race starts.
        rt.block_on(broker.watch(&c)).expect("ok");
        let epoch = rt
            .block_on(broker.history(
                &c,
                HistoryRead {
                    since: None,
                    limit: 0,
                },
            ))
            .expect("ok")
            .position
            .epoch;
        let publisher = {
            let broker = broker.clone();
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..PUBLICATIONS {
                    publish_to(broker.as_ref(), &c, serde_json::json!(i));
                    std::thread::sleep(Duration::from_micros(gap_us));
                }
            })
        };
        let outcome = rt.block_on(async {
            let mut joins = Vec::new();
            for (n, (start_after_us, back)) in subscribers.iter().copied().enumerate() {
                let hub = hub.clone();
                let c = c.clone();
                let epoch = epoch.clone();
                joins.push(tokio::spawn(async move {
                    tokio::task::spawn_blocking(move || {
                        std::thread::sleep(Duration::from_micros(start_after_us))
                    })
                    .await
                    .expect("slept");
                    let latest = hub
                        .broker()
                        .history(
                            &c,
                            HistoryRead {
                                since: None,
                                limit: 0,
                            },
                        )
                        .await
                        .expect("ok")
                        .position
                        .offset;
                    let since = StreamPosition {
                        epoch,
                        offset: Offset(latest.get().saturating_sub(back)),
                    };
                    let ob = Outbox::new(1 << 24, 1 << 20);
                    let sub = Subscriber {
                        id: SubscriptionId {
                            session: n as u64,
                            sub: 1,
                        },
                        outbox: ob.clone(),
                        encoding: Encoding::Json,
                    };
                    let subscribed = |p: &Position, recovered: bool| {
                        Some(Frame::reply(tether_protocol::codec::encode_server(
                            &ServerMessage::Subscribed(tether_protocol::Subscribed {
                                id: 1,
                                channel: chan("race"),
                                epoch: p.epoch.clone(),
                                offset: p.offset,
                                recovered,
                            }),
                            Encoding::Json,
                        )))
                    };
                    let s = hub
                        .subscribe(&c, sub, Some(&since), subscribed)
                        .await
                        .expect("room");
                    (ob, since.offset, s)
                }));
            }
            let mut out = Vec::new();
            for j in joins {
                out.push(j.await.expect("subscriber"));
            }
            out
        });
        publisher.join().expect("publisher");
        // A barrier, not a sleep: one more publication, delivered after
        // everything before it; once a subscriber has it, nothing published
        // earlier is still on its way to it.
        let last = publish_to(broker.as_ref(), &c, serde_json::json!("last")).offset;
        drop(queue);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut waiting: Vec<_> = outcome
            .into_iter()
            .map(|(ob, since, s)| (ob, since, s, Vec::new()))
            .collect();
        let mut done = Vec::new();
        while !waiting.is_empty() {
            prop_assert!(std::time::Instant::now() < deadline, "deliveries stopped");
            let mut still = Vec::new();
            for (ob, since, s, mut msgs) in waiting {
                msgs.extend(drain(&ob));
                if offsets(&msgs).last() == Some(&last.get()) {
                    done.push((msgs, since, s));
                } else {
                    still.push((ob, since, s, msgs));
                }
            }
            waiting = still;
            std::thread::yield_now();
        }
        for (msgs, since, s) in done {
            prop_assert!(
                matches!(msgs.first(), Some(ServerMessage::Subscribed(_))),
                "subscribed comes first"
            );
            let got = offsets(&msgs);
            let start = if s.recovered {
                since.get()
            } else {
                s.position.offset.get()
            };
            let expected: Vec<u64> = (start + 1..=last.get()).collect();
            prop_assert_eq!(
                got,
                expected,
                "recovered={} since={} position={}",
                s.recovered,
                since.get(),
                s.position.offset.get()
            );
        }
        drop(hub);
        drop(broker);
        let _ = delivering.join();
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
        #[test]
        fn no_gap_and_no_duplicate_against_a_slow_lagging_broker(
            gap_us in 0u64..60,
            lag_us in 0u64..400,
            read_delay_ms in 0u64..3,
            read_first in any::<bool>(),
            subscribers in prop::collection::vec((0u64..20_000, 0u64..80), 1..8),
        ) {
            run(gap_us, lag_us, read_delay_ms, read_first, subscribers)?;
        }
    }
}
