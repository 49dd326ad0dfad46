//! `--workers N`: one run spread over N processes of this binary.
//!
//! One process holds at most ~19,900 sockets here (the file-descriptor
//! limit), and one process's clients share its threads: for bigger runs
//! the process the operator started (the *leader*, worker 0) starts N − 1
//! *members*: the same binary with the same arguments plus a hidden
//! `--worker-index I`. Each opens its own share of the clients ([`Share`]:
//! a contiguous block of client numbers, so channel names and node choice
//! are those of a one-process run) at its share of `--connect-rate`.
//!
//! The leader alone talks to the broker's API, reads the broker's memory
//! and CPU, publishes, and prints the report. It and the members speak in
//! JSON lines over the members' stdin and stdout: a member sends a
//! [`Part`] when it reaches a step of the scenario (its clients settled,
//! its deliveries drained) and waits for the leader's word to go on. The
//! leader adds every member's part to its own: counts are summed and HDR
//! histograms merged bucket by bucket (exact, not an average of
//! percentiles). A member that dies fails the run, naming it.

use std::collections::BTreeMap;
use std::ops::Range;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::fleet::Counters;
use crate::timeline::Second;

/// This process's share of a run of `of` workers: worker `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub index: usize,
    pub of: usize,
}

impl Share {
    /// This worker's block of `0..n`: the blocks of all workers cover it
    /// once, and differ in size by one at most.
    pub fn range(&self, n: usize) -> Range<usize> {
        let of = self.of.max(1);
        (n * self.index / of)..(n * (self.index + 1) / of)
    }

    /// This worker's part of a rate (connections per second).
    pub fn rate(&self, r: f64) -> f64 {
        r / self.of.max(1) as f64
    }
}

/// What a worker counted, in a form that adds up across workers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Part {
    pub established: u64,
    pub failed: u64,
    pub retried: u64,
    /// Connections that ended before the leader measured.
    pub dropped: u64,
    /// Setup failures by reason.
    pub reasons: BTreeMap<String, u64>,
    /// Close codes of the connections that ended (`None`: no close code).
    #[serde(with = "pairs")]
    pub close_codes: BTreeMap<Option<u16>, u64>,
    /// Setup times, µs.
    #[serde(with = "buckets")]
    pub setup: Histogram<u64>,
    /// Publish → deliver latencies, µs.
    #[serde(with = "buckets")]
    pub latency: Histogram<u64>,
    pub delivered: u64,
    pub skipped: u64,
    pub not_increasing: u64,
    pub epoch_changes: u64,
    pub bad_payload: u64,
    /// Unix µs when this worker's clients had all settled.
    pub settled_at_us: u64,
    pub last_delivery_us: Option<u64>,
    /// This worker's CPU time over the measured window, µs.
    pub cpu_us: u64,
    /// Its RSS, bytes.
    pub rss: u64,
    /// What a scenario counts beyond these (`churn`: its figures and the
    /// ledger's verdict for the worker's clients), one per worker.
    #[serde(default)]
    pub extras: Vec<Value>,
    /// The worker's seconds ([`crate::timeline`]), merged by the leader.
    #[serde(default)]
    pub seconds: Vec<Second>,
}

impl Part {
    pub fn new() -> Result<Part> {
        Ok(Part {
            established: 0,
            failed: 0,
            retried: 0,
            dropped: 0,
            reasons: BTreeMap::new(),
            close_codes: BTreeMap::new(),
            setup: crate::report::latency_histogram()?,
            latency: crate::report::latency_histogram()?,
            delivered: 0,
            skipped: 0,
            not_increasing: 0,
            epoch_changes: 0,
            bad_payload: 0,
            settled_at_us: 0,
            last_delivery_us: None,
            cpu_us: 0,
            rss: 0,
            extras: Vec::new(),
            seconds: Vec::new(),
        })
    }

    /// The setup counters of a fleet.
    pub fn counted(c: &Counters) -> Result<Part> {
        let mut p = Part::new()?;
        p.established = Counters::get(&c.established);
        p.failed = Counters::get(&c.failed);
        p.retried = Counters::get(&c.retried);
        p.dropped = Counters::get(&c.dropped);
        p.reasons = c.failure_reasons().into_iter().collect();
        p.settled_at_us = crate::publisher::unix_micros();
        Ok(p)
    }

    /// Adds another worker's part to this one.
    pub fn absorb(&mut self, o: Part) {
        self.established += o.established;
        self.failed += o.failed;
        self.retried += o.retried;
        self.dropped += o.dropped;
        for (k, n) in o.reasons {
            *self.reasons.entry(k).or_default() += n;
        }
        for (k, n) in o.close_codes {
            *self.close_codes.entry(k).or_default() += n;
        }
        // Same bounds on both sides: the merge is bucket for bucket.
        let _ = self.setup.add(&o.setup);
        let _ = self.latency.add(&o.latency);
        self.delivered += o.delivered;
        self.skipped += o.skipped;
        self.not_increasing += o.not_increasing;
        self.epoch_changes += o.epoch_changes;
        self.bad_payload += o.bad_payload;
        self.settled_at_us = self.settled_at_us.max(o.settled_at_us);
        self.last_delivery_us = self.last_delivery_us.max(o.last_delivery_us);
        self.cpu_us += o.cpu_us;
        self.rss += o.rss;
        self.extras.extend(o.extras);
        self.seconds.extend(o.seconds);
    }

