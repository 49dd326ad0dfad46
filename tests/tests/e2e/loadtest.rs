//! The `loadtest` binary, run briefly against real brokers (and a cluster on
//! a real `redis-server`), its JSON report checked; and against a fake
//! broker that drops or repeats one offset, which it must catch and name.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use serde_json::Value;
use tether_tests::fakes::lossy_broker::{Fault, LossyBroker};
use tether_tests::redis::TestRedis;
use tether_tests::{TestBroker, loadtest_bin};

/// A finished `loadtest` run.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The `--json` line of the report.
    fn json(&self) -> Value {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON line:\n{}\n{}", self.stdout, self.stderr));
        serde_json::from_str(line).unwrap()
    }

    fn ok(&self) -> Value {
        assert_eq!(
            self.code,
            Some(0),
            "loadtest failed:\n{}\n{}",
            self.stdout,
            self.stderr
        );
        self.json()
    }
}

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(loadtest_bin().unwrap());
    if !args.iter().any(|a| a.starts_with("--json=")) {
        cmd.arg("--json");
    }
    cmd.args(["--timeout", "120"])
        .args(args)
        .env("LOADTEST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `loadtest` to its end (off the async runtime).
async fn loadtest(args: &[&str]) -> Run {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = command(&refs).output().unwrap();
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

/// The sum of `key` over the report's per-second `timeline`.
fn per_second_sum(v: &Value, key: &str) -> u64 {
    v["timeline"]
        .as_array()
        .unwrap_or_else(|| panic!("no timeline in {v}"))
        .iter()
        .map(|s| s[key].as_u64().unwrap_or_else(|| panic!("{key} in {s}")))
        .sum()
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a count in {v}"))
}

#[tokio::test]
async fn churn_with_auth_resumes_every_drop_and_loses_nothing() {
    let broker = TestBroker::start(&[
        "--api-key",
        "lt-key",
        "--jwt-secret",
        "lt-jwt-secret-0123456789abcdef-0123",
    ])
    .unwrap();
    let (ws, api) = (broker.ws_url(), broker.api_url(""));
    let run = loadtest(&[
        "churn",
        "--url",
        &ws,
        "--api",
        &api,
        "--api-key",
        "lt-key",
        "--jwt-secret",
        "lt-jwt-secret-0123456789abcdef-0123",
        "--clients",
        "40",
        "--channels",
        "4",
        "--rate",
        "100",
        "--duration",
        "3",
        "--drop-rate",
        "10",
        "--away",
        "0.2",
    ])
    .await;
    let v = run.ok();
    assert_eq!(n(&v, "clients"), 40, "{v}");
    // One progress sample a second, each with the figures of that second.
    let timeline = v["timeline"].as_array().unwrap();
    assert!(timeline.len() >= 3, "{v}");
    assert!(
        timeline
            .iter()
            .any(|s| s["deliveries_per_second"].as_f64() > Some(0.0)),
        "{v}"
    );
    assert!(run.stderr.contains("deliveries/s, p99"), "{}", run.stderr);
    assert_eq!(n(&v, "publications"), 300, "{v}");
    assert_eq!(n(&v, "ledger_offsets"), 300, "{v}");
    // Every client gets every publication of its channel: 10 per channel.
    assert_eq!(n(&v, "deliveries"), 3000, "{v}");
    let drops = n(&v, "drops");
    assert!(drops >= 10, "{v}");
    assert_eq!(n(&v, "reconnects"), drops, "{v}");
    assert_eq!(n(&v, "resumed"), drops, "{v}");
    assert_eq!(n(&v, "recovered"), drops, "{v}");
    for key in ["silently_lost", "duplicated", "reordered", "declared_lost"] {
        assert_eq!(n(&v, key), 0, "{key}: {v}");
    }
    assert_eq!(n(&v["per_channel"]["churn:3"], "delivered"), 750, "{v}");
    assert!(v["violations"].as_array().unwrap().is_empty(), "{v}");
}

/// A drop that leaves the old connection open and silent (a phone that
/// moved networks): the client resumes on a new connection, which takes
/// the session over, and what the broker wrote to the silent one is
/// replayed: nothing lost, nothing twice. On one node, and across two
/// (the takeover then crosses nodes).
#[tokio::test]
async fn silent_drops_are_taken_over_and_nothing_is_lost() {
    let broker = TestBroker::start(&[]).unwrap();
    let common = [
        "--clients",
        "30",
        "--channels",
        "3",
        "--rate",
        "60",
        "--duration",
        "2",
        "--drop-rate",
        "10",
        "--away",
        "0.3",
        "--drop-mode",
        "silent",
    ];
    let (ws, api) = (broker.ws_url(), broker.api_url(""));
    let mut args = vec!["churn", "--url", &ws, "--api", &api];
    args.extend(common);
    let v = loadtest(&args).await.ok();
    assert!(
        v["drop_mode"].as_str().unwrap().starts_with("silent"),
        "{v}"
    );
    let drops = n(&v, "drops");
    assert!(drops >= 10, "{v}");
    // The old connections were still open: each resume took one over.
    let metrics = broker.metrics().await.unwrap();
    let taken_over: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tether_disconnects_total{code=\"4000\"} "))
        .map_or(0, |v| v.trim().parse().unwrap());
    assert_eq!(taken_over, drops, "{metrics}");
    assert_eq!(n(&v, "resumed"), drops, "{v}");
    assert_eq!(n(&v, "recovered"), drops, "{v}");
    assert_eq!(n(&v, "deliveries"), 120 * 10, "{v}");
    for key in ["silently_lost", "duplicated", "reordered", "declared_lost"] {
        assert_eq!(n(&v, key), 0, "{key}: {v}");
    }

    let redis = TestRedis::start().unwrap();
    let url = redis.url();
    let nodes: Vec<TestBroker> = (0..2)
        .map(|i| {
            let id = format!("lts-{i}");
            TestBroker::start(&[
                "--redis-url",
                &url,
                "--resume-secret",
                "loadtest-cluster-secret-0123456789",
                "--node-id",
                &id,
            ])
            .unwrap()
        })
        .collect();
    let urls = format!("{},{}", nodes[0].ws_url(), nodes[1].ws_url());
    let apis = format!("{},{}", nodes[0].api_url(""), nodes[1].api_url(""));
    let mut args = vec!["cluster", "--url", &urls, "--api", &apis];
    args.extend(common);
    let v = loadtest(&args).await.ok();
    let drops = n(&v, "drops");
    assert!(drops >= 10, "{v}");
    assert_eq!(n(&v, "resumed"), drops, "{v}");
    assert_eq!(n(&v, "deliveries"), 120 * 10, "{v}");
    for key in ["silently_lost", "duplicated", "reordered", "declared_lost"] {
        assert_eq!(n(&v, key), 0, "{key}: {v}");
    }
}

/// wss://, verified against the broker's certificate given as `--tls-ca`;
/// without it (system roots only) the handshake is refused.
#[tokio::test]
async fn churn_over_wss_verifies_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = super::tls::certificate(dir.path());
    let broker = TestBroker::start(&["--tls-cert", &cert, "--tls-key", &key]).unwrap();
    let wss = format!("wss://localhost:{}/v1/ws", broker.client_addr.port());
    let api = broker.api_url("");
    let args = [
        "churn",
        "--url",
        &wss,
        "--api",
        &api,
        "--clients",
        "10",
        "--channels",
        "2",
        "--rate",
        "50",
        "--duration",
        "1",
        "--drop-rate",
        "5",
        "--away",
        "0.1",
    ];
    let mut trusted = args.to_vec();
    trusted.extend(["--tls-ca", &cert]);
    let v = loadtest(&trusted).await.ok();
    assert_eq!(v["transport"], "wss", "{v}");
    assert_eq!(n(&v, "clients"), 10, "{v}");
    assert_eq!(n(&v, "deliveries"), 50 * 5, "{v}");
    assert_eq!(n(&v, "silently_lost"), 0, "{v}");
    // Not trusted: no client connects, and the run says why.
    let run = loadtest(&args).await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("TLS") || run.stderr.contains("root certificates"),
        "{}",
        run.stderr
    );
}

