//! The report of a run: named figures rendered once for people (aligned
//! lines) and once as a single JSON line (`--json`), from the same rows, so
//! that the two never disagree. Also the latency summary of an HDR histogram.

use hdrhistogram::Histogram;
use serde_json::{Map, Number, Value};

/// One figure of a report.
#[derive(Debug, Clone)]
struct Row {
    key: &'static str,
    label: &'static str,
    value: Value,
    text: String,
}

/// The figures of one scenario run, in the order they were added, and the
/// violations of the contract found (which make `loadtest` exit with
/// [`EXIT_VIOLATION`]).
#[derive(Debug, Clone)]
pub struct Report {
    scenario: &'static str,
    rows: Vec<Row>,
    violations: Vec<String>,
}

/// Exit status: the run could not be made (bad arguments, broker
/// unreachable, `--timeout`).
pub const EXIT_ERROR: u8 = 1;
/// Exit status: a delivery was silently lost, duplicated or reordered.
pub const EXIT_VIOLATION: u8 = 2;
/// Exit status: an objective given on the command line was missed.
pub const EXIT_SLO: u8 = 3;

impl Report {
    pub fn new(scenario: &'static str) -> Report {
        Report {
            scenario,
            rows: Vec::new(),
            violations: Vec::new(),
        }
    }

    /// Notes a violation of the delivery contract.
    pub fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    /// The violations noted.
    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    /// The JSON value of the figure `key`, if the report has it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.rows.iter().find(|r| r.key == key).map(|r| &r.value)
    }

    /// Any JSON value, shown as `text`.
    pub fn value(&mut self, key: &'static str, label: &'static str, v: Value, text: String) {
        self.push(key, label, v, text);
    }

    fn push(&mut self, key: &'static str, label: &'static str, value: Value, text: String) {
        self.rows.push(Row {
            key,
            label,
            value,
            text,
        });
    }

    /// A count.
    pub fn count(&mut self, key: &'static str, label: &'static str, n: u64) {
        self.push(key, label, Value::from(n), n.to_string());
    }

    /// A measured number with a unit, shown and stored with `decimals` digits.
    pub fn number(
        &mut self,
        key: &'static str,
        label: &'static str,
        v: f64,
        unit: &str,
        decimals: usize,
    ) {
        let text = if unit.is_empty() {
            format!("{v:.decimals$}")
        } else {
            format!("{v:.decimals$} {unit}")
        };
        self.push(key, label, rounded(v, decimals), text);
    }

    /// A size in bytes, shown with its KiB/MiB equivalent.
    pub fn bytes(&mut self, key: &'static str, label: &'static str, b: f64) {
        self.push(key, label, rounded(b, 0), human_bytes(b));
    }

    /// Free text.
    pub fn text(&mut self, key: &'static str, label: &'static str, s: impl Into<String>) {
        let s = s.into();
        self.push(key, label, Value::from(s.clone()), s);
    }

    /// A figure that could not be measured, and why.
    pub fn missing(&mut self, key: &'static str, label: &'static str, why: &str) {
        self.push(key, label, Value::Null, format!("n/a ({why})"));
    }

    /// The report for people: a title line, one aligned line per figure,
    /// then the violations, if any.
    pub fn render(&self) -> String {
        let width = self.rows.iter().map(|r| r.label.len()).max().unwrap_or(0);
        let mut out = format!("== loadtest {} ==\n", self.scenario);
        for r in &self.rows {
            out.push_str(&format!("{:<width$}  {}\n", r.label, r.text));
        }
        for v in &self.violations {
            out.push_str(&format!("VIOLATION: {v}\n"));
        }
        out
    }

    /// The report as one JSON object on one line.
    pub fn json_line(&self) -> String {
        let mut map = Map::new();
        map.insert("scenario".into(), Value::from(self.scenario));
        for r in &self.rows {
            map.insert(r.key.into(), r.value.clone());
        }
        map.insert("violations".into(), Value::from(self.violations.clone()));
        Value::Object(map).to_string()
    }
}

