//! A fake Web Push service (RFC 8030): HTTP/1.1 on 127.0.0.1 that checks
//! what a browser vendor's push service checks and then does what the
//! browser does — **decrypts** the message (RFC 8291 `aes128gcm`) with the
//! subscription's private key and auth secret.
//!
//! Checked, in order: `POST /push/{id}` of a known subscription (else 404);
//! `Authorization: vapid t=<JWT>, k=<key>` (else 401) with the key the
//! subscription was made for, when one was given (else 403) and an ES256
//! JWT that this key verifies, with `aud` the service's origin, `exp` in the
//! future and at most 24 hours away, `sub` a `mailto:` or `https:` URL (else
//! 403, RFC 8292 §4.2); a `TTL` (else 400); `Urgency` and `Topic` well
//! formed when present (else 400); `Content-Encoding: aes128gcm`; a body of
//! at most 4096 bytes (else 413) that decrypts and ends with the last-record
//! delimiter (else 400). Then scripted faults, then 201 with a `Location`.
//!
//! Subscriptions are made by [`FakeWebPush::subscribe`], which generates the
//! browser's P-256 key and auth secret like `PushManager.subscribe()`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use aws_lc_rs::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, ECDH_P256, PrivateKey, UnparsedPublicKey};
use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use super::server::{H2Server, Handler, Proto, Rule, response, take_fault, unix_now};

/// Largest message a push service must accept (RFC 8030 §7.2).
pub const MAX_MESSAGE: usize = 4096;

/// A subscription as the browser hands it to the web app.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The id in the endpoint's path.
    pub id: String,
    pub endpoint: String,
    /// base64url of the browser's public key (65 bytes).
    pub p256dh: String,
    /// base64url of the auth secret (16 bytes).
    pub auth: String,
}

impl Subscription {
    /// `PushSubscription.toJSON()`: the `token` of a `webpush` device.
    pub fn json(&self) -> Value {
        json!({"endpoint": self.endpoint, "keys": {"p256dh": self.p256dh, "auth": self.auth}})
    }
}

/// A scripted failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebPushFault {
    /// 410 Gone: the subscription expired or was unsubscribed.
    Gone,
    /// 404 Not Found.
    NotFound,
    /// 429 with a `Retry-After` (seconds).
    TooManyRequests { retry_after: Option<u64> },
    /// Any status.
    Status(u16),
}

/// An accepted, decrypted message.
#[derive(Debug, Clone)]
pub struct WebPushMessage {
    /// The subscription's id.
    pub subscription: String,
    /// Request headers, lower-case names.
    pub headers: HashMap<String, String>,
    /// The decrypted plaintext.
    pub plaintext: Vec<u8>,
    /// The plaintext as JSON (`Null` if it is not JSON).
    pub payload: Value,
    /// `TTL` in seconds.
    pub ttl: u64,
    /// The VAPID JWT's claims.
    pub claims: Value,
    pub at: Instant,
}

/// Any request answered.
#[derive(Debug, Clone)]
pub struct WebPushRequest {
    pub subscription: String,
    pub status: u16,
    /// Why it was refused, if it was.
    pub error: Option<String>,
    pub at: Instant,
}

struct Browser {
    key: PrivateKey,
    public: Vec<u8>,
    auth: [u8; 16],
}

#[derive(Default)]
struct Record {
    rules: Vec<Rule<WebPushFault>>,
    accepted: Vec<WebPushMessage>,
    requests: Vec<WebPushRequest>,
}

struct State {
    origin: Mutex<String>,
    /// The application-server key subscriptions are bound to, if given.
    server_key: Option<Vec<u8>>,
    browsers: Mutex<HashMap<String, Arc<Browser>>>,
    record: Mutex<Record>,
    accepted_count: watch::Sender<usize>,
    request_count: watch::Sender<usize>,
}

/// The fake push service. Stops on `Drop`.
pub struct FakeWebPush {
    server: H2Server<State>,
    state: Arc<State>,
}

impl std::fmt::Debug for FakeWebPush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeWebPush")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

