//! The REST API: one-off commands (`POST /api/v1/exec`), agents, tokens.
//!
//! Scripts authenticate with `Authorization: Bearer <token>` (the admin
//! token or a named API token); the console's session cookie works too, for
//! requests that change something only with this server's own `Origin`. Each request's command runs on an agent channel
//! like a console command, under the same limits.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use encoding_rs::{Encoding, UTF_8};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::OwnedSemaphorePermit;

use super::State as AppState;
use super::auth::{Principal, Role};
use super::problem::ApiError;
use super::tokens::TokenError;
use crate::link::{Channel, Event, LinkError};
use crate::protocol::ExecRequest;
use crate::protocol::MAX_PAYLOAD_LEN;

/// The command's default time limit: 30 s.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// Output kept per stream by default: 1 MiB.
pub const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;

/// The API's limits, from the server's configuration.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Cap on `timeout_ms`.
    pub max_timeout_ms: u64,
    /// Cap on `max_output_bytes`.
    pub max_output_bytes: usize,
    /// Commands running through the API at once (429 beyond).
    pub max_concurrent: usize,
    /// Requests per principal per minute (429 beyond).
    pub rate_per_minute: u32,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_body_bytes: 1024 * 1024,
            max_timeout_ms: 3_600_000,
            max_output_bytes: 64 * 1024 * 1024,
            max_concurrent: 64,
            rate_per_minute: 1200,
        }
    }
}

/// Requests per principal in the current minute; at most 10 000 tracked.
#[derive(Default)]
pub struct RateLimiter {
    windows: Mutex<HashMap<String, (u32, Instant)>>,
}

impl RateLimiter {
    /// Counts a request; `Err(seconds to wait)` when over `limit`.
    fn check(&self, who: &str, limit: u32) -> Result<(), u64> {
        let Ok(mut windows) = self.windows.lock() else {
            return Ok(());
        };
        if windows.len() >= 10_000 {
            windows.retain(|_, (_, start)| start.elapsed() < Duration::from_secs(60));
        }
        let entry = windows.entry(who.to_owned()).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= Duration::from_secs(60) {
            *entry = (0, Instant::now());
        }
        if entry.0 >= limit {
            return Err(60u64.saturating_sub(entry.1.elapsed().as_secs()).max(1));
        }
        entry.0 += 1;
        Ok(())
    }
}

/// Who is calling: a bearer token, else the session cookie.
pub fn principal(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(ApiError::Unauthorized)?;
        return state
            .auth
            .admin_token(token)
            .or_else(|| state.tokens.authenticate(token))
            .ok_or(ApiError::Unauthorized);
    }
    state
        .session_principal(headers)
        .ok_or(ApiError::Unauthorized)
}

/// Who is calling, for a request that changes something. A bearer token is
/// enough; the session cookie is not, unless the request comes from this
/// server's own page (`Origin`): a cookie alone must never let another site
/// run commands or manage tokens.
pub fn principal_for_write(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    if !headers.contains_key(header::AUTHORIZATION)
        && !super::security::origin_allowed(headers, &state.allowed_origins)
    {
        return Err(ApiError::Unauthorized);
    }
    principal(state, headers)
}

/// The body of `POST /api/v1/exec`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    command: Option<String>,
    argv: Option<Vec<String>>,
    cwd: Option<String>,
    env: Option<BTreeMap<String, String>>,
    stdin: Option<String>,
    timeout_ms: Option<u64>,
    max_output_bytes: Option<usize>,
    encoding: Option<String>,
    agent: Option<String>,
}

/// A validated request.
struct Prepared {
    req: ExecRequest,
    stdin: Bytes,
    max_output: usize,
    encoding: &'static Encoding,
    agent: Option<String>,
}

