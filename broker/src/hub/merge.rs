//! How a subscription joins a channel's live traffic without a gap or a
//! duplicate, whatever the broker (pure logic, no locks, no I/O).
//!
//! The hub registers the subscriber as *pending* first — from then on
//! every delivery of the channel is buffered for it ([`Buffered`]) — then
//! reads the channel's history from the broker, then, under the channel's
//! lock, asks [`plan`] what to send: the `subscribed` position, the replay
//! (history after `since`, when it reaches back), and which buffered
//! deliveries follow. Anything published before the history read is in the
//! history; anything published after it is in the buffer or still on its
//! way; so the merge is: replay, then the buffered deliveries above the
//! history's latest offset, then live ones, with deliveries the subscriber
//! already got from history skipped when they arrive late.
//!
//! When the buffer does not follow on from the history — a delivery
//! missing in between, or another epoch (the channel was reset during the
//! read) — the history is read again ([`Verdict::Retry`]). On the last
//! attempt the subscription goes ahead with `recovered: false` (no replay)
//! rather than ever claiming a recovery that has a hole.

use bytes::Bytes;
use std::time::Instant;
use tether_protocol::{Epoch, Offset, StreamPosition};

use crate::cluster::{HistoryPage, Position};

/// A delivery held for a pending subscriber, encoded for it.
#[derive(Debug, Clone)]
pub struct Buffered {
    pub epoch: Epoch,
    pub offset: Offset,
    pub bytes: Bytes,
    pub published_at: Option<Instant>,
}

/// What to send a subscriber that joins now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The position given in `subscribed` (the history's latest offset).
    pub position: Position,
    /// Whether every publication after `since` is replayed: then the
    /// history page's messages are sent first.
    pub recovered: bool,
    /// Buffered deliveries of `position.epoch` above `position.offset`
    /// follow (in order); the others are dropped.
    pub after: Offset,
    /// Deliveries of `position.epoch` up to this offset that arrive after
    /// the subscriber went live are skipped (the history had them).
    pub skip_through: Option<Offset>,
}

/// [`plan`]'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ready(Plan),
    /// Read the history again: the buffer does not follow on from it.
    Retry,
}

