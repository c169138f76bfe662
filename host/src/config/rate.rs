//! Celery's rate-limit notation (`10/s`, `30/m`, `100/h`, or a bare `N` per second), parsed
//! once wherever a rate comes from: `[tasks."NAME"] rate_limit`, a plugin's declared default,
//! or `celery control rate_limit`.

use std::time::Duration;

/// A rate, tasks per second; always positive and finite.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Rate(f64);

impl TryFrom<String> for Rate {
    type Error = RateError;

    fn try_from(text: String) -> Result<Self, RateError> {
        Self::parse(&text)
    }
}

/// Why a rate does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RateError {
    #[error("invalid rate limit {text:?}: unit {unit:?} is not s, m or h")]
    Unit { text: String, unit: String },
    #[error("invalid rate limit {0:?}: expected a positive number of tasks, like 10/m")]
    Count(String),
}

impl Rate {
    /// Parses Celery's rate strings: `N/s`, `N/m`, `N/h`, or `N` (per second).
    ///
    /// # Errors
    /// When the text is not one of those, or N is not a positive number.
    pub fn parse(text: &str) -> Result<Self, RateError> {
        let (count, per) = text.trim().split_once('/').unwrap_or((text.trim(), "s"));
        let seconds = match per.trim() {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => {
                return Err(RateError::Unit {
                    text: text.to_owned(),
                    unit: other.to_owned(),
                });
            }
        };
        match count.trim().parse::<f64>() {
            Ok(n) if n.is_finite() && n > 0.0 => Ok(Self(n / seconds)),
            _ => Err(RateError::Count(text.to_owned())),
        }
    }

    /// The time between two starts at this rate (saturating for rates too small to space).
    pub fn interval(self) -> Duration {
        Duration::try_from_secs_f64(1.0 / self.0).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_celery_rates() {
        assert_eq!(Rate::parse("10/s"), Ok(Rate(10.0)));
        assert_eq!(Rate::parse("60/m"), Ok(Rate(1.0)));
        assert_eq!(Rate::parse("7200/h"), Ok(Rate(2.0)));
        assert_eq!(Rate::parse("5"), Ok(Rate(5.0)));
        assert!(Rate::parse("10/d").is_err());
        assert!(Rate::parse("-1/s").is_err());
        assert!(Rate::parse("fast").is_err());
    }

    #[test]
    fn spacing_is_the_inverse_of_the_rate() {
        assert_eq!(Rate(4.0).interval(), Duration::from_millis(250));
        assert_eq!(Rate(1e-300).interval(), Duration::MAX);
    }
}
