//! A fake FCM (HTTP v1) with its OAuth2 token endpoint, HTTP/2 cleartext on
//! 127.0.0.1:
//! - `POST /token`: the JWT-bearer grant. The assertion must be RS256,
//!   signed by the service account's key, with `iss` = client email, `aud`
//!   = this token URI, a `scope` naming firebase.messaging, and `exp` at most
//!   an hour after `iat`; answers `{"access_token", "expires_in": 3600,
//!   "token_type": "Bearer"}`, else 400 `{"error": "invalid_grant"}`.
//! - `POST /v1/projects/{project}/messages:send`: the bearer must be an
//!   access token it issued (else 401 `UNAUTHENTICATED`); the message must
//!   have a `token` and only string `data` values (else 400
//!   `INVALID_ARGUMENT`); answers `{"name": "projects/{p}/messages/{id}"}`.
//!
//! Failures are scriptable ([`FakeFcm::fail`], [`FakeFcm::fail_token`],
//! [`FakeFcm::unregister`], [`FakeFcm::revoke_access_tokens`]); errors have
//! Google's JSON shape. Everything is recorded for assertions.

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

use super::keys;
use super::server::{H2Server, Handler, Rule, response, take_fault, unix_now};

/// The grant type of the JWT-bearer flow.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The scope FCM needs.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// What the fake expects from the sender.
#[derive(Debug, Clone)]
pub struct FakeFcmConfig {
    /// SPKI PEM of the service account's RSA key.
    pub public_key_pem: String,
    pub client_email: String,
    pub project_id: String,
}

impl FakeFcmConfig {
    /// Expects [`keys::CLIENT_EMAIL`] in project [`keys::PROJECT_ID`].
    pub fn new(public_key_pem: impl Into<String>) -> Self {
        Self {
            public_key_pem: public_key_pem.into(),
            client_email: keys::CLIENT_EMAIL.into(),
            project_id: keys::PROJECT_ID.into(),
        }
    }
}

/// A scripted FCM failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FcmFault {
    /// 404 `NOT_FOUND` with errorCode `UNREGISTERED`.
    Unregistered,
    /// 429 `RESOURCE_EXHAUSTED` / `QUOTA_EXCEEDED`.
    TooManyRequests { retry_after: Option<u64> },
    /// 500 `INTERNAL`.
    Internal { retry_after: Option<u64> },
    /// 503 `UNAVAILABLE`.
    Unavailable { retry_after: Option<u64> },
    /// 401 `UNAUTHENTICATED`.
    Unauthenticated,
    /// Any status, `error.status` and `errorCode`.
    Status {
        status: u16,
        error_status: String,
        error_code: String,
    },
}

/// An accepted message.
#[derive(Debug, Clone)]
pub struct FcmMessage {
    /// `message.token`.
    pub token: String,
    /// The whole `message` object.
    pub message: Value,
    /// The `name` answered.
    pub name: String,
    pub at: Instant,
}

/// Any `messages:send` request the fake answered.
#[derive(Debug, Clone)]
pub struct FcmRequest {
    pub token: Option<String>,
    pub status: u16,
    /// `errorCode` or `status` of the error answered.
    pub error: Option<String>,
    pub at: Instant,
}

#[derive(Default)]
struct Record {
    rules: Vec<Rule<FcmFault>>,
    accepted: Vec<FcmMessage>,
    requests: Vec<FcmRequest>,
    access_tokens: HashSet<String>,
    grants: usize,
    refused_grants: usize,
    next_id: u64,
}

struct State {
    config: FakeFcmConfig,
    key: DecodingKey,
    token_uri: String,
    record: Mutex<Record>,
    accepted_count: watch::Sender<usize>,
    request_count: watch::Sender<usize>,
}

/// The fake FCM server. Stops on `Drop`.
pub struct FakeFcm {
    server: H2Server<State>,
    state: Arc<State>,
}

impl std::fmt::Debug for FakeFcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeFcm")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

