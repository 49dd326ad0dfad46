//! Scenario `resume`: many clients dropped at once and resumed.
//!
//! 1. Opens `--clients` clients, WebSocket or QUIC (paced by
//!    `--connect-rate`); client
//!    `i` connects, subscribes to its own channel `resume:<i>` and keeps the
//!    `resume_token` of its `connected`.
//! 2. Drops them all at once: the sockets are simply closed, with no
//!    WebSocket close handshake (over QUIC the connections are dropped,
//!    which sends only QUIC's own CONNECTION_CLOSE), as when a network
//!    goes away.
//! 3. Polls `GET /metrics` until the broker counts no connection of the
//!    transport (`tether_connections{transport="ws"} 0`, or `"quic"`), at
//!    most `--drop-timeout`.
//! 4. Publishes `--missed` messages to every client's channel through
//!    `POST /v1/publish/batch` (`--batch` per request; a client's messages
//!    all in one request, so their offsets are in order).
//! 5. Reconnects every client as fast as allowed (`--reconnect-rate`,
//!    `--reconnect-concurrency` attempts from TCP connect to `connected` in
//!    flight at once) with `connect` carrying `resume: {token}`. Each must
//!    get `connected` with `resumed: true` and its channel `recovered:
//!    true`, then exactly the missed offsets, in order, once each; clients
//!    stay connected (answering pings) until every one is done, so that a
//!    late duplicate is seen too.
//!
//! With `--workers N` each worker opens its share of the clients; they all
//! drop on the leader's word, the leader (which alone talks to the API)
//! waits for the broker to see them go and publishes what every worker's
//! clients miss (the members send it their clients' channels and offsets;
//! the resume tokens stay with them), then each worker reconnects its own
//! at its share of `--reconnect-rate` and `--reconnect-concurrency`, and
//! the leader adds up their figures (times as Unix µs, the connect times'
//! histograms merged).
//!
//! Reported: clients resumed, failures by reason, messages lost and
//! duplicated, the time from the first reconnect attempt to the last
//! `connected` (and to the last missed message), and the distribution of
//! one client's connect (TCP and WebSocket, or QUIC, handshake included)
//! → `connected` time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::Url;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tether_protocol::{ChannelName, ClientMessage, Connect, Epoch, Resume, ServerMessage};
use tokio::sync::{Semaphore, watch};

use crate::auth::{FLEET_TOKEN_LIFE, Signer};
use crate::client::{Client, Event, kind};
use crate::crew::{Part, Role, Share};
use crate::fleet::{self, Fleet, FleetOptions, Transport};
use crate::proc::{self, Brokers, Pid};
use crate::publisher::{self};
use crate::report::{Latency, Report};
use crate::timeline::{Second, Ticker, Timeline, Window};

mod missed;

use missed::{publish_missed, wait_gone};

#[derive(Debug, Clone)]
pub struct ResumeOptions {
    pub api: Url,
    pub clients: usize,
    /// Messages published to each channel while its client is away.
    pub missed: usize,
    pub payload: usize,
    /// Publications per batch request.
    pub batch: usize,
    pub reconnect_rate: f64,
    pub reconnect_concurrency: usize,
    pub drop_timeout: Duration,
    pub message_timeout: Duration,
    pub broker_pids: Vec<u32>,
    pub channel_prefix: String,
    /// Key the backend API requires.
    pub api_key: Option<String>,
    /// Draw the reconnect wave here (SVG).
    pub plot: Option<std::path::PathBuf>,
}

/// The most publications one batch request may carry (PROTOCOL.md §10).
const MAX_BATCH: usize = 1000;

/// Batch requests in flight at once while publishing the missed messages.
const PUBLISH_IN_FLIGHT: usize = 4;

/// A client that was connected and subscribed, then dropped.
#[derive(Debug, Clone)]
struct Away {
    index: usize,
    channel: ChannelName,
    token: String,
    /// The channel's latest offset when the client subscribed.
    base: u64,
}