fn rounded(v: f64, decimals: usize) -> Value {
    let scale = 10f64.powi(i32::try_from(decimals).unwrap_or(6));
    let r = (v * scale).round() / scale;
    if decimals == 0 && r.is_finite() && r.abs() < 9.0e15 {
        // Whole numbers stay integers in the JSON line.
        return Value::from(r as i64);
    }
    Number::from_f64(r).map_or(Value::Null, Value::Number)
}

/// `123456` → `"123456 B (120.6 KiB)"`.
pub fn human_bytes(b: f64) -> String {
    const KIB: f64 = 1024.0;
    if b.abs() >= KIB * KIB {
        format!("{b:.0} B ({:.1} MiB)", b / (KIB * KIB))
    } else if b.abs() >= KIB {
        format!("{b:.0} B ({:.2} KiB)", b / KIB)
    } else {
        format!("{b:.0} B")
    }
}

/// Describes close codes counted (`None`: the connection ended without
/// one), e.g. `"1 × no close code, 3 × 4008"`; `"none"` when empty.
pub fn tallied_close_codes(tally: &std::collections::BTreeMap<Option<u16>, u64>) -> (u64, String) {
    let total = tally.values().sum();
    if tally.is_empty() {
        return (0, "none".into());
    }
    let text = tally
        .iter()
        .map(|(c, n)| match c {
            Some(code) => format!("{n} × {code}"),
            None => format!("{n} × no close code"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    (total, text)
}

/// The load tester's own CPU over a window: `loadtest_cpu_seconds`,
/// `loadtest_cpu_cores` and, when it kept at least 90 % of the machine's
/// cores busy, a warning (printed and in the report): the figures then
/// measure the load tester as much as the broker.
pub fn own_cpu(r: &mut Report, cpu: std::time::Duration, window: std::time::Duration) {
    let cores = cpu.as_secs_f64() / window.as_secs_f64().max(1e-9);
    r.number(
        "loadtest_cpu_seconds",
        "loadtest CPU (user + system)",
        cpu.as_secs_f64(),
        "s",
        2,
    );
    r.number(
        "loadtest_cpu_cores",
        "loadtest CPU, cores busy on average",
        cores,
        "",
        2,
    );
    let available = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if cores >= 0.9 * available as f64 {
        let w = format!(
            "the load tester kept {cores:.2} of {available} cores busy: it is the bottleneck; \
             spread it over more processes or machines"
        );
        tracing::warn!("{w}");
        r.text("loadtest_cpu_warning", "WARNING", w);
    }
}

/// Percentiles of a latency histogram recorded in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }

    /// Adds the percentiles to `report`, in milliseconds, keys `{prefix}_p50_ms`….
    pub fn add_to(&self, report: &mut Report, keys: [&'static str; 5], labels: [&'static str; 5]) {
        if self.count == 0 {
            for (k, l) in keys.into_iter().zip(labels) {
                report.missing(k, l, "no samples");
            }
            return;
        }
        let values = [
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
        ];
        for ((k, l), v) in keys.into_iter().zip(labels).zip(values) {
            report.number(k, l, v as f64 / 1000.0, "ms", 3);
        }
    }
}

/// A histogram of microseconds from 1 µs to 10 minutes with two significant
/// digits (values within 1 %): about 10 KiB with `u32` counts, small enough
/// to keep one per client task (clone it) and merge at the end.
pub fn latency_histogram<T: hdrhistogram::Counter>() -> anyhow::Result<Histogram<T>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 2)?)
}

