//! Push state shared by a cluster: the device registry
//! ([`RedisRegistry`]) and the push job queue ([`RedisQueue`]) that every
//! node's gateway reads.
//!
//! Devices: `tether:{#dev:<id>}:rec` (the record, JSON) and
//! `tether:{#user:<user>}:devs` (the user's device ids). On a Redis Cluster
//! the two live on different slots and are written one after the other: a
//! crash in between leaves an index entry without a record (skipped on
//! read) or a record missing from its user's index until the next `PUT`.
//!
//! Jobs, per platform under the tag `{#push:<platform>}`: a Stream `:q`
//! read through the consumer group `gateways` (each node its own consumer),
//! a sorted set `:later` of jobs waiting for a retry (moved back into the
//! stream when due, by one script), `:failed` (the last 1,000 failures) and
//! counters. A job is acked and deleted only once the provider has answered
//! (at-least-once). Entries a node claimed and never settled — it died —
//! are taken over by the others once idle for [`RECLAIM_IDLE`].

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use redis::Value;
use tether_push_gateway::types::DeviceToken;
use tether_push_gateway::{
    Claimed, Device, DeviceRegistry, NewPushJob, OutboxEntry, Platform, PushQueue, QueueError,
    QueueFuture, RegistryError, RegistryFuture, Settlement, unix_now,
};
use tracing::warn;

use super::{Conn, timed};

/// A claimed entry idle this long (twice the gateway's send timeout) is
/// taken over by another node: its claimant is gone.
pub const RECLAIM_IDLE: Duration = Duration::from_secs(120);
const GROUP: &str = "gateways";
/// Failed jobs kept for inspection.
const FAILED_KEEP: i64 = 1000;

fn device_key(id: &str) -> String {
    format!("tether:{{#dev:{id}}}:rec")
}

fn user_key(user: &str) -> String {
    format!("tether:{{#user:{user}}}:devs")
}

fn queue_key(p: Platform, what: &str) -> String {
    format!("tether:{{#push:{}}}:{what}", p.as_str())
}

fn registry_error(e: crate::cluster::BrokerError) -> RegistryError {
    RegistryError::Unavailable(e.to_string())
}

fn queue_error(e: crate::cluster::BrokerError) -> QueueError {
    match e {
        crate::cluster::BrokerError::Unavailable(m) => QueueError::Unavailable(m),
        crate::cluster::BrokerError::Internal(m) => QueueError::Internal(m),
    }
}

/// Devices in Redis.
pub struct RedisRegistry {
    conn: Conn,
}

impl std::fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisRegistry")
    }
}

impl RedisRegistry {
    pub fn new(conn: Conn) -> Self {
        Self { conn }
    }

    async fn get(&self, id: &str) -> Result<Option<Device>, RegistryError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> =
            timed(redis::cmd("GET").arg(device_key(id)).query_async(&mut conn))
                .await
                .map_err(registry_error)?;
        match raw {
            Some(r) => serde_json::from_str(&r)
                .map(Some)
                .map_err(|e| RegistryError::Unavailable(format!("unreadable device record: {e}"))),
            None => Ok(None),
        }
    }

    async fn remove(&self, device: &Device) -> Result<(), RegistryError> {
        let mut conn = self.conn.clone();
        let _: () = timed(
            redis::cmd("DEL")
                .arg(device_key(&device.device_id))
                .query_async(&mut conn),
        )
        .await
        .map_err(registry_error)?;
        let _: () = timed(
            redis::cmd("SREM")
                .arg(user_key(&device.user))
                .arg(&device.device_id)
                .query_async(&mut conn),
        )
        .await
        .map_err(registry_error)?;
        Ok(())
    }
}