fn prepare(body: ExecBody, limits: &ApiLimits) -> Result<Prepared, ApiError> {
    match (&body.command, &body.argv) {
        (None, None) => {
            return Err(ApiError::BadRequest(
                "give \"command\" (a shell command line) or \"argv\" (a list)".into(),
            ));
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give either \"command\" or \"argv\", not both".into(),
            ));
        }
        (None, Some(argv)) if argv.is_empty() => {
            return Err(ApiError::BadRequest("\"argv\" is empty".into()));
        }
        (Some(c), None) if c.trim().is_empty() => {
            return Err(ApiError::BadRequest("\"command\" is empty".into()));
        }
        _ => {}
    }
    let encoding = match body.encoding.as_deref() {
        None => UTF_8,
        Some(label) => Encoding::for_label(label.as_bytes()).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "unknown encoding {label:?}; use a WHATWG label such as utf-8, gbk or shift_jis"
            ))
        })?,
    };
    let timeout = body
        .timeout_ms
        .unwrap_or(DEFAULT_TIMEOUT_MS)
        .clamp(1, limits.max_timeout_ms);
    let max_output = body
        .max_output_bytes
        .unwrap_or(DEFAULT_MAX_OUTPUT)
        .min(limits.max_output_bytes);
    Ok(Prepared {
        req: ExecRequest {
            cmd: body.command,
            argv: body.argv,
            cwd: body.cwd,
            env: body.env,
            timeout_ms: Some(timeout),
            ..Default::default()
        },
        stdin: Bytes::from(body.stdin.unwrap_or_default()),
        max_output,
        encoding,
        agent: body.agent,
    })
}

async fn read_json_body(request: Request, limit: usize) -> Result<ExecBody, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime != "application/json" && !mime.ends_with("+json") {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| {
            ApiError::TooLarge(format!("the request body is larger than {limit} bytes"))
        })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))
}

/// `POST /api/v1/exec`.
pub async fn exec(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let headers = request.headers().clone();
    let who = principal_for_write(&state, &headers)?;
    if !who.role.can_run() {
        return Err(ApiError::Forbidden(format!(
            "{} is a viewer and may not run commands",
            who.name
        )));
    }
    let limits = &state.api_limits;
    state
        .api_rate
        .check(&who.name, limits.rate_per_minute)
        .map_err(|retry_after| ApiError::TooManyRequests {
            message: format!("more than {} requests a minute", limits.rate_per_minute),
            retry_after,
        })?;
    let body = read_json_body(request, limits.max_body_bytes).await?;
    let prepared = prepare(body, limits)?;
    let permit =
        state
            .exec_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::TooManyRequests {
                message: format!(
                    "{} commands are running already; try again shortly",
                    limits.max_concurrent
                ),
                retry_after: 1,
            })?;
    let (agent, link) = state
        .agents
        .link(prepared.agent.as_deref())
        .map_err(|e| match e {
            super::agents::AgentError::Unavailable(_) => ApiError::AgentUnavailable(e.to_string()),
            _ => ApiError::BadRequest(e.to_string()),
        })?;
    let channel = link.exec(prepared.req.clone()).await.map_err(|e| match e {
        LinkError::TooLarge { size, .. } => ApiError::TooLarge(format!(
            "the command, its arguments and environment make a request of {size} bytes; \
             the agent accepts at most {MAX_PAYLOAD_LEN} (a single argument at most 128 KiB, \
             as the kernel)"
        )),
        e => ApiError::AgentUnavailable(format!("agent {agent:?}: {e}")),
    })?;
    // Always end stdin, so that a command reading it sees EOF, not a hang.
    channel
        .stdin(prepared.stdin.clone(), true)
        .await
        .map_err(|e| ApiError::AgentUnavailable(format!("agent {agent:?}: {e}")))?;
    tracing::info!(user = %who.name, agent = %agent, "api exec");

    let streaming = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/x-ndjson"));
    if streaming {
        let shutdown = state.shutdown.clone();
        return Ok(stream_response(channel, prepared, permit, agent, shutdown));
    }
    tokio::select! {
        biased;
        // Dropping the channel kills the command.
        _ = state.shutdown.cancelled() => Err(ApiError::AgentUnavailable(
            "the server is shutting down; the command was killed".into(),
        )),
        r = buffered_response(channel, prepared, agent) => r,
    }
}

