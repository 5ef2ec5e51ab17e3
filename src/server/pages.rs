//! Pages and small JSON endpoints: login, logout, the console, health.

use std::net::SocketAddr;

use askama::Template;
use axum::Form;
use axum::Json;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::json;

use super::auth::{LoginError, Principal};
use super::{SESSION_COOKIE, State as AppState, session_cookie};

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    error: String,
    next: String,
}

#[derive(Template)]
#[template(path = "console.html")]
struct ConsolePage {
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
                && !n.chars().any(|c| c.is_control() || c.is_whitespace()) =>
        {
            n.to_owned()
        }
        _ => "/".to_owned(),
    }
}

/// `GET /`: the console, or a redirect to the login page.
pub async fn console(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match state.session_principal(&headers) {
        Some(p) => render(&ConsolePage {
            username: p.name,
            role: p.role.as_str().into(),
        }),
        None => Redirect::to("/login").into_response(),
    }
}

#[derive(Deserialize)]
pub struct LoginQuery {
    token: Option<String>,
    next: Option<String>,
}

/// `GET /login`: the form; with `?token=`, the admin token's one-click login.
pub async fn login_page(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<LoginQuery>,
) -> Response {
    let next = safe_next(query.next.as_deref());
    if let Some(token) = query.token.filter(|t| !t.is_empty()) {
        let result = check_login(&state, peer, String::new(), String::new(), token).await;
        return finish_login(&state, result, next);
    }
    render(&LoginPage {
        error: String::new(),
        next,
    })
}

#[derive(Deserialize)]
pub struct LoginForm {
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
pub async fn login_submit(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    // Another site must not log the browser into an account of its choosing.
    if headers.contains_key(header::ORIGIN)
        && !super::security::origin_allowed(&headers, &state.allowed_origins)
    {
        return (StatusCode::FORBIDDEN, "cross-origin login refused").into_response();
    }
    let result = check_login(&state, peer, form.username, form.password, form.token).await;
    finish_login(&state, result, safe_next(Some(&form.next)))
}

/// Runs the (deliberately slow) credential check on the blocking pool, at
/// most [`super::LOGIN_VERIFIERS`] at a time, so that a flood of logins
/// neither stalls the async workers nor takes argon2's memory many times over.
async fn check_login(
    state: &AppState,
    peer: SocketAddr,
    username: String,
    password: String,
    token: String,
) -> Result<Principal, LoginError> {
    let busy = LoginError::RateLimited {
        retry_after: std::time::Duration::from_secs(1),
    };
    let Ok(_permit) = state.login_slots.acquire().await else {
        return Err(busy);
    };
    let app = state.clone();
    tokio::task::spawn_blocking(move || app.auth.login(peer.ip(), &username, &password, &token))
        .await
        .unwrap_or(Err(busy))
}

fn finish_login(state: &AppState, result: Result<Principal, LoginError>, next: String) -> Response {
    match result {
        Ok(principal) => {
            tracing::info!(user = %principal.name, role = principal.role.as_str(), "login");
            let cookie = match state.auth.create_session(principal) {
                Ok(cookie) => cookie,
                Err(e) => {
                    let page = LoginPage {
                        error: e.to_string(),
                        next,
                    };
                    return (StatusCode::SERVICE_UNAVAILABLE, render(&page)).into_response();
                }
            };
            let ttl = state.auth.session_ttl().as_secs();
            let value = format!(
                "{SESSION_COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={ttl}"
            );
            let mut response = Redirect::to(&next).into_response();
            if let Ok(v) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
        Err(LoginError::Invalid) => {
            tracing::warn!("failed login");
            let page = LoginPage {
                error: "Wrong user name, password or token.".into(),
                next,
            };
            (StatusCode::UNAUTHORIZED, render(&page)).into_response()
        }
        Err(LoginError::RateLimited { retry_after }) => {
            tracing::warn!("login rate limit hit");
            let secs = retry_after.as_secs().max(1);
            let page = LoginPage {
                error: format!("Too many failed logins; try again in {secs} s."),
                next,
            };
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
pub async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if headers.contains_key(header::ORIGIN)
        && !super::security::origin_allowed(&headers, &state.allowed_origins)
    {
        return (StatusCode::FORBIDDEN, "cross-origin logout refused").into_response();
    }
    if let Some(cookie) = session_cookie(&headers) {
        state.auth.end_session(&cookie);
    }
    let mut response = Redirect::to("/login").into_response();
    let expired = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&expired) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// `GET /healthz`: the process is alive. No authentication, no details.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: every agent is connected.
pub async fn readyz(State(state): State<AppState>) -> Response {
    if state.agents.all_connected() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "agent unavailable"})),
        )
            .into_response()
    }
}

/// `GET /api/v1/session`: who the session belongs to, or 401.
pub async fn session_info(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match state.session_principal(&headers) {
        Some(p) => Json(json!({"user": p.name, "role": p.role.as_str()})).into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "not logged in"})),
        )
            .into_response(),
    }
}