/// Decides how a subscriber with `since` joins, given a history `page`
/// read after it started buffering and what it has `buffered` since.
/// `last_attempt`: do not ask for another read.
pub fn plan(
    since: Option<&StreamPosition>,
    page: &HistoryPage,
    buffered: &[Buffered],
    last_attempt: bool,
) -> Verdict {
    let epoch = &page.position.epoch;
    let latest = page.position.offset;
    let mut recovered = since.is_some_and(|s| &s.epoch == epoch && page.recovered);
    if let (true, Some(s)) = (recovered, since) {
        // The replay must be exactly since+1 ..= latest.
        let contiguous = page
            .messages
            .iter()
            .zip(s.offset.get().saturating_add(1)..)
            .all(|(m, expected)| m.offset.get() == expected);
        let complete = s.offset.get().saturating_add(page.messages.len() as u64) == latest.get();
        if !(contiguous && complete) {
            if !last_attempt {
                return Verdict::Retry;
            }
            recovered = false;
        }
    }
    // The buffer must follow on from `latest`: no other epoch, no gap.
    let mut expected = latest.next();
    let mut highest_seen = None;
    let mut follows = true;
    for b in buffered {
        if &b.epoch != epoch {
            follows = false;
            continue;
        }
        highest_seen = Some(b.offset);
        if b.offset <= latest {
            continue;
        }
        if b.offset != expected {
            follows = false;
        }
        expected = b.offset.next();
    }
    if !follows {
        if !last_attempt {
            return Verdict::Retry;
        }
        recovered = false;
    }
    let skip_through = match highest_seen {
        Some(h) if h >= latest => None,
        _ if latest == Offset::ZERO => None,
        _ => Some(latest),
    };
    Verdict::Ready(Plan {
        position: page.position.clone(),
        recovered,
        after: latest,
        skip_through,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::HistoryEntry;

    fn page(epoch: &str, latest: u64, retained: &[u64], recovered: bool) -> HistoryPage {
        HistoryPage {
            position: Position {
                epoch: Epoch::new(epoch),
                offset: Offset(latest),
            },
            recovered,
            messages: retained
                .iter()
                .copied()
                .map(|o| HistoryEntry {
                    offset: Offset(o),
                    ts: 0,
                    data: serde_json::value::to_raw_value(&o).expect("raw"),
                })
                .collect(),
        }
    }

    fn buf(epoch: &str, offsets: &[u64]) -> Vec<Buffered> {
        offsets
            .iter()
            .map(|o| Buffered {
                epoch: Epoch::new(epoch),
                offset: Offset(*o),
                bytes: Bytes::new(),
                published_at: None,
            })
            .collect()
    }

    fn since(epoch: &str, offset: u64) -> StreamPosition {
        StreamPosition {
            epoch: Epoch::new(epoch),
            offset: Offset(offset),
        }
    }

    fn ready(v: Verdict) -> Plan {
        match v {
            Verdict::Ready(p) => p,
            Verdict::Retry => panic!("expected a plan"),
        }
    }

    #[test]
    fn history_then_the_buffer_above_it() {
        // Published &[4, 5, 6] before the read, 7 and 8 after: buffered 5..=8.
        let p = ready(plan(
            Some(&since("e", 3)),
            &page("e", 6, &[4, 5, 6], true),
            &buf("e", &[5, 6, 7, 8]),
            false,
        ));
        assert!(p.recovered);
        assert_eq!(p.after, Offset(6));
        assert_eq!(p.skip_through, None, "the buffer already passed 6");
    }

    #[test]
    fn deliveries_that_lag_behind_the_history_are_skipped_when_they_come() {
        let p = ready(plan(
            Some(&since("e", 3)),
            &page("e", 6, &[4, 5, 6], true),
            &buf("e", &[4]),
            false,
        ));
        assert!(p.recovered);
        assert_eq!(p.skip_through, Some(Offset(6)));
        let p = ready(plan(None, &page("e", 6, &[], false), &[], false));
        assert!(!p.recovered);
        assert_eq!(p.skip_through, Some(Offset(6)));
        assert_eq!(p.position.offset, Offset(6));
    }

    #[test]
    fn a_gap_or_another_epoch_in_the_buffer_reads_again_then_gives_up_recovering() {
        let gap = buf("e", &[8]);
        assert_eq!(
            plan(
                Some(&since("e", 3)),
                &page("e", 6, &[4, 5, 6], true),
                &gap,
                false
            ),
            Verdict::Retry
        );
        let p = ready(plan(
            Some(&since("e", 3)),
            &page("e", 6, &[4, 5, 6], true),
            &gap,
            true,
        ));
        assert!(!p.recovered, "never a recovery with a hole");
        let reset = buf("other", &[1]);
        assert_eq!(
            plan(None, &page("e", 6, &[], false), &reset, false),
            Verdict::Retry
        );
    }

    #[test]
    fn no_recovery_across_epochs_or_past_what_history_holds() {
        let p = ready(plan(
            Some(&since("old", 3)),
            &page("e", 6, &[4, 5, 6], true),
            &[],
            false,
        ));
        assert!(!p.recovered);
        let p = ready(plan(
            Some(&since("e", 1)),
            &page("e", 6, &[4, 5, 6], false),
            &[],
            false,
        ));
        assert!(!p.recovered);
        // A page cut short (fewer messages than the gap) is not a recovery.
        assert_eq!(
            plan(
                Some(&since("e", 1)),
                &page("e", 6, &[2, 3, 4], true),
                &[],
                false
            ),
            Verdict::Retry
        );
    }
}
