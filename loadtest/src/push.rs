//! Scenario `push`: offline users' publications through the push gateway to
//! a provider, measured at the provider.
//!
//! 1. Starts a fake provider on `--sink` ([`crate::sink`]: APNs and FCM,
//!    HTTP/2 without TLS, as the broker speaks to `--apns-endpoint
//!    http://…` / `--fcm-endpoint http://…`), which notes when each push
//!    (its `channel` and `offset`) arrived and for which device.
//! 2. Registers `--users` devices of `--provider` over the API, one per user
//!    `loadtest-push-<i>`, none with a live session: every publication on
//!    their personal channel goes to push.
//! 3. Publishes `--rate` publications a second for `--duration` seconds to
//!    `user:loadtest-push-<k mod users>` with a `push` object, noting when
//!    each was sent and the answer (channel, offset).
//! 4. Waits until every accepted publication's push has arrived (at most
//!    `--drain-timeout`), then reports pushes per second, publish →
//!    provider latency, and what never arrived or arrived twice (exactly
//!    one push per device per message: either is a violation).
//!
//! The broker must be started with the provider configured and pointed at
//! the sink: APNs with any .p8 key and `--apns-endpoint http://<sink>`; FCM
//! with the service account `loadtest fake-fcm --write-service-account
//! FILE --listen <sink>` writes and `--fcm-endpoint http://<sink>` (give the
//! same FILE to `--service-account` here and the sink checks the broker's
//! grants against its key).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::Url;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::report::{self, Latency, Report};
use crate::sink::Sink;

/// Device registrations in flight at once.
const REGISTER_IN_FLIGHT: usize = 32;
/// Publish requests in flight at most.
const PUBLISH_IN_FLIGHT: usize = 64;

#[derive(Debug, Clone)]
pub struct PushOptions {
    pub api: Url,
    pub api_key: Option<String>,
    pub sink: SocketAddr,
    pub provider: Provider,
    /// The service-account JSON the broker has (FCM): grants are checked
    /// against its key.
    pub account: Option<String>,
    pub users: usize,
    pub rate: f64,
    pub duration: Duration,
    pub drain_timeout: Duration,
}

/// The push provider of the registered devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    Apns,
    Fcm,
}

impl Provider {
    fn platform(self) -> &'static str {
        match self {
            Provider::Apns => "apns",
            Provider::Fcm => "fcm",
        }
    }

    fn token(self, i: usize) -> String {
        match self {
            Provider::Apns => format!("{i:064x}"),
            Provider::Fcm => format!("loadtest-fcm-registration-{i}"),
        }
    }
}

fn user(i: usize) -> String {
    format!("loadtest-push-{i}")
}

