//! `GET /api/v1/recordings` and `GET /api/v1/recordings/{id}`: the index
//! of session recordings and each one's asciicast file, under the audit
//! log's rules (admins read everyone's; everyone else, and an admin token
//! limited to some agents, their own).

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::State as AppState;
use super::api::ProblemResponse;
use super::audit_log::reader_of;
use super::caller::Caller;
use super::problem::ApiError;
use crate::recording::{Cursor, Filter, Meta};

/// The query of `GET /api/v1/recordings`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct RecordingQuery {
    /// Only this user's recordings (others than admins: only their own).
    user: Option<String>,
    /// Only recordings on this agent.
    agent: Option<String>,
    /// Begun from this time on (milliseconds since the Unix epoch).
    #[param(minimum = 0, maximum = 9007199254740991_i64)]
    since_ms: Option<i64>,
    /// Begun before this time (milliseconds since the Unix epoch).
    #[param(minimum = 0, maximum = 9007199254740991_i64)]
    until_ms: Option<i64>,
    /// Text in the command line, case-insensitive.
    #[param(max_length = 256)]
    text: Option<String>,
    /// The `next` of the page before: recordings older than it.
    #[param(pattern = "^[0-9]{1,16}-[0-9a-fA-F]{32}$")]
    cursor: Option<String>,
    /// Recordings per page (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// `GET /api/v1/recordings`'s answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct RecordingPage {
    /// Newest first.
    recordings: Vec<Meta>,
    /// The cursor of the next (older) page, when there is one.
    next: Option<String>,
}

/// Whether `id` looks like a recording's id (32 hexadecimal digits).
pub(crate) fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `GET /api/v1/recordings`.
#[utoipa::path(
    get,
    path = "/api/v1/recordings",
    operation_id = "recordings",
    tag = "audit",
    summary = "List session recordings",
    description = "What console commands and shells printed, recorded as asciicast v2. Newest first; follow `next` for older ones. Admins read all recordings, everyone else their own. A recording still being made has no `ended_ms`.",
    params(RecordingQuery),
    responses(
        (status = 200, description = "A page of recordings.", body = RecordingPage),
        (status = 400, response = ProblemResponse),
        (status = 401, response = ProblemResponse),
        (status = 503, response = ProblemResponse),
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    Caller(who): Caller,
    query: Result<Query<RecordingQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RecordingPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    super::audit_log::check_search((q.since_ms, q.until_ms), q.limit, q.text.as_deref())?;
    let before = match &q.cursor {
        Some(c) => Some(Cursor::parse(c).ok_or_else(|| {
            ApiError::BadRequest("cursor must be the `next` of an earlier page".into())
        })?),
        None => None,
    };
    let user = match reader_of(&who) {
        Some(own) => Some(own.to_owned()),
        None => q.user,
    };
    let filter = Filter {
        user,
        agent: q.agent,
        since_ms: q.since_ms,
        until_ms: q.until_ms,
        text: q.text,
        before,
        limit: q.limit.unwrap_or(100),
    };
    let (recordings, next) = crate::recording::list(&state.recordings.store, &filter)
        .await
        .map_err(|e| ApiError::Busy(format!("the store cannot answer: {e}")))?;
    Ok(Json(RecordingPage { recordings, next }))
}

/// The query of `GET /api/v1/recordings/{id}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileQuery {
    /// Any value: sent as an attachment (`conch-ID.cast`) to save.
    download: Option<String>,
}

/// `GET /api/v1/recordings/{id}`.
#[utoipa::path(
    get,
    path = "/api/v1/recordings/{id}",
    operation_id = "recording",
    tag = "audit",
    summary = "One session recording, as an asciicast v2 file",
    description = "The header line, then one `[seconds, code, data]` line per event: `o` output, `r` a resize (`COLSxROWS`), `i` typed input (only with `--record-input`), `m` a marker (where the size cap cut it). `asciinema play` plays it. A recording still being made is sent as far as it is stored (within 2 s of now).",
    params(
        ("id" = String, Path, description = "The recording's id (32 hexadecimal digits)."),
        FileQuery,
    ),
    responses(
        (status = 200, description = "The asciicast file.", content_type = "application/x-asciicast", body = String),
        (status = 400, response = ProblemResponse),
        (status = 401, response = ProblemResponse),
        (status = 404, response = ProblemResponse),
        (status = 503, response = ProblemResponse),
    ),
)]
pub(crate) async fn file(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    query: Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let not_found = || ApiError::NotFound(format!("no recording {id:?}"));
    if !valid_id(&id) {
        return Err(not_found());
    }
    let id = id.to_ascii_lowercase();
    let store = state.recordings.store.clone();
    let meta = crate::recording::find(&store, &id)
        .await
        .map_err(|e| ApiError::Busy(format!("the store cannot answer: {e}")))?
        .ok_or_else(not_found)?;
    // Someone else's recording is "not found", as an unknown one is.
    if reader_of(&who).is_some_and(|own| own != meta.user) {
        return Err(not_found());
    }
    // Sent a few chunks at a time, each read when the last one is gone:
    // memory stays bounded however long the recording.
    let stream = futures_util::stream::unfold(Some(0_i64), move |from| {
        let (store, id) = (store.clone(), id.clone());
        async move {
            let from = from?;
            match crate::recording::read_from(&store, &id, from).await {
                Ok(Some((text, next))) => Some((Ok(bytes::Bytes::from(text)), Some(next))),
                Ok(None) => None,
                Err(e) => {
                    tracing::error!(recording = %id, error = %e, "cannot read a recording");
                    Some((Err(std::io::Error::other(e.to_string())), None))
                }
            }
        }
    });
    let mut response = Body::from_stream(stream).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-asciicast"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if q.download.is_some()
        && let Ok(v) =
            HeaderValue::from_str(&format!("attachment; filename=\"conch-{}.cast\"", meta.id))
    {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}
