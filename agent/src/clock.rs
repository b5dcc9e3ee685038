//! Wall-clock time, injectable so that time-based logic is tested with tokio's paused time.

use std::time::{Duration, SystemTime};

/// The source of "now" for expiry decisions.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system's wall clock.
    System,
    /// A wall clock that advances with tokio's clock: under `tokio::time::pause` tests move it
    /// with `tokio::time::advance`.
    Tokio {
        start: SystemTime,
        origin: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that follows tokio's time from `start`.
    pub fn tokio(start: SystemTime) -> Self {
        Clock::Tokio {
            start,
            origin: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Tokio { start, origin } => *start + origin.elapsed(),
        }
    }

    /// How long until `t` (zero if it has passed).
    pub fn until(&self, t: SystemTime) -> Duration {
        t.duration_since(self.now()).unwrap_or_default()
    }

    /// Seconds since the Unix epoch.
    pub fn unix_now(&self) -> i64 {
        match self.now().duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        }
    }
}
