//! The REST API: one-off commands (`POST /api/v1/exec`), agents, tokens.
//!
//! Scripts authenticate with `Authorization: Bearer <token>` (the admin
//! token or a named API token); the console's session cookie works too, for
//! requests that change something only with this server's own `Origin`. Each request's command runs on an agent channel
//! like a console command, under the same limits.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use encoding_rs::{Encoding, UTF_8};
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use utoipa::{ToResponse, ToSchema};

use super::State as AppState;
use super::agents::AgentStatus;
use super::auth::Role;
use super::bridge::{self, Failure, Update};
use super::caller::{Admin, Caller, Writer};
use super::peer::ClientIp;
use super::problem::{ApiError, Problem};
use super::quota::Ticket;
use super::tokens::TokenError;
use crate::link::{Channel, LinkError};
use crate::protocol::ExecRequest;
use crate::protocol::MAX_PAYLOAD_LEN;
use crate::rest::{self, ExecResult, Stream, StreamLine};

/// The largest integer the API takes: 2^53 - 1, which every JSON reader
/// (JavaScript's included) keeps exactly (RFC 7493).
pub(crate) const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// The encodings output may be decoded from, by their canonical WHATWG
/// names (any of their labels is accepted too); listed in the API's
/// description. The `replacement` encoding decodes nothing and is left out.
pub(crate) const ENCODINGS: &[&Encoding] = &[
    UTF_8,
    encoding_rs::IBM866,
    encoding_rs::ISO_8859_2,
    encoding_rs::ISO_8859_3,
    encoding_rs::ISO_8859_4,
    encoding_rs::ISO_8859_5,
    encoding_rs::ISO_8859_6,
    encoding_rs::ISO_8859_7,
    encoding_rs::ISO_8859_8,
    encoding_rs::ISO_8859_8_I,
    encoding_rs::ISO_8859_10,
    encoding_rs::ISO_8859_13,
    encoding_rs::ISO_8859_14,
    encoding_rs::ISO_8859_15,
    encoding_rs::ISO_8859_16,
    encoding_rs::KOI8_R,
    encoding_rs::KOI8_U,
    encoding_rs::MACINTOSH,
    encoding_rs::WINDOWS_874,
    encoding_rs::WINDOWS_1250,
    encoding_rs::WINDOWS_1251,
    encoding_rs::WINDOWS_1252,
    encoding_rs::WINDOWS_1253,
    encoding_rs::WINDOWS_1254,
    encoding_rs::WINDOWS_1255,
    encoding_rs::WINDOWS_1256,
    encoding_rs::WINDOWS_1257,
    encoding_rs::WINDOWS_1258,
    encoding_rs::X_MAC_CYRILLIC,
    encoding_rs::GBK,
    encoding_rs::GB18030,
    encoding_rs::BIG5,
    encoding_rs::EUC_JP,
    encoding_rs::ISO_2022_JP,
    encoding_rs::SHIFT_JIS,
    encoding_rs::EUC_KR,
    encoding_rs::UTF_16BE,
    encoding_rs::UTF_16LE,
    encoding_rs::X_USER_DEFINED,
];

/// The command's default time limit: 30 s.
pub(crate) const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// Output kept per stream by default in a buffered (non-streaming) answer:
/// 1 MiB. Streaming answers keep nothing and have no default cap.
pub(crate) const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;

/// The API's limits, from the server's configuration.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Cap on `timeout_ms`.
    pub max_timeout_ms: u64,
    /// Cap on `max_output_bytes` of a buffered answer.
    pub max_output_bytes: usize,
    /// Commands running through the API at once (429 beyond).
    pub max_concurrent: usize,
    /// Requests per principal per minute (429 beyond).
    pub rate_per_minute: u32,
    /// Output all buffered answers together may hold, in bytes: each
    /// reserves twice its `max_output_bytes` (stdout and stderr) before its
    /// command starts, and gets 503 when the budget cannot hold it.
    pub buffered_budget: usize,
    /// A file transfer that moves no byte for this long (a client that
    /// neither sends nor reads) is ended, and what it held is freed.
    pub transfer_idle: std::time::Duration,
}

// `server::openapi` adds the "exactly one of `command` and `argv`" rule
// as a `oneOf`, which the derive cannot say.
/// A command to run. A field may be left out; `null` is refused like any
/// other value of the wrong type.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ExecRequest)]
struct ExecBody {
    /// A shell command line, run with `sh -c`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, min_length = 1)]
    command: Option<String>,
    /// A program and its arguments, run without a shell.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Vec<String>, min_items = 1)]
    argv: Option<Vec<String>>,
    /// The working directory (default: the user's home).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String)]
    cwd: Option<String>,
    /// Variables added to the command's minimal environment.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = BTreeMap<String, String>)]
    env: Option<BTreeMap<String, String>>,
    /// Given to the command's standard input, which is then closed.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String)]
    stdin: Option<String>,
    /// Milliseconds before the command is killed; capped by the server's
    /// `--max-timeout-ms`.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = u64, minimum = 1, maximum = 9007199254740991_u64, default = 30000)]
    timeout_ms: Option<u64>,
    /// Output kept per stream in a buffered answer (default 1 MiB), or sent
    /// per stream in a streamed one (default: no cap); capped by the
    /// server's `--max-output-bytes`.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = u64, minimum = 0, maximum = 9007199254740991_u64)]
    max_output_bytes: Option<u64>,
    /// The WHATWG encoding the command's output is decoded from, by its
    /// name (`gbk`, `shift_jis`...); its other labels are accepted too.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, default = "utf-8")]
    encoding: Option<String>,
    /// The agent's name; by default the only one. An unknown name gets 404.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, min_length = 1)]
    agent: Option<String>,
    /// Instead of `agent`: a selector (`web-*`, `role=web,env!=staging`);
    /// the command runs on every agent it matches, and the answer has one
    /// result per host and a summary. Offline hosts are reported as
    /// unreachable. A selector that matches no agent gets 404.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, min_length = 1)]
    target: Option<String>,
    /// With `target`: hosts running the command at once (default: all).
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = u64, minimum = 1, maximum = 9007199254740991_u64)]
    concurrency: Option<u64>,
}

