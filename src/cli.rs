//! The `conch` command line: every flag and its environment variable and
//! default, parsed into the typed configuration of the module that does
//! the work, and the dispatch of each subcommand to it. `main.rs` only
//! parses and runs; the tests build configurations here from flags, as a
//! user would write them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::agent::sandbox::{
    CgroupMode, CommandLimits, ExecPolicy, default_memory_limit, make_undumpable,
};
use crate::agent::{AgentConfig, Limits};
use crate::keyfile::Key;
use crate::rest_client::ExecConfig;
use crate::server::ServeConfig;
use crate::server::agents::AgentSpec;
use crate::server::api::ApiLimits;
use crate::server::auth::Role;
use crate::server::auth::{Secret, load_users};
use crate::server::tokens::TokenStore;
use crate::telemetry::LogFormat;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "conch", version, about = "A web-based remote command console")]
pub struct Cli {
    /// Log line format.
    #[arg(
        long,
        global = true,
        env = "CONCH_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the command agent: a TCP server that runs commands for authenticated clients.
    Agent(AgentArgs),
    /// Run the web server: the console page, the REST API, and the bridge to an agent.
    Serve(Box<ServeArgs>),
    /// Run one command through a conch server's REST API; exits with its exit code.
    /// With --on, run it on every agent a selector matches.
    Exec(ExecArgs),
    /// Copy a file to or from an agent's host, as scp does: `conch cp LOCAL AGENT:PATH`
    /// or `conch cp AGENT:PATH LOCAL` (`:PATH`: the server's only agent; `-`: stdin or
    /// stdout). Exits 0 when copied, 1 when refused (not found, permission, exists,
    /// disk full), 255 when conch itself failed.
    Cp(CpArgs),
    /// List a conch server's agents (those a selector matches) as a table.
    Agents(AgentsArgs),
    /// Read a server's audit log (newest first), or `conch audit verify` its
    /// hash chain in the store.
    Audit(AuditArgs),
    /// Manage API tokens in a server's data directory.
    Token(TokenArgs),
    /// Manage the users a server keeps in its store, through its API (admins):
    /// `list`, `add NAME --role ROLE`, `passwd NAME`, `del NAME`. A password is
    /// read from standard input (not echoed on a terminal).
    User(UserArgs),
    /// Probe a server's /healthz or an agent's TCP port; exit 0 when healthy (for container health checks).
    Healthcheck(HealthArgs),
    /// Print an argon2 hash of a password read from standard input, for the users file.
    Passwd,
    /// Write a fresh random agent key (64 hex characters) to a new file with mode 0600.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        path: PathBuf,
    },
}

/// How the commands an agent runs are isolated (shared by `conch agent`
/// and `conch serve`, which passes them to its embedded agent).
#[derive(Args, Clone)]
pub struct IsolationArgs {
    /// Run commands as this user (the agent must run as root). Operators can
    /// do whatever this user can: pick one that cannot read the server's files.
    #[arg(long, env = "CONCH_RUN_AS")]
    run_as: Option<String>,
    /// Processes (and threads) one command may have at once (0: no limit).
    #[arg(long, env = "CONCH_CMD_MAX_PROCS", default_value_t = 4096)]
    cmd_max_procs: u64,
    /// Memory one command may use, in MiB (0: no limit). Default: 3/4 of the
    /// host's memory, enforced only through a cgroup.
    #[arg(long, env = "CONCH_CMD_MAX_MEMORY_MIB")]
    cmd_max_memory_mib: Option<u64>,
    /// Open files per process of a command (hard limit; the soft one is 1024).
    #[arg(long, env = "CONCH_CMD_MAX_OPEN_FILES", default_value_t = 65536)]
    cmd_max_open_files: u64,
    /// How long a command may take from its clone to its exec (`10s`,
    /// `500ms`) before it is killed: a hung directory or a process stopped
    /// there must not hold a start for ever.
    #[arg(long, env = "CONCH_CMD_START_TIMEOUT", default_value = "10s", value_parser = start_timeout)]
    cmd_start_timeout: std::time::Duration,
    /// Whether to put each command in a cgroup of its own where possible.
    #[arg(long, env = "CONCH_CGROUPS", value_enum, default_value = "auto")]
    cgroups: CgroupMode,
}

/// How an agent keeps shells that outlive their page (shared by `conch
/// agent` and `conch serve`, which passes them to its embedded agent).
#[derive(Args, Clone)]
pub struct ShellSessionArgs {
    /// How long a shell session with nothing attached keeps running
    /// before it is ended (`90s`, `30m`, `2h`; `0` ends it when its last
    /// page goes).
    #[arg(long, env = "CONCH_SESSION_LINGER", default_value = "30m", value_parser = duration)]
    session_linger: std::time::Duration,
    /// Lines of scrollback a session keeps for redrawing a reattached page.
    #[arg(long, env = "CONCH_SESSION_SCROLLBACK", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    session_scrollback: u32,
    /// Shell sessions the agent holds at once (attached or not); 0 keeps
    /// none (shells then end with their page, and cost no terminal model).
    #[arg(long, env = "CONCH_MAX_SHELL_SESSIONS", default_value_t = 128)]
    max_shell_sessions: usize,
}

impl ShellSessionArgs {
    fn limits(&self) -> crate::agent::SessionLimits {
        crate::agent::SessionLimits {
            linger: self.session_linger,
            scrollback: self.session_scrollback as usize,
            max_sessions: self.max_shell_sessions,
        }
    }

    /// The same settings as `conch agent` flags.
    fn to_args(&self) -> Vec<String> {
        vec![
            format!("--session-linger={}ms", self.session_linger.as_millis()),
            format!("--session-scrollback={}", self.session_scrollback),
            format!("--max-shell-sessions={}", self.max_shell_sessions),
        ]
    }
}

