//! Pages and small JSON endpoints: login, logout, the console, health.

use askama::Template;
use axum::Form;
use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::State as AppState;
use super::auth::{Credential, LoginError, Principal, Role};
use super::peer::ClientIp;

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    /// The site's base path ("" or "/conch"), before every link.
    base: String,
    error: String,
    next: String,
    /// No users file: the admin token is the way in, so its form comes first.
    token_first: bool,
}

impl LoginPage {
    fn new(state: &AppState, error: String, next: String) -> LoginPage {
        LoginPage {
            base: state.site.base_path.clone(),
            error,
            next,
            token_first: !state.auth.has_users(),
        }
    }
}

#[derive(Template)]
#[template(path = "console.html")]
struct ConsolePage {
    base: String,
    username: String,
    role: String,
}

fn render(template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "template failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "page rendering failed").into_response()
        }
    }
}

/// Only local paths: a login must never redirect to another site.
fn safe_next(next: Option<&str>) -> String {
    match next {
        // Browsers drop tabs and newlines while parsing a URL, so "/\t/x"
        // would become "//x", another site: refuse any such character.
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                                && !n.chars().any(|c| c.is_control() || c.is_whitespace())
                // No `.`/`..` segments (nor encoded ones): the redirect
                // stays under the base path.
                && !n
                    .split(['/', '?', '#'])
                    .any(|seg| {
                        let seg = seg.to_ascii_lowercase().replace("%2e", ".");
                        seg == "." || seg == ".."
                    }) =>
        {
            n.to_owned()
        }
        _ => "/".to_owned(),
    }
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    base: String,
    username: String,
    role: String,
}

#[derive(Template)]
#[template(path = "replay.html")]
struct ReplayPage {
    base: String,
    username: String,
    role: String,
    /// 32 hexadecimal digits (checked before the page is made).
    id: String,
}

/// `GET /audit`: the audit log and the recordings, searchable (admins see
/// everyone's, others their own: the API decides), or the login page.
pub(crate) async fn audit(State(state): State<AppState>, headers: HeaderMap) -> Response {
    state.check_sessions(&headers).await;
    match state.session_principal(&headers) {
        Some(p) => render(&AuditPage {
            base: state.site.base_path.clone(),
            username: p.name,
            role: p.role.as_str().into(),
        }),
        None => Redirect::to(&state.site.path("/login")).into_response(),
    }
}

/// `GET /recordings/{id}`: the player of one recording (which the page
/// fetches from the API, under its access rules).
pub(crate) async fn replay(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    state.check_sessions(&headers).await;
    let Some(p) = state.session_principal(&headers) else {
        return Redirect::to(&state.site.path("/login")).into_response();
    };
    if !super::recordings::valid_id(&id) {
        return (StatusCode::NOT_FOUND, "no such recording").into_response();
    }
    render(&ReplayPage {
        base: state.site.base_path.clone(),
        username: p.name,
        role: p.role.as_str().into(),
        id: id.to_ascii_lowercase(),
    })
}

/// `GET /`: the console, or a redirect to the login page.
pub(crate) async fn console(State(state): State<AppState>, headers: HeaderMap) -> Response {
    state.check_sessions(&headers).await;
    match state.session_principal(&headers) {
        Some(p) => render(&ConsolePage {
            base: state.site.base_path.clone(),
            username: p.name,
            role: p.role.as_str().into(),
        }),
        None => Redirect::to(&state.site.path("/login")).into_response(),
    }
}

#[derive(Deserialize)]
pub(crate) struct LoginQuery {
    token: Option<String>,
    next: Option<String>,
}

