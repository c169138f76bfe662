//! `[schedule."NAME"]`: periodic tasks, read and checked, and when each one's ticks fall —
//! every N seconds (aligned to the Unix epoch, so every worker computes the same ticks), or at
//! the minutes a cron expression names in a time zone. Pure: times come in as values.

use jiff::civil::{Date, DateTime, time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::time::Duration;

/// Why a schedule entry is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error("schedule {name:?}: give exactly one of `every` and `cron`")]
    When { name: String },
    #[error(
        "schedule {name:?}: {field} {value:?} is not a duration such as \"30s\", \"5m\", \"1h\", \"1d\""
    )]
    Duration {
        name: String,
        field: &'static str,
        value: String,
    },
    #[error("schedule {name:?}: cron {value:?}: {reason}")]
    Cron {
        name: String,
        value: String,
        reason: String,
    },
    #[error("schedule {name:?}: unknown time zone {value:?}")]
    TimeZone { name: String, value: String },
    #[error("schedule {name:?}: `args` must be a list and `kwargs` a table")]
    Arguments { name: String },
}

/// `[schedule."NAME"]` as written.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// The task to send, e.g. `tasks.cleanup_old_evaluations`.
    pub task: String,
    #[serde(default)]
    pub args: Option<toml::Value>,
    #[serde(default)]
    pub kwargs: Option<toml::Value>,
    /// The queue it goes to [default: celery].
    pub queue: Option<String>,
    /// A fixed period: "30s", "5m", "1h", "1d" (or a number of seconds).
    pub every: Option<toml::Value>,
    /// Five fields: minute hour day-of-month month day-of-week (0 or 7 = Sunday).
    pub cron: Option<String>,
    /// The time zone a cron expression is read in [default: UTC].
    pub timezone: Option<String>,
    /// How long after its tick a sent task may still start, as Celery's `expires`.
    pub expires: Option<toml::Value>,
    /// After downtime, send the latest missed tick once (true) or skip every missed tick
    /// [default: true].
    pub catch_up: Option<bool>,
}

/// A periodic task, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub task: String,
    pub args: Value,
    pub kwargs: Value,
    pub queue: String,
    pub when: When,
    pub expires: Option<Duration>,
    pub catch_up: bool,
}

/// When an entry's ticks fall.
#[derive(Debug, Clone, PartialEq)]
pub enum When {
    /// Every multiple of this period since the Unix epoch.
    Every(Duration),
    Cron(Cron),
}

impl Entry {
    /// The task id of this entry's `tick`: the same on every worker, so a tick sent by two
    /// schedulers is one task.
    pub fn task_id(&self, tick: Timestamp) -> String {
        let name = format!("taskhost-schedule/{}/{}", self.name, tick.as_millisecond());
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, name.as_bytes()).to_string()
    }
}

impl ScheduleSection {
    pub fn check(&self, name: &str) -> Result<Entry, ScheduleError> {
        let duration = |field: &'static str, value: &toml::Value| {
            parse_duration(value).ok_or_else(|| ScheduleError::Duration {
                name: name.to_owned(),
                field,
                value: serde_json::to_string(value).unwrap_or_default(),
            })
        };
        let when = match (&self.every, &self.cron) {
            (Some(every), None) => When::Every(duration("every", every)?),
            (None, Some(cron)) => {
                let zone = self.timezone.as_deref().unwrap_or("UTC");
                let tz = TimeZone::get(zone).map_err(|_| ScheduleError::TimeZone {
                    name: name.to_owned(),
                    value: zone.to_owned(),
                })?;
                When::Cron(Cron::parse(cron, tz).map_err(|reason| ScheduleError::Cron {
                    name: name.to_owned(),
                    value: cron.clone(),
                    reason,
                })?)
            }
            _ => return Err(ScheduleError::When { name: name.into() }),
        };
        let json = |value: &Option<toml::Value>, empty: Value| match value {
            None => Some(empty),
            Some(v) => serde_json::to_value(v).ok(),
        };
        let args = json(&self.args, Value::Array(Vec::new()));
        let kwargs = json(&self.kwargs, Value::Object(Map::new()));
        let (Some(args @ Value::Array(_)), Some(kwargs @ Value::Object(_))) = (args, kwargs) else {
            return Err(ScheduleError::Arguments { name: name.into() });
        };
        Ok(Entry {
            name: name.to_owned(),
            task: self.task.clone(),
            args,
            kwargs,
            queue: self.queue.clone().unwrap_or_else(|| "celery".into()),
            when,
            expires: self
                .expires
                .as_ref()
                .map(|e| duration("expires", e))
                .transpose()?,
            catch_up: self.catch_up.unwrap_or(true),
        })
    }
}

/// "30s", "5m", "1h", "1d", "250ms", or a number of seconds; more than zero.
pub(super) fn parse_duration(value: &toml::Value) -> Option<Duration> {
    let seconds = match value {
        toml::Value::Integer(n) => *n as f64,
        toml::Value::Float(f) => *f,
        toml::Value::String(text) => {
            let text = text.trim();
            let split = text.find(|c: char| c.is_ascii_alphabetic())?;
            let (number, unit) = text.split_at(split);
            let number: f64 = number.trim().parse().ok()?;
            let scale = match unit {
                "ms" => 0.001,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                "d" => 86400.0,
                _ => return None,
            };
            number * scale
        }
        _ => return None,
    };
    (seconds > 0.0)
        .then(|| Duration::try_from_secs_f64(seconds).ok())
        .flatten()
}

