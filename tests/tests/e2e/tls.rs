//! TLS with an operator's certificate: wss on the client listener, and the
//! same certificate on QUIC, verified the normal way (no pinning).

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tether_protocol::codec::{decode_server, encode_client};
use tether_protocol::*;
use tether_tests::*;
use tokio_tungstenite::tungstenite::Message;

/// A self-made certificate for localhost/127.0.0.1: (cert path, key path, DER).
pub(crate) fn certificate(dir: &std::path::Path) -> (String, String, CertificateDer<'static>) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .args([
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl req");
    let der = CertificateDer::from_pem_file(&cert).unwrap();
    (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
        der,
    )
}

#[tokio::test]
async fn wss_and_quic_serve_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = certificate(dir.path());
    let broker = TestBroker::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--quic-addr",
        "127.0.0.1:0",
    ])
    .unwrap();
    assert!(
        broker.log().iter().any(|l| l.contains("wss://")),
        "{:?}",
        broker.log()
    );

    // wss: TLS verified against the certificate as the only root.
    let mut ws = wss_subscribed(&broker, &der, "secure").await;
    broker
        .publish(json!({"channel": "secure", "data": "over tls"}))
        .await
        .unwrap();
    match next_server(&mut ws).await {
        ServerMessage::Message(m) => assert_eq!(m.data, json!("over tls")),
        other => panic!("expected message, got {other:?}"),
    }

    // QUIC with the same certificate, verified against it as a root.
    let options = tether_client::QuicOptions {
        server_name: "localhost".into(),
        cert: tether_client::ServerCert::Roots(vec![der]),
        bind: None,
    };
    let mut q = tether_client::Client::connect_quic(broker.quic_addr.unwrap(), options)
        .await
        .unwrap();
    q.send(&ClientMessage::Connect(Connect {
        id: 1,
        ..Connect::default()
    }))
    .await
    .unwrap();
    assert!(matches!(
        q.recv().await.unwrap(),
        ServerMessage::Connected(_)
    ));

    // A plain ws:// client gets nowhere on a TLS listener.
    assert!(WsClient::connect(&broker.ws_url()).await.is_err());
}

type Wss =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A wss session trusting only `root`, connected and subscribed to
/// `channel`.
async fn wss_subscribed(broker: &TestBroker, root: &CertificateDer<'static>, channel: &str) -> Wss {
    let tls = tls_to(broker, root).await.unwrap();
    let url = format!("wss://localhost:{}/v1/ws", broker.client_addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    let text = |m: ClientMessage| {
        Message::Text(
            String::from_utf8(encode_client(&m, Encoding::Json).to_vec())
                .unwrap()
                .into(),
        )
    };
    let connect = ClientMessage::Connect(Connect {
        id: 1,
        ..Connect::default()
    });
    let subscribe = ClientMessage::Subscribe(Subscribe {
        id: 2,
        channel: ChannelName::new(channel).unwrap(),
        since: None,
    });
    for m in [connect, subscribe] {
        ws.send(text(m)).await.unwrap();
    }
    assert!(matches!(
        next_server(&mut ws).await,
        ServerMessage::Connected(_)
    ));
    assert!(matches!(
        next_server(&mut ws).await,
        ServerMessage::Subscribed(_)
    ));
    ws
}

/// The next protocol message of a wss session.
async fn next_server(ws: &mut Wss) -> ServerMessage {
    loop {
        if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
            return decode_server(t.as_bytes(), Encoding::Json, 1 << 20).unwrap();
        }
    }
}

/// A TLS handshake with the client listener, trusting only `root`.
async fn tls_to(
    broker: &TestBroker,
    root: &CertificateDer<'static>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(broker.client_addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_open_sessions_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, old_der) = certificate(dir.path());
    let broker = TestBroker::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--quic-addr",
        "127.0.0.1:0",
    ])
    .unwrap();
    // A session on the old certificate, subscribed.
    let mut ws = wss_subscribed(&broker, &old_der, "rotating").await;

    // The operator puts a new certificate in place and sends SIGHUP.
    let fresh = tempfile::tempdir().unwrap();
    let (new_cert, new_key, new_der) = certificate(fresh.path());
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &broker.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !broker
        .log()
        .iter()
        .any(|l| l.contains("TLS certificate reloaded"))
    {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", broker.log());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // New connections get the new certificate, over wss and QUIC…
    assert!(tls_to(&broker, &new_der).await.is_ok());
    assert!(
        tls_to(&broker, &old_der).await.is_err(),
        "still the old certificate"
    );
    let options = tether_client::QuicOptions {
        server_name: "localhost".into(),
        cert: tether_client::ServerCert::Roots(vec![new_der]),
        bind: None,
    };
    tether_client::Client::connect_quic(broker.quic_addr.unwrap(), options)
        .await
        .unwrap();
    // …and the session opened before goes on.
    broker
        .publish(json!({"channel": "rotating", "data": "after the reload"}))
        .await
        .unwrap();
    match next_server(&mut ws).await {
        ServerMessage::Message(m) => assert_eq!(m.data, json!("after the reload")),
        other => panic!("expected message, got {other:?}"),
    }
}

#[tokio::test]
async fn a_bad_certificate_on_sighup_keeps_the_one_served() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = certificate(dir.path());
    let broker = TestBroker::start(&["--tls-cert", &cert, "--tls-key", &key]).unwrap();
    std::fs::write(&cert, "not a certificate").unwrap();
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &broker.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !broker.log().iter().any(|l| l.contains("not reloaded")) {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", broker.log());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(tls_to(&broker, &der).await.is_ok(), "the old one is served");
}
