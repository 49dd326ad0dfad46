//! Scenario `churn`: steady publishing while clients drop abruptly and come
//! back with their resume token, checked by the correctness ledger.
//!
//! 1. Opens `--clients` clients, WebSocket or QUIC (`--transport`), client
//!    `i` on node `i mod nodes` of `--url` or `--quic-addr` (several: a
//!    cluster) and subscribed to `<prefix><i mod channels>`.
//! 2. Publishes `--rate` publications a second for `--duration` seconds,
//!    round-robin over the channels and over the `--api` URLs, each with an
//!    idempotency key; a failed request is retried on the next API URL with
//!    the same key. Every accepted answer (epoch, offset) goes into the
//!    ledger ([`crate::ledger`]).
//! 3. Meanwhile `--drop-rate` clients a second (round-robin) drop their
//!    connection abruptly (no WebSocket close handshake; over QUIC the
//!    connection is dropped, which sends only QUIC's own CONNECTION_CLOSE),
//!    stay away `--away` seconds,
//!    and reconnect on the *next* node with `connect.resume` naming the last
//!    offset they received; `--storm-at S` drops every client at once S
//!    seconds in (a reconnect storm). A connection the server closes (4000
//!    taken over, 4010 draining, a killed node) reconnects the same way,
//!    retrying with backoff until the run ends.
//! 4. After the last publication, waits until every client has received the
//!    last accepted offset of its channel (at most `--drain-timeout`), then
//!    checks every client's deliveries against the ledger: duplicated,
//!    reordered, declared lost (`recovered: false`, allowed) and silently
//!    lost (never allowed), per channel and in total.
//!
//! Latency (publish → deliver, from the `sent_us` each publication carries:
//! when it was due at the fixed rate, see [`crate::publisher::Schedule`])
//! counts live deliveries only: a replay after a resume is as late as the
//! client was away.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tether_protocol::{
    ChannelName, ClientMessage, Connect, Connected, Encoding, Epoch, Offset, Resume, ServerMessage,
    StreamPosition, Subscribe,
};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;

use crate::auth::Signer;
use crate::client::{Client, Event, kind};
use crate::crew::{Part, Role, Share};
use crate::fleet::{Transport, backoff, failure_reason};
use crate::ledger::{Ledger, Trail, Verdict};
use crate::proc::{self, Pid};
use crate::publisher::unix_micros;
use crate::report::{self, Latency, Report};
use crate::timeline::{Second, Ticker, Timeline};

/// Publish requests in flight at most.
const PUBLISH_IN_FLIGHT: usize = 64;
/// Attempts per publication (on successive API URLs, same idempotency key).
const PUBLISH_ATTEMPTS: usize = 3;
/// Attempts at a client's first connection before it counts as a connect
/// failure (later reconnections retry until the run ends).
const FIRST_ATTEMPTS: u32 = 4;
/// Time one (re)connection attempt may take, TCP connect to the reply.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which scenario this run is: they share everything but their report.
#[derive(Debug, Clone)]
pub enum Mode {
    Churn,
    /// Long: the broker's memory sampled, drift reported.
    Soak(Soak),
    /// Over a cluster: the clients per node.
    Cluster,
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::Churn => "churn",
            Mode::Soak(_) => "soak",
            Mode::Cluster => "cluster",
        }
    }
}

/// What `soak` samples.
#[derive(Debug, Clone)]
pub struct Soak {
    pub sample_every: Duration,
    /// The nodes' PIDs on this machine; empty: their GET /metrics.
    pub broker_pids: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct ChurnOptions {
    pub mode: Mode,
    /// Where the clients connect, one address per node (WebSocket URLs or
    /// QUIC addresses).
    pub transport: Transport,
    /// Backend API base URLs, one per node.
    pub apis: Vec<Url>,
    pub api_key: Option<String>,
    /// Mints each client's `connect.token` (`sub` = `loadtest-<i>`).
    pub signer: Option<Signer>,
    pub encoding: Encoding,
    pub source_ips: Vec<IpAddr>,
    pub clients: usize,
    pub channels: usize,
    pub channel_prefix: String,
    pub connect_rate: f64,
    pub rate: f64,
    pub duration: Duration,
    pub payload: usize,
    /// Clients dropped per second (0: none).
    pub drop_rate: f64,
    /// Drop every client at once this long after publishing starts.
    pub storm_at: Option<Duration>,
    /// How a dropped client leaves its connection.
    pub drop_mode: DropMode,
    pub away: Duration,
    pub drain_timeout: Duration,
    /// Draw the run here (SVG).
    pub plot: Option<std::path::PathBuf>,
    /// Done by the leader to the deployment during the run.
    pub faults: Vec<crate::faults::Fault>,
}

/// How a client drops its connection (`--drop-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DropMode {
    /// Closed without a goodbye: the socket is dropped (TCP FIN without a
    /// WebSocket close; over QUIC, quinn's CONNECTION_CLOSE).
    Close,
    /// Left open and silent (not read, pings unanswered), as a phone that
    /// moved to another network leaves it: the client comes back on a new
    /// connection with its resume token, which takes the session over (the
    /// broker closes the old one with 4000) and must replay what it wrote
    /// to the silent one. The old socket is let go once the new session is
    /// up.
    Silent,
}

/// Shards of the last second's latency histogram (client `i` records into
/// shard `i mod SHARDS`, so that clients on different threads rarely meet).
const WINDOW_SHARDS: usize = 16;

