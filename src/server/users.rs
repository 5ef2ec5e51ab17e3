//! Users managed at run time, in the store: `GET/POST /api/v1/users`,
//! `PUT /api/v1/users/{name}/password`, `DELETE /api/v1/users/{name}`
//! (admins), which `conch user` calls. The users file stays the
//! configuration: a name it has cannot be added to, changed in or deleted
//! from the store, and it wins at login.
//!
//! A deleted user, or one whose password changed, is logged out at once
//! here and within the session recheck time on other servers (their login
//! sessions leave the store).

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use super::State as AppState;
use super::api::{ProblemResponse, read_json_body};
use super::auth::{Principal, Role, User};
use super::caller::Admin;
use super::peer::ClientIp;
use super::problem::ApiError;
use crate::store::Store;

/// Bytes of a password, at most (argon2 takes any, a request body must
/// not).
const MAX_PASSWORD: usize = 1024;
/// Characters of a password, at least.
const MIN_PASSWORD: usize = 8;

/// The user `name` of the store, if there is one.
pub(crate) async fn find(store: &Store, name: &str) -> Result<Option<User>, sqlx::Error> {
    let row = sqlx::query("SELECT name, password_hash, role, agents FROM users WHERE name = $1")
        .bind(name)
        .fetch_optional(&store.pool)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let role: String = row.try_get("role")?;
    Ok(Role::from_name(&role).map(|role| User {
        name: row.get("name"),
        password_hash: row.get("password_hash"),
        role,
        agents: row.get("agents"),
    }))
}

/// One user as `GET /api/v1/users` lists it (never its hash).
#[derive(Serialize, ToSchema)]
pub(crate) struct UserInfo {
    name: String,
    role: Role,
    /// The selector of the only agents the user may use.
    agents: Option<String>,
    /// `file` (the users file: change it there) or `store`.
    source: &'static str,
    /// When it was added to the store (milliseconds since the epoch).
    created_ms: Option<i64>,
}

/// `GET /api/v1/users`'s answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct UserList {
    users: Vec<UserInfo>,
}

/// An admin limited to some agents manages no users: a user it made
/// could reach further than it does.
fn full_admin(who: &Principal) -> Result<(), ApiError> {
    match &who.agents {
        Some(limit) => Err(ApiError::Forbidden(format!(
            "{} is limited to the agents {limit:?} and may not manage users",
            who.name
        ))),
        None => Ok(()),
    }
}

fn store_failed(e: sqlx::Error) -> ApiError {
    ApiError::Busy(format!("the store cannot answer: {e}"))
}

/// `GET /api/v1/users`.
#[utoipa::path(
    get,
    path = "/api/v1/users",
    operation_id = "listUsers",
    tag = "users",
    summary = "List users: the users file's and the store's (admins)",
    responses(
        (status = 200, description = "Every user, by name.", body = UserList),
        (status = 401, response = ProblemResponse),
        (status = 403, response = ProblemResponse),
        (status = 503, response = ProblemResponse),
    ),
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    Admin(who): Admin,
) -> Result<Json<UserList>, ApiError> {
    full_admin(&who)?;
    let rows = sqlx::query("SELECT name, role, agents, created_ms FROM users ORDER BY name")
        .fetch_all(&state.audit.store.pool)
        .await
        .map_err(store_failed)?;
    let mut users: Vec<UserInfo> = state
        .auth
        .file_users()
        .map(|u| UserInfo {
            name: u.name.clone(),
            role: u.role,
            agents: u.agents.clone(),
            source: "file",
            created_ms: None,
        })
        .collect();
    for row in rows {
        let name: String = row.get("name");
        let role: String = row.get("role");
        let (Some(role), false) = (Role::from_name(&role), state.auth.knows(&name)) else {
            continue;
        };
        users.push(UserInfo {
            name,
            role,
            agents: row.get("agents"),
            source: "store",
            created_ms: Some(row.get("created_ms")),
        });
    }
    users.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(UserList { users }))
}

/// The body of `POST /api/v1/users`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewUser {
    /// Letters, digits, `.`, `_` and `-`; at most 64; not `admin` (the
    /// admin token's name in the audit log).
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    name: String,
    /// 8 characters to 1 024 bytes.
    #[schema(min_length = 8, max_length = 1024)]
    password: String,
    role: Role,
    /// A selector of the only agents the user may use; default every agent.
    #[serde(default, deserialize_with = "super::api::present")]
    #[schema(value_type = String, min_length = 1)]
    agents: Option<String>,
}

