//! Sessions over WebSocket: connect, subscribe, publish, fan-out, acks.

use serde_json::json;
use tether_protocol::*;
use tether_tests::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_message_published_over_http_reaches_a_json_subscriber() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let connected = c.handshake(None).await.unwrap();
    assert_eq!(connected.node, "test-node");
    assert_eq!(connected.heartbeat, 25);
    assert!(!connected.resumed);
    assert!(!connected.resume_token.is_empty());
    let sub = c.subscribe("news").await.unwrap();
    assert_eq!(sub.offset, Offset(0));
    assert!(!sub.recovered);

    let (status, answer) = broker
        .publish(json!({"channel": "news", "data": {"headline": "hello"}}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["channel"], "news");
    assert_eq!(answer["offset"], 1);
    assert_eq!(answer["epoch"], json!(sub.epoch));

    let m = c.recv_publication().await.unwrap();
    assert_eq!(m.channel.as_str(), "news");
    assert_eq!(m.offset, Offset(1));
    assert_eq!(m.epoch, sub.epoch);
    assert_eq!(m.data, json!({"headline": "hello"}));
    let now_ms = unix_now() * 1000;
    assert!(
        m.ts <= now_ms + 1000 && m.ts + 60_000 >= now_ms,
        "ts {} vs now {now_ms}",
        m.ts
    );
}

#[tokio::test]
async fn msgpack_clients_get_the_same_messages_as_json_clients() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut j = WsClient::connect_with(&broker.ws_url(), Encoding::Json)
        .await
        .unwrap();
    let mut m = WsClient::connect_with(&broker.ws_url(), Encoding::MsgPack)
        .await
        .unwrap();
    j.handshake(None).await.unwrap();
    m.handshake(None).await.unwrap();
    j.subscribe("mixed").await.unwrap();
    m.subscribe("mixed").await.unwrap();
    let data = json!({"n": 1.5, "list": [1, -2, "three", null, true], "nested": {"a": {}}});
    broker
        .publish(json!({"channel": "mixed", "data": data}))
        .await
        .unwrap();
    let a = j.recv_publication().await.unwrap();
    let b = m.recv_publication().await.unwrap();
    assert_eq!(a, b);
    assert_eq!(a.data, data);
}

#[tokio::test]
async fn clients_publish_and_every_subscriber_sees_offsets_in_order() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut publisher = connected_client(&broker).await.unwrap();
    let mut subs = Vec::new();
    for _ in 0..3 {
        let mut c = connected_client(&broker).await.unwrap();
        c.subscribe("room").await.unwrap();
        subs.push(c);
    }
    let mut epoch = None;
    for i in 1..=20u64 {
        let id = publisher.id();
        publisher
            .send(&ClientMessage::Publish(Publish {
                id,
                channel: ChannelName::new("room").unwrap(),
                data: json!({"i": i}),
            }))
            .await
            .unwrap();
        match publisher.recv_skip_pings().await.unwrap() {
            ServerMessage::Published(p) => {
                assert_eq!(p.id, id);
                assert_eq!(p.offset, Offset(i));
                epoch.get_or_insert(p.epoch.clone());
                assert_eq!(Some(&p.epoch), epoch.as_ref());
            }
            other => panic!("expected published, got {other:?}"),
        }
    }
    for c in &mut subs {
        for i in 1..=20u64 {
            let m = c.recv_publication().await.unwrap();
            assert_eq!(m.offset, Offset(i));
            assert_eq!(m.data, json!({"i": i}));
        }
    }
}

#[tokio::test]
async fn subscribe_and_unsubscribe_rules() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    c.subscribe("a").await.unwrap();
    // A second subscribe to the same channel is a bad request.
    let id = c.id();
    c.send(&ClientMessage::Subscribe(Subscribe {
        id,
        channel: ChannelName::new("a").unwrap(),
        since: None,
    }))
    .await
    .unwrap();
    match c.recv_skip_pings().await.unwrap() {
        ServerMessage::Error(e) => {
            assert_eq!(e.id, Some(id));
            assert_eq!(e.code, ErrorCode::BadRequest);
        }
        other => panic!("expected error, got {other:?}"),
    }
    // Unsubscribing a channel never subscribed still answers unsubscribed.
    let id = c.id();
    c.send(&ClientMessage::Unsubscribe(Unsubscribe {
        id,
        channel: ChannelName::new("never").unwrap(),
    }))
    .await
    .unwrap();
    assert_eq!(
        c.recv_skip_pings().await.unwrap(),
        ServerMessage::Unsubscribed(Unsubscribed {
            id: Some(id),
            channel: ChannelName::new("never").unwrap(),
            reason: None,
        })
    );
    // After unsubscribing, publications no longer arrive.
    let id = c.id();
    c.send(&ClientMessage::Unsubscribe(Unsubscribe {
        id,
        channel: ChannelName::new("a").unwrap(),
    }))
    .await
    .unwrap();
    assert!(matches!(
        c.recv_skip_pings().await.unwrap(),
        ServerMessage::Unsubscribed(_)
    ));
    broker
        .publish(json!({"channel": "a", "data": 1}))
        .await
        .unwrap();
    c.send(&ClientMessage::Ping).await.unwrap();
    assert_eq!(c.recv_skip_pings().await.unwrap(), ServerMessage::Pong);
}

