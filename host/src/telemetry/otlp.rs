//! A batch of finished spans as the OTLP/HTTP protobuf body a collector takes
//! (`ExportTraceServiceRequest`), written straight from the SDK's span data, and the exporter
//! that posts it.
//!
//! Written by hand rather than through `opentelemetry-otlp`: its exporter first copies every
//! span into the generated protobuf structs (a `String` per attribute, a hash per span to
//! group them), which cost a traced worker a few microseconds of CPU per task. The fields and
//! their numbers follow `opentelemetry/proto/trace/v1/trace.proto` and what
//! `opentelemetry-proto` 0.33 sends (the span flags' remote bits included); the tests decode
//! the body with `opentelemetry-proto`.

use super::http;
use ::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri};
use bytes::Bytes;
use opentelemetry::trace::{SpanContext, SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, Key, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use std::time::{Duration, Instant, SystemTime};

/// The most of a refusing collector's reply put in the warning (its words, not ours).
const MAX_REASON: usize = 256;
/// The pause before the first retry of a batch; each after doubles it.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// Posts each batch to the collector's traces endpoint, again while the collector is
/// briefly away (unreachable, 429, 502, 503, 504: OTLP's transient failures) until the export
/// timeout is spent: the export thread spends at most one timeout on a batch.
#[derive(Debug)]
pub struct OtlpExporter {
    timeout: Duration,
    endpoint: Uri,
    headers: HeaderMap,
    resource: Resource,
}

impl OtlpExporter {
    /// An exporter posting to `endpoint` with `headers`, each post within `timeout`.
    ///
    /// # Errors
    /// The endpoint is not a URI, or a header's name or value cannot go in an HTTP request
    /// (the value is not named: it is often a secret).
    pub fn new(
        endpoint: &str,
        headers: &[(String, String)],
        timeout: Duration,
        resource: Resource,
    ) -> anyhow::Result<Self> {
        let endpoint: Uri = endpoint
            .parse()
            .map_err(|e| anyhow::anyhow!("the OTLP endpoint {endpoint:?}: {e}"))?;
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            let bad = || anyhow::anyhow!("the OTLP header {name:?} cannot be sent over HTTP");
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
            let value = HeaderValue::from_str(value).map_err(|_| bad())?;
            map.append(name, value);
        }
        Ok(Self {
            timeout,
            endpoint,
            headers: map,
            resource,
        })
    }
}

