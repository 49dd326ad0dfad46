//! [`RedisBroker`]: channel positions, history and idempotency keys in
//! Redis, the same for every node.
//!
//! **One round trip per publication**: one Lua script ([`PUBLISH_SCRIPT`],
//! sent as `EVALSHA`) checks the idempotency key, creates the channel's
//! epoch if it has none (and drops any history of an older epoch), takes the
//! next offset (`HINCRBY`), appends to the capped history stream (`XADD
//! MAXLEN ~ <history size>` with the offset as entry id), refreshes the keys'
//! expiry, publishes the encoded publication with its epoch and offset on
//! the channel's (sharded) pub/sub channel, and answers the position.
//! Concurrent publications of one node go to Redis in pipelines
//! ([`super::batch`]): Redis spends as much CPU per unpipelined call as on
//! the script itself.
//!
//! **Trimming is approximate, the window is not**: `MAXLEN ~` lets Redis
//! drop whole stream nodes (100 entries by default) instead of one entry per
//! publication, which costs a third of the script's CPU when exact
//! (`scripts/bench-cluster`, BENCHMARKS.md). The stream therefore keeps
//! between `history_size` and about `history_size + 100` entries; reads
//! ([`RedisBroker::history`]) only answer from the last `history_size`
//! offsets, so clients see exactly what a single node keeps. The extra
//! entries only help a node fill a gap in its own pub/sub stream.
//!
//! Deliveries come back through [`super::pubsub`]: this node subscribes to
//! a channel while its hub watches it, checks the offsets it receives, and
//! fills gaps from the history stream.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redis::Value;
use tether_protocol::{ChannelName, Epoch, Offset};

use super::batch::{Call, ScriptBatcher};
use super::pubsub::{Subscriber, SubscriberConfig};
use super::{Conn, Redis, keys, timed};
use crate::cluster::{
    BoxFuture, Broker, BrokerError, HistoryEntry, HistoryPage, HistoryRead, Position, Publish,
    Published,
};
use crate::metrics::Metrics;

/// The publish script (see the module doc). KEYS: position, history,
/// pub/sub channel, [idempotency key]. ARGV: data, ts, history size,
/// history ttl (ms), position ttl (ms), publish command, a new epoch,
/// [`EXPIRY_SLACK_MS`], retain (`1`; `0` while Redis is over its memory
/// budget, see [`super::budget`]: no history, the channel's dropped, no
/// idempotency key stored).
///
/// Expiries are refreshed lazily: at most once per slack per channel (the
/// position's field `x` says when next), each time to the TTL plus twice
/// the slack — so a key never expires sooner than its TTL after a
/// publication, even between nodes whose clocks differ by up to the slack,
/// and a busy channel costs two `PEXPIRE`s per slack instead of two per
/// publication (a fifth of the script's Redis commands).
/// Answers `{1, "<epoch> <offset>"}`, or `{0, "<epoch> <offset>"}` for a
/// repeated idempotency key (nothing published).
pub const PUBLISH_SCRIPT: &str = r"
if KEYS[4] then
  local seen = redis.call('GET', KEYS[4])
  if seen then return {0, seen} end
end
local pos = redis.call('HMGET', KEYS[1], 'epoch', 'x')
local epoch = pos[1]
if not epoch then
  epoch = ARGV[7]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local retain = ARGV[9] == '1'
if retain then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], offset .. '-0', 'd', ARGV[1], 't', ARGV[2])
else
  redis.call('DEL', KEYS[2])
end
local now = tonumber(ARGV[2])
if not pos[2] or now >= tonumber(pos[2]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[4] + 2 * ARGV[8])
  redis.call('PEXPIRE', KEYS[1], ARGV[5] + 2 * ARGV[8])
  redis.call('HSET', KEYS[1], 'x', now + ARGV[8])
end
local answer = epoch .. ' ' .. offset
redis.call(ARGV[6], KEYS[3], answer .. ' ' .. ARGV[2] .. ' ' .. ARGV[1])
if KEYS[4] and retain then redis.call('SET', KEYS[4], answer, 'PX', ARGV[4]) end
return {1, answer}
";

/// How often, at most, a publication refreshes its channel's key expiries
/// (see [`PUBLISH_SCRIPT`]); also the clock skew between nodes it
/// tolerates.
pub const EXPIRY_SLACK_MS: u64 = 30_000;

/// Creates a channel's epoch if it has none; refreshes the position's
/// expiry; answers `{epoch, offset}`. KEYS: position, history. ARGV: a new
/// epoch, position ttl (ms).
pub const ENSURE_SCRIPT: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {epoch, redis.call('HGET', KEYS[1], 'offset')}
";

/// Limits of the Redis broker.
#[derive(Debug, Clone)]
pub struct RedisBrokerConfig {
    pub history_size: usize,
    pub history_ttl_ms: u64,
    /// How long a channel's position outlives its last publish (or the
    /// last check of a node watching it): its epoch and offset survive
    /// quiet periods longer than the history.
    pub position_ttl_ms: u64,
}

