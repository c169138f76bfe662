//! Celery's retries: the policy (the operator's `[tasks."NAME"]` over the task's declared
//! defaults over Celery's), the exponential backoff, and the retry itself — RETRY stored, the
//! next try published with `retries` + 1 (and an eta after the countdown) as this message is
//! settled, in one step; after the last try the task fails with the reason.

use super::Shared;
use super::settle::{failed, moved_or_not};
use crate::config::TaskSection;
use crate::monitor::metrics::TaskOutcome;
use crate::plugins::TaskSpec;
use crate::protocol::event::TaskEvent;
use crate::protocol::time::epoch_ms;
use crate::protocol::{Exception, State, TaskMessage, exception_document};
use crate::redis::{Delivery, retrying};
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

/// Retries `message` for `reason` (after `countdown` seconds, or its backoff), or fails it
/// once its retries are used up.
pub(super) async fn retry(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    policy: &RetryPolicy,
    countdown: Option<f64>,
    reason: Exception,
    runtime: f64,
) {
    if message.retries >= policy.max_retries {
        let mut exception = reason;
        exception.message = format!(
            "{} (gave up after {} retries)",
            exception.message, message.retries
        );
        failed(shared, delivery, message, &exception, Some(runtime)).await;
        return;
    }
    shared
        .metrics
        .task(&message.task, TaskOutcome::Retried, Some(runtime));
    shared.events.task(&message.id, TaskEvent::Retried(&reason));
    let countdown = countdown.unwrap_or_else(|| {
        retry_countdown(
            message.retries,
            policy.backoff,
            policy.backoff_max,
            policy.jitter,
        )
    });
    tracing::info!(
        task_id = %message.id, task = %message.task, retries = message.retries + 1,
        countdown_s = countdown, "task retrying: {}: {}", reason.kind, reason.message
    );
    if !message.ignore_result {
        let doc = exception_document(&message.meta(), State::Retry, &reason);
        retrying("store a result", || shared.backend.store(&message.id, &doc)).await;
    }
    let eta = (countdown > 0.0).then(|| after(countdown));
    let next = message.retry_message(eta);
    let due = eta.map(epoch_ms);
    let moved = retrying("publish a retry", || {
        shared
            .broker
            .ack_and_schedule(delivery, &delivery.source, &next, due)
    })
    .await;
    moved_or_not(shared, moved, delivery);
    if due.is_some() {
        shared.scheduled.notify_one();
    }
}

/// The time `seconds` from now; the last representable time for a countdown beyond it.
fn after(seconds: f64) -> OffsetDateTime {
    let last = time::macros::datetime!(9999-12-31 23:59:59 UTC);
    Duration::try_from_secs_f64(seconds)
        .ok()
        .and_then(|wait| time::Duration::try_from(wait).ok())
        .and_then(|wait| OffsetDateTime::now_utc().checked_add(wait))
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

    #[test]
    fn a_countdown_past_the_calendar_waits_until_its_end() {
        assert_eq!(after(1e12).year(), 9999);
        assert!(after(1.0) > OffsetDateTime::now_utc());
    }
}
