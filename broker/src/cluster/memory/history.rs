//! One channel's bounded history on a single node: the last `size`
//! publications, none older than `ttl`. [`MemoryHistory`] keeps `data` as
//! compact JSON text only (24 bytes of bookkeeping per entry on top of the
//! payload); frames are encoded again on the rare replay rather than kept in
//! every encoding.
//!
//! The memory broker calls these methods under the channel's lock, the same
//! lock under which it assigns offsets and delivers: a history read is
//! either before a publication or after it, never in the middle.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::value::RawValue;
use tether_protocol::Offset;

/// One publication handed to a history.
#[derive(Debug)]
pub struct Entry {
    pub offset: Offset,
    /// Unix milliseconds when published; also what the TTL is measured from.
    pub ts: u64,
    pub data: Box<RawValue>,
}

/// A retained publication, as read back.
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    pub offset: Offset,
    pub ts: u64,
    pub data: &'a RawValue,
}

/// What [`MemoryHistory`] keeps per publication: 24 bytes beside the
/// payload. Offsets are not stored: a channel's publications are contiguous,
/// so the offset of entry `i` is `first + i`.
#[derive(Debug)]
struct Stored {
    ts: u64,
    data: Box<RawValue>,
}

/// The in-memory history of a single node.
#[derive(Debug, Default)]
pub struct MemoryHistory {
    entries: VecDeque<Stored>,
    /// Offset of the front entry.
    first: Offset,
    bytes: usize,
}

impl MemoryHistory {
    /// An empty history.
    pub const fn new() -> Self {
        MemoryHistory {
            entries: VecDeque::new(),
            first: Offset::ZERO,
            bytes: 0,
        }
    }

    fn pop_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= e.data.get().len();
            self.first = self.first.next();
        }
    }
}

impl MemoryHistory {
    /// Appends `entry`, then drops what is over `size` or older than `ttl`.
    pub fn push(&mut self, entry: Entry, size: usize, ttl: Duration, now_ms: u64) {
        // Make room first, so that a full channel never grows its buffer.
        while !self.entries.is_empty() && self.entries.len() >= size {
            self.pop_front();
        }
        let next = Offset(self.first.get() + self.entries.len() as u64);
        if self.entries.is_empty() || entry.offset != next {
            // Not the next offset (cannot happen under the channel's lock;
            // be safe): what is kept must stay contiguous, so start over.
            self.entries.clear();
            self.bytes = 0;
            self.first = entry.offset;
        }
        self.bytes += entry.data.get().len();
        if self.entries.len() == self.entries.capacity() && self.entries.len() < size {
            // Grow by doubling, but never past the history size: a full
            // channel holds exactly `size` slots.
            let target = (self.entries.len() * 2).max(4).min(size);
            self.entries.reserve_exact(target - self.entries.len());
        }
        self.entries.push_back(Stored {
            ts: entry.ts,
            data: entry.data,
        });
        self.expire(ttl, now_ms);
    }

    /// Drops entries older than `ttl`. Entries are in time order, so this
    /// stops at the first live one.
    pub fn expire(&mut self, ttl: Duration, now_ms: u64) {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        while self
            .entries
            .front()
            .is_some_and(|e| now_ms.saturating_sub(e.ts) > ttl_ms)
        {
            self.pop_front();
        }
        if self.entries.is_empty() && self.entries.capacity() > 0 {
            self.entries = VecDeque::new();
        }
    }

    /// The oldest retained offset.
    pub fn first_offset(&self) -> Option<Offset> {
        (!self.entries.is_empty()).then_some(self.first)
    }

    /// Number of retained entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Payload bytes retained (for the memory gauge).
    pub fn payload_bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the history holds every publication after `since`, given the
    /// channel's latest offset.
    pub fn reaches_back_to(&self, since: Offset, latest: Offset) -> bool {
        if since > latest {
            return false;
        }
        if since == latest {
            return true;
        }
        self.first_offset()
            .is_some_and(|first| first <= since.next())
    }

    /// Entries with an offset above `since`, oldest first.
    pub fn after(&self, since: Offset) -> impl Iterator<Item = EntryRef<'_>> {
        let skip = since
            .get()
            .saturating_add(1)
            .saturating_sub(self.first.get());
        let start = usize::try_from(skip)
            .unwrap_or(usize::MAX)
            .min(self.entries.len());
        let first = self.first.get();
        self.entries
            .range(start..)
            .enumerate()
            .map(move |(i, e)| EntryRef {
                offset: Offset(first + (start + i) as u64),
                ts: e.ts,
                data: &e.data,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64, at_ms: u64) -> Entry {
        Entry {
            offset: Offset(offset),
            ts: at_ms,
            data: serde_json::value::to_raw_value(&offset).expect("raw"),
        }
    }

    #[test]
    fn bounded_by_size() {
        let now = 1_000_000;
        let mut h = MemoryHistory::default();
        for i in 1..=10 {
            h.push(entry(i, now), 3, Duration::from_secs(60), now);
        }
        assert!(
            h.entries.capacity() <= 4,
            "never grows past the size bound much"
        );
        assert_eq!(h.len(), 3);
        assert_eq!(h.first_offset(), Some(Offset(8)));
        assert!(h.reaches_back_to(Offset(7), Offset(10)));
        assert!(!h.reaches_back_to(Offset(6), Offset(10)));
        assert!(!h.reaches_back_to(Offset(11), Offset(10)));
        let after: Vec<_> = h.after(Offset(8)).map(|e| e.offset.get()).collect();
        assert_eq!(after, vec![9, 10]);
    }

    #[test]
    fn a_full_channel_holds_exactly_its_size() {
        let mut h = MemoryHistory::default();
        for i in 1..=250 {
            h.push(entry(i, 0), 100, Duration::from_secs(60), 0);
        }
        assert_eq!(h.len(), 100);
        assert_eq!(h.entries.capacity(), 100);
    }

    #[test]
    fn bounded_by_age() {
        let t0 = 1_000_000;
        let mut h = MemoryHistory::default();
        h.push(entry(1, t0), 100, Duration::from_secs(5), t0);
        h.push(
            entry(2, t0 + 3_000),
            100,
            Duration::from_secs(5),
            t0 + 3_000,
        );
        h.expire(Duration::from_secs(5), t0 + 6_000);
        assert_eq!(h.first_offset(), Some(Offset(2)));
        h.expire(Duration::from_secs(5), t0 + 9_000);
        assert!(h.is_empty());
        assert_eq!(h.payload_bytes(), 0);
        // Nothing retained, but nothing missed either.
        assert!(h.reaches_back_to(Offset(2), Offset(2)));
        assert!(!h.reaches_back_to(Offset(1), Offset(2)));
    }
}
