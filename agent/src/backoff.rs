//! The agent's one backoff policy ([`Backoff`]): a first wait, doubling after each failure in a
//! row, up to a longest. A renewal that failed, the startup taint's removal, an Event that could
//! not be sent and the cluster's signing keys' refetch all wait by it. (The pod view's watch uses
//! kube-rs's own, which its watcher takes.) Plain arithmetic: callers count their failures and
//! add jitter where many waiters could align.

use std::time::Duration;

/// A first wait doubling to a longest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub longest: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, longest: Duration) -> Self {
        Backoff { first, longest }
    }

    /// The wait after `failures` failures in a row: `first` after one, twice that after two, …,
    /// never more than `longest` (nor less than `first`, for a longest set below it). No wait
    /// before any failure.
    pub fn after(&self, failures: u32) -> Duration {
        match failures {
            0 => Duration::ZERO,
            n => self
                .first
                .saturating_mul(1 << (n - 1).min(16))
                .min(self.longest.max(self.first)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_first_wait_to_the_longest() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let waits: Vec<u64> = (0..8).map(|n| b.after(n).as_secs()).collect();
        assert_eq!(waits, [0, 1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(b.after(u32::MAX), Duration::from_secs(30));
        let inverted = Backoff::new(Duration::from_secs(10), Duration::from_secs(1));
        assert_eq!(inverted.after(3), Duration::from_secs(10));
    }
}
