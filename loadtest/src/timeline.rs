//! One sample a second while a run goes on, for the live line, the
//! report's `timeline` and `--plot`, in a form that adds up across the
//! workers of a `--workers` run.
//!
//! Every worker's ticks fall on whole seconds of the machine's clock
//! ([`Ticker`]), so a second is named by the Unix second it ends: the
//! leader adds the members' seconds to its own by that name, summing their
//! counts and merging their latency histograms bucket by bucket (the p99 of
//! a merged second is that of every worker's deliveries in it, not an
//! average of p99s).
//!
//! Bounded: one [`Second`] a second of the run, each with only the
//! recorded buckets of that second's latencies (a few hundred at most at
//! two significant digits, typically a few KiB); past [`FULL_SECONDS`] of
//! a run a worker keeps of each older second only its p99, as one bucket
//! (so a long soak's merged p99 of such a second is the p99 of the
//! workers' p99s, weighted by their counts).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::publisher::unix_micros;
use crate::report::Report;

/// One second of one worker (or, merged, of all).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Second {
    /// The Unix second at which it ended.
    pub unix_s: u64,
    /// What it counts in that second: deliveries (or, while connecting,
    /// setups done).
    pub count: u64,
    /// Clients connected at its end.
    pub online: i64,
    /// Clients connected on each node at its end (empty: one node).
    #[serde(default)]
    pub per_node: Vec<i64>,
    /// Running totals at its end (published, drops, …), summed over workers.
    #[serde(default)]
    pub totals: BTreeMap<String, u64>,
    /// The latencies (µs) recorded in it, as `(value, count)` buckets of
    /// [`crate::report::latency_histogram`], by value.
    pub latency: Vec<(u64, u64)>,
}

/// How many of a worker's latest seconds keep all their buckets (two
/// hours); older ones keep their p99 only.
pub const FULL_SECONDS: usize = 7_200;

/// Adds `s` to a worker's seconds, keeping them bounded ([`FULL_SECONDS`]).
pub fn push(seconds: &mut Vec<Second>, s: Second) {
    seconds.push(s);
    if let Some(old) = seconds.len().checked_sub(FULL_SECONDS + 1)
        && let Some(o) = seconds.get_mut(old)
    {
        let n: u64 = o.latency.iter().map(|b| b.1).sum();
        o.latency = o.p99_us().map(|p| vec![(p, n)]).unwrap_or_default();
    }
}

impl Second {
    pub fn new(unix_s: u64, count: u64, online: i64, latency: &Histogram<u64>) -> Second {
        Second {
            unix_s,
            count,
            online,
            per_node: Vec::new(),
            totals: BTreeMap::new(),
            latency: latency
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
    }

    /// The p99 of its latencies, µs (`None`: none recorded): the value of
    /// the bucket the 99th percentile falls in.
    pub fn p99_us(&self) -> Option<u64> {
        let total: u64 = self.latency.iter().map(|b| b.1).sum();
        let rank = (total * 99).div_ceil(100).max(1);
        let mut seen = 0;
        self.latency.iter().find_map(|&(v, n)| {
            seen += n;
            (seen >= rank).then_some(v)
        })
    }

    /// Adds its latencies to `h`.
    pub fn record_into(&self, h: &mut Histogram<u64>) {
        for &(v, n) in &self.latency {
            h.saturating_record_n(v, n);
        }
    }

    /// Adds another worker's same second to this one.
    fn absorb(&mut self, o: Second) {
        self.count += o.count;
        self.online += o.online;
        if self.per_node.len() < o.per_node.len() {
            self.per_node.resize(o.per_node.len(), 0);
        }
        for (mine, theirs) in self.per_node.iter_mut().zip(o.per_node) {
            *mine += theirs;
        }
        for (k, n) in o.totals {
            *self.totals.entry(k).or_default() += n;
        }
        // Both sorted by value, of the same bucketing: merged in one pass.
        let mine = std::mem::take(&mut self.latency);
        let (mut a, mut b) = (
            mine.into_iter().peekable(),
            o.latency.into_iter().peekable(),
        );
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.0 == y.0 => {
                    let (x, y) = (a.next(), b.next());
                    x.zip(y).map(|(x, y)| (x.0, x.1 + y.1))
                }
                (Some(x), Some(y)) if x.0 < y.0 => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, _) => b.next(),
            };
            match next {
                Some(bucket) => self.latency.push(bucket),
                None => break,
            }
        }
    }
}

/// The seconds of a run, all workers' merged by name.
#[derive(Debug, Default)]
pub struct Timeline {
    seconds: BTreeMap<u64, Second>,
}

impl Timeline {
    pub fn of(seconds: impl IntoIterator<Item = Second>) -> Timeline {
        let mut t = Timeline::default();
        t.extend(seconds);
        t
    }

