//! Files over REST: `PUT /api/v1/files` writes one on an agent's host,
//! `GET /api/v1/files` reads one, both streamed through the agent link's
//! `put` and `get` channels under its flow control, so that a file of any
//! size passes through the server in a bounded amount of memory.
//!
//! Who may: whoever may run commands on the agent (viewers may not, in
//! either direction: reading a file is as much as running `cat`). Paths
//! are the agent's user's: nothing here rewrites or restricts them, since
//! that user could do the same with a shell.

use std::os::unix::ffi::OsStrExt;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;
use utoipa::ToSchema;

use super::State as AppState;
use super::api::ProblemResponse;
use super::auth::Principal;
use super::caller::{Caller, Writer};
use super::policy::SessionAction;
use super::problem::ApiError;
use super::quota::Ticket;
use crate::audit::Kind;
use crate::link::{AgentLink, Channel, Event, LinkError};
use crate::protocol::{FileInfo, GetRequest, PutRequest, WirePath};
use crate::vocab::ErrorCode;

/// Output credit of a download: 4 MiB in flight between the agent and
/// the server per transfer, enough to keep a fast link busy, and the most
/// a transfer holds in the server's memory (with hyper's write buffer).
pub(crate) const DOWNLOAD_WINDOW: u64 = 4 * 1024 * 1024;

/// The query of both endpoints, decoded by hand: `path` and `name` are
/// bytes (percent-encoded), which no UTF-8 string type could hold.
#[derive(Debug, Default)]
struct FileQuery {
    agent: Option<String>,
    path: Option<Vec<u8>>,
    name: Option<Vec<u8>>,
    session: Option<String>,
    overwrite: bool,
    mode: Option<u32>,
    owner: Option<String>,
}

fn parse_query(query: Option<&str>, put: bool) -> Result<FileQuery, ApiError> {
    let mut q = FileQuery::default();
    let mut seen = std::collections::HashSet::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = value.replace('+', " ");
        let bytes: Vec<u8> = percent_encoding::percent_decode_str(&value).collect();
        if !seen.insert(key.to_owned()) {
            return Err(ApiError::BadRequest(format!(
                "the query gives {key:?} more than once"
            )));
        }
        let text = |what: &str| {
            String::from_utf8(bytes.clone())
                .map_err(|_| ApiError::BadRequest(format!("{what} must be UTF-8")))
        };
        match key {
            "agent" => q.agent = Some(text("agent")?),
            "path" => q.path = Some(bytes.clone()),
            "session" => q.session = Some(text("session")?),
            "name" if put => q.name = Some(bytes.clone()),
            "overwrite" if put => {
                q.overwrite = match text("overwrite")?.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    other => {
                        return Err(ApiError::BadRequest(format!(
                            "overwrite must be true or false, not {other:?}"
                        )));
                    }
                }
            }
            "mode" if put => {
                let text = text("mode")?;
                // One to four octal digits, as documented (from_str_radix
                // alone would also take `+7` and `00000`).
                let digits = (1..=4).contains(&text.len())
                    && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
                q.mode = Some(
                    u32::from_str_radix(&text, 8)
                        .ok()
                        .filter(|_| digits)
                        .ok_or_else(|| {
                            ApiError::BadRequest(format!(
                                "mode must be octal permission bits (0644), not {text:?}"
                            ))
                        })?,
                );
            }
            "owner" if put => q.owner = Some(text("owner")?),
            other => {
                let known = if put {
                    "agent, path, name, session, overwrite, mode, owner"
                } else {
                    "agent, path, session"
                };
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; known: {known}"
                )));
            }
        }
    }
    match &q.path {
        None => return Err(ApiError::BadRequest("path is required".into())),
        Some(p) if p.is_empty() => return Err(ApiError::BadRequest("path is empty".into())),
        Some(p) if p.contains(&0) => {
            return Err(ApiError::BadRequest("path holds a NUL byte".into()));
        }
        Some(_) => {}
    }
    // One path component, as documented: the agent refuses `.` and `..`
    // (which need the directory to tell), the rest is refused here.
    match &q.name {
        Some(n) if n.is_empty() => return Err(ApiError::BadRequest("name is empty".into())),
        Some(n) if n.contains(&0) => {
            return Err(ApiError::BadRequest("name holds a NUL byte".into()));
        }
        Some(n) if n.contains(&b'/') => {
            return Err(ApiError::BadRequest(
                "name holds a slash: it is one file name; put the directory in path".into(),
            ));
        }
        _ => {}
    }
    Ok(q)
}

