//! Who may do what with which agent: the one place that decides, for the
//! console, the REST API and (through it) the CLI alike. A principal's
//! role says what it may do (viewers watch, operators and admins run); its
//! agent selector (from the users file, or given to its token) says where.

use super::agents::{AgentError, Registry};
use super::auth::Principal;
use crate::link::AgentLink;
use crate::selector::Selector;

/// What a principal wants to do with an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// See that the agent exists and its state.
    See,
    /// Run a command or a shell on it.
    Run,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Denied {
    #[error("{0} is a viewer and may not run commands")]
    Viewer(String),
    /// Told as "no such agent", so that a limited principal learns nothing
    /// of agents outside its reach.
    #[error("no agent named {0:?}")]
    OutOfScope(String),
    /// Someone else's session: told as "no such session", so that its id,
    /// owner and existence stay private.
    #[error("no session {0:?} on that agent")]
    NotYours(String),
}

/// What a principal wants with a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionAction {
    /// See it listed, and attach read-only.
    Watch,
    /// Attach as its writer (type into it, size it).
    Write,
    /// End it, rename it, or change who may watch.
    Manage,
}

/// Whether `who` may do `action` with the session `info` on `agent`. The
/// owner may do everything (writing needs a role that runs commands);
/// admins too (they can already run anything there); users the owner
/// listed in `watchers` (or `*`: everyone who may see the agent) may watch.
pub(crate) fn session(
    who: &Principal,
    action: SessionAction,
    agent: &str,
    info: &crate::protocol::SessionInfo,
    agents: &Registry,
) -> Result<(), Denied> {
    let wanted = if action == SessionAction::Watch {
        Action::See
    } else {
        Action::Run
    };
    check(who, wanted, agent, agents)?;
    let owner = who.name == info.owner;
    let admin = who.role == super::auth::Role::Admin;
    let watcher = info.watchers.iter().any(|w| w == &who.name || w == "*");
    let allowed = match action {
        SessionAction::Watch => owner || admin || watcher,
        SessionAction::Write | SessionAction::Manage => owner || admin,
    };
    if allowed {
        Ok(())
    } else {
        Err(Denied::NotYours(info.id.clone()))
    }
}

/// The selector limiting `who`, if any. A selector that no longer parses
/// (it was checked when stored) matches nothing rather than everything.
fn scope(who: &Principal) -> Option<Option<Selector>> {
    who.agents.as_deref().map(|s| Selector::parse(s).ok())
}

/// Whether `who` may do `action` on the agent `agent`.
pub(crate) fn check(
    who: &Principal,
    action: Action,
    agent: &str,
    agents: &Registry,
) -> Result<(), Denied> {
    if action == Action::Run && !who.role.can_run() {
        return Err(Denied::Viewer(who.name.clone()));
    }
    match scope(who) {
        None => Ok(()),
        Some(Some(selector)) if agents.matches(agent, &selector) => Ok(()),
        Some(_) => Err(Denied::OutOfScope(agent.to_owned())),
    }
}

/// Whether `who` may see the agent `agent` (for listings).
pub(crate) fn visible(who: &Principal, agent: &str, agents: &Registry) -> bool {
    check(who, Action::See, agent, agents).is_ok()
}

/// Why a principal gets no link to run on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// The link `who` may run a command on: the agent `requested` (or the only
/// one), if the policy allows it and it is connected. An agent out of the
/// principal's reach is refused as unknown, whether connected or not.
pub(crate) fn link_to_run(
    who: &Principal,
    requested: Option<&str>,
    agents: &Registry,
) -> Result<(String, AgentLink), Refused> {
    if !who.role.can_run() {
        return Err(Denied::Viewer(who.name.clone()).into());
    }
    // Without a name, "the only agent" is the only one this principal can
    // see: agents beyond its reach neither count nor show.
    let name = match (requested, &who.agents) {
        (None, Some(_)) => {
            let mut visible = agents
                .names()
                .into_iter()
                .filter(|n| self::visible(who, n, agents));
            match (visible.next(), visible.next()) {
                (Some(only), None) => only,
                _ => return Err(AgentError::Ambiguous.into()),
            }
        }
        _ => agents.resolve(requested)?,
    };
    check(who, Action::Run, &name, agents)?;
    Ok(agents.link(Some(&name))?)
}