impl FakeFcm {
    /// Starts on 127.0.0.1 with a free port.
    pub async fn start(config: FakeFcmConfig) -> Result<FakeFcm> {
        let key = DecodingKey::from_rsa_pem(config.public_key_pem.as_bytes())
            .context("public_key_pem is not an RSA public key")?;
        // The token URI names the port, so bind first, then build the state.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            token_uri: format!("http://{addr}/token"),
            config,
            key,
            record: Mutex::new(Record::default()),
            accepted_count: watch::Sender::new(0),
            request_count: watch::Sender::new(0),
        });
        let server = H2Server::start_on(listener, state.clone())?;
        Ok(FakeFcm { server, state })
    }

    /// The base URL, `http://127.0.0.1:PORT` (for `--fcm-endpoint`).
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// The OAuth2 token endpoint (the service account's `token_uri`).
    pub fn token_uri(&self) -> String {
        self.state.token_uri.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// TCP connections accepted so far (HTTP/2 multiplexes: one per client).
    pub fn connections(&self) -> usize {
        self.server.connections()
    }

    /// A service-account JSON document for this fake, signed with
    /// `private_key_pem` (the pair of the configured public key).
    pub fn service_account_json(&self, private_key_pem: &str) -> String {
        keys::service_account_json(
            &self.state.config.project_id,
            &self.state.config.client_email,
            &self.state.token_uri,
            private_key_pem,
        )
    }

    /// The next `times` sends (for any token) fail with `fault`.
    pub fn fail(&self, fault: FcmFault, times: usize) {
        if times > 0 {
            self.add_rule(None, fault, Some(times));
        }
    }

    /// Sends to `token` fail with `fault`, `times` times or (`None`) for
    /// ever. Token rules win over global ones.
    pub fn fail_token(&self, token: &str, fault: FcmFault, times: Option<usize>) {
        if times != Some(0) {
            self.add_rule(Some(token.to_owned()), fault, times);
        }
    }

    /// `token` is answered 404 `UNREGISTERED` from now on.
    pub fn unregister(&self, token: &str) {
        self.fail_token(token, FcmFault::Unregistered, None);
    }

    /// Removes every scripted failure.
    pub fn clear_faults(&self) {
        self.state.record.lock().unwrap().rules.clear();
    }

    /// Every access token issued so far is refused from now on (401).
    pub fn revoke_access_tokens(&self) {
        self.state.record.lock().unwrap().access_tokens.clear();
    }

    fn add_rule(&self, token: Option<String>, fault: FcmFault, remaining: Option<usize>) {
        self.state.record.lock().unwrap().rules.push(Rule {
            token,
            remaining,
            fault,
        });
    }

    /// Stops listening and drops open connections.
    pub async fn stop_listening(&self) {
        self.server.stop().await;
    }

    /// Listens again on the same port.
    pub async fn resume_listening(&self) -> Result<()> {
        self.server.resume().await
    }

    /// Access tokens issued (successful grants).
    pub fn grants(&self) -> usize {
        self.state.record.lock().unwrap().grants
    }

    /// Grants refused (`invalid_grant`).
    pub fn refused_grants(&self) -> usize {
        self.state.record.lock().unwrap().refused_grants
    }

    /// Every accepted message, in arrival order.
    pub fn accepted(&self) -> Vec<FcmMessage> {
        self.state.record.lock().unwrap().accepted.clone()
    }

    /// Every `messages:send` request answered, in arrival order.
    pub fn requests(&self) -> Vec<FcmRequest> {
        self.state.record.lock().unwrap().requests.clone()
    }

    /// Waits until at least `n` messages were accepted; returns them.
    pub async fn wait_accepted(&self, n: usize, timeout: Duration) -> Result<Vec<FcmMessage>> {
        let mut rx = self.state.accepted_count.subscribe();
        if tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_err()
        {
            bail!(
                "fake FCM: {} of {n} messages accepted after {timeout:?}",
                *rx.borrow()
            );
        }
        Ok(self.accepted())
    }

    /// Waits until at least `n` sends were answered; returns them.
    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> Result<Vec<FcmRequest>> {
        let mut rx = self.state.request_count.subscribe();
        if tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_err()
        {
            bail!(
                "fake FCM: {} of {n} requests answered after {timeout:?}",
                *rx.borrow()
            );
        }
        Ok(self.requests())
    }
}

/// Google's error JSON.
fn google_error(status: u16, error_status: &str, error_code: Option<&str>, message: &str) -> Value {
    let mut error = json!({ "code": status, "message": message, "status": error_status });
    if let Some(code) = error_code {
        error["details"] = json!([{
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": code,
        }]);
    }
    json!({ "error": error })
}

struct Failure {
    status: u16,
    body: Value,
    retry_after: Option<u64>,
    label: String,
}

impl Failure {
    fn new(status: u16, error_status: &str, error_code: Option<&str>, message: &str) -> Self {
        Failure {
            status,
            body: google_error(status, error_status, error_code, message),
            retry_after: None,
            label: error_code.unwrap_or(error_status).to_owned(),
        }
    }