    /// The most frequent setup failure, as `N × reason`.
    pub fn top_reason(&self) -> String {
        crate::fleet::top_reason(&self.top_reasons())
    }

    /// The setup failures by reason, most frequent first (as
    /// [`Counters::failure_reasons`]).
    pub fn top_reasons(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self.reasons.iter().map(|(k, n)| (k.clone(), *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

/// A histogram as its recorded buckets, `[[value, count], …]`, read back
/// into a histogram with the bounds of [`crate::report::latency_histogram`].
mod buckets {
    use hdrhistogram::Histogram;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value())),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let pairs = Vec::<(u64, u64)>::deserialize(d)?;
        let mut h = crate::report::latency_histogram().map_err(serde::de::Error::custom)?;
        for (v, n) in pairs {
            h.saturating_record_n(v, n);
        }
        Ok(h)
    }
}

/// A map whose keys are not strings, as `[[key, value], …]` in JSON.
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<Option<u16>, u64>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<Option<u16>, u64>, D::Error> {
        Ok(Vec::<(Option<u16>, u64)>::deserialize(d)?
            .into_iter()
            .collect())
    }
}

/// The members of a run, as seen by its leader.
#[derive(Debug)]
pub struct Crew {
    members: Vec<Member>,
}

#[derive(Debug)]
struct Member {
    index: usize,
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

/// How long the leader waits for a member's next part: past it the member
/// is taken for stuck and the run fails (the scenario's own timeouts are
/// shorter).
const PART_TIMEOUT: Duration = Duration::from_secs(3600);

impl Crew {
    /// Starts workers 1..`of` of this run: this binary with this process's
    /// arguments and `--worker-index I`. Their logs go to this process's
    /// stderr (warnings only, unless `LOADTEST_LOG` says otherwise).
    pub fn start(of: usize) -> Result<Crew> {
        let exe = std::env::current_exe().context("finding this binary to start the workers")?;
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        let mut members = Vec::with_capacity(of.saturating_sub(1));
        for index in 1..of {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args(&args)
                .arg(format!("--worker-index={index}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            if std::env::var_os("LOADTEST_LOG").is_none() {
                cmd.env("LOADTEST_LOG", "warn");
            }
            let mut child = cmd
                .spawn()
                .with_context(|| format!("starting worker {index} ({})", exe.display()))?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                bail!("worker {index} has no stdin/stdout pipe");
            };
            members.push(Member {
                index,
                child,
                stdin,
                lines: BufReader::new(stdout).lines(),
            });
        }
        Ok(Crew { members })
    }

    /// The next part of every member, added up (`None` if there is no member).
    pub async fn gather(&mut self) -> Result<Option<Part>> {
        let mut total: Option<Part> = None;
        for m in &mut self.members {
            let line = tokio::time::timeout(PART_TIMEOUT, m.lines.next_line())
                .await
                .with_context(|| format!("worker {} sent nothing for {PART_TIMEOUT:?}", m.index))?
                .with_context(|| format!("reading worker {}", m.index))?;
            let Some(line) = line else {
                let status = m.child.wait().await.ok();
                bail!(
                    "worker {} ended early ({}); its log is above",
                    m.index,
                    status.map_or("status unknown".into(), |s| s.to_string())
                );
            };
            let part: Part = serde_json::from_str(&line)
                .with_context(|| format!("worker {} sent an unreadable part", m.index))?;
            match &mut total {
                Some(t) => t.absorb(part),
                None => total = Some(part),
            }
        }
        Ok(total)
    }

    /// Tells every member to go on, with `word`.
    pub async fn tell(&mut self, word: &Value) -> Result<()> {
        let line = format!("{word}\n");
        for m in &mut self.members {
            m.stdin
                .write_all(line.as_bytes())
                .await
                .with_context(|| format!("telling worker {}", m.index))?;
            m.stdin.flush().await?;
        }
        Ok(())
    }

    /// Waits for every member to exit; an error names one that failed.
    pub async fn finish(self) -> Result<()> {
        for mut m in self.members {
            drop(m.stdin);
            let status = tokio::time::timeout(Duration::from_secs(60), m.child.wait())
                .await
                .with_context(|| format!("worker {} did not exit", m.index))??;
            if !status.success() {
                bail!("worker {} exited with {status}", m.index);
            }
        }
        Ok(())
    }
}

/// A member's line to its leader.
#[derive(Debug)]
pub struct Link {
    lines: Lines<BufReader<tokio::io::Stdin>>,
    stdout: tokio::io::Stdout,
}

impl Link {
    pub fn new() -> Link {
        Link {
            lines: BufReader::new(tokio::io::stdin()).lines(),
            stdout: tokio::io::stdout(),
        }
    }