    /// Adds seconds, merging each into the one of the same name.
    pub fn extend(&mut self, seconds: impl IntoIterator<Item = Second>) {
        for s in seconds {
            match self.seconds.get_mut(&s.unix_s) {
                Some(mine) => mine.absorb(s),
                None => {
                    self.seconds.insert(s.unix_s, s);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.seconds.len()
    }

    pub fn seconds(&self) -> impl Iterator<Item = &Second> {
        self.seconds.values()
    }

    /// The seconds in order, as a slice-friendly vector.
    pub fn to_vec(&self) -> Vec<&Second> {
        self.seconds.values().collect()
    }

    /// Seconds since `origin_us` (Unix µs) at which `s` ended.
    fn at(s: &Second, origin_us: u64) -> f64 {
        ((s.unix_s * 1_000_000).saturating_sub(origin_us) as f64 / 1e5).round() / 10.0
    }

    /// The report's `timeline`: per second, `t` (seconds since `origin_us`),
    /// `<count_name>` per second, `p99_ms`, `<online_name>`, the totals and
    /// (several nodes) `online_per_node`.
    pub fn json(&self, origin_us: u64, count_name: &str, online_name: &str) -> Value {
        Value::Array(
            self.seconds()
                .map(|s| {
                    let mut v = json!({
                        "t": Self::at(s, origin_us),
                        count_name: s.count,
                        "p99_ms": s.p99_us().map(|us| us as f64 / 1000.0),
                        online_name: s.online,
                    });
                    if let Value::Object(m) = &mut v {
                        for (k, n) in &s.totals {
                            m.insert(k.clone(), json!(n));
                        }
                        if !s.per_node.is_empty() {
                            m.insert("online_per_node".into(), json!(s.per_node));
                        }
                    }
                    v
                })
                .collect(),
        )
    }

    /// The report's `timeline` row ([`Timeline::json`] with `names`: the
    /// count's and the clients'), and with `--plot` the picture.
    pub fn add_to(
        &self,
        r: &mut Report,
        origin_us: u64,
        names: (&str, &str),
        label: &'static str,
        picture: Option<(&Path, crate::plot::Series<'_>)>,
    ) -> anyhow::Result<()> {
        if let Some((path, series)) = picture {
            crate::plot::svg(path, &series)?;
            r.text("plot", "picture", path.display().to_string());
        }
        r.value(
            "timeline",
            label,
            self.json(origin_us, names.0, names.1),
            format!("{} (in the JSON report)", self.len()),
        );
        Ok(())
    }

    /// The points [`crate::plot::Series::of_seconds`] draws: (seconds since
    /// `origin_us`, p99 µs, count per second, online).
    pub fn points(&self, origin_us: u64) -> Vec<(f64, Option<u64>, f64, f64)> {
        self.seconds()
            .map(|s| {
                (
                    Self::at(s, origin_us),
                    s.p99_us(),
                    s.count as f64,
                    s.online as f64,
                )
            })
            .collect()
    }
}

/// A connecting phase's report rows: `timeline` (per second: `t`,
/// `setups_per_second`, `p99_ms` of the setup times, `connections`, the
/// totals `failed` and `retried`) and, with `--plot`, its picture (whose
/// distribution is that of every setup: each is in one second).
pub fn add_setups(
    r: &mut Report,
    seconds: Vec<Second>,
    origin_us: u64,
    plot: Option<&Path>,
    title: &str,
) -> anyhow::Result<()> {
    let timeline = Timeline::of(seconds);
    let mut all = crate::report::latency_histogram()?;
    for s in timeline.seconds() {
        s.record_into(&mut all);
    }
    let picture = plot.map(|p| {
        let s = crate::plot::Series::of_seconds(title, &all, timeline.points(origin_us));
        (p, s.captioned(crate::plot::SETUPS))
    });
    timeline.add_to(
        r,
        origin_us,
        ("setups_per_second", "connections"),
        "connecting, one sample a second (all workers)",
        picture,
    )
}

/// Latencies recorded between two ticks, by many tasks: a histogram made
/// on the first record and taken whole by the tick.
#[derive(Debug, Default)]
pub struct Window {
    h: Mutex<Option<Histogram<u64>>>,
}

impl Window {
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        let mut w = self.h.lock().unwrap_or_else(|p| p.into_inner());
        if w.is_none() {
            *w = crate::report::latency_histogram().ok();
        }
        if let Some(h) = w.as_mut() {
            h.saturating_record(us);
        }
    }

    /// What was recorded since the last call (empty if nothing was).
    pub fn take(&self) -> anyhow::Result<Histogram<u64>> {
        let taken = self.h.lock().unwrap_or_else(|p| p.into_inner()).take();
        match taken {
            Some(h) => Ok(h),
            None => crate::report::latency_histogram(),
        }
    }
}

/// A tick at every whole second of the machine's clock: every worker's
/// seconds then end at the same instants and carry the same names.
pub struct Ticker {
    interval: tokio::time::Interval,
}

impl Ticker {
    pub fn new() -> Ticker {
        let now = unix_micros();
        let to_next = 1_000_000 - now % 1_000_000;
        let first = tokio::time::Instant::now() + Duration::from_micros(to_next);
        let mut interval = tokio::time::interval_at(first, Duration::from_secs(1));
        // A late tick (a busy machine) is not made up for with a burst.
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticker { interval }
    }

    /// Waits for the next whole second; returns its name (the Unix second,
    /// rounded: a tick a few ms late still names the second it ends).
    pub async fn tick(&mut self) -> u64 {
        self.interval.tick().await;
        (unix_micros() + 500_000) / 1_000_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(unix_s: u64, count: u64, online: i64, latencies: &[u64]) -> Second {
        let mut h = crate::report::latency_histogram().expect("histogram");
        for &us in latencies {
            h.saturating_record(us);
        }
        Second::new(unix_s, count, online, &h)
    }

    #[test]
    fn a_long_run_keeps_its_old_seconds_to_their_p99() {
        let mut v = Vec::new();
        let spread: Vec<u64> = (1..=100).map(|i| i * 1_000).collect();
        for t in 0..(FULL_SECONDS as u64 + 3) {
            push(&mut v, second(t, 100, 1, &spread));
        }
        assert_eq!(v.len(), FULL_SECONDS + 3);
        // The three oldest: one bucket, their p99, all their samples.
        for s in &v[..3] {
            assert_eq!(s.latency.len(), 1, "{:?}", s.latency);
            assert_eq!(s.latency[0].1, 100);
            assert!(s.latency[0].0.abs_diff(99_000) <= 1_000, "{:?}", s.latency);
        }
        assert_eq!(v[3].latency.len(), 100);
        assert_eq!(v[3].p99_us(), v[0].p99_us());
    }

    #[test]
    fn workers_seconds_merge_by_name_through_their_json() {
        // Worker 0: seconds 100 and 101; worker 1: seconds 101 and 102.
        let mut a = vec![
            second(100, 10, 5, &[1_000; 10]),
            second(101, 20, 5, &[1_000; 99]),
        ];
        a[1].totals.insert("drops".into(), 2);
        a[1].per_node = vec![3, 2];
        let mut b = vec![
            second(101, 30, 4, &[50_000]),
            second(102, 40, 4, &[2_000; 40]),
        ];
        b[0].totals.insert("drops".into(), 1);
        b[0].per_node = vec![1, 3];
        let line = serde_json::to_string(&b).expect("serialize");
        let b: Vec<Second> = serde_json::from_str(&line).expect("deserialize");

        let t = Timeline::of(a.into_iter().chain(b));
        assert_eq!(t.len(), 3);
        let s = t.to_vec();
        assert_eq!((s[1].count, s[1].online), (50, 9));
        assert_eq!(s[1].per_node, vec![4, 5]);
        assert_eq!(s[1].totals.get("drops"), Some(&3));
        // 99 at 1 ms and 1 at 50 ms: the merged p99 is 1 ms, the max 50 ms,
        // from the buckets of both workers (two significant digits).
        let mut h = crate::report::latency_histogram::<u64>().expect("histogram");
        s[1].record_into(&mut h);
        assert_eq!(h.len(), 100);
        let p99 = s[1].p99_us().expect("p99");
        assert!(p99.abs_diff(1_000) <= 10, "{p99}");
        assert_eq!(p99, h.value_at_quantile(0.99));
        assert!(h.max().abs_diff(50_000) <= 500); // 1 %: two digits
        // One more past the 99th: the p99 moves to the slow bucket.
        let t2 = Timeline::of([second(7, 1, 1, &[1_000; 98]), second(7, 1, 1, &[50_000; 2])]);
        let p = t2.to_vec()[0].p99_us().expect("p99");
        assert!(p.abs_diff(50_000) <= 500, "{p}");

        let v = t.json(99_500_000, "deliveries_per_second", "online");
        assert_eq!(v[0]["t"], 0.5);
        assert_eq!(v[1]["deliveries_per_second"], 50);
        assert_eq!(v[1]["online"], 9);
        assert_eq!(v[1]["drops"], 3);
        assert_eq!(v[1]["online_per_node"], json!([4, 5]));
        assert!(v[0].get("online_per_node").is_none());
        assert_eq!(t.points(99_000_000)[2], (3.0, s[2].p99_us(), 40.0, 4.0));
    }
}