/// What one reconnecting client saw.
#[derive(Debug, Default)]
struct Back {
    /// When its first reconnect attempt started (after the pacing slot and
    /// the concurrency permit).
    first_attempt: Option<Instant>,
    connected_at: Option<Instant>,
    /// First attempt → `connected` (retries included).
    latency: Option<Duration>,
    /// When the last missed message arrived.
    complete_at: Option<Instant>,
    retries: u64,
    /// Why this client does not count as resumed, if it does not.
    failure: Option<String>,
    /// Distinct missed offsets received.
    received: u64,
    /// Deliveries of an offset already received.
    duplicates: u64,
    /// Deliveries arriving after a higher offset (reordered).
    reordered: u64,
    /// Deliveries outside the missed offsets, or of another epoch.
    unexpected: u64,
}

/// Phase 1's client: holds the connection, answering pings, until the
/// fleet stops; then drops the socket without a close handshake and
/// returns what is needed to resume.
async fn hold_then_drop(mut client: Client, mut ready: fleet::Ready) -> Option<Away> {
    loop {
        tokio::select! {
            _ = ready.stopped() => {
                drop(client);
                return Some(Away {
                    index: ready.index,
                    channel: ready.subscribed.channel.clone(),
                    token: ready.connected.resume_token.clone(),
                    base: ready.subscribed.offset.0,
                });
            }
            ev = client.next_event() => match ev {
                Ok(Event::Message(_) | Event::Other(_)) => {}
                Ok(Event::Closed(_)) | Err(_) => {
                    ready.dropped();
                    return None;
                }
            },
        }
    }
}

/// How the reconnect wave runs.
#[derive(Debug)]
struct Wave {
    transport: Transport,
    encoding: tether_protocol::Encoding,
    source_ips: Vec<std::net::IpAddr>,
    retries: u32,
    attempt_timeout: Duration,
    missed: u64,
    message_timeout: Duration,
    permits: Semaphore,
    /// Clients done with their missed messages (or failed).
    settled: AtomicU64,
    /// Mints the token of the client's user again (auth configured).
    signer: Option<Signer>,
    /// Clients connected again so far, and their connect times since the
    /// last tick.
    connected: AtomicU64,
    window: Window,
}

impl Wave {
    fn note_connected(&self, took: Duration) {
        self.connected.fetch_add(1, Ordering::Relaxed);
        self.window.record(took);
    }

    /// This second of the wave: clients connected in it, connected in all,
    /// their connect times; the total settled.
    fn second(&self, unix_s: u64, last_connected: &mut u64) -> Result<Second> {
        let connected = self.connected.load(Ordering::Relaxed);
        let mut s = Second::new(
            unix_s,
            connected.saturating_sub(*last_connected),
            i64::try_from(connected).unwrap_or(i64::MAX),
            &self.window.take()?,
        );
        *last_connected = connected;
        s.totals
            .insert("settled".into(), self.settled.load(Ordering::Relaxed));
        Ok(s)
    }
}

/// One attempt: TCP connect, upgrade, `connect` with the resume token,
/// `connected`.
async fn resume_once(
    wave: &Wave,
    away: &Away,
    source: Option<std::net::IpAddr>,
) -> Result<(Client, tether_protocol::Connected)> {
    let token = wave
        .signer
        .as_ref()
        .map(|s| s.mint(away.index, FLEET_TOKEN_LIFE))
        .transpose()?;
    let mut client = wave
        .transport
        .open_on(0, away.index, source, wave.encoding)
        .await?;
    let id = client.fresh_id();
    let connect = ClientMessage::Connect(Connect {
        id,
        token,
        resume: Some(Resume {
            token: away.token.clone(),
            channels: None,
        }),
        ..Connect::default()
    });
    match client.request(&connect, id).await? {
        ServerMessage::Connected(c) => Ok((client, c)),
        other => bail!("expected connected, got {}", kind(&other)),
    }
}

