//! Celery's per-worker task rate limits (`rate_limit = "10/m"`): a task over its rate waits,
//! spaced `1/rate` apart as Celery's token bucket of capacity one spaces them. The limit comes
//! from remote control (`celery control rate_limit`), else the operator's `[tasks."NAME"]`,
//! else the plugin's declared default.

use crate::lock;
use crate::worker::TaskOverrides;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A rate, tasks per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(f64);

/// Parses Celery's rate strings: `N/s`, `N/m`, `N/h`, or `N` (per second).
///
/// # Errors
/// When the text is not one of those, or N is not a positive number.
pub fn parse(text: &str) -> Result<Rate, String> {
    let (count, per) = text.trim().split_once('/').unwrap_or((text.trim(), "s"));
    let seconds = match per.trim() {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "invalid rate limit {text:?}: unit {other:?} is not s, m or h"
            ));
        }
    };
    match count.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok(Rate(n / seconds)),
        _ => Err(format!(
            "invalid rate limit {text:?}: expected a positive number of tasks, like 10/m"
        )),
    }
}

/// The rate limits of one worker.
pub struct RateLimits {
    /// From `[tasks."NAME"] rate_limit`.
    configured: HashMap<String, Rate>,
    /// Set by remote control; `None` lifts the limit.
    set: Mutex<HashMap<String, Option<Rate>>>,
    /// When each limited task may next start.
    next: Mutex<HashMap<String, Instant>>,
}

impl RateLimits {
    /// # Errors
    /// When a configured rate does not parse.
    pub fn new(overrides: &TaskOverrides) -> anyhow::Result<Self> {
        let mut configured = HashMap::new();
        for (task, section) in overrides.iter() {
            if let Some(text) = &section.rate_limit {
                let rate = parse(text).map_err(|e| anyhow::anyhow!("[tasks.{task:?}]: {e}"))?;
                configured.insert(task.clone(), rate);
            }
        }
        Ok(Self {
            configured,
            set: Mutex::new(HashMap::new()),
            next: Mutex::new(HashMap::new()),
        })
    }

    /// Sets or (with `None`) lifts `task`'s limit at run time.
    ///
    /// # Errors
    /// When the rate does not parse.
    pub fn set(&self, task: &str, rate: Option<&str>) -> Result<(), String> {
        let rate = rate.map(parse).transpose()?;
        lock(&self.set).insert(task.to_owned(), rate);
        lock(&self.next).remove(task);
        Ok(())
    }

    /// Takes a start for `task` now, or says how long to wait for one. `declared` is the
    /// plugin's default (an unparsable one is ignored: it was reported when the plugin loaded).
    pub fn acquire(&self, task: &str, declared: Option<&str>) -> Option<Duration> {
        let rate = match lock(&self.set).get(task) {
            Some(set) => *set,
            None => self
                .configured
                .get(task)
                .copied()
                .or_else(|| declared.and_then(|d| parse(d).ok())),
        }?;
        let now = Instant::now();
        let mut next = lock(&self.next);
        let at = next.entry(task.to_owned()).or_insert(now);
        if *at > now {
            return Some(*at - now);
        }
        *at = now + Duration::from_secs_f64(1.0 / rate.0);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_celery_rates() {
        assert_eq!(parse("10/s"), Ok(Rate(10.0)));
        assert_eq!(parse("60/m"), Ok(Rate(1.0)));
        assert_eq!(parse("7200/h"), Ok(Rate(2.0)));
        assert_eq!(parse("5"), Ok(Rate(5.0)));
        assert!(parse("10/d").is_err());
        assert!(parse("-1/s").is_err());
        assert!(parse("fast").is_err());
    }

    #[test]
    fn spaces_starts_and_can_be_lifted() {
        let limits = RateLimits::new(&TaskOverrides::default()).expect("no overrides");
        assert_eq!(limits.acquire("t", None), None);
        assert_eq!(limits.acquire("t", None), None, "no limit, no wait");
        assert_eq!(limits.acquire("t", Some("1/m")), None);
        let wait = limits
            .acquire("t", Some("1/m"))
            .expect("second start waits");
        assert!(wait > Duration::from_secs(55) && wait <= Duration::from_secs(60));
        limits.set("t", None).expect("lift");
        assert_eq!(limits.acquire("t", Some("1/m")), None);
        assert!(limits.set("t", Some("x/y")).is_err());
    }
}
