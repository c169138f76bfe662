//! Distributed tracing as a Celery user who traces sees it: a Python producer instrumented with
//! `opentelemetry-instrumentation-celery` (from PyPI) sends tasks to a taskhost worker started
//! with OpenTelemetry's `OTEL_*` variables, and an OTLP/HTTP receiver in the test decodes what
//! both export. Outcomes are read from the received spans, never from logs.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::json;
use std::collections::BTreeMap;
use taskhost_tests::{Client, Process, RedisServer, TestDir, free_port, http_get, wait_for};
use taskhost_tests::{HttpStub, Reply};

const SPAN_KIND_PRODUCER: i32 = 4;
const SPAN_KIND_CONSUMER: i32 = 5;
const STATUS_ERROR: i32 = 2;

/// The Celery app of the producer: the demo plugin's task names.
const CELERY_APP: &str = taskhost_tests::DEMO_CELERY_APP;

/// A tracing Celery user's producer: the SDK, exporting to the test's receiver, and the Celery
/// instrumentation, which injects `traceparent` into every message it sends.
const PRELUDE: &str = r#"
import os
from celery import chain, chord
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from celery_app import app, add, tsum

provider = TracerProvider(resource=Resource.create({"service.name": "producer"}))
provider.add_span_processor(
    SimpleSpanProcessor(OTLPSpanExporter(endpoint=os.environ["OTLP"] + "/v1/traces"))
)
trace.set_tracer_provider(provider)
CeleryInstrumentor().instrument()
tracer = trace.get_tracer("producer")
"#;

/// One received span, its ids in hex and its attributes as text.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    kind: i32,
    status: i32,
    /// Start and end, nanoseconds since the Unix epoch.
    start: u64,
    end: u64,
    attributes: BTreeMap<String, String>,
    events: Vec<(String, BTreeMap<String, String>)>,
}

impl Span {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(
    kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue],
) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

/// The OTLP receiver: every export decoded into its spans.
struct Collector(HttpStub);

impl Collector {
    fn start() -> Self {
        Self(HttpStub::start(|_| Reply::json(200, json!({}))))
    }

    fn url(&self) -> String {
        self.0.url()
    }

    fn spans(&self) -> Vec<Span> {
        let mut spans = Vec::new();
        for request in self.0.requests() {
            assert_eq!(request.path, "/v1/traces", "OTLP/HTTP's traces path");
            let export = ExportTraceServiceRequest::decode(request.bytes.as_slice())
                .expect("an OTLP protobuf export");
            for resource in export.resource_spans {
                let service = resource
                    .resource
                    .as_ref()
                    .map(|r| attributes(&r.attributes))
                    .and_then(|a| a.get("service.name").cloned())
                    .unwrap_or_default();
                for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                    spans.push(Span {
                        service: service.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        name: span.name.clone(),
                        kind: span.kind,
                        status: span.status.as_ref().map_or(0, |s| s.code),
                        start: span.start_time_unix_nano,
                        end: span.end_time_unix_nano,
                        attributes: attributes(&span.attributes),
                        events: span
                            .events
                            .iter()
                            .map(|e| (e.name.clone(), attributes(&e.attributes)))
                            .collect(),
                    });
                }
            }
        }
        spans
    }

    /// The spans, once `check` finds what it looks for in them.
    fn wait<T>(&self, what: &str, mut check: impl FnMut(&[Span]) -> Option<T>) -> T {
        wait_for(what, || check(&self.spans()))
    }

    /// The worker's span that ran task `id`, once exported with its final state.
    fn run_span(&self, id: &str, state: &str) -> Span {
        self.wait(
            &format!("the worker's span of task {id} in {state}"),
            |spans| {
                spans
                    .iter()
                    .find(|s| {
                        s.attr("celery.action") == Some("run")
                            && s.attr("messaging.message.id") == Some(id)
                            && s.attr("celery.state") == Some(state)
                    })
                    .cloned()
            },
        )
    }

    fn by_id(&self, span_id: &str) -> Span {
        self.wait(&format!("span {span_id}"), |spans| {
            spans.iter().find(|s| s.span_id == span_id).cloned()
        })
    }
}