/// Fuzzing: the query of both file endpoints (paths are bytes).
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for put in [true, false] {
        if let Ok(q) = parse_query(Some(text), put) {
            assert!(
                q.path
                    .as_ref()
                    .is_some_and(|p| !p.is_empty() && !p.contains(&0))
            );
            assert!(
                q.name
                    .as_ref()
                    .is_none_or(|n| !n.is_empty() && !n.contains(&b'/'))
            );
            assert!(q.mode.is_none_or(|m| m <= 0o7777));
        }
    }
}

/// The query of `PUT /api/v1/files`, for the OpenAPI document (the
/// handler reads it with [`parse_query`]: paths are bytes).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct PutParams {
    /// The agent; optional when the caller can reach only one.
    agent: Option<String>,
    /// Where to write: absolute, or relative to the agent user's home
    /// directory (to the shell's working directory with `session`).
    /// Percent-encoded bytes: a path need not be UTF-8.
    #[param(min_length = 1, pattern = "^[^\\x00]+$")]
    path: String,
    /// When `path` is a directory: the file's name in it (one component).
    #[param(min_length = 1, pattern = "^[^/\\x00]+$")]
    name: Option<String>,
    /// A shell session of the caller's on that agent: relative paths are
    /// taken from its shell's working directory.
    session: Option<String>,
    /// Replace an existing file (default false: 409).
    overwrite: Option<bool>,
    /// Permission bits in octal (default: the replaced file's, or 0666
    /// less the agent's umask).
    #[param(pattern = "^[0-7]{1,4}$")]
    mode: Option<String>,
    /// `USER`, `USER:GROUP` or `:GROUP`; needs the rights chown needs.
    owner: Option<String>,
}

/// The query of `GET /api/v1/files`, for the OpenAPI document.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct GetParams {
    /// The agent; optional when the caller can reach only one.
    agent: Option<String>,
    /// The file: absolute, or relative to the agent user's home directory
    /// (to the shell's working directory with `session`). Percent-encoded
    /// bytes.
    #[param(min_length = 1, pattern = "^[^\\x00]+$")]
    path: String,
    /// A shell session of the caller's on that agent: relative paths are
    /// taken from its shell's working directory.
    session: Option<String>,
}

/// Why an upload's body stopped before its end.
enum Cut {
    /// The client's body broke off.
    Client(String),
    /// No byte came for the idle time.
    Idle,
    /// The channel ended (its events say why).
    Channel,
}

/// What a transfer holds until it is over: its place among the API's
/// running commands, and its share of the agent's channels.
struct Held {
    _permit: OwnedSemaphorePermit,
    _ticket: Ticket,
}

/// The agent a transfer goes to, with the checks every transfer passes:
/// the rate, the right to run there, the caller's share of the agent, and
/// (with `session`) that the caller owns that session.
async fn prepare(
    state: &AppState,
    who: &Principal,
    query: &FileQuery,
    client: std::net::IpAddr,
    kind: Kind,
) -> Result<(String, AgentLink, Held), ApiError> {
    let limits = &state.api_limits;
    state
        .api_rate
        .check(&who.name)
        .map_err(|retry_after| ApiError::TooManyRequests {
            message: format!("more than {} requests a minute", limits.rate_per_minute),
            retry_after,
        })?;
    let (agent, link) = super::policy::link_to_run(who, query.agent.as_deref(), &state.agents)
        .map_err(|e| {
            super::api::audit_refusal(state, who, client, query.agent.as_deref(), kind, &e);
            super::api::refused(e)
        })?;
    if !link.info().files {
        return Err(ApiError::Conflict(format!(
            "agent {agent:?} is a version that cannot move files; upgrade it"
        )));
    }
    if let Some(id) = &query.session {
        // Only its owner (or an admin) learns where a shell is.
        super::sessions::find(state, who, &agent, id, SessionAction::Write).await?;
    }
    let permit =
        state
            .exec_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::TooManyRequests {
                message: format!(
                    "{} commands and transfers are running already; try again shortly",
                    limits.max_concurrent
                ),
                retry_after: 1,
            })?;
    let ticket = state
        .quota
        .admit(&who.name, &agent, link.info().max_channels)
        .map_err(|e| ApiError::TooManyRequests {
            message: e.to_string(),
            retry_after: 1,
        })?;
    Ok((
        agent,
        link,
        Held {
            _permit: permit,
            _ticket: ticket,
        },
    ))
}

