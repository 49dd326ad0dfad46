//! The Redis memory budget: what cluster mode keeps in Redis beyond the
//! live stream (channel history, idempotency keys, the records of ended
//! sessions) stops being kept while Redis is near full, instead of Redis
//! refusing every write (`maxmemory` with `noeviction`: publications fail
//! with 503) or evicting keys Tether relies on (an eviction policy).
//!
//! Every second the node reads `INFO memory` of Redis (of every primary of
//! a Redis Cluster) and compares `used_memory` with the budget: the
//! `--redis-max-memory` given, else 90 % of that Redis's own `maxmemory`,
//! else none (Redis without `maxmemory`: only the TTLs and per-channel
//! limits bound what is kept; the node warns at start). Over budget on any
//! shard, until the next reading under it:
//!
//! - publications are delivered live but not kept in history, and their
//!   channel's history is dropped, so that what is kept never has a hole a
//!   recovery could read past (`tether_history_not_retained_total`; a
//!   recovery from before answers `recovered: false`);
//! - idempotency keys are not stored (a retried request may publish twice);
//! - an ended session's record is not kept: a resume gets a fresh session
//!   (`tether_resume_records_evicted_total`), as after the resume window.
//!
//! Live sessions' snapshots and device presence are kept: they are what
//! lets a client move to another node at all, and are bounded by the
//! sessions connected.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::Value;
use tracing::{info, warn};

use super::{Conn, timed};
use crate::metrics::Metrics;

/// How often Redis's memory is read.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// The share of Redis's `maxmemory` used as the budget when none is given.
const SHARE_OF_MAXMEMORY: f64 = 0.9;

/// One shard's memory, from its `INFO memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardMemory {
    pub used: u64,
    /// 0: no `maxmemory`.
    pub maxmemory: u64,
}

/// Reads `used_memory` and `maxmemory` from an `INFO` text.
pub fn parse_info(text: &str) -> Option<ShardMemory> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            (k == name).then(|| v.trim().parse::<u64>().ok()).flatten()
        })
    };
    Some(ShardMemory {
        used: field("used_memory")?,
        maxmemory: field("maxmemory").unwrap_or(0),
    })
}

/// The `INFO` texts of a reply: one for a single Redis, one per primary
/// (a map of address to text) for a Redis Cluster.
fn info_texts(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::BulkString(b) => out.push(String::from_utf8_lossy(b).into_owned()),
        Value::VerbatimString { text, .. } => out.push(text.clone()),
        Value::SimpleString(s) => out.push(s.clone()),
        Value::Map(pairs) => pairs.iter().for_each(|(_, v)| info_texts(v, out)),
        Value::Array(items) => items.iter().for_each(|v| info_texts(v, out)),
        _ => {}
    }
}

/// Whether any shard is over its budget: `limit` if given, else its own
/// `maxmemory` × 0.9; a shard without either never is.
pub fn over_budget(shards: &[ShardMemory], limit: Option<u64>) -> bool {
    shards.iter().any(|s| {
        let budget = limit.or_else(|| {
            (s.maxmemory > 0).then_some((s.maxmemory as f64 * SHARE_OF_MAXMEMORY) as u64)
        });
        budget.is_some_and(|b| s.used > b)
    })
}

/// Whether this node keeps history, idempotency keys and ended sessions'
/// records in Redis now.
#[derive(Debug)]
pub struct RedisBudget {
    over: AtomicBool,
    limit: Option<u64>,
    metrics: Metrics,
}

impl RedisBudget {
    /// Reads Redis once (so that the node starts knowing) and keeps reading
    /// every [`CHECK_EVERY`] while the budget is in use.
    pub async fn start(conn: Conn, limit: Option<u64>, metrics: Metrics) -> Arc<RedisBudget> {
        let budget = Arc::new(RedisBudget {
            over: AtomicBool::new(false),
            limit,
            metrics,
        });
        let mut conn = conn;
        match read(&mut conn).await {
            Some(shards) => {
                let capped = limit.is_some() || shards.iter().all(|s| s.maxmemory > 0);
                if !capped {
                    warn!(
                        "Redis has no maxmemory and --redis-max-memory is not set: history, \
                         idempotency keys and resume records in Redis are bounded by their TTLs \
                         and per-channel limits only"
                    );
                }
                budget.update(&shards);
            }
            None => warn!("could not read Redis's memory (INFO memory); retrying every second"),
        }
        let weak = Arc::downgrade(&budget);
        tokio::spawn(watch(conn, weak));
        budget
    }

