//! Time as Celery writes it (ISO 8601, as Python's `isoformat()`), and the wall-clock readings
//! the formats carry: milliseconds since the Unix epoch (scores in Redis, deadlines) and
//! seconds (event timestamps).

use std::sync::atomic::{AtomicI64, Ordering};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Parses Celery's ISO-8601 times: RFC 3339 with an offset, or naive (taken as UTC, as Celery
/// sends them when `enable_utc` is on without a timezone).
pub fn parse_time(text: &str) -> Option<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(t);
    }
    let naive = time::macros::format_description!(
        version = 2,
        "[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    time::PrimitiveDateTime::parse(text, naive)
        .ok()
        .map(|t| t.assume_utc())
}

/// Formats a time as Python's `isoformat()` does for an aware UTC datetime.
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// Milliseconds since the Unix epoch of `t` (saturating far outside the representable range).
pub fn epoch_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// The time `ms` milliseconds after the Unix epoch, if it is representable.
pub fn from_epoch_ms(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_match_python_isoformat() {
        let t = parse_time("2026-11-25T08:08:06.003644+00:00").expect("parses");
        assert_eq!(format_time(t), "2026-11-25T08:08:06.003644+00:00");
        let naive = parse_time("2026-11-25T08:08:06").expect("naive parses");
        assert_eq!(format_time(naive), "2026-11-25T08:08:06.000000+00:00");
        let offset = parse_time("2026-11-25T10:08:06+02:00").expect("offset parses");
        assert_eq!(format_time(offset), "2026-11-25T08:08:06.000000+00:00");
    }

    #[test]
    fn epoch_milliseconds_round_trip() {
        let t = parse_time("2026-11-25T08:08:06.003+00:00").expect("parses");
        assert_eq!(from_epoch_ms(epoch_ms(t)), Some(t));
    }
}