/// The API's answer to an agent's refusal of a transfer.
fn refusal(code: ErrorCode, message: String) -> ApiError {
    match code {
        ErrorCode::NotFound | ErrorCode::NoSession => ApiError::NotFound(message),
        ErrorCode::PermissionDenied => ApiError::Forbidden(message),
        ErrorCode::Exists | ErrorCode::NotAFile => ApiError::Conflict(message),
        ErrorCode::DiskFull => ApiError::InsufficientStorage(message),
        ErrorCode::SizeMismatch
        | ErrorCode::HashMismatch
        | ErrorCode::BadRequest
        | ErrorCode::BadExec => ApiError::BadRequest(message),
        ErrorCode::RangeNotSatisfiable => ApiError::RangeNotSatisfiable {
            message,
            size: None,
        },
        ErrorCode::AgentLost | ErrorCode::AgentUnavailable => ApiError::AgentUnavailable(message),
        ErrorCode::TooManyChannels | ErrorCode::Busy => ApiError::TooManyRequests {
            message,
            retry_after: 1,
        },
        _ => ApiError::Internal(message),
    }
}

fn link_error(agent: &str, e: LinkError) -> ApiError {
    ApiError::AgentUnavailable(format!("agent {agent:?}: {e}"))
}

/// A path for people: lossy where it is not UTF-8.
fn shown(path: &WirePath) -> String {
    path.display()
}

/// `PUT /api/v1/files`'s answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct WrittenFile {
    /// The agent written to.
    agent: String,
    /// The absolute path written (a path that is not UTF-8 is shown with
    /// U+FFFD in place of its other bytes).
    path: String,
    size: u64,
    /// The SHA-256 of the bytes written, in hex.
    sha256: String,
    /// The permission bits, in octal (`"0644"`).
    mode: String,
    /// Whether the file is new (else it replaced one).
    created: bool,
}