/// Collects a stream's output up to a limit, counting what was dropped.
struct Capture {
    data: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl Capture {
    fn new(limit: usize) -> Self {
        Capture {
            data: Vec::new(),
            limit,
            truncated: false,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = self.limit.saturating_sub(self.data.len());
        self.data.extend_from_slice(&bytes[..room.min(bytes.len())]);
        self.truncated |= bytes.len() > room;
    }
}

fn decode(bytes: &[u8], encoding: &'static Encoding) -> Option<String> {
    if encoding == UTF_8 {
        return std::str::from_utf8(bytes).ok().map(str::to_owned);
    }
    encoding
        .decode_without_bom_handling_and_without_replacement(bytes)
        .map(|c| c.into_owned())
}

/// Why a command ended without an exit, in the buffered and streamed answers alike.
fn refused(agent: &str, code: &str, message: &str) -> String {
    format!("agent {agent:?} refused the command ({code}): {message}")
}

fn lost(agent: &str) -> String {
    format!("the connection to agent {agent:?} was lost during the command")
}

fn exit_fields(
    code: Option<i32>,
    signal: Option<String>,
    timed_out: bool,
    duration_ms: u64,
) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("exit_code".into(), json!(code));
    m.insert("signal".into(), json!(signal));
    m.insert("timed_out".into(), json!(timed_out));
    m.insert("duration_ms".into(), json!(duration_ms));
    m
}

async fn buffered_response(
    mut channel: Channel,
    prepared: Prepared,
    agent: String,
) -> Result<Response, ApiError> {
    let mut out = Capture::new(prepared.max_output);
    let mut err = Capture::new(prepared.max_output);
    loop {
        match channel.next().await {
            Some(Event::Stdout(b)) => {
                out.push(&b);
                let _ = channel.window(b.len() as u64).await;
            }
            Some(Event::Stderr(b)) => {
                err.push(&b);
                let _ = channel.window(b.len() as u64).await;
            }
            Some(Event::Error { code, message })
                if crate::link::REFUSED.contains(&code.as_str()) =>
            {
                return Err(ApiError::AgentUnavailable(refused(&agent, &code, &message)));
            }
            Some(Event::Error { .. }) => {}
            Some(Event::Exit {
                code,
                signal,
                timed_out,
                duration_ms,
            }) => {
                let mut body = exit_fields(code, signal, timed_out, duration_ms);
                let text =
                    decode(&out.data, prepared.encoding).zip(decode(&err.data, prepared.encoding));
                let (stdout, stderr, encoding) = match text {
                    Some((o, e)) => (o, e, "utf-8"),
                    None => (BASE64.encode(&out.data), BASE64.encode(&err.data), "base64"),
                };
                body.insert("stdout".into(), json!(stdout));
                body.insert("stderr".into(), json!(stderr));
                body.insert("stdout_truncated".into(), json!(out.truncated));
                body.insert("stderr_truncated".into(), json!(err.truncated));
                body.insert("encoding".into(), json!(encoding));
                return Ok(Json(Value::Object(body)).into_response());
            }
            Some(Event::Lost) | None => {
                return Err(ApiError::AgentUnavailable(lost(&agent)));
            }
        }
    }
}

/// Decodes one stream's chunks as they come; a chunk that is not valid
/// text is sent base64-encoded instead (and the decoder starts afresh).
/// It counts what it has passed on to apply `max_output_bytes`, and keeps
/// no output: streaming holds nothing back.
struct StreamDecoder {
    encoding: &'static Encoding,
    decoder: encoding_rs::Decoder,
    sent: usize,
    limit: usize,
    truncated: bool,
}

impl StreamDecoder {
    fn new(encoding: &'static Encoding, limit: usize) -> Self {
        StreamDecoder {
            encoding,
            decoder: encoding.new_decoder_without_bom_handling(),
            sent: 0,
            limit,
            truncated: false,
        }
    }

