//! Idempotency keys of a single node (§10): a repeated key on the same
//! channel within the history TTL gets the first publication's position and
//! publishes nothing.
//!
//! Bounded: at most `capacity` keys are remembered; past that the oldest is
//! forgotten early (a retry after that publishes again; docs/operations.md).
//! The cache's lock is never held while publishing: a duplicate that
//! arrives while the first publication is under way waits for its answer
//! asynchronously (a `watch` channel, no thread parked), and other keys are
//! not held up at all.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tether_protocol::ChannelName;
use tokio::sync::watch;

use crate::cluster::Position;

/// Default number of idempotency keys remembered.
pub const DEFAULT_CAPACITY: usize = 100_000;

type Key = (ChannelName, String);

#[derive(Debug, Clone)]
enum Slot {
    Done(Position),
    /// A publication under way; its answer arrives on this channel (`None`
    /// until then). The sender dropped without an answer means the
    /// publisher gave up (it panicked): a waiter then publishes itself.
    InFlight(watch::Receiver<Option<Position>>),
}

#[derive(Debug, Default)]
struct Inner {
    answers: HashMap<Key, Slot>,
    /// Insertion order, for expiry and eviction.
    order: VecDeque<(Instant, Key)>,
}

/// Remembered idempotency keys and their answers.
#[derive(Debug)]
pub struct IdempotencyCache {
    inner: Mutex<Inner>,
    ttl: Duration,
    capacity: usize,
}

/// Settles an in-flight key even if the publication panics.
struct Settle<'a> {
    cache: &'a IdempotencyCache,
    key: &'a Key,
    tx: watch::Sender<Option<Position>>,
    answer: Option<Position>,
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        let answer = self.answer.take();
        {
            let mut inner = self.cache.inner.lock();
            match &answer {
                Some(a) => {
                    if let Some(slot) = inner.answers.get_mut(self.key) {
                        *slot = Slot::Done(a.clone());
                    }
                }
                None => {
                    inner.answers.remove(self.key);
                }
            }
        }
        if let Some(a) = answer {
            self.tx.send_replace(Some(a));
        }
        // Without an answer the sender is dropped: waiters see it closed.
    }
}

enum Found {
    Done(Position),
    Wait(watch::Receiver<Option<Position>>),
    Mine(watch::Sender<Option<Position>>),
}

