//! Bad input — the hostile-input suite: each gets a clear answer or close
//! code, and the broker keeps serving everyone else. Random bytes,
//! truncated frames, deep nesting, numbers JSON cannot hold, wrong types in
//! every field, channel names at 255 and 256 bytes, 10,000 subscribes from
//! one client, floods, slow readers. Tokens are in `auth.rs` (`alg: none`,
//! HS256 keyed with the RSA public key, expired, not yet valid, wrong
//! audience and issuer, truncated) and `resume.rs` (resume tokens forged,
//! truncated, replayed, another user's).

use serde_json::json;
use tether_protocol::*;
use tether_tests::raw;
use tether_tests::*;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

/// The broker still serves a fresh client end to end.
async fn still_serves(broker: &TestBroker) {
    let mut c = connected_client(broker).await.unwrap();
    c.subscribe("alive").await.unwrap();
    broker
        .publish(json!({"channel": "alive", "data": "ok"}))
        .await
        .unwrap();
    assert_eq!(c.recv_publication().await.unwrap().data, json!("ok"));
}

async fn closed_with(c: &mut WsClient) -> u16 {
    let closed = c.expect_close().await.unwrap();
    let code = closed.code.expect("a close code");
    if let Some(d) = &closed.disconnect {
        assert_eq!(d.code, code, "disconnect names the close code that follows");
    }
    code
}

#[tokio::test]
async fn malformed_json_closes_with_4001() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    c.send_raw(b"{\"type\": \"subscribe\", ".to_vec())
        .await
        .unwrap();
    assert_eq!(closed_with(&mut c).await, 4001);
    still_serves(&broker).await;
}

#[tokio::test]
async fn malformed_msgpack_closes_with_4001() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = WsClient::connect_with(&broker.ws_url(), Encoding::MsgPack)
        .await
        .unwrap();
    c.handshake(None).await.unwrap();
    // A map announcing 3 entries with only a truncated key.
    c.send_raw(vec![0x83, 0xa4, b't', b'y']).await.unwrap();
    assert_eq!(closed_with(&mut c).await, 4001);
    still_serves(&broker).await;
}

#[tokio::test]
async fn a_message_before_connect_closes_with_4001() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    c.send(&ClientMessage::Ping).await.unwrap();
    let closed = c.expect_close().await.unwrap();
    assert_eq!(closed.code, Some(4001));
    let d = closed.disconnect.expect("disconnect before close");
    assert_eq!(d.code, 4001);
    assert!(!d.reconnect);
}

#[tokio::test]
async fn unknown_types_and_a_second_connect_are_bad_requests_and_the_session_goes_on() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    c.send_raw(br#"{"type":"teleport","id":77,"where":"mars"}"#.to_vec())
        .await
        .unwrap();
    match c.recv().await.unwrap() {
        ServerMessage::Error(e) => {
            assert_eq!(e.id, Some(77));
            assert_eq!(e.code, ErrorCode::BadRequest);
        }
        other => panic!("expected error, got {other:?}"),
    }
    let id = c.id();
    c.send(&ClientMessage::Connect(Connect {
        id,
        ..Connect::default()
    }))
    .await
    .unwrap();
    match c.recv().await.unwrap() {
        ServerMessage::Error(e) => {
            assert_eq!(e.id, Some(id));
            assert_eq!(e.code, ErrorCode::BadRequest);
        }
        other => panic!("expected error, got {other:?}"),
    }
    c.send(&ClientMessage::Ping).await.unwrap();
    assert_eq!(c.recv().await.unwrap(), ServerMessage::Pong);
}

#[tokio::test]
async fn a_bad_channel_name_is_an_error_reply_and_the_session_goes_on() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    for bad in ["has space", "", &"x".repeat(256), "ünï"] {
        let msg = json!({"type": "subscribe", "id": 9, "channel": bad});
        c.send_raw(serde_json::to_vec(&msg).unwrap()).await.unwrap();
        match c.recv().await.unwrap() {
            ServerMessage::Error(e) => {
                assert_eq!(e.id, Some(9));
                assert_eq!(e.code, ErrorCode::BadRequest);
            }
            other => panic!("expected error for {bad:?}, got {other:?}"),
        }
    }
    c.subscribe("fine").await.unwrap();
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_4001() {
    let broker = TestBroker::start(&[]).unwrap();
    let (mut s, status) = raw::upgrade(broker.client_addr, "/v1/ws", None)
        .await
        .unwrap();
    assert!(status.contains("101"), "{status}");
    s.write_all(&raw::frame(0x1, b"{\"type\":\"connect\",\"id\":1}"))
        .await
        .unwrap();
    s.write_all(&raw::frame(0x1, &[b'"', 0xff, 0xfe, b'"']))
        .await
        .unwrap();
    assert_eq!(raw::read_close_code(&mut s).await.unwrap(), Some(4001));
    still_serves(&broker).await;
}

