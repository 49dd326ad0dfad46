//! Bad input: each gets a clear answer or close code, and the broker keeps
//! serving everyone else.

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
