//! The backend HTTP API (§10).

use serde_json::{Value, json};
use tether_protocol::*;
use tether_tests::*;

async fn get(broker: &TestBroker, path: &str) -> (u16, String) {
    let r = broker
        .http()
        .get(broker.api_url(path))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn post_raw(broker: &TestBroker, path: &str, body: &str) -> (u16, Value) {
    let r = broker
        .http()
        .post(broker.api_url(path))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn publish_validates_its_body() {
    let broker = TestBroker::start(&["--max-message-size", "1024"]).unwrap();
    let (s, body) = post_raw(&broker, "/v1/publish", "this is not json").await;
    assert_eq!(s, 400);
    assert_eq!(body["error"]["code"], "bad_request");
    assert!(body["error"]["message"].as_str().is_some());

    let (s, body) = post_raw(&broker, "/v1/publish", r#"{"data": 1}"#).await;
    assert_eq!(s, 400, "{body}");
    let (s, body) = post_raw(&broker, "/v1/publish", r#"{"channel": "c"}"#).await;
    assert_eq!(s, 400, "missing data: {body}");
    let (s, _) = post_raw(
        &broker,
        "/v1/publish",
        r#"{"channel": "bad name", "data": 1}"#,
    )
    .await;
    assert_eq!(s, 400);
    let deep = format!(
        r#"{{"channel": "c", "data": {}1{}}}"#,
        "[".repeat(70),
        "]".repeat(70)
    );
    let (s, _) = post_raw(&broker, "/v1/publish", &deep).await;
    assert_eq!(s, 400);

    let (s, body) = broker
        .publish(json!({"channel": "c", "data": "x".repeat(2000)}))
        .await
        .unwrap();
    assert_eq!(s, 413);
    assert_eq!(body["error"]["code"], "too_large");
    let (s, _) = broker
        .publish(json!({"channel": "c", "data": "x".repeat(500)}))
        .await
        .unwrap();
    assert_eq!(s, 200);
}

#[tokio::test]
async fn the_api_key_is_required_when_configured() {
    let broker = TestBroker::start(&["--api-key", "k3y"]).unwrap();
    let http = broker.http();
    let body = json!({"channel": "c", "data": 1});
    let r = http
        .post(broker.api_url("/v1/publish"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "unauthorized");
    let r = http
        .post(broker.api_url("/v1/publish"))
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(broker.api_url("/v1/publish"))
        .bearer_auth("k3y")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The scheme is case-insensitive (RFC 9110); the key is not, and a key
    // that is only a prefix of the real one is refused.
    for (value, status) in [
        ("bearer k3y", 200),
        ("BEARER  k3y", 200),
        ("Bearer K3Y", 401),
        ("Bearer k3", 401),
        ("Bearer k3yy", 401),
        ("Basic k3y", 401),
        ("k3y", 401),
    ] {
        let r = http
            .post(broker.api_url("/v1/publish"))
            .header("authorization", value)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "Authorization: {value}");
    }
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(get(&broker, "/healthz").await.0, 200);
    assert_eq!(get(&broker, "/metrics").await.0, 200);
}

#[tokio::test]
async fn a_batch_answers_every_publication_in_order_even_when_some_fail() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    c.subscribe("b").await.unwrap();
    let r = broker
        .http()
        .post(broker.api_url("/v1/publish/batch"))
        .json(&json!({"messages": [
            {"channel": "b", "data": 1},
            {"channel": "no spaces allowed", "data": 2},
            {"channel": "b"},
            {"channel": "b", "data": 3},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!(results[0]["offset"], 1);
    assert_eq!(results[1]["error"]["code"], "bad_request");
    assert_eq!(results[2]["error"]["code"], "bad_request");
    assert_eq!(results[3]["offset"], 2);
    assert_eq!(c.recv_publication().await.unwrap().data, json!(1));
    assert_eq!(c.recv_publication().await.unwrap().data, json!(3));
}

#[tokio::test]
async fn a_repeated_idempotency_key_publishes_once() {
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    c.subscribe("orders").await.unwrap();
    let body = json!({"channel": "orders", "data": {"order": 1}, "idempotency_key": "order-1"});
    let (s1, a1) = broker.publish(body.clone()).await.unwrap();
    let (s2, a2) = broker.publish(body).await.unwrap();
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(a1, a2);
    // The same key on another channel is another publication.
    let (_, other) = broker
        .publish(json!({"channel": "orders2", "data": 1, "idempotency_key": "order-1"}))
        .await
        .unwrap();
    assert_eq!(other["offset"], 1);
    let (_, next) = broker
        .publish(json!({"channel": "orders", "data": {"order": 2}}))
        .await
        .unwrap();
    assert_eq!(next["offset"], 2);
    assert_eq!(c.recv_publication().await.unwrap().offset, Offset(1));
    assert_eq!(c.recv_publication().await.unwrap().offset, Offset(2));
}

#[tokio::test]
async fn health_readiness_metrics_and_errors() {
    let broker = TestBroker::start(&[]).unwrap();
    let (s, body) = get(&broker, "/healthz").await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = get(&broker, "/readyz").await;
    assert_eq!(s, 200, "{body}");

    let mut c = connected_client(&broker).await.unwrap();
    c.subscribe("m").await.unwrap();
    broker
        .publish(json!({"channel": "m", "data": 1}))
        .await
        .unwrap();
    c.recv_publication().await.unwrap();
    let (s, metrics) = get(&broker, "/metrics").await;
    assert_eq!(s, 200);
    for name in [
        "tether_connections{transport=\"ws\"} 1",
        "tether_messages_in_total{transport=\"ws\"}",
        "tether_messages_out_total{transport=\"ws\"}",
        "tether_publications_total{source=\"api\"} 1",
        "tether_delivery_latency_seconds_count 1",
        "tether_outbox_drops_total 0",
    ] {
        assert!(metrics.contains(name), "missing {name}:\n{metrics}");
    }
    let (s, body) = get(&broker, "/v1/nowhere").await;
    assert_eq!(s, 404);
    assert!(body.contains("not_found"), "{body}");
    let (s, _) = get(&broker, "/v1/publish").await;
    assert_eq!(s, 405);
}

#[tokio::test]
async fn history_over_http() {
    let broker = TestBroker::start(&["--history-size", "3"]).unwrap();
    for i in 1..=5 {
        broker
            .publish(json!({"channel": "h/1", "data": i}))
            .await
            .unwrap();
    }
    let (s, body) = get(&broker, "/v1/channels/h%2F1/history?since=2").await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["offset"], 5);
    assert_eq!(v["recovered"], true);
    let offsets: Vec<_> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].clone())
        .collect();
    assert_eq!(offsets, vec![json!(3), json!(4), json!(5)]);
    assert_eq!(v["messages"][0]["data"], 3);

    let (_, body) = get(&broker, "/v1/channels/h%2F1/history").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["recovered"], false, "history no longer reaches back to 1");
    let (s, _) = get(&broker, "/v1/channels/h%2F1/history?limit=4").await;
    assert_eq!(s, 400, "limit above the history size");
    let (_, body) = get(&broker, "/v1/channels/unknown/history").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["offset"], 0);
    assert_eq!(v["messages"], json!([]));
}

#[tokio::test]
async fn what_the_framework_refuses_is_answered_in_the_api_error_shape() {
    let broker = TestBroker::start(&[]).unwrap();
    let http = broker.http();
    for (path, status, code) in [
        ("/v1/channels/x/history?since=1&since=2", 400, "bad_request"),
        ("/v1/devices?user=a&user=b", 400, "bad_request"),
        ("/v1/channels/%FF/history", 400, "bad_request"),
    ] {
        let r = http.get(broker.api_url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{path}"
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
    }
    // A body over the API's 16 MiB limit: 413, too_large, as JSON. Raw
    // TCP: the server answers before it has read the body, and a client
    // library may report the reset of the rest as an error instead.
    let answer = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(broker.api_addr)
            .await
            .unwrap();
        let len = 17usize << 20;
        let head = format!(
            "POST /v1/publish HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let _ = s.write_all(&vec![b' '; len]).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"too_large\""), "{answer}");
    // The description of the API is served, the same as docs/openapi.json.
    let doc: Value = http
        .get(broker.api_url("/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let file: Value = serde_json::from_str(include_str!("../../../docs/openapi.json")).unwrap();
    assert_eq!(doc, file);
}

/// The broker's resident memory (VmRSS), bytes.
fn rss(broker: &TestBroker) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", broker.pid())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

#[tokio::test]
async fn batches_and_push_fields_are_bounded_before_they_are_taken() {
    let broker = TestBroker::start(&[]).unwrap();

    // 1,001 publications: refused, naming the limit.
    let messages: Vec<Value> = (0..1001)
        .map(|i| json!({"channel": "b", "data": i}))
        .collect();
    let (s, v) = post_raw(
        &broker,
        "/v1/publish/batch",
        &json!({ "messages": messages }).to_string(),
    )
    .await;
    assert_eq!(s, 413, "{v}");
    assert_eq!(v["error"]["code"], "too_large");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("1000"),
        "{v}"
    );

    // Nearly 16 MiB of tiny elements: refused at the 1,001st, without the
    // broker's memory growing by the values it never builds.
    let before = rss(&broker);
    let body = format!("{{\"messages\":[{}0]}}", "0,".repeat(8_000_000));
    let (s, v) = post_raw(&broker, "/v1/publish/batch", &body).await;
    assert_eq!(s, 413, "{v}");
    let grown = rss(&broker).saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "RSS grew by {grown} bytes for a refused batch"
    );
    // Nothing of either batch was published.
    let (_, history) = get(&broker, "/v1/channels/b/history").await;
    let history: Value = serde_json::from_str(&history).unwrap();
    assert_eq!(history["offset"], 0, "{history}");

    // A push larger than APNs and FCM accept is refused at the API, not
    // accepted and failed later; so is a collapse key APNs would refuse.
    let (s, v) = post_raw(
        &broker,
        "/v1/publish",
        &json!({"channel": "user:a", "data": 1, "push": {"title": "t", "body": "b".repeat(8 << 20)}})
            .to_string(),
    )
    .await;
    assert_eq!(s, 413, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("4096"),
        "{v}"
    );
    let (s, v) = post_raw(
        &broker,
        "/v1/publish",
        &json!({"channel": "user:a", "data": 1, "push": {"title": "t", "collapse_key": "k".repeat(65)}})
            .to_string(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    // At the limit it goes through.
    let (s, v) = post_raw(
        &broker,
        "/v1/publish",
        &json!({"channel": "user:a", "data": 1, "push": {"title": "t", "body": "b".repeat(3000)}})
            .to_string(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test]
async fn a_plaintext_provider_endpoint_off_loopback_is_refused_at_start() {
    let err = broker_refuses(&["--fcm-endpoint", "http://10.1.2.3:8443"]);
    assert!(
        err.contains("fcm-endpoint") && err.contains("loopback"),
        "{err}"
    );
}

#[tokio::test]
async fn a_request_head_sent_too_slowly_loses_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = TestBroker::start(&[]).unwrap();
    // Half a request head, then silence (slowloris): the API closes the
    // connection once its header timeout (10 s) passes, instead of keeping
    // it, and its task, forever.
    let mut slow = tokio::net::TcpStream::connect(broker.api_addr)
        .await
        .unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        slow.read_to_end(&mut buf),
    )
    .await
    .expect("the connection is still open after 60 s");
    // Closed (hyper may answer 408 first, or just close).
    assert!(read.is_ok() || buf.is_empty(), "{read:?}");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    // Meanwhile, and after, the API serves others.
    assert_eq!(get(&broker, "/healthz").await.0, 200);
}

#[tokio::test]
async fn numbers_in_data_pass_through_digit_for_digit() {
    use tokio_tungstenite::tungstenite::Message;
    let broker = TestBroker::start(&[]).unwrap();
    let mut c = connected_client(&broker).await.unwrap();
    c.subscribe("n").await.unwrap();
    // Bigger than any integer a double holds exactly, and a decimal whose
    // spelling a float would change.
    let body =
        r#"{ "channel": "n", "data": { "big": 123456789012345678901234567890, "x": 1.10 } }"#;
    let (s, v) = post_raw(&broker, "/v1/publish", body).await;
    assert_eq!(s, 200, "{v}");
    let text = loop {
        match c.recv_frame().await.unwrap() {
            Message::Text(t) if t.contains("\"message\"") => break t.to_string(),
            _ => {}
        }
    };
    assert!(
        text.contains(r#""data":{"big":123456789012345678901234567890,"x":1.10}"#),
        "{text}"
    );
    // History gives the same digits.
    let (_, history) = get(&broker, "/v1/channels/n/history").await;
    assert!(
        history.contains("123456789012345678901234567890"),
        "{history}"
    );
}

#[tokio::test]
async fn a_number_no_float_can_hold_is_refused() {
    // Found by the api_publication fuzz target: valid JSON text, but
    // infinite to a subscriber's JSON parser (and an error to serde_json).
    let broker = TestBroker::start(&[]).unwrap();
    for data in [
        "1e400",
        "-18e491",
        &format!("1{}", "0".repeat(400)),
        "[1, {\"x\": 2E+999}]",
    ] {
        let body = format!(r#"{{"channel":"n","data":{data}}}"#);
        let (s, v) = post_raw(&broker, "/v1/publish", &body).await;
        assert_eq!(s, 400, "{data}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("range"),
            "{v}"
        );
    }
    // Also found by it: a lone surrogate escape, which strict JSON parsers
    // (serde_json, so our Rust client and the MessagePack conversion) refuse.
    let (s, v) = post_raw(
        &broker,
        "/v1/publish",
        r#"{"channel":"n","data":{"k":"\uD9D5x"}}"#,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post_raw(
        &broker,
        "/v1/publish",
        r#"{"channel":"n","data":"\uD83D\uDE00 \u00e9"}"#,
    )
    .await;
    assert_eq!(s, 200, "a surrogate pair is fine: {v}");
    // Big but finite ones pass, digit for digit.
    let (s, v) = post_raw(
        &broker,
        "/v1/publish",
        r#"{"channel":"n","data":[1e300,123456789012345678901234567890]}"#,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (_, history) = get(&broker, "/v1/channels/n/history").await;
    assert!(
        history.contains("[1e300,123456789012345678901234567890]"),
        "{history}"
    );
}

#[tokio::test]
async fn the_api_key_past_its_rate_gets_429_with_retry_after() {
    let broker = TestBroker::start(&["--api-key", "k3y", "--api-rate", "2"]).unwrap();
    let http = broker.http();
    let get = |key: &'static str| {
        http.get(broker.api_url("/v1/channels/room:1/history"))
            .bearer_auth(key)
            .send()
    };
    // A wrong key is refused without spending the budget…
    for _ in 0..5 {
        assert_eq!(get("wrong").await.unwrap().status(), 401);
    }
    // …the right one has bursts of twice the rate…
    for _ in 0..4 {
        assert_eq!(get("k3y").await.unwrap().status(), 200);
    }
    // …and then waits.
    let r = get("k3y").await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // Health and metrics are not part of the key's budget.
    let h = http.get(broker.api_url("/healthz")).send().await.unwrap();
    assert_eq!(h.status(), 200);
}

#[tokio::test]
async fn a_body_sent_too_slowly_is_answered_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = TestBroker::start(&["--api-request-timeout", "1"]).unwrap();
    // The whole head, then 10 of the 100 body bytes announced, then silence.
    let mut slow = tokio::net::TcpStream::connect(broker.api_addr)
        .await
        .unwrap();
    slow.write_all(
        b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"channel\"",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, slow.read(&mut buf))
        .await
        .expect("no answer to a stalled body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("within 1 s"), "{text}");
    // Nothing was published, and others are served.
    let (s, h) = get(&broker, "/v1/channels/x/history").await;
    assert_eq!(s, 200, "{h}");
    assert_eq!(get(&broker, "/healthz").await.0, 200);
}