/// Over QUIC, pinning the broker's self-signed certificate: every drop (of
/// churn, and resume's all at once) is resumed on a new QUIC connection
/// and nothing is missing.
#[tokio::test]
async fn churn_and_resume_over_quic_lose_nothing() {
    let broker = TestBroker::start(&["--quic-addr", "127.0.0.1:0"]).unwrap();
    let quic = broker.quic_addr.unwrap().to_string();
    let fingerprint = broker.quic_fingerprint.clone().unwrap();
    let api = broker.api_url("");
    let v = loadtest(&[
        "churn",
        "--transport",
        "quic",
        "--quic-addr",
        &quic,
        "--quic-fingerprint",
        &fingerprint,
        "--api",
        &api,
        "--clients",
        "20",
        "--channels",
        "4",
        "--rate",
        "40",
        "--duration",
        "2",
        "--drop-rate",
        "5",
        "--away",
        "0.2",
    ])
    .await
    .ok();
    assert_eq!(v["transport"], "quic", "{v}");
    assert_eq!(n(&v, "clients"), 20, "{v}");
    assert_eq!(n(&v, "publications"), 80, "{v}");
    // 20 per channel, five clients on each.
    assert_eq!(n(&v, "deliveries"), 400, "{v}");
    let drops = n(&v, "drops");
    assert!(drops >= 5, "{v}");
    assert_eq!(n(&v, "resumed"), drops, "{v}");
    assert_eq!(n(&v, "recovered"), drops, "{v}");
    for key in ["silently_lost", "duplicated", "reordered", "declared_lost"] {
        assert_eq!(n(&v, key), 0, "{key}: {v}");
    }

    // Every client of the node dropped at once and resumed over QUIC.
    let v = loadtest(&[
        "resume",
        "--transport",
        "quic",
        "--quic-addr",
        &quic,
        "--quic-fingerprint",
        &fingerprint,
        "--api",
        &api,
        "--clients",
        "20",
        "--missed",
        "3",
    ])
    .await
    .ok();
    assert_eq!(v["transport"], "quic", "{v}");
    assert_eq!(n(&v, "resumed"), 20, "{v}");
    assert_eq!(n(&v, "messages_received"), 60, "{v}");
    assert_eq!(n(&v, "messages_duplicated"), 0, "{v}");
    assert!(v["broker_saw_drop_seconds"].as_f64().is_some(), "{v}");

    // The wrong fingerprint: no client connects, and the run says why.
    let wrong = "0".repeat(64);
    let run = loadtest(&[
        "churn",
        "--transport",
        "quic",
        "--quic-addr",
        &quic,
        "--quic-fingerprint",
        &wrong,
        "--api",
        &api,
        "--clients",
        "2",
        "--duration",
        "1",
    ])
    .await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("QUIC connect"), "{}", run.stderr);
}

/// A cluster of two nodes over QUIC, both serving the operator's
/// certificate (`--tls-cert`), which the load tester verifies against
/// `--tls-ca` for the name `localhost`: clients move between the nodes'
/// QUIC addresses as they resume, and nothing is lost.
#[tokio::test]
async fn a_cluster_over_quic_verifies_the_certificate_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = super::tls::certificate(dir.path());
    let redis = TestRedis::start().unwrap();
    let url = redis.url();
    let nodes: Vec<TestBroker> = (0..2)
        .map(|i| {
            let id = format!("ltq-{i}");
            TestBroker::start(&[
                "--redis-url",
                &url,
                "--resume-secret",
                "loadtest-cluster-secret-0123456789",
                "--node-id",
                &id,
                "--quic-addr",
                "127.0.0.1:0",
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--quic-ticket-key",
                &"ab".repeat(32),
            ])
            .unwrap()
        })
        .collect();
    let join =
        |f: &dyn Fn(&TestBroker) -> String| nodes.iter().map(f).collect::<Vec<_>>().join(",");
    let quic = join(&|b| b.quic_addr.unwrap().to_string());
    let apis = join(&|b| b.api_url(""));
    let v = loadtest(&[
        "cluster",
        "--transport",
        "quic",
        "--quic-addr",
        &quic,
        "--tls-ca",
        &cert,
        "--api",
        &apis,
        "--clients",
        "20",
        "--channels",
        "4",
        "--rate",
        "40",
        "--duration",
        "2",
        "--drop-rate",
        "5",
        "--away",
        "0.2",
    ])
    .await
    .ok();
    assert_eq!(v["transport"], "quic", "{v}");
    assert_eq!(n(&v, "nodes"), 2, "{v}");
    assert_eq!(n(&v, "deliveries"), 400, "{v}");
    assert!(n(&v, "resumed") >= 5, "{v}");
    for key in ["silently_lost", "duplicated", "reordered"] {
        assert_eq!(n(&v, key), 0, "{key}: {v}");
    }
    let detail = v["nodes_detail"].as_array().unwrap();
    assert_eq!(detail.len(), 2, "{v}");
    for (node, b) in detail.iter().zip(&nodes) {
        assert_eq!(
            node["url"],
            format!("quic://{}", b.quic_addr.unwrap()),
            "{v}"
        );
    }
}

