//! One task's path through the worker, top to bottom: decode → gates → run → one typed
//! outcome → settle. Each step is a function of its own room: `protocol` decodes, [`gates`]
//! admit or stop, the sandbox runs, [`settle`] writes the outcome and moves the message.
//!
//! [`gates`]: super::gates
//! [`settle`]: super::settle

use super::Shared;
use super::canvas::Outbox;
use super::gates::{self, Admitted};
use super::progress::ProgressWriter;
use super::refuse::{self, Refusal};
use super::settle::{self, Ran};
use crate::clock::deadline_ms;
use crate::monitor::metrics::TaskOutcome;
use crate::protocol::event::TaskEvent;
use crate::protocol::{Exception, Meta, State, TaskMessage, exception_document};
use crate::redis::Delivery;
use crate::sandbox::{Scope, Task};
use crate::telemetry::guest::GuestTrace;
use crate::telemetry::span;
use opentelemetry::context::FutureExt as _;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument as _;

/// Handles one delivery; a panic in its handling (a bug in the worker) settles its message
/// (dead-lettered, saying so, with a FAILURE where it has a task id) instead of leaving it in
/// flight, and the worker goes on with the others.
pub(super) async fn handle_guarded(shared: &Shared, delivery: &Delivery) {
    use futures_util::FutureExt as _;
    let handled = std::panic::AssertUnwindSafe(handle(shared, delivery))
        .catch_unwind()
        .await;
    if let Err(panic) = handled {
        let what = super::supervise::panic_text(panic.as_ref());
        panicked(shared, delivery, &what).await;
    }
}

/// Handles one delivery from decode to settlement, under the task's span when tracing is on.
async fn handle(shared: &Shared, delivery: &Delivery) {
    let message = match TaskMessage::decode(&delivery.raw) {
        Ok(message) => message,
        Err(bad) => return refuse::refuse(shared, delivery, &Refusal::Undecodable(&bad)).await,
    };
    let queue = crate::redis::keys::queue_of(&delivery.source);
    match span::task_context(&message, queue, &shared.config.node) {
        Some(cx) => {
            handle_decoded(shared, delivery, &message)
                .with_context(cx.clone())
                .instrument(span::log_span(&cx))
                .await;
            span::end(&cx);
        }
        None => handle_decoded(shared, delivery, &message).await,
    }
}

/// Handles a decoded message: gates, run, settlement.
async fn handle_decoded(shared: &Shared, delivery: &Delivery, message: &TaskMessage) {
    if !message.announced {
        shared
            .monitor
            .events
            .task(&message.id, TaskEvent::Received(message));
    }
    let admitted = match gates::admit(shared, message).await {
        Ok(admitted) => admitted,
        Err(stop) => return settle::stopped(shared, delivery, message, stop).await,
    };
    let started = Instant::now();
    shared.monitor.events.task(&message.id, TaskEvent::Started);
    let outbox = Outbox::new(
        shared.backend.clone(),
        message,
        &admitted.plugin,
        admitted.grants.clone(),
        shared.plugins.registry(),
        shared.queues.subscribe(),
    );
    let outbox = Arc::new(outbox);
    span::started(&admitted.plugin.name, &admitted.plugin.version);
    let ran = run(shared, message, &admitted, outbox.clone()).await;
    span::event("ran", Vec::new);
    let runtime = started.elapsed().as_secs_f64();
    let sent = outbox.take();
    settle::ran(shared, delivery, message, &admitted, ran, runtime, sent).await;
}

/// Runs the task in its plugin's sandbox, unless a revoke with `terminate` stops it first.
async fn run(
    shared: &Shared,
    message: &TaskMessage,
    admitted: &Admitted<'_>,
    outbox: Arc<Outbox>,
) -> Ran {
    let plugin = &admitted.plugin;
    let (soft, hard) = admitted.time_limits;
    let task = task_record(message, soft.map(deadline_ms), &shared.config.node);
    let progress = ProgressWriter::new(
        shared.backend.clone(),
        message.id.clone(),
        message.parent_id.clone(),
        message.group.clone(),
    );
    let scope = Scope {
        plugin: plugin.name.clone(),
        task_name: message.task.clone(),
        task_id: message.id.as_str().into(),
        grants: admitted.grants.clone(),
        progress: Some(Arc::new(progress)),
        outbox: Some(outbox),
        trace: GuestTrace::for_current_task(plugin.name.clone()),
    };
    let terminated = shared.revocations.started(&message.id);
    // A revoke heard after the gates' check and before the line above found nothing running
    // to stop: the task has not started, so it does not.
    if shared.revocations.is_revoked(&message.id) {
        shared.revocations.finished(&message.id);
        return Ran::Revoked;
    }
    let ran = tokio::select! {
        outcome = shared.sandbox.run(&plugin.pre, scope, &task, hard) => match outcome {
            Ok(outcome) => Ran::Finished(outcome),
            Err(full) => Ran::PoolFull(full),
        },
        Ok(()) = terminated => Ran::Terminated,
    };
    shared.revocations.finished(&message.id);
    ran
}

/// The task as the plugin receives it.
pub fn task_record(message: &TaskMessage, soft_deadline_ms: Option<u64>, hostname: &str) -> Task {
    Task {
        id: message.id.clone(),
        name: message.task.clone(),
        args: message.args.get().to_owned(),
        kwargs: message.kwargs.get().to_owned(),
        retries: message.retries,
        root_id: message.root_id.clone(),
        parent_id: message.parent_id.clone(),
        soft_deadline_ms,
        hostname: hostname.to_owned(),
    }
}

/// Settles a delivery whose handling panicked: a FAILURE (`WorkerError`) where the message has
/// a task id and no outcome is stored yet, and the message dead-lettered with the panic's
/// words, so nothing stays in flight to poison the next worker.
async fn panicked(shared: &Shared, delivery: &Delivery, what: &str) {
    let decoded = TaskMessage::decode(&delivery.raw).ok();
    let (task_id, task) = match &decoded {
        Some(m) => (Some(m.id.as_str()), Some(m.task.as_str())),
        None => (None, None),
    };
    let reason =
        format!("the worker failed handling it (a bug in taskhost, please report it): {what}");
    tracing::error!(
        task_id = task_id.unwrap_or("-"),
        task = task.unwrap_or("-"),
        "{reason}"
    );
    let label = super::moved::metrics_label(shared, task);
    shared
        .monitor
        .metrics
        .task(label, TaskOutcome::Failed, None);
    if let Some(id) = task_id {
        let exception = Exception::new("WorkerError", reason.clone());
        let doc = exception_document(
            &Meta::of(id),
            State::Failure,
            &exception,
            crate::clock::now(),
        );
        if let Err(e) = shared.backend.store_unless_ready(id, &doc).await {
            tracing::error!(task_id = id, "cannot store its FAILURE: {e}");
        }
    }
    refuse::dead_letter(shared, delivery, &reason, task_id, task).await;
}
