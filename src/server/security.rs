//! Security headers on every response, and the Origin check that stops
//! other sites from using a logged-in user's cookie (cross-site WebSocket
//! hijacking, cross-site form posts).

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The page loads scripts only from this server, never inline, and may not
/// be framed.
pub(crate) const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
connect-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; \
form-action 'self'; frame-ancestors 'none'";

/// Adds the security headers to every response. The referrer policy is
/// `same-origin`, not `no-referrer`: under `no-referrer` browsers send
/// `Origin: null` on the page's own form posts, which the Origin check on
/// logout and login would then refuse.
pub(crate) async fn headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Pages and API answers are personal (a new token's secret, a user's
    // console): no cache keeps them. Assets set their own (no-cache + ETag).
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    h.insert(
        header::HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// Where the server is reached and whom it believes: the address users
/// see, the hosts and origins accepted, the proxies trusted, and whether
/// cookies are `Secure`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Site {
    /// `scheme://host[:port]` of `--public-url`.
    pub(crate) public_origin: Option<String>,
    /// The `Host` value of `--public-url` (`host[:port]`, the port only
    /// when not the scheme's default).
    pub(crate) public_host: Option<String>,
    /// Further origins allowed to open consoles.
    pub(crate) allowed_origins: Vec<String>,
    /// Without a public URL, on a loopback listener: accept only loopback
    /// names in `Host`, so that a DNS-rebinding page cannot reach us.
    pub(crate) loopback_hosts_only: bool,
    /// Whether pages are served over HTTPS (directly, or by a proxy for
    /// an `https://` public URL): cookies get `Secure` and `__Host-`.
    pub(crate) https: bool,
    pub(crate) proxies: super::peer::TrustedProxies,
    /// Where the site lives under its host (`--base-path`, or the public
    /// URL's path): "" for the root, else "/conch" (no trailing slash).
    pub(crate) base_path: String,
}

impl Site {
    /// Builds the site policy; `public_url` must be an absolute http(s) URL.
    pub(crate) fn new(
        public_url: Option<&url::Url>,
        listen: std::net::SocketAddr,
        allowed_origins: Vec<String>,
        proxies: super::peer::TrustedProxies,
        served_over_tls: bool,
    ) -> Site {
        let (public_origin, public_host, https) = match public_url {
            Some(u) => {
                let host = u.host_str().unwrap_or("").to_owned();
                let host = match u.port() {
                    Some(p) => format!("{host}:{p}"),
                    None => host,
                };
                (
                    Some(u.origin().ascii_serialization()),
                    Some(host.to_ascii_lowercase()),
                    u.scheme() == "https",
                )
            }
            None => (None, None, false),
        };
        Site {
            public_origin,
            public_host,
            allowed_origins: allowed_origins
                .into_iter()
                .map(|o| o.trim_end_matches('/').to_owned())
                .collect(),
            loopback_hosts_only: public_url.is_none() && listen.ip().is_loopback(),
            https: https || (public_url.is_none() && served_over_tls),
            proxies,
            base_path: String::new(),
        }
    }

    /// The same site served under `base` ("" or "/conch").
    pub(crate) fn under(self, base: &str) -> Site {
        Site {
            base_path: base.to_owned(),
            ..self
        }
    }

    /// `path` (absolute, from the site's root) as the browser must ask for it.
    pub(crate) fn path(&self, path: &str) -> String {
        format!("{}{path}", self.base_path)
    }

    /// Whether the `Host` header names this server (DNS rebinding: a page
    /// on `evil.example` that resolves to us sends `Host: evil.example`).
    pub(crate) fn host_allowed(&self, headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
        // HTTP/2 carries `:authority` (in the URI) instead of `Host`.
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()));
        match host {
            Some(host) => host_matches(self, host),
            // No name at all is not a browser: only an open policy takes it.
            None => !self.loopback_hosts_only && self.public_host.is_none(),
        }
    }

    /// Whether the request's `Origin` is this server's own (the public URL's,
    /// or else the one its `Host` names) or one of `--allowed-origins`. A
    /// request without an `Origin` is refused: every browser sends one on
    /// WebSocket upgrades and cross-site posts.
    pub(crate) fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        if self.allowed_origins.iter().any(|a| a == origin) {
            return true;
        }
        if let Some(public) = &self.public_origin {
            return origin == public;
        }
        let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        host_matches(self, host)
            && (origin == format!("http://{host}") || origin == format!("https://{host}"))
    }

    /// The session cookie's name: `__Host-` over HTTPS, so that no other
    /// site or sub-domain can set it; under a base path (which `__Host-`
    /// forbids) `__Secure-`, which at least no plain-HTTP page can set.
    pub(crate) fn session_cookie_name(&self) -> &'static str {
        match (self.https, self.base_path.is_empty()) {
            (true, true) => "__Host-conch_session",
            (true, false) => "__Secure-conch_session",
            (false, _) => "conch_session",
        }
    }

    /// The trusted-device cookie's name (see `throttle`).
    pub(crate) fn device_cookie_name(&self) -> &'static str {
        match (self.https, self.base_path.is_empty()) {
            (true, true) => "__Host-conch_device",
            (true, false) => "__Secure-conch_device",
            (false, _) => "conch_device",
        }
    }

    /// `Set-Cookie` attributes shared by conch's cookies: the path is the
    /// site's, so that other applications behind the same proxy never get
    /// them.
    pub(crate) fn cookie_attributes(&self) -> String {
        let path = if self.base_path.is_empty() {
            "/"
        } else {
            &self.base_path
        };
        let secure = if self.https { "; Secure" } else { "" };
        format!("Path={path}; HttpOnly; SameSite=Strict{secure}")
    }

    /// A cookie's value from the request (the first of that name).
    pub(crate) fn cookie(&self, headers: &HeaderMap, name: &str) -> Option<String> {
        self.cookies(headers, name).next()
    }

    /// Every value of cookies named `name`, in the order the browser sent
    /// them (longest path first).
    pub(crate) fn cookies<'h>(
        &self,
        headers: &'h HeaderMap,
        name: &'h str,
    ) -> impl Iterator<Item = String> + 'h {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(move |(n, _)| *n == name)
            .map(|(_, value)| value.to_owned())
    }
}

