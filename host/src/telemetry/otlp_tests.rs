//! The hand-written body against `opentelemetry-proto`'s own transform of the same spans:
//! decoded, the two must be the same request.

use super::*;
use opentelemetry::trace::{Event, Link, SpanContext, SpanId, TraceFlags, TraceId, TraceState};
use opentelemetry::{KeyValue, StringValue};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
use prost::Message as _;
use std::borrow::Cow;

fn at(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
}

fn context(trace: u128, span: u64, remote: bool) -> SpanContext {
    SpanContext::new(
        TraceId::from(trace),
        SpanId::from(span),
        TraceFlags::SAMPLED,
        remote,
        TraceState::from_key_value([("vendor", "v1")]).expect("trace state"),
    )
}

/// Every value kind, negative and empty ones too (a oneof must be written when it is its
/// default).
fn every_value() -> Vec<KeyValue> {
    vec![
        KeyValue::new("s", "text"),
        KeyValue::new("empty", ""),
        KeyValue::new("yes", true),
        KeyValue::new("no", false),
        KeyValue::new("zero", 0_i64),
        KeyValue::new("negative", -42_i64),
        KeyValue::new("pi", 3.25_f64),
        KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
        KeyValue::new("ints", Value::Array(Array::I64(vec![1, -1]))),
        KeyValue::new("floats", Value::Array(Array::F64(vec![0.5]))),
        KeyValue::new(
            "strings",
            Value::Array(Array::String(vec![StringValue::from("a"), "".into()])),
        ),
    ]
}

fn span(name: &'static str, scope: &InstrumentationScope, parent: Option<bool>) -> SpanData {
    let mut events = SpanEvents::default();
    events.events.push(Event::new(
        "exception",
        at(2),
        vec![KeyValue::new("exception.type", "ValueError")],
        1,
    ));
    events
        .events
        .push(Event::new("started", at(1), Vec::new(), 0));
    events.dropped_count = 3;
    let mut links = SpanLinks::default();
    links.links.push(Link::new(
        context(7, 8, true),
        vec![KeyValue::new("l", 1_i64)],
        2,
    ));
    links.dropped_count = 4;
    SpanData {
        span_context: context(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef, 0x1122, false),
        parent_span_id: parent.map_or(SpanId::INVALID, |_| SpanId::from(0x3344)),
        parent_span_is_remote: parent.unwrap_or(false),
        span_kind: SpanKind::Consumer,
        name: Cow::Borrowed(name),
        start_time: at(0),
        end_time: at(5),
        attributes: every_value(),
        dropped_attributes_count: 5,
        events,
        links,
        status: Status::error("ValueError: boom"),
        instrumentation_scope: scope.clone(),
    }
}

fn reference(resource: &Resource, spans: Vec<SpanData>) -> ExportTraceServiceRequest {
    let resource = ResourceAttributesWithSchema::from(resource);
    ExportTraceServiceRequest {
        resource_spans: group_spans_by_resource_and_scope(spans, &resource),
    }
}

#[test]
fn the_body_is_what_opentelemetry_proto_would_send() {
    let resource = Resource::builder_empty()
        .with_service_name("svc")
        .with_attributes([KeyValue::new("host.name", "h"), KeyValue::new("n", 3_i64)])
        .build();
    let host = InstrumentationScope::builder("taskhost").build();
    let plugin = InstrumentationScope::builder("demo")
        .with_version("1.2.0")
        .with_schema_url("https://opentelemetry.io/schemas/1.30.0")
        .with_attributes([KeyValue::new("scope.attr", "x")])
        .build();
    let mut ok = span("run/demo.add", &host, None);
    ok.status = Status::Ok;
    let mut unset = span("apply_async/demo.add", &host, Some(false));
    unset.status = Status::Unset;
    let spans = vec![
        span("run/demo.fail", &host, Some(true)),
        span("guest", &plugin, Some(false)),
        ok,
        unset,
    ];
    let body = encode(&resource, &spans);
    let decoded = ExportTraceServiceRequest::decode(body.as_slice()).expect("a valid body");
    assert_eq!(decoded, reference(&resource, spans));
}

#[test]
fn an_empty_batch_is_one_empty_resource() {
    let resource = Resource::builder_empty().build();
    let body = encode(&resource, &[]);
    let decoded = ExportTraceServiceRequest::decode(body.as_slice()).expect("a valid body");
    assert_eq!(decoded, reference(&resource, Vec::new()));
}

#[test]
fn a_refusing_collectors_reply_is_cut_and_cleaned_for_the_log() {
    let long = format!("bad\r\nline\u{1b}[31m{}", "x".repeat(1000));
    let cleaned = reason(long.as_bytes());
    assert!(cleaned.starts_with("badline[31m"), "{cleaned}");
    assert_eq!(cleaned.chars().count(), MAX_REASON);
}

#[test]
fn a_header_that_cannot_be_sent_is_refused_without_its_value() {
    let refused = OtlpExporter::new(
        "http://127.0.0.1:4318/v1/traces",
        &[("authorization".to_owned(), "secret\r\nx: y".to_owned())],
        Duration::from_secs(1),
        Resource::builder_empty().build(),
    )
    .expect_err("a value with a line break");
    let message = refused.to_string();
    assert!(message.contains("authorization"), "{message}");
    assert!(!message.contains("secret"), "{message}");
}

/// A collector on a free port that answers each post with the next of `statuses`; what it
/// was sent comes back when it has answered them all.
fn collector(statuses: &'static [u16]) -> (String, std::thread::JoinHandle<usize>) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!(
        "http://{}/v1/traces",
        listener.local_addr().expect("address")
    );
    let server = std::thread::spawn(move || {
        for status in statuses {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut got = Vec::new();
            let mut buf = [0_u8; 4096];
            // The head, then the body its Content-Length says.
            let whole = |got: &[u8]| {
                let text = String::from_utf8_lossy(got);
                text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
                    head.lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|n| n.trim().parse::<usize>().ok())
                        .is_some_and(|n| body.len() >= n)
                })
            };
            while !whole(&got) {
                let n = conn.read(&mut buf).expect("read");
                assert!(n > 0, "the post ended early");
                got.extend_from_slice(&buf[..n]);
            }
            let reply = format!("HTTP/1.1 {status} X\r\nContent-Length: 4\r\n\r\nbusy");
            conn.write_all(reply.as_bytes()).expect("reply");
        }
        statuses.len()
    });
    (url, server)
}

fn exporter(url: &str) -> OtlpExporter {
    OtlpExporter::new(
        url,
        &[],
        Duration::from_secs(10),
        Resource::builder_empty().build(),
    )
    .expect("exporter")
}

#[test]
fn a_busy_collector_is_tried_again_until_it_takes_the_batch() {
    let (url, server) = collector(&[503, 429, 200]);
    let host = InstrumentationScope::builder("taskhost").build();
    let sent = futures_executor::block_on(exporter(&url).export(vec![span("s", &host, None)]));
    assert!(sent.is_ok(), "{sent:?}");
    assert_eq!(server.join().expect("collector"), 3, "three posts");
}

#[test]
fn a_collector_that_refuses_the_batch_is_not_asked_again() {
    let (url, server) = collector(&[400]);
    let host = InstrumentationScope::builder("taskhost").build();
    let refused = futures_executor::block_on(exporter(&url).export(vec![span("s", &host, None)]))
        .expect_err("400 is final");
    assert!(refused.to_string().contains("400"), "{refused}");
    assert_eq!(server.join().expect("collector"), 1);
}
