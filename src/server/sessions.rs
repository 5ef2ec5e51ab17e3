//! Shell sessions over REST: list the ones a caller may see, end one,
//! rename one or say who may watch it. The sessions themselves live in
//! the agents (`crate::agent::session`); this asks them, and
//! `policy::session` decides who may do what.

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::State as AppState;
use super::api::ProblemResponse;
use super::auth::Principal;
use super::caller::{Caller, Writer};
use super::messages::AgentSession;
use super::policy::{self, SessionAction};
use super::problem::ApiError;

/// The sessions `who` may attach to or watch, on every agent it can see
/// that keeps sessions, asked of the agents at once (an agent that does
/// not answer in time contributes none).
pub(crate) async fn visible(state: &AppState, who: &Principal) -> Vec<AgentSession> {
    let agents = &state.agents;
    let asks = super::ws::visible_agents(state, who)
        .into_iter()
        .filter(|a| a.connected)
        .filter_map(|a| agents.link(Some(&a.name)).ok())
        .filter(|(_, link)| link.has_sessions())
        .map(|(name, link)| async move {
            let list = link.sessions_recent().await.unwrap_or_default();
            (name, list)
        });
    let mut all = Vec::new();
    for (name, list) in futures_util::future::join_all(asks).await {
        for info in list {
            if policy::session(who, SessionAction::Watch, &name, &info, agents).is_ok() {
                all.push(AgentSession {
                    agent: name.clone(),
                    session: info,
                });
            }
        }
    }
    all
}

/// `GET /api/v1/sessions`'s answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct SessionList {
    sessions: Vec<AgentSession>,
}

/// `GET /api/v1/sessions`.
#[utoipa::path(
    get,
    path = "/api/v1/sessions",
    operation_id = "listSessions",
    tag = "sessions",
    summary = "List shell sessions (running, attached or not)",
    description = "The caller's own sessions, those shared with it to watch, and for admins every session, on the agents it may see. A session is a console shell that the agent keeps when its page goes, for the linger time.",
    responses(
        (status = 200, description = "The sessions, by agent then age.", body = SessionList),
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    Caller(who): Caller,
) -> Result<Json<SessionList>, ApiError> {
    Ok(Json(SessionList {
        sessions: visible(&state, &who).await,
    }))
}

/// Finds session `id` on `agent` and checks that `who` may `action` it;
/// someone else's session is "not found", as is an unknown one.
pub(super) async fn find(
    state: &AppState,
    who: &Principal,
    agent: &str,
    id: &str,
    action: SessionAction,
) -> Result<crate::link::AgentLink, ApiError> {
    let not_found = || ApiError::NotFound(format!("no session {id:?} on agent {agent:?}"));
    let agents = &state.agents;
    policy::check(who, policy::Action::See, agent, agents).map_err(|_| not_found())?;
    let (_, link) = agents.link(Some(agent)).map_err(|e| match e {
        super::agents::AgentError::Unknown(_) => not_found(),
        other => ApiError::AgentUnavailable(other.to_string()),
    })?;
    let info = link
        .session(id)
        .await
        .map_err(|e| ApiError::AgentUnavailable(e.to_string()))?
        .ok_or_else(not_found)?;
    match policy::session(who, action, agent, &info, agents) {
        Ok(()) => Ok(link),
        // Someone who may watch it learns why they cannot manage it.
        Err(_) if policy::session(who, SessionAction::Watch, agent, &info, agents).is_ok() => {
            Err(ApiError::Forbidden(format!(
                "only the owner of session {id:?} (or an admin) may do that"
            )))
        }
        Err(_) => Err(not_found()),
    }
}

