//! [`ScriptBatcher`]: publications from concurrent requests go to Redis in
//! pipelines, one round at a time.
//!
//! Redis spends about as much CPU reading, parsing and answering an
//! unpipelined `EVALSHA` as running the publish script itself (BENCHMARKS.md,
//! "Cluster mode"). So every publish goes through one queue; a task takes
//! whatever has queued up (whole jobs, until they hold [`MAX_PIPELINE`]
//! calls), sends it as one pipeline, hands each caller its answers, and only
//! then takes the next round. An idle node sends a publication at once (a
//! round of one); a busy one sends rounds as large as what arrived during
//! the previous round trip.
//!
//! - **Order**: a job (one publication, or a whole API batch) enters the
//!   queue at once, jobs leave it in order and a pipeline runs in order, so
//!   a batch's publications of one channel keep their order.
//! - **Redis Cluster**: a pipeline must stay on one slot, so a round is split
//!   by channel (all of a channel's keys share its slot) and the pipelines
//!   of one round are sent together.
//! - **Bounded**: the queue holds [`QUEUE`] jobs; a caller waits for room at
//!   most [`RESPONSE_TIMEOUT`], then gets `unavailable`. A job still queued
//!   when its deadline passed is answered `unavailable` without being sent:
//!   not published, so a retry cannot duplicate it.
//! - **Script cache**: after a Redis restart the script is gone (`NOSCRIPT`);
//!   the task loads it and sends those calls again, once. Each pipeline is
//!   one `MULTI`/`EXEC`, so a round fails `NOSCRIPT` whole or not at all
//!   and the resent calls keep their place.

use std::collections::HashMap;

use redis::{Cmd, ServerErrorKind, Value};
use tether_protocol::ChannelName;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{Conn, RESPONSE_TIMEOUT, timed};
use crate::cluster::BrokerError;

/// Most jobs waiting for a round.
pub const QUEUE: usize = 4096;
/// A round takes jobs until they hold this many calls (a larger job goes
/// alone, whole).
pub const MAX_PIPELINE: usize = 64;

/// One call: an `EVALSHA` that touches only `channel`'s keys.
pub type Call = (ChannelName, Cmd);

type Answer = Result<Value, BrokerError>;

struct Job {
    calls: Vec<Call>,
    deadline: Instant,
    reply: oneshot::Sender<Vec<Answer>>,
}

/// The queue in front of the batching task. The task ends when the batcher
/// is dropped (after answering what is queued).
#[derive(Debug)]
pub struct ScriptBatcher {
    tx: mpsc::Sender<Job>,
}

impl ScriptBatcher {
    /// Starts the task. `script` is the source whose `EVALSHA` the calls
    /// send, loaded again when Redis has lost it.
    pub fn start(conn: Conn, cluster: bool, script: &'static str) -> ScriptBatcher {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, conn, cluster, script));
        ScriptBatcher { tx }
    }

    /// Sends `calls` in order in the next round(s); answers each.
    pub async fn call(&self, calls: Vec<Call>) -> Vec<Answer> {
        let n = calls.len();
        let deadline = Instant::now() + RESPONSE_TIMEOUT;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            calls,
            deadline,
            reply,
        };
        let failed = |e: BrokerError| vec![Err(e); n];
        match tokio::time::timeout_at(deadline, self.tx.send(job)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return failed(BrokerError::Internal("publish queue closed".into())),
            Err(_) => {
                return failed(BrokerError::Unavailable(format!(
                    "{QUEUE} publications already wait for Redis"
                )));
            }
        }
        answer
            .await
            .unwrap_or_else(|_| failed(BrokerError::Internal("publish task ended".into())))
    }
}

/// A call's place in a round: (job, call).
type Slot = (usize, usize);

/// What Redis said to one call.
enum Reply {
    Done(Answer),
    NoScript,
}

