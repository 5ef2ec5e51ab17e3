//! Throttling of failed credentials and of API requests (token buckets,
//! from `governor`).
//!
//! Failed logins are counted in several buckets at once, so that no single
//! key is both the attacker's lever and the victim's lock:
//! - **per address and kind**: password failures and token failures (the
//!   admin token in the login form or `?token=`, and `Authorization: Bearer`)
//!   have separate buckets, so that a web page making a browser fetch
//!   `/login?token=x` cannot lock its user's password out;
//! - **per account**: password failures for one user name from any number
//!   of addresses (ten addresses no longer get ten times the guesses);
//! - **per trusted device**: a browser that has logged in as a user before
//!   carries a signed device cookie for that user; its attempts count only
//!   in its own bucket, so other people's failures (on that account or from
//!   that address) never lock out the user's correct password there.
//!
//! Only failures are counted: a bucket is consulted before a check and
//! charged after a failure; an empty bucket blocks its key until it refills.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Keys tracked per bucket at most; beyond, stale keys are dropped, then
/// (under a flood of distinct keys) everything: a throttle that forgets is
/// better than a server that runs out of memory.
const MAX_KEYS: usize = 100_000;

/// Failed passwords allowed per address, and per account, before they
/// are blocked; then one more a minute.
pub const PASSWORD_FAILURES: u32 = 10;
/// Failed passwords allowed from one trusted device; then one a minute.
pub(crate) const DEVICE_FAILURES: u32 = 5;
/// Failed tokens allowed per address (login form and bearer); then one a second.
pub(crate) const TOKEN_FAILURES: u32 = 30;

fn quota(per_minute: u32, burst: u32) -> Quota {
    let per_minute = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(per_minute).allow_burst(burst)
}

/// A bucket per key, charged on failures only.
pub(crate) struct FailureBucket<K: Hash + Eq + Clone> {
    quota: Quota,
    limiter: Mutex<DefaultKeyedRateLimiter<K>>,
    blocked: Mutex<HashMap<K, Instant>>,
}

impl<K: Hash + Eq + Clone> FailureBucket<K> {
    /// A key is blocked by its `allowed`th failure in a row, and gets one
    /// more try each `refill`.
    pub(crate) fn new(allowed: u32, refill: Duration) -> Self {
        let burst = NonZeroU32::new(allowed.saturating_sub(1).max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(refill)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        FailureBucket {
            quota,
            limiter: Mutex::new(RateLimiter::keyed(quota)),
            blocked: Mutex::default(),
        }
    }

    /// How long `key` must still wait, if it is blocked.
    pub(crate) fn blocked_for(&self, key: &K) -> Option<Duration> {
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let until = *blocked.get(key)?;
        let now = Instant::now();
        if until <= now {
            blocked.remove(key);
            return None;
        }
        Some(until - now)
    }

    /// Charges one failure to `key`; it is blocked once its bucket is empty.
    pub(crate) fn fail(&self, key: &K) {
        let mut limiter = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        if limiter.len() >= MAX_KEYS {
            limiter.retain_recent();
            if limiter.len() >= MAX_KEYS {
                *limiter = RateLimiter::keyed(self.quota);
            }
        }
        if let Err(not_until) = limiter.check_key(key) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
            if blocked.len() >= MAX_KEYS {
                let now = Instant::now();
                blocked.retain(|_, until| *until > now);
            }
            blocked.insert(key.clone(), Instant::now() + wait);
        }
    }
}

/// The failure buckets of the login form and of bearer tokens.
pub(crate) struct LoginThrottle {
    pub(crate) password_by_addr: FailureBucket<IpAddr>,
    pub(crate) password_by_account: FailureBucket<String>,
    pub(crate) password_by_device: FailureBucket<[u8; 16]>,
    /// The admin token in the login form or `?token=` (which any page can
    /// make a browser send).
    pub(crate) token_by_addr: FailureBucket<IpAddr>,
    /// `Authorization: Bearer` failures.
    pub(crate) bearer_by_addr: FailureBucket<IpAddr>,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        let minute = Duration::from_secs(60);
        LoginThrottle {
            password_by_addr: FailureBucket::new(PASSWORD_FAILURES, minute),
            password_by_account: FailureBucket::new(PASSWORD_FAILURES, minute),
            password_by_device: FailureBucket::new(DEVICE_FAILURES, minute),
            // Tokens are long random secrets: generous, but never unbounded
            // (300 guesses in 0.1 s used to be answered).
            token_by_addr: FailureBucket::new(TOKEN_FAILURES, Duration::from_secs(1)),
            bearer_by_addr: FailureBucket::new(TOKEN_FAILURES, Duration::from_secs(1)),
        }
    }
}

/// Requests per caller per minute (the API's rate limit).
pub(crate) struct RequestRate {
    limiter: DefaultKeyedRateLimiter<String>,
}

impl RequestRate {
    pub(crate) fn new(per_minute: u32) -> Self {
        RequestRate {
            limiter: RateLimiter::keyed(quota(per_minute, per_minute)),
        }
    }

    /// Counts a request of `who`; `Err(seconds to wait)` when over the rate.
    pub(crate) fn check(&self, who: &str) -> Result<(), u64> {
        if self.limiter.len() >= MAX_KEYS {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&who.to_owned())
            .map_err(|not_until| {
                not_until
                    .wait_time_from(DefaultClock::default().now())
                    .as_secs()
                    .max(1)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_block_only_their_own_key_and_successes_cost_nothing() {
        let bucket = FailureBucket::<u32>::new(3, Duration::from_secs(60));
        for _ in 0..2 {
            bucket.fail(&1);
            assert!(bucket.blocked_for(&1).is_none());
        }
        bucket.fail(&1);
        let wait = bucket.blocked_for(&1).expect("the third failure blocks");
        assert!(wait <= Duration::from_secs(60));
        assert!(bucket.blocked_for(&2).is_none(), "another key is untouched");
    }

    #[test]
    fn the_request_rate_refuses_beyond_its_burst() {
        let rate = RequestRate::new(5);
        for _ in 0..5 {
            assert!(rate.check("a").is_ok());
        }
        assert!(rate.check("a").is_err());
        assert!(rate.check("b").is_ok());
    }
}
