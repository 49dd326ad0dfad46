//! History, recovery and resume (§5–6): a phone that drops off loses nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use tether_protocol::*;
use tether_tests::*;

fn chan(s: &str) -> ChannelName {
    ChannelName::new(s).unwrap()
}

async fn publish_n(broker: &TestBroker, channel: &str, range: std::ops::RangeInclusive<u64>) {
    for i in range {
        let (s, _) = broker
            .publish(json!({"channel": channel, "data": {"i": i}}))
            .await
            .unwrap();
        assert_eq!(s, 200);
    }
}

/// A client on `channel` that has received offsets 1..=k.
async fn subscribed_client(
    broker: &TestBroker,
    channel: &str,
    k: u64,
) -> (WsClient, Connected, Subscribed) {
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let connected = c.handshake(None).await.unwrap();
    let sub = c.subscribe(channel).await.unwrap();
    publish_n(broker, channel, 1..=k).await;
    for i in 1..=k {
        assert_eq!(c.recv_publication().await.unwrap().offset, Offset(i));
    }
    (c, connected, sub)
}

#[tokio::test]
async fn a_dropped_client_resumes_with_exactly_the_missed_messages_then_live_ones() {
    let broker = TestBroker::start(&[]).unwrap();
    let (c, connected, sub) = subscribed_client(&broker, "feed", 3).await;
    c.abort();
    broker.wait_for_no_connections().await.unwrap();
    publish_n(&broker, "feed", 4..=8).await;

    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let resumed = c.resume(None, &connected.resume_token, None).await.unwrap();
    assert!(resumed.resumed);
    assert_eq!(resumed.session, connected.session);
    assert_ne!(resumed.resume_token, connected.resume_token);
    let channels = resumed.channels.expect("channels");
    assert_eq!(
        channels.get(&chan("feed")),
        Some(&ChannelRecovery {
            epoch: sub.epoch.clone(),
            offset: Offset(8),
            recovered: true
        })
    );
    for i in 4..=8 {
        let m = c.recv_publication().await.unwrap();
        assert_eq!(m.offset, Offset(i));
        assert_eq!(m.data, json!({"i": i}));
    }
    c.expect_nothing_pending().await.unwrap();
    publish_n(&broker, "feed", 9..=9).await;
    assert_eq!(c.recv_publication().await.unwrap().offset, Offset(9));
    broker
        .wait_for_metric("tether_resumes_total{outcome=\"resumed\"} 1")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_client_that_names_its_offsets_gets_everything_after_them() {
    let broker = TestBroker::start(&[]).unwrap();
    let (c, connected, _) = subscribed_client(&broker, "named", 6).await;
    c.abort();
    // No waiting for the server to notice: what it wrote to the dead
    // connection is replayed because the client names what it has.
    publish_n(&broker, "named", 7..=10).await;
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let mut have = BTreeMap::new();
    have.insert(chan("named"), Offset(4)); // the client only processed up to 4
    have.insert(chan("never-subscribed"), Offset(1));
    let resumed = c
        .resume(None, &connected.resume_token, Some(have))
        .await
        .unwrap();
    assert!(resumed.resumed);
    let channels = resumed.channels.expect("channels");
    assert_eq!(
        channels.len(),
        1,
        "channels of the old session only: {channels:?}"
    );
    assert!(channels[&chan("named")].recovered);
    for i in 5..=10 {
        assert_eq!(c.recv_publication().await.unwrap().offset, Offset(i));
    }
    c.expect_nothing_pending().await.unwrap();
}

#[tokio::test]
async fn acked_offsets_are_where_an_unnamed_replay_starts() {
    let broker = TestBroker::start(&[]).unwrap();
    let (mut c, connected, _) = subscribed_client(&broker, "acks", 5).await;
    c.send(&ClientMessage::Ack(Ack {
        channel: chan("acks"),
        offset: Offset(2),
    }))
    .await
    .unwrap();
    c.expect_nothing_pending().await.unwrap();
    c.abort();
    broker.wait_for_no_connections().await.unwrap();
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    assert!(
        c.resume(None, &connected.resume_token, None)
            .await
            .unwrap()
            .resumed
    );
    for i in 3..=5 {
        assert_eq!(c.recv_publication().await.unwrap().offset, Offset(i));
    }
    c.expect_nothing_pending().await.unwrap();
}

#[tokio::test]
async fn after_the_resume_window_the_client_gets_a_fresh_session() {
    let broker = TestBroker::start(&["--resume-window", "1"]).unwrap();
    let (c, connected, _) = subscribed_client(&broker, "late", 1).await;
    c.abort();
    broker.wait_for_no_connections().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let r = c.resume(None, &connected.resume_token, None).await.unwrap();
    assert!(!r.resumed);
    assert!(r.channels.is_none());
    assert_ne!(r.session, connected.session);
    // Fresh means fresh: no subscription was restored.
    publish_n(&broker, "late", 2..=2).await;
    c.expect_nothing_pending().await.unwrap();
    broker
        .wait_for_metric("tether_resumes_total{outcome=\"expired\"} 1")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_forged_token_gives_a_fresh_session_and_does_not_use_up_the_real_one() {
    let broker = TestBroker::start(&[]).unwrap();
    let (c, connected, _) = subscribed_client(&broker, "forge", 1).await;
    c.abort();
    broker.wait_for_no_connections().await.unwrap();
    let (payload, sig) = connected.resume_token.split_once('.').unwrap();
    let mut bad_sig = sig.to_owned();
    let flipped = if bad_sig.ends_with('A') { "B" } else { "A" };
    bad_sig.replace_range(bad_sig.len() - 1.., flipped);
    let token = &connected.resume_token;
    for forged in [
        format!("{payload}.{bad_sig}"),
        // Truncated: the signature cut short, or gone.
        token[..token.len() - 3].to_owned(),
        payload.to_owned(),
        format!("{payload}."),
        "garbage".to_owned(),
        String::new(),
        "x".repeat(10_000),
    ] {
        let mut f = WsClient::connect(&broker.ws_url()).await.unwrap();
        let r = f.resume(None, &forged, None).await.unwrap();
        assert!(!r.resumed, "{forged}");
        assert_ne!(r.session, connected.session);
        f.expect_nothing_pending().await.unwrap();
    }
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    assert!(
        c.resume(None, &connected.resume_token, None)
            .await
            .unwrap()
            .resumed
    );
}

#[tokio::test]
async fn a_used_token_gives_a_fresh_session_and_the_newest_token_still_works() {
    let broker = TestBroker::start(&[]).unwrap();
    let (c, first, _) = subscribed_client(&broker, "used", 1).await;
    c.abort();
    broker.wait_for_no_connections().await.unwrap();
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let second = c.resume(None, &first.resume_token, None).await.unwrap();
    assert!(second.resumed);
    c.abort();
    broker.wait_for_no_connections().await.unwrap();

    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let r = c.resume(None, &first.resume_token, None).await.unwrap();
    assert!(!r.resumed, "the first token was used");
    c.abort();
    broker.wait_for_no_connections().await.unwrap();

    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let r = c.resume(None, &second.resume_token, None).await.unwrap();
    assert!(
        r.resumed,
        "a refused attempt does not use up the newest token"
    );
    assert_eq!(r.session, first.session);
}

#[tokio::test]
async fn another_users_token_never_gives_their_session() {
    const SECRET: &str = "resume-secret-for-tests-0123456789";
    let broker = TestBroker::start(&["--jwt-secret", SECRET]).unwrap();
    let alice = hs256_token(SECRET, json!({"sub": "alice", "exp": unix_now() + 600}));
    let bob = hs256_token(SECRET, json!({"sub": "bob", "exp": unix_now() + 600}));
    let mut a = WsClient::connect(&broker.ws_url()).await.unwrap();
    let connected = a.handshake(Some(&alice)).await.unwrap();
    a.subscribe("user:alice").await.unwrap();
    a.abort();
    broker.wait_for_no_connections().await.unwrap();
    broker
        .publish(json!({"channel": "user:alice", "data": "secret"}))
        .await
        .unwrap();

    let mut b = WsClient::connect(&broker.ws_url()).await.unwrap();
    let r = b
        .resume(Some(&bob), &connected.resume_token, None)
        .await
        .unwrap();
    assert!(!r.resumed);
    assert_ne!(r.session, connected.session);
    b.expect_nothing_pending().await.unwrap();

    let mut a = WsClient::connect(&broker.ws_url()).await.unwrap();
    let r = a
        .resume(Some(&alice), &connected.resume_token, None)
        .await
        .unwrap();
    assert!(r.resumed);
    assert_eq!(a.recv_publication().await.unwrap().data, json!("secret"));
}

#[tokio::test]
async fn resuming_a_connected_session_takes_it_over() {
    let broker = TestBroker::start(&[]).unwrap();
    let (mut old, connected, _) = subscribed_client(&broker, "take", 2).await;
    let mut new = WsClient::connect(&broker.ws_url()).await.unwrap();
    let r = new
        .resume(None, &connected.resume_token, None)
        .await
        .unwrap();
    assert!(r.resumed);
    assert!(r.channels.unwrap()[&chan("take")].recovered);
    let closed = old.expect_close().await.unwrap();
    assert_eq!(closed.code, Some(4000));
    new.expect_nothing_pending().await.unwrap();
    publish_n(&broker, "take", 3..=3).await;
    assert_eq!(new.recv_publication().await.unwrap().offset, Offset(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_since_an_offset_while_a_publisher_runs_flat_out_has_no_gap_and_no_duplicate() {
    let broker =
        TestBroker::start(&["--history-size", "1000", "--client-rate", "1000000"]).unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let (pos_tx, pos_rx) = tokio::sync::watch::channel::<Option<(Epoch, u64)>>(None);
    // A client publisher as fast as the broker answers.
    let mut publisher = connected_client(&broker).await.unwrap();
    let publishing = tokio::spawn(async move {
        let mut n = 0u64;
        while !*stop_rx.borrow_and_update() {
            let id = publisher.id();
            publisher
                .send(&ClientMessage::Publish(Publish {
                    id,
                    channel: ChannelName::new("flat-out").unwrap(),
                    data: json!(n),
                }))
                .await
                .unwrap();
            if let ServerMessage::Published(p) = publisher.recv_skip_pings().await.unwrap() {
                let _ = pos_tx.send(Some((p.epoch, p.offset.get())));
            }
            n += 1;
        }
        n
    });
    let mut rounds = 0;
    while rounds < 8 {
        let Some((epoch, latest)) = pos_rx.borrow().clone() else {
            tokio::task::yield_now().await;
            continue;
        };
        if latest < 20 {
            tokio::task::yield_now().await;
            continue;
        }
        rounds += 1;
        let since = latest - 10 - (rounds as u64 % 7);
        let mut c = connected_client(&broker).await.unwrap();
        let s = c
            .subscribe_since(
                "flat-out",
                StreamPosition {
                    epoch: epoch.clone(),
                    offset: Offset(since),
                },
            )
            .await
            .unwrap();
        assert!(s.recovered, "since {since} within history");
        // Replay and live traffic, seamless: 200 consecutive offsets.
        for expected in since + 1..=since + 200 {
            let m = c.recv_publication().await.unwrap();
            assert_eq!(m.offset, Offset(expected), "round {rounds}");
        }
    }
    stop_tx.send(true).unwrap();
    assert!(publishing.await.unwrap() > 200);
}

#[tokio::test]
async fn history_is_bounded_by_size_and_by_age() {
    let broker = TestBroker::start(&["--history-size", "5", "--history-ttl", "1"]).unwrap();
    publish_n(&broker, "bounded", 1..=8).await;
    let mut c = connected_client(&broker).await.unwrap();
    let epoch = c.subscribe("probe").await.unwrap().epoch;
    let _ = epoch;
    let latest = broker
        .publish(json!({"channel": "bounded", "data": 9}))
        .await
        .unwrap()
        .1;
    let epoch = Epoch::new(latest["epoch"].as_str().unwrap());
    // Size: only the last 5 (5..=9) are kept; since 3 would need 4.
    let s = c
        .subscribe_since(
            "bounded",
            StreamPosition {
                epoch: epoch.clone(),
                offset: Offset(3),
            },
        )
        .await
        .unwrap();
    assert!(!s.recovered);
    assert_eq!(s.offset, Offset(9));
    c.expect_nothing_pending().await.unwrap();
    let mut d = connected_client(&broker).await.unwrap();
    let s = d
        .subscribe_since(
            "bounded",
            StreamPosition {
                epoch: epoch.clone(),
                offset: Offset(4),
            },
        )
        .await
        .unwrap();
    assert!(s.recovered);
    for i in 5..=9 {
        assert_eq!(d.recv_publication().await.unwrap().offset, Offset(i));
    }
    // Age: after the TTL nothing is retained, and a position before the end
    // can no longer be recovered.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut e = connected_client(&broker).await.unwrap();
    let s = e
        .subscribe_since(
            "bounded",
            StreamPosition {
                epoch: epoch.clone(),
                offset: Offset(8),
            },
        )
        .await
        .unwrap();
    assert!(!s.recovered);
    e.expect_nothing_pending().await.unwrap();
    let mut f = connected_client(&broker).await.unwrap();
    let s = f
        .subscribe_since(
            "bounded",
            StreamPosition {
                epoch,
                offset: Offset(9),
            },
        )
        .await
        .unwrap();
    assert!(s.recovered, "nothing was missed after 9");
}

#[tokio::test]
async fn a_restart_changes_the_epoch() {
    let broker = TestBroker::start(&[]).unwrap();
    let (_, before) = broker
        .publish(json!({"channel": "epoch", "data": 1}))
        .await
        .unwrap();
    drop(broker);
    let broker = TestBroker::start(&[]).unwrap();
    let (_, after) = broker
        .publish(json!({"channel": "epoch", "data": 1}))
        .await
        .unwrap();
    assert_eq!(after["offset"], 1);
    assert_ne!(after["epoch"], before["epoch"]);
    let mut c = connected_client(&broker).await.unwrap();
    let s = c
        .subscribe_since(
            "epoch",
            StreamPosition {
                epoch: Epoch::new(before["epoch"].as_str().unwrap()),
                offset: Offset(0),
            },
        )
        .await
        .unwrap();
    assert!(!s.recovered, "offsets of another epoch are not comparable");
    c.expect_nothing_pending().await.unwrap();
}

#[tokio::test]
async fn a_replay_larger_than_the_outbox_is_declared_not_recovered_instead_of_closing() {
    // Defaults: 100 messages of history, a 1 MiB outbox per client. 100 ×
    // 16 KiB missed do not fit: before, the resume was closed with 4008
    // (slow consumer) before `connected`, again at every attempt.
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let connected = c.handshake(None).await.unwrap();
    let big = c.subscribe("big").await.unwrap();
    c.subscribe("small").await.unwrap();
    c.abort();
    let pad = "x".repeat(16 * 1024);
    for i in 1..=100u64 {
        let (s, _) = broker
            .publish(json!({"channel": "big", "data": {"i": i, "pad": pad}}))
            .await
            .unwrap();
        assert_eq!(s, 200);
    }
    publish_n(&broker, "small", 1..=3).await;

    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let mut have = BTreeMap::new();
    have.insert(chan("big"), Offset(0));
    have.insert(chan("small"), Offset(0));
    let resumed = c
        .resume(None, &connected.resume_token, Some(have))
        .await
        .unwrap();
    assert!(resumed.resumed);
    let channels = resumed.channels.expect("channels");
    assert!(!channels[&chan("big")].recovered, "{channels:?}");
    assert_eq!(channels[&chan("big")].offset, Offset(100));
    // The small replay still fits, and comes.
    assert!(channels[&chan("small")].recovered, "{channels:?}");
    for i in 1..=3 {
        assert_eq!(c.recv_publication().await.unwrap().offset, Offset(i));
    }
    // The session lives on: the next publication arrives live.
    publish_n(&broker, "big", 101..=101).await;
    let m = c.recv_publication().await.unwrap();
    assert_eq!((m.channel.as_str(), m.offset), ("big", Offset(101)));

    // The same for a subscribe with `since` on a fresh session.
    let mut d = WsClient::connect(&broker.ws_url()).await.unwrap();
    d.handshake(None).await.unwrap();
    let s = d
        .subscribe_since(
            "big",
            StreamPosition {
                epoch: big.epoch.clone(),
                offset: Offset(1),
            },
        )
        .await
        .unwrap();
    assert!(!s.recovered);
    assert_eq!(s.offset, Offset(101));
    publish_n(&broker, "big", 102..=102).await;
    assert_eq!(d.recv_publication().await.unwrap().offset, Offset(102));
    broker
        .wait_for_metric("tether_replays_too_large_total 2")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_takeover_does_not_wait_for_the_old_connections_full_socket() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    // A big outbox, so that the stalled client is not closed as a slow
    // consumer: its socket is full and frames wait behind it.
    let broker =
        TestBroker::start(&["--max-outbox-bytes", "67108864", "--history-size", "200"]).unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(broker.client_addr).await.unwrap();
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        broker.ws_url(),
    )
    .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "tether.v1.json".parse().unwrap());
    let (mut old, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    let next_json = async |ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>| loop {
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["type"] != "ping" {
                return v;
            }
        }
    };
    old.send(Message::Text(r#"{"type":"connect","id":1}"#.into()))
        .await
        .unwrap();
    let connected = next_json(&mut old).await;
    assert_eq!(connected["type"], "connected", "{connected}");
    let token = connected["resume_token"].as_str().unwrap().to_owned();
    old.send(Message::Text(
        r#"{"type":"subscribe","id":2,"channel":"stall"}"#.into(),
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut old).await["type"], "subscribed");

    // ~10 MB the client never reads: more than the sockets hold.
    let pad = "x".repeat(60_000);
    for i in 1..=160u64 {
        let (s, _) = broker
            .publish(json!({"channel": "stall", "data": {"i": i, "pad": pad}}))
            .await
            .unwrap();
        assert_eq!(s, 200);
    }

    // The phone comes back on a new connection: the old one is closed at
    // once (before, its close waited behind the full socket, the takeover
    // gave up after 3 s and the client got a fresh session).
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let resumed = c.resume(None, &token, None).await.unwrap();
    assert!(resumed.resumed, "{resumed:?}");
    // And what the old connection's socket never took is replayed, through
    // to the last one, without a gap.
    let channels = resumed.channels.expect("channels");
    assert!(channels[&chan("stall")].recovered, "{channels:?}");
    let mut next = c.recv_publication().await.unwrap().offset.get();
    while next < 160 {
        let m = c.recv_publication().await.unwrap();
        assert_eq!(m.offset.get(), next + 1);
        next += 1;
    }
    drop(old);
}
