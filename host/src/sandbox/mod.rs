//! The sandbox: one wasmtime engine, the linker of everything a plugin may import, and running
//! one task in an instance of its plugin under the plugin's limits: a fresh one (made for it,
//! or an earlier task's put back in its state after instantiation: `recycle`), or with
//! `reuse_instances` one an earlier task left as it was (`reuse`).
//!
//! Owns: engine configuration (pooling allocator, epoch interruption for CPU fairness), the
//! per-task store state ([`TaskState`], `state`), pre-warming interpreted plugins at build time
//! (`prewarm`), the host side of the WIT imports (`host_api`, `http`,
//! `output`), and turning whatever happens in a run (result, failure, trap, time limit) into
//! one typed [`Outcome`]. Never sees Redis (`host/tests/layout.rs` keeps it so), and of Celery
//! only the exception shape of a failure.
//!
//! Default deny: a store gets a WASI context with no preopened directories (but a `taskhost dev`
//! build's own project, read-only: [`crate::config::grants::Grants::dev_sources`]), no
//! environment, no arguments, no sockets or name lookup, captured stdio, and outbound HTTP only
//! through [`http::HttpPolicy`].

mod compute;
mod host_api;
mod http;
mod http_send;
mod incremental;
mod limits;
mod no_http;
mod otel;
mod outcome;
mod output;
mod prewarm;
mod recycle;
mod reuse;
mod state;
mod ticker;

pub use http::is_private;
pub use incremental::private_dir;
pub use outcome::{Failure, FailureKind, Outcome};
pub use recycle::recyclable;
pub use state::TaskState;

use crate::config::Grants;
use compute::Compute;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use wasmtime::component::{Component, Linker, types::ComponentItem};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

/// Generated from `wit/plugin.wit`.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../wit",
        // Every host call is a TRACE-level span of its own (`RUST_LOG=taskhost=trace`), at
        // the cost of a disabled callsite's check otherwise; `config` is not, so that a
        // plugin's secrets never reach a log.
        imports: {
            "taskhost:plugin/host.config": async,
            default: async | tracing,
        },
        exports: { default: async },
    });
}

pub use bindings::exports::taskhost::plugin::handler::{Task, TaskInfo};
pub use bindings::taskhost::plugin::types::TaskDefaults;

/// The WIT package plugins are built against, and the versions of it this host runs.
pub const WIT_PACKAGE: &str = "taskhost:plugin";
pub const SUPPORTED_WIT_VERSIONS: &[&str] = &["0.1.0", "0.1.1"];

/// Bytes of each pooled memory and table kept resident and reset in place between instances:
/// enough for what an interpreter's task dirties (the Python template's `add` writes about
/// 180 pages scattered over its heap), which would otherwise fault back in, one page at a
/// time, in the next instance.
pub const KEEP_RESIDENT: usize = 4 * 1024 * 1024;

/// Publishes a running task's progress (`update-state`).
pub trait Progress: Send + Sync {
    fn update(
        &self,
        state: String,
        meta: serde_json::Value,
    ) -> Pin<Box<dyn Future<Output = Result<(), ProgressError>> + Send + '_>>;
}

/// Why progress could not be published; the plugin's `update-state` gets the text.
#[derive(Debug, thiserror::Error)]
#[error("cannot store the progress: {0}")]
pub struct ProgressError(pub String);

/// Every instance of the pool was in use when a task was to start: it did not run, and can
/// be started again once one is free.
#[derive(Debug, thiserror::Error)]
#[error("the instance pool is full: {0}")]
pub struct PoolFull(String);

/// Takes the tasks a running task sends (`send`).
pub trait Outbox: Send + Sync {
    /// Accepts Celery's signature JSON; returns the id of what will be sent.
    fn send(
        &self,
        signature: serde_json::Value,
    ) -> Pin<Box<dyn Future<Output = Result<String, SendError>> + Send + '_>>;
}

/// Why a task could not be sent; the plugin's `send` gets the text.
#[derive(Debug, thiserror::Error)]
#[error("cannot send: {0}")]
pub struct SendError(pub String);