    /// The JSON line for a chunk, or `None` when nothing is to be sent.
    fn line(&mut self, stream: &str, bytes: &[u8]) -> Option<Value> {
        let keep = self.limit.saturating_sub(self.sent).min(bytes.len());
        self.truncated |= keep < bytes.len();
        self.sent += keep;
        let kept = &bytes[..keep];
        if kept.is_empty() {
            return None;
        }
        let mut text = String::with_capacity(kept.len() * 3 + 4);
        let (result, _) = self
            .decoder
            .decode_to_string_without_replacement(kept, &mut text, false);
        match result {
            encoding_rs::DecoderResult::Malformed(_, _) => {
                self.decoder = self.encoding.new_decoder_without_bom_handling();
                Some(json!({"stream": stream, "data": BASE64.encode(kept), "encoding": "base64"}))
            }
            _ if text.is_empty() => None,
            _ => Some(json!({"stream": stream, "data": text})),
        }
    }
}

fn stream_response(
    channel: Channel,
    prepared: Prepared,
    permit: OwnedSemaphorePermit,
    agent: String,
    shutdown: tokio_util::sync::CancellationToken,
) -> Response {
    struct St {
        channel: Channel,
        out: StreamDecoder,
        err: StreamDecoder,
        done: bool,
        agent: String,
        shutdown: tokio_util::sync::CancellationToken,
        _permit: OwnedSemaphorePermit,
    }
    let st = St {
        channel,
        out: StreamDecoder::new(prepared.encoding, prepared.max_output),
        err: StreamDecoder::new(prepared.encoding, prepared.max_output),
        done: false,
        agent,
        shutdown,
        _permit: permit,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            // Shutdown first: it also takes the agent link down, and the
            // client should hear the cause, not the symptom.
            let event = tokio::select! {
                biased;
                _ = st.shutdown.cancelled() => {
                    st.done = true;
                    let line = json!({"error": "the server is shutting down; the command was killed"});
                    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
                    bytes.push(b'\n');
                    return Some((Ok(Bytes::from(bytes)), st));
                }
                e = st.channel.next() => e,
            };
            let line = match event {
                Some(Event::Stdout(b)) => {
                    let _ = st.channel.window(b.len() as u64).await;
                    match st.out.line("stdout", &b) {
                        Some(l) => l,
                        None => continue,
                    }
                }
                Some(Event::Stderr(b)) => {
                    let _ = st.channel.window(b.len() as u64).await;
                    match st.err.line("stderr", &b) {
                        Some(l) => l,
                        None => continue,
                    }
                }
                Some(Event::Error { code, message })
                    if crate::link::REFUSED.contains(&code.as_str()) =>
                {
                    st.done = true;
                    json!({"error": refused(&st.agent, &code, &message)})
                }
                Some(Event::Error { .. }) => continue,
                Some(Event::Exit {
                    code,
                    signal,
                    timed_out,
                    duration_ms,
                }) => {
                    st.done = true;
                    let mut body = exit_fields(code, signal, timed_out, duration_ms);
                    body.insert("stdout_truncated".into(), json!(st.out.truncated));
                    body.insert("stderr_truncated".into(), json!(st.err.truncated));
                    Value::Object(body)
                }
                Some(Event::Lost) | None => {
                    st.done = true;
                    json!({"error": lost(&st.agent)})
                }
            };
            let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
            bytes.push(b'\n');
            return Some((Ok::<_, Infallible>(Bytes::from(bytes)), st));
        }
    });
    let mut response = Body::from_stream(stream).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// `GET /api/v1/agents`.
pub async fn agents(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    principal(&state, &headers)?;
    Ok(Json(json!({"agents": state.agents.statuses()})).into_response())
}

fn require_admin(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let who = principal_for_write(state, headers)?;
    if who.role != Role::Admin {
        return Err(ApiError::Forbidden("only admins manage tokens".into()));
    }
    Ok(who)
}

fn token_error(e: TokenError) -> ApiError {
    match e {
        TokenError::Exists(_) | TokenError::BadName => ApiError::BadRequest(e.to_string()),
        TokenError::Missing(_) => ApiError::NotFound(e.to_string()),
        TokenError::Store { .. } => ApiError::Internal(e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    name: String,
    role: Role,
}

/// `GET /api/v1/tokens`: names and roles, never the secrets.
pub async fn list_tokens(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&state, &headers)?;
    let tokens = state.tokens.list().map_err(token_error)?;
    let tokens: Vec<Value> = tokens
        .iter()
        .map(|t| json!({"name": t.name, "role": t.role, "created": t.created}))
        .collect();
    Ok(Json(json!({"tokens": tokens})).into_response())
}

/// `POST /api/v1/tokens`: creates a token; its value is shown this once.
pub async fn create_token(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let who = require_admin(&state, request.headers())?;
    let mime_ok = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !mime_ok {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = axum::body::to_bytes(request.into_body(), 64 * 1024)
        .await
        .map_err(|_| ApiError::TooLarge("the request body is larger than 65536 bytes".into()))?;
    let new: NewToken = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))?;
    let token = state
        .tokens
        .create(&new.name, new.role)
        .map_err(token_error)?;
    tracing::info!(by = %who.name, name = %new.name, role = new.role.as_str(), "api token created");
    let body = json!({"name": new.name, "role": new.role, "token": token.expose()});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `DELETE /api/v1/tokens/{name}`.
pub async fn revoke_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let who = require_admin(&state, &headers)?;
    state.tokens.revoke(&name).map_err(token_error)?;
    tracing::info!(by = %who.name, %name, "api token revoked");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The OpenAPI 3 document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// `GET /api/v1/openapi.json` (no authentication: it holds no secrets).
pub async fn openapi() -> Response {
    let mut response = OPENAPI.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Unknown `/api/...` paths answer in the API's own error format.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such API endpoint".into())
}
