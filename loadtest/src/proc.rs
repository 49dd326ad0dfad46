//! What the kernel says about a process: resident memory (`VmRSS` of
//! `/proc/PID/status`) and CPU time (`utime + stime` of `/proc/PID/stat`,
//! in clock ticks, converted with the rate `getconf CLK_TCK` gives). The
//! same for the calling thread alone (`/proc/thread-self/…`), with its time
//! on the CPU in nanoseconds as well (`/proc/thread-self/schedstat`).

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// A process to observe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pid {
    /// The load tester itself.
    Current,
    /// The thread that reads the figure (`/proc/thread-self`): a thread can
    /// only measure itself this way.
    CurrentThread,
    Other(u32),
}

impl Pid {
    fn path(self, file: &str) -> String {
        match self {
            Pid::Current => format!("/proc/self/{file}"),
            Pid::CurrentThread => format!("/proc/thread-self/{file}"),
            Pid::Other(pid) => format!("/proc/{pid}/{file}"),
        }
    }
}

/// Resident memory of `pid`, in bytes.
pub fn rss_bytes(pid: Pid) -> Result<u64> {
    let path = pid.path("status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vmrss(&text).with_context(|| format!("no VmRSS line in {path}"))
}

/// The name of `pid` (the `Name:` line of its status), to log what we watch.
pub fn process_name(pid: Pid) -> Result<String> {
    let path = pid.path("status");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path}: is the process running?"))?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("Name:"))
        .map(|n| n.trim().to_owned())
        .unwrap_or_default())
}

/// CPU time `pid` has used so far (user + system).
pub fn cpu_time(pid: Pid) -> Result<Duration> {
    let path = pid.path("stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_stat_cpu_ticks(&text).with_context(|| format!("parsing {path}"))?;
    Ok(ticks_to_duration(ticks, clock_ticks_per_second()))
}

/// Time `pid` has spent on a CPU so far, in nanoseconds (the first field
/// of `/proc/PID/schedstat`, the scheduler's `sum_exec_runtime`). Without
/// IRQ time accounting it is the same quantity as `utime + stime`, which
/// the kernel derives from it but rounds down to clock ticks (10 ms): use
/// it for short measurements. `None` when the kernel keeps no scheduler
/// statistics (the file is missing or says 0).
pub fn on_cpu_time(pid: Pid) -> Result<Option<Duration>> {
    let path = pid.path("schedstat");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let ns = parse_schedstat_runtime(&text).with_context(|| format!("parsing {path}"))?;
            Ok((ns > 0).then(|| Duration::from_nanos(ns)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {path}")),
    }
}

/// `1255740 75042 2` (run time ns, wait time ns, time slices) → run time ns.
pub fn parse_schedstat_runtime(schedstat: &str) -> Result<u64> {
    let first = schedstat
        .split_whitespace()
        .next()
        .context("schedstat is empty")?;
    first
        .parse::<u64>()
        .with_context(|| format!("schedstat run time is {first:?}, not a number"))
}

/// `VmRSS:   1234 kB` → bytes.
pub fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut parts = line.split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(n * 1024),
        Some(_) => None,
    }
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line, in ticks.
/// The command name (field 2) is in parentheses and may itself hold spaces
/// and parentheses, so fields are counted from the last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Result<u64> {
    let close = stat.rfind(')').context("no ')' after the command name")?;
    // After ')': field 3 (state) is the first; utime is field 14.
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        let s = fields
            .get(n - 3)
            .with_context(|| format!("stat has no field {n}"))?;
        s.parse::<u64>()
            .with_context(|| format!("stat field {n} is {s:?}, not a number"))
    };
    Ok(field(14)? + field(15)?)
}

pub fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    let per_second = per_second.max(1);
    Duration::from_secs(ticks / per_second)
        + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second)
}

/// The kernel's clock tick rate (`getconf CLK_TCK`), asked once; 100 when
/// `getconf` cannot tell.
pub fn clock_ticks_per_second() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// Checks that `pid` names a running process; returns its name.
pub fn check_running(pid: u32) -> Result<String> {
    if pid == 0 {
        bail!("--broker-pid 0 is not a process id");
    }
    process_name(Pid::Other(pid))
}