    fn invalid(message: &str) -> Self {
        Failure::new(400, "INVALID_ARGUMENT", Some("INVALID_ARGUMENT"), message)
    }

    fn retry_after(mut self, secs: Option<u64>) -> Self {
        self.retry_after = secs;
        self
    }
}

impl From<FcmFault> for Failure {
    fn from(fault: FcmFault) -> Self {
        match fault {
            FcmFault::Unregistered => Failure::new(
                404,
                "NOT_FOUND",
                Some("UNREGISTERED"),
                "Requested entity was not found.",
            ),
            FcmFault::TooManyRequests { retry_after } => Failure::new(
                429,
                "RESOURCE_EXHAUSTED",
                Some("QUOTA_EXCEEDED"),
                "Quota exceeded.",
            )
            .retry_after(retry_after),
            FcmFault::Internal { retry_after } => {
                Failure::new(500, "INTERNAL", Some("INTERNAL"), "Internal error.")
                    .retry_after(retry_after)
            }
            FcmFault::Unavailable { retry_after } => Failure::new(
                503,
                "UNAVAILABLE",
                Some("UNAVAILABLE"),
                "The service is currently unavailable.",
            )
            .retry_after(retry_after),
            FcmFault::Unauthenticated => unauthenticated(),
            FcmFault::Status {
                status,
                error_status,
                error_code,
            } => Failure::new(
                status,
                &error_status,
                Some(&error_code),
                "Scripted failure.",
            ),
        }
    }
}

fn unauthenticated() -> Failure {
    Failure::new(
        401,
        "UNAUTHENTICATED",
        None,
        "Request had invalid authentication credentials.",
    )
}

