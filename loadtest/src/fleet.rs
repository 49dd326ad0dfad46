//! Many clients, opened at a paced rate with bounded concurrency, over
//! WebSocket or QUIC.
//!
//! Client `i` starts its setup at `start + i / rate` (`--connect-rate`), and
//! at most `--connect-concurrency` setups (TCP connect, upgrade, `connect`,
//! `subscribe`) are in flight at once, so that the broker's accept backlog
//! is never overrun. A failed setup is retried with jittered exponential
//! backoff (`--connect-retries`), then counted as a failure with its reason.
//! Once subscribed, each client runs the scenario's task until [`Fleet::stop`].

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use anyhow::Result;
use tether_protocol::{ChannelName, Connected, Encoding, Subscribed};
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinHandle;

use crate::auth::{FLEET_TOKEN_LIFE, Signer};
use crate::client::{Client, Event};
use crate::quic::QuicTarget;
use crate::target::Target;
use crate::timeline::{Second, Ticker, Window};

/// Where clients connect, and over what.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Client `i` on node `i mod n`.
    Ws(Arc<[Target]>),
    /// Client `i` on node `i mod n` too (one `--quic-addr` per node).
    Quic(QuicTarget),
}

impl Transport {
    /// `ws`, `wss` or `quic`, for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Ws(targets) if targets.iter().any(|t| t.tls.is_some()) => "wss",
            Transport::Ws(_) => "ws",
            Transport::Quic(_) => "quic",
        }
    }

    /// How many nodes the clients are spread over.
    pub fn nodes(&self) -> usize {
        match self {
            Transport::Ws(targets) => targets.len(),
            Transport::Quic(q) => q.addrs.len(),
        }
    }

    /// Node `node`'s address as given (its URL, or its QUIC address).
    pub fn node_name(&self, node: usize) -> String {
        match self {
            Transport::Ws(targets) => targets
                .get(node % targets.len().max(1))
                .map_or_else(String::new, |t| t.url.to_string()),
            Transport::Quic(q) => format!("quic://{}", q.addr(node)),
        }
    }

    /// Opens client `index`'s connection, on node `index mod nodes`.
    pub async fn open(
        &self,
        index: usize,
        source: Option<IpAddr>,
        encoding: Encoding,
    ) -> Result<Client> {
        self.open_on(index, index, source, encoding).await
    }

    /// Opens client `client`'s connection on node `node mod nodes` (over
    /// QUIC, through the client's endpoint).
    pub async fn open_on(
        &self,
        node: usize,
        client: usize,
        source: Option<IpAddr>,
        encoding: Encoding,
    ) -> Result<Client> {
        match self {
            Transport::Ws(targets) => match targets.get(node % targets.len().max(1)) {
                Some(target) => Client::open(target, source, encoding).await,
                None => anyhow::bail!("no WebSocket URL to connect to"),
            },
            Transport::Quic(q) => {
                Client::open_quic(q.endpoint(client), q.addr(node), &q.server_name).await
            }
        }
    }

    /// Adds the transport's rows to a report: transport, encoding and, for
    /// QUIC, the client endpoints and their socket buffers.
    pub fn describe(&self, encoding: Encoding, r: &mut crate::report::Report) {
        r.text("transport", "transport", self.name());
        match self {
            Transport::Ws(targets) => {
                r.text(
                    "encoding",
                    "encoding",
                    match encoding {
                        Encoding::Json => "json",
                        Encoding::MsgPack => "msgpack",
                    },
                );
                r.count("nodes", "nodes (WebSocket URLs)", targets.len() as u64);
            }
            Transport::Quic(q) => {
                r.text("encoding", "encoding", "msgpack");
                r.count("nodes", "nodes (QUIC addresses)", q.addrs.len() as u64);
                r.count(
                    "quic_endpoints",
                    "client QUIC endpoints (UDP sockets)",
                    q.endpoints() as u64,
                );
                r.text(
                    "quic_socket_buffers",
                    "their kernel buffers, receive / send (as reported)",
                    format!(
                        "{} / {}",
                        crate::report::human_bytes(q.socket_buffers.0 as f64),
                        crate::report::human_bytes(q.socket_buffers.1 as f64)
                    ),
                );
            }
        }
    }

    /// Lets the closes of QUIC connections reach the broker (at most 5 s);
    /// nothing to wait for over WebSocket.
    pub async fn finish(&self) {
        if let Transport::Quic(q) = self {
            q.wait_idle(Duration::from_secs(5)).await;
        }
    }
}