/// Who is running: the plugin, the task, and what the plugin is granted.
#[derive(Clone)]
pub struct Scope {
    pub plugin: Arc<str>,
    pub task_name: String,
    pub task_id: Arc<str>,
    pub grants: Arc<Grants>,
    pub progress: Option<Arc<dyn Progress>>,
    /// Where the tasks it sends go; none where there is no broker (`taskhost exec`).
    pub outbox: Option<Arc<dyn Outbox>>,
    /// Where its own spans (`wasi:otel`) go; none when the task is not traced.
    pub trace: Option<Arc<crate::telemetry::guest::GuestTrace>>,
}

impl Scope {
    /// The scope of an instance between tasks: its plugin and grants, no task.
    fn idle(&self) -> Self {
        Scope {
            plugin: self.plugin.clone(),
            task_name: String::new(),
            task_id: "-".into(),
            grants: self.grants.clone(),
            progress: None,
            outbox: None,
            trace: None,
        }
    }

    /// Who runs while a plugin is built: no task, and the default grants (nothing granted).
    fn building() -> Self {
        Scope {
            plugin: "build".into(),
            task_name: String::new(),
            task_id: "".into(),
            grants: crate::config::GrantTable::default().defaults(),
            progress: None,
            outbox: None,
            trace: None,
        }
    }
}

/// Why wasmtime would not take a component: its pool share, or anything else.
fn prepare_error(e: &wasmtime::Error) -> PrepareError {
    let reason = format!("{e:#}");
    // wasmtime says so in words only: its pooling allocator's per-component check.
    if reason.contains("in the pooling allocator") {
        PrepareError::PoolShare(reason)
    } else {
        PrepareError::Compile(reason)
    }
}

/// A component linked against the host's imports, ready to instantiate per task. Clones are
/// the same plugin: instances kept for reuse serve only it, never a reloaded one.
#[derive(Clone)]
pub struct PluginPre {
    pre: bindings::PluginPre<TaskState>,
    indices: bindings::PluginIndices,
    /// Its instances may be recycled between tasks ([`recycle`]).
    recyclable: bool,
    identity: Arc<()>,
}

/// Why a component cannot be used as a plugin.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("not a WebAssembly component: {0}")]
    Compile(String),
    #[error(
        "it needs more of the instance pool than one component may take ([limits] \
         component_core_instances, component_memories, component_tables): {0}"
    )]
    PoolShare(String),
    #[error("not a taskhost plugin: it exports no {WIT_PACKAGE}/handler interface (exports: {0})")]
    NoHandler(String),
    #[error(
        "built for {WIT_PACKAGE}@{found}, but this host supports {WIT_PACKAGE}@{supported}: rebuild it against this host's wit/",
        supported = SUPPORTED_WIT_VERSIONS.join(", ")
    )]
    WitVersion { found: String },
    #[error("cannot link: {0}")]
    Link(String),
    #[error("its version() or tasks() failed: {0}")]
    Tasks(String),
}

/// Sizing of the sandbox.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Instances that may exist at once (running tasks plus plugin loads).
    pub max_instances: u32,
    /// The largest linear memory any plugin may be granted.
    pub max_memory_bytes: usize,
    /// The largest table any plugin may be granted, elements.
    pub max_table_elements: u32,
    /// The WebAssembly stack of every instance.
    pub stack_bytes: usize,
    /// What one component may take of the pool (the pool holds this much per instance).
    pub component: crate::config::ComponentCaps,
    /// Where Cranelift keeps each compiled function for the next compile of a component that
    /// shares it (`incremental`); none: every compile starts from nothing.
    pub incremental_dir: Option<std::path::PathBuf>,
    pub compiler: crate::config::Compiler,
}

/// The engine and linker shared by every plugin and task.
pub struct Sandbox {
    engine: Engine,
    /// Everything a plugin may import; a plugin with no HTTP grant links against a copy in
    /// which `wasi:http` traps (`no_http`).
    linker: Linker<TaskState>,
    max_memory_bytes: usize,
    max_table_elements: u32,
    compute: Compute,
    /// Instances kept between tasks (`reuse_instances`).
    warm: Arc<reuse::Warm>,
    ticker: Arc<ticker::Ticker>,
}