/// Client tokens signed with a private key (ES256) the broker has the
/// public half of.
#[tokio::test]
async fn churn_mints_es256_tokens_from_a_private_key() {
    let keys = tether_tests::fakes::keys::es256_pair_fresh().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = (dir.path().join("jwt.key"), dir.path().join("jwt.pub"));
    std::fs::write(&private, &keys.private_pem).unwrap();
    std::fs::write(&public, &keys.public_pem).unwrap();
    let broker = TestBroker::start(&["--jwt-public-key", public.to_str().unwrap()]).unwrap();
    let (ws, api) = (broker.ws_url(), broker.api_url(""));
    let key = private.to_str().unwrap();
    let args = [
        "churn",
        "--url",
        &ws,
        "--api",
        &api,
        "--clients",
        "6",
        "--channels",
        "2",
        "--rate",
        "20",
        "--duration",
        "1",
        "--drop-rate",
        "2",
        "--away",
        "0.1",
        "--jwt-key",
        key,
    ];
    let v = loadtest(&args).await.ok();
    assert_eq!(n(&v, "clients"), 6, "{v}");
    assert_eq!(n(&v, "deliveries"), 20 * 3, "{v}");
    assert_eq!(n(&v, "silently_lost"), 0, "{v}");
    // The same key said to be RSA is refused before the run.
    let mut wrong = args.to_vec();
    wrong.extend(["--jwt-alg", "rs256"]);
    let run = loadtest(&wrong).await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("--jwt-key"), "{}", run.stderr);
}

#[tokio::test]
async fn a_reconnect_storm_is_resumed_without_loss_and_objectives_gate_the_exit() {
    let broker = TestBroker::start(&[]).unwrap();
    let (ws, api) = (broker.ws_url(), broker.api_url(""));
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("storm.svg");
    let svg = svg.to_str().unwrap();
    let args = [
        "churn",
        "--plot",
        svg,
        "--url",
        &ws,
        "--api",
        &api,
        "--clients",
        "100",
        "--channels",
        "10",
        "--rate",
        "100",
        "--duration",
        "2",
        "--drop-rate",
        "0",
        "--storm-at",
        "0.5",
        "--away",
        "0.3",
    ];
    let v = loadtest(&args).await.ok();
    assert_eq!(n(&v, "drops"), 100, "every client dropped at once: {v}");
    // The picture: an SVG with its three charts.
    let picture = std::fs::read_to_string(svg).unwrap();
    assert!(
        picture.starts_with("<svg"),
        "{}",
        &picture[..picture.len().min(200)]
    );
    for caption in [
        "p99 of each second",
        "deliveries per second",
        "latency distribution",
    ] {
        assert!(picture.contains(caption), "{caption} missing");
    }
    assert_eq!(n(&v, "recovered"), 100, "{v}");
    assert_eq!(n(&v, "deliveries"), 200 * 10, "{v}");
    assert_eq!(n(&v, "silently_lost"), 0, "{v}");

    // An objective no run can meet: exit status 3, and it says which.
    let mut strict = args.to_vec();
    strict.extend(["--min-rate", "1000000000"]);
    let run = loadtest(&strict).await;
    assert_eq!(run.code, Some(3), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("OBJECTIVE MISSED: --min-rate"),
        "{}",
        run.stdout
    );
}

/// The fake drops offset 3 of `churn:1` for every subscriber.
#[tokio::test]
async fn a_skipped_offset_fails_the_run_and_is_named() {
    a_skipped_offset_is_found(&[]).await;
}

/// The same with the subscribers of `churn:1` in two processes: each
/// finds its own, the leader adds them up.
#[tokio::test]
async fn a_skipped_offset_is_found_by_every_worker() {
    a_skipped_offset_is_found(&["--workers", "2"]).await;
}

