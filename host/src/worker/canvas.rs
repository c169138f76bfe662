//! What follows a task in Celery's canvas, worked out as the task settles: on success its
//! callbacks and next chain step (given the result); on failure the chain steps it dooms and
//! its errbacks (given its id); for a chord part, its share of the chord's count, the last part
//! calling the body with every result in header order or failing it with a ChordError. Chord
//! sizes and doomed states are written here; the messages go out with the task's
//! acknowledgement (`commit`), so a task that runs again after a crash sends them again rather
//! than never.

use super::Shared;
use crate::config::Grants;
use crate::plugins::{Plugin, Registry};
use crate::protocol::canvas::{self, CanvasError, Origin, Routes as _, Step};
use crate::protocol::signature::task_names;
use crate::protocol::{
    Exception, Meta, PartOutcome, State, TaskMessage, exception_document, parse, pyrepr,
};
use crate::redis::chord::{Joined, Part};
use crate::redis::keys::queue_key;
use crate::redis::settle::Outgoing;
use crate::redis::{Backend, RedisError, retrying};
use crate::sandbox::SendError;
use crate::telemetry::span;
use opentelemetry::context::FutureExt as _;
use serde_json::Value;
use serde_json::value::RawValue;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

/// The most messages one task may send through `send` (a group counts each member).
const MAX_SENT: usize = 10_000;

/// The queue of a signature that names none: Celery's `task_default_queue`.
const DEFAULT_QUEUE: &str = "celery";

/// What a settling task sends on.
#[derive(Default)]
pub(super) struct FollowUps {
    /// Published with the acknowledgement.
    pub publish: Vec<Outgoing>,
    /// The result tuples recorded as the task's `children`.
    pub children: Vec<Value>,
    /// The chords this task completed (group id, claim token): cleaned up once their bodies
    /// are out.
    pub completed: Vec<(String, String)>,
}

impl FollowUps {
    /// Adds `more`: what the task itself sent, say.
    pub fn add(&mut self, more: FollowUps) {
        self.publish.extend(more.publish);
        self.children.extend(more.children);
        self.completed.extend(more.completed);
    }
}

/// Runs a step on keys a producer named (a chain step's result, a chord's counters), retrying
/// while Redis is away. When Redis refuses it for good (one of those keys holds another type,
/// or an ACL forbids it), the step is skipped and said so, and the task settles on: one broken
/// workflow never holds a worker's slot. None then.
async fn workflow_step<T, F: Future<Output = Result<T, RedisError>>>(
    what: &str,
    id: &str,
    op: impl FnMut() -> F,
) -> Option<T> {
    match retrying(what, op).await {
        Ok(value) => Some(value),
        Err(e) => {
            tracing::error!(
                id,
                "cannot {what}, so it is skipped (Redis refuses it for good): {e}"
            );
            None
        }
    }
}

/// The queues the loaded plugins' tasks declared.
impl canvas::Routes for Registry {
    fn declared_queue(&self, task: &str) -> Option<&str> {
        self.resolve(task)?.1.defaults.queue.as_deref()
    }
}

fn origin<'a>(routes: &'a Registry, parent_id: &'a str, root_id: &'a str) -> Origin<'a> {
    Origin {
        parent_id: Some(parent_id),
        root_id: Some(root_id),
        default_queue: DEFAULT_QUEUE,
        routes,
        now: crate::clock::now(),
    }
}

fn root_of(message: &TaskMessage) -> &str {
    message.root_id.as_deref().unwrap_or(&message.id)
}

/// The callbacks and next chain step of a task that succeeded with `result`.
pub(super) async fn after_success(
    shared: &Shared,
    message: &TaskMessage,
    result: &RawValue,
) -> Result<FollowUps, CanvasError> {
    let embed = &message.embed;
    let mut follow = FollowUps::default();
    if embed.callbacks.is_empty() && embed.chain.is_empty() {
        return Ok(follow);
    }
    let mut steps = Vec::new();
    let routes = shared.plugins.registry();
    let origin = origin(&routes, &message.id, root_of(message));
    follow.children = canvas::succeeded(embed, &parse(result), &origin, &mut steps)?;
    carry_out(&shared.backend, steps, &mut follow.publish).await;
    Ok(follow)
}