impl Sandbox {
    /// Builds the engine (pooling allocator sized by `options`, epoch interruption) and the
    /// linker, and starts the epoch ticker.
    pub fn new(options: &SandboxOptions) -> anyhow::Result<Self> {
        let n = options.max_instances.max(1);
        let caps = options.component;
        let mut pool = PoolingAllocationConfig::default();
        // Each instance may take its share and no more (a Rust component holds a few core
        // instances, the module and its adapter shims, and one or two memories and tables):
        // a component needing more is refused when it is compiled, so one plugin can never
        // leave the others' instances without room.
        pool.total_component_instances(n)
            .max_core_instances_per_component(caps.core_instances)
            .max_memories_per_component(caps.memories)
            .max_tables_per_component(caps.tables)
            .total_core_instances(n.saturating_mul(caps.core_instances))
            .total_memories(n.saturating_mul(caps.memories))
            .total_tables(n.saturating_mul(caps.tables))
            .total_stacks(n)
            .max_memory_size(options.max_memory_bytes)
            .table_elements(usize::try_from(options.max_table_elements).unwrap_or(usize::MAX));
        // A finished instance's pages are reset to the plugin's image in place: with Linux's
        // PAGEMAP_SCAN (6.7 and later) only the pages the task dirtied, up to KEEP_RESIDENT
        // of each memory and table, are rewritten; the rest is decommitted. The default,
        // madvise on every page, cost a TLB shootdown across the worker's threads and a
        // refault of every page by the next task: more than half of a small task's CPU.
        // (wasmtime as released stops scanning at 32 runs of dirty pages and decommits the
        // rest; the vendored copy scans on: vendor/README.md.)
        pool.linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .max_wasm_stack(options.stack_bytes)
            // The fiber a task runs on holds the wasm stack plus the host calls made from it.
            .async_stack_size(options.stack_bytes + 1024 * 1024)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        if options.compiler == crate::config::Compiler::Fast {
            config.strategy(wasmtime::Strategy::Winch);
        } else if let Some(dir) = &options.incremental_dir {
            match incremental::DiskStore::new(dir) {
                Ok(store) => {
                    config.enable_incremental_compilation(Arc::new(store))?;
                }
                Err(e) => tracing::warn!(
                    dir = %dir.display(),
                    "no incremental compilation cache ({e}): every compile starts from nothing"
                ),
            }
        }
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        bindings::Plugin::add_to_linker::<TaskState, wasmtime::component::HasSelf<TaskState>>(
            &mut linker,
            |state| state,
        )?;
        otel::add_to_linker(&mut linker)?;
        let ticker = ticker::Ticker::start(&engine)?;
        Ok(Self {
            engine,
            linker,
            max_memory_bytes: options.max_memory_bytes,
            max_table_elements: options.max_table_elements,
            compute: Compute::new()?,
            warm: Arc::default(),
            ticker,
        })
    }

    /// Instances made, and instances recycled (put back in their state after instantiation
    /// to serve another task), since the sandbox was made.
    pub fn instance_counts(&self) -> (u64, u64) {
        self.warm.counts()
    }

    /// The largest linear memory an instance can have (fixed when the sandbox is made).
    pub fn max_memory_bytes(&self) -> usize {
        self.max_memory_bytes
    }

    /// The largest table an instance can have (fixed when the sandbox is made).
    pub fn max_table_elements(&self) -> u32 {
        self.max_table_elements
    }

    /// Compiles a component (CPU-heavy: call it off the async runtime's workers).
    pub fn compile(&self, wasm: &[u8]) -> Result<Component, PrepareError> {
        Component::new(&self.engine, wasm).map_err(|e| prepare_error(&e))
    }

    /// The compiled code of a component, for the precompile cache.
    pub fn serialize(&self, component: &Component) -> Result<Vec<u8>, PrepareError> {
        component
            .serialize()
            .map_err(|e| PrepareError::Compile(format!("cannot serialize: {e:#}")))
    }

    /// Loads compiled code written by [`Sandbox::serialize`] to the file `path`, mapped rather
    /// than read: the code and the memory image are the file's pages, shared by every worker
    /// on the machine and never a private copy per plugin.
    ///
    /// # Safety of the call
    /// The file holds native code that will run in this process: the caller must trust it to
    /// be what `serialize` wrote, and that no one changes it while it is mapped. Engine
    /// incompatibilities (another wasmtime, other settings) are detected and reported as
    /// errors; anything else is not.
    #[allow(unsafe_code)]
    pub fn deserialize_file(&self, path: &std::path::Path) -> Result<Component, PrepareError> {
        // SAFETY: see above. The only caller is the precompile cache, which checks a SHA-256
        // written beside the entry first: that catches a torn or corrupted file, not a forged
        // one, so the cache directory must be writable only by the worker's user (and entries
        // are only ever replaced by a rename, never rewritten in place).
        unsafe { Component::deserialize_file(&self.engine, path) }.map_err(|e| prepare_error(&e))
    }

