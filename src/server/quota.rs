//! Fair shares of the agents' channels.
//!
//! An agent link runs a bounded number of channels (the agent's
//! `--max-channels`), shared by every user of the server. Without a share,
//! one user holding many long commands would make everybody else's fail.
//! So each user may run at most `per_user` commands at once (console and
//! API together), and the last `reserve` channels of each agent go only to
//! users who run nothing there yet: one user can never take the last slots.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The configured shares.
#[derive(Debug, Clone, Copy)]
pub struct QuotaLimits {
    /// Commands one user may run at once, over all agents.
    pub per_user: usize,
    /// Channels of each agent kept for users who run nothing on it yet.
    pub reserve: usize,
    /// Shell sessions one user may hold on one agent, attached or not
    /// (the agent counts them: a detached shell holds no command slot).
    pub shells_per_user: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum QuotaError {
    #[error(
        "{user} runs {limit} commands already, the most one user may run at once; wait for one to end"
    )]
    PerUser { user: String, limit: usize },
    #[error(
        "agent {agent:?} has {free} free channels left, kept for users who run nothing there yet; wait for one of your commands to end"
    )]
    Reserve { agent: String, free: usize },
    #[error("agent {agent:?} runs its maximum of {capacity} commands; try again shortly")]
    Full { agent: String, capacity: usize },
}

#[derive(Default)]
struct Counts {
    by_user: HashMap<String, usize>,
    by_agent: HashMap<String, usize>,
    by_user_agent: HashMap<(String, String), usize>,
}

/// Running commands by user and by agent.
#[derive(Clone)]
pub(crate) struct Quota {
    limits: QuotaLimits,
    counts: Arc<Mutex<Counts>>,
}

/// One admitted command; dropping it frees the share.
pub(crate) struct Ticket {
    user: String,
    agent: String,
    counts: Arc<Mutex<Counts>>,
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let std::collections::hash_map::Entry::Occupied(mut e) = map.entry(key) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        decrement(&mut c.by_user, self.user.clone());
        decrement(&mut c.by_agent, self.agent.clone());
        decrement(
            &mut c.by_user_agent,
            (self.user.clone(), self.agent.clone()),
        );
    }
}

impl Quota {
    /// Commands running now, of all users.
    pub(crate) fn running(&self) -> usize {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.by_user.values().sum()
    }

    /// Commands one user may run at once.
    pub(crate) fn per_user(&self) -> usize {
        self.limits.per_user
    }

    /// Shell sessions one user may hold on one agent.
    pub(crate) fn shells_per_user(&self) -> u32 {
        self.limits.shells_per_user
    }

    pub(crate) fn new(limits: QuotaLimits) -> Quota {
        Quota {
            limits,
            counts: Arc::default(),
        }
    }

    /// Admits one more command of `user` on `agent`, whose link runs at
    /// most `capacity` channels.
    pub(crate) fn admit(
        &self,
        user: &str,
        agent: &str,
        capacity: usize,
    ) -> Result<Ticket, QuotaError> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mine = c.by_user.get(user).copied().unwrap_or(0);
        if mine >= self.limits.per_user {
            return Err(QuotaError::PerUser {
                user: user.into(),
                limit: self.limits.per_user,
            });
        }
        let used = c.by_agent.get(agent).copied().unwrap_or(0);
        if used >= capacity {
            return Err(QuotaError::Full {
                agent: agent.into(),
                capacity,
            });
        }
        let free = capacity - used;
        let mine_here = c
            .by_user_agent
            .get(&(user.to_owned(), agent.to_owned()))
            .copied()
            .unwrap_or(0);
        if free <= self.limits.reserve && mine_here > 0 {
            return Err(QuotaError::Reserve {
                agent: agent.into(),
                free,
            });
        }
        *c.by_user.entry(user.into()).or_default() += 1;
        *c.by_agent.entry(agent.into()).or_default() += 1;
        *c.by_user_agent
            .entry((user.into(), agent.into()))
            .or_default() += 1;
        Ok(Ticket {
            user: user.into(),
            agent: agent.into(),
            counts: self.counts.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_user_cannot_take_the_last_slots() {
        let q = Quota::new(QuotaLimits {
            per_user: 100,
            reserve: 2,
            shells_per_user: 16,
        });
        let mut held: Vec<Ticket> = (0..8).map(|_| q.admit("hog", "a", 10).unwrap()).collect();
        // 2 left, both in the reserve: the hog is refused, others are not.
        assert!(matches!(
            q.admit("hog", "a", 10),
            Err(QuotaError::Reserve { free: 2, .. })
        ));
        let other = q.admit("alice", "a", 10).unwrap();
        let third = q.admit("bob", "a", 10).unwrap();
        assert!(matches!(
            q.admit("carol", "a", 10),
            Err(QuotaError::Full { .. })
        ));
        drop((other, third));
        held.pop();
        assert!(q.admit("carol", "a", 10).is_ok());
    }

    #[test]
    fn a_user_share_spans_agents_and_comes_back() {
        let q = Quota::new(QuotaLimits {
            per_user: 2,
            reserve: 0,
            shells_per_user: 16,
        });
        let a = q.admit("u", "a", 10).unwrap();
        let _b = q.admit("u", "b", 10).unwrap();
        assert!(matches!(
            q.admit("u", "c", 10),
            Err(QuotaError::PerUser { limit: 2, .. })
        ));
        drop(a);
        assert!(q.admit("u", "c", 10).is_ok());
    }
}