/// What a failed task takes down with it, as Celery's `mark_as_failure`: every later chain
/// step (a chord part among them counted as failed), then its errbacks, sent its id.
pub(super) async fn after_failure(
    shared: &Shared,
    message: &TaskMessage,
    exception: &Exception,
) -> FollowUps {
    let mut follow = FollowUps::default();
    let root_id = root_of(message);
    fail_chain(
        shared,
        &message.embed.chain,
        exception,
        root_id,
        &mut follow,
    )
    .await;
    let routes = shared.plugins.registry();
    let origin = origin(&routes, &message.id, root_id);
    send_errbacks(shared, &message.embed.errbacks, &origin, &mut follow).await;
    follow
}

/// Celery's `_fail_chain`: every chain step after a failure stores it, a chord part among
/// them counted as failed in its chord.
async fn fail_chain(
    shared: &Shared,
    chain: &[Value],
    exception: &Exception,
    root_id: &str,
    follow: &mut FollowUps,
) {
    let failure = exception.to_json().to_string();
    for doomed in canvas::doomed(chain) {
        let meta = Meta {
            group: doomed.group_id.as_deref(),
            ..Meta::of(&doomed.task_id)
        };
        let doc = exception_document(&meta, State::Failure, exception, crate::clock::now());
        let store = || shared.backend.store(&doomed.task_id, &doc);
        workflow_step("store a failed chain step", &doomed.task_id, store).await;
        if let (Some(body), Some(group_id)) = (&doomed.chord, &doomed.group_id) {
            let part = Part {
                group_id,
                task_id: &doomed.task_id,
                index: doomed.group_index,
                state: State::Failure.as_str(),
                result: &failure,
            };
            part_returned(shared, &part, body, root_id, follow).await;
        }
    }
}

/// Counts a chord part that ended in `state` with `result` (JSON text), after its state is
/// stored and before its message is acknowledged; a part that runs again is counted once.
pub(super) async fn chord_part(
    shared: &Shared,
    message: &TaskMessage,
    state: State,
    result: &str,
    follow: &mut FollowUps,
) {
    let (Some(body), Some(group_id)) = (&message.embed.chord, &message.group) else {
        return;
    };
    let part = Part {
        group_id,
        task_id: &message.id,
        index: message.group_index,
        state: state.as_str(),
        result,
    };
    part_returned(shared, &part, body, root_of(message), follow).await;
}

/// Deletes a completed chord's data once its body is out.
pub(super) async fn cleanup(shared: &Shared, group_id: &str, token: &str) {
    let clean = || shared.backend.chord_cleanup(group_id, token);
    let Some(cleaned) = workflow_step("clean up a chord", group_id, clean).await else {
        return;
    };
    if !cleaned {
        tracing::warn!(
            group_id,
            "chord claim lapsed before cleanup: its data is left to expire"
        );
    }
}

/// Counts `part`; when it completes its chord, calls the body or fails it. Boxed: a failed
/// body may itself be a part of an enclosing chord.
fn part_returned<'a>(
    shared: &'a Shared,
    part: &'a Part<'a>,
    body: &'a Value,
    root_id: &'a str,
    follow: &'a mut FollowUps,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        let count = || shared.backend.chord_part_return(part);
        let joined = workflow_step("count a chord part", part.group_id, count).await;
        let Some(Joined::Claimed { parts, token }) = joined else {
            return;
        };
        follow.completed.push((part.group_id.to_owned(), token));
        let routes = shared.plugins.registry();
        let origin = origin(&routes, part.task_id, root_id);
        let called = match join(&parts) {
            Ok(results) => {
                let mut steps = Vec::new();
                canvas::apply(body, vec![Value::Array(results)], &origin, &mut steps)
                    .map(|_| steps)
                    .map_err(|e| ChordFailure {
                        error: Exception::new("ChordError", format!("Callback error: {e}")),
                        nested: false,
                    })
            }
            Err(failed) => Err(failed),
        };
        match called {
            Ok(steps) => carry_out(&shared.backend, steps, &mut follow.publish).await,
            Err(ChordFailure { error, nested }) => {
                tracing::warn!(group_id = part.group_id, "chord failed: {}", error.message);
                body_failed(shared, body, &error, !nested, root_id, follow).await;
                let forget = || shared.backend.drop_chord_size(part.group_id);
                workflow_step("forget a failed chord's size", part.group_id, forget).await;
            }
        }
    })
}

/// Why a chord's body is not called.
struct ChordFailure {
    /// The ChordError the body fails with.
    error: Exception,
    /// The failed part was itself a chord that failed: its errbacks were sent already.
    nested: bool,
}

