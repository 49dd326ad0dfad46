//! The correctness ledger: what the API accepted, checked against what every
//! subscriber received.
//!
//! The publisher records every accepted publication's answer (channel,
//! epoch, offset) in the [`Ledger`]. Each subscriber keeps a [`Trail`] per
//! channel: a list of *windows*, each opened by a subscription (or a resume)
//! at a position `(epoch, after)`. While a window is open the contract
//! (PROTOCOL.md §5–6) promises every offset after `after`, once each, in
//! order. A resume or subscribe answered `recovered: false` closes the
//! window and opens the next one at the new position: what was published
//! between the two is *declared* lost, which the contract allows. At the
//! end every window is checked against the ledger:
//!
//! - an accepted offset inside a window that the subscriber never received
//!   is *silently* lost (never allowed);
//! - an offset received twice is a duplicate, one received after a higher
//!   one a reordering (never allowed while recovered);
//! - an accepted offset between two windows is declared lost; so is what
//!   precedes the first delivery of a new epoch on a live subscription
//!   (the message's epoch announces that history was lost: an emptied
//!   Redis, say);
//! - a received offset the ledger does not hold is *unexpected* (a
//!   publication by someone else, or one whose answer never reached the
//!   publisher): counted, not an error.
//!
//! Windows vouch for a range, not a set: memory per subscriber is one range
//! per window as long as deliveries come in order.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use tether_protocol::{ChannelName, Epoch};

/// Examples of each kind of anomaly kept for the report.
pub const EXAMPLES: usize = 5;

/// Accepted publications: per channel and epoch, their offsets. With
/// `--workers` the leader sends it to the members, which check their own
/// clients against it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ledger {
    channels: HashMap<ChannelName, BTreeMap<Epoch, Vec<u64>>>,
    /// Per channel, the epoch of the answer recorded last.
    current: HashMap<ChannelName, Epoch>,
    sorted: bool,
}

impl Ledger {
    /// Records the answer to one accepted publication.
    pub fn record(&mut self, channel: ChannelName, epoch: Epoch, offset: u64) {
        if self.current.get(&channel) != Some(&epoch) {
            self.current.insert(channel.clone(), epoch.clone());
        }
        self.channels
            .entry(channel)
            .or_default()
            .entry(epoch)
            .or_default()
            .push(offset);
        self.sorted = false;
    }

    /// Sorts the offsets (answers arrive out of order when requests run
    /// concurrently) and removes repeats (an idempotent retry answers the
    /// same offset twice).
    pub fn seal(&mut self) {
        for epochs in self.channels.values_mut() {
            for offsets in epochs.values_mut() {
                offsets.sort_unstable();
                offsets.dedup();
            }
        }
        self.sorted = true;
    }

    /// Accepted publications in total.
    pub fn accepted(&self) -> u64 {
        self.channels
            .values()
            .flat_map(|e| e.values())
            .map(|o| o.len() as u64)
            .sum()
    }

    /// The latest accepted position of `channel`: in the epoch of the
    /// answer recorded last (a new epoch replaces the old one: Redis
    /// emptied), its highest offset.
    pub fn latest(&self, channel: &ChannelName) -> Option<(Epoch, u64)> {
        let epoch = self.current.get(channel)?;
        let max = self.channels.get(channel)?.get(epoch)?.iter().max()?;
        Some((epoch.clone(), *max))
    }

    /// The accepted offsets of `channel` in `epoch`, sorted (after [`Ledger::seal`]).
    fn offsets(&self, channel: &ChannelName, epoch: &Epoch) -> &[u64] {
        debug_assert!(self.sorted, "Ledger::seal before checking");
        self.channels
            .get(channel)
            .and_then(|e| e.get(epoch))
            .map_or(&[], Vec::as_slice)
    }
}

