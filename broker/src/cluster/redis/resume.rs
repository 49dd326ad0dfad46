//! [`RedisResumeStore`]: resumable sessions that any node can claim, and
//! [`RedisBus`]: control messages to the node that holds a live session.
//!
//! One hash per session, `tether:s:{<session>}` (state `live`, `claimed`
//! or `detached`; the node and connection; the nonce of its newest token;
//! the last record), and its handoff list `tether:s:{<session>}:h`, both
//! under the session's hash tag. Every change is one script, so a claim is
//! atomic across nodes: of two claims with one token, one gets the record.
//!
//! A live session refreshes its snapshot (subscriptions, delivered and
//! acked offsets) on every heartbeat, with an expiry of the resume window
//! plus two heartbeats: if its node dies, the session stays claimable from
//! that snapshot for the resume window. A takeover of a session whose node
//! does not answer (nobody listens on its control channel, or no handoff
//! within the wait) claims the snapshot instead — the client should name
//! its offsets (`resume.channels`) to lose nothing.

use std::sync::Weak;
use std::time::{Duration, Instant};

use redis::Script;

use super::{Conn, keys, timed};
use crate::cluster::resume::LiveSession;
use crate::cluster::{
    BoxFuture, Claim, ControlMessage, ControlSink, NodeBus, Refusal, ResumeError, ResumeStore,
    SessionRecord, SubRecord,
};

fn session_key(session: &str) -> String {
    format!("tether:s:{{{session}}}")
}

fn handoff_key(session: &str) -> String {
    format!("tether:s:{{{session}}}:h")
}

/// KEYS: session. ARGV: node, conn, nonce, ttl ms.
const REGISTER: &str = r"
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'live', 'node', ARGV[1], 'conn', ARGV[2], 'nonce', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

/// KEYS: session. ARGV: conn, record, ttl ms, seq. Only the live
/// connection itself may refresh its snapshot, and only with a newer one.
const SNAPSHOT: &str = r"
local s = redis.call('HMGET', KEYS[1], 'state', 'conn', 'seq')
if s[1] ~= 'live' or s[2] ~= ARGV[1] then return 0 end
if s[3] and tonumber(s[3]) >= tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'seq', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// KEYS: session. ARGV: nonce. Answers {'ready', record} | {'live', node,
/// conn} | {'used'} | {'expired'}; a live one becomes 'claimed'.
const CLAIM: &str = r"
local s = redis.call('HMGET', KEYS[1], 'state', 'nonce', 'node', 'conn', 'record')
if not s[1] then return {'expired'} end
if s[2] ~= ARGV[1] then return {'used'} end
if s[1] == 'detached' then
  redis.call('DEL', KEYS[1])
  return {'ready', s[5] or ''}
end
if s[1] == 'live' then
  redis.call('HSET', KEYS[1], 'state', 'claimed')
  return {'live', s[3], s[4]}
end
return {'used'}
";

/// KEYS: session, handoff. ARGV: conn, record, window ms, keep (`0` while
/// Redis is over its memory budget). Answers 0 (not this connection's any
/// more), 1 (handed to a claim), 2 (detached), 3 (forgotten: not kept).
const DETACH: &str = r"
local s = redis.call('HMGET', KEYS[1], 'state', 'conn')
if not s[1] or s[2] ~= ARGV[1] then return 0 end
if s[1] == 'claimed' then
  redis.call('DEL', KEYS[1])
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], 30000)
  return 1
end
if ARGV[4] == '0' then
  redis.call('DEL', KEYS[1])
  return 3