impl FakeWebPush {
    /// Starts on 127.0.0.1 with a free port. `server_key`: the VAPID public
    /// key (65 bytes, uncompressed) subscriptions are made with, as a web
    /// app passes it as `applicationServerKey`; `None` accepts any key.
    pub async fn start(server_key: Option<Vec<u8>>) -> Result<FakeWebPush> {
        let state = Arc::new(State {
            origin: Mutex::new(String::new()),
            server_key,
            browsers: Mutex::new(HashMap::new()),
            record: Mutex::new(Record::default()),
            accepted_count: watch::Sender::new(0),
            request_count: watch::Sender::new(0),
        });
        let server = H2Server::start_speaking(Proto::Http1, state.clone()).await?;
        *state.origin.lock().unwrap() = format!("http://{}", server.addr());
        Ok(FakeWebPush { server, state })
    }

    /// `http://127.0.0.1:PORT`: the `aud` a VAPID JWT must name.
    pub fn origin(&self) -> String {
        self.state.origin.lock().unwrap().clone()
    }

    /// A new subscription, as `PushManager.subscribe()` makes one.
    pub fn subscribe(&self) -> Result<Subscription> {
        let key = PrivateKey::generate(&ECDH_P256).map_err(|_| anyhow::anyhow!("keygen"))?;
        let public = key
            .compute_public_key()
            .map_err(|_| anyhow::anyhow!("public key"))?
            .as_ref()
            .to_vec();
        let mut auth = [0u8; 16];
        aws_lc_rs::rand::fill(&mut auth).map_err(|_| anyhow::anyhow!("rand"))?;
        let mut id_bytes = [0u8; 12];
        aws_lc_rs::rand::fill(&mut id_bytes).map_err(|_| anyhow::anyhow!("rand"))?;
        let id = URL_SAFE_NO_PAD.encode(id_bytes);
        let sub = Subscription {
            endpoint: format!("{}/push/{id}", self.origin()),
            p256dh: URL_SAFE_NO_PAD.encode(&public),
            auth: URL_SAFE_NO_PAD.encode(auth),
            id: id.clone(),
        };
        self.state
            .browsers
            .lock()
            .unwrap()
            .insert(id, Arc::new(Browser { key, public, auth }));
        Ok(sub)
    }

    /// Messages for `subscription` fail with `fault`, `times` times or
    /// (`None`) for ever.
    pub fn fail(&self, subscription: &str, fault: WebPushFault, times: Option<usize>) {
        if times != Some(0) {
            self.state.record.lock().unwrap().rules.push(Rule {
                token: Some(subscription.to_owned()),
                remaining: times,
                fault,
            });
        }
    }

    /// Every accepted message, in arrival order.
    pub fn accepted(&self) -> Vec<WebPushMessage> {
        self.state.record.lock().unwrap().accepted.clone()
    }

    /// Every request answered, in arrival order.
    pub fn requests(&self) -> Vec<WebPushRequest> {
        self.state.record.lock().unwrap().requests.clone()
    }

    /// Waits until at least `n` messages were accepted; returns them all.
    pub async fn wait_accepted(&self, n: usize, timeout: Duration) -> Result<Vec<WebPushMessage>> {
        let mut rx = self.state.accepted_count.subscribe();
        if tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_err()
        {
            bail!(
                "fake Web Push: {} of {n} messages accepted after {timeout:?}; requests: {:?}",
                *rx.borrow(),
                self.requests()
            );
        }
        Ok(self.accepted())
    }

    /// Waits until at least `n` requests were answered; returns them all.
    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> Result<Vec<WebPushRequest>> {
        let mut rx = self.state.request_count.subscribe();
        if tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_err()
        {
            bail!(
                "fake Web Push: {} of {n} requests answered after {timeout:?}",
                *rx.borrow()
            );
        }
        Ok(self.requests())
    }
}

/// HKDF-SHA-256 (RFC 5869) for outputs up to 32 bytes, on HMAC: written
/// here apart from the broker's own (aws-lc-rs `hkdf`) on purpose.
fn hkdf(salt: &[u8], ikm: &[u8], info: &[u8], len: usize) -> Vec<u8> {
    let prk = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, salt), ikm);
    let mut t = info.to_vec();
    t.push(1);
    let okm = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref()), &t);
    okm.as_ref()[..len].to_vec()
}

