//! One publication to many outboxes: the frames encoded once per encoding
//! ([`Template`]), the loop that pushes them ([`feed`]), and the pool of
//! long-lived threads that shares a large fan-out out over the cores
//! ([`FanOutPool`]).
//!
//! A push is the socket write itself for an idle plain-WebSocket session
//! (write-through, `crate::outbox`), a few µs each: 5,000 subscribers are
//! tens of milliseconds of one thread. From [`LARGE_FAN_OUT`] subscribers
//! on, the hub runs the fan-out off the runtime worker (`block_in_place`,
//! so the worker's other tasks move to another thread) and this pool takes
//! all shares but the caller's. The caller waits for the pool's shares
//! before it returns — it holds the channel's lock, which keeps the next
//! publication of the channel behind this one — and that wait is the one
//! blocking wait on the publish path: it is inside `block_in_place`, and
//! lasts as long as the caller's own share.

use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use prometheus_client::metrics::counter::Counter;
use serde_json::Value;
use tether_protocol::codec::{encode_publication_json, encode_publication_msgpack};
use tether_protocol::{ChannelName, Encoding, Epoch, Offset};
use tracing::warn;

use super::Subscriber;
use crate::cluster::Publication;
use crate::outbox::{Delivery, Frame, PushError};

/// Subscribers from which a fan-out is taken off the runtime worker and
/// shared with the pool.
pub const LARGE_FAN_OUT: usize = 512;
/// Jobs queued per pool thread; a full queue runs the share on the caller.
const JOBS_PER_THREAD: usize = 64;

/// Runs `f`, a long synchronous fan-out, without holding up the other tasks
/// queued on this runtime worker: on the multi-threaded runtime they move to
/// another worker meanwhile (`block_in_place`). Elsewhere (no runtime, or a
/// current-thread one, as in tests) it just runs `f`.
pub fn off_the_worker<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A live subscriber as the fan-out sees it.
#[derive(Debug, Clone)]
pub struct LiveSub {
    pub subscriber: Subscriber,
    /// Deliveries of this epoch up to this offset are skipped: the
    /// subscriber got them from history already (a broker's deliveries may
    /// lag behind its history reads). `None` almost always.
    pub skip: Option<Box<(Epoch, Offset)>>,
}

/// One publication, encoded for the encodings its subscribers use.
#[derive(Debug)]
pub struct Template {
    pub epoch: Epoch,
    pub offset: Offset,
    pub published_at: Option<Instant>,
    json: Option<Bytes>,
    msgpack: Option<Bytes>,
}

impl Template {
    /// Encodes `p` once for each encoding marked in `needs` (JSON, MessagePack).
    pub fn new(channel: &ChannelName, p: &Publication<'_>, needs: [bool; 2]) -> Template {
        let json =
            needs[0].then(|| encode_publication_json(channel, p.epoch, p.offset, p.raw, p.ts));
        let msgpack = needs[1].then(|| {
            let parsed;
            let data = match p.data {
                Some(d) => d,
                None => {
                    parsed = serde_json::from_str::<Value>(p.raw.get()).unwrap_or(Value::Null);
                    &parsed
                }
            };
            encode_publication_msgpack(channel, p.epoch, p.offset, data, p.ts)
        });
        Template {
            epoch: p.epoch.clone(),
            offset: p.offset,
            published_at: p.published_at,
            json,
            msgpack,
        }
    }

    /// The frame's bytes in `encoding`, if it was encoded for it.
    pub fn bytes(&self, encoding: Encoding) -> Option<&Bytes> {
        match encoding {
            Encoding::Json => self.json.as_ref(),
            Encoding::MsgPack => self.msgpack.as_ref(),
        }
    }
}

/// Pushes the publication to each of `subs`; never waits. Returns whether
/// any outbox refused (it is closed now: full → 4008, or closing).
pub fn feed(subs: &[LiveSub], t: &Template, drops: &Counter) -> bool {
    let mut dropped = false;
    for s in subs {
        if let Some(skip) = &s.skip
            && t.offset <= skip.1
            && t.epoch == skip.0
        {
            continue;
        }
        let Some(bytes) = t.bytes(s.subscriber.encoding) else {
            continue;
        };
        let frame = Frame::message(
            bytes.clone(),
            t.published_at,
            Delivery {
                sub: s.subscriber.id.sub,
                offset: t.offset,
            },
        );
        match s.subscriber.outbox.push(frame) {
            Ok(()) => {}
            Err(PushError::Full) => {
                drops.inc();
                dropped = true;
            }
            Err(PushError::Closed) => dropped = true,
        }
    }
    dropped
}

