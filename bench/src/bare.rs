//! The sandbox's floor: a bare wasmtime loop over the same `demo.wasm`, no Redis, no worker.
//! An engine configured as the host's (pooling allocator resetting memory in place, epoch
//! interruption), WASI and WASI HTTP
//! linked, the host interface trapping (`demo.add` does not call it); per task a fresh store, instantiate
//! from the pre-linked component, call. And the same call on one kept instance, the floor of
//! `reuse_instances`. CPU time of the one thread that runs the loop.

use taskhost::config::Limits;
use taskhost::sandbox::{Task, bindings};
use wasmtime::component::{Component, Linker, ResourceTable, types::ComponentItem};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

const SLOTS: u32 = 8;

/// CPU µs per task of the two loops.
pub struct Floor {
    /// Fresh store + instantiate + call.
    pub fresh_us: f64,
    /// Call only, on one instance kept across tasks.
    pub kept_us: f64,
}

/// Runs each loop `tasks` times (after a warm-up) over `demo.add(1, 2)`.
pub fn floor(tasks: usize) -> Floor {
    let wasm = std::fs::read(taskhost_tests::plugin_wasm("demo")).expect("read demo.wasm");
    let id = uuid::Uuid::new_v4().to_string();
    let raw = taskhost_tests::celery_message(
        &id,
        "demo.add",
        serde_json::json!([1, 2]),
        serde_json::json!({}),
        "celery",
    );
    let message = taskhost::protocol::TaskMessage::decode(raw.as_bytes()).expect("decode");
    let task = taskhost::worker::task_record(&message, None, "bench@localhost");
    // A thread of its own, so that its CPU clock counts the loop and nothing else.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime");
        let bare = Bare::new(&wasm);
        runtime.block_on(async {
            bare.fresh(&task, tasks / 10).await;
            let start = thread_cpu_seconds();
            bare.fresh(&task, tasks).await;
            let fresh_us = per_task(start, tasks);
            let mut kept = bare.instance().await;
            kept.call(&task, tasks / 10).await;
            let start = thread_cpu_seconds();
            kept.call(&task, tasks).await;
            Floor {
                fresh_us,
                kept_us: per_task(start, tasks),
            }
        })
    })
    .join()
    .expect("the bare loop")
}

/// CPU µs of this thread per task since `start`, over `tasks` tasks.
fn per_task(start: f64, tasks: usize) -> f64 {
    (thread_cpu_seconds() - start) * 1e6 / tasks.max(1) as f64
}

/// This thread's time on a CPU (the scheduler's count, in nanoseconds).
fn thread_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")
        .expect("read /proc/thread-self/schedstat");
    let ns: f64 = stat
        .split_whitespace()
        .next()
        .and_then(|ns| ns.parse().ok())
        .expect("schedstat starts with the time on a CPU, ns");
    ns / 1e9
}

struct Bare {
    engine: Engine,
    pre: bindings::PluginPre<BareState>,
}

struct BareState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
}

impl WasiHttpView for BareState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: wasmtime_wasi_http::default_hooks(),
        }
    }
}

impl WasiView for BareState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// One instance and its store.
struct Kept {
    store: Store<BareState>,
    plugin: bindings::Plugin,
}

impl Kept {
    /// Runs `task` `times` times in this instance.
    async fn call(&mut self, task: &Task, times: usize) {
        for _ in 0..times {
            let result = self
                .plugin
                .taskhost_plugin_handler()
                .call_run(&mut self.store, task)
                .await
                .expect("call");
            assert_eq!(result.as_deref().ok(), Some("3"), "demo.add(1, 2)");
        }
    }
}

impl Bare {
    fn new(wasm: &[u8]) -> Self {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(SLOTS)
            .total_core_instances(SLOTS * 8)
            .total_memories(SLOTS * 2)
            .total_tables(SLOTS * 4)
            .total_stacks(SLOTS)
            .max_memory_size(Limits::default().memory_bytes)
            .linear_memory_keep_resident(taskhost::sandbox::KEEP_RESIDENT)
            .table_keep_resident(taskhost::sandbox::KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).expect("engine");
        let component = Component::new(&engine, wasm).expect("compile demo.wasm");
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).expect("link WASI");
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).expect("link WASI HTTP");
        trap_host_interface(&engine, &mut linker, &component);
        let pre = bindings::PluginPre::new(linker.instantiate_pre(&component).expect("pre"))
            .expect("plugin pre");
        Self { engine, pre }
    }

    /// A fresh store and instance.
    async fn instance(&self) -> Kept {
        let state = BareState {
            wasi: WasiCtx::builder().build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
        };
        let mut store = Store::new(&self.engine, state);
        store.set_epoch_deadline(u64::MAX / 2);
        let plugin = self
            .pre
            .instantiate_async(&mut store)
            .await
            .expect("instantiate");
        Kept { store, plugin }
    }

    /// Runs `task` `times` times, each in a fresh instance.
    async fn fresh(&self, task: &Task, times: usize) {
        for _ in 0..times {
            self.instance().await.call(task, 1).await;
        }
    }
}

/// Defines every function of the `taskhost:plugin` and `wasi:otel` interfaces `component`
/// imports as a trap (wasmtime's `define_unknown_imports_as_traps` would also redefine the WASI
/// interfaces the plugin imports under a newer patch version than the linker's, with resource
/// types of its own that then do not match).
fn trap_host_interface(engine: &Engine, linker: &mut Linker<BareState>, component: &Component) {
    for (name, item) in component.component_type().imports(engine) {
        let ComponentItem::ComponentInstance(instance) = item.ty else {
            continue;
        };
        if !(name.starts_with("taskhost:plugin/") || name.starts_with("wasi:otel/")) {
            continue;
        }
        let mut linked = linker.instance(name).expect("the host interface, once");
        for (func, export) in instance.exports(engine) {
            if matches!(export.ty, ComponentItem::ComponentFunc(_)) {
                linked
                    .func_new(func, |_, _, _, _| {
                        Err(wasmtime::Error::msg("the bare loop has no host interface"))
                    })
                    .expect("a trapping function");
            }
        }
    }
}
