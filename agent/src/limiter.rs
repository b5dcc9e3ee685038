//! The agent's request limiters: governor's GCRA, wrapped once, on tokio's clock (so that tests
//! in paused time move them with `tokio::time::advance`). [`Limiter`] is one allowance (the
//! node-wide request rate); [`KeyedLimiter`] one per key (each pod's request rate, keyed by the
//! pod the kernel saw). A limiter refuses, with how long to wait; it never queues.
//!
//! Two buckets are not these, on purpose. The admission path's pace towards EKS Auth
//! ([`crate::credentials::admission`]) changes its rate with every throttling answer, where a
//! governor quota is fixed. The Events' spam filter ([`crate::kubernetes::events`]) asks when a
//! pod's next call may go without taking it, to schedule its queue; governor only answers when
//! it refuses.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::RateLimit;

/// Tokio's monotonic clock for governor: paused and advanced with tokio's time in tests.
#[derive(Debug, Clone)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl governor::clock::Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// The quota of `rate`: `None` (no limit) at 0 per second; a burst of 0 is the rate.
fn quota(rate: RateLimit) -> Option<Quota> {
    let per_second = NonZeroU32::new(rate.per_second)?;
    let burst = NonZeroU32::new(rate.burst).unwrap_or(per_second);
    Some(Quota::per_second(per_second).allow_burst(burst))
}

/// One allowance.
pub struct Limiter {
    limiter: RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>,
    clock: TokioClock,
}

impl Limiter {
    /// `None` when `rate` is 0 per second (no limit).
    pub fn new(rate: RateLimit) -> Option<Self> {
        let clock = TokioClock::default();
        Some(Limiter {
            limiter: RateLimiter::direct_with_clock(quota(rate)?, clock.clone()),
            clock,
        })
    }

    /// Takes one from the allowance; `Err` says when to retry.
    pub fn check(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

/// One allowance per key.
pub struct KeyedLimiter<K: Hash + Eq + Clone> {
    limiter: RateLimiter<K, DefaultKeyedStateStore<K>, TokioClock, NoOpMiddleware<Duration>>,
    clock: TokioClock,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// `None` when `rate` is 0 per second (no limit).
    pub fn new(rate: RateLimit) -> Option<Self> {
        let clock = TokioClock::default();
        Some(KeyedLimiter {
            limiter: RateLimiter::new(
                quota(rate)?,
                DefaultKeyedStateStore::default(),
                clock.clone(),
            ),
            clock,
        })
    }

    /// Takes one from `key`'s allowance; `Err` says when to retry.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Keys with an allowance in memory.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets the keys idle long enough to have refilled their allowance.
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: u32, burst: u32) -> RateLimit {
        RateLimit { per_second, burst }
    }

    #[tokio::test(start_paused = true)]
    async fn a_limiter_refills_with_tokios_clock() {
        let limiter = Limiter::new(rate(1, 2)).unwrap();
        assert_eq!(limiter.check(), Ok(()));
        assert_eq!(limiter.check(), Ok(()));
        assert_eq!(limiter.check(), Err(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(limiter.check(), Err(Duration::from_millis(600)));
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(limiter.check(), Ok(()));
        assert!(Limiter::new(rate(0, 5)).is_none(), "0 per second: no limit");
    }

    #[tokio::test(start_paused = true)]
    async fn each_key_has_its_own_allowance_and_idle_keys_are_forgotten() {
        let limiter = KeyedLimiter::new(rate(10, 1)).unwrap();
        assert_eq!(limiter.check(&"a"), Ok(()));
        assert!(limiter.check(&"a").is_err());
        assert_eq!(limiter.check(&"b"), Ok(()), "b spends its own");
        assert_eq!(limiter.len(), 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        limiter.prune();
        assert!(limiter.is_empty());
    }
}