/// A worker on `redis` serving `plugins` with `flags`, tracing with OpenTelemetry's variables
/// `env` (batches sent every 50 ms unless `env` says otherwise), once it is consuming.
fn traced_worker(
    dir: &TestDir,
    redis: &RedisServer,
    plugins: &std::path::Path,
    flags: &[&str],
    env: &[(&str, &str)],
) -> Process {
    let mut command = Process::worker_command(dir, redis, plugins, flags);
    command.env("OTEL_BSP_SCHEDULE_DELAY", "50");
    command.envs(env.iter().copied());
    let worker = Process::spawn(dir, "worker.log", command);
    worker.wait_log("worker ready");
    worker
}

/// A worker serving the demo plugin, tracing to `collector` with OpenTelemetry's variables.
struct Setup {
    dir: TestDir,
    redis: RedisServer,
    worker: Process,
    collector: Collector,
}

fn setup(name: &str) -> Setup {
    let collector = Collector::start();
    let dir = TestDir::new(name);
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    std::fs::copy(
        taskhost_tests::test_plugin_wasm("hostile"),
        plugins.join("hostile.wasm"),
    )
    .expect("the hostile test plugin");
    let flags = ["-n", "traced@test", "--metrics-addr", "127.0.0.1:0"];
    let endpoint = collector.url();
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
    let worker = traced_worker(&dir, &redis, &plugins, &flags, &env);
    Setup {
        dir,
        redis,
        worker,
        collector,
    }
}

impl Setup {
    /// Runs `code` with the traced producer; returns what it printed.
    fn python(&self, code: &str) -> String {
        self.dir.write("celery_app.py", CELERY_APP);
        let mut command = taskhost_tests::python_in(&self.dir, &self.redis, &["producer.py"]);
        command.env("OTLP", self.collector.url());
        let logs = || self.worker.log();
        taskhost_tests::run_snippet_in(&self.dir, command, PRELUDE, code, logs)
    }
}

/// The spans of `trace` as an indented tree, children in start order: `name [service] state`.
fn tree(spans: &[Span], trace: &str) -> String {
    let in_trace: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace).collect();
    fn walk(spans: &[&Span], parent: &str, depth: usize, out: &mut String) {
        for span in spans.iter().filter(|s| s.parent == parent) {
            let state = span.attr("celery.state").unwrap_or("");
            out.push_str(&format!(
                "{}{} [{}] {state}\n",
                "  ".repeat(depth),
                span.name,
                span.service
            ));
            walk(spans, &span.span_id, depth + 1, out);
        }
    }
    let mut out = String::new();
    walk(&in_trace, "", 0, &mut out);
    out
}

/// The value printed as `NAME=value` by a snippet.
fn printed(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} not printed in {out}"))
        .trim()
        .to_owned()
}

#[test]
fn a_celery_producers_trace_continues_in_the_workers_run_span() {
    let s = setup("trace-continues");
    let out = s.python(
        r#"
r = add.delay(2, 3)
assert r.get(timeout=10) == 5
print(f"ID={r.id}")
"#,
    );
    let id = printed(&out, "ID");
    let run = s.collector.run_span(&id, "SUCCESS");
    assert_eq!(run.name, "run/demo.add");
    assert_eq!(run.kind, SPAN_KIND_CONSUMER);
    assert_eq!(run.attr("celery.action"), Some("run"));
    assert_eq!(run.attr("celery.task_name"), Some("demo.add"));
    assert_eq!(run.attr("messaging.destination"), Some("celery"));
    let producer = s.collector.by_id(&run.parent);
    assert_eq!(
        (
            producer.service.as_str(),
            producer.name.as_str(),
            producer.kind
        ),
        ("producer", "apply_async/demo.add", SPAN_KIND_PRODUCER)
    );
    assert_eq!(run.trace_id, producer.trace_id, "one trace");
    assert_eq!(run.attr("taskhost.plugin"), Some("demo"));
    let events: Vec<&str> = run.events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        events,
        ["started", "ran"],
        "past its gates, then out of its sandbox"
    );
}

#[test]
fn a_failed_task_span_is_an_error_with_its_exception_recorded() {
    let s = setup("trace-failure");
    let out = s.python(
        r#"
r = app.send_task("demo.fail", ("boom",))
try:
    r.get(timeout=10)
except Exception:
    pass
print(f"ID={r.id}")
"#,
    );
    let run = s.collector.run_span(&printed(&out, "ID"), "FAILURE");
    assert_eq!(run.status, STATUS_ERROR);
    let (_, exception) = run
        .events
        .iter()
        .find(|(name, _)| name == "exception")
        .expect("the exception recorded");
    assert_eq!(
        exception.get("exception.message").map(String::as_str),
        Some("boom")
    );
    assert!(exception.contains_key("exception.type"), "{exception:?}");
}