#[tokio::test]
async fn a_binary_frame_on_the_json_subprotocol_closes_with_4001() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    c.send_message(Message::Binary(br#"{"type":"ping"}"#.to_vec().into()))
        .await
        .unwrap();
    assert_eq!(closed_with(&mut c).await, 4001);
}

#[tokio::test]
async fn subprotocol_negotiation_follows_the_contract() {
    let broker = TestBroker::start(&[]).unwrap();
    // Only unknown subprotocols: refused with 400.
    let (_s, status) = raw::upgrade(broker.client_addr, "/v1/ws", Some("mqtt, stomp"))
        .await
        .unwrap();
    assert!(status.contains("400"), "{status}");
    // Several offered: the first known wins.
    let (_s, status) = raw::upgrade(
        broker.client_addr,
        "/v1/ws",
        Some("mqtt, tether.v1.msgpack, tether.v1.json"),
    )
    .await
    .unwrap();
    assert!(status.contains("101"), "{status}");
    let mut c = WsClient::connect_with(&broker.ws_url(), Encoding::MsgPack)
        .await
        .unwrap();
    c.handshake(None).await.unwrap();
    // None offered: JSON.
    let (s, status) = raw::upgrade(broker.client_addr, "/v1/ws", None)
        .await
        .unwrap();
    assert!(status.contains("101"), "{status}");
    drop(s);
    // Another path: not found.
    let (_s, status) = raw::upgrade(broker.client_addr, "/elsewhere", None)
        .await
        .unwrap();
    assert!(status.contains("404"), "{status}");
    still_serves(&broker).await;
}

#[tokio::test]
async fn a_200_kb_message_closes_with_4009() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    let big = json!({"type": "publish", "id": 1, "channel": "c", "data": "x".repeat(200_000)});
    c.send_raw(serde_json::to_vec(&big).unwrap()).await.unwrap();
    let closed = c.expect_close().await.unwrap();
    assert_eq!(closed.code, Some(4009));
    still_serves(&broker).await;
}

