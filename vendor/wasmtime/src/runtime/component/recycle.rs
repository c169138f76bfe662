//! taskhost patch: recycling a component instance (see `vendor/README.md` in
//! taskhost): a snapshot of the instance's state just after instantiation, and
//! putting that state back after a call, so the instance serves the next call as
//! a fresh one would, without being instantiated again.
//!
//! The core instances' state is put back by `vm::Instance::recycle_restore`
//! (memories, tables, globals, runtime data). The component's own state is its
//! handle tables, emptied: a handle a call left behind, to a resource of the
//! host or of the component, is gone, as in a fresh instance. What lives in the
//! store's data (the embedder's `T`: WASI contexts, host resource tables) is the
//! embedder's to replace.

use crate::component::Instance;
use crate::prelude::*;
use crate::runtime::vm::CoreSnapshot;
use crate::runtime::vm::component::HandleTable;
use crate::store::InstanceId;
use crate::{AsContextMut, Result};

/// The state of a component instance just after its instantiation, as
/// [`Instance::restore`] puts it back.
pub struct Pristine {
    cores: Vec<(InstanceId, CoreSnapshot)>,
}

impl Instance {
    /// Records this instance's state, or says why it cannot be recycled. Call it
    /// right after instantiation, before any export is called.
    pub fn pristine(&self, mut store: impl AsContextMut) -> Result<Pristine> {
        let store = store.as_context_mut().0;
        let ids: Vec<InstanceId> = self.id().get(store).instance_ids().collect();
        let mut cores = Vec::with_capacity(ids.len());
        for id in ids {
            cores.push((id, store.instance_mut(id).recycle_snapshot()?));
        }
        Ok(Pristine { cores })
    }

    /// Puts back the state `pristine` recorded of this instance. Fails, leaving
    /// the instance unfit for use, if a memory or table grew since, or if the
    /// store trapped; the caller then drops the instance.
    ///
    /// Call it only between calls, never while a call into the instance is
    /// suspended.
    pub fn restore(&self, mut store: impl AsContextMut, pristine: &Pristine) -> Result<()> {
        let store = store.as_context_mut().0;
        if store.trapped() {
            bail!("the store trapped");
        }
        let engine = store.engine().clone();
        for (id, snapshot) in &pristine.cores {
            // SAFETY: no call is suspended in the instance (this function's
            // contract), and `pristine` was taken of it (its ids are this
            // component's core instances, checked below).
            unsafe {
                store.instance_mut(*id).recycle_restore(
                    snapshot,
                    engine.allocator(),
                    engine.tunables(),
                )?;
            }
        }
        let mut component = self.id().get_mut(store);
        let ids: Vec<InstanceId> = component.instance_ids().collect();
        if ids != pristine.cores.iter().map(|(id, _)| *id).collect::<Vec<_>>() {
            bail!("the snapshot was taken of another instance");
        }
        for state in component.as_mut().instance_states().0.values_mut() {
            *state.handle_table() = HandleTable::default();
        }
        Ok(())
    }
}