/// `DELETE /api/v1/sessions/{agent}/{id}`.
#[utoipa::path(
    delete,
    path = "/api/v1/sessions/{agent}/{id}",
    operation_id = "endSession",
    tag = "sessions",
    summary = "End a session (its processes are killed)",
    params(
        ("agent" = String, Path, description = "The agent the session runs on."),
        ("id" = String, Path, description = "The session's id."),
    ),
    responses(
        (status = 204, description = "Ended; attached pages see its exit."),
        (status = 403, response = ProblemResponse),
        (status = 404, response = ProblemResponse),
        (status = 503, response = ProblemResponse),
    ),
)]
pub(crate) async fn end(
    State(state): State<AppState>,
    Writer(who): Writer,
    super::peer::ClientIp(client): super::peer::ClientIp,
    Path((agent, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let link = find(&state, &who, &agent, &id, SessionAction::Manage).await?;
    link.end_session(&id)
        .await
        .map_err(|e| ApiError::AgentUnavailable(e.to_string()))?;
    tracing::info!(by = %who.name, %agent, session = %id, "session ended");
    state.audit(
        crate::audit::Kind::SessionEnd,
        &who.name,
        client,
        &agent,
        crate::audit::Via::Rest,
        serde_json::json!({"session": id}),
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The body of `PATCH /api/v1/sessions/{agent}/{id}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SessionChange {
    /// A new title (at most 200 characters).
    #[serde(default)]
    #[schema(max_length = 200, nullable = false)]
    title: Option<String>,
    /// Who may watch, besides the owner: user names, or `*` for everyone
    /// who may see the agent (at most 64). Replaces the list.
    #[serde(default)]
    #[schema(max_items = 64, nullable = false)]
    watchers: Option<Vec<Watcher>>,
}

/// A user name (1 to 64 characters, no control characters), or `*`.
#[derive(Deserialize)]
#[serde(transparent)]
pub(crate) struct Watcher(String);

impl utoipa::PartialSchema for Watcher {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(64))
            .pattern(Some("^[^\\u0000-\\u001f\\u007f-\\u009f]+$"))
            .description(Some(
                "A user name (1 to 64 characters, no control characters), or `*`.",
            ))
            .into()
    }
}

impl ToSchema for Watcher {}

/// `PATCH /api/v1/sessions/{agent}/{id}`.
#[utoipa::path(
    patch,
    path = "/api/v1/sessions/{agent}/{id}",
    operation_id = "changeSession",
    tag = "sessions",
    summary = "Rename a session, or say who may watch it",
    params(
        ("agent" = String, Path, description = "The agent the session runs on."),
        ("id" = String, Path, description = "The session's id."),
    ),
    request_body(content = SessionChange, content_type = "application/json"),
    responses(
        (status = 204, description = "Changed."),
        (status = 400, response = ProblemResponse),
        (status = 403, response = ProblemResponse),
        (status = 404, response = ProblemResponse),
        (status = 413, response = ProblemResponse),
        (status = 415, response = ProblemResponse),
        (status = 503, response = ProblemResponse),
    ),
)]
pub(crate) async fn change(
    State(state): State<AppState>,
    Writer(who): Writer,
    super::peer::ClientIp(client): super::peer::ClientIp,
    Path((agent, id)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let change: SessionChange = super::api::read_json_body(request, 64 * 1024).await?;
    if change
        .title
        .as_ref()
        .is_some_and(|t| t.chars().count() > 200)
    {
        return Err(ApiError::BadRequest(
            "\"title\" is longer than 200 characters".into(),
        ));
    }
    let watchers = change
        .watchers
        .map(|w| w.into_iter().map(|Watcher(name)| name).collect::<Vec<_>>());
    if let Some(watchers) = &watchers {
        if watchers.len() > 64 {
            return Err(ApiError::BadRequest("at most 64 \"watchers\"".into()));
        }
        if let Some(bad) = watchers
            .iter()
            .find(|w| w.is_empty() || w.chars().count() > 64 || w.chars().any(char::is_control))
        {
            return Err(ApiError::BadRequest(format!(
                "{bad:?} is not a user name (1 to 64 characters, no control characters) or \"*\""
            )));
        }
    }
    let link = find(&state, &who, &agent, &id, SessionAction::Manage).await?;
    let mut detail = serde_json::json!({"session": id});
    if let Some(title) = &change.title {
        detail["title"] = title.as_str().into();
    }
    if let Some(watchers) = &watchers {
        detail["watchers"] = watchers.clone().into();
    }
    link.update_session(&id, change.title, watchers)
        .await
        .map_err(|e| ApiError::AgentUnavailable(e.to_string()))?;
    // Who may watch a shell is who may read what it shows: recorded.
    state.audit(
        crate::audit::Kind::SessionChange,
        &who.name,
        client,
        &agent,
        crate::audit::Via::Rest,
        detail,
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}