#[tokio::test]
async fn acks_and_pings_get_the_documented_answers() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    c.subscribe("acked").await.unwrap();
    broker
        .publish(json!({"channel": "acked", "data": 1}))
        .await
        .unwrap();
    let m = c.recv_publication().await.unwrap();
    // A well-formed ack has no reply; the next answer is the pong.
    c.send(&ClientMessage::Ack(Ack {
        channel: m.channel.clone(),
        offset: m.offset,
    }))
    .await
    .unwrap();
    c.send(&ClientMessage::Ping).await.unwrap();
    assert_eq!(c.recv().await.unwrap(), ServerMessage::Pong);
    // A malformed ack gets bad_request, and the session goes on.
    c.send_raw(br#"{"type":"ack","channel":"acked","offset":"x"}"#.to_vec())
        .await
        .unwrap();
    match c.recv().await.unwrap() {
        ServerMessage::Error(e) => assert_eq!(e.code, ErrorCode::BadRequest),
        other => panic!("expected error, got {other:?}"),
    }
    c.send(&ClientMessage::Ping).await.unwrap();
    assert_eq!(c.recv().await.unwrap(), ServerMessage::Pong);
}

#[tokio::test]
async fn websocket_control_pings_are_answered() {
    use tokio_tungstenite::tungstenite::Message;
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    c.send_message(Message::Ping(b"hi".to_vec().into()))
        .await
        .unwrap();
    match c.recv_frame().await.unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"hi"),
        other => panic!("expected a pong frame, got {other:?}"),
    }
}

#[tokio::test]
async fn subscriptions_per_session_are_bounded() {
    let broker = TestBroker::start(&["--max-subscriptions", "2"]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    c.subscribe("one").await.unwrap();
    c.subscribe("two").await.unwrap();
    let id = c.id();
    c.send(&ClientMessage::Subscribe(Subscribe {
        id,
        channel: ChannelName::new("three").unwrap(),
        since: None,
    }))
    .await
    .unwrap();
    match c.recv_skip_pings().await.unwrap() {
        ServerMessage::Error(e) => {
            assert_eq!(e.id, Some(id));
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains("at most 2"), "{}", e.message);
        }
        other => panic!("expected error, got {other:?}"),
    }
    let id = c.id();
    c.send(&ClientMessage::Unsubscribe(Unsubscribe {
        id,
        channel: ChannelName::new("one").unwrap(),
    }))
    .await
    .unwrap();
    assert!(matches!(
        c.recv_skip_pings().await.unwrap(),
        ServerMessage::Unsubscribed(_)
    ));
    c.subscribe("three").await.unwrap();
}

/// A subscriber that does not read for a while makes the socket take frames
/// in part: what it then reads must still be every message, whole, in order
/// (the broker writes frames straight to idle connections and queues the
/// rest of a frame the socket took in part).
#[tokio::test]
async fn large_messages_to_a_reader_that_pauses_arrive_whole_and_in_order() {
    // Room for all of it in the outbox: this is not about slow consumers.
    let broker = TestBroker::start(&["--max-outbox-bytes", "67108864"]).unwrap();
    let mut j = WsClient::connect_with(&broker.ws_url(), Encoding::Json)
        .await
        .unwrap();
    j.handshake(None).await.unwrap();
    j.subscribe("big").await.unwrap();
    let mut m = WsClient::connect_with(&broker.ws_url(), Encoding::MsgPack)
        .await
        .unwrap();
    m.handshake(None).await.unwrap();
    m.subscribe("big").await.unwrap();

    // 200 × ~40 KB: more than the kernel buffers for a socket.
    let count = 200u64;
    let text = |i: u64| -> String {
        let c = char::from(b'a' + (i % 26) as u8);
        std::iter::repeat_n(c, 40_000 + i as usize).collect()
    };
    for i in 1..=count {
        let (status, answer) = broker
            .publish(json!({"channel": "big", "data": {"i": i, "text": text(i)}}))
            .await
            .unwrap();
        assert_eq!(status, 200, "{answer}");
    }
    for c in [&mut j, &mut m] {
        for i in 1..=count {
            let p = c.recv_publication().await.unwrap();
            assert_eq!(p.offset, Offset(i));
            assert_eq!(p.data, json!({"i": i, "text": text(i)}));
        }
    }
    // Still a working session afterwards.
    j.send(&ClientMessage::Ping).await.unwrap();
    assert_eq!(j.recv_skip_pings().await.unwrap(), ServerMessage::Pong);
}