impl IsolationArgs {
    fn policy(&self) -> anyhow::Result<ExecPolicy> {
        let limits = CommandLimits {
            max_procs: self.cmd_max_procs,
            max_memory: match self.cmd_max_memory_mib {
                Some(mib) => mib.saturating_mul(1024 * 1024),
                None => default_memory_limit(),
            },
            memory_explicit: self.cmd_max_memory_mib.is_some(),
            max_open_files: self.cmd_max_open_files.max(16),
            start_timeout: self.cmd_start_timeout,
        };
        Ok(ExecPolicy::new(
            self.run_as.as_deref(),
            limits,
            self.cgroups,
        )?)
    }

    /// The same settings as `conch agent` flags.
    fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--cmd-max-procs={}", self.cmd_max_procs),
            format!("--cmd-max-open-files={}", self.cmd_max_open_files),
            format!(
                "--cmd-start-timeout={}ms",
                self.cmd_start_timeout.as_millis()
            ),
            format!(
                "--cgroups={}",
                match self.cgroups {
                    CgroupMode::Auto => "auto",
                    CgroupMode::Off => "off",
                }
            ),
        ];
        if let Some(user) = &self.run_as {
            args.push(format!("--run-as={user}"));
        }
        if let Some(mib) = self.cmd_max_memory_mib {
            args.push(format!("--cmd-max-memory-mib={mib}"));
        }
        args
    }
}

#[derive(Args)]
pub struct AgentArgs {
    /// Address to listen on. Loopback by default: exposing an agent is a decision.
    #[arg(long, env = "CONCH_AGENT_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Serve on this already-listening socket instead (how `conch serve`
    /// starts its embedded agent).
    #[arg(long, hide = true)]
    listen_fd: Option<i32>,
    /// File holding the pre-shared key (at least 16 bytes; see `conch keygen`); `-` reads stdin.
    #[arg(long, env = "CONCH_AGENT_KEY_FILE")]
    key_file: PathBuf,
    #[command(flatten)]
    isolation: IsolationArgs,
    /// Authenticated client connections served at once; beyond, a client is told `busy`.
    #[arg(long, env = "CONCH_AGENT_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Connections still authenticating at once; beyond, the oldest is dropped.
    #[arg(long, env = "CONCH_AGENT_MAX_PENDING", default_value_t = 64)]
    max_pending: usize,
    /// Milliseconds a connection has to complete the handshake.
    #[arg(long, env = "CONCH_AGENT_HANDSHAKE_TIMEOUT_MS", default_value_t = 5000)]
    handshake_timeout_ms: u64,
    /// Commands running at once on one connection.
    #[arg(long, env = "CONCH_AGENT_MAX_CHANNELS", default_value_t = 1024)]
    max_channels: usize,
    #[command(flatten)]
    shells: ShellSessionArgs,
    /// Serve clients over plain TCP instead of TLS: commands, keystrokes and
    /// output cross the network readable and alterable. Clients must say so too.
    #[arg(long, env = "CONCH_INSECURE_PLAINTEXT", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    insecure_plaintext: bool,
    /// Accept a key that looks weak (under 32 bytes, or little entropy)
    /// instead of refusing to start: a fake agent could test guesses of it.
    #[arg(long, env = "CONCH_ALLOW_WEAK_KEY", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    allow_weak_key: bool,
    /// This agent's name, as the server's agents file declares it: claimed
    /// in the handshake and proved with the key. Needed with --connect.
    #[arg(long, env = "CONCH_AGENT_SELF_NAME", value_parser = agent_name)]
    name: Option<String>,
    /// Dial in: connect out to a server's agent listener (its
    /// --agent-listen, HOST:PORT) and keep reconnecting, instead of
    /// listening. For hosts behind NAT or a firewall.
    #[arg(
        long,
        env = "CONCH_AGENT_CONNECT",
        requires = "name",
        conflicts_with = "listen_fd"
    )]
    connect: Option<String>,
}