end
redis.call('HSET', KEYS[1], 'state', 'detached', 'record', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 2
";

/// KEYS: session, handoff. ARGV: nonce. The handoff did not come: take the
/// record the list holds (it may have arrived just now), else the last
/// snapshot of a session still claimed with this nonce (its node is dead
/// or stuck). Answers {record} or {}.
const ABANDON: &str = r"
local handed = redis.call('LPOP', KEYS[2])
if handed then return {handed} end
local s = redis.call('HMGET', KEYS[1], 'state', 'nonce', 'record')
if s[1] == 'claimed' and s[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return {s[3] or ''}
end
return {}
";

/// The wire form of a [`SessionRecord`].
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    subs: Vec<StoredSub>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSub {
    c: tether_protocol::ChannelName,
    e: tether_protocol::Epoch,
    d: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    a: Option<u64>,
}

fn encode_record(r: &SessionRecord) -> String {
    let stored = Stored {
        subs: r
            .subs
            .iter()
            .map(|s| StoredSub {
                c: s.channel.clone(),
                e: s.epoch.clone(),
                d: s.delivered.get(),
                a: s.acked.map(|a| a.get()),
            })
            .collect(),
    };
    serde_json::to_string(&stored).unwrap_or_else(|_| "{\"subs\":[]}".into())
}

fn decode_record(s: &str) -> SessionRecord {
    let stored: Stored = serde_json::from_str(s).unwrap_or(Stored { subs: Vec::new() });
    SessionRecord {
        subs: stored
            .subs
            .into_iter()
            .map(|s| SubRecord {
                channel: s.c,
                epoch: s.e,
                delivered: tether_protocol::Offset(s.d),
                acked: s.a.map(tether_protocol::Offset),
            })
            .collect(),
    }
}

fn resume_error(e: crate::cluster::BrokerError) -> ResumeError {
    ResumeError(e.to_string())
}

/// Resumable sessions in Redis.
pub struct RedisResumeStore {
    conn: Conn,
    /// How long a live session's entry lives without a fresh snapshot.
    live_ttl_ms: u64,
    register: Script,
    snapshot: Script,
    claim: Script,
    detach: Script,
    abandon: Script,
    /// Whether ended sessions' records are kept now.
    budget: std::sync::Arc<super::budget::RedisBudget>,
    /// Records not kept (`tether_resume_records_evicted_total`).
    evicted: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for RedisResumeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisResumeStore")
            .field("live_ttl_ms", &self.live_ttl_ms)
            .finish_non_exhaustive()
    }
}

impl RedisResumeStore {
    /// `live_ttl`: the resume window plus two heartbeats (see the module).
    pub fn new(
        conn: Conn,
        live_ttl: Duration,
        budget: std::sync::Arc<super::budget::RedisBudget>,
        evicted: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Self {
            conn,
            live_ttl_ms: u64::try_from(live_ttl.as_millis()).unwrap_or(u64::MAX),
            register: Script::new(REGISTER),
            snapshot: Script::new(SNAPSHOT),
            claim: Script::new(CLAIM),
            detach: Script::new(DETACH),
            abandon: Script::new(ABANDON),
            budget,
            evicted,
        }
    }
}

impl ResumeStore for RedisResumeStore {
    fn register_live<'a>(
        &'a self,
        session: &'a str,
        live: LiveSession,
        nonce: u64,
    ) -> BoxFuture<'a, Result<(), ResumeError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut call = self.register.prepare_invoke();
            call.key(session_key(session))
                .arg(&live.node)
                .arg(live.conn_id)
                .arg(nonce)
                .arg(self.live_ttl_ms);
            let _: i64 = timed(call.invoke_async(&mut conn))
                .await
                .map_err(resume_error)?;
            Ok(())
        })
    }

    fn keeps_snapshots(&self) -> bool {
        true
    }

    fn snapshot<'a>(
        &'a self,
        session: &'a str,
        conn_id: u64,
        seq: u64,
        record: &'a SessionRecord,
    ) -> BoxFuture<'a, Result<(), ResumeError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut call = self.snapshot.prepare_invoke();
            call.key(session_key(session))
                .arg(conn_id)
                .arg(encode_record(record))
                .arg(self.live_ttl_ms)
                .arg(seq);
            let _: i64 = timed(call.invoke_async(&mut conn))
                .await
                .map_err(resume_error)?;
            Ok(())
        })
    }

    fn claim<'a>(
        &'a self,
        session: &'a str,
        nonce: u64,
    ) -> BoxFuture<'a, Result<Claim, ResumeError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut call = self.claim.prepare_invoke();
            call.key(session_key(session)).arg(nonce);
            let answer: Vec<String> = timed(call.invoke_async(&mut conn))
                .await
                .map_err(resume_error)?;
            Ok(match answer.as_slice() {
                [kind, record] if kind == "ready" => Claim::Ready(decode_record(record)),
                [kind, node, conn_id] if kind == "live" => Claim::Live(LiveSession {
                    node: node.clone(),
                    conn_id: conn_id.parse().unwrap_or(0),
                }),
                [kind] if kind == "used" => Claim::Refused(Refusal::Used),
                _ => Claim::Refused(Refusal::Expired),
            })
        })
    }

    fn await_handoff<'a>(
        &'a self,
        session: &'a str,
        nonce: u64,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, ResumeError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let deadline = Instant::now() + wait;
            // Polled (a blocking pop would hold up the shared connection);
            // a takeover is rare and usually answered within milliseconds.
            while Instant::now() < deadline {
                let handed: Result<Option<String>, _> = timed(
                    redis::cmd("LPOP")
                        .arg(handoff_key(session))
                        .query_async(&mut conn),
                )
                .await;
                match handed {
                    Ok(Some(record)) => return Ok(Some(decode_record(&record))),
                    Ok(None) => {}
                    // Not a reason to leave the claim behind (the token
                    // would read as used): poll on, and abandon below.
                    Err(e) => tracing::debug!(error = %e, "polling for a takeover's handoff"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut call = self.abandon.prepare_invoke();
            call.key(session_key(session))
                .key(handoff_key(session))
                .arg(nonce);
            let answer: Vec<String> = timed(call.invoke_async(&mut conn))
                .await
                .map_err(resume_error)?;
            Ok(answer.first().map(|r| decode_record(r)))
        })
    }

    fn detach<'a>(
        &'a self,
        session: &'a str,
        conn_id: u64,
        record: SessionRecord,
        window: Duration,
    ) -> BoxFuture<'a, Result<(), ResumeError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let mut call = self.detach.prepare_invoke();
            call.key(session_key(session))
                .key(handoff_key(session))
                .arg(conn_id)
                .arg(encode_record(&record))
                .arg(u64::try_from(window.as_millis()).unwrap_or(u64::MAX))
                .arg(if self.budget.retain() { "1" } else { "0" });
            let outcome: i64 = timed(call.invoke_async(&mut conn))
                .await
                .map_err(resume_error)?;
            if outcome == 3 {
                self.evicted.inc();
            }
            Ok(())
        })
    }
}

