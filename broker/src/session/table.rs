//! The live sessions of this node, by connection id, reachable through
//! their outbox: to close them all at shutdown (4010) and one of them on a
//! takeover (4000, a [`ControlMessage`] from whichever node resumes it).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tether_protocol::CloseCode;

use crate::cluster::{ControlMessage, ControlSink};
use crate::outbox::Outbox;

const SHARDS: usize = 16;

type Shard = Mutex<HashMap<u64, Arc<Outbox>>>;

/// Live sessions by connection id; also hands out the ids.
#[derive(Debug)]
pub struct SessionTable {
    shards: Box<[Shard]>,
    next_conn: AtomicU64,
}

impl Default for SessionTable {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_conn: AtomicU64::new(1),
        }
    }
}

impl SessionTable {
    fn shard(&self, id: u64) -> &Shard {
        &self.shards[(id as usize) % self.shards.len()]
    }

    /// A connection id, unique within this node's run.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub fn insert(&self, id: u64, outbox: Arc<Outbox>) {
        self.shard(id).lock().insert(id, outbox);
    }

    pub fn remove(&self, id: u64) {
        self.shard(id).lock().remove(&id);
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks one session to close with `code`; `false` if it is not here.
    pub fn close(&self, id: u64, code: CloseCode) -> bool {
        let outbox = self.shard(id).lock().get(&id).cloned();
        match outbox {
            Some(o) => {
                o.close(code);
                true
            }
            None => false,
        }
    }

    /// Closes one session with `code` at once, whatever it has queued
    /// ([`Outbox::close_now`]); `false` if it is not here.
    pub fn close_now(&self, id: u64, code: CloseCode) -> bool {
        let outbox = self.shard(id).lock().get(&id).cloned();
        match outbox {
            Some(o) => {
                o.close_now(code);
                true
            }
            None => false,
        }
    }

    /// Asks every session to close with `code`, advising each to wait a
    /// random delay below `spread_ms` before it reconnects (0: no advice),
    /// so that they do not all come back at once.
    pub fn close_all(&self, code: CloseCode, spread_ms: u64) {
        for shard in self.shards.iter() {
            let outboxes: Vec<Arc<Outbox>> = shard.lock().values().cloned().collect();
            for o in outboxes {
                if spread_ms == 0 {
                    o.close(code);
                } else {
                    o.close_after(code, rand::random::<u64>() % spread_ms);
                }
            }
        }
    }
}

impl ControlSink for SessionTable {
    fn on_control(&self, message: ControlMessage) {
        match message {
            ControlMessage::TakeOver { conn_id } => {
                // At once: the new connection waits for this one's record,
                // and a full socket must not hold it up.
                if !self.close_now(conn_id, CloseCode::Normal) {
                    tracing::debug!(conn_id, "takeover of a session that has ended");
                }
            }
        }
    }
}