#[test]
fn a_chain_and_a_chord_are_one_trace_each_step_under_the_one_that_sent_it() {
    let s = setup("trace-canvas");
    let out = s.python(
        r#"
with tracer.start_as_current_span("canvas") as root:
    r = chain(add.s(1, 2), add.s(3), add.s(4)).delay()
    c = chord([add.s(i, i) for i in range(3)], tsum.s()).delay()
assert r.get(timeout=10) == 10
assert c.get(timeout=10) == 6
print(f"TRACE={root.get_span_context().trace_id:032x}")
print(f"LAST={r.id}")
print(f"FIRST={r.parent.parent.id}")
print(f"SECOND={r.parent.id}")
print(f"BODY={c.id}")
"#,
    );
    let trace = printed(&out, "TRACE");
    let first = s.collector.run_span(&printed(&out, "FIRST"), "SUCCESS");
    let second = s.collector.run_span(&printed(&out, "SECOND"), "SUCCESS");
    let last = s.collector.run_span(&printed(&out, "LAST"), "SUCCESS");
    let body = s.collector.run_span(&printed(&out, "BODY"), "SUCCESS");
    for span in [&first, &second, &last, &body] {
        assert_eq!(
            span.trace_id, trace,
            "{} is in the canvas's trace",
            span.name
        );
    }
    // Each later step's parent is the worker's apply_async span, sent from the step before.
    for (step, before) in [(&second, &first), (&last, &second)] {
        let sent_by = s.collector.by_id(&step.parent);
        assert_eq!(
            (
                sent_by.name.as_str(),
                sent_by.kind,
                sent_by.service.as_str()
            ),
            ("apply_async/demo.add", SPAN_KIND_PRODUCER, "taskhost")
        );
        assert_eq!(sent_by.parent, before.span_id, "sent from the step before");
    }
    // The trace as a reader sees it (the README's picture is this output).
    println!("{}", tree(&s.collector.spans(), &trace));
    let body_sent_by = s.collector.by_id(&body.parent);
    assert_eq!(body_sent_by.name, "apply_async/demo.tsum");
    let part = s.collector.by_id(&body_sent_by.parent);
    assert_eq!(
        (part.name.as_str(), part.attr("celery.state")),
        ("run/demo.add", Some("SUCCESS")),
        "the chord's body is sent from the part that completed it"
    );
}

#[test]
fn a_task_a_plugin_sends_runs_in_its_senders_trace() {
    let s = setup("trace-plugin-send");
    let out = s.python(
        r#"
r = app.send_task("demo.send", ("demo.add", [20, 22]))
child = r.get(timeout=10)
assert app.AsyncResult(child).get(timeout=10) == 42
print(f"SENDER={r.id}")
print(f"CHILD={child}")
"#,
    );
    let sender = s.collector.run_span(&printed(&out, "SENDER"), "SUCCESS");
    let child = s.collector.run_span(&printed(&out, "CHILD"), "SUCCESS");
    assert_eq!(child.trace_id, sender.trace_id);
    let sent_by = s.collector.by_id(&child.parent);
    assert_eq!(sent_by.name, "apply_async/demo.add");
    assert_eq!(
        sent_by.parent, sender.span_id,
        "sent from the plugin's task"
    );
}

#[test]
fn each_retry_runs_under_the_try_that_sent_it() {
    let s = setup("trace-retry");
    let out = s.python(
        r#"
r = app.send_task("demo.retry", (2,))
assert r.get(timeout=10) == 2
print(f"ID={r.id}")
"#,
    );
    let id = printed(&out, "ID");
    let last = s.collector.run_span(&id, "SUCCESS");
    assert_eq!(last.attr("celery.retries"), Some("2"));
    let mut span = last;
    for retries in [Some("1"), None] {
        let sent_by = s.collector.by_id(&span.parent);
        assert_eq!(sent_by.name, "apply_async/demo.retry");
        let before = s.collector.by_id(&sent_by.parent);
        assert_eq!(before.attr("celery.state"), Some("RETRY"));
        assert_eq!(before.attr("celery.retries"), retries);
        assert!(before.attr("celery.retry.reason").is_some(), "{before:?}");
        assert_eq!(before.trace_id, span.trace_id);
        span = before;
    }
}