/// `GET /login`: the form; with `?token=`, the admin token's one-click login.
pub(crate) async fn login_page(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    Query(query): Query<LoginQuery>,
) -> Response {
    let next = safe_next(query.next.as_deref());
    if let Some(token) = query.token.filter(|t| !t.is_empty()) {
        let credential = Credential::Token(token);
        let result = check_login(&state, client, &headers, credential).await;
        return finish_login(&state, result, next, client, "(token)".into()).await;
    }
    render(&LoginPage::new(&state, String::new(), next))
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

/// `POST /login`.
pub(crate) async fn login_submit(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    // Another site must not log the browser into an account of its choosing.
    if headers.contains_key(header::ORIGIN) && !state.site.origin_allowed(&headers) {
        return (StatusCode::FORBIDDEN, "cross-origin login refused").into_response();
    }
    // Who tried, for the audit log: a user's name; anything else typed
    // there (a password in the wrong field) is never kept.
    let attempted = if !form.token.is_empty() {
        "(token)".to_owned()
    } else if state.auth.knows(&form.username) {
        form.username.clone()
    } else {
        "(unknown user)".to_owned()
    };
    let credential = if form.token.is_empty() {
        Credential::Password {
            username: form.username,
            password: form.password,
        }
    } else {
        Credential::Token(form.token)
    };
    let result = check_login(&state, client, &headers, credential).await;
    finish_login(
        &state,
        result,
        safe_next(Some(&form.next)),
        client,
        attempted,
    )
    .await
}

/// Runs the (deliberately slow) credential check on the blocking pool, at
/// most [`super::LOGIN_VERIFIERS`] at a time, so that a flood of logins
/// neither stalls the async workers nor takes argon2's memory many times over.
async fn check_login(
    state: &AppState,
    client: std::net::IpAddr,
    headers: &HeaderMap,
    credential: Credential,
) -> Result<Principal, LoginError> {
    let busy = LoginError::RateLimited {
        retry_after: std::time::Duration::from_secs(1),
    };
    // A browser that has logged in as this user before counts apart.
    let device = match &credential {
        Credential::Password { username, .. } => state
            .site
            .cookie(headers, state.site.device_cookie_name())
            .and_then(|c| state.auth.device_for(&c, username)),
        Credential::Token(_) => None,
    };
    // A user the users file does not name may be one managed in the store.
    // Asked for every name (a name of the file takes as long as any), and
    // before waiting for a password slot, briefly: a slow store must not
    // hold the slots that every login needs.
    let stored = match &credential {
        Credential::Password { username, .. } => {
            let found = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                super::users::find(&state.audit.store, username),
            )
            .await;
            match found {
                Ok(Ok(user)) => user.filter(|_| !state.auth.knows(username)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read users from the store");
                    None
                }
                Err(_) => {
                    tracing::warn!("the store did not answer for a login within 2 s");
                    None
                }
            }
        }
        Credential::Token(_) => None,
    };
    let checked_hash = stored.as_ref().map(|u| u.password_hash.clone());
    let Ok(_permit) = state.login_slots.acquire().await else {
        return Err(busy);
    };
    let app = state.clone();
    let principal =
        tokio::task::spawn_blocking(move || app.auth.login(client, &credential, device, stored))
            .await
            .unwrap_or(Err(busy))?;
    // A store user deleted, or given a new password, while the password
    // was checked: the login fails rather than outlive the change.
    if let Some(hash) = checked_hash {
        let now = super::users::find(&state.audit.store, &principal.name).await;
        if !matches!(now, Ok(Some(u)) if u.password_hash == hash) {
            return Err(LoginError::Invalid);
        }
    }
    Ok(principal)
}

/// How long a trusted-device cookie lasts: 90 days.
const DEVICE_TTL_SECS: u64 = 90 * 86_400;

async fn finish_login(
    state: &AppState,
    result: Result<Principal, LoginError>,
    next: String,
    client: std::net::IpAddr,
    attempted: String,
) -> Response {
    let audit = |kind, user: String, detail| {
        state.audit.record(crate::audit::Event {
            kind,
            user,
            source: client.to_string(),
            agent: String::new(),
            via: crate::audit::Via::Login,
            detail,
        })
    };
    match &result {
        Ok(p) => audit(
            crate::audit::Kind::Login,
            p.name.clone(),
            serde_json::json!({"role": p.role.as_str()}),
        ),
        Err(LoginError::Invalid) => audit(
            crate::audit::Kind::LoginFailed,
            attempted,
            serde_json::json!({"reason": "wrong user name, password or token"}),
        ),
        Err(LoginError::RateLimited { .. }) => audit(
            crate::audit::Kind::LoginFailed,
            attempted,
            serde_json::json!({"reason": "too many failed logins (throttled)"}),
        ),
    }
    match result {
        Ok(principal) => {
            tracing::info!(user = %principal.name, role = principal.role.as_str(), "login");
            let device = state.auth.issue_device(&principal.name);
            let (cookie, gone) = match state.auth.create_session(principal.clone()) {
                Ok(created) => created,
                Err(e) => {
                    let page = LoginPage::new(state, e.to_string(), next);
                    return (StatusCode::SERVICE_UNAVAILABLE, render(&page)).into_response();
                }
            };
            // In the store before the browser has the cookie: valid on
            // every server that shares it, and after a restart.
            let key = super::auth::stored_key(&cookie);
            let ttl = state.auth.session_ttl();
            if let Err(e) =
                super::login_sessions::save(&state.audit.store, &key, &principal, ttl, &gone).await
            {
                tracing::error!(error = %e, "cannot store the login session; it lives on this server only");
            }
            let ttl = state.auth.session_ttl().as_secs();
            let site = &state.site;
            let attrs = site.cookie_attributes();
            let session = format!(
                "{}={cookie}; {attrs}; Max-Age={ttl}",
                site.session_cookie_name()
            );
            let device = format!(
                "{}={device}; {attrs}; Max-Age={DEVICE_TTL_SECS}",
                site.device_cookie_name()
            );
            // `next` is a path of the site, under its base path.
            let mut response = Redirect::to(&state.site.path(&next)).into_response();
            for value in [session, device] {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    response.headers_mut().append(header::SET_COOKIE, v);
                }
            }
            response
        }
        Err(LoginError::Invalid) => {
            tracing::warn!("failed login");
            let page = LoginPage::new(state, "Wrong user name, password or token.".into(), next);
            (StatusCode::UNAUTHORIZED, render(&page)).into_response()
        }
        Err(LoginError::RateLimited { retry_after }) => {
            tracing::warn!("login rate limit hit");
            let secs = retry_after.as_secs().max(1);
            let page = LoginPage::new(
                state,
                format!("Too many failed logins; try again in {secs} s."),
                next,
            );
            let mut response = (StatusCode::TOO_MANY_REQUESTS, render(&page)).into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            response
        }
    }
}