/// Counts down the shares of one fan-out given to the pool.
#[derive(Debug, Default)]
struct Latch {
    /// Shares not done yet, and whether any subscriber refused.
    state: Mutex<(usize, bool)>,
    done: Condvar,
}

impl Latch {
    fn add(&self) {
        self.state.lock().0 += 1;
    }

    fn count_down(&self, dropped: bool) {
        let mut st = self.state.lock();
        st.0 = st.0.saturating_sub(1);
        st.1 |= dropped;
        if st.0 == 0 {
            self.done.notify_all();
        }
    }

    fn wait(&self) -> bool {
        let mut st = self.state.lock();
        while st.0 > 0 {
            self.done.wait(&mut st);
        }
        st.1
    }
}

struct Job {
    subs: Arc<Vec<LiveSub>>,
    range: Range<usize>,
    template: Arc<Template>,
    latch: Arc<Latch>,
}

/// Long-lived threads that take shares of large fan-outs: one fewer than
/// the machine's cores (the publishing thread takes a share itself). The
/// threads end when the pool is dropped.
pub struct FanOutPool {
    workers: Vec<SyncSender<Job>>,
    drops: Counter,
}

impl std::fmt::Debug for FanOutPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FanOutPool")
            .field("threads", &self.workers.len())
            .finish()
    }
}

fn work(jobs: Receiver<Job>, drops: Counter) {
    while let Ok(job) = jobs.recv() {
        let Job {
            subs,
            range,
            template,
            latch,
        } = job;
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            subs.get(range)
                .is_some_and(|part| feed(part, &template, &drops))
        }))
        // A share that panicked: have the caller look for closed outboxes.
        .unwrap_or(true);
        // Release the shared list before the caller may change it.
        drop(subs);
        drop(template);
        latch.count_down(dropped);
    }
}

impl FanOutPool {
    /// Starts `threads` pool threads; a thread that cannot be started is
    /// left out (its shares run on the caller).
    pub fn new(threads: usize, drops: Counter) -> FanOutPool {
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (tx, rx) = std::sync::mpsc::sync_channel(JOBS_PER_THREAD);
            let d = drops.clone();
            match std::thread::Builder::new()
                .name(format!("tether-fan-out-{i}"))
                .spawn(move || work(rx, d))
            {
                Ok(_) => workers.push(tx),
                Err(e) => warn!(error = %e, "cannot start a fan-out thread"),
            }
        }
        FanOutPool { workers, drops }
    }

    /// A pool sized for this machine: one thread per core but one.
    pub fn for_this_machine(drops: Counter) -> FanOutPool {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        FanOutPool::new(cores.saturating_sub(1), drops)
    }

    /// Feeds every subscriber of `subs`, sharing the work with the pool
    /// when there are enough of them; returns when all are fed. Returns
    /// whether any refused.
    pub fn run(&self, subs: &Arc<Vec<LiveSub>>, template: Template) -> bool {
        let n = subs.len();
        // At least half a large fan-out per share: below that, handing a
        // share over costs more than it saves.
        let shares = (self.workers.len() + 1).min(n / (LARGE_FAN_OUT / 2)).max(1);
        if shares == 1 {
            return feed(subs, &template, &self.drops);
        }
        let share = n.div_ceil(shares);
        let template = Arc::new(template);
        let latch = Arc::new(Latch::default());
        let mut inline = Vec::new();
        for (k, worker) in (1..shares).zip(&self.workers) {
            let range = (k * share).min(n)..((k + 1) * share).min(n);
            if range.is_empty() {
                continue;
            }
            latch.add();
            let job = Job {
                subs: subs.clone(),
                range,
                template: template.clone(),
                latch: latch.clone(),
            };
            match worker.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                    latch.count_down(false);
                    inline.push(job.range);
                }
            }
        }
        let mut dropped = feed(&subs[..share.min(n)], &template, &self.drops);
        for range in inline {
            dropped |= feed(&subs[range], &template, &self.drops);
        }
        dropped | latch.wait()
    }
}
