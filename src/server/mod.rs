//! The web server: the console page, its WebSocket bridge to the agents,
//! and the REST API, all behind one authentication layer.

pub(crate) mod agent_listener;
pub mod agents;
pub mod agents_file;
pub mod api;
pub(crate) mod assets;
pub(crate) mod audit_log;
pub mod auth;
mod bridge;
pub(crate) mod caller;
pub(crate) mod embedded;
mod fanout;
pub(crate) mod files;
pub mod http;
pub(crate) mod input;
pub(crate) mod login_sessions;
pub(crate) mod messages;
pub(crate) mod metrics;
mod openapi;
pub(crate) mod pages;
pub(crate) mod peer;
pub(crate) mod policy;
pub(crate) mod problem;
pub mod quota;
pub(crate) mod recordings;
pub(crate) mod security;
pub(crate) mod sessions;
pub mod throttle;
pub mod tls;
pub mod tokens;
pub(crate) mod users;
pub mod ws;
mod ws_upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use self::agents::{AgentSpec, Registry};
use self::auth::{Auth, Principal, Secret, User};
use crate::keyfile::Key;

/// Everything `conch serve` needs, built from its flags and environment.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Bounds on HTTP connections.
    pub http: http::HttpLimits,
    /// The agents to use (`--agent`, or `--agents-file`); none starts an
    /// embedded one on loopback.
    pub agents: Vec<AgentSpec>,
    /// Where the agents come from and how their links behave.
    pub fleet: Fleet,
    /// Extra `conch agent` flags for the embedded agent (command isolation).
    pub embedded_agent_args: Vec<String>,
    /// `None`: generate one and print a login URL with it.
    pub admin_token: Option<Secret>,
    pub users: Vec<User>,
    /// Origins besides the server's own that may open consoles.
    pub allowed_origins: Vec<String>,
    /// The address users see (`--public-url`), behind a proxy or not.
    pub public_url: Option<url::Url>,
    /// Where everything is served under the host: "" or "/conch".
    pub base_path: String,
    /// Proxies whose forwarding headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub session_ttl: Duration,
    pub session_limits: auth::SessionLimits,
    /// Where the store (`conch.db`), the audit journal and the device key
    /// are kept; `None` keeps them in memory.
    pub data_dir: Option<std::path::PathBuf>,
    /// The store's URL (`sqlite://...` or `postgres://...`; a secret).
    pub store_url: String,
    /// How long audit records are kept; `None`: for ever.
    pub audit_retention: Option<Duration>,
    /// Whether anything is recorded (`--audit off`: nothing).
    pub audit: bool,
    /// This server's name in the audit log.
    pub server_name: String,
    /// Session recordings' cap, input and retention (recorded unless
    /// `--audit off`).
    pub recordings: crate::recording::Settings,
    pub api_limits: api::ApiLimits,
    /// Shares of the agents' channels per user.
    pub quota: quota::QuotaLimits,
    /// Whether logs are JSON (then the generated token is not printed).
    pub json_logs: bool,
    /// HTTPS served by conch itself (`--tls-cert`/`--tls-key`, or
    /// `--tls-self-signed`); `None`: plain HTTP.
    pub tls: Option<tls::WebTlsSource>,
    /// The token of `/metrics` for a scraper (`--metrics-token-file`).
    pub metrics_token: Option<Secret>,
}

/// The fleet's settings beyond the agents themselves.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    /// Reread on change and on SIGHUP (`--agents-file`).
    pub agents_file: Option<std::path::PathBuf>,
    /// Whether weak agent keys are accepted (`--allow-weak-key`).
    pub allow_weak_keys: bool,
    /// Where agents that dial in connect (`--agent-listen`).
    pub agent_listen: Option<SocketAddr>,
    pub links: agents::LinkOptions,
}

/// Shared by every handler.
pub(crate) struct AppState {
    pub(crate) auth: Auth,
    pub(crate) agents: Registry,
    /// Hosts, origins, proxies and cookies.
    pub(crate) site: security::Site,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tokens: tokens::TokenStore,
    pub(crate) api_limits: api::ApiLimits,
    pub(crate) api_rate: throttle::RequestRate,
    /// One permit per password check running (argon2 takes ~19 MiB and
    /// tens of milliseconds each).
    pub(crate) login_slots: tokio::sync::Semaphore,
    /// One permit per command running through the API.
    pub(crate) exec_slots: Arc<tokio::sync::Semaphore>,
    /// One permit per byte that buffered API answers may hold.
    pub(crate) output_budget: Arc<tokio::sync::Semaphore>,
    /// Running commands per user and agent.
    pub(crate) quota: quota::Quota,
    /// The bearer token that opens `/metrics` (and nothing else).
    pub(crate) metrics_token: Option<Secret>,
    /// The audit log.
    pub(crate) audit: crate::audit::Audit,
    /// Session recordings.
    pub(crate) recordings: crate::recording::Recordings,
}

