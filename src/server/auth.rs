//! Who may do what: users, roles, the admin token, sessions, and the rate
//! limit on failed logins.
//!
//! Secrets are compared in constant time, stored hashed where they are
//! stored at all, and never logged: [`Secret`]'s `Debug` hides its value.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::throttle::LoginThrottle;

/// What a user may do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, utoipa::ToSchema,
)]
#[cfg_attr(test, derive(ts_rs::TS))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May log in and see agents, never run anything.
    Viewer,
    /// Runs commands.
    Operator,
    /// Runs commands and manages tokens.
    Admin,
}

impl Role {
    pub(crate) fn can_run(self) -> bool {
        matches!(self, Role::Operator | Role::Admin)
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The role [`Role::as_str`] names (as the store keeps it).
    pub(crate) fn from_name(name: &str) -> Option<Role> {
        [Role::Viewer, Role::Operator, Role::Admin]
            .into_iter()
            .find(|r| r.as_str() == name)
    }
}

/// Someone authenticated: a user, the admin token, or an API token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Principal {
    pub(crate) name: String,
    pub(crate) role: Role,
    /// A selector of the only agents this principal may use (from the
    /// users file, or given to its token); `None`: every agent.
    pub(crate) agents: Option<String>,
}

/// A secret string whose `Debug` output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// A fresh random secret: 32 random bytes as 64 hex characters.
    pub(crate) fn generate() -> Secret {
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes);
        Secret(hex::encode(bytes))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison (by comparing SHA-256 digests, so neither
    /// the content nor the length leaks through timing).
    pub(crate) fn matches(&self, given: &str) -> bool {
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(given.as_bytes());
        subtle_eq(&a, &b)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// One entry of the users file.
#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub(crate) name: String,
    /// An argon2 PHC string, as `conch passwd` prints it.
    pub(crate) password_hash: String,
    pub(crate) role: Role,
    /// A selector (`env=staging`): the user may use only the agents it
    /// matches, in the console, the API and the CLI alike.
    #[serde(default)]
    pub(crate) agents: Option<String>,
}

#[derive(Debug, Deserialize)]
struct UsersFile {
    #[serde(default)]
    users: Vec<User>,
}

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("cannot read users file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("users file {path} is not valid: {message}")]
    Invalid { path: String, message: String },
}

/// Loads a users file (TOML, `[[users]]` tables of name, password_hash, role).
pub fn load_users(path: &Path) -> Result<Vec<User>, UsersError> {
    let text = std::fs::read_to_string(path).map_err(|source| UsersError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let invalid = |message: String| UsersError::Invalid {
        path: path.display().to_string(),
        message,
    };
    let file: UsersFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    for user in &file.users {
        PasswordHash::new(&user.password_hash).map_err(|e| {
            invalid(format!(
                "user {:?}: password_hash is not an argon2 PHC string: {e}",
                user.name
            ))
        })?;
        if let Some(agents) = &user.agents {
            crate::selector::Selector::parse(agents)
                .map_err(|e| invalid(format!("user {:?}: agents: {e}", user.name)))?;
        }
    }
    Ok(file.users)
}

/// An argon2id hash of `password`, for the users file.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// `conch passwd`: the hash of the password on the first line of `input`
/// (its line ending removed), for the users file.
pub fn hash_password_from(mut input: impl std::io::BufRead) -> anyhow::Result<String> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(|e| anyhow::anyhow!("cannot read the password from stdin: {e}"))?;
    let password = line.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(
        !password.is_empty(),
        "empty password (give it on standard input)"
    );
    hash_password(password).map_err(|e| anyhow::anyhow!("cannot hash: {e}"))
}

fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// How many sessions may live at once, per user and in all.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// A user's sessions at most; a new login ends that user's oldest one
    /// (never anybody else's).
    pub per_user: usize,
    /// Sessions of all users at most; beyond, new logins are refused
    /// (existing sessions are never evicted for a stranger's login).
    pub total: usize,
}

struct SessionEntry {
    principal: Principal,
    created: Instant,
    expires: Instant,
    /// When it was last found in the store (or put there).
    checked: Instant,
    /// Cancelled when the session ends (logout, eviction), so that open
    /// consoles close at once instead of at their next message.
    ended: CancellationToken,
}