impl DeviceRegistry for RedisRegistry {
    fn put_device(&self, mut device: Device) -> RegistryFuture<'_, Device> {
        Box::pin(async move {
            device.validate()?;
            device.updated_at = unix_now();
            let old = self.get(&device.device_id).await?;
            let json = serde_json::to_string(&device)
                .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
            let mut conn = self.conn.clone();
            let _: () = timed(
                redis::cmd("SET")
                    .arg(device_key(&device.device_id))
                    .arg(json)
                    .query_async(&mut conn),
            )
            .await
            .map_err(registry_error)?;
            let _: () = timed(
                redis::cmd("SADD")
                    .arg(user_key(&device.user))
                    .arg(&device.device_id)
                    .query_async(&mut conn),
            )
            .await
            .map_err(registry_error)?;
            if let Some(old) = old
                && old.user != device.user
            {
                let _: () = timed(
                    redis::cmd("SREM")
                        .arg(user_key(&old.user))
                        .arg(&old.device_id)
                        .query_async(&mut conn),
                )
                .await
                .map_err(registry_error)?;
            }
            Ok(device)
        })
    }

    fn delete_device<'a>(&'a self, device_id: &'a str) -> RegistryFuture<'a, bool> {
        Box::pin(async move {
            match self.get(device_id).await? {
                Some(d) => {
                    self.remove(&d).await?;
                    Ok(true)
                }
                None => Ok(false),
            }
        })
    }

    fn remove_dead<'a>(
        &'a self,
        device_id: &'a str,
        token: &'a DeviceToken,
    ) -> RegistryFuture<'a, bool> {
        Box::pin(async move {
            match self.get(device_id).await? {
                Some(d) if d.token == *token => {
                    self.remove(&d).await?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
    }

    fn get_device<'a>(&'a self, device_id: &'a str) -> RegistryFuture<'a, Option<Device>> {
        Box::pin(self.get(device_id))
    }

    fn devices_for_user<'a>(&'a self, user: &'a str) -> RegistryFuture<'a, Vec<Device>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut ids: Vec<String> = timed(
                redis::cmd("SMEMBERS")
                    .arg(user_key(user))
                    .query_async(&mut conn),
            )
            .await
            .map_err(registry_error)?;
            ids.sort();
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                // A record that vanished (or moved to another user) is not
                // this user's device.
                if let Some(d) = self.get(&id).await?
                    && d.user == user
                {
                    out.push(d);
                }
            }
            Ok(out)
        })
    }
}

/// Moves due retries of one platform back into its stream. KEYS: later,
/// stream. ARGV: now ms, max. Answers how many moved.
const RELEASE_DUE: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, entry in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'e', entry)
  redis.call('ZREM', KEYS[1], entry)
end
return #due
";

/// The push job queue in Redis, shared by every node's gateway.
pub struct RedisQueue {
    conn: Conn,
    consumer: String,
    release: redis::Script,
    /// Stream entry id of each job this node claimed, until settled.
    claimed: Mutex<HashMap<u64, (Platform, String)>>,
    /// Platforms whose group exists (created on first use).
    ready: Mutex<[bool; 3]>,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

/// Stream entries of an `XREADGROUP` / `XAUTOCLAIM` reply as (stream id,
/// field `e`).
fn entries_of(v: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Value::Array(items) = v else {
        return out;
    };
    for item in items {
        let Value::Array(parts) = item else { continue };
        let [id, fields] = parts.as_slice() else {
            continue;
        };
        let Ok(id) = redis::from_redis_value::<String>(id.clone()) else {
            continue;
        };
        let fields: Vec<(String, String)> = match fields {
            Value::Array(_) => redis::from_redis_value(fields.clone()).unwrap_or_default(),
            Value::Map(m) => m
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        redis::from_redis_value(k.clone()).ok()?,
                        redis::from_redis_value(v.clone()).ok()?,
                    ))
                })
                .collect(),
            _ => Vec::new(),
        };
        if let Some((_, e)) = fields.into_iter().find(|(k, _)| k == "e") {
            out.push((id, e));
        }
    }
    out
}

impl RedisQueue {
    /// The queue as node `consumer` reads it.
    pub fn new(conn: Conn, consumer: impl Into<String>) -> Self {
        Self {
            conn,
            consumer: consumer.into(),
            release: redis::Script::new(RELEASE_DUE),
            claimed: Mutex::new(HashMap::new()),
            ready: Mutex::new([false; 3]),
        }
    }

    async fn ensure_group(&self, p: Platform) -> Result<(), QueueError> {
        if self.ready.lock()[p.index()] {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let created: Result<String, _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(queue_key(p, "q"))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(_) => {}
            Err(e) if e.to_string().contains("BUSYGROUP") => {}
            Err(e) => return Err(queue_error(super::broker_error(&e))),
        }
        self.ready.lock()[p.index()] = true;
        Ok(())
    }