/// `PUT /api/v1/files`.
#[utoipa::path(
    put,
    path = "/api/v1/files",
    operation_id = "putFile",
    tag = "files",
    summary = "Write a file on an agent's host",
    description = "The request body is the file's bytes, streamed to the agent as they arrive (never held whole). The agent writes them to an unnamed file in the target's directory, checks the size (`Content-Length`) and, when given, the SHA-256 (`Repr-Digest: sha-256=:BASE64:`), syncs it and only then links it into place: a transfer cut short leaves no file. The file is written as the agent's user, who may write whatever it could write from a shell. Viewers may not.",
    params(PutParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The file's bytes."),
    responses(
        (status = 201, description = "Written; no file was there.", body = WrittenFile),
        (status = 200, description = "Written; it replaced a file.", body = WrittenFile),
        (status = 400, response = ProblemResponse),
        (status = 401, response = ProblemResponse),
        (status = 403, response = ProblemResponse),
        (status = 404, response = ProblemResponse),
        (status = 409, response = ProblemResponse),
        (status = 429, response = ProblemResponse),
        (status = 503, response = ProblemResponse),
        (status = 507, response = ProblemResponse),
    ),
)]
pub(crate) async fn put(
    State(state): State<AppState>,
    Writer(who): Writer,
    super::peer::ClientIp(client): super::peer::ClientIp,
    request: Request,
) -> Result<Response, ApiError> {
    let query = parse_query(request.uri().query(), true)?;
    let (size, sha256) = declared(request.headers())?;
    let (agent, link, held) = prepare(&state, &who, &query, client, Kind::FilePut).await?;
    let via = super::api::via(request.headers());
    let audit = |detail: serde_json::Value| {
        state.audit(Kind::FilePut, &who.name, client, &agent, via, detail)
    };
    let req = PutRequest {
        path: WirePath(query.path.clone().unwrap_or_default()),
        name: query.name.clone().map(WirePath),
        size,
        sha256,
        mode: query.mode,
        owner: query.owner.clone(),
        overwrite: query.overwrite,
        session: query.session.clone(),
    };
    let mut channel = link.put(&req).await.map_err(|e| link_error(&agent, e))?;
    let input = channel.controller();
    let mut body = request.into_body().into_data_stream();
    // The body goes to the agent as the agent takes it (its stdin credit
    // paces this loop); the agent's answer may come first (a refusal).
    let idle = state.api_limits.transfer_idle;
    let pump = async move {
        loop {
            let next = tokio::time::timeout(idle, body.next())
                .await
                .map_err(|_| Cut::Idle)?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| Cut::Client(e.to_string()))?;
            super::metrics::input(chunk.len());
            // Fails only once the channel has ended: its events say why.
            input.stdin(chunk, false).await.map_err(|_| Cut::Channel)?;
        }
        input
            .stdin(Bytes::new(), true)
            .await
            .map_err(|_| Cut::Channel)
    };
    tokio::pin!(pump);
    let mut pumping = true;
    let mut written: Option<FileInfo> = None;
    let mut failure: Option<(ErrorCode, String)> = None;
    loop {
        tokio::select! {
            result = &mut pump, if pumping => {
                pumping = false;
                // The client's body broke off, or stalled. Dropping the
                // channel kills the writer: no file.
                let cut = match result {
                    Err(Cut::Client(e)) => ApiError::BadRequest(format!("the upload was cut short: {e}")),
                    Err(Cut::Idle) => ApiError::RequestTimeout(format!(
                        "no byte of the upload came for {} s; it was ended and nothing was written",
                        idle.as_secs()
                    )),
                    Ok(()) | Err(Cut::Channel) => continue,
                };
                drop(channel);
                audit(serde_json::json!({"path": shown(&req.path), "error": "cut", "message": cut.to_string()}));
                tracing::info!(user = %who.name, %agent, path = %shown(&req.path), error = %cut, "file put cut short");
                return Err(cut);
            }
            _ = state.shutdown.cancelled() => {
                drop(channel);
                return Err(ApiError::AgentUnavailable(
                    "the server is shutting down; the upload was ended and nothing was written".into(),
                ));
            }
            event = channel.next() => match event {
                Some(Event::File(info)) => written = Some(*info),
                Some(Event::Error { code, message }) => {
                    failure.get_or_insert((code, message));
                }
                Some(Event::Exit(_)) => break,
                Some(Event::Lost) | None => {
                    return Err(ApiError::AgentUnavailable(format!(
                        "the link to agent {agent:?} was lost during the upload"
                    )));
                }
                Some(_) => {}
            },
        }
    }
    drop(held);
    match (written, failure) {
        (Some(info), None) => {
            audit(serde_json::json!({
                "path": shown(&info.path),
                "size": info.size,
                "sha256": info.sha256,
                "created": info.created,
            }));
            tracing::info!(
                user = %who.name,
                %agent,
                path = %shown(&info.path),
                size = info.size,
                sha256 = info.sha256.as_deref().unwrap_or(""),
                created = info.created,
                "file put"
            );
            let status = if info.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let body = WrittenFile {
                agent,
                path: shown(&info.path),
                size: info.size,
                sha256: info.sha256.unwrap_or_default(),
                mode: format!("{:04o}", info.mode),
                created: info.created,
            };
            Ok((status, Json(body)).into_response())
        }
        (_, Some((code, message))) => {
            audit(
                serde_json::json!({"path": shown(&req.path), "error": code.as_str(), "message": message}),
            );
            tracing::info!(user = %who.name, %agent, path = %shown(&req.path), code = %code, "file put refused");
            Err(refusal(code, message))
        }
        (None, None) => Err(ApiError::Internal(
            "the agent ended the upload without saying what it wrote".into(),
        )),
    }
}

