//! Who is calling, as extractors: a handler names the kind of caller it
//! needs in its arguments, and the checks happen before it runs.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use super::State;
use super::auth::{LoginError, Principal, Role};
use super::peer::ClientIp;
use super::problem::ApiError;

/// Anyone authenticated: by `Authorization: Bearer <token>` (the admin
/// token or an API token; failures are throttled per address), else by the
/// session cookie. For reading: handlers that change something take a
/// [`Writer`] or an [`Admin`].
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub Principal);

/// A caller allowed to change something: a bearer token, or the session
/// cookie on a request from this server's own page (`Origin`), so that a
/// cookie alone never lets another site run commands or manage tokens.
#[derive(Debug, Clone)]
pub(crate) struct Writer(pub Principal);

/// A [`Writer`] who is an admin.
#[derive(Debug, Clone)]
pub(crate) struct Admin(pub Principal);

async fn authenticate(parts: &mut Parts, state: &State) -> Result<Principal, ApiError> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(|t| t.trim().to_owned())
            .ok_or(ApiError::Unauthorized)?;
        let Ok(ClientIp(ip)) = ClientIp::from_request_parts(parts, state).await;
        // This server's copy of the tokens, fresh within its recheck time;
        // a token it does not know is asked of the store once.
        let api_token = state.tokens.find(&token).await;
        return state
            .auth
            .bearer(ip, &token, api_token)
            .map_err(|e| match e {
                // Recorded as a login form's failure is (throttled ones
                // are not: the throttle bounds how many are written).
                LoginError::Invalid => {
                    state.audit(
                        crate::audit::Kind::LoginFailed,
                        "",
                        ip,
                        "",
                        crate::audit::Via::Rest,
                        serde_json::json!({"reason": "bearer token refused"}),
                    );
                    ApiError::Unauthorized
                }
                LoginError::RateLimited { retry_after } => ApiError::TooManyRequests {
                    message: "too many failed tokens from this address; wait before trying again"
                        .into(),
                    retry_after: retry_after.as_secs().max(1),
                },
            });
    }
    state.check_sessions(&parts.headers).await;
    state
        .session_principal(&parts.headers)
        .ok_or(ApiError::Unauthorized)
}

impl FromRequestParts<State> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &State) -> Result<Self, Self::Rejection> {
        authenticate(parts, state).await.map(Caller)
    }
}

impl FromRequestParts<State> for Writer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &State) -> Result<Self, Self::Rejection> {
        if !parts.headers.contains_key(header::AUTHORIZATION)
            && !state.site.origin_allowed(&parts.headers)
        {
            return Err(ApiError::Unauthorized);
        }
        authenticate(parts, state).await.map(Writer)
    }
}

impl FromRequestParts<State> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &State) -> Result<Self, Self::Rejection> {
        let Writer(who) = Writer::from_request_parts(parts, state).await?;
        if who.role != Role::Admin {
            return Err(ApiError::Forbidden("only admins manage tokens".into()));
        }
        Ok(Admin(who))
    }
}
