//! Push coalescing: a device that is offline while a burst of publications
//! arrives gets at most one push per collapse key (the notification's
//! `collapse_key`, else the channel) per window, instead of one per message.
//!
//! The first publication is pushed at once and opens a window. Those that
//! follow within it are held: only the latest is kept, with the number of
//! publications it stands for. When the window closes the latest is pushed
//! with that `count` (and opens the next window); a window that closes with
//! nothing held is forgotten. So pushes for one key are at least a window
//! apart, the first comes without delay, and the last publication of a
//! burst is always the one the device ends up with.
//!
//! Pure bookkeeping, no I/O and no clock of its own: the gateway feeds it
//! jobs and the time, and enqueues what it hands back. The state is this
//! node's memory, bounded by `max_keys`: a job for a new key when that many
//! windows are open is pushed at once, uncoalesced. What is held when the
//! gateway stops is handed back by [`Coalescer::drain`] and written to the
//! durable outbox; a crash loses only the held summaries (the messages
//! themselves are in the channel's history).

use std::collections::{HashMap, VecDeque};

use crate::types::NewPushJob;

/// Default bound on open windows.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    device_id: String,
    collapse: String,
}

struct Window {
    until_ms: u64,
    /// The latest publication held back, if any.
    held: Option<NewPushJob>,
    /// Publications held back in this window.
    count: u32,
}

/// Open windows per (device, collapse key).
pub struct Coalescer {
    window_ms: u64,
    max_keys: usize,
    windows: HashMap<Key, Window>,
    /// Window ends in the order they were set, which is the order they
    /// fall due (every window is as long, the clock never goes back).
    /// Entries of windows that were renewed since are skipped.
    deadlines: VecDeque<(u64, Key)>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("window_ms", &self.window_ms)
            .field("open", &self.windows.len())
            .finish_non_exhaustive()
    }
}

impl Coalescer {
    pub fn new(window_ms: u64, max_keys: usize) -> Self {
        Self {
            window_ms: window_ms.max(1),
            max_keys,
            windows: HashMap::new(),
            deadlines: VecDeque::new(),
        }
    }

    /// Windows open now.
    pub fn open(&self) -> usize {
        self.windows.len()
    }

    fn key(job: &NewPushJob) -> Key {
        Key {
            device_id: job.device_id.clone(),
            collapse: job
                .notification
                .collapse_key
                .clone()
                .unwrap_or_else(|| job.channel.clone()),
        }
    }

    fn open_window(&mut self, key: Key, now_ms: u64) {
        let until_ms = now_ms.saturating_add(self.window_ms);
        self.deadlines.push_back((until_ms, key.clone()));
        self.windows.insert(
            key,
            Window {
                until_ms,
                held: None,
                count: 0,
            },
        );
    }

    /// A job for a device that is offline, at `now_ms`: `Some` to push
    /// now, `None` when it is held (it goes out, summed up, when its window
    /// closes).
    pub fn offer(&mut self, job: NewPushJob, now_ms: u64) -> Option<NewPushJob> {
        let key = Self::key(&job);
        let full = self.windows.len() >= self.max_keys;
        match self.windows.get_mut(&key) {
            // Open, or closed with a summary not yet collected by `due`
            // (which then sends this job as the summary, so order holds).
            Some(w) if now_ms < w.until_ms || w.held.is_some() => {
                w.count = w.count.saturating_add(1);
                w.held = Some(job);
                None
            }
            Some(_) => {
                self.open_window(key, now_ms);
                Some(job)
            }
            None if full => Some(job),
            None => {
                self.open_window(key, now_ms);
                Some(job)
            }
        }
    }

    /// When the earliest open window closes.
    pub fn next_due(&self) -> Option<u64> {
        self.deadlines.front().map(|(at, _)| *at)
    }