/// What the browser does with a message (RFC 8291 §3.4, RFC 8188): the
/// plaintext, or why it cannot be had.
pub fn decrypt(
    ua_key: &PrivateKey,
    ua_public: &[u8],
    auth: &[u8],
    body: &[u8],
) -> Result<Vec<u8>, String> {
    if body.len() < 21 {
        return Err("shorter than the aes128gcm header".into());
    }
    let salt = &body[..16];
    let rs = u32::from_be_bytes([body[16], body[17], body[18], body[19]]) as usize;
    let idlen = body[20] as usize;
    if rs < 18 {
        return Err(format!("record size {rs} < 18"));
    }
    if idlen != 65 || body.len() < 21 + idlen {
        return Err(format!("key id of {idlen} bytes, not a P-256 public key"));
    }
    let as_public = &body[21..21 + idlen];
    let record = &body[21 + idlen..];
    if record.len() > rs {
        return Err("more than one record: a push message has exactly one".into());
    }
    if record.len() < 17 {
        return Err("record shorter than its tag".into());
    }
    let ecdh = agreement::agree(
        ua_key,
        UnparsedPublicKey::new(&ECDH_P256, as_public),
        "the key id is not a point on P-256".to_owned(),
        |secret| Ok(secret.to_vec()),
    )?;
    let key_info = [b"WebPush: info\0".as_slice(), ua_public, as_public].concat();
    let ikm = hkdf(auth, &ecdh, &key_info, 32);
    let cek = hkdf(salt, &ikm, b"Content-Encoding: aes128gcm\0", 16);
    let nonce = hkdf(salt, &ikm, b"Content-Encoding: nonce\0", 12);
    let key = UnboundKey::new(&AES_128_GCM, &cek).map_err(|_| "bad key".to_owned())?;
    let nonce = Nonce::try_assume_unique_for_key(&nonce).map_err(|_| "bad nonce".to_owned())?;
    let mut data = record.to_vec();
    let plain = LessSafeKey::new(key)
        .open_in_place(nonce, Aad::empty(), &mut data)
        .map_err(|_| "does not decrypt (wrong keys or corrupted)".to_owned())?;
    // Padding: the delimiter (2 for the last record) then zeros.
    let end = plain
        .iter()
        .rposition(|b| *b != 0)
        .ok_or("no padding delimiter")?;
    if plain[end] != 2 {
        return Err(format!(
            "padding delimiter {} is not the last record's (2)",
            plain[end]
        ));
    }
    Ok(plain[..end].to_vec())
}

/// The `t` and `k` of `vapid t=…, k=…`.
fn vapid_params(header: &str) -> Option<(String, String)> {
    let rest = header.strip_prefix("vapid ")?;
    let mut t = None;
    let mut k = None;
    for part in rest.split(',') {
        let (name, value) = part.trim().split_once('=')?;
        match name.trim() {
            "t" => t = Some(value.trim().to_owned()),
            "k" => k = Some(value.trim().to_owned()),
            _ => {}
        }
    }
    Some((t?, k?))
}

struct Refusal(u16, String);

fn refuse(status: u16, why: impl Into<String>) -> Refusal {
    Refusal(status, why.into())
}