/// An agent name as `--name` takes it.
fn agent_name(name: &str) -> Result<String, String> {
    if crate::vocab::valid_agent_name(name) {
        Ok(name.to_owned())
    } else {
        Err("use 1 to 64 letters, digits, '.', '_' or '-'".into())
    }
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on. Loopback by default: put a TLS proxy in front to expose it.
    #[arg(long, env = "CONCH_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// HTTP connections open at once (WebSockets included); at the cap, the oldest
    /// connection that has not sent a request is closed. Kept below the open-file limit.
    #[arg(long, env = "CONCH_MAX_CONNECTIONS", default_value_t = 16384)]
    max_connections: usize,
    /// Milliseconds a client has to send a request's headers (and most idle time between requests).
    #[arg(long, env = "CONCH_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    header_timeout_ms: u64,
    /// Agent to connect to (HOST:PORT). Without it, an embedded agent runs in this process.
    #[arg(long, env = "CONCH_AGENT")]
    agent: Option<String>,
    /// A TOML file of agents to reach, one `[[agents]]` table each (`name`,
    /// `addr`, `key_file`, `labels`); instead of --agent.
    #[arg(long, env = "CONCH_AGENTS_FILE", conflicts_with = "agent")]
    agents_file: Option<PathBuf>,
    /// Listen here for agents that dial in (`conch agent --connect`), each
    /// declared without `addr` in --agents-file. Not loopback-only by
    /// nature: agents prove their name with their own key.
    #[arg(long, env = "CONCH_AGENT_LISTEN_ADDR", requires = "agents_file")]
    agent_listen: Option<SocketAddr>,
    /// Milliseconds without a word from an agent before its link is taken
    /// for lost (pings keep idle links talking) and its commands end with
    /// agent_lost.
    #[arg(long, env = "CONCH_AGENT_DEAD_AFTER_MS", default_value_t = 15_000, value_parser = clap::value_parser!(u64).range(3_000..=3_600_000))]
    agent_dead_after_ms: u64,
    /// Name shown for the agent given with --agent.
    #[arg(long, env = "CONCH_AGENT_NAME", default_value = "agent")]
    agent_name: String,
    /// The pre-shared key file of the agent given with --agent.
    #[arg(long, env = "CONCH_AGENT_KEY_FILE")]
    agent_key_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM), reloaded when the file
    /// changes. Needs --tls-key.
    #[arg(long, env = "CONCH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "CONCH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve HTTPS with a certificate made at start for the listen address
    /// (and localhost); its SHA-256 fingerprint is printed with the login URL.
    #[arg(long, env = "CONCH_TLS_SELF_SIGNED", conflicts_with = "tls_cert", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    pub tls_self_signed: bool,
    /// Reach the agent given with --agent over plain TCP instead of TLS (it
    /// must run with --insecure-plaintext too): commands, keystrokes and
    /// output cross the network readable and alterable.
    #[arg(long, env = "CONCH_AGENT_INSECURE_PLAINTEXT", requires = "agent", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    insecure_plaintext: bool,
    /// Accept an --agent-key-file that looks weak instead of refusing to
    /// start: whoever can answer on the agent's address could test guesses.
    #[arg(long, env = "CONCH_ALLOW_WEAK_KEY", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    allow_weak_key: bool,
    /// The admin token (prefer --admin-token-file: a flag shows in `ps`).
    #[arg(long, env = "CONCH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// File holding the admin token. Without either, one is generated and a login URL printed.
    #[arg(long, env = "CONCH_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// File holding a token that opens GET /metrics (and nothing else), for
    /// a Prometheus scraper; admins can read /metrics without it.
    #[arg(long, env = "CONCH_METRICS_TOKEN_FILE")]
    metrics_token_file: Option<PathBuf>,
    /// Users file (TOML): [[users]] with name, password_hash (from `conch passwd`), role.
    #[arg(long, env = "CONCH_USERS_FILE")]
    users_file: Option<PathBuf>,
    /// Further origins allowed to open consoles (comma-separated), e.g. https://conch.example.com.
    #[arg(long, env = "CONCH_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// The address users see, e.g. https://ops.example.com/conch: login URLs print it,
    /// Host and Origin are checked against it, cookies are Secure when it is HTTPS.
    #[arg(long, env = "CONCH_PUBLIC_URL")]
    public_url: Option<url::Url>,
    /// Refuse to start without an agent to talk to (`--agent` or an
    /// agents file), rather than start the embedded one: where the server
    /// runs locked down as its own user (conch-server.service), commands
    /// run by an embedded agent would run as that user too, and could read
    /// the server's secrets and state.
    #[arg(long, env = "CONCH_REQUIRE_AGENT", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    require_agent: bool,
    /// Serve everything under this path (`/conch`: pages, assets, the
    /// socket, the API), as behind a reverse proxy that forwards a
    /// sub-path. Default: the path of --public-url, else the root.
    #[arg(long, env = "CONCH_BASE_PATH")]
    base_path: Option<String>,
    /// A proxy (address or CIDR) whose X-Forwarded-For / Forwarded headers are believed;
    /// repeatable, or comma-separated.
    #[arg(long, env = "CONCH_TRUSTED_PROXY", value_delimiter = ',')]
    trusted_proxy: Vec<String>,
    /// Session lifetime in seconds.
    #[arg(long, env = "CONCH_SESSION_TTL", default_value_t = 12 * 3600)]
    session_ttl: u64,
    /// Login sessions one user may hold; a new login ends that user's oldest.
    #[arg(long, env = "CONCH_MAX_SESSIONS_PER_USER", default_value_t = 32)]
    max_sessions_per_user: usize,
    /// Login sessions of all users together; beyond, logins are refused (503).
    #[arg(long, env = "CONCH_MAX_SESSIONS", default_value_t = 100_000)]
    max_sessions: usize,
    /// Directory for state (API tokens, and the store `conch.db` when no
    /// --database-url is given). Without it, both live in memory only.
    #[arg(long, env = "CONCH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The store shared by several servers: `postgres://USER:PASSWORD@HOST/DB`
    /// (default: SQLite in --data-dir). Prefer the environment: a flag shows in `ps`.
    #[arg(long, env = "CONCH_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Record who ran what (`on`); `off` records nothing (to measure what
    /// auditing costs; not for a server that must answer for what was run).
    #[arg(long, env = "CONCH_AUDIT", default_value = "on", value_parser = ["on", "off"])]
    audit: String,
    /// How long audit records are kept (`90d`, `12h`; `0`: for ever).
    #[arg(long, env = "CONCH_AUDIT_RETENTION", default_value = "90d", value_parser = retention)]
    audit_retention: Retention,
    /// The largest session recording, in bytes of asciicast before
    /// compression; output past it is not recorded (a marker says so).
    #[arg(long, env = "CONCH_RECORDING_MAX_BYTES", default_value_t = 64 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(4096..))]
    recording_max_bytes: u64,
    /// Also record what users type into consoles (off: typed passwords
    /// would be kept).
    #[arg(long, env = "CONCH_RECORD_INPUT")]
    record_input: bool,
    /// The most bytes (compressed) all session recordings together may take
    /// in the store; the oldest finished ones are removed past it. Without a
    /// --data-dir or --database-url (a store in memory) at most 256 MiB.
    #[arg(long, env = "CONCH_RECORDING_MAX_TOTAL_BYTES", default_value_t = 8 * 1024 * 1024 * 1024)]
    recording_max_total_bytes: u64,
    /// How long session recordings are kept (`90d`, `12h`; `0`: for ever).
    #[arg(long, env = "CONCH_RECORDING_RETENTION", default_value = "90d", value_parser = retention)]
    recording_retention: Retention,
    /// This server's name in the audit log (default: the host name).
    #[arg(long, env = "CONCH_SERVER_NAME")]
    server_name: Option<String>,
    /// Largest REST request body, in bytes.
    #[arg(long, env = "CONCH_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
    /// Cap on a REST command's timeout_ms.
    #[arg(long, env = "CONCH_MAX_TIMEOUT_MS", default_value_t = 3_600_000)]
    max_timeout_ms: u64,
    /// Cap on a buffered REST answer's max_output_bytes (per stream; streamed answers have none).
    #[arg(long, env = "CONCH_MAX_OUTPUT_BYTES", default_value_t = 64 * 1024 * 1024)]
    max_output_bytes: usize,
    /// Memory all buffered REST answers together may hold, in MiB; beyond, 503.
    #[arg(long, env = "CONCH_BUFFERED_OUTPUT_BUDGET_MIB", default_value_t = 512)]
    buffered_output_budget_mib: usize,
    /// REST commands and file transfers running at once; more get 429.
    #[arg(long, env = "CONCH_MAX_CONCURRENT_EXECS", default_value_t = 256)]
    max_concurrent_execs: usize,
    /// Seconds a file transfer may move no byte (a client that neither sends
    /// nor reads) before it is ended and its slot freed.
    #[arg(long, env = "CONCH_TRANSFER_IDLE_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    transfer_idle_secs: u64,
    /// Commands one user may run at once, console and API together.
    #[arg(long, env = "CONCH_MAX_COMMANDS_PER_USER", default_value_t = 64)]
    max_commands_per_user: usize,
    /// Channels of each agent kept for users who run nothing on it yet.
    #[arg(long, env = "CONCH_COMMAND_RESERVE", default_value_t = 32)]
    command_reserve: usize,
    /// Shell sessions (shells that survive their page) one user may hold
    /// on one agent, attached or not.
    #[arg(long, env = "CONCH_MAX_SHELLS_PER_USER", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    max_shells_per_user: u32,
    /// REST requests per caller per minute; more get 429.
    #[arg(long, env = "CONCH_API_RATE_PER_MINUTE", default_value_t = 1200)]
    api_rate_per_minute: u32,
    /// Shell sessions of the embedded agent (ignored with --agent).
    #[command(flatten)]
    shells: ShellSessionArgs,
    /// Command isolation of the embedded agent (ignored with --agent).
    #[command(flatten)]
    isolation: IsolationArgs,
}

