//! The console's WebSocket handshake (RFC 6455 over HTTP/1.1, RFC 8441
//! over HTTP/2), done here rather than by axum's `WebSocketUpgrade` so that
//! the console holds tungstenite's own stream. Through it a large output
//! message goes out as several frames (`super::ws`'s `FRAGMENT`), which
//! axum's `Message` cannot say: tungstenite copies each frame into a write
//! buffer that keeps, for the socket's life, the size of the largest frame
//! it ever held, 256 KiB in every console that once printed that much.

use std::future::Future;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// The console's side of an upgraded connection.
pub(crate) type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// A request that asks for a WebSocket, checked as far as the protocol
/// goes (who may open one is the handler's to check).
pub(crate) struct Upgrade {
    /// `Sec-WebSocket-Key` over HTTP/1.1; none over HTTP/2.
    key: Option<HeaderValue>,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

/// Why a request is no WebSocket handshake.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotAHandshake {
    Method(&'static str),
    Header(&'static str),
    /// The connection cannot be taken over (no upgrade state from hyper).
    NotUpgradable,
}

impl IntoResponse for NotAHandshake {
    fn into_response(self) -> Response {
        match self {
            NotAHandshake::Method(m) => (StatusCode::METHOD_NOT_ALLOWED, m).into_response(),
            NotAHandshake::Header(h) => (StatusCode::BAD_REQUEST, h).into_response(),
            NotAHandshake::NotUpgradable => (
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot be upgraded to a WebSocket",
            )
                .into_response(),
        }
    }
}

fn header_is(headers: &HeaderMap, name: HeaderName, value: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

/// Whether a comma-separated header lists `token` (`Connection: keep-alive, Upgrade`).
fn header_lists(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// The protocol checks of a handshake, apart from taking the connection.
fn check(parts: &Parts) -> Result<Option<HeaderValue>, NotAHandshake> {
    let key = if parts.version <= Version::HTTP_11 {
        if parts.method != Method::GET {
            return Err(NotAHandshake::Method("a WebSocket is opened with GET"));
        }
        if !header_lists(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(NotAHandshake::Header("`Connection` must list `upgrade`"));
        }
        if !header_is(&parts.headers, header::UPGRADE, "websocket") {
            return Err(NotAHandshake::Header("`Upgrade` must be `websocket`"));
        }
        let key = parts.headers.get(header::SEC_WEBSOCKET_KEY);
        Some(
            key.cloned()
                .ok_or(NotAHandshake::Header("`Sec-WebSocket-Key` is missing"))?,
        )
    } else {
        // Extended CONNECT (RFC 8441): hyper passes `:protocol` on as an
        // extension.
        if parts.method != Method::CONNECT {
            return Err(NotAHandshake::Method(
                "a WebSocket over HTTP/2 is opened with CONNECT",
            ));
        }
        let protocol = parts.extensions.get::<hyper::ext::Protocol>();
        if protocol.is_none_or(|p| p.as_str() != "websocket") {
            return Err(NotAHandshake::Header("`:protocol` must be `websocket`"));
        }
        None
    };
    if !header_is(&parts.headers, header::SEC_WEBSOCKET_VERSION, "13") {
        return Err(NotAHandshake::Header("`Sec-WebSocket-Version` must be 13"));
    }
    Ok(key)
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotAHandshake;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let key = check(parts)?;
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(NotAHandshake::NotUpgradable)?;
        Ok(Upgrade { key, on_upgrade })
    }
}

impl Upgrade {
    /// Answers the handshake and runs `session` on the socket once the
    /// connection is handed over (in a task of its own; nothing runs if
    /// the client goes away first).
    pub(crate) fn on_upgrade<F, Fut>(self, config: WebSocketConfig, session: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let io = TokioIo::new(upgraded);
            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            session(socket).await;
        });
        match self.key {
            Some(key) => (
                StatusCode::SWITCHING_PROTOCOLS,
                [
                    (header::CONNECTION, HeaderValue::from_static("upgrade")),
                    (header::UPGRADE, HeaderValue::from_static("websocket")),
                    (
                        header::SEC_WEBSOCKET_ACCEPT,
                        HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
                            .expect("base64 is a valid header value"),
                    ),
                ],
            )
                .into_response(),
            None => StatusCode::OK.into_response(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(req: Request<()>) -> Parts {
        req.into_parts().0
    }

    fn h1() -> axum::http::request::Builder {
        Request::get("/ws")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "WebSocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    }

    #[test]
    fn a_browser_handshake_passes_and_each_missing_part_is_named() {
        let ok = check(&parts(h1().body(()).unwrap())).unwrap();
        assert_eq!(ok.unwrap(), "dGhlIHNhbXBsZSBub25jZQ==");
        // RFC 6455's own example of the accept key.
        assert_eq!(
            derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );

        let post = Request::post("/ws").body(()).unwrap();
        assert!(matches!(check(&parts(post)), Err(NotAHandshake::Method(_))));
        // Each header made wrong in turn: the refusal names it.
        let cases: [(&str, Option<&'static str>, &str); 4] = [
            ("connection", Some("keep-alive"), "Connection"),
            ("sec-websocket-key", None, "Key"),
            ("sec-websocket-version", Some("8"), "Version"),
            ("upgrade", Some("h2c"), "Upgrade"),
        ];
        for (name, value, named) in cases {
            let mut req = h1().body(()).unwrap();
            match value {
                Some(v) => req.headers_mut().insert(name, HeaderValue::from_static(v)),
                None => req.headers_mut().remove(name),
            };
            match check(&parts(req)) {
                Err(NotAHandshake::Header(h)) => assert!(h.contains(named), "{h}"),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn over_http2_it_takes_an_extended_connect_and_no_key() {
        let connect = || {
            Request::connect("/ws")
                .version(Version::HTTP_2)
                .header("sec-websocket-version", "13")
                .body(())
                .unwrap()
        };
        assert!(matches!(
            check(&parts(connect())),
            Err(NotAHandshake::Header(h)) if h.contains(":protocol")
        ));
        let mut req = connect();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert_eq!(check(&parts(req)), Ok(None));
        let get = Request::get("/ws")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        assert!(matches!(check(&parts(get)), Err(NotAHandshake::Method(_))));
    }
}
