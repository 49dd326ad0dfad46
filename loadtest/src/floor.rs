//! Scenario `floor`: the least CPU any server on this machine can spend per
//! delivery, measured without a server.
//!
//! A broker that fans a publication out over TCP does at least one `write`
//! per delivery. On loopback, that `write` also runs the receiver's TCP
//! input (softirq in the sender's context), so the sender's system time
//! pays for both ends of the delivery. This scenario measures that cost
//! alone: one dedicated thread holds the sending ends of `--connections`
//! loopback TCP connections (`TCP_NODELAY`) and, `--rate` times a second
//! for `--duration` seconds, writes `--payload` bytes (130 by default, about
//! one WebSocket frame of the fan-out benchmark) to every socket in turn,
//! and does nothing else. The receiving ends are tokio tasks of this
//! process, one per connection, reading with a small buffer and counting
//! bytes, as subscribers would.
//!
//! The thread reads its own CPU time (`utime + stime` of
//! `/proc/thread-self/stat`, the figure the fan-out scenario reads for the
//! broker, in 10 ms ticks; and its nanosecond run time from
//! `/proc/thread-self/schedstat`) before the first round and after the last
//! send. **Sender CPU per send = that CPU time ÷ sends**: a server doing one
//! write per delivery cannot go below it here, whatever its own code costs.
//! The run then waits for the receivers to have every byte (lost must be 0).
//!
//! Both ends live in this process (two descriptors per connection, ~19,900
//! per process), hence at most 9,000 connections.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::proc::{self, Pid};
use crate::report::Report;

/// Connections at most: both ends are in this process, and one process has
/// ~19,900 descriptors.
pub const MAX_CONNECTIONS: usize = 9_000;

/// Each receiver reads into a buffer of this size.
const READ_BUFFER: usize = 512;

/// How long the sending thread waits for all the connections to arrive.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct FloorOptions {
    pub connections: usize,
    /// Rounds per second; one round writes once to every connection.
    pub rate: f64,
    pub duration: Duration,
    /// Bytes per write.
    pub payload: usize,
    /// How long to wait for the receivers after the last send.
    pub drain_timeout: Duration,
}

impl FloorOptions {
    /// Rounds in the whole run (at least one).
    pub fn rounds(&self) -> u64 {
        (self.rate * self.duration.as_secs_f64()).round().max(1.0) as u64
    }

    fn validate(&self) -> Result<()> {
        if self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if self.connections > MAX_CONNECTIONS {
            bail!(
                "--connections {} is above {MAX_CONNECTIONS}: both ends of every connection are \
                 in this process (2 descriptors each) and one process may hold ~19,900",
                self.connections
            );
        }
        if !self.rate.is_finite() || self.rate <= 0.0 {
            bail!("--rate must be a number above 0");
        }
        if self.payload == 0 {
            bail!("--payload must be at least 1 byte");
        }
        Ok(())
    }
}

/// What the sending thread measured.
#[derive(Debug)]
struct Sent {
    rounds: u64,
    sends: u64,
    /// `write` calls beyond one per send (a write that took fewer bytes).
    extra_writes: u64,
    /// Rounds that started a whole period or more after their time.
    late_rounds: u64,
    /// First round → last send.
    wall: Duration,
    /// `utime + stime` of the thread over `wall`.
    cpu: Duration,
    /// Time on the CPU of the thread over `wall` (schedstat), if kept.
    on_cpu: Option<Duration>,
    /// When the first round began, and the process's CPU time then.
    started: Instant,
    process_cpu0: Duration,
    /// When the last send returned.
    finished: Instant,
    /// The sending ends, kept open until the receivers are done.
    streams: Vec<TcpStream>,
}

/// Sets `cancel` when dropped: the sending thread stops at its next check
/// if the run is abandoned (error, `--timeout`).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

