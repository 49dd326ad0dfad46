//! Cluster mode: several broker processes sharing one real `redis-server`
//! (started by the harness on a free port), and the same core cases on a
//! real three-master Redis Cluster.

use std::collections::BTreeSet;

use serde_json::json;
use tether_protocol::{ChannelName, Offset, StreamPosition};
use tether_tests::redis::{TestRedis, TestRedisCluster};
use tether_tests::{TestBroker, WAIT, WsClient, connected_client};

const SECRET: &str = "cluster-resume-secret-0123456789";

/// A node of a cluster on `redis` (`--redis-url` or `--redis-cluster`).
fn node(flag: &str, redis: &str, id: &str, extra: &[&str]) -> TestBroker {
    let mut args = vec![flag, redis, "--resume-secret", SECRET, "--node-id", id];
    args.extend_from_slice(extra);
    TestBroker::start(&args).unwrap()
}

fn nodes(flag: &str, redis: &str, n: usize) -> Vec<TestBroker> {
    (0..n)
        .map(|i| node(flag, redis, &format!("node-{i}"), &[]))
        .collect()
}

async fn publish(broker: &TestBroker, channel: &str, data: serde_json::Value) -> u64 {
    let (status, body) = broker
        .publish(json!({"channel": channel, "data": data}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body["offset"].as_u64().unwrap()
}

/// Receives publications on `client` until it has offset `until`; returns
/// the offsets in the order they came.
async fn offsets_until(client: &mut WsClient, until: u64) -> Vec<u64> {
    let mut got = Vec::new();
    while got.last() != Some(&until) {
        got.push(client.recv_publication().await.unwrap().offset.get());
    }
    got
}

/// Subscribe on the first node, publish on the others in turn: every
/// subscriber sees one offset sequence, 1, 2, 3, … with no gap.
async fn any_node_publishes_any_node_delivers(flag: &str, redis: &str) {
    let nodes = nodes(flag, redis, 3);
    let mut a = connected_client(&nodes[0]).await.unwrap();
    let mut b = connected_client(&nodes[1]).await.unwrap();
    let sa = a.subscribe("news").await.unwrap();
    let sb = b.subscribe("news").await.unwrap();
    assert_eq!(sa.epoch, sb.epoch, "one epoch, whichever node is asked");
    let mut offsets = Vec::new();
    for i in 0..30 {
        offsets.push(publish(&nodes[1 + i % 2], "news", json!(i)).await);
    }
    let expected: Vec<u64> = (1..=30).collect();
    assert_eq!(offsets, expected, "offsets are the same on every node");
    assert_eq!(offsets_until(&mut a, 30).await, expected);
    assert_eq!(offsets_until(&mut b, 30).await, expected);
    // History is shared too.
    let h: serde_json::Value = nodes[2]
        .http()
        .get(nodes[2].api_url("/v1/channels/news/history?since=25"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let got: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(got, vec![26, 27, 28, 29, 30]);
    assert_eq!(h["recovered"], true);
}

#[tokio::test]
async fn one_redis_any_node_publishes_any_node_delivers() {
    let redis = TestRedis::start().unwrap();
    any_node_publishes_any_node_delivers("--redis-url", &redis.url()).await;
}

#[tokio::test]
async fn redis_cluster_any_node_publishes_any_node_delivers() {
    let cluster = TestRedisCluster::start().unwrap();
    any_node_publishes_any_node_delivers("--redis-cluster", &cluster.seeds()).await;
}

/// Subscribe with `since` on one node to what was published through
/// another: the replay and the live messages meet with no gap.
async fn subscribe_since_on_another_node(flag: &str, redis: &str) {
    let nodes = nodes(flag, redis, 2);
    let first = {
        let (s, b) = nodes[0]
            .publish(json!({"channel": "feed", "data": 0}))
            .await
            .unwrap();
        assert_eq!(s, 200);
        b
    };
    for i in 1..10 {
        publish(&nodes[0], "feed", json!(i)).await;
    }
    let mut c = connected_client(&nodes[1]).await.unwrap();
    let s = c
        .subscribe_since(
            "feed",
            StreamPosition {
                epoch: tether_protocol::Epoch::new(first["epoch"].as_str().unwrap()),
                offset: Offset(4),
            },
        )
        .await
        .unwrap();
    assert!(s.recovered);
    assert_eq!(s.offset, Offset(10));
    publish(&nodes[0], "feed", json!(10)).await;
    assert_eq!(
        offsets_until(&mut c, 11).await,
        (5..=11).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn one_redis_subscribe_since_on_another_node() {
    let redis = TestRedis::start().unwrap();
    subscribe_since_on_another_node("--redis-url", &redis.url()).await;
}

#[tokio::test]
async fn redis_cluster_subscribe_since_on_another_node() {
    let cluster = TestRedisCluster::start().unwrap();
    subscribe_since_on_another_node("--redis-cluster", &cluster.seeds()).await;
}

#[tokio::test]
async fn an_idempotency_key_is_one_publication_across_nodes() {
    let redis = TestRedis::start().unwrap();
    let nodes = nodes("--redis-url", &redis.url(), 2);
    let mut c = connected_client(&nodes[0]).await.unwrap();
    c.subscribe("orders").await.unwrap();
    let mut answers = BTreeSet::new();
    for n in &nodes {
        let (s, b) = n
            .publish(json!({"channel": "orders", "data": 1, "idempotency_key": "order-77"}))
            .await
            .unwrap();
        assert_eq!(s, 200, "{b}");
        answers.insert(b["offset"].as_u64().unwrap());
    }
    assert_eq!(answers.len(), 1, "both nodes answer the first publication");
    // A barrier: the next publication must be the next offset, and the one
    // delivered right after the first.
    let next = publish(&nodes[1], "orders", json!(2)).await;
    assert_eq!(next, 2);
    assert_eq!(offsets_until(&mut c, 2).await, vec![1, 2]);
}

#[tokio::test]
async fn a_node_whose_pubsub_connection_is_killed_fills_the_gap() {
    let redis = TestRedis::start().unwrap();
    let nodes = nodes("--redis-url", &redis.url(), 2);
    let mut c = connected_client(&nodes[0]).await.unwrap();
    c.subscribe("ticker").await.unwrap();
    publish(&nodes[1], "ticker", json!(0)).await;
    assert_eq!(offsets_until(&mut c, 1).await, vec![1]);
    // Kill every pub/sub connection, publish meanwhile (one batch: before
    // the node has subscribed again).
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    let batch: Vec<_> = (1..20)
        .map(|i| json!({"channel": "ticker", "data": i}))
        .collect();
    let r = nodes[1]
        .http()
        .post(nodes[1].api_url("/v1/publish/batch"))
        .json(&json!({ "messages": batch }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Every offset once, in order: what pub/sub lost comes from history.
    assert_eq!(
        offsets_until(&mut c, 20).await,
        (2..=20).collect::<Vec<_>>()
    );
    c.expect_nothing_pending().await.unwrap();
    let metrics = nodes[0].metrics().await.unwrap();
    assert!(
        counter(&metrics, "tether_cluster_reconnects_total") >= 1,
        "{metrics}"
    );
}

/// A pub/sub connection that stays open but goes mute (seen after Redis
/// failovers) is found by the node's probe through Redis and replaced;
/// what was published meanwhile still arrives, once, in order.
// Multi-threaded: the proxy's tasks must run while `TestBroker::start`
// blocks this thread waiting for the broker to be ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_pubsub_connection_is_found_by_the_probe_and_replaced() {
    let redis = TestRedis::start().unwrap();
    let upstream = format!("127.0.0.1:{}", redis.port()).parse().unwrap();
    let proxy = tether_tests::silencer::Silencer::start(upstream)
        .await
        .unwrap();
    let a = node("--redis-url", &proxy.url(), "a", &[]);
    let b = node("--redis-url", &redis.url(), "b", &[]);
    let mut c = connected_client(&a).await.unwrap();
    c.subscribe("quiet").await.unwrap();
    publish(&b, "quiet", json!(1)).await;
    assert_eq!(offsets_until(&mut c, 1).await, vec![1]);
    assert_eq!(proxy.silence_pubsub(), 1, "node a's one pub/sub connection");
    for i in 2..=4 {
        publish(&b, "quiet", json!(i)).await;
    }
    // Found within probe-every + probe-timeout (2 + 3 s), then replaced.
    a.wait_for_metric("tether_cluster_probes_failed_total 1")
        .await
        .unwrap();
    a.wait_for_metric("tether_cluster_reconnects_total 1")
        .await
        .unwrap();
    publish(&b, "quiet", json!(5)).await;
    assert_eq!(offsets_until(&mut c, 5).await, vec![2, 3, 4, 5]);
    c.expect_nothing_pending().await.unwrap();
}

/// On a Redis Cluster each shard has its own pub/sub connection, so each
/// carries one of the node's probes: a mute connection to any shard is found.
#[tokio::test]
async fn redis_cluster_every_shard_carries_a_probe_of_each_node() {
    let cluster = TestRedisCluster::start().unwrap();
    let n = node("--redis-cluster", &cluster.seeds(), "prober", &[]);
    assert_eq!(readyz(&n).await, 200);
    for shard in 0..cluster.ports().len() {
        let listed = cluster
            .cli(
                shard,
                &["PUBSUB", "SHARDCHANNELS", "tether:{#probe:prober:*"],
            )
            .unwrap();
        assert_eq!(
            listed.lines().filter(|l| !l.trim().is_empty()).count(),
            1,
            "shard {shard}: {listed:?}"
        );
    }
}

/// A counter's value in a Prometheus text exposition (0 when absent).
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Appends a publication to `channel`'s position and history the way the
/// publish script does, but without publishing it on pub/sub: a
/// publication lost between Redis and the nodes.
fn publish_behind_pubsub(redis: &TestRedis, channel: &str, data: &str) -> u64 {
    let pos = format!("tether:{{{channel}}}:p");
    let hist = format!("tether:{{{channel}}}:h");
    let offset: u64 = redis
        .cli(&["HINCRBY", &pos, "offset", "1"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ts = tether_tests::unix_now() * 1000;
    redis
        .cli(&[
            "XADD",
            &hist,
            &format!("{offset}-0"),
            "d",
            data,
            "t",
            &ts.to_string(),
        ])
        .unwrap();
    offset
}

#[tokio::test]
async fn a_publication_lost_on_pubsub_is_filled_from_history_before_the_next() {
    let redis = TestRedis::start().unwrap();
    let nodes = nodes("--redis-url", &redis.url(), 2);
    let mut c = connected_client(&nodes[0]).await.unwrap();
    c.subscribe("alerts").await.unwrap();
    publish(&nodes[1], "alerts", json!("one")).await;
    assert_eq!(offsets_until(&mut c, 1).await, vec![1]);
    assert_eq!(publish_behind_pubsub(&redis, "alerts", "\"two\""), 2);
    assert_eq!(publish(&nodes[1], "alerts", json!("three")).await, 3);
    let two = c.recv_publication().await.unwrap();
    assert_eq!((two.offset, two.data), (Offset(2), json!("two")));
    assert_eq!(c.recv_publication().await.unwrap().offset, Offset(3));
    let m = nodes[0].metrics().await.unwrap();
    assert_eq!(counter(&m, "tether_cluster_gaps_filled_total"), 1, "{m}");
}

#[tokio::test]
async fn a_lost_last_publication_is_found_by_the_position_check() {
    let redis = TestRedis::start().unwrap();
    let nodes = nodes("--redis-url", &redis.url(), 2);
    let mut c = connected_client(&nodes[0]).await.unwrap();
    c.subscribe("quiet").await.unwrap();
    publish(&nodes[1], "quiet", json!("one")).await;
    assert_eq!(offsets_until(&mut c, 1).await, vec![1]);
    // Nothing follows it: only the node's periodic position check can
    // find it.
    publish_behind_pubsub(&redis, "quiet", "\"two\"");
    let two = c.recv_publication().await.unwrap();
    assert_eq!((two.offset, two.data), (Offset(2), json!("two")));
    c.expect_nothing_pending().await.unwrap();
}

#[tokio::test]
async fn a_cluster_node_needs_a_shared_resume_secret() {
    let redis = TestRedis::start().unwrap();
    let err = TestBroker::start(&["--redis-url", &redis.url()])
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("resume-secret"), "{err:#}");
}

#[tokio::test]
async fn channels_in_a_message_name_their_epoch() {
    // The epoch given at subscribe is the one live messages carry, even for
    // a channel nobody published to before (the subscribe creates it).
    let redis = TestRedis::start().unwrap();
    let nodes = nodes("--redis-url", &redis.url(), 2);
    let mut c = connected_client(&nodes[0]).await.unwrap();
    let s = c.subscribe("fresh").await.unwrap();
    assert_eq!(s.offset, Offset(0));
    publish(&nodes[1], "fresh", json!("x")).await;
    let m = c.recv_publication().await.unwrap();
    assert_eq!(m.epoch, s.epoch);
    assert_eq!(m.channel, ChannelName::new("fresh").unwrap());
}

/// The offsets a resume names: the channel's last offset seen.
fn named(channel: &str, offset: u64) -> Option<std::collections::BTreeMap<ChannelName, Offset>> {
    Some([(ChannelName::new(channel).unwrap(), Offset(offset))].into())
}

async fn a_client_of_a_killed_node_resumes_on_another(flag: &str, redis: &str) {
    let mut a = node(flag, redis, "a", &[]);
    let c_node = node(flag, redis, "c", &[]);
    let mut client = WsClient::connect(&a.ws_url()).await.unwrap();
    let connected = client.handshake(None).await.unwrap();
    client.subscribe("k").await.unwrap();
    for i in 1..=5 {
        publish(&c_node, "k", json!(i)).await;
    }
    assert_eq!(offsets_until(&mut client, 5).await, vec![1, 2, 3, 4, 5]);
    a.kill();
    client.abort();
    for i in 6..=10 {
        publish(&c_node, "k", json!(i)).await;
    }
    let mut back = WsClient::connect(&c_node.ws_url()).await.unwrap();
    let resumed = back
        .resume(None, &connected.resume_token, named("k", 5))
        .await
        .unwrap();
    assert!(resumed.resumed, "the session outlives its node");
    let k = &resumed.channels.as_ref().unwrap()[&ChannelName::new("k").unwrap()];
    assert!(k.recovered);
    publish(&c_node, "k", json!(11)).await;
    assert_eq!(
        offsets_until(&mut back, 11).await,
        (6..=11).collect::<Vec<_>>()
    );
    back.expect_nothing_pending().await.unwrap();
}

#[tokio::test]
async fn one_redis_a_client_of_a_killed_node_resumes_on_another_with_nothing_lost() {
    let redis = TestRedis::start().unwrap();
    a_client_of_a_killed_node_resumes_on_another("--redis-url", &redis.url()).await;
}

#[tokio::test]
async fn redis_cluster_a_client_of_a_killed_node_resumes_on_another_with_nothing_lost() {
    let cluster = TestRedisCluster::start().unwrap();
    a_client_of_a_killed_node_resumes_on_another("--redis-cluster", &cluster.seeds()).await;
}

async fn a_resume_on_another_node_takes_the_live_session_over(flag: &str, redis: &str) {
    let nodes = nodes(flag, redis, 2);
    let mut old = WsClient::connect(&nodes[0].ws_url()).await.unwrap();
    let connected = old.handshake(None).await.unwrap();
    old.subscribe("t").await.unwrap();
    publish(&nodes[1], "t", json!(1)).await;
    assert_eq!(offsets_until(&mut old, 1).await, vec![1]);
    let mut new = WsClient::connect(&nodes[1].ws_url()).await.unwrap();
    let resumed = new
        .resume(None, &connected.resume_token, None)
        .await
        .unwrap();
    assert!(resumed.resumed);
    assert_eq!(resumed.session, connected.session);
    let closed = old.expect_close().await.unwrap();
    assert_eq!(closed.code, Some(4000));
    // The old connection handed over what it had delivered: nothing is
    // replayed twice, the next publication comes once.
    publish(&nodes[0], "t", json!(2)).await;
    assert_eq!(offsets_until(&mut new, 2).await, vec![2]);
}

#[tokio::test]
async fn one_redis_a_resume_on_another_node_takes_the_live_session_over() {
    let redis = TestRedis::start().unwrap();
    a_resume_on_another_node_takes_the_live_session_over("--redis-url", &redis.url()).await;
}

#[tokio::test]
async fn redis_cluster_a_resume_on_another_node_takes_the_live_session_over() {
    let cluster = TestRedisCluster::start().unwrap();
    a_resume_on_another_node_takes_the_live_session_over("--redis-cluster", &cluster.seeds()).await;
}

#[tokio::test]
async fn a_draining_node_sends_4010_with_a_delay_and_its_clients_resume_elsewhere() {
    let redis = TestRedis::start().unwrap();
    let mut a = node("--redis-url", &redis.url(), "a", &[]);
    let b = node("--redis-url", &redis.url(), "b", &[]);
    let mut client = WsClient::connect(&a.ws_url()).await.unwrap();
    let connected = client.handshake(None).await.unwrap();
    client.subscribe("d").await.unwrap();
    publish(&b, "d", json!(1)).await;
    assert_eq!(offsets_until(&mut client, 1).await, vec![1]);
    let stopping = std::thread::spawn(move || {
        let status = a.terminate(std::time::Duration::from_secs(20));
        (a, status)
    });
    let closed = client.expect_close().await.unwrap();
    assert_eq!(closed.code, Some(4010));
    let d = closed.disconnect.expect("a disconnect first");
    assert!(d.reconnect);
    assert!(d.retry_after_ms.is_some_and(|ms| ms < 2000), "{d:?}");
    let (_a, status) = stopping.join().unwrap();
    assert!(status.unwrap().success());
    publish(&b, "d", json!(2)).await;
    // A drained session detached cleanly: resuming without naming offsets
    // replays exactly what it missed.
    let mut back = WsClient::connect(&b.ws_url()).await.unwrap();
    let resumed = back
        .resume(None, &connected.resume_token, None)
        .await
        .unwrap();
    assert!(resumed.resumed);
    assert_eq!(offsets_until(&mut back, 2).await, vec![2]);
}

async fn readyz(broker: &TestBroker) -> u16 {
    broker
        .http()
        .get(broker.api_url("/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test]
async fn redis_down_then_back_no_node_dies_and_publishing_resumes() {
    let mut redis = TestRedis::start().unwrap();
    let nodes = nodes("--redis-url", &redis.url(), 2);
    let mut c = connected_client(&nodes[0]).await.unwrap();
    c.subscribe("r").await.unwrap();
    for i in 1..=3 {
        publish(&nodes[1], "r", json!(i)).await;
    }
    // Acknowledged before the outage: delivered.
    assert_eq!(offsets_until(&mut c, 3).await, vec![1, 2, 3]);

    redis.stop();
    let started = std::time::Instant::now();
    let (status, body) = nodes[1]
        .publish(json!({"channel": "r", "data": "lost?"}))
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "answered, not hung: {:?}",
        started.elapsed()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while readyz(&nodes[0]).await != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "readyz stays 200 with Redis down"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The session lives on: heartbeats and pings are answered.
    c.expect_nothing_pending().await.unwrap();

    redis.restart().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let after = loop {
        let (s, b) = nodes[1]
            .publish(json!({"channel": "r", "data": "back"}))
            .await
            .unwrap();
        if s == 200 {
            break b;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "publishing did not come back: {b}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    // An emptied Redis starts a new epoch; the subscriber hears it.
    let m = c.recv_publication().await.unwrap();
    assert_eq!(m.epoch.as_str(), after["epoch"].as_str().unwrap());
    assert_eq!(m.data, json!("back"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while readyz(&nodes[0]).await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "readyz did not come back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A cluster node with APNs pointed at the fake, heartbeat `hb` seconds.
fn push_node(redis: &TestRedis, apns: &super::push::Apns, id: &str, hb: &str) -> TestBroker {
    let args = apns.args();
    let mut extra: Vec<&str> = args.iter().map(String::as_str).collect();
    extra.extend(["--heartbeat", hb]);
    node("--redis-url", &redis.url(), id, &extra)
}

#[tokio::test]
async fn a_device_whose_only_session_was_on_a_killed_node_gets_its_push() {
    use super::push::{Apns, apns_token, live_session, publish_push, register_apns};
    let redis = TestRedis::start().unwrap();
    let apns = Apns::start().await;
    let mut a = push_node(&redis, &apns, "a", "1");
    let b = push_node(&redis, &apns, "b", "1");
    // Registered through A, decided on B: the registry is shared.
    register_apns(&a, "zoe-phone", "zoe", &apns_token(0x21)).await;
    let mut session = live_session(&a, "zoe", "zoe-phone").await;
    // Live (on A): the publication on B goes to the session, not to APNs.
    publish_push(&b, "zoe", "while live").await;
    assert_eq!(session.recv_publication().await.unwrap().offset, Offset(1));
    assert!(apns.fake.accepted().is_empty(), "no push while live");
    a.kill();
    session.abort();
    // A's sessions vanish from presence within two heartbeats (2 s here);
    // until then a publication still counts the device as live.
    let killed = std::time::Instant::now();
    let deadline = killed + std::time::Duration::from_secs(15);
    let mut n = 1;
    loop {
        n += 1;
        publish_push(&b, "zoe", &format!("try {n}")).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        if !apns.fake.accepted().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never pushed after the node died"
        );
    }
    let after = killed.elapsed();
    let pushed = apns.fake.accepted();
    assert_eq!(pushed.len(), 1, "one push per message: {pushed:?}");
    assert!(
        after < std::time::Duration::from_secs(5),
        "presence expired after {after:?} (two heartbeats are 2 s)"
    );
}

/// `--ack-timeout` in a cluster: the check waits in Redis, not in the node
/// that published. Node A publishes to two live devices on node B and dies
/// at once; B still decides both when they fall due: the one that acked
/// gets nothing, the silent one its push.
async fn an_ack_timeout_check_outlives_the_node_that_published(flag: &str, redis: &str) {
    use super::push::{Apns, apns_token, live_session, publish_push, register_apns};
    use tether_protocol::{Ack, ClientMessage};
    let apns = Apns::start().await;
    let node_with_timeout = |id: &str| {
        let args = apns.args();
        let mut extra: Vec<&str> = args.iter().map(String::as_str).collect();
        extra.extend(["--ack-timeout", "2"]);
        node(flag, redis, id, &extra)
    };
    let mut a = node_with_timeout("a");
    let b = node_with_timeout("b");
    register_apns(&b, "bob-phone", "bob", &apns_token(0xb2)).await;
    register_apns(&b, "carol-phone", "carol", &apns_token(0xc2)).await;
    register_apns(&b, "dave-phone", "dave", &apns_token(0xd2)).await;
    let mut bob = live_session(&b, "bob", "bob-phone").await;
    let mut carol = live_session(&b, "carol", "carol-phone").await;

    publish_push(&a, "bob", "for bob").await;
    publish_push(&a, "carol", "for carol").await;
    a.kill();
    let m = bob.recv_publication().await.unwrap();
    bob.send(&ClientMessage::Ack(Ack {
        channel: m.channel.clone(),
        offset: m.offset,
    }))
    .await
    .unwrap();
    carol.recv_publication().await.unwrap();
    // Carol never acks: her push comes from B once the timeout passed.
    let got = apns.fake.wait_accepted(1, WAIT).await.unwrap();
    assert_eq!(got[0].token, apns_token(0xc2));
    // Barrier: Dave has no live session, so his push goes out at once; by
    // the time it arrived, a wrong push for Bob (decided before Carol's)
    // would have too.
    publish_push(&b, "dave", "for dave").await;
    let got = apns.fake.wait_accepted(2, WAIT).await.unwrap();
    let tokens: Vec<String> = got.iter().map(|n| n.token.clone()).collect();
    assert_eq!(
        tokens,
        vec![apns_token(0xc2), apns_token(0xd2)],
        "none for Bob, who acked"
    );
    assert_eq!(apns.fake.requests().len(), 2);
}

#[tokio::test]
async fn one_redis_an_ack_timeout_check_outlives_the_node_that_published() {
    let redis = TestRedis::start().unwrap();
    an_ack_timeout_check_outlives_the_node_that_published("--redis-url", &redis.url()).await;
}

#[tokio::test]
async fn redis_cluster_an_ack_timeout_check_outlives_the_node_that_published() {
    let cluster = TestRedisCluster::start().unwrap();
    an_ack_timeout_check_outlives_the_node_that_published("--redis-cluster", &cluster.seeds())
        .await;
}

#[tokio::test]
async fn pushes_enqueued_on_any_node_are_sent_once_across_the_gateways() {
    use super::push::{Apns, apns_token, publish_push, register_apns};
    let redis = TestRedis::start().unwrap();
    let apns = Apns::start().await;
    let nodes: Vec<TestBroker> = (0..3)
        .map(|i| push_node(&redis, &apns, &format!("n{i}"), "25"))
        .collect();
    register_apns(&nodes[0], "yuri-phone", "yuri", &apns_token(0x31)).await;
    for i in 0..30 {
        publish_push(&nodes[i % 3], "yuri", &format!("m{i}")).await;
    }
    let got = apns
        .fake
        .wait_accepted(30, std::time::Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(got.len(), 30);
    // A barrier: a last one, sent after all of those were accepted; none
    // of the 30 comes a second time before it.
    publish_push(&nodes[1], "yuri", "last").await;
    let all = apns
        .fake
        .wait_accepted(31, std::time::Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(all.len(), 31);
    let per_id = apns.fake.accepted_per_id();
    assert!(
        per_id.values().all(|n| *n == 1),
        "a push sent twice: {per_id:?}"
    );
}

/// History past its size: a cluster answers exactly what one node answers
/// (the last `--history-size` messages, `recovered` false from before them),
/// although Redis trims its stream only approximately.
#[tokio::test]
async fn a_trimmed_history_answers_as_on_a_single_node() {
    let redis = TestRedis::start().unwrap();
    let size = ["--history-size", "10"];
    let cluster = [
        node("--redis-url", &redis.url(), "node-0", &size),
        node("--redis-url", &redis.url(), "node-1", &size),
    ];
    let single = TestBroker::start(&size).unwrap();
    for i in 1..=350u64 {
        assert_eq!(publish(&cluster[0], "trim", json!(i)).await, i);
        assert_eq!(publish(&single, "trim", json!(i)).await, i);
    }
    // The precondition that makes this test mean something: the stream
    // holds more than the history size.
    let len: u64 = redis
        .cli(&["XLEN", "tether:{trim}:h"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(len > 10, "stream length {len}");
    // Its keys expire (refreshed lazily, never sooner than the history TTL,
    // 300 s by default, after the last publication).
    for key in ["tether:{trim}:h", "tether:{trim}:p"] {
        let ttl: i64 = redis.cli(&["PTTL", key]).unwrap().trim().parse().unwrap();
        assert!(ttl > 300_000, "{key} expires in {ttl} ms");
    }

    async fn page(b: &TestBroker, query: &str) -> (bool, Vec<u64>) {
        let h: serde_json::Value = b
            .http()
            .get(b.api_url(&format!("/v1/channels/trim/history?{query}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let offsets = h["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        (h["recovered"].as_bool().unwrap(), offsets)
    }
    for query in [
        "since=0",
        "since=339",
        "since=340",
        "since=345&limit=3",
        "since=100&limit=4",
    ] {
        let want = page(&single, query).await;
        assert_eq!(page(&cluster[1], query).await, want, "{query}");
    }
    assert_eq!(
        page(&cluster[1], "since=0").await,
        (false, (341..=350).collect())
    );
    assert_eq!(
        page(&cluster[1], "since=340").await,
        (true, (341..=350).collect())
    );

    // A subscribe from just inside the window replays it; one from before
    // the window answers recovered false and replays nothing (the next
    // publication is the first thing it receives).
    let epoch = cluster[0]
        .http()
        .get(cluster[0].api_url("/v1/channels/trim/history"))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let since = |offset| StreamPosition {
        epoch: tether_protocol::Epoch::new(&epoch),
        offset: Offset(offset),
    };
    let mut inside = connected_client(&cluster[1]).await.unwrap();
    let s = inside.subscribe_since("trim", since(340)).await.unwrap();
    assert!(s.recovered);
    let mut before = connected_client(&cluster[1]).await.unwrap();
    let s = before.subscribe_since("trim", since(339)).await.unwrap();
    assert!(!s.recovered);
    assert_eq!(s.offset, Offset(350));
    publish(&cluster[0], "trim", json!(351)).await;
    assert_eq!(
        offsets_until(&mut inside, 351).await,
        (341..=351).collect::<Vec<_>>()
    );
    assert_eq!(offsets_until(&mut before, 351).await, vec![351]);
}

/// A batch goes to Redis in pipelines: its publications keep their order
/// (offsets and data agree), interleaved with another node's publications
/// on the same channel, and a Redis that lost its script cache
/// (`SCRIPT FLUSH`, as after a restart) costs nothing but a reload.
async fn a_batch_keeps_its_order_through_the_pipeline(
    flag: &str,
    redis: &str,
    flush_scripts: impl FnOnce(),
) {
    let nodes = nodes(flag, redis, 2);
    let mut sub = connected_client(&nodes[1]).await.unwrap();
    sub.subscribe("batch").await.unwrap();
    flush_scripts();
    let messages: Vec<serde_json::Value> = (0..300)
        .map(|i| json!({"channel": "batch", "data": {"i": i}}))
        .collect();
    let post = nodes[0]
        .http()
        .post(nodes[0].api_url("/v1/publish/batch"))
        .json(&json!({ "messages": messages }));
    let other = async {
        let mut offsets = Vec::new();
        for i in 0..50 {
            offsets.push(publish(&nodes[1], "batch", json!({"other": i})).await);
        }
        offsets
    };
    let (answer, other) = tokio::join!(post.send(), other);
    let answer: serde_json::Value = answer.unwrap().json().await.unwrap();
    let batch: Vec<u64> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(batch.len(), 300);
    assert!(batch.windows(2).all(|w| w[0] < w[1]), "{batch:?}");
    assert!(other.windows(2).all(|w| w[0] < w[1]), "{other:?}");
    let mut all: Vec<u64> = batch.iter().chain(&other).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=350).collect::<Vec<_>>());
    // The subscriber sees the batch's data in the batch's order.
    let mut seen = Vec::new();
    while seen.len() < 350 {
        seen.push(sub.recv_publication().await.unwrap());
    }
    let order: Vec<i64> = seen
        .iter()
        .filter_map(|p| p.data.get("i").and_then(serde_json::Value::as_i64))
        .collect();
    assert_eq!(order, (0..300).collect::<Vec<_>>());
}

#[tokio::test]
async fn one_redis_a_batch_keeps_its_order_through_the_pipeline() {
    let redis = TestRedis::start().unwrap();
    a_batch_keeps_its_order_through_the_pipeline("--redis-url", &redis.url(), || {
        redis.cli(&["SCRIPT", "FLUSH"]).unwrap();
    })
    .await;
}

#[tokio::test]
async fn redis_cluster_a_batch_keeps_its_order_through_the_pipeline() {
    let cluster = TestRedisCluster::start().unwrap();
    a_batch_keeps_its_order_through_the_pipeline("--redis-cluster", &cluster.seeds(), || {
        for i in 0..cluster.ports().len() {
            cluster.cli(i, &["SCRIPT", "FLUSH"]).unwrap();
        }
    })
    .await;
}

/// Web Push in a cluster: a browser registered through one node gets, from
/// the shared queue, the push of a publication made on another — encrypted
/// for it and signed with the key every node shares.
#[tokio::test]
async fn a_web_push_registered_on_one_node_is_sent_for_a_publication_on_another() {
    use super::webpush::{VapidKey, register_webpush};
    let redis = TestRedis::start().unwrap();
    let vapid = VapidKey::fresh();
    let service = tether_tests::fakes::FakeWebPush::start(Some(vapid.public.clone()))
        .await
        .unwrap();
    let args = vapid.args();
    let extra: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = node("--redis-url", &redis.url(), "wp-a", &extra);
    let b = node("--redis-url", &redis.url(), "wp-b", &extra);
    let sub = service.subscribe().unwrap();
    register_webpush(&a, "web-1", "wanda", sub.json()).await;
    let (s, answer) = b
        .publish(json!({"channel": "user:wanda", "data": 1, "push": {"title": "from b"}}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{answer}");
    let got = service.wait_accepted(1, WAIT).await.unwrap();
    assert_eq!(got[0].payload["title"], "from b");
    assert_eq!(got[0].payload["offset"], answer["offset"]);
}

/// `--max-channels` in a cluster: the channels a node subscribes to in
/// Redis (and tracks) are bounded; a new one past it is refused
/// `unavailable`, and an unsubscribe makes room.
#[tokio::test]
async fn a_cluster_node_at_its_channel_limit_refuses_new_subscriptions_until_one_goes() {
    use tether_protocol::{ClientMessage, ErrorCode, ServerMessage, Unsubscribe};
    let redis = TestRedis::start().unwrap();
    let a = node(
        "--redis-url",
        &redis.url(),
        "cap-a",
        &["--max-channels", "2"],
    );
    let mut c = connected_client(&a).await.unwrap();
    c.subscribe("one").await.unwrap();
    c.subscribe("two").await.unwrap();
    let e = c.subscribe_refused("three").await.unwrap();
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    assert!(e.message.contains("--max-channels"), "{e:?}");
    // Publishing anywhere is not node state: it goes on.
    assert_eq!(publish(&a, "elsewhere", json!(1)).await, 1);
    let id = c.id();
    c.send(&ClientMessage::Unsubscribe(Unsubscribe {
        id,
        channel: ChannelName::new("two").unwrap(),
    }))
    .await
    .unwrap();
    assert!(matches!(
        c.recv_skip_pings().await.unwrap(),
        ServerMessage::Unsubscribed(_)
    ));
    c.subscribe("three").await.unwrap();
    assert_eq!(publish(&a, "three", json!("room")).await, 1);
    assert_eq!(c.recv_publication().await.unwrap().data, json!("room"));
    a.wait_for_metric("tether_channels_refused_total 1")
        .await
        .unwrap();
}

/// Over its Redis memory budget (`--redis-max-memory`, here 1 byte: always
/// over) a node keeps only the live stream: publications are delivered but
/// not kept in history (a recovery from before answers `recovered: false`),
/// idempotency keys are not stored, an ended session's record is not kept
/// (its resume starts afresh); each is counted. A node under its budget on
/// the same Redis keeps all three as before.
#[tokio::test]
async fn over_its_redis_memory_budget_a_node_keeps_only_the_live_stream() {
    let redis = TestRedis::start().unwrap();
    let full = node(
        "--redis-url",
        &redis.url(),
        "full",
        &["--redis-max-memory", "1"],
    );
    let ok = node("--redis-url", &redis.url(), "ok", &[]);
    full.wait_for_metric("tether_cluster_redis_over_budget 1")
        .await
        .unwrap();
    ok.wait_for_metric("tether_cluster_redis_over_budget 0")
        .await
        .unwrap();
    let used = counter(
        &full.metrics().await.unwrap(),
        "tether_cluster_redis_used_memory_bytes",
    );
    assert!(used > 100_000, "Redis's used_memory as read: {used}");

    let mut live = WsClient::connect(&full.ws_url()).await.unwrap();
    let connected = live.handshake(None).await.unwrap();
    live.subscribe("feed").await.unwrap();
    let (s, first) = full
        .publish(json!({"channel": "feed", "data": 1, "idempotency_key": "k-1"}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{first}");
    publish(&full, "feed", json!(2)).await;
    assert_eq!(
        offsets_until(&mut live, 2).await,
        vec![1, 2],
        "delivered live"
    );
    assert_eq!(
        redis.cli(&["EXISTS", "tether:{feed}:h"]).unwrap().trim(),
        "0",
        "no history kept"
    );
    // The same idempotency key publishes again: it was not stored.
    let (s, again) = full
        .publish(json!({"channel": "feed", "data": 1, "idempotency_key": "k-1"}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["offset"], 3, "{again}");
    let mut late = connected_client(&full).await.unwrap();
    let since = late
        .subscribe_since(
            "feed",
            StreamPosition {
                epoch: tether_protocol::Epoch::new(first["epoch"].as_str().unwrap()),
                offset: Offset(1),
            },
        )
        .await
        .unwrap();
    assert!(!since.recovered, "nothing to recover from");
    full.wait_for_metric("tether_history_not_retained_total 3")
        .await
        .unwrap();

    // The session ends: its record is not kept, so its resume is fresh.
    live.abort();
    full.wait_for_metric("tether_resume_records_evicted_total 1")
        .await
        .unwrap();
    let mut back = WsClient::connect(&full.ws_url()).await.unwrap();
    let resumed = back
        .resume(None, &connected.resume_token, named("feed", 3))
        .await
        .unwrap();
    assert!(!resumed.resumed, "no record to resume from");

    // Under its budget, the other node keeps history as ever.
    publish(&ok, "kept", json!(1)).await;
    assert_eq!(
        redis.cli(&["EXISTS", "tether:{kept}:h"]).unwrap().trim(),
        "1"
    );
    let m = ok.metrics().await.unwrap();
    assert_eq!(counter(&m, "tether_history_not_retained_total"), 0, "{m}");

    // Without the flag the budget is 90 % of Redis's own maxmemory, read
    // every second: over it and back under.
    let info = redis.cli(&["INFO", "memory"]).unwrap();
    let used: u64 = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("used_memory:")?.parse().ok())
        .unwrap();
    let max = (used * 105 / 100).to_string();
    redis.cli(&["CONFIG", "SET", "maxmemory", &max]).unwrap();
    ok.wait_for_metric("tether_cluster_redis_over_budget 1")
        .await
        .unwrap();
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]).unwrap();
    ok.wait_for_metric("tether_cluster_redis_over_budget 0")
        .await
        .unwrap();
    publish(&ok, "kept-again", json!(1)).await;
    assert_eq!(
        redis
            .cli(&["EXISTS", "tether:{kept-again}:h"])
            .unwrap()
            .trim(),
        "1",
        "kept again once under"
    );
}