/// A live session, as a console needs it: who, until when, and a token
/// that fires when it is ended early.
#[derive(Debug, Clone)]
pub(crate) struct SessionHandle {
    pub(crate) principal: Principal,
    pub(crate) expires: Instant,
    pub(crate) ended: CancellationToken,
}

/// Everything about authentication the server keeps.
pub(crate) struct Auth {
    admin_token: Secret,
    users: Vec<User>,
    session_ttl: Duration,
    session_limits: SessionLimits,
    /// Sessions by the SHA-256 of their cookie value: a leaked memory dump
    /// does not hand out live cookies.
    sessions: Mutex<HashMap<[u8; 32], SessionEntry>>,
    /// Whether the admin token has the entropy of a generated one.
    admin_token_strong: bool,
    throttle: LoginThrottle,
    /// Signs trusted-device cookies; kept in the data directory, so that a
    /// restart does not make every browser a stranger (fresh without one).
    device_key: [u8; 32],
}

/// What a login presents.
#[derive(Debug)]
pub(crate) enum Credential {
    Password {
        username: String,
        password: String,
    },
    /// The admin token, typed into the form or given as `?token=`.
    Token(String),
}

/// Constant-time equality of two byte strings (of any lengths).
pub(crate) fn subtle_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Why a login was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LoginError {
    Invalid,
    RateLimited { retry_after: Duration },
}

/// Why a session could not be created.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("the server holds its maximum of {0} sessions; try again later")]
    Full(usize),
}

