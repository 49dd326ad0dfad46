//! The backend HTTP API (PROTOCOL.md §10) on the api listener: publishing
//! (single, batch, idempotent), channel history, health, readiness and
//! Prometheus metrics. JSON in and out; errors are `{error: {code, message}}`.

pub mod serve;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::json_text::{compact_json, json_depth, numbers_in_range};
use serde_json::{Value, json};
use tether_protocol::{ChannelName, Encoding, Epoch, ErrorCode, MAX_DEPTH, Offset};

use crate::cluster::{Broker, BrokerError, HistoryRead, Publish};
use crate::lifecycle::Lifecycle;
use crate::metrics::{Metrics, SourceLabel};
use crate::push::Push;

/// Largest API request body (a batch of many publications).
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Most publications in one batch.
const MAX_BATCH: usize = 1000;

/// An API error: HTTP status from its code, JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// A publication that went through although the request failed (its
    /// push could not be arranged): `error.published` in the answer.
    pub published: Option<PublishAnswer>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            published: None,
        }
    }

    fn body(&self) -> Value {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(p) = &self.published {
            error["published"] = serde_json::to_value(p).unwrap_or(Value::Null);
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body())).into_response()
    }
}

/// axum's own rejections (a query, path or body it could not take) answer
/// in the API's JSON error shape too, with their status.
fn rejected(status: StatusCode, text: String) -> ApiError {
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::TooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::BAD_REQUEST => ErrorCode::BadRequest,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::BadRequest,
    };
    ApiError::new(code, text)
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        rejected(r.status(), r.body_text())
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(r: axum::extract::rejection::PathRejection) -> Self {
        rejected(r.status(), r.body_text())
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(r: axum::extract::rejection::BytesRejection) -> Self {
        let status = r.status();
        let mut e = rejected(status, r.body_text());
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            e.message = format!("request body over the limit of {MAX_BODY} bytes");
        }
        e
    }
}

type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;
type PathArg = Result<Path<String>, axum::extract::rejection::PathRejection>;

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        tracing::warn!(error = %e, "broker error");
        ApiError::new(e.code(), e.to_string())
    }
}

/// The settings the API reads.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub api_key: Option<crate::config::Secret<String>>,
    /// Requests/s per API key (`--api-rate`); `None`: no limit.
    pub api_rate: Option<u32>,
    /// Time for a whole request (`--api-request-timeout`).
    pub request_timeout: std::time::Duration,
    pub max_message_size: usize,
    pub history_size: usize,
}

impl ApiConfig {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self {
            api_key: c.api_key.clone(),
            api_rate: c.api_rate,
            request_timeout: c.api_request_timeout,
            max_message_size: c.max_message_size,
            history_size: c.history_size,
        }
    }
}

/// What the API reaches: the broker (publish, history), push (devices and
/// the offline fallback), metrics and readiness.
#[derive(Clone)]
pub struct Handles {
    pub broker: Arc<dyn Broker>,
    pub push: Push,
    pub registry: Arc<prometheus_client::registry::Registry>,
    pub metrics: Metrics,
    pub lifecycle: Arc<Lifecycle>,
    pub config: ApiConfig,
}

type AppState = Arc<Handles>;

/// Builds the API router.
pub fn router(handles: Handles) -> Router {
    let state: AppState = Arc::new(handles);
    let v1 = Router::new()
        .route("/v1/publish", post(publish))
        .route("/v1/publish/batch", post(publish_batch))
        .route("/v1/channels/{channel}/history", get(history))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/devices", get(list_devices))
        .route(
            "/v1/devices/{device_id}",
            put(put_device).delete(delete_device),
        )
        .route_layer(middleware::from_fn_with_state(
            (state.clone(), ApiBudget::new(state.config.api_rate)),
            require_api_key,
        ));
    Router::new()
        .merge(v1)
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            let mut r = ApiError::new(ErrorCode::BadRequest, "method not allowed").into_response();
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            state.config.request_timeout,
            serve::request_timeout,
        ))
        .with_state(state)
}