/// An optional field that, when present, must hold a value (not `null`).
pub(crate) fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A count: a JSON number with no fractional part (`300` or `300.0`, both
/// integers to JSON Schema), from 0 to 2^53 - 1.
fn whole_number<'de, D>(d: D) -> Result<Option<u64>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    let n = serde_json::Number::deserialize(d)?;
    let value = match (n.as_u64(), n.as_f64()) {
        (Some(v), _) => Some(v),
        (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f <= MAX_SAFE_INTEGER as f64 => {
            Some(f as u64)
        }
        _ => None,
    };
    match value {
        Some(v) if v <= MAX_SAFE_INTEGER => Ok(Some(v)),
        _ => Err(D::Error::custom(format!(
            "{n} is not a whole number from 0 to {MAX_SAFE_INTEGER} (2^53 - 1, the largest \
             integer every JSON reader keeps exactly)"
        ))),
    }
}

/// A JSON error as a 400. (No field is a Rust integer type to serde: the
/// counts go through `whole_number`, whose errors are in the caller's words.)
fn json_error(e: &serde_json::Error) -> ApiError {
    ApiError::BadRequest(format!("malformed JSON body: {e}"))
}

/// A validated request.
pub(super) struct Prepared {
    pub(super) req: ExecRequest,
    pub(super) stdin: Bytes,
    /// Per stream; `None`: no cap (streaming only).
    pub(super) max_output: Option<usize>,
    pub(super) encoding: &'static Encoding,
    agent: Option<String>,
    /// A fan-out: the hosts, and how many at once.
    target: Option<(crate::selector::Selector, Option<usize>)>,
}

fn prepare(body: ExecBody, limits: &ApiLimits, streaming: bool) -> Result<Prepared, ApiError> {
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
        (Some(c), None) if c.is_empty() => {
            return Err(ApiError::BadRequest("\"command\" is empty".into()));
        }
        _ => {}
    }
    let encoding = match body.encoding.as_deref() {
        None => UTF_8,
        // The `replacement` encoding's labels name no way to decode output.
        Some(label) => Encoding::for_label(label.as_bytes())
            .filter(|e| *e != encoding_rs::REPLACEMENT)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "unknown encoding {label:?}; use a WHATWG encoding such as utf-8, gbk or \
                     shift_jis"
                ))
            })?,
    };
    if body.agent.as_deref() == Some("") {
        return Err(ApiError::BadRequest(
            "\"agent\" is empty; leave it out for the only agent".into(),
        ));
    }
    let target = match (&body.agent, &body.target, body.concurrency) {
        (Some(_), Some(_), _) => {
            return Err(ApiError::BadRequest(
                "give either \"agent\" (one host) or \"target\" (a selector), not both".into(),
            ));
        }
        (_, None, Some(_)) => {
            return Err(ApiError::BadRequest(
                "\"concurrency\" goes with \"target\"".into(),
            ));
        }
        (_, _, Some(0)) => {
            return Err(ApiError::BadRequest(
                "\"concurrency\" must be at least 1".into(),
            ));
        }
        (_, Some(text), concurrency) => Some((
            crate::selector::Selector::parse(text)
                .map_err(|e| ApiError::BadRequest(format!("\"target\": {e}")))?,
            concurrency.map(|c| usize::try_from(c).unwrap_or(usize::MAX)),
        )),
        (_, None, None) => None,
    };
    if body.timeout_ms == Some(0) {
        return Err(ApiError::BadRequest(
            "\"timeout_ms\" must be at least 1".into(),
        ));
    }
    let timeout = body
        .timeout_ms
        .unwrap_or(DEFAULT_TIMEOUT_MS)
        .min(limits.max_timeout_ms);
    // A streamed answer holds nothing back, so it needs no cap; a buffered
    // one holds everything, so it always has one.
    let max_output_bytes = body
        .max_output_bytes
        .map(|v| usize::try_from(v).unwrap_or(usize::MAX));
    // A fan-out keeps less per host by default: it holds every host's.
    let default_cap = if target.is_some() {
        super::fanout::DEFAULT_MAX_OUTPUT_PER_HOST
    } else {
        DEFAULT_MAX_OUTPUT
    };
    let max_output = match (streaming, max_output_bytes) {
        (true, cap) => cap,
        (false, cap) => Some(cap.unwrap_or(default_cap).min(limits.max_output_bytes)),
    };
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
        target,
    })
}

/// A JSON request body of at most `limit` bytes: the one content-type
/// check of the API (`application/json` or any `+json`, else 415).
pub(crate) async fn read_json_body<T: serde::de::DeserializeOwned>(
    request: Request,
    limit: usize,
) -> Result<T, ApiError> {
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
    serde_json::from_slice(&bytes).map_err(|e| json_error(&e))
}

/// Whether the client asked for a streamed (NDJSON) answer: it accepts
/// `application/x-ndjson` with a non-zero quality.
fn wants_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let mime = parts.next().unwrap_or("");
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .filter_map(|q| q.parse::<f32>().ok())
                .next()
                .unwrap_or(1.0);
            mime.eq_ignore_ascii_case("application/x-ndjson") && q > 0.0
        })
}