/// Reconnects one client and checks what it gets; holds the connection
/// until `stop`.
async fn reconnect(
    wave: Arc<Wave>,
    away: Away,
    slot: Instant,
    mut stop: watch::Receiver<bool>,
) -> Back {
    let mut back = Back::default();
    let settle = |back: Back| {
        wave.settled.fetch_add(1, Ordering::Relaxed);
        back
    };
    tokio::time::sleep_until(slot.into()).await;
    let source =
        (!wave.source_ips.is_empty()).then(|| wave.source_ips[away.index % wave.source_ips.len()]);
    let (mut client, connected) = {
        let Ok(_permit) = wave.permits.acquire().await else {
            back.failure = Some("the run was abandoned".into());
            return settle(back);
        };
        let first = Instant::now();
        back.first_attempt = Some(first);
        let mut attempt = 0;
        loop {
            let once =
                tokio::time::timeout(wave.attempt_timeout, resume_once(&wave, &away, source));
            let result = match once.await {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!(
                    "resume took longer than {:?}",
                    wave.attempt_timeout
                )),
            };
            match result {
                Ok(ok) => {
                    let now = Instant::now();
                    back.connected_at = Some(now);
                    back.latency = Some(now - first);
                    wave.note_connected(now - first);
                    break ok;
                }
                Err(e) if attempt >= wave.retries => {
                    back.failure = Some(fleet::failure_reason(&e));
                    return settle(back);
                }
                Err(_) => {
                    back.retries += 1;
                    tokio::time::sleep(fleet::backoff(attempt, away.index)).await;
                    attempt += 1;
                }
            }
        }
    };

    let own = connected
        .channels
        .as_ref()
        .and_then(|m| m.get(&away.channel));
    let epoch: Option<Epoch> = match own {
        _ if !connected.resumed => {
            back.failure = Some("connected with resumed: false".into());
            None
        }
        None => {
            back.failure = Some("its channel is missing from connected.channels".into());
            None
        }
        Some(r) if !r.recovered => {
            back.failure = Some("its channel has recovered: false".into());
            None
        }
        Some(r) => Some(r.epoch.clone()),
    };

    // The missed messages, then anything extra until every client is done.
    let first_offset = away.base + 1;
    let last_offset = away.base + wave.missed;
    let mut highest = away.base;
    let mut seen = vec![false; wave.missed as usize];
    let deadline = tokio::time::sleep(wave.message_timeout);
    tokio::pin!(deadline);
    let mut counted = false;
    if wave.missed == 0 || epoch.is_none() {
        wave.settled.fetch_add(1, Ordering::Relaxed);
        counted = true;
    }
    loop {
        let ev = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = &mut deadline, if !counted => {
                back.failure.get_or_insert_with(|| "not every missed message arrived in time".into());
                wave.settled.fetch_add(1, Ordering::Relaxed);
                counted = true;
                continue;
            }
            ev = client.next_event() => ev,
        };
        match ev {
            Ok(Event::Message(p)) if p.channel == away.channel => {
                let o = p.offset.0;
                if Some(&p.epoch) != epoch.as_ref() || !(first_offset..=last_offset).contains(&o) {
                    back.unexpected += 1;
                } else if seen[(o - first_offset) as usize] {
                    back.duplicates += 1;
                } else {
                    seen[(o - first_offset) as usize] = true;
                    back.received += 1;
                    if o < highest {
                        back.reordered += 1;
                    }
                    if back.received == wave.missed && !counted {
                        back.complete_at = Some(Instant::now());
                        wave.settled.fetch_add(1, Ordering::Relaxed);
                        counted = true;
                    }
                }
                highest = highest.max(o);
            }
            Ok(Event::Message(_)) => back.unexpected += 1,
            Ok(Event::Other(_)) => {}
            Ok(Event::Closed(code)) => {
                back.failure
                    .get_or_insert_with(|| format!("closed after connected (code {code:?})"));
                break;
            }
            Err(e) => {
                back.failure.get_or_insert_with(|| {
                    format!("failed after connected: {}", fleet::failure_reason(&e))
                });
                break;
            }
        }
    }
    if !counted {
        wave.settled.fetch_add(1, Ordering::Relaxed);
    }
    if back.failure.is_none() && (back.duplicates > 0 || back.unexpected > 0 || back.reordered > 0)
    {
        back.failure = Some("duplicated, reordered or unexpected messages".into());
    }
    client.close().await;
    back
}

