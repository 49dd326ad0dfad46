//! Fake push providers: what the `push` scenario measures at, and what
//! `loadtest fake-apns` / `loadtest fake-fcm` serve on their own, so that an
//! SRE can size the push path without Apple or Google.
//!
//! One HTTP/2 listener without TLS (the broker speaks cleartext HTTP/2 to
//! an `http://` provider endpoint, which it allows on loopback only) serves
//! both providers' paths:
//!
//! - APNs: `POST /3/device/{token}`, a JSON payload whose top-level
//!   `channel` and `offset` the broker sets; answers 200 with an `apns-id`,
//!   400 `BadDeviceToken` for an empty token, 400 `PayloadEmpty` for a
//!   payload that is not JSON.
//! - FCM's OAuth2 token endpoint `POST /token` (the service account's
//!   `token_uri`, see [`service_account`]): a JWT-bearer grant whose
//!   assertion is RS256, signed by the service account's key (when the sink
//!   knows it), for this `token_uri`, with the firebase.messaging scope;
//!   answers an access token, else 400 `invalid_grant`.
//! - FCM HTTP v1 `POST /v1/projects/{project}/messages:send`: the bearer must
//!   be an access token this sink issued (else 401 `UNAUTHENTICATED`), the
//!   message must name a `token` and carry only string `data` values, with
//!   `channel` and `offset` (else 400 `INVALID_ARGUMENT`); answers
//!   `{"name": …}`.
//!
//! Every push that names a channel and an offset is noted with the time it
//! arrived and its device token, so a push that arrives twice for the same
//! device is seen.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// The grant type of the JWT-bearer flow (RFC 7523).
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The scope FCM needs.
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// The project of the service account [`service_account`] writes.
pub const PROJECT: &str = "loadtest";
/// Largest request body read (APNs takes 4 KiB payloads, FCM 4 KiB data).
const MAX_BODY: usize = 64 * 1024;
/// Access tokens remembered at most (a broker asks for one an hour); past
/// it they are forgotten and the broker asks again (401).
const MAX_ACCESS_TOKENS: usize = 10_000;
/// (channel, offset) keys remembered at most (~150 B each): past it pushes
/// of new keys are counted, not matched (`untracked`), so that a sink left
/// running for hours does not grow without end.
const MAX_KEYS: usize = 1_000_000;

/// One push as the provider saw it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Instant,
    pub device: String,
}

/// What the sink saw.
#[derive(Debug, Default)]
pub struct Arrivals {
    /// Per (channel, offset), every push that named it (at most
    /// [`MAX_KEYS`] keys).
    pub by_key: HashMap<(String, u64), Vec<Arrival>>,
    /// Pushes of keys past [`MAX_KEYS`]: counted, not checked for repeats.
    pub untracked: u64,
    /// Requests refused (bad path, token, payload or credentials).
    pub refused: u64,
    /// Access tokens issued (FCM).
    pub grants: u64,
    /// Why the first few refusals were refused.
    pub refusal_examples: Vec<String>,
}

impl Arrivals {
    /// Pushes received, all keys.
    pub fn pushes(&self) -> u64 {
        self.by_key.values().map(|v| v.len() as u64).sum::<u64>() + self.untracked
    }

    /// Pushes that repeat one already received for the same device.
    pub fn duplicated(&self) -> u64 {
        self.by_key
            .values()
            .map(|v| {
                let devices: HashSet<&str> = v.iter().map(|a| a.device.as_str()).collect();
                (v.len() - devices.len()) as u64
            })
            .sum()
    }

    fn refuse(&mut self, why: String) {
        self.refused += 1;
        if self.refusal_examples.len() < 5 {
            self.refusal_examples.push(why);
        }
    }
}

struct State {
    arrivals: Mutex<Arrivals>,
    access_tokens: Mutex<HashSet<String>>,
    token_uri: String,
    /// Checks the grant's signature when the sink knows the key.
    account_key: Option<jsonwebtoken::DecodingKey>,
}

/// A running fake provider; stops when dropped.
pub struct Sink {
    state: Arc<State>,
    _tasks: JoinSet<()>,
}

impl Sink {
    /// Listens on `addr`. `account` is the service-account JSON the broker
    /// was given (FCM grants are then checked against its key).
    pub async fn start(addr: SocketAddr, account: Option<&str>) -> Result<Sink> {
        let account_key = account.map(account_public_key).transpose()?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("{addr}: cannot listen"))?;
        let state = Arc::new(State {
            arrivals: Mutex::default(),
            access_tokens: Mutex::default(),
            token_uri: format!("http://{addr}/token"),
            account_key,
        });
        let mut tasks = JoinSet::new();
        let shared = state.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.handle(req).await) }
                    });
                    let _ = http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(1000)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Sink {
            state,
            _tasks: tasks,
        })
    }

    /// Runs `f` on what arrived so far.
    pub fn with<T>(&self, f: impl FnOnce(&Arrivals) -> T) -> T {
        f(&self
            .state
            .arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner()))
    }

    /// What arrived, leaving the record empty.
    pub fn take(&self) -> Arrivals {
        std::mem::take(
            &mut *self
                .state
                .arrivals
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }
}

