//! [`MemoryResumeStore`]: the resumable sessions of a single node, and
//! [`LocalBus`], which delivers control messages to this node only.
//!
//! One map under one mutex, never held across an await: a claim is one
//! lock, so at most one claim per nonce wins. A takeover's handoff is a slot
//! the claimant waits on (a `Notify`), filled by the old session's detach.
//!
//! Detached records are bounded by bytes (`--max-resume-bytes`, an estimate
//! of what each record holds): past the budget the oldest detached records
//! are forgotten first — their sessions can no longer resume and start
//! afresh, as after the resume window — and counted
//! (`tether_resume_records_evicted_total`). Live entries are bounded by the
//! connections.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

use crate::cluster::{
    BoxFuture, Claim, ControlMessage, ControlSink, NodeBus, Refusal, ResumeError, ResumeStore,
    SessionRecord, resume::LiveSession,
};

/// Where a claimed live session's record arrives.
#[derive(Debug, Default)]
struct Handoff {
    record: Mutex<Option<SessionRecord>>,
    arrived: Notify,
}

#[derive(Debug)]
enum Entry {
    Live {
        /// The connection on this node.
        conn_id: u64,
        nonce: u64,
        /// A claim waiting for this session's record.
        takeover: Option<Arc<Handoff>>,
    },
    Detached {
        nonce: u64,
        record: SessionRecord,
        expires: Instant,
        /// What the record is counted as against the budget.
        bytes: usize,
    },
}

/// Default budget for detached records (`--max-resume-bytes`).
pub const DEFAULT_RESUME_BYTES: usize = 256 * 1024 * 1024;

/// What a detached record is counted as: its channel names and epochs and
/// a fixed overhead per subscription and per record.
fn record_bytes(session: &str, record: &SessionRecord) -> usize {
    let subs: usize = record
        .subs
        .iter()
        .map(|s| s.channel.as_str().len() + s.epoch.as_str().len() + 64)
        .sum();
    session.len() + subs + 128
}

#[derive(Debug, Default)]
struct Sessions {
    map: HashMap<String, Entry>,
    /// Detached sessions in the order they detached, with their nonce
    /// (entries whose record was claimed or swept since are skipped, and
    /// dropped by `sweep`).
    order: VecDeque<(String, u64)>,
    /// Bytes of the detached records.
    bytes: usize,
}

impl Sessions {
    /// Removes `session` if it is detached with `nonce`; its bytes leave
    /// the budget.
    fn remove_detached(&mut self, session: &str, nonce: u64) -> Option<Entry> {
        match self.map.get(session) {
            Some(Entry::Detached { nonce: n, .. }) if *n == nonce => {}
            _ => return None,
        }
        let entry = self.map.remove(session)?;
        if let Entry::Detached { bytes, .. } = &entry {
            self.bytes = self.bytes.saturating_sub(*bytes);
        }
        Some(entry)
    }
}

/// Resumable sessions of one node.
#[derive(Debug)]
pub struct MemoryResumeStore {
    /// This node: every live session is here.
    node: String,
    sessions: Mutex<Sessions>,
    /// Handoffs by (session, nonce) until the claimant has taken them.
    handoffs: Mutex<HashMap<(String, u64), Arc<Handoff>>>,
    budget: usize,
    evicted: Counter,
}

impl MemoryResumeStore {
    /// The store of node `node`, with the default budget.
    pub fn new(node: impl Into<String>) -> Self {
        Self::with_budget(node, DEFAULT_RESUME_BYTES, Counter::default())
    }

    /// The store of node `node`: detached records within `budget` bytes,
    /// the oldest forgotten first (counted in `evicted`).
    pub fn with_budget(node: impl Into<String>, budget: usize, evicted: Counter) -> Self {
        Self {
            node: node.into(),
            sessions: Mutex::new(Sessions::default()),
            handoffs: Mutex::new(HashMap::new()),
            budget,
            evicted,
        }
    }

    /// Bytes the detached records are counted as.
    pub fn detached_bytes(&self) -> usize {
        self.sessions.lock().bytes
    }