async fn run(mut rx: mpsc::Receiver<Job>, mut conn: Conn, cluster: bool, script: &'static str) {
    while let Some(first) = rx.recv().await {
        let mut calls = first.calls.len();
        let mut jobs = vec![first];
        while calls < MAX_PIPELINE {
            match rx.try_recv() {
                Ok(job) => {
                    calls += job.calls.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let now = Instant::now();
        let (jobs, expired): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|j| j.deadline > now);
        for job in expired {
            let e = BrokerError::Unavailable("no answer from Redis in time; not published".into());
            let _ = job.reply.send(vec![Err(e); job.calls.len()]);
        }
        let mut answers: Vec<Vec<Option<Answer>>> = jobs
            .iter()
            .map(|j| (0..j.calls.len()).map(|_| None).collect())
            .collect();
        let all: Vec<Slot> = jobs
            .iter()
            .enumerate()
            .flat_map(|(j, job)| (0..job.calls.len()).map(move |c| (j, c)))
            .collect();
        let mut retry = Vec::new();
        for (slot, reply) in send_round(&mut conn, cluster, &jobs, all).await {
            match reply {
                Reply::Done(a) => answers[slot.0][slot.1] = Some(a),
                Reply::NoScript => retry.push(slot),
            }
        }
        if !retry.is_empty() {
            // The script cache was emptied (a restarted Redis): load it and
            // send those calls again, in order.
            let loaded: Result<String, _> = timed(
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(script)
                    .query_async(&mut conn),
            )
            .await;
            match loaded {
                Err(e) => {
                    for (j, c) in retry {
                        answers[j][c] = Some(Err(e.clone()));
                    }
                }
                Ok(_) => {
                    for (slot, reply) in send_round(&mut conn, cluster, &jobs, retry).await {
                        answers[slot.0][slot.1] = Some(match reply {
                            Reply::Done(a) => a,
                            Reply::NoScript => Err(BrokerError::Internal(
                                "Redis lost the publish script twice in a row".into(),
                            )),
                        });
                    }
                }
            }
        }
        for (job, answers) in jobs.into_iter().zip(answers) {
            let answers = answers
                .into_iter()
                .map(|a| a.unwrap_or_else(|| Err(BrokerError::Internal("no reply".into()))))
                .collect();
            let _ = job.reply.send(answers);
        }
    }
}

/// Sends the calls at `slots` (in that order): one pipeline, or on a Redis
/// Cluster one per channel, all at once.
async fn send_round(
    conn: &mut Conn,
    cluster: bool,
    jobs: &[Job],
    slots: Vec<Slot>,
) -> Vec<(Slot, Reply)> {
    if !cluster {
        return send(conn, jobs, slots).await;
    }
    let mut by_channel: HashMap<&ChannelName, Vec<Slot>> = HashMap::new();
    for (j, c) in slots {
        by_channel
            .entry(&jobs[j].calls[c].0)
            .or_default()
            .push((j, c));
    }
    let sends = by_channel.into_values().map(|slots| {
        let mut conn = conn.clone();
        async move { send(&mut conn, jobs, slots).await }
    });
    futures_util::future::join_all(sends)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Sends the calls at `slots` as one pipeline, in one transaction
/// (`MULTI`/`EXEC`): nothing of another client runs between its calls, so
/// after a lost script cache either every call of the round answers
/// `NOSCRIPT` or none does. Without it, another node's `SCRIPT LOAD` could
/// land mid-pipeline: the calls before it failed, those after it were
/// published, and the retry put the first ones after them, out of order.
async fn send(conn: &mut Conn, jobs: &[Job], slots: Vec<Slot>) -> Vec<(Slot, Reply)> {
    let mut pipe = redis::pipe();
    pipe.atomic().ignore_errors();
    for &(j, c) in &slots {
        pipe.add_command(jobs[j].calls[c].1.clone());
    }
    let failed = |slots: Vec<Slot>, e: BrokerError| {
        slots
            .into_iter()
            .map(|s| (s, Reply::Done(Err(e.clone()))))
            .collect()
    };
    let replies: Vec<Value> = match timed(pipe.query_async(conn)).await {
        Ok(r) => r,
        Err(e) => return failed(slots, e),
    };
    if replies.len() != slots.len() {
        let e = BrokerError::Internal(format!(
            "{} replies from Redis to a pipeline of {}",
            replies.len(),
            slots.len()
        ));
        return failed(slots, e);
    }
    slots
        .into_iter()
        .zip(replies)
        .map(|(slot, reply)| {
            let reply = match reply {
                Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript) => {
                    Reply::NoScript
                }
                Value::ServerError(e) => Reply::Done(Err(BrokerError::Internal(format!(
                    "Redis refused a publication: {} {}",
                    e.code(),
                    e.details().unwrap_or("")
                )))),
                v => Reply::Done(Ok(v)),
            };
            (slot, reply)
        })
        .collect()
}