async fn a_skipped_offset_is_found(workers: &[&str]) {
    let fake = LossyBroker::start(Fault::Skip {
        channel: "churn:1".into(),
        offset: 3,
    })
    .await
    .unwrap();
    let (ws, api) = (fake.ws_url(), fake.api_url());
    let mut args = workers.to_vec();
    args.extend([
        "churn",
        "--url",
        &ws,
        "--api",
        &api,
        "--clients",
        "4",
        "--channels",
        "2",
        "--rate",
        "40",
        "--duration",
        "0.5",
        "--drop-rate",
        "0",
        "--drain-timeout",
        "2",
    ]);
    let run = loadtest(&args).await;
    assert_eq!(run.code, Some(2), "{}\n{}", run.stdout, run.stderr);
    let v = run.json();
    assert_eq!(n(&v, "silently_lost"), 2, "two subscribers of churn:1: {v}");
    assert_eq!(n(&v["per_channel"]["churn:1"], "silently_lost"), 2, "{v}");
    assert_eq!(n(&v["per_channel"]["churn:0"], "silently_lost"), 0, "{v}");
    assert!(
        run.stdout
            .contains("VIOLATION: 2 deliveries silently lost, e.g. channel churn:1 offset 3"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn a_duplicated_offset_fails_the_run_and_is_named() {
    let fake = LossyBroker::start(Fault::Duplicate {
        channel: "churn:0".into(),
        offset: 5,
    })
    .await
    .unwrap();
    let run = loadtest(&[
        "churn",
        "--url",
        &fake.ws_url(),
        "--api",
        &fake.api_url(),
        "--clients",
        "2",
        "--channels",
        "2",
        "--rate",
        "40",
        "--duration",
        "0.5",
        "--drop-rate",
        "0",
    ])
    .await;
    assert_eq!(run.code, Some(2), "{}\n{}", run.stdout, run.stderr);
    let v = run.json();
    assert_eq!(n(&v, "duplicated"), 1, "{v}");
    assert_eq!(n(&v, "silently_lost"), 0, "{v}");
    assert!(
        run.stderr
            .contains("1 deliveries duplicated, e.g. channel churn:0 offset 5"),
        "{}",
        run.stderr
    );
}

/// Runs `loadtest <scenario>` (churn or cluster) over three nodes on one
/// Redis and, once it is publishing, does `fault` to them; returns the
/// finished run.
async fn churn_across_a_cluster(
    scenario: &str,
    extra: impl FnOnce(&[TestBroker]) -> Vec<String>,
    fault: impl FnOnce(&mut [TestBroker], &mut TestRedis),
) -> Run {
    let mut redis = TestRedis::start().unwrap();
    let url = redis.url();
    let mut nodes: Vec<TestBroker> = (0..3)
        .map(|i| {
            let id = format!("lt-{i}");
            TestBroker::start(&[
                "--redis-url",
                &url,
                "--resume-secret",
                "loadtest-cluster-secret-0123456789",
                "--node-id",
                &id,
            ])
            .unwrap()
        })
        .collect();
    let urls = nodes
        .iter()
        .map(|b| b.ws_url())
        .collect::<Vec<_>>()
        .join(",");
    let apis = nodes
        .iter()
        .map(|b| b.api_url(""))
        .collect::<Vec<_>>()
        .join(",");
    let extra = extra(&nodes);
    let mut args = vec![
        scenario,
        "--url",
        &urls,
        "--api",
        &apis,
        "--clients",
        "60",
        "--channels",
        "6",
        "--rate",
        "100",
        "--duration",
        "4",
        "--drop-rate",
        "10",
        "--away",
        "0.2",
    ];
    args.extend(extra.iter().map(String::as_str));
    let mut child = command(&args).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // The fault once the clients are all in and publishing has begun.
    let started = tokio::task::spawn_blocking(move || rx.iter().any(|l| l.contains("publishing")))
        .await
        .unwrap();
    assert!(started, "loadtest never started publishing");
    fault(&mut nodes, &mut redis);
    let (stdout, stderr, code) = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let status = child.wait().unwrap();
        (out, reader.join().unwrap(), status.code())
    })
    .await
    .unwrap();
    eprintln!("{stdout}");
    Run {
        code,
        stdout,
        stderr,
    }
}

/// A third of the clients are on the node that is killed (SIGKILL, by the
/// load tester's own `--fault` as publishing starts) while publishing
/// goes on through all three APIs. They resume on the others; publications
/// whose node died are retried elsewhere with their idempotency key.
/// Nothing lost, nothing twice, nothing even declared lost; the `cluster`
/// report shows the clients moved off the dead node, and the fault done.
#[tokio::test]
async fn a_cluster_run_with_a_node_killed_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("cluster.svg");
    let svg_arg = svg.to_str().unwrap().to_owned();
    let v = churn_across_a_cluster(
        "cluster",
        |nodes| {
            vec![
                "--fault".into(),
                format!("0:kill -KILL {}", nodes[2].pid()),
                "--plot".into(),
                svg_arg,
            ]
        },
        |_, _| {},
    )
    .await
    .ok();
    assert_eq!(v["scenario"], "cluster", "{v}");
    let faults = v["faults"].as_array().expect("faults");
    assert_eq!(faults.len(), 1, "{v}");
    assert_eq!(faults[0]["ok"], true, "{v}");
    assert!(faults[0]["started_s"].as_f64().is_some(), "{v}");
    assert_eq!(n(&v, "faults_failed"), 0, "{v}");
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.contains("fault kill -KILL"), "the fault is marked");
    assert_eq!(n(&v, "nodes"), 3, "{v}");
    let per_node = v["nodes_detail"].as_array().expect("nodes_detail");
    assert_eq!(per_node.len(), 3, "{v}");
    assert_eq!(
        per_node[2]["online_at_end"], 0,
        "nobody on the dead node: {v}"
    );
    assert!(
        per_node[2]["connections_ended"].as_u64().unwrap() >= 20,
        "its 20 clients were cut off: {v}"
    );
    let online: i64 = per_node
        .iter()
        .map(|p| p["online_at_end"].as_i64().unwrap())
        .sum();
    assert_eq!(online, 60, "every client on a live node: {v}");
    let timeline = v["timeline"].as_array().unwrap();
    assert!(
        timeline.iter().any(|s| s["online_per_node"]
            .as_array()
            .is_some_and(|a| a.len() == 3)),
        "the timeline has the clients per node: {v}"
    );
    assert_eq!(n(&v, "clients"), 60, "{v}");
    assert_eq!(
        n(&v, "publications"),
        400,
        "every publication accepted: {v}"
    );
    assert!(
        n(&v, "server_closes") >= 20,
        "node 2's clients lost it: {v}"
    );
    assert_eq!(n(&v, "disconnected_at_end"), 0, "{v}");
    assert_eq!(n(&v, "caught_up"), 60, "{v}");
    assert_eq!(n(&v, "deliveries"), 400 * 10, "{v}");
    for key in ["silently_lost", "duplicated", "reordered", "declared_lost"] {
        assert_eq!(n(&v, key), 0, "{key}: {v}");
    }
}

