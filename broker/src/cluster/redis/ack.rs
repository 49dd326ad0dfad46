//! [`RedisAckChecks`]: ack-timeout checks in Redis, taken by whichever node
//! polls first once they are due.
//!
//! Three keys under one hash tag (one slot of a Redis Cluster, so that one
//! script can touch them all): `tether:{#ack}:due` (sorted set: check id by
//! due time, unix ms), `tether:{#ack}:claimed` (sorted set: check id by the
//! end of its claim) and `tether:{#ack}:jobs` (hash: id → the check, JSON).
//! Taking moves due ids to `claimed` for [`CLAIM`]; settling deletes them.
//! A claim that ran out (its node died between taking and settling) is
//! moved back to `due` by the next take, on any node.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Value;
use tracing::warn;

use super::{Conn, timed};
use crate::cluster::ack::{AckCheck, AckChecks, TakenCheck};
use crate::cluster::{BoxFuture, BrokerError};

const DUE: &str = "tether:{#ack}:due";
const CLAIMED: &str = "tether:{#ack}:claimed";
const JOBS: &str = "tether:{#ack}:jobs";

/// How long a taken check stays with the node that took it.
pub const CLAIM: Duration = Duration::from_secs(30);

/// Most checks waiting at once, cluster-wide; past that, a message is
/// pushed at once instead of waiting (a push too many rather than one too
/// few).
pub const MAX_CHECKS: u64 = 100_000;

/// KEYS: due, claimed, jobs. ARGV: id, check JSON, due ms, max.
const SCHEDULE: &str = r"
if redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
";

/// KEYS: due, claimed, jobs. ARGV: now ms, max, claim end ms.
/// Returns a flat list: id, check JSON, id, check JSON, …
const TAKE: &str = r"
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], ARGV[1], id)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  local job = redis.call('HGET', KEYS[3], id)
  if job then
    redis.call('ZADD', KEYS[2], ARGV[3], id)
    table.insert(out, id)
    table.insert(out, job)
  end
end
return out
";

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Ack-timeout checks in Redis.
pub struct RedisAckChecks {
    conn: Conn,
    node: String,
    next: AtomicU64,
    schedule: redis::Script,
    take: redis::Script,
}

impl std::fmt::Debug for RedisAckChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAckChecks")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl RedisAckChecks {
    /// The checks of node `node` (its name makes the ids it creates unique).
    pub fn new(conn: Conn, node: impl Into<String>) -> Self {
        Self {
            conn,
            node: node.into(),
            // Unique across restarts of a node with the same name.
            next: AtomicU64::new(unix_millis() << 20),
            schedule: redis::Script::new(SCHEDULE),
            take: redis::Script::new(TAKE),
        }
    }
}

impl AckChecks for RedisAckChecks {
    fn schedule(
        &self,
        check: AckCheck,
        after: Duration,
    ) -> BoxFuture<'_, Result<bool, BrokerError>> {
        Box::pin(async move {
            let json = serde_json::to_string(&check)
                .map_err(|e| BrokerError::Internal(format!("ack check: {e}")))?;
            let id = format!(
                "{}/{}",
                self.node,
                self.next.fetch_add(1, Ordering::Relaxed)
            );
            let due =
                unix_millis().saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX));
            let mut conn = self.conn.clone();
            let mut inv = self.schedule.prepare_invoke();
            inv.key(DUE)
                .key(CLAIMED)
                .key(JOBS)
                .arg(id)
                .arg(json)
                .arg(due)
                .arg(MAX_CHECKS);
            let kept: i64 = timed(inv.invoke_async(&mut conn)).await?;
            Ok(kept == 1)
        })
    }

    fn take_due(&self, max: usize) -> BoxFuture<'_, Result<Vec<TakenCheck>, BrokerError>> {
        Box::pin(async move {
            let now = unix_millis();
            let claim_end = now.saturating_add(u64::try_from(CLAIM.as_millis()).unwrap_or(0));
            let mut conn = self.conn.clone();
            let mut inv = self.take.prepare_invoke();
            inv.key(DUE)
                .key(CLAIMED)
                .key(JOBS)
                .arg(now)
                .arg(max.max(1))
                .arg(claim_end);
            let flat: Vec<Value> = timed(inv.invoke_async(&mut conn)).await?;
            let mut out = Vec::with_capacity(flat.len() / 2);
            for pair in flat.chunks(2) {
                let [id, job] = pair else { continue };
                let (Ok(id), Ok(job)) = (
                    redis::from_redis_value::<String>(id.clone()),
                    redis::from_redis_value::<String>(job.clone()),
                ) else {
                    continue;
                };
                match serde_json::from_str::<AckCheck>(&job) {
                    Ok(check) => out.push(TakenCheck { id, check }),
                    Err(e) => {
                        // Not ours to decide (a newer node's format?): drop it.
                        warn!(id, error = %e, "unreadable ack check dropped");
                        let _ = self.settle(&id).await;
                    }
                }
            }
            Ok(out)
        })
    }

    fn settle<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut pipe = redis::pipe();
            pipe.cmd("ZREM").arg(CLAIMED).arg(id).ignore();
            pipe.cmd("HDEL").arg(JOBS).arg(id).ignore();
            let () = timed(pipe.query_async(&mut conn)).await?;
            Ok(())
        })
    }
}