/// The header's results in order, or the ChordError naming the first part that failed.
fn join(parts: &[String]) -> Result<Vec<Value>, ChordFailure> {
    let mut results = Vec::with_capacity(parts.len());
    for text in parts {
        let part = PartOutcome::parse(text).map_err(|e| ChordFailure {
            error: Exception::new("ChordError", format!("Join error: {e}")),
            nested: false,
        })?;
        if part.failed() {
            let (kind, message) = part.exception();
            let error = Exception::new(
                "ChordError",
                format!(
                    "Dependency {} raised {}",
                    part.task_id,
                    pyrepr::exception_repr(kind, message)
                ),
            );
            return Err(ChordFailure {
                error,
                nested: kind == "ChordError",
            });
        }
        results.push(part.result);
    }
    Ok(results)
}

/// Celery's `chord_error_from_stack`: the body's result is the ChordError, the chain after it
/// fails too, and the body's errbacks are sent its id — unless the failure is a nested
/// chord's, whose errbacks fired already: each failure fires errbacks once, at the innermost
/// chord (Celery #9107). A body that is itself a part of an enclosing chord is counted there
/// as failed, so the enclosing chord fails instead of waiting forever.
async fn body_failed(
    shared: &Shared,
    body: &Value,
    error: &Exception,
    errbacks: bool,
    root_id: &str,
    follow: &mut FollowUps,
) {
    let options = body.get("options").unwrap_or(&Value::Null);
    let Some(body_id) = options.get("task_id").and_then(Value::as_str) else {
        return;
    };
    let meta = Meta {
        group: options.get("group_id").and_then(Value::as_str),
        ..Meta::of(body_id)
    };
    let doc = exception_document(&meta, State::Failure, error, crate::clock::now());
    let store = || shared.backend.store(body_id, &doc);
    workflow_step("store a chord body's failure", body_id, store).await;
    if let Some(Value::Array(chain)) = options.get("chain") {
        fail_chain(shared, chain, error, root_id, follow).await;
    }
    if errbacks {
        let errbacks = match options.get("link_error") {
            Some(Value::Array(items)) => items.clone(),
            Some(one @ Value::Object(_)) => vec![one.clone()],
            _ => Vec::new(),
        };
        let routes = shared.plugins.registry();
        let origin = origin(&routes, body_id, root_id);
        send_errbacks(shared, &errbacks, &origin, follow).await;
    }
    let enclosing = options.get("chord").filter(|c| c.is_object());
    if let (Some(outer), Some(group_id)) = (enclosing, meta.group) {
        let failure = error.to_json().to_string();
        let part = Part {
            group_id,
            task_id: body_id,
            index: options.get("group_index").and_then(Value::as_u64),
            state: State::Failure.as_str(),
            result: &failure,
        };
        part_returned(shared, &part, outer, root_id, follow).await;
    }
}

async fn send_errbacks(
    shared: &Shared,
    errbacks: &[Value],
    origin: &Origin<'_>,
    follow: &mut FollowUps,
) {
    let Some(failed_id) = origin.parent_id else {
        return;
    };
    let mut steps = Vec::new();
    match canvas::errbacks(errbacks, failed_id, origin, &mut steps) {
        Ok(()) => carry_out(&shared.backend, steps, &mut follow.publish).await,
        Err(e) => tracing::error!(task_id = failed_id, "errbacks not sent: {e}"),
    }
}

/// Carries out `steps` in order: chord sizes written now, messages kept for the
/// acknowledgement (which follows, so every size is written before its last header task).
async fn carry_out(backend: &Backend, steps: Vec<Step>, publish: &mut Vec<Outgoing>) {
    let origin = crate::node::origin();
    for step in steps {
        match step {
            Step::ChordSize { group_id, size } => {
                let write = || backend.set_chord_size(&group_id, size);
                workflow_step("write a chord's size", &group_id, write).await;
            }
            Step::Publish(mut task) => {
                task.trace = span::publishing(&task.task, &task.id, &task.queue);
                publish.push(Outgoing {
                    key: queue_key(&task.queue, task.priority),
                    raw: task.encode(&origin),
                });
            }
        }
    }
}