    /// Whether to keep what is beyond the live stream.
    pub fn retain(&self) -> bool {
        !self.over.load(Ordering::Relaxed)
    }

    fn update(&self, shards: &[ShardMemory]) {
        let over = over_budget(shards, self.limit);
        let used = shards.iter().map(|s| s.used).max().unwrap_or(0);
        self.metrics
            .cluster_redis_used_memory
            .set(i64::try_from(used).unwrap_or(i64::MAX));
        self.metrics.cluster_redis_over_budget.set(i64::from(over));
        let was = self.over.swap(over, Ordering::Relaxed);
        if over && !was {
            warn!(
                used_memory = used,
                "Redis is over its memory budget: history, idempotency keys and ended sessions' \
                 records are not kept until it is under again"
            );
        } else if was && !over {
            info!(used_memory = used, "Redis is under its memory budget again");
        }
    }
}

/// Every shard's memory, or `None` when Redis did not answer.
async fn read(conn: &mut Conn) -> Option<Vec<ShardMemory>> {
    let reply: Value = timed(redis::cmd("INFO").arg("memory").query_async(conn))
        .await
        .ok()?;
    let mut texts = Vec::new();
    info_texts(&reply, &mut texts);
    let shards: Vec<ShardMemory> = texts.iter().filter_map(|t| parse_info(t)).collect();
    (!shards.is_empty()).then_some(shards)
}

async fn watch(mut conn: Conn, budget: Weak<RedisBudget>) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let shards = read(&mut conn).await;
        let Some(budget) = budget.upgrade() else {
            return;
        };
        // An unanswered reading keeps the last decision.
        if let Some(shards) = shards {
            budget.update(&shards);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_memory_is_read() {
        let text = "# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\n\
                    maxmemory:2000000\r\nmaxmemory_human:1.91M\r\n";
        assert_eq!(
            parse_info(text),
            Some(ShardMemory {
                used: 1_048_576,
                maxmemory: 2_000_000
            })
        );
        assert_eq!(parse_info("# Memory\r\n"), None);
    }

    #[test]
    fn the_budget_is_the_limit_else_nine_tenths_of_maxmemory() {
        let shard = |used, maxmemory| ShardMemory { used, maxmemory };
        // No maxmemory, no limit: never over.
        assert!(!over_budget(&[shard(u64::MAX, 0)], None));
        // 90 % of maxmemory.
        assert!(!over_budget(&[shard(900, 1000)], None));
        assert!(over_budget(&[shard(901, 1000)], None));
        // The limit given wins over maxmemory.
        assert!(over_budget(&[shard(600, 1000)], Some(500)));
        assert!(!over_budget(&[shard(950, 1000)], Some(990)));
        // Any shard over is over.
        assert!(over_budget(&[shard(10, 1000), shard(999, 1000)], None));
    }

    #[test]
    fn a_cluster_reply_gives_one_text_per_primary() {
        let reply = Value::Map(vec![
            (
                Value::SimpleString("127.0.0.1:7000".into()),
                Value::BulkString(b"used_memory:10\r\nmaxmemory:0\r\n".to_vec()),
            ),
            (
                Value::SimpleString("127.0.0.1:7001".into()),
                Value::VerbatimString {
                    format: redis::VerbatimFormat::Text,
                    text: "used_memory:20\r\nmaxmemory:100\r\n".into(),
                },
            ),
        ]);
        let mut texts = Vec::new();
        info_texts(&reply, &mut texts);
        let shards: Vec<_> = texts.iter().filter_map(|t| parse_info(t)).collect();
        assert_eq!(
            shards,
            vec![
                ShardMemory {
                    used: 10,
                    maxmemory: 0
                },
                ShardMemory {
                    used: 20,
                    maxmemory: 100
                }
            ]
        );
    }
}
