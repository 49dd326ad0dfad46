//! Client authentication (§9): JWTs, channel permissions, refresh.

use serde_json::json;
use tether_protocol::*;
use tether_tests::*;

const SECRET: &str = "test-secret-please-change-0123456";

fn token(claims: serde_json::Value) -> String {
    hs256_token(SECRET, claims)
}

async fn connect_with(broker: &TestBroker, token: Option<&str>) -> WsClient {
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    let id = c.id();
    c.send(&ClientMessage::Connect(Connect {
        id,
        token: token.map(str::to_owned),
        ..Connect::default()
    }))
    .await
    .unwrap();
    c
}

async fn expect_error(c: &mut WsClient, code: ErrorCode) {
    match c.recv_skip_pings().await.unwrap() {
        ServerMessage::Error(e) => assert_eq!(e.code, code, "{e:?}"),
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn missing_bad_and_expired_tokens_are_refused_with_their_codes() {
    let broker = TestBroker::start(&["--jwt-secret", SECRET]).unwrap();
    let mut c = connect_with(&broker, None).await;
    assert_eq!(c.expect_close().await.unwrap().code, Some(4003));

    let forged = hs256_token(
        "wrong-secret",
        json!({"sub": "alice", "exp": unix_now() + 60}),
    );
    let mut c = connect_with(&broker, Some(&forged)).await;
    assert_eq!(c.expect_close().await.unwrap().code, Some(4003));

    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &json!({"sub": "alice", "exp": unix_now() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut c = connect_with(&broker, Some(&hs512)).await;
    assert_eq!(c.expect_close().await.unwrap().code, Some(4003));

    let expired = token(json!({"sub": "alice", "exp": unix_now() - 60}));
    let mut c = connect_with(&broker, Some(&expired)).await;
    let closed = c.expect_close().await.unwrap();
    assert_eq!(closed.code, Some(4011));
    assert!(closed.disconnect.expect("disconnect").reconnect);
}

#[tokio::test]
async fn nbf_audience_and_issuer_are_checked() {
    let broker = TestBroker::start(&[
        "--jwt-secret",
        SECRET,
        "--jwt-audience",
        "tether-app",
        "--jwt-issuer",
        "https://auth.example",
    ])
    .unwrap();
    let good = json!({"sub": "alice", "exp": unix_now() + 60,
                      "aud": "tether-app", "iss": "https://auth.example"});
    let with = |k: &str, v: serde_json::Value| {
        let mut c = good.clone();
        c[k] = v;
        token(c)
    };
    let without = |k: &str| {
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove(k);
        token(c)
    };
    for (what, t) in [
        ("wrong audience", with("aud", json!("other-app"))),
        ("no audience", without("aud")),
        ("wrong issuer", with("iss", json!("https://evil.example"))),
        ("no issuer", without("iss")),
        (
            "not valid for a minute",
            with("nbf", json!(unix_now() + 60)),
        ),
    ] {
        let mut c = connect_with(&broker, Some(&t)).await;
        assert_eq!(c.expect_close().await.unwrap().code, Some(4003), "{what}");
    }
    // `aud` may be a list; an `nbf` inside the leeway is accepted.
    for t in [
        with("aud", json!(["web", "tether-app"])),
        with("nbf", json!(unix_now() + 2)),
    ] {
        let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
        c.handshake(Some(&t)).await.unwrap();
    }
}

#[tokio::test]
async fn a_token_accepted_inside_the_leeway_is_not_closed_at_once() {
    let broker = TestBroker::start(&["--jwt-secret", SECRET]).unwrap();
    // Expired 2 s ago: inside the 5 s leeway, so `connect` accepts it, and
    // the session's deadline carries the same leeway (a message published
    // after the handshake still arrives before the 4011).
    let t = token(json!({"sub": "alice", "exp": unix_now() - 2, "channels": ["news"]}));
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    c.handshake(Some(&t)).await.unwrap();
    c.subscribe("news").await.unwrap();
    broker
        .publish(json!({"channel": "news", "data": "still here"}))
        .await
        .unwrap();
    let p = c.recv_publication().await.unwrap();
    assert_eq!(p.data, json!("still here"));
    // And then the session does end, with 4011.
    assert_eq!(c.expect_close().await.unwrap().code, Some(4011));
}

#[tokio::test]
async fn a_short_hs256_secret_is_refused_at_start() {
    let err = broker_refuses(&["--jwt-secret", "only-31-bytes-long-0123456789ab"]);
    assert!(
        err.contains("jwt-secret") && err.contains("32 bytes"),
        "{err}"
    );
    assert!(
        !err.contains("only-31-bytes"),
        "the secret is echoed: {err}"
    );
}

#[tokio::test]
async fn personal_channels_and_the_channels_claim_are_enforced() {
    let broker = TestBroker::start(&["--jwt-secret", SECRET]).unwrap();
    let t = token(json!({"sub": "alice", "exp": unix_now() + 600, "channels": ["news", "team:*"]}));
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    c.handshake(Some(&t)).await.unwrap();
    c.subscribe("user:alice").await.unwrap();
    c.subscribe("news").await.unwrap();
    c.subscribe("team:blue").await.unwrap();
    for denied in ["user:bob", "sports"] {
        let id = c.id();
        c.send(&ClientMessage::Subscribe(Subscribe {
            id,
            channel: ChannelName::new(denied).unwrap(),
            since: None,
        }))
        .await
        .unwrap();
        expect_error(&mut c, ErrorCode::Forbidden).await;
    }
    // No `publish` claim: publishing is forbidden even on allowed channels.
    let id = c.id();
    c.send(&ClientMessage::Publish(Publish {
        id,
        channel: ChannelName::new("news").unwrap(),
        data: json!(1),
    }))
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::Forbidden).await;
}

#[tokio::test]
async fn the_publish_claim_allows_publishing_where_the_user_may_subscribe() {
    let broker = TestBroker::start(&["--jwt-secret", SECRET]).unwrap();
    let t = token(json!({"sub": "bob", "exp": unix_now() + 600, "publish": true}));
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    c.handshake(Some(&t)).await.unwrap();
    let id = c.id();
    c.send(&ClientMessage::Publish(Publish {
        id,
        channel: ChannelName::new("lobby").unwrap(),
        data: json!("hi"),
    }))
    .await
    .unwrap();
    assert!(matches!(
        c.recv_skip_pings().await.unwrap(),
        ServerMessage::Published(_)
    ));
    let id = c.id();
    c.send(&ClientMessage::Publish(Publish {
        id,
        channel: ChannelName::new("user:carol").unwrap(),
        data: json!("hi"),
    }))
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::Forbidden).await;
}

#[tokio::test]
async fn refresh_replaces_the_token_and_refuses_others() {
    let broker = TestBroker::start(&["--jwt-secret", SECRET]).unwrap();
    let t = token(json!({"sub": "dave", "exp": unix_now() + 600}));
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    c.handshake(Some(&t)).await.unwrap();

    let other = token(json!({"sub": "eve", "exp": unix_now() + 600}));
    let id = c.id();
    c.send(&ClientMessage::Refresh(Refresh { id, token: other }))
        .await
        .unwrap();
    expect_error(&mut c, ErrorCode::Forbidden).await;

    let id = c.id();
    c.send(&ClientMessage::Refresh(Refresh {
        id,
        token: "not-a-jwt".into(),
    }))
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::Unauthorized).await;

    let exp = unix_now() + 1200;
    let fresh = token(json!({"sub": "dave", "exp": exp}));
    let id = c.id();
    c.send(&ClientMessage::Refresh(Refresh { id, token: fresh }))
        .await
        .unwrap();
    assert_eq!(
        c.recv_skip_pings().await.unwrap(),
        ServerMessage::Refreshed(Refreshed { id, expires: exp })
    );
}

#[tokio::test]
async fn a_session_whose_token_expires_without_refresh_is_closed_with_4011() {
    let broker = TestBroker::start(&["--jwt-secret", SECRET]).unwrap();
    let t = token(json!({"sub": "frank", "exp": unix_now() + 2}));
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    c.handshake(Some(&t)).await.unwrap();
    let closed = c.expect_close().await.unwrap();
    assert_eq!(closed.code, Some(4011));
}

#[tokio::test]
async fn refresh_without_client_auth_is_a_bad_request() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    let id = c.id();
    c.send(&ClientMessage::Refresh(Refresh {
        id,
        token: "x".into(),
    }))
    .await
    .unwrap();
    expect_error(&mut c, ErrorCode::BadRequest).await;
}