fn reply(status: u16, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn google_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    reply(
        status,
        json!({"error": {"code": status, "message": message, "status": code}}),
    )
}

impl State {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let at = Instant::now();
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                self.refuse("a body over 64 KiB or cut short".into());
                return reply(413, json!({"reason": "PayloadTooLarge"}));
            }
        };
        let path = parts.uri.path();
        if parts.method != Method::POST {
            self.refuse(format!("{} {path}", parts.method));
            return reply(405, json!({"reason": "MethodNotAllowed"}));
        }
        if let Some(device) = path.strip_prefix("/3/device/") {
            return self.apns(at, device, &body);
        }
        if path == "/token" {
            return self.grant(&body);
        }
        if let Some(project) = path
            .strip_prefix("/v1/projects/")
            .and_then(|p| p.strip_suffix("/messages:send"))
        {
            return self.fcm(at, &parts, project, &body);
        }
        self.refuse(format!("POST {path}"));
        reply(404, json!({"reason": "BadPath"}))
    }

    fn refuse(&self, why: String) {
        self.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refuse(why);
    }

    fn arrived(&self, channel: &str, offset: u64, at: Instant, device: &str) {
        let mut a = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
        let key = (channel.to_owned(), offset);
        if a.by_key.len() >= MAX_KEYS && !a.by_key.contains_key(&key) {
            a.untracked += 1;
            return;
        }
        a.by_key.entry(key).or_default().push(Arrival {
            at,
            device: device.to_owned(),
        });
    }

    fn apns(&self, at: Instant, device: &str, body: &[u8]) -> Response<Full<Bytes>> {
        if device.is_empty() {
            self.refuse("APNs: no device token".into());
            return reply(400, json!({"reason": "BadDeviceToken"}));
        }
        let Ok(payload) = serde_json::from_slice::<Value>(body) else {
            self.refuse("APNs: a payload that is not JSON".into());
            return reply(400, json!({"reason": "PayloadEmpty"}));
        };
        match (payload["channel"].as_str(), payload["offset"].as_u64()) {
            (Some(channel), Some(offset)) => self.arrived(channel, offset, at, device),
            _ => self.refuse("APNs: a payload without channel and offset".into()),
        }
        let mut r = Response::new(Full::new(Bytes::new()));
        r.headers_mut().insert(
            "apns-id",
            hyper::header::HeaderValue::from_static("00000000-0000-0000-0000-000000000000"),
        );
        r
    }

    fn grant(&self, body: &[u8]) -> Response<Full<Bytes>> {
        match self.check_grant(body) {
            Ok(()) => {
                let token = format!("ya29.loadtest-{:032x}", rand_u128());
                {
                    let mut tokens = self.access_tokens.lock().unwrap_or_else(|p| p.into_inner());
                    if tokens.len() >= MAX_ACCESS_TOKENS {
                        tokens.clear();
                    }
                    tokens.insert(token.clone());
                }
                self.arrivals
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .grants += 1;
                reply(
                    200,
                    json!({"access_token": token, "expires_in": 3600, "token_type": "Bearer"}),
                )
            }
            Err(why) => {
                self.refuse(format!("FCM grant: {why}"));
                reply(
                    400,
                    json!({"error": "invalid_grant", "error_description": why}),
                )
            }
        }
    }

    fn check_grant(&self, body: &[u8]) -> Result<(), String> {
        let form: HashMap<String, String> = form_urlencoded(body);
        if form.get("grant_type").map(String::as_str) != Some(GRANT_TYPE) {
            return Err("grant_type must be the jwt-bearer URN".into());
        }
        let assertion = form.get("assertion").ok_or("no assertion")?;
        let header = jsonwebtoken::decode_header(assertion).map_err(|e| e.to_string())?;
        if header.alg != jsonwebtoken::Algorithm::RS256 {
            return Err(format!("the assertion must be RS256, not {:?}", header.alg));
        }
        let claims: Value = match &self.account_key {
            Some(key) => {
                let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
                v.set_audience(&[&self.token_uri]);
                v.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
                jsonwebtoken::decode::<Value>(assertion, key, &v)
                    .map_err(|e| format!("assertion: {e}"))?
                    .claims
            }
            None => {
                jsonwebtoken::dangerous::insecure_decode::<Value>(assertion)
                    .map_err(|e| format!("assertion: {e}"))?
                    .claims
            }
        };
        if claims["aud"].as_str() != Some(self.token_uri.as_str()) {
            return Err(format!("aud must be {}", self.token_uri));
        }
        let scope = claims["scope"].as_str().unwrap_or("");
        if !scope.split(' ').any(|s| s == SCOPE) {
            return Err("the scope must include firebase.messaging".into());
        }
        match (claims["iat"].as_u64(), claims["exp"].as_u64()) {
            (Some(iat), Some(exp)) if exp > iat && exp - iat <= 3600 => Ok(()),
            _ => Err("iat and exp must be at most an hour apart".into()),
        }
    }

    fn fcm(
        &self,
        at: Instant,
        parts: &hyper::http::request::Parts,
        project: &str,
        body: &[u8],
    ) -> Response<Full<Bytes>> {
        let bearer = parts
            .headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let known = bearer.is_some_and(|b| {
            self.access_tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(b)
        });
        if !known {
            self.refuse("FCM: no access token this sink issued".into());
            return google_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials.",
            );
        }
        let message = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|mut v| v.get_mut("message").map(Value::take));
        let Some(message) = message.filter(Value::is_object) else {
            self.refuse("FCM: no message".into());
            return google_error(400, "INVALID_ARGUMENT", "message is required");
        };
        let Some(device) = message["token"].as_str().filter(|t| !t.is_empty()) else {
            self.refuse("FCM: no message.token".into());
            return google_error(400, "INVALID_ARGUMENT", "message.token is required");
        };
        let data = message["data"].as_object();
        if let Some((k, _)) = data.and_then(|d| d.iter().find(|(_, v)| !v.is_string())) {
            self.refuse(format!("FCM: data value {k} is not a string"));
            return google_error(
                400,
                "INVALID_ARGUMENT",
                &format!("Invalid value at 'message.data[{k}].value' (TYPE_STRING)"),
            );
        }
        let key = data.and_then(|d| {
            let channel = d.get("channel")?.as_str()?;
            let offset = d.get("offset")?.as_str()?.parse::<u64>().ok()?;
            Some((channel, offset))
        });
        match key {
            Some((channel, offset)) => self.arrived(channel, offset, at, device),
            None => self.refuse("FCM: data without channel and offset".into()),
        }
        reply(
            200,
            json!({"name": format!("projects/{project}/messages/{:x}", rand_u128())}),
        )
    }
}

