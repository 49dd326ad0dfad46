//! Scenario `idle`: the broker's memory per idle, subscribed connection.
//!
//! Reads the broker's RSS, opens every client (connected and subscribed,
//! client `i` on channel `idle:<i mod channels>`), waits `--settle` seconds
//! while answering heartbeats, reads the RSS again, and reports
//! `(after - before) / connections alive`. Then closes everything.

use std::time::Duration;

use anyhow::{Result, bail};
use tether_protocol::ChannelName;

use crate::fleet::{self, Counters, Ended, Fleet, FleetOptions};
use crate::proc::{self, Pid};
use crate::report::{self, Report};

#[derive(Debug, Clone)]
pub struct IdleOptions {
    pub connections: usize,
    /// Distinct channels; `None`: one per connection.
    pub channels: Option<usize>,
    pub settle: Duration,
    pub broker_pid: Option<u32>,
    /// Prefix of the channel names.
    pub channel_prefix: String,
}

pub async fn run(opts: IdleOptions, fleet_opts: FleetOptions) -> Result<Report> {
    if opts.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let channels = opts.channels.unwrap_or(opts.connections).max(1);
    let broker = opts.broker_pid.map(Pid::Other);
    if let Some(pid) = opts.broker_pid {
        let name = proc::check_running(pid)?;
        tracing::info!(pid, name, "measuring the broker's memory");
    }
    let rss_before = broker.map(proc::rss_bytes).transpose()?;

    let prefix = opts.channel_prefix.clone();
    let (transport, encoding) = (fleet_opts.transport.clone(), fleet_opts.encoding);
    let udp_drops0 = crate::quic::udp_drops(&transport);
    let fleet = Fleet::launch(
        opts.connections,
        fleet_opts,
        move |i| Ok(ChannelName::new(format!("{prefix}{}", i % channels))?),
        |client, mut ready| async move { fleet::hold(client, &mut ready).await },
    );
    let setup_time = fleet.wait_settled("idle").await;
    tracing::info!(
        "idle: {} connections subscribed in {:.1} s; settling for {:?}",
        Counters::get(&fleet.counters.established),
        setup_time.as_secs_f64(),
        opts.settle
    );
    if Counters::get(&fleet.counters.established) > 0 {
        tokio::time::sleep(opts.settle).await;
    }

    let rss_after = broker.map(proc::rss_bytes).transpose()?;
    let own_rss = proc::rss_bytes(Pid::Current)?;
    let udp_drops1 = crate::quic::udp_drops(&transport);
    let established = Counters::get(&fleet.counters.established);
    let failed = Counters::get(&fleet.counters.failed);
    let dropped_before_measure = Counters::get(&fleet.counters.dropped);
    let alive = established.saturating_sub(dropped_before_measure);
    let retried = Counters::get(&fleet.counters.retried);
    let reasons = fleet.counters.failure_reasons();

    let held = fleet.stop().await;
    transport.finish().await;
    let (_, dropped_codes) = report::close_codes(held.iter().filter_map(|h| match h {
        Ended::Dropped(code) => Some(*code),
        Ended::Stopped => None,
    }));

    let mut r = Report::new("idle");
    transport.describe(encoding, &mut r);
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
                r.missing(k, l, "no --broker-pid");
            }
        }
    }
    r.bytes(
        "loadtest_rss_bytes",
        "loadtest RSS (for information)",
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
    Ok(r)
}
