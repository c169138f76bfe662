//! Spans a plugin makes of its own (`wasi:otel/tracing`), taken in under its task's span.
//! A plugin names ids, times and sizes; the host decides: a span goes only into its
//! task's trace, under that task's span or a span the plugin started in the same task, within
//! the task's run, and cut to bounded sizes; at most [`MAX_SPANS`] per task. What is refused is
//! counted (`taskhost_trace_spans_dropped_total{reason="refused"}`), never an error of the task.

use crate::protocol::truncate;
use opentelemetry::trace::{
    Event, Link, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Spans a plugin may start in one task.
pub const MAX_SPANS: usize = 1_000;
/// Attributes kept per span, per event and per link; the rest are counted as dropped.
const MAX_ATTRIBUTES: usize = 64;
/// Events and links kept per span.
const MAX_EVENTS: usize = 64;
const MAX_LINKS: usize = 16;
/// The longest name, key or scope kept, in characters; and the longest value.
const MAX_NAME: usize = 256;
const MAX_VALUE: usize = 4_096;

/// A span as a plugin reports it when it ends (the WIT record, read by the sandbox).
#[derive(Debug, Clone)]
pub struct GuestSpan {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub kind: SpanKind,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Keys and values; values as `wasi:otel` encodes them (JSON).
    pub attributes: Vec<(String, String)>,
    pub events: Vec<GuestEvent>,
    pub links: Vec<GuestLink>,
    /// None: unset; `Ok`: ok; `Err(description)`: error.
    pub status: Option<Result<(), String>>,
    pub scope: String,
    pub scope_version: Option<String>,
}

/// A span linked to: its trace id, span id (hex), and the link's attributes.
pub type GuestLink = (String, String, Vec<(String, String)>);

#[derive(Debug, Clone)]
pub struct GuestEvent {
    pub name: String,
    pub time: SystemTime,
    pub attributes: Vec<(String, String)>,
}

/// Where one task's plugin spans go: under its span, into the export queue.
pub struct GuestTrace {
    outer: SpanContext,
    plugin: Arc<str>,
    began: SystemTime,
    /// Spans the plugin started in this task (at most [`MAX_SPANS`]), and whether each ended.
    started: Mutex<HashMap<SpanId, bool>>,
}

impl std::fmt::Debug for GuestTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestTrace")
            .field("outer", &self.outer)
            .finish_non_exhaustive()
    }
}

impl GuestTrace {
    /// The trace of the task running now (under the current span); none when tracing is off.
    pub fn for_current_task(plugin: Arc<str>) -> Option<Arc<Self>> {
        let cx = super::span::current()?;
        let outer = cx.span().span_context().clone();
        // Tracing is on only where the export queue is; none is made for nothing.
        super::batcher()?;
        outer.is_valid().then(|| {
            Arc::new(Self {
                outer,
                plugin,
                began: SystemTime::now(),
                started: Mutex::new(HashMap::new()),
            })
        })
    }

    /// The span a plugin's spans go under: (trace id, span id, sampled), ids in hex.
    pub fn outer(&self) -> (String, String, bool) {
        (
            self.outer.trace_id().to_string(),
            self.outer.span_id().to_string(),
            self.outer.is_sampled(),
        )
    }

    /// The plugin started a span: kept if it is in the task's trace, new, and within the
    /// count. One that is not is refused when it ends (and counted once, then).
    pub fn started(&self, trace_id: &str, span_id: &str) {
        if TraceId::from_hex(trace_id).ok() != Some(self.outer.trace_id()) {
            return;
        }
        let Some(id) = SpanId::from_hex(span_id)
            .ok()
            .filter(|id| *id != SpanId::INVALID)
        else {
            return;
        };
        let mut started = crate::lock(&self.started);
        if started.len() < MAX_SPANS {
            started.entry(id).or_insert(false);
        }
    }

    /// The plugin ended a span: exported if it was started in this task, in its trace, under
    /// the task's span or another of its own, when the task is sampled.
    pub fn ended(&self, span: GuestSpan) {
        let id = SpanId::from_hex(&span.span_id).unwrap_or(SpanId::INVALID);
        let parent = SpanId::from_hex(&span.parent_span_id).unwrap_or(SpanId::INVALID);
        let (known, parent_ok) = {
            let mut started = crate::lock(&self.started);
            let parent_ok =
                parent == self.outer.span_id() || (parent != id && started.contains_key(&parent));
            // Ended once: a second end of the same span is refused.
            let known = started
                .get_mut(&id)
                .is_some_and(|ended| !std::mem::replace(ended, true));
            (known, parent_ok)
        };
        let trace_ok = TraceId::from_hex(&span.trace_id).ok() == Some(self.outer.trace_id());
        if !(known && trace_ok && parent_ok) {
            return self
                .refuse("a span ended that was not started in its task, or under another trace");
        }
        if !self.outer.is_sampled() {
            return;
        }
        let Some(batcher) = super::batcher() else {
            return;
        };
        batcher.offer(self.span_data(span, id, parent));
    }

