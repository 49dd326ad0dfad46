//! A fake APNs: HTTP/2 cleartext on 127.0.0.1, checking what Apple checks
//! (ES256 provider JWT with the right `kid` and `iss`, not older than an
//! hour; hex device token; topic; push type; priority; payload) and
//! answering like Apple (`{"reason": …}` errors, `apns-id` on success).
//!
//! Failures are scriptable per token or for all requests
//! ([`FakeApns::fail`], [`FakeApns::fail_token`], [`FakeApns::unregister`]),
//! and the server can stop listening and come back
//! ([`FakeApns::stop_listening`], [`FakeApns::resume_listening`]).
//! Everything is recorded for assertions.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use super::server::{H2Server, Handler, Rule, response, take_fault, unix_now};

/// Largest payload accepted, in bytes.
pub const MAX_PAYLOAD: usize = 4096;

/// What the fake expects from the provider.
#[derive(Debug, Clone)]
pub struct FakeApnsConfig {
    /// SPKI PEM of the P-256 key the provider signs with.
    pub public_key_pem: String,
    pub key_id: String,
    pub team_id: String,
    /// The only `apns-topic` accepted.
    pub topic: String,
}

/// A scripted APNs failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApnsFault {
    /// 410 `Unregistered`.
    Unregistered,
    /// 400 `BadDeviceToken`.
    BadDeviceToken,
    /// 429 `TooManyRequests`, with a `retry-after` header (seconds).
    TooManyRequests { retry_after: Option<u64> },
    /// 500 `InternalServerError`.
    InternalServerError,
    /// 503 `ServiceUnavailable`, with a `retry-after` header (seconds).
    ServiceUnavailable { retry_after: Option<u64> },
    /// 403 `ExpiredProviderToken`.
    ExpiredProviderToken,
    /// Any status and reason.
    Status { status: u16, reason: String },
}

/// An accepted notification.
#[derive(Debug, Clone)]
pub struct ApnsNotification {
    pub token: String,
    /// Request headers, lower-case names (`authorization` included).
    pub headers: HashMap<String, String>,
    pub payload: Value,
    /// The `apns-id` answered (the request's, or one the fake made).
    pub apns_id: String,
    pub at: Instant,
}

/// Any request the fake answered.
#[derive(Debug, Clone)]
pub struct ApnsRequest {
    pub token: String,
    pub status: u16,
    pub reason: Option<String>,
    pub apns_id: Option<String>,
    pub at: Instant,
}

#[derive(Default)]
struct Record {
    rules: Vec<Rule<ApnsFault>>,
    accepted: Vec<ApnsNotification>,
    requests: Vec<ApnsRequest>,
    /// Every distinct bearer token seen.
    jwts: HashSet<String>,
    /// Verified tokens and their `iat` (verification is cached, as Apple
    /// does, so the fake keeps up with a load test).
    verified: HashMap<String, u64>,
    next_id: u64,
}

struct State {
    config: FakeApnsConfig,
    key: DecodingKey,
    record: Mutex<Record>,
    accepted_count: watch::Sender<usize>,
    request_count: watch::Sender<usize>,
}

/// The fake APNs server. Stops on `Drop`.
pub struct FakeApns {
    server: H2Server<State>,
    state: Arc<State>,
}

impl std::fmt::Debug for FakeApns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApns")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

impl FakeApns {
    /// Starts on 127.0.0.1 with a free port.
    pub async fn start(config: FakeApnsConfig) -> Result<FakeApns> {
        let key = DecodingKey::from_ec_pem(config.public_key_pem.as_bytes())
            .context("public_key_pem is not an EC public key")?;
        let state = Arc::new(State {
            config,
            key,
            record: Mutex::new(Record::default()),
            accepted_count: watch::Sender::new(0),
            request_count: watch::Sender::new(0),
        });
        let server = H2Server::start(state.clone()).await?;
        Ok(FakeApns { server, state })
    }

    /// The base URL, `http://127.0.0.1:PORT` (for `--apns-endpoint`).
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// TCP connections accepted so far (HTTP/2 multiplexes: one per client).
    pub fn connections(&self) -> usize {
        self.server.connections()
    }

    /// The next `times` requests (for any token) fail with `fault`.
    pub fn fail(&self, fault: ApnsFault, times: usize) {
        if times > 0 {
            self.add_rule(None, fault, Some(times));
        }
    }

    /// Requests for `token` fail with `fault`, `times` times or (`None`)
    /// for ever. Token rules win over global ones.
    pub fn fail_token(&self, token: &str, fault: ApnsFault, times: Option<usize>) {
        if times != Some(0) {
            self.add_rule(Some(token.to_owned()), fault, times);
        }
    }

    /// `token` is answered 410 `Unregistered` from now on.
    pub fn unregister(&self, token: &str) {
        self.fail_token(token, ApnsFault::Unregistered, None);
    }

    /// Removes every scripted failure.
    pub fn clear_faults(&self) {
        self.state.record.lock().unwrap().rules.clear();
    }