/// What one worker's wave came to, in a form that adds up across workers
/// (its connect latencies travel as the part's histogram).
#[derive(Debug, Default, Serialize, Deserialize)]
struct WaveFigures {
    clients: u64,
    resumed: u64,
    retries: u64,
    received: u64,
    duplicates: u64,
    unexpected: u64,
    reordered: u64,
    reasons: BTreeMap<String, u64>,
    /// Unix µs: the first reconnect attempt, the last `connected`, the
    /// last missed message.
    first_attempt_us: Option<u64>,
    last_connected_us: Option<u64>,
    last_complete_us: Option<u64>,
}

impl WaveFigures {
    fn of(backs: &[Back]) -> WaveFigures {
        // One reading of both clocks for every conversion.
        let (now, now_us) = (Instant::now(), publisher::unix_micros());
        let unix = |i: Instant| {
            let ago = now.saturating_duration_since(i);
            now_us.saturating_sub(u64::try_from(ago.as_micros()).unwrap_or(0))
        };
        let mut f = WaveFigures {
            clients: backs.len() as u64,
            ..WaveFigures::default()
        };
        for b in backs {
            f.first_attempt_us = min_some(f.first_attempt_us, b.first_attempt.map(unix));
            f.last_connected_us = f.last_connected_us.max(b.connected_at.map(unix));
            f.last_complete_us = f.last_complete_us.max(b.complete_at.map(unix));
            f.retries += b.retries;
            f.received += b.received;
            f.duplicates += b.duplicates;
            f.unexpected += b.unexpected;
            f.reordered += b.reordered;
            match &b.failure {
                None => f.resumed += 1,
                Some(reason) => *f.reasons.entry(reason.clone()).or_default() += 1,
            }
        }
        f
    }

    fn absorb(&mut self, o: WaveFigures) {
        self.clients += o.clients;
        self.resumed += o.resumed;
        self.retries += o.retries;
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.unexpected += o.unexpected;
        self.reordered += o.reordered;
        for (k, n) in o.reasons {
            *self.reasons.entry(k).or_default() += n;
        }
        self.first_attempt_us = min_some(self.first_attempt_us, o.first_attempt_us);
        self.last_connected_us = self.last_connected_us.max(o.last_connected_us);
        self.last_complete_us = self.last_complete_us.max(o.last_complete_us);
    }
}

fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Seconds from unix µs `a` to `b`.
fn span(a: u64, b: u64) -> f64 {
    b.saturating_sub(a) as f64 / 1e6
}

/// A member's clients as the leader needs them to publish what they miss
/// (their resume tokens stay with the member).
fn away_json(away: &[Away]) -> Value {
    Value::Array(
        away.iter()
            .map(|a| json!([a.index, a.channel.as_str(), a.base]))
            .collect(),
    )
}

fn away_of_json(v: Value) -> Result<Vec<Away>> {
    let rows: Vec<(usize, String, u64)> =
        serde_json::from_value(v).context("a worker's dropped clients")?;
    rows.into_iter()
        .map(|(index, channel, base)| {
            Ok(Away {
                index,
                channel: ChannelName::new(channel)?,
                token: String::new(),
                base,
            })
        })
        .collect()
}

