//! Heartbeat, timeouts and graceful shutdown.

use std::time::{Duration, Instant};

use tether_protocol::*;
use tether_tests::*;

#[tokio::test]
async fn the_server_pings_and_closes_a_silent_client_with_4005() {
    let broker = TestBroker::start(&["--heartbeat", "1"]).unwrap();
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let connected = c.handshake(None).await.unwrap();
    assert_eq!(connected.heartbeat, 1);
    assert_eq!(c.recv().await.unwrap(), ServerMessage::Ping);
    // Never answer: closed after two heartbeats of silence.
    let closed = c.expect_close().await.unwrap();
    assert_eq!(closed.code, Some(4005));
    assert!(closed.disconnect.expect("disconnect").reconnect);
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let broker = TestBroker::start(&["--heartbeat", "1"]).unwrap();
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    c.handshake(None).await.unwrap();
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(5) {
        match c.recv().await.unwrap() {
            ServerMessage::Ping => {
                pings += 1;
                c.send(&ClientMessage::Pong).await.unwrap();
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pings >= 3, "{pings} pings in 5 s with a 1 s heartbeat");
    c.send(&ClientMessage::Ping).await.unwrap();
    assert_eq!(c.recv_skip_pings().await.unwrap(), ServerMessage::Pong);
}

#[tokio::test]
async fn no_connect_within_the_timeout_closes_with_4001() {
    let broker = TestBroker::start(&["--connect-timeout", "1"]).unwrap();
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let closed = c.expect_close().await.unwrap();
    assert_eq!(closed.code, Some(4001));
}

#[tokio::test]
async fn sigterm_tells_clients_4010_and_exits_0() {
    let mut broker = TestBroker::start(&[]).unwrap();
    let mut a = connected_client(&broker).await.unwrap();
    let mut b = connected_client(&broker).await.unwrap();
    a.subscribe("x").await.unwrap();
    let status = broker.terminate(Duration::from_secs(15)).unwrap();
    assert!(status.success(), "exit status {status:?}");
    for c in [&mut a, &mut b] {
        let closed = c.expect_close().await.unwrap();
        assert_eq!(closed.code, Some(4010));
        let d = closed.disconnect.expect("disconnect before close");
        assert_eq!(d.code, 4010);
        assert!(d.reconnect);
    }
    // The listener is gone: new connections are refused.
    assert!(WsClient::connect(&broker.ws_url()).await.is_err());
}

#[tokio::test]
async fn the_listeners_log_their_bound_addresses() {
    let broker = TestBroker::start(&[]).unwrap();
    let log = broker.log();
    let listening: Vec<_> = log.iter().filter(|l| l.contains("listening")).collect();
    assert_eq!(listening.len(), 2, "{log:?}");
    assert!(
        listening
            .iter()
            .any(|l| l.contains(&broker.client_addr.to_string()))
    );
    assert!(
        listening
            .iter()
            .any(|l| l.contains(&broker.api_addr.to_string()))
    );
}

#[tokio::test]
async fn an_invalid_setting_is_named_and_the_broker_exits_non_zero() {
    let out = std::process::Command::new(broker_bin().unwrap())
        .args([
            "--heartbeat",
            "0",
            "--client-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("heartbeat"), "{err}");
    // The same through the environment.
    let out = std::process::Command::new(broker_bin().unwrap())
        .env("TETHER_CLIENT_ADDR", "not-an-address")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("client-addr"), "{err}");
}
