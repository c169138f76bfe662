//! Messages that leave without running: refused ones (undecodable, not served, rejected by
//! their plugin), tasks lost with the workers that ran them, and moving a message to the
//! dead-letter list (through `dead_letters.rs`, as every dead letter goes). Each still ends in a result where it has an id: a FAILURE saying why, with its chain,
//! chord and errbacks failed as for any failed task, so no producer or workflow waits forever.

use super::Shared;
use super::canvas;
use super::moved::{metrics_label, moved_or_not, publish};
use crate::monitor::metrics::TaskOutcome;
use crate::protocol::event::TaskEvent;
use crate::protocol::{Exception, Meta, State, TaskMessage, Undecodable, exception_document};
use crate::redis::keys::queue_of;
use crate::redis::{Delivery, Stored, retrying};

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
    shared
        .monitor
        .metrics
        .task(metrics_label(shared, task), TaskOutcome::Rejected, None);
    crate::telemetry::span::failed(&exception);
    crate::telemetry::span::state(if matches!(refusal, Refusal::Rejected { .. }) {
        "REJECTED"
    } else {
        State::Failure.as_str()
    });
    fail_unrun(shared, task_id, refusal.message(), &exception).await;
    tracing::error!(
        task_id = task_id.unwrap_or("-"), task = task.unwrap_or("-"),
        queue = %queue_of(&delivery.source),
        "message dead-lettered to {}: {reason}", crate::redis::keys::DEAD
    );
    if let Some(id) = task_id {
        let rejected = matches!(refusal, Refusal::Rejected { .. });
        shared.monitor.events.task(
            id,
            TaskEvent::Refused {
                exception: &exception,
                rejected,
            },
        );
    }
    dead_letter(shared, delivery, &reason, task_id, task).await;
}

/// Fails a task that will not run: stores its FAILURE where the message has a task id (so a
/// waiting producer gets an answer, never over a stored SUCCESS), and fails its chain, chord
/// and errbacks as a failed task does, so no workflow waits on it forever.
async fn fail_unrun(
    shared: &Shared,
    task_id: Option<&str>,
    message: Option<&TaskMessage>,
    exception: &Exception,
) {
    if let Some(id) = task_id {
        let doc = exception_document(
            &Meta::of(id),
            State::Failure,
            exception,
            crate::clock::now(),
        );
        match retrying("store a result", || shared.backend.store(id, &doc)).await {
            // A SUCCESS was stored already: the task ran, and its workflow went on.
            Ok(Stored::KeptSuccess) => return,
            // Stored, or a REVOKED kept: either way the task did not run, and its workflow
            // fails with it.
            Ok(Stored::Written | Stored::KeptOther) => {}
            Err(e) => tracing::error!(task_id = id, "cannot store the task's FAILURE: {e}"),
        }
    }
    if let Some(message) = message {
        let mut follow = canvas::after_failure(shared, message, exception).await;
        let result = exception.to_json().to_string();
        canvas::chord_part(shared, message, State::Failure, &result, &mut follow).await;
        publish(
            shared,
            "publish what follows a failed task",
            &follow.publish,
        )
        .await;
        for (group_id, token) in follow.completed {
            canvas::cleanup(shared, &group_id, &token).await;
        }
    }
}

/// Fails the task of a message crash recovery dead-lettered (it was returned from more workers
/// that died running it than `--max-redeliveries` allows), as Celery fails a task whose
/// worker process died: `WorkerLostError`.
pub(super) async fn fail_lost(shared: &Shared, raw: &[u8]) {
    let message = match TaskMessage::decode(raw) {
        Ok(message) => message,
        // No id to answer: the dead-letter entry is all there is.
        Err(_) => return,
    };
    let exception = Exception::new(
        "WorkerLostError",
        format!(
            "the workers that ran it died, {} times over: the task was dead-lettered \
             (taskhost dead show) and is not run again",
            shared.config.max_redeliveries + 1
        ),
    );
    tracing::error!(task_id = %message.id, task = %message.task, "{}", exception.message);
    shared.monitor.events.task(
        &message.id,
        TaskEvent::Refused {
            exception: &exception,
            rejected: false,
        },
    );
    fail_unrun(shared, Some(&message.id), Some(&message), &exception).await;
}

/// Moves `delivery`'s message to the dead-letter list, saying `reason`. The caller counts the
/// task's outcome: refused, or failed as it ran.
pub(super) async fn dead_letter(
    shared: &Shared,
    delivery: &Delivery,
    reason: &str,
    task_id: Option<&str>,
    task: Option<&str>,
) {
    let moved = retrying("dead-letter a message", || {
        shared.dead_letters.message(delivery, reason, task_id, task)
    })
    .await;
    moved_or_not(shared, "dead-letter a message", moved, delivery);
}
