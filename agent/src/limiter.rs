//! The agent's request limiters: governor's GCRA, wrapped once, on tokio's clock (so that tests
//! in paused time move them with `tokio::time::advance`). [`Limiter`] is one allowance (the
//! node-wide request rate); [`KeyedLimiter`] one per key (each pod's request rate, keyed by the
//! pod the kernel saw). A limiter refuses, with how long to wait; it never queues.
//!
//! The Events' spam filter ([`crate::kubernetes::events`]) is a keyed one too: one allowance per
//! pod, refilled every few minutes; a refusal's wait is when its queue looks again.
//!
//! One pace is not a limiter, on purpose: the admission path's towards EKS Auth
//! ([`crate::credentials::admission`]) is congestion control. It moves its rate with every
//! answer (AIMD), hands an unused call back, and tells a queued request when its turn should come;
//! a limiter's quota is fixed, and what it took stays taken.

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
        Some(Self::with_quota(quota(rate)?))
    }

    /// A burst of `burst` (at least 1), then one per `period` (a zero period: as fast as
    /// governor counts).
    pub fn every(period: Duration, burst: u32) -> Self {
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Self::with_quota(quota)
    }

    fn with_quota(quota: Quota) -> Self {
        let clock = TokioClock::default();
        KeyedLimiter {
            limiter: RateLimiter::new(quota, DefaultKeyedStateStore::default(), clock.clone()),
            clock,
        }
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
    async fn an_allowance_every_period_refills_one_per_period() {
        let limiter = KeyedLimiter::every(Duration::from_secs(300), 2);
        assert_eq!(limiter.check(&"pod"), Ok(()));
        assert_eq!(limiter.check(&"pod"), Ok(()));
        assert_eq!(limiter.check(&"pod"), Err(Duration::from_secs(300)));
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(limiter.check(&"pod"), Err(Duration::from_secs(200)));
        tokio::time::advance(Duration::from_secs(200)).await;
        assert_eq!(limiter.check(&"pod"), Ok(()));
        assert!(
            limiter.check(&"pod").is_err(),
            "one per period, not a new burst"
        );
        let never_zero = KeyedLimiter::every(Duration::ZERO, 0);
        assert_eq!(never_zero.check(&"pod"), Ok(()), "a burst of 0 is 1");
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