    /// Number of detached (resumable) sessions.
    pub fn detached(&self) -> usize {
        self.sessions
            .lock()
            .map
            .values()
            .filter(|e| matches!(e, Entry::Detached { .. }))
            .count()
    }

    fn claim_now(&self, session: &str, nonce: u64) -> Claim {
        let mut sessions = self.sessions.lock();
        let Some(entry) = sessions.map.get_mut(session) else {
            return Claim::Refused(Refusal::Expired);
        };
        match entry {
            Entry::Detached {
                nonce: n, expires, ..
            } => {
                if *n != nonce {
                    return Claim::Refused(Refusal::Used);
                }
                let expired = Instant::now() > *expires;
                match sessions.remove_detached(session, nonce) {
                    Some(Entry::Detached { record, .. }) if !expired => Claim::Ready(record),
                    _ => Claim::Refused(Refusal::Expired),
                }
            }
            Entry::Live {
                conn_id,
                nonce: n,
                takeover,
            } => {
                if *n != nonce || takeover.is_some() {
                    return Claim::Refused(Refusal::Used);
                }
                let handoff = Arc::new(Handoff::default());
                *takeover = Some(handoff.clone());
                self.handoffs
                    .lock()
                    .insert((session.to_owned(), nonce), handoff);
                Claim::Live(LiveSession {
                    node: self.node.clone(),
                    conn_id: *conn_id,
                })
            }
        }
    }

    fn detach_now(&self, session: &str, conn_id: u64, record: SessionRecord, window: Duration) {
        let mut sessions = self.sessions.lock();
        let Some(Entry::Live { conn_id: live, .. }) = sessions.map.get(session) else {
            return;
        };
        if *live != conn_id {
            // Already taken over and registered by a newer connection.
            return;
        }
        match sessions.map.remove(session) {
            Some(Entry::Live {
                takeover: Some(handoff),
                ..
            }) => {
                *handoff.record.lock() = Some(record);
                handoff.arrived.notify_one();
            }
            Some(Entry::Live { nonce, .. }) => {
                let bytes = record_bytes(session, &record);
                sessions.bytes += bytes;
                sessions.order.push_back((session.to_owned(), nonce));
                sessions.map.insert(
                    session.to_owned(),
                    Entry::Detached {
                        nonce,
                        record,
                        expires: Instant::now() + window,
                        bytes,
                    },
                );
                // Over budget: the oldest detached records go first.
                while sessions.bytes > self.budget {
                    let Some((old, old_nonce)) = sessions.order.pop_front() else {
                        break;
                    };
                    if sessions.remove_detached(&old, old_nonce).is_some() {
                        self.evicted.inc();
                    }
                }
            }
            _ => {}
        }
    }

    /// Withdraws a claim whose handoff did not come: the live session keeps
    /// its token.
    fn withdraw(&self, session: &str, nonce: u64) {
        self.handoffs.lock().remove(&(session.to_owned(), nonce));
        if let Some(Entry::Live {
            nonce: n, takeover, ..
        }) = self.sessions.lock().map.get_mut(session)
            && *n == nonce
        {
            *takeover = None;
        }
    }
}

