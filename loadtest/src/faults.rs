//! `--fault SECS:COMMAND`: what an operator does to a deployment during a
//! run (kill a node, drain one, restart Redis), done by the load tester
//! itself at a given time into publishing, so that a run with faults is
//! repeatable and its report says when each one happened.
//!
//! The command runs with `sh -c` on the load tester's machine (`ssh node3
//! sudo systemctl kill -s KILL tether`, `kill -KILL 4242`, `redis-cli -p
//! 6380 shutdown nosave`, …); its exit status, the time it took and the
//! start of its output are reported. A command that fails is reported and
//! warned about, not fatal: the run goes on and its figures say what the
//! deployment did.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinHandle;

/// How long one fault's command may run before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// How much of a command's output the report keeps.
const OUTPUT_CHARS: usize = 300;

/// One `--fault`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// When, after publishing starts.
    pub at: Duration,
    pub command: String,
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Fault, String> {
        let (at, command) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: give SECS:COMMAND, such as 12:kill -KILL 4242"))?;
        let secs: f64 = at
            .trim()
            .parse()
            .map_err(|_| format!("{at:?} is not a number of seconds"))?;
        let at = Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{at:?} is not a number of seconds"))?;
        let command = command.trim();
        if command.is_empty() {
            return Err(format!("{s:?}: no command after the seconds"));
        }
        Ok(Fault {
            at,
            command: command.to_owned(),
        })
    }
}

/// What became of one fault.
#[derive(Debug, Clone, Serialize)]
pub struct Done {
    pub at_s: f64,
    pub command: String,
    /// When it started, seconds after publishing started (`None`: the run
    /// ended first).
    pub started_s: Option<f64>,
    pub took_ms: Option<u64>,
    /// Its exit code (`None`: killed by a signal, timed out, not started).
    pub status: Option<i32>,
    pub ok: bool,
    /// The start of what it printed (stdout, then stderr), or why it could
    /// not run.
    pub output: String,
}

impl Done {
    fn pending(f: &Fault) -> Done {
        Done {
            at_s: f.at.as_secs_f64(),
            command: f.command.clone(),
            started_s: None,
            took_ms: None,
            status: None,
            ok: false,
            output: "not reached: the run ended first".into(),
        }
    }
}

/// The faults of a run, being done.
pub struct Schedule {
    done: Arc<Mutex<Vec<Done>>>,
    task: JoinHandle<()>,
}

impl Schedule {
    /// Runs `faults` in time order, each at `t0 + at`.
    pub fn start(mut faults: Vec<Fault>, t0: Instant) -> Schedule {
        faults.sort_by_key(|f| f.at);
        let done = Arc::new(Mutex::new(
            faults.iter().map(Done::pending).collect::<Vec<_>>(),
        ));
        let record = done.clone();
        let task = tokio::spawn(async move {
            for (i, f) in faults.into_iter().enumerate() {
                tokio::time::sleep_until((t0 + f.at).into()).await;
                let started = Instant::now();
                tracing::info!("fault at {:.1} s: {}", f.at.as_secs_f64(), f.command);
                let result = run(&f.command).await;
                let mut d = Done::pending(&f);
                d.started_s = Some((started - t0).as_secs_f64());
                d.took_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
                match result {
                    Ok((status, output)) => {
                        d.status = status;
                        d.ok = status == Some(0);
                        d.output = output;
                    }
                    Err(why) => d.output = why,
                }
                if d.ok {
                    tracing::info!("fault done: {} (exit 0)", f.command);
                } else {
                    tracing::warn!(
                        "fault {:?} failed ({}): {}",
                        f.command,
                        d.status
                            .map_or("no exit code".to_owned(), |c| format!("exit {c}")),
                        d.output
                    );
                }
                if let Some(slot) = record.lock().unwrap_or_else(|p| p.into_inner()).get_mut(i) {
                    *slot = d;
                }
            }
        });
        Schedule { done, task }
    }

    /// Stops the faults not yet done (a command still running is killed)
    /// and returns what became of each.
    pub fn finish(self) -> Vec<Done> {
        self.task.abort();
        self.done.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The report's rows of the faults done: `faults` (each one's time, exit
/// status and output) and `faults_failed`; nothing when there were none.
pub fn add_to(r: &mut crate::report::Report, faults: &[Done]) -> anyhow::Result<()> {
    if faults.is_empty() {
        return Ok(());
    }
    let text = faults
        .iter()
        .map(|d| match (d.started_s, d.ok) {
            (Some(s), true) => format!("{s:.1} s `{}`: exit 0", d.command),
            (Some(s), false) => format!(
                "{s:.1} s `{}`: FAILED ({}) {}",
                d.command,
                d.status
                    .map_or("no exit code".to_owned(), |c| format!("exit {c}")),
                d.output
            ),
            (None, _) => format!("{:.1} s `{}`: {}", d.at_s, d.command, d.output),
        })
        .collect::<Vec<_>>()
        .join("; ");
    r.value(
        "faults",
        "faults done to the deployment",
        serde_json::to_value(faults)?,
        text,
    );
    r.count(
        "faults_failed",
        "fault commands that failed or never ran",
        faults.iter().filter(|d| !d.ok).count() as u64,
    );
    Ok(())
}

/// The faults that ran, as marks for `--plot` (seconds into publishing).
pub fn marks(faults: &[Done]) -> Vec<(f64, String)> {
    faults
        .iter()
        .filter_map(|d| Some((d.started_s?, format!("fault {}", d.command))))
        .collect()
}

/// Runs `command` with `sh -c`: its exit code and the start of its output.
async fn run(command: &str) -> Result<(Option<i32>, String), String> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(COMMAND_TIMEOUT, child).await {
        Err(_) => Err(format!("still running after {COMMAND_TIMEOUT:?}: killed")),
        Ok(Err(e)) => Err(format!("could not start sh: {e}")),
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let text: String = text.trim().chars().take(OUTPUT_CHARS).collect();
            Ok((out.status.code(), text))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_is_seconds_then_a_command() {
        let f: Fault = "12.5:kill -KILL 4242".parse().expect("fault");
        assert_eq!(f.at, Duration::from_millis(12_500));
        assert_eq!(f.command, "kill -KILL 4242");
        // The command may hold colons of its own.
        let f: Fault = "3: ssh node:22 true".parse().expect("fault");
        assert_eq!(f.command, "ssh node:22 true");
        for bad in ["kill", "x:kill", "-1:kill", "4:", "4:  "] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn faults_run_in_time_order_and_say_how_they_went() {
        let faults = vec![
            "0.05:echo second; exit 3".parse().expect("fault"),
            "0:echo first".parse().expect("fault"),
            "3600:echo never".parse().expect("fault"),
        ];
        let s = Schedule::start(faults, Instant::now());
        // The first two are done once the third one waits (a barrier: the
        // schedule runs them in order, one at a time).
        for round in 0.. {
            let seen = s.done.lock().expect("lock").clone();
            if seen[1].started_s.is_some() {
                break;
            }
            assert!(round < 3000, "the first two faults never ran: {seen:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let done = s.finish();
        assert_eq!(done.len(), 3);
        assert_eq!((done[0].ok, done[0].status), (true, Some(0)));
        assert_eq!(done[0].output, "first");
        assert_eq!((done[1].ok, done[1].status), (false, Some(3)));
        assert_eq!(done[1].output, "second");
        assert_eq!(done[2].started_s, None);
        assert!(!done[2].ok);
    }
}