    /// The summaries of the windows closed by `now_ms`, each with the
    /// `count` of publications it stands for; each opens the next window.
    pub fn due(&mut self, now_ms: u64) -> Vec<NewPushJob> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.deadlines.front() {
            if *at > now_ms {
                break;
            }
            let Some((at, key)) = self.deadlines.pop_front() else {
                break;
            };
            let Some(w) = self.windows.get_mut(&key) else {
                continue;
            };
            if w.until_ms != at {
                continue; // renewed since: a later entry stands for it
            }
            match w.held.take() {
                Some(mut job) => {
                    job.count = w.count;
                    out.push(job);
                    self.open_window(key, now_ms);
                }
                None => {
                    self.windows.remove(&key);
                }
            }
        }
        out
    }

    /// Everything held, as summaries (at shutdown); forgets every window.
    pub fn drain(&mut self) -> Vec<NewPushJob> {
        self.deadlines.clear();
        self.windows
            .drain()
            .filter_map(|(_, w)| {
                let count = w.count;
                w.held.map(|mut job| {
                    job.count = count;
                    job
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::types::{Notification, Platform};

    fn job(device: &str, channel: &str, offset: u64, collapse: Option<&str>) -> NewPushJob {
        NewPushJob {
            device_id: device.into(),
            user: "u".into(),
            platform: Platform::Apns,
            token: "ab".into(),
            topic: None,
            sandbox: false,
            notification: Notification {
                collapse_key: collapse.map(str::to_owned),
                ..Default::default()
            },
            channel: channel.into(),
            offset,
            created_at: 0,
            count: 0,
        }
    }

    fn sent(o: Option<NewPushJob>) -> Option<u64> {
        o.map(|j| j.offset)
    }

    #[test]
    fn a_burst_is_one_push_at_once_and_one_summary_when_the_window_closes() {
        let mut c = Coalescer::new(1000, 10);
        assert_eq!(sent(c.offer(job("d", "user:u", 1, None), 0)), Some(1));
        for i in 2..=50 {
            assert_eq!(sent(c.offer(job("d", "user:u", i, None), 10 + i)), None);
        }
        assert_eq!(c.next_due(), Some(1000));
        assert!(c.due(999).is_empty());
        let summary = c.due(1000);
        assert_eq!(summary.len(), 1);
        assert_eq!((summary[0].offset, summary[0].count), (50, 49));
        assert_eq!(summary[0].coalesced_count(), Some(49));
        // The summary opened a window: the next publication is held too…
        assert_eq!(sent(c.offer(job("d", "user:u", 51, None), 1500)), None);
        let again = c.due(2000);
        assert_eq!((again[0].offset, again[0].count), (51, 1));
        assert_eq!(again[0].coalesced_count(), None);
        // …and a window that closes with nothing held is forgotten.
        assert!(c.due(3000).is_empty());
        assert_eq!(c.open(), 0);
        assert_eq!(sent(c.offer(job("d", "user:u", 52, None), 3001)), Some(52));
    }

    #[test]
    fn devices_and_collapse_keys_have_their_own_windows() {
        let mut c = Coalescer::new(1000, 10);
        assert!(sent(c.offer(job("a", "user:u", 1, None), 0)).is_some());
        assert!(sent(c.offer(job("b", "user:u", 1, None), 0)).is_some());
        assert!(sent(c.offer(job("a", "user:u", 2, Some("news")), 0)).is_some());
        assert!(sent(c.offer(job("a", "user:u", 3, Some("news")), 0)).is_none());
        assert!(sent(c.offer(job("a", "user:u", 4, None), 0)).is_none());
        let mut due: Vec<_> = c.due(1000).into_iter().map(|j| j.offset).collect();
        due.sort_unstable();
        assert_eq!(due, [3, 4]);
    }

    #[test]
    fn past_the_bound_new_keys_are_not_coalesced_and_drain_hands_back_what_is_held() {
        let mut c = Coalescer::new(1000, 1);
        assert!(sent(c.offer(job("a", "user:u", 1, None), 0)).is_some());
        assert!(sent(c.offer(job("b", "user:u", 1, None), 0)).is_some());
        assert!(sent(c.offer(job("b", "user:u", 2, None), 0)).is_some());
        assert!(sent(c.offer(job("a", "user:u", 2, None), 0)).is_none());
        assert!(sent(c.offer(job("a", "user:u", 3, None), 0)).is_none());
        let held = c.drain();
        assert_eq!(held.len(), 1);
        assert_eq!((held[0].offset, held[0].count), (3, 2));
        assert_eq!(c.open(), 0);
        assert_eq!(c.next_due(), None);
    }
}