impl ResumeStore for MemoryResumeStore {
    fn register_live<'a>(
        &'a self,
        session: &'a str,
        live: LiveSession,
        nonce: u64,
    ) -> BoxFuture<'a, Result<(), ResumeError>> {
        debug_assert_eq!(live.node, self.node, "a single node holds every session");
        let mut sessions = self.sessions.lock();
        if let Some(Entry::Detached { bytes, .. }) = sessions.map.get(session) {
            let bytes = *bytes;
            sessions.bytes = sessions.bytes.saturating_sub(bytes);
        }
        sessions.map.insert(
            session.to_owned(),
            Entry::Live {
                conn_id: live.conn_id,
                nonce,
                takeover: None,
            },
        );
        Box::pin(async { Ok(()) })
    }

    fn claim<'a>(
        &'a self,
        session: &'a str,
        nonce: u64,
    ) -> BoxFuture<'a, Result<Claim, ResumeError>> {
        let claim = self.claim_now(session, nonce);
        Box::pin(async move { Ok(claim) })
    }

    fn await_handoff<'a>(
        &'a self,
        session: &'a str,
        nonce: u64,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, ResumeError>> {
        Box::pin(async move {
            let Some(handoff) = self
                .handoffs
                .lock()
                .get(&(session.to_owned(), nonce))
                .cloned()
            else {
                return Ok(None);
            };
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let arrived = handoff.arrived.notified();
                if let Some(record) = handoff.record.lock().take() {
                    self.handoffs.lock().remove(&(session.to_owned(), nonce));
                    return Ok(Some(record));
                }
                if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                    self.withdraw(session, nonce);
                    // It may have arrived just now.
                    return Ok(handoff.record.lock().take());
                }
            }
        })
    }

    fn detach<'a>(
        &'a self,
        session: &'a str,
        conn_id: u64,
        record: SessionRecord,
        window: Duration,
    ) -> BoxFuture<'a, Result<(), ResumeError>> {
        self.detach_now(session, conn_id, record, window);
        Box::pin(async { Ok(()) })
    }

    /// Forgets detached sessions whose window has passed.
    fn sweep(&self) {
        let now = Instant::now();
        let mut sessions = self.sessions.lock();
        let mut freed = 0;
        sessions.map.retain(|_, e| match e {
            Entry::Detached { expires, bytes, .. } if *expires < now => {
                freed += *bytes;
                false
            }
            _ => true,
        });
        sessions.bytes = sessions.bytes.saturating_sub(freed);
        let Sessions { map, order, .. } = &mut *sessions;
        order.retain(
            |(s, nonce)| matches!(map.get(s), Some(Entry::Detached { nonce: n, .. }) if n == nonce),
        );
    }
}

/// The node bus of a single node: a message for this node goes to its
/// sink (the session table); there is no other node.
pub struct LocalBus {
    node_id: String,
    sink: Weak<dyn ControlSink>,
}

impl std::fmt::Debug for LocalBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBus")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl LocalBus {
    pub fn new(node_id: impl Into<String>, sink: Weak<dyn ControlSink>) -> LocalBus {
        LocalBus {
            node_id: node_id.into(),
            sink,
        }
    }
}