/// Every API error's answer, for the API's description.
#[derive(ToResponse)]
#[response(
    description = "An error, as RFC 9457 problem details.",
    content_type = "application/problem+json"
)]
pub(crate) struct ProblemResponse(#[allow(dead_code)] Problem);

/// `POST /api/v1/exec`.
#[utoipa::path(
    post,
    path = "/api/v1/exec",
    operation_id = "exec",
    tag = "commands",
    summary = "Run one command",
    description = "Answers when the command ends. With `Accept: application/x-ndjson` it answers at once and streams one JSON object per line (a `StreamLine`): output chunks as they come (`encoding: base64` for a chunk that is not text), at most one `truncated` line per stream, then one last line: the exit status, or `error` when the command could not run to its end. A client that disconnects kills its command.",
    request_body(content = ExecBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The command ran (whatever its exit code).", content(
            (ExecResult = "application/json"),
            (StreamLine = "application/x-ndjson"),
        )),
        (status = 400, response = ProblemResponse),
        (status = 403, response = ProblemResponse),
        (status = 404, response = ProblemResponse),
        (status = 413, response = ProblemResponse),
        (status = 415, response = ProblemResponse),
        (status = 503, response = ProblemResponse),
    ),
)]
pub(crate) async fn exec(
    State(state): State<AppState>,
    Writer(who): Writer,
    ClientIp(client): ClientIp,
    request: Request,
) -> Result<Response, ApiError> {
    let headers = request.headers().clone();
    if !who.role.can_run() {
        let denied =
            super::policy::Refused::Denied(super::policy::Denied::Viewer(who.name.clone()));
        audit_refusal(
            &state,
            &who,
            client,
            None,
            crate::audit::Kind::CommandStart,
            &denied,
        );
        return Err(ApiError::Forbidden(denied.to_string()));
    }
    let limits = &state.api_limits;
    state
        .api_rate
        .check(&who.name)
        .map_err(|retry_after| ApiError::TooManyRequests {
            message: format!("more than {} requests a minute", limits.rate_per_minute),
            retry_after,
        })?;
    let streaming = wants_stream(&headers);
    let body: ExecBody = read_json_body(request, limits.max_body_bytes).await?;
    let mut prepared = prepare(body, limits, streaming)?;
    let target = prepared.target.take();
    let target_text = target
        .as_ref()
        .map(|(s, _)| s.to_string())
        .unwrap_or_default();
    let hosts = match &target {
        Some((selector, _)) => {
            let hosts: Vec<String> = state
                .agents
                .select(selector)
                .into_iter()
                .filter(|name| super::policy::visible(&who, name, &state.agents))
                .collect();
            if hosts.is_empty() {
                return Err(ApiError::NotFound(format!(
                    "no agent matches the target {selector}"
                )));
            }
            hosts
        }
        None => Vec::new(),
    };
    // A buffered answer reserves its memory before the command runs, so
    // that nothing it prints is lost for want of room.
    let reservation = match prepared.max_output {
        Some(cap) if !streaming => Some(reserve_output(
            &state,
            cap.saturating_mul(hosts.len().max(1)),
        )?),
        _ => None,
    };
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
    if let Some((_, concurrency)) = target {
        let mut detail = command_detail(&prepared.req, &headers);
        detail["target"] = target_text.clone().into();
        let run = super::fanout::Fanout {
            state: state.clone(),
            who,
            prepared,
            hosts,
            concurrency,
            source: client.to_string(),
            detail,
        };
        return Ok(run.respond(streaming, (permit, reservation)).await);
    }
    let (agent, link) = super::policy::link_to_run(&who, prepared.agent.as_deref(), &state.agents)
        .map_err(|e| {
            audit_refusal(
                &state,
                &who,
                client,
                prepared.agent.as_deref(),
                crate::audit::Kind::CommandStart,
                &e,
            );
            refused(e)
        })?;
    let ticket = state
        .quota
        .admit(&who.name, &agent, link.info().max_channels)
        .map_err(|e| ApiError::TooManyRequests {
            message: e.to_string(),
            retry_after: 1,
        })?;
    // Recorded (committed) before the agent hears of it: a command that
    // runs has its start record, even if this server dies now.
    let mut detail = command_detail(&prepared.req, &headers);
    if !prepared.stdin.is_empty() {
        use sha2::Digest;
        detail["stdin"] = serde_json::json!({
            "length": prepared.stdin.len(),
            "sha256": hex::encode(sha2::Sha256::digest(&prepared.stdin)),
        });
    }
    let mut trail = crate::audit::CommandTrail::start(
        &state.audit,
        crate::audit::Event {
            kind: crate::audit::Kind::CommandStart,
            user: who.name.clone(),
            source: client.to_string(),
            agent: agent.clone(),
            via: via(&headers),
            detail,
        },
    )
    .await;
    let channel = link.exec(prepared.req.clone()).await.map_err(|e| {
        trail.end(None, Some(&e.to_string()));
        match e {
            LinkError::TooLarge { size, .. } => ApiError::TooLarge(format!(
                "the command, its arguments and environment make a request of {size} bytes; \
             the agent accepts at most {MAX_PAYLOAD_LEN} (a single argument at most 128 KiB, \
             as the kernel)"
            )),
            e => ApiError::AgentUnavailable(format!("agent {agent:?}: {e}")),
        }
    })?;
    // Always end stdin, so that a command reading it sees EOF, not a hang;
    // written beside the reading of output, so that a command that echoes
    // more than the credit window cannot deadlock against its own input.
    let data = prepared.stdin.clone();
    super::metrics::input(data.len());
    channel.controller().stdin_to_end(data);
    tracing::info!(user = %who.name, agent = %agent, "api exec");
    let held = Held {
        _permit: permit,
        _ticket: ticket,
        _reservation: reservation,
        trail,
    };
    if streaming {
        let shutdown = state.shutdown.clone();
        return Ok(stream_response(channel, prepared, held, agent, shutdown));
    }
    // Dropping the channel (on any early return) kills the command.
    buffered_response(channel, prepared, agent, held, state.shutdown.clone()).await
}