#[tokio::test]
async fn a_client_close_frame_is_answered_with_a_close_frame() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCode;
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    c.send_message(Message::Close(Some(CloseFrame {
        code: WsCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    // RFC 6455 §5.5.1: the server sends a Close frame back, echoing the code
    // (before, the connection was dropped without one).
    match c.recv_frame().await.unwrap() {
        Message::Close(Some(f)) => assert_eq!(f.code, WsCode::Normal),
        other => panic!("expected a Close frame back, got {other:?}"),
    }
    broker.wait_for_no_connections().await.unwrap();
}

#[tokio::test]
async fn a_node_at_its_channel_limit_refuses_new_channels_and_keeps_serving() {
    let broker = TestBroker::start(&["--max-channels", "2"]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    c.subscribe("one").await.unwrap();
    c.subscribe("two").await.unwrap();
    let e = c.subscribe_refused("three").await.unwrap();
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    assert!(e.message.contains("--max-channels"), "{e:?}");
    let (s, v) = broker
        .publish(json!({"channel": "four", "data": 1}))
        .await
        .unwrap();
    assert_eq!(s, 503, "{v}");
    // The channels it has go on.
    broker
        .publish(json!({"channel": "two", "data": "still"}))
        .await
        .unwrap();
    assert_eq!(c.recv_publication().await.unwrap().data, json!("still"));
    broker
        .wait_for_metric("tether_channels_refused_total 2")
        .await
        .unwrap();
}

#[tokio::test]
async fn subscribes_past_the_subscribe_rate_are_refused_and_the_session_goes_on() {
    let broker = TestBroker::start(&["--subscribe-rate", "5"]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    // A burst of twice the rate passes; the next ones are refused.
    for i in 0..12u64 {
        c.send(&ClientMessage::Subscribe(Subscribe {
            id: 100 + i,
            channel: ChannelName::new(format!("room:{i}")).unwrap(),
            since: None,
        }))
        .await
        .unwrap();
    }
    let mut subscribed = Vec::new();
    let mut limited = Vec::new();
    while subscribed.len() + limited.len() < 12 {
        match c.recv_skip_pings().await.unwrap() {
            ServerMessage::Subscribed(s) => subscribed.push(s.id),
            ServerMessage::Error(e) => {
                assert_eq!(e.code, ErrorCode::RateLimited, "{e:?}");
                assert!(e.message.contains("subscribes/s"), "{}", e.message);
                limited.push(e.id.unwrap());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(subscribed, (100..110).collect::<Vec<_>>());
    assert_eq!(limited, [110, 111]);
    // The session goes on: a publication on a channel it got still arrives.
    let (s, _) = broker
        .publish(json!({"channel": "room:3", "data": "still here"}))
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(
        c.recv_publication().await.unwrap().channel.as_str(),
        "room:3"
    );
}

/// The status and `Retry-After` of a WebSocket upgrade that was refused.
async fn refused_upgrade(broker: &TestBroker) -> Option<(u16, u64)> {
    match tokio_tungstenite::connect_async(broker.ws_url()).await {
        Ok(_) => None,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let secs = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            Some((r.status().as_u16(), secs))
        }
        Err(e) => panic!("neither upgraded nor answered: {e}"),
    }
}

#[tokio::test]
async fn past_the_accept_rate_new_connections_are_told_when_to_retry() {
    let broker = TestBroker::start(&["--accept-rate", "1"]).unwrap();
    let start = std::time::Instant::now();
    // A burst of twice the rate passes…
    let mut kept = Vec::new();
    for _ in 0..2 {
        kept.push(connected_client(&broker).await.unwrap());
    }
    // …then at most one more per second elapsed.
    let mut more = 0;
    let (status, retry) = loop {
        if let Some(refusal) = refused_upgrade(&broker).await {
            break refusal;
        }
        more += 1;
        assert!(more < 20, "never refused");
    };
    let allowed = start.elapsed().as_secs_f64().ceil() as usize;
    assert!(
        more <= allowed,
        "{more} more admitted in {allowed} s at 1/s"
    );
    assert_eq!(status, 503);
    assert!((1..=5).contains(&retry), "Retry-After {retry}");
    broker
        .wait_for_metric("tether_connections_refused_total{reason=\"rate\"} 1")
        .await
        .unwrap();
    // Those let in are served as usual.
    for c in &mut kept {
        c.send(&ClientMessage::Ping).await.unwrap();
        assert_eq!(c.recv().await.unwrap(), ServerMessage::Pong);
    }
}

#[tokio::test]
async fn an_address_past_its_connection_cap_is_refused_until_one_leaves() {
    let broker = TestBroker::start(&["--max-connections-per-ip", "2"]).unwrap();
    let a = connected_client(&broker).await.unwrap();
    let _b = connected_client(&broker).await.unwrap();
    let (status, _) = refused_upgrade(&broker).await.expect("refused");
    assert_eq!(status, 503);
    broker
        .wait_for_metric("tether_connections_refused_total{reason=\"per_ip\"} 1")
        .await
        .unwrap();
    drop(a);
    broker
        .wait_for_metric("tether_connections{transport=\"ws\"} 1")
        .await
        .unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    c.expect_nothing_pending().await.unwrap();
}
