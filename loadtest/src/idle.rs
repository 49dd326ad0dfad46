//! Scenario `idle`: the broker's memory per idle, subscribed connection.
//!
//! Reads the broker's RSS, opens every client (connected and subscribed,
//! client `i` on channel `idle:<i mod channels>`), waits `--settle` seconds
//! while answering heartbeats, reads the RSS again, and reports
//! `(after - before) / connections alive`. Then closes everything. With
//! `--workers N` the connections are spread over N processes, and the
//! leader reads the RSS once every worker's share has settled.

use std::time::Duration;

use anyhow::{Result, bail};
use tether_protocol::ChannelName;

use crate::crew::{Part, Role, Share};
use crate::fleet::{self, Counters, Ended, Fleet, FleetOptions};
use crate::proc::{self, Brokers, Pid};
use crate::report::{self, Report};

#[derive(Debug, Clone)]
pub struct IdleOptions {
    pub connections: usize,
    /// Distinct channels; `None`: one per connection.
    pub channels: Option<usize>,
    pub settle: Duration,
    pub broker_pids: Vec<u32>,
    /// The nodes' APIs, to read their memory from GET /metrics when no PID
    /// is given.
    pub metrics: Vec<reqwest::Url>,
    /// Prefix of the channel names.
    pub channel_prefix: String,
    /// Draw the connecting here (SVG).
    pub plot: Option<std::path::PathBuf>,
}

/// The broker's memory now: from /proc for the PIDs given, else from the
/// APIs' GET /metrics (every node must answer), else unknown.
async fn broker_rss(broker: &Brokers, apis: &[reqwest::Url]) -> Result<Option<u64>> {
    if let Some(rss) = broker.rss()? {
        return Ok(Some(rss));
    }
    if apis.is_empty() {
        return Ok(None);
    }
    let http = crate::publisher::api_client(None, 2)?;
    let mut sum = 0;
    for api in apis {
        match proc::metrics_rss(&http, api).await {
            Some(b) => sum += b,
            None => bail!("{api}: no tether_resident_memory_bytes in its GET /metrics"),
        }
    }
    Ok(Some(sum))
}