/// The API key's request budget (`--api-rate`): one token bucket, as there
/// is one key (without a key, every caller shares it).
#[derive(Clone)]
struct ApiBudget(Option<Arc<parking_lot::Mutex<crate::rate::RateLimit>>>);

impl ApiBudget {
    fn new(rate: Option<u32>) -> Self {
        ApiBudget(rate.map(|r| {
            Arc::new(parking_lot::Mutex::new(crate::rate::RateLimit::new(
                r,
                tokio::time::Instant::now(),
            )))
        }))
    }

    /// Spends one request; `Some(response)` when there is none left: 429
    /// with `Retry-After` (whole seconds, at least 1).
    fn refusal(&self) -> Option<Response> {
        let bucket = self.0.as_ref()?;
        let mut b = bucket.lock();
        let wait_ms = b.take(tokio::time::Instant::now()).err()?;
        let rate = b.rate();
        drop(b);
        let mut r = ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "more than {rate} requests/s for this API key (bursts of {}); retry later",
                2 * rate
            ),
        )
        .into_response();
        let secs = wait_ms.div_ceil(1000).max(1);
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        Some(r)
    }
}

async fn require_api_key(
    State((state, budget)): State<(AppState, ApiBudget)>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        let ok = given.is_some_and(|g| same_key(g, key.expose()));
        if !ok {
            return ApiError::new(
                ErrorCode::Unauthorized,
                "missing or wrong API key (Authorization: Bearer <key>)",
            )
            .into_response();
        }
    }
    // Counted once the key is right: a wrong key spends nothing.
    if let Some(refused) = budget.refusal() {
        return refused;
    }
    next.run(req).await
}

/// The credentials of `Authorization: Bearer <token>`; the scheme is
/// case-insensitive (RFC 9110 §11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares the SHA-256 digests of the two keys in constant time: the time
/// taken says nothing of the key's bytes, nor of its length.
fn same_key(given: &str, key: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(key.as_bytes()),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.lifecycle.is_ready() && state.broker.ready() {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        let status = if state.lifecycle.is_shutting_down() {
            "shutting down"
        } else if state.lifecycle.is_ready() {
            "redis unreachable"
        } else {
            "starting"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": status})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.refresh_process();
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &state.registry) {
        return ApiError::new(ErrorCode::Internal, format!("metrics encoding failed: {e}"))
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// The answer to a publication.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PublishAnswer {
    pub channel: ChannelName,
    pub epoch: Epoch,
    pub offset: Offset,
}

#[derive(Debug, Deserialize)]
struct PublishBody {
    channel: String,
    /// As sent: numbers keep every digit (a `Value` would turn
    /// 123456789012345678901234567890 into a float).
    data: Box<RawValue>,
    #[serde(default)]
    idempotency_key: Option<String>,
    /// Offline push (§11), for `user:{id}` channels.
    #[serde(default)]
    push: Option<tether_push_gateway::Notification>,
}

/// A publication accepted, and the push it asks for (when it is new and on
/// a personal channel).
struct Accepted {
    answer: PublishAnswer,
    push: Option<(String, tether_push_gateway::Notification)>,
}

impl Accepted {
    /// Arranges the push, if any: the answer, or 503 `unavailable` naming
    /// the publication (which went through: stored, delivered to live
    /// sessions) when its push could not be arranged.
    async fn finish(self, state: &AppState) -> Result<PublishAnswer, ApiError> {
        if let Some((user, notification)) = self.push
            && let Err(e) = state
                .push
                .on_publish(
                    &user,
                    &self.answer.channel,
                    self.answer.offset,
                    notification,
                )
                .await
        {
            let mut err = ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "published (offset {}) and delivered to connected sessions, but the push to offline devices could not be arranged: {e}",
                    self.answer.offset.get()
                ),
            );
            err.published = Some(self.answer);
            return Err(err);
        }
        Ok(self.answer)
    }
}

