//! Pre-warming an interpreted plugin when it is built: the component is instantiated once and
//! asked its `version()` and `tasks()` (what every worker asks when it loads a plugin), and the
//! memory and globals it then holds become the image every fresh instance starts from.
//!
//! Why: componentize-py and componentize-js snapshot the interpreter after importing the
//! plugin's module, but the first call into a fresh instance still does work of its own every
//! time (StarlingMonkey, the JavaScript engine, fills caches and compiles the functions its
//! glue calls: about 0.3 ms; CPython specialises its bytecode), and the pages it writes doing
//! so are pages the pool must reset after every task. Done once here, neither is paid per task.
//! The Python SDK's `tasks()` also runs its own path of a task call (decoding, the request,
//! encoding) with a task of its own the first time it is asked, so that the snapshot holds that
//! path specialised too; an author's tasks are never called here.
//!
//! What the snapshot may not hold is anything a task could tell apart from a fresh start:
//! `version()` and `tasks()` read the plugin's own registrations and touch no handle (no WASI
//! stream, no HTTP request), so the component's handle tables are empty in the snapshot as in
//! a fresh instance. Random state is the SDKs' to renew per task (a snapshot taken at build
//! time holds the seed its interpreter drew then, with or without this step).

use super::{Sandbox, Scope, bindings};
use anyhow::Context as _;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::Store;
use wasmtime::component::{Component, ComponentNamedList, Instance, Lift};

/// How long the pre-warming calls may run before the build gives up on them.
const PREWARM_LIMIT: Duration = Duration::from_secs(60);

impl Sandbox {
    /// The component pre-warmed: its state after `version()` and `tasks()` as its initial
    /// state. Fails if the component cannot be instantiated or either call fails.
    pub async fn prewarm(&self, component: &[u8]) -> anyhow::Result<Vec<u8>> {
        let (engine, linker) = (self.engine.clone(), self.linker.clone());
        let running = self.ticker.running();
        let warmed = component_init_transform::initialize(component, move |instrumented| {
            Box::pin(async move {
                let _running = running;
                let component = Component::new(&engine, &instrumented)
                    .map_err(anyhow::Error::from)
                    .context("cannot compile the component to pre-warm it")?;
                let scope = Scope::building();
                let mut store = Sandbox::store(&engine, scope, Arc::default());
                let warm = async {
                    let instance = linker.instantiate_async(&mut store, &component).await?;
                    let plugin = bindings::Plugin::new(&mut store, &instance)?;
                    let handler = plugin.taskhost_plugin_handler();
                    handler.call_version(&mut store).await?;
                    handler.call_tasks(&mut store).await?;
                    Ok::<_, wasmtime::Error>(instance)
                };
                let instance = tokio::time::timeout(PREWARM_LIMIT, warm)
                    .await
                    .map_err(|_| anyhow::anyhow!("version() and tasks() did not return"))?
                    .map_err(anyhow::Error::from)
                    .context("version() or tasks() failed")?;
                Ok(Box::new(Warmed { store, instance })
                    as Box<dyn component_init_transform::Invoker>)
            })
        })
        .await?;
        Ok(warmed)
    }
}

/// The instance after the pre-warming calls, read back through the getters the transform adds.
struct Warmed {
    store: Store<super::TaskState>,
    instance: Instance,
}

impl Warmed {
    async fn call<R>(&mut self, name: &str) -> anyhow::Result<R>
    where
        R: ComponentNamedList + Lift + Send + Sync + 'static,
    {
        let func = self
            .instance
            .get_typed_func::<(), R>(&mut self.store, name)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("no {name} export"))?;
        let value = func.call_async(&mut self.store, ()).await?;
        Ok(value)
    }
}

#[async_trait::async_trait]
impl component_init_transform::Invoker for Warmed {
    async fn call_s32(&mut self, function: &str) -> anyhow::Result<i32> {
        Ok(self.call::<(i32,)>(function).await?.0)
    }
    async fn call_s64(&mut self, function: &str) -> anyhow::Result<i64> {
        Ok(self.call::<(i64,)>(function).await?.0)
    }
    async fn call_f32(&mut self, function: &str) -> anyhow::Result<f32> {
        Ok(self.call::<(f32,)>(function).await?.0)
    }
    async fn call_f64(&mut self, function: &str) -> anyhow::Result<f64> {
        Ok(self.call::<(f64,)>(function).await?.0)
    }
    async fn call_list_u8(&mut self, function: &str) -> anyhow::Result<Vec<u8>> {
        Ok(self.call::<(Vec<u8>,)>(function).await?.0)
    }
}