/// What the clients count together.
#[derive(Debug)]
struct Tally {
    /// Clients whose first connection succeeded.
    connected: AtomicU64,
    /// Clients connected right now.
    online: AtomicI64,
    /// Clients whose first connection failed [`FIRST_ATTEMPTS`] times.
    connect_failures: AtomicU64,
    /// Deliveries so far, and publications accepted and failed so far.
    delivered: AtomicU64,
    published: AtomicU64,
    publish_failed: AtomicU64,
    /// Live latencies since the last progress line.
    window: Vec<Mutex<Histogram<u32>>>,
    caught_up: AtomicU64,
    drops: AtomicU64,
    reconnects: AtomicU64,
    reconnect_attempts_failed: AtomicU64,
    resumed: AtomicU64,
    fresh_sessions: AtomicU64,
    recovered: AtomicU64,
    not_recovered: AtomicU64,
    /// Connections ended by the server or network, by close code.
    server_closes: Mutex<BTreeMap<Option<u16>, u64>>,
    /// Per node (index into `--url`): clients on it now, connections it
    /// (or the network) ended.
    node_online: Vec<AtomicI64>,
    node_ended: Vec<AtomicU64>,
    failures: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn new(template: &Histogram<u32>, nodes: usize) -> Tally {
        Tally {
            connected: AtomicU64::new(0),
            online: AtomicI64::new(0),
            connect_failures: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            published: AtomicU64::new(0),
            publish_failed: AtomicU64::new(0),
            window: (0..WINDOW_SHARDS)
                .map(|_| Mutex::new(template.clone()))
                .collect(),
            caught_up: AtomicU64::new(0),
            drops: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            reconnect_attempts_failed: AtomicU64::new(0),
            node_online: (0..nodes).map(|_| AtomicI64::new(0)).collect(),
            node_ended: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
            resumed: AtomicU64::new(0),
            fresh_sessions: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
            not_recovered: AtomicU64::new(0),
            server_closes: Mutex::new(BTreeMap::new()),
            failures: Mutex::new(BTreeMap::new()),
        }
    }

    /// A live delivery's latency, into this second's window too.
    fn live_latency(&self, client: usize, us: u64) {
        if let Some(shard) = self.window.get(client % WINDOW_SHARDS) {
            shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .saturating_record(us);
        }
    }

    /// The live latencies since the last call, emptying the window.
    fn window_take(&self) -> Result<Histogram<u64>> {
        let mut merged = report::latency_histogram::<u64>()?;
        for shard in &self.window {
            let mut h = shard.lock().unwrap_or_else(|p| p.into_inner());
            report::merge_into(&mut merged, &h);
            h.reset();
        }
        Ok(merged)
    }

    /// A client is on `node` now (`up`) or left it.
    fn on_node(&self, node: usize, up: bool) {
        let i = node % self.node_online.len().max(1);
        let step = if up { 1 } else { -1 };
        if let Some(n) = self.node_online.get(i) {
            n.fetch_add(step, Ordering::Relaxed);
        }
        self.online.fetch_add(step, Ordering::Relaxed);
    }

    fn failure(&self, e: &anyhow::Error) {
        self.reconnect_attempts_failed
            .fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        *f.entry(failure_reason(e)).or_default() += 1;
    }
}

/// The last accepted position of each channel, known once publishing ended.
type Targets = Option<Arc<HashMap<ChannelName, (Epoch, u64)>>>;

/// What the client loop does next.
enum Step {
    Continue,
    Stop,
    Drop,
    /// The connection ended (close code, if any).
    Lost(Option<u16>),
}

/// What one client hands back at the end.
struct Outcome {
    trail: Option<Trail>,
    latency: Histogram<u32>,
    /// Still disconnected (reconnecting) when the run ended.
    disconnected_at_end: bool,
}

struct ClientCtx {
    index: usize,
    opts: Arc<ChurnOptions>,
    channel: ChannelName,
    jwt: Option<String>,
    tally: Arc<Tally>,
    stop: watch::Receiver<bool>,
    targets: watch::Receiver<Targets>,
    drop_now: Arc<Notify>,
}

/// One client's session as it goes from node to node.
struct Session {
    client: Client,
    resume_token: String,
    /// Offsets up to this were replays when (re)subscribed; later ones live.
    live_after: u64,
}

impl ClientCtx {
    fn source(&self, attempt: usize) -> Option<IpAddr> {
        let ips = &self.opts.source_ips;
        (!ips.is_empty()).then(|| ips[(self.index + attempt) % ips.len()])
    }

    async fn open(&self, node: usize, attempt: usize) -> Result<Client> {
        self.opts
            .transport
            .open_on(node, self.index, self.source(attempt), self.opts.encoding)
            .await
    }

    /// First connection: `connect`, then `subscribe` with no `since`.
    async fn first(&self, node: usize, attempt: usize) -> Result<(Session, Trail)> {
        let mut client = self.open(node, attempt).await?;
        let connected = connect(&mut client, self.jwt.clone(), None).await?;
        let s = subscribe(&mut client, &self.channel, None).await?;
        let trail = Trail::new(self.index, self.channel.clone(), s.epoch, s.offset.0);
        Ok((
            Session {
                client,
                resume_token: connected.resume_token,
                live_after: s.offset.0,
            },
            trail,
        ))
    }