/// Parses and validates one publication, then publishes it.
/// A publication that passed validation, ready for the broker.
struct Valid {
    channel: ChannelName,
    body: PublishBody,
    /// `data` compacted: what history keeps and JSON subscribers receive
    /// (MessagePack subscribers' copy is made from it when there are any).
    raw: Box<RawValue>,
}

impl Valid {
    fn publish(&self) -> Publish<'_> {
        Publish {
            channel: &self.channel,
            data: None,
            raw: self.raw.clone(),
            idempotency_key: self.body.idempotency_key.as_deref(),
        }
    }

    /// Counts the publication and decides its push, once the broker took it.
    fn accepted(self, state: &AppState, published: crate::cluster::Published) -> Accepted {
        if published.fresh {
            state
                .metrics
                .publications
                .get_or_create(&SourceLabel { source: "api" })
                .inc();
        }
        let push = match (
            published.fresh,
            self.body.push,
            self.channel.personal_user(),
        ) {
            (true, Some(n), Some(user)) => Some((user.to_owned(), n)),
            _ => None,
        };
        Accepted {
            answer: PublishAnswer {
                channel: self.channel,
                epoch: published.position.epoch,
                offset: published.position.offset,
            },
            push,
        }
    }
}

async fn publish_one(state: &AppState, body: &[u8]) -> Result<Accepted, ApiError> {
    let valid = validate(state, body)?;
    let published = state.broker.publish(valid.publish()).await?;
    Ok(valid.accepted(state, published))
}

/// Parses and checks one publication's JSON text.
fn validate(state: &AppState, body: &[u8]) -> Result<Valid, ApiError> {
    check_publication(state.config.max_message_size, body)
}

/// For the fuzz target `api_publication` (fuzz/): runs a body through
/// [`validate`]'s checks; an accepted `data` must be compact, valid JSON.
#[doc(hidden)]
pub fn fuzz_publication(body: &[u8]) {
    if let Ok(v) = check_publication(64 * 1024, body) {
        let raw = v.raw.get();
        assert!(serde_json::from_str::<Value>(raw).is_ok(), "{raw}");
        assert_eq!(compact_json(&v.raw).get(), raw, "compacting is idempotent");
        assert!(raw.len() <= 64 * 1024);
    }
}

/// [`validate`] with the message size limit given.
fn check_publication(max: usize, body: &[u8]) -> Result<Valid, ApiError> {
    if json_depth(body) > MAX_DEPTH {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("body nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    let mut body: PublishBody = serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        let what = match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => "body is not valid JSON",
            Category::Data => "invalid publication",
        };
        ApiError::new(ErrorCode::BadRequest, format!("{what}: {e}"))
    })?;
    let channel = ChannelName::new(std::mem::take(&mut body.channel))
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
    if !numbers_in_range(body.data.get()) {
        // Valid JSON text, but no JSON parser of a subscriber (nor ours,
        // for MessagePack subscribers) could read it as a number.
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "data holds a number beyond the range of a 64-bit float (e.g. 1e400)",
        ));
    }
    // `\u` escapes are taken as text by the raw capture, lone surrogates
    // (`"\ud9d5"`) included, which strict parsers (serde_json: our Rust
    // client, the MessagePack conversion) refuse: checked by a full parse,
    // only when there is an escape to check.
    if body.data.get().contains("\\u")
        && let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(body.data.get())
            .and_then(|_| serde_json::from_str::<Value>(body.data.get()))
    {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("data is not valid JSON: {e}"),
        ));
    }
    // Compacted once: sized here, stored and fanned out by the broker.
    let raw = compact_json(&body.data);
    let size = raw.get().len();
    if size > max {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!("data is {size} bytes as JSON, over the limit of {max}"),
        ));
    }
    if let Some(key) = &body.idempotency_key
        && (key.is_empty() || key.len() > 256)
    {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "idempotency_key must be 1 to 256 bytes",
        ));
    }
    if let Some(push) = &body.push {
        push.validate().map_err(|e| {
            let code = match e {
                tether_push_gateway::NotificationError::TooLarge(_) => ErrorCode::TooLarge,
                tether_push_gateway::NotificationError::BadCollapseKey => ErrorCode::BadRequest,
            };
            ApiError::new(code, e.to_string())
        })?;
    }
    Ok(Valid { channel, body, raw })
}