/// The size (`Content-Length`) and SHA-256 (`Repr-Digest` or
/// `Content-Digest`, `sha-256=:BASE64:`) the client declares.
fn declared(headers: &HeaderMap) -> Result<(Option<u64>, Option<String>), ApiError> {
    let size = match headers.get(header::CONTENT_LENGTH) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest("Content-Length is not a number".into()))?,
        ),
        None => None,
    };
    let mut sha256 = None;
    for name in ["repr-digest", "content-digest"] {
        let Some(value) = headers.get(name) else {
            continue;
        };
        let value = value
            .to_str()
            .map_err(|_| ApiError::BadRequest(format!("{name} is not text")))?;
        for item in value.split(',') {
            let Some((alg, digest)) = item.trim().split_once('=') else {
                continue;
            };
            if !alg.trim().eq_ignore_ascii_case("sha-256") {
                continue;
            }
            use base64::Engine;
            let raw = digest
                .trim()
                .strip_prefix(':')
                .and_then(|d| d.strip_suffix(':'))
                .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
                .filter(|d| d.len() == 32)
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "{name}: sha-256 must be 32 bytes in base64 between colons"
                    ))
                })?;
            let hex = hex::encode(raw);
            if sha256.as_ref().is_some_and(|h| h != &hex) {
                return Err(ApiError::BadRequest(
                    "Repr-Digest and Content-Digest disagree".into(),
                ));
            }
            sha256 = Some(hex);
        }
    }
    Ok((size, sha256))
}

/// A single byte range of `Range: bytes=...`: (offset, length, suffix).
/// Several ranges, other units or bad syntax: `None`, and the whole file
/// is sent (as RFC 9110 allows).
fn byte_range(headers: &HeaderMap) -> Option<(Option<u64>, Option<u64>, Option<u64>)> {
    let value = headers.get(header::RANGE)?.to_str().ok()?;
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.trim().split_once('-')?;
    match (first.trim(), last.trim()) {
        ("", "") => None,
        ("", n) => Some((None, None, Some(n.parse().ok()?))),
        (a, "") => Some((Some(a.parse().ok()?), None, None)),
        (a, b) => {
            let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
            (b >= a).then(|| (Some(a), Some((b - a).saturating_add(1)), None))
        }
    }
}

fn etag(info: &FileInfo) -> Option<String> {
    info.sha256.as_ref().map(|h| format!("\"{h}\""))
}

fn last_modified(info: &FileInfo) -> Option<String> {
    let secs = u64::try_from(info.mtime_ms.div_euclid(1000)).ok()?;
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    Some(httpdate::fmt_http_date(when))
}

/// Whether `If-Range` (an entity tag or a date) still names this version:
/// only then is a range sent, else the whole file.
fn if_range_holds(headers: &HeaderMap, info: &FileInfo) -> bool {
    let Some(value) = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let value = value.trim();
    if value.starts_with('"') {
        return etag(info).as_deref() == Some(value);
    }
    // A date validates only a file unchanged for a second or more: two
    // changes within one second would share it (RFC 9110, 8.8.2.2).
    if info.mtime_ms > crate::audit::now_ms() - 1000 {
        return false;
    }
    match (httpdate::parse_http_date(value), last_modified(info)) {
        (Ok(date), Some(ours)) => httpdate::parse_http_date(&ours).is_ok_and(|o| o == date),
        _ => false,
    }
}