#[test]
fn a_message_with_no_trace_or_a_hostile_one_runs_in_a_new_trace() {
    let s = setup("trace-hostile");
    let mut client = Client::new(&s.redis);
    let mut ids = Vec::new();
    for traceparent in [
        None,
        Some(json!(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        )),
        Some(json!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nx: y"
        )),
        Some(json!({"trace": "an object"})),
        Some(json!("x".repeat(100_000))),
    ] {
        let id = uuid::Uuid::new_v4().to_string();
        let mut message: serde_json::Value = serde_json::from_str(&taskhost_tests::celery_message(
            &id,
            "demo.add",
            json!([1, 1]),
            json!({}),
            "celery",
        ))
        .expect("a message");
        if let Some(traceparent) = traceparent {
            message["headers"]["traceparent"] = traceparent;
            message["headers"]["tracestate"] = json!("k=v");
        }
        client.push_raw("celery", message.to_string().as_bytes());
        ids.push(id);
    }
    for id in &ids {
        assert_eq!(client.result(id)["result"], json!(2), "the task ran");
        let run = s.collector.run_span(id, "SUCCESS");
        assert_eq!(run.parent, "", "a new trace: no parent");
    }
    let traces: std::collections::BTreeSet<String> = ids
        .iter()
        .map(|id| s.collector.run_span(id, "SUCCESS").trace_id)
        .collect();
    assert_eq!(traces.len(), ids.len(), "each its own trace");
}

/// A counter's value in a `/metrics` text (its line, labels as written).
fn counter(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {line_start} in /metrics:\n{text}")) as u64
}

#[test]
fn a_collector_that_is_down_loses_spans_never_tasks_and_memory_stays_flat() {
    let dir = TestDir::new("trace-collector-down");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    // Nothing listens here until the collector comes back.
    let port = free_port();
    let flags = [
        "-n",
        "down@test",
        "-c",
        "8",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let endpoint = format!("http://127.0.0.1:{port}/v1/traces");
    let env = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "64"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "32"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
    ];
    let worker = traced_worker(&dir, &redis, &plugins, &flags, &env);
    let addr = worker.metrics_addr();
    let mut client = Client::new(&redis);
    let mut run = |n: usize| {
        let ids: Vec<String> = (0..n)
            .map(|i| client.send("demo.add", json!([i, 1])))
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let doc = client.result(id);
            assert_eq!(doc["result"], json!(i + 1), "task {id}: {doc}");
        }
    };
    run(500);
    let settled = taskhost_tests::rss_kib(worker.pid());
    run(2_000);
    let after = taskhost_tests::rss_kib(worker.pid());
    assert!(
        after < settled + 16 * 1024,
        "the worker's memory grew from {settled} KiB to {after} KiB while spans could not go"
    );
    let metrics = |what: &str| {
        let (status, text) = http_get(&addr, "/metrics", None).expect("/metrics answers");
        assert_eq!(status, 200, "{what}: {text}");
        text
    };
    // The export that fails is counted once its retries give up.
    let down = wait_for("a failed export counted", || {
        let text = metrics("collector down");
        let failed = counter(
            &text,
            "taskhost_trace_spans_dropped_total{reason=\"export_failed\"}",
        );
        (failed > 0).then_some(text)
    });
    assert_eq!(counter(&down, "taskhost_trace_spans_exported_total"), 0);
    assert!(
        counter(
            &down,
            "taskhost_trace_spans_dropped_total{reason=\"queue_full\"}"
        ) > 0,
        "a full queue drops spans, counted:\n{down}"
    );
    // The collector comes back: what is queued goes, then the next task's spans reach it.
    let collector = Collector(HttpStub::start_on(port, |_| Reply::json(200, json!({}))));
    wait_for("spans exported again", || {
        let text = metrics("collector back");
        (counter(&text, "taskhost_trace_spans_exported_total") > 0).then_some(())
    });
    let id = client.send("demo.add", json!([1, 1]));
    assert_eq!(client.result(&id)["result"], json!(2));
    collector.run_span(&id, "SUCCESS");
}

