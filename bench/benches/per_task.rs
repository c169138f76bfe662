//! The host's per-task cost, split into its parts (the bare wasmtime loop over the same
//! component, its floor, is printed by `bench/run` beside every worker figure):
//!
//!     cargo bench -p taskhost-bench --bench per_task
//!
//! Parts: decode (the Redis message into a task), registry lookup, sandbox run (a fresh
//! pooled instance with the host's store: WASI context, limits, HTTP policy; instantiate; call;
//! the result checked to be JSON; on the guest threads as the worker runs it), encode (the
//! result document), result write (to a private redis-server); and "host per task", decode +
//! lookup + run + encode in one.

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use serde_json::value::RawValue;
use std::hint::black_box;
use std::sync::Arc;
use taskhost::config::{DEFAULT_STACK_KB, DEFAULT_TABLE_ELEMENTS, GrantTable, Limits};
use taskhost::plugins::Registry;
use taskhost::protocol::{State, TaskMessage, result_document};
use taskhost::redis::Backend;
use taskhost::sandbox::{Sandbox, SandboxOptions, Scope};
use taskhost::worker::task_record;
use taskhost_tests::{RedisServer, TestDir, celery_message, plugin_wasm};

const SLOTS: u32 = 8;

fn per_task(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let options = SandboxOptions {
        max_instances: SLOTS,
        max_memory_bytes: Limits::default().memory_bytes,
        max_table_elements: DEFAULT_TABLE_ELEMENTS,
        stack_bytes: usize::try_from(DEFAULT_STACK_KB * 1024).expect("stack size"),
        component: taskhost::config::ComponentCaps::default(),
        incremental_dir: None,
        compiler: taskhost::config::Compiler::Optimizing,
    };
    let sandbox = Arc::new(Sandbox::new(&options).expect("sandbox"));
    let grants = GrantTable::default();
    let path = plugin_wasm("demo");
    let wasm = std::fs::read(&path).expect("read demo.wasm");
    let plugin = runtime
        .block_on(taskhost::plugins::load(
            &sandbox, None, &path, wasm, &grants,
        ))
        .expect("load demo.wasm");
    let registry = Registry::default()
        .with(Arc::new(plugin))
        .expect("registry");
    let id = uuid::Uuid::new_v4().to_string();
    let raw = celery_message(&id, "demo.add", json!([1, 2]), json!({}), "celery").into_bytes();
    let message = TaskMessage::decode(&raw).expect("decode");
    let (plugin, _) = registry.resolve("demo.add").expect("demo.add is served");
    let scope = Scope {
        plugin: plugin.name.clone(),
        task_name: message.task.clone(),
        task_id: message.id.as_str().into(),
        grants: grants.for_plugin(&plugin.name),
        progress: None,
        outbox: None,
        trace: None,
    };
    let task = task_record(&message, None, "bench@localhost");

    let mut group = c.benchmark_group("per task");
    group.bench_function("decode", |b| {
        b.iter(|| TaskMessage::decode(black_box(&raw)).map(|m| m.id.len()))
    });
    group.bench_function("registry lookup", |b| {
        b.iter(|| {
            registry
                .resolve(black_box("demo.add"))
                .map(|(p, _)| p.name.len())
        })
    });
    group.bench_function("sandbox run (instantiate + call)", |b| {
        b.iter(|| runtime.block_on(sandbox.run(&plugin.pre, scope.clone(), &task, None)))
    });
    let reusing = Scope {
        grants: Arc::new(taskhost::config::Grants {
            limits: Limits {
                reuse_instances: u32::MAX,
                ..Limits::default()
            },
            ..taskhost::config::Grants::default()
        }),
        ..scope.clone()
    };
    group.bench_function("sandbox run (a kept instance: call)", |b| {
        b.iter(|| runtime.block_on(sandbox.run(&plugin.pre, reusing.clone(), &task, None)))
    });
    let three = RawValue::from_string("3".into()).expect("JSON");
    group.bench_function("encode", |b| b.iter(|| encode(black_box(&three), &message)));
    // The host's own JSON work for a 10 KB argument echoed back: decode, hand the arguments
    // to the plugin, store what it returns (the plugin itself not run).
    let big = json!({"items": (0..200).map(|i| json!({"n": i, "name": format!("item-{i:04}"), "ok": true})).collect::<Vec<_>>()});
    let echo_raw = celery_message(&id, "demo.echo", json!([big]), json!({}), "celery").into_bytes();
    let echo_result = RawValue::from_string(big.to_string()).expect("JSON");
    group.bench_function("JSON work of a 10 KB echo (decode + args + encode)", |b| {
        b.iter(|| {
            let message = TaskMessage::decode(black_box(&echo_raw)).expect("decode");
            let task = task_record(&message, None, "bench@localhost");
            black_box(task.args.len());
            encode(black_box(&echo_result), &message).len()
        })
    });
    group.bench_function("host per task (decode + lookup + run + encode)", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let message = TaskMessage::decode(&raw).expect("decode");
                let (plugin, _) = registry.resolve(&message.task).expect("served");
                let outcome = sandbox
                    .run(
                        &plugin.pre,
                        scope.clone(),
                        &task_record(&message, None, "bench@localhost"),
                        None,
                    )
                    .await;
                match outcome {
                    Ok(taskhost::sandbox::Outcome::Success(result)) => encode(&result, &message),
                    other => panic!("demo.add did not succeed: {other:?}"),
                }
            })
        })
    });

    let dir = TestDir::new("bench-per-task");
    let redis = RedisServer::start(&dir);
    let backend = runtime
        .block_on(Backend::connect(
            &redis.url(1),
            taskhost::config::resolve::DEFAULT_RESULT_EXPIRES,
        ))
        .expect("backend");
    let doc = encode(&three, &message);
    group.bench_function("result write (one task, one round trip)", |b| {
        b.iter(|| runtime.block_on(backend.store(&message.id, &doc)))
    });
    group.finish();
}

/// The result document as the worker stores it: the plugin's JSON (checked in the sandbox)
/// written as it is.
fn encode(result: &RawValue, message: &TaskMessage) -> String {
    result_document(
        &message.meta(),
        State::Success.as_str(),
        result,
        None,
        time::OffsetDateTime::now_utc(),
    )
}

criterion_group!(benches, per_task);
criterion_main!(benches);
