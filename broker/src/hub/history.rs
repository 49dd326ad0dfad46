//! One channel's bounded history: the last `size` publications, none older
//! than `ttl`, behind the [`History`] trait. [`MemoryHistory`] keeps `data`
//! as compact JSON text only (about 40 bytes of bookkeeping per entry on top
//! of the payload); frames are encoded again on the rare replay rather than
//! kept in every encoding.
//!
//! The hub calls these methods under the channel's lock, which is what makes
//! a replay and the live traffic after it seamless. A history kept outside
//! the process (Redis, for a cluster) cannot be read under that lock; its
//! implementation buffers live traffic during the read and merges by
//! offset, and implements this trait over a local tail.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tether_protocol::Offset;

/// One retained publication.
#[derive(Debug)]
pub struct Entry {
    pub offset: Offset,
    /// Unix milliseconds when published.
    pub ts: u64,
    /// When it was stored, for the TTL.
    pub stored_at: Instant,
    pub data: Box<RawValue>,
}

/// A channel's retained publications, oldest first.
pub trait History: Default + Send + 'static {
    /// Appends `entry`, then drops what is over `size` or older than `ttl`.
    fn push(&mut self, entry: Entry, size: usize, ttl: Duration, now: Instant);

    /// Drops entries older than `ttl`.
    fn expire(&mut self, ttl: Duration, now: Instant);

    /// The oldest retained offset.
    fn first_offset(&self) -> Option<Offset>;

    /// Number of retained entries.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Payload bytes retained (for the memory gauge).
    fn payload_bytes(&self) -> usize;

    /// Entries with an offset above `since`, oldest first.
    fn after(&self, since: Offset) -> impl Iterator<Item = &Entry>;

    /// Whether the history holds every publication after `since`, given the
    /// channel's latest offset.
    fn reaches_back_to(&self, since: Offset, latest: Offset) -> bool {
        if since > latest {
            return false;
        }
        if since == latest {
            return true;
        }
        self.first_offset()
            .is_some_and(|first| first <= since.next())
    }
}

/// The in-memory history of a single node.
#[derive(Debug, Default)]
pub struct MemoryHistory {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl MemoryHistory {
    fn pop_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= e.data.get().len();
        }
    }
}

impl History for MemoryHistory {
    fn push(&mut self, entry: Entry, size: usize, ttl: Duration, now: Instant) {
        self.bytes += entry.data.get().len();
        self.entries.push_back(entry);
        while self.entries.len() > size {
            self.pop_front();
        }
        self.expire(ttl, now);
    }

    /// Entries are in time order, so this stops at the first live one.
    fn expire(&mut self, ttl: Duration, now: Instant) {
        while self
            .entries
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.stored_at) > ttl)
        {
            self.pop_front();
        }
        if self.entries.is_empty() && self.entries.capacity() > 0 {
            self.entries = VecDeque::new();
        }
    }

    fn first_offset(&self) -> Option<Offset> {
        self.entries.front().map(|e| e.offset)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn payload_bytes(&self) -> usize {
        self.bytes
    }

    fn after(&self, since: Offset) -> impl Iterator<Item = &Entry> {
        let start = self.entries.partition_point(|e| e.offset <= since);
        self.entries.range(start..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64, at: Instant) -> Entry {
        Entry {
            offset: Offset(offset),
            ts: 0,
            stored_at: at,
            data: serde_json::value::to_raw_value(&offset).expect("raw"),
        }
    }

    #[test]
    fn bounded_by_size() {
        let now = Instant::now();
        let mut h = MemoryHistory::default();
        for i in 1..=10 {
            h.push(entry(i, now), 3, Duration::from_secs(60), now);
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.first_offset(), Some(Offset(8)));
        assert!(h.reaches_back_to(Offset(7), Offset(10)));
        assert!(!h.reaches_back_to(Offset(6), Offset(10)));
        assert!(!h.reaches_back_to(Offset(11), Offset(10)));
        let after: Vec<_> = h.after(Offset(8)).map(|e| e.offset.get()).collect();
        assert_eq!(after, vec![9, 10]);
    }

    #[test]
    fn bounded_by_age() {
        let t0 = Instant::now();
        let mut h = MemoryHistory::default();
        h.push(entry(1, t0), 100, Duration::from_secs(5), t0);
        h.push(
            entry(2, t0 + Duration::from_secs(3)),
            100,
            Duration::from_secs(5),
            t0 + Duration::from_secs(3),
        );
        h.expire(Duration::from_secs(5), t0 + Duration::from_secs(6));
        assert_eq!(h.first_offset(), Some(Offset(2)));
        h.expire(Duration::from_secs(5), t0 + Duration::from_secs(9));
        assert!(h.is_empty());
        assert_eq!(h.payload_bytes(), 0);
        // Nothing retained, but nothing missed either.
        assert!(h.reaches_back_to(Offset(2), Offset(2)));
        assert!(!h.reaches_back_to(Offset(1), Offset(2)));
    }
}
