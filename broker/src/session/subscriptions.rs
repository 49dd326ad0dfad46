//! A session's subscriptions: by number (what the hub's deliveries carry)
//! and by channel (what the client names), with what a resume needs of
//! each — its epoch, the last offset written to the connection and the last
//! one the client acked.
//!
//! Both ways a frame reaches the socket — the session's own writes and the
//! hub's write-through — report deliveries here through one method
//! ([`Subscriptions::delivered`]), and every way a subscription starts — a
//! `subscribe` and a resume's restore — through [`Subscriptions::joined`].

use std::collections::HashMap;

use tether_protocol::{ChannelName, Epoch, Offset};

use crate::cluster::{SessionRecord, SubRecord};
use crate::hub::Subscription;
use crate::outbox::Delivery;

/// One subscription of the session.
#[derive(Debug)]
struct Sub {
    channel: ChannelName,
    epoch: Epoch,
    /// Last offset written to the connection.
    delivered: Offset,
    /// Last offset the client acked (cumulative), if it ever acked.
    acked: Option<Offset>,
}

/// The subscriptions of one session.
#[derive(Debug)]
pub(super) struct Subscriptions {
    by_number: HashMap<u32, Sub>,
    by_channel: HashMap<ChannelName, u32>,
    next: u32,
}

impl Default for Subscriptions {
    fn default() -> Self {
        Self {
            by_number: HashMap::new(),
            by_channel: HashMap::new(),
            next: 1,
        }
    }
}

impl Subscriptions {
    pub(super) fn len(&self) -> usize {
        self.by_channel.len()
    }

    /// The channels subscribed to.
    pub(super) fn channels(&self) -> impl Iterator<Item = &ChannelName> {
        self.by_channel.keys()
    }

    pub(super) fn contains(&self, channel: &ChannelName) -> bool {
        self.by_channel.contains_key(channel)
    }

    /// A number for the next subscription (never 0).
    pub(super) fn next_number(&mut self) -> u32 {
        let n = self.next;
        self.next = self.next.wrapping_add(1).max(1);
        n
    }

    /// Subscription `n` joined `channel` as `joined` says. `since`: the
    /// offset its replay started after (when it asked for one); `acked`:
    /// what the client had acked before (a resume). Returns the acked
    /// offset kept (none unless the subscription recovered).
    pub(super) fn joined(
        &mut self,
        n: u32,
        channel: ChannelName,
        joined: &Subscription,
        since: Option<Offset>,
        acked: Option<Offset>,
    ) -> Option<Offset> {
        let (delivered, acked) = match (since, joined.recovered) {
            (Some(s), true) => (s, acked),
            _ => (joined.position.offset, None),
        };
        self.by_number.insert(
            n,
            Sub {
                channel: channel.clone(),
                epoch: joined.position.epoch.clone(),
                delivered,
                acked,
            },
        );
        self.by_channel.insert(channel, n);
        acked
    }

    /// Ends the subscription to `channel`; its number, if it had one.
    pub(super) fn remove(&mut self, channel: &ChannelName) -> Option<u32> {
        let n = self.by_channel.remove(channel)?;
        self.by_number.remove(&n);
        Some(n)
    }

    /// A `message` frame reached the connection.
    pub(super) fn delivered(&mut self, d: Delivery) {
        if let Some(sub) = self.by_number.get_mut(&d.sub)
            && d.offset > sub.delivered
        {
            sub.delivered = d.offset;
        }
    }

    /// The client acked `offset` on `channel`: cumulative, and never beyond
    /// what was written. Returns the offset now acked, if subscribed.
    pub(super) fn ack(&mut self, channel: &ChannelName, offset: Offset) -> Option<Offset> {
        let sub = self
            .by_channel
            .get(channel)
            .and_then(|n| self.by_number.get_mut(n))?;
        let offset = offset.min(sub.delivered);
        if sub.acked.is_none_or(|acked| offset > acked) {
            sub.acked = Some(offset);
        }
        sub.acked
    }

    /// What a resume would need of the subscriptions now.
    pub(super) fn record(&self) -> SessionRecord {
        SessionRecord {
            subs: self
                .by_number
                .values()
                .map(|sub| SubRecord {
                    channel: sub.channel.clone(),
                    epoch: sub.epoch.clone(),
                    delivered: sub.delivered,
                    acked: sub.acked,
                })
                .collect(),
        }
    }

    /// Ends every subscription: their numbers and channels (to leave the
    /// hub) and what a resume needs of them.
    pub(super) fn take_all(&mut self) -> (Vec<(u32, ChannelName)>, SessionRecord) {
        self.by_channel.clear();
        let mut numbers = Vec::with_capacity(self.by_number.len());
        let mut record = SessionRecord::default();
        for (n, sub) in self.by_number.drain() {
            numbers.push((n, sub.channel.clone()));
            record.subs.push(SubRecord {
                channel: sub.channel,
                epoch: sub.epoch,
                delivered: sub.delivered,
                acked: sub.acked,
            });
        }
        (numbers, record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Position;

    fn joined(offset: u64, recovered: bool) -> Subscription {
        Subscription {
            position: Position {
                epoch: Epoch::new("e"),
                offset: Offset(offset),
            },
            recovered,
            replayed: 0,
        }
    }

    #[test]
    fn acks_are_cumulative_and_never_beyond_what_was_written() {
        let ch = ChannelName::new("c").expect("valid");
        let mut s = Subscriptions::default();
        let n = s.next_number();
        s.joined(n, ch.clone(), &joined(10, false), None, None);
        assert_eq!(s.ack(&ch, Offset(12)), Some(Offset(10)));
        s.delivered(Delivery {
            sub: n,
            offset: Offset(14),
        });
        assert_eq!(s.ack(&ch, Offset(12)), Some(Offset(12)));
        assert_eq!(s.ack(&ch, Offset(11)), Some(Offset(12)));
        let (numbers, record) = s.take_all();
        assert_eq!(numbers, vec![(n, ch.clone())]);
        assert_eq!(record.subs[0].delivered, Offset(14));
        assert_eq!(record.subs[0].acked, Some(Offset(12)));
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn a_recovered_join_starts_at_its_since_and_keeps_its_acks() {
        let ch = ChannelName::new("c").expect("valid");
        let mut s = Subscriptions::default();
        let n = s.next_number();
        assert_eq!(
            s.joined(
                n,
                ch.clone(),
                &joined(10, true),
                Some(Offset(4)),
                Some(Offset(3))
            ),
            Some(Offset(3))
        );
        let (_, record) = s.take_all();
        assert_eq!(record.subs[0].delivered, Offset(4));
        let m = s.next_number();
        assert_ne!(m, n);
        // Not recovered: starts at the channel's position, acks forgotten.
        assert_eq!(
            s.joined(m, ch, &joined(10, false), Some(Offset(4)), Some(Offset(3))),
            None
        );
        let (_, record) = s.take_all();
        assert_eq!(record.subs[0].delivered, Offset(10));
    }
}
