//! Scenario `connect-rate`: how fast clients connect and subscribe.
//!
//! Opens `--connections` clients (paced by `--connect-rate`, bounded by
//! `--connect-concurrency`; raise both to find the broker's limit), keeps
//! them open until all have settled, and reports the rate achieved and the
//! distribution of one client's setup time (TCP connect, upgrade,
//! `connect`, `subscribe`, retries included).

use std::time::Duration;

use anyhow::{Result, bail};
use tether_protocol::ChannelName;

use crate::client::Client;
use crate::fleet::{self, Counters, Fleet, FleetOptions, Ready};
use crate::report::{self, Latency, Report};

#[derive(Debug, Clone)]
pub struct ConnectRateOptions {
    pub connections: usize,
    /// Distinct channels; `None`: one per connection.
    pub channels: Option<usize>,
    pub channel_prefix: String,
}

/// Holds the connection until the fleet stops; returns the setup time.
async fn hold(client: Client, mut ready: Ready) -> Duration {
    fleet::hold(client, &mut ready).await;
    ready.setup
}

pub async fn run(opts: ConnectRateOptions, fleet_opts: FleetOptions) -> Result<Report> {
    if opts.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let channels = opts.channels.unwrap_or(opts.connections).max(1);
    let (rate, concurrency) = (fleet_opts.connect_rate, fleet_opts.concurrency);
    let prefix = opts.channel_prefix.clone();
    let (transport, encoding) = (fleet_opts.transport.clone(), fleet_opts.encoding);
    let udp_drops0 = crate::quic::udp_drops(&transport);
    let fleet = Fleet::launch(
        opts.connections,
        fleet_opts,
        move |i| Ok(ChannelName::new(format!("{prefix}{}", i % channels))?),
        hold,
    );
    let elapsed = fleet.wait_settled("connect-rate").await;
    let established = Counters::get(&fleet.counters.established);
    let udp_drops1 = crate::quic::udp_drops(&transport);
    let failed = Counters::get(&fleet.counters.failed);
    let retried = Counters::get(&fleet.counters.retried);
    let reasons = fleet.counters.failure_reasons();
    let setups = fleet.stop().await;
    transport.finish().await;

    let mut hist = report::latency_histogram::<u64>()?;
    for d in &setups {
        hist.saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
    }
    let mut r = Report::new("connect-rate");
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
    r.number(
        "connect_rate_limit",
        "pacing (--connect-rate)",
        rate,
        "/s",
        0,
    );
    r.count(
        "connect_concurrency",
        "setups in flight at most",
        concurrency as u64,
    );
    r.number(
        "elapsed_seconds",
        "time to settle them all",
        elapsed.as_secs_f64(),
        "s",
        3,
    );
    r.number(
        "connections_per_second",
        "connected + subscribed per second",
        established as f64 / elapsed.as_secs_f64().max(1e-9),
        "/s",
        0,
    );
    Latency::of(&hist).add_to(
        &mut r,
        [
            "setup_p50_ms",
            "setup_p90_ms",
            "setup_p99_ms",
            "setup_p999_ms",
            "setup_max_ms",
        ],
        [
            "setup time p50",
            "setup time p90",
            "setup time p99",
            "setup time p99.9",
            "setup time max",
        ],
    );
    crate::quic::UdpDrops::add_to(&mut r, udp_drops0, udp_drops1, "while connecting");
    Ok(r)
}