    /// Identifies the engine settings compiled code depends on (wasmtime version, target,
    /// options): part of the precompile cache key.
    pub fn engine_fingerprint(&self) -> String {
        use sha2::Digest;
        use std::hash::Hash;
        struct Sha(sha2::Sha256);
        impl std::hash::Hasher for Sha {
            fn finish(&self) -> u64 {
                0
            }
            fn write(&mut self, bytes: &[u8]) {
                self.0.update(bytes);
            }
        }
        let mut hasher = Sha(sha2::Sha256::new());
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        hasher
            .0
            .finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Checks a compiled component is a plugin for a WIT version this host supports, and links
    /// it against the host's imports; with `http` false (no HTTP grant) every `wasi:http`
    /// function it imports traps. `recyclable`: what [`recyclable`] said of its bytes.
    pub fn link(
        &self,
        component: &Component,
        http: bool,
        recyclable: bool,
    ) -> Result<(PluginPre, String), PrepareError> {
        let version = self.wit_version(component)?;
        let trapped;
        let linker = if http {
            &self.linker
        } else {
            trapped = no_http::linker_for(&self.engine, &self.linker, component)
                .map_err(|e| PrepareError::Link(format!("{e:#}")))?;
            &trapped
        };
        let instance_pre = linker
            .instantiate_pre(component)
            .map_err(|e| PrepareError::Link(format!("{e:#}")))?;
        let link_error = |e: wasmtime::Error| PrepareError::Link(format!("{e:#}"));
        let indices = bindings::PluginIndices::new(&instance_pre).map_err(link_error)?;
        let pre = bindings::PluginPre::new(instance_pre).map_err(link_error)?;
        let pre = PluginPre {
            pre,
            indices,
            recyclable,
            identity: Arc::new(()),
        };
        Ok((pre, version))
    }

    /// The version of the `handler` interface the component exports.
    fn wit_version(&self, component: &Component) -> Result<String, PrepareError> {
        let prefix = format!("{WIT_PACKAGE}/handler");
        let ty = component.component_type();
        let mut names = Vec::new();
        for (name, item) in ty.exports(&self.engine) {
            if let (Some(rest), ComponentItem::ComponentInstance(_)) =
                (name.strip_prefix(&prefix), item.ty)
            {
                let version = rest.strip_prefix('@').unwrap_or("unversioned").to_owned();
                if SUPPORTED_WIT_VERSIONS.contains(&version.as_str()) {
                    return Ok(version);
                }
                return Err(PrepareError::WitVersion { found: version });
            }
            names.push(name.to_owned());
        }
        Err(PrepareError::NoHandler(if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }))
    }

    fn store(engine: &Engine, scope: Scope, computing: Arc<AtomicBool>) -> Store<TaskState> {
        let mut store = Store::new(engine, TaskState::new(scope));
        store.limiter(|state| &mut state.limiter);
        compute::yield_at_ticks(&mut store, computing);
        store
    }

