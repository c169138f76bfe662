//! Instances kept between tasks of one plugin, in two ways:
//!
//! - recycled (the default, for every plugin whose instances can be: [`recycle`]): after a task
//!   that returned, the instance is put back in the state its instantiation left it in and
//!   waits for the next task of its plugin, which it serves as a fresh instance would;
//! - reused (`reuse_instances = N`, an author's opt-in): the instance serves up to N tasks with
//!   its state carried from one to the next, and is then recycled or dropped.
//!
//! An instance that trapped, hit a limit or was interrupted is never kept. Kept instances hold
//! slots of the shared pool, so an instantiation (a task's or a plugin load's) that finds the
//! pool full evicts the longest-idle one, whatever its plugin, and the promise that an
//! admitted task finds its share free still holds.

#[cfg(doc)]
use super::recycle;
use super::{PluginPre, Scope, TaskState, bindings};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use wasmtime::Store;
use wasmtime::component::{Instance, Pristine};

/// A store and its instance between two tasks.
pub(super) struct Kept {
    pub(super) store: Store<TaskState>,
    pub(super) instance: Fresh,
    /// Tasks it has served since it was made or last recycled.
    pub(super) served: u32,
    /// The linked plugin it is an instance of: a reloaded plugin is another one, and an
    /// instance of the one it replaced is never used again.
    plugin: Weak<()>,
}

/// An instance, its bindings, and its state just after instantiation when it can be recycled.
pub(super) struct Fresh {
    pub(super) plugin: bindings::Plugin,
    instance: Instance,
    pristine: Option<Pristine>,
}

/// Every kept instance of the sandbox, longest idle first, and how many instances were made
/// and recycled.
#[derive(Default)]
pub(super) struct Warm {
    kept: Mutex<Vec<Kept>>,
    instantiated: AtomicU64,
    recycled: AtomicU64,
}

impl Warm {
    /// A kept instance of `pre`'s plugin under the grants `scope` runs with, if one is idle.
    /// Drops on the way the instances of plugins that are gone (reloaded or removed), and
    /// this plugin's under grants it no longer has.
    pub(super) fn take(&self, pre: &PluginPre, scope: &Scope) -> Option<Kept> {
        let mut kept = crate::lock(&self.kept);
        let ours = |k: &Kept| std::ptr::eq(k.plugin.as_ptr(), Arc::as_ptr(&pre.identity));
        let gone: Vec<Kept> = extract(&mut kept, |k| {
            k.plugin.strong_count() == 0
                || (ours(k) && !Arc::ptr_eq(&k.store.data().scope.grants, &scope.grants))
        });
        let found = kept.iter().rposition(ours).map(|i| kept.remove(i));
        drop(kept);
        // Stores are dropped outside the lock: freeing an instance returns its memory.
        drop(gone);
        found
    }

    /// After a task that returned: keeps the instance of `pre`'s plugin that has now served
    /// `served` tasks, as it is while the plugin's `reuse_instances` allows, else recycled if
    /// it can be; otherwise drops it.
    pub(super) fn settle(
        &self,
        pre: &PluginPre,
        mut store: Store<TaskState>,
        instance: Fresh,
        served: u32,
    ) {
        let served = if served < store.data().scope.grants.limits.reuse_instances {
            served
        } else {
            let Some(pristine) = &instance.pristine else {
                return;
            };
            if let Err(e) = instance.instance.restore(&mut store, pristine) {
                tracing::debug!(plugin = %store.data().scope.plugin, "instance not recycled: {e:#}");
                return;
            }
            // What the task left in the store (its WASI streams, HTTP requests, captured
            // output, host resources) goes now, not when the next task comes.
            let idle = store.data().scope.idle();
            *store.data_mut() = TaskState::new(idle);
            self.recycled.fetch_add(1, Ordering::Relaxed);
            0
        };
        crate::lock(&self.kept).push(Kept {
            store,
            instance,
            served,
            plugin: Arc::downgrade(&pre.identity),
        });
    }

    /// Discards the longest-idle kept instance, freeing its slot of the pool; false if none
    /// is kept.
    pub(super) fn evict(&self) -> bool {
        let mut kept = crate::lock(&self.kept);
        let oldest = (!kept.is_empty()).then(|| kept.remove(0));
        drop(kept);
        oldest.is_some()
    }

    /// Instances made, and instances recycled, since the sandbox was made.
    pub(super) fn counts(&self) -> (u64, u64) {
        (
            self.instantiated.load(Ordering::Relaxed),
            self.recycled.load(Ordering::Relaxed),
        )
    }
}

/// Removes the elements `gone` selects, keeping the others in order.
fn extract<T>(items: &mut Vec<T>, gone: impl Fn(&T) -> bool) -> Vec<T> {
    let (out, keep): (Vec<T>, Vec<T>) = std::mem::take(items).into_iter().partition(gone);
    *items = keep;
    out
}

/// Instantiates `pre` in `store`; a pool full only because of kept instances makes room by
/// discarding them, longest idle first. Records the instance's state for recycling when its
/// plugin allows it.
pub(super) async fn instantiate(
    warm: &Warm,
    pre: &PluginPre,
    store: &mut Store<TaskState>,
) -> wasmtime::Result<Fresh> {
    let instance = loop {
        match pre.pre.instance_pre().instantiate_async(&mut *store).await {
            Err(e) if e.is::<wasmtime::PoolConcurrencyLimitError>() && warm.evict() => {}
            instantiated => break instantiated?,
        }
    };
    warm.instantiated.fetch_add(1, Ordering::Relaxed);
    let plugin = pre.indices.load(&mut *store, &instance)?;
    let pristine = if pre.recyclable {
        instance
            .pristine(&mut *store)
            .inspect_err(|e| {
                let plugin = &store.data().scope.plugin;
                tracing::debug!(%plugin, "instances of this plugin are not recycled: {e:#}");
            })
            .ok()
    } else {
        None
    };
    Ok(Fresh {
        plugin,
        instance,
        pristine,
    })
}

impl TaskState {
    /// Readies a kept instance's state for its next task.
    pub(super) fn begin(&mut self, scope: Scope) {
        (self.log_budget, self.http_policy) = Self::per_task(&scope);
        self.limiter.memory_denied = false;
        self.scope = scope;
    }
}