/// What the audit log keeps of a command: its line or argv, cwd, and the
/// client's request id (`X-Request-Id`) when it sent one.
pub(super) fn command_detail(
    req: &crate::protocol::ExecRequest,
    headers: &HeaderMap,
) -> serde_json::Value {
    use sha2::Digest;
    // Cut where too long, and then said so, with the whole one's length
    // and hash: what ran is never hidden behind a cut.
    let keep = |text: &str, max: usize, detail: &mut serde_json::Value, key: &str| {
        if text.chars().count() > max {
            detail[format!("{key}_cut")] = serde_json::json!({
                "length": text.len(),
                "sha256": hex::encode(sha2::Sha256::digest(text.as_bytes())),
            });
        }
        text.chars().take(max).collect::<String>()
    };
    let mut detail = serde_json::json!({});
    if let Some(cmd) = &req.cmd {
        detail["command"] = keep(cmd, 4096, &mut detail, "command").into();
    }
    if let Some(argv) = &req.argv {
        let whole = serde_json::to_string(argv).unwrap_or_default();
        let shown: Vec<String> = argv
            .iter()
            .take(64)
            .map(|a| a.chars().take(256).collect())
            .collect();
        if shown.len() < argv.len() || shown.iter().zip(argv).any(|(s, a)| s.len() < a.len()) {
            detail["argv_cut"] = serde_json::json!({
                "length": whole.len(),
                "sha256": hex::encode(sha2::Sha256::digest(whole.as_bytes())),
            });
        }
        detail["argv"] = shown.into();
    }
    if let Some(cwd) = &req.cwd {
        detail["cwd"] = keep(cwd, 1024, &mut detail, "cwd").into();
    }
    if let Some(env) = &req.env {
        // Names only (values may be secrets), and a hash of the whole.
        let whole = serde_json::to_string(env).unwrap_or_default();
        detail["env"] = serde_json::json!({
            "names": env.keys().take(64).map(|k| k.chars().take(128).collect::<String>()).collect::<Vec<_>>(),
            "sha256": hex::encode(sha2::Sha256::digest(whole.as_bytes())),
        });
    }
    if let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        detail["request_id"] = id.chars().take(128).collect::<String>().into();
    }
    detail
}

/// `cli` when the request comes from `conch exec` or `conch cp`, else `rest`.
pub(super) fn via(headers: &HeaderMap) -> crate::audit::Via {
    let cli = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ua| ua.starts_with("conch-cli/"));
    if cli {
        crate::audit::Via::Cli
    } else {
        crate::audit::Via::Rest
    }
}

/// Records a refusal by policy (not an unknown or unavailable agent,
/// which refuses nobody in particular) as `denied`.
pub(super) fn audit_refusal(
    state: &AppState,
    who: &super::auth::Principal,
    client: std::net::IpAddr,
    agent: Option<&str>,
    wanted: crate::audit::Kind,
    e: &super::policy::Refused,
) {
    if let super::policy::Refused::Denied(denied) = e {
        state.audit(
            crate::audit::Kind::Denied,
            &who.name,
            client,
            agent.unwrap_or_default(),
            crate::audit::Via::Rest,
            serde_json::json!({"wanted": wanted.as_str(), "reason": denied.to_string()}),
        );
    }
}

/// The API's answer when `who` may not run on the agent asked for: an
/// agent beyond its reach is "not found", like one that does not exist.
pub(super) fn refused(e: super::policy::Refused) -> ApiError {
    use super::agents::AgentError;
    use super::policy::{Denied, Refused};
    match e {
        Refused::Agent(AgentError::Unavailable(_)) => ApiError::AgentUnavailable(e.to_string()),
        Refused::Agent(AgentError::Unknown(_))
        | Refused::Denied(Denied::OutOfScope(_) | Denied::NotYours(_)) => {
            ApiError::NotFound(e.to_string())
        }
        Refused::Denied(Denied::Viewer(_)) => ApiError::Forbidden(e.to_string()),
        Refused::Agent(AgentError::Ambiguous) => ApiError::BadRequest(e.to_string()),
    }
}

/// What a running API command holds until its answer is complete: its
/// concurrency slot, its share of the agent, its output memory.
struct Held {
    _permit: OwnedSemaphorePermit,
    _ticket: Ticket,
    _reservation: Option<OwnedSemaphorePermit>,
    /// Its audit records (the end written when it ends, or when dropped).
    trail: crate::audit::CommandTrail,
}

/// Memory one buffered answer may take, as a multiple of its per-stream cap.
const BUFFER_FACTOR: usize = 5;

/// Reserves memory for a buffered answer of at most `cap` bytes a stream.
pub(super) fn reserve_output(
    state: &AppState,
    cap: usize,
) -> Result<OwnedSemaphorePermit, ApiError> {
    let budget = state.api_limits.buffered_budget;
    // Both streams' raw bytes, their JSON strings (base64 is 4/3) and the
    // encoded body: five times the cap bounds the peak of one answer.
    let need = cap.saturating_mul(BUFFER_FACTOR).max(1);
    let hint = "stream the output instead (Accept: application/x-ndjson)";
    if need > budget {
        return Err(ApiError::TooLarge(format!(
            "max_output_bytes of {cap} needs {need} bytes of buffer, more than the server's \
             budget of {budget} for all buffered answers; {hint}"
        )));
    }
    let Ok(permits) = u32::try_from(need) else {
        return Err(ApiError::TooLarge(format!(
            "max_output_bytes of {cap} is too large for a buffered answer; {hint}"
        )));
    };
    state
        .output_budget
        .clone()
        .try_acquire_many_owned(permits)
        .map_err(|_| {
            ApiError::Busy(format!(
                "the server is buffering other commands' output up to its budget of {budget} \
                 bytes; try again shortly, or {hint}"
            ))
        })
}

/// Collects a stream's output up to a limit, counting what was dropped.
pub(super) struct Capture {
    pub(super) data: Vec<u8>,
    limit: usize,
    pub(super) truncated: bool,
}

impl Capture {
    pub(super) fn new(limit: usize) -> Self {
        Capture {
            data: Vec::new(),
            limit,
            truncated: false,
        }
    }