/// The body of `PUT /api/v1/users/{name}/password`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewPassword {
    /// 8 characters to 1 024 bytes.
    #[schema(min_length = 8, max_length = 1024)]
    password: String,
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(ApiError::BadRequest(
            "a user name is 1 to 64 letters, digits, '.', '_' or '-'".into(),
        ));
    }
    if name.eq_ignore_ascii_case("admin") {
        return Err(ApiError::BadRequest(
            "\"admin\" is the admin token's name in the audit log; choose another".into(),
        ));
    }
    Ok(())
}

/// An argon2id hash of an acceptable `password`, made off the async
/// workers (and one at a time with logins: it costs as much).
async fn hash(state: &AppState, password: String) -> Result<String, ApiError> {
    if password.chars().count() < MIN_PASSWORD || password.len() > MAX_PASSWORD {
        return Err(ApiError::BadRequest(format!(
            "a password is {MIN_PASSWORD} characters to {MAX_PASSWORD} bytes"
        )));
    }
    let _permit = state
        .login_slots
        .acquire()
        .await
        .map_err(|_| ApiError::Busy("the server is stopping".into()))?;
    tokio::task::spawn_blocking(move || super::auth::hash_password(&password))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::Internal)
}

/// `POST /api/v1/users`.
#[utoipa::path(
    post,
    path = "/api/v1/users",
    operation_id = "addUser",
    tag = "users",
    summary = "Add a user to the store (admins)",
    request_body(content = NewUser, content_type = "application/json"),
    responses(
        (status = 201, description = "Added; the user may log in."),
        (status = 400, response = ProblemResponse),
        (status = 401, response = ProblemResponse),
        (status = 403, response = ProblemResponse),
        (status = 409, response = ProblemResponse),
        (status = 413, response = ProblemResponse),
        (status = 415, response = ProblemResponse),
        (status = 503, response = ProblemResponse),
    ),
)]
pub(crate) async fn add(
    State(state): State<AppState>,
    Admin(who): Admin,
    ClientIp(client): ClientIp,
    request: Request,
) -> Result<Response, ApiError> {
    full_admin(&who)?;
    let new: NewUser = read_json_body(request, 16 * 1024).await?;
    check_name(&new.name)?;
    if let Some(agents) = &new.agents {
        crate::selector::Selector::parse(agents)
            .map_err(|e| ApiError::BadRequest(format!("\"agents\": {e}")))?;
    }
    if let Some(taken) = name_taken(&state, &new.name).await? {
        return Err(ApiError::Conflict(format!(
            "{:?} is taken: {taken} (names are compared without case)",
            new.name
        )));
    }
    let hashed = hash(&state, new.password).await?;
    let now = crate::audit::now_ms();
    let inserted = sqlx::query(
        "INSERT INTO users (name, password_hash, role, agents, created_ms, updated_ms)
         VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (name) DO NOTHING",
    )
    .bind(&new.name)
    .bind(&hashed)
    .bind(new.role.as_str())
    .bind(&new.agents)
    .bind(now)
    .execute(&state.audit.store.pool)
    .await
    .map_err(store_failed)?
    .rows_affected();
    if inserted == 0 {
        return Err(ApiError::Conflict(format!(
            "user {:?} exists already",
            new.name
        )));
    }
    tracing::info!(by = %who.name, name = %new.name, role = new.role.as_str(), "user added");
    state.audit(
        crate::audit::Kind::UserChange,
        &who.name,
        client,
        "",
        crate::audit::Via::Rest,
        serde_json::json!({"action": "add", "name": new.name, "role": new.role.as_str(), "agents": new.agents}),
    );
    Ok(StatusCode::CREATED.into_response())
}

/// Who else goes by `name` (without regard to case), if anyone: a user
/// of the users file, of the store, or an API token. Records, sessions
/// and recordings belong to a name, so one name must be one principal.
pub(crate) async fn name_taken(
    state: &AppState,
    name: &str,
) -> Result<Option<&'static str>, ApiError> {
    if state
        .auth
        .file_users()
        .any(|u| u.name.eq_ignore_ascii_case(name))
    {
        return Ok(Some(
            "a user of the users file is named so; change it there",
        ));
    }
    let stored: Option<(String,)> =
        sqlx::query_as("SELECT name FROM users WHERE LOWER(name) = LOWER($1)")
            .bind(name)
            .fetch_optional(&state.audit.store.pool)
            .await
            .map_err(store_failed)?;
    if stored.is_some() {
        return Ok(Some("a user of the store is named so"));
    }
    let tokens = state
        .tokens
        .list()
        .await
        .map_err(|e| ApiError::Busy(format!("the store cannot answer: {e}")))?;
    if tokens.iter().any(|t| t.name.eq_ignore_ascii_case(name)) {
        return Ok(Some("an API token is named so"));
    }
    Ok(None)
}