/// Sorted, disjoint, inclusive ranges of offsets.
#[derive(Debug, Default, Clone)]
struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    /// Adds `x`; false if it was already there.
    fn insert(&mut self, x: u64) -> bool {
        // The common case: the next offset in order.
        if let Some(last) = self.0.last_mut() {
            if x == last.1.saturating_add(1) {
                last.1 = x;
                return true;
            }
            if x > last.1 {
                self.0.push((x, x));
                return true;
            }
        } else {
            self.0.push((x, x));
            return true;
        }
        // First range whose end is ≥ x.
        let i = self.0.partition_point(|r| r.1 < x);
        if let Some(r) = self.0.get(i)
            && r.0 <= x
        {
            return false;
        }
        let joins_prev = i > 0 && self.0[i - 1].1 + 1 == x;
        let joins_next = self.0.get(i).is_some_and(|r| r.0 == x + 1);
        match (joins_prev, joins_next) {
            (true, true) => {
                self.0[i - 1].1 = self.0[i].1;
                self.0.remove(i);
            }
            (true, false) => self.0[i - 1].1 = x,
            (false, true) => self.0[i].0 = x,
            (false, false) => self.0.insert(i, (x, x)),
        }
        true
    }

    fn contains(&self, x: u64) -> bool {
        let i = self.0.partition_point(|r| r.1 < x);
        self.0.get(i).is_some_and(|r| r.0 <= x)
    }

    fn max(&self) -> Option<u64> {
        self.0.last().map(|r| r.1)
    }
}

/// One stretch of a subscription over which the contract promises every
/// offset after `after`, in `epoch`.
#[derive(Debug, Clone)]
struct Window {
    epoch: Epoch,
    after: u64,
    received: Ranges,
}

impl Window {
    /// The last offset this window vouches for once closed: the highest it
    /// received, or where it started.
    fn reached(&self) -> u64 {
        self.received.max().unwrap_or(self.after).max(self.after)
    }
}

/// What one subscriber saw on one channel.
#[derive(Debug, Clone)]
pub struct Trail {
    subscriber: usize,
    channel: ChannelName,
    windows: Vec<Window>,
    delivered: u64,
    duplicates: Vec<(Epoch, u64)>,
    duplicated: u64,
    reordered: Vec<(Epoch, u64)>,
    reorders: u64,
    /// Deliveries that came in a new epoch on a live subscription.
    epoch_changes: u64,
}

/// An anomaly, for the report's examples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub subscriber: usize,
    pub channel: ChannelName,
    pub epoch: Epoch,
    pub offset: u64,
}

impl fmt::Display for Example {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "channel {} offset {} (epoch {}), subscriber {}",
            self.channel, self.offset, self.epoch, self.subscriber
        )
    }
}

impl Trail {
    /// A subscription of `subscriber` to `channel` that starts after
    /// `offset` in `epoch`.
    pub fn new(subscriber: usize, channel: ChannelName, epoch: Epoch, after: u64) -> Trail {
        Trail {
            subscriber,
            channel,
            windows: vec![Window {
                epoch,
                after,
                received: Ranges::default(),
            }],
            delivered: 0,
            duplicates: Vec::new(),
            duplicated: 0,
            reordered: Vec::new(),
            reorders: 0,
            epoch_changes: 0,
        }
    }

    /// The position to resume from: the current window's epoch and the
    /// highest offset it received (or where it started).
    pub fn position(&self) -> (Epoch, u64) {
        match self.windows.last() {
            Some(w) => (w.epoch.clone(), w.reached()),
            None => (Epoch::default(), 0),
        }
    }

    /// The server answered `recovered: false`: the subscription goes on at
    /// `after` in `epoch`, and what lies between is declared lost.
    pub fn restart(&mut self, epoch: Epoch, after: u64) {
        self.windows.push(Window {
            epoch,
            after,
            received: Ranges::default(),
        });
    }