    pub(super) fn push(&mut self, bytes: &[u8]) {
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

/// Bytes `text` takes inside a JSON string: control characters cost six
/// (`\u0000`), quotes, backslashes and the short escapes two.
fn json_cost(text: &str) -> usize {
    text.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// Output as JSON strings: text when it decodes and is no larger than its
/// base64 would be, else base64 (so 64 MiB of NUL bytes take 85 MiB, not
/// the 384 MiB of `\u0000` escapes).
pub(super) fn encode_streams(
    out: &[u8],
    err: &[u8],
    encoding: &'static Encoding,
) -> (String, String, rest::Encoding) {
    let base64_len = |n: usize| n.div_ceil(3) * 4;
    if let (Some(o), Some(e)) = (decode(out, encoding), decode(err, encoding))
        && json_cost(&o) + json_cost(&e) <= base64_len(out.len()) + base64_len(err.len())
    {
        return (o, e, rest::Encoding::Utf8);
    }
    (
        BASE64.encode(out),
        BASE64.encode(err),
        rest::Encoding::Base64,
    )
}

async fn buffered_response(
    mut channel: Channel,
    prepared: Prepared,
    agent: String,
    mut held: Held,
    shutdown: CancellationToken,
) -> Result<Response, ApiError> {
    let cap = prepared.max_output.unwrap_or(DEFAULT_MAX_OUTPUT);
    let mut out = Capture::new(cap);
    let mut err = Capture::new(cap);
    loop {
        match bridge::next(&mut channel, &shutdown).await {
            Update::Output(stream, b) => {
                held.trail.output(b.len());
                match stream {
                    Stream::Stdout => out.push(&b),
                    Stream::Stderr => err.push(&b),
                }
                let _ = channel.window(b.len() as u64).await;
            }
            // REST commands open no sessions: neither can come.
            Update::Notice { .. } | Update::Session(_) | Update::Resized { .. } => {}
            Update::Detached(_) => {
                held.trail.end(None, Some(&Failure::Lost.describe(&agent)));
                return Err(ApiError::AgentUnavailable(Failure::Lost.describe(&agent)));
            }
            Update::Failed(failure) => {
                held.trail.end(None, Some(&failure.describe(&agent)));
                return Err(ApiError::AgentUnavailable(failure.describe(&agent)));
            }
            Update::Exit(status) => {
                held.trail.end(Some(&status), None);
                let (stdout, stderr, encoding) =
                    encode_streams(&out.data, &err.data, prepared.encoding);
                drop((out.data, err.data));
                let body = ExecResult {
                    exit: status.into(),
                    stdout,
                    stderr,
                    encoding,
                    stdout_truncated: out.truncated,
                    stderr_truncated: err.truncated,
                };
                // The reservation lasts until the body has been written:
                // a client that does not read keeps its memory counted.
                let bytes = serde_json::to_vec(&body)
                    .map_err(|e| ApiError::Internal(format!("cannot encode the answer: {e}")))?;
                return Ok(json_holding(bytes, held));
            }
        }
    }
}

/// A JSON answer of `bytes` that keeps `held` (memory reserved, slots)
/// until the client has taken the whole body.
pub(super) fn json_holding(bytes: Vec<u8>, held: impl Send + Sync + 'static) -> Response {
    let chunk = futures_util::stream::once(async move {
        let _held = held;
        Ok::<_, Infallible>(Bytes::from(bytes))
    });
    let mut response = Body::from_stream(chunk).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Decodes one stream's chunks as they come; a chunk that is not valid
/// text is sent base64-encoded instead.
/// With a cap, it counts what it has passed on and, once the cap is
/// reached, says so in a line of its own and drops the rest (the command
/// runs on); without one it passes everything: streaming holds nothing back.
pub(super) struct StreamDecoder {
    stream: Stream,
    encoding: &'static Encoding,
    sent: usize,
    limit: Option<usize>,
    pub(super) truncated: bool,
    /// The start of a character whose end is still to come, held here (not
    /// inside a decoder) so that it can be sent as bytes if the stream
    /// ends first.
    carry: Vec<u8>,
}

impl StreamDecoder {
    pub(super) fn new(stream: Stream, encoding: &'static Encoding, limit: Option<usize>) -> Self {
        StreamDecoder {
            stream,
            encoding,
            sent: 0,
            limit,
            truncated: false,
            carry: Vec::new(),
        }
    }

    fn output(&self, data: String, encoding: Option<rest::Encoding>) -> StreamLine {
        StreamLine::Output {
            stream: self.stream,
            data,
            encoding,
        }
    }

    /// UTF-8 text of `buf` (what was carried and the new bytes), holding back an
    /// incomplete last character; invalid bytes go whole as base64.
    fn utf8_lines(&mut self, buf: &[u8], lines: &mut Vec<StreamLine>) {
        match std::str::from_utf8(buf) {
            Ok("") => {}
            Ok(text) => lines.push(self.output(text.to_owned(), None)),
            Err(e) if e.error_len().is_none() => {
                let (text, tail) = buf.split_at(e.valid_up_to());
                if !text.is_empty() {
                    let text = String::from_utf8_lossy(text).into_owned();
                    lines.push(self.output(text, None));
                }
                self.carry = tail.to_vec();
            }
            Err(_) => lines.push(self.output(BASE64.encode(buf), Some(rest::Encoding::Base64))),
        }
    }

    /// Text of `buf` (what was carried and the new bytes) in a legacy encoding (gbk,
    /// shift_jis...): the longest start of it that decodes whole, holding
    /// back at most 3 bytes that may begin a character still to come;
    /// bytes that do not decode go whole as base64. Each piece is decoded
    /// on its own, so a stateful encoding (ISO-2022-JP) must repeat its
    /// escape sequence in each chunk to be read as text.
    fn legacy_lines(&mut self, buf: &[u8], lines: &mut Vec<StreamLine>) {
        if buf.is_empty() {
            return;
        }
        for held in 0..=3.min(buf.len() - 1) {
            let (text, tail) = buf.split_at(buf.len() - held);
            if let Some(decoded) = self
                .encoding
                .decode_without_bom_handling_and_without_replacement(text)
            {
                if !decoded.is_empty() {
                    lines.push(self.output(decoded.into_owned(), None));
                }
                self.carry = tail.to_vec();
                return;
            }
        }
        lines.push(self.output(BASE64.encode(buf), Some(rest::Encoding::Base64)));
    }

    /// What is still held when the stream ends, as base64: nothing of the
    /// output is lost, even half a character.
    pub(super) fn finish(&mut self) -> Option<StreamLine> {
        if self.carry.is_empty() {
            return None;
        }
        let held = std::mem::take(&mut self.carry);
        Some(self.output(BASE64.encode(held), Some(rest::Encoding::Base64)))
    }

    /// The JSON lines for a chunk (none, one, or an output line and the
    /// truncation notice).
    pub(super) fn lines(&mut self, bytes: &[u8]) -> Vec<StreamLine> {
        let mut lines = Vec::new();
        if self.truncated {
            return lines;
        }
        let keep = match self.limit {
            Some(limit) => limit.saturating_sub(self.sent).min(bytes.len()),
            None => bytes.len(),
        };
        self.sent += keep;
        let kept = &bytes[..keep];
        // Only a carried partial character costs a copy; a chunk alone is
        // read where it lies.
        let joined;
        let buf: &[u8] = if self.carry.is_empty() {
            kept
        } else {
            joined = [std::mem::take(&mut self.carry).as_slice(), kept].concat();
            &joined
        };
        if self.encoding == UTF_8 {
            self.utf8_lines(buf, &mut lines);
        } else {
            self.legacy_lines(buf, &mut lines);
        }
        if keep < bytes.len() {
            self.truncated = true;
            lines.extend(self.finish());
            lines.push(StreamLine::Truncated {
                truncated: self.stream,
                limit: self.limit.unwrap_or(0) as u64,
            });
        }
        lines
    }
}

fn ndjson(line: &StreamLine) -> Bytes {
    let mut bytes = serde_json::to_vec(line).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn stream_response(
    channel: Channel,
    prepared: Prepared,
    held: Held,
    agent: String,
    shutdown: CancellationToken,
) -> Response {
    struct St {
        channel: Channel,
        out: StreamDecoder,
        err: StreamDecoder,
        done: bool,
        agent: String,
        shutdown: CancellationToken,
        held: Held,
    }
    let st = St {
        channel,
        out: StreamDecoder::new(Stream::Stdout, prepared.encoding, prepared.max_output),
        err: StreamDecoder::new(Stream::Stderr, prepared.encoding, prepared.max_output),
        done: false,
        agent,
        shutdown,
        held,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            let lines = match bridge::next(&mut st.channel, &st.shutdown).await {
                Update::Output(stream, b) => {
                    st.held.trail.output(b.len());
                    // Credit goes back as the client takes the lines: this
                    // future is polled only when the client reads.
                    let _ = st.channel.window(b.len() as u64).await;
                    match stream {
                        Stream::Stdout => st.out.lines(&b),
                        Stream::Stderr => st.err.lines(&b),
                    }
                }
                Update::Notice { .. } | Update::Session(_) | Update::Resized { .. } => continue,
                Update::Failed(failure) => {
                    st.done = true;
                    st.held.trail.end(None, Some(&failure.describe(&st.agent)));
                    vec![StreamLine::Error {
                        error: failure.describe(&st.agent),
                    }]
                }
                Update::Detached(_) => {
                    st.done = true;
                    st.held
                        .trail
                        .end(None, Some(&Failure::Lost.describe(&st.agent)));
                    vec![StreamLine::Error {
                        error: Failure::Lost.describe(&st.agent),
                    }]
                }
                Update::Exit(status) => {
                    st.done = true;
                    st.held.trail.end(Some(&status), None);
                    let mut lines: Vec<StreamLine> =
                        st.out.finish().into_iter().chain(st.err.finish()).collect();
                    lines.push(StreamLine::Exit {
                        exit: status.into(),
                        stdout_truncated: st.out.truncated,
                        stderr_truncated: st.err.truncated,
                    });
                    lines
                }
            };
            if lines.is_empty() {
                continue;
            }
            let mut bytes = Vec::new();
            for line in &lines {
                bytes.extend_from_slice(&ndjson(line));
            }
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

/// `GET /api/v1/agents`'s answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct AgentList {
    agents: Vec<AgentStatus>,
}

/// `GET /api/v1/agents`.
#[utoipa::path(
    get,
    path = "/api/v1/agents",
    operation_id = "listAgents",
    tag = "agents",
    summary = "List agents with their labels, status and host facts",
    params(("selector" = Option<String>, Query, description = "Only the agents this selector matches (`web-*`, `role=web,env!=staging`).")),
    responses(
        (status = 200, description = "The agents the caller may use, in name order.", body = AgentList),
        (status = 400, response = ProblemResponse),
    ),
)]
pub(crate) async fn agents(
    State(state): State<AppState>,
    Caller(who): Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Json<AgentList>, ApiError> {
    let mut selector = None;
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "selector" if selector.is_none() => {
                selector = Some(
                    crate::selector::Selector::parse(&value)
                        .map_err(|e| ApiError::BadRequest(format!("selector: {e}")))?,
                )
            }
            "selector" => return Err(ApiError::BadRequest("give one selector".into())),
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; this takes \"selector\""
                )));
            }
        }
    }
    let chosen = selector.map(|s| state.agents.select(&s));
    let mut agents = state.agents.statuses();
    agents.retain(|a| {
        super::policy::visible(&who, &a.name, &state.agents)
            && chosen.as_ref().is_none_or(|c| c.contains(&a.name))
    });
    Ok(Json(AgentList { agents }))
}

