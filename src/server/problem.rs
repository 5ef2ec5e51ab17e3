//! API errors as RFC 9457 problem details, each failure mapped to one
//! status and one body in one place.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every API error (RFC 9457 problem details), sent as
/// `application/problem+json`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Problem {
    /// A URI naming the kind of problem (`.../problems/bad-request`).
    #[serde(rename = "type")]
    pub(crate) kind: String,
    /// The status's reason phrase.
    pub(crate) title: String,
    /// The HTTP status code.
    pub(crate) status: u16,
    /// What went wrong, for a person to read.
    pub(crate) detail: String,
}

/// Everything an API handler can fail with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("valid credentials are required: send `Authorization: Bearer <token>`")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("this endpoint does not answer that method")]
    MethodNotAllowed,
    #[error("{0}")]
    TooLarge(String),
    #[error("the request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("{message}")]
    TooManyRequests { message: String, retry_after: u64 },
    #[error("{0}")]
    AgentUnavailable(String),
    /// The server cannot take the request now (a budget is spent).
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
    /// The client sent nothing for too long (HTTP 408).
    #[error("{0}")]
    RequestTimeout(String),
    /// The host's file system is full (HTTP 507).
    #[error("{0}")]
    InsufficientStorage(String),
    /// A `Range` that starts past the end of a file of `size` bytes.
    #[error("{message}")]
    RangeNotSatisfiable { message: String, size: Option<u64> },
    /// The `Host` header names another server (see `Site::host_allowed`).
    #[error(
        "this server does not answer for that host name; use the address conch printed (or its --public-url)"
    )]
    MisdirectedHost,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::AgentUnavailable(_) | ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::MisdirectedHost => StatusCode::MISDIRECTED_REQUEST,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::Conflict(_) => "conflict",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::TooLarge(_) => "body-too-large",
            ApiError::UnsupportedMediaType => "unsupported-media-type",
            ApiError::TooManyRequests { .. } => "too-many-requests",
            ApiError::AgentUnavailable(_) => "agent-unavailable",
            ApiError::Busy(_) => "busy",
            ApiError::Internal(_) => "internal",
            ApiError::InsufficientStorage(_) => "insufficient-storage",
            ApiError::RequestTimeout(_) => "request-timeout",
            ApiError::RangeNotSatisfiable { .. } => "range-not-satisfiable",
            ApiError::MisdirectedHost => "misdirected-host",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = Problem {
            kind: format!("https://conch.invalid/problems/{}", self.slug()),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
        };
        let mut response = (status, Json(body)).into_response();
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match &self {
            ApiError::Unauthorized => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"conch\""),
                );
            }
            ApiError::TooManyRequests { retry_after, .. } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            ApiError::Busy(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(1));
            }
            ApiError::RangeNotSatisfiable {
                size: Some(size), ..
            } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    h.insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        response
    }
}
