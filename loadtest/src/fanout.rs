//! Scenario `fanout`: latency and server CPU of one channel fanned out to
//! many subscribers.
//!
//! Every subscriber joins one channel; once all are subscribed, the
//! publisher POSTs `--rate` publications per second for `--duration`
//! seconds, each carrying `{"sent_us": <unix µs it was due>, "pad": "xxx…"}`
//! (a fixed arrival rate, see [`publisher::Schedule`]).
//! Each subscriber records `now - sent_us` into its own HDR histogram (no
//! lock per message; merged at the end), counts deliveries and checks that
//! offsets rise by exactly one. The broker's CPU time (utime + stime) is
//! read when the first publication is sent and again when the last expected
//! delivery arrived (or the drain timeout passed).
//!
//! The load tester shares the machine with the broker, so its own CPU per
//! delivery is kept low: over WebSocket the subscribers run on one
//! single-threaded runtime per core ([`Shards`]), count deliveries in one
//! slot per shard rather than one counter shared by all, and look at the
//! stop (a flag, see `Ready::stop_signal`) only when their connection has
//! nothing to read. Every delivery is still decoded with the protocol codec
//! and checked. What remains is mostly the kernel's: on loopback, the
//! `recvfrom` of each frame sends an ACK whose TCP input, at the broker's
//! socket, runs in the load tester's context (a third of its CPU in a
//! profile), the mirror image of what `loadtest floor` measures for a
//! sender.
//!
//! With `--workers N` the subscribers are spread over N processes; the
//! leader publishes, tells the members how many publications were accepted
//! and merges their histograms and counts (see [`crate::crew`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use tether_protocol::{ChannelName, Epoch};

use crate::client::{Client, Event};
use crate::crew::{Part, Role, Share};
use crate::fleet::{Counters, Fleet, FleetOptions, Ready, Shards, Transport};
use crate::proc::{self, Brokers, Pid};
use crate::publisher::{self, PublishPlan, unix_micros};
use crate::quic::{UdpDrops, udp_drops};
use crate::report::{self, Latency, Report};
use crate::timeline::{Second, Ticker, Timeline};

#[derive(Debug, Clone)]
pub struct FanoutOptions {
    pub subscribers: usize,
    pub plan: PublishPlan,
    /// How long to wait for deliveries after the last publication was answered.
    pub drain_timeout: Duration,
    pub broker_pids: Vec<u32>,
    /// Draw the run here (SVG).
    pub plot: Option<std::path::PathBuf>,
    /// Key the backend API requires.
    pub api_key: Option<String>,
}

/// Deliveries received so far, counted in a few slots, one per cache line:
/// subscriber `i` adds to slot `i mod slots`. With one slot per shard that
/// is the slot of the thread the subscriber runs on (see [`Shards`]), a line
/// no other thread writes; one counter shared by all would be a contended
/// read-modify-write on every delivery. The drain loop sums the slots.
/// Each slot also holds the latencies of the current second (its thread
/// takes the lock; the once-a-second reader is the only other taker).
struct Progress {
    slots: Box<[Slot]>,
}

#[repr(align(64))]
struct Slot {
    count: AtomicU64,
    window: std::sync::Mutex<Histogram<u32>>,
}

impl Progress {
    fn new(slots: usize, template: &Histogram<u32>) -> Progress {
        Progress {
            slots: (0..slots.max(1))
                .map(|_| Slot {
                    count: AtomicU64::new(0),
                    window: std::sync::Mutex::new(template.clone()),
                })
                .collect(),
        }
    }

    /// One delivery to `subscriber`, `latency_us` after it was due (if
    /// it carried its time).
    fn add(&self, subscriber: usize, latency_us: Option<u64>) {
        if let Some(slot) = self.slots.get(subscriber % self.slots.len()) {
            slot.count.fetch_add(1, Ordering::Relaxed);
            if let Some(us) = latency_us {
                slot.window
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .saturating_record(us);
            }
        }
    }

    fn total(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.count.load(Ordering::Relaxed))
            .sum()
    }

    /// The latencies since the last call, emptying the window.
    fn window_take(&self) -> Result<Histogram<u64>> {
        let mut merged = report::latency_histogram::<u64>()?;
        for slot in &self.slots {
            let mut w = slot.window.lock().unwrap_or_else(|p| p.into_inner());
            report::merge_into(&mut merged, &w);
            w.reset();
        }
        Ok(merged)
    }
}