#[test]
fn the_readmes_tracing_section_in_taskhost_toml_sends_spans_with_its_settings() {
    let collector = Collector::start();
    let dir = TestDir::new("trace-readme-toml");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let example = taskhost_tests::readme_block("tracing-example");
    assert!(example.contains("http://collector:4318"), "{example}");
    let config = dir.write(
        "taskhost.toml",
        &example.replace("http://collector:4318", &collector.url()),
    );
    let config = config.to_string_lossy().into_owned();
    let _worker = traced_worker(&dir, &redis, &plugins, &["--config", &config], &[]);
    let mut client = Client::new(&redis);
    let id = client.send("demo.add", json!([2, 3]));
    assert_eq!(client.result(&id)["result"], json!(5));
    let run = collector.run_span(&id, "SUCCESS");
    assert_eq!(run.service, "evaluations-worker", "the file's service_name");
}

/// Sends `task(["ab", "cde"])` (a plugin's `traced`: a span "count letters" with a "measure"
/// span per word in it) and checks its spans nest under the task's span, with their
/// attributes, in `plugin`'s name.
fn check_traced(collector: &Collector, client: &mut Client, task: &str, plugin: &str) {
    let id = client.send(task, json!([["ab", "cde"]]));
    let doc = client.result(&id);
    assert_eq!(doc["result"], json!(5), "{doc}");
    let run = collector.run_span(&id, "SUCCESS");
    let count = collector.wait("the plugin's span", |spans| {
        spans
            .iter()
            .find(|x| x.name == "count letters" && x.trace_id == run.trace_id)
            .cloned()
    });
    assert_eq!(count.parent, run.span_id, "under the task's span");
    assert_eq!(count.attr("words"), Some("2"));
    assert_eq!(count.attr("letters"), Some("5"));
    assert_eq!(count.attr("taskhost.plugin"), Some(plugin));
    let measures = collector.wait("both measure spans", |spans| {
        let m: Vec<Span> = spans
            .iter()
            .filter(|x| x.name == "measure" && x.trace_id == run.trace_id)
            .cloned()
            .collect();
        (m.len() == 2).then_some(m)
    });
    let words: std::collections::BTreeSet<&str> =
        measures.iter().filter_map(|m| m.attr("word")).collect();
    assert_eq!(words, ["ab", "cde"].into_iter().collect());
    for m in &measures {
        assert_eq!(
            m.parent, count.span_id,
            "nested under the span open around it"
        );
        assert!(
            m.start >= count.start && m.end <= count.end,
            "{m:?} within {count:?}"
        );
    }
}

#[test]
fn a_rust_plugins_own_spans_nest_under_its_task_span() {
    let s = setup("trace-plugin-spans");
    check_traced(
        &s.collector,
        &mut Client::new(&s.redis),
        "demo.traced",
        "demo",
    );
}

/// A worker tracing to a new collector, serving the SDK test plugin `source` as `name`
/// (precompiled in the cache the SDK semantics tests share).
fn sdk_worker(source: &str, name: &str) -> (Collector, TestDir, RedisServer, Process) {
    let collector = Collector::start();
    let dir = TestDir::new(&format!("trace-sdk-{name}"));
    let redis = RedisServer::start(&dir);
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::copy(
        taskhost_tests::source_plugin_wasm(source),
        plugins.join(format!("{name}.wasm")),
    )
    .expect("copy the plugin");
    let config = dir
        .write("taskhost.toml", "")
        .to_string_lossy()
        .into_owned();
    let cache = taskhost_tests::target_dir()
        .join("test-runs")
        .join("semantics-precompiled");
    let cache = cache.to_string_lossy().into_owned();
    Process::precompile(&dir, &plugins, &config, &cache);
    let args = ["--config", config.as_str(), "--cache-dir", cache.as_str()];
    let endpoint = collector.url();
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
    let worker = traced_worker(&dir, &redis, &plugins, &args, &env);
    (collector, dir, redis, worker)
}

/// An SDK's spans (`source`, served as `name`): nested as the Rust SDK's are, and an error
/// leaving a span recorded on it, the span marked failed and the task failed with it.
fn sdk_spans(source: &str, name: &str) {
    let (collector, _dir, redis, _worker) = sdk_worker(source, name);
    let mut client = Client::new(&redis);
    check_traced(&collector, &mut client, &format!("{name}.traced"), name);
    let id = client.send(&format!("{name}.traced_failure"), json!([]));
    let doc = client.result(&id);
    assert_eq!(doc["status"], "FAILURE", "{doc}");
    let run = collector.run_span(&id, "FAILURE");
    let doomed = collector.wait("the failed span", |spans| {
        spans
            .iter()
            .find(|x| x.name == "doomed" && x.trace_id == run.trace_id)
            .cloned()
    });
    assert_eq!(doomed.status, STATUS_ERROR);
    let (_, exception) = doomed
        .events
        .iter()
        .find(|(n, _)| n == "exception")
        .expect("the exception recorded on the span");
    assert_eq!(
        exception.get("exception.message").map(String::as_str),
        Some("inside a span")
    );
}