/// How a client command reaches a conch server.
#[derive(Args)]
pub struct ServerArgs {
    /// The conch server's base URL.
    #[arg(long, env = "CONCH_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// File holding the API token.
    #[arg(long, env = "CONCH_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The API token itself (prefer --token-file: a flag shows in `ps`).
    #[arg(long, env = "CONCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM file of certificates to trust for an https:// server, besides the
    /// system's (for a server with --tls-self-signed: its certificate).
    #[arg(long, env = "CONCH_CA_FILE")]
    ca_file: Option<PathBuf>,
}

impl ServerArgs {
    fn into_server(self) -> anyhow::Result<crate::rest_client::Server> {
        let token = match (self.token, &self.token_file) {
            (_, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read token file {}", path.display()))?
                .trim()
                .to_owned(),
            (Some(t), None) => t,
            (None, None) => anyhow::bail!("give --token-file or CONCH_TOKEN"),
        };
        Ok(crate::rest_client::Server {
            url: self.server,
            token,
            ca_file: self.ca_file,
        })
    }
}

#[derive(Args)]
pub struct AgentsArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Only the agents this selector matches (`web-*`, `role=web,env!=staging`).
    selector: Option<String>,
}

#[derive(Args)]
pub struct ExecArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Agent to run on; default the server's only one.
    #[arg(long, env = "CONCH_EXEC_AGENT", conflicts_with = "on")]
    agent: Option<String>,
    /// Run on every agent this selector matches (`web-*`, `role=web,env!=staging`):
    /// each output line is prefixed with its host's name, a summary goes to
    /// stderr, and the exit status is 0 only if every host exited 0 (1: some
    /// host failed; 2: some host was unreachable).
    #[arg(long)]
    on: Option<String>,
    /// With --on: at most this many hosts at once (default: all).
    #[arg(long, requires = "on", value_parser = clap::value_parser!(u64).range(1..=MAX_API_INTEGER))]
    concurrency: Option<u64>,
    /// With --on: print output lines without the host-name prefix.
    #[arg(long, requires = "on")]
    no_prefix: bool,
    /// With --on: print the server's NDJSON lines as they come.
    #[arg(long, requires = "on")]
    json: bool,
    /// Kill the command after this many milliseconds (server default 30 s;
    /// at most 2^53 - 1, as the API takes).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_API_INTEGER))]
    timeout_ms: Option<u64>,
    /// Working directory on the agent's host.
    #[arg(long)]
    cwd: Option<String>,
    /// Encoding of the command's output (a WHATWG label such as gbk).
    #[arg(long)]
    encoding: Option<String>,
    /// Send this process's standard input (read to its end, at most 1 MiB) to the command.
    #[arg(long)]
    stdin: bool,
    /// Keep at most this many bytes of each output stream; beyond, the rest is
    /// dropped, one line says so on stderr, and conch exits 125. Default: all.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=MAX_API_INTEGER))]
    max_output_bytes: Option<u64>,
    /// The command and its arguments, joined by spaces and run by the remote shell (as ssh does).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct CpArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Refuse to replace an existing remote file (by default it is replaced, as scp does).
    #[arg(short = 'n', long)]
    no_clobber: bool,
    /// Permission bits of an uploaded file, in octal (default: those of the file
    /// replaced, or 0666 less the agent's umask).
    #[arg(long, value_parser = parse_mode)]
    mode: Option<u32>,
    /// No progress bar (there is none when stderr is not a terminal).
    #[arg(short, long)]
    quiet: bool,
    /// What to copy: a local path, `-` (standard input), or AGENT:PATH.
    #[arg(value_parser = clap::value_parser!(std::ffi::OsString))]
    from: std::ffi::OsString,
    /// Where to: a local path or directory, `-` (standard output), or AGENT:PATH
    /// (a remote directory keeps the file's name).
    #[arg(value_parser = clap::value_parser!(std::ffi::OsString))]
    to: std::ffi::OsString,
}

fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{text:?} is not octal permission bits (0644)"))
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: Option<AuditCommand>,
    #[command(flatten)]
    server: ServerArgs,
    /// Only this user's records (admins; others see only their own).
    #[arg(long)]
    user: Option<String>,
    /// Only records about this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Only this kind (login, login_failed, logout, token_create, token_revoke,
    /// command_start, command_end, session_attach, session_detach, session_end,
    /// file_put, file_get, denied, user_change, session_change).
    #[arg(long)]
    kind: Option<String>,
    /// From this time: milliseconds since the epoch, or a time ago (`30m`, `2h`, `7d`).
    #[arg(long, value_parser = time_point)]
    since: Option<i64>,
    /// Before this time, as --since.
    #[arg(long, value_parser = time_point)]
    until: Option<i64>,
    /// Text anywhere in a record's details (a command line, a path).
    #[arg(long)]
    text: Option<String>,
    /// Records to print at most.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    limit: u32,
    /// Print each record as a JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct UserArgs {
    #[command(subcommand)]
    command: UserCommand,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// List the users: the users file's and the store's.
    List {
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
    },
    /// Add a user to the store; its password comes from standard input.
    Add {
        name: String,
        /// viewer, operator or admin.
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        /// A selector of the only agents the user may use (`env=staging`).
        #[arg(long)]
        agents: Option<String>,
    },
    /// Give a store user a new password (from standard input); its sessions end.
    Passwd { name: String },
    /// Delete a store user; its sessions end.
    Del { name: String },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the audit log's hash chain in the store (where the store is:
    /// the server's --data-dir, or its --database-url). Exits 0 when intact,
    /// 1 when a record was changed or removed, 255 when the store cannot be read.
    Verify {
        /// The server's data directory (its SQLite store).
        #[arg(long, env = "CONCH_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The server's PostgreSQL store.
        #[arg(long, env = "CONCH_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
    },
}

/// Milliseconds since the epoch, or now less a time (`30m`, `2h`, `7d`).
fn time_point(text: &str) -> Result<i64, String> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let ago = match text.strip_suffix('d') {
        Some(days) => days
            .parse::<i64>()
            .map_err(|_| format!("{text:?} is not a time"))?
            .saturating_mul(86_400_000),
        None => duration(text)?.as_millis() as i64,
    };
    Ok(crate::audit::now_ms() - ago)
}

#[derive(Args)]
pub struct HealthArgs {
    /// Check that this agent address (HOST:PORT) accepts TCP connections, instead of the server.
    #[arg(long)]
    tcp: Option<String>,
    /// The server's listen address, probed at /healthz (0.0.0.0 means this host).
    #[arg(long, env = "CONCH_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Probe over HTTPS (set when the server's environment gives
    /// CONCH_TLS_CERT or CONCH_TLS_SELF_SIGNED, as in a container).
    #[arg(long)]
    https: bool,
    /// The server's base path (as its --base-path, or the path of its
    /// --public-url): /healthz is probed under it.
    #[arg(long, env = "CONCH_BASE_PATH")]
    base_path: Option<String>,
    #[arg(long, env = "CONCH_PUBLIC_URL", hide = true)]
    public_url: Option<url::Url>,
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a named API token and print it (shown this once).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: Role,
        /// Limit the token to the agents this selector matches (`env=staging`).
        #[arg(long)]
        agents: Option<crate::selector::Selector>,
    },
    /// Revoke a named API token.
    Revoke {
        #[arg(long)]
        name: String,
    },
    /// List token names and roles.
    List,
}

#[derive(Args)]
pub struct TokenArgs {
    /// The server's data directory (as given to `conch serve`): its store.
    #[arg(long, env = "CONCH_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// The server's PostgreSQL store (as given to `conch serve`).
    #[arg(
        long,
        env = "CONCH_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    database_url: Option<String>,
    #[command(subcommand)]
    command: TokenCommand,
}

/// The base path from `--base-path` and `--public-url`: "" for the root,
/// else `/a/b` (no trailing slash), of letters, digits and `-._~/` only,
/// so that it can go into pages, cookies and redirects as it is.
fn base_path(given: Option<&str>, public_url: Option<&url::Url>) -> anyhow::Result<String> {
    let normal = |p: &str| p.trim_end_matches('/').to_owned();
    let from_url = public_url.map(|u| normal(u.path()));
    let base = match (given.map(normal), from_url) {
        (Some(b), Some(u)) if !u.is_empty() && b != u => anyhow::bail!(
            "--base-path {b:?} differs from the path of --public-url ({u:?}): give one, or the same"
        ),
        (Some(b), _) => b,
        (None, Some(u)) => u,
        (None, None) => String::new(),
    };
    if base.is_empty() {
        return Ok(base);
    }
    anyhow::ensure!(
        base.starts_with('/')
            && !base.contains("//")
            && base
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~/".contains(&b))
            && !base.split('/').any(|seg| seg == "." || seg == ".."),
        "--base-path must look like /conch (letters, digits, - . _ ~ and /), not {base:?}"
    );
    Ok(base)
}

/// A duration as a number and a unit (`90s`, `30m`, `2h`, `500ms`); a
/// bare number is seconds.
/// How long audit records are kept; `None`: for ever.
#[derive(Debug, Clone, Copy)]
pub struct Retention(Option<std::time::Duration>);

fn retention(text: &str) -> Result<Retention, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Retention(None));
    }
    let (number, hours_each) = if let Some(n) = text.strip_suffix('d') {
        (n, 24)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 1)
    } else {
        return Err(format!(
            "{text:?}: give days (90d) or hours (12h), or 0 to keep all"
        ));
    };
    let n: u64 = number
        .parse()
        .ok()
        .filter(|n| *n > 0 && *n <= 36_500)
        .ok_or_else(|| format!("{text:?} is not a number of days or hours"))?;
    Ok(Retention(Some(std::time::Duration::from_secs(
        n * hours_each * 3600,
    ))))
}

fn duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 90s, 30m or 2h"))?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("{text:?}: the unit must be ms, s, m or h")),
    };
    ms.filter(|ms| *ms <= 30 * 24 * 3_600_000)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is longer than 30 days"))
}