impl State {
    fn check_vapid(&self, headers: &HashMap<String, String>) -> Result<Value, Refusal> {
        let auth = headers
            .get("authorization")
            .ok_or_else(|| refuse(401, "no Authorization"))?;
        let (t, k) = vapid_params(auth).ok_or_else(|| refuse(401, "not `vapid t=…, k=…`"))?;
        let key = URL_SAFE_NO_PAD
            .decode(&k)
            .map_err(|_| refuse(401, "k is not base64url"))?;
        if key.len() != 65 || key[0] != 4 {
            return Err(refuse(401, "k is not an uncompressed P-256 key"));
        }
        if let Some(expected) = &self.server_key
            && *expected != key
        {
            return Err(refuse(
                403,
                "k is not the key this subscription was made for",
            ));
        }
        let decoding = DecodingKey::from_ec_components(
            &URL_SAFE_NO_PAD.encode(&key[1..33]),
            &URL_SAFE_NO_PAD.encode(&key[33..]),
        )
        .map_err(|e| refuse(401, format!("k: {e}")))?;
        let mut v = Validation::new(Algorithm::ES256);
        v.leeway = 0;
        v.set_audience(&[self.origin.lock().unwrap().clone()]);
        v.set_required_spec_claims(&["exp", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Value>(&t, &decoding, &v)
            .map_err(|e| refuse(403, format!("VAPID JWT refused: {e}")))?
            .claims;
        let exp = claims["exp"].as_u64().unwrap_or(0);
        if exp > unix_now() + 24 * 3600 {
            return Err(refuse(403, "exp more than 24 hours ahead"));
        }
        let sub = claims["sub"].as_str().unwrap_or("");
        if !(sub.starts_with("mailto:") || sub.starts_with("https:")) {
            return Err(refuse(403, "sub is not a mailto: or https: URL"));
        }
        Ok(claims)
    }

    async fn answer(&self, req: Request<Incoming>) -> (String, Result<WebPushMessage, Refusal>) {
        let id = req
            .uri()
            .path()
            .strip_prefix("/push/")
            .unwrap_or("")
            .to_owned();
        let result = self.check(req, &id).await;
        (id, result)
    }

    async fn check(&self, req: Request<Incoming>, id: &str) -> Result<WebPushMessage, Refusal> {
        if req.method() != Method::POST {
            return Err(refuse(405, "not POST"));
        }
        let browser = self
            .browsers
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| refuse(404, "no such subscription"))?;
        let headers: HashMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    v.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let claims = self.check_vapid(&headers)?;
        let ttl: u64 = headers
            .get("ttl")
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| refuse(400, "no TTL"))?;
        if let Some(u) = headers.get("urgency")
            && !matches!(u.as_str(), "very-low" | "low" | "normal" | "high")
        {
            return Err(refuse(400, format!("bad Urgency {u:?}")));
        }
        if let Some(t) = headers.get("topic")
            && (t.is_empty()
                || t.len() > 32
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Err(refuse(400, format!("bad Topic {t:?}")));
        }
        if headers.get("content-encoding").map(String::as_str) != Some("aes128gcm") {
            return Err(refuse(400, "Content-Encoding is not aes128gcm"));
        }
        let body = req
            .into_body()
            .collect()
            .await
            .map_err(|_| refuse(400, "body unreadable"))?
            .to_bytes();
        if body.len() > MAX_MESSAGE {
            return Err(refuse(413, format!("{} bytes", body.len())));
        }
        let plaintext = decrypt(&browser.key, &browser.public, &browser.auth, &body)
            .map_err(|e| refuse(400, e))?;
        let payload = serde_json::from_slice(&plaintext).unwrap_or(Value::Null);
        Ok(WebPushMessage {
            subscription: id.to_owned(),
            headers,
            plaintext,
            payload,
            ttl,
            claims,
            at: Instant::now(),
        })
    }
}

impl Handler for State {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (id, result) = self.answer(req).await;
        let mut record = self.record.lock().unwrap();
        let (status, error, retry_after) = match result {
            Err(Refusal(status, why)) => (status, Some(why), None),
            Ok(message) => match take_fault(&mut record.rules, &id) {
                Some(WebPushFault::Gone) => (410, Some("gone (scripted)".into()), None),
                Some(WebPushFault::NotFound) => (404, Some("not found (scripted)".into()), None),
                Some(WebPushFault::TooManyRequests { retry_after }) => {
                    (429, Some("too many (scripted)".into()), retry_after)
                }
                Some(WebPushFault::Status(s)) => (s, Some("scripted".into()), None),
                None => {
                    record.accepted.push(message);
                    let n = record.accepted.len();
                    self.accepted_count.send_replace(n);
                    (201, None, None)
                }
            },
        };
        record.requests.push(WebPushRequest {
            subscription: id,
            status,
            error: error.clone(),
            at: Instant::now(),
        });
        let n = record.requests.len();
        drop(record);
        self.request_count.send_replace(n);
        let mut r = response(status, error.unwrap_or_default(), false);
        if status == 201
            && let Ok(v) = hyper::header::HeaderValue::try_from(format!("/message/{n}"))
        {
            r.headers_mut().insert(hyper::header::LOCATION, v);
        }
        if let Some(s) = retry_after {
            r.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from(s),
            );
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(s).unwrap()
    }

    /// RFC 8291 §5: the browser's side of the example decrypts to the
    /// example's plaintext.
    #[test]
    fn the_rfc_8291_example_decrypts() {
        let ua = PrivateKey::from_private_key(
            &ECDH_P256,
            &b64("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"),
        )
        .unwrap();
        let ua_public = b64(
            "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
        );
        let body = b64(
            "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN",
        );
        let auth = b64("BTBZMqHH6r4Tts7J_aSIgg");
        assert_eq!(
            decrypt(&ua, &ua_public, &auth, &body).unwrap(),
            b"When I grow up, I want to be a watermelon"
        );
        let mut tampered = body.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(decrypt(&ua, &ua_public, &auth, &tampered).is_err());
        assert!(decrypt(&ua, &ua_public, &[0u8; 16], &body).is_err());
    }
}