/// `GET /api/v1/files`.
#[utoipa::path(
    get,
    path = "/api/v1/files",
    operation_id = "getFile",
    tag = "files",
    summary = "Read a file on an agent's host",
    description = "Streams a regular file as the agent's user reads it, with `Content-Length`, `Last-Modified`, `Accept-Ranges: bytes` and, when the agent knows this version's SHA-256 (it wrote or read it whole before), `ETag` and `Repr-Digest`. One byte range (`Range: bytes=A-B`, `A-` or `-N`, with `If-Range`) resumes a download. Sent as an attachment (`Content-Disposition`), never shown inline. Viewers may not.",
    params(GetParams),
    responses(
        (status = 200, description = "The file.", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The range asked for.", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, response = ProblemResponse),
        (status = 401, response = ProblemResponse),
        (status = 403, response = ProblemResponse),
        (status = 404, response = ProblemResponse),
        (status = 409, response = ProblemResponse),
        (status = 416, response = ProblemResponse),
        (status = 429, response = ProblemResponse),
        (status = 503, response = ProblemResponse),
    ),
)]
pub(crate) async fn get(
    State(state): State<AppState>,
    Caller(who): Caller,
    super::peer::ClientIp(client): super::peer::ClientIp,
    request: Request,
) -> Result<Response, ApiError> {
    let headers = request.headers().clone();
    // A cookie comes with requests from sibling sites of the same site
    // (`<img src>` on another sub-domain): a download by cookie must come
    // from this server's own page, or be typed in.
    if !headers.contains_key(header::AUTHORIZATION)
        && let Some(site) = headers.get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        return Err(ApiError::Forbidden(
            "a download with the session cookie must come from this server's page".into(),
        ));
    }
    let query = parse_query(request.uri().query(), false)?;
    let (agent, link, held) = prepare(&state, &who, &query, client, Kind::FileGet).await?;
    let path = WirePath(query.path.clone().unwrap_or_default());
    let range = byte_range(&headers);
    let ask = |range: Option<(Option<u64>, Option<u64>, Option<u64>)>| GetRequest {
        path: path.clone(),
        session: query.session.clone(),
        offset: range.and_then(|r| r.0),
        length: range.and_then(|r| r.1),
        suffix: range.and_then(|r| r.2),
        window: Some(DOWNLOAD_WINDOW),
    };
    let via = super::api::via(&headers);
    let audit = |detail: serde_json::Value| {
        state.audit(Kind::FileGet, &who.name, client, &agent, via, detail)
    };
    let (mut channel, mut info) = match open_get(&link, &agent, ask(range)).await {
        Ok(x) => x,
        Err(e) => {
            audit(serde_json::json!({"path": shown(&path), "error": e.to_string()}));
            return Err(e);
        }
    };
    let mut partial = range.is_some();
    if partial && !if_range_holds(&headers, &info) {
        // The file changed since the client's copy: all of it, anew.
        drop(channel);
        (channel, info) = open_get(&link, &agent, ask(None)).await?;
        partial = false;
    }
    if partial && info.length == 0 {
        drop(channel);
        return Err(ApiError::RangeNotSatisfiable {
            message: format!("the file has {} bytes; the range is empty", info.size),
            size: Some(info.size),
        });
    }
    tracing::info!(
        user = %who.name,
        %agent,
        path = %shown(&info.path),
        size = info.size,
        offset = info.offset,
        length = info.length,
        "file get"
    );
    audit(serde_json::json!({
        "path": shown(&info.path),
        "size": info.size,
        "offset": info.offset,
        "length": info.length,
        "sha256": info.sha256,
    }));
    let mut response = Response::builder()
        .status(if partial {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        })
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, info.length)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_DISPOSITION, disposition(&info.path))
        .header("x-file-mode", format!("{:04o}", info.mode));
    if partial {
        let end = info.offset + info.length - 1;
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {}-{end}/{}", info.offset, info.size),
        );
    }
    if let Some(tag) = etag(&info) {
        response = response.header(header::ETAG, tag);
    }
    if let Some(hash) = &info.sha256
        && let Ok(raw) = hex::decode(hash)
    {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        response = response.header("repr-digest", format!("sha-256=:{b64}:"));
    }
    if let Some(date) = last_modified(&info) {
        response = response.header(header::LAST_MODIFIED, date);
    }
    let body = Body::from_stream(download(
        channel,
        held,
        info.length,
        state.api_limits.transfer_idle,
        state.shutdown.clone(),
    ));
    response
        .body(body)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Opens a `get` and waits for its description (or its refusal). A range