    /// One delivery.
    pub fn deliver(&mut self, epoch: &Epoch, offset: u64) {
        self.delivered += 1;
        let Some(w) = self.windows.last_mut() else {
            return;
        };
        if w.epoch != *epoch {
            // The channel's history was lost under a live subscription: the
            // new epoch announces it (the SDK reports `epoch_changed`). What
            // came before this offset in the new epoch is declared lost.
            self.epoch_changes += 1;
            self.windows.push(Window {
                epoch: epoch.clone(),
                after: offset.saturating_sub(1),
                received: Ranges::default(),
            });
            if let Some(w) = self.windows.last_mut() {
                w.received.insert(offset);
            }
            return;
        }
        let higher_seen = w.received.max().is_some_and(|m| offset < m);
        if offset <= w.after || !w.received.insert(offset) {
            self.duplicated += 1;
            if self.duplicates.len() < EXAMPLES {
                self.duplicates.push((epoch.clone(), offset));
            }
        } else if higher_seen {
            self.reorders += 1;
            if self.reordered.len() < EXAMPLES {
                self.reordered.push((epoch.clone(), offset));
            }
        }
    }

    /// Has the subscription received everything up to `offset` in `epoch`?
    pub fn reached(&self, epoch: &Epoch, offset: u64) -> bool {
        self.windows
            .last()
            .is_some_and(|w| w.epoch == *epoch && w.reached() >= offset)
    }

    /// Checks this trail against the ledger.
    pub fn check(&self, ledger: &Ledger, out: &mut Verdict) {
        out.subscriptions += 1;
        out.delivered += self.delivered;
        out.duplicated += self.duplicated;
        out.reordered += self.reorders;
        out.epoch_changes += self.epoch_changes;
        let example = |epoch: &Epoch, offset: u64| Example {
            subscriber: self.subscriber,
            channel: self.channel.clone(),
            epoch: epoch.clone(),
            offset,
        };
        for (e, o) in &self.duplicates {
            push_example(&mut out.duplicate_examples, example(e, *o));
        }
        for (e, o) in &self.reordered {
            push_example(&mut out.reorder_examples, example(e, *o));
        }
        let per_channel = out.channels.entry(self.channel.clone()).or_default();
        per_channel.delivered += self.delivered;
        per_channel.duplicated += self.duplicated;
        per_channel.reordered += self.reorders;
        for (i, w) in self.windows.iter().enumerate() {
            let accepted = ledger.offsets(&self.channel, &w.epoch);
            let next = self.windows.get(i + 1);
            // The last window vouches for everything accepted after its
            // start (the run drains before checking); an earlier one up to
            // what it reached before the next began.
            let end = if next.is_some() {
                w.reached()
            } else {
                u64::MAX
            };
            let from = accepted.partition_point(|&o| o <= w.after);
            if i > 0 && self.windows[i - 1].epoch != w.epoch {
                // A new epoch: what it had before this window began is gone
                // with the old one, and said so.
                out.declared_lost += from as u64;
                per_channel.declared_lost += from as u64;
            }
            let to = accepted.partition_point(|&o| o <= end);
            for &o in &accepted[from..to] {
                if !w.received.contains(o) {
                    out.silently_lost += 1;
                    per_channel.silently_lost += 1;
                    push_example(&mut out.lost_examples, example(&w.epoch, o));
                }
            }
            // Received offsets the ledger does not hold.
            for &(a, b) in &w.received.0 {
                let inside =
                    accepted.partition_point(|&o| o <= b) - accepted.partition_point(|&o| o < a);
                out.unexpected += (b - a + 1) - inside as u64;
            }
            // What lies between this window and the next was declared lost.
            if let Some(n) = next {
                let declared_to = if n.epoch == w.epoch {
                    n.after
                } else {
                    u64::MAX
                };
                let d = accepted
                    .partition_point(|&o| o <= declared_to)
                    .saturating_sub(to) as u64;
                out.declared_lost += d;
                per_channel.declared_lost += d;
            }
        }
    }
}

fn push_example(v: &mut Vec<Example>, e: Example) {
    if v.len() < EXAMPLES {
        v.push(e);
    }
}

/// The ledger's findings for one channel.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelVerdict {
    pub delivered: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub declared_lost: u64,
    pub silently_lost: u64,
}

