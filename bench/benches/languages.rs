//! What a plugin's language costs the worker, side by side for the three templates (`taskhost
//! new --lang rust|python|js`, built by `taskhost build`, each serving `<lang>hello.add`):
//!
//!     cargo bench -p taskhost-bench --bench languages
//!
//! - component size;
//! - cold load: compile (Cranelift), link and describe, no precompile cache;
//! - cached load: the same from the precompile cache (the worker's load after the first);
//! - per task: `add(2, 3)` in a fresh pooled instance, as the worker runs it (median of 200,
//!   after 20 to warm up).
//!
//! Each figure is printed with its ratio to Rust's, measured in the same run.

use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use taskhost::config::{DEFAULT_STACK_KB, DEFAULT_TABLE_ELEMENTS, GrantTable, Limits};
use taskhost::plugins::{Plugin, cache::Cache};
use taskhost::protocol::TaskMessage;
use taskhost::sandbox::{Sandbox, SandboxOptions, Scope};
use taskhost::worker::task_record;
use taskhost_tests::{TestDir, celery_message, template_wasm};

const RUNS: usize = 200;
const WARM_UP: usize = 20;

struct Figures {
    lang: &'static str,
    size: usize,
    cold: Duration,
    cached: Duration,
    per_task: Duration,
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let sandbox = Arc::new(
        Sandbox::new(&SandboxOptions {
            max_instances: 4,
            max_memory_bytes: Limits::default().memory_bytes,
            max_table_elements: DEFAULT_TABLE_ELEMENTS,
            stack_bytes: usize::try_from(DEFAULT_STACK_KB * 1024).expect("stack size"),
            component: taskhost::config::ComponentCaps::default(),
            incremental_dir: None,
            compiler: taskhost::config::Compiler::Optimizing,
        })
        .expect("sandbox"),
    );
    let dir = TestDir::new("bench-languages");
    let mut figures = Vec::new();
    for lang in ["rust", "python", "js"] {
        eprintln!("building and measuring the {lang} template...");
        let path = template_wasm(lang);
        let wasm = std::fs::read(&path).expect("read the template's component");
        let grants = GrantTable::default();
        let load = |cache: Option<&Cache>| {
            let started = Instant::now();
            let plugin = runtime
                .block_on(taskhost::plugins::load(
                    &sandbox,
                    cache,
                    &path,
                    wasm.clone(),
                    &grants,
                ))
                .expect("load the template");
            (started.elapsed(), plugin)
        };
        let (cold, _) = load(None);
        let cache = Cache::new(&dir.path().join(format!("cache-{lang}"))).expect("cache");
        let _ = load(Some(&cache)); // compiles and fills the cache
        let (cached, plugin) = load(Some(&cache));
        let per_task = per_task(&runtime, &sandbox, &plugin, &grants, lang);
        figures.push(Figures {
            lang,
            size: wasm.len(),
            cold,
            cached,
            per_task,
        });
    }
    report(&figures);
}

/// The median time of one `add(2, 3)` in a fresh instance.
fn per_task(
    runtime: &tokio::runtime::Runtime,
    sandbox: &Sandbox,
    plugin: &Plugin,
    grants: &GrantTable,
    lang: &str,
) -> Duration {
    let name = format!("{lang}hello.add");
    let raw = celery_message("bench-task", &name, json!([2, 3]), json!({}), "celery");
    let message = TaskMessage::decode(raw.as_bytes()).expect("decode");
    let task = task_record(&message, None, "bench@localhost");
    let scope = Scope {
        plugin: plugin.name.clone(),
        task_name: name.clone(),
        task_id: message.id.as_str().into(),
        grants: grants.for_plugin(&plugin.name),
        progress: None,
        outbox: None,
        trace: None,
    };
    let mut times = Vec::with_capacity(RUNS);
    for run in 0..WARM_UP + RUNS {
        let started = Instant::now();
        let outcome = runtime.block_on(sandbox.run(&plugin.pre, scope.clone(), &task, None));
        let elapsed = started.elapsed();
        match outcome {
            Ok(taskhost::sandbox::Outcome::Success(result)) => assert_eq!(result.get(), "5"),
            other => panic!("{name} did not succeed: {other:?}"),
        }
        if run >= WARM_UP {
            times.push(elapsed);
        }
    }
    times.sort();
    times[times.len() / 2]
}

fn report(figures: &[Figures]) {
    let rust = &figures[0];
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!("\nplugin language cost (templates' add(2, 3); ratio to Rust in brackets)\n");
    println!(
        "{:<8} {:>10} {:>22} {:>22} {:>22}",
        "language", "size", "cold load", "cached load", "per task (median)"
    );
    for f in figures {
        println!(
            "{:<8} {:>7.1} MB {:>12.0} ms ({:>5.1}x) {:>12.1} ms ({:>5.1}x) {:>12.0} µs ({:>5.1}x)",
            f.lang,
            f.size as f64 / 1e6,
            f.cold.as_secs_f64() * 1e3,
            ratio(f.cold, rust.cold),
            f.cached.as_secs_f64() * 1e3,
            ratio(f.cached, rust.cached),
            f.per_task.as_secs_f64() * 1e6,
            ratio(f.per_task, rust.per_task),
        );
    }
}