fn token_error(e: TokenError) -> ApiError {
    match e {
        TokenError::Exists(_) => ApiError::Conflict(e.to_string()),
        TokenError::BadName => ApiError::BadRequest(e.to_string()),
        TokenError::Missing(_) => ApiError::NotFound(e.to_string()),
        TokenError::Store(_) => ApiError::Internal(e.to_string()),
    }
}

/// The body of `POST /api/v1/tokens`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewToken {
    /// Letters, digits, `.`, `_` and `-`; at most 64.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    name: String,
    role: Role,
    /// A selector of the only agents the token may use; default every agent.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, min_length = 1)]
    agents: Option<String>,
}

/// A token as listed: never its secret.
#[derive(Serialize, ToSchema)]
pub(crate) struct TokenInfo {
    name: String,
    role: Role,
    /// When it was created, in seconds since the Unix epoch.
    created: u64,
    /// The selector of the only agents it may use, if it is limited.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    agents: Option<String>,
}

/// `GET /api/v1/tokens`'s answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct TokenList {
    tokens: Vec<TokenInfo>,
}

/// `POST /api/v1/tokens`'s answer: the only time the secret is shown.
#[derive(Serialize, ToSchema)]
pub(crate) struct CreatedToken {
    name: String,
    role: Role,
    /// The secret, for `Authorization: Bearer`.
    token: String,
}