/// How far ahead or behind a search for a tick looks before giving up (a cron naming a day
/// that never comes, such as 30 February).
const SEARCH_DAYS: i32 = 366 * 8;

impl When {
    /// The first tick strictly after `after`.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        match self {
            Self::Every(period) => {
                let period = i64::try_from(period.as_millis()).ok()?.max(1);
                let ms = after.as_millisecond();
                Timestamp::from_millisecond((ms.div_euclid(period) + 1) * period).ok()
            }
            Self::Cron(cron) => cron.next_after(after),
        }
    }

    /// The latest tick at or before `now`, looking no further back than `since` (exclusive):
    /// none if no tick fell in between.
    pub fn latest(&self, since: Timestamp, now: Timestamp) -> Option<Timestamp> {
        match self {
            Self::Every(period) => {
                let period = i64::try_from(period.as_millis()).ok()?.max(1);
                let tick = now.as_millisecond().div_euclid(period) * period;
                let tick = Timestamp::from_millisecond(tick).ok()?;
                (tick > since).then_some(tick)
            }
            Self::Cron(cron) => {
                let mut latest = None;
                let mut at = since;
                // Ticks are walked forward from `since`; bounded, since a worker down for
                // years should not spin here.
                for _ in 0..100_000 {
                    match cron.next_after(at) {
                        Some(tick) if tick <= now => {
                            latest = Some(tick);
                            at = tick;
                        }
                        _ => break,
                    }
                }
                latest
            }
        }
    }

    /// What the entry says, for `schedule list`.
    pub fn describe(&self) -> String {
        match self {
            Self::Every(period) => format!("every {}s", period.as_secs_f64()),
            Self::Cron(cron) => format!("cron {:?} {}", cron.text, cron.zone_name()),
        }
    }
}

/// A five-field cron expression read in a time zone.
#[derive(Debug, Clone, PartialEq)]
pub struct Cron {
    text: String,
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Whether day-of-month / day-of-week were `*` (cron ORs the two only when both are set).
    any_day: bool,
    any_weekday: bool,
    tz: TimeZone,
}

impl Cron {
    pub fn parse(text: &str, tz: TimeZone) -> Result<Self, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields.as_slice() else {
            return Err(format!(
                "needs five fields (minute hour day month weekday), has {}",
                fields.len()
            ));
        };
        let weekdays = field(weekday, 0, 7, "day of week")?;
        Ok(Self {
            text: text.to_owned(),
            minutes: field(minute, 0, 59, "minute")?,
            hours: u32::try_from(field(hour, 0, 23, "hour")?).map_err(|e| e.to_string())?,
            days: u32::try_from(field(day, 1, 31, "day of month")?).map_err(|e| e.to_string())?,
            months: u16::try_from(field(month, 1, 12, "month")?).map_err(|e| e.to_string())?,
            // 7 is Sunday too.
            weekdays: ((weekdays | (weekdays >> 7)) & 0x7f) as u8,
            any_day: *day == "*",
            any_weekday: *weekday == "*",
            tz,
        })
    }

    fn zone_name(&self) -> &str {
        self.tz.iana_name().unwrap_or("UTC")
    }

    fn day_matches(&self, date: Date) -> bool {
        if self.months & (1 << date.month()) == 0 {
            return false;
        }
        let by_day = self.days & (1 << date.day()) != 0;
        let weekday = date.weekday().to_sunday_zero_offset();
        let by_weekday = self.weekdays & (1 << weekday) != 0;
        match (self.any_day, self.any_weekday) {
            (false, false) => by_day || by_weekday,
            _ => by_day && by_weekday,
        }
    }

    /// The first matching minute strictly after `after`.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let start: Zoned = after.to_zoned(self.tz.clone());
        let mut date = start.date();
        for offset in 0..SEARCH_DAYS {
            if self.day_matches(date) {
                let from = (offset == 0).then(|| (start.hour(), start.minute()));
                for hour in 0..24i8 {
                    if self.hours & (1 << hour) == 0 || from.is_some_and(|(h, _)| hour < h) {
                        continue;
                    }
                    for minute in 0..60i8 {
                        if self.minutes & (1 << minute) == 0 {
                            continue;
                        }
                        let civil = DateTime::from_parts(date, time(hour, minute, 0, 0));
                        let Ok(tick) = self.tz.to_ambiguous_timestamp(civil).compatible() else {
                            continue;
                        };
                        if tick > after {
                            return Some(tick);
                        }
                    }
                }
            }
            date = date.tomorrow().ok()?;
        }
        None
    }
}

/// One cron field as a bit set of the values it names: `*`, `5`, `1-5`, `*/15`, `0-30/10`, lists.
fn field(text: &str, min: u32, max: u32, what: &str) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => (
                range,
                step.parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("bad step in {what} {part:?}"))?,
            ),
            None => (part, 1),
        };
        let number = |n: &str| {
            n.parse::<u32>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| format!("{what} {n:?} is not in {min}-{max}"))
        };
        let (low, high) = match range {
            "*" => (min, max),
            _ => match range.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None if step > 1 => (number(range)?, max),
                None => (number(range)?, number(range)?),
            },
        };
        if low > high {
            return Err(format!("{what} range {range:?} runs backwards"));
        }
        for value in (low..=high).step_by(step as usize) {
            bits |= 1 << value;
        }
    }
    Ok(bits)
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