impl NodeBus for LocalBus {
    fn send<'a>(
        &'a self,
        node: &'a str,
        message: ControlMessage,
    ) -> BoxFuture<'a, Result<(), ResumeError>> {
        let sent = match (node == self.node_id, self.sink.upgrade()) {
            (true, Some(sink)) => {
                sink.on_control(message);
                Ok(())
            }
            _ => Err(ResumeError(format!("no node {node:?} on this bus"))),
        };
        Box::pin(async move { sent })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn live(conn_id: u64) -> LiveSession {
        LiveSession {
            node: "n".into(),
            conn_id,
        }
    }

    fn now<T>(f: impl std::future::Future<Output = T>) -> T {
        f.now_or_never().expect("ready")
    }

    #[test]
    fn a_detached_session_is_claimed_once_within_its_window() {
        let r = MemoryResumeStore::new("n");
        now(r.register_live("s", live(1), 42)).expect("ok");
        now(r.detach("s", 1, SessionRecord::default(), Duration::from_secs(60))).expect("ok");
        assert_eq!(r.detached(), 1);
        assert!(matches!(
            now(r.claim("s", 41)),
            Ok(Claim::Refused(Refusal::Used))
        ));
        assert!(matches!(now(r.claim("s", 42)), Ok(Claim::Ready(_))));
        assert!(matches!(
            now(r.claim("s", 42)),
            Ok(Claim::Refused(Refusal::Expired))
        ));
    }

    fn record(channels: usize) -> SessionRecord {
        SessionRecord {
            subs: (0..channels)
                .map(|i| crate::cluster::SubRecord {
                    channel: tether_protocol::ChannelName::new(format!("room:{i:0>200}"))
                        .expect("a valid name"),
                    epoch: tether_protocol::Epoch::new("e"),
                    delivered: tether_protocol::Offset(1),
                    acked: None,
                })
                .collect(),
        }
    }

    #[test]
    fn past_the_budget_the_oldest_detached_records_are_forgotten() {
        let one = record_bytes("s0", &record(10));
        let evicted = Counter::default();
        // Room for two records of ten subscriptions, not three.
        let r = MemoryResumeStore::with_budget("n", 2 * one + one / 2, evicted.clone());
        for i in 0..3u64 {
            let s = format!("s{i}");
            now(r.register_live(&s, live(i), 100 + i)).expect("ok");
            now(r.detach(&s, i, record(10), Duration::from_secs(60))).expect("ok");
        }
        assert_eq!(r.detached(), 2);
        assert_eq!(evicted.get(), 1);
        assert_eq!(r.detached_bytes(), 2 * one);
        // The oldest starts afresh; the others resume with their record.
        assert!(matches!(
            now(r.claim("s0", 100)),
            Ok(Claim::Refused(Refusal::Expired))
        ));
        match now(r.claim("s1", 101)) {
            Ok(Claim::Ready(rec)) => assert_eq!(rec.subs.len(), 10),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.detached_bytes(), one);
        // Records that left on their own are not evicted again, and the
        // bytes of a claimed one are free for the next.
        now(r.register_live("s3", live(3), 103)).expect("ok");
        now(r.detach("s3", 3, record(10), Duration::from_secs(60))).expect("ok");
        assert_eq!(evicted.get(), 1);
        assert_eq!(r.detached(), 2);
        r.sweep();
        assert_eq!(
            r.sessions.lock().order.len(),
            2,
            "sweep drops stale order entries"
        );
    }

    #[test]
    fn after_the_window_the_session_is_gone() {
        let r = MemoryResumeStore::new("n");
        now(r.register_live("s", live(1), 1)).expect("ok");
        now(r.detach("s", 1, SessionRecord::default(), Duration::ZERO)).expect("ok");
        std::thread::sleep(Duration::from_millis(2));
        assert!(matches!(
            now(r.claim("s", 1)),
            Ok(Claim::Refused(Refusal::Expired))
        ));
    }

    #[tokio::test]
    async fn a_live_session_hands_its_record_to_the_claim() {
        let r = Arc::new(MemoryResumeStore::new("n"));
        r.register_live("s", live(1), 7).await.expect("ok");
        let Ok(Claim::Live(at)) = r.claim("s", 7).await else {
            panic!("expected a takeover")
        };
        assert_eq!(at, live(1));
        // A second claim with the same token while the first is pending.
        assert!(matches!(
            r.claim("s", 7).await,
            Ok(Claim::Refused(Refusal::Used))
        ));
        let waiting = tokio::spawn({
            let r = r.clone();
            async move { r.await_handoff("s", 7, Duration::from_secs(5)).await }
        });
        tokio::task::yield_now().await;
        let record = SessionRecord {
            subs: vec![crate::cluster::SubRecord {
                channel: tether_protocol::ChannelName::new("c").expect("valid"),
                epoch: tether_protocol::Epoch::new("e"),
                delivered: tether_protocol::Offset(3),
                acked: None,
            }],
        };
        r.detach("s", 1, record.clone(), Duration::from_secs(60))
            .await
            .expect("ok");
        assert_eq!(waiting.await.expect("joined").expect("ok"), Some(record));
        assert_eq!(r.detached(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_takeover_that_gets_no_answer_leaves_the_token_usable() {
        let r = MemoryResumeStore::new("n");
        r.register_live("s", live(1), 7).await.expect("ok");
        assert!(matches!(r.claim("s", 7).await, Ok(Claim::Live(_))));
        let got = r
            .await_handoff("s", 7, Duration::from_secs(3))
            .await
            .expect("ok");
        assert_eq!(got, None);
        // The old session is still live and its token works once more.
        assert!(matches!(r.claim("s", 7).await, Ok(Claim::Live(_))));
    }
}