pub(crate) type State = Arc<AppState>;

/// Password checks run at once; more logins wait their turn.
pub(crate) const LOGIN_VERIFIERS: usize = 2;

impl AppState {
    /// Queues an audit record (never waits; see `crate::audit`).
    pub(crate) fn audit(
        &self,
        kind: crate::audit::Kind,
        user: &str,
        source: impl ToString,
        agent: &str,
        via: crate::audit::Via,
        detail: serde_json::Value,
    ) {
        self.audit.record(crate::audit::Event {
            kind,
            user: user.to_owned(),
            source: source.to_string(),
            agent: agent.to_owned(),
            via,
            detail,
        });
    }

    /// Brings what this server knows of the request's session cookies in
    /// step with the store (one it does not know, or has not checked for a
    /// while): call before the synchronous lookups below. A store that
    /// cannot answer leaves things as they are.
    pub(crate) async fn check_sessions(&self, headers: &HeaderMap) {
        for cookie in self.site.cookies(headers, self.site.session_cookie_name()) {
            self.check_cookie(&cookie).await;
        }
    }

    /// The same for one session cookie.
    pub(crate) async fn check_cookie(&self, cookie: &str) {
        if cookie.len() > 256 || !self.auth.needs_check(cookie) {
            return;
        }
        let key = auth::stored_key(cookie);
        match login_sessions::load(&self.audit.store, &key).await {
            Ok(found) => self.auth.adopt(cookie, found),
            Err(e) => tracing::warn!(error = %e, "cannot read login sessions from the store"),
        }
    }

    /// Who sent this request, from its session cookie.
    pub(crate) fn session_principal(&self, headers: &HeaderMap) -> Option<Principal> {
        self.auth.session(&self.session_cookie(headers)?)
    }

    /// The session cookie's value, if the request has one. Under a base
    /// path the cookie cannot be `__Host-`, so a sibling sub-domain may set
    /// one of the same name for a longer path, which the browser sends
    /// first: every cookie of that name is looked at, and only the one that
    /// is a live session counts. Two different live sessions are none.
    pub(crate) fn session_cookie(&self, headers: &HeaderMap) -> Option<String> {
        let mut live = self
            .site
            .cookies(headers, self.site.session_cookie_name())
            .filter(|c| self.auth.session(c).is_some());
        let first = live.next()?;
        match live.find(|c| *c != first) {
            Some(_) => None,
            None => Some(first),
        }
    }
}

/// The application's routes.
pub(crate) fn router(state: State) -> Router {
    let hsts = state.site.https;
    Router::new()
        .route("/", get(pages::console))
        .route("/login", get(pages::login_page).post(pages::login_submit))
        .route("/logout", axum::routing::post(pages::logout))
        // `any`: HTTP/1.1 upgrades with GET, HTTP/2 (RFC 8441) with CONNECT.
        .route("/ws", axum::routing::any(ws::upgrade))
        .route(
            "/static/{*path}",
            get(assets::serve).layer(tower_http::compression::CompressionLayer::new()),
        )
        .route("/healthz", get(pages::healthz))
        .route("/readyz", get(pages::readyz))
        .route("/api/v1/session", get(pages::session_info))
        .route("/api/v1/agents", get(api::agents))
        .route("/api/v1/exec", axum::routing::post(api::exec))
        .route("/api/v1/sessions", get(sessions::list))
        .route("/api/v1/files", get(files::get).put(files::put))
        .route("/api/v1/audit", get(audit_log::read))
        .route("/api/v1/recordings", get(recordings::list))
        .route("/api/v1/users", get(users::list).post(users::add))
        .route("/api/v1/users/{name}", axum::routing::delete(users::delete))
        .route(
            "/api/v1/users/{name}/password",
            axum::routing::put(users::set_password),
        )
        .route("/api/v1/recordings/{id}", get(recordings::file))
        .route("/audit", get(pages::audit))
        .route("/recordings/{id}", get(pages::replay))
        .route(
            "/api/v1/sessions/{agent}/{id}",
            axum::routing::delete(sessions::end).patch(sessions::change),
        )
        .route(
            "/api/v1/tokens",
            get(api::list_tokens).post(api::create_token),
        )
        .route(
            "/api/v1/tokens/{name}",
            axum::routing::delete(api::revoke_token),
        )
        .route("/api/v1/openapi.json", get(api::openapi))
        .route_layer(axum::middleware::from_fn(metrics::time_api))
        .route("/metrics", get(metrics::page))
        .route("/api/{*rest}", axum::routing::any(api::not_found))
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            security::host_guard,
        ))
        .layer(axum::middleware::from_fn(security::headers))
        .layer(
            tower_http::set_header::SetResponseHeaderLayer::if_not_present(
                axum::http::header::STRICT_TRANSPORT_SECURITY,
                // Only over HTTPS (served here or by the proxy of an https://
                // public URL): a year, as browsers' HSTS preload asks.
                hsts.then(|| axum::http::HeaderValue::from_static("max-age=31536000")),
            ),
        )
        .with_state(state)
}