    fn refuse(&self, why: &str) {
        if let Some(batcher) = super::batcher() {
            batcher.counts().refused();
        }
        tracing::debug!(plugin = %self.plugin, "plugin span refused: {why}");
    }

    /// The span as the exporter takes it, in bounds and in the task's time.
    fn span_data(&self, span: GuestSpan, id: SpanId, parent: SpanId) -> SpanData {
        let now = SystemTime::now();
        let clamp = |t: SystemTime| t.clamp(self.began, now);
        let start = clamp(span.start);
        let end = clamp(span.end).max(start);
        let (mut attributes, dropped_attributes_count) = key_values(&span.attributes);
        attributes.push(KeyValue::new("taskhost.plugin", self.plugin.to_string()));
        let mut events = SpanEvents::default();
        for event in span.events.iter().take(MAX_EVENTS) {
            let (attributes, dropped) = key_values(&event.attributes);
            events.events.push(Event::new(
                truncate(&event.name, MAX_NAME),
                clamp(event.time),
                attributes,
                dropped,
            ));
        }
        events.dropped_count = count(span.events.len().saturating_sub(MAX_EVENTS));
        let mut links = SpanLinks::default();
        for (trace_id, span_id, attrs) in span.links.iter().take(MAX_LINKS) {
            let (Ok(trace_id), Ok(span_id)) =
                (TraceId::from_hex(trace_id), SpanId::from_hex(span_id))
            else {
                links.dropped_count += 1;
                continue;
            };
            let context = SpanContext::new(
                trace_id,
                span_id,
                TraceFlags::default(),
                true,
                TraceState::default(),
            );
            let (attributes, dropped) = key_values(attrs);
            links.links.push(Link::new(context, attributes, dropped));
        }
        links.dropped_count += count(span.links.len().saturating_sub(MAX_LINKS));
        let status = match span.status {
            None => Status::Unset,
            Some(Ok(())) => Status::Ok,
            Some(Err(description)) => Status::error(truncate(&description, MAX_VALUE)),
        };
        let scope = InstrumentationScope::builder(truncate(&span.scope, MAX_NAME))
            .with_version(
                span.scope_version
                    .map(|v| truncate(&v, MAX_NAME))
                    .unwrap_or_default(),
            )
            .build();
        SpanData {
            span_context: SpanContext::new(
                self.outer.trace_id(),
                id,
                self.outer.trace_flags(),
                false,
                self.outer.trace_state().clone(),
            ),
            parent_span_id: parent,
            parent_span_is_remote: false,
            span_kind: span.kind,
            name: truncate(&span.name, MAX_NAME).into(),
            start_time: start,
            end_time: end,
            attributes,
            dropped_attributes_count,
            events,
            links,
            status,
            instrumentation_scope: scope,
        }
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The first [`MAX_ATTRIBUTES`] pairs, keys and values cut to their bounds, and how many more.
fn key_values(pairs: &[(String, String)]) -> (Vec<KeyValue>, u32) {
    let kept = pairs
        .iter()
        .take(MAX_ATTRIBUTES)
        .map(|(k, v)| KeyValue::new(truncate(k, MAX_NAME), value(v)))
        .collect();
    (kept, count(pairs.len().saturating_sub(MAX_ATTRIBUTES)))
}

/// A `wasi:otel` value (JSON text): a string, number or boolean as itself, anything else
/// (arrays, objects, text that is not JSON) as its text, cut to [`MAX_VALUE`].
fn value(json: &str) -> Value {
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(serde_json::Value::String(s)) => Value::from(truncate(&s, MAX_VALUE)),
        Ok(serde_json::Value::Bool(b)) => Value::from(b),
        Ok(serde_json::Value::Number(n)) => match n.as_i64() {
            Some(i) => Value::from(i),
            None => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        _ => Value::from(truncate(json, MAX_VALUE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_read_as_wasi_otel_encodes_them_and_cut() {
        assert_eq!(value("\"text\""), Value::from("text"));
        assert_eq!(value("42"), Value::from(42_i64));
        assert_eq!(value("1.5"), Value::from(1.5));
        assert_eq!(value("true"), Value::from(true));
        assert_eq!(value("not json"), Value::from("not json"));
        let long = format!("\"{}\"", "x".repeat(10 * MAX_VALUE));
        let Value::String(cut) = value(&long) else {
            panic!("a string")
        };
        assert!(cut.as_str().chars().count() <= MAX_VALUE + 1);
        let many: Vec<(String, String)> = (0..100).map(|i| (format!("k{i}"), "1".into())).collect();
        let (kept, dropped) = key_values(&many);
        assert_eq!((kept.len(), dropped), (MAX_ATTRIBUTES, 36));
    }
}