    /// A reconnection with `connect.resume`, falling back to `subscribe`
    /// with `since` when the session could not be resumed.
    async fn again(
        &self,
        node: usize,
        attempt: usize,
        token: &str,
        trail: &mut Trail,
    ) -> Result<Session> {
        let mut client = self.open(node, attempt).await?;
        let (epoch, offset) = trail.position();
        let resume = Resume {
            token: token.to_owned(),
            channels: Some(BTreeMap::from([(self.channel.clone(), Offset(offset))])),
        };
        let connected = connect(&mut client, self.jwt.clone(), Some(resume)).await?;
        let rec = connected
            .channels
            .as_ref()
            .and_then(|c| c.get(&self.channel))
            .cloned();
        let live_after = match (connected.resumed, rec) {
            (true, Some(rec)) => {
                self.tally.resumed.fetch_add(1, Ordering::Relaxed);
                self.recovery(rec.recovered, trail, rec.epoch, rec.offset.0);
                rec.offset.0
            }
            (resumed, _) => {
                let counter = if resumed {
                    &self.tally.resumed
                } else {
                    &self.tally.fresh_sessions
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let since = StreamPosition {
                    epoch,
                    offset: Offset(offset),
                };
                let s = subscribe(&mut client, &self.channel, Some(since)).await?;
                self.recovery(s.recovered, trail, s.epoch, s.offset.0);
                s.offset.0
            }
        };
        Ok(Session {
            client,
            resume_token: connected.resume_token,
            live_after,
        })
    }

    fn recovery(&self, recovered: bool, trail: &mut Trail, epoch: Epoch, offset: u64) {
        if recovered {
            self.tally.recovered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.tally.not_recovered.fetch_add(1, Ordering::Relaxed);
            trail.restart(epoch, offset);
        }
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Reconnects (or connects for the first time) until it works or the
    /// run stops; `None` when it stopped first.
    async fn reconnect(
        &self,
        node: &mut usize,
        token: Option<&str>,
        trail: &mut Option<Trail>,
    ) -> Option<Session> {
        let mut attempt = 0u32;
        loop {
            if self.stopped() {
                return None;
            }
            let once = async {
                match (token, trail.as_mut()) {
                    (Some(token), Some(t)) => self.again(*node, attempt as usize, token, t).await,
                    _ => {
                        let (session, t) = self.first(*node, attempt as usize).await?;
                        *trail = Some(t);
                        Ok(session)
                    }
                }
            };
            let result = tokio::time::timeout(ATTEMPT_TIMEOUT, once)
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {ATTEMPT_TIMEOUT:?}")));
            match result {
                Ok(s) => return Some(s),
                Err(e) => {
                    tracing::debug!(client = self.index, node = *node, error = %format!("{e:#}"), "reconnect failed");
                    self.tally.failure(&e);
                    if token.is_none() && attempt + 1 >= FIRST_ATTEMPTS {
                        self.tally.connect_failures.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    *node += 1;
                    let pause = backoff(attempt.min(3), self.index);
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.wait_for(|s| *s) => return None,
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// Has this client received its channel's last accepted offset?
    fn caught_up(&self, trail: &Trail) -> bool {
        let targets = self.targets.borrow();
        match targets.as_ref() {
            None => false,
            Some(t) => match t.get(&self.channel) {
                None => true,
                Some((epoch, offset)) => trail.reached(epoch, *offset),
            },
        }
    }

    async fn run(self, template: Arc<Histogram<u32>>) -> Outcome {
        let mut latency = (*template).clone();
        let mut node = self.index % self.opts.transport.nodes();
        let mut trail: Option<Trail> = None;
        let Some(mut session) = self.reconnect(&mut node, None, &mut trail).await else {
            return Outcome {
                trail,
                latency,
                disconnected_at_end: true,
            };
        };
        self.tally.connected.fetch_add(1, Ordering::Relaxed);
        self.tally.on_node(node, true);
        let mut done = false;
        let mut stop = self.stop.clone();
        let mut targets = self.targets.clone();
        let drop_now = self.drop_now.clone();
        // A silently dropped connection, held (unread) until the next
        // session is up.
        let mut silent: Option<Client> = None;
        while let Some(t) = trail.as_mut() {
            if !done && self.caught_up(t) {
                done = true;
                self.tally.caught_up.fetch_add(1, Ordering::Relaxed);
            }
            let step = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => Step::Stop,
                _ = drop_now.notified() => Step::Drop,
                _ = targets.changed(), if !done => Step::Continue,
                ev = session.client.next_event() => match ev {
                    Ok(Event::Message(p)) if p.channel == self.channel => {
                        t.deliver(&p.epoch, p.offset.0);
                        self.tally.delivered.fetch_add(1, Ordering::Relaxed);
                        if p.offset.0 > session.live_after
                            && let Some(sent) = p.data.get("sent_us").and_then(Value::as_u64)
                        {
                            let us = unix_micros().saturating_sub(sent).max(1);
                            latency.saturating_record(us);
                            self.tally.live_latency(self.index, us);
                        }
                        Step::Continue
                    }
                    Ok(Event::Message(_) | Event::Other(_)) => Step::Continue,
                    Ok(Event::Closed(code)) => Step::Lost(code),
                    Err(e) => {
                        tracing::debug!(client = self.index, error = %format!("{e:#}"), "connection failed");
                        Step::Lost(None)
                    }
                }
            };
            match step {
                Step::Continue => continue,
                Step::Stop => {
                    session.client.close().await;
                    return Outcome {
                        trail,
                        latency,
                        disconnected_at_end: false,
                    };
                }
                Step::Drop => {
                    // Abruptly: no close frame, the socket closed or left
                    // silent until the new session is up.
                    self.tally.drops.fetch_add(1, Ordering::Relaxed);
                    self.tally.on_node(node, false);
                    match self.opts.drop_mode {
                        DropMode::Close => drop(session.client),
                        DropMode::Silent => silent = Some(session.client),
                    }
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(self.opts.away) => {}
                        _ = stop.wait_for(|s| *s) => {
                            return Outcome { trail, latency, disconnected_at_end: true };
                        }
                    }
                }
                Step::Lost(code) => {
                    self.tally.on_node(node, false);
                    let nodes = self.tally.node_ended.len().max(1);
                    if let Some(n) = self.tally.node_ended.get(node % nodes) {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    *self
                        .tally
                        .server_closes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(code)
                        .or_insert(0) += 1;
                }
            }
            // Lost, dropped or taken away: resume on the next node.
            {
                node += 1;
                let token = session.resume_token.clone();
                match self.reconnect(&mut node, Some(&token), &mut trail).await {
                    Some(s) => {
                        self.tally.reconnects.fetch_add(1, Ordering::Relaxed);
                        self.tally.on_node(node, true);
                        session = s;
                        // Taken over by now: the old one can go.
                        drop(silent.take());
                    }
                    None => {
                        return Outcome {
                            trail,
                            latency,
                            disconnected_at_end: true,
                        };
                    }
                }
            }
        }
        Outcome {
            trail,
            latency,
            disconnected_at_end: false,
        }
    }
}

async fn connect(
    client: &mut Client,
    token: Option<String>,
    resume: Option<Resume>,
) -> Result<Connected> {
    let id = client.fresh_id();
    let msg = ClientMessage::Connect(Connect {
        id,
        token,
        resume,
        ..Connect::default()
    });
    match client.request(&msg, id).await? {
        ServerMessage::Connected(c) => Ok(c),
        other => bail!("expected connected, got {}", kind(&other)),
    }
}

async fn subscribe(
    client: &mut Client,
    channel: &ChannelName,
    since: Option<StreamPosition>,
) -> Result<tether_protocol::Subscribed> {
    let id = client.fresh_id();
    let msg = ClientMessage::Subscribe(Subscribe {
        id,
        channel: channel.clone(),
        since,
    });
    match client.request(&msg, id).await? {
        ServerMessage::Subscribed(s) => Ok(s),
        other => bail!("expected subscribed, got {}", kind(&other)),
    }
}

/// What the publisher did.
#[derive(Debug, Default)]
struct Published {
    accepted: u64,
    failed: u64,
    retried: u64,
    errors: BTreeMap<String, u64>,
}

/// Publishes at the fixed rate, recording every accepted answer.
async fn publish(
    http: reqwest::Client,
    opts: Arc<ChurnOptions>,
    channels: Arc<Vec<ChannelName>>,
    ledger: Arc<Mutex<Ledger>>,
    tally: Arc<Tally>,
    run_id: u64,
) -> Result<Published> {
    let total = (opts.rate * opts.duration.as_secs_f64()).round().max(1.0) as u64;
    let schedule = crate::publisher::Schedule::new(opts.rate);
    let in_flight = Arc::new(Semaphore::new(PUBLISH_IN_FLIGHT));
    let pad = Arc::new("x".repeat(opts.payload));
    let mut tasks = JoinSet::new();
    for k in 0..total {
        // Latency is measured from when publication k was due.
        let due_us = schedule.wait(k).await;
        let permit = in_flight.clone().acquire_owned().await?;
        let (http, opts, channels, ledger, pad, tally) = (
            http.clone(),
            opts.clone(),
            channels.clone(),
            ledger.clone(),
            pad.clone(),
            tally.clone(),
        );
        tasks.spawn(async move {
            let channel = &channels[(k % channels.len() as u64) as usize];
            let body = json!({
                "channel": channel.as_str(),
                "idempotency_key": format!("loadtest-{run_id}-{k}"),
                "data": {"sent_us": due_us, "k": k, "pad": &*pad},
            });
            let mut last_error = String::new();
            for attempt in 0..PUBLISH_ATTEMPTS {
                let api = &opts.apis[(k as usize + attempt) % opts.apis.len()];
                match post(&http, api, &body).await {
                    Ok((epoch, offset)) => {
                        ledger.lock().unwrap_or_else(|p| p.into_inner()).record(
                            channel.clone(),
                            epoch,
                            offset,
                        );
                        tally.published.fetch_add(1, Ordering::Relaxed);
                        drop(permit);
                        return (attempt, Ok(()));
                    }
                    Err(e) => last_error = format!("{e:#}"),
                }
            }
            tally.publish_failed.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            (PUBLISH_ATTEMPTS - 1, Err(last_error))
        });
    }
    let mut out = Published::default();
    while let Some(joined) = tasks.join_next().await {
        let (retries, result) = joined.context("a publish task failed")?;
        out.retried += retries as u64;
        match result {
            Ok(()) => out.accepted += 1,
            Err(e) => {
                out.failed += 1;
                *out.errors.entry(e).or_default() += 1;
            }
        }
    }
    Ok(out)
}

async fn post(http: &reqwest::Client, api: &Url, body: &Value) -> Result<(Epoch, u64)> {
    let answer = crate::publisher::post_json(http, api.join("/v1/publish")?, body).await?;
    let epoch = answer["epoch"].as_str().context("answer without epoch")?;
    let offset = answer["offset"].as_u64().context("answer without offset")?;
    Ok((Epoch::new(epoch), offset))
}

/// What a worker of a `--workers` run counted, for the leader to add up
/// (with the histogram and CPU time in its [`Part`]).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Figures {
    connected: u64,
    connect_failures: u64,
    drops: u64,
    reconnects: u64,
    reconnect_attempts_failed: u64,
    resumed: u64,
    fresh_sessions: u64,
    recovered: u64,
    not_recovered: u64,
    caught_up: u64,
    disconnected_at_end: u64,
    server_closes: Vec<(Option<u16>, u64)>,
    failures: BTreeMap<String, u64>,
    node_online: Vec<i64>,
    node_ended: Vec<u64>,
    verdict: Verdict,
}

impl Figures {
    fn of(tally: &Tally, disconnected_at_end: u64, verdict: Verdict) -> Figures {
        let get = Tally::get;
        Figures {
            connected: get(&tally.connected),
            connect_failures: get(&tally.connect_failures),
            drops: get(&tally.drops),
            reconnects: get(&tally.reconnects),
            reconnect_attempts_failed: get(&tally.reconnect_attempts_failed),
            resumed: get(&tally.resumed),
            fresh_sessions: get(&tally.fresh_sessions),
            recovered: get(&tally.recovered),
            not_recovered: get(&tally.not_recovered),
            caught_up: get(&tally.caught_up),
            disconnected_at_end,
            server_closes: tally
                .server_closes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, n)| (*k, *n))
                .collect(),
            failures: tally
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            node_online: tally
                .node_online
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect(),
            node_ended: tally.node_ended.iter().map(Tally::get).collect(),
            verdict,
        }
    }

    /// Adds another worker's figures.
    fn absorb(&mut self, o: Figures) {
        self.connected += o.connected;
        self.connect_failures += o.connect_failures;
        self.drops += o.drops;
        self.reconnects += o.reconnects;
        self.reconnect_attempts_failed += o.reconnect_attempts_failed;
        self.resumed += o.resumed;
        self.fresh_sessions += o.fresh_sessions;
        self.recovered += o.recovered;
        self.not_recovered += o.not_recovered;
        self.caught_up += o.caught_up;
        self.disconnected_at_end += o.disconnected_at_end;
        let mut closes: BTreeMap<Option<u16>, u64> = self.server_closes.drain(..).collect();
        for (k, n) in o.server_closes {
            *closes.entry(k).or_default() += n;
        }
        self.server_closes = closes.into_iter().collect();
        for (k, n) in o.failures {
            *self.failures.entry(k).or_default() += n;
        }
        for (i, n) in o.node_online.into_iter().enumerate() {
            if let Some(m) = self.node_online.get_mut(i) {
                *m += n;
            }
        }
        for (i, n) in o.node_ended.into_iter().enumerate() {
            if let Some(m) = self.node_ended.get_mut(i) {
                *m += n;
            }
        }
        self.verdict.absorb(o.verdict);
    }
}

pub async fn run(opts: ChurnOptions, mut role: Role, share: Share) -> Result<Report> {
    if opts.clients == 0 || opts.channels == 0 {
        bail!("--clients and --channels must be at least 1");
    }
    if opts.transport.nodes() == 0 || opts.apis.is_empty() {
        bail!("at least one --url and one --api are needed");
    }
    for (v, what) in [(opts.rate, "--rate"), (opts.connect_rate, "--connect-rate")] {
        if !v.is_finite() || v <= 0.0 {
            bail!("{what} must be a number above 0");
        }
    }
    if !opts.drop_rate.is_finite() || opts.drop_rate < 0.0 {
        bail!("--drop-rate must be 0 or more");
    }
    let leader = !role.is_member();
    let http = crate::publisher::api_client(opts.api_key.as_deref(), PUBLISH_IN_FLIGHT)?;
    if leader {
        for api in &opts.apis {
            crate::publisher::check_ready(&http, api).await?;
        }
    }
    // This worker's clients (all of them without --workers), and its part
    // of the rates.
    let mine = share.range(opts.clients);
    let connect_rate = share.rate(opts.connect_rate);
    let channels: Arc<Vec<ChannelName>> = Arc::new(
        (0..opts.channels)
            .map(|c| ChannelName::new(format!("{}{c}", opts.channel_prefix)))
            .collect::<Result<_, _>>()?,
    );
    let opts = Arc::new(opts);
    let token_life = opts.duration + opts.drain_timeout + Duration::from_secs(3600);
    let template = Arc::new(report::latency_histogram::<u32>()?);
    let tally = Arc::new(Tally::new(&template, opts.transport.nodes()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (targets_tx, targets_rx) = watch::channel::<Targets>(None);
    let mut drops = Vec::with_capacity(mine.len());
    let mut handles = Vec::with_capacity(mine.len());
    let setup_started = Instant::now();
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / connect_rate));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in mine.clone() {
        pace.tick().await;
        let drop_now = Arc::new(Notify::new());
        drops.push(drop_now.clone());
        let ctx = ClientCtx {
            index: i,
            channel: channels[i % channels.len()].clone(),
            jwt: opts
                .signer
                .as_ref()
                .map(|s| s.mint(i, token_life))
                .transpose()?,
            opts: opts.clone(),
            tally: tally.clone(),
            stop: stop_rx.clone(),
            targets: targets_rx.clone(),
            drop_now,
        };
        handles.push(tokio::spawn(ctx.run(template.clone())));
    }
    // Everyone subscribed (or given up on) before the measured part starts.
    let setup_deadline = Instant::now() + Duration::from_secs(60);
    while Tally::get(&tally.connected) + Tally::get(&tally.connect_failures) < mine.len() as u64
        && Instant::now() < setup_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected = Tally::get(&tally.connected);
    // Step 1: every worker's clients in; then the leader publishes.
    let mut settled = Part::new()?;
    settled.established = connected;
    settled.failed = Tally::get(&tally.connect_failures);
    settled.reasons = tally
        .failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let all_connected = match role.step(settled).await? {
        Ok(all) => {
            if all.established == 0 {
                match all.top_reasons().first() {
                    Some((reason, n)) => bail!("no client could connect: {n} × {reason}"),
                    None => bail!("no client could connect"),
                }
            }
            role.tell(&json!({"go": true})).await?;
            all.established
        }
        Err(_) => connected,
    };
    let setup = setup_started.elapsed();
    tracing::info!(
        "{}: {all_connected} clients in {:.1} s; publishing {}/s for {:.0} s, dropping {}/s",
        opts.mode.name(),
        setup.as_secs_f64(),
        opts.rate,
        opts.duration.as_secs_f64(),
        opts.drop_rate
    );

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let run_id = unix_micros();
    let own_cpu0 = proc::cpu_time(Pid::Current)?;
    let t0 = Instant::now();
    let publisher = leader.then(|| {
        tokio::spawn(publish(
            http,
            opts.clone(),
            channels.clone(),
            ledger.clone(),
            tally.clone(),
            run_id,
        ))
    });
    let origin_us = unix_micros();
    let faults = leader.then(|| crate::faults::Schedule::start(opts.faults.clone(), t0));
    let progress = tokio::spawn(progress(
        tally.clone(),
        stop_rx.clone(),
        opts.mode.name(),
        share.index,
    ));
    let memory = match &opts.mode {
        Mode::Soak(soak) if leader => Some(tokio::spawn(sample_memory(
            soak.clone(),
            opts.apis.clone(),
            opts.api_key.clone(),
            stop_rx.clone(),
        ))),
        _ => None,
    };
    // The dropper: round-robin at --drop-rate, and the storm.
    let dropper = {
        let (opts, drops) = (opts.clone(), drops.clone());
        tokio::spawn(async move {
            let end = Instant::now() + opts.duration;
            let mut storm = opts.storm_at.map(|s| Instant::now() + s);
            let drop_rate = share.rate(opts.drop_rate);
            let period = (drop_rate > 0.0).then(|| Duration::from_secs_f64(1.0 / drop_rate));
            let mut next = period.map(|p| Instant::now() + p);
            let mut k = 0usize;
            loop {
                let wake = [next, storm, Some(end)].into_iter().flatten().min();
                let Some(wake) = wake else { break };
                tokio::time::sleep_until(wake.into()).await;
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if storm.is_some_and(|s| now >= s) {
                    storm = None;
                    for d in &drops {
                        d.notify_one();
                    }
                }
                if let (Some(n), Some(p)) = (next, period)
                    && now >= n
                {
                    drops[k % drops.len()].notify_one();
                    k += 1;
                    next = Some(n + p);
                }
            }
        })
    };
    let published = match publisher {
        Some(p) => p.await.context("the publisher failed")??,
        // A member's clients go on receiving (and dropping) meanwhile.
        None => {
            tokio::time::sleep(opts.duration).await;
            Published::default()
        }
    };
    dropper.abort();
    let publish_time = t0.elapsed();
    // Step 2: the leader's ledger to every worker, to drain and check by.
    match role.step(Part::new()?).await? {
        Ok(_) => {
            let sent = {
                let l = ledger.lock().unwrap_or_else(|p| p.into_inner());
                serde_json::to_value(&*l)?
            };
            role.tell(&json!({ "ledger": sent })).await?;
        }
        Err(mut word) => {
            let theirs: Ledger =
                serde_json::from_value(word["ledger"].take()).context("the leader's ledger")?;
            *ledger.lock().unwrap_or_else(|p| p.into_inner()) = theirs;
        }
    }

    // Drain: until every connected client has its channel's last offset.
    let targets: HashMap<ChannelName, (Epoch, u64)> = {
        let l = ledger.lock().unwrap_or_else(|p| p.into_inner());
        channels
            .iter()
            .filter_map(|c| l.latest(c).map(|p| (c.clone(), p)))
            .collect()
    };
    let _ = targets_tx.send(Some(Arc::new(targets)));
    let drain_deadline = Instant::now() + opts.drain_timeout;
    while Tally::get(&tally.caught_up) < connected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let window = t0.elapsed();
    let own_cpu = proc::cpu_time(Pid::Current)?.saturating_sub(own_cpu0);
    let _ = stop_tx.send(true);
    let faults = faults
        .map(crate::faults::Schedule::finish)
        .unwrap_or_default();
    let seconds = progress.await.context("the progress task failed")??;
    let memory = match memory {
        Some(m) => Some(m.await.context("the memory sampler failed")??),
        None => None,
    };
    let mut outcomes = Vec::with_capacity(handles.len());
    for h in handles {
        outcomes.push(h.await.context("a client task failed")?);
    }

    let mut latency = report::latency_histogram::<u64>()?;
    let mut disconnected_at_end = 0u64;
    for o in &outcomes {
        report::merge_into(&mut latency, &o.latency);
        disconnected_at_end += u64::from(o.disconnected_at_end);
    }
    let (verdict, distinct) = {
        let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
        let v = Verdict::of(&mut l, outcomes.iter().filter_map(|o| o.trail.as_ref()));
        (v, l.accepted())
    };
    // Step 3: every worker's figures to the leader.
    let mut part = Part::new()?;
    part.latency = latency;
    part.seconds = seconds;
    part.cpu_us = u64::try_from(own_cpu.as_micros()).unwrap_or(u64::MAX);
    let figures = Figures::of(&tally, disconnected_at_end, verdict);
    if role.is_member() {
        part.extras.push(serde_json::to_value(&figures)?);
        role.last(part).await?;
        return Ok(Report::new(opts.mode.name()));
    }
    let Some(total) = role.last(part).await? else {
        return Ok(Report::new(opts.mode.name()));
    };
    let mut f = figures;
    for extra in total.extras {
        f.absorb(serde_json::from_value(extra).context("a worker's figures")?);
    }
    let latency = total.latency;
    let own_cpu = Duration::from_micros(total.cpu_us);
    let verdict = std::mem::take(&mut f.verdict);
    let connected = f.connected;

    let mut r = Report::new(opts.mode.name());
    opts.transport.describe(opts.encoding, &mut r);
    r.count(
        "clients_requested",
        "clients requested",
        opts.clients as u64,
    );
    r.count("clients", "clients connected and subscribed", connected);
    r.count(
        "connect_failures",
        "clients whose first connection failed",
        f.connect_failures,
    );
    r.count("channels", "channels", opts.channels as u64);
    r.number(
        "setup_seconds",
        "time to connect them all",
        setup.as_secs_f64(),
        "s",
        2,
    );
    r.number("rate_target", "publication rate asked", opts.rate, "/s", 1);
    r.count("publications", "publications accepted", published.accepted);
    r.count("ledger_offsets", "distinct offsets in the ledger", distinct);
    r.count(
        "publish_failures",
        "publications failed (after retries)",
        published.failed,
    );
    r.count(
        "publish_retries",
        "publish requests retried on another node",
        published.retried,
    );
    if let Some((reason, n)) = published.errors.iter().max_by_key(|(_, n)| **n) {
        r.text(
            "top_publish_failure",
            "most frequent publish failure",
            format!("{n} × {reason}"),
        );
    }
    r.number(
        "publish_seconds",
        "publishing time",
        publish_time.as_secs_f64(),
        "s",
        2,
    );
    r.number(
        "drop_rate",
        "drops asked per second",
        opts.drop_rate,
        "/s",
        1,
    );
    r.text(
        "drop_mode",
        "how a drop leaves the connection",
        match opts.drop_mode {
            DropMode::Close => "close (no goodbye)",
            DropMode::Silent => "silent (left open, unread, while the client resumes elsewhere)",
        },
    );
    r.count("drops", "connections dropped abruptly", f.drops);
    let (closes, close_codes) =
        report::tallied_close_codes(&f.server_closes.iter().copied().collect());
    r.count(
        "server_closes",
        "connections ended by the server or network",
        closes,
    );
    r.text("server_close_codes", "their close codes", close_codes);
    r.count("reconnects", "reconnections", f.reconnects);
    r.count(
        "reconnect_failures",
        "reconnection attempts failed (retried)",
        f.reconnect_attempts_failed,
    );
    if let Some((reason, n)) = f.failures.iter().max_by_key(|(_, n)| **n) {
        r.text(
            "top_reconnect_failure",
            "most frequent reconnect failure",
            format!("{n} × {reason}"),
        );
    }
    r.count("resumed", "sessions resumed (resumed: true)", f.resumed);
    r.count(
        "fresh_sessions",
        "resumes refused (fresh session, subscribe with since)",
        f.fresh_sessions,
    );
    r.count("recovered", "recoveries with recovered: true", f.recovered);
    r.count(
        "not_recovered",
        "recoveries with recovered: false",
        f.not_recovered,
    );
    r.count(
        "caught_up",
        "clients that got their channel's last offset",
        f.caught_up,
    );
    r.count(
        "disconnected_at_end",
        "clients still reconnecting at the end",
        f.disconnected_at_end,
    );
    add_verdict(&mut r, &verdict);
    r.number(
        "window_seconds",
        "measured window (first publish → drained)",
        window.as_secs_f64(),
        "s",
        2,
    );
    r.number(
        "deliveries_per_second",
        "deliveries per second",
        verdict.delivered as f64 / window.as_secs_f64().max(1e-9),
        "/s",
        0,
    );
    Latency::of(&latency).add_to(
        &mut r,
        [
            "latency_p50_ms",
            "latency_p90_ms",
            "latency_p99_ms",
            "latency_p999_ms",
            "latency_max_ms",
        ],
        [
            "publish→deliver p50 (live)",
            "publish→deliver p90 (live)",
            "publish→deliver p99 (live)",
            "publish→deliver p99.9 (live)",
            "publish→deliver max (live)",
        ],
    );
    report::own_cpu(&mut r, own_cpu, window);
    let nodes = opts.transport.nodes();
    if nodes > 1 {
        let per_node: Vec<String> = (0..nodes)
            .map(|i| {
                format!(
                    "node {i} {}: {} on it at the end, {} connections ended",
                    opts.transport.node_name(i),
                    f.node_online[i],
                    f.node_ended[i]
                )
            })
            .collect();
        r.value(
            "nodes_detail",
            "per node",
            Value::Array(
                (0..nodes)
                    .map(|i| {
                        json!({
                            "url": opts.transport.node_name(i),
                            "online_at_end": f.node_online[i],
                            "connections_ended": f.node_ended[i],
                        })
                    })
                    .collect(),
            ),
            per_node.join("; "),
        );
    }
    let timeline = Timeline::of(total.seconds);
    if let Some(samples) = &memory {
        add_drift(&mut r, samples, &timeline.to_vec());
    }
    crate::faults::add_to(&mut r, &faults)?;
    let title = format!(
        "loadtest {}: {connected} clients, {} channels, {}/s, {} drops/s",
        opts.mode.name(),
        opts.channels,
        opts.rate,
        opts.drop_rate
    );
    let picture = opts.plot.as_deref().map(|p| {
        let s = crate::plot::Series::of_seconds(&title, &latency, timeline.points(origin_us));
        (p, s.marked(crate::faults::marks(&faults)))
    });
    timeline.add_to(
        &mut r,
        origin_us,
        ("deliveries_per_second", "online"),
        "progress samples (one a second, all workers)",
        picture,
    )?;
    Ok(r)
}

/// One line a second on stderr while the run goes on (this worker's
/// clients); the seconds for the report's `timeline`, which the leader
/// merges with the members' ([`crate::timeline`]).
async fn progress(
    tally: Arc<Tally>,
    mut stop: watch::Receiver<bool>,
    name: &'static str,
    worker: usize,
) -> Result<Vec<Second>> {
    let started = Instant::now();
    let mut ticker = Ticker::new();
    let mut last_delivered = 0u64;
    let mut out = Vec::new();
    let live = crate::live::Live::new(worker);
    loop {
        // The stop ends a last, partial second: every delivery is in one.
        let (unix_s, last) = tokio::select! {
            s = ticker.tick() => (s, false),
            _ = stop.wait_for(|s| *s) => (unix_micros() / 1_000_000 + 1, true),
        };
        let delivered = Tally::get(&tally.delivered);
        let mut s = Second::new(
            unix_s,
            delivered.saturating_sub(last_delivered),
            tally.online.load(Ordering::Relaxed),
            &tally.window_take()?,
        );
        last_delivered = delivered;
        for (key, c) in [
            ("published", &tally.published),
            ("publish_failed", &tally.publish_failed),
            ("drops", &tally.drops),
            ("reconnects", &tally.reconnects),
        ] {
            s.totals.insert(key.to_owned(), Tally::get(c));
        }
        if tally.node_online.len() > 1 {
            s.per_node = tally
                .node_online
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect();
        }
        let total = |k: &str| s.totals.get(k).copied().unwrap_or(0);
        live.line(&format!(
            "{name} {:>4.0}s: {} online{}, {} deliveries/s, p99 {}, {} published ({} failed), {} drops, {} reconnects",
            started.elapsed().as_secs_f64(),
            s.online,
            if s.per_node.is_empty() {
                String::new()
            } else {
                format!(" {:?}", s.per_node)
            },
            s.count,
            s.p99_us().map_or_else(
                || "-".to_owned(),
                |us| format!("{:.1} ms", us as f64 / 1000.0)
            ),
            total("published"),
            total("publish_failed"),
            total("drops"),
            total("reconnects")
        ));
        crate::timeline::push(&mut out, s);
        if last {
            return Ok(out);
        }
    }
}

/// One reading of the broker's resident memory (all nodes summed).
#[derive(Debug, Clone, Copy)]
struct MemorySample {
    at: Duration,
    bytes: u64,
}

/// Samples the nodes' memory every `sample_every` until the run stops: from
/// /proc for the PIDs given, else each API's GET /metrics. A reading with a
/// node missing is skipped (a killed node), never summed short.
async fn sample_memory(
    soak: Soak,
    apis: Vec<Url>,
    api_key: Option<String>,
    mut stop: watch::Receiver<bool>,
) -> Result<Vec<MemorySample>> {
    let http = crate::publisher::api_client(api_key.as_deref(), 4)?;
    let started = Instant::now();
    let mut tick = tokio::time::interval(soak.sample_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return Ok(out),
        }
        let reading = if soak.broker_pids.is_empty() {
            let mut sum = Some(0u64);
            for api in &apis {
                let bytes = proc::metrics_rss(&http, api).await;
                sum = sum.zip(bytes).map(|(a, b)| a + b);
            }
            sum
        } else {
            soak.broker_pids
                .iter()
                .map(|p| proc::rss_bytes(Pid::Other(*p)).ok())
                .sum::<Option<u64>>()
        };
        match reading {
            Some(bytes) => out.push(MemorySample {
                at: started.elapsed(),
                bytes,
            }),
            None => tracing::warn!("a memory reading failed (a node down?); skipped"),
        }
    }
}

/// Least-squares slope of bytes over time, in bytes per second.
fn slope(samples: &[MemorySample]) -> Option<f64> {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return None;
    }
    let mean_t = samples.iter().map(|s| s.at.as_secs_f64()).sum::<f64>() / n;
    let mean_b = samples.iter().map(|s| s.bytes as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        let dt = s.at.as_secs_f64() - mean_t;
        num += dt * (s.bytes as f64 - mean_b);
        den += dt * dt;
    }
    (den > 0.0).then(|| num / den)
}

/// The median of the per-second p99s in a slice of the timeline, in ms.
fn median_p99_ms(samples: &[&Second]) -> Option<f64> {
    let mut v: Vec<u64> = samples.iter().filter_map(|s| s.p99_us()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[v.len() / 2] as f64 / 1000.0)
}

/// Soak's drift figures: memory at the start and end and its growth per
/// hour, p99 over the first and the last tenth of the run.
fn add_drift(r: &mut Report, memory: &[MemorySample], timeline: &[&Second]) {
    r.count(
        "memory_samples",
        "broker memory samples",
        memory.len() as u64,
    );
    match (memory.first(), memory.last()) {
        (Some(first), Some(last)) => {
            r.bytes(
                "memory_start_bytes",
                "broker memory at the start",
                first.bytes as f64,
            );
            r.bytes(
                "memory_end_bytes",
                "broker memory at the end",
                last.bytes as f64,
            );
            r.number(
                "memory_growth_bytes",
                "broker memory growth, start to end",
                last.bytes as f64 - first.bytes as f64,
                "B",
                0,
            );
        }
        _ => r.missing("memory_start_bytes", "broker memory", "no sample"),
    }
    match slope(memory) {
        Some(per_second) => r.number(
            "memory_growth_mb_per_hour",
            "broker memory growth (least squares)",
            per_second * 3600.0 / (1024.0 * 1024.0),
            "MiB/h",
            2,
        ),
        None => r.missing(
            "memory_growth_mb_per_hour",
            "broker memory growth",
            "fewer than two samples",
        ),
    }
    // Of the seconds with live deliveries: the last, partial second (after
    // the drain) or a second of a node's outage may have none.
    let live: Vec<&Second> = timeline
        .iter()
        .copied()
        .filter(|s| s.p99_us().is_some())
        .collect();
    let tenth = live.len().div_ceil(10).max(1);
    let head = &live[..tenth.min(live.len())];
    let tail = &live[live.len().saturating_sub(tenth)..];
    for (key, label, part) in [
        (
            "p99_first_tenth_ms",
            "p99 over the first tenth (median of seconds)",
            head,
        ),
        (
            "p99_last_tenth_ms",
            "p99 over the last tenth (median of seconds)",
            tail,
        ),
    ] {
        match median_p99_ms(part) {
            Some(ms) => r.number(key, label, ms, "ms", 2),
            None => r.missing(key, label, "no live deliveries"),
        }
    }
    r.value(
        "memory",
        "memory samples",
        Value::Array(
            memory
                .iter()
                .map(|m| json!({"t": (m.at.as_secs_f64() * 10.0).round() / 10.0, "bytes": m.bytes}))
                .collect(),
        ),
        format!("{} (in the JSON report)", memory.len()),
    );
}

/// The ledger's rows, per channel and in total, and its violations.
pub fn add_verdict(r: &mut Report, v: &Verdict) {
    r.count("deliveries", "deliveries received", v.delivered);
    r.count("duplicated", "deliveries duplicated", v.duplicated);
    r.count("reordered", "deliveries out of order", v.reordered);
    r.count(
        "declared_lost",
        "declared lost (recovered: false, new epoch)",
        v.declared_lost,
    );
    r.count("silently_lost", "silently lost", v.silently_lost);
    r.count("unexpected", "deliveries not in the ledger", v.unexpected);
    r.count(
        "epoch_changes",
        "live subscriptions that saw a new epoch",
        v.epoch_changes,
    );
    let per_channel: serde_json::Map<String, Value> = v
        .channels
        .iter()
        .map(|(c, cv)| {
            (
                c.as_str().to_owned(),
                json!({
                    "delivered": cv.delivered,
                    "duplicated": cv.duplicated,
                    "reordered": cv.reordered,
                    "declared_lost": cv.declared_lost,
                    "silently_lost": cv.silently_lost,
                }),
            )
        })
        .collect();
    let bad: Vec<String> = v
        .channels
        .iter()
        .filter(|(_, cv)| cv.silently_lost + cv.duplicated + cv.reordered > 0)
        .take(10)
        .map(|(c, cv)| {
            format!(
                "{c}: {} lost, {} duplicated, {} reordered",
                cv.silently_lost, cv.duplicated, cv.reordered
            )
        })
        .collect();
    let text = if bad.is_empty() {
        format!("{} channels, none with a violation", v.channels.len())
    } else {
        bad.join("; ")
    };
    r.value(
        "per_channel",
        "per channel",
        Value::Object(per_channel),
        text,
    );
    if !v.clean() {
        for line in v.violations() {
            r.violation(line);
        }
    }
}

impl Tally {
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_growth_is_the_least_squares_slope() {
        let at = |s: u64, bytes: u64| MemorySample {
            at: Duration::from_secs(s),
            bytes,
        };
        // 1 KiB a second; the middle reading's noise does not tilt the line.
        let samples = [at(0, 1000), at(10, 11_240 + 100), at(20, 21_480)];
        let per_second = slope(&samples).expect("in a test");
        assert!((per_second - 1024.0).abs() < 1e-6, "{per_second}");
        assert_eq!(slope(&samples[..1]), None);
        assert_eq!(slope(&[at(5, 1), at(5, 2)]), None, "no time between them");
    }
}