/// `GET /api/v1/tokens`: names and roles, never the secrets.
#[utoipa::path(
    get,
    path = "/api/v1/tokens",
    operation_id = "listTokens",
    tag = "tokens",
    summary = "List API tokens (admins)",
    responses(
        (status = 200, description = "Names, roles and creation times; never the secrets.", body = TokenList),
        (status = 403, response = ProblemResponse),
    ),
)]
pub(crate) async fn list_tokens(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<TokenList>, ApiError> {
    let tokens = state.tokens.list().await.map_err(token_error)?;
    let tokens = tokens
        .into_iter()
        .map(|t| TokenInfo {
            name: t.name,
            role: t.role,
            created: t.created,
            agents: t.agents,
        })
        .collect();
    Ok(Json(TokenList { tokens }))
}

/// `POST /api/v1/tokens`: creates a token; its value is shown this once.
#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    operation_id = "createToken",
    tag = "tokens",
    summary = "Create an API token (admins)",
    request_body(content = NewToken, content_type = "application/json"),
    responses(
        (status = 201, description = "Created; the token's value is in this answer only.", body = CreatedToken),
        (status = 400, response = ProblemResponse),
        (status = 403, response = ProblemResponse),
        (status = 409, response = ProblemResponse),
        (status = 413, response = ProblemResponse),
        (status = 415, response = ProblemResponse),
    ),
)]
pub(crate) async fn create_token(
    State(state): State<AppState>,
    Admin(who): Admin,
    ClientIp(client): ClientIp,
    request: Request,
) -> Result<Response, ApiError> {
    if let Some(limit) = &who.agents {
        // Its token could only be wider or narrower than the creator's own
        // reach, never provably within it: refused.
        return Err(ApiError::Forbidden(format!(
            "{} is limited to the agents {limit:?} and may not create tokens",
            who.name
        )));
    }
    let new: NewToken = read_json_body(request, 64 * 1024).await?;
    // A token acts under its name: no user may already go by it.
    if let Some(taken) = super::users::name_taken(&state, &new.name).await?
        && !taken.starts_with("an API token")
    {
        return Err(ApiError::Conflict(format!(
            "{:?} is taken: {taken} (names are compared without case)",
            new.name
        )));
    }
    let agents = new
        .agents
        .as_deref()
        .map(crate::selector::Selector::parse)
        .transpose()
        .map_err(|e| ApiError::BadRequest(format!("\"agents\": {e}")))?;
    let token = state
        .tokens
        .create(&new.name, new.role, agents.as_ref())
        .await
        .map_err(token_error)?;
    tracing::info!(by = %who.name, name = %new.name, role = new.role.as_str(), "api token created");
    state.audit(
        crate::audit::Kind::TokenCreate,
        &who.name,
        client,
        "",
        crate::audit::Via::Rest,
        serde_json::json!({"token": new.name, "role": new.role.as_str(), "agents": new.agents}),
    );
    let body = CreatedToken {
        name: new.name,
        role: new.role,
        token: token.expose().to_owned(),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `DELETE /api/v1/tokens/{name}`.
#[utoipa::path(
    delete,
    path = "/api/v1/tokens/{name}",
    operation_id = "revokeToken",
    tag = "tokens",
    summary = "Revoke an API token (admins)",
    params(("name" = String, Path, description = "The token's name.")),
    responses(
        (status = 204, description = "Revoked."),
        (status = 403, response = ProblemResponse),
        (status = 404, response = ProblemResponse),
    ),
)]
pub(crate) async fn revoke_token(
    State(state): State<AppState>,
    Admin(who): Admin,
    ClientIp(client): ClientIp,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    state.tokens.revoke(&name).await.map_err(token_error)?;
    tracing::info!(by = %who.name, %name, "api token revoked");
    state.audit(
        crate::audit::Kind::TokenRevoke,
        &who.name,
        client,
        "",
        crate::audit::Via::Rest,
        serde_json::json!({"token": name}),
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /api/v1/openapi.json` (no authentication: it holds no secrets).
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    operation_id = "openapi",
    tag = "meta",
    summary = "This document",
    security(()),
    responses((status = 200, description = "The API's OpenAPI 3.1 description.", body = Object)),
)]
pub(crate) async fn openapi(State(state): State<AppState>) -> Response {
    let mut response = super::openapi::document_under(&state.site.base_path).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A known path with a method it does not answer (405), in the API's
/// error format.
pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Unknown `/api/...` paths answer in the API's own error format.
pub(crate) async fn not_found() -> ApiError {
    ApiError::NotFound("no such API endpoint".into())
}

/// Fuzzing: a REST exec body, as `POST /api/v1/exec` reads and checks it.
/// Anything may be refused; nothing may panic, and what is accepted keeps
/// its bounds.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_exec_body(data: &[u8]) {
    let limits = small_limits();
    let Ok(body) = serde_json::from_slice::<ExecBody>(data) else {
        return;
    };
    let again: Option<ExecBody> = serde_json::from_slice(data).ok();
    for (streaming, body) in [(false, Some(body)), (true, again)] {
        let Some(Ok(p)) = body.map(|b| prepare(b, &limits, streaming)) else {
            continue;
        };
        let timeout = p.req.timeout_ms.expect("a prepared request has a timeout");
        assert!(timeout > 0 && timeout <= limits.max_timeout_ms);
        if !streaming {
            assert!(p.max_output.is_some_and(|m| m <= limits.max_output_bytes));
        }
        // What goes to the agent is a frame (or a typed refusal) that the
        // agent reads as the same request.
        if let Ok(frame) = crate::protocol::Frame::exec(1, &p.req) {
            let read = frame.exec_request().expect("an exec frame reads back");
            assert_eq!(read, p.req);
        }
    }
}

/// Limits small enough that tests and fuzzing reach every cap.
#[cfg(any(test, feature = "fuzzing"))]
fn small_limits() -> ApiLimits {
    ApiLimits {
        max_body_bytes: 1 << 20,
        max_timeout_ms: 60_000,
        max_output_bytes: 4096,
        max_concurrent: 8,
        rate_per_minute: 60,
        buffered_budget: 1 << 20,
        transfer_idle: std::time::Duration::from_secs(60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ApiLimits {
        small_limits()
    }

    fn body(json: serde_json::Value) -> Result<ExecBody, String> {
        serde_json::from_value(json).map_err(|e| e.to_string())
    }

    fn prepared(json: serde_json::Value, streaming: bool) -> Result<Prepared, String> {
        prepare(body(json)?, &limits(), streaming).map_err(|e| e.to_string())
    }

    #[test]
    fn a_request_needs_exactly_one_non_empty_command() {
        for bad in [
            serde_json::json!({}),
            serde_json::json!({"command": "true", "argv": ["true"]}),
            serde_json::json!({"command": ""}),
            serde_json::json!({"argv": []}),
            serde_json::json!({"command": "true", "timeout_ms": 0}),
            serde_json::json!({"command": "true", "encoding": "no-such"}),
            serde_json::json!({"command": "true", "encoding": "replacement"}),
            serde_json::json!({"command": "true", "agent": ""}),
        ] {
            assert!(prepared(bad.clone(), false).is_err(), "{bad}");
        }
        assert!(prepared(serde_json::json!({"command": " "}), false).is_ok());
        assert!(prepared(serde_json::json!({"argv": ["true"]}), false).is_ok());
    }

    #[test]
    fn limits_are_applied_and_buffered_answers_always_have_a_cap() {
        let p = prepared(
            serde_json::json!({"command": "true", "timeout_ms": 999_999_999, "encoding": "SJIS"}),
            false,
        )
        .unwrap();
        assert_eq!(p.req.timeout_ms, Some(60_000));
        assert_eq!(p.max_output, Some(4096));
        assert_eq!(p.encoding, encoding_rs::SHIFT_JIS);
        let p = prepared(serde_json::json!({"command": "true"}), true).unwrap();
        assert_eq!(p.req.timeout_ms, Some(DEFAULT_TIMEOUT_MS));
        assert_eq!(p.max_output, None, "streaming holds nothing back");
        let p = prepared(
            serde_json::json!({"command": "true", "max_output_bytes": 10.0}),
            true,
        )
        .unwrap();
        assert_eq!(p.max_output, Some(10));
    }

    #[test]
    fn counts_are_whole_numbers_up_to_2_pow_53_minus_1() {
        for ok in [0.0, 300.0, 9_007_199_254_740_991.0] {
            let b = body(serde_json::json!({"command": "x", "max_output_bytes": ok})).unwrap();
            assert_eq!(b.max_output_bytes, Some(ok as u64));
        }
        for bad in [
            serde_json::json!(-1),
            serde_json::json!(1.5),
            serde_json::json!(9_007_199_254_740_992u64),
            serde_json::json!(1e300),
            serde_json::json!("5"),
            serde_json::Value::Null,
        ] {
            let e = body(serde_json::json!({"command": "x", "timeout_ms": bad})).unwrap_err();
            assert!(!e.contains("u64") && !e.contains("usize"), "{e}");
        }
    }

    fn decoded(lines: &[StreamLine]) -> String {
        lines
            .iter()
            .map(|l| match l {
                StreamLine::Output { data, encoding, .. } => match encoding {
                    Some(rest::Encoding::Base64) => format!("[{data}]"),
                    _ => data.clone(),
                },
                StreamLine::Truncated { limit, .. } => format!("<cut at {limit}>"),
                _ => "?".into(),
            })
            .collect()
    }

    #[test]
    fn a_character_split_across_chunks_is_sent_whole() {
        let mut d = StreamDecoder::new(Stream::Stdout, UTF_8, None);
        let euro = "€".as_bytes();
        let mut lines = d.lines(&[b"a", &euro[..1]].concat());
        lines.extend(d.lines(&euro[1..]));
        assert_eq!(decoded(&lines), "a€");
        assert!(d.finish().is_none());
    }

    #[test]
    fn bytes_that_are_not_text_go_as_base64_and_nothing_is_lost() {
        let mut d = StreamDecoder::new(Stream::Stdout, UTF_8, None);
        let lines = d.lines(b"\xff\xfe");
        assert_eq!(decoded(&lines), format!("[{}]", BASE64.encode(b"\xff\xfe")));
        // Half a character at the end of the stream comes out as bytes.
        assert!(d.lines(&"€".as_bytes()[..2]).is_empty());
        let tail = d.finish().expect("the held bytes");
        assert_eq!(
            decoded(&[tail]),
            format!("[{}]", BASE64.encode(&"€".as_bytes()[..2]))
        );
    }

    #[test]
    fn legacy_encodings_lose_no_byte_either() {
        // "中" in GBK is D6 D0: split across chunks, it arrives whole.
        let mut d = StreamDecoder::new(Stream::Stdout, encoding_rs::GBK, None);
        let mut lines = d.lines(b"a\xd6");
        lines.extend(d.lines(b"\xd0b"));
        assert_eq!(decoded(&lines), "a中b");
        assert!(d.finish().is_none());
        // Half a character at the end comes out as bytes.
        let mut d = StreamDecoder::new(Stream::Stdout, encoding_rs::GBK, None);
        let lines = d.lines(b"a\x81");
        assert_eq!(decoded(&lines), "a");
        let tail = d.finish().expect("the held byte");
        assert_eq!(decoded(&[tail]), format!("[{}]", BASE64.encode(b"\x81")));
        // A held byte followed by bytes that do not decode: all of them go
        // as base64, none dropped.
        let mut d = StreamDecoder::new(Stream::Stdout, encoding_rs::GBK, None);
        let mut lines = d.lines(b"a\x81");
        lines.extend(d.lines(b"\xffb"));
        assert_eq!(
            decoded(&lines),
            format!("a[{}]", BASE64.encode(b"\x81\xffb"))
        );
    }

    #[test]
    fn a_cap_is_announced_once_and_the_rest_dropped() {
        let mut d = StreamDecoder::new(Stream::Stderr, UTF_8, Some(3));
        let mut lines = d.lines(b"abcdef");
        lines.extend(d.lines(b"ghi"));
        assert_eq!(decoded(&lines), "abc<cut at 3>");
        assert!(d.truncated);
    }

    #[test]
    fn a_capture_keeps_its_limit_and_says_it_cut() {
        let mut c = Capture::new(4);
        c.push(b"ab");
        assert!(!c.truncated);
        c.push(b"cdef");
        assert_eq!(c.data, b"abcd");
        assert!(c.truncated);
    }
}