#[test]
fn a_python_plugins_own_spans_nest_under_its_task_span() {
    sdk_spans("semantics-py", "sem");
}

#[test]
fn a_javascript_plugins_own_spans_nest_under_its_task_span() {
    sdk_spans("semantics-js", "semjs");
}

#[test]
fn a_plugins_spans_stay_in_its_tasks_trace_and_within_bounds() {
    let s = setup("trace-plugin-hostile");
    let mut client = Client::new(&s.redis);
    let sent_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as u64;
    for mode in ["foreign", "unstarted", "orphan", "flood", "huge"] {
        let id = client.send("hostile.spans", json!([mode]));
        let doc = client.result(&id);
        assert_eq!(
            doc["status"], "SUCCESS",
            "{mode}: the task is not failed for it: {doc}"
        );
        s.collector.run_span(&id, "SUCCESS");
    }
    let spans = s.collector.spans();
    let named = |name: &str| spans.iter().filter(|x| x.name == name).count();
    assert_eq!(named("foreign"), 0, "into another trace");
    assert_eq!(named("unstarted"), 0, "ended, never started");
    assert_eq!(named("orphan"), 0, "under a parent it never started");
    assert_eq!(named("flood"), 1_000, "at most 1,000 spans per task");
    let huge = spans
        .iter()
        .find(|x| x.name.starts_with("nnnn"))
        .expect("the huge span, cut");
    assert!(huge.name.chars().count() <= 257, "name cut");
    assert!(
        huge.attributes.len() <= 65,
        "{} attributes",
        huge.attributes.len()
    );
    assert!(
        huge.attributes.values().all(|v| v.len() <= 4_100),
        "values cut"
    );
    let received_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as u64;
    assert!(
        huge.start >= sent_at && huge.end <= received_at && huge.start <= huge.end,
        "times clamped to the task's run: {} .. {} not within {sent_at} .. {received_at}",
        huge.start,
        huge.end
    );
    let (status, text) = http_get(&s.worker.metrics_addr(), "/metrics", None).expect("/metrics");
    assert_eq!(status, 200);
    let refused = counter(
        &text,
        "taskhost_trace_spans_dropped_total{reason=\"refused\"}",
    );
    assert_eq!(
        refused,
        3 + 1_000,
        "foreign, unstarted and orphan, and the flood's extra 1,000"
    );
}

#[test]
fn a_plugin_that_makes_spans_runs_the_same_untraced() {
    let dir = TestDir::new("trace-plugin-untraced");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let _worker = Process::worker(&dir, &redis, &plugins, &[]);
    let mut client = Client::new(&redis);
    assert_eq!(
        client.success("demo.traced", json!([["ab", "cde"]])),
        json!(5)
    );
}

#[test]
fn a_traced_tasks_json_log_lines_carry_its_trace_and_span_ids() {
    let collector = Collector::start();
    let dir = TestDir::new("trace-log-ids");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let flags = ["--log-format", "json"];
    let endpoint = collector.url();
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
    let worker = traced_worker(&dir, &redis, &plugins, &flags, &env);
    let mut client = Client::new(&redis);
    let id = client.send("demo.add", json!([2, 3]));
    assert_eq!(client.result(&id)["result"], json!(5));
    let run = collector.run_span(&id, "SUCCESS");
    // The log line's format is the behaviour under test here.
    let line = wait_for("the task's JSON log line", || {
        worker.log().lines().find_map(|l| {
            let line: serde_json::Value = serde_json::from_str(l).ok()?;
            (line["message"] == "task succeeded" && line["task_id"] == id.as_str()).then_some(line)
        })
    });
    assert_eq!(line["span"]["trace_id"], run.trace_id.as_str(), "{line}");
    assert_eq!(line["span"]["span_id"], run.span_id.as_str(), "{line}");
}
