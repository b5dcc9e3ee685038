//! The kubelet's limits (client-go's `EventCorrelator` constants, and ours for throttling), and the
//! allowance each pod's API calls draw from.

use std::sync::Arc;
use std::time::Duration;

use crate::limiter::KeyedLimiter;

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

    /// One allowance per pod: [`Limits::burst`] calls, then one per [`Limits::refill`].
    pub(super) fn allowance(&self) -> KeyedLimiter<Arc<str>> {
        KeyedLimiter::every(self.refill, self.burst)
    }
}