pub async fn run(
    opts: ResumeOptions,
    fleet_opts: FleetOptions,
    mut role: Role,
    share: Share,
) -> Result<Report> {
    if opts.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if opts.missed > MAX_BATCH {
        bail!("--missed must be at most {MAX_BATCH}");
    }
    let transport = fleet_opts.transport.clone();
    if transport.nodes() != 1 {
        bail!("the resume scenario runs against one node (one --url or --quic-addr)");
    }
    // The broker's gauge of this transport's connections.
    let gauge_label = match &transport {
        Transport::Ws(_) => "ws",
        Transport::Quic(_) => "quic",
    };
    let http = publisher::api_client(opts.api_key.as_deref(), PUBLISH_IN_FLIGHT)?;
    let leader = !role.is_member();
    if leader {
        publisher::check_ready(&http, &opts.api).await?;
    }
    let broker = match leader {
        true => Brokers::new(opts.broker_pids.clone(), "CPU")?,
        false => Brokers::default(),
    };
    // Over all workers (each worker's fleet options are its share).
    let (setup_rate, setup_concurrency) = (
        fleet_opts.connect_rate * share.of as f64,
        fleet_opts.concurrency * share.of,
    );
    let wave = Arc::new(Wave {
        transport: transport.clone(),
        encoding: fleet_opts.encoding,
        source_ips: fleet_opts.source_ips.clone(),
        retries: fleet_opts.retries,
        attempt_timeout: fleet_opts.attempt_timeout,
        missed: opts.missed as u64,
        message_timeout: opts.message_timeout,
        permits: Semaphore::new(opts.reconnect_concurrency.div_ceil(share.of.max(1)).max(1)),
        settled: AtomicU64::new(0),
        signer: fleet_opts.signer.clone(),
        connected: AtomicU64::new(0),
        window: Window::default(),
    });

    // 1. Connect and subscribe (every worker its share).
    let prefix = opts.channel_prefix.clone();
    let start_us = publisher::unix_micros();
    let fleet = Fleet::launch(
        share.range(opts.clients),
        fleet_opts,
        move |i| Ok(ChannelName::new(format!("{prefix}{i}"))?),
        hold_then_drop,
    );
    fleet.wait_settled("resume", share.index).await?;
    let setup = role.step(Part::counted(&fleet.counters)?).await?;
    let setup = match setup {
        Ok(all) => {
            if all.established == 0 {
                bail!(
                    "no client could connect and subscribe: {}",
                    all.top_reason()
                );
            }
            tracing::info!(
                "resume: {} clients subscribed in {:.1} s; dropping them all",
                all.established,
                span(start_us, all.settled_at_us)
            );
            role.tell(&json!("drop")).await?;
            Some(all)
        }
        Err(_) => None,
    };

    // 2. Drop them all at once (every worker on the leader's word).
    let udp_drops0 = crate::quic::udp_drops(&transport);
    let dropped_at = Instant::now();
    let dropped_at_us = publisher::unix_micros();
    let mut away: Vec<Away> = fleet.stop().await.into_iter().flatten().collect();
    let drop_spread = dropped_at.elapsed();
    transport.finish().await;
    let mut gone = Part::new()?;
    gone.extras.push(away_json(&away));
    // The members' clients, for the leader to publish what they miss.
    let (all_away, word) = match role.step(gone).await? {
        Ok(all) => {
            let mut every: Vec<Away> = away.clone();
            // The leader's own part comes first in `extras`.
            for extra in all.extras.into_iter().skip(1) {
                every.extend(away_of_json(extra)?);
            }
            (Some(every), None)
        }
        Err(word) => (None, Some(word)),
    };

    // 3–4. The leader waits until the broker has seen them go and
    // publishes what they miss; the members wait for its word.
    let mut middle = None;
    if let (Some(every), Some(setup)) = (&all_away, &setup) {
        let (gone_after, gauge) =
            wait_gone(&http, &opts.api, gauge_label, opts.drop_timeout).await?;
        match gone_after {
            Some(d) => tracing::info!(
                "resume: the broker counts no {gauge_label} connection after {:.2} s",
                d.as_secs_f64()
            ),
            None => tracing::warn!(
                "resume: the broker still counts {gauge:?} {gauge_label} connections after {:?}; going on",
                opts.drop_timeout
            ),
        }
        let published = publish_missed(
            &http,
            &opts.api,
            every,
            opts.missed,
            opts.payload,
            opts.batch,
        )
        .await?;
        tracing::info!(
            "resume: {} missed messages published in {:.2} s ({} failed); reconnecting {} clients",
            published.ok,
            published.elapsed.as_secs_f64(),
            published.failed,
            every.len()
        );
        role.tell(&json!("reconnect")).await?;
        middle = Some((setup.clone(), gone_after, gauge, published));
    }
    if let Some(word) = word {
        // A member's clients are reconnected on the leader's word.
        if word != json!("reconnect") {
            bail!("the leader said {word} instead of reconnect");
        }
    }

    // 5. Reconnect them all, every worker its own at its share of the rate.
    let broker_cpu0 = broker.cpu()?;
    let own_cpu0 = proc::cpu_time(Pid::Current)?;
    let (stop, _) = watch::channel(false);
    let wave_start = Instant::now();
    let wave_start_us = publisher::unix_micros();
    let reconnect_rate = share.rate(opts.reconnect_rate);
    let mut handles = Vec::with_capacity(away.len());
    for (n, a) in away.drain(..).enumerate() {
        let slot = wave_start + Duration::from_secs_f64(n as f64 / reconnect_rate);
        handles.push(tokio::spawn(reconnect(
            wave.clone(),
            a,
            slot,
            stop.subscribe(),
        )));
    }
    let live = crate::live::Live::new(share.index);
    let mut ticker = Ticker::new();
    let (mut seconds, mut last_connected) = (Vec::new(), 0u64);
    while wave.settled.load(Ordering::Relaxed) < handles.len() as u64 {
        tokio::select! {
            unix_s = ticker.tick() => {
                let s = wave.second(unix_s, &mut last_connected)?;
                live.line(&format!(
                    "resume {:>4.0}s into the wave: {} connected ({}/s, connect p99 {}), {} of {} back (resumed and caught up, or failed)",
                    wave_start.elapsed().as_secs_f64(),
                    s.online,
                    s.count,
                    s.p99_us().map_or_else(|| "-".to_owned(), |us| format!("{:.1} ms", us as f64 / 1000.0)),
                    wave.settled.load(Ordering::Relaxed),
                    handles.len()
                ));
                crate::timeline::push(&mut seconds, s);
            }
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    // The last, partial second: every reconnect is in one.
    crate::timeline::push(
        &mut seconds,
        wave.second(
            publisher::unix_micros() / 1_000_000 + 1,
            &mut last_connected,
        )?,
    );
    drop(live);
    // Every worker's wave settled; then the broker's CPU is read.
    let settled = role.step(Part::new()?).await?;
    let wave_window = wave_start.elapsed();
    let broker_cpu = match (broker_cpu0, broker.cpu()?) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let own_cpu = proc::cpu_time(Pid::Current)?.saturating_sub(own_cpu0);
    let udp_drops1 = crate::quic::udp_drops(&transport);
    if settled.is_ok() {
        role.tell(&json!("close")).await?;
    }
    // A short grace for late duplicates, then everyone closes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop.send(true);
    let mut backs = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(b) => backs.push(b),
            Err(e) => tracing::warn!(error = %e, "a client task failed"),
        }
    }
    let mut mine = Part::new()?;
    mine.seconds = seconds;
    mine.cpu_us = u64::try_from(own_cpu.as_micros()).unwrap_or(u64::MAX);
    for b in &backs {
        if let Some(l) = b.latency {
            mine.latency
                .saturating_record(u64::try_from(l.as_micros()).unwrap_or(u64::MAX).max(1));
        }
    }
    mine.extras
        .push(serde_json::to_value(WaveFigures::of(&backs))?);
    let (Some(mut total), Some((setup, gone_after, gauge, published)), Some(all_away)) =
        (role.last(mine).await?, middle, all_away)
    else {
        return Ok(Report::new("resume"));
    };

    // The figures.
    let timeline = Timeline::of(std::mem::take(&mut total.seconds));
    let mut f = WaveFigures::default();
    for extra in total.extras {
        f.absorb(serde_json::from_value(extra).context("a worker's wave")?);
    }
    let latency = total.latency;
    let own_cpu = Duration::from_micros(total.cpu_us);
    let (established, setup_failed) = (setup.established, setup.failed);
    let setup_reasons = setup.top_reasons();
    let setup_time = span(start_us, setup.settled_at_us);
    let lost_before_drop = established.saturating_sub(all_away.len() as u64);
    let (resumed, retries, received, duplicates, unexpected, reordered) = (
        f.resumed,
        f.retries,
        f.received,
        f.duplicates,
        f.unexpected,
        f.reordered,
    );
    let reasons = f.reasons;
    let expected = published.ok;
    let mut r = Report::new("resume");
    transport.describe(wave.encoding, &mut r);
    r.count("workers", "load tester processes", share.of as u64);
    r.count(
        "clients_requested",
        "clients requested",
        opts.clients as u64,
    );
    r.count(
        "clients_subscribed",
        "clients connected and subscribed",
        established,
    );
    r.count("setup_failures", "setup failures", setup_failed);
    if let Some((reason, n)) = setup_reasons.first() {
        r.text(
            "top_setup_failure",
            "most frequent setup failure",
            format!("{n} × {reason}"),
        );
    }
    r.text(
        "setup_pacing",
        "setup pacing",
        format!("--connect-rate {setup_rate}/s, --connect-concurrency {setup_concurrency}"),
    );
    r.number(
        "setup_seconds",
        "time to subscribe them all",
        setup_time,
        "s",
        2,
    );
    r.count(
        "lost_before_drop",
        "connections lost before the drop",
        lost_before_drop,
    );
    r.count("dropped", "clients dropped at once", all_away.len() as u64);
    r.number(
        "drop_spread_ms",
        "time to drop them all",
        drop_spread.as_secs_f64() * 1000.0,
        "ms",
        1,
    );
    match gone_after {
        Some(d) => r.number(
            "broker_saw_drop_seconds",
            "until the broker counted none of the transport's connections",
            d.as_secs_f64(),
            "s",
            2,
        ),
        None => r.missing(
            "broker_saw_drop_seconds",
            "until the broker counted none of the transport's connections",
            &format!("still {gauge:?} after {:?}", opts.drop_timeout),
        ),
    }
    r.count(
        "missed_per_client",
        "messages missed per client",
        opts.missed as u64,
    );
    r.count("published", "missed messages published", published.ok);
    r.count("publish_failures", "publications failed", published.failed);
    if let Some((reason, n)) = published.errors.iter().max_by_key(|(_, n)| **n) {
        r.text(
            "top_publish_failure",
            "most frequent publish failure",
            format!("{n} × {reason}"),
        );
    }
    r.count(
        "published_off_offset",
        "publications not at the expected offset",
        published.off_offset,
    );
    r.number(
        "publish_seconds",
        "publishing time",
        published.elapsed.as_secs_f64(),
        "s",
        2,
    );
    r.text(
        "reconnect_pacing",
        "reconnect pacing",
        format!(
            "--reconnect-rate {}/s, --reconnect-concurrency {}",
            opts.reconnect_rate, opts.reconnect_concurrency
        ),
    );
    r.count("resumed", "clients resumed with nothing lost", resumed);
    r.count(
        "resume_failures",
        "clients not resumed cleanly",
        f.clients.saturating_sub(resumed),
    );
    let reasons_text = if reasons.is_empty() {
        "none".to_owned()
    } else {
        let mut v: Vec<_> = reasons.iter().collect();
        v.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
        v.iter()
            .map(|(k, n)| format!("{n} × {k}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    r.text("failure_reasons", "failures by reason", reasons_text);
    r.count("reconnect_retries", "reconnect attempts retried", retries);
    r.count("messages_expected", "missed messages to recover", expected);
    r.count("messages_received", "missed messages received", received);
    r.count(
        "messages_lost",
        "missed messages lost",
        expected.saturating_sub(received),
    );
    r.count("messages_duplicated", "messages duplicated", duplicates);
    r.count("messages_reordered", "messages out of order", reordered);
    r.count(
        "messages_unexpected",
        "messages of another offset or epoch",
        unexpected,
    );
    if received < expected {
        r.violation(format!(
            "{} missed messages never arrived after a resume",
            expected - received
        ));
    }
    if duplicates > 0 {
        r.violation(format!("{duplicates} messages duplicated after a resume"));
    }
    if reordered > 0 {
        r.violation(format!("{reordered} messages out of order after a resume"));
    }
    match (f.first_attempt_us, f.last_connected_us) {
        (Some(a), Some(b)) => r.number(
            "first_to_last_connected_seconds",
            "first reconnect attempt → last connected",
            span(a, b),
            "s",
            3,
        ),
        _ => r.missing(
            "first_to_last_connected_seconds",
            "first reconnect attempt → last connected",
            "no client connected",
        ),
    }
    match (f.first_attempt_us, f.last_complete_us) {
        (Some(a), Some(b)) => r.number(
            "first_to_last_recovered_seconds",
            "first reconnect attempt → last missed message",
            span(a, b),
            "s",
            3,
        ),
        _ => r.missing(
            "first_to_last_recovered_seconds",
            "first reconnect attempt → last missed message",
            "no client recovered",
        ),
    }
    match f.last_connected_us {
        Some(b) => r.number(
            "drop_to_last_connected_seconds",
            "drop → last connected (resume window 120 s)",
            span(dropped_at_us, b),
            "s",
            2,
        ),
        None => r.missing(
            "drop_to_last_connected_seconds",
            "drop → last connected (resume window 120 s)",
            "no client connected",
        ),
    }
    Latency::of(&latency).add_to(
        &mut r,
        [
            "connect_p50_ms",
            "connect_p90_ms",
            "connect_p99_ms",
            "connect_p999_ms",
            "connect_max_ms",
        ],
        [
            "connect → connected p50",
            "connect → connected p90",
            "connect → connected p99",
            "connect → connected p99.9",
            "connect → connected max",
        ],
    );
    let secs = wave_window.as_secs_f64().max(1e-9);
    r.number(
        "wave_seconds",
        "reconnect wave (until all settled)",
        secs,
        "s",
        3,
    );
    match broker_cpu {
        Some(cpu) => {
            r.number(
                "broker_cpu_seconds",
                "broker CPU in the wave",
                cpu.as_secs_f64(),
                "s",
                2,
            );
            r.number(
                "broker_cpu_cores",
                "broker CPU, cores busy on average",
                cpu.as_secs_f64() / secs,
                "",
                2,
            );
        }
        None => r.missing(
            "broker_cpu_seconds",
            "broker CPU in the wave",
            "no --broker-pid",
        ),
    }
    // In the wave, all workers (with a warning when it is the bottleneck).
    crate::report::own_cpu(&mut r, own_cpu, wave_window);
    crate::quic::UdpDrops::add_to(
        &mut r,
        udp_drops0,
        udp_drops1,
        "from the drop to the end of the wave (this process's sockets)",
    );
    let title = format!(
        "loadtest resume: {} clients dropped at once, {} missed each",
        all_away.len(),
        opts.missed
    );
    let picture = opts.plot.as_deref().map(|p| {
        let s = crate::plot::Series::of_seconds(&title, &latency, timeline.points(wave_start_us));
        (p, s.captioned(crate::plot::RECONNECTS))
    });
    timeline.add_to(
        &mut r,
        wave_start_us,
        ("reconnects_per_second", "connected"),
        "the reconnect wave, one sample a second (all workers)",
        picture,
    )?;
    Ok(r)
}