    /// Asks a linked plugin for its declared version and the tasks it serves.
    pub async fn describe(
        &self,
        pre: &PluginPre,
        scope: Scope,
    ) -> Result<(String, Vec<TaskInfo>), PrepareError> {
        let (engine, warm, pre) = (self.engine.clone(), self.warm.clone(), pre.clone());
        let running = self.ticker.running();
        let described = self
            .compute
            .run(async move {
                let _running = running;
                let mut store = Self::store(&engine, scope, Arc::default());
                let call = async {
                    // Kept instances give way to a plugin load as to a task.
                    let fresh = reuse::instantiate(&warm, &pre, &mut store).await?;
                    let handler = fresh.plugin.taskhost_plugin_handler();
                    let version = handler.call_version(&mut store).await?;
                    let tasks = handler.call_tasks(&mut store).await?;
                    Ok::<_, wasmtime::Error>((version, tasks))
                };
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(described)) => Ok(described),
                    Ok(Err(e)) => {
                        // What the guest wrote before it failed (a Python traceback, a panic
                        // message) is the reason its author needs.
                        let (said, _) = store.data().stderr.take();
                        let said = said.trim_end();
                        Err(PrepareError::Tasks(if said.is_empty() {
                            format!("{e:#}")
                        } else {
                            format!("{said}\n{e:#}")
                        }))
                    }
                    Err(_) => Err(PrepareError::Tasks("did not return within 10 s".into())),
                }
            })
            .await;
        described.unwrap_or_else(|e| Err(PrepareError::Tasks(format!("guest thread failed: {e}"))))
    }

    /// Runs one task: in a fresh instance, or in one its plugin's earlier task left
    /// (`reuse_instances`); on the caller's thread until it has computed for an epoch tick,
    /// then on the guest threads. `hard_limit` interrupts it.
    ///
    /// # Errors
    /// [`PoolFull`] when no instance was free: the task did not start.
    pub async fn run(
        &self,
        pre: &PluginPre,
        scope: Scope,
        task: &Task,
        hard_limit: Option<Duration>,
    ) -> Result<Outcome, PoolFull> {
        let (engine, warm, pre, task) = (
            self.engine.clone(),
            self.warm.clone(),
            pre.clone(),
            task.clone(),
        );
        let computing = Arc::new(AtomicBool::new(false));
        let flag = computing.clone();
        let running = self.ticker.running();
        let outcome = self
            .compute
            .run_adaptive(
                async move {
                    let _running = running;
                    let run = Self::run_here(&engine, &warm, &pre, scope, &task, hard_limit, flag);
                    run.await
                },
                computing,
            )
            .await;
        outcome.unwrap_or_else(|e| {
            Ok(Outcome::failed(
                FailureKind::Trap,
                "PluginTrap",
                format!("guest thread failed: {e}"),
            ))
        })
    }

    async fn run_here(
        engine: &Engine,
        warm: &reuse::Warm,
        pre: &PluginPre,
        scope: Scope,
        task: &Task,
        hard_limit: Option<Duration>,
        computing: Arc<AtomicBool>,
    ) -> Result<Outcome, PoolFull> {
        let (plugin, task_name, task_id) = (
            scope.plugin.clone(),
            scope.task_name.clone(),
            scope.task_id.clone(),
        );
        let (mut store, kept_instance, served) = match warm.take(pre, &scope) {
            Some(mut kept) => {
                kept.store.data_mut().begin(scope);
                compute::yield_at_ticks(&mut kept.store, computing);
                (kept.store, Some(kept.instance), kept.served)
            }
            None => (Self::store(engine, scope, computing), None, 0),
        };
        let call = async {
            let instance = match kept_instance {
                Some(instance) => instance,
                None => reuse::instantiate(warm, pre, &mut store).await?,
            };
            let returned = instance
                .plugin
                .taskhost_plugin_handler()
                .call_run(&mut store, task)
                .await?;
            Ok::<_, wasmtime::Error>((instance, returned))
        };
        let result = match hard_limit {
            Some(limit) => tokio::time::timeout(limit, call).await.map_err(|_| limit),
            None => Ok(call.await),
        };
        let (stdout, stderr) = output::drain(&mut store, &plugin, &task_name, &task_id);
        let limits = &store.data().scope.grants.limits;
        Ok(match result {
            Err(limit) => Outcome::failed(
                FailureKind::TimeLimit,
                "TimeLimitExceeded",
                format!("hard time limit ({:.1} s) exceeded", limit.as_secs_f64()),
            ),
            Ok(Ok((instance, returned))) => {
                let outcome = Outcome::returned(returned, limits.result_bytes);
                warm.settle(pre, store, instance, served + 1);
                outcome
            }
            Ok(Err(_)) if store.data().limiter.memory_denied => {
                let mut exception = crate::protocol::Exception::new(
                    "MemoryLimitExceeded",
                    format!(
                        "the plugin needed more than its {} MiB of memory (memory_mb)",
                        limits.memory_bytes >> 20
                    ),
                );
                exception.traceback = (!stderr.is_empty()).then(|| stderr.clone());
                Outcome::Failure(Failure {
                    kind: FailureKind::Memory,
                    exception,
                })
            }
            Ok(Err(error)) if error.is::<wasmtime::PoolConcurrencyLimitError>() => {
                return Err(PoolFull(format!("{error:#}")));
            }
            Ok(Err(error)) => outcome::trapped(&error, &stderr, &stdout),
        })
    }
}
