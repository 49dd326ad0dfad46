//! QUIC sessions (§2): the same session logic as WebSocket, over a
//! length-framed MessagePack stream, surviving a change of client address.

use std::time::Duration;

use serde_json::json;
use tether_client::{Client, ClientError, QuicOptions};
use tether_protocol::codec::encode_client;
use tether_protocol::frame::encode_frame;
use tether_protocol::*;
use tether_tests::*;

const QUIC: [&str; 2] = ["--quic-addr", "127.0.0.1:0"];

async fn handshake(c: &mut Client) -> Connected {
    let id = c.next_id();
    c.send(&ClientMessage::Connect(Connect {
        id,
        ..Connect::default()
    }))
    .await
    .unwrap();
    match c.recv().await.unwrap() {
        ServerMessage::Connected(x) => x,
        other => panic!("expected connected, got {other:?}"),
    }
}

async fn subscribe(c: &mut Client, channel: &str) -> Subscribed {
    let id = c.next_id();
    c.send(&ClientMessage::Subscribe(Subscribe {
        id,
        channel: ChannelName::new(channel).unwrap(),
        since: None,
    }))
    .await
    .unwrap();
    match c.recv().await.unwrap() {
        ServerMessage::Subscribed(s) => s,
        other => panic!("expected subscribed, got {other:?}"),
    }
}

async fn next_publication(c: &mut Client) -> Publication {
    loop {
        match tokio::time::timeout(WAIT, c.recv())
            .await
            .expect("a message in time")
            .unwrap()
        {
            ServerMessage::Message(p) => return p,
            ServerMessage::Ping => continue,
            other => panic!("expected message, got {other:?}"),
        }
    }
}

async fn close_code(c: &mut Client) -> Option<u64> {
    tokio::time::timeout(Duration::from_secs(30), c.closed())
        .await
        .expect("closed in time")
        .code
}

#[tokio::test]
async fn a_quic_client_receives_http_publications_and_keeps_its_session_across_a_new_address() {
    let broker = TestBroker::start(&QUIC).unwrap();
    let mut c = broker.quic_client().await.unwrap();
    handshake(&mut c).await;
    subscribe(&mut c, "moving").await;
    broker
        .publish(json!({"channel": "moving", "data": "before"}))
        .await
        .unwrap();
    let m = next_publication(&mut c).await;
    assert_eq!((m.offset, m.data), (Offset(1), json!("before")));

    // Wi-Fi to LTE: the client's UDP socket changes under the connection.
    let before = c.quic_endpoint().unwrap().local_addr().unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    c.quic_endpoint().unwrap().rebind(socket).unwrap();
    let after = c.quic_endpoint().unwrap().local_addr().unwrap();
    assert_ne!(before.port(), after.port());
    // The client speaks first from its new address, as a phone would.
    c.send(&ClientMessage::Ping).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, c.recv()).await.unwrap().unwrap() {
            ServerMessage::Pong => break,
            ServerMessage::Ping => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    for i in 2..=4 {
        broker
            .publish(json!({"channel": "moving", "data": i}))
            .await
            .unwrap();
    }
    for i in 2..=4u64 {
        let m = next_publication(&mut c).await;
        assert_eq!(m.offset, Offset(i), "no loss, no reconnect");
    }
    assert!(c.quic_connection().unwrap().close_reason().is_none());
    broker
        .wait_for_metric("tether_quic_migrations_total 1")
        .await
        .unwrap();
    broker
        .wait_for_metric("tether_connections{transport=\"quic\"} 1")
        .await
        .unwrap();
}