/// A random 128-bit number (ids and access tokens of the fake).
fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    // The system's generator fails only when it is unusable, and then an
    // all-zero id is still a valid one for a fake.
    let _ = aws_lc_rs::rand::fill(&mut b);
    u128::from_le_bytes(b)
}

/// The pairs of an `application/x-www-form-urlencoded` body.
fn form_urlencoded(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// A service-account JSON for a broker to send FCM pushes to a sink at
/// `sink` (`--fcm-service-account FILE --fcm-endpoint http://<sink>`): a
/// fresh RSA-2048 key, project [`PROJECT`], `token_uri` the sink's.
pub fn service_account(sink: SocketAddr) -> Result<String> {
    use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
    use base64::Engine;
    let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .map_err(|_| anyhow::anyhow!("could not generate an RSA key"))?;
    let der: Pkcs8V1Der<'_> = key
        .as_der()
        .map_err(|_| anyhow::anyhow!("could not encode the RSA key"))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    let account = json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "loadtest",
        "private_key": pem,
        "client_email": format!("loadtest@{PROJECT}.iam.gserviceaccount.com"),
        "token_uri": format!("http://{sink}/token"),
    });
    Ok(serde_json::to_string_pretty(&account)?)
}

/// The key to check grants with, from a service-account JSON.
fn account_public_key(account: &str) -> Result<jsonwebtoken::DecodingKey> {
    use aws_lc_rs::signature::KeyPair as _;
    use base64::Engine;
    let v: Value = serde_json::from_str(account).context("the service account is not JSON")?;
    let Some(pem) = v["private_key"].as_str() else {
        bail!("the service account has no private_key");
    };
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .context("the service account's private_key is not PEM")?;
    let key = aws_lc_rs::rsa::KeyPair::from_pkcs8(&der)
        .map_err(|e| anyhow::anyhow!("the service account's private_key: {e}"))?;
    Ok(jsonwebtoken::DecodingKey::from_rsa_der(
        key.public_key().as_ref(),
    ))
}

