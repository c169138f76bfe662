//! The last step of a task's path: its outcome written where Celery's clients look (the result
//! backend), counted (metrics), announced (events), logged, and its message taken out of the
//! in-flight list — acknowledged, postponed to the delayed set, published again as a retry, or
//! dead-lettered (`refuse.rs`: messages that leave without running). Every message that
//! reaches the worker leaves through one of these.

use super::Shared;
use super::canvas::{self, FollowUps};
use super::gates::{Admitted, Stop, Wait};
use super::moved::{metrics_label, moved_or_not, publish};
use super::refuse::{self, Refusal, refuse};
use super::retry::{self, Retry, RetryPolicy};
use crate::monitor::metrics::TaskOutcome;
use crate::protocol::event::TaskEvent;
use crate::protocol::{Exception, Meta, RevokeReason, State, TaskMessage};
use crate::protocol::{exception_document, result_document};
use crate::redis::{Delivery, retrying};
use crate::sandbox::{Outcome, PoolFull};
use crate::telemetry::span;
use opentelemetry::KeyValue;
use serde_json::value::RawValue;

/// How a run ended: the sandbox's outcome, stopped by a revoke, or no instance to start in.
pub(super) enum Ran {
    Finished(Outcome),
    Terminated,
    /// Revoked after its gates, before it started: it does not.
    Revoked,
    PoolFull(PoolFull),
}

/// Settles the task `admitted` ran, by its outcome; `runtime` in seconds. What the task sent
/// goes out with its acknowledgement when it succeeds or fails, else before its message moves.
pub(super) async fn ran(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    admitted: &Admitted<'_>,
    ran: Ran,
    runtime: f64,
    sent: FollowUps,
) {
    let log = |outcome: &str| log_outcome(message, admitted, runtime, outcome);
    let outcome = match ran {
        Ran::Finished(outcome) => outcome,
        Ran::Terminated => {
            push_now(shared, sent).await;
            return revoked(shared, delivery, message, RevokeReason::Terminated).await;
        }
        Ran::Revoked => {
            return revoked(shared, delivery, message, RevokeReason::Revoked).await;
        }
        // It never started, so it waits its turn in the delayed set like a task over its
        // plugin's max_instances, instead of failing for the worker's want of room.
        Ran::PoolFull(full) => {
            shared
                .monitor
                .metrics
                .limit_hit(&admitted.plugin.name, "pool");
            tracing::warn!(task_id = %message.id, task = %message.task, "{full}; task postponed");
            return stopped(shared, delivery, message, super::gates::pool_full()).await;
        }
    };
    match outcome {
        Outcome::Success(result) => {
            log("succeeded");
            succeeded(shared, delivery, message, &result, runtime, sent).await;
        }
        Outcome::Failure(failure) => {
            if let Some(limit) = failure.kind.limit() {
                shared
                    .monitor
                    .metrics
                    .limit_hit(&admitted.plugin.name, limit);
            }
            let policy = policy(shared, message, admitted);
            if policy.autoretry_for.contains(&failure.exception.kind) {
                push_now(shared, sent).await;
                let reason = failure.exception;
                retry(shared, delivery, message, &policy, None, reason, runtime).await;
            } else {
                log("failed");
                let exception = &failure.exception;
                failed(shared, delivery, message, exception, Some(runtime), sent).await;
            }
        }
        Outcome::Retry { countdown, reason } => {
            push_now(shared, sent).await;
            let policy = policy(shared, message, admitted);
            retry(
                shared, delivery, message, &policy, countdown, reason, runtime,
            )
            .await;
        }
        Outcome::Reject(reason) => {
            push_now(shared, sent).await;
            log("rejected");
            let plugin = &admitted.plugin.name;
            let refusal = Refusal::Rejected {
                message,
                plugin,
                reason,
            };
            refuse(shared, delivery, &refusal).await;
        }
    }
}

fn log_outcome(message: &TaskMessage, admitted: &Admitted<'_>, runtime: f64, outcome: &str) {
    let plugin = &admitted.plugin;
    tracing::info!(
        task_id = %message.id, task = %message.task, plugin = %plugin.name,
        version = %plugin.version, runtime_s = runtime, "task {outcome}"
    );
}

/// The retry policy of `message`: its plugin's declaration under the operator's overrides.
fn policy(shared: &Shared, message: &TaskMessage, admitted: &Admitted<'_>) -> RetryPolicy {
    let overrides = shared.config.task_overrides.get(&message.task);
    RetryPolicy::of(&admitted.spec, overrides)
}