/// Redis restarts empty under steady publishing: publications fail while
/// it is away, the channels get new epochs, and clients may be told
/// `recovered: false`; but nothing the API accepted is lost silently or
/// delivered twice, and every client is connected at the end.
#[tokio::test]
async fn churn_across_a_cluster_through_a_redis_restart_loses_nothing_silently() {
    let v = churn_across_a_cluster("churn", |_| Vec::new(), |_, redis| redis.restart().unwrap())
        .await
        .ok();
    assert_eq!(n(&v, "clients"), 60, "{v}");
    assert_eq!(n(&v, "disconnected_at_end"), 0, "{v}");
    assert_eq!(
        n(&v, "caught_up"),
        60,
        "every client reached the new epoch's end: {v}"
    );
    // Every accepted publication reached every client of its channel, or
    // was declared lost to it; and the clients noticed the new epochs.
    assert_eq!(
        n(&v, "deliveries") + n(&v, "declared_lost"),
        n(&v, "publications") * 10,
        "{v}"
    );
    assert!(n(&v, "epoch_changes") + n(&v, "not_recovered") > 0, "{v}");
    for key in ["silently_lost", "duplicated", "reordered"] {
        assert_eq!(n(&v, key), 0, "{key}: {v}");
    }
}

/// A loopback address nothing listens on (yet).
/// A port for a fake provider the broker is told of before it listens.
/// Taken below the kernel's ephemeral range (32768–60999 here): a port 0
/// bind would hand out one that the thousands of client connections of
/// the tests running alongside may take as their source port before the
/// fake binds it again.
fn free_addr() -> std::net::SocketAddr {
    use std::hash::{BuildHasher, RandomState};
    for _ in 0..1000 {
        let port = 20_000 + (RandomState::new().hash_one(0u8) % 12_000) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap();
        }
    }
    panic!("no free port in 20000..32000")
}

/// A broker with APNs configured (a fresh .p8 key) and pointed at
/// `http://{endpoint}`; the directory holds the key.
fn apns_broker(endpoint: std::net::SocketAddr) -> (TestBroker, tempfile::TempDir) {
    let keys = tether_tests::fakes::keys::es256_pair().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("AuthKey.p8");
    std::fs::write(&key, &keys.private_pem).unwrap();
    let endpoint = format!("http://{endpoint}");
    let broker = TestBroker::start(&[
        "--apns-key-file",
        key.to_str().unwrap(),
        "--apns-key-id",
        "KEY1234567",
        "--apns-team-id",
        "TEAM123456",
        "--apns-topic",
        "com.example.loadtest",
        "--apns-endpoint",
        &endpoint,
    ])
    .unwrap();
    (broker, dir)
}

/// `push`: offline users' publications reach the fake APNs that loadtest
/// serves, each exactly once, matched to its publication.
#[tokio::test]
async fn push_counts_every_push_at_the_provider() {
    let sink = free_addr();
    let (broker, _dir) = apns_broker(sink);
    let (api, sink) = (broker.api_url(""), sink.to_string());
    let v = loadtest(&[
        "push",
        "--api",
        &api,
        "--sink",
        &sink,
        "--users",
        "50",
        "--rate",
        "100",
        "--duration",
        "2",
    ])
    .await
    .ok();
    assert_eq!(n(&v, "devices"), 50, "{v}");
    assert_eq!(n(&v, "publications"), 200, "{v}");
    assert_eq!(n(&v, "pushes"), 200, "one push per publication: {v}");
    assert_eq!(n(&v, "pushes_missing"), 0, "{v}");
    assert_eq!(n(&v, "pushes_duplicated"), 0, "{v}");
    assert!(v["latency_p99_ms"].as_f64().unwrap() > 0.0, "{v}");
}

/// Pushes that never reach the provider (the broker points elsewhere) fail
/// the run and are named.
#[tokio::test]
async fn push_names_the_publications_never_pushed() {
    let (nowhere, sink) = (free_addr(), free_addr());
    let (broker, _dir) = apns_broker(nowhere);
    let (api, sink) = (broker.api_url(""), sink.to_string());
    let run = loadtest(&[
        "push",
        "--api",
        &api,
        "--sink",
        &sink,
        "--users",
        "3",
        "--rate",
        "10",
        "--duration",
        "0.3",
        "--drain-timeout",
        "1",
    ])
    .await;
    assert_eq!(run.code, Some(2), "{}\n{}", run.stdout, run.stderr);
    let v = run.json();
    assert_eq!(n(&v, "pushes"), 0, "{v}");
    assert_eq!(n(&v, "pushes_missing"), n(&v, "publications"), "{v}");
    assert!(
        run.stdout.contains("never pushed") && run.stdout.contains("user:loadtest-push-0 offset 1"),
        "{}",
        run.stdout
    );
}

