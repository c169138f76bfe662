//! The last step of a task's path: its outcome written where Celery's clients look (the result
//! backend), counted (metrics), announced (events), logged, and its message taken out of the
//! in-flight list — acknowledged, postponed to the delayed set, published again as a retry, or
//! dead-lettered. Every message that reaches the worker leaves through one of these.

use super::Shared;
use super::canvas::{self, FollowUps, Sent};
use super::gates::{Admitted, Stop, Wait};
use super::retry::{self, Retry, RetryPolicy};
use crate::monitor::metrics::TaskOutcome;
use crate::protocol::event::TaskEvent;
use crate::protocol::{Exception, Meta, RevokeReason, State, TaskMessage, Undecodable};
use crate::protocol::{exception_document, result_document};
use crate::redis::deadletter::{self, Origin};
use crate::redis::keys::queue_of;
use crate::redis::settle::Outgoing;
use crate::redis::{Delivery, RedisError, retrying};
use crate::sandbox::{Outcome, PoolFull};
use serde_json::value::RawValue;

/// How a run ended: the sandbox's outcome, stopped by a revoke, or no instance to start in.
pub(super) enum Ran {
    Finished(Outcome),
    Terminated,
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
    sent: Sent,
) {
    let log = |outcome: &str| log_outcome(message, admitted, runtime, outcome);
    let outcome = match ran {
        Ran::Finished(outcome) => outcome,
        Ran::Terminated => {
            push_now(shared, sent).await;
            return revoked(shared, delivery, message, RevokeReason::Terminated).await;
        }
        // It never started, so it waits its turn in the delayed set like a task over its
        // plugin's max_instances, instead of failing for the worker's want of room.
        Ran::PoolFull(full) => {
            shared.metrics.limit_hit(&admitted.plugin.name, "pool");
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
                shared.metrics.limit_hit(&admitted.plugin.name, limit);
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
    sent: Sent,
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
        .metrics
        .task(&message.task, TaskOutcome::Succeeded, Some(runtime));
    shared
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
    sent: Sent,
) {
    tracing::warn!(task_id = %message.id, task = %message.task, "{}: {}", exception.kind, exception.message);
    shared
        .metrics
        .task(&message.task, TaskOutcome::Failed, runtime);
    shared
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
    shared.metrics.task(label, TaskOutcome::Revoked, None);
    shared.events.task(&message.id, TaskEvent::Revoked(reason));
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
            time::OffsetDateTime::now_utc(),
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
        .settle(
            &message.id,
            document,
            state == State::Success,
            delivery,
            follow.publish,
        )
        .await;
    for (group_id, token) in completed {
        canvas::cleanup(shared, &group_id, &token).await;
    }
}

/// Publishes what a task sent now, when its message is not acknowledged with a result (a
/// retry, a reject, a terminate).
async fn push_now(shared: &Shared, sent: Sent) {
    publish(shared, "publish the tasks a task sent", &sent.publish).await;
}

/// Publishes `messages` now, retrying while Redis is away. A message whose queue key holds
/// another type is dead-lettered alone (the others were pushed); one Redis refuses to the
/// ACL user is said so (the worker then stops). Neither is tried again: the task settles on.
async fn publish(shared: &Shared, what: &str, messages: &[Outgoing]) {
    if messages.is_empty() {
        return;
    }
    match retrying(what, || shared.broker.push(messages)).await {
        Ok(refused) => {
            for message in refused.into_iter().filter_map(|i| messages.get(i)) {
                let reason = format!(
                    "cannot push onto {:?}: the key holds another type than a queue list \
                     (WRONGTYPE)",
                    message.key
                );
                tracing::error!(queue = %message.key, "{reason}; the message is dead-lettered");
                let entry = deadletter::unpushed_entry(message, &reason, &shared.config.node);
                if let Err(e) = retrying("dead-letter a message", || {
                    shared.broker.add_dead_letter(&entry)
                })
                .await
                {
                    tracing::error!("cannot dead-letter it either ({e}): it is lost");
                }
            }
        }
        Err(e) => {
            let queues: Vec<&str> = messages.iter().map(|m| m.key.as_str()).collect();
            tracing::error!(?queues, "cannot {what} (Redis refuses it for good): {e}");
        }
    }
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
    let (next, due_ms, countdown, reason) =
        match retry::decide(message, &delivery.raw, policy, countdown, reason) {
            Retry::GiveUp(exception) => {
                let sent = Sent::default();
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
        .metrics
        .task(&message.task, TaskOutcome::Retried, Some(runtime));
    shared.events.task(&message.id, TaskEvent::Retried(&reason));
    tracing::info!(
        task_id = %message.id, task = %message.task, retries = message.retries + 1,
        countdown_s = countdown, "task retrying: {}: {}", reason.kind, reason.message
    );
    if !message.ignore_result {
        let doc = exception_document(&message.meta(), State::Retry, &reason);
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

/// A message that cannot be run.
pub(super) enum Refusal<'a> {
    Undecodable(&'a Undecodable),
    NotRegistered(&'a TaskMessage),
    Rejected {
        message: &'a TaskMessage,
        plugin: &'a str,
        reason: String,
    },
}

impl Refusal<'_> {
    fn message(&self) -> Option<&TaskMessage> {
        match self {
            Self::Undecodable(_) => None,
            Self::NotRegistered(m) | Self::Rejected { message: m, .. } => Some(m),
        }
    }

    fn task_id(&self) -> Option<&str> {
        match self {
            Self::Undecodable(bad) => bad.task_id.as_deref(),
            Self::NotRegistered(m) | Self::Rejected { message: m, .. } => Some(&m.id),
        }
    }

    fn task(&self) -> Option<&str> {
        match self {
            Self::Undecodable(bad) => bad.task_name.as_deref(),
            Self::NotRegistered(m) | Self::Rejected { message: m, .. } => Some(&m.task),
        }
    }

    /// The exception the task fails with, and the reason the dead-letter entry gives.
    fn explain(&self) -> (Exception, String) {
        match self {
            Self::Undecodable(bad) => {
                let reason = format!("undecodable message: {}", bad.error);
                (Exception::new("DecodeError", reason.clone()), reason)
            }
            Self::NotRegistered(m) => (
                Exception::new("NotRegistered", m.task.clone()),
                format!("task {:?} is not served by any plugin", m.task),
            ),
            Self::Rejected { plugin, reason, .. } => (
                Exception::new("Reject", reason.clone()),
                format!("rejected by plugin {plugin}: {reason}"),
            ),
        }
    }
}

/// Fails the refused task where the message has a task id (so a waiting producer gets an
/// answer), and moves the message to the dead-letter list with the reason.
pub(super) async fn refuse(shared: &Shared, delivery: &Delivery, refusal: &Refusal<'_>) {
    let (task_id, task) = (refusal.task_id(), refusal.task());
    let (exception, reason) = refusal.explain();
    if let Some(id) = task_id {
        let doc = exception_document(&Meta::of(id), State::Failure, &exception);
        let stored = retrying("store a result", || shared.backend.store(id, &doc)).await;
        if let Err(e) = stored {
            tracing::error!(task_id = id, "cannot store the refused task's FAILURE: {e}");
        }
    }
    if let Some(message) = refusal.message() {
        // A refused task fails its chain, chord and errbacks as a failed one does, so no
        // workflow waits on it forever.
        let mut follow = canvas::after_failure(shared, message, &exception).await;
        let result = exception.to_json().to_string();
        canvas::chord_part(shared, message, State::Failure, &result, &mut follow).await;
        publish(
            shared,
            "publish what follows a refused task",
            &follow.publish,
        )
        .await;
        for (group_id, token) in follow.completed {
            canvas::cleanup(shared, &group_id, &token).await;
        }
    }
    tracing::error!(
        task_id = task_id.unwrap_or("-"), task = task.unwrap_or("-"),
        queue = %queue_of(&delivery.source),
        "message dead-lettered to {}: {reason}", crate::redis::keys::DEAD
    );
    if let Some(id) = task_id {
        let rejected = matches!(refusal, Refusal::Rejected { .. });
        shared.events.task(
            id,
            TaskEvent::Refused {
                exception: &exception,
                rejected,
            },
        );
    }
    dead_letter(shared, delivery, &reason, task_id, task).await;
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
    dead_letter(
        shared,
        delivery,
        &reason,
        Some(&message.id),
        Some(&message.task),
    )
    .await;
    false
}

/// Moves `delivery`'s message to the dead-letter list, saying `reason`, and counts its task
/// as rejected.
pub(super) async fn dead_letter(
    shared: &Shared,
    delivery: &Delivery,
    reason: &str,
    task_id: Option<&str>,
    task: Option<&str>,
) {
    shared
        .metrics
        .task(metrics_label(shared, task), TaskOutcome::Rejected, None);
    let origin = Origin {
        reason,
        task_id,
        task,
        source: &delivery.source,
        worker: &shared.config.node,
    };
    let entry = deadletter::entry(&delivery.raw, &origin);
    let moved = retrying("dead-letter a message", || {
        shared.broker.dead_letter(delivery, &entry)
    })
    .await;
    if moved_or_not(shared, "dead-letter a message", moved, delivery) {
        shared.metrics.dead_lettered();
        trim_dead_letters(shared).await;
    }
}

/// Keeps the dead-letter list within `[worker] dead_letter_max`.
async fn trim_dead_letters(shared: &Shared) {
    let max = shared.config.dead_letter_max;
    match deadletter::trim(&mut shared.broker.connection(), max).await {
        Ok(0) => {}
        Ok(dropped) => tracing::warn!(
            dropped,
            "dead-letter list over dead_letter_max ({max}): the oldest entries were dropped"
        ),
        Err(e) => tracing::warn!("cannot trim the dead-letter list: {e}"),
    }
}

/// Whether the step `what` moved the message out of the in-flight list; if not, it was gone
/// (another worker returned it) or Redis refused the step for good, and it stays for recovery.
fn moved_or_not(
    shared: &Shared,
    what: &str,
    moved: Result<bool, RedisError>,
    delivery: &Delivery,
) -> bool {
    match moved {
        Ok(true) => true,
        Ok(false) => {
            shared.metrics.settle_skipped();
            tracing::warn!(
                queue = %queue_of(&delivery.source),
                "a message this worker settled was no longer in its in-flight list (another \
                 worker returned it): nothing was moved"
            );
            false
        }
        Err(e) => {
            tracing::error!(
                "cannot {what} (Redis refuses it for good), so the message stays in flight: {e}"
            );
            false
        }
    }
}

/// The `task` label of a task that may not be served: its name only when a plugin serves it,
/// since names from producers are unbounded.
fn metrics_label<'a>(shared: &Shared, task: Option<&'a str>) -> &'a str {
    task.filter(|t| shared.plugins.registry().resolve(t).is_some())
        .unwrap_or("(unregistered)")
}