/// Settles a task the gates stopped.
pub(super) async fn stopped(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    stop: Stop,
) {
    match stop {
        Stop::Postpone { due_ms, wait } => {
            postpone(shared, delivery, message, due_ms, wait).await;
            match wait {
                Wait::Eta => {
                    tracing::debug!(task_id = %message.id, task = %message.task, "scheduled for its eta")
                }
                Wait::RateLimit(wait) => {
                    tracing::debug!(task_id = %message.id, wait_s = wait.as_secs_f64(), "task over its rate limit; rescheduled")
                }
                Wait::FleetRateLimit(wait) => {
                    tracing::debug!(task_id = %message.id, wait_s = wait.as_secs_f64(), "task over its fleet rate limit; rescheduled")
                }
                Wait::MaxInstances => {
                    tracing::debug!(task_id = %message.id, task = %message.task, "plugin at max_instances; task rescheduled")
                }
                Wait::PoolFull => {}
            }
        }
        Stop::Revoke(reason) => revoked(shared, delivery, message, reason).await,
        Stop::NotRegistered => refuse(shared, delivery, &Refusal::NotRegistered(message)).await,
    }
}

async fn succeeded(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    result: &RawValue,
    runtime: f64,
    sent: FollowUps,
) {
    let mut follow = match canvas::after_success(shared, message, result).await {
        Ok(follow) => follow,
        Err(e) => {
            // Celery fails a task whose callbacks cannot be sent; so does taskhost, saying why.
            let exception = Exception::new("InvalidTaskError", format!("canvas: {e}"));
            return failed(shared, delivery, message, &exception, Some(runtime), sent).await;
        }
    };
    follow.add(sent);
    shared
        .monitor
        .metrics
        .task(&message.task, TaskOutcome::Succeeded, Some(runtime));
    shared
        .monitor
        .events
        .task(&message.id, TaskEvent::Succeeded { result, runtime });
    finish(
        shared,
        delivery,
        message,
        State::Success,
        result,
        None,
        follow,
    )
    .await;
}

/// Stores a FAILURE and settles the message with what the task sent; `runtime` if it ran.
async fn failed(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    exception: &Exception,
    runtime: Option<f64>,
    sent: FollowUps,
) {
    tracing::warn!(task_id = %message.id, task = %message.task, "{}: {}", exception.kind, exception.message);
    span::failed(exception);
    shared
        .monitor
        .metrics
        .task(&message.task, TaskOutcome::Failed, runtime);
    shared
        .monitor
        .events
        .task(&message.id, TaskEvent::Failed(exception));
    let mut follow = canvas::after_failure(shared, message, exception).await;
    follow.add(sent);
    finish(
        shared,
        delivery,
        message,
        State::Failure,
        &exception.to_json(),
        exception.traceback.as_deref(),
        follow,
    )
    .await;
}

/// Stores Celery's REVOKED result (`TaskRevokedError(reason)`) and settles the message.
async fn revoked(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    reason: RevokeReason,
) {
    let what = match reason {
        RevokeReason::Expired => "expired before it ran",
        RevokeReason::Revoked => "revoked before it ran",
        RevokeReason::Terminated => "terminated by a revoke",
    };
    tracing::info!(task_id = %message.id, task = %message.task, "task {what}: REVOKED");
    // Revoked and expired tasks are settled before their plugin is looked up.
    let label = metrics_label(shared, Some(&message.task));
    shared
        .monitor
        .metrics
        .task(label, TaskOutcome::Revoked, None);
    shared
        .monitor
        .events
        .task(&message.id, TaskEvent::Revoked(reason));
    let exception = reason.exception();
    finish(
        shared,
        delivery,
        message,
        State::Revoked,
        &exception.to_json(),
        None,
        FollowUps::default(),
    )
    .await;
}

