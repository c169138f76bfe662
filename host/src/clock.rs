//! The wall clock, read in one place: milliseconds and seconds since the Unix epoch, now and
//! after a while, and the test hook that fakes a machine whose clock is off. The formats that
//! carry these readings are `protocol::time`'s, which takes time as an argument.

use crate::protocol::time::epoch_ms;
use std::sync::atomic::{AtomicI64, Ordering};
use time::OffsetDateTime;

/// Now, by this machine's clock (shifted by [`skew_clock`]'s amount, if a test set one).
pub fn now() -> OffsetDateTime {
    let skew = CLOCK_SKEW_MS.load(Ordering::Relaxed);
    let now = OffsetDateTime::now_utc();
    if skew == 0 {
        return now;
    }
    now.checked_add(time::Duration::milliseconds(skew))
        .unwrap_or(now)
}

/// Milliseconds since the Unix epoch, now, by this machine's clock (shifted by
/// [`skew_clock`]'s amount, if a test set one).
pub fn now_ms() -> i64 {
    epoch_ms(OffsetDateTime::now_utc()).saturating_add(CLOCK_SKEW_MS.load(Ordering::Relaxed))
}

static CLOCK_SKEW_MS: AtomicI64 = AtomicI64::new(0);

/// Shifts this process's [`now_ms`] by `ms`: a test hook (`TASKHOST_TEST_CLOCK_SKEW_MS`) that
/// fakes a machine whose clock is off, to show nothing between workers depends on their
/// clocks agreeing.
pub fn skew_clock(ms: i64) {
    CLOCK_SKEW_MS.store(ms, Ordering::Relaxed);
}

/// Milliseconds since the Unix epoch, `after` from now (a deadline as plugins receive it).
pub fn deadline_ms(after: std::time::Duration) -> u64 {
    u64::try_from(now_ms())
        .unwrap_or(0)
        .saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds since the Unix epoch, as Celery's event timestamps and `time_start`.
pub fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