#[tokio::test]
async fn websocket_and_quic_subscribers_get_the_same_messages() {
    let broker = TestBroker::start(&QUIC).unwrap();
    let mut q = broker.quic_client().await.unwrap();
    handshake(&mut q).await;
    subscribe(&mut q, "both").await;
    let mut w = connected_client(&broker).await.unwrap();
    w.subscribe("both").await.unwrap();
    // A QUIC client publishes; both see it.
    let id = q.next_id();
    q.send(&ClientMessage::Publish(Publish {
        id,
        channel: ChannelName::new("both").unwrap(),
        data: json!({"from": "quic"}),
    }))
    .await
    .unwrap();
    let from_ws = w.recv_publication().await.unwrap();
    let mut got_published = false;
    let mut from_quic = None;
    while from_quic.is_none() || !got_published {
        match q.recv().await.unwrap() {
            ServerMessage::Published(p) => {
                assert_eq!(p.offset, Offset(1));
                got_published = true;
            }
            ServerMessage::Message(m) => from_quic = Some(m),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(from_quic.unwrap(), from_ws);
}

#[tokio::test]
async fn frames_split_across_reads_and_packed_into_one_are_all_read() {
    // The broker reads the session stream 4 KiB at a time and keeps only
    // an unfinished frame between reads: a 40 KB publication arrives in
    // pieces, the first together with the end of another frame, the last
    // together with a whole `ping`.
    let broker = TestBroker::start(&QUIC).unwrap();
    let mut c = broker.quic_client().await.unwrap();
    handshake(&mut c).await;
    subscribe(&mut c, "pieces").await;
    let big = "x".repeat(40_000);
    let publish = encode_frame(&encode_client(
        &ClientMessage::Publish(Publish {
            id: c.next_id(),
            channel: ChannelName::new("pieces").unwrap(),
            data: json!({ "big": big }),
        }),
        Encoding::MsgPack,
    ));
    let ping = encode_frame(&encode_client(&ClientMessage::Ping, Encoding::MsgPack));
    let mut bytes = ping[..3].to_vec();
    c.send_raw_quic(&bytes).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    bytes = ping[3..].to_vec();
    bytes.extend_from_slice(&publish[..10_000]);
    c.send_raw_quic(&bytes).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    bytes = publish[10_000..].to_vec();
    bytes.extend_from_slice(&ping);
    c.send_raw_quic(&bytes).await.unwrap();

    let (mut pongs, mut published, mut message) = (0, false, None);
    while pongs < 2 || !published || message.is_none() {
        match tokio::time::timeout(WAIT, c.recv()).await.unwrap().unwrap() {
            ServerMessage::Pong => pongs += 1,
            ServerMessage::Published(p) => {
                assert_eq!(pongs, 1, "the publish is answered between the two pings");
                assert_eq!(p.offset, Offset(1));
                published = true;
            }
            ServerMessage::Message(m) => message = Some(m),
            ServerMessage::Ping => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(message.unwrap().data, json!({ "big": big }));
}

#[tokio::test]
async fn an_oversized_frame_closes_with_4009_before_its_body_arrives() {
    let broker = TestBroker::start(&QUIC).unwrap();
    let mut c = broker.quic_client().await.unwrap();
    handshake(&mut c).await;
    // Announce 1 MiB; send only the header.
    c.send_raw_quic(&(1024u32 * 1024).to_be_bytes())
        .await
        .unwrap();
    assert_eq!(close_code(&mut c).await, Some(4009));
}

#[tokio::test]
async fn malformed_messagepack_closes_with_4001_and_others_are_unaffected() {
    let broker = TestBroker::start(&QUIC).unwrap();
    let mut c = broker.quic_client().await.unwrap();
    handshake(&mut c).await;
    c.send_raw_quic(&encode_frame(&[0xc1, 0xc1])).await.unwrap(); // 0xc1 is never used
    assert_eq!(close_code(&mut c).await, Some(4001));
    let mut d = broker.quic_client().await.unwrap();
    handshake(&mut d).await;
    subscribe(&mut d, "fine").await;
}

#[tokio::test]
async fn a_silent_quic_client_is_closed_with_4005() {
    let broker = TestBroker::start(&["--quic-addr", "127.0.0.1:0", "--heartbeat", "1"]).unwrap();
    let mut c = broker.quic_client().await.unwrap();
    handshake(&mut c).await;
    let closed = tokio::time::timeout(Duration::from_secs(30), c.closed())
        .await
        .unwrap();
    assert_eq!(closed.code, Some(4005));
    assert_eq!(closed.disconnect.map(|d| d.code), Some(4005));
}

#[tokio::test]
async fn a_client_that_never_opens_its_session_stream_is_closed() {
    let broker =
        TestBroker::start(&["--quic-addr", "127.0.0.1:0", "--connect-timeout", "1"]).unwrap();
    let fp = broker.quic_fingerprint.clone().unwrap();
    // Connect at the QUIC level only: no stream, no bytes.
    let c = Client::connect_quic(
        broker.quic_addr.unwrap(),
        QuicOptions::pinned("localhost", &fp),
    )
    .await
    .unwrap();
    // The client crate opens the stream lazily (nothing is sent on it), so
    // the server sees no session stream and closes the connection.
    let conn = c.quic_connection().unwrap().clone();
    let err = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .unwrap();
    match err {
        quinn::ConnectionError::ApplicationClosed(a) => assert_eq!(a.error_code.into_inner(), 4001),
        other => panic!("expected an application close, got {other:?}"),
    }
}

#[tokio::test]
async fn extra_streams_are_refused_and_the_session_goes_on() {
    let broker = TestBroker::start(&QUIC).unwrap();
    let mut c = broker.quic_client().await.unwrap();
    handshake(&mut c).await;
    let conn = c.quic_connection().unwrap().clone();
    // The server allows one bidirectional stream and no unidirectional ones:
    // opening more waits for credit that never comes.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), conn.open_bi())
            .await
            .is_err()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), conn.open_uni())
            .await
            .is_err()
    );
    subscribe(&mut c, "still-here").await;
}

#[tokio::test]
async fn a_wrong_certificate_pin_is_refused_by_the_client() {
    let broker = TestBroker::start(&QUIC).unwrap();
    let wrong = "00".repeat(32);
    let r = Client::connect_quic(
        broker.quic_addr.unwrap(),
        QuicOptions::pinned("localhost", &wrong),
    )
    .await;
    assert!(
        matches!(r, Err(ClientError::QuicConnection(_))),
        "{:?}",
        r.err()
    );
}

#[tokio::test]
async fn sigterm_closes_quic_sessions_with_4010() {
    let mut broker = TestBroker::start(&QUIC).unwrap();
    let mut c = broker.quic_client().await.unwrap();
    handshake(&mut c).await;
    let status = broker.terminate(Duration::from_secs(15)).unwrap();
    assert!(status.success());
    let closed = tokio::time::timeout(Duration::from_secs(10), c.closed())
        .await
        .unwrap();
    assert_eq!(closed.code, Some(4010));
    assert_eq!(closed.disconnect.map(|d| d.code), Some(4010));
}

#[tokio::test]
async fn a_returning_client_resumes_its_tls_session() {
    let broker = TestBroker::start(&QUIC).unwrap();
    let addr = broker.quic_addr.unwrap();
    let options = QuicOptions::pinned("localhost", broker.quic_fingerprint.as_deref().unwrap());
    let endpoint = tether_client::quic_endpoint(addr, &options).unwrap();
    let mut first = Client::connect_quic_on(endpoint.clone(), addr, "localhost")
        .await
        .unwrap();
    handshake(&mut first).await;
    drop(first);
    let mut second = Client::connect_quic_on(endpoint, addr, "localhost")
        .await
        .unwrap();
    handshake(&mut second).await;
    broker
        .wait_for_metric("tether_quic_handshakes_total{reason=\"resumed\"} 1")
        .await
        .unwrap();
    broker
        .wait_for_metric("tether_quic_handshakes_total{reason=\"completed\"} 2")
        .await
        .unwrap();
}

#[tokio::test]
async fn one_connection_cap_covers_websocket_and_quic_and_the_excess_is_told_when_to_retry() {
    let broker =
        TestBroker::start(&["--quic-addr", "127.0.0.1:0", "--max-connections", "2"]).unwrap();
    let mut q = broker.quic_client().await.unwrap();
    handshake(&mut q).await;
    let mut w = connected_client(&broker).await.unwrap();
    w.expect_nothing_pending().await.unwrap();

    // Full, over both transports together: a third WebSocket client is
    // answered 503 with a Retry-After of 1 to 5 s, not left in the backlog.
    let refused = tokio_tungstenite::connect_async(broker.ws_url()).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status().as_u16(), 503);
            let secs: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=5).contains(&secs), "Retry-After: {secs}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    broker
        .wait_for_metric("tether_connections_refused_total{reason=\"limit\"} 1")
        .await
        .unwrap();

    // One leaves: the next one is let in.
    drop(w);
    broker
        .wait_for_metric("tether_connections{transport=\"ws\"} 0")
        .await
        .unwrap();
    let mut again = connected_client(&broker).await.unwrap();
    again.expect_nothing_pending().await.unwrap();
}

#[tokio::test]
async fn with_address_validation_a_client_is_sent_a_retry_and_then_served() {
    let broker =
        TestBroker::start(&["--quic-addr", "127.0.0.1:0", "--quic-retry", "always"]).unwrap();
    let mut q = broker.quic_client().await.unwrap();
    handshake(&mut q).await;
    // One Retry, then the handshake with the validated address.
    broker
        .wait_for_metric("tether_quic_handshakes_total{reason=\"retry\"} 1")
        .await
        .unwrap();
    broker
        .wait_for_metric("tether_quic_handshakes_total{reason=\"completed\"} 1")
        .await
        .unwrap();
    q.send(&ClientMessage::Ping).await.unwrap();
    assert_eq!(q.recv().await.unwrap(), ServerMessage::Pong);
    // Under the default (`under-load`) an idle node sends none.
    let calm = TestBroker::start(&["--quic-addr", "127.0.0.1:0"]).unwrap();
    let mut q = calm.quic_client().await.unwrap();
    handshake(&mut q).await;
    let m = calm.metrics().await.unwrap();
    assert!(!m.contains("reason=\"retry\""), "{m}");
}
