//! The host side of `wasi:otel/tracing` (0.2.0-rc.2, as Spin and wasmCloud ship it; wasmtime
//! has none): a plugin's own spans, handed to the task's trace (`telemetry::guest`), which
//! decides what of them is kept. Always linked, so a plugin that makes spans loads whether or
//! not the worker traces; without tracing its spans go nowhere and its outer span is the
//! invalid (all-zero, unsampled) context, which the SDKs take for "not recording".

use super::TaskState;
use crate::telemetry::guest::{GuestEvent, GuestSpan};
use std::time::{Duration, SystemTime};

mod bindings {
    wasmtime::component::bindgen!({
        world: "tracing",
        path: "../wit/otel",
        imports: { default: async | tracing },
        with: {
            "wasi:clocks/wall-clock": wasmtime_wasi::p2::bindings::clocks::wall_clock,
        },
    });
}

use bindings::wasi::otel::{tracing, types};
use wasmtime::component::{HasSelf, Linker};

/// Links `wasi:otel/tracing` (its `wall-clock` is wasmtime-wasi's, linked with the rest of
/// WASI).
pub(super) fn add_to_linker(linker: &mut Linker<TaskState>) -> wasmtime::Result<()> {
    tracing::add_to_linker::<TaskState, HasSelf<TaskState>>(linker, |state| state)?;
    types::add_to_linker::<TaskState, HasSelf<TaskState>>(linker, |state| state)
}

impl types::Host for TaskState {}

impl tracing::Host for TaskState {
    async fn on_start(&mut self, context: tracing::SpanContext) {
        if let Some(trace) = &self.scope.trace {
            trace.started(&context.trace_id, &context.span_id);
        }
    }

    async fn on_end(&mut self, span: tracing::SpanData) {
        if let Some(trace) = &self.scope.trace {
            trace.ended(guest_span(span));
        }
    }

    async fn outer_span_context(&mut self) -> tracing::SpanContext {
        let (trace_id, span_id, sampled) = match &self.scope.trace {
            Some(trace) => trace.outer(),
            None => ("0".repeat(32), "0".repeat(16), false),
        };
        tracing::SpanContext {
            trace_id,
            span_id,
            trace_flags: if sampled {
                tracing::TraceFlags::SAMPLED
            } else {
                tracing::TraceFlags::empty()
            },
            is_remote: false,
            trace_state: Vec::new(),
        }
    }
}

fn time(t: wasmtime_wasi::p2::bindings::clocks::wall_clock::Datetime) -> SystemTime {
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::new(t.seconds, t.nanoseconds.min(999_999_999)))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn pairs(kvs: Vec<types::KeyValue>) -> Vec<(String, String)> {
    kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
}

/// The record as the telemetry room takes it.
fn guest_span(span: tracing::SpanData) -> GuestSpan {
    use opentelemetry::trace::SpanKind;
    GuestSpan {
        trace_id: span.span_context.trace_id,
        span_id: span.span_context.span_id,
        parent_span_id: span.parent_span_id,
        kind: match span.span_kind {
            tracing::SpanKind::Client => SpanKind::Client,
            tracing::SpanKind::Server => SpanKind::Server,
            tracing::SpanKind::Producer => SpanKind::Producer,
            tracing::SpanKind::Consumer => SpanKind::Consumer,
            tracing::SpanKind::Internal => SpanKind::Internal,
        },
        name: span.name,
        start: time(span.start_time),
        end: time(span.end_time),
        attributes: pairs(span.attributes),
        events: span
            .events
            .into_iter()
            .map(|e| GuestEvent {
                name: e.name,
                time: time(e.time),
                attributes: pairs(e.attributes),
            })
            .collect(),
        links: span
            .links
            .into_iter()
            .map(|l| {
                (
                    l.span_context.trace_id,
                    l.span_context.span_id,
                    pairs(l.attributes),
                )
            })
            .collect(),
        status: match span.status {
            tracing::Status::Unset => None,
            tracing::Status::Ok => Some(Ok(())),
            tracing::Status::Error(description) => Some(Err(description)),
        },
        scope: span.instrumentation_scope.name,
        scope_version: span.instrumentation_scope.version,
    }
}