/// Decodes `application/x-www-form-urlencoded`.
fn parse_form(body: &[u8]) -> HashMap<String, String> {
    fn hex(b: u8) -> Option<u8> {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => match (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(h), Some(l)) => {
                        out.push(h * 16 + l);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                },
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

impl State {
    /// Checks a grant; `Err(description)` for `invalid_grant`.
    fn check_grant(&self, form: &HashMap<String, String>) -> Result<(), String> {
        if form.get("grant_type").map(String::as_str) != Some(GRANT_TYPE) {
            return Err("grant_type must be the jwt-bearer URN".into());
        }
        let assertion = form.get("assertion").ok_or("no assertion")?;
        let header = jsonwebtoken::decode_header(assertion).map_err(|e| e.to_string())?;
        if header.alg != Algorithm::RS256 {
            return Err(format!("assertion must be RS256, not {:?}", header.alg));
        }
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[&self.token_uri]);
        validation.set_issuer(&[&self.config.client_email]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
        let claims = jsonwebtoken::decode::<Value>(assertion, &self.key, &validation)
            .map_err(|e| format!("assertion: {e}"))?
            .claims;
        let scope = claims["scope"].as_str().unwrap_or("");
        if !scope.split(' ').any(|s| s == SCOPE) {
            return Err("scope must include firebase.messaging".into());
        }
        let iat = claims["iat"].as_u64().ok_or("iat")?;
        let exp = claims["exp"].as_u64().ok_or("exp")?;
        if exp > iat + 3600 {
            return Err("exp is more than an hour after iat".into());
        }
        if iat > unix_now() + 60 {
            return Err("iat is in the future".into());
        }
        Ok(())
    }

    fn token_endpoint(&self, body: &[u8]) -> Response<Full<Bytes>> {
        let form = parse_form(body);
        let mut record = self.record.lock().unwrap();
        match self.check_grant(&form) {
            Ok(()) => {
                record.grants += 1;
                record.next_id += 1;
                let token = format!("ya29.fake-{}-{}", record.grants, record.next_id);
                record.access_tokens.insert(token.clone());
                let body =
                    json!({"access_token": token, "expires_in": 3600, "token_type": "Bearer"});
                response(200, body.to_string(), true)
            }
            Err(description) => {
                record.refused_grants += 1;
                let body = json!({"error": "invalid_grant", "error_description": description});
                response(400, body.to_string(), true)
            }
        }
    }

    fn send(
        &self,
        record: &mut Record,
        parts: &hyper::http::request::Parts,
        project: &str,
        body: &[u8],
    ) -> (Option<String>, Result<Value, Failure>) {
        let bearer = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        if !bearer.is_some_and(|b| record.access_tokens.contains(b)) {
            return (None, Err(unauthenticated()));
        }
        if project != self.config.project_id {
            return (
                None,
                Err(Failure::new(
                    403,
                    "PERMISSION_DENIED",
                    Some("SENDER_ID_MISMATCH"),
                    "Permission denied.",
                )),
            );
        }
        let Ok(request) = serde_json::from_slice::<Value>(body) else {
            return (
                None,
                Err(Failure::invalid("Invalid JSON payload received.")),
            );
        };
        let Some(message) = request.get("message").filter(|m| m.is_object()) else {
            return (None, Err(Failure::invalid("message is required")));
        };
        let Some(token) = message["token"].as_str().filter(|t| !t.is_empty()) else {
            return (None, Err(Failure::invalid("message.token is required")));
        };
        let token = token.to_owned();
        let check = || -> Result<(), Failure> {
            match message.get("data") {
                None => {}
                Some(Value::Object(data)) => {
                    if let Some((k, _)) = data.iter().find(|(_, v)| !v.is_string()) {
                        return Err(Failure::invalid(&format!(
                            "Invalid value at 'message.data[{k}].value' (TYPE_STRING)"
                        )));
                    }
                }
                Some(_) => return Err(Failure::invalid("message.data must be a map")),
            }
            if let Some(n) = message.get("notification")
                && !(n.is_object()
                    && ["title", "body"]
                        .iter()
                        .all(|f| n.get(*f).is_none_or(Value::is_string)))
            {
                return Err(Failure::invalid("message.notification is invalid"));
            }
            if let Some(a) = message.get("android") {
                if !a["priority"].is_null()
                    && !matches!(a["priority"].as_str(), Some("HIGH" | "NORMAL"))
                {
                    return Err(Failure::invalid("android.priority is invalid"));
                }
                if let Some(ttl) = a.get("ttl") {
                    let ok = ttl
                        .as_str()
                        .and_then(|t| t.strip_suffix('s'))
                        .is_some_and(|n| n.parse::<f64>().is_ok());
                    if !ok {
                        return Err(Failure::invalid("android.ttl is invalid"));
                    }
                }
            }
            Ok(())
        };
        if let Err(f) = check() {
            return (Some(token), Err(f));
        }
        if let Some(fault) = take_fault(&mut record.rules, &token) {
            return (Some(token), Err(fault.into()));
        }
        (Some(token), Ok(message.clone()))
    }
}

impl Handler for State {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return response(400, Bytes::new(), false),
        };
        if parts.method != Method::POST {
            return response(405, Bytes::new(), false);
        }
        let path = parts.uri.path().to_owned();
        if path == "/token" {
            return self.token_endpoint(&body);
        }
        let Some(project) = path
            .strip_prefix("/v1/projects/")
            .and_then(|p| p.strip_suffix("/messages:send"))
        else {
            let body = google_error(404, "NOT_FOUND", None, "Not found.");
            return response(404, body.to_string(), true);
        };
        let at = Instant::now();
        let mut record = self.record.lock().unwrap();
        let (token, result) = self.send(&mut record, &parts, project, &body);
        let (status, error, res) = match result {
            Ok(message) => {
                record.next_id += 1;
                let name = format!(
                    "projects/{}/messages/0:{}",
                    self.config.project_id, record.next_id
                );
                record.accepted.push(FcmMessage {
                    token: token.clone().unwrap_or_default(),
                    message,
                    name: name.clone(),
                    at,
                });
                let n = record.accepted.len();
                self.accepted_count.send_replace(n);
                (
                    200,
                    None,
                    response(200, json!({ "name": name }).to_string(), true),
                )
            }
            Err(f) => {
                let mut res = response(f.status, f.body.to_string(), true);
                if let Some(secs) = f.retry_after
                    && let Ok(v) = secs.to_string().parse()
                {
                    res.headers_mut().insert("retry-after", v);
                }
                (f.status, Some(f.label), res)
            }
        };
        record.requests.push(FcmRequest {
            token,
            status,
            error,
            at,
        });
        let n = record.requests.len();
        drop(record);
        self.request_count.send_replace(n);
        res
    }
}

#[cfg(test)]
mod tests {
    use super::parse_form;

    #[test]
    fn form_decoding() {
        let f = parse_form(b"grant_type=urn%3Aietf%3Aparams&assertion=a.b-c_d&x=1+2&bad=%zz");
        assert_eq!(f["grant_type"], "urn:ietf:params");
        assert_eq!(f["assertion"], "a.b-c_d");
        assert_eq!(f["x"], "1 2");
        assert_eq!(f["bad"], "%zz");
    }
}