/// `POST /logout`: ends the session. Same-origin only, so another site
/// cannot log a user out.
pub(crate) async fn logout(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
) -> Response {
    if headers.contains_key(header::ORIGIN) && !state.site.origin_allowed(&headers) {
        return (StatusCode::FORBIDDEN, "cross-origin logout refused").into_response();
    }
    state.check_sessions(&headers).await;
    if let Some(cookie) = state.session_cookie(&headers) {
        let key = super::auth::stored_key(&cookie);
        if let Err(e) = super::login_sessions::delete(&state.audit.store, &key).await {
            tracing::error!(error = %e, "cannot remove the login session from the store");
        }
        if let Some(who) = state.auth.session(&cookie) {
            state.audit.record(crate::audit::Event {
                kind: crate::audit::Kind::Logout,
                user: who.name,
                source: client.to_string(),
                agent: String::new(),
                via: crate::audit::Via::Login,
                detail: serde_json::json!({}),
            });
        }
        state.auth.end_session(&cookie);
    }
    let mut response = Redirect::to(&state.site.path("/login")).into_response();
    let expired = format!(
        "{}=; {}; Max-Age=0",
        state.site.session_cookie_name(),
        state.site.cookie_attributes()
    );
    if let Ok(v) = HeaderValue::from_str(&expired) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// The answer of `/healthz` and `/readyz`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    /// `ok`, `ready`, `agent unavailable` or `audit log failing`.
    status: &'static str,
}

/// `GET /api/v1/session`'s answer.
#[derive(Serialize, ToSchema)]
pub(crate) struct SessionInfo {
    user: String,
    role: Role,
}

/// `GET /healthz`: the process is alive. No authentication, no details.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "meta",
    summary = "The process is alive",
    security(()),
    responses((status = 200, description = "Alive.", body = Health)),
)]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// `GET /readyz`: every agent is connected, and the audit log is written.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "meta",
    summary = "Every agent is connected",
    security(()),
    responses(
        (status = 200, description = "Ready.", body = Health),
        (status = 503, description = "An agent is not connected, or the audit log cannot be written (records were dropped, or the store fails).", body = Health),
    ),
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    if state.audit.problem().is_some() || state.recordings.problem().is_some() {
        // The reason is in the log; this page, unauthenticated, only says so.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "audit log failing",
            }),
        );
    }
    if state.agents.all_connected() {
        (StatusCode::OK, Json(Health { status: "ready" }))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "agent unavailable",
            }),
        )
    }
}

/// `GET /api/v1/session`: who the console session belongs to (by its
/// cookie), or 401.
#[utoipa::path(
    get,
    path = "/api/v1/session",
    operation_id = "session",
    tag = "meta",
    summary = "Who the console session belongs to",
    security(()),
    responses(
        (status = 200, description = "The session's user and role.", body = SessionInfo),
        (status = 401, response = super::api::ProblemResponse),
    ),
)]
pub(crate) async fn session_info(State(state): State<AppState>, headers: HeaderMap) -> Response {
    state.check_sessions(&headers).await;
    match state.session_principal(&headers) {
        Some(p) => Json(SessionInfo {
            user: p.name,
            role: p.role,
        })
        .into_response(),
        None => super::problem::ApiError::Unauthorized.into_response(),
    }
}
