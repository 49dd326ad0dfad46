//! Idempotency keys (§10): a repeated key on the same channel within the
//! history TTL gets the first publication's answer and publishes nothing.
//!
//! Bounded: at most `capacity` keys are remembered; past that the oldest is
//! forgotten early (a retry after that publishes again), and the metric-free
//! trade-off is documented in docs/api.md.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tether_protocol::ChannelName;

use super::PublishAnswer;

/// Default number of idempotency keys remembered.
pub const DEFAULT_CAPACITY: usize = 100_000;

type Key = (ChannelName, String);

/// A publication under way for a key: a duplicate arriving meanwhile waits
/// for its answer instead of publishing again.
#[derive(Debug, Default)]
struct InFlight {
    /// `Some(answer)` once published; `Some(None)` if the publisher gave up
    /// (it panicked): the waiter then publishes itself.
    outcome: Mutex<Option<Option<PublishAnswer>>>,
    done: Condvar,
}

impl InFlight {
    fn finish(&self, answer: Option<PublishAnswer>) {
        *self.outcome.lock() = Some(answer);
        self.done.notify_all();
    }

    fn wait(&self) -> Option<PublishAnswer> {
        let mut outcome = self.outcome.lock();
        loop {
            if let Some(answer) = outcome.as_ref() {
                return answer.clone();
            }
            self.done.wait(&mut outcome);
        }
    }
}

/// Settles an in-flight key even if the publication panics.
struct Settle<'a> {
    cache: &'a IdempotencyCache,
    key: &'a Key,
    flight: Arc<InFlight>,
    answer: Option<PublishAnswer>,
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
        self.flight.finish(answer);
    }
}

#[derive(Debug, Clone)]
enum Slot {
    Done(PublishAnswer),
    InFlight(Arc<InFlight>),
}

#[derive(Debug, Default)]
struct Inner {
    answers: HashMap<Key, Slot>,
    /// Insertion order, for expiry and eviction.
    order: VecDeque<(Instant, Key)>,
}

#[derive(Debug)]
pub struct IdempotencyCache {
    inner: Mutex<Inner>,
    ttl: Duration,
    capacity: usize,
}

impl IdempotencyCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            ttl,
            capacity,
        }
    }

    /// The remembered answer for `key` on `channel`, or the answer of
    /// `publish`, run once; and whether the answer is new (`false`: a
    /// repeat, nothing published). The cache's lock is not held while
    /// publishing (a large fan-out takes milliseconds): a duplicate that
    /// arrives meanwhile waits for the first one's answer.
    pub fn get_or_publish(
        &self,
        channel: &ChannelName,
        key: String,
        publish: impl FnOnce() -> PublishAnswer,
    ) -> (PublishAnswer, bool) {
        let now = Instant::now();
        let k = (channel.clone(), key);
        let flight = {
            let mut inner = self.inner.lock();
            while let Some((at, _)) = inner.order.front() {
                if now.saturating_duration_since(*at) <= self.ttl
                    && inner.order.len() < self.capacity
                {
                    break;
                }
                if let Some((_, old)) = inner.order.pop_front() {
                    inner.answers.remove(&old);
                }
            }
            match inner.answers.get(&k).cloned() {
                Some(Slot::Done(a)) => return (a, false),
                Some(Slot::InFlight(f)) => Err(f),
                None => {
                    let f = Arc::new(InFlight::default());
                    inner.answers.insert(k.clone(), Slot::InFlight(f.clone()));
                    inner.order.push_back((now, k.clone()));
                    Ok(f)
                }
            }
        };
        match flight {
            Err(other) => match other.wait() {
                Some(a) => (a, false),
                // The first attempt failed without publishing: publish now.
                None => (publish(), true),
            },
            Ok(flight) => {
                let mut settle = Settle {
                    cache: self,
                    key: &k,
                    flight,
                    answer: None,
                };
                let answer = publish();
                settle.answer = Some(answer.clone());
                drop(settle);
                (answer, true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_protocol::{Epoch, Offset};

    fn answer(o: u64) -> PublishAnswer {
        PublishAnswer {
            channel: ChannelName::new("c").expect("valid"),
            epoch: Epoch::new("e"),
            offset: Offset(o),
        }
    }

    #[test]
    fn a_repeated_key_publishes_once() {
        let c = IdempotencyCache::new(Duration::from_secs(60), 10);
        let ch = ChannelName::new("c").expect("valid");
        let mut calls = 0;
        let (a, fresh_a) = c.get_or_publish(&ch, "k".into(), || {
            calls += 1;
            answer(1)
        });
        let (b, fresh_b) = c.get_or_publish(&ch, "k".into(), || {
            calls += 1;
            answer(2)
        });
        assert_eq!(a, b);
        assert!(fresh_a && !fresh_b);
        assert_eq!(calls, 1);
        let other = ChannelName::new("d").expect("valid");
        let (d, _) = c.get_or_publish(&other, "k".into(), || answer(3));
        assert_eq!(d.offset, Offset(3));
    }

    #[test]
    fn keys_expire_and_capacity_is_bounded() {
        let c = IdempotencyCache::new(Duration::ZERO, 10);
        let ch = ChannelName::new("c").expect("valid");
        c.get_or_publish(&ch, "k".into(), || answer(1));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(
            c.get_or_publish(&ch, "k".into(), || answer(2)).0.offset,
            Offset(2)
        );

        let c = IdempotencyCache::new(Duration::from_secs(60), 3);
        for i in 0..10 {
            c.get_or_publish(&ch, format!("k{i}"), || answer(i));
        }
        assert!(c.inner.lock().answers.len() <= 3);
    }

    #[test]
    fn a_slow_publication_holds_up_only_its_own_key() {
        let c = Arc::new(IdempotencyCache::new(Duration::from_secs(60), 10));
        let ch = ChannelName::new("c").expect("valid");
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let first = {
            let (c, ch) = (c.clone(), ch.clone());
            std::thread::spawn(move || {
                c.get_or_publish(&ch, "k".into(), || {
                    started_tx.send(()).expect("test alive");
                    release_rx.recv().expect("released");
                    answer(1)
                })
            })
        };
        started_rx.recv().expect("publishing");
        // Another key publishes while the first is still publishing.
        let (other_tx, other_rx) = std::sync::mpsc::channel();
        {
            let (c, ch) = (c.clone(), ch.clone());
            std::thread::spawn(move || {
                let _ = other_tx.send(c.get_or_publish(&ch, "other".into(), || answer(2)));
            });
        }
        let other = other_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("another key must not wait for a publication in flight");
        assert_eq!(other, (answer(2), true));
        // A duplicate of the key in flight gets its answer, never publishes.
        let dup = {
            let (c, ch) = (c.clone(), ch.clone());
            std::thread::spawn(move || c.get_or_publish(&ch, "k".into(), || answer(3)))
        };
        release_tx.send(()).expect("first alive");
        assert_eq!(first.join().expect("no panic"), (answer(1), true));
        assert_eq!(dup.join().expect("no panic"), (answer(1), false));
    }

    #[test]
    fn a_publication_that_panics_lets_the_next_attempt_publish() {
        let c = IdempotencyCache::new(Duration::from_secs(60), 10);
        let ch = ChannelName::new("c").expect("valid");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.get_or_publish(&ch, "k".into(), || panic!("publish failed"))
        }));
        assert!(r.is_err());
        assert_eq!(
            c.get_or_publish(&ch, "k".into(), || answer(4)),
            (answer(4), true)
        );
    }
}