/// What one subscriber saw.
#[derive(Debug)]
struct SubscriberStats {
    latency: Histogram<u32>,
    delivered: u64,
    /// Offsets skipped over (a gap of 3 counts 3).
    skipped: u64,
    /// Deliveries whose offset was not above the previous one.
    not_increasing: u64,
    epoch_changes: u64,
    /// Deliveries whose data carried no `sent_us`.
    bad_payload: u64,
    /// Unix µs of the last delivery (the clock the latency is read with
    /// anyway: one clock read per delivery, not two).
    last_delivery_us: Option<u64>,
    /// The connection ended before the stop (close code, if any).
    dropped: Option<Option<u16>>,
}

/// One line a second on stderr while deliveries come in (this process's
/// subscribers; each worker prints its own): deliveries per second and the
/// p99 over the last second, received so far; the seconds, when stopped,
/// which the leader merges with the members' ([`crate::timeline`]).
async fn tick_deliveries(
    progress: Arc<Progress>,
    counters: Arc<Counters>,
    worker: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<Second>> {
    let started = Instant::now();
    let mut ticker = Ticker::new();
    let mut last = progress.total();
    let mut out = Vec::new();
    let live = crate::live::Live::new(worker);
    loop {
        // The stop ends a last, partial second: every delivery is in one.
        let (unix_s, stopped) = tokio::select! {
            s = ticker.tick() => (s, false),
            _ = stop.wait_for(|s| *s) => (unix_micros() / 1_000_000 + 1, true),
        };
        let total = progress.total();
        let subscribers =
            Counters::get(&counters.established).saturating_sub(Counters::get(&counters.dropped));
        let second = Second::new(
            unix_s,
            total.saturating_sub(last),
            i64::try_from(subscribers).unwrap_or(i64::MAX),
            &progress.window_take()?,
        );
        live.line(&format!(
            "fanout {:>4.0}s (worker {worker}): {} deliveries/s, p99 {}, {total} received",
            started.elapsed().as_secs_f64(),
            second.count,
            second.p99_us().map_or_else(
                || "-".to_owned(),
                |us| format!("{:.1} ms", us as f64 / 1000.0)
            ),
        ));
        crate::timeline::push(&mut out, second);
        if stopped {
            return Ok(out);
        }
        last = total;
    }
}

/// Receives until the fleet stops, measuring every delivery.
async fn subscribe_and_measure(
    mut client: Client,
    ready: Ready,
    template: Arc<Histogram<u32>>,
    progress: Arc<Progress>,
    fanout_channel: Arc<ChannelName>,
) -> SubscriberStats {
    let mut s = SubscriberStats {
        latency: (*template).clone(),
        delivered: 0,
        skipped: 0,
        not_increasing: 0,
        epoch_changes: 0,
        bad_payload: 0,
        last_delivery_us: None,
        dropped: None,
    };
    // Every delivery is compared with the channel: the one copy all
    // subscribers share stays in cache, a copy of one's own would not.
    let channel = if ready.subscribed.channel == *fanout_channel {
        fanout_channel
    } else {
        Arc::new(ready.subscribed.channel.clone())
    };
    let mut epoch: Epoch = ready.subscribed.epoch.clone();
    let mut last = ready.subscribed.offset.0;
    let mut stop = ready.stop_signal();
    loop {
        // The connection first: the stop is looked at only when no frame is
        // waiting (once per wake-up, not once per delivery; a stop arrives
        // after the last delivery anyway).
        let ev = tokio::select! {
            biased;
            ev = client.next_event() => ev,
            _ = &mut stop => {
                client.close().await;
                return s;
            }
        };
        let p = match ev {
            Ok(Event::Message(p)) if p.channel == *channel => p,
            Ok(Event::Message(_) | Event::Other(_)) => continue,
            Ok(Event::Closed(code)) => {
                s.dropped = Some(code);
                break;
            }
            Err(e) => {
                tracing::debug!(client = ready.index, error = %format!("{e:#}"), "subscriber failed");
                s.dropped = Some(None);
                break;
            }
        };
        let now = unix_micros();
        s.last_delivery_us = Some(now);
        s.delivered += 1;
        let latency = p
            .data
            .get("sent_us")
            .and_then(serde_json::Value::as_u64)
            .map(|sent| now.saturating_sub(sent).max(1));
        progress.add(ready.index, latency);
        match latency {
            Some(us) => s.latency.saturating_record(us),
            None => s.bad_payload += 1,
        }
        if p.epoch != epoch {
            s.epoch_changes += 1;
            epoch = p.epoch;
        } else if p.offset.0 <= last {
            s.not_increasing += 1;
        } else {
            s.skipped += p.offset.0 - last - 1;
        }
        last = p.offset.0;
    }
    ready.dropped();
    s
}

pub async fn run(
    opts: FanoutOptions,
    mut fleet_opts: FleetOptions,
    mut role: Role,
    share: Share,
) -> Result<Report> {
    if opts.subscribers == 0 {
        bail!("--subscribers must be at least 1");
    }
    if !opts.plan.rate.is_finite() || opts.plan.rate <= 0.0 {
        bail!("--rate must be a number above 0");
    }
    let channel = Arc::new(ChannelName::new(opts.plan.channel.clone())?);
    let http = publisher::api_client(opts.api_key.as_deref(), opts.plan.max_in_flight)?;
    if !role.is_member() {
        publisher::check_ready(&http, &opts.plan.api).await?;
    }
    let broker = match role.is_member() {
        true => Brokers::default(),
        false => Brokers::new(opts.broker_pids.clone(), "CPU")?,
    };

    let template = Arc::new(report::latency_histogram::<u32>()?);
    if matches!(fleet_opts.transport, Transport::Ws(_)) {
        // One single-threaded runtime per core for the subscribers: the load
        // tester's CPU per delivery shares the machine with the broker.
        fleet_opts.shards = Some(Arc::new(Shards::per_core()?));
    }
    let progress = Arc::new(Progress::new(
        fleet_opts.shards.as_ref().map_or(1, |s| s.len()),
        &template,
    ));
    let (transport, encoding) = (fleet_opts.transport.clone(), fleet_opts.encoding);
    let fleet = {
        let (template, progress) = (template.clone(), progress.clone());
        Fleet::launch(
            share.range(opts.subscribers),
            fleet_opts,
            {
                let channel = channel.clone();
                move |_| Ok((*channel).clone())
            },
            move |client, ready| {
                subscribe_and_measure(
                    client,
                    ready,
                    template.clone(),
                    progress.clone(),
                    channel.clone(),
                )
            },
        )
    };
    let start_us = unix_micros();
    // (The subscribers' setup seconds are not fanout's timeline, which is
    // of deliveries.)
    fleet.wait_settled("fanout", share.index).await?;
    let mine_subscribed = Counters::get(&fleet.counters.established);
    let (ticker_stop, ticker_rx) = tokio::sync::watch::channel(false);
    let ticker = tokio::spawn(tick_deliveries(
        progress.clone(),
        fleet.counters.clone(),
        share.index,
        ticker_rx,
    ));
    // Every worker's subscribers settled; then the leader publishes.
    let own_cpu0 = proc::cpu_time(Pid::Current)?;
    let step = role.step(Part::counted(&fleet.counters)?).await?;
    let (settled, accepted, published, t0, t0_us, broker_cpu0, udp_drops0) = match step {
        Ok(all) => {
            if all.established == 0 {
                bail!("no subscriber could subscribe: {}", all.top_reason());
            }
            let setup_time = Duration::from_micros(all.settled_at_us.saturating_sub(start_us));
            tracing::info!(
                "fanout: {} subscribers in {:.1} s; publishing {} × {}/s",
                all.established,
                setup_time.as_secs_f64(),
                opts.plan.total(),
                opts.plan.rate
            );
            // The measured window opens with the first publication.
            let broker_cpu0 = broker.cpu()?;
            let udp_drops0 = udp_drops(&transport);
            let (t0, t0_us) = (Instant::now(), unix_micros());
            let published = publisher::run(http, &opts.plan).await?;
            if published.ok == 0 {
                // Nothing to measure: the run could not be made (exit 1).
                let top = published.errors.iter().max_by_key(|(_, n)| **n);
                bail!(
                    "no publication was accepted: {}",
                    top.map_or("no answer".to_owned(), |(r, n)| format!("{n} × {r}"))
                );
            }
            role.tell(&serde_json::json!({ "accepted": published.ok }))
                .await?;
            let accepted = published.ok;
            (
                Some((all, setup_time)),
                accepted,
                Some(published),
                t0,
                t0_us,
                broker_cpu0,
                udp_drops0,
            )
        }
        Err(word) => {
            let accepted = word["accepted"].as_u64().unwrap_or(0);
            (
                None,
                accepted,
                None,
                Instant::now(),
                0,
                None,
                udp_drops(&transport),
            )
        }
    };
    let expected_here = accepted * mine_subscribed;
    let drain_deadline = Instant::now() + opts.drain_timeout;
    while progress.total() < expected_here
        && Instant::now() < drain_deadline
        && Counters::get(&fleet.counters.dropped) < mine_subscribed
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = ticker_stop.send(true);
    let seconds = ticker.await.context("the progress task failed")??;
    let own_cpu = proc::cpu_time(Pid::Current)?.saturating_sub(own_cpu0);
    let udp_drops = udp_drops(&transport);
    let mut mine = Part::counted(&fleet.counters)?;
    mine.seconds = seconds;
    mine.rss = proc::rss_bytes(Pid::Current)?;
    mine.cpu_us = u64::try_from(own_cpu.as_micros()).unwrap_or(u64::MAX);
    let stats = fleet.stop().await;
    transport.finish().await;
    for s in &stats {
        report::merge_into(&mut mine.latency, &s.latency);
        mine.delivered += s.delivered;
        mine.skipped += s.skipped;
        mine.not_increasing += s.not_increasing;
        mine.epoch_changes += s.epoch_changes;
        mine.bad_payload += s.bad_payload;
        mine.last_delivery_us = mine.last_delivery_us.max(s.last_delivery_us);
        if let Some(code) = s.dropped {
            *mine.close_codes.entry(code).or_default() += 1;
        }
    }
    // The members' final parts arrive once their own drains are over.
    let (Some(mut total), Some((settled, setup_time)), Some(published)) =
        (role.last(mine).await?, settled, published)
    else {
        return Ok(Report::new("fanout"));
    };
    let timeline = Timeline::of(std::mem::take(&mut total.seconds));
    let window = t0.elapsed();
    let broker_cpu = match (broker_cpu0, broker.cpu()?) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let subscribed = settled.established;
    let expected = accepted * subscribed;
    let (failed, retried) = (settled.failed, settled.retried);
    let reasons = settled.top_reasons();
    let own_cpu = Duration::from_micros(total.cpu_us);
    let own_rss = total.rss;
    let latency = total.latency;
    let delivered = total.delivered;
    let (skipped, not_increasing, epoch_changes, bad_payload) = (
        total.skipped,
        total.not_increasing,
        total.epoch_changes,
        total.bad_payload,
    );
    let delivery_span = total
        .last_delivery_us
        .map(|t| Duration::from_micros(t.saturating_sub(t0_us)));

    let mut r = Report::new("fanout");
    transport.describe(encoding, &mut r);
    r.count("workers", "load tester processes", share.of as u64);
    r.count(
        "subscribers_requested",
        "subscribers requested",
        opts.subscribers as u64,
    );
    r.count("subscribers", "subscribers subscribed", subscribed);
    r.count("connect_failures", "connect failures", failed);
    r.count("connect_retries", "connect attempts retried", retried);
    if let Some((reason, n)) = reasons.first() {
        r.text(
            "top_failure",
            "most frequent failure",
            format!("{n} × {reason}"),
        );
    }
    r.number(
        "setup_seconds",
        "time to subscribe them all",
        setup_time.as_secs_f64(),
        "s",
        2,
    );
    r.number(
        "rate_target",
        "publication rate asked",
        opts.plan.rate,
        "/s",
        1,
    );
    r.count("payload_bytes", "payload padding", opts.plan.payload as u64);
    r.count("publications", "publications accepted", published.ok);
    r.count("publish_failures", "publications failed", published.failed);
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
        published.elapsed.as_secs_f64(),
        "s",
        2,
    );
    r.count(
        "deliveries_expected",
        "deliveries expected (pubs × subscribers)",
        expected,
    );
    r.count("deliveries", "deliveries received", delivered);
    r.count(
        "lost",
        "deliveries lost",
        expected.saturating_sub(delivered),
    );
    r.count("offsets_skipped", "offsets skipped (gaps)", skipped);
    r.count(
        "offsets_not_increasing",
        "offsets not increasing (dup/reorder)",
        not_increasing,
    );
    r.count("epoch_changes", "epoch changes", epoch_changes);
    if skipped > 0 {
        r.violation(format!(
            "{skipped} offsets of {} skipped by live subscribers",
            opts.plan.channel
        ));
    }
    if not_increasing > 0 {
        r.violation(format!(
            "{not_increasing} deliveries of {} duplicated or out of order",
            opts.plan.channel
        ));
    }
    let (dropped_count, dropped_codes) = report::tallied_close_codes(&total.close_codes);
    if delivered < expected && dropped_count == 0 {
        r.violation(format!(
            "{} deliveries of {} had not arrived {:?} after the last publication",
            expected - delivered,
            opts.plan.channel,
            opts.drain_timeout
        ));
    }
    r.count("bad_payloads", "deliveries without sent_us", bad_payload);
    r.count(
        "subscribers_dropped",
        "subscribers disconnected during the run",
        dropped_count,
    );
    r.text("dropped_close_codes", "their close codes", dropped_codes);
    r.number(
        "window_seconds",
        "measured window (first publish → last delivery)",
        window.as_secs_f64(),
        "s",
        3,
    );
    match delivery_span {
        Some(span) if span > Duration::ZERO => r.number(
            "deliveries_per_second",
            "deliveries per second",
            delivered as f64 / span.as_secs_f64(),
            "/s",
            0,
        ),
        _ => r.missing(
            "deliveries_per_second",
            "deliveries per second",
            "no delivery",
        ),
    }
    r.count(
        "latency_samples",
        "latencies recorded (merged over workers)",
        latency.len(),
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
            "publish→deliver p50",
            "publish→deliver p90",
            "publish→deliver p99",
            "publish→deliver p99.9",
            "publish→deliver max",
        ],
    );
    let secs = window.as_secs_f64().max(1e-9);
    match broker_cpu {
        Some(cpu) => {
            r.number(
                "broker_cpu_seconds",
                "broker CPU (user + system)",
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
            if delivered > 0 {
                let us = cpu.as_secs_f64() * 1e6 / delivered as f64;
                r.number(
                    "broker_cpu_us_per_delivery",
                    "broker CPU per delivery (incl. HTTP publish)",
                    us,
                    "µs",
                    3,
                );
            } else {
                r.missing(
                    "broker_cpu_us_per_delivery",
                    "broker CPU per delivery (incl. HTTP publish)",
                    "no delivery",
                );
            }
        }
        None => {
            r.missing(
                "broker_cpu_seconds",
                "broker CPU (user + system)",
                "no --broker-pid",
            );
            r.missing(
                "broker_cpu_us_per_delivery",
                "broker CPU per delivery (incl. HTTP publish)",
                "no --broker-pid",
            );
        }
    }
    report::own_cpu(&mut r, own_cpu, window);
    r.bytes(
        "loadtest_rss_bytes",
        "loadtest RSS, all workers (for information)",
        own_rss as f64,
    );
    UdpDrops::add_to(&mut r, udp_drops0, udp_drops, "in the measured window");
    let title = format!(
        "loadtest fanout: {subscribed} subscribers, {}/s, {} B",
        opts.plan.rate, opts.plan.payload,
    );
    let picture = opts.plot.as_deref().map(|p| {
        let s = crate::plot::Series::of_seconds(&title, &latency, timeline.points(start_us));
        (p, s)
    });
    timeline.add_to(
        &mut r,
        start_us,
        ("deliveries_per_second", "subscribers"),
        "progress samples (one a second, all workers)",
        picture,
    )?;
    Ok(r)
}
