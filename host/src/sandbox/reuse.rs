//! Instances kept between tasks of one plugin (`reuse_instances = N`): after a run that ended
//! cleanly, its store and instance wait here for the next task of the same plugin under the
//! same grants, which then pays for neither instantiation nor the refault of the instance's
//! memory. An instance serves at most N tasks; one that trapped, hit a limit or was
//! interrupted is never kept. Kept instances hold slots of the shared pool, so an
//! instantiation (a task's or a plugin load's) that finds the pool full evicts the
//! longest-idle one, whatever its plugin, and the promise that an admitted task finds its
//! share free still holds.

use super::{PluginPre, Scope, TaskState, bindings};
use std::sync::{Arc, Mutex, Weak};
use wasmtime::Store;

/// A store and its instance between two tasks.
pub(super) struct Kept {
    pub(super) store: Store<TaskState>,
    pub(super) instance: bindings::Plugin,
    /// Tasks it has served.
    pub(super) served: u32,
    /// The linked plugin it is an instance of: a reloaded plugin is another one, and an
    /// instance of the one it replaced is never used again.
    plugin: Weak<()>,
}

/// Every kept instance of the sandbox, longest idle first.
#[derive(Default)]
pub(super) struct Warm(Mutex<Vec<Kept>>);

impl Warm {
    /// A kept instance of `pre`'s plugin under the grants `scope` runs with, if one is idle.
    /// Drops on the way the instances of plugins that are gone (reloaded or removed), and
    /// this plugin's under grants it no longer has.
    pub(super) fn take(&self, pre: &PluginPre, scope: &Scope) -> Option<Kept> {
        let mut kept = crate::lock(&self.0);
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

    /// Keeps an instance of `pre`'s plugin that has served `served` tasks, for the next.
    pub(super) fn keep(
        &self,
        pre: &PluginPre,
        store: Store<TaskState>,
        instance: bindings::Plugin,
        served: u32,
    ) {
        crate::lock(&self.0).push(Kept {
            store,
            instance,
            served,
            plugin: Arc::downgrade(&pre.identity),
        });
    }

    /// Discards the longest-idle kept instance, freeing its slot of the pool; false if none
    /// is kept.
    pub(super) fn evict(&self) -> bool {
        let mut kept = crate::lock(&self.0);
        let oldest = (!kept.is_empty()).then(|| kept.remove(0));
        drop(kept);
        oldest.is_some()
    }
}

/// Removes the elements `gone` selects, keeping the others in order.
fn extract<T>(items: &mut Vec<T>, gone: impl Fn(&T) -> bool) -> Vec<T> {
    let (out, keep): (Vec<T>, Vec<T>) = std::mem::take(items).into_iter().partition(gone);
    *items = keep;
    out
}

/// Instantiates `pre` in `store`; a pool full only because of kept instances makes room by
/// discarding them, longest idle first.
pub(super) async fn instantiate(
    warm: &Warm,
    pre: &PluginPre,
    store: &mut Store<TaskState>,
) -> wasmtime::Result<bindings::Plugin> {
    loop {
        match pre.pre.instantiate_async(&mut *store).await {
            Err(e) if e.is::<wasmtime::PoolConcurrencyLimitError>() && warm.evict() => {}
            instantiated => return instantiated,
        }
    }
}

impl TaskState {
    /// Readies a kept instance's state for its next task.
    pub(super) fn begin(&mut self, scope: Scope) {
        (self.log_budget, self.http_policy) = Self::per_task(&scope);
        self.limiter.memory_denied = false;
        self.scope = scope;
    }
}