fn session_key(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

/// The session's name in the store: the hex SHA-256 of its cookie.
pub(crate) fn stored_key(cookie: &str) -> String {
    hex::encode(session_key(cookie))
}

impl Auth {
    pub(crate) fn new(
        admin_token: Secret,
        users: Vec<User>,
        session_ttl: Duration,
        session_limits: SessionLimits,
        device_key: [u8; 32],
    ) -> Auth {
        Auth {
            users,
            session_ttl,
            session_limits,
            admin_token_strong: crate::keyfile::weakness(admin_token.expose().as_bytes()).is_none(),
            admin_token,
            sessions: Mutex::default(),
            throttle: LoginThrottle::default(),
            device_key,
        }
    }

    /// Whether any user may log in with a password.
    /// Whether `name` is a user of the users file.
    pub(crate) fn knows(&self, name: &str) -> bool {
        self.users.iter().any(|u| u.name == name)
    }

    /// The users of the users file.
    pub(crate) fn file_users(&self) -> impl Iterator<Item = &User> {
        self.users.iter()
    }

    pub(crate) fn has_users(&self) -> bool {
        !self.users.is_empty()
    }

    pub(crate) fn session_ttl(&self) -> Duration {
        self.session_ttl
    }

    /// Checks the admin token.
    pub(crate) fn admin_token(&self, given: &str) -> Option<Principal> {
        self.admin_token.matches(given).then(|| Principal {
            name: "admin".into(),
            role: Role::Admin,
            agents: None,
        })
    }

    /// Checks a user name and password, or the admin token, from `client`.
    /// `device` is the id of a valid trusted-device cookie for `username`
    /// (see [`Auth::device_for`]). Slow by design (argon2): call it off
    /// the async workers.
    ///
    /// A blocked key refuses every attempt, right or wrong: otherwise a
    /// guesser could ignore the refusals and still learn the answer. Which
    /// keys apply is chosen so that other people's failures never block a
    /// user's own trusted browser (see `throttle`).
    ///
    /// `stored` is the user of that name in the store, when the users
    /// file has none (see `super::users`).
    pub(crate) fn login(
        &self,
        client: IpAddr,
        credential: &Credential,
        device: Option<[u8; 16]>,
        stored: Option<User>,
    ) -> Result<Principal, LoginError> {
        let t = &self.throttle;
        let limited = |wait: Duration| LoginError::RateLimited { retry_after: wait };
        match credential {
            Credential::Token(token) => {
                if let Some(wait) = t.token_by_addr.blocked_for(&client) {
                    return Err(limited(wait));
                }
                self.admin_token(token).ok_or_else(|| {
                    t.token_by_addr.fail(&client);
                    super::metrics::login_failed();
                    LoginError::Invalid
                })
            }
            Credential::Password { username, password } => {
                let account = username.to_owned();
                let blocked = match device {
                    Some(id) => t.password_by_device.blocked_for(&id),
                    None => t
                        .password_by_addr
                        .blocked_for(&client)
                        .or_else(|| t.password_by_account.blocked_for(&account)),
                };
                if let Some(wait) = blocked {
                    return Err(limited(wait));
                }
                let user = self
                    .users
                    .iter()
                    .find(|u| &u.name == username)
                    .or(stored.as_ref());
                // Verify against something even for an unknown user, so that
                // timing does not tell which names exist.
                let hash = user.map_or(DUMMY_HASH, |u| u.password_hash.as_str());
                let ok = verify_password(password, hash);
                match user.filter(|_| ok) {
                    Some(u) => Ok(Principal {
                        name: u.name.clone(),
                        role: u.role,
                        agents: u.agents.clone(),
                    }),
                    None => {
                        super::metrics::login_failed();
                        match device {
                            Some(id) => t.password_by_device.fail(&id),
                            None => {
                                t.password_by_addr.fail(&client);
                                t.password_by_account.fail(&account);
                            }
                        }
                        Err(LoginError::Invalid)
                    }
                }
            }
        }
    }

    /// Checks a bearer token (the admin token or an API token) from
    /// `client`, whose failures are throttled like the login form's tokens.
    pub(crate) fn bearer(
        &self,
        client: IpAddr,
        token: &str,
        api_token: Option<Principal>,
    ) -> Result<Principal, LoginError> {
        let t = &self.throttle;
        // A correct token too strong to guess (an API token, a generated
        // admin token) is never refused for others' failures: the bucket
        // only slows guessing, which cannot find such a token anyway.
        if let Some(p) = api_token {
            return Ok(p);
        }
        if self.admin_token_strong
            && let Some(p) = self.admin_token(token)
        {
            return Ok(p);
        }
        if let Some(wait) = t.bearer_by_addr.blocked_for(&client) {
            return Err(LoginError::RateLimited { retry_after: wait });
        }
        self.admin_token(token).ok_or_else(|| {
            t.bearer_by_addr.fail(&client);
            super::metrics::login_failed();
            LoginError::Invalid
        })
    }

    /// A trusted-device cookie value for `user`: a random id and a MAC
    /// binding it to the user, under a key of this server's.
    pub(crate) fn issue_device(&self, user: &str) -> String {
        let mut id = [0u8; 16];
        rand::fill(&mut id);
        let id = hex::encode(id);
        format!("{id}.{}", self.device_mac(user, &id))
    }

    /// The device id of a cookie value, if it is valid for `user`.
    pub(crate) fn device_for(&self, cookie: &str, user: &str) -> Option<[u8; 16]> {
        let (id, mac) = cookie.split_once('.')?;
        let expected = self.device_mac(user, id);
        let same: bool = subtle_eq(expected.as_bytes(), mac.as_bytes());
        if !same {
            return None;
        }
        let mut out = [0u8; 16];
        hex::decode_to_slice(id, &mut out).ok()?;
        Some(out)
    }

    fn device_mac(&self, user: &str, id: &str) -> String {
        use hmac::{Hmac, KeyInit, Mac};
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.device_key)
            .expect("HMAC accepts keys of any length");
        mac.update(b"conch-device\0");
        mac.update(user.as_bytes());
        mac.update(b"\0");
        mac.update(id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Starts a session; returns the cookie value, and the store keys of
    /// the sessions it ended. A user at the cap loses their own oldest
    /// session; when the server as a whole is full, the login is refused
    /// rather than ending someone else's session.
    pub(crate) fn create_session(
        &self,
        principal: Principal,
    ) -> Result<(String, Vec<String>), SessionError> {
        let cookie = Secret::generate().expose().to_owned();
        let mut sessions = self.sessions.lock().map_err(|_| SessionError::Full(0))?;
        let now = Instant::now();
        sessions.retain(|_, s| {
            let live = s.expires > now;
            if !live {
                s.ended.cancel();
            }
            live
        });
        let limits = self.session_limits;
        let mut own: Vec<([u8; 32], Instant)> = sessions
            .iter()
            .filter(|(_, s)| s.principal.name == principal.name)
            .map(|(k, s)| (*k, s.created))
            .collect();
        let mut gone = Vec::new();
        if own.len() >= limits.per_user.max(1) {
            own.sort_by_key(|(_, created)| *created);
            let excess = own.len() + 1 - limits.per_user.max(1);
            for (key, _) in own.into_iter().take(excess) {
                if let Some(old) = sessions.remove(&key) {
                    old.ended.cancel();
                    gone.push(hex::encode(key));
                }
            }
        }
        if sessions.len() >= limits.total.max(1) {
            return Err(SessionError::Full(limits.total));
        }
        sessions.insert(
            session_key(&cookie),
            SessionEntry {
                principal,
                created: now,
                // A huge configured lifetime must not overflow (and
                // panic with this lock held).
                expires: now
                    .checked_add(self.session_ttl)
                    .unwrap_or(now + Duration::from_secs(365 * 86_400)),
                checked: now,
                ended: CancellationToken::new(),
            },
        );
        Ok((cookie, gone))
    }

    /// Whether this server should ask the store about `cookie`: it does not
    /// know it, or has not asked for [`super::login_sessions::RECHECK`].
    pub(crate) fn needs_check(&self, cookie: &str) -> bool {
        let Ok(sessions) = self.sessions.lock() else {
            return false;
        };
        sessions
            .get(&session_key(cookie))
            .is_none_or(|s| s.checked.elapsed() >= super::login_sessions::RECHECK)
    }

    /// Takes what the store says of `cookie`: a live session (with `left`
    /// of its lifetime), or none (it ended, maybe on another server).
    pub(crate) fn adopt(&self, cookie: &str, found: Option<(Principal, Duration)>) {
        let Ok(mut sessions) = self.sessions.lock() else {
            return;
        };
        let key = session_key(cookie);
        let now = Instant::now();
        match found {
            Some((principal, left)) => {
                let entry = sessions.entry(key).or_insert_with(|| SessionEntry {
                    principal: principal.clone(),
                    created: now,
                    expires: now + left,
                    checked: now,
                    ended: CancellationToken::new(),
                });
                entry.checked = now;
                entry.principal = principal;
            }
            None => {
                if let Some(old) = sessions.remove(&key) {
                    old.ended.cancel();
                }
            }
        }
    }

    /// Login sessions open now (expired ones not yet swept included).
    pub(crate) fn session_count(&self) -> usize {
        self.sessions.lock().map_or(0, |s| s.len())
    }

    /// The principal of a live session.
    pub(crate) fn session(&self, cookie: &str) -> Option<Principal> {
        self.session_handle(cookie).map(|h| h.principal)
    }

    /// A live session with its expiry and end signal.
    pub(crate) fn session_handle(&self, cookie: &str) -> Option<SessionHandle> {
        let sessions = self.sessions.lock().ok()?;
        let entry = sessions.get(&session_key(cookie))?;
        (entry.expires > Instant::now()).then(|| SessionHandle {
            principal: entry.principal.clone(),
            expires: entry.expires,
            ended: entry.ended.clone(),
        })
    }

    /// Ends every session of user `name` here (deleted, or its password
    /// changed); the store's are removed by the caller, which ends them
    /// on other servers at their next check.
    pub(crate) fn end_sessions_of(&self, name: &str) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.retain(|_, s| {
                let keep = s.principal.name != name;
                if !keep {
                    s.ended.cancel();
                }
                keep
            });
        }
    }

    pub(crate) fn end_session(&self, cookie: &str) {
        if let Ok(mut sessions) = self.sessions.lock()
            && let Some(old) = sessions.remove(&session_key(cookie))
        {
            old.ended.cancel();
        }
    }
}

/// A valid argon2id hash of a random password, verified against when the
/// user name is unknown.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Xb2kFNz1p4JCT0xiTrmr3E1nIjBpUfQ9hF8nDGq9k+M";
