//! The kubelet's limits (client-go's `EventCorrelator` constants, and ours for throttling), and the
//! token bucket each pod's API calls draw from.

use std::time::Duration;

use tokio::time::Instant;

/// The kubelet's limits, and ours for throttling.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most series kept.
    pub max_series: usize,
    /// API calls per pod: a burst, then one per `refill`.
    pub burst: u32,
    pub refill: Duration,
    /// Throttling is reported from this many occurrences within `repeat_window` on.
    pub throttle_repeats: u32,
    pub repeat_window: Duration,
    /// How long a pod that could not be named is not looked up again.
    pub unnamed_memory: Duration,
    /// Attempts at sending one update before it is abandoned.
    pub max_attempts: u32,
}

impl Limits {
    /// client-go's `EventCorrelator` defaults (LRU 4096, spam filter burst 25 and one per 300 s,
    /// 12 tries per event).
    pub fn kubelet() -> Self {
        Limits {
            max_series: 4096,
            burst: 25,
            refill: Duration::from_secs(300),
            throttle_repeats: 3,
            repeat_window: Duration::from_secs(60),
            unnamed_memory: Duration::from_secs(60),
            max_attempts: 12,
        }
    }
}

/// A token bucket.
pub(super) struct Bucket {
    pub(super) tokens: f64,
    pub(super) at: Instant,
}

impl Bucket {
    pub(super) fn refill(&mut self, now: Instant, limits: &Limits) {
        let gained = now.duration_since(self.at).as_secs_f64() / limits.refill.as_secs_f64();
        self.tokens = (self.tokens + gained).min(f64::from(limits.burst));
        self.at = now;
    }

    pub(super) fn next_token(&self, limits: &Limits) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.at + limits.refill.mul_f64(missing)
    }
}