/// `tether_connections_accepted` of a broker, over WebSocket.
async fn accepted(broker: &TestBroker) -> u64 {
    let metrics = broker.metrics().await.unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("tether_connections_accepted_total{transport=\"ws\"} "))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn workers_share_the_clients_and_their_figures_are_merged() {
    let a = TestBroker::start(&[]).unwrap();
    let b = TestBroker::start(&[]).unwrap();

    // Three processes of subscribers on one channel: every publication
    // reaches every subscriber of every worker, and the leader's report
    // holds all of their deliveries and latencies.
    let v = loadtest(&[
        "--workers",
        "3",
        "fanout",
        "--url",
        &a.ws_url(),
        "--api",
        &a.api_url(""),
        "--subscribers",
        "61",
        "--rate",
        "20",
        "--duration",
        "1",
    ])
    .await
    .ok();
    assert_eq!(n(&v, "workers"), 3, "{v}");
    assert_eq!(n(&v, "subscribers"), 61, "{v}");
    assert_eq!(n(&v, "publications"), 20, "{v}");
    assert_eq!(n(&v, "deliveries"), 20 * 61, "{v}");
    assert_eq!(n(&v, "latency_samples"), 20 * 61, "{v}");
    assert_eq!(n(&v, "lost"), 0, "{v}");
    assert_eq!(accepted(&a).await, 61);
    // The seconds of all three workers, merged: every delivery is in one,
    // and while publishing a second counts the subscribers of all three.
    assert_eq!(per_second_sum(&v, "deliveries_per_second"), 20 * 61, "{v}");
    assert!(
        v["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["subscribers"] == 61),
        "{v}"
    );

    // Two processes over two nodes: each node holds half the connections,
    // and the memory is read from both brokers.
    let urls = format!("{},{}", a.ws_url(), b.ws_url());
    let pids = format!("{},{}", a.pid(), b.pid());
    let v = loadtest(&[
        "--workers",
        "2",
        "idle",
        "--url",
        &urls,
        "--connections",
        "100",
        "--settle",
        "0.2",
        "--broker-pid",
        &pids,
    ])
    .await
    .ok();
    assert_eq!(n(&v, "workers"), 2, "{v}");
    assert_eq!(n(&v, "nodes"), 2, "{v}");
    assert_eq!(n(&v, "connections_measured"), 100, "{v}");
    assert!(
        v["broker_rss_per_connection_bytes"].as_f64().is_some(),
        "{v}"
    );
    assert_eq!(per_second_sum(&v, "setups_per_second"), 100, "{v}");
    assert_eq!(accepted(&a).await, 61 + 50);
    assert_eq!(accepted(&b).await, 50);

    let v = loadtest(&[
        "--workers",
        "2",
        "connect-rate",
        "--url",
        &b.ws_url(),
        "--connections",
        "101",
    ])
    .await
    .ok();
    assert_eq!(n(&v, "connections_established"), 101, "{v}");
    assert_eq!(n(&v, "connect_failures"), 0, "{v}");
    assert!(v["setup_p99_ms"].as_f64().is_some(), "{v}");
    assert_eq!(per_second_sum(&v, "setups_per_second"), 101, "{v}");
    assert_eq!(accepted(&b).await, 50 + 101);

    // resume over two processes: all dropped at once on the leader's word,
    // the leader publishes what every worker's clients miss, each resumes
    // its own; the figures add up.
    let dir = tempfile::tempdir().unwrap();
    let wave_svg = dir.path().join("wave.svg");
    let v = loadtest(&[
        "--workers",
        "2",
        "resume",
        "--url",
        &b.ws_url(),
        "--api",
        &b.api_url(""),
        "--clients",
        "31",
        "--missed",
        "3",
        "--plot",
        wave_svg.to_str().unwrap(),
    ])
    .await
    .ok();
    // The wave second by second, both workers' clients in it.
    assert_eq!(per_second_sum(&v, "reconnects_per_second"), 31, "{v}");
    let picture = std::fs::read_to_string(&wave_svg).unwrap();
    assert!(picture.contains("reconnects per second"));
    assert_eq!(n(&v, "workers"), 2, "{v}");
    assert_eq!(n(&v, "dropped"), 31, "{v}");
    assert_eq!(n(&v, "published"), 31 * 3, "{v}");
    assert_eq!(n(&v, "resumed"), 31, "{v}");
    assert_eq!(n(&v, "messages_received"), 31 * 3, "{v}");
    assert_eq!(n(&v, "messages_duplicated"), 0, "{v}");
    assert!(v["connect_p99_ms"].as_f64().is_some(), "{v}");
    assert_eq!(accepted(&b).await, 50 + 101 + 31 * 2);

    // churn over two processes: each drops and resumes its own clients
    // and checks them against the leader's ledger; the figures add up.
    let v = loadtest(&[
        "--workers",
        "2",
        "churn",
        "--url",
        &a.ws_url(),
        "--api",
        &a.api_url(""),
        "--clients",
        "40",
        "--channels",
        "4",
        "--rate",
        "40",
        "--duration",
        "2",
        "--drop-rate",
        "10",
        "--away",
        "0.2",
    ])
    .await
    .ok();
    assert_eq!(n(&v, "clients"), 40, "{v}");
    assert_eq!(n(&v, "publications"), 80, "{v}");
    assert_eq!(n(&v, "caught_up"), 40, "{v}");
    assert_eq!(
        n(&v, "deliveries"),
        80 * 10,
        "every client its channel's 20: {v}"
    );
    assert_eq!(per_second_sum(&v, "deliveries_per_second"), 80 * 10, "{v}");
    assert!(n(&v, "drops") >= 10, "both workers dropped theirs: {v}");
    assert_eq!(n(&v, "reconnects"), n(&v, "drops"), "{v}");
    for key in ["silently_lost", "duplicated", "reordered"] {
        assert_eq!(n(&v, key), 0, "{key}: {v}");
    }

    // Scenarios that are not spread refuse --workers.
    let run = loadtest(&["--workers", "2", "push", "--api", &a.api_url("")]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("push holds no client"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn the_other_scenarios_run_and_report_what_they_measured() {
    let broker = TestBroker::start(&[]).unwrap();
    let (ws, api) = (broker.ws_url(), broker.api_url(""));
    let pid = broker.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let fanout_svg = dir.path().join("fanout.svg");
    let fanout_svg = fanout_svg.to_str().unwrap();

    let v = loadtest(&[
        "fanout",
        "--url",
        &ws,
        "--api",
        &api,
        "--subscribers",
        "50",
        "--rate",
        "20",
        "--duration",
        "2",
        "--broker-pid",
        &pid,
        "--plot",
        fanout_svg,
    ])
    .await
    .ok();
    assert_eq!(n(&v, "publications"), 40, "{v}");
    assert_eq!(n(&v, "deliveries"), 2000, "{v}");
    assert_eq!(n(&v, "lost"), 0, "{v}");
    assert!(
        v["broker_cpu_us_per_delivery"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    // A second a sample, with its p99 and the subscribers connected; and
    // the picture of them.
    let timeline = v["timeline"].as_array().expect("timeline");
    assert!(!timeline.is_empty(), "{v}");
    let delivered: f64 = timeline
        .iter()
        .map(|s| s["deliveries_per_second"].as_f64().unwrap())
        .sum();
    assert!(delivered > 0.0, "{v}");
    assert!(
        timeline
            .iter()
            .any(|s| s["p99_ms"].as_f64().is_some_and(|ms| ms > 0.0) && s["subscribers"] == 50),
        "{v}"
    );
    let picture = std::fs::read_to_string(fanout_svg).unwrap();
    assert!(picture.starts_with("<svg") && picture.contains("latency distribution"));

    let idle_svg = dir.path().join("idle.svg");
    let idle_svg = idle_svg.to_str().unwrap();
    let run = loadtest(&[
        "idle",
        "--url",
        &ws,
        "--connections",
        "100",
        "--settle",
        "0.5",
        "--api",
        &api,
        "--plot",
        idle_svg,
    ])
    .await;
    let v = run.ok();
    assert!(
        run.stderr.contains("idle: settling") && run.stderr.contains("100 connections held"),
        "{}",
        run.stderr
    );
    assert_eq!(n(&v, "connections_established"), 100, "{v}");
    // Connecting, second by second: every setup in one of them; pictured.
    assert_eq!(per_second_sum(&v, "setups_per_second"), 100, "{v}");
    let timeline = v["timeline"].as_array().unwrap();
    assert_eq!(timeline.last().unwrap()["connections"], 100, "{v}");
    // (Any second: the last, partial one may have had no setup left.)
    assert!(
        timeline
            .iter()
            .any(|s| s["p99_ms"].as_f64().is_some_and(|ms| ms > 0.0)),
        "{v}"
    );
    let picture = std::fs::read_to_string(idle_svg).unwrap();
    assert!(picture.starts_with("<svg") && picture.contains("setup time distribution"));
    // No PID: the memory comes from the broker's GET /metrics.
    assert!(
        n(&v, "broker_rss_before_bytes") > 1024 * 1024,
        "a broker's memory: {v}"
    );
    assert!(
        v["broker_rss_per_connection_bytes"].as_f64().is_some(),
        "{v}"
    );

    // --json=FILE: the JSON line goes to the file, not to stdout.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("connect.json");
    let json_arg = format!("--json={}", file.display());
    let run = loadtest(&[
        &json_arg,
        "connect-rate",
        "--url",
        &ws,
        "--connections",
        "100",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(
        !run.stdout.lines().any(|l| l.starts_with('{')),
        "{}",
        run.stdout
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(n(&v, "connections_established"), 100, "{v}");
    assert_eq!(n(&v, "connect_failures"), 0, "{v}");
    // A progress line a second (at least the last one), plain in a pipe.
    assert!(run.stderr.contains("setups/s, setup p99"), "{}", run.stderr);

    let v = loadtest(&[
        "resume",
        "--url",
        &ws,
        "--api",
        &api,
        "--clients",
        "50",
        "--missed",
        "3",
    ])
    .await
    .ok();
    assert_eq!(n(&v, "resumed"), 50, "{v}");
    assert_eq!(n(&v, "messages_received"), 150, "{v}");
    assert_eq!(n(&v, "messages_lost"), 0, "{v}");
}

/// Against a broker that wants an API key and client tokens, every
/// scenario signs in: each simulated user gets its own token, the
/// publisher sends the key. Without a token, no client gets in, and the
/// run says why.
#[tokio::test]
async fn every_scenario_signs_in_to_a_broker_with_auth() {
    const SECRET: &str = "lt-jwt-secret-0123456789abcdef-0123";
    let broker = TestBroker::start(&["--api-key", "lt-key", "--jwt-secret", SECRET]).unwrap();
    let (ws, api) = (broker.ws_url(), broker.api_url(""));
    let (ws, api) = (ws.as_str(), api.as_str());
    let signed = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--api-key", "lt-key", "--jwt-secret", SECRET]);
        all.into_iter().map(str::to_owned).collect::<Vec<String>>()
    };
    async fn run(args: Vec<String>) -> Run {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        loadtest(&refs).await
    }

    let v = run(signed(&[
        "idle",
        "--url",
        ws,
        "--connections",
        "20",
        "--settle",
        "0.1",
    ]))
    .await
    .ok();
    assert_eq!(n(&v, "connections_established"), 20, "{v}");
    let v = run(signed(&[
        "connect-rate",
        "--url",
        ws,
        "--connections",
        "20",
    ]))
    .await
    .ok();
    assert_eq!(n(&v, "connections_established"), 20, "{v}");
    let v = run(signed(&[
        "fanout",
        "--url",
        ws,
        "--api",
        api,
        "--subscribers",
        "10",
        "--rate",
        "10",
        "--duration",
        "1",
    ]))
    .await
    .ok();
    assert_eq!(n(&v, "deliveries"), 100, "{v}");
    let v = run(signed(&[
        "resume",
        "--url",
        ws,
        "--api",
        api,
        "--clients",
        "10",
        "--missed",
        "2",
    ]))
    .await
    .ok();
    assert_eq!(n(&v, "resumed"), 10, "{v}");
    assert_eq!(n(&v, "messages_received"), 20, "{v}");

    // No token: refused with 4003 (PROTOCOL.md §9), counted by reason.
    let r = loadtest(&[
        "idle",
        "--url",
        ws,
        "--connections",
        "5",
        "--connect-retries",
        "0",
    ])
    .await;
    assert_eq!(r.code, Some(1), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("4003"), "{}", r.stderr);
    // Tokens but no API key: the publisher is refused, and says so.
    let r = loadtest(&[
        "fanout",
        "--url",
        ws,
        "--api",
        api,
        "--subscribers",
        "2",
        "--duration",
        "1",
        "--jwt-secret",
        SECRET,
    ])
    .await;
    assert_ne!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("401"), "{}", r.stderr);
}

/// `cluster` refuses a single node: it is the multi-node scenario.
#[tokio::test]
async fn the_cluster_scenario_needs_two_nodes() {
    let run = loadtest(&["cluster", "--url", "ws://127.0.0.1:9/v1/ws"]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("at least two --url"), "{}", run.stderr);
}

/// `soak`, briefly: the broker's memory sampled from its /metrics, the
/// drift figures reported, and the ledger's verdict as in churn.
#[tokio::test]
async fn soak_samples_the_broker_memory_and_reports_drift() {
    let broker = TestBroker::start(&[]).unwrap();
    let v = loadtest(&[
        "soak",
        "--url",
        &broker.ws_url(),
        "--api",
        &broker.api_url(""),
        "--clients",
        "20",
        "--channels",
        "4",
        "--rate",
        "50",
        "--duration",
        "4",
        "--drop-rate",
        "2",
        "--sample-every",
        "1",
        "--max-memory-growth-mb-per-hour",
        "1000000",
    ])
    .await
    .ok();
    assert_eq!(v["scenario"], "soak", "{v}");
    assert_eq!(n(&v, "publications"), 200, "{v}");
    assert!(n(&v, "memory_samples") >= 3, "one a second: {v}");
    assert!(
        n(&v, "memory_start_bytes") > 1024 * 1024,
        "a broker's resident memory: {v}"
    );
    assert!(v["memory_growth_mb_per_hour"].is_number(), "{v}");
    assert!(v["p99_first_tenth_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["p99_last_tenth_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(n(&v, "drops") >= 4, "{v}");
    for key in ["silently_lost", "duplicated", "reordered"] {
        assert_eq!(n(&v, key), 0, "{key}: {v}");
    }
}

/// A broker set up for the fake FCM that `loadtest fake-fcm` describes:
/// the service account it writes, its endpoint.
async fn fcm_broker(sink: std::net::SocketAddr) -> (TestBroker, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let account = dir.path().join("service-account.json");
    let account = account.to_str().unwrap().to_owned();
    let (listen, write) = (sink.to_string(), account.clone());
    let run = loadtest(&[
        "fake-fcm",
        "--listen",
        &listen,
        "--write-service-account",
        &write,
    ])
    .await;
    let v = run.ok();
    assert!(
        v["broker_flags"]
            .as_str()
            .unwrap()
            .contains("--fcm-endpoint"),
        "{v}"
    );
    let endpoint = format!("http://{sink}");
    let broker = TestBroker::start(&[
        "--fcm-service-account",
        &account,
        "--fcm-endpoint",
        &endpoint,
    ])
    .unwrap();
    (broker, dir, account)
}

/// `push --provider fcm`: the broker gets its access token from the sink
/// (a grant signed with the service account's key, checked) and every
/// publication's push arrives once.
#[tokio::test]
async fn push_over_fcm_counts_every_push_and_checks_the_grant() {
    let sink = free_addr();
    let (broker, _dir, account) = fcm_broker(sink).await;
    let (api, sink) = (broker.api_url(""), sink.to_string());
    let v = loadtest(&[
        "push",
        "--provider",
        "fcm",
        "--service-account",
        &account,
        "--api",
        &api,
        "--sink",
        &sink,
        "--users",
        "20",
        "--rate",
        "50",
        "--duration",
        "2",
    ])
    .await
    .ok();
    assert_eq!(v["provider"], "fcm", "{v}");
    assert_eq!(n(&v, "devices"), 20, "{v}");
    assert_eq!(n(&v, "publications"), 100, "{v}");
    assert_eq!(n(&v, "pushes"), 100, "{v}");
    assert!(
        n(&v, "sink_grants") >= 1,
        "the broker asked for a token: {v}"
    );
    assert_eq!(n(&v, "sink_refused"), 0, "{v}");
    assert_eq!(n(&v, "pushes_duplicated"), 0, "{v}");
}

/// `fake-apns` on its own, for pushes an SRE drives from their backend: it
/// counts what the broker sent until it is stopped (SIGTERM), then reports.
#[tokio::test]
async fn fake_apns_counts_pushes_until_it_is_stopped() {
    let sink = free_addr();
    let listen = sink.to_string();
    let mut child = command(&["fake-apns", "--listen", &listen])
        .spawn()
        .unwrap();
    let (broker, _dir) = apns_broker(sink);
    let http = reqwest::Client::new();
    for i in 0..3 {
        let r = http
            .put(broker.api_url(&format!("/v1/devices/sre-dev-{i}")))
            .json(
                &serde_json::json!({"user": format!("sre-{i}"), "platform": "apns",
                "token": format!("{i:064x}")}),
            )
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
    for i in 0..3 {
        for k in 0..2 {
            let r = http
                .post(broker.api_url("/v1/publish"))
                .json(
                    &serde_json::json!({"channel": format!("user:sre-{i}"), "data": {"k": k},
                    "push": {"title": "t", "body": "b"}}),
                )
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.status());
        }
    }
    // The broker counts what the provider accepted: once all six are in,
    // the sink has them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let m = broker.metrics().await.unwrap();
        let sent: u64 = m
            .lines()
            .filter(|l| {
                l.starts_with("tether_pushes_total{") && l.contains("outcome=\"delivered\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if sent >= 6 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "pushes not sent: {m}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // SIGTERM, as an operator stops it.
    let pid = child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let (stdout, stderr, code) = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        let mut err = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (out, err, child.wait().unwrap().code())
    })
    .await
    .unwrap();
    let run = Run {
        code,
        stdout,
        stderr,
    };
    let v = run.ok();
    assert_eq!(n(&v, "pushes"), 6, "{v}");
    assert_eq!(n(&v, "pushes_duplicated"), 0, "{v}");
    assert_eq!(n(&v, "sink_refused"), 0, "{v}");
}

/// `floor` (no broker): one send per connection a round, and every byte
/// sent over its loopback connections arrives.
#[tokio::test]
async fn floor_sends_once_per_connection_a_round_and_every_byte_arrives() {
    let v = loadtest(&[
        "floor",
        "--connections",
        "50",
        "--rate",
        "10",
        "--duration",
        "0.5",
        "--payload",
        "130",
    ])
    .await
    .ok();
    let sends = n(&v, "sends");
    assert_eq!(
        sends,
        50 * n(&v, "rounds"),
        "one send per connection a round: {v}"
    );
    assert!(sends >= 50, "{v}");
    assert_eq!(n(&v, "bytes_received"), sends * 130, "{v}");
    assert_eq!(n(&v, "bytes_lost"), 0, "{v}");
    assert_eq!(n(&v, "receivers_complete"), 50, "{v}");
}