#[tokio::test]
async fn es256_tokens_verify_against_a_public_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let public = dir.path().join("pub.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(&key)
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl genpkey");
    let ok = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl pkey -pubout");
    let broker = TestBroker::start(&["--jwt-public-key", public.to_str().unwrap()]).unwrap();
    let pem = std::fs::read(&key).unwrap();
    let t = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &json!({"sub": "gina", "exp": unix_now() + 600}),
        &jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
    )
    .unwrap();
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    c.handshake(Some(&t)).await.unwrap();
    c.subscribe("user:gina").await.unwrap();
    // An HS256 token is refused by a broker configured for ES256.
    let hs = hs256_token("whatever", json!({"sub": "gina", "exp": unix_now() + 600}));
    let mut c = connect_with(&broker, Some(&hs)).await;
    assert_eq!(c.expect_close().await.unwrap().code, Some(4003));
}

/// A JWT assembled by hand (base64url header and claims, any signature).
fn raw_jwt(header: serde_json::Value, claims: serde_json::Value, sig: &[u8]) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(sig)
    )
}

#[tokio::test]
async fn alg_none_and_an_hs256_token_keyed_with_the_rsa_public_key_are_refused() {
    let pair = tether_tests::fakes::keys::rsa_pair().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("pub.pem");
    std::fs::write(&public, &pair.public_pem).unwrap();
    let broker = TestBroker::start(&["--jwt-public-key", public.to_str().unwrap()]).unwrap();
    let claims = json!({"sub": "mallory", "exp": unix_now() + 600});
    // `alg: none`, unsigned (and with an empty signature part).
    for sig in [&b""[..], b"x"] {
        let none = raw_jwt(json!({"alg": "none", "typ": "JWT"}), claims.clone(), sig);
        let mut c = connect_with(&broker, Some(&none)).await;
        assert_eq!(c.expect_close().await.unwrap().code, Some(4003));
    }
    // Key confusion: HS256 with the RSA public key's PEM as the HMAC secret.
    let confused = hs256_token(&pair.public_pem, claims.clone());
    let mut c = connect_with(&broker, Some(&confused)).await;
    assert_eq!(c.expect_close().await.unwrap().code, Some(4003));
    // Truncated and garbage tokens.
    let good = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(pair.private_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    for bad in [&good[..good.len() - 5], "a.b.c", "", &"x".repeat(10_000)] {
        let mut c = connect_with(&broker, Some(bad)).await;
        assert_eq!(
            c.expect_close().await.unwrap().code,
            Some(4003),
            "{bad:.40}"
        );
    }
    // The real thing still works.
    let mut c = WsClient::connect(&broker.ws_url()).await.unwrap();
    c.handshake(Some(&good)).await.unwrap();
    c.subscribe("user:mallory").await.unwrap();
}