    fn add_rule(&self, token: Option<String>, fault: ApnsFault, remaining: Option<usize>) {
        self.state.record.lock().unwrap().rules.push(Rule {
            token,
            remaining,
            fault,
        });
    }

    /// Stops listening and drops open connections: connections are refused
    /// until [`FakeApns::resume_listening`].
    pub async fn stop_listening(&self) {
        self.server.stop().await;
    }

    /// Listens again on the same port.
    pub async fn resume_listening(&self) -> Result<()> {
        self.server.resume().await
    }

    /// Every accepted notification, in arrival order.
    pub fn accepted(&self) -> Vec<ApnsNotification> {
        self.state.record.lock().unwrap().accepted.clone()
    }

    /// Every request answered (accepted or not), in arrival order.
    pub fn requests(&self) -> Vec<ApnsRequest> {
        self.state.record.lock().unwrap().requests.clone()
    }

    /// How many different provider JWTs have been presented.
    pub fn distinct_jwts(&self) -> usize {
        self.state.record.lock().unwrap().jwts.len()
    }

    /// Accepted notifications per `apns-id` (to check exactly-once).
    pub fn accepted_per_id(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for n in self.state.record.lock().unwrap().accepted.iter() {
            *out.entry(n.apns_id.clone()).or_default() += 1;
        }
        out
    }

    /// Waits until at least `n` notifications were accepted; returns them.
    pub async fn wait_accepted(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<ApnsNotification>> {
        let mut rx = self.state.accepted_count.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_ok();
        if !waited {
            bail!(
                "fake APNs: {} of {n} notifications accepted after {timeout:?}",
                *rx.borrow()
            );
        }
        Ok(self.accepted())
    }

    /// Waits until at least `n` requests were answered; returns them.
    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> Result<Vec<ApnsRequest>> {
        let mut rx = self.state.request_count.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_ok();
        if !waited {
            bail!(
                "fake APNs: {} of {n} requests answered after {timeout:?}",
                *rx.borrow()
            );
        }
        Ok(self.requests())
    }
}

/// An answer before it is recorded.
struct Answer {
    status: u16,
    reason: Option<String>,
    retry_after: Option<u64>,
}

impl Answer {
    fn error(status: u16, reason: &str) -> Self {
        Answer {
            status,
            reason: Some(reason.to_owned()),
            retry_after: None,
        }
    }
}

impl From<ApnsFault> for Answer {
    fn from(fault: ApnsFault) -> Self {
        match fault {
            ApnsFault::Unregistered => Answer::error(410, "Unregistered"),
            ApnsFault::BadDeviceToken => Answer::error(400, "BadDeviceToken"),
            ApnsFault::TooManyRequests { retry_after } => Answer {
                retry_after,
                ..Answer::error(429, "TooManyRequests")
            },
            ApnsFault::InternalServerError => Answer::error(500, "InternalServerError"),
            ApnsFault::ServiceUnavailable { retry_after } => Answer {
                retry_after,
                ..Answer::error(503, "ServiceUnavailable")
            },
            ApnsFault::ExpiredProviderToken => Answer::error(403, "ExpiredProviderToken"),
            ApnsFault::Status { status, reason } => Answer::error(status, &reason),
        }
    }
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts.iter().map(|p| p.len()).eq([8usize, 4, 4, 4, 12])
        && parts
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl State {
    /// Verifies the provider JWT; `Err(reason)` as Apple would say it.
    fn check_jwt(&self, record: &mut Record, jwt: &str) -> Result<(), &'static str> {
        record.jwts.insert(jwt.to_owned());
        let iat = match record.verified.get(jwt) {
            Some(iat) => *iat,
            None => {
                if jwt.contains('=') {
                    // Base64url without padding only (RFC 7515).
                    return Err("InvalidProviderToken");
                }
                let header =
                    jsonwebtoken::decode_header(jwt).map_err(|_| "InvalidProviderToken")?;
                if header.alg != Algorithm::ES256
                    || header.kid.as_deref() != Some(self.config.key_id.as_str())
                {
                    return Err("InvalidProviderToken");
                }
                let mut validation = Validation::new(Algorithm::ES256);
                validation.required_spec_claims = HashSet::new();
                validation.validate_exp = false;
                let data = jsonwebtoken::decode::<Value>(jwt, &self.key, &validation)
                    .map_err(|_| "InvalidProviderToken")?;
                if data.claims["iss"].as_str() != Some(self.config.team_id.as_str()) {
                    return Err("InvalidProviderToken");
                }
                let iat = data.claims["iat"].as_u64().ok_or("InvalidProviderToken")?;
                record.verified.insert(jwt.to_owned(), iat);
                iat
            }
        };
        let now = unix_now();
        if iat > now + 60 {
            return Err("InvalidProviderToken");
        }
        if now.saturating_sub(iat) > 3600 {
            return Err("ExpiredProviderToken");
        }
        Ok(())
    }

