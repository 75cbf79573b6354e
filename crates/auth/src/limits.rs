//! Abuse limits, kept in memory: a fixed-window request rate per endpoint and
//! caller, and a sign-in throttle that slows down password guessing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use haven_model::clock::Clock;
use time::{Duration, OffsetDateTime};

/// Requests allowed per caller and endpoint in one window.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub requests: u32,
    pub window: Duration,
}

/// Fixed-window counters; old windows are dropped as the map is swept.
pub struct RateLimiter {
    clock: Arc<dyn Clock>,
    windows: Mutex<HashMap<String, (OffsetDateTime, u32)>>,
}

impl RateLimiter {
    pub fn new(clock: Arc<dyn Clock>) -> RateLimiter {
        RateLimiter {
            clock,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a request; `Err(seconds)` says how long to wait when over the rate.
    pub fn check(&self, endpoint: &str, caller: &str, rate: Rate) -> Result<(), u64> {
        let now = self.clock.now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() > 100_000 {
            windows.retain(|_, (start, _)| *start + rate.window > now);
        }
        let entry = windows
            .entry(format!("{endpoint}\u{0}{caller}"))
            .or_insert((now, 0));
        if entry.0 + rate.window <= now {
            *entry = (now, 0);
        }
        entry.1 += 1;
        if entry.1 > rate.requests {
            let wait = (entry.0 + rate.window - now).whole_seconds().max(1);
            return Err(u64::try_from(wait).unwrap_or(1));
        }
        Ok(())
    }
}

/// Failures allowed before sign-in for a username from one address is locked;
/// each failure after that doubles the lock, up to fifteen minutes. The lock is
/// per address so that nobody can lock a user out from elsewhere; an address
/// guessing across many usernames is locked after more failures.
const FREE_FAILURES: u32 = 5;
const FREE_FAILURES_PER_ADDRESS: u32 = 20;
const FIRST_LOCK: Duration = Duration::seconds(30);
const LONGEST_LOCK: Duration = Duration::minutes(15);

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    locked_until: Option<OffsetDateTime>,
    last: OffsetDateTime,
}

pub struct LoginThrottle {
    clock: Arc<dyn Clock>,
    failures: Mutex<HashMap<String, Failures>>,
}

impl LoginThrottle {
    pub fn new(clock: Arc<dyn Clock>) -> LoginThrottle {
        LoginThrottle {
            clock,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The counters a failure counts against, with their free failures.
    fn keys(username: &str, remote: &str) -> [(String, u32); 2] {
        [
            (format!("user\u{0}{username}\u{0}{remote}"), FREE_FAILURES),
            (format!("addr\u{0}{remote}"), FREE_FAILURES_PER_ADDRESS),
        ]
    }

    /// Seconds to wait if sign-in is locked for this username or address.
    pub fn blocked(&self, username: &str, remote: &str) -> Option<u64> {
        let now = self.clock.now();
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        Self::keys(username, remote)
            .iter()
            .filter_map(|(k, _)| failures.get(k)?.locked_until)
            .filter(|until| *until > now)
            .map(|until| u64::try_from((until - now).whole_seconds().max(1)).unwrap_or(1))
            .max()
    }

    pub fn failed(&self, username: &str, remote: &str) {
        let now = self.clock.now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() > 100_000 {
            failures.retain(|_, f| f.last + LONGEST_LOCK > now);
        }
        for (key, free) in Self::keys(username, remote) {
            let entry = failures.entry(key).or_insert(Failures {
                count: 0,
                locked_until: None,
                last: now,
            });
            // Failures long ago are forgiven.
            if entry.last + LONGEST_LOCK < now {
                entry.count = 0;
            }
            entry.count += 1;
            entry.last = now;
            if entry.count >= free {
                let doublings = (entry.count - free).min(10);
                let lock = (FIRST_LOCK * 2i32.pow(doublings)).min(LONGEST_LOCK);
                entry.locked_until = Some(now + lock);
            }
        }
    }

    pub fn succeeded(&self, username: &str, remote: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(&Self::keys(username, remote)[0].0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_model::clock::ManualClock;
    use time::macros::datetime;

    #[test]
    fn a_caller_over_the_rate_waits_until_the_window_ends() {
        let clock = Arc::new(ManualClock::new(datetime!(2026-01-01 0:00 UTC)));
        let limiter = RateLimiter::new(clock.clone());
        let rate = Rate {
            requests: 2,
            window: Duration::minutes(1),
        };
        assert!(limiter.check("token", "1.2.3.4", rate).is_ok());
        assert!(limiter.check("token", "1.2.3.4", rate).is_ok());
        assert_eq!(limiter.check("token", "1.2.3.4", rate), Err(60));
        assert!(limiter.check("token", "5.6.7.8", rate).is_ok());
        clock.advance(Duration::minutes(1));
        assert!(limiter.check("token", "1.2.3.4", rate).is_ok());
    }

    #[test]
    fn repeated_sign_in_failures_lock_the_username_for_longer_each_time() {
        let clock = Arc::new(ManualClock::new(datetime!(2026-01-01 0:00 UTC)));
        let throttle = LoginThrottle::new(clock.clone());
        for _ in 0..4 {
            throttle.failed("amy", "a");
        }
        assert_eq!(throttle.blocked("amy", "a"), None);
        throttle.failed("amy", "a");
        assert_eq!(throttle.blocked("amy", "a"), Some(30));
        // Failures from one address do not lock the user out elsewhere.
        assert_eq!(throttle.blocked("amy", "b"), None);
        throttle.failed("amy", "a");
        assert_eq!(throttle.blocked("amy", "a"), Some(60));
        clock.advance(Duration::seconds(61));
        assert_eq!(throttle.blocked("amy", "a"), None);
        throttle.succeeded("amy", "a");
        assert_eq!(throttle.blocked("amy", "a"), None);
    }

    #[test]
    fn an_address_guessing_across_usernames_is_locked() {
        let clock = Arc::new(ManualClock::new(datetime!(2026-01-01 0:00 UTC)));
        let throttle = LoginThrottle::new(clock);
        for n in 0..20 {
            throttle.failed(&format!("user{n}"), "a");
        }
        assert!(throttle.blocked("someone-new", "a").is_some());
        assert_eq!(throttle.blocked("someone-new", "b"), None);
    }
}
