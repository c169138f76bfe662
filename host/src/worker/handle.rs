//! One task's path through the worker, top to bottom: decode → gates → run → one typed
//! outcome → settle. Each step is a function of its own room: `protocol` decodes, [`gates`]
//! admit or stop, the sandbox runs, [`settle`] writes the outcome and moves the message.
//!
//! [`gates`]: super::gates
//! [`settle`]: super::settle

use super::Shared;
use super::canvas::Outbox;
use super::gates::{self, Admitted};
use super::settle::{self, Ran, Refusal};
use crate::protocol::event::TaskEvent;
use crate::protocol::time::deadline_ms;
use crate::protocol::{Meta, TaskMessage, result_document};
use crate::redis::{Backend, Delivery};
use crate::sandbox::{Progress, ProgressError, Scope, Task};
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

/// Handles one delivery from decode to settlement.
pub(super) async fn handle(shared: &Shared, delivery: &Delivery) {
    let message = match TaskMessage::decode(&delivery.raw) {
        Ok(message) => message,
        Err(bad) => return settle::refuse(shared, delivery, &Refusal::Undecodable(&bad)).await,
    };
    shared
        .events
        .task(&message.id, TaskEvent::Received(&message));
    let admitted = match gates::admit(shared, &message).await {
        Ok(admitted) => admitted,
        Err(stop) => return settle::stopped(shared, delivery, &message, stop).await,
    };
    let started = Instant::now();
    shared.events.task(&message.id, TaskEvent::Started);
    let outbox = Outbox::new(
        shared.backend.clone(),
        &message,
        &admitted.plugin,
        admitted.grants.clone(),
    );
    let outbox = Arc::new(outbox);
    let ran = run(shared, &message, &admitted, outbox.clone()).await;
    let runtime = started.elapsed().as_secs_f64();
    let sent = outbox.take();
    settle::ran(shared, delivery, &message, &admitted, ran, runtime, sent).await;
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
    let progress = ProgressWriter {
        backend: shared.backend.clone(),
        task_id: message.id.clone(),
        parent_id: message.parent_id.clone(),
        group: message.group.clone(),
    };
    let scope = Scope {
        plugin: plugin.name.clone(),
        task_name: message.task.clone(),
        task_id: message.id.as_str().into(),
        grants: admitted.grants.clone(),
        progress: Some(Arc::new(progress)),
        outbox: Some(outbox),
    };
    let terminated = shared.revocations.started(&message.id);
    let ran = tokio::select! {
        outcome = shared.sandbox.run(&plugin.pre, scope, &task, hard) => Ran::Finished(outcome),
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

/// Stores a running task's progress as its state.
struct ProgressWriter {
    backend: Backend,
    task_id: String,
    parent_id: Option<String>,
    group: Option<String>,
}

impl Progress for ProgressWriter {
    fn update(
        &self,
        state: String,
        meta: Value,
    ) -> Pin<Box<dyn Future<Output = Result<(), ProgressError>> + Send + '_>> {
        Box::pin(async move {
            let who = Meta {
                task_id: &self.task_id,
                parent_id: self.parent_id.as_deref(),
                group: self.group.as_deref(),
                children: &[],
            };
            let doc = result_document(&who, &state, &meta, None, time::OffsetDateTime::now_utc());
            self.backend
                .store(&self.task_id, &doc)
                .await
                .map(|_| ())
                .map_err(|e| ProgressError(e.to_string()))
        })
    }
}