pub async fn run(
    opts: IdleOptions,
    fleet_opts: FleetOptions,
    mut role: Role,
    share: Share,
) -> Result<Report> {
    if opts.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let channels = opts.channels.unwrap_or(opts.connections).max(1);
    let broker = match role.is_member() {
        true => Brokers::default(),
        false => Brokers::new(opts.broker_pids.clone(), "memory")?,
    };
    let apis = if role.is_member() {
        Vec::new()
    } else {
        opts.metrics.clone()
    };
    let rss_before = broker_rss(&broker, &apis).await?;

    let prefix = opts.channel_prefix.clone();
    let (transport, encoding) = (fleet_opts.transport.clone(), fleet_opts.encoding);
    let udp_drops0 = crate::quic::udp_drops(&transport);
    let fleet = Fleet::launch(
        share.range(opts.connections),
        fleet_opts,
        move |i| Ok(ChannelName::new(format!("{prefix}{}", i % channels))?),
        |client, mut ready| async move { fleet::hold(client, &mut ready).await },
    );
    let start_us = crate::publisher::unix_micros();
    let (_, seconds) = fleet.wait_settled("idle", share.index).await?;
    // Every worker's share settled, then the settle time, then the RSS.
    let settled = match role.step(Part::counted(&fleet.counters)?).await? {
        Ok(all) => {
            if all.established == 0 {
                bail!("no connection could subscribe: {}", all.top_reason());
            }
            tracing::info!(
                "idle: {} connections subscribed; settling for {:?}",
                all.established,
                opts.settle
            );
            // A line a second while it settles: the leader's own clients
            // still held (the members' are counted at the end).
            let live = crate::live::Live::new(share.index);
            let settled_at = tokio::time::Instant::now() + opts.settle;
            let c = &fleet.counters;
            while tokio::time::Instant::now() < settled_at {
                let left = settled_at - tokio::time::Instant::now();
                tokio::time::sleep(left.min(Duration::from_secs(1))).await;
                let held = Counters::get(&c.established).saturating_sub(Counters::get(&c.dropped));
                live.line(&format!(
                    "idle: settling, {:.0} s left; {held} of this worker's {} connections held",
                    settled_at
                        .saturating_duration_since(tokio::time::Instant::now())
                        .as_secs_f64(),
                    Counters::get(&c.established)
                ));
            }
            Some(all)
        }
        Err(_) => None,
    };
    let setup_time = settled.as_ref().map_or(Duration::ZERO, |s| {
        Duration::from_micros(s.settled_at_us.saturating_sub(start_us))
    });
    let rss_after = match settled {
        Some(_) => broker_rss(&broker, &apis).await?,
        None => None,
    };
    role.tell(&serde_json::Value::Null).await?;
    let mut mine = Part::counted(&fleet.counters)?;
    mine.seconds = seconds;
    mine.rss = proc::rss_bytes(Pid::Current)?;
    let udp_drops1 = crate::quic::udp_drops(&transport);
    let held = fleet.stop().await;
    transport.finish().await;
    for h in &held {
        if let Ended::Dropped(code) = h {
            *mine.close_codes.entry(*code).or_default() += 1;
        }
    }
    let Some(total) = role.last(mine).await? else {
        return Ok(Report::new("idle"));
    };
    let own_rss = total.rss;
    let (established, failed, retried) = (total.established, total.failed, total.retried);
    let dropped_before_measure = total.dropped;
    let alive = established.saturating_sub(dropped_before_measure);
    let reasons = total.top_reasons();
    let (_, dropped_codes) = report::tallied_close_codes(&total.close_codes);

    let mut r = Report::new("idle");
    transport.describe(encoding, &mut r);
    r.count("workers", "load tester processes", share.of as u64);
    r.count(
        "connections_requested",
        "connections requested",
        opts.connections as u64,
    );
    r.count(
        "connections_established",
        "connections established",
        established,
    );
    r.count("connect_failures", "connect failures", failed);
    r.count("connect_retries", "connect attempts retried", retried);
    if let Some((reason, n)) = reasons.first() {
        r.text(
            "top_failure",
            "most frequent failure",
            format!("{n} × {reason}"),
        );
    }
    r.count(
        "channels",
        "channels",
        channels.min(opts.connections) as u64,
    );
    r.number(
        "setup_seconds",
        "time to subscribe them all",
        setup_time.as_secs_f64(),
        "s",
        2,
    );
    r.number(
        "settle_seconds",
        "settle time",
        opts.settle.as_secs_f64(),
        "s",
        1,
    );
    r.count(
        "dropped_before_measure",
        "connections dropped before the measurement",
        dropped_before_measure,
    );
    r.count(
        "connections_measured",
        "connections alive at the measurement",
        alive,
    );
    match (rss_before, rss_after) {
        (Some(before), Some(after)) => {
            r.bytes(
                "broker_rss_before_bytes",
                "broker RSS before",
                before as f64,
            );
            r.bytes("broker_rss_after_bytes", "broker RSS after", after as f64);
            if alive > 0 {
                let per = (after as f64 - before as f64) / alive as f64;
                r.bytes(
                    "broker_rss_per_connection_bytes",
                    "broker RSS per idle subscribed connection",
                    per,
                );
            } else {
                r.missing(
                    "broker_rss_per_connection_bytes",
                    "broker RSS per idle subscribed connection",
                    "no connection alive",
                );
            }
        }
        _ => {
            for (k, l) in [
                ("broker_rss_before_bytes", "broker RSS before"),
                ("broker_rss_after_bytes", "broker RSS after"),
                (
                    "broker_rss_per_connection_bytes",
                    "broker RSS per idle subscribed connection",
                ),
            ] {
                r.missing(k, l, "no --broker-pid or --api");
            }
        }
    }
    r.bytes(
        "loadtest_rss_bytes",
        "loadtest RSS, all workers (for information)",
        own_rss as f64,
    );
    r.text(
        "dropped_close_codes",
        "close codes of dropped connections",
        dropped_codes,
    );
    crate::quic::UdpDrops::add_to(
        &mut r,
        udp_drops0,
        udp_drops1,
        "from the first connect to the measurement",
    );
    let title = format!("loadtest idle: {established} connections");
    crate::timeline::add_setups(
        &mut r,
        total.seconds,
        start_us,
        opts.plot.as_deref(),
        &title,
    )?;
    Ok(r)
}
