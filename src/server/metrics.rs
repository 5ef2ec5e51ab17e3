//! `GET /metrics`: the server's state in the Prometheus text format
//! (OpenMetrics), for admins or the holder of `--metrics-token-file`.
//!
//! Counters are process-wide (one server per process in production):
//! they are bumped where the event happens, once for every edge (console,
//! REST, fan-out) because those all read commands through `bridge`, and
//! logins through `auth`. Gauges that describe current state (agents,
//! login sessions, commands running) are read from their owners at each
//! scrape, so they can never drift from the truth.

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How a command ended, as counted.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub(crate) enum Outcome {
    exit_zero,
    exit_nonzero,
    signal,
    timed_out,
    refused,
    lost,
    shut_down,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabel {
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    method: String,
    /// The route's pattern (`/api/v1/tokens/{name}`), never the raw path:
    /// the set of values is bounded by the routes.
    route: String,
    status: u16,
}

/// The process's counters and histograms.
pub(crate) struct Counters {
    commands_finished: Family<OutcomeLabel, Counter>,
    output_bytes: Counter,
    input_bytes: Counter,
    /// Console WebSockets open now.
    consoles: Gauge,
    /// Console commands that are shells of sessions (opened or attached), now.
    shells: Gauge,
    login_failures: Counter,
    recording_writes_lost: Counter,
    api_latency: Family<RouteLabel, Histogram, fn() -> Histogram>,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

static COUNTERS: LazyLock<Counters> = LazyLock::new(|| Counters {
    commands_finished: Family::default(),
    output_bytes: Counter::default(),
    input_bytes: Counter::default(),
    consoles: Gauge::default(),
    shells: Gauge::default(),
    login_failures: Counter::default(),
    recording_writes_lost: Counter::default(),
    api_latency: Family::new_with_constructor(latency_histogram),
});

/// A command ended so.
pub(crate) fn finished(outcome: Outcome) {
    COUNTERS
        .commands_finished
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
}

/// Command output passed on to a client.
pub(crate) fn output(bytes: usize) {
    COUNTERS.output_bytes.inc_by(bytes as u64);
}

/// Command input taken from a client (console keystrokes, REST stdin).
pub(crate) fn input(bytes: usize) {
    COUNTERS.input_bytes.inc_by(bytes as u64);
}

/// Counts one of something open for as long as the guard lives.
pub(crate) struct Open(&'static Gauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A console WebSocket is open (until the guard drops).
pub(crate) fn console_open() -> Open {
    COUNTERS.consoles.inc();
    Open(&COUNTERS.consoles)
}

/// A console command is a session's shell (until the guard drops).
pub(crate) fn shell_attached() -> Open {
    COUNTERS.shells.inc();
    Open(&COUNTERS.shells)
}

/// A login or bearer token was refused.
pub(crate) fn login_failed() {
    COUNTERS.login_failures.inc();
}

/// Writes of recordings the store refused (after its retries), or
/// recordings that could not begin.
pub(crate) fn recording_writes_lost(n: u64) {
    COUNTERS.recording_writes_lost.inc_by(n);
}

/// An API request was answered.
pub(crate) fn api_request(method: &str, route: &str, status: u16, seconds: f64) {
    COUNTERS
        .api_latency
        .get_or_create(&RouteLabel {
            method: method.to_owned(),
            route: route.to_owned(),
            status,
        })
        .observe(seconds);
}

/// Times each REST API request to its answer's head, by route pattern.
pub(crate) async fn time_api(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .filter(|p| p.starts_with("/api/"));
    // Methods by name only when standard: a client must not be able to
    // make new label sets (and memory) with made-up methods.
    let method = match request.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS") => m,
        _ => "other",
    }
    .to_owned();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    if let Some(route) = route {
        api_request(
            &method,
            &route,
            response.status().as_u16(),
            started.elapsed().as_secs_f64(),
        );
    }
    response
}

/// `GET /metrics`: for the holder of `--metrics-token-file` (a bearer
/// token that opens nothing else), or an admin.
pub(crate) async fn page(
    axum::extract::State(state): axum::extract::State<super::State>,
    request: axum::extract::Request,
) -> Result<axum::response::Response, super::problem::ApiError> {
    use axum::extract::FromRequestParts;
    use axum::response::IntoResponse;
    let bearer = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let by_token = matches!((&state.metrics_token, bearer), (Some(t), Some(b)) if t.matches(b));
    if !by_token {
        let (mut parts, _) = request.into_parts();
        let super::caller::Caller(who) =
            super::caller::Caller::from_request_parts(&mut parts, &state).await?;
        if who.role != super::auth::Role::Admin || who.agents.is_some() {
            return Err(super::problem::ApiError::Forbidden(
                "metrics are for admins (or the metrics token)".into(),
            ));
        }
    }
    let agents = state
        .agents
        .statuses()
        .into_iter()
        .map(|a| (a.name, a.connected, a.rtt_ms.map(|ms| ms / 1000.0)))
        .collect();
    let text = render(Snapshot {
        login_sessions: state.auth.session_count(),
        commands_running: state.quota.running(),
        agents,
    });
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// What a scrape reads from the server's state.
pub(crate) struct Snapshot {
    pub(crate) login_sessions: usize,
    pub(crate) commands_running: usize,
    /// Name, connected, round trip in seconds.
    pub(crate) agents: Vec<(String, bool, Option<f64>)>,
}

/// The text of one scrape.
pub(crate) fn render(now: Snapshot) -> String {
    let mut registry = Registry::with_prefix("conch");
    let c = &*COUNTERS;
    registry.register(
        "commands_finished",
        "Commands (console, REST, fan-out hosts) that ended, by outcome",
        c.commands_finished.clone(),
    );
    registry.register(
        "output_bytes",
        "Bytes of command output passed on to clients",
        c.output_bytes.clone(),
    );
    registry.register(
        "login_failures",
        "Refused passwords, admin tokens and bearer tokens",
        c.login_failures.clone(),
    );
    registry.register(
        "recording_writes_lost",
        "Writes of session recordings lost to a failing store (the recordings are marked incomplete)",
        c.recording_writes_lost.clone(),
    );
    registry.register(
        "input_bytes",
        "Bytes of command input taken from clients (keystrokes, REST stdin)",
        c.input_bytes.clone(),
    );
    registry.register(
        "console_sockets",
        "Console WebSockets open now",
        c.consoles.clone(),
    );
    registry.register(
        "console_shells",
        "Console commands that are shells of sessions (opened or attached) now",
        c.shells.clone(),
    );
    registry.register(
        "api_request_duration_seconds",
        "REST API requests by route and status, time to the answer's head",
        c.api_latency.clone(),
    );
    let gauge = |v: usize| {
        let g: Gauge = Gauge::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        g
    };
    registry.register(
        "login_sessions",
        "Login sessions open",
        gauge(now.login_sessions),
    );
    registry.register(
        "commands_running",
        "Commands running now (console and REST)",
        gauge(now.commands_running),
    );
    let connected = Family::<AgentLabel, Gauge>::default();
    let rtt = Family::<AgentLabel, Gauge<f64, AtomicU64>>::default();
    for (agent, up, seconds) in now.agents {
        let label = AgentLabel { agent };
        connected.get_or_create(&label).set(i64::from(up));
        if let Some(s) = seconds {
            rtt.get_or_create(&label).set(s);
        }
    }
    registry.register(
        "agent_connected",
        "Whether each agent's link is up (1) or not (0)",
        connected,
    );
    registry.register(
        "agent_rtt_seconds",
        "Round-trip time of each connected agent's last ping",
        rtt,
    );
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        text.clear();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_names_every_family_and_its_values() {
        finished(Outcome::exit_zero);
        output(5);
        input(3);
        let _console = console_open();
        let _shell = shell_attached();
        api_request("GET", "/api/v1/agents", 200, 0.002);
        let text = render(Snapshot {
            login_sessions: 2,
            commands_running: 1,
            agents: vec![
                ("web-1".into(), true, Some(0.0015)),
                ("db-1".into(), false, None),
            ],
        });
        for needle in [
            "conch_commands_finished_total{outcome=\"exit_zero\"}",
            "conch_output_bytes_total ",
            "conch_input_bytes_total ",
            "conch_console_sockets ",
            "conch_console_shells ",
            "conch_login_sessions 2",
            "conch_commands_running 1",
            "conch_agent_connected{agent=\"web-1\"} 1",
            "conch_agent_connected{agent=\"db-1\"} 0",
            "conch_agent_rtt_seconds{agent=\"web-1\"} 0.0015",
            "conch_api_request_duration_seconds_bucket{le=\"0.004\",method=\"GET\",route=\"/api/v1/agents\",status=\"200\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(needle), "{needle} in:\n{text}");
        }
        assert!(!text.contains("conch_agent_rtt_seconds{agent=\"db-1\"}"));
    }
}