/// Adds the samples of a per-task histogram to the merged one.
pub fn merge_into(total: &mut Histogram<u64>, part: &Histogram<u32>) {
    for v in part.iter_recorded() {
        total.saturating_record_n(v.value_iterated_to(), u64::from(v.count_at_value()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json_come_from_the_same_rows() {
        let mut r = Report::new("idle");
        r.count("connections", "connections established", 10_000);
        r.bytes("rss_per_conn_bytes", "broker RSS per connection", 5_734.4);
        r.number(
            "cpu_us_per_delivery",
            "broker CPU per delivery",
            1.23456,
            "µs",
            2,
        );
        r.missing("rss_before_bytes", "broker RSS before", "no --broker-pid");
        let text = r.render();
        assert!(text.starts_with("== loadtest idle ==\n"), "{text}");
        assert!(
            text.contains("connections established    10000\n"),
            "{text}"
        );
        assert!(text.contains("5734 B (5.60 KiB)"), "{text}");
        assert!(text.contains("1.23 µs"), "{text}");
        assert!(text.contains("n/a (no --broker-pid)"), "{text}");

        let line = r.json_line();
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["scenario"], "idle");
        assert_eq!(v["connections"], 10_000);
        assert_eq!(v["rss_per_conn_bytes"], 5_734);
        assert_eq!(v["cpu_us_per_delivery"], 1.23);
        assert!(v["rss_before_bytes"].is_null());
    }

    #[test]
    fn a_load_tester_using_every_core_is_flagged() {
        use std::time::Duration;
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let window = Duration::from_secs(10);
        let mut busy = Report::new("churn");
        own_cpu(&mut busy, window * cores as u32, window);
        assert!(
            busy.get("loadtest_cpu_warning").is_some(),
            "{}",
            busy.render()
        );
        let mut idle = Report::new("churn");
        own_cpu(&mut idle, Duration::from_millis(100), window);
        assert!(idle.get("loadtest_cpu_warning").is_none());
        assert_eq!(
            idle.get("loadtest_cpu_cores").and_then(Value::as_f64),
            Some(0.01)
        );
    }

    #[test]
    fn close_codes_are_tallied() {
        assert_eq!(
            tallied_close_codes(&Default::default()),
            (0, "none".to_owned())
        );
        let tally = [(Some(4008), 2), (None, 1)].into_iter().collect();
        assert_eq!(
            tallied_close_codes(&tally),
            (3, "1 × no close code, 2 × 4008".to_owned())
        );
    }

    #[test]
    fn human_bytes_picks_a_unit() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(8192.0), "8192 B (8.00 KiB)");
        assert_eq!(human_bytes(3.0 * 1024.0 * 1024.0), "3145728 B (3.0 MiB)");
    }

    #[test]
    fn merged_percentiles_cover_every_task() {
        let mut a = latency_histogram::<u32>().expect("histogram");
        let mut b = latency_histogram::<u32>().expect("histogram");
        for v in 1..=900u64 {
            a.saturating_record(v * 10); // 10 µs .. 9 ms
        }
        for _ in 0..100 {
            b.saturating_record(50_000); // 50 ms
        }
        let mut total = latency_histogram::<u64>().expect("histogram");
        merge_into(&mut total, &a);
        merge_into(&mut total, &b);
        let l = Latency::of(&total);
        assert_eq!(l.count, 1000);
        // Two significant digits: within 1 %.
        let near = |got: u64, want: u64| got.abs_diff(want) * 100 <= want;
        assert!(near(l.p50_us, 5_000), "{l:?}");
        assert!(near(l.p90_us, 9_000), "{l:?}");
        assert!(near(l.p99_us, 50_000), "{l:?}");
        assert!(near(l.max_us, 50_000), "{l:?}");

        let mut r = Report::new("fanout");
        l.add_to(
            &mut r,
            ["p50", "p90", "p99", "p999", "max"],
            ["p50", "p90", "p99", "p99.9", "max"],
        );
        let v: Value = serde_json::from_str(&r.json_line()).expect("json");
        assert!(
            v["p99"]
                .as_f64()
                .is_some_and(|ms| (49.5..=50.5).contains(&ms)),
            "{v}"
        );
    }

    #[test]
    fn an_empty_histogram_reports_no_samples() {
        let mut r = Report::new("fanout");
        Latency::of(&latency_histogram::<u64>().expect("histogram")).add_to(
            &mut r,
            ["a", "b", "c", "d", "e"],
            ["a", "b", "c", "d", "e"],
        );
        assert!(r.render().contains("n/a (no samples)"));
    }
}
