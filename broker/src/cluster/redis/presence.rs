//! [`RedisPresence`]: which devices have a live session, cluster-wide.
//!
//! One hash per device, `tether:{#dev:<device>}:live`: for each live
//! session (node, connection, personal channel) a field with its expiry
//! (unix ms) and one with the offset it acked. Sessions refresh their
//! entry on every heartbeat; a node that dies leaves entries that stop
//! counting at their expiry — two heartbeats — and the key itself expires
//! soon after.
//!
//! The session's writes never wait: they go to a writer task through a
//! bounded queue (8,192) and are pipelined; when the queue is full a write
//! is dropped and counted — a dropped join or ack means one push too many,
//! a dropped leave an entry that expires on its own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tether_protocol::{ChannelName, Offset};
use tokio::sync::mpsc;
use tracing::debug;

use super::{Conn, timed};
use crate::cluster::presence::PresenceKey;
use crate::cluster::{BoxFuture, Liveness, Presence, PresenceError};

const QUEUE: usize = 8192;
const BATCH: usize = 512;

fn device_key(device: &str) -> String {
    format!("tether:{{#dev:{device}}}:live")
}

fn field(node: &str, key: &PresenceKey<'_>) -> String {
    format!("{node}/{}/{}", key.conn_id, key.channel)
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

enum Write {
    /// Field expiry (and acked offset, when given).
    Set {
        key: String,
        field: String,
        acked: Option<u64>,
    },
    Delete {
        key: String,
        field: String,
    },
}

/// Presence in Redis.
pub struct RedisPresence {
    conn: Conn,
    node: String,
    ttl: Duration,
    writes: mpsc::Sender<Write>,
    dropped: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPresence")
            .field("node", &self.node)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl RedisPresence {
    /// Presence of node `node`; entries count for `ttl` after their last
    /// refresh. Starts the writer task.
    pub fn new(
        conn: Conn,
        node: impl Into<String>,
        ttl: Duration,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        let (writes, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(conn.clone(), rx, ttl));
        Self {
            conn,
            node: node.into(),
            ttl,
            writes,
            dropped,
        }
    }

    fn queue(&self, w: Write) {
        if self.writes.try_send(w).is_err() {
            self.dropped.inc();
        }
    }
}

async fn write_loop(conn: Conn, mut rx: mpsc::Receiver<Write>, ttl: Duration) {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let expires = unix_millis().saturating_add(ttl_ms);
        let mut pipe = redis::pipe();
        for w in &batch {
            match w {
                Write::Set { key, field, acked } => {
                    pipe.cmd("HSET").arg(key).arg(field).arg(expires).ignore();
                    if let Some(a) = acked {
                        pipe.cmd("HSET")
                            .arg(key)
                            .arg(format!("{field}#a"))
                            .arg(a)
                            .ignore();
                    }
                    // The key outlives its longest entry a little.
                    pipe.cmd("PEXPIRE")
                        .arg(key)
                        .arg(ttl_ms.saturating_mul(2))
                        .ignore();
                }
                Write::Delete { key, field } => {
                    pipe.cmd("HDEL")
                        .arg(key)
                        .arg(field)
                        .arg(format!("{field}#a"))
                        .ignore();
                }
            }
        }
        let mut c = conn.clone();
        let done: Result<(), _> = timed(pipe.query_async(&mut c)).await;
        if let Err(e) = done {
            debug!(error = %e, writes = batch.len(), "presence writes lost (they expire on their own)");
        }
    }
}

impl Presence for RedisPresence {
    fn join(&self, key: PresenceKey<'_>, acked: Option<Offset>) {
        self.queue(Write::Set {
            key: device_key(key.device),
            field: field(&self.node, &key),
            acked: Some(acked.map_or(0, Offset::get)),
        });
    }

    fn ack(&self, key: PresenceKey<'_>, offset: Offset) {
        self.queue(Write::Set {
            key: device_key(key.device),
            field: field(&self.node, &key),
            acked: Some(offset.get()),
        });
    }

    fn touch(&self, key: PresenceKey<'_>) {
        self.queue(Write::Set {
            key: device_key(key.device),
            field: field(&self.node, &key),
            acked: None,
        });
    }

    fn leave(&self, key: PresenceKey<'_>) {
        self.queue(Write::Delete {
            key: device_key(key.device),
            field: field(&self.node, &key),
        });
    }

    fn liveness<'a>(
        &'a self,
        device: &'a str,
        channel: &'a ChannelName,
        offset: Offset,
    ) -> BoxFuture<'a, Result<Liveness, PresenceError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let all: Vec<(String, u64)> = timed(
                redis::cmd("HGETALL")
                    .arg(device_key(device))
                    .query_async(&mut conn),
            )
            .await
            .map_err(|e| PresenceError(e.to_string()))?;
            let now = unix_millis();
            let suffix = format!("/{channel}");
            let mut out = Liveness::default();
            for (f, expires) in &all {
                if f.ends_with("#a") {
                    continue;
                }
                if *expires <= now {
                    // Left by a session whose node died: tidy it away.
                    self.queue(Write::Delete {
                        key: device_key(device),
                        field: f.clone(),
                    });
                    continue;
                }
                if !f.ends_with(&suffix) {
                    continue;
                }
                out.live = true;
                let acked = all
                    .iter()
                    .find(|(g, _)| g.strip_suffix("#a") == Some(f.as_str()))
                    .map_or(0, |(_, a)| *a);
                out.acked |= acked >= offset.get();
            }
            Ok(out)
        })
    }
}