/// Control messages through Redis: each node listens on its own channel
/// (the subscriber task hands what arrives to the session table).
pub struct RedisBus {
    conn: Conn,
    cluster: bool,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl RedisBus {
    pub fn new(conn: Conn, cluster: bool) -> Self {
        Self { conn, cluster }
    }
}

/// The wire form of a control message.
pub fn encode_control(m: &ControlMessage) -> String {
    match m {
        ControlMessage::TakeOver { conn_id } => format!("takeover {conn_id}"),
    }
}

/// A control message as it arrives; `None` for anything else.
pub fn decode_control(payload: &[u8]) -> Option<ControlMessage> {
    let s = std::str::from_utf8(payload).ok()?;
    let conn_id = s.strip_prefix("takeover ")?.parse().ok()?;
    Some(ControlMessage::TakeOver { conn_id })
}

/// Hands a control message that arrived for this node to `sink`.
pub fn deliver_control(sink: &Weak<dyn ControlSink>, payload: &[u8]) {
    if let (Some(m), Some(sink)) = (decode_control(payload), sink.upgrade()) {
        sink.on_control(m);
    }
}

impl NodeBus for RedisBus {
    fn send<'a>(
        &'a self,
        node: &'a str,
        message: ControlMessage,
    ) -> BoxFuture<'a, Result<(), ResumeError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let command = if self.cluster { "SPUBLISH" } else { "PUBLISH" };
            let heard: i64 = timed(
                redis::cmd(command)
                    .arg(keys::control(node))
                    .arg(encode_control(&message))
                    .query_async(&mut conn),
            )
            .await
            .map_err(resume_error)?;
            if heard == 0 {
                return Err(ResumeError(format!("node {node:?} is not listening")));
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_control_messages_round_trip() {
        let r = SessionRecord {
            subs: vec![SubRecord {
                channel: tether_protocol::ChannelName::new("a:b").expect("valid"),
                epoch: tether_protocol::Epoch::new("e1"),
                delivered: tether_protocol::Offset(9),
                acked: Some(tether_protocol::Offset(7)),
            }],
        };
        assert_eq!(decode_record(&encode_record(&r)), r);
        assert_eq!(decode_record("junk"), SessionRecord::default());
        let m = ControlMessage::TakeOver { conn_id: 42 };
        assert_eq!(decode_control(encode_control(&m).as_bytes()), Some(m));
        assert_eq!(decode_control(b"hello"), None);
    }
}