pub async fn run(opts: FloorOptions) -> Result<Report> {
    opts.validate()?;
    let rounds = opts.rounds();
    let per_connection = rounds * opts.payload as u64;

    let listener = listen(opts.connections)?;
    let addr = listener.local_addr().context("listener address")?;
    let cancel = Arc::new(AtomicBool::new(false));
    let _cancel_guard = CancelOnDrop(cancel.clone());
    let (sent_tx, sent_rx) = oneshot::channel();
    {
        let (opts, cancel) = (opts.clone(), cancel.clone());
        std::thread::Builder::new()
            .name("floor-sender".into())
            .spawn(move || {
                let _ = sent_tx.send(send_rounds(listener, &opts, &cancel));
            })
            .context("starting the sending thread")?;
    }

    // The receiving ends, one task each.
    let complete = Arc::new(AtomicU64::new(0));
    let mut receivers = JoinSet::new();
    let setup = Instant::now();
    for i in 0..opts.connections {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connection {i} of {} to {addr}", opts.connections))?;
        receivers.spawn(receive(stream, per_connection, complete.clone()));
    }
    tracing::info!(
        "floor: {} connections in {:.2} s; {rounds} rounds of {} B at {}/s",
        opts.connections,
        setup.elapsed().as_secs_f64(),
        opts.payload,
        opts.rate
    );

    let sent = sent_rx
        .await
        .context("the sending thread ended without a result")??;
    let deadline = Instant::now() + opts.drain_timeout;
    while complete.load(Ordering::Relaxed) < opts.connections as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained = sent.finished.elapsed();
    let process_cpu = proc::cpu_time(Pid::Current)?.saturating_sub(sent.process_cpu0);
    let process_window = sent.started.elapsed();
    let receivers_complete = complete.load(Ordering::Relaxed);

    // Closing the sending ends ends every receiver (end of stream).
    drop(sent.streams);
    let mut received = 0u64;
    let mut receivers_ended = 0u64;
    let collect = async {
        while let Some(joined) = receivers.join_next().await {
            match joined {
                Ok(bytes) => {
                    received += bytes;
                    receivers_ended += 1;
                }
                Err(e) => tracing::warn!(error = %e, "a receiver task failed"),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), collect)
        .await
        .is_err()
    {
        tracing::warn!("some receivers did not see the end of their stream within 5 s");
    }
    let expected = per_connection * opts.connections as u64;

    let mut r = Report::new("floor");
    r.count(
        "connections",
        "loopback TCP connections",
        opts.connections as u64,
    );
    r.number("rate_target", "rounds per second asked", opts.rate, "/s", 1);
    r.count("payload_bytes", "bytes per send", opts.payload as u64);
    r.count("rounds", "rounds", sent.rounds);
    r.count(
        "sends",
        "sends (one write per connection per round)",
        sent.sends,
    );
    r.count(
        "extra_writes",
        "write calls beyond one per send (short writes)",
        sent.extra_writes,
    );
    r.count(
        "late_rounds",
        "rounds started a period or more late",
        sent.late_rounds,
    );
    r.number(
        "wall_seconds",
        "wall time (first round → last send)",
        sent.wall.as_secs_f64(),
        "s",
        3,
    );
    let wall = sent.wall.as_secs_f64().max(1e-9);
    let sends = sent.sends.max(1) as f64;
    r.number(
        "sender_cpu_seconds",
        "sender thread CPU (user + system)",
        sent.cpu.as_secs_f64(),
        "s",
        3,
    );
    r.number(
        "sender_cpu_cores",
        "sender thread CPU, cores busy on average",
        sent.cpu.as_secs_f64() / wall,
        "",
        2,
    );
    r.number(
        "sender_cpu_us_per_send",
        "sender CPU per send (user + system, 10 ms ticks)",
        sent.cpu.as_secs_f64() * 1e6 / sends,
        "µs",
        3,
    );
    match sent.on_cpu {
        Some(t) => r.number(
            "sender_on_cpu_us_per_send",
            "sender time on CPU per send (schedstat, ns)",
            t.as_secs_f64() * 1e6 / sends,
            "µs",
            3,
        ),
        None => r.missing(
            "sender_on_cpu_us_per_send",
            "sender time on CPU per send (schedstat, ns)",
            "no scheduler statistics",
        ),
    }
    r.count(
        "bytes_expected",
        "bytes expected (sends × payload)",
        expected,
    );
    r.count("bytes_received", "bytes received", received);
    r.count(
        "bytes_lost",
        "bytes lost",
        expected.saturating_sub(received),
    );
    r.count(
        "bytes_extra",
        "bytes received beyond those sent",
        received.saturating_sub(expected),
    );
    r.count(
        "receivers_complete",
        "receivers with every byte in time",
        receivers_complete,
    );
    r.count(
        "receivers_ended",
        "receivers that saw the end",
        receivers_ended,
    );
    r.number(
        "drain_seconds",
        "last send → every byte received",
        drained.as_secs_f64(),
        "s",
        3,
    );
    r.number(
        "loadtest_cpu_seconds",
        "loadtest CPU, whole process (first round → all received)",
        process_cpu.as_secs_f64(),
        "s",
        2,
    );
    r.number(
        "loadtest_cpu_cores",
        "loadtest CPU, cores busy on average",
        process_cpu.as_secs_f64() / process_window.as_secs_f64().max(1e-9),
        "",
        2,
    );
    r.number(
        "loadtest_cpu_us_per_send",
        "loadtest CPU per send (both ends, for context)",
        process_cpu.as_secs_f64() * 1e6 / sends,
        "µs",
        3,
    );
    Ok(r)
}

/// A listener on 127.0.0.1, port chosen by the kernel, whose backlog holds
/// every connection at once (std's `bind` listens with 128).
fn listen(connections: usize) -> Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .context("creating the listening socket")?;
    socket
        .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .context("binding 127.0.0.1:0")?;
    socket
        .listen(i32::try_from(connections).unwrap_or(i32::MAX).max(128))
        .context("listening")?;
    // Non-blocking so that accepting can give up on `cancel` or a deadline.
    socket
        .set_nonblocking(true)
        .context("non-blocking listener")?;
    Ok(socket.into())
}