async fn register(
    http: &reqwest::Client,
    api: &Url,
    users: usize,
    provider: Provider,
) -> Result<u64> {
    let in_flight = Arc::new(Semaphore::new(REGISTER_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    for i in 0..users {
        let permit = in_flight.clone().acquire_owned().await?;
        let (http, url) = (
            http.clone(),
            api.join(&format!("/v1/devices/loadtest-dev-{i}"))?,
        );
        tasks.spawn(async move {
            let body =
                json!({"user": user(i), "platform": provider.platform(), "token": provider.token(i)});
            let r = http.put(url).json(&body).send().await;
            drop(permit);
            match r {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("HTTP {}", r.status())),
                Err(e) => Err(e.to_string()),
            }
        });
    }
    let mut ok = 0;
    let mut first_error = None;
    while let Some(j) = tasks.join_next().await {
        match j.context("a registration task failed")? {
            Ok(()) => ok += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if ok == 0 {
        bail!(
            "no device could be registered: {}",
            first_error.unwrap_or_default()
        );
    }
    Ok(ok)
}

pub async fn run(opts: PushOptions) -> Result<Report> {
    if opts.users == 0 {
        bail!("--users must be at least 1");
    }
    if !opts.rate.is_finite() || opts.rate <= 0.0 {
        bail!("--rate must be a number above 0");
    }
    let sink = Sink::start(opts.sink, opts.account.as_deref())
        .await
        .context("--sink")?;
    let http = crate::publisher::api_client(opts.api_key.as_deref(), PUBLISH_IN_FLIGHT)?;
    crate::publisher::check_ready(&http, &opts.api).await?;
    let registered = register(&http, &opts.api, opts.users, opts.provider).await?;
    tracing::info!(
        "push: {registered} devices registered; publishing {}/s",
        opts.rate
    );

    // Publish, noting when each accepted publication was sent.
    let sent: Arc<Mutex<HashMap<(String, u64), Instant>>> = Arc::default();
    let failures: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let total = (opts.rate * opts.duration.as_secs_f64()).round().max(1.0) as u64;
    let schedule = crate::publisher::Schedule::new(opts.rate);
    let in_flight = Arc::new(Semaphore::new(PUBLISH_IN_FLIGHT));
    let url = opts.api.join("/v1/publish")?;
    let mut tasks = JoinSet::new();
    let t0 = Instant::now();
    for k in 0..total {
        schedule.wait(k).await;
        // Latency is measured from when publication k was due.
        let due = schedule.due(k);
        let permit = in_flight.clone().acquire_owned().await?;
        let (http, url, sent, failures) =
            (http.clone(), url.clone(), sent.clone(), failures.clone());
        let channel = format!("user:{}", user(k as usize % opts.users));
        tasks.spawn(async move {
            let body = json!({
                "channel": channel,
                "data": {"k": k},
                "push": {"title": "loadtest", "body": format!("message {k}")},
            });
            let at = due;
            let r = crate::publisher::post_json(&http, url, &body).await;
            drop(permit);
            match r {
                Ok(a) => {
                    if let Some(offset) = a["offset"].as_u64() {
                        sent.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert((channel, offset), at);
                    }
                }
                Err(e) => {
                    *failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(format!("{e:#}"))
                        .or_default() += 1;
                }
            }
        });
    }
    while let Some(j) = tasks.join_next().await {
        j.context("a publish task failed")?;
    }
    let publish_time = t0.elapsed();
    let sent = std::mem::take(&mut *sent.lock().unwrap_or_else(|p| p.into_inner()));
    let accepted = sent.len() as u64;

    // Drain: until every accepted publication's push arrived.
    let deadline = Instant::now() + opts.drain_timeout;
    loop {
        let arrived =
            sink.with(|s| sent.keys().filter(|k| s.by_key.contains_key(*k)).count() as u64);
        if arrived >= accepted || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = sink.take();

    let mut latency = report::latency_histogram::<u64>()?;
    let (mut missing, mut unexpected) = (Vec::new(), 0u64);
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    for (key, at) in &sent {
        match seen.by_key.get(key) {
            None => missing.push(key.clone()),
            Some(arrivals) => {
                if let Some(a) = arrivals.iter().map(|a| a.at).min() {
                    let us = a.saturating_duration_since(*at).as_micros();
                    latency.saturating_record(u64::try_from(us).unwrap_or(u64::MAX).max(1));
                }
            }
        }
    }
    for (key, arrivals) in &seen.by_key {
        if !sent.contains_key(key) {
            unexpected += arrivals.len() as u64;
        }
        for a in arrivals.iter().map(|a| a.at) {
            first = Some(first.map_or(a, |f| f.min(a)));
            last = Some(last.map_or(a, |l| l.max(a)));
        }
    }
    let received = seen.pushes();
    let duplicated = seen.duplicated();

    let mut r = Report::new("push");
    r.text("provider", "provider", opts.provider.platform().to_owned());
    r.count(
        "devices",
        "devices registered (no live session)",
        registered,
    );
    r.number("rate_target", "publication rate asked", opts.rate, "/s", 1);
    r.count("publications", "publications accepted", accepted);
    let failed: u64 = failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .sum();
    r.count("publish_failures", "publications failed", failed);
    r.number(
        "publish_seconds",
        "publishing time",
        publish_time.as_secs_f64(),
        "s",
        2,
    );
    r.count("pushes", "pushes received by the provider", received);
    r.count(
        "pushes_missing",
        "accepted publications never pushed",
        missing.len() as u64,
    );
    r.count(
        "pushes_duplicated",
        "pushes received twice or more",
        duplicated,
    );
    r.count(
        "pushes_unexpected",
        "pushes of no accepted publication",
        unexpected,
    );
    r.count(
        "sink_refused",
        "provider requests refused or unreadable",
        seen.refused,
    );
    r.count(
        "sink_untracked",
        "pushes past the sink's 1,000,000 keys (not matched)",
        seen.untracked,
    );
    if opts.provider == Provider::Fcm {
        r.count("sink_grants", "FCM access tokens issued", seen.grants);
    }
    match (first, last) {
        (Some(f), Some(l)) if l > f => r.number(
            "pushes_per_second",
            "pushes per second at the provider",
            received as f64 / (l - f).as_secs_f64(),
            "/s",
            0,
        ),
        _ => r.missing(
            "pushes_per_second",
            "pushes per second at the provider",
            "too few pushes",
        ),
    }
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
            "publish→provider p50",
            "publish→provider p90",
            "publish→provider p99",
            "publish→provider p99.9",
            "publish→provider max",
        ],
    );
    if !missing.is_empty() {
        missing.sort();
        let examples: Vec<String> = missing
            .iter()
            .take(5)
            .map(|(c, o)| format!("{c} offset {o}"))
            .collect();
        r.violation(format!(
            "{} accepted publications were never pushed within {:?}, e.g. {}",
            missing.len(),
            opts.drain_timeout,
            examples.join("; ")
        ));
    }
    if seen.refused > 0 {
        r.violation(format!(
            "the provider refused {} requests, e.g. {}",
            seen.refused,
            seen.refusal_examples.join("; ")
        ));
    }
    if duplicated > 0 {
        r.violation(format!(
            "{duplicated} pushes arrived more than once (one push per device per message)"
        ));
    }
    Ok(r)
}
