//! [`MemoryResumeStore`]: the resumable sessions of a single node, and
//! [`LocalBus`], which delivers control messages to this node only.
//!
//! One map under one mutex, never held across an await: a claim is one
//! lock, so at most one claim per nonce wins. A takeover's handoff is a slot
//! the claimant waits on (a `Notify`), filled by the old session's detach.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
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
    },
}

/// Resumable sessions of one node.
#[derive(Debug, Default)]
pub struct MemoryResumeStore {
    /// This node: every live session is here.
    node: String,
    sessions: Mutex<HashMap<String, Entry>>,
    /// Handoffs by (session, nonce) until the claimant has taken them.
    handoffs: Mutex<HashMap<(String, u64), Arc<Handoff>>>,
}

impl MemoryResumeStore {
    /// The store of node `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            ..Self::default()
        }
    }

    /// Number of detached (resumable) sessions.
    pub fn detached(&self) -> usize {
        self.sessions
            .lock()
            .values()
            .filter(|e| matches!(e, Entry::Detached { .. }))
            .count()
    }

    fn claim_now(&self, session: &str, nonce: u64) -> Claim {
        let mut map = self.sessions.lock();
        let Some(entry) = map.get_mut(session) else {
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
                match map.remove(session) {
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
        let mut map = self.sessions.lock();
        let Some(Entry::Live { conn_id: live, .. }) = map.get(session) else {
            return;
        };
        if *live != conn_id {
            // Already taken over and registered by a newer connection.
            return;
        }
        match map.remove(session) {
            Some(Entry::Live {
                takeover: Some(handoff),
                ..
            }) => {
                *handoff.record.lock() = Some(record);
                handoff.arrived.notify_one();
            }
            Some(Entry::Live { nonce, .. }) => {
                map.insert(
                    session.to_owned(),
                    Entry::Detached {
                        nonce,
                        record,
                        expires: Instant::now() + window,
                    },
                );
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
        }) = self.sessions.lock().get_mut(session)
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
        self.sessions.lock().insert(
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
        self.sessions
            .lock()
            .retain(|_, e| !matches!(e, Entry::Detached { expires, .. } if *expires < now));
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