/// `--cmd-start-timeout`: a duration of at least 100 ms (a start takes
/// about 1 ms; a shorter limit would kill commands on a busy host).
fn start_timeout(text: &str) -> Result<std::time::Duration, String> {
    let limit = duration(text)?;
    if limit < std::time::Duration::from_millis(100) {
        return Err(format!("{text:?} is shorter than 100ms"));
    }
    Ok(limit)
}

/// The largest count the REST API takes (2^53 - 1).
const MAX_API_INTEGER: u64 = (1 << 53) - 1;

/// The shortest admin token accepted.
const MIN_TOKEN_LEN: usize = 16;

impl AgentArgs {
    /// The agent's typed configuration (an ephemeral TLS certificate made
    /// here unless `--insecure-plaintext`).
    pub fn into_config(&self) -> anyhow::Result<AgentConfig> {
        let args = self;
        let policy = args.isolation.policy()?;
        Ok(AgentConfig {
            listen: args.listen,
            key: Key::load_with(&args.key_file, args.allow_weak_key)?,
            max_connections: args.max_connections.max(1),
            max_pending: args.max_pending.max(1),
            handshake_timeout: std::time::Duration::from_millis(args.handshake_timeout_ms.max(100)),
            limits: Limits {
                max_channels: args.max_channels.max(1),
                sessions: args.shells.max_shell_sessions > 0,
            },
            policy: std::sync::Arc::new(policy),
            tls: if args.insecure_plaintext {
                tracing::warn!(
                    listen = %args.listen,
                    "--insecure-plaintext: connections are not encrypted or protected from \
                     tampering; anyone on the path reads commands, keystrokes and output"
                );
                None
            } else {
                Some(crate::transport::tls::Acceptor::ephemeral().context("cannot set up TLS")?)
            },
            name: args.name.clone(),
            sessions: args.shells.limits(),
        })
    }
}

impl ServeArgs {
    /// The server's typed configuration.
    pub fn into_config(self, json_logs: bool) -> anyhow::Result<ServeConfig> {
        serve_config(self, json_logs)
    }
}

fn serve_config(args: ServeArgs, json_logs: bool) -> anyhow::Result<ServeConfig> {
    let agent = match args.agent {
        Some(addr) => {
            let path = args
                .agent_key_file
                .context("--agent needs --agent-key-file (or CONCH_AGENT_KEY_FILE)")?;
            let security = if args.insecure_plaintext {
                tracing::warn!(
                    agent = %addr,
                    "--insecure-plaintext: the agent link is not encrypted or protected \
                     from tampering; anyone on the path reads commands, keystrokes and output"
                );
                crate::link::Security::Plaintext
            } else {
                crate::link::Security::Tls
            };
            vec![AgentSpec {
                name: args.agent_name,
                addr: Some(addr),
                key: Key::load_with(&path, args.allow_weak_key)?,
                security,
                labels: Default::default(),
            }]
        }
        None => match &args.agents_file {
            Some(path) => crate::server::agents_file::load(path, args.allow_weak_key)?,
            None => Vec::new(),
        },
    };
    let token = match (args.admin_token, args.admin_token_file) {
        (Some(t), _) => Some(t),
        (None, Some(path)) => {
            crate::keyfile::warn_if_exposed(&path, "admin token file");
            Some(
                std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read admin token file {}", path.display()))?
                    .trim()
                    .to_owned(),
            )
        }
        (None, None) => None,
    };
    if let Some(t) = &token {
        anyhow::ensure!(
            t.len() >= MIN_TOKEN_LEN,
            "the admin token must be at least {MIN_TOKEN_LEN} characters"
        );
        if let Some(why) = crate::keyfile::weakness(t.as_bytes()) {
            tracing::warn!("the admin token is weak ({why}); make one with `conch keygen`");
        }
    }
    if let Some(dir) = &args.data_dir {
        crate::server::tokens::create_private_dir(dir)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    }
    let users = match &args.users_file {
        Some(path) => load_users(path)?,
        None => Vec::new(),
    };
    let trusted_proxies = args
        .trusted_proxy
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<ipnet::IpNet>()
                .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .with_context(|| format!("--trusted-proxy {p:?} is not an address or CIDR"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(u) = &args.public_url {
        anyhow::ensure!(
            matches!(u.scheme(), "http" | "https") && u.host_str().is_some(),
            "--public-url must be an absolute http:// or https:// URL, not {u}"
        );
    }
    let base_path = base_path(args.base_path.as_deref(), args.public_url.as_ref())?;
    anyhow::ensure!(
        !(args.require_agent && agent.is_empty()),
        "--require-agent (CONCH_REQUIRE_AGENT): give --agent (CONCH_AGENT) or an --agents-file \
         (CONCH_AGENTS_FILE) that lists agents; this server will not start an embedded agent, whose commands \
         would run as the server's own user"
    );
    if args.public_url.is_none() && !args.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %args.listen,
            "listening beyond loopback without --public-url: any Host header is accepted; \
             set --public-url so that DNS-rebinding pages are refused"
        );
    }
    let tls = match (args.tls_cert, args.tls_key, args.tls_self_signed) {
        (Some(cert), Some(key), _) => Some(crate::server::tls::WebTlsSource::Files { cert, key }),
        (_, _, true) => {
            let mut names = vec!["localhost".to_owned(), args.listen.ip().to_string()];
            if let Some(host) = args.public_url.as_ref().and_then(|u| u.host_str()) {
                names.push(host.to_owned());
            }
            names.dedup();
            Some(crate::server::tls::WebTlsSource::SelfSigned { names })
        }
        _ => None,
    };
    let metrics_token = match &args.metrics_token_file {
        Some(path) => {
            crate::keyfile::warn_if_exposed(path, "metrics token file");
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the metrics token file {}", path.display()))?
                .trim()
                .to_owned();
            anyhow::ensure!(
                token.len() >= MIN_TOKEN_LEN,
                "the metrics token must be at least {MIN_TOKEN_LEN} characters"
            );
            Some(crate::server::auth::Secret::new(token))
        }
        None => None,
    };
    let fleet = crate::server::Fleet {
        agents_file: args.agents_file.clone(),
        allow_weak_keys: args.allow_weak_key,
        agent_listen: args.agent_listen,
        links: crate::server::agents::LinkOptions {
            dead_after: std::time::Duration::from_millis(args.agent_dead_after_ms),
        },
    };
    Ok(ServeConfig {
        metrics_token,
        fleet,
        tls,
        listen: args.listen,
        public_url: args.public_url,
        base_path,
        trusted_proxies,
        http: crate::server::http::HttpLimits {
            max_connections: args.max_connections.max(1),
            header_timeout: std::time::Duration::from_millis(args.header_timeout_ms.max(100)),
        },
        agents: agent,
        embedded_agent_args: args
            .isolation
            .to_args()
            .into_iter()
            .chain(args.shells.to_args())
            .collect(),
        admin_token: token.map(Secret::new),
        users,
        allowed_origins: args
            .allowed_origins
            .into_iter()
            .filter(|o| !o.is_empty())
            .collect(),
        session_ttl: std::time::Duration::from_secs(args.session_ttl.max(60)),
        session_limits: crate::server::auth::SessionLimits {
            per_user: args.max_sessions_per_user.max(1),
            total: args.max_sessions.max(1),
        },
        store_url: args
            .database_url
            .clone()
            .unwrap_or_else(|| crate::store::sqlite_url(args.data_dir.as_deref())),
        audit_retention: args.audit_retention.0,
        audit: args.audit == "on",
        recordings: crate::recording::Settings {
            max_bytes: args.recording_max_bytes,
            record_input: args.record_input,
            retention: args.recording_retention.0,
            // Filled in with the server's name below.
            server: String::new(),
            max_total: if args.data_dir.is_none() && args.database_url.is_none() {
                args.recording_max_total_bytes.min(256 * 1024 * 1024)
            } else {
                args.recording_max_total_bytes
            },
        },
        server_name: args.server_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "conch".into())
        }),
        data_dir: args.data_dir,
        api_limits: ApiLimits {
            max_body_bytes: args.max_body_bytes,
            max_timeout_ms: args.max_timeout_ms.max(1),
            max_output_bytes: args.max_output_bytes,
            max_concurrent: args.max_concurrent_execs.max(1),
            rate_per_minute: args.api_rate_per_minute.max(1),
            buffered_budget: args.buffered_output_budget_mib.saturating_mul(1024 * 1024),
            transfer_idle: std::time::Duration::from_secs(args.transfer_idle_secs),
        },
        quota: crate::server::quota::QuotaLimits {
            per_user: args.max_commands_per_user.max(1),
            reserve: args.command_reserve,
            shells_per_user: args.max_shells_per_user,
        },
        json_logs,
    })
}

