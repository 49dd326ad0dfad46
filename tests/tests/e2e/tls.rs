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
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(broker.client_addr)
        .await
        .unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let url = format!("wss://localhost:{}/v1/ws", broker.client_addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    let send = |m: ClientMessage| {
        Message::Text(
            String::from_utf8(encode_client(&m, Encoding::Json).to_vec())
                .unwrap()
                .into(),
        )
    };
    ws.send(send(ClientMessage::Connect(Connect {
        id: 1,
        ..Connect::default()
    })))
    .await
    .unwrap();
    ws.send(send(ClientMessage::Subscribe(Subscribe {
        id: 2,
        channel: ChannelName::new("secure").unwrap(),
        since: None,
    })))
    .await
    .unwrap();
    let mut next = async || loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => {
                return decode_server(t.as_bytes(), Encoding::Json, 1 << 20).unwrap();
            }
            _ => continue,
        }
    };
    assert!(matches!(next().await, ServerMessage::Connected(_)));
    assert!(matches!(next().await, ServerMessage::Subscribed(_)));
    broker
        .publish(json!({"channel": "secure", "data": "over tls"}))
        .await
        .unwrap();
    match next().await {
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
