//! Time as Celery writes it (ISO 8601, as Python's `isoformat()`), and milliseconds since the
//! Unix epoch (scores in Redis, deadlines). Reading the clock is `crate::clock`'s: time comes
//! into this room as an argument.

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