#[tokio::test]
async fn nesting_deeper_than_64_closes_with_4001() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    let deep = format!(
        r#"{{"type":"publish","id":1,"channel":"c","data":{}0{}}}"#,
        "[".repeat(70),
        "]".repeat(70)
    );
    c.send_raw(deep.into_bytes()).await.unwrap();
    assert_eq!(closed_with(&mut c).await, 4001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_as_slow_and_others_get_everything() {
    // Default outbox: 1 MiB per client.
    let broker = TestBroker::start(&[]).unwrap();
    let mut stalled = connected_client(&broker).await.unwrap();
    stalled.subscribe("firehose").await.unwrap();
    let mut reader = connected_client(&broker).await.unwrap();
    reader.subscribe("firehose").await.unwrap();

    // 32 MB in 16 KB messages, 320 KB at a time: more than the kernel's
    // socket buffers and the 1 MiB outbox hold for a client that reads
    // nothing, never more than the outbox of a client that reads.
    let total = 2000u64;
    // The reader reads while the publisher publishes, and the publisher
    // waits for the reader to catch up after each batch: the reader is never
    // slow, however loaded the machine.
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0u64);
    let reader = tokio::spawn(async move {
        for i in 0..total {
            let m = reader.recv_publication().await.unwrap();
            assert_eq!(m.offset, Offset(i + 1));
            let _ = progress_tx.send(i + 1);
        }
    });
    let payload = "y".repeat(16 * 1024);
    let http = broker.http();
    let mut batch = Vec::new();
    for i in 0..total {
        batch.push(json!({"channel": "firehose", "data": {"i": i, "p": payload}}));
        if batch.len() == 20 {
            let r = http
                .post(broker.api_url("/v1/publish/batch"))
                .json(&json!({"messages": batch}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            batch.clear();
            let published = i + 1;
            progress.wait_for(|n| *n >= published).await.unwrap();
        }
    }
    reader.await.unwrap();
    let metrics = http
        .get(broker.api_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tether_disconnects_total{code=\"4008\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tether_outbox_drops_total 1"), "{metrics}");
    // When the stalled client finally reads, its connection is over.
    let closed = stalled.expect_close().await.unwrap();
    assert!(
        closed.code.is_none() || closed.code == Some(4008),
        "{closed:?}"
    );
}

#[tokio::test]
async fn a_flood_of_messages_closes_with_4029() {
    let broker = TestBroker::start(&["--client-rate", "5"]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    for _ in 0..30 {
        if c.send(&ClientMessage::Ping).await.is_err() {
            break;
        }
    }
    let closed = c.expect_close().await.unwrap();
    assert_eq!(closed.code, Some(4029));
    let d = closed.disconnect.expect("disconnect");
    assert!(d.reconnect);
    assert!(
        d.retry_after_ms.is_some_and(|ms| ms > 0 && ms <= 1000),
        "{d:?}"
    );
}

// The hostile-input suite (issue 12): what an attacker or a broken client
// sends, each with its documented answer, and the broker serving others
// after each.

/// Deterministic noise (xorshift64*), so a failing input can be replayed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

#[tokio::test]
async fn random_bytes_close_only_their_own_connection_with_4001() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut bystander = connected_client(&broker).await.unwrap();
    bystander.subscribe("bystander").await.unwrap();
    for seed in 1..=12u64 {
        let junk = noise(seed, 1 + (seed as usize * 37) % 300);
        // As MessagePack (binary), after `connect`.
        let mut c = WsClient::connect_with(&broker.ws_url(), Encoding::MsgPack)
            .await
            .unwrap();
        c.handshake(None).await.unwrap();
        c.send_raw(junk.clone()).await.unwrap();
        let code = closed_with(&mut c).await;
        // Junk that happens to decode as a map without a known `type` is
        // a bad request instead; with these seeds it never does.
        assert_eq!(code, 4001, "seed {seed}: {junk:?}");
        // As JSON text (made valid UTF-8), after `connect`.
        let mut c = connected_client(&broker).await.unwrap();
        let text = String::from_utf8_lossy(&junk).into_owned();
        c.send_raw(text.into_bytes()).await.unwrap();
        assert_eq!(closed_with(&mut c).await, 4001, "seed {seed}");
    }
    // A WebSocket frame cut off mid-payload, then the socket shut.
    let (mut s, status) = raw::upgrade(broker.client_addr, "/v1/ws", Some("tether.v1.json"))
        .await
        .unwrap();
    assert!(status.contains("101"), "{status}");
    let whole = raw::frame(1, &[b'x'; 1000]);
    s.write_all(&whole[..40]).await.unwrap();
    s.shutdown().await.unwrap();
    drop(s);
    broker
        .publish(json!({"channel": "bystander", "data": "unharmed"}))
        .await
        .unwrap();
    assert_eq!(
        bystander.recv_publication().await.unwrap().data,
        json!("unharmed")
    );
    still_serves(&broker).await;
}

#[tokio::test]
async fn wrong_types_in_every_field_get_bad_request_and_the_session_goes_on() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    let cases = [
        r#"{"type":"subscribe","id":1,"channel":5}"#,
        r#"{"type":"subscribe","id":2,"channel":"a","since":"yesterday"}"#,
        r#"{"type":"subscribe","id":3,"channel":"a","since":{"epoch":1,"offset":"x"}}"#,
        r#"{"type":"subscribe","id":"four","channel":"a"}"#,
        r#"{"type":"subscribe","id":-5,"channel":"a"}"#,
        r#"{"type":"unsubscribe","id":6,"channel":["a"]}"#,
        r#"{"type":"publish","id":7,"channel":"a"}"#,
        r#"{"type":"publish","id":8,"channel":null,"data":1}"#,
        r#"{"type":"ack","channel":"a","offset":"x"}"#,
        r#"{"type":"ack","channel":"a","offset":-1}"#,
        r#"{"type":"refresh","id":11,"token":5}"#,
        r#"{"type":"connect","id":12,"token":{}}"#,
    ];
    for case in cases {
        c.send_raw(case.as_bytes().to_vec()).await.unwrap();
        match c.recv_skip_pings().await.unwrap() {
            ServerMessage::Error(e) => {
                assert_eq!(e.code, ErrorCode::BadRequest, "{case}: {e:?}")
            }
            other => panic!("{case}: expected error bad_request, got {other:?}"),
        }
    }
    c.send(&ClientMessage::Ping).await.unwrap();
    assert_eq!(c.recv_skip_pings().await.unwrap(), ServerMessage::Pong);
    // Without a string `type` it is not a message at all: 4001.
    for not_a_message in [r#"{"type":5}"#, r#"["subscribe",13,"a"]"#, r#""subscribe""#] {
        let mut c = connected_client(&broker).await.unwrap();
        c.send_raw(not_a_message.as_bytes().to_vec()).await.unwrap();
        assert_eq!(closed_with(&mut c).await, 4001, "{not_a_message}");
    }
    still_serves(&broker).await;
}

#[tokio::test]
async fn numbers_no_json_has_close_the_connection_with_4001() {
    let broker = TestBroker::start(&[]).unwrap();
    for data in ["NaN", "Infinity", "-Infinity", "1e400", "01"] {
        let mut c = connected_client(&broker).await.unwrap();
        let frame = format!(r#"{{"type":"publish","id":1,"channel":"n","data":{data}}}"#);
        c.send_raw(frame.into_bytes()).await.unwrap();
        assert_eq!(closed_with(&mut c).await, 4001, "data {data}");
    }
    // A large integer is valid JSON and passes digit for digit: a JSON
    // subscriber gets exactly what a JSON client published (as from the
    // HTTP API), spacing compacted, a decimal's spelling kept.
    let mut subscriber = connected_client(&broker).await.unwrap();
    subscriber.subscribe("n").await.unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    c.send_raw(
        br#"{"type":"publish","id":1,"channel":"n","data":{ "big": 123456789012345678901234567890, "x": 1.10 }}"#
            .to_vec(),
    )
    .await
    .unwrap();
    match c.recv_skip_pings().await.unwrap() {
        ServerMessage::Published(p) => assert_eq!(p.id, 1),
        other => panic!("{other:?}"),
    }
    let text = loop {
        match subscriber.recv_frame().await.unwrap() {
            tokio_tungstenite::tungstenite::Message::Text(t) if t.contains("\"message\"") => {
                break t.to_string();
            }
            _ => {}
        }
    };
    assert!(
        text.contains(r#""data":{"big":123456789012345678901234567890,"x":1.10}"#),
        "{text}"
    );
    still_serves(&broker).await;
}

#[tokio::test]
async fn channel_names_of_255_bytes_pass_and_256_do_not() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    let longest = "a".repeat(255);
    c.subscribe(&longest).await.unwrap();
    let frame = format!(
        r#"{{"type":"subscribe","id":99,"channel":"{}"}}"#,
        "a".repeat(256)
    );
    c.send_raw(frame.into_bytes()).await.unwrap();
    match c.recv_skip_pings().await.unwrap() {
        ServerMessage::Error(e) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert_eq!(e.id, Some(99));
        }
        other => panic!("{other:?}"),
    }
    broker
        .publish(json!({"channel": longest, "data": 1}))
        .await
        .unwrap();
    assert_eq!(c.recv_publication().await.unwrap().data, json!(1));
    let (s, _) = broker
        .publish(json!({"channel": "a".repeat(256), "data": 1}))
        .await
        .unwrap();
    assert_eq!(s, 400);
    still_serves(&broker).await;
}

#[tokio::test]
async fn ten_thousand_subscribes_from_one_client_are_rate_limited_then_closed_4029() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    let start = std::time::Instant::now();
    for i in 0..10_000u64 {
        let frame = format!(r#"{{"type":"subscribe","id":{i},"channel":"flood:{i}"}}"#);
        if c.send_raw(frame.into_bytes()).await.is_err() {
            break; // closed under us: the answer is on its way
        }
    }
    let (mut subscribed, mut limited) = (0, 0);
    let code = loop {
        match c.recv_frame().await {
            Ok(Message::Text(t)) => {
                match tether_protocol::codec::decode_server(t.as_bytes(), Encoding::Json, 1 << 20)
                    .unwrap()
                {
                    ServerMessage::Subscribed(_) => subscribed += 1,
                    ServerMessage::Error(e) => {
                        assert_eq!(e.code, ErrorCode::RateLimited, "{e:?}");
                        limited += 1;
                    }
                    ServerMessage::Disconnect(d) => assert_eq!(d.code, 4029),
                    other => panic!("{other:?}"),
                }
            }
            Ok(Message::Close(f)) => break f.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(code, Some(4029));
    // At most the subscribe burst (2 × 50, plus 50/s while it lasted) got
    // through before the message budget (2 × 100, plus 100/s) ran out; the
    // rest of that budget was refused subscribes.
    let secs = start.elapsed().as_secs_f64();
    let subscribes = 100 + (50.0 * secs).ceil() as usize;
    let messages = 200 + (100.0 * secs).ceil() as usize;
    assert!(
        subscribed <= subscribes,
        "{subscribed} subscribed in {secs} s"
    );
    assert!(
        subscribed + limited <= messages,
        "{subscribed} + {limited} in {secs} s"
    );
    assert!(limited > 0, "none refused");
    still_serves(&broker).await;
}