/// `loadtest fake-apns` / `fake-fcm`: serves the sink until `duration` has
/// passed or the process gets SIGINT/SIGTERM, with one line a second on
/// stderr, then reports what arrived.
pub async fn serve(
    listen: SocketAddr,
    account: Option<&str>,
    duration: Option<std::time::Duration>,
) -> Result<crate::report::Report> {
    // Before listening: a SIGTERM from then on is a clean stop.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let sink = Sink::start(listen, account).await?;
    tracing::info!(
        "fake provider on http://{listen}: APNs POST /3/device/{{token}}, FCM POST /token and \
         /v1/projects/{{project}}/messages:send"
    );
    let t0 = Instant::now();
    let stop = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    let mut last = 0;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {
                let (pushes, refused, grants) = sink.with(|a| (a.pushes(), a.refused, a.grants));
                eprintln!(
                    "{:>6.0} s  pushes {pushes} (+{}/s)  refused {refused}  grants {grants}",
                    t0.elapsed().as_secs_f64(),
                    pushes - last,
                );
                last = pushes;
            }
        }
    }
    let seen = sink.take();
    let mut r = crate::report::Report::new("fake-provider");
    r.number("seconds", "served for", t0.elapsed().as_secs_f64(), "s", 1);
    r.count("pushes", "pushes received", seen.pushes());
    let (first, last) =
        seen.by_key
            .values()
            .flatten()
            .fold((None::<Instant>, None::<Instant>), |(f, l), a| {
                (
                    Some(f.map_or(a.at, |f| f.min(a.at))),
                    Some(l.map_or(a.at, |l| l.max(a.at))),
                )
            });
    match (first, last) {
        (Some(f), Some(l)) if l > f => r.number(
            "pushes_per_second",
            "pushes per second, first to last",
            seen.pushes() as f64 / (l - f).as_secs_f64(),
            "/s",
            0,
        ),
        _ => r.missing("pushes_per_second", "pushes per second", "too few pushes"),
    }
    r.count(
        "pushes_duplicated",
        "pushes repeated for the same device, channel and offset",
        seen.duplicated(),
    );
    r.count(
        "sink_refused",
        "requests refused or unreadable",
        seen.refused,
    );
    r.count(
        "sink_untracked",
        "pushes past the first 1,000,000 keys (counted, not checked)",
        seen.untracked,
    );
    r.count("sink_grants", "FCM access tokens issued", seen.grants);
    if seen.duplicated() > 0 {
        r.violation(format!(
            "{} pushes arrived more than once for the same device",
            seen.duplicated()
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_bodies_decode() {
        let f = form_urlencoded(b"grant_type=urn%3Aietf%3Aparams&assertion=a.b.c&x=%zz+y&z=%4");
        assert_eq!(f["grant_type"], "urn:ietf:params");
        assert_eq!(f["assertion"], "a.b.c");
        assert_eq!(f["x"], "%zz y");
        assert_eq!(f["z"], "%4");
    }

    #[test]
    fn a_service_account_signs_grants_its_sink_accepts() {
        let sink: SocketAddr = "127.0.0.1:9".parse().expect("in a test");
        let account = service_account(sink).expect("in a test");
        let v: Value = serde_json::from_str(&account).expect("in a test");
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(
            v["private_key"].as_str().expect("in a test").as_bytes(),
        )
        .expect("in a test");
        let state = State {
            arrivals: Mutex::default(),
            access_tokens: Mutex::default(),
            token_uri: format!("http://{sink}/token"),
            account_key: Some(account_public_key(&account).expect("in a test")),
        };
        let grant = |claims: Value, key: &jsonwebtoken::EncodingKey| {
            let jwt = jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
                &claims,
                key,
            )
            .expect("in a test");
            state.check_grant(format!("grant_type={GRANT_TYPE}&assertion={jwt}").as_bytes())
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("in a test")
            .as_secs();
        let good = json!({"iss": v["client_email"], "aud": state.token_uri, "scope": SCOPE,
            "iat": now, "exp": now + 3600});
        assert_eq!(grant(good.clone(), &key), Ok(()));
        let mut wrong_scope = good.clone();
        wrong_scope["scope"] = json!("email");
        assert!(grant(wrong_scope, &key).is_err());
        let other = service_account(sink).expect("in a test");
        let other: Value = serde_json::from_str(&other).expect("in a test");
        let other_key = jsonwebtoken::EncodingKey::from_rsa_pem(
            other["private_key"].as_str().expect("in a test").as_bytes(),
        )
        .expect("in a test");
        assert!(grant(good, &other_key).is_err(), "signed by another key");
    }

    #[test]
    fn duplicates_are_counted_per_device() {
        let mut a = Arrivals::default();
        let at = Instant::now();
        let key = ("user:u".to_owned(), 1);
        for device in ["a", "b", "a"] {
            a.by_key.entry(key.clone()).or_default().push(Arrival {
                at,
                device: device.into(),
            });
        }
        assert_eq!(a.pushes(), 3);
        assert_eq!(a.duplicated(), 1);
    }
}