impl IdempotencyCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            ttl,
            capacity,
        }
    }

    fn find_or_claim(&self, k: &Key, now: Instant) -> Found {
        let mut inner = self.inner.lock();
        while let Some((at, _)) = inner.order.front() {
            if now.saturating_duration_since(*at) <= self.ttl && inner.order.len() < self.capacity {
                break;
            }
            if let Some((_, old)) = inner.order.pop_front() {
                inner.answers.remove(&old);
            }
        }
        match inner.answers.get(k) {
            Some(Slot::Done(a)) => Found::Done(a.clone()),
            Some(Slot::InFlight(rx)) => Found::Wait(rx.clone()),
            None => {
                let (tx, rx) = watch::channel(None);
                inner.answers.insert(k.clone(), Slot::InFlight(rx));
                inner.order.push_back((now, k.clone()));
                Found::Mine(tx)
            }
        }
    }

    /// The remembered position for `key` on `channel`, or the position of
    /// `publish`, run at most once per key; and whether it is new (`false`:
    /// a repeat, nothing published).
    pub async fn get_or_publish<E>(
        &self,
        channel: &ChannelName,
        key: &str,
        publish: impl FnOnce() -> Result<Position, E>,
    ) -> Result<(Position, bool), E> {
        let k = (channel.clone(), key.to_owned());
        let tx = loop {
            match self.find_or_claim(&k, Instant::now()) {
                Found::Done(a) => return Ok((a, false)),
                Found::Wait(mut rx) => {
                    if let Ok(answer) = rx.wait_for(Option::is_some).await
                        && let Some(a) = answer.clone()
                    {
                        return Ok((a, false));
                    }
                    // The first attempt gave up without publishing: claim
                    // the key again (or find whoever did).
                }
                Found::Mine(tx) => break tx,
            }
        };
        let mut settle = Settle {
            cache: self,
            key: &k,
            tx,
            answer: None,
        };
        let answer = publish()?;
        settle.answer = Some(answer.clone());
        drop(settle);
        Ok((answer, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tether_protocol::{Epoch, Offset};

    fn at(o: u64) -> Result<Position, std::convert::Infallible> {
        Ok(Position {
            epoch: Epoch::new("e"),
            offset: Offset(o),
        })
    }

    fn ch(s: &str) -> ChannelName {
        ChannelName::new(s).expect("valid")
    }

    #[tokio::test]
    async fn a_repeated_key_publishes_once() {
        let c = IdempotencyCache::new(Duration::from_secs(60), 10);
        let mut calls = 0;
        let (a, fresh_a) = c
            .get_or_publish(&ch("c"), "k", || {
                calls += 1;
                at(1)
            })
            .await
            .expect("ok");
        let (b, fresh_b) = c
            .get_or_publish(&ch("c"), "k", || {
                calls += 1;
                at(2)
            })
            .await
            .expect("ok");
        assert_eq!(a, b);
        assert!(fresh_a && !fresh_b);
        assert_eq!(calls, 1);
        let (d, _) = c.get_or_publish(&ch("d"), "k", || at(3)).await.expect("ok");
        assert_eq!(d.offset, Offset(3));
    }

    #[tokio::test]
    async fn keys_expire_and_capacity_is_bounded() {
        let c = IdempotencyCache::new(Duration::ZERO, 10);
        c.get_or_publish(&ch("c"), "k", || at(1)).await.expect("ok");
        std::thread::sleep(Duration::from_millis(2));
        let (p, fresh) = c.get_or_publish(&ch("c"), "k", || at(2)).await.expect("ok");
        assert_eq!((p.offset, fresh), (Offset(2), true));

        let c = IdempotencyCache::new(Duration::from_secs(60), 3);
        for i in 0..10 {
            c.get_or_publish(&ch("c"), &format!("k{i}"), || at(i))
                .await
                .expect("ok");
        }
        assert!(c.inner.lock().answers.len() <= 3);
    }

    /// A duplicate of a key in flight waits for the first one's answer
    /// without parking a thread; another key does not wait at all.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_publication_holds_up_only_its_own_key() {
        let c = Arc::new(IdempotencyCache::new(Duration::from_secs(60), 10));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        // The first publication runs on its own thread and blocks there.
        let first = {
            let c = c.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime");
                rt.block_on(c.get_or_publish(&ch("c"), "k", || {
                    started_tx.send(()).expect("test alive");
                    release_rx.recv().expect("released");
                    at(1)
                }))
            })
        };
        started_rx.recv().expect("publishing");
        let other = c
            .get_or_publish(&ch("c"), "other", || at(2))
            .await
            .expect("ok");
        assert_eq!(other, (at(2).expect("ok"), true));
        // On this single-threaded runtime the duplicate's wait must yield:
        // the task below runs while it waits.
        let dup = tokio::spawn({
            let c = c.clone();
            async move { c.get_or_publish(&ch("c"), "k", || at(3)).await }
        });
        let released = tokio::spawn(async move {
            release_tx.send(()).expect("first alive");
        });
        released.await.expect("runs while the duplicate waits");
        assert_eq!(
            first.join().expect("no panic").expect("ok"),
            (at(1).expect("ok"), true)
        );
        assert_eq!(
            dup.await.expect("no panic").expect("ok"),
            (at(1).expect("ok"), false)
        );
    }

    #[tokio::test]
    async fn a_publication_that_fails_or_panics_lets_the_next_attempt_publish() {
        let c = IdempotencyCache::new(Duration::from_secs(60), 10);
        let failed: Result<_, &str> = c.get_or_publish(&ch("c"), "k", || Err("down")).await;
        assert_eq!(failed, Err("down"));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            futures_util::FutureExt::now_or_never(c.get_or_publish(&ch("c"), "k", || {
                if true {
                    panic!("publish failed")
                }
                at(0)
            }))
        }));
        assert!(r.is_err());
        let (p, fresh) = c.get_or_publish(&ch("c"), "k", || at(4)).await.expect("ok");
        assert_eq!((p.offset, fresh), (Offset(4), true));
    }
}
