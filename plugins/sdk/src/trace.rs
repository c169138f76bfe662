//! Spans of your own inside a task, for the worker's trace: each [`span`] nests under the
//! one open before it, and the first under the task's own span, so a slow task shows where its
//! time went. A span ends when it is dropped.
//!
//! ```no_run
//! use taskhost_sdk::trace;
//!
//! fn score(rows: &[String]) -> usize {
//!     let mut span = trace::span("score rows");
//!     span.set_attribute("rows", rows.len() as i64);
//!     rows.iter()
//!         .map(|row| {
//!             let _parse = trace::span("parse row");
//!             row.len()
//!         })
//!         .sum()
//! }
//! ```
//!
//! The spans go through `wasi:otel/tracing` (0.2.0-rc.2, as Spin and wasmCloud ship it) to the
//! worker, which exports them with its own when it traces and drops them when it does not; a
//! span costs nothing but a check when the task is not traced (and in native tests).

use std::cell::RefCell;

/// An attribute's value: text, a whole number, a number or a boolean.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}

impl Value {
    /// As `wasi:otel` carries values: JSON.
    fn json(&self) -> String {
        match self {
            Self::Text(s) => serde_json::Value::from(s.as_str()).to_string(),
            Self::Int(i) => i.to_string(),
            Self::Float(f) => serde_json::Value::from(*f).to_string(),
            Self::Bool(b) => b.to_string(),
        }
    }
}

/// A span of your own, ended when dropped. Not recording (every method does nothing) when
/// the task is not traced.
#[derive(Debug)]
pub struct Span {
    open: Option<imp::Open>,
}

/// Starts a span named `name` under the span open before it (or the task's).
pub fn span(name: impl Into<String>) -> Span {
    Span {
        open: imp::start(name.into()),
    }
}

/// Runs `f` in a span named `name`: the span ends when `f` returns.
pub fn in_span<T>(name: impl Into<String>, f: impl FnOnce(&mut Span) -> T) -> T {
    let mut span = span(name);
    f(&mut span)
}

impl Span {
    /// Whether what is set on this span goes anywhere (the task is traced and sampled).
    pub fn is_recording(&self) -> bool {
        self.open.is_some()
    }

    /// Sets an attribute (a later value for the same key replaces it).
    pub fn set_attribute(&mut self, key: impl Into<String>, value: impl Into<Value>) -> &mut Self {
        if let Some(open) = &mut self.open {
            let key = key.into();
            let value = value.into().json();
            open.attributes.retain(|(k, _)| *k != key);
            open.attributes.push((key, value));
        }
        self
    }

    /// Records that something happened now, with attributes.
    pub fn add_event(
        &mut self,
        name: impl Into<String>,
        attributes: &[(&str, Value)],
    ) -> &mut Self {
        if let Some(open) = &mut self.open {
            let attributes = attributes
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.json()))
                .collect();
            open.events.push((name.into(), imp::now(), attributes));
        }
        self
    }

    /// Marks the span failed, saying why.
    pub fn set_error(&mut self, description: impl Into<String>) -> &mut Self {
        if let Some(open) = &mut self.open {
            open.error = Some(description.into());
        }
        self
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            imp::end(open);
        }
    }
}

/// An event: its name, when, and its attributes (values as JSON).
type Event = (String, imp::Time, Vec<(String, String)>);