/// The `messages` of a batch body, each kept as its JSON text: the array is
/// refused as soon as it has more than [`MAX_BATCH`] elements, before any
/// of them is parsed into a value (a body of millions of tiny elements
/// costs its bytes, not gigabytes of values).
fn parse_batch(body: &[u8]) -> Result<Vec<Box<serde_json::value::RawValue>>, ApiError> {
    #[derive(Deserialize)]
    struct Batch {
        #[serde(deserialize_with = "at_most_a_batch")]
        messages: Vec<Box<serde_json::value::RawValue>>,
    }
    fn at_most_a_batch<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<Box<serde_json::value::RawValue>>, D::Error> {
        struct Bounded;
        impl<'de> serde::de::Visitor<'de> for Bounded {
            type Value = Vec<Box<serde_json::value::RawValue>>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "an array of at most {MAX_BATCH} publications")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(m) = seq.next_element()? {
                    if out.len() == MAX_BATCH {
                        return Err(serde::de::Error::custom(TOO_MANY));
                    }
                    out.push(m);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(Bounded)
    }
    const TOO_MANY: &str = "too many publications";
    serde_json::from_slice::<Batch>(body)
        .map(|b| b.messages)
        .map_err(|e| {
            if e.to_string().starts_with(TOO_MANY) {
                ApiError::new(
                    ErrorCode::TooLarge,
                    format!("at most {MAX_BATCH} publications per batch"),
                )
            } else {
                ApiError::new(
                    ErrorCode::BadRequest,
                    format!("body must be {{\"messages\": [...]}}: {e}"),
                )
            }
        })
}

/// Parses a JSON request body with the nesting limit of §2.
fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    match tether_protocol::codec::decode_value(body, Encoding::Json, MAX_BODY) {
        Ok(v) => Ok(v),
        Err(tether_protocol::DecodeError::TooDeep) => Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("body nested deeper than {MAX_DEPTH} levels"),
        )),
        Err(e) => Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("body is not valid JSON: {e}"),
        )),
    }
}

async fn publish(
    State(state): State<AppState>,
    body: Body,
) -> Result<Json<PublishAnswer>, ApiError> {
    let accepted = publish_one(&state, &body?).await?;
    Ok(Json(accepted.finish(&state).await?))
}

async fn publish_batch(State(state): State<AppState>, body: Body) -> Result<Json<Value>, ApiError> {
    let messages = parse_batch(&body?)?;
    // Every valid publication goes to the broker in one call, in order: a
    // cluster node sends them to Redis in pipelines, not one round trip
    // each.
    let checked: Vec<Result<Valid, ApiError>> = messages
        .iter()
        .map(|m| validate(&state, m.get().as_bytes()))
        .collect();
    let publishes = checked.iter().flatten().map(Valid::publish).collect();
    let mut published = state.broker.publish_many(publishes).await.into_iter();
    let mut results: Vec<Value> = Vec::with_capacity(checked.len());
    for c in checked {
        let answer = c.and_then(|valid| {
            let p = published.next().unwrap_or_else(|| {
                Err(crate::cluster::BrokerError::Internal("no answer".into()))
            })?;
            Ok(valid.accepted(&state, p))
        });
        results.push(match answer {
            Ok(a) => match a.finish(&state).await {
                Ok(answer) => serde_json::to_value(answer).unwrap_or(Value::Null),
                Err(e) => e.body(),
            },
            Err(e) => e.body(),
        });
    }
    Ok(Json(json!({ "results": results })))
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    since: Option<String>,
    limit: Option<String>,
}