/// The broker processes on this machine to measure (`--broker-pid`, one
/// per node), their figures summed; none: nothing to measure.
#[derive(Debug, Clone, Default)]
pub struct Brokers(Vec<u32>);

impl Brokers {
    /// Checks that each is running and logs what is measured.
    pub fn new(pids: Vec<u32>, what: &str) -> Result<Brokers> {
        for &pid in &pids {
            let name = check_running(pid)?;
            tracing::info!(pid, name, "measuring the broker's {what}");
        }
        Ok(Brokers(pids))
    }

    /// Their resident memory, summed.
    pub fn rss(&self) -> Result<Option<u64>> {
        self.sum(|pid| rss_bytes(Pid::Other(pid)))
    }

    /// Their CPU time so far, summed.
    pub fn cpu(&self) -> Result<Option<Duration>> {
        self.sum(|pid| cpu_time(Pid::Other(pid)))
    }

    fn sum<T: std::iter::Sum<T>>(&self, f: impl Fn(u32) -> Result<T>) -> Result<Option<T>> {
        if self.0.is_empty() {
            return Ok(None);
        }
        self.0
            .iter()
            .map(|&pid| f(pid))
            .sum::<Result<T>>()
            .map(Some)
    }
}

/// `tether_resident_memory_bytes` of one node's GET /metrics.
pub async fn metrics_rss(http: &reqwest::Client, api: &reqwest::Url) -> Option<u64> {
    let text = http
        .get(api.join("/metrics").ok()?)
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .text()
        .await
        .ok()?;
    parse_metric(&text, "tether_resident_memory_bytes")
}

/// The value of an unlabelled metric in a Prometheus text exposition.
pub fn parse_metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
            .map(|v| v as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resident_memory_is_read_from_the_metrics_text() {
        let text = "# HELP tether_resident_memory_bytes x\n# TYPE tether_resident_memory_bytes gauge\n\
                    tether_resident_memory_bytes_other 5\ntether_resident_memory_bytes 123456\n# EOF\n";
        assert_eq!(
            parse_metric(text, "tether_resident_memory_bytes"),
            Some(123_456)
        );
        assert_eq!(
            parse_metric("# EOF\n", "tether_resident_memory_bytes"),
            None
        );
    }

    #[test]
    fn parses_vmrss_in_bytes() {
        let status = "Name:\tbroker\nVmPeak:\t  9999 kB\nVmRSS:\t   2048 kB\nThreads:\t3\n";
        assert_eq!(parse_vmrss(status), Some(2048 * 1024));
        assert_eq!(parse_vmrss("Name:\tx\n"), None);
    }

    #[test]
    fn parses_utime_and_stime_after_an_awkward_command_name() {
        // comm holds a space and a ')': fields must be counted from the last ')'.
        let stat = "4242 (my ) broker) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    350 25 0 0 20 0 3 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat).expect("parses"), 375);
        assert!(parse_stat_cpu_ticks("4242 (x) S 1 2").is_err());
        assert!(parse_stat_cpu_ticks("no parens at all").is_err());
    }

    #[test]
    fn parses_the_run_time_of_schedstat() {
        assert_eq!(
            parse_schedstat_runtime("1255740 75042 2\n").expect("parses"),
            1_255_740
        );
        assert!(parse_schedstat_runtime("").is_err());
        assert!(parse_schedstat_runtime("x 1 2").is_err());
    }

    #[test]
    fn reads_its_own_thread() {
        // Burn a little CPU so that the run time has moved since the thread began.
        let mut x = 0u64;
        for i in 0..100_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        cpu_time(Pid::CurrentThread).expect("thread cpu");
        if let Some(t) = on_cpu_time(Pid::CurrentThread).expect("thread schedstat") {
            assert!(t > Duration::ZERO);
        }
    }

    #[test]
    fn converts_ticks_with_the_tick_rate() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(3, 1000), Duration::from_millis(3));
    }

    #[test]
    fn reads_its_own_process() {
        assert!(rss_bytes(Pid::Current).expect("rss") > 0);
        cpu_time(Pid::Current).expect("cpu");
        assert!(clock_ticks_per_second() > 0);
    }
}