/// The sending thread: accepts every connection, then sends the rounds,
/// measuring its own CPU time around them.
fn send_rounds(listener: TcpListener, opts: &FloorOptions, cancel: &AtomicBool) -> Result<Sent> {
    let mut streams = Vec::with_capacity(opts.connections);
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    while streams.len() < opts.connections {
        if cancel.load(Ordering::Relaxed) {
            bail!("abandoned while accepting");
        }
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .context("blocking sending end")?;
                stream.set_nodelay(true).context("TCP_NODELAY")?;
                streams.push(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!(
                        "only {} of {} connections arrived within {ACCEPT_TIMEOUT:?}",
                        streams.len(),
                        opts.connections
                    );
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("accepting a connection"),
        }
    }
    drop(listener);

    let payload = vec![b'x'; opts.payload];
    let rounds = opts.rounds();
    let period = Duration::from_secs_f64(1.0 / opts.rate);
    let (mut sends, mut extra_writes, mut late_rounds) = (0u64, 0u64, 0u64);

    let process_cpu0 = proc::cpu_time(Pid::Current)?;
    let on_cpu0 = proc::on_cpu_time(Pid::CurrentThread)?;
    let cpu0 = proc::cpu_time(Pid::CurrentThread)?;
    let started = Instant::now();
    for round in 0..rounds {
        if cancel.load(Ordering::Relaxed) {
            bail!("abandoned after {round} rounds");
        }
        let at = started + period.mul_f64(round as f64);
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        } else if now - at >= period {
            late_rounds += 1;
        }
        for stream in &mut streams {
            let mut rest = &payload[..];
            loop {
                let n = stream.write(rest).context("sending")?;
                if n == 0 {
                    bail!("a connection accepted no more bytes");
                }
                rest = &rest[n..];
                if rest.is_empty() {
                    break;
                }
                extra_writes += 1;
            }
            sends += 1;
        }
    }
    let cpu1 = proc::cpu_time(Pid::CurrentThread)?;
    let on_cpu1 = proc::on_cpu_time(Pid::CurrentThread)?;
    let finished = Instant::now();

    Ok(Sent {
        rounds,
        sends,
        extra_writes,
        late_rounds,
        wall: finished - started,
        cpu: cpu1.saturating_sub(cpu0),
        on_cpu: on_cpu0.zip(on_cpu1).map(|(a, b)| b.saturating_sub(a)),
        started,
        process_cpu0,
        finished,
        streams,
    })
}

/// One receiving end: reads until the end of the stream, counting bytes;
/// counts itself in `complete` once it has `expected` bytes.
async fn receive(
    mut stream: tokio::net::TcpStream,
    expected: u64,
    complete: Arc<AtomicU64>,
) -> u64 {
    let mut buf = [0u8; READ_BUFFER];
    let mut got = 0u64;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                let before = got;
                got += n as u64;
                if before < expected && got >= expected {
                    complete.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "a receiver failed");
                break;
            }
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(connections: usize) -> FloorOptions {
        FloorOptions {
            connections,
            rate: 400.0,
            duration: Duration::from_millis(100),
            payload: 130,
            drain_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn too_many_connections_are_refused() {
        let err = options(MAX_CONNECTIONS + 1)
            .validate()
            .expect_err("refused");
        assert!(err.to_string().contains("9000"), "{err}");
        assert!(options(0).validate().is_err());
        options(MAX_CONNECTIONS).validate().expect("accepted");
        assert_eq!(options(1).rounds(), 40);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_floor_receives_every_byte_and_costs_cpu() {
        // 200 × 40 = 8,000 sends: several ms of sender CPU, so that even the
        // 10 ms ticks of utime + stime show some.
        let report = run(options(200)).await.expect("floor runs");
        let v: serde_json::Value = serde_json::from_str(&report.json_line()).expect("json");
        assert_eq!(v["scenario"], "floor");
        assert_eq!(v["rounds"], 40, "{v}");
        assert_eq!(v["sends"], 8_000, "{v}");
        assert_eq!(v["bytes_expected"], 8_000 * 130, "{v}");
        assert_eq!(v["bytes_received"], 8_000 * 130, "{v}");
        assert_eq!(v["bytes_lost"], 0, "{v}");
        assert_eq!(v["bytes_extra"], 0, "{v}");
        assert_eq!(v["receivers_complete"], 200, "{v}");
        let per_send = v["sender_cpu_us_per_send"].as_f64().expect("a number");
        assert!(per_send > 0.0, "{v}");
        if let Some(on_cpu) = v["sender_on_cpu_us_per_send"].as_f64() {
            assert!(on_cpu > 0.0, "{v}");
        }
    }
}
