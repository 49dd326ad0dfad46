//! The backend side of the fan-out scenario: publications over the HTTP API
//! at a fixed rate, each stamped with the time it was sent.
//!
//! Publication `k` is due at `start + k / rate` (in batches of `batch` with
//! `POST /v1/publish/batch` when `batch > 1`), a fixed arrival rate
//! ([`Schedule`]). Requests run concurrently, at most `max_in_flight` at
//! once, so that one slow answer does not shift the schedule of the next
//! ones; each publication carries the time it was *due*, so that a wait for
//! a free request slot counts as latency instead of being hidden.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use reqwest::Url;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[derive(Debug, Clone)]
pub struct PublishPlan {
    pub api: Url,
    pub channel: String,
    /// Publications per second.
    pub rate: f64,
    pub duration: Duration,
    /// Bytes of padding in each publication's data.
    pub payload: usize,
    /// Publications per request.
    pub batch: usize,
    pub max_in_flight: usize,
}

impl PublishPlan {
    /// Publications in the whole run.
    pub fn total(&self) -> u64 {
        (self.rate * self.duration.as_secs_f64()).round().max(1.0) as u64
    }
}

/// What the publisher did.
#[derive(Debug, Default)]
pub struct Published {
    /// Publications the API accepted.
    pub ok: u64,
    /// Publications refused or whose request failed.
    pub failed: u64,
    /// Why, and how often.
    pub errors: BTreeMap<String, u64>,
    /// From the first request sent to the last answer received.
    pub elapsed: Duration,
}

/// A fixed arrival schedule: request `k` is due at `start + k × period`.
///
/// Latency is measured from that due time, not from when the request went
/// out: when the broker slows down and the load tester's requests wait for
/// a free slot (`max_in_flight`), the wait counts as latency, as it would
/// for the user whose message waited. Measuring from the actual send time
/// hides exactly the slow moments (coordinated omission).
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    start_us: u64,
    period: Duration,
}

impl Schedule {
    /// `per_second` requests a second, from now.
    pub fn new(per_second: f64) -> Schedule {
        Schedule {
            start: Instant::now(),
            start_us: unix_micros(),
            period: Duration::from_secs_f64(1.0 / per_second.max(0.001)),
        }
    }

    /// When request `k` is due, as an instant.
    pub fn due(&self, k: u64) -> Instant {
        self.start + self.period.mul_f64(k as f64)
    }

    /// When request `k` is due, in unix µs (what the publication carries).
    pub fn due_us(&self, k: u64) -> u64 {
        self.start_us.saturating_add(
            u64::try_from(self.period.mul_f64(k as f64).as_micros()).unwrap_or(u64::MAX),
        )
    }

    /// Waits until request `k` is due (at once if it is late); returns its
    /// due time in unix µs.
    pub async fn wait(&self, k: u64) -> u64 {
        tokio::time::sleep_until(self.due(k).into()).await;
        self.due_us(k)
    }
}

