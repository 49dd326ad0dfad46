//! [`MemoryPresence`]: live devices of a single node, by device id.
//!
//! Each live session of a device on a personal channel is one entry with
//! the offset it acked and an expiry (`ttl` after its last join, ack or
//! touch). Sessions leave explicitly; the expiry only guards against one
//! that never could.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tether_protocol::{ChannelName, Offset};

use crate::cluster::presence::PresenceKey;
use crate::cluster::{BoxFuture, Liveness, Presence, PresenceError};

#[derive(Debug)]
struct Live {
    channel: ChannelName,
    conn_id: u64,
    acked: Offset,
    expires: Instant,
}

/// Live sessions by device id.
#[derive(Debug)]
pub struct MemoryPresence {
    devices: Mutex<HashMap<String, Vec<Live>>>,
    ttl: Duration,
}

impl MemoryPresence {
    /// Entries not refreshed for `ttl` count as gone.
    pub fn new(ttl: Duration) -> Self {
        Self {
            devices: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    fn with_entry(&self, key: &PresenceKey<'_>, f: impl FnOnce(&mut Live)) {
        if let Some(e) = self.devices.lock().get_mut(key.device).and_then(|l| {
            l.iter_mut()
                .find(|s| s.conn_id == key.conn_id && &s.channel == key.channel)
        }) {
            f(e);
        }
    }

    fn now_liveness(&self, device: &str, channel: &ChannelName, offset: Offset) -> Liveness {
        let now = Instant::now();
        let map = self.devices.lock();
        let mut out = Liveness::default();
        for s in map
            .get(device)
            .into_iter()
            .flatten()
            .filter(|s| &s.channel == channel && s.expires > now)
        {
            out.live = true;
            out.acked |= s.acked >= offset;
        }
        out
    }
}

impl Presence for MemoryPresence {
    fn join(&self, key: PresenceKey<'_>, acked: Option<Offset>) {
        let expires = Instant::now() + self.ttl;
        let mut map = self.devices.lock();
        let list = map.entry(key.device.to_owned()).or_default();
        list.retain(|s| !(s.conn_id == key.conn_id && &s.channel == key.channel));
        list.push(Live {
            channel: key.channel.clone(),
            conn_id: key.conn_id,
            acked: acked.unwrap_or(Offset::ZERO),
            expires,
        });
    }

    fn ack(&self, key: PresenceKey<'_>, offset: Offset) {
        let expires = Instant::now() + self.ttl;
        self.with_entry(&key, |e| {
            e.acked = e.acked.max(offset);
            e.expires = expires;
        });
    }

    fn touch(&self, key: PresenceKey<'_>) {
        let expires = Instant::now() + self.ttl;
        self.with_entry(&key, |e| e.expires = expires);
    }

    fn leave(&self, key: PresenceKey<'_>) {
        let mut map = self.devices.lock();
        if let Some(list) = map.get_mut(key.device) {
            list.retain(|s| !(s.conn_id == key.conn_id && &s.channel == key.channel));
            if list.is_empty() {
                map.remove(key.device);
            }
        }
    }

    fn liveness<'a>(
        &'a self,
        device: &'a str,
        channel: &'a ChannelName,
        offset: Offset,
    ) -> BoxFuture<'a, Result<Liveness, PresenceError>> {
        let l = self.now_liveness(device, channel, offset);
        Box::pin(async move { Ok(l) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_sessions_per_device_their_acks_and_expiry() {
        let p = MemoryPresence::new(Duration::from_secs(60));
        let ch = ChannelName::new("user:alice").expect("valid");
        let other = ChannelName::new("user:bob").expect("valid");
        let key = PresenceKey {
            device: "phone",
            channel: &ch,
            conn_id: 1,
        };
        let at = |o| p.now_liveness("phone", &ch, Offset(o));
        assert_eq!(at(1), Liveness::default());
        p.join(key.clone(), None);
        assert_eq!(
            at(3),
            Liveness {
                live: true,
                acked: false
            }
        );
        assert!(!p.now_liveness("phone", &other, Offset(1)).live);
        p.ack(key.clone(), Offset(5));
        p.ack(key.clone(), Offset(2)); // cumulative: never goes back
        assert_eq!(
            at(3),
            Liveness {
                live: true,
                acked: true
            }
        );
        p.leave(key.clone());
        assert_eq!(at(3), Liveness::default());

        let short = MemoryPresence::new(Duration::ZERO);
        short.join(key, None);
        std::thread::sleep(Duration::from_millis(2));
        assert!(!short.now_liveness("phone", &ch, Offset(1)).live, "expired");
    }
}