#[cfg(test)]
impl Site {
    fn host_allowed_h(&self, headers: &HeaderMap) -> bool {
        self.host_allowed(headers, &axum::http::Uri::from_static("/"))
    }
}

fn host_matches(site: &Site, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    if let Some(public) = &site.public_host {
        return &host == public;
    }
    if site.loopback_hosts_only {
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h),
        };
        return name == "localhost"
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
    }
    true
}

/// Answers 421 to requests whose `Host` is not this server's (health
/// probes excepted: they carry no secret and come from anywhere).
pub(crate) async fn host_guard(
    axum::extract::State(state): axum::extract::State<super::State>,
    mut request: Request,
    next: Next,
) -> Response {
    // HTTP/2 names the host in `:authority` (the URI), not in `Host`: give
    // it a `Host` header, so that every check after this one (Origin on
    // the WebSocket, login and logout) sees the same name either way.
    if !request.headers().contains_key(header::HOST)
        && let Some(host) = request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        request.headers_mut().insert(header::HOST, host);
    }
    let path = request.uri().path();
    if path == "/healthz"
        || path == "/readyz"
        || state.site.host_allowed(request.headers(), request.uri())
    {
        return next.run(request).await;
    }
    super::problem::ApiError::MisdirectedHost.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            m.insert(header::ORIGIN, o.parse().unwrap());
        }
        m
    }

    #[test]
    fn a_loopback_server_accepts_only_loopback_hosts() {
        let site = Site::new(
            None,
            "127.0.0.1:8080".parse().unwrap(),
            vec![],
            Default::default(),
            false,
        );
        assert!(site.host_allowed_h(&h("127.0.0.1:8080", None)));
        assert!(site.host_allowed_h(&h("localhost:8080", None)));
        assert!(site.host_allowed_h(&h("[::1]:8080", None)));
        assert!(!site.host_allowed_h(&h("evil.example:8080", None)));
        assert!(!site.origin_allowed(&h("evil.example:8080", Some("http://evil.example:8080"))));
        assert!(site.origin_allowed(&h("127.0.0.1:8080", Some("http://127.0.0.1:8080"))));
    }

    #[test]
    fn a_public_url_fixes_host_origin_and_cookies() {
        let url = url::Url::parse("https://ops.example.com/conch").unwrap();
        let site = Site::new(
            Some(&url),
            "0.0.0.0:8080".parse().unwrap(),
            vec![],
            Default::default(),
            false,
        );
        assert!(site.host_allowed_h(&h("ops.example.com", None)));
        assert!(!site.host_allowed_h(&h("127.0.0.1:8080", None)));
        assert!(site.origin_allowed(&h("ops.example.com", Some("https://ops.example.com"))));
        assert!(!site.origin_allowed(&h("ops.example.com", Some("http://ops.example.com"))));
        assert_eq!(site.session_cookie_name(), "__Host-conch_session");
        assert!(site.cookie_attributes().contains("Secure"));
    }
}
