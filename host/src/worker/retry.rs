//! Celery's retries, decided: the policy (the operator's `[tasks."NAME"]` over the task's
//! declared defaults over Celery's), the exponential backoff, and what a retry request comes
//! to — the next try, with `retries` + 1 and an eta after the countdown, or after the last try
//! a failure with the reason. `settle` carries the decision out.

use crate::config::TaskSection;
use crate::plugins::TaskSpec;
use crate::protocol::time::epoch_ms;
use crate::protocol::trace::TraceContext;
use crate::protocol::{Exception, TaskMessage};
use std::time::Duration;
use time::OffsetDateTime;

/// Celery's default `max_retries`.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// How a task is retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub backoff: f64,
    pub backoff_max: f64,
    pub jitter: bool,
    /// Error kinds that retry the task instead of failing it (Celery's `autoretry_for`).
    pub autoretry_for: Vec<String>,
}

impl RetryPolicy {
    /// The operator's `overrides` over what `spec` declares over Celery's defaults.
    pub fn of(spec: &TaskSpec, overrides: Option<&TaskSection>) -> Self {
        let d = &spec.defaults;
        let o = overrides.cloned().unwrap_or_default();
        Self {
            max_retries: o
                .max_retries
                .or(d.max_retries)
                .unwrap_or(DEFAULT_MAX_RETRIES),
            backoff: o.retry_backoff.or(d.retry_backoff).unwrap_or(1.0),
            backoff_max: o.retry_backoff_max.or(d.retry_backoff_max).unwrap_or(600.0),
            jitter: o.retry_jitter.or(d.retry_jitter).unwrap_or(true),
            autoretry_for: o
                .autoretry_for
                .or_else(|| d.autoretry_for.clone())
                .unwrap_or_default(),
        }
    }
}

/// Celery's exponential backoff: `min(maximum, factor * 2^retries)`, drawn uniformly from
/// `[0, that]` with jitter.
pub fn retry_countdown(retries: u32, factor: f64, maximum: f64, jitter: bool) -> f64 {
    let countdown = (factor * 2f64.powi(i32::try_from(retries.min(62)).unwrap_or(62))).min(maximum);
    let countdown = if countdown.is_finite() {
        countdown.max(0.0)
    } else {
        maximum.max(0.0)
    };
    if jitter {
        fastrand::f64() * countdown
    } else {
        countdown
    }
}

/// What a retry request comes to.
#[derive(Debug)]
pub(super) enum Retry {
    /// Run again: the message of the next try, due at `due_ms` (ms since the epoch; none: at
    /// once), after `countdown` seconds.
    Again {
        next: Vec<u8>,
        due_ms: Option<i64>,
        countdown: f64,
        reason: Exception,
    },
    /// The retries are used up: the task fails with this.
    GiveUp(Exception),
}

/// Decides a retry of `message` (`raw` as fetched) for `reason`, after `countdown` seconds or
/// its backoff; `sender` gives the span that sends the next try, when there is one.
pub(super) fn decide(
    message: &TaskMessage,
    raw: &[u8],
    policy: &RetryPolicy,
    countdown: Option<f64>,
    reason: Exception,
    sender: impl FnOnce() -> Option<TraceContext>,
) -> Retry {
    if message.retries >= policy.max_retries {
        let mut exception = reason;
        exception.message = format!(
            "{} (gave up after {} retries)",
            exception.message, message.retries
        );
        return Retry::GiveUp(exception);
    }
    let countdown = countdown.unwrap_or_else(|| {
        retry_countdown(
            message.retries,
            policy.backoff,
            policy.backoff_max,
            policy.jitter,
        )
    });
    let eta = (countdown > 0.0).then(|| after(countdown));
    Retry::Again {
        next: message.retry_message(raw, eta, sender().as_ref()),
        due_ms: eta.map(epoch_ms),
        countdown,
        reason,
    }
}

/// The time `seconds` from now; the last representable time for a countdown beyond it.
fn after(seconds: f64) -> OffsetDateTime {
    let last = time::macros::datetime!(9999-12-31 23:59:59 UTC);
    Duration::try_from_secs_f64(seconds)
        .ok()
        .and_then(|wait| time::Duration::try_from(wait).ok())
        .and_then(|wait| crate::clock::now().checked_add(wait))
        .unwrap_or(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(retry_countdown(0, 1.0, 600.0, false), 1.0);
        assert_eq!(retry_countdown(3, 1.0, 600.0, false), 8.0);
        assert_eq!(retry_countdown(20, 1.0, 600.0, false), 600.0);
        assert_eq!(retry_countdown(u32::MAX, 2.0, 60.0, false), 60.0);
        for _ in 0..100 {
            let c = retry_countdown(2, 1.0, 600.0, true);
            assert!((0.0..=4.0).contains(&c));
        }
    }

    /// A first-try message with `retries` behind it, decoded, and as sent.
    fn message(retries: u32) -> (TaskMessage, Vec<u8>) {
        let sent = crate::protocol::NewTask {
            id: "t-1".into(),
            task: "demo.retry".into(),
            args: serde_json::json!([]),
            kwargs: serde_json::json!({}),
            queue: "celery".into(),
            priority: 0,
            eta: None,
            expires: None,
            retries,
            ..Default::default()
        }
        .encode("test-host");
        let message = TaskMessage::decode(&sent).expect("decodes");
        (message, sent)
    }

    fn policy(max_retries: u32) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            backoff: 2.0,
            backoff_max: 600.0,
            jitter: false,
            autoretry_for: Vec::new(),
        }
    }

    #[test]
    fn a_retry_publishes_the_next_try_after_its_backoff() {
        let (message, raw) = message(1);
        let Retry::Again {
            next,
            due_ms,
            countdown,
            ..
        } = decide(
            &message,
            &raw,
            &policy(3),
            None,
            Exception::new("OSError", "down"),
            || None,
        )
        else {
            panic!("a retry left");
        };
        assert_eq!(countdown, 4.0, "2 s doubled once");
        let next = TaskMessage::decode(&next).expect("the next try decodes");
        assert_eq!((next.retries, next.parent_id.as_deref()), (2, Some("t-1")));
        let due = due_ms.expect("an eta");
        assert_eq!(next.eta.map(epoch_ms), Some(due));
    }

    #[test]
    fn a_zero_countdown_runs_again_at_once() {
        let (message, raw) = message(0);
        let decided = decide(
            &message,
            &raw,
            &policy(3),
            Some(0.0),
            Exception::new("E", "x"),
            || None,
        );
        assert!(
            matches!(decided, Retry::Again { due_ms: None, .. }),
            "{decided:?}"
        );
    }

    #[test]
    fn the_last_retry_gives_up_with_the_reason() {
        let (message, raw) = message(3);
        let decided = decide(
            &message,
            &raw,
            &policy(3),
            None,
            Exception::new("OSError", "down"),
            || panic!("no next try, so no span sends one"),
        );
        let Retry::GiveUp(exception) = decided else {
            panic!("no retry left: {decided:?}");
        };
        assert_eq!(exception.kind, "OSError");
        assert_eq!(exception.message, "down (gave up after 3 retries)");
    }

    #[test]
    fn a_countdown_past_the_calendar_waits_until_its_end() {
        assert_eq!(after(1e12).year(), 9999);
        assert!(after(1.0) > OffsetDateTime::now_utc());
    }
}