/// Runs the server until `shutdown` fires.
pub async fn run(config: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    serve(listener, config, shutdown).await
}

/// Serves on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    // The store first: nothing runs (no agent is dialled) before what it
    // does can be recorded.
    let store = crate::store::Store::open(&config.store_url).await?;
    // The store holds who ran what: its owner's alone.
    if let Some(dir) = &config.data_dir {
        for name in ["conch.db", "conch.db-wal", "conch.db-shm"] {
            let path = dir.join(name);
            if path.exists() {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
            }
        }
    }
    if config.data_dir.is_none() && store.backend == crate::store::Backend::Sqlite {
        tracing::warn!(
            "no --data-dir: the audit log lives in memory and is lost when the server stops"
        );
    }
    let store_for_tokens = store.clone();
    let store_for_recordings = store.clone();
    // Stopped after the last request is done, so that the records of
    // commands ended by the shutdown are written too.
    let audit_stop = CancellationToken::new();
    let (audit, audit_writer) = if config.audit {
        let journal = match &config.data_dir {
            Some(dir) => Some(
                crate::audit::Journal::open(
                    &crate::audit::journal_path(dir),
                    &store,
                    &config.server_name,
                )
                .await?,
            ),
            None => None,
        };
        crate::audit::Audit::start(
            store,
            config.server_name.clone(),
            config.audit_retention,
            journal,
            audit_stop.clone(),
        )
    } else {
        tracing::warn!("--audit off: nothing run on this server is recorded");
        (crate::audit::Audit::off(store), tokio::spawn(async {}))
    };
    let recordings_stop = CancellationToken::new();
    let (recordings, recordings_writer) = if config.audit {
        match crate::recording::close_abandoned(&store_for_recordings, &config.server_name).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                recordings = n,
                "recordings the last server left unfinished are closed (marked incomplete)"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot close unfinished recordings"),
        }
        crate::recording::Recordings::start(
            store_for_recordings,
            crate::recording::Settings {
                server: config.server_name.clone(),
                ..config.recordings.clone()
            },
            recordings_stop.clone(),
        )
    } else {
        (
            crate::recording::Recordings::off(store_for_recordings),
            tokio::spawn(async {}),
        )
    };
    let tokens = tokens::TokenStore::open(store_for_tokens, config.data_dir.as_deref())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (specs, embedded) = if config.agents.is_empty() {
        let (spec, task) =
            embedded::start(config.embedded_agent_args.clone(), shutdown.child_token()).await?;
        (vec![spec], Some(task))
    } else {
        (config.agents.clone(), None)
    };
    let agents = Registry::start(specs, config.fleet.links, shutdown.clone());
    let mut fleet_tasks = Vec::new();
    if let Some(listen) = config.fleet.agent_listen {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for agents on {listen}: {e}"))?;
        fleet_tasks.push(tokio::spawn(agent_listener::serve(
            listener,
            agents.clone(),
            shutdown.clone(),
        )));
    } else if agents.statuses().iter().any(|a| a.dials_in) {
        tracing::warn!(
            "the agents file declares agents that dial in, but there is no --agent-listen for them"
        );
    }
    if let Some(path) = config.fleet.agents_file.clone() {
        fleet_tasks.push(tokio::spawn(agents_file::watch(
            path,
            config.fleet.allow_weak_keys,
            agents.clone(),
            shutdown.clone(),
        )));
    }
    let web_tls = match &config.tls {
        Some(source) => Some(tls::WebTls::start(source, shutdown.clone())?),
        None => None,
    };
    let generated = config.admin_token.is_none();
    let admin_token = config.admin_token.clone().unwrap_or_else(Secret::generate);
    let state = Arc::new(AppState {
        auth: Auth::new(
            admin_token.clone(),
            config.users.clone(),
            config.session_ttl,
            config.session_limits,
            device_key(config.data_dir.as_deref())?,
        ),
        agents,
        site: security::Site::new(
            config.public_url.as_ref(),
            addr,
            config.allowed_origins.clone(),
            peer::TrustedProxies(config.trusted_proxies.clone()),
            web_tls.is_some(),
        )
        .under(&config.base_path),
        shutdown: shutdown.clone(),
        tokens,
        exec_slots: Arc::new(tokio::sync::Semaphore::new(
            config.api_limits.max_concurrent.max(1),
        )),
        output_budget: Arc::new(tokio::sync::Semaphore::new(
            config
                .api_limits
                .buffered_budget
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        )),
        quota: quota::Quota::new(config.quota),
        api_limits: config.api_limits.clone(),
        api_rate: throttle::RequestRate::new(config.api_limits.rate_per_minute),
        login_slots: tokio::sync::Semaphore::new(LOGIN_VERIFIERS),
        metrics_token: config.metrics_token.clone(),
        audit,
        recordings,
    });
    if let Some(t) = &web_tls {
        info!(%addr, fingerprint = %t.fingerprint, "serving HTTPS");
        // A self-signed certificate is public: written where clients
        // (`conch exec --ca-file`) can take it, when there is a data
        // directory.
        if let (Some(pem), Some(dir)) = (&t.self_signed_pem, &config.data_dir) {
            let path = dir.join("tls-self-signed.pem");
            match std::fs::write(&path, pem) {
                Ok(()) => {
                    info!(path = %path.display(), "the self-signed certificate, for clients to trust")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the self-signed certificate")
                }
            }
        }
    }
    info!(%addr, "server listening");
    crate::systemd::ready(&format!("serving on {addr}"), &shutdown);
    if generated && config.users.is_empty() {
        if config.json_logs {
            info!(
                "an admin token was generated; set CONCH_ADMIN_TOKEN (or --admin-token-file) to know it"
            );
        } else {
            // Printed for the person at the terminal, as Jupyter does; it is
            // not a log line and never goes through tracing.
            let base = match (&config.public_url, &web_tls) {
                (Some(u), _) => format!("{}{}", u.origin().ascii_serialization(), config.base_path),
                (None, Some(_)) => format!("https://{addr}{}", config.base_path),
                (None, None) => format!("http://{addr}{}", config.base_path),
            };
            println!("conch: open {base}/login?token={}", admin_token.expose());
            if let Some(t) = &web_tls {
                println!(
                    "conch: the server's certificate has the SHA-256 fingerprint {}",
                    t.fingerprint
                );
            }
        }
    }
    let limits = http::HttpLimits {
        max_connections: http::fit_connection_cap(config.http.max_connections),
        ..config.http
    };
    http::serve(
        listener,
        router(state),
        config.base_path.clone(),
        limits,
        web_tls.map(|t| t.acceptor),
        shutdown.clone(),
    )
    .await;
    if let Some(task) = embedded {
        let _ = task.await;
    }
    for task in fleet_tasks {
        let _ = task.await;
    }
    audit_stop.cancel();
    recordings_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(5), audit_writer)
        .await
        .is_err()
    {
        tracing::error!("the audit writer did not finish within 5 s; records queued are lost");
    }
    if tokio::time::timeout(Duration::from_secs(5), recordings_writer)
        .await
        .is_err()
    {
        tracing::error!("the recordings' writer did not finish within 5 s; output queued is lost");
    }
    info!("server stopped");
    Ok(())
}

/// The key that signs trusted-device cookies: `device.key` in the data
/// directory (made at first start, mode 0600), or a fresh one without a
/// data directory.
fn device_key(dir: Option<&std::path::Path>) -> anyhow::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    let Some(dir) = dir else {
        rand::fill(&mut key);
        return Ok(key);
    };
    let path = dir.join("device.key");
    if let Ok(text) = std::fs::read_to_string(&path)
        && hex::decode_to_slice(text.trim(), &mut key).is_ok()
    {
        crate::keyfile::warn_if_exposed(&path, "device key file");
        return Ok(key);
    }
    rand::fill(&mut key);
    tokens::create_private_dir(dir)?;
    let tmp = Key::from_bytes(hex::encode(key).as_bytes())
        .ok_or_else(|| anyhow::anyhow!("a generated key is too short"))?;
    let _ = std::fs::remove_file(&path);
    tmp.save_new(&path)?;
    Ok(key)
}