    fn answer(
        &self,
        record: &mut Record,
        parts: &hyper::http::request::Parts,
        token: &str,
        body: &[u8],
    ) -> Result<Value, Answer> {
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let auth = header("authorization").ok_or(Answer::error(403, "MissingProviderToken"))?;
        let jwt = auth
            .strip_prefix("bearer ")
            .or_else(|| auth.strip_prefix("Bearer "))
            .ok_or(Answer::error(403, "InvalidProviderToken"))?;
        self.check_jwt(record, jwt)
            .map_err(|reason| Answer::error(403, reason))?;
        if token.is_empty()
            || !token.len().is_multiple_of(2)
            || !token.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(Answer::error(400, "BadDeviceToken"));
        }
        match header("apns-topic") {
            None => return Err(Answer::error(400, "MissingTopic")),
            Some(t) if t != self.config.topic => return Err(Answer::error(400, "TopicDisallowed")),
            Some(_) => {}
        }
        let push_type = header("apns-push-type").ok_or(Answer::error(400, "InvalidPushType"))?;
        if !matches!(
            push_type,
            "alert"
                | "background"
                | "voip"
                | "complication"
                | "fileprovider"
                | "mdm"
                | "liveactivity"
                | "location"
                | "pushtotalk"
        ) {
            return Err(Answer::error(400, "InvalidPushType"));
        }
        match header("apns-priority") {
            None | Some("10") if push_type == "background" => {
                return Err(Answer::error(400, "BadPriority"));
            }
            None | Some("1" | "5" | "10") => {}
            Some(_) => return Err(Answer::error(400, "BadPriority")),
        }
        if header("apns-id").is_some_and(|id| !is_uuid(id)) {
            return Err(Answer::error(400, "BadMessageId"));
        }
        if header("apns-expiration").is_some_and(|e| e.parse::<u64>().is_err()) {
            return Err(Answer::error(400, "BadExpirationDate"));
        }
        if header("apns-collapse-id").is_some_and(|c| c.len() > 64) {
            return Err(Answer::error(400, "BadCollapseId"));
        }
        if body.is_empty() {
            return Err(Answer::error(400, "PayloadEmpty"));
        }
        if body.len() > MAX_PAYLOAD {
            return Err(Answer::error(413, "PayloadTooLarge"));
        }
        let payload: Value =
            serde_json::from_slice(body).map_err(|_| Answer::error(400, "BadPayload"))?;
        if !payload.get("aps").is_some_and(Value::is_object) {
            return Err(Answer::error(400, "BadPayload"));
        }
        if let Some(fault) = take_fault(&mut record.rules, token) {
            return Err(fault.into());
        }
        Ok(payload)
    }
}

impl Handler for State {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return response(400, Bytes::new(), false),
        };
        let path = parts.uri.path().to_owned();
        let Some(token) = path.strip_prefix("/3/device/").map(str::to_owned) else {
            return reason_response(404, "BadPath", None, None);
        };
        if parts.method != Method::POST {
            return reason_response(405, "MethodNotAllowed", None, None);
        }
        let at = Instant::now();
        let mut record = self.record.lock().unwrap();
        let result = self.answer(&mut record, &parts, &token, &body);
        let requested_id = parts
            .headers
            .get("apns-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (answer, apns_id) = match result {
            Ok(payload) => {
                let apns_id = requested_id.clone().unwrap_or_else(|| {
                    record.next_id += 1;
                    format!("00000000-0000-4000-8000-{:012x}", record.next_id)
                });
                let headers = parts
                    .headers
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                    .collect();
                record.accepted.push(ApnsNotification {
                    token: token.clone(),
                    headers,
                    payload,
                    apns_id: apns_id.clone(),
                    at,
                });
                let n = record.accepted.len();
                self.accepted_count.send_replace(n);
                (
                    Answer {
                        status: 200,
                        reason: None,
                        retry_after: None,
                    },
                    apns_id,
                )
            }
            Err(answer) => (answer, requested_id.clone().unwrap_or_default()),
        };
        record.requests.push(ApnsRequest {
            token,
            status: answer.status,
            reason: answer.reason.clone(),
            apns_id: requested_id,
            at,
        });
        let n = record.requests.len();
        drop(record);
        self.request_count.send_replace(n);
        reason_response(
            answer.status,
            answer.reason.as_deref().unwrap_or(""),
            answer.retry_after,
            Some(&apns_id),
        )
    }
}

fn reason_response(
    status: u16,
    reason: &str,
    retry_after: Option<u64>,
    apns_id: Option<&str>,
) -> Response<Full<Bytes>> {
    let mut res = if status == 200 {
        response(200, Bytes::new(), false)
    } else {
        let mut body = json!({ "reason": reason });
        if status == 410 {
            body["timestamp"] = json!(unix_now() * 1000);
        }
        response(status, body.to_string(), true)
    };
    let headers = res.headers_mut();
    if let Some(id) = apns_id.filter(|id| !id.is_empty())
        && let Ok(v) = id.parse()
    {
        headers.insert("apns-id", v);
    }
    if let Some(secs) = retry_after
        && let Ok(v) = secs.to_string().parse()
    {
        headers.insert("retry-after", v);
    }
    res
}
