//! `GET /api/v1/audit`: the audit log, newest first, filtered, a page at a
//! time. Admins read every record; everyone else their own.

use axum::Json;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::State as AppState;
use super::api::ProblemResponse;
use super::auth::Role;
use super::caller::Caller;
use super::problem::ApiError;
use crate::audit::{Filter, Record};

/// The query of `GET /api/v1/audit`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    /// Only this user's records (others than admins: only their own).
    user: Option<String>,
    /// Only records about this agent.
    agent: Option<String>,
    /// Only this kind of record.
    #[param(value_type = Option<crate::audit::Kind>)]
    kind: Option<String>,
    /// From this time on (milliseconds since the Unix epoch).
    #[param(minimum = 0, maximum = 9007199254740991_i64)]
    since_ms: Option<i64>,
    /// Before this time (milliseconds since the Unix epoch).
    #[param(minimum = 0, maximum = 9007199254740991_i64)]
    until_ms: Option<i64>,
    /// Text anywhere in the record's details (a command line, a path),
    /// case-insensitive.
    #[param(max_length = 256)]
    text: Option<String>,
    /// The `next` of the page before: records older than it.
    #[param(minimum = 1, maximum = 9007199254740991_i64)]
    cursor: Option<i64>,
    /// Records per page (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// `GET /api/v1/audit`'s answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct AuditPage {
    /// Newest first.
    records: Vec<Record>,
    /// The cursor of the next (older) page, when there is one.
    next: Option<i64>,
}

/// `GET /api/v1/audit`.
#[utoipa::path(
    get,
    path = "/api/v1/audit",
    operation_id = "audit",
    tag = "audit",
    summary = "Read the audit log",
    description = "Who ran what, where, when and how it ended; logins, tokens, files, refusals. Newest first; follow `next` for older records. Admins read all records, everyone else their own. Each record carries its hash and the previous record's: `conch audit verify` checks the chain in the store.",
    params(AuditQuery),
    responses(
        (status = 200, description = "A page of records.", body = AuditPage),
        (status = 400, response = ProblemResponse),
        (status = 401, response = ProblemResponse),
        (status = 503, response = ProblemResponse),
    ),
)]
pub(crate) async fn read(
    State(state): State<AppState>,
    Caller(who): Caller,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    check_search((q.since_ms, q.until_ms), q.limit, q.text.as_deref())?;
    if q.cursor.is_some_and(|c| !(1..=MAX_MS).contains(&c)) {
        return Err(ApiError::BadRequest(format!(
            "cursor must be 1 to {MAX_MS}"
        )));
    }
    if let Some(kind) = &q.kind
        && !crate::audit::Kind::ALL.iter().any(|k| k.as_str() == kind)
    {
        return Err(ApiError::BadRequest(format!(
            "no kind of record is called {kind:?}"
        )));
    }
    let user = match reader_of(&who) {
        Some(own) => Some(own.to_owned()),
        None => q.user,
    };
    let filter = Filter {
        user,
        agent: q.agent,
        kind: q.kind,
        since_ms: q.since_ms,
        until_ms: q.until_ms,
        text: q.text,
        before: q.cursor,
        limit: q.limit.unwrap_or(100),
    };
    let (records, next) = crate::audit::query(&state.audit.store, &filter)
        .await
        .map_err(|e| ApiError::Busy(format!("the audit store cannot answer: {e}")))?;
    Ok(Json(AuditPage { records, next }))
}

/// The largest time or cursor a query takes: 2^53 - 1 (what JSON numbers
/// hold exactly).
pub(super) const MAX_MS: i64 = (1 << 53) - 1;

/// The bounds the audit log's and the recordings' searches share: a time
/// window of 0 to [`MAX_MS`], a page of 1 to 1 000, a text of at most 256
/// characters.
pub(super) fn check_search(
    (since_ms, until_ms): (Option<i64>, Option<i64>),
    limit: Option<u32>,
    text: Option<&str>,
) -> Result<(), ApiError> {
    let out_of = |v: Option<i64>| v.is_some_and(|v| !(0..=MAX_MS).contains(&v));
    if out_of(since_ms) || out_of(until_ms) {
        return Err(ApiError::BadRequest(format!(
            "since_ms and until_ms must be 0 to {MAX_MS}"
        )));
    }
    if limit.is_some_and(|l| !(1..=1000).contains(&l)) {
        return Err(ApiError::BadRequest("limit must be 1 to 1000".into()));
    }
    if text.is_some_and(|t| t.chars().count() > 256) {
        return Err(ApiError::BadRequest(
            "text is longer than 256 characters".into(),
        ));
    }
    Ok(())
}

/// Whose records (and recordings) `who` may read: `None` for everyone's.
/// Admins read all; everyone else, and an admin token limited to some
/// agents (no auditor of the others), their own.
pub(super) fn reader_of(who: &super::auth::Principal) -> Option<&str> {
    (who.role != Role::Admin || who.agents.is_some()).then_some(who.name.as_str())
}