/// What a running task sends through `send`: applied at once (chord sizes written), the
/// messages kept until the task settles and published with its acknowledgement.
pub(super) struct Outbox {
    backend: Backend,
    parent_id: String,
    root_id: String,
    /// The names the plugin serves, which it may send without a grant.
    own: Vec<String>,
    grants: Arc<Grants>,
    /// The queues tasks declared, as loaded when the task started.
    routes: Arc<Registry>,
    /// The queues the worker consumes, where what the task sends may go unless its grants
    /// name others (`send_queues`); read only when it sends.
    consumed: tokio::sync::watch::Receiver<Vec<String>>,
    /// What the task sent so far: messages to publish, and their result tuples for its
    /// `children`.
    sent: Mutex<FollowUps>,
    /// The task's span, which sends what it sends (none when tracing is off).
    span: Option<opentelemetry::Context>,
}

impl Outbox {
    /// The outbox of `message`, run by `plugin` under `grants`; what it sends may go to the
    /// queues `grants` names, else to `consumed` (the queues the worker consumes).
    pub(super) fn new(
        backend: Backend,
        message: &TaskMessage,
        plugin: &Plugin,
        grants: Arc<Grants>,
        routes: Arc<Registry>,
        consumed: tokio::sync::watch::Receiver<Vec<String>>,
    ) -> Self {
        Self {
            consumed,
            backend,
            parent_id: message.id.clone(),
            root_id: root_of(message).to_owned(),
            own: plugin.tasks.iter().map(|t| t.name.clone()).collect(),
            grants,
            routes,
            sent: Mutex::new(FollowUps::default()),
            span: span::current(),
        }
    }

    /// Refuses a signature naming a task the plugin neither serves nor was granted.
    fn check(&self, signature: &Value) -> Result<(), SendError> {
        let refused: Vec<String> = task_names(signature)
            .into_iter()
            .filter(|name| !self.own.contains(name) && !self.grants.may_send(name))
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        Err(SendError(format!(
            "not granted: {} (a plugin sends its own tasks; others need `allow_send` in its \
             [plugins] section)",
            refused.join(", ")
        )))
    }

    /// Refuses a signature any of whose messages would go to a queue the operator did not
    /// allow this plugin (`send_queues`), whether it names the queue or its task declared it.
    fn check_queues(&self, signature: &Value) -> Result<(), SendError> {
        let consumed = self.consumed.borrow();
        let allowed = self.grants.send_queues.as_ref().unwrap_or(&consumed);
        for sig in crate::protocol::signature::signatures(signature) {
            let named = sig
                .get("options")
                .and_then(|o| o.get("queue"))
                .and_then(Value::as_str);
            let is_task = sig.get("subtask_type").and_then(Value::as_str).is_none();
            let task = sig.get("task").and_then(Value::as_str).unwrap_or_default();
            let queue = match named {
                Some(queue) => queue,
                None if is_task => self.routes.declared_queue(task).unwrap_or(DEFAULT_QUEUE),
                None => continue,
            };
            if !allowed.iter().any(|q| q == queue) {
                return Err(SendError(format!(
                    "queue {queue:?} is not one this plugin may send to (it may send to {}; the \
                     operator allows queues in its [plugins] section's send_queues)",
                    allowed.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// What was sent so far, taken.
    pub(super) fn take(&self) -> FollowUps {
        std::mem::take(&mut *crate::lock(&self.sent))
    }
}

impl crate::sandbox::Outbox for Outbox {
    fn send(
        &self,
        signature: Value,
    ) -> Pin<Box<dyn Future<Output = Result<String, SendError>> + Send + '_>> {
        Box::pin(async move {
            let signature =
                crate::protocol::signature::for_a_plugin(signature).map_err(SendError)?;
            self.check(&signature)?;
            self.check_queues(&signature)?;
            let origin = origin(&self.routes, &self.parent_id, &self.root_id);
            let mut steps = Vec::new();
            let applied = canvas::apply(&signature, Vec::new(), &origin, &mut steps)
                .map_err(|e| SendError(e.to_string()))?;
            let count = steps
                .iter()
                .filter(|s| matches!(s, Step::Publish(_)))
                .count();
            if crate::lock(&self.sent).publish.len() + count > MAX_SENT {
                return Err(SendError(format!(
                    "a task may send at most {MAX_SENT} messages"
                )));
            }
            let id = applied.id().to_owned();
            let mut publish = Vec::new();
            // The plugin's call runs apart from the task's handling: its span is set again.
            match &self.span {
                Some(cx) => {
                    carry_out(&self.backend, steps, &mut publish)
                        .with_context(cx.clone())
                        .await
                }
                None => carry_out(&self.backend, steps, &mut publish).await,
            }
            let mut sent = crate::lock(&self.sent);
            sent.publish.append(&mut publish);
            sent.children.push(applied.into_tuple());
            Ok(id)
        })
    }
}