impl SpanExporter for OtlpExporter {
    // Blocking inside: it runs on the export thread, under `block_on`, never on the runtime.
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let failed = OTelSdkError::InternalFailure;
        let body = Bytes::from(encode(&self.resource, &batch));
        let mut request = Request::post(self.endpoint.clone())
            .header("content-type", "application/x-protobuf")
            .body(body)
            .map_err(|e| failed(e.to_string()))?;
        request.headers_mut().extend(self.headers.clone());
        let deadline = Instant::now() + self.timeout;
        let mut pause = FIRST_RETRY;
        loop {
            let failure = match http::post(&request, deadline) {
                Ok(reply) if reply.status().is_success() => return Ok(()),
                Ok(reply) => {
                    let failure = format!(
                        "the collector answered {}: {}",
                        reply.status(),
                        reason(reply.body())
                    );
                    if !transient(reply.status()) {
                        return Err(failed(failure));
                    }
                    failure
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() + pause >= deadline {
                return Err(failed(failure));
            }
            std::thread::sleep(pause);
            pause *= 2;
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.clone();
    }
}

/// A refusal worth trying again (OTLP/HTTP's list): the collector is busy or restarting.
fn transient(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

/// A collector's reply body, readable and short enough for one log line.
fn reason(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_REASON)
        .collect()
}

/// The `ExportTraceServiceRequest` of `spans` from `resource`: one `ResourceSpans`, a
/// `ScopeSpans` per instrumentation scope in the order they first appear.
pub fn encode(resource: &Resource, spans: &[SpanData]) -> Vec<u8> {
    let mut scopes: Vec<(&InstrumentationScope, Vec<&SpanData>)> = Vec::new();
    for span in spans {
        match scopes
            .iter_mut()
            .find(|(scope, _)| **scope == span.instrumentation_scope)
        {
            Some((_, of_scope)) => of_scope.push(span),
            None => scopes.push((&span.instrumentation_scope, vec![span])),
        }
    }
    let mut out = Proto(Vec::with_capacity(256 * spans.len() + 256));
    out.message(1, |w| {
        w.message(1, |w| {
            for (key, value) in resource.iter() {
                w.key_value(1, key, value);
            }
        });
        for (scope, of_scope) in &scopes {
            w.message(2, |w| {
                w.message(1, |w| {
                    w.string(1, scope.name());
                    w.string(2, scope.version().unwrap_or_default());
                    for kv in scope.attributes() {
                        w.key_value(3, &kv.key, &kv.value);
                    }
                });
                for span in of_scope {
                    w.message(2, |w| w.span(span));
                }
                w.string(3, scope.schema_url().unwrap_or_default());
            });
        }
        w.string(3, resource.schema_url().unwrap_or_default());
    });
    out.0
}

/// Protobuf's wire format, written forward; a nested message's length goes in front of it
/// once it is written.
struct Proto(Vec<u8>);

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

impl Proto {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn tag(&mut self, field: u32, wire: u32) {
        self.varint(u64::from(field << 3 | wire));
    }

    /// A length-delimited field, written even when empty (a oneof's choice is its presence).
    fn len_field(&mut self, field: u32, bytes: &[u8]) {
        self.tag(field, LEN);
        self.varint(bytes.len() as u64);
        self.0.extend_from_slice(bytes);
    }

    /// A `string` or `bytes` field; proto3 leaves an empty one out.
    fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    fn bytes(&mut self, field: u32, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.len_field(field, bytes);
        }
    }

    fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.tag(field, VARINT);
            self.varint(v);
        }
    }

    fn fixed64(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.tag(field, FIXED64);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn fixed32(&mut self, field: u32, v: u32) {
        if v != 0 {
            self.tag(field, FIXED32);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// A nested message `body` writes, its length put in front of it afterwards (moving only
    /// its own bytes).
    fn message(&mut self, field: u32, body: impl FnOnce(&mut Self)) {
        self.tag(field, LEN);
        let start = self.0.len();
        body(self);
        let mut length = Proto(Vec::with_capacity(5));
        length.varint((self.0.len() - start) as u64);
        self.0.splice(start..start, length.0);
    }

    /// A `KeyValue` at `field`.
    fn key_value(&mut self, field: u32, key: &Key, value: &Value) {
        self.message(field, |w| {
            w.string(1, key.as_str());
            w.message(2, |w| w.any_value(value));
        });
    }

    /// The inside of an `AnyValue`: exactly one of its oneof, always written.
    fn any_value(&mut self, value: &Value) {
        match value {
            Value::Bool(b) => {
                self.tag(2, VARINT);
                self.varint(u64::from(*b));
            }
            Value::I64(i) => {
                self.tag(3, VARINT);
                // int64 on the wire: the two's complement as a varint.
                self.varint(*i as u64);
            }
            Value::F64(f) => {
                self.tag(4, FIXED64);
                self.0.extend_from_slice(&f.to_bits().to_le_bytes());
            }
            Value::String(s) => self.len_field(1, s.as_str().as_bytes()),
            Value::Array(array) => self.message(5, |w| w.array(array)),
            // A kind of value newer than this encoder: its text, rather than nothing.
            other => self.len_field(1, other.to_string().as_bytes()),
        }
    }

    /// The inside of an `ArrayValue`: each element an `AnyValue` at field 1.
    fn array(&mut self, array: &Array) {
        match array {
            Array::Bool(values) => {
                for v in values {
                    self.message(1, |w| w.any_value(&Value::Bool(*v)));
                }
            }
            Array::I64(values) => {
                for v in values {
                    self.message(1, |w| w.any_value(&Value::I64(*v)));
                }
            }
            Array::F64(values) => {
                for v in values {
                    self.message(1, |w| w.any_value(&Value::F64(*v)));
                }
            }
            Array::String(values) => {
                for v in values {
                    self.message(1, |w| w.len_field(1, v.as_str().as_bytes()));
                }
            }
            other => self.message(1, |w| w.len_field(1, other.to_string().as_bytes())),
        }
    }

    /// The inside of a `Span`.
    fn span(&mut self, span: &SpanData) {
        let context = &span.span_context;
        self.bytes(1, &context.trace_id().to_bytes());
        self.bytes(2, &context.span_id().to_bytes());
        self.string(3, &context.trace_state().header());
        if span.parent_span_id != opentelemetry::trace::SpanId::INVALID {
            self.bytes(4, &span.parent_span_id.to_bytes());
        }
        self.string(5, &span.name);
        self.uint(6, kind(&span.span_kind));
        self.fixed64(7, nanos(span.start_time));
        self.fixed64(8, nanos(span.end_time));
        for kv in &span.attributes {
            self.key_value(9, &kv.key, &kv.value);
        }
        self.uint(10, u64::from(span.dropped_attributes_count));
        for event in span.events.iter() {
            self.message(11, |w| {
                w.fixed64(1, nanos(event.timestamp));
                w.string(2, &event.name);
                for kv in &event.attributes {
                    w.key_value(3, &kv.key, &kv.value);
                }
                w.uint(4, u64::from(event.dropped_attributes_count));
            });
        }
        self.uint(12, u64::from(span.events.dropped_count));
        for link in span.links.iter() {
            self.message(13, |w| {
                let context = &link.span_context;
                w.bytes(1, &context.trace_id().to_bytes());
                w.bytes(2, &context.span_id().to_bytes());
                w.string(3, &context.trace_state().header());
                for kv in &link.attributes {
                    w.key_value(4, &kv.key, &kv.value);
                }
                w.uint(5, u64::from(link.dropped_attributes_count));
                w.fixed32(6, flags(context, context.is_remote()));
            });
        }
        self.uint(14, u64::from(span.links.dropped_count));
        self.message(15, |w| {
            let (message, code) = match &span.status {
                Status::Unset => ("", 0),
                Status::Ok => ("", 1),
                Status::Error { description } => (description.as_ref(), 2),
            };
            w.string(2, message);
            w.uint(3, code);
        });
        self.fixed32(16, flags(context, span.parent_span_is_remote));
    }
}

/// The span flags as OTLP has them: the trace flags, and whether the parent (or linked span)
/// is remote, saying that this is known.
fn flags(context: &SpanContext, remote: bool) -> u32 {
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    let mut flags = u32::from(context.trace_flags().to_u8()) | HAS_IS_REMOTE;
    if remote {
        flags |= IS_REMOTE;
    }
    flags
}

fn kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
#[path = "otlp_tests.rs"]
mod tests;