/// Unix time in microseconds.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An HTTP client for the backend API, with the API key on every request.
pub fn api_client(api_key: Option<&str>, pool: usize) -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = api_key {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .context("--api-key is not a valid header value")?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(pool)
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// Checks that the API answers `GET /readyz` with 200.
pub async fn check_ready(http: &reqwest::Client, api: &Url) -> Result<()> {
    let url = api.join("/readyz")?;
    let resp = http
        .get(url.clone())
        .send()
        .await
        .with_context(|| format!("GET {url}: is the broker's API listening there?"))?;
    if !resp.status().is_success() {
        bail!("GET {url} answered {}", resp.status());
    }
    Ok(())
}

/// Publishes according to `plan`.
pub async fn run(http: reqwest::Client, plan: &PublishPlan) -> Result<Published> {
    let batch = plan.batch.max(1);
    let single = plan.api.join("/v1/publish")?;
    let multi = plan.api.join("/v1/publish/batch")?;
    let pad = "x".repeat(plan.payload);
    let total = plan.total();
    let requests = total.div_ceil(batch as u64);
    let schedule = Schedule::new(plan.rate.max(0.001) / batch as f64);
    let in_flight = Arc::new(Semaphore::new(plan.max_in_flight.max(1)));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    let mut sent = 0u64;
    for r in 0..requests {
        let due_us = schedule.wait(r).await;
        let permit = in_flight.clone().acquire_owned().await?;
        let n = (total - sent).min(batch as u64);
        sent += n;
        let data = || json!({"channel": plan.channel, "data": {"sent_us": due_us, "pad": pad}});
        let (url, body) = if batch == 1 {
            (single.clone(), data())
        } else {
            let messages: Vec<Value> = (0..n).map(|_| data()).collect();
            (multi.clone(), json!({ "messages": messages }))
        };
        let http = http.clone();
        tasks.spawn(async move {
            let r = post(&http, url, &body, n).await;
            drop(permit);
            (n, r)
        });
    }
    let mut out = Published::default();
    while let Some(joined) = tasks.join_next().await {
        let (n, result) = joined.context("a publish task failed")?;
        match result {
            Ok(refused) => {
                out.ok += n - refused.len() as u64;
                out.failed += refused.len() as u64;
                for e in refused {
                    *out.errors.entry(e).or_default() += 1;
                }
            }
            Err(e) => {
                out.failed += n;
                *out.errors.entry(format!("{e:#}")).or_default() += n;
            }
        }
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

/// POSTs `body` to `url`; the JSON answer of a 2xx, else an error naming
/// the status and the answer's `error.code`.
pub async fn post_json(http: &reqwest::Client, url: Url, body: &Value) -> Result<Value> {
    let resp = http
        .post(url)
        .json(body)
        .send()
        .await
        .context("publish request")?;
    let status = resp.status();
    let answer: Value = resp.json().await.context("publish answer")?;
    if !status.is_success() {
        bail!(
            "HTTP {status}: {}",
            answer["error"]["code"].as_str().unwrap_or("?")
        );
    }
    Ok(answer)
}

/// Sends one request; returns the refusals of a batch (empty: all accepted).
async fn post(http: &reqwest::Client, url: Url, body: &Value, n: u64) -> Result<Vec<String>> {
    let answer = post_json(http, url, body).await?;
    if n == 1 && answer.get("results").is_none() {
        return Ok(Vec::new());
    }
    Ok(batch_refusals(&answer))
}

/// The `error.code`s of a batch answer's results.
pub fn batch_refusals(answer: &Value) -> Vec<String> {
    answer["results"]
        .as_array()
        .map(|results| {
            results
                .iter()
                .filter_map(|r| r.get("error"))
                .map(|e| e["code"].as_str().unwrap_or("unknown").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_round_to_whole_publications() {
        let plan = PublishPlan {
            api: Url::parse("http://127.0.0.1:8081").expect("url"),
            channel: "fanout".into(),
            rate: 20.0,
            duration: Duration::from_secs(10),
            payload: 100,
            batch: 1,
            max_in_flight: 8,
        };
        assert_eq!(plan.total(), 200);
        let short = PublishPlan {
            rate: 0.5,
            duration: Duration::from_secs(1),
            ..plan
        };
        assert_eq!(short.total(), 1);
    }

    #[test]
    fn the_schedule_is_fixed_from_the_start() {
        let s = Schedule::new(1000.0);
        // 1 ms apart, whatever the time they were asked at.
        assert_eq!(s.due_us(0), s.start_us);
        assert_eq!(s.due_us(2500) - s.due_us(0), 2_500_000);
        assert_eq!(s.due(10) - s.due(0), Duration::from_millis(10));
    }

    #[test]
    fn batch_answers_are_sorted_into_refusals() {
        let answer = json!({"results": [
            {"channel": "c", "epoch": "e", "offset": 1},
            {"error": {"code": "too_large", "message": "…"}},
            {"channel": "c", "epoch": "e", "offset": 2},
        ]});
        assert_eq!(batch_refusals(&answer), vec!["too_large".to_owned()]);
        assert!(batch_refusals(&json!({"channel": "c"})).is_empty());
    }
}