/// The store's user `name`, or why it cannot be changed here.
async fn stored_user(state: &AppState, name: &str) -> Result<(), ApiError> {
    if state.auth.knows(name) {
        return Err(ApiError::Conflict(format!(
            "user {name:?} is in the users file: change it there"
        )));
    }
    match find(&state.audit.store, name).await.map_err(store_failed)? {
        Some(_) => Ok(()),
        None => Err(ApiError::NotFound(format!("no user {name:?} in the store"))),
    }
}

/// Logs `name` out everywhere: here at once, elsewhere at their next
/// check of the store.
async fn log_out(state: &AppState, name: &str) -> Result<(), ApiError> {
    sqlx::query("DELETE FROM login_sessions WHERE user_name = $1")
        .bind(name)
        .execute(&state.audit.store.pool)
        .await
        .map_err(store_failed)?;
    state.auth.end_sessions_of(name);
    Ok(())
}

/// `PUT /api/v1/users/{name}/password`.
#[utoipa::path(
    put,
    path = "/api/v1/users/{name}/password",
    operation_id = "setUserPassword",
    tag = "users",
    summary = "Give a store user a new password (admins); its sessions end",
    params(("name" = String, Path, description = "The user's name.")),
    request_body(content = NewPassword, content_type = "application/json"),
    responses(
        (status = 204, description = "Changed; the user's login sessions ended."),
        (status = 400, response = ProblemResponse),
        (status = 401, response = ProblemResponse),
        (status = 403, response = ProblemResponse),
        (status = 404, response = ProblemResponse),
        (status = 409, response = ProblemResponse),
        (status = 413, response = ProblemResponse),
        (status = 415, response = ProblemResponse),
        (status = 503, response = ProblemResponse),
    ),
)]
pub(crate) async fn set_password(
    State(state): State<AppState>,
    Admin(who): Admin,
    ClientIp(client): ClientIp,
    Path(name): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    full_admin(&who)?;
    let body: NewPassword = read_json_body(request, 16 * 1024).await?;
    stored_user(&state, &name).await?;
    let hashed = hash(&state, body.password).await?;
    let changed =
        sqlx::query("UPDATE users SET password_hash = $2, updated_ms = $3 WHERE name = $1")
            .bind(&name)
            .bind(&hashed)
            .bind(crate::audit::now_ms())
            .execute(&state.audit.store.pool)
            .await
            .map_err(store_failed)?
            .rows_affected();
    changed_so(&state, (&who, client), &name, "password", changed).await
}

/// After a new password or a deletion that touched `rows` rows: the user
/// is logged out everywhere and the change recorded; none touched is 404.
async fn changed_so(
    state: &AppState,
    (who, client): (&Principal, std::net::IpAddr),
    name: &str,
    action: &str,
    rows: u64,
) -> Result<Response, ApiError> {
    if rows == 0 {
        return Err(ApiError::NotFound(format!("no user {name:?} in the store")));
    }
    log_out(state, name).await?;
    tracing::info!(by = %who.name, %name, action, "store user changed");
    state.audit(
        crate::audit::Kind::UserChange,
        &who.name,
        client,
        "",
        crate::audit::Via::Rest,
        serde_json::json!({"action": action, "name": name}),
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `DELETE /api/v1/users/{name}`.
#[utoipa::path(
    delete,
    path = "/api/v1/users/{name}",
    operation_id = "deleteUser",
    tag = "users",
    summary = "Delete a store user (admins); its sessions end",
    params(("name" = String, Path, description = "The user's name.")),
    responses(
        (status = 204, description = "Deleted; the user's login sessions ended."),
        (status = 401, response = ProblemResponse),
        (status = 403, response = ProblemResponse),
        (status = 404, response = ProblemResponse),
        (status = 409, response = ProblemResponse),
        (status = 503, response = ProblemResponse),
    ),
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    Admin(who): Admin,
    ClientIp(client): ClientIp,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    full_admin(&who)?;
    stored_user(&state, &name).await?;
    let gone = sqlx::query("DELETE FROM users WHERE name = $1")
        .bind(&name)
        .execute(&state.audit.store.pool)
        .await
        .map_err(store_failed)?
        .rows_affected();
    changed_so(&state, (&who, client), &name, "delete", gone).await
}