impl RedisBrokerConfig {
    pub fn from_config(c: &crate::config::Config) -> Self {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            history_size: c.history_size,
            history_ttl_ms: ms(c.history_ttl),
            position_ttl_ms: ms(c.history_ttl
                + c.resume_window
                + std::time::Duration::from_secs(60)),
        }
    }
}

/// Parses `"<epoch> <offset>"`.
fn position_of(s: &str) -> Result<Position, BrokerError> {
    let (epoch, offset) = s
        .split_once(' ')
        .ok_or_else(|| BrokerError::Internal(format!("bad position {s:?} from Redis")))?;
    let offset = offset
        .parse()
        .map_err(|_| BrokerError::Internal(format!("bad offset {offset:?} from Redis")))?;
    Ok(Position {
        epoch: Epoch::new(epoch),
        offset: Offset(offset),
    })
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A fresh epoch name: 16 hex digits.
pub fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// One history stream entry (`XRANGE` reply element) as offset, ts, data.
pub fn parse_entry(v: &Value) -> Option<(u64, u64, String)> {
    let Value::Array(parts) = v else {
        return None;
    };
    let [id, fields] = parts.as_slice() else {
        return None;
    };
    let id: String = redis::from_redis_value(id.clone()).ok()?;
    let offset = id.split_once('-')?.0.parse().ok()?;
    let fields: Vec<(String, String)> = match fields {
        Value::Array(_) => redis::from_redis_value(fields.clone()).ok()?,
        Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    redis::from_redis_value(k.clone()).ok()?,
                    redis::from_redis_value(v.clone()).ok()?,
                ))
            })
            .collect(),
        _ => return None,
    };
    let mut data = None;
    let mut ts = 0;
    for (k, v) in fields {
        match k.as_str() {
            "d" => data = Some(v),
            "t" => ts = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    Some((offset, ts, data?))
}

/// Reads the position of `channel` and its history after `after`, at most
/// `limit` entries, in one round trip. `None` position: unknown channel.
pub async fn read_history(
    conn: &mut Conn,
    channel: &ChannelName,
    after: Option<Offset>,
    limit: usize,
) -> Result<(Option<Position>, Vec<(u64, u64, String)>), BrokerError> {
    let mut pipe = redis::pipe();
    pipe.cmd("HMGET")
        .arg(keys::position(channel))
        .arg("epoch")
        .arg("offset");
    if let Some(after) = after {
        pipe.cmd("XRANGE")
            .arg(keys::history(channel))
            .arg(format!("{}-0", after.get().saturating_add(1)))
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1));
    }
    let mut replies: Vec<Value> = timed(pipe.query_async(conn)).await?;
    let entries = match (after, replies.pop()) {
        (Some(_), Some(Value::Array(items))) => items.iter().filter_map(parse_entry).collect(),
        (Some(_), _) => Vec::new(),
        (None, Some(last)) => {
            replies.push(last);
            Vec::new()
        }
        (None, None) => Vec::new(),
    };
    let position = match replies.pop() {
        Some(v) => {
            let (epoch, offset): (Option<String>, Option<u64>) =
                redis::from_redis_value(v).map_err(|e| BrokerError::Internal(e.to_string()))?;
            epoch.map(|epoch| Position {
                epoch: Epoch::new(epoch),
                offset: Offset(offset.unwrap_or(0)),
            })
        }
        None => None,
    };
    Ok((position, entries))
}

/// The broker of a node in cluster mode.
pub struct RedisBroker {
    conn: Conn,
    cluster: bool,
    config: RedisBrokerConfig,
    /// `SHA1` of [`PUBLISH_SCRIPT`], for `EVALSHA`.
    publish_sha: String,
    publisher: ScriptBatcher,
    subscriber: Subscriber,
    budget: Arc<super::budget::RedisBudget>,
    metrics: Metrics,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("cluster", &self.cluster)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// The broker over `redis`; its subscriber task delivers to `sink`.
    pub fn new(
        redis: &Redis,
        config: RedisBrokerConfig,
        sub_config: SubscriberConfig,
        metrics: Metrics,
        sink: std::sync::Weak<dyn crate::cluster::Deliver>,
        control: std::sync::Weak<dyn crate::cluster::ControlSink>,
        budget: Arc<super::budget::RedisBudget>,
    ) -> RedisBroker {
        let subscriber = Subscriber::start(
            redis,
            sub_config,
            config.clone(),
            metrics.clone(),
            sink,
            control,
        );
        RedisBroker {
            conn: redis.conn.clone(),
            cluster: redis.is_cluster(),
            config,
            publish_sha: redis::Script::new(PUBLISH_SCRIPT).get_hash().to_owned(),
            publisher: ScriptBatcher::start(redis.conn.clone(), redis.is_cluster(), PUBLISH_SCRIPT),
            subscriber,
            budget,
            metrics,
        }
    }