/// Stores the task's final state (unless the producer asked to ignore its result), counts it
/// in its chord, and acknowledges its message with what follows it, through the group commit.
async fn finish<R: serde::Serialize + ?Sized>(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    state: State,
    result: &R,
    traceback: Option<&str>,
    mut follow: FollowUps,
) {
    span::state(state.as_str());
    let meta = Meta {
        children: &follow.children,
        ..message.meta()
    };
    let mut document = (!message.ignore_result).then(|| {
        result_document(
            &meta,
            state.as_str(),
            result,
            traceback,
            crate::clock::now(),
        )
    });
    if message.embed.chord.is_some() {
        // A chord part is counted once its state is stored (the body may read it at once).
        if let Some(doc) = document.take()
            && !store_or_dead_letter(shared, delivery, message, &doc).await
        {
            return;
        }
        let result = serde_json::to_string(result).unwrap_or_else(|_| "null".into());
        canvas::chord_part(shared, message, state, &result, &mut follow).await;
    }
    let completed = std::mem::take(&mut follow.completed);
    shared
        .settler
        .settle(&message.id, document, delivery, follow.publish)
        .await;
    for (group_id, token) in completed {
        canvas::cleanup(shared, &group_id, &token).await;
    }
}

/// Publishes what a task sent now, when its message is not acknowledged with a result (a
/// retry, a reject, a terminate).
async fn push_now(shared: &Shared, sent: FollowUps) {
    publish(shared, "publish the tasks a task sent", &sent.publish).await;
}

/// Moves `delivery`'s message to the delayed set until `due_ms` (retrying until Redis takes
/// it), marked as announced, and wakes the mover.
async fn postpone(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    due_ms: i64,
    wait: Wait,
) {
    span::event("postponed", || {
        vec![
            KeyValue::new("taskhost.postponed.reason", wait.reason()),
            KeyValue::new("taskhost.postponed.due_ms", due_ms),
        ]
    });
    let held = message.postponed_message(&delivery.raw);
    let moved = retrying(wait.step(), || {
        shared
            .broker
            .ack_and_schedule(delivery, &delivery.source, &held, Some(due_ms))
    })
    .await;
    moved_or_not(shared, wait.step(), moved, delivery);
    shared.scheduled.notify_one();
}

/// Carries out a retry of `message` for `reason`: RETRY stored, then the next try published
/// as this message is settled, in one step; or, with no retry left, the task failed.
async fn retry(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    policy: &RetryPolicy,
    countdown: Option<f64>,
    reason: Exception,
    runtime: f64,
) {
    let queue = crate::redis::keys::queue_of(&delivery.source);
    let sender = || span::publishing(&message.task, &message.id, queue);
    let (next, due_ms, countdown, reason) =
        match retry::decide(message, &delivery.raw, policy, countdown, reason, sender) {
            Retry::GiveUp(exception) => {
                let sent = FollowUps::default();
                return failed(shared, delivery, message, &exception, Some(runtime), sent).await;
            }
            Retry::Again {
                next,
                due_ms,
                countdown,
                reason,
            } => (next, due_ms, countdown, reason),
        };
    shared
        .monitor
        .metrics
        .task(&message.task, TaskOutcome::Retried, Some(runtime));
    shared
        .monitor
        .events
        .task(&message.id, TaskEvent::Retried(&reason));
    span::retried(&reason);
    span::state(State::Retry.as_str());
    tracing::info!(
        task_id = %message.id, task = %message.task, retries = message.retries + 1,
        countdown_s = countdown, "task retrying: {}: {}", reason.kind, reason.message
    );
    if !message.ignore_result {
        let doc = exception_document(&message.meta(), State::Retry, &reason, crate::clock::now());
        if !store_or_dead_letter(shared, delivery, message, &doc).await {
            return;
        }
    }
    let moved = retrying("publish a retry", || {
        shared
            .broker
            .ack_and_schedule(delivery, &delivery.source, &next, due_ms)
    })
    .await;
    if moved_or_not(shared, "publish a retry", moved, delivery) && due_ms.is_some() {
        shared.scheduled.notify_one();
    }
}
/// Stores `doc` as `message`'s state, retrying while Redis is away; false if it cannot (the
/// caller stops). A result key of another type dead-letters the message, so the task stalls
/// nothing; an ACL refusal (which stops the worker) leaves it in flight for recovery.
async fn store_or_dead_letter(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    doc: &str,
) -> bool {
    let store = || shared.backend.store(&message.id, doc);
    let Err(e) = retrying("store a result", store).await else {
        return true;
    };
    if e.refusal().is_some() {
        tracing::error!(task_id = %message.id, "cannot store the state, the message stays in flight: {e}");
        return false;
    }
    let reason = format!("cannot store the task's state: {e}");
    tracing::error!(task_id = %message.id, task = %message.task, "{reason}; its message is dead-lettered");
    refuse::dead_letter(
        shared,
        delivery,
        &reason,
        Some(&message.id),
        Some(&message.task),
    )
    .await;
    false
}