/// How clients are opened.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub transport: Transport,
    /// The encoding over WebSocket (QUIC always carries MessagePack).
    pub encoding: Encoding,
    /// Source addresses of WebSocket clients, used round-robin; empty: the
    /// kernel chooses. (QUIC endpoints are bound when they are made.)
    pub source_ips: Vec<IpAddr>,
    /// Setups started per second.
    pub connect_rate: f64,
    /// Setups in flight at once.
    pub concurrency: usize,
    /// Attempts after the first failed one.
    pub retries: u32,
    /// Time allowed for one attempt.
    pub attempt_timeout: Duration,
    /// Runtimes to run the clients on (client `i` on shard `i mod n`);
    /// `None`: the caller's runtime.
    pub shards: Option<Arc<Shards>>,
    /// Mints client `i` its `connect.token` (user `loadtest-<i>`), for a
    /// broker with client auth.
    pub signer: Option<Signer>,
}

/// Single-threaded tokio runtimes, one OS thread each, over which the
/// clients of a fleet are spread (client `i` on shard `i mod n`).
///
/// A client then lives on one thread: its runtime's own I/O driver wakes
/// it, with no work stealing and no waking of another worker. On the
/// multi-threaded scheduler those cost about 1.6 µs of the ~10 µs of CPU
/// the load tester spent per delivery in fanout 5,000 × 20/s (2 cores).
/// One shard per core keeps the clients in parallel.
#[derive(Debug)]
pub struct Shards {
    handles: Vec<tokio::runtime::Handle>,
    /// Dropping these ends the shards' threads (and their runtimes, with
    /// any task still on them).
    _stops: Vec<oneshot::Sender<()>>,
}

impl Shards {
    /// Starts `n` shards (at least one).
    pub fn start(n: usize) -> Result<Shards> {
        let n = n.max(1);
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("fleet-shard-{i}"))
                .spawn(move || {
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
        }
        Ok(Shards {
            handles,
            _stops: stops,
        })
    }

    /// One shard per core this process may use.
    pub fn per_core() -> Result<Shards> {
        Shards::start(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// How many shards (threads) there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    fn spawn<F>(&self, index: usize, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[index % self.handles.len()].spawn(fut)
    }
}

/// Counters shared by the clients of a fleet.
#[derive(Debug, Default)]
pub struct Counters {
    /// Clients connected and subscribed.
    pub established: AtomicU64,
    /// Clients whose every attempt failed.
    pub failed: AtomicU64,
    /// Attempts that failed and were retried.
    pub retried: AtomicU64,
    /// Established clients whose connection ended before `stop`.
    pub dropped: AtomicU64,
    /// Why setups failed, and how often.
    reasons: Mutex<BTreeMap<String, u64>>,
    /// Setup times since [`Fleet::wait_settled`] last looked.
    setups: Window,
}

impl Counters {
    pub fn record_failure(&self, e: &anyhow::Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.record_reason(failure_reason(e));
    }

