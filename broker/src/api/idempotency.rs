//! Idempotency keys (§10): a repeated key on the same channel within the
//! history TTL gets the first publication's answer and publishes nothing.
//!
//! Bounded: at most `capacity` keys are remembered; past that the oldest is
//! forgotten early (a retry after that publishes again), and the metric-free
//! trade-off is documented in docs/api.md.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tether_protocol::ChannelName;

use super::PublishAnswer;

/// Default number of idempotency keys remembered.
pub const DEFAULT_CAPACITY: usize = 100_000;

type Key = (ChannelName, String);

#[derive(Debug, Default)]
struct Inner {
    answers: HashMap<Key, PublishAnswer>,
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
    /// `publish`, run once (the lock is held across it: `publish` never
    /// waits on I/O, so concurrent duplicates cannot both publish); and
    /// whether the answer is new (`false`: a repeat, nothing published).
    pub fn get_or_publish(
        &self,
        channel: &ChannelName,
        key: String,
        publish: impl FnOnce() -> PublishAnswer,
    ) -> (PublishAnswer, bool) {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        while let Some((at, _)) = inner.order.front() {
            if now.saturating_duration_since(*at) <= self.ttl && inner.order.len() < self.capacity {
                break;
            }
            if let Some((_, k)) = inner.order.pop_front() {
                inner.answers.remove(&k);
            }
        }
        let k = (channel.clone(), key);
        if let Some(a) = inner.answers.get(&k) {
            return (a.clone(), false);
        }
        let answer = publish();
        inner.answers.insert(k.clone(), answer.clone());
        inner.order.push_back((now, k));
        (answer, true)
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
}