/// past the end is asked once more, empty, for the size a 416 names.
async fn open_get(
    link: &AgentLink,
    agent: &str,
    req: GetRequest,
) -> Result<(Channel, FileInfo), ApiError> {
    let ranged = req.offset.is_some() || req.suffix.is_some();
    let mut channel = link.get(&req).await.map_err(|e| link_error(agent, e))?;
    match first_info(&mut channel, agent).await {
        Ok(info) => Ok((channel, info)),
        Err((ErrorCode::RangeNotSatisfiable, message)) if ranged => {
            let sizing = GetRequest {
                offset: None,
                suffix: None,
                length: Some(0),
                ..req
            };
            let mut probe = link.get(&sizing).await.map_err(|e| link_error(agent, e))?;
            let size = first_info(&mut probe, agent).await.ok().map(|i| i.size);
            Err(ApiError::RangeNotSatisfiable { message, size })
        }
        Err((code, message)) => Err(refusal(code, message)),
    }
}

async fn first_info(channel: &mut Channel, agent: &str) -> Result<FileInfo, (ErrorCode, String)> {
    let mut failure = None;
    while let Some(event) = channel.next().await {
        match event {
            Event::File(info) if failure.is_none() => return Ok(*info),
            Event::Error { code, message } => {
                failure.get_or_insert((code, message));
            }
            Event::Exit(_) => break,
            Event::Lost => {
                return Err((
                    ErrorCode::AgentLost,
                    format!("the link to agent {agent:?} was lost"),
                ));
            }
            _ => {}
        }
    }
    Err(failure.unwrap_or((
        ErrorCode::FileError,
        "the agent ended the download without describing the file".into(),
    )))
}

/// A download under way: its channel and what it holds, shared by the
/// body and its watchdog.
struct Download {
    channel: Channel,
    _held: Held,
}

/// The body of a download: the agent's `stdout` frames, each returning its
/// credit once the response has taken it, so that a slow client slows the
/// agent's reading rather than filling the server. A failure midway ends
/// the body with an error (the client sees a cut connection, never a
/// complete-looking short file). A watchdog ends a download whose client
/// has taken nothing for `idle` (or at shutdown): the helper is killed,
/// and the slot and the read-ahead are freed, even while the connection
/// itself stays open.
fn download(
    channel: Channel,
    held: Held,
    length: u64,
    idle: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let shared = Arc::new(tokio::sync::Mutex::new(Some(Download {
        channel,
        _held: held,
    })));
    let origin = tokio::time::Instant::now();
    let polled = Arc::new(AtomicU64::new(0));
    let since_origin = move || origin.elapsed().as_millis() as u64;
    {
        let (shared, polled, shutdown) =
            (Arc::downgrade(&shared), polled.clone(), shutdown.clone());
        let tick = (idle / 4).max(std::time::Duration::from_millis(50));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let quiet = since_origin().saturating_sub(polled.load(Ordering::Acquire));
                if quiet < idle.as_millis() as u64 && !shutdown.is_cancelled() {
                    continue;
                }
                // Locked only while the body waits for the client, not
                // while it waits for the agent.
                if let Ok(mut d) = shared.try_lock() {
                    d.take();
                    return;
                }
            }
        });
    }
    futures_util::stream::unfold(
        (shared, polled, 0u64, false),
        move |(shared, polled, mut sent, done)| {
            let shutdown = shutdown.clone();
            async move {
                if done {
                    return None;
                }
                polled.store(since_origin(), Ordering::Release);
                let mut guard = shared.lock().await;
                let Some(d) = guard.as_mut() else {
                    drop(guard);
                    let e = std::io::Error::other(format!(
                        "the download was ended after {sent} of {length} bytes: the client took \
                         nothing for {} s, or the server is shutting down",
                        idle.as_secs()
                    ));
                    return Some((Err(e), (shared, polled, sent, true)));
                };
                let item = loop {
                    let event = tokio::select! {
                        e = d.channel.next() => e,
                        _ = shutdown.cancelled() => None,
                    };
                    match event {
                        Some(Event::Stdout(data)) => {
                            let _ = d.channel.window(data.len() as u64).await;
                            sent += data.len() as u64;
                            break Some(Ok(data));
                        }
                        Some(Event::Exit(status)) if status.code == Some(0) && sent == length => {
                            break None;
                        }
                        Some(Event::Error { code, message }) => {
                            break Some(Err(std::io::Error::other(format!("{code}: {message}"))));
                        }
                        Some(Event::Exit(_)) | Some(Event::Lost) | None => {
                            break Some(Err(std::io::Error::other(format!(
                                "the download ended after {sent} of {length} bytes"
                            ))));
                        }
                        Some(_) => {}
                    }
                };
                let failed = matches!(item, Some(Err(_)));
                if item.is_none() || failed {
                    // Over: free the slot now, not when hyper drops the body.
                    guard.take();
                }
                drop(guard);
                polled.store(since_origin(), Ordering::Release);
                item.map(|i| (i, (shared, polled, sent, failed)))
            }
        },
    )
}

