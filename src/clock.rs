//! Wall-clock time for everything that is compared with absolute timestamps (credential expiry,
//! token expiry). Scheduling uses `tokio::time`; this module only answers "what time is it".
//!
//! Why a trait: credentials expire at an absolute time chosen by STS, and a laptop that sleeps for a
//! night must notice on wake-up that its cached credentials are stale, so validity is always judged
//! against the real clock. Tests swap in [`TokioClock`], which follows tokio's paused time, so hours
//! of refresh behaviour run in milliseconds.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Source of wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that starts at a fixed wall time and advances with `tokio::time::Instant`, so that tests
/// with paused time see wall time move when they call `tokio::time::advance`.
#[derive(Debug, Clone)]
pub struct TokioClock {
    start_wall: SystemTime,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn starting_at(start_wall: SystemTime) -> Self {
        Self {
            start_wall,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.start_wall + self.start.elapsed()
    }
}

/// Seconds since the Unix epoch, saturating at zero for times before it.
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Formats a time the way IMDS and STS do: `YYYY-MM-DDTHH:MM:SSZ`, UTC, no fractional seconds.
/// botocore's expiry handling parses exactly this pattern and nothing else.
pub fn format_iso8601(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Truncates a time to whole seconds, so that what we display is never later than what we hold.
pub fn floor_to_second(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix_seconds(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_has_no_fraction_and_ends_in_z() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(format_iso8601(t), "2023-11-14T22:13:20Z");
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let clock = TokioClock::starting_at(start);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now(), start + Duration::from_secs(3600));
    }
}