thread_local! {
    /// The ids of the spans open now, innermost last: a new span's parent.
    static OPEN: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::OPEN;
    use crate::otel::wasi::clocks::wall_clock::Datetime;
    use crate::otel::wasi::otel::tracing::{self, SpanContext, SpanData, SpanKind, Status};
    use crate::otel::wasi::otel::types::{InstrumentationScope, KeyValue};

    pub(super) type Time = Datetime;

    #[derive(Debug)]
    pub(super) struct Open {
        context: SpanContext,
        parent: String,
        name: String,
        start: Time,
        pub(super) attributes: Vec<(String, String)>,
        pub(super) events: Vec<super::Event>,
        pub(super) error: Option<String>,
    }

    pub(super) fn now() -> Time {
        let t = wasip2::clocks::wall_clock::now();
        Datetime {
            seconds: t.seconds,
            nanoseconds: t.nanoseconds,
        }
    }

    fn hex(n: u64) -> String {
        format!("{n:016x}")
    }

    pub(super) fn start(name: String) -> Option<Open> {
        let outer = tracing::outer_span_context();
        let sampled = outer.trace_flags.contains(tracing::TraceFlags::SAMPLED);
        if !sampled || outer.trace_id.bytes().all(|b| b == b'0') {
            return None;
        }
        let parent = OPEN
            .with(|open| open.borrow().last().cloned())
            .unwrap_or_else(|| outer.span_id.clone());
        let mut span_id = wasip2::random::random::get_random_u64();
        if span_id == 0 {
            span_id = 1;
        }
        let context = SpanContext {
            trace_id: outer.trace_id,
            span_id: hex(span_id),
            trace_flags: outer.trace_flags,
            is_remote: false,
            trace_state: outer.trace_state,
        };
        tracing::on_start(&context);
        OPEN.with(|open| open.borrow_mut().push(context.span_id.clone()));
        Some(Open {
            context,
            parent,
            name,
            start: now(),
            attributes: Vec::new(),
            events: Vec::new(),
            error: None,
        })
    }

    fn key_values(pairs: Vec<(String, String)>) -> Vec<KeyValue> {
        pairs
            .into_iter()
            .map(|(key, value)| KeyValue { key, value })
            .collect()
    }

    pub(super) fn end(open: Open) {
        OPEN.with(|ids| ids.borrow_mut().retain(|id| *id != open.context.span_id));
        let span = SpanData {
            span_context: open.context,
            parent_span_id: open.parent,
            span_kind: SpanKind::Internal,
            name: open.name,
            start_time: open.start,
            end_time: now(),
            attributes: key_values(open.attributes),
            events: open
                .events
                .into_iter()
                .map(|(name, time, attributes)| tracing::Event {
                    name,
                    time,
                    attributes: key_values(attributes),
                })
                .collect(),
            links: Vec::new(),
            status: match open.error {
                Some(description) => Status::Error(description),
                None => Status::Unset,
            },
            instrumentation_scope: InstrumentationScope {
                name: "taskhost-sdk".into(),
                version: Some(env!("CARGO_PKG_VERSION").into()),
                schema_url: None,
                attributes: Vec::new(),
            },
            dropped_attributes: 0,
            dropped_events: 0,
            dropped_links: 0,
        };
        tracing::on_end(&span);
    }
}

/// Outside WebAssembly (a plugin's `cargo test`) nothing is traced.
#[cfg(not(target_arch = "wasm32"))]
mod imp {
    pub(super) type Time = ();

    #[derive(Debug)]
    pub(super) struct Open {
        pub(super) attributes: Vec<(String, String)>,
        pub(super) events: Vec<super::Event>,
        pub(super) error: Option<String>,
    }

    pub(super) fn now() -> Time {}

    pub(super) fn start(_name: String) -> Option<Open> {
        let _ = &super::OPEN;
        None
    }

    pub(super) fn end(_open: Open) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_traced_task_a_span_records_nothing_and_costs_nothing() {
        let mut span = span("work");
        span.set_attribute("k", 1_i64).set_error("no");
        assert!(!span.is_recording());
        assert!(!in_span("inner", |s| s.is_recording()));
    }

    #[test]
    fn values_go_as_json() {
        assert_eq!(Value::from("a\"b").json(), "\"a\\\"b\"");
        assert_eq!(Value::from(3_i64).json(), "3");
        assert_eq!(Value::from(1.5).json(), "1.5");
        assert_eq!(Value::from(true).json(), "true");
    }
}
