//! A task's spans, named and attributed as `opentelemetry-instrumentation-celery` names a
//! Celery worker's (`run/<task>`, CONSUMER, `celery.*` and `messaging.*` attributes) so
//! dashboards built on Celery's traces read taskhost's the same; and the `apply_async/<task>`
//! PRODUCER span of every message a task sends, whose context the message carries on.
//!
//! The task's span is the current OpenTelemetry context of its handling (the worker attaches
//! it to the handling's future), so the steps along the path add to it without it being
//! passed down. With tracing off there is no current span and every call here returns at once.

use super::tracer;
use crate::protocol::trace::{SpanContext, TraceContext};
use crate::protocol::{Exception, NewTask, TaskMessage, truncate};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;
use std::str::FromStr as _;

/// The longest producer-written text put on a span (a task name, an id): a span is bounded
/// whatever a message says.
const MAX_TEXT: usize = 256;

/// The context of a task's `run/<task>` span, started now under the span that sent the
/// message (a new trace when it names none); none when tracing is off.
pub fn task_context(message: &TaskMessage, queue: &str, node: &str) -> Option<Context> {
    let tracer = tracer()?;
    let parent = message
        .trace
        .as_ref()
        .map_or_else(Context::new, remote_parent);
    let mut attributes = vec![
        KeyValue::new("celery.action", "run"),
        KeyValue::new("celery.task_name", truncate(&message.task, MAX_TEXT)),
        KeyValue::new("messaging.message.id", truncate(&message.id, MAX_TEXT)),
        KeyValue::new("messaging.destination", truncate(queue, MAX_TEXT)),
        KeyValue::new(
            "celery.hostname",
            truncate(message.origin.as_deref().unwrap_or(node), MAX_TEXT),
        ),
    ];
    if message.retries > 0 {
        attributes.push(KeyValue::new("celery.retries", i64::from(message.retries)));
    }
    if let (soft, Some(hard)) = message.time_limit {
        let soft = soft.map_or_else(String::new, |s| s.to_string());
        attributes.push(KeyValue::new(
            "celery.timelimit",
            format!("({hard}, {soft})"),
        ));
    }
    let span = tracer
        .span_builder(format!("run/{}", truncate(&message.task, MAX_TEXT)))
        .with_kind(SpanKind::Consumer)
        .with_attributes(attributes)
        .start_with_context(tracer, &parent);
    Some(parent.with_span(span))
}

/// The task passed its gates and starts in `plugin` (`version`): the plugin on the span, and
/// the `started` event (the time between the span's start and it is the gates').
pub fn started(plugin: &str, version: &str) {
    if let Some(cx) = current() {
        let span = cx.span();
        span.set_attributes([
            KeyValue::new("taskhost.plugin", plugin.to_owned()),
            KeyValue::new("taskhost.plugin.version", version.to_owned()),
        ]);
        span.add_event("started", Vec::new());
    }
}

/// The log span of a task traced as `cx`: its log lines carry the trace's and the task span's
/// ids (`span.trace_id`, `span.span_id` in JSON lines), to find a trace from a log line.
pub fn log_span(cx: &Context) -> tracing::Span {
    let span = cx.span();
    let ids = span.span_context();
    tracing::info_span!("task", trace_id = %ids.trace_id(), span_id = %ids.span_id())
}

/// Ends the span of `cx` now.
pub fn end(cx: &Context) {
    cx.span().end();
}

/// The task's final state (`celery.state`).
pub fn state(state: &str) {
    if let Some(cx) = current() {
        cx.span()
            .set_attribute(KeyValue::new("celery.state", state.to_owned()));
    }
}

/// The task failed with `exception`: ERROR, and the exception recorded as OpenTelemetry's
/// `exception` event (as the Celery instrumentation's `record_exception`).
pub fn failed(exception: &Exception) {
    let Some(cx) = current() else { return };
    let span = cx.span();
    span.set_status(Status::error(format!(
        "{}: {}",
        exception.kind, exception.message
    )));
    let mut attributes = vec![
        KeyValue::new("exception.type", exception.kind.clone()),
        KeyValue::new("exception.message", exception.message.clone()),
    ];
    if let Some(traceback) = &exception.traceback {
        attributes.push(KeyValue::new("exception.stacktrace", traceback.clone()));
    }
    span.add_event("exception", attributes);
}

