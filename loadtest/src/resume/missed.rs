//! The scenario's middle: waiting until the broker has seen every client
//! go, and publishing what they miss meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reqwest::Url;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Away, MAX_BATCH, PUBLISH_IN_FLIGHT};
use crate::publisher::batch_refusals;

/// The value of `tether_connections{transport="<transport>"}` in a
/// Prometheus text exposition; `None` when no such sample is there.
pub fn connections_gauge(metrics: &str, transport: &str) -> Option<f64> {
    let label = format!("transport=\"{transport}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("tether_connections{") && l.contains(&label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Polls `GET /metrics` until the broker counts no connection of
/// `transport` (`ws` or `quic`), at most `limit`; returns the time it took
/// (None: not within `limit`) and the last value read.
pub(super) async fn wait_gone(
    http: &reqwest::Client,
    api: &Url,
    transport: &str,
    limit: Duration,
) -> Result<(Option<Duration>, Option<f64>)> {
    let url = api.join("/metrics")?;
    let t0 = Instant::now();
    let mut last = None;
    loop {
        let text = http
            .get(url.clone())
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .text()
            .await
            .with_context(|| format!("GET {url}"))?;
        last = connections_gauge(&text, transport).or(last);
        if last == Some(0.0) {
            return Ok((Some(t0.elapsed()), last));
        }
        if t0.elapsed() >= limit {
            return Ok((None, last));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What publishing the missed messages did.
#[derive(Debug, Default)]
pub(super) struct MissedPublished {
    pub(super) ok: u64,
    pub(super) failed: u64,
    /// Accepted with another offset than the one expected (channel not at
    /// the offset its client last saw).
    pub(super) off_offset: u64,
    pub(super) errors: BTreeMap<String, u64>,
    pub(super) elapsed: Duration,
}

/// Publishes `missed` messages to every client's channel, each client's
/// messages in one request (so in order), `PUBLISH_IN_FLIGHT` requests at
/// once.
pub(super) async fn publish_missed(
    http: &reqwest::Client,
    api: &Url,
    away: &[Away],
    missed: usize,
    payload: usize,
    batch: usize,
) -> Result<MissedPublished> {
    let url = api.join("/v1/publish/batch")?;
    let pad = "x".repeat(payload);
    let clients_per_request = (batch.clamp(1, MAX_BATCH) / missed.max(1)).max(1);
    let permits = Arc::new(Semaphore::new(PUBLISH_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for group in away.chunks(clients_per_request) {
        let mut messages = Vec::with_capacity(group.len() * missed);
        let mut expected = Vec::with_capacity(group.len() * missed);
        for a in group {
            for k in 1..=missed as u64 {
                messages.push(json!({
                    "channel": a.channel.as_str(),
                    "data": {"client": a.index, "k": k, "pad": pad},
                }));
                expected.push(a.base + k);
            }
        }
        let body = json!({ "messages": messages });
        let permit = permits.clone().acquire_owned().await?;
        let (http, url) = (http.clone(), url.clone());
        tasks.spawn(async move {
            let r = crate::publisher::post_json(&http, url, &body).await;
            drop(permit);
            (expected, r)
        });
    }
    let mut out = MissedPublished::default();
    while let Some(joined) = tasks.join_next().await {
        let (expected, result) = joined.context("a publish task failed")?;
        match result {
            Ok(answer) => {
                let refusals = batch_refusals(&answer);
                out.failed += refusals.len() as u64;
                for e in refusals {
                    *out.errors.entry(e).or_default() += 1;
                }
                let results = answer["results"].as_array().cloned().unwrap_or_default();
                for (r, want) in results.iter().zip(&expected) {
                    if let Some(offset) = r.get("offset").and_then(Value::as_u64) {
                        out.ok += 1;
                        if offset != *want {
                            out.off_offset += 1;
                        }
                    }
                }
            }
            Err(e) => {
                out.failed += expected.len() as u64;
                *out.errors.entry(format!("{e:#}")).or_default() += expected.len() as u64;
            }
        }
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_ws_connections_gauge() {
        let text = "# HELP tether_connections Open client connections.\n\
                    # TYPE tether_connections gauge\n\
                    tether_connections{transport=\"quic\"} 3\n\
                    tether_connections{transport=\"ws\"} 12\n\
                    tether_connections_accepted_total{transport=\"ws\"} 40\n";
        assert_eq!(connections_gauge(text, "ws"), Some(12.0));
        assert_eq!(connections_gauge(text, "quic"), Some(3.0));
        assert_eq!(
            connections_gauge("tether_connections{transport=\"ws\"} 0\n", "ws"),
            Some(0.0)
        );
        assert_eq!(connections_gauge("# nothing\n", "ws"), None);
    }
}