/// The ledger's findings over all subscriptions (with `--workers`, each
/// worker's for its clients, added up by the leader).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Verdict {
    pub subscriptions: u64,
    pub delivered: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub declared_lost: u64,
    pub silently_lost: u64,
    pub unexpected: u64,
    /// Live subscriptions that saw their channel's epoch change.
    pub epoch_changes: u64,
    pub lost_examples: Vec<Example>,
    pub duplicate_examples: Vec<Example>,
    pub reorder_examples: Vec<Example>,
    pub channels: BTreeMap<ChannelName, ChannelVerdict>,
}

impl Verdict {
    /// Checks every trail against the ledger (sealing it first).
    pub fn of<'a>(ledger: &mut Ledger, trails: impl IntoIterator<Item = &'a Trail>) -> Verdict {
        ledger.seal();
        let mut v = Verdict::default();
        for t in trails {
            t.check(ledger, &mut v);
        }
        v
    }

    /// Adds another worker's findings (its clients, the same ledger).
    pub fn absorb(&mut self, o: Verdict) {
        self.subscriptions += o.subscriptions;
        self.delivered += o.delivered;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.declared_lost += o.declared_lost;
        self.silently_lost += o.silently_lost;
        self.unexpected += o.unexpected;
        self.epoch_changes += o.epoch_changes;
        for (mine, theirs) in [
            (&mut self.lost_examples, o.lost_examples),
            (&mut self.duplicate_examples, o.duplicate_examples),
            (&mut self.reorder_examples, o.reorder_examples),
        ] {
            for e in theirs {
                if mine.len() < EXAMPLES {
                    mine.push(e);
                }
            }
        }
        for (channel, c) in o.channels {
            let m = self.channels.entry(channel).or_default();
            m.delivered += c.delivered;
            m.duplicated += c.duplicated;
            m.reordered += c.reordered;
            m.declared_lost += c.declared_lost;
            m.silently_lost += c.silently_lost;
        }
    }

    /// True when the contract was kept: nothing silently lost, duplicated
    /// or reordered.
    pub fn clean(&self) -> bool {
        self.silently_lost == 0 && self.duplicated == 0 && self.reordered == 0
    }

    /// One line per kind of violation, with its first examples.
    pub fn violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        let list = |v: &[Example]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        };
        if self.silently_lost > 0 {
            out.push(format!(
                "{} deliveries silently lost, e.g. {}",
                self.silently_lost,
                list(&self.lost_examples)
            ));
        }
        if self.duplicated > 0 {
            out.push(format!(
                "{} deliveries duplicated, e.g. {}",
                self.duplicated,
                list(&self.duplicate_examples)
            ));
        }
        if self.reordered > 0 {
            out.push(format!(
                "{} deliveries out of order, e.g. {}",
                self.reordered,
                list(&self.reorder_examples)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> ChannelName {
        ChannelName::new(s).expect("channel")
    }

    fn ledger(channel: &str, epoch: &str, offsets: impl IntoIterator<Item = u64>) -> Ledger {
        let mut l = Ledger::default();
        for o in offsets {
            l.record(ch(channel), Epoch::new(epoch), o);
        }
        l
    }

    #[test]
    fn ranges_merge_in_any_order_and_see_repeats() {
        let mut r = Ranges::default();
        for x in [5, 1, 3, 2, 4, 9, 7, 8] {
            assert!(r.insert(x), "{x}");
        }
        assert_eq!(r.0, vec![(1, 5), (7, 9)]);
        assert!(!r.insert(3));
        assert!(!r.insert(9));
        assert!(r.insert(6));
        assert_eq!(r.0, vec![(1, 9)]);
        assert!(r.contains(1) && r.contains(9) && !r.contains(10) && !r.contains(0));
    }

    /// Workers check their own clients against the leader's ledger (sent
    /// as JSON); their verdicts added up are the one-process verdict.
    #[test]
    fn verdicts_of_workers_add_up_to_the_whole() {
        let mut l = ledger("a", "e", 1..=6);
        for o in 1..=3 {
            l.record(ch("b"), Epoch::new("f"), o);
        }
        let trail = |sub: usize, channel: &str, epoch: &str, got: &[u64]| {
            let mut t = Trail::new(sub, ch(channel), Epoch::new(epoch), 0);
            for &o in got {
                t.deliver(&Epoch::new(epoch), o);
            }
            t
        };
        let trails = [
            trail(0, "a", "e", &[1, 2, 3, 4, 5, 6]),
            trail(1, "a", "e", &[1, 2, 2, 4, 5, 6]),
            trail(2, "b", "f", &[1, 3]),
            trail(3, "b", "f", &[1, 2, 3]),
        ];
        let whole = Verdict::of(&mut l, trails.iter());
        let sent = serde_json::to_string(&l).expect("in a test");
        let mut theirs: Ledger = serde_json::from_str(&sent).expect("in a test");
        let mut merged = Verdict::of(&mut l, trails[..2].iter());
        let part = Verdict::of(&mut theirs, trails[2..].iter());
        let part: Verdict = serde_json::from_str(&serde_json::to_string(&part).expect("in a test"))
            .expect("in a test");
        merged.absorb(part);
        assert_eq!(
            (merged.delivered, merged.duplicated, merged.silently_lost),
            (whole.delivered, whole.duplicated, whole.silently_lost)
        );
        assert_eq!((merged.duplicated, merged.silently_lost), (1, 2));
        assert_eq!(merged.channels, whole.channels);
        assert_eq!(merged.lost_examples.len(), whole.lost_examples.len());
    }

    #[test]
    fn everything_in_order_is_clean() {
        let mut l = ledger("c", "e", 1..=10);
        let mut t = Trail::new(0, ch("c"), Epoch::new("e"), 0);
        for o in 1..=10 {
            t.deliver(&Epoch::new("e"), o);
        }
        let v = Verdict::of(&mut l, [&t]);
        assert!(v.clean(), "{:?}", v.violations());
        assert_eq!((v.delivered, v.silently_lost, v.declared_lost), (10, 0, 0));
        assert!(t.reached(&Epoch::new("e"), 10));
    }

    #[test]
    fn a_skipped_offset_is_silent_loss_and_named() {
        let mut l = ledger("room", "e1", 1..=5);
        let mut t = Trail::new(7, ch("room"), Epoch::new("e1"), 0);
        for o in [1, 2, 4, 5] {
            t.deliver(&Epoch::new("e1"), o);
        }
        let v = Verdict::of(&mut l, [&t]);
        assert!(!v.clean());
        assert_eq!(v.silently_lost, 1);
        assert_eq!(
            v.lost_examples,
            vec![Example {
                subscriber: 7,
                channel: ch("room"),
                epoch: Epoch::new("e1"),
                offset: 3
            }]
        );
        assert!(v.violations()[0].contains("channel room offset 3"));
        assert_eq!(v.channels[&ch("room")].silently_lost, 1);
    }

    #[test]
    fn the_last_message_missing_at_the_end_is_lost_too() {
        let mut l = ledger("c", "e", 1..=3);
        let mut t = Trail::new(0, ch("c"), Epoch::new("e"), 0);
        t.deliver(&Epoch::new("e"), 1);
        t.deliver(&Epoch::new("e"), 2);
        let v = Verdict::of(&mut l, [&t]);
        assert_eq!(v.silently_lost, 1);
        assert_eq!(v.lost_examples[0].offset, 3);
    }

    #[test]
    fn duplicates_and_reorders_are_counted() {
        let mut l = ledger("c", "e", 1..=4);
        let mut t = Trail::new(0, ch("c"), Epoch::new("e"), 0);
        for o in [1, 2, 2, 4, 3] {
            t.deliver(&Epoch::new("e"), o);
        }
        let v = Verdict::of(&mut l, [&t]);
        assert_eq!((v.duplicated, v.reordered, v.silently_lost), (1, 1, 0));
        assert_eq!(v.duplicate_examples[0].offset, 2);
        assert_eq!(v.reorder_examples[0].offset, 3);
        // A replay of what came before the subscription is a duplicate too.
        let mut t = Trail::new(0, ch("c"), Epoch::new("e"), 2);
        t.deliver(&Epoch::new("e"), 2);
        let v = Verdict::of(&mut l, [&t]);
        assert_eq!(v.duplicated, 1);
    }

    #[test]
    fn recovered_false_declares_the_gap_and_nothing_else() {
        // Received 1..=3, then resumed with recovered: false at 7: 4..=7
        // were declared lost, 8..=9 must still arrive.
        let mut l = ledger("c", "e", 1..=9);
        let mut t = Trail::new(0, ch("c"), Epoch::new("e"), 0);
        for o in 1..=3 {
            t.deliver(&Epoch::new("e"), o);
        }
        assert_eq!(t.position(), (Epoch::new("e"), 3));
        t.restart(Epoch::new("e"), 7);
        t.deliver(&Epoch::new("e"), 8);
        let v = Verdict::of(&mut l, [&t]);
        assert_eq!((v.declared_lost, v.silently_lost), (4, 1));
        assert_eq!(v.lost_examples[0].offset, 9);
        assert_eq!(v.duplicated, 0);
    }

    #[test]
    fn a_new_epoch_after_recovered_false_declares_the_old_tail() {
        let mut l = ledger("c", "old", 1..=5);
        for o in 1..=2 {
            l.record(ch("c"), Epoch::new("new"), o);
        }
        let mut t = Trail::new(0, ch("c"), Epoch::new("old"), 0);
        t.deliver(&Epoch::new("old"), 1);
        t.restart(Epoch::new("new"), 0);
        t.deliver(&Epoch::new("new"), 1);
        t.deliver(&Epoch::new("new"), 2);
        let v = Verdict::of(&mut l, [&t]);
        assert!(v.clean(), "{:?}", v.violations());
        assert_eq!(v.declared_lost, 4);
        // The epoch answered last is the channel's now, even with lower offsets.
        assert_eq!(l.latest(&ch("c")), Some((Epoch::new("new"), 2)));
    }

    #[test]
    fn a_new_epoch_on_a_live_subscription_declares_what_it_skipped() {
        // Old epoch 1..=3, of which 3 never came; new epoch 1..=4, first
        // seen at 3: old 3 and new 1..=2 are declared lost, new 4 must come.
        let mut l = ledger("c", "e", 1..=3);
        for o in 1..=4 {
            l.record(ch("c"), Epoch::new("other"), o);
        }
        let mut t = Trail::new(0, ch("c"), Epoch::new("e"), 0);
        t.deliver(&Epoch::new("e"), 1);
        t.deliver(&Epoch::new("e"), 2);
        t.deliver(&Epoch::new("other"), 3);
        let v = Verdict::of(&mut l, [&t]);
        assert_eq!(v.epoch_changes, 1);
        assert_eq!((v.declared_lost, v.silently_lost), (3, 1));
        assert_eq!(v.lost_examples[0].offset, 4);
        assert_eq!(v.lost_examples[0].epoch, Epoch::new("other"));
    }

    #[test]
    fn deliveries_the_ledger_does_not_hold_are_unexpected_not_lost() {
        // Offset 2's answer never reached the publisher.
        let mut l = ledger("c", "e", [1, 3]);
        let mut t = Trail::new(0, ch("c"), Epoch::new("e"), 0);
        for o in 1..=3 {
            t.deliver(&Epoch::new("e"), o);
        }
        let v = Verdict::of(&mut l, [&t]);
        assert!(v.clean());
        assert_eq!(v.unexpected, 1);
    }

    #[test]
    fn answers_out_of_order_and_repeated_are_sealed() {
        let mut l = ledger("c", "e", [3, 1, 2, 2]);
        l.seal();
        assert_eq!(l.offsets(&ch("c"), &Epoch::new("e")), &[1, 2, 3]);
        assert_eq!(l.accepted(), 3);
    }
}