/// The task asked to be retried, or failed with an exception it retries for.
pub fn retried(reason: &Exception) {
    if let Some(cx) = current() {
        let span = cx.span();
        span.set_attribute(KeyValue::new(
            "celery.retry.reason",
            format!("{}: {}", reason.kind, reason.message),
        ));
    }
}

/// An event on the task's span (`postponed`, …), its attributes made only when traced.
pub fn event(name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
    if let Some(cx) = current() {
        cx.span().add_event(name, attributes());
    }
}

/// The context `task` goes out with, sent by the current span: its `apply_async/<task>`
/// PRODUCER span, started and ended now. None without a current span (tracing off).
/// `task` is the task's name, `id` its id, `queue` where it goes.
pub fn publishing(task: &str, id: &str, queue: &str) -> Option<TraceContext> {
    publish_span(task, id, queue, &current()?)
}

/// The context `task` goes out with when nothing sent it (a schedule's tick): a new trace,
/// whose PRODUCER span ends when the returned closure says whether the message went out.
pub fn publishing_anew(task: &NewTask) -> (Option<TraceContext>, impl FnOnce(bool) + use<>) {
    let span = tracer()
        .map(|tracer| start_publish(tracer, &task.task, &task.id, &task.queue, &Context::new()));
    let trace = span.as_ref().and_then(|s| trace_context(s.span_context()));
    let end = move |sent: bool| {
        if let Some(mut span) = span {
            span.set_attribute(KeyValue::new("taskhost.schedule.sent", sent));
            span.end();
        }
    };
    (trace, end)
}

/// The current task span's place, for what runs apart from the handling (a plugin's `send`).
pub fn current() -> Option<Context> {
    let cx = Context::current();
    cx.has_active_span().then_some(cx)
}

fn publish_span(task: &str, id: &str, queue: &str, parent: &Context) -> Option<TraceContext> {
    let mut span = start_publish(tracer()?, task, id, queue, parent);
    span.end();
    trace_context(span.span_context())
}

/// An `apply_async/<task>` PRODUCER span, started under `parent`.
fn start_publish(
    tracer: &SdkTracer,
    task: &str,
    id: &str,
    queue: &str,
    parent: &Context,
) -> opentelemetry_sdk::trace::Span {
    tracer
        .span_builder(format!("apply_async/{}", truncate(task, MAX_TEXT)))
        .with_kind(SpanKind::Producer)
        .with_attributes([
            KeyValue::new("celery.action", "apply_async"),
            KeyValue::new("celery.task_name", truncate(task, MAX_TEXT)),
            KeyValue::new("messaging.message.id", truncate(id, MAX_TEXT)),
            KeyValue::new("messaging.destination", truncate(queue, MAX_TEXT)),
        ])
        .start_with_context(tracer, parent)
}

/// What a message carries to continue the trace under the span `context` names.
fn trace_context(context: &opentelemetry::trace::SpanContext) -> Option<TraceContext> {
    context.is_valid().then(|| TraceContext {
        parent: SpanContext {
            trace_id: context.trace_id().to_bytes(),
            span_id: context.span_id().to_bytes(),
            sampled: context.is_sampled(),
        },
        state: Some(context.trace_state().header()).filter(|s| !s.is_empty()),
    })
}

/// The span a message names, as a remote parent.
fn remote_parent(trace: &TraceContext) -> Context {
    let state = trace
        .state
        .as_deref()
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    let flags = if trace.parent.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let parent = opentelemetry::trace::SpanContext::new(
        opentelemetry::trace::TraceId::from_bytes(trace.parent.trace_id),
        opentelemetry::trace::SpanId::from_bytes(trace.parent.span_id),
        flags,
        true,
        state,
    );
    Context::new().with_remote_span_context(parent)
}