    /// Sends a part to the leader.
    pub async fn send(&mut self, part: &Part) -> Result<()> {
        let line = serde_json::to_string(part)? + "\n";
        self.stdout.write_all(line.as_bytes()).await?;
        self.stdout.flush().await?;
        Ok(())
    }

    /// Waits for the leader's word (an error if the leader is gone).
    pub async fn word(&mut self) -> Result<Value> {
        let Some(line) = self.lines.next_line().await? else {
            bail!("the leader is gone");
        };
        Ok(serde_json::from_str(&line)?)
    }
}

/// This process's role in the run.
#[derive(Debug)]
pub enum Role {
    /// The only worker.
    Solo,
    /// Worker 0: starts the others, adds their parts to its own, reports.
    Leader(Crew),
    /// Worker I > 0: sends its parts, does as it is told, reports nothing.
    Member(Link),
}

impl Role {
    /// The role of a process started with `--workers of` (and, for a
    /// member, `--worker-index index`).
    pub fn start(share: Share) -> Result<Role> {
        Ok(match (share.of, share.index) {
            (0 | 1, _) => Role::Solo,
            (of, 0) => Role::Leader(Crew::start(of)?),
            _ => Role::Member(Link::new()),
        })
    }

    /// One step of the scenario: a member sends `mine` and waits for the
    /// leader's word (returned as `Err(word)`); the leader or a solo worker
    /// gets `mine` with every member's part added (`Ok`), and the members
    /// wait until it calls [`Role::tell`].
    pub async fn step(&mut self, mut mine: Part) -> Result<std::result::Result<Part, Value>> {
        match self {
            Role::Solo => Ok(Ok(mine)),
            Role::Leader(crew) => {
                if let Some(theirs) = crew.gather().await? {
                    mine.absorb(theirs);
                }
                Ok(Ok(mine))
            }
            Role::Member(link) => {
                link.send(&mine).await?;
                Ok(Err(link.word().await?))
            }
        }
    }

    /// The leader's word to the members after a step (nothing otherwise).
    pub async fn tell(&mut self, word: &Value) -> Result<()> {
        match self {
            Role::Leader(crew) => crew.tell(word).await,
            Role::Solo | Role::Member(_) => Ok(()),
        }
    }

    /// The last step: a member sends its final part and is done; the leader
    /// gets the total and waits for the members to exit.
    pub async fn last(self, mut mine: Part) -> Result<Option<Part>> {
        match self {
            Role::Solo => Ok(Some(mine)),
            Role::Leader(mut crew) => {
                if let Some(theirs) = crew.gather().await? {
                    mine.absorb(theirs);
                }
                crew.finish().await?;
                Ok(Some(mine))
            }
            Role::Member(mut link) => {
                link.send(&mine).await?;
                Ok(None)
            }
        }
    }

    pub fn is_member(&self) -> bool {
        matches!(self, Role::Member(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Latency;

    #[test]
    fn shares_cover_every_client_once() {
        for of in 1..=7 {
            let mut next = 0;
            for index in 0..of {
                let r = Share { index, of }.range(100_003);
                assert_eq!(r.start, next, "{of} workers");
                assert!(r.len().abs_diff(100_003 / of) <= 1);
                next = r.end;
            }
            assert_eq!(next, 100_003);
        }
        assert_eq!(Share { index: 0, of: 1 }.range(5), 0..5);
    }

    #[test]
    fn parts_add_up_through_their_json() {
        let mut a = Part::new().expect("part");
        let mut b = Part::new().expect("part");
        for v in 1..=900u64 {
            a.latency.saturating_record(v * 10); // 10 µs .. 9 ms
        }
        for _ in 0..100 {
            b.latency.saturating_record(50_000); // 50 ms
        }
        a.established = 3;
        b.established = 4;
        a.reasons.insert("refused".into(), 2);
        b.reasons.insert("refused".into(), 1);
        b.reasons.insert("timeout".into(), 5);
        b.close_codes.insert(Some(4008), 1);
        b.close_codes.insert(None, 2);
        a.last_delivery_us = Some(10);
        b.last_delivery_us = Some(20);

        // As a member sends it and the leader reads it.
        let line = serde_json::to_string(&b).expect("serialize");
        let b: Part = serde_json::from_str(&line).expect("deserialize");
        a.absorb(b);

        assert_eq!(a.established, 7);
        assert_eq!(
            a.top_reasons(),
            vec![("timeout".to_owned(), 5), ("refused".to_owned(), 3)]
        );
        assert_eq!(a.close_codes.get(&Some(4008)), Some(&1));
        assert_eq!(a.close_codes.get(&None), Some(&2));
        assert_eq!(a.last_delivery_us, Some(20));
        let l = Latency::of(&a.latency);
        assert_eq!(l.count, 1000);
        let near = |got: u64, want: u64| got.abs_diff(want) * 100 <= want;
        assert!(near(l.p50_us, 5_000), "{l:?}");
        assert!(near(l.p99_us, 50_000), "{l:?}");
        assert!(near(l.max_us, 50_000), "{l:?}");
    }
}