    /// Counts one more failure for `reason` (without counting a failed client).
    pub fn record_reason(&self, reason: String) {
        if let Ok(mut m) = self.reasons.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    /// Setup failure reasons, most frequent first.
    pub fn failure_reasons(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .reasons
            .lock()
            .map(|m| m.iter().map(|(k, n)| (k.clone(), *n)).collect())
            .unwrap_or_default();
        v.sort_by_key(|r| std::cmp::Reverse(r.1));
        v
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// The first of `reasons` (most frequent first), as `N × reason`.
pub fn top_reason(reasons: &[(String, u64)]) -> String {
    reasons
        .first()
        .map_or("no reason recorded".to_owned(), |(r, n)| {
            format!("{n} × {r}")
        })
}

/// The text a failure is counted under: the outermost context says which
/// step failed, the root cause why.
pub fn failure_reason(e: &anyhow::Error) -> String {
    if e.chain().count() > 1 {
        format!("{e}: {}", e.root_cause())
    } else {
        e.to_string()
    }
}

/// What a client's task is handed once it is subscribed.
#[derive(Debug)]
pub struct Ready {
    pub index: usize,
    pub connected: Connected,
    pub subscribed: Subscribed,
    /// From the first attempt to `subscribed`, retries included.
    pub setup: Duration,
    /// Changes to `true` when the fleet is stopped.
    pub stop: watch::Receiver<bool>,
    /// How long after the stop this client closes (see [`close_delay`]).
    pub close_delay: Duration,
    close_at: Option<Instant>,
    stop_flag: Arc<StopFlag>,
    /// For the task to count its connection as dropped.
    pub counters: Arc<Counters>,
}

/// The fleet's stop as a flag that clients read (one cache line, written
/// once) and the wakers to call when it is raised, each client's registered
/// once.
#[derive(Debug, Default)]
struct StopFlag {
    raised: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl StopFlag {
    fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in wakers {
            w.wake();
        }
    }
}

/// Resolves once the fleet is stopped and the client's close delay has
/// passed (see [`Ready::stop_signal`]).
#[derive(Debug)]
pub struct StopSignal {
    flag: Arc<StopFlag>,
    /// The waker last registered with the flag.
    registered: Option<Waker>,
    close_delay: Duration,
    delay: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl StopSignal {
    fn raised(&mut self, cx: &Context<'_>) -> bool {
        if self.flag.raised.load(Ordering::Acquire) {
            return true;
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return false;
        }
        let mut wakers = self.flag.wakers.lock().unwrap_or_else(|p| p.into_inner());
        // Raised between the load and the lock? `raise` sets the flag before
        // it takes the lock, so under the lock the flag is up to date.
        if self.flag.raised.load(Ordering::Acquire) {
            return true;
        }
        wakers.push(cx.waker().clone());
        self.registered = Some(cx.waker().clone());
        false
    }
}

impl Future for StopSignal {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.delay.is_none() {
            if !this.raised(cx) {
                return Poll::Pending;
            }
            if this.close_delay.is_zero() {
                return Poll::Ready(());
            }
            this.delay = Some(Box::pin(tokio::time::sleep(this.close_delay)));
        }
        match &mut this.delay {
            Some(d) => d.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Ready {
    /// Resolves when the fleet is stopped (and this client's close delay
    /// has passed).
    pub async fn stopped(&mut self) {
        while !*self.stop.borrow_and_update() {
            if self.stop.changed().await.is_err() {
                break;
            }
        }
        if !self.close_delay.is_zero() {
            // Fixed at the first call: a select! that polls this again after
            // an event must not restart the delay.
            let at = *self
                .close_at
                .get_or_insert_with(|| Instant::now() + self.close_delay);
            tokio::time::sleep_until(at.into()).await;
        }
    }

    /// The stop (after this client's close delay) as a future for a loop
    /// that waits on it next to a busy connection, and so polls it at every
    /// wake-up. Polling [`Ready::stopped`] again locks a `Notify` that every
    /// client shares (and building it anew per event also links and unlinks
    /// a waiter); polling this reads a flag that every client shares but
    /// only the stop writes, and compares two wakers.
    pub fn stop_signal(&self) -> StopSignal {
        StopSignal {
            flag: self.stop_flag.clone(),
            registered: None,
            close_delay: self.close_delay,
            delay: None,
        }
    }

    /// Counts this client's connection as ended before the stop.
    pub fn dropped(&self) {
        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// How a held connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Still open when the fleet stopped; then closed by us.
    Stopped,
    /// Closed by the server (with this close code, if any) or failed.
    Dropped(Option<u16>),
}

/// Holds a connection open, answering pings and ignoring everything else,
/// until the fleet stops; a connection that ends before is counted dropped.
pub async fn hold(mut client: Client, ready: &mut Ready) -> Ended {
    loop {
        tokio::select! {
            _ = ready.stopped() => {
                client.close().await;
                return Ended::Stopped;
            }
            ev = client.next_event() => match ev {
                Ok(Event::Message(_) | Event::Other(_)) => {}
                Ok(Event::Closed(code)) => {
                    ready.dropped();
                    return Ended::Dropped(code);
                }
                Err(e) => {
                    tracing::debug!(client = ready.index, error = %format!("{e:#}"), "connection failed");
                    ready.dropped();
                    return Ended::Dropped(None);
                }
            },
        }
    }
}

/// Clients being opened or running.
pub struct Fleet<T> {
    pub counters: Arc<Counters>,
    pub size: usize,
    started: Instant,
    handles: Vec<JoinHandle<Option<T>>>,
    stop: watch::Sender<bool>,
    stop_flag: Arc<StopFlag>,
}

impl<T: Send + 'static> Fleet<T> {
    /// Starts opening the clients numbered `indices` (this process's share
    /// of the run, see [`crate::crew`]); client `i` subscribes to
    /// `channel_of(i)` and then runs `run(client, ready)`.
    pub fn launch<C, F, Fut>(
        indices: std::ops::Range<usize>,
        opts: FleetOptions,
        channel_of: C,
        run: F,
    ) -> Fleet<T>
    where
        C: Fn(usize) -> Result<ChannelName>,
        F: Fn(Client, Ready) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let counters = Arc::new(Counters::default());
        let (stop, _) = watch::channel(false);
        let stop_flag = Arc::new(StopFlag::default());
        let opts = Arc::new(opts);
        let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
        let started = Instant::now();
        let rate = opts.connect_rate.max(0.001);
        let size = indices.len();
        let first = indices.start;
        let mut handles = Vec::with_capacity(size);
        for index in indices {
            let slot = started + Duration::from_secs_f64((index - first) as f64 / rate);
            let channel = channel_of(index);
            let (opts, permits, counters) = (opts.clone(), permits.clone(), counters.clone());
            let stop_rx = stop.subscribe();
            let stop_flag = stop_flag.clone();
            let run = run.clone();
            let shards = opts.shards.clone();
            let client = async move {
                tokio::time::sleep_until(slot.into()).await;
                let setup = async {
                    let channel = channel?;
                    let _permit = permits.acquire().await?;
                    let t0 = Instant::now();
                    let (client, (connected, subscribed)) =
                        open_with_retries(&opts, index, &channel, &counters).await?;
                    anyhow::Ok((client, connected, subscribed, t0.elapsed()))
                };
                match setup.await {
                    Ok((client, connected, subscribed, setup)) => {
                        counters.setups.record(setup);
                        counters.established.fetch_add(1, Ordering::Relaxed);
                        let ready = Ready {
                            index,
                            connected,
                            subscribed,
                            setup,
                            stop: stop_rx,
                            close_delay: close_delay(&opts.transport, index),
                            close_at: None,
                            stop_flag,
                            counters,
                        };
                        Some(run(client, ready).await)
                    }
                    Err(e) => {
                        tracing::debug!(client = index, error = %format!("{e:#}"), "setup failed");
                        counters.record_failure(&e);
                        None
                    }
                }
            };
            handles.push(match shards {
                Some(shards) => shards.spawn(index, client),
                None => tokio::spawn(client),
            });
        }
        Fleet {
            counters,
            size,
            started,
            handles,
            stop,
            stop_flag,
        }
    }

    /// Clients whose setup has finished, one way or the other.
    pub fn settled(&self) -> u64 {
        Counters::get(&self.counters.established) + Counters::get(&self.counters.failed)
    }

    /// Waits until every client is subscribed or has failed, with a line a
    /// second ([`crate::live`]: clients subscribed, setups per second, the
    /// p99 setup time of that second, failures); returns the time since
    /// launch and the seconds ([`crate::timeline`]: setups done, clients
    /// online, setup times; the totals `failed` and `retried`).
    pub async fn wait_settled(&self, what: &str, worker: usize) -> Result<(Duration, Vec<Second>)> {
        let live = crate::live::Live::new(worker);
        let mut ticker = Ticker::new();
        let mut seconds = Vec::new();
        let mut last = 0u64;
        let mut sample = |unix_s: u64, live: &crate::live::Live| -> Result<()> {
            let c = &self.counters;
            let established = Counters::get(&c.established);
            let mut s = Second::new(
                unix_s,
                established.saturating_sub(last),
                i64::try_from(established.saturating_sub(Counters::get(&c.dropped)))
                    .unwrap_or(i64::MAX),
                &c.setups.take()?,
            );
            last = established;
            s.totals.insert("failed".into(), Counters::get(&c.failed));
            s.totals.insert("retried".into(), Counters::get(&c.retried));
            live.line(&format!(
                "{what} {:>4.0}s: {established} of {} subscribed, {} setups/s, setup p99 {}, {} failed",
                self.started.elapsed().as_secs_f64(),
                self.size,
                s.count,
                s.p99_us().map_or_else(
                    || "-".to_owned(),
                    |us| format!("{:.1} ms", us as f64 / 1000.0)
                ),
                Counters::get(&c.failed),
            ));
            crate::timeline::push(&mut seconds, s);
            Ok(())
        };
        while self.settled() < self.size as u64 {
            tokio::select! {
                unix_s = ticker.tick() => sample(unix_s, &live)?,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        let elapsed = self.started.elapsed();
        // The last, partial second: the setups since the last tick.
        sample((crate::publisher::unix_micros() / 1_000_000) + 1, &live)?;
        Ok((elapsed, seconds))
    }

    /// Tells every client to stop and collects what their tasks returned.
    pub async fn stop(mut self) -> Vec<T> {
        let _ = self.stop.send(true);
        self.stop_flag.raise();
        let handles = std::mem::take(&mut self.handles);
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            match h.await {
                Ok(Some(t)) => out.push(t),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "a client task failed"),
            }
        }
        out
    }
}

impl<T> Drop for Fleet<T> {
    /// A fleet dropped without [`Fleet::stop`] (a scenario failed) stops its
    /// clients too: dropping the watch sender ends [`Ready::stopped`], and
    /// this ends [`Ready::stop_signal`].
    fn drop(&mut self) {
        self.stop_flag.raise();
    }
}

async fn open_with_retries(
    opts: &FleetOptions,
    index: usize,
    channel: &ChannelName,
    counters: &Counters,
) -> Result<(Client, (Connected, Subscribed))> {
    let source =
        (!opts.source_ips.is_empty()).then(|| opts.source_ips[index % opts.source_ips.len()]);
    let mut attempt = 0;
    loop {
        let once = async {
            let token = opts
                .signer
                .as_ref()
                .map(|s| s.mint(index, FLEET_TOKEN_LIFE))
                .transpose()?;
            let mut client = opts.transport.open(index, source, opts.encoding).await?;
            let subscribed = client.connect_and_subscribe(channel, token).await?;
            anyhow::Ok((client, subscribed))
        };
        let result = match tokio::time::timeout(opts.attempt_timeout, once).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!(
                "setup took longer than {:?}",
                opts.attempt_timeout
            )),
        };
        match result {
            Ok(ok) => return Ok(ok),
            Err(e) if attempt >= opts.retries => return Err(e),
            Err(_) => {
                counters.retried.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff(attempt, index)).await;
                attempt += 1;
            }
        }
    }
}

/// QUIC clients closed all at once send the broker thousands of
/// CONNECTION_CLOSE datagrams in a burst; one that the broker's socket
/// drops (receive buffer full) is never sent again, and the broker keeps
/// that session until its idle timeout (60 s), still subscribed. So QUIC
/// clients close in steps of 100 every 10 ms (10,000/s); WebSocket clients
/// close at once.
pub fn close_delay(transport: &Transport, index: usize) -> Duration {
    match transport {
        Transport::Ws(_) => Duration::ZERO,
        Transport::Quic(_) => Duration::from_millis((index / 100) as u64 * 10),
    }
}

/// 100 ms doubling per attempt up to 3.2 s, plus up to as much again of
/// jitter derived from the client index and attempt (no RNG needed).
pub fn backoff(attempt: u32, index: usize) -> Duration {
    let base_ms = 100u64 << attempt.min(5);
    let mut x = (index as u64) ^ (u64::from(attempt) << 48) ^ 0x9E37_79B9_7F4A_7C15;
    // splitmix64
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    Duration::from_millis(base_ms + x % (base_ms + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_signal_fires_when_raised_after_its_close_delay() {
        let flag = Arc::new(StopFlag::default());
        let signal = |close_delay| StopSignal {
            flag: flag.clone(),
            registered: None,
            close_delay,
            delay: None,
        };
        let now = tokio::spawn(signal(Duration::ZERO));
        let later = tokio::spawn(signal(Duration::from_millis(50)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!now.is_finished() && !later.is_finished());
        let t0 = tokio::time::Instant::now();
        flag.raise();
        now.await.expect("fires");
        later.await.expect("fires");
        assert!(t0.elapsed() >= Duration::from_millis(50));
        // Raised before it is first polled: ready at once.
        tokio::time::timeout(Duration::from_secs(1), signal(Duration::ZERO))
            .await
            .expect("already raised");
    }

    #[test]
    fn backoff_grows_and_is_jittered() {
        for attempt in 0..8 {
            let base = 100u64 << attempt.min(5);
            for index in 0..50 {
                let d = backoff(attempt, index).as_millis() as u64;
                assert!((base..=2 * base).contains(&d), "attempt {attempt}: {d} ms");
            }
        }
        let spread: std::collections::BTreeSet<_> = (0..50).map(|i| backoff(1, i)).collect();
        assert!(spread.len() > 10, "jitter spreads retries: {spread:?}");
    }
}