/// `attachment`, with the file's name (RFC 6266: an ASCII fallback and the
/// exact name percent-encoded).
fn disposition(path: &WirePath) -> HeaderValue {
    let name = std::path::Path::new(path.as_os_str())
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_else(|| b"download".to_vec());
    let ascii: String = String::from_utf8_lossy(&name)
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' && c != '%' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    const ATTR: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let exact = percent_encoding::percent_encode(&name, ATTR);
    HeaderValue::from_str(&format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{exact}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn ranges_are_read_as_http_says() {
        let r = |v: &str| byte_range(&headers(&[("range", v)]));
        assert_eq!(r("bytes=0-99"), Some((Some(0), Some(100), None)));
        assert_eq!(r("bytes=100-"), Some((Some(100), None, None)));
        assert_eq!(r("bytes=-5"), Some((None, None, Some(5))));
        assert_eq!(r("bytes=5-1"), None);
        assert_eq!(r("bytes=0-1,4-5"), None, "several ranges: the whole file");
        assert_eq!(r("items=0-1"), None);
        assert_eq!(byte_range(&HeaderMap::new()), None);
    }

    #[test]
    fn paths_are_bytes_and_unknown_parameters_are_refused() {
        let q = parse_query(Some("path=%2Ftmp%2Fa+b%FF&overwrite=true&mode=0640"), true).unwrap();
        assert_eq!(q.path.unwrap(), b"/tmp/a b\xff");
        assert!(q.overwrite);
        assert_eq!(q.mode, Some(0o640));
        assert!(parse_query(Some("path=x&overwite=true"), true).is_err());
        assert!(parse_query(Some("path=x&path=y"), true).is_err());
        assert!(parse_query(Some("path=x&overwrite=true"), false).is_err());
        assert!(parse_query(Some("path=a%00b"), true).is_err());
        assert!(
            parse_query(Some("agent=a"), true).is_err(),
            "path is required"
        );
        assert!(parse_query(Some("path=x&mode=999"), true).is_err());
        assert!(parse_query(Some("path=x&mode=%2B7"), true).is_err());
        assert!(parse_query(Some("path=x&mode=00644"), true).is_err());
        assert!(parse_query(Some("path=x&mode=7777"), true).is_ok());
        // `name` is one component: never empty, never a path.
        assert!(parse_query(Some("path=x&name="), true).is_err());
        assert!(parse_query(Some("path=x&name=a%2Fb"), true).is_err());
        assert!(parse_query(Some("path=x&name=a%20b"), true).is_ok());
    }

    #[test]
    fn a_declared_digest_is_read_from_either_header() {
        let sha = "LCa0a2j/xo/5m0U8HTBBNBNCLXBkg7+g+YpeiGJm564=";
        let (size, hash) = declared(&headers(&[
            ("content-length", "5"),
            ("repr-digest", &format!("sha-256=:{sha}:")),
        ]))
        .unwrap();
        assert_eq!(size, Some(5));
        assert_eq!(
            hash.as_deref(),
            Some("2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae")
        );
        assert!(declared(&headers(&[("repr-digest", "sha-256=:short:")])).is_err());
    }

    #[test]
    fn a_download_is_an_attachment_with_its_exact_name() {
        let d = disposition(&WirePath(b"/tmp/r\xc3\xa9sum\xc3\xa9 \"1\".txt".to_vec()));
        assert_eq!(
            d.to_str().unwrap(),
            "attachment; filename=\"r_sum_ _1_.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%221%22.txt"
        );
    }
}