async fn history(
    State(state): State<AppState>,
    channel: PathArg,
    q: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let (Path(channel), Query(q)) = (channel?, q?);
    let channel = ChannelName::new(channel)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
    let since = match q.since.as_deref() {
        None => 0,
        Some(s) => s.parse::<u64>().map_err(|_| {
            ApiError::new(
                ErrorCode::BadRequest,
                "since must be an offset (unsigned integer)",
            )
        })?,
    };
    let size = state.config.history_size;
    let limit = match q.limit.as_deref() {
        None => size.min(100),
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=size).contains(&n) => n,
            _ => {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!("limit must be between 1 and the history size ({size})"),
                ));
            }
        },
    };
    let page = state
        .broker
        .history(
            &channel,
            HistoryRead {
                since: Some(Offset(since)),
                limit,
            },
        )
        .await?;
    /// One message, its data as stored (every digit of its numbers kept).
    #[derive(Serialize)]
    struct Message<'a> {
        offset: Offset,
        data: &'a RawValue,
        ts: u64,
    }
    #[derive(Serialize)]
    struct Page<'a> {
        epoch: &'a Epoch,
        offset: Offset,
        recovered: bool,
        messages: Vec<Message<'a>>,
    }
    let body = Page {
        epoch: &page.position.epoch,
        offset: page.position.offset,
        recovered: page.recovered,
        messages: page
            .messages
            .iter()
            .map(|m| Message {
                offset: m.offset,
                data: &m.data,
                ts: m.ts,
            })
            .collect(),
    };
    let json = serde_json::to_vec(&body)
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("history encoding: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}

#[derive(Debug, Deserialize)]
struct DeviceBody {
    user: String,
    platform: String,
    /// A string for APNs and FCM, a subscription object for Web Push.
    token: tether_push_gateway::types::DeviceToken,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    sandbox: bool,
}

fn registry_error(e: tether_push_gateway::RegistryError) -> ApiError {
    match e {
        tether_push_gateway::RegistryError::Invalid(d) => bad(d),
        tether_push_gateway::RegistryError::Unavailable(reason) => {
            tracing::warn!(%reason, "device registry error");
            ApiError::new(ErrorCode::Unavailable, "device registry unavailable")
        }
    }
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, e.to_string())
}

async fn put_device(
    State(state): State<AppState>,
    device_id: PathArg,
    body: Body,
) -> Result<Json<tether_push_gateway::Device>, ApiError> {
    let Path(device_id) = device_id?;
    let body: DeviceBody = serde_json::from_value(parse_body(&body?)?)
        .map_err(|e| bad(format!("invalid device: {e}")))?;
    let device = tether_push_gateway::Device {
        device_id,
        user: body.user,
        platform: tether_push_gateway::validate::parse_platform(&body.platform).map_err(bad)?,
        token: body.token,
        topic: body.topic,
        sandbox: body.sandbox,
        updated_at: 0,
    };
    device.validate().map_err(bad)?;
    let saved = state
        .push
        .devices()
        .put_device(device)
        .await
        .map_err(registry_error)?;
    Ok(Json(saved))
}

async fn delete_device(
    State(state): State<AppState>,
    device_id: PathArg,
) -> Result<StatusCode, ApiError> {
    let Path(device_id) = device_id?;
    tether_push_gateway::validate::validate_device_id(&device_id).map_err(bad)?;
    state
        .push
        .devices()
        .delete_device(&device_id)
        .await
        .map_err(registry_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct DevicesQuery {
    user: Option<String>,
}

async fn list_devices(
    State(state): State<AppState>,
    q: Result<Query<DevicesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q?;
    let user = q
        .user
        .ok_or_else(|| bad("the user query parameter is required"))?;
    tether_push_gateway::validate::validate_user(&user).map_err(bad)?;
    let devices = state
        .push
        .devices()
        .devices_for_user(&user)
        .await
        .map_err(registry_error)?;
    Ok(Json(json!({ "devices": devices })))
}

/// `docs/openapi.json`, the description of this API, compiled in.
const OPENAPI: &str = include_str!("../../../docs/openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// How long the API server waits for in-flight requests at shutdown.
pub const DRAIN: Duration = Duration::from_secs(2);