    /// Whether Redis answers and this node's pub/sub is known to deliver.
    pub fn healthy(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.subscriber.healthy()
    }

    /// The script call that makes publication `p`.
    fn publish_call(&self, p: &Publish<'_>) -> Call {
        let ts = unix_millis();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.publish_sha)
            .arg(if p.idempotency_key.is_some() { 4 } else { 3 })
            .arg(keys::position(p.channel))
            .arg(keys::history(p.channel))
            .arg(keys::messages(p.channel));
        if let Some(k) = p.idempotency_key {
            cmd.arg(keys::idempotency(p.channel, k));
        }
        cmd.arg(p.raw.get())
            .arg(ts)
            .arg(self.config.history_size)
            .arg(self.config.history_ttl_ms)
            .arg(self.config.position_ttl_ms)
            .arg(if self.cluster { "SPUBLISH" } else { "PUBLISH" })
            .arg(new_epoch())
            .arg(EXPIRY_SLACK_MS);
        let retain = self.budget.retain();
        if !retain {
            self.metrics.history_not_retained.inc();
        }
        cmd.arg(if retain { "1" } else { "0" });
        (p.channel.clone(), cmd)
    }
}

/// The publish script's answer: `{fresh, "<epoch> <offset>"}`.
fn published(reply: Result<Value, BrokerError>) -> Result<Published, BrokerError> {
    let (fresh, answer): (i64, String) = redis::from_redis_value(reply?)
        .map_err(|e| BrokerError::Internal(format!("publish script answered: {e}")))?;
    Ok(Published {
        position: position_of(&answer)?,
        fresh: fresh == 1,
    })
}

impl Broker for RedisBroker {
    fn publish<'a>(&'a self, p: Publish<'a>) -> BoxFuture<'a, Result<Published, BrokerError>> {
        let call = self.publish_call(&p);
        Box::pin(async move {
            let answer = self.publisher.call(vec![call]).await.pop();
            published(answer.unwrap_or_else(|| Err(BrokerError::Internal("no reply".into()))))
        })
    }

    fn publish_many<'a>(
        &'a self,
        publishes: Vec<Publish<'a>>,
    ) -> BoxFuture<'a, Vec<Result<Published, BrokerError>>> {
        let calls = publishes.iter().map(|p| self.publish_call(p)).collect();
        Box::pin(async move {
            let answers = self.publisher.call(calls).await;
            answers.into_iter().map(published).collect()
        })
    }

    fn history<'a>(
        &'a self,
        channel: &'a ChannelName,
        read: HistoryRead,
    ) -> BoxFuture<'a, Result<HistoryPage, BrokerError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let (position, mut entries) =
                read_history(&mut conn, channel, read.since, read.limit).await?;
            let position = position.unwrap_or(Position {
                epoch: Epoch::default(),
                offset: Offset::ZERO,
            });
            // The window a single node would keep: the last `history_size`
            // offsets (the stream may hold a few more, see the module doc).
            let window_start = position
                .offset
                .get()
                .saturating_sub(u64::try_from(self.config.history_size).unwrap_or(u64::MAX));
            if entries.first().is_some_and(|(o, _, _)| *o <= window_start) {
                // `since` is older than the window: read again from its
                // start, so the page is as full as on a single node. Rare:
                // only a client that lost messages anyway lands here.
                entries = read_history(&mut conn, channel, Some(Offset(window_start)), read.limit)
                    .await?
                    .1;
            }
            entries.retain(|(o, _, _)| *o > window_start);
            let Some(since) = read.since else {
                return Ok(HistoryPage {
                    position,
                    recovered: false,
                    messages: Vec::new(),
                });
            };
            // Entries older than the history TTL are gone, as on one node.
            let oldest = unix_millis().saturating_sub(self.config.history_ttl_ms);
            let messages: Vec<HistoryEntry> = entries
                .into_iter()
                .filter(|(offset, ts, _)| *ts >= oldest && *offset <= position.offset.get())
                .filter_map(|(offset, ts, data)| {
                    Some(HistoryEntry {
                        offset: Offset(offset),
                        ts,
                        data: serde_json::value::RawValue::from_string(data).ok()?,
                    })
                })
                .collect();
            let recovered = if since > position.offset {
                false
            } else if since == position.offset {
                true
            } else {
                messages.first().is_some_and(|m| m.offset == since.next())
            };
            Ok(HistoryPage {
                position,
                recovered,
                messages,
            })
        })
    }

    fn watch<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.subscriber.watch(channel))
    }

    fn unwatch(&self, channel: &ChannelName) {
        self.subscriber.unwatch(channel);
    }

    fn ready(&self) -> bool {
        self.subscriber
            .healthy()
            .load(std::sync::atomic::Ordering::Acquire)
    }
}