    /// Parses entries and remembers their stream ids.
    fn take(&self, p: Platform, entries: Vec<(String, String)>, out: &mut Vec<OutboxEntry>) {
        let mut claimed = self.claimed.lock();
        for (sid, e) in entries {
            match serde_json::from_str::<OutboxEntry>(&e) {
                Ok(entry) => {
                    claimed.insert(entry.job.id, (p, sid));
                    out.push(entry);
                }
                Err(err) => warn!(entry = %sid, error = %err, "unreadable push job skipped"),
            }
        }
    }
}

impl PushQueue for RedisQueue {
    fn enqueue(&self, jobs: Vec<NewPushJob>, now_ms: u64) -> QueueFuture<'_, Vec<u64>> {
        Box::pin(async move {
            if jobs.is_empty() {
                return Ok(Vec::new());
            }
            let mut conn = self.conn.clone();
            let n = jobs.len() as u64;
            let last: u64 = timed(
                redis::cmd("INCRBY")
                    .arg("tether:{#push}:next_id")
                    .arg(n)
                    .query_async(&mut conn),
            )
            .await
            .map_err(queue_error)?;
            let first = last + 1 - n;
            let mut ids = Vec::with_capacity(jobs.len());
            let mut by_platform: HashMap<Platform, Vec<String>> = HashMap::new();
            for (i, job) in jobs.into_iter().enumerate() {
                let id = first + i as u64;
                let platform = job.platform;
                let entry = OutboxEntry {
                    job: job.with_id(id),
                    attempts: 0,
                    next_attempt_ms: now_ms,
                    last_error: None,
                };
                let json = serde_json::to_string(&entry)
                    .map_err(|e| QueueError::Internal(e.to_string()))?;
                by_platform.entry(platform).or_default().push(json);
                ids.push(id);
            }
            for (p, entries) in by_platform {
                self.ensure_group(p).await?;
                let mut pipe = redis::pipe();
                for e in entries {
                    pipe.cmd("XADD")
                        .arg(queue_key(p, "q"))
                        .arg("*")
                        .arg("e")
                        .arg(e)
                        .ignore();
                }
                let _: () = timed(pipe.query_async(&mut conn))
                    .await
                    .map_err(queue_error)?;
            }
            Ok(ids)
        })
    }

    fn claim(&self, platform: Platform, now_ms: u64, limit: usize) -> QueueFuture<'_, Claimed> {
        Box::pin(async move {
            self.ensure_group(platform).await?;
            let mut conn = self.conn.clone();
            let stream = queue_key(platform, "q");
            let later = queue_key(platform, "later");
            let mut release = self.release.prepare_invoke();
            release
                .key(&later)
                .key(&stream)
                .arg(now_ms)
                .arg(limit.max(1));
            let _: i64 = timed(release.invoke_async(&mut conn))
                .await
                .map_err(queue_error)?;
            let mut jobs = Vec::new();
            // Entries whose claimant went quiet (a dead node) first.
            let reclaimed: Value = timed(
                redis::cmd("XAUTOCLAIM")
                    .arg(&stream)
                    .arg(GROUP)
                    .arg(&self.consumer)
                    .arg(RECLAIM_IDLE.as_millis() as u64)
                    .arg("0")
                    .arg("COUNT")
                    .arg(limit.max(1))
                    .query_async(&mut conn),
            )
            .await
            .map_err(queue_error)?;
            if let Value::Array(parts) = &reclaimed
                && let Some(list) = parts.get(1)
            {
                self.take(platform, entries_of(list), &mut jobs);
            }
            let room = limit.saturating_sub(jobs.len());
            if room > 0 {
                let read: Value = timed(
                    redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg(GROUP)
                        .arg(&self.consumer)
                        .arg("COUNT")
                        .arg(room)
                        .arg("STREAMS")
                        .arg(&stream)
                        .arg(">")
                        .query_async(&mut conn),
                )
                .await
                .map_err(queue_error)?;
                // [[stream, [entries]]] (RESP2) or {stream: [entries]} (RESP3).
                let lists: Vec<Value> = match read {
                    Value::Array(streams) => streams
                        .into_iter()
                        .filter_map(|s| match s {
                            Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
                            _ => None,
                        })
                        .collect(),
                    Value::Map(m) => m.into_iter().map(|(_, v)| v).collect(),
                    _ => Vec::new(),
                };
                for list in &lists {
                    self.take(platform, entries_of(list), &mut jobs);
                }
            }
            let next: Vec<(String, u64)> = timed(
                redis::cmd("ZRANGE")
                    .arg(&later)
                    .arg(0)
                    .arg(0)
                    .arg("WITHSCORES")
                    .query_async(&mut conn),
            )
            .await
            .map_err(queue_error)?;
            Ok(Claimed {
                jobs,
                next_at: next.first().map(|(_, at)| *at),
            })
        })
    }

    fn settle(&self, settlements: Vec<Settlement>) -> QueueFuture<'_, usize> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut pipe = redis::pipe();
            let mut touched = 0;
            for s in settlements {
                let id = match &s {
                    Settlement::Ack { id }
                    | Settlement::RetryAt { id, .. }
                    | Settlement::Fail { id, .. } => *id,
                };
                let Some((p, sid)) = self.claimed.lock().remove(&id) else {
                    continue;
                };
                let stream = queue_key(p, "q");
                // The entry, to write it elsewhere for a retry or a failure.
                let entry = match &s {
                    Settlement::Ack { .. } => None,
                    _ => {
                        let read: Value = timed(
                            redis::cmd("XRANGE")
                                .arg(&stream)
                                .arg(&sid)
                                .arg(&sid)
                                .query_async(&mut conn),
                        )
                        .await
                        .map_err(queue_error)?;
                        entries_of(&read)
                            .into_iter()
                            .next()
                            .and_then(|(_, e)| serde_json::from_str::<OutboxEntry>(&e).ok())
                    }
                };
                match (s, entry) {
                    (
                        Settlement::RetryAt {
                            at_ms,
                            attempts,
                            reason,
                            ..
                        },
                        Some(mut e),
                    ) => {
                        e.attempts = attempts;
                        e.next_attempt_ms = at_ms;
                        e.last_error = Some(reason);
                        let json = serde_json::to_string(&e)
                            .map_err(|e| QueueError::Internal(e.to_string()))?;
                        pipe.cmd("ZADD")
                            .arg(queue_key(p, "later"))
                            .arg(at_ms)
                            .arg(json)
                            .ignore();
                    }
                    (
                        Settlement::Fail {
                            attempts, reason, ..
                        },
                        Some(e),
                    ) => {
                        let failed = serde_json::json!({
                            "job": e.job, "attempts": attempts, "reason": reason, "failed_at": unix_now(),
                        });
                        pipe.cmd("LPUSH")
                            .arg(queue_key(p, "failed"))
                            .arg(failed.to_string())
                            .ignore();
                        pipe.cmd("LTRIM")
                            .arg(queue_key(p, "failed"))
                            .arg(0)
                            .arg(FAILED_KEEP - 1)
                            .ignore();
                        pipe.cmd("INCR").arg("tether:{#push}:failed_total").ignore();
                    }
                    _ => {}
                }
                pipe.cmd("XACK").arg(&stream).arg(GROUP).arg(&sid).ignore();
                pipe.cmd("XDEL").arg(&stream).arg(&sid).ignore();
                touched += 1;
            }
            if touched > 0 {
                let _: () = timed(pipe.query_async(&mut conn))
                    .await
                    .map_err(queue_error)?;
            }
            Ok(touched)
        })
    }

    fn depth(&self) -> QueueFuture<'_, u64> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut total = 0u64;
            for p in Platform::ALL {
                let mut pipe = redis::pipe();
                pipe.cmd("XLEN").arg(queue_key(p, "q"));
                pipe.cmd("ZCARD").arg(queue_key(p, "later"));
                let (q, later): (u64, u64) = timed(pipe.query_async(&mut conn))
                    .await
                    .map_err(queue_error)?;
                total += q + later;
            }
            Ok(total)
        })
    }
}