/// Runs one subcommand to its end; its exit status.
pub async fn run(command: Command, json_logs: bool) -> anyhow::Result<ExitCode> {
    // One TLS implementation for every link (agent, web, REST client).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match command {
        Command::Serve(args) => {
            // The server's memory and environment hold the admin token.
            make_undumpable();
            let config = serve_config(*args, json_logs)?;
            let shutdown = crate::shutdown::on_signals();
            let work = crate::server::run(config, shutdown.clone());
            if let Some(r) =
                crate::shutdown::within_grace(work, &shutdown, crate::shutdown::GRACE).await
            {
                r?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cp(args) => cp_command(args).await,
        Command::Audit(args) => audit_command(args).await,
        Command::User(args) => user_command(args).await,
        Command::Agents(args) => match agents_command(args).await {
            Ok(code) => Ok(code),
            Err(e) => {
                eprintln!("conch: {e:#}");
                Ok(ExitCode::from(crate::rest_client::EXIT_CONCH_FAILED))
            }
        },
        Command::Exec(args) => match exec_command(args).await {
            Ok(code) => Ok(code),
            Err(e) => {
                // Failures of conch itself exit 255, as ssh does.
                eprintln!("conch: {e:#}");
                Ok(ExitCode::from(crate::rest_client::EXIT_CONCH_FAILED))
            }
        },
        Command::Token(args) => {
            let url = match (&args.database_url, &args.data_dir) {
                (Some(url), _) => url.clone(),
                (None, Some(dir)) => {
                    crate::server::tokens::create_private_dir(dir).with_context(|| {
                        format!("cannot create the data directory {}", dir.display())
                    })?;
                    crate::store::sqlite_url(Some(dir))
                }
                (None, None) => anyhow::bail!(
                    "give --data-dir (or CONCH_DATA_DIR) or --database-url, as for `conch serve`"
                ),
            };
            let store = crate::store::Store::open(&url).await?;
            let tokens = TokenStore::open(store, args.data_dir.as_deref()).await?;
            match args.command {
                TokenCommand::Create { name, role, agents } => println!(
                    "{}",
                    tokens.create(&name, role, agents.as_ref()).await?.expose()
                ),
                TokenCommand::Revoke { name } => {
                    tokens.revoke(&name).await?;
                    println!("revoked {name}");
                }
                TokenCommand::List => print!("{}", tokens.listing().await?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck(args) => {
            let target = match args.tcp {
                Some(addr) => crate::rest_client::Probe::AgentPort(addr),
                None => crate::rest_client::Probe::Server {
                    https: args.https
                        || std::env::var_os("CONCH_TLS_CERT").is_some()
                        || std::env::var("CONCH_TLS_SELF_SIGNED").is_ok_and(|v| {
                            !matches!(v.as_str(), "" | "0" | "false" | "no" | "off")
                        }),
                    listen: args.listen,
                    base_path: base_path(args.base_path.as_deref(), args.public_url.as_ref())?,
                },
            };
            crate::rest_client::healthcheck(target).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Passwd => {
            println!(
                "{}",
                crate::server::auth::hash_password_from(std::io::stdin().lock())?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { path } => {
            Key::generate().save_new(&path)?;
            println!("wrote a new key to {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => {
            // Commands run by this process must not read its memory.
            make_undumpable();
            let config = args.into_config()?;
            let shutdown = crate::shutdown::on_signals();
            if let Some(server) = args.connect.clone() {
                crate::agent::dial::run(config, server, shutdown).await;
                return Ok(ExitCode::SUCCESS);
            }
            match args.listen_fd {
                Some(fd) => {
                    // SAFETY: the parent handed this descriptor down open,
                    // listening, and for this process alone to own.
                    let listener = unsafe { crate::agent::inherited_listener(fd) }
                        .context("the inherited listening socket (--listen-fd) is unusable")?;
                    crate::agent::serve(listener, config, shutdown).await;
                }
                None => crate::agent::run(config, shutdown)
                    .await
                    .with_context(|| format!("cannot listen on {}", args.listen))?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `conch exec`: its exit status is the remote command's.
async fn exec_command(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let server = args.server.into_server()?;
    let stdin = if args.stdin {
        Some(crate::rest_client::read_stdin()?)
    } else {
        None
    };
    let config = ExecConfig {
        server,
        command: args.command,
        agent: args.agent,
        fanout: args.on.map(|target| crate::rest_client::FanoutConfig {
            target,
            concurrency: args.concurrency,
            prefix: !args.no_prefix,
            json: args.json,
        }),
        timeout_ms: args.timeout_ms,
        cwd: args.cwd,
        encoding: args.encoding,
        stdin,
        max_output_bytes: args.max_output_bytes,
    };
    match crate::rest_client::run(config).await {
        Ok(code) => Ok(ExitCode::from(code)),
        Err(e) => {
            eprintln!("conch: {e}");
            Ok(ExitCode::from(crate::rest_client::EXIT_CONCH_FAILED))
        }
    }
}

/// `conch cp`: one file up or down.
async fn cp_command(args: CpArgs) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let server = match args.server.into_server() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("conch: {e:#}");
            return Ok(ExitCode::from(crate::rest_client::EXIT_CONCH_FAILED));
        }
    };
    let to = crate::rest_client::files::Place::parse(&args.to);
    let config = crate::rest_client::files::CopyConfig {
        server,
        from: crate::rest_client::files::Place::parse(&args.from),
        // A progress bar would mix with a download to a terminal's stdout.
        progress: !args.quiet
            && std::io::stderr().is_terminal()
            && to != crate::rest_client::files::Place::Stdio,
        to,
        no_clobber: args.no_clobber,
        mode: args.mode,
    };
    match crate::rest_client::files::copy(config).await {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("conch: {e}");
            Ok(ExitCode::from(e.exit_status()))
        }
    }
}

/// `conch audit`: the log over REST, or its chain checked in the store.
async fn audit_command(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let failed = |e: &dyn std::fmt::Display| {
        eprintln!("conch: {e}");
        Ok(ExitCode::from(crate::rest_client::EXIT_CONCH_FAILED))
    };
    if let Some(AuditCommand::Verify {
        data_dir,
        database_url,
    }) = args.command
    {
        let url = match (database_url, data_dir) {
            (Some(url), _) => url,
            (None, Some(dir)) => crate::store::sqlite_url(Some(&dir)),
            (None, None) => return failed(&"give --data-dir or --database-url (as the server's)"),
        };
        let store = match crate::store::Store::open_existing(&url).await {
            Ok(s) => s,
            Err(e) => return failed(&e),
        };
        return match crate::audit::verify(&store).await {
            Ok(crate::audit::Verdict::Intact {
                records,
                first,
                last,
            }) => {
                println!("the audit log is intact: {records} records ({first} to {last})");
                Ok(ExitCode::SUCCESS)
            }
            Ok(crate::audit::Verdict::Broken { seq, reason }) => {
                println!("the audit log is BROKEN at record {seq}: {reason}");
                Ok(ExitCode::from(1))
            }
            Err(e) => failed(&e),
        };
    }
    let server = match args.server.into_server() {
        Ok(s) => s,
        Err(e) => return failed(&format!("{e:#}")),
    };
    let query = crate::rest_client::audit::AuditQuery {
        user: args.user,
        agent: args.agent,
        kind: args.kind,
        since_ms: args.since,
        until_ms: args.until,
        text: args.text,
        count: args.limit,
        json: args.json,
    };
    match crate::rest_client::audit::print(&server, &query).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => failed(&e),
    }
}

/// `conch user`: exits 0 when done, 1 when the server refused (exists,
/// not found, in the users file), 255 when conch itself failed.
async fn user_command(args: UserArgs) -> anyhow::Result<ExitCode> {
    use crate::rest_client::users::UserAction;
    let server = match args.server.into_server() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("conch: {e:#}");
            return Ok(ExitCode::from(crate::rest_client::EXIT_CONCH_FAILED));
        }
    };
    let action = match args.command {
        UserCommand::List { json } => UserAction::List { json },
        UserCommand::Add { name, role, agents } => UserAction::Add { name, role, agents },
        UserCommand::Passwd { name } => UserAction::Passwd { name },
        UserCommand::Del { name } => UserAction::Del { name },
    };
    match crate::rest_client::users::run(&server, action).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("conch: {e}");
            let refused = matches!(e, crate::rest_client::ClientError::Refused { status, .. } if status < 500);
            Ok(ExitCode::from(if refused {
                1
            } else {
                crate::rest_client::EXIT_CONCH_FAILED
            }))
        }
    }
}

/// `conch agents`: the server's agents as a table.
async fn agents_command(args: AgentsArgs) -> anyhow::Result<ExitCode> {
    let server = args.server.into_server()?;
    match crate::rest_client::agents(&server, args.selector.as_deref(), args.json).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("conch: {e}");
            Ok(ExitCode::from(crate::rest_client::EXIT_CONCH_FAILED))
        }
    }
}
