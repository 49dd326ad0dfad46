//! Scenario `connect-rate`: how fast clients connect and subscribe.
//!
//! Opens `--connections` clients (paced by `--connect-rate`, bounded by
//! `--connect-concurrency`; raise both to find the broker's limit), keeps
//! them open until all have settled, and reports the rate achieved and the
//! distribution of one client's setup time (TCP connect, upgrade,
//! `connect`, `subscribe`, retries included). With `--workers N` every
//! worker opens its share and holds it until all have settled.

use std::time::Duration;

use anyhow::{Result, bail};
use tether_protocol::ChannelName;

use crate::client::Client;
use crate::crew::{Part, Role, Share};
use crate::fleet::{self, Fleet, FleetOptions, Ready};
use crate::report::{Latency, Report};

#[derive(Debug, Clone)]
pub struct ConnectRateOptions {
    pub connections: usize,
    /// Distinct channels; `None`: one per connection.
    pub channels: Option<usize>,
    pub channel_prefix: String,
    /// Draw the run here (SVG).
    pub plot: Option<std::path::PathBuf>,
}

/// Holds the connection until the fleet stops; returns the setup time.
async fn hold(client: Client, mut ready: Ready) -> Duration {
    fleet::hold(client, &mut ready).await;
    ready.setup
}

pub async fn run(
    opts: ConnectRateOptions,
    fleet_opts: FleetOptions,
    mut role: Role,
    share: Share,
) -> Result<Report> {
    if opts.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let channels = opts.channels.unwrap_or(opts.connections).max(1);
    let (rate, concurrency) = (
        fleet_opts.connect_rate * share.of as f64,
        fleet_opts.concurrency * share.of,
    );
    let prefix = opts.channel_prefix.clone();
    let (transport, encoding) = (fleet_opts.transport.clone(), fleet_opts.encoding);
    let udp_drops0 = crate::quic::udp_drops(&transport);
    let start_us = crate::publisher::unix_micros();
    let fleet = Fleet::launch(
        share.range(opts.connections),
        fleet_opts,
        move |i| Ok(ChannelName::new(format!("{prefix}{}", i % channels))?),
        hold,
    );
    let (_, seconds) = fleet.wait_settled("connect-rate", share.index).await?;
    let udp_drops1 = crate::quic::udp_drops(&transport);
    // Every worker holds its connections until all have settled.
    let step = role.step(Part::counted(&fleet.counters)?).await?;
    role.tell(&serde_json::Value::Null).await?;
    let setups = fleet.stop().await;
    transport.finish().await;
    let mut mine = Part::new()?;
    mine.seconds = seconds;
    for d in &setups {
        mine.setup
            .saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
    }
    let (Ok(settled), Some(total)) = (step, role.last(mine).await?) else {
        return Ok(Report::new("connect-rate"));
    };
    let (established, failed, retried) = (settled.established, settled.failed, settled.retried);
    let reasons = settled.top_reasons();
    if established == 0 {
        bail!(
            "no connection could subscribe: {}",
            fleet::top_reason(&reasons)
        );
    }
    let elapsed = std::time::Duration::from_micros(settled.settled_at_us.saturating_sub(start_us));
    let hist = total.setup;
    let mut r = Report::new("connect-rate");
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
    let title =
        format!("loadtest connect-rate: {established} connections, --connect-rate {rate}/s");
    crate::timeline::add_setups(
        &mut r,
        total.seconds,
        start_us,
        opts.plot.as_deref(),
        &title,
    )?;
    Ok(r)
}
